//! How a row is laid out in its automerge document (docs/patterns.md has the
//! schema for other automerge clients):
//!
//! ```text
//! { "_table": "tasks", "_key": "t1",   // which row this is
//!   "_deleted": true,                   // only when deleted
//!   "title": "buy milk",                // register: a plain scalar
//!   "votes": Counter,                   // counter column
//!   "notes": Text }                     // collaborative text column
//! ```
//!
//! A register is the plain value at the column's key: one automerge
//! operation per write. Its hybrid-logical-clock timestamp travels in the
//! metadata of the change that wrote it: the change's message is the
//! timestamp (`<millis>.<counter>@<replica>`) and its time the same instant
//! in seconds. Concurrent writes survive side by side as automerge conflicts
//! at the key; the read finds each version's change (`hash_for_opid`) and
//! resolves them by the table's strategy. Counter and text objects are
//! created by a change that is the same bytes on every replica (fixed actor
//! derived from the row and column, no dependencies, time 0): two replicas
//! that create the same row offline share those objects, so their increments
//! and edits merge instead of one object hiding the other.

use std::collections::{BTreeMap, HashMap};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    ActorId, AutoCommit, Automerge, Change, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue,
    Value as AmValue, hydrate,
};
#[cfg(not(target_arch = "wasm32"))]
use automerge::{ExpandedChange, legacy};
use sha2::{Digest, Sha256};

use super::{ColumnKind, Row, TableSchema, Timestamp, Value, Version};
use crate::DocumentId;

pub(crate) const TABLE: &str = "_table";
pub(crate) const KEY: &str = "_key";
pub(crate) const DELETED: &str = "_deleted";

/// A fixed-size digest of labelled parts (NUL-separated).
pub(crate) fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

/// The document id of a row: the same on every replica for the same table,
/// key and generation (a generation starts after each purge of the key).
pub(crate) fn row_id(table: &str, key: &str, generation: u64) -> DocumentId {
    let bytes = if generation == 0 {
        digest(&["tandem/row", table, key])
    } else {
        digest(&["tandem/row", table, key, &generation.to_string()])
    };
    DocumentId::from_bytes(bytes[..16].try_into().expect("16 bytes"))
}

/// A change made by a fixed actor, with no dependencies and time 0: the same
/// bytes wherever it is built.
pub(crate) fn deterministic_change(
    label: &[&str],
    build: impl FnOnce(&mut AutoCommit) -> Result<(), automerge::AutomergeError>,
) -> Change {
    let actor = ActorId::from(&digest(label)[..16]);
    let mut doc = AutoCommit::new().with_actor(actor);
    build(&mut doc).expect("building on an empty document cannot fail");
    doc.commit();
    doc.get_last_local_change()
        .expect("the change was just made")
}

/// The change that creates a counter or text column of a row.
pub(crate) fn column_change(row: &DocumentId, column: &str, kind: ColumnKind) -> Change {
    let id = row.to_string();
    deterministic_change(&["tandem/column", &id, column], |d| {
        match kind {
            ColumnKind::Counter => d.put(ROOT, column, automerge::ScalarValue::counter(0))?,
            ColumnKind::Text => {
                d.put_object(ROOT, column, ObjType::Text)?;
            }
            ColumnKind::Register => {}
        }
        Ok(())
    })
}

/// Counter and text columns the schema declares that the document lacks.
pub(crate) fn missing_columns(
    doc: &impl ReadDoc,
    row: &DocumentId,
    schema: &TableSchema,
) -> Vec<Change> {
    schema
        .crdt_columns()
        .filter(|(c, _)| doc.get(ROOT, *c).ok().flatten().is_none())
        .map(|(c, k)| column_change(row, c, k))
        .collect()
}

/// Read values at the current state (`at == None`) or at past heads.
pub(crate) struct At<'a>(pub Option<&'a [ChangeHash]>);

impl At<'_> {
    fn get_all<'d>(
        &self,
        doc: &'d impl ReadDoc,
        obj: &ObjId,
        prop: &str,
    ) -> Vec<(AmValue<'d>, ObjId)> {
        match self.0 {
            None => doc.get_all(obj, prop),
            Some(h) => doc.get_all_at(obj, prop, h),
        }
        .unwrap_or_default()
    }

    fn keys(&self, doc: &impl ReadDoc) -> Vec<String> {
        match self.0 {
            None => doc.keys(ROOT).collect(),
            Some(h) => doc.keys_at(ROOT, h).collect(),
        }
    }

    fn scalar(
        &self,
        doc: &impl ReadDoc,
        obj: &ObjId,
        prop: &str,
    ) -> Option<automerge::ScalarValue> {
        match self.get_all(doc, obj, prop).into_iter().next() {
            Some((AmValue::Scalar(s), _)) => Some(s.into_owned()),
            _ => None,
        }
    }

    fn text(&self, doc: &impl ReadDoc, obj: &ObjId) -> String {
        match self.0 {
            None => doc.text(obj),
            Some(h) => doc.text_at(obj, h),
        }
        .unwrap_or_default()
    }
}

