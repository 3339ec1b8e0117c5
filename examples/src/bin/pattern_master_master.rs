//! Pattern: **Master-Master Row-Level Synchronization**, with three masters
//! in a ring of replication links (a-b, b-c, c-a), each a durable redb store
//! that accepts writes.
//!
//! - **Replication link** (`SyncLink`): a named link between two stores that
//!   syncs both ways; links compose, so a change travels the ring.
//! - **Synchronization controller**: each run records, in both stores, the
//!   link's last synchronization point (`SyncLink::sync_point`: feed cursor,
//!   time, other store); it survives a restart, and a run sends only what
//!   changed since (nothing, when nothing did).
//! - **Acquire / Manipulate / Write**: a run acquires the documents each side
//!   committed since its sync point and the changes the other lacks;
//!   manipulates them with the link's table filter (this ring does not carry
//!   the `private` table); writes them on the other side, where conflicts are
//!   detected and resolved by the table's strategy.
//! - **Delete flags**: a delete wins over an update concurrent with it; an
//!   insert made after the delete was seen revives the row with only the
//!   inserted values.
//! - **Cleanup**: once every member store has acknowledged a delete (the
//!   links record acknowledgements), `Rows::cleanup` purges the row document
//!   in each store, leaving a purge marker; the key's next insert is a fresh
//!   row (the next generation).
//!
//! Run: `cargo run -p tandem-examples --bin pattern_master_master [-- <data dir>]`

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, ensure};
use tandem_engine::rows::{Row, RowChange, Rows, SyncLink, TableSchema, Value};
use tandem_engine::{Cursor, PeerId, RedbStorage, Repo, RepoConfig, ShareAll};

type Store = Rows<RedbStorage>;

fn check(holds: bool, claim: &str) -> Result<()> {
    ensure!(holds, "does not hold: {claim}");
    println!("ok: {claim}");
    Ok(())
}

fn open(dir: &Path, name: &str, clock: &Arc<AtomicU64>) -> Result<Store> {
    let storage = RedbStorage::open(dir.join(format!("{name}.redb")))
        .with_context(|| format!("opening {name}"))?;
    let repo = Repo::open(storage, RepoConfig::new(PeerId::new(name)), ShareAll)?;
    let clock = clock.clone();
    let mut rows = Rows::new(repo, move || clock.load(Ordering::SeqCst));
    rows.define(TableSchema::new("tasks"));
    Ok(rows)
}

struct Ring {
    ab: SyncLink,
    bc: SyncLink,
    ca: SyncLink,
}

impl Ring {
    fn new() -> Self {
        // The ring carries the shared table only: the Manipulate step.
        Self {
            ab: SyncLink::new("a-b").tables(["tasks"]),
            bc: SyncLink::new("b-c").tables(["tasks"]),
            ca: SyncLink::new("c-a").tables(["tasks"]),
        }
    }

    /// One run of every link, around the ring. Returns changes sent.
    fn run(&self, a: &mut Store, b: &mut Store, c: &mut Store) -> Result<usize> {
        let runs = [self.ab.run(a, b)?, self.bc.run(b, c)?, self.ca.run(c, a)?];
        let mut sent = 0;
        for run in runs {
            ensure!(run.refused_purged.is_empty(), "unexpected refusal: {run:?}");
            sent += run.changes.0 + run.changes.1;
        }
        Ok(sent)
    }
}

fn scan(store: &mut Store) -> Result<Vec<Row>> {
    Ok(store.table("tasks").scan()?)
}

fn converged(a: &mut Store, b: &mut Store, c: &mut Store) -> Result<Vec<Row>> {
    let rows = scan(a)?;
    ensure!(rows == scan(b)? && rows == scan(c)?, "the masters differ");
    Ok(rows)
}

