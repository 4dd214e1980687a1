//! Worker threads: each takes tasks from the dispatcher, claims them in the store (with their cc
//! slot of the cluster when several nodes share a Redis), runs one attempt and hands the outcome
//! on. A panic in an executor is a failed attempt, not a dead thread.

use crate::clock::now_ms;
use crate::dispatch::Pool;
use crate::exec::{Executors, RunResult};
use crate::outcome::Outcome;
use crate::store::{Claim, Store};
use crossbeam_channel::Sender;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Lowers the calling thread's CPU priority by `nice` steps (`--worker_nice`) from where the
/// server runs (on Linux, nice is per thread). Under full load the intake, the store writer
/// and the outcome stage then get the CPU before more attempts run, so outcomes are recorded
/// as fast as attempts end (what a crash would run again stays small) instead of lagging
/// behind busy workers. Programs of EXEC tasks do not inherit it (`program::Spawner`).
fn lower_priority(nice: i32) {
    if nice <= 0 {
        return;
    }
    // SAFETY: nice(2) takes no pointers and acts on the calling thread; errno is cleared
    // first because -1 is also a valid new nice value.
    let failed = unsafe {
        *libc::__errno_location() = 0;
        libc::nice(nice) == -1 && *libc::__errno_location() != 0
    };
    if failed {
        log::warn!(
            "worker: cannot lower its CPU priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Starts worker `w`.
pub(crate) fn start(
    w: usize,
    nice: i32,
    pool: Arc<Pool>,
    store: Arc<dyn Store>,
    exec: Arc<Executors>,
    outcomes: Sender<Outcome>,
) -> std::io::Result<JoinHandle<()>> {
    // A task's failure is a failed attempt (executors catch panics); a panic anywhere else in
    // the loop would leave a worker silently gone, so it ends the process instead.
    crate::stage::spawn_critical(&format!("worker-{w}"), move || {
        lower_priority(nice);
        run(w, &pool, &*store, &exec, &outcomes)
    })
}

/// First wait (ms) of a worker whose cc slot another node holds; each further refusal doubles
/// it, up to `SLOT_WAIT_MAX`: a slot freed soon is seen soon, a long task elsewhere costs few
/// claims.
const SLOT_WAIT_MIN: u64 = 50;
const SLOT_WAIT_MAX: u64 = 1000;

fn run(w: usize, pool: &Pool, store: &dyn Store, exec: &Executors, outcomes: &Sender<Outcome>) {
    let mut slot_wait = SLOT_WAIT_MIN;
    while let Some(task) = pool.next(w) {
        match store.claim_on(&task, w) {
            Ok(Claim::Won) => {
                if !task.cc.is_empty() {
                    slot_wait = SLOT_WAIT_MIN;
                }
            }
            Ok(Claim::Lost) => {
                // Cancelled, or another claimer won: nothing to run.
                pool.done(w);
                continue;
            }
            Ok(Claim::Busy) => {
                // Still ready in the store: at shutdown it stays there for the next start.
                pool.held_elsewhere(w, task, Duration::from_millis(slot_wait));
                slot_wait = SLOT_WAIT_MAX.min(slot_wait * 2);
                continue;
            }
            Err(e) => {
                log::error!(
                    "worker {w}: cannot claim task {}: {e}; trying again in 1 s",
                    task.id
                );
                pool.done(w);
                thread::sleep(Duration::from_secs(1));
                pool.dispatch(task);
                continue;
            }
        }
        let started_ms = now_ms();
        let run = catch_unwind(AssertUnwindSafe(|| exec.run(&task))).unwrap_or_else(|p| {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            log::error!("worker {w}: task {} panicked: {what}", task.id);
            RunResult::failed(format!("internal error: {what}"))
        });
        store.release(&task, w);
        let outcome = Outcome {
            task,
            worker: w,
            started_ms,
            finished_ms: now_ms(),
            run,
        };
        if outcomes.send(outcome).is_err() {
            log::error!("worker {w}: the outcome stage has stopped");
            pool.done(w);
            return;
        }
        pool.done(w);
    }
}
