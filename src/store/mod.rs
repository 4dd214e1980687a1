//! The storage trait every backend implements, and the types that cross it.
//!
//! A store keeps unfinished tasks and final results. It answers the questions two threads (or,
//! later, two nodes) could race on — is this id taken, who claims this task — with a yes or no.

pub(crate) mod embedded;
pub(crate) mod journal;
pub(crate) mod journal_file;
pub(crate) mod list;
pub(crate) mod live;
pub(crate) mod local;
#[cfg(test)]
pub(crate) mod memory;
pub(crate) mod pending;
pub mod redis;

use crate::task::TaskResult;
use crate::task::{State, Task};
pub(crate) use list::{ListQuery, Page, Record, Revive};
use std::fmt;
use std::sync::Arc;

/// A timer entry: a waiting task's id and the due time (unix µs) it was armed with.
pub(crate) type Due = (Arc<str>, u64);

/// `task` stored as running (the running mark of every store), without a copy of the task: its
/// JSON with the state's text replaced. The state is found by its field's text,
/// `,"state":"ready"`: every field before it is a number, a boolean, or a string or list of
/// strings, and a string's JSON escapes every `"` in it, so that text cannot occur before the
/// field itself.
pub(crate) fn running_json(task: &Task) -> Result<Vec<u8>, StoreError> {
    const READY: &[u8] = br#","state":"ready""#;
    let encode = |t: &Task| serde_json::to_vec(t).map_err(|e| StoreError::Corrupt(e.to_string()));
    let mut bytes = encode(task)?;
    match bytes.windows(READY.len()).position(|w| w == READY) {
        Some(at) if task.state == State::Ready => {
            let end = at + READY.len();
            bytes.splice(end - br#""ready""#.len()..end, *br#""running""#);
            Ok(bytes)
        }
        _ => {
            let mut running = task.clone();
            running.state = State::Running;
            encode(&running)
        }
    }
}

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// An unfinished task already has this id.
    Duplicate(String),
    /// The store cannot be reached or written now; nothing was changed.
    Unavailable(String),
    /// A stored record could not be read back.
    Corrupt(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Duplicate(id) => write!(f, "id: a task with id {id:?} is not finished yet"),
            StoreError::Unavailable(why) => write!(f, "store unavailable: {why}"),
            StoreError::Corrupt(why) => write!(f, "store record unreadable: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// What `claim_on` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The attempt may start.
    Won,
    /// Cancelled or claimed by another: nothing to run.
    Lost,
    /// Still ready, but its cc worker's slot is held by another node's attempt: try later.
    Busy,
}

/// What `cancel` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cancel {
    /// Removed before it started; its final result (status `cancelled`) is stored, and it came
    /// from Kafka when `kafka`.
    Cancelled {
        result: Box<TaskResult>,
        kafka: bool,
    },
    /// An attempt is running.
    Running,
    /// Finished (a result exists).
    Finished,
    /// Never seen, or expired.
    Unknown,
}

/// One change decided after an attempt, written with others in one batch.
#[derive(Debug, Clone)]
pub(crate) enum Change {
    /// The task waits for a retry (its `attempts` and `due_us` are updated).
    Retry(Task),
    /// The task is finished; its result stays until `expires_ms`, stored with `task` (and its
    /// attempts) when given (see [`list::encode_record`]).
    Finish {
        result: TaskResult,
        expires_ms: i64,
        task: Option<Task>,
    },
    /// A new task born of an outcome (the POST of a result to its callback), written with it.
    Insert(Task),
}

/// Ids per state for `/sys_info`, each list capped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Summary {
    pub(crate) running: Vec<String>,
    pub(crate) running_total: usize,
    pub(crate) waiting: Vec<String>,
    pub(crate) waiting_total: usize,
    /// Of `waiting_total`, the tasks waiting to retry; `None` when the store cannot tell them
    /// from delayed ones without reading every task (Redis).
    pub(crate) retry_wait_total: Option<usize>,
    pub(crate) ready_total: usize,
}

/// A task found unfinished at start-up: it is handed to the timer, due at `due_us`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Recovered {
    pub(crate) id: Arc<str>,
    pub(crate) due_us: u64,
    /// It was running when the process stopped (it runs again: at least once).
    pub(crate) was_running: bool,
}

/// A `record` under way ([`Store::record_start`]).
#[must_use = "a recording is durable only once waited for"]
pub(crate) struct Recording<'a>(RecordingState<'a>);

/// What finishes a recording, given its changes.
type Finish<'a> = Box<dyn FnOnce(&[Change]) -> Result<(), StoreError> + Send + 'a>;

enum RecordingState<'a> {
    Done(Result<(), StoreError>),
    Waiting(Finish<'a>),
}

impl<'a> Recording<'a> {
    /// A recording already finished with `r`.
    pub(crate) fn done(r: Result<(), StoreError>) -> Recording<'a> {
        Recording(RecordingState::Done(r))
    }

    /// A recording that `finish` waits for and completes, given the changes it writes.
    pub(crate) fn waiting(
        finish: impl FnOnce(&[Change]) -> Result<(), StoreError> + Send + 'a,
    ) -> Recording<'a> {
        Recording(RecordingState::Waiting(Box::new(finish)))
    }

    /// Returns once `changes` (those given to `record_start`, which the caller keeps until
    /// now rather than the store copying what it needs of them) are durable, or why they are
    /// not (then none of them is).
    pub(crate) fn wait(self, changes: &[Change]) -> Result<(), StoreError> {
        match self.0 {
            RecordingState::Done(r) => r,
            RecordingState::Waiting(finish) => finish(changes),
        }
    }
}

