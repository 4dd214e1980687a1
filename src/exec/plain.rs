//! Plain `http://` attempts without ureq: it costs a worker some thirty allocations per
//! request (request and header-map types, URI, configuration copies, body reader layers),
//! and musl's allocator takes a lock for each. This client writes the request head into a
//! buffer its worker thread reuses, reads the answer with [`super::h1`] into another, and
//! keeps its worker's idle connections (at most [`MAX_IDLE`], keyed by host and port, none
//! older than [`MAX_IDLE_AGE`]); the output `Vec` is the one allocation per attempt. The
//! caller ([`super::http`]) sends through ureq whatever this one does not take: https, a
//! proxy from the environment, URLs it does not parse plainly, and the redirects it gets (the
//! first request is never sent again).

use super::h1::{self, Framing, H1Error, Head, Inbuf};
use super::resolve::CachingResolver;
use super::tcp::{keep_within, quiet};
use super::{answered, RunResult, TimedOut, MAX_OUTPUT};
use crate::task::{Method, Task};
use std::cell::RefCell;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use ureq::unversioned::resolver::Resolver;
use ureq::unversioned::transport::NextTimeout;

/// Time allowed to connect (within the attempt's own limit), as for the ureq agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle connection older than this is closed rather than reused (ureq's default).
const MAX_IDLE_AGE: Duration = Duration::from_secs(15);
/// Idle connections a worker keeps; with one attempt at a time per worker, that is at most one
/// per host each, like the agent's bounds (`workers` per host, `4 × workers` in all).
const MAX_IDLE: usize = 4;
/// A reused request buffer larger than this (a big POST body) is given back after the attempt.
const KEEP_BUFFER: usize = 64 * 1024;
const USER_AGENT: &str = concat!("poulpe/", env!("CARGO_PKG_VERSION"));

/// A worker's buffers and idle connections.
struct Ctx {
    inb: Inbuf,
    request: Vec<u8>,
    idle: Vec<Conn>,
}

thread_local! {
    static CTX: RefCell<Ctx> = const {
        RefCell::new(Ctx { inb: Inbuf::new(), request: Vec::new(), idle: Vec::new() })
    };
}

/// A kept-alive connection and the socket timeouts set on it now.
struct Conn {
    stream: TcpStream,
    host: Box<str>,
    port: u16,
    read: Option<Duration>,
    write: Option<Duration>,
    since: Instant,
}

/// Where a plain attempt goes: parts of the task's URL.
pub(crate) struct Target<'a> {
    authority: &'a str,
    host: &'a str,
    port: u16,
    /// The path and query, possibly empty.
    path: &'a str,
}

/// Bytes a request target may hold as they are (RFC 3986 unreserved, reserved and `%`); a URL
/// with any other goes through ureq, which reports it as it always has.
fn plain_bytes(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~:/?[]@!$&'()*+,;=%".contains(&b))
}

impl<'a> Target<'a> {
    /// The target of `task` when this client can take it: an `http://` URL without user info
    /// or fragment whose path, query and params need no encoding.
    pub(crate) fn of(task: &'a Task) -> Option<Target<'a>> {
        let rest = task.name.strip_prefix("http://")?;
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        // An IPv6 literal (`[::1]:80`) goes through ureq.
        let (host, port) = authority.split_once(':').unwrap_or((authority, "80"));
        let port = port.parse().ok()?;
        let params_ok = task.method == Method::Post || plain_bytes(&task.params);
        let plain =
            !host.is_empty() && !authority.contains(['@', '[']) && plain_bytes(path) && params_ok;
        plain.then_some(Target {
            authority,
            host,
            port,
            path,
        })
    }

    /// The URL a redirect's `Location` names, resolved against this target as RFC 3986 §5.2
    /// says: absolute or scheme-relative as it is, else a path (root-relative, or merged with
    /// the current path's directory, dot segments removed) or a query on this authority.
    pub(crate) fn join(&self, location: &str) -> String {
        let scheme = location.split_once("://").map(|(s, _)| s);
        if scheme.is_some_and(|s| !s.is_empty() && !s.contains(['/', '?'])) {
            return location.to_string();
        }
        if location.starts_with("//") {
            return format!("http:{location}");
        }
        // A fragment is not sent; the base's query is kept only by an empty reference.
        let location = location.split('#').next().unwrap_or_default();
        let (base, base_query) = match self.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (self.path, None),
        };
        let (path, query) = match location.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None if location.is_empty() => ("", base_query),
            None => (location, None),
        };
        let merged;
        let path = if path.starts_with('/') {
            path
        } else if path.is_empty() {
            base
        } else {
            let dir = base.rfind('/').map_or("/", |i| &base[..=i]);
            merged = format!("{dir}{path}");
            &merged
        };
        let mut url = format!("http://{}", self.authority);
        remove_dot_segments(&mut url, path);
        if let Some(q) = query {
            url.push('?');
            url.push_str(q);
        }
        url
    }
}

