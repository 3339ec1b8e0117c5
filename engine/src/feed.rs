//! The change feed: every commit, local or remote, as a durable event.
//!
//! Each commit appends an entry under `["~feed", seq]` in the same storage
//! transaction as the changes themselves, so the feed and the documents can
//! never disagree after a crash. Sequence numbers start at 1 and increase by
//! one per entry; a consumer keeps a [`Cursor`] (the last sequence it
//! processed) and resumes after it, receiving each change exactly once in
//! commit order as long as it saves its cursor after processing.

use automerge::ChangeHash;

use crate::error::StorageError;
use crate::storage::{Storage, StorageKey, WriteBatch};
use crate::{DocumentId, PeerId};

/// A position in the feed: the sequence number of the last entry processed.
/// `Cursor::START` is before the first entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor(pub u64);

impl Cursor {
    /// Before every entry.
    pub const START: Cursor = Cursor(0);
}

/// Where a commit came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// An edit made through this repo's API.
    Local,
    /// Changes received from the named peer.
    Remote(PeerId),
}

/// One committed change to one document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedEvent {
    /// Position in the feed.
    pub seq: u64,
    /// The document that changed.
    pub document: DocumentId,
    /// Who made the change.
    pub origin: Origin,
    /// The document's heads after the change.
    pub heads: Vec<ChangeHash>,
}

pub(crate) fn feed_key(seq: u64) -> StorageKey {
    StorageKey::from_trusted(vec!["~feed".into(), format!("{seq:020}")])
}

pub(crate) fn meta_key(name: &str) -> StorageKey {
    StorageKey::from_trusted(vec!["~meta".into(), name.into()])
}

fn cursor_key(consumer: &str) -> Result<StorageKey, StorageError> {
    StorageKey::new(["~cursor", consumer])
}

/// Version byte of the feed entry encoding.
const ENTRY_V1: u8 = 1;

impl FeedEvent {
    /// A compact fixed layout (this is written once per commit, on the hot
    /// path): `[1][doc: 16][origin len: u16 BE][origin][head count: u16 BE][heads: 32 each]`,
    /// origin length 0 meaning local.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let origin = match &self.origin {
            Origin::Local => "",
            Origin::Remote(p) => p.as_str(),
        };
        let origin = &origin.as_bytes()[..origin.len().min(u16::MAX as usize)];
        let heads = &self.heads[..self.heads.len().min(u16::MAX as usize)];
        let mut out = Vec::with_capacity(1 + 16 + 2 + origin.len() + 2 + 32 * heads.len());
        out.push(ENTRY_V1);
        out.extend_from_slice(self.document.as_bytes());
        out.extend_from_slice(&(origin.len() as u16).to_be_bytes());
        out.extend_from_slice(origin);
        out.extend_from_slice(&(heads.len() as u16).to_be_bytes());
        for h in heads {
            out.extend_from_slice(&h.0);
        }
        out
    }

    pub(crate) fn decode(seq: u64, bytes: &[u8]) -> Result<Self, StorageError> {
        let corrupt = |what: &str| StorageError::Corrupt(format!("feed entry {seq}: {what}"));
        let mut rest = bytes;
        let mut take = |n: usize| -> Result<&[u8], StorageError> {
            if rest.len() < n {
                return Err(corrupt("truncated"));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        if take(1)? != [ENTRY_V1] {
            return Err(corrupt("unknown encoding version"));
        }
        let document = DocumentId::try_from_slice(take(16)?).map_err(|_| corrupt("bad doc"))?;
        let origin_len = u16::from_be_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
        let origin = match std::str::from_utf8(take(origin_len)?) {
            Ok("") => Origin::Local,
            Ok(peer) => Origin::Remote(PeerId::new(peer)),
            Err(_) => return Err(corrupt("origin is not UTF-8")),
        };
        let count = u16::from_be_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
        let heads = (0..count)
            .map(|_| take(32).map(|h| ChangeHash(h.try_into().expect("32 bytes"))))
            .collect::<Result<_, _>>()?;
        if !rest.is_empty() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(Self {
            seq,
            document,
            origin,
            heads,
        })
    }
}

/// Read access to a store's change feed.
#[derive(Debug)]
pub struct ChangeFeed<'a, S: ?Sized> {
    storage: &'a S,
}

impl<'a, S: Storage + ?Sized> ChangeFeed<'a, S> {
    /// The feed of `storage`.
    pub fn new(storage: &'a S) -> Self {
        Self { storage }
    }

    /// Up to `limit` entries after `cursor`, in commit order.
    pub fn read(&self, cursor: Cursor, limit: usize) -> Result<Vec<FeedEvent>, StorageError> {
        let prefix = StorageKey::from_trusted(vec!["~feed".into()]);
        let after = (cursor.0 > 0).then(|| feed_key(cursor.0));
        self.storage
            .scan(&prefix, after.as_ref(), limit)?
            .into_iter()
            .map(|(k, v)| {
                let seq = k
                    .parts()
                    .get(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| StorageError::Corrupt(format!("bad feed key {k:?}")))?;
                FeedEvent::decode(seq, &v)
            })
            .collect()
    }

    /// The last sequence number written, or 0 for an empty feed.
    pub fn last_seq(&self) -> Result<u64, StorageError> {
        read_u64(self.storage, &meta_key("feed-next")).map(|n| n.saturating_sub(1))
    }

    /// The durable cursor saved by `consumer`, or `Cursor::START`.
    pub fn cursor(&self, consumer: &str) -> Result<Cursor, StorageError> {
        read_u64(self.storage, &cursor_key(consumer)?).map(Cursor)
    }

    /// Save `consumer`'s cursor durably (call after processing up to it).
    pub fn save_cursor(&self, consumer: &str, cursor: Cursor) -> Result<(), StorageError> {
        let mut batch = WriteBatch::new();
        batch.put(cursor_key(consumer)?, cursor.0.to_be_bytes().to_vec());
        self.storage.commit(&batch)
    }
}

pub(crate) fn read_u64(
    storage: &(impl Storage + ?Sized),
    key: &StorageKey,
) -> Result<u64, StorageError> {
    match storage.get(key)? {
        None => Ok(0),
        Some(b) => {
            let arr: [u8; 8] = b
                .as_slice()
                .try_into()
                .map_err(|_| StorageError::Corrupt(format!("{key:?} is not a u64")))?;
            Ok(u64::from_be_bytes(arr))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let e = FeedEvent {
            seq: 4,
            document: DocumentId::from_bytes([1; 16]),
            origin: Origin::Remote(PeerId::new("p")),
            heads: vec![ChangeHash([3; 32])],
        };
        assert_eq!(FeedEvent::decode(4, &e.encode()).unwrap(), e);
        assert!(FeedEvent::decode(4, b"junk").is_err());
        let bytes = e.encode();
        assert!(FeedEvent::decode(4, &bytes[..bytes.len() - 1]).is_err());
        let local = FeedEvent {
            origin: Origin::Local,
            heads: vec![],
            ..e
        };
        assert_eq!(FeedEvent::decode(4, &local.encode()).unwrap(), local);
    }
}
