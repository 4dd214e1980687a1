//! Retries and dead letters: exactly `max_retry` + 1 attempts, spaced no closer than the retry
//! interval (fixed and exponential), then a dead-letter file holding every attempt's error.

mod common;
use common::{eventually, Server, Sink};
use serde_json::{json, Value};
use std::time::Duration;

fn dead_letter(dir: &tempfile::TempDir, id: &str) -> Value {
    let dead = dir.path().join("data/dead");
    let file = eventually(Duration::from_secs(10), "the dead-letter file", || {
        std::fs::read_dir(&dead)
            .ok()?
            .filter_map(|d| d.ok())
            .map(|d| d.path().join(format!("task-{id}.json")))
            .find(|p| p.exists())
    });
    let day = file
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert_eq!(day.len(), 10, "folder named YYYY-MM-DD: {}", file.display());
    serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("dead letter JSON")
}

#[test]
fn fixed_retries_then_dead_letter_with_every_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let t = json!({"id":"rd-1","method":"GET","name":sink.url("/status/500"),
                   "max_retry":3,"retry_interval":1});
    assert_eq!(s.submit(&t).0, 200);
    let (code, r) = s.get("/task_resp/rd-1?timeout=30");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "dead", "{r}");
    assert_eq!(r["attempts"], 4, "{r}");

    let hits = sink.hits_on("/status/500");
    assert_eq!(hits.len(), 4, "max_retry 3 means 4 attempts");
    for w in hits.windows(2) {
        assert!(
            w[1].at_us >= w[0].at_us + 1_000_000,
            "a retry came sooner than retry_interval: {} µs",
            w[1].at_us - w[0].at_us
        );
    }
    let rec = dead_letter(&dir, "rd-1");
    assert_eq!(rec["task"]["id"], "rd-1", "{rec}");
    let attempts = rec["task"]["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 4, "{rec}");
    for a in attempts {
        assert_eq!(a["ok"], false, "{rec}");
        assert_eq!(a["code"], 500, "{rec}");
        assert!(a["error"].as_str().unwrap_or("").contains("500"), "{rec}");
        assert!(
            a["finished_ms"].as_i64() >= a["started_ms"].as_i64(),
            "{rec}"
        );
    }
    assert_eq!(rec["result"]["status"], "dead", "{rec}");
    let (_, info) = s.get("/sys_info");
    assert_eq!(info["counts"]["dead"], 1, "{info}");
    assert_eq!(info["counts"]["failed_attempts"], 4, "{info}");
}

#[test]
fn exponential_backoff_doubles_the_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir)
        .args(&["--backoff", "exponential"])
        .start();
    let t = json!({"id":"rx-1","method":"GET","name":sink.url("/status/503"),
                   "max_retry":2,"retry_interval":1});
    assert_eq!(s.submit(&t).0, 200);
    let (code, r) = s.get("/task_resp/rx-1?timeout=30");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["attempts"], 3, "{r}");
    let hits = sink.hits_on("/status/503");
    assert_eq!(hits.len(), 3);
    // 1 s then 2 s, each within ±10 % jitter: never below 0.9 s and 1.8 s.
    let gap1 = hits[1].at_us - hits[0].at_us;
    let gap2 = hits[2].at_us - hits[1].at_us;
    assert!(gap1 >= 900_000, "first retry after {gap1} µs");
    assert!(gap2 >= 1_800_000, "second retry after {gap2} µs");
    assert!(gap2 > gap1, "the interval grows: {gap1} then {gap2} µs");
}

#[test]
fn a_task_that_recovers_on_retry_succeeds_without_a_dead_letter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir)
        .args(&["--exec_dir", dir.path().to_str().expect("utf-8 path")])
        .start();
    // Fails the first time, succeeds the second (a marker file remembers the first run).
    let marker = dir.path().join("ran-once");
    let prog = dir.path().join("flaky");
    std::fs::write(
        &prog,
        format!(
            "#!/bin/sh\nif [ -e {m} ]; then echo fine; else touch {m}; exit 1; fi\n",
            m = marker.display()
        ),
    )
    .expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let t = json!({"id":"rf-1","method":"EXEC","name":"flaky","max_retry":2,"retry_interval":0,
                   "wait":20});
    let (code, r) = s.submit(&t);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "OK", "{r}");
    assert_eq!(r["attempts"], 2, "{r}");
    assert_eq!(
        walk_count(&dir.path().join("data/dead")),
        0,
        "no dead letter for a task that succeeded"
    );
}

