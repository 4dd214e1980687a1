//! The one place that decides what happens after an attempt: succeeded, retry later, or dead
//! letter. Outcomes are written to the store in batches; only once they are durable are retries
//! armed, results published to waiting clients and counters moved.

use crate::clock::{now_ms, now_us, rfc3339_ms};
use crate::config::Backoff;
use crate::deadletter;
use crate::exec::{cap_text, RunResult, EXCERPT_LEN};
use crate::results::{Forward, Results, TaskResult};
use crate::schedule::timer::Timer;
use crate::status::Status;
use crate::store::{Change, Store};
use crate::task::{Attempt, FinalStatus, Method, State, Task, Verdict};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// What a worker reports after one attempt.
pub(crate) struct Outcome {
    pub(crate) task: Arc<Task>,
    pub(crate) worker: usize,
    pub(crate) started_ms: i64,
    pub(crate) finished_ms: i64,
    pub(crate) run: RunResult,
}

/// Server-wide retry rules (tasks may override interval and count).
#[derive(Clone, Debug)]
pub(crate) struct RetryPolicy {
    pub(crate) interval_s: u64,
    pub(crate) max_retry: u32,
    pub(crate) backoff: Backoff,
    pub(crate) result_ttl_s: u64,
    pub(crate) dead_dir: PathBuf,
}

/// Most outcomes folded into one store write.
const MAX_BATCH: usize = 1024;

/// Seconds to wait before retry number `n` (1-based); `jitter` in [0, 1).
pub(crate) fn retry_delay(interval_s: u64, n: u32, backoff: Backoff, jitter: f64) -> Duration {
    match backoff {
        Backoff::Fixed => Duration::from_secs(interval_s),
        Backoff::Exponential => {
            let base = (interval_s as f64) * 2f64.powi(n.saturating_sub(1).min(30) as i32);
            let capped = base.min(3600.0);
            let factor = 0.9 + 0.2 * jitter.clamp(0.0, 1.0);
            Duration::from_secs_f64(capped * factor)
        }
    }
}

/// A cheap jitter source; retries need spread, not cryptography.
fn jitter() -> f64 {
    let x = now_us().wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((x >> 11) as f64) / ((1u64 << 53) as f64)
}

/// What to do once a change is durable.
enum After {
    Retry {
        id: Arc<str>,
        due_us: u64,
    },
    /// The result is the one in the matching `Change::Finish` (not a second copy of it).
    Final {
        kafka: bool,
    },
    /// The task is dead but its record is not written: keep trying the write.
    DeadPending(Box<DeadPending>),
}

/// A dead task whose dead-letter record could not be written yet. Its failed attempt is already
/// counted and recorded; the store holds it as `retry_wait` (not armed in the timer) until the
/// record is written, then it finishes as dead.
struct DeadPending {
    /// The task with every attempt, as the record holds it.
    task: Task,
    result: TaskResult,
    finished_ms: i64,
}

/// How often a dead-letter write that failed is tried again.
const DEAD_RETRY: Duration = Duration::from_secs(5);

/// Where a final result goes once it is durable: the counters, the clients waiting for it, and
/// the Kafka result topic for a Kafka task. The outcome stage and cancel share it, so a
/// cancelled task is announced like a finished one.
#[derive(Clone)]
pub(crate) struct Announce {
    pub(crate) results: Arc<Results>,
    pub(crate) status: Arc<Status>,
    /// Where results of Kafka tasks are also sent.
    pub(crate) forward: Option<Arc<dyn Forward>>,
}

impl Announce {
    /// Announces `result`, durable now; `kafka`: the task came from Kafka.
    pub(crate) fn finished(&self, result: &TaskResult, kafka: bool) {
        self.status.finished(result.status);
        self.results.publish(result);
        if kafka {
            if let Some(f) = &self.forward {
                f.forward(result);
            }
        }
    }
}

/// The outcome thread and what it needs.
pub(crate) struct OutcomeStage {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) timer: Timer,
    pub(crate) announce: Announce,
    pub(crate) policy: RetryPolicy,
}

