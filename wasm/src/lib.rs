//! # tandem-wasm
//!
//! Tandem for browsers: the engine compiled to WebAssembly, with
//! wasm-bindgen bindings (the JS class `Tandem`, with TypeScript types),
//! persistence in IndexedDB, and a WebSocket client speaking the
//! automerge-repo protocol to a Tandem relay or any automerge-repo server.
//!
//! ## How data flows
//!
//! ```text
//! JS: tandem.put(doc, path, value) ──> ops::apply in Repo::change ──> Repo::flush
//!     ──> BrowserStorage: the batch lands in the in-memory mirror and a queue
//!     ──> writer task: queued batches ──> one IndexedDB transaction (strict durability)
//!     ──> the gate releases what the engine produced after that batch:
//!           sync frames ──> WebSocket          events ──> subscribe() callbacks
//! WebSocket frame ──> Repo::receive ──> (the same path from Repo::flush on)
//! ```
//!
//! Nothing is advertised to a peer before IndexedDB has it, so a tab that
//! crashes or reloads never leaves a peer believing it holds a change it
//! lost; and everything committed survives a reload, offline edits included.
//! `docs/design.md` ("Browser persistence") explains the design.
//!
//! Build the npm-style package with `wasm/build.sh` (into `wasm/pkg`). From
//! JS:
//!
//! ```js
//! import init, { Tandem } from "./pkg/tandem_wasm.js";
//! await init();
//! const tandem = await Tandem.open("my-tab");
//! const doc = tandem.create({ tasks: {} });
//! tandem.put(doc, ["tasks", "t1"], { title: "Buy milk", done: false });
//! tandem.putText(doc, ["tasks", "t1", "notes"], "");
//! tandem.subscribe((event) => console.log(event));
//! tandem.connect("ws://127.0.0.1:3030", { token });
//! ```
//!
//! The pieces that do not touch the browser are plain Rust and tested
//! natively: [`ops`] (the path-addressed edits), [`BrowserStorage`] (the
//! mirror and queue), [`gate`] (holding outputs until durable) and
//! [`backoff`]:
//!
//! ```
//! use tandem_wasm::ops::{self, Key, Op, Value};
//! use tandem_wasm::{BrowserStorage, automerge::AutoCommit};
//! use tandem_engine::{PeerId, Repo, RepoConfig, ShareAll, Storage};
//!
//! let storage = BrowserStorage::new();
//! let mut repo = Repo::open(storage.clone(), RepoConfig::new(PeerId::new("tab")), ShareAll).unwrap();
//! let doc = repo.create().unwrap();
//! let put = Op::Put { path: vec![Key::Map("done".into())], value: Value::Bool(false) };
//! repo.change(&doc, |d: &mut AutoCommit| Ok(ops::apply(d, &[put]).unwrap())).unwrap();
//! repo.flush().unwrap();
//! // The flush's writes wait in the queue for IndexedDB.
//! assert!(storage.take_pending().is_some());
//! ```

pub mod backoff;
mod driver;
pub mod error;
pub mod gate;
mod idb;
mod js;
mod lock;
pub mod ops;
mod rows;
mod socket;
mod storage;
mod tandem;

pub use error::Error;
pub use storage::{BrowserStorage, Pending};
pub use tandem::{ConnectOptions, InitialValue, OpenOptions, PathArg, Tandem};
pub use tandem_engine::automerge;

use tandem_engine::{MemoryStorage, PeerId, Repo, RepoConfig, RepoError, ShareAll};
use wasm_bindgen::prelude::wasm_bindgen;

/// An in-memory repo for a browser tab with the given peer id, for Rust
/// code that drives the engine itself (JS uses [`Tandem`]).
pub fn open_in_memory(peer_id: &str) -> Result<Repo<MemoryStorage>, RepoError> {
    let mut config = RepoConfig::new(PeerId::new(peer_id));
    // A tab without persistence keeps nothing across reloads: say so to
    // peers, so they do not keep sync state for a store that will vanish.
    config.ephemeral = true;
    Repo::open(MemoryStorage::new(), config, ShareAll)
}

/// Runs when the module is instantiated. In debug builds (the tests),
/// Rust panics are printed to the console with their message; the release
/// package aborts at once (see wasm/build.sh), which keeps it small. Either
/// way the module instance is unusable after a panic.
#[wasm_bindgen(start)]
fn start() {
    #[cfg(debug_assertions)]
    std::panic::set_hook(Box::new(|info| {
        web_sys_console_error(&format!("tandem-wasm panicked: {info}"));
    }));
}

#[cfg(debug_assertions)]
#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn web_sys_console_error(message: &str);
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{ROOT, ReadDoc, transaction::Transactable};

    #[test]
    fn an_ephemeral_tab_repo_edits_and_reads() {
        let mut repo = open_in_memory("tab").unwrap();
        let doc = repo.create().unwrap();
        repo.change(&doc, |d| d.put(ROOT, "n", 3)).unwrap();
        repo.flush().unwrap();
        let n = repo
            .view(&doc, |d| d.get(ROOT, "n").unwrap().unwrap().0.as_i64())
            .unwrap();
        assert_eq!(n, Some(3));
    }
}
