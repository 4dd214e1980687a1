//! The one place that decides what happens after an attempt: succeeded, retry later, or dead
//! letter. Outcomes are written to the store in batches; only once they are durable are retries
//! armed, results published to waiting clients and counters moved.

use crate::clock::{now_ms, now_us, rfc3339_ms};
use crate::config::Backoff;
use crate::deadletter;
use crate::exec::{cap_text, RunResult, EXCERPT_LEN};
use crate::handoff::Handoff;
use crate::results::{Forward, Results, TaskResult};
use crate::schedule::timer::Timer;
use crate::status::Status;
use crate::store::{Change, Recording, Store};
use crate::task::{Attempt, FinalStatus, Method, State, Task, Verdict};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;
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

/// How long the next batch waits for the write under way before it is written anyway: long
/// enough for a usual group commit (so outcomes share commits), short beside a journal write
/// stalled behind a checkpoint's writes (so outcomes do not wait for it to be decided).
const STALL: Duration = Duration::from_millis(5);

/// Most batches handed to `outcome-done` at once (while a write is stalled).
const IN_FLIGHT: usize = 4;

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
        let dead = Mutex::new(DeadQueue::default());
        // This thread decides batches and starts their writes; a second one waits for each
        // write to be durable and acts on it. So outcomes that come while a write is under way
        // are decided and written at once, not after it.
        let written = Handoff::new(IN_FLIGHT);
        thread::scope(|s| {
            let settling = thread::Builder::new()
                .name("outcome-done".to_string())
                .spawn_scoped(s, || {
                    // A panic here would leave the outcome thread waiting for room forever.
                    crate::stage::critical(
                        "outcome-done",
                        Box::new(|| self.settle_all(&written, &dead)),
                    )
                });
            let inline = settling.is_err();
            if let Err(e) = settling {
                log::warn!("outcome: cannot start the outcome-done thread ({e}); outcomes are written one batch at a time");
            }
            self.decide_all(rx, &written, &dead, inline);
            written.close();
        });
        self.last(dead.into_inner());
    }

    /// The outcome-done thread: acts on each write once it is durable, in order.
    #[inline(never)]
    fn settle_all(&self, written: &Handoff<Written<'_>>, dead: &Mutex<DeadQueue>) {
        while let Some(w) = written.pop() {
            let still = self.settle(w);
            written.finished();
            dead.lock().keep(still);
        }
    }

    /// The outcome thread: decides batches and starts their writes until every worker has
    /// gone, handing each to `written` (or, `inline`, settling it at once).
    #[inline(never)]
    fn decide_all<'s>(
        &'s self,
        rx: &Receiver<Outcome>,
        written: &Handoff<Written<'s>>,
        dead: &Mutex<DeadQueue>,
        mut inline: bool,
    ) {
        loop {
            let first = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(o) => Some(o),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            // While a write is under way, outcomes gather for the next one (one group commit
            // for many); only a write slow to be durable (a journal write behind a checkpoint's)
            // lets the next one start before it is.
            written.wait_finished(STALL);
            let mut batch: Vec<Outcome> = first.into_iter().collect();
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(o) => batch.push(o),
                    Err(_) => break,
                }
            }
            let again = dead.lock().due();
            if batch.is_empty() && again.is_empty() {
                continue;
            }
            let w = self.begin(batch, again);
            let w = if inline { Err(w) } else { written.push(w) };
            if let Err(w) = w {
                inline = true;
                let still = self.settle(w);
                dead.lock().keep(still);
            }
        }
    }

    /// Once every worker has gone: one last try at the dead-letter records still waiting.
    fn last(&self, mut dead: DeadQueue) {
        if !dead.waiting.is_empty() {
            let again = std::mem::take(&mut dead.waiting);
            dead.waiting = self.settle(self.begin(Vec::new(), again));
        }
        if !dead.waiting.is_empty() {
            log::error!(
                "outcome: {} dead tasks could not be recorded; they stay in the store and run again at the next start",
                dead.waiting.len()
            );
        }
    }

    /// Decides a batch of new outcomes and of dead tasks whose record is tried again, and
    /// starts writing their changes.
    #[inline(never)]
    fn begin(&self, batch: Vec<Outcome>, again: Vec<DeadPending>) -> Written<'_> {
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
        // When each new attempt ended, for the lag once its outcome is durable.
        let ended: Vec<i64> = batch.iter().map(|o| o.finished_ms).collect();
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
        let recording = if changes.is_empty() {
            Recording::done(Ok(()))
        } else {
            self.store.record_start(&changes)
        };
        Written {
            recording,
            changes,
            after,
            ended,
            still,
        }
    }

    /// Waits until a batch's changes are durable (writing them again until the store takes
    /// them: outcomes are never dropped), then arms retries and announces results. Returns
    /// the dead tasks whose record still cannot be written.
    #[inline(never)]
    fn settle(&self, w: Written<'_>) -> Vec<DeadPending> {
        let Written {
            recording,
            changes,
            after,
            ended,
            mut still,
        } = w;
        let mut written = recording.wait(&changes);
        let mut delay = Duration::from_millis(100);
        while let Err(e) = written {
            log::error!(
                "outcome: cannot record {} outcomes: {e}; retrying in {delay:?}",
                changes.len()
            );
            thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
            written = self.store.record(&changes);
        }
        let durable_us = now_us();
        for ms in ended {
            let ended_us = u64::try_from(ms).unwrap_or(0).saturating_mul(1000);
            crate::metrics::OUTCOME_LAG.observe(durable_us.saturating_sub(ended_us));
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

/// A batch whose changes are being written, and what follows once they are durable.
struct Written<'s> {
    recording: Recording<'s>,
    changes: Vec<Change>,
    /// One per change, in the same order.
    after: Vec<After>,
    /// When each new attempt ended (unix ms), for the lag.
    ended: Vec<i64>,
    /// Dead tasks whose record still cannot be written.
    still: Vec<DeadPending>,
}

/// Dead tasks whose dead-letter record could not be written, tried again every
/// [`DEAD_RETRY`].
struct DeadQueue {
    waiting: Vec<DeadPending>,
    next_try: Instant,
}

impl Default for DeadQueue {
    fn default() -> Self {
        DeadQueue {
            waiting: Vec::new(),
            next_try: Instant::now(),
        }
    }
}

impl DeadQueue {
    /// Adds tasks whose record still cannot be written; the first to wait starts the clock.
    fn keep(&mut self, still: Vec<DeadPending>) {
        if still.is_empty() {
            return;
        }
        if self.waiting.is_empty() {
            self.next_try = Instant::now() + DEAD_RETRY;
        }
        self.waiting.extend(still);
    }

    /// The waiting tasks, when their next try is due (the clock starts again).
    fn due(&mut self) -> Vec<DeadPending> {
        if self.waiting.is_empty() || Instant::now() < self.next_try {
            return Vec::new();
        }
        self.next_try = Instant::now() + DEAD_RETRY;
        std::mem::take(&mut self.waiting)
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

    /// A store whose `record` fails the first `fail` times, noting when each call came; with
    /// `hold`, the answer to the first write waits until the hold is let go.
    struct FailsRecord {
        inner: Arc<dyn Store>,
        fail: usize,
        calls: parking_lot::Mutex<Vec<Instant>>,
        hold: Option<Arc<Hold>>,
    }

    /// Keeps a write's answer back until `open`.
    #[derive(Default)]
    struct Hold {
        open: parking_lot::Mutex<bool>,
        changed: parking_lot::Condvar,
    }

    impl Hold {
        fn wait(&self) {
            let mut open = self.open.lock();
            while !*open {
                self.changed.wait(&mut open);
            }
        }
        fn open(&self) {
            *self.open.lock() = true;
            self.changed.notify_all();
        }
    }

    impl Store for FailsRecord {
        fn name(&self) -> &'static str {
            "fails-record"
        }
        fn insert_many(&self, b: &[&[Task]]) -> Vec<Result<(), crate::store::StoreError>> {
            self.inner.insert_many(b)
        }
        fn take_due_many(
            &self,
            due: &[crate::store::Due],
            again: bool,
        ) -> Vec<Result<Option<Task>, crate::store::StoreError>> {
            self.inner.take_due_many(due, again)
        }
        fn claim(&self, t: &Task) -> Result<bool, crate::store::StoreError> {
            self.inner.claim(t)
        }
        fn record(&self, c: &[Change]) -> Result<(), crate::store::StoreError> {
            let n = {
                let mut calls = self.calls.lock();
                calls.push(Instant::now());
                calls.len()
            };
            if n <= self.fail {
                return Err(crate::store::StoreError::Unavailable("down".into()));
            }
            if let (1, Some(hold)) = (n, &self.hold) {
                hold.wait();
            }
            self.inner.record(c)
        }
        fn record_start(&self, c: &[Change]) -> crate::store::Recording<'_> {
            let Some(hold) = self.hold.clone() else {
                return crate::store::Recording::done(self.record(c));
            };
            let n = {
                let mut calls = self.calls.lock();
                calls.push(Instant::now());
                calls.len()
            };
            // Written at once; only the answer waits.
            let written = self.inner.record(c);
            crate::store::Recording::waiting(move |_: &[Change]| {
                if n == 1 {
                    hold.wait();
                }
                written
            })
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

    /// The outcome stage over `store`, with the timer and results registry it needs.
    struct Rig {
        stage: OutcomeStage,
        timer: Timer,
        results: Arc<Results>,
        joins: Vec<JoinHandle<()>>,
        _dead: tempfile::TempDir,
    }

    impl Rig {
        fn over(store: Arc<dyn Store>) -> Rig {
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
            Rig {
                stage,
                timer,
                results,
                joins: vec![th, rh],
                _dead: dead,
            }
        }

        fn stop(self) {
            self.timer.stop();
            self.results.stop();
            for j in self.joins {
                j.join().expect("join");
            }
        }
    }

    /// A successful attempt of `t`.
    fn succeeded(t: Task) -> Outcome {
        Outcome {
            task: Arc::new(t),
            worker: 0,
            started_ms: 0,
            finished_ms: 0,
            run: RunResult {
                ok: true,
                code: Some(0),
                output: String::new(),
                error: String::new(),
                permanent: false,
            },
        }
    }

    /// A store holding running tasks with these ids.
    fn running(ids: &[&str]) -> Arc<dyn Store> {
        let inner: Arc<dyn Store> = Arc::new(crate::store::memory::open());
        for id in ids {
            let t = crate::store::contract::task(id, State::Running, 0);
            inner.insert(std::slice::from_ref(&t)).expect("insert");
        }
        inner
    }

    #[test]
    fn a_store_that_refuses_outcomes_is_retried_with_a_doubling_pause() {
        let fails = Arc::new(FailsRecord {
            inner: running(&["o1"]),
            fail: 4,
            calls: parking_lot::Mutex::new(Vec::new()),
            hold: None,
        });
        let rig = Rig::over(fails.clone());
        let o = succeeded(crate::store::contract::task("o1", State::Running, 0));
        assert!(rig
            .stage
            .settle(rig.stage.begin(vec![o], Vec::new()))
            .is_empty());
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
        rig.stop();
    }

    /// Waits up to 5 s for `cond`; false if it never held.
    fn within_5s(cond: impl Fn() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if cond() {
                return true;
            }
            thread::sleep(Duration::from_millis(5));
        }
        cond()
    }

    #[test]
    fn the_next_batch_is_written_while_one_waits_to_be_durable() {
        let inner = running(&["p1", "p2"]);
        let hold = Arc::new(Hold::default());
        let store = Arc::new(FailsRecord {
            inner: inner.clone(),
            fail: 0,
            calls: parking_lot::Mutex::new(Vec::new()),
            hold: Some(hold.clone()),
        });
        let Rig {
            stage,
            timer,
            results,
            joins,
            _dead,
        } = Rig::over(store.clone());
        let (tx, rx) = crossbeam_channel::unbounded();
        let h = stage.start(rx).expect("outcome thread");
        let task = |id| crate::store::contract::task(id, State::Running, 0);
        tx.send(succeeded(task("p1"))).expect("send");
        assert!(
            within_5s(|| store.calls.lock().len() == 1),
            "p1 never written"
        );
        tx.send(succeeded(task("p2"))).expect("send");
        let overlapped = within_5s(|| store.calls.lock().len() == 2);
        hold.open();
        assert!(
            overlapped,
            "p2's outcome was not written while p1's waited to be durable"
        );
        let done = |id| inner.result(id).ok().flatten().is_some();
        assert!(within_5s(|| done("p1") && done("p2")), "results not stored");
        drop(tx);
        h.join().expect("outcome thread");
        timer.stop();
        results.stop();
        for j in joins {
            j.join().expect("join");
        }
    }
}
