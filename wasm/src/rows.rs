//! The row layer for JS: `tandem.tables()` gives a `TandemTables`, the
//! tables, rows, delete flags, conflict strategies and row change feed of
//! `tandem_engine::rows` over the same store, IndexedDB persistence and
//! relay connection as the `Tandem` it came from.
//!
//! The driver owns the repo; each call borrows it, builds a
//! `Rows::new(&mut repo, clock)` with every schema defined so far, does its
//! work and pumps the driver (commit to IndexedDB, then sync), exactly as the
//! raw-document calls of `Tandem` do. Schemas live here, per store (a
//! thread-local registry keyed by the driver), since the engine keeps them
//! in code, not in the store.
//!
//! Row events come from the driver's `change` events (each is durable when
//! delivered): the same listener also asks for the rows an arriving table
//! catalog lists, so a synced table fills in by itself.

use std::cell::{Cell, RefCell, RefMut};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};

use js_sys::{Array, Date, Function, Object, Reflect, Uint8Array};
use tandem_engine::automerge::TextEncoding;
use tandem_engine::rows::{Row, RowChange, RowEvent, Rows, Strategy, TableSchema, Value, Version};
use tandem_engine::{Cursor, Origin, PeerId, Repo, RowError};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

use crate::driver::{Driver, Shared};
use crate::error::Error;
use crate::js;
use crate::storage::BrowserStorage;
use crate::tandem::Tandem;

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &'static str = r#"
/** A register column's value: integers read back as numbers, `Uint8Array` is bytes, `Date` a timestamp. */
export type RowValue = null | boolean | number | string | Uint8Array | Date;

/** When a register version was written: hybrid-logical-clock milliseconds, a counter within the millisecond, and the writing replica (its storage id). */
export interface RowTimestamp { millis: number; counter: number; replica: string }

/** One concurrent write of a register column. */
export interface RowVersion { value: RowValue; at: RowTimestamp }

/** How concurrent writes to a register resolve: last writer wins (default), first writer wins, keep every version until the app writes a resolution, or a pure function of the versions (oldest first) that every replica must define identically. */
export type RowStrategy = "lww" | "fww" | "multi" | ((column: string, versions: RowVersion[]) => RowValue);

/** A table's schema. Every replica writing the table must define it the same way. */
export interface TableDefinition {
  name: string;
  /** Counter columns: concurrent increments add up. */
  counters?: string[];
  /** Collaborative text columns: concurrent edits interleave. */
  texts?: string[];
  /** The strategy of every register column without its own (default "lww"). */
  strategy?: RowStrategy;
  /** Per-column strategies. */
  columns?: { [column: string]: RowStrategy };
  /** Catalog documents the row index is spread over (default 16; fixed for the table's life). */
  shards?: number;
}

/** A live row: resolved values (a multi-value register in conflict has none), and the versions of every register with concurrent writes. */
export interface TableRow {
  key: string;
  values: { [column: string]: RowValue };
  conflicts: { [column: string]: RowVersion[] };
}

/** A row-level change from the durable change feed. Column values are those after the commit (`null` for a removed column or an unresolved multi-value register). */
export type RowEvent = {
  seq: number;
  table: string;
  key: string;
  origin: "local" | "remote";
  peerId?: string;
} & (
  | { type: "inserted" | "updated" | "deleted"; columns: { [column: string]: RowValue } }
  | { type: "conflict"; column: string; versions: RowVersion[]; resolved: RowValue | undefined; columns: {} }
);

/** A page of the row change feed and the cursor to resume after. */
export interface RowChanges { events: RowEvent[]; cursor: number }
"#;

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn console_error(message: &str, detail: &JsValue);
}

/// A Rust closure subscribed to the driver's events.
type Listener = Closure<dyn FnMut(JsValue)>;

/// Every open store's row state, by its driver.
type Registry = Vec<(Weak<RefCell<Driver>>, Rc<State>)>;

