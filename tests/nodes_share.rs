//! Shared work between poulpe nodes on one Redis prefix (real binaries, a real redis-server with
//! `appendonly yes`): an idle node takes the ready tasks a busy node queues, each task running
//! once and none early; a `wait` on the busy node is answered for tasks the idle one ran; a task
//! queued on a node is cancelled from another and never runs; a node killed with `kill -9`
//! while it runs tasks it took loses none of them, and one stopped with SIGTERM finishes them;
//! a node alone on its prefix, or paused, never asks for other nodes' tasks; tasks with cc go
//! to an idle node's worker they name, one at a time. Node ids and ttls
//! are given as `POULPE_NODE_ID` and `POULPE_NODE_TTL`.

mod common;
use common::{eventually, free_port, hits::hits_by_id, redis::RedisServer, Server, Sink};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A persistent redis-server of the test's own.
fn redis(dir: &Path) -> RedisServer {
    RedisServer::start_on(&dir.join("redis"), free_port(), &["--appendonly", "yes"])
}

/// Node `id` (ttl 3 s) with `workers` workers on `redis`, its data under `dir/<id>`.
fn node(dir: &Path, redis: &RedisServer, id: &str, workers: &str) -> Server {
    Server::builder(dir.join(id))
        .args(&["--redis", &redis.url(), "--workers", workers])
        .env("POULPE_NODE_ID", id)
        .env("POULPE_NODE_TTL", "3")
        .start()
}

/// Waits until every one of `nodes` lists `n` live nodes (each knows it is not alone).
fn all_listed(nodes: &[&Server], n: usize) {
    for s in nodes {
        eventually(Duration::from_secs(15), "the nodes listed", || {
            let (_, info) = s.get("/sys_info");
            (info["nodes"].as_array().map(Vec::len) == Some(n)).then_some(())
        });
    }
}

/// Two nodes `a` and `b` (with `wa` and `wb` workers) on a fresh Redis, both listed, and a
/// sink: how most tests here start. Bind every field: a field left in the pattern's `..`
/// would be dropped (its server stopped) at once.
struct Pair {
    dir: tempfile::TempDir,
    redis: RedisServer,
    sink: Sink,
    a: Server,
    b: Server,
}

fn pair(wa: &str, wb: &str) -> Pair {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let sink = Sink::start();
    let a = node(dir.path(), &redis, "a", wa);
    let b = node(dir.path(), &redis, "b", wb);
    all_listed(&[&a, &b], 2);
    Pair {
        dir,
        redis,
        sink,
        a,
        b,
    }
}

/// GETs of the sink's `/slow` taking `ms` each, ids `<prefix><i>`, with `delay`.
fn slow(sink: &Sink, prefix: &str, n: usize, ms: u64, delay: u64) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i}");
            json!({"id": id, "method": "GET", "name": sink.url("/slow"), "delay": delay,
                "timeout": 30, "params": format!("ms={ms}&id={id}")})
        })
        .collect()
}

/// The node that ran task `id`, from its result (long-polled on `s`).
fn ran_on(s: &Server, id: &str) -> String {
    let (code, r) = s.get(&format!("/task_resp/{id}?timeout=60"));
    assert_eq!(code, 200, "{id}: {r}");
    assert_eq!(r["status"], json!("succeeded"), "{id}: {r}");
    r["node"].as_str().unwrap_or_default().to_string()
}

/// Node a gets 200 tasks of 100 ms and 10 delayed ones, node b none (two workers each): b runs
/// at least a third of them (their results name it), every task runs exactly once, and no
/// delayed one before its due time.
#[test]
fn an_idle_node_runs_a_share_of_a_busy_nodes_tasks_each_once_none_early() {
    let Pair {
        dir: _dir,
        redis: _redis,
        sink,
        a,
        b: _b,
    } = pair("2", "2");
    let mut ids = a.submit_all(&slow(&sink, "s-", 200, 100, 0));
    let before_us = common::now_us();
    let later = a.submit_all(&slow(&sink, "d-", 10, 100, 2));
    ids.extend(later.iter().cloned());
    let want: HashSet<String> = ids.iter().cloned().collect();
    common::hits::wait_all_hit(&sink, &want, Duration::from_secs(90), "all tasks");
    let on_b = ids.iter().filter(|id| ran_on(&a, id) == "b").count();
    assert!(
        on_b * 3 >= ids.len(),
        "b ran {on_b} of {} tasks, fewer than a third",
        ids.len()
    );
    let seen = hits_by_id(&sink.hits());
    let twice: Vec<&String> = ids
        .iter()
        .filter(|id| seen.get(*id).map_or(0, Vec::len) != 1)
        .collect();
    assert!(twice.is_empty(), "not run exactly once: {twice:?}");
    for id in &later {
        let at = seen.get(id).and_then(|h| h.first()).copied().unwrap_or(0);
        assert!(at >= before_us + 2_000_000, "{id} ran before its due time");
    }
}

