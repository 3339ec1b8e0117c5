//! Behaviour of the sans-IO repo: durability, persistence, memory, the
//! protocol state machine, share policy, and containment of bad input.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use automerge::{ROOT, ReadDoc, transaction::Transactable};
use tandem_engine::protocol::{Message, PeerMetadata};
use tandem_engine::storage::StorageKey;
use tandem_engine::{
    Access, ConnectionId, Cursor, Direction, DocumentId, Event, MemoryStorage, Origin, Output,
    PeerId, PeerInfo, RedbStorage, Repo, RepoConfig, RepoError, ServeOnRequest, ShareAll,
    SharePolicy, Storage, StorageError, WriteBatch, sync_in_process,
};

/// Storage that counts commits and can be told to fail.
#[derive(Default)]
struct Faulty {
    inner: MemoryStorage,
    fail: AtomicBool,
    commits: AtomicUsize,
}

impl Storage for Faulty {
    fn get(&self, key: &StorageKey) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(key)
    }
    fn scan(
        &self,
        prefix: &StorageKey,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<Vec<(StorageKey, Vec<u8>)>, StorageError> {
        self.inner.scan(prefix, after, limit)
    }
    fn commit(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StorageError::Backend("injected failure".into()));
        }
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.inner.commit(batch)
    }
}

fn config(name: &str) -> RepoConfig {
    RepoConfig::new(PeerId::new(name))
}

fn server() -> Repo<MemoryStorage> {
    Repo::open(MemoryStorage::new(), config("server"), ServeOnRequest).unwrap()
}

fn client(name: &str) -> Repo<MemoryStorage> {
    Repo::open(MemoryStorage::new(), config(name), ShareAll).unwrap()
}

fn put(repo: &mut Repo<impl Storage>, doc: &DocumentId, key: &str, value: i64) {
    repo.change(doc, |d| d.put(ROOT, key, value)).unwrap();
}

fn get(repo: &mut Repo<impl Storage>, doc: &DocumentId, key: &str) -> Option<i64> {
    repo.view(doc, |d| {
        d.get(ROOT, key).unwrap().and_then(|(v, _)| v.as_i64())
    })
    .unwrap()
}

/// `n` new documents, the `i`th with `n = i`.
fn numbered(repo: &mut Repo<impl Storage>, n: i64) -> Vec<DocumentId> {
    (0..n)
        .map(|i| {
            let doc = repo.create().unwrap();
            put(repo, &doc, "n", i);
            doc
        })
        .collect()
}

fn sends(outputs: &[Output], conn: ConnectionId) -> Vec<Message> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Send { connection, frame } if *connection == conn => {
                Some(Message::decode(frame).unwrap())
            }
            _ => None,
        })
        .collect()
}

fn join(name: &str) -> Vec<u8> {
    Message::Join {
        sender_id: PeerId::new(name),
        supported_protocol_versions: vec!["1".into()],
        metadata: Some(PeerMetadata::default()),
        extensions: vec![],
    }
    .encode()
}

/// An incoming connection that completed the handshake.
fn joined(repo: &mut Repo<impl Storage>, conn: u64, name: &str) -> ConnectionId {
    let c = ConnectionId(conn);
    repo.connect(c, Direction::Incoming).unwrap();
    repo.receive(0, c, &join(name)).unwrap();
    let out = repo.drain_outputs();
    assert!(matches!(sends(&out, c).as_slice(), [Message::Peer { .. }]));
    c
}

fn closed(outputs: &[Output], conn: ConnectionId) -> bool {
    outputs
        .iter()
        .any(|o| matches!(o, Output::Close { connection, .. } if *connection == conn))
}

// ---- durability and persistence -------------------------------------------

#[test]
fn nothing_is_advertised_before_it_is_durable() {
    let storage = Arc::new(Faulty::default());
    let mut s = Repo::open(storage.clone(), config("server"), ShareAll).unwrap();
    let c = joined(&mut s, 1, "peer");
    let doc = s.create().unwrap();
    put(&mut s, &doc, "x", 1);
    // Before flush: no sync frame at all.
    assert!(sends(&s.drain_outputs(), c).is_empty());
    // A failing flush acknowledges nothing and sends nothing.
    storage.fail.store(true, Ordering::SeqCst);
    assert!(s.flush().is_err());
    let out = s.drain_outputs();
    assert!(sends(&out, c).is_empty(), "advertised non-durable heads");
    assert!(
        !out.iter()
            .any(|o| matches!(o, Output::Event(Event::Committed(_))))
    );
    // The failed change is not in memory any more either (storage is the truth).
    storage.fail.store(false, Ordering::SeqCst);
    assert!(matches!(s.view(&doc, |_| ()), Err(RepoError::NotFound(_))));
    // A later change on a fresh document works and is announced after flush.
    let doc2 = s.create().unwrap();
    put(&mut s, &doc2, "y", 2);
    s.flush().unwrap();
    let msgs = sends(&s.drain_outputs(), c);
    assert!(msgs.iter().any(|m| m.document_id() == Some(doc2)));
}

#[test]
fn group_commit_writes_many_documents_in_one_transaction() {
    let storage = Arc::new(Faulty::default());
    let mut repo = Repo::open(storage.clone(), config("a"), ShareAll).unwrap();
    let before = storage.commits.load(Ordering::SeqCst);
    let docs: Vec<_> = (0..50).map(|_| repo.create().unwrap()).collect();
    for (i, d) in docs.iter().enumerate() {
        put(&mut repo, d, "n", i as i64);
    }
    let report = repo.flush().unwrap();
    assert_eq!(storage.commits.load(Ordering::SeqCst) - before, 1);
    assert_eq!(report.documents, 50);
    assert_eq!(report.commits, 50);
}

#[test]
fn a_commit_writes_only_its_new_changes() {
    let mut repo = client("a");
    let doc = repo.create().unwrap();
    // Text that does not compress, so the first write is big however it is
    // stored (a new document is stored as a compressed snapshot).
    let mut x: u32 = 7;
    let big: String = (0..20_000)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            char::from(b'a' + (x >> 16) as u8 % 26)
        })
        .collect();
    repo.change(&doc, |d| d.put(ROOT, "big", big)).unwrap();
    let first = repo.flush().unwrap();
    assert!(first.bytes > 1_000, "{first:?}");
    put(&mut repo, &doc, "small", 1);
    let second = repo.flush().unwrap();
    assert!(
        second.bytes < 600,
        "a small edit rewrote {} bytes",
        second.bytes
    );
}

#[test]
fn documents_reload_from_disk_with_compaction_in_between() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let mut cfg = config("a");
    cfg.documents.compaction_min_bytes = 2_000;
    let doc;
    {
        let mut repo =
            Repo::open(RedbStorage::open(&path).unwrap(), cfg.clone(), ShareAll).unwrap();
        doc = repo.create().unwrap();
        for i in 0..300 {
            put(&mut repo, &doc, &format!("k{}", i % 40), i);
            repo.flush().unwrap();
        }
        let keys = repo
            .storage()
            .scan(
                &StorageKey::new([doc.to_string()]).unwrap(),
                None,
                usize::MAX,
            )
            .unwrap();
        let snapshots = keys
            .iter()
            .filter(|(k, _)| k.parts()[1] == "snapshot")
            .count();
        let incrementals = keys
            .iter()
            .filter(|(k, _)| k.parts()[1] == "incremental")
            .count();
        assert_eq!(snapshots, 1, "compaction keeps exactly one snapshot");
        assert!(
            incrementals < 300,
            "compaction folded incrementals: {incrementals}"
        );
    }
    let mut repo = Repo::open(RedbStorage::open(&path).unwrap(), cfg, ShareAll).unwrap();
    for k in 0..40 {
        let last = (0..300).filter(|i| i % 40 == k).max().unwrap();
        assert_eq!(get(&mut repo, &doc, &format!("k{k}")), Some(last));
    }
}

