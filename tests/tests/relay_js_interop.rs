//! The official JS automerge-repo client (2.5.6 with its
//! `WebSocketClientAdapter`, driven through tests/js/relay-client.mjs)
//! against the real relay: `tandem_relay::serve` on 127.0.0.1 port 0 over a
//! redb store, with anonymous access, exactly as `tandem serve
//! --allow-anonymous` runs it.
//!
//! - JS to JS: a client creates and changes a document and exits once the
//!   relay acknowledged it; fresh clients find it by URL through the relay,
//!   and a change by one fans out to the other.
//! - JS and native: a JS write reaches a `tandem_relay::Client` through the
//!   relay, and the native client's write reaches the JS client.
//! - After a restart: a fresh JS client finds a document the relay answers
//!   from its store without loading it (a whole saved document, without the
//!   Bloom filter automerge would add), then edits it through the relay.
//!
//! Every wait is bounded; a failure in Node shows its stderr. Node 20 and the
//! npm packages of tests/js are required (installed with `npm ci` when
//! missing): without them these tests fail, they never skip.
//!
//! Run: `cargo test -p tandem-tests --test relay_js_interop`.

#[allow(dead_code)] // only the install and version checks are used here
#[path = "support/node.rs"]
mod node;

#[path = "support/relay.rs"]
mod relay;
use relay::{Store, n, native, start_relay, start_relay_on, wait_acknowledged, wait_native};

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tandem_engine::automerge::{ChangeHash, ROOT, transaction::Transactable};
use tandem_engine::rows::{Rows, TableSchema, Value as Cell};
use tandem_engine::{AutomergeUrl, DocumentId, PeerId, RedbStorage, Repo, RepoConfig, ShareAll};
use tandem_relay::RelayConfig;
use tokio::sync::mpsc;

/// Bound on each single wait.
const T: Duration = Duration::from_secs(15);
/// Bound on a whole test.
const WHOLE_TEST: Duration = Duration::from_secs(120);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(WHOLE_TEST, f)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {WHOLE_TEST:?}"))
}

// ---- the relay -------------------------------------------------------------

// ---- a Node client -----------------------------------------------------------

/// `node relay-client.mjs <url> <name>`, its stderr kept for failure
/// messages. Killed when dropped.
struct Js {
    name: String,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
    next_id: u64,
}

impl Js {
    async fn start(url: &str, name: &str) -> Self {
        node::require_node();
        let mut child = Command::new("node")
            .args(["relay-client.mjs", url, name])
            .current_dir(node::js_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start node: {e}"));
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (sink, err) = (stderr.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let stdin = child.stdin.take().unwrap();
        let mut js = Self {
            name: name.to_owned(),
            child,
            stdin,
            lines,
            stderr,
            next_id: 1,
        };
        let started = js.next("the started event", Instant::now() + T).await;
        if started["event"] != "started" {
            js.fail(&format!("expected the started event, got {started}"));
        }
        node::check_versions(&started);
        js
    }

    /// Panic with `why` and everything Node wrote to stderr.
    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        std::thread::sleep(Duration::from_millis(100)); // let the reader catch up
        let stderr = self.stderr.lock().unwrap().clone();
        panic!(
            "{}: {why}\nnode exit status: {status:?}\n--- node stderr ---\n{stderr}--- end of node stderr ---",
            self.name
        )
    }

    async fn next(&mut self, what: &str, deadline: Instant) -> Value {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.lines.recv()).await {
            Ok(Some(line)) => serde_json::from_str(&line)
                .unwrap_or_else(|e| self.fail(&format!("non-JSON line on stdout ({e}): {line}"))),
            Ok(None) => self.fail(&format!("node exited while waiting for {what}")),
            Err(_) => self.fail(&format!("no answer within {T:?} waiting for {what}")),
        }
    }

    /// Send a command and return its successful reply (events are skipped).
    async fn call(&mut self, mut cmd: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = json!(id);
        cmd["timeoutMs"] = json!(T.as_millis() as u64 - 1000);
        if let Err(e) = writeln!(self.stdin, "{cmd}").and_then(|()| self.stdin.flush()) {
            self.fail(&format!("cannot write {cmd} to node: {e}"));
        }
        let what = format!("the reply to {cmd}");
        let deadline = Instant::now() + T;
        loop {
            let v = self.next(&what, deadline).await;
            if v["event"] == "fatal" {
                self.fail(&format!("fatal event {v}"));
            }
            if v.get("event").is_some() {
                continue;
            }
            if v["id"] != json!(id) {
                self.fail(&format!("reply out of order: {v} to {cmd}"));
            }
            if v["ok"] != json!(true) {
                self.fail(&format!("{cmd} failed: {}", v["error"]));
            }
            return v;
        }
    }

