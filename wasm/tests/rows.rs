//! The row bindings (`tandem.tables()`) in headless Chromium: inserts,
//! updates, reads and scans of every value kind, counters and text, delete
//! flags (delete wins, revive), the conflict strategies on a row merged from
//! two stores, the row change feed and row events, and persistence across a
//! re-open of an IndexedDB store.
//!
//! Run with the same environment as wasm/build.sh's tests, naming this file:
//! `... cargo test --target wasm32-unknown-unknown -p tandem-wasm --test rows`
//! (see examples/browser/README.md). Natively this file is empty.
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::{Array, Function, Reflect};
use tandem_wasm::Tandem;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

mod common;
use common::{js, json, sleep, thrown, unique_name};

wasm_bindgen_test_configure!(run_in_browser);

fn field(obj: &JsValue, path: &[&str]) -> JsValue {
    path.iter().fold(obj.clone(), |o, k| {
        Reflect::get(&o, &JsValue::from_str(k)).unwrap_or(JsValue::UNDEFINED)
    })
}

const TASKS: &str = r#"{"name": "tasks", "counters": ["votes"], "texts": ["notes"], "shards": 4}"#;

/// Copy a row from one store to the other (as a relay would).
fn exchange(from: &Tandem, to: &Tandem, table: &str, key: &str) {
    let changes = from.tables().export_row(table, key).unwrap();
    to.tables().import_row(table, key, changes.into()).unwrap();
}

/// A row's values as JSON.
fn values(tandem: &Tandem, table: &str, key: &str) -> String {
    json(&field(
        &tandem.tables().get(table, key).unwrap(),
        &["values"],
    ))
}

// ---- rows ---------------------------------------------------------------------

