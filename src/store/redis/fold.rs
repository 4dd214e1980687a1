//! Calls that fold what several threads ask at the same moment into one script call, made on
//! the asking threads themselves: the first to ask leads and sends everything waiting at that
//! moment in one call; those that ask meanwhile wait, and the first of them leads the next call.
//! No thread of its own and no wait for company: a lone ask goes at once. The workers' claims
//! (`CLAIM`) go this way: with a thread of its own, each call cost two more context switches and
//! the wait for that thread to be scheduled.

use super::super::StoreError;
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;

/// Where a waiting ask stands.
enum Turn<R> {
    Waiting,
    /// The previous leader handed over: this ask sends the next call.
    Lead,
    Done(Result<R, StoreError>),
}

struct Ticket<A, R> {
    ask: A,
    turn: Mutex<Turn<R>>,
    woken: Condvar,
}

impl<A, R> Ticket<A, R> {
    fn set(&self, turn: Turn<R>) {
        *self.turn.lock() = turn;
        self.woken.notify_one();
    }
}

struct Queue<A, R> {
    waiting: Vec<Arc<Ticket<A, R>>>,
    /// A call is being sent, or a leader has been named and has not yet taken the queue.
    busy: bool,
}

/// The asks waiting for a call (see the module's text), of type `A`, each answered an `R`.
pub(super) struct Fold<A, R> {
    queue: Mutex<Queue<A, R>>,
    /// Most asks in one call; the rest lead the next.
    most: usize,
    /// The call's name, for the errors of a call that failed.
    name: &'static str,
}

impl<A, R: Clone> Fold<A, R> {
    /// Folds at most `most` asks into each call of `name` (for errors).
    pub(super) fn new(name: &'static str, most: usize) -> Fold<A, R> {
        Fold {
            queue: Mutex::new(Queue {
                waiting: Vec::new(),
                busy: false,
            }),
            most,
            name,
        }
    }

    /// Sends `ask` with every ask waiting, through `call` (one answer per ask, in order), and
    /// gives `ask`'s answer.
    pub(super) fn ask(
        &self,
        ask: A,
        call: impl Fn(&[&A]) -> Result<Vec<R>, StoreError>,
    ) -> Result<R, StoreError> {
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
        let batch: Vec<Arc<Ticket<A, R>>> = {
            let mut q = self.queue.lock();
            let n = q.waiting.len().min(self.most);
            q.waiting.drain(..n).collect()
        };
        let asks: Vec<&A> = batch.iter().map(|t| &t.ask).collect();
        // A panic in the call must not leave the queue led by nobody: every later ask would
        // wait for ever. It fails this batch like a Redis error.
        let called = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(&asks)))
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "the {} call panicked",
                    self.name
                )))
            });
        let answers = match called {
            Ok(v) if v.len() == batch.len() => Ok(v),
            Ok(v) => Err(StoreError::Unavailable(format!(
                "{} answered {} results for {} asks",
                self.name,
                v.len(),
                batch.len()
            ))),
            Err(e) => Err(e),
        };
        let mut mine = None;
        for (i, t) in batch.iter().enumerate() {
            let r = match &answers {
                Ok(v) => Ok(v[i].clone()),
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
        mine.unwrap_or_else(|| {
            Err(StoreError::Unavailable(format!(
                "{} ask lost in its batch",
                self.name
            )))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    type Claims = Fold<String, i64>;

    fn ask(id: &str) -> String {
        id.to_string()
    }

    fn claims() -> Claims {
        Fold::new("CLAIM", 64)
    }

    #[test]
    fn a_claim_alone_is_sent_at_once_and_gets_its_answer() {
        let claims = claims();
        let r = claims.ask(ask("a"), |asks| {
            assert_eq!(asks.len(), 1);
            assert_eq!(asks[0], "a");
            Ok(vec![7])
        });
        assert_eq!(r, Ok(7));
        assert!(!claims.queue.lock().busy);
    }

    #[test]
    fn claims_made_during_a_call_share_the_next_one_and_each_gets_its_own_answer() {
        let claims = Arc::new(claims());
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
                        let r = claims.ask(ask(&id), |asks| {
                            calls.fetch_add(1, Ordering::Relaxed);
                            // Slow enough that the others queue up behind it.
                            std::thread::sleep(std::time::Duration::from_micros(200));
                            Ok(asks
                                .iter()
                                .map(|a| a.split('-').map(|n| n.parse::<i64>().unwrap()).sum())
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
        let claims = claims();
        let r = claims.ask(ask("a"), |_| panic!("boom"));
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert_eq!(claims.ask(ask("b"), |_| Ok(vec![1])), Ok(1));
    }

    #[test]
    fn a_failed_call_fails_every_claim_in_it_and_the_next_call_is_made() {
        let claims = claims();
        let down = StoreError::Unavailable("down".into());
        assert_eq!(claims.ask(ask("a"), |_| Err(down.clone())), Err(down));
        assert_eq!(claims.ask(ask("b"), |_| Ok(vec![1])), Ok(1));
        let short = claims.ask(ask("c"), |_| Ok(vec![]));
        assert!(matches!(short, Err(StoreError::Unavailable(_))));
    }
}
