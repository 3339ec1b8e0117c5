//! The browser build, driven from `cargo test --workspace`: `wasm/build.sh`
//! builds the npm-style package (installing the toolchain pieces it can), and
//! the wasm-bindgen tests in `wasm/tests/browser.rs` run in headless
//! Chromium.
//!
//! Nothing here skips: a tool that cannot be installed (no root for apt, no
//! registry) fails the test with build.sh's reason. Every child process has
//! a time limit. The first run compiles the standard library for wasm32 and
//! may install wasm-bindgen-cli: several minutes; later runs are quick.
//!
//! Run: `cargo test -p tandem-tests --test wasm_browser -- --nocapture`

#[allow(dead_code)] // only the Node process wrapper is used here
#[path = "support/node.rs"]
mod node;

#[allow(dead_code)] // only the relay itself is used here
#[path = "support/relay.rs"]
mod relay;
use relay::start_relay_with;

#[path = "support/process.rs"]
mod process;
use process::{build_sh, root, run_limited, with_playwright};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Generous bound for a first build on 2 cores (std from source, and a
/// wasm-bindgen-cli install); a warm build takes seconds.
const BUILD_LIMIT: Duration = Duration::from_secs(40 * 60);
/// The browser test run (compiles the tests, then runs them in Chromium).
const TEST_LIMIT: Duration = Duration::from_secs(20 * 60);
/// The gzipped `.wasm` (gzip -9) must stay within this: the issue's target of
/// 500,000 bytes. The package is about 489,000 bytes (automerge is over half
/// of the code); wasm/build.sh says how it gets there.
const GZIP_BUDGET: u64 = 500_000;

fn pkg() -> PathBuf {
    root().join("wasm/pkg")
}

/// Tests in this file share one build; they take turns.
fn lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Build the package once per test binary.
fn built() -> MutexGuard<'static, ()> {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let guard = lock();
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !*built {
        let output = build_sh(&[], BUILD_LIMIT);
        eprintln!("{}", output.trim());
        *built = true;
    }
    guard
}

#[test]
fn the_package_has_bindings_types_and_fits_the_size_budget() {
    let _guard = built();
    for file in [
        "package.json",
        "tandem_wasm.js",
        "tandem_wasm.d.ts",
        "tandem_wasm_bg.wasm",
    ] {
        assert!(
            pkg().join(file).is_file(),
            "wasm/build.sh did not produce wasm/pkg/{file}"
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pkg().join("package.json")).unwrap())
            .expect("package.json is JSON");
    assert_eq!(manifest["name"], "tandem-wasm");
    assert_eq!(manifest["types"], "tandem_wasm.d.ts");
    assert_eq!(manifest["type"], "module");

    let types = std::fs::read_to_string(pkg().join("tandem_wasm.d.ts")).unwrap();
    for expected in [
        "export class Tandem",
        "static open(name: string, options?: OpenOptions",
        "export type TandemEvent",
        "export type TandemOp",
        "subscribe(callback: (event: TandemEvent) => void): number",
        "get(document: string, path?: Path",
        "goOffline(): void",
        "whenPersisted(): Promise<void>",
    ] {
        assert!(
            types.contains(expected),
            "tandem_wasm.d.ts lacks {expected:?}:\n{types}"
        );
    }

    let wasm = std::fs::read(pkg().join("tandem_wasm_bg.wasm")).unwrap();
    let gzipped = gzip_len(&pkg().join("tandem_wasm_bg.wasm"));
    eprintln!(
        "tandem_wasm_bg.wasm: {} bytes, {gzipped} gzipped",
        wasm.len()
    );
    assert!(
        gzipped <= GZIP_BUDGET,
        "the gzipped module is {gzipped} bytes, over the {GZIP_BUDGET}-byte budget"
    );
}

