//! Careless and hostile HTTP clients, over raw sockets against the real binary: none of them can
//! stall other clients or the delivery of results, framing is strict (no request smuggling),
//! head sizes and arrival times are bounded.

mod common;
use common::raw::{small_window_connect, Raw};
use common::{Server, Sink};
use serde_json::{json, Value};
use std::thread;
use std::time::{Duration, Instant};

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: poulpe\r\n\r\n";

/// A POST of `body` to /task_in_queue, as bytes on the wire.
fn post(body: &Value) -> Vec<u8> {
    let b = body.to_string();
    format!(
        "POST /task_in_queue HTTP/1.1\r\nHost: poulpe\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .into_bytes()
}

/// A task that GETs the sink, with `id` in its query.
fn sink_task(sink: &Sink, id: &str, wait: u64) -> Value {
    json!({"id": id, "method": "GET", "name": sink.url("/t"), "params": format!("id={id}"), "wait": wait})
}

/// Submits a task on a new connection with `wait` and says whether its result came back within
/// the wait (a 200 with `succeeded`): the server is still delivering results.
fn results_still_delivered(s: &Server, sink: &Sink, id: &str) {
    let mut c = Raw::connect(s.port, Duration::from_secs(30));
    c.send(&post(&sink_task(sink, id, 10))).expect("send");
    let a = c.answer().expect("an answer to a waited submit");
    assert_eq!(
        (a.code, a.json()["status"].as_str()),
        (200, Some("succeeded")),
        "a waited task on another connection must get its result: {a:?}"
    );
}

/// Ten waited submits (`<prefix>0`..`<prefix>9`) sent in one write on a new connection.
fn pipeline_waits(s: &Server, sink: &Sink, prefix: &str) -> Raw {
    let mut c = Raw::connect(s.port, Duration::from_secs(30));
    let mut burst = Vec::new();
    for i in 0..10 {
        burst.extend(post(&sink_task(sink, &format!("{prefix}{i}"), 5)));
    }
    c.send(&burst).expect("send");
    c
}

#[test]
fn pipelined_waits_do_not_stop_result_delivery() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--workers", "2"]).start();
    let mut c = pipeline_waits(&s, &sink, "p");
    // Every pipelined request is answered, in order, with its own result.
    for i in 0..10 {
        let a = c.answer().expect("pipelined answer");
        assert_eq!(a.code, 200, "answer {i}: {a:?}");
        assert_eq!(
            a.json()["id"],
            format!("p{i}"),
            "answers in request order: {a:?}"
        );
        assert_eq!(a.json()["status"], "succeeded", "{a:?}");
    }
    results_still_delivered(&s, &sink, "after");
}

#[test]
fn pipelined_waits_from_a_client_that_leaves_do_not_stop_result_delivery() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--workers", "2"]).start();
    let c = pipeline_waits(&s, &sink, "gone");
    sink.wait_until(Duration::from_secs(20), "the pipelined tasks to run", |h| {
        h.len() >= 10
    });
    drop(c);
    results_still_delivered(&s, &sink, "after");
    for i in 0..10 {
        let (code, r) = s.get(&format!("/task_resp/gone{i}?timeout=10"));
        assert_eq!((code, &r["status"]), (200, &json!("succeeded")), "{r}");
    }
}

#[test]
fn a_client_that_never_reads_stalls_no_one_and_its_results_stay_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir)
        .args(&["--workers", "4", "--exec_any", "--http_idle", "3"])
        .start();
    // 100 waited tasks, each with ~64 KiB of output: the answer (megabytes) cannot fit in the
    // socket buffers of a client that does not read.
    let tasks: Vec<Value> = (0..100)
        .map(|i| json!({"id": format!("big{i}"), "method": "EXEC", "name": "seq", "params": "1 20000", "wait": 30}))
        .collect();
    let mut lazy = small_window_connect(s.port, 1024);
    std::io::Write::write_all(&mut lazy, &post(&json!(tasks))).expect("send");
    common::eventually(Duration::from_secs(30), "the big tasks to finish", || {
        let (_, info) = s.get("/sys_info");
        (info["counts"]["succeeded"].as_u64() >= Some(100)).then_some(())
    });
    // Meanwhile and afterwards, other clients get their results.
    results_still_delivered(&s, &sink, "other-1");
    thread::sleep(Duration::from_secs(4)); // past --http_idle: the lazy client is dropped
    results_still_delivered(&s, &sink, "other-2");
    for i in [0, 42, 99] {
        let (code, r) = s.get(&format!("/task_resp/big{i}?timeout=0"));
        assert_eq!((code, &r["status"]), (200, &json!("succeeded")), "{r}");
    }
    drop(lazy);
}

