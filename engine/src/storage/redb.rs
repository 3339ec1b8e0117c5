//! The durable storage backend: one redb table of encoded keys to values,
//! with a commit log in front of it.
//!
//! A commit is made durable by appending it to the log (`<store>-wal` and
//! `<store>-wal2`, see [`super::log`]) and kept in memory until many commits
//! are folded into the redb table in one transaction. Records go into one
//! log file until it is full; then its commits are folded into redb on a
//! thread of their own while records go into the other file. A commit waits
//! for a fold only when it finds both files full: when commits come faster
//! than redb takes them, when a batch is larger than a whole file, on
//! [`RedbStorage::checkpoint`], when the store is dropped, and when it is
//! opened with records left in its log (after a crash). Reads see the
//! logged writes over the table.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use fastbloom::BloomFilter;
use itertools::{Either, EitherOrBoth, Itertools as _};
use redb::{
    Database, ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};

use super::log::{
    LogFile, LoggedWrite, encode_record_into, logged_writes, logged_writes_owned, read_records,
};
use super::{Storage, StorageKey, WriteBatch, prefix_range};
use crate::error::StorageError;

const TABLE: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("tandem");
/// The log's state kept in redb: `"folded"`, the sequence number of the last
/// log record whose writes are in [`TABLE`].
const LOG_STATE: TableDefinition<'static, &str, u64> = TableDefinition::new("tandem-log");
const FOLDED: &str = "folded";

/// Storage in a redb database file (`<path>`) and its commit log
/// (`<path>-wal` and `<path>-wal2`). Every [`commit`](Storage::commit) is
/// durable when it returns: written to the log and synced (`fdatasync`),
/// or, for a batch larger than a log file, written to redb in a durable
/// transaction together with everything logged before it.
///
/// The three files are one store: copy or move them together. A store that
/// was dropped normally has everything in the redb file and nothing the
/// log still needs.
#[derive(Debug)]
pub struct RedbStorage {
    db: Arc<Database>,
    /// `None` in memory: every commit is a redb transaction.
    log: Option<Mutex<Log>>,
}

/// Logged writes by encoded key (`None`: deleted).
type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

#[derive(Debug)]
struct Log {
    /// The two files; records go into `files[current]`.
    files: [LogFile; 2],
    current: usize,
    /// The sequence number of the next record.
    next: u64,
    /// Writes logged in the current file.
    pending: Writes,
    /// The other file's writes while they are not known to be in redb:
    /// being folded by `worker`, or left by a fold that failed (retried
    /// when the current file is full).
    folding: Option<Arc<Folding>>,
    /// The thread folding `folding` into redb.
    worker: Option<JoinHandle<Result<(), StorageError>>>,
    /// Why the last background fold failed, if it did.
    fold_error: Option<String>,
    /// Set when a write to the log failed: the file's state is unknown, so
    /// no later commit may be acknowledged on top of it.
    failed: Option<String>,
    /// A read snapshot of the table, shared by reads until writes leave the
    /// log (a fold that is done): until then, everything written to the
    /// table after the snapshot is still in the log, which reads consult
    /// first. Opening a snapshot per read was a few percent of a bulk
    /// insert's time.
    reader: Option<Reader>,
    /// The buffer records are encoded in, kept from one commit to the next
    /// (up to [`RECORD_BUFFER`] bytes).
    record: Vec<u8>,
    /// Which documents the store surely lacks.
    absent: Absent,
}

/// Scans that find nothing before [`Absent`] builds its filter (a few in
/// the unit tests, so that they all run with it).
const MISSES_BEFORE_FILTER: usize = if cfg!(test) { 3 } else { 256 };

/// Which first key components (document ids, for the engine's keys) no key
/// in the store has: a Bloom filter of the first component of every key,
/// so a scan, `get` or `last` under one it lacks answers without reading
/// redb. A new row is looked up before it is created, and that lookup, a
/// descent of redb's tree that finds nothing, was a ninth of a batched
/// insert's time.
///
/// The filter is built from the table and the log once
/// [`MISSES_BEFORE_FILTER`] scans have found nothing (a store that is only
/// read never builds it), under the log's lock, and every commit then adds
/// its keys before they are written, so no key is ever missing from it.
/// It is sized for twice the keys it starts with and dropped when more are
/// added (the next miss builds it again, larger). Deleted keys stay in it:
/// they only cost a real lookup.
#[derive(Debug, Default)]
struct Absent {
    filter: Option<BloomFilter>,
    /// Keys the filter is sized for.
    capacity: usize,
    /// Keys put into it (at most `capacity` while it is kept).
    added: usize,
    /// Scans that found nothing while there was no filter.
    misses: usize,
}

/// The first component of an encoded key (components are joined by NUL).
fn first_component(key: &[u8]) -> &[u8] {
    key.split(|b| *b == 0).next().unwrap_or(key)
}

impl Absent {
    /// Whether no key in the store starts with the component `first`.
    fn lacks(&self, first: &[u8]) -> bool {
        self.filter.as_ref().is_some_and(|f| !f.contains(first))
    }

    /// Take in the keys of a commit, before they are written.
    fn note(&mut self, writes: &[LoggedWrite]) {
        let Some(filter) = &mut self.filter else {
            return;
        };
        for (key, value) in writes {
            if value.is_some() {
                filter.insert(first_component(key));
                self.added += 1;
            }
        }
        if self.added > self.capacity {
            self.filter = None;
            self.misses = MISSES_BEFORE_FILTER;
        }
    }
}

/// The largest record buffer a log keeps between commits: a log file's
/// worth (larger batches go to redb directly).
const RECORD_BUFFER: usize = 8 << 20;

type Reader = ReadOnlyTable<&'static [u8], &'static [u8]>;

/// A fresh read snapshot of the table.
fn open_reader(db: &Database) -> Result<Reader, StorageError> {
    let txn = db.begin_read().map_err(backend)?;
    txn.open_table(TABLE).map_err(backend)
}

#[derive(Debug)]
struct Folding {
    writes: Writes,
    /// The sequence number of the last record among them.
    last: u64,
}

