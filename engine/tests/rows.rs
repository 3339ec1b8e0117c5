//! The row layer's rules, one test each: registers and strategies, counters
//! and text, delete flags, discovery, change data capture, replication links
//! and cleanup.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tandem_engine::rows::{RowChange, Rows, Strategy, SyncLink, TableSchema, Value, Version};
use tandem_engine::{
    Cursor, Event, MemoryStorage, Origin, Output, PeerId, Repo, RepoConfig, RowError, ShareAll,
};

type Store = Rows<MemoryStorage>;

/// A replica with a hand-driven wall clock.
fn replica(name: &str, schema: &TableSchema) -> (Store, Arc<AtomicU64>) {
    let repo = Repo::open(
        MemoryStorage::new(),
        RepoConfig::new(PeerId::new(name)),
        ShareAll,
    )
    .unwrap();
    let clock = Arc::new(AtomicU64::new(1_000));
    let c = clock.clone();
    let mut rows = Rows::new(repo, move || c.load(Ordering::SeqCst));
    rows.define(schema.clone());
    (rows, clock)
}

/// A store that serves what it is asked for and announces nothing, like a
/// relay.
fn serving_replica(name: &str, schema: &TableSchema) -> Store {
    let repo = Repo::open(
        MemoryStorage::new(),
        RepoConfig::new(PeerId::new(name)),
        tandem_engine::ServeOnRequest,
    )
    .unwrap();
    let mut rows = Rows::new(repo, || 1_000);
    rows.define(schema.clone());
    rows
}

fn s(v: &str) -> Value {
    Value::from(v)
}

/// The keys of a table's live rows, in order.
fn keys(r: &mut Store, table: &str) -> Vec<String> {
    r.table(table)
        .scan()
        .unwrap()
        .into_iter()
        .map(|row| row.key)
        .collect()
}

fn link(a: &mut Store, b: &mut Store) {
    SyncLink::new("test").run(a, b).unwrap();
}

#[test]
fn one_key_inserted_on_two_offline_replicas_is_one_row_whose_columns_merge() {
    let schema = TableSchema::new("tasks");
    let (mut a, _) = replica("a", &schema);
    let (mut b, _) = replica("b", &schema);
    a.table("tasks")
        .insert("t1", [("title", s("milk"))])
        .unwrap();
    b.table("tasks")
        .insert("t1", [("done", Value::Bool(true))])
        .unwrap();
    link(&mut a, &mut b);
    for r in [&mut a, &mut b] {
        let rows = r.table("tasks").scan().unwrap();
        assert_eq!(rows.len(), 1, "one row, not two");
        assert_eq!(rows[0].get("title"), Some(&s("milk")));
        assert_eq!(rows[0].get("done"), Some(&Value::Bool(true)));
    }
    assert_eq!(
        a.table("tasks").document_id("t1").unwrap(),
        b.table("tasks").document_id("t1").unwrap()
    );
}

/// Two replicas write `title` concurrently at the given wall-clock times;
/// returns both replicas after syncing.
fn concurrent_titles(schema: TableSchema, at_a: u64, at_b: u64) -> (Store, Store) {
    let (mut a, ca) = replica("a", &schema);
    let (mut b, cb) = replica("b", &schema);
    a.table("tasks")
        .insert("t1", [("title", s("first"))])
        .unwrap();
    link(&mut a, &mut b);
    ca.store(at_a, Ordering::SeqCst);
    cb.store(at_b, Ordering::SeqCst);
    a.table("tasks")
        .update("t1", [("title", s("from a"))])
        .unwrap();
    b.table("tasks")
        .update("t1", [("title", s("from b"))])
        .unwrap();
    link(&mut a, &mut b);
    (a, b)
}

fn title(r: &mut Store) -> Option<Value> {
    r.table("tasks")
        .get("t1")
        .unwrap()
        .unwrap()
        .get("title")
        .cloned()
}

#[test]
fn last_writer_wins_by_hybrid_clock_and_every_replica_agrees() {
    let (mut a, mut b) = concurrent_titles(TableSchema::new("tasks"), 5_000, 9_000);
    assert_eq!(title(&mut a), Some(s("from b")));
    assert_eq!(title(&mut b), Some(s("from b")));
    // The conflict is visible, not silent.
    let row = a.table("tasks").get("t1").unwrap().unwrap();
    assert_eq!(row.conflict("title").map(<[Version]>::len), Some(2));
    // The other order of clocks flips the winner.
    let (mut a, mut b) = concurrent_titles(TableSchema::new("tasks"), 9_000, 5_000);
    assert_eq!(title(&mut a), Some(s("from a")));
    assert_eq!(title(&mut b), Some(s("from a")));
}

#[test]
fn equal_timestamps_break_ties_by_replica_id() {
    let (mut a, mut b) = concurrent_titles(TableSchema::new("tasks"), 7_000, 7_000);
    let winner_replica = a.replica().max(b.replica()).to_owned();
    let expected = if winner_replica == a.replica() {
        s("from a")
    } else {
        s("from b")
    };
    assert_eq!(title(&mut a), Some(expected.clone()));
    assert_eq!(title(&mut b), Some(expected));
}

#[test]
fn first_writer_wins_keeps_the_earliest_concurrent_write() {
    let schema = TableSchema::new("tasks").strategy(Strategy::FirstWriterWins);
    let (mut a, mut b) = concurrent_titles(schema, 5_000, 9_000);
    assert_eq!(title(&mut a), Some(s("from a")));
    assert_eq!(title(&mut b), Some(s("from a")));
    // A write that saw the current value is not a conflict: it replaces it.
    b.table("tasks")
        .update("t1", [("title", s("edited"))])
        .unwrap();
    link(&mut a, &mut b);
    assert_eq!(title(&mut a), Some(s("edited")));
}

