//! Writes of the embedded store that are durable in the journal but not yet in the redb file:
//! reads look here first. A checkpoint writes the final state of each key once (a task
//! accepted, run and finished between two checkpoints costs the redb file one result), then
//! empties it.

use super::local::Op;
use std::collections::HashMap;

/// A key's value since the last checkpoint: `None` when deleted. Tasks and meta values use the
/// same map type as results (their expiry is unused) so that the binary holds one copy of the
/// hash table's code. foldhash, as in the live index: much cheaper than SipHash on short ids.
type Map = HashMap<String, Option<(i64, Vec<u8>)>, foldhash::fast::RandomState>;

/// The state of every key written since the last checkpoint.
#[derive(Default)]
pub(crate) struct Pending {
    tasks: Map,
    results: Map,
    meta: Map,
    /// Entries of the expiry index to delete: (expires_ms, id).
    expiry_del: Vec<(i64, String)>,
    /// Results to delete at the checkpoint if the file's copy still has this expiry (an
    /// `Expire` of a result this overlay did not hold): (expires_ms, id).
    expire_if: Vec<(i64, String)>,
    /// Ops folded in since the last checkpoint.
    ops: usize,
    /// Rough bytes held.
    bytes: usize,
}

/// What a checkpoint writes into the redb file.
pub(crate) trait Sink {
    fn put_task(&mut self, id: &str, bytes: &[u8]) -> Result<(), redb::Error>;
    fn del_task(&mut self, id: &str) -> Result<(), redb::Error>;
    fn put_result(&mut self, id: &str, expires_ms: i64, bytes: &[u8]) -> Result<(), redb::Error>;
    fn del_result(&mut self, id: &str) -> Result<(), redb::Error>;
    /// Deletes the result if it has this expiry.
    fn del_result_if(&mut self, id: &str, expires_ms: i64) -> Result<(), redb::Error>;
    fn del_expiry(&mut self, expires_ms: i64, id: &str) -> Result<(), redb::Error>;
    fn put_meta(&mut self, key: &str, value: &str) -> Result<(), redb::Error>;
}

impl Pending {
    /// Folds one durable write in. `earlier` gives the expiry of a result an older overlay (a
    /// checkpoint being written) holds, `Some(None)` if it deletes it: `Expire` deletes a result
    /// only if it still has that expiry, decided here when an overlay knows the result, else at
    /// the checkpoint against the file.
    pub(crate) fn apply(&mut self, op: Op, earlier: &dyn Fn(&str) -> Option<Option<i64>>) {
        self.ops += 1;
        let (map, key, value) = match op {
            Op::PutTask(id, b) | Op::InsertTask(id, b) => (&mut self.tasks, id, Some((0, b))),
            Op::DelTask(id) => (&mut self.tasks, id, None),
            Op::PutResult {
                id,
                expires_ms,
                bytes,
            } => (&mut self.results, id, Some((expires_ms, bytes))),
            Op::DelResult(id) => (&mut self.results, id, None),
            Op::Expire { id, expires_ms } => {
                let known = match self.results.get(&id) {
                    Some(r) => Some(r.as_ref().map(|(e, _)| *e)),
                    None => earlier(&id),
                };
                match known {
                    Some(current) if current == Some(expires_ms) => {
                        self.results.insert(id.clone(), None);
                    }
                    Some(_) => {}
                    None => self.expire_if.push((expires_ms, id.clone())),
                }
                self.bytes += id.len();
                self.expiry_del.push((expires_ms, id));
                return;
            }
            Op::PutMeta(k, v) => (&mut self.meta, k, Some((0, v.into_bytes()))),
        };
        self.bytes += key.len() + value.as_ref().map_or(0, |(_, b)| b.len());
        map.insert(key, value);
    }

    /// The task's bytes if it was written since the last checkpoint (`Some(None)`: deleted).
    pub(crate) fn task(&self, id: &str) -> Option<Option<Vec<u8>>> {
        self.tasks
            .get(id)
            .map(|t| t.as_ref().map(|(_, b)| b.clone()))
    }

    /// The result if it was written since the last checkpoint (`Some(None)`: deleted).
    pub(crate) fn result(&self, id: &str) -> Option<Option<(i64, Vec<u8>)>> {
        self.results.get(id).cloned()
    }

