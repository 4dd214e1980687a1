//! The `node-steal` thread (Redis, several live nodes): while this node has idle workers and
//! nothing queued, it takes the oldest ready tasks queued on the other live nodes
//! (`Registry::steal`) and dispatches them here, so that a task accepted anywhere runs on the
//! first free worker. With nothing to take it waits 100 ms, then twice as long each time up
//! to 1 s; a node alone on its prefix, paused or busy never asks. It logs each change of its
//! state once and never panics.

use super::{Entry, Registry};
use crate::dispatch::Pool;
use crate::stage::Stage;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::park_timeout;
use std::time::{Duration, Instant};

/// First wait after a call that found nothing to take.
const FIRST: Duration = Duration::from_millis(100);
/// Longest wait between calls that find nothing, and between looks at a busy or lone node.
const MOST: Duration = Duration::from_secs(1);
/// Most tasks one call takes.
const BATCH: usize = 64;

/// What the stealing thread works with.
pub(crate) struct Steal {
    pub(crate) registry: Arc<dyn Registry>,
    pub(crate) pool: Arc<Pool>,
    /// The live nodes as the last heartbeat read them: with this node alone, nothing to take.
    pub(crate) live: Arc<Mutex<Vec<Entry>>>,
    pub(crate) own: Arc<str>,
}

impl Steal {
    /// Starts the thread; its stage stops it (after the call under way, if any).
    pub(crate) fn start(self) -> std::io::Result<Stage> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let h = crate::stage::spawn_critical("node-steal", move || self.run(&stop))?;
        Ok(Stage::unparked("node-steal", stopping, h))
    }

    fn run(&self, stop: &AtomicBool) {
        let (mut wait, mut next, mut up) = (FIRST, Instant::now(), true);
        while !stop.load(Ordering::Acquire) {
            let left = next.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                park_timeout(left);
                continue;
            }
            if self.live.lock().len() < 2 {
                park_timeout(MOST);
                continue;
            }
            // None: the next worker that runs out of work wakes this thread.
            let idle = self.pool.idle();
            if idle.is_empty() {
                wait = FIRST;
                park_timeout(MOST);
                continue;
            }
            match self.registry.steal(idle.len().min(BATCH), &idle) {
                Ok(tasks) => {
                    if !up {
                        log::info!("node {}: taking other nodes' tasks again", self.own);
                        up = true;
                    }
                    if tasks.is_empty() {
                        next = Instant::now() + wait;
                        wait = MOST.min(wait * 2);
                    } else {
                        wait = FIRST;
                        // Tasks with cc first: each goes to the idle worker it was taken for
                        // before a task without cc can be routed there.
                        let mut tasks = tasks;
                        tasks.sort_by_key(|t| t.cc.is_empty());
                        for t in tasks {
                            self.pool.dispatch(Arc::new(t));
                        }
                    }
                }
                Err(e) => {
                    if up {
                        log::warn!(
                            "node {}: cannot take other nodes' tasks ({e}); tried again every \
                             second",
                            self.own
                        );
                        up = false;
                    }
                    next = Instant::now() + MOST;
                }
            }
        }
    }
}