/// Appends `path` to `out` without its `.` and `..` segments (RFC 3986 §5.2.4); an empty
/// path is `/`.
fn remove_dot_segments(out: &mut String, path: &str) {
    let mut kept: Vec<&str> = Vec::new();
    let mut segments = path.strip_prefix('/').unwrap_or(path).split('/').peekable();
    while let Some(seg) = segments.next() {
        match seg {
            "." => {}
            ".." => {
                kept.pop();
            }
            s => kept.push(s),
        }
        if matches!(seg, "." | "..") && segments.peek().is_none() {
            kept.push("");
        }
    }
    for seg in kept.iter() {
        out.push('/');
        out.push_str(seg);
    }
    if kept.is_empty() {
        out.push('/');
    }
}

/// How a plain attempt ended.
pub(crate) enum Outcome {
    Done(RunResult),
    /// A redirect to follow (through ureq, as ureq would follow it) to this URL, within
    /// `deadline`.
    Redirect {
        url: String,
        deadline: Instant,
    },
}

/// The plain client (its buffers and pools are per worker thread, the name cache is
/// [`CachingResolver`]'s).
pub(crate) struct Plain;

/// Reads from a connection within the attempt's deadline.
struct Timed<'a> {
    conn: &'a mut Conn,
    deadline: Instant,
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = left(self.deadline).ok_or(ErrorKind::TimedOut)?;
        let stream = &self.conn.stream;
        keep_within(&mut self.conn.read, Some(left), |t| {
            stream.set_read_timeout(t)
        })?;
        (&self.conn.stream).read(buf)
    }
}

/// The time left before `deadline`, none once it has passed.
pub(crate) fn left(deadline: Instant) -> Option<Duration> {
    Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero())
}