#[test]
fn a_new_document_is_stored_whole_then_grows_by_increments() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let kinds = |repo: &Repo<RedbStorage>, doc: &DocumentId| -> Vec<String> {
        let prefix = StorageKey::new([doc.to_string()]).unwrap();
        let stored = repo.storage().scan(&prefix, None, usize::MAX).unwrap();
        stored.iter().map(|(k, _)| k.parts()[1].clone()).collect()
    };
    let (doc, empty);
    {
        let mut repo =
            Repo::open(RedbStorage::open(&path).unwrap(), config("a"), ShareAll).unwrap();
        doc = repo.create().unwrap();
        empty = repo.create().unwrap();
        put(&mut repo, &doc, "n", 1);
        repo.flush().unwrap();
        assert_eq!(
            kinds(&repo, &doc),
            ["snapshot"],
            "first write: one snapshot"
        );
        assert!(
            kinds(&repo, &empty).is_empty(),
            "an empty document stores nothing"
        );
        put(&mut repo, &doc, "m", 2);
        repo.flush().unwrap();
        assert_eq!(kinds(&repo, &doc), ["incremental", "snapshot"]);
        put(&mut repo, &empty, "e", 3);
        repo.flush().unwrap();
        assert_eq!(kinds(&repo, &empty), ["snapshot"]);
    }
    let mut repo = Repo::open(RedbStorage::open(&path).unwrap(), config("a"), ShareAll).unwrap();
    assert_eq!(get(&mut repo, &doc, "n"), Some(1));
    assert_eq!(get(&mut repo, &doc, "m"), Some(2));
    assert_eq!(get(&mut repo, &empty, "e"), Some(3));
}

/// A repo that keeps at most `budget` documents loaded, with `n` new
/// documents written in order (key `n` set to each one's index), not
/// flushed yet.
fn with_budget(budget: usize, n: usize) -> (Repo<MemoryStorage>, Vec<DocumentId>) {
    let mut cfg = config("a");
    cfg.documents.max_loaded_documents = budget;
    let mut repo = Repo::open(MemoryStorage::new(), cfg, ShareAll).unwrap();
    let docs: Vec<_> = (0..n).map(|_| repo.create().unwrap()).collect();
    for (i, d) in docs.iter().enumerate() {
        put(&mut repo, d, "n", i as i64);
    }
    (repo, docs)
}

#[test]
fn idle_documents_are_evicted_and_reload_transparently() {
    let (mut repo, docs) = with_budget(3, 10);
    let report = repo.flush().unwrap();
    assert_eq!(report.evicted, 7);
    assert_eq!(repo.loaded_documents(), 3);
    assert!(!repo.is_loaded(&docs[0]), "least recently used goes first");
    assert_eq!(get(&mut repo, &docs[0], "n"), Some(0));
    assert!(repo.is_loaded(&docs[0]));
    assert_eq!(repo.document_ids().unwrap().len(), 10);
}

/// The distinct automerge actors of a document's changes.
fn actors(repo: &mut Repo<impl Storage>, doc: &DocumentId) -> usize {
    let actors: std::collections::BTreeSet<_> = repo
        .view(doc, |d| {
            d.get_changes(&[])
                .iter()
                .map(|c| c.actor_id().clone())
                .collect()
        })
        .unwrap();
    actors.len()
}

/// A store makes every change of one opening as one actor, however often a
/// document is evicted and loaded again (each load used to add an actor to
/// the document), and takes a new one once memory loses changes that were
/// never stored, so no actor and sequence number name two changes.
#[test]
fn one_actor_per_opening_survives_eviction_and_changes_after_a_failed_flush() {
    let storage = Arc::new(Faulty::default());
    let mut cfg = config("a");
    cfg.documents.max_loaded_documents = 2;
    let mut repo = Repo::open(storage.clone(), cfg, ShareAll).unwrap();
    let doc = repo.create().unwrap();
    for round in 0..5 {
        put(&mut repo, &doc, "n", round);
        // Three other documents push it out of memory.
        for _ in 0..3 {
            let other = repo.create().unwrap();
            put(&mut repo, &other, "n", 0);
        }
        repo.flush().unwrap();
        assert!(!repo.is_loaded(&doc), "evicted in round {round}");
    }
    assert_eq!(get(&mut repo, &doc, "n"), Some(4));
    assert_eq!(actors(&mut repo, &doc), 1);

    // A change lost with a failed flush: the next one is another actor's.
    put(&mut repo, &doc, "n", 5);
    storage.fail.store(true, Ordering::SeqCst);
    assert!(repo.flush().is_err());
    storage.fail.store(false, Ordering::SeqCst);
    put(&mut repo, &doc, "n", 6);
    repo.flush().unwrap();
    assert_eq!(get(&mut repo, &doc, "n"), Some(6));
    assert_eq!(actors(&mut repo, &doc), 2);
    let seqs: Vec<u64> = repo
        .view(&doc, |d| {
            d.get_changes(&[]).iter().map(|c| c.seq()).collect()
        })
        .unwrap();
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4, 5, 1],
        "the lost change's sequence number is not reused"
    );

    // A new opening of the same store is a new actor again.
    drop(repo);
    let mut repo = Repo::open(storage, config("a"), ShareAll).unwrap();
    put(&mut repo, &doc, "n", 7);
    assert_eq!(actors(&mut repo, &doc), 3);
}

#[test]
fn an_eviction_frees_a_sixteenth_of_the_budget_at_once() {
    let (mut repo, docs) = with_budget(32, 32);
    // At the budget: nothing goes.
    assert_eq!(repo.flush().unwrap().evicted, 0);
    assert_eq!(repo.loaded_documents(), 32);
    // One over: down to 30 (32 - 32/16), the least recently used first.
    let extra = repo.create().unwrap();
    put(&mut repo, &extra, "n", 99);
    assert_eq!(repo.flush().unwrap().evicted, 3);
    assert_eq!(repo.loaded_documents(), 30);
    assert!(!repo.is_loaded(&docs[0]) && !repo.is_loaded(&docs[2]));
    assert!(repo.is_loaded(&docs[3]) && repo.is_loaded(&extra));
    // The next new document fits without another eviction.
    let another = repo.create().unwrap();
    put(&mut repo, &another, "n", 100);
    assert_eq!(repo.flush().unwrap().evicted, 0);
    assert_eq!(get(&mut repo, &docs[0], "n"), Some(0));
}

#[test]
fn the_store_keeps_its_id_and_lists_its_documents() {
    let storage = Arc::new(MemoryStorage::new());
    let (id, doc) = {
        let mut r = Repo::open(storage.clone(), config("a"), ShareAll).unwrap();
        let doc = r.create().unwrap();
        put(&mut r, &doc, "x", 1);
        r.flush().unwrap();
        (r.storage_id().clone(), doc)
    };
    let r = Repo::open(storage, config("a"), ShareAll).unwrap();
    assert_eq!(r.storage_id(), &id);
    assert_eq!(r.document_ids().unwrap(), vec![doc]);
}

// ---- change feed -----------------------------------------------------------

#[test]
fn the_feed_delivers_every_commit_once_in_order_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("feed.redb");
    let mut a = Repo::open(RedbStorage::open(&path).unwrap(), config("a"), ShareAll).unwrap();
    let mut b = client("b");
    let doc = a.create().unwrap();
    put(&mut a, &doc, "x", 1);
    put(&mut a, &doc, "x", 2);
    a.flush().unwrap();
    let events = a.drain_outputs();
    let committed: Vec<_> = events
        .iter()
        .filter_map(|o| match o {
            Output::Event(Event::Committed(e)) => Some(e.seq),
            _ => None,
        })
        .collect();
    assert_eq!(committed, vec![1, 2]);
    // A remote change arrives with its origin.
    let bdoc = b.create().unwrap();
    put(&mut b, &bdoc, "y", 3);
    b.flush().unwrap();
    sync_in_process(&mut b, &mut a, 50).unwrap();

    let feed = a.feed();
    let first = feed.read(Cursor::START, 2).unwrap();
    assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert!(
        first
            .iter()
            .all(|e| e.origin == Origin::Local && e.document == doc)
    );
    feed.save_cursor("sqlite-mirror", Cursor(2)).unwrap();
    drop(a);

    let a = Repo::open(RedbStorage::open(&path).unwrap(), config("a"), ShareAll).unwrap();
    let feed = a.feed();
    let cursor = feed.cursor("sqlite-mirror").unwrap();
    assert_eq!(cursor, Cursor(2));
    let rest = feed.read(cursor, 100).unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].seq, 3);
    assert_eq!(rest[0].document, bdoc);
    assert_eq!(rest[0].origin, Origin::Remote(PeerId::new("b")));
    assert_eq!(feed.last_seq().unwrap(), 3);
}