fn walk_count(p: &std::path::Path) -> usize {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    if e.path().is_dir() {
                        walk_count(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// poulpe (`--exec_any`) whose `--dead` cannot be created: a regular file stands where its parent
/// folder should be (we run as root, so permissions would stop nothing). Removing that file and
/// making the folder heals it. Gives the server, that parent path and the `--dead` path.
fn with_unwritable_dead_dir(
    dir: &tempfile::TempDir,
) -> (Server, std::path::PathBuf, std::path::PathBuf) {
    let parent = dir.path().join("deadparent");
    let dead = parent.join("dead");
    let dead_s = dead.to_string_lossy().into_owned();
    let s = Server::builder(dir)
        .args(&["--exec_any", "--dead", &dead_s])
        .start();
    std::fs::remove_dir_all(&parent).expect("remove the dead dir");
    std::fs::write(&parent, "not a folder").expect("file in the way");
    (s, parent, dead)
}

/// While `--dead` cannot be written, a task out of retries counts its failed attempt once (not
/// once per write try) and reads as `retry_wait`, not `running`; once the directory is usable
/// again every record is written and each task counts once as dead.
#[test]
fn an_unwritable_dead_dir_counts_each_failure_once_and_heals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, parent, dead) = with_unwritable_dead_dir(&dir);

    const N: usize = 20;
    let ids: Vec<String> = (0..N).map(|i| format!("ud-{i}")).collect();
    for id in &ids {
        let (code, r) = s.submit(&json!({"id":id,"method":"EXEC","name":"false","max_retry":0}));
        assert_eq!(code, 200, "{r}");
    }
    let counts = |s: &Server| s.get("/sys_info").1["counts"].clone();
    eventually(Duration::from_secs(10), "every attempt to fail", || {
        (counts(&s)["failed_attempts"].as_u64() >= Some(N as u64)).then_some(())
    });
    // The outcome stage tries the write again every few seconds: wait until the log shows a
    // second try for every task, so a count per try would show.
    eventually(
        Duration::from_secs(60),
        "a second write try for every task",
        || {
            let log = s.log_text();
            ids.iter()
                .all(|id| {
                    log.matches(&format!(
                        "task {id} is dead but its record cannot be written"
                    ))
                    .count()
                        >= 2
                })
                .then_some(())
        },
    );
    let c = counts(&s);
    assert_eq!(c["failed_attempts"], N, "one failed attempt per task: {c}");
    assert_eq!(c["dead"], 0, "{c}");
    for id in &ids {
        let (code, r) = s.get(&format!("/task_resp/{id}?timeout=0"));
        assert_eq!(code, 202, "{id}: {r}");
        assert_eq!(r["status"], "retry_wait", "{id}: not running any more: {r}");
    }

    std::fs::remove_file(&parent).expect("remove the file");
    std::fs::create_dir(&parent).expect("the folder again");
    // Every task final (dead) first: nothing can count after that.
    for id in &ids {
        let (code, r) = s.get(&format!("/task_resp/{id}?timeout=30"));
        assert_eq!(code, 200, "{id}: {r}");
        assert_eq!(r["status"], "dead", "{id}: {r}");
        assert_eq!(r["attempts"], 1, "{id}: {r}");
    }
    eventually(Duration::from_secs(10), "every task counted dead", || {
        (counts(&s)["dead"].as_u64() >= Some(N as u64)).then_some(())
    });
    let c = counts(&s);
    assert_eq!(c["dead"], N, "{c}");
    assert_eq!(c["failed_attempts"], N, "{c}");
    let records = walk_count(&dead);
    assert_eq!(records, N, "one record per task");
}

/// The log times (ms since 1970) of the lines saying that `id`'s dead-letter record could not be
/// written.
fn dead_write_failures_ms(log: &str, id: &str) -> Vec<i64> {
    let needle = format!("task {id} is dead but its record cannot be written");
    log.lines()
        .filter(|l| l.contains(&needle))
        .map(|l| {
            let stamp = l
                .trim_start_matches('[')
                .split(' ')
                .next()
                .unwrap_or_default();
            chrono::DateTime::parse_from_rfc3339(stamp)
                .unwrap_or_else(|e| panic!("log time {stamp:?}: {e}"))
                .timestamp_millis()
        })
        .collect()
}

/// A dead-letter write that failed is tried again every 5 s (the interval its log line names),
/// never sooner: a store of failing writes must not spin.
#[test]
fn a_failed_dead_letter_write_is_tried_again_no_sooner_than_5_s_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, _, _) = with_unwritable_dead_dir(&dir);

    let (code, r) = s.submit(&json!({"id":"pace","method":"EXEC","name":"false","max_retry":0}));
    assert_eq!(code, 200, "{r}");
    let tries = eventually(Duration::from_secs(30), "three write tries", || {
        let t = dead_write_failures_ms(&s.log_text(), "pace");
        (t.len() >= 3).then_some(t)
    });
    assert!(
        s.log_text().contains("the write is tried again every 5 s"),
        "the log names the interval"
    );
    for w in tries.windows(2) {
        // Log times are cut to the ms: allow that rounding, nothing more.
        assert!(
            w[1] - w[0] >= 4_999,
            "a write try {} ms after the previous one, sooner than the 5 s interval: {tries:?}",
            w[1] - w[0]
        );
    }
}

