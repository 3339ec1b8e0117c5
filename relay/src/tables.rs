//! Tables as JSON lines, for `tandem export` and `tandem import`.
//!
//! The format, one JSON object per line:
//!
//! ```text
//! {"table":"tasks","shards":16,"counters":["votes"],"texts":["notes"]}    a table header
//! {"table":"tasks","key":"t1","values":{"title":"buy milk","done":false,"votes":2}}
//! ```
//!
//! A header comes before its table's rows. Values keep their type exactly:
//! JSON integers are integers, numbers with a fraction or exponent are
//! floats (non-finite floats as `{"$float":"NaN"}`), `{"$bytes":"<base64>"}`
//! and `{"$timestamp":<ms>}` carry the other two kinds. A register in
//! conflict exports the value its table's default strategy (last writer
//! wins) picks. Import writes each row with an upsert, so importing a file
//! twice leaves the same rows.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};

use base64::Engine as _;
use serde_json::{Map, Value as Json, json};
use tandem_engine::Storage;
use tandem_engine::rows::{ColumnKind, Rows, TableSchema, Value};

/// Why an export or import failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TablesError {
    /// The store refused.
    #[error(transparent)]
    Rows(#[from] tandem_engine::RowError),
    /// Reading or writing the file failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The store refused the row on this line of the input.
    #[error("line {line}: {source}")]
    Row {
        /// 1-based line number.
        line: usize,
        /// Why (boxed: it is large, and rare).
        source: Box<tandem_engine::RowError>,
    },
    /// A line of the input is not what the format says.
    #[error("line {line}: {reason}")]
    Format {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// What an export or import covered.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TablesReport {
    /// Tables.
    pub tables: usize,
    /// Rows.
    pub rows: usize,
}

fn encode(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Bool(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::Float(f) if f.is_finite() => {
            // serde_json writes 1.0 as "1.0", so a float stays a float.
            serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number)
        }
        Value::Float(f) => json!({ "$float": f.to_string() }),
        Value::String(s) => json!(s),
        Value::Bytes(b) => json!({ "$bytes": base64::engine::general_purpose::STANDARD.encode(b) }),
        Value::Timestamp(t) => json!({ "$timestamp": t }),
    }
}

fn decode(json: &Json) -> Result<Value, String> {
    Ok(match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) if n.is_i64() => Value::Int(n.as_i64().expect("checked")),
        Json::Number(n) if n.is_u64() => return Err(format!("integer {n} is out of range")),
        Json::Number(n) => Value::Float(n.as_f64().ok_or("not a float")?),
        Json::String(s) => Value::String(s.clone()),
        Json::Object(o) if o.len() == 1 => match o.iter().next().expect("one entry") {
            (k, Json::String(b)) if k == "$bytes" => Value::Bytes(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| format!("bad $bytes: {e}"))?,
            ),
            (k, Json::Number(t)) if k == "$timestamp" => {
                Value::Timestamp(t.as_i64().ok_or("bad $timestamp")?)
            }
            (k, Json::String(f)) if k == "$float" => {
                Value::Float(f.parse().map_err(|_| format!("bad $float {f:?}"))?)
            }
            (k, _) => return Err(format!("unknown typed value {k:?}")),
        },
        other => return Err(format!("unsupported value {other}")),
    })
}

/// Write `tables` (every table of the store if empty) to `out`, calling
/// `progress(rows written, rows in total)` as it goes.
pub fn export<S: Storage>(
    rows: &mut Rows<S>,
    tables: &[String],
    out: &mut impl Write,
    mut progress: impl FnMut(usize, usize),
) -> Result<TablesReport, TablesError> {
    let stored = rows.stored_tables()?;
    let names: Vec<(String, u32)> = if tables.is_empty() {
        stored.into_iter().collect()
    } else {
        tables
            .iter()
            .map(|t| (t.clone(), stored.get(t).copied().unwrap_or(16)))
            .collect()
    };
    let mut report = TablesReport::default();
    let mut scanned = Vec::new();
    for (name, shards) in names {
        rows.define(TableSchema::new(&name).shards(shards));
        let all = rows.table(&name).scan()?;
        scanned.push((name, shards, all));
    }
    let total = scanned.iter().map(|(_, _, r)| r.len()).sum();
    for (name, shards, all) in scanned {
        let mut counters = BTreeSet::new();
        let mut texts = BTreeSet::new();
        for row in &all {
            for column in row.values().keys() {
                match row.kind(column) {
                    ColumnKind::Counter => counters.insert(column.clone()),
                    ColumnKind::Text => texts.insert(column.clone()),
                    ColumnKind::Register => false,
                };
            }
        }
        let header =
            json!({ "table": name, "shards": shards, "counters": counters, "texts": texts });
        writeln!(out, "{header}")?;
        report.tables += 1;
        for row in all {
            let values: Map<String, Json> = row
                .values()
                .iter()
                .map(|(c, v)| (c.clone(), encode(v)))
                .collect();
            writeln!(
                out,
                "{}",
                json!({ "table": name, "key": row.key, "values": values })
            )?;
            report.rows += 1;
            progress(report.rows, total);
        }
    }
    out.flush()?;
    Ok(report)
}

