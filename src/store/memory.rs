//! In-memory backend for unit tests: the same store logic as the embedded one, without a disk.

use super::local::{expiry_key, split_expiry_key, Backend, LocalStore, Op};
use super::StoreError;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Plain maps behind one lock.
#[derive(Default)]
pub(crate) struct MemoryBackend {
    inner: Mutex<Tables>,
    /// While set, every write fails with `Unavailable` and changes nothing (an outage).
    fail_writes: Arc<AtomicBool>,
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

/// An empty in-memory store whose writes fail while `fail_writes` is set.
pub fn open_failing(fail_writes: Arc<AtomicBool>) -> MemoryStore {
    LocalStore::new(MemoryBackend {
        fail_writes,
        ..MemoryBackend::default()
    })
}

impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn write(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("writes fail".into()));
        }
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

    fn keys(&self, results: bool, from: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let t = self.inner.lock();
        if !results {
            return Ok(t
                .tasks
                .range::<str, _>((Bound::Excluded(from), Bound::Unbounded))
                .take(limit)
                .map(|(k, _)| k.clone())
                .collect());
        }
        let upper = match split_expiry_key(from) {
            Some((e, id)) => Bound::Excluded((e, id.to_string())),
            None => Bound::Unbounded,
        };
        Ok(t.expiry
            .range((Bound::Unbounded, upper))
            .rev()
            .take(limit)
            .map(|((e, id), ())| expiry_key(*e, id))
            .collect())
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
pub(crate) mod tests {
    use crate::store::contract::task;
    use crate::store::{Cancel, Store, StoreError};
    use crate::task::State;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A cancel whose delete cannot be written cancels nothing: the task still waits, is still
    /// handed out when due, and can be cancelled once the store is back.
    #[test]
    fn a_cancel_that_cannot_be_written_leaves_the_task_waiting() {
        let fail = Arc::new(AtomicBool::new(false));
        let store = super::open_failing(fail.clone());
        store
            .insert(&[task("t", State::Delayed, 5), task("u", State::Delayed, 5)])
            .expect("insert");
        fail.store(true, Ordering::SeqCst);
        assert!(matches!(
            store.cancel("t", 0),
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.cancel("u", 0),
            Err(StoreError::Unavailable(_))
        ));
        fail.store(false, Ordering::SeqCst);
        assert_eq!(store.status("t").expect("status"), Some(State::Delayed));
        let due = store.take_due("t", 5).expect("take_due");
        assert_eq!(due.map(|t| t.id), Some("t".to_string()), "still handed out");
        assert!(matches!(
            store.cancel("u", 0).expect("cancel"),
            Cancel::Cancelled { .. }
        ));
    }

    /// Log lines of the current thread, kept by a logger installed for the test binary (used by
    /// the Redis store's tests too).
    pub(crate) mod capture {
        use parking_lot::Mutex;
        use std::thread::ThreadId;

        static LINES: Mutex<Vec<(ThreadId, String)>> = Mutex::new(Vec::new());

        struct Capture;

        impl log::Log for Capture {
            fn enabled(&self, _: &log::Metadata) -> bool {
                true
            }
            fn log(&self, r: &log::Record) {
                LINES
                    .lock()
                    .push((std::thread::current().id(), r.args().to_string()));
            }
            fn flush(&self) {}
        }

        static LOGGER: Capture = Capture;

        /// Installs the logger (once per test binary; later calls do nothing).
        pub fn install() {
            if log::set_logger(&LOGGER).is_ok() {
                log::set_max_level(log::LevelFilter::Trace);
            }
        }

        /// The lines this thread logged so far.
        pub fn mine() -> Vec<String> {
            of(std::thread::current().id())
        }

        /// The lines `thread` logged so far.
        pub fn of(thread: ThreadId) -> Vec<String> {
            LINES
                .lock()
                .iter()
                .filter(|(t, _)| *t == thread)
                .map(|(_, l)| l.clone())
                .collect()
        }
    }

    /// A stored task that cannot be decoded is skipped at recovery (the others are recovered)
    /// and counted in an error line; a clean recovery logs no such line.
    #[test]
    fn undecodable_stored_tasks_are_skipped_and_counted_in_the_log() {
        use super::super::local::{Backend, LocalStore, Op};
        capture::install();
        let good = serde_json::to_vec(&task("good", State::Delayed, 5)).expect("encode");
        let backend = super::MemoryBackend::default();
        backend
            .write(vec![
                Op::PutTask("bad".into(), b"not json".to_vec()),
                Op::PutTask("good".into(), good.clone()),
            ])
            .expect("write");
        let rec = LocalStore::new(backend).recover().expect("recover");
        let ids: Vec<&str> = rec.iter().map(|r| &*r.id).collect();
        assert_eq!(ids, vec!["good"]);
        let undecodable = |lines: Vec<String>| -> Vec<String> {
            lines
                .into_iter()
                .filter(|l| l.contains("could not be decoded"))
                .collect()
        };
        assert_eq!(
            undecodable(capture::mine()),
            vec!["store: 1 stored tasks could not be decoded and were skipped".to_string()]
        );
        let clean = super::MemoryBackend::default();
        clean
            .write(vec![Op::PutTask("good".into(), good)])
            .expect("write");
        assert_eq!(LocalStore::new(clean).recover().expect("recover").len(), 1);
        assert_eq!(
            undecodable(capture::mine()).len(),
            1,
            "no line for a recovery that skipped nothing"
        );
    }

    /// One `gc` call deletes at most one pass of results beyond the cap, however many there are
    /// (so that it never holds up intake for long); the next calls go on.
    #[test]
    fn a_gc_call_deletes_at_most_one_pass_beyond_the_cap() {
        use crate::store::contract::result;
        use crate::store::{Change, GC_PASS};
        let store = super::open();
        let later = crate::clock::now_ms() + 3_600_000;
        let changes: Vec<Change> = (0..2 * GC_PASS + GC_PASS / 2)
            .map(|i| Change::Finish {
                result: result(&format!("r{i}")),
                expires_ms: later,
                task: None,
            })
            .collect();
        store.record(&changes).expect("record");
        let now = crate::clock::now_ms();
        assert_eq!(store.gc(now, 0).expect("gc"), GC_PASS);
        assert_eq!(store.gc(now, 0).expect("gc"), GC_PASS);
        assert_eq!(store.gc(now, 0).expect("gc"), GC_PASS / 2);
        assert_eq!(store.results_stored().expect("count"), 0);
    }

    #[test]
    fn memory_store_meets_the_contract() {
        super::super::contract::run(&super::open());
        super::super::contract::expiry(&super::open(), true);
        super::super::contract::result_cap(&super::open());
        super::super::contract::summary_counts(&super::open());
        super::super::contract::browse(&super::open());
        super::super::contract::cc_claims(&super::open());
        super::super::contract::insert_many(&super::open());
    }
}
