//! `/metrics` and `/healthz` over real HTTP on 127.0.0.1.

mod support;

use std::sync::Arc;

use support::{Client, acked, server_repo, start};
use tandem_engine::ServeOnRequest;
use tandem_engine::automerge::{ROOT, transaction::Transactable};
use tandem_relay::{RelayConfig, RelayStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    (status, response)
}

/// The value of a sample line `name value` in Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

#[tokio::test]
async fn metrics_count_what_happens_and_health_follows_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(RelayStats::default());
    let config = RelayConfig {
        stats: stats.clone(),
        ..RelayConfig::default()
    };
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    tokio::spawn(tandem_relay::metrics::serve_http(
        http,
        stats.clone(),
        std::future::pending(),
    ));

    let relay = start(server_repo(&dir, ServeOnRequest), config).await;
    let mut client = Client::connect(relay.url.as_str(), "c").await;
    let doc = client.repo.create().unwrap();
    client.repo.change(&doc, |d| d.put(ROOT, "n", 1)).unwrap();
    client
        .until("the relay to store it", |r| acked(r, &doc))
        .await;

    let (status, health) = get(http_addr, "/healthz").await;
    assert_eq!(status, 200, "{health}");
    let (status, text) = get(http_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(sample(&text, "tandem_connections"), 1.0);
    assert!(
        sample(&text, "tandem_frames_in_total") >= 2.0,
        "join and sync"
    );
    assert!(
        sample(&text, "tandem_frames_out_total") >= 2.0,
        "peer and sync"
    );
    assert!(sample(&text, "tandem_bytes_in_total") > 0.0);
    assert!(sample(&text, "tandem_commit_seconds_count") >= 1.0);
    assert!(sample(&text, "tandem_documents_loaded") >= 1.0);
    assert_eq!(sample(&text, "tandem_auth_refusals_total"), 0.0);
    assert!(text.contains("# HELP tandem_outbound_queued_frames"));

    drop(client);
    relay.stop().await;
    let (status, _) = get(http_addr, "/healthz").await;
    assert_eq!(status, 503, "a stopped relay must not report healthy");
}
