//! IndexedDB, the browser's durable store: one database per Tandem store,
//! holding one object store of `key -> bytes`.
//!
//! Keys are the engine's storage keys as arrays of strings (IndexedDB
//! compares arrays component by component, like the engine does), values
//! `Uint8Array`s; in the browser's developer tools the layout reads the same
//! as in `docs/design.md`. Written on web-sys directly rather than through
//! an IndexedDB crate: the writes need the `durability: "strict"` option,
//! which those crates do not expose, and this is all the API Tandem uses.

use js_sys::{Array, Function, Promise, Reflect, Uint8Array};
use tandem_engine::StorageKey;
use tandem_engine::storage::Write;
use wasm_bindgen::prelude::Closure;
use wasm_bindgen::prelude::wasm_bindgen;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{Event, IdbDatabase, IdbFactory, IdbOpenDbRequest, IdbRequest, IdbTransaction};

use crate::error::{Error, js_message};
use crate::storage::Pending;

/// The object store inside each database.
const ENTRIES: &str = "entries";
/// The schema version (bumped with an upgrade step if the layout changes).
const VERSION: u32 = 1;
/// Database names are prefixed so they do not collide with the app's own.
const PREFIX: &str = "tandem/";

#[wasm_bindgen]
extern "C" {
    /// `IDBDatabase`, for the one method web-sys has only behind its
    /// unstable-API flag (which would apply to the whole build).
    #[wasm_bindgen(js_name = IDBDatabase)]
    type DatabaseWithOptions;

    /// `db.transaction(store, mode, options)`.
    #[wasm_bindgen(catch, method, js_name = transaction)]
    fn transaction_with_options(
        this: &DatabaseWithOptions,
        store: &str,
        mode: &str,
        options: &JsValue,
    ) -> Result<IdbTransaction, JsValue>;
}

fn idb_error(context: &str, e: &JsValue) -> Error {
    Error::IndexedDb(format!("{context}: {}", js_message(e)))
}

fn factory() -> Result<IdbFactory, Error> {
    // `indexedDB` on the global object: a window or a worker.
    let global = js_sys::global();
    let factory = Reflect::get(&global, &JsValue::from_str("indexedDB"))
        .map_err(|e| idb_error("cannot reach indexedDB", &e))?;
    if factory.is_undefined() || factory.is_null() {
        return Err(Error::IndexedDb(
            "this environment has no indexedDB (private mode, or not a browser)".into(),
        ));
    }
    Ok(factory.unchecked_into())
}

/// A promise with its settle functions.
fn deferred() -> (Promise, Function, Function) {
    let mut settle = None;
    let promise = Promise::new(&mut |resolve, reject| settle = Some((resolve, reject)));
    let (resolve, reject) = settle.expect("the executor runs synchronously");
    (promise, resolve, reject)
}

/// Wait for a request's `success` (its result) or `error`.
async fn finish(request: &IdbRequest, context: &str) -> Result<JsValue, Error> {
    let (promise, resolve, reject) = deferred();
    let on_success = Closure::<dyn FnMut(Event)>::new({
        let request = request.clone();
        move |_| {
            let _ = resolve.call1(&JsValue::NULL, &request.result().unwrap_or_default());
        }
    });
    let on_error = Closure::<dyn FnMut(Event)>::new({
        let request = request.clone();
        move |_| {
            let error = request
                .error()
                .ok()
                .flatten()
                .map_or_else(|| JsValue::from_str("request failed"), JsValue::from);
            let _ = reject.call1(&JsValue::NULL, &error);
        }
    });
    request.set_onsuccess(Some(on_success.as_ref().unchecked_ref()));
    request.set_onerror(Some(on_error.as_ref().unchecked_ref()));
    let result = JsFuture::from(promise).await;
    request.set_onsuccess(None);
    request.set_onerror(None);
    result.map_err(|e| idb_error(context, &e))
}

/// Wait for a transaction to commit (`complete`) or fail (`abort`, `error`).
async fn commit(tx: &IdbTransaction, context: &str) -> Result<(), Error> {
    let (promise, resolve, reject) = deferred();
    let on_complete = Closure::<dyn FnMut(Event)>::new(move |_| {
        let _ = resolve.call0(&JsValue::NULL);
    });
    let on_fail = Closure::<dyn FnMut(Event)>::new({
        let tx = tx.clone();
        move |_| {
            let error = tx
                .error()
                .map_or_else(|| JsValue::from_str("transaction aborted"), JsValue::from);
            let _ = reject.call1(&JsValue::NULL, &error);
        }
    });
    tx.set_oncomplete(Some(on_complete.as_ref().unchecked_ref()));
    tx.set_onabort(Some(on_fail.as_ref().unchecked_ref()));
    tx.set_onerror(Some(on_fail.as_ref().unchecked_ref()));
    let result = JsFuture::from(promise).await;
    tx.set_oncomplete(None);
    tx.set_onabort(None);
    tx.set_onerror(None);
    result.map(|_| ()).map_err(|e| idb_error(context, &e))
}

