//! Pattern: **Data Synchronization**: change data capture, data consumers,
//! idempotent operations and versioning.
//!
//! - **Change data capture**: every commit to a row, local or received, is
//!   in the store's durable change feed; `Rows::changes(cursor, limit)` reads
//!   it as `RowEvent`s (inserted, updated with the changed columns, deleted,
//!   conflict) with table, key and origin.
//! - **Data consumer**: a search index kept in step from the feed, with a
//!   durable named cursor (`ChangeFeed::cursor` / `save_cursor`): after a
//!   restart it resumes where it stopped and sees each change once.
//!   (`sqlite_mirror` is the same consumer with SQLite as the sink and the
//!   cursor in the sink's own transaction.)
//! - **Idempotent operations**: applying an event twice changes nothing
//!   (upsert and delete by key); applying the same automerge changes twice is
//!   a no-op (changes are content-addressed); a second link run sends nothing.
//! - **Versioning**: a row's version is its document's heads, carried by
//!   every feed entry (before and after) and usable in a pinned
//!   `automerge:` URL; each register version carries its HLC timestamp.
//!
//! Run: `cargo run -p tandem-examples --bin pattern_change_data_capture [-- <data dir>]`

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use tandem_engine::rows::{RowChange, RowEvent, Rows, SyncLink, Value};
use tandem_engine::{
    AutomergeUrl, MemoryStorage, Origin, PeerId, RedbStorage, Repo, RepoConfig, ShareAll, Storage,
};

const CONSUMER: &str = "search-index";

fn check(holds: bool, claim: &str) -> Result<()> {
    ensure!(holds, "does not hold: {claim}");
    println!("ok: {claim}");
    Ok(())
}

fn open(dir: &Path) -> Result<Rows<RedbStorage>> {
    let storage = RedbStorage::open(dir.join("hq.redb")).context("opening hq")?;
    let repo = Repo::open(storage, RepoConfig::new(PeerId::new("hq")), ShareAll)?;
    Ok(Rows::with_system_clock(repo))
}

/// The consumer's sink: key → column → value, as a search index would hold it.
type Index = BTreeMap<String, BTreeMap<String, Value>>;

/// Apply one event to the index. Every operation is by key, so applying an
/// event again leaves the index as it is.
fn apply(index: &mut Index, event: &RowEvent) {
    let columns = event
        .columns
        .iter()
        .filter_map(|(c, v)| v.clone().map(|v| (c.clone(), v)));
    match &event.change {
        RowChange::Inserted => {
            index.insert(event.key.clone(), columns.collect());
        }
        RowChange::Updated => {
            let row = index.entry(event.key.clone()).or_default();
            for (c, v) in &event.columns {
                match v {
                    Some(v) => row.insert(c.clone(), v.clone()),
                    None => row.remove(c),
                };
            }
        }
        RowChange::Deleted => {
            index.remove(&event.key);
        }
        RowChange::Conflict { .. } => {}
    }
}

/// Read everything after the consumer's durable cursor, `batch` feed
/// entries at a time, saving the cursor after each batch is applied.
fn consume<S: Storage>(
    rows: &mut Rows<S>,
    index: &mut Index,
    batch: usize,
) -> Result<Vec<RowEvent>> {
    let mut seen = Vec::new();
    for _ in 0..10_000 {
        let cursor = rows.repo().feed().cursor(CONSUMER)?;
        let (events, next) = rows.changes(cursor, batch)?;
        if next == cursor {
            return Ok(seen);
        }
        for e in &events {
            apply(index, e);
        }
        rows.repo().feed().save_cursor(CONSUMER, next)?;
        seen.extend(events);
    }
    anyhow::bail!("the feed did not end")
}

fn snapshot<S: Storage>(rows: &mut Rows<S>) -> Result<Index> {
    Ok(rows
        .table("orders")
        .scan()?
        .into_iter()
        .map(|r| (r.key.clone(), r.values().clone()))
        .collect())
}

