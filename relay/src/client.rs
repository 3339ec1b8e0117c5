//! The native client: a [`Repo`] driven over a WebSocket to a relay, for
//! desktop apps and services.
//!
//! ```text
//! app ──> Client::change / view / request ──> command queue ─┐
//!                                                            v
//!               client task (owns the Repo): handle every ready command and
//!               frame, then flush once (one durable commit), then route:
//!   socket writer <── Send / Close        events ──> broadcast (ClientEvent)
//! ```
//!
//! * **Offline first.** Edits are committed to the local store whether or
//!   not the relay is reachable: [`Client::change`] returns once its change
//!   is durable locally, and it reaches the relay as soon as a connection is
//!   up. [`Client::acknowledged`] says when the relay has stored it.
//! * **Reconnects by itself.** A failed connect or a dropped connection is
//!   retried with exponential backoff and random jitter (bounded by
//!   [`ClientConfig::backoff_max`]), until [`Client::offline`] or
//!   [`Client::shutdown`].
//! * **Resumes.** The engine persists, per document, what the relay's store
//!   is known to have (the sync state with the relay's storage id), so a
//!   reconnect, even after a restart of the program, exchanges only what is
//!   missing, not whole documents. [`Client::stats`] counts the bytes.
//! * **Re-offers.** Every document touched this session (created, changed,
//!   requested, received) is offered to the relay on every reconnect, as the
//!   repo's share policy announces it: open the repo with
//!   [`tandem_engine::ShareAll`]. After a restart, call [`Client::request`]
//!   for the documents the program works on, which re-offers stored ones.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tandem_engine::automerge::{ROOT, transaction::Transactable};
//! use tandem_engine::{PeerId, RedbStorage, Repo, RepoConfig, ShareAll};
//! use tandem_relay::{Client, ClientConfig};
//!
//! let repo = Repo::open(RedbStorage::open("app.redb")?, RepoConfig::new(PeerId::random("app")), ShareAll)?;
//! let config = ClientConfig { token: Some("…".into()), ..ClientConfig::default() };
//! let client = Client::start(repo, "ws://127.0.0.1:3030", config)?;
//! let doc = client.create().await?;
//! client.change(doc, |d| d.put(ROOT, "title", "hello")).await?; // durable locally
//! let mut events = client.subscribe();
//! while !client.acknowledged(doc).await? {
//!     let _ = events.recv().await; // stored at the relay once this is true
//! }
//! client.shutdown().await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tandem_engine::automerge::{AutoCommit, Automerge, AutomergeError, ChangeHash};
use tandem_engine::protocol::coalesce_sync_frames;
use tandem_engine::rows::Rows;
use tandem_engine::{
    ConnectionId, Direction, DocumentId, Event, FeedEvent, Output, Repo, RepoError, RowError,
    Storage,
};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::server::now_ms;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Bytes of received frames handled before each flush at most, beside
/// [`ClientConfig::max_batch`] steps (as the relay bounds its own).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// How the client connects and retries.
#[derive(Clone)]
pub struct ClientConfig {
    /// Access token for a relay that requires one (`tandem token`); sent as
    /// `?token=` in the URL.
    pub token: Option<String>,
    /// Wait after the first failure (before jitter).
    pub backoff_min: Duration,
    /// Longest wait between attempts (before jitter, which only shortens it).
    pub backoff_max: Duration,
    /// Longest a connect (TCP and WebSocket upgrade) may take.
    pub connect_timeout: Duration,
    /// Send a WebSocket ping this often while connected; a connection that
    /// has been silent for two intervals is dropped (and retried). `None`
    /// turns keep-alive off.
    pub ping_interval: Option<Duration>,
    /// Connect at start (`false`: start offline until [`Client::online`]).
    pub start_online: bool,
    /// Inputs handled before each flush at most.
    pub max_batch: usize,
    /// Largest WebSocket message accepted, in bytes.
    pub max_message_size: usize,
    /// Capacity of the event channel; slower subscribers miss events
    /// (`RecvError::Lagged`).
    pub event_capacity: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            token: None,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            ping_interval: Some(Duration::from_secs(20)),
            start_online: true,
            max_batch: 256,
            max_message_size: 16 << 20,
            event_capacity: 1024,
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("connect_timeout", &self.connect_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("start_online", &self.start_online)
            .field("max_batch", &self.max_batch)
            .field("max_message_size", &self.max_message_size)
            .field("event_capacity", &self.event_capacity)
            .finish()
    }
}

