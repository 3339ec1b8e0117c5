//! The engine's storage in a browser tab: an in-memory mirror of the
//! IndexedDB store, plus the queue of committed batches still to write there.
//!
//! The engine's [`Storage`] trait is synchronous and IndexedDB is not, so the
//! mirror answers every read at once (it is loaded whole when the store
//! opens) and `commit` applies the batch to the mirror and queues it. The
//! driver (`Tandem`) writes queued batches to IndexedDB, in order, and holds
//! back every output of the engine produced after a commit until that commit
//! is durable (see [`crate::gate`]). Batches are numbered from 1 in commit
//! order, so "durable up to n" is one number.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tandem_engine::storage::Write;
use tandem_engine::{MemoryStorage, Storage, StorageError, StorageKey, WriteBatch};

/// Storage for a browser tab: reads from memory, commits queued for IndexedDB.
/// Clones share the same store (the driver keeps one to take the queue).
#[derive(Clone, Debug, Default)]
pub struct BrowserStorage {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    mirror: MemoryStorage,
    queue: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    /// Batches committed and not yet taken by the writer, oldest first.
    pending: VecDeque<WriteBatch>,
    /// The number of the last batch committed (0: none yet).
    committed: u64,
}

/// Batches taken for writing: the writes of every batch numbered up to
/// `upto`, in commit order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// The number of the last batch included.
    pub upto: u64,
    /// The batches, oldest first.
    pub batches: Vec<WriteBatch>,
}

impl Pending {
    /// Every write, in the order they must be applied.
    pub fn writes(&self) -> impl Iterator<Item = &Write> {
        self.batches.iter().flat_map(|b| b.writes())
    }

    /// Append later batches (after a failed write, retried together).
    pub fn extend(&mut self, later: Pending) {
        debug_assert!(later.upto >= self.upto);
        self.upto = later.upto;
        self.batches.extend(later.batches);
    }
}

impl BrowserStorage {
    /// An empty store (nothing persisted yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `entries`, as read from IndexedDB at open. Loading
    /// queues nothing: these entries are durable already.
    pub fn from_entries(
        entries: impl IntoIterator<Item = (StorageKey, Vec<u8>)>,
    ) -> Result<Self, StorageError> {
        let mut batch = WriteBatch::new();
        for (key, value) in entries {
            batch.put(key, value);
        }
        let storage = Self::new();
        storage.shared.mirror.commit(&batch)?;
        Ok(storage)
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // The queue is only pushed to and drained whole: a panic elsewhere
        // cannot leave it half-updated.
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number of the last batch committed (0 before the first).
    pub fn committed(&self) -> u64 {
        self.queue().committed
    }

    /// Take every batch committed since the last call, or `None` if there is none.
    pub fn take_pending(&self) -> Option<Pending> {
        let mut queue = self.queue();
        if queue.pending.is_empty() {
            return None;
        }
        Some(Pending {
            upto: queue.committed,
            batches: queue.pending.drain(..).collect(),
        })
    }

    /// Every entry, in key order (for tests and inspection).
    pub fn entries(&self) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError> {
        self.shared
            .mirror
            .scan(&StorageKey::new(Vec::<String>::new())?, None, usize::MAX)
    }
}

impl Storage for BrowserStorage {
    fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>, StorageError> {
        self.shared.mirror.get(key)
    }

    fn scan(
        &self,
        prefix: &StorageKey,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError> {
        self.shared.mirror.scan(prefix, after, limit)
    }

    fn last(&self, prefix: &StorageKey) -> Result<Option<(StorageKey, Vec<u8>)>, StorageError> {
        self.shared.mirror.last(prefix)
    }

    /// Applies the batch to the mirror and queues it for IndexedDB. The
    /// batch is not durable when this returns; the driver makes sure nothing
    /// that depends on it leaves the tab before it is (see the module docs).
    fn commit(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        // Hold the queue lock across both steps, so batch numbers follow the
        // order in which batches reached the mirror.
        let mut queue = self.queue();
        self.shared.mirror.commit(batch)?;
        queue.committed += 1;
        queue.pending.push_back(batch.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_engine::automerge::{ROOT, ReadDoc, transaction::Transactable};
    use tandem_engine::{PeerId, Repo, RepoConfig, ShareAll};

    fn key(parts: &[&str]) -> StorageKey {
        StorageKey::new(parts.iter().copied()).unwrap()
    }

    #[test]
    fn commits_are_visible_at_once_and_queued_in_order() {
        let storage = BrowserStorage::new();
        assert_eq!(storage.take_pending(), None);
        let mut first = WriteBatch::new();
        first.put(key(&["a"]), b"1".to_vec());
        let mut second = WriteBatch::new();
        second.delete(key(&["a"]));
        second.put(key(&["b"]), b"2".to_vec());
        storage.commit(&first).unwrap();
        assert_eq!(storage.get(&key(&["a"])).unwrap(), Some(b"1".to_vec()));
        storage.commit(&second).unwrap();
        assert_eq!(storage.get(&key(&["a"])).unwrap(), None);
        assert_eq!(storage.committed(), 2);

        let pending = storage.take_pending().unwrap();
        assert_eq!(pending.upto, 2);
        assert_eq!(pending.batches, vec![first, second]);
        assert_eq!(pending.writes().count(), 3);
        assert_eq!(
            storage.take_pending(),
            None,
            "taken batches leave the queue"
        );
        assert_eq!(storage.committed(), 2, "numbering continues");
    }

    #[test]
    fn loaded_entries_are_readable_and_not_queued() {
        let storage = BrowserStorage::from_entries([
            (key(&["doc", "snapshot", "h"]), b"s".to_vec()),
            (key(&["doc", "incremental", "x"]), b"i".to_vec()),
        ])
        .unwrap();
        assert_eq!(storage.take_pending(), None);
        assert_eq!(storage.committed(), 0);
        let under = storage.scan(&key(&["doc"]), None, 10).unwrap();
        assert_eq!(under.len(), 2);
        assert_eq!(
            storage.last(&key(&["doc"])).unwrap().unwrap().0,
            key(&["doc", "snapshot", "h"])
        );
    }

    /// What the browser does across a reload: the engine writes through the
    /// queue, the queued writes are replayed into a fresh store (as the
    /// IndexedDB load would return them), and the document is all there.
    #[test]
    fn a_repo_reopens_from_the_queued_writes() {
        let storage = BrowserStorage::new();
        let config = RepoConfig::new(PeerId::new("tab"));
        let mut repo = Repo::open(storage.clone(), config.clone(), ShareAll).unwrap();
        let doc = repo.create().unwrap();
        repo.change(&doc, |d| d.put(ROOT, "title", "kept")).unwrap();
        repo.flush().unwrap();
        let storage_id = repo.storage_id().clone();
        drop(repo);

        let mut persisted = std::collections::BTreeMap::new();
        for write in storage.take_pending().unwrap().writes() {
            match write {
                Write::Put(k, v) => persisted.insert(k.clone(), v.clone()),
                Write::Delete(k) => persisted.remove(k),
            };
        }
        let reloaded = BrowserStorage::from_entries(persisted).unwrap();
        let mut repo = Repo::open(reloaded, config, ShareAll).unwrap();
        assert_eq!(repo.storage_id(), &storage_id);
        let title = repo
            .view(&doc, |d| {
                d.get(ROOT, "title").unwrap().unwrap().0.to_string()
            })
            .unwrap();
        assert_eq!(title, "\"kept\"");
    }
}
