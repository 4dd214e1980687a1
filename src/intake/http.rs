//! The HTTP adapter: parses requests, calls `submit` or reads results, and answers in JSON.
//! Requests that wait (`wait` submits, long polls) are parked in the results registry and
//! answered by whichever thread finishes the task, so they hold no HTTP thread.

use super::{same_secret, submit, Origin, SubmitError};
use crate::app::App;
use crate::results::TaskResult;
use crate::store::Cancel;
use serde_json::{json, Value};
use std::io::Read;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;
use tiny_http::{Header, Method, Request, Response, Server};

/// Threads taking requests off the server's queue. Submits block on group commit (a few ms),
/// so more threads than cores keep commits full.
const HANDLERS: usize = 32;
/// Default and longest long-poll time.
const POLL_DEFAULT_S: u64 = 60;
const POLL_MAX_S: u64 = 300;

/// Binds the listening socket before anything else starts, so that a busy port stops start-up
/// before the store is opened and recovered tasks run. A connection that sends nothing for
/// `idle` (an idle keep-alive connection, or a client stalled mid-request) is closed, and at most
/// `max_conns` connections are served at once (each holds a thread; more get a 503).
pub fn listen(
    bind: std::net::IpAddr,
    port: u16,
    idle: Duration,
    max_conns: usize,
) -> Result<Arc<Server>, String> {
    let listener = std::net::TcpListener::bind((bind, port))
        .map_err(|e| format!("--port: cannot listen on {bind}:{port}: {e}"))?;
    no_delay(&listener);
    Server::from_listener_with_limits(listener, None, Some(idle), Some(max_conns))
        .map(Arc::new)
        .map_err(|e| format!("--port: cannot serve on {bind}:{port}: {e}"))
}

/// Sets `TCP_NODELAY` on the listening socket; Linux gives it to every accepted connection.
/// tiny_http writes answers through a 1 KiB buffer, so without it an answer over 1 KiB waits
/// ~40 ms for the client's delayed ACK (Nagle).
fn no_delay(listener: &std::net::TcpListener) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket this process owns, with a valid int option value.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::warn!(
            "http: TCP_NODELAY not set: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Starts the handler threads.
pub fn serve(app: Arc<App>, server: Arc<Server>) -> std::io::Result<Vec<JoinHandle<()>>> {
    (0..HANDLERS)
        .map(|i| {
            let app = app.clone();
            let server = server.clone();
            thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || {
                    while let Ok(req) = server.recv() {
                        handle(&app, req);
                    }
                })
        })
        .collect()
}

fn json_header() -> Header {
    Header {
        field: "Content-Type".parse().expect("static header name"), // ok: constant
        value: "application/json".parse().expect("static header value"), // ok: constant
    }
}

/// Sends a JSON answer; a client that has gone away is not an error worth more than a line.
fn reply(req: Request, code: u16, body: &Value) {
    let resp = Response::from_string(body.to_string())
        .with_status_code(code)
        .with_header(json_header());
    if let Err(e) = req.respond(resp) {
        log::debug!("http: client went away before the answer: {e}");
    }
}

fn fail(req: Request, code: u16, reason: impl std::fmt::Display) {
    reply(
        req,
        code,
        &json!({"result": "Fail", "reason": reason.to_string()}),
    );
}

fn authorized(app: &App, req: &Request) -> bool {
    let Some(token) = &app.config.token else {
        return true;
    };
    req.headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
        .and_then(|h| h.value.as_str().strip_prefix("Bearer "))
        .is_some_and(|given| same_secret(given.trim().as_bytes(), token.as_bytes()))
}

