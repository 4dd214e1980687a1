//! The HTTP adapter: routes requests, calls `submit` or reads results, and answers in JSON.
//! Submits that do not wait are answered on the transport's loop thread, all of one wake-up in
//! one durable write (`handle_quick`); every other request runs on its connection's own thread
//! (see [`crate::http`]): a request that waits for a result (`wait` submits, long polls)
//! registers with the results registry and blocks its own connection only; the thread that
//! finishes the task just hands the result over.

use super::assets;
use super::browse;
use super::ws::WebSockets;
use super::{same_secret, Origin, SubmitError, Submitter};
use crate::http::{percent_decode, query_param, Handler, Limits, Quick, Reply, Request, Response};
use crate::results::{Answers, Found, TaskResult, WAIT_SLACK};
use crate::status::SysInfo;
use crate::store::{Cancel, Revive};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Default and longest long-poll time.
const POLL_DEFAULT_S: u64 = 60;
const POLL_MAX_S: u64 = 300;
/// Largest submit body parsed on the transport's loop thread; larger ones go to a thread.
const QUICK_BODY: usize = 4 * 1024;
/// The media type of Prometheus text.
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The transport's limits from the flags.
pub fn limits(config: &crate::config::Config) -> Limits {
    Limits {
        max_body: config.max_body,
        idle: Duration::from_secs(config.http_idle),
        max_conns: config.max_conns,
    }
}

/// The API as a [`Handler`] for the HTTP transport: exactly the handles it needs.
pub struct Api {
    pub submitter: Submitter,
    pub answers: Answers,
    pub sys_info: SysInfo,
    /// `--token`: required on every endpoint but `/health`.
    pub token: Option<String>,
    pub ws: Arc<WebSockets>,
}

impl Handler for Api {
    fn handle(&self, req: Request) -> Reply {
        self.route(req)
    }

    /// Submits that do not wait are made durable together (one write for all); everything
    /// else may wait (`/health` too, for a durable write of the same round), and goes to a
    /// thread.
    fn handle_quick(&self, reqs: Vec<Request>) -> Vec<Quick> {
        let mut out: Vec<Option<Quick>> = Vec::with_capacity(reqs.len());
        // Where each submit's answer goes, its tasks, and whether they came as an array.
        let mut submits: Vec<(usize, Vec<Value>, bool)> = Vec::new();
        for req in reqs {
            match self.sort(req) {
                Sorted::Now(r) => out.push(Some(Quick::Answered(r))),
                Sorted::Slow(r) => out.push(Some(Quick::Slow(r))),
                Sorted::Submit(values, is_array) => {
                    submits.push((out.len(), values, is_array));
                    out.push(None);
                }
            }
        }
        if !submits.is_empty() {
            let each: Vec<&[Value]> = submits.iter().map(|(_, v, _)| v.as_slice()).collect();
            let results = self.submitter.submit_many(&each, Origin::Http, &mut |_| {});
            for ((at, _, is_array), r) in submits.iter().zip(results) {
                out[*at] = Some(Quick::Answered(match r {
                    Ok(acc) => accepted(&acc.ids, *is_array),
                    Err(e) => refusal(e),
                }));
            }
        }
        out.into_iter()
            .map(|q| {
                q.unwrap_or_else(|| Quick::Answered(Response::fail(500, "submit not answered")))
            })
            .collect()
    }
}

/// What the loop thread does with one request.
enum Sorted {
    /// Answered already.
    Now(Response),
    /// It may wait: to a thread.
    Slow(Request),
    /// A submit that does not wait: its tasks, and whether they came as an array.
    Submit(Vec<Value>, bool),
}

/// The tasks of a submit's body, and whether they came as an array; or the 400 it gets.
fn submission(body: &[u8]) -> Result<(Vec<Value>, bool), Response> {
    match serde_json::from_slice(body) {
        Ok(Value::Array(items)) => Ok((items, true)),
        Ok(other) => Ok((vec![other], false)),
        Err(e) => Err(Response::fail(400, format!("body is not valid JSON: {e}"))),
    }
}

/// The answer to a refused submit.
fn refusal(e: SubmitError) -> Response {
    let code = match e {
        SubmitError::Invalid { .. } | SubmitError::Empty => 400,
        SubmitError::Duplicate(_) => 409,
        SubmitError::Unavailable(_) | SubmitError::ShuttingDown => 503,
    };
    Response::fail(code, e)
}