/// What the row bindings keep per store.
#[derive(Default)]
struct State {
    schemas: RefCell<BTreeMap<String, TableSchema>>,
    row_listeners: RefCell<Vec<(u32, Function)>>,
    next_listener: Cell<u32>,
    /// Whether a table was synced (arriving catalogs then fetch their rows).
    syncing: Cell<bool>,
    /// The driver subscription feeding row events and discovery.
    hook: RefCell<Option<Listener>>,
}

thread_local! {
    /// Per open store (by its driver), the row bindings' state: every
    /// `tandem.tables()` of one store shares its schemas and listeners.
    static STATES: RefCell<Registry> = const { RefCell::new(Vec::new()) };
}

fn state_for(shared: &Shared) -> Rc<State> {
    STATES.with(|states| {
        let mut states = states.borrow_mut();
        states.retain(|(driver, _)| driver.strong_count() > 0);
        if let Some((_, state)) = states
            .iter()
            .find(|(driver, _)| std::ptr::eq(driver.as_ptr(), Rc::as_ptr(shared)))
        {
            return state.clone();
        }
        let state = Rc::new(State::default());
        states.push((Rc::downgrade(shared), state.clone()));
        state
    })
}

#[wasm_bindgen]
impl Tandem {
    /// The tables of this store (rows, deletes, conflict strategies, row
    /// change feed), over the same IndexedDB store and relay connection.
    pub fn tables(&self) -> TandemTables {
        let shared = self.shared().clone();
        let state = state_for(&shared);
        TandemTables { shared, state }
    }
}

/// Tables and rows over a `Tandem` store (`tandem.tables()`): each row is an
/// automerge document whose id comes from (table, key), so the same key
/// written in two tabs or offline replicas is one row whose columns merge.
/// Writes are visible at once, durable in IndexedDB and synced right after;
/// errors are thrown as `TandemError`s.
#[wasm_bindgen]
pub struct TandemTables {
    shared: Shared,
    state: Rc<State>,
}

impl std::fmt::Debug for TandemTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TandemTables")
            .field(
                "tables",
                &self.state.schemas.borrow().keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

type BrowserRows<'a> = Rows<BrowserStorage, &'a mut Repo<BrowserStorage>>;

fn now_ms() -> u64 {
    js_sys::Date::now() as u64
}

/// A row error as a JS exception (its Display as the message).
fn row_error(e: RowError) -> JsValue {
    let js = js_sys::Error::new(&e.to_string());
    js.set_name("TandemError");
    js.into()
}

fn borrow_driver(shared: &Shared) -> Result<RefMut<'_, Driver>, Error> {
    let d = shared
        .try_borrow_mut()
        .map_err(|_| Error::argument("call", "Tandem is busy (called from inside itself)"))?;
    if d.closed {
        return Err(Error::Closed);
    }
    Ok(d)
}

