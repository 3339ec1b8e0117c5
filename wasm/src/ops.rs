//! Path-addressed edits and reads of a raw automerge document: the small
//! JSON-like API the JS bindings expose, kept free of JS types so it is
//! tested natively.
//!
//! A [`Path`] walks from the root through map keys and list indexes. Writes
//! name their target by the path's last step (the key or index to set);
//! reads return the whole value there, with text as a string and counters as
//! numbers.

use std::fmt;

use tandem_engine::automerge::transaction::Transactable;
use tandem_engine::automerge::{
    AutoCommit, AutomergeError, ObjId, ObjType, Prop, ROOT, ReadDoc, ScalarValue, TextEncoding,
    Value as AmValue,
};

/// One step of a path: a map key or a list index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// A key in a map.
    Map(String),
    /// An index in a list.
    Index(usize),
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Map(k) => write!(f, "{k:?}"),
            Key::Index(i) => write!(f, "{i}"),
        }
    }
}

/// Steps from the document root.
pub type Path = Vec<Key>;

/// Renders a path the way a JS caller wrote it, e.g. `["tasks", 2, "title"]`.
pub(crate) fn show(path: &[Key]) -> String {
    let steps: Vec<String> = path.iter().map(Key::to_string).collect();
    format!("[{}]", steps.join(", "))
}

/// A value to write, or one read back.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer (JS numbers that are safe integers).
    Int(i64),
    /// An unsigned integer (only read: written by other peers).
    Uint(u64),
    /// A float.
    F64(f64),
    /// A plain string: replaced whole when written, last writer wins.
    Str(String),
    /// Bytes.
    Bytes(Vec<u8>),
    /// Milliseconds since the Unix epoch.
    Timestamp(i64),
    /// A counter: concurrent increments add up.
    Counter(i64),
    /// Collaborative text: concurrent splices merge character by character.
    Text(String),
    /// A list.
    List(Vec<Value>),
    /// A map (read back with its keys in sorted order).
    Map(Vec<(String, Value)>),
}

/// An edit. Positions in text are UTF-16 code units, as JS strings count them.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Set the map key or list index the path ends with (an index equal to
    /// the list's length appends). Maps and lists in the value become nested
    /// objects.
    Put {
        /// Where.
        path: Path,
        /// What.
        value: Value,
    },
    /// Insert into a list before the index the path ends with.
    Insert {
        /// Where.
        path: Path,
        /// What.
        value: Value,
    },
    /// Remove the map key or list element the path ends with.
    Delete {
        /// What.
        path: Path,
    },
    /// Replace `delete` units of the text at `path`, starting at `index`, by `insert`.
    Splice {
        /// The text object.
        path: Path,
        /// Start, in UTF-16 code units.
        index: usize,
        /// How many UTF-16 code units to remove.
        delete: usize,
        /// What to insert there.
        insert: String,
    },
    /// Make the text at `path` equal `text`, as the smallest splices (for
    /// inputs that only report the new value, like a textarea).
    UpdateText {
        /// The text object.
        path: Path,
        /// Its new content.
        text: String,
    },
    /// Add `by` to the counter at `path`.
    Increment {
        /// The counter.
        path: Path,
        /// The amount (may be negative).
        by: i64,
    },
}

/// Why an edit or read was refused. Nothing of a refused change is applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpError {
    /// The path names nothing.
    #[error("nothing at {0}")]
    Missing(String),
    /// A step of the path does not fit the object it applies to.
    #[error("{path} is {found}, expected {expected}")]
    WrongType {
        /// The path up to the offending step.
        path: String,
        /// What is there.
        found: String,
        /// What the operation needs.
        expected: &'static str,
    },
    /// An index past the end of a list or text.
    #[error("index {index} is out of bounds at {path} (length {len})")]
    OutOfBounds {
        /// The list or text.
        path: String,
        /// The index given.
        index: usize,
        /// The length there.
        len: usize,
    },
    /// Writes need a key or index to write to.
    #[error("an empty path names the document root, which cannot be replaced or deleted")]
    EmptyPath,
    /// Automerge refused the operation.
    #[error("automerge: {0}")]
    Automerge(#[from] AutomergeError),
}

