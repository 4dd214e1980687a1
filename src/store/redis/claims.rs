//! The workers' claims (and cc slot frees) folded into one `CLAIM` call per round trip: the
//! first worker to ask leads and sends every claim waiting at that moment in one script call;
//! those that ask meanwhile wait, and the first of them leads the next call. No thread of its
//! own and no wait for company: a claim alone goes at once, as before.

use super::super::StoreError;
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;

/// Most claims in one call; the rest lead the next.
const MAX_FOLD: usize = 64;

/// One claim or free: the `CLAIM` script's four arguments for it.
pub(super) struct Ask {
    /// The task's id.
    pub(super) id: String,
    /// The running mark to store; empty to free the slot instead.
    pub(super) data: Vec<u8>,
    /// The cc slot (worker) to take or free, if the task has cc.
    pub(super) slot: Option<usize>,
    /// This claim's token: the same on a retry after a lost answer.
    pub(super) token: u64,
}

/// Where a waiting claim stands.
enum Turn {
    Waiting,
    /// The previous leader handed over: this claim sends the next call.
    Lead,
    Done(Result<i64, StoreError>),
}

struct Ticket {
    ask: Ask,
    turn: Mutex<Turn>,
    woken: Condvar,
}

impl Ticket {
    fn set(&self, turn: Turn) {
        *self.turn.lock() = turn;
        self.woken.notify_one();
    }
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Arc<Ticket>>,
    /// A call is being sent, or a leader has been named and has not yet taken the queue.
    busy: bool,
}

/// The claims waiting for a call (see the module's text).
#[derive(Default)]
pub(super) struct Claims {
    queue: Mutex<Queue>,
}

impl Claims {
    /// Sends `ask` with every claim waiting, through `call` (the `CLAIM` script, one answer per
    /// ask, in order), and gives `ask`'s answer.
    pub(super) fn claim(
        &self,
        ask: Ask,
        call: impl Fn(&[&Ask]) -> Result<Vec<i64>, StoreError>,
    ) -> Result<i64, StoreError> {
        let me = Arc::new(Ticket {
            ask,
            turn: Mutex::new(Turn::Waiting),
            woken: Condvar::new(),
        });
        let lead = {
            let mut q = self.queue.lock();
            q.waiting.push(me.clone());
            !std::mem::replace(&mut q.busy, true)
        };
        if !lead {
            let mut turn = me.turn.lock();
            loop {
                match std::mem::replace(&mut *turn, Turn::Waiting) {
                    Turn::Waiting => me.woken.wait(&mut turn),
                    Turn::Lead => break,
                    Turn::Done(r) => return r,
                }
            }
        }
        let batch: Vec<Arc<Ticket>> = {
            let mut q = self.queue.lock();
            let n = q.waiting.len().min(MAX_FOLD);
            q.waiting.drain(..n).collect()
        };
        let asks: Vec<&Ask> = batch.iter().map(|t| &t.ask).collect();
        // A panic in the call must not leave the queue led by nobody: every later claim of
        // the node would wait for ever. It fails this batch like a Redis error.
        let called = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(&asks)))
            .unwrap_or_else(|_| Err(StoreError::Unavailable("the claim call panicked".into())));
        let answers = match called {
            Ok(v) if v.len() == batch.len() => Ok(v),
            Ok(v) => Err(StoreError::Unavailable(format!(
                "CLAIM answered {} results for {} claims",
                v.len(),
                batch.len()
            ))),
            Err(e) => Err(e),
        };
        let mut mine = None;
        for (i, t) in batch.iter().enumerate() {
            let r = match &answers {
                Ok(v) => Ok(v[i]),
                Err(e) => Err(e.clone()),
            };
            if Arc::ptr_eq(t, &me) {
                mine = Some(r);
            } else {
                t.set(Turn::Done(r));
            }
        }
        {
            let mut q = self.queue.lock();
            match q.waiting.first() {
                Some(next) => next.set(Turn::Lead),
                None => q.busy = false,
            }
        }
        // `me` was in the queue when this thread led (it pushed itself first, or was named
        // after being queued), and only the leader takes from it.
        mine.unwrap_or_else(|| Err(StoreError::Unavailable("claim lost in its batch".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    fn ask(id: &str) -> Ask {
        Ask {
            id: id.into(),
            data: b"x".to_vec(),
            slot: None,
            token: 0,
        }
    }

    #[test]
    fn a_claim_alone_is_sent_at_once_and_gets_its_answer() {
        let claims = Claims::default();
        let r = claims.claim(ask("a"), |asks| {
            assert_eq!(asks.len(), 1);
            assert_eq!(asks[0].id, "a");
            Ok(vec![7])
        });
        assert_eq!(r, Ok(7));
        assert!(!claims.queue.lock().busy);
    }

    #[test]
    fn claims_made_during_a_call_share_the_next_one_and_each_gets_its_own_answer() {
        let claims = Arc::new(Claims::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let threads = 8;
        let start = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (claims, calls, start) = (claims.clone(), calls.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let mut got = Vec::new();
                    for round in 0..200 {
                        let id = format!("{i}-{round}");
                        let r = claims.claim(ask(&id), |asks| {
                            calls.fetch_add(1, Ordering::Relaxed);
                            // Slow enough that the others queue up behind it.
                            std::thread::sleep(std::time::Duration::from_micros(200));
                            Ok(asks
                                .iter()
                                .map(|a| a.id.split('-').map(|n| n.parse::<i64>().unwrap()).sum())
                                .collect())
                        });
                        got.push((r, (i + round) as i64));
                    }
                    got
                })
            })
            .collect();
        for h in handles {
            for (r, want) in h.join().unwrap() {
                assert_eq!(r, Ok(want));
            }
        }
        let calls = calls.load(Ordering::Relaxed);
        assert!(
            calls < threads * 200,
            "{calls} calls for {} claims",
            threads * 200
        );
        assert!(!claims.queue.lock().busy);
        assert!(claims.queue.lock().waiting.is_empty());
    }

    #[test]
    fn a_call_that_panics_fails_its_claims_and_the_next_claim_is_still_sent() {
        let claims = Claims::default();
        let r = claims.claim(ask("a"), |_| panic!("boom"));
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert_eq!(claims.claim(ask("b"), |_| Ok(vec![1])), Ok(1));
    }

    #[test]
    fn a_failed_call_fails_every_claim_in_it_and_the_next_call_is_made() {
        let claims = Claims::default();
        let down = StoreError::Unavailable("down".into());
        assert_eq!(claims.claim(ask("a"), |_| Err(down.clone())), Err(down));
        assert_eq!(claims.claim(ask("b"), |_| Ok(vec![1])), Ok(1));
        let short = claims.claim(ask("c"), |_| Ok(vec![]));
        assert!(matches!(short, Err(StoreError::Unavailable(_))));
    }
}
