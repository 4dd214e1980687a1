//! `poulpe health [--host H] [--port P]`: asks a running server's `/health`, so container health
//! checks need no curl or wget (a `scratch` image has neither).

use std::ffi::OsString;
use std::time::Duration;

/// Probes `/health`; returns the process exit code (0 healthy, 1 not, 2 bad arguments).
pub fn run(args: Vec<OsString>) -> u8 {
    let mut pargs = pico_args::Arguments::from_vec(args);
    let port: u16 = match pargs.opt_value_from_str("--port") {
        Ok(Some(p)) => p,
        Ok(None) => std::env::var("POULPE_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(8000),
        Err(e) => {
            eprintln!("poulpe health: --port: {e}");
            return 2;
        }
    };
    let host: String = match pargs.opt_value_from_str("--host") {
        Ok(h) => h.unwrap_or_else(|| "127.0.0.1".to_string()),
        Err(e) => {
            eprintln!("poulpe health: --host: {e}");
            return 2;
        }
    };
    if let Some(extra) = pargs.finish().first() {
        eprintln!("poulpe health: unknown argument {extra:?} (use --host H --port P)");
        return 2;
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3)))
        .http_status_as_error(false)
        .build()
        .into();
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