/// Apply `ops` in order to `doc`. On error the caller rolls back the whole
/// change (see `Repo::change`), so a change is all of its ops or none.
pub fn apply(doc: &mut AutoCommit, ops: &[Op]) -> Result<(), OpError> {
    ops.iter().try_for_each(|op| apply_one(doc, op))
}

fn apply_one(doc: &mut AutoCommit, op: &Op) -> Result<(), OpError> {
    match op {
        Op::Put { path, value } => {
            let (obj, ty, key) = parent(doc, path)?;
            match (ty, key) {
                (ObjType::Map | ObjType::Table, Key::Map(k)) => {
                    put_value(doc, &obj, k.as_str(), value)
                }
                (ObjType::List, Key::Index(i)) => {
                    let len = doc.length(&obj);
                    if *i < len {
                        put_value(doc, &obj, *i, value)
                    } else if *i == len {
                        insert_value(doc, &obj, *i, value)
                    } else {
                        Err(out_of_bounds(&path[..path.len() - 1], *i, len))
                    }
                }
                (ty, _) => Err(wrong_key(path, ty)),
            }
        }
        Op::Insert { path, value } => {
            let (obj, ty, key) = parent(doc, path)?;
            match (ty, key) {
                (ObjType::List, Key::Index(i)) => {
                    let len = doc.length(&obj);
                    if *i > len {
                        return Err(out_of_bounds(&path[..path.len() - 1], *i, len));
                    }
                    insert_value(doc, &obj, *i, value)
                }
                (ty, _) => Err(wrong_type(&path[..path.len() - 1], ty, "a list")),
            }
        }
        Op::Delete { path } => {
            let (obj, ty, key) = parent(doc, path)?;
            match (ty, key) {
                (ObjType::Map | ObjType::Table, Key::Map(k)) => {
                    if doc.get(&obj, k.as_str())?.is_none() {
                        return Err(OpError::Missing(show(path)));
                    }
                    doc.delete(&obj, k.as_str())?;
                    Ok(())
                }
                (ObjType::List, Key::Index(i)) => {
                    let len = doc.length(&obj);
                    if *i >= len {
                        return Err(out_of_bounds(&path[..path.len() - 1], *i, len));
                    }
                    doc.delete(&obj, *i)?;
                    Ok(())
                }
                (ty, _) => Err(wrong_key(path, ty)),
            }
        }
        Op::Splice {
            path,
            index,
            delete,
            insert,
        } => {
            let obj = text_at(doc, path)?;
            let current = doc.text(&obj)?;
            let units = current.encode_utf16().count();
            if index.saturating_add(*delete) > units {
                return Err(out_of_bounds(path, index + delete, units));
            }
            let encoding = doc.text_encoding();
            let start = to_doc_units(&current, *index, encoding)?;
            let end = to_doc_units(&current, index + delete, encoding)?;
            let del = isize::try_from(end - start).map_err(|_| AutomergeError::Fail)?;
            doc.splice_text(&obj, start, del, insert)?;
            Ok(())
        }
        Op::UpdateText { path, text } => {
            let obj = text_at(doc, path)?;
            doc.update_text(&obj, text)?;
            Ok(())
        }
        Op::Increment { path, by } => {
            let (obj, _, key) = parent(doc, path)?;
            let prop = prop(key);
            match doc.get(&obj, prop.clone())? {
                Some((AmValue::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Counter(_)) => {
                    doc.increment(&obj, prop, *by)?;
                    Ok(())
                }
                Some((v, _)) => Err(OpError::WrongType {
                    path: show(path),
                    found: describe(&v),
                    expected: "a counter",
                }),
                None => Err(OpError::Missing(show(path))),
            }
        }
    }
}

/// Read the value at `path` (`None` if nothing is there). The empty path
/// reads the whole document.
pub fn read<D: ReadDoc>(doc: &D, path: &[Key]) -> Result<Option<Value>, OpError> {
    let Some((last, init)) = path.split_last() else {
        return Ok(Some(read_object(doc, &ROOT, ObjType::Map)?));
    };
    let (obj, _) = object_at(doc, init)?;
    match doc.get(&obj, prop(last))? {
        Some((v, id)) => Ok(Some(read_value(doc, v, &id)?)),
        None => Ok(None),
    }
}

/// Every value concurrently written at `path`: more than one when peers
/// wrote it at the same time and nobody has written it since (automerge
/// picks one of them as the value [`read`] returns, the same on every peer).
pub fn read_all<D: ReadDoc>(doc: &D, path: &[Key]) -> Result<Vec<Value>, OpError> {
    let Some((last, init)) = path.split_last() else {
        return Ok(vec![read_object(doc, &ROOT, ObjType::Map)?]);
    };
    let (obj, _) = object_at(doc, init)?;
    doc.get_all(&obj, prop(last))?
        .into_iter()
        .map(|(v, id)| read_value(doc, v, &id))
        .collect()
}

/// The keys of the map at `path`, or the indexes of the list there as text.
pub fn keys<D: ReadDoc>(doc: &D, path: &[Key]) -> Result<Vec<String>, OpError> {
    let (obj, ty) = object_at(doc, path)?;
    Ok(match ty {
        ObjType::Map | ObjType::Table => doc.keys(&obj).collect(),
        ObjType::List | ObjType::Text => (0..doc.length(&obj)).map(|i| i.to_string()).collect(),
    })
}

fn prop(key: &Key) -> Prop {
    match key {
        Key::Map(k) => Prop::Map(k.clone()),
        Key::Index(i) => Prop::Seq(*i),
    }
}

/// The object `path` names and its type.
fn object_at<D: ReadDoc>(doc: &D, path: &[Key]) -> Result<(ObjId, ObjType), OpError> {
    let mut obj = ROOT;
    let mut ty = ObjType::Map;
    for (depth, key) in path.iter().enumerate() {
        let here = &path[..=depth];
        match (ty, key) {
            (ObjType::Map | ObjType::Table, Key::Map(_)) | (ObjType::List, Key::Index(_)) => {}
            (ty, _) => return Err(wrong_key(here, ty)),
        }
        match doc.get(&obj, prop(key))? {
            Some((AmValue::Object(t), id)) => {
                obj = id;
                ty = t;
            }
            Some((v, _)) => {
                return Err(OpError::WrongType {
                    path: show(here),
                    found: describe(&v),
                    expected: "a map, list or text",
                });
            }
            None => return Err(OpError::Missing(show(here))),
        }
    }
    Ok((obj, ty))
}

/// The object holding the path's last step, its type, and that step.
fn parent<'p>(doc: &AutoCommit, path: &'p [Key]) -> Result<(ObjId, ObjType, &'p Key), OpError> {
    let (last, init) = path.split_last().ok_or(OpError::EmptyPath)?;
    let (obj, ty) = object_at(doc, init)?;
    Ok((obj, ty, last))
}

