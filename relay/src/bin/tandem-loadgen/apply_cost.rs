//! `tandem-loadgen apply-cost`: what one fan-out reader pays automerge to
//! apply what a server sends it, with no server and no network.
//!
//! The fan-out writer overwrites one key, `v`, so the document's history of
//! that key grows by one per change. A reader applies each batch of changes
//! it receives (`load_incremental`, as the engine's sync receive does), and
//! automerge's apply walks the written key's whole history. This measures
//! that: a document holding `--history` overwrites of `v`, then a batch of
//! `--batch` more, applied to a fresh copy `--reps` times, per pair of sizes.
//!
//! The figure is the floor under any server's fan-out latency on this
//! machine: N readers on C cores need N × (cost of a batch) / C just to apply
//! one batch each, whatever the server does.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use tandem_engine::automerge::transaction::Transactable;
use tandem_engine::automerge::{AutoCommit, ROOT};

use super::{emit, pct, round1};

/// Settings of `tandem-loadgen apply-cost`.
#[derive(Debug, clap::Args)]
pub struct ApplyCostArgs {
    /// Overwrites of `v` already in the document (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000,10000")]
    history: Vec<usize>,
    /// Changes per applied batch (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    batch: Vec<usize>,
    /// Applications measured per pair (the median is reported).
    #[arg(long, default_value_t = 21)]
    reps: usize,
    /// Readers whose apply time per batch is added up in the report.
    #[arg(long, default_value_t = 50)]
    readers: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// A document whose `v` was written `history` times, one change each.
fn with_history(history: usize) -> Result<AutoCommit> {
    let mut doc = AutoCommit::new();
    for i in 0..history {
        doc.put(ROOT, "v", i as u64)?;
        doc.commit();
    }
    Ok(doc)
}

/// Median time to apply `batch` further overwrites to a copy of `base`.
fn measure(base: &mut AutoCommit, history: usize, batch: usize, reps: usize) -> Result<Duration> {
    let heads = base.get_heads();
    let mut writer = base.fork();
    for i in 0..batch {
        writer.put(ROOT, "v", (history + i) as u64)?;
        writer.commit();
    }
    let bytes = writer.save_after(&heads);
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let mut reader = base.clone();
        let start = Instant::now();
        let applied = reader.load_incremental(&bytes)?;
        times.push(start.elapsed());
        if applied != batch {
            bail!("applied {applied} changes, expected {batch}");
        }
    }
    times.sort();
    Ok(pct(&times, 50.0).expect("at least one run"))
}

pub fn main(args: &ApplyCostArgs) -> Result<()> {
    if args.reps == 0 || args.batch.contains(&0) {
        bail!("--reps and every --batch must be at least 1");
    }
    let mut rows = Vec::new();
    for &history in &args.history {
        let mut base = with_history(history)?;
        for &batch in &args.batch {
            let t = measure(&mut base, history, batch, args.reps)?;
            let us = t.as_secs_f64() * 1e6;
            rows.push(json!({
                "history": history,
                "batch": batch,
                "us_per_batch": round1(us),
                "us_per_change": round1(us / batch as f64),
                "ms_for_all_readers": round1(us * args.readers as f64 / 1000.0),
            }));
        }
    }
    let report = json!({
        "kind": "apply-cost",
        "readers": args.readers,
        "reps": args.reps,
        "rows": rows,
    });
    emit(&report, args.json, print)
}

fn print(r: &Value) {
    println!(
        "automerge apply of a batch of overwrites of one key (median of {} runs)",
        r["reps"]
    );
    println!(
        "  {:>8} {:>6} {:>12} {:>12} {:>16}",
        "history",
        "batch",
        "µs/batch",
        "µs/change",
        format!("ms × {} readers", r["readers"])
    );
    for row in r["rows"].as_array().into_iter().flatten() {
        println!(
            "  {:>8} {:>6} {:>12} {:>12} {:>16}",
            row["history"].to_string(),
            row["batch"].to_string(),
            row["us_per_batch"].to_string(),
            row["us_per_change"].to_string(),
            row["ms_for_all_readers"].to_string()
        );
    }
}
