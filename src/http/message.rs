//! Requests as read off the wire, answers as written onto it, and what a handler gives back.

use std::cell::RefCell;
use std::fmt;
use std::net::TcpStream;

/// Decodes `%XX` escapes; `None` for bad escapes or bad UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The value of `name` in a query string (`a=1&b=2`), undecoded.
pub(crate) fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// One request, read whole: head and body (already de-chunked and within the body limit).
#[derive(Debug, Clone)]
pub struct Request {
    /// As sent (`GET`, `POST`, ...): methods are case-sensitive.
    pub method: String,
    /// The request target as sent: path and query.
    pub(crate) target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub(crate) version: u8,
    /// Header fields in order: names as sent (compare without case) and values (lossily
    /// UTF-8), one after the other in one string, `spans` saying where each name and value
    /// ends: two allocations for every field of a request, not two per field.
    fields: String,
    /// Per field, where its name ends and its value ends in `fields`.
    spans: Vec<(u32, u32)>,
    pub body: Vec<u8>,
}

impl Request {
    /// A request without header fields or body (fields are added with `push_header`).
    pub(crate) fn new(method: String, target: String, version: u8, fields: usize) -> Request {
        Request {
            method,
            target,
            version,
            fields: String::with_capacity(fields),
            spans: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Adds a header field. A head is at most 16 KiB (`MAX_HEADER_BYTES`), so its offsets
    /// fit a u32.
    pub(crate) fn push_header(&mut self, name: &str, value: &str) {
        self.fields.push_str(name);
        let name_end = self.fields.len() as u32;
        self.fields.push_str(value);
        self.spans.push((name_end, self.fields.len() as u32));
    }

    /// Every field as received, names as sent, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut start = 0;
        self.spans.iter().map(move |&(name_end, end)| {
            let (name, value) = (
                start as usize..name_end as usize,
                name_end as usize..end as usize,
            );
            start = end;
            (&self.fields[name], &self.fields[value])
        })
    }

    /// The target's path (before `?`).
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The target's query (after `?`; empty without one).
    pub fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }

    /// The first field named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// True when a `Connection` field lists `token` (any case).
    pub(crate) fn connection_has(&self, token: &str) -> bool {
        self.headers()
            .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// True for a WebSocket upgrade request (`Upgrade: websocket` and `Connection: upgrade`).
    pub(crate) fn is_websocket_upgrade(&self) -> bool {
        self.header("upgrade")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
            && self.connection_has("upgrade")
    }

    /// Whether the client keeps the connection open after this exchange (RFC 9112 §9.3).
    pub(crate) fn keep_alive(&self) -> bool {
        if self.version == 0 {
            self.connection_has("keep-alive")
        } else {
            !self.connection_has("close")
        }
    }
}

/// An answer: status, media type, extra header fields and a body. `Content-Length`, `Date`
/// and `Connection` are added when it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub(crate) code: u16,
    /// The `Content-Type` (none when empty): a field of its own, so that the usual answer
    /// allocates no header list.
    pub(crate) kind: &'static str,
    /// Other header fields, written after `Content-Type`.
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: Vec<u8>,
    /// Close the connection after this answer.
    pub(crate) close: bool,
}

impl Response {
    /// A JSON answer.
    pub(crate) fn json(code: u16, body: &serde_json::Value) -> Response {
        Response::json_bytes(code, body.to_string().into_bytes())
    }

    /// A JSON answer already written.
    pub(crate) fn json_bytes(code: u16, body: Vec<u8>) -> Response {
        Response {
            code,
            kind: "application/json",
            headers: Vec::new(),
            body,
            close: false,
        }
    }

    /// poulpe's error answer: `{"result":"Fail","reason":...}` with `code`.
    pub(crate) fn fail(code: u16, reason: impl fmt::Display) -> Response {
        Response::failed(code, reason.to_string())
    }

    /// `fail` past its one generic step: one copy in the binary for every kind of reason.
    fn failed(code: u16, reason: String) -> Response {
        Response::json(
            code,
            &serde_json::json!({"result": "Fail", "reason": reason}),
        )
    }

    /// A plain-text answer.
    pub fn text(code: u16, body: impl Into<String>) -> Response {
        Response {
            code,
            kind: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: body.into().into_bytes(),
            close: false,
        }
    }