#[test]
fn pipelined_long_polls_do_not_take_the_api_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--workers", "2"]).start();
    let (code, r) =
        s.submit(&json!({"id": "later", "method": "GET", "name": sink.url("/later"), "delay": 60}));
    assert_eq!(code, 200, "{r}");
    let poll_then_health = [
        &b"GET /task_resp/later?timeout=30 HTTP/1.1\r\nHost: poulpe\r\n\r\n"[..],
        HEALTH,
    ]
    .concat();
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut c = Raw::connect(s.port, Duration::from_secs(40));
        c.send(&poll_then_health).expect("send");
        held.push(c);
    }
    // A new client is served at once.
    for i in 0..5 {
        let mut c = Raw::connect(s.port, Duration::from_secs(3));
        c.send(HEALTH).expect("send");
        let a = c
            .answer()
            .expect("a new client gets /health while 40 long polls wait");
        assert_eq!(a.code, 200, "{a:?}");
        let mut c = Raw::connect(s.port, Duration::from_secs(3));
        c.send(&post(&sink_task(&sink, &format!("meanwhile{i}"), 0)))
            .expect("send");
        assert_eq!(c.answer().expect("a submit answer").code, 200);
    }
    drop(held);
}

#[test]
fn oversized_heads_are_refused_while_reading_and_before_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir)
        .args(&["--workers", "1", "--token", "secret"])
        .start();
    let long_line = format!(
        "GET /sys_info?{} HTTP/1.1\r\nHost: poulpe\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    let many = format!(
        "GET /sys_info HTTP/1.1\r\nHost: poulpe\r\n{}\r\n",
        (0..101)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let big = format!(
        "GET /sys_info HTTP/1.1\r\nHost: poulpe\r\nX-Big: {}\r\n\r\n",
        "b".repeat(17 * 1024)
    );
    for (req, code, word) in [
        (long_line, 414, "request line"),
        (many, 431, "header fields"),
        (big, 431, "header fields"),
    ] {
        let mut c = Raw::connect(s.port, Duration::from_secs(10));
        c.send(req.as_bytes()).expect("send");
        let a = c.answer().expect("an answer");
        assert_eq!(a.code, code, "{a:?}");
        assert!(a.body.contains(word), "the reason names the limit: {a:?}");
        assert!(
            c.closed_by_server(),
            "the connection is closed after {code}"
        );
    }
    // A header that never ends is refused long before it is read whole: the answer comes while
    // the client is still sending, and memory stays small.
    let mut c = Raw::connect(s.port, Duration::from_secs(10));
    c.send(b"GET /sys_info HTTP/1.1\r\nHost: poulpe\r\nX-Endless: ")
        .expect("send");
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..16 {
        if c.send(&chunk).is_err() {
            break;
        }
    }
    let a = c.answer().expect("an answer");
    assert_eq!(a.code, 431, "{a:?}");
    // Exactly 100 header fields within the limits are fine (and still need the token).
    let hundred = format!(
        "GET /sys_info HTTP/1.1\r\nHost: poulpe\r\n{}\r\n",
        (0..99)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let mut c = Raw::connect(s.port, Duration::from_secs(10));
    c.send(hundred.as_bytes()).expect("send");
    assert_eq!(c.answer().expect("an answer").code, 401);
}

#[test]
fn ambiguous_framing_is_refused_and_closes_the_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--workers", "1"]).start();
    let task = r#"{"id":"smuggled","method":"EXEC","name":"true"}"#;
    let hidden = format!(
        "POST /task_in_queue HTTP/1.1\r\nHost: poulpe\r\nContent-Length: {}\r\n\r\n{task}",
        task.len()
    );
    let cases: Vec<(String, &str)> = vec![
        (
            format!("POST /task_in_queue HTTP/1.1\r\nHost: poulpe\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"),
            "Transfer-Encoding",
        ),
        (
            format!("POST /task_in_queue HTTP/1.1\r\nHost: poulpe\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\n{{}}{hidden}"),
            "Content-Length",
        ),
        (
            "POST /task_in_queue HTTP/1.1\r\nHost: poulpe\r\nContent-Length: -1\r\n\r\n".to_string(),
            "Content-Length",
        ),
        (
            "POST /task_in_queue HTTP/1.1\r\nHost: poulpe\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_string(),
            "Content-Length",
        ),
        (
            "POST /task_in_queue HTTP/1.1\r\nHost: poulpe\r\nContent-Length: 1e3\r\n\r\n".to_string(),
            "Content-Length",
        ),
        (
            "POST /task_in_queue HTTP/1.1\r\nHost: poulpe\r\nTransfer-Encoding: gzip\r\n\r\n".to_string(),
            "Transfer-Encoding",
        ),
        (
            "POST /task_in_queue HTTP/1.1\r\nHost: poulpe\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n".to_string(),
            "Transfer-Encoding",
        ),
        (
            "POST /task_in_queue HTTP/1.1\r\nHost: poulpe\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n".to_string(),
            "chunk",
        ),
        (
            "GET /health HTTP/1.1\r\n\r\n".to_string(),
            "Host",
        ),
    ];
    for (req, word) in &cases {
        let mut c = Raw::connect(s.port, Duration::from_secs(10));
        c.send(req.as_bytes()).expect("send");
        let a = c.answer().expect("an answer");
        assert_eq!(a.code, 400, "{req:?}: {a:?}");
        assert!(
            a.body.contains(word),
            "{req:?}: the reason names {word}: {a:?}"
        );
        assert!(
            c.closed_by_server(),
            "{req:?}: connection closed after the 400"
        );
    }
    // Nothing hidden behind them ran as a request of its own.
    let (code, r) = s.get("/task_resp/smuggled?timeout=0");
    assert_eq!(code, 404, "{r}");
    let (_, info) = s.get("/sys_info");
    assert_eq!(info["counts"]["accepted"], 0, "{info}");
}

