//! Conversions between JS values and the bindings' Rust types: paths, values,
//! edits, document ids and events.

use js_sys::{Array, Date, Object, Reflect, Uint8Array};
use tandem_engine::{AutomergeUrl, DocumentId, FeedEvent, Origin};
use wasm_bindgen::{JsCast, JsValue};

use crate::error::Error;
use crate::ops::{Key, Op, Path, Value};

/// Deepest nesting accepted in a value from JS (a cycle would recurse forever).
const MAX_DEPTH: usize = 64;

/// A document id or `automerge:` URL (heads in the URL are ignored).
pub(crate) fn document_id(text: &str) -> Result<DocumentId, Error> {
    let parsed = if text.starts_with(tandem_engine::URL_PREFIX) {
        text.parse::<AutomergeUrl>().map(|u| u.document)
    } else {
        text.parse::<DocumentId>()
    };
    parsed.map_err(|reason| Error::DocumentId {
        input: text.to_owned(),
        reason,
    })
}

/// A path: `undefined`/`null` (the root), one key, or an array of keys
/// (strings) and indexes (non-negative integers).
pub(crate) fn path(js: &JsValue) -> Result<Path, Error> {
    if js.is_undefined() || js.is_null() {
        return Ok(Vec::new());
    }
    if let Some(s) = js.as_string() {
        return Ok(vec![Key::Map(s)]);
    }
    if !Array::is_array(js) {
        return Err(Error::argument(
            "path",
            "expected an array of keys and indexes",
        ));
    }
    Array::from(js)
        .iter()
        .map(|step| {
            if let Some(s) = step.as_string() {
                Ok(Key::Map(s))
            } else if let Some(n) = step.as_f64() {
                index(n).map(Key::Index)
            } else {
                Err(Error::argument(
                    "path",
                    format!("step {step:?} is neither a string key nor an index"),
                ))
            }
        })
        .collect()
}

fn index(n: f64) -> Result<usize, Error> {
    if n.fract() == 0.0 && n >= 0.0 && n <= u32::MAX as f64 {
        Ok(n as usize)
    } else {
        Err(Error::argument(
            "path",
            format!("index {n} is not a non-negative integer"),
        ))
    }
}

/// A JS value to write: objects become maps, arrays lists, strings plain
/// strings (use `putText` for collaborative text), integers ints, other
/// numbers floats, `Uint8Array` bytes, `Date` timestamps.
pub(crate) fn value(js: &JsValue) -> Result<Value, Error> {
    value_at(js, 0)
}

fn value_at(js: &JsValue, depth: usize) -> Result<Value, Error> {
    if depth > MAX_DEPTH {
        return Err(Error::argument(
            "value",
            format!("nested deeper than {MAX_DEPTH} levels (is it cyclic?)"),
        ));
    }
    if js.is_null() {
        return Ok(Value::Null);
    }
    if js.is_undefined() {
        return Err(Error::argument(
            "value",
            "undefined cannot be stored (use null, or delete the key)",
        ));
    }
    if let Some(b) = js.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Some(n) = js.as_f64() {
        const SAFE: f64 = 9_007_199_254_740_991.0; // Number.MAX_SAFE_INTEGER
        return Ok(if n.fract() == 0.0 && n.abs() <= SAFE {
            Value::Int(n as i64)
        } else {
            Value::F64(n)
        });
    }
    if let Some(s) = js.as_string() {
        return Ok(Value::Str(s));
    }
    if let Some(bytes) = js.dyn_ref::<Uint8Array>() {
        return Ok(Value::Bytes(bytes.to_vec()));
    }
    if let Some(date) = js.dyn_ref::<Date>() {
        return Ok(Value::Timestamp(date.get_time() as i64));
    }
    if Array::is_array(js) {
        return Array::from(js)
            .iter()
            .map(|item| value_at(&item, depth + 1))
            .collect::<Result<_, _>>()
            .map(Value::List);
    }
    if js.is_object() && !js.is_function() {
        let mut entries = Vec::new();
        for entry in Object::entries(js.unchecked_ref()).iter() {
            let pair = Array::from(&entry);
            let key = pair.get(0).as_string().unwrap_or_default();
            let item = pair.get(1);
            if item.is_undefined() {
                continue; // as JSON.stringify does
            }
            entries.push((key, value_at(&item, depth + 1)?));
        }
        return Ok(Value::Map(entries));
    }
    Err(Error::argument(
        "value",
        format!("{js:?} cannot be stored (bigint, symbol or function)"),
    ))
}

/// A value read back, as plain JS: text as a string, counters as numbers.
pub(crate) fn to_js(value: &Value) -> JsValue {
    match value {
        Value::Null => JsValue::NULL,
        Value::Bool(b) => JsValue::from_bool(*b),
        Value::Int(i) | Value::Counter(i) => JsValue::from_f64(*i as f64),
        Value::Uint(u) => JsValue::from_f64(*u as f64),
        Value::F64(f) => JsValue::from_f64(*f),
        Value::Str(s) | Value::Text(s) => JsValue::from_str(s),
        Value::Bytes(b) => Uint8Array::from(b.as_slice()).into(),
        Value::Timestamp(t) => Date::new(&JsValue::from_f64(*t as f64)).into(),
        Value::List(items) => items.iter().map(to_js).collect::<Array>().into(),
        Value::Map(entries) => {
            let obj = Object::new();
            for (k, v) in entries {
                set(&obj, k, &to_js(v));
            }
            obj.into()
        }
    }
}

/// `obj[key] = value` on an object we created (cannot fail).
pub(crate) fn set(obj: &Object, key: &str, value: &JsValue) {
    let _ = Reflect::set(obj, &JsValue::from_str(key), value);
}