/// Open (creating if needed) the database of store `name`.
pub(crate) async fn open(name: &str) -> Result<IdbDatabase, Error> {
    let request: IdbOpenDbRequest = factory()?
        .open_with_u32(&format!("{PREFIX}{name}"), VERSION)
        .map_err(|e| idb_error("cannot open the database", &e))?;
    let on_upgrade = Closure::<dyn FnMut(Event)>::new({
        let request = request.clone();
        move |_| {
            // Runs inside the version-change transaction: create the schema.
            if let Ok(db) = request.result() {
                let db: IdbDatabase = db.unchecked_into();
                if !db.object_store_names().contains(ENTRIES) {
                    let _ = db.create_object_store(ENTRIES);
                }
            }
        }
    });
    request.set_onupgradeneeded(Some(on_upgrade.as_ref().unchecked_ref()));
    let db = finish(&request, "cannot open the database").await;
    request.set_onupgradeneeded(None);
    Ok(db?.unchecked_into())
}

/// Delete the database of store `name` (waits while another tab has it open).
pub(crate) async fn delete(name: &str) -> Result<(), Error> {
    let request = factory()?
        .delete_database(&format!("{PREFIX}{name}"))
        .map_err(|e| idb_error("cannot delete the database", &e))?;
    finish(&request, "cannot delete the database").await?;
    Ok(())
}

fn key_to_js(key: &StorageKey) -> JsValue {
    key.parts()
        .iter()
        .map(|p| JsValue::from_str(p))
        .collect::<Array>()
        .into()
}

fn key_from_js(key: &JsValue) -> Result<StorageKey, Error> {
    let corrupt = || Error::IndexedDb(format!("unexpected key {key:?} in the store"));
    if !Array::is_array(key) {
        return Err(corrupt());
    }
    let parts = Array::from(key)
        .iter()
        .map(|p| p.as_string().ok_or_else(corrupt))
        .collect::<Result<Vec<_>, _>>()?;
    StorageKey::new(parts).map_err(|_| corrupt())
}

/// Every entry of the store, read in one transaction (a consistent snapshot).
pub(crate) async fn load(db: &IdbDatabase) -> Result<Vec<(StorageKey, Vec<u8>)>, Error> {
    let context = "cannot read the store";
    let tx = db
        .transaction_with_str(ENTRIES)
        .map_err(|e| idb_error(context, &e))?;
    let store = tx
        .object_store(ENTRIES)
        .map_err(|e| idb_error(context, &e))?;
    // Both requests are placed before the first await, while the
    // transaction is active; both list the entries in key order.
    let keys = store.get_all_keys().map_err(|e| idb_error(context, &e))?;
    let values = store.get_all().map_err(|e| idb_error(context, &e))?;
    let keys = Array::from(&finish(&keys, context).await?);
    let values = Array::from(&finish(&values, context).await?);
    if keys.length() != values.length() {
        return Err(Error::IndexedDb(format!(
            "{context}: {} keys but {} values",
            keys.length(),
            values.length()
        )));
    }
    keys.iter()
        .zip(values.iter())
        .map(|(k, v)| {
            let bytes = v
                .dyn_into::<Uint8Array>()
                .map_err(|v| Error::IndexedDb(format!("unexpected value {v:?} in the store")))?;
            Ok((key_from_js(&k)?, bytes.to_vec()))
        })
        .collect()
}

/// Write `pending` in one read-write transaction with strict durability:
/// all of its writes or none, on disk when this returns `Ok`.
pub(crate) async fn write(db: &IdbDatabase, pending: &Pending) -> Result<(), Error> {
    let context = "cannot write to the store";
    let options = crate::js::object(&[("durability", "strict".into())]);
    let tx = db
        .unchecked_ref::<DatabaseWithOptions>()
        .transaction_with_options(ENTRIES, "readwrite", &options)
        .map_err(|e| idb_error(context, &e))?;
    let store = tx
        .object_store(ENTRIES)
        .map_err(|e| idb_error(context, &e))?;
    for write in pending.writes() {
        let placed = match write {
            Write::Put(key, value) => {
                store.put_with_key(&Uint8Array::from(value.as_slice()), &key_to_js(key))
            }
            Write::Delete(key) => store.delete(&key_to_js(key)),
        };
        if let Err(e) = placed {
            let _ = tx.abort();
            return Err(idb_error(context, &e));
        }
    }
    commit(&tx, context).await
}
