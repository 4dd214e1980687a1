//! The single-node store: an in-memory state index in front of a byte-level backend
//! (redb on disk, or plain maps for unit tests). All `Store` logic lives here once.

use super::list::{self, ListQuery, Listed, Page, Record, Revive};
use super::live::LiveIndex;
use super::{Cancel, Change, Due, Recording, Recovered, Store, StoreError, Summary, GC_PASS};
use crate::task::TaskResult;
use crate::task::{State, Task};
use serde::Deserialize;
use std::sync::Arc;

/// One write, applied with others in one transaction.
#[derive(Debug, Clone)]
pub enum Op {
    PutTask(String, Vec<u8>),
    /// A new task (`PutTask` for an id that was free): undone after a failed commit that may
    /// have reached the disk, because its submitter was told nothing was accepted.
    InsertTask(String, Vec<u8>),
    DelTask(String),
    PutResult {
        id: String,
        expires_ms: i64,
        bytes: Vec<u8>,
    },
    DelResult(String),
    /// Deletes the expiry entry and, when it still has this expiry, the result.
    Expire {
        id: String,
        expires_ms: i64,
    },
    PutMeta(String, String),
}

/// The expiry index's key: fixed-width hex sorts as the number does.
pub(crate) fn expiry_key(expires_ms: i64, id: &str) -> String {
    format!("{:016x}{id}", expires_ms.max(0) as u64)
}

/// An expiry key's expiry and id.
pub(crate) fn split_expiry_key(k: &str) -> Option<(i64, &str)> {
    let (head, id) = k.split_at_checked(16)?;
    let e = u64::from_str_radix(head, 16).ok()?;
    Some((e as i64, id))
}

/// Entries one backend read hands a listing at a time.
const LIST_CHUNK: usize = 500;

/// Byte-level tables: tasks, results (with expiry) and an expiry index.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Applies `ops` in one transaction and returns once it is durable.
    fn write(&self, ops: Vec<Op>) -> Result<(), StoreError>;
    /// Starts `write` (the outcome stage's writes, whose latency matters less than the commits
    /// they save): the returned closure waits for it to be durable, and may first wait a little
    /// for another caller's commit to take it. By default the write is made at once.
    fn write_start(&self, ops: Vec<Op>) -> Box<dyn FnOnce() -> Result<(), StoreError> + Send + '_> {
        let r = self.write(ops);
        Box::new(move || r)
    }
    /// Queues `ops` for the next transaction without waiting for it.
    fn write_later(&self, ops: Vec<Op>);
    fn task(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn result(&self, id: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError>;
    fn each_task(&self, f: &mut dyn FnMut(&[u8])) -> Result<(), StoreError>;
    /// Keys of the tasks table after `from` in id order (every one when it is empty), or with
    /// `results` of the expiry index ([`expiry_key`]) before `from`, newest first (from the
    /// newest when it is empty); at most `limit`. Sees every write once `settle` has returned.
    fn keys(&self, results: bool, from: &str, limit: usize) -> Result<Vec<String>, StoreError>;
    /// Expiry entries due before `now_ms`, at most `limit`; oldest first, except that results
    /// written since the last `settle` may come after the others.
    fn expired(&self, now_ms: i64, limit: usize) -> Result<Vec<(String, i64)>, StoreError>;
    fn meta(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Number of stored results; exact after `settle`, an estimate otherwise (results written
    /// since may be counted twice or deleted ones still counted).
    fn results_len(&self) -> Result<usize, StoreError>;
    /// Makes every write so far visible to `expired` in expiry order and to an exact
    /// `results_len` (the embedded store writes a checkpoint).
    fn settle(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Size of the data on disk, when there is a file.
    fn data_bytes(&self) -> Option<u64> {
        None
    }
    /// Whether writes can be made durable now (false while the storage is down after an I/O
    /// error, until it has been reopened).
    fn healthy(&self) -> bool {
        true
    }
    /// Finishes queued writes and closes the storage (at shutdown).
    fn close(&self) {}
}

/// A `Store` over any `Backend`.
///
/// The live index changes only after the write it mirrors is durable, or is put back when that
/// write fails, so it stays true when the backend goes down and is reopened (after an I/O
/// error): nothing needs rebuilding. The one write not waited for, a claim's running mark, only
/// matters after a crash, when ready and running tasks both run again.
pub struct LocalStore<B: Backend> {
    live: LiveIndex,
    backend: B,
}

/// The few fields recovery needs, read without decoding the whole task.
#[derive(Deserialize)]
struct Head {
    id: String,
    state: State,
    due_us: u64,
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The tasks `changes` bring into being (callbacks), with their states.
fn born(changes: &[Change]) -> Vec<(&str, State)> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::Insert(t) => Some((t.id.as_str(), t.state)),
            _ => None,
        })
        .collect()
}

/// The ids of `items`.
fn ids<'a>(items: &[(&'a str, State)]) -> Vec<&'a str> {
    items.iter().map(|(id, _)| *id).collect()
}

