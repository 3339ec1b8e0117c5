//! Discovery: which rows a table has, spread over catalog documents.
//!
//! A table's row index is `shards` catalog documents (ids derived from the
//! table name and shard number, so every replica knows them without being
//! told). Each holds `{"_table", "_shard", "_shards", "rows": {key: generation}}`; a
//! key lives in the shard its row id hashes to, so a 100,000-row table is
//! spread over many small documents instead of one hot one. The `rows` map
//! is created by a deterministic change, so catalogs created on two offline
//! replicas merge into one map. The generation counts purges of the key: a
//! key inserted again after its row was purged gets a new row document.

use automerge::transaction::Transactable;
use automerge::{AutoCommit, Change, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value as AmValue};

use super::document::{deterministic_change, digest, row_id};
use crate::DocumentId;

pub(crate) const ROWS: &str = "rows";
pub(crate) const SHARDS: &str = "_shards";

/// The table name and shard count a catalog document declares.
pub(crate) fn identity(doc: &impl ReadDoc) -> Option<(String, u32)> {
    let table = match doc.get(ROOT, "_table").ok().flatten()? {
        (AmValue::Scalar(s), _) => match s.as_ref() {
            ScalarValue::Str(t) => t.to_string(),
            _ => return None,
        },
        _ => return None,
    };
    let (v, _) = doc.get(ROOT, SHARDS).ok().flatten()?;
    let shards = u32::try_from(as_generation(&v)?).ok()?;
    rows_map(doc)?;
    Some((table, shards))
}

/// The catalog document of one shard of a table.
pub(crate) fn shard_id(table: &str, shard: u32) -> DocumentId {
    let bytes = digest(&["tandem/catalog", table, &shard.to_string()]);
    DocumentId::from_bytes(bytes[..16].try_into().expect("16 bytes"))
}

/// The shard a key's entry lives in.
pub(crate) fn shard_of(table: &str, key: &str, shards: u32) -> u32 {
    let id = row_id(table, key, 0);
    let b = id.as_bytes();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) % shards.max(1)
}

/// The change that creates a shard's catalog (the same bytes everywhere).
pub(crate) fn genesis(table: &str, shard: u32, shards: u32) -> Change {
    let (shard_text, shards_text) = (shard.to_string(), shards.to_string());
    deterministic_change(
        &["tandem/catalog-genesis", table, &shard_text, &shards_text],
        |d| {
            d.put(ROOT, "_table", table)?;
            d.put(ROOT, "_shard", u64::from(shard))?;
            d.put(ROOT, SHARDS, u64::from(shards))?;
            d.put_object(ROOT, ROWS, ObjType::Map)?;
            Ok(())
        },
    )
}

/// The `rows` map of a catalog document, if it has one.
pub(crate) fn rows_map(doc: &impl ReadDoc) -> Option<ObjId> {
    match doc.get(ROOT, ROWS).ok().flatten() {
        Some((AmValue::Object(ObjType::Map), id)) => Some(id),
        _ => None,
    }
}

fn as_generation(v: &AmValue<'_>) -> Option<u64> {
    match v {
        AmValue::Scalar(s) => match s.as_ref() {
            ScalarValue::Uint(u) => Some(*u),
            ScalarValue::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        },
        _ => None,
    }
}

/// The key's current generation (the highest of concurrent entries), if
/// the catalog lists it.
pub(crate) fn generation(doc: &impl ReadDoc, key: &str) -> Option<u64> {
    let rows = rows_map(doc)?;
    doc.get_all(&rows, key)
        .ok()?
        .iter()
        .filter_map(|(v, _)| as_generation(v))
        .max()
}

/// Every key the catalog lists, with its generation.
pub(crate) fn entries(doc: &impl ReadDoc) -> Vec<(String, u64)> {
    let Some(rows) = rows_map(doc) else {
        return Vec::new();
    };
    // One pass over the map; only a key with concurrent entries needs its
    // other values (the highest generation counts).
    doc.map_range(&rows, ..)
        .filter_map(|item| {
            let generation = if item.conflict {
                generation(doc, &item.key)?
            } else {
                as_generation(&item.value.into_value())?
            };
            Some((item.key.into_owned(), generation))
        })
        .collect()
}

/// List `key` at `generation` (creating the shard's map first if needed).
pub(crate) fn put(
    d: &mut AutoCommit,
    table: &str,
    shard: u32,
    shards: u32,
    key: &str,
    generation: u64,
) -> Result<(), automerge::AutomergeError> {
    let rows = match rows_map(d) {
        Some(rows) => rows,
        None => {
            d.apply_changes([genesis(table, shard, shards)])?;
            rows_map(d).expect("genesis creates the map")
        }
    };
    d.put(&rows, key, generation)?;
    Ok(())
}