// ---- protocol --------------------------------------------------------------

/// A large in-process sync goes in bounded steps, as a network driver's
/// batches do: the receiving side answers and stores what it was sent every
/// 1,000 frames, so neither side holds every document in memory at once and
/// a sync cut short keeps what arrived. Here a new replica fetches 2,500
/// documents and must store them in several commits, not in one at the end.
#[test]
fn a_large_in_process_sync_stores_as_it_goes() {
    let mut server = server();
    let docs = numbered(&mut server, 2_500);
    server.flush().unwrap();
    let storage = Arc::new(Faulty::default());
    let mut fresh = Repo::open(storage.clone(), config("fresh"), ShareAll).unwrap();
    for doc in &docs {
        fresh.request(*doc).unwrap();
    }
    let before = storage.commits.load(Ordering::SeqCst);
    sync_in_process(&mut fresh, &mut server, 50).unwrap();
    let commits = storage.commits.load(Ordering::SeqCst) - before;
    assert!(
        commits >= 3,
        "2,500 documents arrived in {commits} commits: the receiver did not flush as it went"
    );
    for (i, doc) in docs.iter().enumerate().step_by(97) {
        assert_eq!(get(&mut fresh, doc, "n"), Some(i as i64));
    }
}

/// A new replica catches up on documents the server has stored whole and not
/// in memory without the server loading them: it answers the requests with
/// the stored bytes and takes in the acknowledgements from their heads. A
/// document stored as a snapshot and an increment is loaded as before. Changes
/// go on syncing both ways afterwards.
#[test]
fn a_new_replica_catches_up_without_the_server_loading_stored_documents() {
    let storage = Arc::new(MemoryStorage::new());
    let mut server = Repo::open(storage.clone(), config("server"), ServeOnRequest).unwrap();
    let docs: Vec<DocumentId> = (0..40)
        .map(|i| {
            let doc = server.create().unwrap();
            // Some documents hold several changes.
            for k in 0..=(i % 3) {
                put(&mut server, &doc, &format!("k{k}"), i);
            }
            doc
        })
        .collect();
    server.flush().unwrap();
    // The last one grows by an increment after its snapshot.
    put(&mut server, &docs[39], "later", 1);
    server.flush().unwrap();
    drop(server);

    let mut server = Repo::open(storage, config("server"), ServeOnRequest).unwrap();
    let mut fresh = client("fresh");
    for doc in &docs {
        fresh.request(*doc).unwrap();
    }
    sync_in_process(&mut fresh, &mut server, 50).unwrap();
    assert_eq!(
        server.loaded_documents(),
        1,
        "the server loaded documents it could answer from storage"
    );
    assert!(server.is_loaded(&docs[39]));
    for (i, doc) in docs.iter().enumerate() {
        for k in 0..=(i % 3) {
            assert_eq!(get(&mut fresh, doc, &format!("k{k}")), Some(i as i64));
        }
    }
    assert_eq!(get(&mut fresh, &docs[39], "later"), Some(1));

    // Changes still flow both ways, and nothing more is sent once in step.
    put(&mut server, &docs[0], "from-server", 1);
    put(&mut fresh, &docs[1], "from-fresh", 2);
    sync_in_process(&mut fresh, &mut server, 50).unwrap();
    assert_eq!(get(&mut fresh, &docs[0], "from-server"), Some(1));
    assert_eq!(get(&mut server, &docs[1], "from-fresh"), Some(2));
}

/// A replica that reconnects in step with a restarted server (both keep
/// their sync states) is answered from the server's stored heads: the server
/// loads none of the documents to tell it nothing changed.
#[test]
fn a_reconnect_in_step_loads_nothing_on_the_server() {
    let storage = Arc::new(MemoryStorage::new());
    let mut server = Repo::open(storage.clone(), config("server"), ServeOnRequest).unwrap();
    let docs = numbered(&mut server, 30);
    server.flush().unwrap();
    let mut replica = client("replica");
    for doc in &docs {
        replica.request(*doc).unwrap();
    }
    sync_in_process(&mut replica, &mut server, 50).unwrap();
    drop(server);

    let mut server = Repo::open(storage, config("server"), ServeOnRequest).unwrap();
    let again = sync_in_process(&mut replica, &mut server, 50).unwrap();
    assert_eq!(
        server.loaded_documents(),
        0,
        "the server loaded documents to answer a replica in step"
    );
    assert!(again.bytes.1 > 0, "the server answered: {again:?}");
    // And a change made since still flows.
    put(&mut server, &docs[3], "n", 33);
    sync_in_process(&mut replica, &mut server, 50).unwrap();
    assert_eq!(get(&mut replica, &docs[3], "n"), Some(33));
}

/// A replica that requests a document it has nothing of receives it whole
/// (automerge's sync sends a saved document then) and stores those bytes as
/// they came: a document chunk, not the changes encoded again.
#[test]
fn a_document_received_whole_is_stored_as_it_came() {
    let storage = Arc::new(MemoryStorage::new());
    let mut server = server();
    let doc = {
        let mut writer = client("writer");
        let doc = writer.create().unwrap();
        for i in 0..5 {
            put(&mut writer, &doc, &format!("k{i}"), i);
        }
        writer.flush().unwrap();
        sync_in_process(&mut writer, &mut server, 50).unwrap();
        doc
    };
    let mut fresh = Repo::open(storage.clone(), config("fresh"), ShareAll).unwrap();
    fresh.request(doc).unwrap();
    sync_in_process(&mut fresh, &mut server, 50).unwrap();
    fresh.flush().unwrap();
    let stored = fresh.stored_bytes(&doc).unwrap().expect("stored");
    // Magic bytes, checksum, then the chunk type: 0 for a saved document.
    assert_eq!(stored[..4], [0x85, 0x6f, 0x4a, 0x83]);
    assert_eq!(stored[8], 0, "a document chunk");
    let server_heads = server.heads(&doc).unwrap();
    assert_eq!(fresh.heads(&doc).unwrap(), server_heads);
    drop(fresh);
    let mut fresh = Repo::open(storage, config("fresh"), ShareAll).unwrap();
    assert_eq!(fresh.heads(&doc).unwrap(), server_heads);
    assert_eq!(get(&mut fresh, &doc, "k4"), Some(4));
}

/// A sync frame from `from` to the hub carrying these change chunks.
fn changes_frame(
    from: &str,
    doc: DocumentId,
    heads: Vec<automerge::ChangeHash>,
    changes: Vec<Vec<u8>>,
) -> Vec<u8> {
    let message = automerge::sync::Message {
        heads,
        need: vec![],
        have: vec![],
        changes: changes.into(),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    };
    Message::Sync {
        sender_id: PeerId::new(from),
        target_id: PeerId::new("server"),
        document_id: doc,
        data: message.encode(),
    }
    .encode()
}

