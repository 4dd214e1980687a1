//! `cc` routing: tasks limited to some workers never run on more of them at once; others spread.

mod common;
use common::{Server, Sink};
use serde_json::json;
use std::time::Duration;

#[test]
fn cc_limits_parallelism_to_the_listed_workers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--workers", "4"]).start();
    for i in 0..8 {
        let t = json!({"id": format!("cc-{i}"), "method":"GET", "name": sink.url("/slow"),
                       "params": "ms=300", "cc": "0,1"});
        assert_eq!(s.submit(&t).0, 200);
    }
    sink.wait_until(Duration::from_secs(20), "8 limited tasks", |h| h.len() >= 8);
    let (code, _) = s.get("/task_resp/cc-7?timeout=10");
    assert_eq!(code, 200);
    assert_eq!(
        sink.max_in_flight(),
        2,
        "cc \"0,1\" allows exactly two at once"
    );
}

#[test]
fn tasks_without_cc_use_every_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--workers", "4"]).start();
    for i in 0..8 {
        let t = json!({"id": format!("free-{i}"), "method":"GET", "name": sink.url("/slow"),
                       "params": "ms=500"});
        assert_eq!(s.submit(&t).0, 200);
    }
    sink.wait_until(Duration::from_secs(20), "8 free tasks", |h| h.len() >= 8);
    assert_eq!(sink.max_in_flight(), 4, "four workers run four at once");
}

#[test]
fn a_slow_task_does_not_block_a_task_allowed_on_an_idle_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--workers", "2"]).start();
    // A long task on worker 0, then quick tasks allowed on 0 or 1: they must not wait behind it.
    let long =
        json!({"id":"long","method":"GET","name":sink.url("/slow"),"params":"ms=4000","cc":[0]});
    assert_eq!(s.submit(&long).0, 200);
    sink.wait_until(Duration::from_secs(5), "the long task", |h| !h.is_empty());
    let quick = json!({"id":"quick","method":"GET","name":sink.url("/q"),"cc":"0 1","wait":3});
    let (code, r) = s.submit(&quick);
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        r["result"], "OK",
        "the quick task finished while the long one ran: {r}"
    );
}

/// The dead-letter record of `id` under `<data>/dead/<date>/`.
fn dead_record(s: &Server, id: &str) -> serde_json::Value {
    let name = format!("task-{id}.json");
    let dead = s.data.join("dead");
    for day in std::fs::read_dir(&dead).expect("the dead-letter folder") {
        let path = day.expect("entry").path().join(&name);
        if let Ok(bytes) = std::fs::read(&path) {
            return serde_json::from_slice(&bytes).expect("dead-letter JSON");
        }
    }
    panic!("no dead-letter record {name} under {}", dead.display());
}

#[test]
fn an_idle_worker_never_takes_a_task_whose_cc_excludes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--workers", "2"]).start();
    // Worker 0 runs a long task and worker 1 a shorter one; tasks allowed only on worker 0
    // queue behind the long one. When worker 1 finishes and looks for work in other queues, it
    // must leave them there. Each runs once and fails, so its dead-letter record names the
    // worker of its attempt.
    let long = json!({"id":"long0","method":"GET","name":sink.url("/slow"),
                      "params":"ms=4000&id=long0","cc":"0"});
    assert_eq!(s.submit(&long).0, 200);
    sink.wait_until(Duration::from_secs(10), "the long task", |h| {
        h.iter().any(|h| common::hits::hit_id(h) == Some("long0"))
    });
    let medium = json!({"id":"medium1","method":"GET","name":sink.url("/slow"),
                        "params":"ms=1000&id=medium1","cc":"1"});
    assert_eq!(s.submit(&medium).0, 200);
    sink.wait_until(Duration::from_secs(10), "the task on worker 1", |h| {
        h.iter().any(|h| common::hits::hit_id(h) == Some("medium1"))
    });
    let ids: Vec<String> = (0..4).map(|i| format!("only0-{i}")).collect();
    for id in &ids {
        let t = json!({"id": id, "method":"GET", "name": sink.url("/status/500"),
                       "params": format!("id={id}"), "cc": "0", "max_retry": 0});
        assert_eq!(s.submit(&t).0, 200);
    }
    // Positive signal: the worker-0 tasks were queued before worker 1 became free.
    let (code, r) = s.get("/task_resp/medium1?timeout=0");
    assert_eq!(
        code, 202,
        "worker 1 finished before the worker-0 tasks were queued; the test saw nothing: {r}"
    );
    let (code, r) = s.get("/task_resp/medium1?timeout=20");
    assert_eq!(code, 200, "{r}");
    for id in &ids {
        let (code, r) = s.get(&format!("/task_resp/{id}?timeout=30"));
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["status"], "dead", "{r}");
        let record = dead_record(&s, id);
        let attempts = record["task"]["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), 1, "{record}");
        assert_eq!(
            attempts[0]["worker"], 0,
            "{id} has cc \"0\" but ran on another worker: {record}"
        );
    }
    let (code, r) = s.get("/task_resp/long0?timeout=0");
    assert_eq!(
        code, 200,
        "the long task finished before the tasks queued behind it: {r}"
    );
}

#[test]
fn out_of_range_cc_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--workers", "2"]).start();
    for cc in [json!("2"), json!("0,5"), json!("x"), json!([-1])] {
        let (code, r) =
            s.submit(&json!({"method":"GET","name":"http://127.0.0.1:9/","cc":cc.clone()}));
        assert_eq!(code, 400, "cc {cc}: {r}");
        assert!(r["reason"].as_str().unwrap_or("").contains("cc"), "{r}");
    }
}
