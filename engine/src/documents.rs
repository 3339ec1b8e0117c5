//! Documents in memory over storage: loaded on first use, saved
//! incrementally, compacted when the incrementals outgrow the snapshot, and
//! evicted when idle and over budget.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};

use automerge::{ActorId, AutoCommit, ChangeHash};
use sha2::{Digest, Sha256};

use crate::DocumentId;
#[cfg(not(target_arch = "wasm32"))]
use crate::chunk;
use crate::error::{RepoError, StorageError};
use crate::storage::{Storage, StorageKey, WriteBatch};

/// A document held in memory.
pub(crate) struct Loaded {
    /// Boxed: an `AutoCommit` is over 4 KB, and the map of loaded documents
    /// moves its entries when it grows and walks them to evict. Inline, the
    /// map insert of a new document was 14% of a batched row insert's
    /// profile (`perf`, 2026-12-05); boxed, 2% plus the box itself.
    pub(crate) doc: Box<AutoCommit>,
    /// The snapshot key and its size, if one is stored.
    snapshot: Option<(StorageKey, usize)>,
    /// Stored incremental chunks (keys) and their total size.
    incrementals: Vec<StorageKey>,
    incremental_bytes: usize,
    /// Has changes not yet written to storage.
    pub(crate) dirty: bool,
    /// Kept in memory even when idle (an outstanding request for it).
    pub(crate) pinned: bool,
    last_used: u64,
    /// The heads storage holds everything up to: the next incremental
    /// chunk is what came after them.
    saved: Vec<automerge::ChangeHash>,
    /// A whole document received as bytes (a copy from another store),
    /// stored as it is at the next flush instead of being encoded again;
    /// `saved` already counts it.
    pub(crate) received: Option<Vec<u8>>,
    /// The change chunks that sync messages brought and local edits made
    /// since `saved`, as they came (an edit's one change as automerge
    /// encoded it at commit), while nothing else changed the document: the
    /// next flush stores them as they are instead of encoding the same
    /// changes again. `None` once anything else did (an edit that also
    /// applied changes, a message whose changes automerge only queued, a
    /// failed receive): the next flush then encodes what came after `saved`
    /// (`save_after`), and the one after starts afresh.
    pub(crate) synced: Option<Vec<u8>>,
}

/// A document received whole and not parsed.
struct Unloaded {
    bytes: Vec<u8>,
    /// Its heads, read from the chunks' headers.
    heads: Vec<ChangeHash>,
    /// One document chunk (stored as a snapshot), or change chunks.
    snapshot: bool,
}

/// A document's stored bytes, whole, and the heads they load as.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) struct StoredWhole {
    pub(crate) heads: Vec<ChangeHash>,
    pub(crate) bytes: Vec<u8>,
}

/// What a flush wrote for one document, applied to memory once durable.
pub(crate) struct SavePlan {
    document: DocumentId,
    kind: SaveKind,
}

enum SaveKind {
    Incremental { key: StorageKey, bytes: usize },
    Compacted { key: StorageKey, bytes: usize },
}

/// Turn a panic payload into a message.
pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

pub(crate) fn doc_prefix(id: &DocumentId) -> StorageKey {
    StorageKey::from_trusted(vec![id.to_string()])
}

fn doc_key(id: &DocumentId, kind: &str, name: String) -> StorageKey {
    StorageKey::from_trusted(vec![id.to_string(), kind.to_owned(), name])
}

/// Hash of a set of heads, as the snapshot key.
fn heads_hash(heads: &[ChangeHash]) -> String {
    let mut sorted = heads.to_vec();
    sorted.sort();
    let mut h = Sha256::new();
    for head in &sorted {
        h.update(head.0);
    }
    hex::encode(h.finalize())
}

/// Tuning for the document cache and compaction.
#[derive(Clone, Debug)]
pub struct DocumentsConfig {
    /// Documents kept in memory before idle ones are evicted. Past it, the
    /// least recently used idle ones go until a sixteenth of it is free.
    pub max_loaded_documents: usize,
    /// Incremental bytes below which a document is never compacted.
    pub compaction_min_bytes: usize,
    /// Compact once the incrementals exceed this many times the snapshot.
    /// Incrementals are uncompressed change chunks while the snapshot is
    /// compressed, so a ratio above 1 keeps compaction (a whole-document
    /// save) rare, at the cost of loading more bytes.
    pub compaction_ratio: usize,
}

