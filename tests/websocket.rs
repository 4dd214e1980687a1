//! WebSocket intake (`/ws_task`) with tungstenite as the client against the real binary: acks then
//! pushed results for several tasks in flight, a dead task's result, bad frames, pings, the
//! token, the connection cap, and a dropped client whose tasks still complete.

mod common;
use common::ws::{connect, next, send};
use common::{cpu_ticks, eventually, Server, Sink};
use serde_json::json;
use std::time::{Duration, Instant};
use tungstenite::Message;

#[test]
fn acks_then_results_for_tasks_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir)
        .args(&["--retry_interval", "1", "--max_retry", "1"])
        .start();
    let mut ws = connect(&s, "", &[]).expect("connect");
    send(
        &mut ws,
        &json!({"id":"w-slow","method":"GET","name":sink.url("/slow?ms=600")}),
    );
    send(
        &mut ws,
        &json!([
            {"id":"w-1","method":"GET","name":sink.url("/a")},
            {"id":"w-dead","method":"GET","name":sink.url("/status/500")},
            {"id":"w-bad","method":"GET","name":"ftp://nope"}
        ]),
    );
    let mut acks = Vec::new();
    let mut results = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while results.len() < 3 && Instant::now() < end {
        let f = next(&mut ws);
        if f.get("status").is_some() {
            results.push(f);
        } else {
            acks.push(f);
        }
    }
    // Acks come in order, the failed validation names the field.
    let ack_ids: Vec<&str> = acks.iter().filter_map(|a| a["id"].as_str()).collect();
    assert_eq!(
        ack_ids,
        vec!["w-slow", "w-1", "w-dead", "w-bad"],
        "{acks:?}"
    );
    assert_eq!(acks[0]["result"], "OK");
    assert_eq!(acks[3]["result"], "Fail");
    assert!(
        acks[3]["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("name:"),
        "{acks:?}"
    );
    // Results are pushed as they finish: the quick one before the slow one.
    let order: Vec<&str> = results.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(results.len(), 3, "{results:?}");
    assert!(order.iter().position(|i| *i == "w-1") < order.iter().position(|i| *i == "w-slow"));
    let dead = results
        .iter()
        .find(|r| r["id"] == "w-dead")
        .expect("dead result");
    assert_eq!(dead["status"], "dead");
    assert_eq!(dead["attempts"], 2);
    let slow = results
        .iter()
        .find(|r| r["id"] == "w-slow")
        .expect("slow result");
    assert_eq!(slow["status"], "succeeded");
    assert_eq!(slow["code"], 200);
    // The node that ran it (`<hostname>-<port>` by default), and the same JSON as /task_resp.
    let node = slow["node"].as_str().unwrap_or_default();
    assert!(node.ends_with(&format!("-{}", s.port)), "{slow}");
    assert_eq!(s.get("/task_resp/w-slow").1, *slow);
}

#[test]
fn bad_frames_pings_and_dropped_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--max_body", "2048"]).start();
    let mut ws = connect(&s, "", &[]).expect("connect");
    ws.send(Message::text("{not json")).expect("send");
    let f = next(&mut ws);
    assert_eq!(f["result"], "Fail");
    assert!(
        f["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not valid JSON"),
        "{f}"
    );
    ws.send(Message::binary(vec![1u8, 2, 3])).expect("send");
    assert!(next(&mut ws)["reason"]
        .as_str()
        .unwrap_or("")
        .contains("binary"));
    ws.send(Message::Ping(vec![7u8].into())).expect("ping");
    let end = Instant::now() + Duration::from_secs(5);
    let mut ponged = false;
    while !ponged && Instant::now() < end {
        if let Message::Pong(p) = ws.read().expect("read") {
            ponged = p.as_ref() == [7u8];
        }
    }
    assert!(ponged, "pings are answered");
    // An oversize frame gets a Fail frame and the connection is closed; the server lives on.
    ws.send(Message::text("x".repeat(5000))).expect("send");
    let f = next(&mut ws);
    assert!(
        f["reason"].as_str().unwrap_or("").contains("too large"),
        "{f}"
    );
    assert_eq!(s.get("/health").0, 200);

    // A client that submits and goes away: its tasks still run.
    let mut ws = connect(&s, "", &[]).expect("connect");
    send(
        &mut ws,
        &json!({"id":"gone","method":"GET","name":sink.url("/slow?ms=500"),"delay":1}),
    );
    assert_eq!(next(&mut ws)["result"], "OK");
    drop(ws);
    sink.wait_until(Duration::from_secs(15), "the dropped client's task", |h| {
        h.iter().any(|h| h.path == "/slow")
    });
    let r = eventually(Duration::from_secs(15), "its result", || {
        match s.get("/task_resp/gone?timeout=5") {
            (200, v) => Some(v),
            _ => None,
        }
    });
    assert_eq!(r["status"], "succeeded");
}

