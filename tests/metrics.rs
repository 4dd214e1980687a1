//! `GET /metrics`: Prometheus text (format 0.0.4) with the task counters, histograms and HTTP
//! answers, behind `--token`.

mod common;
use common::{eventually, request, Server, Sink};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const TOKEN: &str = "m3trics";

/// GET `/metrics` with the token: (status, Content-Type, body).
fn scrape(s: &Server) -> (u16, String, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut r = agent
        .get(s.url("/metrics"))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .call()
        .expect("GET /metrics");
    let kind = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = r.body_mut().read_to_string().expect("body");
    (r.status().as_u16(), kind, body)
}

/// Reads the text as a Prometheus scraper would: every sample line is `name{labels} value`
/// with a float value, and every sample's metric was declared by a `# TYPE` line before it.
/// Returns the samples keyed by `name{labels}` as written.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut typed: HashMap<String, String> = HashMap::new();
    let mut helped: HashSet<String> = HashSet::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "type: {line}"
            );
            assert!(helped.contains(name), "# HELP before # TYPE: {line}");
            assert!(
                typed.insert(name.to_string(), kind.to_string()).is_none(),
                "declared twice: {line}"
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("# HELP name text");
            assert!(!help.is_empty(), "{line}");
            helped.insert(name.to_string());
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "line: {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value: {line}"));
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("labels close");
                for pair in labels.split(',') {
                    let (k, v) = pair.split_once('=').expect("label k=v");
                    assert!(
                        !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    );
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "{line}"
                    );
                }
                name
            }
            None => series,
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "name: {line}"
        );
        let family = match typed.get(name) {
            Some(_) => name,
            None => ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| typed.get(*f).map(String::as_str) == Some("histogram"))
                .unwrap_or_else(|| panic!("no # TYPE before {line}")),
        };
        assert!(typed.contains_key(family));
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "twice: {line}"
        );
    }
    samples
}

/// Submits `t` with the token; expects 200.
fn submit(s: &Server, t: serde_json::Value) {
    let auth = format!("Bearer {TOKEN}");
    let (code, r) = common::post_raw(
        &s.url("/task_in_queue"),
        t.to_string().as_bytes(),
        &[("Authorization", auth.as_str())],
    );
    assert_eq!(code, 200, "{r}");
}

fn at(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no {series} in {m:?}"))
}

