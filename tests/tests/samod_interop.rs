//! samod 0.16 (the Rust automerge-repo) against the real relay
//! (`tandem_relay::serve` on 127.0.0.1 port 0, redb store, anonymous access),
//! with a native `tandem_relay::Client` on the other side:
//! samod -> relay -> native and native -> relay -> samod, for a new document
//! and for changes to an existing one.
//!
//! samod runs as the small binary tests/samod-peer (its own Cargo workspace
//! and lock file, so its dependency versions never mix with ours). The test
//! builds it with cargo (the first build downloads and compiles samod, a few
//! minutes; later ones are incremental) and fails with cargo's output if that
//! fails: it never skips.
//!
//! Run: `cargo test -p tandem-tests --test samod_interop -- --nocapture`
//! (`--nocapture` shows the build time).

#[allow(dead_code)] // the restart helpers are used by relay_js_interop
#[path = "support/relay.rs"]
mod relay;
use relay::{n, native, start_relay, wait_acknowledged, wait_native};

use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tandem_engine::AutomergeUrl;
use tandem_engine::automerge::{ROOT, transaction::Transactable};

/// Bound on each single wait (and on each samod-peer run).
const T: Duration = Duration::from_secs(20);
/// Bound on the build of samod-peer.
const BUILD: Duration = Duration::from_secs(20 * 60);

// ---- samod-peer ----------------------------------------------------------------

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// `<target dir>/samod-peer`: next to the target directory this test runs from.
fn samod_target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // <target>/<profile>/deps/samod_interop-<hash>
    exe.ancestors()
        .nth(3)
        .map(|target| target.join("samod-peer"))
        .unwrap_or_else(|| root().join("target/samod-peer"))
}

/// Build tests/samod-peer (once per test binary) and return its path.
fn samod_peer() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = &*built {
        return path.clone();
    }
    let manifest = root().join("tests/samod-peer/Cargo.toml");
    let target = samod_target_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let mut child = Command::new(&cargo)
        .args(["build", "--locked", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} to build samod-peer: {e}"));
    let (status, out, err) = wait_bounded(&mut child, BUILD);
    let status = status.unwrap_or_else(|| {
        panic!("building samod-peer took longer than {BUILD:?}; cargo's output:\n{out}\n{err}")
    });
    assert!(
        status.success(),
        "cannot build samod-peer ({status}) with `cargo build --locked --manifest-path {} --target-dir {}`:\n{out}\n{err}",
        manifest.display(),
        target.display()
    );
    eprintln!(
        "samod-peer built in {:.1} s (cargo build --locked --manifest-path {})",
        started.elapsed().as_secs_f64(),
        manifest.display()
    );
    let exe = target.join("debug/samod-peer");
    assert!(exe.is_file(), "the build did not produce {}", exe.display());
    *built = Some(exe.clone());
    exe
}

/// Wait for `child` at most `limit` (killing it then); its exit status (none
/// if it was killed), stdout and stderr.
fn wait_bounded(
    child: &mut std::process::Child,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = read(Box::new(child.stdout.take().expect("piped stdout")));
    let err = read(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status,
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

/// Run `samod-peer <relay> <args>` to completion (off the async threads);
/// its stdout, trimmed. Panics with its stderr if it fails.
async fn samod(relay: &str, args: &[&str]) -> String {
    let mut argv = vec![
        "--timeout".to_owned(),
        (T.as_secs() - 2).to_string(),
        relay.to_owned(),
    ];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let shown = argv.join(" ");
    tokio::task::spawn_blocking(move || {
        let exe = samod_peer();
        let mut child = Command::new(&exe)
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
        let (status, out, err) = wait_bounded(&mut child, T);
        match status {
            Some(s) if s.success() => out.trim().to_owned(),
            Some(s) => panic!("samod-peer {shown} failed ({s}):\n{out}{err}"),
            None => panic!("samod-peer {shown} did not finish within {T:?}:\n{out}{err}"),
        }
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

// ---- the relay and a native client -------------------------------------------

async fn bounded<F: Future>(limit: Duration, f: F) -> F::Output {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

// ---- the test ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samod_and_a_native_client_sync_both_ways_through_the_relay() {
    // Build first, outside the test's time bound (the build has its own).
    tokio::task::spawn_blocking(samod_peer).await.unwrap();
    bounded(Duration::from_secs(180), async {
        let relay = start_relay().await;
        let url = relay.url.clone();

        // samod -> relay -> native: a new document, acknowledged by the relay
        // before samod-peer exits, so only the relay can hand it on.
        let doc_url = samod(&url, &["create", "n", "1"]).await;
        let doc = doc_url
            .parse::<AutomergeUrl>()
            .unwrap_or_else(|e| panic!("samod made a URL Tandem cannot parse: {doc_url:?}: {e}"))
            .document;
        let client = native(&url, "native");
        client.request(doc).await.unwrap();
        wait_native(&client, doc, 1, T).await;

        // native -> relay -> samod: a fresh samod repo fetches the change.
        client.change(doc, |d| d.put(ROOT, "n", 2)).await.unwrap();
        wait_acknowledged(&client, doc, T).await;
        assert_eq!(samod(&url, &["get", &doc_url, "n"]).await, "2");

        // A samod peer that is connected and waiting gets the next native
        // change (fan-out, or the fetch if it connects after the change).
        let waiter = tokio::spawn({
            let (url, doc_url) = (url.clone(), doc_url.clone());
            async move { samod(&url, &["wait", &doc_url, "n", "3"]).await }
        });
        client.change(doc, |d| d.put(ROOT, "n", 3)).await.unwrap();
        wait_acknowledged(&client, doc, T).await;
        let seen = tokio::time::timeout(T, waiter)
            .await
            .expect("the waiting samod peer did not finish")
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert_eq!(seen, "3");

        // samod changes the existing document; the connected native client
        // receives it from the relay.
        assert_eq!(samod(&url, &["set", &doc_url, "n", "4"]).await, "4");
        wait_native(&client, doc, 4, T).await;
        assert!(client.acknowledged(doc).await.unwrap());

        client.shutdown().await.unwrap();
        let mut stored = relay.stop(T).await;
        assert_eq!(stored.view(&doc, n).unwrap(), Some(4));
    })
    .await;
}
