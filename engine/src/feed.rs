//! The change feed: every commit, local or remote, as a durable event.
//!
//! Each flush appends its commits' entries as one block under
//! `["~feed", last seq of the block]`, in the same storage transaction as the
//! changes themselves, so the feed and the documents can never disagree after
//! a crash, and a flush of a thousand commits writes one key, not a thousand. Sequence numbers start at 1 and increase by
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
    /// The document's heads before the change (empty for a new document,
    /// and for entries written before this field existed).
    pub before: Vec<ChangeHash>,
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

/// Version bytes of the feed entry encoding: v1 had no `before` heads.
const ENTRY_V1: u8 = 1;
const ENTRY_V2: u8 = 2;

impl FeedEvent {
    /// The entry alone, as [`encode_into`](Self::encode_into) writes it.
    #[cfg(test)]
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Append the entry to `out` (a flush writes its events as one block)
    /// in a compact fixed layout (this is written once per commit, on the
    /// hot path): `[2][doc: 16][origin len: u16 BE][origin][head count: u16 BE][heads: 32 each]
    /// [before count: u16 BE][before heads: 32 each]`, origin length 0 meaning local.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        let origin = match &self.origin {
            Origin::Local => "",
            Origin::Remote(p) => p.as_str(),
        };
        let origin = &origin.as_bytes()[..origin.len().min(u16::MAX as usize)];
        let heads = &self.heads[..self.heads.len().min(u16::MAX as usize)];
        let before = &self.before[..self.before.len().min(u16::MAX as usize)];
        out.reserve(1 + 16 + 2 + origin.len() + 2 + 32 * heads.len() + 2 + 32 * before.len());
        out.push(ENTRY_V2);
        out.extend_from_slice(self.document.as_bytes());
        out.extend_from_slice(&(origin.len() as u16).to_be_bytes());
        out.extend_from_slice(origin);
        for list in [heads, before] {
            out.extend_from_slice(&(list.len() as u16).to_be_bytes());
            for h in list {
                out.extend_from_slice(&h.0);
            }
        }
    }

    /// Decode one entry from the front of `bytes`, advancing past it.
    pub(crate) fn decode_from(seq: u64, bytes: &mut &[u8]) -> Result<Self, StorageError> {
        let corrupt = |what: &str| StorageError::Corrupt(format!("feed entry {seq}: {what}"));
        let mut take = |n: usize| -> Result<&[u8], StorageError> {
            if bytes.len() < n {
                return Err(corrupt("truncated"));
            }
            let (head, tail) = bytes.split_at(n);
            *bytes = tail;
            Ok(head)
        };
        let version = take(1)?[0];
        if version != ENTRY_V1 && version != ENTRY_V2 {
            return Err(corrupt("unknown encoding version"));
        }
        let document = DocumentId::try_from_slice(take(16)?).map_err(|_| corrupt("bad doc"))?;
        let origin_len = u16::from_be_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
        let origin = match std::str::from_utf8(take(origin_len)?) {
            Ok("") => Origin::Local,
            Ok(peer) => Origin::Remote(PeerId::new(peer)),
            Err(_) => return Err(corrupt("origin is not UTF-8")),
        };
        let mut hash_list = || -> Result<Vec<ChangeHash>, StorageError> {
            let count = u16::from_be_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
            (0..count)
                .map(|_| take(32).map(|h| ChangeHash(h.try_into().expect("32 bytes"))))
                .collect()
        };
        let heads = hash_list()?;
        let before = if version == ENTRY_V2 {
            hash_list()?
        } else {
            Vec::new()
        };
        Ok(Self {
            seq,
            document,
            origin,
            heads,
            before,
        })
    }
}

/// Decode a block of entries stored under the key of its last sequence number.
pub(crate) fn decode_block(last: u64, mut bytes: &[u8]) -> Result<Vec<FeedEvent>, StorageError> {
    let mut events = Vec::new();
    while !bytes.is_empty() {
        // Sequence numbers are assigned once the count is known.
        events.push(FeedEvent::decode_from(0, &mut bytes)?);
    }
    let first = (last + 1)
        .checked_sub(events.len() as u64)
        .filter(|f| *f >= 1)
        .ok_or_else(|| {
            StorageError::Corrupt(format!("feed block {last} holds too many entries"))
        })?;
    for (i, e) in events.iter_mut().enumerate() {
        e.seq = first + i as u64;
    }
    Ok(events)
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
        // Blocks are keyed by their last sequence: the first block with a key
        // after the cursor holds the next entry.
        let mut after = (cursor.0 > 0).then(|| feed_key(cursor.0));
        let mut out = Vec::new();
        while out.len() < limit {
            let Some((key, value)) = self.storage.scan(&prefix, after.as_ref(), 1)?.pop() else {
                break;
            };
            let last = key
                .parts()
                .get(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| StorageError::Corrupt(format!("bad feed key {key:?}")))?;
            let block = decode_block(last, &value)?;
            out.extend(
                block
                    .into_iter()
                    .filter(|e| e.seq > cursor.0)
                    .take(limit - out.len()),
            );
            after = Some(key);
        }
        Ok(out)
    }

    /// The last sequence number written, or 0 for an empty feed.
    pub fn last_seq(&self) -> Result<u64, StorageError> {
        last_seq(self.storage)
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

/// The sequence number of the newest feed entry, 0 if there is none. Read
/// from the entries themselves, so a flush writes no separate counter.
pub(crate) fn last_seq(storage: &(impl Storage + ?Sized)) -> Result<u64, StorageError> {
    let prefix = StorageKey::from_trusted(vec!["~feed".into()]);
    match storage.last(&prefix)? {
        None => Ok(0),
        Some((k, _)) => k
            .parts()
            .get(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| StorageError::Corrupt(format!("bad feed key {k:?}"))),
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
            before: vec![ChangeHash([2; 32]), ChangeHash([1; 32])],
        };
        let local = FeedEvent {
            seq: 5,
            origin: Origin::Local,
            heads: vec![],
            ..e.clone()
        };
        let mut block = e.encode();
        block.extend(local.encode());
        assert_eq!(decode_block(5, &block).unwrap(), vec![e, local]);
        assert!(decode_block(5, b"junk").is_err());
        assert!(
            decode_block(5, &block[..block.len() - 1]).is_err(),
            "truncated"
        );
        assert!(
            decode_block(1, &block).is_err(),
            "more entries than sequence numbers"
        );
    }
}