#[test]
fn metrics_count_tasks_attempts_and_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--token", TOKEN]).start();
    let auth = format!("Bearer {TOKEN}");
    let ok = [("Authorization", auth.as_str())];
    submit(
        &s,
        json!({"id":"m-ok","method":"GET","name":sink.url("/fine")}),
    );
    submit(
        &s,
        json!({"id":"m-dead","method":"GET","name":sink.url("/status/500"),"max_retry":0}),
    );
    submit(
        &s,
        json!({"id":"m-late","method":"GET","name":sink.url("/never"),"delay":300}),
    );
    let (code, r) = request("DELETE", &s.url("/task/m-late"), &ok);
    assert_eq!(code, 200, "{r}");
    for id in ["m-ok", "m-dead"] {
        let (code, r) = request("GET", &s.url(&format!("/task_resp/{id}?timeout=30")), &ok);
        assert_eq!(code, 200, "{id}: {r}");
    }

    // The outcome stage counts a result once it is durable, as it publishes it.
    let m = eventually(Duration::from_secs(10), "the counters", || {
        let (code, kind, body) = scrape(&s);
        assert_eq!(code, 200, "{body}");
        assert_eq!(kind, "text/plain; version=0.0.4; charset=utf-8");
        let m = parse(&body);
        (at(&m, "poulpe_tasks_succeeded_total") >= 1.0 && at(&m, "poulpe_tasks_dead_total") >= 1.0)
            .then_some(m)
    });
    assert_eq!(
        at(
            &m,
            "poulpe_tasks_accepted_total{origin=\"http\",method=\"GET\"}"
        ),
        3.0
    );
    assert_eq!(
        at(
            &m,
            "poulpe_tasks_accepted_total{origin=\"ws\",method=\"GET\"}"
        ),
        0.0
    );
    assert_eq!(at(&m, "poulpe_tasks_succeeded_total"), 1.0);
    assert_eq!(at(&m, "poulpe_tasks_dead_total"), 1.0);
    assert_eq!(at(&m, "poulpe_tasks_cancelled_total"), 1.0);
    assert_eq!(at(&m, "poulpe_task_attempts_failed_total"), 1.0);
    assert_eq!(
        at(&m, "poulpe_task_duration_seconds_count{method=\"GET\"}"),
        2.0
    );
    assert_eq!(
        at(
            &m,
            "poulpe_task_duration_seconds_bucket{method=\"GET\",le=\"+Inf\"}"
        ),
        2.0
    );
    assert_eq!(at(&m, "poulpe_task_lateness_seconds_count"), 2.0);
    assert_eq!(
        at(&m, "poulpe_task_lateness_seconds_bucket{le=\"+Inf\"}"),
        2.0
    );
    assert!(at(&m, "poulpe_http_requests_total{code=\"200\"}") > 0.0);
    assert_eq!(at(&m, "poulpe_store_up"), 1.0);
    assert_eq!(at(&m, "poulpe_results_stored"), 3.0);
    assert!(m.contains_key("poulpe_queue_depth{worker=\"0\"}"), "{m:?}");
    for state in ["delayed", "retry_wait", "queued", "running"] {
        assert_eq!(at(&m, &format!("poulpe_tasks{{state=\"{state}\"}}")), 0.0);
    }
    assert!(m.contains_key("poulpe_uptime_seconds"));
    assert!(!m.contains_key("poulpe_kafka_connected"), "no Kafka here");
    assert_eq!(at(&m, "poulpe_cron_lines"), 0.0);
    assert_eq!(at(&m, "poulpe_cron_firings_total"), 0.0);
    // Every submit and result was a group commit of the embedded store's writer.
    assert!(at(&m, "poulpe_store_commit_seconds_count") > 0.0);
    assert_cumulative(&m, "poulpe_store_commit_seconds");
    // Each attempt's outcome was made durable once: one lag each.
    assert_eq!(
        at(&m, "poulpe_outcome_lag_seconds_count"),
        at(&m, "poulpe_task_lateness_seconds_count")
    );
    assert_cumulative(&m, "poulpe_outcome_lag_seconds");
}

/// The buckets of histogram `name` (no labels) never decrease and end at `_count`.
fn assert_cumulative(m: &HashMap<String, f64>, name: &str) {
    let les = [
        "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
        "0.5", "+Inf",
    ];
    let mut last = 0.0;
    for le in les {
        let n = at(m, &format!("{name}_bucket{{le=\"{le}\"}}"));
        assert!(n >= last, "{name} le={le}: {n} < {last}");
        last = n;
    }
    assert_eq!(last, at(m, &format!("{name}_count")));
}

#[test]
fn metrics_need_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--token", TOKEN]).start();
    let (code, r) = request("GET", &s.url("/metrics"), &[]);
    assert_eq!(code, 401, "{r}");
    let (code, r) = request("GET", &s.url("/metrics"), &[("Authorization", "Bearer no")]);
    assert_eq!(code, 401, "{r}");
    let (code, _, body) = scrape(&s);
    assert_eq!(code, 200, "{body}");
    let m = parse(&body);
    // The two refusals above were counted before this answer was written.
    assert_eq!(at(&m, "poulpe_http_requests_total{code=\"401\"}"), 2.0);
    assert_eq!(at(&m, "poulpe_tasks_succeeded_total"), 0.0);
    assert_eq!(
        at(&m, "poulpe_task_duration_seconds_count{method=\"EXEC\"}"),
        0.0
    );
}

