//! The embedded store: a write-ahead journal (`poulpe.journal`, `poulpe.journal2`) in front of
//! one redb file (`poulpe.redb`) under `--data`. Group commits are made on the callers' own
//! threads (`commit`); a writer thread starts the checkpoints due while no write comes, and a
//! checkpoint thread writes them.
//!
//! Every durable write is one synchronous append to the journal, folding every write
//! waiting at that moment. What the journal holds and the redb file does not yet is kept in
//! memory (`Pending`) and read first. Every `--checkpoint_ms` (or sooner when much is
//! pending) the writer hands that state to the checkpoint thread, which writes it into the
//! redb file in one durable transaction with the sequence number of the last journal record
//! it holds, and goes on appending to the other journal file meanwhile: acknowledgements never
//! wait for a checkpoint. At open, the records of both files after that number are applied
//! again (a torn last record is dropped), then both files are zeroed and preallocated; after
//! that they are written in place, never truncated (see `journal`).
//!
//! After an I/O error (a full disk, a failing device) the writer takes the store down —
//! writes, claims and releases of due tasks fail with `Unavailable`, `healthy()` is false —
//! closes the redb file (redb refuses every later call until then) and, every second, checks
//! that the disk takes writes again, reopens it, cuts the journal back to its last good record
//! and writes a checkpoint: nothing acknowledged is lost, nothing refused comes back.

use super::journal::{Journal, JournalIo};
use super::journal_file::FileJournal;
use super::local::{expiry_key, split_expiry_key, Backend, LocalStore, Op};
use super::pending::{Pending, Sink};
use super::StoreError;
use commit::{Ack, Batch, Commits, Reply};
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use parking_lot::{Condvar, Mutex, RwLock};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
};
use std::io::Write;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod commit;

/// Page cache of the embedded database.
const CACHE_BYTES: usize = 48 * 1024 * 1024;

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// id -> 8 bytes of big-endian expiry (unix ms) followed by the result JSON.
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
/// 16 hex digits of expiry (unix ms) followed by the id -> nothing; ordered by expiry.
const EXPIRY: TableDefinition<&str, &[u8]> = TableDefinition::new("expiry_at");
/// Small named values, UTF-8 (cron last fire times, the journal's checkpointed sequence number).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta_kv");
// Every table has one key and value type: redb's B-tree code is compiled once per type pair
// (about 19 KB each). Releases before 2026-11-28 had these two instead; `migrate` moves a file
// written by one of them to the tables above when it opens.
const OLD_EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("expiry");
const OLD_META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// The database file's name inside `--data`.
const FILE: &str = "poulpe.redb";
/// The journal's file names inside `--data`: written in turn, one while the other's records
/// are being checkpointed.
const JOURNAL: &str = "poulpe.journal";
const JOURNAL2: &str = "poulpe.journal2";
/// META key of the last journal record written into the redb file.
const SEQ_KEY: &str = "poulpe.journal_seq";
/// Files smaller than this are not worth compacting at start.
const COMPACT_FROM_BYTES: u64 = 16 * 1024 * 1024;

/// Most writes folded into one journal record.
const MAX_BATCH: usize = 4096;

/// The tests' `--checkpoint_ms`.
#[cfg(test)]
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
/// A checkpoint comes sooner once this many writes are pending...
const CHECKPOINT_OPS: usize = 50_000;
/// ... or this many bytes.
const CHECKPOINT_BYTES: usize = 32 * 1024 * 1024;

/// How often the writer looks whether the checkpoint thread is done, while it works.
const CHECKPOINT_POLL: Duration = Duration::from_millis(5);

/// How often a store that is down after an I/O error tries to reopen its file.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// Bytes written (and fsynced, then deleted) next to the database before a reopen: the disk
/// must have at least this much room again.
const PROBE_BYTES: usize = 256 * 1024;

/// Opens the database (at start, and again after an I/O error) and makes sure its tables exist.
type OpenFn = dyn Fn() -> Result<Database, StoreError> + Send + Sync;

