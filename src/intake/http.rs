//! The HTTP adapter: routes requests, calls `submit` or reads results, and answers in JSON.
//! It runs on the connection's own thread (see [`crate::http`]): a request that waits for a
//! result (`wait` submits, long polls) registers with the results registry and blocks its own
//! connection only; the thread that finishes the task just hands the result over.

use super::{same_secret, submit, Origin, SubmitError};
use crate::app::App;
use crate::http::{Handler, Limits, Reply, Request, Response};
use crate::results::TaskResult;
use crate::store::Cancel;
use crossbeam_channel::bounded;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Default and longest long-poll time.
const POLL_DEFAULT_S: u64 = 60;
const POLL_MAX_S: u64 = 300;
/// How long past its own deadline a waiting request waits for the registry's answer before
/// answering with what the store says (the registry always answers; this is a backstop).
const WAIT_SLACK: Duration = Duration::from_secs(5);

/// The transport's limits from the flags.
pub fn limits(app: &App) -> Limits {
    Limits {
        max_body: app.config.max_body,
        idle: Duration::from_secs(app.config.http_idle),
        max_conns: app.config.max_conns,
    }
}

/// The API as a [`Handler`] for the HTTP transport.
pub struct Api {
    app: Arc<App>,
}

impl Api {
    pub fn new(app: Arc<App>) -> Api {
        Api { app }
    }
}

impl Handler for Api {
    fn handle(&self, req: Request) -> Reply {
        handle(&self.app, req)
    }
}

fn reply(code: u16, body: &Value) -> Reply {
    Response::json(code, body).into()
}

fn fail(code: u16, reason: impl std::fmt::Display) -> Reply {
    reply(
        code,
        &json!({"result": "Fail", "reason": reason.to_string()}),
    )
}

fn authorized(app: &App, req: &Request) -> bool {
    let Some(token) = &app.config.token else {
        return true;
    };
    req.header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
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

fn handle(app: &Arc<App>, req: Request) -> Reply {
    let path = req.path().to_string();
    let query = req.query().to_string();
    if path == "/health" {
        return reply(200, &json!({"status": "ok"}));
    }
    if path == "/ws_task" && req.is_websocket_upgrade() {
        return super::ws::accept(app, &req, &query);
    }
    if !authorized(app, &req) {
        return Response::json(
            401,
            &json!({"result": "Fail", "reason": "missing or wrong bearer token"}),
        )
        .with_header("WWW-Authenticate", "Bearer")
        .into();
    }
    match (req.method.as_str(), path.as_str()) {
        ("POST", "/task_in_queue") => post_task(app, &req.body),
        ("GET", "/sys_info") => reply(200, &app.status.sys_info(app)),
        ("GET", p) if p.starts_with("/task_resp/") => {
            let timeout = match query_param(&query, "timeout") {
                None => POLL_DEFAULT_S,
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if n <= POLL_MAX_S => n,
                    _ => {
                        return fail(
                            400,
                            format!(
                                "timeout: must be a whole number of seconds from 0 to {POLL_MAX_S}"
                            ),
                        )
                    }
                },
            };
            match percent_decode(&p["/task_resp/".len()..]) {
                Some(id) if !id.is_empty() => long_poll(app, &id, timeout),
                _ => fail(400, "id: missing or badly encoded"),
            }
        }
        ("DELETE", p) if p.starts_with("/task/") => match percent_decode(&p["/task/".len()..]) {
            Some(id) if !id.is_empty() => cancel(app, &id),
            _ => fail(400, "id: missing or badly encoded"),
        },
        (_, "/task_in_queue" | "/sys_info" | "/health") => fail(405, "method not allowed"),
        (_, p) if p.starts_with("/task_resp/") || p.starts_with("/task/") => {
            fail(405, "method not allowed")
        }
        (_, p) => fail(404, format!("no such endpoint: {p}")),
    }
}

