//! The browser demo (examples/browser) end to end: `wasm/build.sh` builds the
//! package, a real relay (`tandem_relay::serve`, anonymous) listens on
//! 127.0.0.1:0, and `examples/browser/e2e.mjs` drives two headless Chromium
//! pages of the demo (playwright-core with Debian's `/usr/bin/chromium`):
//! an edit in one page appears in the other; one page goes offline, both
//! edit the same task, the offline page reloads (its edits come back from
//! IndexedDB), reconnects, and both pages show the same merged task, with
//! the title conflict listed. The official `@automerge/automerge-repo` client
//! (tests/js) then reads the row document through the relay, in Node and in
//! a third page (the client bundled by esbuild). A screenshot
//! goes to `tests/artifacts/browser-demo.png`.
//!
//! Nothing skips: a missing tool (node, npm, chromium, the wasm toolchain)
//! fails the test with the reason.
//!
//! Run: `cargo test -p tandem-tests --test browser_e2e -- --nocapture`

#[allow(dead_code)] // only the npm install of tests/js is used here
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
use std::time::Duration;

use tandem_relay::RelayConfig;

/// A first build compiles std for wasm32 and may install wasm-bindgen-cli.
const BUILD_LIMIT: Duration = Duration::from_secs(40 * 60);

/// Build wasm/pkg (incremental after the first time); installs the
/// toolchain pieces it can (wasm/build.sh).
fn build_package() {
    let output = build_sh(&[], BUILD_LIMIT);
    eprintln!("{}", output.trim());
}

fn demo_dir() -> PathBuf {
    with_playwright("examples/browser")
}

#[test]
fn two_pages_of_the_demo_sync_offline_edits_merge_and_automerge_repo_reads_a_row() {
    node::require_node(); // Node on PATH, and tests/js installed (automerge-repo)
    let demo = demo_dir();
    build_package();
    if !Path::new("/usr/bin/chromium").is_file() {
        // A fresh machine: let the build script install Chromium (as root).
        let mut install = Command::new("bash");
        install
            .arg(root().join("wasm/build.sh"))
            .arg("--install-only");
        run_limited(install, "wasm/build.sh --install-only", BUILD_LIMIT);
    }
    assert!(
        Path::new("/usr/bin/chromium").is_file(),
        "/usr/bin/chromium is missing: apt-get install chromium (see wasm/build.sh --install-only)"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(300), async {
            let config = RelayConfig::default(); // anonymous
            let relay = start_relay_with(config).await;
            let url = relay.url.clone();

            let screenshot = root().join("tests/artifacts/browser-demo.png");
            let _ = std::fs::remove_file(&screenshot);
            let args = serde_json::json!({
                "relay": url,
                "root": root(),
                "screenshot": screenshot,
            });
            let output = tokio::task::spawn_blocking(move || {
                let mut node = Command::new("node");
                node.arg("e2e.mjs").arg(args.to_string()).current_dir(demo);
                run_limited(
                    node,
                    "node examples/browser/e2e.mjs",
                    Duration::from_secs(200),
                )
            })
            .await
            .unwrap();
            let report: serde_json::Value = output
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str(l).ok())
                .unwrap_or_else(|| panic!("no JSON report from e2e.mjs:\n{output}"));
            eprintln!("report: {report:#}");

            // An edit in one page appeared in the other.
            assert_eq!(report["liveSync"]["title"], "Water the plants");
            assert_eq!(report["liveSync"]["notes"], "Ferns first");
            // The offline page kept its edits across the reload, still offline.
            assert_eq!(report["stateAfterReload"], "offline");
            assert_eq!(
                report["afterReload"], report["offlineBeforeReload"],
                "IndexedDB kept every offline edit"
            );
            assert_eq!(
                report["afterReload"]["title"],
                "Water all plants (B, offline)"
            );
            // Both pages converged on the merged row.
            let merged = &report["merged"];
            assert_eq!(merged["a"], merged["b"], "both stores read the same row");
            assert_eq!(merged["shownA"], merged["shownB"], "both pages show it");
            let values = &merged["a"]["values"];
            assert_eq!(values["notes"], "Weekly: Ferns first then the cactus");
            assert_eq!(values["votes"], 2);
            assert_eq!(values["done"], true);
            let titles = merged["a"]["conflicts"]["title"]
                .as_array()
                .expect("the concurrent titles are listed");
            assert_eq!(titles.len(), 2);
            // Last writer wins: the shown title is the later version.
            assert_eq!(values["title"], titles[1]["value"]);
            assert!(
                merged["shownA"]["conflict"]
                    .as_str()
                    .is_some_and(|c| c.contains("Water the plants (A)")
                        && c.contains("Water all plants (B, offline)")),
                "the page lists the competing titles: {}",
                merged["shownA"]
            );
            assert!(screenshot.is_file(), "no screenshot at {screenshot:?}");

            // The official automerge-repo client read the row document
            // through the relay: the documented row schema.
            let read = &report["automergeRepo"];
            assert_eq!(
                read["url"],
                format!("automerge:{}", report["documentId"].as_str().unwrap())
            );
            let doc = &read["doc"];
            assert_eq!(doc["_table"], "tasks");
            assert_eq!(doc["_key"], report["key"]);
            assert_eq!(doc["notes"], values["notes"]);
            assert_eq!(doc["votes"], 2);
            assert_eq!(doc["done"], true);
            assert!(
                titles.iter().any(|t| t["value"] == doc["title"]),
                "the title register holds one of the versions: {doc}"
            );
            // So did a page with the same client, bundled for the browser.
            let in_page = &report["automergeRepoPage"];
            assert_eq!(in_page["url"], read["url"]);
            assert_eq!(&in_page["doc"], doc, "the page reads what Node read");

            relay.stop(Duration::from_secs(30)).await;
        })
        .await
        .expect("the end-to-end test finished within 300 s");
    });
}