/// Read JSON lines written by [`export`] and upsert every row, flushing
/// every `batch` rows (one durable commit each, its rows written with
/// `upsert_many`: one catalog change per shard); `progress(rows, bytes read)`.
pub fn import<S: Storage>(
    rows: &mut Rows<S>,
    input: impl BufRead,
    batch: usize,
    mut progress: impl FnMut(usize, u64),
) -> Result<TablesReport, TablesError> {
    let mut report = TablesReport::default();
    let mut known = BTreeSet::new();
    let mut read = 0u64;
    let mut pending: Vec<PendingRow> = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        read += line.len() as u64 + 1;
        let bad = |reason: String| TablesError::Format {
            line: i + 1,
            reason,
        };
        if line.trim().is_empty() {
            continue;
        }
        let obj: Map<String, Json> =
            serde_json::from_str(&line).map_err(|e| bad(format!("not a JSON object: {e}")))?;
        let table = obj
            .get("table")
            .and_then(Json::as_str)
            .ok_or_else(|| bad("no \"table\"".into()))?
            .to_owned();
        let Some(key) = obj.get("key") else {
            // A header: declare the table.
            let shards = obj.get("shards").and_then(Json::as_u64).unwrap_or(16);
            let list = |field: &str| -> Vec<String> {
                obj.get(field)
                    .and_then(Json::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            // Rows read so far belong to the tables defined before this.
            write_pending(rows, &mut pending)?;
            let mut schema =
                TableSchema::new(&table).shards(shards.clamp(1, u32::MAX as u64) as u32);
            for c in list("counters") {
                schema = schema.counter(c);
            }
            for c in list("texts") {
                schema = schema.text(c);
            }
            rows.define(schema);
            known.insert(table);
            report.tables += 1;
            continue;
        };
        let key = key
            .as_str()
            .ok_or_else(|| bad("\"key\" is not a string".into()))?;
        if !known.contains(&table) {
            return Err(bad(format!(
                "row of table {table:?} before its header line"
            )));
        }
        let values = obj
            .get("values")
            .and_then(Json::as_object)
            .ok_or_else(|| bad("no \"values\" object".into()))?;
        let values = values
            .iter()
            .map(|(c, v)| {
                decode(v)
                    .map(|v| (c.clone(), v))
                    .map_err(|e| bad(format!("column {c:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        pending.push((i + 1, table, key.to_owned(), values));
        report.rows += 1;
        if pending.len() >= batch.max(1) {
            write_pending(rows, &mut pending)?;
            rows.flush()?;
        }
        progress(report.rows, read);
    }
    write_pending(rows, &mut pending)?;
    rows.flush()?;
    Ok(report)
}

/// A row read and not yet written: its line, table, key, columns.
type PendingRow = (usize, String, String, Vec<(String, Value)>);

/// Upsert the rows read, one `upsert_many` per run of rows of one table.
fn write_pending<S: Storage>(
    rows: &mut Rows<S>,
    pending: &mut Vec<PendingRow>,
) -> Result<(), TablesError> {
    for run in pending.chunk_by(|a, b| a.1 == b.1) {
        let mut table = rows.table(&run[0].1);
        let written = table.upsert_many(
            run.iter()
                .map(|(_, _, key, values)| (key, values.iter().cloned())),
        );
        if let Err(e) = written {
            // Name the line: the rows before the failing one were written,
            // so it is the first that fails alone (nothing here is flushed).
            for (line, _, key, values) in run {
                if let Err(source) = table.upsert(key, values.iter().cloned()) {
                    return Err(TablesError::Row {
                        line: *line,
                        source: Box::new(source),
                    });
                }
            }
            return Err(e.into());
        }
    }
    pending.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_engine::{MemoryStorage, PeerId, Repo, RepoConfig, ShareAll};

    fn store() -> Rows<MemoryStorage> {
        let repo = Repo::open(
            MemoryStorage::new(),
            RepoConfig::new(PeerId::new("t")),
            ShareAll,
        )
        .unwrap();
        Rows::new(repo, || 1_000)
    }

    #[test]
    fn every_value_kind_round_trips_exactly() {
        let mut a = store();
        a.define(
            TableSchema::new("tasks")
                .counter("votes")
                .text("notes")
                .shards(4),
        );
        let values = vec![
            ("null", Value::Null),
            ("bool", Value::Bool(true)),
            ("int", Value::Int(-3)),
            ("float", Value::Float(1.0)),
            ("nan", Value::Float(f64::INFINITY)),
            ("string", Value::from("héllo \"q\"")),
            ("bytes", Value::Bytes(vec![0, 1, 255])),
            ("ts", Value::Timestamp(1_700_000_000_123)),
            ("votes", Value::Int(7)),
            ("notes", Value::from("some notes")),
        ];
        a.table("tasks").insert("k1", values.clone()).unwrap();
        a.table("plain")
            .insert("x", [("n", Value::Int(1))])
            .unwrap();
        a.flush().unwrap();
        let mut first = Vec::new();
        let report = export(&mut a, &[], &mut first, |_, _| {}).unwrap();
        assert_eq!(report, TablesReport { tables: 2, rows: 2 });

        let mut b = store();
        let imported = import(&mut b, first.as_slice(), 1, |_, _| {}).unwrap();
        assert_eq!(imported, report);
        let mut second = Vec::new();
        export(&mut b, &[], &mut second, |_, _| {}).unwrap();
        assert_eq!(
            String::from_utf8(first).unwrap(),
            String::from_utf8(second).unwrap()
        );
        let row = b.table("tasks").get("k1").unwrap().unwrap();
        for (c, v) in values {
            assert_eq!(row.get(c), Some(&v), "{c}");
        }
        assert_eq!(row.kind("votes"), ColumnKind::Counter);
        assert_eq!(row.kind("notes"), ColumnKind::Text);
    }

    #[test]
    fn a_batched_import_of_several_tables_round_trips() {
        let mut a = store();
        a.define(TableSchema::new("big").shards(3));
        for i in 0..25 {
            a.table("big")
                .insert(&format!("k{i:02}"), [("n", Value::Int(i))])
                .unwrap();
        }
        for i in 0..4 {
            a.table("small")
                .insert(&format!("s{i}"), [("t", Value::from("x"))])
                .unwrap();
        }
        a.flush().unwrap();
        let mut first = Vec::new();
        let report = export(&mut a, &[], &mut first, |_, _| {}).unwrap();
        assert_eq!(
            report,
            TablesReport {
                tables: 2,
                rows: 29
            }
        );
        // Batches of 7 rows: some end inside a table, one spans both.
        let mut b = store();
        assert_eq!(
            import(&mut b, first.as_slice(), 7, |_, _| {}).unwrap(),
            report
        );
        let mut second = Vec::new();
        export(&mut b, &[], &mut second, |_, _| {}).unwrap();
        assert_eq!(
            String::from_utf8(first).unwrap(),
            String::from_utf8(second).unwrap()
        );
        assert_eq!(b.table("big").scan().unwrap().len(), 25);
    }

    #[test]
    fn bad_lines_name_the_line_and_the_problem() {
        let mut b = store();
        let input =
            "{\"table\":\"t\"}\n{\"table\":\"t\",\"key\":\"k\",\"values\":{\"x\":{\"$what\":1}}}\n";
        let err = import(&mut b, input.as_bytes(), 10, |_, _| {}).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 2: column \"x\": unknown typed value \"$what\""
        );
        let err = import(&mut b, "nonsense\n".as_bytes(), 10, |_, _| {}).unwrap_err();
        assert!(
            err.to_string().starts_with("line 1: not a JSON object"),
            "{err}"
        );
        let err = import(
            &mut b,
            "{\"table\":\"u\",\"key\":\"k\",\"values\":{}}\n".as_bytes(),
            10,
            |_, _| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("before its header"), "{err}");
        // A row the store refuses, in the middle of a batch, is named by
        // its line too.
        let input = "{\"table\":\"c\",\"counters\":[\"votes\"]}\n\
             {\"table\":\"c\",\"key\":\"a\",\"values\":{\"votes\":1}}\n\
             {\"table\":\"c\",\"key\":\"b\",\"values\":{\"votes\":\"many\"}}\n\
             {\"table\":\"c\",\"key\":\"d\",\"values\":{\"votes\":2}}\n";
        let err = import(&mut b, input.as_bytes(), 10, |_, _| {}).unwrap_err();
        assert!(matches!(err, TablesError::Row { line: 3, .. }), "{err:?}");
        assert!(err.to_string().starts_with("line 3: "), "{err}");
        assert!(err.to_string().contains("votes"), "{err}");
    }
}
