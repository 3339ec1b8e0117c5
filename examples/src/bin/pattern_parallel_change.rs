//! Pattern: **Parallel Change**. Each system applies a change locally, at
//! once and durably, then the systems communicate and reconcile.
//!
//! `laptop` and `phone` edit the same trip offline, each committing to its
//! own store: different columns of the same row, a counter, and a
//! collaborative text. They also add rows the other has never heard of.
//! Then they sync through `hub` (a storing peer, as the relay is) over the
//! automerge-repo protocol (`sync_in_process`), in different orders, and
//! reconcile to identical tables: the same key is one row whose columns
//! merge, increments add up, text edits interleave, and the other's new rows
//! are discovered through the table's catalogs.
//!
//! Run: `cargo run -p tandem-examples --bin pattern_parallel_change`

use anyhow::{Result, ensure};
use tandem_engine::rows::{Rows, TableSchema, Value};
use tandem_engine::{
    MemoryStorage, PeerId, Repo, RepoConfig, ServeOnRequest, ShareAll, sync_in_process,
};

fn check(holds: bool, claim: &str) -> Result<()> {
    ensure!(holds, "does not hold: {claim}");
    println!("ok: {claim}");
    Ok(())
}

fn schema() -> TableSchema {
    TableSchema::new("trips").counter("votes").text("plan")
}

fn replica(name: &str, now: u64) -> Result<Rows<MemoryStorage>> {
    let repo = Repo::open(
        MemoryStorage::new(),
        RepoConfig::new(PeerId::new(name)),
        ShareAll,
    )?;
    let mut rows = Rows::new(repo, move || now);
    rows.define(schema());
    Ok(rows)
}

/// Sync a replica with the hub, then fetch rows it learned of from the
/// table's catalogs (two rounds: catalogs first, then the rows they list).
fn sync(replica: &mut Rows<MemoryStorage>, hub: &mut Repo<MemoryStorage>) -> Result<()> {
    replica.subscribe("trips")?;
    sync_in_process(replica.repo_mut(), hub, 50)?;
    if replica.discover("trips")? > 0 {
        sync_in_process(replica.repo_mut(), hub, 50)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let mut laptop = replica("laptop", 1_000)?;
    let mut phone = replica("phone", 1_005)?;
    let mut hub = Repo::open(
        MemoryStorage::new(),
        RepoConfig::new(PeerId::new("hub")),
        ServeOnRequest,
    )?;

    // Both offline: each applies its change locally and durably.
    {
        let mut trips = laptop.table("trips");
        trips.insert(
            "lisbon",
            [("title", Value::from("Lisbon")), ("budget", 900.into())],
        )?;
        trips.increment("lisbon", "votes", 2)?;
        trips.splice_text("lisbon", "plan", 0, 0, "fly out")?;
        trips.insert("porto", [("title", Value::from("Porto"))])?;
    }
    {
        let mut trips = phone.table("trips");
        trips.insert("lisbon", [("dates", Value::from("May 3-9"))])?;
        trips.increment("lisbon", "votes", 3)?;
        trips.splice_text("lisbon", "plan", 0, 0, "train back")?;
        trips.insert("faro", [("title", Value::from("Faro"))])?;
    }
    laptop.flush()?;
    phone.flush()?;
    println!(
        "laptop (offline): {:?}",
        laptop.table("trips").get("lisbon")?
    );
    println!(
        "phone  (offline): {:?}",
        phone.table("trips").get("lisbon")?
    );
    check(
        laptop.table("trips").document_id("lisbon")?
            == phone.table("trips").document_id("lisbon")?,
        "the same key inserted on two offline replicas is the same row document",
    )?;

    // Communicate and reconcile, in different orders.
    sync(&mut laptop, &mut hub)?;
    sync(&mut phone, &mut hub)?;
    sync(&mut laptop, &mut hub)?;

    let on_laptop = laptop.table("trips").scan()?;
    let on_phone = phone.table("trips").scan()?;
    for row in &on_laptop {
        println!("reconciled: {} {:?}", row.key, row.values());
    }
    check(on_laptop == on_phone, "both replicas hold identical rows")?;
    let keys: Vec<&str> = on_laptop.iter().map(|r| r.key.as_str()).collect();
    check(
        keys == ["faro", "lisbon", "porto"],
        "each learned the rows only the other had (catalog discovery)",
    )?;
    let lisbon = laptop.table("trips").get("lisbon")?.expect("lisbon");
    check(
        lisbon.get("title") == Some(&Value::from("Lisbon"))
            && lisbon.get("budget") == Some(&Value::Int(900))
            && lisbon.get("dates") == Some(&Value::from("May 3-9")),
        "different columns written in parallel all survive",
    )?;
    check(
        lisbon.get("votes") == Some(&Value::Int(5)),
        "concurrent counter increments add up (2 + 3)",
    )?;
    let plan = lisbon.get("plan").and_then(Value::as_str).unwrap_or("");
    check(
        plan.contains("fly out") && plan.contains("train back"),
        "concurrent text edits interleave, none lost",
    )?;
    let doc = laptop.table("trips").document_id("lisbon")?;
    check(
        laptop.repo_mut().heads(&doc)? == phone.repo_mut().heads(&doc)?,
        "the row has the same version (heads) on both",
    )?;
    println!("pattern holds: Parallel Change");
    Ok(())
}
