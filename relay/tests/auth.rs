//! Token authentication on a real socket (127.0.0.1, port 0): refusals at the
//! upgrade, grants per document, read-only access, expiry.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tandem_engine::automerge::sync::{self, SyncDoc};
use tandem_engine::automerge::{ROOT, transaction::Transactable};
use tandem_engine::protocol::Message;
use tandem_engine::{DocumentId, Event, PeerId};
use tandem_relay::{Auth, Claims, Grant, RelayConfig, mint};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as Ws};

use support::{Client, Relay, acked, server_repo, start, value};

const SECRET: &[u8] = b"test secret, not for production";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(docs: Vec<Grant>, exp: u64) -> String {
    mint(
        SECRET,
        &Claims {
            docs,
            exp,
            sub: Some("test".into()),
        },
    )
}

/// A relay that requires tokens signed with [`SECRET`].
async fn token_relay(dir: &tempfile::TempDir) -> (Relay, RelayConfig) {
    let config = RelayConfig {
        auth: Auth::tokens(SECRET),
        ..RelayConfig::default()
    };
    let relay = start(server_repo(dir, config.auth.policy()), config.clone()).await;
    (relay, config)
}

fn with_token(url: &str, token: &str) -> String {
    format!("{url}/?token={token}")
}

/// Connect and expect HTTP 401 with `body` in the response text.
async fn refused(request: impl IntoClientRequest + Unpin, body: &str) {
    match tokio_tungstenite::connect_async(request).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            let text = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                .into_owned();
            assert!(text.contains(body), "body {text:?} lacks {body:?}");
        }
        Err(other) => panic!("expected a 401, got error {other}"),
        Ok(_) => panic!("expected a 401, got a WebSocket"),
    }
}

#[tokio::test]
async fn missing_tampered_and_expired_tokens_get_401() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, config) = token_relay(&dir).await;

    refused(relay.url.as_str(), "token missing").await;
    refused(with_token(&relay.url, ""), "token missing").await;
    refused(with_token(&relay.url, "garbage"), "token malformed").await;

    // A valid token whose claims were swapped for wider ones.
    let good = token(vec![Grant::read(DocumentId::random())], now() + 600);
    let (_, signature) = good.split_once('.').unwrap();
    let wider = mint(
        b"",
        &Claims {
            docs: vec![Grant::read_write_all()],
            exp: now() + 600,
            sub: None,
        },
    );
    let (payload, _) = wider.split_once('.').unwrap();
    refused(
        with_token(&relay.url, &format!("{payload}.{signature}")),
        "token signature invalid",
    )
    .await;
    // Minted with another secret.
    let foreign = mint(
        b"another relay's secret",
        &Claims {
            docs: vec![Grant::read_write_all()],
            exp: now() + 600,
            sub: None,
        },
    );
    refused(with_token(&relay.url, &foreign), "token signature invalid").await;

    let expired = token(vec![Grant::read_write_all()], now() - 1);
    refused(with_token(&relay.url, &expired), "token expired").await;
    let mut request = relay.url.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {expired}")).unwrap(),
    );
    refused(request, "token expired").await;

    assert_eq!(config.stats.unauthorized(), 7);
    // The relay still serves valid tokens.
    let ok = token(vec![Grant::read_write_all()], now() + 600);
    let mut client = Client::connect(with_token(&relay.url, &ok), "ok").await;
    let doc = client.repo.create().unwrap();
    client.repo.change(&doc, |d| d.put(ROOT, "n", 1)).unwrap();
    client
        .until("the relay to store it", |r| acked(r, &doc))
        .await;
}

#[tokio::test]
async fn token_in_query_or_bearer_header_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, _config) = token_relay(&dir).await;
    let all = token(vec![Grant::read_write_all()], now() + 600);

    let mut a = Client::connect(with_token(&relay.url, &all), "a").await;
    let doc = a.repo.create().unwrap();
    a.repo.change(&doc, |d| d.put(ROOT, "n", 1)).unwrap();
    a.until("the relay to store a's document", |r| acked(r, &doc))
        .await;

    let mut request = relay.url.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {all}")).unwrap(),
    );
    let mut b = Client::connect(request, "b").await;
    b.repo.request(doc).unwrap();
    b.until("b to fetch the document", |r| value(r, &doc) == Some(1))
        .await;
    b.repo.change(&doc, |d| d.put(ROOT, "n", 2)).unwrap();
    b.until("the relay to store b's change", |r| acked(r, &doc))
        .await;
    a.until("the fan-out of b's change to a", |r| {
        value(r, &doc) == Some(2)
    })
    .await;
}