#[test]
fn token_and_connection_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir)
        .args(&["--token", "tok3n", "--max_ws", "2"])
        .start();
    match connect(&s, "", &[]) {
        Err(tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 401);
            let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok());
            assert_eq!(header("content-type"), Some("application/json"));
            assert_eq!(header("www-authenticate"), Some("Bearer"));
            let body: serde_json::Value =
                serde_json::from_slice(r.body().as_deref().unwrap_or_default()).expect("JSON");
            assert_eq!(body["result"], "Fail", "{body}");
        }
        other => panic!("expected 401, got {other:?}"),
    }
    match connect(&s, "?token=wrong", &[]) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    let a = connect(&s, "?token=tok3n", &[]).expect("token in the query");
    let b = connect(&s, "", &[("Authorization", "Bearer tok3n")]).expect("token in the header");
    match connect(&s, "?token=tok3n", &[]) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503, "the cap is 2"),
        other => panic!("expected 503, got {other:?}"),
    }
    drop(a);
    drop(b);
    // Closed connections free their places.
    let c = eventually(Duration::from_secs(5), "a free place", || {
        connect(&s, "?token=tok3n", &[]).ok()
    });
    drop(c);
    assert!(!s.log_text().contains("tok3n"), "the token is never logged");
}

#[test]
fn idle_connections_are_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--ws_idle", "1"]).start();
    let mut ws = connect(&s, "", &[]).expect("connect");
    let start = Instant::now();
    // The server closes it: a close frame, or the end of the stream. The client's own read
    // timeout (20 s) is not a close.
    loop {
        match ws.read() {
            Ok(Message::Close(_)) => break,
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                break
            }
            Err(e) => panic!("the server did not close the idle connection: {e}"),
        }
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "not before the idle time: {took:?}"
    );
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn websocket_connections_do_not_use_up_max_conns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir)
        .args(&["--max_conns", "3", "--exec_any"])
        .start();
    // Five WebSocket connections, more than --max_conns: each leaves the HTTP count once
    // upgraded (they are capped by --max_ws instead).
    let mut open = Vec::new();
    for i in 0..5 {
        let ws = match connect(&s, "", &[]) {
            Ok(ws) => ws,
            Err(e) => panic!("WebSocket {i} refused: {e:?}"),
        };
        open.push(ws);
    }
    // They all work, and plain HTTP still gets through beside them.
    for (i, ws) in open.iter_mut().enumerate() {
        send(
            ws,
            &json!({"id": format!("ws-cap-{i}"), "method": "EXEC", "name": "true"}),
        );
        let ack = next(ws);
        assert_eq!(ack["id"], format!("ws-cap-{i}"), "{ack}");
        assert_eq!(ack["result"], "OK", "accepted, not refused: {ack}");
        let done = next(ws);
        assert_eq!(
            (&done["id"], &done["status"]),
            (&json!(format!("ws-cap-{i}")), &json!("succeeded")),
            "its result is pushed: {done}"
        );
    }
    let (code, _) = s.get("/health");
    assert_eq!(code, 200);
}

