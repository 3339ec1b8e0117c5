//! Convergence: whatever the network does in between (reorder, duplicate,
//! drop, disconnect), once it heals every replica holds every document with
//! the same heads and the same value.
//!
//! The network is the deterministic simulation in `tandem_tests::sim`.

use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use tandem_engine::automerge::transaction::Transactable;
use tandem_engine::automerge::{
    AutomergeError, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value, sync,
};
use tandem_engine::protocol::Message;
use tandem_engine::{DocumentId, PeerId, RedbStorage, RepoConfig, Storage, StorageKey};
use tandem_tests::sim::{End, Faults, Network, Role, SimStorage, Topology};

// ---- the model -------------------------------------------------------------

#[derive(Clone, Debug)]
enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    F64(f64),
    Str(String),
    Bytes(Vec<u8>),
    Timestamp(i64),
}

impl From<&Scalar> for ScalarValue {
    fn from(s: &Scalar) -> Self {
        match s {
            Scalar::Null => ScalarValue::Null,
            Scalar::Bool(b) => ScalarValue::Boolean(*b),
            Scalar::Int(i) => ScalarValue::Int(*i),
            Scalar::Uint(u) => ScalarValue::Uint(*u),
            Scalar::F64(f) => ScalarValue::F64(*f),
            Scalar::Str(s) => ScalarValue::Str(s.as_str().into()),
            Scalar::Bytes(b) => ScalarValue::Bytes(b.clone()),
            Scalar::Timestamp(t) => ScalarValue::Timestamp(*t),
        }
    }
}

/// One step of a scenario. Replica and document indexes are taken modulo the
/// number of replicas and of documents created so far.
#[derive(Clone, Debug)]
enum Op {
    /// Put a scalar under a root key.
    Put {
        replica: usize,
        doc: usize,
        key: u8,
        value: Scalar,
    },
    /// Put a nested map holding one scalar under a root key.
    PutMap {
        replica: usize,
        doc: usize,
        key: u8,
        value: Scalar,
    },
    /// Delete a root key (if present).
    Delete { replica: usize, doc: usize, key: u8 },
    /// Increment the shared counter.
    Increment { replica: usize, doc: usize, by: i64 },
    /// Insert into the shared text.
    InsertText {
        replica: usize,
        doc: usize,
        pos: usize,
        text: String,
    },
    /// Delete from the shared text.
    DeleteText {
        replica: usize,
        doc: usize,
        pos: usize,
        len: usize,
    },
    /// Create a new document (with a text, a counter and a title).
    Create { replica: usize },
    /// Ask for a document by id (as when a user opens a shared URL).
    Request { replica: usize, doc: usize },
    /// Let the (faulty) network run.
    Run { steps: usize },
    /// Restart a replica on its storage (its links go down until the
    /// network reconnects them; a restarted repo syncs only what it opens).
    Restart { replica: usize },
}

#[derive(Clone, Debug)]
struct Scenario {
    topology: Topology,
    replicas: usize,
    seed: u64,
    faults: Faults,
    ops: Vec<Op>,
}

fn scalar() -> impl Strategy<Value = Scalar> {
    prop_oneof![
        Just(Scalar::Null),
        any::<bool>().prop_map(Scalar::Bool),
        any::<i64>().prop_map(Scalar::Int),
        any::<u64>().prop_map(Scalar::Uint),
        (-1.0e9..1.0e9f64).prop_map(Scalar::F64),
        "[a-zé€ ]{0,8}".prop_map(Scalar::Str),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Scalar::Bytes),
        any::<i64>().prop_map(Scalar::Timestamp),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let r = 0..5usize;
    let d = 0..8usize;
    prop_oneof![
        4 => (r.clone(), d.clone(), 0..4u8, scalar())
            .prop_map(|(replica, doc, key, value)| Op::Put { replica, doc, key, value }),
        1 => (r.clone(), d.clone(), 0..4u8, scalar())
            .prop_map(|(replica, doc, key, value)| Op::PutMap { replica, doc, key, value }),
        1 => (r.clone(), d.clone(), 0..4u8)
            .prop_map(|(replica, doc, key)| Op::Delete { replica, doc, key }),
        2 => (r.clone(), d.clone(), -5..10i64)
            .prop_map(|(replica, doc, by)| Op::Increment { replica, doc, by }),
        3 => (r.clone(), d.clone(), any::<usize>(), "[a-zé€ ]{1,6}")
            .prop_map(|(replica, doc, pos, text)| Op::InsertText { replica, doc, pos, text }),
        2 => (r.clone(), d.clone(), any::<usize>(), 1..5usize)
            .prop_map(|(replica, doc, pos, len)| Op::DeleteText { replica, doc, pos, len }),
        1 => r.clone().prop_map(|replica| Op::Create { replica }),
        1 => (r, d).prop_map(|(replica, doc)| Op::Request { replica, doc }),
        3 => (1..30usize).prop_map(|steps| Op::Run { steps }),
        1 => (0..5usize).prop_map(|replica| Op::Restart { replica }),
    ]
}

