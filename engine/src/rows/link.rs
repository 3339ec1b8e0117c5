//! Replication links and their synchronization controller (the
//! Master-Master Row-Level Synchronization pattern).
//!
//! A [`SyncLink`] joins two stores. Its controller keeps, in each store, the
//! link's last synchronization point: the position in that store's change
//! feed up to which everything was sent, and when. A run:
//!
//! 1. **Acquire**: the documents each side committed since its sync point
//!    (from its durable change feed), and the changes the other side lacks;
//! 2. **Manipulate**: the link's table filter drops what it does not carry
//!    (CRDT changes are content-addressed, so a link selects, it does not rewrite);
//! 3. **Write**: the other side applies them (idempotent: a change it has is
//!    a no-op) and the table strategies detect and resolve conflicts on read;
//!
//! then both sides flush and the new sync points are recorded durably. A
//! run that finds nothing changed sends nothing. Links compose: changes a
//! store received over one link are in its feed, so they travel on over its
//! other links, and a ring or star of stores converges.

use std::borrow::BorrowMut;
use std::collections::BTreeSet;

use automerge::{ChangeHash, ReadDoc};

use super::document::{self, At};
use super::{Rows, cleanup};
use crate::error::{RepoError, RowError};
use crate::feed::Cursor;
use crate::storage::{Storage, StorageKey, WriteBatch};
use crate::{DocumentId, PeerId, Repo, StorageId};

/// A named, durable replication link between two stores.
#[derive(Clone, Debug)]
pub struct SyncLink {
    name: String,
    tables: Option<BTreeSet<String>>,
}

/// A link's last synchronization point in one store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncPoint {
    /// Everything in this store's feed up to here was sent.
    pub cursor: Cursor,
    /// When the run that recorded it finished (wall-clock milliseconds).
    pub time: u64,
    /// The other store of the link.
    pub peer: Option<StorageId>,
}

/// What one [`SyncLink::run`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkRun {
    /// Documents compared (changed on either side since the sync points).
    pub documents: usize,
    /// Changes sent a→b and b→a.
    pub changes: (usize, usize),
    /// Bytes sent a→b and b→a (changes, and whole documents copied).
    pub bytes: (usize, usize),
    /// Documents copied whole a→b and b→a: the receiving store had none of
    /// the document, so it got the stored document (compressed, and loaded
    /// in one step) instead of its changes one by one. Their changes are
    /// not counted in `changes`.
    pub copied: (usize, usize),
    /// Documents one side refused because it purged them (reported, not
    /// resurrected).
    pub refused_purged: Vec<DocumentId>,
}

