//! The `node-beat` thread: every `--node_ttl`/3 seconds it renews this node's heartbeat,
//! refreshes the list of live nodes that `/sys_info` shows, and adopts the tasks of the nodes
//! whose heartbeat has expired, handing them to the timer as recovery at start does. It goes
//! on through a store outage (logging each change once); at shutdown it marks the node stopped.

use super::{Entry, Registry};
use crate::dispatch::Pool;
use crate::schedule::timer::Timer;
use crate::stage::Stage;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the heartbeat thread works with.
pub(crate) struct Heartbeat {
    pub(crate) registry: Arc<dyn Registry>,
    pub(crate) own: Arc<str>,
    pub(crate) pool: Arc<Pool>,
    /// Where adopted tasks go, at their due time (running ones at once).
    pub(crate) timer: Timer,
    /// The live nodes, for `/sys_info`.
    pub(crate) live: Arc<Mutex<Vec<Entry>>>,
    /// Cleared when shutdown begins: a node that stops adopts nothing more (what it has
    /// adopted stays its own in the store, and goes to the others once it has left).
    pub(crate) adopting: Arc<AtomicBool>,
    /// Time between beats (`--node_ttl`/3).
    pub(crate) every: Duration,
}

impl Heartbeat {
    /// Beats once at once (so that `/sys_info` lists the nodes from the first request), then
    /// starts the thread. Its stage stops it and marks the node stopped.
    pub(crate) fn start(self) -> std::io::Result<Stage> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let mut up = true;
        let mut last = Instant::now();
        self.once(&mut up, &mut last);
        let h = crate::stage::spawn_critical("node-beat", move || {
            while !stopped.load(Ordering::Acquire) {
                let wait = self.every.saturating_sub(last.elapsed());
                if wait.is_zero() {
                    self.once(&mut up, &mut last);
                } else {
                    // May wake early (a spurious wake-up, or the stop): the loop checks both.
                    std::thread::park_timeout(wait);
                }
            }
            match self.registry.leave(self.pool.workers()) {
                Ok(()) => log::info!("node {}: left the registry", self.own),
                Err(e) => log::warn!(
                    "node {}: cannot mark this node stopped ({e}); the others adopt what it \
                     leaves once its heartbeat expires",
                    self.own
                ),
            }
        })?;
        Ok(Stage::unparked("node-beat", stop, h))
    }

    /// One heartbeat, then the adoption of every dead node's tasks.
    fn once(&self, up: &mut bool, last: &mut Instant) {
        let Some(dead) = self.renew(up, last) else {
            return;
        };
        for d in dead {
            if !self.adopting.load(Ordering::Acquire) {
                return;
            }
            self.adopt(&d, up, last);
        }
    }

    /// Renews the heartbeat and the list of live nodes; the dead nodes, or `None` when the
    /// registry cannot be reached (logged once until it can again).
    fn renew(&self, up: &mut bool, last: &mut Instant) -> Option<Vec<String>> {
        *last = Instant::now();
        match self.registry.beat(self.pool.workers(), &self.pool.loads()) {
            Ok(beat) => {
                if !*up {
                    log::info!("node {}: heartbeat renewed again", self.own);
                    *up = true;
                }
                if beat.was_gone {
                    log::warn!(
                        "node {}: this node's entry had gone (another node took it for dead \
                         after no heartbeat for --node_ttl and adopted its tasks, or Redis lost \
                         its data); it is live again",
                        self.own
                    );
                }
                *self.live.lock() = beat.live;
                Some(beat.dead)
            }
            Err(e) => {
                if *up {
                    log::error!(
                        "node {}: heartbeat failed: {e}; the others take this node for dead \
                         once --node_ttl has passed",
                        self.own
                    );
                    *up = false;
                }
                None
            }
        }
    }

    /// Adopts every task of dead node `dead`, in chunks, renewing this node's own heartbeat
    /// between them when a beat is due (a large adoption must not make this node look dead).
    fn adopt(&self, dead: &str, up: &mut bool, last: &mut Instant) {
        let (mut count, mut running) = (0usize, 0usize);
        loop {
            match self.registry.adopt(dead) {
                Ok((tasks, more)) => {
                    count += tasks.len();
                    running += tasks.iter().filter(|r| r.was_running).count();
                    self.timer
                        .schedule_all(tasks.into_iter().map(|r| (r.id, r.due_us)).collect());
                    if !more {
                        break;
                    }
                }
                Err(e) => {
                    log::warn!(
                        "node {}: adopting the tasks of dead node {dead} failed: {e}; tried \
                         again at the next heartbeat",
                        self.own
                    );
                    break;
                }
            }
            if last.elapsed() >= self.every && self.renew(up, last).is_none() {
                break;
            }
        }
        if count > 0 {
            log::info!(
                "node {}: adopted {count} tasks of dead node {dead} ({running} were running and \
                 run again)",
                self.own
            );
        }
    }
}
