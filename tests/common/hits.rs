//! Sink hits by task id: every task of these tests carries `id=<id>` in its query.

use super::{Hit, Sink};
use std::collections::{HashMap, HashSet};
use std::thread;
use std::time::{Duration, Instant};

/// The `id` query parameter of a sink hit (every task here carries `id=<id>` in its params).
pub fn hit_id(h: &Hit) -> Option<&str> {
    h.query.split('&').find_map(|kv| kv.strip_prefix("id="))
}

/// Hits per id.
pub fn hits_by_id(hits: &[Hit]) -> HashMap<String, Vec<u64>> {
    let mut m: HashMap<String, Vec<u64>> = HashMap::new();
    for h in hits {
        if let Some(id) = hit_id(h) {
            m.entry(id.to_string()).or_default().push(h.at_us);
        }
    }
    m
}

/// Waits (up to `limit`) until every id in `want` has reached the sink; panics naming the
/// missing ones otherwise.
pub fn wait_all_hit(sink: &Sink, want: &HashSet<String>, limit: Duration, what: &str) {
    let end = Instant::now() + limit;
    loop {
        let seen = hits_by_id(&sink.hits());
        let mut missing: Vec<&String> = want.iter().filter(|id| !seen.contains_key(*id)).collect();
        if missing.is_empty() {
            return;
        }
        if Instant::now() > end {
            missing.sort();
            panic!(
                "{what}: {} of {} acknowledged tasks never reached the sink, e.g. {:?}",
                missing.len(),
                want.len(),
                &missing[..missing.len().min(20)]
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A delayed task is cancelled and its id submitted again with a longer delay: the new task
/// runs once, never before its own due time (the timer's entry for the cancelled one is stale
/// and must not release it). Run on each store by its suite.
#[allow(dead_code)]
pub fn a_reused_id_waits_for_its_own_due_time(s: &super::Server, sink: &Sink) {
    use serde_json::json;
    let task = |delay: u64| {
        json!({"id": "again", "method": "GET", "name": sink.url("/again"),
               "params": "id=again", "delay": delay})
    };
    assert_eq!(s.submit(&task(1)).0, 200);
    let (code, r) = super::request("DELETE", &s.url("/task/again"), &[]);
    assert_eq!(code, 200, "cancelled: {r}");
    let due = super::now_us() + 3_000_000;
    let (code, r) = s.submit(&task(3));
    assert_eq!(code, 200, "the id is free again: {r}");
    let want: HashSet<String> = ["again".to_string()].into();
    wait_all_hit(
        sink,
        &want,
        Duration::from_secs(15),
        "the task submitted again",
    );
    // A second arrival would come right after the first: wait a little for it.
    thread::sleep(Duration::from_millis(300));
    let at = &hits_by_id(&sink.hits())["again"];
    assert_eq!(at.len(), 1, "ran once: {at:?}");
    assert!(
        at[0] >= due,
        "ran {} ms before its own due time, at the cancelled task's",
        (due - at[0]) / 1000
    );
}
