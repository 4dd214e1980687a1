//! Validation of submitted JSON into a [`Task`]: the fields every task has, then the fields of
//! its method (GET/POST URL and params, EXEC program and arguments, MAIL_TO params). Every
//! refusal names the field at fault.

use super::exec_policy::{resolve_in_dir, ExecPolicy};
use super::{mail, Method, State, Task};
use serde_json::{Map, Value};
use std::fmt;

/// Longest accepted id, in bytes.
pub(crate) const MAX_ID_LEN: usize = 200;
/// Longest accepted delay: ten years, so due times never overflow.
pub(crate) const MAX_DELAY_S: u64 = 10 * 365 * 86_400;
/// Longest a submit call may block for its result.
pub(crate) const MAX_WAIT_S: u64 = 300;
/// Longest per-task timeout.
pub(crate) const MAX_TIMEOUT_S: u64 = 86_400;
/// Most retries a task may ask for.
pub(crate) const MAX_RETRY_LIMIT: u32 = 100;
/// Longest per-task retry interval.
pub(crate) const MAX_RETRY_INTERVAL_S: u64 = 86_400;

/// What validation needs to know about the server.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    /// Number of workers (`cc` names workers 0 to `workers - 1`).
    pub(crate) workers: usize,
    /// Which programs EXEC tasks from the network may run.
    pub(crate) exec: ExecPolicy,
    /// MAIL_TO needs a configured relay.
    pub(crate) mail_enabled: bool,
    /// Sender used when a MAIL_TO task gives none (`--smtp_from`).
    pub(crate) mail_from: Option<String>,
}

/// A submitted task that failed validation; names the field at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TaskError {
    /// The task is not a JSON object.
    NotAnObject,
    /// A field no task has: a typo would otherwise change the task silently (`dealy` would run
    /// it at once).
    Unknown {
        /// The field as submitted.
        field: String,
        /// The known field it resembles, if one does.
        like: Option<&'static str>,
    },
    /// A field is missing or wrong.
    Field {
        /// The field's name in the submitted JSON.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

impl TaskError {
    /// A refusal of `field`.
    pub(crate) fn field(field: &'static str, problem: impl Into<String>) -> TaskError {
        TaskError::Field {
            field,
            problem: problem.into(),
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::NotAnObject => write!(f, "a task must be a JSON object"),
            TaskError::Unknown { field, like } => match like {
                Some(known) => write!(f, "unknown field {field:?} (did you mean {known:?}?)"),
                None => write!(f, "unknown field {field:?} (known: {FIELD_LIST})"),
            },
            TaskError::Field { field, problem } => write!(f, "{field}: {problem}"),
        }
    }
}

impl std::error::Error for TaskError {}

/// A validated submission: the task plus how long the caller waits for its result.
#[derive(Clone, Debug)]
pub(crate) struct Submission {
    /// The task to store.
    pub(crate) task: Task,
    /// Seconds the submit call blocks for the final result (0: no wait).
    pub(crate) wait: u64,
}

/// Checks an id against the rules in the README (1–200 bytes, no whitespace, control characters
/// or `/`).
pub(crate) fn check_id(id: &str) -> Result<(), TaskError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(TaskError::field(
            "id",
            format!("must be 1 to {MAX_ID_LEN} bytes long"),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '/')
    {
        return Err(TaskError::field(
            "id",
            format!("must not contain whitespace, control characters or '/' (found {c:?})"),
        ));
    }
    Ok(())
}

/// Most headers a task may send.
pub(crate) const MAX_HEADERS: usize = 64;
/// Longest header value, in bytes.
pub(crate) const MAX_HEADER_VALUE: usize = 8192;
/// Headers poulpe sets itself (framing and the connection): a task cannot give them.
const OWN_HEADERS: [&str; 6] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
];

/// Every field a task may have.
const FIELDS: [&str; 13] = [
    "id",
    "method",
    "name",
    "params",
    "delay",
    "run_at",
    "wait",
    "timeout",
    "max_retry",
    "retry_interval",
    "cc",
    "headers",
    "callback",
];

/// `FIELDS` as the error message lists them.
const FIELD_LIST: &str = "id, method, name, params, delay, run_at, wait, timeout, max_retry, retry_interval, cc, headers, callback";

/// Refuses the first field no task has, naming the known one it is closest to: at most one edit
/// per three letters of it (one at least, a swap of neighbours counting as one), and fewer
/// than half its letters.
fn known_fields(obj: &Map<String, Value>) -> Result<(), TaskError> {
    match unknown_key(obj, &FIELDS) {
        None => Ok(()),
        Some((field, like)) => Err(TaskError::Unknown { field, like }),
    }
}

