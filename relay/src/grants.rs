//! Who may connect and what they may see: the relay's [`Auth`] modes and the
//! [`GrantPolicy`] that turns a connection's token into document access.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tandem_engine::{Access, ConnectionId, DocumentId, PeerInfo, SharePolicy};
use tokio_tungstenite::tungstenite::handshake::server::Request;
use tokio_tungstenite::tungstenite::http::header;

use crate::auth::{AuthError, Claims, verify};

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
/// The repo given to [`serve`](crate::serve) must have been opened with [`Auth::policy`]
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
    pub(crate) secret: Arc<[u8]>,
    pub(crate) table: Arc<GrantTable>,
}

#[derive(Default)]
pub(crate) struct GrantTable {
    claims: Mutex<HashMap<ConnectionId, Claims>>,
    /// How many policies were made from this table (a sanity check in `serve`).
    pub(crate) policies: AtomicUsize,
}

impl GrantTable {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<ConnectionId, Claims>> {
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
        .query()
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "token"))
        .map(|(_, v)| v.into_owned())
}

/// Check the upgrade request's token.
pub(crate) fn authenticate(
    auth: &TokenAuth,
    request: &Request,
    now_secs: u64,
) -> Result<Claims, AuthError> {
    let token = presented_token(request).ok_or(AuthError::Missing)?;
    verify(&auth.secret, &token, now_secs)
}
