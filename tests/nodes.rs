//! Several poulpe nodes on one Redis prefix (real binaries, a real redis-server with
//! `appendonly yes`): the node flags, the registry each node's `/sys_info` shows, a second live
//! node with the same id refused, and a node killed with `kill -9` whose delayed and running
//! tasks the others adopt (never early; the running one again), without a restart of it
//! stealing a live node's tasks, also with thousands of tasks in flight; long polls and
//! cancels answered on another node than the one that holds the task; two nodes with 10,000
//! tasks due at the same second run each once; tasks sharing a `cc` worker never run at once
//! anywhere in the cluster, and a killed node's slot is free once its lease has ended. Node ids and ttls are given as `POULPE_NODE_ID` and
//! `POULPE_NODE_TTL`, so that a binary without nodes (`POULPE_TEST_BIN`) starts and fails on
//! what it does not do.

mod common;
use common::{
    binary, eventually, free_port, hits::hits_by_id, output_within, redis::RedisServer, Server,
    Sink,
};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A persistent redis-server of the test's own.
fn redis(dir: &Path) -> RedisServer {
    RedisServer::start_on(&dir.join("redis"), free_port(), &["--appendonly", "yes"])
}

/// Node `id` (ttl 3 s, two workers) on `redis`, its data under `dir/<id>`.
fn node(dir: &Path, redis: &RedisServer, id: &str) -> Server {
    node_with(dir, redis, id, "3", &["--workers", "2"])
}

/// Node `id` with ttl `ttl` seconds and the other flags `args` on `redis`, its data under
/// `dir/<id>`.
fn node_with(dir: &Path, redis: &RedisServer, id: &str, ttl: &str, args: &[&str]) -> Server {
    Server::builder(dir.join(id))
        .args(&["--redis", &redis.url()])
        .args(args)
        .env("POULPE_NODE_ID", id)
        .env("POULPE_NODE_TTL", ttl)
        .start()
}