impl Log {
    /// The logged writes in `bounds`, in key order (`reverse`: descending);
    /// where both maps have a key, the current file's (newer) write.
    fn range<'a>(
        &'a self,
        bounds: (Bound<&'a [u8]>, Bound<&'a [u8]>),
        reverse: bool,
    ) -> impl Iterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)> + 'a {
        let newer = self.pending.range::<[u8], _>(bounds);
        let older = self
            .folding
            .iter()
            .flat_map(move |f| f.writes.range::<[u8], _>(bounds));
        let (newer, older) = if reverse {
            (Either::Left(newer.rev()), Either::Left(older.rev()))
        } else {
            (Either::Right(newer), Either::Right(older))
        };
        newer
            .merge_join_by(
                older,
                move |(a, _), (b, _)| {
                    if reverse { b.cmp(a) } else { a.cmp(b) }
                },
            )
            .map(|e| match e {
                EitherOrBoth::Both(newer, _) | EitherOrBoth::Left(newer) => newer,
                EitherOrBoth::Right(older) => older,
            })
    }

    /// The other file's writes are in redb: it is free again.
    fn other_folded(&mut self) {
        self.reader = None;
        self.folding = None;
        self.fold_error = None;
        self.files[1 - self.current].rewind();
    }

    /// A scan found nothing: count it, and build the filter of absent
    /// documents once enough have. A filter that cannot be built (a redb
    /// error) is only a loss of speed.
    fn missed(&mut self, db: &Database) {
        if self.absent.filter.is_some() {
            return;
        }
        self.absent.misses += 1;
        if self.absent.misses < MISSES_BEFORE_FILTER {
            return;
        }
        if let Err(e) = self.build_filter(db) {
            tracing::warn!(error = %e, "cannot build the filter of absent documents");
            self.absent.misses = 0;
        }
    }

    /// The first component of every key in the table and the log.
    fn build_filter(&mut self, db: &Database) -> Result<(), StorageError> {
        let table = open_reader(db)?;
        let stored = usize::try_from(table.len().map_err(backend)?).unwrap_or(usize::MAX);
        let folding = self.folding.as_ref().map(|f| &f.writes);
        let logged = self.pending.len() + folding.map_or(0, BTreeMap::len);
        let keys = stored.saturating_add(logged);
        let capacity = keys.saturating_mul(2).max(1 << 12);
        let mut filter = BloomFilter::with_false_pos(0.01).expected_items(capacity);
        for item in table.iter().map_err(backend)? {
            let (key, _) = item.map_err(backend)?;
            filter.insert(first_component(key.value()));
        }
        for key in self
            .pending
            .keys()
            .chain(folding.into_iter().flat_map(BTreeMap::keys))
        {
            filter.insert(first_component(key));
        }
        self.absent = Absent {
            filter: Some(filter),
            capacity,
            added: keys,
            misses: 0,
        };
        Ok(())
    }

    /// Whether the store surely has no key under `prefix` (one that names
    /// at least a first component).
    fn lacks(&self, prefix: &StorageKey) -> bool {
        prefix
            .parts()
            .first()
            .is_some_and(|first| self.absent.lacks(first.as_bytes()))
    }

    /// The logged write of `key`, if any.
    fn get(&self, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.pending
            .get(key)
            .or_else(|| self.folding.as_ref().and_then(|f| f.writes.get(key)))
    }
}

impl RedbStorage {
    /// The log capacity [`open`](Self::open) uses: 4 MiB of commits in each
    /// of the log's two files.
    pub const DEFAULT_LOG_CAPACITY: u64 = 4 * 1024 * 1024;

