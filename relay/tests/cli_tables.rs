//! `tandem export`, `tandem import` and `tandem inspect` on tables: a store
//! written through the row layer round-trips exactly through JSON lines.

use std::process::Command;

use tandem_engine::rows::{Rows, TableSchema, Value};
use tandem_engine::{PeerId, RedbStorage, Repo, RepoConfig, ShareAll};

fn tandem(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .expect("run tandem")
}

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn tables_round_trip_through_json_lines_and_inspect_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    {
        let repo = Repo::open(
            RedbStorage::open(src.join("store.redb")).unwrap(),
            RepoConfig::new(PeerId::new("writer")),
            ShareAll,
        )
        .unwrap();
        let mut rows = Rows::with_system_clock(repo);
        rows.define(
            TableSchema::new("tasks")
                .counter("votes")
                .text("notes")
                .shards(4),
        );
        let mut t = rows.table("tasks");
        for i in 0..120 {
            t.insert(
                &format!("task-{i:03}"),
                [
                    ("title", Value::from(format!("task {i}"))),
                    ("done", Value::Bool(i % 2 == 0)),
                    ("weight", Value::Float(i as f64 / 4.0)),
                    ("due", Value::Timestamp(1_700_000_000_000 + i)),
                    ("blob", Value::Bytes(vec![i as u8, 0, 255])),
                    ("votes", Value::Int(i)),
                    ("notes", Value::from("note")),
                ],
            )
            .unwrap();
        }
        t.delete("task-007").unwrap();
        rows.table("people")
            .insert("ada", [("name", Value::from("Ada"))])
            .unwrap();
        rows.flush().unwrap();
    }
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let first = dir.path().join("first.jsonl");
    ok(
        tandem(&["export", "--data", &s(&src), "--out", &s(&first)]),
        "export",
    );
    let text = std::fs::read_to_string(&first).unwrap();
    assert_eq!(
        text.lines().count(),
        2 + 119 + 1,
        "2 headers, 119 live tasks, 1 person"
    );
    assert!(!text.contains("task-007"), "deleted rows are not exported");

    ok(
        tandem(&["import", "--data", &s(&dst), &s(&first), "--batch", "100"]),
        "import",
    );
    // Importing twice changes nothing.
    ok(
        tandem(&["import", "--data", &s(&dst), &s(&first)]),
        "second import",
    );
    let second = ok(
        tandem(&["export", "--data", &s(&dst)]),
        "export of the copy",
    );
    assert_eq!(second, text, "the copy exports byte for byte the same");

    let one = ok(
        tandem(&["export", "--data", &s(&dst), "--table", "people"]),
        "one table",
    );
    assert_eq!(one.lines().count(), 2);

    let listing = ok(
        tandem(&["inspect", "--data", &s(&dst), "--rows"]),
        "inspect",
    );
    assert!(
        listing.contains("table tasks: 119 rows, 4 catalog shards"),
        "{listing}"
    );
    assert!(listing.contains("table people: 1 rows"), "{listing}");
    assert!(listing.contains("ada  name=\"Ada\""), "{listing}");

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"table\":\"t\"}\n{\"table\":\"t\",\"key\":\"k\"}\n").unwrap();
    let out = tandem(&["import", "--data", &s(&dst), &s(&bad)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2: no \"values\" object"), "{err}");
    let out = tandem(&["export", "--data", &s(&dir.path().join("nowhere"))]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no store at"));
}
