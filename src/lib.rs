//! poulpe: a lightweight job server.
//!
//! A task passes through these stages, one module each:
//!
//! | stage | module | what it owns |
//! |---|---|---|
//! | flags | [`config`] | command line + `POULPE_*` environment into one checked `Config` |
//! | model | [`task`] | the task record, its final result, and validation of submitted JSON |
//! | transport | [`http`] | HTTP/1.1 connections: strict framing, limits, deadlines, answers |
//! | intake | [`intake`] | `Submitter` (the one way in, cancel and pause); adapters: HTTP API ([`intake::http`]), WebSocket ([`intake::ws`]), Kafka (`intake::kafka`, feature `kafka`) |
//! | storage | [`store`] | the `Store` trait; embedded (redb, group commit, heals after I/O errors) and Redis backends, one contract suite |
//! | time | [`schedule`] | the timer thread (delays, retries); the cron file, its parser, `cron-check` and its thread |
//! | dispatch | [`dispatch`] | per-worker queues, cc-aware least-work routing, idle stealing, pause |
//! | run | [`worker`], [`exec`] | worker threads; HTTP (plain `http://`: our own HTTP/1.1 client; the rest: ureq), program (std::process) and mail (lettre SMTP) executors |
//! | decide | [`outcome`] | succeeded / retry later / dead letter, written in batches |
//! | dead letters | [`deadletter`] | atomic JSON records of dead tasks |
//! | answers | [`results`] | clients waiting for results (`Answers`: lookups and waits) |
//! | observe | [`status`], [`metrics`] | counters and `/sys_info` (`SysInfo`); `/metrics` (Prometheus text) and its histograms |
//! | nodes | [`node`] | this node's id, the registry of nodes sharing one Redis prefix, the heartbeat thread that adopts a dead node's tasks, the thread that hears the others' results, the thread that takes their ready tasks when this node idles |
//! | wiring | [`app`] | starts the stages, hands out narrow handles, stops them in reverse (used by `main.rs` only) |
//! | lifecycle | [`stage`] | one shape for every thread owner; critical threads end the process on panic |
//! | hand-over | [`handoff`] | a small blocking queue between two threads (outcome writes, program starts) |
//! | probe | [`probe`] | `poulpe health`, the container health check |
//! | log | [`logger`] | one line per event on stderr, at the `--log` level |
//! | replay | [`replay`] | `poulpe replay`: dead-letter records submitted again, each once |
//!
//! `docs/ARCHITECTURE.md` tells the life of a task through these modules and which thread does what.
//!
//! The library has two users outside itself: the binary (`main.rs`: [`config`], [`app`],
//! [`intake::http`], [`intake::ws`], [`probe`], [`replay`], [`schedule::check`], [`clock`],
//! [`logger`] and the Redis URL
//! shown in the log) and the HTTP server of the tests' sink and the bench tool ([`http`]). Only
//! what they use is `pub` (with the types its signatures name); the rest is `pub(crate)`, so the
//! compiler reports what nothing uses.
//! These docs are for the crate's developers: `cargo doc --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

pub mod app;
pub mod clock;
pub mod config;
mod deadletter;
mod dispatch;
mod exec;
mod handoff;
pub mod http;
pub mod intake;
pub mod logger;
mod metrics;
mod node;
mod outcome;
pub mod probe;
pub mod replay;
mod results;
pub mod schedule;
mod stage;
mod status;
pub mod store;
mod task;
mod worker;