/// The 401 of a request without the right `--token`.
fn unauthorized() -> Response {
    Response::fail(401, "missing or wrong bearer token").with_header("WWW-Authenticate", "Bearer")
}

fn reply(code: u16, body: &Value) -> Reply {
    Response::json(code, body).into()
}

/// A 200 with JSON already written.
fn json_text(body: String) -> Reply {
    Response::json_bytes(200, body.into_bytes()).into()
}

/// The 200 of a submit that does not wait, `{"id":…,"reason":"","result":"OK"}` (`"ids":[…]`
/// for an array), written straight into the answer's bytes: no `Value` built and dropped.
fn accepted(ids: &[String], is_array: bool) -> Response {
    let mut out = Vec::with_capacity(40 + ids.iter().map(|id| id.len() + 3).sum::<usize>());
    // Strings written into a `Vec` cannot fail.
    let _ = if is_array {
        out.extend_from_slice(b"{\"ids\":");
        serde_json::to_writer(&mut out, ids)
    } else {
        out.extend_from_slice(b"{\"id\":");
        serde_json::to_writer(&mut out, &ids.first())
    };
    out.extend_from_slice(b",\"reason\":\"\",\"result\":\"OK\"}");
    Response::json_bytes(200, out)
}

fn fail(code: u16, reason: impl std::fmt::Display) -> Reply {
    Response::fail(code, reason).into()
}

/// The methods `path` answers to (behind the token), for a 405's `Allow`.
fn allowed(path: &str) -> Option<&'static str> {
    Some(match path {
        "/task_in_queue" | "/pause" | "/resume" => "POST",
        "/sys_info" | "/metrics" | "/" | "/tasks" => "GET",
        "/tasks/retry" => "POST",
        p if p.starts_with("/task_resp/") => "GET",
        p if p.starts_with("/task/") && p.ends_with("/retry") => "POST",
        p if p.starts_with("/task/") => "GET, DELETE",
        _ => return None,
    })
}

/// 405, naming the methods the path allows (RFC 9110 requires `Allow` on a 405).
fn not_allowed(methods: &'static str) -> Reply {
    Response::fail(405, "method not allowed")
        .with_header("Allow", methods)
        .into()
}

fn authorized(token: Option<&str>, req: &Request) -> bool {
    let Some(token) = token else {
        return true;
    };
    req.header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| same_secret(given.trim().as_bytes(), token.as_bytes()))
}

impl Api {
    fn route(&self, req: Request) -> Reply {
        let (path, query) = (req.path(), req.query());
        if path == "/health" {
            // A load balancer stops sending work once shutdown has begun.
            return if !matches!(req.method.as_str(), "GET" | "HEAD") {
                not_allowed("GET, HEAD")
            } else if self.submitter.accepting() {
                reply(200, &json!({"status": "ok"}))
            } else {
                reply(503, &json!({"status": "stopping"}))
            };
        }
        if path == "/ws_task" && req.is_websocket_upgrade() {
            return self.ws.accept(&req, query);
        }
        // The page and the API document hold no data: the page asks for the token itself.
        if let Some(asset) = assets::by_path(path) {
            return if req.method == "GET" {
                assets::serve(asset, &req)
            } else {
                not_allowed("GET")
            };
        }
        if path == "/" && req.method == "GET" {
            return Response::text(302, "see /ui\n")
                .with_header("Location", "/ui")
                .into();
        }
        if !authorized(self.token.as_deref(), &req) {
            return unauthorized().into();
        }
        match (req.method.as_str(), path) {
            ("POST", "/task_in_queue") => self.post_task(&req.body),
            ("POST", "/pause") => self.pause(true),
            ("POST", "/resume") => self.pause(false),
            ("GET", "/sys_info") => reply(200, &self.sys_info.json()),
            ("GET", "/metrics") => Response {
                code: 200,
                kind: METRICS_TYPE,
                headers: Vec::new(),
                body: self.sys_info.metrics().into_bytes(),
                close: false,
            }
            .into(),
            ("GET", p) if p.starts_with("/task_resp/") => {
                let timeout = match query_param(query, "timeout") {
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
                    Some(id) if !id.is_empty() => self.long_poll(&id, timeout),
                    _ => fail(400, "id: missing or badly encoded"),
                }
            }
            ("GET", "/tasks") => self.list(query),
            ("POST", "/tasks/retry") => self.retry_all(query),
            ("GET", p) if p.starts_with("/task/") => match task_id(p, "") {
                Some(id) => self.lookup(&id),
                None => fail(400, "id: missing or badly encoded"),
            },
            ("POST", p) if p.starts_with("/task/") && p.ends_with("/retry") => {
                match task_id(p, "/retry") {
                    Some(id) => self.retry(&id),
                    None => fail(400, "id: missing or badly encoded"),
                }
            }
            ("DELETE", p) if p.starts_with("/task/") => {
                match percent_decode(&p["/task/".len()..]) {
                    Some(id) if !id.is_empty() => self.cancel(&id),
                    _ => fail(400, "id: missing or badly encoded"),
                }
            }
            (_, p) => match allowed(p) {
                Some(methods) => not_allowed(methods),
                None => fail(404, format!("no such endpoint: {p}")),
            },
        }
    }