/// A graceful stop tries a waiting dead-letter write once more before it exits: a `--dead` that
/// came back just before the stop gets its record, and the log then reports nothing left over.
#[test]
fn a_graceful_stop_tries_a_waiting_dead_letter_write_once_more() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, parent, dead) = with_unwritable_dead_dir(&dir);

    let (code, r) = s.submit(&json!({"id":"last","method":"EXEC","name":"false","max_retry":0}));
    assert_eq!(code, 200, "{r}");
    // The first write failed; the next periodic try is 5 s away. Heal and stop at once, so only
    // the try at the stop can write the record.
    eventually(Duration::from_secs(10), "the first failed write", || {
        (!dead_write_failures_ms(&s.log_text(), "last").is_empty()).then_some(())
    });
    std::fs::remove_file(&parent).expect("remove the file");
    std::fs::create_dir(&parent).expect("the folder again");
    s.signal(libc::SIGTERM);
    let st = s
        .wait_exit(Duration::from_secs(60))
        .expect("exit after SIGTERM");
    assert!(st.success(), "{st:?}");
    let log = s.log_text();
    assert_eq!(
        dead_write_failures_ms(&log, "last").len(),
        1,
        "the periodic try came before the stop, the test proves nothing: {log}"
    );
    assert_eq!(
        walk_count(&dead),
        1,
        "the record written at the stop: {log}"
    );
    assert!(
        !log.contains("dead tasks could not be recorded"),
        "nothing was left over: {log}"
    );
}

/// A task's `callback` gets its final result by POST once it has finished, succeeded or dead,
/// from a task of its own (named in the result as `callback_id`) that retries with the task's
/// policy while the receiver is down and survives a `kill -9`.
#[test]
fn callbacks_get_the_final_result_and_are_retried_while_the_receiver_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let mut s = Server::builder(&dir).start();
    let submit = |s: &Server, t: Value| -> Value {
        let (code, r) = s.submit(&t);
        assert_eq!(code, 200, "{r}");
        r
    };
    let ok = submit(
        &s,
        json!({"id":"cb-ok","method":"GET","name":sink.url("/work"),"wait":10,
               "callback":sink.url("/cb/ok")}),
    );
    let dead = submit(
        &s,
        json!({"id":"cb-dead","method":"GET","name":sink.url("/status/500"),"max_retry":0,
               "wait":10,"callback":sink.url("/cb/dead")}),
    );
    let down = submit(
        &s,
        json!({"id":"cb-down","method":"GET","name":sink.url("/work"),"wait":10,
               "max_retry":2,"retry_interval":1,"callback":sink.url("/status/503/cb-down")}),
    );
    assert_eq!(
        (&ok["status"], &dead["status"], &down["status"]),
        (&json!("succeeded"), &json!("dead"), &json!("succeeded"))
    );
    for (path, r) in [("/cb/ok", &ok), ("/cb/dead", &dead)] {
        sink.wait_until(Duration::from_secs(10), path, |h| {
            h.iter().any(|h| h.path == path)
        });
        let hit = &sink.hits_on(path)[0];
        assert_eq!(
            (hit.method.as_str(), hit.content_type.as_str()),
            ("POST", "application/json")
        );
        let got: Value = serde_json::from_str(&hit.body).expect("the body is the result");
        assert_eq!(&got, r, "{path} got the result as /task_resp gives it");
        let cb = r["callback_id"].as_str().expect("callback_id");
        let (code, cr) = s.get(&format!("/task_resp/{cb}?timeout=10"));
        assert_eq!((code, &cr["status"]), (200, &json!("succeeded")), "{cr}");
    }
    // The receiver answers 503: the first POST failed; the server dies before its retry.
    sink.wait_until(Duration::from_secs(10), "the first callback POST", |h| {
        h.iter().any(|h| h.path == "/status/503/cb-down")
    });
    s.kill9();
    let s = Server::builder(&dir).start();
    let cb = down["callback_id"].as_str().expect("callback_id");
    let (code, cr) = s.get(&format!("/task_resp/{cb}?timeout=30"));
    assert_eq!((code, &cr["status"]), (200, &json!("dead")), "{cr}");
    assert_eq!(cr["attempts"], 3, "the task's max_retry: {cr}");
    let posts = sink.hits_on("/status/503/cb-down");
    assert!(posts.len() >= 3, "{} POSTs", posts.len());
    let got: Value = serde_json::from_str(&posts[posts.len() - 1].body).expect("json");
    assert_eq!(got["id"], "cb-down", "{got}");
}
