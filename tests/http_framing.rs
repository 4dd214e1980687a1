//! Plain `http://` tasks against a server whose every byte is the test's
//! (`tests/odd_http_server.py`): the response framings RFC 9112 allows (chunked with extensions
//! and trailers, close-delimited, interim 1xx answers, `Connection: close`), a body beyond the
//! output limit, a malformed answer, redirects (relative ones too), a timeout inside the body
//! and one while a request body is taken slowly, and a kept-alive
//! connection the server drops when it is used again. With a proxy in the environment, the
//! request goes to the proxy (through ureq) as before.

mod common;
use common::Server;
use serde_json::{json, Value};
use std::io::Read;
use std::path::Path;
use std::process::Child;

/// The running odd server; killed when dropped.
struct Odd {
    child: Child,
    port: u16,
}

impl Odd {
    fn start() -> Odd {
        let python = common::py::python("import socket, threading", "Python 3");
        let (child, port) = common::py::start_server(&python, "odd_http_server.py", &[]);
        Odd { child, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The requests seen, as `<connection> <method> <path>` (this one's own last).
    fn log(&self) -> Vec<String> {
        let mut text = String::new();
        ureq::get(&self.url("/_log"))
            .call()
            .expect("log")
            .body_mut()
            .as_reader()
            .read_to_string(&mut text)
            .expect("log text");
        text.lines().map(str::to_string).collect()
    }
}

impl Drop for Odd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// poulpe with one worker (so a second task reuses the first one's connection), no proxy from
/// the environment (so the plain client is the one tested).
fn poulpe(dir: &Path) -> Server {
    poulpe_with(dir, &[])
}

/// [`poulpe`] with more arguments.
fn poulpe_with(dir: &Path, args: &[&str]) -> Server {
    let mut b = Server::builder(dir).args(&["--workers", "1"]).args(args);
    for v in [
        "ALL_PROXY",
        "all_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
    ] {
        b = b.env(v, "");
    }
    b.start()
}

/// Submits `task` (no retries) and waits for its final result.
fn run(s: &Server, task: Value) -> Value {
    let mut task = task;
    task["max_retry"] = json!(0);
    task["wait"] = json!(20);
    let (code, r) = s.submit(&task);
    assert_eq!(code, 200, "{r}");
    let (code, r) = s.get(&format!(
        "/task_resp/{}?timeout=20",
        task["id"].as_str().expect("id")
    ));
    assert_eq!(code, 200, "{r}");
    r
}

fn get(s: &Server, id: &str, url: String) -> Value {
    run(s, json!({"id": id, "method": "GET", "name": url}))
}

#[test]
fn bodies_in_every_framing_are_read_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = Odd::start();
    let s = poulpe(dir.path());
    for (id, path, want) in [
        ("chunked", "/chunked", "hello chunks"),
        ("close", "/close", "until the close"),
        ("interim", "/interim", "final"),
        ("after-close", "/chunked", "hello chunks"),
    ] {
        let r = get(&s, id, odd.url(path));
        assert_eq!(r["status"], "succeeded", "{id}: {r}");
        assert_eq!(r["code"], 200, "{id}: {r}");
        assert_eq!(r["output"], want, "{id}: {r}");
    }
    // The chunked answer's connection was kept (its trailers read), the close-delimited one's
    // was not.
    let log = odd.log();
    let conn = |i: usize| log[i].split(' ').next().unwrap_or_default().to_string();
    assert_eq!(log.len(), 5, "{log:?}");
    assert_eq!(
        conn(0),
        conn(1),
        "the chunked answer's connection is reused: {log:?}"
    );
    assert_ne!(
        conn(1),
        conn(2),
        "a close-delimited body ends its connection: {log:?}"
    );
}

#[test]
fn connection_close_is_honoured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = Odd::start();
    let s = poulpe(dir.path());
    for id in ["cc-1", "cc-2"] {
        let r = get(&s, id, odd.url("/conn-close"));
        assert_eq!(r["output"], "closing", "{r}");
    }
    let log = odd.log();
    assert_ne!(
        log[0].split(' ').next(),
        log[1].split(' ').next(),
        "the second task used a new connection: {log:?}"
    );
}

#[test]
fn a_kept_alive_connection_the_server_drops_is_retried_once_on_a_new_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = Odd::start();
    let s = poulpe(dir.path());
    for id in ["drop-1", "drop-2"] {
        let r = get(&s, id, odd.url("/drop-second"));
        assert_eq!(r["status"], "succeeded", "{id}: {r}");
        assert_eq!(r["output"], "fine", "{id}: {r}");
    }
    let log = odd.log();
    assert_eq!(
        log[..3],
        [
            "1 GET /drop-second",
            "1 GET /drop-second",
            "2 GET /drop-second"
        ],
        "the second task's request went on the kept connection, then on a new one"
    );
}

#[test]
fn a_kept_alive_connection_the_server_closed_meanwhile_is_not_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = Odd::start();
    let s = poulpe(dir.path());
    for id in ["bye-1", "bye-2"] {
        let r = get(&s, id, odd.url("/then-close"));
        assert_eq!(r["status"], "succeeded", "{id}: {r}");
        assert_eq!(r["output"], "bye", "{id}: {r}");
    }
    let log = odd.log();
    assert_eq!(log[..2], ["1 GET /then-close", "2 GET /then-close"]);
}