#[test]
fn multi_value_keeps_every_version_until_the_application_resolves() {
    let schema = TableSchema::new("tasks").column_strategy("title", Strategy::MultiValue);
    let (mut a, mut b) = concurrent_titles(schema, 5_000, 9_000);
    for r in [&mut a, &mut b] {
        let row = r.table("tasks").get("t1").unwrap().unwrap();
        assert_eq!(row.get("title"), None, "no single value while in conflict");
        let values: Vec<_> = row
            .conflict("title")
            .unwrap()
            .iter()
            .map(|v| v.value.clone())
            .collect();
        assert_eq!(values, vec![s("from a"), s("from b")]);
    }
    a.table("tasks")
        .update("t1", [("title", s("merged"))])
        .unwrap();
    link(&mut a, &mut b);
    for r in [&mut a, &mut b] {
        let row = r.table("tasks").get("t1").unwrap().unwrap();
        assert_eq!(row.get("title"), Some(&s("merged")));
        assert_eq!(row.conflict("title"), None);
    }
}

#[test]
fn a_custom_resolver_applies_a_business_rule_everywhere() {
    // Keep the longest title, whatever the clocks say.
    let longest: tandem_engine::rows::Resolver = Arc::new(|_, versions: &[Version]| {
        versions
            .iter()
            .max_by_key(|v| (v.value.as_str().map_or(0, str::len), v.at.clone()))
            .map(|v| v.value.clone())
            .unwrap()
    });
    let schema = TableSchema::new("tasks").strategy(Strategy::Custom(longest));
    let (mut a, mut b) = concurrent_titles(schema, 9_000, 5_000);
    // "from a" and "from b" tie on length: the later timestamp breaks it.
    assert_eq!(title(&mut a), Some(s("from a")));
    b.table("tasks").update("t1", [("title", s("x"))]).unwrap();
    a.table("tasks")
        .update("t1", [("title", s("a much longer title"))])
        .unwrap();
    link(&mut a, &mut b);
    assert_eq!(title(&mut a), Some(s("a much longer title")));
    assert_eq!(title(&mut b), Some(s("a much longer title")));
}

#[test]
fn concurrent_increments_add_up_even_on_rows_created_offline_on_both_sides() {
    let schema = TableSchema::new("tasks").counter("votes");
    let (mut a, _) = replica("a", &schema);
    let (mut b, _) = replica("b", &schema);
    a.table("tasks")
        .insert("t1", [("votes", Value::Int(2))])
        .unwrap();
    b.table("tasks")
        .insert("t1", [("votes", Value::Int(3))])
        .unwrap();
    a.table("tasks").increment("t1", "votes", 10).unwrap();
    link(&mut a, &mut b);
    b.table("tasks").increment("t1", "votes", 1).unwrap();
    a.table("tasks").increment("t1", "votes", 1).unwrap();
    link(&mut a, &mut b);
    for r in [&mut a, &mut b] {
        let row = r.table("tasks").get("t1").unwrap().unwrap();
        assert_eq!(row.get("votes"), Some(&Value::Int(17)));
    }
    let err = a.table("tasks").increment("t1", "title", 1).unwrap_err();
    assert!(matches!(err, RowError::WrongColumnKind { .. }), "{err}");
}

#[test]
fn concurrent_text_edits_interleave_and_none_is_lost() {
    let schema = TableSchema::new("tasks").text("notes");
    let (mut a, _) = replica("a", &schema);
    let (mut b, _) = replica("b", &schema);
    a.table("tasks")
        .insert("t1", [("notes", s("milk"))])
        .unwrap();
    b.table("tasks")
        .insert("t1", [("notes", s("eggs"))])
        .unwrap();
    link(&mut a, &mut b);
    let merged = a
        .table("tasks")
        .get("t1")
        .unwrap()
        .unwrap()
        .get("notes")
        .cloned()
        .unwrap();
    let merged = merged.as_str().unwrap().to_owned();
    assert!(
        merged.contains("milk") && merged.contains("eggs"),
        "{merged:?}"
    );
    a.table("tasks")
        .splice_text("t1", "notes", 0, 0, "A:")
        .unwrap();
    b.table("tasks")
        .splice_text("t1", "notes", merged.len(), 0, ":B")
        .unwrap();
    link(&mut a, &mut b);
    let expected = format!("A:{merged}:B");
    for r in [&mut a, &mut b] {
        let notes = r
            .table("tasks")
            .get("t1")
            .unwrap()
            .unwrap()
            .get("notes")
            .cloned();
        assert_eq!(notes, Some(s(&expected)));
    }
}

#[test]
fn delete_wins_over_a_concurrent_update_and_reads_skip_deleted_rows() {
    let schema = TableSchema::new("tasks");
    let (mut a, _) = replica("a", &schema);
    let (mut b, _) = replica("b", &schema);
    a.table("tasks").insert("t1", [("title", s("x"))]).unwrap();
    a.table("tasks").insert("t2", [("title", s("y"))]).unwrap();
    link(&mut a, &mut b);
    a.table("tasks").delete("t1").unwrap();
    b.table("tasks")
        .update("t1", [("title", s("edited offline"))])
        .unwrap();
    link(&mut a, &mut b);
    for r in [&mut a, &mut b] {
        assert_eq!(r.table("tasks").get("t1").unwrap(), None);
        assert_eq!(keys(r, "tasks"), vec!["t2"]);
        let err = r
            .table("tasks")
            .update("t1", [("title", s("z"))])
            .unwrap_err();
        assert!(matches!(err, RowError::NotFound { .. }), "{err}");
    }
}

