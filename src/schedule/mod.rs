//! Time-driven stages: the timer that releases delayed and retry-waiting tasks, and cron.

pub mod check;
pub mod cron;
pub mod cron_runner;
pub mod timer;
