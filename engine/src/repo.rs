//! The sans-IO repo: documents, storage and the automerge-repo protocol.
//!
//! Inputs are method calls (a connection opened or closed, a frame arrived, a
//! local edit, the time); outputs are queued and taken with
//! [`Repo::poll_output`]: frames to send per connection, connections to close,
//! and events. The repo never touches a socket or a clock.
//!
//! **Durability.** Edits and received changes are applied in memory at once,
//! but nothing is acknowledged until [`Repo::flush`] has written them in one
//! durable storage transaction (group commit). Sync messages, which advertise
//! our heads, are generated only by `flush`, after the write, so no peer ever
//! hears of a change that a crash could lose. A driver handles every input it
//! has ready, then flushes once.

mod connection;
mod network;
mod receive;
// A storing peer's shortcut; the browser build leaves it out to stay within
// its size budget (tests/tests/wasm_browser.rs), and syncs through automerge.
#[cfg(not(target_arch = "wasm32"))]
mod stored;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::CommitOptions;
use automerge::{ActorId, AutoCommit, Automerge, AutomergeError, Change, ChangeHash};

pub use self::connection::Direction;
use self::connection::{ConnState, Connection, PeerDoc};
use crate::chunk;
use crate::documents::{Documents, DocumentsConfig, doc_prefix, panic_message};
use crate::error::{RepoError, StorageError};
use crate::feed::{ChangeFeed, FeedEvent, Origin, feed_key, last_seq, meta_key};
use crate::policy::{Access, SharePolicy};
use crate::protocol::{Batched, Message};
use crate::storage::{Storage, StorageKey, WriteBatch};
use crate::{ConnectionId, DocumentId, PeerId, PeerInfo, StorageId};

/// Milliseconds since the Unix epoch, as the driver reads its clock.
pub type Millis = u64;

/// How a repo is set up.
#[derive(Clone, Debug)]
pub struct RepoConfig {
    /// The id this repo announces to peers.
    pub peer_id: PeerId,
    /// Announce ourselves as ephemeral (keeping nothing). A storing repo says false.
    pub ephemeral: bool,
    /// Memory and compaction tuning.
    pub documents: DocumentsConfig,
    /// Most sync messages generated for one peer and document per flush.
    pub max_messages_per_flush: usize,
    /// Write changed sync states at most once per this many milliseconds
    /// (by the `now` of [`Repo::receive`]) instead of with every flush;
    /// they are always written when their connection closes. A sync state
    /// only saves work on reconnect: one lost in a crash means a longer
    /// resync, never lost data. 0 (the default) writes them with every flush.
    pub sync_state_interval: Millis,
    /// Flow control: how many messages with changes one peer may have
    /// unanswered for one document (0, the default: no limit). Beyond it,
    /// new changes wait for its answer and then go together in one
    /// message, so a peer slower than the changes gets them in batches
    /// instead of an ever longer queue; a peer that keeps up still gets
    /// each flush's changes at once.
    pub sync_window: usize,
    /// With a `sync_window`: a peer that has not answered for this many
    /// milliseconds (by the `now` of [`Repo::receive`] and [`Repo::tick`])
    /// gets the waiting changes anyway, one message per interval.
    pub sync_window_timeout: Millis,
    /// A peer that has not answered our messages about a document for
    /// `unanswered_grace`, with at least this many of our changes to it
    /// unconfirmed, gets no further message about it until it answers; its
    /// answer then brings one message with everything it lacks. Generating
    /// a message costs in proportion to the changes the peer has not
    /// confirmed (automerge walks them all, and the Bloom filter it sends
    /// grows with them), so without a bound one peer that reads but does
    /// not answer would make every flush slower for every peer, and its
    /// messages ever larger. A peer that is behind but answers is not held.
    /// The default is 1,000; 0: no bound.
    pub max_unanswered_changes: usize,
    /// With `max_unanswered_changes`: how long (by the `now` of
    /// [`Repo::receive`] and [`Repo::tick`]) a peer may leave the first
    /// message with changes that it has not answered before it is held.
    /// The default, 2 s, is longer than a busy reader takes to answer.
    pub unanswered_grace: Millis,
    /// Tandem's batch extension ([`crate::protocol::BATCH_EXTENSION`]): with
    /// a peer that negotiated it, the `request` and `sync` messages one flush
    /// makes for that peer go in batch frames of at most this many bytes of
    /// messages (a larger message goes alone), instead of one frame each,
    /// which saves most of a frame's envelope per document. Plain
    /// automerge-repo peers never see a batch. 0 neither offers nor accepts
    /// it. The default, 64 KiB, is far below a relay's `max_message_size`;
    /// the browser build (wasm32) has no batch code (its size budget) and
    /// always 0.
    pub batch_bytes: usize,
}

impl RepoConfig {
    /// Defaults with the given peer id.
    pub fn new(peer_id: PeerId) -> Self {
        Self {
            peer_id,
            ephemeral: false,
            documents: DocumentsConfig::default(),
            max_messages_per_flush: 4,
            sync_state_interval: 0,
            sync_window: 0,
            sync_window_timeout: 250,
            max_unanswered_changes: 1_000,
            unanswered_grace: 2_000,
            batch_bytes: if cfg!(target_arch = "wasm32") {
                0
            } else {
                64 << 10
            },
        }
    }
}

/// One generated message as a plain `request` or `sync` frame.
fn single(me: &PeerId, peer: &PeerId, m: Batched) -> Vec<u8> {
    m.into_message(me.clone(), peer.clone()).encode()
}

/// Something the driver must do or may want to know.
#[derive(Debug)]
pub enum Output {
    /// Send this frame on the connection (a binary WebSocket message).
    Send {
        /// Where.
        connection: ConnectionId,
        /// The encoded message.
        frame: Vec<u8>,
    },
    /// Close the connection; the repo has already forgotten it.
    Close {
        /// Which.
        connection: ConnectionId,
        /// Why, when it is an error.
        reason: Option<String>,
    },
    /// Something happened.
    Event(Event),
}

/// Events for the application and for monitoring.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A handshake completed.
    PeerConnected(PeerInfo),
    /// A connection ended (closed by either side, or left).
    PeerDisconnected {
        /// The connection.
        connection: ConnectionId,
        /// The peer, if the handshake had completed.
        peer_id: Option<PeerId>,
    },
    /// A commit is durable (the same event the change feed stores).
    Committed(FeedEvent),
    /// A peer said it does not have a document we asked for.
    DocumentUnavailable {
        /// The document.
        document: DocumentId,
        /// Who said so.
        peer_id: PeerId,
    },
    /// An ephemeral message arrived (it was also forwarded to other peers).
    Ephemeral {
        /// The document it concerns.
        document: DocumentId,
        /// The original sender.
        sender: PeerId,
        /// The payload.
        data: Vec<u8>,
    },
    /// A peer told us another store's heads for a document.
    RemoteHeads {
        /// The document.
        document: DocumentId,
        /// The store.
        storage_id: StorageId,
        /// Its heads (as sent).
        heads: Vec<String>,
    },
    /// A peer tried something its access does not allow; nothing was applied.
    AccessDenied {
        /// The connection.
        connection: ConnectionId,
        /// The document.
        document: DocumentId,
        /// What was refused.
        reason: String,
    },
    /// A connection broke the protocol and was closed.
    ProtocolError {
        /// The connection.
        connection: ConnectionId,
        /// What it sent that was wrong.
        error: String,
    },
    /// A peer sent changes to a document this store purged; they were not
    /// applied, so the purged document is not resurrected.
    PurgedDocumentUpdate {
        /// The document.
        document: DocumentId,
        /// Who sent them.
        peer_id: PeerId,
    },
    /// A panic inside automerge was contained; the document is out of service
    /// until [`Repo::release_quarantine`] and everything else keeps working.
    Quarantined {
        /// The document.
        document: DocumentId,
        /// The panic message.
        reason: String,
    },
}

