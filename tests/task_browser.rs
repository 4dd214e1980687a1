//! The task browser and dead-task retry API against the real binary: `GET /tasks` (each state,
//! paging, filters, bad input), `GET /task/{id}` (attempts, header names only), `POST
//! /task/{id}/retry` (runs again with a fresh budget, history kept; 409 / 404), `POST
//! /tasks/retry?state=dead`, a retry surviving `kill -9`, and the same on `--redis`.

mod common;
use common::{post_raw, redis::RedisServer, request, Server, Sink};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A local HTTP server answering every request with the status it is set to (body `down` or
/// `up`), counting hits by path: a service that fails until it is fixed.
struct Switch {
    status: Arc<AtomicU16>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    port: u16,
    server: poulpe::http::Listening,
}

impl Switch {
    fn start(status: u16) -> Switch {
        use poulpe::http::{Reply, Request, Response};
        let server = poulpe::http::listen(([127, 0, 0, 1], 0).into()).expect("bind");
        let port = server.local_addr().expect("address").port();
        let st = Arc::new(AtomicU16::new(status));
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let (s, h) = (st.clone(), hits.clone());
        let handler = move |req: Request| -> Reply {
            *h.lock().entry(req.path().to_string()).or_insert(0) += 1;
            let code = s.load(Ordering::SeqCst);
            Response::text(code, if code < 300 { "up" } else { "down" }).into()
        };
        let limits = poulpe::http::Limits {
            max_body: 1 << 20,
            idle: Duration::from_secs(75),
            max_conns: 256,
        };
        server.serve(limits, Arc::new(handler)).expect("serve");
        Switch {
            status: st,
            hits,
            port,
            server,
        }
    }

    fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().get(path).copied().unwrap_or(0)
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.server.stop();
    }
}

fn post(s: &Server, path: &str) -> (u16, Value) {
    post_raw(&s.url(path), b"", &[])
}

/// The ids of one page of `GET /tasks?{query}` and its `next`.
fn page(s: &Server, query: &str) -> (Vec<String>, Value) {
    let (code, body) = s.get(&format!("/tasks?{query}"));
    assert_eq!(code, 200, "{query}: {body}");
    let ids = body["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["id"].as_str().expect("id").to_string())
        .collect();
    (ids, body["next"].clone())
}

/// Every page of `GET /tasks?{query}`, following `next`.
fn all_pages(s: &Server, query: &str) -> (Vec<String>, usize) {
    let (mut ids, mut pages) = (Vec::new(), 0);
    let mut cursor = String::new();
    loop {
        pages += 1;
        assert!(pages < 50, "{query}: the pages end");
        let (got, next) = page(s, &format!("{query}{cursor}"));
        ids.extend(got);
        match next.as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return (ids, pages),
        }
    }
}

fn wait_status(s: &Server, id: &str, status: &str) -> Value {
    let (code, r) = s.get(&format!("/task_resp/{id}?timeout=30"));
    assert_eq!((code, r["status"].as_str()), (200, Some(status)), "{r}");
    r
}

/// A dead task made by `sw` failing: max_retry 1, so two attempts.
fn make_dead(s: &Server, sw: &Switch, id: &str) {
    let t = json!({"id": id, "method": "GET", "name": sw.url(&format!("/{id}")),
                   "max_retry": 1, "retry_interval": 0,
                   "headers": {"Authorization": "Bearer very-secret"}});
    assert_eq!(s.submit(&t).0, 200);
    let r = wait_status(s, id, "dead");
    assert_eq!(r["attempts"], 2, "{r}");
}

