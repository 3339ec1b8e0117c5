//! Child processes for the browser tests: the workspace root, and running a
//! command with a time limit that reports its output when it fails.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// Run `command` within `limit`, collecting its output; panic with the
/// output's tail if it fails or times out.
///
/// The child gets a private `TMPDIR`, removed when it ends: Chromium and
/// chromedriver leave a profile of about 90 MB in the temporary folder
/// whenever they are stopped rather than quit, and a machine running the
/// suite often would otherwise fill its disk.
pub fn run_limited(mut command: Command, what: &str, limit: Duration) -> String {
    let scratch = tempfile::Builder::new()
        .prefix("tandem-test-tmp-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot make a temporary folder for {what}: {e}"));
    let mut child = command
        .env("TMPDIR", scratch.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    let tail = |s: &str| {
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    };
    match status {
        Some(s) if s.success() => {
            eprintln!("{what} took {:.0?}", started.elapsed());
            format!("{stdout}\n{stderr}")
        }
        Some(s) => panic!(
            "{what} failed ({s}) after {:.0?}.\n--- stdout\n{}\n--- stderr\n{}",
            started.elapsed(),
            tail(&stdout),
            tail(&stderr)
        ),
        None => panic!(
            "{what} did not finish within {limit:?}.\n--- stdout\n{}\n--- stderr\n{}",
            tail(&stdout),
            tail(&stderr)
        ),
    }
}

/// `root/<rel>` (a folder with a package.json), with playwright-core
/// installed by `npm ci` if it is missing.
pub fn with_playwright(rel: &str) -> PathBuf {
    let dir = root().join(rel);
    if !dir
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        let mut npm = Command::new("npm");
        npm.args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir);
        run_limited(npm, &format!("npm ci in {rel}"), Duration::from_secs(300));
    }
    dir
}

/// Run `wasm/build.sh args` within `limit`.
pub fn build_sh(args: &[&str], limit: Duration) -> String {
    let mut command = Command::new("bash");
    command
        .arg(root().join("wasm/build.sh"))
        .args(args)
        .current_dir(root())
        // The outer `cargo test` may set these for itself; the wasm build
        // chooses its own compiler and target dir.
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    let what = format!("wasm/build.sh {}", args.join(" "));
    run_limited(command, what.trim_end(), limit)
}
