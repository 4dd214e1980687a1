//! The one way in: every adapter (HTTP, WebSocket, Kafka, cron) parses its input and calls
//! [`Submitter::submit`], which validates, makes the tasks durable and schedules them.

pub(crate) mod assets;
mod browse;
pub mod http;
#[cfg(feature = "kafka")]
pub(crate) mod kafka;
pub mod ws;

use crate::clock::{now_ms, now_us};
use crate::dispatch::Pool;
use crate::outcome::Announce;
use crate::schedule::timer::Timer;
use crate::status::Status;
use crate::store::{Cancel, ListQuery, Revive, Store, StoreError};
use crate::task::{parse_task, Limits, State, Task, TaskError};
use serde_json::Value;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Why nothing was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SubmitError {
    /// A task failed validation; `index` is its place in an array submission.
    Invalid {
        index: Option<usize>,
        error: TaskError,
    },
    /// An empty array.
    Empty,
    /// An unfinished task has this id.
    Duplicate(String),
    /// The store cannot take writes now.
    Unavailable(String),
    /// The server is stopping.
    ShuttingDown,
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::Invalid {
                index: Some(i),
                error,
            } => write!(f, "task {i}: {error}"),
            SubmitError::Invalid { index: None, error } => write!(f, "{error}"),
            SubmitError::Empty => write!(f, "no task: the array is empty"),
            SubmitError::Duplicate(id) => {
                write!(
                    f,
                    "id: a task with id {id:?} is already queued and not finished"
                )
            }
            SubmitError::Unavailable(why) => {
                write!(f, "store unavailable, nothing accepted: {why}")
            }
            SubmitError::ShuttingDown => write!(f, "the server is shutting down, nothing accepted"),
        }
    }
}

impl std::error::Error for SubmitError {}

/// Where a submission comes from; decides trust and where results also go, and labels the
/// accepted counters (`Origin as usize` indexes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// HTTP API clients (trusted as WebSocket clients are).
    Http,
    /// WebSocket clients.
    Ws,
    /// The operator's cron file: EXEC needs no `--exec_dir`.
    Cron,
    /// The Kafka task topic: the final result is also produced to the result topic.
    Kafka,
}

/// One submission's answer.
pub(crate) type Answer = Result<Accepted, SubmitError>;

/// What was accepted: the ids in submission order and the longest `wait` asked for.
#[derive(Debug, Clone)]
pub(crate) struct Accepted {
    pub(crate) ids: Vec<String>,
    pub(crate) wait: u64,
}

/// The one way in, and the one way out before a task starts (cancel), as a cheap cloneable
/// handle: adapters hold this rather than the whole server.
#[derive(Clone)]
pub struct Submitter(Arc<Gate>);

/// What a submit needs: validation limits, the store, and where accepted tasks go next.
struct Gate {
    limits: Limits,
    store: Arc<dyn Store>,
    pool: Arc<Pool>,
    timer: Timer,
    status: Arc<Status>,
    cancelling: Cancelling,
    /// `--dead`: a retried dead task's record there is marked retried.
    dead_dir: std::path::PathBuf,
    /// False once shutdown has begun: submits answer `ShuttingDown`.
    accepting: AtomicBool,
    /// Held through a pause or resume: its store write and the pool's flag go together.
    pausing: parking_lot::Mutex<()>,
}

/// What a cancel needs besides the store: how long its result is kept and where it is
/// announced (as the outcome stage announces finished tasks).
pub(crate) struct Cancelling {
    pub(crate) announce: Announce,
    pub(crate) result_ttl_s: u64,
}

impl Gate {
    /// Hands durable tasks on: ready ones to the dispatcher, waiting ones to the timer.
    fn release(&self, tasks: Vec<Task>) {
        for t in tasks {
            if t.state == State::Ready {
                self.pool.dispatch(Arc::new(t));
            } else {
                self.timer.schedule(Arc::from(t.id.as_str()), t.due_us);
            }
        }
    }
}

impl Submitter {
    pub(crate) fn new(
        limits: Limits,
        store: Arc<dyn Store>,
        pool: Arc<Pool>,
        timer: Timer,
        status: Arc<Status>,
        cancelling: Cancelling,
        dead_dir: std::path::PathBuf,
    ) -> Submitter {
        Submitter(Arc::new(Gate {
            limits,
            store,
            pool,
            timer,
            status,
            cancelling,
            dead_dir,
            accepting: AtomicBool::new(true),
            pausing: parking_lot::Mutex::new(()),
        }))
    }

    /// The validation limits (the cron file is checked against them too).
    pub(crate) fn limits(&self) -> &Limits {
        &self.0.limits
    }

    /// False once shutdown has begun.
    pub(crate) fn accepting(&self) -> bool {
        self.0.accepting.load(Ordering::Acquire)
    }

    /// Refuses every later submit (shutdown).
    pub(crate) fn refuse_new(&self) {
        self.0.accepting.store(false, Ordering::Release);
    }