/// A dead task's record shows its attempts; a retry runs it again with a fresh budget (two
/// more attempts while the service still fails), then, once the service is fixed, to success,
/// its history kept throughout.
fn dead_task_runs_again(s: &Server, sw: &Switch) {
    make_dead(s, sw, "dt-1");
    let (code, rec) = s.get("/task/dt-1");
    assert_eq!(code, 200, "{rec}");
    assert_eq!(
        (rec["id"].as_str(), rec["state"].as_str()),
        (Some("dt-1"), Some("dead"))
    );
    let attempts = rec["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{rec}");
    for a in attempts {
        assert_eq!(
            (a["ok"].as_bool(), a["code"].as_i64()),
            (Some(false), Some(503)),
            "{rec}"
        );
        assert!(a["error"].as_str().unwrap_or("").contains("503"), "{rec}");
        assert_eq!(a["output"], "down", "{rec}");
        assert!(
            a["started_at"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{rec}"
        );
    }
    assert_eq!(rec["task"]["headers"], json!(["Authorization"]), "{rec}");
    assert!(
        !rec.to_string().contains("very-secret"),
        "a header value shown: {rec}"
    );
    assert_eq!(rec["task"]["method"], "GET", "{rec}");
    assert_eq!(rec["task"]["max_retry"], 1, "{rec}");
    assert_eq!(rec["result"]["status"], "dead", "{rec}");
    let (ids, _) = page(s, "state=dead");
    assert!(ids.contains(&"dt-1".to_string()), "{ids:?}");

    // Still failing: the fresh budget gives it max_retry + 1 = 2 more attempts.
    let (code, r) = post(s, "/task/dt-1/retry");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r, json!({"result": "OK", "reason": "", "id": "dt-1"}));
    let r = wait_status(s, "dt-1", "dead");
    assert_eq!(r["attempts"], 4, "the history grows: {r}");
    assert_eq!(sw.hits("/dt-1"), 4);

    // Fixed: the next retry succeeds, the whole history kept.
    sw.set(200);
    assert_eq!(post(s, "/task/dt-1/retry").0, 200);
    let r = wait_status(s, "dt-1", "succeeded");
    assert_eq!(
        (r["attempts"].as_i64(), r["output"].as_str()),
        (Some(5), Some("up")),
        "{r}"
    );
    assert_eq!(sw.hits("/dt-1"), 5, "the service was called again");
    let (_, rec) = s.get("/task/dt-1");
    assert_eq!(rec["state"], "succeeded", "{rec}");
    let attempts = rec["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 5, "{rec}");
    assert_eq!(attempts[4]["ok"], true, "{rec}");
    let (ids, _) = page(s, "state=succeeded&q=dt-");
    assert_eq!(ids, ["dt-1"]);
    // The `task-<id>` form that /task_resp accepts finds it too.
    let (code, alias) = s.get("/task/task-dt-1");
    assert_eq!(code, 200, "{alias}");
    assert_eq!(alias["id"], "dt-1", "{alias}");

    // Not dead, or unknown.
    let (code, r) = post(s, "/task/dt-1/retry");
    assert_eq!(code, 409, "{r}");
    assert!(
        r["reason"].as_str().unwrap_or("").contains("succeeded"),
        "{r}"
    );
    let (code, r) = post(s, "/task/no-such-task/retry");
    assert_eq!(code, 404, "{r}");
    let (code, r) = s.get("/task/no-such-task");
    assert_eq!(code, 404, "{r}");
}

#[test]
fn a_dead_task_shows_its_attempts_and_runs_again_when_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sw = Switch::start(503);
    let s = Server::builder(&dir).start();
    dead_task_runs_again(&s, &sw);
    let (_, m) = s.get("/metrics");
    let text = m.as_str().unwrap_or_default();
    assert!(text.contains("poulpe_tasks_retried_total 2"), "{text}");
}