    /// Adds a header field.
    pub(crate) fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// The bytes on the wire. `head_only` leaves the body out (an answer to `HEAD`); `close`
    /// adds `Connection: close`, `keep_alive_10` adds `Connection: keep-alive` (HTTP/1.0).
    pub(crate) fn encode(&self, head_only: bool, close: bool, keep_alive_10: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + self.body.len());
        self.encode_into(&mut out, head_only, close, keep_alive_10);
        out
    }

    /// `encode` onto the end of `out` (the loop thread keeps one buffer per connection).
    pub(crate) fn encode_into(
        &self,
        out: &mut Vec<u8>,
        head_only: bool,
        close: bool,
        keep_alive_10: bool,
    ) {
        out.reserve(160 + self.body.len());
        out.extend_from_slice(b"HTTP/1.1 ");
        push_number(out, self.code.into());
        out.push(b' ');
        out.extend_from_slice(reason(self.code).as_bytes());
        out.extend_from_slice(b"\r\n");
        with_date(|d| {
            out.extend_from_slice(b"Date: ");
            out.extend_from_slice(d.as_bytes());
            out.extend_from_slice(b"\r\n");
        });
        if !self.kind.is_empty() {
            out.extend_from_slice(b"Content-Type: ");
            out.extend_from_slice(self.kind.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        for (k, v) in &self.headers {
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if self.code != 101 && self.code != 204 && self.code != 304 {
            out.extend_from_slice(b"Content-Length: ");
            push_number(out, self.body.len());
            out.extend_from_slice(b"\r\n");
        }
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if keep_alive_10 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&self.body);
        }
    }
}

/// Writes `n` in decimal (no `String` made for it).
fn push_number(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Takes over an upgraded connection (a WebSocket): the socket and any bytes the client sent
/// after the request head.
pub(crate) type Upgrade = Box<dyn FnOnce(TcpStream, Vec<u8>) + Send>;

/// What a handler gives back.
pub enum Reply {
    /// Written, then the connection reads its next request (or closes).
    Answer(Response),
    /// The answer (`101 Switching Protocols`) is written, then the connection is handed over
    /// and no longer counts as an HTTP connection.
    Upgrade(Response, Upgrade),
}

impl From<Response> for Reply {
    fn from(r: Response) -> Reply {
        Reply::Answer(r)
    }
}

/// The reason phrase of the status codes poulpe uses.
fn reason(code: u16) -> &'static str {
    match code {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

thread_local! {
    /// The `Date` value, made once a second per thread.
    static DATE: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
}

fn with_date(f: impl FnOnce(&str)) {
    let now = chrono::Utc::now();
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != now.timestamp() {
            *d = (
                now.timestamp(),
                now.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
            );
        }
        f(&d.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: u8, headers: &[(&str, &str)]) -> Request {
        let mut r = Request::new("GET".into(), "/a?b=1".into(), version, 0);
        for (k, v) in headers {
            r.push_header(k, v);
        }
        r
    }

    #[test]
    fn target_headers_and_persistence() {
        let r = req(
            1,
            &[("Connection", "Upgrade, close"), ("upgrade", "WebSocket")],
        );
        assert_eq!((r.path(), r.query()), ("/a", "b=1"));
        assert!(r.is_websocket_upgrade());
        assert!(!r.keep_alive());
        assert!(req(1, &[]).keep_alive());
        assert!(!req(0, &[]).keep_alive());
        assert!(req(0, &[("connection", "Keep-Alive")]).keep_alive());
        let fields = [("Host", "h"), ("", ""), ("X-É", "ü v"), ("host", "")];
        let r = req(1, &fields);
        assert_eq!(r.headers().collect::<Vec<_>>(), fields);
        assert_eq!(
            (r.header("HOST"), r.header("x-É"), r.header("none")),
            (Some("h"), Some("ü v"), None)
        );
        assert_eq!(req(1, &[]).headers().count(), 0);
    }

    #[test]
    fn encoding() {
        let wire = Response::json(200, &serde_json::json!({"a": 1})).encode(false, true, false);
        let text = String::from_utf8(wire).expect("ascii");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nDate: "), "{text}");
        assert!(text.contains("\r\nContent-Length: 7\r\n"), "{text}");
        assert!(
            text.contains("\r\nConnection: close\r\n\r\n{\"a\":1}"),
            "{text}"
        );
        let mut big = Response::text(200, "x".repeat(1234567));
        big.headers.push(("Allow", "GET".into()));
        let text = String::from_utf8(big.encode(true, false, false)).expect("ascii");
        assert!(
            text.contains("\r\nContent-Type: text/plain; charset=utf-8\r\nAllow: GET\r\nContent-Length: 1234567\r\n\r\n"),
            "{text}"
        );
        assert!(Response::text(0, "")
            .encode(false, false, false)
            .starts_with(b"HTTP/1.1 0 Unknown\r\n"));
        let head = Response::text(404, "no").encode(true, false, true);
        let text = String::from_utf8(head).expect("ascii");
        assert!(
            text.ends_with("Content-Length: 2\r\nConnection: keep-alive\r\n\r\n"),
            "{text}"
        );
    }
}