    async fn exit(mut self) {
        self.call(json!({"cmd": "exit"})).await;
        let deadline = Instant::now() + T;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                self.fail("did not exit after the exit command");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Js {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn doc_id(url: &Value) -> DocumentId {
    let url = url.as_str().expect("a URL string");
    url.parse::<AutomergeUrl>()
        .unwrap_or_else(|e| panic!("JS made a URL Tandem cannot parse: {url}: {e}"))
        .document
}

/// Heads as automerge-repo writes them in URLs (bs58check), sorted.
fn url_heads(doc: DocumentId, heads: Vec<ChangeHash>) -> Vec<String> {
    let url = AutomergeUrl {
        document: doc,
        heads: Some(heads),
    }
    .to_string();
    let (_, heads) = url.split_once('#').expect("a URL with heads");
    let mut heads: Vec<String> = heads.split('|').map(str::to_owned).collect();
    heads.sort();
    heads
}

fn sorted_heads(js: &Value) -> Vec<String> {
    let mut heads: Vec<String> = js
        .as_array()
        .unwrap_or_else(|| panic!("heads are not a list: {js}"))
        .iter()
        .map(|h| h.as_str().expect("a head string").to_owned())
        .collect();
    heads.sort();
    heads
}

// ---- the tests ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_clients_share_a_document_through_the_relay() {
    bounded(async {
        let relay = start_relay().await;

        // A writes, and leaves once the relay has stored its changes.
        let mut a = Js::start(&relay.url, "js-a").await;
        let created = a
            .call(json!({"cmd": "create", "value": {"n": 1, "title": "from js-a"}}))
            .await;
        let url = created["url"].clone();
        let doc = doc_id(&url);
        a.call(json!({"cmd": "set", "url": url, "key": "n", "value": 2}))
            .await;
        a.call(json!({"cmd": "acked", "url": url})).await;
        a.exit().await;

        // Fresh clients with empty repos find it by URL: only the relay has it.
        let mut b = Js::start(&relay.url, "js-b").await;
        let seen = b
            .call(json!({"cmd": "wait", "url": url, "key": "n", "equals": 2}))
            .await;
        assert_eq!(seen["doc"], json!({"n": 2, "title": "from js-a"}));
        let mut c = Js::start(&relay.url, "js-c").await;
        c.call(json!({"cmd": "wait", "url": url, "key": "n", "equals": 2}))
            .await;

        // Both stay connected: b's change fans out to c through the relay.
        b.call(json!({"cmd": "set", "url": url, "key": "n", "value": 3}))
            .await;
        b.call(json!({"cmd": "acked", "url": url})).await;
        let seen = c
            .call(json!({"cmd": "wait", "url": url, "key": "n", "equals": 3}))
            .await;
        let b_heads = b.call(json!({"cmd": "acked", "url": url})).await["heads"].clone();
        assert_eq!(sorted_heads(&seen["heads"]), sorted_heads(&b_heads));
        b.exit().await;
        c.exit().await;

        assert_eq!(relay.stop(T).await.view(&doc, n).unwrap(), Some(3));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_and_native_clients_sync_both_ways_through_the_relay() {
    bounded(async {
        let relay = start_relay().await;

        // JS writes; the native client reads it through the relay.
        let mut js = Js::start(&relay.url, "js-writer").await;
        let created = js.call(json!({"cmd": "create", "value": {"n": 10}})).await;
        let url = created["url"].clone();
        let doc = doc_id(&url);
        js.call(json!({"cmd": "acked", "url": url})).await;
        let client = native(&relay.url, "native");
        client.request(doc).await.unwrap();
        wait_native(&client, doc, 10, T).await;

        // The native client writes; the JS client (still connected) sees it.
        client.change(doc, |d| d.put(ROOT, "n", 11)).await.unwrap();
        wait_acknowledged(&client, doc, T).await;
        js.call(json!({"cmd": "wait", "url": url, "key": "n", "equals": 11}))
            .await;

        // And once more JS to native, on the live connection (fan-out).
        js.call(json!({"cmd": "set", "url": url, "key": "n", "value": 12}))
            .await;
        js.call(json!({"cmd": "acked", "url": url})).await;
        wait_native(&client, doc, 12, T).await;

        // Both sides hold the same history.
        let js_heads = js.call(json!({"cmd": "acked", "url": url})).await["heads"].clone();
        let native_heads = client.heads(doc).await.unwrap();
        assert_eq!(
            sorted_heads(&js_heads),
            url_heads(doc, native_heads),
            "JS and the native client disagree on the heads"
        );
        client.shutdown().await.unwrap();
        js.exit().await;
        assert_eq!(relay.stop(T).await.view(&doc, n).unwrap(), Some(12));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_js_client_finds_a_document_the_relay_answers_from_its_store() {
    bounded(async {
        let relay = start_relay().await;
        let mut a = Js::start(&relay.url, "js-a").await;
        let created = a
            .call(json!({"cmd": "create", "value": {"n": 1, "title": "stored"}}))
            .await;
        let url = created["url"].clone();
        let doc = doc_id(&url);
        a.call(json!({"cmd": "acked", "url": url})).await;
        a.exit().await;

        // Restarted, the relay has nothing in memory: it answers a fresh
        // client's request from the stored bytes and takes in its
        // acknowledgement from their heads, loading nothing.
        let (repo, store) = relay.stop_keeping_store(T).await;
        drop(repo);
        let relay = start_relay_on(store, RelayConfig::default()).await;
        let mut b = Js::start(&relay.url, "js-b").await;
        let seen = b
            .call(json!({"cmd": "wait", "url": url, "key": "n", "equals": 1}))
            .await;
        assert_eq!(seen["doc"], json!({"n": 1, "title": "stored"}));
        b.call(json!({"cmd": "acked", "url": url})).await;
        b.exit().await;
        let (mut repo, store) = relay.stop_keeping_store(T).await;
        assert!(
            !repo.is_loaded(&doc),
            "the relay loaded the document: the answer did not come from its store"
        );
        assert_eq!(repo.view(&doc, n).unwrap(), Some(1));
        drop(repo);

        // A client that found it that way edits it through the relay.
        let relay = start_relay_on(store, RelayConfig::default()).await;
        let mut c = Js::start(&relay.url, "js-c").await;
        c.call(json!({"cmd": "wait", "url": url, "key": "n", "equals": 1}))
            .await;
        c.call(json!({"cmd": "set", "url": url, "key": "n", "value": 2}))
            .await;
        c.call(json!({"cmd": "acked", "url": url})).await;
        c.exit().await;
        assert_eq!(relay.stop(T).await.view(&doc, n).unwrap(), Some(2));
    })
    .await;
}

/// Rows over the redb file of a relay's store (while no relay runs on it).
fn rows_on(store: &Store) -> Rows<RedbStorage> {
    let repo = Repo::open(
        RedbStorage::open(store.redb()).unwrap(),
        RepoConfig::new(PeerId::new("rows")),
        ShareAll,
    )
    .unwrap();
    let mut rows = Rows::with_system_clock(repo);
    rows.define(TableSchema::new("tasks"));
    rows
}

/// A row made by the row layer is stored as its first change alone (a
/// change chunk, not a saved document). The relay answers the official JS
/// client with those bytes as the whole document, the client reads the row
/// as plain keys and edits it, and the row layer reads the edit back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_js_client_reads_and_edits_a_row_stored_as_its_first_change() {
    bounded(async {
        let store = Store::new();
        let row = {
            let mut rows = rows_on(&store);
            let cells = [
                ("title", Cell::from("buy milk")),
                ("done", Cell::Bool(false)),
            ];
            rows.table("tasks").insert("t1", cells).unwrap();
            rows.flush().unwrap();
            let row = rows.table("tasks").document_id("t1").unwrap();
            let stored = rows.repo().stored_bytes(&row).unwrap().expect("stored");
            // Magic bytes, checksum, then the chunk type: 1 for a change.
            assert_eq!(stored[8], 1, "the row is stored as a change chunk");
            row
        };
        let relay = start_relay_on(store, RelayConfig::default()).await;
        let url = format!("automerge:{row}");
        let mut js = Js::start(&relay.url, "js-rows").await;
        let seen = js
            .call(json!({"cmd": "wait", "url": url, "key": "title", "equals": "buy milk"}))
            .await;
        assert_eq!(
            seen["doc"],
            json!({"_table": "tasks", "_key": "t1", "title": "buy milk", "done": false})
        );
        js.call(json!({"cmd": "set", "url": url, "key": "done", "value": true}))
            .await;
        js.call(json!({"cmd": "acked", "url": url})).await;
        js.exit().await;
        let (repo, store) = relay.stop_keeping_store(T).await;
        drop(repo);
        let mut rows = rows_on(&store);
        let read = rows.table("tasks").get("t1").unwrap().expect("the row");
        assert_eq!(read.get("done"), Some(&Cell::Bool(true)));
        assert_eq!(read.get("title"), Some(&Cell::from("buy milk")));
    })
    .await;
}
