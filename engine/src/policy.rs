//! Share policy: which peer may see and change which document.

use crate::{DocumentId, PeerInfo};

/// What a peer may do with a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    /// The peer never learns the document exists (it gets `doc-unavailable`).
    None,
    /// The peer receives the document, but its changes are not applied.
    Read,
    /// The peer receives the document and its changes are applied.
    ReadWrite,
}

/// Decides, per peer and document, what is shared. The relay's auth plugs in
/// here; the defaults below cover the two common roles.
pub trait SharePolicy: Send {
    /// What `peer` may do with `document`. Asked once per connection and
    /// document, before anything about the document is sent or applied.
    fn access(&self, peer: &PeerInfo, document: &DocumentId) -> Access;

    /// Whether to offer `document` to `peer` without being asked (clients
    /// announce their documents to a server; a server announces nothing and
    /// serves what it is asked for).
    fn announce(&self, peer: &PeerInfo, document: &DocumentId) -> bool;

    /// Whether [`announce`](Self::announce) can ever return true. A policy
    /// that never announces (a server's) says so, and the repo then does not
    /// keep the set of documents touched this session, which would otherwise
    /// grow with every document a long-running server sees.
    fn may_announce(&self) -> bool {
        true
    }
}

/// A client's policy: share everything with every peer, announce it too.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShareAll;

impl SharePolicy for ShareAll {
    fn access(&self, _: &PeerInfo, _: &DocumentId) -> Access {
        Access::ReadWrite
    }
    fn announce(&self, _: &PeerInfo, _: &DocumentId) -> bool {
        true
    }
}

/// A server's policy without auth: anyone may read and write any document
/// they name, and nothing is announced unasked (like the JS sync server's
/// `sharePolicy: async () => false`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ServeOnRequest;

impl SharePolicy for ServeOnRequest {
    fn access(&self, _: &PeerInfo, _: &DocumentId) -> Access {
        Access::ReadWrite
    }
    fn announce(&self, _: &PeerInfo, _: &DocumentId) -> bool {
        false
    }
    fn may_announce(&self) -> bool {
        false
    }
}
