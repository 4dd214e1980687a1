//! MAIL_TO against a real SMTP server (aiosmtpd, started per test by `tests/smtp_server.py`):
//! delivery, several recipients, non-ASCII subjects, STARTTLS with AUTH, 5xx rejection, outage.

mod common;
use common::{eventually, free_port, Server};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The Python that has aiosmtpd and trustme (installed by `scripts/test.sh`).
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("POULPE_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python");
    let ok = Command::new(&p)
        .args(["-c", "import aiosmtpd, trustme"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the mail tests need aiosmtpd and trustme in {}: run scripts/test.sh, which installs them \
         (or set POULPE_TEST_PYTHON to a python that has them)",
        p.display()
    );
    p
}

/// A running aiosmtpd; killed when dropped.
struct Smtp {
    child: Child,
    port: u16,
    out: PathBuf,
}

impl Smtp {
    fn start(dir: &Path, extra: &[&str]) -> Smtp {
        let port = free_port();
        let out = dir.join(format!("mail-{port}"));
        let mut child = Command::new(python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/smtp_server.py"))
            .args(["--port", &port.to_string(), "--out"])
            .arg(&out)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the SMTP server");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read READY");
        assert_eq!(line.trim(), "READY", "SMTP server did not start");
        Smtp { child, port, out }
    }

    /// Mails received so far, in order.
    fn mails(&self) -> Vec<Value> {
        let mut files: Vec<(u32, PathBuf)> = std::fs::read_dir(&self.out)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let p = e.path();
                        let n = p.file_stem()?.to_str()?.parse().ok()?;
                        (p.extension()? == "json").then_some((n, p))
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|(_, p)| {
                serde_json::from_slice(&std::fs::read(p).expect("read mail")).expect("mail json")
            })
            .collect()
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn result(s: &Server, id: &str) -> Value {
    eventually(Duration::from_secs(30), "a final result", || {
        match s.get(&format!("/task_resp/{id}?timeout=5")) {
            (200, v) => Some(v),
            _ => None,
        }
    })
}

/// poulpe with a plain-SMTP relay on `port` (sender f@example.org) and `extra` flags.
fn start_with_relay(dir: &tempfile::TempDir, port: u16, extra: &[&str]) -> Server {
    let port = port.to_string();
    let mut args = vec![
        "--smtp_server",
        "127.0.0.1",
        "--smtp_port",
        &port,
        "--smtp_from",
        "f@example.org",
    ];
    args.extend_from_slice(extra);
    Server::builder(dir).args(&args).start()
}

#[test]
fn plain_mail_arrives_with_recipients_subject_and_body() {
    let dir = tempfile::tempdir().expect("tempdir");
    let smtp = Smtp::start(dir.path(), &[]);
    let port = smtp.port.to_string();
    let s = Server::builder(&dir)
        .args(&[
            "--smtp_server",
            "127.0.0.1",
            "--smtp_port",
            &port,
            "--smtp_from",
            "poulpe@example.org",
        ])
        .start();
    let (code, body) = s.submit(&json!({
        "id": "m1", "method": "MAIL_TO", "name": "ignored@example.org",
        "params": {"to_addr": "a@example.org, b@example.net", "title": "Réunion à 10 h ☕", "body": "Bonjour,\nà demain.\n"},
        "wait": 20,
    }));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "succeeded", "{body}");
    assert!(
        body["output"].as_str().unwrap_or("").starts_with("250"),
        "{body}"
    );
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1);
    let m = &mails[0];
    assert_eq!(m["mail_from"], "poulpe@example.org");
    assert_eq!(m["rcpt_tos"], json!(["a@example.org", "b@example.net"]));
    assert_eq!(m["subject"], "Réunion à 10 h ☕");
    assert_eq!(m["content_type"], "text/plain");
    // The mail parser may add a final newline; the text itself must be intact.
    assert_eq!(
        m["body"]
            .as_str()
            .map(|b| b.replace("\r\n", "\n").trim_end().to_string()),
        Some("Bonjour,\nà demain.".into())
    );

    // name is the recipient when params has no to_addr; params may be a JSON string.
    let (code, body) = s.submit(&json!({
        "method": "MAIL_TO", "name": "c@example.org",
        "params": "{\"from_addr\":\"Ops <ops@example.org>\",\"title\":\"t\",\"body\":\"b\"}",
        "wait": 20,
    }));
    assert_eq!(
        (code, &body["status"]),
        (200, &json!("succeeded")),
        "{body}"
    );
    let mails = smtp.mails();
    assert_eq!(mails[1]["rcpt_tos"], json!(["c@example.org"]));
    assert_eq!(mails[1]["mail_from"], "ops@example.org");

    // Bad addresses are refused at submit, naming the field.
    let (code, body) = s.submit(
        &json!({"method":"MAIL_TO","name":"x@example.org","params":{"to_addr":"not-an-address"}}),
    );
    assert_eq!(code, 400);
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("to_addr:"),
        "{body}"
    );
}

