//! The relay on a real socket (127.0.0.1, port 0) with engine clients.
//! (Malformed input is in malformed.rs.)

mod support;

use tandem_engine::ServeOnRequest;
use tandem_engine::automerge::{ROOT, ReadDoc, transaction::Transactable};
use tandem_relay::RelayConfig;

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