/// What one [`Repo::flush`] made durable.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlushReport {
    /// Documents whose changes were written.
    pub documents: usize,
    /// Change feed entries appended.
    pub commits: usize,
    /// Bytes written (keys and values).
    pub bytes: usize,
    /// Documents evicted from memory afterwards.
    pub evicted: usize,
}

/// Where a change came from, before it has a feed sequence number.
struct PendingCommit {
    document: DocumentId,
    origin: Origin,
    heads: Vec<ChangeHash>,
    before: Vec<ChangeHash>,
}

/// A document store and protocol endpoint. See the [crate docs](crate) and docs/design.md.
pub struct Repo<S: Storage> {
    config: RepoConfig,
    storage_id: StorageId,
    docs: Documents<S>,
    policy: Box<dyn SharePolicy>,
    conns: BTreeMap<ConnectionId, Connection>,
    outputs: VecDeque<Output>,
    pending: Vec<PendingCommit>,
    next_seq: u64,
    /// (connection, document) pairs that may have a sync message to send.
    to_sync: BTreeSet<(ConnectionId, DocumentId)>,
    /// Sync states whose persistent part changed since they were last written.
    sync_state_dirty: BTreeSet<(ConnectionId, DocumentId)>,
    /// When sync states were last written (`now`).
    sync_state_written: Millis,
    /// Sync messages without changes received since the last flush that
    /// wrote documents, with the states they led to (see `receive_sync`).
    received: network::ReceivedMemo,
    /// Documents touched this session: offered to peers whose policy announces.
    active: BTreeSet<DocumentId>,
    /// Documents requested from peers that we do not have yet.
    wanted: BTreeSet<DocumentId>,
    /// Last ephemeral count seen per (sender, session), for de-duplication.
    ephemeral_seen: HashMap<(PeerId, String), u64>,
    now: Millis,
    /// Whether storage holds any purge marker: read at open, set by
    /// [`purge`](Self::purge) (markers are only written there and never
    /// removed), so a store that never purged reads no marker for each
    /// document it creates.
    purges: bool,
}

impl<S: Storage> std::fmt::Debug for Repo<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo")
            .field("peer_id", &self.config.peer_id)
            .field("storage_id", &self.storage_id)
            .field("connections", &self.conns.len())
            .field("loaded_documents", &self.docs.loaded_count())
            .finish_non_exhaustive()
    }
}

const STORAGE_ID_KEY: &str = "storage-id";

const PURGED: &str = "~purged";

fn purge_key(id: &DocumentId) -> StorageKey {
    StorageKey::from_trusted(vec![PURGED.into(), id.to_string()])
}

impl<S: Storage> Repo<S> {
    /// Open a repo over `storage`. Reads two small metadata keys, whatever the
    /// number of documents, and creates the store's id on first open.
    pub fn open(
        storage: S,
        config: RepoConfig,
        policy: impl SharePolicy + 'static,
    ) -> Result<Self, RepoError> {
        let storage_id = match storage.get(&meta_key(STORAGE_ID_KEY))? {
            Some(bytes) => StorageId::new(
                String::from_utf8(bytes)
                    .map_err(|_| StorageError::Corrupt("storage id is not UTF-8".into()))?,
            ),
            None => {
                let id = StorageId::random();
                let mut batch = WriteBatch::new();
                batch.put(meta_key(STORAGE_ID_KEY), id.as_str().as_bytes().to_vec());
                storage.commit(&batch)?;
                id
            }
        };
        let next_seq = last_seq(&storage)? + 1;
        let purges = !storage
            .scan(&StorageKey::from_trusted(vec![PURGED.into()]), None, 1)?
            .is_empty();
        Ok(Self {
            docs: Documents::new(storage, config.documents.clone()),
            config,
            storage_id,
            policy: Box::new(policy),
            conns: BTreeMap::new(),
            outputs: VecDeque::new(),
            pending: Vec::new(),
            next_seq,
            to_sync: BTreeSet::new(),
            sync_state_dirty: BTreeSet::new(),
            sync_state_written: 0,
            received: network::ReceivedMemo::default(),
            active: BTreeSet::new(),
            wanted: BTreeSet::new(),
            ephemeral_seen: HashMap::new(),
            now: 0,
            purges,
        })
    }

    /// This repo's peer id.
    pub fn peer_id(&self) -> &PeerId {
        &self.config.peer_id
    }

    /// This store's id (stable across restarts).
    pub fn storage_id(&self) -> &StorageId {
        &self.storage_id
    }

    /// The storage backend.
    pub fn storage(&self) -> &S {
        &self.docs.storage
    }

