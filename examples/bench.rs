//! Load generator, HTTP sink and probes for `scripts/bench.sh` (issue 8). It speaks a minimal
//! HTTP/1.1 over plain keep-alive sockets, both as client and as sink, so that it costs a small
//! fraction of what the server under test spends per task.
//!
//! Subcommands (each prints `key value` lines on stdout; problems go to stderr as `error: ...`
//! and make the exit code 1; a bad command line exits 2):
//!
//! - `port`: prints a free TCP port on 127.0.0.1.
//! - `fsync --dir D [--n 200]`: 4 KiB write + fdatasync, appending and overwriting, and one
//!   direct synchronous write (`O_DIRECT | O_DSYNC`, as the journal writes); µs per write and
//!   the CPU µs it cost.
//! - `exchange [-n 40000] [-c 1]`: the machine's price of one keep-alive HTTP exchange over
//!   loopback TCP, the one every task here makes to its sink: `c` client threads, each with a
//!   sink thread of its own; exchanges/s and CPU µs per exchange on each side.
//! - `immediate --server HOST:PORT [-n 20000] [-c 8] [--batch 1] [--timeout 120] [--rate R]`:
//!   starts a sink, submits `n` GET tasks to it over `c` connections (`batch` > 1: JSON arrays;
//!   `rate` > 0: paced at R tasks/s in all), waits for every one to arrive; submits/s,
//!   executed/s (first submit to last arrival), ack round trips, and the outcome lag: the share
//!   of outcomes the server had recorded when the last task arrived, and the ms until all were
//!   (`--lag 0`: not measured; for nodes sharing work, whose own counts miss the tasks another
//!   node took, so that waiting for them would only end at its 30 s limit).
//! - `delayed --server HOST:PORT [-n 2000] [--delay 3] [-c 8] [--batch 1] [--timeout 60]
//!   [--rate R]`: the same with a delay; each task's URL carries its intended due time (`due=`, unix µs, taken just
//!   before the request is sent, so the server's own due time is never earlier), and the sink
//!   reports lateness = arrival − due, and how many arrived early.
//! - `ws --server HOST:PORT [-n 20000] [-c 8] [--batch 1] [--inflight 200] [--timeout 120]`:
//!   the same as `immediate` over `c` WebSocket connections to `/ws_task` (frames of `batch`
//!   tasks, arrays when > 1, at most `inflight` unacknowledged tasks per connection); each
//!   connection reads its acks and its result frames to the end, as a real client would; the
//!   outcome lag per task (result frame arrival − sink arrival; frames are pushed once the
//!   outcome is durable) is reported as `outcome_lag_p50_ms`/`p99`/`max`.
//! - `kafka --server HOST:PORT --brokers B --topic T [-n 20000] [--batch 1] [--timeout 120]`
//!   (Kafka builds only): the same through a Kafka topic the server consumes: one producer
//!   sends messages of `batch` tasks (arrays when > 1); a warm-up task first waits until the
//!   server consumes; `submits_per_s` is then the produce rate (the broker's acks).
//! - `fill --server HOST:PORT [-n 1000000] [-c 8] [--batch 500] [--delay 3600]`: submits delayed
//!   tasks only (to a URL that is never called during the run); submit rate.
//! - `ready --server HOST:PORT [--since-ns T] [--expect N] [--timeout 60] [--pid P]`: waits for
//!   `/health`, then until `/sys_info` shows `delaying_total` ≥ N; ms since `T` (unix ns,
//!   default: now). Gives up early when process `P` has exited.
//!
//! `cargo run --release --example bench -- immediate --server 127.0.0.1:8000 -n 20000 -c 8`

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Command line

struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String], allowed: &[&str]) -> Result<Opts, String> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            if !allowed.contains(&k.as_str()) {
                return Err(format!(
                    "unknown option {k:?} (allowed: {})",
                    allowed.join(" ")
                ));
            }
            let v = it.next().ok_or_else(|| format!("{k}: missing value"))?;
            map.insert(k.clone(), v.clone());
        }
        Ok(Opts(map))
    }

    fn get<T: std::str::FromStr>(&self, k: &str, default: T) -> Result<T, String> {
        match self.0.get(k) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("{k}: bad value {v:?}")),
        }
    }

    fn server(&self) -> Result<String, String> {
        let s = self
            .0
            .get("--server")
            .ok_or("--server HOST:PORT is required")?;
        Ok(s.trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 client over one keep-alive connection

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads until `buf` holds at least `need` bytes.
fn fill_to(s: &mut TcpStream, buf: &mut Vec<u8>, need: usize) -> io::Result<()> {
    let mut chunk = [0u8; 16384];
    while buf.len() < need {
        let k = s.read(&mut chunk)?;
        if k == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..k]);
    }
    Ok(())
}

