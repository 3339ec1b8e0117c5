//! Discovery: which rows a table has, spread over catalog documents.
//!
//! A table's row index is `shards` catalog documents (ids derived from the
//! table name and shard number, so every replica knows them without being
//! told). Each holds `{"_table", "_shard", "_shards", "rows": {key: generation}}`,
//! plus a page `"rows.<id>": {key: generation}` for each batch of keys
//! listed at once; a key lives in the shard its row id hashes to, so a
//! 100,000-row table is spread over many small documents instead of one
//! hot one. The `rows` map is created by a deterministic change, so
//! catalogs created on two offline replicas merge into one map. The
//! generation counts purges of the key: a key inserted again after its row
//! was purged gets a new row document. A key's generation is the highest
//! any of the maps gives it.
//!
//! Pages exist because automerge 0.12 puts a key into an existing map at
//! about 8 µs whatever the map's size, while it creates a new map of many
//! keys at about 1 µs a key (one batch insertion): listing 1,000 rows was
//! a quarter of a batched insert before.

use std::collections::HashMap;

use automerge::transaction::Transactable;
use automerge::{
    AutoCommit, Change, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value as AmValue, hydrate,
};

use super::document::{deterministic_change, digest, row_id};
use crate::DocumentId;

pub(crate) const ROWS: &str = "rows";
pub(crate) const SHARDS: &str = "_shards";
/// The root keys of pages start with this.
const PAGE_PREFIX: &str = "rows.";
/// Keys listed in one change from this many on go into a page of their own
/// (below it, puts into `rows` cost less than a page's bytes are worth).
pub(crate) const PAGE_MIN: usize = 16;

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

/// The pages of a catalog document (every map at a `rows.<id>` root key).
fn pages(doc: &impl ReadDoc) -> Vec<ObjId> {
    doc.keys(ROOT)
        .filter(|k| k.starts_with(PAGE_PREFIX))
        .flat_map(|k| doc.get_all(ROOT, &k).unwrap_or_default())
        .filter_map(|(v, id)| matches!(v, AmValue::Object(ObjType::Map)).then_some(id))
        .collect()
}

/// The highest generation `map` gives `key` (of its concurrent entries).
fn generation_in(doc: &impl ReadDoc, map: &ObjId, key: &str) -> Option<u64> {
    doc.get_all(map, key)
        .ok()?
        .iter()
        .filter_map(|(v, _)| as_generation(v))
        .max()
}

/// The maps of a catalog document that list keys: `rows`, then every page
/// (none if the document is not a catalog). Read them once for many
/// lookups: finding the pages walks the root's keys.
pub(crate) fn listing_maps(doc: &impl ReadDoc) -> Vec<ObjId> {
    match rows_map(doc) {
        Some(rows) => std::iter::once(rows).chain(pages(doc)).collect(),
        None => Vec::new(),
    }
}

/// The key's current generation among `maps` (from [`listing_maps`]): the
/// highest of its entries, if any lists it.
pub(crate) fn generation_among(doc: &impl ReadDoc, maps: &[ObjId], key: &str) -> Option<u64> {
    maps.iter()
        .filter_map(|map| generation_in(doc, map, key))
        .max()
}

/// The key's current generation (the highest of its entries in `rows` and
/// in every page), if the catalog lists it.
pub(crate) fn generation(doc: &impl ReadDoc, key: &str) -> Option<u64> {
    generation_among(doc, &listing_maps(doc), key)
}

/// Every key `map` lists, with its generation.
fn entries_in(doc: &impl ReadDoc, map: &ObjId) -> impl Iterator<Item = (String, u64)> {
    // One pass over the map; only a key with concurrent entries needs its
    // other values (the highest generation counts).
    doc.map_range(map, ..).filter_map(move |item| {
        let generation = if item.conflict {
            generation_in(doc, map, &item.key)?
        } else {
            as_generation(&item.value.into_value())?
        };
        Some((item.key.into_owned(), generation))
    })
}

/// Every key the catalog lists, with its generation.
pub(crate) fn entries(doc: &impl ReadDoc) -> Vec<(String, u64)> {
    let maps = listing_maps(doc);
    if let [rows] = maps.as_slice() {
        return entries_in(doc, rows).collect();
    }
    let mut all: HashMap<String, u64> = HashMap::new();
    for map in &maps {
        for (key, generation) in entries_in(doc, map) {
            let at = all.entry(key).or_insert(generation);
            *at = (*at).max(generation);
        }
    }
    all.into_iter().collect()
}

/// The `rows` map, creating the shard's catalog first if the document is
/// still empty.
fn ensure_rows(
    d: &mut AutoCommit,
    table: &str,
    shard: u32,
    shards: u32,
) -> Result<ObjId, automerge::AutomergeError> {
    match rows_map(d) {
        Some(rows) => Ok(rows),
        None => {
            d.apply_changes([genesis(table, shard, shards)])?;
            Ok(rows_map(d).expect("genesis creates the map"))
        }
    }
}

/// List `entries` (key, generation) in a new page: one batch insertion.
/// Its id is random, so pages made by different replicas never collide.
pub(crate) fn put_page(
    d: &mut AutoCommit,
    table: &str,
    shard: u32,
    shards: u32,
    entries: &[&(String, u64)],
) -> Result<(), automerge::AutomergeError> {
    ensure_rows(d, table, shard, shards)?;
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).expect("the operating system has no randomness source");
    let page: HashMap<String, hydrate::Value> = entries
        .iter()
        .map(|(key, generation)| {
            let value = hydrate::Value::Scalar(ScalarValue::Uint(*generation));
            (key.clone(), value)
        })
        .collect();
    d.batch_create_object(
        ROOT,
        format!("{PAGE_PREFIX}{}", hex::encode(id)),
        &hydrate::Value::Map(hydrate::Map::from(page)),
        false,
    )?;
    Ok(())
}

/// List `key` at `generation` in `rows` (creating the shard's catalog
/// first if needed).
pub(crate) fn put(
    d: &mut AutoCommit,
    table: &str,
    shard: u32,
    shards: u32,
    key: &str,
    generation: u64,
) -> Result<(), automerge::AutomergeError> {
    let rows = ensure_rows(d, table, shard, shards)?;
    d.put(&rows, key, generation)?;
    Ok(())
}
