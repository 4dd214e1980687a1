//! The server with `--redis` against a real redis-server on a free port: the core scenarios
//! (immediate, delayed, retry → dead letter, wait, long poll), `kill -9` recovery, a Redis outage
//! in the middle of a run, an unreachable Redis at start-up, and the key prefix with result TTLs.

mod common;
use common::{
    eventually, free_port, hits::hits_by_id, hits::wait_all_hit, now_us, redis::RedisServer,
    Server, Sink,
};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Starts poulpe on `redis` with a data dir (for dead letters) under `dir`.
fn start(dir: &Path, redis: &RedisServer, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--redis", url.as_str()];
    args.extend_from_slice(extra);
    Server::builder(dir).args(&args).start()
}

fn get_task(sink: &Sink, id: &str) -> Value {
    json!({"id": id, "method": "GET", "name": sink.url("/hit"), "params": format!("id={id}")})
}

#[test]
fn core_scenarios_run_on_redis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(&dir.path().join("redis"));
    let sink = Sink::start();
    let s = start(dir.path(), &redis, &["--retry_interval", "1"]);

    let (_, info) = s.get("/sys_info");
    assert_eq!(info["store"]["kind"], "redis", "{info}");
    assert_eq!(info["store"]["up"], true, "{info}");

    // Immediate, with `wait`: the final result comes back on the submit.
    let mut t = get_task(&sink, "r-now");
    t["wait"] = json!(10);
    let (code, r) = s.submit(&t);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "OK", "{r}");
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["output"], "ok", "{r}");

    // Delayed 2 s: long poll says pending, then final; never early.
    let sent = now_us();
    let mut t = get_task(&sink, "r-later");
    t["delay"] = json!(2);
    let (code, r) = s.submit(&t);
    assert_eq!(code, 200, "{r}");
    // The id of an unfinished task cannot be used again.
    let (code, r) = s.submit(&get_task(&sink, "r-later"));
    assert_eq!(code, 409, "{r}");
    let (code, r) = s.get("/task_resp/r-later?timeout=0");
    assert_eq!(code, 202, "{r}");
    assert_eq!(r["status"], "delayed", "{r}");
    let (code, r) = s.get("/task_resp/r-later?timeout=20");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "OK", "{r}");
    let at = hits_by_id(&sink.hits())["r-later"][0];
    assert!(
        at >= sent + 2_000_000,
        "ran {} ms early",
        (sent + 2_000_000 - at) / 1000
    );
    // Reading does not consume; unknown ids are 404.
    assert_eq!(s.get("/task_resp/r-later?timeout=0").0, 200);
    assert_eq!(s.get("/task_resp/no-such-task?timeout=0").0, 404);

    // Retry then dead letter: exactly max_retry + 1 attempts, each error kept.
    let t = json!({"id": "r-dead", "method": "GET", "name": sink.url("/status/503"),
                   "max_retry": 2, "retry_interval": 1});
    assert_eq!(s.submit(&t).0, 200);
    let (code, r) = s.get("/task_resp/r-dead?timeout=30");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "Fail", "{r}");
    assert_eq!(r["status"], "dead", "{r}");
    assert_eq!(r["attempts"], 3, "{r}");
    assert_eq!(sink.hits_on("/status/503").len(), 3);
    let dead_dir = dir.path().join("data/dead");
    let file = eventually(Duration::from_secs(5), "the dead-letter file", || {
        std::fs::read_dir(&dead_dir)
            .ok()?
            .filter_map(|d| d.ok())
            .map(|d| d.path().join("task-r-dead.json"))
            .find(|p| p.exists())
    });
    let record: Value =
        serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("dead letter JSON");
    let attempts = record["task"]["attempts"]
        .as_array()
        .expect("task.attempts array");
    assert_eq!(attempts.len(), 3, "{record}");
    for a in attempts {
        assert!(
            a["error"].as_str().unwrap_or("").contains("503"),
            "{record}"
        );
    }
}

#[test]
fn a_cancelled_id_submitted_again_runs_at_its_new_due_time_on_redis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(&dir.path().join("redis"));
    let sink = Sink::start();
    let s = start(dir.path(), &redis, &[]);
    common::hits::a_reused_id_waits_for_its_own_due_time(&s, &sink);
}