#[test]
fn every_state_is_listed_and_paged_and_filtered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let sw = Switch::start(503);
    let s = Server::builder(&dir).args(&["--workers", "2"]).start();

    // Worker 0: one slow task running, one queued behind it.
    for id in ["run-1", "que-1"] {
        let t = json!({"id": id, "method": "GET", "name": sink.url("/slow"),
                       "params": "ms=20000", "cc": "0"});
        assert_eq!(s.submit(&t).0, 200);
    }
    sink.wait_until(Duration::from_secs(10), "the slow task runs", |h| {
        !h.is_empty()
    });
    // Delayed: five to page through, and one POST with a name to find.
    for i in 1..=5 {
        let t = json!({"id": format!("page-{i}"), "method": "GET", "name": sink.url("/x"),
                       "delay": 600});
        assert_eq!(s.submit(&t).0, 200);
    }
    let t = json!({"id": "post-1", "method": "POST", "name": sink.url("/special"),
                   "params": {"a": 1}, "delay": 600});
    assert_eq!(s.submit(&t).0, 200);
    // Waiting to retry, on worker 1.
    let t = json!({"id": "rw-1", "method": "GET", "name": sw.url("/rw"), "cc": "1",
                   "max_retry": 3, "retry_interval": 600});
    assert_eq!(s.submit(&t).0, 200);
    // Finished: succeeded, dead, cancelled.
    let t = json!({"id": "ok-1", "method": "GET", "name": sink.url("/ok"), "cc": "1",
                   "wait": 20});
    assert_eq!(s.submit(&t).1["status"], "succeeded");
    let t = json!({"id": "dead-1", "method": "GET", "name": sw.url("/d"), "cc": "1",
                   "max_retry": 0, "wait": 20});
    assert_eq!(s.submit(&t).1["status"], "dead");
    let t = json!({"id": "can-1", "method": "GET", "name": sink.url("/c"), "delay": 600});
    assert_eq!(s.submit(&t).0, 200);
    assert_eq!(request("DELETE", &s.url("/task/can-1"), &[]).0, 200);
    common::eventually(Duration::from_secs(10), "rw-1 waits to retry", || {
        (page(&s, "state=retry_wait").0 == ["rw-1"]).then_some(())
    });

    for (state, ids) in [
        ("running", vec!["run-1"]),
        ("queued", vec!["que-1"]),
        ("retry_wait", vec!["rw-1"]),
        ("succeeded", vec!["ok-1"]),
        ("dead", vec!["dead-1"]),
        ("cancelled", vec!["can-1"]),
    ] {
        assert_eq!(
            page(&s, &format!("state={state}")),
            (ids.iter().map(|i| i.to_string()).collect(), Value::Null),
            "{state}"
        );
    }
    let (ids, _) = page(&s, "state=delayed");
    assert_eq!(
        ids,
        ["page-1", "page-2", "page-3", "page-4", "page-5", "post-1"],
        "by id"
    );

    // The shape of a row: times in RFC 3339 with milliseconds, null where none.
    let (_, body) = s.get("/tasks?state=delayed&limit=1");
    let row = &body["tasks"][0];
    assert_eq!(
        (row["id"].as_str(), row["state"].as_str()),
        (Some("page-1"), Some("delayed"))
    );
    assert_eq!(
        (row["method"].as_str(), row["attempts"].as_i64()),
        (Some("GET"), Some(0))
    );
    assert_eq!(row["name"], sink.url("/x"));
    let stamp = |v: &Value| {
        v.as_str()
            .is_some_and(|t| t.len() == 24 && t.ends_with('Z'))
    };
    assert!(stamp(&row["due"]) && stamp(&row["submitted_at"]), "{row}");
    assert_eq!(row["finished_at"], Value::Null, "{row}");
    let (_, body) = s.get("/tasks?state=dead");
    let row = &body["tasks"][0];
    assert!(stamp(&row["finished_at"]) && row["due"].is_null(), "{row}");
    assert_eq!(row["attempts"], 1, "{row}");

    // Paging: 2 at a time over the five gives each once.
    let (ids, pages) = all_pages(&s, "state=delayed&q=page&limit=2");
    assert_eq!(ids, ["page-1", "page-2", "page-3", "page-4", "page-5"]);
    assert!(pages >= 3, "{pages} pages");

    // Filters: method (any case), a substring of the id or of the name.
    assert_eq!(page(&s, "state=delayed&method=post").0, ["post-1"]);
    assert_eq!(page(&s, "state=delayed&q=special").0, ["post-1"]);
    assert_eq!(page(&s, "state=delayed&q=page-4").0, ["page-4"]);
    assert_eq!(
        page(&s, "state=delayed&method=EXEC").0,
        Vec::<String>::new()
    );

    // A task is found whole while it is unfinished too.
    let (code, rec) = s.get("/task/post-1");
    assert_eq!(
        (code, rec["state"].as_str()),
        (200, Some("delayed")),
        "{rec}"
    );
    assert_eq!(rec["task"]["params"], "{\"a\":1}", "{rec}");
    assert!(stamp(&rec["task"]["due"]), "{rec}");
    assert_eq!(
        (rec["attempts"].clone(), rec["result"].clone()),
        (json!([]), Value::Null)
    );

    // Only dead tasks are retried: a running or queued one is 409, naming its state.
    for (id, state) in [
        ("run-1", "running"),
        ("que-1", "queued"),
        ("page-1", "delayed"),
    ] {
        let (code, r) = post(&s, &format!("/task/{id}/retry"));
        assert_eq!(code, 409, "{r}");
        assert!(r["reason"].as_str().unwrap_or("").contains(state), "{r}");
    }
}