impl OutcomeStage {
    /// Starts the thread; it ends when every worker has dropped its sender.
    pub(crate) fn start(self, rx: Receiver<Outcome>) -> std::io::Result<JoinHandle<()>> {
        crate::stage::spawn_critical("outcome", move || self.run(&rx))
    }

    fn run(&self, rx: &Receiver<Outcome>) {
        // Dead tasks whose record could not be written: tried again every few seconds.
        let mut pending: Vec<DeadPending> = Vec::new();
        let mut next_pending = Instant::now();
        loop {
            let first = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(o) => Some(o),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    if !pending.is_empty() {
                        // One last try before giving up for this run.
                        pending = self.handle(Vec::new(), pending);
                    }
                    if !pending.is_empty() {
                        log::error!(
                            "outcome: {} dead tasks could not be recorded; they stay in the store and run again at the next start",
                            pending.len()
                        );
                    }
                    return;
                }
            };
            let mut batch: Vec<Outcome> = first.into_iter().collect();
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(o) => batch.push(o),
                    Err(_) => break,
                }
            }
            let due = !pending.is_empty() && Instant::now() >= next_pending;
            let again = if due {
                std::mem::take(&mut pending)
            } else {
                Vec::new()
            };
            if batch.is_empty() && again.is_empty() {
                continue;
            }
            // New dead tasks join a waiting group's next try; a first one starts the clock.
            let restart_clock = due || pending.is_empty();
            pending.extend(self.handle(batch, again));
            if restart_clock {
                next_pending = Instant::now() + DEAD_RETRY;
            }
        }
    }

    /// Decides, writes and then acts on a batch of new outcomes and of dead tasks whose record
    /// is tried again; returns the dead tasks whose record still cannot be written.
    fn handle(&self, batch: Vec<Outcome>, again: Vec<DeadPending>) -> Vec<DeadPending> {
        let mut changes = Vec::with_capacity(batch.len() + again.len());
        let mut after = Vec::with_capacity(batch.len() + again.len());
        let mut still = Vec::new();
        // One change per `After`; a callback's task joins its task's final change.
        let mut add = |d: Decided| {
            changes.push(d.change);
            after.push(d.after);
            if let Some(cb) = d.callback {
                after.push(After::Retry {
                    id: Arc::from(cb.id.as_str()),
                    due_us: cb.due_us,
                });
                changes.push(Change::Insert(cb));
            }
        };
        for o in batch {
            add(self.decide(o));
        }
        for p in again {
            match self.store.status(&p.task.id) {
                Ok(None) => {
                    log::info!(
                        "task {} was cancelled while its dead-letter record waited; no record",
                        p.task.id
                    );
                    continue;
                }
                Ok(Some(_)) => {}
                Err(e) => {
                    log::warn!("outcome: cannot read the state of {}: {e}", p.task.id);
                    still.push(p);
                    continue;
                }
            }
            if self.write_dead(&p.task, &p.result, p.finished_ms) {
                add(self.finish(p.result, p.task));
            } else {
                still.push(p);
            }
        }
        if changes.is_empty() {
            return still;
        }
        let mut delay = Duration::from_millis(100);
        while let Err(e) = self.store.record(&changes) {
            // Never dropped: the outcomes stay here until the store takes them.
            log::error!(
                "outcome: cannot record {} outcomes: {e}; retrying in {delay:?}",
                changes.len()
            );
            thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        // One change per `After`, in the same order: a final one takes its result from there.
        let mut changes = changes.into_iter();
        for a in after {
            let change = changes.next();
            match a {
                After::Retry { id, due_us } => self.timer.schedule(id, due_us),
                After::Final { kafka } => {
                    if let Some(Change::Finish { result, .. }) = change {
                        self.announce.finished(&result, kafka);
                    }
                }
                After::DeadPending(p) => still.push(*p),
            }
        }
        still
    }

    /// Writes the dead-letter record of `task` and logs what happened; true once it is written.
    fn write_dead(&self, task: &Task, result: &TaskResult, finished_ms: i64) -> bool {
        match deadletter::write(&self.policy.dead_dir, task, result, finished_ms) {
            Ok(path) => {
                log::warn!(
                    "task {} is dead after {} attempts: {}; record {}",
                    task.id,
                    task.attempts.len(),
                    result.reason,
                    path.display()
                );
                true
            }
            Err(e) => {
                log::error!(
                    "task {} is dead but its record cannot be written in {}: {e}; it waits in the store as retry_wait and the write is tried again every {} s",
                    task.id,
                    self.policy.dead_dir.display(),
                    DEAD_RETRY.as_secs()
                );
                false
            }
        }
    }

    /// The change and follow-up that finish `task` with `result`, and the task that POSTs
    /// the result to its callback, if it has one.
    /// The task is stored with its result (with its attempts: `GET /task/{id}` shows them and
    /// a dead one can be retried).
    fn finish(&self, mut result: TaskResult, task: Task) -> Decided {
        let now = now_ms();
        let expires_ms = now + (self.policy.result_ttl_s as i64) * 1000;
        let callback = task.callback.as_deref().map(|url| {
            let id = format!("cb-{}", uuid::Uuid::new_v4());
            result.callback_id = Some(id.clone());
            callback_task(id, url, &task, &result, now)
        });
        Decided {
            after: After::Final { kafka: task.kafka },
            change: Change::Finish {
                result,
                expires_ms,
                task: Some(task),
            },
            callback,
        }
    }

    /// Turns a new outcome into a store change and what to do once it is durable. Called once
    /// per attempt, so a failed attempt is counted once.
    fn decide(&self, o: Outcome) -> Decided {
        let late_us = (o.started_ms.max(0) as u64 * 1000).saturating_sub(o.task.due_us);
        let run_ms = o.finished_ms.saturating_sub(o.started_ms).max(0) as u64;
        let status = &self.announce.status;
        status.attempt(o.task.method, late_us, run_ms * 1000);
        // The worker has let go of its handle by now: the task moves, no copy.
        let mut task = Arc::try_unwrap(o.task).unwrap_or_else(|shared| (*shared).clone());
        task.attempts.push(Attempt {
            started_ms: o.started_ms,
            finished_ms: o.finished_ms,
            worker: o.worker,
            ok: o.run.ok,
            code: o.run.code,
            error: o.run.error.clone(),
            output_excerpt: cap_text(o.run.output.as_bytes(), EXCERPT_LEN, false),
        });
        if o.run.ok {
            // The attempt's output moves into the result; the task keeps its excerpt.
            let result = final_result(&task, task.attempts.len(), o.run, o.finished_ms);
            return self.finish(result, task);
        }
        // A failed attempt from here on. Attempts before an operator's retry do not count
        // against the budget (`budget_from`).
        let n = task.attempts.len().saturating_sub(task.budget_from) as u32;
        status.attempt_failed(&task.id);
        let max = task.max_retry.unwrap_or(self.policy.max_retry);
        if !o.run.permanent && n <= max {
            let interval = task.retry_interval.unwrap_or(self.policy.interval_s);
            let wait = retry_delay(interval, n, self.policy.backoff, jitter());
            task.state = State::RetryWait;
            task.due_us = now_us() + wait.as_micros() as u64;
            log::info!(
                "task {} attempt {n} failed: {}; retry in {:.1} s",
                task.id,
                o.run.error,
                wait.as_secs_f64()
            );
            let after = After::Retry {
                id: Arc::from(task.id.as_str()),
                due_us: task.due_us,
            };
            return Decided::alone(Change::Retry(task), after);
        }
        let result = final_result(&task, task.attempts.len(), o.run, o.finished_ms);
        if !self.write_dead(&task, &result, o.finished_ms) {
            // Recorded as waiting (its attempt kept) but not armed: this stage retries the
            // write. Due now, so after a restart it runs again at once (at least once).
            task.state = State::RetryWait;
            task.due_us = now_us();
            let pending = DeadPending {
                task: task.clone(),
                result,
                finished_ms: o.finished_ms,
            };
            return Decided::alone(Change::Retry(task), After::DeadPending(Box::new(pending)));
        }
        self.finish(result, task)
    }
}

