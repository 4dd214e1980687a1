//! The loop thread: every connection that is not on a thread of its own waits here, in one
//! epoll set. Each wake-up reads what arrived, takes at most one whole request per connection,
//! has the handler answer the quick ones together ([`Handler::handle_quick`]: their submits
//! are made durable in one write), and writes the answers without blocking. A request that may
//! wait, or one the loop does not read itself (chunked, `Expect`, malformed, late), goes with
//! its connection and its unread bytes to a thread ([`super::conn`]), which serves that
//! connection from then on.

use super::conn::{framing, parse_head, Framing, RequestError};
use super::message::{Request, Response};
use super::server::Job;
use super::{Handler, Limits, Quick, HEAD_DEADLINE, MAX_HEADER_BYTES, MAX_REQUEST_LINE};
use parking_lot::Mutex;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often deadlines are checked, at least.
const TICK: Duration = Duration::from_millis(250);
/// Most events taken per wake-up.
const EVENTS: usize = 256;
/// Bytes asked of a socket per read.
const READ_CHUNK: usize = 64 * 1024;

/// What the loop is interested in for a connection.
const READ: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
const WRITE: u32 = libc::EPOLLOUT as u32;
/// The peer is gone or the socket broke.
const HANGUP: u32 = (libc::EPOLLHUP | libc::EPOLLERR) as u32;

/// Where a connection goes when it leaves the loop for a thread of its own.
pub(super) type Hand = Box<dyn Fn(Job) + Send>;
/// Where a connection goes to be closed after its last answer (read and dropped for a while,
/// so that the close does not reset it before the client has read the answer).
pub(super) type Linger = Box<dyn Fn(TcpStream) + Send>;

/// The accept thread's side: hands new connections to the loop.
pub(super) struct Inbox {
    ep: Arc<OwnedFd>,
    arrivals: Arc<Mutex<Arrivals>>,
}

struct Arrivals {
    jobs: Vec<Job>,
    /// The loop has ended: connections go to threads.
    closed: bool,
}

impl Inbox {
    /// Gives `job` to the loop; gives it back when the loop cannot take it.
    pub(super) fn add(&self, job: Job) -> Option<Job> {
        let mut a = self.arrivals.lock();
        if a.closed || job.stream.set_nonblocking(true).is_err() {
            return Some(job);
        }
        let fd = job.stream.as_raw_fd();
        // A job given back goes to a thread, whose `Conn::resume` makes its reads blocking.
        if ctl(&self.ep, libc::EPOLL_CTL_ADD, fd, READ).is_err() {
            return Some(job);
        }
        a.jobs.push(job);
        None
    }
}

/// Starts the loop thread; `hand` takes the connections that leave it for a thread, `linger`
/// those closed after their last answer. The loop ends once `stop` is set and no connection
/// is left in it.
pub(super) fn start(
    handler: Arc<dyn Handler>,
    limits: Limits,
    stop: Arc<AtomicBool>,
    hand: Hand,
    linger: Linger,
) -> std::io::Result<Inbox> {
    // SAFETY: epoll_create1 with a valid flag; the descriptor is owned from here on.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let ep = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
    let arrivals = Arc::new(Mutex::new(Arrivals {
        jobs: Vec::new(),
        closed: false,
    }));
    let mut lp = Loop {
        ep: ep.clone(),
        arrivals: arrivals.clone(),
        conns: Conns::default(),
        handler,
        limits,
        stop,
        hand,
        linger,
        scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
    };
    std::thread::Builder::new()
        .name("http-loop".into())
        .spawn(move || lp.run())?;
    Ok(Inbox { ep, arrivals })
}

fn ctl(ep: &OwnedFd, op: libc::c_int, fd: RawFd, events: u32) -> std::io::Result<()> {
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    // SAFETY: epoll_ctl on the loop's epoll descriptor with a valid event structure.
    let rc = unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd, &mut ev) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One connection in the loop.
struct Entry {
    job: Job,
    /// Where the unused bytes of `job.buf` begin.
    pos: usize,
    /// Answer bytes not written yet, from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    /// When the head now arriving began (its first byte here).
    head_since: Option<Instant>,
    /// When the head of the request whose body is arriving was complete.
    body_since: Option<Instant>,
    /// When bytes last came in or went out.
    active: Instant,
    /// Close once the answer is written.
    close_after: bool,
    /// The client will send nothing more.
    eof: bool,
    /// What the epoll set watches for it now.
    interest: u32,
}