fn faults() -> impl Strategy<Value = Faults> {
    (
        0.0..0.5f64,
        0.0..0.2f64,
        0.0..0.2f64,
        0.0..0.1f64,
        0.05..0.6f64,
    )
        .prop_map(|(reorder, duplicate, drop, disconnect, reconnect)| Faults {
            reorder,
            duplicate,
            drop,
            disconnect,
            reconnect,
        })
}

fn scenario(max_ops: usize) -> impl Strategy<Value = Scenario> {
    (
        prop_oneof![
            Just(Topology::Star),
            Just(Topology::Mesh),
            Just(Topology::Ring)
        ],
        2..=5usize,
        any::<u64>(),
        faults(),
        proptest::collection::vec(op(), 1..max_ops),
    )
        .prop_map(|(topology, replicas, seed, faults, ops)| Scenario {
            topology,
            replicas,
            seed,
            faults,
            ops,
        })
}

// ---- applying ops ------------------------------------------------------------

/// Create a document on `replica` with its initial content.
fn create_doc(net: &mut Network, replica: usize) -> DocumentId {
    let id = net.create(replica);
    let name = net.node(replica).name.clone();
    net.change(replica, &id, |d| {
        d.put(ROOT, "created_by", name.as_str())?;
        d.put_object(ROOT, "text", ObjType::Text)?;
        d.put(ROOT, "counter", ScalarValue::counter(0))?;
        Ok(())
    })
    .expect("initial change");
    id
}

fn text_obj(d: &impl ReadDoc) -> Result<Option<ObjId>, AutomergeError> {
    Ok(match d.get(ROOT, "text")? {
        Some((Value::Object(ObjType::Text), id)) => Some(id),
        _ => None,
    })
}

fn key(k: u8) -> String {
    format!("k{k}")
}

fn apply(net: &mut Network, docs: &mut Vec<DocumentId>, op: &Op) {
    let n = net.len();
    let (replica, doc) = match *op {
        Op::Run { steps } => {
            net.run(steps);
            return;
        }
        Op::Create { replica } => {
            docs.push(create_doc(net, replica % n));
            return;
        }
        Op::Restart { replica } => {
            net.restart(replica % n);
            return;
        }
        Op::Put { replica, doc, .. }
        | Op::PutMap { replica, doc, .. }
        | Op::Delete { replica, doc, .. }
        | Op::Increment { replica, doc, .. }
        | Op::InsertText { replica, doc, .. }
        | Op::DeleteText { replica, doc, .. }
        | Op::Request { replica, doc } => (replica % n, docs[doc % docs.len()]),
    };
    if !net.has_content(replica, &doc) {
        // A replica can only edit what it has; it asks for the rest.
        net.request(replica, doc);
        return;
    }
    let result = net.change(replica, &doc, |d| {
        match op {
            Op::Put { key: k, value, .. } => d.put(ROOT, key(*k), ScalarValue::from(value))?,
            Op::PutMap { key: k, value, .. } => {
                let m = d.put_object(ROOT, key(*k), ObjType::Map)?;
                d.put(&m, "inner", ScalarValue::from(value))?;
            }
            Op::Delete { key: k, .. } => {
                if d.get(ROOT, key(*k))?.is_some() {
                    d.delete(ROOT, key(*k))?;
                }
            }
            Op::Increment { by, .. } => d.increment(ROOT, "counter", *by)?,
            Op::InsertText { pos, text, .. } => {
                if let Some(t) = text_obj(d)? {
                    let len = d.length(&t);
                    d.splice_text(&t, pos % (len + 1), 0, text)?;
                }
            }
            Op::DeleteText { pos, len: del, .. } => {
                if let Some(t) = text_obj(d)? {
                    let len = d.length(&t);
                    if len > 0 {
                        let p = pos % len;
                        let del = (*del).min(len - p);
                        d.splice_text(&t, p, del as isize, "")?;
                    }
                }
            }
            Op::Request { .. } => {}
            Op::Run { .. } | Op::Create { .. } | Op::Restart { .. } => unreachable!(),
        }
        Ok(())
    });
    result.unwrap_or_else(|e| panic!("{op:?} failed: {e}"));
}

