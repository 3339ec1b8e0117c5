//! Interop with the official automerge-repo JS packages (tests/js, pinned in
//! its package.json), proving that the CBOR encoding and the handshake of
//! `tandem_engine` match theirs, in both roles:
//!
//! - Rust accepts (`Direction::Incoming`, `ServeOnRequest`, redb storage) and
//!   JS clients connect with `WebSocketClientAdapter`;
//! - Rust connects (`Direction::Outgoing`, `ShareAll`) to a JS sync server
//!   built on `WebSocketServerAdapter`.
//!
//! The Node scripts are driven over stdin/stdout with one JSON object per
//! line (see tests/js/interop-common.mjs). Every wait is bounded. Node and
//! `npm ci` in tests/js are required: without them these tests fail, they
//! never skip.
//!
//! Run: `(cd tests/js && npm ci) && cargo test -p tandem-tests --test js_interop`
//! (add `-- --nocapture` to see the decoded frame logs of passing tests).

mod support;

use std::future::Future;
use std::time::Duration;

use ciborium::Value as CborValue;
use serde_json::{Value as Json, json};
use tandem_engine::automerge::transaction::Transactable;
use tandem_engine::automerge::{
    AutoCommit, AutoSerde, Automerge, AutomergeError, ObjId, ObjType, ROOT, ReadDoc, ScalarValue,
    Value,
};
use tandem_engine::protocol::{Message, PeerMetadata, RemoteHeads};
use tandem_engine::{
    AutomergeUrl, DocumentId, Event, MemoryStorage, PeerId, PeerInfo, RedbStorage, Repo,
    RepoConfig, ServeOnRequest, ShareAll, Storage, StorageId,
};

use support::node::{Node, check_versions};
use support::ws_shim::Shim;

/// Bound on every single wait.
const T: Duration = Duration::from_secs(10);
/// Bound on a whole test.
const WHOLE_TEST: Duration = Duration::from_secs(90);

const SERVER_PEER: &str = "tandem-server";

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(WHOLE_TEST, f)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {WHOLE_TEST:?}"))
}

// ---- rendering and building documents --------------------------------------

/// The document with the automerge type of every value, e.g.
/// `{count: int 42, title: text "hi"}`: stricter than JSON, which cannot tell
/// text from a scalar string, an int from a float or a counter from an int.
fn render(d: &Automerge) -> String {
    render_obj(d, &ROOT, ObjType::Map)
}

fn render_obj(d: &Automerge, obj: &ObjId, ty: ObjType) -> String {
    match ty {
        ObjType::Map | ObjType::Table => {
            let items: Vec<String> = d
                .keys(obj)
                .map(|k| {
                    let (v, id) = d.get(obj, &k).unwrap().unwrap();
                    format!("{k}: {}", render_value(d, v, &id))
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        ObjType::List => {
            let items: Vec<String> = (0..d.length(obj))
                .map(|i| {
                    let (v, id) = d.get(obj, i).unwrap().unwrap();
                    render_value(d, v, &id)
                })
                .collect();
            format!("[{}]", items.join(", "))
        }
        ObjType::Text => format!("text {:?}", d.text(obj).unwrap()),
    }
}

fn render_value(d: &Automerge, v: Value<'_>, id: &ObjId) -> String {
    match v {
        Value::Object(ty) => render_obj(d, id, ty),
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(s) => format!("str {:?}", s.as_str()),
            ScalarValue::Int(i) => format!("int {i}"),
            ScalarValue::Uint(u) => format!("uint {u}"),
            ScalarValue::F64(f) => format!("f64 {f:?}"),
            ScalarValue::Counter(c) => format!("counter {}", i64::from(c)),
            ScalarValue::Boolean(b) => format!("bool {b}"),
            ScalarValue::Null => "null".into(),
            other => format!("{other:?}"),
        },
    }
}

fn to_json(d: &Automerge) -> Json {
    serde_json::to_value(AutoSerde::from(d)).unwrap()
}

/// JSON equality with numbers compared as numbers: JS has one number type,
/// so `-5` from JS and `-5.0` from an automerge f64 are the same value (the
/// types are checked separately, by [`render`]).
#[track_caller]
fn assert_same_json(rust: &Json, js: &Json) {
    fn norm(v: &Json) -> Json {
        match v {
            Json::Number(n) => json!(n.as_f64().unwrap()),
            Json::Array(a) => Json::Array(a.iter().map(norm).collect()),
            Json::Object(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), norm(v))).collect()),
            other => other.clone(),
        }
    }
    assert_eq!(
        norm(rust),
        norm(js),
        "the JSON views differ: Rust {rust} vs JS {js}"
    );
}

