//! The cron thread: fires each line of the cron file at its times (never early), reloads the
//! file when it changes or on SIGHUP, and runs missed firings once at start with
//! `--cron_catchup last`. Each firing is an ordinary task submitted through `Submitter::submit`.

use super::cron::{parse_file, CronLine};
use crate::clock::now_us;
use crate::intake::{Origin, SubmitError, Submitter};
use crate::store::Store;
use chrono_tz::Tz;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// Commands for the cron thread.
pub(crate) enum CronCmd {
    Reload,
    Stop,
}

/// Most fire times scanned to find a missed firing at start.
const CATCHUP_SCAN: usize = 10_000_000;

/// One line as `/sys_info` shows it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct LineStatus {
    pub(crate) line: usize,
    pub(crate) expr: String,
    pub(crate) name: String,
    pub(crate) method: String,
    /// Unix seconds of the next firing.
    pub(crate) next: Option<i64>,
    /// Unix seconds of the last firing by this process (or caught up).
    pub(crate) last: Option<i64>,
    /// Task id of the last firing.
    pub(crate) last_id: Option<String>,
}

/// Shared view of the schedule for `/sys_info`.
pub(crate) type CronStatus = Arc<Mutex<Vec<LineStatus>>>;

/// Firings submitted since start (catch-ups included; a firing already stored is not counted).
pub(crate) static FIRINGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct Entry {
    line: CronLine,
    next: Option<i64>,
    last: Option<i64>,
}

/// What the cron thread needs: where firings go, where fire times are kept, the zone of the
/// schedule and where it shows it.
pub(crate) struct CronDeps {
    pub(crate) submitter: Submitter,
    /// Last fire times (catch-up) and finished firings (never twice).
    pub(crate) store: Arc<dyn Store>,
    pub(crate) tz: Tz,
    pub(crate) status: CronStatus,
}

/// Starts the cron thread for the already-checked `lines`.
pub(crate) fn start(
    app: CronDeps,
    path: PathBuf,
    lines: Vec<CronLine>,
    catchup: bool,
    rx: Receiver<CronCmd>,
) -> std::io::Result<JoinHandle<()>> {
    crate::stage::spawn_critical("cron", move || {
        Runner::new(app, path, lines).run(catchup, &rx)
    })
}

struct Runner {
    app: CronDeps,
    path: PathBuf,
    entries: Vec<Entry>,
    mtime: Option<SystemTime>,
}

fn meta_key(line: &CronLine) -> String {
    format!("cron_last:{}", line.key)
}

