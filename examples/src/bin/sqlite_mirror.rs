//! Keep a SQLite table in step with a Tandem table through the row change
//! feed (change data capture), idempotently and crash-safely.
//!
//! ```text
//! sqlite_mirror --store STORE.redb --sqlite MIRROR.db --table tasks [--batch N] [--consumer NAME] [--verify]
//! ```
//!
//! It reads [`RowEvent`]s from the store's durable change feed after its
//! cursor, applies them to SQLite, and stops once it has caught up:
//!
//! - an insert replaces the SQLite row with the event's columns (an insert
//!   after a delete revives the row with only the inserted values);
//! - an update is an UPSERT of the changed columns by primary key;
//! - a delete is a DELETE by primary key;
//! - a conflict event (an automatic resolution) is recorded in
//!   `tandem_conflicts`, so no resolution is silent here either.
//!
//! The cursor lives in SQLite (`tandem_cursor`) and is written **in the same
//! SQLite transaction** as the row changes of the batch it covers, so a kill
//! at any instant leaves either the whole batch and its cursor or neither,
//! and a restart resumes exactly where the last committed batch ended. Every
//! operation is keyed by primary key, so replaying events (a cursor set back
//! by hand, a restored backup) converges to the same rows.
//!
//! The SQLite table has a `_key` primary key (Tandem column names cannot
//! start with `_`) and one untyped column per Tandem column, added as they
//! appear. Values map as: null → NULL, bool → INTEGER 0/1, int → INTEGER,
//! float → REAL, string → TEXT, bytes → BLOB, timestamp → INTEGER
//! (milliseconds); an absent column, or a multi-value register in conflict,
//! is NULL. Registers are read with the table's strategy: this program reads
//! every table as last-writer-wins (the default); a table with other
//! strategies needs its [`TableSchema`](tandem_engine::rows::TableSchema)
//! passed to `Rows::define` here too.
//!
//! The store is a redb file, which one process opens at a time: run the
//! mirror when the writer is not running, or embed its `Mirror` in the
//! writer's process (the loop is the same).
//!
//! Run: `cargo run -p tandem-examples --bin sqlite_mirror -- --store s.redb --sqlite m.db --table tasks --verify`

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use rusqlite::types::Value as Sql;
use rusqlite::{Connection, OptionalExtension, params};
use tandem_engine::rows::{RowChange, RowEvent, Rows, Value};
use tandem_engine::{Cursor, PeerId, RedbStorage, Repo, RepoConfig, ShareAll, Storage};

struct Args {
    store: PathBuf,
    sqlite: PathBuf,
    table: String,
    batch: usize,
    consumer: String,
    verify: bool,
}

fn parse_args() -> Result<Args> {
    let usage = "usage: sqlite_mirror --store STORE.redb --sqlite MIRROR.db --table NAME \
                 [--batch N] [--consumer NAME] [--verify]";
    let (mut store, mut sqlite, mut table) = (None, None, None);
    let (mut batch, mut consumer, mut verify) = (64, "sqlite-mirror".to_owned(), false);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{flag} needs a value\n{usage}"))
        };
        match flag.as_str() {
            "--store" => store = Some(PathBuf::from(value()?)),
            "--sqlite" => sqlite = Some(PathBuf::from(value()?)),
            "--table" => table = Some(value()?),
            "--batch" => batch = value()?.parse().context("--batch takes a number")?,
            "--consumer" => consumer = value()?,
            "--verify" => verify = true,
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{usage}"),
        }
    }
    ensure!(batch > 0, "--batch must be at least 1");
    Ok(Args {
        store: store.context(usage)?,
        sqlite: sqlite.context(usage)?,
        table: table.context(usage)?,
        batch,
        consumer,
        verify,
    })
}