impl Default for DocumentsConfig {
    fn default() -> Self {
        Self {
            max_loaded_documents: 1024,
            compaction_min_bytes: 64 * 1024,
            compaction_ratio: 4,
        }
    }
}

pub(crate) struct Documents<S> {
    pub(crate) storage: S,
    config: DocumentsConfig,
    loaded: HashMap<DocumentId, Loaded>,
    /// Whole documents received as bytes (copies from another store) and
    /// not parsed yet: stored as they are at the next flush, and loaded only
    /// if used before then.
    unloaded: HashMap<DocumentId, Unloaded>,
    /// Every loaded document handed out by [`get`](Self::get) since the
    /// last [`plan_saves`](Self::plan_saves), plus those it planned: the
    /// only ones that can be dirty, so a flush looks at these instead of at
    /// every loaded document.
    touched: HashSet<DocumentId>,
    quarantined: HashMap<DocumentId, String>,
    clock: u64,
    /// The automerge actor of every change this store makes while it is
    /// open, in every document. Random per opening, and replaced whenever
    /// memory loses changes that were never stored (a failed flush, a
    /// quarantine, a purge), so an actor and sequence number are never used
    /// for two different changes. One actor per opening instead of one per
    /// load: before, each reload of an evicted document added a new actor
    /// to it (16 bytes in every later save, and a tenth of an update's CPU
    /// to register it).
    actor: ActorId,
}

impl<S: Storage> Documents<S> {
    pub(crate) fn new(storage: S, config: DocumentsConfig) -> Self {
        Self {
            storage,
            config,
            loaded: HashMap::new(),
            unloaded: HashMap::new(),
            touched: HashSet::new(),
            quarantined: HashMap::new(),
            clock: 0,
            actor: ActorId::random(),
        }
    }

    /// A new empty document that makes its changes as this store's actor.
    pub(crate) fn new_doc(&self) -> AutoCommit {
        AutoCommit::new().with_actor(self.actor.clone())
    }

    /// The actor of this store's changes.
    pub(crate) fn actor(&self) -> &ActorId {
        &self.actor
    }

    /// Memory lost changes that were never stored: never reuse the actor
    /// that made them (its next sequence numbers would repeat theirs).
    fn renew_actor(&mut self) {
        self.actor = ActorId::random();
    }

    pub(crate) fn loaded_count(&self) -> usize {
        self.loaded.len()
    }

    pub(crate) fn is_loaded(&self, id: &DocumentId) -> bool {
        self.loaded.contains_key(id)
    }

    pub(crate) fn quarantine_reason(&self, id: &DocumentId) -> Option<&str> {
        self.quarantined.get(id).map(String::as_str)
    }

    pub(crate) fn quarantined(&self) -> impl Iterator<Item = (&DocumentId, &str)> {
        self.quarantined.iter().map(|(k, v)| (k, v.as_str()))
    }

    /// Drop the document from memory and refuse it until released.
    /// (A copy received whole stays, to be stored as received like any
    /// other, and parsed again when released.)
    pub(crate) fn quarantine(&mut self, id: DocumentId, reason: String) {
        self.loaded.remove(&id);
        self.quarantined.insert(id, reason);
        self.renew_actor();
    }

    pub(crate) fn release(&mut self, id: &DocumentId) -> bool {
        self.quarantined.remove(id).is_some()
    }

    /// Drop the document from memory, unsaved changes included (purge).
    pub(crate) fn forget(&mut self, id: &DocumentId) {
        self.renew_actor();
        self.loaded.remove(id);
        self.unloaded.remove(id);
        self.quarantined.remove(id);
    }

    /// Whether the document is in memory or in storage.
    pub(crate) fn exists(&self, id: &DocumentId) -> Result<bool, StorageError> {
        if self.loaded.contains_key(id) || self.unloaded.contains_key(id) {
            return Ok(true);
        }
        Ok(!self.storage.scan(&doc_prefix(id), None, 1)?.is_empty())
    }

    /// Whether the document has changes in memory not yet written.
    pub(crate) fn is_dirty(&self, id: &DocumentId) -> bool {
        self.unloaded.contains_key(id) || self.loaded.get(id).is_some_and(|l| l.dirty)
    }

