//! Errors at the engine's boundaries.

use crate::DocumentId;
use crate::peer::ConnectionId;

/// An error from a storage backend or from bytes read out of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The backend failed (I/O, a corrupt database file, a full disk).
    #[error("storage backend: {0}")]
    Backend(String),
    /// Bytes read from storage do not decode.
    #[error("corrupt data in storage: {0}")]
    Corrupt(String),
    /// A key the caller built is not valid.
    #[error("invalid storage key: {0}")]
    InvalidKey(String),
}

/// An error from the repo's API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// The storage failed; nothing of the failed operation was acknowledged.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The document is not in this store.
    #[error("document {0} is not in this store")]
    NotFound(DocumentId),
    /// The document already exists (on create with a chosen id).
    #[error("document {0} already exists")]
    AlreadyExists(DocumentId),
    /// The document's stored bytes do not load.
    #[error("document {document} is corrupt in storage: {reason}")]
    CorruptDocument {
        /// The document.
        document: DocumentId,
        /// What automerge said.
        reason: String,
    },
    /// The document was quarantined after a panic; see [`crate::Event::Quarantined`].
    #[error("document {document} is quarantined: {reason}")]
    Quarantined {
        /// The document.
        document: DocumentId,
        /// Why.
        reason: String,
    },
    /// An automerge operation inside a change failed; the change was rolled back.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// The document was purged from this store (see [`crate::Repo::purge`]);
    /// it is not recreated.
    #[error("document {0} was purged from this store")]
    Purged(DocumentId),
    /// Bytes offered as an automerge change do not decode as one.
    #[error("invalid automerge change: {0}")]
    InvalidChange(String),
    /// The connection id is not known or already closed.
    #[error("unknown connection {0}")]
    UnknownConnection(ConnectionId),
    /// The connection id is already in use.
    #[error("connection {0} is already open")]
    DuplicateConnection(ConnectionId),
}

/// Why a wire frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not one CBOR item.
    #[error("frame is not valid CBOR: {0}")]
    Cbor(String),
    /// The CBOR item is not a map.
    #[error("frame is not a CBOR map")]
    NotAMap,
    /// A required field is missing.
    #[error("{message} message lacks field {field:?}")]
    MissingField {
        /// The message type.
        message: String,
        /// The missing field.
        field: &'static str,
    },
    /// A field has the wrong type or an invalid value.
    #[error("field {field:?} is invalid: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The `type` is not one this protocol knows.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
}

/// An error from the row layer ([`crate::rows`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RowError {
    /// The repo or its storage failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// No live row has this key (never inserted, or deleted).
    #[error("no row {key:?} in table {table:?}")]
    NotFound {
        /// The table.
        table: String,
        /// The key.
        key: String,
    },
    /// Insert of a key that has a live row; use upsert or update.
    #[error("row {key:?} already exists in table {table:?} (use upsert or update)")]
    AlreadyExists {
        /// The table.
        table: String,
        /// The key.
        key: String,
    },
    /// The row was purged here and its catalog has not moved past it yet.
    #[error("row {key:?} of table {table:?} was purged")]
    Purged {
        /// The table.
        table: String,
        /// The key.
        key: String,
    },
    /// A counter or text operation on a column of another kind.
    #[error("column {column:?} of table {table:?} is a {found:?} column, not {expected:?}")]
    WrongColumnKind {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// What the operation needs.
        expected: crate::rows::ColumnKind,
        /// What the schema says.
        found: crate::rows::ColumnKind,
    },
    /// A column name or value the table cannot take.
    #[error("invalid column {column:?}: {reason}")]
    InvalidColumn {
        /// The column.
        column: String,
        /// Why.
        reason: String,
    },
}

impl From<StorageError> for RowError {
    fn from(e: StorageError) -> Self {
        RowError::Repo(RepoError::Storage(e))
    }
}
