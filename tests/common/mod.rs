//! Test harness: the real `poulpe` binary on a free port with its own data directory, a real
//! local HTTP sink that records every hit, and a small JSON client.
#![allow(dead_code)]

pub mod ws;

use parking_lot::Mutex;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// CPU time (user + system, in clock ticks) that process `pid` has used so far.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the command name (which may hold spaces) start at field 3; utime and stime
    // are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Unix time in microseconds.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}

/// The poulpe binary under test: the one cargo built, or `POULPE_TEST_BIN` (to show that a new
/// test fails against an older build).
pub fn binary() -> PathBuf {
    std::env::var_os("POULPE_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_poulpe")))
}

/// A running poulpe process; killed when dropped.
pub struct Server {
    pub child: Option<Child>,
    pub port: u16,
    pub data: PathBuf,
    pub log: PathBuf,
    pub base: String,
}

impl Server {
    /// Starts poulpe with `args` on a fresh port, data in `data`, and waits for `/health`.
    pub fn start_in(data: &Path, args: &[&str]) -> Server {
        Server::start_in_with_env(data, args, &[])
    }

    /// Starts poulpe in a new temporary data directory with extra environment variables.
    pub fn start_with_env(dir: &tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_in_with_env(&dir.path().join("data"), args, env)
    }

    /// `start_in` with extra environment variables.
    pub fn start_in_with_env(data: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_logged(data, data, args, env)
    }

    /// `start_in_with_env` with the log file in `log_dir` rather than in the data directory
    /// (for a data directory on a small filesystem that the test fills up).
    pub fn start_logged(
        data: &Path,
        log_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        for _ in 0..5 {
            let port = free_port();
            let log = log_dir.join(format!("poulpe-{port}.log"));
            std::fs::create_dir_all(data).expect("data dir");
            std::fs::create_dir_all(log_dir).expect("log dir");
            let logf = std::fs::File::create(&log).expect("log file");
            let child = Command::new(binary())
                .arg("--port")
                .arg(port.to_string())
                .arg("--bind")
                .arg("127.0.0.1")
                .arg("--data")
                .arg(data)
                .args(args)
                .env("POULPE_LOG", "debug")
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(logf)
                .spawn()
                .expect("spawn poulpe");
            let mut s = Server {
                child: Some(child),
                port,
                data: data.to_path_buf(),
                log,
                base: format!("http://127.0.0.1:{port}"),
            };
            if s.wait_healthy(Duration::from_secs(15)) {
                return s;
            }
            eprintln!("poulpe did not come up on port {port}:\n{}", s.log_text());
            s.kill9();
        }
        panic!("poulpe did not start");
    }

    /// Starts poulpe in a new temporary data directory (kept in `dir`).
    pub fn start(dir: &tempfile::TempDir, args: &[&str]) -> Server {
        Server::start_in(&dir.path().join("data"), args)
    }

    fn wait_healthy(&mut self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return false;
                }
            }
            if let Ok((200, _)) = try_get(&format!("{}/health", self.base)) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn term(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        c.wait().expect("wait")
    }

    /// Submits a task (or array) and returns (status, body).
    pub fn submit(&self, task: &Value) -> (u16, Value) {
        post_json(&self.url("/task_in_queue"), task)
    }

    /// GET of a path on this server.
    pub fn get(&self, path: &str) -> (u16, Value) {
        get(&self.url(path))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(320)))
        .build()
        .into()
}

fn to_json(mut r: ureq::http::Response<ureq::Body>) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

pub fn try_get(url: &str) -> Result<(u16, Value), ureq::Error> {
    agent().get(url).call().map(to_json)
}

pub fn get(url: &str) -> (u16, Value) {
    try_get(url).expect("GET")
}

pub fn post_json(url: &str, body: &Value) -> (u16, Value) {
    post_raw(url, body.to_string().as_bytes(), &[])
}

/// POST of raw bytes with extra headers.
pub fn post_raw(url: &str, body: &[u8], headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = agent().post(url).content_type("application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send(body).map(to_json).expect("POST")
}

/// Any request with headers.
pub fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut b = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(()).expect("request");
    agent().run(req).map(to_json).expect("request")
}

/// One request seen by the sink.
#[derive(Clone, Debug)]
pub struct Hit {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: String,
    pub content_type: String,
    /// Unix µs when the request arrived.
    pub at_us: u64,
}

