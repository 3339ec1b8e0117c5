//! Helpers shared by the browser test files.

use js_sys::{Function, Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

pub fn js(value: &str) -> JsValue {
    js_sys::JSON::parse(value).unwrap_or_else(|e| panic!("bad JSON in test {value}: {e:?}"))
}

pub fn json(value: &JsValue) -> String {
    js_sys::JSON::stringify(value)
        .map(String::from)
        .unwrap_or_else(|_| format!("{value:?}"))
}

pub async fn sleep(ms: i32) {
    let promise = Promise::new(&mut |resolve, _| {
        let set_timeout: Function = Reflect::get(&js_sys::global(), &"setTimeout".into())
            .unwrap()
            .unchecked_into();
        set_timeout
            .call2(&JsValue::NULL, &resolve, &ms.into())
            .unwrap();
    });
    JsFuture::from(promise).await.unwrap();
}

#[track_caller]
pub fn thrown(result: Result<impl std::fmt::Debug, JsValue>) -> String {
    let err = result.expect_err("expected the call to throw");
    let err: js_sys::Error = err
        .dyn_into()
        .unwrap_or_else(|v| panic!("thrown value is not an Error: {v:?}"));
    assert_eq!(String::from(err.name()), "TandemError");
    String::from(err.message())
}

pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", (js_sys::Math::random() * 1e12) as u64)
}
