//! The timer thread: holds every waiting task's due time and hands each one to the dispatcher
//! at its time, never before.

use crate::clock::now_us;
use crate::dispatch::Pool;
use crate::store::{Due, Store};
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Most due tasks released with one store call.
const MAX_RELEASE: usize = 256;

enum Cmd {
    At(u64, Arc<str>),
    Many(Vec<(Arc<str>, u64)>),
    Stop,
}

/// Handle to the timer thread.
#[derive(Clone)]
pub(crate) struct Timer {
    tx: Sender<Cmd>,
}

impl Timer {
    /// Starts the timer thread.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        pool: Arc<Pool>,
    ) -> std::io::Result<(Timer, JoinHandle<()>)> {
        let (tx, rx) = unbounded();
        let h = crate::stage::spawn_critical("timer", move || run(&rx, &*store, &pool))?;
        Ok((Timer { tx }, h))
    }

    /// Releases task `id` at unix time `due_us` (at once if that has passed).
    pub(crate) fn schedule(&self, id: Arc<str>, due_us: u64) {
        if self.tx.send(Cmd::At(due_us, id)).is_err() {
            log::warn!("timer: stopped; a waiting task stays in the store for the next start");
        }
    }

    /// Releases many tasks at their times: one message, and the heap built in one go
    /// (recovery hands over a million at start).
    pub(crate) fn schedule_all(&self, items: Vec<(Arc<str>, u64)>) {
        if self.tx.send(Cmd::Many(items)).is_err() {
            log::warn!("timer: stopped; waiting tasks stay in the store for the next start");
        }
    }

    /// Stops the thread; waiting tasks stay in the store.
    pub(crate) fn stop(&self) {
        let _ = self.tx.send(Cmd::Stop);
    }
}

fn run(rx: &Receiver<Cmd>, store: &dyn Store, pool: &Pool) {
    let mut heap: BinaryHeap<Reverse<(u64, u64, Arc<str>)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut failed: HashMap<Arc<str>, u64> = HashMap::new();
    loop {
        let now = now_us();
        let cmd = match heap.peek() {
            Some(Reverse((due, _, _))) if *due <= now => {
                let mut ids = Vec::new();
                while ids.len() < MAX_RELEASE && heap.peek().is_some_and(|e| e.0 .0 <= now) {
                    if let Some(Reverse((due, _, id))) = heap.pop() {
                        ids.push((id, due));
                    }
                }
                release(store, pool, ids, &mut heap, &mut seq, &mut failed);
                // Take new commands too, so a flood of due tasks never starves intake.
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(_) => continue,
                }
            }
            Some(Reverse((due, _, _))) => match rx.recv_timeout(Duration::from_micros(due - now)) {
                Ok(c) => c,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            },
            None => match rx.recv() {
                Ok(c) => c,
                Err(_) => return,
            },
        };
        match cmd {
            Cmd::At(due, id) => {
                seq += 1;
                heap.push(Reverse((due, seq, id)));
            }
            Cmd::Many(items) => {
                let mut all = std::mem::take(&mut heap).into_vec();
                all.reserve(items.len());
                for (id, due) in items {
                    seq += 1;
                    all.push(Reverse((due, seq, id)));
                }
                heap = BinaryHeap::from(all);
            }
            Cmd::Stop => return,
        }
    }
}

/// Moves due tasks (id, due time) to worker queues; a store error retries that task a second
/// later, and the retry also takes it if the failed call had already marked it ready
/// (`again`). A retry asks for the task's own due time, kept in `failed`, not the retry's.
fn release(
    store: &dyn Store,
    pool: &Pool,
    due: Vec<Due>,
    heap: &mut BinaryHeap<Reverse<(u64, u64, Arc<str>)>>,
    seq: &mut u64,
    failed: &mut HashMap<Arc<str>, u64>,
) {
    let (mut fresh, mut again) = (Vec::new(), Vec::new());
    for (id, at) in due {
        match failed.get(&id) {
            Some(&first) => again.push((id, first)),
            None => fresh.push((id, at)),
        }
    }
    for (due, again) in [(fresh, false), (again, true)] {
        if due.is_empty() {
            continue;
        }
        let mut answers = store.take_due_many(&due, again).into_iter();
        for (id, due_us) in due {
            match answers.next() {
                Some(Ok(Some(task))) => {
                    failed.remove(&id);
                    pool.dispatch(Arc::new(task));
                }
                Some(Ok(None)) => {
                    // Cancelled, already handed out, or a stale entry.
                    failed.remove(&id);
                }
                Some(Err(e)) => retry_later(id, due_us, &e, heap, seq, failed),
                None => {
                    let e = crate::store::StoreError::Corrupt("no answer for this id".into());
                    retry_later(id, due_us, &e, heap, seq, failed);
                }
            }
        }
    }
}

