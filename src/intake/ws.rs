//! The WebSocket adapter (`/ws_task` on the HTTP port): each text frame is a task or an array of
//! tasks; each task gets an ack frame once durable, and its final result frame later on the same
//! connection while it is open. The connection keeps the thread that read its upgrade request.
//!
//! The thread sleeps in `poll(2)` on three things: the socket (non-blocking), an eventfd that
//! rings when one of its tasks has a result to push, and the endpoint's eventfd that rings at
//! shutdown. An idle connection costs no CPU. Every frame already read is handled together: their
//! tasks share one durable write, and each task still gets its own ack.

use super::{same_secret, Origin, Submitter};
use crate::http::{percent_decode, query_param, Reply, Request, Response};
use crate::results::{Answers, Pushes};
use crate::task::TaskResult;
use crossbeam_channel::{unbounded, Receiver, Sender};
use serde_json::{json, Value};
use std::io::ErrorKind;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

/// Longest a connection keeps waiting to push one task's result.
const PUSH_WITHIN: Duration = Duration::from_secs(24 * 3600);

fn refuse(code: u16, reason: &str) -> Reply {
    Response::fail(code, reason).into()
}

/// The WebSocket endpoint: what its connections need, and how many are open.
pub struct WebSockets {
    pub(crate) submitter: Submitter,
    pub(crate) answers: Answers,
    /// `--token` (header or `?token=`).
    pub(crate) token: Option<String>,
    /// `--max_ws`: most open connections.
    pub(crate) max_open: usize,
    /// `--max_body`: largest frame.
    pub(crate) max_frame: usize,
    /// `--ws_idle`: a connection with no input for this long is closed.
    pub(crate) idle: Duration,
    /// Connections open now.
    pub(crate) open: AtomicUsize,
    /// Rings once at shutdown: every connection says goodbye and closes.
    stopping: Bell,
}