#[test]
fn bad_listing_input_gets_400_naming_the_parameter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).start();
    let (_, body) = s.get("/tasks?state=delayed&limit=1");
    assert_eq!(body["next"], Value::Null, "nothing to list");
    // A cursor of the dead listing, given to another state.
    let cursor = {
        let sw = Switch::start(500);
        for id in ["x1", "x2"] {
            let t = json!({"id": id, "method": "GET", "name": sw.url("/"), "max_retry": 0,
                           "wait": 20});
            assert_eq!(s.submit(&t).1["status"], "dead");
        }
        let (_, next) = page(&s, "state=dead&limit=1");
        next.as_str().expect("a next page").to_string()
    };
    for (query, names) in [
        (
            "state=sleeping",
            vec![
                "state",
                "delayed, queued, running, retry_wait, succeeded, dead, cancelled",
            ],
        ),
        ("", vec!["state", "missing"]),
        ("state=dead&limit=0", vec!["limit", "1 to 500"]),
        ("state=dead&limit=1000000000", vec!["limit", "1 to 500"]),
        ("state=dead&limit=ten", vec!["limit"]),
        ("state=dead&cursor=zz", vec!["cursor"]),
        ("state=dead&cursor=6465616421", vec!["cursor"]),
        (
            &format!("state=succeeded&cursor={cursor}"),
            vec!["cursor", "another state"],
        ),
        (
            "state=dead&sort=id",
            vec!["unknown query parameter", "sort"],
        ),
        ("state=dead&method=PUT", vec!["method"]),
    ] {
        let (code, r) = s.get(&format!("/tasks?{query}"));
        assert_eq!(code, 400, "{query}: {r}");
        assert_eq!(r["result"], "Fail", "{r}");
        let reason = r["reason"].as_str().unwrap_or("");
        for n in names {
            assert!(reason.contains(n), "{query}: {reason:?} should name {n:?}");
        }
    }
    let (code, r) = s.get(&format!("/tasks?state=dead&limit=1&cursor={cursor}"));
    assert_eq!(code, 200, "a good cursor still works: {r}");
    for query in ["state=queued", "", "state=dead&limit=5"] {
        let (code, r) = post(&s, &format!("/tasks/retry?{query}"));
        assert_eq!(code, 400, "{query}: {r}");
    }
    assert_eq!(request("PUT", &s.url("/task/x1"), &[]).0, 405);
    assert_eq!(request("DELETE", &s.url("/tasks"), &[]).0, 405);
    assert_eq!(request("GET", &s.url("/tasks/retry"), &[]).0, 405);
}

#[test]
fn retry_all_dead_tasks_answers_the_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sw = Switch::start(503);
    let s = Server::builder(&dir).start();
    for id in ["all-1", "all-2", "all-3", "other-1"] {
        make_dead(&s, &sw, id);
    }
    let (code, r) = post(&s, "/tasks/retry?state=dead&q=nothing-matches");
    assert_eq!((code, r), (200, json!({"retried": 0})));
    sw.set(200);
    let (code, r) = post(&s, "/tasks/retry?state=dead&q=all-");
    assert_eq!((code, r), (200, json!({"retried": 3})));
    for id in ["all-1", "all-2", "all-3"] {
        wait_status(&s, id, "succeeded");
        assert_eq!(sw.hits(&format!("/{id}")), 3, "{id} ran again");
    }
    assert_eq!(page(&s, "state=dead").0, ["other-1"]);
    let (code, r) = post(&s, "/tasks/retry?state=dead&method=get");
    assert_eq!((code, r), (200, json!({"retried": 1})));
    wait_status(&s, "other-1", "succeeded");
}

#[test]
fn a_retried_dead_task_survives_kill_9_right_after_the_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sw = Switch::start(503);
    let mut s = Server::builder(&dir).start();
    make_dead(&s, &sw, "k9-1");
    // Paused (durably), so the retried task cannot run before the kill.
    assert_eq!(post(&s, "/pause").0, 200);
    assert_eq!(post(&s, "/task/k9-1/retry").0, 200);
    s.kill9();
    assert_eq!(sw.hits("/k9-1"), 2, "it did not run before the kill");
    sw.set(200);
    let s = Server::builder(&dir).start();
    assert_eq!(post(&s, "/resume").0, 200);
    let r = wait_status(&s, "k9-1", "succeeded");
    assert_eq!(r["attempts"], 3, "{r}");
    assert_eq!(sw.hits("/k9-1"), 3, "it ran after the restart");
}

#[test]
fn the_browser_and_retries_work_on_redis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(&dir.path().join("redis"));
    let sw = Switch::start(503);
    let url = redis.url();
    let s = Server::builder(dir.path()).args(&["--redis", &url]).start();
    for i in 1..=5 {
        let t = json!({"id": format!("rp-{i}"), "method": "GET", "name": sw.url("/x"),
                       "delay": 600});
        assert_eq!(s.submit(&t).0, 200);
    }
    let (mut ids, pages) = all_pages(&s, "state=delayed&limit=2");
    ids.sort();
    assert_eq!(ids, ["rp-1", "rp-2", "rp-3", "rp-4", "rp-5"], "each once");
    assert!(pages >= 3, "{pages} pages");
    assert_eq!(page(&s, "state=delayed&q=rp-3").0, ["rp-3"]);
    dead_task_runs_again(&s, &sw);
}