fn retry_later(
    id: Arc<str>,
    due_us: u64,
    e: &crate::store::StoreError,
    heap: &mut BinaryHeap<Reverse<(u64, u64, Arc<str>)>>,
    seq: &mut u64,
    failed: &mut HashMap<Arc<str>, u64>,
) {
    log::error!("timer: cannot load due task {id}: {e}; trying again in 1 s");
    *seq += 1;
    heap.push(Reverse((now_us() + 1_000_000, *seq, id.clone())));
    failed.insert(id, due_us);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::task;
    use crate::store::StoreError;
    use crate::task::State;

    #[test]
    fn releases_at_due_time_never_before() {
        let store: Arc<dyn Store> = Arc::new(crate::store::memory::open());
        let pool = Arc::new(Pool::new(1));
        let (timer, h) = Timer::start(store.clone(), pool.clone()).expect("start");
        let due = now_us() + 100_000;
        store
            .insert(&[
                task("late", State::Delayed, due),
                task("soon", State::Delayed, due - 50_000),
            ])
            .expect("insert");
        timer.schedule(Arc::from("late"), due);
        timer.schedule(Arc::from("soon"), due - 50_000);
        let first = pool.next(0).expect("task");
        assert_eq!(first.id, "soon");
        assert!(now_us() >= due - 50_000, "never early");
        pool.done(0);
        let second = pool.next(0).expect("task");
        assert_eq!(second.id, "late");
        assert!(now_us() >= due, "never early");
        timer.stop();
        h.join().expect("join");
    }

    #[test]
    fn a_bulk_hand_over_merges_with_waiting_tasks_in_due_order() {
        let store: Arc<dyn Store> = Arc::new(crate::store::memory::open());
        let pool = Arc::new(Pool::new(1));
        let (timer, h) = Timer::start(store.clone(), pool.clone()).expect("start");
        let due = now_us() + 80_000;
        let ids = ["b", "a", "c"];
        let dues = [due + 20_000, due, due + 40_000];
        let tasks: Vec<_> = ids
            .iter()
            .zip(dues)
            .map(|(id, d)| task(id, State::Delayed, d))
            .collect();
        store.insert(&tasks).expect("insert");
        timer.schedule(Arc::from("b"), dues[0]);
        timer.schedule_all(vec![(Arc::from("c"), dues[2]), (Arc::from("a"), dues[1])]);
        for (id, d) in [("a", dues[1]), ("b", dues[0]), ("c", dues[2])] {
            let t = pool.next(0).expect("task");
            assert_eq!(t.id, id);
            assert!(now_us() >= d, "never early");
            pool.done(0);
        }
        timer.stop();
        h.join().expect("join");
    }

    /// A store whose first `take_due_many` does its work but loses the answer (as a Redis
    /// call whose reply times out would).
    struct LosesFirstAnswer {
        inner: Arc<dyn Store>,
        lost: std::sync::atomic::AtomicBool,
    }

    impl Store for LosesFirstAnswer {
        fn name(&self) -> &'static str {
            "lossy"
        }
        fn insert_many(&self, b: &[&[crate::task::Task]]) -> Vec<Result<(), StoreError>> {
            self.inner.insert_many(b)
        }
        fn take_due_many(
            &self,
            due: &[Due],
            again: bool,
        ) -> Vec<Result<Option<crate::task::Task>, StoreError>> {
            let answers = self.inner.take_due_many(due, again);
            if self.lost.swap(true, std::sync::atomic::Ordering::SeqCst) {
                answers
            } else {
                due.iter()
                    .map(|_| Err(StoreError::Unavailable("answer lost".into())))
                    .collect()
            }
        }
        fn claim(&self, t: &crate::task::Task) -> Result<bool, StoreError> {
            self.inner.claim(t)
        }
        fn record(&self, c: &[crate::store::Change]) -> Result<(), StoreError> {
            self.inner.record(c)
        }
        fn cancel(&self, id: &str, expires_ms: i64) -> Result<crate::store::Cancel, StoreError> {
            self.inner.cancel(id, expires_ms)
        }
        fn status(&self, id: &str) -> Result<Option<State>, StoreError> {
            self.inner.status(id)
        }
        fn result(&self, id: &str) -> Result<Option<crate::task::TaskResult>, StoreError> {
            self.inner.result(id)
        }
        fn recover(&self) -> Result<Vec<crate::store::Recovered>, StoreError> {
            self.inner.recover()
        }
        fn list(&self, q: &crate::store::ListQuery) -> Result<crate::store::Page, StoreError> {
            self.inner.list(q)
        }
        fn lookup(&self, id: &str) -> Result<Option<crate::store::Record>, StoreError> {
            self.inner.lookup(id)
        }
        fn revive(&self, id: &str, now_us: u64) -> Result<crate::store::Revive, StoreError> {
            self.inner.revive(id, now_us)
        }
        fn summary(&self, cap: usize) -> Result<crate::store::Summary, StoreError> {
            self.inner.summary(cap)
        }
        fn gc(&self, now_ms: i64, keep: usize) -> Result<usize, StoreError> {
            self.inner.gc(now_ms, keep)
        }

        fn results_stored(&self) -> Result<usize, StoreError> {
            self.inner.results_stored()
        }
        fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
            self.inner.get_meta(key)
        }
        fn put_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
            self.inner.put_meta(key, value)
        }
    }

    #[test]
    fn a_release_whose_answer_was_lost_is_retried_and_still_runs() {
        let inner: Arc<dyn Store> = Arc::new(crate::store::memory::open());
        let store: Arc<dyn Store> = Arc::new(LosesFirstAnswer {
            inner: inner.clone(),
            lost: std::sync::atomic::AtomicBool::new(false),
        });
        let pool = Arc::new(Pool::new(1));
        let (timer, h) = Timer::start(store.clone(), pool.clone()).expect("start");
        let due = now_us() + 20_000;
        store
            .insert(&[task("lost", State::Delayed, due)])
            .expect("insert");
        timer.schedule(Arc::from("lost"), due);
        // Fail rather than hang if the task never comes.
        let watchdog = pool.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(10));
            watchdog.stop();
        });
        // The first release marked it ready but its answer was lost; the retry a second later
        // takes it anyway.
        let t = pool.next(0).expect("the task after the retry, within 10 s");
        assert_eq!(t.id, "lost");
        assert!(now_us() >= due + 1_000_000, "handed out by the retry");
        assert!(store.claim(&t).expect("claim"), "and it can run");
        timer.stop();
        h.join().expect("join");
    }
}
