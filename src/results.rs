//! The clients waiting for results: `wait` submits, long polls and WebSocket pushes register
//! here and are handed their results by the thread that finishes the task, or by the expiry
//! thread when their time runs out. Handing over never writes to a socket: an HTTP wait blocks
//! only its own connection's thread on a channel. [`Answers`] is the adapters' read access.

use crate::store::{Store, StoreError};
use crate::task::State;
pub(crate) use crate::task::TaskResult;
use crossbeam_channel::{bounded, Receiver};
use parking_lot::{Condvar, Mutex};
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Somewhere else final results go (the Kafka result topic), for tasks that asked for it.
pub(crate) trait Forward: Send + Sync {
    fn forward(&self, r: &TaskResult);
}

/// Called once with the results of the awaited ids (in their order); `None` where the wait ran
/// out before that task finished.
pub(crate) type Responder = Box<dyn FnOnce(Vec<Option<TaskResult>>) + Send>;

/// A group of ids one client waits for.
struct Waiter {
    ids: Vec<String>,
    state: Mutex<WaiterState>,
}

struct WaiterState {
    got: Vec<Option<TaskResult>>,
    missing: usize,
    respond: Option<Responder>,
}

impl Waiter {
    /// Records a result; answers when it was the last one missing.
    fn deliver(&self, r: &TaskResult) {
        let mut st = self.state.lock();
        for (i, id) in self.ids.iter().enumerate() {
            if *id == r.id && st.got[i].is_none() {
                st.got[i] = Some(r.clone());
                st.missing -= 1;
            }
        }
        if st.missing == 0 {
            if let Some(f) = st.respond.take() {
                let got = std::mem::take(&mut st.got);
                drop(st);
                f(got);
            }
        }
    }

    /// Answers with what has arrived (timeout or shutdown).
    fn expire(&self) {
        let mut st = self.state.lock();
        if let Some(f) = st.respond.take() {
            let got = std::mem::take(&mut st.got);
            drop(st);
            f(got);
        }
    }
}

struct Deadline(Instant, Arc<Waiter>);
impl PartialEq for Deadline {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0
    }
}
impl Eq for Deadline {}
impl PartialOrd for Deadline {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Deadline {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.0.cmp(&self.0) // min-heap on time
    }
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Vec<Arc<Waiter>>>,
    deadlines: BinaryHeap<Deadline>,
    stopped: bool,
}

/// The registry of parked clients.
pub(crate) struct Results {
    inner: Mutex<Inner>,
    wake: Condvar,
}

impl Results {
    /// Makes the registry and starts its expiry thread (it ends with [`Results::stop`]).
    pub(crate) fn start() -> std::io::Result<(Arc<Results>, JoinHandle<()>)> {
        let r = Arc::new(Results {
            inner: Mutex::new(Inner::default()),
            wake: Condvar::new(),
        });
        let r2 = r.clone();
        let h = crate::stage::spawn_critical("results-expiry", move || r2.expiry_loop())?;
        Ok((r, h))
    }

    /// Parks a client until every id has a result or `timeout` passes. Call before the tasks
    /// can finish (or check the store afterwards), so no result slips by.
    pub(crate) fn wait_for(&self, ids: Vec<String>, timeout: Duration, respond: Responder) {
        let n = ids.len();
        let w = Arc::new(Waiter {
            ids,
            state: Mutex::new(WaiterState {
                got: vec![None; n],
                missing: n,
                respond: Some(respond),
            }),
        });
        let mut inner = self.inner.lock();
        if inner.stopped {
            drop(inner);
            w.expire();
            return;
        }
        for id in &w.ids {
            inner.by_id.entry(id.clone()).or_default().push(w.clone());
        }
        inner.deadlines.push(Deadline(Instant::now() + timeout, w));
        drop(inner);
        self.wake.notify_one();
    }

    /// Hands a final result to every client waiting for it.
    pub(crate) fn publish(&self, r: &TaskResult) {
        let waiters = self.inner.lock().by_id.remove(&r.id);
        for w in waiters.into_iter().flatten() {
            w.deliver(r);
        }
    }

    /// Number of ids with parked clients.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.inner.lock().by_id.len()
    }

    /// Answers every parked client now (shutdown).
    pub(crate) fn stop(&self) {
        let mut inner = self.inner.lock();
        inner.stopped = true;
        let all: Vec<Arc<Waiter>> = inner.deadlines.drain().map(|d| d.1).collect();
        inner.by_id.clear();
        drop(inner);
        self.wake.notify_one();
        for w in all {
            w.expire();
        }
    }

    fn expiry_loop(&self) {
        let mut inner = self.inner.lock();
        loop {
            if inner.stopped {
                return;
            }
            let now = Instant::now();
            match inner.deadlines.peek() {
                Some(d) if d.0 <= now => {
                    let Some(Deadline(_, w)) = inner.deadlines.pop() else {
                        continue;
                    };
                    for id in &w.ids {
                        if let Some(list) = inner.by_id.get_mut(id) {
                            list.retain(|o| !Arc::ptr_eq(o, &w));
                            if list.is_empty() {
                                inner.by_id.remove(id);
                            }
                        }
                    }
                    drop(inner);
                    w.expire();
                    inner = self.inner.lock();
                }
                Some(d) => {
                    let at = d.0;
                    self.wake.wait_until(&mut inner, at);
                }
                None => {
                    self.wake.wait_for(&mut inner, Duration::from_secs(3600));
                }
            }
        }
    }
}