#[test]
fn starttls_with_auth_and_a_trusted_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir_all(&tls_dir).expect("tls dir");
    let smtp = Smtp::start(
        dir.path(),
        &[
            "--auth",
            "mailer:s3cret-pw",
            "--tls-dir",
            tls_dir.to_str().expect("utf8"),
        ],
    );
    let port = smtp.port.to_string();
    let ca = tls_dir.join("ca.pem");
    let args = |user: &str| -> Vec<String> {
        vec![
            "--smtp_server".into(),
            "127.0.0.1".into(),
            "--smtp_port".into(),
            port.clone(),
            "--starttls".into(),
            "--smtp_name".into(),
            user.into(),
            "--smtp_ca_file".into(),
            ca.to_str().expect("utf8").into(),
            "--max_retry".into(),
            "0".into(),
        ]
    };
    let a = args("mailer");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let s = Server::builder(&dir)
        .args(&a)
        .env("POULPE_SMTP_PWD", "s3cret-pw")
        .start();
    let (code, body) = s.submit(&json!({
        "method":"MAIL_TO","name":"to@example.org",
        "params":{"from_addr":"f@example.org","title":"secure","body":"over TLS"},"wait":20}));
    assert_eq!(
        (code, &body["status"]),
        (200, &json!("succeeded")),
        "{body}"
    );
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0]["tls"], true, "the mail went over STARTTLS");
    assert!(
        !s.log_text().contains("s3cret-pw"),
        "the password is never logged"
    );
    drop(s);

    // A wrong password is a permanent failure: dead after one attempt.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir2)
        .args(&a)
        .env("POULPE_SMTP_PWD", "wrong")
        .start();
    let (code, body) = s.submit(&json!({
        "method":"MAIL_TO","name":"to@example.org",
        "params":{"from_addr":"f@example.org","title":"x","body":"y"},"wait":20}));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "dead", "{body}");
    assert_eq!(body["attempts"], 1, "{body}");
    assert_eq!(smtp.mails().len(), 1, "nothing more delivered");
    drop(s);

    // Without the CA file the relay's certificate is not trusted: the reason says which flag.
    let dir3 = tempfile::tempdir().expect("tempdir");
    let no_ca: Vec<&str> = a
        .iter()
        .copied()
        .filter(|x| *x != "--smtp_ca_file" && !x.ends_with("ca.pem"))
        .collect();
    let s = Server::builder(&dir3)
        .args(&no_ca)
        .env("POULPE_SMTP_PWD", "s3cret-pw")
        .start();
    let (code, body) = s.submit(&json!({
        "method":"MAIL_TO","name":"to@example.org",
        "params":{"from_addr":"f@example.org","title":"x","body":"y"},"wait":20}));
    assert_eq!((code, &body["status"]), (200, &json!("dead")), "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or("")
            .contains("--smtp_ca_file"),
        "{body}"
    );
}