    /// The change feed of this store.
    pub fn feed(&self) -> ChangeFeed<'_, S> {
        ChangeFeed::new(&self.docs.storage)
    }

    /// How many documents are in memory.
    pub fn loaded_documents(&self) -> usize {
        self.docs.loaded_count()
    }

    /// Whether a document is in memory now (for tests of eviction).
    pub fn is_loaded(&self, id: &DocumentId) -> bool {
        self.docs.is_loaded(id)
    }

    /// Every document in storage.
    pub fn document_ids(&self) -> Result<Vec<DocumentId>, RepoError> {
        Ok(self.docs.stored_ids()?)
    }

    /// Whether the document exists here (in memory or storage).
    pub fn contains(&self, id: &DocumentId) -> Result<bool, RepoError> {
        Ok(self.docs.exists(id)?)
    }

    /// Quarantined documents and why.
    pub fn quarantined(&self) -> Vec<(DocumentId, String)> {
        self.docs
            .quarantined()
            .map(|(id, r)| (*id, r.to_owned()))
            .collect()
    }

    /// Put a quarantined document back in service; it reloads from storage
    /// (which holds only durable, acknowledged changes) on next use.
    pub fn release_quarantine(&mut self, id: &DocumentId) -> bool {
        self.docs.release(id)
    }

    /// Connections whose handshake completed.
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.conns
            .values()
            .filter_map(|c| match &c.state {
                ConnState::Ready(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// The heads the peer on `connection` last told us it has for `document`
    /// (`None` before it said anything). A peer that advertises heads has
    /// stored them (a relay advertises only durable heads), so when these
    /// include ours, our changes are safe at that peer.
    pub fn remote_heads(
        &self,
        connection: ConnectionId,
        document: &DocumentId,
    ) -> Option<Vec<ChangeHash>> {
        self.conns
            .get(&connection)?
            .docs
            .get(document)?
            .sync
            .their_heads
            .clone()
    }

    /// Whether the peer on `connection` has acknowledged every change we
    /// have of `document`: the heads it last advertised include ours.
    pub fn is_acknowledged(
        &mut self,
        connection: ConnectionId,
        document: &DocumentId,
    ) -> Result<bool, RepoError> {
        let Some(theirs) = self.remote_heads(connection, document) else {
            return Ok(false);
        };
        Ok(self.heads(document)?.iter().all(|h| theirs.contains(h)))
    }

    // ---- documents -------------------------------------------------------

    /// Create a new, empty document with a random id.
    pub fn create(&mut self) -> Result<DocumentId, RepoError> {
        // 128 random bits: a collision with a stored id is not a practical
        // concern, so skip the storage lookup `create_with_id` makes.
        let id = DocumentId::random();
        self.insert_empty(id);
        Ok(id)
    }

    /// Create a new, empty document with the given id.
    pub fn create_with_id(&mut self, id: DocumentId) -> Result<(), RepoError> {
        if self.docs.exists(&id)? {
            return Err(RepoError::AlreadyExists(id));
        }
        if self.purge_marker(&id)?.is_some() {
            return Err(RepoError::Purged(id));
        }
        self.insert_empty(id);
        Ok(())
    }

    /// [`create_with_id`](Self::create_with_id) for an id the caller has
    /// just found absent ([`contains`](Self::contains) said no, or
    /// [`view_if_present`](Self::view_if_present) found nothing), with a
    /// first change made by `f` (committed with `options`), as
    /// [`change_with`](Self::change_with) would make it.
    ///
    /// While no peer is connected, nothing will sync the new document before
    /// the next flush, so it is saved at once and only its bytes are kept
    /// for that flush, as for a document received whole: the document is
    /// saved and dropped while it is still in the processor's cache, instead
    /// of staying in memory among all the others created before the flush
    /// and being evicted later. That takes a third off a batched row insert.
    pub(crate) fn create_absent_with<R>(
        &mut self,
        id: DocumentId,
        options: CommitOptions,
        f: impl FnOnce(&mut AutoCommit) -> Result<R, AutomergeError>,
    ) -> Result<R, RepoError> {
        if self.purge_marker(&id)?.is_some() {
            return Err(RepoError::Purged(id));
        }
        let connected = self
            .conns
            .values()
            .any(|c| matches!(c.state, ConnState::Ready(_)));
        if connected {
            // A peer will want it at the next flush: keep it parsed.
            self.insert_empty(id);
            return self.change_with(&id, options, f);
        }
        let mut doc = self.docs.new_doc();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let r = f(&mut doc)?;
            doc.commit_with(options);
            let heads = doc.get_heads();
            let bytes = (!heads.is_empty()).then(|| doc.save());
            Ok::<_, AutomergeError>((r, heads, bytes))
        }));
        match outcome {
            Ok(Ok((r, heads, Some(bytes)))) => {
                self.docs.insert_unloaded(id, bytes, heads.clone(), true);
                self.on_changed(id, Origin::Local, Vec::new(), heads, None);
                Ok(r)
            }
            // `f` changed nothing: an empty document, as `create_with_id` makes.
            Ok(Ok((r, _, None))) => {
                self.insert_empty(id);
                Ok(r)
            }
            Ok(Err(e)) => Err(RepoError::Automerge(e)),
            Err(panic) => Err(self.quarantine(id, panic_message(panic))),
        }
    }

    /// [`create_absent_with`](Self::create_absent_with) for a document whose
    /// first change `first` builds without a document, given this store's
    /// actor (the change must be that actor's first, with no dependencies).
    /// The document is held as the change's bytes, parsed only when used.
    /// `Ok(false)`, with nothing done, when `first` builds nothing: the
    /// caller then creates it with
    /// [`create_absent_with`](Self::create_absent_with).
    pub(crate) fn create_absent_from_change(
        &mut self,
        id: DocumentId,
        first: impl FnOnce(&ActorId) -> Option<Change>,
    ) -> Result<bool, RepoError> {
        let actor = self.docs.actor();
        let built = catch_unwind(AssertUnwindSafe(|| {
            first(actor).map(|c| (c.raw_bytes().to_vec(), c.hash()))
        }));
        match built {
            // Checked only once something is built: otherwise the caller's
            // `create_absent_with` checks.
            Ok(Some(_)) if self.purge_marker(&id)?.is_some() => Err(RepoError::Purged(id)),
            Ok(Some((bytes, hash))) => {
                self.docs.insert_unloaded(id, bytes, vec![hash], false);
                self.on_changed(id, Origin::Local, Vec::new(), vec![hash], None);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(panic) => Err(self.quarantine(id, panic_message(panic))),
        }
    }

    /// An empty document in memory: nothing to store until it is edited, and
    /// pinned so eviction does not forget it before then.
    fn insert_empty(&mut self, id: DocumentId) {
        self.docs.insert_new(id, self.docs.new_doc());
        self.touch(id);
    }

    /// Edit a document. `f` runs against the document; its operations are
    /// committed as one change if it returns `Ok`, rolled back if it returns
    /// `Err`. The change is applied in memory at once and becomes durable
    /// (acknowledged) at the next successful [`flush`](Self::flush).
    ///
    /// A panic inside `f` or automerge is contained: the document is
    /// quarantined and the error returned.
    pub fn change<R>(
        &mut self,
        id: &DocumentId,
        f: impl FnOnce(&mut AutoCommit) -> Result<R, AutomergeError>,
    ) -> Result<R, RepoError> {
        self.change_with(id, CommitOptions::default(), f)
    }

    /// [`change`](Self::change), committing with `options` (the change's
    /// message and time).
    pub fn change_with<R>(
        &mut self,
        id: &DocumentId,
        options: CommitOptions,
        f: impl FnOnce(&mut AutoCommit) -> Result<R, AutomergeError>,
    ) -> Result<R, RepoError> {
        self.edit(id, Origin::Local, options, f).map(|(r, _)| r)
    }

    /// Run `f` on a loaded document as one change from `origin`: committed if
    /// it returns `Ok`, rolled back if `Err`; a change of heads is recorded
    /// for the next flush. Returns whether the heads changed. A panic
    /// quarantines the document.
    fn edit<R>(
        &mut self,
        id: &DocumentId,
        origin: Origin,
        options: CommitOptions,
        f: impl FnOnce(&mut AutoCommit) -> Result<R, AutomergeError>,
    ) -> Result<(R, bool), RepoError> {
        let loaded = self.docs.get(id)?.ok_or(RepoError::NotFound(*id))?;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let before = loaded.doc.get_heads();
            match f(&mut loaded.doc) {
                Ok(r) => {
                    loaded.doc.commit_with(options);
                    let after = loaded.doc.get_heads();
                    Ok((r, (after != before).then_some((before, after))))
                }
                Err(e) => {
                    loaded.doc.rollback();
                    Err(e)
                }
            }
        }));
        match outcome {
            Ok(Ok((r, changed))) => {
                let is_change = changed.is_some();
                if let Some((before, heads)) = changed {
                    loaded.dirty = true;
                    loaded.pinned = false;
                    // The one change this edit made, if that is all that
                    // changed the document (`f` may also have applied
                    // changes): kept with the others since the last save,
                    // so the flush stores them without `save_after`. Not
                    // for a document held as the bytes it came in: edited
                    // before its first flush, it is stored as one snapshot.
                    let only = loaded.doc.get_last_local_change().filter(|c| {
                        if loaded.received.is_some() {
                            return false;
                        }
                        let mut deps = c.deps().to_vec();
                        deps.sort();
                        deps == before && heads == [c.hash()]
                    });
                    match (&mut loaded.synced, only) {
                        (Some(synced), Some(change)) => {
                            synced.extend_from_slice(change.raw_bytes())
                        }
                        _ => loaded.synced = None,
                    }
                    self.on_changed(*id, origin, before, heads, None);
                }
                Ok((r, is_change))
            }
            Ok(Err(e)) => Err(RepoError::Automerge(e)),
            Err(panic) => Err(self.quarantine(*id, panic_message(panic))),
        }
    }

    /// Read a document (loading it if needed).
    pub fn view<R>(
        &mut self,
        id: &DocumentId,
        f: impl FnOnce(&Automerge) -> R,
    ) -> Result<R, RepoError> {
        self.view_if_present(id, f)?.ok_or(RepoError::NotFound(*id))
    }

    /// [`view`](Self::view) if the document is here, `Ok(None)` if it is
    /// not: one lookup where [`contains`](Self::contains) then `view` would
    /// read storage twice for a document not in memory.
    pub fn view_if_present<R>(
        &mut self,
        id: &DocumentId,
        f: impl FnOnce(&Automerge) -> R,
    ) -> Result<Option<R>, RepoError> {
        let Some(loaded) = self.docs.get(id)? else {
            return Ok(None);
        };
        match catch_unwind(AssertUnwindSafe(|| f(loaded.doc.document()))) {
            Ok(r) => Ok(Some(r)),
            Err(panic) => Err(self.quarantine(*id, panic_message(panic))),
        }
    }

    /// The document's current heads.
    pub fn heads(&mut self, id: &DocumentId) -> Result<Vec<ChangeHash>, RepoError> {
        self.view(id, |d| d.get_heads())
    }

    /// Ask connected peers for a document we do not have. When one sends it,
    /// it is stored and a [`Event::Committed`] follows; a peer without it
    /// answers with [`Event::DocumentUnavailable`].
    pub fn request(&mut self, id: DocumentId) -> Result<(), RepoError> {
        if self.docs.exists(&id)? {
            // Open it: sync with every connected peer the policy offers it to.
            self.touch(id);
            for (cid, conn) in &self.conns {
                if let ConnState::Ready(peer) = &conn.state
                    && self.policy.announce(peer, &id)
                    && self.policy.access(peer, &id) != Access::None
                {
                    self.to_sync.insert((*cid, id));
                }
            }
            return Ok(());
        }
        self.create_with_id(id)?;
        self.wanted.insert(id);
        for (cid, conn) in &self.conns {
            if let ConnState::Ready(peer) = &conn.state
                && self.policy.access(peer, &id) != Access::None
            {
                self.to_sync.insert((*cid, id));
            }
        }
        Ok(())
    }

    /// Physically remove a document: every stored key of it (snapshot,
    /// incrementals, sync states) goes, in one durable transaction that also
    /// writes `marker` under `["~purged", id]`. From then on the repo refuses
    /// the id: creating or requesting it fails with [`RepoError::Purged`], and
    /// a peer that sends changes for it is answered `doc-unavailable` and
    /// reported as [`Event::PurgedDocumentUpdate`]. Unflushed local changes
    /// to the document are dropped with it.
    pub fn purge(&mut self, id: &DocumentId, marker: Vec<u8>) -> Result<(), RepoError> {
        let mut batch = WriteBatch::new();
        let prefix = crate::documents::doc_prefix(id);
        let mut after: Option<StorageKey> = None;
        loop {
            let page = self.docs.storage.scan(&prefix, after.as_ref(), 256)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, _) in page {
                batch.delete(key);
            }
        }
        batch.put(purge_key(id), marker);
        self.docs.storage.commit(&batch)?;
        self.purges = true;
        self.docs.forget(id);
        self.pending.retain(|p| p.document != *id);
        self.to_sync.retain(|(_, d)| d != id);
        self.sync_state_dirty.retain(|(_, d)| d != id);
        self.active.remove(id);
        self.wanted.remove(id);
        for conn in self.conns.values_mut() {
            conn.docs.remove(id);
        }
        Ok(())
    }

    /// The changes of a document that a store whose heads are `have` lacks,
    /// encoded (the Acquire step of a replication link). Hashes in `have`
    /// that this store does not know are ignored, so the result may repeat
    /// changes the other store already has; applying them again is a no-op.
    pub fn changes_since(
        &mut self,
        id: &DocumentId,
        have: &[ChangeHash],
    ) -> Result<Vec<Vec<u8>>, RepoError> {
        self.view(id, |d| {
            let known: Vec<ChangeHash> = have
                .iter()
                .filter(|h| automerge::ReadDoc::get_change_by_hash(d, h).is_some())
                .copied()
                .collect();
            d.get_changes(&known)
                .into_iter()
                .map(|c| c.raw_bytes().to_vec())
                .collect()
        })
    }

    /// Apply encoded changes received from `from` (the Write step of a
    /// replication link): the document is created if new, the commit is
    /// recorded in the change feed as remote, and it is durable at the next
    /// flush. Changes already present are ignored. A purged document is
    /// refused with [`RepoError::Purged`] and reported as
    /// [`Event::PurgedDocumentUpdate`].
    pub fn apply_changes(
        &mut self,
        id: &DocumentId,
        changes: &[Vec<u8>],
        from: &PeerId,
    ) -> Result<bool, RepoError> {
        self.open_for_remote(id, from)?;
        let mut decoded = Vec::with_capacity(changes.len());
        for bytes in changes {
            let change = automerge::Change::from_bytes(bytes.clone())
                .map_err(|e| RepoError::InvalidChange(e.to_string()))?;
            decoded.push(change);
        }
        self.edit(
            id,
            Origin::Remote(from.clone()),
            CommitOptions::default(),
            |d| d.apply_changes(decoded),
        )
        .map(|((), changed)| changed)
    }

    /// The document as durably stored, in the form automerge's `load` (and
    /// [`apply_document`](Self::apply_document)) reads: `None` if nothing is
    /// stored, or if memory holds changes not flushed yet (use
    /// [`changes_since`](Self::changes_since) then).
    pub fn stored_bytes(&self, id: &DocumentId) -> Result<Option<Vec<u8>>, RepoError> {
        if self.docs.is_dirty(id) {
            return Ok(None);
        }
        Ok(self.docs.stored_bytes(id)?)
    }

    /// Merge a whole saved document received from `from` (the bulk Write of
    /// a replication link, for a store that lacks the document): the same
    /// rules as [`apply_changes`](Self::apply_changes), without decoding
    /// and applying the changes one by one.
    ///
    /// A document new to this store that arrives as one saved document, or
    /// as saved changes that make up its whole history (what
    /// [`stored_bytes`](Self::stored_bytes) returns), is not parsed at all:
    /// the chunks' checksums are checked, its heads are read from their
    /// headers for the change feed, and the bytes are stored as they are at
    /// the next flush. Automerge parses it on first use, like any stored
    /// document, and reports a corrupt one then
    /// ([`RepoError::CorruptDocument`]).
    pub fn apply_document(
        &mut self,
        id: &DocumentId,
        bytes: &[u8],
        from: &PeerId,
    ) -> Result<bool, RepoError> {
        if !self.docs.exists(id)? {
            self.refuse_purged(id, from)?;
            if let Some(header) = chunk::saved_header(bytes)
                && !header.heads.is_empty()
            {
                let heads = header.heads;
                self.docs
                    .insert_unloaded(*id, bytes.to_vec(), heads.clone(), header.snapshot);
                self.on_changed(*id, Origin::Remote(from.clone()), Vec::new(), heads, None);
                return Ok(true);
            }
        }
        let new = self.open_for_remote(id, from)?;
        let changed = self
            .edit(
                id,
                Origin::Remote(from.clone()),
                CommitOptions::default(),
                |d| d.load_incremental(bytes).map(|_| ()),
            )
            .map(|((), changed)| changed)?;
        if new && changed {
            // Already encoded: store these bytes rather than encode again.
            self.docs.received_whole(id, bytes.to_vec());
        }
        Ok(changed)
    }

    /// Make sure `id` exists before `from`'s changes are applied to it:
    /// created if new, refused (and reported) if it was purged.
    /// Returns whether it was created.
    fn open_for_remote(&mut self, id: &DocumentId, from: &PeerId) -> Result<bool, RepoError> {
        let new = !self.docs.exists(id)?;
        if new {
            self.refuse_purged(id, from)?;
            self.insert_empty(*id);
        }
        Ok(new)
    }

    /// Refuse (and report) `from`'s changes to a document that was purged.
    fn refuse_purged(&mut self, id: &DocumentId, from: &PeerId) -> Result<(), RepoError> {
        if self.purge_marker(id)?.is_some() {
            self.outputs
                .push_back(Output::Event(Event::PurgedDocumentUpdate {
                    document: *id,
                    peer_id: from.clone(),
                }));
            return Err(RepoError::Purged(*id));
        }
        Ok(())
    }

    /// The heads of `id` that the store `storage_id` is known to have, from
    /// the sync state persisted with it (what it acknowledged), if any.
    pub fn acknowledged_heads(
        &self,
        id: &DocumentId,
        storage_id: &StorageId,
    ) -> Result<Option<Vec<ChangeHash>>, RepoError> {
        match self.docs.storage.get(&sync_state_key(id, storage_id))? {
            None => Ok(None),
            Some(bytes) => Ok(sync::State::decode(&bytes)
                .ok()
                .map(|state| state.shared_heads)),
        }
    }

    /// The marker [`purge`](Self::purge) left for a document, if it was purged.
    pub fn purge_marker(&self, id: &DocumentId) -> Result<Option<Vec<u8>>, RepoError> {
        if !self.purges {
            return Ok(None);
        }
        Ok(self.docs.storage.get(&purge_key(id))?)
    }

    /// Remember a document touched this session, to offer it to peers that
    /// connect later (only if the policy ever announces anything).
    fn touch(&mut self, id: DocumentId) {
        if self.policy.may_announce() {
            self.active.insert(id);
        }
    }

    fn quarantine(&mut self, id: DocumentId, reason: String) -> RepoError {
        tracing::error!(document = %id, %reason, "panic contained; document quarantined");
        self.docs.quarantine(id, reason.clone());
        self.pending.retain(|p| p.document != id);
        self.to_sync.retain(|(_, d)| *d != id);
        self.sync_state_dirty.retain(|(_, d)| *d != id);
        for conn in self.conns.values_mut() {
            conn.docs.remove(&id);
        }
        self.outputs.push_back(Output::Event(Event::Quarantined {
            document: id,
            reason: reason.clone(),
        }));
        RepoError::Quarantined {
            document: id,
            reason,
        }
    }

    /// A document changed: record the commit and schedule the fan-out.
    fn on_changed(
        &mut self,
        id: DocumentId,
        origin: Origin,
        before: Vec<ChangeHash>,
        heads: Vec<ChangeHash>,
        from: Option<ConnectionId>,
    ) {
        self.touch(id);
        self.wanted.remove(&id);
        self.pending.push(PendingCommit {
            document: id,
            origin,
            heads,
            before,
        });
        for (cid, conn) in &self.conns {
            if Some(*cid) == from {
                continue;
            }
            if let ConnState::Ready(peer) = &conn.state {
                let shares = match conn.docs.get(&id) {
                    Some(pd) => pd.access != Access::None,
                    None => {
                        self.policy.announce(peer, &id)
                            && self.policy.access(peer, &id) != Access::None
                    }
                };
                if shares {
                    self.to_sync.insert((*cid, id));
                }
            }
        }
    }

    // ---- durability ------------------------------------------------------

    /// Write every pending change, feed entry and sync state in one durable
    /// transaction; then generate the sync messages that advertise them and
    /// evict idle documents over budget.
    ///
    /// On error nothing of this flush is acknowledged: documents with
    /// unwritten changes are dropped from memory (they reload from storage)
    /// and their sync states reset, so peers resend what was lost.
    pub fn flush(&mut self) -> Result<FlushReport, RepoError> {
        let mut batch = WriteBatch::new();
        let plans = self.docs.plan_saves(&mut batch);
        let mut events = Vec::with_capacity(self.pending.len());
        let mut block = Vec::new();
        for (i, p) in self.pending.drain(..).enumerate() {
            let event = FeedEvent {
                seq: self.next_seq + i as u64,
                document: p.document,
                origin: p.origin,
                heads: p.heads,
                before: p.before,
            };
            event.encode_into(&mut block);
            events.push(event);
        }
        if let Some(last) = events.last() {
            batch.put(feed_key(last.seq), block);
        }
        let mut persisted_sync = Vec::new();
        let sync_states_due =
            self.now.saturating_sub(self.sync_state_written) >= self.config.sync_state_interval;
        if sync_states_due && !self.sync_state_dirty.is_empty() {
            self.sync_state_written = self.now;
        }
        let dirty = if sync_states_due {
            std::mem::take(&mut self.sync_state_dirty)
        } else {
            BTreeSet::new()
        };
        for (cid, doc) in dirty {
            if let Some(conn) = self.conns.get(&cid)
                && put_sync_state(conn, &doc, &mut batch)
            {
                persisted_sync.push((cid, doc));
            }
        }
        let report = FlushReport {
            documents: plans.len(),
            commits: events.len(),
            bytes: batch.size(),
            evicted: 0,
        };
        if !batch.is_empty()
            && let Err(e) = self.docs.storage.commit_owned(batch)
        {
            let lost = self.docs.discard(&plans);
            for conn in self.conns.values_mut() {
                for id in &lost {
                    if let Some(pd) = conn.docs.get_mut(id) {
                        pd.sync = sync::State::new();
                    }
                }
            }
            for (cid, doc) in persisted_sync {
                self.sync_state_dirty.insert((cid, doc));
            }
            tracing::error!(error = %e, "flush failed; unwritten changes dropped from memory");
            return Err(e.into());
        }
        self.next_seq += events.len() as u64;
        if !plans.is_empty() {
            self.received.clear();
        }
        self.docs.apply(plans);
        for event in events {
            self.outputs
                .push_back(Output::Event(Event::Committed(event)));
        }
        self.generate_sync_messages();
        let evicted = self.docs.evict_over_budget();
        Ok(FlushReport { evicted, ..report })
    }

    /// Commits (local edits and received changes) waiting for the next
    /// [`flush`](Self::flush): a driver that reads many frames before it
    /// flushes can flush sooner when this grows (a batch frame may carry
    /// hundreds of documents).
    pub fn unflushed_commits(&self) -> usize {
        self.pending.len()
    }

    /// Advance the clock (`now` as in [`Repo::receive`]) without input, so
    /// that the next flush sends what flow control held back longer than
    /// [`RepoConfig::sync_window_timeout`].
    pub fn tick(&mut self, now: Millis) {
        self.now = now;
    }

    /// Whether sync messages wait for a peer's answer (flow control): a
    /// driver should then [`tick`](Self::tick) and flush within
    /// [`RepoConfig::sync_window_timeout`] even without input.
    pub fn has_held_sync(&self) -> bool {
        !self.to_sync.is_empty()
    }

    fn generate_sync_messages(&mut self) {
        let max = self.config.max_messages_per_flush;
        let (window, timeout) = (self.config.sync_window, self.config.sync_window_timeout);
        let (unanswered, grace) = (
            self.config.max_unanswered_changes,
            self.config.unanswered_grace,
        );
        let mut held = Vec::new();
        // Generating is a function of the document and the sync state only:
        // peers in the same state with a document (readers in step, as in a
        // fan-out) get the same messages and end in the same state, so each
        // distinct state is generated once per flush.
        let mut generated: HashMap<(DocumentId, u64), Vec<Generated>> = HashMap::new();
        let to_sync = std::mem::take(&mut self.to_sync);
        let mut sends = Vec::new();
        // Only a document synced with several connections in this flush can
        // meet the same state twice: the others (every document of a replica
        // catching up, say) skip hashing and keeping their states.
        let mut connections: HashMap<DocumentId, usize> = HashMap::new();
        if self.conns.len() > 1 {
            for (_, id) in &to_sync {
                *connections.entry(*id).or_default() += 1;
            }
        }
        for (cid, id) in to_sync {
            let Some(conn) = self.conns.get_mut(&cid) else {
                continue;
            };
            let ConnState::Ready(peer) = &conn.state else {
                continue;
            };
            let peer = peer.clone();
            let pd = conn.docs.entry(id).or_insert_with(|| {
                let access = self.policy.access(&peer, &id);
                PeerDoc::new(access, load_sync_state(&self.docs.storage, &id, &peer))
            });
            if pd.access == Access::None {
                continue;
            }
            if window > 0
                && pd.in_flight.len() >= window
                && self.now.saturating_sub(pd.last_sent) < timeout
            {
                held.push((cid, id));
                continue;
            }
            // Its answer queues it again (`receive_sync`).
            if unanswered > 0
                && pd.sync.sent_hashes.len() >= unanswered
                && pd
                    .unanswered_since
                    .is_some_and(|since| self.now.saturating_sub(since) >= grace)
            {
                continue;
            }
            // What to send is often decided without automerge (`stored`): from
            // a loaded document's heads, or for one not in memory and stored
            // whole, from its stored bytes, without loading it.
            #[cfg(not(target_arch = "wasm32"))]
            let decided = if self.docs.is_loaded(&id) {
                match self.docs.get(&id) {
                    Ok(Some(loaded)) => {
                        let heads = loaded.doc.get_heads();
                        stored::generate(&mut pd.sync, &heads, None)
                            .map(|answer| answer.map(|message| (heads, message)))
                    }
                    _ => None,
                }
            } else {
                match self.docs.stored_whole(&id) {
                    Ok(Some(whole)) => {
                        stored::generate(&mut pd.sync, &whole.heads, Some(&whole.bytes))
                            .map(|answer| answer.map(|message| (whole.heads, message)))
                    }
                    Ok(None) => None,
                    Err(e) => {
                        tracing::warn!(document = %id, error = %e, "cannot read document to sync");
                        continue;
                    }
                }
            };
            #[cfg(target_arch = "wasm32")]
            let decided: Option<Option<(Vec<ChangeHash>, sync::Message)>> = None;
            if let Some(answer) = decided {
                if let Some((heads, message)) = answer {
                    if !message.changes.is_empty() {
                        pd.sent_changes(window, self.now, || heads);
                    }
                    sends.push((
                        cid,
                        Batched {
                            request: false,
                            document_id: id,
                            data: message.encode(),
                        },
                    ));
                }
                continue;
            }
            let loaded = match self.docs.get(&id) {
                Ok(Some(l)) => l,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(document = %id, error = %e, "cannot load document to sync");
                    continue;
                }
            };
            let doc = &mut loaded.doc;
            let memo = connections.get(&id).is_some_and(|n| *n > 1);
            let key = (id, if memo { state_hash(&pd.sync) } else { 0 });
            let same = generated
                .get(&key)
                .filter(|_| memo)
                .and_then(|g| g.iter().find(|g| g.before == pd.sync));
            let (empty, messages, changes) = if let Some(g) = same {
                pd.sync.clone_from(&g.after);
                (g.empty, g.messages.clone(), g.changes)
            } else {
                let before = memo.then(|| pd.sync.clone());
                let result = catch_unwind(AssertUnwindSafe(|| {
                    let empty = doc.get_heads().is_empty();
                    let mut out = Vec::new();
                    let mut changes = false;
                    for _ in 0..max {
                        match doc.sync().generate_sync_message(&mut pd.sync) {
                            Some(m) => {
                                changes |= !m.changes.is_empty();
                                out.push(m.encode());
                            }
                            None => break,
                        }
                    }
                    (empty, out, changes)
                }));
                match result {
                    Ok((empty, messages, changes)) => {
                        if let Some(before) = before {
                            generated.entry(key).or_default().push(Generated {
                                before,
                                after: pd.sync.clone(),
                                empty,
                                messages: messages.clone(),
                                changes,
                            });
                        }
                        (empty, messages, changes)
                    }
                    Err(panic) => {
                        let _ = self.quarantine(id, panic_message(panic));
                        continue;
                    }
                }
            };
            if changes {
                pd.sent_changes(window, self.now, || doc.get_heads());
            }
            let request = empty && !pd.received;
            sends.extend(messages.into_iter().map(|data| {
                (
                    cid,
                    Batched {
                        request,
                        document_id: id,
                        data,
                    },
                )
            }));
        }
        self.to_sync.extend(held);
        self.send_generated(sends);
    }

    /// Queue the frames of what [`Self::generate_sync_messages`] made, in
    /// order per connection: a frame each for a plain peer; batch frames
    /// for one that negotiated the extension (the browser build never
    /// does).
    fn send_generated(&mut self, sends: Vec<(ConnectionId, Batched)>) {
        #[cfg(not(target_arch = "wasm32"))]
        let mut batches: BTreeMap<ConnectionId, Vec<Batched>> = BTreeMap::new();
        for (cid, m) in sends {
            let Some(conn) = self.conns.get(&cid) else {
                continue;
            };
            #[cfg(not(target_arch = "wasm32"))]
            if conn.batch {
                batches.entry(cid).or_default().push(m);
                continue;
            }
            if let ConnState::Ready(peer) = &conn.state {
                let frame = single(&self.config.peer_id, &peer.peer_id, m);
                self.outputs.push_back(Output::Send {
                    connection: cid,
                    frame,
                });
            }
        }
        #[cfg(not(target_arch = "wasm32"))]
        for (cid, messages) in batches {
            self.send_batches(cid, messages);
        }
    }

    /// Queue `messages` for `cid` in batch frames of at most
    /// [`RepoConfig::batch_bytes`] of messages; a lone message goes as a
    /// plain frame, which a relay can merge with the next ones.
    #[cfg(not(target_arch = "wasm32"))]
    fn send_batches(&mut self, cid: ConnectionId, messages: Vec<Batched>) {
        let Some(ConnState::Ready(peer)) = self.conns.get(&cid).map(|c| &c.state) else {
            return;
        };
        let me = &self.config.peer_id;
        let outputs = &mut self.outputs;
        let mut close = |group: &mut Vec<Batched>| {
            let frame = match group.len() {
                0 => return,
                1 => single(me, &peer.peer_id, group.pop().expect("one")),
                _ => Message::Batch {
                    sender_id: me.clone(),
                    target_id: peer.peer_id.clone(),
                    messages: std::mem::take(group),
                }
                .encode(),
            };
            outputs.push_back(Output::Send {
                connection: cid,
                frame,
            });
        };
        let mut group = Vec::new();
        let mut size = 0;
        for m in messages {
            let len = m.encoded_len();
            if !group.is_empty() && size + len > self.config.batch_bytes {
                close(&mut group);
                size = 0;
            }
            size += len;
            group.push(m);
        }
        close(&mut group);
    }

    /// The next thing for the driver to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Take every queued output.
    pub fn drain_outputs(&mut self) -> Vec<Output> {
        self.outputs.drain(..).collect()
    }

    /// Compact one document now, whatever its size: flush what is pending,
    /// then replace its stored snapshot and incrementals with one fresh
    /// snapshot in one atomic storage transaction (a crash leaves either the
    /// old chunks or the new snapshot). Returns the document's stored bytes
    /// before and after; a document stored as a single snapshot already is
    /// left as it is (both equal). Flushes compact on their own once the
    /// incrementals outgrow the snapshot ([`DocumentsConfig`]); this is for
    /// operators (`tandem compact`).
    pub fn compact(&mut self, id: &DocumentId) -> Result<(usize, usize), RepoError> {
        self.flush()?;
        let mut batch = WriteBatch::new();
        let (before, after, plan) = self.docs.plan_compaction(id, &mut batch)?;
        if let Some(plan) = plan {
            self.docs.storage.commit(&batch)?;
            self.docs.apply(vec![plan]);
        }
        Ok((before, after))
    }
}

