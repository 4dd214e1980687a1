//! `poulpe health [--host H] [-p|--port P]`: asks a running server's `/health`, so container health
//! checks need no curl or wget (a `scratch` image has neither).

use crate::config::{flags, process_env, Env};
use std::ffi::OsString;
use std::time::Duration;

/// What `poulpe health --help` prints.
const HELP: &str = "poulpe health - ask a running poulpe's /health (for container health checks)

USAGE:
  poulpe health [--host H] [-p|--port P]

FLAGS:
  --host <v>       the server's address [default: 127.0.0.1]
  -p, --port <v>   the server's port [default: POULPE_PORT, else 8000]
  -h, --help    print this help

Exit code 0 when it answers 200, 1 when it does not, 2 on bad arguments.";

/// The server a subcommand talks to (`health`, `replay`): `--host` (default 127.0.0.1), and
/// `-p`/`--port`, else `POULPE_PORT` (ignored when it is not a valid port), else the flag table's
/// default. The error names the flag.
pub(crate) fn server(
    pargs: &mut pico_args::Arguments,
    env: Env<'_>,
) -> Result<(String, u16), String> {
    // `Keys` as the server's flags pass them: one copy of pico_args' code for both.
    let keys = pico_args::Keys::from(["-p", flags::PORT.key]);
    let port = match pargs.opt_value_from_str::<_, String>(keys) {
        Ok(Some(p)) => flags::PORT.number(Some(&p)),
        Ok(None) => flags::PORT
            .number(flags::PORT.env_value(env).as_deref())
            .or_else(|_| flags::PORT.number(None)),
        Err(e) => return Err(format!("--port: {e}")),
    };
    let port: u16 = port.map_err(|e| e.to_string())?;
    let host = pargs
        .opt_value_from_str::<_, String>("--host")
        .map_err(|e| format!("--host: {e}"))?;
    // An IPv6 address goes in brackets in a URL.
    let host = match host {
        Some(h) if h.contains(':') && !h.starts_with('[') => format!("[{h}]"),
        Some(h) => h,
        None => "127.0.0.1".to_string(),
    };
    Ok((host, port))
}

/// Probes `/health`; returns the process exit code (0 healthy or help, 1 not, 2 bad arguments).
pub fn run(args: Vec<OsString>) -> u8 {
    run_in(args, &process_env)
}

/// [`run`] with an explicit environment lookup. The port is the server's: `--port`, else
/// `POULPE_PORT` (ignored when it is not a valid port), else the flag table's default.
pub(crate) fn run_in(args: Vec<OsString>, env: Env<'_>) -> u8 {
    let mut pargs = pico_args::Arguments::from_vec(args);
    if pargs.contains(["-h", "--help"]) {
        println!("{HELP}");
        return 0;
    }
    let (host, port) = match server(&mut pargs, env) {
        Ok(hp) => hp,
        Err(e) => {
            eprintln!("poulpe health: {e}");
            return 2;
        }
    };
    if let Some(extra) = pargs.finish().first() {
        eprintln!("poulpe health: unknown argument {extra:?} (use --host H -p P)");
        return 2;
    }
    let agent = crate::exec::tcp::agent(
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(3)))
            .http_status_as_error(false)
            .build(),
    );
    let url = format!("http://{host}:{port}/health");
    match agent.get(&url).call() {
        Ok(r) if r.status() == 200 => {
            println!("ok: {url}");
            0
        }
        Ok(r) => {
            println!("unhealthy: {url} answered {}", r.status());
            1
        }
        Err(e) => {
            println!("unhealthy: {url}: {e}");
            1
        }
    }
}
