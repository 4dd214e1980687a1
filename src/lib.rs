//! poulpe: a lightweight job server.
//!
//! A task passes through these stages, one module each:
//!
//! | stage | module | what it owns |
//! |---|---|---|
//! | flags | [`config`] | command line + `POULPE_*` environment into one checked `Config` |
//! | model | [`task`] | the task record and validation of submitted JSON |
//! | transport | [`http`] | HTTP/1.1 connections: strict framing, limits, deadlines, answers |
//! | intake | [`intake`] | `submit` (the one way in); the HTTP, WebSocket and Kafka adapters |
//! | storage | [`store`] | the `Store` trait; embedded (redb, group commit) and memory backends |
//! | time | [`schedule`] | the timer thread releasing delayed and retry-waiting tasks |
//! | dispatch | [`dispatch`] | per-worker queues, cc-aware least-work routing, idle stealing |
//! | run | [`worker`], [`exec`] | worker threads; HTTP and program executors |
//! | decide | [`outcome`] | succeeded / retry later / dead letter, written in batches |
//! | dead letters | [`deadletter`] | atomic JSON records of dead tasks |
//! | answers | [`results`] | final results and the clients parked waiting for them |
//! | observe | [`status`] | counters and `/sys_info` |
//! | wiring | [`app`] | starts and stops the threads |
//! | probe | [`probe`] | `poulpe health`, the container health check |

pub mod app;
pub mod clock;
pub mod config;
pub mod deadletter;
pub mod dispatch;
pub mod exec;
pub mod http;
pub mod intake;
pub mod outcome;
pub mod probe;
pub mod results;
pub mod schedule;
pub mod status;
pub mod store;
pub mod task;
pub mod worker;
