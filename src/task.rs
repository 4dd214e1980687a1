//! The task model (what is stored) and the validation of submitted JSON into it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use std::path::PathBuf;

/// Whether the task succeeded, as the API says it (`OK` or `Fail`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    #[serde(rename = "OK")]
    Ok,
    Fail,
}

/// How a task ended (`succeeded`, or `dead` once its retries are spent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinalStatus {
    Succeeded,
    Dead,
}

impl FinalStatus {
    /// As the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            FinalStatus::Succeeded => "succeeded",
            FinalStatus::Dead => "dead",
        }
    }
}

/// The final result of a task, exactly as `/task_resp` returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub id: String,
    pub result: Verdict,
    pub reason: String,
    pub status: FinalStatus,
    pub attempts: usize,
    pub output: String,
    pub code: Option<i64>,
    pub submitted_at: String,
    pub finished_at: String,
}

/// Longest accepted id, in bytes.
pub const MAX_ID_LEN: usize = 200;
/// Longest accepted delay: ten years, so due times never overflow.
pub const MAX_DELAY_S: u64 = 10 * 365 * 86_400;
/// Longest a submit call may block for its result.
pub const MAX_WAIT_S: u64 = 300;
/// Longest per-task timeout.
pub const MAX_TIMEOUT_S: u64 = 86_400;
/// Most retries a task may ask for.
pub const MAX_RETRY_LIMIT: u32 = 100;
/// Longest per-task retry interval.
pub const MAX_RETRY_INTERVAL_S: u64 = 86_400;

/// What a task does when it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    #[serde(rename = "GET")]
    Get,
    #[serde(rename = "POST")]
    Post,
    #[serde(rename = "EXEC")]
    Exec,
    #[serde(rename = "MAIL_TO")]
    MailTo,
}

impl Method {
    /// Parses the wire spelling (case-insensitive).
    pub fn parse(s: &str) -> Option<Method> {
        match s.to_ascii_uppercase().as_str() {
            "GET" => Some(Method::Get),
            "POST" => Some(Method::Post),
            "EXEC" => Some(Method::Exec),
            "MAIL_TO" => Some(Method::MailTo),
            _ => None,
        }
    }

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Exec => "EXEC",
            Method::MailTo => "MAIL_TO",
        }
    }
}

/// Where a task is in its life; persisted with the task so a restart knows what to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for its delay to pass.
    Delayed,
    /// Due: waiting for a worker.
    Ready,
    /// An attempt is running.
    Running,
    /// A failed attempt waits for its retry time.
    RetryWait,
}

impl State {
    /// The name shown to users in status answers.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Delayed => "delayed",
            State::Ready => "queued",
            State::Running => "running",
            State::RetryWait => "retry_wait",
        }
    }
}

/// One finished attempt, kept for the dead-letter record and the result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// Unix milliseconds when the attempt started.
    pub started_ms: i64,
    /// Unix milliseconds when it ended.
    pub finished_ms: i64,
    /// Worker that ran it.
    pub worker: usize,
    /// Whether it succeeded.
    pub ok: bool,
    /// HTTP status or exit code, when there was one.
    pub code: Option<i64>,
    /// Why it failed (empty on success).
    pub error: String,
    /// The start of the output (at most [`crate::exec::EXCERPT_LEN`] bytes).
    pub output_excerpt: String,
}

/// A task as stored: what to run plus where it is in its life.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub method: Method,
    pub name: String,
    /// GET query string, POST JSON body, MAIL_TO JSON object; empty for EXEC.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub params: String,
    /// EXEC arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Workers allowed to run it; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cc: Vec<usize>,
    #[serde(default)]
    pub delay: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retry: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_interval: Option<u64>,
    /// Submitted by the operator (cron file), not the network: EXEC needs no `--exec_dir`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub trusted: bool,
    /// Came from Kafka: its final result is also produced to the result topic.
    #[serde(default, skip_serializing_if = "is_false")]
    pub kafka: bool,
    /// Unix milliseconds of the accepted submit.
    pub submitted_ms: i64,
    /// Unix microseconds when it is due (delay or retry).
    pub due_us: u64,
    pub state: State,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How EXEC tasks that come from the network are allowed to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecPolicy {
    /// Neither `--exec_dir` nor `--exec_any`: refused.
    Disabled,
    /// Only programs directly inside this directory.
    Dir(PathBuf),
    /// Any program on PATH (`--exec_any`).
    Any,
}

/// What validation needs to know about the server.
#[derive(Clone, Debug)]
pub struct Limits {
    pub workers: usize,
    pub exec: ExecPolicy,
    /// MAIL_TO needs a configured relay.
    pub mail_enabled: bool,
    /// Sender used when a MAIL_TO task gives none (`--smtp_from`).
    pub mail_from: Option<String>,
}

/// A submitted task that failed validation; names the field at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskError {
    /// The task is not a JSON object.
    NotAnObject,
    /// A field is missing or wrong.
    Field {
        field: &'static str,
        problem: String,
    },
}

impl TaskError {
    fn field(field: &'static str, problem: impl Into<String>) -> TaskError {
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
            TaskError::Field { field, problem } => write!(f, "{field}: {problem}"),
        }
    }
}

impl std::error::Error for TaskError {}

/// A validated submission: the task plus how long the caller waits for its result.
#[derive(Clone, Debug)]
pub struct Submission {
    pub task: Task,
    /// Seconds the submit call blocks for the final result (0: no wait).
    pub wait: u64,
}