/// The redb file, the journal, the callers' commit queue and the writer thread.
pub struct EmbeddedBackend {
    shared: Arc<Shared>,
    commits: Commits,
    /// The journal and the checkpoint state: taken by the caller whose turn it is to commit,
    /// and by the writer thread.
    writer: Arc<Mutex<Writer>>,
    tx: Sender<Signal>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the callers and the writer thread share.
struct Shared {
    db: RwLock<Slot>,
    /// Durable in the journal, not yet in the redb file: read first.
    overlay: RwLock<Overlay>,
    /// State marks (`write_later`) waiting to ride with the next journal record: left here
    /// without waking the writer.
    marks: Mutex<Vec<Op>>,
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
    /// `--data`: where the free-space probe is written before a reopen, and whose files
    /// `data_bytes` adds up (`None` in tests on memory).
    dir: Option<PathBuf>,
}

/// What reads see before the redb file: the writes since the last checkpoint, and those of the
/// checkpoint being written (shared with the checkpoint thread, which writes it without a lock;
/// it stays here, unchanged, until the redb file holds it).
#[derive(Default)]
struct Overlay {
    current: Pending,
    flushing: Option<Arc<Pending>>,
}

impl Overlay {
    fn find<T>(&self, f: impl Fn(&Pending) -> Option<T>) -> Option<T> {
        f(&self.current).or_else(|| self.flushing.as_deref().and_then(&f))
    }
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
    fn mark_down(&self, what: &str, e: &dyn std::fmt::Display) -> bool {
        let was_up = self.up.swap(false, Ordering::AcqRel);
        if was_up {
            *self.why.lock() = format!("the disk refused a write or read ({e})");
            log::error!(
                "store: I/O error on the {what}: {e}; the store is down until it can be reopened"
            );
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

    /// Checks that the disk takes writes again and opens the database again (redb repairs it
    /// back to its last durable commit). The writer then cuts the journal and checkpoints
    /// before the store is up.
    fn reopen(&self) -> Result<(), StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(unavailable("the store is closed"));
        }
        if let Some(dir) = &self.dir {
            probe(dir)?;
        }
        if matches!(&*self.db.read(), Slot::Open(_)) {
            return Ok(());
        }
        let db = (self.open)()?;
        *self.db.write() = Slot::Open(Arc::new(db));
        self.generation.fetch_add(1, Ordering::AcqRel);
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

/// What the writer thread is asked (commits are made by the callers, see `commit`).
enum Signal {
    /// Look again at what is due: a commit started the first pending write or a checkpoint,
    /// or the store went down.
    Wake,
    /// Answer once everything written so far is in the redb file.
    Flush(Reply),
    /// The store is closed: end.
    Stop,
}

/// The embedded store.
pub type EmbeddedStore = LocalStore<EmbeddedBackend>;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Opens (or creates) `<dir>/poulpe.redb` and `<dir>/poulpe.journal`, applies the journal and
/// starts the writer thread. A write stays only in the journal for at most `checkpoint_every`.
pub fn open(dir: &Path, checkpoint_every: Duration) -> Result<EmbeddedStore, StoreError> {
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
    let journal = |name: &str| -> Result<Box<dyn JournalIo>, StoreError> {
        let path = dir.join(name);
        match FileJournal::open(&path) {
            Ok(j) => Ok(Box::new(j)),
            Err(e) => Err(unavailable(format!("cannot open {}: {e}", path.display()))),
        }
    };
    let journals = [journal(JOURNAL)?, journal(JOURNAL2)?];
    // A new journal's name must be durable before its records are: sync the folder.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| unavailable(format!("cannot sync {}: {e}", dir.display())))?;
    start(
        Box::new(open_file),
        journals,
        Some(dir.to_path_buf()),
        checkpoint_every,
    )
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

/// Makes sure every table exists (one small commit), after moving an older release's tables.
fn create_tables(db: Database) -> Result<Database, StoreError> {
    migrate(&db)
        .map_err(|e| unavailable(format!("cannot move the tables of an older release: {e}")))?;
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

/// The sequence number of the last journal record in the redb file.
fn checkpointed_seq(db: &Database) -> Result<u64, redb::Error> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    let v = meta.get(SEQ_KEY)?;
    Ok(
        v.and_then(|g| std::str::from_utf8(g.value()).ok()?.parse().ok())
            .unwrap_or(0),
    )
}

/// Moves the tables of a file written by an older release (`OLD_META`, `OLD_EXPIRY`) to
/// today's, in one transaction: the values as they are, the expiry index rebuilt from the
/// results (each holds its expiry). Nothing to do on a file without them.
fn migrate(db: &Database) -> Result<(), redb::Error> {
    let read = db.begin_read()?;
    // Every file of an older release has both tables (it made them at its first start).
    let old = match read.open_table(OLD_META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut values: Vec<(String, String)> = Vec::new();
    for item in old.iter()? {
        let (k, v) = item?;
        values.push((k.value().to_string(), v.value().to_string()));
    }
    drop(old);
    drop(read);
    let txn = db.begin_write()?;
    let mut indexed = 0;
    {
        let mut meta = txn.open_table(META)?;
        for (k, v) in &values {
            meta.insert(k.as_str(), v.as_bytes())?;
        }
        let mut expiry = txn.open_table(EXPIRY)?;
        for item in txn.open_table(RESULTS)?.iter()? {
            let (id, v) = item?;
            if let Some((e, _)) = split_result(v.value()) {
                expiry.insert(expiry_key(e, id.value()).as_str(), [].as_slice())?;
                indexed += 1;
            }
        }
    }
    txn.delete_table(OLD_META)?;
    txn.delete_table(OLD_EXPIRY)?;
    txn.commit()?;
    log::info!(
        "store: moved the tables of an older release ({} values, {indexed} result expiries)",
        values.len()
    );
    Ok(())
}

/// Applies the records of both journal files that the redb file does not hold yet, in
/// sequence, writes them into it, then zeros and preallocates both files (`Journal::prepare`);
/// returns them, ready for the next record (the first one is written first).
fn replay(
    db: &Database,
    mut ios: [Box<dyn JournalIo>; 2],
) -> Result<(Journal, Journal), StoreError> {
    let done = checkpointed_seq(db).map_err(unavailable)?;
    let mut found_in = Vec::with_capacity(2);
    for (name, io) in [JOURNAL, JOURNAL2].into_iter().zip(ios.iter_mut()) {
        let found = Journal::read(io.as_mut(), done)
            .map_err(|e| unavailable(format!("cannot read {name}: {e}")))?;
        if found.dropped > 0 {
            log::info!(
                "store: {name} ends with {} bytes that are not a record to apply (older records, or a write torn by a crash); ignored",
                found.dropped
            );
        }
        found_in.push(found.records);
    }
    // Each file's records follow each other; the files' records follow the checkpoint and
    // each other: the file whose first record is older goes first. Nothing after a gap is
    // applied (there is none unless a file was damaged: a torn write only ends a file).
    let first_seq = |r: &Vec<(u64, Vec<Op>)>| r.first().map_or(u64::MAX, |(seq, _)| *seq);
    if first_seq(&found_in[1]) < first_seq(&found_in[0]) {
        found_in.swap(0, 1);
    }
    let (mut last, mut n) = (done, 0);
    let mut pending = Pending::default();
    for (seq, ops) in found_in.into_iter().flatten() {
        if seq != last + 1 {
            log::warn!("store: journal record {seq} does not follow record {last}; it and the records after it are ignored");
            break;
        }
        last = seq;
        n += 1;
        for op in ops {
            pending.apply(op, &|_| None);
        }
    }
    checkpoint(db, &pending, last).map_err(unavailable)?;
    if n > 0 {
        log::info!("store: {n} journal records applied to {FILE}");
    }
    // Everything read is in the redb file now: the files are zeroed and preallocated.
    let [first, second] = ios;
    let mut journals = (
        Journal::new(first, last + 1),
        Journal::new(second, last + 1),
    );
    for (name, j) in [(JOURNAL, &mut journals.0), (JOURNAL2, &mut journals.1)] {
        j.prepare()
            .map_err(|e| unavailable(format!("cannot prepare {name}: {e}")))?;
    }
    Ok(journals)
}

/// Opens the database with `open`, applies the journals and starts the writer and checkpoint
/// threads.
fn start(
    open: Box<OpenFn>,
    journals: [Box<dyn JournalIo>; 2],
    dir: Option<PathBuf>,
    checkpoint_every: Duration,
) -> Result<EmbeddedStore, StoreError> {
    let db = open()?;
    let (journal, spare) = replay(&db, journals)?;
    let shared = Arc::new(Shared {
        db: RwLock::new(Slot::Open(Arc::new(db))),
        overlay: RwLock::new(Overlay::default()),
        marks: Mutex::new(Vec::new()),
        up: AtomicBool::new(true),
        why: Mutex::new(String::new()),
        closed: AtomicBool::new(false),
        generation: AtomicU64::new(0),
        open,
        dir,
    });
    let (tx, rx) = unbounded();
    let mailbox = Arc::new(Mailbox::default());
    let thread_box = mailbox.clone();
    crate::stage::spawn_critical("store-ckpt", move || checkpointer(&thread_box))
        .map_err(unavailable)?;
    let writer = Arc::new(Mutex::new(Writer {
        shared: shared.clone(),
        journal,
        spare,
        mailbox,
        in_flight: false,
        flushing_seq: 0,
        pending_since: Instant::now(),
        checkpoint_every,
        marks: Vec::new(),
        reopen_at: None,
        failed_reopens: 0,
        started: 0,
        written: 0,
        flushes: Vec::new(),
        wake: false,
    }));
    let w = writer.clone();
    // Its death would leave failed checkpoints untried and a down store down: a panic there
    // ends the process.
    let handle =
        crate::stage::spawn_critical("store-writer", move || keep(&w, &rx)).map_err(unavailable)?;
    Ok(LocalStore::new(EmbeddedBackend {
        shared,
        commits: Commits::default(),
        writer,
        tx,
        thread: Mutex::new(Some(handle)),
    }))
}

fn split_result(v: &[u8]) -> Option<(i64, &[u8])> {
    let (head, rest) = v.split_at_checked(8)?;
    let e = u64::from_be_bytes(head.try_into().ok()?);
    Some((e as i64, rest))
}

/// The redb tables of one checkpoint transaction.
struct Tables<'t> {
    tasks: Table<'t, &'static str, &'static [u8]>,
    results: Table<'t, &'static str, &'static [u8]>,
    expiry: Table<'t, &'static str, &'static [u8]>,
    meta: Table<'t, &'static str, &'static [u8]>,
}

impl Sink for Tables<'_> {
    fn put_task(&mut self, id: &str, bytes: &[u8]) -> Result<(), redb::Error> {
        self.tasks.insert(id, bytes)?;
        Ok(())
    }
    fn del_task(&mut self, id: &str) -> Result<(), redb::Error> {
        self.tasks.remove(id)?;
        Ok(())
    }
    fn put_result(&mut self, id: &str, expires_ms: i64, bytes: &[u8]) -> Result<(), redb::Error> {
        let mut v = Vec::with_capacity(8 + bytes.len());
        v.extend_from_slice(&(expires_ms.max(0) as u64).to_be_bytes());
        v.extend_from_slice(bytes);
        self.results.insert(id, v.as_slice())?;
        self.expiry
            .insert(expiry_key(expires_ms, id).as_str(), [].as_slice())?;
        Ok(())
    }
    fn del_result(&mut self, id: &str) -> Result<(), redb::Error> {
        self.results.remove(id)?;
        Ok(())
    }
    fn del_result_if(&mut self, id: &str, expires_ms: i64) -> Result<(), redb::Error> {
        let same = self
            .results
            .get(id)?
            .and_then(|g| split_result(g.value()).map(|(e, _)| e == expires_ms))
            .unwrap_or(false);
        if same {
            self.results.remove(id)?;
        }
        Ok(())
    }
    fn del_expiry(&mut self, expires_ms: i64, id: &str) -> Result<(), redb::Error> {
        self.expiry.remove(expiry_key(expires_ms, id).as_str())?;
        Ok(())
    }
    fn put_meta(&mut self, key: &str, value: &str) -> Result<(), redb::Error> {
        self.meta.insert(key, value.as_bytes())?;
        Ok(())
    }
}

/// Writes `pending` and the journal's sequence number `seq` into the redb file in one durable
/// transaction.
fn checkpoint(db: &Database, pending: &Pending, seq: u64) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut t = Tables {
            tasks: txn.open_table(TASKS)?,
            results: txn.open_table(RESULTS)?,
            expiry: txn.open_table(EXPIRY)?,
            meta: txn.open_table(META)?,
        };
        pending.write_to(&mut t)?;
        t.meta.insert(SEQ_KEY, seq.to_string().as_bytes())?;
    }
    txn.commit()?;
    Ok(())
}

/// One checkpoint for the checkpoint thread: `pending` (the overlay's `flushing`) into `db`,
/// marked with the journal's sequence number `seq`.
struct Job {
    db: Arc<Database>,
    pending: Arc<Pending>,
    seq: u64,
}

/// What the checkpoint thread did with a job.
struct Done {
    res: Result<(), redb::Error>,
    ops: usize,
    took: Duration,
}

/// Where the writer and the checkpoint thread meet: one job out at a time, its answer, and
/// the writer's end (a mutex and a condvar: smaller in the binary than two channels).
#[derive(Default)]
struct Mailbox {
    mail: Mutex<Mail>,
    changed: Condvar,
}

#[derive(Default)]
struct Mail {
    job: Option<Job>,
    done: Option<Done>,
    /// The writes of the last checkpoint, now in the redb file: freed on the checkpoint
    /// thread, not on the committing caller's (thousands of entries; freeing them there took
    /// most of the allocator's `munmap` calls under load).
    garbage: Option<Arc<Pending>>,
    /// The writer has ended: so does the checkpoint thread.
    stop: bool,
}

impl Mailbox {
    fn post(&self, f: impl FnOnce(&mut Mail)) {
        f(&mut self.mail.lock());
        self.changed.notify_all();
    }
}

/// The checkpoint thread: writes each job into the redb file, answers, and lets go of the
/// database before answering (a reopen after an I/O error needs the file free).
fn checkpointer(mailbox: &Mailbox) {
    loop {
        let (job, garbage) = {
            let mut m = mailbox.mail.lock();
            loop {
                let garbage = m.garbage.take();
                if m.job.is_some() || garbage.is_some() {
                    break (m.job.take(), garbage);
                }
                if m.stop {
                    return;
                }
                mailbox.changed.wait(&mut m);
            }
        };
        drop(garbage);
        let Some(job) = job else {
            continue;
        };
        let t0 = Instant::now();
        let res = checkpoint(&job.db, &job.pending, job.seq);
        let ops = job.pending.ops();
        drop(job);
        mailbox.post(|m| {
            m.done = Some(Done {
                res,
                ops,
                took: t0.elapsed(),
            })
        });
    }
}

/// The journal and the checkpoint state. Commits are made by the caller whose turn it is
/// (`round`); the writer thread starts checkpoints that are due while no write comes, collects
/// their answers, answers flushes and heals after an I/O error (`tick`).
struct Writer {
    shared: Arc<Shared>,
    /// The journal file new records go to.
    journal: Journal,
    /// The other one: its records are in the redb file, or in the checkpoint being written.
    spare: Journal,
    mailbox: Arc<Mailbox>,
    /// A job is with the checkpoint thread.
    in_flight: bool,
    /// The sequence number the overlay's `flushing` is written with.
    flushing_seq: u64,
    /// When the oldest write not yet in the redb file was made.
    pending_since: Instant,
    /// Longest time a write stays only in the journal.
    checkpoint_every: Duration,
    /// State marks taken from `Shared::marks`, to ride with the next journal record.
    marks: Vec<Op>,
    /// Set while the store is down: when to try reopening next.
    reopen_at: Option<Instant>,
    failed_reopens: u32,
    /// Checkpoints handed to the checkpoint thread so far, and the number of the last one
    /// written.
    started: u64,
    written: u64,
    /// Flushes (a listing about to scan the file) waiting for the checkpoint numbered with
    /// them: everything written before the flush is in the redb file once it is. The writer
    /// goes on journaling meanwhile.
    flushes: Vec<(u64, Reply)>,
    /// What the writer thread waits for has changed (a first pending write, a checkpoint
    /// out, the store down): the caller that committed wakes it.
    wake: bool,
}

/// The writer thread: sleeps until something is due (`Writer::wake_at`) or it is signalled.
fn keep(writer: &Mutex<Writer>, rx: &Receiver<Signal>) {
    loop {
        let wake_at = {
            let mut w = writer.lock();
            w.tick();
            w.wake = false;
            w.wake_at()
        };
        let got = match wake_at {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        match got {
            Ok(Signal::Wake) | Err(RecvTimeoutError::Timeout) => {}
            Ok(Signal::Flush(done)) => writer.lock().flush_after(done),
            Ok(Signal::Stop) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let mut w = writer.lock();
    // A checkpoint a late flush started: collected, so that the checkpoint thread lets go of
    // the file before `close` closes it.
    w.collect_checkpoint(true);
    for (_, done) in w.flushes.drain(..) {
        done.send(Err(unavailable("the store is closed")));
    }
    // The checkpoint thread ends with the writer.
    w.mailbox.post(|m| m.stop = true);
}

impl Writer {
    /// Commits one round of the callers' batches (see `commit`) and answers each; then
    /// waits for the checkpoint out if writes come faster than checkpoints go, and starts the
    /// next one when it is due.
    fn round(&mut self, mut batches: Vec<Batch>) {
        self.collect_checkpoint(false);
        self.push_flushes();
        let res = self.commit(&mut batches);
        for b in batches {
            b.done.send(res.clone());
        }
        if self.in_flight && self.overfull() {
            // Writes come faster than checkpoints go: the committing caller waits for the one
            // out (and so do the writes queued behind it), so that memory and the journal
            // files hold at most about two checkpoints' worth.
            self.collect_checkpoint(true);
        }
        if self.due() {
            self.start_checkpoint();
        }
    }

    /// The writer thread's turn: collects a finished checkpoint, starts one that flushes
    /// wait for or that is due, and takes the store down (a read found the file broken) or
    /// brings it back up.
    fn tick(&mut self) {
        self.collect_checkpoint(false);
        self.push_flushes();
        if self.reopen_at.is_none() && !self.shared.up.load(Ordering::Acquire) {
            // A read found the file broken.
            self.reopen_at = Some(Instant::now());
            self.collect_checkpoint(true);
            self.shared.close_db();
        }
        self.heal();
        if self.due() {
            self.start_checkpoint();
        }
    }

    /// When the writer thread has something to do next without being signalled: a reopen
    /// to try, a checkpoint out to collect, or the pending writes' checkpoint.
    fn wake_at(&self) -> Option<Instant> {
        match self.reopen_at {
            Some(at) => Some(at),
            None if self.in_flight => Some(Instant::now() + CHECKPOINT_POLL),
            None if self.nothing_pending() => None,
            None => Some(self.pending_since + self.checkpoint_every),
        }
    }

    /// Nothing waits to be written into the redb file.
    fn nothing_pending(&self) -> bool {
        let o = self.shared.overlay.read();
        o.current.is_empty() && o.flushing.is_none()
    }

    /// As much is pending since the checkpoint out as brings a checkpoint forward.
    fn overfull(&self) -> bool {
        a_checkpoints_worth(&self.shared.overlay.read().current)
    }

    /// Whether enough is pending (or for long enough) to start a checkpoint, or a failed one
    /// is to be tried again.
    fn due(&self) -> bool {
        if self.reopen_at.is_some() || self.in_flight {
            return false;
        }
        let o = self.shared.overlay.read();
        if o.flushing.is_some() {
            return self.pending_since.elapsed() >= self.checkpoint_every;
        }
        !o.current.is_empty()
            && (a_checkpoints_worth(&o.current)
                || self.pending_since.elapsed() >= self.checkpoint_every)
    }

    /// Appends the group's ops (after the state marks waiting for a ride) to the journal and
    /// folds them into the overlay. A mark only ever precedes ops sent before it that concern
    /// other tasks: a task is claimed only once every earlier write about it is done.
    fn commit(&mut self, batches: &mut [Batch]) -> Result<(), StoreError> {
        self.marks.append(&mut self.shared.marks.lock());
        if self.reopen_at.is_some() {
            self.marks.clear();
            return Err(self.shared.down_error());
        }
        if !batches.iter().any(|b| !b.ops.is_empty()) {
            return Ok(());
        }
        let all: Vec<&Op> = self
            .marks
            .iter()
            .chain(batches.iter().flat_map(|b| &b.ops))
            .collect();
        let t0 = Instant::now();
        let written = self.journal.append(&all);
        crate::metrics::STORE_COMMIT.since(t0);
        if let Err(e) = written {
            log::error!("store: journal write of {} ops failed: {e}", all.len());
            self.marks.clear();
            self.go_down(JOURNAL, &e);
            return Err(self.shared.down_error());
        }
        let marks = std::mem::take(&mut self.marks);
        self.fold(
            marks
                .into_iter()
                .chain(batches.iter_mut().flat_map(|b| b.ops.drain(..))),
        );
        Ok(())
    }

    /// Folds written ops into the overlay, where reads find them.
    fn fold(&mut self, ops: impl Iterator<Item = Op>) {
        let mut o = self.shared.overlay.write();
        if o.current.is_empty() {
            self.pending_since = Instant::now();
            self.wake = true;
        }
        let Overlay { current, flushing } = &mut *o;
        for op in ops {
            current.apply(op, &|id| {
                flushing
                    .as_deref()
                    .and_then(|f| f.result(id))
                    .map(|r| r.map(|(e, _)| e))
            });
        }
    }

    /// Folds the state marks waiting for a ride into the overlay: a checkpoint writes them.
    fn take_marks(&mut self) {
        self.marks.append(&mut self.shared.marks.lock());
        if !self.marks.is_empty() {
            let marks = std::mem::take(&mut self.marks);
            self.fold(marks.into_iter());
        }
    }

    /// Hands what is pending to the checkpoint thread and moves on to the other journal file
    /// (whose records are all in the redb file); or hands a failed checkpoint over again.
    fn start_checkpoint(&mut self) {
        if self.in_flight || self.reopen_at.is_some() {
            return;
        }
        self.take_marks();
        let Ok(db) = self.shared.current() else {
            return;
        };
        let (pending, seq, switched) = {
            let mut o = self.shared.overlay.write();
            match &o.flushing {
                // Its records are still in the spare file: the files stay as they are.
                Some(f) => (f.clone(), self.flushing_seq, false),
                None if o.current.is_empty() => return,
                None => {
                    let f = Arc::new(std::mem::take(&mut o.current));
                    o.flushing = Some(f.clone());
                    let seq = self.journal.last_seq();
                    self.flushing_seq = seq;
                    std::mem::swap(&mut self.journal, &mut self.spare);
                    (f, seq, true)
                }
            }
        };
        // Outside the overlay's lock: cutting back a file a burst made long takes a moment.
        if switched {
            self.journal.restart(seq + 1);
        }
        self.mailbox
            .post(|m| m.job = Some(Job { db, pending, seq }));
        self.in_flight = true;
        self.wake = true;
        self.started += 1;
    }

    /// Answers `done` once everything written so far is in the redb file, without holding up
    /// the writes that come meanwhile: it waits for the checkpoint out (if any) and, when more
    /// is pending, for the next one, started at once.
    fn flush_after(&mut self, done: Reply) {
        if self.reopen_at.is_some() {
            return done.send(Err(self.shared.down_error()));
        }
        self.take_marks();
        let (current, retry) = {
            let o = self.shared.overlay.read();
            (
                !o.current.is_empty(),
                o.flushing.is_some() && !self.in_flight,
            )
        };
        // A failed checkpoint is tried again first, then `current` gets one of its own.
        let target = self.started + u64::from(retry) + u64::from(current);
        if target <= self.written {
            return done.send(Ok(()));
        }
        self.flushes.push((target, done));
        self.push_flushes();
    }

    /// Starts the next checkpoint that waiting flushes need, when none is out.
    fn push_flushes(&mut self) {
        if self.flushes.is_empty() || self.in_flight || self.reopen_at.is_some() {
            return;
        }
        self.start_checkpoint();
        if self.in_flight {
            return;
        }
        let r = if self.nothing_pending() {
            Ok(())
        } else {
            Err(self.shared.down_error())
        };
        for (_, done) in self.flushes.drain(..) {
            done.send(r.clone());
        }
    }

    /// Answers the flushes a finished checkpoint settles: on success those waiting for it or
    /// an earlier one, on failure all of them (they see the error).
    fn answer_flushes(&mut self, r: &Result<(), StoreError>) {
        if r.is_ok() {
            self.written = self.started;
        }
        let written = self.written;
        let mut i = 0;
        while i < self.flushes.len() {
            if r.is_err() || self.flushes[i].0 <= written {
                let (_, done) = self.flushes.swap_remove(i);
                done.send(r.clone());
            } else {
                i += 1;
            }
        }
    }

    /// Takes the checkpoint thread's answer when there is one (with `wait`, waits for it):
    /// once the redb file holds the checkpoint, reads stop looking at it in memory. `None`
    /// when no answer was taken.
    fn collect_checkpoint(&mut self, wait: bool) -> Option<Result<(), StoreError>> {
        if !self.in_flight {
            return None;
        }
        let done = {
            let mut m = self.mailbox.mail.lock();
            loop {
                if let Some(done) = m.done.take() {
                    break done;
                }
                if !wait {
                    return None;
                }
                // A panic there ends the process: the answer comes.
                self.mailbox.changed.wait(&mut m);
            }
        };
        self.in_flight = false;
        log::debug!(
            "store: checkpoint of {} writes into {FILE} in {} µs",
            done.ops,
            done.took.as_micros()
        );
        let Err(e) = done.res else {
            let written = self.shared.overlay.write().flushing.take();
            if written.is_some() {
                self.mailbox.post(|m| m.garbage = written);
            }
            self.answer_flushes(&Ok(()));
            return Some(Ok(()));
        };
        let broken = broken(&e);
        log::error!(
            "store: checkpoint into {FILE} failed: {e}{}",
            if broken { "" } else { "; tried again later" }
        );
        let r = if broken {
            if self.reopen_at.is_none() {
                self.go_down(FILE, &e);
            }
            Err(self.shared.down_error())
        } else {
            self.pending_since = Instant::now();
            Err(unavailable(e))
        };
        self.answer_flushes(&r);
        Some(r)
    }

    /// Writes everything pending into the redb file before returning: a caller waits for it
    /// (a flush), or the store is closing or healing.
    fn checkpoint_now(&mut self) -> Result<(), StoreError> {
        let mut started = false;
        loop {
            let res = self.collect_checkpoint(true);
            if self.reopen_at.is_some() {
                return Err(self.shared.down_error());
            }
            if let (true, Some(Err(e))) = (started, res) {
                return Err(e);
            }
            self.start_checkpoint();
            if !self.in_flight {
                // Nothing is pending.
                return Ok(());
            }
            started = true;
        }
    }

    /// Takes the store down after an I/O error; `heal` brings it back.
    fn go_down(&mut self, what: &str, e: &dyn std::fmt::Display) {
        self.shared.mark_down(what, e);
        self.reopen_at = Some(Instant::now() + REOPEN_EVERY);
        self.wake = true;
        // The checkpoint thread lets go of the file first (a reopen needs it free); what it
        // could not write stays in memory and is written after the reopen.
        self.collect_checkpoint(true);
        self.answer_flushes(&Err(self.shared.down_error()));
        self.shared.close_db();
    }

    /// While down, once it is time: reopens the file, cuts the journal back to its last good
    /// record (a refused write must not come back) and checkpoints; then the store is up.
    fn heal(&mut self) {
        let Some(at) = self.reopen_at else { return };
        if Instant::now() < at {
            return;
        }
        let res = self.shared.reopen().and_then(|()| {
            self.journal
                .cut_to_good()
                .map_err(|e| unavailable(format!("cannot cut {JOURNAL}: {e}")))
        });
        let res = res.and_then(|()| {
            self.reopen_at = None;
            let r = self.checkpoint_now();
            if r.is_err() && self.reopen_at.is_none() {
                self.reopen_at = Some(Instant::now());
            }
            r
        });
        match res {
            Ok(()) => {
                self.shared.up.store(true, Ordering::Release);
                log::info!("store: database reopened; the store is up again");
                self.reopen_at = None;
                self.failed_reopens = 0;
            }
            Err(e) => {
                self.failed_reopens += 1;
                if self.failed_reopens == 1 {
                    log::warn!("store: cannot reopen the database yet: {e}; trying again every {REOPEN_EVERY:?}");
                } else {
                    log::debug!("store: reopen attempt {} failed: {e}", self.failed_reopens);
                }
                self.reopen_at = Some(Instant::now() + REOPEN_EVERY);
            }
        }
    }
}

/// Enough pending writes to bring a checkpoint forward (or to make the writer wait for one).
fn a_checkpoints_worth(p: &Pending) -> bool {
    p.ops() >= CHECKPOINT_OPS || p.bytes() >= CHECKPOINT_BYTES
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
                        && self.shared.mark_down(FILE, &e)
                };
                if first {
                    // Wake the writer (it may be waiting for work) so that it reopens the file.
                    let _ = self.tx.send(Signal::Wake);
                }
                Err(self.shared.down_error())
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Refuses writes while the store is down.
    fn check_up(&self) -> Result<(), StoreError> {
        if self.healthy() {
            Ok(())
        } else {
            Err(self.shared.down_error())
        }
    }

    /// Waits for the answer to a queued batch, committing the queue when it is this caller's
    /// turn.
    fn finish(&self, ack: &Ack) -> Result<(), StoreError> {
        self.commits.wait(ack, &|round| self.round(round))
    }

    /// One commit round, on the caller's thread; the writer thread is woken only when what it
    /// waits for has changed.
    fn round(&self, batches: Vec<Batch>) {
        let mut w = self.writer.lock();
        w.round(batches);
        if std::mem::take(&mut w.wake) {
            let _ = self.tx.send(Signal::Wake);
        }
    }

    /// Waits until everything written so far is in the redb file (before reads that scan it).
    fn flush(&self) -> Result<(), StoreError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(unavailable("the store is closed"));
        }
        let ack = Arc::new(Ack::waited());
        self.tx
            .send(Signal::Flush(Reply(Some(ack.clone()))))
            .map_err(|_| unavailable("the writer thread has stopped"))?;
        match ack.wait() {
            commit::Answer::Done(r) => r,
            // Only commits hand out turns.
            commit::Answer::Lead | commit::Answer::Waiting => {
                Err(unavailable("the flush got no answer"))
            }
        }
    }
}

/// A write queued by `write_start`: waited for when its closure is called, or when the closure
/// is dropped uncalled (else its batch would wait for another caller's round).
struct Started<'a> {
    backend: &'a EmbeddedBackend,
    ack: Option<Arc<Ack>>,
}

