//! Checks of result retention shared by the embedded and Redis stores (`--result_max`,
//! `--result_ttl`).

use super::{eventually, now_us, Server, Sink};
use serde_json::Value;
use std::thread;
use std::time::{Duration, Instant};

/// Submits 3,000 tasks to a server started with `--result_max 1000` and checks that the oldest
/// results are dropped (404), the newest stay readable, and at most 1,000 stay stored.
pub fn check_result_max(s: &Server, sink: &Sink) {
    for chunk in 0..30 {
        let tasks: Vec<Value> = (chunk * 100..chunk * 100 + 100)
            .map(|i| {
                serde_json::json!({"id": format!("r{i}"), "method": "GET",
                    "name": sink.url("/r"), "params": format!("id=r{i}")})
            })
            .collect();
        let (code, r) = s.submit(&Value::Array(tasks));
        assert_eq!(code, 200, "{r}");
    }
    eventually(Duration::from_secs(60), "3,000 tasks finished", || {
        let (_, info) = s.get("/sys_info");
        (info["counts"]["succeeded"] == 3000).then_some(())
    });
    let stored = eventually(Duration::from_secs(30), "results_stored <= 1000", || {
        let (_, info) = s.get("/sys_info");
        let n = info["results_stored"].as_u64()?;
        (n <= 1000).then_some(n)
    });
    assert!(
        stored >= 990,
        "the newest results are kept, not more dropped: {stored}"
    );
    for i in 0..20 {
        let (code, r) = s.get(&format!("/task_resp/r{i}?timeout=0"));
        assert_eq!(
            code, 404,
            "an old result beyond --result_max is dropped: r{i}: {r}"
        );
    }
    for i in 2980..3000 {
        let (code, r) = s.get(&format!("/task_resp/r{i}?timeout=0"));
        assert_eq!(
            (code, &r["status"]),
            (200, &serde_json::json!("succeeded")),
            "r{i}: {r}"
        );
    }
}

// ---- Result expiry (`--result_ttl`). ----

/// Submits `task` (with `wait`) on `s`, which runs with `--result_ttl ttl_s`, and checks that its
/// result is readable on `/task_resp` until `ttl_s` after the submit was sent (the result
/// finished after that, so it cannot expire sooner), then 404 (polled, up to a generous deadline).
pub fn check_result_expires(s: &Server, task: &Value, ttl_s: u64) {
    let id = task["id"].as_str().expect("the task's id").to_string();
    let sent_us = now_us();
    let (code, r) = s.submit(task);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "OK", "{r}");
    let not_before_us = sent_us + ttl_s * 1_000_000;
    let mut readable = 0;
    let deadline = Instant::now() + Duration::from_secs(ttl_s + 60);
    loop {
        let (code, body) = s.get(&format!("/task_resp/{id}?timeout=0"));
        let answered_us = now_us();
        if answered_us < not_before_us {
            assert_eq!(
                code,
                200,
                "{id}: the result was gone {} ms before --result_ttl {ttl_s} s ran out (after \
                 {readable} readable answers): {body}",
                (not_before_us - answered_us) / 1000
            );
            assert_eq!(body["id"], id.as_str(), "{body}");
            readable += 1;
        } else if code == 404 {
            break;
        } else {
            assert_eq!(code, 200, "{id}: neither the result nor 404: {body}");
            assert!(
                Instant::now() < deadline,
                "{id}: the result is still readable long after --result_ttl {ttl_s} s: {body}"
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(readable > 0, "{id}: no read happened within the TTL");
}
