//! Executors: run one attempt of a task and say how it went. They never panic and never retry;
//! the outcome stage decides what happens next.

pub(crate) mod h1;
pub(crate) mod http;
pub(crate) mod mail;
pub(crate) mod plain;
pub(crate) mod program;
pub(crate) mod resolve;
pub(crate) mod tcp;

use crate::task::{ExecPolicy, Method, Task};
use std::time::Duration;

/// Most output kept from one attempt.
pub(crate) const MAX_OUTPUT: usize = 64 * 1024;
/// Most output kept per attempt in the attempt history (dead-letter records).
pub(crate) const EXCERPT_LEN: usize = 1024;

/// What one attempt produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunResult {
    pub(crate) ok: bool,
    /// HTTP status or exit code.
    pub(crate) code: Option<i64>,
    pub(crate) output: String,
    /// Why it failed; empty on success.
    pub(crate) error: String,
    /// A failure that no retry can fix (e.g. a mail server's 5xx): dead at once.
    pub(crate) permanent: bool,
}

impl RunResult {
    /// A failed attempt with no output.
    pub(crate) fn failed(error: impl Into<String>) -> RunResult {
        RunResult {
            ok: false,
            code: None,
            output: String::new(),
            error: error.into(),
            permanent: false,
        }
    }
}

/// What executors share: the HTTP agent and the EXEC rules.
pub(crate) struct Executors {
    pub(crate) http: http::HttpExec,
    /// Present when `--smtp_server` is set.
    pub(crate) mail: Option<mail::MailExec>,
    pub(crate) exec: ExecPolicy,
    /// Starts EXEC programs at the server's priority, not the workers' lower one.
    pub(crate) spawner: program::Spawner,
    pub(crate) default_timeout: Duration,
}

impl Executors {
    /// Runs one attempt (kept out of the worker loop: inlined there, it costs the binary more).
    #[inline(never)]
    pub(crate) fn run(&self, task: &Task) -> RunResult {
        let timeout = task
            .timeout
            .map(Duration::from_secs)
            .unwrap_or(self.default_timeout);
        match task.method {
            Method::Get | Method::Post => self.http.run(task, timeout),
            Method::Exec => program::run(task, &self.exec, &self.spawner, timeout),
            Method::MailTo => match &self.mail {
                Some(m) => m.run(task, timeout),
                None => RunResult {
                    permanent: true,
                    ..RunResult::failed("MAIL_TO needs an SMTP relay (--smtp_server)")
                },
            },
        }
    }
}

/// "timed out after N s": an attempt that ran out of time (whichever client ran it).
pub(crate) struct TimedOut(pub(crate) Duration);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "timed out after {} s", self.0.as_secs())
    }
}

impl From<TimedOut> for RunResult {
    fn from(t: TimedOut) -> RunResult {
        RunResult::failed(t.to_string())
    }
}

/// The result of an HTTP answer with `status` and `body` (the first `MAX_OUTPUT + 1` bytes read:
/// more means cut), `failed` saying why reading the body failed: 2xx is success.
pub(crate) fn answered(
    status: u16,
    mut body: Vec<u8>,
    failed: Option<&dyn std::fmt::Display>,
) -> RunResult {
    let cut = body.len() > MAX_OUTPUT;
    body.truncate(MAX_OUTPUT);
    let output = into_text(body, MAX_OUTPUT, cut);
    let ok = (200..300).contains(&status);
    let error = match (failed, ok) {
        (Some(e), _) => format!("HTTP {status}, reading the body failed: {e}"),
        (None, true) => String::new(),
        (None, false) => format!("HTTP {status}"),
    };
    RunResult {
        ok: ok && failed.is_none(),
        code: Some(i64::from(status)),
        output,
        error,
        permanent: false,
    }
}

/// `cap_text` of bytes the caller gives up: valid UTF-8 within `max` becomes the text
/// without a copy (an attempt's whole output, read into a `Vec` of its own).
pub(crate) fn into_text(bytes: Vec<u8>, max: usize, cut: bool) -> String {
    match String::from_utf8(bytes) {
        Ok(text) if text.len() <= max && !cut => text,
        Ok(text) => cap_text(text.as_bytes(), max, cut),
        Err(e) => cap_text(e.as_bytes(), max, cut),
    }
}

/// Keeps at most `max` bytes (on a character boundary), marking the cut.
pub(crate) fn cap_text(bytes: &[u8], max: usize, cut: bool) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= max && !cut {
        return text.into_owned();
    }
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[output cut at {max} bytes]", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_marks_the_cut_on_a_char_boundary() {
        assert_eq!(cap_text(b"abc", 10, false), "abc");
        let s = cap_text("ééé".as_bytes(), 3, false);
        assert!(
            s.starts_with('é') && s.contains("[output cut at 3 bytes]"),
            "{s}"
        );
        assert!(cap_text(b"abc", 10, true).contains("cut"));
        for (bytes, max, cut) in [
            (&b"abc"[..], 10, false),
            (b"abc", 10, true),
            (b"abcdef", 3, false),
            ("ééé".as_bytes(), 3, false),
            (b"a\xffb", 10, false),
        ] {
            assert_eq!(
                into_text(bytes.to_vec(), max, cut),
                cap_text(bytes, max, cut)
            );
        }
    }
}
