//! The embedded store's write-ahead journal: every durable write is one synchronous append to
//! `poulpe.journal` (one direct write, or a write and an `fdatasync`: `journal_file`), instead of
//! a copy-on-write transaction of the redb file.
//!
//! A record is `[length u32][crc32 u32][seq u64][ops]` (little-endian; the CRC covers the
//! sequence number and the ops). Sequence numbers follow each other without gaps; the last one
//! applied to the redb file is stored in it by each checkpoint. Reading stops at the first
//! record that is short, fails its CRC or does not follow the one before it: a write torn by a
//! crash is dropped, never half-applied, and nothing after it is invented.
//!
//! The store keeps two such files and writes into one while the records of the other are being
//! checkpointed; the sequence numbers run on from one file to the other.
//!
//! The files are preallocated and written in place, as SQLite's WAL, PostgreSQL's WAL segments
//! and RocksDB's recycled logs are: an `fdatasync` that neither changes a file's length nor
//! writes into blocks never written before flushes only the data, without a filesystem
//! metadata commit (on ext4 here, 200 µs instead of 560 µs). So:
//! - at open, once their records are in the redb file, both files are overwritten with zeros,
//!   synced, to at least `PREALLOC` bytes (less on a disk with little room);
//! - a file is not truncated after a checkpoint: the next records overwrite it from the start
//!   (the records left behind them are older, so they do not follow in sequence and are never
//!   read), and it grows in zero-filled steps of `GROW` when a record would pass its end;
//! - a file that a burst made longer than `KEEP` is cut back to `PREALLOC` when it is started
//!   again, so that the disk use stays bounded.
//!
//! Zeroing at open and zeroing all of a refused write (`cut_to_good`) make sure that no record
//! newer than the last one applied is ever left in a file (after a torn record, or after a
//! refused group of several records): a new record could otherwise happen to end just where such
//! a record starts, and it would follow in sequence.

use super::local::Op;
use std::io;

/// Bytes before a record's ops: length, CRC, sequence number.
const HEAD: usize = 16;

/// A group's ops are split into records of about this size, so that a record's length always
/// fits its u32 (one op is at most `--max_body`, 1 GiB). A corrupt length needs no cap: the
/// whole file is in memory, and a length past its end just ends the replay.
const RECORD_SPLIT: usize = 256 << 20;

/// The file grows by at least this many zero bytes at a time.
const GROW: u64 = 1 << 20;

/// A file is at least this long after the store opened it (zeros, written and synced), so that
/// the first records overwrite existing blocks; less when the disk has less than 16 times this
/// free (a small disk is not filled by empty journals).
const PREALLOC: u64 = 4 << 20;

/// A file that grew past this under a burst is cut back to `PREALLOC` when it starts again.
const KEEP: u64 = 64 << 20;

/// Where the journal's bytes live: a file, or memory in the unit tests that inject I/O errors.
pub trait JournalIo: Send {
    /// Writes `buf` at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes the written bytes (and the length) durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Writes `buf` at `offset`, inside the file, and makes it durable: in one direct write
    /// where the file allows it.
    fn write_synced(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.write_at(offset, buf)?;
        self.sync()
    }
    /// The file's length.
    fn size(&mut self) -> io::Result<u64>;
    /// The whole journal.
    fn read_all(&mut self) -> io::Result<Vec<u8>>;
    /// Cuts the file to `len` bytes (one that a burst made long).
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Bytes the disk has free, as far as known: preallocation takes at most a 16th of them.
    fn free(&mut self) -> u64 {
        u64::MAX
    }
}

/// The journal: appends records, remembers how long its durable part is.
pub struct Journal {
    io: Box<dyn JournalIo>,
    /// Bytes of whole, synced records since the last checkpoint; the next record goes here.
    len: u64,
    /// Size at which a group is split into another record (`RECORD_SPLIT`; smaller in tests).
    split: usize,
    /// The file's length: bytes up to it are written (old records or zeros).
    allocated: u64,
    /// A longer file is cut back when it starts again (`KEEP`; smaller in tests).
    keep: u64,
    /// End of the last record write tried: after a refusal, `cut_to_good` zeros up to it.
    tried: u64,
    /// Sequence number of the next record.
    next_seq: u64,
    buf: Vec<u8>,
}

/// What `Journal::read` found.
#[derive(Debug, Default)]
pub struct Replay {
    /// The records after the checkpointed one, in order: their ops and sequence numbers.
    pub records: Vec<(u64, Vec<Op>)>,
    /// Bytes after the last good record that are not zeros: older records left behind, or a
    /// write torn by a crash. Never applied.
    pub dropped: usize,
}

impl Journal {
    /// A journal whose content has been read (and applied) and which may now be emptied:
    /// `next_seq` follows the last sequence number in use.
    pub fn new(mut io: Box<dyn JournalIo>, next_seq: u64) -> Journal {
        let allocated = io.size().unwrap_or(0);
        Journal {
            io,
            len: 0,
            split: RECORD_SPLIT,
            allocated,
            keep: KEEP,
            tried: 0,
            next_seq,
            buf: Vec::new(),
        }
    }

