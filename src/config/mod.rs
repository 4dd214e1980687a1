//! Command-line flags and `POULPE_*` environment variables, turned into one checked `Config`.
//! The flags themselves (names, defaults, ranges, help) are one table, in [`flags`].

pub(crate) mod flags;
pub(crate) mod smtp;

use crate::task::ExecPolicy;
pub(crate) use flags::help_text;
use flags::{bad, Raw};
pub(crate) use smtp::{Security, SmtpConfig};
use std::ffi::OsString;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// How the wait before a retry grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backoff {
    /// Always `retry_interval`.
    Fixed,
    /// `retry_interval × 2^(n-1)`, capped at one hour, ±10 % jitter.
    Exponential,
}

/// Kafka brokers, topics and group.
#[derive(Clone, Debug)]
// Without the `kafka` feature the flags are refused before this is built, and nothing reads it.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
pub(crate) struct KafkaConfig {
    /// Bootstrap brokers, comma separated (`--kafka_servers`).
    pub(crate) servers: String,
    /// Topic of task messages (`--kafka_topic`).
    pub(crate) topic: String,
    /// Topic where final results of Kafka tasks are produced (`--kafka_resp_topic`).
    pub(crate) resp_topic: Option<String>,
    /// Consumer group (`--kafka_group`).
    pub(crate) group: String,
    /// Where the group starts reading a partition it has no committed offset for: librdkafka's
    /// `auto.offset.reset`, `earliest` or `latest` (`--kafka_offset_reset`).
    pub(crate) offset_reset: &'static str,
}

/// Everything the server needs to know, checked once at start-up.
#[derive(Clone, Debug)]
pub struct Config {
    /// HTTP and WebSocket port (`--port`).
    pub port: u16,
    /// Listen address (`--bind`).
    pub bind: IpAddr,
    /// Directory of the embedded store (`--data`).
    pub data: PathBuf,
    /// Redis URL; when given, Redis is the store (`--redis`).
    pub redis: Option<String>,
    /// Prefix of every Redis key.
    pub(crate) redis_prefix: String,
    /// This node's id among the nodes on one Redis prefix (`--node_id`, else
    /// `<hostname>-<port>`).
    pub(crate) node_id: String,
    /// Seconds without a heartbeat after which a node is dead (`--node_ttl`).
    pub(crate) node_ttl: u64,
    /// Cron file (`--cron`).
    pub(crate) cron: Option<PathBuf>,
    /// Run each cron line's missed firing once at start (`--cron_catchup last`).
    pub(crate) cron_catchup: bool,
    /// Dead-letter directory (`--dead`, else `<data>/dead`).
    pub(crate) dead: PathBuf,
    /// Number of worker threads (`--workers`).
    pub workers: usize,
    /// Nice steps the workers run below the other threads (`--worker_nice`).
    pub(crate) worker_nice: i32,
    /// Seconds before a retry (`--retry_interval`).
    pub(crate) retry_interval: u64,
    /// Retries after the first attempt (`--max_retry`).
    pub(crate) max_retry: u32,
    /// How the wait before a retry grows (`--backoff`).
    pub(crate) backoff: Backoff,
    /// Default seconds one attempt may run (`--task_timeout`).
    pub(crate) task_timeout: u64,
    /// Seconds results and dead records stay queryable (`--result_ttl`).
    pub(crate) result_ttl: u64,
    /// Most finished results kept (`--result_max`); beyond it the oldest are dropped first.
    pub(crate) result_max: usize,
    /// Longest time a write stays only in the embedded store's journal (`--checkpoint_ms`).
    pub(crate) checkpoint_ms: u64,
    /// Which programs EXEC tasks from the network may run (`--exec_dir`, `--exec_any`).
    pub(crate) exec: ExecPolicy,
    /// Bearer token required on every endpoint but `/health` (`--token`).
    pub token: Option<String>,
    /// Request body (and WebSocket frame) limit in bytes (`--max_body`).
    pub max_body: usize,
    /// Most WebSocket connections at once.
    pub max_ws: usize,
    /// Seconds without input before a WebSocket connection is closed.
    pub ws_idle: u64,
    /// Seconds without input before an HTTP connection is closed.
    pub(crate) http_idle: u64,
    /// Most HTTP connections served at once (each holds a thread).
    pub(crate) max_conns: usize,
    /// PEM bundle of CA certificates for HTTPS tasks, instead of the system or bundled roots.
    pub(crate) ca_file: Option<PathBuf>,
    /// The SMTP relay for MAIL_TO, when `--smtp_server` is given.
    pub(crate) smtp: Option<SmtpConfig>,
    /// The Kafka intake, when `--kafka_servers` and `--kafka_topic` are given.
    pub(crate) kafka: Option<KafkaConfig>,
    /// Zone of the cron schedule (`--tz`, else `TZ`, else the system's, else UTC).
    pub(crate) tz: chrono_tz::Tz,
    /// Where `tz` came from (`--tz`, `POULPE_TZ`, `TZ`, `/etc/localtime -> …`, …).
    pub(crate) tz_from: String,
    /// Log level (`--log`).
    pub log: log::LevelFilter,
}