fn sorted_heads(d: &Automerge) -> Vec<String> {
    let mut h: Vec<String> = d.get_heads().iter().map(|h| h.to_string()).collect();
    h.sort();
    h
}

/// Heads as JS reports them (`Automerge.getHeads`: hex strings), sorted.
fn js_heads(reply: &Json) -> Vec<String> {
    let mut h: Vec<String> = reply["heads"]
        .as_array()
        .unwrap_or_else(|| panic!("no heads in {reply}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect();
    h.sort();
    h
}

fn doc_of(reply: &Json) -> DocumentId {
    let url = reply["url"]
        .as_str()
        .unwrap_or_else(|| panic!("no url in {reply}"));
    url.parse::<AutomergeUrl>()
        .unwrap_or_else(|e| panic!("JS gave an automerge URL we cannot parse: {url}: {e}"))
        .document
}

/// A document written by Rust with one value of each common type.
fn put_sample(d: &mut AutoCommit) -> Result<(), AutomergeError> {
    let title = d.put_object(ROOT, "title", ObjType::Text)?;
    d.splice_text(&title, 0, 0, "hello from rust")?;
    d.put(ROOT, "count", 42i64)?;
    d.put(ROOT, "ratio", 2.5f64)?;
    d.put(ROOT, "label", "scalar string")?;
    d.put(ROOT, "hits", ScalarValue::counter(7))?;
    d.put(ROOT, "big", ScalarValue::Uint(9_007_199_254_740_991))?;
    let nums = d.put_object(ROOT, "nums", ObjType::List)?;
    for (i, n) in [1i64, 2, 3].into_iter().enumerate() {
        d.insert(&nums, i, n)?;
    }
    let tags = d.put_object(ROOT, "tags", ObjType::List)?;
    for (i, t) in ["x", "y"].into_iter().enumerate() {
        let text = d.insert_object(&tags, i, ObjType::Text)?;
        d.splice_text(&text, 0, 0, t)?;
    }
    let nested = d.put_object(ROOT, "nested", ObjType::Map)?;
    d.put(&nested, "flag", true)?;
    d.put(&nested, "nothing", ScalarValue::Null)?;
    d.put(&nested, "neg", -5i64)?;
    Ok(())
}

fn sample_json() -> Json {
    json!({
        "title": "hello from rust",
        "count": 42,
        "ratio": 2.5,
        "label": "scalar string",
        "hits": 7,
        // automerge JS returns this uint as a BigInt (tagged by interop-common.mjs).
        "big": {"$bigint": "9007199254740991"},
        "nums": [1, 2, 3],
        "tags": ["x", "y"],
        "nested": {"flag": true, "nothing": null, "neg": -5},
    })
}

const SAMPLE_RENDERED: &str = "{big: uint 9007199254740991, count: int 42, hits: counter 7, \
     label: str \"scalar string\", nested: {flag: bool true, neg: int -5, nothing: null}, \
     nums: [int 1, int 2, int 3], ratio: f64 2.5, tags: [text \"x\", text \"y\"], \
     title: text \"hello from rust\"}";

// ---- setup --------------------------------------------------------------------

fn open_server_repo(path: &std::path::Path) -> Repo<RedbStorage> {
    Repo::open(
        RedbStorage::open(path).unwrap(),
        RepoConfig::new(PeerId::new(SERVER_PEER)),
        ServeOnRequest,
    )
    .unwrap()
}

/// A Rust server on redb in a temp dir, listening.
async fn rust_server(dir: &tempfile::TempDir) -> (Shim<RedbStorage>, String) {
    let shim = Shim::start(
        "rust server",
        open_server_repo(&dir.path().join("tandem.redb")),
    );
    let url = shim.listen().await;
    (shim, url)
}

/// Start a JS client against `url` and check the handshake on both sides.
async fn js_client<S: Storage + 'static>(shim: &Shim<S>, url: &str, peer: &str) -> Node {
    let mut node = Node::spawn(peer, "interop-client.mjs", &[url, peer]);
    let started = node
        .wait_event(T, "the client to start", |e| e["event"] == "started")
        .await;
    check_versions(&started);

    // JS decoded our `peer` message: our peer id and our peerMetadata.
    let our_storage = shim.run(|r| r.storage_id().to_string()).await;
    let ev = node
        .wait_event(T, "the handshake (a `peer` message from Rust)", |e| {
            e["event"] == "peer"
        })
        .await;
    assert_eq!(ev["peerId"], SERVER_PEER, "{ev}");
    assert_eq!(
        ev["peerMetadata"],
        json!({"storageId": our_storage, "isEphemeral": false}),
        "peerMetadata as JS decoded it: {ev}"
    );

    // Rust decoded the JS `join`: an ephemeral peer without a storage id
    // (a JS repo without storage sends `{storageId: undefined, isEphemeral: true}`).
    let info: PeerInfo = shim
        .wait_event(T, &format!("PeerConnected({peer})"), |e| match e {
            Event::PeerConnected(p) if p.peer_id.as_str() == peer => Some(p.clone()),
            _ => None,
        })
        .await;
    assert!(info.ephemeral, "{info:?}");
    assert_eq!(info.storage_id, None, "{info:?}");
    node
}

/// Wait until the Rust repo has `doc` at exactly `heads`.
async fn wait_heads<S: Storage + 'static>(
    shim: &Shim<S>,
    doc: DocumentId,
    heads: Vec<String>,
    what: &str,
) {
    shim.wait_until(T, what, move |repo| {
        if !repo.contains(&doc).map_err(|e| e.to_string())? {
            return Err("the document does not exist".into());
        }
        let have = repo.view(&doc, sorted_heads).map_err(|e| e.to_string())?;
        if have == heads {
            Ok(())
        } else {
            Err(format!("heads {have:?}, want {heads:?}"))
        }
    })
    .await
}

