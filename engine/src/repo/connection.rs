//! Per-connection protocol state.

use std::collections::{BTreeSet, HashMap};

use automerge::sync;

use crate::policy::Access;
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
}

impl Connection {
    pub(crate) fn new(state: ConnState) -> Self {
        Self {
            state,
            docs: HashMap::new(),
            remote_subs: BTreeSet::new(),
        }
    }
}
