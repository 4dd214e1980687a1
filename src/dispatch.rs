//! The cc-aware dispatcher: one queue per worker, each task sent to the allowed worker with the
//! least work (queued + running), and an idle worker takes a waiting task it is allowed to run
//! from another worker's queue, so no task waits behind a long one while an allowed worker idles.
//! While paused, workers take nothing: tasks still queue up, and a resume wakes every worker.
//! A worker whose cc slot another node holds (several nodes on one Redis) puts the task back
//! first in its queue and runs only tasks without cc until its wait ends.

use crate::task::Task;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::Thread;
use std::time::{Duration, Instant};

/// One worker's share of the pool state.
#[derive(Default)]
struct Slot {
    queue: VecDeque<Arc<Task>>,
    running: Option<Arc<str>>,
    /// Until then this worker's cc slot is held by another node: it takes no task with cc.
    held_until: Option<Instant>,
}

struct State {
    slots: Vec<Slot>,
    stopping: bool,
    /// Workers take no task while set (`POST /pause`); queues still fill.
    paused: bool,
    /// The thread that takes other nodes' tasks (`node-steal`) while it waits for a worker to
    /// run out of work: the next one that does unparks it (a node alone never sets it).
    idle_waiter: Option<Thread>,
}

/// Per-worker load, for `/sys_info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Load {
    pub(crate) id: usize,
    pub(crate) queued: usize,
    pub(crate) running: Option<String>,
}

/// The worker queues and their wake-ups.
pub(crate) struct Pool {
    state: Mutex<State>,
    wake: Vec<Condvar>,
}

fn allowed(task: &Task, worker: usize) -> bool {
    task.cc.is_empty() || task.cc.contains(&worker)
}

/// Whether a worker may take `task` now: any task, or while its slot is `held`, one without cc.
fn free(task: &Task, held: bool) -> bool {
    !held || task.cc.is_empty()
}

impl Pool {
    pub(crate) fn new(workers: usize) -> Pool {
        Pool {
            state: Mutex::new(State {
                slots: (0..workers).map(|_| Slot::default()).collect(),
                stopping: false,
                paused: false,
                idle_waiter: None,
            }),
            wake: (0..workers).map(|_| Condvar::new()).collect(),
        }
    }

    /// Queues a ready task on the allowed worker with the least work; returns that worker.
    pub(crate) fn dispatch(&self, task: Arc<Task>) -> usize {
        let mut st = self.state.lock();
        let n = st.slots.len();
        let load = |s: &Slot| s.queue.len() + usize::from(s.running.is_some());
        let best = if task.cc.is_empty() {
            (0..n).min_by_key(|&w| load(&st.slots[w]))
        } else {
            task.cc
                .iter()
                .copied()
                .filter(|&w| w < n)
                .min_by_key(|&w| load(&st.slots[w]))
        };
        // Validation refuses cc outside 0..n; a task from an older config still runs somewhere.
        let w = best.unwrap_or(0);
        st.slots[w].queue.push_back(task);
        drop(st);
        self.wake[w].notify_one();
        w
    }

    /// Blocks until worker `w` has a task to run (its own, or one it may take from another
    /// queue), and marks it running; waits while the pool is paused. `None` once the pool is
    /// stopping (paused or not).
    pub(crate) fn next(&self, w: usize) -> Option<Arc<Task>> {
        let mut st = self.state.lock();
        loop {
            if st.stopping {
                return None;
            }
            if st.paused {
                self.wake[w].wait(&mut st);
                continue;
            }
            let until = st.slots[w].held_until.filter(|&t| Instant::now() < t);
            st.slots[w].held_until = until;
            let found = Self::find(&st, w, until.is_some());
            if let Some(t) = found.and_then(|(o, i)| st.slots[o].queue.remove(i)) {
                st.slots[w].running = Some(Arc::from(t.id.as_str()));
                return Some(t);
            }
            match until {
                Some(t) => {
                    self.wake[w].wait_until(&mut st, t);
                }
                None => {
                    if let Some(t) = st.idle_waiter.take() {
                        t.unpark();
                    }
                    self.wake[w].wait(&mut st);
                }
            }
        }
    }

