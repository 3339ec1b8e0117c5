//! A minimal WebSocket driver for the sans-IO [`Repo`].
//!
//! One task owns the repo. Connection tasks (one reader and one writer per
//! socket) hand it frames over a channel; it calls `receive` for everything
//! that is ready, then `flush` once (group commit), then routes every
//! `poll_output` result: `Send` to the connection's writer, `Close` closes
//! the socket, events are recorded. The test reaches the repo with
//! [`Shim::run`], which is followed by the same flush and routing.
//!
//! Every frame in and out is decoded with [`Message::decode`] and kept in a
//! log that is printed when the shim is dropped (libtest shows it for failed
//! tests, or always with `--nocapture`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tandem_engine::automerge;
use tandem_engine::protocol::Message;
use tandem_engine::{ConnectionId, Direction, Event, Output, Repo, Storage};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

type RepoFn<S> = Box<dyn FnOnce(&mut Repo<S>) + Send>;

enum Cmd<S: Storage> {
    Opened {
        conn: ConnectionId,
        direction: Direction,
        out: mpsc::UnboundedSender<Out>,
    },
    Frame {
        conn: ConnectionId,
        bytes: Vec<u8>,
    },
    Closed {
        conn: ConnectionId,
    },
    Run(RepoFn<S>),
    Stop(oneshot::Sender<Repo<S>>),
}

enum Out {
    Frame(Vec<u8>),
    Close(Option<String>),
}

/// Every frame and event, decoded, in order.
#[derive(Clone, Debug)]
pub struct Log {
    start: Instant,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Log {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            lines: Arc::default(),
        }
    }

    fn push(&self, line: String) {
        let ms = self.start.elapsed().as_millis();
        self.lines
            .lock()
            .unwrap()
            .push(format!("[{ms:>6} ms] {line}"));
    }

    /// The log so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn frame(&self, conn: ConnectionId, arrow: &str, bytes: &[u8]) {
        self.push(format!("{conn} {arrow} {}", describe(bytes)));
    }
}

/// One line describing a frame: the decoded message, with the automerge sync
/// message inside `sync`/`request` summarised, or the decode error and the
/// raw bytes.
pub fn describe(bytes: &[u8]) -> String {
    let msg = match Message::decode(bytes) {
        Ok(m) => m,
        Err(e) => {
            return format!(
                "UNDECODABLE ({e}): {} bytes {}",
                bytes.len(),
                hex(&bytes[..bytes.len().min(256)])
            );
        }
    };
    match &msg {
        Message::Sync {
            sender_id,
            target_id,
            document_id,
            data,
        }
        | Message::Request {
            sender_id,
            target_id,
            document_id,
            data,
        } => {
            let inner = match automerge::sync::Message::decode(data) {
                Ok(s) => format!(
                    "{:?} heads={} need={} have={} changes={}",
                    s.version,
                    s.heads.len(),
                    s.need.len(),
                    s.have.len(),
                    s.changes.len()
                ),
                Err(e) => format!("UNDECODABLE automerge sync message: {e}"),
            };
            format!(
                "{} {sender_id}->{target_id} doc={document_id} data={}B [{inner}]",
                msg.type_name(),
                data.len()
            )
        }
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A running driver around one repo.
pub struct Shim<S: Storage + 'static> {
    cmds: mpsc::UnboundedSender<Cmd<S>>,
    next_conn: Arc<AtomicU64>,
    events: Arc<Mutex<Vec<Event>>>,
    log: Log,
    name: String,
}

impl<S: Storage + 'static> std::fmt::Debug for Shim<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shim").field("name", &self.name).finish()
    }
}

