//! MAIL_TO: plain-text mails through the configured SMTP relay (lettre's synchronous pooled
//! transport, rustls). The params are validated at submit by [`crate::task::mail`]; the relay
//! settings come from [`crate::config::SmtpConfig`].

use super::RunResult;
use crate::config::{Security, SmtpConfig};
use crate::task::mail::{recipients, MailParams};
use crate::task::Task;
use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::{PoolConfig, SmtpTransportBuilder};
use lettre::{Message, SmtpTransport, Transport};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why the mail executor cannot be built from the relay settings.
#[derive(Debug)]
pub enum MailError {
    /// `--smtp_ca_file` cannot be read.
    ReadCaFile(PathBuf, io::Error),
    /// `--smtp_ca_file` holds no usable certificate.
    BadCaFile(PathBuf, lettre::transport::smtp::Error),
    /// The TLS parameters for the relay cannot be built.
    Tls(lettre::transport::smtp::Error),
}

impl fmt::Display for MailError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MailError::ReadCaFile(path, e) => {
                write!(f, "--smtp_ca_file: cannot read {}: {e}", path.display())
            }
            MailError::BadCaFile(path, e) => write!(f, "--smtp_ca_file: {}: {e}", path.display()),
            MailError::Tls(e) => write!(f, "--smtp_server: TLS setup failed: {e}"),
        }
    }
}

impl std::error::Error for MailError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MailError::ReadCaFile(_, e) => Some(e),
            MailError::BadCaFile(_, e) | MailError::Tls(e) => Some(e),
        }
    }
}

/// Most distinct per-task timeouts that get a pooled transport of their own; a mail with a
/// further value gets a transport of its own for that one send.
const MAX_TIMEOUT_POOLS: usize = 8;

/// The MAIL_TO executor: one pooled SMTP transport shared by all workers, plus one per distinct
/// per-task `timeout` (lettre sets timeouts per transport, not per mail).
pub(crate) struct MailExec {
    transport: SmtpTransport,
    /// The relay's port and security, to explain a failure.
    port: u16,
    security: Security,
    default_timeout: Duration,
    builder: SmtpTransportBuilder,
    by_timeout: Mutex<HashMap<Duration, SmtpTransport>>,
}

impl MailExec {
    /// Builds the transport; fails on an unreadable CA file.
    pub(crate) fn new(
        cfg: &SmtpConfig,
        workers: usize,
        timeout: Duration,
    ) -> Result<MailExec, MailError> {
        let mut b = SmtpTransport::builder_dangerous(cfg.server.as_str())
            .port(cfg.port)
            .timeout(Some(timeout))
            .pool_config(PoolConfig::new().max_size(workers.max(1) as u32));
        if cfg.security != Security::Plain {
            let mut tls = TlsParameters::builder(cfg.server.clone());
            if let Some(path) = &cfg.ca_file {
                let pem =
                    std::fs::read(path).map_err(|e| MailError::ReadCaFile(path.clone(), e))?;
                let cert = Certificate::from_pem(&pem)
                    .map_err(|e| MailError::BadCaFile(path.clone(), e))?;
                tls = tls.add_root_certificate(cert);
            }
            let params = tls.build_rustls().map_err(MailError::Tls)?;
            b = b.tls(match cfg.security {
                Security::StartTls => Tls::Required(params),
                _ => Tls::Wrapper(params),
            });
        }
        if let Some((user, pwd)) = &cfg.auth {
            b = b.credentials(Credentials::new(user.clone(), pwd.clone()));
        }
        Ok(MailExec {
            transport: b.clone().build(),
            port: cfg.port,
            security: cfg.security,
            default_timeout: timeout,
            builder: b,
            by_timeout: Mutex::new(HashMap::new()),
        })
    }

    /// The transport whose socket timeouts are `timeout`.
    fn transport(&self, timeout: Duration) -> SmtpTransport {
        if timeout == self.default_timeout {
            return self.transport.clone();
        }
        let mut pools = self.by_timeout.lock();
        if let Some(t) = pools.get(&timeout) {
            return t.clone();
        }
        let builder = self.builder.clone().timeout(Some(timeout));
        if pools.len() >= MAX_TIMEOUT_POOLS {
            return builder.pool_config(PoolConfig::new().max_size(1)).build();
        }
        let t = builder.build();
        pools.insert(timeout, t.clone());
        t
    }

