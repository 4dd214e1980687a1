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
