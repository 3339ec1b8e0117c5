//! The protocol side of the repo: connections, the handshake, and every
//! message a peer can send.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use automerge::sync;
use automerge::{AutomergeError, ChangeHash};

use super::connection::{ConnState, Connection, PeerDoc};
use super::{Direction, Event, Millis, Output, Repo, load_sync_state, put_sync_state};
use crate::chunk;
use crate::documents::panic_message;
use crate::error::{DecodeError, RepoError};
use crate::feed::Origin;
use crate::policy::Access;
use crate::protocol::{BATCH_EXTENSION, Message, PROTOCOL_VERSION, PeerMetadata, RemoteHeads};
use crate::storage::{Storage, WriteBatch};
use crate::{ConnectionId, DocumentId, PeerId, PeerInfo};

/// Our heads before and after a sync message changed the document, and the
/// whole saved document it brought (with its heads), if it did.
type Changed = (
    Vec<ChangeHash>,
    Vec<ChangeHash>,
    Option<(Vec<u8>, Vec<ChangeHash>)>,
);

impl<S: Storage> Repo<S> {
    /// A connection id not in use on this repo (for in-process links).
    pub fn fresh_connection_id(&mut self) -> ConnectionId {
        let next = self
            .conns
            .keys()
            .next_back()
            .map_or(1 << 40, |c| c.0.max(1 << 40) + 1);
        ConnectionId(next)
    }

    /// A connection opened. `Outgoing` sends `join` at once; `Incoming`
    /// waits for the peer's `join`.
    pub fn connect(&mut self, id: ConnectionId, direction: Direction) -> Result<(), RepoError> {
        if self.conns.contains_key(&id) {
            return Err(RepoError::DuplicateConnection(id));
        }
        let state = match direction {
            Direction::Incoming => ConnState::AwaitingJoin,
            Direction::Outgoing => {
                let join = Message::Join {
                    sender_id: self.config.peer_id.clone(),
                    supported_protocol_versions: vec![PROTOCOL_VERSION.into()],
                    metadata: Some(self.metadata()),
                    extensions: self.extensions(),
                };
                self.outputs.push_back(Output::Send {
                    connection: id,
                    frame: join.encode(),
                });
                ConnState::AwaitingPeer
            }
        };
        self.conns.insert(id, Connection::new(state));
        Ok(())
    }

    /// A connection closed (by the transport). Idempotent.
    pub fn disconnect(&mut self, id: ConnectionId) {
        if let Some(conn) = self.conns.remove(&id) {
            self.forget_connection(id, conn);
        }
    }

    fn forget_connection(&mut self, id: ConnectionId, conn: Connection) {
        self.to_sync.retain(|(c, _)| *c != id);
        // Persist what the sync states learned before forgetting them.
        let mut batch = WriteBatch::new();
        for (_, doc) in self.sync_state_dirty.iter().filter(|(c, _)| *c == id) {
            put_sync_state(&conn, doc, &mut batch);
        }
        if !batch.is_empty()
            && let Err(e) = self.docs.storage.commit(&batch)
        {
            tracing::warn!(error = %e, "could not persist sync states on disconnect");
        }
        self.sync_state_dirty.retain(|(c, _)| *c != id);
        let peer_id = match conn.state {
            ConnState::Ready(p) => Some(p.peer_id),
            _ => None,
        };
        self.outputs
            .push_back(Output::Event(Event::PeerDisconnected {
                connection: id,
                peer_id,
            }));
    }

    /// Close a connection from our side with an `error` frame.
    fn fail(&mut self, id: ConnectionId, error: String) {
        let target = self.conns.get(&id).and_then(|c| match &c.state {
            ConnState::Ready(p) => Some(p.peer_id.clone()),
            _ => None,
        });
        let frame = Message::Error {
            message: error.clone(),
            sender_id: Some(self.config.peer_id.clone()),
            target_id: target,
        }
        .encode();
        self.outputs.push_back(Output::Send {
            connection: id,
            frame,
        });
        self.outputs.push_back(Output::Event(Event::ProtocolError {
            connection: id,
            error: error.clone(),
        }));
        self.outputs.push_back(Output::Close {
            connection: id,
            reason: Some(error),
        });
        if let Some(conn) = self.conns.remove(&id) {
            self.forget_connection(id, conn);
        }
    }