impl Entry {
    fn buffered(&self) -> usize {
        self.job.buf.len() - self.pos
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos >= self.job.buf.len() {
            self.job.buf.clear();
            self.pos = 0;
        }
    }
}

/// The connections in the loop, by descriptor (descriptors are small numbers, reused).
#[derive(Default)]
struct Conns {
    slots: Vec<Option<Entry>>,
    len: usize,
}

impl Conns {
    fn get(&self, fd: RawFd) -> Option<&Entry> {
        self.slots.get(usize::try_from(fd).ok()?)?.as_ref()
    }

    fn get_mut(&mut self, fd: RawFd) -> Option<&mut Entry> {
        self.slots.get_mut(usize::try_from(fd).ok()?)?.as_mut()
    }

    fn insert(&mut self, fd: RawFd, e: Entry) {
        let Ok(i) = usize::try_from(fd) else {
            return;
        };
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        if self.slots[i].replace(e).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, fd: RawFd) -> Option<Entry> {
        let e = self.slots.get_mut(usize::try_from(fd).ok()?)?.take()?;
        self.len -= 1;
        Some(e)
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn iter(&self) -> impl Iterator<Item = (RawFd, &Entry)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Some((i as RawFd, e.as_ref()?)))
    }
}

/// What the buffered bytes of a connection hold.
enum Parsed {
    /// Not a whole request yet.
    Partial,
    Whole(Request),
    /// A request the loop does not read itself: its thread will, from the same bytes.
    Unusual,
    Fail(RequestError),
}

/// How an answer is written, from its request.
#[derive(Clone, Copy)]
struct Manner {
    head_only: bool,
    keep: bool,
    v10: bool,
}

struct Loop {
    ep: Arc<OwnedFd>,
    arrivals: Arc<Mutex<Arrivals>>,
    conns: Conns,
    handler: Arc<dyn Handler>,
    limits: Limits,
    stop: Arc<AtomicBool>,
    hand: Hand,
    linger: Linger,
    scratch: Box<[u8]>,
}

/// A loop that ends (stopped, or a panic of its own code) lets later connections go to
/// threads, and the ones just handed to it.
impl Drop for Loop {
    fn drop(&mut self) {
        let jobs = {
            let mut a = self.arrivals.lock();
            a.closed = true;
            std::mem::take(&mut a.jobs)
        };
        for job in jobs {
            (self.hand)(job);
        }
    }
}

impl Loop {
    fn run(&mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        // Connections that answered a request and hold more bytes: looked at again at once.
        let mut again: Vec<RawFd> = Vec::new();
        let mut touched: Vec<RawFd> = Vec::new();
        let mut last_tick = Instant::now();
        loop {
            let timeout = if again.is_empty() {
                TICK.as_millis() as libc::c_int
            } else {
                0
            };
            // SAFETY: `events` holds EVENTS entries for the kernel to fill.
            let n = unsafe {
                libc::epoll_wait(
                    self.ep.as_raw_fd(),
                    events.as_mut_ptr(),
                    EVENTS as libc::c_int,
                    timeout,
                )
            };
            self.take_arrivals();
            let now = Instant::now();
            touched.clear();
            touched.append(&mut again);
            // epoll names a connection once per wake-up; only those looked at again may repeat.
            let repeats = touched.len();
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    log::error!("http: epoll_wait: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            for ev in events.iter().take(n.max(0) as usize) {
                let (flags, fd) = (ev.events, ev.u64 as RawFd);
                if self.conns.get(fd).is_none() {
                    continue;
                }
                if flags & WRITE != 0 {
                    self.flush(fd, now);
                }
                if flags & !WRITE != 0 {
                    self.read_in(fd, now);
                }
                if flags & HANGUP != 0 {
                    // Nothing more will come (reported even while reads are not watched).
                    if let Some(e) = self.conns.get_mut(fd) {
                        e.eof = true;
                    }
                }
                if !touched[..repeats].contains(&fd) {
                    touched.push(fd);
                }
            }
            self.serve_round(&touched, &mut again, now);
            if now.duration_since(last_tick) >= TICK {
                last_tick = now;
                self.expire(now);
                // Connections handed over meanwhile go to threads (`Drop`).
                if self.stop.load(Ordering::Acquire) && self.conns.is_empty() {
                    return;
                }
            }
        }
    }

