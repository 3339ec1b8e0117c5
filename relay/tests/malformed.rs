//! Malformed input through the relay on a real socket (127.0.0.1, port 0):
//! garbage bytes, a text frame, truncated CBOR, a valid message before
//! `join`, a frame over the configured maximum message size, and garbage
//! automerge sync data inside well-formed `sync` messages. Each gets an
//! `error` frame and a close, including a sync message that decodes but
//! carries a garbage change chunk; meanwhile two well-behaved clients stay
//! connected, and afterwards nothing of theirs is lost: the document holds
//! the earlier change, a new change still fans out live, and a newcomer
//! fetches it.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tandem_engine::automerge::sync::{self, ChunkList, MessageVersion};
use tandem_engine::automerge::{ChangeHash, ROOT, transaction::Transactable};
use tandem_engine::protocol::Message;
use tandem_engine::{DocumentId, PeerId, ServeOnRequest};
use tandem_relay::RelayConfig;
use tokio_tungstenite::tungstenite::Message as Ws;

use support::{Client, Socket, acked, server_repo, start, value};

/// The relay's maximum message size in this test.
const MAX_MESSAGE: usize = 64 * 1024;

fn join(name: &str) -> Vec<u8> {
    Message::Join {
        sender_id: PeerId::new(name),
        supported_protocol_versions: vec!["1".into()],
        metadata: None,
        extensions: vec![],
    }
    .encode()
}

fn sync_frame(name: &str, doc: DocumentId, data: Vec<u8>) -> Vec<u8> {
    Message::Sync {
        sender_id: PeerId::new(name),
        target_id: PeerId::new("relay"),
        document_id: doc,
        data,
    }
    .encode()
}

/// A well-formed automerge sync message whose one change chunk is garbage.
fn sync_with_garbage_change() -> Vec<u8> {
    sync::Message {
        heads: vec![ChangeHash([7; 32])],
        need: Vec::new(),
        have: Vec::new(),
        changes: ChunkList::from(vec![0x85, 0x6f, 0x4a, 0x83, 0xde, 0xad, 0xbe, 0xef]),
        flags: None,
        version: MessageVersion::V1,
    }
    .encode()
}

/// The next frame that is not a ping or pong, within 5 s.
async fn next_frame(ws: &mut Socket, case: &str) -> Option<Result<Ws, String>> {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap_or_else(|_| panic!("{case}: nothing from the relay within 5 s"));
        match next {
            Some(Ok(Ws::Ping(_) | Ws::Pong(_))) => continue,
            other => return other.map(|r| r.map_err(|e| e.to_string())),
        }
    }
}

/// Expect an `error` frame, then the connection's end; the error's text.
async fn expect_error_then_close(ws: &mut Socket, case: &str) -> String {
    let message = match next_frame(ws, case).await {
        Some(Ok(Ws::Binary(bytes))) => match Message::decode(&bytes) {
            Ok(Message::Error { message, .. }) => message,
            other => panic!("{case}: expected an error frame, got {other:?}"),
        },
        other => panic!("{case}: expected an error frame, got {other:?}"),
    };
    match next_frame(ws, case).await {
        Some(Ok(Ws::Close(_))) | None => {}
        other => panic!("{case}: expected the connection to close, got {other:?}"),
    }
    message
}

/// Connect and complete the handshake as peer `name`.
async fn joined(url: &str, name: &str) -> Socket {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Ws::Binary(join(name).into())).await.unwrap();
    match next_frame(&mut ws, name).await {
        Some(Ok(Ws::Binary(bytes))) => assert!(
            matches!(Message::decode(&bytes), Ok(Message::Peer { .. })),
            "{name}: handshake not answered with peer"
        ),
        other => panic!("{name}: handshake not answered: {other:?}"),
    }
    ws
}