/// Where the connection to the relay stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not connected and not trying: [`Client::offline`] was called (or the
    /// client started offline, or shut down).
    Offline,
    /// Connecting, or connected and waiting for the relay's handshake.
    Connecting {
        /// 1 for the first attempt after being online, counting failures.
        attempt: u32,
    },
    /// Connected: the handshake completed and documents sync.
    Online,
    /// The last attempt failed or the connection dropped; retrying later.
    Waiting {
        /// Consecutive failures so far.
        failures: u32,
        /// The wait before the next attempt (backoff with jitter).
        retry_in: Duration,
        /// What went wrong.
        error: String,
    },
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Offline => f.write_str("offline"),
            Self::Connecting { attempt } => write!(f, "connecting (attempt {attempt})"),
            Self::Online => f.write_str("online"),
            Self::Waiting {
                failures,
                retry_in,
                error,
            } => write!(
                f,
                "disconnected ({error}); retry {failures} in {:.1}s",
                retry_in.as_secs_f64()
            ),
        }
    }
}

/// What the client tells subscribers ([`Client::subscribe`]).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The connection state changed.
    State(ConnectionState),
    /// A commit is durable in the local store: a local edit
    /// ([`tandem_engine::Origin::Local`]) or changes from the relay
    /// ([`tandem_engine::Origin::Remote`]).
    Committed(FeedEvent),
    /// The relay does not have a document we requested (or may not share it).
    Unavailable(DocumentId),
}

/// Counters since the client started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Connect attempts.
    pub attempts: u64,
    /// Connections whose handshake completed.
    pub connections: u64,
    /// WebSocket messages written to the socket.
    pub frames_sent: u64,
    /// Payload bytes written to the socket.
    pub bytes_sent: u64,
    /// WebSocket data messages read from the socket.
    pub frames_received: u64,
    /// Payload bytes read from the socket.
    pub bytes_received: u64,
    /// Sync frames merged into the one before them (the client had fallen
    /// behind, and handled a document's queued changes in one apply).
    pub frames_merged: u64,
}

#[derive(Default)]
struct Counters {
    attempts: AtomicU64,
    connections: AtomicU64,
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
    frames_merged: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ClientStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ClientStats {
            attempts: get(&self.attempts),
            connections: get(&self.connections),
            frames_sent: get(&self.frames_sent),
            bytes_sent: get(&self.bytes_sent),
            frames_received: get(&self.frames_received),
            bytes_received: get(&self.bytes_received),
            frames_merged: get(&self.frames_merged),
        }
    }
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The repo refused (unknown document, automerge error, quarantine...).
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The change was applied but the local flush failed, so it was dropped:
    /// nothing of it was acknowledged.
    #[error("the local store could not commit: {0}")]
    Flush(String),
    /// The relay URL is not a WebSocket URL.
    #[error("invalid relay URL {url:?}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A table operation was refused (see [`RowError`]).
    #[error(transparent)]
    Rows(RowError),
    /// The client task has shut down.
    #[error("the client has shut down")]
    Closed,
}

type AfterFlush = Box<dyn FnOnce(Result<(), String>) + Send>;

/// What a job sees besides the repo.
struct JobCtx {
    /// The connection to the relay, once its handshake completed.
    connection: Option<ConnectionId>,
    /// Called with the result of the flush that ends this batch.
    after_flush: Vec<AfterFlush>,
}

type Job<S> = Box<dyn FnOnce(&mut Rows<S>, &mut JobCtx) + Send>;

