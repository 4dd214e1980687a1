//! README promises checked end to end on the real binary: `poulpe health`, `POULPE_TOKEN` and
//! `POULPE_REDIS` from the environment, a `wait` array answered 202 when one task is not done,
//! and `DELETE /task/{id}` of running, finished, unknown and delayed tasks.

mod common;
use common::{binary, free_port, redis::RedisServer, request, Server, Sink};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// `poulpe health ARGS` with a clean environment plus `env`; waits for it (it gives up on its own
/// after a few seconds).
fn health(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(binary())
        .arg("health")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run poulpe health")
}

#[test]
fn health_exits_0_when_the_server_answers_and_1_otherwise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--token", "t0k"]).start();
    let port = s.port.to_string();

    let out = health(&["--port", &port], &[]);
    assert_eq!(out.status.code(), Some(0), "a running server: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("ok: http://127.0.0.1:{port}/health\n")
    );
    // The port from the environment, and --host.
    let out = health(&["--host", "127.0.0.1"], &[("POULPE_PORT", &port)]);
    assert_eq!(out.status.code(), Some(0), "POULPE_PORT={port}: {out:?}");
    // The server's short flag, and a bad port named.
    let out = health(&["-p", &port], &[]);
    assert_eq!(out.status.code(), Some(0), "-p {port}: {out:?}");
    let out = health(&["-p", "http"], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--port"),
        "{out:?}"
    );

    // An IPv6 address is put in brackets (here nothing answers on it).
    let closed = free_port().to_string();
    let out = health(&["--host", "::1", "-p", &closed], &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with(&format!("unhealthy: http://[::1]:{closed}/health: ")),
        "{said}"
    );
    // Nothing listens.
    let out = health(&["--port", &closed], &[]);
    assert_eq!(out.status.code(), Some(1), "nothing on {closed}: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("unhealthy: "),
        "{out:?}"
    );

    // Something answers, but not 200.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let other = l.local_addr().expect("addr").port().to_string();
    let answerer = std::thread::spawn(move || {
        let (mut c, _) = l.accept().expect("accept");
        let mut buf = [0u8; 1024];
        let _ = c.read(&mut buf);
        let _ = c.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    });
    let out = health(&["--port", &other], &[]);
    answerer.join().expect("answerer");
    assert_eq!(out.status.code(), Some(1), "a 503 is not healthy: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("503"),
        "{out:?}"
    );
}

#[test]
fn poulpe_token_from_the_environment_is_required() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir)
        .env("POULPE_TOKEN", "from-env")
        .start();
    let task = json!({"id":"env-tok","method":"GET","name":sink.url("/tok"),"wait":10});
    let body = task.to_string();
    let url = s.url("/task_in_queue");
    let (code, r) = common::post_raw(&url, body.as_bytes(), &[]);
    assert_eq!(code, 401, "no token: {r}");
    let (code, r) = common::post_raw(&url, body.as_bytes(), &[("Authorization", "Bearer wrong")]);
    assert_eq!(code, 401, "wrong token: {r}");
    assert!(sink.hits().is_empty(), "a refused submit ran");
    let ok = [("Authorization", "Bearer from-env")];
    let (code, r) = common::post_raw(&url, body.as_bytes(), &ok);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(request("GET", &s.url("/sys_info"), &ok).0, 200);
    assert_eq!(request("GET", &s.url("/sys_info"), &[]).0, 401);
    assert!(
        !s.log_text().contains("from-env"),
        "the token is never logged"
    );
}

#[test]
fn poulpe_redis_from_the_environment_makes_redis_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(&dir.path().join("redis"));
    let s = Server::builder(&dir)
        .env("POULPE_REDIS", &redis.url())
        .start();
    let (code, info) = s.get("/sys_info");
    assert_eq!(code, 200, "{info}");
    assert_eq!(info["store"], json!({"kind":"redis","up":true}), "{info}");
    assert!(info["data_bytes"].is_null(), "no embedded file: {info}");
    let (code, r) = s.submit(&json!({"id":"in-redis","method":"GET",
        "name":"http://127.0.0.1:9/never","delay":600}));
    assert_eq!(code, 200, "{r}");
    // The task is in Redis, as an operator would see it.
    let out = Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "HGET",
            "poulpe:task:in-redis",
            "state",
        ])
        .output()
        .expect("redis-cli (installed with redis-server by scripts/test.sh)");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "delayed");
}