#[test]
fn received_changes_are_stored_as_they_came_and_a_queued_one_is_never_lost() {
    let storage = Arc::new(MemoryStorage::new());
    let mut hub = Repo::open(storage.clone(), config("server"), ShareAll).unwrap();
    let mut writer = client("writer");
    let doc = writer.create().unwrap();
    put(&mut writer, &doc, "k0", 0);
    writer.flush().unwrap();
    sync_in_process(&mut writer, &mut hub, 50).unwrap();
    let mut changes = Vec::new();
    for i in 1..=4 {
        put(&mut writer, &doc, &format!("k{i}"), i);
        let raw = writer
            .view(&doc, |d| {
                d.get_last_local_change().unwrap().raw_bytes().to_vec()
            })
            .unwrap();
        changes.push(raw);
    }
    let heads = writer.heads(&doc).unwrap();
    let c = joined(&mut hub, 77, "writer");
    let send = |hub: &mut Repo<Arc<MemoryStorage>>, chunks: Vec<Vec<u8>>| {
        let frame = changes_frame("writer", doc, heads.clone(), chunks);
        hub.receive(0, c, &frame).unwrap();
        hub.flush().unwrap();
        hub.drain_outputs();
    };
    // k2's change before the k1 it depends on: automerge queues it, and
    // applies both when k1's arrives. Both must reach storage.
    send(&mut hub, vec![changes[1].clone()]);
    assert_eq!(get(&mut hub, &doc, "k2"), None, "queued, not applied");
    send(&mut hub, vec![changes[0].clone()]);
    assert_eq!(get(&mut hub, &doc, "k2"), Some(2));
    // k4's change before k3's in one message: both applied at once, and
    // stored as they came (automerge would encode them in causal order).
    send(&mut hub, vec![changes[3].clone(), changes[2].clone()]);
    let as_sent = [changes[3].clone(), changes[2].clone()].concat();
    let prefix = StorageKey::new([doc.to_string()]).unwrap();
    let stored = storage.scan(&prefix, None, usize::MAX).unwrap();
    assert!(
        stored
            .iter()
            .any(|(k, v)| k.parts()[1] == "incremental" && *v == as_sent),
        "the last message's chunks are stored as they came: {:?}",
        stored.iter().map(|(k, v)| (k, v.len())).collect::<Vec<_>>()
    );
    drop(hub);
    let mut reopened = Repo::open(storage, config("server"), ShareAll).unwrap();
    assert_eq!(reopened.heads(&doc).unwrap(), heads);
    for i in 0..=4 {
        assert_eq!(get(&mut reopened, &doc, &format!("k{i}")), Some(i));
    }
}

#[test]
fn changes_fan_out_to_every_peer_sharing_the_document() {
    let mut hub = server();
    let mut a = client("a");
    let mut b = client("b");
    let mut c = client("c");
    let doc = a.create().unwrap();
    put(&mut a, &doc, "x", 1);
    a.flush().unwrap();
    sync_in_process(&mut a, &mut hub, 50).unwrap();
    for r in [&mut b, &mut c] {
        r.request(doc).unwrap();
        sync_in_process(r, &mut hub, 50).unwrap();
        assert_eq!(get(r, &doc, "x"), Some(1));
    }
    // Now keep b and c connected; a change from a reaches both unasked.
    let (hb, hc, ha) = (ConnectionId(10), ConnectionId(11), ConnectionId(12));
    let mut pairs: Vec<(&mut Repo<MemoryStorage>, ConnectionId, ConnectionId)> = vec![
        (&mut b, ConnectionId(1), hb),
        (&mut c, ConnectionId(1), hc),
        (&mut a, ConnectionId(1), ha),
    ];
    for (r, rc, hcid) in pairs.iter_mut() {
        r.connect(*rc, Direction::Outgoing).unwrap();
        hub.connect(*hcid, Direction::Incoming).unwrap();
    }
    pairs[2].0.change(&doc, |d| d.put(ROOT, "x", 2)).unwrap();
    for _ in 0..20 {
        for (r, rc, hcid) in pairs.iter_mut() {
            r.flush().unwrap();
            for o in r.drain_outputs() {
                if let Output::Send { frame, .. } = o {
                    hub.receive(0, *hcid, &frame).unwrap();
                }
            }
            let _ = rc;
        }
        hub.flush().unwrap();
        for o in hub.drain_outputs() {
            if let Output::Send { connection, frame } = o {
                let (r, rc, _) = pairs.iter_mut().find(|(_, _, h)| *h == connection).unwrap();
                r.receive(0, *rc, &frame).unwrap();
            }
        }
    }
    assert_eq!(get(pairs[0].0, &doc, "x"), Some(2));
    assert_eq!(get(pairs[1].0, &doc, "x"), Some(2));
}

#[test]
fn an_unknown_document_is_unavailable() {
    let mut hub = server();
    let mut a = client("a");
    let doc = DocumentId::from_bytes([42; 16]);
    a.request(doc).unwrap();
    let report = sync_in_process(&mut a, &mut hub, 50).unwrap();
    assert!(report.events.0.iter().any(|e| matches!(
        e,
        Event::DocumentUnavailable { document, .. } if *document == doc
    )));
    assert!(!hub.contains(&doc).unwrap());
}

/// A policy: peer "reader" may only read, "stranger" sees nothing.
struct Grants;
impl SharePolicy for Grants {
    fn access(&self, peer: &PeerInfo, _: &DocumentId) -> Access {
        match peer.peer_id.as_str() {
            "reader" => Access::Read,
            "stranger" => Access::None,
            _ => Access::ReadWrite,
        }
    }
    fn announce(&self, _: &PeerInfo, _: &DocumentId) -> bool {
        false
    }
}

#[test]
fn share_policy_hides_documents_and_refuses_read_only_writes() {
    let mut hub = Repo::open(MemoryStorage::new(), config("server"), Grants).unwrap();
    let mut writer = client("writer");
    let doc = writer.create().unwrap();
    put(&mut writer, &doc, "x", 1);
    writer.flush().unwrap();
    sync_in_process(&mut writer, &mut hub, 50).unwrap();
    assert_eq!(get(&mut hub, &doc, "x"), Some(1));

    // A stranger never learns the document exists.
    let mut stranger = client("stranger");
    stranger.request(doc).unwrap();
    let r = sync_in_process(&mut stranger, &mut hub, 50).unwrap();
    assert!(
        r.events
            .0
            .iter()
            .any(|e| matches!(e, Event::DocumentUnavailable { .. }))
    );
    assert!(stranger.heads(&doc).unwrap().is_empty());

    // A reader gets the document, but its own change is not applied.
    let mut reader = client("reader");
    reader.request(doc).unwrap();
    sync_in_process(&mut reader, &mut hub, 50).unwrap();
    assert_eq!(get(&mut reader, &doc, "x"), Some(1));
    put(&mut reader, &doc, "x", 99);
    reader.flush().unwrap();
    sync_in_process(&mut reader, &mut hub, 50).unwrap();
    assert_eq!(
        get(&mut hub, &doc, "x"),
        Some(1),
        "read-only change applied"
    );
    // A reader that ignores the read-only flag and pushes its change anyway
    // is refused and the refusal reported.
    let change = reader
        .view(&doc, |d| {
            d.get_last_local_change().unwrap().raw_bytes().to_vec()
        })
        .unwrap();
    let head = reader.heads(&doc).unwrap();
    let pushy = automerge::sync::Message {
        heads: head,
        need: vec![],
        have: vec![],
        changes: vec![change].into(),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    };
    let c = joined(&mut hub, 77, "reader");
    let frame = Message::Sync {
        sender_id: PeerId::new("reader"),
        target_id: PeerId::new("server"),
        document_id: doc,
        data: pushy.encode(),
    };
    hub.receive(0, c, &frame.encode()).unwrap();
    hub.flush().unwrap();
    let out = hub.drain_outputs();
    assert!(out.iter().any(
        |o| matches!(o, Output::Event(Event::AccessDenied { document, .. }) if *document == doc)
    ));
    assert!(!closed(&out, c), "a refused write is reported, not fatal");
    assert_eq!(
        get(&mut hub, &doc, "x"),
        Some(1),
        "read-only change applied"
    );
    // A stranger's write to a new document is refused too.
    let sdoc = stranger.create().unwrap();
    put(&mut stranger, &sdoc, "z", 1);
    stranger.flush().unwrap();
    sync_in_process(&mut stranger, &mut hub, 50).unwrap();
    assert!(!hub.contains(&sdoc).unwrap());
}

