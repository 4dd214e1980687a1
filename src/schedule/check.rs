//! `poulpe cron-check FILE [--tz Z] [-n N]`: validates a cron file and prints each line's next
//! fire times, without starting the server.

use super::cron::parse_file;
use crate::task::{ExecPolicy, Limits};
use std::ffi::OsString;
use std::path::PathBuf;

/// Runs the check; returns the exit code (0 valid, 2 invalid or bad arguments).
pub fn run(args: Vec<OsString>) -> u8 {
    let mut pargs = pico_args::Arguments::from_vec(args);
    let tz_name: Option<String> = match pargs.opt_value_from_str("--tz") {
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
    let tz_name = tz_name
        .or_else(|| std::env::var("POULPE_TZ").ok())
        .or_else(|| std::env::var("TZ").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "UTC".to_string());
    let tz: chrono_tz::Tz = match tz_name.trim_start_matches(':').parse() {
        Ok(z) => z,
        Err(_) => {
            eprintln!("poulpe cron-check: --tz: unknown IANA time zone {tz_name:?}");
            return 2;
        }
    };
    // Cron programs are trusted; MAIL_TO lines are checked as if a relay were configured.
    let limits = Limits {
        workers: usize::MAX,
        exec: ExecPolicy::Any,
        mail_enabled: true,
        mail_from: std::env::var("POULPE_SMTP_FROM").ok(),
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
