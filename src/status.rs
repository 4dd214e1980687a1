//! Counters and the `/sys_info` document.

use crate::clock::rfc3339_ms;
use crate::dispatch::Pool;
use crate::intake::Origin;
use crate::metrics::Histogram;
use crate::schedule::cron_runner::CronStatus;
use crate::store::Store;
use crate::task::{FinalStatus, Method, Task};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// Most ids listed per key in `/sys_info`.
pub(crate) const LIST_CAP: usize = 1000;

/// The Kafka adapter's state for `/sys_info`.
#[derive(Default)]
pub(crate) struct KafkaStatus {
    pub(crate) connected: std::sync::atomic::AtomicBool,
    pub(crate) consumed: AtomicU64,
    pub(crate) produced: AtomicU64,
    pub(crate) last_error: Mutex<Option<String>>,
}

impl KafkaStatus {
    /// Records a client error (shown as `last_error`).
    #[cfg(feature = "kafka")]
    pub(crate) fn error(&self, e: impl std::fmt::Display) {
        *self.last_error.lock() = Some(e.to_string());
    }

    fn json(&self) -> Value {
        json!({
            "connected": self.connected.load(Relaxed),
            "consumed": self.consumed.load(Relaxed),
            "produced": self.produced.load(Relaxed),
            "last_error": *self.last_error.lock(),
        })
    }
}

/// Server-wide counters since start.
pub(crate) struct Status {
    started: Instant,
    accepted: AtomicU64,
    succeeded: AtomicU64,
    failed_attempts: AtomicU64,
    dead: AtomicU64,
    cancelled: AtomicU64,
    /// Dead tasks run again by the operator (`POST /task/{id}/retry`, `/tasks/retry`).
    pub(crate) retried: AtomicU64,
    /// Tasks accepted by origin (`Origin as usize`) and method (`Method as usize`).
    pub(crate) accepted_by: [[AtomicU64; 4]; 4],
    /// Run time of attempts by method.
    pub(crate) duration: [Histogram; 4],
    /// Start of attempts after their due time.
    pub(crate) lateness: Histogram,
    /// Ids that failed an attempt recently (newest last), at most `LIST_CAP`.
    wronging: Mutex<VecDeque<String>>,
}

impl Default for Status {
    fn default() -> Status {
        Status {
            started: Instant::now(),
            accepted: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            accepted_by: Default::default(),
            duration: Default::default(),
            lateness: Histogram::default(),
            wronging: Mutex::new(VecDeque::new()),
        }
    }
}

impl Status {
    /// Counts `tasks`, just made durable, under their origin and methods.
    pub(crate) fn accepted(&self, origin: Origin, tasks: &[Task]) {
        self.accepted.fetch_add(tasks.len() as u64, Relaxed);
        let row = &self.accepted_by[origin as usize];
        for t in tasks {
            row[t.method as usize].fetch_add(1, Relaxed);
        }
    }

    /// Records an attempt of `method` that started `late_us` after it was due and ran `run_us`.
    pub(crate) fn attempt(&self, method: Method, late_us: u64, run_us: u64) {
        self.duration[method as usize].observe(run_us);
        self.lateness.observe(late_us);
    }

    /// Succeeded, dead, cancelled, failed attempts.
    pub(crate) fn counts(&self) -> [u64; 4] {
        [
            self.succeeded.load(Relaxed),
            self.dead.load(Relaxed),
            self.cancelled.load(Relaxed),
            self.failed_attempts.load(Relaxed),
        ]
    }

    /// Whole seconds since start.
    pub(crate) fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    pub(crate) fn attempt_failed(&self, id: &str) {
        self.failed_attempts.fetch_add(1, Relaxed);
        let mut w = self.wronging.lock();
        if let Some(pos) = w.iter().position(|x| x == id) {
            w.remove(pos);
        }
        if w.len() >= LIST_CAP {
            w.pop_front();
        }
        w.push_back(id.to_string());
    }