fn kinds(events: &[RowEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match &e.change {
            RowChange::Conflict { column, .. } => format!("conflict {} {column}", e.key),
            other => format!("{other:?} {}", e.key).to_lowercase(),
        })
        .collect()
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
    let mut hq = open(&dir)?;
    let mut index = Index::new();

    // Change data capture: inserts, an update, a delete.
    {
        let mut orders = hq.table("orders");
        orders.insert("o1", [("item", Value::from("mug")), ("qty", 1.into())])?;
        orders.insert("o2", [("item", Value::from("plate")), ("qty", 4.into())])?;
        orders.insert("o3", [("item", Value::from("bowl")), ("qty", 2.into())])?;
        orders.update("o1", [("qty", Value::Int(3))])?;
        orders.delete("o3")?;
    }
    hq.flush()?;
    let events = consume(&mut hq, &mut index, 2)?;
    println!("captured: {:?}", kinds(&events));
    check(
        kinds(&events)
            == [
                "inserted o1",
                "inserted o2",
                "inserted o3",
                "updated o1",
                "deleted o3",
            ],
        "every insert, update and delete is captured in commit order",
    )?;
    let update = &events[3];
    check(
        update.columns == BTreeMap::from([("qty".to_owned(), Some(Value::Int(3)))])
            && update.origin == Origin::Local,
        "an update event names only the changed columns, with their new values and origin",
    )?;
    check(
        index == snapshot(&mut hq)?,
        "the consumer's index equals the table",
    )?;

    // Restart: the consumer resumes after its durable cursor.
    let saved = hq.repo().feed().cursor(CONSUMER)?;
    drop(hq);
    let mut hq = open(&dir)?;
    check(
        hq.repo().feed().cursor(CONSUMER)? == saved,
        "the named cursor survives a restart",
    )?;
    hq.table("orders")
        .insert("o4", [("item", Value::from("cup")), ("qty", 6.into())])?;
    hq.flush()?;
    let events = consume(&mut hq, &mut index, 2)?;
    check(
        kinds(&events) == ["inserted o4"] && events.iter().all(|e| e.seq > saved.0),
        "after the restart it sees only what is new, each change once",
    )?;

    // Idempotent: replaying the whole feed over the index changes nothing.
    let before = index.clone();
    let (all, _) = hq.changes(tandem_engine::Cursor::START, 10_000)?;
    for e in &all {
        apply(&mut index, e);
    }
    check(
        index == before && index == snapshot(&mut hq)?,
        "replaying events already applied leaves the index unchanged (idempotent)",
    )?;

    // Changes from another replica: origin, conflicts, versions.
    let repo = Repo::open(
        MemoryStorage::new(),
        RepoConfig::new(PeerId::new("branch")),
        ShareAll,
    )?;
    let mut branch = Rows::with_system_clock(repo);
    let link = SyncLink::new("branch-hq");
    link.run(&mut branch, &mut hq)?;
    let doc = hq.table("orders").document_id("o2")?;
    let version_before = hq.repo_mut().heads(&doc)?;
    branch
        .table("orders")
        .update("o2", [("qty", Value::Int(5))])?;
    hq.table("orders").update("o2", [("qty", Value::Int(7))])?;
    hq.flush()?;
    link.run(&mut branch, &mut hq)?;
    let events = consume(&mut hq, &mut index, 16)?;
    println!("captured: {:?}", kinds(&events));
    let remote = events
        .iter()
        .find(|e| e.origin == Origin::Remote(PeerId::new("branch")))
        .context("an event from the branch")?;
    check(
        remote.key == "o2",
        "changes received over a link are captured with their origin (the branch)",
    )?;
    check(
        events
            .iter()
            .any(|e| matches!(&e.change, RowChange::Conflict { column, .. } if column == "qty")),
        "the concurrent qty writes are captured as a conflict event",
    )?;
    check(
        index == snapshot(&mut hq)?,
        "the index still equals the table",
    )?;

    // Versioning: heads are the version; register versions carry timestamps.
    let version_after = hq.repo_mut().heads(&doc)?;
    check(
        version_before != version_after && branch.repo_mut().heads(&doc)? == version_after,
        "the row's version (heads) moved, and both stores hold the same version",
    )?;
    let entry = hq
        .repo()
        .feed()
        .read(tandem_engine::Cursor::START, 10_000)?
        .into_iter()
        .rev()
        .find(|e| e.document == doc)
        .context("a feed entry for o2")?;
    check(
        entry.heads == version_after,
        "each feed entry carries the version before and after its commit",
    )?;
    let pinned = AutomergeUrl {
        document: doc,
        heads: Some(version_before),
    };
    println!("o2 as it was, for any automerge-repo client: {pinned}");
    let row = hq.table("orders").get("o2")?.context("o2")?;
    for v in row.conflict("qty").unwrap_or_default() {
        println!("  qty version {} written at {}", v.value, v.at);
    }
    check(
        row.conflict("qty")
            .is_some_and(|v| v.len() == 2 && v[0].at < v[1].at),
        "each register version carries its hybrid-logical-clock timestamp",
    )?;

    // Idempotent at the change level: the same changes again are a no-op.
    let changes = branch.repo_mut().changes_since(&doc, &[])?;
    let last = hq.repo().feed().last_seq()?;
    let applied = hq
        .repo_mut()
        .apply_changes(&doc, &changes, &PeerId::new("branch"))?;
    hq.flush()?;
    check(
        !applied && hq.repo().feed().last_seq()? == last,
        "applying changes the store already has is a no-op (no new version, no event)",
    )?;
    let again = link.run(&mut branch, &mut hq)?;
    check(again.changes == (0, 0), "a second link run sends nothing")?;
    println!("pattern holds: Data Synchronization (change data capture)");
    Ok(())
}