/// Neither side may have broken the protocol.
fn assert_no_protocol_errors<S: Storage + 'static>(shim: &Shim<S>) {
    let errors: Vec<Event> = shim
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::ProtocolError { .. }))
        .collect();
    assert!(errors.is_empty(), "protocol errors: {errors:?}");
}

async fn rendered<S: Storage + 'static>(shim: &Shim<S>, doc: DocumentId) -> (String, Json) {
    shim.run(move |repo| repo.view(&doc, |d| (render(d), to_json(d))).unwrap())
        .await
}

// ---- scenarios -----------------------------------------------------------------

/// (a) JS creates a document; Rust receives it, with every value and type
/// exact, and it is durable in redb.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_creates_rust_receives() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (shim, url) = rust_server(&dir).await;
        let mut js = js_client(&shim, &url, "js-a").await;

        let value = json!({
            "title": "hello from js",
            "count": 42,
            "ratio": 2.5,
            "nums": [1, 2, 3],
            "tags": ["x", "y"],
            "label": {"$raw": "scalar string"},
            "hits": {"$counter": 7},
            "nested": {"flag": true, "nothing": null, "neg": -5},
        });
        let created = js.call(json!({"cmd": "create", "value": value}), T).await;
        let doc = doc_of(&created);
        wait_heads(&shim, doc, js_heads(&created), "the JS-created document").await;

        // `neg: f64 -5.0` is what JS writes: automerge 3.5.0's `from()` (used by
        // `repo.create(value)`) stores negative integers as float64, while a
        // `change` stores them as int (see `edits_flow_both_ways`).
        let expected = "{count: int 42, hits: counter 7, label: str \"scalar string\", \
             nested: {flag: bool true, neg: f64 -5.0, nothing: null}, nums: [int 1, int 2, int 3], \
             ratio: f64 2.5, tags: [text \"x\", text \"y\"], title: text \"hello from js\"}";
        let (typed, as_json) = rendered(&shim, doc).await;
        assert_eq!(typed, expected);
        assert_same_json(&as_json, &created["doc"]);

        assert_no_protocol_errors(&shim);

        // Durable: reopen the redb file and read it again.
        let repo = shim.stop().await;
        drop(repo);
        let mut reopened = open_server_repo(&dir.path().join("tandem.redb"));
        assert_eq!(reopened.view(&doc, render).unwrap(), expected);
        assert_eq!(
            reopened.view(&doc, sorted_heads).unwrap(),
            js_heads(&created)
        );
    })
    .await
}

