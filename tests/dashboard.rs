//! The dashboard page (`/ui`) in a real headless Chromium: `tests/dashboard.py` drives it through
//! chromedriver (Selenium) against the real binary and reports what it saw as JSON, which these
//! tests check: workers, counts, cron and pause; the token form; the task list, a task's detail,
//! retry, cancel and retry-all; and that user data (ids, names, outputs) is shown as text, never
//! run as HTML.

mod common;
use common::{eventually, Server, Sink};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The Python that has Selenium, once Chromium and chromedriver are known to be there (all three
/// installed by `scripts/test.sh`).
fn python() -> PathBuf {
    let how = "run scripts/test.sh, which installs Debian's chromium and chromium-driver and \
               Selenium into target/test-venv";
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(tool).exists(),
            "the dashboard tests need {tool}: {how}"
        );
    }
    let p = std::env::var_os("POULPE_TEST_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python"),
        PathBuf::from,
    );
    let ok = Command::new(&p)
        .args(["-c", "import selenium"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the dashboard tests need Selenium in {}: {how} (or set POULPE_TEST_PYTHON to a python \
         that has it)",
        p.display()
    );
    p
}

/// Runs one scenario of `tests/dashboard.py` against `s` and returns its report; fails the test
/// with the report when the script could not finish its steps.
fn browse(scenario: &str, s: &Server, extra: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard.py");
    let child = Command::new(python())
        .arg(script)
        .args([scenario, "--url", &s.base])
        .args(extra)
        // Selenium must not look for drivers or browsers on the network.
        .env("SE_OFFLINE", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tests/dashboard.py");
    let (out, _) = common::output_within(child, Duration::from_secs(90));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "dashboard.py {scenario} gave no report ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert_eq!(report["ok"], true, "dashboard.py {scenario}: {report:#}");
    report
}

/// Waits for the final result of `id` and returns its status.
fn finished(s: &Server, id: &str) -> String {
    let (code, r) = s.get(&format!("/task_resp/{id}?timeout=20"));
    assert_eq!(code, 200, "{id}: {r}");
    r["status"].as_str().unwrap_or_default().to_string()
}

/// A task that runs until the server is killed, on a worker (`--exec_any`).
fn occupy_a_worker(s: &Server, id: &str) {
    let t = json!({"id": id, "method": "EXEC", "name": "sleep", "params": "120"});
    assert_eq!(s.submit(&t).0, 200);
    eventually(Duration::from_secs(10), "the task running", || {
        let (_, info) = s.get("/sys_info");
        (info["working_keys"][0] == id).then_some(())
    });
}

/// `N\nlabel` as the page shows each count.
fn count(report: &Value, label: &str) -> String {
    let counts = report["counts"].as_array().expect("counts");
    let c = counts
        .iter()
        .filter_map(Value::as_str)
        .find(|c| c.ends_with(&format!("\n{label}")));
    c.unwrap_or_else(|| panic!("no count {label:?}: {report:#}"))
        .split('\n')
        .next()
        .unwrap_or_default()
        .to_string()
}

const CRON_XSS: &str = r#"<img/src="x"/onerror="window.__xss=1">"#;

#[test]
fn the_page_shows_workers_counts_cron_as_text_and_pauses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    // A cron line whose name is an HTML tag with a script (valid HTML without spaces); it
    // fires in 2099 only.
    let cron = dir.path().join("crontab");
    std::fs::write(&cron, format!("0 0 0 1 1 * 2099 {CRON_XSS} EXEC\n")).expect("crontab");
    let s = Server::builder(&dir)
        .args(&["--workers", "3", "--exec_any", "--cron"])
        .args(&[cron.to_str().expect("utf-8 path")])
        .start();
    let ok = json!({"id": "ok-1", "method": "GET", "name": sink.url("/ok")});
    let dead = json!({"id": "dead-1", "method": "GET", "name": sink.url("/status/500"),
                      "max_retry": 0});
    assert_eq!(s.submit(&ok).0, 200);
    assert_eq!(s.submit(&dead).0, 200);
    assert_eq!(finished(&s, "ok-1"), "succeeded");
    assert_eq!(finished(&s, "dead-1"), "dead");
    // An id may hold markup too (no spaces or '/': not a script, but bold if parsed as HTML).
    occupy_a_worker(&s, "<b>busy<b>");

    let r = browse("view", &s, &[]);
    let workers = r["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 3, "one row per worker: {r:#}");
    let busy: Vec<&Value> = workers.iter().filter(|w| w[2] == "yes").collect();
    assert_eq!(busy.len(), 1, "{r:#}");
    assert_eq!(busy[0][3], "<b>busy<b>", "the id is shown as text: {r:#}");
    assert_eq!(count(&r, "accepted"), "3");
    assert_eq!(count(&r, "succeeded"), "1");
    assert_eq!(count(&r, "dead"), "1");
    assert_eq!(count(&r, "failed attempts"), "1");
    assert_eq!(count(&r, "running"), "1");
    let line = &r["cron"][1];
    assert_eq!(line[2], CRON_XSS, "the cron name is shown as text: {r:#}");
    assert_eq!(line[3], "EXEC", "{r:#}");
    assert_eq!((&r["imgs"], &r["xss"]), (&json!(0), &Value::Null), "{r:#}");
    assert_eq!(r["kafka"], "not configured", "{r:#}");
    assert_eq!(r["store"], "store embedded up", "{r:#}");
    assert!(r["polylines"].as_u64() > Some(0), "the rate chart: {r:#}");
    assert_eq!(
        r["after_pause"],
        json!({"badge": "paused", "button": "Resume"})
    );
    let (_, info) = s.get("/sys_info");
    assert_eq!(
        info["paused"], true,
        "the Pause button paused the server: {info}"
    );
}

#[test]
fn with_a_token_nothing_shows_before_it_and_a_wrong_one_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir)
        .args(&["--workers", "2", "--exec_any"])
        .env("POULPE_TOKEN", "s3cret")
        .start();
    let auth = [("Authorization", "Bearer s3cret")];
    let t = json!({"id": "tok-busy", "method": "EXEC", "name": "sleep", "params": "120"});
    let (code, _) = common::post_raw(&s.url("/task_in_queue"), t.to_string().as_bytes(), &auth);
    assert_eq!(code, 200);
    eventually(Duration::from_secs(10), "the task running", || {
        let (_, info) = common::request("GET", &s.url("/sys_info"), &auth);
        (info["working_keys"][0] == "tok-busy").then_some(())
    });

    let r = browse("token", &s, &["--token", "s3cret"]);
    let before = &r["before"];
    assert_eq!(before["app_shown"], false, "{r:#}");
    assert_eq!(before["workers"], 0, "{r:#}");
    let text = before["text"].as_str().unwrap_or_default();
    assert!(
        !text.contains("tok-busy") && !text.contains("worker"),
        "{r:#}"
    );
    let wrong = &r["wrong"];
    assert!(
        wrong["lmsg"]
            .as_str()
            .unwrap_or_default()
            .contains("refused"),
        "{r:#}"
    );
    assert_eq!(
        (&wrong["app_shown"], &wrong["login_shown"]),
        (&json!(false), &json!(true))
    );
    assert!(
        !wrong["text"]
            .as_str()
            .unwrap_or_default()
            .contains("tok-busy"),
        "{r:#}"
    );
    let right = &r["right"];
    let workers = right["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2, "{r:#}");
    assert!(workers.iter().any(|w| w[3] == "tok-busy"), "{r:#}");
    assert_eq!(right["login_shown"], false, "{r:#}");
    assert_eq!(right["stored"], "s3cret", "kept in sessionStorage: {r:#}");
    let url = right["url"].as_str().unwrap_or_default();
    assert!(!url.contains("s3cret"), "never in the URL: {url}");
    assert_eq!(
        r["reload"]["login_shown"], false,
        "a reload keeps the token: {r:#}"
    );
    let stale = &r["stale"];
    assert_eq!(
        (&stale["app_shown"], &stale["workers"]),
        (&json!(false), &json!(0))
    );
    assert!(
        stale["lmsg"]
            .as_str()
            .unwrap_or_default()
            .contains("refused"),
        "{r:#}"
    );
}

/// An executable shell script `name` in `dir`.
fn program(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write program");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

const NAME_XSS: &str = "<img src=x onerror=window.__xss=1>";
const OUTPUT_XSS: &str = "<img src=x onerror=window.__xss=2>";

#[test]
fn the_task_list_searches_shows_a_detail_retries_and_cancels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("bin dir");
    let marker = dir.path().join("fixed");
    let runs = dir.path().join("xss-runs");
    // Fails (printing markup) until the marker exists.
    program(
        &bin,
        "flaky",
        &format!("echo '{OUTPUT_XSS}'\n[ -e {} ]", marker.display()),
    );
    // A program whose name is markup; always fails, counting its runs.
    program(
        &bin,
        NAME_XSS,
        &format!("echo run >> {}\nexit 1", runs.display()),
    );
    let sink = Sink::start();
    let s = Server::builder(&dir)
        .args(&["--workers", "2", "--exec_dir", bin.to_str().expect("utf-8")])
        .start();
    for t in [
        json!({"id": "ok-1", "method": "GET", "name": sink.url("/ok")}),
        json!({"id": "dead-1", "method": "EXEC", "name": "flaky", "max_retry": 0}),
        json!({"id": "xss-1", "method": "EXEC", "name": NAME_XSS, "max_retry": 0}),
        json!({"id": "later-1", "method": "GET", "name": sink.url("/later"), "delay": 3600}),
    ] {
        assert_eq!(s.submit(&t).0, 200, "{t}");
    }
    assert_eq!(finished(&s, "ok-1"), "succeeded");
    assert_eq!(finished(&s, "dead-1"), "dead");
    assert_eq!(finished(&s, "xss-1"), "dead");
    std::fs::write(&marker, "").expect("marker");

    let r = browse("tasks", &s, &[]);
    let states = &r["states"];
    assert_eq!(
        states,
        &json!({"ok-1": "succeeded", "dead-1": "dead", "later-1": "delayed"})
    );
    let list = r["list"].as_array().expect("list");
    assert!(
        list.iter().any(|row| row[3] == NAME_XSS),
        "the name is shown as text: {r:#}"
    );
    for at in ["list_injected", "end_injected"] {
        assert_eq!(r[at], json!({"imgs": 0, "xss": null}), "{at}: {r:#}");
    }
    let detail = &r["detail"];
    assert_eq!((&detail["imgs"], &detail["xss"]), (&json!(0), &Value::Null));
    let text = detail["text"].as_str().unwrap_or_default();
    assert!(
        text.contains(OUTPUT_XSS),
        "the output is shown as text: {r:#}"
    );
    assert!(text.contains("flaky"), "{r:#}");
    assert!(r["retry_msg"]
        .as_str()
        .unwrap_or_default()
        .contains("dead-1"));
    assert!(r["cancel_msg"]
        .as_str()
        .unwrap_or_default()
        .contains("later-1"));
    let all = r["retry_all_msg"].as_str().unwrap_or_default();
    assert!(
        all.starts_with("1 dead task"),
        "only xss-1 was dead then: {all}"
    );

    // What the clicks did on the server: dead-1 ran again and succeeded; later-1 is cancelled;
    // the other dead task ran a second time.
    eventually(Duration::from_secs(20), "dead-1 succeeding", || {
        let (_, r) = s.get("/task_resp/dead-1?timeout=1");
        (r["status"] == "succeeded").then_some(())
    });
    assert_eq!(finished(&s, "later-1"), "cancelled");
    eventually(Duration::from_secs(20), "xss-1 running again", || {
        let n = std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .count();
        (n == 2).then_some(())
    });
    assert!(
        sink.hits_on("/later").is_empty(),
        "a cancelled task never runs"
    );
}
