//! What a table is: its columns' kinds and its conflict strategies.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::{Timestamp, Value};

/// The kind of a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ColumnKind {
    /// A register: one value per write, concurrent writes resolved by the
    /// column's [`Strategy`]. Columns not declared in the schema are registers.
    Register,
    /// A counter: concurrent increments add up.
    Counter,
    /// Collaborative text: concurrent edits interleave, none is lost.
    Text,
}

/// One concurrent write of a register: a version of its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Version {
    /// The value written.
    pub value: Value,
    /// When, by whom.
    pub at: Timestamp,
}

/// Picks the value of a register from its concurrent versions (at least two,
/// ordered by timestamp). It must be a pure function of its inputs, so every
/// replica picks the same value.
pub type Resolver = Arc<dyn Fn(&str, &[Version]) -> Value + Send + Sync>;

/// How concurrent writes to one register are resolved. Writes that causally
/// follow each other are never in conflict: the later one replaces the
/// earlier, whatever the strategy.
#[derive(Clone, Default)]
pub enum Strategy {
    /// Last Commit Wins: the version with the latest timestamp.
    #[default]
    LastWriterWins,
    /// First Commit Wins: the version with the earliest timestamp.
    FirstWriterWins,
    /// Merge Conflicting Updates: every version is kept and returned (see
    /// [`Row::conflict`](super::Row::conflict)) until the application writes
    /// a resolution; the column has no single value meanwhile.
    MultiValue,
    /// A business rule: the value is what the function returns.
    Custom(Resolver),
}

impl fmt::Debug for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::LastWriterWins => "LastWriterWins",
            Strategy::FirstWriterWins => "FirstWriterWins",
            Strategy::MultiValue => "MultiValue",
            Strategy::Custom(_) => "Custom",
        })
    }
}

impl Strategy {
    /// The value of a register with these versions (sorted by timestamp),
    /// or `None` for a multi-value register in conflict.
    pub fn resolve(&self, column: &str, versions: &[Version]) -> Option<Value> {
        match versions {
            [] => None,
            [only] => Some(only.value.clone()),
            _ => match self {
                Strategy::LastWriterWins => versions.last().map(|v| v.value.clone()),
                Strategy::FirstWriterWins => versions.first().map(|v| v.value.clone()),
                Strategy::MultiValue => None,
                Strategy::Custom(f) => Some(f(column, versions)),
            },
        }
    }
}

/// A table: its name, column kinds and conflict strategies. Every replica
/// that writes a table must use the same schema for it.
#[derive(Clone, Debug)]
pub struct TableSchema {
    pub(crate) name: String,
    pub(crate) shards: u32,
    pub(crate) strategy: Strategy,
    pub(crate) columns: BTreeMap<String, (ColumnKind, Option<Strategy>)>,
}

impl TableSchema {
    /// A table of register columns, last writer wins, 16 catalog shards.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            shards: 16,
            strategy: Strategy::LastWriterWins,
            columns: BTreeMap::new(),
        }
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The strategy for every register column without its own.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Declare a counter column.
    pub fn counter(mut self, column: impl Into<String>) -> Self {
        self.columns
            .insert(column.into(), (ColumnKind::Counter, None));
        self
    }

    /// Declare a collaborative text column.
    pub fn text(mut self, column: impl Into<String>) -> Self {
        self.columns.insert(column.into(), (ColumnKind::Text, None));
        self
    }

    /// Give one register column its own strategy (per-column override).
    pub fn column_strategy(mut self, column: impl Into<String>, strategy: Strategy) -> Self {
        self.columns
            .insert(column.into(), (ColumnKind::Register, Some(strategy)));
        self
    }

    /// How many catalog documents the table's row index is spread over
    /// (default 16). Fixed for the life of the table: every replica must agree.
    pub fn shards(mut self, shards: u32) -> Self {
        self.shards = shards.max(1);
        self
    }

    /// The kind of a column.
    pub fn kind(&self, column: &str) -> ColumnKind {
        self.columns
            .get(column)
            .map_or(ColumnKind::Register, |(k, _)| *k)
    }

    /// The strategy that resolves a register column.
    pub fn strategy_for(&self, column: &str) -> &Strategy {
        match self.columns.get(column) {
            Some((_, Some(s))) => s,
            _ => &self.strategy,
        }
    }

    /// The declared counter and text columns.
    pub(crate) fn crdt_columns(&self) -> impl Iterator<Item = (&str, ColumnKind)> {
        self.columns
            .iter()
            .filter(|(_, (k, _))| *k != ColumnKind::Register)
            .map(|(c, (k, _))| (c.as_str(), *k))
    }
}