/// The messages one sync state produced with a document in one flush.
struct Generated {
    before: sync::State,
    after: sync::State,
    empty: bool,
    messages: Vec<Vec<u8>>,
    /// They bring changes.
    changes: bool,
}

/// A hash of a sync state (and whatever else `value` holds), to find
/// peers in the same state.
fn state_hash(value: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}

fn sync_state_key(doc: &DocumentId, sid: &StorageId) -> StorageKey {
    let mut parts = doc_prefix(doc).parts().to_vec();
    parts.push("sync-state".into());
    parts.push(sid.as_str().replace('\0', ""));
    StorageKey::from_trusted(parts)
}

/// The store whose sync state with us is worth keeping: the peer's, if it
/// has one and is not ephemeral.
fn persistent_store(peer: &PeerInfo) -> Option<&StorageId> {
    peer.storage_id.as_ref().filter(|_| !peer.ephemeral)
}

/// Add the persistent part of `conn`'s sync state for `doc` to `batch`, if
/// its peer keeps a store; whether anything was added.
fn put_sync_state(conn: &Connection, doc: &DocumentId, batch: &mut WriteBatch) -> bool {
    let ConnState::Ready(peer) = &conn.state else {
        return false;
    };
    match (persistent_store(peer), conn.docs.get(doc)) {
        (Some(sid), Some(pd)) => {
            batch.put(sync_state_key(doc, sid), pd.sync.encode());
            true
        }
        _ => false,
    }
}

