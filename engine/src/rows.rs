//! The row layer: tables, rows, deletes and conflict strategies over CRDT
//! documents, named after the data-synchronization patterns they implement
//! (docs/patterns.md maps every term to this API).
//!
//! - A **row** is an automerge document whose id is derived from (table,
//!   primary key), so the same key inserted on two offline replicas is one
//!   row whose columns merge, not two rows.
//! - A **register** column holds one [`Value`] per write, stamped with a
//!   hybrid-logical-clock [`Timestamp`]; concurrent writes are kept side by
//!   side and a table's [`Strategy`] picks the value: last writer wins, first
//!   writer wins, all values kept until the application resolves them, or a
//!   custom resolver. Every replica picks the same winner.
//! - **Counter** and **text** columns are CRDTs of their own: concurrent
//!   increments add up, concurrent edits interleave.
//! - **Delete flags**: [`Table::delete`] marks the row deleted with a
//!   timestamp. Reads and scans skip it. A delete wins over updates
//!   concurrent with it (an update never clears the flag); an insert made
//!   after the delete was seen revives the row, with only the inserted values.
//! - **Discovery**: each table has catalog documents (sharded) listing its
//!   keys, so a replica that syncs the table learns every row.
//! - **Change data capture**: [`Rows::changes`] turns the durable change feed
//!   into [`RowEvent`]s (insert, update, delete, conflict) from a cursor.
//! - **Replication links** ([`SyncLink`]) record their last synchronization
//!   point and send only what changed since; **cleanup** ([`Rows::cleanup`])
//!   purges deleted rows every known replica has acknowledged.
//!
//! ```
//! use tandem_engine::{MemoryStorage, PeerId, Repo, RepoConfig, ShareAll};
//! use tandem_engine::rows::{Rows, TableSchema, Value};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let repo = Repo::open(MemoryStorage::new(), RepoConfig::new(PeerId::new("laptop")), ShareAll)?;
//! let mut rows = Rows::new(repo, || 1_700_000_000_000);
//! rows.define(TableSchema::new("tasks").counter("votes").text("notes"));
//! let mut tasks = rows.table("tasks");
//! tasks.insert("t1", [("title", Value::from("buy milk")), ("done", false.into())])?;
//! tasks.increment("t1", "votes", 2)?;
//! tasks.update("t1", [("done", Value::from(true))])?;
//! let row = tasks.get("t1")?.expect("inserted");
//! assert_eq!(row.get("done"), Some(&Value::Bool(true)));
//! assert_eq!(row.get("votes"), Some(&Value::Int(2)));
//! rows.flush()?; // durable
//! # Ok(()) }
//! ```

mod catalog;
mod cleanup;
mod document;
mod feed;
mod hlc;
mod link;
mod schema;
mod value;

use std::borrow::BorrowMut;
use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::sync::Arc;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjType, ROOT, ReadDoc};

pub use self::cleanup::CleanupReport;
use self::document::At;
pub use self::feed::{RowChange, RowEvent, Watch};
pub use self::hlc::{HybridClock, ParseTimestampError, Timestamp};
pub use self::link::{LinkRun, SyncLink, SyncPoint};
pub use self::schema::{ColumnKind, Resolver, Strategy, TableSchema, Version};
pub use self::value::Value;
use crate::error::{RepoError, RowError};
use crate::storage::Storage;
use crate::{DocumentId, FlushReport, Repo};

/// A row as the application reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Its primary key.
    pub key: String,
    values: BTreeMap<String, Value>,
    conflicts: BTreeMap<String, Vec<Version>>,
    /// Counter and text columns, as stored (the rest are registers).
    kinds: BTreeMap<String, ColumnKind>,
}

impl Row {
    /// A column's value: the register's resolved value, a counter's total,
    /// a text column's text. `None` for an absent column, and for a
    /// multi-value register in conflict (see [`conflict`](Self::conflict)).
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.values.get(column)
    }

    /// Every column with a value.
    pub fn values(&self) -> &BTreeMap<String, Value> {
        &self.values
    }

    /// The concurrent versions of a register column that has more than one
    /// (whatever its strategy), oldest first.
    pub fn conflict(&self, column: &str) -> Option<&[Version]> {
        self.conflicts.get(column).map(Vec::as_slice)
    }

    /// A column's kind as stored in the row's document (registers unless
    /// the document holds a counter or a text object there).
    pub fn kind(&self, column: &str) -> ColumnKind {
        self.kinds
            .get(column)
            .copied()
            .unwrap_or(ColumnKind::Register)
    }

    /// Every register column with concurrent versions.
    pub fn conflicts(&self) -> &BTreeMap<String, Vec<Version>> {
        &self.conflicts
    }
}