    /// Close a connection from our side without error.
    pub fn close(&mut self, id: ConnectionId) {
        if let Some(conn) = self.conns.remove(&id) {
            let frame = Message::Leave {
                sender_id: self.config.peer_id.clone(),
            }
            .encode();
            self.outputs.push_back(Output::Send {
                connection: id,
                frame,
            });
            self.outputs.push_back(Output::Close {
                connection: id,
                reason: None,
            });
            self.forget_connection(id, conn);
        }
    }

    fn metadata(&self) -> PeerMetadata {
        PeerMetadata {
            storage_id: (!self.config.ephemeral).then(|| self.storage_id.clone()),
            is_ephemeral: self.config.ephemeral,
        }
    }

    /// The Tandem extensions this repo offers and accepts: the batch
    /// extension unless switched off (the browser build has no batch code).
    fn extensions(&self) -> Vec<String> {
        if self.config.batch_bytes > 0 && cfg!(not(target_arch = "wasm32")) {
            vec![BATCH_EXTENSION.into()]
        } else {
            Vec::new()
        }
    }

    /// Whether `theirs` (a peer's `tandemExtensions`) and ours both have
    /// the batch extension.
    fn batches_with(&self, theirs: &[String]) -> bool {
        self.extensions()
            .iter()
            .any(|e| e == BATCH_EXTENSION && theirs.contains(e))
    }

    /// A frame arrived on a connection. Malformed or unexpected frames get an
    /// `error` frame and a close; they never panic or disturb other peers.
    pub fn receive(
        &mut self,
        now: Millis,
        id: ConnectionId,
        frame: &[u8],
    ) -> Result<(), RepoError> {
        self.now = now;
        if !self.conns.contains_key(&id) {
            return Err(RepoError::UnknownConnection(id));
        }
        let msg = match Message::decode(frame) {
            Ok(m) => m,
            Err(e) => {
                let text = match &e {
                    DecodeError::UnknownType(t) => format!("unknown message type {t:?}"),
                    other => format!("malformed message: {other}"),
                };
                self.fail(id, text);
                return Ok(());
            }
        };
        let state = &self.conns[&id].state;
        match (state, msg) {
            (
                ConnState::AwaitingJoin,
                Message::Join {
                    sender_id,
                    supported_protocol_versions,
                    metadata,
                    extensions,
                },
            ) => {
                if !supported_protocol_versions
                    .iter()
                    .any(|v| v == PROTOCOL_VERSION)
                {
                    self.fail(
                        id,
                        format!(
                            "unsupported protocol versions {supported_protocol_versions:?}; this server speaks {PROTOCOL_VERSION:?}"
                        ),
                    );
                    return Ok(());
                }
                let batch = self.batches_with(&extensions);
                let peer = Message::Peer {
                    sender_id: self.config.peer_id.clone(),
                    target_id: sender_id.clone(),
                    selected_protocol_version: PROTOCOL_VERSION.into(),
                    metadata: Some(self.metadata()),
                    // What we offer is all we accept.
                    extensions: if batch { self.extensions() } else { Vec::new() },
                };
                self.outputs.push_back(Output::Send {
                    connection: id,
                    frame: peer.encode(),
                });
                self.ready(id, sender_id, metadata.unwrap_or_default(), batch);
            }
            (
                ConnState::AwaitingPeer,
                Message::Peer {
                    sender_id,
                    selected_protocol_version,
                    metadata,
                    extensions,
                    ..
                },
            ) => {
                if selected_protocol_version != PROTOCOL_VERSION {
                    self.fail(
                        id,
                        format!("unsupported protocol version {selected_protocol_version:?}"),
                    );
                    return Ok(());
                }
                // We offered what we accept, so the peer's word is the answer.
                let batch = self.batches_with(&extensions);
                self.ready(id, sender_id, metadata.unwrap_or_default(), batch);
            }
            (_, Message::Error { message, .. }) => {
                self.outputs.push_back(Output::Event(Event::ProtocolError {
                    connection: id,
                    error: format!("peer reported: {message}"),
                }));
                self.outputs.push_back(Output::Close {
                    connection: id,
                    reason: Some(message),
                });
                self.disconnect(id);
            }
            (_, Message::Leave { .. }) => {
                self.outputs.push_back(Output::Close {
                    connection: id,
                    reason: None,
                });
                self.disconnect(id);
            }
            (ConnState::Ready(_), msg) => self.receive_ready(id, msg)?,
            (ConnState::AwaitingJoin, other) => {
                self.fail(id, format!("expected join, got {}", other.type_name()));
            }
            (ConnState::AwaitingPeer, other) => {
                self.fail(id, format!("expected peer, got {}", other.type_name()));
            }
        }
        Ok(())
    }

