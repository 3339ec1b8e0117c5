//! One open `Tandem` per store in an origin, enforced with the Web Locks API:
//! two tabs on one store would each keep their own mirror, and their
//! change-feed entries and sync states would overwrite each other's.
//!
//! The lock is held from `open` until `close` (or until the object is freed,
//! or the page goes away, when the browser releases it). A second open waits
//! a moment for it, which covers a reload racing the previous page's
//! release, then fails with a clear error.

use js_sys::{Function, Promise, Reflect};
use wasm_bindgen::prelude::Closure;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

use crate::error::{Error, js_message};

/// How long a second open waits for the store's lock.
const WAIT_MS: u32 = 3_000;

/// A held lock; released when dropped.
#[derive(Debug)]
pub(crate) struct StoreLock {
    release: Function,
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        let _ = self.release.call0(&JsValue::NULL);
    }
}

fn get(target: &JsValue, name: &str) -> JsValue {
    Reflect::get(target, &JsValue::from_str(name)).unwrap_or(JsValue::UNDEFINED)
}

/// Take the lock of store `name`. `Ok(None)` where the browser has no Web
/// Locks (an insecure context): the guard is then the app's responsibility.
pub(crate) async fn acquire(name: &str) -> Result<Option<StoreLock>, Error> {
    let locks = get(&get(&js_sys::global(), "navigator"), "locks");
    if locks.is_undefined() || locks.is_null() {
        return Ok(None);
    }
    let timeout = get(&get(&js_sys::global(), "AbortSignal"), "timeout")
        .dyn_into::<Function>()
        .ok();
    let options = match &timeout {
        Some(f) => crate::js::object(&[(
            "signal",
            f.call1(&get(&js_sys::global(), "AbortSignal"), &WAIT_MS.into())
                .unwrap_or(JsValue::UNDEFINED),
        )]),
        None => crate::js::object(&[("ifAvailable", JsValue::TRUE)]),
    };

    // `held` stays pending while the store is open: the lock lasts as long.
    let mut release = None;
    let held = Promise::new(&mut |resolve, _| release = Some(resolve));
    let release = release.expect("the executor runs synchronously");
    let mut settle = None;
    let granted = Promise::new(&mut |resolve, reject| settle = Some((resolve, reject)));
    let (granted_ok, granted_err) = settle.expect("the executor runs synchronously");
    let callback = Closure::once_into_js(move |lock: JsValue| -> JsValue {
        // With `ifAvailable`, a null lock means another holder.
        let _ = granted_ok.call1(&JsValue::NULL, &JsValue::from_bool(!lock.is_null()));
        held.into()
    });
    let request = get(&locks, "request")
        .dyn_into::<Function>()
        .map_err(|_| Error::IndexedDb("navigator.locks.request is not a function".into()))?;
    let lock_name = JsValue::from_str(&format!("tandem/{name}"));
    match request.call3(&locks, &lock_name, &options, &callback) {
        Ok(pending) => {
            // An abort (the wait timed out) rejects the request's promise.
            let on_error = Closure::once(move |e: JsValue| {
                let _ = granted_err.call1(&JsValue::NULL, &e);
            });
            let _ = pending.unchecked_into::<Promise>().catch(&on_error);
            // One small closure per open; the promise may settle long after
            // this function returns.
            on_error.forget();
        }
        Err(e) => return Err(Error::IndexedDb(js_message(&e))),
    }
    let busy = || Error::StoreInUse(name.to_owned());
    match JsFuture::from(granted).await {
        Ok(got) if got.as_bool() == Some(true) => Ok(Some(StoreLock { release })),
        Ok(_) => Err(busy()),
        // AbortSignal.timeout rejects with a TimeoutError (older browsers: AbortError).
        Err(e)
            if ["TimeoutError", "AbortError"]
                .iter()
                .any(|n| js_message(&e).starts_with(n)) =>
        {
            Err(busy())
        }
        Err(e) => Err(Error::IndexedDb(format!(
            "cannot lock the store: {}",
            js_message(&e)
        ))),
    }
}