/// What stops start-up (exit code 2), or a request for help/version (exit 0).
#[derive(Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `--help` or `-h`: print [`help_text`].
    Help,
    /// `--version` or `-V`.
    Version,
    /// An argument that is no flag, as it was typed.
    UnknownFlag(String),
    /// This flag was given more than once on the command line (its long and short names count
    /// as one).
    Repeated(&'static str),
    /// This flag needs a value (or goes with another flag that was given).
    MissingValue(&'static str),
    /// This flag's value is refused, and why (the value of a secret flag is never shown);
    /// `from_env` when the value came from its `POULPE_*` variable, which is then named.
    BadValue {
        flag: &'static str,
        value: String,
        reason: String,
        from_env: bool,
    },
    /// This flag only means something with `--redis` (several nodes share one Redis).
    NeedsRedis(&'static str),
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
            ConfigError::Repeated(flag) => write!(f, "--{flag}: given more than once"),
            ConfigError::BadValue {
                flag,
                value,
                reason,
                from_env,
            } => {
                let shown = if flags::SECRET.iter().any(|s| s.name == *flag) {
                    "<hidden>"
                } else {
                    value.as_str()
                };
                if *from_env {
                    let var = flag.to_ascii_uppercase();
                    write!(
                        f,
                        "POULPE_{var}: bad value {shown:?} for --{flag}: {reason}"
                    )
                } else {
                    write!(f, "--{flag}: bad value {shown:?}: {reason}")
                }
            }
            ConfigError::NeedsRedis(flag) => write!(
                f,
                "--{flag} needs --redis: the embedded store serves one node"
            ),
            ConfigError::NoFeature { flag, feature } => write!(
                f,
                "--{flag}: this poulpe was built without the `{feature}` cargo feature"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// This error, with a bad value marked as coming from its `POULPE_*` variable when
    /// `from_env` (so that the variable is named); any other error as it is.
    pub(crate) fn in_env(self, from_env: bool) -> ConfigError {
        match self {
            ConfigError::BadValue {
                flag,
                value,
                reason,
                ..
            } => ConfigError::BadValue {
                flag,
                value,
                reason,
                from_env,
            },
            other => other,
        }
    }
}

/// An environment lookup: the process's own ([`process_env`]) or one given by a test.
pub(crate) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process's environment, for [`Env`].
pub(crate) fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The cron time zone and where it came from: `given` (from `--tz` or `POULPE_TZ`, named by
/// `given_from`), else `TZ` from `env`, else the system's zone (under `root`, see
/// [`system_zone`]), else UTC. A leading `:` (`TZ=:Europe/Paris`) is ignored. The error is the
/// name that is not a zone.
pub(crate) fn time_zone(
    given: Option<&str>,
    given_from: &str,
    env: Env<'_>,
    root: &Path,
) -> Result<(chrono_tz::Tz, String), String> {
    let (name, from) = match (given, env("TZ").filter(|s| !s.is_empty())) {
        (Some(name), _) => (name.to_string(), given_from.to_string()),
        (None, Some(name)) => (name, "TZ".to_string()),
        (None, None) => {
            return Ok(system_zone(root)
                .unwrap_or_else(|| (chrono_tz::UTC, "no --tz, TZ or system zone".to_string())))
        }
    };
    match name.trim_start_matches(':').parse() {
        Ok(tz) => Ok((tz, from)),
        Err(_) => Err(name),
    }
}

/// The system's zone under `root` (`/` outside tests), as the C library finds it: the name at
/// the end of the `/etc/localtime` link (`…/zoneinfo/Europe/Paris`), else the name in
/// `/etc/timezone`. `None` where neither names a known zone (a `scratch` image has no `/etc`).
pub(crate) fn system_zone(root: &Path) -> Option<(chrono_tz::Tz, String)> {
    if let Ok(target) = std::fs::read_link(root.join("etc/localtime")) {
        let target = target.to_string_lossy();
        if let Some((_, name)) = target.rsplit_once("zoneinfo/") {
            let name = name
                .trim_start_matches("posix/")
                .trim_start_matches("right/");
            if let Ok(tz) = name.parse() {
                return Some((tz, format!("/etc/localtime -> {target}")));
            }
        }
    }
    let name = std::fs::read_to_string(root.join("etc/timezone")).ok()?;
    let tz = name.trim().parse().ok()?;
    Some((tz, "/etc/timezone".to_string()))
}

/// The Kafka settings; brokers and task topic go together.
fn kafka_config(raw: &Raw) -> Result<Option<KafkaConfig>, ConfigError> {
    // Checked even when Kafka is not enabled, like every other value.
    let offset_reset = match raw.text(&flags::KAFKA_OFFSET_RESET) {
        "earliest" => "earliest",
        "latest" => "latest",
        v => {
            return Err(bad(
                flags::KAFKA_OFFSET_RESET.name,
                v,
                "expected earliest or latest",
            ))
        }
    };
    let servers = raw.get(&flags::KAFKA_SERVERS);
    let topic = raw.get(&flags::KAFKA_TOPIC);
    let resp = raw.get(&flags::KAFKA_RESP_TOPIC);
    if servers.is_none() && topic.is_none() && resp.is_none() {
        return Ok(None);
    }
    if cfg!(not(feature = "kafka")) {
        return Err(ConfigError::NoFeature {
            flag: flags::KAFKA_SERVERS.name,
            feature: "kafka",
        });
    }
    let servers = servers.ok_or(ConfigError::MissingValue(flags::KAFKA_SERVERS.name))?;
    let topic = topic.ok_or(ConfigError::MissingValue(flags::KAFKA_TOPIC.name))?;
    Ok(Some(KafkaConfig {
        servers: servers.to_string(),
        topic: topic.to_string(),
        resp_topic: resp.map(str::to_string),
        group: raw.text(&flags::KAFKA_GROUP).to_string(),
        offset_reset,
    }))
}

/// `--smtp_from`, checked to be a mail address (`ops@example.org`, `Ops <ops@example.org>`).
pub(crate) fn sender(value: &str) -> Result<String, ConfigError> {
    value
        .parse::<lettre::message::Mailbox>()
        .map_err(|e| bad(flags::SMTP_FROM.name, value, e.to_string()))?;
    Ok(value.to_string())
}

/// The SMTP relay settings, when `--smtp_server` is given.
fn smtp_config(raw: &Raw) -> Result<Option<SmtpConfig>, ConfigError> {
    let starttls = raw.switch(&flags::STARTTLS)?;
    let tls = raw.switch(&flags::SMTP_TLS)?;
    let Some(server) = raw.get(&flags::SMTP_SERVER) else {
        return Ok(None);
    };
    if starttls && tls {
        return Err(bad(
            flags::SMTP_TLS.name,
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
    let port = flags::SMTP_PORT.number_or(raw.get(&flags::SMTP_PORT), default_port)?;
    let auth = match (raw.get(&flags::SMTP_NAME), raw.get(&flags::SMTP_PWD)) {
        (Some(n), Some(p)) => Some((n.to_string(), p.to_string())),
        (Some(_), None) => {
            return Err(ConfigError::MissingValue(flags::SMTP_PWD.name));
        }
        (None, _) => None,
    };
    let from = raw.get(&flags::SMTP_FROM).map(sender).transpose()?;
    let ca_file = match raw.get(&flags::SMTP_CA_FILE) {
        None => None,
        Some(f) => {
            let name = flags::SMTP_CA_FILE.name;
            let pem = std::fs::read(f).map_err(|e| bad(name, f, e.to_string()))?;
            lettre::transport::smtp::client::Certificate::from_pem(&pem)
                .map_err(|e| bad(name, f, e.to_string()))?;
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

/// `--exec_dir` and `--exec_any` as one policy.
fn exec_policy(raw: &Raw) -> Result<ExecPolicy, ConfigError> {
    if raw.switch(&flags::EXEC_ANY)? {
        return Ok(ExecPolicy::Any);
    }
    let Some(dir) = raw.get(&flags::EXEC_DIR) else {
        return Ok(ExecPolicy::Disabled);
    };
    let name = flags::EXEC_DIR.name;
    let p = PathBuf::from(dir);
    if !p.is_dir() {
        return Err(bad(name, dir, "not a directory"));
    }
    let p = p
        .canonicalize()
        .map_err(|e| bad(name, dir, e.to_string()))?;
    Ok(ExecPolicy::Dir(p))
}

/// `--ca_file`, checked to hold a PEM certificate.
fn ca_file(raw: &Raw) -> Result<Option<PathBuf>, ConfigError> {
    let Some(v) = raw.get(&flags::CA_FILE) else {
        return Ok(None);
    };
    let name = flags::CA_FILE.name;
    let text = std::fs::read_to_string(v).map_err(|e| bad(name, v, e.to_string()))?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(bad(name, v, "no PEM certificate in this file"));
    }
    Ok(Some(PathBuf::from(v)))
}

/// `--node_id` and `--node_ttl`: both need `--redis`; the id defaults to `<hostname>-<port>`.
fn node(raw: &Raw, port: u16) -> Result<(String, u64), ConfigError> {
    use flags::{NODE_ID, NODE_TTL, REDIS};
    if raw.get(&REDIS).is_none() {
        for f in [&NODE_ID, &NODE_TTL] {
            if raw.get(f).is_some() {
                return Err(ConfigError::NeedsRedis(f.name));
            }
        }
    }
    let id = match raw.get(&NODE_ID) {
        Some(v) => {
            crate::node::check_id(v).map_err(|why| bad(NODE_ID.name, v, why))?;
            v.to_string()
        }
        None => crate::node::default_id(port),
    };
    let ttl = raw.number(&NODE_TTL)?;
    if ttl < 3 {
        return Err(bad(
            NODE_TTL.name,
            raw.text(&NODE_TTL),
            "must be at least 3: a node renews its heartbeat every node_ttl/3 seconds, and one \
             slow Redis call (up to 3 s) must not make a live node look dead",
        ));
    }
    Ok((id, ttl))
}

impl Config {
    /// Parses the process's arguments (without the program name) and environment.
    pub fn from_env_and_args(args: Vec<OsString>) -> Result<Config, ConfigError> {
        Config::parse(args, &process_env)
    }

    /// Parses with an explicit environment lookup (used by tests); `TZ` is read from it too. A
    /// bad value that came from the environment is reported under its variable's name.
    pub(crate) fn parse(args: Vec<OsString>, env: Env<'_>) -> Result<Config, ConfigError> {
        let raw = Raw::collect(args, env)?;
        Config::check(&raw, env).map_err(|e| {
            let from_env =
                matches!(e, ConfigError::BadValue { flag, .. } if raw.came_from_env(flag));
            e.in_env(from_env)
        })
    }

    /// Turns the raw values into a checked `Config`.
    fn check(raw: &Raw, env: Env<'_>) -> Result<Config, ConfigError> {
        use flags::*;
        // Checked in this order, so the first bad value named is always the same one.
        let port = raw.number(&PORT)?;
        let bind = raw.text(&BIND);
        let bind = bind.parse().map_err(|_| {
            bad(
                BIND.name,
                bind,
                "expected an IP address like 0.0.0.0 or 127.0.0.1",
            )
        })?;
        let data = PathBuf::from(raw.text(&DATA));
        let dead = raw
            .get(&DEAD)
            .map(PathBuf::from)
            .unwrap_or_else(|| data.join("dead"));
        let workers = raw.number(&WORKERS)?;
        let worker_nice = raw.number(&WORKER_NICE)?;
        let retry_interval = raw.number(&RETRY_INTERVAL)?;
        let max_retry = raw.number(&MAX_RETRY)?;
        let backoff = match raw.text(&BACKOFF) {
            "fixed" => Backoff::Fixed,
            "exponential" => Backoff::Exponential,
            v => return Err(bad(BACKOFF.name, v, "expected fixed or exponential")),
        };
        let task_timeout = raw.number(&TASK_TIMEOUT)?;
        let result_ttl = raw.number(&RESULT_TTL)?;
        let result_max = raw.number(&RESULT_MAX)?;
        let checkpoint_ms = raw.number(&CHECKPOINT_MS)?;
        let max_body = raw.number(&MAX_BODY)?;
        let max_ws = raw.number(&MAX_WS)?;
        let ws_idle = raw.number(&WS_IDLE)?;
        let http_idle = raw.number(&HTTP_IDLE)?;
        let max_conns = raw.number(&MAX_CONNS)?;
        let ca_file = ca_file(raw)?;
        let exec = exec_policy(raw)?;
        let smtp = smtp_config(raw)?;
        let cron_catchup = match raw.text(&CRON_CATCHUP) {
            "none" => false,
            "last" => true,
            v => return Err(bad(CRON_CATCHUP.name, v, "expected none or last")),
        };
        let given_from = if raw.came_from_env(TZ.name) {
            "POULPE_TZ"
        } else {
            "--tz"
        };
        let (tz, tz_from) = time_zone(raw.get(&TZ), given_from, env, Path::new("/"))
            .map_err(|name| bad(TZ.name, &name, "unknown IANA time zone (e.g. Europe/Paris)"))?;
        let (node_id, node_ttl) = node(raw, port)?;
        let log = raw.text(&LOG);
        let log = log.parse().map_err(|_| {
            bad(
                LOG.name,
                log,
                "expected error, warn, info, debug, trace or off",
            )
        })?;
        Ok(Config {
            port,
            bind,
            data,
            redis: raw.get(&REDIS).map(str::to_string),
            redis_prefix: raw.text(&REDIS_PREFIX).to_string(),
            node_id,
            node_ttl,
            cron: raw.get(&CRON).map(PathBuf::from),
            cron_catchup,
            dead,
            workers,
            worker_nice,
            retry_interval,
            max_retry,
            backoff,
            task_timeout,
            result_ttl,
            result_max,
            checkpoint_ms,
            exec,
            token: raw.get(&TOKEN).map(str::to_string),
            max_body,
            max_ws,
            ws_idle,
            http_idle,
            max_conns,
            ca_file,
            smtp,
            kafka: kafka_config(raw)?,
            tz,
            tz_from,
            log,
        })
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
        // Neither --tz nor TZ: the system's zone, else UTC.
        let system = system_zone(Path::new("/")).map_or(chrono_tz::UTC, |z| z.0);
        assert_eq!(c.tz, system);
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
        let e = parse(&["--kafka_offset_reset", "sideways"], &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "--kafka_offset_reset: bad value \"sideways\": expected earliest or latest"
            ),
            "{e}"
        );
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

    /// `--node_id` defaults to `<hostname>-<port>` and `--node_ttl` to 15; both need `--redis`,
    /// and the id's characters and the ttl's lower bound are checked, naming the flag.
    #[test]
    fn node_flags_default_need_redis_and_are_checked() {
        let c = parse(&["--port", "9001"], &[]).expect("defaults");
        assert!(c.node_id.ends_with("-9001"), "{}", c.node_id);
        assert_eq!(c.node_ttl, 15);
        let r = ["--redis", "redis://h:1/0"];
        let c = parse(
            &[&r[..], &["--node_id", "web-1", "--node_ttl", "3"]].concat(),
            &[],
        )
        .expect("with --redis");
        assert_eq!((c.node_id.as_str(), c.node_ttl), ("web-1", 3));
        let e = parse(&[], &[("POULPE_NODE_TTL", "9")]).unwrap_err();
        assert_eq!(e, ConfigError::NeedsRedis("node_ttl"));
        let e = parse(&[&r[..], &["--node_id", "a b"]].concat(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--node_id: bad value \"a b\": a node id is"),
            "{e}"
        );
        let e = parse(&r, &[("POULPE_NODE_TTL", "2")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("POULPE_NODE_TTL: bad value \"2\" for --node_ttl: must be at least 3"),
            "{e}"
        );
    }

    #[test]
    fn help_lists_every_flag_with_default() {
        let h = help_text();
        for f in flags::ALL {
            assert!(h.contains(&format!("--{}", f.name)), "{} missing", f.name);
        }
        assert!(h.contains("[default: 8000]"));
    }

    /// A value that `Raw::collect` takes for `f` (it does not check values).
    fn sample(f: &flags::Flag, seed: &str) -> String {
        match f.kind {
            flags::Kind::Switch => "true".to_string(),
            flags::Kind::Number { min, max } => (if seed == "env" { min } else { max }).to_string(),
            flags::Kind::Text => format!("{seed}-{}", f.name),
        }
    }

    /// One loop over the table, so a new flag is covered by construction: `--help` shows it with
    /// its default (and its short name before the long one), both spellings, the short name and
    /// `POULPE_<NAME>` set it, the command line wins, and a number's default lies in its range.
    #[test]
    fn every_flag_in_help_both_spellings_and_environment() {
        use flags::{DefaultValue, Kind};
        let help = help_text();
        let no_env = |_: &str| None;
        for f in flags::ALL {
            let head = match f.short {
                Some(c) => format!("{c}, {}", f.key),
                None => f.key.to_string(),
            };
            let line = help
                .lines()
                .find(|l| {
                    let rest = l.trim_start().strip_prefix(&head);
                    rest.is_some_and(|r| r.is_empty() || r.starts_with(' '))
                })
                .unwrap_or_else(|| panic!("--help does not list {head}:\n{help}"));
            assert!(line.contains(f.help), "{line}");
            let shown = f.shown_default();
            assert!(
                shown.is_empty() || line.ends_with(&format!("[default: {shown}]")),
                "{line}"
            );
            if let (Kind::Number { min, max }, DefaultValue::Number(d)) = (f.kind, f.default) {
                assert!((min..=max).contains(&d), "{}: default out of range", f.name);
                assert_eq!(f.number::<u64>(None), Ok(d));
                let over = max.saturating_add(1).to_string();
                let e = f.number::<u64>(Some(&over)).unwrap_err().to_string();
                assert!(e.starts_with(&format!("--{}: bad value", f.name)), "{e}");
            }

            let (cli, from_env) = (sample(f, "cli"), sample(f, "env"));
            let env_name = f.env_name();
            assert_eq!(env_name, format!("POULPE_{}", f.name.to_uppercase()));
            let env = |k: &str| (k == env_name).then(|| from_env.clone());
            let keys = [
                Some(f.key.to_string()),
                Some(f.kebab_key()),
                f.short.map(str::to_string),
            ];
            for key in keys.into_iter().flatten() {
                let (args, eq_args) = match f.kind {
                    Kind::Switch => (vec![key.clone()], vec![key.clone()]),
                    _ => (vec![key.clone(), cli.clone()], vec![format!("{key}={cli}")]),
                };
                for args in [args, eq_args] {
                    let args: Vec<OsString> = args.into_iter().map(OsString::from).collect();
                    let raw = Raw::collect(args.clone(), &no_env).expect("collect");
                    assert_eq!(raw.get(f), Some(cli.as_str()), "{args:?}");
                    let raw = Raw::collect(args.clone(), &env).expect("collect");
                    assert_eq!(
                        raw.get(f),
                        Some(cli.as_str()),
                        "{args:?} wins over {env_name}"
                    );
                }
            }
            let raw = Raw::collect(vec![], &env).expect("collect");
            assert_eq!(raw.get(f), Some(from_env.as_str()), "{env_name}");
            let raw = Raw::collect(vec![], &no_env).expect("collect");
            assert_eq!(raw.get(f), None, "{} unset", f.name);
            if let DefaultValue::Text(d) = f.default {
                assert_eq!(raw.text(f), d);
            }
        }
    }

    /// The one-letter names are those of the original poulpe, each on one flag, and a value
    /// given after one of them may not be another flag.
    #[test]
    fn short_names_are_the_original_ones() {
        let original = [
            ("-p", "port"),
            ("-r", "redis"),
            ("-c", "cron"),
            ("-w", "workers"),
            ("-s", "smtp_server"),
            ("-x", "smtp_port"),
            ("-n", "smtp_name"),
            ("-y", "smtp_pwd"),
            ("-i", "retry_interval"),
            ("-m", "max_retry"),
            ("-k", "starttls"),
            ("-d", "dead"),
        ];
        let table: Vec<(&str, &str)> = flags::ALL
            .iter()
            .filter_map(|f| f.short.map(|c| (c, f.name)))
            .collect();
        let mut want = original.to_vec();
        want.sort();
        let mut got = table.clone();
        got.sort();
        assert_eq!(got, want, "short names in the table");

        let c = parse(
            &[
                "-p", "9001", "-w", "2", "-i", "5", "-m", "1", "-d", "/tmp/dl",
            ],
            &[],
        )
        .expect("short flags");
        assert_eq!(
            (c.port, c.workers, c.retry_interval, c.max_retry),
            (9001, 2, 5, 1)
        );
        assert_eq!(c.dead, PathBuf::from("/tmp/dl"));
        let c = parse(
            &["-s", "relay", "-x", "2525", "-k", "-n", "me", "-y", "pw"],
            &[],
        )
        .expect("short SMTP flags");
        let smtp = c.smtp.expect("-s sets the relay");
        assert_eq!((smtp.server.as_str(), smtp.port), ("relay", 2525));
        assert_eq!(smtp.security, Security::StartTls, "-k is --starttls");
        assert_eq!(smtp.auth, Some(("me".to_string(), "pw".to_string())));
        let c = parse(&["-r", "redis://h:1/0", "-c", "/tmp/crontab"], &[]).expect("-r -c");
        assert_eq!(c.redis.as_deref(), Some("redis://h:1/0"));
        assert_eq!(c.cron, Some(PathBuf::from("/tmp/crontab")));
        for args in [
            &["-p", "-w", "2"][..],
            &["-s", "--smtp_port", "25"][..],
            &["-w"][..],
        ] {
            let e = parse(args, &[]).unwrap_err();
            assert!(matches!(e, ConfigError::MissingValue(_)), "{args:?}: {e}");
        }
    }

    #[test]
    fn tz_comes_from_the_given_environment() {
        let c = parse(&[], &[("TZ", "Europe/Paris")]).expect("TZ");
        assert_eq!(c.tz, chrono_tz::Europe::Paris);
        let c = parse(&[], &[("TZ", ":Asia/Tokyo")]).expect("TZ with a colon");
        assert_eq!(c.tz, chrono_tz::Asia::Tokyo);
        let c = parse(&[], &[("TZ", "Europe/Paris"), ("POULPE_TZ", "Asia/Tokyo")]).expect("tz");
        assert_eq!(c.tz, chrono_tz::Asia::Tokyo, "POULPE_TZ before TZ");
        assert_eq!(c.tz_from, "POULPE_TZ");
        let c = parse(&["--tz", "UTC"], &[("POULPE_TZ", "Asia/Tokyo")]).expect("tz");
        assert_eq!(c.tz, chrono_tz::UTC, "--tz first");
        assert_eq!(c.tz_from, "--tz");
        let e = parse(&[], &[("TZ", "Mars/Base")]).unwrap_err().to_string();
        assert!(e.starts_with("--tz: bad value \"Mars/Base\""), "{e}");
        let e = parse(&[], &[("TZ", "Mars/Base"), ("POULPE_TZ", "")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--tz: bad value \"Mars/Base\""),
            "TZ is no POULPE_*: {e}"
        );
    }

    /// A bad value from the environment is reported under its variable, still naming the flag
    /// (and a secret's value stays hidden); from the command line, under the flag alone.
    #[test]
    fn a_bad_value_from_the_environment_names_its_variable() {
        let e = parse(&[], &[("POULPE_PORT", "abc")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "POULPE_PORT: bad value \"abc\" for --port: expected a whole number"
        );
        let e = parse(&["--port", "abc"], &[("POULPE_PORT", "1")])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "--port: bad value \"abc\": expected a whole number");
        let e = parse(&["--port", "1"], &[("POULPE_WORKERS", "0")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("POULPE_WORKERS: bad value \"0\" for --workers"),
            "{e}"
        );
        let e = parse(&[], &[("POULPE_BACKOFF", "linear")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("POULPE_BACKOFF: bad value \"linear\" for --backoff"),
            "{e}"
        );
        let e = parse(&[], &[("POULPE_EXEC_ANY", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("POULPE_EXEC_ANY: bad value \"maybe\""), "{e}");
        let e = parse(&["--smtp_from", "nope"], &[("POULPE_SMTP_SERVER", "h")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--smtp_from: bad value \"nope\""), "{e}");
        let e = parse(&["-s", "h"], &[("POULPE_SMTP_PORT", "0")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("POULPE_SMTP_PORT: bad value \"0\" for --smtp_port"),
            "{e}"
        );
    }

    /// The README's flag table lists every flag of the table, with its short name and its default
    /// when it has them.
    #[test]
    fn readme_flag_table_lists_every_flag() {
        let readme = include_str!("../../README.md");
        let rows: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `--")).collect();
        for f in flags::ALL {
            let cell = format!("`{}`", f.key);
            let row = rows
                .iter()
                .find(|r| r.split(" | ").next().is_some_and(|c| c.contains(&cell)))
                .unwrap_or_else(|| panic!("README's flag table lacks {}", f.key));
            if let Some(c) = f.short {
                let names = row.split(" | ").next().unwrap_or("");
                assert!(names.contains(&format!("`{c}`")), "{row}: {c} missing");
            }
            let default = row.split(" | ").nth(1).unwrap_or("").replace('`', "");
            match f.default {
                flags::DefaultValue::Text(d) => assert_eq!(default, d, "{row}"),
                flags::DefaultValue::Number(n) => assert_eq!(default, n.to_string(), "{row}"),
                _ => {}
            }
        }
    }

    /// `--kafka_offset_reset` is `earliest` unless set (either spelling, or the environment) to
    /// `latest`.
    #[cfg(feature = "kafka")]
    #[test]
    fn kafka_offset_reset_is_earliest_unless_set_to_latest() {
        let kafka = ["--kafka_servers", "127.0.0.1:9092", "--kafka_topic", "t"];
        let reset = |extra: &[&str], env: &[(&str, &str)]| {
            let args: Vec<&str> = kafka.iter().chain(extra).copied().collect();
            let c = parse(&args, env).expect("parse");
            c.kafka.expect("kafka").offset_reset
        };
        assert_eq!(reset(&[], &[]), "earliest");
        assert_eq!(reset(&["--kafka_offset_reset", "latest"], &[]), "latest");
        assert_eq!(reset(&["--kafka-offset-reset=latest"], &[]), "latest");
        assert_eq!(
            reset(&[], &[("POULPE_KAFKA_OFFSET_RESET", "latest")]),
            "latest"
        );
        assert_eq!(
            reset(
                &["--kafka_offset_reset", "earliest"],
                &[("POULPE_KAFKA_OFFSET_RESET", "latest")]
            ),
            "earliest"
        );
    }

    /// Built without the `kafka` feature (`cargo test --no-default-features --lib config`, run by
    /// scripts/test.sh): any Kafka flag stops start-up with a line naming the missing feature
    /// (main.rs prints it and exits 2, as for every configuration error).
    #[cfg(not(feature = "kafka"))]
    #[test]
    fn kafka_flags_need_the_kafka_feature() {
        type Case = (
            &'static [&'static str],
            &'static [(&'static str, &'static str)],
        );
        let cases: [Case; 5] = [
            (
                &["--kafka_servers", "127.0.0.1:9092", "--kafka_topic", "t"],
                &[],
            ),
            (&["--kafka_servers", "127.0.0.1:9092"], &[]),
            (&["--kafka_topic", "t"], &[]),
            (&["--kafka_resp_topic", "r"], &[]),
            (&[], &[("POULPE_KAFKA_SERVERS", "127.0.0.1:9092")]),
        ];
        for (args, env) in cases {
            match parse(args, env) {
                Err(e @ ConfigError::NoFeature { .. }) => {
                    let text = e.to_string();
                    assert!(
                        text.contains("without the `kafka` cargo feature"),
                        "{args:?} {env:?}: {text}"
                    );
                }
                Err(e) => panic!("{args:?} {env:?}: refused for another reason: {e}"),
                Ok(_) => panic!("{args:?} {env:?}: accepted by a build without Kafka"),
            }
        }
        // Without Kafka flags the same build starts.
        parse(&[], &[]).expect("no Kafka flag, no refusal");
    }

    /// The system zone is the name the `/etc/localtime` link ends with, else the one in
    /// `/etc/timezone`; nothing when neither names a zone (no `/etc` at all in `scratch`).
    #[test]
    fn the_system_zone_is_read_from_etc() {
        let root = tempfile::tempdir().expect("tempdir");
        let etc = root.path().join("etc");
        assert_eq!(system_zone(root.path()), None, "no /etc");
        std::fs::create_dir_all(&etc).expect("etc");
        std::fs::write(etc.join("timezone"), "Asia/Tokyo\n").expect("timezone");
        assert_eq!(
            system_zone(root.path()),
            Some((chrono_tz::Asia::Tokyo, "/etc/timezone".to_string()))
        );
        std::os::unix::fs::symlink(
            "/usr/share/zoneinfo/posix/Europe/Paris",
            etc.join("localtime"),
        )
        .expect("link");
        assert_eq!(
            system_zone(root.path()),
            Some((
                chrono_tz::Europe::Paris,
                "/etc/localtime -> /usr/share/zoneinfo/posix/Europe/Paris".to_string()
            )),
            "the link first"
        );
        let env = |name: &str| (name == "TZ").then(|| "America/Lima".to_string());
        let zone = time_zone(None, "--tz", &env, root.path()).expect("zone");
        assert_eq!(
            zone,
            (chrono_tz::America::Lima, "TZ".to_string()),
            "TZ before the system"
        );
        let none = |_: &str| None;
        let zone = time_zone(None, "--tz", &none, root.path()).expect("zone");
        assert_eq!(zone.0, chrono_tz::Europe::Paris);
        let empty = tempfile::tempdir().expect("tempdir");
        let zone = time_zone(None, "--tz", &none, empty.path()).expect("zone");
        assert_eq!(zone.0, chrono_tz::UTC, "UTC without any");
    }
}
