//! The relay server: accept WebSocket connections and drive the repo.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use governor::clock::Clock;
use tandem_engine::protocol::{self, BatchItem};
use tandem_engine::{ConnectionId, Direction, DocumentId, Event, Output, Repo, Storage};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::auth::{AuthError, Claims};
use crate::grants::{Auth, GrantTable, authenticate};
pub use crate::metrics::RelayStats;

/// Limits, authentication and counters of the relay.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Largest WebSocket message accepted, in bytes.
    pub max_message_size: usize,
    /// Frames queued for one connection before it counts as a slow reader
    /// and is disconnected.
    pub outbound_queue: usize,
    /// Connections served at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// Inputs handled before each flush at most (bounds flush latency under load).
    pub max_batch: usize,
    /// Who may connect and what they may do. The default is
    /// [`Auth::Anonymous`]: a program exposing the relay beyond loopback
    /// should choose that only on an explicit request (`--allow-anonymous`).
    pub auth: Auth,
    /// Longest an HTTP upgrade may take before the connection is dropped.
    pub handshake_timeout: Duration,
    /// Counters of what the relay refused (shared: read them while it runs).
    pub stats: Arc<RelayStats>,
    /// How often the relay pings each connection.
    pub ping_interval: Duration,
    /// A connection from which nothing (not even a pong) arrives for this
    /// long is closed; the client resyncs when it returns.
    pub idle_timeout: Duration,
    /// Frames per second read from one connection at most (the burst may be
    /// as large). Beyond it the relay stops reading that socket for a while,
    /// so TCP pushes back on the sender; nothing is dropped.
    pub max_frames_per_second: u32,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            max_message_size: 16 << 20,
            outbound_queue: 1024,
            max_connections: 10_000,
            max_batch: 1024,
            auth: Auth::Anonymous,
            handshake_timeout: Duration::from_secs(10),
            stats: Arc::default(),
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            max_frames_per_second: 2_000,
        }
    }
}

enum Input {
    Opened {
        id: ConnectionId,
        out: mpsc::Sender<WsMessage>,
        task: AbortHandle,
        /// The token's claims (none without auth).
        claims: Option<Claims>,
    },
    Frame {
        id: ConnectionId,
        bytes: Vec<u8>,
    },
    Closed {
        id: ConnectionId,
    },
    Shutdown,
}

/// Milliseconds since the Unix epoch (the engine's `now`).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn now_secs() -> u64 {
    now_ms() / 1000
}

fn unauthorized(error: &AuthError) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(format!("{error}\n")));
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    let headers = response.headers_mut();
    headers.insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// When a token expiring at `exp` (Unix seconds) runs out, on the tokio clock.
fn expiry_deadline(exp: u64) -> Option<Instant> {
    let left = exp.saturating_mul(1000).saturating_sub(now_ms());
    Instant::now().checked_add(Duration::from_millis(left))
}

/// Serve WebSocket clients on `listener` until `shutdown` completes, then
/// close every connection, flush, and return the repo.
///
/// With [`Auth::Tokens`] in `config.auth`, `repo` must have been opened with
/// `config.auth.policy()`.
///
/// # Panics
///
/// If `config.auth` is [`Auth::Tokens`] and no policy was ever made from it
/// (the repo then cannot be enforcing its grants).
pub async fn serve<S: Storage + 'static>(
    listener: TcpListener,
    repo: Repo<S>,
    config: RelayConfig,
    shutdown: impl Future<Output = ()>,
) -> Repo<S> {
    if let Auth::Tokens(t) = &config.auth {
        assert!(
            t.table.policies.load(Ordering::Relaxed) > 0,
            "RelayConfig::auth requires tokens, but the repo was not opened with auth.policy()"
        );
    }
    let (tx, rx) = mpsc::channel::<Input>(config.max_batch * 4);
    let (done_tx, done_rx) = oneshot::channel();
    let (max_batch, repo_config) = (config.max_batch, config.clone());
    tokio::spawn(async move {
        let repo = repo_task(repo, rx, max_batch, repo_config).await;
        let _ = done_tx.send(repo);
    });
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        if tx.is_closed() {
            break;
        }
        // Frames are small and latency matters more than packet count (the
        // fan-out); without this, back-to-back frames can wait for the
        // client's delayed ACK.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        next_id += 1;
        let id = ConnectionId(next_id);
        let (handle_tx, handle_rx) = oneshot::channel::<AbortHandle>();
        let (conn_tx, conn_config) = (tx.clone(), config.clone());
        let task = tokio::spawn(async move {
            connection(id, stream, conn_config, conn_tx, handle_rx).await;
            drop(permit);
        });
        let _ = handle_tx.send(task.abort_handle());
    }
    let _ = tx.send(Input::Shutdown).await;
    drop(tx);
    done_rx
        .await
        .expect("repo task ended without returning the repo")
}