fn text_at(doc: &AutoCommit, path: &[Key]) -> Result<ObjId, OpError> {
    match object_at(doc, path)? {
        (obj, ObjType::Text) => Ok(obj),
        (_, ty) => Err(wrong_type(path, ty, "text")),
    }
}

/// The object at `path` is of type `ty`, which the operation cannot use.
fn wrong_type(path: &[Key], ty: ObjType, expected: &'static str) -> OpError {
    OpError::WrongType {
        path: show(path),
        found: format!("a {ty}"),
        expected,
    }
}

/// The last step of `path` does not fit the object before it (a number on a
/// map, a key on a list, anything on text).
fn wrong_key(path: &[Key], ty: ObjType) -> OpError {
    let expected = match path.last() {
        Some(Key::Map(_)) => "a map (the step is a key)",
        _ => "a list (the step is an index)",
    };
    wrong_type(&path[..path.len().saturating_sub(1)], ty, expected)
}

fn out_of_bounds(path: &[Key], index: usize, len: usize) -> OpError {
    OpError::OutOfBounds {
        path: show(path),
        index,
        len,
    }
}

fn describe(v: &AmValue<'_>) -> String {
    match v {
        AmValue::Object(t) => format!("a {t}"),
        AmValue::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(_) => "a string".into(),
            ScalarValue::Counter(_) => "a counter".into(),
            ScalarValue::Null => "null".into(),
            ScalarValue::Boolean(_) => "a boolean".into(),
            ScalarValue::Bytes(_) => "bytes".into(),
            ScalarValue::Timestamp(_) => "a timestamp".into(),
            _ => "a number".into(),
        },
    }
}

