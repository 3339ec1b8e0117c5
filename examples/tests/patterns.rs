//! Every pattern program in docs/patterns.md runs, exits 0, and prints each
//! claim it checked. A program exits non-zero as soon as a claim does not
//! hold, so these tests fail with it.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Run a program to completion (bounded); (success, stdout, stderr).
fn run(program: &str, args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(program)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    // Read the pipes on threads so a chatty program cannot block on them.
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.success(),
        out.join().expect("stdout reader"),
        err.join().expect("stderr reader"),
    )
}

/// The program holds its pattern: exit 0, exactly `claims` checked claims
/// (a claim dropped from a program shows here), and the closing line.
fn holds(program: &str, closing: &str, claims: usize) {
    let (ok, out, err) = run(program, &[]);
    assert!(ok, "{program} failed\nstdout:\n{out}\nstderr:\n{err}");
    let checked = out.lines().filter(|l| l.starts_with("ok: ")).count();
    assert_eq!(
        checked, claims,
        "{program} checked {checked} claims, expected {claims}\n{out}"
    );
    assert!(
        out.lines().last() == Some(closing),
        "{program} did not end with {closing:?}\n{out}"
    );
    assert!(!out.contains("does not hold") && !err.contains("does not hold"));
}

#[test]
fn parallel_change() {
    holds(
        env!("CARGO_BIN_EXE_pattern_parallel_change"),
        "pattern holds: Parallel Change",
        7,
    );
}

#[test]
fn change_data_capture_consumers_idempotence_versioning() {
    holds(
        env!("CARGO_BIN_EXE_pattern_change_data_capture"),
        "pattern holds: Data Synchronization (change data capture)",
        14,
    );
}

#[test]
fn event_bus_consumers_monitoring() {
    holds(
        env!("CARGO_BIN_EXE_pattern_event_bus"),
        "pattern holds: event bus, data consumers, monitoring",
        7,
    );
}

#[test]
fn last_commit_wins() {
    holds(
        env!("CARGO_BIN_EXE_pattern_last_commit_wins"),
        "pattern holds: Last Commit Wins",
        5,
    );
}

#[test]
fn first_commit_wins() {
    holds(
        env!("CARGO_BIN_EXE_pattern_first_commit_wins"),
        "pattern holds: First Commit Wins",
        4,
    );
}

#[test]
fn merge_conflicting_updates() {
    holds(
        env!("CARGO_BIN_EXE_pattern_merge_conflicting_updates"),
        "pattern holds: Merge Conflicting Updates",
        11,
    );
}

#[test]
fn master_master_ring() {
    holds(
        env!("CARGO_BIN_EXE_pattern_master_master"),
        "pattern holds: Master-Master Row-Level Synchronization",
        16,
    );
}

#[test]
fn cleanup_protocol() {
    holds(
        env!("CARGO_BIN_EXE_pattern_cleanup"),
        "pattern holds: cleanup of deleted rows",
        11,
    );
}

/// The harness notices a program that fails: the ring cannot open its
/// stores under a path that is not a directory, and must say so by exiting
/// non-zero.
#[test]
fn a_failing_program_is_noticed() {
    let (ok, out, _) = run(
        env!("CARGO_BIN_EXE_pattern_master_master"),
        &["/dev/null/not-a-directory"],
    );
    assert!(!ok, "the program should have failed\n{out}");
    assert!(!out.contains("pattern holds"));
}