enum Command<S: Storage> {
    Run(Job<S>),
    Online(bool),
    SetToken(Option<String>),
    Shutdown(oneshot::Sender<Repo<S>>),
}

struct Shared {
    counters: Counters,
    events: broadcast::Sender<ClientEvent>,
    state: watch::Sender<ConnectionState>,
}

/// A running client: a cheap, cloneable handle to the task that owns the
/// repo. The task ends (flushing, and closing the connection) on
/// [`shutdown`](Self::shutdown) or when every handle is dropped.
pub struct Client<S: Storage> {
    commands: mpsc::Sender<Command<S>>,
    shared: Arc<Shared>,
}

impl<S: Storage> Clone for Client<S> {
    fn clone(&self) -> Self {
        Self {
            commands: self.commands.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: Storage> fmt::Debug for Client<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("state", &*self.shared.state.borrow())
            .field("stats", &self.shared.counters.snapshot())
            .finish()
    }
}

impl<S: Storage + 'static> Client<S> {
    /// Start the client task (on the current tokio runtime) over `repo`,
    /// syncing with the relay at `url` (`ws://host:port[/path]`). Open the
    /// repo with [`tandem_engine::ShareAll`] so its documents are offered to
    /// the relay.
    pub fn start(
        repo: Repo<S>,
        url: impl Into<String>,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        Self::start_rows(Rows::with_system_clock(repo), url, config)
    }