    fn take_arrivals(&mut self) {
        let jobs = std::mem::take(&mut self.arrivals.lock().jobs);
        let now = Instant::now();
        for job in jobs {
            let fd = job.stream.as_raw_fd();
            self.conns.insert(
                fd,
                Entry {
                    job,
                    pos: 0,
                    out: Vec::new(),
                    out_pos: 0,
                    head_since: None,
                    body_since: None,
                    active: now,
                    close_after: false,
                    eof: false,
                    interest: READ,
                },
            );
        }
    }

    /// One request from each connection in `touched`, the quick ones answered together.
    fn serve_round(&mut self, touched: &[RawFd], again: &mut Vec<RawFd>, now: Instant) {
        let mut fds: Vec<(RawFd, Manner)> = Vec::new();
        let mut reqs: Vec<Request> = Vec::new();
        for &fd in touched {
            let Some(e) = self.conns.get_mut(fd) else {
                continue;
            };
            if e.out_pos < e.out.len() {
                continue;
            }
            if e.buffered() == 0 {
                if e.eof {
                    self.close(fd);
                } else {
                    self.watch(fd);
                }
                continue;
            }
            match parse(e, &self.limits, now) {
                Parsed::Partial => {
                    if e.eof {
                        self.close(fd);
                    } else {
                        self.watch(fd);
                    }
                }
                Parsed::Whole(req) => {
                    let keep = req.keep_alive();
                    fds.push((
                        fd,
                        Manner {
                            head_only: req.method == "HEAD",
                            keep,
                            v10: req.version == 0,
                        },
                    ));
                    reqs.push(req);
                }
                Parsed::Unusual => self.hand_off(fd, None),
                Parsed::Fail(e) => self.hand_off(fd, Some(Err(e))),
            }
        }
        if reqs.is_empty() {
            return;
        }
        // A panic in the handler costs this round's connections, not the loop.
        let handler = &self.handler;
        let answers =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.handle_quick(reqs)))
                .unwrap_or_else(|_| {
                    log::error!(
                        "http: the handler panicked; closing the connections of its requests"
                    );
                    Vec::new()
                });
        if answers.len() != fds.len() {
            log::error!(
                "http: {} answers for {} requests; their connections are closed",
                answers.len(),
                fds.len()
            );
            for (fd, _) in fds {
                self.close(fd);
            }
            return;
        }
        for ((fd, manner), quick) in fds.into_iter().zip(answers) {
            match quick {
                Quick::Answered(resp) => {
                    self.answer(fd, manner, &resp, now);
                    if let Some(e) = self.conns.get(fd) {
                        if e.out_pos == e.out.len() && e.buffered() > 0 {
                            again.push(fd);
                        }
                    }
                }
                Quick::Slow(req) => self.hand_off(fd, Some(Ok(req))),
            }
        }
    }

    /// Reads what the socket holds (up to a whole request's worth beyond what is buffered).
    fn read_in(&mut self, fd: RawFd, now: Instant) {
        let cap = self.cap();
        let Some(e) = self.conns.get_mut(fd) else {
            return;
        };
        let mut broken = false;
        while !e.eof && e.buffered() < cap {
            match e.job.stream.read(&mut self.scratch) {
                Ok(0) => e.eof = true,
                Ok(n) => {
                    if e.pos > 0 && e.pos >= e.job.buf.len() / 2 {
                        e.job.buf.drain(..e.pos);
                        e.pos = 0;
                    }
                    if e.buffered() == 0 && e.head_since.is_none() {
                        e.head_since = Some(now);
                    }
                    e.job
                        .buf
                        .extend_from_slice(self.scratch.get(..n).unwrap_or_default());
                    e.active = now;
                    if n < self.scratch.len() {
                        break;
                    }
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if broken {
            self.close(fd);
        }
    }

    /// Most bytes buffered for a connection: its next request, whole, fits.
    fn cap(&self) -> usize {
        self.limits.max_body + MAX_REQUEST_LINE + MAX_HEADER_BYTES + 1024
    }

    /// Queues the answer and writes what the socket takes.
    fn answer(&mut self, fd: RawFd, m: Manner, resp: &Response, now: Instant) {
        let Some(e) = self.conns.get_mut(fd) else {
            return;
        };
        crate::metrics::answered(resp.code);
        let close = !m.keep || resp.close;
        resp.encode_into(&mut e.out, m.head_only, close, m.v10 && !close);
        e.close_after |= close;
        e.active = now;
        self.flush(fd, now);
    }

    /// Writes pending answer bytes; once all are written, closes the connection if its last
    /// answer said so, or watches it for the next request.
    fn flush(&mut self, fd: RawFd, now: Instant) {
        let Some(e) = self.conns.get_mut(fd) else {
            return;
        };
        while e.out_pos < e.out.len() {
            match e.job.stream.write(&e.out[e.out_pos..]) {
                Ok(0) => return self.close(fd),
                Ok(n) => {
                    e.out_pos += n;
                    e.active = now;
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.close(fd),
            }
        }
        if e.out_pos == e.out.len() {
            e.out.clear();
            e.out_pos = 0;
            if e.close_after {
                if let Some(e) = self.remove(fd) {
                    (self.linger)(e.job.stream);
                }
                return;
            }
            if e.eof && e.buffered() == 0 {
                // The client sends nothing more and has all its answers.
                return self.close(fd);
            }
        }
        self.watch(fd);
    }

    /// Sets what the epoll set watches for `fd` from its state: writing while an answer is
    /// pending, reading while a request may come and there is room for it.
    fn watch(&mut self, fd: RawFd) {
        let cap = self.cap();
        let Some(e) = self.conns.get_mut(fd) else {
            return;
        };
        let want = if e.out_pos < e.out.len() {
            WRITE
        } else if e.eof || e.buffered() >= cap {
            0
        } else {
            READ
        };
        if want != e.interest {
            if ctl(&self.ep, libc::EPOLL_CTL_MOD, fd, want).is_err() {
                return self.close(fd);
            }
            e.interest = want;
        }
    }

    /// Out of the loop and of the epoll set.
    fn remove(&mut self, fd: RawFd) -> Option<Entry> {
        let e = self.conns.remove(fd)?;
        let _ = ctl(&self.ep, libc::EPOLL_CTL_DEL, fd, 0);
        Some(e)
    }

    fn close(&mut self, fd: RawFd) {
        drop(self.remove(fd));
    }

    /// Gives the connection, its unread bytes and what to do first to a thread of its own.
    fn hand_off(&mut self, fd: RawFd, first: Option<Result<Request, RequestError>>) {
        let Some(mut e) = self.remove(fd) else {
            return;
        };
        e.job.buf.drain(..e.pos);
        e.job.first = first;
        (self.hand)(e.job);
    }

    /// Closes connections idle too long, and hands those late with a request to a thread
    /// that answers 408.
    fn expire(&mut self, now: Instant) {
        let idle = self.limits.idle;
        let mut late: Vec<(RawFd, Option<RequestError>)> = Vec::new();
        for (fd, e) in self.conns.iter() {
            if e.out_pos < e.out.len() || e.buffered() == 0 {
                if now.duration_since(e.active) >= idle {
                    late.push((fd, None));
                }
            } else if let Some(t) = e.body_since {
                if now.duration_since(t) >= idle {
                    late.push((fd, Some(RequestError::BodyTimeout)));
                }
            } else if let Some(t) = e.head_since {
                if now.duration_since(t) >= HEAD_DEADLINE {
                    late.push((fd, Some(RequestError::HeadTimeout)));
                }
            }
        }
        for (fd, why) in late {
            match why {
                None => self.close(fd),
                Some(e) => self.hand_off(fd, Some(Err(e))),
            }
        }
    }
}

/// Takes the next request off the connection's buffer if it is whole and plain: a body
/// delimited by `Content-Length` (or none), no `Expect`.
fn parse(e: &mut Entry, limits: &Limits, now: Instant) -> Parsed {
    let data = &e.job.buf[e.pos..];
    let (mut req, used) = match parse_head(data) {
        Err(err) => return Parsed::Fail(err),
        Ok(None) => return Parsed::Partial,
        Ok(Some(head)) => head,
    };
    let len = match framing(&req) {
        Err(err) => return Parsed::Fail(err),
        Ok(Some(Framing::Chunked)) => return Parsed::Unusual,
        Ok(_) if req.header("expect").is_some() => return Parsed::Unusual,
        Ok(None) => 0,
        Ok(Some(Framing::Length(n))) if n > limits.max_body => {
            return Parsed::Fail(RequestError::TooLarge(limits.max_body))
        }
        Ok(Some(Framing::Length(n))) => n,
    };
    if data.len() - used < len {
        e.body_since.get_or_insert(now);
        return Parsed::Partial;
    }
    if len > 0 {
        req.body = data[used..used + len].to_vec();
    }
    e.consume(used + len);
    e.body_since = None;
    e.head_since = (e.buffered() > 0).then_some(now);
    Parsed::Whole(req)
}

#[cfg(test)]
mod tests {
    use super::super::{listen, Reply};
    use super::*;
    use crossbeam_channel::{bounded, Receiver, Sender};
    use std::net::SocketAddr;

    /// Answers `/slow` on a thread once the test lets it go, everything else on the loop
    /// thread with its path and body; notes the size of every batch the loop hands it, and can
    /// hold the first batch until the test lets it go.
    struct Echo {
        batches: Mutex<Vec<usize>>,
        hold_first: Mutex<Option<Receiver<()>>>,
        slow_gate: Receiver<()>,
    }

    fn echo(r: &Request) -> Response {
        Response::text(
            200,
            format!("{} {}", r.path(), String::from_utf8_lossy(&r.body)),
        )
    }

    impl Handler for Echo {
        fn handle(&self, req: Request) -> Reply {
            if req.path() == "/slow" {
                let _ = self.slow_gate.recv_timeout(Duration::from_secs(10));
            }
            echo(&req).into()
        }

        fn handle_quick(&self, reqs: Vec<Request>) -> Vec<Quick> {
            self.batches.lock().push(reqs.len());
            assert!(reqs.iter().all(|r| r.path() != "/panic"), "asked to panic");
            if let Some(hold) = self.hold_first.lock().take() {
                let _ = hold.recv_timeout(Duration::from_secs(10));
            }
            reqs.into_iter()
                .map(|r| {
                    if r.path() == "/slow" {
                        Quick::Slow(r)
                    } else {
                        Quick::Answered(echo(&r))
                    }
                })
                .collect()
        }
    }

    struct Served {
        addr: SocketAddr,
        handler: Arc<Echo>,
        hold: Sender<()>,
        slow: Sender<()>,
    }

    fn served(hold_first: bool) -> Served {
        let (hold, hold_rx) = bounded(1);
        let (slow, slow_rx) = bounded(8);
        let handler = Arc::new(Echo {
            batches: Mutex::new(Vec::new()),
            hold_first: Mutex::new(hold_first.then_some(hold_rx)),
            slow_gate: slow_rx,
        });
        let l = listen("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let limits = Limits {
            max_body: 1024,
            idle: Duration::from_secs(30),
            max_conns: 64,
        };
        l.serve(limits, handler.clone()).expect("serve");
        let addr = l.local_addr().expect("addr");
        // The listener lives as long as the test process: its accept thread holds it.
        std::mem::forget(l);
        Served {
            addr,
            handler,
            hold,
            slow,
        }
    }

    fn post(path: &str, body: &str) -> String {
        format!(
            "POST {path} HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s
    }

    /// Reads `n` answers and gives their bodies.
    fn answers(s: &mut TcpStream, n: usize) -> Vec<String> {
        let mut buf: Vec<u8> = Vec::new();
        let mut bodies = Vec::new();
        let mut chunk = [0u8; 4096];
        while bodies.len() < n {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("content-length");
                if buf.len() >= end + 4 + len {
                    bodies.push(String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into());
                    buf.drain(..end + 4 + len);
                    continue;
                }
            }
            let k = s.read(&mut chunk).expect("read an answer");
            assert!(k > 0, "closed after {} answers: {bodies:?}", bodies.len());
            buf.extend_from_slice(&chunk[..k]);
        }
        bodies
    }

    #[test]
    fn requests_of_several_connections_are_handed_over_together_one_per_connection() {
        let s = served(true);
        let mut conns: Vec<TcpStream> = (0..4).map(|_| connect(s.addr)).collect();
        // The first request holds the loop in the handler while the others arrive.
        conns[0]
            .write_all(post("/a", "c0-0").as_bytes())
            .expect("write");
        std::thread::sleep(Duration::from_millis(100));
        for (i, c) in conns.iter_mut().enumerate().skip(1) {
            let pipelined: String = (0..3).map(|j| post("/a", &format!("c{i}-{j}"))).collect();
            c.write_all(pipelined.as_bytes()).expect("write");
        }
        std::thread::sleep(Duration::from_millis(100));
        s.hold.send(()).expect("let the first batch go");
        assert_eq!(answers(&mut conns[0], 1), vec!["/a c0-0"]);
        for (i, c) in conns.iter_mut().enumerate().skip(1) {
            let want: Vec<String> = (0..3).map(|j| format!("/a c{i}-{j}")).collect();
            assert_eq!(answers(c, 3), want, "in order on connection {i}");
        }
        let batches = s.handler.batches.lock().clone();
        assert_eq!(batches.iter().sum::<usize>(), 10, "{batches:?}");
        assert_eq!(batches[0], 1, "{batches:?}");
        assert_eq!(
            batches[1], 3,
            "the three waiting connections at once: {batches:?}"
        );
        assert!(
            batches.iter().all(|&n| n <= 3),
            "one request per connection per batch: {batches:?}"
        );
    }

    #[test]
    fn a_panic_of_the_handler_closes_its_connections_and_the_loop_goes_on() {
        let s = served(false);
        let mut a = connect(s.addr);
        a.write_all(post("/panic", "").as_bytes()).expect("write");
        let mut rest = Vec::new();
        a.read_to_end(&mut rest).expect("read to the close");
        assert!(rest.is_empty(), "closed without an answer");
        let mut b = connect(s.addr);
        b.write_all(post("/a", "after").as_bytes()).expect("write");
        assert_eq!(answers(&mut b, 1), vec!["/a after"]);
    }

    #[test]
    fn a_slow_request_takes_its_connection_to_a_thread_and_stalls_no_one() {
        let s = served(false);
        let (mut a, mut b) = (connect(s.addr), connect(s.addr));
        let slow_then_quick = post("/slow", "1") + &post("/a", "after");
        a.write_all(slow_then_quick.as_bytes()).expect("write");
        std::thread::sleep(Duration::from_millis(100));
        b.write_all(post("/a", "b").as_bytes()).expect("write");
        assert_eq!(
            answers(&mut b, 1),
            vec!["/a b"],
            "answered while /slow waits"
        );
        s.slow.send(()).expect("let /slow go");
        assert_eq!(answers(&mut a, 2), vec!["/slow 1", "/a after"]);
        b.write_all(post("/a", "again").as_bytes()).expect("write");
        assert_eq!(answers(&mut b, 1), vec!["/a again"]);
    }

    #[test]
    fn a_request_in_pieces_is_answered_once_whole_and_a_half_closed_client_gets_its_answer() {
        let s = served(false);
        let mut c = connect(s.addr);
        let whole = post("/a", "0123456789");
        for piece in [&whole[..7], &whole[7..30], &whole[30..whole.len() - 4]] {
            c.write_all(piece.as_bytes()).expect("write");
            std::thread::sleep(Duration::from_millis(30));
        }
        c.write_all(&whole.as_bytes()[whole.len() - 4..])
            .expect("write");
        c.write_all(post("/a", "last").as_bytes()).expect("write");
        c.shutdown(std::net::Shutdown::Write).expect("half close");
        assert_eq!(answers(&mut c, 2), vec!["/a 0123456789", "/a last"]);
        let asked = Instant::now();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).expect("read to the close");
        assert!(rest.is_empty(), "nothing after the answers");
        // Closed once answered, not when the connection's idle time (30 s) runs out.
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "closed after {:?}",
            asked.elapsed()
        );
    }
}
