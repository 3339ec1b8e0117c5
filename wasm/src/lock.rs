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
///
/// A free lock is taken however long the browser takes to grant it (a busy
/// machine can take seconds); only a lock that another holder has is waited
/// for with a deadline.
pub(crate) async fn acquire(name: &str) -> Result<Option<StoreLock>, Error> {
    let locks = get(&get(&js_sys::global(), "navigator"), "locks");
    if locks.is_undefined() || locks.is_null() {
        return Ok(None);
    }
    let lock_name = format!("tandem/{name}");
    let busy = || Error::StoreInUse(name.to_owned());
    let failed =
        |e: JsValue| Error::IndexedDb(format!("cannot lock the store: {}", js_message(&e)));

    let if_available = crate::js::object(&[("ifAvailable", JsValue::TRUE)]);
    if let Some(lock) = request(&locks, &lock_name, &if_available)
        .await
        .map_err(failed)?
    {
        return Ok(Some(lock));
    }
    // Held: perhaps by the page this one reloads, which is releasing it.
    let Some(timeout) = get(&get(&js_sys::global(), "AbortSignal"), "timeout")
        .dyn_into::<Function>()
        .ok()
    else {
        return Err(busy());
    };
    let signal = timeout
        .call1(&get(&js_sys::global(), "AbortSignal"), &WAIT_MS.into())
        .map_err(failed)?;
    let deadline = crate::js::object(&[("signal", signal)]);
    match request(&locks, &lock_name, &deadline).await {
        Ok(Some(lock)) => Ok(Some(lock)),
        Ok(None) => Err(busy()),
        // AbortSignal.timeout rejects with a TimeoutError (older browsers: AbortError).
        Err(e)
            if ["TimeoutError", "AbortError"]
                .iter()
                .any(|n| js_message(&e).starts_with(n)) =>
        {
            Err(busy())
        }
        Err(e) => Err(failed(e)),
    }
}

/// One `navigator.locks.request`: `Ok(None)` when an `ifAvailable` request
/// finds the lock held, `Err` when the request is rejected (an abort).
async fn request(
    locks: &JsValue,
    lock_name: &str,
    options: &JsValue,
) -> Result<Option<StoreLock>, JsValue> {
    // `held` stays pending while the store is open: the lock lasts as long.
    let mut release = None;
    let held = Promise::new(&mut |resolve, _| release = Some(resolve));
    let release = release.expect("the executor runs synchronously");
    let mut settle = None;
    let granted = Promise::new(&mut |resolve, reject| settle = Some((resolve, reject)));
    let (granted_ok, granted_err) = settle.expect("the executor runs synchronously");
    let callback = Closure::once_into_js(move |lock: JsValue| -> JsValue {
        // With `ifAvailable`, a null lock means another holder: returning
        // at once ends that request.
        let _ = granted_ok.call1(&JsValue::NULL, &JsValue::from_bool(!lock.is_null()));
        if lock.is_null() {
            JsValue::UNDEFINED
        } else {
            held.into()
        }
    });
    let request = get(locks, "request")
        .dyn_into::<Function>()
        .map_err(|_| JsValue::from_str("navigator.locks.request is not a function"))?;
    let pending = request.call3(locks, &JsValue::from_str(lock_name), options, &callback)?;
    // An abort (the wait timed out) rejects the request's promise.
    let on_error = Closure::once(move |e: JsValue| {
        let _ = granted_err.call1(&JsValue::NULL, &e);
    });
    let _ = pending.unchecked_into::<Promise>().catch(&on_error);
    // One small closure per request; the promise may settle long after
    // this function returns.
    on_error.forget();
    let got = JsFuture::from(granted).await?;
    Ok((got.as_bool() == Some(true)).then_some(StoreLock { release }))
}
