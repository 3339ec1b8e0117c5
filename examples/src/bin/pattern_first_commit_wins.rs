//! Pattern: **First Commit Wins** (`Strategy::FirstWriterWins`), here as a
//! per-column override in a table that is otherwise last-writer-wins.
//!
//! Two offline box offices sell the same seat. When they sync, the booking
//! with the earliest timestamp keeps the seat on both, whichever store
//! synced first; the other booking is reported as a conflict event (so the
//! second buyer can be told), and the row's other columns still follow last
//! writer wins. First-writer-wins decides only between concurrent writes: a
//! write made after seeing the current holder (a release, then a new
//! booking) replaces it as usual.
//!
//! Run: `cargo run -p tandem-examples --bin pattern_first_commit_wins`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, ensure};
use tandem_engine::rows::{RowChange, Rows, Strategy, SyncLink, TableSchema, Value};
use tandem_engine::{Cursor, MemoryStorage, PeerId, Repo, RepoConfig, ShareAll};

fn check(holds: bool, claim: &str) -> Result<()> {
    ensure!(holds, "does not hold: {claim}");
    println!("ok: {claim}");
    Ok(())
}

fn schema() -> TableSchema {
    TableSchema::new("seats")
        .strategy(Strategy::LastWriterWins)
        .column_strategy("holder", Strategy::FirstWriterWins)
}

fn office(name: &str) -> Result<(Rows<MemoryStorage>, Arc<AtomicU64>)> {
    let repo = Repo::open(
        MemoryStorage::new(),
        RepoConfig::new(PeerId::new(name)),
        ShareAll,
    )?;
    let clock = Arc::new(AtomicU64::new(0));
    let now = clock.clone();
    let mut rows = Rows::new(repo, move || now.load(Ordering::SeqCst));
    rows.define(schema());
    Ok((rows, clock))
}

fn seat(rows: &mut Rows<MemoryStorage>, column: &str) -> Result<Option<Value>> {
    Ok(rows
        .table("seats")
        .get("12A")?
        .and_then(|r| r.get(column).cloned()))
}

fn main() -> Result<()> {
    let (mut north, clock_n) = office("north-office")?;
    let (mut south, clock_s) = office("south-office")?;
    let link = SyncLink::new("north-south");

    clock_n.store(1_000, Ordering::SeqCst);
    north
        .table("seats")
        .insert("12A", [("holder", Value::Null), ("note", "window".into())])?;
    link.run(&mut north, &mut south)?;
    let cursor = Cursor(south.repo().feed().last_seq()?);

    // Offline: south books first (t=2000), north a little later (t=2500).
    clock_s.store(2_000, Ordering::SeqCst);
    clock_n.store(2_500, Ordering::SeqCst);
    south.table("seats").update(
        "12A",
        [
            ("holder", Value::from("sam")),
            ("note", "aisle please".into()),
        ],
    )?;
    north.table("seats").update(
        "12A",
        [
            ("holder", Value::from("nora")),
            ("note", "vegetarian".into()),
        ],
    )?;
    println!(
        "north before sync: holder {:?}",
        seat(&mut north, "holder")?
    );
    link.run(&mut north, &mut south)?;

    check(
        seat(&mut north, "holder")? == Some(Value::from("sam"))
            && seat(&mut south, "holder")? == Some(Value::from("sam")),
        "the first booking (sam, t=2000) keeps the seat on both offices",
    )?;
    check(
        seat(&mut north, "note")? == Some(Value::from("vegetarian"))
            && seat(&mut south, "note")? == Some(Value::from("vegetarian")),
        "the row's other column still follows the table's strategy (last writer wins)",
    )?;
    let (events, _) = south.changes(cursor, 1_000)?;
    let losers: Vec<Value> = events
        .iter()
        .filter_map(|e| match &e.change {
            RowChange::Conflict {
                column,
                versions,
                resolved,
            } if column == "holder" => {
                let lost: Vec<Value> = versions
                    .iter()
                    .filter(|v| Some(&v.value) != resolved.as_ref())
                    .map(|v| v.value.clone())
                    .collect();
                println!(
                    "conflict on seat {}: kept {resolved:?}, turned away {lost:?}",
                    e.key
                );
                Some(lost)
            }
            _ => None,
        })
        .flatten()
        .collect();
    check(
        losers == [Value::from("nora")],
        "the turned-away booking is reported as a conflict event (tell nora)",
    )?;

    // Release and rebook: writes that follow the current holder replace it.
    clock_s.store(3_000, Ordering::SeqCst);
    south
        .table("seats")
        .update("12A", [("holder", Value::Null)])?;
    link.run(&mut north, &mut south)?;
    clock_n.store(3_100, Ordering::SeqCst);
    north
        .table("seats")
        .update("12A", [("holder", Value::from("nora"))])?;
    link.run(&mut north, &mut south)?;
    let row = south.table("seats").get("12A")?.expect("row");
    check(
        row.get("holder") == Some(&Value::from("nora")) && row.conflict("holder").is_none(),
        "after a release, a later booking that saw it takes the seat (not a conflict)",
    )?;
    println!("pattern holds: First Commit Wins");
    Ok(())
}