/// The ids `/sys_info` lists under `nodes`, and its `node`.
fn nodes_of(s: &Server) -> (Vec<String>, String) {
    let (code, info) = s.get("/sys_info");
    assert_eq!(code, 200, "{info}");
    let ids = info["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    (ids, info["node"].as_str().unwrap_or_default().to_string())
}

/// Runs the binary with `args` and `env` until it exits (at most 60 s): exit code and stderr.
fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let child = Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn poulpe");
    let (out, _) = output_within(child, Duration::from_secs(60));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn node_flags_need_redis_and_valid_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("UTF-8 path");
    let port = free_port().to_string();
    let base = ["--port", &port, "--bind", "127.0.0.1", "--data", data];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let cases: [(&[&str], &str); 6] = [
        (
            &["--node_id", "web-1"],
            "poulpe: --node_id needs --redis: the embedded store serves one node",
        ),
        (
            &["--node_ttl", "10"],
            "poulpe: --node_ttl needs --redis: the embedded store serves one node",
        ),
        (
            &["--redis", "redis://127.0.0.1:1/0", "--node_id", "a:b"],
            "poulpe: --node_id: bad value \"a:b\": a node id is 1 to 64 characters among ASCII \
             letters, digits, '.', '_' and '-'",
        ),
        (
            &[
                "--redis",
                "redis://127.0.0.1:1/0",
                "--node_id",
                &"x".repeat(65),
            ],
            "a node id is 1 to 64 characters",
        ),
        (
            &["--redis", "redis://127.0.0.1:1/0", "--node_ttl", "2"],
            "poulpe: --node_ttl: bad value \"2\": must be at least 3",
        ),
        (
            &["--redis", "redis://127.0.0.1:1/0", "--node_ttl", "3601"],
            "poulpe: --node_ttl: bad value \"3601\": must be between 0 and 3600",
        ),
    ];
    for (extra, want) in cases {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = run(&args, &[]);
        assert_eq!(code, Some(2), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    // From the environment too, named by its variable's flag.
    let (code, err) = run(
        &with(&[]).iter().map(String::as_str).collect::<Vec<_>>(),
        &[("POULPE_NODE_ID", "web-1")],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--node_id needs --redis"), "{err}");
}

/// With the embedded store, `/sys_info` has the same shape: this node alone, its id
/// `<hostname>-<port>`, which its results carry too.
#[test]
fn the_embedded_store_is_one_node_named_after_host_and_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(dir.path()).start();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    let want = format!("{}-{}", host.trim(), s.port);
    assert_eq!(nodes_of(&s), (vec![want.clone()], want.clone()));
    let (code, r) = s.submit(&json!({"method": "GET", "name": sink.url("/x"), "wait": 10}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["node"], json!(want), "{r}");
}

/// Three nodes on one prefix: each lists the three, sorted, and names itself; a task's result
/// names the node that ran it.
#[test]
fn three_nodes_list_each_other_and_results_name_their_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let sink = Sink::start();
    let nodes: Vec<Server> = ["n3", "n1", "n2"]
        .iter()
        .map(|id| node(dir.path(), &redis, id))
        .collect();
    for (s, id) in nodes.iter().zip(["n3", "n1", "n2"]) {
        let seen = eventually(Duration::from_secs(15), "three nodes listed", || {
            let got = nodes_of(s);
            (got.0.len() == 3).then_some(got)
        });
        assert_eq!(
            seen,
            (vec!["n1".into(), "n2".into(), "n3".into()], id.into())
        );
        let (_, info) = s.get("/sys_info");
        let me = info["nodes"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["id"] == json!(id)))
            .cloned()
            .unwrap_or(Value::Null);
        assert_eq!(me["workers"], json!(2), "{info}");
        assert!(
            me["last_seen"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{info}"
        );
        let task = json!({"method": "GET", "name": sink.url("/x"), "wait": 10});
        let (code, r) = s.submit(&task);
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["node"], json!(id), "{r}");
        let (_, again) = s.get(&format!("/task_resp/{}", r["id"].as_str().unwrap_or("")));
        assert_eq!(again["node"], json!(id), "stored with the result: {again}");
    }
}

/// A second process with the id of a live node stops at start, naming the id, and the first
/// goes on; once the first has stopped, the id is free at once.
#[test]
fn a_second_live_node_with_the_same_id_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let mut first = node(dir.path(), &redis, "same");
    let data = dir.path().join("second");
    let port = free_port().to_string();
    let url = redis.url();
    let args = [
        "--port",
        &port,
        "--bind",
        "127.0.0.1",
        "--data",
        data.to_str().expect("UTF-8 path"),
        "--redis",
        &url,
    ];
    let env = [("POULPE_NODE_ID", "same"), ("POULPE_NODE_TTL", "3")];
    let (code, err) = run(&args, &env);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--node_id: node \"same\" is live on this Redis prefix"),
        "{err}"
    );
    assert_eq!(nodes_of(&first).1, "same", "the first node still serves");
    assert!(first.term().success());
    let second = Server::builder(&data)
        .args(&["--redis", &url])
        .env("POULPE_NODE_ID", "same")
        .env("POULPE_NODE_TTL", "3")
        .start();
    assert_eq!(nodes_of(&second), (vec!["same".into()], "same".into()));
}

/// The sink hits of `id`, as unix µs.
fn hits_of(sink: &Sink, id: &str) -> Vec<u64> {
    hits_by_id(&sink.hits()).remove(id).unwrap_or_default()
}

/// Node a holds a running slow task and delayed ones when it is killed: node b adopts them once
/// a's heartbeat has expired. The delayed ones run once each, never early; the running one runs
/// again (at least once); a leaves b's list. Restarting a with its id then takes nothing of
/// b's: neither b's delayed task nor the adopted one b runs.
#[test]
fn a_killed_nodes_tasks_are_adopted_by_a_live_node_and_a_restart_steals_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let sink = Sink::start();
    let mut a = node(dir.path(), &redis, "a");
    let b = node(dir.path(), &redis, "b");
    let slow = json!({"id": "run-1", "method": "GET", "timeout": 60,
        "name": sink.url("/slow"), "params": "ms=6000&id=run-1"});
    assert_eq!(a.submit(&slow).0, 200);
    sink.wait_until(Duration::from_secs(10), "run-1 running on a", |h| {
        hits_by_id(h).contains_key("run-1")
    });
    let before_us = common::now_us();
    let delayed: Vec<Value> = (0..5)
        .map(|i| {
            json!({"id": format!("d-{i}"), "method": "GET", "delay": 8,
            "name": sink.url("/hit"), "params": format!("id=d-{i}")})
        })
        .collect();
    assert_eq!(a.submit(&json!(delayed)).0, 200);
    a.kill9();

    for i in 0..5 {
        let id = format!("d-{i}");
        let at = eventually(
            Duration::from_secs(30),
            "a delayed task of the dead node",
            || hits_of(&sink, &id).first().copied(),
        );
        assert!(at >= before_us + 8_000_000, "{id} ran before its due time");
        let (code, r) = b.get(&format!("/task_resp/{id}?timeout=10"));
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["node"], json!("b"), "{r}");
    }
    let runs = eventually(Duration::from_secs(30), "run-1 run again", || {
        let h = hits_of(&sink, "run-1");
        (h.len() >= 2).then_some(h.len())
    });
    assert_eq!(runs, 2, "run-1 runs again once");
    let listed = eventually(Duration::from_secs(10), "a gone from b's list", || {
        let (ids, _) = nodes_of(&b);
        (ids == ["b"]).then_some(ids)
    });
    assert_eq!(listed, ["b"]);
    assert!(b
        .log_text()
        .contains("adopted 6 tasks of dead node a (1 were running"));

    // b's own delayed task, and run-1 (adopted, running on b): a restarted a takes neither.
    let late = json!({"id": "b-late", "method": "GET", "delay": 4,
        "name": sink.url("/hit"), "params": "id=b-late"});
    assert_eq!(b.submit(&late).0, 200);
    let a = node(dir.path(), &redis, "a");
    let (ids, me) = nodes_of(&a);
    assert_eq!(
        (ids, me.as_str()),
        (vec!["a".to_string(), "b".to_string()], "a")
    );
    let (code, r) = b.get("/task_resp/b-late?timeout=20");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["node"], json!("b"), "{r}");
    let (code, r) = b.get("/task_resp/run-1?timeout=20");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["node"], json!("b"), "{r}");
    assert_eq!(
        hits_of(&sink, "run-1").len(),
        2,
        "run-1 not taken by the restart"
    );
    assert_eq!(hits_of(&sink, "b-late").len(), 1);
    assert!(!a.log_text().contains("recovered"), "{}", a.log_text());
}