/// The first key of `obj` that is not in `known`, and the known one it is closest to (see
/// [`known_fields`] for how close).
pub(super) fn unknown_key(
    obj: &Map<String, Value>,
    known: &[&'static str],
) -> Option<(String, Option<&'static str>)> {
    let field = obj.keys().find(|k| !known.contains(&k.as_str()))?;
    let lower = field.to_ascii_lowercase();
    // A key far longer than every known field resembles none (and costs no scan of it).
    let like = known
        .iter()
        .filter(|_| lower.len() <= 20)
        .map(|&k| (edits(&lower, k), k))
        .filter(|&(d, k)| d <= (k.len() / 3).max(1) && d * 2 < k.len())
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k);
    Some((field.clone(), like))
}

/// Edits (insert, delete, replace, swap two neighbours) from `a` to `b`: the optimal string
/// alignment distance, over bytes. `b` is a known field (at most 14 bytes; longer ones are cut).
fn edits(a: &str, b: &str) -> usize {
    const W: usize = 15;
    let (a, b) = (a.as_bytes(), &b.as_bytes()[..b.len().min(W - 1)]);
    // Three rows of the table: two back, one back, current.
    let (mut two, mut one, mut cur) = ([0usize; W], [0usize; W], [0usize; W]);
    for (j, v) in one.iter_mut().enumerate() {
        *v = j;
    }
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (one[j] + 1).min(cur[j - 1] + 1).min(one[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(two[j - 2] + 1);
            }
            cur[j] = d;
        }
        (two, one) = (one, cur);
    }
    one[b.len()]
}

/// Validates one submitted JSON task. `now_us` is the submit time (Unix microseconds);
/// `trusted` is set for the operator's own tasks (cron file), which EXEC rules do not restrict.
pub(crate) fn parse_task(
    v: &Value,
    limits: &Limits,
    trusted: bool,
    now_us: u64,
) -> Result<Submission, TaskError> {
    let obj = v.as_object().ok_or(TaskError::NotAnObject)?;
    known_fields(obj)?;
    let common = Common::parse(obj, limits.workers, now_us)?;
    let raw = obj.get("params");
    let payload = match common.method {
        Method::Get => get(&common.name, raw)?,
        Method::Post => post(&common.name, raw)?,
        Method::Exec => exec(&common.name, raw, &limits.exec, trusted)?,
        Method::MailTo => mail_to(&common.name, raw, limits)?,
    };
    Ok(common.into_submission(payload, trusted, now_us))
}

/// The fields every task has, checked in this order.
struct Common {
    id: String,
    method: Method,
    /// Trimmed, not empty; what it must be depends on the method.
    name: String,
    delay: u64,
    /// `run_at` (Unix microseconds), instead of `delay`.
    run_at_us: Option<u64>,
    wait: u64,
    timeout: Option<u64>,
    max_retry: Option<u32>,
    retry_interval: Option<u64>,
    cc: Vec<usize>,
    /// `Name: value` lines (see [`Task::headers`]).
    headers: String,
    callback: Option<String>,
}

/// What a task's method makes of `params`.
#[derive(Default)]
struct Payload {
    /// GET query string, POST JSON body, MAIL_TO JSON object; empty for EXEC.
    params: String,
    /// EXEC arguments.
    args: Vec<String>,
}

impl Payload {
    fn params(params: String) -> Payload {
        Payload {
            params,
            args: Vec::new(),
        }
    }
}

impl Common {
    fn parse(obj: &Map<String, Value>, workers: usize, now_us: u64) -> Result<Common, TaskError> {
        let id = id(obj)?;
        let method = method(obj)?;
        let name = name(obj)?;
        let delay = whole(obj, "delay", MAX_DELAY_S)?;
        let run_at_us = run_at(obj, now_us)?;
        if delay.is_some() && run_at_us.is_some() {
            return Err(TaskError::field(
                "run_at",
                "give either delay or run_at, not both",
            ));
        }
        let delay = delay.unwrap_or(0);
        let wait = whole(obj, "wait", MAX_WAIT_S)?.unwrap_or(0);
        let timeout = whole(obj, "timeout", MAX_TIMEOUT_S)?;
        if timeout == Some(0) {
            return Err(TaskError::field("timeout", "must be at least 1 second"));
        }
        let max_retry = whole(obj, "max_retry", MAX_RETRY_LIMIT as u64)?.map(|n| n as u32);
        let retry_interval = whole(obj, "retry_interval", MAX_RETRY_INTERVAL_S)?;
        let cc = parse_cc(obj.get("cc"), workers)?;
        let headers = headers(obj.get("headers"), method)?;
        let callback = callback(obj)?;
        Ok(Common {
            id,
            method,
            name,
            delay,
            run_at_us,
            wait,
            timeout,
            max_retry,
            retry_interval,
            cc,
            headers,
            callback,
        })
    }

