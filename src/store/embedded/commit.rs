//! Group commit on the callers' own threads: each caller queues its ops, and the one whose turn
//! it is commits every queued batch (one synchronous journal append), answers the others
//! and hands the turn to the oldest caller still waiting. A caller sleeps only while another
//! caller's commit holds its ops, and no thread wakes up only to commit: with one writer
//! thread, every commit cost two more context switches (waking it, and it waking the caller).
//! A write that is only started (`push_started`: its caller waits later, or on another thread)
//! takes the turn only once its caller waits for it: holding the turn before would hold every
//! later commit until then.

use super::super::local::Op;
use super::super::StoreError;
use super::{unavailable, MAX_BATCH};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One caller's ops, and where its answer goes.
pub(super) struct Batch {
    pub(super) ops: Vec<Op>,
    pub(super) done: Reply,
}

/// The commit queue.
#[derive(Default)]
pub(super) struct Commits {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    batches: VecDeque<Batch>,
    /// A caller has the turn: it commits what is queued, or it is told to and will.
    turn_taken: bool,
    /// The store is closing: no more batches.
    closed: bool,
}

/// What a caller waiting on its [`Ack`] is told.
#[derive(Debug, PartialEq)]
pub(super) enum Answer {
    Waiting,
    /// Its turn: it commits the queue.
    Lead,
    /// Its batch was committed (or refused).
    Done(Result<(), StoreError>),
}

/// Where one caller sleeps until its answer. A mutex and a condvar: a channel's receive spins
/// and yields first, which on two cores takes time from the committing thread.
pub(super) struct Ack {
    pub(super) slot: Mutex<Answer>,
    ready: Condvar,
    /// Its caller waits for it (so it can be given the turn); set under the queue's lock.
    waiting: AtomicBool,
}

impl Ack {
    fn new(waiting: bool) -> Ack {
        Ack {
            slot: Mutex::new(Answer::Waiting),
            ready: Condvar::new(),
            waiting: AtomicBool::new(waiting),
        }
    }

    /// An answer slot of a caller that waits for it now.
    pub(super) fn waited() -> Ack {
        Ack::new(true)
    }

    /// Sleeps until there is an answer, and takes it.
    pub(super) fn wait(&self) -> Answer {
        let mut slot = self.slot.lock();
        loop {
            match std::mem::replace(&mut *slot, Answer::Waiting) {
                Answer::Waiting => self.ready.wait(&mut slot),
                other => return other,
            }
        }
    }

    /// Sleeps until its batch is answered or `until`, and takes that answer: a batch whose
    /// caller does not wait yet is never given the turn, so only `Done` can come.
    fn wait_done_until(&self, until: Instant) -> Option<Result<(), StoreError>> {
        let mut slot = self.slot.lock();
        while matches!(*slot, Answer::Waiting) {
            if self.ready.wait_until(&mut slot, until).timed_out() {
                break;
            }
        }
        match std::mem::replace(&mut *slot, Answer::Waiting) {
            Answer::Done(r) => Some(r),
            _ => None,
        }
    }

    fn done(&self) -> bool {
        matches!(*self.slot.lock(), Answer::Done(_))
    }

    fn tell(&self, a: Answer) {
        *self.slot.lock() = a;
        self.ready.notify_one();
    }
}

/// The committing side of an `Ack`; dropped unanswered (the store stopped), it answers
/// `Unavailable`, so no caller waits forever.
pub(super) struct Reply(pub(super) Option<Arc<Ack>>);

impl Reply {
    pub(super) fn send(mut self, r: Result<(), StoreError>) {
        if let Some(ack) = self.0.take() {
            ack.tell(Answer::Done(r));
        }
    }

    fn waiting(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|a| a.waiting.load(Ordering::Relaxed))
    }

    fn lead(&self) {
        if let Some(ack) = &self.0 {
            ack.tell(Answer::Lead);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(ack) = self.0.take() {
            ack.tell(Answer::Done(Err(unavailable(
                "the writer thread has stopped",
            ))));
        }
    }
}