#[test]
fn an_insert_after_a_delete_revives_the_row_with_only_its_values() {
    let schema = TableSchema::new("tasks").counter("votes");
    let (mut a, _) = replica("a", &schema);
    let (mut b, _) = replica("b", &schema);
    a.table("tasks")
        .insert(
            "t1",
            [
                ("title", s("old")),
                ("note", s("old note")),
                ("votes", Value::Int(4)),
            ],
        )
        .unwrap();
    a.table("tasks").delete("t1").unwrap();
    link(&mut a, &mut b);
    // b saw the delete; its insert causally follows it.
    b.table("tasks")
        .insert("t1", [("title", s("new"))])
        .unwrap();
    link(&mut a, &mut b);
    for r in [&mut a, &mut b] {
        let row = r.table("tasks").get("t1").unwrap().unwrap();
        assert_eq!(row.get("title"), Some(&s("new")));
        assert_eq!(row.get("note"), None);
        assert_eq!(row.get("votes"), Some(&Value::Int(0)));
    }
    let err = a
        .table("tasks")
        .insert("t1", [("title", s("again"))])
        .unwrap_err();
    assert!(matches!(err, RowError::AlreadyExists { .. }), "{err}");
}

#[test]
fn a_replica_that_syncs_a_table_over_the_protocol_learns_every_row() {
    let schema = TableSchema::new("tasks").shards(4);
    let mut a = serving_replica("a", &schema);
    let (mut b, _) = replica("b", &schema);
    for i in 0..50 {
        a.table("tasks")
            .insert(&format!("k{i:02}"), [("n", Value::Int(i))])
            .unwrap();
    }
    a.flush().unwrap();
    // b knows nothing but the table's name: catalogs, then rows.
    b.subscribe("tasks").unwrap();
    tandem_engine::sync_in_process(b.repo_mut(), a.repo_mut(), 50).unwrap();
    assert_eq!(b.discover("tasks").unwrap(), 50);
    tandem_engine::sync_in_process(b.repo_mut(), a.repo_mut(), 50).unwrap();
    assert_eq!(b.discover("tasks").unwrap(), 0);
    let rows = b.table("tasks").scan().unwrap();
    assert_eq!(rows.len(), 50);
    assert_eq!(rows[7].get("n"), Some(&Value::Int(7)));
}

#[test]
fn the_row_feed_reports_inserts_updates_deletes_and_conflicts_from_a_cursor() {
    let schema = TableSchema::new("tasks");
    let (mut a, ca) = replica("a", &schema);
    let (mut b, cb) = replica("b", &schema);
    a.table("tasks")
        .insert("t1", [("title", s("x")), ("n", Value::Int(1))])
        .unwrap();
    a.table("tasks")
        .update("t1", [("n", Value::Int(2))])
        .unwrap();
    a.flush().unwrap();
    let (events, cursor) = a.changes(Cursor::START, 100).unwrap();
    let kinds: Vec<_> = events
        .iter()
        .map(|e| (e.change.clone(), e.key.clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (RowChange::Inserted, "t1".into()),
            (RowChange::Updated, "t1".into())
        ]
    );
    assert_eq!(events[1].columns.keys().collect::<Vec<_>>(), vec!["n"]);
    assert_eq!(events[1].columns["n"], Some(Value::Int(2)));
    assert_eq!(events[0].origin, Origin::Local);

    link(&mut a, &mut b);
    ca.store(5_000, Ordering::SeqCst);
    cb.store(6_000, Ordering::SeqCst);
    a.table("tasks")
        .update("t1", [("title", s("from a"))])
        .unwrap();
    b.table("tasks")
        .update("t1", [("title", s("from b"))])
        .unwrap();
    link(&mut a, &mut b);
    b.table("tasks").delete("t1").unwrap();
    link(&mut a, &mut b);
    let (events, _) = a.changes(cursor, 100).unwrap();
    let conflict = events
        .iter()
        .find_map(|e| match &e.change {
            RowChange::Conflict {
                column,
                versions,
                resolved,
            } => Some((column.clone(), versions.len(), resolved.clone())),
            _ => None,
        })
        .expect("the merge reports its conflict");
    assert_eq!(conflict, ("title".into(), 2, Some(s("from b"))));
    assert!(events.iter().any(|e| e.change == RowChange::Deleted));
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.origin, Origin::Remote(p) if p.as_str() == "b"))
    );
}

#[test]
fn a_link_records_its_sync_point_and_a_quiet_run_sends_nothing() {
    let schema = TableSchema::new("tasks");
    let (mut a, _) = replica("a", &schema);
    let (mut b, _) = replica("b", &schema);
    for i in 0..20 {
        a.table("tasks")
            .insert(&format!("k{i}"), [("n", Value::Int(i))])
            .unwrap();
    }
    let l = SyncLink::new("a-b");
    let first = l.run(&mut a, &mut b).unwrap();
    assert!(first.bytes.0 > 0);
    assert_eq!(b.table("tasks").scan().unwrap().len(), 20);
    let point = l.sync_point(a.repo()).unwrap();
    assert_eq!(point.peer.as_ref(), Some(b.repo().storage_id()));
    let quiet = l.run(&mut a, &mut b).unwrap();
    assert_eq!((quiet.documents, quiet.bytes), (0, (0, 0)), "{quiet:?}");
    // One change on b travels alone.
    b.table("tasks")
        .update("k3", [("n", Value::Int(33))])
        .unwrap();
    let one = l.run(&mut a, &mut b).unwrap();
    assert_eq!(one.documents, 1);
    assert_eq!(one.changes, (0, 1));
    assert_eq!(
        a.table("tasks").get("k3").unwrap().unwrap().get("n"),
        Some(&Value::Int(33))
    );
}