/// Build the network, play the ops on it while it misbehaves, heal it, and
/// check that every replica holds every document, identically.
fn run_scenario(s: &Scenario) {
    let mut net = Network::build(s.seed, s.topology, s.replicas);
    net.set_faults(s.faults);
    let mut docs = vec![create_doc(&mut net, s.replicas - 1)];
    for op in &s.ops {
        apply(&mut net, &mut docs, op);
    }
    // Every replica opens every document: it asks for those it lacks (they
    // were shared out of band, as URLs are), and a restarted one starts
    // syncing those it has.
    for i in 0..net.len() {
        for doc in &docs {
            net.request(i, *doc);
        }
    }
    net.heal();
    net.assert_converged(&docs);
    // Nothing exists anywhere that was not created by the scenario.
    let mut expected = docs.clone();
    expected.sort();
    assert_eq!(
        net.stored_documents(),
        expected,
        "unexpected documents stored"
    );
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The convergence property, at a size that runs in seconds.
    #[test]
    fn replicas_converge(s in scenario(40)) {
        run_scenario(&s);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The same property with many more and longer cases:
    /// `cargo test -p tandem-tests --test convergence --release -- --ignored`.
    #[test]
    #[ignore = "stress run; minutes"]
    fn replicas_converge_stress(s in scenario(120)) {
        run_scenario(&s);
    }
}

// ---- the harness itself ------------------------------------------------------

/// A few edits on each of three peers.
fn edit_everywhere(net: &mut Network, doc: &DocumentId, rounds: usize) {
    for round in 0..rounds {
        for i in 0..net.len() {
            if net.has_content(i, doc) {
                net.change(i, doc, |d| {
                    d.put(ROOT, format!("from-{i}"), round as i64)?;
                    d.increment(ROOT, "counter", 1)
                })
                .unwrap();
            }
        }
        net.run(10);
    }
}

#[test]
fn three_peers_with_drops_converge() {
    let mut net = Network::build(7, Topology::Mesh, 3);
    net.set_faults(Faults {
        drop: 0.3,
        ..Faults::NONE
    });
    let doc = create_doc(&mut net, 0);
    edit_everywhere(&mut net, &doc, 20);
    assert!(
        net.stats.dropped > 0,
        "no frame was dropped: {:?}",
        net.stats
    );
    net.heal();
    net.assert_converged(&[doc]);
    let counter = net.view(1, &doc, |d| match d.get(ROOT, "counter").unwrap() {
        Some((Value::Scalar(s), _)) => s.to_string(),
        other => panic!("counter is {other:?}"),
    });
    // The counter saw one increment per edit: all of them survived.
    let edits: usize = (0..3)
        .map(|i| {
            net.view(0, &doc, |d| {
                d.get(ROOT, format!("from-{i}").as_str()).unwrap().is_some() as usize
            })
        })
        .sum();
    assert_eq!(edits, 3, "every peer's edits arrived");
    assert_ne!(counter, "0");
}

#[test]
fn a_network_that_drops_everything_delivers_nothing_until_healed() {
    let mut net = Network::build(11, Topology::Mesh, 2);
    net.set_faults(Faults {
        drop: 1.0,
        ..Faults::NONE
    });
    let doc = create_doc(&mut net, 0);
    net.run_until_quiescent(1_000);
    assert!(net.stats.dropped > 0);
    assert_eq!(net.stats.delivered, 0);
    assert!(
        !net.has_content(1, &doc),
        "the document crossed a network that drops every frame"
    );
    net.heal();
    assert!(net.has_content(1, &doc));
    net.assert_converged(&[doc]);
}

#[test]
fn faults_of_every_kind_are_injected_and_healed() {
    let mut net = Network::build(3, Topology::Ring, 4);
    net.set_faults(Faults {
        reorder: 0.4,
        duplicate: 0.2,
        drop: 0.1,
        disconnect: 0.1,
        reconnect: 0.5,
    });
    let mut docs = vec![create_doc(&mut net, 0), create_doc(&mut net, 2)];
    for doc in docs.clone() {
        edit_everywhere(&mut net, &doc, 15);
    }
    docs.push(create_doc(&mut net, 3));
    net.run(100);
    let s = net.stats.clone();
    assert!(s.reordered > 0, "{s:?}");
    assert!(s.duplicated > 0, "{s:?}");
    assert!(s.dropped > 0, "{s:?}");
    assert!(s.disconnects > 0, "{s:?}");
    assert!(s.reconnects > 0, "{s:?}");
    net.heal();
    net.assert_converged(&docs);
}

#[test]
fn the_same_seed_replays_the_same_schedule() {
    let run = |seed| {
        let mut net = Network::build(seed, Topology::Star, 4);
        net.set_faults(Faults::CHAOTIC);
        let doc = create_doc(&mut net, 1);
        for i in 0..4 {
            net.request(i, doc);
        }
        edit_everywhere(&mut net, &doc, 10);
        net.heal();
        net.stats.clone()
    };
    assert_eq!(run(5), run(5));
    assert_ne!(
        run(5),
        run(6),
        "different seeds, same schedule: is the RNG used?"
    );
}

#[test]
#[should_panic(expected = "did not quiesce within 0 steps")]
fn running_past_the_bound_panics() {
    let mut net = Network::build(1, Topology::Mesh, 2);
    create_doc(&mut net, 0);
    net.run_until_quiescent(0);
}

#[test]
fn a_repo_closing_its_side_tears_the_link_down() {
    let mut net = Network::build(2, Topology::Mesh, 2);
    net.run_until_quiescent(100);
    assert!(net.links()[0].is_up());
    net.inject(0, End::B, b"not cbor at all".to_vec());
    net.run_until_quiescent(100);
    assert!(!net.links()[0].is_up());
    assert_eq!(net.stats.closes, 1);
    assert_eq!(
        net.protocol_errors().len(),
        1,
        "{:?}",
        net.protocol_errors()
    );
    // And it comes back on heal.
    let doc = create_doc(&mut net, 0);
    net.heal();
    net.assert_converged(&[doc]);
}

// ---- engine behaviour the harness exposes --------------------------------------

/// Star: client 2 asks the server for a document before client 1 has
/// uploaded it; the server says `doc-unavailable`. When client 1's upload
/// arrives, automerge-repo (JS, 2.5.x: `DocSynchronizer` keeps the requester
/// in its peers and syncs every change to them) sends the document on to
/// the waiting client on the same connection. The engine does not: it never
/// subscribed the requester, so the client waits until it reconnects.
#[test]
fn late_document_reaches_an_earlier_requester() {
    let mut net = Network::new(1);
    let server = net.add_node("server", Role::Server);
    let c1 = net.add_node("c1", Role::Client);
    let c2 = net.add_node("c2", Role::Client);
    let l1 = net.add_link(c1, server);
    net.add_link(c2, server);
    net.disconnect(l1);
    net.run_until_quiescent(100);

    let doc = create_doc(&mut net, c1);
    net.request(c2, doc);
    net.run_until_quiescent(100);
    assert!(!net.has_content(c2, &doc));

    net.connect(l1);
    net.run_until_quiescent(100);
    assert!(
        net.has_content(server, &doc),
        "the upload reached the server"
    );
    assert!(
        net.has_content(c2, &doc),
        "the server has the document now, but the client that asked for it never got it"
    );
}

/// A restarted client has a document in storage with a change the server
/// lacks. Its connection is already up when the application opens the
/// document (`request` on a stored document). automerge-repo (JS) starts
/// syncing a document with every connected peer when it is found; the
/// engine only marks it active, so nothing is sent until the next
/// reconnection.
#[test]
fn opening_a_stored_document_syncs_it_with_connected_peers() {
    let mut net = Network::new(3);
    let server = net.add_node("server", Role::Server);
    let client = net.add_node("client", Role::Client);
    let link = net.add_link(client, server);
    let doc = create_doc(&mut net, client);
    net.run_until_quiescent(100);
    net.assert_converged(&[doc]);

    net.disconnect(link);
    net.change(client, &doc, |d| d.put(ROOT, "offline", true))
        .unwrap();
    net.restart(client);
    net.connect(link);
    net.run_until_quiescent(100);
    assert_eq!(net.repo(client).peers().len(), 1, "handshake done");

    net.request(client, doc);
    net.run_until_quiescent(100);
    assert!(
        net.view(server, &doc, |d| d.get(ROOT, "offline").unwrap().is_some()),
        "the opened document was not synced with the connected server"
    );
}

// ---- resuming with persisted sync state -------------------------------------

/// A document of roughly 60 KB made of 560 changes. (Mostly incompressible
/// byte strings rather than text: automerge in a debug build spends about
/// 0.2 ms per text character.)
fn big_document(net: &mut Network, node: usize) -> DocumentId {
    let doc = create_doc(net, node);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut noise = move |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (x >> 33) as u8
            })
            .collect()
    };
    for i in 0..60 {
        let blob = noise(1_000);
        net.change(node, &doc, |d| {
            let t = text_obj(d)?.unwrap();
            let len = d.length(&t);
            d.splice_text(&t, len, 0, &format!("line {i}\n"))?;
            d.put(ROOT, format!("blob{i}"), ScalarValue::Bytes(blob))
        })
        .unwrap();
    }
    for i in 0..500i64 {
        net.change(node, &doc, |d| d.put(ROOT, "n", i)).unwrap();
    }
    net.flush_all();
    doc
}

