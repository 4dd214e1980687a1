//! One connection, start to end: reads each request (strict RFC 9112 framing, size limits,
//! deadlines), hands it to the handler on this same thread, writes the answer with a write
//! timeout, and closes when either side asks or anything is wrong.

use super::message::{Reply, Request, Response};
use super::{Handler, Limits, HEAD_DEADLINE, MAX_HEADERS, MAX_HEADER_BYTES, MAX_REQUEST_LINE};
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 * 1024;
/// Longest chunk-size line of a chunked body (size and extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// After a refused request, how long the unread rest of it is read and dropped before the
/// socket closes (closing with unread input resets the connection, and the client may lose
/// the answer).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;

/// Why a request could not be read. Those with a status are answered, then the connection
/// closes; the others close it without a word.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum RequestError {
    /// The client closed the connection, or it broke.
    Closed,
    /// Nothing arrived between requests within the idle time.
    Idle,
    /// The request head did not arrive within [`HEAD_DEADLINE`] of its first byte.
    HeadTimeout,
    /// The body did not arrive within the idle time.
    BodyTimeout,
    /// The request line is longer than [`MAX_REQUEST_LINE`].
    LineTooLong,
    /// The header fields take more than [`MAX_HEADER_BYTES`].
    HeadersTooLarge,
    /// More than [`MAX_HEADERS`] header fields.
    TooManyHeaders,
    /// Not an HTTP/1.x request head.
    Malformed(String),
    /// Not HTTP/1.0 or HTTP/1.1.
    Version,
    /// An HTTP/1.1 request without exactly one `Host`.
    Host,
    /// `Content-Length` that is not a plain decimal number.
    BadLength(String),
    /// Several `Content-Length` fields that disagree.
    ConflictingLengths,
    /// Both `Content-Length` and `Transfer-Encoding` (a request smuggling vector).
    LengthAndEncoding,
    /// A transfer coding other than a single `chunked`.
    Coding(String),
    /// A malformed chunked body.
    BadChunk(&'static str),
    /// A body over the limit (the limit).
    TooLarge(usize),
    /// An `Expect` other than `100-continue`.
    Expectation(String),
}

impl RequestError {
    /// The status to answer with, or `None` to close without an answer.
    pub(crate) fn status(&self) -> Option<u16> {
        Some(match self {
            RequestError::Closed | RequestError::Idle => return None,
            RequestError::HeadTimeout | RequestError::BodyTimeout => 408,
            RequestError::LineTooLong => 414,
            RequestError::HeadersTooLarge | RequestError::TooManyHeaders => 431,
            RequestError::Version => 505,
            RequestError::TooLarge(_) => 413,
            RequestError::Expectation(_) => 417,
            RequestError::Malformed(_)
            | RequestError::Host
            | RequestError::BadLength(_)
            | RequestError::ConflictingLengths
            | RequestError::LengthAndEncoding
            | RequestError::Coding(_)
            | RequestError::BadChunk(_) => 400,
        })
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Closed => write!(f, "connection closed"),
            RequestError::Idle => write!(f, "connection idle"),
            RequestError::HeadTimeout => write!(
                f,
                "request head not complete within {} s of its first byte",
                HEAD_DEADLINE.as_secs()
            ),
            RequestError::BodyTimeout => {
                write!(f, "request body not complete in time (--http_idle)")
            }
            RequestError::LineTooLong => {
                write!(f, "request line longer than {MAX_REQUEST_LINE} bytes")
            }
            RequestError::HeadersTooLarge => {
                write!(f, "header fields larger than {MAX_HEADER_BYTES} bytes")
            }
            RequestError::TooManyHeaders => write!(f, "more than {MAX_HEADERS} header fields"),
            RequestError::Malformed(why) => write!(f, "malformed request head: {why}"),
            RequestError::Version => write!(f, "only HTTP/1.0 and HTTP/1.1 are supported"),
            RequestError::Host => write!(f, "Host: an HTTP/1.1 request needs exactly one"),
            RequestError::BadLength(v) => {
                write!(f, "Content-Length: {v:?} is not a decimal number of bytes")
            }
            RequestError::ConflictingLengths => {
                write!(f, "Content-Length: several fields with different values")
            }
            RequestError::LengthAndEncoding => {
                write!(
                    f,
                    "Content-Length and Transfer-Encoding together are refused"
                )
            }
            RequestError::Coding(v) => {
                write!(
                    f,
                    "Transfer-Encoding: {v:?} is not supported (only chunked)"
                )
            }
            RequestError::BadChunk(why) => write!(f, "chunked body: {why}"),
            RequestError::TooLarge(max) => {
                write!(f, "request body larger than {max} bytes (--max_body)")
            }
            RequestError::Expectation(v) => {
                write!(f, "Expect: {v:?} is not supported (only 100-continue)")
            }
        }
    }
}