/// One open WebSocket connection, counted against `--max_ws` while it lives.
struct Open(Arc<WebSockets>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl WebSockets {
    /// Checks the token (header or `?token=`), the connection cap and the handshake; the
    /// answer is the `101` and the connection's session.
    pub(crate) fn accept(self: &Arc<Self>, req: &Request, query: &str) -> Reply {
        if let Some(token) = &self.token {
            let from_header = req
                .header("authorization")
                .and_then(|v| v.strip_prefix("Bearer "));
            let from_query = query_param(query, "token").and_then(percent_decode);
            let given = from_header
                .map(str::to_string)
                .or(from_query)
                .unwrap_or_default();
            if !same_secret(given.trim().as_bytes(), token.as_bytes()) {
                return Response::fail(401, "missing or wrong bearer token")
                    .with_header("WWW-Authenticate", "Bearer")
                    .into();
            }
        }
        let Some(key) = req.header("sec-websocket-key") else {
            return refuse(400, "Sec-WebSocket-Key: missing");
        };
        if req.header("sec-websocket-version").map(str::trim) != Some("13") {
            return refuse(400, "Sec-WebSocket-Version: only 13 is supported");
        }
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_open {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return refuse(503, "too many WebSocket connections (--max_ws)");
        }
        let open = Open(self.clone());
        let accept_key = tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
        let resp = Response {
            code: 101,
            kind: "",
            headers: vec![
                ("Upgrade", "websocket".to_string()),
                ("Connection", "Upgrade".to_string()),
                ("Sec-WebSocket-Accept", accept_key),
            ],
            body: Vec::new(),
            close: false,
        };
        Reply::Upgrade(
            resp,
            Box::new(move |stream: TcpStream, rest: Vec<u8>| open.0.serve(stream, rest)),
        )
    }
}

fn fail_frame(id: Option<&str>, reason: impl std::fmt::Display) -> String {
    fail_text(id, reason.to_string())
}

/// `fail_frame` past its one generic step (one copy in the binary).
fn fail_text(id: Option<&str>, reason: String) -> String {
    json!({"id": id, "result": "Fail", "reason": reason}).to_string()
}

impl WebSockets {
    /// The endpoint; `main` builds it from the flags.
    pub fn new(
        submitter: Submitter,
        answers: Answers,
        token: Option<String>,
        max_open: usize,
        max_frame: usize,
        idle: Duration,
    ) -> std::io::Result<WebSockets> {
        Ok(WebSockets {
            submitter,
            answers,
            token,
            max_open,
            max_frame,
            idle,
            open: AtomicUsize::new(0),
            stopping: Bell::new()?,
        })
    }

    /// Closes every connection (with a close frame) and every later one (shutdown).
    pub fn close_all(&self) {
        self.stopping.ring();
    }

    /// One connection, until it closes, goes idle for `--ws_idle`, stops reading its results
    /// for as long, or the server stops.
    fn serve(&self, stream: TcpStream, rest: Vec<u8>) {
        let (bell, sock) = match (Bell::new(), stream.set_nonblocking(true)) {
            (Ok(b), Ok(())) => (Arc::new(b), stream.as_raw_fd()),
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("ws: cannot serve a connection: {e}");
                return;
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(self.max_frame))
            .max_frame_size(Some(self.max_frame));
        let mut ws = WebSocket::from_partially_read(stream, rest, Role::Server, Some(config));
        let (push_tx, push_rx): (Sender<TaskResult>, Receiver<TaskResult>) = unbounded();
        let pusher = Pusher {
            tx: push_tx,
            bell: bell.clone(),
        };
        let pushes: Pushes = Arc::new(move |r| pusher.push(r));
        let mut last_input = Instant::now();
        let mut stuck_since: Option<Instant> = None;
        loop {
            // Everything readable now: frames are handled together.
            let mut texts: Vec<String> = Vec::new();
            let mut out: Vec<String> = Vec::new();
            let mut closing: Option<(CloseCode, &str)> = None;
            loop {
                match ws.read() {
                    Ok(Message::Text(t)) => {
                        last_input = Instant::now();
                        texts.push(t.as_str().to_string());
                    }
                    Ok(Message::Binary(_)) => {
                        last_input = Instant::now();
                        out.push(fail_frame(
                            None,
                            "binary frames are not supported: send JSON text",
                        ));
                    }
                    Ok(Message::Close(_)) => return, // tungstenite answers the close
                    Ok(_) => last_input = Instant::now(), // ping (answered) or pong
                    Err(e) if would_block(&e) => break,
                    Err(tungstenite::Error::Capacity(e)) => {
                        out.push(fail_frame(
                            None,
                            format!("frame too large: {e} (--max_body)"),
                        ));
                        closing = Some((CloseCode::Size, "frame too large"));
                        break;
                    }
                    Err(e) => {
                        log::debug!("ws: connection ends: {e}");
                        return;
                    }
                }
            }
            if !texts.is_empty() {
                // Results already here go out before this input waits for its durable write:
                // under load that wait is a group commit, and they would wait with it.
                bell.quiet();
                let ready: Vec<String> = push_rx.try_iter().map(|r| result_frame(&r)).collect();
                let sent = ready.is_empty() || (send(&mut ws, ready) && flushed(&mut ws));
                if !sent {
                    return;
                }
                out.extend(self.on_texts(&texts, &pushes));
            }
            bell.quiet();
            // Results are formatted here, on the connection's thread, not on the outcome
            // thread that hands them over (one thread for the whole server).
            out.extend(push_rx.try_iter().map(|r| result_frame(&r)));
            if !send(&mut ws, out) {
                return;
            }
            let stopping = self.stopping.rung() || !self.submitter.accepting();
            if closing.is_none() && (stopping || last_input.elapsed() >= self.idle) {
                closing = Some((
                    CloseCode::Away,
                    if stopping {
                        "server shutting down"
                    } else {
                        "idle"
                    },
                ));
            }
            if let Some((code, reason)) = closing {
                let _ = ws.close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                }));
                // Best effort: the socket is non-blocking and the client may be gone.
                let _ = ws.flush();
                return;
            }
            let pending = match ws.flush() {
                Ok(()) => false,
                Err(e) if would_block(&e) => true,
                Err(e) => {
                    log::debug!("ws: cannot send: {e}");
                    return;
                }
            };
            // A client that reads nothing of its results for --ws_idle is dropped.
            if pending {
                let since = *stuck_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.idle {
                    log::debug!("ws: the client has not read for {:?}; closed", self.idle);
                    return;
                }
            } else {
                stuck_since = None;
            }
            let wait = self.idle.saturating_sub(last_input.elapsed());
            if let Err(e) = wait_for(sock, pending, &bell, &self.stopping, wait) {
                log::warn!("ws: poll failed: {e}; the connection is closed");
                return;
            }
        }
    }

    /// The tasks of every frame read together: one durable write, one ack per task (in order),
    /// a Fail frame for each frame that is not JSON or holds an empty array.
    fn on_texts(&self, texts: &[String], pushes: &Pushes) -> Vec<String> {
        // Per frame: its tasks (as a range in `values`), or its refusal.
        let mut frames: Vec<Result<std::ops::Range<usize>, String>> = Vec::new();
        let mut values: Vec<Value> = Vec::new();
        for text in texts {
            let start = values.len();
            match serde_json::from_slice::<Value>(text.as_bytes()) {
                Ok(Value::Array(items)) if items.is_empty() => {
                    frames.push(Err(fail_frame(None, "no task: the array is empty")))
                }
                Ok(Value::Array(items)) => {
                    values.extend(items);
                    frames.push(Ok(start..values.len()));
                }
                Ok(v) => {
                    values.push(v);
                    frames.push(Ok(start..values.len()));
                }
                Err(e) => frames.push(Err(fail_frame(
                    None,
                    format!("frame is not valid JSON: {e}"),
                ))),
            }
        }
        let answers = if values.is_empty() {
            Vec::new()
        } else {
            self.submitter.submit_each(&values, Origin::Ws, |ids| {
                self.answers
                    .push_each(ids.to_vec(), PUSH_WITHIN, pushes.clone());
            })
        };
        let mut out = Vec::with_capacity(answers.len() + frames.len());
        for frame in frames {
            match frame {
                Err(refusal) => out.push(refusal),
                Ok(range) => {
                    for i in range {
                        out.push(match &answers[i] {
                            Ok(id) => ok_frame(id),
                            Err(e) => fail_frame(values[i].get("id").and_then(Value::as_str), e),
                        });
                    }
                }
            }
        }
        out
    }
}

