//! The `tandem` binary as an operator runs it: start, serve a client, stop on
//! SIGTERM with exit 0, survive SIGKILL without losing an acknowledged change,
//! refuse to start without an explicit auth choice, mint working tokens, and
//! compact a store (refusing one a relay has open).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Client, acked, start_binary as start, value};
use tandem_engine::automerge::{AutoSerde, ChangeHash, ROOT, transaction::Transactable};
use tandem_engine::{
    DocumentId, PeerId, RedbStorage, Repo, RepoConfig, ShareAll, Storage, StorageKey,
};

fn tandem(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn an_acknowledged_change_survives_sigkill_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let anon = ["--allow-anonymous"];
    let (mut relay, url) = start(dir.path(), &anon);

    let mut writer = Client::connect(url.as_str(), "writer").await;
    let doc = writer.repo.create().unwrap();
    writer.repo.change(&doc, |d| d.put(ROOT, "n", 42)).unwrap();
    writer
        .until("the relay's acknowledgement", |r| acked(r, &doc))
        .await;

    // Killed right after acknowledging: the change must be on disk.
    relay.kill().unwrap();
    relay.wait().unwrap();
    let (mut relay, url) = start(dir.path(), &anon);
    let mut reader = Client::connect(url.as_str(), "reader").await;
    reader.repo.request(doc).unwrap();
    reader
        .until("the change after the restart", |r| {
            value(r, &doc) == Some(42)
        })
        .await;

    // SIGTERM: stop accepting, flush, exit 0.
    let status = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = relay.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "relay did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "exit status {code:?}");

    // And `tandem inspect` lists the document.
    let data = dir.path().to_str().unwrap();
    let out = tandem(&["inspect", "--data", data]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&doc.to_string()),
        "{text}"
    );
}

#[tokio::test]
async fn tokens_minted_by_the_cli_open_the_relay_and_nothing_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "a-test-secret-of-enough-length";
    let (mut relay, url) = start(dir.path(), &["--secret", secret]);

    let token = tandem(&["token", "--secret", secret, "--write", "*", "--ttl", "60"]);
    assert!(token.status.success(), "{token:?}");
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();

    let refused = tokio_tungstenite::connect_async(url.as_str()).await;
    let err = refused.expect_err("a connection without a token was accepted");
    assert!(err.to_string().contains("401"), "{err}");

    let mut client = Client::connect(format!("{url}/?token={token}"), "holder").await;
    let doc = client.repo.create().unwrap();
    client.repo.change(&doc, |d| d.put(ROOT, "n", 1)).unwrap();
    client
        .until("the relay to store it", |r| acked(r, &doc))
        .await;
    relay.kill().unwrap();
    relay.wait().unwrap();
}

#[test]
fn errors_name_the_problem_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["inspect", "--data", "/nonexistent/tandem"],
            &["no store at", "--data"],
        ),
        (
            &["compact", "--data", "/nonexistent/tandem"],
            &["no store at", "--data"],
        ),
        (
            &["serve", "--listen", "127.0.0.1:0", "--data", data],
            &["--secret", "--allow-anonymous"],
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data",
                data,
                "--secret",
                "short",
            ],
            &["too short"],
        ),
        (&["token", "--secret", "x"], &["--write", "--read"]),
    ];
    for (args, words) in cases {
        let out = tandem(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        for w in words {
            assert!(err.contains(w), "{args:?}: {err:?} lacks {w:?}");
        }
    }
}

#[test]
fn a_toml_config_file_fills_what_flags_leave_unset_and_logs_can_be_json() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tandem.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata = {:?}\nallow-anonymous = true\nmax-message-size = 1048576\n",
            dir.path().join("from-file")
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut banner)
        .unwrap();
    assert!(
        banner.contains("from-file"),
        "the file's data dir was not used: {banner}"
    );
    assert!(banner.contains("anonymous access"), "{banner}");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let logs = String::from_utf8_lossy(&out.stderr);
    let first = logs.lines().next().unwrap_or_default();
    let parsed: serde_json::Value = serde_json::from_str(first)
        .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {first:?}"));
    assert!(parsed.get("level").is_some(), "{parsed}");

    // A misspelt key is an error that names it.
    std::fs::write(&config, "listn = \"127.0.0.1:0\"\n").unwrap();
    let out = tandem(&["serve", "--config", config.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("listn"), "{err}");
}

/// A document's stored chunks: (snapshots, incrementals, their bytes).
fn chunks(storage: &RedbStorage, doc: &DocumentId) -> (usize, usize, usize) {
    let prefix = StorageKey::new([doc.to_string()]).unwrap();
    let mut out = (0, 0, 0);
    for (key, value) in storage.scan(&prefix, None, usize::MAX).unwrap() {
        match key.parts()[1].as_str() {
            "snapshot" => out.0 += 1,
            "incremental" => out.1 += 1,
            _ => continue,
        }
        out.2 += value.len();
    }
    out
}

