//! An in-memory storage backend: for tests, and for wasm without persistence.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Storage, StorageKey, Write, WriteBatch};
use crate::error::StorageError;

/// Storage kept in a `BTreeMap`; lost when dropped.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    map: Mutex<BTreeMap<StorageKey, Vec<u8>>>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<StorageKey, Vec<u8>>> {
        // A panic while holding the lock cannot leave the map half-written:
        // commits build the new entries before touching it.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Storage for MemoryStorage {
    fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.lock().get(key).cloned())
    }

    fn scan(
        &self,
        prefix: &StorageKey,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError> {
        use std::ops::Bound;
        let map = self.lock();
        let start = match after {
            Some(a) if a.starts_with(prefix) => Bound::Excluded(a.clone()),
            _ => Bound::Included(prefix.clone()),
        };
        Ok(map
            .range((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last(&self, prefix: &StorageKey) -> Result<Option<(StorageKey, Vec<u8>)>, StorageError> {
        let map = self.lock();
        Ok(map
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .last()
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn commit(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        let mut map = self.lock();
        for write in batch.writes() {
            match write {
                Write::Put(k, v) => {
                    map.insert(k.clone(), v.clone());
                }
                Write::Delete(k) => {
                    map.remove(k);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeps_the_storage_contract() {
        super::super::contract::check(&super::MemoryStorage::new());
    }
}