    /// [`start`](Self::start) with a row store (its table schemas declared),
    /// for [`rows`](Self::rows) and [`sync_table`](Self::sync_table).
    pub fn start_rows(
        rows: Rows<S>,
        url: impl Into<String>,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        let url = url.into();
        if let Err(e) = url.as_str().into_client_request() {
            return Err(ClientError::Url {
                url,
                reason: e.to_string(),
            });
        }
        let (commands, rx) = mpsc::channel(1024);
        let (events, _) = broadcast::channel(config.event_capacity.max(1));
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            events,
            state: watch::Sender::new(ConnectionState::Offline),
        });
        let driver = Driver {
            rows,
            url,
            want_online: config.start_online,
            config,
            shared: shared.clone(),
            link: Link::Idle,
            retry_at: None,
            failures: 0,
            next_connection: 0,
            ctx: JobCtx {
                connection: None,
                after_flush: Vec::new(),
            },
            closing: Vec::new(),
            inbox: Vec::new(),
        };
        tokio::spawn(driver.run(rx));
        Ok(Self { commands, shared })
    }

    async fn command(&self, command: Command<S>) -> Result<(), ClientError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Run `f` on the repo inside the client task and return its result.
    /// Changes made here become durable at the flush that ends the task's
    /// current batch (prefer [`change`](Self::change), which waits for it).
    pub async fn with_repo<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Repo<S>) -> R + Send + 'static,
    ) -> Result<R, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Run(Box::new(move |rows, _| {
            let _ = tx.send(f(rows.repo_mut()));
        })))
        .await?;
        rx.await.map_err(|_| ClientError::Closed)
    }

    /// Work with the client's tables (see [`Rows`]) inside the client task,
    /// and return once what `f` changed is durable in the local store. It is
    /// sent to the relay when connected.
    pub async fn rows<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Rows<S>) -> Result<R, RowError> + Send + 'static,
    ) -> Result<R, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Run(Box::new(move |rows, ctx| match f(rows) {
            Ok(r) => ctx.after_flush.push(Box::new(move |flushed| {
                let _ = tx.send(flushed.map(|()| r).map_err(ClientError::Flush));
            })),
            Err(e) => {
                let _ = tx.send(Err(ClientError::Rows(e)));
            }
        })))
        .await?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Keep a table in sync: ask the relay for its catalogs now and on every
    /// reconnect, and fetch every row they list as they arrive, including
    /// rows other replicas add later.
    pub async fn sync_table(&self, table: &str) -> Result<(), ClientError> {
        let table = table.to_owned();
        self.rows(move |rows| {
            rows.subscribe(&table)?;
            rows.discover(&table)
        })
        .await
        .map(|_| ())
    }

    /// Edit a document (see [`Repo::change`]) and return once the change is
    /// durable in the local store. It is sent to the relay when connected.
    pub async fn change<R: Send + 'static>(
        &self,
        doc: DocumentId,
        f: impl FnOnce(&mut AutoCommit) -> Result<R, AutomergeError> + Send + 'static,
    ) -> Result<R, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Run(Box::new(move |rows, ctx| {
            match rows.repo_mut().change(&doc, f) {
                Ok(r) => ctx.after_flush.push(Box::new(move |flushed| {
                    let _ = tx.send(flushed.map(|()| r).map_err(ClientError::Flush));
                })),
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                }
            }
        })))
        .await?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Read a document (see [`Repo::view`]).
    pub async fn view<R: Send + 'static>(
        &self,
        doc: DocumentId,
        f: impl FnOnce(&Automerge) -> R + Send + 'static,
    ) -> Result<R, ClientError> {
        self.with_repo(move |repo| repo.view(&doc, f))
            .await?
            .map_err(Into::into)
    }

    /// The document's heads here.
    pub async fn heads(&self, doc: DocumentId) -> Result<Vec<ChangeHash>, ClientError> {
        self.with_repo(move |repo| repo.heads(&doc))
            .await?
            .map_err(Into::into)
    }

    /// Create an empty document (stored at its first change).
    pub async fn create(&self) -> Result<DocumentId, ClientError> {
        self.with_repo(|repo| repo.create())
            .await?
            .map_err(Into::into)
    }

    /// Open a document: a stored one is offered to the relay (now and on
    /// every reconnect); one not stored here is asked of the relay, and a
    /// [`ClientEvent::Committed`] follows when it arrives (or
    /// [`ClientEvent::Unavailable`]). Until then it is an empty placeholder.
    pub async fn request(&self, doc: DocumentId) -> Result<(), ClientError> {
        self.with_repo(move |repo| repo.request(doc))
            .await?
            .map_err(Into::into)
    }

    /// Whether the relay has stored every change this client has of `doc`:
    /// the heads the relay advertised on the current connection include ours.
    /// `false` while not connected.
    pub async fn acknowledged(&self, doc: DocumentId) -> Result<bool, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Run(Box::new(move |rows, ctx| {
            let result = (|| {
                let Some(conn) = ctx.connection else {
                    return Ok(false);
                };
                Ok(rows.repo_mut().is_acknowledged(conn, &doc)?)
            })();
            let _ = tx.send(result);
        })))
        .await?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Events from now on: connection state changes and commits.
    pub fn subscribe(&self) -> broadcast::Receiver<ClientEvent> {
        self.shared.events.subscribe()
    }

    /// The connection state now.
    pub fn state(&self) -> ConnectionState {
        self.shared.state.borrow().clone()
    }

    /// The connection state as a watch channel.
    pub fn watch_state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.subscribe()
    }

    /// Counters since start.
    pub fn stats(&self) -> ClientStats {
        self.shared.counters.snapshot()
    }

    /// Disconnect (with a `leave`) and stop retrying; edits keep being
    /// committed locally.
    pub async fn offline(&self) -> Result<(), ClientError> {
        self.command(Command::Online(false)).await
    }

    /// Connect now (backoff reset) and keep reconnecting.
    pub async fn online(&self) -> Result<(), ClientError> {
        self.command(Command::Online(true)).await
    }

    /// Use another token from the next connect on (the current connection,
    /// if any, stays up).
    pub async fn set_token(&self, token: Option<String>) -> Result<(), ClientError> {
        self.command(Command::SetToken(token)).await
    }

    /// Flush, close the connection with a `leave`, stop the task and return
    /// the repo. Other handles get [`ClientError::Closed`] from then on.
    pub async fn shutdown(self) -> Result<Repo<S>, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Shutdown(tx)).await?;
        rx.await.map_err(|_| ClientError::Closed)
    }
}