/// (b) Rust creates a document; JS finds it by URL and reads the same values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_creates_js_finds() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (shim, url) = rust_server(&dir).await;
        let doc = shim
            .run(|repo| {
                let id = repo.create().unwrap();
                repo.change(&id, put_sample).unwrap();
                id
            })
            .await;
        let (typed, _) = rendered(&shim, doc).await;
        assert_eq!(typed, SAMPLE_RENDERED);
        let rust_heads = shim.run(move |r| r.view(&doc, sorted_heads).unwrap()).await;

        let mut js = js_client(&shim, &url, "js-b").await;
        let read = js
            .call(json!({"cmd": "read", "url": doc.url().to_string()}), T)
            .await;
        assert_eq!(read["doc"], sample_json(), "the document as JS sees it");
        assert_eq!(js_heads(&read), rust_heads);

        // A document Rust does not have: `doc-unavailable`, and JS's find fails.
        let missing = DocumentId::random();
        let reply = js
            .call_raw(json!({"cmd": "read", "url": missing.url().to_string()}), T)
            .await;
        assert_eq!(
            reply["ok"], false,
            "JS found a document nobody has: {reply}"
        );
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("unavailable"),
            "JS failed for another reason: {error}"
        );
        assert_no_protocol_errors(&shim);
    })
    .await
}

/// (c) Both directions on one document: JS edits a Rust document, Rust sees
/// it; Rust edits, JS sees it through a `change` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_flow_both_ways() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (shim, url) = rust_server(&dir).await;
        let doc = shim
            .run(|repo| {
                let id = repo.create().unwrap();
                repo.change(&id, |d| {
                    let title = d.put_object(ROOT, "title", ObjType::Text)?;
                    d.splice_text(&title, 0, 0, "shared")?;
                    let nums = d.put_object(ROOT, "nums", ObjType::List)?;
                    d.insert(&nums, 0, 1i64)?;
                    d.put(ROOT, "hits", ScalarValue::counter(0))
                })
                .unwrap();
                id
            })
            .await;
        let doc_url = doc.url().to_string();
        let mut js = js_client(&shim, &url, "js-c").await;

        // JS -> Rust.
        let changed = js
            .call(
                json!({"cmd": "change", "url": doc_url, "ops": [
                    {"op": "set", "path": ["fromJs"], "value": "written by js"},
                    {"op": "push", "path": ["nums"], "values": [2, 3]},
                    {"op": "splice", "path": ["title"], "index": 0, "del": 0, "insert": "js+"},
                    {"op": "increment", "path": ["hits"], "by": 5},
                    {"op": "set", "path": ["neg"], "value": -3},
                ]}),
                T,
            )
            .await;
        wait_heads(&shim, doc, js_heads(&changed), "the JS edit").await;
        let (typed, as_json) = rendered(&shim, doc).await;
        assert_eq!(
            typed,
            "{fromJs: text \"written by js\", hits: counter 5, neg: int -3, \
             nums: [int 1, int 2, int 3], title: text \"js+shared\"}"
        );
        assert_same_json(&as_json, &changed["doc"]);

        // Rust -> JS.
        shim.run(move |repo| {
            repo.change(&doc, |d| {
                d.put(ROOT, "fromRust", "written by rust")?;
                let (_, title) = d.get(ROOT, "title")?.unwrap();
                let len = d.length(&title);
                d.splice_text(&title, len, 0, "+rust")?;
                d.increment(ROOT, "hits", 2)?;
                let (_, nums) = d.get(ROOT, "nums")?.unwrap();
                d.insert(&nums, 3, 4i64)
            })
            .unwrap()
        })
        .await;
        let seen = js
            .call(
                json!({"cmd": "wait", "url": doc_url, "path": ["fromRust"],
                       "equals": "written by rust", "timeoutMs": 10000}),
                T + Duration::from_secs(2),
            )
            .await;
        // Counted from JS's first use of the handle: the edit may arrive
        // before the `wait` starts, and its event must have fired anyway.
        assert!(
            seen["eventsTouchingPath"].as_u64().unwrap_or(0) >= 1,
            "JS saw the Rust edit without a change event touching it: {seen}"
        );
        assert_eq!(
            seen["doc"],
            json!({"fromJs": "written by js", "fromRust": "written by rust", "hits": 7,
                   "neg": -3, "nums": [1, 2, 3, 4], "title": "js+shared+rust"})
        );
        let rust = shim.run(move |r| r.view(&doc, sorted_heads).unwrap()).await;
        assert_eq!(js_heads(&seen), rust, "JS and Rust did not converge");
        assert_no_protocol_errors(&shim);
    })
    .await
}

