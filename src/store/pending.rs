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
                self.bytes += 2 * id.len();
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
