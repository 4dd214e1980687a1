//! MAIL_TO: plain-text mails through the configured SMTP relay (lettre's synchronous pooled
//! transport, rustls), and the validation of mail params at submit.

use super::RunResult;
use crate::task::Task;
use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::{PoolConfig, SmtpTransportBuilder};
use lettre::{Message, SmtpTransport, Transport};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// Longest subject accepted, in bytes.
const MAX_TITLE: usize = 998;
/// Most recipients in one mail.
const MAX_RECIPIENTS: usize = 100;

/// How the connection to the relay is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// No TLS (`--starttls` and `--smtp_tls` absent).
    Plain,
    /// STARTTLS required (`--starttls`).
    StartTls,
    /// Implicit TLS from the first byte (`--smtp_tls`, port 465).
    Tls,
}

/// The relay settings from the flags.
#[derive(Clone)]
pub struct SmtpConfig {
    pub server: String,
    pub port: u16,
    /// AUTH user and password, when a name is given.
    pub auth: Option<(String, String)>,
    pub security: Security,
    /// Default sender when a task gives no `from_addr`.
    pub from: Option<String>,
    /// Extra CA certificates (PEM) trusted for the relay.
    pub ca_file: Option<PathBuf>,
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

/// Mail params as stored with the task (sender resolved at submit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailParams {
    pub from_addr: String,
    pub to_addr: String,
    pub title: String,
    pub body: String,
}

/// Validates MAIL_TO params (a JSON object or a JSON string holding one) into stored params.
/// Errors name the field: `(field, problem)`.
pub fn parse_params(
    name: &str,
    raw: Option<&Value>,
    default_from: Option<&str>,
) -> Result<MailParams, (&'static str, String)> {
    let obj = match raw {
        Some(Value::Object(o)) => o.clone(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(o)) => o,
            _ => {
                return Err((
                    "params",
                    "for MAIL_TO must be a JSON object {from_addr,to_addr,title,body}".into(),
                ))
            }
        },
        _ => {
            return Err((
                "params",
                "for MAIL_TO must be a JSON object {from_addr,to_addr,title,body}".into(),
            ))
        }
    };
    let text = |field: &'static str| -> Result<Option<String>, (&'static str, String)> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err((field, "must be a string".into())),
        }
    };
    let from_addr = match text("from_addr")?.filter(|s| !s.trim().is_empty()) {
        Some(f) => f,
        None => default_from.map(str::to_string).ok_or((
            "from_addr",
            "is required (or start poulpe with --smtp_from)".to_string(),
        ))?,
    };
    from_addr.trim().parse::<Mailbox>().map_err(|e| {
        (
            "from_addr",
            format!("{from_addr:?} is not a mail address: {e}"),
        )
    })?;
    let to_addr = match text("to_addr")?.filter(|s| !s.trim().is_empty()) {
        Some(t) => t,
        None => name.to_string(),
    };
    let to = recipients(&to_addr).map_err(|e| ("to_addr", e))?;
    if to.len() > MAX_RECIPIENTS {
        return Err(("to_addr", format!("at most {MAX_RECIPIENTS} recipients")));
    }
    let title = text("title")?.unwrap_or_default();
    if title.len() > MAX_TITLE || title.contains(['\r', '\n']) {
        return Err((
            "title",
            format!("must be one line of at most {MAX_TITLE} bytes"),
        ));
    }
    let body = text("body")?.unwrap_or_default();
    Ok(MailParams {
        from_addr: from_addr.trim().to_string(),
        to_addr,
        title,
        body,
    })
}

/// Parses a comma-separated recipient list.
fn recipients(list: &str) -> Result<Vec<Mailbox>, String> {
    let out: Vec<Mailbox> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|a| {
            a.parse::<Mailbox>()
                .map_err(|e| format!("{a:?} is not a mail address: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if out.is_empty() {
        return Err("no recipient (give to_addr, or the address as name)".into());
    }
    Ok(out)
}

/// Most distinct per-task timeouts that get a pooled transport of their own; a mail with a
/// further value gets a transport of its own for that one send.
const MAX_TIMEOUT_POOLS: usize = 8;

/// The MAIL_TO executor: one pooled SMTP transport shared by all workers, plus one per distinct
/// per-task `timeout` (lettre sets timeouts per transport, not per mail).
pub struct MailExec {
    transport: SmtpTransport,
    default_timeout: Duration,
    builder: SmtpTransportBuilder,
    by_timeout: Mutex<HashMap<Duration, SmtpTransport>>,
}

impl MailExec {
    /// Builds the transport; fails on an unreadable CA file.
    pub fn new(cfg: &SmtpConfig, workers: usize, timeout: Duration) -> Result<MailExec, String> {
        let mut b = SmtpTransport::builder_dangerous(cfg.server.as_str())
            .port(cfg.port)
            .timeout(Some(timeout))
            .pool_config(PoolConfig::new().max_size(workers.max(1) as u32));
        if cfg.security != Security::Plain {
            let mut tls = TlsParameters::builder(cfg.server.clone());
            if let Some(path) = &cfg.ca_file {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("--smtp_ca_file: cannot read {}: {e}", path.display()))?;
                let cert = Certificate::from_pem(&pem)
                    .map_err(|e| format!("--smtp_ca_file: {}: {e}", path.display()))?;
                tls = tls.add_root_certificate(cert);
            }
            let params = tls
                .build_rustls()
                .map_err(|e| format!("--smtp_server: TLS setup failed: {e}"))?;
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
    pub fn run(&self, task: &Task, timeout: Duration) -> RunResult {
        let params: MailParams = match serde_json::from_str(&task.params) {
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
                error: format!("SMTP: {e}"),
                permanent: e.is_permanent(),
            },
        }
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
    use serde_json::json;

    #[test]
    fn params_are_validated_with_field_names() {
        let p = parse_params(
            "a@x.org",
            Some(&json!({"title":"Hi","body":"b"})),
            Some("me@x.org"),
        )
        .expect("valid");
        assert_eq!(p.to_addr, "a@x.org");
        assert_eq!(p.from_addr, "me@x.org");
        let p = parse_params(
            "ignored",
            Some(&json!("{\"from_addr\":\"F <f@x.org>\",\"to_addr\":\"a@x.org, b@y.org\",\"title\":\"Été\",\"body\":\"x\"}")),
            None,
        )
        .expect("valid string form");
        assert_eq!(recipients(&p.to_addr).expect("two").len(), 2);
        let bad = |name: &str, v: Value, from: Option<&str>| {
            parse_params(name, Some(&v), from).unwrap_err().0
        };
        assert_eq!(bad("a@x.org", json!({"body":"b"}), None), "from_addr");
        assert_eq!(
            bad("a@x.org", json!({"from_addr":"nope"}), None),
            "from_addr"
        );
        assert_eq!(bad("not an address", json!({}), Some("f@x.org")), "to_addr");
        assert_eq!(
            bad("a@x.org", json!({"to_addr":"a@x.org,bad"}), Some("f@x.org")),
            "to_addr"
        );
        assert_eq!(
            bad(
                "a@x.org",
                json!({"title":"a\r\nBcc: evil@x.org"}),
                Some("f@x.org")
            ),
            "title"
        );
        assert_eq!(bad("a@x.org", json!({"body":5}), Some("f@x.org")), "body");
        assert_eq!(
            parse_params("a@x.org", Some(&json!([1])), None)
                .unwrap_err()
                .0,
            "params"
        );
        assert_eq!(parse_params("a@x.org", None, None).unwrap_err().0, "params");
    }

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
}