/// A node stopped cleanly (SIGTERM) marks itself stopped once its attempts are done (it says
/// so), so that another node adopts its delayed task without waiting for its ttl, and runs it
/// at its due time; the stopped node leaves the list.
#[test]
fn a_cleanly_stopped_nodes_delayed_task_runs_on_another_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let sink = Sink::start();
    let mut a = node(dir.path(), &redis, "a");
    let b = node(dir.path(), &redis, "b");
    let before_us = common::now_us();
    let t = json!({"id": "later", "method": "GET", "delay": 3,
        "name": sink.url("/hit"), "params": "id=later"});
    assert_eq!(a.submit(&t).0, 200);
    assert!(a.term().success());
    let at = eventually(Duration::from_secs(30), "the stopped node's task", || {
        hits_of(&sink, "later").first().copied()
    });
    assert!(at >= before_us + 3_000_000, "ran before its due time");
    let (code, r) = b.get("/task_resp/later?timeout=10");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["node"], json!("b"), "{r}");
    assert_eq!(nodes_of(&b).0, ["b"]);
    assert!(b.log_text().contains("adopted 1 tasks of dead node a"));
    assert!(
        a.log_text().contains("node a: left the registry"),
        "{}",
        a.log_text()
    );
}

/// A node killed with `kill -9` and started again on this machine with its id takes its entry
/// over at once, although the old heartbeat has not expired (its ttl here is 10 minutes): the
/// old process is known to be gone. Its delayed task then runs.
#[test]
fn a_node_restarted_on_this_machine_after_kill_9_takes_over_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let sink = Sink::start();
    let solo = |dir: &Path| node_with(dir, &redis, "solo", "600", &[]);
    let mut first = solo(dir.path());
    let task = json!({"id": "later", "method": "GET", "delay": 2,
        "name": sink.url("/hit"), "params": "id=later"});
    assert_eq!(first.submit(&task).0, 200);
    first.kill9();
    // `start` gives a server 15 s to answer /health: far less than the old entry's 600 s.
    let again = solo(dir.path());
    assert_eq!(nodes_of(&again), (vec!["solo".into()], "solo".into()));
    eventually(
        Duration::from_secs(15),
        "the restarted node's delayed task",
        || hits_of(&sink, "later").first().copied(),
    );
    assert!(
        again.log_text().contains("taking over the entry"),
        "{}",
        again.log_text()
    );
}

