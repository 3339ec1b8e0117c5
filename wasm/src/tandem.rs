//! The JS-facing `Tandem` class (wasm-bindgen): a document store in a
//! browser tab, persisted in IndexedDB and synced over a WebSocket.

use std::cell::RefMut;

use js_sys::{Array, Function, Promise};
use tandem_engine::automerge::AutomergeError;
use tandem_engine::{DocumentId, PeerId, RepoConfig};
use wasm_bindgen::prelude::*;

use crate::driver::{Driver, NetConfig, Shared, open_persistent};
use crate::error::Error;
use crate::js;
use crate::ops::{self, Op, Value};
use crate::storage::BrowserStorage;

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &'static str = r#"
/** Steps from the document root: map keys (strings) and list indexes (numbers). A single key may be given as a string. */
export type Path = string | ReadonlyArray<string | number>;

/** What can be written: objects become maps, arrays lists, `Uint8Array` bytes, `Date` timestamps. Strings are plain (last writer wins); use `putText` for collaborative text. */
export type JsonValue = null | boolean | number | string | Uint8Array | Date | JsonValue[] | { [key: string]: JsonValue };

/** One edit; `change` applies an array of them as one atomic change. Text positions count UTF-16 code units, like JS strings. */
export type TandemOp =
  | { op: "put"; path: Path; value: JsonValue }
  | { op: "putText"; path: Path; text?: string }
  | { op: "putCounter"; path: Path; value?: number }
  | { op: "insert"; path: Path; value: JsonValue }
  | { op: "delete"; path: Path }
  | { op: "splice"; path: Path; index: number; deleteCount: number; text?: string }
  | { op: "updateText"; path: Path; text: string }
  | { op: "increment"; path: Path; by?: number };

/** Where the connection to the relay stands. */
export type ConnectionState =
  | { state: "offline" }
  | { state: "connecting"; attempt: number }
  | { state: "online"; peerId: string }
  | { state: "waiting"; failures: number; retryInMs: number; error: string };

/** Events delivered to `subscribe` callbacks, after the store's state changed. A `change` is durable in IndexedDB when it is delivered. */
export type TandemEvent =
  | { type: "change"; documentId: string; url: string; origin: "local" | "remote"; peerId?: string; heads: string[]; seq: number }
  | ({ type: "connection" } & ConnectionState)
  | { type: "unavailable"; documentId: string; peerId: string }
  | { type: "error"; message: string; documentId?: string };

export interface OpenOptions {
  /** The id announced to peers (default: random, `tandem-wasm-…`). */
  peerId?: string;
  /** Offer every stored document to the relay on connect (default true), so edits made before a reload sync without the app asking for them. */
  syncStored?: boolean;
}

export interface ConnectOptions {
  /** Access token, sent as `?token=` in the URL. */
  token?: string;
  /** First retry delay (default 500 ms); doubles per failure, with jitter. */
  backoffMinMs?: number;
  /** Longest retry delay (default 30000 ms). */
  backoffMaxMs?: number;
  /** Longest a connect and handshake may take (default 10000 ms). */
  connectTimeoutMs?: number;
}
"#;

#[wasm_bindgen]
extern "C" {
    /// Options of `Tandem.open` (TypeScript `OpenOptions`).
    #[wasm_bindgen(typescript_type = "OpenOptions")]
    #[derive(Debug)]
    pub type OpenOptions;
    /// Options of `connect` (TypeScript `ConnectOptions`).
    #[wasm_bindgen(typescript_type = "ConnectOptions")]
    #[derive(Debug)]
    pub type ConnectOptions;
    /// A path argument (TypeScript `Path`): a key, or an array of keys and indexes.
    #[wasm_bindgen(typescript_type = "Path")]
    #[derive(Debug)]
    pub type PathArg;
    /// The first content of a new document: an object.
    #[wasm_bindgen(typescript_type = "{ [key: string]: JsonValue }")]
    #[derive(Debug)]
    pub type InitialValue;
}

