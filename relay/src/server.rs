//! The relay server: accept WebSocket connections and drive the repo.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tandem_engine::{
    Access, ConnectionId, Direction, DocumentId, Event, Output, PeerInfo, Repo, SharePolicy,
    Storage,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::auth::{AuthError, Claims, verify};

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
        }
    }
}

/// How the relay authenticates connections.
///
/// With [`Auth::Tokens`], every WebSocket upgrade must carry a token (see
/// [`crate::auth`]) as `?token=` in the URL or as `Authorization: Bearer`;
/// a missing, tampered or expired one is answered with HTTP 401 and no
/// WebSocket. A connection sees only the documents its token grants: any
/// other is `doc-unavailable` to it, whether it exists or not, and changes it
/// sends to a document it may only read are not applied. The connection is
/// closed (code 1008, "token expired") when the token expires.
///
/// The repo given to [`serve`] must have been opened with [`Auth::policy`]
/// of this same value (or a clone of it): that policy reads the grants of
/// each connection, which the relay records as connections open.
#[derive(Clone, Default)]
pub enum Auth {
    /// No authentication: anyone may read and write any document they name
    /// (the repo may be opened with [`Auth::policy`] or with
    /// [`tandem_engine::ServeOnRequest`], which behave alike).
    #[default]
    Anonymous,
    /// Signed tokens required; make it with [`Auth::tokens`].
    Tokens(TokenAuth),
}

/// The state of [`Auth::Tokens`]: the secret and the grants of the open
/// connections.
#[derive(Clone)]
pub struct TokenAuth {
    secret: Arc<[u8]>,
    table: Arc<GrantTable>,
}

#[derive(Default)]
struct GrantTable {
    claims: Mutex<HashMap<ConnectionId, Claims>>,
    /// How many policies were made from this table (a sanity check in `serve`).
    policies: AtomicUsize,
}

impl GrantTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<ConnectionId, Claims>> {
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Auth {
    /// Require tokens signed with `secret` (the same bytes given to
    /// [`crate::auth::mint`]).
    pub fn tokens(secret: impl Into<Vec<u8>>) -> Self {
        Auth::Tokens(TokenAuth {
            secret: secret.into().into(),
            table: Arc::default(),
        })
    }

    /// The share policy to open the relay's repo with.
    pub fn policy(&self) -> GrantPolicy {
        match self {
            Auth::Anonymous => GrantPolicy { table: None },
            Auth::Tokens(t) => {
                t.table.policies.fetch_add(1, Ordering::Relaxed);
                GrantPolicy {
                    table: Some(t.table.clone()),
                }
            }
        }
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Anonymous => f.write_str("Anonymous"),
            Auth::Tokens(t) => t.fmt(f),
        }
    }
}

impl fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("secret", &"<redacted>")
            .field("connections", &self.table.lock().len())
            .finish()
    }
}

/// The relay's share policy: with tokens, what the connection's token
/// grants ([`Claims::access`]), nothing for a connection without one; without
/// tokens, read-write for everyone. It announces nothing (a peer gets what it
/// asks for), like [`tandem_engine::ServeOnRequest`].
pub struct GrantPolicy {
    table: Option<Arc<GrantTable>>,
}

impl fmt::Debug for GrantPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrantPolicy")
            .field("tokens", &self.table.is_some())
            .finish()
    }
}

impl SharePolicy for GrantPolicy {
    fn access(&self, peer: &PeerInfo, document: &DocumentId) -> Access {
        match &self.table {
            None => Access::ReadWrite,
            Some(table) => table
                .lock()
                .get(&peer.connection)
                .map_or(Access::None, |c| c.access(document)),
        }
    }

    fn announce(&self, _: &PeerInfo, _: &DocumentId) -> bool {
        false
    }
}

/// What the relay refused, counted since it started.
#[derive(Debug, Default)]
pub struct RelayStats {
    unauthorized: AtomicU64,
    writes_denied: AtomicU64,
    expired: AtomicU64,
}

impl RelayStats {
    /// Upgrades answered with 401 (token missing, malformed, tampered or expired).
    pub fn unauthorized(&self) -> u64 {
        self.unauthorized.load(Ordering::Relaxed)
    }

    /// Sync messages whose changes were not applied because the peer may
    /// only read the document.
    pub fn writes_denied(&self) -> u64 {
        self.writes_denied.load(Ordering::Relaxed)
    }

    /// Connections closed because their token expired.
    pub fn expired(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn now_secs() -> u64 {
    now_ms() / 1000
}

/// The token presented with an upgrade request: `Authorization: Bearer`
/// first, else the `token` query parameter.
fn presented_token(request: &Request) -> Option<String> {
    if let Some(value) = request.headers().get(header::AUTHORIZATION)
        && let Ok(value) = value.to_str()
        && let Some((scheme, token)) = value.trim().split_once(' ')
        && scheme.eq_ignore_ascii_case("bearer")
    {
        return Some(token.trim().to_owned());
    }
    request
        .uri()
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .map(percent_decode)
}

/// Decode `%XX` escapes (tokens are URL-safe, but a client may escape anyway).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Check the upgrade request's token.
fn authenticate(auth: &TokenAuth, request: &Request) -> Result<Claims, AuthError> {
    let token = presented_token(request).ok_or(AuthError::Missing)?;
    verify(&auth.secret, &token, now_secs())
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
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024);
    let mut claims = None;
    // The error type is tungstenite's, as its handshake callback requires.
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        let Auth::Tokens(auth) = &config.auth else {
            return Ok(response);
        };
        match authenticate(auth, request) {
            Ok(c) => {
                tracing::debug!(%id, sub = ?c.sub, exp = c.exp, "token accepted");
                claims = Some(c);
                Ok(response)
            }
            Err(e) => {
                config.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
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
    let Some((mut ws, claims)) = upgrade(id, stream, &config).await else {
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
    loop {
        tokio::select! {
            incoming = ws.next() => match incoming {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    if tx.send(Input::Frame { id, bytes: bytes.to_vec() }).await.is_err() {
                        break;
                    }
                }
                // Text is not part of the protocol: hand it over as it is, the
                // repo answers with an error frame and a close.
                Some(Ok(WsMessage::Text(text))) => {
                    if tx.send(Input::Frame { id, bytes: text.as_bytes().to_vec() }).await.is_err() {
                        break;
                    }
                }
                Some(Ok(WsMessage::Close(_))) | None => break,
                Some(Ok(_)) => {} // ping/pong are answered by tungstenite
                Some(Err(e)) => {
                    tracing::debug!(%id, error = %e, "websocket read failed");
                    break;
                }
            },
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
                config.stats.expired.fetch_add(1, Ordering::Relaxed);
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
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(input) = next.take() {
            handled += 1;
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
            if handled < max_batch {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = repo.flush() {
            tracing::error!(error = %e, "flush failed; nothing of it was acknowledged");
        }
        route(&mut repo, &mut ctx);
        if shutting_down {
            break;
        }
    }
    repo
}

fn route<S: Storage>(repo: &mut Repo<S>, ctx: &mut Ctx) {
    while let Some(output) = repo.poll_output() {
        match output {
            Output::Send { connection, frame } => {
                let Some(conn) = ctx.conns.get(&connection) else {
                    continue;
                };
                if conn.out.try_send(WsMessage::Binary(frame.into())).is_err() {
                    tracing::warn!(%connection, "slow reader: outbound queue full, disconnecting");
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
                ctx.stats.writes_denied.fetch_add(1, Ordering::Relaxed);
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