/// Three nodes load the same cron file, a line firing every second: each firing runs once in
/// the whole cluster (its `cron-<key>-<time>` id is refused by the others, also once its task
/// has finished), and the firings run on the nodes that fired first.
#[test]
fn a_cron_line_loaded_by_three_nodes_fires_once_per_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let sink = Sink::start();
    let cron = dir.path().join("crontab");
    std::fs::write(
        &cron,
        format!("* * * * * * *  {}  GET  src=c\n", sink.url("/beat")),
    )
    .expect("cron file");
    let cron = cron.to_str().expect("UTF-8 path").to_string();
    let nodes: Vec<Server> = ["c1", "c2", "c3"]
        .iter()
        .map(|id| node_with(dir.path(), &redis, id, "3", &["--cron", &cron]))
        .collect();
    sink.wait_until(Duration::from_secs(15), "6 firings", |h| {
        h.iter().filter(|h| h.path == "/beat").count() >= 6
    });
    // Time for a second run of any of them to arrive.
    std::thread::sleep(Duration::from_millis(1500));
    let seconds: Vec<u64> = sink
        .hits_on("/beat")
        .iter()
        .map(|h| h.at_us / 1_000_000)
        .collect();
    let mut distinct = seconds.clone();
    distinct.dedup();
    assert_eq!(distinct, seconds, "one run per second in the cluster");
    let (_, info) = nodes[0].get("/sys_info");
    let id = info["cron"][0]["last_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (code, r) = nodes[1].get(&format!("/task_resp/{id}?timeout=5"));
    assert_eq!(code, 200, "{r}");
    assert!(
        ["c1", "c2", "c3"].contains(&r["node"].as_str().unwrap_or_default()),
        "{r}"
    );
}

/// A long poll on node a for a task that node c runs is answered once c has recorded its
/// result, not at the poll's timeout: every node hears the results the others record.
#[test]
fn a_long_poll_on_one_node_is_answered_for_a_task_another_node_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let sink = Sink::start();
    let a = node(dir.path(), &redis, "a");
    let c = node(dir.path(), &redis, "c");
    let t = json!({"id": "far", "method": "GET", "name": sink.url("/slow"),
        "params": "ms=1000&id=far"});
    assert_eq!(c.submit(&t).0, 200);
    let (code, r) = a.get("/task_resp/far?timeout=30");
    assert_eq!(
        code, 200,
        "answered with the result, not at the timeout: {r}"
    );
    assert_eq!(r["status"], json!("succeeded"), "{r}");
    assert_eq!(r["node"], json!("c"), "{r}");
    assert_eq!(hits_of(&sink, "far").len(), 1);
}

/// DELETE on any node: node a cancels a delayed task and a queued one that node b owns (b's
/// one worker is busy, and so is a's, which therefore takes nothing of b's); b never runs
/// them, and b's client long-polling the delayed one is answered with its `cancelled` result
/// when a cancels it. A task running on b is refused by a with 409, as by b itself.
#[test]
fn a_task_another_node_owns_is_cancelled_from_any_node_and_never_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let sink = Sink::start();
    let a = node_with(dir.path(), &redis, "a", "3", &["--workers", "1"]);
    let b = node_with(dir.path(), &redis, "b", "3", &["--workers", "1"]);
    let busy_a = json!({"id": "busy-a", "method": "GET", "name": sink.url("/slow"),
        "params": "ms=4000&id=busy-a"});
    assert_eq!(a.submit(&busy_a).0, 200);
    sink.wait_until(Duration::from_secs(10), "busy-a running on a", |h| {
        hits_by_id(h).contains_key("busy-a")
    });
    let before_us = common::now_us();
    let tasks = json!([
        {"id": "busy", "method": "GET", "name": sink.url("/slow"), "params": "ms=3000&id=busy"},
        {"id": "queued", "method": "GET", "name": sink.url("/hit"), "params": "id=queued"},
        {"id": "later", "method": "GET", "name": sink.url("/hit"), "params": "id=later",
         "delay": 3},
    ]);
    assert_eq!(b.submit(&tasks).0, 200);
    sink.wait_until(Duration::from_secs(10), "busy running on b", |h| {
        hits_by_id(h).contains_key("busy")
    });
    let poll = {
        let url = b.url("/task_resp/later?timeout=30");
        std::thread::spawn(move || common::get(&url))
    };
    // Time for b's long poll to be parked before the cancel (were it later, it would find the
    // result stored and answer the same).
    std::thread::sleep(Duration::from_millis(500));
    for id in ["later", "queued"] {
        let (code, r) = common::request("DELETE", &a.url(&format!("/task/{id}")), &[]);
        assert_eq!(code, 200, "{id}: {r}");
    }
    let (code, r) = common::request("DELETE", &a.url("/task/busy"), &[]);
    assert_eq!(code, 409, "running on b: {r}");
    let (code, r) = poll.join().expect("poll");
    assert_eq!(code, 200, "b's long poll answered by a's cancel: {r}");
    assert_eq!(r["status"], json!("cancelled"), "{r}");
    assert_eq!(r["node"], json!("a"), "{r}");
    // busy has finished and later's due time has passed: neither cancelled task ran on b.
    let (code, r) = b.get("/task_resp/busy?timeout=30");
    assert_eq!((code, &r["status"]), (200, &json!("succeeded")), "{r}");
    while common::now_us() < before_us + 4_000_000 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, r) = b.get("/task_resp/queued");
    assert_eq!((code, &r["status"]), (200, &json!("cancelled")), "{r}");
    let seen = hits_by_id(&sink.hits());
    assert!(
        !seen.contains_key("queued") && !seen.contains_key("later"),
        "a cancelled task ran: {:?}",
        seen.keys().collect::<Vec<_>>()
    );
}