/// What a client asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Found {
    Finished(TaskResult),
    /// Not finished: its id (the short form when `task-<id>` was asked) and state.
    Pending(String, State),
    /// Never seen, expired or dropped.
    Unknown,
}

/// Read access to results for the adapters: finished results and states from the store, and
/// waits for results still to come. Cheap to clone.
#[derive(Clone)]
pub struct Answers {
    results: Arc<Results>,
    store: Arc<dyn Store>,
}

impl Answers {
    pub(crate) fn new(results: Arc<Results>, store: Arc<dyn Store>) -> Answers {
        Answers { results, store }
    }

    /// The result or state of `asked`; `task-<id>` is accepted for `<id>`.
    pub(crate) fn find(&self, asked: &str) -> Result<Found, StoreError> {
        let found = self.find_exact(asked)?;
        if found == Found::Unknown {
            if let Some(short) = asked.strip_prefix("task-") {
                if let Ok(f @ (Found::Finished(_) | Found::Pending(..))) = self.find_exact(short) {
                    return Ok(f);
                }
            }
        }
        Ok(found)
    }

    /// The state first, then the result: a task's result is stored before it leaves the
    /// unfinished tasks, so a task finishing between the two reads is still found. (The other
    /// order answered "unknown" for a task that finished between the reads.)
    fn find_exact(&self, id: &str) -> Result<Found, StoreError> {
        if let Some(state) = self.store.status(id)? {
            return Ok(Found::Pending(id.to_string(), state));
        }
        Ok(match self.store.result(id)? {
            Some(r) => Found::Finished(r),
            None => Found::Unknown,
        })
    }

    /// The state of an unfinished task.
    pub(crate) fn state(&self, id: &str) -> Result<Option<State>, StoreError> {
        self.store.status(id)
    }

    /// Registers a wait for `ids`, which must not be able to finish before this call (call it
    /// once they are durable, before they are dispatched). The answer comes through the
    /// channel, within `timeout`: the finishing thread's send never blocks.
    pub(crate) fn watch(
        &self,
        ids: Vec<String>,
        timeout: Duration,
    ) -> Receiver<Vec<Option<TaskResult>>> {
        let (tx, rx) = bounded(1);
        self.results.wait_for(
            ids,
            timeout,
            Box::new(move |got| {
                let _ = tx.try_send(got);
            }),
        );
        rx
    }

    /// Waits up to `timeout` for the result of a task that may already be running (a long
    /// poll); `None` when it has not finished by then.
    pub(crate) fn wait_one(&self, id: &str, timeout: Duration) -> Option<TaskResult> {
        let rx = self.watch(vec![id.to_string()], timeout);
        // It may have finished between the caller's lookup and the registration.
        if let Ok(Some(r)) = self.store.result(id) {
            self.results.publish(&r);
        }
        rx.recv_timeout(timeout + WAIT_SLACK)
            .ok()
            .and_then(|g| g.into_iter().next().flatten())
    }

    /// Calls `respond` with each id's result as it finishes (or `None` after `timeout`).
    pub(crate) fn on_results(&self, ids: Vec<String>, timeout: Duration, respond: Responder) {
        self.results.wait_for(ids, timeout, respond);
    }
}

/// How long past its own deadline a wait waits for the registry's answer (which always comes;
/// this is a backstop).
pub(crate) const WAIT_SLACK: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;

    fn res(id: &str) -> TaskResult {
        crate::store::contract::result(id)
    }

    #[test]
    fn answers_when_all_arrive_or_on_timeout() {
        let (r, _) = Results::start().expect("start");
        let (tx, rx) = bounded(4);
        let t2 = tx.clone();
        r.wait_for(
            vec!["a".into(), "b".into()],
            Duration::from_secs(10),
            Box::new(move |got| t2.send(got).expect("send")),
        );
        r.publish(&res("a"));
        assert!(rx.try_recv().is_err(), "b still missing");
        r.publish(&res("b"));
        let got = rx.recv_timeout(Duration::from_secs(1)).expect("answered");
        assert_eq!(got, vec![Some(res("a")), Some(res("b"))]);

        r.wait_for(
            vec!["c".into()],
            Duration::from_millis(50),
            Box::new(move |got| tx.send(got).expect("send")),
        );
        let got = rx.recv_timeout(Duration::from_secs(2)).expect("timed out");
        assert_eq!(got, vec![None]);
        assert_eq!(r.waiting(), 0, "expired waiters are forgotten");
        r.publish(&res("c"));
        assert!(
            rx.recv_timeout(Duration::from_millis(50)).is_err(),
            "answered once"
        );
    }
}
