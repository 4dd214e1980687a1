//! `/metrics`: the counters of [`crate::status`] as Prometheus text (format 0.0.4), the
//! lock-free histogram behind its run times and lateness, and the count of HTTP answers by code.

use crate::status::SysInfo;
use crate::task::Method;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Bucket bounds of a histogram: upper bounds in microseconds, the same as `le` labels in
/// seconds with `+Inf` last (one more label than bounds, at most [`MAX_BUCKETS`]).
pub(crate) struct Bounds {
    us: &'static [u64],
    le: &'static [&'static str],
}

/// Most buckets a histogram has, `+Inf` included.
const MAX_BUCKETS: usize = 12;

/// Bounds of run times and lateness: 1 ms to 60 s.
pub(crate) const TASK_BOUNDS: Bounds = Bounds {
    us: &[
        1_000, 5_000, 10_000, 50_000, 100_000, 500_000, 1_000_000, 5_000_000, 10_000_000,
        60_000_000,
    ],
    le: &[
        "0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1", "5", "10", "60", "+Inf",
    ],
};

/// Bounds of store commits: 100 µs to 0.5 s.
pub(crate) const COMMIT_BOUNDS: Bounds = Bounds {
    us: &[
        100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 500_000,
    ],
    le: &[
        "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
        "0.5", "+Inf",
    ],
};

/// Time of each durable write the store makes (embedded: a group commit, its synchronous journal
/// append; Redis: an insert call or a `RECORD` call). One per process, as the store is.
pub(crate) static STORE_COMMIT: Histogram = Histogram::new(&COMMIT_BOUNDS);

/// Time from the end of each attempt to its durable outcome (succeeded, retry armed or dead):
/// how far recording lags behind execution, which a crash would turn into runs done again.
pub(crate) static OUTCOME_LAG: Histogram = Histogram::new(&COMMIT_BOUNDS);

/// The methods in label order: index `method as usize`.
pub(crate) const METHODS: [Method; 4] = [Method::Get, Method::Post, Method::Exec, Method::MailTo];

/// The origins' labels in order: index `Origin as usize`.
const ORIGINS: [&str; 4] = ["http", "ws", "cron", "kafka"];

/// A histogram of durations: one counter per bucket (not cumulative: summed when rendered) and
/// the sum in microseconds. Relaxed atomics: a scrape may see an observation in the count but
/// not yet in the sum.
pub(crate) struct Histogram {
    bounds: &'static Bounds,
    buckets: [AtomicU64; MAX_BUCKETS],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    /// A histogram of task times ([`TASK_BOUNDS`]).
    fn default() -> Self {
        Self::new(&TASK_BOUNDS)
    }
}

impl Histogram {
    /// An empty histogram with `bounds`.
    pub(crate) const fn new(bounds: &'static Bounds) -> Self {
        assert!(bounds.le.len() == bounds.us.len() + 1 && bounds.le.len() <= MAX_BUCKETS);
        Self {
            bounds,
            buckets: [const { AtomicU64::new(0) }; MAX_BUCKETS],
            sum_us: AtomicU64::new(0),
        }
    }