    /// Open the store at `path`, creating it (and its table) if needed, with
    /// a commit log of [`DEFAULT_LOG_CAPACITY`](Self::DEFAULT_LOG_CAPACITY).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        Self::open_with_log_capacity(path, Self::DEFAULT_LOG_CAPACITY)
    }

    /// Open the store at `path` with a commit log of two files of at most
    /// `capacity` bytes each (the commits of one are folded into redb each
    /// time the other fills). `0` turns the log off: every commit is then
    /// one durable redb transaction. Records a previous run left in the log
    /// are folded first, whatever the capacity.
    pub fn open_with_log_capacity(
        path: impl AsRef<Path>,
        capacity: u64,
    ) -> Result<Self, StorageError> {
        let path = path.as_ref();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StorageError::Backend(format!("cannot create directory {}: {e}", parent.display()))
            })?;
        }
        if !path.exists() {
            create_atomically(path)?;
        }
        let db = Database::create(path).map_err(|e| {
            StorageError::Backend(format!("cannot open store {}: {e}", path.display()))
        })?;
        Self::with_database(db, path, capacity)
    }

    /// The rest of [`open_with_log_capacity`](Self::open_with_log_capacity),
    /// once redb has opened the store at `path` as `db` (tests open it on a
    /// backend that fails on demand).
    fn with_database(db: Database, path: &Path, capacity: u64) -> Result<Self, StorageError> {
        let mut storage = Self {
            db: Arc::new(db),
            log: None,
        };
        storage.ensure_table()?;
        let paths = Self::log_paths(path);
        if capacity == 0 && !paths.iter().any(|p| p.exists()) {
            return Ok(storage);
        }
        let folded = storage.folded()?;
        // The capacity fits a u32 record length.
        let capacity = capacity.min(u32::MAX.into());
        let (first, first_bytes) = LogFile::open(&paths[0], capacity)?;
        let (second, second_bytes) = LogFile::open(&paths[1], capacity)?;
        let records = read_records([&first_bytes, &second_bytes], folded)?;
        drop((first_bytes, second_bytes));
        let mut log = Log {
            files: [first, second],
            current: 0,
            next: folded + 1,
            pending: BTreeMap::new(),
            folding: None,
            worker: None,
            fold_error: None,
            reader: None,
            record: Vec::new(),
            absent: Absent::default(),
            failed: None,
        };
        if !records.is_empty() {
            tracing::info!(
                records = records.len(),
                "folding the commit log's records into the store"
            );
            log.next += records.len() as u64;
            for (key, value) in records.into_iter().flatten() {
                log.pending.insert(key, value);
            }
            storage.fold(&mut log, &[])?;
        }
        if capacity == 0 {
            drop(log);
            for path in &paths {
                if path.exists() {
                    std::fs::remove_file(path).map_err(|e| {
                        StorageError::Backend(format!(
                            "cannot remove the commit log {}: {e}",
                            path.display()
                        ))
                    })?;
                }
            }
            return Ok(storage);
        }
        storage.log = Some(Mutex::new(log));
        Ok(storage)
    }

    /// The commit log's two files for the store at `path`: `<path>-wal` and
    /// `<path>-wal2`, beside it.
    pub fn log_paths(path: impl AsRef<Path>) -> [PathBuf; 2] {
        ["-wal", "-wal2"].map(|suffix| {
            let mut log_path = path.as_ref().as_os_str().to_owned();
            log_path.push(suffix);
            PathBuf::from(log_path)
        })
    }

    /// Create the tables on first open, so reads never meet a missing table.
    /// An existing store is not written to (no fsync on open).
    fn ensure_table(&self) -> Result<(), StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let missing = |r: Result<_, redb::TableError>| match r {
            Ok(_) => Ok(false),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(true),
            Err(e) => Err(backend(e)),
        };
        if missing(txn.open_table(TABLE).map(drop))?
            || missing(txn.open_table(LOG_STATE).map(drop))?
        {
            let txn = self.db.begin_write().map_err(backend)?;
            txn.open_table(TABLE).map_err(backend)?;
            txn.open_table(LOG_STATE).map_err(backend)?;
            txn.commit().map_err(backend)?;
        }
        Ok(())
    }

    /// The sequence number of the last log record folded into the table.
    fn folded(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let state = txn.open_table(LOG_STATE).map_err(backend)?;
        Ok(state.get(FOLDED).map_err(backend)?.map_or(0, |v| v.value()))
    }

    /// A database kept in memory (redb's own in-memory backend), without a
    /// commit log.
    pub fn in_memory() -> Result<Self, StorageError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(backend)?;
        let storage = Self {
            db: Arc::new(db),
            log: None,
        };
        storage.ensure_table()?;
        Ok(storage)
    }

    /// Fold everything the commit log holds into the redb file now, in one
    /// durable transaction (after waiting for a fold under way). Afterwards
    /// the redb file alone holds every commit (for example before copying
    /// it). Dropping the store does this too.
    pub fn checkpoint(&self) -> Result<(), StorageError> {
        match &self.log {
            None => Ok(()),
            Some(log) => {
                let mut log = self.lock(log)?;
                self.fold(&mut log, &[])
            }
        }
    }

    fn lock<'a>(&self, log: &'a Mutex<Log>) -> Result<MutexGuard<'a, Log>, StorageError> {
        let log = log.lock().unwrap_or_else(|e| e.into_inner());
        match &log.failed {
            Some(why) => Err(StorageError::Backend(format!(
                "the commit log failed earlier ({why}); reopen the store to recover what was acknowledged"
            ))),
            None => Ok(log),
        }
    }

    /// Take the result of the background fold if it is done (or, with
    /// `wait`, once it is): its file is free again, or, if it failed, its
    /// writes stay in `folding` for the next fold to retry.
    fn reap(log: &mut Log, wait: bool) {
        let Some(worker) = log.worker.take_if(|w| wait || w.is_finished()) else {
            return;
        };
        let result = worker.join().unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Err(StorageError::Backend(format!("the fold panicked: {why}")))
        });
        match result {
            Ok(()) => log.other_folded(),
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "folding the commit log into the store failed; its commits stay in the log, and the next fold retries"
                );
                log.fold_error = Some(e.to_string());
            }
        }
    }

    /// Fold everything logged, and then `extra` (a batch that went to no
    /// log file, with sequence number `next - 1`), into the table in one
    /// durable transaction, after waiting for the background fold; then
    /// start both files afresh.
    fn fold(&self, log: &mut Log, extra: &[LoggedWrite]) -> Result<(), StorageError> {
        Self::reap(log, true);
        if log.pending.is_empty() && log.folding.is_none() && extra.is_empty() {
            return Ok(());
        }
        let older = log.folding.iter().flat_map(|f| f.writes.iter());
        let writes = older
            .chain(log.pending.iter())
            .chain(extra.iter().map(|(k, v)| (k, v)));
        fold_into(&self.db, writes, log.next - 1).map_err(|e| self.fold_failed(log, e))?;
        log.reader = None;
        log.pending.clear();
        log.folding = None;
        log.fold_error = None;
        log.files.iter_mut().for_each(LogFile::rewind);
        Ok(())
    }

    /// The error for a fold that failed now, naming the background fold's
    /// failure before it, if there was one.
    fn fold_failed(&self, log: &Log, e: StorageError) -> StorageError {
        match &log.fold_error {
            Some(earlier) => StorageError::Backend(format!(
                "cannot fold the commit log into the store: {e} (the background fold failed before: {earlier})"
            )),
            None => e,
        }
    }

    /// The current file is full: wait for the other file's fold (retrying
    /// it if it failed), then fold the current file's writes on a thread of
    /// their own and go on in the other file.
    fn switch_files(&self, log: &mut Log) -> Result<(), StorageError> {
        Self::reap(log, true);
        self.fold_other_here(log)?;
        let folding = Arc::new(Folding {
            writes: std::mem::take(&mut log.pending),
            last: log.next - 1,
        });
        log.folding = Some(folding.clone());
        log.current = 1 - log.current;
        let db = self.db.clone();
        let spawned = std::thread::Builder::new()
            .name("tandem-fold".into())
            .spawn(move || fold_into(&db, folding.writes.iter(), folding.last));
        match spawned {
            Ok(worker) => log.worker = Some(worker),
            Err(e) => {
                // No thread: fold here instead.
                tracing::warn!(error = %e, "cannot start a fold thread; folding in the caller");
                self.fold_other_here(log)?;
            }
        }
        Ok(())
    }

    /// Fold the other file's writes (`folding`, if any: a fold that failed,
    /// or one no thread could take) in the caller, and free that file.
    fn fold_other_here(&self, log: &mut Log) -> Result<(), StorageError> {
        if let Some(folding) = log.folding.clone() {
            fold_into(&self.db, folding.writes.iter(), folding.last)
                .map_err(|e| self.fold_failed(log, e))?;
            log.other_folded();
        }
        Ok(())
    }

    /// Wait until no fold is under way (tests: a copy of the files is then
    /// what a crash would leave).
    #[cfg(test)]
    fn settle(&self) {
        if let Some(log) = &self.log {
            Self::reap(&mut log.lock().unwrap(), true);
        }
    }
}

/// Write `writes` (in order: a later write of a key wins) into the table in
/// one durable transaction that also records `last` as the last folded log
/// record.
fn fold_into<'a>(
    db: &Database,
    writes: impl IntoIterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)>,
    last: u64,
) -> Result<(), StorageError> {
    let txn = db.begin_write().map_err(backend)?;
    {
        let mut table = txn.open_table(TABLE).map_err(backend)?;
        write_all(&mut table, writes)?;
        let mut state = txn.open_table(LOG_STATE).map_err(backend)?;
        state.insert(FOLDED, last).map_err(backend)?;
    }
    txn.commit().map_err(backend)
}