/// `n` GETs of the sink's `path` with ids `<prefix><i>` (and `extra` in their params), as
/// submitted with `delay`.
fn gets(sink: &Sink, prefix: &str, n: usize, path: &str, extra: &str, delay: u64) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i}");
            json!({"id": id, "method": "GET", "name": sink.url(path),
                "params": format!("{extra}id={id}"), "delay": delay})
        })
        .collect()
}

/// Three nodes with thousands of tasks in flight, submitted to all three (immediate ones and
/// delayed ones), and one of them killed with `kill -9`: every acknowledged task runs; the only
/// tasks that run twice are those that were running on the killed node; no delayed task starts
/// before its due time (the killed node's ones are adopted before it); the killed node leaves
/// the list after its ttl; started again with its id, it takes nothing of the live nodes'.
#[test]
fn a_node_killed_with_thousands_of_tasks_in_flight_loses_none_and_reruns_only_its_running_ones() {
    const WORKERS: usize = 4;
    const DELAY_S: u64 = 8;
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let sink = Sink::start();
    let ids = ["k1", "k2", "k3"];
    let mut nodes: Vec<Server> = ids
        .iter()
        .map(|id| node_with(dir.path(), &redis, id, "3", &["--workers", "4"]))
        .collect();
    let mut acked: HashSet<String> = HashSet::new();
    // Delayed ids, each with the earliest time it may start.
    let mut due: Vec<(String, u64)> = Vec::new();
    for (s, id) in nodes.iter().zip(ids) {
        acked.extend(s.submit_all(&gets(&sink, &format!("{id}-now-"), 500, "/hit", "", 0)));
        let before_us = common::now_us();
        let delayed = s.submit_all(&gets(
            &sink,
            &format!("{id}-later-"),
            300,
            "/hit",
            "",
            DELAY_S,
        ));
        due.extend(
            delayed
                .iter()
                .map(|d| (d.clone(), before_us + DELAY_S * 1_000_000)),
        );
        acked.extend(delayed);
    }
    // k2's immediate tasks are finished and recorded (its delayed ones are not due yet), so
    // that what k2 runs when it is killed is known: four slow tasks, one per worker, with 200
    // quick ones queued behind them. k1 and k3 get more work meanwhile.
    eventually(
        Duration::from_secs(30),
        "k2's immediate tasks recorded",
        || {
            let (_, info) = nodes[1].get("/sys_info");
            (info["counts"]["succeeded"].as_u64() >= Some(500)).then_some(())
        },
    );
    let mut k2 = gets(&sink, "k2-slow-", WORKERS, "/slow", "ms=3000&", 0);
    k2.extend(gets(&sink, "k2-queued-", 200, "/hit", "", 0));
    acked.extend(nodes[1].submit_all(&k2));
    for i in [0, 2] {
        let more = gets(&sink, &format!("{}-more-", ids[i]), 300, "/hit", "", 0);
        acked.extend(nodes[i].submit_all(&more));
    }
    let slow: HashSet<String> = (0..WORKERS).map(|i| format!("k2-slow-{i}")).collect();
    sink.wait_until(Duration::from_secs(10), "k2's slow tasks running", |h| {
        let seen = hits_by_id(h);
        slow.iter().all(|id| seen.contains_key(id))
    });
    nodes[1].kill9();

    common::hits::wait_all_hit(&sink, &acked, Duration::from_secs(40), "after kill -9");
    // How duplicates are counted: a task ran twice when the sink saw its id twice. When k2 died
    // its four workers were each in a slow task (3 s; it was killed once all four had reached
    // the sink) and every other task of k2's had either finished and been recorded (waited
    // for above) or was queued or delayed (never started): so the tasks running on k2 are
    // exactly the slow ones, at most one per worker, and each must run again on an adopter.
    eventually(
        Duration::from_secs(30),
        "k2's running tasks run again",
        || {
            let seen = hits_by_id(&sink.hits());
            slow.iter()
                .all(|id| seen.get(id).is_some_and(|h| h.len() >= 2))
                .then_some(())
        },
    );
    let seen = hits_by_id(&sink.hits());
    let mut twice: Vec<&String> = seen
        .iter()
        .filter(|(_, h)| h.len() > 1)
        .map(|(id, _)| id)
        .collect();
    twice.sort();
    assert!(
        twice.iter().all(|id| slow.contains(*id)) && twice.len() <= WORKERS,
        "ran more than once: {twice:?} (only k2's {WORKERS} running tasks may)"
    );
    for (id, at) in &due {
        let first = seen
            .get(id)
            .and_then(|h| h.iter().min())
            .copied()
            .unwrap_or(0);
        assert!(
            first >= *at,
            "{id} started {} µs before its due time",
            at - first
        );
    }
    eventually(Duration::from_secs(15), "k2 gone from the list", || {
        (nodes_of(&nodes[0]).0 == ["k1", "k3"]).then_some(())
    });

    // A delayed task of k1's and a task running on k3: k2 started again recovers neither.
    let late = json!({"id": "k1-late", "method": "GET", "delay": 3,
        "name": sink.url("/hit"), "params": "id=k1-late"});
    assert_eq!(nodes[0].submit(&late).0, 200);
    let run = json!({"id": "k3-run", "method": "GET", "name": sink.url("/slow"),
        "params": "ms=3000&id=k3-run"});
    assert_eq!(nodes[2].submit(&run).0, 200);
    sink.wait_until(Duration::from_secs(10), "k3-run running", |h| {
        hits_by_id(h).contains_key("k3-run")
    });
    let again = node_with(dir.path(), &redis, "k2", "3", &["--workers", "4"]);
    // Either may run on another live node that took it once ready (shared work; on a loaded
    // machine its own node may not claim it within the 100 ms it is left to it): what matters
    // is that each runs once, and that k2's start recovered and adopted nothing (below).
    for (s, id) in [(&nodes[0], "k1-late"), (&nodes[2], "k3-run")] {
        let (code, r) = s.get(&format!("/task_resp/{id}?timeout=20"));
        assert_eq!((code, &r["status"]), (200, &json!("succeeded")), "{r}");
        assert_eq!(hits_of(&sink, id).len(), 1, "{id} ran once");
    }
    let log = again.log_text();
    assert!(
        !log.contains("recovered") && !log.contains("adopted"),
        "{log}"
    );
}

