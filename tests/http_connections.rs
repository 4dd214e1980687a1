//! Connection handling of the HTTP port: clients that open many keep-alive connections at once
//! are all served, and each connection keeps working for later requests.

mod common;
use common::{raw::ask, raw::read_response, Server};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: poulpe\r\n\r\n";

/// `Some` when a new connection gets a 200 from `/health` within 2 s.
fn health_on_new_connection(port: u16) -> Option<()> {
    let (_, code, _) = ask(port, HEALTH, Duration::from_secs(2)).ok()?;
    (code == 200).then_some(())
}

/// Opens `n` connections first, then sends one request on each, then reads every answer.
fn burst(port: u16, n: usize, round: usize, conns: &mut Vec<TcpStream>) {
    while conns.len() < n {
        let c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        conns.push(c);
    }
    for c in conns.iter_mut() {
        c.write_all(HEALTH).expect("send");
    }
    let mut unanswered = Vec::new();
    for (i, c) in conns.iter_mut().enumerate() {
        match read_response(c) {
            Ok((200, body)) => assert!(body.contains("\"ok\""), "conn {i}: {body}"),
            Ok((code, body)) => panic!("round {round}, conn {i}: HTTP {code} {body}"),
            Err(e) => unanswered.push(format!("conn {i}: {e}")),
        }
    }
    assert!(
        unanswered.is_empty(),
        "round {round}: {} of {n} keep-alive connections got no answer within 10 s: {unanswered:?}",
        unanswered.len()
    );
}

#[test]
fn keep_alive_clients_connecting_together_are_all_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--workers", "2"]).start();
    // Right after start the HTTP pool has a few idle threads: a burst larger than that once
    // left the surplus connections unread until another connection closed.
    let mut conns = Vec::new();
    burst(s.port, 8, 1, &mut conns);
    // The same connections again (keep-alive), then a second burst of new ones beside them.
    burst(s.port, 8, 2, &mut conns);
    burst(s.port, 40, 3, &mut conns);
    drop(conns);
    // Threads that served closed connections are idle now: a new burst must not queue behind
    // them either.
    let mut again = Vec::new();
    burst(s.port, 24, 4, &mut again);
}

/// Sets the open-file limit of process `pid` (soft and hard).
fn limit_open_files(pid: u32, n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: prlimit on a child process of this test, with a valid rlimit and no old value.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn running_out_of_file_descriptors_does_not_stop_the_server_accepting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--workers", "2"]).start();
    let pid = s.pid().expect("pid");
    let open_now = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count() as u64;
    limit_open_files(pid, open_now + 20);
    // More connections than descriptors left: the kernel completes them (backlog), the server
    // cannot accept them all.
    let mut held = Vec::new();
    for _ in 0..60 {
        match TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], s.port)),
            Duration::from_millis(300),
        ) {
            Ok(c) => held.push(c),
            Err(_) => break,
        }
    }
    common::eventually(Duration::from_secs(10), "accept to fail", || {
        s.log_text().contains("Too many open files").then_some(())
    });
    drop(held);
    // Once descriptors are free again the server accepts and answers as before.
    common::eventually(Duration::from_secs(15), "/health after the storm", || {
        health_on_new_connection(s.port)
    });
    burst(s.port, 8, 1, &mut Vec::new());
}

#[test]
fn idle_connections_are_closed_but_long_polls_still_get_their_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = common::Sink::start();
    let s = Server::builder(&dir)
        .args(&["--workers", "2", "--http_idle", "1"])
        .start();

    // An idle keep-alive connection is closed by the server after --http_idle.
    let (mut idle, code, _) = ask(s.port, HEALTH, Duration::from_secs(10)).expect("answer");
    assert_eq!(code, 200);
    let mut buf = [0u8; 16];
    match idle.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("an idle connection should be closed by the server, got {other:?}"),
    }

    // A long poll that outlasts --http_idle still gets its final answer.
    let (code, body) = s.submit(&serde_json::json!({
        "id": "late", "method": "GET", "name": sink.url("/late"), "delay": 3}));
    assert_eq!(code, 200, "{body}");
    let poll = b"GET /task_resp/late?timeout=15 HTTP/1.1\r\nHost: poulpe\r\n\r\n";
    let (_, code, body) = ask(s.port, poll, Duration::from_secs(20)).expect("long-poll answer");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"succeeded\""), "{body}");
}

#[test]
fn connections_beyond_max_conns_get_503_and_freed_slots_serve_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir)
        .args(&["--workers", "2", "--max_conns", "6"])
        .start();
    // The harness's own health checks may still hold a pooled connection: fill the remaining
    // slots, each proven live by an answer.
    let mut held: Vec<TcpStream> = Vec::new();
    let refused = loop {
        assert!(
            held.len() <= 6,
            "more than --max_conns connections were served"
        );
        let mut c = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
        // A refused connection is answered at once, before any request (sending one to a
        // connection being closed could reset it before the answer is read).
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("read timeout");
        let mut first = [0u8; 1];
        let unsolicited = matches!(c.peek(&mut first), Ok(n) if n > 0);
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        if !unsolicited {
            c.write_all(HEALTH).expect("send");
        }
        let (code, body) = read_response(&mut c).expect("an answer");
        match code {
            200 => held.push(c),
            503 => break body,
            other => panic!("HTTP {other}: {body}"),
        }
    };
    assert!(refused.contains("too many open connections"), "{refused}");
    assert!(!held.is_empty(), "some connections were served");
    // A refused client that sends its request at once still reads the 503 (no reset).
    let post = b"POST /task_in_queue HTTP/1.1\r\nHost: poulpe\r\nContent-Length: 2\r\n\r\n{}";
    for _ in 0..5 {
        let (_, code, body) =
            ask(s.port, post, Duration::from_secs(10)).expect("the 503, not a reset");
        assert_eq!(code, 503, "{body}");
    }
    // Held connections keep working; closing one frees its slot for a new client.
    burst(s.port, held.len(), 1, &mut held);
    held.pop();
    common::eventually(Duration::from_secs(10), "a freed slot", || {
        health_on_new_connection(s.port)
    });
}