fn mtime(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Runner {
    fn new(app: CronDeps, path: PathBuf, lines: Vec<CronLine>) -> Runner {
        let mtime = mtime(&path);
        let mut r = Runner {
            app,
            path,
            entries: Vec::new(),
            mtime,
        };
        r.install(lines);
        r
    }

    fn now_s() -> i64 {
        (now_us() / 1_000_000) as i64
    }

    /// Replaces the schedule; unchanged lines keep their next and last fire times.
    fn install(&mut self, lines: Vec<CronLine>) {
        let now = Runner::now_s();
        let tz = self.app.tz;
        // Old entries by key, so each new line finds its predecessor without a scan.
        let old: HashMap<String, Entry> = std::mem::take(&mut self.entries)
            .into_iter()
            .map(|e| (e.line.key.clone(), e))
            .collect();
        self.entries = lines
            .into_iter()
            .map(|line| match old.get(&line.key) {
                Some(e) => Entry {
                    next: e.next,
                    last: e.last,
                    line,
                },
                None => Entry {
                    next: line.next_after(now, tz),
                    last: None,
                    line,
                },
            })
            .collect();
        self.publish_status();
    }

    fn publish_status(&self) {
        let list = self
            .entries
            .iter()
            .map(|e| LineStatus {
                line: e.line.line,
                expr: e.line.expr.clone(),
                name: e.line.name.clone(),
                method: e.line.method.as_str().to_string(),
                next: e.next,
                last: e.last,
                last_id: e.last.map(|t| e.line.firing_id(t)),
            })
            .collect();
        *self.app.status.lock() = list;
    }

    fn reload(&mut self, why: &str) {
        self.mtime = mtime(&self.path);
        match parse_file(&self.path, self.app.submitter.limits(), self.app.tz) {
            Ok(lines) => {
                log::info!(
                    "cron: {} reloaded ({why}): {} lines",
                    self.path.display(),
                    lines.len()
                );
                self.install(lines);
            }
            Err(e) => log::error!("cron: {e}; keeping the previous schedule"),
        }
    }

    /// With `--cron_catchup last`: each line that should have fired while poulpe was down runs
    /// once now, as the firing of its last missed time.
    fn catch_up(&mut self) {
        let now = Runner::now_s();
        let tz = self.app.tz;
        for i in 0..self.entries.len() {
            let key = meta_key(&self.entries[i].line);
            let last = match self.app.store.get_meta(&key) {
                Ok(Some(v)) => v.parse::<i64>().ok(),
                Ok(None) => None,
                Err(e) => {
                    log::error!(
                        "cron: cannot read the last fire time of line {}: {e}",
                        self.entries[i].line.line
                    );
                    None
                }
            };
            let Some(last) = last else { continue };
            if let Some(missed) = self.entries[i]
                .line
                .last_between(last, now, tz, CATCHUP_SCAN)
            {
                log::info!(
                    "cron: line {} missed its firing at {missed} while poulpe was down; running it now",
                    self.entries[i].line.line
                );
                self.fire(i, missed);
            }
        }
    }

    /// Submits the firing of entry `i` at unix second `at`.
    fn fire(&mut self, i: usize, at: i64) {
        let line = self.entries[i].line.clone();
        let id = line.firing_id(at);
        // A firing already stored, unfinished or finished (before a restart, or by another
        // node), is refused as a duplicate by the store and never runs twice.
        let submitted = self
            .app
            .submitter
            .submit(&[line.task_json(at)], Origin::Cron, |_| {});
        match submitted {
            Ok(_) | Err(SubmitError::Duplicate(_)) => {
                if submitted.is_ok() {
                    FIRINGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                self.entries[i].last = Some(at);
                if let Err(e) = self.app.store.put_meta(&meta_key(&line), &at.to_string()) {
                    log::warn!(
                        "cron: cannot record the fire time of line {}: {e}",
                        line.line
                    );
                }
            }
            Err(SubmitError::ShuttingDown) => {}
            Err(e) => log::error!("cron: line {} ({id}) not submitted: {e}", line.line),
        }
    }

    fn run(mut self, catchup: bool, rx: &Receiver<CronCmd>) {
        if catchup {
            self.catch_up();
            self.publish_status();
        }
        let tz = self.app.tz;
        loop {
            let before = now_us();
            let soonest = self.entries.iter().filter_map(|e| e.next).min();
            // Wake at the next firing, and at least every second to notice file changes.
            let wait_us = match soonest {
                Some(t) => ((t as u64) * 1_000_000)
                    .saturating_sub(before)
                    .min(1_000_000),
                None => 1_000_000,
            };
            match rx.recv_timeout(Duration::from_micros(wait_us)) {
                Ok(CronCmd::Reload) => self.reload("SIGHUP"),
                Ok(CronCmd::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            let now = now_us();
            let now_s = (now / 1_000_000) as i64;
            let mut fired = false;
            for i in 0..self.entries.len() {
                let Some(t) = self.entries[i].next else {
                    continue;
                };
                // Never early: the whole second must have begun.
                if (t as u64) * 1_000_000 <= now {
                    self.fire(i, t);
                    self.entries[i].next = self.entries[i].line.next_after(t.max(now_s), tz);
                    fired = true;
                }
            }
            if fired {
                self.publish_status();
            }
            if mtime(&self.path) != self.mtime {
                self.reload("file changed");
            }
        }
    }
}