#[test]
fn chunked_bodies_expect_continue_and_pipelining_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--workers", "1"]).start();
    let task = sink_task(&sink, "chunky", 0).to_string();
    let (a, b) = task.split_at(10);
    let chunked = format!(
        "POST /task_in_queue HTTP/1.1\r\nHost: poulpe\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nX-Trailer: t\r\n\r\n",
        a.len(),
        b.len()
    );
    let mut c = Raw::connect(s.port, Duration::from_secs(10));
    c.send(chunked.as_bytes()).expect("send");
    let ans = c.answer().expect("answer");
    assert_eq!(
        (ans.code, &ans.json()["id"]),
        (200, &json!("chunky")),
        "{ans:?}"
    );

    // Expect: 100-continue gets the interim answer before the body is sent.
    let task = sink_task(&sink, "patient", 0).to_string();
    c.send(
        format!(
            "POST /task_in_queue HTTP/1.1\r\nHost: poulpe\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            task.len()
        )
        .as_bytes(),
    )
    .expect("send head");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut c.reader, &mut line).expect("interim answer");
    assert!(line.starts_with("HTTP/1.1 100"), "{line:?}");
    let mut blank = String::new();
    std::io::BufRead::read_line(&mut c.reader, &mut blank).expect("interim end");
    c.send(task.as_bytes()).expect("send body");
    let ans = c.answer().expect("answer");
    assert_eq!(
        (ans.code, &ans.json()["id"]),
        (200, &json!("patient")),
        "{ans:?}"
    );

    // Several requests in one write are answered in order on the same connection.
    let mut three = HEALTH.to_vec();
    three.extend(post(&sink_task(&sink, "piped", 0)));
    three.extend(b"GET /task_resp/nope?timeout=0 HTTP/1.1\r\nHost: poulpe\r\n\r\n");
    c.send(&three).expect("send");
    let codes: Vec<u16> = (0..3).map(|_| c.answer().expect("answer").code).collect();
    assert_eq!(codes, [200, 200, 404]);
    // HTTP/1.0 without keep-alive: answered, then closed.
    c.send(b"GET /health HTTP/1.0\r\n\r\n").expect("send");
    assert_eq!(c.answer().expect("answer").code, 200);
    assert!(c.closed_by_server(), "HTTP/1.0 closes after the answer");
}