/// (d) Two JS clients through the Rust server: edits fan out to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_js_clients_fan_out() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (shim, url) = rust_server(&dir).await;
        let mut a = js_client(&shim, &url, "js-fan-a").await;
        let mut b = js_client(&shim, &url, "js-fan-b").await;

        let created = a
            .call(
                json!({"cmd": "create", "value": {"title": "from a", "n": 1}}),
                T,
            )
            .await;
        let doc = doc_of(&created);
        let doc_url = created["url"].clone();
        wait_heads(&shim, doc, js_heads(&created), "A's document on the server").await;

        let read = b.call(json!({"cmd": "read", "url": doc_url}), T).await;
        assert_eq!(read["doc"], json!({"title": "from a", "n": 1}));

        // A -> B.
        a.call(
            json!({"cmd": "change", "url": doc_url,
                   "ops": [{"op": "set", "path": ["fromA"], "value": 1}]}),
            T,
        )
        .await;
        b.call(
            json!({"cmd": "wait", "url": doc_url, "path": ["fromA"], "equals": 1}),
            T + Duration::from_secs(2),
        )
        .await;
        // B -> A.
        b.call(
            json!({"cmd": "change", "url": doc_url,
                   "ops": [{"op": "splice", "path": ["title"], "index": 6, "del": 0, "insert": " and b"}]}),
            T,
        )
        .await;
        let seen_a = a
            .call(
                json!({"cmd": "wait", "url": doc_url, "path": ["title"], "equals": "from a and b"}),
                T + Duration::from_secs(2),
            )
            .await;
        let seen_b = b
            .call(
                json!({"cmd": "wait", "url": doc_url, "path": ["title"], "equals": "from a and b"}),
                T + Duration::from_secs(2),
            )
            .await;
        assert_eq!(seen_a["doc"], seen_b["doc"]);

        // Ephemeral messages (presence): A -> Rust -> B, sender preserved.
        b.call(json!({"cmd": "listen-ephemeral", "url": doc_url}), T)
            .await;
        a.call(
            json!({"cmd": "broadcast", "url": doc_url, "message": {"cursor": 3, "who": "a"}}),
            T,
        )
        .await;
        let got = b
            .call(json!({"cmd": "wait-ephemeral", "url": doc_url}), T + Duration::from_secs(2))
            .await;
        assert_eq!(
            got["messages"],
            json!([{"senderId": "js-fan-a", "message": {"cursor": 3, "who": "a"}}])
        );
        shim.wait_event(T, "Event::Ephemeral from js-fan-a", |e| match e {
            Event::Ephemeral { sender, document, .. }
                if sender.as_str() == "js-fan-a" && *document == doc =>
            {
                Some(())
            }
            _ => None,
        })
        .await;
        assert_eq!(js_heads(&seen_a), js_heads(&seen_b));
        wait_heads(&shim, doc, js_heads(&seen_a), "the server to converge").await;
        assert_no_protocol_errors(&shim);
    })
    .await
}

