//! The WebSocket adapter (`/ws_task` on the HTTP port): each text frame is a task or an array of
//! tasks; each task gets an ack frame once durable, and its final result frame later on the same
//! connection while it is open. The connection keeps the thread that read its upgrade request.
//!
//! To push results while waiting for input, the socket gets a short receive timeout and the
//! thread looks for results to push between reads.

use super::{same_secret, submit, Origin};
use crate::app::App;
use crate::http::{Reply, Request, Response};
use crossbeam_channel::{unbounded, Receiver, Sender};
use serde_json::{json, Value};
use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
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

/// One open WebSocket connection, counted against `--max_ws` while it lives.
struct Open(Arc<App>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.ws_open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Checks the token (header or `?token=`), the connection cap and the handshake; the answer is
/// the `101` and the connection's session.
pub fn accept(app: &Arc<App>, req: &Request, query: &str) -> Reply {
    if let Some(token) = &app.config.token {
        let from_header = req
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "));
        let from_query = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .and_then(super::http::percent_decode);
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
    if app.ws_open.fetch_add(1, Ordering::AcqRel) >= app.config.max_ws {
        app.ws_open.fetch_sub(1, Ordering::AcqRel);
        return refuse(503, "too many WebSocket connections (--max_ws)");
    }
    let open = Open(app.clone());
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
            let app = open.0.clone();
            if let Err(e) = stream.set_read_timeout(Some(POLL)) {
                log::warn!("ws: cannot set a read timeout: {e}; the connection is closed");
                return;
            }
            let config = WebSocketConfig::default()
                .max_message_size(Some(app.config.max_body))
                .max_frame_size(Some(app.config.max_body));
            let ws = WebSocket::from_partially_read(stream, rest, Role::Server, Some(config));
            serve(&app, ws);
            drop(open);
        }),
    )
}

fn fail_frame(id: Option<&str>, reason: impl std::fmt::Display) -> String {
    json!({"id": id, "result": "Fail", "reason": reason.to_string()}).to_string()
}

/// Submits each task of a frame on its own: each gets its ack, and its result is pushed later.
fn on_text(app: &Arc<App>, text: &str, push: &Sender<String>) -> Vec<String> {
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
            let results = app.results.clone();
            let r = submit(app, std::slice::from_ref(&t), Origin::Network, move |acc| {
                results.wait_for(
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
                Ok(acc) => json!({"id": acc.ids.first(), "result": "OK", "reason": ""}).to_string(),
                Err(e) => fail_frame(given.as_deref(), e),
            }
        })
        .collect()
}

fn timed_out(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}

fn serve<S: std::io::Read + std::io::Write>(app: &Arc<App>, mut ws: WebSocket<S>) {
    let (push_tx, push_rx): (Sender<String>, Receiver<String>) = unbounded();
    let idle = Duration::from_secs(app.config.ws_idle);
    let mut last_input = Instant::now();
    loop {
        let mut out: Vec<String> = Vec::new();
        match ws.read() {
            Ok(Message::Text(t)) => {
                last_input = Instant::now();
                out = on_text(app, t.as_str(), &push_tx);
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
        if !app.accepting.load(Ordering::Acquire) || last_input.elapsed() > idle {
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
