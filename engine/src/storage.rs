//! The storage trait and its keys.
//!
//! Storage is a sorted key-value map with atomic, durable batches. Keys are
//! short lists of text components with the same meaning automerge-repo and
//! samod give them:
//!
//! | key | value |
//! |---|---|
//! | `[doc, "snapshot", headsHash]` | a whole saved document |
//! | `[doc, "incremental", contentHash]` | changes saved since the snapshot |
//! | `[doc, "sync-state", storageId]` | the encoded sync state with that peer's store |
//! | `["~feed", seq]` | the change-feed entries of one flush, ending at `seq` (zero-padded, so keys sort) |
//! | `["~meta", name]` | store metadata (storage id, next feed sequence) |
//! | `["~cursor", consumer]` | a feed consumer's durable cursor |
//!
//! Document ids are bs58 text, which never starts with `~`, so the system
//! keys cannot collide with documents.

#[cfg(feature = "redb")]
mod log;
mod memory;
#[cfg(feature = "redb")]
mod redb;

pub use memory::MemoryStorage;
#[cfg(feature = "redb")]
pub use redb::RedbStorage;

use std::fmt;

use crate::error::StorageError;

/// A storage key: text components compared component by component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageKey(Vec<String>);

impl StorageKey {
    /// A key from its components. Components must not contain NUL bytes.
    pub fn new<I, S>(parts: I) -> Result<Self, StorageError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let parts: Vec<String> = parts.into_iter().map(Into::into).collect();
        if let Some(bad) = parts.iter().find(|p| p.contains('\0')) {
            return Err(StorageError::InvalidKey(format!(
                "key component {bad:?} contains a NUL byte"
            )));
        }
        Ok(Self(parts))
    }

    /// Build a key from components known to be valid (no NUL bytes).
    pub(crate) fn from_trusted(parts: Vec<String>) -> Self {
        debug_assert!(parts.iter().all(|p| !p.contains('\0')));
        Self(parts)
    }

    /// The components.
    pub fn parts(&self) -> &[String] {
        &self.0
    }

    /// Whether `prefix`'s components are the first components of this key.
    pub fn starts_with(&self, prefix: &StorageKey) -> bool {
        self.0.starts_with(&prefix.0)
    }

    /// The byte encoding: components joined by NUL. Byte order equals
    /// component order because NUL sorts before every other byte.
    pub fn encode(&self) -> Vec<u8> {
        self.0.join("\0").into_bytes()
    }

    /// Inverse of [`encode`](Self::encode).
    pub fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| StorageError::Corrupt("storage key is not UTF-8".into()))?;
        Ok(Self(text.split('\0').map(str::to_owned).collect()))
    }
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// One write in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Set a key.
    Put(StorageKey, Vec<u8>),
    /// Remove a key (no error if absent).
    Delete(StorageKey),
}

/// Writes applied atomically: all of them or none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    writes: Vec<Write>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a put.
    pub fn put(&mut self, key: StorageKey, value: Vec<u8>) {
        self.writes.push(Write::Put(key, value));
    }

    /// Make room for at least `additional` more writes.
    pub fn reserve(&mut self, additional: usize) {
        self.writes.reserve(additional);
    }

    /// Add a delete.
    pub fn delete(&mut self, key: StorageKey) {
        self.writes.push(Write::Delete(key));
    }

    /// The writes, in order (a later write to a key wins).
    pub fn writes(&self) -> &[Write] {
        &self.writes
    }

    /// The writes, taken out of the batch.
    pub fn into_writes(self) -> Vec<Write> {
        self.writes
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Total bytes of keys and values, for metrics.
    pub fn size(&self) -> usize {
        self.writes
            .iter()
            .map(|w| match w {
                Write::Put(k, v) => k.0.iter().map(String::len).sum::<usize>() + v.len(),
                Write::Delete(k) => k.0.iter().map(String::len).sum(),
            })
            .sum()
    }
}

/// A synchronous, sorted key-value store with atomic durable batches.
///
/// The contract every backend keeps: when [`commit`](Storage::commit) returns
/// `Ok`, every write in the batch survives a crash (process kill or power
/// loss, as far as the backend's medium allows); if it returns `Err` or the
/// process dies during the call, either all writes of the batch are visible
/// after reopening or none is.
pub trait Storage: Send + Sync {
    /// The value at `key`.
    fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>, StorageError>;

