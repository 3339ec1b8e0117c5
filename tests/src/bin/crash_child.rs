//! The child process of the crash test (`tests/tests/crash.rs`).
//!
//! Usage: `crash_child <store path> <run id> [seed]`
//!
//! Opens the redb store, then commits forever until it is killed: each
//! round edits one or more of a few fixed documents (one automerge change
//! per edit, all flushed together in one group commit) and, only after
//! `Repo::flush` has returned `Ok`, reports every change of that flush on
//! stdout as
//!
//! ```text
//! ACK <document id> <key> <value> <pad length>
//! ```
//!
//! meaning: the root map of the document has `key` = `value` (an integer),
//! and, when `pad length` is not 0, `"{key}-pad"` = a string of that length
//! (see [`pad`]). Before the loop it prints `OPEN <milliseconds>` once.
//! Every line is written with one unbuffered `write_all` and flushed, so the
//! parent sees a line only after its flush was durable. Any error is fatal:
//! the process prints it on stderr and exits with status 2, which the parent
//! counts as a failure (the child must only ever die by SIGKILL).

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;
use tandem_tests::crash::pad;

use tandem_engine::automerge::transaction::Transactable;
use tandem_engine::automerge::{ROOT, ScalarValue};
use tandem_engine::{DocumentId, PeerId, RedbStorage, Repo, RepoConfig, ShareAll};

/// How many documents the child writes to.
const DOCUMENTS: u8 = 4;

/// Compaction as soon as the incrementals pass 4 KiB (the engine's default
/// is 64 KiB), so compactions happen often and get killed too.
const COMPACTION_MIN_BYTES: usize = 4096;

/// A commit log that fills every few commits.
const LOG_CAPACITY: u64 = 8 * 1024;

/// The fixed id of document `i`, the same in every run.
fn document(i: u8) -> DocumentId {
    DocumentId::from_bytes([i + 1; 16])
}

/// splitmix64: enough randomness for choosing documents and sizes, without
/// a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crash_child: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(run)) = (args.next(), args.next()) else {
        return Err("usage: crash_child <store path> <run id> [seed]".into());
    };
    let seed = match args.next() {
        Some(s) => s.parse()?,
        None => u64::from(std::process::id()),
    };
    let mut rng = Rng(seed);
    let mut out = std::io::stdout().lock();

    let started = Instant::now();
    // The store's commit log: mostly so small that it fills (and is folded
    // into redb) every few commits, so kills land inside folds too;
    // sometimes the default; sometimes off. Each open first folds what the
    // previous run left in the log, whatever its capacity.
    let log_capacity = match rng.below(4) {
        0 => RedbStorage::DEFAULT_LOG_CAPACITY,
        1 => 0,
        _ => LOG_CAPACITY,
    };
    let storage = RedbStorage::open_with_log_capacity(&path, log_capacity)?;
    let mut config = RepoConfig::new(PeerId::new(format!("crash-child-{run}")));
    config.documents.compaction_min_bytes = COMPACTION_MIN_BYTES;
    let mut repo = Repo::open(storage, config, ShareAll)?;
    out.write_all(format!("OPEN {}\n", started.elapsed().as_millis()).as_bytes())?;
    out.flush()?;

    let mut n: u64 = 0;
    let mut acks = Vec::new();
    loop {
        // Mostly one change per flush; sometimes several, to several
        // documents, in one group commit.
        let changes = if rng.below(10) < 6 {
            1
        } else {
            2 + rng.below(4)
        };
        for _ in 0..changes {
            n += 1;
            let id = document(rng.below(u64::from(DOCUMENTS)) as u8);
            if !repo.contains(&id)? {
                repo.create_with_id(id)?;
            }
            // Now and then a large value, which pushes the document over
            // the compaction threshold at once.
            let pad_len = match rng.below(20) {
                0 => 2048 + rng.below(6 * 1024) as usize,
                1..=3 => 100 + rng.below(900) as usize,
                _ => 0,
            };
            let key = format!("{run}-{n}");
            repo.change(&id, |d| {
                d.put(ROOT, key.as_str(), ScalarValue::Uint(n))?;
                if pad_len > 0 {
                    d.put(ROOT, format!("{key}-pad"), pad(n, pad_len))?;
                }
                Ok(())
            })?;
            acks.push(format!("ACK {id} {key} {n} {pad_len}\n"));
        }
        repo.flush()?;
        // Durable: only now may the parent hear of these changes.
        for line in acks.drain(..) {
            out.write_all(line.as_bytes())?;
        }
        out.flush()?;
        // Drain the repo's events so they do not pile up.
        while repo.poll_output().is_some() {}
    }
}
