//! The automerge-repo network protocol, version 1: messages and their CBOR.
//!
//! One CBOR map per binary WebSocket frame, text keys, byte strings untagged,
//! as the JS implementation (cbor-x) writes it. Decoding is lenient where the
//! JS code differs from its README: `peerMetadata` or `metadata`, `count` and
//! `timestamp` as integers or floats, `documentId` as text or bytes, `add` and
//! `remove` optional, `senderId`/`targetId` on `error` optional.

use automerge::sync;
use ciborium::Value;

use crate::error::DecodeError;
use crate::{DocumentId, PeerId, StorageId};

/// The only protocol version this implementation speaks.
pub const PROTOCOL_VERSION: &str = "1";

/// Tandem's extension that packs many `request` and `sync` messages into one
/// [`Message::Batch`] frame. A peer offers it in `join` and the accepting
/// peer accepts it in `peer` (both under `tandemExtensions`); only then do
/// either send batches, so a plain automerge-repo peer never sees one.
pub const BATCH_EXTENSION: &str = "batch";

/// One `request` or `sync` message inside a [`Message::Batch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batched {
    /// `request` (the sender does not have the document) rather than `sync`.
    pub request: bool,
    /// The document.
    pub document_id: DocumentId,
    /// An encoded automerge sync message.
    pub data: Vec<u8>,
}

impl Batched {
    /// The message as a plain `request` or `sync` between the two peers.
    pub fn into_message(self, sender_id: PeerId, target_id: PeerId) -> Message {
        let Self {
            request,
            document_id,
            data,
        } = self;
        if request {
            Message::Request {
                sender_id,
                target_id,
                document_id,
                data,
            }
        } else {
            Message::Sync {
                sender_id,
                target_id,
                document_id,
                data,
            }
        }
    }

    /// What this entry adds to a batch frame's size: its array header, kind,
    /// document id and data with their headers.
    pub fn encoded_len(&self) -> usize {
        1 + 1 + 17 + cbor_header_len(self.data.len()) + self.data.len()
    }
}

/// The size of a CBOR head for a length or integer `n`.
fn cbor_header_len(n: usize) -> usize {
    match n {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// `peerMetadata` of `join` and `peer`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    /// The peer's durable store, if any.
    pub storage_id: Option<StorageId>,
    /// Whether the peer keeps nothing.
    pub is_ephemeral: bool,
}

/// One storage id's heads in a `remote-heads-changed` message.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteHeads {
    /// Whose heads.
    pub storage_id: StorageId,
    /// The heads, in the encoding the sender used (bs58check in JS 2.x).
    pub heads: Vec<String>,
    /// Milliseconds since the epoch when the heads were observed.
    pub timestamp: f64,
}

/// A protocol message.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Message {
    /// Connecting peer -> accepting peer: the first message.
    Join {
        /// The connecting peer.
        sender_id: PeerId,
        /// Versions it speaks.
        supported_protocol_versions: Vec<String>,
        /// Its metadata, if sent.
        metadata: Option<PeerMetadata>,
        /// Tandem extensions it offers (`tandemExtensions`; empty for a
        /// plain automerge-repo peer).
        extensions: Vec<String>,
    },
    /// Accepting peer -> connecting peer: handshake accepted.
    Peer {
        /// The accepting peer.
        sender_id: PeerId,
        /// The connecting peer.
        target_id: PeerId,
        /// The version both will speak.
        selected_protocol_version: String,
        /// The accepting peer's metadata, if sent.
        metadata: Option<PeerMetadata>,
        /// The offered Tandem extensions it accepts (`tandemExtensions`).
        extensions: Vec<String>,
    },
    /// The sender is going away.
    Leave {
        /// Who leaves.
        sender_id: PeerId,
    },
    /// Something went wrong; the connection closes after it.
    Error {
        /// What went wrong.
        message: String,
        /// Sender, when given (the JS server sets it).
        sender_id: Option<PeerId>,
        /// Target, when given.
        target_id: Option<PeerId>,
    },
    /// An automerge sync message from a peer that does not have the document.
    Request {
        /// Sender.
        sender_id: PeerId,
        /// Target.
        target_id: PeerId,
        /// The document.
        document_id: DocumentId,
        /// An encoded automerge sync message.
        data: Vec<u8>,
    },
    /// An automerge sync message.
    Sync {
        /// Sender.
        sender_id: PeerId,
        /// Target.
        target_id: PeerId,
        /// The document.
        document_id: DocumentId,
        /// An encoded automerge sync message.
        data: Vec<u8>,
    },
    /// The sender does not have the document (or will not share it).
    DocUnavailable {
        /// Sender.
        sender_id: PeerId,
        /// Target.
        target_id: PeerId,
        /// The document.
        document_id: DocumentId,
    },
    /// An application message about a document that is not stored.
    Ephemeral {
        /// The original sender.
        sender_id: PeerId,
        /// Target.
        target_id: PeerId,
        /// Sequence number within the session, for de-duplication.
        count: u64,
        /// The sender's session.
        session_id: String,
        /// The document it concerns.
        document_id: DocumentId,
        /// Opaque payload.
        data: Vec<u8>,
    },
    /// Subscribe to or unsubscribe from heads of other stores.
    RemoteSubscriptionChange {
        /// Sender.
        sender_id: PeerId,
        /// Target.
        target_id: PeerId,
        /// Storage ids to add.
        add: Vec<StorageId>,
        /// Storage ids to remove.
        remove: Vec<StorageId>,
    },
    /// Heads of a document at other stores changed.
    RemoteHeadsChanged {
        /// Sender.
        sender_id: PeerId,
        /// Target.
        target_id: PeerId,
        /// The document.
        document_id: DocumentId,
        /// The new heads per store.
        new_heads: Vec<RemoteHeads>,
    },
    /// Tandem's extension ([`BATCH_EXTENSION`]): several `request` and
    /// `sync` messages in one frame, in order, each with its document id as
    /// 16 raw bytes. Only between peers that negotiated it.
    Batch {
        /// Sender.
        sender_id: PeerId,
        /// Target.
        target_id: PeerId,
        /// The messages, handled in order as if each came in a frame.
        messages: Vec<Batched>,
    },
}

