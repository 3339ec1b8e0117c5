//! # tandem-wasm
//!
//! Tandem for browsers. This crate builds the engine without its native-only
//! parts (the redb file backend), which is what the wasm32 build needs; the
//! wasm-bindgen bindings, IndexedDB persistence and the browser WebSocket
//! client build on [`BrowserRepo`].
//!
//! ```
//! use tandem_wasm::{open_in_memory, automerge::{ROOT, transaction::Transactable}};
//!
//! let mut repo = open_in_memory("tab-1").unwrap();
//! let doc = repo.create().unwrap();
//! repo.change(&doc, |d| d.put(ROOT, "done", false)).unwrap();
//! repo.flush().unwrap();
//! ```

pub use tandem_engine::automerge;
use tandem_engine::{MemoryStorage, PeerId, Repo, RepoConfig, RepoError, ShareAll};

/// The repo a browser tab runs: documents in memory, shared with every peer.
pub type BrowserRepo = Repo<MemoryStorage>;

/// Open an in-memory repo for a browser tab with the given peer id.
pub fn open_in_memory(peer_id: &str) -> Result<BrowserRepo, RepoError> {
    let mut config = RepoConfig::new(PeerId::new(peer_id));
    // A tab without persistence keeps nothing across reloads: say so to
    // peers, so they do not keep sync state for a store that will vanish.
    config.ephemeral = true;
    Repo::open(MemoryStorage::new(), config, ShareAll)
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
