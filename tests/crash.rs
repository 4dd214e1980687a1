//! `kill -9` loses no acknowledged task: a crash in the middle of submission and execution, and a
//! crash while only delayed tasks are pending, and thirty crashes at random moments (the embedded
//! store's journal and checkpoints), each followed by a restart on the same data dir.

mod common;
use common::{hits::hit_id, hits::hits_by_id, hits::wait_all_hit, now_us, Server, Sink};
use parking_lot::Mutex;
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// One submit that the server acknowledged (200 `OK`).
#[derive(Clone, Debug)]
struct Acked {
    id: String,
    /// Seconds of delay asked for (0 = immediate).
    delay: u64,
    /// Unix µs just before the request was sent: the server's due time is at least this + delay.
    sent_us: u64,
}

/// Every acknowledged delayed task ran at or after its due time, before and after the restart.
fn assert_never_early(sink: &Sink, acked: &[Acked]) {
    let seen = hits_by_id(&sink.hits());
    let mut early = Vec::new();
    for a in acked.iter().filter(|a| a.delay > 0) {
        let due = a.sent_us + a.delay * 1_000_000;
        for &at in seen.get(&a.id).map(Vec::as_slice).unwrap_or(&[]) {
            if at < due {
                early.push(format!("{} ran {} ms early", a.id, (due - at) / 1000));
            }
        }
    }
    assert!(
        early.is_empty(),
        "delayed tasks ran before their due time: {early:?}"
    );
}

/// Nothing reached the sink that was never submitted.
fn assert_no_strays(sink: &Sink, attempted: &HashSet<String>) {
    let strays: Vec<String> = hits_by_id(&sink.hits())
        .into_keys()
        .filter(|id| !attempted.contains(id))
        .collect();
    assert!(
        strays.is_empty(),
        "hits for ids never submitted: {strays:?}"
    );
}

/// `/task_resp` on `s` reports every id as succeeded (long poll, several client threads).
fn assert_all_succeeded(s: &Server, ids: &[String]) {
    let bad = Arc::new(Mutex::new(Vec::new()));
    let chunks: Vec<Vec<String>> = ids
        .chunks(ids.len().div_ceil(4).max(1))
        .map(<[String]>::to_vec)
        .collect();
    thread::scope(|scope| {
        for chunk in chunks {
            let bad = bad.clone();
            scope.spawn(move || {
                for id in chunk {
                    let (code, body) = s.get(&format!("/task_resp/{id}?timeout=30"));
                    let ok = code == 200
                        && body["id"] == id.as_str()
                        && body["result"] == "OK"
                        && body["status"] == "succeeded"
                        && body["attempts"].as_u64().is_some_and(|n| n >= 1);
                    if !ok {
                        bad.lock().push(format!("{id}: {code} {body}"));
                    }
                }
            });
        }
    });
    let bad = bad.lock();
    assert!(
        bad.is_empty(),
        "{} of {} acknowledged tasks are not reported succeeded after the restart, e.g. {:?}",
        bad.len(),
        ids.len(),
        &bad[..bad.len().min(10)]
    );
}

/// Ids that reached the sink more than once (allowed: delivery is at least once).
fn report_duplicates(sink: &Sink, what: &str) {
    let seen = hits_by_id(&sink.hits());
    let dups: Vec<(&String, usize)> = seen
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(k, v)| (k, v.len()))
        .collect();
    eprintln!(
        "{what}: {} ids ran more than once (at least once delivery), e.g. {:?}",
        dups.len(),
        &dups[..dups.len().min(10)]
    );
}

/// Waits until the server has nothing running, queued or waiting.
fn wait_idle(s: &Server) {
    common::eventually(Duration::from_secs(30), "an idle server", || {
        let (code, info) = s.get("/sys_info");
        assert_eq!(code, 200, "{info}");
        let idle =
            info["working_total"] == 0 && info["delaying_total"] == 0 && info["queued_total"] == 0;
        idle.then_some(())
    });
}