#[test]
fn a_connection_made_right_after_an_upgrade_finds_its_place_free() {
    // With one HTTP place, each WebSocket needs the place the one before it gave back on its
    // upgrade. The place must be free once the client has read the 101: a client that
    // connects again at once was refused (503) whenever the server's thread had written
    // the 101 but not yet given the place back.
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir)
        .args(&["--max_conns", "1", "--max_ws", "400"])
        .start();
    // The start-up check's connection gives its place back once the server has read its end.
    let first = eventually(Duration::from_secs(5), "the HTTP place", || {
        connect(&s, "", &[]).ok()
    });
    let mut open = vec![first];
    for i in 1..300 {
        match connect(&s, "", &[]) {
            Ok(ws) => open.push(ws),
            Err(e) => panic!("WebSocket {i}, made right after the one before: {e:?}"),
        }
    }
    assert_eq!(s.get("/health").0, 200, "the one HTTP place is free");
    drop(open);
}

#[test]
fn idle_connections_cost_no_cpu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--max_ws", "200"]).start();
    let mut open = Vec::new();
    for i in 0..100 {
        open.push(connect(&s, "", &[]).unwrap_or_else(|e| panic!("connection {i}: {e}")));
    }
    // Every connection is served (an ack proves its thread is in its loop), then left idle.
    for (i, ws) in open.iter_mut().enumerate() {
        send(
            ws,
            &json!({"id": format!("idle-{i}"), "method": "GET",
                         "name": "http://127.0.0.1:9/x", "delay": 3600}),
        );
        assert_eq!(next(ws)["result"], "OK");
    }
    let pid = s.pid().expect("pid");
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(5));
    let used = cpu_ticks(pid) - before;
    // Connections that polled every 20 ms took 47 ticks here (100 connections, 5 s);
    // sleeping in poll(2) costs none: a handful of ticks for the server's own timers.
    assert!(
        used <= 10,
        "100 idle WebSocket connections used {used} clock ticks of CPU in 5 s"
    );
    drop(open);
}

#[test]
fn a_frame_of_fifty_tasks_is_acked_task_by_task() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let mut ws = connect(&s, "", &[]).expect("connect");
    let mut tasks: Vec<serde_json::Value> = (0..50)
        .map(|i| {
            json!({"id": format!("f-{i}"), "method": "GET", "name": sink.url("/f"),
                        "params": format!("id=f-{i}")})
        })
        .collect();
    tasks[17] = json!({"id": "f-17", "method": "GET", "name": "not a url"});
    tasks[30]["id"] = json!("f-29"); // the same id twice in one frame
    tasks[40]["dealy"] = json!(30); // a typo: refused, not run at once
    send(&mut ws, &json!(tasks));
    let acks: Vec<serde_json::Value> = (0..50).map(|_| next(&mut ws)).collect();
    for (i, a) in acks.iter().enumerate() {
        match i {
            17 => {
                assert_eq!(
                    (&a["id"], &a["result"]),
                    (&json!("f-17"), &json!("Fail")),
                    "{a}"
                );
                assert!(a["reason"].as_str().unwrap_or("").contains("name"), "{a}");
            }
            30 => {
                assert_eq!(
                    (&a["id"], &a["result"]),
                    (&json!("f-29"), &json!("Fail")),
                    "{a}"
                );
                assert!(a["reason"].as_str().unwrap_or("").contains("f-29"), "{a}");
            }
            40 => {
                assert_eq!(
                    (&a["id"], &a["result"]),
                    (&json!("f-40"), &json!("Fail")),
                    "{a}"
                );
                assert_eq!(
                    a["reason"], r#"unknown field "dealy" (did you mean "delay"?)"#,
                    "{a}"
                );
            }
            _ => assert_eq!(
                (&a["id"], &a["result"]),
                (&json!(format!("f-{i}")), &json!("OK")),
                "ack {i}: {a}"
            ),
        }
    }
    // The 47 accepted tasks run once each, and their results are pushed.
    let mut pushed = std::collections::HashSet::new();
    while pushed.len() < 47 {
        let r = next(&mut ws);
        assert_eq!(r["status"], "succeeded", "{r}");
        assert!(
            pushed.insert(r["id"].as_str().unwrap_or("").to_string()),
            "{r}"
        );
    }
    let hits = sink.hits_on("/f");
    assert_eq!(hits.len(), 47, "each accepted task ran once");
    let (_, info) = s.get("/sys_info");
    assert_eq!(info["counts"]["accepted"], 47, "{info}");
}