    /// Records the time since `t0`.
    pub(crate) fn since(&self, t0: std::time::Instant) {
        self.observe(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
    }

    /// Records one duration of `us` microseconds.
    pub(crate) fn observe(&self, us: u64) {
        let b = self.bounds.us;
        let i = b.iter().position(|&b| us <= b).unwrap_or(b.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines; `labels` is empty or `k="v"`.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut total = 0;
        for (b, le) in self.buckets.iter().zip(self.bounds.le) {
            total += b.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {total}");
        }
        let braces = |out: &mut String| {
            if !labels.is_empty() {
                let _ = write!(out, "{{{labels}}}");
            }
        };
        let sum = self.sum_us.load(Relaxed);
        let _ = write!(out, "{name}_sum");
        braces(out);
        let _ = writeln!(out, " {}.{:06}", sum / 1_000_000, sum % 1_000_000);
        let _ = write!(out, "{name}_count");
        braces(out);
        let _ = writeln!(out, " {total}");
    }
}

/// Status codes counted by name; any other is counted as `other`.
const CODES: [u16; 21] = [
    101, 200, 202, 204, 400, 401, 403, 404, 405, 408, 409, 411, 413, 414, 417, 426, 431, 500, 501,
    503, 505,
];

/// HTTP answers written since start, by code (the last slot: `other`). One per process: the
/// transport counts every answer it writes, refusals included.
static ANSWERS: [AtomicU64; CODES.len() + 1] = [const { AtomicU64::new(0) }; CODES.len() + 1];

/// Counts one HTTP answer with status `code`.
pub(crate) fn answered(code: u16) {
    let i = CODES.iter().position(|&c| c == code).unwrap_or(CODES.len());
    ANSWERS[i].fetch_add(1, Relaxed);
}

/// Writes the `# HELP` and `# TYPE` lines.
fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes one line without labels.
fn line(out: &mut String, name: &str, value: u64) {
    let _ = writeln!(out, "{name} {value}");
}

/// Writes a metric of one line without labels, with its header.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    head(out, name, kind, help);
    line(out, name, value);
}

impl SysInfo {
    /// The `/metrics` document. Every label value comes from a fixed set: nothing to escape.
    pub(crate) fn metrics(&self) -> String {
        let (st, store) = (&*self.status, &*self.store);
        let mut out = String::with_capacity(8 * 1024);
        let o = &mut out;

        let name = "poulpe_tasks_accepted_total";
        head(o, name, "counter", "Tasks accepted, by adapter and method.");
        for (origin, row) in ORIGINS.iter().zip(&st.accepted_by) {
            for (m, n) in METHODS.iter().zip(row) {
                let (m, n) = (m.as_str(), n.load(Relaxed));
                let _ = writeln!(o, "{name}{{origin=\"{origin}\",method=\"{m}\"}} {n}");
            }
        }
        let c = st.counts();
        single(
            o,
            "poulpe_tasks_succeeded_total",
            "counter",
            "Tasks that succeeded.",
            c[0],
        );
        single(
            o,
            "poulpe_tasks_dead_total",
            "counter",
            "Tasks dead (out of retries).",
            c[1],
        );
        single(
            o,
            "poulpe_tasks_cancelled_total",
            "counter",
            "Tasks cancelled.",
            c[2],
        );
        let help = "Dead tasks retried by the operator.";
        let n = st.retried.load(Relaxed);
        single(o, "poulpe_tasks_retried_total", "counter", help, n);
        let help = "Attempts that failed.";
        single(
            o,
            "poulpe_task_attempts_failed_total",
            "counter",
            help,
            c[3],
        );

        let help = "1 while workers are paused (POST /pause).";
        single(
            o,
            "poulpe_paused",
            "gauge",
            help,
            u64::from(self.pool.paused()),
        );
        let name = "poulpe_queue_depth";
        head(o, name, "gauge", "Tasks queued per worker.");
        for l in self.pool.loads() {
            let _ = writeln!(o, "{name}{{worker=\"{}\"}} {}", l.id, l.queued);
        }
        let (summary, store_up) = match store.summary(0) {
            Ok(s) => (s, store.healthy()),
            Err(_) => (Default::default(), false),
        };
        let name = "poulpe_tasks";
        let help =
            "Unfinished tasks by state (without retry_wait, delayed counts retry waits too).";
        head(o, name, "gauge", help);
        let retry = summary.retry_wait_total;
        let delayed = summary.waiting_total.saturating_sub(retry.unwrap_or(0));
        for (state, n) in [
            ("delayed", Some(delayed)),
            ("retry_wait", retry),
            ("queued", Some(summary.ready_total)),
            ("running", Some(summary.running_total)),
        ] {
            if let Some(n) = n {
                let _ = writeln!(o, "{name}{{state=\"{state}\"}} {n}");
            }
        }

        let name = "poulpe_task_duration_seconds";
        head(o, name, "histogram", "Run time of attempts, by method.");
        for (m, h) in METHODS.iter().zip(&st.duration) {
            h.render(o, name, &format!("method=\"{}\"", m.as_str()));
        }
        let name = "poulpe_task_lateness_seconds";
        head(o, name, "histogram", "Time from due to start of attempts.");
        st.lateness.render(o, name, "");
        let name = "poulpe_store_commit_seconds";
        let help =
            "Time of durable store writes (embedded: group commits; Redis: inserts and records).";
        head(o, name, "histogram", help);
        STORE_COMMIT.render(o, name, "");
        let name = "poulpe_outcome_lag_seconds";
        let help = "Time from the end of an attempt to its durable outcome.";
        head(o, name, "histogram", help);
        OUTCOME_LAG.render(o, name, "");

        let name = "poulpe_http_requests_total";
        head(o, name, "counter", "HTTP answers written, by status code.");
        for (i, n) in ANSWERS.iter().enumerate() {
            let n = n.load(Relaxed);
            match CODES.get(i) {
                Some(code) => {
                    if n > 0 {
                        let _ = writeln!(o, "{name}{{code=\"{code}\"}} {n}");
                    }
                }
                None => {
                    let _ = writeln!(o, "{name}{{code=\"other\"}} {n}");
                }
            }
        }

        let help = "Lines of the cron schedule (0 without --cron).";
        let lines = self.cron.lock().len() as u64;
        single(o, "poulpe_cron_lines", "gauge", help, lines);
        let help = "Cron firings submitted.";
        let n = crate::schedule::cron_runner::FIRINGS.load(Relaxed);
        single(o, "poulpe_cron_firings_total", "counter", help, n);
        let help = "Seconds since start.";
        single(o, "poulpe_uptime_seconds", "gauge", help, st.uptime_s());
        let help = "1 when the store answers.";
        single(o, "poulpe_store_up", "gauge", help, u64::from(store_up));
        if let Ok(n) = store.results_stored() {
            let help = "Finished results kept.";
            single(o, "poulpe_results_stored", "gauge", help, n as u64);
        }
        if let Some(k) = &self.kafka {
            let help = "1 when the Kafka client is connected.";
            let up = u64::from(k.connected.load(Relaxed));
            single(o, "poulpe_kafka_connected", "gauge", help, up);
            let help = "Messages consumed from the task topic.";
            single(
                o,
                "poulpe_kafka_consumed_total",
                "counter",
                help,
                k.consumed.load(Relaxed),
            );
            let help = "Results produced to the result topic.";
            single(
                o,
                "poulpe_kafka_produced_total",
                "counter",
                help,
                k.produced.load(Relaxed),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_text() {
        let h = Histogram::default();
        for us in [0, 1_000, 1_001, 2_500_000, 61_000_000] {
            h.observe(us);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "method=\"GET\"");
        let want = "\
x_bucket{method=\"GET\",le=\"0.001\"} 2
x_bucket{method=\"GET\",le=\"0.005\"} 3
x_bucket{method=\"GET\",le=\"0.01\"} 3
x_bucket{method=\"GET\",le=\"0.05\"} 3
x_bucket{method=\"GET\",le=\"0.1\"} 3
x_bucket{method=\"GET\",le=\"0.5\"} 3
x_bucket{method=\"GET\",le=\"1\"} 3
x_bucket{method=\"GET\",le=\"5\"} 4
x_bucket{method=\"GET\",le=\"10\"} 4
x_bucket{method=\"GET\",le=\"60\"} 4
x_bucket{method=\"GET\",le=\"+Inf\"} 5
x_sum{method=\"GET\"} 63.502001
x_count{method=\"GET\"} 5
";
        assert_eq!(out, want);

        let mut out = String::new();
        Histogram::default().render(&mut out, "y", "");
        assert!(out.starts_with("y_bucket{le=\"0.001\"} 0\n"), "{out}");
        assert!(out.ends_with("y_sum 0.000000\ny_count 0\n"), "{out}");
    }

    #[test]
    fn commit_histogram_text() {
        let h = Histogram::new(&COMMIT_BOUNDS);
        for us in [50, 100, 101, 700, 30_000, 600_000] {
            h.observe(us);
        }
        let mut out = String::new();
        h.render(&mut out, "c", "");
        let want = "\
c_bucket{le=\"0.0001\"} 2
c_bucket{le=\"0.00025\"} 3
c_bucket{le=\"0.0005\"} 3
c_bucket{le=\"0.001\"} 4
c_bucket{le=\"0.0025\"} 4
c_bucket{le=\"0.005\"} 4
c_bucket{le=\"0.01\"} 4
c_bucket{le=\"0.025\"} 4
c_bucket{le=\"0.05\"} 5
c_bucket{le=\"0.1\"} 5
c_bucket{le=\"0.5\"} 5
c_bucket{le=\"+Inf\"} 6
c_sum 0.630951
c_count 6
";
        assert_eq!(out, want);
    }

    #[test]
    fn codes_outside_the_table_count_as_other() {
        let other = |i: usize| ANSWERS[i].load(Relaxed);
        let (before_other, before_404) = (other(CODES.len()), other(7));
        answered(599);
        answered(404);
        assert_eq!(CODES[7], 404);
        assert!(other(CODES.len()) > before_other);
        assert!(other(7) > before_404);
    }

    #[test]
    fn labels_in_index_order() {
        for (i, m) in METHODS.iter().enumerate() {
            assert_eq!(*m as usize, i);
        }
        use crate::intake::Origin;
        let origins = [Origin::Http, Origin::Ws, Origin::Cron, Origin::Kafka];
        for (i, o) in origins.iter().enumerate() {
            assert_eq!(*o as usize, i);
            assert_eq!(ORIGINS[i], format!("{o:?}").to_lowercase());
        }
    }
}
