//! One shape for every thread the server owns: a [`Stage`] has a name, a way to ask it to stop,
//! and the threads to wait for. The server stops its stages in the reverse of their start order,
//! each joined with a deadline. Threads whose death would silently stop the server's work are
//! started with [`spawn_critical`].

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Exit code when a critical thread panicked (EX_SOFTWARE): a supervisor restarts the process,
/// which recovers every unfinished task from the store.
pub(crate) const PANIC_EXIT: i32 = 70;

/// A thread owner: how to stop it and what to join.
pub(crate) struct Stage {
    name: &'static str,
    stop: Option<Box<dyn FnOnce() + Send>>,
    threads: Vec<JoinHandle<()>>,
    /// Its threads may take the whole shutdown grace (running attempts), not the short stop.
    takes_grace: bool,
}

impl Stage {
    /// A stage whose `stop` asks its `threads` to end (without waiting for them).
    pub(crate) fn new(
        name: &'static str,
        stop: impl FnOnce() + Send + 'static,
        threads: Vec<JoinHandle<()>>,
    ) -> Stage {
        Stage {
            name,
            stop: Some(Box::new(stop)),
            threads,
            takes_grace: false,
        }
    }

    /// Marks a stage whose threads may use the whole shutdown grace (the workers).
    pub(crate) fn taking_grace(mut self) -> Stage {
        self.takes_grace = true;
        self
    }

    /// True for a stage marked with [`Stage::taking_grace`].
    pub(crate) fn takes_grace(&self) -> bool {
        self.takes_grace
    }

    /// A stage of one thread `h` that sleeps in `park_timeout` and ends once `stop` is set:
    /// stopping sets it and unparks the thread (a flag and `unpark` rather than a channel: no
    /// channel code of its own in the binary).
    pub(crate) fn unparked(name: &'static str, stop: Arc<AtomicBool>, h: JoinHandle<()>) -> Stage {
        let thread = h.thread().clone();
        Stage::new(
            name,
            move || {
                stop.store(true, Ordering::Release);
                thread.unpark();
            },
            vec![h],
        )
    }

    /// A stage with threads that end by themselves once an earlier stage has stopped.
    pub(crate) fn joined(name: &'static str, threads: Vec<JoinHandle<()>>) -> Stage {
        Stage {
            name,
            stop: None,
            threads,
            takes_grace: false,
        }
    }

    /// Asks the stage to stop, then waits for its threads until `within` has passed; true when
    /// every thread ended in time (the others are left running, and logged).
    pub(crate) fn stop_and_join(mut self, within: Duration) -> bool {
        if let Some(stop) = self.stop.take() {
            stop();
        }
        let deadline = Instant::now() + within;
        let mut all = true;
        for t in self.threads {
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                if t.join().is_err() {
                    log::error!("{}: a thread ended with a panic", self.name);
                }
            } else {
                all = false;
            }
        }
        if !all {
            log::warn!(
                "{}: still running after {within:?}; not waited for",
                self.name
            );
        }
        all
    }
}

/// Starts a named thread whose panic ends the process with [`PANIC_EXIT`] after logging it: a
/// dead outcome, timer or expiry thread would otherwise leave a server that accepts tasks and
/// never finishes them.
pub(crate) fn spawn_critical(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    spawn_boxed(name, Box::new(f))
}

/// Not generic: one instance of the thread-spawning code serves every critical thread.
fn spawn_boxed(name: &str, body: Box<dyn FnOnce() + Send>) -> std::io::Result<JoinHandle<()>> {
    let label = name.to_string();
    thread::Builder::new()
        .name(label.clone())
        .spawn(move || critical(&label, body))
}

/// Runs `body` on the calling thread (named `name` in the log); a panic ends the process with
/// [`PANIC_EXIT`] after logging it. For critical threads that borrow (scoped ones).
pub(crate) fn critical(name: &str, body: Box<dyn FnOnce() + Send + '_>) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(body)) {
        log::error!(
            "the {name} thread panicked ({}); exiting with code {PANIC_EXIT} so that a supervisor restarts poulpe (unfinished tasks are in the store)",
            panic_message(p.as_ref())
        );
        std::process::exit(PANIC_EXIT);
    }
}

/// The message of a panic payload.
pub(crate) fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn stops_then_joins_within_the_deadline() {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let t = thread::spawn(move || {
            while !s2.load(Ordering::Acquire) {
                thread::sleep(Duration::from_millis(1));
            }
        });
        let stage = Stage::new("test", move || stop.store(true, Ordering::Release), vec![t]);
        assert!(stage.stop_and_join(Duration::from_secs(5)));
        let stuck = thread::spawn(|| thread::sleep(Duration::from_millis(300)));
        assert!(!Stage::joined("stuck", vec![stuck]).stop_and_join(Duration::from_millis(20)));
    }
}
