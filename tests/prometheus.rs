//! `/metrics` as Prometheus itself reads it: `promtool check metrics` (Debian's `prometheus`
//! package) finds nothing to lint after tasks of every outcome, and a real Prometheus server,
//! started here on a free port with its own storage, scrapes poulpe with the bearer token.

mod common;
use common::{eventually, free_port, post_raw, request, Server, Sink};
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const TOKEN: &str = "pr0m";
const AUTH: &str = "Bearer pr0m";

/// The path of `tool`, or a failure saying how to get it.
fn need(tool: &str) -> String {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => p.to_string_lossy().into_owned(),
        None => panic!(
            "{tool} not found: run scripts/test.sh, which installs Debian's prometheus package \
             (promtool and prometheus), or apt-get install prometheus"
        ),
    }
}

/// `promtool check metrics` on `text`.
fn promtool(text: &str) -> Output {
    let mut child = Command::new(need("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    child.wait_with_output().expect("promtool")
}

fn submit(s: &Server, t: Value) {
    let (code, r) = post_raw(
        &s.url("/task_in_queue"),
        t.to_string().as_bytes(),
        &[("Authorization", AUTH)],
    );
    assert_eq!(code, 200, "{r}");
}

fn counts(s: &Server) -> Value {
    let (code, info) = request("GET", &s.url("/sys_info"), &[("Authorization", AUTH)]);
    assert_eq!(code, 200, "{info}");
    info["counts"].clone()
}

#[test]
fn promtool_finds_nothing_to_lint_after_every_outcome() {
    // promtool does lint: a counter without `_total` is reported.
    let bad = promtool("# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests 1\n");
    assert!(!bad.status.success(), "{bad:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--token", TOKEN]).start();
    submit(
        &s,
        json!({"id":"p-ok","method":"GET","name":sink.url("/ok")}),
    );
    // Two failed attempts, then dead.
    submit(
        &s,
        json!({"id":"p-dead","method":"GET","name":sink.url("/status/500"),
               "max_retry":1,"retry_interval":0}),
    );
    submit(
        &s,
        json!({"id":"p-gone","method":"GET","name":sink.url("/never"),"delay":300}),
    );
    let (code, r) = request("DELETE", &s.url("/task/p-gone"), &[("Authorization", AUTH)]);
    assert_eq!(code, 200, "{r}");
    eventually(Duration::from_secs(20), "every outcome", || {
        let c = counts(&s);
        (c["succeeded"] == 1 && c["dead"] == 1 && c["cancelled"] == 1 && c["failed_attempts"] == 2)
            .then_some(())
    });
    let (code, text) = {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut r = agent
            .get(s.url("/metrics"))
            .header("Authorization", AUTH)
            .call()
            .expect("GET /metrics");
        (
            r.status().as_u16(),
            r.body_mut().read_to_string().expect("body"),
        )
    };
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("poulpe_tasks_dead_total 1\n"), "{text}");
    let out = promtool(&text);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool: {said}\n{text}");
    assert_eq!(said.trim(), "", "promtool: {said}");
}

/// A Prometheus server of the test's own; killed when dropped.
struct Prometheus {
    child: Child,
    base: String,
    log: std::path::PathBuf,
}

impl Prometheus {
    /// Starts Prometheus on a free port, storing in `dir`, scraping `target` (host:port) every
    /// second with `token`; waits until it is ready.
    fn start(dir: &Path, target: &str, token: &str) -> Prometheus {
        let bin = need("prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: poulpe\n    metrics_path: /metrics\n    \
                 authorization:\n      credentials: {token}\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("prometheus.yml");
        let port = free_port();
        let log = dir.join("prometheus.log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start prometheus");
        let mut p = Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        eventually(Duration::from_secs(30), "Prometheus to be ready", || {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("prometheus exited ({st}):\n{}", p.log_text());
            }
            common::try_get(&format!("{}/-/ready", p.base))
                .ok()
                .filter(|(code, _)| *code == 200)
        });
        p
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of instant query `q` (the first series), if it has one.
    fn query(&self, q: &str) -> Option<f64> {
        let (code, r) = common::get(&format!("{}/api/v1/query?query={q}", self.base));
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["status"], "success", "{r}");
        r["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_prometheus_scrapes_the_counters_with_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--token", TOKEN]).start();
    for i in 0..3 {
        submit(
            &s,
            json!({"id":format!("ps-{i}"),"method":"GET","name":sink.url("/ok")}),
        );
    }
    eventually(Duration::from_secs(20), "three successes", || {
        (counts(&s)["succeeded"] == 3).then_some(())
    });
    let want = counts(&s)["succeeded"].as_f64().expect("succeeded");

    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).expect("mkdir");
    let prom = Prometheus::start(&prom_dir, &format!("127.0.0.1:{}", s.port), TOKEN);
    let got = eventually(Duration::from_secs(30), "a scrape with the counter", || {
        prom.query("poulpe_tasks_succeeded_total")
    });
    assert_eq!(got, want, "Prometheus and /sys_info disagree");
    assert_eq!(prom.query("up"), Some(1.0), "the scrape is up");
    // Every scrape was one /metrics answer of poulpe's with the token: 200, none refused.
    let scraped = prom.query("poulpe_http_requests_total%7Bcode%3D%22200%22%7D");
    assert!(scraped.is_some_and(|n| n >= 1.0), "{scraped:?}");
    assert_eq!(
        prom.query("poulpe_http_requests_total%7Bcode%3D%22401%22%7D"),
        None,
        "no answer was 401:\n{}",
        prom.log_text()
    );
}