/// An outcome decided: its store change, what follows once it is durable, and the task that
/// POSTs a final result to the task's callback (written in the same batch).
struct Decided {
    change: Change,
    after: After,
    callback: Option<Task>,
}

impl Decided {
    fn alone(change: Change, after: After) -> Decided {
        Decided {
            change,
            after,
            callback: None,
        }
    }
}

/// The task that POSTs `result` (of `task`) to `url`: due now, with `task`'s time limit and
/// retry policy, so a receiver that is down gets it later; its own result says how it went.
fn callback_task(id: String, url: &str, task: &Task, result: &TaskResult, now_ms: i64) -> Task {
    Task {
        id,
        method: Method::Post,
        name: url.to_string(),
        params: serde_json::to_string(result).unwrap_or_default(),
        args: Vec::new(),
        cc: Vec::new(),
        delay: 0,
        timeout: task.timeout,
        max_retry: task.max_retry,
        retry_interval: task.retry_interval,
        trusted: false,
        kafka: false,
        submitted_ms: now_ms,
        // Waiting, due now: the timer hands it out once it is durable.
        due_us: now_us(),
        state: State::Delayed,
        headers: String::new(),
        callback: None,
        attempts: Vec::new(),
        budget_from: 0,
    }
}

/// The final result of `task` after `attempts` attempts, the last of which was `run`.
fn final_result(task: &Task, attempts: usize, run: RunResult, finished_ms: i64) -> TaskResult {
    TaskResult {
        id: task.id.clone(),
        result: if run.ok { Verdict::Ok } else { Verdict::Fail },
        reason: run.error,
        status: if run.ok {
            FinalStatus::Succeeded
        } else {
            FinalStatus::Dead
        },
        attempts,
        output: run.output,
        code: run.code,
        submitted_at: rfc3339_ms(task.submitted_ms),
        finished_at: rfc3339_ms(finished_ms),
        callback_id: None,
        node: crate::node::own().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_and_exponential_backoff() {
        assert_eq!(
            retry_delay(10, 3, Backoff::Fixed, 0.5),
            Duration::from_secs(10)
        );
        assert_eq!(
            retry_delay(10, 1, Backoff::Exponential, 0.5),
            Duration::from_secs(10)
        );
        assert_eq!(
            retry_delay(10, 3, Backoff::Exponential, 0.5),
            Duration::from_secs(40)
        );
        assert_eq!(
            retry_delay(10, 20, Backoff::Exponential, 0.5),
            Duration::from_secs(3600)
        );
        let lo = retry_delay(10, 2, Backoff::Exponential, 0.0).as_secs_f64();
        let hi = retry_delay(10, 2, Backoff::Exponential, 0.999).as_secs_f64();
        assert!((17.99..18.01).contains(&lo), "{lo}");
        assert!((21.9..22.0).contains(&hi), "{hi}");
        assert_eq!(retry_delay(0, 5, Backoff::Exponential, 0.3), Duration::ZERO);
        let j = jitter();
        assert!((0.0..1.0).contains(&j));
    }

    #[test]
    fn jitter_spreads_over_0_to_1() {
        // Retries of tasks that failed together must not all fire together: the jitter
        // changes from one call to the next, always within [0, 1).
        let mut seen = Vec::new();
        for _ in 0..20 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
            seen.push(j);
            std::thread::sleep(Duration::from_millis(1));
        }
        seen.sort_by(f64::total_cmp);
        seen.dedup();
        assert!(seen.len() > 1, "the same jitter every time: {seen:?}");
    }

    /// A store whose `record` fails the first `fail` times, noting when each call came.
    struct FailsRecord {
        inner: Arc<dyn Store>,
        fail: usize,
        calls: parking_lot::Mutex<Vec<Instant>>,
    }

    impl Store for FailsRecord {
        fn name(&self) -> &'static str {
            "fails-record"
        }
        fn insert(&self, t: &[Task]) -> Result<(), crate::store::StoreError> {
            self.inner.insert(t)
        }
        fn take_due_many(
            &self,
            ids: &[Arc<str>],
            again: bool,
        ) -> Vec<Result<Option<Task>, crate::store::StoreError>> {
            self.inner.take_due_many(ids, again)
        }
        fn claim(&self, t: &Task) -> Result<bool, crate::store::StoreError> {
            self.inner.claim(t)
        }
        fn record(&self, c: &[Change]) -> Result<(), crate::store::StoreError> {
            let mut calls = self.calls.lock();
            calls.push(Instant::now());
            if calls.len() <= self.fail {
                return Err(crate::store::StoreError::Unavailable("down".into()));
            }
            self.inner.record(c)
        }
        fn cancel(
            &self,
            id: &str,
            expires_ms: i64,
        ) -> Result<crate::store::Cancel, crate::store::StoreError> {
            self.inner.cancel(id, expires_ms)
        }
        fn status(&self, id: &str) -> Result<Option<State>, crate::store::StoreError> {
            self.inner.status(id)
        }
        fn result(&self, id: &str) -> Result<Option<TaskResult>, crate::store::StoreError> {
            self.inner.result(id)
        }
        fn recover(&self) -> Result<Vec<crate::store::Recovered>, crate::store::StoreError> {
            self.inner.recover()
        }
        fn list(
            &self,
            q: &crate::store::ListQuery,
        ) -> Result<crate::store::Page, crate::store::StoreError> {
            self.inner.list(q)
        }
        fn lookup(
            &self,
            id: &str,
        ) -> Result<Option<crate::store::Record>, crate::store::StoreError> {
            self.inner.lookup(id)
        }
        fn revive(
            &self,
            id: &str,
            now_us: u64,
        ) -> Result<crate::store::Revive, crate::store::StoreError> {
            self.inner.revive(id, now_us)
        }
        fn summary(&self, cap: usize) -> Result<crate::store::Summary, crate::store::StoreError> {
            self.inner.summary(cap)
        }
        fn gc(&self, now_ms: i64, keep: usize) -> Result<usize, crate::store::StoreError> {
            self.inner.gc(now_ms, keep)
        }
        fn results_stored(&self) -> Result<usize, crate::store::StoreError> {
            self.inner.results_stored()
        }
        fn get_meta(&self, key: &str) -> Result<Option<String>, crate::store::StoreError> {
            self.inner.get_meta(key)
        }
        fn put_meta(&self, key: &str, value: &str) -> Result<(), crate::store::StoreError> {
            self.inner.put_meta(key, value)
        }
    }

    #[test]
    fn a_store_that_refuses_outcomes_is_retried_with_a_doubling_pause() {
        let inner: Arc<dyn Store> = Arc::new(crate::store::memory::open());
        let t = crate::store::contract::task("o1", State::Running, 0);
        inner.insert(std::slice::from_ref(&t)).expect("insert");
        let fails = Arc::new(FailsRecord {
            inner,
            fail: 4,
            calls: parking_lot::Mutex::new(Vec::new()),
        });
        let store: Arc<dyn Store> = fails.clone();
        let pool = Arc::new(crate::dispatch::Pool::new(1));
        let (timer, th) = Timer::start(store.clone(), pool).expect("timer");
        let (results, rh) = Results::start().expect("results");
        let dead = tempfile::tempdir().expect("tempdir");
        let stage = OutcomeStage {
            store,
            timer: timer.clone(),
            announce: Announce {
                results: results.clone(),
                status: Arc::new(Status::default()),
                forward: None,
            },
            policy: RetryPolicy {
                interval_s: 1,
                max_retry: 0,
                backoff: Backoff::Fixed,
                result_ttl_s: 60,
                dead_dir: dead.path().to_path_buf(),
            },
        };
        let run = RunResult {
            ok: true,
            code: Some(0),
            output: String::new(),
            error: String::new(),
            permanent: false,
        };
        let o = Outcome {
            task: Arc::new(t),
            worker: 0,
            started_ms: 0,
            finished_ms: 0,
            run,
        };
        assert!(stage.handle(vec![o], Vec::new()).is_empty());
        let calls = fails.calls.lock().clone();
        assert_eq!(calls.len(), 5, "four refusals, then recorded");
        // Never sooner than 100 ms, then 200, 400, 800: a store that is down is not hammered.
        for (k, w) in calls.windows(2).enumerate() {
            let least = Duration::from_millis(100 << k);
            assert!(
                w[1] - w[0] >= least,
                "try {} came {:?} after the previous one, before {least:?}",
                k + 2,
                w[1] - w[0]
            );
        }
        timer.stop();
        results.stop();
        th.join().expect("timer");
        rh.join().expect("results");
    }
}
