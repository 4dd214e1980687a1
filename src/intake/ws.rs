//! The WebSocket adapter (`/ws_task` on the HTTP port): each text frame is a task or an array of
//! tasks; each task gets an ack frame once durable, and its final result frame later on the same
//! connection while it is open. The connection keeps the thread that read its upgrade request.
//!
//! To push results while waiting for input, the socket gets a short receive timeout and the
//! thread looks for results to push between reads.

use super::{same_secret, Origin, Submitter};
use crate::http::{percent_decode, query_param, Reply, Request, Response};
use crate::results::Answers;
use crossbeam_channel::{unbounded, Receiver, Sender};
use serde_json::{json, Value};
use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

/// How often a connection thread looks for results to push.
const POLL: Duration = Duration::from_millis(20);
/// Longest a connection keeps waiting to push one task's result.
const PUSH_WITHIN: Duration = Duration::from_secs(24 * 3600);

fn refuse(code: u16, reason: &str) -> Reply {
    Response::json(code, &json!({"result": "Fail", "reason": reason})).into()
}

/// The WebSocket endpoint: what its connections need, and how many are open.
pub struct WebSockets {
    pub submitter: Submitter,
    pub answers: Answers,
    /// `--token` (header or `?token=`).
    pub token: Option<String>,
    /// `--max_ws`: most open connections.
    pub max_open: usize,
    /// `--max_body`: largest frame.
    pub max_frame: usize,
    /// `--ws_idle`: a connection with no input for this long is closed.
    pub idle: Duration,
    /// Connections open now.
    pub open: AtomicUsize,
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
    pub fn accept(self: &Arc<Self>, req: &Request, query: &str) -> Reply {
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
                return refuse(401, "missing or wrong bearer token");
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
            Box::new(move |stream: TcpStream, rest: Vec<u8>| {
                if let Err(e) = stream.set_read_timeout(Some(POLL)) {
                    log::warn!("ws: cannot set a read timeout: {e}; the connection is closed");
                    return;
                }
                let config = WebSocketConfig::default()
                    .max_message_size(Some(open.0.max_frame))
                    .max_frame_size(Some(open.0.max_frame));
                let ws = WebSocket::from_partially_read(stream, rest, Role::Server, Some(config));
                open.0.serve(ws);
            }),
        )
    }
}

fn fail_frame(id: Option<&str>, reason: impl std::fmt::Display) -> String {
    json!({"id": id, "result": "Fail", "reason": reason.to_string()}).to_string()
}

impl WebSockets {
    /// Submits each task of a frame on its own: each gets its ack, and its result is pushed later.
    fn on_text(&self, text: &str, push: &Sender<String>) -> Vec<String> {
        let parsed: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return vec![fail_frame(None, format!("frame is not valid JSON: {e}"))],
        };
        let tasks = match parsed {
            Value::Array(items) if items.is_empty() => {
                return vec![fail_frame(None, "no task: the array is empty")]
            }
            Value::Array(items) => items,
            other => vec![other],
        };
        tasks
            .into_iter()
            .map(|t| {
                let given = t.get("id").and_then(Value::as_str).map(str::to_string);
                let push = push.clone();
                let r = self
                    .submitter
                    .submit(std::slice::from_ref(&t), Origin::Network, |acc| {
                        self.answers.on_results(
                            acc.ids.clone(),
                            PUSH_WITHIN,
                            Box::new(move |got| {
                                if let Some(Some(r)) = got.into_iter().next() {
                                    let _ = push.send(json!(r).to_string());
                                }
                            }),
                        );
                    });
                match r {
                    Ok(acc) => {
                        json!({"id": acc.ids.first(), "result": "OK", "reason": ""}).to_string()
                    }
                    Err(e) => fail_frame(given.as_deref(), e),
                }
            })
            .collect()
    }
}

fn timed_out(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}

impl WebSockets {
    fn serve<S: std::io::Read + std::io::Write>(&self, mut ws: WebSocket<S>) {
        let (push_tx, push_rx): (Sender<String>, Receiver<String>) = unbounded();
        let idle = self.idle;
        let mut last_input = Instant::now();
        loop {
            let mut out: Vec<String> = Vec::new();
            match ws.read() {
                Ok(Message::Text(t)) => {
                    last_input = Instant::now();
                    out = self.on_text(t.as_str(), &push_tx);
                }
                Ok(Message::Binary(_)) => {
                    last_input = Instant::now();
                    out.push(fail_frame(
                        None,
                        "binary frames are not supported: send JSON text",
                    ));
                }
                Ok(Message::Close(_)) => break,
                Ok(_) => last_input = Instant::now(), // ping (answered on the next flush) or pong
                Err(e) if timed_out(&e) => {}
                Err(tungstenite::Error::Capacity(e)) => {
                    let _ = ws.send(Message::text(fail_frame(
                        None,
                        format!("frame too large: {e} (--max_body)"),
                    )));
                    let _ = ws.close(Some(CloseFrame {
                        code: CloseCode::Size,
                        reason: "frame too large".into(),
                    }));
                    let _ = ws.flush();
                    break;
                }
                Err(e) => {
                    log::debug!("ws: connection ends: {e}");
                    break;
                }
            }
            out.extend(push_rx.try_iter());
            let mut broken = false;
            for frame in out {
                if let Err(e) = ws.send(Message::text(frame)) {
                    if !timed_out(&e) {
                        log::debug!("ws: cannot send: {e}");
                        broken = true;
                        break;
                    }
                }
            }
            if broken {
                break;
            }
            match ws.flush() {
                Ok(()) => {}
                Err(e) if timed_out(&e) => {}
                Err(_) => break,
            }
            if !self.submitter.accepting() || last_input.elapsed() > idle {
                let reason = if last_input.elapsed() > idle {
                    "idle"
                } else {
                    "server shutting down"
                };
                let _ = ws.close(Some(CloseFrame {
                    code: CloseCode::Away,
                    reason: reason.into(),
                }));
                let _ = ws.flush();
                break;
            }
        }
    }
}
