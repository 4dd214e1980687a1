//! The task browser's HTTP side: the query of `GET /tasks` and `POST /tasks/retry` read into a
//! [`ListQuery`], and the JSON of a listing page and of one task's record (`GET /task/{id}`).
//! Header values are never shown: they may be secrets.

use crate::clock::rfc3339_ms;
use crate::http::percent_decode;
use crate::store::list::{Cursor, Listed, Row, SCAN_CAP};
use crate::store::{ListQuery, Page, Record};
use crate::task::{FinalStatus, Method, Task};

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
        let Some(v) = percent_decode(&v.replace('+', " ")) else {
            return Err(quoted("badly percent-encoded value of ", k));
        };
        match k {
            "state" => match Listed::parse(&v) {
                Some(s) if !retry || s == Listed::Final(FinalStatus::Dead) => what = Some(s),
                Some(_) => return Err(quoted("state: only dead tasks are retried, not ", &v)),
                None => return Err(quoted(UNKNOWN_STATE, &v)),
            },
            "limit" if !retry => match v.parse() {
                Ok(n) if (1..=LIMIT_MAX).contains(&n) => limit = n,
                _ => return Err("limit: must be a whole number from 1 to 500".to_string()),
            },
            "cursor" if !retry => cursor = Some(v),
            "method" => match Method::parse(&v) {
                Some(m) => method = Some(m),
                None => return Err(quoted("method: one of GET, POST, EXEC, MAIL_TO, not ", &v)),
            },
            "q" => q = v,
            _ => return Err(quoted("unknown query parameter ", k)),
        }
    }
    let Some(what) = what else {
        return Err(if retry {
            "state: missing; give state=dead"
        } else {
            "state: missing; one of delayed, queued, running, retry_wait, succeeded, dead, cancelled"
        }
        .to_string());
    };
    let after = match cursor {
        Some(c) => Some(Cursor::decode(&c, what).map_err(|e| quoted("cursor: ", e))?),
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

/// `what` followed by `v` quoted.
fn quoted(what: &str, v: &str) -> String {
    format!("{what}{v:?}")
}

/// The start of the answer to an unknown state (the state follows).
const UNKNOWN_STATE: &str =
    "state: one of delayed, queued, running, retry_wait, succeeded, dead, cancelled; not ";

fn time_us(us: u64) -> String {
    rfc3339_ms((us / 1000) as i64)
}

/// A JSON object written field by field: the browser's answers are written by hand rather
/// than through `json!`, whose code is generic per field type (the binary has a size budget).
struct Obj(String);

impl Obj {
    fn new() -> Obj {
        Obj(String::from("{"))
    }

    fn key(&mut self, k: &str) -> &mut String {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0.push('"');
        self.0.push_str(k);
        self.0.push_str("\":");
        &mut self.0
    }

    fn raw(&mut self, k: &str, v: &str) {
        self.key(k).push_str(v);
    }

    fn str(&mut self, k: &str, v: Option<&str>) {
        match v {
            Some(v) => escape(self.key(k), v),
            None => self.raw(k, "null"),
        }
    }

    fn num(&mut self, k: &str, v: Option<i64>) {
        match v {
            Some(v) => self.raw(k, &v.to_string()),
            None => self.raw(k, "null"),
        }
    }

    fn strs<'a>(&mut self, k: &str, items: impl Iterator<Item = &'a str>) {
        let out = self.key(k);
        out.push('[');
        for (i, v) in items.enumerate() {
            if i > 0 {
                out.push(',');
            }
            escape(out, v);
        }
        out.push(']');
    }

    fn end(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// `s` as a JSON string.
fn escape(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = std::fmt::Write::write_fmt(out, format_args!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[inline(never)]
fn row_json(r: &Row) -> String {
    let mut o = Obj::new();
    o.str("id", Some(&r.id));
    o.str("state", Some(r.state));
    o.str("method", r.method.map(Method::as_str));
    o.str("name", r.name.as_deref());
    o.num("attempts", Some(r.attempts as i64));
    o.str("due", r.due_us.map(time_us).as_deref());
    o.str("submitted_at", Some(&r.submitted_at));
    o.str("finished_at", r.finished_at.as_deref());
    o.end()
}

/// `{"tasks":[...],"next":cursor|null}`.
#[inline(never)]
pub(crate) fn page_json(page: &Page, what: Listed) -> String {
    let rows: Vec<String> = page.rows.iter().map(row_json).collect();
    let mut o = Obj::new();
    o.raw("tasks", &format!("[{}]", rows.join(",")));
    o.str(
        "next",
        page.next.as_ref().map(|c| c.encode(what)).as_deref(),
    );
    o.end()
}

/// The task as `GET /task/{id}` shows it: header names only; `due` only while unfinished.
#[inline(never)]
fn task_json(t: &Task, finished: bool) -> String {
    let mut o = Obj::new();
    o.str("method", Some(t.method.as_str()));
    o.str("name", Some(&t.name));
    o.str("params", Some(&t.params));
    o.strs("args", t.args.iter().map(String::as_str));
    let cc: Vec<String> = t.cc.iter().map(usize::to_string).collect();
    o.raw("cc", &format!("[{}]", cc.join(",")));
    o.num("timeout", t.timeout.map(|n| n as i64));
    o.num("max_retry", t.max_retry.map(i64::from));
    o.num("retry_interval", t.retry_interval.map(|n| n as i64));
    o.strs("headers", t.header_pairs().map(|(name, _)| name));
    o.str("callback", t.callback.as_deref());
    o.str("submitted_at", Some(&rfc3339_ms(t.submitted_ms)));
    o.str("due", (!finished).then(|| time_us(t.due_us)).as_deref());
    o.end()
}

/// `{"id","state","task","attempts","result"}`.
#[inline(never)]
pub(crate) fn record_json(id: &str, r: &Record) -> String {
    let attempts: Vec<String> = r
        .task
        .iter()
        .flat_map(|t| &t.attempts)
        .map(|a| {
            let mut o = Obj::new();
            o.str("started_at", Some(&rfc3339_ms(a.started_ms)));
            o.str("finished_at", Some(&rfc3339_ms(a.finished_ms)));
            o.num("worker", Some(a.worker as i64));
            o.raw("ok", if a.ok { "true" } else { "false" });
            o.num("code", a.code);
            o.str("error", Some(&a.error));
            o.str("output", Some(&a.output_excerpt));
            o.end()
        })
        .collect();
    let mut o = Obj::new();
    o.str("id", Some(id));
    o.str("state", Some(r.state));
    let task = r.task.as_ref().map(|t| task_json(t, r.result.is_some()));
    o.raw("task", task.as_deref().unwrap_or("null"));
    o.raw("attempts", &format!("[{}]", attempts.join(",")));
    let result = r
        .result
        .as_ref()
        .and_then(|r| serde_json::to_string(r).ok());
    o.raw("result", result.as_deref().unwrap_or("null"));
    o.end()
}