/// A client waiting on node a (a `wait` submit of 8 tasks of 500 ms, a's one worker busy) is
/// answered with every result, some of them from tasks node b took and ran.
#[test]
fn a_wait_on_the_busy_node_is_answered_for_tasks_the_idle_node_ran() {
    let Pair {
        dir: _dir,
        redis: _redis,
        sink,
        a,
        b: _b,
    } = pair("1", "2");
    let mut tasks = slow(&sink, "w-", 8, 500, 0);
    for t in &mut tasks {
        t["wait"] = json!(60);
    }
    let (code, r) = a.submit(&json!(tasks));
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        r["result"],
        json!("OK"),
        "every result before the wait ran out: {r}"
    );
    let results = r["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 8, "{r}");
    assert!(
        results.iter().all(|x| x["status"] == json!("succeeded")),
        "{r}"
    );
    assert!(
        results.iter().any(|x| x["node"] == json!("b")),
        "b ran none of them: {r}"
    );
}

/// Node a's two workers run slow tasks; three quick tasks with cc "1" queue behind its worker
/// number 1. Node b's worker 1 is idle: b takes them and runs them one at a time (they share
/// the cluster's slot 1), long before a's worker 1 is free.
#[test]
fn tasks_with_cc_queued_on_a_busy_node_run_on_an_idle_nodes_worker_they_name() {
    // Held whole: every server stays up until the end.
    let p = pair("2", "2");
    let (a, sink) = (&p.a, &p.sink);
    let busy = a.submit_all(&slow(sink, "busy-", 2, 6000, 0));
    let want: HashSet<String> = busy.iter().cloned().collect();
    common::hits::wait_all_hit(sink, &want, Duration::from_secs(10), "both slow tasks");
    let mut quick = slow(sink, "cc-", 3, 300, 0);
    for t in &mut quick {
        t["cc"] = json!("1");
    }
    let ids = a.submit_all(&quick);
    let started = common::now_us();
    let mut nodes = Vec::new();
    for id in &ids {
        nodes.push(ran_on(a, id));
    }
    let finished_in = Duration::from_micros(common::now_us().saturating_sub(started));
    assert_eq!(nodes, ["b", "b", "b"], "where {ids:?} ran");
    assert!(
        finished_in < Duration::from_secs(5),
        "the cc tasks finished {finished_in:?} after their submit: they waited for a's worker"
    );
    let seen = hits_by_id(&sink.hits());
    let mut at: Vec<u64> = ids
        .iter()
        .map(|id| {
            let hits = seen.get(id).cloned().unwrap_or_default();
            assert_eq!(hits.len(), 1, "{id} ran {} times", hits.len());
            hits[0]
        })
        .collect();
    at.sort_unstable();
    for w in at.windows(2) {
        assert!(
            w[1] - w[0] >= 300_000,
            "two tasks sharing cc slot 1 overlapped: started {} µs apart",
            w[1] - w[0]
        );
    }
}

