//! The SMTP relay settings (`--smtp_*` flags) that the MAIL_TO executor connects with.

use std::path::PathBuf;

/// How the connection to the relay is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Security {
    /// No TLS (`--starttls` and `--smtp_tls` absent).
    Plain,
    /// STARTTLS required (`--starttls`).
    StartTls,
    /// Implicit TLS from the first byte (`--smtp_tls`, port 465).
    Tls,
}

/// The relay settings from the flags.
#[derive(Clone)]
pub(crate) struct SmtpConfig {
    /// Relay host name (`--smtp_server`), also the name its certificate must match.
    pub(crate) server: String,
    /// Relay port (`--smtp_port`, or the default of the security mode).
    pub(crate) port: u16,
    /// AUTH user and password, when a name is given.
    pub(crate) auth: Option<(String, String)>,
    /// Plain, STARTTLS or implicit TLS.
    pub(crate) security: Security,
    /// Default sender when a task gives no `from_addr`.
    pub(crate) from: Option<String>,
    /// Extra CA certificates (PEM) trusted for the relay.
    pub(crate) ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password never reaches a log line.
        f.debug_struct("SmtpConfig")
            .field("server", &self.server)
            .field("port", &self.port)
            .field("user", &self.auth.as_ref().map(|(u, _)| u))
            .field("security", &self.security)
            .field("from", &self.from)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}
