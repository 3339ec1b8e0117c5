//! The `sqlite_mirror` example under fire: a writer makes many inserts,
//! updates, deletes and revivals in a redb store; the mirror runs as its own
//! process and is SIGKILLed at random moments while catching up, then
//! restarted; in the end SQLite holds exactly the rows `Table::scan` returns.
//!
//! Set `TANDEM_TEST_SEED` to replay a run (the seed is printed).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::types::Value as Sql;
use rusqlite::{Connection, OptionalExtension};
use tandem_engine::rows::{Rows, TableSchema, Value};
use tandem_engine::{PeerId, RedbStorage, Repo, RepoConfig, ShareAll};

const TABLE: &str = "tasks";
const KEYS: usize = 60;
/// Restarts of the mirror per round at most (each one killed).
const KILLS_PER_ROUND: usize = 6;
const ROUNDS: usize = 3;
/// Writes before each round of kills.
const OPS_PER_ROUND: usize = 160;

fn schema() -> TableSchema {
    TableSchema::new(TABLE).counter("votes").text("notes")
}

fn open(store: &Path) -> Rows<RedbStorage> {
    let repo = Repo::open(
        RedbStorage::open(store).expect("open store"),
        RepoConfig::new(PeerId::new("writer")),
        ShareAll,
    )
    .expect("open repo");
    let mut rows = Rows::with_system_clock(repo);
    rows.define(schema());
    rows
}

/// What the writer did, to check the run exercised every rule.
#[derive(Default, Debug)]
struct Tally {
    inserts: usize,
    revivals: usize,
    updates: usize,
    deletes: usize,
    increments: usize,
    splices: usize,
    deleted_keys: BTreeSet<String>,
}

fn random_value(rng: &mut StdRng, column: &str) -> Value {
    match column {
        "title" => Value::from(format!("task {}", rng.random_range(0..1000))),
        "n" => Value::Int(rng.random_range(-500..500)),
        "done" => Value::Bool(rng.random_bool(0.5)),
        "score" => Value::Float(f64::from(rng.random_range(0..10_000)) / 7.0),
        "blob" => Value::Bytes((0..rng.random_range(0..6)).map(|_| rng.random()).collect()),
        "due" => Value::Timestamp(1_700_000_000_000 + rng.random_range(0..1_000_000)),
        _ => Value::Null,
    }
}

fn random_columns(rng: &mut StdRng) -> Vec<(&'static str, Value)> {
    const COLUMNS: [&str; 7] = ["title", "n", "done", "score", "blob", "due", "gone"];
    let count = rng.random_range(1..=4);
    let mut picked = BTreeSet::new();
    while picked.len() < count {
        picked.insert(COLUMNS[rng.random_range(0..COLUMNS.len())]);
    }
    picked
        .into_iter()
        .map(|c| (c, random_value(rng, c)))
        .collect()
}

/// `ops` random writes, flushed every four on average. Returns the feed's last seq.
fn write(store: &Path, rng: &mut StdRng, ops: usize, tally: &mut Tally) -> u64 {
    let mut rows = open(store);
    for _ in 0..ops {
        let key = format!("k{:02}", rng.random_range(0..KEYS));
        let mut table = rows.table(TABLE);
        let live = table.get(&key).expect("get").is_some();
        if !live {
            table
                .insert(&key, random_columns(rng))
                .expect("insert an absent or deleted row");
            if tally.deleted_keys.contains(&key) {
                tally.revivals += 1;
            }
            tally.inserts += 1;
        } else {
            match rng.random_range(0..100) {
                0..40 => {
                    table.update(&key, random_columns(rng)).expect("update");
                    tally.updates += 1;
                }
                40..55 => {
                    table.delete(&key).expect("delete");
                    tally.deleted_keys.insert(key.clone());
                    tally.deletes += 1;
                }
                55..70 => {
                    table
                        .increment(&key, "votes", rng.random_range(-3..10))
                        .expect("increment");
                    tally.increments += 1;
                }
                70..85 => {
                    let len = table
                        .get(&key)
                        .expect("get")
                        .and_then(|r| r.get("notes").and_then(|v| v.as_str().map(str::len)))
                        .unwrap_or(0);
                    let at = rng.random_range(0..=len);
                    let delete = if at < len {
                        rng.random_range(0..2i32) as isize
                    } else {
                        0
                    };
                    table
                        .splice_text(&key, "notes", at, delete, "ab")
                        .expect("splice");
                    tally.splices += 1;
                }
                _ => {
                    table.upsert(&key, random_columns(rng)).expect("upsert");
                    tally.updates += 1;
                }
            }
        }
        if rng.random_range(0..4) == 0 {
            rows.flush().expect("flush");
        }
    }
    rows.flush().expect("flush");
    rows.repo().feed().last_seq().expect("last seq")
}

