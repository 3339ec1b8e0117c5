//! Cleanup of deleted rows: purge once every known replica acknowledged.
//!
//! A deleted row keeps its document (the delete flag is its tombstone) until
//! every member replica of this store is known to hold the row's current
//! heads, delete included: through a replication link run, or the sync
//! state persisted with a storing peer. Then [`Rows::cleanup`] purges the
//! document physically, leaving a small marker so a late update for it is
//! refused and reported ([`crate::Event::PurgedDocumentUpdate`], or
//! [`LinkRun::refused_purged`](super::LinkRun)), never resurrected, and
//! moves the key to its next generation in the catalog so inserting the key
//! again makes a fresh row. A member that has not acknowledged blocks the
//! purge; [`Rows::retire_member`] removes it from the membership.

use std::borrow::BorrowMut;

use crate::Repo;
use std::collections::BTreeSet;

use automerge::{ChangeHash, ReadDoc};

use super::Rows;
use super::document::{self, At};
use crate::error::RowError;
use crate::feed::Cursor;
use crate::storage::{Storage, StorageKey, WriteBatch};
use crate::{DocumentId, StorageId};

const CURSOR: &str = "tandem.cleanup";

/// What one [`Rows::cleanup`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Rows purged, as (table, key).
    pub purged: Vec<(String, String)>,
    /// Deleted rows still waiting, as (table, key, members that have not
    /// acknowledged the delete).
    pub waiting: Vec<(String, String, Vec<StorageId>)>,
}

fn member_key(sid: &StorageId) -> Result<StorageKey, RowError> {
    Ok(StorageKey::new(["~member", sid.as_str()])?)
}

fn tomb_key(id: &DocumentId) -> StorageKey {
    StorageKey::from_trusted(vec!["~tomb".into(), id.to_string()])
}

fn ack_key(id: &DocumentId, sid: &StorageId) -> Result<StorageKey, RowError> {
    Ok(StorageKey::new(["~ack", &id.to_string(), sid.as_str()])?)
}

fn encode_heads(heads: &[ChangeHash]) -> Vec<u8> {
    heads.iter().flat_map(|h| h.0).collect()
}

fn decode_heads(bytes: &[u8]) -> Vec<ChangeHash> {
    bytes
        .chunks_exact(32)
        .map(|c| ChangeHash(c.try_into().expect("32 bytes")))
        .collect()
}

/// After a link run: `peer` holds the same heads as `rows` for these
/// deleted rows (the only ones cleanup asks about).
pub(crate) fn record_acks<S: Storage, R: BorrowMut<Repo<S>>>(
    rows: &mut Rows<S, R>,
    peer: &StorageId,
    deleted: &[(DocumentId, Vec<ChangeHash>)],
) -> Result<(), RowError> {
    let mut batch = WriteBatch::new();
    for (id, heads) in deleted {
        batch.put(ack_key(id, peer)?, encode_heads(heads));
        batch.put(tomb_key(id), Vec::new());
    }
    if !batch.is_empty() {
        rows.repo_mut().storage().commit(&batch)?;
    }
    Ok(())
}

impl<S: Storage, R: BorrowMut<Repo<S>>> Rows<S, R> {
    /// Add a replica (by storage id) whose acknowledgement deletes wait for.
    /// Replication links add both ends; storing peers connected when
    /// [`cleanup`](Self::cleanup) runs are added too.
    pub fn add_member(&mut self, sid: &StorageId) -> Result<(), RowError> {
        if sid == self.repo().storage_id() {
            return Ok(());
        }
        let key = member_key(sid)?;
        if self.repo_mut().storage().get(&key)?.is_none() {
            let mut batch = WriteBatch::new();
            batch.put(key, Vec::new());
            self.repo_mut().storage().commit(&batch)?;
        }
        Ok(())
    }

    /// Remove a replica from the membership (it was decommissioned): deletes
    /// stop waiting for it. If it ever returns, its updates to purged rows
    /// are refused and reported.
    pub fn retire_member(&mut self, sid: &StorageId) -> Result<(), RowError> {
        let mut batch = WriteBatch::new();
        batch.delete(member_key(sid)?);
        self.repo_mut().storage().commit(&batch)?;
        Ok(())
    }

    /// The replicas deletes wait for.
    pub fn members(&self) -> Result<Vec<StorageId>, RowError> {
        let prefix = StorageKey::new(["~member"])?;
        Ok(self
            .repo()
            .storage()
            .scan(&prefix, None, usize::MAX)?
            .into_iter()
            .filter_map(|(k, _)| k.parts().get(1).map(|s| StorageId::new(s.clone())))
            .collect())
    }