/// The persisted sync state with this peer's store, or a fresh one.
fn load_sync_state<S: Storage>(storage: &S, doc: &DocumentId, peer: &PeerInfo) -> sync::State {
    let Some(sid) = persistent_store(peer) else {
        return sync::State::new();
    };
    match storage.get(&sync_state_key(doc, sid)) {
        Ok(Some(bytes)) => sync::State::decode(&bytes).unwrap_or_else(|e| {
            tracing::warn!(document = %doc, error = %e, "corrupt sync state ignored");
            sync::State::new()
        }),
        Ok(None) => sync::State::new(),
        Err(e) => {
            tracing::warn!(document = %doc, error = %e, "cannot read sync state");
            sync::State::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::{ROOT, ReadDoc};

    use super::*;
    use crate::{MemoryStorage, ShareAll};

    fn repo() -> Repo<MemoryStorage> {
        let config = RepoConfig::new(PeerId::new("t"));
        Repo::open(MemoryStorage::new(), config, ShareAll).unwrap()
    }

    /// A repo over shared storage, to open again after dropping it.
    fn repo_on(storage: &std::sync::Arc<MemoryStorage>) -> Repo<std::sync::Arc<MemoryStorage>> {
        let config = RepoConfig::new(PeerId::new("t"));
        Repo::open(storage.clone(), config, ShareAll).unwrap()
    }

    /// A document made from a change built without a document is held as
    /// that change's bytes (not parsed), reads back, is stored as them at
    /// the flush with one local feed entry; building nothing does nothing,
    /// and a panic while building quarantines the id.
    #[test]
    fn create_absent_from_change_holds_the_change_bytes() {
        let mut repo = repo();
        let id = DocumentId::random();
        let mut made = None;
        let created = repo
            .create_absent_from_change(id, |actor| {
                let mut d = AutoCommit::new().with_actor(actor.clone());
                d.put(ROOT, "k", 1).unwrap();
                d.commit();
                made = d.get_last_local_change();
                made.clone()
            })
            .unwrap();
        assert!(created);
        let made = made.unwrap();
        assert_eq!(
            made.actor_id(),
            repo.docs.actor(),
            "made as the store's actor"
        );
        assert!(!repo.is_loaded(&id), "held as bytes");
        repo.flush().unwrap();
        assert_eq!(
            repo.stored_bytes(&id).unwrap().as_deref(),
            Some(made.raw_bytes())
        );
        let feed = repo.feed().read(crate::Cursor::START, 10).unwrap();
        assert_eq!(feed.len(), 1);
        assert_eq!((feed[0].document, &feed[0].origin), (id, &Origin::Local));
        assert_eq!(feed[0].heads, vec![made.hash()]);
        let read = |d: &Automerge| d.get(ROOT, "k").unwrap().map(|(v, _)| v.as_i64());
        assert_eq!(repo.view(&id, read).unwrap(), Some(Some(1)));

        let nothing = DocumentId::random();
        assert!(!repo.create_absent_from_change(nothing, |_| None).unwrap());
        assert!(!repo.contains(&nothing).unwrap());

        let panicking = DocumentId::random();
        let err = repo.create_absent_from_change(panicking, |_| panic!("while building"));
        assert!(matches!(err, Err(RepoError::Quarantined { .. })), "{err:?}");
        repo.flush().unwrap();
        assert!(repo.stored_bytes(&panicking).unwrap().is_none());
        assert_eq!(repo.view(&id, read).unwrap(), Some(Some(1)));

        // A purged id is not made again.
        repo.purge(&id, b"gone".to_vec()).unwrap();
        let again = repo.create_absent_from_change(id, |_| Some(made.clone()));
        assert!(matches!(again, Err(RepoError::Purged(_))), "{again:?}");
    }

    /// A flush stores an edit as the change automerge encoded at commit;
    /// an edit that also applied changes is saved from the document, so
    /// reopening finds everything either way.
    #[test]
    fn an_edit_is_stored_as_the_change_it_made() {
        let storage = std::sync::Arc::new(MemoryStorage::new());
        let open = || repo_on(&storage);
        let mut repo = open();
        let id = DocumentId::random();
        repo.create_absent_with(id, CommitOptions::default(), |d| d.put(ROOT, "k", 1))
            .unwrap();
        repo.flush().unwrap();
        repo.change(&id, |d| d.put(ROOT, "k", 2)).unwrap();
        let change = repo
            .view(&id, |d| d.get_last_local_change().unwrap().clone())
            .unwrap();
        repo.flush().unwrap();
        let stored = repo.stored_bytes(&id).unwrap().unwrap();
        assert!(
            stored.ends_with(change.raw_bytes()),
            "stored as it was made"
        );

        // A change from elsewhere applied inside the edit, then a put.
        let mut other = AutoCommit::new();
        other.put(ROOT, "other", 7).unwrap();
        other.commit();
        let foreign = other.get_last_local_change().unwrap().clone();
        repo.change(&id, |d| {
            d.apply_changes([foreign])?;
            d.put(ROOT, "k", 3)
        })
        .unwrap();
        repo.flush().unwrap();
        let heads = repo.heads(&id).unwrap();
        drop(repo);
        let mut repo = open();
        assert_eq!(repo.heads(&id).unwrap(), heads);
        let read = |d: &Automerge| {
            let int = |k| d.get(ROOT, k).unwrap().and_then(|(v, _)| v.as_i64());
            (int("k"), int("other"))
        };
        assert_eq!(repo.view(&id, read).unwrap(), (Some(3), Some(7)));
    }

    /// A store knows of its purges after reopening, and a store that never
    /// purged reports no marker.
    #[test]
    fn purge_markers_are_found_after_reopening() {
        let storage = std::sync::Arc::new(MemoryStorage::new());
        let open = || repo_on(&storage);
        let mut repo = open();
        let (kept, gone) = (DocumentId::random(), DocumentId::random());
        for id in [kept, gone] {
            repo.create_absent_with(id, CommitOptions::default(), |d| d.put(ROOT, "k", 1))
                .unwrap();
        }
        repo.flush().unwrap();
        assert_eq!(repo.purge_marker(&gone).unwrap(), None);
        repo.purge(&gone, b"gone".to_vec()).unwrap();
        assert_eq!(repo.purge_marker(&gone).unwrap(), Some(b"gone".to_vec()));
        drop(repo);
        let mut repo = open();
        assert_eq!(repo.purge_marker(&gone).unwrap(), Some(b"gone".to_vec()));
        assert_eq!(repo.purge_marker(&kept).unwrap(), None);
        let again =
            repo.create_absent_with(gone, CommitOptions::default(), |d| d.put(ROOT, "k", 2));
        assert!(matches!(again, Err(RepoError::Purged(_))), "{again:?}");
    }

    /// With no peer connected, the new document is held as bytes, reads
    /// back, becomes durable at the flush with one local feed entry, and a
    /// failing or panicking first change leaves nothing behind but, for the
    /// panic, a quarantine.
    #[test]
    fn create_absent_with_holds_bytes_and_contains_failures() {
        let mut repo = repo();
        let id = DocumentId::random();
        let options = CommitOptions::default().with_message("first");
        repo.create_absent_with(id, options, |d| d.put(ROOT, "k", 1))
            .unwrap();
        assert!(!repo.is_loaded(&id), "held as bytes");
        assert!(repo.contains(&id).unwrap());
        let read = |d: &Automerge| d.get(ROOT, "k").unwrap().map(|(v, _)| v.as_i64());
        assert_eq!(repo.view(&id, read).unwrap(), Some(Some(1)));
        repo.flush().unwrap();
        let feed = repo.feed().read(crate::Cursor::START, 10).unwrap();
        assert_eq!(feed.len(), 1);
        assert_eq!((feed[0].document, &feed[0].origin), (id, &Origin::Local));
        assert!(repo.stored_bytes(&id).unwrap().is_some());

        let failing = DocumentId::random();
        let err = repo.create_absent_with(failing, CommitOptions::default(), |d| {
            d.put(ROOT, "k", 1)?;
            d.increment(ROOT, "k", 1)
        });
        assert!(matches!(err, Err(RepoError::Automerge(_))), "{err:?}");
        assert!(!repo.contains(&failing).unwrap());

        let panicking = DocumentId::random();
        let err =
            repo.create_absent_with(panicking, CommitOptions::default(), |_| -> Result<(), _> {
                panic!("inside the first change")
            });
        assert!(matches!(err, Err(RepoError::Quarantined { .. })), "{err:?}");
        repo.flush().unwrap();
        assert!(repo.stored_bytes(&panicking).unwrap().is_none());
        // The store goes on.
        assert_eq!(repo.view(&id, read).unwrap(), Some(Some(1)));
    }
}
