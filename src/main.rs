//! The `poulpe` binary: parse flags, start the stages, serve HTTP, stop on SIGTERM/SIGINT.

use poulpe::app;
use poulpe::config::{Config, ConfigError};
use poulpe::intake::http::{self, Api};
use poulpe::intake::ws::WebSockets;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// How long running attempts may take to finish after SIGTERM.
const GRACE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "health") {
        args.remove(0);
        return ExitCode::from(poulpe::probe::run(args));
    }
    if args.first().is_some_and(|a| a == "replay") {
        args.remove(0);
        return ExitCode::from(poulpe::replay::run(args));
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
    poulpe::logger::init(config.log);

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
    let server = match app::start(config) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("poulpe: {e}");
            return ExitCode::from(2);
        }
    };
    let c = &server.config;
    let ws = match WebSockets::new(
        server.submitter.clone(),
        server.answers.clone(),
        c.token.clone(),
        c.max_ws,
        c.max_body,
        Duration::from_secs(c.ws_idle),
    ) {
        Ok(ws) => Arc::new(ws),
        Err(e) => {
            eprintln!("poulpe: cannot set up WebSocket connections: {e}");
            return ExitCode::from(2);
        }
    };
    let api = Api {
        submitter: server.submitter.clone(),
        answers: server.answers.clone(),
        sys_info: server.sys_info.clone(),
        token: c.token.clone(),
        ws: ws.clone(),
    };
    if let Err(e) = listening.serve(http::limits(c), Arc::new(api)) {
        eprintln!("poulpe: cannot start HTTP threads: {e}");
        return ExitCode::from(2);
    }
    let place = match &c.redis {
        Some(url) => poulpe::store::redis::redacted(url),
        None => c.data.display().to_string(),
    };
    log::info!(
        "poulpe {} listening on {}:{} with {} workers, store {} at {place}",
        env!("CARGO_PKG_VERSION"),
        c.bind,
        c.port,
        c.workers,
        server.sys_info.store_name(),
    );
    for sig in signals.forever() {
        if sig == SIGHUP {
            server.reload_cron();
            continue;
        }
        log::info!("signal {sig} received");
        break;
    }
    ws.close_all();
    server.shutdown(GRACE);
    listening.stop();
    log::info!("stopped");
    ExitCode::SUCCESS
}
