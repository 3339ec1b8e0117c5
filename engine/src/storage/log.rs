//! The commit log in front of the redb store: a durable commit is one record
//! appended to a preallocated file and one `fdatasync`, instead of a redb
//! transaction that rewrites a path of B-tree pages for every key it touches.
//! The logged writes are folded into redb later, many commits in one redb
//! transaction (see [`super::RedbStorage`]).
//!
//! The log is two files, `<store>-wal` and `<store>-wal2`, used in turn:
//! while records go into one, the other's are folded into redb on a thread
//! of their own, so a commit never waits for a fold unless commits fill a
//! whole file before the fold of the other one is done. Each file is a
//! sequence of records:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | CRC-32 of the rest of the record (length, sequence, payload) |
//! | 4 | payload length, little-endian |
//! | 8 | sequence number, little-endian |
//! | n | payload: the batch's writes |
//!
//! A payload is a list of writes, each `1` (put), key length (u32 LE), key,
//! value length (u32 LE), value; or `2` (delete), key length, key. Keys are
//! [`StorageKey::encode`]d.
//!
//! Sequence numbers increase by one per record and never restart; redb keeps
//! the last one folded. A fold always takes one file's records whole (or
//! both files'), so the record after the last folded one, if any, starts one
//! of the files. On open that file is read from its start while each record
//! checks out and carries the next expected number, and then the other file
//! if its first record carries the number after that. So a torn record (a
//! crash during its write, before its commit was acknowledged) ends the log,
//! and so do records left from before the last fold: a file is rewritten
//! from its start after its records are folded, and never cleared.
//!
//! The file is filled with zeros before records go into it, so a commit's
//! `fdatasync` flushes data pages only: writing into a file's existing blocks
//! changes none of its metadata, while appending (or writing into
//! preallocated but unwritten extents) makes every sync a filesystem journal
//! commit too.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use super::{Write, WriteBatch};
use crate::error::StorageError;

const HEADER: usize = 16;
const PUT: u8 = 1;
const DELETE: u8 = 2;
/// The smallest size the file is created with; it doubles up to the log's
/// capacity as records need room.
const INITIAL_SIZE: u64 = 256 * 1024;

/// One write as the log holds it: encoded key, and the value (`None` for a
/// delete).
pub(crate) type LoggedWrite = (Vec<u8>, Option<Vec<u8>>);

/// A batch's writes as the log holds them (keys encoded once, here, for both
/// the record and the writes kept in memory).
pub(crate) fn logged_writes(batch: &WriteBatch) -> Vec<LoggedWrite> {
    batch
        .writes()
        .iter()
        .map(|write| match write {
            Write::Put(k, v) => (k.encode(), Some(v.clone())),
            Write::Delete(k) => (k.encode(), None),
        })
        .collect()
}

/// [`logged_writes`] of a batch taken whole: the values are moved, not
/// copied (a flush of 1,000 new rows holds about 300 KB of them).
pub(crate) fn logged_writes_owned(batch: WriteBatch) -> Vec<LoggedWrite> {
    batch
        .into_writes()
        .into_iter()
        .map(|write| match write {
            Write::Put(k, v) => (k.encode(), Some(v)),
            Write::Delete(k) => (k.encode(), None),
        })
        .collect()
}

/// Encode a batch's writes as one record with sequence number `seq`.
#[cfg(test)]
pub(crate) fn encode_record(seq: u64, writes: &[LoggedWrite]) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::new();
    encode_record_into(&mut out, seq, writes)?;
    Ok(out)
}