impl SyncLink {
    /// A link carrying every table (and raw document).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            tables: None,
        }
    }

    /// Carry only these tables' rows and catalogs.
    pub fn tables<I: IntoIterator<Item = T>, T: Into<String>>(mut self, tables: I) -> Self {
        self.tables = Some(tables.into_iter().map(Into::into).collect());
        self
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn key(&self) -> Result<StorageKey, RowError> {
        Ok(StorageKey::new(["~link", self.name.as_str()])?)
    }

    /// The link's last synchronization point recorded in `repo`.
    pub fn sync_point<S: Storage>(&self, repo: &Repo<S>) -> Result<SyncPoint, RowError> {
        let Some(bytes) = repo.storage().get(&self.key()?)? else {
            return Ok(SyncPoint::default());
        };
        let text = String::from_utf8(bytes)
            .map_err(|_| crate::StorageError::Corrupt("link sync point is not UTF-8".into()))?;
        let mut parts = text.splitn(3, ' ');
        let corrupt = || crate::StorageError::Corrupt(format!("bad link sync point {text:?}"));
        let cursor = parts
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(corrupt)?;
        let time = parts
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(corrupt)?;
        let peer = parts
            .next()
            .filter(|p| !p.is_empty())
            .map(|p| StorageId::new(p.to_owned()));
        Ok(SyncPoint {
            cursor: Cursor(cursor),
            time,
            peer,
        })
    }

    fn record<S: Storage, R: BorrowMut<Repo<S>>>(
        &self,
        rows: &mut Rows<S, R>,
        peer: &StorageId,
    ) -> Result<(), RowError> {
        let cursor = rows.repo_mut().feed().last_seq()?;
        let time = (rows.now)();
        let mut batch = WriteBatch::new();
        batch.put(
            self.key()?,
            format!("{cursor} {time} {}", peer.as_str()).into_bytes(),
        );
        rows.repo_mut().storage().commit(&batch)?;
        Ok(())
    }

    /// Documents committed in `rows` since the link's sync point there.
    fn acquire<S: Storage, R: BorrowMut<Repo<S>>>(
        &self,
        rows: &mut Rows<S, R>,
    ) -> Result<BTreeSet<DocumentId>, RowError> {
        let mut cursor = self.sync_point(rows.repo())?.cursor;
        let mut out = BTreeSet::new();
        loop {
            let page = rows.repo_mut().feed().read(cursor, 4096)?;
            let Some(last) = page.last() else { break };
            cursor = Cursor(last.seq);
            out.extend(page.into_iter().map(|e| e.document));
        }
        Ok(out)
    }

    fn carries<S: Storage, R: BorrowMut<Repo<S>>>(
        &self,
        rows: &mut Rows<S, R>,
        id: &DocumentId,
    ) -> Result<bool, RowError> {
        let Some(tables) = &self.tables else {
            return Ok(true);
        };
        if !rows.repo_mut().contains(id)? {
            return Ok(false);
        }
        let table = rows
            .repo_mut()
            .view(id, |d| document::state(d, &At(None)).table)?;
        Ok(table.is_some_and(|t| tables.contains(&t)))
    }

    /// Synchronize `a` and `b`: send each what changed on the other since
    /// the last run, make it durable on both, record the new sync points,
    /// and record what each side now acknowledges for cleanup.
    pub fn run<A: Storage, B: Storage, RA: BorrowMut<Repo<A>>, RB: BorrowMut<Repo<B>>>(
        &self,
        a: &mut Rows<A, RA>,
        b: &mut Rows<B, RB>,
    ) -> Result<LinkRun, RowError> {
        let (a_sid, b_sid) = (
            a.repo_mut().storage_id().clone(),
            b.repo_mut().storage_id().clone(),
        );
        let (a_peer, b_peer) = (
            a.repo_mut().peer_id().clone(),
            b.repo_mut().peer_id().clone(),
        );
        // The feed holds durable commits only: make pending edits durable first.
        a.flush()?;
        b.flush()?;
        let mut docs = self.acquire(a)?;
        docs.extend(self.acquire(b)?);
        let mut run = LinkRun::default();
        let mut deleted = Vec::new();
        for id in docs {
            if !(self.carries(a, &id)? || self.carries(b, &id)?) {
                continue;
            }
            run.documents += 1;
            let mut refused = false;
            let to_b = transfer(a, b, &id, &a_peer, &mut refused)?;
            to_b.count(&mut run.changes.0, &mut run.bytes.0, &mut run.copied.0);
            // A document b had none of is now a copy of a's: nothing to
            // send back.
            let copied_to_b = matches!(to_b, Sent::Document { .. });
            let surely_live = matches!(to_b, Sent::Document { live: true, .. });
            if !copied_to_b {
                let to_a = transfer(b, a, &id, &b_peer, &mut refused)?;
                to_a.count(&mut run.changes.1, &mut run.bytes.1, &mut run.copied.1);
            }
            if refused {
                run.refused_purged.push(id);
                continue;
            }
            // Both sides now hold the same heads; note deleted rows, reading
            // the side that has the document in memory (a copy whose bytes
            // show no delete flag is not even parsed).
            if surely_live {
                continue;
            }
            let is_deleted = |d: &automerge::Automerge| {
                (document::state(d, &At(None)).deleted_row(), d.get_heads())
            };
            let (is_deleted, heads) = if copied_to_b {
                b.repo_mut().view(&id, is_deleted)?
            } else if a.repo_mut().contains(&id)? {
                a.repo_mut().view(&id, is_deleted)?
            } else {
                continue;
            };
            if is_deleted {
                deleted.push((id, heads));
            }
        }
        a.flush()?;
        b.flush()?;
        // Each side acknowledges, for the other, the deletes both now hold.
        cleanup::record_acks(a, &b_sid, &deleted)?;
        cleanup::record_acks(b, &a_sid, &deleted)?;
        a.add_member(&b_sid)?;
        b.add_member(&a_sid)?;
        self.record(a, &b_sid)?;
        self.record(b, &a_sid)?;
        Ok(run)
    }
}