#[test]
fn kill_9_loses_no_acknowledged_task() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(&dir.path().join("redis"));
    let sink = Sink::start();
    let mut s = start(dir.path(), &redis, &["--workers", "2"]);

    let mut acked: Vec<(String, u64, u64)> = Vec::new(); // (id, delay s, sent µs)
    for i in 0..200 {
        let id = format!("c-{i}");
        let delay = if i % 5 == 0 { 2 } else { 0 };
        let t = json!({"id": id, "method": "GET", "name": sink.url("/slow"),
                       "params": format!("ms=20&id={id}"), "delay": delay});
        let sent = now_us();
        let (code, r) = s.submit(&t);
        assert_eq!(code, 200, "{r}");
        acked.push((id, delay, sent));
    }
    sink.wait_until(Duration::from_secs(30), "some tasks run", |h| h.len() >= 20);
    s.kill9();
    let ran_before = hits_by_id(&sink.hits()).len();
    assert!(
        ran_before < acked.len(),
        "everything ran before the kill; the test proves nothing"
    );

    let _s2 = start(dir.path(), &redis, &["--workers", "2"]);
    let want: HashSet<String> = acked.iter().map(|a| a.0.clone()).collect();
    wait_all_hit(
        &sink,
        &want,
        Duration::from_secs(60),
        "after kill -9 and restart on Redis",
    );
    let seen = hits_by_id(&sink.hits());
    for (id, delay, sent) in acked.iter().filter(|a| a.1 > 0) {
        for &at in &seen[id] {
            assert!(at >= sent + delay * 1_000_000, "{id} ran early");
        }
    }
}

#[test]
fn a_redis_outage_refuses_submits_then_recovers_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rdir = dir.path().join("redis");
    let port = free_port();
    let aof = [
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
    ];
    let mut redis = RedisServer::start_on(&rdir, port, &aof);
    let sink = Sink::start();
    let s = start(dir.path(), &redis, &["--workers", "2"]);

    // Some tasks that are running when Redis goes away, some waiting.
    let mut want = HashSet::new();
    for i in 0..4 {
        let id = format!("o-run-{i}");
        let t = json!({"id": id, "method": "GET", "name": sink.url("/slow"),
                       "params": format!("ms=1500&id={id}")});
        assert_eq!(s.submit(&t).0, 200);
        want.insert(id);
    }
    for i in 0..5 {
        let id = format!("o-later-{i}");
        let mut t = get_task(&sink, &id);
        t["delay"] = json!(3);
        assert_eq!(s.submit(&t).0, 200);
        want.insert(id);
    }
    sink.wait_until(Duration::from_secs(10), "two slow tasks running", |h| {
        h.iter().filter(|h| h.path == "/slow").count() >= 2
    });
    redis.stop();

    // Submits are refused with a reason, nothing accepted; /sys_info says the store is down.
    let (code, r) = eventually(Duration::from_secs(15), "a 503 during the outage", || {
        let r = s.submit(&get_task(&sink, "o-refused"));
        (r.0 == 503).then_some(r)
    });
    assert_eq!(code, 503);
    assert_eq!(r["result"], "Fail", "{r}");
    assert!(
        !r["reason"].as_str().unwrap_or("").is_empty(),
        "a 503 says why: {r}"
    );
    eventually(Duration::from_secs(15), "store down in /sys_info", || {
        let (_, info) = s.get("/sys_info");
        (info["store"]["up"] == false).then_some(())
    });
    assert_eq!(s.get("/health").0, 200, "the HTTP side keeps serving");

    // Redis comes back on the same port with its data: the server reconnects by itself.
    let redis2 = RedisServer::start_on(&rdir, port, &aof);
    eventually(Duration::from_secs(30), "submits accepted again", || {
        let (code, _) = s.submit(&get_task(&sink, "o-back"));
        (code == 200).then_some(())
    });
    want.insert("o-back".into());
    eventually(Duration::from_secs(15), "store up in /sys_info", || {
        let (_, info) = s.get("/sys_info");
        (info["store"]["up"] == true).then_some(())
    });
    wait_all_hit(&sink, &want, Duration::from_secs(60), "after the outage");
    assert!(
        !hits_by_id(&sink.hits()).contains_key("o-refused"),
        "a task refused with 503 must not run"
    );
    // Outcomes of attempts that finished during the outage were written once Redis came back.
    for id in &want {
        let (code, r) = s.get(&format!("/task_resp/{id}?timeout=30"));
        assert_eq!(code, 200, "{id}: {r}");
        assert_eq!(r["status"], "succeeded", "{id}: {r}");
    }
    drop(redis2);
}

