//! The embedded store: one redb file under `--data`, written by one group-commit thread that
//! folds every waiting write into one fsynced transaction.
//!
//! After an I/O error (a full disk, a failing device) redb refuses every later call until the
//! database is closed and opened again. The writer thread then takes the store down — writes,
//! claims and releases of due tasks fail with `Unavailable`, `healthy()` is false — closes the
//! file and, every second, checks that the disk takes writes again and reopens it (redb repairs
//! the file back to its last durable commit: nothing acknowledged is lost).

use super::local::{Backend, LocalStore, Op};
use super::StoreError;
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use parking_lot::{Condvar, Mutex, RwLock};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Page cache of the embedded database.
const CACHE_BYTES: usize = 48 * 1024 * 1024;

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// id -> 8 bytes of big-endian expiry (unix ms) followed by the result JSON.
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
/// 8 bytes of big-endian expiry followed by the id -> nothing; ordered by expiry.
const EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("expiry");
/// Small named values (cron last fire times).
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// The database file's name inside `--data`.
const FILE: &str = "poulpe.redb";
/// Files smaller than this are not worth compacting at start.
const COMPACT_FROM_BYTES: u64 = 16 * 1024 * 1024;

/// Most writes folded into one transaction.
const MAX_BATCH: usize = 4096;

/// How often a store that is down after an I/O error tries to reopen its file.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// Bytes written (and fsynced, then deleted) next to the database before a reopen: the disk
/// must have at least this much room again.
const PROBE_BYTES: usize = 256 * 1024;

/// Opens the database (at start, and again after an I/O error) and makes sure its tables exist.
type OpenFn = dyn Fn() -> Result<Database, StoreError> + Send + Sync;

/// The redb file plus its writer thread.
pub struct EmbeddedBackend {
    shared: Arc<Shared>,
    tx: Sender<Batch>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// What the callers and the writer thread share.
struct Shared {
    db: RwLock<Slot>,
    /// False from an I/O error until the database is open again.
    up: AtomicBool,
    /// Why the store is down, for the callers' errors.
    why: Mutex<String>,
    /// Set at shutdown: no reopening, and a plain "closed" error.
    closed: AtomicBool,
    /// How many times the database has been reopened: a read that began on an older handle
    /// does not take the new one down.
    generation: AtomicU64,
    open: Box<OpenFn>,
    /// Where the free-space probe is written before a reopen (`None`: no probe).
    probe_dir: Option<PathBuf>,
}

/// The database handle, or why there is none.
enum Slot {
    Open(Arc<Database>),
    /// Closed after an I/O error; the writer opens it again.
    Reopening,
    /// Closed at shutdown.
    Closed,
}

impl Shared {
    /// The error every call gets while the store is down.
    fn down_error(&self) -> StoreError {
        if self.closed.load(Ordering::Acquire) {
            return unavailable("the store is closed");
        }
        unavailable(format!(
            "{}; the store reopens itself once the disk accepts writes again",
            self.why.lock()
        ))
    }

    /// The open database, for one writer batch.
    fn current(&self) -> Result<Arc<Database>, StoreError> {
        match &*self.db.read() {
            Slot::Open(db) => Ok(db.clone()),
            Slot::Reopening => Err(self.down_error()),
            Slot::Closed => Err(unavailable("the store is closed")),
        }
    }

    /// Marks the store down after `e`; the first caller gets true (and must tell the writer).
    fn mark_down(&self, e: &redb::Error) -> bool {
        let was_up = self.up.swap(false, Ordering::AcqRel);
        if was_up {
            *self.why.lock() = format!("the disk refused a write or read ({e})");
            log::error!("store: I/O error on the database file: {e}; the store is down until it can be reopened");
        }
        was_up
    }

    /// Closes the database handle (redb requires it after an I/O error).
    fn close_db(&self) {
        let old = std::mem::replace(&mut *self.db.write(), Slot::Reopening);
        if let Slot::Open(db) = old {
            match Arc::try_unwrap(db) {
                Ok(db) => {
                    if let Err(e) = db.close() {
                        log::debug!("store: closing the failed database: {e}");
                    }
                }
                Err(_) => log::warn!(
                    "store: the failed database is still referenced; it is reopened once released"
                ),
            }
        }
    }