/// The timestamp of the change that made `op`: its message when that is a
/// timestamp (every change the row layer commits), otherwise (a change from
/// another automerge client) the change's time and actor.
fn stamp_of(doc: &Automerge, op: &ObjId) -> Timestamp {
    let meta = doc
        .hash_for_opid(op)
        .and_then(|h| doc.get_change_meta_by_hash(&h));
    let Some(meta) = meta else {
        return Timestamp::default();
    };
    if let Some(ts) = meta.message.as_deref().and_then(|m| m.parse().ok()) {
        return ts;
    }
    Timestamp {
        millis: u64::try_from(meta.timestamp)
            .unwrap_or(0)
            .saturating_mul(1000),
        counter: 0,
        replica: meta.actor.to_hex_string(),
    }
}

/// The commit options of a row change stamped `ts`: the timestamp as the
/// message, its instant (seconds, automerge's convention) as the time.
pub(crate) fn stamped(ts: &Timestamp) -> CommitOptions {
    CommitOptions::default()
        .with_message(ts.to_string())
        .with_time(seconds(ts))
}

/// A timestamp's instant in seconds, a change's time.
fn seconds(ts: &Timestamp) -> i64 {
    i64::try_from(ts.millis / 1000).unwrap_or(i64::MAX)
}

/// The first change of a new row, built without an automerge document:
/// `_table`, `_key` and the columns as one put each at the root, in key
/// order (a column given twice keeps its last value), made by `actor` as
/// its first change (sequence 1, no dependencies) and stamped `ts`. It is
/// byte for byte the change automerge commits for the same puts in that
/// order, at a small part of the cost: automerge builds its operation set
/// to make a change, this encodes the change alone. `None` when the schema
/// has counter or text columns, whose objects come from changes of their
/// own ([`column_change`]), so the row's first change depends on them.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn new_row_change(
    actor: &ActorId,
    schema: &TableSchema,
    key: &str,
    columns: &[(String, Value)],
    ts: &Timestamp,
) -> Option<Change> {
    if schema.crdt_columns().next().is_some() {
        return None;
    }
    let mut root: BTreeMap<&str, ScalarValue> = BTreeMap::new();
    root.insert(TABLE, ScalarValue::Str(schema.name.as_str().into()));
    root.insert(KEY, ScalarValue::Str(key.into()));
    for (column, value) in columns {
        root.insert(column, value.to_scalar());
    }
    let operations = root
        .into_iter()
        .map(|(k, v)| legacy::Op {
            action: legacy::OpType::Put(v),
            obj: legacy::ObjectId::Root,
            key: legacy::Key::Map(k.into()),
            pred: legacy::SortedVec::new(),
            insert: false,
        })
        .collect();
    Some(Change::from(ExpandedChange {
        operations,
        actor_id: actor.clone(),
        hash: None,
        seq: 1,
        start_op: std::num::NonZeroU64::MIN,
        time: seconds(ts),
        message: Some(ts.to_string()),
        deps: Vec::new(),
        extra_bytes: Vec::new(),
        author: None,
    }))
}

/// The browser build leaves [`new_row_change`] out (always `None`, so rows
/// are made in an automerge document there): automerge's builder for
/// expanded changes would take the gzipped module over its size budget
/// (511,399 bytes against 500,000).
#[cfg(target_arch = "wasm32")]
pub(crate) fn new_row_change(
    _actor: &ActorId,
    _schema: &TableSchema,
    _key: &str,
    _columns: &[(String, Value)],
    _ts: &Timestamp,
) -> Option<Change> {
    None
}

/// Write a register: the value at the column's key, superseding every
/// version this replica has seen. The change must be committed with
/// [`stamped`].
pub(crate) fn put_register(
    d: &mut AutoCommit,
    column: &str,
    value: &Value,
) -> Result<(), automerge::AutomergeError> {
    d.put(ROOT, column, value.to_scalar())
}