/// A store of tables over a [`Repo`]. It usually owns the repo (network
/// drivers reach it through [`repo_mut`](Self::repo_mut)); `R` may also be a
/// `&mut Repo<S>`, to work on a repo owned elsewhere (the browser driver).
pub struct Rows<S: Storage, R: BorrowMut<Repo<S>> = Repo<S>> {
    repo: R,
    _storage: PhantomData<fn() -> S>,
    schemas: HashMap<String, Arc<TableSchema>>,
    clock: HybridClock,
    now: Box<dyn FnMut() -> u64 + Send>,
    replica: String,
    /// Catalog shards read into memory, so locating a key does not search
    /// the catalog document each time.
    catalogs: HashMap<DocumentId, ShardIndex>,
}

/// A catalog shard's entries as of `heads`. It is used only while the
/// document is still at `heads`; the row layer's own listings keep it
/// there. After another change (a catalog synced in), lookups search the
/// document again until enough of them have been made to pay for reading
/// the whole shard once more.
#[derive(Default)]
struct ShardIndex {
    heads: Option<Vec<automerge::ChangeHash>>,
    entries: HashMap<String, u64>,
    lookups_since_stale: usize,
}

impl<S: Storage, R: BorrowMut<Repo<S>>> std::fmt::Debug for Rows<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rows")
            .field("repo", self.repo.borrow())
            .field("tables", &self.schemas.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<S: Storage, R: BorrowMut<Repo<S>>> Rows<S, R> {
    /// Tables over `repo`, reading wall-clock milliseconds from `now` (the
    /// engine reads no clock itself; tests pass a fake one).
    pub fn new(repo: R, now: impl FnMut() -> u64 + Send + 'static) -> Self {
        let replica = repo.borrow().storage_id().as_str().to_owned();
        Self {
            repo,
            _storage: PhantomData,
            schemas: HashMap::new(),
            clock: HybridClock::default(),
            now: Box::new(now),
            replica,
            catalogs: HashMap::new(),
        }
    }

    /// Tables over `repo` with the system clock.
    #[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
    pub fn with_system_clock(repo: R) -> Self {
        Self::new(repo, || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        })
    }

    /// Declare a table's schema (column kinds, strategies). A table used
    /// without a declaration has register columns and last writer wins.
    pub fn define(&mut self, schema: TableSchema) {
        self.schemas.insert(schema.name.clone(), Arc::new(schema));
    }

    /// The schema of a table.
    pub fn schema(&self, table: &str) -> Arc<TableSchema> {
        self.schemas
            .get(table)
            .cloned()
            .unwrap_or_else(|| Arc::new(TableSchema::new(table)))
    }

    /// The replica id timestamps carry (this store's storage id).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The repo underneath.
    pub fn repo(&self) -> &Repo<S> {
        self.repo.borrow()
    }

    /// The repo underneath, for network drivers.
    pub fn repo_mut(&mut self) -> &mut Repo<S> {
        self.repo.borrow_mut()
    }

    /// Give the repo back.
    pub fn into_repo(self) -> R {
        self.repo
    }

    /// Make every change so far durable (the repo's group commit).
    pub fn flush(&mut self) -> Result<FlushReport, RowError> {
        Ok(self.repo_mut().flush()?)
    }

    /// A handle on one table.
    pub fn table(&mut self, name: &str) -> Table<'_, S, R> {
        let schema = self.schema(name);
        Table { rows: self, schema }
    }

    /// Ask connected peers for a table's catalogs (to learn its rows); call
    /// [`discover`](Self::discover) as they arrive to fetch the rows.
    pub fn subscribe(&mut self, table: &str) -> Result<(), RowError> {
        let schema = self.schema(table);
        for shard in 0..schema.shards {
            let id = catalog::shard_id(table, shard);
            match self.repo_mut().request(id) {
                Ok(()) | Err(RepoError::Purged(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Request every row the table's catalogs list that this store does not
    /// have yet. Returns how many were requested.
    pub fn discover(&mut self, table: &str) -> Result<usize, RowError> {
        let entries = self.catalog_entries(table)?;
        self.request_missing(table, entries)
    }

    /// If `document` is a catalog of a table, request the rows it lists that
    /// this store lacks (call it when a document arrives: cheaper than
    /// [`discover`](Self::discover), which reads every catalog of a table).
    /// Returns the table and how many rows were requested.
    pub fn discover_catalog(
        &mut self,
        document: &DocumentId,
    ) -> Result<Option<(String, usize)>, RowError> {
        if !self.repo_mut().contains(document)? {
            return Ok(None);
        }
        let (table, entries) = self.repo_mut().view(document, |d| {
            let st = document::state(d, &At(None));
            match (st.table, st.key, catalog::rows_map(d)) {
                (Some(t), None, Some(_)) => (Some(t), catalog::entries(d)),
                _ => (None, Vec::new()),
            }
        })?;
        let Some(table) = table else {
            return Ok(None);
        };
        let requested = self.request_missing(&table, entries)?;
        Ok(Some((table, requested)))
    }

    /// Request the listed rows that this store has no history of.
    fn request_missing(
        &mut self,
        table: &str,
        entries: Vec<(String, u64)>,
    ) -> Result<usize, RowError> {
        let mut requested = 0;
        for (key, generation) in entries {
            let id = document::row_id(table, &key, generation);
            let empty = !self.repo_mut().contains(&id)?
                || self.repo_mut().view(&id, |d| d.get_heads().is_empty())?;
            if empty && self.repo_mut().purge_marker(&id)?.is_none() {
                self.repo_mut().request(id)?;
                requested += 1;
            }
        }
        Ok(requested)
    }

    /// The tables this store holds catalogs of, with their shard counts, by
    /// reading every stored document (for tools such as `tandem export`;
    /// applications know their tables).
    pub fn stored_tables(&mut self) -> Result<BTreeMap<String, u32>, RowError> {
        let mut out = BTreeMap::new();
        for id in self.repo_mut().document_ids()? {
            if let Some((table, shards)) = self.repo_mut().view(&id, catalog::identity)? {
                out.insert(table, shards);
            }
        }
        Ok(out)
    }

    /// Every (key, generation) the table's catalogs list, sorted by key.
    fn catalog_entries(&mut self, table: &str) -> Result<Vec<(String, u64)>, RowError> {
        let schema = self.schema(table);
        let mut out = Vec::new();
        for shard in 0..schema.shards {
            let id = catalog::shard_id(table, shard);
            if self.repo_mut().contains(&id)? {
                out.extend(self.repo_mut().view(&id, catalog::entries)?);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The row document of a key and its catalog shard.
    fn locate(&mut self, schema: &TableSchema, key: &str) -> Result<(DocumentId, u64), RowError> {
        let shard = catalog::shard_of(&schema.name, key, schema.shards);
        let catalog_id = catalog::shard_id(&schema.name, shard);
        let generation = self.listed(&catalog_id, key)?.unwrap_or(0);
        Ok((document::row_id(&schema.name, key, generation), generation))
    }

    /// The generation the catalog `catalog_id` lists `key` at.
    fn listed(&mut self, catalog_id: &DocumentId, key: &str) -> Result<Option<u64>, RowError> {
        if !self.repo_mut().contains(catalog_id)? {
            self.catalogs.remove(catalog_id);
            return Ok(None);
        }
        let heads = self.repo_mut().view(catalog_id, |d| d.get_heads())?;
        let index = self.catalogs.entry(*catalog_id).or_default();
        if index.heads.as_ref() == Some(&heads) {
            return Ok(index.entries.get(key).copied());
        }
        // Reading the whole shard costs about as much as 32 single lookups
        // per 1,000 entries (and a fresh `Rows` may make only one lookup).
        index.lookups_since_stale += 1;
        if index.lookups_since_stale * 32 < index.entries.len().max(64) {
            return Ok(self
                .repo_mut()
                .view(catalog_id, |d| catalog::generation(d, key))?);
        }
        let entries = self.repo_mut().view(catalog_id, catalog::entries)?;
        let index = self.catalogs.entry(*catalog_id).or_default();
        index.entries = entries.into_iter().collect();
        index.heads = Some(heads);
        index.lookups_since_stale = 0;
        Ok(index.entries.get(key).copied())
    }

    /// List `entries` (key, generation) in the table's catalogs: one
    /// catalog change per shard touched, whatever the number of keys.
    fn list_in_catalog(
        &mut self,
        schema: &TableSchema,
        entries: &[(String, u64)],
    ) -> Result<(), RowError> {
        let mut by_shard: BTreeMap<u32, Vec<&(String, u64)>> = BTreeMap::new();
        for entry in entries {
            let shard = catalog::shard_of(&schema.name, &entry.0, schema.shards);
            by_shard.entry(shard).or_default().push(entry);
        }
        for (shard, entries) in by_shard {
            self.list_in_shard(schema, shard, &entries)?;
        }
        Ok(())
    }

    fn list_in_shard(
        &mut self,
        schema: &TableSchema,
        shard: u32,
        entries: &[&(String, u64)],
    ) -> Result<(), RowError> {
        let id = catalog::shard_id(&schema.name, shard);
        if !self.repo_mut().contains(&id)? {
            self.repo_mut().create_with_id(id)?;
        }
        let before = self.repo_mut().view(&id, |d| d.get_heads())?;
        let index = self
            .catalogs
            .get(&id)
            .filter(|i| i.heads.as_ref() == Some(&before));
        let fresh = index.is_some();
        // A fresh index knows which keys are listed at which generation.
        let todo: Vec<&(String, u64)> = entries
            .iter()
            .copied()
            .filter(|(key, generation)| {
                index.is_none_or(|i| i.entries.get(key) != Some(generation))
            })
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        self.repo_mut().change(&id, |d| {
            // A stale index: ask the catalog itself (its maps read once).
            let maps = if fresh {
                Vec::new()
            } else {
                catalog::listing_maps(d)
            };
            let missing: Vec<&(String, u64)> = todo
                .iter()
                .copied()
                .filter(|(key, generation)| {
                    fresh || catalog::generation_among(d, &maps, key) != Some(*generation)
                })
                .collect();
            if missing.len() >= catalog::PAGE_MIN {
                return catalog::put_page(d, &schema.name, shard, schema.shards, &missing);
            }
            for (key, generation) in missing {
                catalog::put(d, &schema.name, shard, schema.shards, key, *generation)?;
            }
            Ok(())
        })?;
        if fresh {
            let after = self.repo_mut().view(&id, |d| d.get_heads())?;
            let index = self.catalogs.get_mut(&id).expect("fresh");
            for (key, generation) in todo {
                index.entries.insert(key.clone(), *generation);
            }
            index.heads = Some(after);
        }
        Ok(())
    }

    fn tick(&mut self, seen: Option<&Timestamp>) -> Timestamp {
        let now = (self.now)();
        self.clock.tick(now, seen, &self.replica)
    }
}

/// What a write does to a row that is absent or deleted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Insert,
    Upsert,
    Update,
}

/// One table of a [`Rows`] store.
pub struct Table<'a, S: Storage, R: BorrowMut<Repo<S>> = Repo<S>> {
    rows: &'a mut Rows<S, R>,
    schema: Arc<TableSchema>,
}

impl<S: Storage, R: BorrowMut<Repo<S>>> std::fmt::Debug for Table<'_, S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl<S: Storage, R: BorrowMut<Repo<S>>> Table<'_, S, R> {
    /// The table's schema.
    pub fn schema(&self) -> &TableSchema {
        &self.schema
    }

    /// Insert a row. Fails with [`RowError::AlreadyExists`] if the key has a
    /// live row here; revives a deleted one (with only these values).
    pub fn insert<C: Into<String>>(
        &mut self,
        key: &str,
        columns: impl IntoIterator<Item = (C, Value)>,
    ) -> Result<(), RowError> {
        self.write(key, collect(columns), Mode::Insert)
    }

    /// Insert the row, or update these columns if it exists.
    pub fn upsert<C: Into<String>>(
        &mut self,
        key: &str,
        columns: impl IntoIterator<Item = (C, Value)>,
    ) -> Result<(), RowError> {
        self.write(key, collect(columns), Mode::Upsert)
    }

    /// Insert many rows, `(key, columns)` each, as [`insert`](Self::insert)
    /// would one by one, but listing the new rows in the table's catalog
    /// with one change per catalog shard instead of one per row: the way
    /// to load rows in bulk. Returns how many rows were inserted. On an
    /// error (for example [`RowError::AlreadyExists`]) the rows before the
    /// failing one are inserted and listed, the rest are not.
    pub fn insert_many<K: AsRef<str>, C: Into<String>, I: IntoIterator<Item = (C, Value)>>(
        &mut self,
        rows: impl IntoIterator<Item = (K, I)>,
    ) -> Result<usize, RowError> {
        self.write_many(rows, Mode::Insert)
    }

    /// [`upsert`](Self::upsert) for many rows, with the catalog listing of
    /// [`insert_many`](Self::insert_many).
    pub fn upsert_many<K: AsRef<str>, C: Into<String>, I: IntoIterator<Item = (C, Value)>>(
        &mut self,
        rows: impl IntoIterator<Item = (K, I)>,
    ) -> Result<usize, RowError> {
        self.write_many(rows, Mode::Upsert)
    }

    /// Set some columns of an existing row ([`RowError::NotFound`] if there
    /// is no live row). Writing a multi-value register resolves its conflict.
    pub fn update<C: Into<String>>(
        &mut self,
        key: &str,
        columns: impl IntoIterator<Item = (C, Value)>,
    ) -> Result<(), RowError> {
        self.write(key, collect(columns), Mode::Update)
    }

    /// Flag the row deleted.
    pub fn delete(&mut self, key: &str) -> Result<(), RowError> {
        let id = self.live(key)?;
        let seen = self.rows.repo_mut().view(&id, |d| {
            document::latest_timestamp(d, &document::state(d, &At(None)), None)
        })?;
        let ts = self.rows.tick(seen.as_ref());
        self.rows
            .repo_mut()
            .change_with(&id, document::stamped(&ts), document::put_deleted)?;
        Ok(())
    }

    /// Add `by` to a counter column.
    pub fn increment(&mut self, key: &str, column: &str, by: i64) -> Result<(), RowError> {
        self.expect_kind(column, ColumnKind::Counter)?;
        let id = self.live(key)?;
        let schema = self.schema.clone();
        self.rows.repo_mut().change(&id, |d| {
            ensure_columns(d, &id, &schema)?;
            d.increment(ROOT, column, by)
        })?;
        Ok(())
    }

    /// Edit a text column: delete `delete` characters at `index`, insert `text`.
    pub fn splice_text(
        &mut self,
        key: &str,
        column: &str,
        index: usize,
        delete: isize,
        text: &str,
    ) -> Result<(), RowError> {
        self.expect_kind(column, ColumnKind::Text)?;
        let id = self.live(key)?;
        let schema = self.schema.clone();
        self.rows.repo_mut().change(&id, |d| {
            ensure_columns(d, &id, &schema)?;
            let obj = text_obj(d, column)?;
            d.splice_text(&obj, index, delete, text)
        })?;
        Ok(())
    }

    /// The live row with this key.
    pub fn get(&mut self, key: &str) -> Result<Option<Row>, RowError> {
        let (id, _) = self.rows.locate(&self.schema, key)?;
        if !self.rows.repo_mut().contains(&id)? {
            return Ok(None);
        }
        let schema = self.schema.clone();
        Ok(self
            .rows
            .repo_mut()
            .view(&id, |d| document::read(d, &At(None), &schema))?)
    }

    /// Every live row, in key order (rows listed in the catalog but not yet
    /// synced here are skipped).
    pub fn scan(&mut self) -> Result<Vec<Row>, RowError> {
        let name = self.schema.name.clone();
        let entries = self.rows.catalog_entries(&name)?;
        let mut out = Vec::with_capacity(entries.len());
        for (key, generation) in entries {
            let id = document::row_id(&name, &key, generation);
            if !self.rows.repo_mut().contains(&id)? {
                continue;
            }
            let schema = self.schema.clone();
            if let Some(row) = self
                .rows
                .repo_mut()
                .view(&id, |d| document::read(d, &At(None), &schema))?
            {
                out.push(row);
            }
        }
        Ok(out)
    }

    /// Every concurrent version of a register column of a live row, oldest
    /// first (one version when there is no conflict); empty if the row or
    /// column is absent.
    pub fn versions(&mut self, key: &str, column: &str) -> Result<Vec<Version>, RowError> {
        let Ok(id) = self.live(key) else {
            return Ok(Vec::new());
        };
        Ok(self
            .rows
            .repo_mut()
            .view(&id, |d| document::versions(d, &At(None), column))?)
    }

    /// The document holding a key's row (any automerge client can read it).
    pub fn document_id(&mut self, key: &str) -> Result<DocumentId, RowError> {
        Ok(self.rows.locate(&self.schema, key)?.0)
    }

    fn expect_kind(&self, column: &str, kind: ColumnKind) -> Result<(), RowError> {
        let found = self.schema.kind(column);
        if found == kind {
            Ok(())
        } else {
            Err(RowError::WrongColumnKind {
                table: self.schema.name.clone(),
                column: column.to_owned(),
                expected: kind,
                found,
            })
        }
    }

    fn not_found(&self, key: &str) -> RowError {
        RowError::NotFound {
            table: self.schema.name.clone(),
            key: key.to_owned(),
        }
    }

    /// The document of a live row, or `NotFound`.
    fn live(&mut self, key: &str) -> Result<DocumentId, RowError> {
        let (id, _) = self.rows.locate(&self.schema, key)?;
        if !self.rows.repo_mut().contains(&id)? {
            return Err(self.not_found(key));
        }
        if self
            .rows
            .repo_mut()
            .view(&id, |d| document::state(d, &At(None)).live())?
        {
            Ok(id)
        } else {
            Err(self.not_found(key))
        }
    }

    /// Write one row and list it in the catalog if it was absent or deleted.
    fn write(
        &mut self,
        key: &str,
        columns: Vec<(String, Value)>,
        mode: Mode,
    ) -> Result<(), RowError> {
        if let Some(generation) = self.write_row(key, columns, mode)? {
            let schema = self.schema.clone();
            self.rows
                .list_in_catalog(&schema, &[(key.to_owned(), generation)])?;
        }
        Ok(())
    }

    /// Write many rows, then list the new ones in one catalog change per
    /// shard. On an error, the rows written before it stay written (and
    /// listed), as with one call per row.
    fn write_many<K: AsRef<str>, C: Into<String>, I: IntoIterator<Item = (C, Value)>>(
        &mut self,
        rows: impl IntoIterator<Item = (K, I)>,
        mode: Mode,
    ) -> Result<usize, RowError> {
        let mut written = 0;
        let mut listings = Vec::new();
        let mut result = Ok(());
        for (key, columns) in rows {
            let key = key.as_ref();
            match self.write_row(key, collect(columns), mode) {
                Ok(listing) => {
                    written += 1;
                    if let Some(generation) = listing {
                        listings.push((key.to_owned(), generation));
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let schema = self.schema.clone();
        self.rows.list_in_catalog(&schema, &listings)?;
        result.map(|()| written)
    }

    /// Write one row; the generation to list it at if it was absent or
    /// deleted (the caller lists it before handing control back).
    fn write_row(
        &mut self,
        key: &str,
        columns: Vec<(String, Value)>,
        mode: Mode,
    ) -> Result<Option<u64>, RowError> {
        for (c, v) in &columns {
            self.check_column(c, v)?;
        }
        let schema = self.schema.clone();
        let (id, generation) = self.rows.locate(&schema, key)?;
        let written: Vec<&str> = columns.iter().map(|(c, _)| c.as_str()).collect();
        let found = self.rows.repo_mut().view_if_present(&id, |d| {
            let st = document::state(d, &At(None));
            (
                st.live(),
                document::latest_timestamp(d, &st, Some(&written)),
            )
        })?;
        let exists = found.is_some();
        let (live, seen) = found.unwrap_or((false, None));
        let revive = match (mode, live) {
            (Mode::Insert, true) => {
                return Err(RowError::AlreadyExists {
                    table: schema.name.clone(),
                    key: key.to_owned(),
                });
            }
            (Mode::Update, false) => return Err(self.not_found(key)),
            (Mode::Update | Mode::Upsert, true) => false,
            (Mode::Insert | Mode::Upsert, false) => true,
        };
        let ts = self.rows.tick(seen.as_ref());
        let write = |d: &mut AutoCommit| {
            ensure_columns(d, &id, &schema)?;
            if !exists && document::init_new_row(d, &schema, key, &columns)? {
                return Ok(());
            }
            if revive {
                clear(d, &schema)?;
                if d.get(ROOT, document::TABLE)?.is_none() {
                    d.put(ROOT, document::TABLE, schema.name.as_str())?;
                    d.put(ROOT, document::KEY, key)?;
                }
            }
            for (column, value) in &columns {
                write_column(d, &schema, column, value)?;
            }
            Ok(())
        };
        let repo = self.rows.repo_mut();
        let written = if exists {
            repo.change_with(&id, document::stamped(&ts), write)
        } else {
            let first = |actor: &_| document::new_row_change(actor, &schema, key, &columns, &ts);
            match repo.create_absent_from_change(id, first) {
                Ok(true) => Ok(()),
                Ok(false) => repo.create_absent_with(id, document::stamped(&ts), write),
                Err(e) => Err(e),
            }
        };
        match written {
            Ok(()) => {}
            Err(RepoError::Purged(_)) => {
                return Err(RowError::Purged {
                    table: schema.name.clone(),
                    key: key.to_owned(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        Ok(revive.then_some(generation))
    }

    fn check_column(&self, column: &str, value: &Value) -> Result<(), RowError> {
        if column.is_empty() || column.starts_with('_') {
            return Err(RowError::InvalidColumn {
                column: column.to_owned(),
                reason: "column names must be non-empty and not start with '_' (reserved)".into(),
            });
        }
        let ok = match self.schema.kind(column) {
            ColumnKind::Register => true,
            ColumnKind::Counter => matches!(value, Value::Int(_)),
            ColumnKind::Text => matches!(value, Value::String(_)),
        };
        if ok {
            Ok(())
        } else {
            Err(RowError::InvalidColumn {
                column: column.to_owned(),
                reason: format!(
                    "a {:?} column takes {}, not {value}",
                    self.schema.kind(column),
                    if self.schema.kind(column) == ColumnKind::Counter {
                        "an integer"
                    } else {
                        "a string"
                    }
                ),
            })
        }
    }
}

fn collect<C: Into<String>>(columns: impl IntoIterator<Item = (C, Value)>) -> Vec<(String, Value)> {
    columns.into_iter().map(|(c, v)| (c.into(), v)).collect()
}

/// Create the schema's counter and text columns the document lacks.
fn ensure_columns(
    d: &mut AutoCommit,
    id: &DocumentId,
    schema: &TableSchema,
) -> Result<(), automerge::AutomergeError> {
    let missing = document::missing_columns(d, id, schema);
    if !missing.is_empty() {
        d.apply_changes(missing)?;
    }
    Ok(())
}

fn text_obj(d: &AutoCommit, column: &str) -> Result<automerge::ObjId, automerge::AutomergeError> {
    match d.get(ROOT, column)? {
        Some((automerge::Value::Object(ObjType::Text), obj)) => Ok(obj),
        _ => Err(automerge::AutomergeError::InvalidOp(ObjType::Text)),
    }
}

/// Revive: remove the delete flag and every earlier value.
fn clear(d: &mut AutoCommit, schema: &TableSchema) -> Result<(), automerge::AutomergeError> {
    if d.get(ROOT, document::DELETED)?.is_some() {
        d.delete(ROOT, document::DELETED)?;
    }
    for column in document::columns(d, &At(None)) {
        match schema.kind(&column) {
            ColumnKind::Register => d.delete(ROOT, column.as_str())?,
            ColumnKind::Counter => {
                let total = match d.get(ROOT, column.as_str())? {
                    Some((automerge::Value::Scalar(s), _)) => {
                        Value::from_scalar(&s).and_then(|v| v.as_int()).unwrap_or(0)
                    }
                    _ => 0,
                };
                if total != 0 {
                    d.increment(ROOT, column.as_str(), -total)?;
                }
            }
            ColumnKind::Text => {
                let obj = text_obj(d, &column)?;
                d.update_text(&obj, "")?;
            }
        }
    }
    Ok(())
}

fn write_column(
    d: &mut AutoCommit,
    schema: &TableSchema,
    column: &str,
    value: &Value,
) -> Result<(), automerge::AutomergeError> {
    match (schema.kind(column), value) {
        (ColumnKind::Counter, Value::Int(target)) => {
            let total = match d.get(ROOT, column)? {
                Some((automerge::Value::Scalar(s), _)) => {
                    Value::from_scalar(&s).and_then(|v| v.as_int()).unwrap_or(0)
                }
                _ => 0,
            };
            if *target != total {
                d.increment(ROOT, column, target - total)?;
            }
            Ok(())
        }
        (ColumnKind::Text, Value::String(text)) => {
            let obj = text_obj(d, column)?;
            d.update_text(&obj, text.as_str())
        }
        _ => document::put_register(d, column, value),
    }
}
