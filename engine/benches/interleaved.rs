//! Floor and Tandem measured in alternating rounds, so both see the same
//! machine state (these machines are shared and noisy, and a run of one after
//! the other lets heap and page-cache state favour whichever goes first).
//! Complements the criterion benches in `engine.rs`.
//!
//!     cargo bench -p tandem-engine --bench interleaved

mod common;

use std::time::{Duration, Instant};

use common::{bench_dir, five_fields, raw_redb_commit, repo_at};

use automerge::{AutoCommit, ROOT, transaction::Transactable};
use redb::Database;

const ROUNDS: usize = 21;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Run `floor` and `ours` in alternating rounds; print medians and the ratio
/// of throughputs (ours / floor).
fn compare(name: &str, per_round: usize, mut floor: impl FnMut(), mut ours: impl FnMut()) {
    let (mut f, mut o) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Alternate which goes first, too.
        let time = |g: &mut dyn FnMut()| {
            let t = Instant::now();
            g();
            t.elapsed()
        };
        if round % 2 == 0 {
            f.push(time(&mut floor));
            o.push(time(&mut ours));
        } else {
            o.push(time(&mut ours));
            f.push(time(&mut floor));
        }
    }
    let (f, o) = (median(f), median(o));
    let rate = |d: Duration| per_round as f64 / d.as_secs_f64();
    println!(
        "{name}: floor {:.0}/s, tandem {:.0}/s, ratio {:.2}x (median of {ROUNDS} alternating rounds)",
        rate(f),
        rate(o),
        f.as_secs_f64() / o.as_secs_f64()
    );
}

fn main() {
    let dir = bench_dir();
    let open = |name: &str| repo_at(&dir.path().join(name));

    // Durable single-document commits vs raw redb single-insert commits.
    const COMMITS: usize = 200;
    let db = Database::create(dir.path().join("raw.redb")).unwrap();
    let mut n = 0u64;
    let mut repo = open("durable.redb");
    let doc = repo.create().unwrap();
    let mut i = 0i64;
    compare(
        "durable single-document commits",
        COMMITS,
        || {
            for _ in 0..COMMITS {
                n += 1;
                raw_redb_commit(&db, n);
            }
        },
        || {
            for _ in 0..COMMITS {
                i += 1;
                repo.change(&doc, |d| d.put(ROOT, "n", i)).unwrap();
                repo.flush().unwrap();
                repo.drain_outputs();
            }
        },
    );

    // Small documents created and persisted, 1,000 per group commit, vs bare
    // automerge create + save in memory.
    const DOCS: usize = 1_000;
    let mut repo = open("group.redb");
    compare(
        "group commit, 1,000 five-field documents per flush",
        DOCS,
        || {
            for i in 0..DOCS {
                let mut d = AutoCommit::new();
                five_fields(&mut d, i).unwrap();
                std::hint::black_box(d.save());
            }
        },
        || {
            for i in 0..DOCS {
                let id = repo.create().unwrap();
                repo.change(&id, |d| five_fields(d, i)).unwrap();
            }
            repo.flush().unwrap();
            repo.drain_outputs();
        },
    );
}
