//! A small blocking hand-over of items between threads: a mutex, a condvar and a queue. Lighter
//! in the binary than a channel, whose flavours are compiled again for every item type.

use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;

/// A bounded queue that can be closed: `push` waits for room, `pop` for an item.
pub(crate) struct Handoff<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
    cap: usize,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
    /// Items pushed and not yet marked `finished`.
    unfinished: usize,
}

impl<T> Handoff<T> {
    /// A queue holding at most `cap` items (at least one).
    pub(crate) fn new(cap: usize) -> Handoff<T> {
        Handoff {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
                unfinished: 0,
            }),
            changed: Condvar::new(),
            cap: cap.max(1),
        }
    }

    /// Adds `item` once there is room; gives it back if the queue is closed.
    pub(crate) fn push(&self, item: T) -> Result<(), T> {
        let mut s = self.state.lock();
        while s.items.len() >= self.cap && !s.closed {
            self.changed.wait(&mut s);
        }
        if s.closed {
            return Err(item);
        }
        s.items.push_back(item);
        s.unfinished += 1;
        self.changed.notify_all();
        Ok(())
    }

    /// Marks one popped item as dealt with (for `wait_finished`).
    pub(crate) fn finished(&self) {
        let mut s = self.state.lock();
        s.unfinished = s.unfinished.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Waits until every item pushed has been marked `finished`, or `within` has passed.
    pub(crate) fn wait_finished(&self, within: std::time::Duration) {
        let until = std::time::Instant::now() + within;
        let mut s = self.state.lock();
        while s.unfinished > 0 && !self.changed.wait_until(&mut s, until).timed_out() {}
    }

    /// The oldest item, once there is one; `None` once the queue is closed and empty.
    pub(crate) fn pop(&self) -> Option<T> {
        let mut s = self.state.lock();
        loop {
            if let Some(item) = s.items.pop_front() {
                self.changed.notify_all();
                return Some(item);
            }
            if s.closed {
                return None;
            }
            self.changed.wait(&mut s);
        }
    }

    /// Refuses further items; `pop` still hands out the ones queued.
    pub(crate) fn close(&self) {
        self.state.lock().closed = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn items_come_out_in_order_and_a_full_queue_waits_for_room() {
        let q = Arc::new(Handoff::new(2));
        q.push(1).expect("room");
        q.push(2).expect("room");
        let q2 = q.clone();
        let pusher = std::thread::spawn(move || q2.push(3));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pusher.is_finished(), "a third item waits for room");
        assert_eq!(q.pop(), Some(1));
        pusher
            .join()
            .expect("pusher")
            .expect("pushed once there was room");
        assert_eq!(q.pop(), Some(2));
        q.finished();
        q.finished();
        let t0 = std::time::Instant::now();
        q.wait_finished(Duration::from_millis(200));
        assert!(
            t0.elapsed() >= Duration::from_millis(200),
            "one item is not finished yet: the wait lasts its whole time"
        );
        q.finished();
        let t0 = std::time::Instant::now();
        q.wait_finished(Duration::from_secs(5));
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "every item is finished"
        );
        q.close();
        assert_eq!(q.push(4), Err(4), "closed: refused");
        assert_eq!(q.pop(), Some(3), "queued items still come out");
        assert_eq!(q.pop(), None);
    }
}