#[test]
fn kill9_during_submission_and_execution_loses_no_acknowledged_task() {
    const THREADS: usize = 6;
    const TOTAL: usize = 3300; // 3,000 immediate (a fifth of them slow) and 300 delayed 2-4 s
    const KILL_AFTER_ACKS: usize = 1100;

    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let mut s = Server::builder(&dir).args(&["--workers", "4"]).start();
    let submit_url = s.url("/task_in_queue");

    let acked: Arc<Mutex<Vec<Acked>>> = Arc::new(Mutex::new(Vec::new()));
    let n_acked = Arc::new(AtomicUsize::new(0));
    let attempted: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
    let unexpected: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let failed_sends = Arc::new(AtomicUsize::new(0));

    let submitters: Vec<_> = (0..THREADS)
        .map(|t| {
            let (acked, n_acked, attempted, unexpected, failed_sends) = (
                acked.clone(),
                n_acked.clone(),
                attempted.clone(),
                unexpected.clone(),
                failed_sends.clone(),
            );
            let url = submit_url.clone();
            let (hit, slow, late) = (sink.url("/hit"), sink.url("/slow"), sink.url("/late"));
            thread::spawn(move || {
                for i in (t..TOTAL).step_by(THREADS) {
                    let (id, delay, task) = if i % 11 == 10 {
                        let id = format!("d{i}");
                        let delay = 2 + (i as u64 % 3);
                        let task = json!({"id": id, "method": "GET", "name": late,
                                          "params": format!("id={id}"), "delay": delay});
                        (id, delay, task)
                    } else if i % 5 == 0 {
                        // Slow tasks all on worker 0: a backlog builds up that the kill cuts.
                        let id = format!("s{i}");
                        let task = json!({"id": id, "method": "GET", "name": slow, "cc": "0",
                                          "params": format!("ms=20&id={id}")});
                        (id, 0, task)
                    } else {
                        let id = format!("n{i}");
                        let task = json!({"id": id, "method": "GET", "name": hit,
                                          "params": format!("id={id}")});
                        (id, 0, task)
                    };
                    attempted.lock().insert(id.clone());
                    let sent_us = now_us();
                    match common::try_post_json(&url, &task) {
                        Ok((200, body)) if body["result"] == "OK" && body["id"] == id.as_str() => {
                            acked.lock().push(Acked { id, delay, sent_us });
                            n_acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok((code, body)) => unexpected.lock().push(format!("{id}: {code} {body}")),
                        Err(_) => {
                            // The server is gone (killed): this task was not acknowledged.
                            failed_sends.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                }
            })
        })
        .collect();

    common::eventually(
        Duration::from_secs(60),
        "enough acknowledged submits",
        || (n_acked.load(Ordering::SeqCst) >= KILL_AFTER_ACKS).then_some(()),
    );
    let kill_us = now_us();
    s.kill9();
    let hits_at_kill = hits_by_id(&sink.hits());
    for h in submitters {
        h.join().expect("submitter thread");
    }

    let acked = acked.lock().clone();
    let unexpected = unexpected.lock().clone();
    assert!(
        unexpected.is_empty(),
        "every answer before the kill must be 200 OK with the task's id: {unexpected:?}"
    );
    assert!(
        acked.len() >= KILL_AFTER_ACKS && acked.len() < TOTAL,
        "the kill must land in the middle of submission: {} of {TOTAL} acknowledged",
        acked.len()
    );
    assert!(
        failed_sends.load(Ordering::SeqCst) > 0,
        "submitters were still sending when the server died"
    );
    let delayed_pending = acked
        .iter()
        .filter(|a| a.delay > 0 && !hits_at_kill.contains_key(&a.id))
        .count();
    let immediate_pending = acked
        .iter()
        .filter(|a| a.delay == 0 && !hits_at_kill.contains_key(&a.id))
        .count();
    assert!(
        delayed_pending > 0,
        "some acknowledged delayed tasks must still be pending at the kill"
    );
    eprintln!(
        "killed after {} ms: {} acknowledged ({} delayed), {} immediate and {} delayed not yet run",
        (kill_us - acked.iter().map(|a| a.sent_us).min().unwrap_or(kill_us)) / 1000,
        acked.len(),
        acked.iter().filter(|a| a.delay > 0).count(),
        immediate_pending,
        delayed_pending
    );

    let s2 = Server::builder(&dir).args(&["--workers", "4"]).start();
    let want: HashSet<String> = acked.iter().map(|a| a.id.clone()).collect();
    wait_all_hit(&sink, &want, Duration::from_secs(60), "after the restart");
    assert_never_early(&sink, &acked);
    let ids: Vec<String> = acked.iter().map(|a| a.id.clone()).collect();
    assert_all_succeeded(&s2, &ids);
    wait_idle(&s2);
    assert_never_early(&sink, &acked);

    assert_no_strays(&sink, &attempted.lock());
    let no_id = sink.hits().iter().filter(|h| hit_id(h).is_none()).count();
    assert_eq!(no_id, 0, "every hit carries its task's id");
    report_duplicates(&sink, "kill -9 mid-submission");
}

#[test]
fn kill9_with_only_delayed_tasks_pending_loses_none() {
    const N: usize = 120;
    const DELAY: u64 = 3;

    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let mut s = Server::builder(&dir).args(&["--workers", "4"]).start();
    let late = sink.url("/late");

    let acked: Vec<Acked> = thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (s, late) = (&s, &late);
                scope.spawn(move || {
                    let mut out = Vec::new();
                    for i in (t..N).step_by(4) {
                        let id = format!("later-{i}");
                        let sent_us = now_us();
                        let (code, body) = s.submit(&json!({"id": id, "method": "GET",
                            "name": late, "params": format!("id={id}"), "delay": DELAY}));
                        assert_eq!(code, 200, "{id}: {body}");
                        assert_eq!(body["id"], id.as_str(), "{body}");
                        out.push(Acked {
                            id,
                            delay: DELAY,
                            sent_us,
                        });
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("submitter"))
            .collect()
    });
    assert_eq!(acked.len(), N);
    assert!(
        sink.hits().is_empty(),
        "no delayed task may run before its time (all were submitted less than {DELAY} s ago)"
    );
    s.kill9();
    assert!(sink.hits().is_empty(), "nothing ran before the kill");

    // Stay down until every task is overdue, then come back.
    let last_due = acked.iter().map(|a| a.sent_us).max().expect("some") + DELAY * 1_000_000;
    while now_us() < last_due + 300_000 {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        sink.hits().is_empty(),
        "nothing runs while the server is down"
    );
    let restarted_us = now_us();
    let s2 = Server::builder(&dir).args(&["--workers", "4"]).start();

    let want: HashSet<String> = acked.iter().map(|a| a.id.clone()).collect();
    wait_all_hit(
        &sink,
        &want,
        Duration::from_secs(30),
        "overdue delayed tasks after the restart",
    );
    assert!(
        sink.hits().iter().all(|h| h.at_us >= restarted_us),
        "every run happened after the restart"
    );
    assert_never_early(&sink, &acked);
    let ids: Vec<String> = acked.iter().map(|a| a.id.clone()).collect();
    assert_all_succeeded(&s2, &ids);
    wait_idle(&s2);
    let per_id = hits_by_id(&sink.hits());
    let (code, info) = s2.get("/sys_info");
    assert_eq!(code, 200);
    assert_eq!(info["counts"]["succeeded"], N as u64, "{info}");
    let extra: usize = per_id.values().map(|v| v.len() - 1).sum();
    assert_eq!(
        extra, 0,
        "tasks that never started before the crash run exactly once after it: {per_id:?}"
    );
}

/// The embedded store's journal and checkpoints under crashes: `kill -9` at 30 moments drawn at
/// random (a seed printed for a rerun) while 4 clients submit, with checkpoints every 100 ms so
/// that kills land before, during and after them, and some right after a start (during the
/// journal's replay). After the last restart every acknowledged task runs and reports success;
/// no acknowledged id is lost, nothing never submitted runs, nothing runs early.
#[test]
fn kill9_at_thirty_random_moments_loses_no_acknowledged_task() {
    const ROUNDS: usize = 30;
    const CLIENTS: usize = 4;
    let seed = std::env::var("POULPE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_us() | 1);
    eprintln!("seed {seed} (rerun with POULPE_CRASH_SEED={seed})");
    let mut rng = seed;
    let mut next = move |n: u64| {
        // xorshift64: enough to spread the kills.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let args = ["--workers", "4", "--checkpoint_ms", "100"];
    let mut acked: Vec<Acked> = Vec::new();
    let mut attempted: HashSet<String> = HashSet::new();
    for round in 0..ROUNDS {
        let mut s = Server::builder(&dir).args(&args).start();
        // A third of the kills come within 30 ms of the start, the others within 1.2 s.
        let after_ms = if next(3) == 0 { next(30) } else { next(1200) };
        let url = s.url("/task_in_queue");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (url, stop, hit) = (url.clone(), stop.clone(), sink.url("/hit"));
                let late = sink.url("/late");
                thread::spawn(move || {
                    let (mut ok, mut tried) = (Vec::new(), Vec::new());
                    let mut i = 0;
                    while !stop.load(Ordering::SeqCst) {
                        i += 1;
                        let id = format!("k{round}-{c}-{i}");
                        let delay = u64::from(i % 7 == 0);
                        let name = if delay > 0 { &late } else { &hit };
                        let task = json!({"id": id, "method": "GET", "name": name,
                                          "params": format!("id={id}"), "delay": delay});
                        tried.push(id.clone());
                        let sent_us = now_us();
                        match common::try_post_json(&url, &task) {
                            Ok((200, b)) if b["result"] == "OK" && b["id"] == id.as_str() => {
                                ok.push(Acked { id, delay, sent_us })
                            }
                            Ok((code, b)) => panic!("{id}: unexpected answer {code} {b}"),
                            Err(_) => break,
                        }
                    }
                    (ok, tried)
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(after_ms));
        s.kill9();
        stop.store(true, Ordering::SeqCst);
        for c in clients {
            let (ok, tried) = c.join().expect("client");
            acked.extend(ok);
            attempted.extend(tried);
        }
    }
    assert!(
        acked.len() > ROUNDS * 10,
        "the clients got few acknowledgements ({}): the kills did not land under load",
        acked.len()
    );
    let s = Server::builder(&dir).args(&args).start();
    let want: HashSet<String> = acked.iter().map(|a| a.id.clone()).collect();
    wait_all_hit(
        &sink,
        &want,
        Duration::from_secs(60),
        "after the last restart",
    );
    assert_never_early(&sink, &acked);
    let ids: Vec<String> = acked.iter().map(|a| a.id.clone()).collect();
    assert_all_succeeded(&s, &ids);
    wait_idle(&s);
    assert_no_strays(&sink, &attempted);
    eprintln!(
        "{} acknowledged tasks over {ROUNDS} kills, all ran after the last restart",
        acked.len()
    );
    report_duplicates(&sink, "30 kills");
}

/// A restart rebuilds each unfinished task's state from the store: a task waiting for its retry
/// still reads `retry_wait` on `/task_resp`, a delayed one `delayed`.
#[test]
fn waiting_tasks_read_the_same_status_after_a_kill9_and_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let mut s = Server::builder(&dir).start();
    let (code, r) = s.submit(
        &json!({"id": "rw", "method": "GET", "name": sink.url("/status/500"),
        "max_retry": 3, "retry_interval": 3600}),
    );
    assert_eq!(code, 200, "{r}");
    let (code, r) = s.submit(&json!({"id": "dl", "method": "GET", "name": sink.url("/d"),
        "delay": 3600}));
    assert_eq!(code, 200, "{r}");
    common::eventually(Duration::from_secs(30), "rw waiting for its retry", || {
        let (code, r) = s.get("/task_resp/rw?timeout=0");
        (code == 202 && r["status"] == "retry_wait").then_some(())
    });
    s.kill9();
    let s = Server::builder(&dir).start();
    for (id, want) in [("rw", "retry_wait"), ("dl", "delayed")] {
        let (code, r) = s.get(&format!("/task_resp/{id}?timeout=0"));
        assert_eq!(
            (code, r["status"].as_str()),
            (202, Some(want)),
            "{id} after the restart: {r}"
        );
    }
}