#[test]
fn sync_states_persist_per_storage_id_so_reconnects_send_little() {
    let mut hub = server();
    let storage = Arc::new(MemoryStorage::new());
    let mut a = Repo::open(storage.clone(), config("a"), ShareAll).unwrap();
    let doc = a.create().unwrap();
    // Incompressible values, so the document's size is real.
    let mut seed: u64 = 7;
    for i in 0..200 {
        let value: String = (0..60)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                char::from(b'a' + (seed >> 59) as u8)
            })
            .collect();
        a.change(&doc, |d| d.put(ROOT, format!("k{i}"), value))
            .unwrap();
    }
    a.flush().unwrap();
    let first = sync_in_process(&mut a, &mut hub, 50).unwrap();
    drop(a);
    let mut a = Repo::open(storage, config("a"), ShareAll).unwrap();
    put(&mut a, &doc, "new", 1);
    a.flush().unwrap();
    let again = sync_in_process(&mut a, &mut hub, 50).unwrap();
    assert_eq!(get(&mut hub, &doc, "new"), Some(1));
    assert!(
        again.bytes.0 * 10 < first.bytes.0,
        "reconnect sent {} bytes, first sync {}",
        again.bytes.0,
        first.bytes.0
    );
}

/// Flush `client` and `hub` and carry frames both ways (the client on
/// connection 1, the hub on `hc`) until both are quiet.
fn exchange(
    client: &mut Repo<impl Storage>,
    hub: &mut Repo<impl Storage>,
    hc: ConnectionId,
    now: u64,
) {
    for _ in 0..50 {
        let mut moved = false;
        client.flush().unwrap();
        for o in client.drain_outputs() {
            if let Output::Send { frame, .. } = o {
                hub.receive(now, hc, &frame).unwrap();
                moved = true;
            }
        }
        hub.flush().unwrap();
        for o in hub.drain_outputs() {
            if let Output::Send { frame, .. } = o {
                client.receive(now, ConnectionId(1), &frame).unwrap();
                moved = true;
            }
        }
        if !moved {
            return;
        }
    }
    panic!("no quiescence");
}

#[test]
fn sync_states_are_written_at_most_once_per_interval_and_on_close() {
    let storage = Arc::new(Faulty::default());
    let hub_config = RepoConfig {
        sync_state_interval: 1_000,
        ..config("server")
    };
    let mut hub = Repo::open(storage.clone(), hub_config, ServeOnRequest).unwrap();
    let mut a = client("a");
    let doc = a.create().unwrap();
    put(&mut a, &doc, "x", 0);
    let hc = ConnectionId(7);
    a.connect(ConnectionId(1), Direction::Outgoing).unwrap();
    hub.connect(hc, Direction::Incoming).unwrap();
    exchange(&mut a, &mut hub, hc, 10_000);
    let key = StorageKey::new([
        doc.to_string(),
        "sync-state".to_owned(),
        a.storage_id().as_str().to_owned(),
    ])
    .unwrap();
    let stored_shared = |s: &Faulty| {
        let bytes = s.inner.get(&key).unwrap().expect("a stored sync state");
        automerge::sync::State::decode(&bytes).unwrap().shared_heads
    };
    let first = stored_shared(&storage);
    // Changes the hub sends to `a` (as from another writer): within the
    // interval each costs one commit (the change; `a`'s acknowledgement
    // writes nothing), and the stored state stays as it was.
    let commits = storage.commits.load(Ordering::SeqCst);
    for i in 1..=5 {
        put(&mut hub, &doc, "x", i);
        exchange(&mut a, &mut hub, hc, 10_000 + i as u64 * 100);
    }
    assert_eq!(get(&mut a, &doc, "x"), Some(5));
    assert_eq!(storage.commits.load(Ordering::SeqCst) - commits, 5);
    assert_eq!(stored_shared(&storage), first);
    // Once the interval has passed, the next flush writes it.
    put(&mut hub, &doc, "x", 6);
    exchange(&mut a, &mut hub, hc, 11_100);
    assert_ne!(stored_shared(&storage), first);
    // And closing the connection writes what it learned since.
    put(&mut hub, &doc, "x", 7);
    exchange(&mut a, &mut hub, hc, 11_200);
    hub.disconnect(hc);
    assert_eq!(stored_shared(&storage), hub.heads(&doc).unwrap());
}

/// Readers in the same sync state share one generated message and one
/// handling of their identical acknowledgements (the hub generates and
/// applies once per distinct state); readers that fall behind or catch up
/// out of step still converge, and each ends with its own correct state.
#[test]
fn readers_in_and_out_of_step_all_converge() {
    readers_converge(0);
}

#[test]
fn readers_in_and_out_of_step_all_converge_with_a_sync_window() {
    readers_converge(1);
}

/// A serving hub opened with `hub_config`, and a writer whose document
/// (with `v` = 0) the hub has stored.
fn hub_and_writer(
    hub_config: RepoConfig,
) -> (Repo<MemoryStorage>, Repo<MemoryStorage>, DocumentId) {
    let mut hub = Repo::open(MemoryStorage::new(), hub_config, ServeOnRequest).unwrap();
    let mut w = client("w");
    let doc = w.create().unwrap();
    put(&mut w, &doc, "v", 0);
    w.flush().unwrap();
    sync_in_process(&mut w, &mut hub, 50).unwrap();
    (hub, w, doc)
}

fn readers_converge(sync_window: usize) {
    let (mut hub, mut w, doc) = hub_and_writer(RepoConfig {
        sync_window,
        ..config("server")
    });
    let mut readers: Vec<Repo<MemoryStorage>> = (0..6).map(|i| client(&format!("r{i}"))).collect();
    let hw = ConnectionId(100);
    w.connect(ConnectionId(1), Direction::Outgoing).unwrap();
    hub.connect(hw, Direction::Incoming).unwrap();
    for (i, r) in readers.iter_mut().enumerate() {
        r.connect(ConnectionId(1), Direction::Outgoing).unwrap();
        hub.connect(ConnectionId(i as u64 + 1), Direction::Incoming)
            .unwrap();
        r.request(doc).unwrap();
    }
    // Frames held back per reader (a slow reader reads them later).
    let mut held: Vec<Vec<Vec<u8>>> = vec![Vec::new(); readers.len()];
    for round in 1..=40i64 {
        put(&mut w, &doc, "v", round);
        for step in 0..6 {
            w.flush().unwrap();
            for o in w.drain_outputs() {
                if let Output::Send { frame, .. } = o {
                    hub.receive(0, hw, &frame).unwrap();
                }
            }
            for (i, r) in readers.iter_mut().enumerate() {
                r.flush().unwrap();
                for o in r.drain_outputs() {
                    if let Output::Send { frame, .. } = o {
                        hub.receive(0, ConnectionId(i as u64 + 1), &frame).unwrap();
                    }
                }
            }
            hub.flush().unwrap();
            for o in hub.drain_outputs() {
                if let Output::Send { connection, frame } = o {
                    if connection == hw {
                        w.receive(0, ConnectionId(1), &frame).unwrap();
                    } else {
                        held[connection.0 as usize - 1].push(frame);
                    }
                }
            }
            for (i, r) in readers.iter_mut().enumerate() {
                // Reader 0 is always in step; the others lag in turn.
                let lagging = i > 0 && (round as usize + i).is_multiple_of(5) && step < 3;
                if !lagging {
                    for f in held[i].drain(..) {
                        r.receive(0, ConnectionId(1), &f).unwrap();
                    }
                }
            }
        }
        for r in readers.iter_mut() {
            assert_eq!(get(r, &doc, "v"), Some(round), "round {round}");
        }
    }
    for (i, _) in readers.iter().enumerate() {
        let c = ConnectionId(i as u64 + 1);
        assert!(hub.is_acknowledged(c, &doc).unwrap(), "reader {i}");
    }
}

/// Sync frames `repo` has queued for `conn`, with whether each brings changes.
fn sync_frames(repo: &mut Repo<MemoryStorage>, conn: ConnectionId) -> Vec<(Vec<u8>, bool)> {
    repo.flush().unwrap();
    repo.drain_outputs()
        .into_iter()
        .filter_map(|o| match o {
            Output::Send { connection, frame } if connection == conn => {
                match Message::decode(&frame).unwrap() {
                    Message::Sync { data, .. } => {
                        let m = automerge::sync::Message::decode(&data).unwrap();
                        Some((frame, !m.changes.is_empty()))
                    }
                    _ => None,
                }
            }
            _ => None,
        })
        .collect()
}