impl<S: Storage + 'static> Shim<S> {
    /// Start the driver task (needs a tokio runtime).
    pub fn start(name: &str, repo: Repo<S>) -> Self {
        let (cmds, rx) = mpsc::unbounded_channel();
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = Log::new();
        tokio::spawn(drive(repo, rx, events.clone(), log.clone()));
        Self {
            cmds,
            next_conn: Arc::new(AtomicU64::new(1)),
            events,
            log,
            name: name.to_owned(),
        }
    }

    /// Events the repo produced so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// Accept WebSocket connections on 127.0.0.1 (an ephemeral port) as
    /// `Direction::Incoming`; returns the `ws://` URL.
    pub async fn listen(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr: SocketAddr = listener.local_addr().unwrap();
        let cmds = self.cmds.clone();
        let next = self.next_conn.clone();
        let log = self.log.clone();
        tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let cmds = cmds.clone();
                let next = next.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    match tokio_tungstenite::accept_async(tcp).await {
                        Ok(ws) => {
                            let conn = ConnectionId(next.fetch_add(1, Ordering::Relaxed));
                            log.push(format!("{conn} accepted from {peer}"));
                            attach(ws, conn, Direction::Incoming, &cmds, &log);
                        }
                        Err(e) => log.push(format!("WebSocket handshake from {peer} failed: {e}")),
                    }
                });
            }
        });
        self.log
            .push(format!("{} listening on ws://{addr}", self.name));
        format!("ws://{addr}")
    }

    /// Open a WebSocket connection to `url` as `Direction::Outgoing` (the
    /// repo sends `join`).
    pub async fn connect(&self, url: &str) -> ConnectionId {
        let (ws, _response) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("{}: cannot connect to {url}: {e}", self.name));
        let conn = ConnectionId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        self.log.push(format!("{conn} connected to {url}"));
        attach(ws, conn, Direction::Outgoing, &self.cmds, &self.log);
        conn
    }

    /// Run `f` on the repo, then flush and route its outputs.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Repo<S>) -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Run(Box::new(move |repo| {
                let _ = tx.send(f(repo));
            })))
            .unwrap_or_else(|_| panic!("{}: the repo task is gone (it panicked?)", self.name));
        rx.await
            .unwrap_or_else(|_| panic!("{}: the repo task died running a closure", self.name))
    }

    /// Flush, stop the driver and hand the repo back (its sockets drop).
    pub async fn stop(self) -> Repo<S> {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmds.send(Cmd::Stop(tx));
        rx.await
            .unwrap_or_else(|_| panic!("{}: the repo task died before stopping", self.name))
    }

    /// Poll the repo every 25 ms until `f` returns `Ok`; after `timeout`,
    /// panic with `what` and the last `Err` (a description of what was seen).
    pub async fn wait_until<R: Send + 'static>(
        &self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&mut Repo<S>) -> Result<R, String> + Send + Sync + 'static,
    ) -> R {
        let f = Arc::new(f);
        let deadline = Instant::now() + timeout;
        loop {
            let g = f.clone();
            match self.run(move |repo| g(repo)).await {
                Ok(r) => return r,
                Err(seen) if Instant::now() >= deadline => panic!(
                    "{}: timed out after {timeout:?} waiting for {what}; last seen: {seen}\n\
                     frame log:\n{}",
                    self.name,
                    self.log.lines().join("\n")
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
    }

    /// Wait until an event matching `pick` has been produced.
    pub async fn wait_event<R>(
        &self,
        timeout: Duration,
        what: &str,
        pick: impl Fn(&Event) -> Option<R>,
    ) -> R {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.events.lock().unwrap().iter().find_map(&pick) {
                return r;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: timed out after {timeout:?} waiting for event: {what}\nframe log:\n{}",
                    self.name,
                    self.log.lines().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl<S: Storage + 'static> Drop for Shim<S> {
    fn drop(&mut self) {
        // Captured by libtest: shown for failing tests and with --nocapture.
        println!("---- {} frame log ----", self.name);
        for line in self.log.lines() {
            println!("{line}");
        }
    }
}

/// Spawn the reader and writer tasks of one socket and register it.
fn attach<S, T>(
    ws: WebSocketStream<T>,
    conn: ConnectionId,
    direction: Direction,
    cmds: &mpsc::UnboundedSender<Cmd<S>>,
    log: &Log,
) where
    S: Storage + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (out, mut out_rx) = mpsc::unbounded_channel();
    // Sent before the reader exists, so the repo hears of the connection first.
    let _ = cmds.send(Cmd::Opened {
        conn,
        direction,
        out,
    });
    let wlog = log.clone();
    tokio::spawn(async move {
        while let Some(o) = out_rx.recv().await {
            let result = match o {
                Out::Frame(bytes) => sink.send(WsMessage::Binary(bytes.into())).await,
                Out::Close(reason) => {
                    let frame = CloseFrame {
                        code: if reason.is_some() {
                            CloseCode::Policy
                        } else {
                            CloseCode::Normal
                        },
                        reason: reason.unwrap_or_default().into(),
                    };
                    let _ = sink.send(WsMessage::Close(Some(frame))).await;
                    break;
                }
            };
            if let Err(e) = result {
                wlog.push(format!("{conn} write failed: {e}"));
                break;
            }
        }
    });
    let cmds = cmds.clone();
    let rlog = log.clone();
    tokio::spawn(async move {
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(WsMessage::Binary(bytes)) => {
                    if cmds
                        .send(Cmd::Frame {
                            conn,
                            bytes: bytes.to_vec(),
                        })
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(WsMessage::Text(t)) => {
                    rlog.push(format!("{conn} <- TEXT frame (protocol wants binary): {t}"));
                }
                Ok(WsMessage::Close(frame)) => {
                    rlog.push(format!("{conn} <- close {frame:?}"));
                    break;
                }
                // tungstenite queues the pong itself and sends it on the next read.
                Ok(WsMessage::Ping(_)) => rlog.push(format!("{conn} <- ping")),
                Ok(_) => {}
                Err(e) => {
                    rlog.push(format!("{conn} read failed: {e}"));
                    break;
                }
            }
        }
        let _ = cmds.send(Cmd::Closed { conn });
    });
}

async fn drive<S: Storage + 'static>(
    mut repo: Repo<S>,
    mut rx: mpsc::UnboundedReceiver<Cmd<S>>,
    events: Arc<Mutex<Vec<Event>>>,
    log: Log,
) {
    let mut conns: HashMap<ConnectionId, mpsc::UnboundedSender<Out>> = HashMap::new();
    let mut stop = None;
    while let Some(first) = rx.recv().await {
        // Everything that is ready, then one flush (group commit).
        let mut next = Some(first);
        while let Some(cmd) = next {
            match cmd {
                Cmd::Opened {
                    conn,
                    direction,
                    out,
                } => {
                    conns.insert(conn, out);
                    repo.connect(conn, direction)
                        .unwrap_or_else(|e| panic!("connect {conn}: {e}"));
                }
                Cmd::Frame { conn, bytes } => {
                    log.frame(conn, "<-", &bytes);
                    if let Err(e) = repo.receive(now_ms(), conn, &bytes) {
                        // The repo already forgot a connection it closed.
                        log.push(format!("{conn} receive error: {e}"));
                    }
                }
                Cmd::Closed { conn } => {
                    log.push(format!("{conn} socket closed"));
                    conns.remove(&conn);
                    repo.disconnect(conn);
                }
                Cmd::Run(f) => f(&mut repo),
                Cmd::Stop(tx) => stop = Some(tx),
            }
            next = if stop.is_some() {
                None
            } else {
                rx.try_recv().ok()
            };
        }
        repo.flush().expect("flush failed");
        while let Some(output) = repo.poll_output() {
            match output {
                Output::Send { connection, frame } => {
                    log.frame(connection, "->", &frame);
                    match conns.get(&connection) {
                        Some(tx) => {
                            let _ = tx.send(Out::Frame(frame));
                        }
                        None => log.push(format!("{connection} gone; frame dropped")),
                    }
                }
                Output::Close { connection, reason } => {
                    log.push(format!("{connection} closing: {reason:?}"));
                    if let Some(tx) = conns.remove(&connection) {
                        let _ = tx.send(Out::Close(reason));
                    }
                }
                Output::Event(event) => {
                    if !matches!(event, Event::Committed(_)) {
                        log.push(format!("event {event:?}"));
                    }
                    events.lock().unwrap().push(event);
                }
            }
        }
        if let Some(tx) = stop.take() {
            log.push("repo task stopped".into());
            let _ = tx.send(repo);
            return;
        }
    }
}