impl Commits {
    /// Queues `ops` for a caller that waits for them now: it passes the `Ack` to
    /// [`Commits::wait`] at once (it may have the turn).
    pub(super) fn push(&self, ops: Vec<Op>) -> Result<Arc<Ack>, StoreError> {
        self.push_with(ops, true, false)
    }

    /// Queues `ops` for a caller that waits for them later, or on another thread, with
    /// [`Commits::wait_started`]; until then they go with the next round another caller makes.
    pub(super) fn push_started(&self, ops: Vec<Op>) -> Result<Arc<Ack>, StoreError> {
        self.push_with(ops, false, false)
    }

    /// Queues the last batch, waited for at once: every later push is refused. Once it is
    /// answered, every batch queued before it has been committed.
    pub(super) fn push_last(&self) -> Result<Arc<Ack>, StoreError> {
        self.push_with(Vec::new(), true, true)
    }

    fn push_with(&self, ops: Vec<Op>, waiting: bool, last: bool) -> Result<Arc<Ack>, StoreError> {
        let ack = Arc::new(Ack::new(waiting));
        let mut q = self.queue.lock();
        if q.closed {
            return Err(unavailable("the store is closed"));
        }
        q.closed = last;
        if waiting && !q.turn_taken {
            q.turn_taken = true;
            *ack.slot.lock() = Answer::Lead;
        }
        q.batches.push_back(Batch {
            ops,
            done: Reply(Some(ack.clone())),
        });
        Ok(ack)
    }

    /// Waits for a batch queued with `push_started`: first, for up to `patience`, only for
    /// another caller's round to take it; from then on it can be given the turn, and it takes
    /// the turn at once when nobody has it and its batch is still queued.
    pub(super) fn wait_started(
        &self,
        ack: &Ack,
        patience: Duration,
        commit: &(dyn Fn(Vec<Batch>) + Sync),
    ) -> Result<(), StoreError> {
        if !patience.is_zero() {
            if let Some(r) = ack.wait_done_until(Instant::now() + patience) {
                return r;
            }
        }
        {
            let mut q = self.queue.lock();
            ack.waiting.store(true, Ordering::Relaxed);
            // A batch is answered before the turn that took it is handed on.
            if !q.turn_taken && !ack.done() {
                q.turn_taken = true;
                ack.tell(Answer::Lead);
            }
        }
        self.wait(ack, commit)
    }

    /// Waits for the answer to the batch `ack` was given for; when the turn comes to this
    /// caller, commits the queue in rounds with `commit` (which answers every batch of a
    /// round) until its own batch is in one, then hands the turn on. A panic inside `commit`
    /// ends the process, as in any thread the store cannot lose.
    pub(super) fn wait(
        &self,
        ack: &Ack,
        commit: &(dyn Fn(Vec<Batch>) + Sync),
    ) -> Result<(), StoreError> {
        loop {
            match ack.wait() {
                Answer::Done(r) => return r,
                Answer::Lead => self.lead(ack, commit),
                Answer::Waiting => {}
            }
        }
    }

    fn lead(&self, own: &Ack, commit: &(dyn Fn(Vec<Batch>) + Sync)) {
        loop {
            let round = take_round(&mut self.queue.lock().batches);
            crate::stage::critical("store commit", Box::new(|| commit(round)));
            if own.done() {
                return self.hand_on();
            }
        }
    }

    /// Gives the turn to the oldest batch whose caller waits, else frees it (started batches
    /// left take it when their callers wait, or go with another caller's round).
    fn hand_on(&self) {
        let mut q = self.queue.lock();
        match q.batches.iter().find(|b| b.done.waiting()) {
            Some(next) => next.done.lead(),
            None => q.turn_taken = false,
        }
    }
}