/// Durable home of tasks and results. Every method is safe to call from any thread.
pub(crate) trait Store: Send + Sync {
    /// Short name for `/sys_info` and logs.
    fn name(&self) -> &'static str;

    /// `insert_many` of one submission. The server always submits through `insert_many`; the
    /// tests ask for one.
    #[cfg(test)]
    fn insert(&self, tasks: &[Task]) -> Result<(), StoreError> {
        self.insert_many(&[tasks])
            .pop()
            .unwrap_or_else(|| Err(StoreError::Unavailable("insert not answered".into())))
    }

    /// Adds the tasks of several submissions, each all or none on its own, in as few durable
    /// writes as the store can (the HTTP loop thread's requests of one wake-up), and returns once
    /// they are durable. One answer per batch, in order. A batch fails with `Duplicate` when one
    /// of its ids belongs to an unfinished task, repeats in the batch or in an earlier batch (as
    /// if they had come one after the other; also when the earlier one's write then fails: the
    /// ids are taken before the writes), or is the id of a trusted task (a cron firing) whose
    /// result is stored: a firing runs once, whichever node of several on one Redis fires it
    /// first (the check and the insert are one step there).
    fn insert_many(&self, batches: &[&[Task]]) -> Vec<Result<(), StoreError>>;

    /// Moves a waiting task (delayed or retry-waiting) due at `due_us` to ready and returns it,
    /// or `None` when it is no longer waiting (cancelled, or claimed elsewhere) or waits for
    /// another time: `take_due_many` for one id. The server always asks for several (the
    /// timer); the tests ask for one.
    #[cfg(test)]
    fn take_due(&self, id: &str, due_us: u64) -> Result<Option<Task>, StoreError> {
        self.take_due_many(&[(Arc::from(id), due_us)], false)
            .pop()
            .unwrap_or(Ok(None))
    }

    /// `take_due` for several ids, one answer per id in the same order. The timer releases
    /// every task that is due in one call, so a store behind a network pays one round trip for
    /// a burst rather than one per task. With `again` (these ids failed a release before), a
    /// task already marked ready is handed out too: the failed call may have marked it before
    /// its answer was lost, and only the timer hands out waiting tasks (a second hand-out is
    /// harmless: `claim` lets one attempt run).
    ///
    /// Each id comes with the due time the timer was given for it, and a task whose stored due
    /// time differs is left waiting (`None`): that timer entry is stale. A task cancelled and
    /// its id submitted again with another delay has two entries, and only the new one may
    /// release the new task, at its own time.
    fn take_due_many(&self, due: &[Due], again: bool) -> Vec<Result<Option<Task>, StoreError>>;

    /// Claims a ready task for one attempt; `false` means the caller lost (cancelled or taken).
    fn claim(&self, task: &Task) -> Result<bool, StoreError>;

    /// `claim` by worker `worker`. A store shared by several nodes also takes, for a task with
    /// `cc`, that worker's slot of the cluster in the same step, so that tasks sharing a cc
    /// worker never run at once anywhere; `Busy` when another node holds it (nothing changed).
    /// On one node the dispatcher already runs one attempt per worker: a plain `claim`.
    fn claim_on(&self, task: &Task, worker: usize) -> Result<Claim, StoreError> {
        let _ = worker;
        Ok(if self.claim(task)? {
            Claim::Won
        } else {
            Claim::Lost
        })
    }

    /// Frees the slot `claim_on` took for `task`'s attempt on `worker`, now ended.
    fn release(&self, task: &Task, worker: usize) {
        let _ = (task, worker);
    }

    /// Writes the outcomes of attempts, all or none, and returns once they are durable.
    fn record(&self, changes: &[Change]) -> Result<(), StoreError>;

    /// `record` in two steps: starts the write and returns, and [`Recording::wait`], given the
    /// same changes, returns once it is durable (the store's reads reflect it from then on). The outcome stage
    /// decides its next batch while this one is written. A write started later may be durable
    /// first: the changes of writes under way at once concern different tasks. By default the
    /// write is made before this returns.
    fn record_start(&self, changes: &[Change]) -> Recording<'_> {
        Recording::done(self.record(changes))
    }

    /// Cancels a task that has not started: in one write the task goes and its `cancelled`
    /// result is stored, kept until `expires_ms` like any other.
    fn cancel(&self, id: &str, expires_ms: i64) -> Result<Cancel, StoreError>;

    /// The state of an unfinished task.
    fn status(&self, id: &str) -> Result<Option<State>, StoreError>;

    /// The final result of a finished task, while it has not expired.
    fn result(&self, id: &str) -> Result<Option<TaskResult>, StoreError>;

    /// A page of the tasks in one state (`GET /tasks`): unfinished ones by id, finished ones
    /// newest first. Bounded work: at most `q.scan` entries are examined, and `next` is given
    /// whenever the state has not been gone through, even when the page is not full.
    fn list(&self, q: &ListQuery) -> Result<Page, StoreError>;

    /// Everything stored about one task (`GET /task/{id}`), while it is unfinished or its
    /// result has not expired.
    fn lookup(&self, id: &str) -> Result<Option<Record>, StoreError>;

    /// Makes a dead task ready to run again at `now_us`, in one durable write that deletes its
    /// dead result and stores it as a new unfinished task with its attempts kept (its retry
    /// budget counting from them). Anything else is answered, not changed.
    fn revive(&self, id: &str, now_us: u64) -> Result<Revive, StoreError>;

    /// Every unfinished task, for the timer at start-up. Call once, before serving. A store
    /// shared by several nodes (Redis) returns only the tasks this node owns or a dead node
    /// owned, and makes them this node's: a live node's tasks are never taken.
    fn recover(&self) -> Result<Vec<Recovered>, StoreError>;

    /// Ids per state, at most `cap` per list.
    fn summary(&self, cap: usize) -> Result<Summary, StoreError>;

    /// Deletes results that expired before `now_ms` and, while more than `keep` results are
    /// stored, the oldest ones (those closest to expiry); returns how many. Bounded work per
    /// call ([`GC_PASS`] of each kind), so that a call never holds up intake for long: call it
    /// again while it returns a full pass.
    fn gc(&self, now_ms: i64, keep: usize) -> Result<usize, StoreError>;

    /// How many finished results are stored (expired ones not yet deleted included).
    fn results_stored(&self) -> Result<usize, StoreError>;

    /// Size of the store's data on this machine (the embedded file), when there is one.
    fn data_bytes(&self) -> Option<u64> {
        None
    }

    /// A small durable value by key (e.g. a cron line's last fire time).
    fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Sets a small durable value; returns once it is durable.
    fn put_meta(&self, key: &str, value: &str) -> Result<(), StoreError>;

    /// Whether the store is reachable now (shown in `/sys_info`).
    fn healthy(&self) -> bool {
        true
    }

    /// Finishes queued writes and closes the store at shutdown, so that the next start needs
    /// no repair; every later call fails with `Unavailable`.
    fn close(&self) {}
}

