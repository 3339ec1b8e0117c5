//! The durable storage backend: one redb table of encoded keys to values.

use std::path::Path;

use redb::{Database, ReadableDatabase, TableDefinition};

use super::{Storage, StorageKey, Write, WriteBatch, prefix_range};
use crate::error::StorageError;

const TABLE: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("tandem");

/// Storage in a redb database file. Every [`commit`](Storage::commit) is one
/// redb write transaction with immediate durability (fsync before return).
#[derive(Debug)]
pub struct RedbStorage {
    db: Database,
}

impl RedbStorage {
    /// Open the database at `path`, creating it (and the table) if needed.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
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
        let storage = Self { db };
        storage.ensure_table()?;
        Ok(storage)
    }

    /// Create the table on first open, so reads never meet a missing table.
    /// An existing store is not written to (no fsync on open).
    fn ensure_table(&self) -> Result<(), StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        match txn.open_table(TABLE) {
            Ok(_) => Ok(()),
            Err(redb::TableError::TableDoesNotExist(_)) => self.commit(&WriteBatch::new()),
            Err(e) => Err(backend(e)),
        }
    }

    /// A database kept in memory (redb's own in-memory backend).
    pub fn in_memory() -> Result<Self, StorageError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(backend)?;
        let storage = Self { db };
        storage.ensure_table()?;
        Ok(storage)
    }
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

impl Storage for RedbStorage {
    fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>, StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(TABLE).map_err(backend)?;
        let value = table.get(key.encode().as_slice()).map_err(backend)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn scan(
        &self,
        prefix: &StorageKey,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError> {
        use std::ops::Bound;
        let (start, inclusive, end) = prefix_range(prefix, after);
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(TABLE).map_err(backend)?;
        let lower = if inclusive {
            Bound::Included(start.as_slice())
        } else {
            Bound::Excluded(start.as_slice())
        };
        let range = table
            .range::<&[u8]>((lower, Bound::Excluded(end.as_slice())))
            .map_err(backend)?;
        let mut out = Vec::new();
        for entry in range.take(limit) {
            let (k, v) = entry.map_err(backend)?;
            out.push((StorageKey::decode(k.value())?, v.value().to_vec()));
        }
        Ok(out)
    }

    fn last(&self, prefix: &StorageKey) -> Result<Option<(StorageKey, Vec<u8>)>, StorageError> {
        let (start, _, end) = prefix_range(prefix, None);
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(TABLE).map_err(backend)?;
        let mut range = table
            .range::<&[u8]>(start.as_slice()..end.as_slice())
            .map_err(backend)?;
        match range.next_back() {
            None => Ok(None),
            Some(entry) => {
                let (k, v) = entry.map_err(backend)?;
                Ok(Some((StorageKey::decode(k.value())?, v.value().to_vec())))
            }
        }
    }

    fn commit(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut table = txn.open_table(TABLE).map_err(backend)?;
            for write in batch.writes() {
                match write {
                    Write::Put(k, v) => {
                        table
                            .insert(k.encode().as_slice(), v.as_slice())
                            .map_err(backend)?;
                    }
                    Write::Delete(k) => {
                        table.remove(k.encode().as_slice()).map_err(backend)?;
                    }
                }
            }
        }
        txn.commit().map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_storage_contract_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        super::super::contract::check(&RedbStorage::open(dir.path().join("s.redb")).unwrap());
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
