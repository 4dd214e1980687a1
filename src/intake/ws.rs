//! The WebSocket adapter (`/ws_task` on the HTTP port): each text frame is a task or an array of
//! tasks; each task gets an ack frame once durable, and its final result frame later on the same
//! connection while it is open. One thread per connection.
//!
//! tiny_http hands over the upgraded connection as a boxed stream without socket access. To push
//! results while waiting for input, the thread needs reads that time out: the socket is found
//! among the process's descriptors by its peer address and given a short receive timeout. Only
//! WebSocket sockets get one; ordinary HTTP connections are untouched.

use super::{same_secret, submit, Origin};
use crate::app::App;
use crossbeam_channel::{unbounded, Receiver, Sender};
use serde_json::{json, Value};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use tiny_http::{Header, Request, Response};
use tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

/// How often a connection thread looks for results to push.
const POLL: Duration = Duration::from_millis(20);
/// Longest a connection keeps waiting to push one task's result.
const PUSH_WITHIN: Duration = Duration::from_secs(24 * 3600);

/// True for a WebSocket upgrade request.
pub fn is_upgrade(req: &Request) -> bool {
    req.headers()
        .iter()
        .any(|h| h.field.equiv("Upgrade") && h.value.as_str().eq_ignore_ascii_case("websocket"))
}

fn header<'a>(req: &'a Request, name: &'static str) -> Option<&'a str> {
    req.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

fn refuse(req: Request, code: u16, reason: &str) {
    let body = json!({"result": "Fail", "reason": reason}).to_string();
    let _ = req.respond(Response::from_string(body).with_status_code(code));
}

/// Checks the token (header or `?token=`), the connection cap and the handshake, then hands the
/// connection to its own thread.
pub fn accept(app: &Arc<App>, req: Request, query: &str) {
    if let Some(token) = &app.config.token {
        let from_header = header(&req, "Authorization").and_then(|v| v.strip_prefix("Bearer "));
        let from_query = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .and_then(super::http::percent_decode);
        let given = from_header
            .map(str::to_string)
            .or(from_query)
            .unwrap_or_default();
        if !same_secret(given.trim().as_bytes(), token.as_bytes()) {
            return refuse(req, 401, "missing or wrong bearer token");
        }
    }
    let Some(key) = header(&req, "Sec-WebSocket-Key").map(str::to_string) else {
        return refuse(req, 400, "Sec-WebSocket-Key: missing");
    };
    if header(&req, "Sec-WebSocket-Version") != Some("13") {
        return refuse(req, 400, "Sec-WebSocket-Version: only 13 is supported");
    }
    let open = app.ws_open.fetch_add(1, Ordering::AcqRel);
    if open >= app.config.max_ws {
        app.ws_open.fetch_sub(1, Ordering::AcqRel);
        return refuse(req, 503, "too many WebSocket connections (--max_ws)");
    }
    let peer = req.remote_addr().copied();
    let accept_key = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let resp = Response::empty(101).with_header(Header {
        field: "Sec-WebSocket-Accept".parse().expect("static header name"), // ok: constant
        value: match accept_key.parse() {
            Ok(v) => v,
            Err(_) => {
                app.ws_open.fetch_sub(1, Ordering::AcqRel);
                return refuse(req, 400, "Sec-WebSocket-Key: not ASCII");
            }
        },
    });
    let stream = req.upgrade("websocket", resp);
    if let Some(peer) = peer {
        if !set_read_timeout(peer, app.config.port, POLL) {
            log::warn!(
                "ws: cannot set a read timeout for {peer}; results are pushed after the next frame"
            );
        }
    }
    let app2 = app.clone();
    let spawned = thread::Builder::new().name("ws".into()).spawn(move || {
        let config = WebSocketConfig::default()
            .max_message_size(Some(app2.config.max_body))
            .max_frame_size(Some(app2.config.max_body));
        let ws = WebSocket::from_raw_socket(stream, Role::Server, Some(config));
        serve(&app2, ws);
        app2.ws_open.fetch_sub(1, Ordering::AcqRel);
    });
    if let Err(e) = spawned {
        app.ws_open.fetch_sub(1, Ordering::AcqRel);
        log::error!("ws: cannot start a connection thread: {e}");
    }
}

/// Finds the socket connected to `peer` on our `port` and sets its receive timeout.
fn set_read_timeout(peer: SocketAddr, port: u16, timeout: Duration) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return false;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if !std::fs::read_link(entry.path())
            .map(|l| l.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false)
        {
            continue;
        }
        if sock_addr(fd, true) == Some(peer) && sock_addr(fd, false).map(|a| a.port()) == Some(port)
        {
            let tv = libc::timeval {
                tv_sec: timeout.as_secs() as _,
                tv_usec: timeout.subsec_micros() as _,
            };
            // SAFETY: setsockopt on a descriptor this process owns, with a valid timeval.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            return rc == 0;
        }
    }
    false
}

/// The peer (or local) address of a socket descriptor.
fn sock_addr(fd: i32, peer: bool) -> Option<SocketAddr> {
    // SAFETY: a zeroed sockaddr_storage is a valid out-parameter of the size we pass.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let ptr = (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
    // SAFETY: getpeername/getsockname write at most `len` bytes into `storage`.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, ptr, &mut len)
        } else {
            libc::getsockname(fd, ptr, &mut len)
        }
    };
    if rc != 0 {
        return None;
    }
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a = unsafe { *(ptr as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a = unsafe { *(ptr as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(a.sin6_port))))
        }
        _ => None,
    }
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