/// Every document's sorted heads and content (as JSON).
fn contents(repo: &mut Repo<RedbStorage>, docs: &[DocumentId]) -> Vec<(Vec<ChangeHash>, String)> {
    docs.iter()
        .map(|doc| {
            repo.view(doc, |d| {
                let mut heads = d.get_heads();
                heads.sort();
                (heads, serde_json::to_string(&AutoSerde::from(d)).unwrap())
            })
            .unwrap()
        })
        .collect()
}

/// The numbers in `document bytes <before> -> <after>` of compact's report.
fn reported_bytes(report: &str) -> (usize, usize) {
    let tail = report
        .split("document bytes ")
        .nth(1)
        .unwrap_or_else(|| panic!("no byte counts in {report:?}"));
    let mut words = tail.split_whitespace();
    let before = words.next().unwrap().parse().unwrap();
    assert_eq!(words.next(), Some("->"), "{report:?}");
    let after = words.next().unwrap().parse().unwrap();
    (before, after)
}

#[test]
fn compact_folds_every_document_into_one_snapshot_and_refuses_a_store_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let store = dir.path().join("store.redb");

    // Four documents of 80 flushed changes each: the first stored as a
    // snapshot, then 79 incrementals apiece (automatic compaction is off
    // for this writer).
    let mut config = RepoConfig::new(PeerId::new("writer"));
    config.documents.compaction_min_bytes = usize::MAX;
    let mut repo = Repo::open(RedbStorage::open(&store).unwrap(), config, ShareAll).unwrap();
    let mut docs = Vec::new();
    for d in 0..4 {
        let doc = repo.create().unwrap();
        for i in 0..80i64 {
            repo.change(&doc, |x| {
                x.put(ROOT, "n", i)?;
                x.put(
                    ROOT,
                    format!("k{}", i % 8),
                    format!("document {d}, edit {i}"),
                )
            })
            .unwrap();
            repo.flush().unwrap();
        }
        docs.push(doc);
    }
    let expected = contents(&mut repo, &docs);
    let mut stored_before = 0;
    for doc in &docs {
        let (snapshots, incrementals, bytes) = chunks(repo.storage(), doc);
        assert_eq!(
            (snapshots, incrementals),
            (1, 79),
            "the setup did not keep incrementals"
        );
        stored_before += bytes;
    }
    drop(repo);

    // A relay has the store open: compact refuses, naming the fix.
    let (mut relay, _) = start(dir.path(), &["--allow-anonymous"]);
    let out = tandem(&["compact", "--data", data]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "compact ran on a store in use");
    assert!(
        err.contains("in use") && err.contains("stop"),
        "the refusal does not say what to do: {err:?}"
    );
    relay.kill().unwrap();
    relay.wait().unwrap();

    // Compact: each document becomes one snapshot, much smaller.
    let out = tandem(&["compact", "--data", data]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "compact failed: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("4 documents, 4 rewritten"), "{report:?}");
    let (before, after) = reported_bytes(&report);
    assert_eq!(before, stored_before, "{report:?}");
    assert!(
        after * 2 < before,
        "compaction saved too little: {report:?}"
    );

    // Every document reads exactly as before, from one snapshot, and keeps
    // taking changes incrementally.
    let mut repo = Repo::open(
        RedbStorage::open(&store).unwrap(),
        RepoConfig::new(PeerId::new("reader")),
        ShareAll,
    )
    .unwrap();
    let mut stored_after = 0;
    for doc in &docs {
        let (snapshots, incrementals, bytes) = chunks(repo.storage(), doc);
        assert_eq!((snapshots, incrementals), (1, 0), "{doc} not folded");
        stored_after += bytes;
    }
    assert_eq!(stored_after, after, "{report:?}");
    assert_eq!(contents(&mut repo, &docs), expected);
    repo.change(&docs[0], |x| x.put(ROOT, "n", 1000)).unwrap();
    repo.flush().unwrap();
    assert_eq!(chunks(repo.storage(), &docs[0]).1, 1);
    drop(repo);

    // `inspect` still lists every document; compacting again changes nothing
    // but the document that took a change since.
    let out = tandem(&["inspect", "--data", data]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listing}");
    for doc in &docs {
        assert!(
            listing.contains(&doc.to_string()),
            "{doc} missing: {listing}"
        );
    }
    let out = tandem(&["compact", "--data", data]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains("4 documents, 1 rewritten"),
        "{report:?}"
    );
}