#[test]
fn a_body_beyond_the_limit_is_cut_and_its_connection_not_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = Odd::start();
    let s = poulpe(dir.path());
    let r = get(&s, "big", odd.url("/big?n=200000"));
    assert_eq!(r["status"], "succeeded", "{r}");
    let out = r["output"].as_str().expect("output");
    let kept = out
        .strip_suffix("\n[output cut at 65536 bytes]")
        .unwrap_or_else(|| panic!("not marked as cut: {}", &out[out.len() - 40..]));
    assert_eq!(kept.len(), 65536);
    assert!(kept.bytes().all(|b| b == b'a'));
    let r = get(&s, "after-big", odd.url("/chunked"));
    assert_eq!(r["output"], "hello chunks", "{r}");
    let log = odd.log();
    assert_ne!(
        log[0].split(' ').next(),
        log[1].split(' ').next(),
        "{log:?}"
    );
}

#[test]
fn a_malformed_answer_is_a_failed_attempt_that_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = Odd::start();
    let s = poulpe(dir.path());
    let r = get(&s, "bad", odd.url("/malformed"));
    assert_eq!(r["status"], "dead", "{r}");
    assert_eq!(
        r["reason"], "request failed: malformed response: bad status line",
        "{r}"
    );
    let r = get(&s, "good-after", odd.url("/interim"));
    assert_eq!(r["status"], "succeeded", "the worker goes on: {r}");
}

#[test]
fn a_redirect_is_followed_without_sending_the_first_request_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = Odd::start();
    let s = poulpe(dir.path());
    let r = run(
        &s,
        json!({"id":"moved","method":"POST","name":odd.url("/redirect"),"params":{"k":1}}),
    );
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["output"], "hello chunks", "{r}");
    let log = odd.log();
    assert_eq!(
        log.iter()
            .map(|l| l.split_once(' ').map_or("", |(_, r)| r))
            .collect::<Vec<_>>(),
        ["POST /redirect", "GET /chunked", "GET /_log"],
        "{log:?}"
    );
}

#[test]
fn a_relative_redirect_is_resolved_without_sending_the_first_request_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = poulpe(dir.path());
    for (id, path, want, next) in [
        ("rel", "/redirect-rel", "hello chunks", "GET /chunked"),
        (
            "query",
            "/redirect-query",
            "query x=1",
            "GET /redirect-query",
        ),
        ("up", "/dir/up", "hello chunks", "GET /chunked"),
    ] {
        let odd = Odd::start();
        let r = run(
            &s,
            json!({"id":id,"method":"POST","name":odd.url(path),"params":{"k":1}}),
        );
        assert_eq!(r["status"], "succeeded", "{id}: {r}");
        assert_eq!(r["output"], want, "{id}: {r}");
        let log = odd.log();
        let first = format!("POST {path}");
        assert_eq!(
            log.iter()
                .map(|l| l.split_once(' ').map_or("", |(_, r)| r))
                .collect::<Vec<_>>(),
            [first.as_str(), next, "GET /_log"],
            "{id}: the first request was sent once: {log:?}"
        );
    }
}

#[test]
fn the_time_limit_holds_inside_the_body() {
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = Odd::start();
    let s = poulpe(dir.path());
    let r = run(
        &s,
        json!({"id":"slow","method":"GET","name":odd.url("/slow-body"),"timeout":1}),
    );
    assert_eq!(r["status"], "dead", "{r}");
    assert_eq!(r["code"], 200, "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("timed out after 1 s"), "{r}");
}

#[test]
fn the_time_limit_holds_while_the_request_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = Odd::start();
    let s = poulpe_with(dir.path(), &["--max_body", "16000000"]);
    // More than the sockets' buffers hold, taken slowly: each send makes some progress.
    let pad = "a".repeat(8_000_000);
    let started = std::time::Instant::now();
    let r = run(
        &s,
        json!({"id":"slow-read","method":"POST","name":odd.url("/slow-read"),
               "params":{"pad":pad},"timeout":1}),
    );
    let took = started.elapsed();
    assert_eq!(r["status"], "dead", "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("timed out after 1 s"), "{r}");
    assert!(
        took < std::time::Duration::from_secs(4),
        "took {took:?}: {r}"
    );
}

#[test]
fn a_proxy_from_the_environment_is_still_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = Odd::start();
    let sink = common::Sink::start();
    let s = Server::builder(dir.path())
        .env("http_proxy", &proxy.url(""))
        .env("NO_PROXY", "")
        .env("no_proxy", "")
        .start();
    let t =
        json!({"id":"via-proxy","method":"GET","name":sink.url("/direct"),"max_retry":0,"wait":20});
    let (code, r) = s.submit(&t);
    assert_eq!(code, 200, "{r}");
    let log = proxy.log();
    assert!(
        log[0].ends_with(&format!("CONNECT 127.0.0.1:{}", sink.port)),
        "the request went to the proxy: {log:?} {r}"
    );
}
