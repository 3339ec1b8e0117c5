//! Signed access tokens for the relay.
//!
//! A token is `base64url(JSON claims) "." base64url(HMAC-SHA256(secret, payload))`,
//! both parts base64url without padding, where `payload` is the first part as
//! it appears in the token (its ASCII text, as in a JWT). The claims say which
//! documents the bearer may read or write and until when:
//!
//! ```json
//! {"docs":[{"doc":"2Bfw…","access":"read-write"},{"doc":"*","access":"read"}],
//!  "exp":1767225600,"sub":"alice"}
//! ```
//!
//! * `doc` is either one document id in its bs58check text form (as in
//!   `automerge:<id>`), or `"*"` for every document. There are no other
//!   patterns (no prefixes: document ids are random, so a prefix names nothing).
//! * `access` is `"read"` (the bearer receives the document; its changes are
//!   not applied) or `"read-write"`. When several grants match a document the
//!   widest wins; a document no grant matches is [`Access::None`]: the bearer
//!   is told `doc-unavailable` and never learns whether it exists.
//! * `exp` is the expiry in Unix seconds: the token is refused from that
//!   second on, and a connection opened with it is closed then.
//! * `sub` is an optional free-form subject, used only in logs.
//!
//! Tokens are minted with [`mint`] from the relay's secret and checked with
//! [`verify`]; the signature is compared in constant time.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
use tandem_engine::{Access, DocumentId};

type HmacSha256 = Hmac<Sha256>;

/// Which documents a grant covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every document (`"*"` in a token).
    All,
    /// One document (its bs58check id in a token).
    Document(DocumentId),
}

impl Scope {
    /// Whether this scope covers `doc`.
    pub fn covers(&self, doc: &DocumentId) -> bool {
        match self {
            Scope::All => true,
            Scope::Document(d) => d == doc,
        }
    }
}

impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Scope::All => s.serialize_str("*"),
            Scope::Document(d) => s.serialize_str(&d.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "*" {
            return Ok(Scope::All);
        }
        text.parse::<DocumentId>()
            .map(Scope::Document)
            .map_err(serde::de::Error::custom)
    }
}

/// One grant of a token: a scope and what may be done there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The documents (`"*"` or one bs58check document id).
    pub doc: Scope,
    /// [`Access::Read`] (`"read"`) or [`Access::ReadWrite`] (`"read-write"`).
    #[serde(with = "access_text")]
    pub access: Access,
}

impl Grant {
    /// Read access to every document.
    pub fn read_all() -> Self {
        Self {
            doc: Scope::All,
            access: Access::Read,
        }
    }

    /// Read and write access to every document.
    pub fn read_write_all() -> Self {
        Self {
            doc: Scope::All,
            access: Access::ReadWrite,
        }
    }

    /// Read access to one document.
    pub fn read(doc: DocumentId) -> Self {
        Self {
            doc: Scope::Document(doc),
            access: Access::Read,
        }
    }

    /// Read and write access to one document.
    pub fn read_write(doc: DocumentId) -> Self {
        Self {
            doc: Scope::Document(doc),
            access: Access::ReadWrite,
        }
    }
}

mod access_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use tandem_engine::Access;

    pub(super) fn serialize<S: Serializer>(a: &Access, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Access::Read => s.serialize_str("read"),
            Access::ReadWrite => s.serialize_str("read-write"),
            Access::None => Err(serde::ser::Error::custom(
                "a grant gives read or read-write access, not none",
            )),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Access, D::Error> {
        match String::deserialize(d)?.as_str() {
            "read" => Ok(Access::Read),
            "read-write" => Ok(Access::ReadWrite),
            other => Err(serde::de::Error::custom(format!(
                "access must be \"read\" or \"read-write\", not {other:?}"
            ))),
        }
    }
}

/// What a token grants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The grants; a document none of them covers is not accessible.
    pub docs: Vec<Grant>,
    /// Expiry, Unix seconds: the token is refused from this second on.
    pub exp: u64,
    /// Who the token is for (free-form, for logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
}

impl Claims {
    /// The access these claims give to `doc`: the widest of the grants that
    /// cover it, [`Access::None`] if none does.
    pub fn access(&self, doc: &DocumentId) -> Access {
        self.docs
            .iter()
            .filter(|g| g.doc.covers(doc))
            .map(|g| g.access)
            .max()
            .unwrap_or(Access::None)
    }

    /// Whether the claims have expired at `now` (Unix seconds).
    pub fn expired(&self, now: u64) -> bool {
        now >= self.exp
    }
}

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No token was presented (the relay requires one).
    #[error("token missing")]
    Missing,
    /// The token is not `payload.signature` in base64url, or its claims are
    /// not valid JSON of the expected shape.
    #[error("token malformed: {0}")]
    Malformed(String),
    /// The signature does not match (tampered, or minted with another secret).
    #[error("token signature invalid")]
    BadSignature,
    /// The token's `exp` has passed.
    #[error("token expired")]
    Expired,
}

fn mac(secret: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length")
}

/// Mint a token for `claims`, signed with `secret`.
///
/// # Panics
///
/// If a grant has [`Access::None`] (grants give read or read-write access).
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    let json = serde_json::to_vec(claims).expect("grants give read or read-write access");
    let payload = URL_SAFE_NO_PAD.encode(json);
    let mut m = mac(secret);
    m.update(payload.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
    format!("{payload}.{signature}")
}

