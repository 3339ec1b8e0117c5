//! Document identifiers compatible with automerge-repo.
//!
//! A [`DocumentId`] is 16 bytes. Its text form is the bs58check encoding of
//! those bytes, and its URL form is `automerge:<id>`, optionally followed by
//! `#head|head` where each head is a bs58check-encoded change hash.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;
use std::str::FromStr;

use automerge::ChangeHash;

/// The prefix of an automerge URL.
pub const URL_PREFIX: &str = "automerge:";

/// The 16-byte identifier of a document, as automerge-repo defines it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocumentId([u8; 16]);

/// Why a document id or automerge URL could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseIdError {
    /// The text is not valid bs58check (bad alphabet or checksum).
    #[error("invalid bs58check document id {0:?}")]
    Encoding(String),
    /// The decoded bytes are not 16 long.
    #[error("document id must be 16 bytes, found {0}")]
    Length(usize),
    /// The URL does not start with `automerge:`.
    #[error("automerge URL must start with {URL_PREFIX:?}: {0:?}")]
    MissingPrefix(String),
    /// A head in the URL is not a bs58check-encoded 32-byte change hash.
    #[error("invalid head {0:?} in automerge URL")]
    Head(String),
    /// The URL has more than one `#` section.
    #[error("automerge URL has more than one heads section: {0:?}")]
    ExtraSection(String),
}

impl DocumentId {
    /// A document id from its 16 bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// A new random document id (from the operating system's randomness).
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("the operating system has no randomness source");
        Self(bytes)
    }

    /// The raw 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Parse the binary form, as sent in a CBOR byte string.
    pub fn try_from_slice(bytes: &[u8]) -> Result<Self, ParseIdError> {
        let arr: [u8; 16] = bytes
            .try_into()
            .map_err(|_| ParseIdError::Length(bytes.len()))?;
        Ok(Self(arr))
    }

    /// The `automerge:<id>` URL of this document.
    pub fn url(&self) -> AutomergeUrl {
        AutomergeUrl {
            document: *self,
            heads: None,
        }
    }
}

/// How many formatted ids [`DocumentId`]'s `Display` remembers (per
/// thread, under 100 bytes each, so at most about 400 KB). When full it
/// starts afresh.
const RECENT_IDS: usize = 4096;

thread_local! {
    /// The text forms of ids formatted lately. The text form costs a double
    /// SHA-256 and a base-58 conversion, and the engine formats one id
    /// several times (each storage key of a document starts with it): when
    /// a row is created, and again when the flush stores it, a thousand
    /// other ids later in a batched insert.
    static RECENT: RefCell<HashMap<DocumentId, Rc<str>>> = RefCell::new(HashMap::new());
}

impl fmt::Display for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let encode = || -> Rc<str> { bs58::encode(&self.0).with_check().into_string().into() };
        // (While the thread exits, its locals may be gone: encode afresh.)
        let text = RECENT
            .try_with(|recent| {
                let mut recent = recent.borrow_mut();
                if let Some(text) = recent.get(self) {
                    return text.clone();
                }
                if recent.len() == RECENT_IDS {
                    recent.clear();
                }
                recent.entry(*self).or_insert_with(encode).clone()
            })
            .unwrap_or_else(|_| encode());
        f.write_str(&text)
    }
}

impl fmt::Debug for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocumentId({self})")
    }
}

impl FromStr for DocumentId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = bs58::decode(s)
            .with_check(None)
            .into_vec()
            .map_err(|_| ParseIdError::Encoding(s.to_owned()))?;
        Self::try_from_slice(&bytes)
    }
}

/// An `automerge:<id>[#head|head]` URL: a document, optionally at given heads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AutomergeUrl {
    /// The document the URL names.
    pub document: DocumentId,
    /// The heads the URL pins, if it has a `#` section (possibly empty).
    pub heads: Option<Vec<ChangeHash>>,
}

impl fmt::Display for AutomergeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{URL_PREFIX}{}", self.document)?;
        if let Some(heads) = &self.heads {
            f.write_str("#")?;
            for (i, head) in heads.iter().enumerate() {
                if i > 0 {
                    f.write_str("|")?;
                }
                f.write_str(&bs58::encode(head.0).with_check().into_string())?;
            }
        }
        Ok(())
    }
}

