//! Time-driven stages: the timer that releases delayed and retry-waiting tasks (and, later, cron).

pub mod timer;