/// Ids cancelled from node a and used again at once on a: node b's stale entries of the
/// cancelled tasks (one queued behind b's busy worker, one in b's timer) take neither the new
/// tasks nor run the old ones; each new task runs once (on a, or on b that took it from a's
/// queue, as any ready task may be), the delayed one not before its new due time.
#[test]
fn an_id_cancelled_and_used_again_on_another_node_runs_only_the_new_task_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let sink = Sink::start();
    let one = ["--workers", "1"];
    let a = node_with(dir.path(), &redis, "a", "3", &one);
    let b = node_with(dir.path(), &redis, "b", "3", &one);
    let get = |id: &str, v: &str, delay: u64, path: &str| {
        json!({"id": id, "method": "GET", "name": sink.url(path), "delay": delay,
            "params": format!("ms=1500&id={id}&v={v}")})
    };
    // b's worker frees first, while a's is still busy: b's queue then holds the stale q.
    let on_b = json!([
        get("busy-b", "", 0, "/slow"),
        get("q", "old", 0, "/hit"),
        get("d", "old", 2, "/hit")
    ]);
    assert_eq!(b.submit(&on_b).0, 200);
    let mut busy_a = get("busy-a", "", 0, "/slow");
    busy_a["params"] = json!("ms=4000&id=busy-a");
    assert_eq!(a.submit(&busy_a).0, 200);
    sink.wait_until(Duration::from_secs(10), "both workers busy", |h| {
        let seen = hits_by_id(h);
        seen.contains_key("busy-a") && seen.contains_key("busy-b")
    });
    for id in ["q", "d"] {
        let (code, r) = common::request("DELETE", &a.url(&format!("/task/{id}")), &[]);
        assert_eq!(code, 200, "{id}: {r}");
    }
    let before_us = common::now_us();
    let again = json!([get("q", "new", 0, "/hit"), get("d", "new", 5, "/hit")]);
    assert_eq!(a.submit(&again).0, 200);
    for id in ["q", "d"] {
        let (code, r) = a.get(&format!("/task_resp/{id}?timeout=30"));
        assert_eq!(
            (code, &r["status"]),
            (200, &json!("succeeded")),
            "{id}: {r}"
        );
    }
    let hits = sink.hits();
    for id in ["q", "d"] {
        let runs: Vec<&common::Hit> = hits
            .iter()
            .filter(|h| common::hits::hit_id(h) == Some(id))
            .collect();
        assert_eq!(runs.len(), 1, "{id} ran once: {runs:?}");
        assert!(runs[0].query.ends_with("v=new"), "{id}: {runs:?}");
    }
    let d = hits_of(&sink, "d");
    assert!(
        d[0] >= before_us + 5_000_000,
        "d ran before its new due time"
    );
}