fn gzip_len(file: &Path) -> u64 {
    let out = Command::new("gzip")
        .args(["-9", "-c"])
        .arg(file)
        .output()
        .expect("run gzip");
    assert!(out.status.success(), "gzip failed");
    out.stdout.len() as u64
}

#[test]
fn the_bindings_pass_their_tests_in_headless_chromium() {
    let _guard = built();
    let output = build_sh(&["--test-only"], TEST_LIMIT);
    // wasm-bindgen-test-runner prints a libtest summary per test file; a
    // file that ran no test would say "0 passed".
    let summaries: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("test result:"))
        .collect();
    // One summary per file in wasm/tests (browser.rs, rows.rs, ...).
    let files = std::fs::read_dir(root().join("wasm/tests"))
        .expect("wasm/tests")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "rs"))
        })
        .count();
    assert!(files >= 2, "wasm/tests should hold browser.rs and rows.rs");
    assert_eq!(
        summaries.len(),
        files,
        "expected one test summary per wasm/tests file:\n{output}"
    );
    for summary in summaries {
        assert!(
            summary.starts_with("test result: ok.") && !summary.contains(" 0 passed"),
            "browser tests: {summary}\n{output}"
        );
    }
}

// ---- end to end: a page, a relay and a native client ------------------------------

fn e2e_dir() -> PathBuf {
    with_playwright("wasm/e2e")
}

/// A relay (in process, tokens required) on 127.0.0.1:0 and a native Tandem
/// client; a headless Chromium page of the built package reads what the
/// client wrote, replies, goes offline, edits, reloads (its store reopens
/// from IndexedDB), reconnects; the native client ends with every edit and
/// the same heads.
#[test]
fn a_page_syncs_with_a_native_client_through_a_relay() {
    use tandem_engine::automerge::{ROOT, ReadDoc, transaction::Transactable};
    use tandem_engine::{MemoryStorage, PeerId, Repo, RepoConfig, ShareAll};
    use tandem_relay::{Auth, Claims, Client, ClientConfig, Grant, RelayConfig, mint};

    let _guard = built();
    let e2e = e2e_dir();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(240), async {
            let secret = b"wasm end-to-end secret".to_vec();
            let config = RelayConfig {
                auth: Auth::tokens(secret.clone()),
                ..RelayConfig::default()
            };
            let relay = start_relay_with(config).await;
            let url = relay.url.clone();
            let exp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 3600;
            let token = mint(
                &secret,
                &Claims {
                    docs: vec![Grant::read_write_all()],
                    exp,
                    sub: Some("wasm e2e".into()),
                },
            );

            let native = Repo::open(
                MemoryStorage::new(),
                RepoConfig::new(PeerId::new("native")),
                ShareAll,
            )
            .unwrap();
            let client = Client::start(
                native,
                url.clone(),
                ClientConfig {
                    token: Some(token.clone()),
                    ..ClientConfig::default()
                },
            )
            .unwrap();
            let doc = client.create().await.unwrap();
            client
                .change(doc, |d| d.put(ROOT, "title", "from native"))
                .await
                .unwrap();
            let mut waited = 0;
            while !client.acknowledged(doc).await.unwrap() {
                waited += 1;
                assert!(waited < 200, "the relay never acknowledged the native edit");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }

            let artifacts = root().join("tests/artifacts");
            std::fs::create_dir_all(&artifacts).unwrap();
            let args = serde_json::json!({
                "relay": url,
                "token": token,
                "document": doc.to_string(),
                "pkg": pkg(),
                "screenshot": artifacts.join("wasm-smoke.png"),
            });
            let report = smoke(e2e, args).await;
            eprintln!("page report: {report}");
            let (first, second) = (&report["first"], &report["second"]);
            assert_eq!(first["document"]["reply"], "from browser");
            assert_eq!(
                first["offlineAcknowledged"], false,
                "an offline edit cannot be acknowledged"
            );
            assert_eq!(
                second["afterReload"]["offline"], "made offline",
                "the offline edit survived the reload (IndexedDB)"
            );
            assert_eq!(
                first["storageId"], second["storageId"],
                "same store after reload"
            );

            // The native client gets every edit of the page through the relay.
            let mut seen = String::new();
            for _ in 0..300 {
                seen = client
                    .view(doc, |d| {
                        let get = |k: &str| {
                            d.get(ROOT, k)
                                .ok()
                                .flatten()
                                .map(|(v, _)| v.to_string())
                                .unwrap_or_default()
                        };
                        let notes = d
                            .get(ROOT, "notes")
                            .ok()
                            .flatten()
                            .and_then(|(_, id)| d.text(&id).ok())
                            .unwrap_or_default();
                        format!("{} {} {notes:?}", get("reply"), get("offline"))
                    })
                    .await
                    .unwrap();
                if seen == r#""from browser" "made offline" "TYPED in chromium""# {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(seen, r#""from browser" "made offline" "TYPED in chromium""#);
            let mut native_heads: Vec<String> = client
                .heads(doc)
                .await
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect();
            let mut page_heads: Vec<String> = second["heads"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_str().unwrap().to_owned())
                .collect();
            native_heads.sort();
            page_heads.sort();
            assert_eq!(
                native_heads, page_heads,
                "the page and the native client converged"
            );

            client.shutdown().await.unwrap();
            relay.stop(Duration::from_secs(30)).await;
        })
        .await
        .expect("the end-to-end test finished within 240 s");
    });
}

