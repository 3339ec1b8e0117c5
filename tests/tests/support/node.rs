//! A Node child process speaking the line protocol of `tests/js/interop-common.mjs`:
//! JSON commands on its stdin, JSON replies and events on its stdout.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The versions `tests/js/package.json` pins.
pub const PINNED: [(&str, &str); 4] = [
    ("automerge", "3.5.0"),
    ("automerge-repo", "2.5.6"),
    ("automerge-repo-network-websocket", "2.5.6"),
    ("ws", "8.23.0"),
];

/// `tests/js`.
pub fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// Fail loudly (never skip) when Node or the npm packages are missing.
pub fn require_node() {
    match Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`node --version` failed ({}): {}. The JS interop tests need Node 20 on PATH.",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "cannot run `node` ({e}). The JS interop tests need Node 20 on PATH \
             (then run `npm ci` in tests/js)."
        ),
    }
    install_packages();
}

/// Install the pinned npm packages (`npm ci`) once per test binary if they
/// are missing, so `cargo test --workspace` works on a fresh machine. A
/// failed install fails the test with npm's output.
fn install_packages() {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let marker = js_dir().join("node_modules/@automerge/automerge-repo-network-websocket");
    if marker.is_dir() {
        return;
    }
    eprintln!(
        "installing the npm packages in {} (npm ci)",
        js_dir().display()
    );
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(js_dir())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `npm ci` in {}: {e}", js_dir().display()));
    assert!(
        out.status.success() && marker.is_dir(),
        "`npm ci` in {} failed ({}):\n{}\n{}",
        js_dir().display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running Node script. Killed when dropped.
#[derive(Debug)]
pub struct Node {
    name: String,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
    /// Event lines (`{"event": ...}`) seen so far.
    events: Vec<Value>,
    next_id: u64,
}

impl Node {
    /// Start `node <script> <args...>` in `tests/js`.
    pub fn spawn(name: &str, script: &str, args: &[&str]) -> Self {
        require_node();
        let mut child = Command::new("node")
            .arg(script)
            .args(args)
            .current_dir(js_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start node {script}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            name: name.to_owned(),
            child,
            stdin,
            lines,
            events: Vec::new(),
            next_id: 1,
        }
    }

    async fn next_line(&mut self, deadline: Instant, waiting_for: &str) -> Value {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match tokio::time::timeout(left, self.lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => {
                let status = self.child.wait().ok();
                panic!(
                    "{}: node exited ({status:?}) while waiting for {waiting_for} \
                     (its stderr is above)",
                    self.name
                )
            }
            Err(_) => panic!(
                "{}: no answer from node within the time limit while waiting for {waiting_for}",
                self.name
            ),
        };
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{}: non-JSON line on stdout ({e}): {line}", self.name))
    }

    /// Event lines seen so far (while waiting for replies or events).
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// Wait for an event line matching `pick` (events seen earlier count).
    pub async fn wait_event(
        &mut self,
        timeout: Duration,
        what: &str,
        pick: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(e) = self.events.iter().find(|e| pick(e)) {
            return e.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.next_line(deadline, what).await;
            if v.get("event").is_some() {
                assert_ne!(v["event"], "fatal", "{}: {v}", self.name);
                self.events.push(v.clone());
                if pick(&v) {
                    return v;
                }
            } else {
                panic!(
                    "{}: unexpected reply {v} while waiting for {what}",
                    self.name
                );
            }
        }
    }

    /// Send a command and wait for its reply; panics on `ok: false`.
    pub async fn call(&mut self, cmd: Value, timeout: Duration) -> Value {
        let shown = cmd.to_string();
        let v = self.call_raw(cmd, timeout).await;
        assert_eq!(
            v["ok"],
            json!(true),
            "{}: command {shown} failed in node: {}",
            self.name,
            v["error"].as_str().unwrap_or("(no error text)")
        );
        v
    }

    /// Send a command and wait for its reply, whether `ok` or not.
    pub async fn call_raw(&mut self, mut cmd: Value, timeout: Duration) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = json!(id);
        let what = format!("the reply to {cmd}");
        writeln!(self.stdin, "{cmd}")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("{}: cannot write to node: {e}", self.name));
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.next_line(deadline, &what).await;
            if v.get("event").is_some() {
                assert_ne!(v["event"], "fatal", "{}: {v}", self.name);
                self.events.push(v);
                continue;
            }
            assert_eq!(v["id"], json!(id), "{}: reply out of order: {v}", self.name);
            return v;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Check the `versions` object a script reports against [`PINNED`].
pub fn check_versions(started: &Value) {
    for (pkg, want) in PINNED {
        assert_eq!(
            started["versions"][pkg].as_str(),
            Some(want),
            "installed {pkg} differs from the pinned version: run `npm ci` in tests/js ({started})"
        );
    }
    let node = started["versions"]["node"].as_str().unwrap_or("");
    let major: u32 = node
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 20,
        "Node {node} is too old; the JS packages need Node 20+"
    );
}
