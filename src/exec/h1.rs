//! Reading an HTTP/1.1 response (RFC 9112) for [`super::plain`]: the head through `httparse`
//! (interim 1xx answers skipped), then the body as its framing says: `Content-Length`,
//! `chunked` (extensions and trailers read and dropped), or until the server closes.

use std::fmt;
use std::io::{self, ErrorKind, Read};

/// Longest response head (status line and fields) accepted, like ureq's own limit.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
const MAX_FIELDS: usize = 128;
/// The read buffer's first size; it grows to [`MAX_HEAD`] only for a larger head.
const FIRST_SIZE: usize = 16 * 1024;

/// Why a response could not be read.
#[derive(Debug)]
pub(crate) enum H1Error {
    /// The socket failed.
    Io(io::Error),
    /// The attempt's time ran out.
    Timeout,
    /// The connection ended (or was reset) before any byte of a response: on a reused
    /// connection, the request is sent again once on a fresh one.
    Closed,
    /// Not HTTP/1.x as RFC 9112 frames it.
    Malformed(&'static str),
    /// The host name did not resolve (before connecting).
    Resolve(ureq::Error),
}

impl fmt::Display for H1Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            H1Error::Io(e) => write!(f, "io: {e}"),
            H1Error::Timeout => f.write_str("timed out"),
            H1Error::Closed => f.write_str("connection closed before a response"),
            H1Error::Malformed(what) => write!(f, "malformed response: {what}"),
            H1Error::Resolve(e) => e.fmt(f),
        }
    }
}

impl From<io::Error> for H1Error {
    fn from(e: io::Error) -> H1Error {
        match e.kind() {
            ErrorKind::TimedOut | ErrorKind::WouldBlock => H1Error::Timeout,
            _ => H1Error::Io(e),
        }
    }
}

/// How the body of a response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the server closes the connection.
    Close,
}

/// A final response's head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: u16,
    pub(crate) framing: Framing,
    /// The connection can carry another request once the body is read (HTTP/1.1 without
    /// `Connection: close`).
    pub(crate) keep: bool,
    /// The `Location` of a redirect ureq would follow (301, 302, 303, 307, 308); other 3xx
    /// answers are final, as they are through ureq.
    pub(crate) location: Option<String>,
}