    /// Entries whose key starts with `prefix`, in key order, starting after
    /// `after` if given, at most `limit` of them.
    fn scan(
        &self,
        prefix: &StorageKey,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError>;

    /// Apply a batch atomically and durably.
    fn commit(&self, batch: &WriteBatch) -> Result<(), StorageError>;

    /// [`commit`](Self::commit), taking the batch: a backend that keeps
    /// what it writes (a log read before the tree) takes the values without
    /// copying them. The default commits by reference.
    fn commit_owned(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.commit(&batch)
    }

    /// The entry with the greatest key under `prefix`. The default scans the
    /// whole prefix; backends override it with a reverse lookup.
    fn last(&self, prefix: &StorageKey) -> Result<Option<(StorageKey, Vec<u8>)>, StorageError> {
        Ok(self.scan(prefix, None, usize::MAX)?.pop())
    }
}

impl<T: Storage + ?Sized> Storage for Box<T> {
    fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>, StorageError> {
        (**self).get(key)
    }
    fn scan(
        &self,
        prefix: &StorageKey,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError> {
        (**self).scan(prefix, after, limit)
    }
    fn commit(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        (**self).commit(batch)
    }
    fn commit_owned(&self, batch: WriteBatch) -> Result<(), StorageError> {
        (**self).commit_owned(batch)
    }
    fn last(&self, prefix: &StorageKey) -> Result<Option<(StorageKey, Vec<u8>)>, StorageError> {
        (**self).last(prefix)
    }
}

impl<T: Storage + ?Sized> Storage for std::sync::Arc<T> {
    fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>, StorageError> {
        (**self).get(key)
    }
    fn scan(
        &self,
        prefix: &StorageKey,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError> {
        (**self).scan(prefix, after, limit)
    }
    fn commit(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        (**self).commit(batch)
    }
    fn commit_owned(&self, batch: WriteBatch) -> Result<(), StorageError> {
        (**self).commit_owned(batch)
    }
    fn last(&self, prefix: &StorageKey) -> Result<Option<(StorageKey, Vec<u8>)>, StorageError> {
        (**self).last(prefix)
    }
}

/// The byte range `[start, end)` holding every key under `prefix`, and the
/// exclusive start when resuming after `after`.
#[cfg(feature = "redb")]
pub(crate) fn prefix_range(
    prefix: &StorageKey,
    after: Option<&StorageKey>,
) -> (Vec<u8>, bool, Vec<u8>) {
    let mut start = prefix.encode();
    let mut end = start.clone();
    if prefix.0.is_empty() {
        end = vec![0xff; 1];
    } else {
        start.push(0);
        end.push(1);
    }
    match after {
        Some(after) if after.starts_with(prefix) => (after.encode(), false, end),
        _ => (start, true, end),
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! The behaviour every backend must share, run against each of them.
    use super::*;

    fn key(parts: &[&str]) -> StorageKey {
        StorageKey::new(parts.iter().copied()).unwrap()
    }

    pub fn check(storage: &dyn Storage) {
        let mut batch = WriteBatch::new();
        batch.put(key(&["a", "snapshot", "1"]), b"s1".to_vec());
        batch.put(key(&["a", "incremental", "x"]), b"i1".to_vec());
        batch.put(key(&["a", "incremental", "y"]), b"i2".to_vec());
        batch.put(key(&["ab", "incremental", "z"]), b"other".to_vec());
        batch.put(key(&["b"]), b"b".to_vec());
        storage.commit(&batch).unwrap();

        assert_eq!(
            storage.get(&key(&["a", "snapshot", "1"])).unwrap(),
            Some(b"s1".to_vec())
        );
        assert_eq!(storage.get(&key(&["a", "snapshot"])).unwrap(), None);

        // A prefix matches whole components only: "a" must not match "ab".
        let under_a = storage.scan(&key(&["a"]), None, usize::MAX).unwrap();
        let keys: Vec<_> = under_a.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(
            keys,
            vec![
                key(&["a", "incremental", "x"]),
                key(&["a", "incremental", "y"]),
                key(&["a", "snapshot", "1"]),
            ]
        );

        // Paging with `after` and `limit`.
        let page = storage
            .scan(
                &key(&["a", "incremental"]),
                Some(&key(&["a", "incremental", "x"])),
                10,
            )
            .unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].1, b"i2".to_vec());
        assert_eq!(storage.scan(&key(&["a"]), None, 1).unwrap().len(), 1);

        // Deletes and overwrites in one batch; the later write wins.
        let mut batch = WriteBatch::new();
        batch.delete(key(&["a", "incremental", "x"]));
        batch.put(key(&["b"]), b"b1".to_vec());
        batch.put(key(&["b"]), b"b2".to_vec());
        storage.commit(&batch).unwrap();
        assert_eq!(storage.get(&key(&["a", "incremental", "x"])).unwrap(), None);
        assert_eq!(storage.get(&key(&["b"])).unwrap(), Some(b"b2".to_vec()));
        assert_eq!(storage.scan(&key(&[]), None, usize::MAX).unwrap().len(), 4);

        // The last entry under a prefix, by whole components.
        let last = storage.last(&key(&["a"])).unwrap().unwrap();
        assert_eq!(last.0, key(&["a", "snapshot", "1"]));
        assert_eq!(storage.last(&key(&["zzz"])).unwrap(), None);
        assert_eq!(storage.last(&key(&[])).unwrap().unwrap().0, key(&["b"]));
    }

    #[test]
    fn keys_refuse_nul() {
        assert!(StorageKey::new(["a\0b"]).is_err());
    }
}
