//! Pattern: **cleanup of deleted rows** (Master-Master Row-Level
//! Synchronization), the protocol in full.
//!
//! `hub` links to `laptop` and to `archive`; each link makes the other end a
//! member of the store's membership (`Rows::members`) and records which
//! heads of each deleted row the other end holds (acknowledgements).
//!
//! 1. A member that has not acknowledged a delete blocks the purge
//!    (`CleanupReport::waiting` names it); once it syncs, the row is purged.
//! 2. A member that is gone for good is retired (`Rows::retire_member`),
//!    which unblocks the purge.
//! 3. When the retired replica comes back with an update to the purged row,
//!    the purge marker makes the hub refuse it and report it
//!    (`LinkRun::refused_purged`, `Event::PurgedDocumentUpdate`): the row is
//!    not resurrected.
//! 4. Inserting the key again makes a fresh row document (the key's next
//!    generation in the catalog), which syncs like any row.
//!
//! Run: `cargo run -p tandem-examples --bin pattern_cleanup`

use anyhow::{Context, Result, ensure};
use tandem_engine::rows::{Rows, SyncLink, Value};
use tandem_engine::{Event, MemoryStorage, Output, PeerId, Repo, RepoConfig, ShareAll};

type Store = Rows<MemoryStorage>;

fn check(holds: bool, claim: &str) -> Result<()> {
    ensure!(holds, "does not hold: {claim}");
    println!("ok: {claim}");
    Ok(())
}

fn store(name: &str) -> Result<Store> {
    let repo = Repo::open(
        MemoryStorage::new(),
        RepoConfig::new(PeerId::new(name)),
        ShareAll,
    )?;
    Ok(Rows::with_system_clock(repo))
}

fn main() -> Result<()> {
    let (mut hub, mut laptop, mut archive) = (store("hub")?, store("laptop")?, store("archive")?);
    let to_laptop = SyncLink::new("hub-laptop");
    let to_archive = SyncLink::new("hub-archive");
    for key in ["o1", "o2", "o3"] {
        hub.table("orders")
            .insert(key, [("status", Value::from("open"))])?;
    }
    to_laptop.run(&mut hub, &mut laptop)?;
    to_archive.run(&mut hub, &mut archive)?;
    let archive_id = archive.repo().storage_id().clone();
    check(
        hub.members()?.len() == 2 && laptop.members()? == [hub.repo().storage_id().clone()],
        "links make both ends members: the hub waits for laptop and archive",
    )?;

    // 1. A lagging member blocks the purge until it acknowledges.
    hub.table("orders").delete("o1")?;
    to_laptop.run(&mut hub, &mut laptop)?;
    let report = hub.cleanup()?;
    println!("hub cleanup: {report:?}");
    check(
        report.purged.is_empty()
            && report.waiting
                == [(
                    "orders".to_owned(),
                    "o1".to_owned(),
                    vec![archive_id.clone()],
                )],
        "the archive has not acknowledged the delete of o1: the purge waits for it",
    )?;
    to_archive.run(&mut hub, &mut archive)?;
    let report = hub.cleanup()?;
    check(
        report.purged == [("orders".to_owned(), "o1".to_owned())],
        "once the archive synced (and so acknowledged), o1 is purged",
    )?;

    // 2. The archive goes away with its copy; it even edits o2 offline.
    archive
        .table("orders")
        .update("o2", [("status", Value::from("refunded"))])?;
    hub.table("orders").delete("o2")?;
    to_laptop.run(&mut hub, &mut laptop)?;
    let o2_doc = hub.table("orders").document_id("o2")?;
    check(
        hub.cleanup()?.purged.is_empty(),
        "the unreachable archive blocks the purge of o2",
    )?;
    hub.retire_member(&archive_id)?;
    let report = hub.cleanup()?;
    check(
        !hub.members()?.contains(&archive_id)
            && report.purged == [("orders".to_owned(), "o2".to_owned())],
        "retiring the archive from the membership unblocks the purge",
    )?;
    let mut report = laptop.cleanup()?;
    println!("laptop cleanup: {report:?}");
    report.purged.sort();
    check(
        report.purged
            == [
                ("orders".to_owned(), "o1".to_owned()),
                ("orders".to_owned(), "o2".to_owned()),
            ],
        "the laptop, whose only member is the hub, purges o1 and o2 in its own cleanup",
    )?;
    check(
        hub.repo().purge_marker(&o2_doc)?.is_some(),
        "the hub keeps a purge marker for o2's document",
    )?;

    // 3. The archive returns: its late update to the purged row is refused.
    hub.repo_mut().drain_outputs();
    let run = to_archive.run(&mut hub, &mut archive)?;
    println!("archive returns: {run:?}");
    let reported = hub.repo_mut().drain_outputs().into_iter().any(|o| {
        matches!(o, Output::Event(Event::PurgedDocumentUpdate { document, .. }) if document == o2_doc)
    });
    check(
        run.refused_purged == [o2_doc] && reported,
        "the late update is refused and reported (LinkRun::refused_purged, PurgedDocumentUpdate)",
    )?;
    check(
        hub.table("orders").get("o2")?.is_none() && !hub.repo().contains(&o2_doc)?,
        "the purged row is not resurrected",
    )?;

    // 4. The key's next insert is a fresh row: the next generation.
    hub.table("orders")
        .insert("o2", [("status", Value::from("reopened"))])?;
    let fresh = hub.table("orders").document_id("o2")?;
    to_laptop.run(&mut hub, &mut laptop)?;
    let on_laptop = laptop.table("orders").get("o2")?.context("o2 on laptop")?;
    check(
        fresh != o2_doc
            && on_laptop.values().len() == 1
            && on_laptop.get("status") == Some(&Value::from("reopened")),
        "inserting o2 again makes a new row document that syncs like any row",
    )?;
    let keys: Vec<String> = hub
        .table("orders")
        .scan()?
        .into_iter()
        .map(|r| r.key)
        .collect();
    check(keys == ["o2", "o3"], "the hub's table: o2 (new) and o3")?;
    println!("pattern holds: cleanup of deleted rows");
    Ok(())
}