#[tokio::test]
async fn a_document_outside_the_grant_is_unavailable_and_never_sent() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, _config) = token_relay(&dir).await;
    let mut writer = Client::connect(
        with_token(
            &relay.url,
            &token(vec![Grant::read_write_all()], now() + 600),
        ),
        "writer",
    )
    .await;
    let a = writer.repo.create().unwrap();
    let b = writer.repo.create().unwrap();
    writer.repo.change(&a, |d| d.put(ROOT, "n", 1)).unwrap();
    writer.repo.change(&b, |d| d.put(ROOT, "n", 2)).unwrap();
    writer
        .until("the relay to store both", |r| acked(r, &a) && acked(r, &b))
        .await;

    let only_a = token(vec![Grant::read_write(a)], now() + 600);
    let mut peer = Client::connect(with_token(&relay.url, &only_a), "peer").await;
    peer.repo.request(b).unwrap();
    peer.until_event("doc-unavailable for b", |e| unavailable(e, &b))
        .await;
    // a is served on the same connection; b never arrived.
    peer.repo.request(a).unwrap();
    peer.until("a to arrive", |r| value(r, &a) == Some(1)).await;
    peer.run_for(Duration::from_millis(300)).await;
    assert!(
        peer.repo.heads(&b).unwrap().is_empty(),
        "b's changes reached the peer"
    );

    // Pushing a document outside the grant stores nothing on the relay.
    let c = peer.repo.create().unwrap();
    peer.repo.change(&c, |d| d.put(ROOT, "n", 3)).unwrap();
    peer.until_event("doc-unavailable for c", |e| unavailable(e, &c))
        .await;
    // Nor can the peer change b by pushing changes for it.
    let mut relay_repo = relay.stop().await;
    assert!(!relay_repo.contains(&c).unwrap(), "the relay stored c");
    assert_eq!(value(&mut relay_repo, &b), Some(2));
}

fn unavailable(event: &Event, doc: &DocumentId) -> bool {
    matches!(event, Event::DocumentUnavailable { document, .. } if document == doc)
}

#[tokio::test]
async fn a_read_only_peer_receives_but_its_changes_are_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, config) = token_relay(&dir).await;
    let mut writer = Client::connect(
        with_token(
            &relay.url,
            &token(vec![Grant::read_write_all()], now() + 600),
        ),
        "writer",
    )
    .await;
    let doc = writer.repo.create().unwrap();
    writer.repo.change(&doc, |d| d.put(ROOT, "n", 1)).unwrap();
    writer
        .until("the relay to store the document", |r| acked(r, &doc))
        .await;

    let read = token(vec![Grant::read(doc)], now() + 600);
    let mut reader = Client::connect(with_token(&relay.url, &read), "reader").await;
    reader.repo.request(doc).unwrap();
    reader
        .until("the reader to receive the document", |r| {
            value(r, &doc) == Some(1)
        })
        .await;

    // An automerge 0.12 client sees the READ_ONLY flag on the relay's sync
    // messages and does not even send its changes; push them the way an
    // older client (unaware of the flag) would.
    let before = reader.repo.heads(&doc).unwrap();
    reader.repo.change(&doc, |d| d.put(ROOT, "n", 99)).unwrap();
    let edited = reader.repo.view(&doc, |d| d.clone()).unwrap();
    let mut state = sync::State::new();
    state.their_heads = Some(before.clone());
    state.their_need = Some(Vec::new());
    state.their_have = Some(vec![sync::Have {
        last_sync: before,
        bloom: sync::BloomFilter::default(),
    }]);
    let push = edited.generate_sync_message(&mut state).unwrap();
    assert_eq!(push.changes.len(), 1, "the push carries the change");
    let frame = Message::Sync {
        sender_id: PeerId::new("reader"),
        target_id: PeerId::new("relay"),
        document_id: doc,
        data: push.encode(),
    }
    .encode();
    reader.ws.send(Ws::Binary(frame.into())).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while config.stats.writes_denied() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay never refused the write"
        );
        reader.run_for(Duration::from_millis(50)).await;
    }
    reader.run_for(Duration::from_millis(300)).await;
    // The writer still sees 1 and can keep writing; the relay has its value.
    writer.run_for(Duration::from_millis(300)).await;
    assert_eq!(value(&mut writer.repo, &doc), Some(1));
    writer.repo.change(&doc, |d| d.put(ROOT, "n", 2)).unwrap();
    writer
        .until("the relay to store the writer's change", |r| acked(r, &doc))
        .await;
    // The refusal did not close the reader's connection: it still gets changes.
    let head = writer.repo.heads(&doc).unwrap()[0];
    reader
        .until("the writer's change to reach the reader", |r| {
            r.heads(&doc).unwrap().contains(&head)
        })
        .await;
    let mut relay_repo = relay.stop().await;
    assert_eq!(value(&mut relay_repo, &doc), Some(2));
    let writes = relay_repo.view(&doc, |d| d.get_changes(&[]).len()).unwrap();
    assert_eq!(writes, 2, "the reader's change was stored");
}

#[tokio::test]
async fn the_connection_closes_when_its_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, config) = token_relay(&dir).await;
    let short = token(vec![Grant::read_write_all()], now() + 2);
    let (mut ws, _) = tokio_tungstenite::connect_async(with_token(&relay.url, &short))
        .await
        .unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Ws::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("the connection outlived its token");
    let frame = frame.expect("a close frame with a reason");
    assert_eq!(frame.code, CloseCode::Policy);
    assert_eq!(frame.reason.as_str(), "token expired");
    assert_eq!(config.stats.expired(), 1);
}

#[tokio::test]
async fn anonymous_relay_with_the_grant_policy_serves_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let config = RelayConfig::default();
    let relay = start(server_repo(&dir, config.auth.policy()), config).await;
    let mut a = Client::connect(relay.url.as_str(), "a").await;
    let doc = a.repo.create().unwrap();
    a.repo.change(&doc, |d| d.put(ROOT, "n", 5)).unwrap();
    a.until("the relay to store it", |r| acked(r, &doc)).await;
    // A token is ignored when none is required.
    let mut b = Client::connect(with_token(&relay.url, "whatever"), "b").await;
    b.repo.request(doc).unwrap();
    b.until("b to fetch it", |r| value(r, &doc) == Some(5))
        .await;
}