/// The HTTP upgrade, with the token check when the relay requires tokens.
/// `Ok(None)` means the connection was refused or failed (already logged).
async fn upgrade(
    id: ConnectionId,
    stream: TcpStream,
    config: &RelayConfig,
) -> Option<(
    tokio_tungstenite::WebSocketStream<TcpStream>,
    Option<Claims>,
)> {
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(config.max_message_size))
        .max_frame_size(Some(config.max_message_size))
        // Allocated and zeroed up front for every connection, idle or not:
        // one page keeps an idle connection small (a larger frame grows it).
        .read_buffer_size(4 * 1024)
        .write_buffer_size(8 * 1024);
    let mut claims = None;
    // The error type is tungstenite's, as its handshake callback requires.
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        let Auth::Tokens(auth) = &config.auth else {
            return Ok(response);
        };
        match authenticate(auth, request, now_secs()) {
            Ok(c) => {
                tracing::debug!(%id, sub = ?c.sub, exp = c.exp, "token accepted");
                claims = Some(c);
                Ok(response)
            }
            Err(e) => {
                config.stats.unauthorized.inc();
                tracing::info!(%id, error = %e, "upgrade refused: 401");
                Err(unauthorized(&e))
            }
        }
    };
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(ws_config));
    match tokio::time::timeout(config.handshake_timeout, handshake).await {
        Ok(Ok(ws)) => Some((ws, claims)),
        Ok(Err(e)) => {
            tracing::debug!(%id, error = %e, "websocket handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%id, "websocket handshake timed out");
            None
        }
    }
}

