//! # tandem-engine
//!
//! Automerge documents stored durably, and a sans-IO sync core that speaks
//! the automerge-repo network protocol (v1).
//!
//! ## How data flows
//!
//! ```text
//! app edit ──> Repo::change ──> automerge change in memory ─┐
//! frame in ──> Repo::receive ─> sync message applied ───────┤
//!                                                            v
//!              Repo::flush ──> one durable storage transaction (group commit):
//!                              new changes, change-feed entries, sync states
//!                          ──> Event::Committed per commit (the change feed)
//!                          ──> sync messages to every peer sharing each
//!                              changed document (the fan-out)
//!              Repo::poll_output ──> Send / Close / Event for the driver
//! ```
//!
//! The repo never touches a socket or a clock: drivers (the relay's tokio
//! tasks, the browser's WebSocket callbacks, the in-memory test network) feed
//! it inputs and carry out its outputs. Storage is a small synchronous
//! [`Storage`] trait with a durable [`RedbStorage`] (feature `redb`, on by
//! default) and a [`MemoryStorage`].
//!
//! ## Two peers, offline edits, one merge
//!
//! ```
//! use automerge::{ReadDoc, transaction::Transactable, ROOT};
//! use tandem_engine::{
//!     ConnectionId, Direction, MemoryStorage, Output, PeerId, Repo, RepoConfig, ServeOnRequest,
//!     ShareAll,
//! };
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut server = Repo::open(MemoryStorage::new(), RepoConfig::new(PeerId::new("server")), ServeOnRequest)?;
//! let mut client = Repo::open(MemoryStorage::new(), RepoConfig::new(PeerId::new("client")), ShareAll)?;
//!
//! // The client edits while offline; the edit is durable after flush.
//! let doc = client.create()?;
//! client.change(&doc, |d| d.put(ROOT, "title", "offline edit"))?;
//! client.flush()?;
//!
//! // Connect them through a pretend socket and pump frames until quiet.
//! let (c, s) = (ConnectionId(1), ConnectionId(1));
//! client.connect(c, Direction::Outgoing)?;
//! server.connect(s, Direction::Incoming)?;
//! loop {
//!     let mut moved = false;
//!     client.flush()?;
//!     server.flush()?;
//!     while let Some(out) = client.poll_output() {
//!         if let Output::Send { frame, .. } = out {
//!             server.receive(0, s, &frame)?;
//!             moved = true;
//!         }
//!     }
//!     server.flush()?;
//!     while let Some(out) = server.poll_output() {
//!         if let Output::Send { frame, .. } = out {
//!             client.receive(0, c, &frame)?;
//!             moved = true;
//!         }
//!     }
//!     if !moved { break; }
//! }
//! let title = server.view(&doc, |d| d.get(ROOT, "title").unwrap().unwrap().0.to_string())?;
//! assert_eq!(title, "\"offline edit\"");
//! assert_eq!(server.heads(&doc)?, client.heads(&doc)?);
//! # Ok(()) }
//! ```

mod chunk;
mod document_id;
mod documents;
pub mod error;
pub mod feed;
pub mod link;
mod peer;
mod policy;
pub mod protocol;
mod repo;
pub mod rows;
pub mod storage;

pub use automerge::{self, Automerge};
pub use document_id::{AutomergeUrl, DocumentId, ParseIdError, URL_PREFIX};
pub use documents::DocumentsConfig;
pub use error::{DecodeError, RepoError, RowError, StorageError};
pub use feed::{ChangeFeed, Cursor, FeedEvent, Origin};
pub use link::{LinkReport, sync_in_process};
pub use peer::{ConnectionId, PeerId, PeerInfo, StorageId};
pub use policy::{Access, ServeOnRequest, ShareAll, SharePolicy};
pub use repo::{Direction, Event, FlushReport, Millis, Output, Repo, RepoConfig};
#[cfg(feature = "redb")]
pub use storage::RedbStorage;
pub use storage::{MemoryStorage, Storage, StorageKey, WriteBatch};
