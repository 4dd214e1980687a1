//! The one table of flags (name, short name, kind, default, range, help), and what reads it:
//! `--help`, the command line and `POULPE_*` environment merged into raw values, and number
//! checks.

use super::{ConfigError, Env};
use std::ffi::OsString;

/// What a flag takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// No value: on when given (`--exec_any`), or from the environment as true or false.
    Switch,
    /// Text, checked where it is used.
    Text,
    /// A whole number within `min..=max`.
    Number { min: u64, max: u64 },
}

/// What a flag is when it is not given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DefaultValue {
    /// Nothing: the setting is absent (`--redis`, `--token`) or, for a switch, off.
    None,
    /// This text (`--data ./poulpe-data`).
    Text(&'static str),
    /// This number (`--port 8000`).
    Number(u64),
    /// Worked out at start from other settings; the words say how (`--dead <data>/dead`).
    Derived(&'static str),
}

/// One flag of the table.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Flag {
    /// snake_case name: `--name`, `--kebab-name` and `POULPE_NAME` all set it.
    pub(crate) name: &'static str,
    /// `--name`, the key looked for on the command line (after kebab-case is normalised).
    pub(crate) key: &'static str,
    /// The one-letter name of the original poulpe (`-p` for `--port`), when it had one.
    pub(crate) short: Option<&'static str>,
    /// What it takes.
    pub(crate) kind: Kind,
    /// What it is when not given.
    pub(crate) default: DefaultValue,
    /// One line for `--help`.
    pub(crate) help: &'static str,
}

// Shorthands for the rows of the table below.
const fn switch() -> (Kind, DefaultValue) {
    (Kind::Switch, DefaultValue::None)
}
const fn optional() -> (Kind, DefaultValue) {
    (Kind::Text, DefaultValue::None)
}
const fn text(default: &'static str) -> (Kind, DefaultValue) {
    (Kind::Text, DefaultValue::Text(default))
}
const fn derived(how: &'static str) -> (Kind, DefaultValue) {
    (Kind::Text, DefaultValue::Derived(how))
}
const fn number(default: u64, min: u64, max: u64) -> (Kind, DefaultValue) {
    (Kind::Number { min, max }, DefaultValue::Number(default))
}
const fn derived_number(how: &'static str, min: u64, max: u64) -> (Kind, DefaultValue) {
    (Kind::Number { min, max }, DefaultValue::Derived(how))
}

/// Defines one `pub const` per flag and [`ALL`], the table in `--help` order.
macro_rules! flags {
    (@short) => { None };
    (@short $short:literal) => { Some($short) };
    ($($id:ident, $name:literal $(| $short:literal)?, $spec:expr, $help:literal;)*) => {
        $(
            #[doc = concat!("`--", $name, "` (help: `", $help, "`).")]
            pub(crate) const $id: Flag = Flag {
                name: $name,
                key: concat!("--", $name),
                short: flags!(@short $($short)?),
                kind: $spec.0,
                default: $spec.1,
                help: $help,
            };
        )*
        /// Every flag, in `--help` order.
        pub(crate) const ALL: &[&Flag] = &[$(&$id),*];
    };
}

