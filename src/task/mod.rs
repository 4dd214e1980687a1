//! The task model: the stored `Task`, its `State` and `Attempt`s, and its final `TaskResult`.
//! Validation of submitted JSON into a task is in [`parse`] (mail params in [`mail`]); the EXEC
//! rules, shared by validation and the program executor, in [`exec_policy`].

pub mod exec_policy;
pub mod mail;
pub mod parse;

pub use exec_policy::{resolve_in_dir, ExecPolicy, ProgramError};
pub use parse::{
    check_id, parse_cc, parse_task, Limits, Submission, TaskError, MAX_DELAY_S, MAX_ID_LEN,
    MAX_RETRY_INTERVAL_S, MAX_RETRY_LIMIT, MAX_TIMEOUT_S, MAX_WAIT_S,
};

use serde::{Deserialize, Serialize};

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
    /// The start of the output (at most `exec::EXCERPT_LEN` bytes).
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
