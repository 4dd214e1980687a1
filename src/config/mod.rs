//! Command-line flags and `POULPE_*` environment variables, turned into one checked `Config`.

use crate::exec::mail::{Security, SmtpConfig};
use crate::task::ExecPolicy;
use std::ffi::OsString;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

/// How the wait before a retry grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backoff {
    /// Always `retry_interval`.
    Fixed,
    /// `retry_interval × 2^(n-1)`, capped at one hour, ±10 % jitter.
    Exponential,
}

/// Kafka brokers, topics and group.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    pub servers: String,
    pub topic: String,
    pub resp_topic: Option<String>,
    pub group: String,
}

/// Everything the server needs to know, checked once at start-up.
#[derive(Clone, Debug)]
pub struct Config {
    pub port: u16,
    pub bind: IpAddr,
    pub data: PathBuf,
    pub redis: Option<String>,
    /// Prefix of every Redis key.
    pub redis_prefix: String,
    pub cron: Option<PathBuf>,
    /// Run each cron line's missed firing once at start (`--cron_catchup last`).
    pub cron_catchup: bool,
    pub dead: PathBuf,
    pub workers: usize,
    pub retry_interval: u64,
    pub max_retry: u32,
    pub backoff: Backoff,
    pub task_timeout: u64,
    pub result_ttl: u64,
    /// Most finished results kept (`--result_max`); beyond it the oldest are dropped first.
    pub result_max: usize,
    pub exec: ExecPolicy,
    pub token: Option<String>,
    pub max_body: usize,
    /// Most WebSocket connections at once.
    pub max_ws: usize,
    /// Seconds without input before a WebSocket connection is closed.
    pub ws_idle: u64,
    /// Seconds without input before an HTTP connection is closed.
    pub http_idle: u64,
    /// Most HTTP connections served at once (each holds a thread).
    pub max_conns: usize,
    /// PEM bundle of CA certificates for HTTPS tasks, instead of the system or bundled roots.
    pub ca_file: Option<PathBuf>,
    /// The SMTP relay for MAIL_TO, when `--smtp_server` is given.
    pub smtp: Option<SmtpConfig>,
    /// The Kafka intake, when `--kafka_servers` and `--kafka_topic` are given.
    pub kafka: Option<KafkaConfig>,
    pub tz: chrono_tz::Tz,
    pub log: log::LevelFilter,
}