/// Decodes `%XX` escapes; `None` for bad escapes or bad UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
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

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn handle(app: &Arc<App>, req: Request) {
    let url = req.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let method = req.method().clone();
    if path == "/health" {
        return reply(req, 200, &json!({"status": "ok"}));
    }
    if path == "/ws_task" && super::ws::is_upgrade(&req) {
        let query = query.to_string();
        return super::ws::accept(app, req, &query);
    }
    if !authorized(app, &req) {
        let resp = Response::from_string(
            json!({"result": "Fail", "reason": "missing or wrong bearer token"}).to_string(),
        )
        .with_status_code(401)
        .with_header(json_header())
        .with_header(Header {
            field: "WWW-Authenticate".parse().expect("static header name"), // ok: constant
            value: "Bearer".parse().expect("static header value"),          // ok: constant
        });
        let _ = req.respond(resp);
        return;
    }
    match (method, path) {
        (Method::Post, "/task_in_queue") => post_task(app, req),
        (Method::Get, "/sys_info") => {
            let info = app.status.sys_info(app);
            reply(req, 200, &info)
        }
        (Method::Get, p) if p.starts_with("/task_resp/") => {
            let timeout = match query_param(query, "timeout") {
                None => POLL_DEFAULT_S,
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if n <= POLL_MAX_S => n,
                    _ => {
                        return fail(
                            req,
                            400,
                            format!(
                                "timeout: must be a whole number of seconds from 0 to {POLL_MAX_S}"
                            ),
                        )
                    }
                },
            };
            let raw = &p["/task_resp/".len()..];
            match percent_decode(raw) {
                Some(id) if !id.is_empty() => long_poll(app, req, &id, timeout),
                _ => fail(req, 400, "id: missing or badly encoded"),
            }
        }
        (Method::Delete, p) if p.starts_with("/task/") => {
            match percent_decode(&p["/task/".len()..]) {
                Some(id) if !id.is_empty() => cancel(app, req, &id),
                _ => fail(req, 400, "id: missing or badly encoded"),
            }
        }
        (_, "/task_in_queue" | "/sys_info" | "/health") => fail(req, 405, "method not allowed"),
        (_, p) if p.starts_with("/task_resp/") || p.starts_with("/task/") => {
            fail(req, 405, "method not allowed")
        }
        (_, p) => fail(req, 404, format!("no such endpoint: {p}")),
    }
}

/// Reads the body, refusing more than `--max_body` bytes.
fn read_body(app: &App, req: &mut Request) -> Result<Vec<u8>, (u16, String)> {
    let max = app.config.max_body;
    let too_big = || {
        (
            413,
            format!("request body larger than {max} bytes (--max_body)"),
        )
    };
    if req.body_length().is_some_and(|n| n > max) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    req.as_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| (400, format!("cannot read the request body: {e}")))?;
    if body.len() > max {
        return Err(too_big());
    }
    Ok(body)
}

fn post_task(app: &Arc<App>, mut req: Request) {
    let body = match read_body(app, &mut req) {
        Ok(b) => b,
        Err((code, why)) => return fail(req, code, why),
    };
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return fail(req, 400, format!("body is not valid JSON: {e}")),
    };
    let (values, is_array) = match parsed {
        Value::Array(items) => (items, true),
        other => (vec![other], false),
    };
    let mut slot = Some(req);
    let app2 = app.clone();
    let result = submit(app, &values, Origin::Network, |acc| {
        if acc.wait > 0 {
            if let Some(req) = slot.take() {
                park_submit(&app2, req, acc.ids.clone(), acc.wait, is_array);
            }
        }
    });
    match (result, slot) {
        (Ok(acc), Some(req)) => {
            let body = if is_array {
                json!({"result": "OK", "reason": "", "ids": acc.ids})
            } else {
                json!({"result": "OK", "reason": "", "id": acc.ids.first()})
            };
            reply(req, 200, &body)
        }
        (Ok(_), None) => {} // parked: answered when the result arrives
        (Err(e), Some(req)) => {
            let code = match e {
                SubmitError::Invalid { .. } | SubmitError::Empty => 400,
                SubmitError::Duplicate(_) => 409,
                SubmitError::Unavailable(_) | SubmitError::ShuttingDown => 503,
            };
            fail(req, code, e)
        }
        (Err(e), None) => log::error!("http: submit failed after parking a request: {e}"),
    }
}

