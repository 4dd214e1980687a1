//! `poulpe cron-check FILE [--tz Z] [-n N] [--smtp_from ADDR]`: validates a cron file and prints
//! each line's next fire times, without starting the server.

use super::cron::parse_file;
use crate::config::{flags, process_env, sender, time_zone, Env};
use crate::task::{ExecPolicy, Limits, Method};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// What `poulpe cron-check --help` prints.
const HELP: &str = "poulpe cron-check - check a cron file and print each line's next fire times, \
without starting the server

USAGE:
  poulpe cron-check FILE [--tz ZONE] [-n N] [--smtp_from ADDR]

FLAGS:
  --tz <v>          IANA zone of the schedule [default: POULPE_TZ, else TZ, else the system zone, else UTC]
  -n <v>            fire times shown per line [default: 5]
  --smtp_from <v>   default sender of MAIL_TO lines, as for the server (POULPE_SMTP_FROM)
  -h, --help        print this help

Exit code 0 when the file is valid; 2 and FILE:LINE: reason when it is not.";

/// Runs the check; returns the exit code (0 valid or help, 2 invalid or bad arguments).
pub fn run(args: Vec<OsString>) -> u8 {
    run_in(args, &process_env)
}

/// [`run`] with an explicit environment lookup. The zone is found as the server finds it:
/// `--tz`, else `POULPE_TZ`, else `TZ`, else the system's zone, else UTC.
pub(crate) fn run_in(args: Vec<OsString>, env: Env<'_>) -> u8 {
    let args = args.into_iter().map(flags::normalize).collect();
    let mut pargs = pico_args::Arguments::from_vec(args);
    if pargs.contains(["-h", "--help"]) {
        println!("{HELP}");
        return 0;
    }
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
    let from_cli: Option<String> = match pargs.opt_value_from_str(flags::SMTP_FROM.key) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("poulpe cron-check: --smtp_from: {e}");
            return 2;
        }
    };
    let free = pargs.finish();
    let [file] = free.as_slice() else {
        eprintln!("usage: poulpe cron-check FILE [--tz ZONE] [-n N] [--smtp_from ADDR]");
        return 2;
    };
    // The default sender of MAIL_TO lines, checked as the server checks it.
    let mail_from = match from_cli.as_deref() {
        Some(v) => sender(v).map(Some),
        None => flags::SMTP_FROM
            .env_value(env)
            .map(|v| sender(&v).map_err(|e| e.in_env(true)))
            .transpose(),
    };
    let mail_from = match mail_from {
        Ok(f) => f,
        Err(e) => {
            eprintln!("poulpe cron-check: {e}");
            return 2;
        }
    };
    let given_from = if tz_name.is_some() {
        "--tz"
    } else {
        "POULPE_TZ"
    };
    let tz_name = tz_name.or_else(|| flags::TZ.env_value(env));
    let (tz, tz_from) = match time_zone(tz_name.as_deref(), given_from, env, Path::new("/")) {
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
        mail_from,
    };
    let path = PathBuf::from(file);
    match parse_file(&path, &limits, tz) {
        Ok(lines) => {
            let now = chrono::Utc::now();
            println!(
                "{}: {} lines, times in {tz} (from {tz_from})",
                path.display(),
                lines.len()
            );
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
            let mail: Vec<String> = lines
                .iter()
                .filter(|l| l.method == Method::MailTo)
                .map(|l| l.line.to_string())
                .collect();
            if !mail.is_empty() {
                let (s, them) = if mail.len() == 1 {
                    ("", "it")
                } else {
                    ("s", "them")
                };
                println!(
                    "note: MAIL_TO on line{s} {}: the server needs --smtp_server (an SMTP relay) \
                     to run {them}",
                    mail.join(", ")
                );
            }
            0
        }
        Err(e) => {
            eprintln!("{e}");
            2
        }
    }
}