#[test]
fn a_store_that_lacks_a_document_gets_it_whole_then_only_changes() {
    let schema = TableSchema::new("tasks").counter("votes").text("notes");
    let (mut a, _) = replica("a", &schema);
    let (mut b, _) = replica("b", &schema);
    for i in 0..10 {
        a.table("tasks")
            .insert(&format!("k{i}"), [("n", Value::Int(i))])
            .unwrap();
    }
    a.table("tasks").increment("k1", "votes", 3).unwrap();
    a.table("tasks")
        .splice_text("k2", "notes", 0, 0, "hi")
        .unwrap();
    a.table("tasks").delete("k9").unwrap();
    let l = SyncLink::new("a-b");
    let first = l.run(&mut a, &mut b).unwrap();
    // Every row and catalog document b lacked arrived whole, nothing as
    // single changes, and nothing came back.
    assert!(first.copied.0 >= 10, "{first:?}");
    assert_eq!(first.changes, (0, 0), "{first:?}");
    assert_eq!((first.copied.1, first.bytes.1), (0, 0), "{first:?}");
    for key in ["k1", "k2", "k9"] {
        let id = a.table("tasks").document_id(key).unwrap();
        assert_eq!(
            a.repo_mut().heads(&id).unwrap(),
            b.repo_mut().heads(&id).unwrap()
        );
    }
    let rows = b.table("tasks").scan().unwrap();
    assert_eq!(rows.len(), 9, "the deleted row stays deleted");
    let k1 = b.table("tasks").get("k1").unwrap().unwrap();
    assert_eq!(k1.get("votes"), Some(&Value::Int(3)));
    let k2 = b.table("tasks").get("k2").unwrap().unwrap();
    assert_eq!(k2.get("notes"), Some(&s("hi")));
    // The copies are recorded as remote commits in b's row feed.
    let (events, _) = b.changes(Cursor::START, 100).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.key == "k1" && matches!(&e.origin, Origin::Remote(p) if p.as_str() == "a")),
        "{events:?}"
    );
    // Once both hold the document, a run sends changes only.
    b.table("tasks")
        .update("k4", [("n", Value::Int(40))])
        .unwrap();
    let next = l.run(&mut a, &mut b).unwrap();
    assert_eq!((next.copied, next.changes), ((0, 0), (0, 1)), "{next:?}");
    assert_eq!(
        a.table("tasks").get("k4").unwrap().unwrap().get("n"),
        Some(&Value::Int(40))
    );
}

/// A copy is stored as the bytes received, its heads read from their
/// chunk headers: a live row is not parsed until it is used, a deleted one
/// is (its delete must be noted for cleanup), and either reads the same.
#[test]
fn a_copied_row_is_stored_without_being_parsed_until_used() {
    let schema = TableSchema::new("tasks").text("notes");
    let (mut a, _) = replica("a", &schema);
    let (mut b, _) = replica("b", &schema);
    a.table("tasks")
        .insert("live", [("title", s("kept"))])
        .unwrap();
    a.table("tasks")
        .splice_text("live", "notes", 0, 0, "hello")
        .unwrap();
    a.table("tasks")
        .insert("gone", [("title", s("dropped"))])
        .unwrap();
    a.table("tasks").delete("gone").unwrap();
    let live = a.table("tasks").document_id("live").unwrap();
    let gone = a.table("tasks").document_id("gone").unwrap();
    let run = SyncLink::new("a-b").run(&mut a, &mut b).unwrap();
    assert!(run.copied.0 >= 2, "{run:?}");

    assert!(!b.repo().is_loaded(&live), "a live row copy is not parsed");
    assert!(b.repo().is_loaded(&gone), "a deleted row copy is read");
    // b's feed has the copy with a's heads, as a remote commit from a.
    let a_heads = a.repo_mut().heads(&live).unwrap();
    let feed = b.repo_mut().feed().read(Cursor::START, 1000).unwrap();
    let entry = feed
        .iter()
        .find(|e| e.document == live)
        .expect("feed entry");
    assert_eq!(entry.heads, a_heads);
    assert!(entry.before.is_empty());
    assert!(matches!(&entry.origin, Origin::Remote(p) if p.as_str() == "a"));
    // Used, it reads as on a.
    let row = b.table("tasks").get("live").unwrap().unwrap();
    assert_eq!(row.get("title"), Some(&s("kept")));
    assert_eq!(row.get("notes"), Some(&s("hello")));
    assert_eq!(b.repo_mut().heads(&live).unwrap(), a_heads);
    assert_eq!(b.table("tasks").get("gone").unwrap(), None);
    // The delete both now hold is acknowledged: cleanup purges it on both.
    assert_eq!(
        a.cleanup().unwrap().purged,
        vec![("tasks".into(), "gone".into())]
    );
    assert_eq!(
        b.cleanup().unwrap().purged,
        vec![("tasks".into(), "gone".into())]
    );
    // And b edits its copy like any row.
    b.table("tasks")
        .update("live", [("title", s("edited on b"))])
        .unwrap();
    SyncLink::new("a-b").run(&mut a, &mut b).unwrap();
    let row = a.table("tasks").get("live").unwrap().unwrap();
    assert_eq!(row.get("title"), Some(&s("edited on b")));
}

#[test]
fn a_document_copied_whole_is_stored_durably() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| {
        let storage = tandem_engine::RedbStorage::open(dir.path().join(name)).unwrap();
        let repo = Repo::open(storage, RepoConfig::new(PeerId::new(name)), ShareAll).unwrap();
        let mut rows = Rows::new(repo, || 5_000);
        rows.define(TableSchema::new("tasks").text("notes"));
        rows
    };
    let mut a = open("a.redb");
    let mut b = open("b.redb");
    for i in 0..5 {
        a.table("tasks")
            .insert(&format!("k{i}"), [("n", Value::Int(i)), ("notes", s("x"))])
            .unwrap();
    }
    let run = SyncLink::new("a-b").run(&mut a, &mut b).unwrap();
    assert!(run.copied.0 >= 5, "{run:?}");
    drop(b);
    let mut b = open("b.redb");
    let rows = b.table("tasks").scan().unwrap();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[3].get("n"), Some(&Value::Int(3)));
    assert_eq!(rows[3].get("notes"), Some(&s("x")));
    // And it goes on from there: a new edit on the reopened copy syncs back.
    b.table("tasks").update("k3", [("notes", s("xy"))]).unwrap();
    let back = SyncLink::new("a-b").run(&mut a, &mut b).unwrap();
    assert_eq!(back.changes, (0, 1), "{back:?}");
    assert_eq!(
        a.table("tasks").get("k3").unwrap().unwrap().get("notes"),
        Some(&s("xy"))
    );
}