    /// Validates all tasks (all or nothing), stores them durably, calls `on_durable` with the
    /// accepted ids (so a caller can register for results before any can finish), then hands
    /// them to the dispatcher or the timer.
    pub(crate) fn submit(
        &self,
        values: &[Value],
        origin: Origin,
        on_durable: impl FnOnce(&Accepted),
    ) -> Result<Accepted, SubmitError> {
        let mut on_durable = Some(on_durable);
        self.submit_many(&[values], origin, &mut |answers| {
            if let (Some(Ok(acc)), Some(f)) = (answers.first(), on_durable.take()) {
                f(acc);
            }
        })
        .pop()
        .unwrap_or(Err(SubmitError::Empty))
    }

    /// `submit` for several submissions at once, each all or none on its own terms as if
    /// submitted one after the other, stored in as few durable writes as the store can (the
    /// HTTP loop thread's requests of one wake-up, a WebSocket frame's tasks). `on_durable`
    /// gets the answers, once some are accepted and before any task is handed on. One answer
    /// per submission, in order.
    pub(crate) fn submit_many(
        &self,
        submissions: &[&[Value]],
        origin: Origin,
        on_durable: &mut dyn FnMut(&[Answer]),
    ) -> Vec<Answer> {
        if !self.accepting() {
            return submissions
                .iter()
                .map(|_| Err(SubmitError::ShuttingDown))
                .collect();
        }
        let now = now_us();
        let mut answers: Vec<Answer> = Vec::with_capacity(submissions.len());
        let mut valid: Vec<(usize, Vec<Task>)> = Vec::with_capacity(submissions.len());
        for values in submissions {
            match self.validate(values, origin, now) {
                Ok((tasks, wait)) => {
                    valid.push((answers.len(), tasks));
                    answers.push(Ok(Accepted {
                        ids: Vec::new(),
                        wait,
                    }));
                }
                Err(e) => answers.push(Err(e)),
            }
        }
        let batches: Vec<&[Task]> = valid.iter().map(|(_, t)| t.as_slice()).collect();
        let stored = self.0.store.insert_many(&batches);
        let mut durable: Vec<Task> = Vec::new();
        for ((at, tasks), r) in valid.into_iter().zip(stored) {
            match r {
                Ok(()) => {
                    if let Ok(acc) = &mut answers[at] {
                        acc.ids = tasks.iter().map(|t| t.id.clone()).collect();
                    }
                    self.0.status.accepted(origin, &tasks);
                    durable.extend(tasks);
                }
                Err(e) => answers[at] = Err(refused(e)),
            }
        }
        if !durable.is_empty() {
            on_durable(&answers);
            self.0.release(durable);
        }
        answers
    }

    /// Parses and checks every value as a task from `origin` (all or nothing); gives the tasks
    /// and the longest `wait` asked for.
    fn validate(
        &self,
        values: &[Value],
        origin: Origin,
        now: u64,
    ) -> Result<(Vec<Task>, u64), SubmitError> {
        if values.is_empty() {
            return Err(SubmitError::Empty);
        }
        let array = values.len() > 1;
        let mut tasks: Vec<Task> = Vec::with_capacity(values.len());
        let mut wait = 0;
        for (i, v) in values.iter().enumerate() {
            let s =
                parse_task(v, &self.0.limits, origin == Origin::Cron, now).map_err(|error| {
                    SubmitError::Invalid {
                        index: array.then_some(i),
                        error,
                    }
                })?;
            wait = wait.max(s.wait);
            let mut task = s.task;
            task.kafka = origin == Origin::Kafka;
            tasks.push(task);
        }
        Ok((tasks, wait))
    }

    /// Submits each task on its own terms, in one durable write: every valid task whose id is
    /// free is accepted, the others are refused alone (a WebSocket frame acks each task).
    /// `on_durable` gets the accepted ids before any can finish. One answer per value, in order:
    /// the task's id, or why it was refused.
    pub(crate) fn submit_each(
        &self,
        values: &[Value],
        origin: Origin,
        on_durable: impl FnOnce(&[String]),
    ) -> Vec<Result<String, SubmitError>> {
        let each: Vec<&[Value]> = values.iter().map(std::slice::from_ref).collect();
        let mut on_durable = Some(on_durable);
        self.submit_many(&each, origin, &mut |answers| {
            let ids: Vec<String> = answers
                .iter()
                .flatten()
                .flat_map(|acc| acc.ids.iter().cloned())
                .collect();
            if let Some(f) = on_durable.take() {
                f(&ids);
            }
        })
        .into_iter()
        .map(|r| r.map(|acc| acc.ids.into_iter().next().unwrap_or_default()))
        .collect()
    }

    /// Cancels a task that has not started: out of the store (its `cancelled` result in),
    /// out of its worker's queue, and its result announced to whoever waits for it.
    pub(crate) fn cancel(&self, id: &str) -> Result<Cancel, StoreError> {
        let c = &self.0.cancelling;
        let expires_ms = now_ms() + (c.result_ttl_s as i64) * 1000;
        let answer = self.0.store.cancel(id, expires_ms)?;
        if let Cancel::Cancelled { result, kafka } = &answer {
            self.0.pool.remove(id);
            log::info!("task {id} cancelled");
            c.announce.finished(result, *kafka);
        }
        Ok(answer)
    }

