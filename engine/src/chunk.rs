//! What saved automerge bytes say about themselves, read without loading
//! them.
//!
//! Automerge saves a document as a sequence of *chunks*: magic bytes, a
//! checksum (the first four bytes of the SHA-256 of the chunk type, length
//! and contents), the chunk type, the contents' length, then the contents.
//! A *document chunk* (automerge's `save`) opens with the actors and the
//! heads, followed by the column descriptions; a *change chunk* (one change,
//! as `save_after` writes them) opens with the change's dependencies, and
//! its hash is the full SHA-256 whose first bytes are the checksum.
//!
//! Loading rebuilds every change to verify the heads, which costs far more
//! than a copy between stores needs: the heads (for the change feed) and
//! whether any column is compressed (to tell what the raw bytes may
//! contain) are read here, and the document itself is parsed on first use.

use std::collections::BTreeSet;

use automerge::ChangeHash;
use sha2::{Digest, Sha256};

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const DOCUMENT: u8 = 0;
const CHANGE: u8 = 1;
/// Bit 3 of a column specification: the column is DEFLATE-compressed.
const DEFLATE: u64 = 0b1000;

/// What the chunks of some saved bytes say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SavedHeader {
    /// The heads of the document the bytes load as, sorted (as
    /// `get_heads` returns them).
    pub(crate) heads: Vec<ChangeHash>,
    /// Whether any column is compressed: if none is, every string of the
    /// document (keys and values) appears in the bytes as it is.
    pub(crate) compressed: bool,
    /// One document chunk (a snapshot), rather than change chunks.
    pub(crate) snapshot: bool,
}

/// The header of `bytes` if they are exactly one document chunk, or change
/// chunks that form a whole history (every dependency among them), all with
/// valid checksums; `None` for anything else (compressed or bundled
/// changes, a document chunk followed by changes, missing dependencies,
/// corrupt or truncated bytes), which a full load then handles.
pub(crate) fn saved_header(bytes: &[u8]) -> Option<SavedHeader> {
    let (kind, hash, contents, rest) = verified(bytes)?;
    if kind == DOCUMENT {
        if !rest.is_empty() {
            return None;
        }
        let (heads, compressed) = document_contents(contents)?;
        return Some(SavedHeader {
            heads,
            compressed,
            snapshot: true,
        });
    }
    let mut hashes = BTreeSet::new();
    let mut deps = BTreeSet::new();
    let (mut kind, mut hash, mut contents, mut rest) = (kind, hash, contents, rest);
    loop {
        if kind != CHANGE {
            return None;
        }
        hashes.insert(hash);
        let mut r = contents;
        for _ in 0..uleb(&mut r)? {
            let (dep, after) = r.split_first_chunk::<32>()?;
            deps.insert(ChangeHash(*dep));
            r = after;
        }
        if rest.is_empty() {
            break;
        }
        (kind, hash, contents, rest) = verified(rest)?;
    }
    if !deps.is_subset(&hashes) {
        return None;
    }
    Some(SavedHeader {
        heads: hashes.difference(&deps).copied().collect(),
        compressed: false,
        snapshot: false,
    })
}

/// Whether no column of the saved `bytes` is compressed, so that every
/// string of the document appears in them as it is: they are document
/// chunks without compressed columns and (uncompressed) change chunks.
/// Checksums are not checked: a quick look, for bytes known to be intact.
pub(crate) fn uncompressed(mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        let Some(chunk) = split(bytes) else {
            return false;
        };
        let plain = match chunk.kind {
            DOCUMENT => {
                document_contents(chunk.contents).is_some_and(|(_, compressed)| !compressed)
            }
            CHANGE => true,
            _ => false,
        };
        if !plain {
            return false;
        }
        bytes = chunk.rest;
    }
    true
}

/// One chunk, split into its parts.
struct Chunk<'a> {
    checksum: &'a [u8; 4],
    kind: u8,
    /// What the hash covers: the chunk type, the length as written, and
    /// the contents (everything after the checksum, up to the chunk's end).
    hashed: &'a [u8],
    contents: &'a [u8],
    /// The bytes after the chunk.
    rest: &'a [u8],
}

fn split(bytes: &[u8]) -> Option<Chunk<'_>> {
    let after_magic = bytes.strip_prefix(&MAGIC)?;
    let (checksum, from_kind) = after_magic.split_first_chunk::<4>()?;
    let (&kind, mut r) = from_kind.split_first()?;
    let len = usize::try_from(uleb(&mut r)?).ok()?;
    if r.len() < len {
        return None;
    }
    let (contents, rest) = r.split_at(len);
    Some(Chunk {
        checksum,
        kind,
        hashed: &from_kind[..from_kind.len() - rest.len()],
        contents,
        rest,
    })
}