/// Checks an id against the rules in the README (1–200 bytes, no whitespace, control characters
/// or `/`).
pub fn check_id(id: &str) -> Result<(), TaskError> {
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

/// Validates one submitted JSON task. `now_ms`/`now_us` are the submit time.
pub fn parse_task(
    v: &Value,
    limits: &Limits,
    trusted: bool,
    now_us: u64,
) -> Result<Submission, TaskError> {
    let obj = v.as_object().ok_or(TaskError::NotAnObject)?;
    let id = match obj.get("id") {
        None | Some(Value::Null) => uuid::Uuid::new_v4().to_string(),
        Some(Value::String(s)) => {
            check_id(s)?;
            s.clone()
        }
        Some(_) => return Err(TaskError::field("id", "must be a string")),
    };
    let method = match obj.get("method") {
        Some(Value::String(s)) => Method::parse(s).ok_or_else(|| {
            TaskError::field(
                "method",
                format!("unknown method {s:?}; use GET, POST, EXEC or MAIL_TO"),
            )
        })?,
        None | Some(Value::Null) => return Err(TaskError::field("method", "is required")),
        Some(_) => return Err(TaskError::field("method", "must be a string")),
    };
    let name = match obj.get("name") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(TaskError::field("name", "is required"))
        }
        Some(_) => return Err(TaskError::field("name", "must be a string")),
    };
    let delay = whole(obj, "delay", MAX_DELAY_S)?.unwrap_or(0);
    let wait = whole(obj, "wait", MAX_WAIT_S)?.unwrap_or(0);
    let timeout = whole(obj, "timeout", MAX_TIMEOUT_S)?;
    if timeout == Some(0) {
        return Err(TaskError::field("timeout", "must be at least 1 second"));
    }
    let max_retry = whole(obj, "max_retry", MAX_RETRY_LIMIT as u64)?.map(|n| n as u32);
    let retry_interval = whole(obj, "retry_interval", MAX_RETRY_INTERVAL_S)?;
    let cc = parse_cc(obj.get("cc"), limits.workers)?;

    let mut params = String::new();
    let mut args = Vec::new();
    let raw = obj.get("params");
    match method {
        Method::Get => {
            check_url(&name)?;
            params = match raw {
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
        }
        Method::Post => {
            check_url(&name)?;
            params = match raw {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) if s.trim().is_empty() => String::new(),
                Some(Value::String(s)) => {
                    serde_json::from_str::<Value>(s).map_err(|e| {
                        TaskError::field("params", format!("for POST must be JSON: {e}"))
                    })?;
                    s.clone()
                }
                Some(other) => other.to_string(),
            };
        }
        Method::Exec => {
            args = match raw {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|i| i.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        TaskError::field(
                            "params",
                            "for EXEC must be a string or an array of strings",
                        )
                    })?,
                Some(_) => {
                    return Err(TaskError::field(
                        "params",
                        "for EXEC must be a string or an array of strings",
                    ))
                }
            };
            if args.iter().any(|a| a.contains('\0')) {
                return Err(TaskError::field("params", "arguments must not contain NUL"));
            }
            if !trusted {
                check_exec_name(&name, &limits.exec)?;
            }
        }
        Method::MailTo => {
            if !limits.mail_enabled {
                return Err(TaskError::field(
                    "method",
                    "MAIL_TO is not available: no SMTP relay is configured (--smtp_server)",
                ));
            }
            let mail = crate::exec::mail::parse_params(&name, raw, limits.mail_from.as_deref())
                .map_err(|(field, problem)| TaskError::Field { field, problem })?;
            params = serde_json::to_string(&mail)
                .map_err(|e| TaskError::field("params", e.to_string()))?;
        }
    }

    let delay_us = delay * 1_000_000;
    let task = Task {
        id,
        method,
        name,
        params,
        args,
        cc,
        delay,
        timeout,
        max_retry,
        retry_interval,
        trusted,
        kafka: false,
        submitted_ms: (now_us / 1000) as i64,
        due_us: now_us + delay_us,
        state: if delay == 0 {
            State::Ready
        } else {
            State::Delayed
        },
        attempts: Vec::new(),
    };
    Ok(Submission { task, wait })
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
pub fn parse_cc(v: Option<&Value>, workers: usize) -> Result<Vec<usize>, TaskError> {
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
fn check_url(name: &str) -> Result<(), TaskError> {
    let lower = name.to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(TaskError::field(
            "name",
            format!("must be an http:// or https:// URL, got {name:?}"),
        ));
    }
    let uri: ureq::http::Uri = name
        .parse()
        .map_err(|e| TaskError::field("name", format!("is not a valid URL: {e}")))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(TaskError::field("name", "URL has no host"));
    }
    Ok(())
}

/// Applies the EXEC rules for network submissions.
fn check_exec_name(name: &str, policy: &ExecPolicy) -> Result<(), TaskError> {
    match policy {
        ExecPolicy::Disabled => Err(TaskError::field(
            "method",
            "EXEC from the network is disabled; start poulpe with --exec_dir DIR (or --exec_any)",
        )),
        ExecPolicy::Any => Ok(()),
        ExecPolicy::Dir(dir) => crate::exec::program::resolve_in_dir(dir, name)
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
        ok(json!({"method":"GET","name":"http://x","unknown_field":true}));
        ok(json!({"method":"GET","name":"http://x","cc":[0,3]}));
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
}