fn now_ms() -> i64 {
    crate::clock::now_ms()
}

impl<B: Backend> LocalStore<B> {
    /// Checks and reserves the ids of `tasks` and adds their ops to `ops`; gives the ids.
    fn reserve_insert<'a>(
        &self,
        tasks: &'a [Task],
        ops: &mut Vec<Op>,
    ) -> Result<Vec<&'a str>, StoreError> {
        for t in tasks.iter().filter(|t| t.trusted) {
            if self.backend.result(&t.id)?.is_some() {
                return Err(StoreError::Duplicate(t.id.clone()));
            }
        }
        let items: Vec<(&str, State)> = tasks.iter().map(|t| (t.id.as_str(), t.state)).collect();
        self.live
            .reserve(&items)
            .map_err(|dup| StoreError::Duplicate(dup.0))?;
        let ids: Vec<&str> = items.iter().map(|(id, _)| *id).collect();
        let at = ops.len();
        for t in tasks {
            match encode(t) {
                Ok(bytes) => {
                    ops.push(Op::DelResult(t.id.clone()));
                    ops.push(Op::InsertTask(t.id.clone(), bytes));
                }
                Err(e) => {
                    ops.truncate(at);
                    self.live.release(&ids);
                    return Err(e);
                }
            }
        }
        Ok(ids)
    }

    /// Deletes the results of these expiry entries (each only if it still has that expiry).
    fn expire(&self, entries: Vec<(String, i64)>) -> Result<usize, StoreError> {
        let n = entries.len();
        if n > 0 {
            self.backend.write(
                entries
                    .into_iter()
                    .map(|(id, expires_ms)| Op::Expire { id, expires_ms })
                    .collect(),
            )?;
        }
        Ok(n)
    }

    /// The backend writes of `changes`.
    fn record_ops(&self, changes: &[Change]) -> Result<Vec<Op>, StoreError> {
        let mut ops = Vec::with_capacity(changes.len() * 2);
        for c in changes {
            match c {
                Change::Retry(t) => ops.push(Op::PutTask(t.id.clone(), encode(t)?)),
                Change::Finish {
                    result,
                    expires_ms,
                    task,
                } => {
                    ops.push(Op::DelTask(result.id.clone()));
                    ops.push(Op::PutResult {
                        id: result.id.clone(),
                        expires_ms: *expires_ms,
                        bytes: list::encode_record(result, task.as_ref())?,
                    });
                }
                Change::Insert(t) => ops.push(Op::InsertTask(t.id.clone(), encode(t)?)),
            }
        }
        Ok(ops)
    }

    /// With the task held as cancelled in the live index: replaces the stored task by its
    /// `cancelled` result, in one write.
    fn cancel_stored(&self, id: &str, expires_ms: i64) -> Result<Cancel, StoreError> {
        let bytes = self
            .backend
            .task(id)?
            .ok_or_else(|| StoreError::Corrupt(format!("task {id} is live but not stored")))?;
        let task: Task = decode(&bytes)?;
        let result = TaskResult::cancelled(&task, now_ms());
        self.backend.write(vec![
            Op::DelTask(id.to_string()),
            Op::PutResult {
                id: id.to_string(),
                expires_ms,
                bytes: list::encode_record(&result, Some(&task))?,
            },
        ])?;
        Ok(Cancel::Cancelled {
            result: Box::new(result),
            kafka: task.kafka,
        })
    }

    pub fn new(backend: B) -> LocalStore<B> {
        LocalStore {
            live: LiveIndex::default(),
            backend,
        }
    }

    /// The backend, for the unit tests that look inside it.
    #[cfg(test)]
    pub(crate) fn backend(&self) -> &B {
        &self.backend
    }

    /// Fails with `Unavailable` while the backend cannot make writes durable.
    fn check_up(&self) -> Result<(), StoreError> {
        if self.backend.healthy() {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!(
                "the {} store cannot record anything now",
                self.backend.name()
            )))
        }
    }

    /// Marks a waiting task ready (with `again`, one already ready passes too) and loads it.
    /// While the backend is down nothing is handed out: its attempt's outcome could not be
    /// recorded (the timer tries again).
    fn take(&self, id: &str, due_us: u64, again: bool) -> Result<Option<Task>, StoreError> {
        self.check_up()?;
        let from: &[State] = if again {
            &[State::Delayed, State::RetryWait, State::Ready]
        } else {
            &[State::Delayed, State::RetryWait]
        };
        if !self.live.transition(id, from, State::Ready) {
            return Ok(None);
        }
        match self.backend.task(id)? {
            Some(bytes) => {
                let mut t: Task = decode(&bytes)?;
                if t.due_us != due_us {
                    // A stale timer entry (the id was cancelled and submitted again with
                    // another delay): the task waits for its own entry. A cancel meanwhile
                    // finds it ready and wins; then it stays cancelled.
                    if matches!(t.state, State::Delayed | State::RetryWait) {
                        self.live.transition(id, &[State::Ready], t.state);
                    }
                    return Ok(None);
                }
                t.state = State::Ready;
                Ok(Some(t))
            }
            None => {
                self.live.remove(id);
                Err(StoreError::Corrupt(format!(
                    "task {id:?} is indexed but not stored"
                )))
            }
        }
    }
}

