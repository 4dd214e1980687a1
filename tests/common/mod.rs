//! Test harness: the real `poulpe` binary on a free port with its own data directory
//! (`Server::builder(&dir).args(..).env(..).start()`), a real local HTTP sink that records every
//! hit, and a small JSON client. What only some tests need is in the submodules: sink hits by task
//! id ([`hits`]), raw HTTP over a socket ([`raw`]), a private redis-server ([`redis`]), result
//! retention checks ([`results`]) and a WebSocket client ([`ws`]).
//!
//! Each `tests/*.rs` file compiles this module on its own and uses a part of it, so an item (or
//! submodule) that only some of them use carries `#[allow(dead_code)]`; the others are checked by
//! the compiler in every test file.

#[allow(dead_code)]
pub mod hits;
#[allow(dead_code)]
pub mod py;
#[allow(dead_code)]
pub mod raw;
#[allow(dead_code)]
pub mod redis;
#[allow(dead_code)]
pub mod results;
#[allow(dead_code)]
pub mod ws;

use parking_lot::Mutex;
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// CPU time (user + system, in clock ticks) that process `pid` has used so far.
#[allow(dead_code)]
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    stat_field(&stat, 14).parse::<u64>().expect("utime")
        + stat_field(&stat, 15).parse::<u64>().expect("stime")
}

/// Field `n` (1-based, as in proc(5)) of a `/proc/.../stat` line. Counted after the command
/// name's closing parenthesis, as the name may hold spaces.
#[allow(dead_code)]
pub fn stat_field(stat: &str, n: usize) -> &str {
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    rest.split(' ').nth(n - 3).expect("stat field").trim()
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Unix time in microseconds.
#[allow(dead_code)]
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
#[allow(dead_code)]
pub struct Server {
    pub child: Option<Child>,
    pub port: u16,
    pub data: PathBuf,
    pub log: PathBuf,
    pub base: String,
}

/// How a test starts poulpe: `Server::builder(&dir).args(&["--workers", "2"]).start()`.
#[allow(dead_code)]
pub struct Builder {
    data: PathBuf,
    log_dir: Option<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

#[allow(dead_code)]
impl Builder {
    /// Adds command-line arguments (after `--port`, `--bind` and `--data`).
    pub fn args(mut self, args: &[&str]) -> Builder {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Sets an environment variable for the server (on top of the test's own environment and
    /// `POULPE_LOG=debug`).
    pub fn env(mut self, name: &str, value: &str) -> Builder {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Writes the log file in `dir` rather than in the data directory (for a data directory on a
    /// small filesystem that the test fills up).
    pub fn log_dir(mut self, dir: &Path) -> Builder {
        self.log_dir = Some(dir.to_path_buf());
        self
    }

    /// Starts poulpe on a fresh port and waits for `/health` (up to five ports are tried).
    pub fn start(self) -> Server {
        let data = &self.data;
        let log_dir = self.log_dir.as_ref().unwrap_or(data);
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
                .args(&self.args)
                .env("POULPE_LOG", "debug")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(logf)
                .spawn()
                .expect("spawn poulpe");
            let mut s = Server {
                child: Some(child),
                port,
                data: data.clone(),
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
}

#[allow(dead_code)]
impl Server {
    /// How to start poulpe with its data in `<dir>/data`, `dir` being the test's (temporary)
    /// directory; starting again with the same `dir` restarts on the same data.
    pub fn builder(dir: impl AsRef<Path>) -> Builder {
        Builder {
            data: dir.as_ref().join("data"),
            log_dir: None,
            args: Vec::new(),
            env: Vec::new(),
        }
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

    /// Submits `tasks` in arrays of 100, each acknowledged; their ids.
    #[allow(dead_code)]
    pub fn submit_all(&self, tasks: &[Value]) -> Vec<String> {
        for chunk in tasks.chunks(100) {
            let (code, r) = self.submit(&serde_json::json!(chunk));
            assert_eq!(code, 200, "{r}");
        }
        tasks
            .iter()
            .filter_map(|t| t["id"].as_str().map(str::to_string))
            .collect()
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

#[allow(dead_code)]
pub fn get(url: &str) -> (u16, Value) {
    try_get(url).expect("GET")
}

#[allow(dead_code)]
pub fn post_json(url: &str, body: &Value) -> (u16, Value) {
    post_raw(url, body.to_string().as_bytes(), &[])
}

/// POST of raw bytes with extra headers.
#[allow(dead_code)]
pub fn post_raw(url: &str, body: &[u8], headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = agent().post(url).content_type("application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send(body).map(to_json).expect("POST")
}

/// Any request with headers.
#[allow(dead_code)]
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
#[allow(dead_code)]
pub struct Hit {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: String,
    pub content_type: String,
    /// Every header as received (names as sent).
    pub headers: Vec<(String, String)>,
    /// Unix µs when the request arrived.
    pub at_us: u64,
}

/// A local HTTP server that records hits. Paths:
/// - `/slow?ms=N...` answers after N ms (and counts how many run at once),
/// - `/status/N...` answers with status N,
/// - anything else answers 200 `ok`.
#[allow(dead_code)]
pub struct Sink {
    pub port: u16,
    hits: Arc<Mutex<Vec<Hit>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    server: poulpe::http::Listening,
}

#[allow(dead_code)]
impl Sink {
    pub fn start() -> Sink {
        Sink::start_on(0)
    }

    /// A sink on `port` (0: any free one), e.g. where a task failed to connect before.
    pub fn start_on(port: u16) -> Sink {
        use poulpe::http::{Reply, Request, Response};
        let server = poulpe::http::listen(([127, 0, 0, 1], port).into()).expect("sink bind");
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
                headers: req
                    .headers()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
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

/// Waits up to `limit` for `child` to exit, killing it once `limit` has passed: its output, and
/// whether it exited by itself.
#[allow(dead_code)]
pub fn output_within(mut child: Child, limit: Duration) -> (std::process::Output, bool) {
    let end = Instant::now() + limit;
    let mut exited = true;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            exited = false;
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    (child.wait_with_output().expect("output"), exited)
}

/// Polls until `f` returns Some, or panics after `limit`.
#[allow(dead_code)]
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

/// POST of JSON that reports transport errors (connection refused, reset) instead of panicking.
#[allow(dead_code)]
pub fn try_post_json(url: &str, body: &Value) -> Result<(u16, Value), ureq::Error> {
    agent()
        .post(url)
        .content_type("application/json")
        .send(body.to_string().as_bytes())
        .map(to_json)
}

#[allow(dead_code)]
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