async fn connection(
    id: ConnectionId,
    stream: TcpStream,
    config: RelayConfig,
    tx: mpsc::Sender<Input>,
    handle: oneshot::Receiver<AbortHandle>,
) {
    // A task is allocated at the size of its largest state, and every
    // connection lives in one: the handshake's large, short-lived state is
    // boxed so that idle connections do not carry it (see the test below).
    let Some((mut ws, claims)) = Box::pin(upgrade(id, stream, &config)).await else {
        return;
    };
    let Ok(task) = handle.await else {
        return;
    };
    let deadline = claims.as_ref().and_then(|c| expiry_deadline(c.exp));
    let (out_tx, mut out) = mpsc::channel(config.outbound_queue);
    // The repo task knows this connection (and its grants) before any frame.
    let opened = Input::Opened {
        id,
        out: out_tx,
        task,
        claims,
    };
    if tx.send(opened).await.is_err() {
        let _ = ws.close(None).await;
        return;
    }
    let expiry = async move {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expiry);
    let limiter = governor::RateLimiter::direct(governor::Quota::per_second(
        NonZeroU32::new(config.max_frames_per_second.max(1)).expect("at least 1"),
    ));
    // While set, the socket is not read: TCP pushes back on a fast sender.
    let mut throttled_until: Option<Instant> = None;
    let mut last_heard = Instant::now();
    let mut ping =
        tokio::time::interval_at(Instant::now() + config.ping_interval, config.ping_interval);
    loop {
        let idle_at = last_heard + config.idle_timeout;
        let resume_at = throttled_until.unwrap_or(idle_at);
        tokio::select! {
            () = tokio::time::sleep_until(resume_at), if throttled_until.is_some() => {
                throttled_until = None;
            }
            () = tokio::time::sleep_until(idle_at) => {
                tracing::info!(%id, "idle timeout: nothing heard, closing");
                config.stats.idle_closed.inc();
                break;
            }
            _ = ping.tick() => {
                if ws.send(WsMessage::Ping(Default::default())).await.is_err() {
                    break;
                }
            }
            incoming = ws.next(), if throttled_until.is_none() => {
                last_heard = Instant::now();
                let bytes = match incoming {
                    Some(Ok(WsMessage::Binary(bytes))) => bytes.to_vec(),
                    // Text is not part of the protocol: hand it over as it is,
                    // the repo answers with an error frame and a close.
                    Some(Ok(WsMessage::Text(text))) => text.as_bytes().to_vec(),
                    Some(Ok(WsMessage::Close(_))) | None => break,
                    Some(Ok(_)) => continue, // ping/pong: tungstenite answers pings
                    // Over `max_message_size`: tungstenite refuses it from the
                    // header, before buffering it. Say so like any protocol
                    // error (an `error` frame), then close with 1009.
                    Some(Err(WsError::Capacity(e))) => {
                        tracing::info!(%id, error = %e, "message over the size limit: closing");
                        let error = protocol::Message::Error {
                            message: format!(
                                "message too large ({e}); this relay accepts at most {} bytes",
                                config.max_message_size
                            ),
                            sender_id: None,
                            target_id: None,
                        };
                        let _ = ws.send(WsMessage::Binary(error.encode().into())).await;
                        let close = CloseFrame {
                            code: CloseCode::Size,
                            reason: "message too large".into(),
                        };
                        let _ = ws.send(WsMessage::Close(Some(close))).await;
                        // Boxed: its buffer would otherwise be in every connection's task.
                        Box::pin(linger(&mut ws, config.max_message_size)).await;
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(%id, error = %e, "websocket read failed");
                        break;
                    }
                };
                if tx.send(Input::Frame { id, bytes }).await.is_err() {
                    break;
                }
                if let Err(not_until) = limiter.check() {
                    let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                    throttled_until = Some(Instant::now() + wait);
                    config.stats.throttled.inc();
                }
            }
            outgoing = out.recv() => match outgoing {
                Some(msg) => {
                    let closing = matches!(msg, WsMessage::Close(_));
                    if ws.send(msg).await.is_err() || closing {
                        break;
                    }
                }
                None => break,
            },
            () = &mut expiry => {
                tracing::info!(%id, "token expired: closing the connection");
                config.stats.expired.inc();
                let frame = CloseFrame {
                    code: CloseCode::Policy,
                    reason: "token expired".into(),
                };
                let _ = ws.send(WsMessage::Close(Some(frame))).await;
                break;
            }
        }
    }
    let _ = ws.close(None).await;
    let _ = tx.send(Input::Closed { id }).await;
}