/// A reused read buffer: the bytes of `buf[start..end]` are received and not yet consumed.
pub(crate) struct Inbuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Inbuf {
    /// An empty buffer; its memory is taken at the first read.
    pub(crate) const fn new() -> Inbuf {
        Inbuf {
            buf: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    /// Forgets what is left (before a request on another connection).
    pub(crate) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Nothing received beyond what was consumed.
    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads more from `src` (making room first); 0 is the end of the stream.
    fn fill(&mut self, src: &mut dyn Read) -> Result<usize, H1Error> {
        if self.start == self.end {
            self.clear();
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() >= MAX_HEAD {
                return Err(H1Error::Malformed("a line or head longer than 64 KiB"));
            } else {
                let size = (self.buf.len() * 2).clamp(FIRST_SIZE, MAX_HEAD);
                self.buf.resize(size, 0);
            }
        }
        loop {
            match src.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads the head of the final response, skipping interim (1xx) ones.
    pub(crate) fn read_head(&mut self, src: &mut dyn Read) -> Result<Head, H1Error> {
        let mut got_any = !self.is_empty();
        loop {
            let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
            let mut resp = httparse::Response::new(&mut fields);
            let parsed = resp
                .parse(self.pending())
                .map_err(|e| H1Error::Malformed(parse_error(e)))?;
            if let httparse::Status::Complete(n) = parsed {
                let status = resp.code.unwrap_or(0);
                if status < 100 {
                    return Err(H1Error::Malformed("a status code below 100"));
                }
                if status == 101 {
                    return Err(H1Error::Malformed(
                        "101 Switching Protocols, never asked for",
                    ));
                }
                let head = (status >= 200).then(|| head_of(&resp)).transpose()?;
                self.start += n;
                match head {
                    Some(head) => return Ok(head),
                    None => continue,
                }
            }
            let n = match self.fill(src) {
                Err(H1Error::Io(e)) if !got_any && reset(&e) => return Err(H1Error::Closed),
                other => other?,
            };
            if n == 0 {
                return Err(if got_any {
                    H1Error::Malformed("the connection ended inside the head")
                } else {
                    H1Error::Closed
                });
            }
            got_any = true;
        }
    }

    /// Reads the body as `framing` says, appending at most `max + 1` bytes to `out` (more
    /// means the output is cut, and the reading stops there). `Ok(true)` when the whole body
    /// was read and nothing follows it, so the connection may carry another request.
    pub(crate) fn read_body(
        &mut self,
        src: &mut dyn Read,
        framing: Framing,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<bool, H1Error> {
        let whole = match framing {
            Framing::Empty => true,
            Framing::Length(n) => self.copy(src, n, out, max, false)?,
            Framing::Close => self.copy(src, u64::MAX, out, max, true)?,
            Framing::Chunked => self.chunks(src, out, max)?,
        };
        Ok(whole && self.is_empty())
    }

    /// Moves up to `n` body bytes to `out` (stopping past `max`); with `to_end`, the body ends
    /// with the stream. Whether the body was read whole.
    fn copy(
        &mut self,
        src: &mut dyn Read,
        mut n: u64,
        out: &mut Vec<u8>,
        max: usize,
        to_end: bool,
    ) -> Result<bool, H1Error> {
        while n > 0 {
            if self.is_empty() && self.fill(src)? == 0 {
                if to_end {
                    return Ok(false);
                }
                return Err(H1Error::Malformed("the connection ended inside the body"));
            }
            let take = (self.end - self.start).min(usize::try_from(n).unwrap_or(usize::MAX));
            let room = (max + 1).saturating_sub(out.len());
            out.extend_from_slice(&self.buf[self.start..self.start + take.min(room)]);
            self.start += take;
            n -= take as u64;
            if out.len() > max {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A chunked body: chunk sizes (extensions ignored), data, and the trailer section.
    fn chunks(
        &mut self,
        src: &mut dyn Read,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<bool, H1Error> {
        loop {
            let line = self.line(src)?;
            let size = self.buf[line]
                .split(|&b| b == b';')
                .next()
                .unwrap_or_default();
            let size =
                number(size.trim_ascii(), 16).ok_or(H1Error::Malformed("bad chunk size line"))?;
            if size == 0 {
                break;
            }
            if !self.copy(src, size, out, max, false)? {
                return Ok(false);
            }
            if !self.line(src)?.is_empty() {
                return Err(H1Error::Malformed("chunk data not followed by CRLF"));
            }
        }
        // The trailer section: field lines, dropped, up to an empty line.
        while !self.line(src)?.is_empty() {}
        Ok(true)
    }

    /// The next line (without its CRLF), consumed.
    fn line(&mut self, src: &mut dyn Read) -> Result<std::ops::Range<usize>, H1Error> {
        loop {
            if let Some(n) = self.pending().windows(2).position(|w| w == b"\r\n") {
                self.start += n + 2;
                return Ok(self.start - n - 2..self.start - 2);
            }
            self.more(src)?;
        }
    }

    /// Reads more, the end of the stream being an error (inside a chunked body).
    fn more(&mut self, src: &mut dyn Read) -> Result<(), H1Error> {
        if self.fill(src)? == 0 {
            return Err(H1Error::Malformed("the connection ended inside the body"));
        }
        Ok(())
    }
}

/// `digits` in `radix` (at least one, no sign), unless it overflows.
fn number(digits: &[u8], radix: u32) -> Option<u64> {
    digits.first()?;
    digits.iter().try_fold(0u64, |n, &b| {
        let d = char::from(b).to_digit(radix)?;
        n.checked_mul(u64::from(radix))?.checked_add(u64::from(d))
    })
}

/// A connection the peer dropped (reset, aborted, broken pipe).
pub(crate) fn reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::Status => "bad status line",
        httparse::Error::Version => "not HTTP/1.x",
        httparse::Error::TooManyHeaders => "more than 128 header fields",
        _ => "bad header field",
    }
}

/// The framing, reuse and `Location` of a final response (RFC 9112 §6.3).
fn head_of(resp: &httparse::Response<'_, '_>) -> Result<Head, H1Error> {
    let status = resp.code.unwrap_or(0);
    let mut keep = resp.version == Some(1);
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut location = None;
    for h in resp.headers.iter() {
        let value = h.value;
        if h.name.eq_ignore_ascii_case("content-length") {
            let n =
                number(value.trim_ascii(), 10).ok_or(H1Error::Malformed("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Malformed("conflicting Content-Length fields"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked only when it is the last coding; otherwise the body runs to the close.
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            if value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
            {
                keep = false;
            }
        } else if h.name.eq_ignore_ascii_case("location")
            && matches!(status, 301 | 302 | 303 | 307 | 308)
        {
            location = Some(String::from_utf8_lossy(value).into_owned());
        }
    }
    let framing = if status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::Close,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    if framing == Framing::Close {
        keep = false;
    }
    Ok(Head {
        status,
        framing,
        keep,
        location,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out its bytes a few at a time, so every boundary is crossed.
    struct Dribble<'a>(&'a [u8], usize);

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn read(wire: &[u8], step: usize, max: usize) -> Result<(Head, String, bool), H1Error> {
        let mut inb = Inbuf::new();
        let mut src = Dribble(wire, step);
        let head = inb.read_head(&mut src)?;
        let mut out = Vec::new();
        let whole = inb.read_body(&mut src, head.framing, &mut out, max)?;
        Ok((head, String::from_utf8(out).expect("utf-8"), whole))
    }

    #[test]
    fn bodies_are_framed_by_length_chunks_or_the_close() {
        for step in [1, 3, 1000] {
            let (h, body, whole) = read(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                step,
                100,
            )
            .unwrap();
            assert_eq!(
                (h.status, h.keep, body.as_str(), whole),
                (200, true, "hello", true)
            );
            let wire = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
                5;name=\"v\"\r\nhello\r\n1\r\n \r\n0;last\r\nX-Sum: 1\r\nX-Other: 2\r\n\r\n";
            let (h, body, whole) = read(wire, step, 100).unwrap();
            assert_eq!(
                (h.status, h.framing, body.as_str(), whole),
                (201, Framing::Chunked, "hello ", true)
            );
            let (h, body, whole) =
                read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nto the end", step, 100).unwrap();
            assert_eq!(
                (h.framing, h.keep, body.as_str(), whole),
                (Framing::Close, false, "to the end", false)
            );
            let (h, body, _) = read(b"HTTP/1.0 200 OK\r\n\r\nold", step, 100).unwrap();
            assert_eq!((h.keep, body.as_str()), (false, "old"));
        }
    }

    #[test]
    fn interim_answers_are_skipped_and_close_is_honoured() {
        let wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
            HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\nok";
        for step in [1, 7, 1000] {
            let (h, body, whole) = read(wire, step, 100).unwrap();
            assert_eq!(
                (h.status, h.keep, body.as_str(), whole),
                (200, false, "ok", true)
            );
        }
        let (h, body, _) = read(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",
            5,
            100,
        )
        .unwrap();
        assert_eq!((h.framing, body.as_str()), (Framing::Empty, ""));
        let (h, _, _) = read(
            b"HTTP/1.1 302 Found\r\nLocation: /next\r\nContent-Length: 0\r\n\r\n",
            5,
            100,
        )
        .unwrap();
        assert_eq!(h.location.as_deref(), Some("/next"));
    }

    #[test]
    fn only_the_redirects_ureq_follows_keep_their_location() {
        for status in [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 201] {
            let wire =
                format!("HTTP/1.1 {status} X\r\nLocation: /next\r\nContent-Length: 0\r\n\r\n");
            let (h, _, _) = read(wire.as_bytes(), 1000, 100).unwrap();
            let follow = matches!(status, 301 | 302 | 303 | 307 | 308);
            assert_eq!(h.location.is_some(), follow, "{status}");
        }
    }

    #[test]
    fn reading_stops_past_the_limit() {
        let (_, body, whole) = read(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789",
            4,
            5,
        )
        .unwrap();
        assert_eq!((body.as_str(), whole), ("012345", false));
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n0123\r\n4\r\n4567\r\n0\r\n\r\n";
        let (_, body, whole) = read(wire, 3, 5).unwrap();
        assert_eq!((body.as_str(), whole), ("012345", false));
    }

    #[test]
    fn bad_responses_are_errors_that_say_what_is_wrong() {
        let bad = |wire: &[u8]| match read(wire, 4, 100) {
            Err(e) => e.to_string(),
            Ok(r) => panic!("accepted {r:?}"),
        };
        assert_eq!(
            bad(b"HTTP/1.1 OK\r\n\r\n"),
            "malformed response: bad status line"
        );
        assert_eq!(
            bad(b"SSH-2.0-OpenSSH\r\n\r\n"),
            "malformed response: not HTTP/1.x"
        );
        assert_eq!(bad(b""), "connection closed before a response");
        assert_eq!(
            bad(b"HTTP/1.1 200 OK\r\nContent"),
            "malformed response: the connection ended inside the head"
        );
        assert_eq!(
            bad(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"),
            "malformed response: the connection ended inside the body"
        );
        assert_eq!(
            bad(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            "malformed response: conflicting Content-Length fields"
        );
        assert_eq!(
            bad(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
            "malformed response: bad Content-Length"
        );
        assert_eq!(
            bad(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            "malformed response: bad chunk size line"
        );
        assert_eq!(
            bad(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n"),
            "malformed response: chunk data not followed by CRLF"
        );
        assert_eq!(
            bad(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            "malformed response: 101 Switching Protocols, never asked for"
        );
        assert_eq!(
            bad(b"HTTP/1.1 200 OK\r\nA B: c\r\n\r\n"),
            "malformed response: bad header field"
        );
        let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 70_000));
        let e = read(&huge, 4096, 100).expect_err("too long");
        assert_eq!(
            e.to_string(),
            "malformed response: a line or head longer than 64 KiB"
        );
    }
}