    /// Worker `w` could not start `task`: another node holds its cc slot. The task goes back
    /// first in `w`'s queue (before the tasks queued after it), `w` takes no task with cc for
    /// `wait`, and the other workers `task` may run on are woken to take it meanwhile.
    pub(crate) fn held_elsewhere(&self, w: usize, task: Arc<Task>, wait: Duration) {
        let mut st = self.state.lock();
        // Woken now, they take it once this lock is released.
        for &o in &task.cc {
            if o != w {
                if let Some(c) = self.wake.get(o) {
                    c.notify_one();
                }
            }
        }
        if let Some(slot) = st.slots.get_mut(w) {
            slot.running = None;
            slot.held_until = Some(Instant::now() + wait);
            slot.queue.push_front(task);
        }
    }

    /// Where the task worker `w` takes next is (queue, position): the first of its own queue
    /// it may start, else the oldest it may run in the busiest other queue; only tasks without
    /// cc while its slot is `held`.
    fn find(st: &State, w: usize, held: bool) -> Option<(usize, usize)> {
        if let Some(i) = st.slots[w].queue.iter().position(|t| free(t, held)) {
            return Some((w, i));
        }
        let mut order: Vec<usize> = (0..st.slots.len()).filter(|&o| o != w).collect();
        // Busiest first; equal ones by number (an unstable sort of unique keys: the binary
        // keeps one sort of these fewer).
        order.sort_unstable_by_key(|&o| (std::cmp::Reverse(st.slots[o].queue.len()), o));
        order.into_iter().find_map(|o| {
            let q = &st.slots[o].queue;
            let pos = q.iter().position(|t| allowed(t, w) && free(t, held))?;
            Some((o, pos))
        })
    }

    /// The workers that could start a task now and find none queued that they may run: what
    /// this node may take from the other nodes (a task without cc for any of them, one with cc
    /// for one of them it names). A worker of a node whose queues hold only other workers' cc
    /// tasks counts. When none (every worker runs or has work, or the pool is paused or
    /// stopping), the calling thread is unparked by the next worker that runs out of work.
    pub(crate) fn idle(&self) -> Vec<usize> {
        let mut st = self.state.lock();
        let now = Instant::now();
        let idle: Vec<usize> = if st.paused || st.stopping {
            Vec::new()
        } else {
            (0..st.slots.len())
                .filter(|&w| {
                    let held = st.slots[w].held_until.is_some_and(|t| now < t);
                    st.slots[w].running.is_none() && Self::find(&st, w, held).is_none()
                })
                .collect()
        };
        if idle.is_empty() {
            st.idle_waiter = Some(std::thread::current());
        }
        idle
    }

    /// Worker `w` finished its attempt.
    pub(crate) fn done(&self, w: usize) {
        self.state.lock().slots[w].running = None;
    }

    /// Drops a queued task (cancelled); true when it was queued.
    pub(crate) fn remove(&self, id: &str) -> bool {
        let mut st = self.state.lock();
        for s in st.slots.iter_mut() {
            if let Some(pos) = s.queue.iter().position(|t| t.id == id) {
                s.queue.remove(pos);
                return true;
            }
        }
        false
    }

    /// Queue length and running id per worker.
    pub(crate) fn loads(&self) -> Vec<Load> {
        let st = self.state.lock();
        st.slots
            .iter()
            .enumerate()
            .map(|(id, s)| Load {
                id,
                queued: s.queue.len(),
                running: s.running.as_deref().map(str::to_string),
            })
            .collect()
    }

    /// Stops handing out tasks; queued ones stay in the store for the next start.
    pub(crate) fn stop(&self) {
        self.state.lock().stopping = true;
        for c in &self.wake {
            c.notify_all();
        }
    }

    /// Pauses (workers finish their attempt, then take nothing) or resumes (every worker is
    /// woken to take what queued up meanwhile).
    pub(crate) fn set_paused(&self, paused: bool) {
        self.state.lock().paused = paused;
        if !paused {
            for c in &self.wake {
                c.notify_all();
            }
        }
    }

    /// Whether workers are paused.
    pub(crate) fn paused(&self) -> bool {
        self.state.lock().paused
    }