/// Reads until `buf` contains `needle` at or after `from`; returns its position.
fn fill_until(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    from: usize,
    needle: &[u8],
) -> io::Result<usize> {
    loop {
        if let Some(p) = find(&buf[from.min(buf.len())..], needle) {
            return Ok(from + p);
        }
        let need = buf.len() + 1;
        fill_to(s, buf, need)?;
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

struct Client {
    addr: String,
    timeout: Duration,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Client {
    fn new(addr: &str, timeout: Duration) -> Client {
        Client {
            addr: addr.to_string(),
            timeout,
            stream: None,
            buf: Vec::with_capacity(16384),
        }
    }

    fn connect(&mut self) -> io::Result<()> {
        if self.stream.is_none() {
            let s = TcpStream::connect(&self.addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            self.stream = Some(s);
            self.buf.clear();
        }
        Ok(())
    }

    /// One request; the answer's status and body. Any error drops the connection.
    fn call(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        let r = self.call_once(method, path, body);
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    fn call_once(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        self.connect()?;
        let Some(s) = self.stream.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let mut req = Vec::with_capacity(body.len() + 160);
        write!(
            req,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        )?;
        req.extend_from_slice(body);
        s.write_all(&req)?;
        let buf = &mut self.buf;
        let head_end = fill_until(s, buf, 0, b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
        let close = header(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let chunked = header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let out;
        if chunked {
            let mut body = Vec::new();
            let mut pos = head_end;
            loop {
                let eol = fill_until(s, buf, pos, b"\r\n")?;
                let size_txt = String::from_utf8_lossy(&buf[pos..eol]).into_owned();
                let size =
                    usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| io::Error::other(format!("bad chunk size {size_txt:?}")))?;
                if size == 0 {
                    pos = fill_until(s, buf, eol, b"\r\n\r\n")? + 4;
                    break;
                }
                fill_to(s, buf, eol + 2 + size + 2)?;
                body.extend_from_slice(&buf[eol + 2..eol + 2 + size]);
                pos = eol + 2 + size + 2;
            }
            buf.drain(..pos);
            out = body;
        } else if let Some(cl) = header(&head, "content-length") {
            let cl: usize = cl
                .parse()
                .map_err(|_| io::Error::other(format!("bad content-length {cl:?}")))?;
            fill_to(s, buf, head_end + cl)?;
            out = buf[head_end..head_end + cl].to_vec();
            buf.drain(..head_end + cl);
        } else {
            // No length: the body runs to the end of the connection.
            let mut rest = buf[head_end..].to_vec();
            s.read_to_end(&mut rest)?;
            buf.clear();
            self.stream = None;
            return Ok((status, rest));
        }
        if close {
            self.stream = None;
        }
        Ok((status, out))
    }
}

// ---------------------------------------------------------------------------------------------
// Sink: counts hits per task index, keeps each one's first arrival and intended due time

struct SinkState {
    arrival: Vec<AtomicU64>,
    due: Vec<AtomicU64>,
    unique: AtomicU64,
    dups: AtomicU64,
    strays: AtomicU64,
    last_us: AtomicU64,
    /// Hits on `/warm` (the Kafka warm-up task), not counted as tasks.
    warm: AtomicU64,
}

const SINK_REPLY: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";

fn start_sink(n: usize) -> io::Result<(u16, Arc<SinkState>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let st = Arc::new(SinkState {
        arrival: (0..n).map(|_| AtomicU64::new(0)).collect(),
        due: (0..n).map(|_| AtomicU64::new(0)).collect(),
        unique: AtomicU64::new(0),
        dups: AtomicU64::new(0),
        strays: AtomicU64::new(0),
        last_us: AtomicU64::new(0),
        warm: AtomicU64::new(0),
    });
    let st2 = st.clone();
    thread::Builder::new()
        .name("sink-accept".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let st = st2.clone();
                let _ = thread::Builder::new()
                    .name("sink".into())
                    .spawn(move || sink_conn(conn, &st));
            }
        })?;
    Ok((port, st))
}

fn sink_conn(mut s: TcpStream, st: &SinkState) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    loop {
        let Ok(head_end) = fill_until(&mut s, &mut buf, 0, b"\r\n\r\n") else {
            return;
        };
        let now = now_us();
        let head_end = head_end + 4;
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let target = head.split(' ').nth(1).unwrap_or("");
        record(st, target, now);
        let cl: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if fill_to(&mut s, &mut buf, head_end + cl).is_err() {
            return;
        }
        buf.drain(..head_end + cl);
        if s.write_all(SINK_REPLY).is_err() {
            return;
        }
    }
}

fn record(st: &SinkState, target: &str, now: u64) {
    if target.starts_with("/warm") {
        st.warm.fetch_add(1, Relaxed);
        return;
    }
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let (mut idx, mut due) = (None, 0u64);
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("i", v)) => idx = v.parse::<usize>().ok(),
            Some(("due", v)) => due = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    match idx.filter(|&i| i < st.arrival.len()) {
        Some(i) => {
            if st.arrival[i]
                .compare_exchange(0, now, Relaxed, Relaxed)
                .is_ok()
            {
                st.due[i].store(due, Relaxed);
                st.unique.fetch_add(1, Relaxed);
                st.last_us.fetch_max(now, Relaxed);
            } else {
                st.dups.fetch_add(1, Relaxed);
            }
        }
        None => {
            st.strays.fetch_add(1, Relaxed);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Submission

struct Plan {
    server: String,
    n: usize,
    conns: usize,
    batch: usize,
    delay_s: u64,
    /// The task URL (`http://127.0.0.1:P/t`).
    url: String,
    tag: String,
    /// Tasks per second over all connections; 0: as fast as the server answers.
    rate: f64,
}

#[derive(Default)]
struct Submitted {
    start_us: u64,
    end_us: u64,
    accepted: usize,
    refused: usize,
    rtt_us: Vec<u64>,
    errors: Vec<String>,
    /// WebSocket only: each result frame's task index and arrival (unix µs).
    results: Vec<(usize, u64)>,
}

fn task_json(out: &mut String, plan: &Plan, i: usize, due: u64) {
    use std::fmt::Write as _;
    let _ = write!(
        out,
        r#"{{"id":"{}-{i}","method":"GET","name":"{}","params":"i={i}&due={due}","delay":{}}}"#,
        plan.tag, plan.url, plan.delay_s
    );
}

/// The body of one submit of tasks `i..i + k`: one task, or a JSON array when `batch` > 1.
fn frame(body: &mut String, plan: &Plan, i: usize, k: usize) {
    body.clear();
    let due = now_us() + plan.delay_s * 1_000_000;
    if plan.batch > 1 {
        body.push('[');
    }
    for j in i..i + k {
        if j > i {
            body.push(',');
        }
        task_json(body, plan, j, due);
    }
    if plan.batch > 1 {
        body.push(']');
    }
}

/// Runs `conn` on `plan.conns` threads, each for its own contiguous range of tasks 0..n; each
/// calls `gate.wait()` once connected, so that all start together (`start_us`). Their tallies
/// are added up; `end_us` is the latest of theirs.
fn per_connection(
    plan: &Plan,
    conn: impl Fn(std::ops::Range<usize>, &Barrier) -> Submitted + Sync,
) -> Submitted {
    let conns = plan.conns.max(1);
    let per = plan.n.div_ceil(conns);
    let gate = Barrier::new(conns + 1);
    let out = Mutex::new(Submitted::default());
    thread::scope(|scope| {
        for c in 0..conns {
            let range = (c * per).min(plan.n)..((c + 1) * per).min(plan.n);
            let (gate, out, conn) = (&gate, &out, &conn);
            scope.spawn(move || {
                let t = conn(range, gate);
                let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                o.accepted += t.accepted;
                o.refused += t.refused;
                o.rtt_us.extend(t.rtt_us);
                o.errors.extend(t.errors);
                o.end_us = o.end_us.max(t.end_us);
                o.results.extend(t.results);
            });
        }
        gate.wait();
        out.lock().unwrap_or_else(|p| p.into_inner()).start_us = now_us();
    });
    out.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// Submits tasks 0..n over `conns` connections, each sending its own contiguous range in
/// requests of `batch` tasks (JSON arrays when `batch` > 1).
fn submit_all(plan: &Plan, timeout: Duration) -> Submitted {
    let conns = plan.conns.max(1);
    per_connection(plan, |range, gate| {
        let mut t = Submitted::default();
        let mut client = Client::new(&plan.server, timeout);
        if let Err(e) = client.connect() {
            t.errors.push(format!("connect to {}: {e}", plan.server));
        }
        gate.wait();
        t.rtt_us = Vec::with_capacity(range.len() / plan.batch.max(1) + 1);
        let mut body = String::with_capacity(plan.batch.max(1) * 160);
        let mut i = range.start;
        let paced_from = Instant::now();
        while i < range.end {
            let k = plan.batch.max(1).min(range.end - i);
            if plan.rate > 0.0 {
                // This connection's share of the rate: the next request waits its turn.
                let due =
                    Duration::from_secs_f64((i - range.start) as f64 * conns as f64 / plan.rate);
                if let Some(wait) = due.checked_sub(paced_from.elapsed()) {
                    thread::sleep(wait);
                }
            }
            let t0 = Instant::now();
            frame(&mut body, plan, i, k);
            match client.call("POST", "/task_in_queue", body.as_bytes()) {
                Ok((200, _)) => t.accepted += k,
                Ok((code, b)) => {
                    t.refused += k;
                    if t.errors.len() < 3 {
                        t.errors.push(format!(
                            "HTTP {code}: {}",
                            String::from_utf8_lossy(&b[..b.len().min(300)])
                        ));
                    }
                }
                Err(e) => {
                    t.refused += k;
                    if t.errors.len() < 3 {
                        t.errors.push(format!("request failed: {e}"));
                    }
                }
            }
            t.rtt_us.push(t0.elapsed().as_micros() as u64);
            i += k;
        }
        t.end_us = now_us();
        t
    })
}

/// Submits tasks 0..n over `conns` WebSocket connections, each sending its own contiguous
/// range in frames of `batch` tasks with at most `inflight` tasks unacknowledged; each reads
/// its acks and then its result frames. `end_us` is the last ack.
fn submit_ws(plan: &Plan, timeout: Duration, inflight: usize) -> Submitted {
    per_connection(plan, |range, gate| {
        let mut t = Submitted::default();
        let ws = ws_connect(&plan.server, timeout);
        gate.wait();
        let sent = match ws {
            Ok(mut ws) => {
                let r = ws_conn(&mut ws, plan, range.clone(), inflight, timeout, &mut t);
                let _ = ws.close(None);
                let _ = ws.flush();
                r
            }
            Err(e) => Err(format!("connect to {}: {e}", plan.server)),
        };
        if let Err(e) = sent {
            t.errors.push(e);
            t.refused = range.len() - t.accepted;
        }
        t
    })
}

type Ws = tungstenite::WebSocket<TcpStream>;

fn ws_connect(server: &str, timeout: Duration) -> Result<Ws, String> {
    let stream = TcpStream::connect(server).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    // Short reads, so that the deadline is checked while the server is quiet.
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    match tungstenite::client(format!("ws://{server}/ws_task"), stream) {
        Ok((ws, _)) => Ok(ws),
        Err(e) => Err(format!("WebSocket handshake: {e}")),
    }
}

/// One connection's tasks `range`: frames sent while fewer than `inflight` tasks wait for
/// their ack, acks and result frames read until every task has both (or the deadline).
fn ws_conn(
    ws: &mut Ws,
    plan: &Plan,
    range: std::ops::Range<usize>,
    inflight: usize,
    timeout: Duration,
    t: &mut Submitted,
) -> Result<(), String> {
    use std::collections::VecDeque;
    use tungstenite::Message;
    let deadline = Instant::now() + timeout;
    let mut waiting: VecDeque<Instant> = VecDeque::new();
    let mut body = String::with_capacity(plan.batch.max(1) * 160);
    let (mut i, mut results) = (range.start, 0usize);
    let e = |what: &str, err: tungstenite::Error| format!("{what}: {err}");
    while t.accepted + t.refused < range.len() || results < t.accepted {
        let mut wrote = false;
        while i < range.end {
            let k = plan.batch.max(1).min(range.end - i);
            if !waiting.is_empty() && waiting.len() + k > inflight.max(1) {
                break;
            }
            frame(&mut body, plan, i, k);
            ws.write(Message::text(body.as_str()))
                .map_err(|err| e("send", err))?;
            let now = Instant::now();
            waiting.extend(std::iter::repeat_n(now, k));
            i += k;
            wrote = true;
        }
        if wrote {
            ws.flush().map_err(|err| e("send", err))?;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} acks and {results} results of {} tasks after {timeout:?}",
                t.accepted + t.refused,
                range.len()
            ));
        }
        let text = match ws.read() {
            Ok(Message::Text(text)) => text,
            Ok(_) => continue,
            Err(tungstenite::Error::Io(err))
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(err) => return Err(e("read", err)),
        };
        let v: serde_json::Value = serde_json::from_str(text.as_str())
            .map_err(|err| format!("a frame that is not JSON ({err}): {text}"))?;
        if v.get("status").is_some() {
            results += 1;
            let index = v["id"]
                .as_str()
                .and_then(|id| id.rsplit_once('-'))
                .and_then(|(_, i)| i.parse().ok());
            if let Some(i) = index {
                t.results.push((i, now_us()));
            }
            continue;
        }
        if let Some(t0) = waiting.pop_front() {
            t.rtt_us.push(t0.elapsed().as_micros() as u64);
        }
        t.end_us = now_us();
        if v["result"] == "OK" {
            t.accepted += 1;
        } else {
            t.refused += 1;
            if t.errors.len() < 3 {
                t.errors.push(format!("Fail ack: {text}"));
            }
        }
    }
    Ok(())
}

/// Produces tasks 0..n to `topic`, `batch` per message, after a warm-up task has reached the
/// sink (so the server has joined the group); `start_us` is the first task message.
#[cfg(feature = "kafka")]
fn submit_kafka(
    plan: &Plan,
    sink: &SinkState,
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Submitted, String> {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .map_err(|e| format!("producer: {e}"))?;
    let send = |key: &str, body: &str| {
        let mut rec = BaseRecord::to(topic).key(key).payload(body);
        loop {
            match p.send(rec) {
                Ok(()) => return,
                Err((_, back)) => {
                    rec = back;
                    p.poll(Duration::from_millis(5));
                }
            }
        }
    };
    let warm = format!(
        r#"{{"id":"{}-warm","method":"GET","name":"{}","params":""}}"#,
        plan.tag,
        plan.url.replace("/t", "/warm")
    );
    send("warm", &warm);
    p.flush(timeout)
        .map_err(|e| format!("warm-up message: {e}"))?;
    let end = Instant::now() + timeout;
    while sink.warm.load(Relaxed) == 0 {
        if Instant::now() > end {
            return Err(format!(
                "the warm-up task did not reach the sink within {timeout:?}"
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
    let mut s = Submitted {
        start_us: now_us(),
        ..Submitted::default()
    };
    let mut body = String::with_capacity(plan.batch.max(1) * 160);
    let mut i = 0;
    while i < plan.n {
        let k = plan.batch.max(1).min(plan.n - i);
        frame(&mut body, plan, i, k);
        send(&i.to_string(), &body);
        i += k;
    }
    match p.flush(timeout) {
        Ok(()) => s.accepted = plan.n,
        Err(e) => {
            s.refused = plan.n;
            s.errors
                .push(format!("messages not delivered to the broker: {e}"));
        }
    }
    s.end_us = now_us();
    Ok(s)
}

/// The value at quantile `q` of sorted `v`.
fn quantile<T: Copy + Default>(v: &[T], q: f64) -> T {
    if v.is_empty() {
        return T::default();
    }
    let k = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[k - 1]
}

fn report_submitted(s: &mut Submitted) -> f64 {
    let secs = (s.end_us.saturating_sub(s.start_us)).max(1) as f64 / 1e6;
    s.rtt_us.sort_unstable();
    println!("accepted {}", s.accepted);
    println!("refused {}", s.refused);
    println!("submit_s {secs:.3}");
    println!("submits_per_s {:.0}", s.accepted as f64 / secs);
    println!("requests {}", s.rtt_us.len());
    println!(
        "ack_rtt_p50_ms {:.2}",
        quantile(&s.rtt_us, 0.5) as f64 / 1e3
    );
    println!(
        "ack_rtt_p99_ms {:.2}",
        quantile(&s.rtt_us, 0.99) as f64 / 1e3
    );
    println!(
        "ack_rtt_p999_ms {:.2}",
        quantile(&s.rtt_us, 0.999) as f64 / 1e3
    );
    let total_ms = s.rtt_us.iter().sum::<u64>() as f64 / 1e3;
    println!(
        "ack_rtt_mean_ms {:.2}",
        total_ms / s.rtt_us.len().max(1) as f64
    );
    println!(
        "ack_rtt_max_ms {:.2}",
        s.rtt_us.last().copied().unwrap_or(0) as f64 / 1e3
    );
    for e in &s.errors {
        eprintln!("error: {e}");
    }
    secs
}

/// How the tasks reach the server.
enum Via {
    Http,
    Ws,
    #[cfg(feature = "kafka")]
    Kafka,
}

/// `immediate`, `delayed`, `ws` and `kafka`: submit to a sink, wait for every accepted task,
/// report.
fn run_to_sink(o: &Opts, delayed: bool, via: Via) -> Result<bool, String> {
    let n: usize = o.get("-n", if delayed { 2000 } else { 20000 })?;
    let delay_s: u64 = if delayed { o.get("--delay", 3)? } else { 0 };
    let timeout_s: u64 = o.get("--timeout", if delayed { 60 } else { 120 })?;
    let (port, sink) = start_sink(n).map_err(|e| format!("sink: {e}"))?;
    let plan = Plan {
        server: o.server()?,
        n,
        conns: o.get("-c", 8)?,
        batch: o.get("--batch", 1)?,
        delay_s,
        url: format!("http://127.0.0.1:{port}/t"),
        rate: o.get("--rate", 0.0)?,
        tag: format!(
            "{}-{}-{}",
            if delayed { "d" } else { "i" },
            std::process::id(),
            now_us() % 1_000_000_000
        ),
    };
    let timeout = Duration::from_secs(timeout_s);
    let measure_lag = o.get::<u64>("--lag", 1)? != 0;
    // The outcome lag is taken the moment the last task arrives, whatever the client is doing
    // then (a WebSocket client is still reading its result frames). The Kafka warm-up task is
    // one more outcome.
    let outcomes = match via {
        #[cfg(feature = "kafka")]
        Via::Kafka => n + 1,
        _ => n,
    };
    let watcher = {
        let (sink, server) = (sink.clone(), plan.server.clone());
        let limit = Instant::now() + timeout * 2 + Duration::from_secs(delay_s);
        thread::spawn(move || {
            while (sink.unique.load(Relaxed) as usize) < n {
                if Instant::now() > limit {
                    return None;
                }
                thread::sleep(Duration::from_millis(1));
            }
            if !measure_lag {
                return None;
            }
            outcome_lag(&server, outcomes, sink.last_us.load(Relaxed))
        })
    };
    let mut s = match via {
        Via::Http => submit_all(&plan, timeout),
        Via::Ws => submit_ws(&plan, timeout, o.get("--inflight", 200)?),
        #[cfg(feature = "kafka")]
        Via::Kafka => {
            let brokers: String = o.get("--brokers", String::new())?;
            let topic: String = o.get("--topic", String::new())?;
            if brokers.is_empty() || topic.is_empty() {
                return Err("--brokers and --topic are required".into());
            }
            submit_kafka(&plan, &sink, &brokers, &topic, timeout)?
        }
    };
    report_submitted(&mut s);
    let deadline = Instant::now() + Duration::from_secs(timeout_s) + Duration::from_secs(delay_s);
    while (sink.unique.load(Relaxed) as usize) < s.accepted && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(2));
    }
    let lag = if sink.unique.load(Relaxed) as usize >= n {
        watcher.join().ok().flatten()
    } else {
        None
    };
    // A short grace to catch duplicates that would follow the last arrival.
    thread::sleep(Duration::from_millis(50));
    let executed = sink.unique.load(Relaxed) as usize;
    let exec_s = sink.last_us.load(Relaxed).saturating_sub(s.start_us).max(1) as f64 / 1e6;
    let mut lat: Vec<i64> = (0..n)
        .filter_map(|i| {
            let a = sink.arrival[i].load(Relaxed);
            (a != 0).then(|| a as i64 - sink.due[i].load(Relaxed) as i64)
        })
        .collect();
    lat.sort_unstable();
    let early = lat.iter().filter(|&&l| l < 0).count();
    let missing = s.accepted.saturating_sub(executed);
    let (dups, strays) = (sink.dups.load(Relaxed), sink.strays.load(Relaxed));
    println!("executed {executed}");
    println!("missing {missing}");
    println!("duplicates {dups}");
    println!("strays {strays}");
    println!("exec_s {exec_s:.3}");
    println!("executed_per_s {:.0}", executed as f64 / exec_s);
    println!("lateness_p50_ms {:.2}", quantile(&lat, 0.5) as f64 / 1e3);
    println!("lateness_p99_ms {:.2}", quantile(&lat, 0.99) as f64 / 1e3);
    println!(
        "lateness_max_ms {:.2}",
        lat.last().copied().unwrap_or(0) as f64 / 1e3
    );
    println!(
        "lateness_min_ms {:.2}",
        lat.first().copied().unwrap_or(0) as f64 / 1e3
    );
    println!("early {early}");
    if let Some((pct, drain_ms)) = lag {
        println!("recorded_at_last_hit_pct {pct:.1}");
        println!("outcome_drain_ms {drain_ms:.1}");
    }
    if !s.results.is_empty() {
        // A result frame is pushed once the outcome is durable: its arrival minus the task's
        // arrival at the sink bounds each task's outcome lag from above.
        let mut lags: Vec<i64> = s
            .results
            .iter()
            .filter_map(|&(i, at)| {
                let hit = sink.arrival.get(i)?.load(Relaxed);
                (hit != 0).then(|| at as i64 - hit as i64)
            })
            .collect();
        lags.sort_unstable();
        println!(
            "outcome_lag_p50_ms {:.2}",
            quantile(&lags, 0.5) as f64 / 1e3
        );
        println!(
            "outcome_lag_p99_ms {:.2}",
            quantile(&lags, 0.99) as f64 / 1e3
        );
        println!(
            "outcome_lag_max_ms {:.2}",
            lags.last().copied().unwrap_or(0) as f64 / 1e3
        );
    }
    let mut ok = true;
    let mut bad = |what: String| {
        eprintln!("error: {what}");
        ok = false;
    };
    if s.refused > 0 {
        bad(format!("{} of {n} tasks refused", s.refused));
    }
    if missing > 0 {
        bad(format!(
            "{missing} accepted tasks never reached the sink within {timeout_s} s"
        ));
    }
    if dups > 0 {
        bad(format!("{dups} tasks reached the sink twice"));
    }
    if strays > 0 {
        bad(format!("{strays} sink hits without a known task index"));
    }
    if early > 0 {
        bad(format!("{early} delayed tasks ran before their due time"));
    }
    Ok(ok)
}

/// Outcome lag: the share of `n` finished tasks whose outcome the server had recorded (its
/// `/sys_info` counts: succeeded + dead, counted once the outcome is durable) when the last one
/// reached the sink at `last_us`, and the ms from that arrival until all were recorded. A crash
/// in between runs the unrecorded ones again.
fn outcome_lag(server: &str, n: usize, last_us: u64) -> Option<(f64, f64)> {
    let mut c = Client::new(server, Duration::from_secs(5));
    let mut recorded = || -> Option<u64> {
        let (code, body) = c.call("GET", "/sys_info", b"").ok()?;
        let v: serde_json::Value = serde_json::from_slice(&body).ok().filter(|_| code == 200)?;
        Some(v["counts"]["succeeded"].as_u64()? + v["counts"]["dead"].as_u64()?)
    };
    let first = recorded()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut now = first;
    while (now as usize) < n && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
        now = recorded()?;
    }
    let drain_ms = now_us().saturating_sub(last_us) as f64 / 1e3;
    Some((first as f64 * 100.0 / n.max(1) as f64, drain_ms))
}

fn fill(o: &Opts) -> Result<bool, String> {
    let plan = Plan {
        server: o.server()?,
        n: o.get("-n", 1_000_000)?,
        conns: o.get("-c", 8)?,
        batch: o.get("--batch", 500)?,
        delay_s: o.get("--delay", 3600)?,
        // Nothing listens on the discard port; the tasks are not due during the run.
        url: "http://127.0.0.1:9/never".into(),
        tag: format!("f-{}-{}", std::process::id(), now_us() % 1_000_000_000),
        rate: 0.0,
    };
    let mut s = submit_all(&plan, Duration::from_secs(o.get("--timeout", 120)?));
    report_submitted(&mut s);
    if s.refused > 0 {
        eprintln!("error: {} of {} tasks refused", s.refused, plan.n);
        return Ok(false);
    }
    Ok(true)
}

fn ready(o: &Opts) -> Result<bool, String> {
    let server = o.server()?;
    let since_us = match o.get::<u64>("--since-ns", 0)? {
        0 => now_us(),
        ns => ns / 1000,
    };
    let expect: u64 = o.get("--expect", 0)?;
    let timeout = Duration::from_secs(o.get("--timeout", 60)?);
    let pid: u32 = o.get("--pid", 0)?;
    let deadline = Instant::now() + timeout;
    let ms = || now_us().saturating_sub(since_us) as f64 / 1e3;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            eprintln!("error: /health did not answer 200 within {timeout:?}");
            return Ok(false);
        }
        if pid != 0 && !alive(pid) {
            eprintln!("error: the server (pid {pid}) exited before /health answered");
            return Ok(false);
        }
        let mut c = Client::new(&server, left.min(Duration::from_secs(1)));
        match c.call("GET", "/health", b"") {
            Ok((200, _)) => break,
            _ => thread::sleep(Duration::from_millis(1)),
        }
    }
    println!("health_ms {:.1}", ms());
    let mut c = Client::new(&server, timeout);
    let mut last = 0;
    loop {
        if let Ok((200, body)) = c.call("GET", "/sys_info", b"") {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            last = v["delaying_total"].as_u64().unwrap_or(0);
            if last >= expect {
                break;
            }
        }
        if Instant::now() > deadline {
            eprintln!(
                "error: /sys_info shows {last} delayed tasks, not {expect}, after {timeout:?}"
            );
            println!("delaying_total {last}");
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(5));
    }
    println!("rearmed_ms {:.1}", ms());
    println!("delaying_total {last}");
    Ok(true)
}

/// True while process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn fsync(o: &Opts) -> Result<bool, String> {
    let dir: String = o.get("--dir", ".".to_string())?;
    let n: usize = o.get("--n", 200)?;
    let path = std::path::Path::new(&dir).join(format!(".fsync-probe-{}", std::process::id()));
    type Series = (Vec<u64>, u64);
    let res = (|| -> io::Result<(Series, Series, Option<Series>)> {
        let block = [0x5au8; 4096];
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        let timed = |step: &mut dyn FnMut() -> io::Result<()>| -> io::Result<Series> {
            let mut us = Vec::with_capacity(n);
            let cpu = thread_cpu_us();
            for _ in 0..n {
                let t = Instant::now();
                step()?;
                us.push(t.elapsed().as_micros() as u64);
            }
            us.sort_unstable();
            Ok((us, (thread_cpu_us() - cpu) / n.max(1) as u64))
        };
        let append = timed(&mut || {
            f.write_all(&block)?;
            f.sync_data()
        })?;
        let overwrite = timed(&mut || {
            f.write_all_at(&block, 0)?;
            f.sync_data()
        })?;
        // The same overwrite as one direct, synchronous write (the journal's way), where the
        // filesystem takes O_DIRECT: from 4 KiB-aligned memory.
        use std::os::unix::fs::OpenOptionsExt;
        let direct = match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(&path)
        {
            Ok(d) => {
                let mut mem = vec![0x5au8; 8192];
                let pad = mem.as_ptr().align_offset(4096).min(4096);
                let aligned = &mut mem[pad..pad + 4096];
                Some(timed(&mut || d.write_all_at(aligned, 0))?)
            }
            Err(_) => None,
        };
        Ok((append, overwrite, direct))
    })();
    let _ = std::fs::remove_file(&path);
    let (append, overwrite, direct) = res.map_err(|e| format!("fsync probe in {dir}: {e}"))?;
    let series = [
        ("append", Some(append)),
        ("overwrite", Some(overwrite)),
        ("direct", direct),
    ];
    for (name, s) in series {
        match s {
            Some((us, cpu)) => {
                println!("fsync_{name}_p50_us {}", quantile(&us, 0.5));
                println!("fsync_{name}_p99_us {}", quantile(&us, 0.99));
                println!("fsync_{name}_cpu_us {cpu}");
            }
            None => println!("fsync_{name}_p50_us refused"),
        }
    }
    Ok(true)
}

/// CPU time (user + system) of the calling thread so far, µs.
fn thread_cpu_us() -> u64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; zeroed is a valid rusage if it fails.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr());
        ru.assume_init()
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// The machine's price of the exchange every task of these benchmarks makes: `c` client
/// threads send `n` keep-alive HTTP requests in all over loopback TCP, each to a sink thread of
/// its own, and wait for each answer; CPU per exchange on each side. With one pair each side
/// sleeps while the other works; with as many pairs as cores they rarely do.
fn exchange(o: &Opts) -> Result<bool, String> {
    let n: usize = o.get("-n", 40_000)?;
    let c: usize = o.get("-c", 1)?.max(1);
    let per = n / c;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| format!("addr: {e}"))?;
    let sinks = thread::spawn(move || {
        let mut handles = Vec::new();
        for _ in 0..c {
            let Ok((mut s, _)) = listener.accept() else {
                break;
            };
            handles.push(thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let cpu = thread_cpu_us();
                let mut buf = [0u8; 4096];
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 || s.write_all(SINK_REPLY).is_err() {
                        break;
                    }
                }
                thread_cpu_us() - cpu
            }));
        }
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(0))
            .sum::<u64>()
    });
    let request =
        format!("GET /task?i=12345&due=0 HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: poulpe\r\n\r\n");
    let start = Instant::now();
    let clients: Vec<_> = (0..c)
        .map(|_| {
            let request = request.clone();
            thread::spawn(move || -> io::Result<u64> {
                let mut s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                let cpu = thread_cpu_us();
                let mut buf = [0u8; 4096];
                for _ in 0..per {
                    s.write_all(request.as_bytes())?;
                    let mut got = 0;
                    while got < SINK_REPLY.len() {
                        match s.read(&mut buf)? {
                            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                            k => got += k,
                        }
                    }
                }
                Ok(thread_cpu_us() - cpu)
            })
        })
        .collect();
    let mut client_cpu = 0;
    for h in clients {
        client_cpu += h
            .join()
            .map_err(|_| "a client thread panicked".to_string())?
            .map_err(|e| format!("exchange: {e}"))?;
    }
    let secs = start.elapsed().as_secs_f64();
    let sink_cpu = sinks.join().map_err(|_| "the sink panicked".to_string())?;
    let done = (per * c) as f64;
    println!("exchanges_per_s {:.0}", done / secs);
    println!("client_cpu_us_per_exchange {:.1}", client_cpu as f64 / done);
    println!("sink_cpu_us_per_exchange {:.1}", sink_cpu as f64 / done);
    Ok(true)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!(
            "usage: bench port|fsync|exchange|immediate|delayed|ws|kafka|fill|ready [options] (see the source)"
        );
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let allowed: &[&str] = match cmd.as_str() {
        "port" => &[],
        "fsync" => &["--dir", "--n"],
        "exchange" => &["-n", "-c"],
        "immediate" => &[
            "--server",
            "-n",
            "-c",
            "--batch",
            "--timeout",
            "--rate",
            "--lag",
        ],
        "delayed" => &[
            "--server",
            "-n",
            "-c",
            "--batch",
            "--timeout",
            "--delay",
            "--rate",
        ],
        "ws" => &["--server", "-n", "-c", "--batch", "--timeout", "--inflight"],
        "kafka" => &[
            "--server",
            "-n",
            "--batch",
            "--timeout",
            "--brokers",
            "--topic",
        ],
        "fill" => &["--server", "-n", "-c", "--batch", "--timeout", "--delay"],
        "ready" => &["--server", "--since-ns", "--expect", "--timeout", "--pid"],
        other => {
            eprintln!("bench: unknown subcommand {other:?}");
            return ExitCode::from(2);
        }
    };
    let result = Opts::parse(rest, allowed).and_then(|o| match cmd.as_str() {
        "port" => TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| {
                println!("{}", a.port());
                true
            })
            .map_err(|e| format!("port: {e}")),
        "fsync" => fsync(&o),
        "exchange" => exchange(&o),
        "immediate" => run_to_sink(&o, false, Via::Http),
        "delayed" => run_to_sink(&o, true, Via::Http),
        "ws" => run_to_sink(&o, false, Via::Ws),
        #[cfg(feature = "kafka")]
        "kafka" => run_to_sink(&o, false, Via::Kafka),
        #[cfg(not(feature = "kafka"))]
        "kafka" => Err("this bench tool was built without the kafka feature".into()),
        "fill" => fill(&o),
        _ => ready(&o),
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bench {cmd}: {e}");
            ExitCode::from(2)
        }
    }
}