#[test]
fn permanent_rejection_dead_letters_at_once_and_outage_retries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let smtp = Smtp::start(dir.path(), &["--reject", "nobody"]);
    let s = start_with_relay(
        &dir,
        smtp.port,
        &["--max_retry", "2", "--retry_interval", "1"],
    );
    let (_, body) = s.submit(&json!({"id":"rej","method":"MAIL_TO","name":"nobody@example.org","params":{"title":"t","body":"b"},"wait":20}));
    assert_eq!(body["status"], "dead", "{body}");
    assert_eq!(body["attempts"], 1, "a 5xx is not retried: {body}");
    assert!(
        body["reason"].as_str().unwrap_or("").contains("550"),
        "{body}"
    );
    let day = std::fs::read_dir(s.data.join("dead"))
        .expect("dead dir")
        .next()
        .expect("a day")
        .expect("entry");
    assert!(
        day.path().join("task-rej.json").is_file(),
        "dead-letter record written"
    );

    // The relay goes away: connection errors are retried, then the task is dead.
    drop(smtp);
    let (_, body) = s.submit(&json!({"id":"down","method":"MAIL_TO","name":"a@example.org","params":{"title":"t","body":"b"}}));
    assert_eq!(body["result"], "OK", "{body}");
    let r = result(&s, "down");
    assert_eq!(r["status"], "dead", "{r}");
    assert_eq!(r["attempts"], 3, "first attempt plus two retries: {r}");
}

#[test]
fn a_task_timeout_bounds_a_relay_that_never_answers() {
    // A relay that accepts connections and never sends its greeting.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for c in silent.incoming().flatten() {
            keep.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let s = start_with_relay(&dir, port, &["--task_timeout", "120", "--max_retry", "0"]);
    // With the relay's 120 s the wait below would run out; the task's own 1 s ends the attempt.
    let (code, body) = s.submit(&json!({
        "id":"slow-relay","method":"MAIL_TO","name":"to@example.org",
        "params":{"title":"t","body":"b"},"timeout":1,"wait":20}));
    assert_eq!(code, 200, "the attempt ended within the wait: {body}");
    assert_eq!(body["status"], "dead", "{body}");
    assert_eq!(
        body["reason"], "SMTP: the relay did not answer within 1 s (timed out)",
        "{body}"
    );
    assert!(
        !held.lock().unwrap_or_else(|p| p.into_inner()).is_empty(),
        "poulpe did connect to the relay"
    );
}

#[test]
fn smtp_tls_speaks_tls_from_the_first_byte_with_a_trusted_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir_all(&tls_dir).expect("tls dir");
    // The relay speaks TLS from the first byte (port 465 style): no plain greeting, no STARTTLS.
    let smtp = Smtp::start(
        dir.path(),
        &["--implicit-tls", tls_dir.to_str().expect("utf8")],
    );
    let ca = tls_dir.join("ca.pem");
    let s = start_with_relay(
        &dir,
        smtp.port,
        &[
            "--smtp_tls",
            "--smtp_ca_file",
            ca.to_str().expect("utf8"),
            "--max_retry",
            "0",
        ],
    );
    let (code, body) = s.submit(&json!({
        "id":"implicit","method":"MAIL_TO","name":"to@example.org",
        "params":{"title":"implicit","body":"TLS from the first byte"},"wait":20}));
    assert_eq!(
        (code, &body["status"]),
        (200, &json!("succeeded")),
        "{body}\n{}",
        s.log_text()
    );
    assert!(
        body["output"].as_str().unwrap_or("").starts_with("250"),
        "{body}"
    );
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert_eq!(mails[0]["tls"], true, "the mail went over TLS");
    assert_eq!(mails[0]["subject"], "implicit");
    assert_eq!(mails[0]["rcpt_tos"], json!(["to@example.org"]));
}

#[test]
fn a_4xx_answer_is_retried_and_the_mail_then_goes_out_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The relay answers 451 to the first DATA, then accepts.
    let smtp = Smtp::start(dir.path(), &["--tempfail", "1"]);
    let s = start_with_relay(
        &dir,
        smtp.port,
        &["--max_retry", "2", "--retry_interval", "1"],
    );
    let (code, body) = s.submit(&json!({
        "id":"tempfail","method":"MAIL_TO","name":"to@example.org",
        "params":{"title":"again","body":"b"}}));
    assert_eq!((code, &body["result"]), (200, &json!("OK")), "{body}");
    let r = result(&s, "tempfail");
    assert_eq!(r["status"], "succeeded", "a 451 is transient: {r}");
    assert_eq!(r["attempts"], 2, "the 451, then the accepted retry: {r}");
    assert!(r["output"].as_str().unwrap_or("").starts_with("250"), "{r}");
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "delivered once: {mails:?}");
    assert_eq!(mails[0]["subject"], "again");
}