fn doc_size(net: &mut Network, node: usize, doc: &DocumentId) -> u64 {
    net.view(node, doc, |d| d.save().len() as u64)
}

/// Bytes of sync frames `node` receives while `f` runs and the network quiets.
fn sync_bytes_received(net: &mut Network, node: usize, f: impl FnOnce(&mut Network)) -> u64 {
    let before = net.node(node).received.sync_bytes();
    f(net);
    net.run_until_quiescent(1_000);
    net.node(node).received.sync_bytes() - before
}

/// The `have.last_sync` of the first automerge sync message `to` received
/// from `from` since `since` (an index into its frame log) that has one. A
/// sender that resumed from a persisted sync state names the heads it last
/// synced; a fresh state names none and sends a bloom filter of every change.
fn first_last_sync(net: &Network, to: usize, from: usize, since: usize) -> Vec<ChangeHash> {
    net.node(to).frame_log[since..]
        .iter()
        .filter(|(sender, _)| *sender == from)
        .filter_map(|(_, frame)| match Message::decode(frame).unwrap() {
            Message::Sync { data, .. } | Message::Request { data, .. } => Some(data),
            _ => None,
        })
        .flat_map(|data| sync::Message::decode(&data).unwrap().have)
        .map(|have| have.last_sync)
        .next()
        .unwrap_or_else(|| {
            panic!(
                "{} sent no sync message with a `have` to {}",
                net.node(from).name,
                net.node(to).name
            )
        })
}

