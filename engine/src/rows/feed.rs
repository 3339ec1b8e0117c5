//! Change data capture for rows: the durable change feed, read as row events.

use std::borrow::BorrowMut;

use crate::Repo;
use std::collections::{BTreeMap, BTreeSet};

use automerge::ReadDoc;

use super::document::{self, At};
use super::{Rows, Value, Version};
use crate::error::{RepoError, RowError};
use crate::feed::{Cursor, FeedEvent, Origin};
use crate::storage::Storage;

/// What happened to a row.
#[derive(Clone, Debug, PartialEq)]
pub enum RowChange {
    /// The row appeared (first insert, or revived after a delete).
    Inserted,
    /// Some columns changed.
    Updated,
    /// The row was flagged deleted.
    Deleted,
    /// A register has concurrent versions after this commit; `resolved` is
    /// the value the column's strategy picked (`None` for multi-value, which
    /// waits for the application). Emitted for every automatic resolution.
    Conflict {
        /// The column.
        column: String,
        /// The competing versions, oldest first.
        versions: Vec<Version>,
        /// The value in force.
        resolved: Option<Value>,
    },
}

/// One row-level change, from the change feed.
#[derive(Clone, Debug, PartialEq)]
pub struct RowEvent {
    /// The feed sequence number of the commit (resume after it).
    pub seq: u64,
    /// The table.
    pub table: String,
    /// The row's key.
    pub key: String,
    /// What happened.
    pub change: RowChange,
    /// For inserts and updates: the changed columns and their values after
    /// the commit (`None`: the column was removed, or is an unresolved
    /// multi-value register).
    pub columns: BTreeMap<String, Option<Value>>,
    /// Who made the change.
    pub origin: Origin,
}

/// A live view of one table's changes: each [`poll`](Watch::poll) returns
/// the row events committed since the previous one (durable commits only:
/// call it after a flush).
#[derive(Clone, Debug)]
pub struct Watch {
    table: String,
    cursor: Cursor,
}

impl Watch {
    /// The row events of the table since the last poll.
    pub fn poll<S: Storage, R: BorrowMut<Repo<S>>>(
        &mut self,
        rows: &mut Rows<S, R>,
    ) -> Result<Vec<RowEvent>, RowError> {
        let mut out = Vec::new();
        loop {
            let (events, next) = rows.changes(self.cursor, 1024)?;
            out.extend(events.into_iter().filter(|e| e.table == self.table));
            if next == self.cursor {
                return Ok(out);
            }
            self.cursor = next;
        }
    }

    /// Where the watch will resume.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }
}

impl<S: Storage, R: BorrowMut<Repo<S>>> Rows<S, R> {
    /// The (table, key) of a row this store purged.
    fn purged_row(&self, id: &crate::DocumentId) -> Result<Option<(String, String)>, RowError> {
        let Some(marker) = self.repo().purge_marker(id)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&marker);
        let mut parts = text.split('\0');
        Ok(match (parts.next(), parts.next()) {
            (Some(t), Some(k)) => Some((t.to_owned(), k.to_owned())),
            _ => None,
        })
    }

    /// Watch a table from now on (see [`Watch`]).
    pub fn watch(&mut self, table: &str) -> Result<Watch, RowError> {
        Ok(Watch {
            table: table.to_owned(),
            cursor: Cursor(self.repo_mut().feed().last_seq()?),
        })
    }

    /// Row events of up to `limit` feed entries after `after`, and the cursor
    /// to resume from (save it once the events are processed; processing an
    /// event twice must be harmless, as upserts and deletes by key are).
    pub fn changes(
        &mut self,
        after: Cursor,
        limit: usize,
    ) -> Result<(Vec<RowEvent>, Cursor), RowError> {
        let entries = self.repo_mut().feed().read(after, limit)?;
        let next = entries.last().map_or(after, |e| Cursor(e.seq));
        let mut out = Vec::new();
        for entry in &entries {
            out.extend(self.row_events(entry)?);
        }
        Ok((out, next))
    }

    /// The row events of one feed entry (none if it is not a row document,
    /// or the document is gone).
    pub fn row_events(&mut self, entry: &FeedEvent) -> Result<Vec<RowEvent>, RowError> {
        let id = entry.document;
        if !self.repo_mut().contains(&id)? {
            // A purged row: whatever this entry was, the row ends deleted, so
            // a consumer behind the purge still learns of the delete (and
            // repeated deletes by key are harmless to it).
            return Ok(self.purged_row(&id)?.map_or_else(Vec::new, |(table, key)| {
                vec![RowEvent {
                    seq: entry.seq,
                    table,
                    key,
                    change: RowChange::Deleted,
                    columns: BTreeMap::new(),
                    origin: entry.origin.clone(),
                }]
            }));
        }
        let table = match self
            .repo_mut()
            .view(&id, |d| document::state(d, &At(Some(&entry.heads))).table)
        {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(Vec::new()),
            Err(RepoError::Quarantined { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let schema = self.schema(&table);
        let events = self.repo_mut().view(&id, |d| {
            // Reading at past heads recomputes automerge's clock for them;
            // a consumer that keeps up reads the current state instead.
            let current = d.get_heads() == entry.heads;
            let after = At((!current).then_some(entry.heads.as_slice()));
            let st_after = document::state(d, &after);
            let Some(key) = st_after.key.clone() else {
                return Vec::new(); // a catalog document
            };
            // Heads this document does not know (an old feed entry after a
            // purge and re-creation) read as an empty row.
            if entry
                .heads
                .iter()
                .any(|h| d.get_change_by_hash(h).is_none())
                || entry
                    .before
                    .iter()
                    .any(|h| d.get_change_by_hash(h).is_none())
            {
                return Vec::new();
            }
            let before = At(Some(&entry.before));
            let was_live = !entry.before.is_empty() && document::state(d, &before).live();
            let is_live = st_after.live();
            let change = match (was_live, is_live) {
                (false, true) => RowChange::Inserted,
                (true, true) => RowChange::Updated,
                (true, false) => RowChange::Deleted,
                (false, false) => return Vec::new(),
            };
            // Compare each column's value and versions before and after
            // (rather than automerge's patch diff, which would also pull
            // the patch machinery into the browser build).
            let changed: BTreeSet<String> = if change == RowChange::Inserted {
                document::columns(d, &after).into_iter().collect()
            } else {
                let mut all: BTreeSet<String> = document::columns(d, &after).into_iter().collect();
                all.extend(document::columns(d, &before));
                all.into_iter()
                    .filter(|c| {
                        document::cell(d, &before, &schema, c)
                            != document::cell(d, &after, &schema, c)
                    })
                    .collect()
            };
            let base = |change| RowEvent {
                seq: entry.seq,
                table: table.clone(),
                key: key.clone(),
                change,
                columns: BTreeMap::new(),
                origin: entry.origin.clone(),
            };
            let mut events = Vec::new();
            let mut main = base(change.clone());
            let mut conflicts = Vec::new();
            if change != RowChange::Deleted {
                for column in &changed {
                    let (value, versions) = document::cell(d, &after, &schema, column);
                    if versions.len() > 1 {
                        conflicts.push(base(RowChange::Conflict {
                            column: column.clone(),
                            versions,
                            resolved: value.clone(),
                        }));
                    }
                    main.columns.insert(column.clone(), value);
                }
            }
            events.push(main);
            events.extend(conflicts);
            events
        })?;
        Ok(events)
    }
}