/// Write a new row into a document that holds nothing yet (no change, no
/// pending operation): `_table`, `_key` and every column at once, through
/// automerge's batch initialisation of the root map, which costs about a
/// third of the same keys put one by one. Only when every column written is
/// a register (counter and text columns are objects created by their own
/// changes, so their document is not empty). Returns whether it wrote; if
/// not, nothing was done and the caller writes key by key. The change must
/// be committed with [`stamped`].
pub(crate) fn init_new_row(
    d: &mut AutoCommit,
    schema: &TableSchema,
    key: &str,
    columns: &[(String, Value)],
) -> Result<bool, automerge::AutomergeError> {
    // Pending operations first: `get_heads` would commit them.
    let empty = d.pending_ops() == 0 && d.get_heads().is_empty();
    if !empty
        || columns
            .iter()
            .any(|(c, _)| schema.kind(c) != ColumnKind::Register)
    {
        return Ok(false);
    }
    let scalar = |s: ScalarValue| hydrate::Value::Scalar(s);
    // A column written twice keeps its last value, as puts in order would.
    let mut root: HashMap<String, hydrate::Value> = HashMap::with_capacity(columns.len() + 2);
    root.insert(
        TABLE.to_owned(),
        scalar(ScalarValue::Str(schema.name.as_str().into())),
    );
    root.insert(KEY.to_owned(), scalar(ScalarValue::Str(key.into())));
    for (column, value) in columns {
        root.insert(column.clone(), scalar(value.to_scalar()));
    }
    d.init_root_from_hydrate(&hydrate::Map::from(root))?;
    Ok(true)
}

/// Whether a saved row document certainly has no delete flag, told from its
/// bytes without loading it: no column of them is compressed (so every key
/// appears in them as it is) and `_deleted` appears nowhere in them.
/// `false` means "load it to know".
pub(crate) fn surely_live(saved: &[u8]) -> bool {
    crate::chunk::uncompressed(saved)
        && !saved
            .windows(DELETED.len())
            .any(|w| w == DELETED.as_bytes())
}

/// Flag the row deleted (committed with [`stamped`]).
pub(crate) fn put_deleted(d: &mut AutoCommit) -> Result<(), automerge::AutomergeError> {
    d.put(ROOT, DELETED, true)
}

/// The concurrent versions of a register column, oldest first.
pub(crate) fn versions(doc: &Automerge, at: &At<'_>, column: &str) -> Vec<Version> {
    let mut out: Vec<Version> = at
        .get_all(doc, &ROOT, column)
        .into_iter()
        .filter_map(|(v, op)| match v {
            AmValue::Scalar(s) if !matches!(s.as_ref(), automerge::ScalarValue::Counter(_)) => {
                Some(Version {
                    value: Value::from_scalar(&s)?,
                    at: stamp_of(doc, &op),
                })
            }
            _ => None,
        })
        .collect();
    out.sort_by(|a, b| a.at.cmp(&b.at));
    out
}

/// The state of a row document at a point in its history.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RowState {
    pub table: Option<String>,
    pub key: Option<String>,
    pub deleted: Option<Timestamp>,
}

impl RowState {
    pub fn live(&self) -> bool {
        self.table.is_some() && self.deleted.is_none()
    }

    /// A row flagged deleted: what cleanup tracks acknowledgements for.
    pub fn deleted_row(&self) -> bool {
        self.key.is_some() && self.deleted.is_some()
    }
}

pub(crate) fn state(doc: &Automerge, at: &At<'_>) -> RowState {
    let text = |prop| match at.scalar(doc, &ROOT, prop) {
        Some(automerge::ScalarValue::Str(s)) => Some(s.to_string()),
        _ => None,
    };
    // Any value at `_deleted`, even concurrent ones, means deleted.
    let deleted = at
        .get_all(doc, &ROOT, DELETED)
        .into_iter()
        .map(|(_, op)| stamp_of(doc, &op))
        .max();
    RowState {
        table: text(TABLE),
        key: text(KEY),
        deleted,
    }
}

/// The latest timestamp among the delete flag (from `state`) and the given register
/// columns (every register when `columns` is `None`). A write only needs to
/// order after what it supersedes: the versions of the columns it writes,
/// and the delete it may revive.
pub(crate) fn latest_timestamp(
    doc: &Automerge,
    state: &RowState,
    columns: Option<&[&str]>,
) -> Option<Timestamp> {
    let at = At(None);
    let mut latest = state.deleted.clone();
    let all;
    let columns: Vec<&str> = match columns {
        Some(c) => c.to_vec(),
        None => {
            all = at.keys(doc);
            all.iter().map(String::as_str).collect()
        }
    };
    for key in columns {
        if let Some(v) = versions(doc, &at, key).pop() {
            latest = latest.max(Some(v.at));
        }
    }
    latest
}

