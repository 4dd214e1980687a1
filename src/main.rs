//! The `poulpe` binary: parse flags, start the stages, serve HTTP, stop on SIGTERM/SIGINT.

use poulpe::app;
use poulpe::config::{Config, ConfigError};
use poulpe::intake::http;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::process::ExitCode;
use std::time::Duration;

/// How long running attempts may take to finish after SIGTERM.
const GRACE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "health") {
        args.remove(0);
        return ExitCode::from(poulpe::probe::run(args));
    }
    if args.first().is_some_and(|a| a == "cron-check") {
        args.remove(0);
        return ExitCode::from(poulpe::schedule::check::run(args));
    }
    let config = match Config::from_env_and_args(args) {
        Ok(c) => c,
        Err(e @ (ConfigError::Help | ConfigError::Version)) => {
            println!("{e}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("poulpe: {e}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::new()
        .filter_level(config.log)
        // Same line shape as env_logger's own, with the timestamp from chrono (one clock crate).
        .format(|buf, rec| {
            use std::io::Write;
            writeln!(
                buf,
                "[{} {:<5} {}] {}",
                poulpe::clock::rfc3339_ms(poulpe::clock::now_ms()),
                rec.level(),
                rec.target(),
                rec.args()
            )
        })
        .target(env_logger::Target::Stderr)
        .init();

    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("poulpe: cannot install signal handlers: {e}");
            return ExitCode::from(2);
        }
    };
    // The port first: a server that cannot serve must not open the store and run what it
    // recovers (each failed start would run those tasks again).
    let listening = match poulpe::http::listen((config.bind, config.port).into()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "poulpe: --port: cannot listen on {}:{}: {e}",
                config.bind, config.port
            );
            return ExitCode::from(2);
        }
    };
    let (app, running) = match app::start(config) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("poulpe: {e}");
            return ExitCode::from(2);
        }
    };
    let api = std::sync::Arc::new(http::Api::new(app.clone()));
    if let Err(e) = listening.serve(http::limits(&app), api) {
        eprintln!("poulpe: cannot start HTTP threads: {e}");
        return ExitCode::from(2);
    }
    let place = match &app.config.redis {
        Some(url) => poulpe::store::redis::redacted(url),
        None => app.config.data.display().to_string(),
    };
    log::info!(
        "poulpe {} listening on {}:{} with {} workers, store {} at {place}",
        env!("CARGO_PKG_VERSION"),
        app.config.bind,
        app.config.port,
        app.config.workers,
        app.store.name(),
    );
    for sig in signals.forever() {
        if sig == SIGHUP {
            match &app.cron_tx {
                Some(tx) => {
                    let _ = tx.send(poulpe::schedule::cron_runner::CronCmd::Reload);
                }
                None => log::info!("SIGHUP: no cron file to reload"),
            }
            continue;
        }
        log::info!("signal {sig} received");
        break;
    }
    app::shutdown(&app, running, GRACE);
    listening.stop();
    log::info!("stopped");
    ExitCode::SUCCESS
}