/// Every protocol message, through both codecs: ours encodes and cbor-x (as
/// the JS adapters configure it) decodes to the fields the JS code reads, and
/// the other way round; and both encodings are the same CBOR data model
/// (map with text keys, untagged byte strings, no tags anywhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbor_codec_matches_the_js_adapters() {
    bounded(async {
        let mut js = Node::spawn("js codec", "interop-server.mjs", &["js-codec"]);
        let listening = js
            .wait_event(T, "node to start", |e| e["event"] == "listening")
            .await;
        check_versions(&listening);

        let (a, b) = (PeerId::new("peer-a"), PeerId::new("peer-b"));
        let doc = DocumentId::random();
        let ds = doc.to_string();
        let cases: Vec<(Message, Json)> = vec![
            (
                Message::Join {
                    sender_id: a.clone(),
                    supported_protocol_versions: vec!["1".into()],
                    metadata: Some(PeerMetadata {
                        storage_id: Some(StorageId::new("store-a")),
                        is_ephemeral: false,
                    }),
                    extensions: vec![],
                },
                json!({"type": "join", "senderId": "peer-a", "supportedProtocolVersions": ["1"],
                       "peerMetadata": {"storageId": "store-a", "isEphemeral": false}}),
            ),
            (
                Message::Peer {
                    sender_id: b.clone(),
                    target_id: a.clone(),
                    selected_protocol_version: "1".into(),
                    metadata: Some(PeerMetadata {
                        storage_id: None,
                        is_ephemeral: true,
                    }),
                    extensions: vec![],
                },
                json!({"type": "peer", "senderId": "peer-b", "targetId": "peer-a",
                       "selectedProtocolVersion": "1", "peerMetadata": {"isEphemeral": true}}),
            ),
            (
                Message::Leave {
                    sender_id: a.clone(),
                },
                json!({"type": "leave", "senderId": "peer-a"}),
            ),
            (
                Message::Error {
                    message: "unsupported protocol version".into(),
                    sender_id: Some(b.clone()),
                    target_id: Some(a.clone()),
                },
                json!({"type": "error", "message": "unsupported protocol version",
                       "senderId": "peer-b", "targetId": "peer-a"}),
            ),
            (
                Message::Request {
                    sender_id: a.clone(),
                    target_id: b.clone(),
                    document_id: doc,
                    data: vec![0x42, 0, 1, 0xff],
                },
                json!({"type": "request", "senderId": "peer-a", "targetId": "peer-b",
                       "documentId": ds, "data": {"$bytes": "420001ff"}}),
            ),
            (
                Message::Sync {
                    sender_id: b.clone(),
                    target_id: a.clone(),
                    document_id: doc,
                    data: vec![0x43, 2],
                },
                json!({"type": "sync", "senderId": "peer-b", "targetId": "peer-a",
                       "documentId": ds, "data": {"$bytes": "4302"}}),
            ),
            (
                Message::DocUnavailable {
                    sender_id: b.clone(),
                    target_id: a.clone(),
                    document_id: doc,
                },
                json!({"type": "doc-unavailable", "senderId": "peer-b", "targetId": "peer-a",
                       "documentId": ds}),
            ),
            (
                Message::Ephemeral {
                    sender_id: a.clone(),
                    target_id: b.clone(),
                    count: 7,
                    session_id: "session-1".into(),
                    document_id: doc,
                    data: vec![0xa1, 0x61, 0x78, 0x01],
                },
                json!({"type": "ephemeral", "senderId": "peer-a", "targetId": "peer-b",
                       "count": 7, "sessionId": "session-1", "documentId": ds,
                       "data": {"$bytes": "a1617801"}}),
            ),
            (
                Message::RemoteSubscriptionChange {
                    sender_id: a.clone(),
                    target_id: b.clone(),
                    add: vec![StorageId::new("store-x")],
                    remove: vec![StorageId::new("store-y")],
                },
                json!({"type": "remote-subscription-change", "senderId": "peer-a",
                       "targetId": "peer-b", "add": ["store-x"], "remove": ["store-y"]}),
            ),
            (
                Message::RemoteHeadsChanged {
                    sender_id: b,
                    target_id: a,
                    document_id: doc,
                    new_heads: vec![RemoteHeads {
                        storage_id: StorageId::new("store-x"),
                        heads: vec!["2QrYbxuLUhQwFE2vkjCPfB7n9kbyiG9CdXPbLMwZqWVtQ2fqqQ".into()],
                        // Fractional, so it is written as a float. An integral
                        // timestamp (what the engine sends) is the subject of
                        // `remote_heads_timestamp_reaches_js_as_a_number`.
                        timestamp: 1_700_000_000_123.5,
                    }],
                },
                json!({"type": "remote-heads-changed", "senderId": "peer-b", "targetId": "peer-a",
                       "documentId": ds, "newHeads": {"store-x": {
                           "heads": ["2QrYbxuLUhQwFE2vkjCPfB7n9kbyiG9CdXPbLMwZqWVtQ2fqqQ"],
                           "timestamp": 1_700_000_000_123.5}}}),
            ),
        ];
        for (msg, expected) in cases {
            codec_round_trip(&mut js, &msg, &expected).await;
        }
    })
    .await
}