    /// Number of workers (`--workers`).
    pub(crate) fn workers(&self) -> usize {
        self.wake.len()
    }

    /// Number of workers running an attempt.
    pub(crate) fn running(&self) -> usize {
        self.state
            .lock()
            .slots
            .iter()
            .filter(|s| s.running.is_some())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::task;
    use crate::task::State;

    fn t(id: &str, cc: &[usize]) -> Arc<Task> {
        let mut t = task(id, State::Ready, 0);
        t.cc = cc.to_vec();
        Arc::new(t)
    }

    #[test]
    fn least_work_among_allowed_workers() {
        let p = Pool::new(4);
        assert_eq!(p.dispatch(t("a", &[])), 0);
        assert_eq!(p.dispatch(t("b", &[])), 1);
        assert_eq!(p.dispatch(t("c", &[1, 3])), 3);
        assert_eq!(p.dispatch(t("d", &[1, 3])), 1);
        assert_eq!(p.dispatch(t("e", &[2])), 2);
        assert_eq!(p.dispatch(t("f", &[2])), 2);
        let loads: Vec<usize> = p.loads().iter().map(|l| l.queued).collect();
        assert_eq!(loads, vec![1, 2, 2, 1]);
    }

    #[test]
    fn idle_worker_takes_only_allowed_tasks_from_others() {
        let p = Pool::new(3);
        p.dispatch(t("long", &[0, 1]));
        assert_eq!(p.next(0).map(|t| t.id.clone()), Some("long".into()));
        // Worker 0 is busy, worker 1 idle but its queue empty: queue two on worker 0.
        let p2 = Pool::new(3);
        {
            let mut st = p2.state.lock();
            st.slots[0].running = Some(Arc::from("long"));
            st.slots[0].queue.push_back(t("only0", &[0]));
            st.slots[0].queue.push_back(t("for1", &[0, 1]));
        }
        assert_eq!(p2.next(1).map(|t| t.id.clone()), Some("for1".into()));
        assert_eq!(p2.loads()[0].queued, 1, "worker 1 may not take only0");
        assert!(p2.remove("only0"));
        assert!(!p2.remove("only0"));
        p2.stop();
        assert!(p2.next(2).is_none());
    }

    #[test]
    fn running_counts_an_attempt_from_next_until_done() {
        let p = Pool::new(2);
        assert_eq!(p.running(), 0);
        p.dispatch(t("a", &[]));
        let a = p.next(0).expect("a");
        assert_eq!(p.running(), 1, "a is running");
        assert_eq!(p.loads()[0].running.as_deref(), Some(a.id.as_str()));
        p.done(0);
        assert_eq!(p.running(), 0, "a is done");
        assert_eq!(p.loads()[0].running, None);
    }

    #[test]
    fn a_paused_pool_hands_out_nothing_until_resumed_and_still_stops() {
        let p = Arc::new(Pool::new(1));
        p.set_paused(true);
        assert!(p.paused());
        p.dispatch(t("held", &[]));
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = {
            let p = p.clone();
            std::thread::spawn(move || {
                while let Some(t) = p.next(0) {
                    let _ = tx.send(t.id.clone());
                    p.done(0);
                }
            })
        };
        let wait = std::time::Duration::from_millis(200);
        assert!(
            rx.recv_timeout(wait).is_err(),
            "a paused pool handed out a task"
        );
        assert_eq!(p.loads()[0].queued, 1);
        p.set_paused(false);
        assert_eq!(rx.recv_timeout(wait * 25).ok().as_deref(), Some("held"));
        p.set_paused(true);
        p.stop();
        assert!(worker.join().is_ok(), "the paused worker saw the stop");
    }

    /// `idle` counts the workers that could start a task only while nothing is queued and the
    /// pool is neither paused nor stopping; a thread that found none is unparked by the next
    /// worker that runs out of work, once.
    #[test]
    fn idle_workers_are_counted_only_with_nothing_queued_and_the_asker_is_woken() {
        let p = Arc::new(Pool::new(2));
        assert_eq!(p.idle().len(), 2);
        assert!(
            p.state.lock().idle_waiter.is_none(),
            "found some: no wake-up"
        );
        p.dispatch(t("a", &[]));
        assert_eq!(p.idle().len(), 0, "a task is queued");
        assert_eq!(p.next(0).map(|t| t.id.clone()), Some("a".into()));
        assert_eq!(p.idle().len(), 1, "worker 0 runs, worker 1 idles");
        p.set_paused(true);
        assert_eq!(p.idle().len(), 0, "paused");
        p.set_paused(false);
        assert!(
            p.state.lock().idle_waiter.is_some(),
            "found none: woken later"
        );
        let worker = {
            let p = p.clone();
            std::thread::spawn(move || while p.next(1).is_some() {})
        };
        // Worker 1 finds nothing and waits: it unparks this thread, once.
        for _ in 0..100 {
            if p.state.lock().idle_waiter.is_none() {
                break;
            }
            std::thread::park_timeout(Duration::from_millis(100));
        }
        assert!(
            p.state.lock().idle_waiter.is_none(),
            "the idle worker woke the asker"
        );
        p.stop();
        assert_eq!(p.idle().len(), 0, "stopping");
        assert!(worker.join().is_ok());
    }

    /// Queued cc tasks of other workers do not stop a worker from counting as idle: a node
    /// with a backlog for its worker 0 still takes other nodes' work for the others.
    #[test]
    fn a_worker_with_only_other_workers_cc_tasks_queued_counts_as_idle() {
        let p = Pool::new(3);
        p.dispatch(t("run", &[0]));
        assert_eq!(p.next(0).map(|t| t.id.clone()), Some("run".into()));
        p.dispatch(t("wait-0", &[0]));
        assert_eq!(p.idle().len(), 2, "workers 1 and 2 may not run wait-0");
        p.dispatch(t("wait-1", &[1]));
        assert_eq!(p.idle().len(), 1, "worker 1 has wait-1");
        p.dispatch(t("any", &[]));
        assert_eq!(p.idle().len(), 0, "any worker may run any");
    }

    /// A cc task whose slot another node holds goes back first in its worker's queue: that
    /// worker runs a task without cc meanwhile, another worker of its cc takes it at once, and
    /// its own worker takes it again once the wait has passed, before later cc tasks.
    #[test]
    fn a_task_whose_slot_is_held_elsewhere_waits_first_in_line_without_holding_up_others() {
        let p = Pool::new(3);
        p.dispatch(t("held", &[0]));
        let held = p.next(0).expect("held");
        p.dispatch(t("later", &[0]));
        {
            let mut st = p.state.lock();
            let later = st.slots[0].queue.pop_front().expect("later");
            st.slots[0].queue.push_back(t("plain", &[]));
            st.slots[0].queue.push_back(later);
        }
        p.held_elsewhere(0, held, Duration::from_secs(60));
        assert_eq!(p.running(), 0);
        let ids = |p: &Pool| -> Vec<String> {
            p.state.lock().slots[0]
                .queue
                .iter()
                .map(|t| t.id.clone())
                .collect()
        };
        assert_eq!(ids(&p), ["held", "plain", "later"]);
        assert_eq!(p.next(0).map(|t| t.id.clone()), Some("plain".into()));
        p.done(0);
        // The wait has passed.
        p.state.lock().slots[0].held_until = Some(Instant::now());
        assert_eq!(p.next(0).map(|t| t.id.clone()), Some("held".into()));
        p.done(0);
        assert_eq!(p.next(0).map(|t| t.id.clone()), Some("later".into()));
        p.done(0);

        p.dispatch(t("either", &[0, 1]));
        let either = p.next(0).expect("either");
        p.held_elsewhere(0, either, Duration::from_secs(60));
        assert_eq!(
            p.next(1).map(|t| t.id.clone()),
            Some("either".into()),
            "another worker of its cc takes it"
        );
    }

    #[test]
    fn a_cc_naming_only_workers_beyond_the_pool_runs_on_worker_0() {
        // Validation refuses such a cc, but a task stored under a config with more workers
        // still runs after a restart with fewer.
        let p = Pool::new(2);
        assert_eq!(p.dispatch(t("old", &[2])), 0);
        assert_eq!(p.dispatch(t("older", &[5, 2])), 0);
        assert_eq!(p.loads()[0].queued, 2);
    }
}