/// What one [`transfer`] sent.
enum Sent {
    Nothing,
    Changes {
        count: usize,
        bytes: usize,
    },
    /// A whole document; `live` when its bytes showed it holds no delete
    /// flag ([`document::surely_live`]).
    Document {
        bytes: usize,
        live: bool,
    },
}

impl Sent {
    fn count(&self, changes: &mut usize, bytes: &mut usize, copied: &mut usize) {
        match *self {
            Sent::Nothing => {}
            Sent::Changes { count, bytes: b } => {
                *changes += count;
                *bytes += b;
            }
            Sent::Document { bytes: b, .. } => {
                *copied += 1;
                *bytes += b;
            }
        }
    }
}

/// Send `from`'s changes to `id` that `to` lacks: the stored document when
/// `to` has none of it, otherwise the missing changes.
fn transfer<F: Storage, T: Storage, RF: BorrowMut<Repo<F>>, RT: BorrowMut<Repo<T>>>(
    from: &mut Rows<F, RF>,
    to: &mut Rows<T, RT>,
    id: &DocumentId,
    from_peer: &PeerId,
    refused: &mut bool,
) -> Result<Sent, RowError> {
    let to_has = to.repo_mut().contains(id)?;
    let document = if to_has {
        None
    } else {
        from.repo_mut().stored_bytes(id)?
    };
    if document.is_none() && !from.repo_mut().contains(id)? {
        return Ok(Sent::Nothing);
    }
    let (result, sent) = match document {
        Some(document) => (
            to.repo_mut().apply_document(id, &document, from_peer),
            Sent::Document {
                bytes: document.len(),
                live: document::surely_live(&document),
            },
        ),
        None => {
            let have = if to_has {
                frontier(from, to, id)?
            } else {
                Vec::new()
            };
            let changes = from.repo_mut().changes_since(id, &have)?;
            if changes.is_empty() {
                return Ok(Sent::Nothing);
            }
            let sent = Sent::Changes {
                count: changes.len(),
                bytes: changes.iter().map(Vec::len).sum(),
            };
            (to.repo_mut().apply_changes(id, &changes, from_peer), sent)
        }
    };
    match result {
        Ok(_) => Ok(sent),
        Err(RepoError::Purged(_)) => {
            *refused = true;
            Ok(Sent::Nothing)
        }
        Err(e) => Err(e.into()),
    }
}

/// The latest changes of `to`'s history that `from` also has: walk back
/// from `to`'s heads through the changes `from` lacks (few, when the two
/// were in sync recently), so `from` sends exactly what `to` is missing.
fn frontier<F: Storage, T: Storage, RF: BorrowMut<Repo<F>>, RT: BorrowMut<Repo<T>>>(
    from: &mut Rows<F, RF>,
    to: &mut Rows<T, RT>,
    id: &DocumentId,
) -> Result<Vec<ChangeHash>, RowError> {
    let mut stack = to.repo_mut().heads(id)?;
    let mut seen = BTreeSet::new();
    let mut known = Vec::new();
    while let Some(h) = stack.pop() {
        if !seen.insert(h) {
            continue;
        }
        if from
            .repo_mut()
            .view(id, |d| d.get_change_by_hash(&h).is_some())?
        {
            known.push(h);
        } else if let Some(deps) = to
            .repo_mut()
            .view(id, |d| d.get_change_by_hash(&h).map(|c| c.deps().to_vec()))?
        {
            stack.extend(deps);
        }
    }
    Ok(known)
}
