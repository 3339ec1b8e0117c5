//! The relay on a real socket (127.0.0.1, port 0) with engine clients.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tandem_engine::ServeOnRequest;
use tandem_engine::automerge::{ROOT, ReadDoc, transaction::Transactable};
use tandem_engine::protocol::Message;
use tandem_relay::RelayConfig;
use tokio_tungstenite::tungstenite::Message as Ws;

use support::{Client, acked, server_repo, start, value};

#[tokio::test]
async fn clients_sync_through_the_relay_and_changes_fan_out() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start(server_repo(&dir, ServeOnRequest), RelayConfig::default()).await;
    let url = relay.url.clone();
    let mut a = Client::connect(&url, "a").await;
    let mut b = Client::connect(&url, "b").await;

    let doc = a.repo.create().unwrap();
    a.repo.change(&doc, |d| d.put(ROOT, "n", 1)).unwrap();
    a.until("the relay to store a's document", |r| acked(r, &doc))
        .await;
    b.repo.request(doc).unwrap();
    b.until("b to fetch the document", |r| value(r, &doc) == Some(1))
        .await;

    // b stays connected and receives a's next change without asking again.
    a.repo.change(&doc, |d| d.put(ROOT, "n", 2)).unwrap();
    a.until("the relay to store a's change", |r| acked(r, &doc))
        .await;
    b.until("the fan-out to b", |r| value(r, &doc) == Some(2))
        .await;

    // Graceful shutdown hands back the repo with everything durable in it.
    let mut relay = relay.stop().await;
    let n = relay
        .view(&doc, |d| d.get(ROOT, "n").unwrap().unwrap().0.as_i64())
        .unwrap();
    assert_eq!(n, Some(2));
}

#[tokio::test]
async fn garbage_gets_an_error_and_a_close_and_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start(server_repo(&dir, ServeOnRequest), RelayConfig::default()).await;
    let url = relay.url.clone();
    let mut good = Client::connect(&url, "good").await;
    let doc = good.repo.create().unwrap();
    good.repo.change(&doc, |d| d.put(ROOT, "n", 7)).unwrap();
    good.until("the relay to store the document", |r| acked(r, &doc))
        .await;

    for (name, frame) in [
        (
            "garbage bytes",
            Ws::Binary(vec![0xde, 0xad, 0xbe, 0xef].into()),
        ),
        ("a text frame", Ws::Text("{\"type\":\"join\"}".into())),
    ] {
        let (mut bad, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        bad.send(frame).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), bad.next())
            .await
            .unwrap_or_else(|_| panic!("{name}: no reply"));
        match reply {
            Some(Ok(Ws::Binary(b))) => assert!(
                matches!(Message::decode(&b), Ok(Message::Error { .. })),
                "{name}: not an error frame"
            ),
            other => panic!("{name}: expected an error frame, got {other:?}"),
        }
        let next = tokio::time::timeout(Duration::from_secs(5), bad.next())
            .await
            .unwrap();
        assert!(
            matches!(next, Some(Ok(Ws::Close(_))) | None | Some(Err(_))),
            "{name}: connection not closed: {next:?}"
        );
    }
    good.repo.change(&doc, |d| d.put(ROOT, "n", 8)).unwrap();
    let mut other = Client::connect(&url, "other").await;
    good.until("the relay to store the change", |r| acked(r, &doc))
        .await;
    other.repo.request(doc).unwrap();
    other
        .until("the good peer's data", |r| value(r, &doc) == Some(8))
        .await;
}
