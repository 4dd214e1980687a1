//! The task browser's side of the store: the stored record of a finished task (its result, then
//! its task), what a listing asks for and answers, and the cursor that pages through it.
//!
//! A finished task's stored value is the result's compact JSON, a `\n`, then the task's JSON
//! with its attempts (compact JSON never holds a raw newline, so the first line is the result).
//! Records written by releases before the browser have no newline: their task is unknown.

use super::StoreError;
use crate::clock::rfc3339_ms;
use crate::task::{FinalStatus, Method, State, Task, TaskResult};

/// Most entries one listing call examines, whatever it finds: a filter matching few tasks
/// pages through a million in bounded steps.
pub(crate) const SCAN_CAP: usize = 10_000;

/// The stored value of a finished task: `result`, then `task` when it is kept.
pub(crate) fn encode_record(
    result: &TaskResult,
    task: Option<&Task>,
) -> Result<Vec<u8>, StoreError> {
    // Sized once: growing a buffer by doubling costs the outcome thread several reallocations
    // per finished task.
    let guess = |t: &Task| {
        256 + t.name.len()
            + t.params.len()
            + t.headers.len()
            + t.args.iter().map(|a| a.len() + 4).sum::<usize>()
            + t.attempts
                .iter()
                .map(|a| 160 + a.error.len() + a.output_excerpt.len())
                .sum::<usize>()
    };
    let mut out = Vec::with_capacity(256 + result.output.len() + task.map_or(0, guess));
    serde_json::to_writer(&mut out, result).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if let Some(t) = task {
        out.push(b'\n');
        serde_json::to_writer(&mut out, t).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    }
    Ok(out)
}

/// The result line of a stored record (cheap: the task is not read).
pub(crate) fn decode_result(bytes: &[u8]) -> Result<TaskResult, StoreError> {
    let head = bytes.split(|b| *b == b'\n').next().unwrap_or(bytes);
    serde_json::from_slice(head).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The task of a stored record, `None` for a record of an earlier release.
pub(crate) fn decode_task(bytes: &[u8]) -> Result<Option<Task>, StoreError> {
    match bytes.iter().position(|b| *b == b'\n') {
        Some(i) => serde_json::from_slice(&bytes[i + 1..])
            .map(Some)
            .map_err(|e| StoreError::Corrupt(e.to_string())),
        None => Ok(None),
    }
}

/// A state a listing can show: an unfinished one, or how a task finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Listed {
    Live(State),
    Final(FinalStatus),
}

impl Listed {
    /// The state named `s` (the names `/task_resp` uses).
    pub(crate) fn parse(s: &str) -> Option<Listed> {
        Some(match s {
            "delayed" => Listed::Live(State::Delayed),
            "queued" => Listed::Live(State::Ready),
            "running" => Listed::Live(State::Running),
            "retry_wait" => Listed::Live(State::RetryWait),
            "succeeded" => Listed::Final(FinalStatus::Succeeded),
            "dead" => Listed::Final(FinalStatus::Dead),
            "cancelled" => Listed::Final(FinalStatus::Cancelled),
            _ => return None,
        })
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Listed::Live(s) => s.as_str(),
            Listed::Final(s) => s.as_str(),
        }
    }
}

/// Where a listing goes on: a number and a text whose meaning is the backend's (an id, an
/// expiry and an id, a scan cursor and an offset). Clients see it as opaque hex.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) n: u64,
    pub(crate) text: String,
}