/// The user columns present (not the `_` metadata keys).
pub(crate) fn columns(doc: &impl ReadDoc, at: &At<'_>) -> Vec<String> {
    at.keys(doc)
        .into_iter()
        .filter(|k| !k.starts_with('_'))
        .collect()
}

/// One column's value and, for registers, its concurrent versions.
pub(crate) fn cell(
    doc: &Automerge,
    at: &At<'_>,
    schema: &TableSchema,
    column: &str,
) -> (Option<Value>, Vec<Version>) {
    let (value, versions, _) = typed_cell(doc, at, schema, column);
    (value, versions)
}

/// [`cell`], and the column's kind as stored.
pub(crate) fn typed_cell(
    doc: &Automerge,
    at: &At<'_>,
    schema: &TableSchema,
    column: &str,
) -> (Option<Value>, Vec<Version>, ColumnKind) {
    let all = at.get_all(doc, &ROOT, column);
    let concurrent = all.len();
    let Some((value, obj)) = all.into_iter().next_back() else {
        return (None, Vec::new(), ColumnKind::Register);
    };
    match value {
        AmValue::Object(ObjType::Text) => (
            Some(Value::String(at.text(doc, &obj))),
            Vec::new(),
            ColumnKind::Text,
        ),
        AmValue::Scalar(s) if matches!(s.as_ref(), automerge::ScalarValue::Counter(_)) => {
            (Value::from_scalar(&s), Vec::new(), ColumnKind::Counter)
        }
        // One version: its value, with no need to look up its timestamp.
        AmValue::Scalar(s) if concurrent == 1 => {
            (Value::from_scalar(&s), Vec::new(), ColumnKind::Register)
        }
        AmValue::Scalar(_) => {
            let versions = versions(doc, at, column);
            let value = schema.strategy_for(column).resolve(column, &versions);
            (value, versions, ColumnKind::Register)
        }
        AmValue::Object(_) => (None, Vec::new(), ColumnKind::Register),
    }
}