/// With a window of one, a peer that has not answered the last changes
/// sent to it gets no more until it does, then everything since in one
/// message; one that never answers gets them after the timeout.
#[test]
fn a_sync_window_holds_changes_until_the_peer_answers() {
    let (mut hub, _w, doc) = hub_and_writer(RepoConfig {
        sync_window: 1,
        sync_window_timeout: 250,
        ..config("server")
    });
    let mut r = client("r");
    let (rc, hc) = (ConnectionId(1), ConnectionId(9));
    r.connect(rc, Direction::Outgoing).unwrap();
    hub.connect(hc, Direction::Incoming).unwrap();
    r.request(doc).unwrap();
    exchange(&mut r, &mut hub, hc, 1_000);
    assert_eq!(get(&mut r, &doc, "v"), Some(0));

    // A change reaches the reader at once; two more wait for its answer.
    let mut held = Vec::new();
    for v in 1..=3 {
        put(&mut hub, &doc, "v", v);
        let frames = sync_frames(&mut hub, hc);
        if v == 1 {
            assert!(matches!(frames.as_slice(), [(_, true)]), "{frames:?}");
            held.extend(frames.into_iter().map(|(f, _)| f));
        } else {
            assert!(frames.is_empty(), "sent before the answer");
        }
    }
    for f in held.drain(..) {
        r.receive(1_010, rc, &f).unwrap();
    }
    assert_eq!(get(&mut r, &doc, "v"), Some(1));
    // Its answer releases both waiting changes, in one message.
    r.flush().unwrap();
    for o in r.drain_outputs() {
        if let Output::Send { frame, .. } = o {
            hub.receive(1_020, hc, &frame).unwrap();
        }
    }
    let frames = sync_frames(&mut hub, hc);
    assert!(matches!(frames.as_slice(), [(_, true)]), "{frames:?}");
    for (f, _) in frames {
        r.receive(1_030, rc, &f).unwrap();
    }
    assert_eq!(get(&mut r, &doc, "v"), Some(3));
    exchange(&mut r, &mut hub, hc, 1_040);

    // A peer that does not answer: held, until the timeout has passed.
    put(&mut hub, &doc, "v", 4);
    let first = sync_frames(&mut hub, hc);
    assert_eq!(first.len(), 1);
    put(&mut hub, &doc, "v", 5);
    assert!(sync_frames(&mut hub, hc).is_empty());
    assert!(hub.has_held_sync());
    hub.tick(1_100);
    assert!(
        sync_frames(&mut hub, hc).is_empty(),
        "released before the timeout"
    );
    hub.tick(1_300);
    let frames = sync_frames(&mut hub, hc);
    assert!(matches!(frames.as_slice(), [(_, true)]), "{frames:?}");
    assert!(!hub.has_held_sync());
    for (f, _) in first.into_iter().chain(frames) {
        r.receive(1_300, rc, &f).unwrap();
    }
    assert_eq!(get(&mut r, &doc, "v"), Some(5));
    exchange(&mut r, &mut hub, hc, 1_400);
    assert!(hub.is_acknowledged(hc, &doc).unwrap());
}