    /// Runs a dead task again now (`POST /task/{id}/retry`): the store turns its dead result
    /// back into a ready task in one durable write (its attempts kept, its retry budget fresh),
    /// then it goes to the dispatcher as an accepted immediate task does.
    pub(crate) fn retry(&self, id: &str) -> Result<Revive, SubmitError> {
        if !self.accepting() {
            return Err(SubmitError::ShuttingDown);
        }
        let answer = self
            .0
            .store
            .revive(id, now_us())
            .map_err(|e| SubmitError::Unavailable(e.to_string()))?;
        if let Revive::Revived(t) = &answer {
            log::info!("task {id} retried after {} attempts", t.attempts.len());
            self.0.status.retried.fetch_add(1, Ordering::Relaxed);
            // Its dead-letter record would run it once more through `poulpe replay`.
            if let Some(last) = t.attempts.last() {
                match crate::deadletter::mark_retried(&self.0.dead_dir, id, last.finished_ms) {
                    Ok(Some(to)) => {
                        log::info!("task {id}: dead-letter record now {}", to.display())
                    }
                    Ok(None) => {}
                    Err(e) => log::warn!(
                        "task {id}: its dead-letter record could not be marked retried ({e}): \
                         move it away, or poulpe replay would run the task again"
                    ),
                }
            }
            self.0.release(vec![(**t).clone()]);
        }
        Ok(answer)
    }

    /// Retries every dead task `q` lists (`POST /tasks/retry`); answers how many ran again.
    /// The ids are gathered first: a retry takes its task out of the listing being paged.
    #[inline(never)]
    pub(crate) fn retry_all(&self, q: &ListQuery) -> Result<usize, SubmitError> {
        let unavailable = |e: StoreError| SubmitError::Unavailable(e.to_string());
        let mut q = q.clone();
        let mut ids = Vec::new();
        loop {
            let page = self.0.store.list(&q).map_err(unavailable)?;
            ids.extend(page.rows.into_iter().map(|r| r.id));
            match page.next {
                Some(c) => q.after = Some(c),
                None => break,
            }
        }
        // Several at a time, so that the store's group commit writes them together: 5,000 dead
        // tasks took 0.60-0.64 s here, against 1.67-1.86 s one at a time (a durable write each).
        let per = ids.len().div_ceil(RETRY_LANES).max(1);
        std::thread::scope(|scope| {
            let lanes: Vec<_> = ids
                .chunks(per)
                .map(|chunk| {
                    scope.spawn(move || {
                        let mut n = 0;
                        for id in chunk {
                            match self.retry(id) {
                                Ok(Revive::Revived(_)) => n += 1,
                                Ok(_) => {}
                                Err(e) => return (n, Some(e.to_string())),
                            }
                        }
                        (n, None)
                    })
                })
                .collect();
            let mut total = 0;
            let mut first_error = None;
            for lane in lanes {
                let (n, e) = lane
                    .join()
                    .unwrap_or_else(|_| (0, Some("a retry lane panicked".to_string())));
                total += n;
                first_error = first_error.or(e);
            }
            // Those already retried run: the answer says how many.
            match first_error {
                None => Ok(total),
                Some(e) => Err(SubmitError::Unavailable(format!(
                    "{e} ({total} dead tasks were retried before it)"
                ))),
            }
        })
    }

    /// Pauses or resumes the workers (`POST /pause`, `/resume`): the state is written to the
    /// store first, so that it holds after a restart; when that write fails nothing changes.
    /// Calls are serialized, so the store and the pool never disagree.
    pub(crate) fn set_paused(&self, paused: bool) -> Result<(), StoreError> {
        let _one_at_a_time = self.0.pausing.lock();
        self.0
            .store
            .put_meta(PAUSED_KEY, if paused { "true" } else { "false" })?;
        if self.0.pool.paused() != paused {
            log::info!("workers {}", if paused { "paused" } else { "resumed" });
        }
        self.0.pool.set_paused(paused);
        Ok(())
    }
}

/// Why the store refused a submission, as the submitter says it.
fn refused(e: StoreError) -> SubmitError {
    match e {
        StoreError::Duplicate(id) => SubmitError::Duplicate(id),
        StoreError::Unavailable(why) | StoreError::Corrupt(why) => SubmitError::Unavailable(why),
    }
}

/// Retries `POST /tasks/retry` runs at once.
const RETRY_LANES: usize = 8;

/// The store's meta key of the pause state (`true` or `false`).
pub(crate) const PAUSED_KEY: &str = "poulpe.paused";

/// Compares without an early exit, so the time taken says nothing about the token.
pub(crate) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
        // A longer value that only adds zero bytes differs too, whatever the lengths.
        assert!(!same_secret(b"ab", b"ab\0"));
        assert!(!same_secret(b"ab", b"ab\0\0"));
        assert!(!same_secret(&[0; 256], b""));
    }
}
