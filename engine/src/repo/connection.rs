//! Per-connection protocol state.

use std::collections::{BTreeSet, HashMap, VecDeque};

use automerge::{ChangeHash, sync};

use crate::policy::Access;
use crate::repo::Millis;
use crate::{DocumentId, PeerInfo, StorageId};

/// Which side opened the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// We accepted it: the peer sends `join`, we answer `peer`.
    Incoming,
    /// We opened it: we send `join`, the peer answers `peer`.
    Outgoing,
}

#[derive(Debug)]
pub(crate) enum ConnState {
    AwaitingJoin,
    AwaitingPeer,
    Ready(PeerInfo),
}

/// What we know of one document with one peer.
#[derive(Debug)]
pub(crate) struct PeerDoc {
    pub(crate) sync: sync::State,
    pub(crate) access: Access,
    /// The peer has sent us a sync message for this document.
    pub(crate) received: bool,
    /// Our heads as of each message with changes the peer has not answered
    /// yet, oldest first (flow control: [`crate::RepoConfig::sync_window`]).
    pub(crate) in_flight: VecDeque<Vec<ChangeHash>>,
    /// When we last sent it a message with changes.
    pub(crate) last_sent: Millis,
    /// When we sent it the first message with changes that it has not
    /// answered yet (None: it has answered since;
    /// [`crate::RepoConfig::max_unanswered_changes`]).
    pub(crate) unanswered_since: Option<Millis>,
}

impl PeerDoc {
    pub(crate) fn new(access: Access, mut sync: sync::State) -> Self {
        if access == Access::Read {
            sync.set_read_only(true);
        }
        Self {
            sync,
            access,
            received: false,
            in_flight: VecDeque::new(),
            last_sent: 0,
            unanswered_since: None,
        }
    }

    /// We sent it a message with changes at `now`: with a `window`, record
    /// our heads (`heads`) among its unanswered messages; and note when it
    /// started owing us an answer.
    pub(crate) fn sent_changes(
        &mut self,
        window: usize,
        now: Millis,
        heads: impl FnOnce() -> Vec<ChangeHash>,
    ) {
        if window > 0 {
            if self.in_flight.len() >= window {
                self.in_flight.pop_front();
            }
            self.in_flight.push_back(heads());
            self.last_sent = now;
        }
        self.unanswered_since.get_or_insert(now);
    }

    /// The peer answered (its sync state has just taken in its message):
    /// forget the messages it has now acknowledged, that is all of them once
    /// it has every change we sent, else those whose heads it names.
    pub(crate) fn answered(&mut self) {
        self.unanswered_since = None;
        if self.sync.sent_hashes.is_empty() {
            self.in_flight.clear();
            return;
        }
        let Some(theirs) = &self.sync.their_heads else {
            return;
        };
        while self
            .in_flight
            .front()
            .is_some_and(|ours| ours.iter().all(|h| theirs.contains(h)))
        {
            self.in_flight.pop_front();
        }
    }
}

#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) state: ConnState,
    /// Documents this peer takes part in (subscribed), with their sync state.
    pub(crate) docs: HashMap<DocumentId, PeerDoc>,
    /// Stores whose heads this peer asked to hear about.
    pub(crate) remote_subs: BTreeSet<StorageId>,
    /// Both sides negotiated Tandem's batch extension.
    pub(crate) batch: bool,
}

impl Connection {
    pub(crate) fn new(state: ConnState) -> Self {
        Self {
            state,
            docs: HashMap::new(),
            remote_subs: BTreeSet::new(),
            batch: false,
        }
    }
}
