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
//! [`Repo`]: tandem_engine::Repo

mod server;

pub use server::{RelayConfig, serve};