    /// Sequence number of the last record written (or read back).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Bytes of synced records.
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Reads the records that follow `checkpointed` (the last sequence number already in the
    /// redb file). Records up to it are skipped; reading stops at the first bad record.
    pub fn read(io: &mut dyn JournalIo, checkpointed: u64) -> io::Result<Replay> {
        let bytes = io.read_all()?;
        Ok(parse(&bytes, checkpointed))
    }

    /// Appends one record of `ops` and syncs it. On failure the record is made unreadable (best
    /// effort: it must not be replayed later, since its writers were told it was refused; the
    /// writer does it again with `cut_to_good` before writing anything else); the caller then
    /// treats the store as down.
    pub fn append(&mut self, ops: &[&Op]) -> io::Result<()> {
        self.buf.clear();
        let mut seq = self.next_seq;
        let mut start = 0;
        self.buf.extend_from_slice(&[0; HEAD]);
        for (i, op) in ops.iter().enumerate() {
            encode_op(op, &mut self.buf);
            if self.buf.len() - start >= self.split && i + 1 < ops.len() {
                seal(&mut self.buf, start, seq);
                seq += 1;
                start = self.buf.len();
                self.buf.extend_from_slice(&[0; HEAD]);
            }
        }
        seal(&mut self.buf, start, seq);
        let end = self.len + self.buf.len() as u64;
        self.tried = end;
        let grow_to = if end > self.allocated {
            end.max(self.allocated + GROW)
        } else {
            self.allocated
        };
        let res = if end > self.allocated {
            self.io
                .write_at(self.len, &self.buf)
                .and_then(|()| self.zero(end, grow_to))
                .and_then(|()| self.io.sync())
        } else {
            self.io.write_synced(self.len, &self.buf)
        };
        match res {
            Ok(()) => {
                self.allocated = self.allocated.max(grow_to);
                self.len = end;
                self.next_seq = seq + 1;
                if self.buf.capacity() > 1 << 20 {
                    self.buf = Vec::new();
                }
                Ok(())
            }
            Err(e) => {
                let _ = self.unwrite();
                Err(e)
            }
        }
    }

    /// Makes whatever follows the synced records unreadable (after an I/O error, before
    /// writing again): a record whose write was refused must not come back. All of the refused
    /// write is zeroed, not just its first head: a group split into several records leaves
    /// whole ones behind it, and a new record could end just where one of them starts.
    pub fn cut_to_good(&mut self) -> io::Result<()> {
        let end = self.unwrite()?;
        self.allocated = self.allocated.max(end);
        self.io.sync()?;
        self.tried = self.len;
        Ok(())
    }

    /// Starts again from the beginning of the file, numbering the next record `next_seq`: the
    /// store writes into its two journal files in turn, and the sequence runs on across them.
    /// Only once this file's records are all in the redb file. The file is reused as it is
    /// (its blocks are written: the next syncs flush data only), unless a burst made it longer
    /// than `keep`: then it is cut back (the next sync also commits the new length, once).
    pub fn restart(&mut self, next_seq: u64) {
        self.len = 0;
        self.tried = 0;
        self.next_seq = next_seq;
        if self.allocated > self.keep {
            let to = self.keep.min(PREALLOC);
            match self.io.set_len(to) {
                Ok(()) => self.allocated = to,
                Err(e) => log::warn!(
                    "store: cannot cut a journal file of {} bytes back to {to}: {e}",
                    self.allocated
                ),
            }
        }
    }

    /// Makes the file ready for new records once everything it holds is in the redb file (at
    /// open, after the replay's checkpoint): zeros over all of it, synced, so that nothing in it
    /// can be read again, whatever a crash left there; cut back first when longer than `keep`;
    /// then made `PREALLOC` long, or what the disk has room for (a failure there only means
    /// that the file grows as records come, as it would anyway).
    pub fn prepare(&mut self) -> io::Result<()> {
        let mut size = self.io.size()?;
        if size > self.keep {
            size = self.keep.min(PREALLOC);
            self.io.set_len(size)?;
        }
        self.zero(0, size)?;
        let want = self.keep.min(PREALLOC).min(self.io.free() / 16);
        if want > size {
            if let Err(e) = self.zero(size, want) {
                log::warn!("store: cannot preallocate {want} bytes of a journal file: {e}");
            }
        }
        self.io.sync()?;
        self.allocated = self.io.size()?;
        self.len = 0;
        self.tried = 0;
        Ok(())
    }

    /// Zeros the refused write after the synced records: as much of it as the file holds (on a
    /// full disk, a big refused write may have reached only part of it, and zeros past the
    /// file's end would need room), and at least a head. Returns where the zeros end.
    fn unwrite(&mut self) -> io::Result<u64> {
        let end = self.tried.min(self.io.size()?).max(self.len + HEAD as u64);
        self.zero(self.len, end)?;
        Ok(end)
    }

    /// Writes zeros over `from..to`, a step at a time.
    fn zero(&mut self, from: u64, to: u64) -> io::Result<()> {
        let zeros = vec![0u8; to.saturating_sub(from).min(GROW) as usize];
        let mut at = from;
        while at < to {
            let n = (to - at).min(GROW);
            self.io.write_at(at, &zeros[..n as usize])?;
            at += n;
        }
        Ok(())
    }
}

/// Fills in the head of the record that starts at `start` and runs to the end of `buf`.
fn seal(buf: &mut [u8], start: usize, seq: u64) {
    let len = (buf.len() - start - HEAD) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 8..start + 16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn parse(bytes: &[u8], checkpointed: u64) -> Replay {
    let mut out = Replay::default();
    let mut at = 0usize;
    let mut prev: Option<u64> = None;
    while at < bytes.len() {
        let Some(head) = bytes.get(at..at + HEAD) else {
            break;
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let mut seq_bytes = [0u8; 8];
        seq_bytes.copy_from_slice(&head[8..16]);
        let seq = u64::from_le_bytes(seq_bytes);
        let Some(body) = bytes.get(at + HEAD..at + HEAD + len) else {
            break;
        };
        if crc32(&bytes[at + 8..at + HEAD + len]) != crc {
            break;
        }
        if prev.is_some_and(|p| seq != p + 1) {
            break;
        }
        let Some(ops) = decode_ops(body) else {
            break;
        };
        prev = Some(seq);
        if seq > checkpointed {
            out.records.push((seq, ops));
        }
        at += HEAD + len;
    }
    let rest = &bytes[at..];
    out.dropped = rest.len() - rest.iter().rev().take_while(|&&b| b == 0).count();
    out
}

const PUT_TASK: u8 = 1;
const INSERT_TASK: u8 = 2;
const DEL_TASK: u8 = 3;
const PUT_RESULT: u8 = 4;
const DEL_RESULT: u8 = 5;
const EXPIRE: u8 = 6;
const PUT_META: u8 = 7;

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn encode_op(op: &Op, out: &mut Vec<u8>) {
    match op {
        Op::PutTask(id, b) | Op::InsertTask(id, b) => {
            out.push(if matches!(op, Op::PutTask(..)) {
                PUT_TASK
            } else {
                INSERT_TASK
            });
            put_bytes(out, id.as_bytes());
            put_bytes(out, b);
        }
        Op::DelTask(id) => {
            out.push(DEL_TASK);
            put_bytes(out, id.as_bytes());
        }
        Op::PutResult {
            id,
            expires_ms,
            bytes,
        } => {
            out.push(PUT_RESULT);
            put_bytes(out, id.as_bytes());
            out.extend_from_slice(&expires_ms.to_le_bytes());
            put_bytes(out, bytes);
        }
        Op::DelResult(id) => {
            out.push(DEL_RESULT);
            put_bytes(out, id.as_bytes());
        }
        Op::Expire { id, expires_ms } => {
            out.push(EXPIRE);
            put_bytes(out, id.as_bytes());
            out.extend_from_slice(&expires_ms.to_le_bytes());
        }
        Op::PutMeta(k, v) => {
            out.push(PUT_META);
            put_bytes(out, k.as_bytes());
            put_bytes(out, v.as_bytes());
        }
    }
}

/// Reads the parts of one record's ops.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let (a, b) = self.0.split_at_checked(n)?;
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)?.try_into().ok().map(i64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(n).map(<[u8]>::to_vec)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?).ok()
    }
}