    /// The new task, due after its delay or at its `run_at` (at once when that has passed).
    fn into_submission(self, payload: Payload, trusted: bool, now_us: u64) -> Submission {
        let due_us = match self.run_at_us {
            Some(at) => at.max(now_us),
            None => now_us + self.delay * 1_000_000,
        };
        let task = Task {
            id: self.id,
            method: self.method,
            name: self.name,
            params: payload.params,
            args: payload.args,
            cc: self.cc,
            delay: (due_us - now_us).div_ceil(1_000_000),
            timeout: self.timeout,
            max_retry: self.max_retry,
            retry_interval: self.retry_interval,
            trusted,
            kafka: false,
            submitted_ms: (now_us / 1000) as i64,
            due_us,
            state: if due_us <= now_us {
                State::Ready
            } else {
                State::Delayed
            },
            headers: self.headers,
            callback: self.callback,
            attempts: Vec::new(),
            budget_from: 0,
        };
        Submission {
            task,
            wait: self.wait,
        }
    }
}

/// `run_at`: an absolute start time, Unix seconds (a number) or RFC 3339 with an offset (a
/// string); at most ten years ahead. Unix microseconds, not earlier than the epoch.
fn run_at(obj: &Map<String, Value>, now_us: u64) -> Result<Option<u64>, TaskError> {
    const HOW: &str =
        "must be Unix seconds or an RFC 3339 time with an offset (2026-11-28T09:30:00Z)";
    let at_us: u64 = match obj.get("run_at") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(s) if s.is_finite() && s >= 0.0 => (s * 1e6).min(u64::MAX as f64) as u64,
            _ => return Err(TaskError::field("run_at", HOW)),
        },
        Some(Value::String(s)) => match chrono::DateTime::parse_from_rfc3339(s.trim()) {
            Ok(t) => t.timestamp_micros().max(0) as u64,
            Err(e) => return Err(TaskError::field("run_at", format!("{HOW}; {s:?}: {e}"))),
        },
        Some(_) => return Err(TaskError::field("run_at", HOW)),
    };
    if at_us.saturating_sub(now_us) > MAX_DELAY_S * 1_000_000 {
        return Err(TaskError::field("run_at", "is more than ten years ahead"));
    }
    Ok(Some(at_us))
}

/// `headers`: for GET and POST, an object of header names to string values sent with the
/// request. Names are HTTP tokens, values have no control characters but tab; framing and
/// connection headers are poulpe's own.
fn headers(raw: Option<&Value>, method: Method) -> Result<String, TaskError> {
    let obj = match raw {
        None | Some(Value::Null) => return Ok(String::new()),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(TaskError::field(
                "headers",
                "must be an object of header names to string values",
            ))
        }
    };
    if obj.is_empty() {
        return Ok(String::new());
    }
    if !matches!(method, Method::Get | Method::Post) {
        return Err(TaskError::field(
            "headers",
            "only GET and POST tasks send headers",
        ));
    }
    if obj.len() > MAX_HEADERS {
        return Err(TaskError::field(
            "headers",
            format!("at most {MAX_HEADERS} headers"),
        ));
    }
    let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    let mut out = String::new();
    for (name, value) in obj {
        if name.is_empty() || name.len() > 256 || !name.bytes().all(token) {
            return Err(TaskError::field(
                "headers",
                format!("{name:?} is not a header name (letters, digits and !#$%&'*+-.^_`|~)"),
            ));
        }
        if OWN_HEADERS.iter().any(|h| name.eq_ignore_ascii_case(h)) {
            return Err(TaskError::field(
                "headers",
                format!("{name:?} is set by poulpe itself"),
            ));
        }
        let Value::String(v) = value else {
            return Err(TaskError::field(
                "headers",
                format!("the value of {name:?} must be a string"),
            ));
        };
        if v.len() > MAX_HEADER_VALUE || v.bytes().any(|c| (c < 0x20 && c != b'\t') || c == 0x7f) {
            return Err(TaskError::field(
                "headers",
                format!(
                    "the value of {name:?} must be at most {MAX_HEADER_VALUE} bytes without control characters (no CR or LF)"
                ),
            ));
        }
        out.push_str(&format!("{name}: {v}\n"));
    }
    Ok(out)
}