impl Message {
    /// The protocol's name for this message's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Join { .. } => "join",
            Message::Peer { .. } => "peer",
            Message::Leave { .. } => "leave",
            Message::Error { .. } => "error",
            Message::Request { .. } => "request",
            Message::Sync { .. } => "sync",
            Message::DocUnavailable { .. } => "doc-unavailable",
            Message::Ephemeral { .. } => "ephemeral",
            Message::RemoteSubscriptionChange { .. } => "remote-subscription-change",
            Message::RemoteHeadsChanged { .. } => "remote-heads-changed",
            Message::Batch { .. } => "tandem-batch",
        }
    }

    /// The document this message is about, if any.
    pub fn document_id(&self) -> Option<DocumentId> {
        match self {
            Message::Request { document_id, .. }
            | Message::Sync { document_id, .. }
            | Message::DocUnavailable { document_id, .. }
            | Message::Ephemeral { document_id, .. }
            | Message::RemoteHeadsChanged { document_id, .. } => Some(*document_id),
            _ => None,
        }
    }

    /// Encode as one CBOR map, as the JS implementation does.
    pub fn encode(&self) -> Vec<u8> {
        let mut m = MapBuilder::new(self.type_name());
        match self {
            Message::Join {
                sender_id,
                supported_protocol_versions,
                metadata,
                extensions,
            } => {
                m.text("senderId", sender_id.as_str());
                m.texts("supportedProtocolVersions", supported_protocol_versions);
                if let Some(md) = metadata {
                    m.put("peerMetadata", encode_metadata(md));
                }
                m.extensions(extensions);
            }
            Message::Peer {
                sender_id,
                target_id,
                selected_protocol_version,
                metadata,
                extensions,
            } => {
                m.text("senderId", sender_id.as_str());
                m.text("targetId", target_id.as_str());
                m.text("selectedProtocolVersion", selected_protocol_version);
                if let Some(md) = metadata {
                    m.put("peerMetadata", encode_metadata(md));
                }
                m.extensions(extensions);
            }
            Message::Leave { sender_id } => m.text("senderId", sender_id.as_str()),
            Message::Error {
                message,
                sender_id,
                target_id,
            } => {
                m.text("message", message);
                if let Some(s) = sender_id {
                    m.text("senderId", s.as_str());
                }
                if let Some(t) = target_id {
                    m.text("targetId", t.as_str());
                }
            }
            Message::Request {
                sender_id,
                target_id,
                document_id,
                data,
            }
            | Message::Sync {
                sender_id,
                target_id,
                document_id,
                data,
            } => {
                m.routing(sender_id, target_id);
                m.text("documentId", &document_id.to_string());
                m.put("data", Value::Bytes(data.clone()));
            }
            Message::DocUnavailable {
                sender_id,
                target_id,
                document_id,
            } => {
                m.routing(sender_id, target_id);
                m.text("documentId", &document_id.to_string());
            }
            Message::Ephemeral {
                sender_id,
                target_id,
                count,
                session_id,
                document_id,
                data,
            } => {
                m.routing(sender_id, target_id);
                m.put("count", js_number(*count));
                m.text("sessionId", session_id);
                m.text("documentId", &document_id.to_string());
                m.put("data", Value::Bytes(data.clone()));
            }
            Message::RemoteSubscriptionChange {
                sender_id,
                target_id,
                add,
                remove,
            } => {
                m.routing(sender_id, target_id);
                let ids = |v: &Vec<StorageId>| {
                    Value::Array(v.iter().map(|s| Value::Text(s.to_string())).collect())
                };
                m.put("add", ids(add));
                m.put("remove", ids(remove));
            }
            Message::RemoteHeadsChanged {
                sender_id,
                target_id,
                document_id,
                new_heads,
            } => {
                m.routing(sender_id, target_id);
                m.text("documentId", &document_id.to_string());
                let entries = new_heads
                    .iter()
                    .map(|h| {
                        let heads =
                            Value::Array(h.heads.iter().map(|x| Value::Text(x.clone())).collect());
                        // A JS number: cbor-x turns 8-byte integers into
                        // BigInt, so write what JS writes, a float64.
                        let ts = Value::Float(h.timestamp);
                        (
                            Value::Text(h.storage_id.to_string()),
                            Value::Map(vec![
                                (Value::Text("heads".into()), heads),
                                (Value::Text("timestamp".into()), ts),
                            ]),
                        )
                    })
                    .collect();
                m.put("newHeads", Value::Map(entries));
            }
            Message::Batch {
                sender_id,
                target_id,
                messages,
            } => {
                m.routing(sender_id, target_id);
                let entries = messages
                    .iter()
                    .map(|b| {
                        Value::Array(vec![
                            Value::Integer(u8::from(!b.request).into()),
                            Value::Bytes(b.document_id.as_bytes().to_vec()),
                            Value::Bytes(b.data.clone()),
                        ])
                    })
                    .collect();
                m.put("messages", Value::Array(entries));
            }
        }
        m.finish()
    }

    /// Decode one frame. Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = bytes;
        let value: Value =
            ciborium::de::from_reader(&mut reader).map_err(|e| DecodeError::Cbor(e.to_string()))?;
        if !reader.is_empty() {
            return Err(DecodeError::Cbor(format!(
                "{} trailing bytes after the message",
                reader.len()
            )));
        }
        let Value::Map(entries) = value else {
            return Err(DecodeError::NotAMap);
        };
        let f = Fields {
            entries: &entries,
            kind: String::new(),
        };
        let kind = f.req_text("type")?;
        let f = Fields {
            entries: &entries,
            kind: kind.clone(),
        };
        let msg = match kind.as_str() {
            "join" => Message::Join {
                sender_id: f.peer("senderId")?,
                supported_protocol_versions: f
                    .texts("supportedProtocolVersions")?
                    .ok_or_else(|| f.missing("supportedProtocolVersions"))?,
                metadata: f.metadata()?,
                extensions: f.extensions()?,
            },
            "peer" => Message::Peer {
                sender_id: f.peer("senderId")?,
                target_id: f.peer("targetId")?,
                selected_protocol_version: f.req_text("selectedProtocolVersion")?,
                metadata: f.metadata()?,
                extensions: f.extensions()?,
            },
            "leave" => Message::Leave {
                sender_id: f.peer("senderId")?,
            },
            "error" => Message::Error {
                message: f.opt_text("message")?.unwrap_or_default(),
                sender_id: f.opt_text("senderId")?.map(PeerId::new),
                target_id: f.opt_text("targetId")?.map(PeerId::new),
            },
            "request" | "sync" => {
                let (sender_id, target_id) = (f.peer("senderId")?, f.peer("targetId")?);
                Batched {
                    request: kind == "request",
                    document_id: f.document()?,
                    data: f.bytes("data")?,
                }
                .into_message(sender_id, target_id)
            }
            "doc-unavailable" => Message::DocUnavailable {
                sender_id: f.peer("senderId")?,
                target_id: f.peer("targetId")?,
                document_id: f.document()?,
            },
            "ephemeral" => Message::Ephemeral {
                sender_id: f.peer("senderId")?,
                target_id: f.peer("targetId")?,
                count: f.number("count").and_then(|n| {
                    if n >= 0.0 && n.fract() == 0.0 {
                        Ok(n as u64)
                    } else {
                        Err(invalid("count", "not a non-negative integer"))
                    }
                })?,
                session_id: f.req_text("sessionId")?,
                document_id: f.document()?,
                data: f.bytes("data")?,
            },
            "remote-subscription-change" => Message::RemoteSubscriptionChange {
                sender_id: f.peer("senderId")?,
                target_id: f.peer("targetId")?,
                add: f.storage_ids("add")?,
                remove: f.storage_ids("remove")?,
            },
            "remote-heads-changed" => Message::RemoteHeadsChanged {
                sender_id: f.peer("senderId")?,
                target_id: f.peer("targetId")?,
                document_id: f.document()?,
                new_heads: f.new_heads()?,
            },
            // The browser build neither offers nor accepts batches (its
            // size budget), so a batch there is an unknown type.
            #[cfg(not(target_arch = "wasm32"))]
            "tandem-batch" => Message::Batch {
                sender_id: f.peer("senderId")?,
                target_id: f.peer("targetId")?,
                messages: f.batched()?,
            },
            other => return Err(DecodeError::UnknownType(other.to_owned())),
        };
        Ok(msg)
    }
}