#[test]
fn three_stores_in_a_ring_converge() {
    let schema = TableSchema::new("tasks").counter("votes");
    let mut stores: Vec<Store> = ["a", "b", "c"]
        .iter()
        .map(|n| replica(n, &schema).0)
        .collect();
    for (i, s) in stores.iter_mut().enumerate() {
        s.table("tasks")
            .insert(&format!("own{i}"), [("n", Value::Int(i as i64))])
            .unwrap();
        s.table("tasks")
            .upsert("shared", [("votes", Value::Int(0))])
            .unwrap();
        s.table("tasks").increment("shared", "votes", 1).unwrap();
    }
    let links = [
        SyncLink::new("ab"),
        SyncLink::new("bc"),
        SyncLink::new("ca"),
    ];
    for _ in 0..2 {
        for (i, l) in links.iter().enumerate() {
            let (x, y) = pair(&mut stores, i, (i + 1) % 3);
            l.run(x, y).unwrap();
        }
    }
    let snapshot: Vec<_> = stores
        .iter_mut()
        .map(|s| s.table("tasks").scan().unwrap())
        .collect();
    assert_eq!(snapshot[0].len(), 4);
    assert_eq!(snapshot[0], snapshot[1]);
    assert_eq!(snapshot[1], snapshot[2]);
    let shared = snapshot[0].iter().find(|r| r.key == "shared").unwrap();
    assert_eq!(shared.get("votes"), Some(&Value::Int(3)));
}

fn pair(v: &mut [Store], i: usize, j: usize) -> (&mut Store, &mut Store) {
    assert_ne!(i, j);
    if i < j {
        let (l, r) = v.split_at_mut(j);
        (&mut l[i], &mut r[0])
    } else {
        let (l, r) = v.split_at_mut(i);
        (&mut r[0], &mut l[j])
    }
}

#[test]
fn a_lagging_replica_blocks_the_purge_until_it_acknowledges() {
    let schema = TableSchema::new("tasks");
    let (mut hub, _) = replica("hub", &schema);
    let (mut a, _) = replica("a", &schema);
    let (mut lag, _) = replica("lag", &schema);
    hub.table("tasks")
        .insert("t1", [("title", s("x"))])
        .unwrap();
    let (l_a, l_lag) = (SyncLink::new("hub-a"), SyncLink::new("hub-lag"));
    l_a.run(&mut hub, &mut a).unwrap();
    l_lag.run(&mut hub, &mut lag).unwrap();
    hub.table("tasks").delete("t1").unwrap();
    l_a.run(&mut hub, &mut a).unwrap();
    let report = hub.cleanup().unwrap();
    assert!(report.purged.is_empty());
    assert_eq!(report.waiting.len(), 1);
    assert_eq!(report.waiting[0].2, vec![lag.repo().storage_id().clone()]);
    let id = hub.table("tasks").document_id("t1").unwrap();
    assert!(
        hub.repo_mut().contains(&id).unwrap(),
        "not purged while lag has not acknowledged"
    );
    // lag catches up: now everyone has acknowledged the delete.
    l_lag.run(&mut hub, &mut lag).unwrap();
    let report = hub.cleanup().unwrap();
    assert_eq!(report.purged, vec![("tasks".to_owned(), "t1".to_owned())]);
    assert!(!hub.repo_mut().contains(&id).unwrap());
    assert!(hub.repo().purge_marker(&id).unwrap().is_some());
    // The key can be used again: a fresh row document.
    hub.table("tasks")
        .insert("t1", [("title", s("reborn"))])
        .unwrap();
    assert_ne!(hub.table("tasks").document_id("t1").unwrap(), id);
    l_a.run(&mut hub, &mut a).unwrap();
    assert_eq!(
        a.table("tasks").get("t1").unwrap().unwrap().get("title"),
        Some(&s("reborn"))
    );
}

#[test]
fn retiring_a_replica_unblocks_the_purge_and_its_late_update_is_reported_not_resurrected() {
    let schema = TableSchema::new("tasks");
    let (mut hub, _) = replica("hub", &schema);
    let (mut gone, _) = replica("gone", &schema);
    hub.table("tasks")
        .insert("t1", [("title", s("x"))])
        .unwrap();
    let l = SyncLink::new("hub-gone");
    l.run(&mut hub, &mut gone).unwrap();
    let id = hub.table("tasks").document_id("t1").unwrap();
    hub.table("tasks").delete("t1").unwrap();
    hub.flush().unwrap();
    assert!(
        hub.cleanup().unwrap().purged.is_empty(),
        "gone has not acknowledged"
    );
    hub.retire_member(gone.repo().storage_id()).unwrap();
    assert_eq!(hub.cleanup().unwrap().purged.len(), 1);
    // The retired replica comes back with an update to the purged row.
    gone.table("tasks")
        .update("t1", [("title", s("late"))])
        .unwrap();
    let run = l.run(&mut hub, &mut gone).unwrap();
    assert_eq!(run.refused_purged, vec![id], "{run:?}");
    let reported = hub
        .repo_mut()
        .drain_outputs()
        .into_iter()
        .any(|o| matches!(o, Output::Event(Event::PurgedDocumentUpdate { .. })));
    assert!(reported, "the late update is reported");
    assert_eq!(
        hub.table("tasks").get("t1").unwrap(),
        None,
        "not resurrected"
    );
    assert!(!hub.repo_mut().contains(&id).unwrap());
}