/// The oldest batches, up to `MAX_BATCH` ops (at least one batch).
fn take_round(queue: &mut VecDeque<Batch>) -> Vec<Batch> {
    let mut n = 0;
    let mut round = Vec::new();
    while let Some(b) = queue.front() {
        if !round.is_empty() && n + b.ops.len() > MAX_BATCH {
            break;
        }
        n += b.ops.len();
        round.extend(queue.pop_front());
    }
    round
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn op() -> Op {
        Op::PutMeta("k".into(), "v".into())
    }

    fn batch(n: usize) -> Batch {
        Batch {
            ops: (0..n).map(|_| op()).collect(),
            done: Reply(None),
        }
    }

    #[test]
    fn a_round_takes_the_oldest_batches_up_to_max_batch_ops() {
        let mut q: VecDeque<Batch> = (0..MAX_BATCH + 10).map(|_| batch(1)).collect();
        assert_eq!(take_round(&mut q).len(), MAX_BATCH, "stops at 4096 ops");
        assert_eq!(take_round(&mut q).len(), 10, "the rest");
        let mut q: VecDeque<Batch> = [batch(MAX_BATCH + 5), batch(1)].into_iter().collect();
        assert_eq!(
            take_round(&mut q).len(),
            1,
            "a batch over the limit goes alone"
        );
        assert_eq!(take_round(&mut q).len(), 1);
        assert!(take_round(&mut q).is_empty());
    }

    /// A reply dropped unanswered answers `Unavailable`: no caller waits for ever.
    #[test]
    fn a_reply_dropped_unanswered_answers_unavailable() {
        let ack = Arc::new(Ack::waited());
        drop(Reply(Some(ack.clone())));
        assert_eq!(
            ack.wait(),
            Answer::Done(Err(unavailable("the writer thread has stopped")))
        );
        let ack = Arc::new(Ack::waited());
        Reply(Some(ack.clone())).send(Ok(()));
        assert_eq!(ack.wait(), Answer::Done(Ok(())));
    }

    /// The first caller commits at once on its own thread; those that queue meanwhile are
    /// committed by one of them, in fewer rounds than callers, each getting its own answer;
    /// then the turn is free again.
    #[test]
    fn callers_commit_each_others_batches_in_rounds_on_their_own_threads() {
        let commits = Commits::default();
        let rounds = AtomicUsize::new(0);
        let committed = AtomicUsize::new(0);
        let threads = Mutex::new(std::collections::HashSet::new());
        let commit = |round: Vec<Batch>| {
            threads.lock().insert(std::thread::current().id());
            rounds.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(2));
            for b in round {
                committed.fetch_add(b.ops.len(), Ordering::Relaxed);
                let fail = b.ops.len() == 3;
                b.done.send(if fail {
                    Err(unavailable("three"))
                } else {
                    Ok(())
                });
            }
        };
        std::thread::scope(|s| {
            for t in 0..8 {
                let (commits, commit) = (&commits, &commit);
                s.spawn(move || {
                    for i in 0..50 {
                        let n = 1 + (t + i) % 4;
                        let ack = commits.push((0..n).map(|_| op()).collect()).expect("push");
                        let r = commits.wait(&ack, commit);
                        assert_eq!(r.is_err(), n == 3, "batch of {n} answered {r:?}");
                    }
                });
            }
        });
        let r = rounds.load(Ordering::Relaxed);
        assert_eq!(committed.load(Ordering::Relaxed), 8 * 50 * 10 / 4);
        assert!(r < 400, "{r} rounds for 400 batches");
        assert!(threads.lock().len() > 1, "only one thread committed");
        assert!(!commits.queue.lock().turn_taken, "the turn is left taken");
        let ack = commits.push(vec![op()]).expect("push");
        assert_eq!(
            *ack.slot.lock(),
            Answer::Lead,
            "the next caller commits at once"
        );
    }

    /// After the last batch no push is taken, and the last batch is answered after every
    /// batch queued before it.
    #[test]
    fn nothing_is_queued_after_the_last_batch() {
        let commits = Commits::default();
        let first = commits.push(vec![op()]).expect("push");
        let last = commits.push_last().expect("last");
        assert_eq!(
            commits.push(vec![op()]).err(),
            Some(unavailable("the store is closed"))
        );
        let order = Mutex::new(Vec::new());
        let commit = |round: Vec<Batch>| {
            for b in round {
                order.lock().push(b.ops.len());
                b.done.send(Ok(()));
            }
        };
        std::thread::scope(|s| {
            s.spawn(|| commits.wait(&last, &commit).expect("last"));
            std::thread::sleep(Duration::from_millis(20));
            assert!(
                order.lock().is_empty(),
                "committed before the first caller's turn"
            );
            commits.wait(&first, &commit).expect("first");
        });
        assert_eq!(*order.lock(), vec![1, 0]);
    }

    /// Answers every batch of a round with `Ok` and notes the round's size in `rounds`.
    fn counted(rounds: &Mutex<Vec<usize>>) -> impl Fn(Vec<Batch>) + Sync + '_ {
        move |round: Vec<Batch>| {
            rounds.lock().push(round.len());
            for b in round {
                b.done.send(Ok(()));
            }
        }
    }

    /// A started write that waits with patience goes with another caller's round when one
    /// comes in time, else commits itself once its patience is over.
    #[test]
    fn a_patient_started_write_goes_with_another_callers_round_or_commits_after_its_patience() {
        let commits = Commits::default();
        let rounds = Mutex::new(Vec::new());
        let commit = counted(&rounds);
        let started = commits.push_started(vec![op()]).expect("started");
        std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                let own = commits.push(vec![op()]).expect("push");
                assert_eq!(commits.wait(&own, &commit), Ok(()));
            });
            assert_eq!(
                commits.wait_started(&started, Duration::from_secs(10), &commit),
                Ok(())
            );
        });
        assert_eq!(*rounds.lock(), vec![2], "one round took both");
        // Alone, it commits itself once its patience is over.
        let started = commits.push_started(vec![op()]).expect("started");
        assert_eq!(
            commits.wait_started(&started, Duration::from_millis(20), &commit),
            Ok(())
        );
        assert_eq!(*rounds.lock(), vec![2, 1]);
        assert!(!commits.queue.lock().turn_taken);
    }

    /// A started write takes the turn only once its caller waits (its caller may queue a
    /// write of its own before): until then it goes with another caller's round, and a caller
    /// that waits is given the turn over it.
    #[test]
    fn a_started_write_takes_the_turn_only_once_its_caller_waits() {
        let commits = Commits::default();
        let rounds = Mutex::new(Vec::new());
        let commit = counted(&rounds);
        // Its caller queues a write of its own before waiting: that one commits both.
        let started = commits.push_started(vec![op()]).expect("started");
        assert_eq!(*started.slot.lock(), Answer::Waiting);
        let own = commits.push(vec![op()]).expect("push");
        assert_eq!(
            *own.slot.lock(),
            Answer::Lead,
            "the started write left the turn"
        );
        assert_eq!(commits.wait(&own, &commit), Ok(()));
        assert_eq!(
            commits.wait_started(&started, Duration::ZERO, &commit),
            Ok(())
        );
        assert_eq!(*rounds.lock(), vec![2]);
        assert!(!commits.queue.lock().turn_taken);

        // Alone, it commits itself once waited for.
        let started = commits.push_started(vec![op()]).expect("started");
        assert!(!commits.queue.lock().turn_taken);
        assert_eq!(
            commits.wait_started(&started, Duration::ZERO, &commit),
            Ok(())
        );
        assert_eq!(*rounds.lock(), vec![2, 1]);

        // Left after a caller's round (a round of its own is full), it does not get the turn
        // before its caller waits.
        let own = commits.push(vec![op(); MAX_BATCH]).expect("push");
        let late = commits.push_started(vec![op()]).expect("started");
        assert_eq!(commits.wait(&own, &commit), Ok(()));
        assert!(!commits.queue.lock().turn_taken, "the turn is free");
        assert_eq!(*late.slot.lock(), Answer::Waiting);
        assert_eq!(commits.wait_started(&late, Duration::ZERO, &commit), Ok(()));
        assert_eq!(*rounds.lock(), vec![2, 1, 1, 1]);
        assert!(!commits.queue.lock().turn_taken);
    }
}