/// Redis goes away and comes back (with its data) while node a long-polls a task node c runs:
/// a's subscription to the other nodes' results breaks and is made again, and the poll is
/// answered with the result c records once Redis is back (heard, or found by the look-up a
/// makes after subscribing again). a says once that it cannot hear the others, and once that it
/// hears them again.
#[test]
fn a_long_poll_on_another_node_is_answered_across_a_redis_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut redis = redis(dir.path());
    let sink = Sink::start();
    let a = node(dir.path(), &redis, "a");
    let c = node(dir.path(), &redis, "c");
    let t = json!({"id": "across", "method": "GET", "name": sink.url("/slow"),
        "params": "ms=2000&id=across"});
    assert_eq!(c.submit(&t).0, 200);
    sink.wait_until(Duration::from_secs(10), "across running on c", |h| {
        hits_by_id(h).contains_key("across")
    });
    let poll = {
        let url = a.url("/task_resp/across?timeout=60");
        std::thread::spawn(move || common::get(&url))
    };
    let port = redis.port;
    redis.stop();
    std::thread::sleep(Duration::from_millis(1500));
    let _redis = RedisServer::start_on(&dir.path().join("redis"), port, &["--appendonly", "yes"]);
    let (code, r) = poll.join().expect("poll");
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        (&r["status"], &r["node"]),
        (&json!("succeeded"), &json!("c")),
        "{r}"
    );
    let log = eventually(Duration::from_secs(15), "a hears again", || {
        let log = a.log_text();
        log.contains("hearing the other nodes' results again")
            .then_some(log)
    });
    assert_eq!(
        log.matches("cannot hear the other nodes' results").count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("hearing the other nodes' results again")
            .count(),
        1,
        "{log}"
    );
}

/// Two nodes with 10,000 delayed tasks due at the same second, half submitted to each: every
/// task runs exactly once in the cluster, none before its time.
#[test]
fn two_nodes_with_ten_thousand_tasks_due_at_one_second_run_each_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let sink = Sink::start();
    let (a, b) = (
        node_with(dir.path(), &redis, "a", "3", &[]),
        node_with(dir.path(), &redis, "b", "3", &[]),
    );
    let n = 10_000;
    // A whole second, far enough for every submit to be acknowledged before it.
    let at_s = common::now_us() / 1_000_000 + 6;
    let tasks: Vec<Value> = (0..n)
        .map(|i| {
            let id = format!("r-{i}");
            json!({"id": id, "method": "GET", "name": sink.url("/race"),
                   "params": format!("id={id}"), "run_at": at_s})
        })
        .collect();
    for (i, chunk) in tasks.chunks(500).enumerate() {
        let s = if i % 2 == 0 { &a } else { &b };
        let (code, r) = s.submit(&json!(chunk));
        assert_eq!(code, 200, "{r}");
    }
    assert!(
        common::now_us() < at_s * 1_000_000,
        "all submitted before their time (else the test proves less)"
    );
    sink.wait_until(Duration::from_secs(120), "all 10,000 tasks", |h| {
        hits_by_id(h).len() == n
    });
    // A second run of a task would come right after the first ones.
    std::thread::sleep(Duration::from_secs(1));
    let seen = hits_by_id(&sink.hits());
    let twice = seen.values().filter(|at| at.len() > 1).count();
    assert_eq!(twice, 0, "tasks run more than once");
    let early = seen
        .values()
        .flatten()
        .filter(|&&at| at < at_s * 1_000_000)
        .count();
    assert_eq!(early, 0, "tasks run before their time");
}

/// The sink's arrival times of the attempts of each id, all of them having reached it once.
fn arrivals_once(sink: &Sink, ids: &[String]) -> Vec<(String, u64)> {
    let hits = hits_by_id(&sink.hits());
    ids.iter()
        .map(|id| {
            let at = hits.get(id).cloned().unwrap_or_default();
            assert_eq!(at.len(), 1, "{id} ran once: {at:?}");
            (id.clone(), at[0])
        })
        .collect()
}

