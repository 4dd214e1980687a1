//! GET and POST attempts: plain `http://` ones through [`super::plain`] (unless a proxy is
//! configured), the rest (https, proxies, odd URLs, redirects) through one shared ureq agent
//! (keep-alive, rustls).

use super::plain::{left, Outcome, Plain, Target};
use super::{answered, RunResult, TimedOut, MAX_OUTPUT};
use crate::task::{Method, Task};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use ureq::tls::{parse_pem, PemItem, RootCerts, TlsConfig};
use ureq::Agent;

/// Where Debian, Alpine and most distributions keep the system CA bundle.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The HTTP executor.
pub(crate) struct HttpExec {
    agent: Agent,
    /// The agent's own attempt timeout (`--task_timeout`): a task with another one gets a
    /// request-level configuration, a copy of the agent's, which costs allocations per call.
    default_timeout: Duration,
    /// Whether plain `http://` attempts go through [`Plain`]: not when the environment names
    /// a proxy (ureq then decides, per URL, whether to use it).
    plain: bool,
}

/// Redirects ureq follows (its default); after a plain attempt's redirect, one fewer.
const MAX_REDIRECTS: u32 = 10;

/// `--ca_file`, else the system CA bundle (or `SSL_CERT_FILE`), else the bundled Mozilla roots.
fn root_certs(ca_file: Option<&Path>) -> RootCerts {
    let env = std::env::var("SSL_CERT_FILE").ok();
    let candidates: Vec<&str> = match ca_file.and_then(Path::to_str) {
        Some(f) => vec![f],
        None => env
            .iter()
            .map(String::as_str)
            .chain(SYSTEM_BUNDLES.iter().copied())
            .collect(),
    };
    for path in candidates {
        let Ok(pem) = std::fs::read(Path::new(path)) else {
            continue;
        };
        let certs: Vec<_> = parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if !certs.is_empty() {
            log::debug!("http: {} CA certificates from {path}", certs.len());
            return RootCerts::Specific(Arc::new(certs));
        }
    }
    RootCerts::WebPki
}

impl HttpExec {
    /// Builds the agent; `workers` bounds the idle connections kept per host, and
    /// `default_timeout` is an attempt's time limit unless the task sets its own.
    pub(crate) fn new(
        workers: usize,
        ca_file: Option<&Path>,
        default_timeout: Duration,
    ) -> HttpExec {
        let config = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(default_timeout))
            .timeout_connect(Some(Duration::from_secs(10)))
            .max_idle_connections((workers * 4).max(16))
            .max_idle_connections_per_host(workers.max(4))
            .user_agent(concat!("poulpe/", env!("CARGO_PKG_VERSION")))
            .tls_config(TlsConfig::builder().root_certs(root_certs(ca_file)).build())
            .build();
        let plain = config.proxy().is_none();
        HttpExec {
            agent: super::tcp::agent(config),
            default_timeout,
            plain,
        }
    }

    /// One GET or POST attempt with the task's headers (a POST's `Content-Type` is
    /// `application/json` unless they give another); 2xx is success and the body is the output.
    /// (Not inlined: the binary is 4 KiB smaller so.)
    #[inline(never)]
    pub(crate) fn run(&self, task: &Task, timeout: Duration) -> RunResult {
        let plain = self.plain.then(|| Target::of(task)).flatten();
        let plain = plain.and_then(|t| Plain.attempt(self.agent.config(), &t, task, timeout));
        match plain {
            Some(Outcome::Done(r)) => r,
            Some(Outcome::Redirect { url, deadline }) => match left(deadline) {
                Some(left) => self.get(task, url, timeout, left, true),
                None => TimedOut(timeout).into(),
            },
            None => self.through_ureq(task, timeout),
        }
    }

    /// The attempt through ureq, as before the plain client.
    fn through_ureq(&self, task: &Task, timeout: Duration) -> RunResult {
        if task.method != Method::Post {
            let url = if task.params.is_empty() {
                task.name.clone()
            } else if task.name.contains('?') {
                format!("{}&{}", task.name, task.params)
            } else {
                format!("{}?{}", task.name, task.params)
            };
            return self.get(task, url, timeout, timeout, false);
        }
        let mut req = self.agent.post(&task.name);
        if timeout != self.default_timeout {
            req = req.config().timeout_global(Some(timeout)).build();
        }
        if !typed(task) {
            req = req.content_type("application/json");
        }
        for (k, v) in task.header_pairs() {
            req = req.header(k, v);
        }
        answer(req.send(task.params.as_bytes()), timeout)
    }

    /// A GET of `url` through ureq within `left`: the task's own, or (`redirected`) the
    /// redirect a plain attempt got, followed as ureq would have: a POST becomes a GET keeping
    /// its `Content-Type`, `Authorization` and `Cookie` are dropped, one redirect fewer is left.
    fn get(
        &self,
        task: &Task,
        url: String,
        timeout: Duration,
        left: Duration,
        redirected: bool,
    ) -> RunResult {
        let mut req = self.agent.get(&url);
        if left != self.default_timeout || redirected {
            let config = req.config().timeout_global(Some(left));
            let redirects = if redirected {
                MAX_REDIRECTS - 1
            } else {
                MAX_REDIRECTS
            };
            req = config.max_redirects(redirects).build();
        }
        if redirected && task.method == Method::Post && !typed(task) {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in task.header_pairs() {
            let secret =
                k.eq_ignore_ascii_case("authorization") || k.eq_ignore_ascii_case("cookie");
            if !(redirected && secret) {
                req = req.header(k, v);
            }
        }
        answer(req.call(), timeout)
    }
}

/// Whether the task's headers give a `Content-Type`.
fn typed(task: &Task) -> bool {
    task.header_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
}

/// The result of an attempt from ureq's answer: 2xx is success, the body is the output.
fn answer(
    sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    timeout: Duration,
) -> RunResult {
    let mut resp = match sent {
        Ok(r) => r,
        Err(ureq::Error::Timeout(_)) => return TimedOut(timeout).into(),
        Err(e) => return RunResult::failed(format!("request failed: {e}")),
    };
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    let read = resp
        .body_mut()
        .as_reader()
        .take(MAX_OUTPUT as u64 + 1)
        .read_to_end(&mut body);
    answered(status, body, read.as_ref().err().map(|e| e as _))
}