impl std::error::Error for RequestError {}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(usize),
    Chunked,
}

/// How long a read may wait.
#[derive(Clone)]
enum Until {
    /// The idle time, for the first byte of a request.
    Idle,
    /// A fixed point in time; the error to give when it passes.
    At(Instant, RequestError),
}

/// A connection and the bytes read from it but not used yet (pipelined requests).
pub(crate) struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    /// Where each read lands before it joins `buf`: zeroed once per connection, not once per
    /// read (a `resize` of `buf` before each read zeroed 8 KiB a byte at a time, about a tenth
    /// of the connection thread's time per request).
    scratch: Box<[u8]>,
    /// The receive timeout set on the socket now.
    timeout: Option<Duration>,
    limits: Limits,
    peer: Option<SocketAddr>,
}

impl Conn {
    /// Wraps an accepted connection: write timeout and receive timeout set to the idle time.
    pub(crate) fn new(stream: TcpStream, limits: Limits) -> Conn {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(limits.idle));
        let peer = stream.peer_addr().ok();
        Conn {
            stream,
            buf: Vec::new(),
            pos: 0,
            scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
            timeout: None,
            limits,
            peer,
        }
    }

    /// Takes over a connection from the loop thread (see [`super::reactor`]) with the bytes it
    /// read but did not use: the socket goes back to blocking reads with timeouts.
    pub(crate) fn resume(stream: TcpStream, limits: Limits, buf: Vec<u8>) -> Conn {
        let _ = stream.set_nonblocking(false);
        let mut conn = Conn::new(stream, limits);
        conn.buf = buf;
        conn
    }

    /// Serves requests until the connection ends (or is handed over by an upgrade), starting
    /// with `first` when given (a request the loop thread read, or why it could not read one).
    /// `on_upgrade` runs before the handover: the connection no longer counts as an HTTP one.
    pub(crate) fn serve(
        mut self,
        handler: &dyn Handler,
        on_upgrade: impl FnOnce(),
        mut first: Option<Result<Request, RequestError>>,
    ) {
        loop {
            let req = match first.take().unwrap_or_else(|| self.read_request()) {
                Ok(r) => r,
                Err(e) => {
                    if let Some(code) = e.status() {
                        log::debug!("http: {:?}: {code} {e}", self.peer);
                        crate::metrics::answered(code);
                        let _ = self.write(&Response::fail(code, &e).encode(false, true, false));
                        self.linger_close();
                    }
                    return;
                }
            };
            let head_only = req.method == "HEAD";
            let keep = req.keep_alive();
            let v10 = req.version == 0;
            match handler.handle(req) {
                Reply::Answer(resp) => {
                    let close = !keep || resp.close;
                    crate::metrics::answered(resp.code);
                    if let Err(e) = self.write(&resp.encode(head_only, close, v10 && !close)) {
                        log::debug!("http: {:?}: answer not written: {e}", self.peer);
                        return;
                    }
                    if close {
                        self.linger_close();
                        return;
                    }
                }
                Reply::Upgrade(resp, take) => {
                    crate::metrics::answered(resp.code);
                    // The place goes back before the 101 is written: a client that has read
                    // it may connect again at once and must find the place free.
                    on_upgrade();
                    if let Err(e) = self.write(&resp.encode(false, false, false)) {
                        log::debug!("http: {:?}: upgrade not written: {e}", self.peer);
                        return;
                    }
                    let rest = self.buf.split_off(self.pos);
                    let _ = self.stream.set_read_timeout(None);
                    take(self.stream, rest);
                    return;
                }
            }
        }
    }

    /// Writes all of `bytes`; a client that reads nothing for the idle time gets an error.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Closes after reading (and dropping) what the client still sends, for a short while, so
    /// that the close does not reset the connection before the client has read the answer.
    fn linger_close(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
        let end = Instant::now() + LINGER;
        let mut seen = 0;
        while seen < LINGER_BYTES {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stream.set_read_timeout(Some(left)).is_err() {
                return;
            }
            match self.stream.read(&mut self.scratch) {
                Ok(0) => return,
                Ok(n) => seen += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads one whole request.
    pub(crate) fn read_request(&mut self) -> Result<Request, RequestError> {
        let mut req = self.read_head()?;
        let framing = framing(&req)?;
        if let Some(expect) = req.header("expect") {
            if !expect.trim().eq_ignore_ascii_case("100-continue") {
                return Err(RequestError::Expectation(expect.to_string()));
            }
            // Only when the client waits for it: the body (or part of it) is not here yet.
            let waiting = self.pos == self.buf.len()
                && framing.is_some()
                && framing != Some(Framing::Length(0));
            if req.version == 1 && waiting && !self.too_large(framing) {
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .map_err(|_| RequestError::Closed)?;
            }
        }
        req.body = match framing {
            None => Vec::new(),
            Some(Framing::Length(n)) => {
                if self.too_large(framing) {
                    return Err(RequestError::TooLarge(self.limits.max_body));
                }
                let until = Until::At(Instant::now() + self.limits.idle, RequestError::BodyTimeout);
                while self.buf.len() - self.pos < n {
                    self.fill(&until)?;
                }
                let body = self.buf[self.pos..self.pos + n].to_vec();
                self.consume(n);
                body
            }
            Some(Framing::Chunked) => self.read_chunked()?,
        };
        Ok(req)
    }

    fn too_large(&self, framing: Option<Framing>) -> bool {
        matches!(framing, Some(Framing::Length(n)) if n > self.limits.max_body)
    }

    /// Reads and parses a request head; its body is left for the caller.
    fn read_head(&mut self) -> Result<Request, RequestError> {
        // The head's clock starts with its first byte (already here when pipelined).
        let mut started = (self.pos < self.buf.len()).then(Instant::now);
        loop {
            if self.pos < self.buf.len() {
                if let Some(req) = self.parse_head()? {
                    return Ok(req);
                }
            }
            let until = match started {
                None => Until::Idle,
                Some(t) => Until::At(t + HEAD_DEADLINE, RequestError::HeadTimeout),
            };
            self.fill(&until)?;
            started.get_or_insert_with(Instant::now);
        }
    }

    /// Parses the head if it is all here; checks the size limits either way.
    fn parse_head(&mut self) -> Result<Option<Request>, RequestError> {
        let Some((req, used)) = parse_head(&self.buf[self.pos..])? else {
            return Ok(None);
        };
        self.consume(used);
        Ok(Some(req))
    }

    /// Reads a chunked body (RFC 9112 §7.1); trailer fields are read and dropped.
    fn read_chunked(&mut self) -> Result<Vec<u8>, RequestError> {
        let until = Until::At(Instant::now() + self.limits.idle, RequestError::BodyTimeout);
        let mut body = Vec::new();
        loop {
            let line = self.read_line(&until, MAX_CHUNK_LINE, "chunk size line too long")?;
            let size_hex = line.split(|&b| b == b';').next().unwrap_or_default();
            let size_hex = std::str::from_utf8(size_hex)
                .map_err(|_| RequestError::BadChunk("chunk size is not hexadecimal"))?
                .trim_end_matches([' ', '\t']);
            if size_hex.is_empty()
                || size_hex.len() > 16
                || !size_hex.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(RequestError::BadChunk("chunk size is not hexadecimal"));
            }
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| RequestError::BadChunk("chunk size too large"))?;
            if size == 0 {
                let mut trailer = 0;
                loop {
                    let field = self.read_line(&until, MAX_HEADER_BYTES, "trailer too large")?;
                    if field.is_empty() {
                        return Ok(body);
                    }
                    trailer += field.len();
                    if trailer > MAX_HEADER_BYTES {
                        return Err(RequestError::BadChunk("trailer too large"));
                    }
                }
            }
            if body.len().saturating_add(size) > self.limits.max_body {
                return Err(RequestError::TooLarge(self.limits.max_body));
            }
            while self.buf.len() - self.pos < size {
                self.fill(&until)?;
            }
            body.extend_from_slice(&self.buf[self.pos..self.pos + size]);
            self.consume(size);
            let end = self.read_line(&until, 2, "chunk data longer than its size")?;
            if !end.is_empty() {
                return Err(RequestError::BadChunk("chunk data longer than its size"));
            }
        }
    }

    /// Reads one line (CRLF or LF), without its end.
    fn read_line(
        &mut self,
        until: &Until,
        max: usize,
        too_long: &'static str,
    ) -> Result<Vec<u8>, RequestError> {
        loop {
            let data = &self.buf[self.pos..];
            if let Some(n) = data.iter().position(|&b| b == b'\n') {
                if n > max {
                    return Err(RequestError::BadChunk(too_long));
                }
                let line = data[..n].strip_suffix(b"\r").unwrap_or(&data[..n]).to_vec();
                self.consume(n + 1);
                return Ok(line);
            }
            if data.len() > max + 1 {
                return Err(RequestError::BadChunk(too_long));
            }
            self.fill(until)?;
        }
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Reads more bytes into the buffer, waiting at most as `until` says.
    fn fill(&mut self, until: &Until) -> Result<(), RequestError> {
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        loop {
            let (wait, late) = match until {
                Until::Idle => (self.limits.idle, RequestError::Idle),
                Until::At(t, late) => {
                    let left = t.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(late.clone());
                    }
                    // Whole milliseconds, at least one: a zero timeout would mean "never".
                    (left.max(Duration::from_millis(1)), late.clone())
                }
            };
            if self.timeout != Some(wait) {
                self.stream
                    .set_read_timeout(Some(wait))
                    .map_err(|_| RequestError::Closed)?;
                self.timeout = Some(wait);
            }
            match self.stream.read(&mut self.scratch) {
                Ok(0) => return Err(RequestError::Closed),
                Ok(n) => {
                    self.buf
                        .extend_from_slice(self.scratch.get(..n).unwrap_or_default());
                    return Ok(());
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if matches!(until, Until::Idle) {
                        return Err(late);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(RequestError::Closed),
            }
        }
    }
}

/// Parses a request head at the start of `data` if it is all there, with the bytes it takes;
/// checks the size limits either way, and that an HTTP/1.1 request has one `Host`.
pub(crate) fn parse_head(data: &[u8]) -> Result<Option<(Request, usize)>, RequestError> {
    // Empty lines before a request line are ignored (RFC 9112 §2.2), as httparse does.
    let lead = data
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    let line_len = data[lead..].iter().position(|&b| b == b'\n');
    match line_len {
        // Empty lines count as the request line's: a client cannot fill the buffer with them.
        _ if lead > MAX_REQUEST_LINE => return Err(RequestError::LineTooLong),
        Some(n) if n > MAX_REQUEST_LINE => return Err(RequestError::LineTooLong),
        None if data.len() - lead > MAX_REQUEST_LINE => return Err(RequestError::LineTooLong),
        _ => {}
    }
    let line_end = lead + line_len.map_or(data.len() - lead, |n| n + 1);
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    let used = match parsed.parse(data) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if data.len() - line_end > MAX_HEADER_BYTES + 4 {
                return Err(RequestError::HeadersTooLarge);
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooManyHeaders),
        Err(httparse::Error::Version) => return Err(RequestError::Version),
        Err(e) => return Err(RequestError::Malformed(e.to_string())),
    };
    if used - line_end > MAX_HEADER_BYTES + 2 {
        return Err(RequestError::HeadersTooLarge);
    }
    let mut req = Request::new(
        parsed.method.unwrap_or_default().to_string(),
        parsed.path.unwrap_or_default().to_string(),
        parsed.version.unwrap_or(1),
        parsed
            .headers
            .iter()
            .map(|h| h.name.len() + h.value.len())
            .sum(),
    );
    for h in parsed.headers.iter() {
        req.push_header(h.name, &String::from_utf8_lossy(h.value));
    }
    if req.version == 1
        && req
            .headers()
            .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
            .count()
            != 1
    {
        return Err(RequestError::Host);
    }
    Ok(Some((req, used)))
}

/// How the body is delimited (RFC 9112 §6.3), refusing every ambiguous case.
pub(crate) fn framing(req: &Request) -> Result<Option<Framing>, RequestError> {
    let mut length: Option<usize> = None;
    let mut codings: Vec<String> = Vec::new();
    for (k, v) in req.headers() {
        if k.eq_ignore_ascii_case("content-length") {
            let v = v.trim();
            if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(RequestError::BadLength(v.to_string()));
            }
            let n: usize = v
                .parse()
                .map_err(|_| RequestError::BadLength(v.to_string()))?;
            match length {
                Some(m) if m != n => return Err(RequestError::ConflictingLengths),
                _ => length = Some(n),
            }
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            codings.extend(
                v.split(',')
                    .map(|c| c.trim().to_ascii_lowercase())
                    .filter(|c| !c.is_empty()),
            );
        }
    }
    let has_coding = req
        .headers()
        .any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"));
    match (length, has_coding) {
        (Some(_), true) => Err(RequestError::LengthAndEncoding),
        (Some(n), false) => Ok(Some(Framing::Length(n))),
        (None, false) => Ok(None),
        (None, true) => {
            if req.version == 0 || codings.len() != 1 || codings[0] != "chunked" {
                Err(RequestError::Coding(codings.join(", ")))
            } else {
                Ok(Some(Framing::Chunked))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A connection whose client sends `parts` one write at a time, 20 ms apart.
    fn fed(parts: &[&[u8]]) -> (Conn, std::thread::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let parts: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).expect("connect");
            for p in parts {
                c.write_all(&p).expect("write");
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(200));
        });
        let (s, _) = l.accept().expect("accept");
        let limits = Limits {
            max_body: 64,
            idle: Duration::from_secs(5),
            max_conns: 1,
        };
        (Conn::new(s, limits), client)
    }

    #[test]
    fn empty_lines_then_a_request_line_in_pieces() {
        let (mut c, client) = fed(&[b"\r\n\r\nGE", b"T /x?a=1 HTT", b"P/1.1\r\nHost: h\r\n\r\n"]);
        let req = c.read_request().expect("a request");
        assert_eq!(
            (req.method.as_str(), req.path(), req.query()),
            ("GET", "/x", "a=1")
        );
        client.join().expect("client");
    }

    #[test]
    fn empty_lines_before_a_request_count_as_its_line() {
        let lines = vec![b'\n'; MAX_REQUEST_LINE + 1];
        assert_eq!(
            parse_head(&lines).map(|h| h.is_some()),
            Err(RequestError::LineTooLong)
        );
        assert_eq!(parse_head(&lines[1..]).map(|h| h.is_some()), Ok(false));
    }

    #[test]
    fn framing_errors_are_named() {
        let cases: [(&[u8], RequestError); 4] = [
            (
                b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                RequestError::ConflictingLengths,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                RequestError::LengthAndEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 65\r\n\r\n",
                RequestError::TooLarge(64),
            ),
            (
                b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n41\r\n",
                RequestError::TooLarge(64),
            ),
        ];
        for (input, want) in cases {
            let (mut c, client) = fed(&[input]);
            assert_eq!(c.read_request().map(|r| r.method), Err(want));
            client.join().expect("client");
        }
    }
}