/// At `now`, flush `hub`, hand `live` (on `lc`) what it sent it and the hub
/// its answers, until they are quiet; returns the frames for `qc`, unread.
fn route(
    hub: &mut Repo<MemoryStorage>,
    live: &mut Repo<MemoryStorage>,
    (lc, qc): (ConnectionId, ConnectionId),
    now: u64,
) -> Vec<Vec<u8>> {
    let mut unread = Vec::new();
    hub.tick(now);
    for _ in 0..20 {
        let mut moved = false;
        hub.flush().unwrap();
        for o in hub.drain_outputs() {
            if let Output::Send { connection, frame } = o {
                if connection == qc {
                    unread.push(frame);
                } else {
                    assert_eq!(connection, lc);
                    live.receive(now, ConnectionId(1), &frame).unwrap();
                    moved = true;
                }
            }
        }
        live.flush().unwrap();
        for o in live.drain_outputs() {
            if let Output::Send { frame, .. } = o {
                hub.receive(now, lc, &frame).unwrap();
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    unread
}

/// Carry frames between `hub` and its peers, each on its own connection
/// (`peers[i].1` at the hub, connection 1 at the peer), until all are quiet.
fn settle(
    hub: &mut Repo<MemoryStorage>,
    peers: &mut [(&mut Repo<MemoryStorage>, ConnectionId)],
    now: u64,
) {
    for _ in 0..50 {
        let mut moved = false;
        for (peer, hc) in peers.iter_mut() {
            peer.flush().unwrap();
            for o in peer.drain_outputs() {
                if let Output::Send { frame, .. } = o {
                    hub.receive(now, *hc, &frame).unwrap();
                    moved = true;
                }
            }
        }
        hub.flush().unwrap();
        for o in hub.drain_outputs() {
            if let Output::Send { connection, frame } = o {
                let (peer, _) = peers.iter_mut().find(|(_, hc)| *hc == connection).unwrap();
                peer.receive(now, ConnectionId(1), &frame).unwrap();
                moved = true;
            }
        }
        if !moved {
            return;
        }
    }
    panic!("no quiescence");
}

/// A peer that reads but does not answer costs the hub nothing once it has
/// left `max_unanswered_changes` unconfirmed for `unanswered_grace`: it is
/// sent nothing more (each message would walk every change it has not
/// confirmed, and carry a Bloom filter of them) until it answers, and each
/// answer brings one message. A peer that answers is never held, and 0
/// lifts the bound.
#[test]
fn a_peer_that_stops_answering_is_sent_nothing_past_its_bound() {
    for bound in [20, 0] {
        let (mut hub, _w, doc) = hub_and_writer(RepoConfig {
            max_unanswered_changes: bound,
            unanswered_grace: 100,
            ..config("server")
        });
        let (mut quiet, mut live) = (client("quiet"), client("live"));
        let conns = (ConnectionId(9), ConnectionId(8));
        for (r, c) in [(&mut quiet, conns.1), (&mut live, conns.0)] {
            r.connect(ConnectionId(1), Direction::Outgoing).unwrap();
            hub.connect(c, Direction::Incoming).unwrap();
            r.request(doc).unwrap();
        }
        settle(
            &mut hub,
            &mut [(&mut live, conns.0), (&mut quiet, conns.1)],
            1_000,
        );
        assert_eq!(get(&mut live, &doc, "v"), Some(0));
        assert_eq!(get(&mut quiet, &doc, "v"), Some(0));
        // 30 changes in one flush, then 70 flushed one by one, 10 ms
        // apart; `live` answers each message, `quiet` none.
        for v in 1..=29 {
            put(&mut hub, &doc, "v", v);
        }
        let mut unread = Vec::new();
        let mut before_grace = 0;
        for v in 30..=100 {
            put(&mut hub, &doc, "v", v);
            let now = 2_000 + 10 * v as u64;
            unread.extend(route(&mut hub, &mut live, conns, now));
            assert_eq!(get(&mut live, &doc, "v"), Some(v), "live is held");
            if now < 2_300 + 100 {
                before_grace = unread.len();
            }
        }
        if bound == 0 {
            assert!(unread.len() > 70, "{} frames unbounded", unread.len());
        } else {
            // Sent until 100 ms after its first unanswered message (at
            // 2,300), with 30 changes unconfirmed from the first.
            assert!(before_grace >= 5, "{before_grace} frames within the grace");
            assert_eq!(unread.len(), before_grace, "frames past the bound");
        }
        // `quiet` speaks (a change of its own) without having read a thing:
        // that answer brings it a message, and, past the grace, no more.
        put(&mut quiet, &doc, "q", 1);
        quiet.flush().unwrap();
        for o in quiet.drain_outputs() {
            if let Output::Send { frame, .. } = o {
                hub.receive(3_000, conns.1, &frame).unwrap();
            }
        }
        let answered = route(&mut hub, &mut live, conns, 3_000);
        assert!(
            !answered.is_empty(),
            "bound {bound}: nothing after its answer"
        );
        put(&mut hub, &doc, "v", 101);
        let more = route(&mut hub, &mut live, conns, 3_200);
        if bound > 0 {
            assert!(
                more.is_empty(),
                "{} frames before it answered again",
                more.len()
            );
        }
        // It reads everything and answers: it ends with every change, and
        // the hub and `live` with its own.
        for f in unread.into_iter().chain(answered).chain(more) {
            quiet.receive(3_300, ConnectionId(1), &f).unwrap();
        }
        settle(
            &mut hub,
            &mut [(&mut live, conns.0), (&mut quiet, conns.1)],
            3_300,
        );
        assert_eq!(get(&mut quiet, &doc, "v"), Some(101), "bound {bound}");
        assert_eq!(get(&mut live, &doc, "q"), Some(1), "bound {bound}");
        assert!(hub.is_acknowledged(conns.1, &doc).unwrap());
        assert!(hub.is_acknowledged(conns.0, &doc).unwrap());
    }
}

// ---- bad input ---------------------------------------------------------------

#[test]
fn malformed_frames_get_an_error_and_a_close_and_nothing_else_breaks() {
    let mut hub = server();
    let mut good = client("good");
    let doc = good.create().unwrap();
    put(&mut good, &doc, "x", 1);
    good.flush().unwrap();
    sync_in_process(&mut good, &mut hub, 50).unwrap();

    let sync_garbage = Message::Sync {
        sender_id: PeerId::new("bad"),
        target_id: PeerId::new("server"),
        document_id: doc,
        data: vec![0x42, 0xff, 0xff, 0x00, 0x13],
    }
    .encode();
    let truncated = {
        let f = join("bad");
        f[..f.len() - 4].to_vec()
    };
    let unknown = {
        let mut v = Vec::new();
        let m = ciborium::Value::Map(vec![(
            ciborium::Value::Text("type".into()),
            ciborium::Value::Text("teleport".into()),
        )]);
        ciborium::ser::into_writer(&m, &mut v).unwrap();
        v
    };
    let before_join = Message::Sync {
        sender_id: PeerId::new("bad"),
        target_id: PeerId::new("server"),
        document_id: doc,
        data: vec![],
    }
    .encode();
    let bad_version = Message::Join {
        sender_id: PeerId::new("bad"),
        supported_protocol_versions: vec!["0".into()],
        metadata: None,
        extensions: vec![],
    }
    .encode();
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("garbage bytes", vec![0xde, 0xad, 0xbe, 0xef, 0x00], false),
        (
            "text that is not CBOR",
            b"{\"type\":\"join\"}".to_vec(),
            false,
        ),
        ("truncated CBOR", truncated, false),
        ("unknown type", unknown, true),
        ("message before join", before_join, false),
        ("unsupported version", bad_version, false),
        ("garbage sync message", sync_garbage, true),
        ("second join", join("bad"), true),
    ];
    for (i, (name, frame, after_join)) in cases.into_iter().enumerate() {
        let c = if after_join {
            joined(&mut hub, 100 + i as u64, "bad")
        } else {
            let c = ConnectionId(100 + i as u64);
            hub.connect(c, Direction::Incoming).unwrap();
            c
        };
        hub.receive(0, c, &frame).unwrap();
        let out = hub.drain_outputs();
        let msgs = sends(&out, c);
        assert!(
            matches!(msgs.last(), Some(Message::Error { .. })),
            "{name}: expected an error frame, got {msgs:?}"
        );
        assert!(closed(&out, c), "{name}: connection not closed");
        assert!(hub.peers().iter().all(|p| p.connection != c), "{name}");
    }
    // The good peer and its document are untouched.
    put(&mut good, &doc, "x", 2);
    good.flush().unwrap();
    sync_in_process(&mut good, &mut hub, 50).unwrap();
    assert_eq!(get(&mut hub, &doc, "x"), Some(2));
}

#[test]
fn corrupt_stored_bytes_are_an_error_for_that_document_only() {
    let storage = Arc::new(MemoryStorage::new());
    let (bad, fine) = {
        let mut r = Repo::open(storage.clone(), config("a"), ShareAll).unwrap();
        let bad = r.create().unwrap();
        let fine = r.create().unwrap();
        put(&mut r, &bad, "x", 1);
        put(&mut r, &fine, "x", 2);
        r.flush().unwrap();
        (bad, fine)
    };
    // Overwrite the bad document's chunk with junk.
    let keys = storage
        .scan(&StorageKey::new([bad.to_string()]).unwrap(), None, 10)
        .unwrap();
    let mut batch = WriteBatch::new();
    for (k, _) in keys {
        batch.put(k, b"\x85\x6f\x4a\x83 not automerge".to_vec());
    }
    storage.commit(&batch).unwrap();
    let mut r = Repo::open(storage, config("a"), ShareAll).unwrap();
    match r.view(&bad, |_| ()) {
        Err(RepoError::CorruptDocument { document, .. }) => assert_eq!(document, bad),
        other => panic!("expected CorruptDocument, got {other:?}"),
    }
    assert_eq!(get(&mut r, &fine, "x"), Some(2));
}

/// A copy received whole is stored without being parsed: one whose chunk
/// is intact (valid checksum) but whose contents automerge cannot load is
/// accepted, then reported as corrupt on use (before and after the flush
/// that stores it), like corrupt stored bytes, and nothing else is hurt.
#[test]
fn a_whole_copy_that_cannot_load_is_reported_on_use_and_kept() {
    use sha2::{Digest, Sha256};
    let mut source = automerge::AutoCommit::new();
    source.put(ROOT, "title", "a copy").unwrap();
    let mut bytes = source.save();
    // Damage the head the document lists, then seal the chunk again with a
    // matching checksum (the first 4 bytes of the SHA-256 of everything
    // after it), so only a full load can tell.
    let head = source.get_heads()[0].0;
    let at = bytes
        .windows(32)
        .position(|w| w == head)
        .expect("the saved document lists its head");
    bytes[at] ^= 0x55;
    let checksum: [u8; 32] = Sha256::digest(&bytes[8..]).into();
    bytes[4..8].copy_from_slice(&checksum[..4]);
    assert!(
        automerge::AutoCommit::load(&bytes).is_err(),
        "the damage must break the load"
    );

    let storage = Arc::new(MemoryStorage::new());
    let mut r = Repo::open(storage.clone(), config("b"), ShareAll).unwrap();
    let (copy, fine) = (DocumentId::random(), r.create().unwrap());
    put(&mut r, &fine, "x", 2);
    let mut good = automerge::AutoCommit::new();
    good.put(ROOT, "title", "a good copy").unwrap();
    let good_id = DocumentId::random();
    let from = PeerId::new("a");
    assert!(r.apply_document(&copy, &bytes, &from).unwrap());
    assert!(r.apply_document(&good_id, &good.save(), &from).unwrap());
    let corrupt = |r: &mut Repo<Arc<MemoryStorage>>| match r.view(&copy, |_| ()) {
        Err(RepoError::CorruptDocument { document, .. }) => assert_eq!(document, copy),
        other => panic!("expected CorruptDocument, got {other:?}"),
    };
    corrupt(&mut r);
    corrupt(&mut r);
    r.flush().unwrap();
    corrupt(&mut r);
    let mut r = Repo::open(storage, config("b"), ShareAll).unwrap();
    corrupt(&mut r);
    assert_eq!(get(&mut r, &fine, "x"), Some(2));
    let title = r
        .view(&good_id, |d| {
            d.get(ROOT, "title").unwrap().map(|(v, _)| v.to_string())
        })
        .unwrap();
    assert_eq!(title.as_deref(), Some("\"a good copy\""));
}

#[test]
fn a_panic_is_contained_and_the_document_quarantined() {
    let mut r = client("a");
    let doc = r.create().unwrap();
    let other = r.create().unwrap();
    put(&mut r, &doc, "x", 1);
    put(&mut r, &other, "x", 1);
    r.flush().unwrap();
    r.drain_outputs();
    let result = r.change(&doc, |d| {
        d.put(ROOT, "x", 2)?;
        panic!("simulated panic inside automerge");
        #[allow(unreachable_code)]
        Ok(())
    });
    assert!(
        matches!(result, Err(RepoError::Quarantined { .. })),
        "{result:?}"
    );
    assert!(r.drain_outputs().iter().any(|o| matches!(
        o,
        Output::Event(Event::Quarantined { document, reason }) if *document == doc && reason.contains("simulated")
    )));
    assert!(matches!(
        r.view(&doc, |_| ()),
        Err(RepoError::Quarantined { .. })
    ));
    assert_eq!(r.quarantined().len(), 1);
    // Everything else keeps working.
    put(&mut r, &other, "x", 5);
    r.flush().unwrap();
    assert_eq!(get(&mut r, &other, "x"), Some(5));
    // Released, the document reloads its durable state (the panicking change never landed).
    assert!(r.release_quarantine(&doc));
    assert_eq!(get(&mut r, &doc, "x"), Some(1));
}

// ---- Tandem's batch extension ---------------------------------------------

/// A plain automerge-repo `request` for `doc` (what a peer without the
/// document sends).
fn request_frame(from: &str, doc: DocumentId) -> Vec<u8> {
    use automerge::sync::SyncDoc;
    let data = automerge::Automerge::new()
        .generate_sync_message(&mut automerge::sync::State::new())
        .expect("a first message")
        .encode();
    Message::Request {
        sender_id: PeerId::new(from),
        target_id: PeerId::new("server"),
        document_id: doc,
        data,
    }
    .encode()
}

/// An incoming connection from a peer that offered the batch extension,
/// with the handshake's outputs left to read.
fn joined_offering_batches(hub: &mut Repo<impl Storage>, conn: u64) -> ConnectionId {
    let c = ConnectionId(conn);
    hub.connect(c, Direction::Incoming).unwrap();
    let offer = Message::Join {
        sender_id: PeerId::new("tandem"),
        supported_protocol_versions: vec!["1".into()],
        metadata: None,
        extensions: vec!["batch".into()],
    };
    hub.receive(0, c, &offer.encode()).unwrap();
    c
}

/// Two Tandem repos negotiate the batch extension and move many documents
/// in a few frames; with it switched off on either side they speak plain
/// protocol v1, a frame per message, and end the same.
#[test]
fn tandem_peers_batch_their_messages_and_either_side_can_decline() {
    let run = |server_batch: usize, client_batch: usize| {
        let mut hub = Repo::open(
            MemoryStorage::new(),
            RepoConfig {
                batch_bytes: server_batch,
                ..config("server")
            },
            ServeOnRequest,
        )
        .unwrap();
        let docs = numbered(&mut hub, 300);
        hub.flush().unwrap();
        let mut fresh = Repo::open(
            MemoryStorage::new(),
            RepoConfig {
                batch_bytes: client_batch,
                ..config("fresh")
            },
            ShareAll,
        )
        .unwrap();
        for doc in &docs {
            fresh.request(*doc).unwrap();
        }
        let report = sync_in_process(&mut fresh, &mut hub, 50).unwrap();
        for (i, doc) in docs.iter().enumerate() {
            assert_eq!(get(&mut fresh, doc, "n"), Some(i as i64));
        }
        report
    };
    let plain = run(64 << 10, 0);
    assert!(
        plain.frames.0 >= 600 && plain.frames.1 >= 300,
        "declined: a frame per request and acknowledgement, per answer ({:?})",
        plain.frames
    );
    assert_eq!(
        run(0, 64 << 10).frames,
        plain.frames,
        "declined by the server"
    );
    let batched = run(64 << 10, 64 << 10);
    // join, the requests, the acknowledgements; peer, the answers.
    assert!(
        batched.frames.0 <= 4 && batched.frames.1 <= 3,
        "{:?}",
        batched.frames
    );
    let (b, p) = (
        batched.bytes.0 + batched.bytes.1,
        plain.bytes.0 + plain.bytes.1,
    );
    assert!(b * 10 < p * 7, "batched {b} bytes against {p} plain");
    // Small batches: more frames, none over the limit but for its envelope.
    let small = run(2_000, 64 << 10);
    assert!(small.frames.1 > 10, "{:?}", small.frames);
}

/// A batch frame holds at most `batch_bytes` of messages, each as it would
/// go alone; a plain peer gets only plain frames.
#[test]
fn batches_respect_their_size_and_plain_peers_never_see_one() {
    let mut hub = Repo::open(
        MemoryStorage::new(),
        RepoConfig {
            batch_bytes: 1_500,
            ..config("server")
        },
        ServeOnRequest,
    )
    .unwrap();
    let docs = numbered(&mut hub, 40);
    hub.flush().unwrap();
    let plain = joined(&mut hub, 1, "plain");
    let tandem = joined_offering_batches(&mut hub, 2);
    let out = hub.drain_outputs();
    assert!(matches!(
        sends(&out, tandem).as_slice(),
        [Message::Peer { extensions, .. }] if extensions == &["batch".to_string()]
    ));
    for doc in &docs {
        hub.receive(0, plain, &request_frame("plain", *doc))
            .unwrap();
        hub.receive(0, tandem, &request_frame("tandem", *doc))
            .unwrap();
    }
    hub.flush().unwrap();
    let out = hub.drain_outputs();
    let to_plain = sends(&out, plain);
    assert_eq!(to_plain.len(), 40);
    assert!(to_plain.iter().all(|m| matches!(m, Message::Sync { .. })));
    let mut answered = Vec::new();
    let to_tandem = sends(&out, tandem);
    assert!(
        to_tandem.len() > 1 && to_tandem.len() < 40,
        "{}",
        to_tandem.len()
    );
    for m in to_tandem {
        match m {
            Message::Batch { messages, .. } => {
                let size: usize = messages.iter().map(|m| m.encoded_len()).sum();
                assert!(size <= 1_500, "a batch of {size} bytes");
                assert!(messages.iter().all(|m| !m.request));
                answered.extend(messages.iter().map(|m| m.document_id));
            }
            Message::Sync { document_id, .. } => answered.push(document_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    answered.sort();
    let mut expected = docs.clone();
    expected.sort();
    assert_eq!(answered, expected, "every document once");
}

/// A batch from a peer that did not negotiate the extension is refused, as
/// is one whose message is bad; the messages before a bad one count, the
/// ones after it do not, and other peers go on.
#[test]
fn a_batch_is_refused_unless_negotiated_and_stops_at_a_bad_message() {
    use tandem_engine::protocol::Batched;
    let mut hub = server();
    let docs = numbered(&mut hub, 3);
    hub.flush().unwrap();
    let entry = |doc: DocumentId, data: Vec<u8>| Batched {
        request: true,
        document_id: doc,
        data,
    };
    let Message::Request { data: good, .. } =
        Message::decode(&request_frame("x", docs[0])).unwrap()
    else {
        unreachable!()
    };
    let batch = |messages: Vec<Batched>| {
        Message::Batch {
            sender_id: PeerId::new("peer"),
            target_id: PeerId::new("server"),
            messages,
        }
        .encode()
    };

    let plain = joined(&mut hub, 1, "plain");
    hub.receive(0, plain, &batch(vec![entry(docs[0], good.clone())]))
        .unwrap();
    let out = hub.drain_outputs();
    match sends(&out, plain).last() {
        Some(Message::Error { message, .. }) => {
            assert!(message.contains("not negotiated"), "{message}")
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    assert!(closed(&out, plain));

    let tandem = joined_offering_batches(&mut hub, 2);
    hub.drain_outputs();
    hub.receive(
        0,
        tandem,
        &batch(vec![
            entry(docs[0], good.clone()),
            entry(docs[1], vec![0x42, 0xff, 0xff, 0x00, 0x13]),
            entry(docs[2], good.clone()),
        ]),
    )
    .unwrap();
    let out = hub.drain_outputs();
    assert!(closed(&out, tandem));
    assert!(matches!(
        sends(&out, tandem).last(),
        Some(Message::Error { .. })
    ));
    assert!(hub.peers().is_empty());
    // The hub still serves: a new plain peer gets its document.
    let again = joined(&mut hub, 3, "again");
    hub.receive(0, again, &request_frame("again", docs[2]))
        .unwrap();
    hub.flush().unwrap();
    let out = hub.drain_outputs();
    assert!(matches!(
        sends(&out, again).as_slice(),
        [Message::Sync { document_id, .. }] if *document_id == docs[2]
    ));
}