/// `url` with `token=` added to its query.
fn with_token(url: &str, token: Option<&str>) -> String {
    let Some(token) = token else {
        return url.to_owned();
    };
    let mut encoded = String::with_capacity(token.len());
    for b in token.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    // `ws://host:port` has an empty path; the request line needs `/`.
    let mut url = url.to_owned();
    let authority = url.find("://").map_or(0, |i| i + 3);
    let path = url[authority..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| authority + i);
    if !url[path..].starts_with('/') {
        url.insert(path, '/');
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}token={encoded}")
}

/// The wait before retry number `failures` (1-based): exponential from `min`,
/// capped at `max`, then "equal jitter" (uniform in the upper half), so
/// clients that lost the relay together do not return together.
fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = min
        .saturating_mul(1 << exp)
        .min(max)
        .max(Duration::from_millis(1));
    let half = base / 2;
    half + base.mul_f64(rand::random_range(0.0..=0.5))
}

type Connecting = Pin<Box<dyn Future<Output = Result<Box<Socket>, String>> + Send>>;

struct Up {
    connection: ConnectionId,
    reader: SplitStream<Socket>,
    writer: mpsc::UnboundedSender<WsMessage>,
    writer_task: JoinHandle<()>,
    last_heard: Instant,
    ping_at: Option<Instant>,
}

enum Link {
    /// No socket: waiting for `retry_at`, or offline.
    Idle,
    Connecting(Connecting),
    Up(Box<Up>),
}

enum LinkEvent {
    Retry,
    Connected(Result<Box<Socket>, String>),
    Message(Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>),
    Ping,
}

impl Link {
    async fn next(&mut self, retry_at: Option<Instant>) -> LinkEvent {
        match self {
            Link::Idle => match retry_at {
                Some(at) => {
                    tokio::time::sleep_until(at).await;
                    LinkEvent::Retry
                }
                None => std::future::pending().await,
            },
            Link::Connecting(fut) => LinkEvent::Connected(fut.as_mut().await),
            Link::Up(up) => {
                let ping = async {
                    match up.ping_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    m = up.reader.next() => LinkEvent::Message(m),
                    () = ping => LinkEvent::Ping,
                }
            }
        }
    }

    /// A frame already received, without waiting.
    fn ready(&mut self) -> Option<LinkEvent> {
        match self {
            Link::Up(up) => up.reader.next().now_or_never().map(LinkEvent::Message),
            _ => None,
        }
    }
}

enum Step<S: Storage> {
    Command(Command<S>),
    Link(LinkEvent),
    /// Every handle is gone.
    Abandoned,
}

struct Driver<S: Storage> {
    rows: Rows<S>,
    url: String,
    config: ClientConfig,
    shared: Arc<Shared>,
    link: Link,
    want_online: bool,
    retry_at: Option<Instant>,
    failures: u32,
    next_connection: u64,
    ctx: JobCtx,
    /// Writers finishing their queue and close frame.
    closing: Vec<JoinHandle<()>>,
    /// Frames read in this batch, not yet handed to the repo.
    inbox: Vec<Vec<u8>>,
}

