//! In-memory backend for unit tests: the same store logic as the embedded one, without a disk.

use super::local::{Backend, LocalStore, Op};
use super::StoreError;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};

/// Plain maps behind one lock.
#[derive(Default)]
pub(crate) struct MemoryBackend {
    inner: Mutex<Tables>,
}

#[derive(Default)]
struct Tables {
    tasks: BTreeMap<String, Vec<u8>>,
    results: HashMap<String, (i64, Vec<u8>)>,
    expiry: BTreeMap<(i64, String), ()>,
    meta: HashMap<String, String>,
}

/// A store that forgets everything when dropped.
pub(crate) type MemoryStore = LocalStore<MemoryBackend>;

/// Makes an empty in-memory store.
pub(crate) fn open() -> MemoryStore {
    LocalStore::new(MemoryBackend::default())
}

impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn write(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let mut t = self.inner.lock();
        for op in ops {
            match op {
                Op::PutTask(id, b) | Op::InsertTask(id, b) => {
                    t.tasks.insert(id, b);
                }
                Op::DelTask(id) => {
                    t.tasks.remove(&id);
                }
                Op::PutResult {
                    id,
                    expires_ms,
                    bytes,
                } => {
                    t.expiry.insert((expires_ms, id.clone()), ());
                    t.results.insert(id, (expires_ms, bytes));
                }
                Op::DelResult(id) => {
                    t.results.remove(&id);
                }
                Op::PutMeta(k, v) => {
                    t.meta.insert(k, v);
                }
                Op::Expire { id, expires_ms } => {
                    t.expiry.remove(&(expires_ms, id.clone()));
                    if t.results.get(&id).is_some_and(|(e, _)| *e == expires_ms) {
                        t.results.remove(&id);
                    }
                }
            }
        }
        Ok(())
    }

    fn write_later(&self, ops: Vec<Op>) {
        // Cannot fail: the maps have no I/O.
        let _ = self.write(ops);
    }

    fn task(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.lock().tasks.get(id).cloned())
    }

    fn result(&self, id: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        Ok(self.inner.lock().results.get(id).cloned())
    }

    fn each_task(&self, f: &mut dyn FnMut(&[u8])) -> Result<(), StoreError> {
        for b in self.inner.lock().tasks.values() {
            f(b);
        }
        Ok(())
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.inner.lock().meta.get(key).cloned())
    }

    fn results_len(&self) -> Result<usize, StoreError> {
        Ok(self.inner.lock().results.len())
    }

    fn expired(&self, now_ms: i64, limit: usize) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(self
            .inner
            .lock()
            .expiry
            .keys()
            .take_while(|(e, _)| *e < now_ms)
            .take(limit)
            .map(|(e, id)| (id.clone(), *e))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_store_meets_the_contract() {
        super::super::contract::run(&super::open());
        super::super::contract::expiry(&super::open(), true);
        super::super::contract::result_cap(&super::open());
    }
}