/// Queues `frames` on the connection (a full socket buffer keeps them queued); false when the
/// connection is broken.
fn send(ws: &mut WebSocket<TcpStream>, frames: Vec<String>) -> bool {
    for frame in frames {
        match ws.write(Message::text(frame)) {
            Ok(()) => {}
            Err(e) if would_block(&e) => {}
            Err(e) => {
                log::debug!("ws: cannot send: {e}");
                return false;
            }
        }
    }
    true
}

/// Writes what is queued as far as the socket takes it now; false when the connection is broken.
fn flushed(ws: &mut WebSocket<TcpStream>) -> bool {
    match ws.flush() {
        Ok(()) => true,
        Err(e) if would_block(&e) => true,
        Err(e) => {
            log::debug!("ws: cannot send: {e}");
            false
        }
    }
}

/// The ack of an accepted task, written straight from its parts (no JSON tree per task).
fn ok_frame(id: &str) -> String {
    let id = serde_json::to_string(id).unwrap_or_default();
    format!(r#"{{"id":{id},"result":"OK","reason":""}}"#)
}

/// A final result's frame, written straight from the result.
fn result_frame(r: &TaskResult) -> String {
    serde_json::to_string(r).unwrap_or_default()
}

/// Hands a result to its connection and wakes it. Never blocks.
struct Pusher {
    tx: Sender<TaskResult>,
    bell: Arc<Bell>,
}

impl Pusher {
    fn push(&self, result: TaskResult) {
        if self.tx.send(result).is_ok() {
            self.bell.ring();
        }
    }
}

/// An eventfd: `ring` makes it readable (poll wakes up) until `quiet` reads it.
struct Bell(OwnedFd, AtomicBool);

impl Bell {
    fn new() -> std::io::Result<Bell> {
        // SAFETY: eventfd(2) with valid flags; the new descriptor is owned by the OwnedFd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is not owned by anything else.
        Ok(Bell(
            unsafe { OwnedFd::from_raw_fd(fd) },
            AtomicBool::new(false),
        ))
    }

    /// Rings once until the next `quiet`: a burst of results costs one write and one wakeup.
    fn ring(&self) {
        if self.1.swap(true, Ordering::AcqRel) {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd (non-blocking; a full counter
        // only means it is readable already).
        unsafe {
            libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    /// Called before taking what the rings announced. The eventfd is read first, then the
    /// flag cleared: a ring between the two writes again (a spare wakeup), and one after them
    /// finds the flag clear, so no ring is ever lost.
    fn quiet(&self) {
        let mut n: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe {
            libc::read(self.0.as_raw_fd(), (&mut n as *mut u64).cast(), 8);
        }
        self.1.store(false, Ordering::Release);
    }

    /// True once rung (and not quieted): read without consuming, with a zero-timeout poll.
    fn rung(&self) -> bool {
        let mut p = [libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: poll(2) on one valid pollfd, no wait.
        unsafe { libc::poll(p.as_mut_ptr(), 1, 0) > 0 }
    }
}

/// Sleeps until the socket is readable (or writable, when output is pending), a result rings,
/// shutdown rings, or `wait` passes.
fn wait_for(
    sock: RawFd,
    pending: bool,
    bell: &Bell,
    stopping: &Bell,
    wait: Duration,
) -> std::io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: sock,
            events: libc::POLLIN | if pending { libc::POLLOUT } else { 0 },
            revents: 0,
        },
        libc::pollfd {
            fd: bell.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stopping.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // Whole milliseconds, at least one (0 would not wait), at most i32::MAX.
    let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
    loop {
        // SAFETY: poll(2) on an array of three valid pollfds we own.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}