/// The sync state `node` has stored for `doc` with the store `peer_sid`.
fn stored_sync_state(net: &mut Network, node: usize, doc: &DocumentId, peer_sid: &str) -> bool {
    let key = StorageKey::new([
        doc.to_string(),
        "sync-state".to_owned(),
        peer_sid.to_owned(),
    ])
    .unwrap();
    net.repo(node).storage().get(&key).unwrap().is_some()
}

/// Every sync state `node` has stored for `doc`.
fn stored_sync_states(net: &mut Network, node: usize, doc: &DocumentId) -> usize {
    let prefix = StorageKey::new([doc.to_string(), "sync-state".to_owned()]).unwrap();
    net.repo(node)
        .storage()
        .scan(&prefix, None, 100)
        .unwrap()
        .len()
}

/// Both stores keep a sync state for the other.
fn assert_sync_states_stored(net: &mut Network, a: usize, b: usize, doc: &DocumentId) {
    let sid_a = net.repo(a).storage_id().as_str().to_owned();
    let sid_b = net.repo(b).storage_id().as_str().to_owned();
    assert!(stored_sync_state(net, a, doc, &sid_b), "no sync state on a");
    assert!(stored_sync_state(net, b, doc, &sid_a), "no sync state on b");
}

/// Server plus one client whose store is `client_storage`; the client
/// creates a big document and syncs it. Returns (net, server, client, link, doc).
fn synced_pair(
    client_storage: SimStorage,
    client_config: RepoConfig,
) -> (Network, usize, usize, usize, DocumentId) {
    let mut net = Network::new(42);
    net.set_frame_log(true);
    let server = net.add_node("server", Role::Server);
    let client = net.add_node_with("client", Role::Client, client_storage, client_config);
    let link = net.add_link(client, server);
    let doc = big_document(&mut net, client);
    net.run_until_quiescent(1_000);
    net.assert_converged(&[doc]);
    (net, server, client, link, doc)
}

fn small_change_on(net: &mut Network, node: usize, doc: &DocumentId) {
    net.change(node, doc, |d| d.put(ROOT, "small", "change"))
        .unwrap();
    net.flush_all();
}

