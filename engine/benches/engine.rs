//! Engine benchmarks, each next to its floor in the same run.
//!
//! Ratios (ours / floor) are printed by `engine/benches/ratios.py` from
//! criterion's estimates; docs/benchmarks.md records them. Run:
//!
//!     cargo bench -p tandem-engine --bench engine && python3 engine/benches/ratios.py

mod common;

use common::{bench_dir, five_fields, raw_redb_commit, repo_at};
use std::time::{Duration, Instant};

use automerge::{AutoCommit, ObjType, ROOT, transaction::Transactable};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use redb::Database;
use tandem_engine::DocumentId;

/// Durable single-document commits vs raw redb single-insert durable commits.
fn durable_commits(c: &mut Criterion) {
    let mut g = c.benchmark_group("durable_commit");
    g.throughput(Throughput::Elements(1));
    g.sample_size(30).measurement_time(Duration::from_secs(8));

    let dir = bench_dir();
    let db = Database::create(dir.path().join("raw.redb")).unwrap();
    let mut n = 0u64;
    g.bench_function("floor_redb_single_insert", |b| {
        b.iter(|| {
            n += 1;
            raw_redb_commit(&db, n);
        })
    });

    let mut repo = repo_at(&dir.path().join("tandem.redb"));
    let doc = repo.create().unwrap();
    let mut i = 0i64;
    g.bench_function("tandem_change_and_flush", |b| {
        b.iter(|| {
            i += 1;
            repo.change(&doc, |d| d.put(ROOT, "n", i)).unwrap();
            repo.flush().unwrap();
        })
    });
    g.finish();
}

/// Small documents created and persisted with group commit vs bare automerge
/// create+save in memory.
fn group_commit(c: &mut Criterion) {
    const N: usize = 1_000;
    let mut g = c.benchmark_group("group_commit_1000_docs");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(10));

    g.bench_function("floor_automerge_create_save", |b| {
        b.iter(|| {
            let mut total = 0;
            for i in 0..N {
                let mut d = AutoCommit::new();
                five_fields(&mut d, i).unwrap();
                total += d.save().len();
            }
            total
        })
    });

    let dir = bench_dir();
    let mut repo = repo_at(&dir.path().join("group.redb"));
    g.bench_function("tandem_create_and_flush", |b| {
        b.iter(|| {
            for i in 0..N {
                let id = repo.create().unwrap();
                repo.change(&id, |d| five_fields(d, i)).unwrap();
            }
            repo.flush().unwrap();
            // Outputs are events only (no peers); drop them.
            repo.drain_outputs().len()
        })
    });
    g.finish();
}

/// Open a store with many documents: time to open, and first read.
fn open_large_store(c: &mut Criterion) {
    let mut g = c.benchmark_group("open_store");
    g.sample_size(20);
    let dir = bench_dir();
    let mut ids = Vec::new();
    for (name, count) in [("small", 100usize), ("large", 10_000)] {
        let path = dir.path().join(format!("{name}.redb"));
        let mut repo = repo_at(&path);
        let mut made = Vec::new();
        for chunk in 0..count.div_ceil(1_000) {
            for i in 0..1_000.min(count - chunk * 1_000) {
                let id = repo.create().unwrap();
                repo.change(&id, |d| five_fields(d, i)).unwrap();
                made.push(id);
            }
            repo.flush().unwrap();
            repo.drain_outputs();
        }
        drop(repo);
        ids.push((name, path, made));
    }
    for (name, path, _) in &ids {
        g.bench_function(format!("open_{name}"), |b| b.iter(|| repo_at(path)));
    }
    let (_, path, made) = &ids[1];
    let mut k = 0;
    g.bench_function("first_read_large", |b| {
        b.iter_batched(
            || repo_at(path),
            |mut repo| {
                k = (k + 7919) % made.len();
                let heads = repo.heads(&made[k]).unwrap();
                // Returned, so closing the database is not part of the timing.
                (repo, heads)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn load_trace() -> Vec<(usize, usize, String)> {
    // The shared data folder sits next to the repository; TANDEM_EDIT_TRACE overrides.
    let path = std::env::var("TANDEM_EDIT_TRACE").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/automerge-perf-edits.json"
        )
        .into()
    });
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("editing trace missing at {path} (set TANDEM_EDIT_TRACE): {e}"));
    let raw: Vec<Vec<serde_json::Value>> = serde_json::from_str(&text).unwrap();
    raw.into_iter()
        .map(|e| {
            let pos = e[0].as_u64().unwrap() as usize;
            let del = e[1].as_u64().unwrap() as usize;
            let ins: String = e[2..].iter().map(|v| v.as_str().unwrap()).collect();
            (pos, del, ins)
        })
        .collect()
}

/// The editing trace as a stream of small commits (one per edit), with a
/// durable group commit every `FLUSH_EVERY` edits, vs the same commits in
/// plain automerge in memory.
fn editing_trace(c: &mut Criterion) {
    const FLUSH_EVERY: usize = 1_000;
    let trace = load_trace();
    let mut g = c.benchmark_group("editing_trace");
    g.throughput(Throughput::Elements(trace.len() as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(30));

    let apply =
        |d: &mut AutoCommit, text: &automerge::ObjId, (pos, del, ins): &(usize, usize, String)| {
            d.splice_text(text, *pos, *del as isize, ins).unwrap();
            d.commit();
        };
    g.bench_function("floor_automerge_commit_per_edit", |b| {
        b.iter(|| {
            let mut d = AutoCommit::new();
            let text = d.put_object(ROOT, "text", ObjType::Text).unwrap();
            for e in &trace {
                apply(&mut d, &text, e);
            }
            d.get_heads()
        })
    });
    let dir = bench_dir();
    g.bench_function("tandem_commit_per_edit_flush_per_1000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for it in 0..iters {
                let mut repo = repo_at(&dir.path().join(format!("trace-{it}.redb")));
                let id = DocumentId::random();
                repo.create_with_id(id).unwrap();
                let text = repo
                    .change(&id, |d| d.put_object(ROOT, "text", ObjType::Text))
                    .unwrap();
                let start = Instant::now();
                for (n, (pos, del, ins)) in trace.iter().enumerate() {
                    repo.change(&id, |d| d.splice_text(&text, *pos, *del as isize, ins))
                        .unwrap();
                    if n % FLUSH_EVERY == FLUSH_EVERY - 1 {
                        repo.flush().unwrap();
                        repo.drain_outputs();
                    }
                }
                repo.flush().unwrap();
                total += start.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    durable_commits,
    group_commit,
    open_large_store,
    editing_trace
);
criterion_main!(benches);