/// How long a started write (the outcome stage's) waits for another caller's commit (the HTTP
/// loop's submits, under load) to take it before committing it itself: one durable journal write
/// fewer per outcome batch, at most this much later in quiet times.
const OUTCOME_PATIENCE: Duration = Duration::from_millis(1);

impl Started<'_> {
    fn wait(&mut self) -> Result<(), StoreError> {
        match self.ack.take() {
            Some(ack) => self
                .backend
                .commits
                .wait_started(&ack, OUTCOME_PATIENCE, &|round| self.backend.round(round)),
            None => Ok(()),
        }
    }

    fn finish(mut self) -> Result<(), StoreError> {
        self.wait()
    }
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        let _ = self.wait();
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
        self.check_up()?;
        let ack = self.commits.push(ops)?;
        self.finish(&ack)
    }

    /// Committed with the next round another caller makes, or by the closure's caller.
    fn write_start(&self, ops: Vec<Op>) -> Box<dyn FnOnce() -> Result<(), StoreError> + Send + '_> {
        let started = self
            .check_up()
            .and_then(|()| self.commits.push_started(ops))
            .map(|ack| Started {
                backend: self,
                ack: Some(ack),
            });
        Box::new(move || started?.finish())
    }

    fn write_later(&self, ops: Vec<Op>) {
        self.shared.marks.lock().extend(ops);
    }

    fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        // Every batch queued before the last one is committed once it is answered.
        if let Ok(ack) = self.commits.push_last() {
            let _ = self.finish(&ack);
        }
        {
            let mut w = self.writer.lock();
            let r = w.checkpoint_now();
            for (_, done) in w.flushes.drain(..) {
                done.send(r.clone());
            }
        }
        let _ = self.tx.send(Signal::Stop);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
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
        if let Some(t) = self.shared.overlay.read().find(|p| p.task(id)) {
            return Ok(t);
        }
        self.read(|txn| {
            let t = txn.open_table(TASKS)?;
            Ok(t.get(id)?.map(|g| g.value().to_vec()))
        })
    }

    fn result(&self, id: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        if let Some(r) = self.shared.overlay.read().find(|p| p.result(id)) {
            return Ok(r);
        }
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
        self.flush()?;
        self.read(|txn| {
            let t = txn.open_table(TASKS)?;
            for item in t.iter()? {
                let (_, v) = item?;
                f(v.value());
            }
            Ok(())
        })
    }

    fn keys(&self, results: bool, from: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(if results { EXPIRY } else { TASKS })?;
            let mut out = Vec::new();
            if results {
                // Every key of the index starts with 16 hex digits, all before "g".
                let upper = if from.is_empty() { "g" } else { from };
                for item in t.range::<&str>(..upper)?.rev() {
                    out.push(item?.0.value().to_string());
                    if out.len() >= limit {
                        break;
                    }
                }
            } else {
                for item in t.range::<&str>((Bound::Excluded(from), Bound::Unbounded))? {
                    out.push(item?.0.value().to_string());
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        if let Some(v) = self.shared.overlay.read().find(|p| p.meta(key)) {
            return Ok(Some(v));
        }
        self.read(|txn| {
            let t = txn.open_table(META)?;
            Ok(t.get(key)?
                .map(|g| String::from_utf8_lossy(g.value()).into_owned()))
        })
    }

    fn results_len(&self) -> Result<usize, StoreError> {
        let pending = {
            let o = self.shared.overlay.read();
            o.current.results_written() + o.flushing.as_deref().map_or(0, Pending::results_written)
        };
        let stored = self.read(|txn| Ok(txn.open_table(RESULTS)?.len()? as usize))?;
        Ok(stored + pending)
    }

    fn settle(&self) -> Result<(), StoreError> {
        self.flush()
    }

    fn data_bytes(&self) -> Option<u64> {
        let dir = self.shared.dir.as_ref()?;
        let size = |f: &str| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len());
        Some(size(FILE) + size(JOURNAL) + size(JOURNAL2))
    }

    fn expired(&self, now_ms: i64, limit: usize) -> Result<Vec<(String, i64)>, StoreError> {
        let mut out = self.read(|txn| {
            let t = txn.open_table(EXPIRY)?;
            let upper = expiry_key(now_ms, "");
            let mut out = Vec::new();
            for item in t.range::<&str>(..upper.as_str())? {
                let (k, _) = item?;
                if let Some((e, id)) = split_expiry_key(k.value()) {
                    out.push((id.to_string(), e));
                }
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })?;
        // Results not in the file yet (the gc runs every second; checkpoints are rarer).
        let o = self.shared.overlay.read();
        o.current.expired(now_ms, limit, &mut out);
        if let Some(f) = &o.flushing {
            f.expired(now_ms, limit, &mut out);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::{result, run, task};
    use crate::store::journal::tests::MemJournal;
    use crate::store::pending::tests::Rec;
    use crate::store::pending::Pending;
    use crate::store::{Change, Store};
    use crate::task::State;

    #[test]
    fn embedded_store_meets_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        run(&open(dir.path(), CHECKPOINT_EVERY).expect("open"));
        let dir = tempfile::tempdir().expect("tempdir");
        crate::store::contract::expiry(&open(dir.path(), CHECKPOINT_EVERY).expect("open"), true);
        let dir = tempfile::tempdir().expect("tempdir");
        crate::store::contract::result_cap(&open(dir.path(), CHECKPOINT_EVERY).expect("open"));
        let dir = tempfile::tempdir().expect("tempdir");
        crate::store::contract::summary_counts(&open(dir.path(), CHECKPOINT_EVERY).expect("open"));
        // Written and listed within one checkpoint period: listings see the journal's writes.
        let dir = tempfile::tempdir().expect("tempdir");
        crate::store::contract::browse(&open(dir.path(), CHECKPOINT_EVERY).expect("open"));
        let dir = tempfile::tempdir().expect("tempdir");
        crate::store::contract::cc_claims(&open(dir.path(), CHECKPOINT_EVERY).expect("open"));
        let dir = tempfile::tempdir().expect("tempdir");
        crate::store::contract::insert_many(&open(dir.path(), CHECKPOINT_EVERY).expect("open"));
    }

    #[test]
    fn a_mostly_free_file_is_compacted_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(FILE);
        let now = crate::clock::now_ms();
        {
            let s = open(dir.path(), CHECKPOINT_EVERY).expect("open");
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
                            task: None,
                        }
                    })
                    .collect();
                s.record(&changes).expect("record");
            }
            s.record(&[Change::Finish {
                result: result("kept"),
                expires_ms: now + 60_000,
                task: None,
            }])
            .expect("record");
            while s.gc(now, 1).expect("gc") > 0 {}
            assert_eq!(s.results_stored().expect("count"), 1);
            s.close();
        }
        let before = std::fs::metadata(&file).expect("file").len();
        assert!(before > 2 * COMPACT_FROM_BYTES, "{before} bytes written");
        let s = open(dir.path(), CHECKPOINT_EVERY).expect("reopen");
        let after = std::fs::metadata(&file).expect("file").len();
        assert!(after * 2 < before, "compacted: {before} -> {after} bytes");
        assert_eq!(s.result("kept").expect("result"), Some(result("kept")));
        s.close();
    }

    /// A data directory of the releases before the journal (a redb file with the same tables,
    /// no journal, no checkpointed sequence number) opens with everything in it.
    #[test]
    fn a_data_directory_from_before_the_journal_opens_with_its_tasks_and_results() {
        let dir = tempfile::tempdir().expect("tempdir");
        let expires = crate::clock::now_ms() + 60_000;
        {
            let db = create_tables(Database::create(dir.path().join(FILE)).expect("create"))
                .expect("tables");
            let txn = db.begin_write().expect("txn");
            {
                let mut t = Tables {
                    tasks: txn.open_table(TASKS).expect("tasks"),
                    results: txn.open_table(RESULTS).expect("results"),
                    expiry: txn.open_table(EXPIRY).expect("expiry"),
                    meta: txn.open_table(META).expect("meta"),
                };
                let old = serde_json::to_vec(&task("old", State::Delayed, 7)).expect("json");
                t.put_task("old", &old).expect("task");
                let done = serde_json::to_vec(&result("done")).expect("json");
                t.put_result("done", expires, &done).expect("result");
                t.put_meta("cron.k", "42").expect("meta");
            }
            txn.commit().expect("commit");
        }
        assert!(!dir.path().join(JOURNAL).exists());
        let s = open(dir.path(), CHECKPOINT_EVERY).expect("open");
        let rec: Vec<(String, u64)> = s
            .recover()
            .expect("recover")
            .iter()
            .map(|r| (r.id.to_string(), r.due_us))
            .collect();
        assert_eq!(rec, vec![("old".to_string(), 7)]);
        assert_eq!(s.result("done").expect("result"), Some(result("done")));
        assert_eq!(s.get_meta("cron.k").expect("meta"), Some("42".into()));
        s.close();
    }

    /// A file written by a release with the older meta and expiry tables opens with its
    /// values, results and expiry index moved to today's tables, and the old tables gone.
    #[test]
    fn a_file_with_the_older_tables_is_migrated_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = crate::clock::now_ms();
        {
            let db = Database::create(dir.path().join(FILE)).expect("create");
            let txn = db.begin_write().expect("txn");
            {
                let mut results = txn.open_table(RESULTS).expect("results");
                let mut expiry = txn.open_table(OLD_EXPIRY).expect("expiry");
                for (id, e) in [("done", now + 60_000), ("gone", now - 1_000)] {
                    let mut v = (e as u64).to_be_bytes().to_vec();
                    v.extend(serde_json::to_vec(&result(id)).expect("json"));
                    results.insert(id, v.as_slice()).expect("result");
                    let mut k = (e as u64).to_be_bytes().to_vec();
                    k.extend_from_slice(id.as_bytes());
                    expiry.insert(k.as_slice(), ()).expect("expiry");
                }
                let mut meta = txn.open_table(OLD_META).expect("meta");
                meta.insert("cron.k", "42").expect("meta");
                meta.insert(SEQ_KEY, "0").expect("seq");
                let old = serde_json::to_vec(&task("old", State::Delayed, 7)).expect("json");
                txn.open_table(TASKS)
                    .expect("tasks")
                    .insert("old", old.as_slice())
                    .expect("task");
            }
            txn.commit().expect("commit");
        }
        let s = open(dir.path(), CHECKPOINT_EVERY).expect("open");
        assert_eq!(s.get_meta("cron.k").expect("meta"), Some("42".into()));
        assert_eq!(s.result("done").expect("result"), Some(result("done")));
        assert_eq!(s.recover().expect("recover").len(), 1);
        // Only the expiry index finds what to delete: it was rebuilt.
        assert_eq!(s.gc(now, 1000).expect("gc"), 1, "the expired result goes");
        assert_eq!(s.result("done").expect("result"), Some(result("done")));
        s.close();
        use redb::TableHandle;
        let db = Database::open(dir.path().join(FILE)).expect("reopen");
        let names: Vec<String> = db
            .begin_read()
            .expect("read")
            .list_tables()
            .expect("list")
            .map(|h| h.name().to_string())
            .collect();
        assert!(
            !names.iter().any(|n| n == "meta" || n == "expiry"),
            "old tables left: {names:?}"
        );
    }

    /// An `Expire` of a result the overlay does not hold is decided at the checkpoint, against
    /// the file; one the overlay holds (or a checkpoint being written holds) is decided at once;
    /// a result written again after the `Expire` is kept.
    #[test]
    fn an_expire_is_decided_where_the_result_is_known() {
        let expire = |id: &str, e| Op::Expire {
            id: id.into(),
            expires_ms: e,
        };
        let put = |id: &str, e| Op::PutResult {
            id: id.into(),
            expires_ms: e,
            bytes: b"{}".to_vec(),
        };
        let mut p = Pending::default();
        p.apply(expire("in-file", 5), &|_| None);
        p.apply(put("here", 7), &|_| None);
        p.apply(expire("here", 7), &|_| None);
        p.apply(expire("flushing", 9), &|id| {
            (id == "flushing").then_some(Some(9))
        });
        p.apply(expire("again", 3), &|_| None);
        p.apply(put("again", 4), &|_| None);
        assert_eq!(p.result("here"), Some(None), "decided at once");
        assert_eq!(
            p.result("flushing"),
            Some(None),
            "decided against the older overlay"
        );
        assert_eq!(p.result("in-file"), None, "left to the checkpoint");
        let mut r = Rec::default();
        p.write_to(&mut r).expect("write");
        let has = |line: &str| r.0.iter().any(|l| l == line);
        assert!(has("del_result_if in-file 5"), "{:?}", r.0);
        assert!(has("put_result again 4 [123, 125]"), "{:?}", r.0);
        assert!(
            !has("del_result_if again 3"),
            "the newer result decides: {:?}",
            r.0
        );
        assert!(
            has("del_expiry 7 here") && has("del_result here"),
            "{:?}",
            r.0
        );
    }

    #[test]
    fn unfinished_tasks_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = open(dir.path(), CHECKPOINT_EVERY).expect("open");
            s.insert(&[task("r", State::Ready, 1), task("d", State::Delayed, 99)])
                .expect("insert");
            assert!(s.claim(&task("r", State::Ready, 1)).expect("claim"));
            // Make sure the running mark is committed before the store goes away.
            s.insert(&[task("x", State::Ready, 2)]).expect("insert");
        }
        // redb allows one open handle per file; wait for the old writer to let go.
        let s = loop {
            match open(dir.path(), CHECKPOINT_EVERY) {
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
        assert!(s.take_due("r", 1).expect("take").is_some());
        assert!(s.take_due("r", 1).expect("take").is_none());
        assert_eq!(
            s.insert(&[task("d", State::Ready, 0)]),
            Err(StoreError::Duplicate("d".into()))
        );
    }

    /// Waits until a checkpoint is held at the disk's closed sync gate.
    fn wait_until_a_checkpoint_is_held(disk: &Disk) {
        let end = Instant::now() + Duration::from_secs(10);
        while disk.gate.held.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < end,
                "no checkpoint reached the redb file's sync"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Acknowledgements never wait for a checkpoint: while one is stuck writing the redb file,
    /// inserts are journaled (into the other journal file) and acknowledged, and read back;
    /// after a crash at that moment both files replay, in order.
    #[test]
    fn writes_are_acknowledged_while_a_checkpoint_is_stuck_and_replay_from_both_files() {
        let disk = Disk::default();
        let s = flaky_store_every(&disk, Duration::from_millis(10));
        s.insert(&[task("before", State::Delayed, 1)])
            .expect("insert");
        disk.gate.close();
        wait_until_a_checkpoint_is_held(&disk);
        let s = Arc::new(s);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let s2 = s.clone();
        std::thread::spawn(move || {
            let _ = tx.send(s2.insert(&[task("during", State::Delayed, 2)]));
        });
        let r = rx.recv_timeout(Duration::from_secs(10));
        assert!(
            matches!(r, Ok(Ok(()))),
            "an insert waited for the checkpoint stuck in the redb file: {r:?}"
        );
        assert_eq!(s.status("before").expect("status"), Some(State::Delayed));
        assert_eq!(s.status("during").expect("status"), Some(State::Delayed));
        assert!(
            !disk.journal2.lock().iter().all(|&b| b == 0),
            "the insert went to the second journal file"
        );
        // A crash now: the redb file holds neither; the journals hold both, one in each.
        let crashed = Disk::default();
        let len = redb::StorageBackend::len(&*disk.inner).expect("len");
        let mut buf = vec![0; len as usize];
        redb::StorageBackend::read(&*disk.inner, 0, &mut buf).expect("read");
        redb::StorageBackend::set_len(&*crashed.inner, len).expect("set_len");
        redb::StorageBackend::write(&*crashed.inner, 0, &buf).expect("write");
        *crashed.journal.bytes.lock() = disk.journal.bytes.lock().clone();
        *crashed.journal2.lock() = disk.journal2.lock().clone();
        disk.gate.open();
        s.close();
        let again = flaky_store(&crashed);
        let mut rec: Vec<String> = again
            .recover()
            .expect("recover")
            .iter()
            .map(|r| r.id.to_string())
            .collect();
        rec.sort();
        assert_eq!(rec, vec!["before", "during"]);
        again.close();
    }

    /// A listing waits until what was written before it is in the redb file, which it scans,
    /// but writes meanwhile do not wait with it: while a checkpoint is stuck, a listing waits
    /// for that checkpoint and an insert from another thread is acknowledged all the same.
    #[test]
    fn a_listing_waits_for_the_checkpoint_but_writes_go_on() {
        use crate::store::list::{ListQuery, Listed, SCAN_CAP};
        let disk = Disk::default();
        let s = Arc::new(flaky_store_every(&disk, Duration::from_millis(10)));
        s.insert(&[task("before", State::Delayed, 1)])
            .expect("insert");
        disk.gate.close();
        wait_until_a_checkpoint_is_held(&disk);
        let (listed_tx, listed) = crossbeam_channel::bounded(1);
        let s2 = s.clone();
        std::thread::spawn(move || {
            let q = ListQuery {
                what: Listed::Live(State::Delayed),
                method: None,
                q: String::new(),
                limit: 10,
                after: None,
                scan: SCAN_CAP,
            };
            let _ = listed_tx.send(s2.list(&q));
        });
        // The listing's flush reaches the writer before the insert below.
        std::thread::sleep(Duration::from_millis(100));
        assert!(listed.try_recv().is_err(), "the listing did not wait");
        let (tx, rx) = crossbeam_channel::bounded(1);
        let s3 = s.clone();
        std::thread::spawn(move || {
            let _ = tx.send(s3.insert(&[task("during", State::Delayed, 2)]));
        });
        let r = rx.recv_timeout(Duration::from_secs(10));
        assert!(
            matches!(r, Ok(Ok(()))),
            "an insert waited behind a listing's checkpoint: {r:?}"
        );
        disk.gate.open();
        let page = listed
            .recv_timeout(Duration::from_secs(10))
            .expect("the listing ends once the checkpoint is written")
            .expect("list");
        let ids: Vec<&str> = page.rows.iter().map(|r| r.id.as_str()).collect();
        assert!(ids.contains(&"before"), "{ids:?}");
        s.close();
    }

    /// While a checkpoint is stuck, the writer stops taking writes once as much is pending as
    /// brings a checkpoint forward: memory (and the journal files) hold about two checkpoints'
    /// worth, not whatever the clients send meanwhile.
    #[test]
    fn writes_wait_for_a_stuck_checkpoint_once_a_checkpoints_worth_is_pending() {
        let disk = Disk::default();
        let s = Arc::new(flaky_store_every(&disk, Duration::from_millis(10)));
        s.backend()
            .write(vec![Op::PutMeta("first".into(), "1".into())])
            .expect("write");
        disk.gate.close();
        wait_until_a_checkpoint_is_held(&disk);
        // 200,000 writes in groups of 10,000 while the checkpoint is stuck.
        let s2 = s.clone();
        let writes = std::thread::spawn(move || {
            for g in 0..20 {
                let ops = (0..10_000)
                    .map(|i| Op::PutMeta(format!("k{g}-{i}"), String::new()))
                    .collect();
                s2.backend().write(ops).expect("write");
            }
        });
        let mut most = 0;
        let watch = Instant::now() + Duration::from_secs(2);
        while Instant::now() < watch && !writes.is_finished() {
            most = most.max(s.backend().shared.overlay.read().current.ops());
            std::thread::sleep(Duration::from_millis(1));
        }
        disk.gate.open();
        writes.join().expect("writes");
        assert!(
            most >= CHECKPOINT_OPS,
            "the writes went on until a checkpoint's worth was pending: {most}"
        );
        assert!(
            most <= CHECKPOINT_OPS + 10_000,
            "{most} writes pending behind a stuck checkpoint: the writer did not wait for it"
        );
        assert_eq!(s.get_meta("k19-9999").expect("meta"), Some(String::new()));
        s.close();
    }

    /// The two files' records are applied in sequence from the checkpointed one; a file's
    /// older records (left from before its restart) and anything after a gap are not.
    #[test]
    fn replay_takes_both_files_records_in_sequence_and_stops_at_a_gap() {
        let ids = |ops: &[&str]| -> Vec<Op> {
            ops.iter()
                .map(|id| Op::InsertTask(id.to_string(), b"{}".to_vec()))
                .collect()
        };
        let write = |j: &mut Journal, ops: &[&str]| {
            let ops = ids(ops);
            j.append(&ops.iter().collect::<Vec<_>>()).expect("append");
        };
        let (a, b) = (MemJournal::default(), MemJournal::default());
        let mut ja = Journal::new(Box::new(a.clone()), 1);
        let mut jb = Journal::new(Box::new(b.clone()), 1);
        write(&mut jb, &["old-1"]); // seq 1, checkpointed
        write(&mut jb, &["old-2"]); // seq 2, checkpointed
        ja.restart(3);
        write(&mut ja, &["a3"]);
        write(&mut ja, &["a4"]);
        jb.restart(5);
        write(&mut jb, &["b5"]);
        let db = redb::Builder::new()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(unavailable)
            .and_then(create_tables)
            .expect("db");
        checkpoint(&db, &Pending::default(), 2).expect("checkpoint at 2");
        let tasks = |db: &Database| -> Vec<String> {
            let txn = db.begin_read().expect("read");
            let t = txn.open_table(TASKS).expect("tasks");
            t.iter()
                .expect("iter")
                .map(|i| i.expect("item").0.value().to_string())
                .collect()
        };
        replay(&db, [Box::new(a.clone()), Box::new(b.clone())]).expect("replay");
        assert_eq!(
            tasks(&db),
            vec!["a3", "a4", "b5"],
            "old-1 and old-2 were checkpointed"
        );
        assert_eq!(checkpointed_seq(&db).expect("seq"), 5);

        // A gap: record 6 is lost (a torn write), 7 must not be applied.
        let (c, d) = (MemJournal::default(), MemJournal::default());
        let mut jc = Journal::new(Box::new(c.clone()), 6);
        write(&mut jc, &["c6"]);
        let mut jd = Journal::new(Box::new(d.clone()), 7);
        write(&mut jd, &["d7"]);
        c.bytes.lock()[20] ^= 0x01;
        replay(&db, [Box::new(c), Box::new(d)]).expect("replay");
        assert_eq!(
            tasks(&db),
            vec!["a3", "a4", "b5"],
            "d7 follows a lost record"
        );
        assert_eq!(checkpointed_seq(&db).expect("seq"), 5);
    }

    /// redb's in-memory storage, kept across reopens, whose writes fail while `full` is set
    /// (as a full disk's would).
    #[derive(Debug)]
    struct Flaky {
        inner: Arc<redb::backends::InMemoryBackend>,
        full: Arc<AtomicBool>,
        /// Only fsync fails (the writes themselves go through), as with EIO at the end.
        sync_fails: Arc<AtomicBool>,
        /// Only this file's fsync fails (not the journal's).
        db_sync_fails: Arc<AtomicBool>,
        /// Reads of this file fail.
        reads_fail: Arc<AtomicBool>,
        gate: Arc<Gate>,
    }

    /// Holds the redb file's syncs while closed: a checkpoint stops inside its commit.
    #[derive(Debug, Default)]
    struct Gate {
        closed: Mutex<bool>,
        opened: Condvar,
        /// Syncs held so far.
        held: AtomicU64,
        /// Syncs so far.
        syncs: AtomicU64,
    }

    impl Gate {
        fn close(&self) {
            *self.closed.lock() = true;
        }
        fn open(&self) {
            *self.closed.lock() = false;
            self.opened.notify_all();
        }
        fn pass(&self) {
            self.syncs.fetch_add(1, Ordering::SeqCst);
            let mut closed = self.closed.lock();
            if *closed {
                self.held.fetch_add(1, Ordering::SeqCst);
            }
            while *closed {
                self.opened.wait(&mut closed);
            }
        }
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
            if self.reads_fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.gate.pass();
            self.check()?;
            if self.sync_fails.load(Ordering::SeqCst) || self.db_sync_fails.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    /// A redb file and a journal in memory whose writes (or only syncs) fail on demand; kept
    /// across reopens.
    #[derive(Clone, Default)]
    struct Disk {
        inner: Arc<redb::backends::InMemoryBackend>,
        journal: MemJournal,
        /// The second journal file's bytes (its writes fail with the first one's).
        journal2: Arc<Mutex<Vec<u8>>>,
        /// Only the redb file's syncs fail (the journal's go through).
        db_sync_fails: Arc<AtomicBool>,
        /// Opening the redb file fails (the attempt is still counted in `opens`).
        open_fails: Arc<AtomicBool>,
        /// When the redb file was opened, or an open was tried.
        opens: Arc<Mutex<Vec<Instant>>>,
        gate: Arc<Gate>,
        /// Reads of the redb file fail.
        reads_fail: Arc<AtomicBool>,
        /// No page cache: every read of the redb file reaches the storage.
        no_cache: bool,
    }

    impl Disk {
        fn full(&self, on: bool) {
            self.journal.full.store(on, Ordering::SeqCst);
        }
        fn sync_fails(&self, on: bool) {
            self.journal.sync_fails.store(on, Ordering::SeqCst);
        }
    }

    fn flaky_store(disk: &Disk) -> EmbeddedStore {
        flaky_store_every(disk, CHECKPOINT_EVERY)
    }

    fn flaky_store_every(disk: &Disk, checkpoint_every: Duration) -> EmbeddedStore {
        let d = disk.clone();
        let open_db = move || {
            d.opens.lock().push(Instant::now());
            if d.open_fails.load(Ordering::SeqCst) {
                return Err(unavailable("the test refuses the open"));
            }
            let backend = Flaky {
                inner: d.inner.clone(),
                full: d.journal.full.clone(),
                sync_fails: d.journal.sync_fails.clone(),
                db_sync_fails: d.db_sync_fails.clone(),
                gate: d.gate.clone(),
                reads_fail: d.reads_fail.clone(),
            };
            let mut builder = redb::Builder::new();
            if d.no_cache {
                builder.set_cache_size(0);
            }
            let db = builder.create_with_backend(backend).map_err(unavailable)?;
            create_tables(db)
        };
        start(
            Box::new(open_db),
            [
                Box::new(disk.journal.clone()),
                Box::new(MemJournal {
                    bytes: disk.journal2.clone(),
                    ..disk.journal.clone()
                }),
            ],
            None,
            checkpoint_every,
        )
        .expect("open")
    }

    #[test]
    fn a_refused_insert_that_reached_the_disk_is_undone_at_the_reopen() {
        let disk = Disk::default();
        let s = flaky_store(&disk);
        s.insert(&[task("kept", State::Delayed, 1)])
            .expect("insert");
        disk.sync_fails(true);
        let refused = s.insert(&[task("refused", State::Delayed, 2)]);
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "{refused:?}"
        );
        disk.sync_fails(false);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !s.healthy() {
            assert!(std::time::Instant::now() < end, "the store did not reopen");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        s.close();
        let again = flaky_store(&disk);
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
        let disk = Disk::default();
        let s = flaky_store(&disk);
        s.insert(&[
            task("run", State::Ready, 1),
            task("wait", State::Delayed, 9),
        ])
        .expect("insert");
        assert!(s.claim(&task("run", State::Ready, 1)).expect("claim"));
        s.insert(&[task("ready", State::Ready, 2)]).expect("insert");
        assert!(s.healthy());

        disk.full(true);
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
            s.take_due("wait", 9),
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(s.status("wait").expect("status"), Some(State::Delayed));
        let finish = [Change::Finish {
            result: result("run"),
            expires_ms: crate::clock::now_ms() + 1_000_000,
            task: None,
        }];
        assert!(matches!(s.record(&finish), Err(StoreError::Unavailable(_))));
        assert_eq!(s.status("run").expect("status"), Some(State::Running));

        // The disk takes writes again: the store reopens by itself and carries on.
        disk.full(false);
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
        assert!(s.take_due("wait", 9).expect("take").is_some());
        assert_eq!(
            s.insert(&[task("ready", State::Delayed, 5)]),
            Err(StoreError::Duplicate("ready".into()))
        );
        s.close();

        // What was acknowledged is on disk, once; the finished task is gone from the tasks.
        let again = flaky_store(&disk);
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
        let s = open(dir.path(), CHECKPOINT_EVERY).expect("open");
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
        let again = open(dir.path(), CHECKPOINT_EVERY).expect("reopen right after close");
        let rec = again.recover().expect("recover");
        let got: Vec<(&str, bool)> = rec.iter().map(|r| (&*r.id, r.was_running)).collect();
        assert_eq!(got, vec![("a", true)]);
    }

    /// The sequence numbers of the records the journal holds (after a checkpoint the next
    /// record is written at its start, so only the records since then read back).
    /// The sequence numbers of the records in the first journal file, and in the second.
    fn journal_seqs(disk: &Disk) -> Vec<u64> {
        let mut m = disk.journal.clone();
        Journal::read(&mut m, 0)
            .expect("read")
            .records
            .iter()
            .map(|(s, _)| *s)
            .collect()
    }

    fn journal2_seqs(disk: &Disk) -> Vec<u64> {
        let mut m = MemJournal {
            bytes: disk.journal2.clone(),
            ..disk.journal.clone()
        };
        Journal::read(&mut m, 0)
            .expect("read")
            .records
            .iter()
            .map(|(s, _)| *s)
            .collect()
    }

    fn meta_op(key: &str, value: &str) -> Op {
        Op::PutMeta(key.into(), value.into())
    }

    /// Writes stay in the journal (and the overlay) until a checkpoint is due: not after a
    /// few small writes, nor after 2 MiB, while `checkpoint_every` has not passed.
    #[test]
    fn writes_stay_in_the_journal_until_a_checkpoint_is_due() {
        let disk = Disk::default();
        let s = flaky_store_every(&disk, Duration::from_secs(3600));
        let b = s.backend();
        b.write(vec![meta_op("a", "1")]).expect("write");
        b.write(vec![Op::PutResult {
            id: "big".into(),
            expires_ms: i64::MAX,
            bytes: vec![7; 2 << 20],
        }])
        .expect("write");
        b.write(vec![meta_op("b", "2")]).expect("write");
        // A write's answer comes before the writer decides on a checkpoint, but the next
        // write is taken only after that decision: the first two records are settled.
        assert_eq!(journal_seqs(&disk), vec![1, 2, 3], "no checkpoint came");
        assert_eq!(
            journal2_seqs(&disk),
            Vec::<u64>::new(),
            "no switch to the other file"
        );
        assert_eq!(b.shared.overlay.read().current.ops(), 3);
        s.close();
    }

    /// 50,000 pending writes bring the checkpoint forward, long before `checkpoint_every`.
    #[test]
    fn fifty_thousand_pending_writes_bring_a_checkpoint_forward() {
        let disk = Disk::default();
        let s = flaky_store_every(&disk, Duration::from_secs(3600));
        let b = s.backend();
        let many: Vec<Op> = (0..CHECKPOINT_OPS)
            .map(|i| meta_op(&format!("k{i}"), ""))
            .collect();
        b.write(many).expect("write");
        b.write(vec![meta_op("after", "1")]).expect("write");
        assert_eq!(
            (journal_seqs(&disk), journal2_seqs(&disk)),
            (vec![1], vec![2]),
            "a checkpoint began after the 50,000 writes: the next record went to the other file"
        );
        s.close();
    }

    /// 32 MiB of pending writes bring the checkpoint forward, long before `checkpoint_every`.
    #[test]
    fn thirty_two_mib_of_pending_writes_bring_a_checkpoint_forward() {
        let disk = Disk::default();
        let s = flaky_store_every(&disk, Duration::from_secs(3600));
        let b = s.backend();
        b.write(vec![Op::PutResult {
            id: "big".into(),
            expires_ms: i64::MAX,
            bytes: vec![7; CHECKPOINT_BYTES],
        }])
        .expect("write");
        b.write(vec![meta_op("after", "1")]).expect("write");
        assert_eq!(
            (journal_seqs(&disk), journal2_seqs(&disk)),
            (vec![1], vec![2]),
            "a checkpoint began after 32 MiB: the next record went to the other file"
        );
        s.close();
    }

    /// An idle store writes its pending writes into the redb file once `checkpoint_every` has
    /// passed, with nothing else to wake its writer.
    #[test]
    fn an_idle_store_checkpoints_once_checkpoint_every_has_passed() {
        let disk = Disk::default();
        let s = flaky_store_every(&disk, Duration::from_millis(200));
        s.backend().write(vec![meta_op("a", "1")]).expect("write");
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let o = s.backend().shared.overlay.read();
                if o.current.is_empty() && o.flushing.is_none() {
                    break;
                }
            }
            assert!(
                Instant::now() < end,
                "no checkpoint within 10 s of a 200 ms period"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(s.get_meta("a").expect("meta"), Some("1".into()));
        s.close();
    }

    /// A checkpoint the redb file refuses (its sync fails; the journal is fine) takes the
    /// store down: the file is closed, reopened once it takes writes again, and the reopen's
    /// checkpoint writes what was pending. A file left open after the error would refuse every
    /// later call.
    #[test]
    fn a_checkpoint_the_file_refuses_takes_the_store_down_until_the_file_is_reopened() {
        let disk = Disk::default();
        let s = flaky_store(&disk);
        s.insert(&[task("a", State::Delayed, 1)]).expect("insert");
        disk.db_sync_fails.store(true, Ordering::SeqCst);
        let r = s.backend().settle();
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert!(!s.healthy(), "down after the file refused a checkpoint");
        assert_eq!(s.status("a").expect("status"), Some(State::Delayed));
        disk.db_sync_fails.store(false, Ordering::SeqCst);
        let end = Instant::now() + Duration::from_secs(10);
        while !s.healthy() {
            assert!(Instant::now() < end, "the store did not reopen");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            s.backend().shared.overlay.read().current.is_empty(),
            "the reopen's checkpoint wrote what was pending"
        );
        s.close();
        let again = flaky_store(&disk);
        let rec: Vec<String> = again
            .recover()
            .expect("recover")
            .iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(rec, vec!["a"]);
    }

    /// A store that is down tries to reopen its file once a second, the first time a second
    /// after the error: never sooner, also when a batch wakes its writer in between. The
    /// first failed attempt is logged as a warning, the next ones at debug level.
    #[test]
    fn a_store_that_is_down_tries_to_reopen_once_a_second() {
        use crate::store::memory::tests::capture;
        capture::install();
        let disk = Disk::default();
        let s = flaky_store(&disk);
        let writer = s
            .backend()
            .thread
            .lock()
            .as_ref()
            .expect("writer")
            .thread()
            .id();
        disk.open_fails.store(true, Ordering::SeqCst);
        disk.full(true);
        let t0 = Instant::now();
        assert!(s.insert(&[task("x", State::Ready, 1)]).is_err());
        let attempts = |n: usize| {
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                let at = disk.opens.lock().clone();
                // The first open is the start's.
                if at.len() > n {
                    return at[1..].to_vec();
                }
                assert!(
                    Instant::now() < end,
                    "{} reopen attempts in 20 s",
                    at.len() - 1
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        attempts(1);
        // What a write that passed the health check just before the store went down does.
        s.backend().tx.send(Signal::Wake).expect("send");
        // Four: the third's log line is written before the fourth attempt.
        let at = attempts(4);
        assert!(
            at[0] >= t0 + REOPEN_EVERY,
            "first attempt {:?} after the error",
            at[0] - t0
        );
        for w in at.windows(2) {
            assert!(
                w[1] - w[0] >= REOPEN_EVERY,
                "attempts {:?} apart",
                w[1] - w[0]
            );
        }
        let lines = capture::of(writer);
        let count = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
        assert_eq!(count("cannot reopen the database yet"), 1, "{lines:?}");
        assert_eq!(count("reopen attempt 2 failed"), 1, "{lines:?}");
        assert_eq!(count("reopen attempt 3 failed"), 1, "{lines:?}");
        disk.full(false);
        disk.open_fails.store(false, Ordering::SeqCst);
        let end = Instant::now() + Duration::from_secs(10);
        while !s.healthy() {
            assert!(Instant::now() < end, "the store did not reopen");
            std::thread::sleep(Duration::from_millis(20));
        }
        s.close();
    }

    /// Opening replays what the journal holds beyond the file's checkpoint and says so, and
    /// reports bytes after the last good record; a journal with nothing to apply or drop
    /// logs neither line, nor does a reopen after a clean close.
    #[test]
    fn an_open_logs_the_records_it_applied_and_the_bytes_it_dropped_only_when_there_are_some() {
        use crate::store::memory::tests::capture;
        capture::install();
        let lines_since = |n: usize| capture::mine()[n..].to_vec();
        let has = |lines: &[String], what: &str| lines.iter().any(|l| l.contains(what));

        let fresh = Disk::default();
        let n = capture::mine().len();
        flaky_store(&fresh).close();
        let lines = lines_since(n);
        assert!(!has(&lines, "journal records applied"), "{lines:?}");
        assert!(!has(&lines, "not a record to apply"), "{lines:?}");

        // Two records the file does not hold (a crash before their checkpoint), then a torn
        // write.
        let disk = Disk::default();
        let mut j = Journal::new(Box::new(disk.journal.clone()), 1);
        j.append(&[&meta_op("k", "1")]).expect("append");
        j.append(&[&meta_op("k", "2")]).expect("append");
        let mut io = disk.journal.clone();
        io.write_at(j.len(), &[9; 5]).expect("write");
        let n = capture::mine().len();
        let s = flaky_store(&disk);
        let lines = lines_since(n);
        assert!(has(&lines, "store: 2 journal records applied"), "{lines:?}");
        assert!(
            has(&lines, "ends with 5 bytes that are not a record"),
            "{lines:?}"
        );
        assert_eq!(s.get_meta("k").expect("meta"), Some("2".into()));
        s.close();

        // Both records are in the file now: not applied again.
        let n = capture::mine().len();
        let s = flaky_store(&disk);
        let lines = lines_since(n);
        assert!(!has(&lines, "journal records applied"), "{lines:?}");
        assert_eq!(s.get_meta("k").expect("meta"), Some("2".into()));
        s.close();
    }

    /// Writes `chunks` × 100 results of 16 KiB under `dir`, then deletes all but `keep` of
    /// them (gc with that cap), and closes the store.
    fn fill_and_trim(dir: &Path, chunks: usize, keep: usize) {
        let now = crate::clock::now_ms();
        let s = open(dir, CHECKPOINT_EVERY).expect("open");
        let mut big = result("big");
        big.output = "x".repeat(16 * 1024);
        for chunk in 0..chunks {
            let changes: Vec<Change> = (0..100)
                .map(|i| {
                    let mut r = big.clone();
                    r.id = format!("b{chunk}-{i}");
                    Change::Finish {
                        result: r,
                        expires_ms: now + 60_000,
                        task: None,
                    }
                })
                .collect();
            s.record(&changes).expect("record");
        }
        while s.gc(now, keep).expect("gc") > 0 {}
        assert_eq!(s.results_stored().expect("count"), keep);
        s.close();
    }

    /// Neither a mostly free file smaller than 16 MiB nor a bigger one mostly in use is
    /// compacted at start (a compaction rewrites the whole file).
    #[test]
    fn a_small_or_mostly_used_file_is_not_compacted() {
        use crate::store::memory::tests::capture;
        capture::install();
        for (chunks, keep, what) in [
            (3, 1, "5 MB of results written, all but one deleted"),
            (20, 1900, "32 MB of results written, 95 % kept"),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            fill_and_trim(dir.path(), chunks, keep);
            let file = dir.path().join(FILE);
            let before = std::fs::metadata(&file).expect("file").len();
            let n = capture::mine().len();
            let s = open(dir.path(), CHECKPOINT_EVERY).expect("reopen");
            let lines = capture::mine()[n..].to_vec();
            assert!(
                !lines.iter().any(|l| l.contains("compacted")),
                "{what} ({before} bytes): {lines:?}"
            );
            assert_eq!(s.results_stored().expect("count"), keep);
            s.close();
        }
    }

    /// While a checkpoint is being written (held in the file's sync), reads find its writes
    /// and count its results once, and the flush that asked for it is answered only once the
    /// file holds them.
    #[test]
    fn a_checkpoint_being_written_is_read_and_its_flush_answered_after_it() {
        let disk = Disk::default();
        let s = flaky_store_every(&disk, Duration::from_secs(3600));
        let b = s.backend();
        b.write(vec![Op::PutResult {
            id: "r".into(),
            expires_ms: i64::MAX,
            bytes: b"{}".to_vec(),
        }])
        .expect("write");
        assert_eq!(b.results_len().expect("count"), 1);
        disk.gate.close();
        let ack = Arc::new(Ack::waited());
        b.tx.send(Signal::Flush(Reply(Some(ack.clone()))))
            .expect("send");
        wait_until_a_checkpoint_is_held(&disk);
        assert!(b.shared.overlay.read().flushing.is_some());
        assert!(
            *ack.slot.lock() == commit::Answer::Waiting,
            "the flush was answered before the file held its writes"
        );
        assert_eq!(b.results_len().expect("count"), 1, "counted once");
        assert_eq!(
            b.result("r").expect("result").map(|(e, _)| e),
            Some(i64::MAX)
        );
        disk.gate.open();
        assert_eq!(ack.wait(), commit::Answer::Done(Ok(())));
        assert!(b.shared.overlay.read().flushing.is_none());
        assert_eq!(b.results_len().expect("count"), 1, "now from the file");
        s.close();
    }

    /// What `/sys_info` shows of the store: its kind, and `data_bytes`, the sizes of the redb
    /// file and of the journal.
    #[test]
    fn the_store_is_named_embedded_and_counts_the_bytes_of_both_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No timed checkpoint: the files keep their sizes while they are measured.
        let s = open(dir.path(), Duration::from_secs(3600)).expect("open");
        s.insert(&[task("a", State::Delayed, 1)]).expect("insert");
        assert_eq!(s.name(), "embedded");
        let size = |f: &str| std::fs::metadata(dir.path().join(f)).expect("file").len();
        assert!(size(FILE) > 0 && size(JOURNAL) > 0 && size(JOURNAL2) > 0);
        assert_eq!(
            s.data_bytes(),
            Some(size(FILE) + size(JOURNAL) + size(JOURNAL2))
        );
        s.close();
    }

    /// CPU time the store's writer thread has used so far.
    fn writer_cpu(s: &EmbeddedStore) -> Duration {
        use std::os::unix::thread::JoinHandleExt;
        let writer = s.backend().thread.lock();
        let thread = writer.as_ref().expect("writer running").as_pthread_t();
        let mut clock: libc::clockid_t = 0;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: the thread is not joined (its handle is held above), and both pointers are
        // to live locals.
        unsafe {
            assert_eq!(libc::pthread_getcpuclockid(thread, &mut clock), 0);
            assert_eq!(libc::clock_gettime(clock, &mut ts), 0);
        }
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// The writer sleeps while it waits: for the checkpoint while a write is pending, and for
    /// the next write once it is checkpointed (a writer that polled would keep a core busy).
    #[test]
    fn a_waiting_writer_uses_no_cpu_before_or_after_its_checkpoint() {
        let disk = Disk::default();
        let s = flaky_store_every(&disk, Duration::from_secs(2));
        s.backend().write(vec![meta_op("a", "1")]).expect("write");
        let idle = |what: &str| {
            let (cpu, wall) = (writer_cpu(&s), Instant::now());
            std::thread::sleep(Duration::from_secs(1));
            let (used, elapsed) = (writer_cpu(&s) - cpu, wall.elapsed());
            // A polling thread gets a good part of a core (a fifth of one seen on a loaded
            // machine); a sleeping one next to none. A fiftieth.
            assert!(
                used < elapsed / 50,
                "the writer used {used:?} of CPU in {elapsed:?} {what}"
            );
        };
        idle("while a write waited for its checkpoint");
        let end = Instant::now() + Duration::from_secs(10);
        while !s.backend().shared.overlay.read().current.is_empty() {
            assert!(
                Instant::now() < end,
                "no checkpoint within 10 s of a 2 s period"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        idle("after the checkpoint, with nothing to do");
        s.close();
    }

    /// A claim's running mark left for the next record rides with the checkpoint at close
    /// also when nothing else was written since the last checkpoint (the journal is empty).
    #[test]
    fn a_running_mark_made_after_a_checkpoint_is_written_at_close() {
        let disk = Disk::default();
        let s = flaky_store_every(&disk, Duration::from_secs(3600));
        s.insert(&[task("a", State::Ready, 1)]).expect("insert");
        s.backend().settle().expect("checkpoint");
        assert!(s.backend().shared.overlay.read().current.is_empty());
        assert!(s.claim(&task("a", State::Ready, 1)).expect("claim"));
        s.close();
        let again = flaky_store(&disk);
        let rec = again.recover().expect("recover");
        let got: Vec<(&str, bool)> = rec.iter().map(|r| (&*r.id, r.was_running)).collect();
        assert_eq!(got, vec![("a", true)]);
    }

    /// A flush with nothing pending writes no checkpoint: no commit of the redb file, no sync.
    #[test]
    fn nothing_pending_means_no_checkpoint() {
        let disk = Disk::default();
        let s = flaky_store_every(&disk, Duration::from_secs(3600));
        let b = s.backend();
        b.write(vec![meta_op("a", "1")]).expect("write");
        let syncs = || disk.gate.syncs.load(Ordering::SeqCst);
        let before = syncs();
        b.settle().expect("checkpoint");
        assert!(syncs() > before, "a checkpoint syncs the file");
        let before = syncs();
        b.settle().expect("settle");
        b.settle().expect("settle");
        assert_eq!(syncs(), before, "no checkpoint of nothing");
        s.close();
    }

    /// A read the redb file refuses takes the store down, as a refused write does, and wakes
    /// the writer, which reopens the file.
    #[test]
    fn a_read_the_file_refuses_takes_the_store_down_until_it_is_reopened() {
        let disk = Disk {
            no_cache: true,
            ..Disk::default()
        };
        let s = flaky_store_every(&disk, Duration::from_secs(3600));
        s.insert(&[task("a", State::Delayed, 1)]).expect("insert");
        s.backend().settle().expect("checkpoint");
        disk.reads_fail.store(true, Ordering::SeqCst);
        let r = s.backend().task("a");
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert!(!s.healthy(), "down after the file refused a read");
        disk.reads_fail.store(false, Ordering::SeqCst);
        let end = Instant::now() + Duration::from_secs(10);
        while !s.healthy() {
            assert!(Instant::now() < end, "the store did not reopen");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(s.backend().task("a").expect("task").is_some());
        s.close();
    }

    /// A result deleted once it is in the file (a new task with the same id deletes the old
    /// one's result) stays deleted after the checkpoint that writes the deletion.
    #[test]
    fn a_result_deleted_after_its_checkpoint_stays_deleted_after_the_next() {
        let disk = Disk::default();
        let s = flaky_store_every(&disk, Duration::from_secs(3600));
        let b = s.backend();
        b.write(vec![Op::PutResult {
            id: "r".into(),
            expires_ms: i64::MAX,
            bytes: serde_json::to_vec(&result("r")).expect("json"),
        }])
        .expect("write");
        b.settle().expect("checkpoint");
        assert_eq!(s.result("r").expect("result"), Some(result("r")));
        s.insert(&[task("r", State::Delayed, 1)]).expect("insert");
        assert_eq!(s.result("r").expect("result"), None, "deleted");
        b.settle().expect("checkpoint");
        assert_eq!(
            s.result("r").expect("result"),
            None,
            "deleted in the file too"
        );
        s.close();
    }

    /// A journal file is reused after a checkpoint: its new records overwrite the older ones
    /// from its start, and where fewer new records were written the older ones stay behind
    /// them, whole, with valid CRCs (past the block of the last new record: a direct write
    /// zeros the rest of its last block). After a crash at that moment the reopen applies the new
    /// records only: tasks deleted since come back from none of the older ones.
    #[test]
    fn older_records_left_in_a_reused_file_are_not_replayed_after_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_secs(3600)).expect("open");
        let b = s.backend();
        // First cycle, into poulpe.journal: sixty tasks, a record each (several blocks).
        for i in 0..60 {
            s.insert(&[task(&format!("old-{i}"), State::Delayed, i)])
                .expect("insert");
        }
        b.settle().expect("checkpoint");
        // Second cycle, into poulpe.journal2: all of them deleted.
        b.write((0..60).map(|i| Op::DelTask(format!("old-{i}"))).collect())
            .expect("write");
        b.settle().expect("checkpoint");
        // Third, into poulpe.journal again from its start: two new tasks.
        for i in 0..2 {
            s.insert(&[task(&format!("new-{i}"), State::Delayed, i)])
                .expect("insert");
        }
        // A crash now: the files as they are (every acknowledged record is synced).
        let crashed = tempfile::tempdir().expect("tempdir");
        for f in [FILE, JOURNAL, JOURNAL2] {
            std::fs::copy(dir.path().join(f), crashed.path().join(f)).expect("copy");
        }
        s.close();
        let bytes = std::fs::read(crashed.path().join(JOURNAL)).expect("read");
        let again = open(crashed.path(), CHECKPOINT_EVERY).expect("reopen");
        let mut ids: Vec<String> = again
            .recover()
            .expect("recover")
            .iter()
            .map(|r| r.id.to_string())
            .collect();
        ids.sort();
        assert_eq!(ids, vec!["new-0", "new-1"]);
        again.close();
        // The reused file held the two new records, then older ones, whole.
        assert!(
            bytes.windows(6).any(|w| w == b"old-59"),
            "the last older record was still whole in the file"
        );
        let mut m = MemJournal::default();
        *m.bytes.lock() = bytes;
        let r = Journal::read(&mut m, 0).expect("read");
        assert_eq!(r.records.len(), 2, "the new records");
        assert!(r.dropped > 0, "older records were left behind them");
    }

    /// The records behind one that is lost in the middle of a file (torn, or damaged on disk)
    /// are not applied; nor later, once new records are written: the open zeros the files, so
    /// that a new record cannot happen to end where one of them starts and be followed by it.
    #[test]
    fn records_behind_a_lost_one_never_come_back_after_new_writes() {
        let (a, b) = (MemJournal::default(), MemJournal::default());
        let mut ja = Journal::new(Box::new(a.clone()), 1);
        ja.append(&[&meta_op("k", "1")]).expect("append");
        let lost_at = ja.len() as usize;
        ja.append(&[&meta_op("k", "lost")]).expect("append");
        let behind_at = ja.len() as usize;
        ja.append(&[&meta_op("k", "behind")]).expect("append");
        a.bytes.lock()[lost_at + 20] ^= 0x01;
        let db = redb::Builder::new()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(unavailable)
            .and_then(create_tables)
            .expect("db");
        let meta = |db: &Database| -> Option<String> {
            let txn = db.begin_read().expect("read");
            let t = txn.open_table(META).expect("meta");
            let v = t.get("k").expect("get");
            v.map(|g| String::from_utf8_lossy(g.value()).into_owned())
        };
        let (mut j, _) = replay(&db, [Box::new(a.clone()), Box::new(b.clone())]).expect("replay");
        assert_eq!(
            meta(&db).as_deref(),
            Some("1"),
            "nothing after the lost record"
        );
        // Record 2 again, as long as records 1 and 2 were: it ends where record 3 starts.
        let head = 26; // length, CRC, sequence number, op tag, key length, "k", value length
        let value = "n".repeat(behind_at - head);
        j.append(&[&meta_op("k", &value)]).expect("append");
        assert_eq!(j.len() as usize, behind_at);
        replay(&db, [Box::new(a), Box::new(b)]).expect("replay");
        assert_eq!(
            meta(&db),
            Some(value),
            "the record behind the lost one was applied"
        );
    }

    /// Over many checkpoints the journal files keep the length they were preallocated to at
    /// open: each is written again in place from its start, never truncated nor grown, so a
    /// commit's `fdatasync` never has a new length to commit. Both files are used in turn.
    #[test]
    fn the_journal_files_keep_their_preallocated_length_over_many_checkpoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path(), Duration::from_secs(3600)).expect("open");
        let b = s.backend();
        let size = |f: &str| std::fs::metadata(dir.path().join(f)).expect("file").len();
        let at_open = (size(JOURNAL), size(JOURNAL2));
        assert!(at_open.0 > 0 && at_open.0 == at_open.1, "{at_open:?}");
        let mut used = std::collections::HashSet::new();
        for cycle in 0..40 {
            for i in 0..20 {
                b.write(vec![meta_op(&format!("k{i}"), &format!("{cycle}"))])
                    .expect("write");
            }
            for f in [JOURNAL, JOURNAL2] {
                let bytes = std::fs::read(dir.path().join(f)).expect("read");
                if bytes.windows(3).any(|w| w == b"k19") {
                    used.insert(f);
                }
            }
            b.settle().expect("checkpoint");
            assert_eq!(
                (size(JOURNAL), size(JOURNAL2)),
                at_open,
                "cycle {cycle}: a file's length changed"
            );
        }
        assert_eq!(used.len(), 2, "both files were written");
        assert_eq!(s.get_meta("k19").expect("meta"), Some("39".into()));
        s.close();
    }
}