/// A count as JS would write it: an integer while it fits in 32 bits (cbor-x
/// decodes wider integers to BigInt), a float64 beyond.
fn js_number(n: u64) -> Value {
    if n <= u64::from(u32::MAX) {
        Value::Integer(n.into())
    } else {
        Value::Float(n as f64)
    }
}

fn encode_metadata(md: &PeerMetadata) -> Value {
    let mut entries = Vec::new();
    if let Some(s) = &md.storage_id {
        entries.push((Value::Text("storageId".into()), Value::Text(s.to_string())));
    }
    entries.push((
        Value::Text("isEphemeral".into()),
        Value::Bool(md.is_ephemeral),
    ));
    Value::Map(entries)
}

struct MapBuilder(Vec<(Value, Value)>);

impl MapBuilder {
    fn new(kind: &str) -> Self {
        Self(vec![(Value::Text("type".into()), Value::Text(kind.into()))])
    }
    fn put(&mut self, key: &str, value: Value) {
        self.0.push((Value::Text(key.into()), value));
    }
    fn text(&mut self, key: &str, value: &str) {
        self.put(key, Value::Text(value.into()));
    }
    fn texts(&mut self, key: &str, texts: &[String]) {
        let texts = texts.iter().map(|t| Value::Text(t.clone())).collect();
        self.put(key, Value::Array(texts));
    }
    fn extensions(&mut self, extensions: &[String]) {
        if !extensions.is_empty() {
            self.texts("tandemExtensions", extensions);
        }
    }
    fn routing(&mut self, sender: &PeerId, target: &PeerId) {
        self.text("senderId", sender.as_str());
        self.text("targetId", target.as_str());
    }
    fn finish(self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(&Value::Map(self.0), &mut out)
            .expect("writing CBOR to a Vec cannot fail");
        out
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::InvalidField {
        field,
        reason: reason.into(),
    }
}

/// Strip tags (cbor-x may tag typed arrays when configured to).
fn untag(v: &Value) -> &Value {
    match v {
        Value::Tag(_, inner) => untag(inner),
        other => other,
    }
}

fn text_of(v: &Value, field: &'static str) -> Result<String, DecodeError> {
    match untag(v) {
        Value::Text(t) => Ok(t.clone()),
        _ => Err(invalid(field, "not a text string")),
    }
}

fn number_of(v: &Value, field: &'static str) -> Result<f64, DecodeError> {
    match untag(v) {
        Value::Integer(i) => Ok(i128::from(*i) as f64),
        Value::Float(f) if f.is_finite() => Ok(*f),
        _ => Err(invalid(field, "not a number")),
    }
}

struct Fields<'a> {
    entries: &'a [(Value, Value)],
    kind: String,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.entries
            .iter()
            .find(|(k, _)| matches!(k, Value::Text(t) if t == key))
            .map(|(_, v)| untag(v))
            .filter(|v| !v.is_null())
    }
    fn missing(&self, field: &'static str) -> DecodeError {
        DecodeError::MissingField {
            message: if self.kind.is_empty() {
                "a".into()
            } else {
                self.kind.clone()
            },
            field,
        }
    }
    fn req_text(&self, field: &'static str) -> Result<String, DecodeError> {
        self.opt_text(field)?.ok_or_else(|| self.missing(field))
    }
    fn opt_text(&self, field: &'static str) -> Result<Option<String>, DecodeError> {
        self.get(field).map(|v| text_of(v, field)).transpose()
    }
    fn peer(&self, field: &'static str) -> Result<PeerId, DecodeError> {
        self.req_text(field).map(PeerId::new)
    }
    fn number(&self, field: &'static str) -> Result<f64, DecodeError> {
        number_of(self.get(field).ok_or_else(|| self.missing(field))?, field)
    }
    fn bytes(&self, field: &'static str) -> Result<Vec<u8>, DecodeError> {
        match self.get(field) {
            Some(Value::Bytes(b)) => Ok(b.clone()),
            Some(_) => Err(invalid(field, "not a byte string")),
            None => Err(self.missing(field)),
        }
    }
    fn document(&self) -> Result<DocumentId, DecodeError> {
        let field = "documentId";
        match self.get(field) {
            Some(Value::Text(t)) => t.parse().map_err(|e| invalid(field, format!("{e}"))),
            Some(Value::Bytes(b)) => {
                DocumentId::try_from_slice(b).map_err(|e| invalid(field, format!("{e}")))
            }
            Some(_) => Err(invalid(field, "not text or bytes")),
            None => Err(self.missing(field)),
        }
    }
    fn metadata(&self) -> Result<Option<PeerMetadata>, DecodeError> {
        let Some(v) = self.get("peerMetadata").or_else(|| self.get("metadata")) else {
            return Ok(None);
        };
        let Value::Map(entries) = v else {
            return Err(invalid("peerMetadata", "not a map"));
        };
        let inner = Fields {
            entries,
            kind: self.kind.clone(),
        };
        let is_ephemeral = match inner.get("isEphemeral") {
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("isEphemeral", "not a boolean")),
            None => false,
        };
        Ok(Some(PeerMetadata {
            storage_id: inner.opt_text("storageId")?.map(StorageId::new),
            is_ephemeral,
        }))
    }
    /// An array of text strings, if present.
    fn texts(&self, field: &'static str) -> Result<Option<Vec<String>>, DecodeError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| text_of(v, field))
                .collect::<Result<_, _>>()
                .map(Some),
            Some(_) => Err(invalid(field, "not an array")),
        }
    }
    /// `tandemExtensions`: absent for a plain peer.
    fn extensions(&self) -> Result<Vec<String>, DecodeError> {
        Ok(self.texts("tandemExtensions")?.unwrap_or_default())
    }
    /// A batch's `messages`: each `[kind, documentId, data]`, kind 0 for
    /// `request` and 1 for `sync`, the id as 16 bytes.
    #[cfg(not(target_arch = "wasm32"))]
    fn batched(&self) -> Result<Vec<Batched>, DecodeError> {
        let field = "messages";
        let Some(Value::Array(entries)) = self.get(field) else {
            return Err(match self.get(field) {
                None => self.missing(field),
                Some(_) => invalid(field, "not an array"),
            });
        };
        entries
            .iter()
            .map(|entry| {
                let Value::Array(parts) = untag(entry) else {
                    return Err(invalid(field, "an entry is not an array"));
                };
                let [kind, id, data] = parts.as_slice() else {
                    return Err(invalid(field, "an entry is not [kind, documentId, data]"));
                };
                let request = match untag(kind) {
                    Value::Integer(i) if i128::from(*i) == 0 => true,
                    Value::Integer(i) if i128::from(*i) == 1 => false,
                    _ => return Err(invalid(field, "an entry's kind is not 0 or 1")),
                };
                let Value::Bytes(id) = untag(id) else {
                    return Err(invalid(field, "an entry's document id is not bytes"));
                };
                let document_id = DocumentId::try_from_slice(id)
                    .map_err(|e| invalid(field, format!("an entry's document id: {e}")))?;
                let Value::Bytes(data) = untag(data) else {
                    return Err(invalid(field, "an entry's data is not bytes"));
                };
                Ok(Batched {
                    request,
                    document_id,
                    data: data.clone(),
                })
            })
            .collect()
    }
    fn storage_ids(&self, field: &'static str) -> Result<Vec<StorageId>, DecodeError> {
        let ids = self.texts(field)?.unwrap_or_default();
        Ok(ids.into_iter().map(StorageId::new).collect())
    }
    fn new_heads(&self) -> Result<Vec<RemoteHeads>, DecodeError> {
        let field = "newHeads";
        let Some(Value::Map(entries)) = self.get(field) else {
            return Err(self.missing(field));
        };
        entries
            .iter()
            .map(|(k, v)| {
                let storage_id = StorageId::new(text_of(k, field)?);
                let Value::Map(inner) = untag(v) else {
                    return Err(invalid(field, "entry is not a map"));
                };
                let inner = Fields {
                    entries: inner,
                    kind: self.kind.clone(),
                };
                let heads = match inner.get("heads") {
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|h| text_of(h, "heads"))
                        .collect::<Result<_, _>>()?,
                    _ => return Err(invalid(field, "entry lacks a heads array")),
                };
                let timestamp = inner.number("timestamp").unwrap_or(0.0);
                Ok(RemoteHeads {
                    storage_id,
                    heads,
                    timestamp,
                })
            })
            .collect()
    }
}

