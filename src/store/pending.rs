//! Writes of the embedded store that are durable in the journal but not yet in the redb file:
//! reads look here first. A checkpoint writes the final state of each key once (a task
//! accepted, run and finished between two checkpoints costs the redb file one result), then
//! empties it.

use super::local::Op;
use std::collections::HashMap;

/// The state of every key written since the last checkpoint (`None`: deleted).
#[derive(Default, Clone)]
pub struct Pending {
    tasks: HashMap<String, Option<Vec<u8>>>,
    results: HashMap<String, Option<(i64, Vec<u8>)>>,
    /// Entries of the expiry index to delete: (expires_ms, id).
    expiry_del: Vec<(i64, String)>,
    meta: HashMap<String, String>,
    /// Ops folded in since the last checkpoint.
    ops: usize,
    /// Rough bytes held.
    bytes: usize,
}

/// What a checkpoint writes into the redb file.
pub trait Sink {
    fn put_task(&mut self, id: &str, bytes: &[u8]) -> Result<(), redb::Error>;
    fn del_task(&mut self, id: &str) -> Result<(), redb::Error>;
    fn put_result(&mut self, id: &str, expires_ms: i64, bytes: &[u8]) -> Result<(), redb::Error>;
    fn del_result(&mut self, id: &str) -> Result<(), redb::Error>;
    fn del_expiry(&mut self, expires_ms: i64, id: &str) -> Result<(), redb::Error>;
    fn put_meta(&mut self, key: &str, value: &str) -> Result<(), redb::Error>;
}

impl Pending {
    /// Folds one durable write in. `stored_expiry` gives the expiry of the result in the redb
    /// file (for `Expire`, which deletes a result only if it still has that expiry).
    pub fn apply(&mut self, op: Op, stored_expiry: &mut dyn FnMut(&str) -> Option<i64>) {
        self.ops += 1;
        match op {
            Op::PutTask(id, b) | Op::InsertTask(id, b) => {
                self.bytes += id.len() + b.len();
                self.tasks.insert(id, Some(b));
            }
            Op::DelTask(id) => {
                self.tasks.insert(id, None);
            }
            Op::PutResult {
                id,
                expires_ms,
                bytes,
            } => {
                self.bytes += id.len() + bytes.len();
                self.results.insert(id, Some((expires_ms, bytes)));
            }
            Op::DelResult(id) => {
                self.results.insert(id, None);
            }
            Op::Expire { id, expires_ms } => {
                let current = match self.results.get(&id) {
                    Some(r) => r.as_ref().map(|(e, _)| *e),
                    None => stored_expiry(&id),
                };
                if current == Some(expires_ms) {
                    self.results.insert(id.clone(), None);
                }
                self.bytes += id.len();
                self.expiry_del.push((expires_ms, id));
            }
            Op::PutMeta(k, v) => {
                self.bytes += k.len() + v.len();
                self.meta.insert(k, v);
            }
        }
    }

    /// The task's bytes if it was written since the last checkpoint (`Some(None)`: deleted).
    pub fn task(&self, id: &str) -> Option<Option<Vec<u8>>> {
        self.tasks.get(id).cloned()
    }

    /// The result if it was written since the last checkpoint (`Some(None)`: deleted).
    pub fn result(&self, id: &str) -> Option<Option<(i64, Vec<u8>)>> {
        self.results.get(id).cloned()
    }

    pub fn meta(&self, key: &str) -> Option<String> {
        self.meta.get(key).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    /// Ops folded in since the last checkpoint.
    pub fn ops(&self) -> usize {
        self.ops
    }

    /// Rough bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Writes the final state of every key. Expiry entries are deleted before results are
    /// written, so a result written again with the same expiry keeps its entry.
    pub fn write_to(&self, sink: &mut dyn Sink) -> Result<(), redb::Error> {
        for (id, t) in &self.tasks {
            match t {
                Some(b) => sink.put_task(id, b)?,
                None => sink.del_task(id)?,
            }
        }
        for (e, id) in &self.expiry_del {
            sink.del_expiry(*e, id)?;
        }
        for (id, r) in &self.results {
            match r {
                Some((e, b)) => sink.put_result(id, *e, b)?,
                None => sink.del_result(id)?,
            }
        }
        for (k, v) in &self.meta {
            sink.put_meta(k, v)?;
        }
        Ok(())
    }
}