/// An array submit with `wait` answers 202 when the wait runs out before every task is done:
/// `{"result":"Timeout","ids":[...],"results":[...]}`, with the final result of the task that
/// finished and the pending status of the one that did not.
#[test]
fn a_wait_array_with_an_unfinished_task_answers_202() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let (code, r) = s.submit(&json!([
        {"id":"wa-done","method":"GET","name":sink.url("/done"),"wait":2},
        {"id":"wa-later","method":"GET","name":sink.url("/later"),"delay":600,"wait":2}
    ]));
    assert_eq!(code, 202, "{r}");
    assert_eq!(r["result"], "Timeout", "{r}");
    assert_eq!(r["ids"], json!(["wa-done", "wa-later"]), "{r}");
    let results = r["results"].as_array().expect("results array");
    assert_eq!(results.len(), 2, "{r}");
    assert_eq!(results[0]["id"], "wa-done", "{r}");
    assert_eq!(results[0]["result"], "OK", "{r}");
    assert_eq!(results[0]["status"], "succeeded", "{r}");
    assert_eq!(results[0]["output"], "ok", "{r}");
    assert_eq!(results[1]["id"], "wa-later", "{r}");
    assert_eq!(results[1]["result"], "Timeout", "{r}");
    assert_eq!(results[1]["status"], "delayed", "{r}");
    assert!(sink.hits_on("/later").is_empty(), "{r}");
}

/// `DELETE /task/{id}`: 409 for a running task (it still finishes) and for a finished one, 404
/// for an unknown id, 200 for a delayed one, which then never runs.
#[test]
fn delete_running_finished_unknown_and_delayed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let del = |id: &str| request("DELETE", &s.url(&format!("/task/{id}")), &[]);

    // Running.
    let (code, r) = s.submit(
        &json!({"id":"del-run","method":"GET","name":sink.url("/slow"),
        "params":"ms=3000"}),
    );
    assert_eq!(code, 200, "{r}");
    sink.wait_until(Duration::from_secs(10), "the slow attempt", |h| {
        h.iter().any(|h| h.path == "/slow")
    });
    let (code, r) = del("del-run");
    assert_eq!(code, 409, "a running task cannot be cancelled: {r}");
    assert_eq!(r["result"], "Fail", "{r}");
    assert!(
        r["reason"].as_str().unwrap_or("").contains("running"),
        "{r}"
    );
    let (code, r) = s.get("/task_resp/del-run?timeout=30");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "succeeded", "the running attempt went on: {r}");

    // Finished.
    let (code, r) = del("del-run");
    assert_eq!(code, 409, "a finished task cannot be cancelled: {r}");
    assert!(
        r["reason"].as_str().unwrap_or("").contains("finished"),
        "{r}"
    );
    let (code, r) = s.get("/task_resp/del-run?timeout=0");
    assert_eq!(
        (code, &r["status"]),
        (200, &json!("succeeded")),
        "the result stays: {r}"
    );

    // Unknown.
    let (code, r) = del("del-nobody");
    assert_eq!(code, 404, "{r}");

    // Delayed: cancelled, and it never runs. A second task due a second after it is the
    // positive signal: once it has run, the cancelled one would have run too.
    let (code, r) = s.submit(&json!({"id":"del-delayed","method":"GET",
        "name":sink.url("/cancelled"),"delay":2}));
    assert_eq!(code, 200, "{r}");
    let (code, r) = s.submit(&json!({"id":"del-marker","method":"GET",
        "name":sink.url("/marker"),"delay":3}));
    assert_eq!(code, 200, "{r}");
    let (code, r) = del("del-delayed");
    assert_eq!(code, 200, "a delayed task is cancelled: {r}");
    assert_eq!(r["result"], "OK", "{r}");
    let (code, r) = s.get("/task_resp/del-marker?timeout=30");
    assert_eq!(
        (code, &r["status"]),
        (200, &json!("succeeded")),
        "the later task ran: {r}"
    );
    assert!(
        sink.hits_on("/cancelled").is_empty(),
        "the cancelled task ran"
    );
    let (code, r) = s.get("/task_resp/del-delayed?timeout=0");
    assert_eq!(
        (code, &r["status"]),
        (200, &json!("cancelled")),
        "a cancelled task's result is kept: {r}"
    );
    let (_, info) = s.get("/sys_info");
    assert_eq!(info["counts"]["succeeded"], 2, "{info}");
    assert_eq!(info["counts"]["cancelled"], 1, "{info}");
    assert_eq!(info["delaying_keys"], json!([]), "{info}");
}
