//! HTTPS tasks against a real local TLS server (`tests/https_server.py`, a trustme certificate):
//! the server's certificate is checked against `--ca_file`, which replaces every other source of
//! roots, or against `SSL_CERT_FILE` / the system bundle; an unknown issuer fails the attempt with
//! a certificate error.

mod common;
use common::Server;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Child;

/// A running HTTPS server with its CA files; killed when dropped.
struct Https {
    child: Child,
    port: u16,
    /// The CA that signed the server's certificate.
    ca: PathBuf,
    /// A CA that signed nothing the server shows.
    other_ca: PathBuf,
}

impl Https {
    fn start(dir: &Path) -> Https {
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls).expect("tls dir");
        let python = common::py::python("import trustme", "trustme");
        let (child, port) = common::py::start_server(
            &python,
            "https_server.py",
            &["--tls-dir".as_ref(), tls.as_os_str()],
        );
        Https {
            child,
            port,
            ca: tls.join("ca.pem"),
            other_ca: tls.join("other-ca.pem"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Https {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Submits a GET of `url` with one attempt and waits for its final result.
fn get_once(s: &Server, id: &str, url: &str) -> Value {
    let (code, r) = s.submit(&json!({"id": id, "method": "GET", "name": url,
        "max_retry": 0, "wait": 30}));
    assert_eq!(
        code, 200,
        "{id}: the submit waits for the final result: {r}"
    );
    r
}

fn assert_succeeded(r: &Value, path: &str) {
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["code"], 200, "{r}");
    assert_eq!(r["output"], format!("tls-ok {path}"), "{r}");
}

fn assert_certificate_error(r: &Value) {
    assert_eq!(r["status"], "dead", "{r}");
    assert_eq!(r["attempts"], 1, "{r}");
    let reason = r["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("invalid peer certificate") && reason.contains("UnknownIssuer"),
        "the reason names the certificate problem: {r}"
    );
}

#[test]
fn ca_file_makes_a_private_ca_trusted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let https = Https::start(dir.path());
    // SSL_CERT_FILE empty: the system bundle, which does not hold the test CA.
    let s = Server::builder(&dir)
        .args(&["--ca_file", path_str(&https.ca)])
        .env("SSL_CERT_FILE", "")
        .start();
    let r = get_once(&s, "tls-ca-file", &https.url("/ca-file"));
    assert_succeeded(&r, "/ca-file");
}

#[test]
fn an_unknown_issuer_fails_the_attempt_with_a_certificate_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let https = Https::start(dir.path());
    let s = Server::builder(&dir).env("SSL_CERT_FILE", "").start();
    let r = get_once(&s, "tls-system", &https.url("/system"));
    assert_certificate_error(&r);
}

#[test]
fn ssl_cert_file_names_the_trusted_bundle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let https = Https::start(dir.path());
    let s = Server::builder(&dir)
        .env("SSL_CERT_FILE", path_str(&https.ca))
        .start();
    let r = get_once(&s, "tls-env", &https.url("/env"));
    assert_succeeded(&r, "/env");
}

/// `--ca_file` replaces the other sources: with it naming a CA that signed nothing here, the
/// right CA in `SSL_CERT_FILE` does not help.
#[test]
fn ca_file_replaces_ssl_cert_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let https = Https::start(dir.path());
    let s = Server::builder(&dir)
        .args(&["--ca_file", path_str(&https.other_ca)])
        .env("SSL_CERT_FILE", path_str(&https.ca))
        .start();
    let r = get_once(&s, "tls-replaced", &https.url("/replaced"));
    assert_certificate_error(&r);
}