// One row per flag: constant, name (`| "-x"`: and the original poulpe's one-letter name), kind and
// default, help line. A new row is listed by `--help`, read from `--name`, `--kebab-name`, its
// short name and `POULPE_NAME`, and covered by the table's unit test; `Config::parse` turns its raw
// value into a field.
flags! {
    PORT, "port" | "-p", number(8000, 0, 65_535), "HTTP and WebSocket port";
    BIND, "bind", text("0.0.0.0"), "listen address";
    DATA, "data", text("./poulpe-data"), "directory of the embedded store";
    CHECKPOINT_MS, "checkpoint_ms", number(2_000, 10, 600_000),
        "longest time (ms) a write stays only in the embedded store's journal before it is \
         copied into its database file";
    REDIS, "redis" | "-r", optional(),
        "Redis URL (redis://[:password@]host:port/db); when given, Redis is the store";
    REDIS_PREFIX, "redis_prefix", text("poulpe:"), "prefix of every Redis key";
    NODE_ID, "node_id", derived("<hostname>-<port>"),
        "this node's id among the poulpe nodes on one Redis prefix (needs --redis)";
    NODE_TTL, "node_ttl", number(15, 0, 3_600),
        "seconds without a heartbeat after which a node is dead and its tasks are adopted \
         (at least 3; needs --redis)";
    CRON, "cron" | "-c", optional(), "cron file";
    CRON_CATCHUP, "cron_catchup", text("none"),
        "none, or last: run each cron line's missed firing once at start";
    DEAD, "dead" | "-d", derived("<data>/dead"), "dead-letter directory";
    WORKERS, "workers" | "-w", number(4, 1, 1024), "number of worker threads, numbered 0..N-1";
    WORKER_NICE, "worker_nice", number(5, 0, 19),
        "nice steps workers run below poulpe's other threads, so that recording keeps up under \
         load (0: the same priority)";
    RETRY_INTERVAL, "retry_interval" | "-i", number(10, 0, 86_400), "seconds before a retry";
    MAX_RETRY, "max_retry" | "-m", number(3, 0, 100), "retries after the first attempt";
    BACKOFF, "backoff", text("fixed"),
        "fixed, or exponential (interval x 2^(n-1), capped at 1 h, +-10% jitter)";
    TASK_TIMEOUT, "task_timeout", number(60, 1, 86_400),
        "default seconds one attempt may run";
    RESULT_TTL, "result_ttl", number(86_400, 1, 10 * 365 * 86_400),
        "seconds results and dead records stay queryable";
    RESULT_MAX, "result_max", number(1_000_000, 0, 1_000_000_000),
        "most finished results kept; beyond it the oldest are dropped first";
    EXEC_DIR, "exec_dir", optional(),
        "EXEC tasks from the network run only programs inside this directory";
    EXEC_ANY, "exec_any", switch(),
        "allow EXEC of any program on PATH from the network (UNSAFE)";
    TOKEN, "token", optional(),
        "require 'Authorization: Bearer <token>' (prefer POULPE_TOKEN)";
    MAX_BODY, "max_body", number(1_048_576, 64, 1 << 30),
        "request body (and WebSocket frame) limit in bytes";
    MAX_WS, "max_ws", number(256, 1, 65_536),
        "most WebSocket connections at once (503 beyond)";
    WS_IDLE, "ws_idle", number(300, 1, 86_400),
        "seconds without input before a WebSocket connection is closed";
    HTTP_IDLE, "http_idle", number(75, 1, 86_400),
        "seconds without input before an HTTP connection is closed (idle keep-alive, stalled \
         client)";
    MAX_CONNS, "max_conns", number(1024, 1, 65_536),
        "most HTTP connections at once, WebSocket ones apart (503 beyond)";
    CA_FILE, "ca_file", derived("system bundle, else bundled roots"),
        "PEM file of CA certificates trusted for HTTPS tasks";
    SMTP_SERVER, "smtp_server" | "-s", optional(), "SMTP relay host";
    SMTP_PORT, "smtp_port" | "-x",
        derived_number("25, 587 with --starttls, 465 with --smtp_tls", 1, 65_535),
        "SMTP relay port";
    SMTP_NAME, "smtp_name" | "-n", optional(), "SMTP user name";
    SMTP_PWD, "smtp_pwd" | "-y", optional(), "SMTP password (prefer POULPE_SMTP_PWD)";
    STARTTLS, "starttls" | "-k", switch(), "require STARTTLS";
    SMTP_TLS, "smtp_tls", switch(), "implicit TLS (port 465)";
    SMTP_FROM, "smtp_from", optional(), "default sender address";
    SMTP_CA_FILE, "smtp_ca_file", optional(),
        "PEM file of extra CA certificates trusted for the SMTP relay";
    KAFKA_SERVERS, "kafka_servers", optional(), "Kafka brokers, comma separated";
    KAFKA_TOPIC, "kafka_topic", optional(), "Kafka task topic";
    KAFKA_RESP_TOPIC, "kafka_resp_topic", optional(), "Kafka result topic";
    KAFKA_GROUP, "kafka_group", text("poulpe"), "Kafka consumer group";
    KAFKA_OFFSET_RESET, "kafka_offset_reset", text("earliest"),
        "where a group with no committed offset starts: earliest (all the topic keeps) or latest";
    TZ, "tz", derived("TZ env, else the system zone, else UTC"), "IANA zone name for the cron schedule";
    LOG, "log", text("info"), "log level: error, warn, info, debug, trace, off";
}

/// Flags whose value is never shown in an error message.
pub(crate) const SECRET: &[&Flag] = &[&TOKEN, &SMTP_PWD];

impl Flag {
    /// `POULPE_<NAME>`, the environment variable that sets this flag.
    pub(crate) fn env_name(&self) -> String {
        format!("POULPE_{}", self.name.to_ascii_uppercase())
    }