fn post_task(app: &Arc<App>, body: &[u8]) -> Reply {
    let parsed: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return fail(400, format!("body is not valid JSON: {e}")),
    };
    let (values, is_array) = match parsed {
        Value::Array(items) => (items, true),
        other => (vec![other], false),
    };
    // Registered once the tasks are durable and before any can finish, so no result slips by.
    let mut waiting = None;
    let result = submit(app, &values, Origin::Network, |acc| {
        if acc.wait > 0 {
            let wait = Duration::from_secs(acc.wait);
            waiting = Some((register(app, acc.ids.clone(), wait), wait));
        }
    });
    let acc = match result {
        Ok(acc) => acc,
        Err(e) => {
            let code = match e {
                SubmitError::Invalid { .. } | SubmitError::Empty => 400,
                SubmitError::Duplicate(_) => 409,
                SubmitError::Unavailable(_) | SubmitError::ShuttingDown => 503,
            };
            return fail(code, e);
        }
    };
    let Some((rx, wait)) = waiting else {
        let body = if is_array {
            json!({"result": "OK", "reason": "", "ids": acc.ids})
        } else {
            json!({"result": "OK", "reason": "", "id": acc.ids.first()})
        };
        return reply(200, &body);
    };
    let got = rx
        .recv_timeout(wait + WAIT_SLACK)
        .unwrap_or_else(|_| vec![None; acc.ids.len()]);
    let done = got.iter().all(Option::is_some);
    let items: Vec<Value> = got
        .iter()
        .zip(&acc.ids)
        .map(|(r, id)| match r {
            Some(r) => json!(r),
            None => pending(app, id),
        })
        .collect();
    let body = if is_array {
        json!({"result": if done {"OK"} else {"Timeout"}, "reason": "", "ids": acc.ids, "results": items})
    } else {
        items.into_iter().next().unwrap_or(Value::Null)
    };
    reply(if done { 200 } else { 202 }, &body)
}

/// Parks a wait for `ids` in the results registry; the answer comes through the channel. The
/// finishing thread's send never blocks (room for the one answer).
fn register(
    app: &App,
    ids: Vec<String>,
    wait: Duration,
) -> crossbeam_channel::Receiver<Vec<Option<TaskResult>>> {
    let (tx, rx) = bounded(1);
    app.results.wait_for(
        ids,
        wait,
        Box::new(move |got| {
            let _ = tx.try_send(got);
        }),
    );
    rx
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

fn long_poll(app: &Arc<App>, asked: &str, timeout: u64) -> Reply {
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
        Err(e) => fail(503, e),
        Ok(None) => fail(404, format!("unknown or expired id {asked:?}")),
        Ok(Some(Some(r))) => reply(200, &json!(r)),
        Ok(Some(None)) if timeout == 0 => reply(202, &pending(app, &id)),
        Ok(Some(None)) => {
            let wait = Duration::from_secs(timeout);
            let rx = register(app, vec![id.clone()], wait);
            // It may have finished between the lookup and the registration.
            if let Ok(Some(r)) = app.store.result(&id) {
                app.results.publish(&r);
            }
            match rx
                .recv_timeout(wait + WAIT_SLACK)
                .ok()
                .and_then(|g| g.into_iter().next().flatten())
            {
                Some(r) => reply(200, &json!(r)),
                None => reply(202, &pending(app, &id)),
            }
        }
    }
}

fn cancel(app: &App, id: &str) -> Reply {
    match app.store.cancel(id) {
        Ok(Cancel::Cancelled) => {
            app.pool.remove(id);
            log::info!("task {id} cancelled");
            reply(
                200,
                &json!({"result": "OK", "reason": "cancelled", "id": id}),
            )
        }
        Ok(Cancel::Running) => fail(
            409,
            format!("task {id:?} is running and cannot be cancelled"),
        ),
        Ok(Cancel::Finished) => fail(409, format!("task {id:?} has already finished")),
        Ok(Cancel::Unknown) => fail(404, format!("unknown id {id:?}")),
        Err(e) => fail(503, e),
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
