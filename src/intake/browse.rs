//! The task browser's HTTP side: the query of `GET /tasks` and `POST /tasks/retry` read into a
//! [`ListQuery`], and the JSON of a listing page and of one task's record (`GET /task/{id}`).
//! Header values are never shown: they may be secrets.

use crate::clock::rfc3339_ms;
use crate::http::percent_decode;
use crate::store::list::{Cursor, Listed, Row, SCAN_CAP, STATES};
use crate::store::{ListQuery, Page, Record};
use crate::task::{Method, Task};
use serde_json::{json, Value};

/// Tasks in a page when `limit` is not given, and the most it may ask for.
const LIMIT_DEFAULT: usize = 50;
const LIMIT_MAX: usize = 500;

/// Reads a listing's query string; `retry`: the query of `POST /tasks/retry` (state `dead`
/// only, no paging). `Err` names the parameter that is wrong.
pub(crate) fn parse_query(query: &str, retry: bool) -> Result<ListQuery, String> {
    let mut what = None;
    let mut limit = LIMIT_DEFAULT;
    let mut cursor = None;
    let mut method = None;
    let mut q = String::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = percent_decode(&v.replace('+', " "))
            .ok_or_else(|| format!("{k}: badly percent-encoded"))?;
        match k {
            "state" => {
                let s = Listed::parse(&v)
                    .ok_or_else(|| format!("state: unknown state {v:?}; one of {STATES}"))?;
                if retry && s != Listed::Final(crate::task::FinalStatus::Dead) {
                    return Err(format!("state: only dead tasks can be retried, not {v:?}"));
                }
                what = Some(s);
            }
            "limit" if !retry => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=LIMIT_MAX).contains(n))
                    .ok_or_else(|| {
                        format!("limit: must be a whole number from 1 to {LIMIT_MAX}")
                    })?;
            }
            "cursor" if !retry => cursor = Some(v),
            "method" => {
                method = Some(Method::parse(&v).ok_or_else(|| {
                    format!("method: unknown method {v:?}; one of GET, POST, EXEC, MAIL_TO")
                })?);
            }
            "q" => q = v,
            _ => return Err(format!("unknown query parameter {k:?}")),
        }
    }
    let what = what.ok_or_else(|| {
        if retry {
            "state: missing; give state=dead".to_string()
        } else {
            format!("state: missing; one of {STATES}")
        }
    })?;
    let after = match cursor {
        Some(c) => Some(Cursor::decode(&c, what).map_err(|e| format!("cursor: {e}"))?),
        None => None,
    };
    Ok(ListQuery {
        what,
        method,
        q,
        limit: if retry { LIMIT_MAX } else { limit },
        after,
        scan: SCAN_CAP,
    })
}

fn time_us(us: u64) -> String {
    rfc3339_ms((us / 1000) as i64)
}

fn row_json(r: &Row) -> Value {
    json!({
        "id": r.id,
        "state": r.state,
        "method": r.method.map(Method::as_str),
        "name": r.name,
        "attempts": r.attempts,
        "due": r.due_us.map(time_us),
        "submitted_at": r.submitted_at,
        "finished_at": r.finished_at,
    })
}

/// `{"tasks":[...],"next":cursor|null}`.
pub(crate) fn page_json(page: &Page, what: Listed) -> Value {
    let tasks: Vec<Value> = page.rows.iter().map(row_json).collect();
    json!({"tasks": tasks, "next": page.next.as_ref().map(|c| c.encode(what))})
}

/// The task as `GET /task/{id}` shows it: header names only; `due` only while unfinished.
fn task_json(t: &Task, finished: bool) -> Value {
    let headers: Vec<&str> = t.header_pairs().map(|(name, _)| name).collect();
    json!({
        "method": t.method.as_str(),
        "name": t.name,
        "params": t.params,
        "args": t.args,
        "cc": t.cc,
        "timeout": t.timeout,
        "max_retry": t.max_retry,
        "retry_interval": t.retry_interval,
        "headers": headers,
        "callback": t.callback,
        "submitted_at": rfc3339_ms(t.submitted_ms),
        "due": (!finished).then(|| time_us(t.due_us)),
    })
}

/// `{"id","state","task","attempts","result"}`.
pub(crate) fn record_json(id: &str, r: &Record) -> Value {
    let finished = r.result.is_some();
    let attempts: Vec<Value> = r
        .task
        .iter()
        .flat_map(|t| &t.attempts)
        .map(|a| {
            json!({
                "started_at": rfc3339_ms(a.started_ms),
                "finished_at": rfc3339_ms(a.finished_ms),
                "worker": a.worker,
                "ok": a.ok,
                "code": a.code,
                "error": a.error,
                "output": a.output_excerpt,
            })
        })
        .collect();
    json!({
        "id": id,
        "state": r.state,
        "task": r.task.as_ref().map(|t| task_json(t, finished)),
        "attempts": attempts,
        "result": r.result,
    })
}