/// The engine stamps `remote-heads-changed` with `now` in integral
/// milliseconds. Written as a CBOR uint64 (`0x1b`), cbor-x would decode it to
/// a BigInt (`new Date(t)` and `Date.now() - t` throw in JS); it must be a
/// float64 (`0xfb`), as JS itself writes it. Regression test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_heads_timestamp_reaches_js_as_a_number() {
    bounded(async {
        let mut js = Node::spawn("js codec", "interop-server.mjs", &["js-codec"]);
        js.wait_event(T, "node to start", |e| e["event"] == "listening")
            .await;
        let doc = DocumentId::random();
        let msg = Message::RemoteHeadsChanged {
            sender_id: PeerId::new("tandem-server"),
            target_id: PeerId::new("js-client"),
            document_id: doc,
            new_heads: vec![RemoteHeads {
                storage_id: StorageId::new("store-x"),
                heads: vec!["2QrYbxuLUhQwFE2vkjCPfB7n9kbyiG9CdXPbLMwZqWVtQ2fqqQ".into()],
                timestamp: 1_700_000_000_123.0,
            }],
        };
        let expected = json!({"type": "remote-heads-changed", "senderId": "tandem-server",
            "targetId": "js-client", "documentId": doc.to_string(), "newHeads": {"store-x": {
                "heads": ["2QrYbxuLUhQwFE2vkjCPfB7n9kbyiG9CdXPbLMwZqWVtQ2fqqQ"],
                "timestamp": 1_700_000_000_123u64}}});
        codec_round_trip(&mut js, &msg, &expected).await;
    })
    .await
}