#[test]
fn websocket_tasks_count_under_ws() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--token", TOKEN]).start();
    let mut ws = common::ws::connect(&s, &format!("?token={TOKEN}"), &[]).expect("connect");
    common::ws::send(
        &mut ws,
        &json!({"id":"m-ws","method":"GET","name":sink.url("/ws")}),
    );
    let ack = common::ws::next(&mut ws);
    assert_eq!(ack["result"], "OK", "{ack}");
    let m = eventually(Duration::from_secs(10), "the success", || {
        let m = parse(&scrape(&s).2);
        (at(&m, "poulpe_tasks_succeeded_total") >= 1.0).then_some(m)
    });
    assert_eq!(
        at(
            &m,
            "poulpe_tasks_accepted_total{origin=\"ws\",method=\"GET\"}"
        ),
        1.0
    );
    assert_eq!(
        at(
            &m,
            "poulpe_tasks_accepted_total{origin=\"http\",method=\"GET\"}"
        ),
        0.0
    );
    // The upgrade is an answer too.
    assert_eq!(at(&m, "poulpe_http_requests_total{code=\"101\"}"), 1.0);
}

#[test]
fn redis_store_commits_are_timed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = common::redis::RedisServer::start(&dir.path().join("redis"));
    let sink = Sink::start();
    let url = redis.url();
    let s = Server::builder(dir.path().join("data"))
        .args(&["--token", TOKEN, "--redis", &url])
        .start();
    submit(&s, json!({"id":"m-r","method":"GET","name":sink.url("/r")}));
    // The insert, then the record of the result.
    let m = eventually(Duration::from_secs(10), "the success", || {
        let m = parse(&scrape(&s).2);
        (at(&m, "poulpe_tasks_succeeded_total") >= 1.0).then_some(m)
    });
    assert!(at(&m, "poulpe_store_commit_seconds_count") >= 2.0);
    // The Redis store cannot tell retry waits from delays cheaply: counted under delayed.
    assert!(
        !m.contains_key("poulpe_tasks{state=\"retry_wait\"}"),
        "{m:?}"
    );
    assert_eq!(at(&m, "poulpe_tasks{state=\"delayed\"}"), 0.0);
    assert_cumulative(&m, "poulpe_store_commit_seconds");
}

#[test]
fn cron_lines_and_firings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let cron = dir.path().join("crontab");
    let text = format!("* * * * * * *  {}  GET\n", sink.url("/beat"));
    std::fs::write(&cron, text).expect("crontab");
    let s = Server::builder(dir.path().join("data"))
        .args(&["--token", TOKEN, "--cron", cron.to_str().expect("utf8")])
        .start();
    let m = eventually(Duration::from_secs(10), "a firing", || {
        let m = parse(&scrape(&s).2);
        (at(&m, "poulpe_cron_firings_total") > 0.0).then_some(m)
    });
    assert_eq!(at(&m, "poulpe_cron_lines"), 1.0);
    // Each firing is a task accepted from cron.
    let accepted = at(
        &m,
        "poulpe_tasks_accepted_total{origin=\"cron\",method=\"GET\"}",
    );
    assert!(accepted >= at(&m, "poulpe_cron_firings_total"), "{m:?}");
}

#[test]
fn a_task_waiting_to_retry_is_not_delayed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--token", TOKEN]).start();
    submit(
        &s,
        json!({"id":"m-retry","method":"GET","name":sink.url("/status/500"),"max_retry":1,"retry_interval":60}),
    );
    submit(
        &s,
        json!({"id":"m-later","method":"GET","name":sink.url("/later"),"delay":300}),
    );
    // The failed attempt is counted when it is decided, before its retry wait is stored: wait
    // for the stored state, not for the counter.
    let m = eventually(Duration::from_secs(10), "the retry wait", || {
        let m = parse(&scrape(&s).2);
        (at(&m, "poulpe_tasks{state=\"retry_wait\"}") >= 1.0).then_some(m)
    });
    assert_eq!(at(&m, "poulpe_task_attempts_failed_total"), 1.0);
    assert_eq!(at(&m, "poulpe_tasks{state=\"retry_wait\"}"), 1.0);
    assert_eq!(at(&m, "poulpe_tasks{state=\"delayed\"}"), 1.0);
    assert_eq!(at(&m, "poulpe_tasks{state=\"running\"}"), 0.0);
}
