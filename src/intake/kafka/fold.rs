//! Folds a run of Kafka client errors into a few log lines: the first error of a run at once,
//! then at most one line a period that counts the errors left out, and one line when it ends.

use std::time::{Duration, Instant};

/// The line to log for an error; [`ErrorFold::error`] returns none for an error it folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Line {
    /// A run of errors begins: log this error. `folded` counts errors left out before it (of
    /// runs too short or too close to the previous line to be told).
    Failing { folded: u64 },
    /// The run goes on: log this error with the count of those left out since the last line.
    Still { folded: u64, lasted: Duration },
}

/// The line to log when a told run of errors ends: the broker answered again after `lasted`;
/// `folded` errors were left out since the last line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Back {
    pub(crate) folded: u64,
    pub(crate) lasted: Duration,
}

/// The state of the errors of one Kafka adapter, shared by its consumer and its producer.
///
/// No two lines come less than `every` apart, but for the one that says a run ended. So a run
/// that begins less than `every` after the previous line is told when `every` has passed (if it
/// still goes on), and one that ends before that is only counted.
#[derive(Debug)]
pub(crate) struct ErrorFold {
    every: Duration,
    /// When the last line was logged.
    last_line: Option<Instant>,
    /// The current run of errors: when it began, and whether a line told it.
    run: Option<(Instant, bool)>,
    /// Errors left out since the last line.
    folded: u64,
}

impl ErrorFold {
    /// No lines yet, no run.
    pub(crate) fn new(every: Duration) -> ErrorFold {
        ErrorFold {
            every,
            last_line: None,
            run: None,
            folded: 0,
        }
    }

    /// An error at `now`: the line to log, or none when it is folded (counted only).
    pub(crate) fn error(&mut self, now: Instant) -> Option<Line> {
        let (since, told) = *self.run.get_or_insert((now, false));
        let due = self
            .last_line
            .is_none_or(|at| now.saturating_duration_since(at) >= self.every);
        if !due {
            self.folded += 1;
            return None;
        }
        let folded = std::mem::take(&mut self.folded);
        self.last_line = Some(now);
        self.run = Some((since, true));
        Some(if told {
            Line::Still {
                folded,
                lasted: now.saturating_duration_since(since),
            }
        } else {
            Line::Failing { folded }
        })
    }

    /// A sign at `now` that the broker answers: the line saying a told run ended, if one did.
    pub(crate) fn ok(&mut self, now: Instant) -> Option<Back> {
        let (since, told) = self.run.take()?;
        if !told {
            return None;
        }
        self.last_line = Some(now);
        Some(Back {
            folded: std::mem::take(&mut self.folded),
            lasted: now.saturating_duration_since(since),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// An outage with 40 errors a second: its first error is told at once, then one line a
    /// minute counts the errors left out, and the first success says it ended; a second success
    /// says nothing.
    #[test]
    fn a_long_outage_is_one_line_then_one_a_minute_then_one_when_it_ends() {
        let t0 = Instant::now();
        let mut f = ErrorFold::new(MINUTE);
        assert_eq!(f.ok(t0), None, "nothing to end");
        let mut lines = Vec::new();
        // 10 minutes and 25 ms of errors, one every 25 ms.
        for i in 0..=24_000u64 {
            let at = ms(i * 25);
            if let Some(l) = f.error(t0 + at) {
                lines.push((at, l));
            }
        }
        assert_eq!(lines.len(), 11, "{lines:?}");
        assert_eq!(lines[0], (ms(0), Line::Failing { folded: 0 }));
        for (n, line) in lines.iter().enumerate().skip(1) {
            let at = MINUTE * n as u32;
            let want = Line::Still {
                folded: 2399,
                lasted: at,
            };
            assert_eq!(*line, (at, want), "line {n}");
        }
        // 40 more errors, then the broker answers.
        for i in 1..=40u64 {
            assert_eq!(f.error(t0 + 10 * MINUTE + ms(i * 25)), None);
        }
        let back = t0 + 10 * MINUTE + ms(1500);
        assert_eq!(
            f.ok(back),
            Some(Back {
                folded: 40,
                lasted: 10 * MINUTE + ms(1500),
            })
        );
        assert_eq!(f.ok(back + ms(1)), None, "told once");
    }

    /// Runs that begin less than a minute after the previous line are counted, not told, until
    /// a minute has passed: a broker that comes and goes every 5 s makes at most two lines a
    /// minute (a run told, its end told).
    #[test]
    fn a_flapping_broker_makes_at_most_two_lines_a_minute() {
        /// A line of either kind, for one list.
        #[derive(Debug, PartialEq, Eq)]
        enum Told {
            Error(Line),
            Back(Back),
        }
        let t0 = Instant::now();
        let mut f = ErrorFold::new(MINUTE);
        let mut told = Vec::new();
        // 10 s periods for 5 minutes: an error at 0 s and 1 s, a success at 5 s.
        for period in 0..30u32 {
            let start = t0 + Duration::from_secs(10) * period;
            for at in [start, start + ms(1000)] {
                if let Some(l) = f.error(at) {
                    told.push((at - t0, Told::Error(l)));
                }
            }
            let at = start + ms(5000);
            if let Some(b) = f.ok(at) {
                told.push((at - t0, Told::Back(b)));
            }
        }
        let back = Told::Back(Back {
            folded: 1,
            lasted: ms(5000),
        });
        assert_eq!(told[0], (ms(0), Told::Error(Line::Failing { folded: 0 })));
        assert_eq!(told[1], (ms(5000), back));
        // The six runs from 10 s to 61 s were counted, 2 errors each.
        assert_eq!(
            told[2],
            (ms(70_000), Told::Error(Line::Failing { folded: 12 }))
        );
        for minute in 0..5u64 {
            let range = ms(minute * 60_000)..ms((minute + 1) * 60_000);
            let n = told.iter().filter(|(at, _)| range.contains(at)).count();
            assert!(n <= 2, "{n} lines in minute {minute}: {told:?}");
        }
    }

    /// A success while a run is not told yet ends it without a line; its errors are counted in
    /// the next line.
    #[test]
    fn a_run_ended_before_it_was_told_is_counted_in_the_next_line() {
        let t0 = Instant::now();
        let mut f = ErrorFold::new(MINUTE);
        assert_eq!(f.error(t0), Some(Line::Failing { folded: 0 }));
        assert!(f.ok(t0 + ms(10)).is_some());
        assert_eq!(f.error(t0 + ms(20)), None);
        assert_eq!(f.ok(t0 + ms(30)), None, "a run that was never told");
        assert_eq!(
            f.error(t0 + ms(10) + MINUTE),
            Some(Line::Failing { folded: 1 })
        );
    }
}
