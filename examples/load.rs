//! Load client for a quick throughput measurement: starts a local HTTP sink, submits N immediate
//! GET tasks to a running poulpe over C keep-alive connections, and reports submits/s and
//! executed tasks/s (first submit to last sink arrival).
//!
//! `cargo run --release --example load -- --server http://127.0.0.1:8000 -n 20000 -c 8`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let server = arg(&args, "--server", "http://127.0.0.1:8000");
    let n: usize = arg(&args, "-n", "20000").parse().expect("-n: a number");
    let conns: usize = arg(&args, "-c", "8").parse().expect("-c: a number");
    let batch: usize = arg(&args, "--batch", "1")
        .parse()
        .expect("--batch: a number");

    let sink = poulpe::http::listen(([127, 0, 0, 1], 0).into()).expect("sink");
    let sink_port = sink.local_addr().expect("sink address").port();
    let hits = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let last_hit_us = Arc::new(AtomicU64::new(0));
    let (h, last) = (hits.clone(), last_hit_us.clone());
    let limits = poulpe::http::Limits {
        max_body: 1 << 20,
        idle: Duration::from_secs(75),
        max_conns: 1024,
    };
    sink.serve(
        limits,
        Arc::new(move |_req: poulpe::http::Request| -> poulpe::http::Reply {
            h.fetch_add(1, Ordering::Relaxed);
            last.fetch_max(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            poulpe::http::Response::text(200, "ok").into()
        }),
    )
    .expect("sink threads");

    let run = format!("{}", std::process::id());
    let start = Instant::now();
    let submitters: Vec<_> = (0..conns)
        .map(|c| {
            let server = server.clone();
            let run = run.clone();
            thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                let url = format!("{server}/task_in_queue");
                let mine: Vec<usize> = (0..n).filter(|i| i % conns == c).collect();
                let mut refused = 0usize;
                for chunk in mine.chunks(batch) {
                    let tasks: Vec<serde_json::Value> = chunk
                        .iter()
                        .map(|i| {
                            serde_json::json!({
                                "id": format!("load-{run}-{i}"),
                                "method": "GET",
                                "name": format!("http://127.0.0.1:{sink_port}/hit"),
                                "params": format!("i={i}"),
                            })
                        })
                        .collect();
                    let body = if batch == 1 {
                        tasks[0].to_string()
                    } else {
                        serde_json::Value::Array(tasks).to_string()
                    };
                    match agent
                        .post(&url)
                        .content_type("application/json")
                        .send(body.as_bytes())
                    {
                        Ok(r) if r.status() == 200 => {}
                        _ => refused += chunk.len(),
                    }
                }
                refused
            })
        })
        .collect();
    let refused: usize = submitters.into_iter().map(|h| h.join().unwrap_or(n)).sum();
    let submit_s = start.elapsed().as_secs_f64();
    let accepted = n - refused;
    let deadline = Instant::now() + Duration::from_secs(300);
    while (hits.load(Ordering::Relaxed) as usize) < accepted && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let start_us = start.duration_since(t0).as_micros() as u64;
    let exec_s = (last_hit_us.load(Ordering::Relaxed).saturating_sub(start_us)) as f64 / 1e6;
    let got = hits.load(Ordering::Relaxed);
    println!(
        "tasks {n} accepted {accepted} executed {got} | submit {submit_s:.2} s = {:.0} submits/s | first submit to last run {exec_s:.2} s = {:.0} executed/s",
        accepted as f64 / submit_s,
        got as f64 / exec_s
    );
}
