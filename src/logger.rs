//! The process's logger: one line per event on stderr, `[time LEVEL target] message`.
//!
//! Twenty lines instead of env_logger: the level comes from `--log` alone (no `RUST_LOG`
//! filter syntax to parse), and the static binary has a size budget.

use log::{LevelFilter, Log, Metadata, Record};
use std::io::Write;

struct Stderr(LevelFilter);

impl Log for Stderr {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.0
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // One buffer, one write: lines of different threads never interleave.
        let line = format!(
            "[{} {:<5} {}] {}\n",
            crate::clock::rfc3339_ms(crate::clock::now_ms()),
            r.level(),
            r.target(),
            r.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Sends every log event at `level` or more severe to stderr, for the rest of the process.
/// A second call changes nothing.
pub fn init(level: LevelFilter) {
    if log::set_logger(Box::leak(Box::new(Stderr(level)))).is_ok() {
        log::set_max_level(level);
    }
}