/// A task queued on node a behind its busy worker, in a's index of ready tasks (node b's one
/// worker is busy too, so b takes nothing), is cancelled from b: 200, it leaves the index, and
/// it never runs, on a or b, once both workers are free.
#[test]
fn a_task_queued_on_one_node_is_cancelled_from_another_and_never_runs() {
    let Pair {
        dir: _dir,
        redis,
        sink,
        a,
        b,
    } = pair("1", "1");
    assert_eq!(a.submit(&json!(slow(&sink, "busy-a", 1, 3000, 0))).0, 200);
    assert_eq!(b.submit(&json!(slow(&sink, "busy-b", 1, 3000, 0))).0, 200);
    sink.wait_until(Duration::from_secs(10), "both workers busy", |h| {
        let seen = hits_by_id(h);
        seen.contains_key("busy-a0") && seen.contains_key("busy-b0")
    });
    let held = json!({"id": "held", "method": "GET", "name": sink.url("/hit"),
        "params": "id=held"});
    assert_eq!(a.submit(&held).0, 200);
    assert_ne!(
        redis.cli(&["ZSCORE", "poulpe:ready:a", "held"]).trim(),
        "",
        "held is in a's index of ready tasks"
    );
    let (code, r) = common::request("DELETE", &b.url("/task/held"), &[]);
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        redis.cli(&["ZSCORE", "poulpe:ready:a", "held"]).trim(),
        "",
        "held has left a's index"
    );
    for (s, id) in [(&a, "busy-a0"), (&b, "busy-b0")] {
        ran_on(s, id);
    }
    // Both workers are free and b has asked for work since (at most a second apart).
    std::thread::sleep(Duration::from_millis(1500));
    let (code, r) = a.get("/task_resp/held");
    assert_eq!((code, &r["status"]), (200, &json!("cancelled")), "{r}");
    assert!(
        !hits_by_id(&sink.hits()).contains_key("held"),
        "the cancelled task ran"
    );
}

/// Node b takes tasks from node a (one worker, six tasks of 2 s) and is killed with `kill -9`
/// while it runs them: every task still runs and succeeds, the ones b was running again, on a,
/// as a dead node's tasks.
#[test]
fn a_node_killed_while_running_tasks_it_took_loses_none() {
    let Pair {
        dir: _dir,
        redis: _redis,
        sink,
        a,
        mut b,
    } = pair("1", "2");
    let ids = a.submit_all(&slow(&sink, "k-", 6, 2000, 0));
    // b's own workers (`working_keys` lists the whole cluster's), their requests at the sink.
    let running = eventually(Duration::from_secs(15), "b running a's tasks", || {
        let (_, info) = b.get("/sys_info");
        let ids: Vec<String> = info["workers"]
            .as_array()
            .map(|w| {
                w.iter()
                    .filter_map(|w| w["task"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        // Marked running before its request is sent: wait until the sink has it.
        let hits = hits_by_id(&sink.hits());
        (!ids.is_empty() && ids.iter().all(|id| hits.contains_key(id))).then_some(ids)
    });
    b.kill9();
    let want: HashSet<String> = ids.iter().cloned().collect();
    common::hits::wait_all_hit(&sink, &want, Duration::from_secs(60), "after kill -9");
    for id in &ids {
        ran_on(&a, id);
    }
    let log = a.log_text();
    assert!(log.contains("tasks of dead node b"), "{log}");
    for id in &running {
        assert!(ids.contains(id), "b ran {id}, one of a's");
        assert_eq!(ran_on(&a, id), "a", "{id} was running on b: a ran it again");
        assert!(
            hits_by_id(&sink.hits()).get(id).map_or(0, Vec::len) >= 2,
            "{id} was running on b: it runs again"
        );
    }
}

/// Lines of `redis-cli MONITOR` output that are calls of the script taking other nodes' tasks
/// by node `node` (any node of these tests, whose ids are letters, when empty): `EVALSHA <sha> 0
/// poulpe: <node> <n> <worker>...`, with at least one idle worker's number. No other script is
/// called with a node and then two or more numbers alone (`TAKE_DUE_MANY` has a flag, then ids
/// and due times in pairs, and the ids in these tests are not numbers; the expiry script has
/// no node).
fn steal_calls(monitor: &str, node: &str) -> usize {
    monitor
        .lines()
        .filter(|l| {
            let Some((_, rest)) = l.split_once("\"EVALSHA\" \"") else {
                return false;
            };
            let args: Vec<&str> = rest
                .trim_end()
                .trim_end_matches('"')
                .split("\" \"")
                .collect();
            args.len() >= 6
                && args[1] == "0"
                && args[2] == "poulpe:"
                && (node.is_empty() || args[3] == node)
                && !args[3].bytes().all(|b| b.is_ascii_digit())
                && args[4..]
                    .iter()
                    .all(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()))
        })
        .count()
}

/// What `redis-cli MONITOR` shows while `during` runs (and a second after).
fn monitor(redis: &RedisServer, during: impl FnOnce()) -> String {
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let mut child = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "MONITOR"])
        .stdout(out.reopen().expect("reopen"))
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-cli (installed with redis-server by scripts/test.sh)");
    eventually(Duration::from_secs(10), "MONITOR started", || {
        std::fs::read_to_string(out.path())
            .ok()
            .filter(|s| s.starts_with("OK"))
    });
    during();
    std::thread::sleep(Duration::from_secs(1));
    let _ = child.kill();
    let _ = child.wait();
    std::fs::read_to_string(out.path()).expect("monitor output")
}

/// A node alone on its prefix never calls the script that takes other nodes' tasks, idle or
/// running tasks; once a second node has joined, the idle nodes call it.
#[test]
fn a_node_alone_on_its_prefix_never_asks_for_other_nodes_tasks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis(dir.path());
    let sink = Sink::start();
    let a = node(dir.path(), &redis, "a", "2");
    all_listed(&[&a], 1);
    let alone = monitor(&redis, || {
        let ids = a.submit_all(&slow(&sink, "x-", 20, 50, 0));
        for id in &ids {
            ran_on(&a, id);
        }
        std::thread::sleep(Duration::from_secs(2));
    });
    assert!(alone.contains("EVALSHA"), "MONITOR saw the node's calls");
    assert_eq!(
        steal_calls(&alone, ""),
        0,
        "a alone asked for other nodes' tasks"
    );
    let b = node(dir.path(), &redis, "b", "2");
    all_listed(&[&a, &b], 2);
    let two = monitor(&redis, || std::thread::sleep(Duration::from_secs(3)));
    assert!(steal_calls(&two, "") > 0, "two idle nodes ask for work");
}