/// Writes the request head (and a POST's body) for `task` into `out`, as ureq would: the
/// task's headers with lowercase names, `content-type: application/json` for a POST unless they
/// give one, `content-length`, and `user-agent` and `accept` unless they give them.
fn write_request(out: &mut Vec<u8>, target: &Target<'_>, task: &Task) {
    let post = task.method == Method::Post;
    out.clear();
    out.extend_from_slice(if post { b"POST " } else { b"GET " });
    if !target.path.starts_with('/') {
        out.push(b'/');
    }
    out.extend_from_slice(target.path.as_bytes());
    if !post && !task.params.is_empty() {
        out.push(if target.path.contains('?') {
            b'&'
        } else {
            b'?'
        });
        out.extend_from_slice(task.params.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(target.host.as_bytes());
    if target.port != 80 {
        out.push(b':');
        push_number(out, u64::from(target.port));
    }
    let (mut typed, mut agent, mut accept) = (false, false, false);
    for (k, v) in task.header_pairs() {
        typed |= k.eq_ignore_ascii_case("content-type");
        agent |= k.eq_ignore_ascii_case("user-agent");
        accept |= k.eq_ignore_ascii_case("accept");
        out.extend_from_slice(b"\r\n");
        out.extend(k.bytes().map(|b| b.to_ascii_lowercase()));
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
    }
    fn pick(on: bool, s: &str) -> &str {
        if on {
            s
        } else {
            ""
        }
    }
    for part in [
        pick(post && !typed, "\r\ncontent-type: application/json"),
        pick(post, "\r\ncontent-length: "),
    ] {
        out.extend_from_slice(part.as_bytes());
    }
    if post {
        push_number(out, task.params.len() as u64);
    }
    for part in [
        pick(!agent, "\r\nuser-agent: "),
        pick(!agent, USER_AGENT),
        pick(!accept, "\r\naccept: */*"),
        "\r\n\r\n",
        pick(post, &task.params),
    ] {
        out.extend_from_slice(part.as_bytes());
    }
}

/// Appends `n` in decimal.
fn push_number(out: &mut Vec<u8>, n: u64) {
    if n >= 10 {
        push_number(out, n / 10);
    }
    out.push(b'0' + (n % 10) as u8);
}

/// Takes a usable idle connection to `target`'s host and port (closing stale ones on the way).
fn take(idle: &mut Vec<Conn>, target: &Target<'_>) -> Option<Conn> {
    while let Some(i) = idle
        .iter()
        .rposition(|c| c.port == target.port && *c.host == *target.host)
    {
        let conn = idle.swap_remove(i);
        if conn.since.elapsed() < MAX_IDLE_AGE && quiet(&conn.stream) {
            return Some(conn);
        }
    }
    None
}

/// Keeps `conn` idle unless [`MAX_IDLE`] are (then it is closed).
fn put(idle: &mut Vec<Conn>, mut conn: Conn) {
    if idle.len() < MAX_IDLE {
        conn.since = Instant::now();
        idle.push(conn);
    }
}

/// Sends the request on `conn` and reads the final response's head.
fn send(
    conn: &mut Conn,
    inb: &mut Inbuf,
    request: &[u8],
    deadline: Instant,
) -> Result<Head, H1Error> {
    inb.clear();
    if let Err(e) = write_within(conn, request, deadline) {
        return Err(if h1::reset(&e) {
            H1Error::Closed
        } else {
            e.into()
        });
    }
    inb.read_head(&mut Timed { conn, deadline })
}

/// Writes all of `buf` before `deadline`: each write may block only for the time left (one
/// timeout set for the whole would let each partial write start it anew).
fn write_within(conn: &mut Conn, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        let left = left(deadline).ok_or(ErrorKind::TimedOut)?;
        let stream = &conn.stream;
        keep_within(&mut conn.write, Some(left), |t| stream.set_write_timeout(t))?;
        match (&conn.stream).write(buf) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Plain {
    /// One attempt to `target` within `timeout`; `None` when this thread's context is in use
    /// (never in practice: a worker runs one attempt at a time), so ureq takes it.
    pub(crate) fn attempt(
        &self,
        config: &ureq::config::Config,
        target: &Target<'_>,
        task: &Task,
        timeout: Duration,
    ) -> Option<Outcome> {
        CTX.with(|ctx| {
            let mut ctx = ctx.try_borrow_mut().ok()?;
            let Ctx { inb, request, idle } = &mut *ctx;
            let outcome = self.attempt_in(config, inb, request, idle, target, task, timeout);
            if request.capacity() > KEEP_BUFFER {
                *request = Vec::new();
            }
            Some(outcome)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn attempt_in(
        &self,
        config: &ureq::config::Config,
        inb: &mut Inbuf,
        request: &mut Vec<u8>,
        idle: &mut Vec<Conn>,
        target: &Target<'_>,
        task: &Task,
        timeout: Duration,
    ) -> Outcome {
        let failed = |e: H1Error| {
            Outcome::Done(match e {
                H1Error::Timeout => TimedOut(timeout).into(),
                e => RunResult::failed(format!("request failed: {e}")),
            })
        };
        let deadline = Instant::now() + timeout;
        write_request(request, target, task);
        let (mut conn, reused) = match take(idle, target) {
            Some(c) => (c, true),
            None => match self.connect(config, target, deadline) {
                Ok(c) => (c, false),
                Err(e) => return failed(e),
            },
        };
        let mut head = send(&mut conn, inb, request, deadline);
        if reused && matches!(head, Err(H1Error::Closed)) {
            // The server closed the kept-alive connection as we used it: once on a new one.
            conn = match self.connect(config, target, deadline) {
                Ok(c) => c,
                Err(e) => return failed(e),
            };
            head = send(&mut conn, inb, request, deadline);
        }
        let head = match head {
            Ok(h) => h,
            Err(e) => return failed(e),
        };
        let status = head.status;
        let mut body = match head.framing {
            Framing::Length(n) => Vec::with_capacity((n as usize).min(MAX_OUTPUT + 1)),
            _ => Vec::new(),
        };
        let mut src = Timed {
            conn: &mut conn,
            deadline,
        };
        let read = inb.read_body(&mut src, head.framing, &mut body, MAX_OUTPUT);
        if matches!(read, Ok(true)) && head.keep {
            put(idle, conn);
        }
        let follow = task.method == Method::Get || !matches!(status, 307 | 308);
        if let (Some(location), Ok(_), true) = (&head.location, &read, follow) {
            return Outcome::Redirect {
                url: target.join(location),
                deadline,
            };
        }
        let timed_out = TimedOut(timeout);
        Outcome::Done(answered(
            status,
            body,
            match &read {
                Err(H1Error::Timeout) => Some(&timed_out),
                Err(e) => Some(e),
                Ok(_) => None,
            },
        ))
    }

    /// A new connection to the first of `target`'s addresses that answers.
    fn connect(
        &self,
        config: &ureq::config::Config,
        target: &Target<'_>,
        deadline: Instant,
    ) -> Result<Conn, H1Error> {
        let first = left(deadline).ok_or(H1Error::Timeout)?;
        let uri = format!("http://{}:{}/", target.host, target.port)
            .parse()
            .map_err(|e: ureq::http::uri::InvalidUri| {
                H1Error::Resolve(ureq::http::Error::from(e).into())
            })?;
        let resolve = NextTimeout {
            after: first.into(),
            reason: ureq::Timeout::Resolve,
            per_read: None,
            per_write: None,
        };
        let addrs = CachingResolver::default()
            .resolve(&uri, config, resolve)
            .map_err(|e| match e {
                ureq::Error::Timeout(_) => H1Error::Timeout,
                e => H1Error::Resolve(e),
            })?;
        let stream = connect_any(&addrs, deadline, CONNECT_TIMEOUT)?;
        stream.set_nodelay(true).map_err(H1Error::from)?;
        Ok(Conn {
            stream,
            host: target.host.into(),
            port: target.port,
            read: None,
            write: None,
            since: Instant::now(),
        })
    }
}

/// A connection to the first of `addrs` that answers, each given at most `max` of the time
/// left: one that fails, timing out included, leaves the next to try while time is left. The
/// error is the attempt's timeout once its deadline has passed, else the last address's.
fn connect_any(
    addrs: &[SocketAddr],
    deadline: Instant,
    max: Duration,
) -> Result<TcpStream, H1Error> {
    let mut last = None;
    for addr in addrs {
        let wait = left(deadline).ok_or(H1Error::Timeout)?.min(max);
        match TcpStream::connect_timeout(addr, wait) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    if left(deadline).is_none() {
        return Err(H1Error::Timeout);
    }
    let e = last.unwrap_or_else(|| ErrorKind::ConnectionRefused.into());
    Err(H1Error::Io(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::State;

    fn task(method: Method, name: &str, params: &str, headers: &str) -> Task {
        let mut t = crate::store::contract::task("t", State::Ready, 0);
        t.method = method;
        t.name = name.to_string();
        t.params = params.to_string();
        t.headers = headers.to_string();
        t
    }

    #[test]
    fn only_plain_urls_are_taken() {
        let ok = |name: &str| {
            let t = task(Method::Get, name, "", "");
            Target::of(&t).map(|t| (t.host.to_string(), t.port, t.path.to_string()))
        };
        assert_eq!(
            ok("http://h/x?y=1"),
            Some(("h".into(), 80, "/x?y=1".into()))
        );
        assert_eq!(ok("http://h:8080"), Some(("h".into(), 8080, "".into())));
        for no in [
            "https://h/",
            "HTTP://h/",
            "http://u:p@h/",
            "http://h/a#frag",
            "http://h/a b",
            "http://h:/",
            "http://[::1]:81/a",
            "http://h:99999/",
            "http://h/\u{e9}",
        ] {
            assert!(ok(no).is_none(), "{no}");
        }
        let t = task(Method::Get, "http://h/", "a=<1>", "");
        assert!(Target::of(&t).is_none(), "GET params that need encoding");
        let t = task(Method::Post, "http://h/", "{\"a\": \"<1>\"}", "");
        assert!(Target::of(&t).is_some(), "a POST body is sent as it is");
    }

    #[test]
    fn requests_are_written_as_ureq_writes_them() {
        let mut out = Vec::new();
        let t = task(Method::Get, "http://h:81/q?x=1", "y=2", "X-Key: V\n");
        write_request(&mut out, &Target::of(&t).expect("plain"), &t);
        let ua = format!("user-agent: {USER_AGENT}\r\n");
        assert_eq!(
            String::from_utf8(out.clone()).expect("text"),
            format!("GET /q?x=1&y=2 HTTP/1.1\r\nhost: h:81\r\nx-key: V\r\n{ua}accept: */*\r\n\r\n")
        );
        let t = task(Method::Post, "http://h?z", "{}", "Accept: text/plain\n");
        write_request(&mut out, &Target::of(&t).expect("plain"), &t);
        assert_eq!(
            String::from_utf8(out.clone()).expect("text"),
            format!("POST /?z HTTP/1.1\r\nhost: h\r\naccept: text/plain\r\ncontent-type: application/json\r\ncontent-length: 2\r\n{ua}\r\n{{}}")
        );
    }

    #[test]
    fn a_connect_that_times_out_moves_on_to_the_next_address() {
        use std::os::fd::AsRawFd;
        let bind = || std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        // A listener whose accept queue is full: SYNs to it are dropped, connecting times out.
        let full = bind();
        // SAFETY: listen(2) on a socket this test owns.
        assert_eq!(unsafe { libc::listen(full.as_raw_fd(), 0) }, 0);
        let full = full.local_addr().expect("addr");
        let short = Duration::from_millis(300);
        let _queued: Vec<_> = (0..3)
            .filter_map(|_| TcpStream::connect_timeout(&full, short).ok())
            .collect();
        let good = bind();
        let deadline = Instant::now() + Duration::from_secs(10);
        let addrs = [full, good.local_addr().expect("addr")];
        assert!(connect_any(&addrs, deadline, short).is_ok());
        // The connect's own timeout is reported as such, not as the attempt's.
        assert!(matches!(
            connect_any(&addrs[..1], deadline, short),
            Err(H1Error::Io(e)) if e.kind() == ErrorKind::TimedOut
        ));
        let soon = Instant::now() + Duration::from_millis(100);
        assert!(matches!(
            connect_any(&addrs, soon, short),
            Err(H1Error::Timeout)
        ));
    }

    #[test]
    fn locations_resolve_against_the_target() {
        let t = task(Method::Get, "http://h:81/a/b?q=1", "", "");
        let t = Target::of(&t).expect("plain");
        for (location, want) in [
            ("https://o/x", "https://o/x"),
            ("//o/x", "http://o/x"),
            ("/x?y", "http://h:81/x?y"),
            ("/x?back=http://o/", "http://h:81/x?back=http://o/"),
            // RFC 3986 §5.4's examples, for a base of /a/b?q=1.
            ("c", "http://h:81/a/c"),
            ("./c", "http://h:81/a/c"),
            ("c/", "http://h:81/a/c/"),
            ("?y", "http://h:81/a/b?y"),
            ("c?y#f", "http://h:81/a/c?y"),
            ("", "http://h:81/a/b?q=1"),
            ("#f", "http://h:81/a/b?q=1"),
            (".", "http://h:81/a/"),
            ("..", "http://h:81/"),
            ("../c", "http://h:81/c"),
            ("../../../c", "http://h:81/c"),
            ("/./c/../d/.", "http://h:81/d/"),
            ("c//d/../e", "http://h:81/a/c//e"),
        ] {
            assert_eq!(t.join(location), want, "{location}");
        }
        let bare = task(Method::Get, "http://h", "", "");
        let bare = Target::of(&bare).expect("plain");
        assert_eq!(bare.join("c"), "http://h/c");
        assert_eq!(bare.join("?y"), "http://h/?y");
    }
}
