//! The journal's file: records appended with one direct, synchronous write each
//! (`O_DIRECT | O_DSYNC`) where the filesystem allows it, `pwrite` and `fdatasync` elsewhere.
//!
//! A direct write skips the page cache and its writeback: on ext4 here it costs about a quarter
//! less CPU than `pwrite` + `fdatasync` of the same bytes, and returns a little sooner (see
//! BENCHMARKS.md). It must start and end on a block boundary, so each record is written as the
//! blocks it touches: the bytes of the first block before the record (the records before it,
//! kept from the last direct write or read back), the record, and zeros to the end of its last
//! block. Rewriting those earlier bytes with the same values is harmless even if the write is
//! torn: every sector holds either its old or its new bytes, which agree up to the record.
//! The zeros after a record end the replay, as the preallocated zeros do.
//!
//! Only writes inside the file's length take this way (the journal preallocates its files, so
//! that is nearly all of them): a write that would make the file longer goes the buffered way,
//! whose `fdatasync` also commits the new length; so do records over `MOST_DIRECT`.

use super::journal::JournalIo;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

/// Alignment of a direct write's offset, length and memory: the largest logical block size
/// in use (4 KiB sectors), so that it also suits 512-byte ones.
const BLOCK: usize = 4096;

/// Records longer than this are written the buffered way: a direct write copies the record
/// into aligned memory first, which for a big group would double what it holds.
const MOST_DIRECT: usize = 1 << 20;

/// The journal in a file.
pub struct FileJournal {
    file: File,
    /// The same file opened for direct, synchronous writes; `None` where the filesystem
    /// refuses them (then every write is buffered and synced).
    direct: Option<File>,
    /// The bytes before the end of the last direct write in its last block, and where that
    /// block starts: the next record usually starts there.
    tail: Vec<u8>,
    tail_at: u64,
    /// The file's length as last seen or set: a direct write stays inside it.
    len: u64,
    /// Memory for a direct write, with room to align it.
    scratch: Vec<u8>,
}

impl FileJournal {
    /// Opens (or creates) the journal file at `path`.
    pub fn open(path: &std::path::Path) -> io::Result<FileJournal> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)
            .map_err(|e| log::info!("store: {}: no direct writes ({e})", path.display()))
            .ok();
        let len = file.metadata()?.len();
        Ok(FileJournal {
            file,
            direct,
            tail: Vec::new(),
            tail_at: u64::MAX,
            len,
            scratch: Vec::new(),
        })
    }

    /// Whether records are written directly (not on filesystems that refuse `O_DIRECT`).
    #[cfg(test)]
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The same file, written the buffered way only (as where `O_DIRECT` is refused).
    #[cfg(test)]
    pub fn buffered(mut self) -> FileJournal {
        self.direct = None;
        self
    }

    /// One direct write of the blocks `buf` touches at `offset`. `Ok(false)` when it was not
    /// done whole (the caller writes the buffered way instead).
    fn write_direct(&mut self, offset: u64, buf: &[u8]) -> io::Result<bool> {
        let Some(direct) = &self.direct else {
            return Ok(false);
        };
        let start = offset - offset % BLOCK as u64;
        let before = (offset - start) as usize;
        let len = (before + buf.len()).div_ceil(BLOCK) * BLOCK;
        if buf.len() > MOST_DIRECT || start + len as u64 > self.len {
            return Ok(false);
        }
        if self.scratch.len() < len + BLOCK {
            self.scratch = vec![0; len + BLOCK];
        }
        let pad = self.scratch.as_ptr().align_offset(BLOCK).min(BLOCK);
        let Some(out) = self.scratch.get_mut(pad..pad + len) else {
            return Ok(false);
        };
        match self.tail.get(..before) {
            Some(kept) if self.tail_at == start => out[..before].copy_from_slice(kept),
            _ => self.file.read_exact_at(&mut out[..before], start)?,
        }
        out[before..before + buf.len()].copy_from_slice(buf);
        out[before + buf.len()..].fill(0);
        match direct.write_at(out, start) {
            Ok(n) if n == len => {}
            Ok(_) => return Ok(false),
            // Refused by the filesystem (alignment, or no direct I/O after all): buffered from
            // now on.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                log::info!("store: the journal is written the buffered way ({e})");
                self.direct = None;
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        let end = before + buf.len();
        let last = end - end % BLOCK;
        self.tail_at = start + last as u64;
        self.tail.clear();
        self.tail.extend_from_slice(&out[last..end]);
        if self.scratch.len() > 256 << 10 {
            self.scratch = Vec::new();
        }
        Ok(true)
    }
}

impl JournalIo for FileJournal {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.tail_at = u64::MAX;
        self.file.write_all_at(buf, offset)?;
        self.len = self.len.max(offset + buf.len() as u64);
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn write_synced(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.write_direct(offset, buf)? {
            return Ok(());
        }
        self.write_at(offset, buf)?;
        self.sync()
    }
    fn size(&mut self) -> io::Result<u64> {
        self.len = self.file.metadata()?.len();
        Ok(self.len)
    }
    fn read_all(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        io::Seek::seek(&mut self.file, io::SeekFrom::Start(0))?;
        io::Read::read_to_end(&mut self.file, &mut out)?;
        Ok(out)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.tail_at = u64::MAX;
        self.file.set_len(len)?;
        self.len = len;
        Ok(())
    }
    fn free(&mut self) -> u64 {
        use std::os::fd::AsRawFd;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: fstatvfs fills `st` for an open descriptor; it is read only when it did.
        if unsafe { libc::fstatvfs(self.file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return 0;
        }
        // SAFETY: filled by the successful call above.
        let st = unsafe { st.assume_init() };
        st.f_bavail.saturating_mul(st.f_frsize)
    }
}
