//! Crash test: a child process (`src/bin/crash_child.rs`) commits in a loop
//! and is killed with SIGKILL at random moments. After every kill the store
//! is reopened here and must open cleanly and hold every commit the child
//! reported as acknowledged (it reports a commit only after `Repo::flush`
//! returned `Ok`), with a change feed that agrees with the documents.
//! A second test kills the child while it creates a brand-new store.
//!
//! `TANDEM_CRASH_SEED` fixes the random seed (it is printed on every run);
//! `TANDEM_CRASH_CYCLES` overrides the number of cycles. On failure the
//! store is kept under the target directory's tmp folder, together with a
//! copy of the files exactly as the last kill left them
//! (`store.after-kill.redb` and its commit log `store.after-kill.redb-wal`
//! and `-wal2`),
//! and the path is printed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tandem_tests::crash::pad;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_engine::automerge::{Automerge, ChangeHash, ROOT, ReadDoc, ScalarValue, Value};
use tandem_engine::feed::Cursor;
use tandem_engine::{
    DocumentId, Origin, PeerId, RedbStorage, Repo, RepoConfig, ShareAll, Storage, StorageKey,
};

const CHILD: &str = env!("CARGO_BIN_EXE_crash_child");

/// Longest wait for the child's first acknowledgements in one cycle.
const ACK_WAIT_LIMIT: Duration = Duration::from_secs(10);

/// One acknowledged commit, as the child reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ack {
    document: DocumentId,
    key: String,
    value: u64,
    pad: usize,
}

fn parse_ack(line: &str) -> Ack {
    let fields: Vec<&str> = line.split(' ').collect();
    assert!(
        fields.len() == 5 && fields[0] == "ACK",
        "malformed line from the child: {line:?}"
    );
    Ack {
        document: fields[1].parse().expect("document id"),
        key: fields[2].to_owned(),
        value: fields[3].parse().expect("value"),
        pad: fields[4].parse().expect("pad length"),
    }
}

/// What the reader thread has seen on the child's stdout.
#[derive(Debug, Default)]
struct Seen {
    opened: bool,
    acks: Vec<Ack>,
}

/// Read complete lines only: a line cut short by the kill has no `\n` and is
/// not an acknowledgement.
fn read_stdout(stdout: impl Read, seen: Arc<Mutex<Seen>>) {
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Some(complete) = line.strip_suffix('\n') else {
            return; // cut short by the kill
        };
        let mut seen = seen.lock().unwrap();
        if complete.starts_with("OPEN ") {
            seen.opened = true;
        } else {
            seen.acks.push(parse_ack(complete));
        }
    }
}

/// How one cycle decides when to kill.
#[derive(Clone, Copy, Debug)]
enum KillPlan {
    /// A short random time after spawning: often while opening the store.
    Early(Duration),
    /// A random time after spawning.
    After(Duration),
    /// Once at least this many acknowledgements arrived, then a random time.
    AfterAcks(usize, Duration),
}

struct CycleOutcome {
    acks: Vec<Ack>,
    /// The child was still running when killed (as it must be).
    killed_running: bool,
    /// The child had opened the store before the kill.
    opened: bool,
}

