//! The row layer next to its floors, in one run (issue 3, "Benchmarks"):
//!
//! 1. one row per durable commit: 10,000 inserts, then 10,000 single-column
//!    updates; Tandem (write + flush on redb) vs raw redb (one write
//!    transaction per insert) and SQLite (one transaction per row);
//! 2. 1,000 rows per commit: the same, Tandem (`insert_many` of 1,000 rows,
//!    or 1,000 single updates, + one flush; for reference, also 1,000 single
//!    inserts, in a store of their own) vs
//!    bare automerge (one document per row: create with the columns, save;
//!    the floor writes the columns in one batch, `init_root_from_hydrate`,
//!    as Tandem's inserts do, and, for reference, with one put per column)
//!    and SQLite (one transaction per 1,000 rows);
//! 3. a new replica catching up on a 100,000-row table, over a replication
//!    link and over the sync protocol (subscribe + discover): time, and bytes
//!    on the wire vs the rows' saved documents.
//!
//! Every comparison runs its contestants in alternating rounds (the order
//! rotates each round), so all see the same machine state; rates are from
//! the median round and ratios are Tandem's throughput over the floor's.
//! SQLite runs in WAL mode with `synchronous=FULL`; every store is a file
//! under `target/` (the project's disk).
//!
//!     cargo bench -p tandem-engine --bench rows
//!
//! Environment: `TANDEM_ROWS_ONLY=durable|batched|catchup` runs one part
//! (`layout` runs an experiment on row layouts in bare automerge instead);
//! `TANDEM_ROWS_N=N` sets the rows inserted and updated in parts 1 and 2
//! (default 10,000); `TANDEM_ROWS_CATCHUP=N` the catch-up table's size
//! (default 100,000);
//! `TANDEM_ROWS_TANDEM_ONLY=1` skips the floors (for profiling).

mod common;

/// The allocator Tandem's own binaries use (the `tandem` relay): every
/// contestant of a comparison runs in this process, so all share it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use automerge::AutoCommit;
use automerge::transaction::Transactable;
use common::{bench_dir, five_fields, five_fields_at_once, raw_redb_commit, repo_at};
use redb::Database;
use rusqlite::{Connection, params};
use tandem_engine::rows::{Rows, SyncLink, TableSchema, Value};
use tandem_engine::{
    MemoryStorage, PeerId, RedbStorage, Repo, RepoConfig, ServeOnRequest, ShareAll, Storage,
    sync_in_process,
};

const TABLE: &str = "tasks";
/// Rows written by each part's inserts (and then updated), unless
/// `TANDEM_ROWS_N` says otherwise.
const ROWS: usize = 10_000;
/// Rows per durable commit in the batched part.
const BATCH: usize = 1_000;
/// Rounds of the one-row-per-commit part (ROWS / ROUNDS rows each).
const DURABLE_ROUNDS: usize = 20;

fn key(i: usize) -> String {
    format!("row-{i:06}")
}