#[test]
fn slow_heads_and_bodies_are_cut_and_surplus_clients_get_503_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir)
        .args(&["--workers", "1", "--http_idle", "2", "--max_conns", "6"])
        .start();
    // A head sent one byte every 500 ms: each byte comes well within --http_idle, but the head
    // must be complete within 10 s of its first byte.
    let mut slow = Raw::connect(s.port, Duration::from_secs(20));
    let start = Instant::now();
    let head = b"GET /health HTTP/1.1\r\nHost: poulpe\r\nX-Slow: ";
    let mut cut = None;
    for (i, b) in head.iter().chain(std::iter::repeat(&b'z')).enumerate() {
        if slow.send(&[*b]).is_err() || start.elapsed() > Duration::from_secs(30) {
            break;
        }
        if i >= head.len() {
            thread::sleep(Duration::from_millis(500));
        }
        let mut probe = [0u8; 1];
        slow.stream().set_nonblocking(true).expect("nonblocking");
        let peeked = slow.stream().peek(&mut probe);
        slow.stream().set_nonblocking(false).expect("blocking");
        if matches!(peeked, Ok(n) if n > 0) {
            cut = Some(start.elapsed());
            break;
        }
    }
    assert!(cut.is_some(), "the slow head was never cut");
    let a = slow.answer().expect("the 408");
    assert_eq!(a.code, 408, "{a:?}");

    // A body that stalls is cut after --http_idle.
    let mut c = Raw::connect(s.port, Duration::from_secs(10));
    c.send(b"POST /task_in_queue HTTP/1.1\r\nHost: poulpe\r\nContent-Length: 100\r\n\r\n{\"id\":")
        .expect("send");
    let a = c.answer().expect("the 408");
    assert_eq!(a.code, 408, "{a:?}");

    // Every slot held by a client trickling its head: new clients get the 503 at once, several
    // at a time. The two connections above hold their slots while the server lingers after
    // its 408 (up to 2 s, reading what the client still sends): closed here, they let go, and
    // the six below are all served (one refused while a linger lasted is tried again), so that
    // no slot frees up while the eight are refused.
    drop((slow, c));
    let trickling = common::eventually(Duration::from_secs(10), "six slots held", || {
        let mut six = Vec::new();
        for _ in 0..6 {
            let mut c = Raw::connect(s.port, Duration::from_secs(10));
            c.send(b"GET /health HTTP/1.1\r\n").ok()?;
            six.push(c);
        }
        thread::sleep(Duration::from_millis(200));
        let answered = six.iter_mut().any(|c| {
            let mut probe = [0u8; 1];
            let _ = c.stream().set_nonblocking(true);
            !matches!(c.stream().peek(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        });
        (!answered).then_some(six)
    });
    let started = Instant::now();
    let refused: Vec<_> = (0..8)
        .map(|_| {
            let port = s.port;
            thread::spawn(move || {
                let mut c = Raw::connect(port, Duration::from_secs(5));
                c.answer().map(|a| (a.code, started.elapsed()))
            })
        })
        .collect();
    for r in refused {
        let (code, _) = r.join().expect("join").expect("a 503, not a time-out");
        assert_eq!(code, 503);
    }
    drop(trickling);
}