    pub(crate) fn finished(&self, how: FinalStatus) {
        let counter = match how {
            FinalStatus::Succeeded => &self.succeeded,
            FinalStatus::Dead => &self.dead,
            FinalStatus::Cancelled => &self.cancelled,
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// Builds the `/sys_info` document from read-only views of the stages.
#[derive(Clone)]
pub struct SysInfo {
    pub(crate) status: Arc<Status>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) store: Arc<dyn Store>,
    /// The cron schedule (empty without `--cron`).
    pub(crate) cron: CronStatus,
    /// The Kafka adapter's state, when Kafka is configured.
    pub(crate) kafka: Option<Arc<KafkaStatus>>,
    /// The cron schedule's zone, and where it came from (`--tz`, `TZ`, `/etc/localtime`, …).
    pub(crate) tz: (chrono_tz::Tz, String),
    /// This node and the live ones (`node`, `nodes`).
    pub(crate) nodes: crate::node::Nodes,
}

impl SysInfo {
    /// The store's name (`embedded` or `redis`), for the start-up log line.
    pub fn store_name(&self) -> &'static str {
        self.store.name()
    }

    /// The `/sys_info` document.
    pub(crate) fn json(&self) -> Value {
        let (pool, store, st) = (&*self.pool, &*self.store, &*self.status);
        let loads = pool.loads();
        let (summary, store_ok) = match store.summary(LIST_CAP) {
            Ok(s) => (s, store.healthy()),
            Err(e) => {
                log::warn!("sys_info: store summary failed: {e}");
                (Default::default(), false)
            }
        };
        let wronging: Vec<String> = st.wronging.lock().iter().rev().cloned().collect();
        json!({
            "working_keys": summary.running,
            "working_total": summary.running_total,
            "delaying_keys": summary.waiting,
            "delaying_total": summary.waiting_total,
            "wronging_keys": wronging,
            "queued_total": summary.ready_total,
            "paused": pool.paused(),
            "channel_sizes": loads.iter().map(|l| l.queued).collect::<Vec<_>>(),
            "workers": loads.iter().map(|l| json!({
                "id": l.id,
                "queued": l.queued,
                "running": usize::from(l.running.is_some()),
                "task": l.running,
            })).collect::<Vec<_>>(),
            "counts": {
                "accepted": st.accepted.load(Relaxed),
                "succeeded": st.succeeded.load(Relaxed),
                "failed_attempts": st.failed_attempts.load(Relaxed),
                "dead": st.dead.load(Relaxed),
                "cancelled": st.cancelled.load(Relaxed),
            },
            "uptime_s": st.started.elapsed().as_secs(),
            "version": env!("CARGO_PKG_VERSION"),
            "store": {"kind": store.name(), "up": store_ok},
            "results_stored": store.results_stored().ok(),
            "data_bytes": store.data_bytes(),
            "cron": self.cron_lines(),
            "tz": {"name": self.tz.0.name(), "from": self.tz.1},
            "kafka": self.kafka.as_ref().map(|k| k.json()),
            "node": &*self.nodes.own,
            "nodes": self.nodes.json(pool.workers(), pool.running()),
        })
    }
}

impl SysInfo {
    /// Each cron line with its next and last firing and the last firing's outcome.
    fn cron_lines(&self) -> Vec<Value> {
        let lines = self.cron.lock().clone();
        lines
            .into_iter()
            .map(|l| {
                let last_result = l
                    .last_id
                    .as_deref()
                    .map(|id| last_outcome(&*self.store, id));
                json!({
                    "line": l.line,
                    "expr": l.expr,
                    "name": l.name,
                    "method": l.method,
                    "next": l.next.map(|t| rfc3339_ms(t * 1000)),
                    "last": l.last.map(|t| rfc3339_ms(t * 1000)),
                    "last_id": l.last_id,
                    "last_result": last_result,
                })
            })
            .collect()
    }
}

/// `succeeded`, `dead`, the current state, or `unknown` (expired or never stored).
fn last_outcome(store: &dyn Store, id: &str) -> String {
    if let Ok(Some(r)) = store.result(id) {
        return r.status.as_str().to_string();
    }
    match store.status(id) {
        Ok(Some(s)) => s.as_str().to_string(),
        _ => "unknown".to_string(),
    }
}