    /// Sorts a request for the loop thread (see `handle_quick`).
    fn sort(&self, req: Request) -> Sorted {
        if req.path() != "/task_in_queue" || req.method != "POST" {
            return Sorted::Slow(req);
        }
        if !authorized(self.token.as_deref(), &req) {
            return Sorted::Now(unauthorized());
        }
        // One that may ask to wait for results waits on a thread, and is parsed there (a key
        // or a value "wait" anywhere sends it there: parsing large bodies twice costs more).
        // A large one (an array of many tasks) goes there too: parsing and checking it on the
        // loop thread would hold every other client's submits, and on a thread of its own it
        // is done beside the others' (with arrays of 50 tasks, 8 clients submitted half as
        // fast through the loop thread).
        if req.body.len() > QUICK_BODY || req.body.windows(6).any(|w| w == b"\"wait\"") {
            return Sorted::Slow(req);
        }
        match submission(&req.body) {
            Err(r) => Sorted::Now(r),
            // The key written with escapes.
            Ok((values, _)) if values.iter().any(|v| v.get("wait").is_some()) => Sorted::Slow(req),
            Ok((values, is_array)) => Sorted::Submit(values, is_array),
        }
    }

    fn post_task(&self, body: &[u8]) -> Reply {
        let (values, is_array) = match submission(body) {
            Ok(s) => s,
            Err(r) => return r.into(),
        };
        // Registered once the tasks are durable and before any can finish: no result slips by.
        let mut waiting = None;
        let result = self.submitter.submit(&values, Origin::Http, |acc| {
            if acc.wait > 0 {
                let wait = Duration::from_secs(acc.wait);
                waiting = Some((self.answers.watch(acc.ids.clone(), wait), wait));
            }
        });
        let acc = match result {
            Ok(acc) => acc,
            Err(e) => return refusal(e).into(),
        };
        let Some((rx, wait)) = waiting else {
            return accepted(&acc.ids, is_array).into();
        };
        let got: Vec<Option<TaskResult>> = rx
            .recv_timeout(wait + WAIT_SLACK)
            .unwrap_or_else(|_| vec![None; acc.ids.len()]);
        let done = got.iter().all(Option::is_some);
        let items: Vec<Value> = got
            .iter()
            .zip(&acc.ids)
            .map(|(r, id)| match r {
                Some(r) => json!(r),
                None => self.pending(id),
            })
            .collect();
        let body = if is_array {
            json!({"result": if done {"OK"} else {"Timeout"}, "reason": "", "ids": acc.ids, "results": items})
        } else {
            items.into_iter().next().unwrap_or(Value::Null)
        };
        reply(if done { 200 } else { 202 }, &body)
    }

    /// The 202 body for a task that has not finished.
    fn pending(&self, id: &str) -> Value {
        let status = match self.answers.state(id) {
            Ok(Some(s)) => s.as_str(),
            Ok(None) => "unknown",
            Err(_) => "store unavailable",
        };
        json!({"id": id, "result": "Timeout", "reason": "not finished yet", "status": status})
    }

    fn long_poll(&self, asked: &str, timeout: u64) -> Reply {
        match self.answers.find(asked) {
            Err(e) => fail(503, e),
            Ok(Found::Unknown) => fail(404, format!("unknown or expired id {asked:?}")),
            Ok(Found::Finished(r)) => reply(200, &json!(r)),
            Ok(Found::Pending(id, _)) if timeout == 0 => reply(202, &self.pending(&id)),
            Ok(Found::Pending(id, _)) => {
                match self.answers.wait_one(&id, Duration::from_secs(timeout)) {
                    Some(r) => reply(200, &json!(r)),
                    None => reply(202, &self.pending(&id)),
                }
            }
        }
    }

