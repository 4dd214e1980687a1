//! The `node-listen` thread: answers this node's clients (long polls, `wait` submits, WebSocket
//! result frames) waiting for tasks that other nodes finish or cancel, as each node announces
//! its results to the others (`Registry::listen`). Each time it has (re)subscribed it looks
//! up every id waited for here, so that results recorded while it was not listening (a Redis
//! outage) are not missed. It logs each change of its state once and never panics.

use super::Registry;
use crate::results::Answers;
use crate::stage::Stage;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Pause before subscribing again after a failure.
const AGAIN_AFTER: Duration = Duration::from_secs(1);

/// What the listening thread works with.
pub(crate) struct Listen {
    pub(crate) registry: Arc<dyn Registry>,
    pub(crate) answers: Answers,
    pub(crate) own: Arc<str>,
}

impl Listen {
    /// Starts the thread; its stage stops it (within a read timeout of the store's).
    pub(crate) fn start(self) -> std::io::Result<Stage> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let h = crate::stage::spawn_critical("node-listen", move || self.run(&stop))?;
        Ok(Stage::unparked("node-listen", stopping, h))
    }

    /// Subscribes, and again after each failure, until `stop` is set.
    fn run(&self, stop: &AtomicBool) {
        let mut up = true;
        while !stop.load(Ordering::Acquire) {
            let heard = self.registry.listen(stop, &mut |ids| {
                if !ids.is_empty() {
                    return self.answers.wake(ids);
                }
                if !up {
                    log::info!("node {}: hearing the other nodes' results again", self.own);
                    up = true;
                }
                self.answers.recheck()
            });
            if let Err(e) = heard {
                if up {
                    log::error!(
                        "node {}: cannot hear the other nodes' results ({e}); clients waiting \
                         here for their tasks are answered once this is back",
                        self.own
                    );
                    up = false;
                }
                std::thread::park_timeout(AGAIN_AFTER);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Beat, Join};
    use crate::results::Results;
    use crate::store::{contract, Change, Recovered, Store, StoreError};
    use crate::task::State;
    use parking_lot::Mutex;

    /// A registry whose first subscription fails (an outage); the second calls `on("")` and
    /// then hears nothing until stopped. The node side of the registry is not used.
    #[derive(Default)]
    struct FailsOnce {
        calls: Mutex<usize>,
    }

    impl Registry for FailsOnce {
        fn join(&self, _: usize, _: &str) -> Result<Join, StoreError> {
            Ok(Join::Joined)
        }
        fn beat(&self, _: usize, _: &[crate::dispatch::Load]) -> Result<Beat, StoreError> {
            Ok(Beat::default())
        }
        fn adopt(&self, _: &str) -> Result<(Vec<Recovered>, bool), StoreError> {
            Ok((Vec::new(), false))
        }
        fn leave(&self, _: usize) -> Result<(), StoreError> {
            Ok(())
        }
        fn steal(&self, _: usize, _: &[usize]) -> Result<Vec<crate::task::Task>, StoreError> {
            Ok(Vec::new())
        }
        fn listen(
            &self,
            stop: &AtomicBool,
            on: &mut dyn FnMut(&str) -> Result<(), StoreError>,
        ) -> Result<(), StoreError> {
            let first = {
                let mut n = self.calls.lock();
                *n += 1;
                *n == 1
            };
            if first {
                return Err(StoreError::Unavailable("redis: connection refused".into()));
            }
            on("")?;
            while !stop.load(Ordering::Acquire) {
                std::thread::park_timeout(Duration::from_millis(20));
            }
            Ok(())
        }
    }

    /// A result recorded while the subscription was down (no message will ever name it) still
    /// answers the client waiting for it, once the thread has subscribed again.
    #[test]
    fn a_result_recorded_while_not_listening_is_found_after_subscribing_again() {
        let store: Arc<dyn Store> = Arc::new(crate::store::memory::open());
        let (results, _h) = Results::start().expect("results");
        let answers = Answers::new(results.clone(), store.clone());
        let t = contract::task("x", State::Ready, 0);
        store.insert(std::slice::from_ref(&t)).expect("insert");
        let rx = answers.watch(vec!["x".into()], Duration::from_secs(30));
        store
            .record(&[Change::Finish {
                result: contract::result("x"),
                expires_ms: crate::clock::now_ms() + 60_000,
                task: None,
            }])
            .expect("record");
        let registry = Arc::new(FailsOnce::default());
        let stage = Listen {
            registry: registry.clone(),
            answers,
            own: Arc::from("me"),
        }
        .start()
        .expect("start");
        let got = rx.recv_timeout(Duration::from_secs(20)).expect("answered");
        assert_eq!(got, vec![Some(contract::result("x"))]);
        assert_eq!(
            *registry.calls.lock(),
            2,
            "subscribed again after the failure"
        );
        assert!(stage.stop_and_join(Duration::from_secs(5)));
        results.stop();
    }
}
