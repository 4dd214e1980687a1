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
        let thread = h.thread().clone();
        Ok(Stage::new(
            "node-listen",
            move || {
                stopping.store(true, Ordering::Release);
                thread.unpark();
            },
            vec![h],
        ))
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