/// The 202 body for a task that has not finished.
fn pending(app: &App, id: &str) -> Value {
    let status = match app.store.status(id) {
        Ok(Some(s)) => s.as_str(),
        Ok(None) => "unknown",
        Err(_) => "store unavailable",
    };
    json!({"id": id, "result": "Timeout", "reason": "not finished yet", "status": status})
}

fn park_submit(app: &Arc<App>, req: Request, ids: Vec<String>, wait: u64, is_array: bool) {
    let app2 = app.clone();
    let ids2 = ids.clone();
    app.results.wait_for(
        ids,
        Duration::from_secs(wait),
        Box::new(move |got: Vec<Option<TaskResult>>| {
            let done = got.iter().all(Option::is_some);
            let code = if done { 200 } else { 202 };
            let items: Vec<Value> = got
                .iter()
                .zip(&ids2)
                .map(|(r, id)| match r {
                    Some(r) => json!(r),
                    None => pending(&app2, id),
                })
                .collect();
            let body = if is_array {
                json!({"result": if done {"OK"} else {"Timeout"}, "reason": "", "ids": ids2, "results": items})
            } else {
                items.into_iter().next().unwrap_or(Value::Null)
            };
            reply(req, code, &body);
        }),
    );
}

fn long_poll(app: &Arc<App>, req: Request, asked: &str, timeout: u64) {
    // `task-<id>` is accepted for `<id>` when only the short form is known.
    let known = |id: &str| -> Result<Option<Option<TaskResult>>, crate::store::StoreError> {
        if let Some(r) = app.store.result(id)? {
            return Ok(Some(Some(r)));
        }
        Ok(app.store.status(id)?.map(|_| None))
    };
    let mut id = asked.to_string();
    let mut found = known(&id);
    if matches!(found, Ok(None)) {
        if let Some(short) = asked.strip_prefix("task-") {
            if let Ok(Some(f)) = known(short) {
                id = short.to_string();
                found = Ok(Some(f));
            }
        }
    }
    match found {
        Err(e) => fail(req, 503, e),
        Ok(None) => fail(req, 404, format!("unknown or expired id {asked:?}")),
        Ok(Some(Some(r))) => reply(req, 200, &json!(r)),
        Ok(Some(None)) if timeout == 0 => reply(req, 202, &pending(app, &id)),
        Ok(Some(None)) => {
            let app2 = app.clone();
            let id2 = id.clone();
            app.results.wait_for(
                vec![id.clone()],
                Duration::from_secs(timeout),
                Box::new(move |got| match got.into_iter().next().flatten() {
                    Some(r) => reply(req, 200, &json!(r)),
                    None => reply(req, 202, &pending(&app2, &id2)),
                }),
            );
            // It may have finished between the lookup and the registration.
            if let Ok(Some(r)) = app.store.result(&id) {
                app.results.publish(&r);
            }
        }
    }
}

fn cancel(app: &App, req: Request, id: &str) {
    match app.store.cancel(id) {
        Ok(Cancel::Cancelled) => {
            app.pool.remove(id);
            log::info!("task {id} cancelled");
            reply(
                req,
                200,
                &json!({"result": "OK", "reason": "cancelled", "id": id}),
            )
        }
        Ok(Cancel::Running) => fail(
            req,
            409,
            format!("task {id:?} is running and cannot be cancelled"),
        ),
        Ok(Cancel::Finished) => fail(req, 409, format!("task {id:?} has already finished")),
        Ok(Cancel::Unknown) => fail(req, 404, format!("unknown id {id:?}")),
        Err(e) => fail(req, 503, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
        assert_eq!(query_param("a=1&timeout=5", "timeout"), Some("5"));
    }
}