    /// A document new to this store, received whole as `bytes` (one saved
    /// document chunk if `snapshot`, otherwise change chunks), whose chunk
    /// headers say `heads`: stored as it is at the next flush, parsed only
    /// if used before then.
    pub(crate) fn insert_unloaded(
        &mut self,
        id: DocumentId,
        bytes: Vec<u8>,
        heads: Vec<ChangeHash>,
        snapshot: bool,
    ) {
        let unloaded = Unloaded {
            bytes,
            heads,
            snapshot,
        };
        self.unloaded.insert(id, unloaded);
    }

    /// The document, new and empty until `bytes` were loaded into it, is
    /// stored as those bytes at the next flush.
    pub(crate) fn received_whole(&mut self, id: &DocumentId, bytes: Vec<u8>) {
        if let Some(loaded) = self.loaded.get_mut(id) {
            loaded.saved = loaded.doc.get_heads();
            loaded.received = Some(bytes);
            loaded.synced = Some(Vec::new());
        }
    }

    /// What storage holds of the document, as one input for automerge's
    /// `load`: the snapshot (the larger, if a lost delete left two), then
    /// the incremental chunks. `None` if nothing is stored.
    pub(crate) fn stored_bytes(&self, id: &DocumentId) -> Result<Option<Vec<u8>>, StorageError> {
        let mut snapshot: Option<Vec<u8>> = None;
        let mut incrementals = Vec::new();
        for (key, value) in self.storage.scan(&doc_prefix(id), None, usize::MAX)? {
            match key.parts().get(1).map(String::as_str) {
                Some("snapshot") if snapshot.as_ref().is_none_or(|s| s.len() < value.len()) => {
                    snapshot = Some(value);
                }
                Some("incremental") => incrementals.push(value),
                _ => {}
            }
        }
        if snapshot.is_none() && incrementals.is_empty() {
            return Ok(None);
        }
        let mut out = snapshot.unwrap_or_default();
        for chunk in incrementals {
            out.extend_from_slice(&chunk);
        }
        Ok(Some(out))
    }

