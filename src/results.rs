//! The clients waiting for results: `wait` submits, long polls and WebSocket pushes register
//! here and are handed their results by the thread that finishes the task (for a task another
//! node finishes, the `node-listen` thread), or by the expiry thread when their time runs out.
//! Handing over never writes to a socket: an HTTP wait blocks only its own connection's thread
//! on a channel. [`Answers`] is the adapters' read access.

use crate::store::{ListQuery, Page, Record, Store, StoreError};
use crate::task::State;
pub(crate) use crate::task::TaskResult;
use crossbeam_channel::{bounded, Receiver};
use parking_lot::{Condvar, Mutex};
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Called with each awaited result as it comes (a WebSocket's pushes); nothing when the wait
/// runs out.
pub(crate) type Pushes = Arc<dyn Fn(TaskResult) + Send + Sync>;

/// How a waiter answers.
enum Respond {
    /// Once, with every id's result (`wait` submits, long polls).
    All(Responder),
    /// Each result as it comes.
    Each(Pushes),
}

/// What `publish` calls once the registry's lock is let go.
enum Call {
    All(Responder, Vec<Option<TaskResult>>),
    Each(Pushes, TaskResult),
}

impl Call {
    fn run(self) {
        match self {
            Call::All(f, got) => f(got),
            Call::Each(f, r) => f(r),
        }
    }
}

/// A group of ids one client waits for.
struct Waiter {
    ids: Vec<String>,
    /// Set once it is answered or expired: its deadline entry is then dead weight.
    answered: AtomicBool,
    state: Mutex<WaiterState>,
}

struct WaiterState {
    got: Vec<Option<TaskResult>>,
    missing: usize,
    /// `None` once answered or expired.
    respond: Option<Respond>,
}

impl Waiter {
    /// Records the result of `self.ids[i]` (each id is delivered at most once: `publish`
    /// takes its entries). Returns what to call, and whether the wait is now answered.
    fn deliver(&self, i: usize, r: &TaskResult) -> (Option<Call>, bool) {
        let mut st = self.state.lock();
        st.missing = st.missing.saturating_sub(1);
        let done = st.missing == 0;
        if let Some(Respond::Each(f)) = &st.respond {
            let call = Call::Each(f.clone(), r.clone());
            if done {
                st.respond = None;
                self.answered.store(true, Ordering::Release);
            }
            return (Some(call), done);
        }
        if st.respond.is_none() {
            return (None, done);
        }
        if let Some(slot) = st.got.get_mut(i) {
            *slot = Some(r.clone());
        }
        if !done {
            return (None, false);
        }
        let call = match st.respond.take() {
            Some(Respond::All(f)) => Some(Call::All(f, std::mem::take(&mut st.got))),
            _ => None,
        };
        self.answered.store(true, Ordering::Release);
        (call, true)
    }

    /// Answers with what has arrived (timeout or shutdown).
    fn expire(&self) {
        self.answered.store(true, Ordering::Release);
        let mut st = self.state.lock();
        if let Some(Respond::All(f)) = st.respond.take() {
            let got = std::mem::take(&mut st.got);
            drop(st);
            f(got);
        }
    }
}

/// A waiter's deadline; the heap gives the earliest first.
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

/// Fewest deadline entries worth a compaction.
const COMPACT_AT: usize = 64;

#[derive(Default)]
struct Inner {
    /// Each awaited id: its waiters, and its place in each one's `ids`.
    by_id: HashMap<String, Vec<(Arc<Waiter>, usize)>>,
    /// Every waiter by deadline. An answered one stays until its deadline or the next
    /// compaction, which comes once answered ones outnumber the `live` ones (so this holds at
    /// most about twice what is awaited, not a day of answered WebSocket waits).
    deadlines: BinaryHeap<Deadline>,
    /// Waiters not yet answered nor expired.
    live: usize,
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
        self.park(ids, timeout, Respond::All(respond));
    }

    /// Hands each result of `ids` to `push` as it comes, for up to `timeout`; the same rule
    /// as [`Results::wait_for`] on when to call it. One registration for many ids.
    pub(crate) fn push_each(&self, ids: Vec<String>, timeout: Duration, push: Pushes) {
        self.park(ids, timeout, Respond::Each(push));
    }

    fn park(&self, ids: Vec<String>, timeout: Duration, respond: Respond) {
        let n = ids.len();
        let mut inner = self.inner.lock();
        let all = matches!(respond, Respond::All(_));
        let w = Arc::new(Waiter {
            ids,
            answered: AtomicBool::new(false),
            state: Mutex::new(WaiterState {
                got: if all { vec![None; n] } else { Vec::new() },
                missing: n,
                respond: Some(respond),
            }),
        });
        if inner.stopped {
            drop(inner);
            w.expire();
            return;
        }
        for (i, id) in w.ids.iter().enumerate() {
            inner
                .by_id
                .entry(id.clone())
                .or_default()
                .push((w.clone(), i));
        }
        let at = Instant::now() + timeout;
        let first = inner.deadlines.peek().is_none_or(|d| at < d.0);
        inner.deadlines.push(Deadline(at, w));
        inner.live += 1;
        drop(inner);
        if first {
            self.wake.notify_one();
        }
    }

    /// Hands a final result to every client waiting for it. Answered waits leave the registry
    /// at once; the clients are called once its lock is let go.
    pub(crate) fn publish(&self, r: &TaskResult) {
        let mut calls = Vec::new();
        {
            let mut inner = self.inner.lock();
            let Some(list) = inner.by_id.remove(&r.id) else {
                return;
            };
            for (w, i) in list {
                let (call, done) = w.deliver(i, r);
                if done {
                    inner.live = inner.live.saturating_sub(1);
                }
                calls.extend(call);
            }
            if inner.deadlines.len() > COMPACT_AT.max(2 * inner.live) {
                inner
                    .deadlines
                    .retain(|d| !d.1.answered.load(Ordering::Acquire));
            }
        }
        for c in calls {
            c.run();
        }
    }

    /// Whether a client waits for `id`.
    pub(crate) fn awaits(&self, id: &str) -> bool {
        self.inner.lock().by_id.contains_key(id)
    }

    /// Every id a client waits for.
    pub(crate) fn awaited(&self) -> Vec<String> {
        self.inner.lock().by_id.keys().cloned().collect()
    }

    /// Number of ids with parked clients.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.inner.lock().by_id.len()
    }

    /// Waits not answered yet, and deadline entries held (answered ones included).
    #[cfg(test)]
    fn deadlines(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.live, inner.deadlines.len())
    }

    /// Answers every parked client now (shutdown).
    pub(crate) fn stop(&self) {
        let mut inner = self.inner.lock();
        inner.stopped = true;
        let all = std::mem::take(&mut inner.deadlines);
        inner.by_id.clear();
        drop(inner);
        self.wake.notify_one();
        for Deadline(_, w) in all {
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
            match inner.deadlines.peek().map(|d| d.0) {
                Some(at) if at <= now => {
                    let Some(Deadline(_, w)) = inner.deadlines.pop() else {
                        continue;
                    };
                    if w.answered.load(Ordering::Acquire) {
                        continue;
                    }
                    inner.live = inner.live.saturating_sub(1);
                    for id in &w.ids {
                        if let Some(list) = inner.by_id.get_mut(id) {
                            list.retain(|(o, _)| !Arc::ptr_eq(o, &w));
                            if list.is_empty() {
                                inner.by_id.remove(id);
                            }
                        }
                    }
                    drop(inner);
                    w.expire();
                    inner = self.inner.lock();
                }
                Some(at) => {
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

    /// A page of the tasks in one state (`GET /tasks`).
    pub(crate) fn list(&self, q: &ListQuery) -> Result<Page, StoreError> {
        self.store.list(q)
    }

    /// Everything stored about one task (`GET /task/{id}`); `task-<id>` is accepted for `<id>`,
    /// as by `find`.
    pub(crate) fn lookup(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let found = self.store.lookup(id)?;
        if found.is_none() {
            if let Some(short) = id.strip_prefix("task-") {
                return self.store.lookup(short);
            }
        }
        Ok(found)
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

    /// Answers the clients waiting for any of `ids` (separated by spaces), which another node
    /// finished or cancelled: each result is read from the store, only for ids waited for here.
    pub(crate) fn wake(&self, ids: &str) -> Result<(), StoreError> {
        for id in ids.split(' ') {
            if self.results.awaits(id) {
                self.deliver(id)?;
            }
        }
        Ok(())
    }

    /// Looks up every id waited for here and answers those finished (after the subscription
    /// to the other nodes' results was down: what they finished meanwhile was not heard).
    pub(crate) fn recheck(&self) -> Result<(), StoreError> {
        for id in self.results.awaited() {
            self.deliver(&id)?;
        }
        Ok(())
    }

    /// Hands the stored result of `id`, if it has finished, to those waiting for it.
    fn deliver(&self, id: &str) -> Result<(), StoreError> {
        if let Some(r) = self.store.result(id)? {
            self.results.publish(&r);
        }
        Ok(())
    }

    /// Calls `push` with each id's result as it finishes, for up to `timeout` (one
    /// registration for all of `ids`; the same rule as [`Answers::watch`] on when to call it).
    pub(crate) fn push_each(&self, ids: Vec<String>, timeout: Duration, push: Pushes) {
        self.results.push_each(ids, timeout, push);
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

    /// Answered waits leave the registry: their ids at once, their deadlines by the next
    /// compaction (a WebSocket's waits last a day; keeping each answered one until then held
    /// every task a connection ever sent in memory for a day).
    #[test]
    fn answered_waits_are_forgotten() {
        let (r, _) = Results::start().expect("start");
        let (tx, rx) = crossbeam_channel::unbounded();
        let day = Duration::from_secs(24 * 3600);
        let t2 = tx.clone();
        r.wait_for(
            vec!["a".into(), "b".into()],
            day,
            Box::new(move |got| t2.send(got).expect("send")),
        );
        r.publish(&res("a"));
        assert_eq!((r.waiting(), r.deadlines().0), (1, 1), "b still awaited");
        r.publish(&res("b"));
        assert_eq!(rx.try_recv().expect("answered").len(), 2);
        for i in 0..1000 {
            let t = tx.clone();
            r.wait_for(
                vec![format!("t{i}")],
                day,
                Box::new(move |got| t.send(got).expect("send")),
            );
        }
        for i in 0..1000 {
            r.publish(&res(&format!("t{i}")));
        }
        assert_eq!(rx.try_iter().count(), 1000);
        let (live, held) = r.deadlines();
        assert_eq!((r.waiting(), live), (0, 0), "nothing awaited");
        assert!(
            held <= COMPACT_AT,
            "{held} deadlines of answered waits still held"
        );
    }

    /// One registration pushes each result as it comes, once, and is forgotten when the last
    /// one has gone out; a registration that runs out pushes nothing more.
    #[test]
    fn pushes_each_result_as_it_comes_then_is_forgotten() {
        let (r, _) = Results::start().expect("start");
        let (tx, rx) = crossbeam_channel::unbounded();
        let push: Pushes = Arc::new(move |got: TaskResult| {
            let _ = tx.send(got.id);
        });
        r.push_each(
            vec!["a".into(), "b".into()],
            Duration::from_secs(3600),
            push.clone(),
        );
        r.publish(&res("b"));
        assert_eq!(rx.try_recv().ok().as_deref(), Some("b"));
        assert_eq!((r.waiting(), r.deadlines().0), (1, 1), "a still awaited");
        r.publish(&res("b"));
        assert!(rx.try_recv().is_err(), "b is pushed once");
        r.publish(&res("a"));
        assert_eq!(rx.try_recv().ok().as_deref(), Some("a"));
        assert_eq!((r.waiting(), r.deadlines().0), (0, 0), "nothing awaited");

        r.push_each(vec!["c".into()], Duration::from_millis(50), push);
        let deadline = Instant::now() + Duration::from_secs(5);
        while r.waiting() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            (r.waiting(), r.deadlines().0),
            (0, 0),
            "expired and forgotten"
        );
        r.publish(&res("c"));
        assert!(
            rx.try_recv().is_err(),
            "nothing pushed after the wait ran out"
        );
    }
}