/// A Tandem store in a browser tab: raw automerge documents, persisted in
/// IndexedDB, synced with a relay (or any automerge-repo sync server) over
/// a WebSocket.
///
/// Every edit is applied and visible at once, committed to IndexedDB in the
/// background, and sent to peers only once IndexedDB has it; `change` events
/// are delivered at that point. Errors are thrown as `Error`s named
/// `TandemError` with the reason in the message.
#[wasm_bindgen]
#[derive(Debug)]
pub struct Tandem {
    shared: Shared,
}

fn random_peer_id() -> PeerId {
    PeerId::random("tandem-wasm")
}

/// An optional argument as a plain value (`undefined` when absent).
fn optional<T: Into<JsValue>>(arg: Option<T>) -> JsValue {
    arg.map_or(JsValue::UNDEFINED, Into::into)
}

fn config(options: &JsValue, ephemeral: bool) -> Result<RepoConfig, Error> {
    let peer_id = js::option_string(options, "peerId")?.map_or_else(random_peer_id, PeerId::new);
    let mut config = RepoConfig::new(peer_id);
    config.ephemeral = ephemeral;
    Ok(config)
}

#[wasm_bindgen]
impl Tandem {
    /// Open (or create) the store `name` in this origin's IndexedDB and load
    /// it. One `Tandem` per store at a time (a Web Lock enforces it: a second
    /// open throws after waiting 3 s): give each tab its own name, for
    /// instance one kept in `sessionStorage`, and `close()` a store before
    /// opening it again.
    pub async fn open(name: String, options: Option<OpenOptions>) -> Result<Tandem, JsValue> {
        let options = optional(options);
        let config = config(&options, false)?;
        let sync_stored = js::option_bool(&options, "syncStored", true)?;
        let (storage, db, lock) = open_persistent(&name).await?;
        let shared = Driver::start(storage, Some(db), lock, config)?;
        if sync_stored {
            let mut d = shared.borrow_mut();
            for id in d.repo.document_ids().map_err(Error::from)? {
                d.repo.request(id).map_err(Error::from)?;
            }
        }
        Ok(Tandem { shared })
    }

    /// A store that keeps nothing across reloads (announced to peers as
    /// ephemeral).
    #[wasm_bindgen(js_name = openInMemory)]
    pub fn open_in_memory(options: Option<OpenOptions>) -> Result<Tandem, JsValue> {
        let options = optional(options);
        let shared = Driver::start(BrowserStorage::new(), None, None, config(&options, true)?)?;
        Ok(Tandem { shared })
    }

    /// Delete the IndexedDB store `name` (close it first: deletion waits
    /// while a connection to it is open).
    #[wasm_bindgen(js_name = deleteStore)]
    pub async fn delete_store(name: String) -> Result<(), JsValue> {
        crate::idb::delete(&name).await?;
        Ok(())
    }