fn field(obj: &JsValue, name: &str) -> JsValue {
    Reflect::get(obj, &JsValue::from_str(name)).unwrap_or(JsValue::UNDEFINED)
}

fn string_field(obj: &JsValue, name: &'static str, default: Option<&str>) -> Result<String, Error> {
    let v = field(obj, name);
    match (v.as_string(), default) {
        (Some(s), _) => Ok(s),
        (None, Some(d)) if v.is_undefined() => Ok(d.to_owned()),
        _ => Err(Error::argument(
            "op",
            format!("field {name:?} must be a string"),
        )),
    }
}

fn count_field(obj: &JsValue, name: &'static str) -> Result<usize, Error> {
    match field(obj, name).as_f64() {
        Some(n) if n.fract() == 0.0 && n >= 0.0 && n <= u32::MAX as f64 => Ok(n as usize),
        _ => Err(Error::argument(
            "op",
            format!("field {name:?} must be a non-negative integer"),
        )),
    }
}

fn int_field(obj: &JsValue, name: &'static str, default: i64) -> Result<i64, Error> {
    let v = field(obj, name);
    if v.is_undefined() {
        return Ok(default);
    }
    match v.as_f64() {
        Some(n) if n.fract() == 0.0 && n.abs() <= 9_007_199_254_740_991.0 => Ok(n as i64),
        _ => Err(Error::argument(
            "op",
            format!("field {name:?} must be an integer"),
        )),
    }
}

/// An array of edits, each `{op, path, ...}` (see the TypeScript `TandemOp`).
pub(crate) fn ops(js: &JsValue) -> Result<Vec<Op>, Error> {
    if !Array::is_array(js) {
        return Err(Error::argument("ops", "expected an array of edits"));
    }
    Array::from(js).iter().map(|o| op(&o)).collect()
}

fn op(js: &JsValue) -> Result<Op, Error> {
    if !js.is_object() {
        return Err(Error::argument("op", "each edit must be an object"));
    }
    let kind = string_field(js, "op", None)?;
    let path = path(&field(js, "path"))?;
    Ok(match kind.as_str() {
        "put" => Op::Put {
            path,
            value: value(&field(js, "value"))?,
        },
        "putText" => Op::Put {
            path,
            value: Value::Text(string_field(js, "text", Some(""))?),
        },
        "putCounter" => Op::Put {
            path,
            value: Value::Counter(int_field(js, "value", 0)?),
        },
        "insert" => Op::Insert {
            path,
            value: value(&field(js, "value"))?,
        },
        "delete" => Op::Delete { path },
        "splice" => Op::Splice {
            path,
            index: count_field(js, "index")?,
            delete: count_field(js, "deleteCount")?,
            insert: string_field(js, "text", Some(""))?,
        },
        "updateText" => Op::UpdateText {
            path,
            text: string_field(js, "text", None)?,
        },
        "increment" => Op::Increment {
            path,
            by: int_field(js, "by", 1)?,
        },
        other => {
            return Err(Error::argument(
                "op",
                format!(
                    "unknown edit {other:?} (expected put, putText, putCounter, insert, delete, splice, updateText or increment)"
                ),
            ));
        }
    })
}

/// A commit as the `change` event: `{type, documentId, url, origin, peerId?, heads, seq}`.
pub(crate) fn change_event(event: &FeedEvent) -> JsValue {
    let obj = Object::new();
    set(&obj, "type", &"change".into());
    set(&obj, "documentId", &event.document.to_string().into());
    set(&obj, "url", &event.document.url().to_string().into());
    match &event.origin {
        Origin::Local => set(&obj, "origin", &"local".into()),
        Origin::Remote(peer) => {
            set(&obj, "origin", &"remote".into());
            set(&obj, "peerId", &peer.as_str().into());
        }
    }
    let heads: Array = event
        .heads
        .iter()
        .map(|h| JsValue::from_str(&h.to_string()))
        .collect();
    set(&obj, "heads", &heads);
    set(&obj, "seq", &JsValue::from_f64(event.seq as f64));
    obj.into()
}

/// An object from `(key, value)` pairs.
pub(crate) fn object(fields: &[(&str, JsValue)]) -> JsValue {
    let obj = Object::new();
    for (k, v) in fields {
        set(&obj, k, v);
    }
    obj.into()
}

/// Options objects: a field if present and of the right type.
pub(crate) fn option_string(
    options: &JsValue,
    name: &'static str,
) -> Result<Option<String>, Error> {
    if !options.is_object() {
        return Ok(None);
    }
    let v = field(options, name);
    if v.is_undefined() || v.is_null() {
        return Ok(None);
    }
    v.as_string()
        .map(Some)
        .ok_or_else(|| Error::argument("options", format!("{name} must be a string")))
}

/// A boolean option, `default` when absent.
pub(crate) fn option_bool(
    options: &JsValue,
    name: &'static str,
    default: bool,
) -> Result<bool, Error> {
    if !options.is_object() {
        return Ok(default);
    }
    let v = field(options, name);
    if v.is_undefined() || v.is_null() {
        return Ok(default);
    }
    v.as_bool()
        .ok_or_else(|| Error::argument("options", format!("{name} must be a boolean")))
}

/// A millisecond option, `default` when absent.
pub(crate) fn option_ms(options: &JsValue, name: &'static str, default: u32) -> Result<u32, Error> {
    if !options.is_object() {
        return Ok(default);
    }
    let v = field(options, name);
    if v.is_undefined() || v.is_null() {
        return Ok(default);
    }
    match v.as_f64() {
        Some(n) if n.is_finite() && n >= 0.0 => Ok(n.min(u32::MAX as f64) as u32),
        _ => Err(Error::argument(
            "options",
            format!("{name} must be a non-negative number of milliseconds"),
        )),
    }
}
