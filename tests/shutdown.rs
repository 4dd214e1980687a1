//! Graceful stop: SIGTERM lets the running attempt finish and records it, refuses new submits,
//! keeps delayed tasks for the next start and exits 0; SIGINT exits 0 too.

mod common;
use common::{now_us, Server, Sink};
use serde_json::json;
use std::thread;
use std::time::Duration;

fn query_id(q: &str) -> Option<&str> {
    q.split('&').find_map(|kv| kv.strip_prefix("id="))
}

#[test]
fn sigterm_finishes_the_running_attempt_refuses_intake_and_keeps_delayed_tasks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let mut s = Server::builder(&dir).args(&["--workers", "2"]).start();

    let (code, body) = s.submit(&json!({"id": "run-1", "method": "GET",
        "name": sink.url("/slow"), "params": "ms=1500&id=run-1"}));
    assert_eq!(code, 200, "{body}");
    let mut delayed = Vec::new();
    for i in 0..5 {
        let id = format!("later-{i}");
        let sent_us = now_us();
        let (code, body) = s.submit(&json!({"id": id, "method": "GET",
            "name": sink.url("/late"), "params": format!("id={id}"), "delay": 4}));
        assert_eq!(code, 200, "{body}");
        delayed.push((id, sent_us + 4_000_000));
    }
    sink.wait_until(Duration::from_secs(10), "the slow task to start", |h| {
        h.iter().any(|h| h.path == "/slow")
    });
    let started_us = sink.hits_on("/slow")[0].at_us;

    s.signal(libc::SIGTERM);
    // Once the server says it is shutting down, intake is closed: never 200 again.
    common::eventually(Duration::from_secs(5), "the shutdown log line", || {
        s.log_text().contains("shutting down").then_some(())
    });
    let mut refused = Vec::new();
    let mut answered_503 = 0;
    let mut status = None;
    for i in 0.. {
        if let Some(st) = s.wait_exit(Duration::ZERO) {
            status = Some(st);
            break;
        }
        let id = format!("during-{i}");
        match s.try_submit(&json!({"id": id, "method": "GET",
            "name": sink.url("/refused"), "params": format!("id={id}")}))
        {
            Ok((503, body)) => {
                assert_eq!(body["result"], "Fail", "{body}");
                answered_503 += 1;
            }
            Ok((code, body)) => panic!("a submit during shutdown got {code} {body}"),
            Err(_) => {} // the listener has closed: connection refused
        }
        refused.push(id);
        thread::sleep(Duration::from_millis(50));
        assert!(i < 400, "the server did not exit within 20 s of SIGTERM");
    }
    let exited_us = now_us();
    let status = status.expect("exited");
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0: {status:?}");
    assert!(
        exited_us >= started_us + 1_500_000,
        "the process exited {} ms after the slow attempt started, before it could finish",
        (exited_us - started_us) / 1000
    );
    assert!(
        answered_503 > 0,
        "while the running attempt finishes, the server still answers submits with 503"
    );
    let log = s.log_text();
    assert!(log.contains("stopped"), "log:\n{log}");
    assert!(
        sink.hits_on("/late").is_empty(),
        "delayed tasks do not run before their time"
    );

    let s2 = Server::builder(&dir).args(&["--workers", "2"]).start();
    // The attempt that was running at SIGTERM finished and was recorded before the exit: the
    // result is there at once, and it is not run again.
    let (code, r) = s2.get("/task_resp/run-1?timeout=0");
    assert_eq!(code, 200, "run-1 was recorded before the exit: {r}");
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["attempts"], 1, "{r}");
    assert_eq!(r["output"], "ok", "{r}");

    for (id, _) in &delayed {
        let (code, r) = s2.get(&format!("/task_resp/{id}?timeout=30"));
        assert_eq!(code, 200, "{id}: {r}");
        assert_eq!(r["status"], "succeeded", "{id}: {r}");
    }
    let late = sink.hits_on("/late");
    for (id, due_us) in &delayed {
        let runs: Vec<u64> = late
            .iter()
            .filter(|h| query_id(&h.query) == Some(id))
            .map(|h| h.at_us)
            .collect();
        assert_eq!(runs.len(), 1, "{id} runs once after the restart: {runs:?}");
        assert!(runs[0] >= *due_us, "{id} ran before its due time");
    }
    assert_eq!(
        sink.hits_on("/slow").len(),
        1,
        "the attempt that finished during shutdown is not run again"
    );
    assert!(
        sink.hits_on("/refused").is_empty(),
        "nothing submitted during shutdown ran"
    );
    for id in &refused {
        let (code, r) = s2.get(&format!("/task_resp/{id}?timeout=0"));
        assert_eq!(code, 404, "{id} was refused, so it is unknown: {r}");
    }
}

#[test]
fn sigint_exits_0_and_keeps_pending_tasks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let mut s = Server::builder(&dir).start();
    let sent_us = now_us();
    let (code, body) = s.submit(&json!({"id": "after-int", "method": "GET",
        "name": sink.url("/late"), "params": "id=after-int", "delay": 2}));
    assert_eq!(code, 200, "{body}");
    s.signal(libc::SIGINT);
    let status = s
        .wait_exit(Duration::from_secs(20))
        .expect("SIGINT stops the server");
    assert_eq!(status.code(), Some(0), "SIGINT exits 0: {status:?}");
    assert!(s.log_text().contains("stopped"), "{}", s.log_text());
    assert!(
        sink.hits().is_empty(),
        "the delayed task waits for its time"
    );

    let s2 = Server::builder(&dir).start();
    let (code, r) = s2.get("/task_resp/after-int?timeout=30");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "succeeded", "{r}");
    let hits = sink.hits_on("/late");
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert!(hits[0].at_us >= sent_us + 2_000_000, "never early");
}

#[test]
fn sigterm_on_an_idle_server_exits_0_and_frees_the_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = Server::builder(&dir).start();
    let status = s.term();
    assert_eq!(status.code(), Some(0), "{status:?}");
    // The store lock is released: a new server opens the same directory at once.
    let s2 = Server::builder(&dir).start();
    let (code, _) = s2.get("/health");
    assert_eq!(code, 200);
}