impl<S: Storage + 'static> Driver<S> {
    async fn run(mut self, mut rx: mpsc::Receiver<Command<S>>) {
        if self.want_online {
            self.retry_at = Some(Instant::now());
        }
        loop {
            let first = tokio::select! {
                c = rx.recv() => c.map_or(Step::Abandoned, Step::Command),
                e = self.link.next(self.retry_at) => Step::Link(e),
            };
            let mut next = Some(first);
            let mut handled = 0;
            while let Some(step) = next.take() {
                handled += 1;
                match step {
                    Step::Command(Command::Shutdown(reply)) => {
                        let repo = self.shutdown().await;
                        let _ = reply.send(repo);
                        return;
                    }
                    Step::Abandoned => {
                        self.shutdown().await;
                        return;
                    }
                    Step::Command(c) => {
                        // A job sees everything received before it.
                        self.receive_inbox();
                        self.command(c);
                    }
                    Step::Link(e) => self.link_event(e),
                }
                // Frames are counted and weighed: a relay's batch frame
                // carries hundreds of documents.
                let inbox_bytes: usize = self.inbox.iter().map(Vec::len).sum();
                if handled < self.config.max_batch && inbox_bytes < MAX_BATCH_BYTES {
                    next = match rx.try_recv() {
                        Ok(c) => Some(Step::Command(c)),
                        Err(_) => self.link.ready().map(Step::Link),
                    };
                }
            }
            self.receive_inbox();
            self.flush();
            self.route();
            self.closing.retain(|t| !t.is_finished());
        }
    }

    fn command(&mut self, command: Command<S>) {
        match command {
            Command::Run(job) => job(&mut self.rows, &mut self.ctx),
            Command::Online(true) => {
                if !self.want_online {
                    self.want_online = true;
                    self.failures = 0;
                    if matches!(self.link, Link::Idle) {
                        self.start_connect();
                    }
                }
            }
            Command::Online(false) => {
                self.want_online = false;
                self.retry_at = None;
                match &self.link {
                    // The leave frame and the close go out through `route`.
                    Link::Up(up) => self.rows.repo_mut().close(up.connection),
                    Link::Connecting(_) => self.link = Link::Idle,
                    Link::Idle => {}
                }
                self.set_state(ConnectionState::Offline);
            }
            Command::SetToken(token) => self.config.token = token,
            Command::Shutdown(_) => unreachable!("handled by run"),
        }
    }

    fn start_connect(&mut self) {
        self.retry_at = None;
        Counters::add(&self.shared.counters.attempts, 1);
        self.set_state(ConnectionState::Connecting {
            attempt: self.failures + 1,
        });
        let url = with_token(&self.url, self.config.token.as_deref());
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(self.config.max_message_size))
            .max_frame_size(Some(self.config.max_message_size));
        let timeout = self.config.connect_timeout;
        self.link = Link::Connecting(Box::pin(async move {
            let connect = tokio_tungstenite::connect_async_with_config(url, Some(ws_config), true);
            match tokio::time::timeout(timeout, connect).await {
                Ok(Ok((ws, _))) => Ok(Box::new(ws)),
                Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                    let body = response
                        .body()
                        .as_deref()
                        .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                        .unwrap_or_default();
                    Err(format!("HTTP {} {body}", response.status())
                        .trim()
                        .to_owned())
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("connect timed out".to_owned()),
            }
        }));
    }

    fn link_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Retry => {
                if self.want_online && matches!(self.link, Link::Idle) {
                    self.start_connect();
                } else {
                    self.retry_at = None;
                }
            }
            LinkEvent::Connected(Ok(ws)) => {
                self.next_connection += 1;
                let connection = ConnectionId(self.next_connection);
                let (sink, reader) = (*ws).split();
                let (writer, queue) = mpsc::unbounded_channel();
                let writer_task = tokio::spawn(write_loop(sink, queue, self.shared.clone()));
                let now = Instant::now();
                self.link = Link::Up(Box::new(Up {
                    connection,
                    reader,
                    writer,
                    writer_task,
                    last_heard: now,
                    ping_at: self.config.ping_interval.map(|i| now + i),
                }));
                if let Err(e) = self
                    .rows
                    .repo_mut()
                    .connect(connection, Direction::Outgoing)
                {
                    tracing::error!(error = %e, "cannot register the connection");
                    self.drop_link(e.to_string());
                }
            }
            LinkEvent::Connected(Err(error)) => {
                tracing::debug!(url = %self.url, %error, "connect failed");
                self.link = Link::Idle;
                self.schedule_retry(error);
            }
            LinkEvent::Message(message) => self.message(message),
            LinkEvent::Ping => {
                let (Link::Up(up), Some(interval)) = (&mut self.link, self.config.ping_interval)
                else {
                    return;
                };
                let now = Instant::now();
                if now.duration_since(up.last_heard) >= interval * 2 {
                    tracing::info!("relay silent for two ping intervals; reconnecting");
                    self.drop_link("relay not responding".into());
                } else {
                    let _ = up.writer.send(WsMessage::Ping(Default::default()));
                    up.ping_at = Some(now + interval);
                }
            }
        }
    }

    fn message(
        &mut self,
        message: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
    ) {
        let Link::Up(up) = &mut self.link else {
            return;
        };
        up.last_heard = Instant::now();
        let bytes = match message {
            Some(Ok(WsMessage::Binary(b))) => b.to_vec(),
            // Text is not part of the protocol: the repo answers with an
            // error frame and a close.
            Some(Ok(WsMessage::Text(t))) => t.as_bytes().to_vec(),
            Some(Ok(WsMessage::Close(frame))) => {
                let reason = frame.map_or_else(
                    || "closed by the relay".to_owned(),
                    |f| format!("closed by the relay: {} {}", f.code, f.reason),
                );
                return self.drop_link(reason);
            }
            Some(Ok(_)) => return, // ping, pong
            Some(Err(e)) => return self.drop_link(e.to_string()),
            None => return self.drop_link("connection lost".into()),
        };
        let counters = &self.shared.counters;
        Counters::add(&counters.frames_received, 1);
        Counters::add(&counters.bytes_received, bytes.len() as u64);
        self.inbox.push(bytes);
    }

    /// Hand the repo the frames read so far, each run of sync frames about
    /// one document merged into one (`coalesce_sync_frames`): a client that
    /// fell behind catches up with one automerge apply per document rather
    /// than one per frame.
    fn receive_inbox(&mut self) {
        if self.inbox.is_empty() {
            return;
        }
        let mut frames = std::mem::take(&mut self.inbox);
        let Link::Up(up) = &self.link else {
            return;
        };
        let connection = up.connection;
        let merged = coalesce_sync_frames(&mut frames);
        Counters::add(&self.shared.counters.frames_merged, merged as u64);
        for bytes in frames {
            if let Err(e) = self.rows.repo_mut().receive(now_ms(), connection, &bytes) {
                tracing::warn!(error = %e, "frame not handled");
            }
        }
    }

    /// The socket is gone (or being closed by us): forget it, retry later.
    fn drop_link(&mut self, reason: String) {
        // What arrived before the socket went is handled first.
        self.receive_inbox();
        if let Link::Up(up) = std::mem::replace(&mut self.link, Link::Idle) {
            self.rows.repo_mut().disconnect(up.connection);
            let _ = up.writer.send(WsMessage::Close(None));
            self.closing.push(up.writer_task);
        }
        self.ctx.connection = None;
        self.schedule_retry(reason);
    }

    fn schedule_retry(&mut self, error: String) {
        if !self.want_online {
            self.retry_at = None;
            self.set_state(ConnectionState::Offline);
            return;
        }
        self.failures = self.failures.saturating_add(1);
        let wait = backoff(
            self.failures,
            self.config.backoff_min,
            self.config.backoff_max,
        );
        self.retry_at = Some(Instant::now() + wait);
        self.set_state(ConnectionState::Waiting {
            failures: self.failures,
            retry_in: wait,
            error,
        });
    }

    fn set_state(&self, state: ConnectionState) {
        let changed = self.shared.state.send_if_modified(|s| {
            let changed = *s != state;
            *s = state.clone();
            changed
        });
        if changed {
            let _ = self.shared.events.send(ClientEvent::State(state));
        }
    }

    fn flush(&mut self) {
        let result = self.rows.repo_mut().flush().map(|_| ()).map_err(|e| {
            tracing::error!(error = %e, "local flush failed; its changes were dropped");
            e.to_string()
        });
        for done in self.ctx.after_flush.drain(..) {
            done(result.clone());
        }
    }

    fn route(&mut self) {
        while let Some(output) = self.rows.repo_mut().poll_output() {
            match output {
                Output::Send { connection, frame } => {
                    if let Link::Up(up) = &self.link
                        && up.connection == connection
                    {
                        let _ = up.writer.send(WsMessage::Binary(frame.into()));
                    }
                }
                Output::Close { connection, reason } => {
                    if let Link::Up(up) = &self.link
                        && up.connection == connection
                    {
                        let reason = reason.unwrap_or_else(|| "closed".to_owned());
                        // The repo has forgotten it already; disconnect is a no-op.
                        self.drop_link(reason);
                    }
                }
                Output::Event(Event::PeerConnected(peer)) => {
                    if let Link::Up(up) = &self.link
                        && up.connection == peer.connection
                    {
                        tracing::debug!(relay = %peer.peer_id, "connected");
                        self.failures = 0;
                        self.ctx.connection = Some(peer.connection);
                        Counters::add(&self.shared.counters.connections, 1);
                        self.set_state(ConnectionState::Online);
                    }
                }
                Output::Event(Event::Committed(event)) => {
                    // A table catalog that changed may list rows we lack.
                    if let Err(e) = self.rows.discover_catalog(&event.document) {
                        tracing::warn!(error = %e, "cannot read a table catalog");
                    }
                    let _ = self.shared.events.send(ClientEvent::Committed(event));
                }
                Output::Event(Event::DocumentUnavailable { document, .. }) => {
                    let _ = self.shared.events.send(ClientEvent::Unavailable(document));
                }
                Output::Event(event) => tracing::trace!(?event, "repo event"),
            }
        }
    }

    /// Flush, leave, let the writer finish, hand back the repo.
    async fn shutdown(mut self) -> Repo<S> {
        self.want_online = false;
        self.receive_inbox();
        if let Link::Up(up) = &self.link {
            self.rows.repo_mut().close(up.connection);
        }
        self.flush();
        self.route();
        self.link = Link::Idle;
        self.set_state(ConnectionState::Offline);
        for task in self.closing.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        self.rows.into_repo()
    }
}

