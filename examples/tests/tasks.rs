//! The `tasks` example as a user runs it: two instances with their own stores
//! share a list through a relay; one starts before the relay is up, the other
//! goes offline and edits; both converge.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tandem_engine::{PeerId, RedbStorage, Repo, RepoConfig, ServeOnRequest};
use tandem_relay::{RelayConfig, serve};

struct Instance {
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Instance {
    fn start(name: &'static str, store: &std::path::Path, relay: &str, list: Option<&str>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tasks"));
        command.arg("--store").arg(store).args(["--relay", relay]);
        if let Some(list) = list {
            command.args(["--list", list]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start tasks");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            name,
            child,
            stdin,
            lines,
        }
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Wait for a line matching `wanted`; return it.
    fn expect_line(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if wanted(&line) => return line,
                Ok(_) => {}
                Err(_) => panic!("{}: timed out waiting for {what}", self.name),
            }
        }
    }

    /// Send `command` every 300 ms until its output (the lines printed in
    /// that window) satisfies `wanted`.
    fn poll(&mut self, command: &str, what: &str, wanted: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        while Instant::now() < deadline {
            self.send(command);
            let window = Instant::now() + Duration::from_millis(300);
            let mut output = String::new();
            while let Ok(line) = self
                .lines
                .recv_timeout(window.saturating_duration_since(Instant::now()))
            {
                output.push_str(&line);
                output.push('\n');
            }
            if wanted(&output) {
                return;
            }
            last = output;
        }
        panic!(
            "{}: timed out waiting for {what}; last output:\n{last}",
            self.name
        );
    }

    fn quit(mut self) {
        self.send("quit");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status}", self.name);
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{} did not quit", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // A failed test leaves no process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A relay on `addr`, on its own runtime thread, until the sender is dropped.
fn relay(
    addr: std::net::SocketAddr,
    store: std::path::PathBuf,
) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready) = mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let repo = Repo::open(
                RedbStorage::open(store).unwrap(),
                RepoConfig::new(PeerId::new("relay")),
                ServeOnRequest,
            )
            .unwrap();
            ready_tx.send(()).unwrap();
            serve(listener, repo, RelayConfig::default(), async {
                let _ = stopped.await;
            })
            .await;
        });
    });
    ready
        .recv_timeout(Duration::from_secs(10))
        .expect("relay did not start");
    stop
}

#[test]
fn two_instances_share_a_list_and_converge_after_one_was_offline() {
    let dir = tempfile::tempdir().unwrap();
    // A free port, with nothing listening on it yet.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("ws://{addr}");

    // a starts with no relay running: it works against its own store.
    let mut a = Instance::start("a", &dir.path().join("a.redb"), &url, None);
    let header = a.expect_line("the list's URL", |l| l.starts_with("list automerge:"));
    let list = header.split_whitespace().nth(1).unwrap().to_owned();
    a.send("add milk");
    a.expect_line("the new task", |l| l.contains("1. [ ] milk"));
    a.poll("status", "a to be disconnected", |o| {
        o.contains("synced: no") && !o.contains("status: online")
    });

    // The relay comes up: a's retry loop connects and the relay stores milk.
    let stop = relay(addr, dir.path().join("relay.redb"));
    a.poll("status", "a to be synced", |o| o.contains("synced: yes"));

    let mut b = Instance::start("b", &dir.path().join("b.redb"), &url, Some(&list));
    b.poll("list", "b to fetch the list", |o| o.contains("[ ] milk"));

    // b goes offline and edits; a edits the same list meanwhile.
    b.send("offline");
    b.expect_line("b to go offline", |l| l.contains("connection: offline"));
    b.send("add eggs");
    b.expect_line("b's offline task", |l| l.contains("[ ] eggs"));
    a.send("add bread");
    a.expect_line("a's task", |l| l.contains("[ ] bread"));
    a.send("done 1");
    a.expect_line("milk done", |l| l.contains("[x] milk"));
    b.poll("list", "b to still be offline", |o| {
        o.contains("eggs") && !o.contains("bread") && o.contains("(offline)")
    });

    // b comes back: both have everything.
    b.send("online");
    let all = |o: &str| o.contains("[x] milk") && o.contains("[ ] eggs") && o.contains("[ ] bread");
    b.poll("list", "b to merge", all);
    a.poll("list", "a to merge", all);

    a.quit();
    b.quit();
    drop(stop);

    // Restarted on its own store with the relay gone, a opens the list it
    // has (no --list needed) with everything merged.
    let mut a = Instance::start("a", &dir.path().join("a.redb"), &url, None);
    a.expect_line("the same list", |l| l.starts_with(&format!("list {list}")));
    a.poll("list", "a's stored list", all);
    a.quit();
}