    /// The kebab-case spelling, `--retry-interval` for `--retry_interval`.
    #[cfg(test)]
    pub(crate) fn kebab_key(&self) -> String {
        self.key.replace('_', "-")
    }

    /// The default as `--help` shows it; empty when there is none.
    pub(crate) fn shown_default(&self) -> String {
        match (self.kind, self.default) {
            (Kind::Switch, _) => "off".to_string(),
            (_, DefaultValue::None) => String::new(),
            (_, DefaultValue::Text(s) | DefaultValue::Derived(s)) => s.to_string(),
            (_, DefaultValue::Number(n)) => n.to_string(),
        }
    }

    /// The value from the environment: `POULPE_<NAME>`, an empty one counting as unset.
    pub(crate) fn env_value(&self, env: Env<'_>) -> Option<String> {
        env(&self.env_name()).filter(|v| !v.is_empty())
    }

    /// `value` as a number within this flag's range, or the table's default when `None`.
    pub(crate) fn number<T: TryFrom<u64>>(&self, value: Option<&str>) -> Result<T, ConfigError> {
        let n = match (value, self.default) {
            (Some(v), _) => self.check_number(v)?,
            (None, DefaultValue::Number(d)) => d,
            (None, _) => return Err(bad(self.name, "", "this flag has no default number")),
        };
        self.fit(n)
    }

    /// `value` as a number within this flag's range, or `default` when `None`.
    pub(crate) fn number_or<T: TryFrom<u64>>(
        &self,
        value: Option<&str>,
        default: T,
    ) -> Result<T, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => self.fit(self.check_number(v)?),
        }
    }

    /// `n` in the field's own type (the table's ranges fit their fields; a default that would
    /// not is a mistake in the table).
    fn fit<T: TryFrom<u64>>(&self, n: u64) -> Result<T, ConfigError> {
        T::try_from(n).map_err(|_| bad(self.name, &n.to_string(), "does not fit"))
    }

    /// One copy for every field type: a whole number within the flag's range.
    fn check_number(&self, v: &str) -> Result<u64, ConfigError> {
        let n: u64 = v
            .trim()
            .parse()
            .map_err(|_| bad(self.name, v, "expected a whole number"))?;
        if let Kind::Number { min, max } = self.kind {
            if !(min..=max).contains(&n) {
                return Err(bad(
                    self.name,
                    v,
                    format!("must be between {min} and {max}"),
                ));
            }
        }
        Ok(n)
    }
}

/// The `--help` text: every flag with its default.
pub(crate) fn help_text() -> String {
    let mut s = format!(
        "poulpe {} - a lightweight job server\n\nUSAGE:\n  poulpe [FLAGS]\n\n\
         COMMANDS:\n  \
         poulpe health [--host H] [--port P]      ask a running server's /health (exit 0: healthy)\n  \
         poulpe cron-check FILE [--tz Z] [-n N]   check a cron file and print its next fire times\n  \
         poulpe replay FILE_OR_DIR... [--port P]  submit dead-letter records (--dead) to a server again\n  \
         (each takes --help)\n\n\
         Every flag may also be set as POULPE_<FLAG> in the environment (POULPE_PORT=8000);\n\
         the command line wins. --retry_interval and --retry-interval are the same flag.\n\nFLAGS:\n",
        env!("CARGO_PKG_VERSION")
    );
    for f in ALL {
        let short = f.short.map_or("    ".to_string(), |c| format!("{c}, "));
        let head = match f.kind {
            Kind::Switch => format!("{short}{}", f.key),
            _ => format!("{short}{} <v>", f.key),
        };
        let default = match f.shown_default() {
            d if d.is_empty() => d,
            d => format!(" [default: {d}]"),
        };
        s.push_str(&format!("  {head:<28} {}{default}\n", f.help));
    }
    s.push_str(
        "  -h, --help                   print this help\n  \
         -V, --version                print the version\n",
    );
    s
}

/// A `BadValue` error naming `flag`.
pub(super) fn bad(flag: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::BadValue {
        flag,
        value: value.to_string(),
        reason: reason.into(),
        from_env: false,
    }
}