/// Asserts that no two attempts overlap: each `(id, arrival µs, length µs)` at the sink ends (its
/// answer comes `length` after its arrival, before poulpe's attempt ends) before the next
/// arrives.
fn assert_apart(mut runs: Vec<(String, u64, u64)>) {
    runs.sort_by_key(|r| r.1);
    for w in runs.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert!(
            b.1 >= a.1 + a.2,
            "{} started {} ms after {} had started, before it ended: {runs:?}",
            b.0,
            (b.1 - a.1) / 1000,
            a.0
        );
    }
}

/// Six tasks with `cc: "0"`, two submitted to each of three nodes, run one at a time in the
/// whole cluster (cc worker 0 is one slot of the cluster), each once.
#[test]
fn tasks_sharing_a_cc_worker_never_run_at_once_anywhere_in_the_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let sink = Sink::start();
    let nodes: Vec<Server> = ["c1", "c2", "c3"]
        .iter()
        .map(|id| node(dir.path(), &redis, id))
        .collect();
    let mut ids = Vec::new();
    for (i, s) in nodes.iter().enumerate() {
        let tasks: Vec<Value> = (0..2)
            .map(|j| {
                let id = format!("cc-{i}-{j}");
                ids.push(id.clone());
                json!({"id": id, "method": "GET", "cc": "0", "timeout": 30,
                    "name": sink.url("/slow"), "params": format!("ms=1000&id={id}")})
            })
            .collect();
        assert_eq!(s.submit(&json!(tasks)).0, 200);
    }
    for (i, id) in ids.iter().enumerate() {
        let (code, r) = nodes[i / 2].get(&format!("/task_resp/{id}?timeout=30"));
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["status"], json!("succeeded"), "{r}");
    }
    assert_eq!(sink.max_in_flight(), 1, "two cc 0 tasks ran at once");
    let runs = arrivals_once(&sink, &ids);
    assert_apart(
        runs.into_iter()
            .map(|(id, at)| (id, at, 1_000_000))
            .collect(),
    );
}

/// A node killed with `kill -9` while its task with `cc: "0"` runs keeps the slot until its lease
/// ends: the other nodes' cc 0 tasks wait (none starts before the kill), then all run, once
/// each, one at a time (the killed task, adopted, runs again among them).
#[test]
fn a_killed_nodes_cc_slot_is_free_once_its_lease_has_ended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let sink = Sink::start();
    let mut a = node(dir.path(), &redis, "a");
    let others = [node(dir.path(), &redis, "b"), node(dir.path(), &redis, "c")];
    let long = json!({"id": "long", "method": "GET", "cc": "0", "timeout": 60,
        "name": sink.url("/slow"), "params": "ms=4000&id=long"});
    assert_eq!(a.submit(&long).0, 200);
    sink.wait_until(Duration::from_secs(10), "long running on a", |h| {
        hits_by_id(h).contains_key("long")
    });
    let mut ids = Vec::new();
    for (i, s) in others.iter().enumerate() {
        let tasks: Vec<Value> = (0..2)
            .map(|j| {
                let id = format!("w-{i}-{j}");
                ids.push(id.clone());
                json!({"id": id, "method": "GET", "cc": "0", "timeout": 30,
                    "name": sink.url("/slow"), "params": format!("ms=300&id={id}")})
            })
            .collect();
        assert_eq!(s.submit(&json!(tasks)).0, 200);
    }
    // Time for the others to take slot 0 if they could (they did before cc held across nodes).
    std::thread::sleep(Duration::from_secs(2));
    let killed_us = common::now_us();
    a.kill9();

    for (i, id) in ids.iter().enumerate() {
        let (code, r) = others[i / 2].get(&format!("/task_resp/{id}?timeout=30"));
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["status"], json!("succeeded"), "{r}");
    }
    let (code, r) = others[0].get("/task_resp/long?timeout=30");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], json!("succeeded"), "{r}");
    let runs = arrivals_once(&sink, &ids);
    for (id, at) in &runs {
        assert!(
            *at >= killed_us,
            "{id} started while the killed node's task held the slot"
        );
    }
    let long_runs = hits_of(&sink, "long");
    assert_eq!(long_runs.len(), 2, "run again once, after the kill");
    let mut all: Vec<(String, u64, u64)> =
        runs.into_iter().map(|(id, at)| (id, at, 300_000)).collect();
    all.push(("long again".into(), long_runs[1], 4_000_000));
    assert_apart(all);
}