    /// Purge every deleted row that all members have acknowledged; report
    /// the ones still waiting and for whom.
    pub fn cleanup(&mut self) -> Result<CleanupReport, RowError> {
        for peer in self.repo_mut().peers() {
            if let (Some(sid), false) = (&peer.storage_id, peer.ephemeral) {
                self.add_member(sid)?;
            }
        }
        self.note_tombstones()?;
        let members = self.members()?;
        let mut report = CleanupReport::default();
        let tombs =
            self.repo_mut()
                .storage()
                .scan(&StorageKey::new(["~tomb"])?, None, usize::MAX)?;
        for (key, _) in tombs {
            let Some(id) = key
                .parts()
                .get(1)
                .and_then(|s| s.parse::<DocumentId>().ok())
            else {
                continue;
            };
            let mut done = WriteBatch::new();
            done.delete(key.clone());
            if !self.repo_mut().contains(&id)? {
                self.repo_mut().storage().commit(&done)?;
                continue;
            }
            let (st, heads) = self
                .repo_mut()
                .view(&id, |d| (document::state(d, &At(None)), d.get_heads()))?;
            let (Some(table), Some(row_key), Some(_)) = (st.table, st.key, st.deleted) else {
                // Revived (or not a row): nothing to clean.
                self.repo_mut().storage().commit(&done)?;
                continue;
            };
            let mut lagging = Vec::new();
            for sid in &members {
                let mut acked = self
                    .repo_mut()
                    .acknowledged_heads(&id, sid)?
                    .unwrap_or_default();
                if let Some(bytes) = self.repo_mut().storage().get(&ack_key(&id, sid)?)? {
                    acked.extend(decode_heads(&bytes));
                }
                let covered = self.repo_mut().view(&id, |d| covers(d, &acked, &heads))?;
                if !covered {
                    lagging.push(sid.clone());
                }
            }
            if !lagging.is_empty() {
                report.waiting.push((table, row_key, lagging));
                continue;
            }
            self.purge_row(&id, &table, &row_key)?;
            for sid in &members {
                done.delete(ack_key(&id, sid)?);
            }
            self.repo_mut().storage().commit(&done)?;
            report.purged.push((table, row_key));
        }
        Ok(report)
    }

    /// Record a tombstone for every row the feed shows deleted since the
    /// last cleanup.
    fn note_tombstones(&mut self) -> Result<(), RowError> {
        let mut cursor = self.repo_mut().feed().cursor(CURSOR)?;
        loop {
            let page = self.repo_mut().feed().read(cursor, 4096)?;
            let Some(last) = page.last() else { break };
            let last = Cursor(last.seq);
            let docs: BTreeSet<DocumentId> = page.into_iter().map(|e| e.document).collect();
            let mut batch = WriteBatch::new();
            for id in docs {
                if self.repo_mut().contains(&id)?
                    && self
                        .repo_mut()
                        .view(&id, |d| document::state(d, &At(None)).deleted_row())?
                {
                    batch.put(tomb_key(&id), Vec::new());
                }
            }
            if !batch.is_empty() {
                self.repo_mut().storage().commit(&batch)?;
            }
            self.repo_mut().feed().save_cursor(CURSOR, last)?;
            cursor = last;
        }
        Ok(())
    }

    fn purge_row(&mut self, id: &DocumentId, table: &str, key: &str) -> Result<(), RowError> {
        let schema = self.schema(table);
        let (current, generation) = self.locate(&schema, key)?;
        let marker = format!("{table}\0{key}\0{generation}").into_bytes();
        self.repo_mut().purge(id, marker)?;
        if current == *id {
            // The key's next insert makes a fresh row document.
            self.list_in_catalog(&schema, &[(key.to_owned(), generation + 1)])?;
        }
        Ok(())
    }
}

/// Whether a store that acknowledged `acked` holds every change in `heads`.
fn covers(doc: &automerge::Automerge, acked: &[ChangeHash], heads: &[ChangeHash]) -> bool {
    let known: Vec<ChangeHash> = acked
        .iter()
        .filter(|h| doc.get_change_by_hash(h).is_some())
        .copied()
        .collect();
    if known.is_empty() {
        return heads.is_empty();
    }
    let missing: BTreeSet<ChangeHash> = doc.get_changes(&known).iter().map(|c| c.hash()).collect();
    heads.iter().all(|h| !missing.contains(h))
}