fn mirror(store: &Path, sqlite: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sqlite_mirror"));
    command
        .arg("--store")
        .arg(store)
        .arg("--sqlite")
        .arg(sqlite)
        .args(["--table", TABLE, "--batch", "4"]);
    command
}

/// A running mirror and its stdout lines.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

fn start(store: &Path, sqlite: &Path) -> Running {
    let mut child = mirror(store, sqlite)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sqlite_mirror");
    let stdout = child.stdout.take().expect("piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Running { child, lines }
}

/// The mirror's durable cursor, read as a fresh process would (this also
/// runs SQLite's recovery after a kill).
fn sqlite_cursor(sqlite: &Path) -> u64 {
    if !sqlite.exists() {
        return 0;
    }
    let conn = Connection::open(sqlite).expect("open sqlite");
    let has_table: bool = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'tandem_cursor'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .expect("schema query")
        > 0;
    if !has_table {
        return 0;
    }
    conn.query_row(
        "SELECT seq FROM tandem_cursor WHERE consumer = 'sqlite-mirror'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .expect("cursor query")
    .map_or(0, |s| s as u64)
}

/// Wait for `wanted` lines starting with `marker`. Returns the last such
/// line, or `None` if the mirror finished (caught up, or its output ended)
/// first.
fn wait_for_lines(run: &Running, marker: &str, wanted: usize, deadline: Instant) -> Option<String> {
    let mut seen = 0;
    let mut last = None;
    while seen < wanted {
        match run.lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.starts_with(marker) => {
                seen += 1;
                last = Some(line);
            }
            Ok(line) if line.starts_with("caught up") => return None,
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(Instant::now() < deadline, "mirror made no progress");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return None,
        }
    }
    last
}

/// The feed position a progress line names (`... through seq N`).
fn through(line: &str) -> u64 {
    line.rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a seq")
}

/// How the kills of a round landed.
#[derive(Default, Debug)]
struct Kills {
    /// The mirror was part-way through the feed.
    mid_catch_up: usize,
    /// The kill came after a batch's transaction began and before it
    /// committed (the batch's cursor is not in SQLite).
    inside_transaction: usize,
}

/// Kill the mirror at random moments until one run finishes by itself (or
/// the restarts run out).
fn kill_and_restart(store: &Path, sqlite: &Path, rng: &mut StdRng, last_seq: u64) -> Kills {
    let mut kills = Kills::default();
    let mut previous = sqlite_cursor(sqlite);
    for attempt in 0..KILLS_PER_ROUND {
        let mut run = start(store, sqlite);
        let deadline = Instant::now() + Duration::from_secs(60);
        // Three kinds of moment: a blind delay from the start (lands in
        // startup or recovery); a few batches in, just after a batch
        // committed (lands while the next one is read from the feed); or
        // just after a batch's SQLite transaction began (lands inside it).
        let (finished, announced) = match attempt % 3 {
            0 => {
                std::thread::sleep(Duration::from_millis(rng.random_range(0..60)));
                (run.child.try_wait().expect("try_wait").is_some(), None)
            }
            mode => {
                let marker = if mode == 1 { "applied" } else { "applying" };
                let wanted = rng.random_range(1..=4);
                let line = wait_for_lines(&run, marker, wanted, deadline);
                std::thread::sleep(Duration::from_micros(rng.random_range(0..2_000)));
                let finished = line.is_none();
                let announced = line.filter(|_| mode == 2).map(|l| through(&l));
                (finished, announced)
            }
        };
        run.child.kill().expect("SIGKILL the mirror");
        let status = run.child.wait().expect("wait for the mirror");
        let cursor = sqlite_cursor(sqlite);
        assert!(
            cursor >= previous,
            "the durable cursor went back from {previous} to {cursor}"
        );
        previous = cursor;
        if status.success() && cursor == last_seq {
            // It caught up before the kill arrived: this round is done.
            return kills;
        }
        assert!(
            !status.success() || finished,
            "the mirror exited without catching up"
        );
        if cursor > 0 && cursor < last_seq {
            kills.mid_catch_up += 1;
        }
        if announced.is_some_and(|seq| cursor < seq) {
            kills.inside_transaction += 1;
        }
        eprintln!("kill {attempt}: mirror at seq {cursor} of {last_seq}");
    }
    kills
}

/// Run the mirror to completion (bounded), with its self-check.
fn finish(store: &Path, sqlite: &Path) -> String {
    let mut child = mirror(store, sqlite)
        .arg("--verify")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sqlite_mirror");
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sqlite_mirror did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("piped"), &mut out)
        .expect("read output");
    assert!(status.success(), "sqlite_mirror failed: {status}\n{out}");
    out
}

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