/// Read and drop what the peer still sends (at most `budget` bytes, 2 s,
/// until it pauses), so that closing a socket with unread input does not
/// reset the connection and destroy the frames just sent to it.
async fn linger(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>, budget: usize) {
    use tokio::io::AsyncReadExt;
    let stream = ws.get_mut();
    let mut buf = [0u8; 8192];
    let mut left = budget;
    let end = Instant::now() + Duration::from_secs(2);
    while left > 0 {
        let pause = (Instant::now() + Duration::from_millis(200)).min(end);
        match tokio::time::timeout_at(pause, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

struct Conn {
    out: mpsc::Sender<WsMessage>,
    task: AbortHandle,
}

/// What the repo task shares with routing.
struct Ctx {
    conns: HashMap<ConnectionId, Conn>,
    /// The grants of open connections, when the relay requires tokens.
    grants: Option<Arc<GrantTable>>,
    stats: Arc<RelayStats>,
    /// (connection, document) pairs already warned about a denied write.
    warned: HashSet<(ConnectionId, DocumentId)>,
}

impl Ctx {
    /// The repo has forgotten this connection: forget it too.
    fn forget(&mut self, id: ConnectionId) -> Option<Conn> {
        if let Some(grants) = &self.grants {
            grants.lock().remove(&id);
        }
        self.warned.retain(|(c, _)| *c != id);
        self.conns.remove(&id)
    }
}

/// How often the repo task advances the repo's clock while flow control
/// holds sync messages back (see `Repo::has_held_sync`).
const HELD_TICK: Duration = Duration::from_millis(50);

/// Bytes of frames handled before each flush at most, beside
/// [`RelayConfig::max_batch`] frames: a Tandem peer's batch frame (the
/// engine's `batch_bytes`, 64 KiB) carries hundreds of documents, so
/// counting frames alone would let one flush take in hundreds of thousands.
const MAX_BATCH_BYTES: usize = 1 << 20;

async fn repo_task<S: Storage>(
    mut repo: Repo<S>,
    mut rx: mpsc::Receiver<Input>,
    max_batch: usize,
    config: RelayConfig,
) -> Repo<S> {
    let mut ctx = Ctx {
        conns: HashMap::new(),
        grants: match &config.auth {
            Auth::Anonymous => None,
            Auth::Tokens(t) => Some(t.table.clone()),
        },
        stats: config.stats.clone(),
        warned: HashSet::new(),
    };
    let mut shutting_down = false;
    let mut last_gauges = Instant::now();
    ctx.stats.serving.store(true, Ordering::Relaxed);
    let mut inputs: Vec<Option<Input>> = Vec::new();
    loop {
        // Sync messages held back by flow control go out once their peer
        // answers, or at the latest after the repo's window timeout, which
        // needs the clock to advance without input.
        let first = if repo.has_held_sync() {
            match tokio::time::timeout(HELD_TICK, rx.recv()).await {
                Ok(Some(first)) => Some(first),
                Ok(None) => break,
                Err(_) => {
                    repo.tick(now_ms());
                    None
                }
            }
        } else {
            match rx.recv().await {
                Some(first) => Some(first),
                None => break,
            }
        };
        inputs.extend(first.map(Some));
        let size = |input: &Input| match input {
            Input::Frame { bytes, .. } => bytes.len(),
            _ => 0,
        };
        let mut bytes: usize = inputs.iter().flatten().map(size).sum();
        while inputs.len() < max_batch && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(input) => {
                    bytes += size(&input);
                    inputs.push(Some(input));
                }
                Err(_) => break,
            }
        }
        for input in inputs.iter().flatten() {
            if let Input::Frame { bytes, .. } = input {
                ctx.stats.frames_in.inc();
                ctx.stats.bytes_in.inc_by(bytes.len() as u64);
            }
        }
        ctx.stats
            .frames_coalesced
            .inc_by(coalesce_sync_frames(&mut inputs));
        for input in inputs.drain(..).flatten() {
            match input {
                Input::Opened {
                    id,
                    out,
                    task,
                    claims,
                } => {
                    if let (Some(grants), Some(claims)) = (&ctx.grants, claims) {
                        grants.lock().insert(id, claims);
                    }
                    if repo.connect(id, Direction::Incoming).is_ok() {
                        ctx.conns.insert(id, Conn { out, task });
                    } else {
                        ctx.forget(id);
                    }
                }
                Input::Frame { id, bytes } => {
                    if let Err(e) = repo.receive(now_ms(), id, &bytes) {
                        tracing::debug!(%id, error = %e, "frame for a closed connection");
                    }
                }
                Input::Closed { id } => {
                    repo.disconnect(id);
                    ctx.forget(id);
                }
                Input::Shutdown => {
                    shutting_down = true;
                    for peer in repo.peers() {
                        repo.close(peer.connection);
                    }
                }
            }
        }
        let started = std::time::Instant::now();
        if let Err(e) = repo.flush() {
            tracing::error!(error = %e, "flush failed; nothing of it was acknowledged");
        }
        ctx.stats
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        route(&mut repo, &mut ctx);
        ctx.stats.connections.set(ctx.conns.len() as i64);
        ctx.stats
            .documents_loaded
            .set(repo.loaded_documents() as i64);
        if last_gauges.elapsed() >= Duration::from_millis(100) {
            last_gauges = Instant::now();
            let queued: usize = ctx
                .conns
                .values()
                .map(|c| c.out.max_capacity() - c.out.capacity())
                .sum();
            ctx.stats.outbound_queued.set(queued as i64);
        }
        if shutting_down {
            break;
        }
    }
    ctx.stats.serving.store(false, Ordering::Relaxed);
    repo
}

/// Under load, a batch may hold several sync messages with changes that one
/// connection sent back to back for one document (a writer faster than the
/// relay): hand them to the repo as one ([`protocol::SyncFrame::absorb`]). Each
/// connection's inputs keep their order; those of different connections are
/// independent, and the batch is flushed as a whole anyway. Returns how many
/// frames were absorbed into the one before.
fn coalesce_sync_frames(inputs: &mut [Option<Input>]) -> u64 {
    let absorbed = protocol::coalesce_sync_frames_in(
        inputs,
        |input| match input {
            Input::Frame { id, bytes } => BatchItem::Frame(*id, bytes),
            Input::Opened { id, .. } | Input::Closed { id } => BatchItem::Event(*id),
            Input::Shutdown => BatchItem::Barrier,
        },
        |id, bytes| Input::Frame { id, bytes },
    );
    absorbed as u64
}

fn route<S: Storage>(repo: &mut Repo<S>, ctx: &mut Ctx) {
    while let Some(output) = repo.poll_output() {
        match output {
            Output::Send { connection, frame } => {
                let Some(conn) = ctx.conns.get(&connection) else {
                    continue;
                };
                let len = frame.len() as u64;
                if conn.out.try_send(WsMessage::Binary(frame.into())).is_ok() {
                    ctx.stats.frames_out.inc();
                    ctx.stats.bytes_out.inc_by(len);
                } else {
                    tracing::warn!(%connection, "slow reader: outbound queue full, disconnecting");
                    ctx.stats.slow_readers.inc();
                    conn.task.abort();
                    repo.disconnect(connection);
                    ctx.forget(connection);
                }
            }
            Output::Close { connection, reason } => {
                if let Some(conn) = ctx.forget(connection) {
                    tracing::debug!(%connection, ?reason, "closing connection");
                    // The close frame follows the queued frames (the error frame).
                    if conn.out.try_send(WsMessage::Close(None)).is_err() {
                        conn.task.abort();
                    }
                }
            }
            // The protocol has no non-fatal way to say this (an `error`
            // message closes the connection in automerge-repo), so the peer
            // learns it from the document not changing on the relay, and the
            // operator from the log and `RelayStats::writes_denied`.
            Output::Event(Event::AccessDenied {
                connection,
                document,
                reason,
            }) => {
                ctx.stats.writes_denied.inc();
                if ctx.warned.insert((connection, document)) {
                    tracing::warn!(%connection, %document, %reason, "write refused");
                } else {
                    tracing::debug!(%connection, %document, %reason, "write refused");
                }
            }
            Output::Event(event) => tracing::trace!(?event, "repo event"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_engine::automerge::ROOT;
    use tandem_engine::automerge::transaction::Transactable;
    use tandem_engine::{MemoryStorage, PeerId, RepoConfig, ServeOnRequest, ShareAll};

    fn repo(name: &str, serve: bool) -> Repo<MemoryStorage> {
        let config = RepoConfig::new(PeerId::new(name));
        if serve {
            Repo::open(MemoryStorage::new(), config, ServeOnRequest).unwrap()
        } else {
            Repo::open(MemoryStorage::new(), config, ShareAll).unwrap()
        }
    }

    fn sends(repo: &mut Repo<MemoryStorage>) -> Vec<Vec<u8>> {
        repo.flush().unwrap();
        repo.drain_outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::Send { frame, .. } => Some(frame),
                _ => None,
            })
            .collect()
    }

    /// Sync data (automerge's message) of each sync frame in `frames`.
    fn sync_data(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        frames
            .iter()
            .filter_map(|f| match protocol::Message::decode(f).unwrap() {
                protocol::Message::Sync { data, .. } => Some(data),
                _ => None,
            })
            .collect()
    }

    type WriterAndHubs = (
        Repo<MemoryStorage>,
        [Repo<MemoryStorage>; 2],
        DocumentId,
        Vec<Vec<u8>>,
    );

    /// A writer synced with two relays in the same state, and `n` more
    /// changes it made one flush at a time: the frames it sent for each.
    fn writer_and_two_hubs(n: usize) -> WriterAndHubs {
        let (w_conn, h_conn) = (ConnectionId(1), ConnectionId(7));
        let mut w = repo("writer", false);
        let mut hubs = [repo("hub", true), repo("hub", true)];
        w.connect(w_conn, Direction::Outgoing).unwrap();
        for h in &mut hubs {
            h.connect(h_conn, Direction::Incoming).unwrap();
        }
        let doc = w.create().unwrap();
        w.change(&doc, |d| d.put(ROOT, "v", 0)).unwrap();
        // The writer talks to hub 0; hub 1 gets the same frames.
        for _ in 0..10 {
            let frames = sends(&mut w);
            if frames.is_empty() {
                break;
            }
            for f in &frames {
                for h in &mut hubs {
                    h.receive(0, h_conn, f).unwrap();
                }
            }
            let replies = sends(&mut hubs[0]);
            sends(&mut hubs[1]);
            for f in &replies {
                w.receive(0, w_conn, f).unwrap();
            }
        }
        assert!(w.is_acknowledged(w_conn, &doc).unwrap());
        let mut frames = Vec::new();
        for i in 1..=n {
            w.change(&doc, |d| d.put(ROOT, "v", i as i64)).unwrap();
            let mut sent = sends(&mut w);
            assert_eq!(sent.len(), 1);
            frames.append(&mut sent);
        }
        (w, hubs, doc, frames)
    }

    fn frame(id: u64, bytes: &[u8]) -> Option<Input> {
        Some(Input::Frame {
            id: ConnectionId(id),
            bytes: bytes.to_vec(),
        })
    }

    /// Three changes sent back to back and handed over as one leave the
    /// relay as the three one by one do: same heads, same answer.
    #[test]
    fn back_to_back_changes_are_handed_over_as_one_with_the_same_outcome() {
        let (_w, [mut a, mut b], doc, frames) = writer_and_two_hubs(3);
        let h_conn = ConnectionId(7);
        for f in &frames {
            a.receive(0, h_conn, f).unwrap();
        }
        let mut inputs: Vec<Option<Input>> = frames.iter().map(|f| frame(7, f)).collect();
        assert_eq!(coalesce_sync_frames(&mut inputs), 2);
        let merged: Vec<Input> = inputs.into_iter().flatten().collect();
        assert_eq!(merged.len(), 1);
        for input in merged {
            let Input::Frame { id, bytes } = input else {
                panic!("not a frame");
            };
            b.receive(0, id, &bytes).unwrap();
        }
        assert_eq!(a.heads(&doc).unwrap(), b.heads(&doc).unwrap());
        let (to_a, to_b) = (sends(&mut a), sends(&mut b));
        assert!(!to_a.is_empty());
        assert_eq!(sync_data(&to_a), sync_data(&to_b));
    }

    /// Only a connection's consecutive sync frames merge: frames of other
    /// connections in between are kept (and keep their place), anything
    /// else from the same connection (here its close) ends the run.
    #[test]
    fn coalescing_keeps_each_connection_in_order() {
        let (_w, _hubs, _doc, frames) = writer_and_two_hubs(4);
        let other = b"not a sync frame".to_vec();
        let mut inputs = vec![
            frame(7, &frames[0]),
            frame(8, &other),
            frame(7, &frames[1]),
            frame(8, &frames[2]),
            Some(Input::Closed {
                id: ConnectionId(7),
            }),
            frame(7, &frames[3]),
        ];
        assert_eq!(coalesce_sync_frames(&mut inputs), 1);
        let kept: Vec<(u64, usize)> = inputs
            .iter()
            .map(|i| match i {
                Some(Input::Frame { id, bytes }) => (id.0, bytes.len()),
                Some(Input::Closed { id }) => (id.0, 0),
                _ => (0, 0),
            })
            .collect();
        assert_eq!(kept[1], (8, other.len()));
        assert_eq!(kept[2], (0, 0), "absorbed into the first");
        assert_eq!(kept[3], (8, frames[2].len()));
        assert_eq!(kept[4], (7, 0));
        assert_eq!(kept[5], (7, frames[3].len()), "after the close: kept");
        // A frame that is not a sync message with changes ends a run too.
        let mut inputs = vec![frame(7, &frames[0]), frame(7, &other), frame(7, &frames[1])];
        assert_eq!(coalesce_sync_frames(&mut inputs), 0);
    }

    /// Each connection's task is allocated (and written) at the size of the
    /// largest state of `connection`, so a big local on a rare path costs
    /// every idle connection its size: box such paths.
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dial = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, _dialed) = tokio::join!(listener.accept(), dial);
        let (stream, _) = accepted.unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let (_handle_tx, handle_rx) = oneshot::channel();
        let task = connection(
            ConnectionId(1),
            stream,
            RelayConfig::default(),
            tx,
            handle_rx,
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 4096, "a connection task holds {size} bytes");
    }
}