    /// Sends one mail; a 5xx answer is permanent (dead at once), anything else may be retried.
    /// `timeout` bounds each network step (connect, each read and write).
    pub(crate) fn run(&self, task: &Task, timeout: Duration) -> RunResult {
        let params: MailParams = match serde_json::from_slice(task.params.as_bytes()) {
            Ok(p) => p,
            Err(e) => {
                return RunResult {
                    permanent: true,
                    ..RunResult::failed(format!("stored mail params unreadable: {e}"))
                }
            }
        };
        let message = match build(&params) {
            Ok(m) => m,
            Err(e) => {
                return RunResult {
                    permanent: true,
                    ..RunResult::failed(e)
                }
            }
        };
        match self.transport(timeout).send(&message) {
            Ok(resp) => {
                let text: Vec<&str> = resp.message().collect();
                RunResult {
                    ok: true,
                    code: Some(i64::from(u16::from(resp.code()))),
                    output: format!("{} {}", resp.code(), text.join(" ")),
                    error: String::new(),
                    permanent: false,
                }
            }
            Err(e) => RunResult {
                ok: false,
                code: e.status().map(|c| i64::from(u16::from(c))),
                output: String::new(),
                error: explain(&e, self.port, self.security, timeout),
                permanent: e.is_permanent(),
            },
        }
    }
}

/// A failed send in words a user can act on: a relay that stays silent timed out (not "os
/// error 11"), with a hint when the port suggests the other kind of TLS; an untrusted
/// certificate names `--smtp_ca_file`.
fn explain(
    e: &lettre::transport::smtp::Error,
    port: u16,
    security: Security,
    timeout: Duration,
) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut timed_out = e.is_timeout();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            timed_out |= matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            );
        }
        source = s.source();
    }
    if timed_out {
        return format!(
            "SMTP: the relay did not answer within {} s (timed out){}",
            timeout.as_secs(),
            tls_hint(port, security)
        );
    }
    let text = e.to_string();
    if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        return format!(
            "SMTP: {text}; the relay's certificate is not trusted: give its CA with --smtp_ca_file"
        );
    }
    format!("SMTP: {text}")
}

/// When a relay stays silent: a hint if its port usually speaks the other kind of TLS (a
/// client waiting for a greeting that a TLS port never sends in clear, or the reverse).
fn tls_hint(port: u16, security: Security) -> &'static str {
    match (port, security) {
        (465, Security::Plain | Security::StartTls) => {
            "; port 465 usually expects TLS from the first byte: try --smtp_tls"
        }
        (25 | 587, Security::Tls) => {
            "; this port usually starts in plain text: try --starttls instead of --smtp_tls"
        }
        _ => "",
    }
}

fn build(p: &MailParams) -> Result<Message, String> {
    let from: Mailbox = p.from_addr.parse().map_err(|e| format!("from_addr: {e}"))?;
    let mut b = Message::builder()
        .from(from)
        .subject(p.title.clone())
        .header(ContentType::TEXT_PLAIN);
    for to in recipients(&p.to_addr)? {
        b = b.to(to);
    }
    b.body(p.body.clone())
        .map_err(|e| format!("cannot build the mail: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_plain_text_utf8_mail() {
        let p = MailParams {
            from_addr: "f@x.org".into(),
            to_addr: "a@x.org,b@x.org".into(),
            title: "Réunion à 10 h".into(),
            body: "Bonjour ☕".into(),
        };
        let m = String::from_utf8(build(&p).expect("mail").formatted()).expect("utf8");
        assert!(m.contains("To: a@x.org, b@x.org"), "{m}");
        assert!(
            m.contains("Subject: =?utf-8?"),
            "non-ASCII subject is encoded: {m}"
        );
        assert!(m.contains("Content-Type: text/plain; charset=utf-8"), "{m}");
    }

    #[test]
    fn a_silent_relay_on_a_port_of_the_other_tls_kind_gets_a_hint() {
        assert!(tls_hint(465, Security::Plain).contains("--smtp_tls"));
        assert!(tls_hint(465, Security::StartTls).contains("--smtp_tls"));
        assert!(tls_hint(587, Security::Tls).contains("--starttls"));
        assert!(tls_hint(25, Security::Tls).contains("--starttls"));
        assert_eq!(tls_hint(465, Security::Tls), "");
        assert_eq!(tls_hint(587, Security::StartTls), "");
        assert_eq!(tls_hint(2525, Security::Plain), "");
    }
}