/// The WebSocket is a network intake like HTTP: without `--exec_dir` an EXEC task is refused
/// in its ack, and nothing is stored.
#[test]
fn exec_over_the_websocket_is_off_without_exec_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).start();
    let mut ws = connect(&s, "", &[]).expect("connect");
    send(
        &mut ws,
        &json!({"id":"ws-exec","method":"EXEC","name":"true"}),
    );
    let ack = next(&mut ws);
    assert_eq!(
        (&ack["id"], &ack["result"]),
        (&json!("ws-exec"), &json!("Fail")),
        "{ack}"
    );
    assert!(
        ack["reason"].as_str().unwrap_or("").contains("exec"),
        "{ack}"
    );
    assert_eq!(s.get("/task_resp/ws-exec?timeout=0").0, 404);
}

/// At a graceful stop every open WebSocket is told so with a close frame (1001, "server
/// shutting down") before poulpe exits.
#[test]
fn a_graceful_stop_closes_open_websockets_with_a_close_frame() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let mut s = Server::builder(&dir).start();
    let mut ws = connect(&s, "", &[]).expect("connect");
    send(
        &mut ws,
        &json!({"id":"ws-stop","method":"GET","name":sink.url("/x")}),
    );
    assert_eq!(next(&mut ws)["result"], "OK", "the connection is served");
    // Its result too: nothing is left to wake the connection but the stop.
    assert_eq!(next(&mut ws)["status"], "succeeded");
    s.signal(libc::SIGTERM);
    let close = loop {
        match ws.read() {
            Ok(Message::Close(c)) => break c,
            Ok(_) => continue,
            Err(e) => panic!("the connection ended without a close frame: {e}"),
        }
    };
    let frame = close.expect("a close frame with a code");
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1001, "server shutting down")
    );
    let exit = s.wait_exit(Duration::from_secs(30));
    assert!(exit.is_some_and(|st| st.success()), "{exit:?}");
}

/// Once a result has been pushed, the connection goes back to sleep: pushing a result does not
/// leave it polling.
#[test]
fn a_connection_idle_after_a_pushed_result_costs_no_cpu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let mut ws = connect(&s, "", &[]).expect("connect");
    send(
        &mut ws,
        &json!({"id":"pushed","method":"GET","name":sink.url("/p")}),
    );
    assert_eq!(next(&mut ws)["result"], "OK");
    assert_eq!(next(&mut ws)["status"], "succeeded", "its result is pushed");
    let pid = s.pid().expect("pid");
    let before = cpu_ticks(pid);
    let wall = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(pid) - before;
    let elapsed = wall.elapsed().as_secs_f64();
    // As in tests/delay.rs: a spinning thread uses about half the wall time or more, an idle
    // poulpe next to none. A tenth (USER_HZ is 100).
    assert!(
        (used as f64) < elapsed * 100.0 / 10.0,
        "{used} ticks of CPU in {elapsed:.1} s on a connection with nothing to do"
    );
}

/// A frame holding an empty array gets a Fail frame (as the HTTP submit refuses one), in its
/// place among the answers.
#[test]
fn an_empty_array_frame_gets_a_fail_frame() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let mut ws = connect(&s, "", &[]).expect("connect");
    send(&mut ws, &json!([]));
    send(
        &mut ws,
        &json!({"id":"after-empty","method":"GET","name":sink.url("/e")}),
    );
    let first = next(&mut ws);
    assert_eq!(first["result"], "Fail", "{first}");
    assert!(
        first["reason"].as_str().unwrap_or("").contains("empty"),
        "{first}"
    );
    assert_eq!(next(&mut ws)["id"], "after-empty");
}