    /// Checks that the disk takes writes again, opens the database again and removes the new
    /// tasks of failed commits (`refused`) that reached the disk all the same: their submitters
    /// were told that nothing was accepted.
    fn reopen(&self, refused: &[String]) -> Result<(), StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(unavailable("the store is closed"));
        }
        if let Some(dir) = &self.probe_dir {
            probe(dir)?;
        }
        let db = (self.open)()?;
        if !refused.is_empty() {
            let removed = undo_inserts(&db, refused).map_err(unavailable)?;
            if removed > 0 {
                log::warn!(
                    "store: {removed} refused tasks had reached the disk in a failed commit; removed"
                );
            }
        }
        let mut slot = self.db.write();
        *slot = Slot::Open(Arc::new(db));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.up.store(true, Ordering::Release);
        Ok(())
    }
}

/// Writes, fsyncs and deletes `PROBE_BYTES` in `dir`: fails while the disk is full.
fn probe(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join("poulpe.probe");
    let res = std::fs::File::create(&path).and_then(|mut f| {
        // A heap buffer: a `&[0u8; PROBE_BYTES]` literal would be a 256 KiB constant in the binary.
        f.write_all(&vec![0u8; PROBE_BYTES])?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&path);
    res.map_err(|e| unavailable(format!("the disk does not take writes yet: {e}")))
}

/// Whether redb refuses every later call after `e` (until the database is reopened).
fn broken(e: &redb::Error) -> bool {
    matches!(
        e,
        redb::Error::Io(_)
            | redb::Error::Backend(_)
            | redb::Error::PreviousIo
            | redb::Error::LockPoisoned(_)
    )
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
    let path = dir.join(FILE);
    let first = AtomicBool::new(true);
    let open_file = move || {
        // redb's default page cache is 1 GiB, which would hold most of a big file in memory;
        // the hot pages of a job queue (recent inserts, due and running tasks) fit in much less.
        let mut db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
        if first.swap(false, Ordering::AcqRel) {
            compact_if_sparse(&mut db, &path);
        }
        create_tables(db)
    };
    start(Box::new(open_file), Some(dir.to_path_buf()))
}

/// The file does not shrink by itself: space freed by expired results is reused, not given
/// back. At start, when more than half of a file of some size is free, it is compacted.
fn compact_if_sparse(db: &mut Database, path: &Path) {
    let Ok(before) = std::fs::metadata(path).map(|m| m.len()) else {
        return;
    };
    if before < COMPACT_FROM_BYTES {
        return;
    }
    let used = match db.begin_write().map_err(redb::Error::from).and_then(|txn| {
        let stats = txn.stats().map_err(redb::Error::from);
        txn.abort().map_err(redb::Error::from)?;
        stats
    }) {
        Ok(stats) => stats.allocated_pages() * stats.page_size() as u64,
        Err(e) => {
            log::warn!("store: cannot measure {}: {e}", path.display());
            return;
        }
    };
    if used.saturating_mul(2) >= before {
        return;
    }
    let t0 = Instant::now();
    match db.compact() {
        Ok(_) => {
            let after = std::fs::metadata(path).map(|m| m.len()).unwrap_or(before);
            log::info!(
                "store: compacted {}: {before} -> {after} bytes ({} MB reclaimed) in {} ms",
                path.display(),
                before.saturating_sub(after) / 1_000_000,
                t0.elapsed().as_millis()
            );
        }
        Err(e) => log::warn!("store: cannot compact {}: {e}", path.display()),
    }
}

/// Makes sure every table exists (one small commit).
fn create_tables(db: Database) -> Result<Database, StoreError> {
    let txn = db.begin_write().map_err(unavailable)?;
    {
        txn.open_table(TASKS).map_err(unavailable)?;
        txn.open_table(RESULTS).map_err(unavailable)?;
        txn.open_table(EXPIRY).map_err(unavailable)?;
        txn.open_table(META).map_err(unavailable)?;
    }
    txn.commit().map_err(unavailable)?;
    Ok(db)
}

/// Opens the database with `open` and starts the writer thread.
fn start(open: Box<OpenFn>, probe_dir: Option<PathBuf>) -> Result<EmbeddedStore, StoreError> {
    let db = open()?;
    let shared = Arc::new(Shared {
        db: RwLock::new(Slot::Open(Arc::new(db))),
        up: AtomicBool::new(true),
        why: Mutex::new(String::new()),
        closed: AtomicBool::new(false),
        generation: AtomicU64::new(0),
        open,
        probe_dir,
    });
    let (tx, rx) = unbounded();
    let writer_shared = shared.clone();
    // Its death would leave every write waiting: a panic there ends the process.
    let handle = crate::stage::spawn_critical("store-writer", move || writer(&writer_shared, &rx))
        .map_err(unavailable)?;
    Ok(LocalStore::new(EmbeddedBackend {
        shared,
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
/// After an I/O error it closes the database, answers every write with `Unavailable` and tries
/// to reopen it every `REOPEN_EVERY` until that works.
fn writer(shared: &Shared, rx: &Receiver<Batch>) {
    // Set while the store is down: when to try reopening next.
    let mut reopen_at: Option<Instant> = None;
    let mut failed_reopens = 0u32;
    // New tasks of commits that failed after an I/O error: refused to their submitters, maybe
    // on disk all the same; removed at the reopen.
    let mut refused: Vec<String> = Vec::new();
    loop {
        if reopen_at.is_none() && !shared.up.load(Ordering::Acquire) {
            // A read found the file broken.
            shared.close_db();
            reopen_at = Some(Instant::now());
        }
        if let Some(at) = reopen_at {
            if Instant::now() >= at {
                match shared.reopen(&refused) {
                    Ok(()) => {
                        refused.clear();
                        log::info!("store: database reopened; the store is up again");
                        reopen_at = None;
                        failed_reopens = 0;
                    }
                    Err(e) => {
                        failed_reopens += 1;
                        if failed_reopens == 1 {
                            log::warn!("store: cannot reopen the database yet: {e}; trying again every {REOPEN_EVERY:?}");
                        } else {
                            log::debug!("store: reopen attempt {failed_reopens} failed: {e}");
                        }
                        reopen_at = Some(Instant::now() + REOPEN_EVERY);
                    }
                }
            }
        }
        let first = match reopen_at {
            None => match rx.recv() {
                Ok(b) => b,
                Err(_) => return,
            },
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(b) => b,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            },
        };
        let mut closing = first.close;
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
        let res = if reopen_at.is_some() {
            Err(shared.down_error())
        } else if n == 0 {
            Ok(())
        } else {
            match shared.current() {
                Ok(db) => match apply(&db, &batches) {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        log::error!("store: commit of {n} writes failed: {e}");
                        if broken(&e) {
                            refused.extend(batches.iter().flat_map(|b| &b.ops).filter_map(|op| {
                                match op {
                                    Op::InsertTask(id, _) => Some(id.clone()),
                                    _ => None,
                                }
                            }));
                            shared.mark_down(&e);
                            drop(db);
                            shared.close_db();
                            reopen_at = Some(Instant::now() + REOPEN_EVERY);
                            Err(shared.down_error())
                        } else {
                            Err(unavailable(e))
                        }
                    }
                },
                Err(e) => Err(e),
            }
        };
        for b in batches {
            if let Some(done) = b.done {
                done.send(res.clone());
            }
        }
        if closing {
            return;
        }
    }
}

/// Deletes these tasks; how many were there.
fn undo_inserts(db: &Database, ids: &[String]) -> Result<usize, redb::Error> {
    let txn = db.begin_write()?;
    let mut removed = 0;
    {
        let mut tasks = txn.open_table(TASKS)?;
        for id in ids {
            if tasks.remove(id.as_str())?.is_some() {
                removed += 1;
            }
        }
    }
    txn.commit()?;
    Ok(removed)
}

fn apply(db: &Database, batches: &[Batch]) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut tasks = txn.open_table(TASKS)?;
        let mut results = txn.open_table(RESULTS)?;
        let mut expiry = txn.open_table(EXPIRY)?;
        let mut meta = txn.open_table(META)?;
        for op in batches.iter().flat_map(|b| b.ops.iter()) {
            match op {
                Op::PutTask(id, bytes) | Op::InsertTask(id, bytes) => {
                    tasks.insert(id.as_str(), bytes.as_slice())?;
                }
                Op::DelTask(id) => {
                    tasks.remove(id.as_str())?;
                }
                Op::PutResult {
                    id,
                    expires_ms,
                    bytes,
                } => {
                    let mut v = Vec::with_capacity(8 + bytes.len());
                    v.extend_from_slice(&(*expires_ms.max(&0) as u64).to_be_bytes());
                    v.extend_from_slice(bytes);
                    results.insert(id.as_str(), v.as_slice())?;
                    expiry.insert(expiry_key(*expires_ms, id).as_slice(), ())?;
                }
                Op::DelResult(id) => {
                    results.remove(id.as_str())?;
                }
                Op::PutMeta(k, v) => {
                    meta.insert(k.as_str(), v.as_str())?;
                }
                Op::Expire { id, expires_ms } => {
                    expiry.remove(expiry_key(*expires_ms, id).as_slice())?;
                    let same = results
                        .get(id.as_str())?
                        .and_then(|g| split_result(g.value()).map(|(e, _)| e == *expires_ms))
                        .unwrap_or(false);
                    if same {
                        results.remove(id.as_str())?;
                    }
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

impl EmbeddedBackend {
    /// Runs one read on the open database; an I/O error takes the store down and wakes the
    /// writer, which reopens it.
    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let (txn, generation) = {
            let slot = self.shared.db.read();
            let generation = self.shared.generation.load(Ordering::Acquire);
            match &*slot {
                Slot::Open(db) => (db.begin_read().map_err(redb::Error::from), generation),
                Slot::Reopening => return Err(self.shared.down_error()),
                Slot::Closed => return Err(unavailable("the store is closed")),
            }
        };
        match txn.and_then(|txn| f(&txn)) {
            Ok(v) => Ok(v),
            Err(e) if broken(&e) => {
                // Under the slot lock, so that no reopen comes between the check and the mark.
                let first = {
                    let _slot = self.shared.db.read();
                    self.shared.generation.load(Ordering::Acquire) == generation
                        && self.shared.mark_down(&e)
                };
                if first {
                    // Wake the writer (it may be waiting for work) so that it reopens the file.
                    let _ = self.tx.send(Batch {
                        ops: Vec::new(),
                        done: None,
                        close: false,
                    });
                }
                Err(self.shared.down_error())
            }
            Err(e) => Err(unavailable(e)),
        }
    }
}

impl Backend for EmbeddedBackend {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn healthy(&self) -> bool {
        self.shared.up.load(Ordering::Acquire)
    }

    fn write(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        if !self.healthy() {
            return Err(self.shared.down_error());
        }
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
        self.shared.closed.store(true, Ordering::Release);
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
        let old = std::mem::replace(&mut *self.shared.db.write(), Slot::Closed);
        if let Slot::Open(db) = old {
            match Arc::try_unwrap(db) {
                Ok(db) => drop(db),
                Err(_) => log::warn!("store: the database is still in use; not closed cleanly"),
            }
        }
        self.shared.up.store(false, Ordering::Release);
    }

    fn task(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(TASKS)?;
            Ok(t.get(id)?.map(|g| g.value().to_vec()))
        })
    }

    fn result(&self, id: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        let raw = self.read(|txn| {
            let t = txn.open_table(RESULTS)?;
            Ok(t.get(id)?.map(|g| g.value().to_vec()))
        })?;
        let Some(v) = raw else { return Ok(None) };
        match split_result(&v) {
            Some((e, rest)) => Ok(Some((e, rest.to_vec()))),
            None => Err(StoreError::Corrupt(format!("result {id:?} is truncated"))),
        }
    }

    fn each_task(&self, f: &mut dyn FnMut(&[u8])) -> Result<(), StoreError> {
        self.read(|txn| {
            let t = txn.open_table(TASKS)?;
            for item in t.iter()? {
                let (_, v) = item?;
                f(v.value());
            }
            Ok(())
        })
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(META)?;
            Ok(t.get(key)?.map(|g| g.value().to_string()))
        })
    }

    fn results_len(&self) -> Result<usize, StoreError> {
        self.read(|txn| Ok(txn.open_table(RESULTS)?.len()? as usize))
    }

    fn data_bytes(&self) -> Option<u64> {
        let dir = self.shared.probe_dir.as_ref()?;
        std::fs::metadata(dir.join(FILE)).ok().map(|m| m.len())
    }

    fn expired(&self, now_ms: i64, limit: usize) -> Result<Vec<(String, i64)>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(EXPIRY)?;
            let upper = (now_ms.max(0) as u64).to_be_bytes();
            let mut out = Vec::new();
            for item in t.range::<&[u8]>(..upper.as_slice())? {
                let (k, _) = item?;
                let k = k.value();
                if let Some((e, id)) = split_result(k) {
                    out.push((String::from_utf8_lossy(id).into_owned(), e));
                }
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::{result, run, task};
    use crate::store::{Change, Store};
    use crate::task::State;

    #[test]
    fn embedded_store_meets_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        run(&open(dir.path()).expect("open"));
        let dir = tempfile::tempdir().expect("tempdir");
        crate::store::contract::expiry(&open(dir.path()).expect("open"), true);
        let dir = tempfile::tempdir().expect("tempdir");
        crate::store::contract::result_cap(&open(dir.path()).expect("open"));
        let dir = tempfile::tempdir().expect("tempdir");
        crate::store::contract::summary_counts(&open(dir.path()).expect("open"));
    }

    #[test]
    fn a_mostly_free_file_is_compacted_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(FILE);
        let now = crate::clock::now_ms();
        {
            let s = open(dir.path()).expect("open");
            let mut big = result("big");
            big.output = "x".repeat(16 * 1024);
            for chunk in 0..20 {
                let changes: Vec<Change> = (0..100)
                    .map(|i| {
                        let mut r = big.clone();
                        r.id = format!("b{chunk}-{i}");
                        Change::Finish {
                            result: r,
                            expires_ms: now + 60_000,
                        }
                    })
                    .collect();
                s.record(&changes).expect("record");
            }
            s.record(&[Change::Finish {
                result: result("kept"),
                expires_ms: now + 60_000,
            }])
            .expect("record");
            while s.gc(now, 1).expect("gc") > 0 {}
            assert_eq!(s.results_stored().expect("count"), 1);
            s.close();
        }
        let before = std::fs::metadata(&file).expect("file").len();
        assert!(before > 2 * COMPACT_FROM_BYTES, "{before} bytes written");
        let s = open(dir.path()).expect("reopen");
        let after = std::fs::metadata(&file).expect("file").len();
        assert!(after * 2 < before, "compacted: {before} -> {after} bytes");
        assert_eq!(s.result("kept").expect("result"), Some(result("kept")));
        s.close();
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

    /// redb's in-memory storage, kept across reopens, whose writes fail while `full` is set
    /// (as a full disk's would).
    #[derive(Debug)]
    struct Flaky {
        inner: Arc<redb::backends::InMemoryBackend>,
        full: Arc<AtomicBool>,
        /// Only fsync fails (the writes themselves go through), as with EIO at the end.
        sync_fails: Arc<AtomicBool>,
    }

    impl Flaky {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.full.load(Ordering::SeqCst) {
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            } else {
                Ok(())
            }
        }
    }

    impl redb::StorageBackend for Flaky {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.check()?;
            if self.sync_fails.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    fn flaky_store(
        inner: &Arc<redb::backends::InMemoryBackend>,
        full: &Arc<AtomicBool>,
    ) -> EmbeddedStore {
        flaky_store_with(inner, full, &Arc::new(AtomicBool::new(false)))
    }

    fn flaky_store_with(
        inner: &Arc<redb::backends::InMemoryBackend>,
        full: &Arc<AtomicBool>,
        sync_fails: &Arc<AtomicBool>,
    ) -> EmbeddedStore {
        let (inner, full, sync_fails) = (inner.clone(), full.clone(), sync_fails.clone());
        let open_db = move || {
            let backend = Flaky {
                inner: inner.clone(),
                full: full.clone(),
                sync_fails: sync_fails.clone(),
            };
            let db = redb::Builder::new()
                .create_with_backend(backend)
                .map_err(unavailable)?;
            create_tables(db)
        };
        start(Box::new(open_db), None).expect("open")
    }

    #[test]
    fn a_refused_insert_that_reached_the_disk_is_undone_at_the_reopen() {
        let inner = Arc::new(redb::backends::InMemoryBackend::new());
        let (full, sync_fails) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let s = flaky_store_with(&inner, &full, &sync_fails);
        s.insert(&[task("kept", State::Delayed, 1)])
            .expect("insert");
        sync_fails.store(true, Ordering::SeqCst);
        let refused = s.insert(&[task("refused", State::Delayed, 2)]);
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "{refused:?}"
        );
        sync_fails.store(false, Ordering::SeqCst);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !s.healthy() {
            assert!(std::time::Instant::now() < end, "the store did not reopen");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        s.close();
        let again = flaky_store_with(&inner, &full, &sync_fails);
        let rec: Vec<String> = again
            .recover()
            .expect("recover")
            .iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(rec, vec!["kept"], "a task refused with 503 must not run");
    }

    #[test]
    fn after_an_io_error_the_store_is_down_then_reopens_without_losing_anything() {
        let inner = Arc::new(redb::backends::InMemoryBackend::new());
        let full = Arc::new(AtomicBool::new(false));
        let s = flaky_store(&inner, &full);
        s.insert(&[
            task("run", State::Ready, 1),
            task("wait", State::Delayed, 9),
        ])
        .expect("insert");
        assert!(s.claim(&task("run", State::Ready, 1)).expect("claim"));
        s.insert(&[task("ready", State::Ready, 2)]).expect("insert");
        assert!(s.healthy());

        full.store(true, Ordering::SeqCst);
        let refused = s.insert(&[task("new", State::Ready, 3)]);
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "{refused:?}"
        );
        assert!(!s.healthy(), "down after the I/O error");
        assert_eq!(
            s.status("new").expect("status"),
            None,
            "nothing half-accepted"
        );
        assert!(
            matches!(
                s.claim(&task("ready", State::Ready, 2)),
                Err(StoreError::Unavailable(_))
            ),
            "no attempt starts while its outcome could not be recorded"
        );
        assert_eq!(s.status("ready").expect("status"), Some(State::Ready));
        assert!(matches!(
            s.take_due("wait"),
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(s.status("wait").expect("status"), Some(State::Delayed));
        let finish = [Change::Finish {
            result: result("run"),
            expires_ms: crate::clock::now_ms() + 1_000_000,
        }];
        assert!(matches!(s.record(&finish), Err(StoreError::Unavailable(_))));
        assert_eq!(s.status("run").expect("status"), Some(State::Running));

        // The disk takes writes again: the store reopens by itself and carries on.
        full.store(false, Ordering::SeqCst);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !s.healthy() {
            assert!(std::time::Instant::now() < end, "the store did not reopen");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        s.record(&finish).expect("the held outcome is recorded");
        assert_eq!(s.result("run").expect("result"), Some(result("run")));
        s.insert(&[task("new", State::Ready, 3)])
            .expect("insert after healing");
        assert!(s.claim(&task("ready", State::Ready, 2)).expect("claim"));
        assert!(s.take_due("wait").expect("take").is_some());
        assert_eq!(
            s.insert(&[task("ready", State::Delayed, 5)]),
            Err(StoreError::Duplicate("ready".into()))
        );
        s.close();

        // What was acknowledged is on disk, once; the finished task is gone from the tasks.
        let again = flaky_store(&inner, &full);
        let mut rec: Vec<String> = again
            .recover()
            .expect("recover")
            .iter()
            .map(|r| r.id.to_string())
            .collect();
        rec.sort();
        assert_eq!(rec, vec!["new", "ready", "wait"]);
        assert_eq!(again.result("run").expect("result"), Some(result("run")));
    }

    #[test]
    fn close_writes_queued_marks_refuses_later_calls_and_frees_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path()).expect("open");
        s.insert(&[task("a", State::Ready, 1)]).expect("insert");
        // The running mark is written asynchronously; close must still persist it.
        assert!(s.claim(&task("a", State::Ready, 1)).expect("claim"));
        s.close();
        assert_eq!(
            s.get_meta("k"),
            Err(StoreError::Unavailable("the store is closed".into()))
        );
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