    fn driver(&self) -> Result<RefMut<'_, Driver>, Error> {
        let d = self
            .shared
            .try_borrow_mut()
            .map_err(|_| Error::argument("call", "Tandem is busy (called from inside itself)"))?;
        if d.closed {
            return Err(Error::Closed);
        }
        Ok(d)
    }

    /// The id this store announces to peers.
    #[wasm_bindgen(getter, js_name = peerId)]
    pub fn peer_id(&self) -> Result<String, JsValue> {
        Ok(self.driver()?.repo.peer_id().to_string())
    }

    /// The id of this store (stable across reloads).
    #[wasm_bindgen(getter, js_name = storageId)]
    pub fn storage_id(&self) -> Result<String, JsValue> {
        Ok(self.driver()?.repo.storage_id().as_str().to_owned())
    }

    /// Create a document, with `initial` (a map) as its first change if
    /// given. Returns its id; `url(id)` gives its `automerge:` URL.
    pub fn create(&self, initial: Option<InitialValue>) -> Result<String, JsValue> {
        let ops = match initial {
            None => Vec::new(),
            Some(obj) => match js::value(&obj.into())? {
                Value::Map(entries) => entries
                    .into_iter()
                    .map(|(k, value)| Op::Put {
                        path: vec![ops::Key::Map(k)],
                        value,
                    })
                    .collect(),
                _ => return Err(Error::argument("initial", "expected an object").into()),
            },
        };
        let mut d = self.driver()?;
        let id = d.repo.create().map_err(Error::from)?;
        if !ops.is_empty() {
            apply(&mut d, &id, &ops)?;
        }
        d.pump();
        Ok(id.to_string())
    }

    /// The `automerge:` URL of a document (accepts an id or a URL).
    pub fn url(&self, document: &str) -> Result<String, JsValue> {
        Ok(js::document_id(document)?.url().to_string())
    }

    /// The ids of every document stored here (a new document is stored at
    /// its first edit).
    pub fn documents(&self) -> Result<Vec<String>, JsValue> {
        let d = self.driver()?;
        let ids = d.repo.document_ids().map_err(Error::from)?;
        Ok(ids.iter().map(ToString::to_string).collect())
    }

    /// Open a document by id or URL: a stored one is offered to the relay;
    /// one not stored here is asked of the relay, and a `change` event
    /// follows when it arrives (or `unavailable`). Until then it reads as
    /// an empty map.
    pub fn request(&self, document: &str) -> Result<(), JsValue> {
        let id = js::document_id(document)?;
        let mut d = self.driver()?;
        d.repo.request(id).map_err(Error::from)?;
        d.pump();
        Ok(())
    }

    /// Apply `ops` as one change: all of them, or none if one fails.
    pub fn change(
        &self,
        document: &str,
        #[wasm_bindgen(unchecked_param_type = "TandemOp[]")] ops: JsValue,
    ) -> Result<(), JsValue> {
        let ops = js::ops(&ops)?;
        self.edit(document, &ops)
    }

    fn edit(&self, document: &str, ops: &[Op]) -> Result<(), JsValue> {
        let id = js::document_id(document)?;
        let mut d = self.driver()?;
        apply(&mut d, &id, ops)?;
        d.pump();
        Ok(())
    }

    /// Set a map key or list index (an index equal to the length appends).
    pub fn put(
        &self,
        document: &str,
        #[wasm_bindgen(unchecked_param_type = "Path")] path: JsValue,
        #[wasm_bindgen(unchecked_param_type = "JsonValue")] value: JsValue,
    ) -> Result<(), JsValue> {
        let op = Op::Put {
            path: js::path(&path)?,
            value: js::value(&value)?,
        };
        self.edit(document, &[op])
    }

    /// Create collaborative text at `path`, holding `text`.
    #[wasm_bindgen(js_name = putText)]
    pub fn put_text(
        &self,
        document: &str,
        #[wasm_bindgen(unchecked_param_type = "Path")] path: JsValue,
        text: &str,
    ) -> Result<(), JsValue> {
        let op = Op::Put {
            path: js::path(&path)?,
            value: Value::Text(text.to_owned()),
        };
        self.edit(document, &[op])
    }

    /// Create a counter at `path` starting at `value`.
    #[wasm_bindgen(js_name = putCounter)]
    pub fn put_counter(
        &self,
        document: &str,
        #[wasm_bindgen(unchecked_param_type = "Path")] path: JsValue,
        value: i32,
    ) -> Result<(), JsValue> {
        let op = Op::Put {
            path: js::path(&path)?,
            value: Value::Counter(i64::from(value)),
        };
        self.edit(document, &[op])
    }

    /// Insert into a list before the index `path` ends with.
    pub fn insert(
        &self,
        document: &str,
        #[wasm_bindgen(unchecked_param_type = "Path")] path: JsValue,
        #[wasm_bindgen(unchecked_param_type = "JsonValue")] value: JsValue,
    ) -> Result<(), JsValue> {
        let op = Op::Insert {
            path: js::path(&path)?,
            value: js::value(&value)?,
        };
        self.edit(document, &[op])
    }

    /// Remove a map key or list element.
    #[wasm_bindgen(js_name = delete)]
    pub fn delete_at(
        &self,
        document: &str,
        #[wasm_bindgen(unchecked_param_type = "Path")] path: JsValue,
    ) -> Result<(), JsValue> {
        let op = Op::Delete {
            path: js::path(&path)?,
        };
        self.edit(document, &[op])
    }

    /// Replace `deleteCount` UTF-16 units of the text at `path` from `index` by `text`.
    pub fn splice(
        &self,
        document: &str,
        #[wasm_bindgen(unchecked_param_type = "Path")] path: JsValue,
        index: u32,
        #[wasm_bindgen(js_name = deleteCount)] delete_count: u32,
        text: Option<String>,
    ) -> Result<(), JsValue> {
        let op = Op::Splice {
            path: js::path(&path)?,
            index: index as usize,
            delete: delete_count as usize,
            insert: text.unwrap_or_default(),
        };
        self.edit(document, &[op])
    }

    /// Make the text at `path` equal `text` with the smallest splices (for
    /// inputs that only report their new value).
    #[wasm_bindgen(js_name = updateText)]
    pub fn update_text(
        &self,
        document: &str,
        #[wasm_bindgen(unchecked_param_type = "Path")] path: JsValue,
        text: String,
    ) -> Result<(), JsValue> {
        let op = Op::UpdateText {
            path: js::path(&path)?,
            text,
        };
        self.edit(document, &[op])
    }

    /// Add `by` (default 1) to the counter at `path`.
    pub fn increment(
        &self,
        document: &str,
        #[wasm_bindgen(unchecked_param_type = "Path")] path: JsValue,
        by: Option<i32>,
    ) -> Result<(), JsValue> {
        let op = Op::Increment {
            path: js::path(&path)?,
            by: i64::from(by.unwrap_or(1)),
        };
        self.edit(document, &[op])
    }

    /// The value at `path` (the whole document without a path) as plain JS:
    /// text as a string, counters as numbers; `undefined` if absent.
    #[wasm_bindgen(unchecked_return_type = "JsonValue | undefined")]
    pub fn get(&self, document: &str, path: Option<PathArg>) -> Result<JsValue, JsValue> {
        let path = js::path(&optional(path))?;
        let value = self.read(document, |d| ops::read(d, &path))?;
        Ok(value.as_ref().map_or(JsValue::UNDEFINED, js::to_js))
    }

    /// Every value concurrently written at `path` that no later write
    /// replaced: more than one shows a conflict (`get` returns one of them,
    /// the same on every peer).
    #[wasm_bindgen(js_name = getAll, unchecked_return_type = "JsonValue[]")]
    pub fn get_all(
        &self,
        document: &str,
        #[wasm_bindgen(unchecked_param_type = "Path")] path: JsValue,
    ) -> Result<Array, JsValue> {
        let path = js::path(&path)?;
        let values = self.read(document, |d| ops::read_all(d, &path))?;
        Ok(values.iter().map(js::to_js).collect())
    }

    /// The keys of the map at `path` (list indexes for a list).
    pub fn keys(&self, document: &str, path: Option<PathArg>) -> Result<Vec<String>, JsValue> {
        let path = js::path(&optional(path))?;
        Ok(self.read(document, |d| ops::keys(d, &path))?)
    }

    fn read<R>(
        &self,
        document: &str,
        f: impl FnOnce(&tandem_engine::Automerge) -> Result<R, ops::OpError>,
    ) -> Result<R, Error> {
        let id = js::document_id(document)?;
        let mut d = self.driver()?;
        Ok(d.repo.view(&id, f)??)
    }

    /// The document's heads (hex change hashes): its version.
    pub fn heads(&self, document: &str) -> Result<Vec<String>, JsValue> {
        let id = js::document_id(document)?;
        let mut d = self.driver()?;
        let heads = d.repo.heads(&id).map_err(Error::from)?;
        Ok(heads.iter().map(ToString::to_string).collect())
    }

    /// Whether the relay has stored every change this store has of the
    /// document (false while not connected).
    #[wasm_bindgen(js_name = isAcknowledged)]
    pub fn is_acknowledged(&self, document: &str) -> Result<bool, JsValue> {
        let id = js::document_id(document)?;
        let mut d = self.driver()?;
        let Some(connection) = d.ready_connection() else {
            return Ok(false);
        };
        Ok(d.repo
            .is_acknowledged(connection, &id)
            .map_err(Error::from)?)
    }

    /// Call `callback` with every event from now on; returns an id for
    /// `unsubscribe`. Events arrive after the call that caused them returns.
    pub fn subscribe(
        &self,
        #[wasm_bindgen(unchecked_param_type = "(event: TandemEvent) => void")] callback: Function,
    ) -> Result<u32, JsValue> {
        Ok(self.driver()?.subscribe(callback))
    }

    /// Stop calling a subscribed callback; whether it was subscribed.
    pub fn unsubscribe(&self, id: u32) -> Result<bool, JsValue> {
        Ok(self.driver()?.unsubscribe(id))
    }

    /// Sync with the relay (or automerge-repo sync server) at `url`
    /// (`ws://` or `wss://`), reconnecting with backoff until `goOffline`.
    pub fn connect(&self, url: String, options: Option<ConnectOptions>) -> Result<(), JsValue> {
        let options = optional(options);
        let config = NetConfig {
            url,
            token: js::option_string(&options, "token")?,
            backoff_min_ms: js::option_ms(&options, "backoffMinMs", 500)?,
            backoff_max_ms: js::option_ms(&options, "backoffMaxMs", 30_000)?,
            connect_timeout_ms: js::option_ms(&options, "connectTimeoutMs", 10_000)?,
        };
        let mut d = self.driver()?;
        let result = d.connect(config);
        d.pump();
        Ok(result?)
    }

    /// Disconnect and stay offline; edits keep being committed locally.
    #[wasm_bindgen(js_name = goOffline)]
    pub fn go_offline(&self) -> Result<(), JsValue> {
        let mut d = self.driver()?;
        d.go_offline();
        d.pump();
        Ok(())
    }

    /// Reconnect (after `goOffline`) to the relay given to `connect`.
    #[wasm_bindgen(js_name = goOnline)]
    pub fn go_online(&self) -> Result<(), JsValue> {
        let mut d = self.driver()?;
        d.go_online();
        d.pump();
        Ok(())
    }

    /// The connection state now.
    #[wasm_bindgen(getter, js_name = connectionState, unchecked_return_type = "ConnectionState")]
    pub fn connection_state(&self) -> Result<JsValue, JsValue> {
        Ok(self.driver()?.state().to_js(false))
    }

    /// Resolves once every edit made so far is durable in IndexedDB.
    #[wasm_bindgen(js_name = whenPersisted, unchecked_return_type = "Promise<void>")]
    pub fn when_persisted(&self) -> Result<Promise, JsValue> {
        Ok(self.driver()?.when_persisted())
    }

    /// Go offline, wait until every edit is in IndexedDB, and close the
    /// store. Every later call throws.
    #[wasm_bindgen(unchecked_return_type = "Promise<void>")]
    pub fn close(&self) -> Result<Promise, JsValue> {
        let persisted = {
            let mut d = self.driver()?;
            d.go_offline();
            d.pump();
            d.when_persisted()
        };
        let shared = self.shared.clone();
        Ok(wasm_bindgen_futures::future_to_promise(async move {
            wasm_bindgen_futures::JsFuture::from(persisted).await?;
            let mut d = shared.borrow_mut();
            d.closed = true;
            d.close_store();
            Ok(JsValue::UNDEFINED)
        }))
    }
}

/// Apply `ops` to `id` as one change, reporting the op's own error.
fn apply(d: &mut Driver, id: &DocumentId, ops: &[Op]) -> Result<(), Error> {
    let mut failure = None;
    let result = d.repo.change(id, |doc| {
        ops::apply(doc, ops).map_err(|e| {
            failure = Some(e);
            // Any error makes the repo roll the change back; the real one
            // is reported from `failure`.
            AutomergeError::Fail
        })
    });
    match (result, failure) {
        (_, Some(e)) => Err(e.into()),
        (Err(e), None) => Err(e.into()),
        (Ok(()), None) => Ok(()),
    }
}

impl Tandem {
    /// The driver behind this object, for the row bindings (`crate::rows`).
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }
}