/// A paused node takes nothing: while idle node b is paused, node a's tasks all run on a and b
/// never asks for them (what it took would wait in its paused queue until a took it back);
/// once b resumes it takes a share again.
#[test]
fn a_paused_node_takes_no_other_nodes_tasks() {
    let Pair {
        dir: _dir,
        redis,
        sink,
        a,
        b,
    } = pair("1", "2");
    let (code, r) = common::post_json(&b.url("/pause"), &json!({}));
    assert_eq!(code, 200, "{r}");
    let seen = monitor(&redis, || {
        let ids = a.submit_all(&slow(&sink, "p-", 6, 500, 0));
        for id in &ids {
            assert_eq!(ran_on(&a, id), "a", "{id} ran on the paused node");
        }
    });
    assert!(seen.contains("EVALSHA"), "MONITOR saw the nodes' calls");
    assert_eq!(steal_calls(&seen, "b"), 0, "paused b asked for a's tasks");
    let (code, r) = common::post_json(&b.url("/resume"), &json!({}));
    assert_eq!(code, 200, "{r}");
    let ids = a.submit_all(&slow(&sink, "q-", 8, 500, 0));
    let on_b = ids.iter().filter(|id| ran_on(&a, id) == "b").count();
    assert!(on_b > 0, "b, resumed, took none");
}

/// Node b, running tasks it took from node a, is stopped with SIGTERM: it exits cleanly once
/// its attempts have finished, recording them, and every task runs exactly once, the rest
/// on a.
#[test]
fn a_node_stopped_while_running_tasks_it_took_finishes_them_and_each_runs_once() {
    let Pair {
        dir: _dir,
        redis: _redis,
        sink,
        a,
        mut b,
    } = pair("1", "2");
    let ids = a.submit_all(&slow(&sink, "t-", 8, 1000, 0));
    eventually(Duration::from_secs(15), "b running a's tasks", || {
        let (_, info) = b.get("/sys_info");
        let busy = info["workers"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["task"].is_string()));
        busy.then_some(())
    });
    assert!(b.term().success(), "{}", b.log_text());
    let want: HashSet<String> = ids.iter().cloned().collect();
    common::hits::wait_all_hit(&sink, &want, Duration::from_secs(60), "after SIGTERM");
    let mut on_b = 0;
    for id in &ids {
        on_b += usize::from(ran_on(&a, id) == "b");
    }
    assert!(on_b > 0, "b finished none of the tasks it ran");
    let seen = hits_by_id(&sink.hits());
    let twice: Vec<&String> = ids
        .iter()
        .filter(|id| seen.get(*id).map_or(0, Vec::len) != 1)
        .collect();
    assert!(twice.is_empty(), "not run exactly once: {twice:?}");
}
