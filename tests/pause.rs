//! `POST /pause` and `POST /resume`: workers stop taking tasks (running attempts finish, due
//! tasks stay `queued`) until resumed; the state survives a restart; behind `--token`; SIGTERM
//! while paused still stops promptly.

mod common;
use common::{post_raw, redis::RedisServer, request, Server, Sink};
use serde_json::{json, Value};
use std::thread;
use std::time::Duration;

/// POST of an empty body to `path`, with `headers`.
fn post(s: &Server, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    post_raw(&s.url(path), b"", headers)
}

/// Pauses (`/pause`) or resumes (`/resume`) and checks the answer.
fn switch(s: &Server, path: &str, paused: bool) {
    let (code, body) = post(s, path, &[]);
    assert_eq!(code, 200, "{path}: {body}");
    assert_eq!(
        body,
        json!({"result": "OK", "reason": "", "paused": paused}),
        "{path}"
    );
}

/// Checks that `id` is queued and not finished.
fn assert_queued(s: &Server, id: &str) {
    let (code, body) = s.get(&format!("/task_resp/{id}?timeout=0"));
    assert_eq!(code, 202, "{id}: {body}");
    assert_eq!(body["status"], "queued", "{id}: {body}");
}

/// Waits for `id`'s result and checks that it succeeded.
fn assert_succeeds(s: &Server, id: &str) {
    let (code, body) = s.get(&format!("/task_resp/{id}?timeout=20"));
    assert_eq!(code, 200, "{id}: {body}");
    assert_eq!(body["status"], "succeeded", "{id}: {body}");
}

fn submit_get(s: &Server, sink: &Sink, id: &str, path: &str) {
    let (code, body) =
        s.submit(&json!({"id": id, "method": "GET", "name": sink.url(path), "max_retry": 0}));
    assert_eq!(code, 200, "{body}");
}

#[test]
fn pause_holds_new_tasks_lets_the_running_one_finish_and_resume_runs_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--workers", "2"]).start();

    let (code, body) = s.submit(&json!({"id": "slow-1", "method": "GET",
        "name": sink.url("/slow"), "params": "ms=1500", "max_retry": 0}));
    assert_eq!(code, 200, "{body}");
    sink.wait_until(Duration::from_secs(10), "the slow task to start", |h| {
        h.iter().any(|h| h.path == "/slow")
    });

    switch(&s, "/pause", true);
    switch(&s, "/pause", true); // twice is fine
    let (_, info) = s.get("/sys_info");
    assert_eq!(info["paused"], true, "{info}");
    let metrics = request("GET", &s.url("/metrics"), &[]).1;
    let metrics = metrics.as_str().expect("metrics text");
    assert!(metrics.contains("\npoulpe_paused 1\n"), "{metrics}");

    submit_get(&s, &sink, "held-1", "/held");
    assert_queued(&s, "held-1");
    // The attempt that was running when the pause came finishes.
    assert_succeeds(&s, "slow-1");
    thread::sleep(Duration::from_secs(1));
    assert!(sink.hits_on("/held").is_empty(), "a task ran while paused");
    assert_queued(&s, "held-1");

    switch(&s, "/resume", false);
    assert_succeeds(&s, "held-1");
    assert_eq!(sink.hits_on("/held").len(), 1);
    switch(&s, "/resume", false); // twice is fine
    assert_eq!(s.get("/sys_info").1["paused"], false);
    let metrics = request("GET", &s.url("/metrics"), &[]).1;
    assert!(
        metrics
            .as_str()
            .unwrap_or_default()
            .contains("\npoulpe_paused 0\n"),
        "{metrics}"
    );

    for path in ["/pause", "/resume"] {
        assert_eq!(request("GET", &s.url(path), &[]).0, 405, "GET {path}");
        assert_eq!(request("DELETE", &s.url(path), &[]).0, 405, "DELETE {path}");
    }
}

#[test]
fn a_pause_survives_kill_9_and_resume_after_restart_runs_the_tasks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let mut s = Server::builder(&dir).start();
    switch(&s, "/pause", true);
    submit_get(&s, &sink, "before", "/before");
    assert_queued(&s, "before");
    s.kill9();

    let s = Server::builder(&dir).start();
    assert_eq!(s.get("/sys_info").1["paused"], true);
    assert!(s.log_text().contains("starts paused"), "{}", s.log_text());
    submit_get(&s, &sink, "after", "/after");
    thread::sleep(Duration::from_secs(1));
    assert!(sink.hits().is_empty(), "a task ran while paused");
    assert_queued(&s, "before");
    assert_queued(&s, "after");

    switch(&s, "/resume", false);
    assert_succeeds(&s, "before");
    assert_succeeds(&s, "after");
}

#[test]
fn pause_and_resume_need_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--token", "s3cret"]).start();
    let ok = [("Authorization", "Bearer s3cret")];
    for (path, paused) in [("/pause", true), ("/resume", false)] {
        let (code, body) = post(&s, path, &ok);
        assert_eq!((code, &body["paused"]), (200, &json!(paused)), "{body}");
        // Refused: the state stays as the last accepted call left it.
        let other = if paused { "/resume" } else { "/pause" };
        for auth in [None, Some("Bearer wrong")] {
            let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
            let (code, body) = post(&s, other, &headers);
            assert_eq!(code, 401, "{other} {auth:?}: {body}");
        }
        let (_, info) = request("GET", &s.url("/sys_info"), &ok);
        assert_eq!(
            info["paused"], paused,
            "a refused {other} changed the state"
        );
    }
}

#[test]
fn sigterm_while_paused_exits_and_keeps_the_queued_task() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let mut s = Server::builder(&dir).args(&["--workers", "3"]).start();
    switch(&s, "/pause", true);
    submit_get(&s, &sink, "kept", "/kept");
    assert_queued(&s, "kept");
    s.signal(libc::SIGTERM);
    // Well within the 30 s grace: workers waiting while paused see the stop at once.
    let status = s.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(status.success(), "{status:?}");
    assert!(sink.hits().is_empty(), "a task ran while paused");

    let s = Server::builder(&dir).start();
    assert_eq!(s.get("/sys_info").1["paused"], true);
    assert_queued(&s, "kept");
    switch(&s, "/resume", false);
    assert_succeeds(&s, "kept");
}

#[test]
fn a_pause_the_store_cannot_take_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut redis = RedisServer::start(&dir.path().join("redis"));
    let url = redis.url();
    let s = Server::builder(&dir).args(&["--redis", &url]).start();
    switch(&s, "/pause", true);
    switch(&s, "/resume", false);
    redis.stop();
    let (code, body) = post(&s, "/pause", &[]);
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["result"], "Fail", "{body}");
    assert_eq!(s.get("/sys_info").1["paused"], false);
}