#[test]
fn unreachable_redis_at_start_exits_2_without_leaking_the_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("redis://:s3cret-pw@127.0.0.1:{port}/0");
    let started = Instant::now();
    let out = Command::new(common::binary())
        .args(["--port", &free_port().to_string(), "--bind", "127.0.0.1"])
        .args(["--redis", &url])
        .arg("--data")
        .arg(dir.path().join("data"))
        .output()
        .expect("run poulpe");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Start-up waits 5 s for an unreachable Redis (README); 10 s allows a slow machine.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up only after {:?}",
        started.elapsed()
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("s3cret-pw"),
        "the password leaked into the output: {text}"
    );
    let last = text.lines().last().unwrap_or("");
    assert!(
        last.contains("--redis") && last.contains(&port.to_string()),
        "the error line names the flag and the address: {text}"
    );
}

#[test]
fn keys_live_under_the_prefix_and_results_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(&dir.path().join("redis"));
    let sink = Sink::start();
    let s = start(
        dir.path(),
        &redis,
        &["--redis_prefix", "test9:", "--result_ttl", "600"],
    );
    let mut t = get_task(&sink, "p-1");
    t["wait"] = json!(10);
    assert_eq!(s.submit(&t).0, 200);
    let mut t = get_task(&sink, "p-2");
    t["delay"] = json!(3600);
    assert_eq!(s.submit(&t).0, 200);

    let keys = redis.cli(&["--scan"]);
    let keys: Vec<&str> = keys.lines().collect();
    assert!(!keys.is_empty());
    for k in &keys {
        assert!(
            k.starts_with("test9:"),
            "key {k:?} outside the prefix: {keys:?}"
        );
    }
    // The finished task's result carries a TTL of at most --result_ttl.
    let with_ttl: Vec<i64> = keys
        .iter()
        .filter(|k| k.contains("p-1"))
        .filter_map(|k| redis.cli(&["PTTL", k]).trim().parse().ok())
        .filter(|&ms: &i64| ms > 0)
        .collect();
    assert!(
        !with_ttl.is_empty() && with_ttl.iter().all(|&ms| (540_000..=600_000).contains(&ms)),
        "the finished task's result must expire --result_ttl (600 s) after it finished (it \
         finished moments ago): {keys:?} {with_ttl:?}"
    );
    // The waiting task is kept without expiry.
    let p2: Vec<&&str> = keys.iter().filter(|k| k.contains("p-2")).collect();
    assert!(!p2.is_empty(), "{keys:?}");
    for k in p2 {
        assert_eq!(redis.cli(&["PTTL", k]).trim(), "-1", "{k}");
    }
}

#[test]
fn results_beyond_result_max_are_dropped_oldest_first_on_redis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(&dir.path().join("redis"));
    let sink = Sink::start();
    let s = start(dir.path(), &redis, &["--result_max", "1000"]);
    common::results::check_result_max(&s, &sink);
    let (_, info) = s.get("/sys_info");
    assert_eq!(
        info["data_bytes"],
        Value::Null,
        "no local file with Redis: {info}"
    );
}

#[test]
fn a_result_is_readable_until_result_ttl_then_404_on_redis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(&dir.path().join("redis"));
    let sink = Sink::start();
    let s = start(dir.path(), &redis, &["--result_ttl", "3"]);
    let mut t = get_task(&sink, "ttl-r");
    t["wait"] = json!(10);
    common::results::check_result_expires(&s, &t, 3);
}
