//! Delayed tasks run, and never before their due time (submit time + delay).

mod common;
use common::{hits_by_id, now_us, wait_all_hit, Server, Sink};
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

#[test]
fn delayed_tasks_are_never_early() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::start(&dir, &[]);
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
fn delay_as_a_string_of_digits_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::start(&dir, &[]);
    let before = now_us();
    let t = json!({"id":"ds","method":"GET","name":sink.url("/d"),"params":"id=ds","delay":"1"});
    assert_eq!(s.submit(&t).0, 200);
    let (code, r) = s.get("/task_resp/ds?timeout=10");
    assert_eq!(code, 200, "{r}");
    assert!(sink.hits()[0].at_us >= before + 1_000_000, "early");
}