type Table = BTreeMap<String, BTreeMap<String, Sql>>;

/// What `scan` returns, as SQLite values (NULL and absent alike omitted).
fn tandem_rows(store: &Path) -> Table {
    let mut rows = open(store);
    rows.table(TABLE)
        .scan()
        .expect("scan")
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
        .collect()
}

/// Every row of the SQLite table, read independently of the mirror's code.
fn sqlite_rows(sqlite: &Path) -> Table {
    let conn = Connection::open(sqlite).expect("open sqlite");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity check");
    assert_eq!(check, "ok", "SQLite integrity");
    let mut stmt = conn.prepare("SELECT * FROM \"tasks\"").expect("select");
    let names: Vec<String> = stmt.column_names().map(String::from).collect();
    let mut out = Table::new();
    let mut rows = stmt.query([]).expect("query");
    while let Some(row) = rows.next().expect("row") {
        let mut key = None;
        let mut values = BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            let v: Sql = row.get(i).expect("value");
            if name == "_key" {
                key = Some(v);
            } else if v != Sql::Null {
                values.insert(name.clone(), v);
            }
        }
        let Some(Sql::Text(key)) = key else {
            panic!("row without a text key")
        };
        assert!(out.insert(key, values).is_none(), "duplicate key");
    }
    out
}

fn assert_same(store: &Path, sqlite: &Path) -> usize {
    let expected = tandem_rows(store);
    let actual = sqlite_rows(sqlite);
    for key in expected
        .keys()
        .chain(actual.keys())
        .collect::<BTreeSet<_>>()
    {
        assert_eq!(
            actual.get(key),
            expected.get(key),
            "row {key:?}: SQLite (left) differs from Tandem (right)"
        );
    }
    assert_eq!(actual, expected);
    expected.len()
}

#[test]
fn mirror_survives_sigkill_and_ends_with_exactly_the_tables_rows() {
    let seed = std::env::var("TANDEM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("TANDEM_TEST_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store.redb");
    let sqlite = dir.path().join("mirror.db");
    let mut tally = Tally::default();
    let mut kills = Kills::default();
    for round in 0..ROUNDS {
        // The store is a redb file one process opens at a time: the writer
        // runs between the mirror's runs.
        let last_seq = write(&store, &mut rng, OPS_PER_ROUND, &mut tally);
        eprintln!("round {round}: feed at seq {last_seq}");
        let round_kills = kill_and_restart(&store, &sqlite, &mut rng, last_seq);
        kills.mid_catch_up += round_kills.mid_catch_up;
        kills.inside_transaction += round_kills.inside_transaction;
    }
    assert!(
        kills.mid_catch_up >= 3,
        "too few kills landed while the mirror was catching up: {kills:?}"
    );
    eprintln!("{kills:?}");
    assert!(
        tally.deletes >= 10 && tally.revivals >= 3 && tally.updates >= 30,
        "the writer did not exercise every rule: {tally:?}"
    );
    let out = finish(&store, &sqlite);
    assert!(out.contains("verified:"), "{out}");
    let rows = assert_same(&store, &sqlite);
    assert!(rows >= KEYS / 4, "too few live rows ({rows}) to mean much");

    // Idempotent: replay the second half of the feed over the finished
    // mirror (as after restoring an old backup); the rows do not change.
    let last = sqlite_cursor(&sqlite);
    let conn = Connection::open(&sqlite).expect("open sqlite");
    conn.execute(
        "UPDATE tandem_cursor SET seq = ?1 WHERE consumer = 'sqlite-mirror'",
        [(last / 2) as i64],
    )
    .expect("set the cursor back");
    drop(conn);
    let out = finish(&store, &sqlite);
    assert!(
        out.contains(&format!("resuming after seq {}", last / 2)),
        "{out}"
    );
    assert!(out.contains("verified:"), "{out}");
    assert_eq!(assert_same(&store, &sqlite), rows);
}

#[test]
fn mirror_refuses_bad_arguments() {
    let status = Command::new(env!("CARGO_BIN_EXE_sqlite_mirror"))
        .args(["--store"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run");
    assert!(!status.success());
}
