//! The timer thread: holds every waiting task's due time and hands each one to the dispatcher
//! at its time, never before.

use crate::clock::now_us;
use crate::dispatch::Pool;
use crate::store::Store;
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
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
pub struct Timer {
    tx: Sender<Cmd>,
}

impl Timer {
    /// Starts the timer thread.
    pub fn start(
        store: Arc<dyn Store>,
        pool: Arc<Pool>,
    ) -> std::io::Result<(Timer, JoinHandle<()>)> {
        let (tx, rx) = unbounded();
        let h = thread::Builder::new()
            .name("timer".into())
            .spawn(move || run(&rx, &*store, &pool))?;
        Ok((Timer { tx }, h))
    }

    /// Releases task `id` at unix time `due_us` (at once if that has passed).
    pub fn schedule(&self, id: Arc<str>, due_us: u64) {
        if self.tx.send(Cmd::At(due_us, id)).is_err() {
            log::warn!("timer: stopped; a waiting task stays in the store for the next start");
        }
    }

    /// Releases many tasks at their times: one message, and the heap built in one go
    /// (recovery hands over a million at start).
    pub fn schedule_all(&self, items: Vec<(Arc<str>, u64)>) {
        if self.tx.send(Cmd::Many(items)).is_err() {
            log::warn!("timer: stopped; waiting tasks stay in the store for the next start");
        }
    }

    /// Stops the thread; waiting tasks stay in the store.
    pub fn stop(&self) {
        let _ = self.tx.send(Cmd::Stop);
    }
}

fn run(rx: &Receiver<Cmd>, store: &dyn Store, pool: &Pool) {
    let mut heap: BinaryHeap<Reverse<(u64, u64, Arc<str>)>> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let now = now_us();
        let cmd = match heap.peek() {
            Some(Reverse((due, _, _))) if *due <= now => {
                let mut ids = Vec::new();
                while ids.len() < MAX_RELEASE && heap.peek().is_some_and(|e| e.0 .0 <= now) {
                    if let Some(Reverse((_, _, id))) = heap.pop() {
                        ids.push(id);
                    }
                }
                release(store, pool, ids, &mut heap, &mut seq);
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

/// Moves due tasks to worker queues; a store error retries that task a second later.
fn release(
    store: &dyn Store,
    pool: &Pool,
    ids: Vec<Arc<str>>,
    heap: &mut BinaryHeap<Reverse<(u64, u64, Arc<str>)>>,
    seq: &mut u64,
) {
    let answers = store.take_due_many(&ids);
    for (id, answer) in ids.into_iter().zip(answers) {
        match answer {
            Ok(Some(task)) => {
                pool.dispatch(Arc::new(task));
            }
            Ok(None) => {} // cancelled, or already handed out
            Err(e) => {
                log::error!("timer: cannot load due task {id}: {e}; trying again in 1 s");
                *seq += 1;
                heap.push(Reverse((now_us() + 1_000_000, *seq, id)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::task;
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
}