/// Only `/ws_task` upgrades to a WebSocket: an upgrade request on another path is answered as
/// any request there.
#[test]
fn an_upgrade_on_another_path_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).start();
    for path in ["/elsewhere", "/sys_info"] {
        match tungstenite::connect(format!("ws://127.0.0.1:{}{path}", s.port)) {
            Err(tungstenite::Error::Http(r)) => {
                assert_ne!(r.status().as_u16(), 101, "{path}");
            }
            Err(e) => panic!("{path}: {e}"),
            Ok(_) => panic!("{path}: upgraded to a WebSocket"),
        }
    }
}

/// A client slow to read is not dropped before `--ws_idle`: while megabytes of its results wait
/// in full socket buffers (a 1 KiB receive window), it pauses; then it reads every ack and every
/// result.
#[test]
fn a_client_slow_to_read_gets_every_result_once_it_reads_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir)
        .args(&["--exec_any", "--ws_idle", "8"])
        .start();
    let stream = common::raw::small_window_connect(s.port, 1024);
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let url = format!("ws://127.0.0.1:{}/ws_task", s.port);
    let (mut ws, _) = tungstenite::client(url, stream).expect("handshake");
    // ~64 KiB of output each: 6 MB of result frames, far beyond the socket buffers.
    let tasks: Vec<serde_json::Value> = (0..100)
        .map(|i| json!({"id": format!("slow{i}"), "method": "EXEC", "name": "seq", "params": "1 20000"}))
        .collect();
    send(&mut ws, &json!(tasks));
    eventually(Duration::from_secs(30), "the 100 results", || {
        let (_, info) = s.get("/sys_info");
        (info["counts"]["succeeded"].as_u64()? >= 100).then_some(())
    });
    // The client is slow: it reads nothing for a while, well within --ws_idle.
    std::thread::sleep(Duration::from_secs(2));
    let (mut acks, mut results) = (0, 0);
    while acks + results < 200 {
        let v = next(&mut ws);
        if v.get("status").is_some() {
            assert_eq!(v["status"], "succeeded", "{}", v["id"]);
            results += 1;
        } else {
            assert_eq!(v["result"], "OK", "{v}");
            acks += 1;
        }
    }
    assert_eq!((acks, results), (100, 100));
}

/// A signal that interrupts a connection's wait (poll returns EINTR) does not end it: SIGHUP
/// (the cron reload) is sent to every HTTP thread, the one holding the WebSocket among them.
#[test]
fn a_signal_interrupting_a_connections_wait_does_not_end_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let pid = s.pid().expect("pid") as libc::pid_t;
    let mut ws = connect(&s, "", &[]).expect("connect");
    let task = |id: &str| json!({"id": id, "method": "GET", "name": sink.url("/sig")});
    send(&mut ws, &task("sig-1"));
    assert_eq!(next(&mut ws)["result"], "OK");
    assert_eq!(next(&mut ws)["status"], "succeeded");
    // Now the connection's thread waits in poll for the next frame.
    let http_threads = || -> Vec<libc::pid_t> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("threads")
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "http")
            })
            .filter_map(|t| t.file_name().to_str()?.parse().ok())
            .collect()
    };
    let threads = http_threads();
    assert!(!threads.is_empty(), "no http thread found");
    for _ in 0..20 {
        for &tid in &threads {
            // SAFETY: tgkill(2) with plain integers; a thread that has exited gives ESRCH.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGHUP) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    send(&mut ws, &task("sig-2"));
    assert_eq!(
        next(&mut ws)["result"],
        "OK",
        "the connection survived the signals"
    );
    assert_eq!(next(&mut ws)["status"], "succeeded");
}