#[test]
fn a_late_update_over_the_protocol_to_a_purged_row_is_refused_and_reported() {
    let schema = TableSchema::new("tasks");
    let (mut hub, _) = replica("hub", &schema);
    let (mut gone, _) = replica("gone", &schema);
    gone.table("tasks")
        .insert("t1", [("title", s("x"))])
        .unwrap();
    let id = gone.table("tasks").document_id("t1").unwrap();
    gone.table("tasks").delete("t1").unwrap();
    SyncLink::new("l").run(&mut hub, &mut gone).unwrap();
    hub.retire_member(gone.repo().storage_id()).unwrap();
    assert_eq!(hub.cleanup().unwrap().purged.len(), 1);
    // Revive on the old replica and push it over the wire protocol.
    gone.table("tasks")
        .insert("t1", [("title", s("late"))])
        .unwrap();
    let report = tandem_engine::sync_in_process(gone.repo_mut(), hub.repo_mut(), 20).unwrap();
    assert!(
        report
            .events
            .1
            .iter()
            .any(|e| matches!(e, Event::PurgedDocumentUpdate { document, .. } if *document == id)),
        "{:?}",
        report.events.1
    );
    assert!(!hub.repo_mut().contains(&id).unwrap(), "not resurrected");
}

#[test]
fn a_store_lists_its_tables_and_rows_say_which_columns_are_crdts() {
    let schema = TableSchema::new("tasks")
        .counter("votes")
        .text("notes")
        .shards(3);
    let (mut a, _) = replica("a", &schema);
    a.table("tasks")
        .insert(
            "t1",
            [
                ("title", s("x")),
                ("votes", Value::Int(2)),
                ("notes", s("n")),
            ],
        )
        .unwrap();
    a.table("other")
        .insert("k", [("n", Value::Int(1))])
        .unwrap();
    a.flush().unwrap();
    let tables = a.stored_tables().unwrap();
    assert_eq!(
        tables.into_iter().collect::<Vec<_>>(),
        vec![("other".to_owned(), 16), ("tasks".to_owned(), 3)]
    );
    let row = a.table("tasks").get("t1").unwrap().unwrap();
    use tandem_engine::rows::ColumnKind;
    assert_eq!(row.kind("votes"), ColumnKind::Counter);
    assert_eq!(row.kind("notes"), ColumnKind::Text);
    assert_eq!(row.kind("title"), ColumnKind::Register);
}

#[test]
fn a_watch_sees_its_tables_changes_since_the_last_poll() {
    let schema = TableSchema::new("tasks");
    let (mut a, _) = replica("a", &schema);
    a.table("tasks")
        .insert("old", [("n", Value::Int(0))])
        .unwrap();
    a.flush().unwrap();
    let mut watch = a.watch("tasks").unwrap();
    assert!(
        watch.poll(&mut a).unwrap().is_empty(),
        "only changes from now on"
    );
    a.table("tasks")
        .insert("t1", [("n", Value::Int(1))])
        .unwrap();
    a.table("other")
        .insert("x", [("n", Value::Int(1))])
        .unwrap();
    a.table("tasks").delete("old").unwrap();
    a.flush().unwrap();
    let seen: Vec<_> = watch
        .poll(&mut a)
        .unwrap()
        .into_iter()
        .map(|e| (e.key, e.change))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("t1".into(), RowChange::Inserted),
            ("old".into(), RowChange::Deleted)
        ]
    );
    assert!(watch.poll(&mut a).unwrap().is_empty());
}

#[test]
fn a_feed_consumer_behind_a_purge_still_sees_the_delete() {
    let schema = TableSchema::new("t");
    let (mut a, _) = replica("a", &schema);
    a.table("t").insert("k", [("v", Value::Int(1))]).unwrap();
    a.flush().unwrap();
    let (_, cursor) = a.changes(Cursor::START, 100).unwrap();
    a.table("t").delete("k").unwrap();
    a.flush().unwrap();
    // No members: nobody to wait for, the row is purged at once.
    assert_eq!(a.cleanup().unwrap().purged.len(), 1);
    let (events, _) = a.changes(cursor, 100).unwrap();
    let seen: Vec<_> = events
        .iter()
        .map(|e| (e.key.as_str(), e.change.clone()))
        .collect();
    assert!(seen.contains(&("k", RowChange::Deleted)), "{seen:?}");
}

#[test]
fn rows_can_borrow_a_repo_owned_elsewhere() {
    let mut repo = Repo::open(
        MemoryStorage::new(),
        RepoConfig::new(PeerId::new("tab")),
        ShareAll,
    )
    .unwrap();
    {
        let mut rows = Rows::new(&mut repo, || 5);
        rows.table("t").insert("k", [("v", Value::Int(1))]).unwrap();
    }
    repo.flush().unwrap();
    // A later borrow (a fresh clock) reads and writes the same rows.
    let mut rows = Rows::new(&mut repo, || 5);
    rows.table("t").update("k", [("v", Value::Int(2))]).unwrap();
    assert_eq!(
        rows.table("t").get("k").unwrap().unwrap().get("v"),
        Some(&Value::Int(2))
    );
}

/// The number of changes in each catalog document of the store (any
/// document with the catalog's `_shards` key, as docs/patterns.md says).
fn catalog_changes(r: &mut Store) -> Vec<usize> {
    use tandem_engine::automerge::{ROOT, ReadDoc};
    r.flush().unwrap();
    let mut out = Vec::new();
    for id in r.repo().document_ids().unwrap() {
        let changes = r
            .repo_mut()
            .view(&id, |d| {
                d.get(ROOT, "_shards")
                    .unwrap()
                    .map(|_| d.get_changes(&[]).len())
            })
            .unwrap();
        out.extend(changes);
    }
    out
}

