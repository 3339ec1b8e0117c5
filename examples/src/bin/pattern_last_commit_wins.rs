//! Pattern: **Last Commit Wins**, the default conflict resolution strategy
//! (`Strategy::LastWriterWins`).
//!
//! Two replicas change the same column of the same row without seeing each
//! other's change. After they sync, both hold the version with the latest
//! hybrid-logical-clock timestamp; a tie in the clock breaks by replica id;
//! both picked the same winner, and the resolution is reported as a conflict
//! event in each one's change feed, never silently. A write made after
//! seeing another is not a conflict at all: the clock moves past what the
//! writer saw, so it wins even from a replica whose wall clock is behind.
//!
//! Run: `cargo run -p tandem-examples --bin pattern_last_commit_wins`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, ensure};
use tandem_engine::rows::{RowChange, Rows, SyncLink, TableSchema, Value};
use tandem_engine::{Cursor, MemoryStorage, PeerId, Repo, RepoConfig, ShareAll};

fn check(holds: bool, claim: &str) -> Result<()> {
    ensure!(holds, "does not hold: {claim}");
    println!("ok: {claim}");
    Ok(())
}

/// A replica whose wall clock the program sets.
fn replica(name: &str) -> Result<(Rows<MemoryStorage>, Arc<AtomicU64>)> {
    let repo = Repo::open(
        MemoryStorage::new(),
        RepoConfig::new(PeerId::new(name)),
        ShareAll,
    )?;
    let clock = Arc::new(AtomicU64::new(0));
    let now = clock.clone();
    let mut rows = Rows::new(repo, move || now.load(Ordering::SeqCst));
    // Last writer wins is the default; said here to be explicit.
    rows.define(TableSchema::new("prices").strategy(tandem_engine::rows::Strategy::LastWriterWins));
    Ok((rows, clock))
}

fn price(rows: &mut Rows<MemoryStorage>) -> Result<Option<Value>> {
    Ok(rows
        .table("prices")
        .get("sku-1")?
        .and_then(|r| r.get("price").cloned()))
}

/// The conflict events in a replica's feed after `cursor`: (versions, winner).
fn conflicts(
    rows: &mut Rows<MemoryStorage>,
    cursor: Cursor,
) -> Result<Vec<(usize, Option<Value>)>> {
    let (events, _) = rows.changes(cursor, 10_000)?;
    Ok(events
        .into_iter()
        .filter_map(|e| match e.change {
            RowChange::Conflict {
                versions, resolved, ..
            } => {
                println!(
                    "conflict event on {}: {} versions, resolved to {:?} (origin {:?})",
                    e.key,
                    versions.len(),
                    resolved,
                    e.origin
                );
                Some((versions.len(), resolved))
            }
            _ => None,
        })
        .collect())
}

fn main() -> Result<()> {
    let (mut a, clock_a) = replica("store-a")?;
    let (mut b, clock_b) = replica("store-b")?;
    let link = SyncLink::new("a-b");

    clock_a.store(1_000, Ordering::SeqCst);
    a.table("prices")
        .insert("sku-1", [("price", Value::Int(10))])?;
    link.run(&mut a, &mut b)?;

    // 1. Concurrent writes: b's clock is later, so b's version wins everywhere.
    let (from_a, from_b) = (
        Cursor(a.repo().feed().last_seq()?),
        Cursor(b.repo().feed().last_seq()?),
    );
    clock_a.store(2_000, Ordering::SeqCst);
    clock_b.store(3_000, Ordering::SeqCst);
    a.table("prices")
        .update("sku-1", [("price", Value::Int(11))])?;
    b.table("prices")
        .update("sku-1", [("price", Value::Int(12))])?;
    link.run(&mut a, &mut b)?;
    check(
        price(&mut a)? == Some(Value::Int(12)) && price(&mut b)? == Some(Value::Int(12)),
        "the later commit (12 at t=3000) wins on both replicas",
    )?;
    let row = a.table("prices").get("sku-1")?.expect("row");
    let versions = row.conflict("price").unwrap_or_default();
    for v in versions {
        println!("  version {} at {}", v.value, v.at);
    }
    check(
        versions.len() == 2,
        "the losing version is still visible (Row::conflict)",
    )?;
    check(
        conflicts(&mut a, from_a)? == [(2, Some(Value::Int(12)))]
            && conflicts(&mut b, from_b)? == [(2, Some(Value::Int(12)))],
        "each replica reported the automatic resolution as a conflict event",
    )?;

    // 2. A tie in the clock: the higher replica id wins, on both.
    clock_a.store(5_000, Ordering::SeqCst);
    clock_b.store(5_000, Ordering::SeqCst);
    a.table("prices")
        .update("sku-1", [("price", Value::Int(20))])?;
    b.table("prices")
        .update("sku-1", [("price", Value::Int(21))])?;
    link.run(&mut a, &mut b)?;
    let expected = if a.replica() > b.replica() { 20 } else { 21 };
    check(
        price(&mut a)? == Some(Value::Int(expected))
            && price(&mut b)? == Some(Value::Int(expected)),
        &format!(
            "a tie at t=5000 breaks by replica id: {} wins on both",
            if expected == 20 { "store-a" } else { "store-b" }
        ),
    )?;

    // 3. Causality beats wall clocks: a's clock is far behind, but it writes
    //    after seeing b's version, so its write orders later and replaces it.
    clock_a.store(100, Ordering::SeqCst);
    a.table("prices")
        .update("sku-1", [("price", Value::Int(30))])?;
    link.run(&mut a, &mut b)?;
    let row = b.table("prices").get("sku-1")?.expect("row");
    check(
        row.get("price") == Some(&Value::Int(30)) && row.conflict("price").is_none(),
        "a write that follows another replaces it, whatever the wall clock (no conflict)",
    )?;
    println!("pattern holds: Last Commit Wins");
    Ok(())
}
