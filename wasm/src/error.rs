//! Errors of the browser bindings. Each becomes a JS `Error` (name
//! `TandemError`) whose message is the Rust error's text, intact.

use tandem_engine::{ParseIdError, RepoError, StorageError};
use wasm_bindgen::JsValue;

use crate::ops::OpError;

/// Why a call from JS failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine refused (unknown document, storage, automerge, quarantine).
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Bytes loaded from IndexedDB do not form a valid store.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An edit or read does not fit the document.
    #[error(transparent)]
    Op(#[from] OpError),
    /// Not a document id or `automerge:` URL.
    #[error("invalid document id {input:?}: {reason}")]
    DocumentId {
        /// What was given.
        input: String,
        /// Why it does not parse.
        reason: ParseIdError,
    },
    /// An argument from JS has the wrong shape.
    #[error("invalid {what}: {reason}")]
    Argument {
        /// Which argument.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// IndexedDB failed (opening, reading or writing the store).
    #[error("IndexedDB: {0}")]
    IndexedDb(String),
    /// The WebSocket could not be created (for instance, an invalid URL).
    #[error("cannot connect to {url:?}: {reason}")]
    Connect {
        /// The relay URL (without token).
        url: String,
        /// What the browser said.
        reason: String,
    },
    /// Another `Tandem` (in this tab or another) has the store open.
    #[error(
        "store {0:?} is open in another tab or Tandem object: close it first, or give each tab its own store name"
    )]
    StoreInUse(String),
    /// `close()` was called.
    #[error("this Tandem store is closed")]
    Closed,
}

impl Error {
    pub(crate) fn argument(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Argument {
            what,
            reason: reason.into(),
        }
    }
}

impl From<Error> for JsValue {
    fn from(e: Error) -> Self {
        let js = js_sys::Error::new(&e.to_string());
        js.set_name("TandemError");
        js.into()
    }
}

/// The message of a JS exception or error event, for wrapping in [`Error`].
pub(crate) fn js_message(value: &JsValue) -> String {
    use wasm_bindgen::JsCast;
    if let Some(e) = value.dyn_ref::<web_sys::DomException>() {
        return format!("{}: {}", e.name(), e.message());
    }
    if let Some(e) = value.dyn_ref::<js_sys::Error>() {
        return String::from(e.message());
    }
    if let Some(s) = value.as_string() {
        return s;
    }
    format!("{value:?}")
}