/// `msg` through both codecs (see `cbor_codec_matches_the_js_adapters`).
async fn codec_round_trip(js: &mut Node, msg: &Message, expected: &Json) {
    let name = msg.type_name();
    let ours = msg.encode();
    // Ours -> cbor-x.
    let decoded = js
        .call(json!({"cmd": "decode", "hex": to_hex(&ours)}), T)
        .await;
    assert_eq!(
        &decoded["value"],
        expected,
        "{name}: cbor-x read our frame {} so",
        to_hex(&ours)
    );
    // cbor-x -> ours.
    let encoded = js
        .call(json!({"cmd": "encode", "value": expected}), T)
        .await;
    let theirs = from_hex(encoded["hex"].as_str().unwrap());
    assert_eq!(
        &Message::decode(&theirs).unwrap_or_else(|e| panic!("{name}: {e}")),
        msg,
        "{name}: we read cbor-x's frame {} so",
        to_hex(&theirs)
    );
    // The same CBOR data model (key order aside): same major types, untagged.
    let (o, t) = (cbor_tree(&ours), cbor_tree(&theirs));
    assert_untagged(&o, name);
    assert_untagged(&t, name);
    assert_eq!(o, t, "{name}: the CBOR items differ (ours, then cbor-x's)");
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The CBOR item, with map entries sorted by key.
fn cbor_tree(bytes: &[u8]) -> CborValue {
    fn sort(v: CborValue) -> CborValue {
        match v {
            CborValue::Map(entries) => {
                let mut entries: Vec<_> = entries.into_iter().map(|(k, v)| (k, sort(v))).collect();
                entries.sort_by(|x, y| format!("{:?}", x.0).cmp(&format!("{:?}", y.0)));
                CborValue::Map(entries)
            }
            CborValue::Array(a) => CborValue::Array(a.into_iter().map(sort).collect()),
            other => other,
        }
    }
    sort(ciborium::de::from_reader(bytes).expect("valid CBOR"))
}

fn assert_untagged(v: &CborValue, name: &str) {
    match v {
        CborValue::Tag(t, _) => panic!("{name}: CBOR tag {t} in {v:?}"),
        CborValue::Map(m) => m.iter().for_each(|(k, v)| {
            assert!(
                matches!(k, CborValue::Text(_)),
                "{name}: non-text key {k:?}"
            );
            assert_untagged(v, name);
        }),
        CborValue::Array(a) => a.iter().for_each(|x| assert_untagged(x, name)),
        _ => {}
    }
}

/// (4) Rust connects to a JS sync server (`Direction::Outgoing`): our `join`
/// is accepted, a document we push arrives, and one the server made is
/// fetched with `request`; then edits in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_joins_js_sync_server() {
    bounded(async {
        // Keep-alive every 200 ms (default 5 s): the adapter terminates a
        // socket that misses a pong, so this also proves ours answers pings.
        let mut server = Node::spawn("js server", "interop-server.mjs", &["js-server", "200"]);
        let listening = server
            .wait_event(T, "the JS server to listen", |e| e["event"] == "listening")
            .await;
        check_versions(&listening);
        let port = listening["port"].as_u64().expect("port");

        let shim = Shim::start(
            "rust client",
            Repo::open(
                MemoryStorage::new(),
                RepoConfig::new(PeerId::new("tandem-client")),
                ShareAll,
            )
            .unwrap(),
        );
        // An edit made offline, before connecting.
        let pushed = shim
            .run(|repo| {
                let id = repo.create().unwrap();
                repo.change(&id, put_sample).unwrap();
                id
            })
            .await;
        let our_storage = shim.run(|r| r.storage_id().to_string()).await;
        let our_heads = shim
            .run(move |r| r.view(&pushed, sorted_heads).unwrap())
            .await;

        shim.connect(&format!("ws://127.0.0.1:{port}")).await;

        // The JS server decoded our `join`.
        let ev = server
            .wait_event(T, "the JS server to accept our join", |e| {
                e["event"] == "peer"
            })
            .await;
        assert_eq!(ev["peerId"], "tandem-client", "{ev}");
        assert_eq!(
            ev["peerMetadata"],
            json!({"storageId": our_storage, "isEphemeral": false}),
            "our join's peerMetadata as JS decoded it: {ev}"
        );
        // We decoded its `peer`.
        let info = shim
            .wait_event(T, "PeerConnected(js-server)", |e| match e {
                Event::PeerConnected(p) => Some(p.clone()),
                _ => None,
            })
            .await;
        assert_eq!(info.peer_id.as_str(), "js-server");
        assert!(
            info.ephemeral,
            "a JS repo without storage is ephemeral: {info:?}"
        );

        // Push: the server never asks (noFind), our ShareAll announces it.
        let got = server
            .call(
                json!({"cmd": "wait", "url": pushed.url().to_string(), "noFind": true,
                       "path": [], "equals": sample_json()}),
                T + Duration::from_secs(2),
            )
            .await;
        assert_eq!(js_heads(&got), our_heads);

        // Read back a document the server made.
        let made = server
            .call(
                json!({"cmd": "create", "value": {"title": "made by the js server", "n": 7,
                                                 "flags": [true, false]}}),
                T,
            )
            .await;
        let theirs = doc_of(&made);
        shim.run(move |repo| repo.request(theirs).unwrap()).await;
        wait_heads(&shim, theirs, js_heads(&made), "the JS server's document").await;
        let (typed, as_json) = rendered(&shim, theirs).await;
        assert_eq!(
            typed,
            "{flags: [bool true, bool false], n: int 7, title: text \"made by the js server\"}"
        );
        assert_same_json(&as_json, &made["doc"]);

        // Rust edits the server's document; the server sees it.
        shim.run(move |repo| {
            repo.change(&theirs, |d| d.put(ROOT, "fromRust", 1i64))
                .unwrap()
        })
        .await;
        let seen = server
            .call(
                json!({"cmd": "wait", "url": made["url"], "path": ["fromRust"], "equals": 1}),
                T + Duration::from_secs(2),
            )
            .await;
        let rust = shim
            .run(move |r| r.view(&theirs, sorted_heads).unwrap())
            .await;
        assert_eq!(js_heads(&seen), rust);

        // Still connected after many keep-alive rounds: one more edit.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        shim.run(move |repo| {
            repo.change(&theirs, |d| d.put(ROOT, "afterPings", true))
                .unwrap()
        })
        .await;
        server
            .call(
                json!({"cmd": "wait", "url": made["url"], "path": ["afterPings"], "equals": true}),
                T + Duration::from_secs(2),
            )
            .await;
        assert!(
            !server
                .events()
                .iter()
                .any(|e| e["event"] == "peer-disconnected"),
            "the JS server dropped us: {:?}",
            server.events()
        );
        assert!(
            !shim
                .events()
                .iter()
                .any(|e| matches!(e, Event::PeerDisconnected { .. })),
            "we lost the connection: {:?}",
            shim.events()
        );
        assert_no_protocol_errors(&shim);
    })
    .await
}
