//! Shared by the socket tests: an engine client over a real WebSocket, and a
//! relay on 127.0.0.1 port 0.

#![allow(dead_code)] // each test file uses its own part

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tandem_engine::automerge::{ROOT, ReadDoc};
use tandem_engine::{
    ConnectionId, Direction, DocumentId, Event, MemoryStorage, Output, PeerId, RedbStorage, Repo,
    RepoConfig, ShareAll, SharePolicy,
};
use tandem_relay::{RelayConfig, serve};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Client {
    pub repo: Repo<MemoryStorage>,
    pub ws: Socket,
    /// Every event the client's repo emitted.
    pub events: Vec<Event>,
}

pub const CONN: ConnectionId = ConnectionId(1);

impl Client {
    pub async fn connect(request: impl IntoClientRequest + Unpin, name: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        Self::over(ws, name)
    }

    /// Connect over a socket with a small receive buffer (a reader whose
    /// kernel buffers fill quickly, for slow-reader tests).
    pub async fn connect_small_buffer(url: &str, name: &str) -> Self {
        let addr = url.trim_start_matches("ws://").parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (ws, _) =
            tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
                .await
                .unwrap();
        Self::over(ws, name)
    }

    fn over(ws: Socket, name: &str) -> Self {
        let mut repo = Repo::open(
            MemoryStorage::new(),
            RepoConfig::new(PeerId::new(name)),
            ShareAll,
        )
        .unwrap();
        repo.connect(CONN, Direction::Outgoing).unwrap();
        Self {
            repo,
            ws,
            events: Vec::new(),
        }
    }

    /// Drive the client until `done` holds, failing after 10 s.
    pub async fn until(
        &mut self,
        what: &str,
        mut done: impl FnMut(&mut Repo<MemoryStorage>) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.pump().await;
            if done(&mut self.repo) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.receive_for(Duration::from_millis(50)).await;
        }
    }

    /// Drive the client until its repo emits an event matching `wanted`.
    pub async fn until_event(&mut self, what: &str, wanted: impl Fn(&Event) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.pump().await;
            if self.events.iter().any(&wanted) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.receive_for(Duration::from_millis(50)).await;
        }
    }

    /// Drive the client for `time`, whatever happens.
    pub async fn run_for(&mut self, time: Duration) {
        let end = Instant::now() + time;
        while Instant::now() < end {
            self.pump().await;
            self.receive_for(Duration::from_millis(20)).await;
        }
        self.pump().await;
    }

    /// Flush and send what the repo has to send.
    async fn pump(&mut self) {
        self.repo.flush().unwrap();
        while let Some(out) = self.repo.poll_output() {
            match out {
                Output::Send { frame, .. } => {
                    self.ws.send(Ws::Binary(frame.into())).await.unwrap();
                }
                Output::Event(e) => self.events.push(e),
                Output::Close { .. } => {}
            }
        }
    }

    async fn receive_for(&mut self, time: Duration) {
        if let Ok(Some(Ok(Ws::Binary(b)))) = tokio::time::timeout(time, self.ws.next()).await {
            self.repo.receive(0, CONN, &b).unwrap();
        }
    }
}

/// The relay has acknowledged (stored) everything this client has of `doc`.
pub fn acked(repo: &mut Repo<MemoryStorage>, doc: &DocumentId) -> bool {
    let mut ours = repo.heads(doc).unwrap();
    ours.sort();
    repo.remote_heads(CONN, doc).is_some_and(|mut h| {
        h.sort();
        h == ours
    })
}

/// The document's root key `n`, if it has one.
pub fn value<S: tandem_engine::Storage>(repo: &mut Repo<S>, doc: &DocumentId) -> Option<i64> {
    repo.view(doc, |d| {
        d.get(ROOT, "n")
            .ok()
            .flatten()
            .and_then(|(v, _)| v.as_i64())
    })
    .ok()
    .flatten()
}

pub struct Relay {
    /// `ws://127.0.0.1:port`.
    pub url: String,
    pub stop: oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<Repo<RedbStorage>>,
}

impl Relay {
    /// Shut the relay down and take its repo back.
    pub async fn stop(self) -> Repo<RedbStorage> {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("relay did not shut down")
            .unwrap()
    }
}

pub async fn start(repo: Repo<RedbStorage>, config: RelayConfig) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, repo, config, async {
        let _ = stopped.await;
    }));
    Relay { url, stop, task }
}

pub fn server_repo(
    dir: &tempfile::TempDir,
    policy: impl SharePolicy + 'static,
) -> Repo<RedbStorage> {
    Repo::open(
        RedbStorage::open(dir.path().join("relay.redb")).unwrap(),
        RepoConfig::new(PeerId::new("relay")),
        policy,
    )
    .unwrap()
}

/// Poll `check` until it holds; fail with `what` after `secs` seconds.
pub async fn wait_until<F, Fut>(what: &str, secs: u64, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Start the `tandem` binary (`tandem serve` on 127.0.0.1 port 0, storing
/// in `data`, with `auth` flags); returns the child and the URL its banner
/// prints.
pub fn start_binary(data: &std::path::Path, auth: &[&str]) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(auth)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start tandem");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("ws://"))
        .unwrap_or_else(|| panic!("no URL in the banner {line:?}"))
        .to_owned();
    (child, url)
}
