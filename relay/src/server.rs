//! The relay server: accept WebSocket connections and drive the repo.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tandem_engine::{ConnectionId, Direction, Output, Repo, Storage};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Limits of the relay.
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
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            max_message_size: 16 << 20,
            outbound_queue: 1024,
            max_connections: 10_000,
            max_batch: 1024,
        }
    }
}

enum Input {
    Opened {
        id: ConnectionId,
        out: mpsc::Sender<WsMessage>,
        task: AbortHandle,
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

/// Serve WebSocket clients on `listener` until `shutdown` completes, then
/// close every connection, flush, and return the repo.
pub async fn serve<S: Storage + 'static>(
    listener: TcpListener,
    repo: Repo<S>,
    config: RelayConfig,
    shutdown: impl Future<Output = ()>,
) -> Repo<S> {
    let (tx, rx) = mpsc::channel::<Input>(config.max_batch * 4);
    let (done_tx, done_rx) = oneshot::channel();
    let max_batch = config.max_batch;
    tokio::spawn(async move {
        let repo = repo_task(repo, rx, max_batch).await;
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
        next_id += 1;
        let id = ConnectionId(next_id);
        let (out_tx, out_rx) = mpsc::channel(config.outbound_queue);
        let (start_tx, start_rx) = oneshot::channel::<()>();
        let (conn_tx, conn_config) = (tx.clone(), config.clone());
        let task = tokio::spawn(async move {
            // Wait until the repo task knows this connection.
            if start_rx.await.is_ok() {
                connection(id, stream, conn_config, conn_tx, out_rx).await;
            }
            drop(permit);
        });
        let opened = Input::Opened {
            id,
            out: out_tx,
            task: task.abort_handle(),
        };
        if tx.send(opened).await.is_err() {
            break;
        }
        let _ = start_tx.send(());
    }
    let _ = tx.send(Input::Shutdown).await;
    drop(tx);
    done_rx
        .await
        .expect("repo task ended without returning the repo")
}

async fn connection(
    id: ConnectionId,
    stream: TcpStream,
    config: RelayConfig,
    tx: mpsc::Sender<Input>,
    mut out: mpsc::Receiver<WsMessage>,
) {
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(config.max_message_size))
        .max_frame_size(Some(config.max_message_size))
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024);
    let mut ws = match tokio_tungstenite::accept_async_with_config(stream, Some(ws_config)).await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(%id, error = %e, "websocket handshake failed");
            let _ = tx.send(Input::Closed { id }).await;
            return;
        }
    };
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
        }
    }
    let _ = ws.close(None).await;
    let _ = tx.send(Input::Closed { id }).await;
}

struct Conn {
    out: mpsc::Sender<WsMessage>,
    task: AbortHandle,
}

async fn repo_task<S: Storage>(
    mut repo: Repo<S>,
    mut rx: mpsc::Receiver<Input>,
    max_batch: usize,
) -> Repo<S> {
    let mut conns: HashMap<ConnectionId, Conn> = HashMap::new();
    let mut shutting_down = false;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(input) = next.take() {
            handled += 1;
            match input {
                Input::Opened { id, out, task } => {
                    if repo.connect(id, Direction::Incoming).is_ok() {
                        conns.insert(id, Conn { out, task });
                    }
                }
                Input::Frame { id, bytes } => {
                    if let Err(e) = repo.receive(now_ms(), id, &bytes) {
                        tracing::debug!(%id, error = %e, "frame for a closed connection");
                    }
                }
                Input::Closed { id } => {
                    repo.disconnect(id);
                    conns.remove(&id);
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
        route(&mut repo, &mut conns);
        if shutting_down {
            break;
        }
    }
    repo
}

fn route<S: Storage>(repo: &mut Repo<S>, conns: &mut HashMap<ConnectionId, Conn>) {
    while let Some(output) = repo.poll_output() {
        match output {
            Output::Send { connection, frame } => {
                let Some(conn) = conns.get(&connection) else {
                    continue;
                };
                if conn.out.try_send(WsMessage::Binary(frame.into())).is_err() {
                    tracing::warn!(%connection, "slow reader: outbound queue full, disconnecting");
                    conn.task.abort();
                    conns.remove(&connection);
                    repo.disconnect(connection);
                }
            }
            Output::Close { connection, reason } => {
                if let Some(conn) = conns.remove(&connection) {
                    tracing::debug!(%connection, ?reason, "closing connection");
                    // The close frame follows the queued frames (the error frame).
                    if conn.out.try_send(WsMessage::Close(None)).is_err() {
                        conn.task.abort();
                    }
                }
            }
            Output::Event(event) => tracing::trace!(?event, "repo event"),
        }
    }
}