/// `id`: checked when given, a new UUID when not.
fn id(obj: &Map<String, Value>) -> Result<String, TaskError> {
    match obj.get("id") {
        None | Some(Value::Null) => Ok(uuid::Uuid::new_v4().to_string()),
        Some(Value::String(s)) => {
            check_id(s)?;
            Ok(s.clone())
        }
        Some(_) => Err(TaskError::field("id", "must be a string")),
    }
}

/// `method`: required, one of the wire spellings (any case).
fn method(obj: &Map<String, Value>) -> Result<Method, TaskError> {
    match obj.get("method") {
        Some(Value::String(s)) => Method::parse(s).ok_or_else(|| {
            TaskError::field(
                "method",
                format!("unknown method {s:?}; use GET, POST, EXEC or MAIL_TO"),
            )
        }),
        None | Some(Value::Null) => Err(TaskError::field("method", "is required")),
        Some(_) => Err(TaskError::field("method", "must be a string")),
    }
}

/// `name`: a required string, trimmed, not empty.
fn name(obj: &Map<String, Value>) -> Result<String, TaskError> {
    match obj.get("name") {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            Err(TaskError::field("name", "is required"))
        }
        Some(_) => Err(TaskError::field("name", "must be a string")),
    }
}

/// GET: `name` is a URL, `params` a query string (leading `?`/`&` dropped).
fn get(name: &str, raw: Option<&Value>) -> Result<Payload, TaskError> {
    check_url("name", name)?;
    let params = match raw {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.trim_start_matches(['?', '&']).to_string(),
        Some(_) => {
            return Err(TaskError::field(
                "params",
                "for GET must be a query string like \"a=1&b=2\"",
            ))
        }
    };
    if params.chars().any(|c| c.is_control() || c == ' ') {
        return Err(TaskError::field(
            "params",
            "query string must not contain spaces or control characters (URL-encode them)",
        ));
    }
    Ok(Payload::params(params))
}

/// POST: `name` is a URL, `params` a JSON body (as JSON, or a string holding JSON).
fn post(name: &str, raw: Option<&Value>) -> Result<Payload, TaskError> {
    check_url("name", name)?;
    let params = match raw {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) if s.trim().is_empty() => String::new(),
        Some(Value::String(s)) => {
            serde_json::from_slice::<Value>(s.as_bytes())
                .map_err(|e| TaskError::field("params", format!("for POST must be JSON: {e}")))?;
            s.clone()
        }
        Some(other) => other.to_string(),
    };
    Ok(Payload::params(params))
}

/// EXEC: `params` are the arguments (split on whitespace, or an array of strings); `name` must
/// pass the EXEC rules unless the task is trusted.
fn exec(
    name: &str,
    raw: Option<&Value>,
    policy: &ExecPolicy,
    trusted: bool,
) -> Result<Payload, TaskError> {
    let not_args =
        || TaskError::field("params", "for EXEC must be a string or an array of strings");
    let args = match raw {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(not_args)?,
        Some(_) => return Err(not_args()),
    };
    if args.iter().any(|a| a.contains('\0')) {
        return Err(TaskError::field("params", "arguments must not contain NUL"));
    }
    if !trusted {
        check_exec_name(name, policy)?;
    }
    Ok(Payload {
        params: String::new(),
        args,
    })
}

/// MAIL_TO: needs a relay; `params` are checked by [`mail::parse_params`] and stored as JSON.
fn mail_to(name: &str, raw: Option<&Value>, limits: &Limits) -> Result<Payload, TaskError> {
    if !limits.mail_enabled {
        return Err(TaskError::field(
            "method",
            "MAIL_TO is not available: no SMTP relay is configured (--smtp_server)",
        ));
    }
    let mail = mail::parse_params(name, raw, limits.mail_from.as_deref())?;
    let params =
        serde_json::to_string(&mail).map_err(|e| TaskError::field("params", e.to_string()))?;
    Ok(Payload::params(params))
}

