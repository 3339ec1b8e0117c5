//! Pattern: **Merge Conflicting Updates**, and the other conflict resolution
//! strategies that merge instead of picking a winner.
//!
//! - A multi-value column (`Strategy::MultiValue`) keeps every concurrent
//!   version: the row has no single value for it (`Row::get` is `None`) and
//!   `Row::conflict` returns all versions, on every replica, until the
//!   application writes a merged value, which then replaces them everywhere.
//! - A custom resolver (`Strategy::Custom`) is a business rule over the
//!   versions: here, the lowest stock count wins (the safe side), on every
//!   replica.
//! - Counter and text columns merge by construction: concurrent increments
//!   add up, concurrent edits interleave.
//!
//! Run: `cargo run -p tandem-examples --bin pattern_merge_conflicting_updates`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, ensure};
use tandem_engine::rows::{RowChange, Rows, Strategy, SyncLink, TableSchema, Value, Version};
use tandem_engine::{Cursor, MemoryStorage, PeerId, Repo, RepoConfig, ShareAll};

fn check(holds: bool, claim: &str) -> Result<()> {
    ensure!(holds, "does not hold: {claim}");
    println!("ok: {claim}");
    Ok(())
}

fn schema() -> TableSchema {
    // The business rule must be a pure function of the versions, so every
    // replica picks the same value.
    let lowest = Strategy::Custom(Arc::new(|_column: &str, versions: &[Version]| {
        versions
            .iter()
            .filter_map(|v| v.value.as_int())
            .min()
            .map_or(Value::Null, Value::Int)
    }));
    TableSchema::new("products")
        .column_strategy("description", Strategy::MultiValue)
        .column_strategy("stock", lowest)
        .counter("sold")
        .text("review")
}

fn replica(name: &str, now: u64) -> Result<(Rows<MemoryStorage>, Arc<AtomicU64>)> {
    let repo = Repo::open(
        MemoryStorage::new(),
        RepoConfig::new(PeerId::new(name)),
        ShareAll,
    )?;
    let clock = Arc::new(AtomicU64::new(now));
    let read = clock.clone();
    let mut rows = Rows::new(repo, move || read.load(Ordering::SeqCst));
    rows.define(schema());
    Ok((rows, clock))
}

fn main() -> Result<()> {
    let (mut shop, clock_shop) = replica("shop", 1_000)?;
    let (mut warehouse, clock_wh) = replica("warehouse", 1_000)?;
    let link = SyncLink::new("shop-warehouse");

    shop.table("products").insert(
        "p1",
        [
            ("description", Value::from("Blue mug")),
            ("stock", 10.into()),
        ],
    )?;
    link.run(&mut shop, &mut warehouse)?;
    let cursor = Cursor(warehouse.repo().feed().last_seq()?);

    // Concurrent edits on both sides.
    clock_shop.store(2_000, Ordering::SeqCst);
    clock_wh.store(2_100, Ordering::SeqCst);
    {
        let mut products = shop.table("products");
        products.update(
            "p1",
            [
                ("description", Value::from("Blue mug, 300 ml")),
                ("stock", 7.into()),
            ],
        )?;
        products.increment("p1", "sold", 3)?;
        products.splice_text("p1", "review", 0, 0, "Sturdy.")?;
    }
    {
        let mut products = warehouse.table("products");
        products.update(
            "p1",
            [
                ("description", Value::from("Blue ceramic mug")),
                ("stock", 9.into()),
            ],
        )?;
        products.increment("p1", "sold", 1)?;
        products.splice_text("p1", "review", 0, 0, "Nice glaze.")?;
    }
    link.run(&mut shop, &mut warehouse)?;

    for rows in [&mut shop, &mut warehouse] {
        let row = rows.table("products").get("p1")?.expect("row");
        let versions: Vec<String> = row
            .conflict("description")
            .unwrap_or_default()
            .iter()
            .map(|v| v.value.to_string())
            .collect();
        println!(
            "{}: description versions {versions:?}",
            rows.repo().peer_id()
        );
        check(
            row.get("description").is_none() && versions.len() == 2,
            "multi-value: both descriptions are kept, none chosen",
        )?;
        check(
            row.get("stock") == Some(&Value::Int(7)),
            "custom resolver: the lowest stock (7) wins the conflict",
        )?;
        check(
            row.get("sold") == Some(&Value::Int(4)),
            "counter: concurrent increments add up (3 + 1)",
        )?;
        let review = row.get("review").and_then(Value::as_str).unwrap_or("");
        check(
            review.contains("Sturdy.") && review.contains("Nice glaze."),
            "text: both concurrent edits kept",
        )?;
    }
    let (events, _) = warehouse.changes(cursor, 1_000)?;
    let reported: Vec<(String, Option<Value>)> = events
        .into_iter()
        .filter_map(|e| match e.change {
            RowChange::Conflict {
                column, resolved, ..
            } => Some((column, resolved)),
            _ => None,
        })
        .collect();
    println!("conflict events: {reported:?}");
    check(
        reported.contains(&("description".into(), None))
            && reported.contains(&("stock".into(), Some(Value::Int(7)))),
        "both conflicts are reported: the open one (no value) and the resolved one",
    )?;

    // The application merges the descriptions and writes the resolution.
    let row = warehouse.table("products").get("p1")?.expect("row");
    let merged = row
        .conflict("description")
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.value.as_str())
        .collect::<Vec<_>>()
        .join(" / ");
    clock_wh.store(3_000, Ordering::SeqCst);
    warehouse
        .table("products")
        .update("p1", [("description", Value::from(merged.clone()))])?;
    link.run(&mut shop, &mut warehouse)?;
    for rows in [&mut shop, &mut warehouse] {
        let row = rows.table("products").get("p1")?.expect("row");
        check(
            row.get("description") == Some(&Value::from(merged.clone()))
                && row.conflict("description").is_none(),
            &format!("the application's merge {merged:?} resolves the conflict everywhere"),
        )?;
    }
    println!("pattern holds: Merge Conflicting Updates");
    Ok(())
}
