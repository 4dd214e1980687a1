//! Delayed tasks run, and never before their due time (submit time + delay).

mod common;
use common::{cpu_ticks, hits::hits_by_id, hits::wait_all_hit, now_us, Server, Sink};
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

#[test]
fn delayed_tasks_are_never_early() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let mut sent = Vec::new();
    for i in 0..60 {
        let id = format!("dl-{i}");
        let delay = 1 + i % 3;
        let t = json!({"id": id, "method":"GET", "name": sink.url("/d"),
                       "params": format!("id={id}"), "delay": delay});
        let before = now_us();
        let (code, r) = s.submit(&t);
        assert_eq!(code, 200, "{r}");
        sent.push((id, before + delay * 1_000_000));
    }
    // While waiting, the tasks are listed as delaying.
    let (_, info) = s.get("/sys_info");
    assert!(info["delaying_total"].as_u64().unwrap_or(0) > 0, "{info}");
    let want: HashSet<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    wait_all_hit(&sink, &want, Duration::from_secs(20), "delayed tasks");
    let seen = hits_by_id(&sink.hits());
    for (id, due) in &sent {
        for &at in &seen[id] {
            assert!(at >= *due, "{id} ran {} µs early", due - at);
        }
        assert_eq!(seen[id].len(), 1, "{id} ran more than once");
    }
}

#[test]
fn a_cancelled_id_submitted_again_runs_at_its_new_due_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    common::hits::a_reused_id_waits_for_its_own_due_time(&s, &sink);
}

#[test]
fn delay_as_a_string_of_digits_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let before = now_us();
    let t = json!({"id":"ds","method":"GET","name":sink.url("/d"),"params":"id=ds","delay":"1"});
    assert_eq!(s.submit(&t).0, 200);
    let (code, r) = s.get("/task_resp/ds?timeout=10");
    assert_eq!(code, 200, "{r}");
    assert!(sink.hits()[0].at_us >= before + 1_000_000, "early");
}

/// `run_at` starts a task at its time, given as Unix seconds or as RFC 3339 with any offset,
/// never before; one whose time has passed runs at once; it survives a restart like a delay.
#[test]
fn run_at_starts_tasks_at_their_time_never_early() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let mut s = Server::builder(&dir).start();
    let at_us = now_us() + 2_500_000;
    let secs = at_us as f64 / 1e6;
    // The same instant in a zone two hours ahead of UTC.
    let local = chrono::DateTime::from_timestamp_micros(at_us as i64)
        .expect("time")
        .with_timezone(&chrono::FixedOffset::east_opt(7200).expect("offset"))
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
    assert!(local.ends_with("+02:00"), "{local}");
    for (id, run_at) in [("ra-num", json!(secs)), ("ra-str", json!(local))] {
        let t = json!({"id": id, "method":"GET", "name": sink.url("/ra"),
                       "params": format!("id={id}"), "run_at": run_at});
        let (code, r) = s.submit(&t);
        assert_eq!(code, 200, "{r}");
    }
    let (code, r) = s.get("/task_resp/ra-str?timeout=0");
    assert_eq!((code, &r["status"]), (202, &json!("delayed")), "{r}");
    // The server restarts meanwhile: the time is kept.
    s.kill9();
    let s = Server::builder(&dir).start();
    let past = json!({"id":"ra-past","method":"GET","name":sink.url("/ra"),"params":"id=ra-past",
                      "run_at":"2020-01-01T00:00:00Z"});
    assert_eq!(s.submit(&past).0, 200);
    let want: HashSet<String> = ["ra-num", "ra-str", "ra-past"].map(String::from).into();
    wait_all_hit(&sink, &want, Duration::from_secs(20), "run_at tasks");
    let seen = hits_by_id(&sink.hits());
    for id in ["ra-num", "ra-str"] {
        for &at in &seen[id] {
            assert!(at >= at_us, "{id} ran {} µs early", at_us - at);
        }
    }
    assert!(
        seen["ra-past"][0] < at_us,
        "a time that has passed runs at once"
    );
    for (bad, why) in [
        (
            json!({"method":"GET","name":sink.url("/x"),"run_at":"soon"}),
            "run_at: ",
        ),
        (
            json!({"method":"GET","name":sink.url("/x"),"run_at":5,"delay":5}),
            "not both",
        ),
    ] {
        let (code, r) = s.submit(&bad);
        assert_eq!(code, 400, "{r}");
        assert!(r["reason"].as_str().unwrap_or("").contains(why), "{r}");
    }
}

/// While a delayed task waits, the timer sleeps until its due time: an idle server with a
/// task due in an hour uses next to no CPU (a timer that polled would burn a core).
#[test]
fn a_waiting_delayed_task_does_not_keep_the_cpu_busy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let t = json!({"id": "later", "method":"GET", "name": sink.url("/later"), "delay": 3600});
    let (code, r) = s.submit(&t);
    assert_eq!(code, 200, "{r}");
    // The task is with the timer before the measure starts.
    let (_, info) = s.get("/sys_info");
    assert_eq!(info["delaying_total"], 1, "{info}");
    let pid = s.pid().expect("running");
    let ticks = 100; // USER_HZ on Linux
    let before = cpu_ticks(pid);
    let wall = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(pid) - before;
    let elapsed = wall.elapsed().as_secs_f64();
    // A spinning thread uses up to one tick per tick of wall time (less on a loaded machine:
    // about half of it seen with two busy cores); an idle poulpe uses next to none. A tenth.
    assert!(
        (used as f64) < elapsed * ticks as f64 / 10.0,
        "{used} ticks of CPU in {elapsed:.1} s while the only task waits for an hour"
    );
    assert!(sink.hits().is_empty(), "the task ran early");
}
