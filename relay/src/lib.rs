//! # tandem-relay
//!
//! The WebSocket driver around the engine's sans-IO [`Repo`]: a storing peer
//! that speaks automerge-repo protocol v1 to any number of clients.
//!
//! ## How data flows
//!
//! ```text
//! socket task (one per connection)          repo task (owns the Repo)
//!   binary frame ──> Input::Frame ──────────> receive() for every ready input
//!                                             flush()   (one durable group commit)
//!   send / close <── bounded queue <───────── poll_output(): Send / Close / Event
//! ```
//!
//! The repo task handles every input that is ready, then flushes once, so
//! under load many frames share one fsync and when idle a change is synced
//! onward at once. A connection whose outbound queue is full is a slow reader:
//! it is disconnected (it resyncs from its persisted sync state when it
//! returns) rather than stalling others or growing memory.
//!
//! ## Authentication
//!
//! With [`Auth::tokens`] in [`RelayConfig::auth`], every WebSocket upgrade
//! must present a signed token ([`auth`]: HMAC-SHA256 over JSON claims naming
//! documents, read or read-write, and an expiry) as `?token=` in the URL or
//! as `Authorization: Bearer`. Missing, malformed, tampered or expired tokens
//! get HTTP 401 and no WebSocket. The repo is opened with [`Auth::policy`]
//! (a [`GrantPolicy`]), which answers the engine's share questions from the
//! grants of each connection, so a peer is told `doc-unavailable` for any
//! document outside its grant and never receives it; a read-only peer's
//! changes are not applied (the relay's sync messages carry automerge's
//! READ_ONLY flag, so automerge 0.12 peers do not even send them; refusals are
//! logged at warn and counted in [`RelayStats`]). The connection is closed
//! (WebSocket close 1008, "token expired") when its token expires.
//!
//! ```no_run
//! # async fn run(storage: tandem_engine::RedbStorage) -> Result<(), Box<dyn std::error::Error>> {
//! use tandem_engine::{PeerId, Repo, RepoConfig};
//! use tandem_relay::{Auth, RelayConfig, serve};
//!
//! let config = RelayConfig { auth: Auth::tokens(b"relay secret".to_vec()), ..RelayConfig::default() };
//! let repo = Repo::open(storage, RepoConfig::new(PeerId::random("relay")), config.auth.policy())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3030").await?;
//! serve(listener, repo, config, std::future::pending()).await;
//! # Ok(()) }
//! ```
//!
//! [`Repo`]: tandem_engine::Repo

pub mod auth;
mod client;
mod grants;
pub mod metrics;
mod server;
pub mod tables;

pub use auth::{AuthError, Claims, Grant, Scope, mint, verify};
pub use client::{Client, ClientConfig, ClientError, ClientEvent, ClientStats, ConnectionState};
pub use grants::{Auth, GrantPolicy, TokenAuth};
pub use server::{RelayConfig, RelayStats, serve};