/// Create a new store so that a crash at any instant leaves either no file or
/// a complete, openable one. redb writes a new file's header before its magic
/// number; a process killed in between would leave a file redb refuses to
/// open ever after. So build it under a temporary name, make it durable, and
/// rename it into place.
fn create_atomically(path: &Path) -> Result<(), StorageError> {
    let io = |what: &str, e: std::io::Error| {
        StorageError::Backend(format!(
            "cannot create store {}: {what}: {e}",
            path.display()
        ))
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".creating");
    let tmp = path.with_file_name(tmp_name);
    // Left over from a crash during an earlier creation: it never held data.
    if tmp.exists() {
        std::fs::remove_file(&tmp).map_err(|e| io("removing a half-created store", e))?;
    }
    {
        let db = Database::create(&tmp).map_err(|e| {
            StorageError::Backend(format!("cannot create store {}: {e}", tmp.display()))
        })?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(TABLE).map_err(backend)?;
        txn.open_table(LOG_STATE).map_err(backend)?;
        txn.commit().map_err(backend)?;
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming into place", e))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing the directory", e))?;
    Ok(())
}

fn backend(e: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(e.to_string())
}

/// Put or remove (`None`) each encoded key, in order.
fn write_all<'a>(
    table: &mut redb::Table<'_, &[u8], &[u8]>,
    writes: impl IntoIterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)>,
) -> Result<(), StorageError> {
    for (key, value) in writes {
        match value {
            Some(v) => table.insert(key.as_slice(), v.as_slice()).map(drop),
            None => table.remove(key.as_slice()).map(drop),
        }
        .map_err(backend)?;
    }
    Ok(())
}

/// An encoded key and its value, as the table holds them.
type RawEntry = (Vec<u8>, Vec<u8>);

fn entry(key: &[u8], value: Vec<u8>) -> Result<(StorageKey, Vec<u8>), StorageError> {
    Ok((StorageKey::decode(key)?, value))
}

impl RedbStorage {
    /// The logged writes, locked, if there is a log; reads hold the lock so
    /// that no fold moves writes from the log to the table under them.
    fn pending(&self) -> Result<Option<MutexGuard<'_, Log>>, StorageError> {
        self.log.as_ref().map(|log| self.lock(log)).transpose()
    }

    /// The log (as [`pending`](Self::pending)) and the table to read under
    /// it: the log's kept snapshot, opened if there is none, or without a
    /// log a fresh one in `own`.
    fn for_reading<'a>(
        &self,
        log: &'a mut Option<MutexGuard<'_, Log>>,
        own: &'a mut Option<Reader>,
    ) -> Result<(Option<&'a Log>, &'a Reader), StorageError> {
        match log.as_deref_mut() {
            Some(l) => {
                if l.reader.is_none() {
                    l.reader = Some(open_reader(&self.db)?);
                }
                let l: &'a Log = l;
                Ok((Some(l), l.reader.as_ref().expect("just opened")))
            }
            None => Ok((None, own.insert(open_reader(&self.db)?))),
        }
    }
}