/// The row as the application sees it, or `None` if it is not a live row.
pub(crate) fn read(doc: &Automerge, at: &At<'_>, schema: &TableSchema) -> Option<Row> {
    let st = state(doc, at);
    if !st.live() {
        return None;
    }
    let mut values = BTreeMap::new();
    let mut conflicts = BTreeMap::new();
    let mut kinds = BTreeMap::new();
    for column in columns(doc, at) {
        let (value, versions, kind) = typed_cell(doc, at, schema, &column);
        if kind != ColumnKind::Register {
            kinds.insert(column.clone(), kind);
        }
        if let Some(v) = value {
            values.insert(column.clone(), v);
        }
        if versions.len() > 1 {
            conflicts.insert(column, versions);
        }
    }
    Some(Row {
        key: st.key.unwrap_or_default(),
        values,
        conflicts,
        kinds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns() -> Vec<(String, Value)> {
        vec![
            ("title".into(), Value::String("milk".into())),
            ("done".into(), Value::Bool(false)),
            ("title".into(), Value::String("eggs".into())),
            ("size".into(), Value::Float(1.5)),
            ("blob".into(), Value::Bytes(vec![0, 1])),
            ("gone".into(), Value::Null),
        ]
    }

    fn write(d: &mut AutoCommit, schema: &TableSchema, by_keys: bool) -> bool {
        let cols = columns();
        let batched = !by_keys && init_new_row(d, schema, "k1", &cols).unwrap();
        if !batched {
            d.put(ROOT, TABLE, schema.name.as_str()).unwrap();
            d.put(ROOT, KEY, "k1").unwrap();
            for (c, v) in &cols {
                put_register(d, c, v).unwrap();
            }
        }
        let ts = Timestamp {
            millis: 5_000,
            counter: 0,
            replica: "r1".into(),
        };
        d.commit_with(stamped(&ts));
        batched
    }

    #[test]
    fn a_new_row_written_at_once_reads_as_one_written_key_by_key() {
        let schema = TableSchema::new("tasks");
        let (mut fast, mut slow) = (AutoCommit::new(), AutoCommit::new());
        assert!(
            write(&mut fast, &schema, false),
            "an empty document takes the batch"
        );
        assert!(!write(&mut slow, &schema, true));
        let read = |d: &mut AutoCommit| read(d.document(), &At(None), &schema);
        let (a, b) = (read(&mut fast).expect("row"), read(&mut slow).expect("row"));
        assert_eq!(a.values(), b.values());
        assert_eq!(a.get("title"), Some(&Value::String("eggs".into())));
        assert_eq!(a.get("gone"), Some(&Value::Null));
        // One change, one operation per key, and each version carries the
        // change's timestamp.
        assert_eq!(fast.get_changes(&[]).len(), 1);
        assert_eq!(fast.document().stats().num_ops, 7);
        let v = versions(fast.document(), &At(None), "title");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].at.millis, 5_000);
        // Any automerge client sees plain keys.
        let plain = AutoCommit::load(&fast.save()).unwrap();
        assert_eq!(
            plain.get(ROOT, TABLE).unwrap().unwrap().0.as_str(),
            Some("tasks")
        );
        assert_eq!(
            plain.get(ROOT, KEY).unwrap().unwrap().0.as_str(),
            Some("k1")
        );
    }

    #[test]
    fn a_new_row_change_is_the_change_automerge_commits_for_its_puts() {
        let schema = TableSchema::new("tasks");
        let actor = ActorId::random();
        let ts = Timestamp {
            millis: 5_000_123,
            counter: 2,
            replica: "r1".into(),
        };
        let built = new_row_change(&actor, &schema, "k1", &columns(), &ts).expect("registers only");
        // Automerge's own change: the same puts, in key order, last value kept.
        let mut d = AutoCommit::new().with_actor(actor.clone());
        let mut expected: BTreeMap<String, ScalarValue> = BTreeMap::new();
        expected.insert(TABLE.into(), ScalarValue::Str("tasks".into()));
        expected.insert(KEY.into(), ScalarValue::Str("k1".into()));
        for (c, v) in columns() {
            expected.insert(c, v.to_scalar());
        }
        for (k, v) in expected {
            d.put(ROOT, k, v).unwrap();
        }
        d.commit_with(stamped(&ts));
        let theirs = d.get_last_local_change().unwrap();
        assert_eq!(built.raw_bytes(), theirs.raw_bytes());
        assert_eq!(built.hash(), theirs.hash());
        // It loads as the row the batch path writes.
        let mut loaded = AutoCommit::load(built.raw_bytes()).unwrap();
        let mut batch = AutoCommit::new();
        write(&mut batch, &schema, false);
        let read = |d: &mut AutoCommit| read(d.document(), &At(None), &schema);
        assert_eq!(
            read(&mut loaded).unwrap().values(),
            read(&mut batch).unwrap().values()
        );
        let v = versions(loaded.document(), &At(None), "title");
        assert_eq!(v[0].at, ts, "the version carries the change's timestamp");

        let counted = TableSchema::new("tasks").counter("n");
        assert!(new_row_change(&actor, &counted, "k1", &[], &ts).is_none());
    }

    #[test]
    fn a_saved_live_row_is_known_live_without_loading() {
        let schema = TableSchema::new("tasks");
        let mut d = AutoCommit::new();
        write(&mut d, &schema, false);
        // As a store keeps it: a snapshot when first stored, or changes.
        assert!(surely_live(&d.save()));
        assert!(surely_live(&d.save_after(&[])));
        d.put(ROOT, DELETED, 1).unwrap();
        d.commit();
        assert!(!surely_live(&d.save()));
    }

    #[test]
    fn only_an_empty_document_and_register_columns_take_the_batch() {
        let schema = TableSchema::new("tasks");
        let mut d = AutoCommit::new();
        d.put(ROOT, "x", 1).unwrap();
        assert!(
            !init_new_row(&mut d, &schema, "k", &columns()).unwrap(),
            "pending op"
        );
        assert_eq!(d.pending_ops(), 1, "the pending operation is left pending");
        d.commit();
        assert!(
            !init_new_row(&mut d, &schema, "k", &columns()).unwrap(),
            "has a change"
        );
        assert_eq!(d.document().stats().num_ops, 1, "nothing written");

        let counted = TableSchema::new("tasks").counter("n");
        let mut d = AutoCommit::new();
        let cols = vec![("n".to_owned(), Value::Int(3))];
        assert!(!init_new_row(&mut d, &counted, "k", &cols).unwrap());
        assert!(d.get_heads().is_empty() && d.pending_ops() == 0);
    }
}