impl Cursor {
    /// The hex text given to clients, bound to the state listed.
    pub(crate) fn encode(&self, what: Listed) -> String {
        let raw = format!("{}.{}.{}", what.as_str(), self.n, self.text);
        let mut out = String::with_capacity(raw.len() * 2);
        for b in raw.bytes() {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
        out
    }

    /// Reads a client's cursor back; `Err` says what is wrong with it.
    pub(crate) fn decode(hex: &str, what: Listed) -> Result<Cursor, &'static str> {
        let h = hex.as_bytes();
        if h.is_empty() || h.len() % 2 == 1 {
            return Err("not a cursor this server gave");
        }
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut raw = Vec::with_capacity(h.len() / 2);
        for pair in h.chunks(2) {
            match (digit(pair[0]), digit(pair[1])) {
                (Some(a), Some(b)) => raw.push(a << 4 | b),
                _ => return Err("not a cursor this server gave"),
            }
        }
        let raw = String::from_utf8(raw).map_err(|_| "not a cursor this server gave")?;
        let mut parts = raw.splitn(3, '.');
        let (Some(state), Some(n), Some(text)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("not a cursor this server gave");
        };
        if Listed::parse(state).is_none() {
            return Err("not a cursor this server gave");
        }
        if state != what.as_str() {
            return Err("it pages through another state");
        }
        let n = n.parse().map_err(|_| "not a cursor this server gave")?;
        Ok(Cursor {
            n,
            text: text.to_string(),
        })
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// What a listing asks for.
#[derive(Clone, Debug)]
pub(crate) struct ListQuery {
    pub(crate) what: Listed,
    pub(crate) method: Option<Method>,
    /// Kept when the id or the name holds it (empty: every task).
    pub(crate) q: String,
    /// Most tasks in the page.
    pub(crate) limit: usize,
    /// Where the previous page ended.
    pub(crate) after: Option<Cursor>,
    /// Most entries examined ([`SCAN_CAP`]; less in tests).
    pub(crate) scan: usize,
}

impl ListQuery {
    /// Whether a task with this id, name and method is shown (unknown name or method: a
    /// record of an earlier release, shown unless a method is asked for).
    pub(crate) fn keeps(&self, id: &str, name: Option<&str>, method: Option<Method>) -> bool {
        (self.method.is_none() || self.method == method)
            && (self.q.is_empty()
                || id.contains(self.q.as_str())
                || name.is_some_and(|n| n.contains(self.q.as_str())))
    }
}

/// One task of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Row {
    pub(crate) id: String,
    pub(crate) state: &'static str,
    pub(crate) method: Option<Method>,
    pub(crate) name: Option<String>,
    pub(crate) attempts: usize,
    pub(crate) due_us: Option<u64>,
    pub(crate) submitted_at: String,
    pub(crate) finished_at: Option<String>,
}

impl Row {
    /// An unfinished task in `state`.
    pub(crate) fn live(t: Task, state: State) -> Row {
        Row {
            state: state.as_str(),
            method: Some(t.method),
            attempts: t.attempts.len(),
            due_us: Some(t.due_us),
            submitted_at: rfc3339_ms(t.submitted_ms),
            finished_at: None,
            name: Some(t.name),
            id: t.id,
        }
    }

    /// A finished task (its task unknown for a record of an earlier release).
    pub(crate) fn finished(r: TaskResult, t: Option<Task>) -> Row {
        Row {
            state: r.status.as_str(),
            method: t.as_ref().map(|t| t.method),
            name: t.map(|t| t.name),
            attempts: r.attempts,
            due_us: None,
            submitted_at: r.submitted_at,
            finished_at: Some(r.finished_at),
            id: r.id,
        }
    }
}

/// A page of a listing; `next` is `None` once the whole state has been gone through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Page {
    pub(crate) rows: Vec<Row>,
    pub(crate) next: Option<Cursor>,
}

/// Everything stored about one task: its state, its task when known, its result when finished.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Record {
    pub(crate) state: &'static str,
    pub(crate) task: Option<Task>,
    pub(crate) result: Option<TaskResult>,
}

/// What `revive` found.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Revive {
    /// Dead, now ready to run again (due now, its budget counting from here).
    Revived(Box<Task>),
    /// Not dead: in this state.
    NotDead(&'static str),
    /// Dead, but stored by an earlier release that kept only its result.
    TaskNotKept,
    /// Never seen, or expired.
    Unknown,
}

/// The task of a dead record made ready to run again at `now_us`: its attempts stay, its
/// retry budget counts from them.
pub(crate) fn revived(mut t: Task, now_us: u64) -> Task {
    t.state = State::Ready;
    t.due_us = now_us;
    t.budget_from = t.attempts.len();
    t
}

/// Decides a revive from the stored record of a finished task.
pub(crate) fn revive_from(bytes: &[u8], now_us: u64) -> Result<Revive, StoreError> {
    let r = decode_result(bytes)?;
    if r.status != FinalStatus::Dead {
        return Ok(Revive::NotDead(r.status.as_str()));
    }
    Ok(match decode_task(bytes)? {
        Some(t) => Revive::Revived(Box::new(revived(t, now_us))),
        None => Revive::TaskNotKept,
    })
}

/// Adds a finished record to `page` when it matches; true once the page is full.
pub(crate) fn take_finished(q: &ListQuery, bytes: &[u8], page: &mut Vec<Row>) -> bool {
    let Listed::Final(want) = q.what else {
        return false;
    };
    let Ok(r) = decode_result(bytes) else {
        return false;
    };
    if r.status != want {
        return false;
    }
    let t = decode_task(bytes).ok().flatten();
    if q.keeps(
        &r.id,
        t.as_ref().map(|t| t.name.as_str()),
        t.as_ref().map(|t| t.method),
    ) {
        page.push(Row::finished(r, t));
    }
    page.len() >= q.limit
}

/// Adds an unfinished task in `state` to `page` when it matches; true once the page is full.
pub(crate) fn take_live(q: &ListQuery, state: State, bytes: &[u8], page: &mut Vec<Row>) -> bool {
    if q.what != Listed::Live(state) {
        return false;
    }
    let Ok(t) = serde_json::from_slice::<Task>(bytes) else {
        return false;
    };
    if q.keeps(&t.id, Some(&t.name), Some(t.method)) {
        page.push(Row::live(t, state));
    }
    page.len() >= q.limit
}