impl Storage for RedbStorage {
    fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>, StorageError> {
        let mut log = self.pending()?;
        if log.as_ref().is_some_and(|l| l.lacks(key)) {
            return Ok(None);
        }
        let key = key.encode();
        if let Some(logged) = log.as_ref().and_then(|l| l.get(&key)) {
            return Ok(logged.clone());
        }
        let mut own = None;
        let (_, table) = self.for_reading(&mut log, &mut own)?;
        let value = table.get(key.as_slice()).map_err(backend)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn scan(
        &self,
        prefix: &StorageKey,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError> {
        let mut log = self.pending()?;
        if log.as_ref().is_some_and(|l| l.lacks(prefix)) {
            return Ok(Vec::new());
        }
        let out = self.scan_under(&mut log, prefix, after, limit)?;
        // A whole document found missing (as before each new row).
        if out.is_empty()
            && after.is_none()
            && limit > 0
            && !prefix.parts().is_empty()
            && let Some(l) = log.as_deref_mut()
        {
            l.missed(&self.db);
        }
        Ok(out)
    }

    fn last(&self, prefix: &StorageKey) -> Result<Option<(StorageKey, Vec<u8>)>, StorageError> {
        let mut log = self.pending()?;
        if log.as_ref().is_some_and(|l| l.lacks(prefix)) {
            return Ok(None);
        }
        self.last_under(&mut log, prefix)
    }

    fn commit(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        self.commit_writes(logged_writes(batch))
    }

    fn commit_owned(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.commit_writes(logged_writes_owned(batch))
    }
}

impl RedbStorage {
    /// [`Storage::scan`] with the log locked (`log`).
    fn scan_under(
        &self,
        log: &mut Option<MutexGuard<'_, Log>>,
        prefix: &StorageKey,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError> {
        let (start, inclusive, end) = prefix_range(prefix, after);
        let lower = if inclusive {
            Bound::Included(start.as_slice())
        } else {
            Bound::Excluded(start.as_slice())
        };
        let bounds = (lower, Bound::Excluded(end.as_slice()));
        let mut own = None;
        let (log, table) = self.for_reading(log, &mut own)?;
        let mut logged = log.iter().flat_map(|l| l.range(bounds, false)).peekable();
        let mut range = table.range::<&[u8]>(bounds).map_err(backend)?;
        let mut next_stored = || -> Result<Option<RawEntry>, StorageError> {
            match range.next() {
                None => Ok(None),
                Some(item) => {
                    let (k, v) = item.map_err(backend)?;
                    Ok(Some((k.value().to_vec(), v.value().to_vec())))
                }
            }
        };
        // Merge the two sorted sequences; on equal keys the log's write
        // (a newer value, or a delete) wins.
        let mut out = Vec::new();
        let mut stored = next_stored()?;
        while out.len() < limit {
            let from_log = match (&stored, logged.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((sk, _)), Some((lk, _))) => lk.as_slice() <= sk.as_slice(),
            };
            if from_log {
                let Some((lk, lv)) = logged.next() else { break };
                if stored.as_ref().is_some_and(|(sk, _)| sk == lk) {
                    stored = next_stored()?;
                }
                if let Some(v) = lv {
                    out.push(entry(lk, v.clone())?);
                }
            } else if let Some((sk, sv)) = stored.take() {
                out.push(entry(&sk, sv)?);
                stored = next_stored()?;
            }
        }
        Ok(out)
    }

    /// [`Storage::last`] with the log locked (`log`).
    fn last_under(
        &self,
        log: &mut Option<MutexGuard<'_, Log>>,
        prefix: &StorageKey,
    ) -> Result<Option<(StorageKey, Vec<u8>)>, StorageError> {
        let (start, _, end) = prefix_range(prefix, None);
        let mut own = None;
        let (log, table) = self.for_reading(log, &mut own)?;
        let bounds = (
            Bound::Included(start.as_slice()),
            Bound::Excluded(end.as_slice()),
        );
        let logged = log.and_then(|l| {
            l.range(bounds, true)
                .find_map(|(k, v)| v.as_ref().map(|v| (k, v)))
        });
        let range = table
            .range::<&[u8]>(start.as_slice()..end.as_slice())
            .map_err(backend)?;
        let mut stored = None;
        for item in range.rev() {
            let (k, v) = item.map_err(backend)?;
            // A key the log wrote is the log's to answer for.
            if log.is_some_and(|l| l.get(k.value()).is_some()) {
                continue;
            }
            stored = Some((k.value().to_vec(), v.value().to_vec()));
            break;
        }
        match (logged, stored) {
            (Some((lk, lv)), Some((sk, sv))) => {
                if lk.as_slice() > sk.as_slice() {
                    entry(lk, lv.clone()).map(Some)
                } else {
                    entry(&sk, sv).map(Some)
                }
            }
            (Some((lk, lv)), None) => entry(lk, lv.clone()).map(Some),
            (None, Some((sk, sv))) => entry(&sk, sv).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// [`Storage::commit`] of a batch's writes.
    fn commit_writes(&self, writes: Vec<LoggedWrite>) -> Result<(), StorageError> {
        let Some(log) = &self.log else {
            let txn = self.db.begin_write().map_err(backend)?;
            write_all(
                &mut txn.open_table(TABLE).map_err(backend)?,
                writes.iter().map(|(k, v)| (k, v)),
            )?;
            return txn.commit().map_err(backend);
        };
        if writes.is_empty() {
            return Ok(());
        }
        let mut log = self.lock(log)?;
        Self::reap(&mut log, false);
        // Before anything is written: a key the filter lacks is never stored.
        log.absent.note(&writes);
        let mut record = std::mem::take(&mut log.record);
        encode_record_into(&mut record, log.next, &writes)?;
        let result = self.append(&mut log, &record, writes);
        if record.capacity() <= RECORD_BUFFER {
            log.record = record;
        }
        result
    }

    /// Append `record` (of `writes`) to the log, durably; or, if it is
    /// larger than a log file, write it to redb with everything before it.
    fn append(
        &self,
        log: &mut Log,
        record: &[u8],
        writes: Vec<LoggedWrite>,
    ) -> Result<(), StorageError> {
        if !log.files[log.current].fits(record.len()) {
            if !log.files[1 - log.current].fits_when_empty(record.len()) {
                // Larger than a whole log file: the batch goes to redb with
                // everything logged before it, in one durable transaction.
                log.next += 1;
                if let Err(e) = self.fold(log, &writes) {
                    log.next -= 1;
                    return Err(e);
                }
                return Ok(());
            }
            self.switch_files(log)?;
        }
        // Growing the file (zeros, then a sync) touches no record yet: a
        // failure there refuses this commit only.
        let current = log.current;
        log.files[current].reserve(record.len())?;
        if let Err(e) = log.files[current].append(record) {
            log.failed = Some(e.to_string());
            return Err(e);
        }
        log.next += 1;
        log.pending.extend(writes);
        Ok(())
    }
}

impl Drop for RedbStorage {
    fn drop(&mut self) {
        // Whatever else failed, no fold thread outlives the store (it holds
        // the database open), nor does the kept read snapshot.
        if let Some(log) = &self.log {
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            Self::reap(&mut log, true);
            log.reader = None;
        }
        if let Err(e) = self.checkpoint() {
            tracing::warn!(
                error = %e,
                "could not fold the commit log into the store on close; the next open folds it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::storage::log::encode_record;

    #[test]
    fn keeps_the_storage_contract_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        super::super::contract::check(&RedbStorage::open(dir.path().join("s.redb")).unwrap());
        // Without the log, and with one so small that most commits fold.
        let off = RedbStorage::open_with_log_capacity(dir.path().join("off.redb"), 0).unwrap();
        super::super::contract::check(&off);
        assert!(!dir.path().join("off.redb-wal").exists());
        assert!(!dir.path().join("off.redb-wal2").exists());
        let tiny = RedbStorage::open_with_log_capacity(dir.path().join("tiny.redb"), 120).unwrap();
        super::super::contract::check(&tiny);
    }

    fn key(i: u8) -> StorageKey {
        StorageKey::new(["d", &format!("{i:03}")]).unwrap()
    }

    /// The files as a crash at this instant would leave them: copied while
    /// `store`, open at `from`, is between two commits and folds nothing
    /// (what it wrote is in the page cache, so the copy holds it, as the
    /// disk would after a kill).
    fn crash_copy(store: &RedbStorage, from: &Path, to: &Path) {
        store.settle();
        copy_files(from, to);
    }

    /// Copy the store at `from` (its redb file and both log files) to `to`.
    fn copy_files(from: &Path, to: &Path) {
        std::fs::copy(from, to).unwrap();
        for (from, to) in RedbStorage::log_paths(from)
            .iter()
            .zip(RedbStorage::log_paths(to))
        {
            std::fs::copy(from, to).unwrap();
        }
    }

    fn no_log_files(path: &Path) -> bool {
        RedbStorage::log_paths(path).iter().all(|p| !p.exists())
    }

    #[test]
    fn a_crash_loses_no_logged_commit_and_reopening_folds_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let copy = dir.path().join("copy.redb");
        let s = RedbStorage::open_with_log_capacity(&path, 4096).unwrap();
        // Enough commits to fold several times, with deletes that hide
        // folded keys, ending with some in the log only.
        let logged = |s: &RedbStorage| s.log.as_ref().unwrap().lock().unwrap().pending.len();
        let mut commits = 0;
        for i in 0..=255u8 {
            let mut b = WriteBatch::new();
            b.put(key(i), vec![i; 50]);
            if i % 3 == 0 {
                b.delete(key(i / 2));
            }
            s.commit(&b).unwrap();
            commits += 1;
            if i >= 150 && logged(&s) > 0 {
                break;
            }
        }
        assert!(logged(&s) > 0, "the last commits are in the log only");
        s.settle();
        assert!(s.folded().unwrap() > 100, "earlier ones were folded");
        let expect = s
            .scan(&StorageKey::new(["d"]).unwrap(), None, usize::MAX)
            .unwrap();
        crash_copy(&s, &path, &copy);

        let reopened = RedbStorage::open(&copy).unwrap();
        let prefix = StorageKey::new(["d"]).unwrap();
        assert_eq!(reopened.scan(&prefix, None, usize::MAX).unwrap(), expect);
        // Opening folded the log into the table: redb alone holds it all.
        assert!(
            reopened
                .log
                .as_ref()
                .unwrap()
                .lock()
                .unwrap()
                .pending
                .is_empty()
        );
        assert_eq!(reopened.folded().unwrap(), commits);
        drop(reopened);
        // A store that was dropped needs no log.
        for path in RedbStorage::log_paths(&copy) {
            std::fs::remove_file(path).unwrap();
        }
        let reopened = RedbStorage::open_with_log_capacity(&copy, 0).unwrap();
        assert_eq!(reopened.scan(&prefix, None, usize::MAX).unwrap(), expect);

        // A crash copy opened without a log folds it, then removes it.
        let second = dir.path().join("second.redb");
        crash_copy(&s, &path, &second);
        let reopened = RedbStorage::open_with_log_capacity(&second, 0).unwrap();
        assert_eq!(reopened.scan(&prefix, None, usize::MAX).unwrap(), expect);
        assert!(no_log_files(&second));
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let copy = dir.path().join("copy.redb");
        let s = RedbStorage::open(&path).unwrap();
        for i in 0..3u8 {
            let mut b = WriteBatch::new();
            b.put(key(i), vec![i; 10]);
            s.commit(&b).unwrap();
        }
        crash_copy(&s, &path, &copy);
        // Tear the third record: its commit was never acknowledged.
        let [wal, _] = RedbStorage::log_paths(&copy);
        let mut bytes = std::fs::read(&wal).unwrap();
        let mut b = WriteBatch::new();
        b.put(key(2), vec![2; 10]);
        let record = encode_record(3, &logged_writes(&b)).unwrap();
        let third = bytes
            .windows(record.len())
            .position(|w| w == record)
            .unwrap();
        bytes[third + record.len() - 1] ^= 1;
        std::fs::write(&wal, bytes).unwrap();

        let reopened = RedbStorage::open(&copy).unwrap();
        assert_eq!(reopened.get(&key(1)).unwrap(), Some(vec![1; 10]));
        assert_eq!(reopened.get(&key(2)).unwrap(), None);
        // The next commit takes the torn one's place, and survives a crash.
        let mut b = WriteBatch::new();
        b.put(key(9), b"after".to_vec());
        reopened.commit(&b).unwrap();
        let again = dir.path().join("again.redb");
        crash_copy(&reopened, &copy, &again);
        let reopened = RedbStorage::open(&again).unwrap();
        assert_eq!(reopened.get(&key(9)).unwrap(), Some(b"after".to_vec()));
        assert_eq!(reopened.get(&key(1)).unwrap(), Some(vec![1; 10]));
    }

    #[test]
    fn after_a_failed_log_write_every_commit_is_refused_and_reopening_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let copy = dir.path().join("copy.redb");
        let s = RedbStorage::open(&path).unwrap();
        let put = |i: u8| {
            let mut b = WriteBatch::new();
            b.put(key(i), vec![i; 10]);
            b
        };
        s.commit(&put(1)).unwrap();
        s.log.as_ref().unwrap().lock().unwrap().files[0].fail_writes = true;
        let err = s.commit(&put(2)).unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        // The disk is fine again, but what the failed write left is unknown:
        // nothing more is acknowledged on top of it.
        s.log.as_ref().unwrap().lock().unwrap().files[0].fail_writes = false;
        let err = s.commit(&put(3)).unwrap_err();
        assert!(err.to_string().contains("reopen the store"), "{err}");
        assert!(s.checkpoint().is_err());
        crash_copy(&s, &path, &copy);
        drop(s);
        // Reopening recovers every acknowledged commit, and works on.
        let reopened = RedbStorage::open(&copy).unwrap();
        assert_eq!(reopened.get(&key(1)).unwrap(), Some(vec![1; 10]));
        assert_eq!(reopened.get(&key(2)).unwrap(), None);
        reopened.commit(&put(3)).unwrap();
        assert_eq!(reopened.get(&key(3)).unwrap(), Some(vec![3; 10]));
    }

    /// redb's file, failing every write and sync while `fail` is set, and
    /// holding them (blocked) while `held` is.
    #[derive(Debug)]
    struct Flaky {
        file: redb::backends::FileBackend,
        fail: Arc<AtomicBool>,
        held: Arc<Hold>,
    }

    /// A gate for redb's writes: closed, they wait until it opens.
    #[derive(Debug, Default)]
    struct Hold {
        closed: std::sync::Mutex<bool>,
        opened: std::sync::Condvar,
        /// Writes that found the gate closed.
        waited: std::sync::atomic::AtomicUsize,
    }

    impl Hold {
        fn set(&self, closed: bool) {
            *self.closed.lock().unwrap() = closed;
            self.opened.notify_all();
        }

        fn pass(&self) {
            let mut closed = self.closed.lock().unwrap();
            if *closed {
                self.waited.fetch_add(1, Ordering::SeqCst);
            }
            while *closed {
                closed = self.opened.wait(closed).unwrap();
            }
        }
    }

    /// Opens the gate when dropped.
    struct Release(Arc<Hold>);

    impl Drop for Release {
        fn drop(&mut self) {
            self.0.set(false);
        }
    }

    impl Flaky {
        fn check(&self) -> std::io::Result<()> {
            self.held.pass();
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("injected redb failure"));
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for Flaky {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.file.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.file.write(offset, data)
        }
    }

    /// A store at `path` with two log files of `capacity` bytes, on a redb
    /// backend that fails or holds its writes on demand.
    fn flaky_store(path: &Path, capacity: u64) -> (RedbStorage, Arc<AtomicBool>, Arc<Hold>) {
        // Created without a log, so the one opened below has `capacity`.
        drop(RedbStorage::open_with_log_capacity(path, 0).unwrap());
        let fail = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Hold::default());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let backend = Flaky {
            file: redb::backends::FileBackend::new(file).unwrap(),
            fail: fail.clone(),
            held: held.clone(),
        };
        let db = Database::builder().create_with_backend(backend).unwrap();
        let s = RedbStorage::with_database(db, path, capacity).unwrap();
        (s, fail, held)
    }

    fn put100(i: u8) -> WriteBatch {
        let mut b = WriteBatch::new();
        b.put(key(i), vec![i; 100]);
        b
    }

    #[test]
    fn commits_go_on_while_a_fold_is_held_and_a_crash_then_loses_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let copy = dir.path().join("copy.redb");
        let (s, _, held) = flaky_store(&path, 1024);
        let s = Arc::new(s);
        // Dropped before `s`: if an assertion fails while the fold is held,
        // the store's drop (which waits for the fold) must not hang the test.
        let _release = Release(held.clone());
        s.commit(&put100(0)).unwrap();
        s.checkpoint().unwrap();
        let folded = s.folded().unwrap();
        // redb's writes now block: the first file's fold starts and hangs
        // in redb, and commits go on into the second file without waiting
        // for it (on a thread, so that a commit that waited shows as a
        // timeout, not a hung test).
        held.set(true);
        let (done, acknowledged) = std::sync::mpsc::channel();
        let writer = s.clone();
        std::thread::spawn(move || {
            for i in 1..=14u8 {
                writer.commit(&put100(i)).unwrap();
                done.send(i).unwrap();
            }
        });
        let mut last = 0;
        while last < 14 {
            last = acknowledged
                .recv_timeout(std::time::Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("commit {} waited for the held fold", last + 1));
        }
        assert!(held.waited.load(Ordering::SeqCst) > 0, "a fold is held");
        {
            let log = s.log.as_ref().unwrap().lock().unwrap();
            assert!(log.worker.is_some() && log.folding.is_some());
            assert!(log.pending.len() > 2, "the second file has commits");
        }
        // Reads see every commit, the held fold's under the newer ones.
        for i in 0..=14u8 {
            assert_eq!(s.get(&key(i)).unwrap(), Some(vec![i; 100]));
        }
        let prefix = StorageKey::new(["d"]).unwrap();
        assert_eq!(s.scan(&prefix, None, usize::MAX).unwrap().len(), 15);
        assert_eq!(s.last(&prefix).unwrap().unwrap().0, key(14));
        assert_eq!(s.folded().unwrap(), folded, "nothing folded yet");
        // A crash now (redb has written nothing of the held fold): the
        // records are in both files, and reopening reads on from the first
        // into the second.
        copy_files(&path, &copy);
        let reopened = RedbStorage::open(&copy).unwrap();
        for i in 0..=14u8 {
            assert_eq!(reopened.get(&key(i)).unwrap(), Some(vec![i; 100]));
        }
        assert_eq!(reopened.folded().unwrap(), folded + 14);
        drop(reopened);
        // Released, the fold completes and a checkpoint folds the rest.
        held.set(false);
        s.checkpoint().unwrap();
        assert_eq!(s.folded().unwrap(), folded + 14);
        assert_eq!(s.scan(&prefix, None, usize::MAX).unwrap().len(), 15);
    }

    #[test]
    fn a_failed_fold_refuses_that_commit_only_and_loses_no_logged_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let copy = dir.path().join("copy.redb");
        let (s, fail, _) = flaky_store(&path, 1024);
        let put = put100;
        s.commit(&put(0)).unwrap();
        s.checkpoint().unwrap();
        // redb now fails: commits go on into the log until both files are
        // full (the fold of the first fails on its thread), and the one
        // that needs a fold is refused.
        fail.store(true, Ordering::SeqCst);
        let mut acknowledged = vec![0];
        let refused = (1..50)
            .find(|&i| match s.commit(&put(i)) {
                Ok(()) => {
                    acknowledged.push(i);
                    false
                }
                Err(e) => {
                    assert!(e.to_string().contains("injected redb failure"), "{e}");
                    true
                }
            })
            .expect("two 1 KiB log files fill within 50 commits of 100 bytes");
        {
            let log = s.log.as_ref().unwrap().lock().unwrap();
            let earlier = log
                .fold_error
                .as_deref()
                .expect("the background fold failed");
            assert!(earlier.contains("injected redb failure"), "{earlier}");
            let folding = log.folding.as_ref().expect("its writes are kept");
            // Acknowledged commits in both files: the first file's (kept
            // from the failed fold) and the second's.
            assert!(folding.writes.len() > 2 && log.pending.len() > 2);
            assert_eq!(
                folding.writes.len() + log.pending.len() + 1,
                acknowledged.len()
            );
        }
        for &i in &acknowledged {
            assert_eq!(s.get(&key(i)).unwrap(), Some(vec![i; 100]));
        }
        assert_eq!(s.get(&key(refused)).unwrap(), None);
        assert_eq!(
            s.scan(&StorageKey::new(["d"]).unwrap(), None, usize::MAX)
                .unwrap()
                .len(),
            acknowledged.len()
        );
        assert!(s.checkpoint().is_err());
        // redb refuses every write after an I/O error, even once the disk
        // works again, and says to reopen; reads go on.
        fail.store(false, Ordering::SeqCst);
        let err = s.commit(&put(refused)).unwrap_err();
        assert!(err.to_string().contains("re-open"), "{err}");
        assert_eq!(s.get(&key(0)).unwrap(), Some(vec![0; 100]));
        // A crash now: the log holds every acknowledged commit, and the next
        // open folds them.
        crash_copy(&s, &path, &copy);
        drop(s);
        let reopened = RedbStorage::open(&copy).unwrap();
        for &i in &acknowledged {
            assert_eq!(reopened.get(&key(i)).unwrap(), Some(vec![i; 100]));
        }
        assert_eq!(reopened.get(&key(refused)).unwrap(), None);
        reopened.commit(&put(refused)).unwrap();
        drop(reopened);
        let reopened = RedbStorage::open_with_log_capacity(&copy, 0).unwrap();
        assert_eq!(
            reopened.get(&key(refused)).unwrap(),
            Some(vec![refused; 100])
        );
        assert!(no_log_files(&copy));
    }

    /// A key under document `d` (of 12), numbered `i`.
    fn doc_key(d: u8, i: u8) -> StorageKey {
        StorageKey::new([format!("doc{}", d % 12), format!("{i:03}")]).unwrap()
    }

    fn filter(s: &RedbStorage) -> Option<(usize, usize)> {
        let log = s.log.as_ref().unwrap().lock().unwrap();
        log.absent
            .filter
            .as_ref()
            .map(|_| (log.absent.added, log.absent.capacity))
    }

    /// The filter of absent documents is built after a few misses, answers
    /// for documents that were never written, learns every commit, and is
    /// dropped and built again when it outgrows its size: no key is ever
    /// missed.
    #[test]
    fn the_absent_filter_never_hides_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStorage::open_with_log_capacity(dir.path().join("s.redb"), 64 * 1024).unwrap();
        let mut b = WriteBatch::new();
        b.put(doc_key(0, 0), vec![0; 8]);
        s.commit(&b).unwrap();
        s.checkpoint().unwrap();
        assert_eq!(filter(&s), None);
        let never = StorageKey::new(["never"]).unwrap();
        for _ in 0..MISSES_BEFORE_FILTER {
            assert!(s.scan(&never, None, usize::MAX).unwrap().is_empty());
        }
        let (added, capacity) = filter(&s).expect("built after the misses");
        assert!(added >= 1 && capacity >= 2 * added);
        assert!(s.pending().unwrap().unwrap().lacks(&never));
        // Stored before the filter (and folded into redb): found.
        assert_eq!(s.get(&doc_key(0, 0)).unwrap(), Some(vec![0; 8]));
        // Committed after it, then grown past its size: always found.
        for i in 0..=capacity {
            let mut b = WriteBatch::new();
            b.put(doc_key(1, (i % 200) as u8), vec![1]);
            b.put(
                StorageKey::new([format!("new{i}"), "x".into()]).unwrap(),
                vec![2],
            );
            s.commit_owned(b).unwrap();
            let prefix = StorageKey::new([format!("new{i}")]).unwrap();
            assert_eq!(s.scan(&prefix, None, 1).unwrap().len(), 1, "new{i}");
            assert!(s.last(&prefix).unwrap().is_some());
        }
        assert_eq!(filter(&s), None, "outgrown: dropped");
        assert!(s.scan(&never, None, usize::MAX).unwrap().is_empty());
        let (added, bigger) = filter(&s).expect("built again at the next miss");
        assert!(bigger > capacity && added <= bigger);
        for i in (0..=capacity).step_by(7) {
            let prefix = StorageKey::new([format!("new{i}")]).unwrap();
            assert_eq!(s.scan(&prefix, None, usize::MAX).unwrap().len(), 1);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// The same over many documents, so that scans miss, the filter of
        /// absent documents is built (after a few misses in tests) and then
        /// answers: it never hides a key a plain map has.
        #[test]
        fn reads_under_many_documents_match_a_plain_map(
            ops in proptest::collection::vec((0u8..5, 0u8..40, 0u8..30), 1..150)
        ) {
            use super::super::MemoryStorage;
            let dir = tempfile::tempdir().unwrap();
            let s = RedbStorage::open_with_log_capacity(dir.path().join("s.redb"), 2048).unwrap();
            let model = MemoryStorage::new();
            for (op, d, i) in ops {
                let mut b = WriteBatch::new();
                match op {
                    0 | 1 => b.put(doc_key(d, i), vec![i; 9]),
                    2 => b.delete(doc_key(d, i)),
                    3 => {}
                    _ => s.checkpoint().unwrap(),
                }
                model.commit(&b).unwrap();
                s.commit_owned(b).unwrap();
                let prefix = StorageKey::new([format!("doc{}", (d / 3) % 12)]).unwrap();
                proptest::prop_assert_eq!(
                    s.scan(&prefix, None, usize::MAX).unwrap(),
                    model.scan(&prefix, None, usize::MAX).unwrap()
                );
                proptest::prop_assert_eq!(s.get(&doc_key(d, i)).unwrap(), model.get(&doc_key(d, i)).unwrap());
                proptest::prop_assert_eq!(s.last(&prefix).unwrap(), model.last(&prefix).unwrap());
            }
        }

        /// Reads over the log and the table answer as one sorted map would,
        /// whatever was folded when.
        #[test]
        fn reads_over_the_log_match_a_plain_map(
            ops in proptest::collection::vec((0u8..4, 0u8..40, 0usize..6), 1..120)
        ) {
            use super::super::MemoryStorage;
            let dir = tempfile::tempdir().unwrap();
            let s = RedbStorage::open_with_log_capacity(dir.path().join("s.redb"), 1024).unwrap();
            let model = MemoryStorage::new();
            let prefix = StorageKey::new(["d"]).unwrap();
            for (op, k, n) in ops {
                let mut b = WriteBatch::new();
                match op {
                    0 | 1 => b.put(key(k), vec![k; n * 10]),
                    2 => b.delete(key(k)),
                    _ => s.checkpoint().unwrap(),
                }
                model.commit(&b).unwrap();
                // Both ways in: by reference, and taken whole.
                if n % 2 == 0 {
                    s.commit(&b).unwrap();
                } else {
                    s.commit_owned(b).unwrap();
                }
                proptest::prop_assert_eq!(s.get(&key(k)).unwrap(), model.get(&key(k)).unwrap());
                let after = Some(key(k.saturating_sub(5)));
                proptest::prop_assert_eq!(
                    s.scan(&prefix, after.as_ref(), n).unwrap(),
                    model.scan(&prefix, after.as_ref(), n).unwrap()
                );
                proptest::prop_assert_eq!(s.last(&prefix).unwrap(), model.last(&prefix).unwrap());
            }
            proptest::prop_assert_eq!(
                s.scan(&prefix, None, usize::MAX).unwrap(),
                model.scan(&prefix, None, usize::MAX).unwrap()
            );
        }
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/s.redb");
        let key = StorageKey::new(["k"]).unwrap();
        {
            let s = RedbStorage::open(&path).unwrap();
            let mut b = WriteBatch::new();
            b.put(key.clone(), b"v".to_vec());
            s.commit(&b).unwrap();
        }
        let s = RedbStorage::open(&path).unwrap();
        assert_eq!(s.get(&key).unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn a_garbage_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = RedbStorage::open(&path).unwrap_err();
        assert!(err.to_string().contains("cannot open store"), "{err}");
    }
}