/// What stops start-up (exit code 2), or a request for help/version (exit 0).
#[derive(Debug, PartialEq, Eq)]
pub enum ConfigError {
    Help,
    Version,
    UnknownFlag(String),
    MissingValue(&'static str),
    BadValue {
        flag: &'static str,
        value: String,
        reason: String,
    },
    /// A flag needs a cargo feature this build lacks.
    NoFeature {
        flag: &'static str,
        feature: &'static str,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Help => write!(f, "{}", help_text()),
            ConfigError::Version => write!(f, "poulpe {}", env!("CARGO_PKG_VERSION")),
            ConfigError::UnknownFlag(s) => {
                write!(f, "unknown argument {s:?} (see poulpe --help)")
            }
            ConfigError::MissingValue(flag) => write!(f, "--{flag}: a value is required"),
            ConfigError::BadValue {
                flag,
                value,
                reason,
            } => {
                let shown = if SECRET_FLAGS.contains(flag) {
                    "<hidden>"
                } else {
                    value.as_str()
                };
                write!(f, "--{flag}: bad value {shown:?}: {reason}")
            }
            ConfigError::NoFeature { flag, feature } => write!(
                f,
                "--{flag}: this poulpe was built without the `{feature}` cargo feature"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

const SECRET_FLAGS: &[&str] = &["token", "smtp_pwd"];

/// One flag: name (snake_case), default shown in `--help`, whether it takes a value, help line.
struct Flag {
    name: &'static str,
    default: &'static str,
    switch: bool,
    help: &'static str,
}

const fn flag(name: &'static str, default: &'static str, help: &'static str) -> Flag {
    Flag {
        name,
        default,
        switch: false,
        help,
    }
}

const fn switch(name: &'static str, help: &'static str) -> Flag {
    Flag {
        name,
        default: "off",
        switch: true,
        help,
    }
}

const FLAGS: &[Flag] = &[
    flag("port", "8000", "HTTP and WebSocket port"),
    flag("bind", "0.0.0.0", "listen address"),
    flag("data", "./poulpe-data", "directory of the embedded store"),
    flag(
        "redis",
        "",
        "Redis URL (redis://[:password@]host:port/db); when given, Redis is the store",
    ),
    flag("redis_prefix", "poulpe:", "prefix of every Redis key"),
    flag("cron", "", "cron file"),
    flag(
        "cron_catchup",
        "none",
        "none, or last: run each cron line's missed firing once at start",
    ),
    flag("dead", "<data>/dead", "dead-letter directory"),
    flag("workers", "4", "number of worker threads, numbered 0..N-1"),
    flag("retry_interval", "10", "seconds before a retry"),
    flag("max_retry", "3", "retries after the first attempt"),
    flag(
        "backoff",
        "fixed",
        "fixed, or exponential (interval x 2^(n-1), capped at 1 h, +-10% jitter)",
    ),
    flag("task_timeout", "60", "default seconds one attempt may run"),
    flag(
        "result_ttl",
        "86400",
        "seconds results and dead records stay queryable",
    ),
    flag(
        "result_max",
        "1000000",
        "most finished results kept; beyond it the oldest are dropped first",
    ),
    flag(
        "exec_dir",
        "",
        "EXEC tasks from the network run only programs inside this directory",
    ),
    switch(
        "exec_any",
        "allow EXEC of any program on PATH from the network (UNSAFE)",
    ),
    flag(
        "token",
        "",
        "require 'Authorization: Bearer <token>' (prefer POULPE_TOKEN)",
    ),
    flag(
        "max_body",
        "1048576",
        "request body (and WebSocket frame) limit in bytes",
    ),
    flag(
        "max_ws",
        "256",
        "most WebSocket connections at once (503 beyond)",
    ),
    flag(
        "ws_idle",
        "300",
        "seconds without input before a WebSocket connection is closed",
    ),
    flag(
        "http_idle",
        "75",
        "seconds without input before an HTTP connection is closed (idle keep-alive, stalled client)",
    ),
    flag(
        "max_conns",
        "1024",
        "most HTTP connections at once, WebSocket ones apart (503 beyond)",
    ),
    flag(
        "ca_file",
        "system bundle, else bundled roots",
        "PEM file of CA certificates trusted for HTTPS tasks",
    ),
    flag("smtp_server", "", "SMTP relay host"),
    flag(
        "smtp_port",
        "25, 587 with --starttls, 465 with --smtp_tls",
        "SMTP relay port",
    ),
    flag("smtp_name", "", "SMTP user name"),
    flag("smtp_pwd", "", "SMTP password (prefer POULPE_SMTP_PWD)"),
    switch("starttls", "require STARTTLS"),
    switch("smtp_tls", "implicit TLS (port 465)"),
    flag("smtp_from", "", "default sender address"),
    flag(
        "smtp_ca_file",
        "",
        "PEM file of extra CA certificates trusted for the SMTP relay",
    ),
    flag("kafka_servers", "", "Kafka brokers, comma separated"),
    flag("kafka_topic", "", "Kafka task topic"),
    flag("kafka_resp_topic", "", "Kafka result topic"),
    flag("kafka_group", "poulpe", "Kafka consumer group"),
    flag(
        "tz",
        "TZ env, else UTC",
        "IANA zone name for the cron schedule",
    ),
    flag(
        "log",
        "info",
        "log level: error, warn, info, debug, trace, off",
    ),
];

/// The `--help` text: every flag with its default.
pub fn help_text() -> String {
    let mut s = format!(
        "poulpe {} - a lightweight job server\n\nUSAGE:\n  poulpe [FLAGS]\n\n\
         Every flag may also be set as POULPE_<FLAG> in the environment (POULPE_PORT=8000);\n\
         the command line wins. --retry_interval and --retry-interval are the same flag.\n\nFLAGS:\n",
        env!("CARGO_PKG_VERSION")
    );
    for f in FLAGS {
        let head = if f.switch {
            format!("--{}", f.name)
        } else {
            format!("--{} <v>", f.name)
        };
        let default = if f.default.is_empty() {
            String::new()
        } else {
            format!(" [default: {}]", f.default)
        };
        s.push_str(&format!("  {head:<24} {}{default}\n", f.help));
    }
    s.push_str("  --help                   print this help\n  --version                print the version\n");
    s
}

/// Turns `--retry-interval=5` into `--retry_interval=5`; other arguments stay as they are.
fn normalize(arg: OsString) -> OsString {
    let Some(s) = arg.to_str() else { return arg };
    let Some(rest) = s.strip_prefix("--") else {
        return arg;
    };
    let (name, value) = match rest.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (rest, None),
    };
    let mut out = format!("--{}", name.replace('-', "_"));
    if let Some(v) = value {
        out.push('=');
        out.push_str(v);
    }
    out.into()
}

/// Raw flag values after command line and environment have been merged.
struct Raw {
    values: Vec<(&'static str, Option<String>)>,
}

impl Raw {
    fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.as_deref())
            .filter(|v| !v.is_empty())
    }
}

fn bad(flag: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::BadValue {
        flag,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn parse_switch(flag: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(bad(flag, v, "expected true or false")),
    }
}

fn collect(args: Vec<OsString>, env: &dyn Fn(&str) -> Option<String>) -> Result<Raw, ConfigError> {
    // Kept to name an unknown flag as it was typed (`--no-such`, not `--no_such`).
    let typed = args.clone();
    let mut pargs = pico_args::Arguments::from_vec(args.into_iter().map(normalize).collect());
    if pargs.contains(["-h", "--help"]) {
        return Err(ConfigError::Help);
    }
    if pargs.contains(["-V", "--version"]) {
        return Err(ConfigError::Version);
    }
    let mut values = Vec::new();
    for f in FLAGS {
        // pico-args wants 'static keys; the flag table is small and parsed once per start.
        let key: &'static str = Box::leak(format!("--{}", f.name).into_boxed_str());
        let from_cli = if f.switch {
            pargs.contains(key).then(|| "true".to_string())
        } else {
            pargs
                .opt_value_from_str::<_, String>(key)
                .map_err(|e| match e {
                    pico_args::Error::OptionWithoutAValue(_) => ConfigError::MissingValue(f.name),
                    other => bad(f.name, "", other.to_string()),
                })?
        };
        // `--port --data /x`: the next flag is not a value.
        if !f.switch && from_cli.as_deref().is_some_and(|v| v.starts_with("--")) {
            return Err(ConfigError::MissingValue(f.name));
        }
        let value = from_cli.or_else(|| env(&format!("POULPE_{}", f.name.to_ascii_uppercase())));
        values.push((f.name, value));
    }
    if let Some(extra) = pargs.finish().into_iter().next() {
        let shown = typed
            .into_iter()
            .find(|t| normalize(t.clone()) == extra)
            .unwrap_or(extra);
        return Err(ConfigError::UnknownFlag(
            shown.to_string_lossy().into_owned(),
        ));
    }
    Ok(Raw { values })
}

fn number<T>(raw: &Raw, flag: &'static str, default: T, min: T, max: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    let Some(v) = raw.get(flag) else {
        return Ok(default);
    };
    let n: T = v
        .trim()
        .parse()
        .map_err(|_| bad(flag, v, "expected a whole number"))?;
    if n < min || n > max {
        return Err(bad(flag, v, format!("must be between {min} and {max}")));
    }
    Ok(n)
}

/// The Kafka settings; brokers and task topic go together.
fn kafka_config(raw: &Raw) -> Result<Option<KafkaConfig>, ConfigError> {
    let servers = raw.get("kafka_servers");
    let topic = raw.get("kafka_topic");
    let resp = raw.get("kafka_resp_topic");
    if servers.is_none() && topic.is_none() && resp.is_none() {
        return Ok(None);
    }
    if cfg!(not(feature = "kafka")) {
        return Err(ConfigError::NoFeature {
            flag: "kafka_servers",
            feature: "kafka",
        });
    }
    let servers = servers.ok_or(ConfigError::MissingValue("kafka_servers"))?;
    let topic = topic.ok_or(ConfigError::MissingValue("kafka_topic"))?;
    Ok(Some(KafkaConfig {
        servers: servers.to_string(),
        topic: topic.to_string(),
        resp_topic: resp.map(str::to_string),
        group: raw.get("kafka_group").unwrap_or("poulpe").to_string(),
    }))
}

/// The SMTP relay settings, when `--smtp_server` is given.
fn smtp_config(raw: &Raw) -> Result<Option<SmtpConfig>, ConfigError> {
    let starttls = parse_switch("starttls", raw.get("starttls").unwrap_or(""))?;
    let tls = parse_switch("smtp_tls", raw.get("smtp_tls").unwrap_or(""))?;
    let Some(server) = raw.get("smtp_server") else {
        return Ok(None);
    };
    if starttls && tls {
        return Err(bad(
            "smtp_tls",
            "true",
            "choose --starttls (STARTTLS) or --smtp_tls (implicit TLS), not both",
        ));
    }
    let security = match (starttls, tls) {
        (true, _) => Security::StartTls,
        (_, true) => Security::Tls,
        _ => Security::Plain,
    };
    let default_port = match security {
        Security::Plain => 25,
        Security::StartTls => 587,
        Security::Tls => 465,
    };
    let port = number(raw, "smtp_port", default_port, 1, u16::MAX)?;
    let auth = match (raw.get("smtp_name"), raw.get("smtp_pwd")) {
        (Some(n), Some(p)) => Some((n.to_string(), p.to_string())),
        (Some(_), None) => {
            return Err(ConfigError::MissingValue("smtp_pwd"));
        }
        (None, _) => None,
    };
    let from = match raw.get("smtp_from") {
        None => None,
        Some(f) => {
            f.parse::<lettre::message::Mailbox>()
                .map_err(|e| bad("smtp_from", f, e.to_string()))?;
            Some(f.to_string())
        }
    };
    let ca_file = match raw.get("smtp_ca_file") {
        None => None,
        Some(f) => {
            let pem = std::fs::read(f).map_err(|e| bad("smtp_ca_file", f, e.to_string()))?;
            lettre::transport::smtp::client::Certificate::from_pem(&pem)
                .map_err(|e| bad("smtp_ca_file", f, e.to_string()))?;
            Some(PathBuf::from(f))
        }
    };
    Ok(Some(SmtpConfig {
        server: server.to_string(),
        port,
        auth,
        security,
        from,
        ca_file,
    }))
}

impl Config {
    /// Parses the process's arguments (without the program name) and environment.
    pub fn from_env_and_args(args: Vec<OsString>) -> Result<Config, ConfigError> {
        Config::parse(args, &|k| std::env::var(k).ok())
    }

    /// Parses with an explicit environment lookup (used by tests).
    pub fn parse(
        args: Vec<OsString>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw = collect(args, env)?;
        let port = number(&raw, "port", 8000u16, 0, u16::MAX)?;
        let bind = match raw.get("bind") {
            None => IpAddr::from([0, 0, 0, 0]),
            Some(v) => v.parse().map_err(|_| {
                bad(
                    "bind",
                    v,
                    "expected an IP address like 0.0.0.0 or 127.0.0.1",
                )
            })?,
        };
        let data = PathBuf::from(raw.get("data").unwrap_or("./poulpe-data"));
        let dead = raw
            .get("dead")
            .map(PathBuf::from)
            .unwrap_or_else(|| data.join("dead"));
        let workers = number(&raw, "workers", 4usize, 1, 1024)?;
        let retry_interval = number(&raw, "retry_interval", 10u64, 0, 86_400)?;
        let max_retry = number(&raw, "max_retry", 3u32, 0, 100)?;
        let backoff = match raw.get("backoff") {
            None | Some("fixed") => Backoff::Fixed,
            Some("exponential") => Backoff::Exponential,
            Some(v) => return Err(bad("backoff", v, "expected fixed or exponential")),
        };
        let task_timeout = number(&raw, "task_timeout", 60u64, 1, 86_400)?;
        let result_ttl = number(&raw, "result_ttl", 86_400u64, 1, 10 * 365 * 86_400)?;
        let result_max = number(&raw, "result_max", 1_000_000usize, 0, 1_000_000_000)?;
        let max_body = number(&raw, "max_body", 1_048_576usize, 64, 1 << 30)?;
        let max_ws = number(&raw, "max_ws", 256usize, 1, 65_536)?;
        let ws_idle = number(&raw, "ws_idle", 300u64, 1, 86_400)?;
        let http_idle = number(&raw, "http_idle", 75u64, 1, 86_400)?;
        let max_conns = number(&raw, "max_conns", 1024usize, 1, 65_536)?;
        let ca_file = match raw.get("ca_file") {
            None => None,
            Some(v) => {
                let text =
                    std::fs::read_to_string(v).map_err(|e| bad("ca_file", v, e.to_string()))?;
                if !text.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(bad("ca_file", v, "no PEM certificate in this file"));
                }
                Some(PathBuf::from(v))
            }
        };
        let exec_any = parse_switch("exec_any", raw.get("exec_any").unwrap_or(""))?;
        let exec = match (raw.get("exec_dir"), exec_any) {
            (_, true) => ExecPolicy::Any,
            (Some(dir), false) => {
                let p = PathBuf::from(dir);
                if !p.is_dir() {
                    return Err(bad("exec_dir", dir, "not a directory"));
                }
                ExecPolicy::Dir(
                    p.canonicalize()
                        .map_err(|e| bad("exec_dir", dir, e.to_string()))?,
                )
            }
            (None, false) => ExecPolicy::Disabled,
        };
        let smtp = smtp_config(&raw)?;
        let cron_catchup = match raw.get("cron_catchup") {
            None | Some("none") => false,
            Some("last") => true,
            Some(v) => return Err(bad("cron_catchup", v, "expected none or last")),
        };
        let tz_name = raw
            .get("tz")
            .map(str::to_string)
            .or_else(|| std::env::var("TZ").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "UTC".to_string());
        let tz: chrono_tz::Tz = tz_name
            .trim_start_matches(':')
            .parse()
            .map_err(|_| bad("tz", &tz_name, "unknown IANA time zone (e.g. Europe/Paris)"))?;
        let log = match raw.get("log") {
            None => log::LevelFilter::Info,
            Some(v) => v
                .parse()
                .map_err(|_| bad("log", v, "expected error, warn, info, debug, trace or off"))?,
        };
        let config = Config {
            port,
            bind,
            data,
            redis: raw.get("redis").map(str::to_string),
            redis_prefix: raw.get("redis_prefix").unwrap_or("poulpe:").to_string(),
            cron: raw.get("cron").map(PathBuf::from),
            cron_catchup,
            dead,
            workers,
            retry_interval,
            max_retry,
            backoff,
            task_timeout,
            result_ttl,
            result_max,
            exec,
            token: raw.get("token").map(str::to_string),
            max_body,
            max_ws,
            ws_idle,
            http_idle,
            max_conns,
            ca_file,
            smtp,
            kafka: kafka_config(&raw)?,
            tz,
            log,
        };
        // Features that have their own issues refuse clearly instead of being ignored.
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(args.iter().map(OsString::from).collect(), &move |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults() {
        let c = parse(&[], &[]).expect("defaults");
        assert_eq!(c.port, 8000);
        assert_eq!(c.workers, 4);
        assert_eq!(c.retry_interval, 10);
        assert_eq!(c.max_retry, 3);
        assert_eq!(c.dead, PathBuf::from("./poulpe-data/dead"));
        assert_eq!(c.exec, ExecPolicy::Disabled);
        assert_eq!(c.tz, chrono_tz::UTC);
    }

    #[test]
    fn both_spellings_env_and_precedence() {
        let c = parse(&["--retry-interval", "5", "--max_retry=1"], &[]).expect("ok");
        assert_eq!((c.retry_interval, c.max_retry), (5, 1));
        let c = parse(&["--retry_interval=7"], &[]).expect("ok");
        assert_eq!(c.retry_interval, 7);
        let c = parse(&[], &[("POULPE_PORT", "9001"), ("POULPE_EXEC_ANY", "1")]).expect("ok");
        assert_eq!(c.port, 9001);
        assert_eq!(c.exec, ExecPolicy::Any);
        let c = parse(&["--port", "9002"], &[("POULPE_PORT", "9001")]).expect("ok");
        assert_eq!(c.port, 9002, "the command line wins");
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = parse(&["--port", "x"], &[]).unwrap_err().to_string();
        assert!(e.starts_with("--port: bad value \"x\""), "{e}");
        let e = parse(&["--workers", "0"], &[]).unwrap_err().to_string();
        assert!(
            e.contains("--workers") && e.contains("between 1 and 1024"),
            "{e}"
        );
        let e = parse(&["--backoff", "linear"], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--backoff"), "{e}");
        let e = parse(&["--nope"], &[]).unwrap_err().to_string();
        assert!(e.contains("unknown argument \"--nope\""), "{e}");
        let e = parse(&["--no-such-flag=1"], &[]).unwrap_err().to_string();
        assert!(e.contains("\"--no-such-flag=1\""), "named as typed: {e}");
        let e = parse(&["--tz", "Mars/Base"], &[]).unwrap_err().to_string();
        assert!(e.contains("--tz"), "{e}");
        let e = parse(&["--port", "--data", "/x"], &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--port: a value is required"), "{e}");
        let e = parse(&["--port"], &[]).unwrap_err().to_string();
        assert!(e.contains("--port"), "{e}");
        assert_eq!(parse(&["--help"], &[]).unwrap_err(), ConfigError::Help);
        let e = parse(&["--exec_dir", "/nonexistent-dir-x"], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--exec_dir"), "{e}");
    }

    #[test]
    fn help_lists_every_flag_with_default() {
        let h = help_text();
        for f in FLAGS {
            assert!(h.contains(&format!("--{}", f.name)), "{} missing", f.name);
        }
        assert!(h.contains("[default: 8000]"));
    }
}
