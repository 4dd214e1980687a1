//! The task model: the stored `Task`, its `State` and `Attempt`s, and its final `TaskResult`.
//! Validation of submitted JSON into a task is in [`parse`] (mail params in [`mail`]); the EXEC
//! rules, shared by validation and the program executor, in [`exec_policy`].

pub(crate) mod exec_policy;
pub(crate) mod mail;
pub(crate) mod parse;

pub(crate) use exec_policy::{resolve_in_dir, ExecPolicy, ProgramError};
pub(crate) use parse::{parse_task, Limits, TaskError};

use crate::clock::rfc3339_ms;
use serde::{Deserialize, Serialize};

/// Deserializes a unit enum from its wire name, by hand: serde's derived code is several KB per
/// enum, and the static binary has a size budget. Errors read as the derived ones.
macro_rules! deserialize_by_name {
    ($t:ty { $($name:literal => $v:expr),+ $(,)? }) => {
        impl $t {
            /// The value named `s` (one non-generic copy, whatever the deserializer).
            fn by_name(s: &str) -> Option<$t> {
                match s {
                    $($name => Some($v),)+
                    _ => None,
                }
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                <$t>::by_name(&s)
                    .ok_or_else(|| serde::de::Error::unknown_variant(&s, &[$($name),+]))
            }
        }
    };
}

/// Whether the task succeeded, as the API says it (`OK` or `Fail`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) enum Verdict {
    #[serde(rename = "OK")]
    Ok,
    Fail,
}

/// How a task ended (`succeeded`, `dead` once its retries are spent, or `cancelled` before it
/// started).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum FinalStatus {
    Succeeded,
    Dead,
    Cancelled,
}

deserialize_by_name!(Verdict { "OK" => Verdict::Ok, "Fail" => Verdict::Fail });
deserialize_by_name!(FinalStatus {
    "succeeded" => FinalStatus::Succeeded,
    "dead" => FinalStatus::Dead,
    "cancelled" => FinalStatus::Cancelled,
});

impl FinalStatus {
    /// As the API writes it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FinalStatus::Succeeded => "succeeded",
            FinalStatus::Dead => "dead",
            FinalStatus::Cancelled => "cancelled",
        }
    }
}

/// The final result of a task, exactly as `/task_resp` returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TaskResult {
    pub(crate) id: String,
    pub(crate) result: Verdict,
    pub(crate) reason: String,
    pub(crate) status: FinalStatus,
    pub(crate) attempts: usize,
    pub(crate) output: String,
    pub(crate) code: Option<i64>,
    pub(crate) submitted_at: String,
    pub(crate) finished_at: String,
    /// The id of the task that POSTs this result to the task's `callback` (its own result says
    /// whether the receiver got it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) callback_id: Option<String>,
    /// The node that ran its final attempt (or cancelled it): `--node_id`. Absent from results
    /// stored by a release before nodes.
    /// A `Box<str>`: one word less than a `String` in every `Change::Finish`.
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub(crate) node: Box<str>,
}

impl Task {
    /// The task's headers as (name, value) pairs.
    pub(crate) fn header_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers
            .lines()
            .filter_map(|line| line.split_once(": "))
    }
}

impl TaskResult {
    /// The result of `task` cancelled at `now_ms` before an attempt of it started (earlier
    /// failed attempts count; the last one's code stays).
    pub(crate) fn cancelled(task: &Task, now_ms: i64) -> TaskResult {
        TaskResult {
            id: task.id.clone(),
            result: Verdict::Fail,
            reason: "cancelled".to_string(),
            status: FinalStatus::Cancelled,
            attempts: task.attempts.len(),
            output: String::new(),
            code: task.attempts.last().and_then(|a| a.code),
            submitted_at: rfc3339_ms(task.submitted_ms),
            finished_at: rfc3339_ms(now_ms),
            callback_id: None,
            node: crate::node::own().into(),
        }
    }
}

/// What a task does when it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) enum Method {
    #[serde(rename = "GET")]
    Get,
    #[serde(rename = "POST")]
    Post,
    #[serde(rename = "EXEC")]
    Exec,
    #[serde(rename = "MAIL_TO")]
    MailTo,
}

deserialize_by_name!(Method {
    "GET" => Method::Get,
    "POST" => Method::Post,
    "EXEC" => Method::Exec,
    "MAIL_TO" => Method::MailTo,
});