impl<B: Backend> Store for LocalStore<B> {
    fn name(&self) -> &'static str {
        self.backend.name()
    }

    fn close(&self) {
        self.backend.close();
    }

    fn healthy(&self) -> bool {
        self.backend.healthy()
    }

    /// The batches whose ids are free go in one write (one batch of the group commit: one
    /// answer slot and one wait for all, where a write each cost a fifth of WebSocket
    /// submits/s).
    fn insert_many(&self, batches: &[&[Task]]) -> Vec<Result<(), StoreError>> {
        let mut ops = Vec::new();
        let mut reserved: Vec<&str> = Vec::new();
        let mut answers: Vec<Result<(), StoreError>> = batches
            .iter()
            .map(|b| {
                let ids = self.reserve_insert(b, &mut ops)?;
                reserved.extend(ids);
                Ok(())
            })
            .collect();
        if ops.is_empty() {
            return answers;
        }
        match self.backend.write(ops) {
            Ok(()) => self.live.commit(&reserved),
            Err(e) => {
                self.live.release(&reserved);
                for a in answers.iter_mut().filter(|a| a.is_ok()) {
                    *a = Err(e.clone());
                }
            }
        }
        answers
    }

    fn take_due_many(&self, due: &[Due], again: bool) -> Vec<Result<Option<Task>, StoreError>> {
        due.iter()
            .map(|(id, due_us)| self.take(id, *due_us, again))
            .collect()
    }

    fn claim(&self, task: &Task) -> Result<bool, StoreError> {
        // No attempt starts while its outcome could not be recorded (the worker tries again).
        self.check_up()?;
        if !self
            .live
            .transition(&task.id, &[State::Ready], State::Running)
        {
            return Ok(false);
        }
        // The running mark rides with the next commit: a crash before it only means the task
        // is found ready instead of running, and both run again after a restart.
        self.backend.write_later(vec![Op::PutTask(
            task.id.clone(),
            super::running_json(task)?,
        )]);
        Ok(true)
    }

    fn record(&self, changes: &[Change]) -> Result<(), StoreError> {
        self.record_start(changes).wait(changes)
    }

    fn record_start(&self, changes: &[Change]) -> Recording<'_> {
        let reserved = born(changes);
        if !reserved.is_empty() {
            if let Err(dup) = self.live.reserve(&reserved) {
                return Recording::done(Err(StoreError::Duplicate(dup.0)));
            }
        }
        let ops = match self.record_ops(changes) {
            Ok(ops) => ops,
            Err(e) => {
                self.live.release(&ids(&reserved));
                return Recording::done(Err(e));
            }
        };
        let written = self.backend.write_start(ops);
        // The live index changes once the write is durable (or lets the reservations go).
        Recording::waiting(move |changes: &[Change]| {
            let reserved = ids(&born(changes));
            if let Err(e) = written() {
                self.live.release(&reserved);
                return Err(e);
            }
            self.live.commit(&reserved);
            for c in changes {
                match c {
                    Change::Retry(t) => self.live.set(&t.id, t.state),
                    Change::Finish { result, .. } => self.live.remove(&result.id),
                    Change::Insert(_) => {}
                }
            }
            Ok(())
        })
    }

    fn cancel(&self, id: &str, expires_ms: i64) -> Result<Cancel, StoreError> {
        match self.live.cancel(id) {
            Ok(prev) => match self.cancel_stored(id, expires_ms) {
                Ok(done) => Ok(done),
                Err(e) => {
                    self.live.uncancel(id, prev);
                    Err(e)
                }
            },
            Err(Cancel::Unknown) => Ok(if self.result(id)?.is_some() {
                Cancel::Finished
            } else {
                Cancel::Unknown
            }),
            Err(other) => Ok(other),
        }
    }

    fn status(&self, id: &str) -> Result<Option<State>, StoreError> {
        Ok(self.live.status(id))
    }

    fn result(&self, id: &str) -> Result<Option<TaskResult>, StoreError> {
        match self.backend.result(id)? {
            Some((expires_ms, bytes)) if expires_ms > now_ms() => {
                Ok(Some(list::decode_result(&bytes)?))
            }
            _ => Ok(None),
        }
    }

    fn list(&self, q: &ListQuery) -> Result<Page, StoreError> {
        // Writes not checkpointed yet become visible to the ordered scans.
        self.backend.settle()?;
        let mut rows = Vec::new();
        let mut examined = 0;
        let mut at = q.after.clone().unwrap_or_default();
        let now = now_ms();
        loop {
            let want = LIST_CHUNK.min(q.scan.saturating_sub(examined)).max(1);
            let results = matches!(q.what, Listed::Final(_));
            let keys = self.backend.keys(results, &at.text, want)?;
            for key in &keys {
                examined += 1;
                at.text.clone_from(key);
                let full = match q.what {
                    Listed::Live(state) if self.live.status(key) == Some(state) => {
                        match self.backend.task(key)? {
                            Some(b) => list::take_live(q, state, &b, &mut rows),
                            None => false,
                        }
                    }
                    Listed::Live(_) => false,
                    // An index entry whose result was replaced since is skipped.
                    Listed::Final(_) => match split_expiry_key(key) {
                        Some((e, id)) if e > now => match self.backend.result(id)? {
                            Some((x, b)) if x == e => list::take_finished(q, &b, &mut rows),
                            _ => false,
                        },
                        _ => false,
                    },
                };
                if full {
                    return Ok(Page {
                        rows,
                        next: Some(at),
                    });
                }
            }
            if keys.len() < want {
                return Ok(Page { rows, next: None });
            }
            if examined >= q.scan {
                return Ok(Page {
                    rows,
                    next: Some(at),
                });
            }
        }
    }

    fn lookup(&self, id: &str) -> Result<Option<Record>, StoreError> {
        if let Some(state) = self.live.status(id) {
            let task = match self.backend.task(id)? {
                Some(b) => Some(decode(&b)?),
                None => None,
            };
            return Ok(Some(Record {
                state: state.as_str(),
                task,
                result: None,
            }));
        }
        match self.backend.result(id)? {
            Some((expires_ms, bytes)) if expires_ms > now_ms() => {
                let result = list::decode_result(&bytes)?;
                Ok(Some(Record {
                    state: result.status.as_str(),
                    task: list::decode_task(&bytes)?,
                    result: Some(result),
                }))
            }
            _ => Ok(None),
        }
    }

    fn revive(&self, id: &str, now_us: u64) -> Result<Revive, StoreError> {
        self.check_up()?;
        // Held as reserved while deciding: no submit or other revive of this id meanwhile.
        if self.live.reserve(&[(id, State::Ready)]).is_err() {
            let state = self.live.status(id).unwrap_or(State::Ready);
            return Ok(Revive::NotDead(state.as_str()));
        }
        let done = match self.backend.result(id) {
            Ok(Some((expires_ms, bytes))) if expires_ms > now_ms() => {
                list::revive_from(&bytes, now_us)
            }
            Ok(_) => Ok(Revive::Unknown),
            Err(e) => Err(e),
        };
        let done = match done {
            Ok(Revive::Revived(t)) => encode(&t).and_then(|b| {
                self.backend
                    .write(vec![
                        Op::DelResult(id.to_string()),
                        Op::InsertTask(id.to_string(), b),
                    ])
                    .map(|()| Revive::Revived(t))
            }),
            other => other,
        };
        if matches!(done, Ok(Revive::Revived(_))) {
            self.live.commit(&[id]);
        } else {
            self.live.release(&[id]);
        }
        done
    }

    fn recover(&self) -> Result<Vec<Recovered>, StoreError> {
        let mut out = Vec::new();
        let mut retry_wait = Vec::new();
        let mut bad = 0usize;
        self.backend
            .each_task(&mut |bytes| match decode::<Head>(bytes) {
                Ok(h) => {
                    out.push(Recovered {
                        id: Arc::from(h.id.as_str()),
                        due_us: h.due_us,
                        was_running: h.state == State::Running,
                    });
                    retry_wait.push(h.state == State::RetryWait);
                }
                Err(_) => bad += 1,
            })?;
        if bad > 0 {
            log::error!("store: {bad} stored tasks could not be decoded and were skipped");
        }
        self.live
            .restore(out.iter().zip(&retry_wait).map(|(r, &retry)| {
                let state = if retry {
                    State::RetryWait
                } else {
                    State::Delayed
                };
                (r.id.clone(), state)
            }));
        Ok(out)
    }

    fn summary(&self, cap: usize) -> Result<Summary, StoreError> {
        Ok(self.live.summary(cap))
    }

    fn gc(&self, now_ms: i64, keep: usize) -> Result<usize, StoreError> {
        let mut done = self.expire(self.backend.expired(now_ms, GC_PASS)?)?;
        if self.backend.results_len()? <= keep {
            return Ok(done);
        }
        // Beyond `keep`, the results closest to expiry go first (with one `--result_ttl`, the
        // oldest). An index entry whose result was replaced deletes nothing, hence the recount.
        let mut budget = GC_PASS;
        while budget > 0 {
            self.backend.settle()?;
            let stored = self.backend.results_len()?;
            if stored <= keep {
                break;
            }
            let oldest = self
                .backend
                .expired(i64::MAX, (stored - keep).min(budget))?;
            if oldest.is_empty() {
                break;
            }
            budget -= oldest.len();
            done += self.expire(oldest)?;
        }
        Ok(done)
    }

    fn results_stored(&self) -> Result<usize, StoreError> {
        self.backend.results_len()
    }

    fn data_bytes(&self) -> Option<u64> {
        self.backend.data_bytes()
    }

    fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.backend.meta(key)
    }

    fn put_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.backend
            .write(vec![Op::PutMeta(key.to_string(), value.to_string())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::task;

    #[test]
    fn the_running_mark_is_the_task_encoded_as_running() {
        let tricky = r#"","state":"ready","x":"\"state\":\"ready\""#;
        let mut tasks = vec![
            task("plain", State::Ready, 5),
            task(tricky, State::Ready, 5),
        ];
        let mut t = task("t", State::Ready, 5);
        t.name = format!("http://h/{tricky}");
        t.params = tricky.to_string();
        t.args = vec![tricky.to_string()];
        t.cc = vec![1, 2];
        t.timeout = Some(3);
        t.headers = format!("X-A: {tricky}");
        t.callback = Some(tricky.to_string());
        t.attempts = vec![crate::task::Attempt {
            started_ms: 1,
            finished_ms: 2,
            worker: 0,
            ok: false,
            code: None,
            error: tricky.to_string(),
            output_excerpt: String::new(),
        }];
        tasks.push(t);
        // Not ready (never claimed so, but the mark is still right).
        tasks.push(task("d", State::Delayed, 5));
        for t in tasks {
            let mut running = t.clone();
            running.state = State::Running;
            let want = encode(&running).expect("encode");
            assert_eq!(
                super::super::running_json(&t).expect("encode"),
                want,
                "{}",
                t.id
            );
            let back: Task = decode(&want).expect("decode");
            assert_eq!(back, running);
        }
    }
}
