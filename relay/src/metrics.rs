//! What the relay counts, in Prometheus text on `/metrics`, with `/healthz`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The relay's counters and gauges. Shared: read them while it runs, or
/// serve them with [`serve_http`].
#[derive(Debug)]
pub struct RelayStats {
    registry: Registry,
    pub(crate) connections: Gauge,
    pub(crate) documents_loaded: Gauge,
    pub(crate) outbound_queued: Gauge,
    pub(crate) frames_in: Counter,
    pub(crate) frames_out: Counter,
    pub(crate) bytes_in: Counter,
    pub(crate) bytes_out: Counter,
    pub(crate) commit_seconds: Histogram,
    pub(crate) unauthorized: Counter,
    pub(crate) writes_denied: Counter,
    pub(crate) expired: Counter,
    pub(crate) throttled: Counter,
    pub(crate) idle_closed: Counter,
    pub(crate) slow_readers: Counter,
    pub(crate) frames_coalesced: Counter,
    /// The repo task is running (for `/healthz`).
    pub(crate) serving: AtomicBool,
}

impl Default for RelayStats {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tandem");
        let mut gauge = |name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let connections = gauge("connections", "Open WebSocket connections");
        let documents_loaded = gauge("documents_loaded", "Documents in memory");
        let outbound_queued = gauge(
            "outbound_queued_frames",
            "Frames waiting in the outbound queues of all connections",
        );
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let frames_in = counter("frames_in", "WebSocket messages received");
        let frames_out = counter("frames_out", "WebSocket messages queued to send");
        let bytes_in = counter("bytes_in", "Bytes received in WebSocket messages");
        let bytes_out = counter("bytes_out", "Bytes queued to send in WebSocket messages");
        let unauthorized = counter(
            "auth_refusals",
            "Upgrades refused with 401 (token missing, malformed, tampered or expired)",
        );
        let writes_denied = counter(
            "writes_denied",
            "Sync messages whose changes were not applied: the peer may only read",
        );
        let expired = counter(
            "tokens_expired",
            "Connections closed as their token expired",
        );
        let throttled = counter(
            "throttled",
            "Times a connection exceeded its frame rate and reading paused",
        );
        let idle_closed = counter("idle_closed", "Connections closed after the idle timeout");
        let slow_readers = counter(
            "slow_readers_dropped",
            "Connections dropped because their outbound queue was full",
        );
        let frames_coalesced = counter(
            "frames_coalesced",
            "Sync messages with changes handed to the repo together with the one \
             before from the same connection (back to back in one batch)",
        );
        let commit_seconds = Histogram::new(exponential_buckets(0.000_1, 2.0, 16));
        registry.register(
            "commit_seconds",
            "Duration of each durable group commit (flush)",
            commit_seconds.clone(),
        );
        Self {
            registry,
            connections,
            documents_loaded,
            outbound_queued,
            frames_in,
            frames_out,
            bytes_in,
            bytes_out,
            commit_seconds,
            unauthorized,
            writes_denied,
            expired,
            throttled,
            idle_closed,
            slow_readers,
            frames_coalesced,
            serving: AtomicBool::new(false),
        }
    }
}

impl RelayStats {
    /// Upgrades answered with 401 (token missing, malformed, tampered or expired).
    pub fn unauthorized(&self) -> u64 {
        self.unauthorized.get()
    }

    /// Sync messages whose changes were not applied because the peer may
    /// only read the document.
    pub fn writes_denied(&self) -> u64 {
        self.writes_denied.get()
    }

    /// Connections closed because their token expired.
    pub fn expired(&self) -> u64 {
        self.expired.get()
    }

    /// Times a connection sent faster than `max_frames_per_second` and its
    /// reading was paused.
    pub fn throttled(&self) -> u64 {
        self.throttled.get()
    }

    /// Connections closed because nothing arrived within `idle_timeout`.
    pub fn idle_closed(&self) -> u64 {
        self.idle_closed.get()
    }

    /// Connections dropped because their outbound queue was full.
    pub fn slow_readers(&self) -> u64 {
        self.slow_readers.get()
    }

    /// Open connections.
    pub fn connections(&self) -> i64 {
        self.connections.get()
    }

    /// Whether the relay is serving (its repo task runs).
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// Everything in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The HTTP routes: `GET /metrics` (Prometheus text) and `GET /healthz`
/// (200 while the relay serves, 503 otherwise).
pub fn router(stats: Arc<RelayStats>) -> Router {
    let metrics = stats.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }),
        )
        .route(
            "/healthz",
            get(move || async move {
                if stats.serving() {
                    (StatusCode::OK, "ok\n").into_response()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not serving\n").into_response()
                }
            }),
        )
}

/// Serve [`router`] on `listener` until `shutdown` completes.
pub async fn serve_http(
    listener: TcpListener,
    stats: Arc<RelayStats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(stats))
        .with_graceful_shutdown(shutdown)
        .await
}