fn decode_ops(body: &[u8]) -> Option<Vec<Op>> {
    let mut r = Reader(body);
    let mut ops = Vec::new();
    while !r.0.is_empty() {
        let op = match r.u8()? {
            PUT_TASK => Op::PutTask(r.string()?, r.bytes()?),
            INSERT_TASK => Op::InsertTask(r.string()?, r.bytes()?),
            DEL_TASK => Op::DelTask(r.string()?),
            PUT_RESULT => Op::PutResult {
                id: r.string()?,
                expires_ms: r.i64()?,
                bytes: r.bytes()?,
            },
            DEL_RESULT => Op::DelResult(r.string()?),
            EXPIRE => Op::Expire {
                id: r.string()?,
                expires_ms: r.i64()?,
            },
            PUT_META => Op::PutMeta(r.string()?, r.string()?),
            _ => return None,
        };
        ops.push(op);
    }
    Some(ops)
}

/// CRC-32 (IEEE, as zlib's), eight bytes at a time ("slicing-by-8": eight tables, built at
/// first use so that the binary holds none of their 8 KiB). Every journal record is summed on
/// the writer's thread; a byte at a time was a third of that thread's own CPU.
fn crc32(data: &[u8]) -> u32 {
    static TABLES: std::sync::OnceLock<Box<[[u32; 256]; 8]>> = std::sync::OnceLock::new();
    let t = TABLES.get_or_init(|| {
        let mut t = Box::new([[0u32; 256]; 8]);
        for i in 0..256 {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            t[0][i] = c;
        }
        for k in 1..8 {
            for i in 0..256 {
                let prev = t[k - 1][i];
                t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            }
        }
        t
    });
    let at = |k: usize, v: u32| t[k][(v & 0xff) as usize];
    let mut c = !0u32;
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let lo = c ^ u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]);
        let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
        c = at(7, lo)
            ^ at(6, lo >> 8)
            ^ at(5, lo >> 16)
            ^ at(4, lo >> 24)
            ^ at(3, hi)
            ^ at(2, hi >> 8)
            ^ at(1, hi >> 16)
            ^ at(0, hi >> 24);
    }
    for &b in chunks.remainder() {
        c = at(0, c ^ b as u32) ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::store::journal_file::FileJournal;
    use std::sync::Arc;

    /// A journal in memory that outlives the store using it (kept across reopens).
    #[derive(Clone, Default)]
    pub struct MemJournal {
        pub bytes: Arc<parking_lot::Mutex<Vec<u8>>>,
        /// Writes fail while set (a full disk).
        pub full: Arc<std::sync::atomic::AtomicBool>,
        /// Only syncs fail (the bytes are written), as with EIO.
        pub sync_fails: Arc<std::sync::atomic::AtomicBool>,
        /// Bytes written so far.
        pub written: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl JournalIo for MemJournal {
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
            if self.full.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.written
                .fetch_add(buf.len(), std::sync::atomic::Ordering::SeqCst);
            let mut b = self.bytes.lock();
            let end = offset as usize + buf.len();
            if b.len() < end {
                b.resize(end, 0);
            }
            b[offset as usize..end].copy_from_slice(buf);
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            if self.sync_fails.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(())
        }
        fn size(&mut self) -> io::Result<u64> {
            Ok(self.bytes.lock().len() as u64)
        }
        fn read_all(&mut self) -> io::Result<Vec<u8>> {
            Ok(self.bytes.lock().clone())
        }
        fn set_len(&mut self, len: u64) -> io::Result<()> {
            self.bytes.lock().resize(len as usize, 0);
            Ok(())
        }
    }

    fn sample(i: usize) -> Vec<Op> {
        vec![
            Op::InsertTask(format!("t{i}"), format!("{{\"n\":{i}}}").into_bytes()),
            Op::PutResult {
                id: format!("r{i}"),
                expires_ms: -5 + i as i64,
                bytes: vec![i as u8; i % 7],
            },
            Op::Expire {
                id: format!("e{i}"),
                expires_ms: i64::MAX - i as i64,
            },
            Op::PutMeta("k".into(), "vé".into()),
            Op::DelTask(format!("t{i}")),
            Op::DelResult(String::new()),
            Op::PutTask("p".into(), Vec::new()),
        ]
    }

    fn same(a: &[Op], b: &[Op]) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    /// A journal in memory holding `sample(0..n)`, one record each, and where each ends.
    fn journal_with(n: usize) -> (MemJournal, Journal, Vec<usize>) {
        let mem = MemJournal::default();
        let mut j = Journal::new(Box::new(mem.clone()), 1);
        let mut ends = Vec::new();
        for i in 0..n {
            let ops = sample(i);
            j.append(&ops.iter().collect::<Vec<_>>()).expect("append");
            ends.push(j.len() as usize);
        }
        assert_eq!(j.last_seq(), n as u64);
        (mem, j, ends)
    }

    fn written(n: usize) -> (MemJournal, Vec<usize>) {
        let (mem, _, ends) = journal_with(n);
        (mem, ends)
    }

    #[test]
    fn records_read_back_in_order_after_the_checkpointed_one() {
        let (mut mem, _) = written(5);
        let r = Journal::read(&mut mem, 0).expect("read");
        assert_eq!(r.dropped, 0);
        assert_eq!(r.records.len(), 5);
        for (i, (seq, ops)) in r.records.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1);
            assert!(same(ops, &sample(i)), "record {i}: {ops:?}");
        }
        let r = Journal::read(&mut mem, 3).expect("read");
        let seqs: Vec<u64> = r.records.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![4, 5], "records already checkpointed are skipped");
    }

    /// A crash can tear the last write anywhere: cut the journal at every byte offset of its
    /// last two records and check that every whole record before the cut comes back and
    /// nothing after it.
    #[test]
    fn a_torn_tail_at_any_byte_drops_only_the_torn_record() {
        let (mem, ends) = written(4);
        // Without the zeros the file grew by.
        let full = mem.bytes.lock()[..ends[3]].to_vec();
        let from = ends[1];
        for cut in from..=full.len() {
            let mut m = MemJournal::default();
            *m.bytes.lock() = full[..cut].to_vec();
            let r = Journal::read(&mut m, 0).expect("read");
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(r.records.len(), whole, "cut at {cut}");
            for (i, (_, ops)) in r.records.iter().enumerate() {
                assert!(same(ops, &sample(i)), "cut at {cut}, record {i}");
            }
            assert!(r.dropped <= cut - ends[whole - 1], "cut at {cut}");
        }
    }

    #[test]
    fn a_flipped_bit_or_a_stale_tail_ends_the_replay() {
        let (mem, ends) = written(3);
        let full = mem.bytes.lock().clone();
        // Any bit of the second record flipped: only the first comes back.
        for at in ends[0]..ends[1] {
            for bit in [0x01u8, 0x80] {
                let mut b = full.clone();
                b[at] ^= bit;
                let mut m = MemJournal::default();
                *m.bytes.lock() = b;
                let r = Journal::read(&mut m, 0).expect("read");
                assert_eq!(r.records.len(), 1, "bit {bit:#x} of byte {at} flipped");
            }
        }
        // A new record, then an old one left over from before a truncation that was lost:
        // the old record does not follow the new one's sequence number and is not replayed.
        let fresh = MemJournal::default();
        let mut j = Journal::new(Box::new(fresh.clone()), 10);
        let ops = [Op::DelTask("x".into())];
        j.append(&ops.iter().collect::<Vec<_>>()).expect("append");
        let mut b = fresh.bytes.lock().clone();
        b.extend_from_slice(&full[ends[0]..ends[1]]);
        let mut m = MemJournal::default();
        *m.bytes.lock() = b;
        let r = Journal::read(&mut m, 0).expect("read");
        let seqs: Vec<u64> = r.records.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![10]);
        assert!(r.dropped > 0);
    }

    #[test]
    fn a_failed_append_is_cut_off_and_not_replayed() {
        let mem = MemJournal::default();
        let mut j = Journal::new(Box::new(mem.clone()), 1);
        let ops = sample(1);
        let refs: Vec<&Op> = ops.iter().collect();
        j.append(&refs).expect("append");
        mem.sync_fails
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(j.append(&refs).is_err());
        mem.sync_fails
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let mut m = mem.clone();
        let r = Journal::read(&mut m, 0).expect("read");
        assert_eq!(r.records.len(), 1, "the refused record is gone");
        j.append(&refs).expect("append after the failure");
        let r = Journal::read(&mut m, 0).expect("read");
        let seqs: Vec<u64> = r.records.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![1, 2]);
    }

    /// After a checkpoint the file is written again from its start: the new records come back,
    /// the older ones left behind them do not.
    #[test]
    fn after_a_restart_only_the_new_records_are_read() {
        let (mem, mut j, _) = journal_with(5);
        let size = mem.bytes.lock().len();
        assert!(size as u64 >= GROW, "grown in one zero-filled step: {size}");
        j.restart(j.last_seq() + 1);
        let ops = [Op::DelTask("new".into())];
        let before = mem.written.load(std::sync::atomic::Ordering::SeqCst);
        j.append(&ops.iter().collect::<Vec<_>>()).expect("append");
        let wrote = mem.written.load(std::sync::atomic::Ordering::SeqCst) - before;
        assert_eq!(mem.bytes.lock().len(), size, "written in place, not grown");
        assert!(
            wrote < 64,
            "one small record, no zeros: {wrote} bytes written"
        );
        let mut m = mem.clone();
        let r = Journal::read(&mut m, 5).expect("read");
        let seqs: Vec<u64> = r.records.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![6]);
        assert!(same(&r.records[0].1, &ops));
    }

    /// A big group becomes several records with consecutive numbers, written and synced
    /// together, all read back (a record's length must fit its u32).
    #[test]
    fn a_big_group_is_split_into_records_that_all_read_back() {
        let mem = MemJournal::default();
        let mut j = Journal::new(Box::new(mem.clone()), 1);
        j.split = 100;
        let ops: Vec<Op> = (0..10).flat_map(sample).collect();
        j.append(&ops.iter().collect::<Vec<_>>()).expect("append");
        assert!(j.last_seq() > 3, "split into {} records", j.last_seq());
        let mut m = mem.clone();
        let r = Journal::read(&mut m, 0).expect("read");
        let seqs: Vec<u64> = r.records.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=j.last_seq()).collect::<Vec<_>>());
        let back: Vec<Op> = r.records.into_iter().flat_map(|(_, o)| o).collect();
        assert!(same(&back, &ops));
        let one = [Op::DelTask("next".into())];
        j.append(&one.iter().collect::<Vec<_>>()).expect("append");
        let r = Journal::read(&mut m, 0).expect("read");
        assert_eq!(r.records.last().map(|(s, _)| *s), Some(j.last_seq()));
    }

    /// The encoded size of a record holding `ops`, head included.
    fn record_size(ops: &[Op]) -> usize {
        let mut b = Vec::new();
        for op in ops {
            encode_op(op, &mut b);
        }
        HEAD + b.len()
    }

    /// A group is split only once a record reaches the split size: every record but the last
    /// is at least that long and was still shorter before its last op; none is empty, also
    /// when the group's last op is the one that reaches the size.
    #[test]
    fn a_group_is_split_where_a_record_reaches_the_split_size_and_nowhere_else() {
        let ops: Vec<Op> = (0..10).flat_map(sample).collect();
        // The split size reached exactly by the last op, then at sizes that fall mid-group.
        let whole = record_size(&ops);
        for split in [whole, 100, 150, 1000] {
            let mem = MemJournal::default();
            let mut j = Journal::new(Box::new(mem.clone()), 1);
            j.split = split;
            j.append(&ops.iter().collect::<Vec<_>>()).expect("append");
            let mut m = mem.clone();
            let r = Journal::read(&mut m, 0).expect("read");
            let records: Vec<Vec<Op>> = r.records.into_iter().map(|(_, o)| o).collect();
            assert_eq!(records.len() as u64, j.last_seq(), "split {split}");
            for (i, rec) in records.iter().enumerate() {
                assert!(!rec.is_empty(), "split {split}: record {i} is empty");
                if i + 1 < records.len() {
                    let size = record_size(rec);
                    let before = record_size(&rec[..rec.len() - 1]);
                    assert!(
                        size >= split && before < split,
                        "split {split}: record {i} of {size} bytes ({before} before its last op)"
                    );
                }
            }
            let back: Vec<Op> = records.into_iter().flatten().collect();
            assert!(same(&back, &ops), "split {split}");
        }
    }

    /// The file journal writes at offsets, reports its length, reads back every byte, and
    /// keeps what it holds when opened again.
    #[test]
    fn the_file_journal_writes_at_offsets_and_knows_its_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("poulpe.journal");
        let mut f = FileJournal::open(&path).expect("open");
        assert_eq!(f.size().expect("size"), 0);
        f.write_at(3, b"abc").expect("write");
        f.write_at(0, b"xy").expect("write");
        f.sync().expect("sync");
        assert_eq!(f.size().expect("size"), 6);
        assert_eq!(f.read_all().expect("read"), b"xy\0abc");
        drop(f);
        let mut f = FileJournal::open(&path).expect("open again");
        assert_eq!(f.size().expect("size"), 6, "not truncated");
        let mut j = Journal::new(Box::new(f), 1);
        assert_eq!(j.allocated, 6, "the file's length is known");
        let ops = sample(2);
        j.append(&ops.iter().collect::<Vec<_>>()).expect("append");
        drop(j);
        let mut f = FileJournal::open(&path).expect("open again");
        assert_eq!(f.size().expect("size"), 6 + GROW, "grown by one step");
        let r = Journal::read(&mut f, 0).expect("read");
        assert_eq!(r.records.len(), 1);
        assert!(same(&r.records[0].1, &ops));
    }

    /// Records written the direct way (inside the preallocated file) read back whole after a
    /// reopen, whatever block boundaries they start and end on; after a restart the next
    /// records overwrite older ones in place and only the new sequence is read. The buffered
    /// way, on the same appends, writes the same records.
    #[test]
    fn records_written_directly_read_back_across_blocks_and_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sizes = [1, 700, 4000, 4096, 9000, 3, 12_000, 50, 4080, 1];
        let mut files = Vec::new();
        let mut ends = Vec::new();
        for direct in [true, false] {
            let path = dir.path().join(format!("j{direct}"));
            let mut f = FileJournal::open(&path).expect("open");
            if direct {
                assert!(
                    f.is_direct(),
                    "the test directory's filesystem refuses O_DIRECT: set TMPDIR to one that \
                     takes it (ext4, xfs, btrfs)"
                );
            } else {
                f = f.buffered();
            }
            let mut j = Journal::new(Box::new(f), 1);
            j.prepare().expect("prepare");
            let allocated = j.allocated;
            let op = |i: usize, n: usize| Op::PutTask(format!("t{i}"), vec![i as u8; n]);
            // The first round ends with a longer record, so that older bytes follow the second
            // round's records.
            for (i, &n) in sizes.iter().chain([&30_000]).enumerate() {
                j.append(&[&op(i, n)]).expect("append");
            }
            j.restart(j.last_seq() + 1);
            for (i, &n) in sizes.iter().enumerate() {
                j.append(&[&op(100 + i, n)]).expect("append");
            }
            assert_eq!(
                j.allocated, allocated,
                "no write went past the preallocation"
            );
            ends.push(j.len() as usize);
            drop(j);
            let mut f = FileJournal::open(&path).expect("open again");
            let r = Journal::read(&mut f, sizes.len() as u64 + 1).expect("read");
            let want: Vec<Op> = (0..sizes.len()).map(|i| op(100 + i, sizes[i])).collect();
            let got: Vec<Op> = r.records.iter().flat_map(|(_, o)| o.clone()).collect();
            assert!(
                same(&got, &want),
                "direct {direct}: {} records",
                r.records.len()
            );
            let seqs: Vec<u64> = r.records.iter().map(|(s, _)| *s).collect();
            assert_eq!(seqs, (12..=21).collect::<Vec<_>>(), "direct {direct}");
            files.push(f.read_all().expect("bytes"));
        }
        let end = ends[0];
        assert_eq!(ends, [end, end]);
        assert_eq!(
            files[0][..end],
            files[1][..end],
            "both ways wrote the same records"
        );
        // Only a direct write zeros the rest of its last block: proof that the records went
        // the direct way (none was refused and written buffered instead).
        let block_end = end.div_ceil(4096) * 4096;
        assert!(
            files[0][end..block_end].iter().all(|&b| b == 0),
            "direct: zeros after the last record"
        );
        assert!(
            files[1][end..block_end].iter().any(|&b| b != 0),
            "buffered: the older records' bytes after the last record"
        );
    }

    /// A record that starts where a buffered write (zeros of a refused write) left the file
    /// takes its first block's earlier bytes from the file, not from what the last direct
    /// write kept.
    #[test]
    fn a_direct_write_after_a_buffered_one_keeps_the_bytes_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j");
        let mut f = FileJournal::open(&path).expect("open");
        f.write_at(0, &vec![0; 3 * 4096]).expect("zeros");
        f.sync().expect("sync");
        f.write_synced(10, b"first").expect("direct");
        f.write_at(15, b"buffered").expect("buffered");
        f.write_synced(23, b"second").expect("direct");
        f.write_synced(4094, b"across").expect("direct");
        let bytes = f.read_all().expect("read");
        assert_eq!(&bytes[10..29], b"firstbufferedsecond");
        assert_eq!(&bytes[4094..4100], b"across");
        assert!(bytes[..10].iter().all(|&b| b == 0));
        assert!(bytes[29..4094].iter().all(|&b| b == 0));
        assert_eq!(bytes.len(), 3 * 4096, "the file kept its length");
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        // Every length and alignment against the plain bit-by-bit definition.
        let data: Vec<u8> = (0u32..300)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let slow = |d: &[u8]| {
            let mut c = !0u32;
            for &b in d {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        0xEDB8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        };
        for start in 0..9 {
            for end in start..data.len() {
                assert_eq!(
                    crc32(&data[start..end]),
                    slow(&data[start..end]),
                    "{start}..{end}"
                );
            }
        }
    }

    /// The file grows in zero-filled steps of `GROW` also when a record ends exactly at its
    /// length: the next record past it grows it by a whole step, not just by its own size.
    #[test]
    fn a_record_ending_at_the_files_length_is_followed_by_a_whole_step() {
        let ops = [Op::DelTask("x".into())];
        let refs: Vec<&Op> = ops.iter().collect();
        let (probe, ends) = {
            let mem = MemJournal::default();
            let mut j = Journal::new(Box::new(mem.clone()), 1);
            j.append(&refs).expect("append");
            (mem, j.len())
        };
        drop(probe);
        // A file exactly one record long: the record fills it.
        let mem = MemJournal::default();
        *mem.bytes.lock() = vec![0; ends as usize];
        let mut j = Journal::new(Box::new(mem.clone()), 1);
        j.append(&refs).expect("append");
        assert_eq!(
            mem.bytes.lock().len() as u64,
            ends,
            "the record fills the file"
        );
        j.append(&refs).expect("append");
        assert_eq!(
            mem.bytes.lock().len() as u64,
            ends + GROW,
            "the next record grows the file by a zero-filled step"
        );
        let mut m = mem.clone();
        let r = Journal::read(&mut m, 0).expect("read");
        assert_eq!(r.records.len(), 2);
        assert_eq!(r.dropped, 0);
    }

    /// The record buffer is reused between appends, and dropped after a record of more than
    /// 1 MiB so that one big write does not keep its memory for ever.
    #[test]
    fn the_record_buffer_is_kept_unless_it_grew_beyond_1_mib() {
        let mem = MemJournal::default();
        let mut j = Journal::new(Box::new(mem.clone()), 1);
        let small = [Op::DelTask("x".into())];
        j.append(&small.iter().collect::<Vec<_>>()).expect("append");
        assert!(j.buf.capacity() > 0, "kept for the next record");
        let big = [Op::PutTask("b".into(), vec![1; 3 << 20])];
        j.append(&big.iter().collect::<Vec<_>>()).expect("append");
        assert!(
            j.buf.capacity() <= 1 << 20,
            "a buffer of {} bytes kept",
            j.buf.capacity()
        );
    }

    /// A sync error that also makes the writes fail (a disk gone bad): the refused record
    /// cannot be zeroed by `append` itself.
    struct SyncBreaksDisk(MemJournal);
    impl JournalIo for SyncBreaksDisk {
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
            self.0.write_at(offset, buf)
        }
        fn sync(&mut self) -> io::Result<()> {
            if self.0.sync_fails.load(std::sync::atomic::Ordering::SeqCst) {
                self.0.full.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            self.0.sync()
        }
        fn size(&mut self) -> io::Result<u64> {
            self.0.size()
        }
        fn read_all(&mut self) -> io::Result<Vec<u8>> {
            self.0.read_all()
        }
        fn set_len(&mut self, len: u64) -> io::Result<()> {
            self.0.set_len(len)
        }
    }

    /// A sync error that also makes the writes fail (a disk gone bad): `append` cannot zero the
    /// refused record, so `cut_to_good` must, before anything else is written.
    #[test]
    fn cut_to_good_makes_a_refused_record_unreadable() {
        let mem = MemJournal::default();
        let mut j = Journal::new(Box::new(SyncBreaksDisk(mem.clone())), 1);
        let ops = sample(1);
        let refs: Vec<&Op> = ops.iter().collect();
        j.append(&refs).expect("append");
        mem.sync_fails
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(j.append(&refs).is_err());
        let mut m = mem.clone();
        let r = Journal::read(&mut m, 0).expect("read");
        assert_eq!(r.records.len(), 2, "the refused record is still there");
        mem.sync_fails
            .store(false, std::sync::atomic::Ordering::SeqCst);
        mem.full.store(false, std::sync::atomic::Ordering::SeqCst);
        j.cut_to_good().expect("cut_to_good");
        let r = Journal::read(&mut m, 0).expect("read");
        assert_eq!(r.records.len(), 1, "the refused record is gone");
    }

    /// `cut_to_good` at the very end of the file extends it by a zeroed head, and the journal
    /// counts those bytes as the file's: the next record grows it by one step past them.
    #[test]
    fn cut_to_good_keeps_the_files_length_known() {
        let ops = [Op::DelTask("x".into())];
        let refs: Vec<&Op> = ops.iter().collect();
        let one = {
            let mut j = Journal::new(Box::new(MemJournal::default()), 1);
            j.append(&refs).expect("append");
            j.len()
        };
        let mem = MemJournal::default();
        *mem.bytes.lock() = vec![0; one as usize];
        let mut j = Journal::new(Box::new(mem.clone()), 1);
        j.append(&refs).expect("append");
        j.cut_to_good().expect("cut_to_good");
        assert_eq!(mem.bytes.lock().len() as u64, one + HEAD as u64);
        assert_eq!(j.allocated, one + HEAD as u64);
        j.append(&refs).expect("append");
        assert_eq!(mem.bytes.lock().len() as u64, one + HEAD as u64 + GROW);
    }

    /// After `restart` the next record goes to the start of the file: reading the whole journal
    /// (nothing checkpointed) finds only it, not the records it left behind.
    #[test]
    fn restart_writes_the_next_record_at_the_start() {
        let (mem, mut j, _) = journal_with(3);
        j.restart(j.last_seq() + 1);
        let ops = [Op::DelTask("new".into())];
        j.append(&ops.iter().collect::<Vec<_>>()).expect("append");
        let mut m = mem.clone();
        let r = Journal::read(&mut m, 0).expect("read");
        let seqs: Vec<u64> = r.records.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![4]);
        assert!(r.dropped > 0, "the old records are left behind, unread");
    }

    /// A file written in place holds, after its new records, older ones: a crash that tears the
    /// last new record (at any byte, over zeros or over an older record's bytes) ends the
    /// replay there; the older records behind it are not read.
    #[test]
    fn a_torn_record_in_a_preallocated_reused_file_ends_the_replay() {
        let mem = MemJournal::default();
        *mem.bytes.lock() = vec![0; 64 << 10];
        let mut j = Journal::new(Box::new(mem.clone()), 1);
        for i in 0..6 {
            j.append(&sample(i).iter().collect::<Vec<_>>())
                .expect("append");
        }
        let before = mem.bytes.lock().clone();
        j.restart(7);
        let mut ends = Vec::new();
        for i in [10, 11] {
            j.append(&sample(i).iter().collect::<Vec<_>>())
                .expect("append");
            ends.push(j.len() as usize);
        }
        assert_eq!(mem.bytes.lock().len(), 64 << 10, "written in place");
        let after = mem.bytes.lock().clone();
        let read = |b: Vec<u8>| {
            let mut m = MemJournal::default();
            *m.bytes.lock() = b;
            let r = Journal::read(&mut m, 6).expect("read");
            r.records.iter().map(|(s, _)| *s).collect::<Vec<u64>>()
        };
        assert_eq!(read(after.clone()), vec![7, 8]);
        for cut in ends[0]..ends[1] {
            let mut over_old = after[..cut].to_vec();
            over_old.extend_from_slice(&before[cut..]);
            // Where the older bytes equal the new ones from the cut on, nothing is torn.
            let want = if before[cut..ends[1]] == after[cut..ends[1]] {
                vec![7, 8]
            } else {
                vec![7]
            };
            assert_eq!(read(over_old), want, "torn at {cut} over older records");
            let mut over_zeros = after[..cut].to_vec();
            over_zeros.resize(after.len(), 0);
            let want = if after[cut..ends[1]].iter().all(|&b| b == 0) {
                vec![7, 8]
            } else {
                vec![7]
            };
            assert_eq!(read(over_zeros), want, "torn at {cut} over zeros");
        }
    }

    /// A refused group of several records is zeroed whole by `cut_to_good`: a record written
    /// after the reopen, of the same length as the refused group's first one, must not be
    /// followed by the refused group's second one (whose number follows it).
    #[test]
    fn a_refused_group_is_zeroed_whole_so_no_new_record_leads_into_it() {
        let mem = MemJournal::default();
        let mut j = Journal::new(Box::new(SyncBreaksDisk(mem.clone())), 1);
        j.split = 1;
        j.append(&[&Op::DelTask("kept".into())]).expect("append");
        mem.sync_fails
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let refused = [Op::DelTask("aaaa".into()), Op::DelTask("refused".into())];
        assert!(j.append(&refused.iter().collect::<Vec<_>>()).is_err());
        mem.sync_fails
            .store(false, std::sync::atomic::Ordering::SeqCst);
        mem.full.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut m = mem.clone();
        let r = Journal::read(&mut m, 0).expect("read");
        assert_eq!(r.records.len(), 3, "the refused records reached the disk");
        j.cut_to_good().expect("cut_to_good");
        // Same length as the refused group's first record, so it ends where the second began.
        j.append(&[&Op::DelTask("bbbb".into())]).expect("append");
        let r = Journal::read(&mut m, 0).expect("read");
        let ops: Vec<String> = r
            .records
            .iter()
            .flat_map(|(_, o)| o.iter().map(|o| format!("{o:?}")))
            .collect();
        assert_eq!(
            ops,
            vec![r#"DelTask("kept")"#, r#"DelTask("bbbb")"#],
            "a refused record came back"
        );
    }

    /// The files are reused from one checkpoint to the next and stay bounded: a file is not
    /// cut while it is at most `keep` long (its blocks are written again in place), and one a
    /// burst made longer is cut back when it starts again.
    #[test]
    fn a_file_stays_bounded_over_many_checkpoint_cycles() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("poulpe.journal");
        let mut j = Journal::new(Box::new(FileJournal::open(&path).expect("open")), 1);
        j.keep = 2 << 20;
        j.prepare().expect("prepare");
        let size = || std::fs::metadata(&path).expect("file").len();
        assert_eq!(size(), 2 << 20, "preallocated up to keep");
        let op = |n: usize| Op::PutTask("t".into(), vec![7; n]);
        let mut sizes = Vec::new();
        for cycle in 0..30 {
            // Most cycles write 400 KiB, every tenth a burst of 5 MiB.
            let (n, each) = if cycle % 10 == 9 {
                (5, 1 << 20)
            } else {
                (100, 4 << 10)
            };
            for _ in 0..n {
                j.append(&[&op(each)]).expect("append");
            }
            assert!(
                size() <= (2 << 20).max(j.len() + GROW),
                "cycle {cycle}: {} bytes for {} of records",
                size(),
                j.len()
            );
            j.restart(j.last_seq() + 1);
            sizes.push(size());
            assert!(size() <= 2 << 20, "cycle {cycle}: {} bytes kept", size());
        }
        assert!(
            sizes.iter().all(|&s| s == 2 << 20),
            "reused as it is, or cut back to keep: {sizes:?}"
        );
    }

    /// `prepare` zeros all of a file (nothing in it can be read again) and preallocates it;
    /// a file longer than `keep` is cut back first.
    #[test]
    fn prepare_zeros_the_file_and_preallocates_it() {
        let (mem, mut j, _) = journal_with(3);
        j.prepare().expect("prepare");
        assert_eq!(mem.bytes.lock().len() as u64, PREALLOC);
        assert!(mem.bytes.lock().iter().all(|&b| b == 0));
        assert_eq!(j.allocated, PREALLOC);
        let mem = MemJournal::default();
        *mem.bytes.lock() = vec![1; 3 << 20];
        let mut j = Journal::new(Box::new(mem.clone()), 1);
        j.keep = 2 << 20;
        j.prepare().expect("prepare");
        assert_eq!(mem.bytes.lock().len(), 2 << 20, "cut back to keep");
        assert!(mem.bytes.lock().iter().all(|&b| b == 0));
    }

    /// A disk with room for this many bytes of the file: writes past them fail (ENOSPC).
    struct Room(MemJournal, usize);
    impl JournalIo for Room {
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
            if offset as usize + buf.len() > self.1 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.0.write_at(offset, buf)
        }
        fn sync(&mut self) -> io::Result<()> {
            self.0.sync()
        }
        fn size(&mut self) -> io::Result<u64> {
            self.0.size()
        }
        fn read_all(&mut self) -> io::Result<Vec<u8>> {
            self.0.read_all()
        }
        fn set_len(&mut self, len: u64) -> io::Result<()> {
            self.0.set_len(len)
        }
    }

    /// A disk without room for the preallocation: `prepare` zeros what the file holds, takes
    /// what room there is and succeeds; the file grows later as records come.
    #[test]
    fn prepare_takes_what_room_there_is() {
        let mem = MemJournal::default();
        *mem.bytes.lock() = vec![1; 100];
        let mut j = Journal::new(Box::new(Room(mem.clone(), 3 << 20)), 1);
        j.prepare().expect("prepare");
        let len = mem.bytes.lock().len() as u64;
        assert!((100..PREALLOC).contains(&len), "{len} bytes");
        assert_eq!(j.allocated, len);
        assert!(mem.bytes.lock().iter().all(|&b| b == 0));
        let ops = sample(1);
        j.append(&ops.iter().collect::<Vec<_>>()).expect("append");
    }

    /// A full disk refuses a write bigger than the room left: `cut_to_good` then zeros what
    /// the file holds of it, and needs no room (zeros past the file's end would), so that the
    /// store can heal as soon as the disk takes its probe again.
    #[test]
    fn cut_to_good_after_a_big_refused_write_needs_no_room() {
        let mem = MemJournal::default();
        *mem.bytes.lock() = vec![0; 4096];
        let mut j = Journal::new(Box::new(Room(mem.clone(), 4096)), 1);
        let small = [Op::DelTask("kept".into())];
        j.append(&small.iter().collect::<Vec<_>>()).expect("append");
        let big = [Op::PutTask("big".into(), vec![7; 64 << 10])];
        assert!(j.append(&big.iter().collect::<Vec<_>>()).is_err());
        j.cut_to_good().expect("cut_to_good");
        let mut m = mem.clone();
        let r = Journal::read(&mut m, 0).expect("read");
        assert_eq!(r.records.len(), 1);
        j.append(&small.iter().collect::<Vec<_>>()).expect("append");
    }
}