    pub(crate) fn meta(&self, key: &str) -> Option<String> {
        let (_, v) = self.meta.get(key)?.as_ref()?;
        Some(String::from_utf8_lossy(v).into_owned())
    }

    /// Results written since the last checkpoint that expire before `now_ms`, up to `limit`.
    pub(crate) fn expired(&self, now_ms: i64, limit: usize, out: &mut Vec<(String, i64)>) {
        for (id, r) in &self.results {
            if out.len() >= limit {
                return;
            }
            if let Some((e, _)) = r {
                if *e < now_ms {
                    out.push((id.clone(), *e));
                }
            }
        }
    }

    /// Results written (not deleted) since the last checkpoint.
    pub(crate) fn results_written(&self) -> usize {
        self.results.values().filter(|r| r.is_some()).count()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ops == 0
    }

    /// Ops folded in since the last checkpoint.
    pub(crate) fn ops(&self) -> usize {
        self.ops
    }

    /// Rough bytes held in memory.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Writes the final state of every key. Expiry entries are deleted before results are
    /// written, so a result written again with the same expiry keeps its entry.
    pub(crate) fn write_to(&self, sink: &mut dyn Sink) -> Result<(), redb::Error> {
        for (id, t) in &self.tasks {
            match t {
                Some((_, b)) => sink.put_task(id, b)?,
                None => sink.del_task(id)?,
            }
        }
        for (e, id) in &self.expiry_del {
            sink.del_expiry(*e, id)?;
        }
        for (e, id) in &self.expire_if {
            // A result written or deleted after the `Expire` is decided by the map below.
            if !self.results.contains_key(id) {
                sink.del_result_if(id, *e)?;
            }
        }
        for (id, r) in &self.results {
            match r {
                Some((e, b)) => sink.put_result(id, *e, b)?,
                None => sink.del_result(id)?,
            }
        }
        for (k, v) in &self.meta {
            if let Some((_, v)) = v {
                sink.put_meta(k, &String::from_utf8_lossy(v))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records what a checkpoint writes, in order.
    #[derive(Default)]
    pub(crate) struct Rec(pub(crate) Vec<String>);

    impl Sink for Rec {
        fn put_task(&mut self, id: &str, bytes: &[u8]) -> Result<(), redb::Error> {
            self.0.push(format!("put_task {id} {bytes:?}"));
            Ok(())
        }
        fn del_task(&mut self, id: &str) -> Result<(), redb::Error> {
            self.0.push(format!("del_task {id}"));
            Ok(())
        }
        fn put_result(&mut self, id: &str, e: i64, bytes: &[u8]) -> Result<(), redb::Error> {
            self.0.push(format!("put_result {id} {e} {bytes:?}"));
            Ok(())
        }
        fn del_result(&mut self, id: &str) -> Result<(), redb::Error> {
            self.0.push(format!("del_result {id}"));
            Ok(())
        }
        fn del_result_if(&mut self, id: &str, e: i64) -> Result<(), redb::Error> {
            self.0.push(format!("del_result_if {id} {e}"));
            Ok(())
        }
        fn del_expiry(&mut self, e: i64, id: &str) -> Result<(), redb::Error> {
            self.0.push(format!("del_expiry {e} {id}"));
            Ok(())
        }
        fn put_meta(&mut self, key: &str, value: &str) -> Result<(), redb::Error> {
            self.0.push(format!("put_meta {key} {value}"));
            Ok(())
        }
    }

    fn put_result(id: &str, expires_ms: i64, bytes: &[u8]) -> Op {
        Op::PutResult {
            id: id.into(),
            expires_ms,
            bytes: bytes.to_vec(),
        }
    }

    /// The checkpoint thresholds read `ops` and `bytes`: each op counts once, and its key and
    /// value bytes (an `Expire` its id).
    #[test]
    fn ops_and_bytes_count_what_was_folded_in() {
        let mut p = Pending::default();
        let none = |_: &str| None;
        assert!(p.is_empty());
        assert_eq!((p.ops(), p.bytes()), (0, 0));
        p.apply(Op::PutTask("abc".into(), vec![7; 10]), &none);
        assert!(!p.is_empty());
        assert_eq!((p.ops(), p.bytes()), (1, 13));
        p.apply(put_result("r", 5, &[1, 2]), &none);
        assert_eq!((p.ops(), p.bytes()), (2, 16));
        p.apply(
            Op::Expire {
                id: "xy".into(),
                expires_ms: 5,
            },
            &none,
        );
        assert_eq!((p.ops(), p.bytes()), (3, 18));
        p.apply(Op::DelTask("abc".into()), &none);
        assert_eq!((p.ops(), p.bytes()), (4, 21));
    }

    /// `Expire` deletes the result only while it still has that expiry (here, or in the older
    /// overlay of a checkpoint being written).
    #[test]
    fn expire_deletes_a_result_only_with_the_same_expiry() {
        let mut p = Pending::default();
        let stored = |id: &str| (id == "old").then_some(Some(9));
        p.apply(put_result("r", 5, b"x"), &stored);
        p.apply(
            Op::Expire {
                id: "r".into(),
                expires_ms: 4,
            },
            &stored,
        );
        assert_eq!(
            p.result("r"),
            Some(Some((5, b"x".to_vec()))),
            "rewritten since"
        );
        p.apply(
            Op::Expire {
                id: "r".into(),
                expires_ms: 5,
            },
            &stored,
        );
        assert_eq!(p.result("r"), Some(None));
        p.apply(
            Op::Expire {
                id: "old".into(),
                expires_ms: 8,
            },
            &stored,
        );
        assert_eq!(
            p.result("old"),
            None,
            "the stored result has another expiry"
        );
        p.apply(
            Op::Expire {
                id: "old".into(),
                expires_ms: 9,
            },
            &stored,
        );
        assert_eq!(p.result("old"), Some(None));
    }

    /// As the redb file's expiry index (a range up to `now_ms`, excluded): a result is listed
    /// once its expiry is strictly before `now_ms`, at most `limit` in all.
    #[test]
    fn expired_lists_results_strictly_before_now_up_to_the_limit() {
        let mut p = Pending::default();
        let none = |_: &str| None;
        for (id, e) in [("a", 10), ("b", 20), ("c", 30)] {
            p.apply(put_result(id, e, b""), &none);
        }
        let ids = |now, limit| {
            let mut out = Vec::new();
            p.expired(now, limit, &mut out);
            out.sort();
            out
        };
        assert_eq!(ids(20, 10), vec![("a".to_string(), 10)]);
        assert_eq!(ids(21, 10).len(), 2);
        assert_eq!(ids(31, 2).len(), 2);
        assert_eq!(ids(31, 0).len(), 0);
        let mut out = vec![("file".to_string(), 1)];
        p.expired(31, 2, &mut out);
        assert_eq!(out.len(), 2, "the limit counts what the file gave");
    }

    /// A checkpoint writes each key's final state once, and deletes expiry entries before it
    /// writes results.
    #[test]
    fn write_to_writes_the_final_state_of_each_key() {
        let mut p = Pending::default();
        let none = |_: &str| None;
        p.apply(Op::InsertTask("t".into(), b"1".to_vec()), &none);
        p.apply(Op::PutTask("t".into(), b"2".to_vec()), &none);
        p.apply(Op::InsertTask("gone".into(), b"1".to_vec()), &none);
        p.apply(Op::DelTask("gone".into()), &none);
        p.apply(put_result("r", 5, b"x"), &none);
        p.apply(
            Op::Expire {
                id: "r".into(),
                expires_ms: 5,
            },
            &none,
        );
        p.apply(put_result("r", 5, b"y"), &none);
        p.apply(Op::DelResult("d".into()), &none);
        p.apply(Op::PutMeta("k".into(), "v".into()), &none);
        let mut rec = Rec::default();
        p.write_to(&mut rec).expect("write_to");
        let mut got = rec.0.clone();
        let expiry_before_result = got.iter().position(|s| s.starts_with("del_expiry"))
            < got.iter().position(|s| s.starts_with("put_result"));
        assert!(expiry_before_result, "{got:?}");
        got.sort();
        assert_eq!(
            got,
            vec![
                "del_expiry 5 r",
                "del_result d",
                "del_task gone",
                "put_meta k v",
                "put_result r 5 [121]",
                "put_task t [50]",
            ]
        );
        assert_eq!(p.results_written(), 1);
        assert_eq!(p.meta("k").as_deref(), Some("v"));
        assert_eq!(p.task("t"), Some(Some(b"2".to_vec())));
        assert_eq!(p.task("gone"), Some(None));
        assert_eq!(p.task("other"), None);
    }
}