/// How a Tandem value is stored in SQLite.
fn to_sql(value: &Value) -> Sql {
    match value {
        Value::Null => Sql::Null,
        Value::Bool(b) => Sql::Integer(i64::from(*b)),
        Value::Int(i) | Value::Timestamp(i) => Sql::Integer(*i),
        Value::Float(f) => Sql::Real(*f),
        Value::String(s) => Sql::Text(s.clone()),
        Value::Bytes(b) => Sql::Blob(b.clone()),
    }
}

/// An SQL identifier, quoted.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The SQLite side: one mirrored table, its cursor, and the conflict log.
struct Mirror {
    conn: Connection,
    table: String,
    consumer: String,
}

impl Mirror {
    fn open(path: &std::path::Path, table: &str, consumer: &str) -> Result<Self> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening SQLite database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS tandem_cursor (
                 consumer TEXT PRIMARY KEY NOT NULL,
                 seq INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS tandem_conflicts (
                 seq INTEGER NOT NULL, key TEXT NOT NULL, col TEXT NOT NULL,
                 versions TEXT NOT NULL, resolved,
                 PRIMARY KEY (seq, key, col));
             CREATE TABLE IF NOT EXISTS {} (_key TEXT PRIMARY KEY NOT NULL);",
            ident(table)
        ))?;
        Ok(Self {
            conn,
            table: table.to_owned(),
            consumer: consumer.to_owned(),
        })
    }

    /// The feed position every committed batch so far reaches.
    fn cursor(&self) -> Result<Cursor> {
        let seq: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM tandem_cursor WHERE consumer = ?1",
                params![self.consumer],
                |r| r.get(0),
            )
            .optional()?;
        Ok(Cursor(seq.map_or(0, |s| s as u64)))
    }

    /// Apply a batch of events and move the cursor to `next`, atomically.
    fn apply(&mut self, events: &[RowEvent], next: Cursor) -> Result<()> {
        let tx = self.conn.transaction()?;
        let table = ident(&self.table);
        let mut columns: BTreeSet<String> = {
            let mut stmt = tx.prepare("SELECT name FROM pragma_table_info(?1)")?;
            stmt.query_map(params![self.table], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        for event in events.iter().filter(|e| e.table == self.table) {
            for column in event.columns.keys() {
                if columns.insert(column.clone()) {
                    tx.execute(
                        &format!("ALTER TABLE {table} ADD COLUMN {}", ident(column)),
                        [],
                    )?;
                }
            }
            let names: Vec<String> = event.columns.keys().map(|c| ident(c)).collect();
            let mut values: Vec<Sql> = vec![Sql::Text(event.key.clone())];
            values.extend(
                event
                    .columns
                    .values()
                    .map(|v| v.as_ref().map_or(Sql::Null, to_sql)),
            );
            let placeholders: Vec<String> = (1..=values.len()).map(|i| format!("?{i}")).collect();
            let column_list = std::iter::once("_key".to_owned())
                .chain(names.iter().cloned())
                .collect::<Vec<_>>()
                .join(", ");
            match &event.change {
                RowChange::Inserted => {
                    // The whole row: columns the event does not name are gone.
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE _key = ?1"),
                        params![event.key],
                    )?;
                    tx.execute(
                        &format!(
                            "INSERT INTO {table} ({column_list}) VALUES ({})",
                            placeholders.join(", ")
                        ),
                        rusqlite::params_from_iter(values),
                    )?;
                }
                RowChange::Updated => {
                    let set = if names.is_empty() {
                        "_key = excluded._key".to_owned()
                    } else {
                        names
                            .iter()
                            .map(|n| format!("{n} = excluded.{n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    tx.execute(
                        &format!(
                            "INSERT INTO {table} ({column_list}) VALUES ({}) \
                             ON CONFLICT(_key) DO UPDATE SET {set}",
                            placeholders.join(", ")
                        ),
                        rusqlite::params_from_iter(values),
                    )?;
                }
                RowChange::Deleted => {
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE _key = ?1"),
                        params![event.key],
                    )?;
                }
                RowChange::Conflict {
                    column,
                    versions,
                    resolved,
                } => {
                    let versions = versions
                        .iter()
                        .map(|v| format!("{} at {}", v.value, v.at))
                        .collect::<Vec<_>>()
                        .join("; ");
                    tx.execute(
                        "INSERT OR REPLACE INTO tandem_conflicts (seq, key, col, versions, resolved)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![
                            event.seq as i64,
                            event.key,
                            column,
                            versions,
                            resolved.as_ref().map_or(Sql::Null, to_sql)
                        ],
                    )?;
                }
            }
        }
        tx.execute(
            "INSERT INTO tandem_cursor (consumer, seq) VALUES (?1, ?2)
             ON CONFLICT(consumer) DO UPDATE SET seq = excluded.seq",
            params![self.consumer, next.0 as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Every row: key → non-NULL columns.
    fn rows(&self) -> Result<BTreeMap<String, BTreeMap<String, Sql>>> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT * FROM {}", ident(&self.table)))?;
        let names: Vec<String> = stmt.column_names().map(String::from).collect();
        let mut out = BTreeMap::new();
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let mut key = String::new();
            let mut values = BTreeMap::new();
            for (i, name) in names.iter().enumerate() {
                let v: Sql = row.get(i)?;
                if name == "_key" {
                    if let Sql::Text(k) = v {
                        key = k;
                    }
                } else if v != Sql::Null {
                    values.insert(name.clone(), v);
                }
            }
            out.insert(key, values);
        }
        Ok(out)
    }
}

/// Apply every event after the mirror's cursor, `batch` feed entries per
/// SQLite transaction. Returns the final cursor.
fn catch_up<S: Storage>(rows: &mut Rows<S>, mirror: &mut Mirror, batch: usize) -> Result<Cursor> {
    let mut cursor = mirror.cursor()?;
    // Each round either moves the cursor forward or stops, so this ends.
    loop {
        let (events, next) = rows.changes(cursor, batch)?;
        if next <= cursor {
            return Ok(cursor);
        }
        println!("applying {} events through seq {}", events.len(), next.0);
        mirror.apply(&events, next)?;
        println!("applied through seq {}", next.0);
        cursor = next;
    }
}

/// Compare SQLite with what the table's `scan` returns.
fn verify<S: Storage>(rows: &mut Rows<S>, mirror: &Mirror) -> Result<usize> {
    let expected: BTreeMap<String, BTreeMap<String, Sql>> = rows
        .table(&mirror.table)
        .scan()?
        .into_iter()
        .map(|row| {
            let values = row
                .values()
                .iter()
                .map(|(c, v)| (c.clone(), to_sql(v)))
                .filter(|(_, v)| *v != Sql::Null)
                .collect();
            (row.key, values)
        })
        .collect();
    let actual = mirror.rows()?;
    if actual != expected {
        for key in expected
            .keys()
            .chain(actual.keys())
            .collect::<BTreeSet<_>>()
        {
            let (e, a) = (expected.get(key), actual.get(key));
            if e != a {
                eprintln!("row {key:?}: tandem {e:?}, sqlite {a:?}");
            }
        }
        bail!("SQLite differs from the Tandem table");
    }
    Ok(expected.len())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let storage = RedbStorage::open(&args.store)
        .with_context(|| format!("opening store {}", args.store.display()))?;
    let repo = Repo::open(
        storage,
        RepoConfig::new(PeerId::new("sqlite-mirror")),
        ShareAll,
    )?;
    let mut rows = Rows::with_system_clock(repo);
    let mut mirror = Mirror::open(&args.sqlite, &args.table, &args.consumer)?;
    let start = mirror.cursor()?;
    println!("resuming after seq {}", start.0);
    let end = catch_up(&mut rows, &mut mirror, args.batch)?;
    println!("caught up at seq {}", end.0);
    if args.verify {
        let n = verify(&mut rows, &mirror)?;
        println!("verified: {n} rows match the Tandem table");
    }
    Ok(())
}