/// The first chunk of `bytes`, checksum verified: its type, hash, contents,
/// and the bytes after it.
fn verified(bytes: &[u8]) -> Option<(u8, ChangeHash, &[u8], &[u8])> {
    let chunk = split(bytes)?;
    let hash: [u8; 32] = Sha256::digest(chunk.hashed).into();
    (hash[..4] == chunk.checksum[..]).then_some((
        chunk.kind,
        ChangeHash(hash),
        chunk.contents,
        chunk.rest,
    ))
}

/// The heads of a document chunk and whether any of its columns is
/// compressed.
fn document_contents(contents: &[u8]) -> Option<(Vec<ChangeHash>, bool)> {
    let mut r = contents;
    for _ in 0..uleb(&mut r)? {
        let n = usize::try_from(uleb(&mut r)?).ok()?;
        r = r.get(n..)?;
    }
    let count = uleb(&mut r)?;
    let mut heads = Vec::with_capacity(usize::try_from(count).ok()?.min(64));
    for _ in 0..count {
        let (hash, after) = r.split_first_chunk::<32>()?;
        heads.push(ChangeHash(*hash));
        r = after;
    }
    heads.sort_unstable();
    let mut compressed = false;
    // Change columns, then operation columns: (specification, length) pairs.
    for _ in 0..2 {
        for _ in 0..uleb(&mut r)? {
            compressed |= uleb(&mut r)? & DEFLATE != 0;
            uleb(&mut r)?;
        }
    }
    Some((heads, compressed))
}

fn uleb(r: &mut &[u8]) -> Option<u64> {
    leb128::read::unsigned(r).ok()
}

#[cfg(test)]
mod tests {
    use automerge::{AutoCommit, ROOT, transaction::Transactable};

    use super::*;

    fn edited(values: usize) -> AutoCommit {
        let mut d = AutoCommit::new();
        for i in 0..values {
            d.put(ROOT, format!("k{i}"), "x".repeat(i % 7)).unwrap();
            d.commit();
        }
        d
    }

    #[test]
    fn reads_the_heads_of_a_saved_document() {
        let mut d = edited(3);
        let bytes = d.save();
        let header = saved_header(&bytes).expect("a document chunk");
        assert_eq!(header.heads, d.get_heads());
        assert!(header.snapshot && !header.compressed);
        assert!(bytes.windows(2).any(|w| w == b"k2"));
    }

    #[test]
    fn reads_the_heads_of_saved_changes() {
        let mut a = edited(2);
        let mut b = a.fork();
        a.put(ROOT, "a", 2).unwrap();
        b.put(ROOT, "b", 3).unwrap();
        a.merge(&mut b).unwrap();
        let bytes = a.save_after(&[]);
        let header = saved_header(&bytes).expect("change chunks");
        assert_eq!(header.heads.len(), 2);
        assert_eq!(header.heads, a.get_heads());
        assert!(!header.snapshot && !header.compressed);
        // Changes that depend on ones not among them are not a whole history.
        let after = a.save_after(&b.get_heads());
        assert_eq!(saved_header(&after), None);
    }

    #[test]
    fn concurrent_heads_of_a_document_are_all_read() {
        let mut a = AutoCommit::new();
        a.put(ROOT, "a", 1).unwrap();
        let mut b = a.fork();
        a.put(ROOT, "a", 2).unwrap();
        b.put(ROOT, "b", 3).unwrap();
        a.merge(&mut b).unwrap();
        let header = saved_header(&a.save()).unwrap();
        assert_eq!(header.heads.len(), 2);
        assert_eq!(header.heads, a.get_heads());
    }

    #[test]
    fn notices_compressed_columns() {
        // Columns over 256 bytes are compressed when saved.
        let mut d = edited(400);
        let bytes = d.save();
        let header = saved_header(&bytes).unwrap();
        assert!(header.compressed);
        assert_eq!(header.heads, d.get_heads());
        assert!(!uncompressed(&bytes));
        assert!(uncompressed(&edited(3).save()));
        assert!(uncompressed(&d.save_after(&[])), "change chunks");
        assert!(!uncompressed(b"not automerge"));
    }

    #[test]
    fn anything_else_is_left_to_a_full_load() {
        let mut d = edited(2);
        let bytes = d.save();
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(saved_header(&flipped), None, "checksum");
        assert_eq!(saved_header(&bytes[..bytes.len() - 1]), None, "truncated");
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        assert_eq!(saved_header(&two), None, "two documents");
        let heads = d.get_heads();
        d.put(ROOT, "more", 1).unwrap();
        let mut with_changes = bytes.clone();
        with_changes.extend(d.save_after(&heads));
        assert_eq!(saved_header(&with_changes), None, "a document then changes");
        assert_eq!(saved_header(&[]), None);
        assert_eq!(saved_header(b"not automerge at all"), None);
    }
}
