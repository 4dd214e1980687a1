//! The embedded store: one redb file under `--data`, written by one group-commit thread that
//! folds every waiting write into one fsynced transaction.

use super::local::{Backend, LocalStore, Op};
use super::StoreError;
use crossbeam_channel::{unbounded, Receiver, Sender};
use parking_lot::{Condvar, Mutex, RwLock};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

/// Page cache of the embedded database.
const CACHE_BYTES: usize = 48 * 1024 * 1024;

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// id -> 8 bytes of big-endian expiry (unix ms) followed by the result JSON.
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
/// 8 bytes of big-endian expiry followed by the id -> nothing; ordered by expiry.
const EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("expiry");
/// Small named values (cron last fire times).
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// Most writes folded into one transaction.
const MAX_BATCH: usize = 4096;

/// The redb file plus its writer thread.
pub struct EmbeddedBackend {
    /// `None` once closed.
    db: RwLock<Option<Arc<Database>>>,
    tx: Sender<Batch>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// What one caller hands the writer; `done` is told when it is durable. A batch with `close`
/// set ends the writer after everything queued before it.
struct Batch {
    ops: Vec<Op>,
    done: Option<Reply>,
    close: bool,
}

/// Where the writer puts one caller's commit outcome. The caller sleeps on a condvar: a
/// channel's receive spins and yields first, which on two cores takes time from the writer.
#[derive(Default)]
struct Ack {
    slot: Mutex<Option<Result<(), StoreError>>>,
    ready: Condvar,
}

impl Ack {
    fn wait(&self) -> Result<(), StoreError> {
        let mut slot = self.slot.lock();
        loop {
            if let Some(r) = slot.take() {
                return r;
            }
            self.ready.wait(&mut slot);
        }
    }
}

/// The writer's side of an `Ack`; dropped unanswered (the writer stopped), it answers
/// `Unavailable`, so no caller waits forever.
struct Reply(Option<Arc<Ack>>);

impl Reply {
    fn send(mut self, r: Result<(), StoreError>) {
        if let Some(ack) = self.0.take() {
            *ack.slot.lock() = Some(r);
            ack.ready.notify_one();
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(ack) = self.0.take() {
            *ack.slot.lock() = Some(Err(unavailable("the writer thread has stopped")));
            ack.ready.notify_one();
        }
    }
}

/// The embedded store.
pub type EmbeddedStore = LocalStore<EmbeddedBackend>;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Opens (or creates) `<dir>/poulpe.redb` and starts the writer thread.
pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| unavailable(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join("poulpe.redb");
    // redb's default page cache is 1 GiB, which would hold most of a big file in memory; the
    // hot pages of a job queue (recent inserts, due and running tasks) fit in much less.
    let db = redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(&path)
        .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
    let txn = db.begin_write().map_err(unavailable)?;
    {
        txn.open_table(TASKS).map_err(unavailable)?;
        txn.open_table(RESULTS).map_err(unavailable)?;
        txn.open_table(EXPIRY).map_err(unavailable)?;
        txn.open_table(META).map_err(unavailable)?;
    }
    txn.commit().map_err(unavailable)?;
    let db = Arc::new(db);
    let (tx, rx) = unbounded();
    let writer_db = db.clone();
    let handle = thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || writer(&writer_db, &rx))
        .map_err(unavailable)?;
    Ok(LocalStore::new(EmbeddedBackend {
        db: RwLock::new(Some(db)),
        tx,
        writer: Mutex::new(Some(handle)),
    }))
}

fn expiry_key(expires_ms: i64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    k.extend_from_slice(&(expires_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

fn split_result(v: &[u8]) -> Option<(i64, &[u8])> {
    let (head, rest) = v.split_at_checked(8)?;
    let e = u64::from_be_bytes(head.try_into().ok()?);
    Some((e as i64, rest))
}

/// Group commit: takes everything waiting, writes it in one transaction, tells every caller.
fn writer(db: &Database, rx: &Receiver<Batch>) {
    let mut closing = false;
    while !closing {
        let Ok(first) = rx.recv() else { return };
        closing = first.close;
        let mut batches = vec![first];
        let mut n = batches[0].ops.len();
        while n < MAX_BATCH && !closing {
            match rx.try_recv() {
                Ok(b) => {
                    n += b.ops.len();
                    closing = b.close;
                    batches.push(b);
                }
                Err(_) => break,
            }
        }
        let res = apply(db, &batches);
        if let Err(e) = &res {
            log::error!("store: commit of {n} writes failed: {e}");
        }
        for b in batches {
            if let Some(done) = b.done {
                done.send(res.clone());
            }
        }
    }
}

fn apply(db: &Database, batches: &[Batch]) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(unavailable)?;
    {
        let mut tasks = txn.open_table(TASKS).map_err(unavailable)?;
        let mut results = txn.open_table(RESULTS).map_err(unavailable)?;
        let mut expiry = txn.open_table(EXPIRY).map_err(unavailable)?;
        let mut meta = txn.open_table(META).map_err(unavailable)?;
        for op in batches.iter().flat_map(|b| b.ops.iter()) {
            match op {
                Op::PutTask(id, bytes) => {
                    tasks
                        .insert(id.as_str(), bytes.as_slice())
                        .map_err(unavailable)?;
                }
                Op::DelTask(id) => {
                    tasks.remove(id.as_str()).map_err(unavailable)?;
                }
                Op::PutResult {
                    id,
                    expires_ms,
                    bytes,
                } => {
                    let mut v = Vec::with_capacity(8 + bytes.len());
                    v.extend_from_slice(&(*expires_ms.max(&0) as u64).to_be_bytes());
                    v.extend_from_slice(bytes);
                    results
                        .insert(id.as_str(), v.as_slice())
                        .map_err(unavailable)?;
                    expiry
                        .insert(expiry_key(*expires_ms, id).as_slice(), ())
                        .map_err(unavailable)?;
                }
                Op::DelResult(id) => {
                    results.remove(id.as_str()).map_err(unavailable)?;
                }
                Op::PutMeta(k, v) => {
                    meta.insert(k.as_str(), v.as_str()).map_err(unavailable)?;
                }
                Op::Expire { id, expires_ms } => {
                    expiry
                        .remove(expiry_key(*expires_ms, id).as_slice())
                        .map_err(unavailable)?;
                    let same = results
                        .get(id.as_str())
                        .map_err(unavailable)?
                        .and_then(|g| split_result(g.value()).map(|(e, _)| e == *expires_ms))
                        .unwrap_or(false);
                    if same {
                        results.remove(id.as_str()).map_err(unavailable)?;
                    }
                }
            }
        }
    }
    txn.commit().map_err(unavailable)
}

impl EmbeddedBackend {
    fn begin_read(&self) -> Result<redb::ReadTransaction, StoreError> {
        let db = self.db.read();
        let db = db
            .as_ref()
            .ok_or_else(|| unavailable("the store is closed"))?;
        db.begin_read().map_err(unavailable)
    }
}

impl Backend for EmbeddedBackend {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn write(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let ack = Arc::new(Ack::default());
        self.tx
            .send(Batch {
                ops,
                done: Some(Reply(Some(ack.clone()))),
                close: false,
            })
            .map_err(|_| unavailable("the writer thread has stopped"))?;
        ack.wait()
    }

    fn write_later(&self, ops: Vec<Op>) {
        let later = Batch {
            ops,
            done: None,
            close: false,
        };
        if self.tx.send(later).is_err() {
            log::warn!("store: the writer thread has stopped; a state mark was not written");
        }
    }

    fn close(&self) {
        let _ = self.tx.send(Batch {
            ops: Vec::new(),
            done: None,
            close: true,
        });
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
        // The last reference: redb marks the file cleanly closed, so the next open needs no
        // repair scan.
        if let Some(db) = self.db.write().take() {
            match Arc::try_unwrap(db) {
                Ok(db) => drop(db),
                Err(_) => log::warn!("store: the database is still in use; not closed cleanly"),
            }
        }
    }

    fn task(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(TASKS).map_err(unavailable)?;
        Ok(t.get(id).map_err(unavailable)?.map(|g| g.value().to_vec()))
    }

    fn result(&self, id: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(RESULTS).map_err(unavailable)?;
        let Some(g) = t.get(id).map_err(unavailable)? else {
            return Ok(None);
        };
        match split_result(g.value()) {
            Some((e, rest)) => Ok(Some((e, rest.to_vec()))),
            None => Err(StoreError::Corrupt(format!("result {id:?} is truncated"))),
        }
    }

    fn each_task(&self, f: &mut dyn FnMut(&[u8])) -> Result<(), StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(TASKS).map_err(unavailable)?;
        for item in t.iter().map_err(unavailable)? {
            let (_, v) = item.map_err(unavailable)?;
            f(v.value());
        }
        Ok(())
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(META).map_err(unavailable)?;
        Ok(t.get(key)
            .map_err(unavailable)?
            .map(|g| g.value().to_string()))
    }

    fn expired(&self, now_ms: i64, limit: usize) -> Result<Vec<(String, i64)>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(EXPIRY).map_err(unavailable)?;
        let upper = (now_ms.max(0) as u64).to_be_bytes();
        let mut out = Vec::new();
        for item in t.range::<&[u8]>(..upper.as_slice()).map_err(unavailable)? {
            let (k, _) = item.map_err(unavailable)?;
            let k = k.value();
            if let Some((e, id)) = split_result(k) {
                out.push((String::from_utf8_lossy(id).into_owned(), e));
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::{run, task};
    use crate::store::Store;
    use crate::task::State;

    #[test]
    fn embedded_store_meets_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        run(&open(dir.path()).expect("open"));
        let dir = tempfile::tempdir().expect("tempdir");
        crate::store::contract::expiry(&open(dir.path()).expect("open"), true);
    }

    #[test]
    fn unfinished_tasks_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = open(dir.path()).expect("open");
            s.insert(&[task("r", State::Ready, 1), task("d", State::Delayed, 99)])
                .expect("insert");
            assert!(s.claim(&task("r", State::Ready, 1)).expect("claim"));
            // Make sure the running mark is committed before the store goes away.
            s.insert(&[task("x", State::Ready, 2)]).expect("insert");
        }
        // redb allows one open handle per file; wait for the old writer to let go.
        let s = loop {
            match open(dir.path()) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        let mut rec = s.recover().expect("recover");
        rec.sort_by(|a, b| a.id.cmp(&b.id));
        let got: Vec<(&str, u64, bool)> = rec
            .iter()
            .map(|r| (&*r.id, r.due_us, r.was_running))
            .collect();
        assert_eq!(got, vec![("d", 99, false), ("r", 1, true), ("x", 2, false)]);
        // Recovered tasks are waiting for the timer, which hands them out once.
        assert!(s.take_due("r").expect("take").is_some());
        assert!(s.take_due("r").expect("take").is_none());
        assert_eq!(
            s.insert(&[task("d", State::Ready, 0)]),
            Err(StoreError::Duplicate("d".into()))
        );
    }

    #[test]
    fn close_writes_queued_marks_refuses_later_calls_and_frees_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path()).expect("open");
        s.insert(&[task("a", State::Ready, 1)]).expect("insert");
        // The running mark is written asynchronously; close must still persist it.
        assert!(s.claim(&task("a", State::Ready, 1)).expect("claim"));
        s.close();
        assert!(matches!(s.get_meta("k"), Err(StoreError::Unavailable(_))));
        assert!(matches!(
            s.insert(&[task("b", State::Ready, 1)]),
            Err(StoreError::Unavailable(_))
        ));
        // The file is released at once: no retry loop needed to open it again.
        let again = open(dir.path()).expect("reopen right after close");
        let rec = again.recover().expect("recover");
        let got: Vec<(&str, bool)> = rec.iter().map(|r| (&*r.id, r.was_running)).collect();
        assert_eq!(got, vec![("a", true)]);
    }
}