/// Check a token's signature and expiry at `now` (Unix seconds) and return
/// its claims. The signature is checked (in constant time) before the claims
/// are parsed.
pub fn verify(secret: &[u8], token: &str, now: u64) -> Result<Claims, AuthError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    let (payload, signature) = token
        .split_once('.')
        .ok_or_else(|| AuthError::Malformed("expected payload.signature".into()))?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|e| AuthError::Malformed(format!("signature is not base64url: {e}")))?;
    let mut m = mac(secret);
    m.update(payload.as_bytes());
    m.verify_slice(&signature)
        .map_err(|_| AuthError::BadSignature)?;
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| AuthError::Malformed(format!("payload is not base64url: {e}")))?;
    let claims: Claims =
        serde_json::from_slice(&json).map_err(|e| AuthError::Malformed(format!("claims: {e}")))?;
    if claims.expired(now) {
        return Err(AuthError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"relay secret for tests";

    fn claims() -> Claims {
        Claims {
            docs: vec![Grant::read_write(DocumentId::random()), Grant::read_all()],
            exp: 1_000,
            sub: Some("alice".into()),
        }
    }

    #[test]
    fn round_trip() {
        let c = claims();
        let token = mint(SECRET, &c);
        assert_eq!(verify(SECRET, &token, 999), Ok(c));
    }

    #[test]
    fn json_form_is_documented_one() {
        let doc = DocumentId::random();
        let c = Claims {
            docs: vec![Grant::read(doc), Grant::read_write_all()],
            exp: 5,
            sub: None,
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"docs":[{{"doc":"{doc}","access":"read"}},{{"doc":"*","access":"read-write"}}],"exp":5}}"#
            )
        );
        assert_eq!(serde_json::from_str::<Claims>(&json).unwrap(), c);
    }

    #[test]
    fn widest_matching_grant_wins() {
        let (a, b) = (DocumentId::random(), DocumentId::random());
        let c = Claims {
            docs: vec![Grant::read_all(), Grant::read_write(a)],
            exp: 1,
            sub: None,
        };
        assert_eq!(c.access(&a), Access::ReadWrite);
        assert_eq!(c.access(&b), Access::Read);
        let only_a = Claims {
            docs: vec![Grant::read(a)],
            exp: 1,
            sub: None,
        };
        assert_eq!(only_a.access(&a), Access::Read);
        assert_eq!(only_a.access(&b), Access::None);
    }

    #[test]
    fn expired_is_refused_from_exp_on() {
        let token = mint(SECRET, &claims());
        assert_eq!(verify(SECRET, &token, 1_000), Err(AuthError::Expired));
        assert_eq!(verify(SECRET, &token, 5_000), Err(AuthError::Expired));
    }

    #[test]
    fn tampered_payload_is_refused() {
        let token = mint(SECRET, &claims());
        let (payload, sig) = token.split_once('.').unwrap();
        // Re-encode claims with a later expiry under the old signature.
        let mut c = claims();
        c.exp = u64::MAX;
        let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap());
        assert_ne!(forged, payload);
        assert_eq!(
            verify(SECRET, &format!("{forged}.{sig}"), 0),
            Err(AuthError::BadSignature)
        );
        // Flip one character of the payload.
        let mut bytes = payload.as_bytes().to_vec();
        bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(bytes).unwrap();
        assert_eq!(
            verify(SECRET, &format!("{flipped}.{sig}"), 0),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn other_secret_or_signature_is_refused() {
        let token = mint(SECRET, &claims());
        assert_eq!(
            verify(b"another secret", &token, 0),
            Err(AuthError::BadSignature)
        );
        let (payload, _) = token.split_once('.').unwrap();
        let wrong = URL_SAFE_NO_PAD.encode([0u8; 32]);
        assert_eq!(
            verify(SECRET, &format!("{payload}.{wrong}"), 0),
            Err(AuthError::BadSignature)
        );
        let short = URL_SAFE_NO_PAD.encode([0u8; 4]);
        assert_eq!(
            verify(SECRET, &format!("{payload}.{short}"), 0),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn malformed_is_refused() {
        for bad in ["no-dot", "a.b.c", "payload.!!not-base64!!", "...."] {
            assert!(
                matches!(verify(SECRET, bad, 0), Err(AuthError::Malformed(_))),
                "{bad:?}: {:?}",
                verify(SECRET, bad, 0)
            );
        }
        assert_eq!(verify(SECRET, "", 0), Err(AuthError::Missing));
        // Correctly signed, but the claims are not claims.
        for json in [
            "not json",
            r#"{"docs":[],"exp":"soon"}"#,
            r#"{"docs":[{"doc":"not-an-id","access":"read"}],"exp":9}"#,
            r#"{"docs":[{"doc":"*","access":"none"}],"exp":9}"#,
        ] {
            let payload = URL_SAFE_NO_PAD.encode(json);
            let mut m = mac(SECRET);
            m.update(payload.as_bytes());
            let sig = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
            assert!(
                matches!(
                    verify(SECRET, &format!("{payload}.{sig}"), 0),
                    Err(AuthError::Malformed(_))
                ),
                "{json}"
            );
        }
    }
}
