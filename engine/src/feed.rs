//! The change feed: every commit, local or remote, as a durable event.
//!
//! Each commit appends an entry under `["~feed", seq]` in the same storage
//! transaction as the changes themselves, so the feed and the documents can
//! never disagree after a crash. Sequence numbers start at 1 and increase by
//! one per entry; a consumer keeps a [`Cursor`] (the last sequence it
//! processed) and resumes after it, receiving each change exactly once in
//! commit order as long as it saves its cursor after processing.

use automerge::ChangeHash;
use ciborium::Value;

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

impl FeedEvent {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let origin = match &self.origin {
            Origin::Local => Value::Null,
            Origin::Remote(p) => Value::Text(p.to_string()),
        };
        let v = Value::Map(vec![
            (
                Value::Text("doc".into()),
                Value::Bytes(self.document.as_bytes().to_vec()),
            ),
            (Value::Text("origin".into()), origin),
            (
                Value::Text("heads".into()),
                Value::Array(
                    self.heads
                        .iter()
                        .map(|h| Value::Bytes(h.0.to_vec()))
                        .collect(),
                ),
            ),
        ]);
        let mut out = Vec::new();
        ciborium::ser::into_writer(&v, &mut out).expect("writing CBOR to a Vec cannot fail");
        out
    }

    pub(crate) fn decode(seq: u64, bytes: &[u8]) -> Result<Self, StorageError> {
        let corrupt = |what: &str| StorageError::Corrupt(format!("feed entry {seq}: {what}"));
        let v: Value = ciborium::de::from_reader(bytes).map_err(|_| corrupt("not CBOR"))?;
        let Value::Map(entries) = v else {
            return Err(corrupt("not a map"));
        };
        let get = |k: &str| {
            entries
                .iter()
                .find(|(key, _)| matches!(key, Value::Text(t) if t == k))
                .map(|(_, v)| v)
        };
        let document = match get("doc") {
            Some(Value::Bytes(b)) => {
                DocumentId::try_from_slice(b).map_err(|_| corrupt("bad doc"))?
            }
            _ => return Err(corrupt("no doc")),
        };
        let origin = match get("origin") {
            Some(Value::Text(t)) => Origin::Remote(PeerId::new(t.clone())),
            _ => Origin::Local,
        };
        let heads = match get("heads") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|h| match h {
                    Value::Bytes(b) => {
                        ChangeHash::try_from(b.as_slice()).map_err(|_| corrupt("bad head"))
                    }
                    _ => Err(corrupt("bad head")),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(corrupt("no heads")),
        };
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
    }
}
