//! Time-driven stages: the timer that releases delayed and retry-waiting tasks, and cron.

pub mod check;
pub(crate) mod cron;
pub(crate) mod cron_runner;
pub(crate) mod timer;