#[tokio::test]
async fn malformed_input_gets_an_error_and_a_close_and_nothing_else_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let config = RelayConfig {
        max_message_size: MAX_MESSAGE,
        ..RelayConfig::default()
    };
    let stats = config.stats.clone();
    let relay = start(server_repo(&dir, ServeOnRequest), config).await;
    let url = relay.url.clone();

    // A writer and a reader, connected throughout.
    let mut writer = Client::connect(&url, "writer").await;
    let doc = writer.repo.create().unwrap();
    writer.repo.change(&doc, |d| d.put(ROOT, "n", 1)).unwrap();
    writer
        .until("the relay to store the writer's change", |r| acked(r, &doc))
        .await;
    let mut reader = Client::connect(&url, "reader").await;
    reader.repo.request(doc).unwrap();
    reader
        .until("the reader to fetch the document", |r| {
            value(r, &doc) == Some(1)
        })
        .await;

    let truncated = {
        let frame = join("truncated");
        frame[..frame.len() / 2].to_vec()
    };
    let before_join = sync_frame("early", doc, Vec::new());
    let before_join_cases: [(&str, Ws, &str); 5] = [
        (
            "garbage bytes",
            Ws::Binary(vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0xff].into()),
            "malformed",
        ),
        (
            "a text frame",
            Ws::Text("{\"type\":\"join\",\"senderId\":\"text\"}".into()),
            "malformed",
        ),
        ("truncated CBOR", Ws::Binary(truncated.into()), "malformed"),
        (
            "a valid message before join",
            Ws::Binary(before_join.into()),
            "expected join",
        ),
        (
            "an oversized frame",
            Ws::Binary(vec![0x42; MAX_MESSAGE + 1].into()),
            "too large",
        ),
    ];
    for (case, frame, says) in before_join_cases {
        let (mut bad, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        bad.send(frame).await.unwrap();
        let error = expect_error_then_close(&mut bad, case).await;
        assert!(
            error.contains(says),
            "{case}: the error {error:?} does not say {says:?}"
        );
    }

    // After a completed handshake: garbage where an automerge sync message
    // belongs, for the writer's document (which must not suffer for it) and
    // for an unknown one.
    let after_join_cases = [
        (
            "garbage sync data",
            sync_frame("bad-sync", doc, vec![0x42, 0x00, 0x13, 0x37]),
        ),
        (
            "garbage sync data for an unknown document",
            sync_frame("bad-new", DocumentId::random(), vec![0x42, 0x01]),
        ),
    ];
    for (case, frame) in after_join_cases {
        let mut bad = joined(&url, case).await;
        bad.send(Ws::Binary(frame.into())).await.unwrap();
        let error = expect_error_then_close(&mut bad, case).await;
        assert!(
            error.contains("sync message"),
            "{case}: the error {error:?} does not name the sync message"
        );
    }

    // A well-formed automerge sync message whose change chunk is garbage:
    // automerge alone would skip the chunk, the relay refuses the message.
    let case = "a sync message with a garbage change";
    let mut odd = joined(&url, case).await;
    let frame = sync_frame("odd-change", doc, sync_with_garbage_change());
    odd.send(Ws::Binary(frame.into())).await.unwrap();
    let error = expect_error_then_close(&mut odd, case).await;
    assert!(
        error.contains("change chunk 0 is malformed"),
        "{case}: {error:?}"
    );

    // Nothing lost: the writer's next change is stored and reaches the
    // reader on its existing connection, and a newcomer fetches it.
    writer.repo.change(&doc, |d| d.put(ROOT, "n", 2)).unwrap();
    writer
        .until("the relay to store the writer's next change", |r| {
            acked(r, &doc)
        })
        .await;
    reader
        .until("the fan-out to the reader", |r| value(r, &doc) == Some(2))
        .await;
    let mut late = Client::connect(&url, "late").await;
    late.repo.request(doc).unwrap();
    late.until("the newcomer to fetch the document", |r| {
        value(r, &doc) == Some(2)
    })
    .await;
    // Every malformed connection is gone; the three good ones remain.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stats.connections() != 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} connections open, not the 3 good ones",
            stats.connections()
        );
        late.run_for(Duration::from_millis(20)).await;
    }

    let mut repo = relay.stop().await;
    assert!(repo.quarantined().is_empty(), "{:?}", repo.quarantined());
    assert_eq!(value(&mut repo, &doc), Some(2));
}