/// A UTF-16 offset into `text` (in bounds) in the document's own text units.
fn to_doc_units(text: &str, utf16: usize, encoding: TextEncoding) -> Result<usize, OpError> {
    let mut units = 0;
    let mut byte = None;
    for (i, c) in text.char_indices() {
        if units >= utf16 {
            byte = (units == utf16).then_some(i);
            break;
        }
        units += c.len_utf16();
    }
    let byte = match byte {
        Some(b) => b,
        None if units == utf16 => text.len(),
        // The offset falls between the two halves of a surrogate pair.
        None => return Err(AutomergeError::InvalidIndex(utf16).into()),
    };
    let prefix = &text[..byte];
    Ok(match encoding {
        TextEncoding::Utf16CodeUnit => utf16,
        TextEncoding::Utf8CodeUnit => prefix.len(),
        TextEncoding::UnicodeCodePoint => prefix.chars().count(),
        other => {
            return Err(AutomergeError::EncodingError(format!(
                "text encoding {other:?} is not supported by splice; use updateText"
            ))
            .into());
        }
    })
}

fn scalar(value: &Value) -> Option<ScalarValue> {
    Some(match value {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(*b),
        Value::Int(i) => ScalarValue::Int(*i),
        Value::Uint(u) => ScalarValue::Uint(*u),
        Value::F64(f) => ScalarValue::F64(*f),
        Value::Str(s) => ScalarValue::Str(s.as_str().into()),
        Value::Bytes(b) => ScalarValue::Bytes(b.clone()),
        Value::Timestamp(t) => ScalarValue::Timestamp(*t),
        Value::Counter(c) => ScalarValue::counter(*c),
        Value::Text(_) | Value::List(_) | Value::Map(_) => return None,
    })
}

fn object_type(value: &Value) -> ObjType {
    match value {
        Value::Text(_) => ObjType::Text,
        Value::List(_) => ObjType::List,
        _ => ObjType::Map,
    }
}

fn put_value<P: Into<Prop>>(
    doc: &mut AutoCommit,
    obj: &ObjId,
    prop: P,
    value: &Value,
) -> Result<(), OpError> {
    match scalar(value) {
        Some(s) => doc.put(obj, prop, s)?,
        None => {
            let child = doc.put_object(obj, prop, object_type(value))?;
            fill(doc, &child, value)?;
        }
    }
    Ok(())
}

fn insert_value(
    doc: &mut AutoCommit,
    obj: &ObjId,
    index: usize,
    value: &Value,
) -> Result<(), OpError> {
    match scalar(value) {
        Some(s) => doc.insert(obj, index, s)?,
        None => {
            let child = doc.insert_object(obj, index, object_type(value))?;
            fill(doc, &child, value)?;
        }
    }
    Ok(())
}

/// Write the content of a new object.
fn fill(doc: &mut AutoCommit, obj: &ObjId, value: &Value) -> Result<(), OpError> {
    match value {
        Value::Text(t) => doc.splice_text(obj, 0, 0, t)?,
        Value::List(items) => {
            for (i, item) in items.iter().enumerate() {
                insert_value(doc, obj, i, item)?;
            }
        }
        Value::Map(entries) => {
            for (k, v) in entries {
                put_value(doc, obj, k.as_str(), v)?;
            }
        }
        _ => unreachable!("only objects are filled"),
    }
    Ok(())
}