/// Most results one `gc` call deletes of each kind (expired, and beyond the count).
pub(crate) const GC_PASS: usize = 10_000;

/// Starts the thread that, every `every`, deletes expired results and keeps at most `keep`.
/// A pass that found a full batch to delete is followed by another at once.
pub(crate) fn start_gc(
    store: Arc<dyn Store>,
    every: std::time::Duration,
    keep: usize,
) -> std::io::Result<crate::stage::Stage> {
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    let h = crate::stage::spawn_critical("store-gc", move || loop {
        let pause = match store.gc(crate::clock::now_ms(), keep) {
            Ok(0) => every,
            Ok(n) => {
                log::debug!("store: {n} expired or surplus results deleted");
                if n < GC_PASS {
                    every
                } else {
                    std::time::Duration::ZERO
                }
            }
            Err(e) => {
                log::warn!("store: expiring results failed: {e}");
                every
            }
        };
        match stop_rx.recv_timeout(pause) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    })?;
    Ok(crate::stage::Stage::new(
        "store-gc",
        move || {
            let _ = stop_tx.try_send(());
        },
        vec![h],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// More expired results than one pass deletes: the gc thread goes on at once until they are
    /// all gone, not one pass per period.
    #[test]
    fn gc_passes_follow_each_other_at_once_while_a_pass_is_full() {
        let store = Arc::new(memory::open());
        let expired = crate::clock::now_ms() - 1;
        let changes: Vec<Change> = (0..2 * GC_PASS + GC_PASS / 2)
            .map(|i| Change::Finish {
                result: contract::result(&format!("old{i}")),
                expires_ms: expired,
                task: None,
            })
            .collect();
        store.record(&changes).expect("record");
        let gc = start_gc(store.clone(), Duration::from_secs(3600), usize::MAX).expect("start");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut left = store.results_stored().expect("count");
        while left > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            left = store.results_stored().expect("count");
        }
        let stopped = gc.stop_and_join(Duration::from_secs(5));
        assert_eq!(
            left, 0,
            "expired results left after 30 s with a gc period of an hour"
        );
        assert!(stopped, "the gc thread stops");
    }
}

/// The shared contract tests, run against every implementation.
#[cfg(test)]
pub(crate) mod contract {
    use super::*;
    use crate::task::{Method, State, Task};

    pub(crate) fn task(id: &str, state: State, due_us: u64) -> Task {
        Task {
            id: id.to_string(),
            method: Method::Get,
            name: "http://127.0.0.1:1/x".to_string(),
            params: String::new(),
            args: Vec::new(),
            cc: Vec::new(),
            delay: 0,
            timeout: None,
            max_retry: None,
            retry_interval: None,
            trusted: false,
            kafka: false,
            submitted_ms: 1,
            due_us,
            state,
            // Stored and read back like every other field.
            headers: "Authorization: Bearer t".to_string(),
            callback: None,
            attempts: Vec::new(),
            budget_from: 0,
        }
    }

    pub(crate) fn result(id: &str) -> TaskResult {
        TaskResult {
            id: id.to_string(),
            result: crate::task::Verdict::Ok,
            reason: String::new(),
            status: crate::task::FinalStatus::Succeeded,
            attempts: 1,
            output: "out".to_string(),
            code: Some(200),
            submitted_at: "a".to_string(),
            finished_at: "b".to_string(),
            callback_id: None,
            // Stored and read back like every other field.
            node: "node-1".into(),
        }
    }

    /// Insert, duplicates, claim races, outcomes, cancel, recovery and expiry.
    pub(crate) fn run(store: &dyn Store) {
        let now = crate::clock::now_ms();
        store
            .insert(&[task("a", State::Ready, 0), task("b", State::Delayed, 5)])
            .expect("insert");
        assert_eq!(
            store.insert(&[task("c", State::Ready, 0), task("a", State::Ready, 0)]),
            Err(StoreError::Duplicate("a".into()))
        );
        assert_eq!(store.status("c").expect("status"), None, "all or nothing");
        assert_eq!(
            store.insert(&[task("d", State::Ready, 0), task("d", State::Ready, 0)]),
            Err(StoreError::Duplicate("d".into()))
        );
        assert_eq!(store.status("d").expect("status"), None, "all or nothing");
        let repeat_at_the_end: Vec<Task> = (0..200)
            .map(|i| task(&format!("e{i}"), State::Ready, 0))
            .chain([task("e7", State::Ready, 0)])
            .collect();
        assert_eq!(
            store.insert(&repeat_at_the_end),
            Err(StoreError::Duplicate("e7".into()))
        );
        assert_eq!(store.status("e0").expect("status"), None, "all or nothing");
        assert_eq!(store.status("e7").expect("status"), None, "all or nothing");
        store
            .insert(&[task("d", State::Ready, 0), task("e7", State::Ready, 0)])
            .expect("the ids of a refused insert are free again");
        assert_eq!(store.status("a").expect("status"), Some(State::Ready));
        assert_eq!(store.status("b").expect("status"), Some(State::Delayed));

        let a = task("a", State::Ready, 0);
        assert!(store.claim(&a).expect("claim"), "first claim wins");
        assert!(!store.claim(&a).expect("claim"), "second claim loses");
        assert_eq!(store.status("a").expect("status"), Some(State::Running));
        assert_eq!(
            store.cancel("a", now + 1_000_000).expect("cancel"),
            Cancel::Running
        );

        let sum = store.summary(10).expect("summary");
        assert_eq!(sum.running, vec!["a".to_string()]);
        assert_eq!(sum.waiting, vec!["b".to_string()]);

        let mut retry = a.clone();
        retry.state = State::RetryWait;
        retry.due_us = 9;
        store.record(&[Change::Retry(retry)]).expect("record retry");
        assert_eq!(store.status("a").expect("status"), Some(State::RetryWait));
        let due = store.take_due("a", 9).expect("take_due").expect("waiting");
        assert_eq!(due.due_us, 9);
        assert_eq!(store.take_due("a", 9).expect("take_due"), None, "only once");
        assert!(store.claim(&due).expect("claim"));

        store
            .record(&[Change::Finish {
                result: result("a"),
                expires_ms: now + 1_000_000_000,
                task: None,
            }])
            .expect("record finish");
        assert_eq!(store.status("a").expect("status"), None);
        assert_eq!(store.result("a").expect("result"), Some(result("a")));
        assert_eq!(
            store.cancel("a", now + 1_000_000).expect("cancel"),
            Cancel::Finished
        );

        // A finished id may be used again; the old result goes away.
        store
            .insert(&[task("a", State::Delayed, 7)])
            .expect("reuse id");
        assert_eq!(store.result("a").expect("result"), None);
        let Cancel::Cancelled {
            result: cancelled,
            kafka: false,
        } = store.cancel("a", now + 1_000_000).expect("cancel")
        else {
            panic!("a delayed task is cancelled");
        };
        assert_eq!(
            (
                cancelled.status,
                cancelled.result,
                cancelled.reason.as_str(),
                cancelled.attempts
            ),
            (
                crate::task::FinalStatus::Cancelled,
                crate::task::Verdict::Fail,
                "cancelled",
                0
            )
        );
        assert_eq!(store.take_due("a", 7).expect("take_due"), None, "cancelled");
        assert_eq!(store.status("a").expect("status"), None);
        assert_eq!(
            store.result("a").expect("result"),
            Some(*cancelled),
            "its result is stored with the cancel"
        );
        assert_eq!(
            store.cancel("a", now + 1_000_000).expect("cancel"),
            Cancel::Finished
        );
        assert_eq!(
            store.cancel("zzz", now + 1_000_000).expect("cancel"),
            Cancel::Unknown
        );

        // A task waiting for a retry is cancelled with its failed attempts counted.
        let mut failed = task("f", State::Ready, 0);
        store.insert(std::slice::from_ref(&failed)).expect("insert");
        assert!(store.claim(&failed).expect("claim"));
        failed.state = State::RetryWait;
        failed.due_us = u64::MAX / 2;
        failed.attempts.push(crate::task::Attempt {
            started_ms: 1,
            finished_ms: 2,
            worker: 0,
            ok: false,
            code: Some(503),
            error: "HTTP 503".into(),
            output_excerpt: String::new(),
        });
        store
            .record(&[Change::Retry(failed)])
            .expect("record retry");
        match store.cancel("f", now + 1_000_000).expect("cancel") {
            Cancel::Cancelled { result, .. } => {
                assert_eq!((result.attempts, result.code), (1, Some(503)))
            }
            other => panic!("a retry_wait task is cancelled, got {other:?}"),
        }

        // A final outcome brings a new task (the POST of its result to a callback) in the
        // same write; it waits like any delayed task.
        let g = task("g", State::Ready, 0);
        store.insert(std::slice::from_ref(&g)).expect("insert");
        assert!(store.claim(&g).expect("claim"));
        store
            .record(&[
                Change::Finish {
                    result: result("g"),
                    expires_ms: now + 1_000_000,
                    task: None,
                },
                Change::Insert(task("cb-g", State::Delayed, 5)),
            ])
            .expect("record finish and insert");
        assert_eq!(store.status("g").expect("status"), None);
        assert_eq!(store.status("cb-g").expect("status"), Some(State::Delayed));
        let due = store.take_due("cb-g", 5).expect("take_due").map(|t| t.id);
        assert_eq!(due.as_deref(), Some("cb-g"));

        assert_eq!(store.get_meta("k").expect("meta"), None);
        store.put_meta("k", "v1").expect("put meta");
        store.put_meta("k", "v2").expect("put meta");
        assert_eq!(store.get_meta("k").expect("meta").as_deref(), Some("v2"));

        // Several due tasks at once: one answer per id, in order; each handed out once.
        store
            .insert(&[task("m1", State::Delayed, 4), task("m2", State::Delayed, 6)])
            .expect("insert");
        let ids: Vec<Due> = [("m2", 6), ("nope", 0), ("m1", 4), ("m2", 6)]
            .map(|(id, due)| (Arc::from(id), due))
            .to_vec();
        let got: Vec<Option<(String, State)>> = store
            .take_due_many(&ids, false)
            .into_iter()
            .map(|r| r.expect("take_due_many").map(|t| (t.id, t.state)))
            .collect();
        assert_eq!(
            got,
            vec![
                Some(("m2".to_string(), State::Ready)),
                None,
                Some(("m1".to_string(), State::Ready)),
                None,
            ]
        );
        assert_eq!(
            store.take_due("m1", 4).expect("take_due"),
            None,
            "only once"
        );
        // A release whose answer was lost is retried with `again`: ready tasks come back too.
        let again = store.take_due_many(&[(Arc::from("m1"), 4), (Arc::from("nope"), 0)], true);
        let again: Vec<Option<String>> = again
            .into_iter()
            .map(|r| r.expect("take_due_many again").map(|t| t.id))
            .collect();
        assert_eq!(again, vec![Some("m1".to_string()), None]);
        let m1 = task("m1", State::Ready, 4);
        assert!(store.claim(&m1).expect("claim"), "one claim wins");
        assert!(
            !store.claim(&m1).expect("claim"),
            "a second hand-out cannot run it again"
        );
        assert_eq!(
            store.take_due_many(&[(Arc::from("m1"), 4)], true)[0],
            Ok(None),
            "a running task is not handed out"
        );

        // A timer entry armed with another due time than the task's is stale (the id was
        // cancelled and submitted again with another delay): the task stays waiting for its
        // own entry, with `again` too.
        store
            .insert(&[
                task("s", State::Delayed, 10),
                task("s2", State::RetryWait, 12),
            ])
            .expect("insert");
        for again in [false, true] {
            let stale = store.take_due_many(&[(Arc::from("s"), 5), (Arc::from("s2"), 11)], again);
            assert_eq!(
                stale,
                vec![Ok(None), Ok(None)],
                "stale entries (again: {again})"
            );
        }
        assert_eq!(store.status("s").expect("status"), Some(State::Delayed));
        assert_eq!(store.status("s2").expect("status"), Some(State::RetryWait));
        let own = store.take_due_many(&[(Arc::from("s"), 10), (Arc::from("s2"), 12)], false);
        let own: Vec<Option<String>> = own
            .into_iter()
            .map(|r| r.expect("take_due_many").map(|t| t.id))
            .collect();
        assert_eq!(own, vec![Some("s".to_string()), Some("s2".to_string())]);

        // Recovery hands every unfinished task to the timer, running ones included (flagged).
        store.insert(&[task("e", State::Ready, 3)]).expect("insert");
        let e = task("e", State::Ready, 3);
        assert!(store.claim(&e).expect("claim"));
        // A claim's running mark may ride with the next durable write.
        store
            .insert(&[task("f", State::Delayed, 4)])
            .expect("insert");
        let rec = store.recover().expect("recover");
        let e = rec
            .iter()
            .find(|r| &*r.id == "e")
            .expect("the running task is recovered");
        assert_eq!((e.due_us, e.was_running), (3, true));
        assert!(
            rec.iter().all(|r| &*r.id != "a"),
            "finished or cancelled tasks are not recovered"
        );

        // A cron firing (a trusted task) whose result is stored is refused: it runs once.
        let mut firing = task("cron-l1-60", State::Ready, 0);
        firing.trusted = true;
        store.insert(std::slice::from_ref(&firing)).expect("insert");
        assert!(store.claim(&firing).expect("claim"));
        store
            .record(&[Change::Finish {
                result: result("cron-l1-60"),
                expires_ms: now + 1_000_000_000,
                task: None,
            }])
            .expect("record finish");
        assert_eq!(
            store.insert(std::slice::from_ref(&firing)),
            Err(StoreError::Duplicate("cron-l1-60".into())),
            "a finished firing is not inserted again"
        );
        assert_eq!(store.status("cron-l1-60").expect("status"), None);
        firing.trusted = false;
        store
            .insert(std::slice::from_ref(&firing))
            .expect("an id whose task finished may be used again by a client");

        // Two outcome writes under way at once (the outcome stage starts the next before the
        // first is durable): each is durable once waited for, whatever the order.
        let (w1, w2) = (task("w1", State::Ready, 0), task("w2", State::Ready, 0));
        store.insert(&[w1.clone(), w2.clone()]).expect("insert");
        assert!(store.claim(&w1).expect("claim") && store.claim(&w2).expect("claim"));
        let first_changes = [Change::Finish {
            result: result("w1"),
            expires_ms: now + 1_000_000_000,
            task: Some(w1),
        }];
        let first = store.record_start(&first_changes);
        let mut again = w2;
        again.state = State::RetryWait;
        let second_changes = [Change::Retry(again)];
        let second = store.record_start(&second_changes);
        second.wait(&second_changes).expect("second write");
        assert_eq!(store.status("w2").expect("status"), Some(State::RetryWait));
        first.wait(&first_changes).expect("first write");
        assert_eq!(store.status("w1").expect("status"), None);
        assert_eq!(store.result("w1").expect("result"), Some(result("w1")));
    }
    /// Several submissions in one `insert_many`, each all or none on its own: a batch that
    /// repeats an id of a stored task, of an earlier batch or of itself is refused alone, and
    /// the ids of a refused batch are free for a later one.
    pub(crate) fn insert_many(store: &dyn Store) {
        store
            .insert(&[task("m-old", State::Ready, 0)])
            .expect("insert");
        let batches: [&[Task]; 6] = [
            &[task("m1", State::Ready, 0), task("m2", State::Delayed, 9)],
            &[task("m3", State::Ready, 0), task("m-old", State::Ready, 0)],
            &[task("m4", State::Ready, 0)],
            &[task("m5", State::Ready, 0), task("m1", State::Ready, 0)],
            &[task("m6", State::Ready, 0), task("m6", State::Ready, 0)],
            &[task("m3", State::Ready, 0)],
        ];
        let dup = |id: &str| Err(StoreError::Duplicate(id.to_string()));
        assert_eq!(
            store.insert_many(&batches),
            vec![Ok(()), dup("m-old"), Ok(()), dup("m1"), dup("m6"), Ok(())]
        );
        for (id, want) in [
            ("m1", Some(State::Ready)),
            ("m2", Some(State::Delayed)),
            ("m3", Some(State::Ready)),
            ("m4", Some(State::Ready)),
            ("m5", None),
            ("m6", None),
        ] {
            assert_eq!(store.status(id).expect("status"), want, "{id}");
        }
    }

    /// One node's claims of tasks sharing a cc worker, one after the other on that worker (as
    /// its workers make them: each attempt released when it ends): each wins once, and a task
    /// without cc is claimed as by `claim`.
    pub(crate) fn cc_claims(store: &dyn Store) {
        let cc = |id: &str| Task {
            cc: vec![0],
            ..task(id, State::Ready, 0)
        };
        let (c1, c2, c3) = (cc("c1"), cc("c2"), cc("c3"));
        let plain = task("plain", State::Ready, 0);
        store
            .insert(&[c1.clone(), c2.clone(), c3.clone(), plain.clone()])
            .expect("insert");
        assert_eq!(store.claim_on(&c1, 0), Ok(Claim::Won));
        assert_eq!(store.claim_on(&c1, 0), Ok(Claim::Lost), "claimed once");
        store.release(&c1, 0);
        assert_eq!(store.claim_on(&c2, 0), Ok(Claim::Won));
        store.release(&c2, 0);
        assert_eq!(store.claim_on(&c3, 0), Ok(Claim::Won));
        store.release(&c3, 0);
        assert_eq!(store.claim_on(&plain, 0), Ok(Claim::Won));
        assert_eq!(store.status("c3").expect("status"), Some(State::Running));
    }

    /// A dead result of `id` after one failed attempt.
    pub(crate) fn dead(id: &str) -> TaskResult {
        TaskResult {
            result: crate::task::Verdict::Fail,
            reason: "HTTP 503".to_string(),
            status: crate::task::FinalStatus::Dead,
            ..result(id)
        }
    }

    /// `task` with one failed attempt, as the outcome stage stores a dead task.
    pub(crate) fn failed_once(mut t: Task) -> Task {
        t.attempts.push(crate::task::Attempt {
            started_ms: 1,
            finished_ms: 2,
            worker: 0,
            ok: false,
            code: Some(503),
            error: "HTTP 503".into(),
            output_excerpt: "busy".into(),
        });
        t
    }

    fn query(what: &str, limit: usize) -> ListQuery {
        ListQuery {
            what: list::Listed::parse(what).expect("a state"),
            method: None,
            q: String::new(),
            limit,
            after: None,
            scan: list::SCAN_CAP,
        }
    }

    /// Every page of `q`, followed to the end: the ids in order, and how many calls it took.
    fn all_pages(store: &dyn Store, q: &ListQuery) -> (Vec<String>, usize) {
        let mut q = q.clone();
        let (mut ids, mut calls) = (Vec::new(), 0);
        loop {
            calls += 1;
            assert!(calls < 100, "the listing of {q:?} ends");
            let page = store.list(&q).expect("list");
            assert!(page.rows.len() <= q.limit, "{page:?}");
            ids.extend(page.rows.into_iter().map(|r| r.id));
            match page.next {
                Some(c) => q.after = Some(c),
                None => return (ids, calls),
            }
        }
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    /// The task browser: listings by state with paging, filters and bounded scans; the
    /// whole record of a task; reviving a dead task.
    pub(crate) fn browse(store: &dyn Store) {
        let now = crate::clock::now_ms();
        let mut post = task("l3", State::Delayed, 5);
        post.method = crate::task::Method::Post;
        let mut named = task("l5", State::Delayed, 5);
        named.name = "http://127.0.0.1:1/special".to_string();
        store
            .insert(&[
                task("l1", State::Delayed, 5),
                task("l2", State::Delayed, 5),
                post,
                task("l4", State::Delayed, 5),
                named,
                task("q1", State::Ready, 0),
                task("r1", State::Ready, 0),
                task("w1", State::RetryWait, 7),
            ])
            .expect("insert");
        assert!(store.claim(&task("r1", State::Ready, 0)).expect("claim"));

        // Paging through 5 tasks 2 at a time gives each once.
        let (ids, calls) = all_pages(store, &query("delayed", 2));
        assert_eq!(sorted(ids), ["l1", "l2", "l3", "l4", "l5"], "each once");
        assert!(calls >= 3, "pages of 2: {calls} calls");
        for (state, id) in [("queued", "q1"), ("running", "r1"), ("retry_wait", "w1")] {
            let page = store.list(&query(state, 50)).expect("list");
            let ids: Vec<&str> = page.rows.iter().map(|r| r.id.as_str()).collect();
            assert_eq!(ids, [id], "{state}");
            assert_eq!(page.next, None, "{state}: nothing more");
        }
        let page = store.list(&query("retry_wait", 50)).expect("list");
        let w1 = &page.rows[0];
        assert_eq!(
            (w1.state, w1.method, w1.name.as_deref(), w1.due_us),
            (
                "retry_wait",
                Some(crate::task::Method::Get),
                Some("http://127.0.0.1:1/x"),
                Some(7)
            )
        );
        assert_eq!((w1.finished_at.as_deref(), w1.attempts), (None, 0));

        // Filters: method, and a substring of the id or of the name.
        let mut q = query("delayed", 50);
        q.method = Some(crate::task::Method::Post);
        assert_eq!(all_pages(store, &q).0, ["l3"]);
        let mut q = query("delayed", 50);
        q.q = "l4".to_string();
        assert_eq!(all_pages(store, &q).0, ["l4"]);
        q.q = "special".to_string();
        assert_eq!(all_pages(store, &q).0, ["l5"]);

        // Bounded work: two entries examined per call, so a filter matching one task pages
        // through the whole set, returning `next` before its page is full.
        q.scan = 2;
        let first = store.list(&q).expect("list");
        assert!(first.next.is_some(), "more to examine: {first:?}");
        let (ids, calls) = all_pages(store, &q);
        assert_eq!(ids, ["l5"]);
        assert!(
            calls >= 3,
            "8 live tasks, 2 examined per call: {calls} calls"
        );

        // Finished tasks, newest first, kept with their tasks.
        let finish = |r: TaskResult, t: Option<Task>, e: i64| Change::Finish {
            result: r,
            expires_ms: now + 1_000_000 + e,
            task: t,
        };
        store
            .insert(&[
                task("d1", State::Ready, 0),
                task("d2", State::Ready, 0),
                task("d3", State::Ready, 0),
                task("s1", State::Ready, 0),
                task("old", State::Ready, 0),
            ])
            .expect("insert");
        store
            .record(&[
                finish(
                    dead("d1"),
                    Some(failed_once(task("d1", State::Ready, 0))),
                    1,
                ),
                finish(
                    dead("d2"),
                    Some(failed_once(task("d2", State::Ready, 0))),
                    2,
                ),
                finish(
                    dead("d3"),
                    Some(failed_once(task("d3", State::Ready, 0))),
                    3,
                ),
                finish(result("s1"), Some(task("s1", State::Ready, 0)), 4),
                // As an earlier release stored it: the result alone.
                finish(dead("old"), None, 5),
            ])
            .expect("record");
        let (ids, _) = all_pages(store, &query("dead", 1));
        assert_eq!(ids, ["old", "d3", "d2", "d1"], "newest first, each once");
        let page = store.list(&query("succeeded", 50)).expect("list");
        let s1 = &page.rows[0];
        assert_eq!(
            (
                s1.id.as_str(),
                s1.method,
                s1.due_us,
                s1.finished_at.as_deref()
            ),
            ("s1", Some(crate::task::Method::Get), None, Some("b"))
        );
        let page = store.list(&query("dead", 50)).expect("list");
        assert_eq!(
            (page.rows[0].method, page.rows[0].name.as_deref()),
            (None, None)
        );
        let mut q = query("dead", 50);
        q.method = Some(crate::task::Method::Get);
        assert_eq!(all_pages(store, &q).0, ["d3", "d2", "d1"]);
        q.q = "d2".to_string();
        assert_eq!(all_pages(store, &q).0, ["d2"]);
        q.scan = 1;
        q.q = "d1".to_string();
        let (ids, calls) = all_pages(store, &q);
        assert_eq!((ids, calls >= 4), (vec!["d1".to_string()], true));

        // The whole record.
        let r = store.lookup("l1").expect("lookup").expect("known");
        assert_eq!((r.state, r.result.is_none()), ("delayed", true));
        assert_eq!(r.task.map(|t| t.id), Some("l1".to_string()));
        let r = store.lookup("d1").expect("lookup").expect("known");
        assert_eq!((r.state, r.result), ("dead", Some(dead("d1"))));
        let t = r.task.expect("kept with its result");
        assert_eq!(
            (t.attempts.len(), t.attempts[0].output_excerpt.as_str()),
            (1, "busy")
        );
        let r = store.lookup("old").expect("lookup").expect("known");
        assert_eq!((r.state, r.task), ("dead", None));
        assert_eq!(store.lookup("nope").expect("lookup"), None);

        // Reviving: only a dead task with its task kept.
        let at = crate::clock::now_us();
        let Revive::Revived(t) = store.revive("d1", at).expect("revive") else {
            panic!("d1 is dead");
        };
        assert_eq!(
            (t.state, t.due_us, t.attempts.len(), t.budget_from),
            (State::Ready, at, 1, 1)
        );
        assert_eq!(store.status("d1").expect("status"), Some(State::Ready));
        assert_eq!(
            store.result("d1").expect("result"),
            None,
            "the dead result went"
        );
        let r = store.lookup("d1").expect("lookup").expect("known");
        assert_eq!(
            (r.state, r.task.map(|t| t.attempts.len())),
            ("queued", Some(1))
        );
        assert_eq!(all_pages(store, &query("dead", 50)).0, ["old", "d3", "d2"]);
        assert!(store.claim(&t).expect("claim"), "it runs again");
        assert_eq!(
            store.revive("d1", at).expect("revive"),
            Revive::NotDead("running")
        );
        assert_eq!(
            store.revive("l1", at).expect("revive"),
            Revive::NotDead("delayed")
        );
        assert_eq!(
            store.revive("s1", at).expect("revive"),
            Revive::NotDead("succeeded")
        );
        assert_eq!(
            store.revive("old", at).expect("revive"),
            Revive::TaskNotKept
        );
        assert_eq!(store.revive("nope", at).expect("revive"), Revive::Unknown);
        // A cancelled task keeps its task too, and is listed as cancelled.
        assert!(matches!(
            store.cancel("l2", now + 2_000_000).expect("cancel"),
            Cancel::Cancelled { .. }
        ));
        assert_eq!(all_pages(store, &query("cancelled", 50)).0, ["l2"]);
        let r = store.lookup("l2").expect("lookup").expect("known");
        assert_eq!(
            (r.state, r.task.map(|t| t.method)),
            ("cancelled", Some(crate::task::Method::Get))
        );
        assert_eq!(
            store.revive("l2", at).expect("revive"),
            Revive::NotDead("cancelled")
        );
    }

    /// At most `keep` results stay: `gc` drops the oldest beyond it, newest kept.
    pub(crate) fn result_cap(store: &dyn Store) {
        let now = crate::clock::now_ms();
        for i in 0..25 {
            let id = format!("cap{i}");
            store.insert(&[task(&id, State::Ready, 0)]).expect("insert");
            store
                .record(&[Change::Finish {
                    result: result(&id),
                    expires_ms: now + 60_000 + i,
                    task: None,
                }])
                .expect("finish");
        }
        assert_eq!(store.results_stored().expect("count"), 25);
        assert_eq!(store.gc(now, 30).expect("gc"), 0, "under the cap");
        assert_eq!(store.gc(now, 10).expect("gc"), 15);
        assert_eq!(store.results_stored().expect("count"), 10);
        for i in 0..25 {
            let id = format!("cap{i}");
            let kept = store.result(&id).expect("result").is_some();
            assert_eq!(kept, i >= 15, "{id}: the oldest go first");
        }
        // A finished id used again: its old result no longer counts once it is replaced.
        store
            .insert(&[task("cap20", State::Ready, 0)])
            .expect("insert again");
        assert_eq!(store.result("cap20").expect("result"), None);
        store.gc(now, 0).expect("gc");
        assert_eq!(store.results_stored().expect("count"), 0);
    }

    /// Results expire: by `gc` (single-node stores) or by the store itself (`by_gc` false).
    /// Either way an expired result is never read, even before `gc` has deleted it.
    pub(crate) fn expiry(store: &dyn Store, by_gc: bool) {
        let now = crate::clock::now_ms();
        store
            .insert(&[task("x1", State::Ready, 0)])
            .expect("insert");
        store
            .record(&[Change::Finish {
                result: result("x1"),
                expires_ms: now + 300,
                task: None,
            }])
            .expect("finish");
        assert_eq!(store.result("x1").expect("result"), Some(result("x1")));
        if by_gc {
            assert_eq!(store.gc(now + 100, usize::MAX).expect("gc"), 0);
        }
        std::thread::sleep(std::time::Duration::from_millis(400));
        assert_eq!(
            store.result("x1").expect("result"),
            None,
            "expired, and not read although gc has not deleted it yet"
        );
        if by_gc {
            assert_eq!(store.gc(now + 400, usize::MAX).expect("gc"), 1);
        }
    }

    /// `/sys_info`'s lists and totals: ids per state, each list at most `cap` ids (sorted), the
    /// totals counting every id.
    pub(crate) fn summary_counts(store: &dyn Store) {
        store
            .insert(&[
                task("w1", State::Delayed, 5),
                task("w2", State::RetryWait, 5),
                task("w3", State::Delayed, 5),
                task("r1", State::Ready, 0),
                task("r2", State::Ready, 0),
                task("r3", State::Ready, 0),
            ])
            .expect("insert");
        for id in ["r1", "r2"] {
            assert!(store.claim(&task(id, State::Ready, 0)).expect("claim"));
        }
        let all = store.summary(10).expect("summary");
        assert_eq!(
            all,
            Summary {
                running: vec!["r1".to_string(), "r2".to_string()],
                running_total: 2,
                waiting: vec!["w1".to_string(), "w2".to_string(), "w3".to_string()],
                waiting_total: 3,
                retry_wait_total: all.retry_wait_total,
                ready_total: 1,
            }
        );
        assert!(
            matches!(all.retry_wait_total, None | Some(1)),
            "w2 waits to retry: {all:?}"
        );
        let capped = store.summary(1).expect("summary");
        assert_eq!(
            (capped.running.len(), capped.running_total),
            (1, 2),
            "{capped:?}"
        );
        assert_eq!(
            (capped.waiting.len(), capped.waiting_total),
            (1, 3),
            "{capped:?}"
        );
        assert_eq!(capped.ready_total, 1, "{capped:?}");
    }
}