/// Turns `--retry-interval=5` into `--retry_interval=5`; other arguments stay as they are.
pub(crate) fn normalize(arg: OsString) -> OsString {
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

/// Takes `f` from the command line under `keys` (its long name, and its short one when it has
/// one): `"true"` for a switch that is there, the value of any other flag.
fn take(
    pargs: &mut pico_args::Arguments,
    f: &Flag,
    keys: pico_args::Keys,
) -> Result<Option<String>, ConfigError> {
    if f.kind == Kind::Switch {
        return Ok(pargs.contains(keys).then(|| "true".to_string()));
    }
    pargs
        .opt_value_from_str::<_, String>(keys)
        .map_err(|e| match e {
            pico_args::Error::OptionWithoutAValue(_) => ConfigError::MissingValue(f.name),
            other => bad(f.name, "", other.to_string()),
        })
}

/// Each flag's raw value after command line and environment have been merged (the command line
/// wins), in the order of [`ALL`].
pub(super) struct Raw {
    values: Vec<Option<String>>,
    /// Whether each value came from the environment (not the command line).
    from_env: Vec<bool>,
}

impl Raw {
    /// Reads `args` (without the program name) and `env` for every flag of the table.
    pub(super) fn collect(args: Vec<OsString>, env: Env<'_>) -> Result<Raw, ConfigError> {
        // Kept to name an unknown flag as it was typed (`--no-such`, not `--no_such`).
        let typed = args.clone();
        let mut pargs = pico_args::Arguments::from_vec(args.into_iter().map(normalize).collect());
        if pargs.contains(["-h", "--help"]) {
            return Err(ConfigError::Help);
        }
        if pargs.contains(["-V", "--version"]) {
            return Err(ConfigError::Version);
        }
        let mut values = Vec::with_capacity(ALL.len());
        let mut from_env = Vec::with_capacity(ALL.len());
        for f in ALL {
            // One `Keys` type for both: pico_args's generic calls are compiled once.
            let keys: pico_args::Keys = match f.short {
                Some(short) => [short, f.key].into(),
                None => f.key.into(),
            };
            let from_cli = take(&mut pargs, f, keys)?;
            // `--port --data /x`, `-p -w 2`: the next flag is not a value.
            let is_flag = |v: &str| v.starts_with("--") || ALL.iter().any(|g| g.short == Some(v));
            if f.kind != Kind::Switch && from_cli.as_deref().is_some_and(is_flag) {
                return Err(ConfigError::MissingValue(f.name));
            }
            from_env.push(from_cli.is_none());
            values.push(from_cli.or_else(|| env(&f.env_name())));
        }
        if let Some(extra) = pargs.finish().into_iter().next() {
            // A known flag left over was given twice (pico_args takes the first only).
            let text = extra.to_string_lossy();
            let key = text.split('=').next().unwrap_or_default();
            if let Some(f) = ALL.iter().find(|f| f.key == key || f.short == Some(key)) {
                return Err(ConfigError::Repeated(f.name));
            }
            let shown = typed
                .into_iter()
                .find(|t| normalize(t.clone()) == extra)
                .unwrap_or(extra);
            return Err(ConfigError::UnknownFlag(
                shown.to_string_lossy().into_owned(),
            ));
        }
        Ok(Raw { values, from_env })
    }

    /// Whether the value of the flag named `name` came from its `POULPE_*` variable.
    pub(super) fn came_from_env(&self, name: &str) -> bool {
        let i = ALL.iter().position(|g| g.name == name);
        i.is_some_and(|i| {
            self.from_env[i] && self.values[i].as_deref().is_some_and(|v| !v.is_empty())
        })
    }

    /// The flag's value when it was given and is not empty.
    pub(super) fn get(&self, f: &Flag) -> Option<&str> {
        let i = ALL.iter().position(|g| g.name == f.name);
        debug_assert!(i.is_some(), "--{} is not in the table", f.name);
        i.and_then(|i| self.values[i].as_deref())
            .filter(|v| !v.is_empty())
    }

    /// The flag's value, or its default text (empty when it has none).
    pub(super) fn text(&self, f: &Flag) -> &str {
        self.get(f).unwrap_or(match f.default {
            DefaultValue::Text(s) => s,
            _ => "",
        })
    }

    /// A switch: given on the command line, or true or false from the environment.
    pub(super) fn switch(&self, f: &Flag) -> Result<bool, ConfigError> {
        let v = self.get(f).unwrap_or("");
        match v.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" | "" => Ok(false),
            _ => Err(bad(f.name, v, "expected true or false")),
        }
    }

    /// The flag's value as a number in its range, or its default.
    pub(super) fn number<T>(&self, f: &Flag) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + TryFrom<u64> + TryInto<u64> + Copy,
    {
        f.number(self.get(f))
    }
}