fn client_config() -> RepoConfig {
    RepoConfig::new(PeerId::new("client"))
}

#[test]
fn a_reconnecting_peer_receives_only_what_it_lacks() {
    let storage: SimStorage = Arc::new(tandem_engine::MemoryStorage::new());
    let (mut net, server, client, link, doc) = synced_pair(storage, client_config());
    let size = doc_size(&mut net, server, &doc);
    assert!(size > 50_000, "document too small to tell: {size} bytes");

    // Control: a brand-new store asking for the document gets all of it,
    // starting from a fresh sync state.
    let fresh = net.add_node("fresh", Role::Client);
    let fresh_link = net.add_link(fresh, server);
    let mark = net.node(server).frame_log.len();
    let full = sync_bytes_received(&mut net, fresh, |net| net.request(fresh, doc));
    assert!(
        full > size / 2,
        "a fresh peer got only {full} bytes of a {size}-byte document"
    );
    assert!(
        first_last_sync(&net, server, fresh, mark).is_empty(),
        "a fresh store claims to have synced before"
    );
    net.disconnect(fresh_link);

    assert_sync_states_stored(&mut net, server, client, &doc);
    net.disconnect(link);
    small_change_on(&mut net, server, &doc);
    let mark = net.node(server).frame_log.len();
    let resumed = sync_bytes_received(&mut net, client, |net| net.connect(link));
    net.assert_converged_on(&[server, client], &[doc]);
    assert!(
        net.view(client, &doc, |d| d.get(ROOT, "small").unwrap().is_some()),
        "the small change arrived"
    );
    assert!(
        resumed * 10 < size,
        "on reconnect the client received {resumed} bytes of sync frames for a \
         {size}-byte document it already had all but one change of"
    );
    assert!(
        !first_last_sync(&net, server, client, mark).is_empty(),
        "the client started from a fresh sync state instead of its persisted one"
    );
}

/// Control for `assert_sync_states_stored`: an ephemeral peer announces no
/// storage id, so the server keeps no sync state for it.
#[test]
fn no_sync_state_is_stored_for_an_ephemeral_peer() {
    let storage: SimStorage = Arc::new(tandem_engine::MemoryStorage::new());
    let config = RepoConfig {
        ephemeral: true,
        ..client_config()
    };
    let (mut net, server, client, link, doc) = synced_pair(storage, config);
    net.disconnect(link);
    assert_eq!(stored_sync_states(&mut net, server, &doc), 0);
    // The ephemeral client itself keeps one for the (storing) server.
    let server_sid = net.repo(server).storage_id().as_str().to_owned();
    assert!(stored_sync_state(&mut net, client, &doc, &server_sid));
}

#[test]
fn a_restarted_peer_on_redb_resumes_from_its_persisted_sync_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.redb");
    let storage: SimStorage = Arc::new(RedbStorage::open(&path).unwrap());
    let (mut net, server, client, link, doc) = synced_pair(storage, client_config());
    let size = doc_size(&mut net, server, &doc);
    let client_storage_id = net.repo(client).storage_id().clone();

    assert_sync_states_stored(&mut net, server, client, &doc);
    small_change_on(&mut net, server, &doc);
    // Restart the client process: the repo and the database are closed and
    // the file is opened again.
    net.restart_with(client, |old| {
        drop(old);
        Arc::new(RedbStorage::open(&path).unwrap())
    });
    assert_eq!(
        net.repo(client).storage_id(),
        &client_storage_id,
        "the storage id survives a restart"
    );
    let mark = net.node(server).frame_log.len();
    let server_before = net.node(server).received.sync_bytes();
    let resumed = sync_bytes_received(&mut net, client, |net| {
        net.connect(link);
        // A restarted client only syncs documents it opens.
        net.request(client, doc);
    });
    let uploaded = net.node(server).received.sync_bytes() - server_before;
    net.assert_converged(&[doc]);
    assert!(
        resumed * 10 < size,
        "after a restart the client received {resumed} bytes of sync frames for a \
         {size}-byte document it already had all but one change of"
    );
    assert!(
        uploaded * 10 < size,
        "after a restart the client sent {uploaded} bytes of sync frames for a \
         {size}-byte document the server already had"
    );
    assert!(
        !first_last_sync(&net, server, client, mark).is_empty(),
        "the restarted client started from a fresh sync state instead of its persisted one"
    );
}
