//! `poulpe cron-check FILE [--tz Z] [-n N]`: validates a cron file and prints each line's next
//! fire times, without starting the server.

use super::cron::parse_file;
use crate::config::{flags, process_env, time_zone, Env};
use crate::task::{ExecPolicy, Limits};
use std::ffi::OsString;
use std::path::PathBuf;

/// Runs the check; returns the exit code (0 valid, 2 invalid or bad arguments).
pub fn run(args: Vec<OsString>) -> u8 {
    run_in(args, &process_env)
}

/// [`run`] with an explicit environment lookup. The zone is found as the server finds it:
/// `--tz`, else `POULPE_TZ`, else `TZ`, else UTC.
pub(crate) fn run_in(args: Vec<OsString>, env: Env<'_>) -> u8 {
    let mut pargs = pico_args::Arguments::from_vec(args);
    let tz_name: Option<String> = match pargs.opt_value_from_str(flags::TZ.key) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("poulpe cron-check: --tz: {e}");
            return 2;
        }
    };
    let n: usize = match pargs.opt_value_from_str("-n") {
        Ok(v) => v.unwrap_or(5),
        Err(e) => {
            eprintln!("poulpe cron-check: -n: {e}");
            return 2;
        }
    };
    let free = pargs.finish();
    let [file] = free.as_slice() else {
        eprintln!("usage: poulpe cron-check FILE [--tz ZONE] [-n N]");
        return 2;
    };
    let tz_name = tz_name.or_else(|| flags::TZ.env_value(env));
    let tz = match time_zone(tz_name.as_deref(), env) {
        Ok(z) => z,
        Err(tz_name) => {
            eprintln!("poulpe cron-check: --tz: unknown IANA time zone {tz_name:?}");
            return 2;
        }
    };
    // Cron programs are trusted; MAIL_TO lines are checked as if a relay were configured.
    let limits = Limits {
        workers: usize::MAX,
        exec: ExecPolicy::Any,
        mail_enabled: true,
        mail_from: flags::SMTP_FROM.env_value(env),
    };
    let path = PathBuf::from(file);
    match parse_file(&path, &limits, tz) {
        Ok(lines) => {
            let now = chrono::Utc::now();
            println!("{}: {} lines, times in {tz}", path.display(), lines.len());
            for l in &lines {
                println!(
                    "{}:{}  {}  {} {} {}",
                    path.display(),
                    l.line,
                    l.expr,
                    l.method.as_str(),
                    l.name,
                    l.params
                );
                for t in l.upcoming(now, tz, n) {
                    println!("    {}", t.format("%Y-%m-%d %H:%M:%S %Z (%:z)"));
                }
            }
            0
        }
        Err(e) => {
            eprintln!("{e}");
            2
        }
    }
}
