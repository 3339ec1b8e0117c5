//! The bindings in a real browser (headless Chromium, through
//! wasm-bindgen-test-runner and chromedriver): raw documents, errors as JS
//! exceptions, events, IndexedDB persistence across a re-open of the store,
//! and the connection state machine.
//!
//! Run with `wasm/build.sh --test-only` (or through
//! `cargo test -p tandem-tests --test wasm_browser`). Natively this file is empty.
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::{Array, Function, Reflect};
use tandem_wasm::{PathArg, Tandem};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

mod common;
use common::{js, json, sleep, thrown, unique_name};

wasm_bindgen_test_configure!(run_in_browser);

// ---- helpers ------------------------------------------------------------------

fn path(steps: &str) -> JsValue {
    js(steps)
}

/// An optional path argument.
fn at(steps: &str) -> Option<PathArg> {
    Some(js(steps).unchecked_into())
}

/// A one-key path argument.
fn key(k: &str) -> Option<PathArg> {
    Some(JsValue::from_str(k).unchecked_into())
}

/// The message of a thrown `TandemError`.
/// Records every event delivered to a subscriber.
struct Recorder {
    events: Rc<RefCell<Vec<JsValue>>>,
    _callback: Closure<dyn FnMut(JsValue)>,
}

impl Recorder {
    fn attach(tandem: &Tandem) -> Self {
        let events = Rc::new(RefCell::new(Vec::new()));
        let callback = Closure::<dyn FnMut(JsValue)>::new({
            let events = events.clone();
            move |event| events.borrow_mut().push(event)
        });
        tandem
            .subscribe(callback.as_ref().unchecked_ref::<Function>().clone())
            .unwrap();
        Self {
            events,
            _callback: callback,
        }
    }

    fn field(event: &JsValue, name: &str) -> String {
        let v = Reflect::get(event, &name.into()).unwrap();
        v.as_string().unwrap_or_else(|| json(&v))
    }

    /// Wait (bounded) for an event with `type` (and `state`, for connection events).
    async fn wait_for(&self, kind: &str, state: Option<&str>) -> JsValue {
        for _ in 0..200 {
            let found = self
                .events
                .borrow()
                .iter()
                .find(|e| {
                    Self::field(e, "type") == kind
                        && state.is_none_or(|s| Self::field(e, "state") == s)
                })
                .cloned();
            if let Some(e) = found {
                return e;
            }
            sleep(25).await;
        }
        let seen: Vec<String> = self.events.borrow().iter().map(json).collect();
        panic!("no {kind} {state:?} event within 5 s; saw {seen:?}");
    }
}

// ---- raw documents --------------------------------------------------------------