    /// The stored bytes of a document that is not in memory, with the heads
    /// their chunk headers name, if they are one saved document or a whole
    /// history of change chunks with intact checksums, and name some heads;
    /// `None` for anything else (see [`chunk::saved_header`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn stored_whole(
        &self,
        id: &DocumentId,
    ) -> Result<Option<StoredWhole>, StorageError> {
        if self.loaded.contains_key(id)
            || self.unloaded.contains_key(id)
            || self.quarantined.contains_key(id)
        {
            return Ok(None);
        }
        let Some(bytes) = self.stored_bytes(id)? else {
            return Ok(None);
        };
        Ok(chunk::saved_header(&bytes)
            .filter(|h| !h.heads.is_empty())
            .map(|h| StoredWhole {
                heads: h.heads,
                bytes,
            }))
    }

    /// Add a new, empty document that is not in storage yet. It is pinned
    /// (kept in memory) until its first change makes it dirty.
    pub(crate) fn insert_new(&mut self, id: DocumentId, doc: AutoCommit) {
        self.clock += 1;
        self.loaded.insert(
            id,
            Loaded {
                doc: Box::new(doc),
                snapshot: None,
                incrementals: Vec::new(),
                incremental_bytes: 0,
                dirty: false,
                pinned: true,
                last_used: self.clock,
                saved: Vec::new(),
                received: None,
                synced: Some(Vec::new()),
            },
        );
    }

    /// The document, loading it from storage if needed; `Ok(None)` if it is
    /// in neither.
    pub(crate) fn get(&mut self, id: &DocumentId) -> Result<Option<&mut Loaded>, RepoError> {
        if let Some(reason) = self.quarantined.get(id) {
            return Err(RepoError::Quarantined {
                document: *id,
                reason: reason.clone(),
            });
        }
        self.clock += 1;
        if !self.loaded.contains_key(id) {
            if let Some(unloaded) = self.unloaded.remove(id) {
                let loaded = self.parse_received(id, unloaded)?;
                self.loaded.insert(*id, loaded);
            } else {
                match self.load(id)? {
                    Some(loaded) => {
                        self.loaded.insert(*id, loaded);
                    }
                    None => return Ok(None),
                }
            }
        }
        let entry = self.loaded.get_mut(id).expect("inserted above");
        entry.last_used = self.clock;
        self.touched.insert(*id);
        Ok(Some(entry))
    }

    /// Parse a document received whole and not stored yet: it stays dirty,
    /// to be stored as the received bytes at the next flush. If automerge
    /// cannot load it, the bytes stay as they are (stored at the next flush
    /// like any received bytes) and the error is reported on each use, as
    /// for a corrupt stored document.
    fn parse_received(&mut self, id: &DocumentId, unloaded: Unloaded) -> Result<Loaded, RepoError> {
        let parsed = catch_unwind(AssertUnwindSafe(|| {
            AutoCommit::load(&unloaded.bytes).map(|mut doc| {
                doc.set_actor(self.actor.clone());
                let heads = doc.get_heads();
                (doc, heads)
            })
        }));
        let corrupt = |reason: String| RepoError::CorruptDocument {
            document: *id,
            reason,
        };
        let error = match parsed {
            Ok(Ok((doc, heads))) if heads == unloaded.heads => {
                let Unloaded { bytes, heads, .. } = unloaded;
                return Ok(Loaded {
                    doc: Box::new(doc),
                    snapshot: None,
                    incrementals: Vec::new(),
                    incremental_bytes: 0,
                    dirty: true,
                    pinned: false,
                    last_used: self.clock,
                    saved: heads,
                    received: Some(bytes),
                    synced: Some(Vec::new()),
                });
            }
            Ok(Ok(_)) => corrupt("its heads differ from what its chunk headers say".into()),
            Ok(Err(e)) => corrupt(e.to_string()),
            Err(panic) => {
                let reason = format!("automerge panicked while loading: {}", panic_message(panic));
                self.quarantine(*id, reason.clone());
                RepoError::Quarantined {
                    document: *id,
                    reason,
                }
            }
        };
        self.unloaded.insert(*id, unloaded);
        Err(error)
    }

    fn load(&mut self, id: &DocumentId) -> Result<Option<Loaded>, RepoError> {
        let entries = self.storage.scan(&doc_prefix(id), None, usize::MAX)?;
        let mut snapshot = None;
        let mut incrementals = Vec::new();
        for (key, value) in entries {
            match key.parts().get(1).map(String::as_str) {
                // Two snapshots can only coexist if a compaction's delete
                // was lost; both load fine, keep the larger.
                Some("snapshot")
                    if snapshot
                        .as_ref()
                        .is_none_or(|(_, v): &(StorageKey, Vec<u8>)| v.len() < value.len()) =>
                {
                    snapshot = Some((key, value));
                }
                Some("incremental") => incrementals.push((key, value)),
                _ => {}
            }
        }
        if snapshot.is_none() && incrementals.is_empty() {
            return Ok(None);
        }
        let corrupt = |reason: String| RepoError::CorruptDocument {
            document: *id,
            reason,
        };
        let loaded = catch_unwind(AssertUnwindSafe(|| -> Result<Loaded, RepoError> {
            let mut doc = match &snapshot {
                Some((_, bytes)) => AutoCommit::load(bytes).map_err(|e| corrupt(e.to_string()))?,
                None => AutoCommit::new(),
            };
            doc.set_actor(self.actor.clone());
            let mut incremental_bytes = 0;
            for (_, bytes) in &incrementals {
                doc.load_incremental(bytes)
                    .map_err(|e| corrupt(e.to_string()))?;
                incremental_bytes += bytes.len();
            }
            // Everything loaded is saved (heads, not a re-encoding of the
            // document: that cost a tenth of an update of an evicted row).
            let saved = doc.get_heads();
            Ok(Loaded {
                saved,
                received: None,
                synced: Some(Vec::new()),
                doc: Box::new(doc),
                snapshot: snapshot.as_ref().map(|(k, v)| (k.clone(), v.len())),
                incrementals: incrementals.iter().map(|(k, _)| k.clone()).collect(),
                incremental_bytes,
                dirty: false,
                pinned: false,
                last_used: self.clock,
            })
        }));
        match loaded {
            Ok(result) => result.map(Some),
            Err(panic) => {
                let reason = format!("automerge panicked while loading: {}", panic_message(panic));
                self.quarantine(*id, reason.clone());
                Err(RepoError::Quarantined {
                    document: *id,
                    reason,
                })
            }
        }
    }

    /// Add the writes for every dirty document to `batch`. Memory is updated
    /// only by [`apply`](Self::apply) once the batch is durable.
    pub(crate) fn plan_saves(&mut self, batch: &mut WriteBatch) -> Vec<SavePlan> {
        let mut plans = Vec::with_capacity(self.unloaded.len() + self.touched.len());
        batch.reserve(self.unloaded.len() + self.touched.len());
        let min = self.config.compaction_min_bytes;
        let ratio = self.config.compaction_ratio.max(1);
        // Received whole and never parsed: stored as they are, named by
        // the history they hold (hashing the bytes would cost more).
        for (id, unloaded) in self.unloaded.drain() {
            let bytes = unloaded.bytes.len();
            let which = if unloaded.snapshot {
                "snapshot"
            } else {
                "incremental"
            };
            let key = doc_key(&id, which, heads_hash(&unloaded.heads));
            batch.put(key.clone(), unloaded.bytes);
            let kind = if unloaded.snapshot {
                SaveKind::Compacted { key, bytes }
            } else {
                SaveKind::Incremental { key, bytes }
            };
            plans.push(SavePlan { document: id, kind });
        }
        // Only a document handed out by `get` can have been made dirty.
        let touched = std::mem::take(&mut self.touched);
        for id in &touched {
            let Some(loaded) = self.loaded.get_mut(id).filter(|l| l.dirty) else {
                continue;
            };
            // A document stored for the first time is stored whole: for a
            // new document automerge writes a snapshot faster than the
            // same history as change chunks, and loads it in about half
            // the time. That includes one held as bytes (received whole, or
            // created and saved at once) and then edited before the flush:
            // one snapshot rather than those bytes and the edits after them.
            let nothing_stored = loaded.snapshot.is_none() && loaded.incrementals.is_empty();
            let first = nothing_stored
                && match loaded.received {
                    None => loaded.saved.is_empty(),
                    Some(_) => loaded.synced.is_none(),
                };
            let mut chunk = loaded.received.take().unwrap_or_default();
            let synced = loaded.synced.replace(Vec::new());
            if !first {
                match synced {
                    Some(bytes) => chunk.extend(bytes),
                    None => chunk.extend(loaded.doc.save_after(&loaded.saved)),
                }
            }
            let heads = loaded.doc.get_heads();
            if chunk.is_empty() && (!first || heads.is_empty()) {
                loaded.dirty = false;
                continue;
            }
            loaded.saved = heads;
            let snapshot_bytes = loaded.snapshot.as_ref().map_or(0, |(_, n)| *n);
            let grown = loaded.incremental_bytes + chunk.len();
            if first || grown > min.max(snapshot_bytes.saturating_mul(ratio)) {
                // Fold everything into one snapshot; drop the rest, atomically.
                let bytes = loaded.doc.save();
                let key = doc_key(id, "snapshot", heads_hash(&loaded.saved));
                if let Some((old, _)) = &loaded.snapshot
                    && *old != key
                {
                    batch.delete(old.clone());
                }
                for old in &loaded.incrementals {
                    batch.delete(old.clone());
                }
                let size = bytes.len();
                batch.put(key.clone(), bytes);
                plans.push(SavePlan {
                    document: *id,
                    kind: SaveKind::Compacted { key, bytes: size },
                });
            } else {
                let key = doc_key(id, "incremental", hex::encode(Sha256::digest(&chunk)));
                let size = chunk.len();
                batch.put(key.clone(), chunk);
                plans.push(SavePlan {
                    document: *id,
                    kind: SaveKind::Incremental { key, bytes: size },
                });
            }
        }
        // Planned documents stay dirty until `apply`; look at them again.
        self.touched.extend(plans.iter().map(|p| p.document));
        plans
    }

    /// Add to `batch` the writes that fold everything stored for the
    /// document (snapshot and incrementals) into one fresh snapshot of what
    /// is in memory: `(stored bytes before, after, the plan to apply once
    /// durable)`. No plan when the document is stored as one snapshot
    /// already, or not at all. Call it with the document flushed (not dirty).
    pub(crate) fn plan_compaction(
        &mut self,
        id: &DocumentId,
        batch: &mut WriteBatch,
    ) -> Result<(usize, usize, Option<SavePlan>), RepoError> {
        // What storage holds is the truth (it may even hold a second
        // snapshot whose delete was lost, which memory does not track).
        let stored: Vec<(StorageKey, usize)> = self
            .storage
            .scan(&doc_prefix(id), None, usize::MAX)?
            .into_iter()
            .filter(|(key, _)| {
                matches!(
                    key.parts().get(1).map(String::as_str),
                    Some("snapshot" | "incremental")
                )
            })
            .map(|(key, value)| (key, value.len()))
            .collect();
        let before = stored.iter().map(|(_, n)| n).sum();
        // Nothing stored but, say, a peer's sync state: nothing to fold.
        let one_snapshot = stored.len() == 1 && stored[0].0.parts()[1] == "snapshot";
        if stored.is_empty() || one_snapshot {
            return Ok((before, before, None));
        }
        let Some(loaded) = self.get(id)? else {
            return Err(RepoError::NotFound(*id));
        };
        let bytes = loaded.doc.save();
        let key = doc_key(id, "snapshot", heads_hash(&loaded.doc.get_heads()));
        for (old, _) in stored {
            if old != key {
                batch.delete(old);
            }
        }
        let after = bytes.len();
        batch.put(key.clone(), bytes);
        let plan = SavePlan {
            document: *id,
            kind: SaveKind::Compacted { key, bytes: after },
        };
        Ok((before, after, Some(plan)))
    }

    /// Record in memory what a durable batch wrote.
    pub(crate) fn apply(&mut self, plans: Vec<SavePlan>) {
        for plan in plans {
            let Some(loaded) = self.loaded.get_mut(&plan.document) else {
                continue;
            };
            loaded.dirty = false;
            match plan.kind {
                SaveKind::Incremental { key, bytes } => {
                    loaded.incrementals.push(key);
                    loaded.incremental_bytes += bytes;
                }
                SaveKind::Compacted { key, bytes } => {
                    loaded.snapshot = Some((key, bytes));
                    loaded.incrementals.clear();
                    loaded.incremental_bytes = 0;
                }
            }
        }
    }

    /// Forget documents whose writes failed: memory may hold changes that
    /// storage does not, so they reload from storage on next use.
    pub(crate) fn discard(&mut self, plans: &[SavePlan]) -> BTreeSet<DocumentId> {
        self.renew_actor();
        let ids: BTreeSet<_> = plans.iter().map(|p| p.document).collect();
        for id in &ids {
            self.loaded.remove(id);
        }
        ids
    }

    /// Once more than the budget is loaded, evict least recently used
    /// documents that are clean and unpinned until a sixteenth of the budget
    /// is free. Finding them means looking at every loaded document, so a
    /// store that loads a new document per flush (updates spread over more
    /// rows than the budget) pays that once per budget/16 flushes rather
    /// than at every flush.
    pub(crate) fn evict_over_budget(&mut self) -> usize {
        let limit = self.config.max_loaded_documents;
        if self.loaded.len() <= limit {
            return 0;
        }
        let budget = limit - limit / 16;
        let mut idle: Vec<(u64, DocumentId)> = self
            .loaded
            .iter()
            .filter(|(_, l)| !l.dirty && !l.pinned)
            .map(|(id, l)| (l.last_used, *id))
            .collect();
        let excess = (self.loaded.len() - budget).min(idle.len());
        if excess == 0 {
            return 0;
        }
        // Only the `excess` least recently used matter: select, not sort.
        if excess < idle.len() {
            idle.select_nth_unstable(excess - 1);
        }
        let mut evicted = 0;
        for (_, id) in idle.into_iter().take(excess) {
            self.loaded.remove(&id);
            evicted += 1;
        }
        evicted
    }

    /// Every document id in storage, in id order.
    pub(crate) fn stored_ids(&self) -> Result<Vec<DocumentId>, StorageError> {
        let all = StorageKey::from_trusted(vec![]);
        let mut out = Vec::new();
        let mut after: Option<StorageKey> = None;
        loop {
            let next = self.storage.scan(&all, after.as_ref(), 1)?;
            let Some((key, _)) = next.into_iter().next() else {
                break;
            };
            let first = &key.parts()[0];
            if first.starts_with('~') {
                // System keys sort after every bs58 id ('~' > 'z').
                break;
            }
            if let Ok(id) = first.parse() {
                out.push(id);
            }
            // Skip past every key of this document.
            after = Some(StorageKey::from_trusted(vec![
                first.clone(),
                "\u{10FFFF}".into(),
            ]));
        }
        Ok(out)
    }
}