impl Method {
    /// Parses the wire spelling (case-insensitive; no upper-case copy made).
    pub(crate) fn parse(s: &str) -> Option<Method> {
        [Method::Get, Method::Post, Method::Exec, Method::MailTo]
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
    }

    /// The wire spelling.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Exec => "EXEC",
            Method::MailTo => "MAIL_TO",
        }
    }
}

/// Where a task is in its life; persisted with the task so a restart knows what to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum State {
    /// Waiting for its delay to pass.
    Delayed,
    /// Due: waiting for a worker.
    Ready,
    /// An attempt is running.
    Running,
    /// A failed attempt waits for its retry time.
    RetryWait,
}

deserialize_by_name!(State {
    "delayed" => State::Delayed,
    "ready" => State::Ready,
    "running" => State::Running,
    "retry_wait" => State::RetryWait,
});

impl State {
    /// The name shown to users in status answers.
    pub(crate) fn as_str(self) -> &'static str {
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
pub(crate) struct Attempt {
    /// Unix milliseconds when the attempt started.
    pub(crate) started_ms: i64,
    /// Unix milliseconds when it ended.
    pub(crate) finished_ms: i64,
    /// Worker that ran it.
    pub(crate) worker: usize,
    /// Whether it succeeded.
    pub(crate) ok: bool,
    /// HTTP status or exit code, when there was one.
    pub(crate) code: Option<i64>,
    /// Why it failed (empty on success).
    pub(crate) error: String,
    /// The start of the output (at most `exec::EXCERPT_LEN` bytes).
    pub(crate) output_excerpt: String,
}

/// A task as stored: what to run plus where it is in its life.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Task {
    pub(crate) id: String,
    pub(crate) method: Method,
    pub(crate) name: String,
    /// GET query string, POST JSON body, MAIL_TO JSON object; empty for EXEC.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) params: String,
    /// EXEC arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) args: Vec<String>,
    /// Workers allowed to run it; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) cc: Vec<usize>,
    #[serde(default)]
    pub(crate) delay: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_retry: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) retry_interval: Option<u64>,
    /// Submitted by the operator (cron file), not the network: EXEC needs no `--exec_dir`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) trusted: bool,
    /// Came from Kafka: its final result is also produced to the result topic.
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) kafka: bool,
    /// Unix milliseconds of the accepted submit.
    pub(crate) submitted_ms: i64,
    /// Unix microseconds when it is due (delay or retry).
    pub(crate) due_us: u64,
    pub(crate) state: State,
    /// Headers sent with a GET or POST, one `Name: value` per line (values may be secrets:
    /// never logged). One string, not a list of pairs: names hold no `:` and values no line
    /// break (checked at submit), and a string costs the binary no serde code of its own.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) headers: String,
    /// Where its final result is POSTed once it has finished (by a task of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) callback: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) attempts: Vec<Attempt>,
    /// Attempts made before its last retry by the operator (`POST /task/{id}/retry`): they
    /// stay in its history but no longer count against its retry budget.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) budget_from: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(v: T) {
        let json = serde_json::to_string(&v).expect("serialize");
        let back: T = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, v, "{json}");
    }

    #[test]
    fn unit_enums_read_back_what_they_write_and_refuse_other_names() {
        for v in [Verdict::Ok, Verdict::Fail] {
            round_trip(v);
        }
        for v in [FinalStatus::Succeeded, FinalStatus::Dead] {
            round_trip(v);
        }
        for v in [Method::Get, Method::Post, Method::Exec, Method::MailTo] {
            round_trip(v);
        }
        for v in [
            State::Delayed,
            State::Ready,
            State::Running,
            State::RetryWait,
        ] {
            round_trip(v);
        }
        assert_eq!(
            serde_json::to_string(&State::RetryWait).ok(),
            Some("\"retry_wait\"".into())
        );
        let e = serde_json::from_str::<State>("\"queued\"").expect_err("not a stored name");
        assert!(e.to_string().contains("unknown variant `queued`"), "{e}");
        assert!(serde_json::from_str::<Method>("3").is_err());
        assert_eq!(Method::parse("mail_To"), Some(Method::MailTo));
        assert_eq!(Method::parse("get"), Some(Method::Get));
        for bad in ["", "GE", "GETS", "PÖST", "EXEC "] {
            assert_eq!(Method::parse(bad), None, "{bad}");
        }
    }
}