fn run_child(store: &Path, run: &str, seed: u64, plan: KillPlan) -> CycleOutcome {
    let mut child: Child = Command::new(CHILD)
        .arg(store)
        .arg(run)
        .arg(seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn crash_child");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stdout = child.stdout.take().unwrap();
    let reader: JoinHandle<()> = {
        let seen = seen.clone();
        std::thread::spawn(move || read_stdout(stdout, seen))
    };
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let wait = match plan {
        KillPlan::Early(d) | KillPlan::After(d) => d,
        KillPlan::AfterAcks(min, d) => {
            let deadline = Instant::now() + ACK_WAIT_LIMIT;
            while seen.lock().unwrap().acks.len() < min
                && Instant::now() < deadline
                && child.try_wait().unwrap().is_none()
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            d
        }
    };
    std::thread::sleep(wait);

    let killed_running = child.try_wait().unwrap().is_none();
    // SIGKILL on Unix; an error only means it already exited.
    let _ = child.kill();
    let status = child.wait().expect("wait for crash_child");
    reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    assert!(
        killed_running,
        "crash_child {run} exited by itself ({status}) instead of being killed; stderr:\n{stderr}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "crash_child {run} did not die of SIGKILL ({status}); stderr:\n{stderr}"
        );
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    CycleOutcome {
        acks: seen.acks,
        killed_running,
        opened: seen.opened,
    }
}

/// What the checks learned about the store, for the summary.
#[derive(Debug, Default)]
struct StoreState {
    last_seq: u64,
    /// The snapshot key of each document, if it has one.
    snapshots: BTreeMap<DocumentId, String>,
}

/// The acknowledged key and, if any, its padding hold the reported values.
fn check_ack(d: &Automerge, ack: &Ack) -> Result<(), String> {
    let get = |key: &str| d.get(ROOT, key).map(|v| v.map(|(v, _)| v.into_owned()));
    match get(&ack.key) {
        Ok(Some(Value::Scalar(s))) if *s == ScalarValue::Uint(ack.value) => {}
        other => {
            return Err(format!(
                "acknowledged {ack:?} lost or wrong: found {other:?}"
            ));
        }
    }
    if ack.pad == 0 {
        return Ok(());
    }
    let expected = pad(ack.value, ack.pad);
    match get(&format!("{}-pad", ack.key)) {
        Ok(Some(Value::Scalar(s))) if matches!(&*s, ScalarValue::Str(p) if *p == expected) => {
            Ok(())
        }
        other => {
            let found =
                other.map(|o| o.map(|v| v.to_string().chars().take(40).collect::<String>()));
            Err(format!(
                "acknowledged {ack:?}: padding lost or wrong: found {found:?}"
            ))
        }
    }
}

/// Reopen the store and check everything acknowledged so far.
fn verify(store: &Path, acked: &[Ack]) -> Result<StoreState, String> {
    let storage = RedbStorage::open(store).map_err(|e| format!("store does not open: {e}"))?;
    let mut repo = Repo::open(
        storage,
        RepoConfig::new(PeerId::new("crash-check")),
        ShareAll,
    )
    .map_err(|e| format!("repo does not open: {e}"))?;

    // Every acknowledged commit is there, with its value.
    let mut by_document: BTreeMap<DocumentId, Vec<&Ack>> = BTreeMap::new();
    for ack in acked {
        by_document.entry(ack.document).or_default().push(ack);
    }
    for (doc, acks) in by_document {
        repo.view(&doc, |d| acks.iter().try_for_each(|ack| check_ack(d, ack)))
            .map_err(|e| {
                format!("document {doc} with acknowledged commits does not load: {e}")
            })??;
    }

    // The feed: contiguous from 1 to last_seq, and agreeing with the documents.
    let last_seq = repo
        .feed()
        .last_seq()
        .map_err(|e| format!("feed last_seq: {e}"))?;
    let mut cursor = Cursor::START;
    let mut last_heads = BTreeMap::new();
    let mut entries = Vec::new();
    loop {
        let page = repo
            .feed()
            .read(cursor, 500)
            .map_err(|e| format!("feed read after {cursor:?}: {e}"))?;
        let Some(last) = page.last() else { break };
        cursor = Cursor(last.seq);
        entries.extend(page);
    }
    for (i, e) in entries.iter().enumerate() {
        if e.seq != i as u64 + 1 {
            return Err(format!(
                "feed not contiguous: entry {} has seq {} (previous {:?})",
                i + 1,
                e.seq,
                i.checked_sub(1).map(|j| entries[j].seq)
            ));
        }
        if e.origin != Origin::Local {
            return Err(format!("feed entry {} has origin {:?}", e.seq, e.origin));
        }
        last_heads.insert(e.document, e.heads.clone());
    }
    if entries.len() as u64 != last_seq {
        return Err(format!(
            "feed holds {} entries but last_seq is {last_seq}",
            entries.len()
        ));
    }
    if last_seq < acked.len() as u64 {
        return Err(format!(
            "feed has {last_seq} entries, fewer than the {} acknowledged commits",
            acked.len()
        ));
    }
    // Every feed entry's change is in its document (the feed is never ahead
    // of the documents), and the last entry of each document names its
    // current heads (the documents are never ahead of the feed).
    let mut named: BTreeMap<DocumentId, BTreeSet<ChangeHash>> = BTreeMap::new();
    for e in &entries {
        named.entry(e.document).or_default().extend(&e.heads);
    }
    for (doc, hashes) in &named {
        let hashes: Vec<ChangeHash> = hashes.iter().copied().collect();
        let missing = repo
            .view(doc, |d| d.get_missing_deps(&hashes))
            .map_err(|err| format!("document {doc} of the feed does not load: {err}"))?;
        if !missing.is_empty() {
            let seqs: Vec<u64> = entries
                .iter()
                .filter(|e| e.heads.iter().any(|h| missing.contains(h)))
                .map(|e| e.seq)
                .collect();
            return Err(format!(
                "feed entries {seqs:?} name changes {missing:?} that document {doc} lacks"
            ));
        }
    }
    let stored: BTreeSet<DocumentId> = repo
        .document_ids()
        .map_err(|e| format!("document ids: {e}"))?
        .into_iter()
        .collect();
    let in_feed: BTreeSet<DocumentId> = last_heads.keys().copied().collect();
    if stored != in_feed {
        return Err(format!(
            "stored documents {stored:?} differ from the documents in the feed {in_feed:?}"
        ));
    }
    let mut state = StoreState {
        last_seq,
        ..StoreState::default()
    };
    for (doc, heads) in &last_heads {
        let mut current = repo
            .heads(doc)
            .map_err(|e| format!("heads of {doc}: {e}"))?;
        let mut expected = heads.clone();
        current.sort();
        expected.sort();
        if current != expected {
            return Err(format!(
                "document {doc} has heads {current:?} but its last feed entry says {expected:?}"
            ));
        }
        // A compaction replaces snapshot and incrementals in one transaction:
        // two snapshots side by side would mean half a compaction survived.
        let prefix = StorageKey::new([doc.to_string()]).unwrap();
        let keys = repo
            .storage()
            .scan(&prefix, None, usize::MAX)
            .map_err(|e| format!("scan {doc}: {e}"))?;
        let snapshots: Vec<&StorageKey> = keys
            .iter()
            .map(|(k, _)| k)
            .filter(|k| k.parts().get(1).is_some_and(|p| p == "snapshot"))
            .collect();
        if snapshots.len() > 1 {
            return Err(format!(
                "document {doc} has several snapshots: {snapshots:?}"
            ));
        }
        if let Some(s) = snapshots.first() {
            state.snapshots.insert(*doc, s.parts()[2].clone());
        }
    }
    if !repo.quarantined().is_empty() {
        return Err(format!("quarantined documents: {:?}", repo.quarantined()));
    }
    Ok(state)
}

/// Copy the store and its commit log (`-wal`, `-wal2`), as far as they exist.
fn keep_evidence(store: &Path, to: &Path) {
    let [wal, wal2] = RedbStorage::log_paths(store);
    let [to_wal, to_wal2] = RedbStorage::log_paths(to);
    for (from, to) in [
        (store.to_owned(), to.to_owned()),
        (wal, to_wal),
        (wal2, to_wal2),
    ] {
        if from.exists() {
            std::fs::copy(&from, &to).unwrap();
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}"))
    })
}

