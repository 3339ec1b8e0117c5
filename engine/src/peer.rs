//! Identities of peers, their stores and their connections.

use std::fmt;

/// The id a peer announces in `join`/`peer` (`senderId`). Any string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(String);

impl PeerId {
    /// A peer id from its text.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// A new random peer id with a readable prefix, e.g. `tandem-3f9c…`.
    pub fn random(prefix: &str) -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("the operating system has no randomness source");
        Self(format!("{prefix}-{}", hex::encode(bytes)))
    }

    /// The text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.0)
    }
}

/// The id of a durable store (`peerMetadata.storageId`). Sync states are kept
/// per storage id, so a peer that reconnects with the same store resumes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageId(String);

impl StorageId {
    /// A storage id from its text.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// A new random storage id (a UUID-shaped hex string, as automerge-repo uses).
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).expect("the operating system has no randomness source");
        let h = hex::encode(b);
        Self(format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        ))
    }

    /// The text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StorageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StorageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorageId({})", self.0)
    }
}

/// A connection handle chosen by the driver (one per socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

/// What the repo knows of the peer on a connection once the handshake is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The connection this peer is on.
    pub connection: ConnectionId,
    /// The peer's announced id.
    pub peer_id: PeerId,
    /// The peer's store, if it has one and said so.
    pub storage_id: Option<StorageId>,
    /// Whether the peer keeps nothing (then its sync state is not persisted).
    pub ephemeral: bool,
}