#[wasm_bindgen_test]
fn rows_are_inserted_updated_read_and_scanned() {
    let tandem = Tandem::open_in_memory(None).unwrap();
    let tables = tandem.tables();
    tables.define_table(js(TASKS)).unwrap();
    assert_eq!(tables.defined_tables(), vec!["tasks".to_owned()]);

    tables
        .insert(
            "tasks",
            "t1",
            js(r#"{"title": "buy milk", "done": false, "size": 2, "price": 1.5, "owner": null, "votes": 1, "notes": "2 litres"}"#),
        )
        .unwrap();
    let row = tables.get("tasks", "t1").unwrap();
    assert_eq!(json(&field(&row, &["key"])), r#""t1""#);
    assert_eq!(
        json(&field(&row, &["values"])),
        r#"{"done":false,"notes":"2 litres","owner":null,"price":1.5,"size":2,"title":"buy milk","votes":1}"#
    );
    assert_eq!(json(&field(&row, &["conflicts"])), "{}");

    // Bytes and dates round-trip as Uint8Array and Date.
    let extra = js_sys::Object::new();
    Reflect::set(
        &extra,
        &"blob".into(),
        &js_sys::Uint8Array::from(&[1u8, 2, 255][..]),
    )
    .unwrap();
    Reflect::set(
        &extra,
        &"due".into(),
        &js_sys::Date::new(&1_700_000_000_000f64.into()),
    )
    .unwrap();
    tables.update("tasks", "t1", extra.into()).unwrap();
    let row = tables.get("tasks", "t1").unwrap();
    let blob: js_sys::Uint8Array = field(&row, &["values", "blob"]).dyn_into().unwrap();
    assert_eq!(blob.to_vec(), vec![1, 2, 255]);
    let due: js_sys::Date = field(&row, &["values", "due"]).dyn_into().unwrap();
    assert_eq!(due.get_time(), 1_700_000_000_000.0);

    tables
        .update("tasks", "t1", js(r#"{"done": true}"#))
        .unwrap();
    tables.increment("tasks", "t1", "votes", Some(2.0)).unwrap();
    tables.increment("tasks", "t1", "votes", None).unwrap();
    // Text positions count UTF-16 units, like JS strings.
    tables
        .splice_text("tasks", "t1", "notes", 0, 1, Some("3".into()))
        .unwrap();
    tables
        .splice_text("tasks", "t1", "notes", 8, 0, Some(", cold 😀".into()))
        .unwrap();
    tables
        .splice_text("tasks", "t1", "notes", 17, 0, Some("!".into()))
        .unwrap();
    let row = tables.get("tasks", "t1").unwrap();
    assert_eq!(json(&field(&row, &["values", "done"])), "true");
    assert_eq!(json(&field(&row, &["values", "votes"])), "4");
    assert_eq!(
        field(&row, &["values", "notes"]).as_string().unwrap(),
        "3 litres, cold 😀!"
    );

    tables
        .upsert("tasks", "t0", js(r#"{"title": "first"}"#))
        .unwrap();
    tables
        .upsert("tasks", "t0", js(r#"{"done": true}"#))
        .unwrap();
    let keys: Vec<String> = tables
        .scan("tasks")
        .unwrap()
        .iter()
        .map(|r| field(&r, &["key"]).as_string().unwrap())
        .collect();
    assert_eq!(keys, vec!["t0", "t1"]);
    assert_eq!(
        values(&tandem, "tasks", "t0"),
        r#"{"done":true,"notes":"","title":"first","votes":0}"#
    );
    assert!(tables.get("tasks", "nope").unwrap().is_null());
    let id = tables.document_id("tasks", "t1").unwrap();
    assert!(tandem.documents().unwrap().contains(&id));
}

#[wasm_bindgen_test]
fn errors_are_thrown_with_the_reason() {
    let tandem = Tandem::open_in_memory(None).unwrap();
    let tables = tandem.tables();
    tables.define_table(js(TASKS)).unwrap();
    tables
        .insert("tasks", "t1", js(r#"{"title": "x"}"#))
        .unwrap();
    assert_eq!(
        thrown(tables.insert("tasks", "t1", js(r#"{"title": "y"}"#))),
        r#"row "t1" already exists in table "tasks" (use upsert or update)"#
    );
    assert_eq!(
        thrown(tables.update("tasks", "t2", js(r#"{"title": "y"}"#))),
        r#"no row "t2" in table "tasks""#
    );
    assert!(thrown(tables.increment("tasks", "t1", "title", None)).contains("not Counter"));
    assert!(thrown(tables.insert("tasks", "t3", js(r#"{"_x": 1}"#))).contains("reserved"));
    assert!(thrown(tables.insert("tasks", "t3", js(r#"{"x": [1]}"#))).contains("column \"x\""));
    assert!(
        thrown(tables.splice_text("tasks", "t1", "notes", 5, 0, Some("a".into())))
            .contains("past the end")
    );
    assert!(
        thrown(tables.define_table(js(r#"{"name": "t", "strategy": "best"}"#)))
            .contains("strategy")
    );
    assert!(thrown(tables.define_table(js(r#"{"shards": 2}"#))).contains("name"));
}

// ---- delete flags ---------------------------------------------------------------

#[wasm_bindgen_test]
fn deletes_hide_rows_win_over_concurrent_updates_and_inserts_revive() {
    let a = Tandem::open_in_memory(None).unwrap();
    let b = Tandem::open_in_memory(None).unwrap();
    for t in [&a, &b] {
        t.tables().define_table(js(TASKS)).unwrap();
    }
    a.tables()
        .insert(
            "tasks",
            "t1",
            js(r#"{"title": "x", "done": false, "votes": 2}"#),
        )
        .unwrap();
    exchange(&a, &b, "tasks", "t1");
    assert_eq!(values(&b, "tasks", "t1"), values(&a, "tasks", "t1"));

    // Concurrently: a deletes, b updates. After the exchange the row is
    // deleted on both: an update never clears the flag.
    a.tables().delete_row("tasks", "t1").unwrap();
    b.tables()
        .update("tasks", "t1", js(r#"{"title": "y"}"#))
        .unwrap();
    exchange(&a, &b, "tasks", "t1");
    exchange(&b, &a, "tasks", "t1");
    for t in [&a, &b] {
        assert!(t.tables().get("tasks", "t1").unwrap().is_null());
        assert_eq!(t.tables().scan("tasks").unwrap().length(), 0);
        assert!(
            thrown(t.tables().update("tasks", "t1", js(r#"{"done": true}"#))).contains("no row")
        );
        assert!(thrown(t.tables().delete_row("tasks", "t1")).contains("no row"));
    }

    // An insert after the delete revives the row with only its values.
    a.tables()
        .insert("tasks", "t1", js(r#"{"title": "again"}"#))
        .unwrap();
    exchange(&a, &b, "tasks", "t1");
    assert_eq!(
        values(&a, "tasks", "t1"),
        r#"{"notes":"","title":"again","votes":0}"#
    );
    assert_eq!(values(&b, "tasks", "t1"), values(&a, "tasks", "t1"));
}

// ---- conflict strategies ----------------------------------------------------------

#[wasm_bindgen_test]
fn strategies_resolve_a_row_merged_from_two_stores() {
    let a = Tandem::open_in_memory(None).unwrap();
    let b = Tandem::open_in_memory(None).unwrap();
    // The custom resolver keeps the longest title (ties: the latest).
    let longest = Function::new_with_args(
        "column, versions",
        "return versions.reduce((best, v) => String(v.value).length >= String(best.value).length ? v : best).value",
    );
    for t in [&a, &b] {
        let def = js(
            r#"{"name": "notes", "strategy": "lww", "columns": {"first": "fww", "tags": "multi"}, "texts": ["body"], "counters": ["likes"]}"#,
        );
        Reflect::set(&field(&def, &["columns"]), &"custom".into(), &longest).unwrap();
        t.tables().define_table(def).unwrap();
    }
    a.tables()
        .insert("notes", "n1", js(r#"{"last": "base", "first": "base", "tags": "base", "custom": "base", "body": "hello", "likes": 0}"#))
        .unwrap();
    exchange(&a, &b, "notes", "n1");

    a.tables()
        .update(
            "notes",
            "n1",
            js(r#"{"last": "from a", "first": "from a", "tags": "a", "custom": "a-long-title"}"#),
        )
        .unwrap();
    b.tables()
        .update(
            "notes",
            "n1",
            js(r#"{"last": "from b", "first": "from b", "tags": "b", "custom": "b"}"#),
        )
        .unwrap();
    a.tables()
        .increment("notes", "n1", "likes", Some(1.0))
        .unwrap();
    b.tables()
        .increment("notes", "n1", "likes", Some(2.0))
        .unwrap();
    a.tables()
        .splice_text("notes", "n1", "body", 5, 0, Some(" world".into()))
        .unwrap();
    b.tables()
        .splice_text("notes", "n1", "body", 0, 0, Some("> ".into()))
        .unwrap();
    exchange(&a, &b, "notes", "n1");
    exchange(&b, &a, "notes", "n1");

    // Both stores read the same row.
    assert_eq!(values(&a, "notes", "n1"), values(&b, "notes", "n1"));
    let row = a.tables().get("notes", "n1").unwrap();
    let conflicts = field(&row, &["conflicts"]);
    assert_eq!(
        json(&field(&row, &["conflicts"])),
        json(&field(
            &b.tables().get("notes", "n1").unwrap(),
            &["conflicts"]
        ))
    );
    let versions =
        |column: &str| -> Vec<JsValue> { Array::from(&field(&conflicts, &[column])).to_vec() };
    for column in ["last", "first", "tags", "custom"] {
        assert_eq!(versions(column).len(), 2, "{column}: {}", json(&conflicts));
    }
    // Last writer wins takes the latest version, first writer wins the earliest.
    let last = versions("last");
    assert_eq!(
        json(&field(&row, &["values", "last"])),
        json(&field(&last[1], &["value"]))
    );
    let first = versions("first");
    assert_eq!(
        json(&field(&row, &["values", "first"])),
        json(&field(&first[0], &["value"]))
    );
    assert!(field(&last[0], &["at", "millis"]).as_f64().unwrap() > 0.0);
    assert!(field(&last[0], &["at", "replica"]).as_string().is_some());
    // Multi-value keeps both and has no value until the app resolves it.
    assert!(field(&row, &["values", "tags"]).is_undefined());
    // The custom resolver picked the longest.
    assert_eq!(
        json(&field(&row, &["values", "custom"])),
        r#""a-long-title""#
    );
    // CRDT columns merged.
    assert_eq!(json(&field(&row, &["values", "likes"])), "3");
    assert_eq!(
        json(&field(&row, &["values", "body"])),
        r#""> hello world""#
    );

    // Writing the multi-value register resolves it, everywhere.
    b.tables()
        .update("notes", "n1", js(r#"{"tags": "a+b"}"#))
        .unwrap();
    exchange(&b, &a, "notes", "n1");
    let row = a.tables().get("notes", "n1").unwrap();
    assert_eq!(json(&field(&row, &["values", "tags"])), r#""a+b""#);
    assert!(field(&row, &["conflicts", "tags"]).is_undefined());
}

// ---- change feed and events --------------------------------------------------------

#[wasm_bindgen_test]
async fn row_changes_and_row_events_report_every_change() {
    let a = Tandem::open_in_memory(None).unwrap();
    let b = Tandem::open_in_memory(None).unwrap();
    for t in [&a, &b] {
        t.tables().define_table(js(TASKS)).unwrap();
    }
    let seen = Rc::new(RefCell::new(Vec::<JsValue>::new()));
    let callback = Closure::<dyn FnMut(JsValue)>::new({
        let seen = seen.clone();
        move |e| seen.borrow_mut().push(e)
    });
    let id = a
        .tables()
        .subscribe_rows(callback.as_ref().unchecked_ref::<Function>().clone())
        .unwrap();

    a.tables()
        .insert("tasks", "t1", js(r#"{"title": "x"}"#))
        .unwrap();
    a.tables()
        .update("tasks", "t1", js(r#"{"title": "y"}"#))
        .unwrap();
    exchange(&a, &b, "tasks", "t1");
    b.tables()
        .update("tasks", "t1", js(r#"{"title": "from b"}"#))
        .unwrap();
    a.tables()
        .update("tasks", "t1", js(r#"{"title": "from a"}"#))
        .unwrap();
    exchange(&b, &a, "tasks", "t1");
    a.tables().delete_row("tasks", "t1").unwrap();

    let summary = |events: &[JsValue]| -> Vec<String> {
        events
            .iter()
            .filter(|e| field(e, &["key"]).as_string().as_deref() == Some("t1"))
            .map(|e| {
                format!(
                    "{} {} {}",
                    field(e, &["type"]).as_string().unwrap(),
                    field(e, &["origin"]).as_string().unwrap(),
                    json(&field(e, &["columns"]))
                )
            })
            .collect()
    };
    let expected = [
        r#"inserted local {"notes":"","title":"x","votes":0}"#,
        r#"updated local {"title":"y"}"#,
        r#"updated local {"title":"from a"}"#,
        r#"updated remote {"title":"from a"}"#,
        r#"conflict remote {}"#,
        r#"deleted local {}"#,
    ];
    // The feed, from the start, in pages.
    let mut cursor = 0.0;
    let mut events = Vec::new();
    loop {
        let page = a.tables().row_changes(Some(cursor), Some(2)).unwrap();
        let next = field(&page, &["cursor"]).as_f64().unwrap();
        events.extend(Array::from(&field(&page, &["events"])).iter());
        if next == cursor {
            break;
        }
        cursor = next;
    }
    let got = summary(&events);
    assert_eq!(got.len(), expected.len(), "{got:?}");
    // The remote update's value is whichever title won: check the shape.
    for (g, e) in got.iter().zip(expected) {
        assert_eq!(
            g.split(' ').take(2).collect::<Vec<_>>(),
            e.split(' ').take(2).collect::<Vec<_>>(),
            "{got:?}"
        );
    }
    let conflict = events
        .iter()
        .find(|e| field(e, &["type"]).as_string().as_deref() == Some("conflict"))
        .unwrap();
    assert_eq!(field(&conflict, &["column"]).as_string().unwrap(), "title");
    assert_eq!(Array::from(&field(&conflict, &["versions"])).length(), 2);

    // The same events reach the subscriber, once each, after they are durable.
    for _ in 0..200 {
        if summary(&seen.borrow()).len() >= expected.len() {
            break;
        }
        sleep(25).await;
    }
    assert_eq!(summary(&seen.borrow()), got);
    assert!(a.tables().unsubscribe_rows(id));
    assert!(!a.tables().unsubscribe_rows(id));
}

// ---- persistence ---------------------------------------------------------------

#[wasm_bindgen_test]
async fn rows_survive_a_reopen_of_the_store() {
    let name = unique_name("rows-persist");
    let tandem = Tandem::open(name.clone(), None).await.unwrap();
    let tables = tandem.tables();
    tables.define_table(js(TASKS)).unwrap();
    tables
        .insert("tasks", "t1", js(r#"{"title": "kept", "votes": 1}"#))
        .unwrap();
    tables
        .insert("tasks", "t2", js(r#"{"title": "deleted"}"#))
        .unwrap();
    tables.increment("tasks", "t1", "votes", Some(4.0)).unwrap();
    tables
        .splice_text("tasks", "t1", "notes", 0, 0, Some("offline note".into()))
        .unwrap();
    tables.delete_row("tasks", "t2").unwrap();
    let cursor = field(&tables.row_changes(None, Some(1000)).unwrap(), &["cursor"]);
    JsFuture::from(tandem.close().unwrap()).await.unwrap();
    drop(tables);

    let reopened = Tandem::open(name.clone(), None).await.unwrap();
    let tables = reopened.tables();
    tables.define_table(js(TASKS)).unwrap();
    assert_eq!(
        values(&reopened, "tasks", "t1"),
        r#"{"notes":"offline note","title":"kept","votes":5}"#
    );
    assert!(tables.get("tasks", "t2").unwrap().is_null());
    assert_eq!(tables.scan("tasks").unwrap().length(), 1);
    // The change feed survived too: nothing new after the saved cursor.
    let page = tables.row_changes(cursor.as_f64(), Some(1000)).unwrap();
    assert_eq!(Array::from(&field(&page, &["events"])).length(), 0);
    JsFuture::from(reopened.close().unwrap()).await.unwrap();
    Tandem::delete_store(name).await.unwrap();
}