fn crash_cycles(name: &str, default_cycles: usize) {
    let cycles = env_u64("TANDEM_CRASH_CYCLES").map_or(default_cycles, |c| c as usize);
    let seed = env_u64("TANDEM_CRASH_SEED").unwrap_or_else(rand::random);
    println!("crash test: {cycles} cycles, TANDEM_CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let dir: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = dir.join("store.redb");
    let after_kill = dir.join("store.after-kill.redb");

    // Create the store before the first kill: a kill while redb initializes
    // a new file is the separate test `a_store_killed_while_being_created_opens`.
    drop(RedbStorage::open(&store).expect("create the store"));

    let started = Instant::now();
    let mut acked: Vec<Ack> = Vec::new();
    let mut killed_running = 0;
    let mut killed_before_open = 0;
    let mut killed_after_acks = 0;
    let mut compactions_seen = BTreeSet::new();
    let mut last_seq = 0;
    for cycle in 0..cycles {
        // The kinds of kill take turns; their timings are random.
        let plan = match cycle % 5 {
            0 => KillPlan::Early(Duration::from_millis(rng.random_range(0..30))),
            1 | 2 => KillPlan::After(Duration::from_millis(rng.random_range(5..=150))),
            _ => KillPlan::AfterAcks(
                rng.random_range(1..=8),
                Duration::from_millis(rng.random_range(0..=60)),
            ),
        };
        let run = format!("r{cycle}");
        let outcome = run_child(&store, &run, rng.random(), plan);
        killed_running += usize::from(outcome.killed_running);
        killed_before_open += usize::from(!outcome.opened);
        killed_after_acks += usize::from(!outcome.acks.is_empty());
        acked.extend(outcome.acks);

        // Keep the files exactly as the kill left them, as evidence.
        keep_evidence(&store, &after_kill);
        match verify(&store, &acked) {
            Ok(state) => {
                assert!(
                    state.last_seq >= last_seq,
                    "cycle {cycle}: the feed shrank from {last_seq} to {}",
                    state.last_seq
                );
                last_seq = state.last_seq;
                compactions_seen.extend(state.snapshots);
            }
            Err(problem) => panic!(
                "cycle {cycle} ({plan:?}), seed {seed}: {problem}\n\
                 store kept at {} (as the kill left it: {})",
                store.display(),
                after_kill.display()
            ),
        }
    }

    println!(
        "crash test: {cycles} cycles in {:.1?}; {} acknowledged commits verified, \
         feed last_seq {last_seq}; killed while running {killed_running}, \
         before the store opened {killed_before_open}, after acknowledging {killed_after_acks}; \
         distinct snapshots seen {}",
        started.elapsed(),
        acked.len(),
        compactions_seen.len()
    );
    assert!(!acked.is_empty(), "the child never acknowledged a commit");
    assert_eq!(
        killed_running, cycles,
        "every child must have been killed while running"
    );
    assert!(
        killed_after_acks >= cycles / 5,
        "too few cycles ({killed_after_acks} of {cycles}) were killed in the middle of committing"
    );
    assert!(
        compactions_seen.len() >= 2,
        "no compaction happened during the run (snapshots seen: {compactions_seen:?})"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn acknowledged_commits_survive_sigkill() {
    crash_cycles("crash", 25);
}

#[test]
#[ignore = "stress: 300 kill cycles; run with --ignored"]
fn acknowledged_commits_survive_sigkill_stress() {
    crash_cycles("crash-stress", 300);
}

/// The first bytes of a redb file (redb writes them last when it creates one).
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// Kill the child while `RedbStorage::open` creates a brand-new store (as
/// soon as the file appears), then open the store: it must open, whatever
/// state the kill left it in (no file, an empty file, a file being
/// initialized, a complete store).
#[test]
fn a_store_killed_while_being_created_opens() {
    const ATTEMPTS: usize = 30;
    let seed = env_u64("TANDEM_CRASH_SEED").unwrap_or_else(rand::random);
    println!("store creation kills: {ATTEMPTS} attempts, TANDEM_CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("crash-create-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    for attempt in 0..ATTEMPTS {
        let store = dir.join(format!("{attempt}/store.redb"));
        std::fs::create_dir_all(store.parent().unwrap()).unwrap();
        let mut child = Command::new(CHILD)
            .arg(&store)
            .arg(format!("c{attempt}"))
            .arg(rng.random::<u64>().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn crash_child");
        // Kill a random few hundred microseconds after the file appears.
        let deadline = Instant::now() + ACK_WAIT_LIMIT;
        while !store.exists() && Instant::now() < deadline {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_micros(rng.random_range(0..=600)));
        let running = child.try_wait().unwrap().is_none();
        let _ = child.kill();
        child.wait().unwrap();
        assert!(running, "crash_child exited by itself");

        let bytes = std::fs::read(&store).unwrap_or_default();
        let state = match bytes.len() {
            0 => "missing or empty",
            _ if bytes.starts_with(&REDB_MAGIC) => "initialized",
            _ => "being initialized (no magic number yet)",
        };
        *states.entry(state).or_default() += 1;
        let evidence = store.with_extension("after-kill.redb");
        keep_evidence(&store, &evidence);
        let opened = RedbStorage::open(&store)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                Repo::open(s, RepoConfig::new(PeerId::new("crash-check")), ShareAll)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = opened {
            panic!(
                "attempt {attempt}, seed {seed}: a store killed while being created \
                 ({state}, {} bytes, first bytes {:02x?}) does not open: {e}\n\
                 evidence kept at {}",
                bytes.len(),
                &bytes[..bytes.len().min(16)],
                evidence.display()
            );
        }
    }
    println!("store creation kills: states after the kill: {states:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
