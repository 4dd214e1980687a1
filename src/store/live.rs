//! In-memory index of unfinished task states, shared by the single-node stores: it answers
//! duplicate checks, claims and cancels atomically without touching the disk.

use super::{Cancel, Summary};
use crate::task::State;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// An id that [`LiveIndex::reserve`] refused: already taken, or repeated in the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DuplicateId(pub String);

/// State of an entry; `Reserved` while its insert is being made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Reserved(State),
    Live(State),
}

/// Unfinished ids and their states. foldhash with a per-process random seed: 4–5 times faster
/// than SipHash on ids (the index is rebuilt with every unfinished task at start) and still
/// seeded, so clients cannot precompute colliding ids.
#[derive(Default)]
pub(crate) struct LiveIndex {
    map: Mutex<HashMap<Arc<str>, Entry, foldhash::fast::RandomState>>,
}

impl LiveIndex {
    /// Reserves new ids (all or none); the error names the first one already taken or repeated.
    pub(crate) fn reserve(&self, items: &[(&str, State)]) -> Result<(), DuplicateId> {
        let mut map = self.map.lock();
        // One lookup per id, reserving as it goes (an id repeated in `items` then finds its
        // first reservation): a submit of 25,000 tasks must not compare every pair of ids
        // while it holds the lock every claim and outcome needs.
        for (i, (id, state)) in items.iter().enumerate() {
            if map.contains_key(*id) {
                // Every id before this one was free and is reserved by this call: undo them.
                for (done, _) in &items[..i] {
                    map.remove(*done);
                }
                return Err(DuplicateId(id.to_string()));
            }
            map.insert(Arc::from(*id), Entry::Reserved(*state));
        }
        Ok(())
    }

    /// Makes reserved ids live once they are durable.
    pub(crate) fn commit(&self, ids: &[&str]) {
        let mut map = self.map.lock();
        for id in ids {
            if let Some(e) = map.get_mut(*id) {
                if let Entry::Reserved(s) = *e {
                    *e = Entry::Live(s);
                }
            }
        }
    }

    /// Drops reservations whose insert failed.
    pub(crate) fn release(&self, ids: &[&str]) {
        let mut map = self.map.lock();
        for id in ids {
            if matches!(map.get(*id), Some(Entry::Reserved(_))) {
                map.remove(*id);
            }
        }
    }

    /// Inserts recovered ids directly as live, under one lock and with room made once
    /// (a million recovered tasks would otherwise rehash the map twenty times).
    pub(crate) fn restore(&self, items: impl ExactSizeIterator<Item = (Arc<str>, State)>) {
        let mut map = self.map.lock();
        map.reserve(items.len());
        for (id, state) in items {
            map.insert(id, Entry::Live(state));
        }
    }

    /// Moves `id` from one of `from` to `to`; false when it is not in one of them.
    pub(crate) fn transition(&self, id: &str, from: &[State], to: State) -> bool {
        let mut map = self.map.lock();
        match map.get_mut(id) {
            Some(e @ Entry::Live(_)) => {
                let Entry::Live(s) = *e else { return false };
                if from.contains(&s) {
                    *e = Entry::Live(to);
                    true
                } else {
                    false
                }
            }
            _ => false,
        }
    }

    /// Sets the state of a live id (no-op when it is gone).
    pub(crate) fn set(&self, id: &str, state: State) {
        if let Some(e) = self.map.lock().get_mut(id) {
            *e = Entry::Live(state);
        }
    }

    /// Forgets a finished id.
    pub(crate) fn remove(&self, id: &str) {
        self.map.lock().remove(id);
    }

    /// Removes a task that has not started; returns its state to put back if the delete fails.
    pub(crate) fn cancel(&self, id: &str) -> Result<State, Cancel> {
        let mut map = self.map.lock();
        match map.get(id) {
            Some(Entry::Live(State::Running)) => Err(Cancel::Running),
            Some(Entry::Live(s)) => {
                let s = *s;
                map.remove(id);
                Ok(s)
            }
            Some(Entry::Reserved(_)) => Err(Cancel::Running),
            None => Err(Cancel::Unknown),
        }
    }

    /// Puts back an entry whose cancel could not be made durable.
    pub(crate) fn uncancel(&self, id: &str, state: State) {
        self.map.lock().insert(Arc::from(id), Entry::Live(state));
    }

    /// The state of a live id.
    pub(crate) fn status(&self, id: &str) -> Option<State> {
        match self.map.lock().get(id) {
            Some(Entry::Live(s)) => Some(*s),
            _ => None,
        }
    }

    /// Ids per state, lists capped at `cap`.
    pub(crate) fn summary(&self, cap: usize) -> Summary {
        let map = self.map.lock();
        let mut s = Summary::default();
        let mut retry_wait = 0;
        for (id, e) in map.iter() {
            let Entry::Live(state) = e else { continue };
            match state {
                State::Running => {
                    s.running_total += 1;
                    if s.running.len() < cap {
                        s.running.push(id.to_string());
                    }
                }
                State::Delayed | State::RetryWait => {
                    retry_wait += usize::from(*state == State::RetryWait);
                    s.waiting_total += 1;
                    if s.waiting.len() < cap {
                        s.waiting.push(id.to_string());
                    }
                }
                State::Ready => s.ready_total += 1,
            }
        }
        s.retry_wait_total = Some(retry_wait);
        s.running.sort_unstable();
        s.waiting.sort_unstable();
        s
    }
}