/// [`encode_record`] into `out` (cleared first), a buffer the caller keeps
/// from one commit to the next: a flush of 1,000 new rows is a record of
/// about 350 KB, and a fresh buffer of that size each time (new pages for
/// the allocator and the kernel to hand out) cost about 4% of a batched
/// insert; grown by doubling, a twentieth.
pub(crate) fn encode_record_into(
    out: &mut Vec<u8>,
    seq: u64,
    writes: &[LoggedWrite],
) -> Result<(), StorageError> {
    let size = HEADER
        + writes
            .iter()
            .map(|(k, v)| 1 + 4 + k.len() + v.as_ref().map_or(0, |v| 4 + v.len()))
            .sum::<usize>();
    out.clear();
    out.reserve(size);
    out.resize(HEADER, 0);
    for (key, value) in writes {
        out.push(if value.is_some() { PUT } else { DELETE });
        put_bytes(out, key)?;
        if let Some(value) = value {
            put_bytes(out, value)?;
        }
    }
    let len = u32::try_from(out.len() - HEADER).map_err(|_| too_big(out.len()))?;
    out[4..8].copy_from_slice(&len.to_le_bytes());
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&out[4..]);
    out[0..4].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn too_big(n: usize) -> StorageError {
    StorageError::Backend(format!("a batch of {n} bytes is too large for one commit"))
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), StorageError> {
    let len = u32::try_from(bytes.len()).map_err(|_| too_big(bytes.len()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// The record at the start of `bytes` if it is whole, checks out and has
/// sequence number `seq`: its writes and its length in bytes.
pub(crate) fn decode_record(
    bytes: &[u8],
    seq: u64,
) -> Result<Option<(Vec<LoggedWrite>, usize)>, StorageError> {
    let Some(header) = bytes.get(..HEADER) else {
        return Ok(None);
    };
    let crc = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let len = u32::from_le_bytes(header[4..8].try_into().unwrap_or_default()) as usize;
    let found = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    if found != seq {
        return Ok(None);
    }
    let Some(record) = bytes.get(..HEADER + len) else {
        return Ok(None);
    };
    if crc32fast::hash(&record[4..]) != crc {
        return Ok(None);
    }
    // The checksum matched: from here on a bad payload is corruption (or a
    // bug), not a torn write, and must not be skipped silently.
    let corrupt = || StorageError::Corrupt(format!("commit log record {seq} does not decode"));
    let mut payload = &record[HEADER..];
    let mut writes = Vec::new();
    while let Some((&op, rest)) = payload.split_first() {
        payload = rest;
        let key = take_bytes(&mut payload).ok_or_else(corrupt)?;
        let value = match op {
            PUT => Some(take_bytes(&mut payload).ok_or_else(corrupt)?),
            DELETE => None,
            _ => return Err(corrupt()),
        };
        writes.push((key, value));
    }
    Ok(Some((writes, record.len())))
}

/// The records of the two log files (their bytes) that follow the last
/// folded one, `folded`, in order: from the file that starts with the next
/// record, then on into the other one if it starts with the record after.
pub(crate) fn read_records(
    files: [&[u8]; 2],
    folded: u64,
) -> Result<Vec<Vec<LoggedWrite>>, StorageError> {
    let mut records = Vec::new();
    let mut seq = folded + 1;
    for (i, bytes) in files.iter().enumerate() {
        read_file(bytes, &mut seq, &mut records)?;
        if !records.is_empty() {
            read_file(files[1 - i], &mut seq, &mut records)?;
            break;
        }
    }
    Ok(records)
}

/// The records at the start of `bytes` numbered from `seq` on, into
/// `records` (`seq` ends past the last one read).
fn read_file(
    bytes: &[u8],
    seq: &mut u64,
    records: &mut Vec<Vec<LoggedWrite>>,
) -> Result<(), StorageError> {
    let mut at = 0;
    while let Some((writes, len)) = decode_record(&bytes[at..], *seq)? {
        records.push(writes);
        at += len;
        *seq += 1;
    }
    Ok(())
}

fn take_bytes(input: &mut &[u8]) -> Option<Vec<u8>> {
    let len = u32::from_le_bytes(input.get(..4)?.try_into().ok()?) as usize;
    let bytes = input.get(4..4 + len)?.to_vec();
    *input = &input[4 + len..];
    Some(bytes)
}

/// The log file, positioned after its last record.
#[derive(Debug)]
pub(crate) struct LogFile {
    file: File,
    path: PathBuf,
    /// Current length of the file (all of it written, zeros past `end`).
    len: u64,
    /// The most the file grows to.
    capacity: u64,
    /// Where the next record goes.
    end: u64,
    /// Tests: fail the next record writes as a full or broken disk would.
    #[cfg(test)]
    pub(crate) fail_writes: bool,
}

impl LogFile {
    /// Open (or create) the log file at `path`. Returns the file positioned
    /// at its start (the caller folds the records [`read_records`] finds
    /// before logging anything new) and its bytes.
    pub(crate) fn open(path: &Path, capacity: u64) -> Result<(Self, Vec<u8>), StorageError> {
        let io = |what: &str, e: std::io::Error| {
            StorageError::Backend(format!("commit log {}: {what}: {e}", path.display()))
        };
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io("cannot open", e))?;
        let mut bytes = Vec::new();
        (&file)
            .read_to_end(&mut bytes)
            .map_err(|e| io("cannot read", e))?;
        let mut log = Self {
            file,
            path: path.to_owned(),
            len: bytes.len() as u64,
            capacity,
            end: 0,
            #[cfg(test)]
            fail_writes: false,
        };
        if created {
            log.grow(INITIAL_SIZE.min(capacity))?;
        }
        // The file's directory entry must be durable before any record in
        // it is acknowledged; on every open, since a crash may have come
        // between an earlier run's creating the file and syncing this.
        sync_parent(path).map_err(|e| io("cannot sync its directory", e))?;
        Ok((log, bytes))
    }

    /// Whether a record of `n` bytes fits before the capacity.
    pub(crate) fn fits(&self, n: usize) -> bool {
        self.end + n as u64 <= self.room()
    }

    /// Whether a record of `n` bytes fits in the file once it is rewound.
    pub(crate) fn fits_when_empty(&self, n: usize) -> bool {
        n as u64 <= self.room()
    }

    fn room(&self) -> u64 {
        self.capacity.max(self.len)
    }

    /// Make room for a record of `n` bytes (filling the file with zeros
    /// further if needed). An error here leaves the log as it was.
    pub(crate) fn reserve(&mut self, n: usize) -> Result<(), StorageError> {
        let needed = self.end + n as u64;
        if needed > self.len {
            self.grow(needed.max(self.len * 2).min(self.capacity.max(needed)))?;
        }
        Ok(())
    }

    /// Write `record` after the last one and make it durable, into room
    /// made by [`reserve`](Self::reserve). On an error the file's state is
    /// unknown and nothing more may be written to it.
    pub(crate) fn append(&mut self, record: &[u8]) -> Result<(), StorageError> {
        let needed = self.end + record.len() as u64;
        debug_assert!(needed <= self.len, "append without reserve");
        #[cfg(test)]
        if self.fail_writes {
            return Err(self.error(
                "cannot write a commit",
                std::io::Error::other("injected failure"),
            ));
        }
        let end = self.end;
        write_at(&mut self.file, record, end)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| self.error("cannot write a commit", e))?;
        self.end = needed;
        Ok(())
    }

    /// Start again from the beginning of the file, once everything logged
    /// is folded (and durable) in redb.
    pub(crate) fn rewind(&mut self) {
        self.end = 0;
    }

    /// Fill the file with zeros up to `size` and make that durable.
    fn grow(&mut self, size: u64) -> Result<(), StorageError> {
        if size <= self.len {
            return Ok(());
        }
        const CHUNK: usize = 64 * 1024;
        let zeros = vec![0u8; CHUNK];
        let mut at = self.len;
        while at < size {
            let n = CHUNK.min((size - at) as usize);
            write_at(&mut self.file, &zeros[..n], at).map_err(|e| self.error("cannot grow", e))?;
            at += n as u64;
        }
        self.file
            .sync_all()
            .map_err(|e| self.error("cannot sync after growing", e))?;
        self.len = size;
        Ok(())
    }

    fn error(&self, what: &str, e: std::io::Error) -> StorageError {
        StorageError::Backend(format!("commit log {}: {what}: {e}", self.path.display()))
    }
}

/// Write `bytes` at `offset` (portable: a seek and a write, which the
/// log's exclusive `&mut` access makes safe).
fn write_at(file: &mut File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(bytes)
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StorageKey;

    fn batch() -> WriteBatch {
        let mut b = WriteBatch::new();
        b.put(
            StorageKey::new(["doc", "snapshot", "h"]).unwrap(),
            b"value".to_vec(),
        );
        b.delete(StorageKey::new(["doc", "incremental", "x"]).unwrap());
        b.put(StorageKey::new(["~meta", "empty"]).unwrap(), Vec::new());
        b
    }

    #[test]
    fn a_record_round_trips() {
        let record = encode_record(7, &logged_writes(&batch())).unwrap();
        let (writes, len) = decode_record(&record, 7).unwrap().unwrap();
        assert_eq!(len, record.len());
        assert_eq!(
            writes,
            vec![
                (b"doc\0snapshot\0h".to_vec(), Some(b"value".to_vec())),
                (b"doc\0incremental\0x".to_vec(), None),
                (b"~meta\0empty".to_vec(), Some(Vec::new())),
            ]
        );
    }

    #[test]
    fn torn_stale_or_flipped_records_end_the_log() {
        let record = encode_record(7, &logged_writes(&batch())).unwrap();
        // Another sequence number: a record from before the last fold.
        assert_eq!(decode_record(&record, 8).unwrap(), None);
        // Every truncation: a write torn by a crash.
        for cut in 0..record.len() {
            assert_eq!(decode_record(&record[..cut], 7).unwrap(), None, "cut {cut}");
        }
        // Every single flipped bit fails the checksum (or the sequence).
        for byte in 0..record.len() {
            let mut bad = record.clone();
            bad[byte] ^= 0x10;
            assert_eq!(decode_record(&bad, 7).unwrap(), None, "byte {byte}");
        }
        // Zeros, as a fresh file holds.
        assert_eq!(decode_record(&[0; 64], 1).unwrap(), None);
    }

    #[test]
    fn a_checksummed_record_that_does_not_decode_is_an_error() {
        let mut record = encode_record(3, &logged_writes(&batch())).unwrap();
        record[HEADER] = 9; // an unknown operation
        let crc = crc32fast::hash(&record[4..]);
        record[0..4].copy_from_slice(&crc.to_le_bytes());
        let err = decode_record(&record, 3).unwrap_err();
        assert!(err.to_string().contains("record 3"), "{err}");
    }

    fn append(log: &mut LogFile, seq: u64) {
        let record = encode_record(seq, &logged_writes(&batch())).unwrap();
        log.reserve(record.len()).unwrap();
        log.append(&record).unwrap();
    }

    #[test]
    fn reopening_reads_the_records_after_the_folded_one() {
        let dir = tempfile::tempdir().unwrap();
        let [a, b] = [dir.path().join("s-wal"), dir.path().join("s-wal2")];
        let read = |folded: u64| {
            let (_, first) = LogFile::open(&a, 1 << 20).unwrap();
            let (_, second) = LogFile::open(&b, 1 << 20).unwrap();
            read_records([&first, &second], folded).unwrap().len()
        };
        let (mut first, bytes) = LogFile::open(&a, 1 << 20).unwrap();
        assert!(bytes.iter().all(|&b| b == 0), "a new file is zeros");
        let (mut second, _) = LogFile::open(&b, 1 << 20).unwrap();
        assert_eq!(read(0), 0);
        for seq in 1..=3 {
            append(&mut first, seq);
        }
        assert_eq!(read(0), 3);
        // The second file goes on where the first stops, whichever file
        // holds the record after the folded one.
        for seq in 4..=5 {
            append(&mut second, seq);
        }
        assert_eq!(read(0), 5);
        assert_eq!(read(2), 0, "a fold takes whole files: 3 starts no file");
        assert_eq!(read(3), 2);
        assert_eq!(read(5), 0);
        // The first file is rewritten from its start once folded: the
        // stale records after the new ones are not read back, nor is the
        // second file, whose first record is older.
        first.rewind();
        for seq in 6..=7 {
            append(&mut first, seq);
        }
        assert_eq!(read(5), 2);
        second.rewind();
        append(&mut second, 8);
        assert_eq!(read(5), 3);
        assert_eq!(read(7), 1);
    }

    #[test]
    fn the_file_grows_to_the_capacity_and_no_further() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s-wal");
        let capacity = INITIAL_SIZE * 3;
        let (mut log, _) = LogFile::open(&path, capacity).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), INITIAL_SIZE);
        let record = vec![0u8; 100 * 1024];
        let mut appended = 0;
        while log.fits(record.len()) {
            log.reserve(record.len()).unwrap();
            log.append(&record).unwrap();
            appended += 1;
        }
        assert_eq!(appended, 7);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), capacity);
    }
}