fn numbered(range: std::ops::Range<i64>) -> Vec<(String, [(&'static str, Value); 1])> {
    range
        .map(|i| (format!("k{i:03}"), [("n", Value::Int(i))]))
        .collect()
}

#[test]
fn insert_many_lists_its_rows_with_one_catalog_change_per_shard() {
    let schema = TableSchema::new("tasks").shards(4);
    let (mut a, _) = replica("a", &schema);
    let (mut one_by_one, _) = replica("c", &schema);
    assert_eq!(a.table("tasks").insert_many(numbered(0..200)).unwrap(), 200);
    for (key, columns) in numbered(0..200) {
        one_by_one.table("tasks").insert(&key, columns).unwrap();
    }
    // Each shard: its genesis change and one listing of all its new rows;
    // one change per row when inserted one by one.
    assert_eq!(catalog_changes(&mut a), vec![2; 4]);
    let mut per_row = catalog_changes(&mut one_by_one);
    per_row.sort();
    assert_eq!(per_row.iter().sum::<usize>(), 4 + 200, "{per_row:?}");
    // The same rows either way, here and on a replica that syncs the table.
    let rows = a.table("tasks").scan().unwrap();
    assert_eq!(rows, one_by_one.table("tasks").scan().unwrap());
    assert_eq!(rows.len(), 200);
    assert_eq!(rows[7].key, "k007");
    assert_eq!(rows[7].get("n"), Some(&Value::Int(7)));
    let (mut b, _) = replica("b", &schema);
    link(&mut a, &mut b);
    assert_eq!(b.table("tasks").scan().unwrap(), rows);
}

#[test]
fn insert_many_stops_at_the_first_error_and_keeps_the_rows_before_it() {
    let schema = TableSchema::new("tasks");
    let (mut a, _) = replica("a", &schema);
    a.table("tasks")
        .insert("k002", [("n", s("first"))])
        .unwrap();
    let err = a.table("tasks").insert_many(numbered(0..5)).unwrap_err();
    assert!(
        matches!(&err, RowError::AlreadyExists { key, .. } if key == "k002"),
        "{err:?}"
    );
    assert_eq!(keys(&mut a, "tasks"), ["k000", "k001", "k002"]);
    assert_eq!(
        a.table("tasks").get("k002").unwrap().unwrap().get("n"),
        Some(&s("first"))
    );
    // Listed, not only written: a replica that syncs the table learns them.
    let (mut b, _) = replica("b", &schema);
    link(&mut a, &mut b);
    assert_eq!(b.table("tasks").scan().unwrap().len(), 3);
    // The same key twice in one call is the same error as in two calls.
    let twice = [
        ("k009", [("n", Value::Int(1))]),
        ("k009", [("n", Value::Int(2))]),
    ];
    assert!(matches!(
        a.table("tasks").insert_many(twice),
        Err(RowError::AlreadyExists { .. })
    ));
    assert_eq!(
        a.table("tasks").get("k009").unwrap().unwrap().get("n"),
        Some(&Value::Int(1))
    );
}

#[test]
fn upsert_many_updates_live_rows_revives_deleted_ones_and_inserts_the_rest() {
    let schema = TableSchema::new("tasks");
    let (mut a, clock) = replica("a", &schema);
    a.table("tasks")
        .insert("k000", [("n", Value::Int(0))])
        .unwrap();
    a.table("tasks")
        .insert("k001", [("n", Value::Int(1))])
        .unwrap();
    a.table("tasks").delete("k001").unwrap();
    clock.fetch_add(10, Ordering::SeqCst);
    let n = a
        .table("tasks")
        .upsert_many(numbered(10..13).into_iter().chain([
            ("k000".to_owned(), [("n", Value::Int(100))]),
            ("k001".to_owned(), [("n", Value::Int(101))]),
        ]))
        .unwrap();
    assert_eq!(n, 5);
    let got: Vec<(String, Option<Value>)> = a
        .table("tasks")
        .scan()
        .unwrap()
        .into_iter()
        .map(|r| (r.key.clone(), r.get("n").cloned()))
        .collect();
    let want: Vec<(String, Option<Value>)> = [
        ("k000", 100),
        ("k001", 101),
        ("k010", 10),
        ("k011", 11),
        ("k012", 12),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), Some(Value::Int(n))))
    .collect();
    assert_eq!(got, want);
    let (mut b, _) = replica("b", &schema);
    link(&mut a, &mut b);
    assert_eq!(b.table("tasks").scan().unwrap().len(), 5);
}

