//! `cc` routing: tasks limited to some workers never run on more of them at once; others spread.

mod common;
use common::{Server, Sink};
use serde_json::json;
use std::time::Duration;

#[test]
fn cc_limits_parallelism_to_the_listed_workers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::start(&dir, &["--workers", "4"]);
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
    let s = Server::start(&dir, &["--workers", "4"]);
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
    let s = Server::start(&dir, &["--workers", "2"]);
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

#[test]
fn out_of_range_cc_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&dir, &["--workers", "2"]);
    for cc in [json!("2"), json!("0,5"), json!("x"), json!([-1])] {
        let (code, r) =
            s.submit(&json!({"method":"GET","name":"http://127.0.0.1:9/","cc":cc.clone()}));
        assert_eq!(code, 400, "cc {cc}: {r}");
        assert!(r["reason"].as_str().unwrap_or("").contains("cc"), "{r}");
    }
}