/// A local HTTP server that records hits. Paths:
/// - `/slow?ms=N...` answers after N ms (and counts how many run at once),
/// - `/status/N...` answers with status N,
/// - anything else answers 200 `ok`.
pub struct Sink {
    pub port: u16,
    hits: Arc<Mutex<Vec<Hit>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    server: poulpe::http::Listening,
}

impl Sink {
    pub fn start() -> Sink {
        use poulpe::http::{Reply, Request, Response};
        let server = poulpe::http::listen(([127, 0, 0, 1], 0).into()).expect("sink bind");
        let port = server.local_addr().expect("sink address").port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let (h, inf, maxf) = (hits.clone(), in_flight.clone(), max_in_flight.clone());
        let handler = move |req: Request| -> Reply {
            let at_us = now_us();
            let (path, query) = (req.path().to_string(), req.query().to_string());
            h.lock().push(Hit {
                method: req.method.clone(),
                path: path.clone(),
                query: query.clone(),
                body: String::from_utf8_lossy(&req.body).into_owned(),
                content_type: req.header("content-type").unwrap_or_default().to_string(),
                at_us,
            });
            let mut status = 200;
            if path.starts_with("/slow") {
                let ms: u64 = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("ms="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(500);
                let now = inf.fetch_add(1, Ordering::SeqCst) + 1;
                maxf.fetch_max(now, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(ms));
                inf.fetch_sub(1, Ordering::SeqCst);
            } else if let Some(code) = path.strip_prefix("/status/") {
                status = code
                    .split('/')
                    .next()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(500);
            }
            Response::text(status, "ok").into()
        };
        let limits = poulpe::http::Limits {
            max_body: 64 << 20,
            idle: Duration::from_secs(75),
            max_conns: 4096,
        };
        server
            .serve(limits, Arc::new(handler))
            .expect("sink threads");
        Sink {
            port,
            hits,
            in_flight,
            max_in_flight,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().clone()
    }

    /// Hits whose path is `path`.
    pub fn hits_on(&self, path: &str) -> Vec<Hit> {
        self.hits().into_iter().filter(|h| h.path == path).collect()
    }

    /// Waits until `pred` holds for the hits, or panics after `limit`.
    pub fn wait_until(&self, limit: Duration, what: &str, pred: impl Fn(&[Hit]) -> bool) {
        let end = Instant::now() + limit;
        loop {
            if pred(&self.hits.lock()) {
                return;
            }
            if Instant::now() > end {
                panic!(
                    "sink: timed out waiting for {what}; {} hits",
                    self.hits.lock().len()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Most requests to `/slow` that were in progress at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.server.stop();
    }
}

/// Polls until `f` returns Some, or panics after `limit`.
pub fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---- Added for the crash, shutdown and command-line tests. ----

/// POST of JSON that reports transport errors (connection refused, reset) instead of panicking.
pub fn try_post_json(url: &str, body: &Value) -> Result<(u16, Value), ureq::Error> {
    agent()
        .post(url)
        .content_type("application/json")
        .send(body.to_string().as_bytes())
        .map(to_json)
}

impl Server {
    /// Submits a task, reporting transport errors instead of panicking.
    pub fn try_submit(&self, task: &Value) -> Result<(u16, Value), ureq::Error> {
        try_post_json(&self.url("/task_in_queue"), task)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) without waiting.
    pub fn signal(&self, sig: i32) {
        let pid = self.pid().expect("running");
        // SAFETY: plain kill(2) on our own child's pid, which has not been reaped yet.
        let rc = unsafe { libc::kill(pid as i32, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    /// Waits up to `limit` for the process to exit; `None` (still running) after that.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            let c = self.child.as_mut().expect("running");
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > end {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

// ---- Redis ----

/// A private redis-server on a free port, stopped (SIGKILL) when dropped.
pub struct RedisServer {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
}

impl RedisServer {
    /// Starts redis-server with no persistence.
    pub fn start(dir: &Path) -> RedisServer {
        RedisServer::start_on(dir, free_port(), &["--save", "", "--appendonly", "no"])
    }

    /// Starts redis-server on `port` with its files in `dir` and extra arguments
    /// (e.g. `["--appendonly", "yes"]` so it can come back with its data).
    pub fn start_on(dir: &Path, port: u16, extra: &[&str]) -> RedisServer {
        std::fs::create_dir_all(dir).expect("redis dir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server is needed ({e}): run scripts/test.sh, which installs it (apt-get install redis-server)")
            });
        let mut r = RedisServer {
            child: Some(child),
            port,
            dir: dir.to_path_buf(),
        };
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < end,
                "redis-server did not start on port {port}"
            );
            if let Some(Ok(Some(st))) = r.child.as_mut().map(|c| c.try_wait()) {
                panic!("redis-server exited at start: {st}");
            }
            thread::sleep(Duration::from_millis(20));
        }
        r
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops the server (SIGTERM: with appendonly it keeps its data) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- Sink hits by task id (tasks carry `id=<id>` in their query). ----

/// The `id` query parameter of a sink hit (every task here carries `id=<id>` in its params).
pub fn hit_id(h: &Hit) -> Option<&str> {
    h.query.split('&').find_map(|kv| kv.strip_prefix("id="))
}

/// Hits per id.
pub fn hits_by_id(hits: &[Hit]) -> HashMap<String, Vec<u64>> {
    let mut m: HashMap<String, Vec<u64>> = HashMap::new();
    for h in hits {
        if let Some(id) = hit_id(h) {
            m.entry(id.to_string()).or_default().push(h.at_us);
        }
    }
    m
}

/// Waits (up to `limit`) until every id in `want` has reached the sink; panics naming the
/// missing ones otherwise.
pub fn wait_all_hit(sink: &Sink, want: &HashSet<String>, limit: Duration, what: &str) {
    let end = Instant::now() + limit;
    loop {
        let seen = hits_by_id(&sink.hits());
        let mut missing: Vec<&String> = want.iter().filter(|id| !seen.contains_key(*id)).collect();
        if missing.is_empty() {
            return;
        }
        if Instant::now() > end {
            missing.sort();
            panic!(
                "{what}: {} of {} acknowledged tasks never reached the sink, e.g. {:?}",
                missing.len(),
                want.len(),
                &missing[..missing.len().min(20)]
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---- Raw HTTP over a socket (connection and framing tests). ----

/// Reads one HTTP/1.1 response with a Content-Length body; returns the status and the body.
pub fn read_response(s: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            // An interim answer (100 Continue) comes before the real one.
            if buf.starts_with(b"HTTP/1.1 1") {
                buf.drain(..p + 4);
                continue;
            }
            break p + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let (status, len) = status_and_length(&head);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((
        status,
        String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string(),
    ))
}

/// Sends `request` on a new connection and reads the answer, waiting at most `wait` for each
/// read; gives back the connection for later use.
pub fn ask(port: u16, request: &[u8], wait: Duration) -> std::io::Result<(TcpStream, u16, String)> {
    let mut c = TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(wait))?;
    c.write_all(request)?;
    let (code, body) = read_response(&mut c)?;
    Ok((c, code, body))
}

/// The status code and `Content-Length` (0 when absent) of an answer's head.
fn status_and_length(head: &str) -> (u16, usize) {
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    (status, len)
}

/// A raw HTTP/1.1 client connection that keeps what it read past one answer, for pipelining.
pub struct Raw {
    pub reader: std::io::BufReader<TcpStream>,
}

/// One answer read by [`Raw`].
#[derive(Debug)]
pub struct RawAnswer {
    pub code: u16,
    pub head: String,
    pub body: String,
}

impl RawAnswer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::String(self.body.clone()))
    }
}

impl Raw {
    /// Connects to 127.0.0.1:`port`; reads wait at most `wait`.
    pub fn connect(port: u16, wait: Duration) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        Raw::from_stream(s, wait)
    }

    pub fn from_stream(s: TcpStream, wait: Duration) -> Raw {
        s.set_read_timeout(Some(wait)).expect("read timeout");
        Raw {
            reader: std::io::BufReader::new(s),
        }
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }

    /// Writes `bytes`.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream().write_all(bytes)
    }

    /// Reads the next final answer (interim 1xx answers are skipped); the body by
    /// Content-Length.
    pub fn answer(&mut self) -> std::io::Result<RawAnswer> {
        use std::io::BufRead;
        loop {
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if self.reader.read_line(&mut line)? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                let end = line == "\r\n";
                head.push_str(&line);
                if end {
                    break;
                }
            }
            let (code, len) = status_and_length(&head);
            if (100..200).contains(&code) {
                continue;
            }
            let mut body = vec![0u8; len];
            self.reader.read_exact(&mut body)?;
            return Ok(RawAnswer {
                code,
                head,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
    }

    /// True when the server has closed the connection (end of stream or reset) within the
    /// read timeout; false when it is still open (the read timed out) or sent more.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.reader.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

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