/// Run `wasm/e2e/smoke.mjs` with `args` (off the async runtime) and return
/// the page's JSON report.
async fn smoke(e2e: PathBuf, args: serde_json::Value) -> serde_json::Value {
    let output = tokio::task::spawn_blocking(move || {
        let mut node = Command::new("node");
        node.arg("smoke.mjs").arg(args.to_string()).current_dir(e2e);
        run_limited(node, "node wasm/e2e/smoke.mjs", Duration::from_secs(180))
    })
    .await
    .unwrap();
    output
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON report from the page:\n{output}"))
}

/// The same protocol against the official JS automerge-repo sync server
/// (`tests/js/interop-server.mjs`): a page creates a document and pushes it;
/// the server acknowledges it and holds exactly what the page wrote.
#[test]
fn a_page_pushes_a_document_to_the_js_automerge_repo_server() {
    let _guard = built();
    let e2e = e2e_dir();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(240), async {
            let mut server = node::Node::spawn("js-server", "interop-server.mjs", &[]);
            let listening = server
                .wait_event(Duration::from_secs(30), "listening", |e| {
                    e["event"] == "listening"
                })
                .await;
            node::check_versions(&listening);
            let url = format!("ws://127.0.0.1:{}", listening["port"]);
            let report = smoke(
                e2e,
                serde_json::json!({ "mode": "write", "relay": url, "pkg": pkg() }),
            )
            .await;
            eprintln!("page report: {report}");
            let doc_url = report["url"].as_str().expect("the page reports its url");
            assert!(doc_url.starts_with("automerge:"), "{doc_url}");
            let expected = serde_json::json!({
                "title": "from wasm",
                "done": false,
                "tags": ["a", "b"],
                "notes": "hello world",
                "votes": 5,
            });
            assert_eq!(report["document"], expected);
            let held = server
                .call(
                    serde_json::json!({ "cmd": "read", "url": doc_url }),
                    Duration::from_secs(20),
                )
                .await;
            assert_eq!(
                held["doc"], expected,
                "the JS server holds the page's document"
            );
            let mut js_heads: Vec<String> = held["heads"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_str().unwrap().to_owned())
                .collect();
            let mut page_heads: Vec<String> = report["heads"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_str().unwrap().to_owned())
                .collect();
            js_heads.sort();
            page_heads.sort();
            assert_eq!(js_heads, page_heads);
        })
        .await
        .expect("the test finished within 240 s");
    });
}