/// A `sync` frame whose message brings changes, decoded: what a peer that
/// falls behind merges with the frames queued after it
/// ([`SyncFrame::absorb`], [`coalesce_sync_frames`]), to hand the repo one
/// message instead of several.
#[derive(Debug)]
pub struct SyncFrame {
    sender_id: PeerId,
    target_id: PeerId,
    document_id: DocumentId,
    message: sync::Message,
}

impl SyncFrame {
    /// `bytes` is a `sync` frame whose message brings changes (automerge
    /// change or document chunks, which the repo loads in sequence) and asks
    /// for no reset.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let Message::Sync {
            sender_id,
            target_id,
            document_id,
            data,
        } = Message::decode(bytes).ok()?
        else {
            return None;
        };
        let message = sync::Message::decode(&data).ok()?;
        let reset = message
            .flags
            .is_some_and(|f| f.contains(sync::MessageFlags::SYNC_RESET));
        (!reset && !message.changes.is_empty()).then_some(Self {
            sender_id,
            target_id,
            document_id,
            message,
        })
    }

    /// Take in `next`, which the same peer sent right after this one: its
    /// changes follow ours, and everything else (heads, need, have, flags)
    /// is the peer's newer word, so it replaces ours. Handing the repo the
    /// result does what handing it the two in order would (the changes are
    /// applied together, the sync state ends as after `next`), with one
    /// automerge apply instead of two: an apply walks the history of the
    /// object it changes (automerge 0.12), so a receiver that fell behind
    /// (a relay under a fast writer, a reader under a busy relay) catches
    /// up with one walk rather than one per change.
    /// False (and nothing taken) if `next` is about another document or
    /// differs in kind.
    pub fn absorb(&mut self, next: Self) -> bool {
        if !self.same_kind(&next) {
            return false;
        }
        let mut changes: Vec<Vec<u8>> = self.message.changes.iter().map(<[u8]>::to_vec).collect();
        changes.extend(next.message.changes.iter().map(<[u8]>::to_vec));
        self.message = sync::Message {
            changes: changes.into(),
            ..next.message
        };
        true
    }

    /// From the same peer to the same peer, about the same document, with
    /// the same flags and protocol version.
    fn same_kind(&self, next: &Self) -> bool {
        next.sender_id == self.sender_id
            && next.target_id == self.target_id
            && next.document_id == self.document_id
            && next.message.flags == self.message.flags
            && next.message.version == self.message.version
    }

    /// The merged frame, as the peer would have sent it.
    pub fn encode(self) -> Vec<u8> {
        Message::Sync {
            sender_id: self.sender_id,
            target_id: self.target_id,
            document_id: self.document_id,
            data: self.message.encode(),
        }
        .encode()
    }
}