    fn ready(&mut self, id: ConnectionId, peer_id: PeerId, metadata: PeerMetadata, batch: bool) {
        let info = PeerInfo {
            connection: id,
            peer_id,
            storage_id: metadata.storage_id,
            ephemeral: metadata.is_ephemeral,
        };
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.state = ConnState::Ready(info.clone());
            conn.batch = batch;
        }
        let offered = self
            .active
            .iter()
            .filter(|d| self.policy.announce(&info, d));
        for doc in offered.chain(self.wanted.iter()) {
            if self.policy.access(&info, doc) != Access::None {
                self.to_sync.insert((id, *doc));
            }
        }
        self.outputs
            .push_back(Output::Event(Event::PeerConnected(info)));
    }

    fn receive_ready(&mut self, cid: ConnectionId, msg: Message) -> Result<(), RepoError> {
        let peer = match &self.conns[&cid].state {
            ConnState::Ready(p) => p.clone(),
            _ => unreachable!("checked by caller"),
        };
        match msg {
            Message::Sync {
                document_id, data, ..
            } => self.receive_sync(cid, &peer, document_id, &data, false),
            Message::Request {
                document_id, data, ..
            } => self.receive_sync(cid, &peer, document_id, &data, true),
            #[cfg(not(target_arch = "wasm32"))]
            Message::Batch { messages, .. } => {
                if !self.conns[&cid].batch {
                    self.fail(
                        cid,
                        "unexpected tandem-batch: the extension was not negotiated".into(),
                    );
                    return Ok(());
                }
                for m in messages {
                    self.receive_sync(cid, &peer, m.document_id, &m.data, m.request)?;
                    // A bad message closes the connection: drop the rest.
                    if !self.conns.contains_key(&cid) {
                        break;
                    }
                }
                Ok(())
            }
            Message::DocUnavailable { document_id, .. } => {
                self.outputs
                    .push_back(Output::Event(Event::DocumentUnavailable {
                        document: document_id,
                        peer_id: peer.peer_id,
                    }));
                Ok(())
            }
            Message::Ephemeral {
                count,
                session_id,
                document_id,
                data,
                sender_id,
                ..
            } => {
                self.receive_ephemeral(cid, &peer, sender_id, count, session_id, document_id, data);
                Ok(())
            }
            Message::RemoteSubscriptionChange { add, remove, .. } => {
                let conn = self.conns.get_mut(&cid).expect("ready connection");
                conn.remote_subs.extend(add);
                for r in &remove {
                    conn.remote_subs.remove(r);
                }
                Ok(())
            }
            Message::RemoteHeadsChanged {
                document_id,
                new_heads,
                ..
            } => {
                if self.access_for(cid, &peer, &document_id) == Access::None {
                    return Ok(());
                }
                for h in &new_heads {
                    self.outputs.push_back(Output::Event(Event::RemoteHeads {
                        document: document_id,
                        storage_id: h.storage_id.clone(),
                        heads: h.heads.clone(),
                    }));
                }
                self.gossip_heads(Some(cid), document_id, new_heads);
                Ok(())
            }
            // The browser build decodes no batch (see `Message::decode`).
            #[cfg(target_arch = "wasm32")]
            other @ Message::Batch { .. } => {
                self.fail(cid, format!("unexpected {}", other.type_name()));
                Ok(())
            }
            other @ (Message::Join { .. } | Message::Peer { .. }) => {
                self.fail(
                    cid,
                    format!("unexpected {} after the handshake", other.type_name()),
                );
                Ok(())
            }
            Message::Error { .. } | Message::Leave { .. } => unreachable!("handled by caller"),
        }
    }

    /// The peer's access to a document, asked of the policy once per connection.
    fn access_for(&self, cid: ConnectionId, peer: &PeerInfo, doc: &DocumentId) -> Access {
        match self.conns.get(&cid).and_then(|c| c.docs.get(doc)) {
            Some(pd) => pd.access,
            None => self.policy.access(peer, doc),
        }
    }

    fn doc_unavailable(&mut self, cid: ConnectionId, peer: &PeerInfo, doc: DocumentId) {
        let frame = Message::DocUnavailable {
            sender_id: self.config.peer_id.clone(),
            target_id: peer.peer_id.clone(),
            document_id: doc,
        }
        .encode();
        self.outputs.push_back(Output::Send {
            connection: cid,
            frame,
        });
    }

    fn receive_sync(
        &mut self,
        cid: ConnectionId,
        peer: &PeerInfo,
        doc: DocumentId,
        data: &[u8],
        is_request: bool,
    ) -> Result<(), RepoError> {
        let access = self.access_for(cid, peer, &doc);
        if access == Access::None || self.docs.quarantine_reason(&doc).is_some() {
            self.doc_unavailable(cid, peer, doc);
            return Ok(());
        }
        let message = match sync::Message::decode(data) {
            Ok(m) => m,
            Err(e) => {
                self.fail(
                    cid,
                    format!("invalid automerge sync message for {doc}: {e}"),
                );
                return Ok(());
            }
        };
        if let Some(i) = message.changes.iter().position(|c| !chunks_well_formed(c)) {
            self.fail(
                cid,
                format!("invalid automerge sync message for {doc}: change chunk {i} is malformed"),
            );
            return Ok(());
        }

        // The peer takes part in this document from now on (subscribed),
        // even if we do not have it yet: it gets it as soon as another peer
        // brings it.
        if !self.conns[&cid].docs.contains_key(&doc) {
            let sync = load_sync_state(&self.docs.storage, &doc, peer);
            let conn = self.conns.get_mut(&cid).expect("ready connection");
            conn.docs.insert(doc, PeerDoc::new(access, sync));
        }
        // The peer's sync state before the message, to tell what it changed.
        let before = &self.conns[&cid].docs[&doc].sync;
        let before_shared = before.shared_heads.clone();
        let before_theirs = before.their_heads.clone();
        let before_last_sent = before.last_sent_heads.clone();
        // A message without changes (a request, an acknowledgement) about a
        // document that is not in memory and is stored whole is often taken
        // in from the stored heads alone, without loading it (`stored`).
        #[cfg(not(target_arch = "wasm32"))]
        if message.changes.is_empty()
            && let Some(whole) = self.docs.stored_whole(&doc)?
        {
            let conn = self.conns.get_mut(&cid).expect("ready connection");
            let pd = conn.docs.get_mut(&doc).expect("inserted above");
            if super::stored::receive(&mut pd.sync, &message, &whole.heads) {
                pd.received = true;
                // As below for a message without changes.
                pd.sync.last_sent_heads = before_last_sent;
                return self.received_sync(cid, peer, doc, before_shared, before_theirs, None);
            }
        }
        // One lookup finds (and loads) the document if it is here at all.
        let found = match self.docs.get(&doc) {
            Ok(found) => found.is_some(),
            Err(RepoError::CorruptDocument { reason, .. }) => {
                tracing::error!(document = %doc, %reason, "stored document does not load");
                self.doc_unavailable(cid, peer, doc);
                return Ok(());
            }
            Err(RepoError::Quarantined { .. }) => {
                self.doc_unavailable(cid, peer, doc);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if !found {
            if self.purge_marker(&doc)?.is_some() {
                // A peer that has any history of it is offering updates.
                if !message.heads.is_empty() || !message.changes.is_empty() {
                    tracing::warn!(document = %doc, peer = %peer.peer_id, "update to a purged document refused");
                    self.outputs
                        .push_back(Output::Event(Event::PurgedDocumentUpdate {
                            document: doc,
                            peer_id: peer.peer_id.clone(),
                        }));
                }
                self.doc_unavailable(cid, peer, doc);
                return Ok(());
            }
            // A storing peer accepts a new document from a writer; a request
            // for something we do not have is answered at once.
            if is_request || access != Access::ReadWrite {
                self.doc_unavailable(cid, peer, doc);
                return Ok(());
            }
            // Neither stored nor purged: checked just above.
            self.insert_empty(doc);
        }
        // In memory now: found (and loaded) or inserted above.
        let Some(loaded) = self.docs.get(&doc)? else {
            self.doc_unavailable(cid, peer, doc);
            return Ok(());
        };
        // A request for a document we only know as an empty placeholder.
        if is_request && loaded.doc.get_heads().is_empty() {
            self.doc_unavailable(cid, peer, doc);
            return Ok(());
        }
        let conn = self.conns.get_mut(&cid).expect("ready connection");
        let pd = conn.docs.get_mut(&doc).expect("inserted above");
        pd.received = true;
        let brings_changes = !message.changes.is_empty();
        // A whole document for one we have nothing of (what a peer sends a
        // new replica: a saved document, or change chunks holding the whole
        // history, as a new row's first change): stored as it came rather
        // than encoded again, once automerge has loaded it and its heads
        // match.
        let whole = message
            .changes
            .iter()
            .next()
            .filter(|_| message.changes.len() == 1 && loaded.doc.get_heads().is_empty())
            .and_then(|bytes| chunk::saved_header(bytes).map(|h| (bytes.to_vec(), h.heads)));
        // A message without changes leaves the document as it is, and what
        // it does to the sync state depends only on the document, the state
        // and the message: peers in step (readers acknowledging the same
        // change) send the same message from the same state, so it is
        // applied once and the resulting state copied.
        let memo = (!brings_changes).then(|| {
            let heads = loaded.doc.get_heads();
            let key = (doc, super::state_hash((&pd.sync, data)));
            let after = self.received.find(&key, &heads, &pd.sync, data);
            (key, heads, after)
        });
        let result = match memo {
            Some((_, _, Some(after))) => {
                pd.sync = after;
                Ok(Ok(None))
            }
            _ => {
                let before_state = memo.is_some().then(|| pd.sync.clone());
                // The chunks as they came, kept to be stored as they are if
                // automerge applies them (see `Loaded::synced`).
                let recorded =
                    brings_changes && access == Access::ReadWrite && loaded.synced.is_some();
                if recorded && let Some(synced) = &mut loaded.synced {
                    for chunk in message.changes.iter() {
                        synced.extend_from_slice(chunk);
                    }
                }
                let result = catch_unwind(AssertUnwindSafe(|| {
                    let before = loaded.doc.get_heads();
                    super::receive::receive_sync_message(&mut loaded.doc, &mut pd.sync, message)?;
                    let after = loaded.doc.get_heads();
                    Ok::<_, AutomergeError>((after != before).then_some((before, after)))
                }));
                match &result {
                    Ok(Ok(Some(_))) if recorded => {}
                    // No changes came: nothing recorded, nothing to store.
                    Ok(Ok(None)) if !brings_changes => {}
                    // Automerge applied none of them (it queued them for
                    // missing dependencies, or ignored a read-only peer's),
                    // failed, or they were not recorded: what was recorded
                    // is not what changed, so the next flush encodes it.
                    _ => loaded.synced = None,
                }
                if let (Ok(Ok(None)), Some((key, heads, _)), Some(before)) =
                    (&result, memo, before_state)
                {
                    self.received
                        .insert(key, heads, before, data, pd.sync.clone());
                }
                result
            }
        };
        let changed = match result {
            Ok(Ok(changed)) => {
                // A message without changes whose heads equal ours makes
                // automerge record those heads as sent. When several messages
                // from the peer are handled in one batch, that is not true:
                // the peer has not yet heard that we have its latest change,
                // so it would never learn its change is stored. Keep the
                // heads we really sent; the next flush then tells it.
                if !brings_changes
                    && let Some(pd) = self.conns.get_mut(&cid).and_then(|c| c.docs.get_mut(&doc))
                {
                    pd.sync.last_sent_heads = before_last_sent;
                }
                changed
            }
            Ok(Err(e)) => {
                self.fail(
                    cid,
                    format!("automerge rejected the sync message for {doc}: {e}"),
                );
                return Ok(());
            }
            Err(panic) => {
                let _ = self.quarantine(doc, panic_message(panic));
                self.doc_unavailable(cid, peer, doc);
                return Ok(());
            }
        };
        if access == Access::Read && brings_changes {
            self.outputs.push_back(Output::Event(Event::AccessDenied {
                connection: cid,
                document: doc,
                reason: format!(
                    "{} has read-only access; its changes were not applied",
                    peer.peer_id
                ),
            }));
        }
        let changed = changed.map(|(before, heads)| (before, heads, whole));
        self.received_sync(cid, peer, doc, before_shared, before_theirs, changed)
    }

    /// What follows taking in a peer's sync message, `changed` naming our
    /// heads before and after if it changed the document (and the whole
    /// document it brought, to be stored as it came).
    fn received_sync(
        &mut self,
        cid: ConnectionId,
        peer: &PeerInfo,
        doc: DocumentId,
        before_shared: Vec<ChangeHash>,
        before_theirs: Option<Vec<ChangeHash>>,
        changed: Option<Changed>,
    ) -> Result<(), RepoError> {
        let pd = self
            .conns
            .get_mut(&cid)
            .and_then(|c| c.docs.get_mut(&doc))
            .expect("ready connection");
        pd.answered();
        if pd.sync.shared_heads != before_shared {
            self.sync_state_dirty.insert((cid, doc));
        }
        let their_heads = pd.sync.their_heads.clone();
        if let Some((before, heads, whole)) = changed {
            if let Some(l) = self.docs.get(&doc)? {
                l.dirty = true;
                l.pinned = false;
            }
            if let Some((bytes, whole_heads)) = whole
                && whole_heads == heads
            {
                self.docs.received_whole(&doc, bytes);
            }
            let origin = Origin::Remote(peer.peer_id.clone());
            self.on_changed(doc, origin, before, heads, Some(cid));
        }
        self.to_sync.insert((cid, doc));
        if their_heads != before_theirs
            && let (Some(sid), Some(heads)) = (&peer.storage_id, their_heads)
            && self
                .conns
                .iter()
                .any(|(c, conn)| *c != cid && conn.remote_subs.contains(sid))
        {
            let new_heads = vec![RemoteHeads {
                storage_id: sid.clone(),
                heads: heads
                    .iter()
                    .map(|h| bs58::encode(h.0).with_check().into_string())
                    .collect(),
                timestamp: self.now as f64,
            }];
            self.gossip_heads(Some(cid), doc, new_heads);
        }
        Ok(())
    }

    /// Tell connections subscribed to these stores about their new heads.
    fn gossip_heads(
        &mut self,
        from: Option<ConnectionId>,
        doc: DocumentId,
        heads: Vec<RemoteHeads>,
    ) {
        let me = self.config.peer_id.clone();
        let mut frames = Vec::new();
        for (cid, conn) in &self.conns {
            if Some(*cid) == from {
                continue;
            }
            let ConnState::Ready(peer) = &conn.state else {
                continue;
            };
            let relevant: Vec<_> = heads
                .iter()
                .filter(|h| conn.remote_subs.contains(&h.storage_id))
                .cloned()
                .collect();
            if relevant.is_empty() {
                continue;
            }
            if self.access_for(*cid, peer, &doc) == Access::None {
                continue;
            }
            frames.push(Output::Send {
                connection: *cid,
                frame: Message::RemoteHeadsChanged {
                    sender_id: me.clone(),
                    target_id: peer.peer_id.clone(),
                    document_id: doc,
                    new_heads: relevant,
                }
                .encode(),
            });
        }
        self.outputs.extend(frames);
    }

    #[allow(clippy::too_many_arguments)]
    fn receive_ephemeral(
        &mut self,
        cid: ConnectionId,
        peer: &PeerInfo,
        sender: PeerId,
        count: u64,
        session_id: String,
        doc: DocumentId,
        data: Vec<u8>,
    ) {
        if self.access_for(cid, peer, &doc) == Access::None {
            return;
        }
        let key = (sender.clone(), session_id.clone());
        if self
            .ephemeral_seen
            .get(&key)
            .is_some_and(|last| count <= *last)
        {
            return; // already seen (it reached us by two paths)
        }
        self.ephemeral_seen.insert(key, count);
        let mut frames = Vec::new();
        for (other, conn) in &self.conns {
            if *other == cid {
                continue;
            }
            let ConnState::Ready(p) = &conn.state else {
                continue;
            };
            if conn
                .docs
                .get(&doc)
                .is_some_and(|pd| pd.access != Access::None)
            {
                frames.push(Output::Send {
                    connection: *other,
                    frame: Message::Ephemeral {
                        sender_id: sender.clone(),
                        target_id: p.peer_id.clone(),
                        count,
                        session_id: session_id.clone(),
                        document_id: doc,
                        data: data.clone(),
                    }
                    .encode(),
                });
            }
        }
        self.outputs.extend(frames);
        self.outputs.push_back(Output::Event(Event::Ephemeral {
            document: doc,
            sender,
            data,
        }));
    }
}

/// Whether a sync message's change data is a sequence of well-formed
/// automerge chunks: magic bytes, a length that fits, and (except for
/// compressed changes, whose checksum covers the uncompressed bytes) a
/// checksum that matches. automerge skips chunks that fail to parse (a
/// partial load) instead of reporting them, so the repo checks first.
fn chunks_well_formed(mut bytes: &[u8]) -> bool {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    const COMPRESSED: u8 = 2;
    while !bytes.is_empty() {
        if bytes.len() < 10 || bytes[..4] != MAGIC {
            return false;
        }
        let checksum = &bytes[4..8];
        let kind = bytes[8];
        let (mut len, mut used, mut shift) = (0u64, 0usize, 0u32);
        loop {
            let Some(&b) = bytes.get(9 + used) else {
                return false;
            };
            used += 1;
            if shift > 56 {
                return false;
            }
            len |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let start = 9 + used;
        let Some(end) = usize::try_from(len).ok().and_then(|l| start.checked_add(l)) else {
            return false;
        };
        if end > bytes.len() {
            return false;
        }
        if kind != COMPRESSED {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(&bytes[8..end]);
            if digest[..4] != *checksum {
                return false;
            }
        }
        bytes = &bytes[end..];
    }
    true
}

/// Sync messages without changes already received, per document and hash
/// of (state, message): the heads the document had, the state before, the
/// message and the state after. Valid while the document keeps those heads;
/// cleared whenever a flush writes documents, and kept small.
#[derive(Default)]
pub(super) struct ReceivedMemo {
    entries: HashMap<(DocumentId, u64), Vec<Received>>,
    len: usize,
}

struct Received {
    heads: Vec<ChangeHash>,
    before: sync::State,
    data: Vec<u8>,
    after: sync::State,
}

impl ReceivedMemo {
    /// Most entries kept; beyond, the memo starts over.
    const MAX: usize = 4096;

    fn find(
        &self,
        key: &(DocumentId, u64),
        heads: &[ChangeHash],
        before: &sync::State,
        data: &[u8],
    ) -> Option<sync::State> {
        self.entries
            .get(key)?
            .iter()
            .find(|r| r.heads == heads && r.before == *before && r.data == data)
            .map(|r| r.after.clone())
    }

    fn insert(
        &mut self,
        key: (DocumentId, u64),
        heads: Vec<ChangeHash>,
        before: sync::State,
        data: &[u8],
        after: sync::State,
    ) {
        if self.len >= Self::MAX {
            self.clear();
        }
        self.len += 1;
        self.entries.entry(key).or_default().push(Received {
            heads,
            before,
            data: data.to_vec(),
            after,
        });
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.len = 0;
    }
}