#[wasm_bindgen_test]
fn documents_are_created_edited_and_read() {
    let tandem = Tandem::open_in_memory(None).unwrap();
    let initial = js(r#"{"title": "Groceries", "tasks": {}}"#).unchecked_into();
    let doc = tandem.create(Some(initial)).unwrap();
    assert!(tandem.url(&doc).unwrap().starts_with("automerge:"));
    assert_eq!(tandem.documents().unwrap(), vec![doc.clone()]);

    tandem
        .put(
            &doc,
            path(r#"["tasks", "t1"]"#),
            js(r#"{"title": "milk", "done": false, "tags": ["a", 2]}"#),
        )
        .unwrap();
    tandem
        .put(&doc, path(r#"["tasks", "t1", "done"]"#), JsValue::TRUE)
        .unwrap();
    tandem
        .put_text(&doc, path(r#"["tasks", "t1", "notes"]"#), "2 litres")
        .unwrap();
    tandem
        .splice(
            &doc,
            path(r#"["tasks", "t1", "notes"]"#),
            0,
            1,
            Some("3".into()),
        )
        .unwrap();
    tandem
        .update_text(
            &doc,
            path(r#"["tasks", "t1", "notes"]"#),
            "3 litres, cold".into(),
        )
        .unwrap();
    tandem
        .put_counter(&doc, path(r#"["tasks", "t1", "votes"]"#), 1)
        .unwrap();
    tandem
        .increment(&doc, path(r#"["tasks", "t1", "votes"]"#), Some(2))
        .unwrap();
    tandem
        .insert(&doc, path(r#"["tasks", "t1", "tags", 0]"#), "first".into())
        .unwrap();

    let task = tandem.get(&doc, at(r#"["tasks", "t1"]"#)).unwrap();
    assert_eq!(
        json(&task),
        r#"{"done":true,"notes":"3 litres, cold","tags":["first","a",2],"title":"milk","votes":3}"#
    );
    assert_eq!(
        tandem
            .get(&doc, key("title"))
            .unwrap()
            .as_string()
            .as_deref(),
        Some("Groceries")
    );
    assert!(tandem.get(&doc, key("missing")).unwrap().is_undefined());
    assert_eq!(
        tandem.keys(&doc, None).unwrap(),
        vec!["tasks".to_owned(), "title".to_owned()]
    );
    tandem
        .delete_at(&doc, path(r#"["tasks", "t1", "tags"]"#))
        .unwrap();
    assert!(
        tandem
            .get(&doc, at(r#"["tasks", "t1", "tags"]"#))
            .unwrap()
            .is_undefined()
    );
    assert_eq!(tandem.heads(&doc).unwrap().len(), 1);
    assert_eq!(
        tandem
            .get_all(&doc, path(r#"["tasks", "t1", "title"]"#))
            .unwrap()
            .length(),
        1
    );
}

#[wasm_bindgen_test]
fn a_change_applies_all_of_its_ops_or_none() {
    let tandem = Tandem::open_in_memory(None).unwrap();
    let doc = tandem.create(None).unwrap();
    tandem
        .change(
            &doc,
            js(r#"[{"op": "put", "path": ["a"], "value": 1},
                   {"op": "putText", "path": ["notes"], "text": "hi"},
                   {"op": "putCounter", "path": ["n"], "value": 5},
                   {"op": "increment", "path": ["n"]}]"#),
        )
        .unwrap();
    let heads = tandem.heads(&doc).unwrap();
    let message = thrown(tandem.change(
        &doc,
        js(r#"[{"op": "put", "path": ["b"], "value": 2},
               {"op": "increment", "path": ["a"]}]"#),
    ));
    assert_eq!(message, r#"["a"] is a number, expected a counter"#);
    assert!(
        tandem.get(&doc, key("b")).unwrap().is_undefined(),
        "rolled back"
    );
    assert_eq!(tandem.heads(&doc).unwrap(), heads);
    assert_eq!(
        json(&tandem.get(&doc, None).unwrap()),
        r#"{"a":1,"n":6,"notes":"hi"}"#
    );
}

#[wasm_bindgen_test]
fn errors_are_js_exceptions_with_the_message_intact() {
    let tandem = Tandem::open_in_memory(None).unwrap();
    let doc = tandem.create(None).unwrap();
    assert_eq!(
        thrown(tandem.put(&doc, path(r#"["no", "such"]"#), JsValue::NULL)),
        r#"nothing at ["no"]"#
    );
    assert!(
        thrown(tandem.get("not-an-id", None)).starts_with(r#"invalid document id "not-an-id""#)
    );
    let unknown = Tandem::open_in_memory(None).unwrap().create(None).unwrap();
    assert!(thrown(tandem.heads(&unknown)).contains("is not in this store"));
    assert_eq!(
        thrown(tandem.put(&doc, "x".into(), JsValue::UNDEFINED)),
        "invalid value: undefined cannot be stored (use null, or delete the key)"
    );
    assert!(
        thrown(tandem.change(&doc, js(r#"[{"op": "frobnicate", "path": []}]"#)))
            .starts_with(r#"invalid op: unknown edit "frobnicate""#)
    );
    assert!(
        thrown(tandem.connect("ftp://127.0.0.1/".into(), None))
            .starts_with(r#"cannot connect to "ftp://127.0.0.1/": SyntaxError"#)
    );
}

#[wasm_bindgen_test]
async fn local_changes_reach_subscribers() {
    let tandem = Tandem::open_in_memory(None).unwrap();
    let recorder = Recorder::attach(&tandem);
    let doc = tandem.create(None).unwrap();
    tandem.put(&doc, "done".into(), JsValue::FALSE).unwrap();
    let event = recorder.wait_for("change", None).await;
    assert_eq!(Recorder::field(&event, "documentId"), doc);
    assert_eq!(Recorder::field(&event, "origin"), "local");
    let heads = Array::from(&Reflect::get(&event, &"heads".into()).unwrap());
    assert_eq!(
        heads.get(0).as_string(),
        tandem.heads(&doc).unwrap().first().cloned()
    );
}

// ---- IndexedDB ------------------------------------------------------------------

#[wasm_bindgen_test]
async fn a_store_keeps_everything_across_a_reopen() {
    let name = unique_name("reopen");
    let tandem = Tandem::open(name.clone(), None).await.unwrap();
    let storage_id = tandem.storage_id().unwrap();
    let doc = tandem.create(None).unwrap();
    tandem
        .put(
            &doc,
            "task".into(),
            js(r#"{"title": "persist me", "done": false}"#),
        )
        .unwrap();
    tandem
        .put_text(&doc, path(r#"["task", "notes"]"#), "offline")
        .unwrap();
    tandem
        .splice(
            &doc,
            path(r#"["task", "notes"]"#),
            7,
            0,
            Some(" edit".into()),
        )
        .unwrap();
    for i in 0..20 {
        tandem.put(&doc, "n".into(), i.into()).unwrap();
    }
    let heads = tandem.heads(&doc).unwrap();
    let before = json(&tandem.get(&doc, None).unwrap());
    JsFuture::from(tandem.close().unwrap()).await.unwrap();
    assert_eq!(thrown(tandem.heads(&doc)), "this Tandem store is closed");
    drop(tandem);

    let reopened = Tandem::open(name.clone(), None).await.unwrap();
    assert_eq!(reopened.storage_id().unwrap(), storage_id, "same store");
    assert_eq!(reopened.documents().unwrap(), vec![doc.clone()]);
    assert_eq!(reopened.heads(&doc).unwrap(), heads);
    assert_eq!(json(&reopened.get(&doc, None).unwrap()), before);
    assert_eq!(
        json(&reopened.get(&doc, None).unwrap()),
        r#"{"n":19,"task":{"done":false,"notes":"offline edit","title":"persist me"}}"#
    );
    JsFuture::from(reopened.close().unwrap()).await.unwrap();
    Tandem::delete_store(name).await.unwrap();
}

/// What a page reload does: the tab goes away without `close()`. Every edit
/// that `whenPersisted` reported durable is there when the store reopens.
#[wasm_bindgen_test]
async fn persisted_edits_survive_dropping_the_store_without_close() {
    let name = unique_name("reload");
    let tandem = Tandem::open(name.clone(), None).await.unwrap();
    let doc = tandem.create(None).unwrap();
    tandem.put(&doc, "a".into(), "kept".into()).unwrap();
    JsFuture::from(tandem.when_persisted().unwrap())
        .await
        .unwrap();
    drop(tandem); // no close: the database connection closes with the driver

    let reopened = Tandem::open(name.clone(), None).await.unwrap();
    assert_eq!(
        reopened.get(&doc, key("a")).unwrap().as_string().as_deref(),
        Some("kept")
    );
    // Editing after the reopen keeps working, and a second reopen sees both.
    reopened.put(&doc, "b".into(), 2.into()).unwrap();
    JsFuture::from(reopened.close().unwrap()).await.unwrap();
    let again = Tandem::open(name.clone(), None).await.unwrap();
    assert_eq!(
        json(&again.get(&doc, None).unwrap()),
        r#"{"a":"kept","b":2}"#
    );
    JsFuture::from(again.close().unwrap()).await.unwrap();
    Tandem::delete_store(name).await.unwrap();
}

#[wasm_bindgen_test]
async fn stores_with_different_names_are_separate() {
    let (a_name, b_name) = (unique_name("a"), unique_name("b"));
    let a = Tandem::open(a_name.clone(), None).await.unwrap();
    let b = Tandem::open(b_name.clone(), None).await.unwrap();
    assert_ne!(a.storage_id().unwrap(), b.storage_id().unwrap());
    // An empty document is stored at its first edit.
    let doc = a.create(None).unwrap();
    assert!(a.documents().unwrap().is_empty());
    a.put(&doc, "x".into(), 1.into()).unwrap();
    assert_eq!(a.documents().unwrap(), vec![doc]);
    assert!(b.documents().unwrap().is_empty());
    JsFuture::from(a.close().unwrap()).await.unwrap();
    JsFuture::from(b.close().unwrap()).await.unwrap();
    Tandem::delete_store(a_name).await.unwrap();
    Tandem::delete_store(b_name).await.unwrap();
}

#[wasm_bindgen_test]
async fn a_store_is_open_in_one_place_at_a_time() {
    let name = unique_name("locked");
    let first = Tandem::open(name.clone(), None).await.unwrap();
    let message = thrown(Tandem::open(name.clone(), None).await);
    assert_eq!(
        message,
        format!(
            "store {name:?} is open in another tab or Tandem object: close it first, or give each tab its own store name"
        )
    );
    JsFuture::from(first.close().unwrap()).await.unwrap();
    let again = Tandem::open(name.clone(), None).await.unwrap();
    JsFuture::from(again.close().unwrap()).await.unwrap();
    Tandem::delete_store(name).await.unwrap();
}

/// A page that reloads opens its store while the old page is still
/// releasing it: the second open waits for the release instead of failing.
#[wasm_bindgen_test]
async fn an_open_waits_for_a_holder_that_closes_soon() {
    let name = unique_name("handover");
    let first = Tandem::open(name.clone(), None).await.unwrap();
    wasm_bindgen_futures::spawn_local(async move {
        sleep(300).await;
        JsFuture::from(first.close().unwrap()).await.unwrap();
    });
    let second = Tandem::open(name.clone(), None).await.unwrap();
    JsFuture::from(second.close().unwrap()).await.unwrap();
    Tandem::delete_store(name).await.unwrap();
}

// ---- the connection -------------------------------------------------------------

/// Nothing listens on 127.0.0.1:39: the client reports each state,
/// backs off, and stops when told to go offline. Edits keep working offline.
#[wasm_bindgen_test]
async fn an_unreachable_relay_is_retried_until_offline() {
    let tandem = Tandem::open_in_memory(None).unwrap();
    let recorder = Recorder::attach(&tandem);
    let options = js(r#"{"backoffMinMs": 50, "backoffMaxMs": 200, "token": "t"}"#).unchecked_into();
    tandem
        .connect("ws://127.0.0.1:39".into(), Some(options))
        .unwrap();
    recorder.wait_for("connection", Some("connecting")).await;
    let waiting = recorder.wait_for("connection", Some("waiting")).await;
    assert!(!Recorder::field(&waiting, "error").is_empty());
    let doc = tandem.create(None).unwrap();
    tandem.put(&doc, "offline".into(), JsValue::TRUE).unwrap();
    tandem.go_offline().unwrap();
    recorder.wait_for("connection", Some("offline")).await;
    let state = tandem.connection_state().unwrap();
    assert_eq!(Recorder::field(&state, "state"), "offline");
    assert!(!tandem.is_acknowledged(&doc).unwrap());
    // No more attempts once offline.
    let count = recorder.events.borrow().len();
    sleep(400).await;
    let later: Vec<String> = recorder.events.borrow()[count..].iter().map(json).collect();
    assert!(
        later.iter().all(|e| !e.contains("connecting")),
        "reconnected while offline: {later:?}"
    );
}