fn main() -> Result<()> {
    let _tmp;
    let dir = match std::env::args().nth(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            _tmp = tempfile::tempdir()?;
            _tmp.path().to_path_buf()
        }
    };
    let clock = Arc::new(AtomicU64::new(1_000));
    let at = |t: u64| clock.store(t, Ordering::SeqCst);
    let (mut a, mut b, mut c) = (
        open(&dir, "a", &clock)?,
        open(&dir, "b", &clock)?,
        open(&dir, "c", &clock)?,
    );
    let ring = Ring::new();

    // 1. Every master writes; the ring spreads it.
    a.table("tasks").insert(
        "t1",
        [("title", Value::from("plan")), ("owner", "ann".into())],
    )?;
    b.table("tasks").insert(
        "t2",
        [("title", Value::from("build")), ("owner", "bo".into())],
    )?;
    c.table("tasks")
        .insert("t3", [("title", Value::from("ship"))])?;
    a.table("private")
        .insert("diary", [("text", Value::from("not for the ring"))])?;
    ring.run(&mut a, &mut b, &mut c)?;
    ring.run(&mut a, &mut b, &mut c)?;
    let rows = converged(&mut a, &mut b, &mut c)?;
    check(
        rows.iter().map(|r| r.key.as_str()).collect::<Vec<_>>() == ["t1", "t2", "t3"],
        "three masters, each writing, converge around the ring",
    )?;
    check(
        b.table("private").get("diary")?.is_none() && c.table("private").get("diary")?.is_none(),
        "manipulate: the links' table filter keeps the private table on a",
    )?;

    // 2. The synchronization controller's durable sync points.
    at(2_000);
    ring.run(&mut a, &mut b, &mut c)?;
    let b_id = b.repo().storage_id().clone();
    let point = ring.ab.sync_point(a.repo())?;
    println!("a-b sync point in a: {point:?}");
    drop(a);
    let mut a = open(&dir, "a", &clock)?;
    check(
        ring.ab.sync_point(a.repo())? == point
            && point.peer.as_ref() == Some(&b_id)
            && point.time == 2_000
            && point.cursor > Cursor::START,
        "the link's last sync point (cursor, time, peer) is durable across a restart",
    )?;
    let idle = ring.ab.run(&mut a, &mut b)?;
    check(
        idle.changes == (0, 0) && idle.bytes == (0, 0),
        "a run with nothing changed since the sync point sends nothing",
    )?;
    at(2_500);
    a.table("tasks")
        .update("t1", [("done", Value::Bool(true))])?;
    let one = ring.ab.run(&mut a, &mut b)?;
    println!("after one update: {one:?}");
    check(
        one.documents == 1 && one.changes.0 >= 1 && one.changes.1 == 0,
        "acquire: the next run compares and sends only the row that changed",
    )?;
    ring.run(&mut a, &mut b, &mut c)?;

    // 3. Conflict detection and resolution on write.
    let cursor_b = Cursor(b.repo().feed().last_seq()?);
    at(3_000);
    a.table("tasks")
        .update("t2", [("owner", Value::from("ann"))])?;
    at(3_100);
    c.table("tasks")
        .update("t2", [("owner", Value::from("cy"))])?;
    ring.run(&mut a, &mut b, &mut c)?;
    ring.run(&mut a, &mut b, &mut c)?;
    let rows = converged(&mut a, &mut b, &mut c)?;
    check(
        rows[1].get("owner") == Some(&Value::from("cy")),
        "concurrent updates on two masters resolve the same way on all three (latest wins)",
    )?;
    let (events, _) = b.changes(cursor_b, 1_000)?;
    check(
        events
            .iter()
            .any(|e| matches!(&e.change, RowChange::Conflict { column, .. } if column == "owner")),
        "the conflict was detected and reported on the write side (b's change feed)",
    )?;

    // 4. Delete flags: delete wins over a concurrent update; a later insert revives.
    at(4_000);
    b.table("tasks").delete("t1")?;
    at(4_100);
    c.table("tasks")
        .update("t1", [("title", Value::from("plan v2"))])?;
    ring.run(&mut a, &mut b, &mut c)?;
    ring.run(&mut a, &mut b, &mut c)?;
    let rows = converged(&mut a, &mut b, &mut c)?;
    let t1_doc = a.table("tasks").document_id("t1")?;
    check(
        rows.iter().all(|r| r.key != "t1") && a.repo().contains(&t1_doc)?,
        "a delete wins over an update concurrent with it; the row stays as a tombstone",
    )?;
    at(4_500);
    a.table("tasks")
        .insert("t1", [("title", Value::from("plan v3"))])?;
    ring.run(&mut a, &mut b, &mut c)?;
    ring.run(&mut a, &mut b, &mut c)?;
    converged(&mut a, &mut b, &mut c)?;
    let t1 = c.table("tasks").get("t1")?.context("t1 revived")?;
    check(
        t1.values().len() == 1 && t1.get("title") == Some(&Value::from("plan v3")),
        "an insert after the delete revives the row with only the inserted values",
    )?;

    // 5. Cleanup: purge once every member acknowledged the delete.
    at(5_000);
    c.table("tasks").delete("t3")?;
    let t3_doc = c.table("tasks").document_id("t3")?;
    ring.run(&mut a, &mut b, &mut c)?;
    ring.run(&mut a, &mut b, &mut c)?;
    for store in [&mut a, &mut b, &mut c] {
        let members = store.members()?;
        let report = store.cleanup()?;
        println!(
            "cleanup on {}: {} members, purged {:?}, waiting {:?}",
            store.repo().peer_id(),
            members.len(),
            report.purged,
            report.waiting
        );
        check(
            members.len() == 2 && report.purged == [("tasks".to_owned(), "t3".to_owned())],
            "every member acknowledged the delete: the row document is purged",
        )?;
        check(
            !store.repo().contains(&t3_doc)? && store.repo().purge_marker(&t3_doc)?.is_some(),
            "a purge marker remains in its place",
        )?;
    }
    at(6_000);
    b.table("tasks")
        .insert("t3", [("title", Value::from("ship again"))])?;
    ring.run(&mut a, &mut b, &mut c)?;
    ring.run(&mut a, &mut b, &mut c)?;
    converged(&mut a, &mut b, &mut c)?;
    let new_doc = a.table("tasks").document_id("t3")?;
    check(
        new_doc != t3_doc
            && a.table("tasks")
                .get("t3")?
                .and_then(|r| r.get("title").cloned())
                == Some(Value::from("ship again")),
        "the key's next insert is a fresh row (next generation), on every master",
    )?;
    println!("pattern holds: Master-Master Row-Level Synchronization");
    Ok(())
}