impl FromStr for AutomergeUrl {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(URL_PREFIX)
            .ok_or_else(|| ParseIdError::MissingPrefix(s.to_owned()))?;
        let mut parts = rest.split('#');
        let document: DocumentId = parts.next().unwrap_or_default().parse()?;
        let heads = parts
            .next()
            .map(|section| {
                section
                    .split('|')
                    .filter(|h| !h.is_empty())
                    .map(parse_head)
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        if parts.next().is_some() {
            return Err(ParseIdError::ExtraSection(s.to_owned()));
        }
        Ok(Self { document, heads })
    }
}

fn parse_head(text: &str) -> Result<ChangeHash, ParseIdError> {
    let bytes = bs58::decode(text)
        .with_check(None)
        .into_vec()
        .map_err(|_| ParseIdError::Head(text.to_owned()))?;
    ChangeHash::try_from(bytes.as_slice()).map_err(|_| ParseIdError::Head(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_text_forms_stay_right_for_many_ids() {
        // More than the cache holds, so it fills and starts afresh.
        let ids: Vec<DocumentId> = (0..(3 * RECENT_IDS / 2) as u32)
            .map(|i| {
                let mut bytes = [7u8; 16];
                bytes[..4].copy_from_slice(&i.to_le_bytes());
                DocumentId::from_bytes(bytes)
            })
            .collect();
        let direct = |id: &DocumentId| bs58::encode(id.0).with_check().into_string();
        for round in 0..3 {
            // Forwards, backwards, and one id repeated among the others.
            let order: Vec<&DocumentId> = match round {
                0 => ids.iter().collect(),
                1 => ids.iter().rev().collect(),
                _ => ids.iter().flat_map(|id| [id, &ids[0]]).collect(),
            };
            for id in order {
                assert_eq!(id.to_string(), direct(id));
                assert_eq!(id.to_string().parse::<DocumentId>().unwrap(), *id);
            }
        }
    }

    #[test]
    fn text_form_round_trips_and_checks_its_checksum() {
        let id = DocumentId::from_bytes([7; 16]);
        let text = id.to_string();
        assert_eq!(text.parse::<DocumentId>().unwrap(), id);
        // Flip one character: the checksum must catch it.
        let mut broken = text.clone().into_bytes();
        broken[3] = if broken[3] == b'2' { b'3' } else { b'2' };
        let broken = String::from_utf8(broken).unwrap();
        assert!(matches!(
            broken.parse::<DocumentId>(),
            Err(ParseIdError::Encoding(_))
        ));
    }

    #[test]
    fn parses_an_id_made_by_automerge_repo() {
        // Generated by @automerge/automerge-repo 2.5.6 `repo.create().url`.
        let url: AutomergeUrl = "automerge:4EcsfZpomnR2iXxcfUJ9Wxqay2u".parse().unwrap();
        assert_eq!(url.heads, None);
        assert_eq!(url.to_string(), "automerge:4EcsfZpomnR2iXxcfUJ9Wxqay2u");
    }

    #[test]
    fn wrong_length_is_refused() {
        let text = bs58::encode([1u8; 12]).with_check().into_string();
        assert_eq!(text.parse::<DocumentId>(), Err(ParseIdError::Length(12)));
    }

    #[test]
    fn url_with_heads_round_trips() {
        let url = AutomergeUrl {
            document: DocumentId::from_bytes([9; 16]),
            heads: Some(vec![ChangeHash([1; 32]), ChangeHash([2; 32])]),
        };
        let text = url.to_string();
        assert!(text.contains('#') && text.contains('|'));
        assert_eq!(text.parse::<AutomergeUrl>().unwrap(), url);
        let empty = AutomergeUrl {
            heads: Some(vec![]),
            ..url
        };
        assert_eq!(empty.to_string().parse::<AutomergeUrl>().unwrap(), empty);
    }

    #[test]
    fn bad_urls_name_the_problem() {
        assert!(matches!(
            "automerge2j9k".parse::<AutomergeUrl>(),
            Err(ParseIdError::MissingPrefix(_))
        ));
        let id = DocumentId::from_bytes([3; 16]);
        assert!(matches!(
            format!("automerge:{id}#notahead").parse::<AutomergeUrl>(),
            Err(ParseIdError::Head(_))
        ));
        assert!(matches!(
            format!("automerge:{id}##").parse::<AutomergeUrl>(),
            Err(ParseIdError::ExtraSection(_))
        ));
    }
}