/// Merge each run of consecutive sync frames that bring changes to one
/// document (frames one connection received, in order) into one frame, as
/// [`SyncFrame::absorb`] does. Other frames keep their place and end a run.
/// Returns how many frames were absorbed into the one before.
pub fn coalesce_sync_frames(frames: &mut Vec<Vec<u8>>) -> usize {
    let mut items: Vec<Option<Vec<u8>>> = frames.drain(..).map(Some).collect();
    let absorbed = coalesce_sync_frames_in(
        &mut items,
        |frame| BatchItem::Frame((), frame),
        |(), merged| merged,
    );
    frames.extend(items.into_iter().flatten());
    absorbed
}

/// What an input of a driver's batch is to [`coalesce_sync_frames_in`].
#[derive(Debug)]
pub enum BatchItem<'a, C> {
    /// A frame received on connection `C`.
    Frame(C, &'a [u8]),
    /// Anything else about connection `C` (it opened, it closed): ends the
    /// run of its frames.
    Event(C),
    /// Ends every run (a shutdown).
    Barrier,
}

/// [`coalesce_sync_frames`] for a batch that mixes the inputs of several
/// connections: `what` tells what each input is, and `merged` makes the
/// input that replaces the first frame of a run (on its connection), whose
/// other frames become `None`. Each connection's inputs keep their order;
/// those of different connections do not interrupt each other's runs.
/// Frames are decoded only on connections with two or more in the batch.
pub fn coalesce_sync_frames_in<T, C: Copy + Eq + std::hash::Hash>(
    items: &mut [Option<T>],
    what: impl Fn(&T) -> BatchItem<'_, C>,
    merged: impl Fn(C, Vec<u8>) -> T,
) -> usize {
    use std::collections::HashMap;
    let mut frames: HashMap<C, usize> = HashMap::new();
    for item in items.iter().flatten() {
        if let BatchItem::Frame(c, _) = what(item) {
            *frames.entry(c).or_default() += 1;
        }
    }
    if frames.values().all(|n| *n < 2) {
        return 0;
    }
    /// An open run: where its first frame is, the frames merged so far, and
    /// how many were absorbed.
    struct Run {
        at: usize,
        frame: SyncFrame,
        taken: usize,
    }
    let mut runs: HashMap<C, Run> = HashMap::new();
    let mut absorbed = 0;
    let mut close = |items: &mut [Option<T>], c: C, run: Run| {
        if run.taken > 0 {
            items[run.at] = Some(merged(c, run.frame.encode()));
            absorbed += run.taken;
        }
    };
    for i in 0..items.len() {
        let Some(item) = &items[i] else { continue };
        let (c, next) = match what(item) {
            BatchItem::Frame(c, bytes) if frames[&c] >= 2 => (c, SyncFrame::decode(bytes)),
            BatchItem::Frame(..) => continue,
            BatchItem::Event(c) => (c, None),
            BatchItem::Barrier => {
                for (c, run) in runs.drain() {
                    close(items, c, run);
                }
                continue;
            }
        };
        let open = runs.remove(&c);
        match (open, next) {
            (Some(mut run), Some(next)) if run.frame.same_kind(&next) => {
                run.frame.absorb(next);
                run.taken += 1;
                items[i] = None;
                runs.insert(c, run);
            }
            (open, next) => {
                if let Some(run) = open {
                    close(items, c, run);
                }
                if let Some(frame) = next {
                    runs.insert(
                        c,
                        Run {
                            at: i,
                            frame,
                            taken: 0,
                        },
                    );
                }
            }
        }
    }
    for (c, run) in runs.drain() {
        close(items, c, run);
    }
    absorbed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> DocumentId {
        DocumentId::from_bytes([5; 16])
    }

    /// A sync frame from `a` to `b` about `document` bringing `changes`,
    /// with the writer's heads after them.
    fn sync_frame(
        document: DocumentId,
        changes: &[Vec<u8>],
        heads: Vec<automerge::ChangeHash>,
    ) -> Vec<u8> {
        let message = sync::Message {
            heads,
            need: Vec::new(),
            have: Vec::new(),
            changes: changes.to_vec().into(),
            flags: None,
            version: sync::MessageVersion::V1,
        };
        Message::Sync {
            sender_id: PeerId::new("a"),
            target_id: PeerId::new("b"),
            document_id: document,
            data: message.encode(),
        }
        .encode()
    }

    #[test]
    fn consecutive_sync_frames_for_one_document_merge_into_one() {
        use automerge::{AutoCommit, ROOT, transaction::Transactable};
        let mut d = AutoCommit::new();
        let mut frames = Vec::new();
        let mut changes = Vec::new();
        for i in 0..4 {
            d.put(ROOT, "v", i).unwrap();
            d.commit();
            let change = d.get_last_local_change().unwrap().raw_bytes().to_vec();
            frames.push(sync_frame(
                doc(),
                std::slice::from_ref(&change),
                d.get_heads(),
            ));
            changes.push(change);
        }
        let other_doc = sync_frame(DocumentId::from_bytes([6; 16]), &changes[..1], Vec::new());
        let not_sync = Message::Leave {
            sender_id: PeerId::new("a"),
        }
        .encode();
        let mut batch = vec![
            frames[0].clone(),
            frames[1].clone(),
            frames[2].clone(),
            not_sync.clone(),
            frames[3].clone(),
            other_doc.clone(),
        ];
        assert_eq!(coalesce_sync_frames(&mut batch), 2);
        assert_eq!(batch.len(), 4);
        let merged = SyncFrame::decode(&batch[0]).expect("a sync frame with changes");
        assert_eq!(merged.document_id, doc());
        let merged_changes: Vec<Vec<u8>> =
            merged.message.changes.iter().map(<[u8]>::to_vec).collect();
        assert_eq!(merged_changes, changes[..3].to_vec(), "in order");
        let third = SyncFrame::decode(&frames[2]).unwrap();
        assert_eq!(merged.message.heads, third.message.heads, "the newest word");
        assert_eq!(batch[1], not_sync, "ends a run, keeps its place");
        assert_eq!(batch[2], frames[3], "alone: as it was");
        assert_eq!(batch[3], other_doc, "another document: kept apart");
        // Nothing to merge: untouched.
        let mut alone = vec![frames[0].clone(), not_sync.clone(), frames[1].clone()];
        assert_eq!(coalesce_sync_frames(&mut alone), 0);
        assert_eq!(alone, vec![frames[0].clone(), not_sync, frames[1].clone()]);
    }

    fn all_messages() -> Vec<Message> {
        let (a, b) = (PeerId::new("a"), PeerId::new("b"));
        vec![
            Message::Join {
                sender_id: a.clone(),
                supported_protocol_versions: vec!["1".into()],
                metadata: Some(PeerMetadata {
                    storage_id: Some(StorageId::new("s-a")),
                    is_ephemeral: false,
                }),
                extensions: vec![BATCH_EXTENSION.into()],
            },
            Message::Peer {
                sender_id: b.clone(),
                target_id: a.clone(),
                selected_protocol_version: "1".into(),
                metadata: Some(PeerMetadata::default()),
                extensions: vec![],
            },
            Message::Leave {
                sender_id: a.clone(),
            },
            Message::Error {
                message: "boom".into(),
                sender_id: Some(b.clone()),
                target_id: None,
            },
            Message::Request {
                sender_id: a.clone(),
                target_id: b.clone(),
                document_id: doc(),
                data: vec![0x42, 1],
            },
            Message::Sync {
                sender_id: a.clone(),
                target_id: b.clone(),
                document_id: doc(),
                data: vec![0x42, 2],
            },
            Message::DocUnavailable {
                sender_id: b.clone(),
                target_id: a.clone(),
                document_id: doc(),
            },
            Message::Ephemeral {
                sender_id: a.clone(),
                target_id: b.clone(),
                count: 7,
                session_id: "sess".into(),
                document_id: doc(),
                data: vec![1, 2, 3],
            },
            Message::RemoteSubscriptionChange {
                sender_id: a.clone(),
                target_id: b.clone(),
                add: vec![StorageId::new("x")],
                remove: vec![],
            },
            Message::RemoteHeadsChanged {
                sender_id: b.clone(),
                target_id: a.clone(),
                document_id: doc(),
                new_heads: vec![RemoteHeads {
                    storage_id: StorageId::new("x"),
                    heads: vec!["h1".into()],
                    timestamp: 1_700_000_000_123.0,
                }],
            },
            Message::Batch {
                sender_id: b,
                target_id: a,
                messages: vec![
                    Batched {
                        request: true,
                        document_id: doc(),
                        data: vec![0x42, 1],
                    },
                    Batched {
                        request: false,
                        document_id: DocumentId::random(),
                        data: vec![7; 300],
                    },
                ],
            },
        ]
    }

    #[test]
    fn a_batch_entry_knows_its_encoded_size() {
        for len in [0, 23, 24, 255, 256, 65_535, 65_536] {
            let entry = Batched {
                request: false,
                document_id: doc(),
                data: vec![1; len],
            };
            let batch = |messages: Vec<Batched>| {
                Message::Batch {
                    sender_id: PeerId::new("a"),
                    target_id: PeerId::new("b"),
                    messages,
                }
                .encode()
                .len()
            };
            // One entry more, array headers of the same size (1 and 2 entries).
            let one = batch(vec![entry.clone()]);
            let two = batch(vec![entry.clone(), entry.clone()]);
            assert_eq!(two - one, entry.encoded_len(), "data of {len} bytes");
        }
    }

    #[test]
    fn malformed_batches_are_errors() {
        let batch = |messages: Value| {
            cbor(map(vec![
                ("type", Value::Text("tandem-batch".into())),
                ("senderId", Value::Text("a".into())),
                ("targetId", Value::Text("b".into())),
                ("messages", messages),
            ]))
        };
        let id = || Value::Bytes(doc().as_bytes().to_vec());
        let entry = |parts: Vec<Value>| Value::Array(vec![Value::Array(parts)]);
        let cases = [
            ("not an array", Value::Bytes(vec![1])),
            (
                "an entry not an array",
                Value::Array(vec![Value::Integer(1.into())]),
            ),
            ("two parts", entry(vec![Value::Integer(1.into()), id()])),
            (
                "kind 2",
                entry(vec![Value::Integer(2.into()), id(), Value::Bytes(vec![])]),
            ),
            (
                "id of 15 bytes",
                entry(vec![
                    Value::Integer(1.into()),
                    Value::Bytes(vec![0; 15]),
                    Value::Bytes(vec![]),
                ]),
            ),
            (
                "id as text",
                entry(vec![
                    Value::Integer(1.into()),
                    Value::Text(doc().to_string()),
                    Value::Bytes(vec![]),
                ]),
            ),
            (
                "data as text",
                entry(vec![
                    Value::Integer(1.into()),
                    id(),
                    Value::Text("x".into()),
                ]),
            ),
        ];
        for (what, messages) in cases {
            assert!(
                matches!(
                    Message::decode(&batch(messages)),
                    Err(DecodeError::InvalidField {
                        field: "messages",
                        ..
                    })
                ),
                "{what}"
            );
        }
        let ok = batch(entry(vec![
            Value::Integer(0.into()),
            id(),
            Value::Bytes(vec![9]),
        ]));
        assert!(matches!(
            Message::decode(&ok),
            Ok(Message::Batch { messages, .. }) if messages[0].request && messages[0].data == [9]
        ));
    }

    #[test]
    fn every_message_round_trips() {
        for msg in all_messages() {
            let bytes = msg.encode();
            assert_eq!(Message::decode(&bytes).unwrap(), msg, "{}", msg.type_name());
        }
    }

    fn cbor(v: Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(&v, &mut out).unwrap();
        out
    }

    fn map(entries: Vec<(&str, Value)>) -> Value {
        Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (Value::Text(k.into()), v))
                .collect(),
        )
    }

    #[test]
    fn accepts_the_js_variants() {
        // Float count, byte-string documentId, `metadata` instead of `peerMetadata`.
        let eph = cbor(map(vec![
            ("type", Value::Text("ephemeral".into())),
            ("senderId", Value::Text("a".into())),
            ("targetId", Value::Text("b".into())),
            ("count", Value::Float(3.0)),
            ("sessionId", Value::Text("s".into())),
            ("documentId", Value::Bytes(doc().as_bytes().to_vec())),
            ("data", Value::Bytes(vec![9])),
        ]));
        match Message::decode(&eph).unwrap() {
            Message::Ephemeral {
                count, document_id, ..
            } => {
                assert_eq!(count, 3);
                assert_eq!(document_id, doc());
            }
            other => panic!("decoded as {other:?}"),
        }
        let join = cbor(map(vec![
            ("type", Value::Text("join".into())),
            ("senderId", Value::Text("a".into())),
            (
                "supportedProtocolVersions",
                Value::Array(vec![Value::Text("1".into())]),
            ),
            (
                "metadata",
                map(vec![
                    ("storageId", Value::Text("s".into())),
                    ("isEphemeral", Value::Bool(true)),
                ]),
            ),
        ]));
        let Message::Join { metadata, .. } = Message::decode(&join).unwrap() else {
            panic!("not a join")
        };
        assert_eq!(
            metadata,
            Some(PeerMetadata {
                storage_id: Some(StorageId::new("s")),
                is_ephemeral: true
            })
        );
        // `remove` absent.
        let sub = cbor(map(vec![
            ("type", Value::Text("remote-subscription-change".into())),
            ("senderId", Value::Text("a".into())),
            ("targetId", Value::Text("b".into())),
            ("add", Value::Array(vec![Value::Text("x".into())])),
        ]));
        assert!(matches!(
            Message::decode(&sub).unwrap(),
            Message::RemoteSubscriptionChange { remove, .. } if remove.is_empty()
        ));
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(Message::decode(&[]), Err(DecodeError::Cbor(_))));
        assert!(matches!(
            Message::decode(&[0xff, 0x00, 0x13]),
            Err(DecodeError::Cbor(_))
        ));
        assert!(matches!(
            Message::decode(&cbor(Value::Integer(3.into()))),
            Err(DecodeError::NotAMap)
        ));
        let full = all_messages()[5].encode();
        assert!(
            Message::decode(&full[..full.len() - 3]).is_err(),
            "truncated"
        );
        let mut trailing = full.clone();
        trailing.push(0);
        assert!(Message::decode(&trailing).is_err(), "trailing bytes");
        let unknown = cbor(map(vec![("type", Value::Text("teleport".into()))]));
        assert_eq!(
            Message::decode(&unknown),
            Err(DecodeError::UnknownType("teleport".into()))
        );
        let no_type = cbor(map(vec![("senderId", Value::Text("a".into()))]));
        assert!(matches!(
            Message::decode(&no_type),
            Err(DecodeError::MissingField { field: "type", .. })
        ));
        let bad_doc = cbor(map(vec![
            ("type", Value::Text("sync".into())),
            ("senderId", Value::Text("a".into())),
            ("targetId", Value::Text("b".into())),
            ("documentId", Value::Text("not-an-id".into())),
            ("data", Value::Bytes(vec![])),
        ]));
        assert!(matches!(
            Message::decode(&bad_doc),
            Err(DecodeError::InvalidField {
                field: "documentId",
                ..
            })
        ));
        // Deep nesting must not overflow the stack.
        let mut deep = vec![0x81u8; 100_000];
        deep.push(0x00);
        assert!(Message::decode(&deep).is_err());
    }
}