/// Rows created while no peer is connected are saved as they are made and
/// held as bytes until the flush, not kept parsed in memory (that takes a
/// third off a batched insert). They read the same before the flush, after
/// it and after the store is reopened; an edit made before the flush is
/// kept, and the row is still stored as one document chunk; each new row is
/// one local commit in the feed.
#[test]
fn new_rows_are_saved_at_once_and_read_back_after_reopening() {
    let storage = Arc::new(MemoryStorage::new());
    let open = |storage: Arc<MemoryStorage>| {
        let repo = Repo::open(storage, RepoConfig::new(PeerId::new("a")), ShareAll).unwrap();
        let mut rows = Rows::new(repo, || 1_000);
        rows.define(TableSchema::new("tasks"));
        rows
    };
    let n = |rows: &mut Rows<Arc<MemoryStorage>>, key: &str| {
        rows.table("tasks")
            .get(key)
            .unwrap()
            .and_then(|r| r.get("n").cloned())
    };
    let mut a = open(storage.clone());
    a.table("tasks")
        .insert_many((0..10).map(|i| (format!("k{i}"), [("n", Value::Int(i))])))
        .unwrap();
    let k3 = a.table("tasks").document_id("k3").unwrap();
    let k4 = a.table("tasks").document_id("k4").unwrap();
    assert!(!a.repo().is_loaded(&k3), "a new row is held as bytes");
    assert_eq!(n(&mut a, "k3"), Some(Value::Int(3)));
    a.table("tasks")
        .update("k4", [("n", Value::Int(40))])
        .unwrap();
    a.flush().unwrap();

    let feed = a.repo_mut().feed().read(Cursor::START, 1000).unwrap();
    let k3_entries: Vec<_> = feed.iter().filter(|e| e.document == k3).collect();
    assert_eq!(k3_entries.len(), 1, "{k3_entries:?}");
    assert!(matches!(k3_entries[0].origin, Origin::Local));
    assert!(k3_entries[0].before.is_empty());
    // Magic bytes, checksum, then the chunk type: 0 for a saved document.
    let stored = a.repo().stored_bytes(&k4).unwrap().expect("stored");
    assert_eq!(
        stored[8], 0,
        "edited before its first flush, still one snapshot"
    );
    // The chunk's length (LEB128 after the type) covers the rest: one chunk.
    let (mut len, mut at, mut shift) = (0usize, 9, 0);
    loop {
        let b = stored[at];
        len |= usize::from(b & 0x7f) << shift;
        at += 1;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    assert_eq!(at + len, stored.len(), "one chunk, nothing after it");
    drop(a);

    let mut a = open(storage);
    assert_eq!(a.table("tasks").scan().unwrap().len(), 10);
    assert_eq!(n(&mut a, "k3"), Some(Value::Int(3)));
    assert_eq!(n(&mut a, "k4"), Some(Value::Int(40)));
    assert_eq!(n(&mut a, "k9"), Some(Value::Int(9)));
}

/// How many pages (`rows.<id>` root keys) the store's catalogs hold.
fn catalog_pages(r: &mut Store) -> usize {
    use tandem_engine::automerge::{ROOT, ReadDoc};
    let mut pages = 0;
    for id in r.repo().document_ids().unwrap() {
        pages += r
            .repo_mut()
            .view(&id, |d| {
                if d.get(ROOT, "_shards").unwrap().is_none() {
                    return 0;
                }
                d.keys(ROOT).filter(|k| k.starts_with("rows.")).count()
            })
            .unwrap();
    }
    pages
}

/// A batch of keys is listed in a page of its own (`rows.<id>`, one batch
/// insertion) rather than key by key in `rows`. Pages made on two offline
/// replicas merge, a replica that syncs the table over the protocol
/// discovers every row they list, and a key purged after being listed in a
/// page moves on to its next generation.
#[test]
fn pages_of_keys_merge_are_discovered_and_purges_move_past_them() {
    let schema = TableSchema::new("tasks").shards(2);
    let mut a = serving_replica("a", &schema);
    let (mut b, _) = replica("b", &schema);
    a.table("tasks").insert_many(numbered(0..100)).unwrap();
    b.table("tasks").insert_many(numbered(100..200)).unwrap();
    a.flush().unwrap();
    b.flush().unwrap();
    assert_eq!(catalog_pages(&mut a), 2, "one page per shard");
    link(&mut b, &mut a);
    assert_eq!(catalog_pages(&mut a), 4, "both replicas' pages");
    assert_eq!(keys(&mut a, "tasks").len(), 200);

    // A new replica that knows nothing but the table's name.
    let (mut fresh, _) = replica("fresh", &schema);
    fresh.subscribe("tasks").unwrap();
    tandem_engine::sync_in_process(fresh.repo_mut(), a.repo_mut(), 50).unwrap();
    assert_eq!(fresh.discover("tasks").unwrap(), 200);
    tandem_engine::sync_in_process(fresh.repo_mut(), a.repo_mut(), 50).unwrap();
    assert_eq!(fresh.discover("tasks").unwrap(), 0);
    assert_eq!(keys(&mut fresh, "tasks"), keys(&mut a, "tasks"));

    // A store of its own (no other members): delete, purge, insert again.
    let (mut c, _) = replica("c", &TableSchema::new("tasks").shards(1));
    c.table("tasks").insert_many(numbered(0..40)).unwrap();
    let first = c.table("tasks").document_id("k005").unwrap();
    c.table("tasks").delete("k005").unwrap();
    c.flush().unwrap();
    assert_eq!(c.cleanup().unwrap().purged.len(), 1);
    c.table("tasks")
        .insert("k005", [("n", Value::Int(55))])
        .unwrap();
    let second = c.table("tasks").document_id("k005").unwrap();
    assert_ne!(first, second, "the next generation's row document");
    assert_eq!(
        c.table("tasks").get("k005").unwrap().unwrap().get("n"),
        Some(&Value::Int(55))
    );
    assert_eq!(keys(&mut c, "tasks").len(), 40);
}

/// A new row is stored as its first change alone (a change chunk, not a
/// saved document), and a new replica that requests the row receives those
/// bytes whole and stores them as they came, without encoding them again.
#[test]
fn a_new_row_is_stored_as_its_first_change_and_a_new_replica_keeps_those_bytes() {
    let schema = TableSchema::new("tasks");
    let mut a = serving_replica("a", &schema);
    a.table("tasks").insert_many(numbered(0..20)).unwrap();
    a.table("tasks")
        .insert("single", [("n", Value::Int(7))])
        .unwrap();
    a.flush().unwrap();
    let id = a.table("tasks").document_id("k003").unwrap();
    let single = a.table("tasks").document_id("single").unwrap();
    let stored = a.repo().stored_bytes(&id).unwrap().expect("stored");
    // Magic bytes, checksum, then the chunk type: 1 for a change.
    assert_eq!(stored[..4], [0x85, 0x6f, 0x4a, 0x83]);
    assert_eq!(stored[8], 1, "a change chunk");
    let change = automerge::Change::from_bytes(stored.clone()).expect("one whole change");
    assert!(change.deps().is_empty() && change.seq() == 1);

    let (mut fresh, _) = replica("fresh", &schema);
    fresh.subscribe("tasks").unwrap();
    tandem_engine::sync_in_process(fresh.repo_mut(), a.repo_mut(), 50).unwrap();
    assert_eq!(fresh.discover("tasks").unwrap(), 21);
    tandem_engine::sync_in_process(fresh.repo_mut(), a.repo_mut(), 50).unwrap();
    fresh.flush().unwrap();
    assert_eq!(fresh.repo().stored_bytes(&id).unwrap(), Some(stored));
    assert_eq!(
        fresh.repo().stored_bytes(&single).unwrap(),
        a.repo().stored_bytes(&single).unwrap()
    );
    assert_eq!(keys(&mut fresh, "tasks"), keys(&mut a, "tasks"));
    assert_eq!(
        fresh
            .table("tasks")
            .get("single")
            .unwrap()
            .unwrap()
            .get("n"),
        Some(&Value::Int(7))
    );
}