/// Reads an optional whole number of at most `max`; numbers or digit strings.
fn whole(
    obj: &Map<String, Value>,
    field: &'static str,
    max: u64,
) -> Result<Option<u64>, TaskError> {
    let n = match obj.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                u
            } else if n.as_i64().is_some() {
                return Err(TaskError::field(field, "must not be negative"));
            } else {
                match n.as_f64() {
                    Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= max as f64 => f as u64,
                    Some(f) if f < 0.0 => {
                        return Err(TaskError::field(field, "must not be negative"))
                    }
                    _ => return Err(TaskError::field(field, "must be a whole number of seconds")),
                }
            }
        }
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => s
            .trim()
            .parse::<u64>()
            .map_err(|_| TaskError::field(field, format!("must be a whole number, got {s:?}")))?,
        Some(_) => return Err(TaskError::field(field, "must be a whole number")),
    };
    if n > max {
        return Err(TaskError::field(field, format!("must be at most {max}")));
    }
    Ok(Some(n))
}

/// Parses `cc`: worker numbers separated by spaces or commas (or a JSON array / number).
pub(crate) fn parse_cc(v: Option<&Value>, workers: usize) -> Result<Vec<usize>, TaskError> {
    let mut out: Vec<usize> = Vec::new();
    let mut push = |n: u64| -> Result<(), TaskError> {
        if n >= workers as u64 {
            return Err(TaskError::field(
                "cc",
                format!(
                    "worker {n} does not exist (workers are numbered 0 to {})",
                    workers.saturating_sub(1)
                ),
            ));
        }
        if !out.contains(&(n as usize)) {
            out.push(n as usize);
        }
        Ok(())
    };
    match v {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            for part in s.split(|c: char| c == ',' || c.is_whitespace()) {
                if part.is_empty() {
                    continue;
                }
                let n = part.parse::<u64>().map_err(|_| {
                    TaskError::field("cc", format!("{part:?} is not a worker number"))
                })?;
                push(n)?;
            }
        }
        Some(Value::Number(n)) => push(
            n.as_u64()
                .ok_or_else(|| TaskError::field("cc", "worker numbers are whole numbers ≥ 0"))?,
        )?,
        Some(Value::Array(items)) => {
            for i in items {
                push(i.as_u64().ok_or_else(|| {
                    TaskError::field("cc", "worker numbers are whole numbers ≥ 0")
                })?)?;
            }
        }
        Some(_) => {
            return Err(TaskError::field(
                "cc",
                "must be worker numbers separated by spaces or commas",
            ))
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Checks that `name` is an absolute http(s) URL with a host.
fn check_url(field: &'static str, name: &str) -> Result<(), TaskError> {
    let starts = |p: &str| {
        name.get(..p.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(p))
    };
    if !(starts("http://") || starts("https://")) {
        return Err(TaskError::field(
            field,
            format!("must be an http:// or https:// URL, got {name:?}"),
        ));
    }
    let uri: ureq::http::Uri = name
        .parse()
        .map_err(|e| TaskError::field(field, format!("is not a valid URL: {e}")))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(TaskError::field(field, "URL has no host"));
    }
    Ok(())
}

/// `callback`: an http(s) URL that is POSTed the task's final result.
fn callback(obj: &Map<String, Value>) -> Result<Option<String>, TaskError> {
    match obj.get("callback") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => {
            check_url("callback", s.trim())?;
            Ok(Some(s.trim().to_string()))
        }
        Some(_) => Err(TaskError::field(
            "callback",
            "must be an http:// or https:// URL",
        )),
    }
}