/// The same row as `common::five_fields`, as Tandem columns.
fn columns(i: usize) -> [(&'static str, Value); 5] {
    [
        ("id", Value::from(i as i64)),
        ("title", Value::from(format!("task {i}"))),
        ("done", Value::from(i.is_multiple_of(2))),
        ("owner", Value::from("ada")),
        ("priority", Value::from((i % 5) as f64)),
    ]
}

fn new_title(i: usize) -> String {
    format!("task {i} (edited)")
}

fn rows_at(path: &Path) -> Rows<RedbStorage> {
    let mut rows = Rows::with_system_clock(repo_at(path));
    rows.define(TableSchema::new(TABLE));
    rows
}

/// The same store in memory: what Tandem costs without storage.
fn rows_in_memory() -> Rows<MemoryStorage> {
    let repo = Repo::open(
        MemoryStorage::new(),
        RepoConfig::new(PeerId::new("bench")),
        ShareAll,
    )
    .unwrap();
    let mut rows = Rows::with_system_clock(repo);
    rows.define(TableSchema::new(TABLE));
    rows
}

/// A SQLite database with the rows' table, WAL and synchronous=FULL.
fn sqlite_at(path: &Path) -> Connection {
    let c = Connection::open(path).unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    c.execute_batch(
        "PRAGMA synchronous=FULL;
         CREATE TABLE tasks (key TEXT PRIMARY KEY, id INTEGER, title TEXT,
                             done INTEGER, owner TEXT, priority REAL);",
    )
    .unwrap();
    c
}

fn sqlite_insert(c: &Connection, i: usize) {
    c.prepare_cached("INSERT INTO tasks VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
        .unwrap()
        .execute(params![
            key(i),
            i as i64,
            format!("task {i}"),
            i.is_multiple_of(2),
            "ada",
            (i % 5) as f64
        ])
        .unwrap();
}

fn sqlite_update(c: &Connection, i: usize) {
    let n = c
        .prepare_cached("UPDATE tasks SET title = ?2 WHERE key = ?1")
        .unwrap()
        .execute(params![key(i), new_title(i)])
        .unwrap();
    assert_eq!(n, 1);
}

fn tandem_insert<S: Storage>(rows: &mut Rows<S>, range: std::ops::Range<usize>) {
    let mut t = rows.table(TABLE);
    for i in range {
        t.insert(&key(i), columns(i)).unwrap();
    }
}

/// The same rows through the bulk API: one catalog change per shard.
fn tandem_insert_many<S: Storage>(rows: &mut Rows<S>, range: std::ops::Range<usize>) {
    let n = range.len();
    let inserted = rows
        .table(TABLE)
        .insert_many(range.map(|i| (key(i), columns(i))))
        .unwrap();
    assert_eq!(inserted, n);
}

fn tandem_update<S: Storage>(rows: &mut Rows<S>, range: std::ops::Range<usize>) {
    let mut t = rows.table(TABLE);
    for i in range {
        t.update(&key(i), [("title", Value::from(new_title(i)))])
            .unwrap();
    }
}

fn tandem_flush<S: Storage>(rows: &mut Rows<S>) {
    rows.flush().unwrap();
    // Commit events for the driver; nobody listens here.
    rows.repo_mut().drain_outputs();
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// One contestant of a comparison: a name and one round of work.
struct Contestant<'a> {
    name: &'static str,
    round: Box<dyn FnMut(usize) + 'a>,
}

impl<'a> Contestant<'a> {
    fn new(name: &'static str, round: impl FnMut(usize) + 'a) -> Self {
        Self {
            name,
            round: Box::new(round),
        }
    }
}

/// Run `rounds` rounds of every contestant (the first is Tandem, the rest
/// floors with their targets), rotating who goes first; print each rate
/// (items per second, from the median round) and Tandem's ratio to each
/// floor. With `TANDEM_ROWS_TANDEM_ONLY` only Tandem runs.
fn compare(
    title: &str,
    rounds: usize,
    per_round: usize,
    mut contestants: Vec<Contestant<'_>>,
    targets: &[Option<f64>],
) {
    if env_flag("TANDEM_ROWS_TANDEM_ONLY") {
        contestants.truncate(1);
    }
    let n = contestants.len();
    let mut times = vec![Vec::with_capacity(rounds); n];
    for r in 0..rounds {
        for k in 0..n {
            let c = (r + k) % n;
            let start = Instant::now();
            (contestants[c].round)(r);
            times[c].push(start.elapsed());
        }
    }
    let rate = |d: Duration| per_round as f64 / d.as_secs_f64();
    println!("\n{title} ({rounds} rounds of {per_round}, median round):");
    for (c, t) in contestants.iter().zip(&times) {
        let total: Duration = t.iter().sum();
        println!(
            "  {:<34} {:>9.0}/s   (all rounds: {:.2} s)",
            c.name,
            rate(median(t)),
            total.as_secs_f64()
        );
    }
    let ours = median(&times[0]);
    for c in 1..n {
        let ratio = median(&times[c]).as_secs_f64() / ours.as_secs_f64();
        let per_round: Vec<f64> = times[c]
            .iter()
            .zip(&times[0])
            .map(|(f, o)| f.as_secs_f64() / o.as_secs_f64())
            .collect();
        let lo = per_round.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = per_round.iter().copied().fold(0.0, f64::max);
        let verdict = match targets.get(c - 1).copied().flatten() {
            Some(t) if ratio >= t => format!("target {t:.2}x: met"),
            Some(t) => format!("target {t:.2}x: MISSED"),
            None => String::new(),
        };
        if contestants[c].name.starts_with("tandem") {
            println!(
                "  {} takes {ratio:.2}x the time (rounds {lo:.2}x..{hi:.2}x)",
                contestants[c].name
            );
        } else {
            println!(
                "  tandem / {:<25} {ratio:>6.2}x  (rounds {lo:.2}x..{hi:.2}x)  {verdict}",
                contestants[c].name
            );
        }
    }
}

/// One row per durable commit.
fn durable(dir: &Path, n: usize) {
    let per = n / DURABLE_ROUNDS;
    let mut tandem = rows_at(&dir.join("durable.redb"));
    let raw = Database::create(dir.join("durable-raw.redb")).unwrap();
    let sql = sqlite_at(&dir.join("durable.sqlite"));
    let mut memory = rows_in_memory();
    let range = |r: usize| r * per..(r + 1) * per;

    compare(
        "one row per durable commit: inserts",
        DURABLE_ROUNDS,
        per,
        vec![
            Contestant::new("tandem insert + flush", |r| {
                for i in range(r) {
                    tandem_insert(&mut tandem, i..i + 1);
                    tandem_flush(&mut tandem);
                }
            }),
            Contestant::new("raw redb insert commit", |r| {
                for i in range(r) {
                    raw_redb_commit(&raw, i as u64);
                }
            }),
            Contestant::new("sqlite insert transaction", |r| {
                for i in range(r) {
                    sqlite_insert(&sql, i);
                }
            }),
            // Not a floor: the share of Tandem's time that is CPU.
            Contestant::new("tandem on MemoryStorage", |r| {
                for i in range(r) {
                    tandem_insert(&mut memory, i..i + 1);
                    tandem_flush(&mut memory);
                }
            }),
        ],
        &[Some(0.7), None, None],
    );
    compare(
        "one row per durable commit: single-column updates",
        DURABLE_ROUNDS,
        per,
        vec![
            Contestant::new("tandem update + flush", |r| {
                for i in range(r) {
                    tandem_update(&mut tandem, i..i + 1);
                    tandem_flush(&mut tandem);
                }
            }),
            // Overwrites the key the insert round wrote.
            Contestant::new("raw redb insert commit", |r| {
                for i in range(r) {
                    raw_redb_commit(&raw, i as u64);
                }
            }),
            Contestant::new("sqlite update transaction", |r| {
                for i in range(r) {
                    sqlite_update(&sql, i);
                }
            }),
            Contestant::new("tandem on MemoryStorage", |r| {
                for i in range(r) {
                    tandem_update(&mut memory, i..i + 1);
                    tandem_flush(&mut memory);
                }
            }),
        ],
        &[Some(0.7), None, None],
    );
}

/// 1,000 rows per durable commit.
fn batched(dir: &Path, n: usize) {
    let rounds = n / BATCH;
    let range = |r: usize| r * BATCH..(r + 1) * BATCH;
    let mut tandem = rows_at(&dir.join("batched.redb"));
    let mut tandem_each = rows_at(&dir.join("batched-each.redb"));
    let mut sql = sqlite_at(&dir.join("batched.sqlite"));
    let mut saved: Vec<Vec<u8>> = Vec::with_capacity(n);

    compare(
        "1,000 rows per durable commit: inserts",
        rounds,
        BATCH,
        vec![
            Contestant::new("tandem insert_many(1,000) + flush", |r| {
                tandem_insert_many(&mut tandem, range(r));
                tandem_flush(&mut tandem);
            }),
            // Bare automerge's fastest way to make the row document: the
            // five keys in one batch (Tandem's inserts use it too). This is
            // the floor the 0.6x target is held to.
            Contestant::new("bare automerge batch create + save", |r| {
                for i in range(r) {
                    let mut d = AutoCommit::new();
                    five_fields_at_once(&mut d, i).unwrap();
                    std::hint::black_box(d.save());
                }
            }),
            // The same document made with one put per key.
            Contestant::new("bare automerge puts + save", |r| {
                for i in range(r) {
                    let mut d = AutoCommit::new();
                    five_fields(&mut d, i).unwrap();
                    saved.push(d.save());
                }
            }),
            Contestant::new("sqlite 1,000-row transaction", |r| {
                let tx = sql.transaction().unwrap();
                for i in range(r) {
                    sqlite_insert(&tx, i);
                }
                tx.commit().unwrap();
            }),
            // The same rows inserted one call each (one catalog change per
            // row), in a store of their own.
            Contestant::new("tandem 1,000 inserts + flush", |r| {
                tandem_insert(&mut tandem_each, range(r));
                tandem_flush(&mut tandem_each);
            }),
        ],
        &[Some(0.6), None, Some(1.0 / 6.0), None],
    );

    // The floor updates documents it holds in memory (loaded untimed).
    let mut docs: Vec<AutoCommit> = saved
        .iter()
        .map(|b| {
            let mut d = AutoCommit::load(b).unwrap();
            d.save_incremental();
            d
        })
        .collect();
    drop(saved);
    compare(
        "1,000 rows per durable commit: single-column updates",
        rounds,
        BATCH,
        vec![
            Contestant::new("tandem 1,000 updates + flush", |r| {
                tandem_update(&mut tandem, range(r));
                tandem_flush(&mut tandem);
            }),
            Contestant::new("bare automerge put + save_incr", |r| {
                for i in range(r) {
                    let d = &mut docs[i];
                    d.put(automerge::ROOT, "title", new_title(i)).unwrap();
                    std::hint::black_box(d.save_incremental());
                }
            }),
            Contestant::new("sqlite 1,000-row transaction", |r| {
                let tx = sql.transaction().unwrap();
                for i in range(r) {
                    sqlite_update(&tx, i);
                }
                tx.commit().unwrap();
            }),
        ],
        &[None, None],
    );
}

/// A new replica catching up on an `n`-row table.
fn catchup(dir: &Path, n: usize) {
    let path = dir.join("full.redb");
    let mut full = rows_at(&path);
    let rounds = n.div_ceil(BATCH);
    let range = |r: usize| r * BATCH..((r + 1) * BATCH).min(n);
    let mut bare_bytes = 0usize;
    compare(
        &format!("building the {n}-row table, 1,000 inserts per commit"),
        rounds,
        BATCH,
        vec![
            Contestant::new("tandem insert_many(1,000) + flush", |r| {
                tandem_insert_many(&mut full, range(r));
                tandem_flush(&mut full);
            }),
            Contestant::new("bare automerge batch create + save", |r| {
                for i in range(r) {
                    let mut d = AutoCommit::new();
                    five_fields_at_once(&mut d, i).unwrap();
                    bare_bytes += d.save().len();
                }
            }),
        ],
        &[Some(0.6)],
    );

    // What the rows weigh saved (untimed): each row's document, and the
    // catalog documents that list them.
    let started = Instant::now();
    let mut row_ids = HashSet::with_capacity(n);
    let mut row_bytes = 0usize;
    for i in 0..n {
        let id = full.table(TABLE).document_id(&key(i)).unwrap();
        row_bytes += full.repo_mut().view(&id, |d| d.save().len()).unwrap();
        row_ids.insert(id);
    }
    let mut catalog_bytes = 0usize;
    let mut catalogs = 0;
    for id in full.repo().document_ids().unwrap() {
        if !row_ids.contains(&id) {
            catalogs += 1;
            catalog_bytes += full.repo_mut().view(&id, |d| d.save().len()).unwrap();
        }
    }
    tandem_flush(&mut full);
    let mb = |b: usize| b as f64 / 1e6;
    println!(
        "\nsaved sizes ({:.1} s to measure): {n} row documents {:.2} MB ({:.0} B/row); \
         {catalogs} catalog documents {:.2} MB; the same rows as bare automerge documents {:.2} MB",
        started.elapsed().as_secs_f64(),
        mb(row_bytes),
        row_bytes as f64 / n as f64,
        mb(catalog_bytes),
        mb(bare_bytes)
    );
    let report = |how: &str, time: Duration, wire: usize, ok: bool| {
        let ratio = wire as f64 / row_bytes as f64;
        println!(
            "  {how}: {:.2} s ({}), {:.2} MB on the wire = {ratio:.2}x the rows' saved documents \
             ({:.2}x rows + catalogs{}){}",
            time.as_secs_f64(),
            if n < 100_000 {
                "the 10 s target is for 100,000 rows"
            } else if time < Duration::from_secs(10) {
                "target under 10 s: met"
            } else {
                "target under 10 s: MISSED"
            },
            mb(wire),
            wire as f64 / (row_bytes + catalog_bytes) as f64,
            if bare_bytes > 0 {
                format!(
                    ", {:.2}x the rows as bare automerge documents",
                    wire as f64 / bare_bytes as f64
                )
            } else {
                String::new()
            },
            if ratio <= 1.5 {
                "; target at most 1.5x: met"
            } else {
                "; target at most 1.5x: MISSED"
            },
        );
        if !ok {
            println!("    (not every row arrived: see above)");
        }
    };
    // Every row arrived (as many documents as the full store has) and a
    // sample of 1,000 spread over the table reads back right (untimed).
    let documents = row_ids.len() + catalogs;
    let complete = |rows: &mut Rows<RedbStorage>| {
        let have = rows.repo().document_ids().unwrap().len();
        let step = n.div_ceil(1_000).max(1);
        let sampled_ok = (0..n).step_by(step).all(|i| {
            let row = rows.table(TABLE).get(&key(i)).unwrap();
            row.and_then(|r| r.get("title").cloned()) == Some(Value::from(format!("task {i}")))
        });
        if have != documents || !sampled_ok {
            println!(
                "    the new replica is INCOMPLETE: {have} of {documents} documents, sample {}",
                if sampled_ok { "ok" } else { "wrong" }
            );
        }
        have == documents && sampled_ok
    };
    println!("catching up on {n} rows:");

    // Over a replication link, between the full store and an empty one.
    {
        let mut fresh = rows_at(&dir.join("link.redb"));
        let started = Instant::now();
        let run = SyncLink::new("catchup").run(&mut full, &mut fresh).unwrap();
        let time = started.elapsed();
        println!(
            "  (link: {} documents, {} copied whole, {} changes sent)",
            run.documents,
            run.copied.0 + run.copied.1,
            run.changes.0 + run.changes.1
        );
        let ok = complete(&mut fresh);
        report("SyncLink::run", time, run.bytes.0 + run.bytes.1, ok);
    }

    // Over the sync protocol, from the full store reopened as a server that
    // announces nothing (it serves what is asked for), to a new replica that
    // subscribes to the table and then discovers its rows.
    drop(full);
    let server_repo = Repo::open(
        RedbStorage::open(&path).unwrap(),
        RepoConfig::new(PeerId::new("server")),
        ServeOnRequest,
    )
    .unwrap();
    let mut server = Rows::with_system_clock(server_repo);
    server.define(TableSchema::new(TABLE));
    let mut fresh = rows_at(&dir.join("protocol.redb"));
    const MAX_ROUNDS: usize = 1_000;
    let started = Instant::now();
    fresh.subscribe(TABLE).unwrap();
    let first = sync_in_process(fresh.repo_mut(), server.repo_mut(), MAX_ROUNDS).unwrap();
    let catalogs_at = started.elapsed();
    let requested = fresh.discover(TABLE).unwrap();
    let discovered_at = started.elapsed();
    let second = sync_in_process(fresh.repo_mut(), server.repo_mut(), MAX_ROUNDS).unwrap();
    let time = started.elapsed();
    let frames = first.frames.0 + first.frames.1 + second.frames.0 + second.frames.1;
    println!(
        "  (protocol: catalogs in {:.2} s, {requested} rows discovered by {:.2} s, \
         {frames} frames, {:.2} MB to the full store and {:.2} MB from it)",
        catalogs_at.as_secs_f64(),
        discovered_at.as_secs_f64(),
        mb(first.bytes.0 + second.bytes.0),
        mb(first.bytes.1 + second.bytes.1),
    );
    report(
        "subscribe + sync + discover + sync",
        time,
        first.bytes.0 + first.bytes.1 + second.bytes.0 + second.bytes.1,
        complete(&mut fresh),
    );

    // The same, with each side on a thread of its own, as a replica and a
    // server in two processes would run (the in-process run above adds the
    // two sides' times on one thread).
    let mut fresh = rows_at(&dir.join("threads.redb"));
    let (time, sent) = catch_up_on_two_threads(&mut fresh, server.repo_mut());
    println!(
        "  (two threads: {} frames, {:.2} MB to the full store and {:.2} MB from it)",
        sent.frames[0] + sent.frames[1],
        mb(sent.bytes[0]),
        mb(sent.bytes[1]),
    );
    report(
        "the same, replica and server on two threads",
        time,
        sent.bytes[0] + sent.bytes[1],
        complete(&mut fresh),
    );

    // The same once more with a replica that declines Tandem's batch
    // extension: plain automerge-repo protocol v1, a frame per message, as
    // a JS or samod client syncs (for comparison; the figures above are
    // what two Tandem peers move).
    let plain_repo = Repo::open(
        RedbStorage::open(dir.join("plain.redb")).unwrap(),
        RepoConfig {
            batch_bytes: 0,
            ..RepoConfig::new(PeerId::new("bench"))
        },
        ShareAll,
    )
    .unwrap();
    let mut fresh = Rows::with_system_clock(plain_repo);
    fresh.define(TableSchema::new(TABLE));
    let (time, sent) = catch_up_on_two_threads(&mut fresh, server.repo_mut());
    let wire = sent.bytes[0] + sent.bytes[1];
    println!(
        "  (plain protocol v1, no batch extension, two threads: {:.2} s, {} frames, \
         {:.2} MB = {:.2}x the rows' saved documents{})",
        time.as_secs_f64(),
        sent.frames[0] + sent.frames[1],
        mb(wire),
        wire as f64 / row_bytes as f64,
        if complete(&mut fresh) {
            ""
        } else {
            "; not every row arrived"
        },
    );
}

/// A new replica subscribes to the table, syncs its catalogs with the
/// server, discovers the rows and syncs them, each side on a thread of its
/// own: how long it took and what each side sent.
fn catch_up_on_two_threads<S: Storage + Send>(
    fresh: &mut Rows<RedbStorage>,
    server: &mut Repo<S>,
) -> (Duration, Sent) {
    let started = Instant::now();
    fresh.subscribe(TABLE).unwrap();
    let first = sync_on_two_threads(fresh.repo_mut(), server);
    fresh.discover(TABLE).unwrap();
    let second = sync_on_two_threads(fresh.repo_mut(), server);
    let both = |a: [usize; 2], b: [usize; 2]| [a[0] + b[0], a[1] + b[1]];
    let sent = Sent {
        frames: both(first.frames, second.frames),
        bytes: both(first.bytes, second.bytes),
    };
    (started.elapsed(), sent)
}

/// Frames and bytes each side of [`sync_on_two_threads`] sent (`[0]`: the
/// first repo's).
#[derive(Default)]
struct Sent {
    frames: [usize; 2],
    bytes: [usize; 2],
}

/// Connect `a` (outgoing) and `b` (incoming) and run each on a thread of its
/// own, frames crossing over channels, until neither has anything in
/// flight: as a replica and a server in two processes would. Each side
/// handles up to 1,000 frames (or 1 MiB of them) that have arrived, flushes (which stores what
/// came and answers it) and sends what that produced, as a network driver
/// does; then both disconnect and flush.
fn sync_on_two_threads<A: Storage + Send, B: Storage + Send>(
    a: &mut Repo<A>,
    b: &mut Repo<B>,
) -> Sent {
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
    use tandem_engine::{ConnectionId, Direction, Output};

    /// Send what `repo` has for `conn`, counting each frame in flight
    /// before it leaves.
    fn send<S: Storage>(
        repo: &mut Repo<S>,
        conn: ConnectionId,
        to: &Sender<Vec<u8>>,
        in_flight: &AtomicUsize,
        sent: &mut (usize, usize),
    ) {
        while let Some(out) = repo.poll_output() {
            if let Output::Send { connection, frame } = out
                && connection == conn
            {
                sent.0 += 1;
                sent.1 += frame.len();
                in_flight.fetch_add(1, Ordering::SeqCst);
                to.send(frame).unwrap();
            }
        }
    }

    fn side<S: Storage>(
        repo: &mut Repo<S>,
        direction: Direction,
        from: Receiver<Vec<u8>>,
        to: Sender<Vec<u8>>,
        in_flight: &AtomicUsize,
        ready: &Barrier,
    ) -> (usize, usize) {
        let mut sent = (0, 0);
        let conn = repo.fresh_connection_id();
        repo.connect(conn, direction).unwrap();
        repo.flush().unwrap();
        send(repo, conn, &to, in_flight, &mut sent);
        ready.wait();
        loop {
            match from.recv_timeout(Duration::from_millis(1)) {
                Ok(frame) => {
                    // Up to 1,000 frames or 1 MiB, as the relay reads.
                    let mut size = frame.len();
                    let mut batch = vec![frame];
                    while batch.len() < 1_000 && size < 1 << 20 {
                        let Ok(next) = from.try_recv() else { break };
                        size += next.len();
                        batch.push(next);
                    }
                    for frame in &batch {
                        repo.receive(0, conn, frame).unwrap();
                    }
                    repo.flush().unwrap();
                    // Answers count as in flight before what they answer
                    // stops counting: the count reaches 0 only when both
                    // sides are done.
                    send(repo, conn, &to, in_flight, &mut sent);
                    in_flight.fetch_sub(batch.len(), Ordering::SeqCst);
                }
                Err(RecvTimeoutError::Timeout) if in_flight.load(Ordering::SeqCst) == 0 => break,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        repo.disconnect(conn);
        repo.flush().unwrap();
        while repo.poll_output().is_some() {}
        sent
    }

    let (to_b, from_a) = channel();
    let (to_a, from_b) = channel();
    let in_flight = AtomicUsize::new(0);
    let ready = Barrier::new(2);
    let (sa, sb) = std::thread::scope(|scope| {
        let other = scope.spawn(|| side(b, Direction::Incoming, from_a, to_a, &in_flight, &ready));
        let mine = side(a, Direction::Outgoing, from_b, to_b, &in_flight, &ready);
        (mine, other.join().unwrap())
    });
    Sent {
        frames: [sa.0, sb.0],
        bytes: [sa.1, sb.1],
    }
}

/// An experiment, not a comparison with a target (run it with
/// `TANDEM_ROWS_ONLY=layout`): what a row layout costs automerge itself,
/// each row a bare document created and saved, then one column rewritten
/// and saved incrementally. "registers as maps" is the layout of the first
/// row layer (`_table`, `_key`, and per column a map of value, at, n, by);
/// the others were candidates with fewer operations. The row layer now
/// writes plain columns plus `_table` and `_key`, with each write's
/// timestamp in its change's message (`rows/document.rs`).
fn layout(n: usize) {
    use automerge::{ObjType, ROOT, ScalarValue};
    type Write = fn(&mut AutoCommit, &str, ScalarValue, u64);
    const BY: &str = "3f2a9c1e-7b4d-4e8a-9c2f-1a2b3c4d5e6f";
    fn plain(d: &mut AutoCommit, c: &str, v: ScalarValue, _: u64) {
        d.put(ROOT, c, v).unwrap();
    }
    fn register_map(d: &mut AutoCommit, c: &str, v: ScalarValue, at: u64) {
        let o = d.put_object(ROOT, c, ObjType::Map).unwrap();
        d.put(&o, "value", v).unwrap();
        d.put(&o, "at", at).unwrap();
        d.put(&o, "n", 0u64).unwrap();
        d.put(&o, "by", BY).unwrap();
    }
    fn value_and_clock(d: &mut AutoCommit, c: &str, v: ScalarValue, at: u64) {
        let o = d.put_object(ROOT, c, ObjType::Map).unwrap();
        d.put(&o, "value", v).unwrap();
        d.put(&o, "at", at << 16).unwrap();
    }
    fn packed(d: &mut AutoCommit, c: &str, v: ScalarValue, at: u64) {
        // Value and clock in one scalar (a real codec would be CBOR; the
        // writer's replica is the operation's actor).
        let mut bytes = (at << 16).to_be_bytes().to_vec();
        bytes.extend(format!("{v}").into_bytes());
        d.put(ROOT, c, ScalarValue::Bytes(bytes)).unwrap();
    }
    let layouts: [(&'static str, Write, bool); 4] = [
        ("plain columns (the floor)", plain, false),
        ("registers as maps {value,at,n,by}", register_map, true),
        ("maps {value, at: u64 clock}", value_and_clock, true),
        ("one packed scalar per column", packed, true),
    ];
    let row = |write: Write, meta: bool, i: usize| {
        let mut d = AutoCommit::new();
        if meta {
            d.put(ROOT, "_table", TABLE).unwrap();
            d.put(ROOT, "_key", key(i)).unwrap();
        }
        let values = [
            ("id", ScalarValue::Int(i as i64)),
            ("title", ScalarValue::Str(format!("task {i}").into())),
            ("done", ScalarValue::Boolean(i.is_multiple_of(2))),
            ("owner", ScalarValue::Str("ada".into())),
            ("priority", ScalarValue::F64((i % 5) as f64)),
        ];
        for (c, v) in values {
            write(&mut d, c, v, 1_700_000_000_000 + i as u64);
        }
        d
    };
    const ROUNDS: usize = 9;
    let (mut create, mut update) = (vec![Vec::new(); 4], vec![Vec::new(); 4]);
    let mut size = [0usize; 4];
    for r in 0..ROUNDS {
        for k in 0..layouts.len() {
            let l = (r + k) % layouts.len();
            let (_, write, meta) = layouts[l];
            let started = Instant::now();
            let mut docs = Vec::with_capacity(n);
            let mut bytes = 0;
            for i in 0..n {
                let mut d = row(write, meta, i);
                bytes += d.save().len();
                docs.push(d);
            }
            create[l].push(started.elapsed());
            size[l] = bytes / n;
            let started = Instant::now();
            for (i, d) in docs.iter_mut().enumerate() {
                write(
                    d,
                    "title",
                    ScalarValue::Str(new_title(i).into()),
                    1_800_000_000_000,
                );
                std::hint::black_box(d.save_incremental());
            }
            update[l].push(started.elapsed());
        }
    }
    let rate = |t: &[Duration]| n as f64 / median(t).as_secs_f64();
    println!(
        "
row layouts in bare automerge ({ROUNDS} rounds of {n} rows, median round):"
    );
    for (l, (name, _, _)) in layouts.iter().enumerate() {
        println!(
            "  {name:<36} create + save {:>7.0}/s ({:.2}x the floor), \
             one column + save_incremental {:>7.0}/s ({:.2}x), {} B/row saved",
            rate(&create[l]),
            rate(&create[l]) / rate(&create[0]),
            rate(&update[l]),
            rate(&update[l]) / rate(&update[0]),
            size[l]
        );
    }
}

fn main() {
    let only = std::env::var("TANDEM_ROWS_ONLY").unwrap_or_default();
    let size = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let n = size("TANDEM_ROWS_N", ROWS);
    let dir = bench_dir();
    println!(
        "row layer vs floors, store files under {}",
        dir.path().display()
    );
    let started = Instant::now();
    if only.is_empty() || only == "durable" {
        durable(dir.path(), n);
    }
    if only.is_empty() || only == "batched" {
        batched(dir.path(), n);
    }
    if only.is_empty() || only == "catchup" {
        catchup(dir.path(), size("TANDEM_ROWS_CATCHUP", 100_000));
    }
    if only == "layout" {
        layout(2_000);
    }
    println!("\ntotal {:.1} s", started.elapsed().as_secs_f64());
}