/// Run `f` on a `Rows` over the driver's repo with every schema defined,
/// then pump the driver (commit, persist, sync), whether `f` failed or not
/// (a failed write may still have created a document).
fn with_rows<R>(
    shared: &Shared,
    state: &State,
    pump: bool,
    f: impl FnOnce(&mut BrowserRows<'_>) -> Result<R, RowError>,
) -> Result<R, JsValue> {
    let mut d = borrow_driver(shared)?;
    let result = {
        let mut rows = Rows::new(&mut d.repo, now_ms);
        for schema in state.schemas.borrow().values() {
            rows.define(schema.clone());
        }
        f(&mut rows)
    };
    if pump {
        d.pump();
    }
    result.map_err(row_error)
}

impl TandemTables {
    fn rows<R>(
        &self,
        f: impl FnOnce(&mut BrowserRows<'_>) -> Result<R, RowError>,
    ) -> Result<R, JsValue> {
        with_rows(&self.shared, &self.state, false, f)
    }

    fn write<R>(
        &self,
        f: impl FnOnce(&mut BrowserRows<'_>) -> Result<R, RowError>,
    ) -> Result<R, JsValue> {
        with_rows(&self.shared, &self.state, true, f)
    }

    /// Subscribe to the driver's events once, for row events and discovery.
    fn hook(&self) -> Result<(), JsValue> {
        if self.state.hook.borrow().is_some() {
            return Ok(());
        }
        let shared = Rc::downgrade(&self.shared);
        let state = Rc::downgrade(&self.state);
        let closure = Listener::new(move |event: JsValue| {
            if let (Some(shared), Some(state)) = (shared.upgrade(), state.upgrade()) {
                on_event(&shared, &state, &event);
            }
        });
        let function: Function = closure.as_ref().unchecked_ref::<Function>().clone();
        borrow_driver(&self.shared)?.subscribe(function);
        *self.state.hook.borrow_mut() = Some(closure);
        Ok(())
    }
}

/// A driver event: fetch the rows of an arriving catalog (once a table is
/// synced), and turn a commit into row events for the row listeners.
fn on_event(shared: &Shared, state: &State, event: &JsValue) {
    if get(event, "type").as_string().as_deref() != Some("change") {
        return;
    }
    let Some(seq) = get(event, "seq").as_f64() else {
        return;
    };
    let Some(document) = get(event, "documentId")
        .as_string()
        .and_then(|id| js::document_id(&id).ok())
    else {
        return;
    };
    let remote = get(event, "origin").as_string().as_deref() == Some("remote");
    let listeners: Vec<Function> = state
        .row_listeners
        .borrow()
        .iter()
        .map(|(_, f)| f.clone())
        .collect();
    let discover = remote && state.syncing.get();
    if !discover && listeners.is_empty() {
        return;
    }
    let seq = seq as u64;
    let result = with_rows(shared, state, discover, |rows| {
        if discover {
            rows.discover_catalog(&document)?;
        }
        if listeners.is_empty() {
            return Ok(Vec::new());
        }
        let (events, _) = rows.changes(Cursor(seq.saturating_sub(1)), 1)?;
        Ok(events.into_iter().filter(|e| e.seq == seq).collect())
    });
    match result {
        Ok(events) => {
            for event in events.iter().map(event_to_js) {
                for listener in &listeners {
                    if let Err(e) = listener.call1(&JsValue::NULL, &event) {
                        console_error("tandem: a row listener threw", &e);
                    }
                }
            }
        }
        Err(e) => console_error("tandem: reading row events failed", &e),
    }
}

#[wasm_bindgen]
impl TandemTables {
    /// Declare a table: its counter and text columns and its conflict
    /// strategies. Redefining a table replaces its schema. Tables used
    /// without a definition have register columns, last writer wins.
    #[wasm_bindgen(js_name = defineTable)]
    pub fn define_table(
        &self,
        #[wasm_bindgen(unchecked_param_type = "TableDefinition")] definition: JsValue,
    ) -> Result<(), JsValue> {
        let schema = schema_from_js(&definition)?;
        self.state
            .schemas
            .borrow_mut()
            .insert(schema.name().to_owned(), schema);
        Ok(())
    }

    /// The names of the tables defined so far.
    #[wasm_bindgen(js_name = definedTables)]
    pub fn defined_tables(&self) -> Vec<String> {
        self.state.schemas.borrow().keys().cloned().collect()
    }

    /// Insert a row; throws if the key has a live row (a deleted row is
    /// revived with only these values).
    pub fn insert(
        &self,
        table: &str,
        key: &str,
        #[wasm_bindgen(unchecked_param_type = "{ [column: string]: RowValue }")] values: JsValue,
    ) -> Result<(), JsValue> {
        let columns = columns_from_js(&values)?;
        self.write(|rows| rows.table(table).insert(key, columns))
    }

    /// Insert the row, or set these columns if it exists.
    pub fn upsert(
        &self,
        table: &str,
        key: &str,
        #[wasm_bindgen(unchecked_param_type = "{ [column: string]: RowValue }")] values: JsValue,
    ) -> Result<(), JsValue> {
        let columns = columns_from_js(&values)?;
        self.write(|rows| rows.table(table).upsert(key, columns))
    }

    /// Set some columns of a live row (throws if there is none). Writing a
    /// multi-value register resolves its conflict.
    pub fn update(
        &self,
        table: &str,
        key: &str,
        #[wasm_bindgen(unchecked_param_type = "{ [column: string]: RowValue }")] values: JsValue,
    ) -> Result<(), JsValue> {
        let columns = columns_from_js(&values)?;
        self.write(|rows| rows.table(table).update(key, columns))
    }

    /// Flag a live row deleted (a delete wins over concurrent updates).
    #[wasm_bindgen(js_name = delete)]
    pub fn delete_row(&self, table: &str, key: &str) -> Result<(), JsValue> {
        self.write(|rows| rows.table(table).delete(key))
    }

    /// The live row with this key, or `null`.
    #[wasm_bindgen(unchecked_return_type = "TableRow | null")]
    pub fn get(&self, table: &str, key: &str) -> Result<JsValue, JsValue> {
        let row = self.rows(|rows| rows.table(table).get(key))?;
        Ok(row.as_ref().map_or(JsValue::NULL, row_to_js))
    }

    /// Every live row this store has, in key order.
    #[wasm_bindgen(unchecked_return_type = "TableRow[]")]
    pub fn scan(&self, table: &str) -> Result<Array, JsValue> {
        let rows = self.rows(|rows| rows.table(table).scan())?;
        Ok(rows.iter().map(row_to_js).collect())
    }

    /// Add `by` (default 1) to a counter column.
    pub fn increment(
        &self,
        table: &str,
        key: &str,
        column: &str,
        by: Option<f64>,
    ) -> Result<(), JsValue> {
        let by = match by {
            None => 1,
            Some(n) => integer(n).ok_or_else(|| Error::argument("by", "expected an integer"))?,
        };
        self.write(|rows| rows.table(table).increment(key, column, by))
    }

    /// Edit a text column: remove `deleteCount` UTF-16 code units at
    /// `index` and insert `text` there (positions count like JS strings).
    #[wasm_bindgen(js_name = spliceText)]
    pub fn splice_text(
        &self,
        table: &str,
        key: &str,
        column: &str,
        index: u32,
        #[wasm_bindgen(js_name = deleteCount)] delete_count: u32,
        text: Option<String>,
    ) -> Result<(), JsValue> {
        let text = text.unwrap_or_default();
        let (index, delete_count) = (index as usize, delete_count as usize);
        self.write(|rows| {
            let mut t = rows.table(table);
            let current = match t.get(key)? {
                Some(row) => row.get(column).and_then(Value::as_str).unwrap_or("").to_owned(),
                None => String::new(), // splice_text reports the missing row
            };
            let id = t.document_id(key)?;
            let encoding = if rows.repo().contains(&id)? {
                rows.repo_mut().view(&id, |d| d.text_encoding())?
            } else {
                TextEncoding::platform_default()
            };
            let units = current.encode_utf16().count();
            if index.saturating_add(delete_count) > units {
                return Err(RowError::InvalidColumn {
                    column: column.to_owned(),
                    reason: format!(
                        "splice of {delete_count} at {index} is past the end of the text (length {units})"
                    ),
                });
            }
            let start = doc_units(&current, index, encoding);
            let end = doc_units(&current, index + delete_count, encoding);
            let (Some(start), Some(end)) = (start, end) else {
                return Err(RowError::InvalidColumn {
                    column: column.to_owned(),
                    reason: "the splice splits a surrogate pair".into(),
                });
            };
            rows.table(table)
                .splice_text(key, column, start, (end - start) as isize, &text)
        })
    }

    /// The automerge document id of a key's row (any automerge-repo client
    /// can read it through the relay as `automerge:<id>`).
    #[wasm_bindgen(js_name = documentId)]
    pub fn document_id(&self, table: &str, key: &str) -> Result<String, JsValue> {
        self.rows(|rows| Ok(rows.table(table).document_id(key)?.to_string()))
    }

    /// Sync a table with the relay: ask for its catalogs, fetch every row
    /// they list, and from now on fetch the rows of catalogs as they arrive.
    #[wasm_bindgen(js_name = syncTable)]
    pub fn sync_table(&self, table: &str) -> Result<(), JsValue> {
        self.hook()?;
        self.state.syncing.set(true);
        self.write(|rows| {
            rows.subscribe(table)?;
            rows.discover(table)?;
            Ok(())
        })
    }

    /// Row events of up to `limit` (default 100) feed entries after
    /// `cursor` (default 0: from the start), and the cursor to resume from.
    #[wasm_bindgen(js_name = rowChanges, unchecked_return_type = "RowChanges")]
    pub fn row_changes(&self, cursor: Option<f64>, limit: Option<u32>) -> Result<JsValue, JsValue> {
        let after = Cursor(cursor.unwrap_or(0.0).max(0.0) as u64);
        let limit = limit.unwrap_or(100).max(1) as usize;
        let (events, next) = self.rows(|rows| rows.changes(after, limit))?;
        let events: Array = events.iter().map(event_to_js).collect();
        Ok(js::object(&[
            ("events", events.into()),
            ("cursor", JsValue::from_f64(next.0 as f64)),
        ]))
    }

    /// Call `callback` with every row event from now on (local edits and
    /// ones from peers, each once durable here); returns an id for
    /// `unsubscribeRows`.
    #[wasm_bindgen(js_name = subscribeRows)]
    pub fn subscribe_rows(
        &self,
        #[wasm_bindgen(unchecked_param_type = "(event: RowEvent) => void")] callback: Function,
    ) -> Result<u32, JsValue> {
        self.hook()?;
        let id = self.state.next_listener.get() + 1;
        self.state.next_listener.set(id);
        self.state.row_listeners.borrow_mut().push((id, callback));
        Ok(id)
    }

    /// Stop calling a row listener; whether it was subscribed.
    #[wasm_bindgen(js_name = unsubscribeRows)]
    pub fn unsubscribe_rows(&self, id: u32) -> bool {
        let mut listeners = self.state.row_listeners.borrow_mut();
        let before = listeners.len();
        listeners.retain(|(i, _)| *i != id);
        listeners.len() != before
    }

    /// Every change of a key's row, encoded: with `importRow` another store
    /// merges the row without a relay (a BroadcastChannel, a file, a test).
    #[wasm_bindgen(js_name = exportRow, unchecked_return_type = "Uint8Array[]")]
    pub fn export_row(&self, table: &str, key: &str) -> Result<Array, JsValue> {
        let changes = self.rows(|rows| {
            let id = rows.table(table).document_id(key)?;
            if !rows.repo().contains(&id)? {
                return Ok(Vec::new());
            }
            Ok(rows.repo_mut().changes_since(&id, &[])?)
        })?;
        Ok(changes
            .iter()
            .map(|c| JsValue::from(Uint8Array::from(c.as_slice())))
            .collect())
    }

    /// Merge changes of a key's row from `exportRow` of another store (as
    /// a remote commit, then durable and synced). Returns whether anything
    /// was new. `get` reads the row at once; `scan` lists it once the
    /// table's catalog arrives too (`syncTable`).
    #[wasm_bindgen(js_name = importRow)]
    pub fn import_row(
        &self,
        table: &str,
        key: &str,
        #[wasm_bindgen(unchecked_param_type = "Uint8Array[]")] changes: JsValue,
    ) -> Result<bool, JsValue> {
        if !Array::is_array(&changes) {
            return Err(Error::argument("changes", "expected an array of Uint8Array").into());
        }
        let mut bytes = Vec::new();
        for item in Array::from(&changes).iter() {
            let Some(b) = item.dyn_ref::<Uint8Array>() else {
                return Err(Error::argument("changes", "expected an array of Uint8Array").into());
            };
            bytes.push(b.to_vec());
        }
        self.write(|rows| {
            let id = rows.table(table).document_id(key)?;
            let from = PeerId::new("import");
            Ok(rows.repo_mut().apply_changes(&id, &bytes, &from)?)
        })
    }
}

// ---- conversions ----------------------------------------------------------

fn get(obj: &JsValue, name: &str) -> JsValue {
    Reflect::get(obj, &JsValue::from_str(name)).unwrap_or(JsValue::UNDEFINED)
}

/// A JS number that is a safe integer.
fn integer(n: f64) -> Option<i64> {
    const SAFE: f64 = 9_007_199_254_740_991.0; // Number.MAX_SAFE_INTEGER
    (n.fract() == 0.0 && n.abs() <= SAFE).then_some(n as i64)
}

/// A column value from JS: null, boolean, number (a safe integer is an
/// int, any other number a float), string, `Uint8Array` (bytes), `Date`.
fn value_from_js(js: &JsValue) -> Result<Value, Error> {
    if js.is_null() {
        return Ok(Value::Null);
    }
    if let Some(b) = js.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Some(n) = js.as_f64() {
        return Ok(integer(n).map_or(Value::Float(n), Value::Int));
    }
    if let Some(s) = js.as_string() {
        return Ok(Value::String(s));
    }
    if let Some(bytes) = js.dyn_ref::<Uint8Array>() {
        return Ok(Value::Bytes(bytes.to_vec()));
    }
    if let Some(date) = js.dyn_ref::<Date>() {
        return Ok(Value::Timestamp(date.get_time() as i64));
    }
    Err(Error::argument(
        "value",
        format!("{js:?} is not a column value (null, boolean, number, string, Uint8Array or Date)"),
    ))
}

fn value_to_js(value: &Value) -> JsValue {
    match value {
        Value::Null => JsValue::NULL,
        Value::Bool(b) => JsValue::from_bool(*b),
        Value::Int(i) => JsValue::from_f64(*i as f64),
        Value::Float(f) => JsValue::from_f64(*f),
        Value::String(s) => JsValue::from_str(s),
        Value::Bytes(b) => Uint8Array::from(b.as_slice()).into(),
        Value::Timestamp(t) => Date::new(&JsValue::from_f64(*t as f64)).into(),
    }
}

/// `{column: value}` from JS (keys whose value is `undefined` are skipped).
fn columns_from_js(js: &JsValue) -> Result<Vec<(String, Value)>, Error> {
    if !js.is_object() || Array::is_array(js) {
        return Err(Error::argument(
            "values",
            "expected an object {column: value}",
        ));
    }
    let mut out = Vec::new();
    for entry in Object::entries(js.unchecked_ref()).iter() {
        let pair = Array::from(&entry);
        let column = pair.get(0).as_string().unwrap_or_default();
        let value = pair.get(1);
        if value.is_undefined() {
            continue;
        }
        let value = value_from_js(&value).map_err(|e| match e {
            Error::Argument { reason, .. } => {
                Error::argument("values", format!("column {column:?}: {reason}"))
            }
            other => other,
        })?;
        out.push((column, value));
    }
    Ok(out)
}

fn version_to_js(version: &Version) -> JsValue {
    let at = js::object(&[
        ("millis", JsValue::from_f64(version.at.millis as f64)),
        ("counter", version.at.counter.into()),
        ("replica", version.at.replica.as_str().into()),
    ]);
    js::object(&[("value", value_to_js(&version.value)), ("at", at)])
}

fn versions_to_js(versions: &[Version]) -> JsValue {
    versions.iter().map(version_to_js).collect::<Array>().into()
}

fn row_to_js(row: &Row) -> JsValue {
    let values = Object::new();
    for (column, value) in row.values() {
        js::set(&values, column, &value_to_js(value));
    }
    let conflicts = Object::new();
    for (column, versions) in row.conflicts() {
        js::set(&conflicts, column, &versions_to_js(versions));
    }
    js::object(&[
        ("key", row.key.as_str().into()),
        ("values", values.into()),
        ("conflicts", conflicts.into()),
    ])
}

fn event_to_js(event: &RowEvent) -> JsValue {
    let obj = Object::new();
    js::set(&obj, "seq", &JsValue::from_f64(event.seq as f64));
    js::set(&obj, "table", &event.table.as_str().into());
    js::set(&obj, "key", &event.key.as_str().into());
    let kind = match &event.change {
        RowChange::Inserted => "inserted",
        RowChange::Updated => "updated",
        RowChange::Deleted => "deleted",
        RowChange::Conflict {
            column,
            versions,
            resolved,
        } => {
            js::set(&obj, "column", &column.as_str().into());
            js::set(&obj, "versions", &versions_to_js(versions));
            js::set(
                &obj,
                "resolved",
                &resolved.as_ref().map_or(JsValue::UNDEFINED, value_to_js),
            );
            "conflict"
        }
    };
    js::set(&obj, "type", &kind.into());
    let columns = Object::new();
    for (column, value) in &event.columns {
        js::set(
            &columns,
            column,
            &value.as_ref().map_or(JsValue::NULL, value_to_js),
        );
    }
    js::set(&obj, "columns", &columns.into());
    match &event.origin {
        Origin::Local => js::set(&obj, "origin", &"local".into()),
        Origin::Remote(peer) => {
            js::set(&obj, "origin", &"remote".into());
            js::set(&obj, "peerId", &peer.as_str().into());
        }
    }
    obj.into()
}

fn strings(def: &JsValue, name: &'static str) -> Result<Vec<String>, Error> {
    let v = get(def, name);
    if v.is_undefined() || v.is_null() {
        return Ok(Vec::new());
    }
    if !Array::is_array(&v) {
        return Err(Error::argument(
            "table definition",
            format!("{name} must be an array of column names"),
        ));
    }
    Array::from(&v)
        .iter()
        .map(|c| {
            c.as_string().ok_or_else(|| {
                Error::argument(
                    "table definition",
                    format!("{name} must be an array of column names"),
                )
            })
        })
        .collect()
}

/// A strategy from JS; `slot` names where a resolver function is kept.
fn strategy_from_js(js: &JsValue, slot: String) -> Result<Strategy, Error> {
    if let Some(f) = js.dyn_ref::<Function>() {
        return Ok(custom_strategy(slot, f.clone()));
    }
    match js.as_string().as_deref() {
        Some("lww") => Ok(Strategy::LastWriterWins),
        Some("fww") => Ok(Strategy::FirstWriterWins),
        Some("multi") => Ok(Strategy::MultiValue),
        _ => Err(Error::argument(
            "table definition",
            format!("strategy {js:?} is not \"lww\", \"fww\", \"multi\" or a function"),
        )),
    }
}

thread_local! {
    /// The JS resolver functions of custom strategies, by table and column
    /// (`"table\0column"`, or `"table\0"` for the table's default). The
    /// engine's `Resolver` must be `Send + Sync`, which a JS function is not;
    /// it holds the key instead, and the browser runs everything on one thread.
    static RESOLVERS: RefCell<BTreeMap<String, Function>> = const { RefCell::new(BTreeMap::new()) };
}

/// A JS function `(column, versions) => value` as a strategy. A throw or an
/// unusable result falls back to the latest version, logged.
fn custom_strategy(slot: String, f: Function) -> Strategy {
    RESOLVERS.with(|r| r.borrow_mut().insert(slot.clone(), f));
    Strategy::Custom(std::sync::Arc::new(
        move |column: &str, versions: &[Version]| {
            let fallback = || versions.last().map_or(Value::Null, |v| v.value.clone());
            let Some(f) = RESOLVERS.with(|r| r.borrow().get(&slot).cloned()) else {
                return fallback();
            };
            match f.call2(&JsValue::NULL, &column.into(), &versions_to_js(versions)) {
                Ok(value) => value_from_js(&value).unwrap_or_else(|e| {
                    console_error(&format!("tandem: resolver of {column:?}: {e}"), &value);
                    fallback()
                }),
                Err(e) => {
                    console_error(&format!("tandem: resolver of {column:?} threw"), &e);
                    fallback()
                }
            }
        },
    ))
}

/// A `TableDefinition` from JS.
fn schema_from_js(def: &JsValue) -> Result<TableSchema, Error> {
    if !def.is_object() {
        return Err(Error::argument(
            "table definition",
            "expected an object {name, ...}",
        ));
    }
    let Some(name) = get(def, "name").as_string().filter(|n| !n.is_empty()) else {
        return Err(Error::argument(
            "table definition",
            "name must be a non-empty string",
        ));
    };
    let mut schema = TableSchema::new(name.clone());
    let shards = get(def, "shards");
    if !shards.is_undefined() && !shards.is_null() {
        match shards.as_f64().and_then(integer) {
            Some(n) if (1..=i64::from(u32::MAX)).contains(&n) => schema = schema.shards(n as u32),
            _ => {
                return Err(Error::argument(
                    "table definition",
                    "shards must be a positive integer",
                ));
            }
        }
    }
    let strategy = get(def, "strategy");
    if !strategy.is_undefined() && !strategy.is_null() {
        schema = schema.strategy(strategy_from_js(&strategy, format!("{name}\0"))?);
    }
    for column in strings(def, "counters")? {
        schema = schema.counter(column);
    }
    for column in strings(def, "texts")? {
        schema = schema.text(column);
    }
    let columns = get(def, "columns");
    if !columns.is_undefined() && !columns.is_null() {
        if !columns.is_object() {
            return Err(Error::argument(
                "table definition",
                "columns must be {column: strategy}",
            ));
        }
        for entry in Object::entries(columns.unchecked_ref()).iter() {
            let pair = Array::from(&entry);
            let column = pair.get(0).as_string().unwrap_or_default();
            let strategy = strategy_from_js(&pair.get(1), format!("{name}\0{column}"))?;
            schema = schema.column_strategy(column, strategy);
        }
    }
    Ok(schema)
}

/// A UTF-16 offset into `text` (in bounds) in the document's text units;
/// `None` if it falls inside a surrogate pair.
fn doc_units(text: &str, utf16: usize, encoding: TextEncoding) -> Option<usize> {
    let mut units = 0;
    let mut byte = text.len();
    for (i, c) in text.char_indices() {
        if units >= utf16 {
            if units != utf16 {
                return None;
            }
            byte = i;
            break;
        }
        units += c.len_utf16();
    }
    if units < utf16 {
        return None;
    }
    let prefix = &text[..byte];
    Some(match encoding {
        TextEncoding::Utf16CodeUnit => utf16,
        TextEncoding::Utf8CodeUnit => prefix.len(),
        _ => prefix.chars().count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf16_offsets_map_to_document_units() {
        let text = "a😀b";
        assert_eq!(doc_units(text, 0, TextEncoding::UnicodeCodePoint), Some(0));
        assert_eq!(doc_units(text, 1, TextEncoding::UnicodeCodePoint), Some(1));
        assert_eq!(doc_units(text, 2, TextEncoding::UnicodeCodePoint), None);
        assert_eq!(doc_units(text, 3, TextEncoding::UnicodeCodePoint), Some(2));
        assert_eq!(doc_units(text, 4, TextEncoding::UnicodeCodePoint), Some(3));
        assert_eq!(doc_units(text, 4, TextEncoding::Utf8CodeUnit), Some(6));
        assert_eq!(doc_units(text, 4, TextEncoding::Utf16CodeUnit), Some(4));
        assert_eq!(doc_units("", 0, TextEncoding::UnicodeCodePoint), Some(0));
    }
}