/// Applies the EXEC rules for network submissions.
fn check_exec_name(name: &str, policy: &ExecPolicy) -> Result<(), TaskError> {
    match policy {
        ExecPolicy::Disabled => Err(TaskError::field(
            "method",
            "EXEC from the network is disabled; start poulpe with --exec_dir DIR (or --exec_any)",
        )),
        ExecPolicy::Any => Ok(()),
        ExecPolicy::Dir(dir) => resolve_in_dir(dir, name)
            .map(|_| ())
            .map_err(|e| TaskError::field("name", e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> Limits {
        Limits {
            workers: 4,
            exec: ExecPolicy::Any,
            mail_enabled: false,
            mail_from: None,
        }
    }

    fn ok(v: Value) -> Submission {
        parse_task(&v, &limits(), false, 1_000_000_000).expect("valid task")
    }

    fn err(v: Value) -> String {
        parse_task(&v, &limits(), false, 1_000_000_000)
            .expect_err("invalid task")
            .to_string()
    }

    #[test]
    fn good_tasks() {
        let s = ok(
            json!({"id":"a-1","method":"GET","name":"http://x/y","params":"a=1","cc":"1 3","delay":2,"wait":5}),
        );
        assert_eq!(s.task.id, "a-1");
        assert_eq!(s.task.params, "a=1");
        assert_eq!(s.task.cc, vec![1, 3]);
        assert_eq!(s.task.state, State::Delayed);
        assert_eq!(s.task.due_us, 1_000_000_000 + 2_000_000);
        assert_eq!(s.wait, 5);

        let s = ok(json!({"method":"get","name":"https://x","cc":"2,0, 2","delay":"0"}));
        assert_eq!(s.task.id.len(), 36, "a UUID is generated");
        assert_eq!(s.task.cc, vec![0, 2]);
        assert_eq!(s.task.state, State::Ready);

        let s = ok(json!({"method":"POST","name":"http://x","params":"{\"k\":1}"}));
        assert_eq!(s.task.params, "{\"k\":1}");
        let s = ok(json!({"method":"POST","name":"http://x","params":{"k":[1,2]}}));
        assert_eq!(s.task.params, "{\"k\":[1,2]}");

        let s = ok(json!({"method":"EXEC","name":"echo","params":"a  b c"}));
        assert_eq!(s.task.args, vec!["a", "b", "c"]);
        let s = ok(
            json!({"method":"EXEC","name":"echo","params":["a b","c"],"timeout":3,"max_retry":0,"retry_interval":1}),
        );
        assert_eq!(s.task.args, vec!["a b", "c"]);
        assert_eq!(
            (s.task.timeout, s.task.max_retry, s.task.retry_interval),
            (Some(3), Some(0), Some(1))
        );
        ok(json!({"method":"GET","name":"http://x","cc":[0,3]}));
        ok(json!({"method":"get","name":"HTTP://x"}));
        ok(json!({"method":"Post","name":"hTtPs://x"}));
    }

    #[test]
    fn bad_tasks_name_the_field() {
        let table = [
            (json!([1]), "JSON object"),
            (json!({"method":"GET"}), "name: is required"),
            (json!({"name":"http://x"}), "method: is required"),
            (
                json!({"method":"PUT","name":"http://x"}),
                "method: unknown method",
            ),
            (
                json!({"method":"GET","name":"ftp://x"}),
                "name: must be an http",
            ),
            (
                json!({"method":"GET","name":"httpé://x"}),
                "name: must be an http",
            ),
            (json!({"method":"GET","name":"http://"}), "name:"),
            (
                json!({"method":"GET","name":"http://x","id":""}),
                "id: must be 1 to 200",
            ),
            (
                json!({"method":"GET","name":"http://x","id":"a b"}),
                "id: must not contain",
            ),
            (
                json!({"method":"GET","name":"http://x","id":"../etc"}),
                "id: must not contain",
            ),
            (
                json!({"method":"GET","name":"http://x","id":"a\u{1}"}),
                "id: must not contain",
            ),
            (
                json!({"method":"GET","name":"http://x","id":"x".repeat(201)}),
                "id: must be 1 to 200",
            ),
            (
                json!({"method":"GET","name":"http://x","id":5}),
                "id: must be a string",
            ),
            (
                json!({"method":"GET","name":"http://x","delay":-1}),
                "delay: must not be negative",
            ),
            (
                json!({"method":"GET","name":"http://x","delay":1.5}),
                "delay: must be a whole",
            ),
            (
                json!({"method":"GET","name":"http://x","delay":"soon"}),
                "delay: must be a whole",
            ),
            (
                json!({"method":"GET","name":"http://x","delay":1e300}),
                "delay: must be a whole",
            ),
            (
                json!({"method":"GET","name":"http://x","delay":99999999999u64}),
                "delay: must be at most",
            ),
            (
                json!({"method":"GET","name":"http://x","wait":301}),
                "wait: must be at most 300",
            ),
            (
                json!({"method":"GET","name":"http://x","cc":"4"}),
                "cc: worker 4 does not exist",
            ),
            (
                json!({"method":"GET","name":"http://x","cc":"1;2"}),
                "cc: \"1;2\" is not",
            ),
            (
                json!({"method":"GET","name":"http://x","cc":-1}),
                "cc: worker numbers",
            ),
            (
                json!({"method":"GET","name":"http://x","params":{"a":1}}),
                "params: for GET",
            ),
            (
                json!({"method":"POST","name":"http://x","params":"{not json"}),
                "params: for POST must be JSON",
            ),
            (
                json!({"method":"EXEC","name":"x","params":[1]}),
                "params: for EXEC",
            ),
            (
                json!({"method":"MAIL_TO","name":"a@b.c"}),
                "method: MAIL_TO is not available",
            ),
            (
                json!({"method":"GET","name":"http://x","timeout":0}),
                "timeout: must be at least 1",
            ),
            (
                json!({"method":"GET","name":"http://x","max_retry":101}),
                "max_retry: must be at most 100",
            ),
        ];
        for (v, want) in table {
            let got = err(v.clone());
            assert!(got.contains(want), "{v}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_with_the_field_they_resemble() {
        let task = |extra: &str| {
            let mut v = json!({"method": "GET", "name": "http://x/"});
            v[extra] = json!(30);
            err(v)
        };
        assert_eq!(
            task("dealy"),
            r#"unknown field "dealy" (did you mean "delay"?)"#
        );
        assert_eq!(
            task("Delay"),
            r#"unknown field "Delay" (did you mean "delay"?)"#
        );
        assert_eq!(
            task("max_retries"),
            r#"unknown field "max_retries" (did you mean "max_retry"?)"#
        );
        assert_eq!(
            task("retry_intervall"),
            r#"unknown field "retry_intervall" (did you mean "retry_interval"?)"#
        );
        assert_eq!(
            task("timout"),
            r#"unknown field "timout" (did you mean "timeout"?)"#
        );
        assert_eq!(
            task("ic"),
            r#"unknown field "ic" (known: id, method, name, params, delay, run_at, wait, timeout, max_retry, retry_interval, cc, headers, callback)"#
        );
        assert_eq!(
            task("priority"),
            r#"unknown field "priority" (known: id, method, name, params, delay, run_at, wait, timeout, max_retry, retry_interval, cc, headers, callback)"#
        );
        // Every known field is accepted, and the checks on their values still run.
        let all = json!({"id": "a", "method": "GET", "name": "http://x/", "params": "q=1",
                         "delay": 0, "wait": 0, "timeout": 5, "max_retry": 1,
                         "retry_interval": 2, "cc": "0"});
        assert_eq!(ok(all).task.id, "a");
    }

    #[test]
    fn the_listed_fields_are_the_known_ones() {
        assert_eq!(FIELD_LIST, FIELDS.join(", "));
        let long = "x".repeat(100_000);
        assert_eq!(
            err(json!({"method": "GET", "name": "http://x/", long.clone(): 1})),
            format!("unknown field {long:?} (known: {FIELD_LIST})")
        );
    }

    #[test]
    fn edits_count_inserts_deletes_replacements_and_swaps() {
        assert_eq!(edits("delay", "delay"), 0);
        assert_eq!(
            edits("dealy", "delay"),
            1,
            "a swap of neighbours is one edit"
        );
        assert_eq!(edits("dely", "delay"), 1);
        assert_eq!(edits("delays", "delay"), 1);
        assert_eq!(edits("xelay", "delay"), 1);
        assert_eq!(edits("", "cc"), 2);
        assert_eq!(edits("cc", ""), 2);
        assert_eq!(edits("abcd", "badc"), 2);
        assert_eq!(edits("kitten", "sitting"), 3);
    }

    #[test]
    fn exec_policy() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("job.sh"), "#!/bin/sh\n").expect("write");
        let mut l = limits();
        l.exec = ExecPolicy::Dir(dir.path().to_path_buf());
        let t = |name: &str| parse_task(&json!({"method":"EXEC","name":name}), &l, false, 0);
        assert!(t("job.sh").is_ok());
        assert!(t("../job.sh")
            .unwrap_err()
            .to_string()
            .contains("must not contain '/'"));
        assert!(t("/bin/sh")
            .unwrap_err()
            .to_string()
            .contains("must not contain '/'"));
        assert!(t("..").unwrap_err().to_string().contains("'..'"));
        assert!(t("missing")
            .unwrap_err()
            .to_string()
            .contains("not found in the exec directory"));
        let nul = t("a\0b").unwrap_err().to_string();
        assert!(nul.contains("NUL") && !nul.contains('/'), "{nul}");
        std::os::unix::fs::symlink("/bin/sh", dir.path().join("sh")).expect("symlink");
        assert!(t("sh")
            .unwrap_err()
            .to_string()
            .contains("outside the exec directory"));
        l.exec = ExecPolicy::Disabled;
        let e = parse_task(&json!({"method":"EXEC","name":"ls"}), &l, false, 0).unwrap_err();
        assert!(e.to_string().contains("--exec_dir"), "{e}");
        assert!(parse_task(&json!({"method":"EXEC","name":"/bin/ls"}), &l, true, 0).is_ok());
    }

    #[test]
    fn task_round_trips_through_json() {
        let s = ok(json!({"method":"EXEC","name":"echo","params":"hi","cc":"1"}));
        let text = serde_json::to_string(&s.task).expect("serialize");
        let back: Task = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, s.task);
    }

    /// `run_at` starts a task at a time (Unix seconds or RFC 3339), at once when it has passed;
    /// it cannot be combined with `delay`, nor lie more than ten years ahead.
    #[test]
    fn run_at_is_an_absolute_start_time() {
        let limits = Limits {
            workers: 1,
            exec: ExecPolicy::Disabled,
            mail_enabled: false,
            mail_from: None,
        };
        let now_us = 1_800_000_000_000_000u64;
        let at = |run_at: Value| {
            let v = serde_json::json!({"method": "GET", "name": "http://x/", "run_at": run_at});
            parse_task(&v, &limits, false, now_us)
                .map(|s| (s.task.due_us, s.task.state, s.task.delay))
        };
        assert_eq!(
            at(serde_json::json!(1_800_000_030.5)),
            Ok((now_us + 30_500_000, State::Delayed, 31))
        );
        assert_eq!(
            at(serde_json::json!("2027-01-15T08:00:30.25+00:00")),
            Ok((1_800_000_030_250_000, State::Delayed, 31))
        );
        assert_eq!(
            at(serde_json::json!("2027-01-15T10:00:30+02:00")),
            Ok((1_800_000_030_000_000, State::Delayed, 30)),
            "the offset counts"
        );
        assert_eq!(
            at(serde_json::json!(5)),
            Ok((now_us, State::Ready, 0)),
            "past: now"
        );
        for bad in [
            serde_json::json!("tomorrow"),
            serde_json::json!("2027-01-15T08:00:30"),
            serde_json::json!(-1),
            serde_json::json!(true),
            serde_json::json!(1_800_000_000 + 11 * 365 * 86_400),
        ] {
            let err = at(bad.clone()).expect_err("refused");
            assert!(err.to_string().starts_with("run_at: "), "{bad}: {err}");
        }
        let both =
            serde_json::json!({"method": "GET", "name": "http://x/", "delay": 3, "run_at": 5});
        let err = parse_task(&both, &limits, false, now_us).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "run_at: give either delay or run_at, not both"
        );
    }

    /// `headers` go with GET and POST only; names are tokens, values have no line breaks, and
    /// framing headers are poulpe's own.
    #[test]
    fn headers_are_checked() {
        let limits = Limits {
            workers: 1,
            exec: ExecPolicy::Any,
            mail_enabled: false,
            mail_from: None,
        };
        let with = |method: &str, headers: Value| {
            let v = serde_json::json!({"method": method, "name": "http://x/", "headers": headers});
            parse_task(&v, &limits, false, 0).map(|s| {
                let t = s.task;
                t.header_pairs()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            with(
                "GET",
                serde_json::json!({"Authorization": "Bearer t", "X-Trace": "a\tb"})
            ),
            Ok(vec![
                ("Authorization".to_string(), "Bearer t".to_string()),
                ("X-Trace".to_string(), "a\tb".to_string())
            ])
        );
        assert_eq!(with("POST", serde_json::json!({})), Ok(Vec::new()));
        for (method, bad, why) in [
            ("GET", serde_json::json!({"Host": "evil"}), "set by poulpe"),
            (
                "POST",
                serde_json::json!({"content-length": "1"}),
                "set by poulpe",
            ),
            (
                "GET",
                serde_json::json!({"X-A": "a\r\nX-B: b"}),
                "control characters",
            ),
            (
                "GET",
                serde_json::json!({"bad name": "x"}),
                "not a header name",
            ),
            ("GET", serde_json::json!({"X-N": 1}), "must be a string"),
            ("GET", serde_json::json!(["X-A", "a"]), "must be an object"),
            ("EXEC", serde_json::json!({"X-A": "a"}), "only GET and POST"),
        ] {
            let err = with(method, bad.clone()).expect_err("refused");
            let text = err.to_string();
            assert!(
                text.starts_with("headers: ") && text.contains(why),
                "{bad}: {text}"
            );
        }
        let many: Map<String, Value> = (0..=MAX_HEADERS)
            .map(|i| (format!("X-{i}"), Value::from("v")))
            .collect();
        assert!(with("GET", Value::Object(many)).is_err(), "too many");
    }
}