    /// `POST /pause` and `/resume`: 200 once the state is durable, 503 (nothing changed) when
    /// the store cannot take it.
    fn pause(&self, paused: bool) -> Reply {
        match self.submitter.set_paused(paused) {
            Ok(()) => reply(
                200,
                &json!({"result": "OK", "reason": "", "paused": paused}),
            ),
            Err(e) => fail(503, e),
        }
    }

    /// `GET /tasks`: a page of the tasks in one state.
    // The browser's handlers are kept out of `route`, which every request runs.
    #[inline(never)]
    fn list(&self, query: &str) -> Reply {
        let q = match browse::parse_query(query, false) {
            Ok(q) => q,
            Err(why) => return fail(400, why),
        };
        match self.answers.list(&q) {
            Ok(page) => json_text(browse::page_json(&page, q.what)),
            Err(e) => fail(503, e),
        }
    }

    /// `GET /task/{id}`: everything stored about one task.
    #[inline(never)]
    fn lookup(&self, id: &str) -> Reply {
        match self.answers.lookup(id) {
            Ok(Some(r)) => {
                // The stored id, also when it was asked as `task-<id>`.
                let stored = r.task.as_ref().map(|t| t.id.as_str());
                let stored = stored.or(r.result.as_ref().map(|x| x.id.as_str()));
                json_text(browse::record_json(stored.unwrap_or(id), &r))
            }
            Ok(None) => fail(404, format!("unknown or expired id {id:?}")),
            Err(e) => fail(503, e),
        }
    }

    /// `POST /task/{id}/retry`: a dead task runs again now.
    #[inline(never)]
    fn retry(&self, id: &str) -> Reply {
        match self.submitter.retry(id) {
            Ok(Revive::Revived(_)) => reply(200, &json!({"result": "OK", "reason": "", "id": id})),
            Ok(Revive::NotDead(state)) => fail(
                409,
                format!("task {id:?} is {state}, not dead: only a dead task can be retried"),
            ),
            Ok(Revive::TaskNotKept) => fail(
                409,
                format!("task {id:?} was stored by an earlier release, which kept only its result: use `poulpe replay` on its dead-letter file"),
            ),
            Ok(Revive::Unknown) => fail(404, format!("unknown or expired id {id:?}")),
            Err(e) => fail(503, e),
        }
    }

    /// `POST /tasks/retry?state=dead`: every matching dead task runs again.
    #[inline(never)]
    fn retry_all(&self, query: &str) -> Reply {
        let q = match browse::parse_query(query, true) {
            Ok(q) => q,
            Err(why) => return fail(400, why),
        };
        match self.submitter.retry_all(&q) {
            Ok(n) => reply(200, &json!({"retried": n})),
            Err(e) => fail(503, e),
        }
    }

    fn cancel(&self, id: &str) -> Reply {
        match self.submitter.cancel(id) {
            Ok(Cancel::Cancelled { .. }) => reply(
                200,
                &json!({"result": "OK", "reason": "cancelled", "id": id}),
            ),
            Ok(Cancel::Running) => fail(
                409,
                format!("task {id:?} is running and cannot be cancelled"),
            ),
            Ok(Cancel::Finished) => fail(409, format!("task {id:?} has already finished")),
            Ok(Cancel::Unknown) => fail(404, format!("unknown id {id:?}")),
            Err(e) => fail(503, e),
        }
    }
}

/// The id in `/task/{id}{tail}`, percent-decoded; `None` when missing or badly encoded.
fn task_id(path: &str, tail: &str) -> Option<String> {
    let raw = path.strip_prefix("/task/")?.strip_suffix(tail)?;
    percent_decode(raw).filter(|id| !id.is_empty())
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

    #[test]
    fn a_submit_is_answered_as_serde_json_writes_the_same_object() {
        let body = |r: Reply| match r {
            Reply::Answer(r) => (r.code, r.kind, String::from_utf8(r.body).expect("utf-8")),
            Reply::Upgrade(..) => panic!("not an upgrade"),
        };
        let ids: Vec<String> = vec!["a\"b\\c".into(), "é\u{1}".into(), "x".into()];
        let one = json!({"result": "OK", "reason": "", "id": ids[0]}).to_string();
        let all = json!({"result": "OK", "reason": "", "ids": ids}).to_string();
        assert_eq!(
            body(accepted(&ids[..1], false).into()),
            (200, "application/json", one)
        );
        assert_eq!(
            body(accepted(&ids, true).into()),
            (200, "application/json", all)
        );
    }
}