/// Write queued messages to the socket, counting them; stops after a close
/// frame or an error.
async fn write_loop(
    mut sink: SplitSink<Socket, WsMessage>,
    mut queue: mpsc::UnboundedReceiver<WsMessage>,
    shared: Arc<Shared>,
) {
    let counters = &shared.counters;
    while let Some(message) = queue.recv().await {
        let closing = matches!(message, WsMessage::Close(_));
        let len = message.len() as u64;
        if let Err(e) = sink.feed(message).await {
            tracing::debug!(error = %e, "websocket write failed");
            return;
        }
        Counters::add(&counters.frames_sent, 1);
        Counters::add(&counters.bytes_sent, len);
        if closing {
            break;
        }
        if queue.is_empty()
            && let Err(e) = sink.flush().await
        {
            tracing::debug!(error = %e, "websocket write failed");
            return;
        }
    }
    let _ = sink.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for failures in 1..40 {
            let base = (min * 2u32.pow((failures - 1).min(20))).min(max);
            let wait = backoff(failures, min, max);
            assert!(wait >= base / 2 && wait <= base, "{failures}: {wait:?}");
        }
        let waits: std::collections::HashSet<_> = (0..20).map(|_| backoff(5, min, max)).collect();
        assert!(waits.len() > 1, "no jitter");
    }

    #[test]
    fn token_goes_in_the_query() {
        assert_eq!(with_token("ws://h:1", None), "ws://h:1");
        assert_eq!(with_token("ws://h:1", Some("t")), "ws://h:1/?token=t");
        assert_eq!(
            with_token("ws://h:1/x", Some("a.b_c")),
            "ws://h:1/x?token=a.b_c"
        );
        assert_eq!(
            with_token("ws://h/?a=1", Some("a+b")),
            "ws://h/?a=1&token=a%2Bb"
        );
    }
}