fn read_value<D: ReadDoc>(doc: &D, v: AmValue<'_>, id: &ObjId) -> Result<Value, OpError> {
    Ok(match v {
        AmValue::Object(ty) => read_object(doc, id, ty)?,
        AmValue::Scalar(s) => match s.as_ref() {
            ScalarValue::Null | ScalarValue::Unknown { .. } => Value::Null,
            ScalarValue::Boolean(b) => Value::Bool(*b),
            ScalarValue::Int(i) => Value::Int(*i),
            ScalarValue::Uint(u) => Value::Uint(*u),
            ScalarValue::F64(f) => Value::F64(*f),
            ScalarValue::Str(s) => Value::Str(s.to_string()),
            ScalarValue::Bytes(b) => Value::Bytes(b.clone()),
            ScalarValue::Timestamp(t) => Value::Timestamp(*t),
            ScalarValue::Counter(c) => Value::Counter(i64::from(c)),
        },
    })
}

fn read_object<D: ReadDoc>(doc: &D, obj: &ObjId, ty: ObjType) -> Result<Value, OpError> {
    Ok(match ty {
        ObjType::Text => Value::Text(doc.text(obj)?),
        ObjType::List => {
            let mut items = Vec::with_capacity(doc.length(obj));
            for i in 0..doc.length(obj) {
                if let Some((v, id)) = doc.get(obj, i)? {
                    items.push(read_value(doc, v, &id)?);
                }
            }
            Value::List(items)
        }
        ObjType::Map | ObjType::Table => {
            let mut entries = Vec::new();
            for k in doc.keys(obj) {
                if let Some((v, id)) = doc.get(obj, k.as_str())? {
                    entries.push((k.clone(), read_value(doc, v, &id)?));
                }
            }
            Value::Map(entries)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> Key {
        Key::Map(s.into())
    }

    fn doc_with(ops: &[Op]) -> AutoCommit {
        let mut doc = AutoCommit::new();
        apply(&mut doc, ops).unwrap();
        doc.commit();
        doc
    }

    fn task(title: &str) -> Value {
        // In key order, as automerge lists map keys.
        Value::Map(vec![
            ("done".into(), Value::Bool(false)),
            ("notes".into(), Value::Text("first".into())),
            ("title".into(), Value::Str(title.into())),
            ("votes".into(), Value::Counter(0)),
        ])
    }

    #[test]
    fn nested_values_round_trip() {
        let doc = doc_with(&[Op::Put {
            path: vec![k("tasks")],
            value: Value::List(vec![task("buy milk")]),
        }]);
        assert_eq!(
            read(&doc, &[k("tasks"), Key::Index(0)]).unwrap(),
            Some(task("buy milk"))
        );
        assert_eq!(
            read(&doc, &[]).unwrap(),
            Some(Value::Map(vec![(
                "tasks".into(),
                Value::List(vec![task("buy milk")])
            )]))
        );
        assert_eq!(read(&doc, &[k("nothing")]).unwrap(), None);
        assert_eq!(keys(&doc, &[k("tasks")]).unwrap(), vec!["0"]);
    }

    #[test]
    fn splice_counts_utf16_like_js() {
        let notes = vec![k("notes")];
        let mut doc = doc_with(&[Op::Put {
            path: notes.clone(),
            value: Value::Text("a😀b".into()),
        }]);
        // In JS "a😀b".length is 4: the emoji is two UTF-16 units.
        apply(
            &mut doc,
            &[Op::Splice {
                path: notes.clone(),
                index: 3,
                delete: 1,
                insert: "c".into(),
            }],
        )
        .unwrap();
        assert_eq!(
            read(&doc, &notes).unwrap(),
            Some(Value::Text("a😀c".into()))
        );
        apply(
            &mut doc,
            &[Op::Splice {
                path: notes.clone(),
                index: 1,
                delete: 2,
                insert: "-".into(),
            }],
        )
        .unwrap();
        assert_eq!(read(&doc, &notes).unwrap(), Some(Value::Text("a-c".into())));
        let err = apply(
            &mut doc,
            &[Op::Splice {
                path: notes.clone(),
                index: 2,
                delete: 5,
                insert: String::new(),
            }],
        )
        .unwrap_err();
        assert!(err.to_string().contains("out of bounds"), "{err}");
        apply(
            &mut doc,
            &[Op::UpdateText {
                path: notes.clone(),
                text: "abc!".into(),
            }],
        )
        .unwrap();
        assert_eq!(
            read(&doc, &notes).unwrap(),
            Some(Value::Text("abc!".into()))
        );
    }

    #[test]
    fn counters_add_up_and_refuse_other_values() {
        let mut doc = doc_with(&[
            Op::Put {
                path: vec![k("n")],
                value: Value::Counter(1),
            },
            Op::Put {
                path: vec![k("s")],
                value: Value::Str("x".into()),
            },
        ]);
        apply(
            &mut doc,
            &[Op::Increment {
                path: vec![k("n")],
                by: 4,
            }],
        )
        .unwrap();
        assert_eq!(read(&doc, &[k("n")]).unwrap(), Some(Value::Counter(5)));
        let err = apply(
            &mut doc,
            &[Op::Increment {
                path: vec![k("s")],
                by: 1,
            }],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), r#"["s"] is a string, expected a counter"#);
    }

    #[test]
    fn lists_insert_append_and_delete() {
        let items = || vec![k("items")];
        let at = |i| vec![k("items"), Key::Index(i)];
        let mut doc = doc_with(&[Op::Put {
            path: items(),
            value: Value::List(vec![]),
        }]);
        let ops = [
            Op::Put {
                path: at(0),
                value: Value::Int(1),
            },
            Op::Put {
                path: at(1),
                value: Value::Int(3),
            },
            Op::Insert {
                path: at(1),
                value: Value::Int(2),
            },
            Op::Delete { path: at(0) },
        ];
        apply(&mut doc, &ops).unwrap();
        assert_eq!(
            read(&doc, &items()).unwrap(),
            Some(Value::List(vec![Value::Int(2), Value::Int(3)]))
        );
        let err = apply(
            &mut doc,
            &[Op::Put {
                path: at(5),
                value: Value::Null,
            }],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"index 5 is out of bounds at ["items"] (length 2)"#
        );
    }

    #[test]
    fn errors_name_the_path() {
        let mut doc = doc_with(&[Op::Put {
            path: vec![k("title")],
            value: Value::Str("t".into()),
        }]);
        let cases = [
            (
                Op::Put {
                    path: vec![k("title"), k("x")],
                    value: Value::Null,
                },
                r#"["title"] is a string, expected a map, list or text"#,
            ),
            (
                Op::Delete {
                    path: vec![k("missing")],
                },
                r#"nothing at ["missing"]"#,
            ),
            (
                Op::Put {
                    path: vec![Key::Index(0)],
                    value: Value::Null,
                },
                "[] is a map, expected a list (the step is an index)",
            ),
            (
                Op::Delete { path: vec![] },
                "an empty path names the document root, which cannot be replaced or deleted",
            ),
            (
                Op::Splice {
                    path: vec![k("title")],
                    index: 0,
                    delete: 0,
                    insert: "x".into(),
                },
                r#"["title"] is a string, expected a map, list or text"#,
            ),
        ];
        for (op, message) in cases {
            let err = apply(&mut doc, &[op]).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn concurrent_writes_are_all_visible() {
        let mut a = doc_with(&[Op::Put {
            path: vec![k("title")],
            value: Value::Str("base".into()),
        }]);
        let mut b = a.fork();
        apply(
            &mut a,
            &[Op::Put {
                path: vec![k("title")],
                value: Value::Str("from a".into()),
            }],
        )
        .unwrap();
        apply(
            &mut b,
            &[Op::Put {
                path: vec![k("title")],
                value: Value::Str("from b".into()),
            }],
        )
        .unwrap();
        a.merge(&mut b).unwrap();
        let mut all = read_all(&a, &[k("title")]).unwrap();
        all.sort_by_key(|v| format!("{v:?}"));
        assert_eq!(
            all,
            vec![Value::Str("from a".into()), Value::Str("from b".into())]
        );
    }
}
