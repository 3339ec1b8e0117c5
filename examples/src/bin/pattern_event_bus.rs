//! Pattern: **Data Synchronization**: the event bus, its data consumers,
//! and monitoring, over a real relay on a loopback socket.
//!
//! - **Event bus**: the relay is a storing peer; every change a client sends
//!   is stored and fanned out to every other client that shares the
//!   document. A consumer that never saw the table subscribes to it
//!   (`Client::sync_table`: its catalogs, then every row they list, also
//!   rows added later) and receives every change live
//!   (`ClientEvent::Committed`).
//! - **Data consumer**: the consumer reads the changes it received as row
//!   events (`Rows::changes`), with the origin (the relay) and a durable
//!   named cursor whose distance to the feed's end is its lag.
//! - **Monitoring**: the relay's Prometheus endpoint (`/metrics`: frames and
//!   bytes in and out, connections, durable commit latency, refusals) and
//!   `/healthz`, served by `tandem_relay::metrics::serve_http`
//!   (`tandem serve --metrics-listen`).
//!
//! Run: `cargo run -p tandem-examples --bin pattern_event_bus`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tandem_engine::rows::{Row, RowChange, Rows, TableSchema, Value};
use tandem_engine::{
    Cursor, MemoryStorage, Origin, PeerId, Repo, RepoConfig, ServeOnRequest, ShareAll,
};
use tandem_relay::{Client, ClientConfig, ClientEvent, RelayConfig, RelayStats, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

type Native = Client<MemoryStorage>;
const CONSUMER: &str = "dashboard";

fn check(holds: bool, claim: &str) -> Result<()> {
    ensure!(holds, "does not hold: {claim}");
    println!("ok: {claim}");
    Ok(())
}

fn rows(repo: Repo<MemoryStorage>) -> Rows<MemoryStorage> {
    let mut rows = Rows::with_system_clock(repo);
    rows.define(TableSchema::new("tasks"));
    rows
}

/// A replica with its own store, online through the relay. The client task
/// owns the row store; `Client::rows` works with it inside that task.
fn client(name: &str, url: &str) -> Result<Native> {
    let repo = Repo::open(
        MemoryStorage::new(),
        RepoConfig::new(PeerId::new(name)),
        ShareAll,
    )?;
    Ok(Client::start_rows(
        rows(repo),
        url,
        ClientConfig::default(),
    )?)
}

async fn scan(client: &Native) -> Result<Vec<Row>> {
    Ok(client.rows(|rows| rows.table("tasks").scan()).await?)
}

/// Wait (bounded) until `done` holds.
async fn wait_until<F, Fut>(what: &str, mut done: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done().await? {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

/// `GET path` on the metrics listener: (status line, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(String, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .context("metrics endpoint timed out")??;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP body")?;
    Ok((
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    ))
}

/// The value of one sample in Prometheus text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::main]
async fn main() -> Result<()> {
    // The relay and its monitoring endpoint, on loopback.
    let stats = Arc::new(RelayStats::default());
    let config = RelayConfig {
        stats: stats.clone(),
        ..RelayConfig::default()
    };
    let relay_repo = Repo::open(
        MemoryStorage::new(),
        RepoConfig::new(PeerId::new("relay")),
        ServeOnRequest,
    )?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let relay = tokio::spawn(serve(listener, relay_repo, config, async {
        let _ = stopped.await;
    }));
    let metrics_listener = TcpListener::bind("127.0.0.1:0").await?;
    let metrics = metrics_listener.local_addr()?;
    let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
    tokio::spawn(tandem_relay::metrics::serve_http(
        metrics_listener,
        stats.clone(),
        async {
            let _ = metrics_stopped.await;
        },
    ));
    // Healthy once the relay's task runs, which the spawn above does not
    // wait for: poll, as a readiness probe would.
    wait_until("the relay to report healthy", || async {
        Ok(http_get(metrics, "/healthz").await?.0.contains("200"))
    })
    .await?;
    let (status, _) = http_get(metrics, "/healthz").await?;
    check(
        status.contains("200"),
        "the relay reports healthy on /healthz",
    )?;

    // A producer publishes rows on the bus; a consumer that never saw the
    // table subscribes to it and learns every row.
    let producer = client("producer", &url)?;
    let consumer = client("consumer", &url)?;
    producer
        .rows(|rows| {
            let mut tasks = rows.table("tasks");
            for (key, title) in [("t1", "plan"), ("t2", "build"), ("t3", "ship")] {
                tasks.insert(key, [("title", Value::from(title))])?;
            }
            Ok(())
        })
        .await?;
    consumer.sync_table("tasks").await?;
    wait_until("the consumer to hold three rows", || async {
        Ok(scan(&consumer).await?.len() == 3)
    })
    .await?;
    check(
        scan(&consumer).await? == scan(&producer).await?,
        "the consumer discovered and received every row through the relay",
    )?;
    consumer
        .rows(|rows| {
            let (_, end) = rows.changes(Cursor::START, 10_000)?;
            Ok(rows.repo().feed().save_cursor(CONSUMER, end)?)
        })
        .await?;

    // Live fan-out: a change on the producer reaches the online consumer.
    let mut events = consumer.subscribe();
    let t2 = producer
        .rows(|rows| {
            let mut tasks = rows.table("tasks");
            tasks.update("t2", [("done", Value::Bool(true))])?;
            tasks.document_id("t2")
        })
        .await?;
    let delivered = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match events.recv().await {
                Ok(ClientEvent::Committed(e)) if e.document == t2 => return Some(e.origin),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return None,
            }
        }
    })
    .await
    .context("the change never reached the consumer")?;
    check(
        matches!(delivered, Some(Origin::Remote(_))),
        "the relay fanned the producer's change out to the online consumer",
    )?;

    // The consumer's lag, and the row events it has not processed yet.
    let (lag, pending, caught_up) = consumer
        .rows(|rows| {
            let feed_end = rows.repo().feed().last_seq()?;
            let cursor = rows.repo().feed().cursor(CONSUMER)?;
            let (pending, next) = rows.changes(cursor, 10_000)?;
            rows.repo().feed().save_cursor(CONSUMER, next)?;
            let caught_up = rows.repo().feed().cursor(CONSUMER)?.0 == feed_end;
            Ok((feed_end - cursor.0, pending, caught_up))
        })
        .await?;
    println!("consumer lag: {lag} feed entries; pending: {pending:?}");
    check(
        lag > 0
            && pending.iter().any(|e| {
                e.key == "t2"
                    && e.change == RowChange::Updated
                    && e.columns.get("done") == Some(&Some(Value::Bool(true)))
                    && e.origin == Origin::Remote(PeerId::new("relay"))
            }),
        "the consumer reads the change as a row event, origin the relay, and sees its lag",
    )?;
    check(caught_up, "after processing, its lag is zero")?;
    let consumer_rows = scan(&consumer).await?;
    producer.shutdown().await?;
    consumer.shutdown().await?;

    // Monitoring: what the relay counted.
    let (status, text) = http_get(metrics, "/metrics").await?;
    for name in [
        "tandem_frames_in_total",
        "tandem_frames_out_total",
        "tandem_bytes_in_total",
        "tandem_commit_seconds_count",
        "tandem_connections",
    ] {
        println!("{name} {}", sample(&text, name).unwrap_or(f64::NAN));
    }
    check(
        status.contains("200")
            && sample(&text, "tandem_frames_in_total").is_some_and(|v| v > 0.0)
            && sample(&text, "tandem_bytes_out_total").is_some_and(|v| v > 0.0)
            && sample(&text, "tandem_commit_seconds_count").is_some_and(|v| v > 0.0),
        "/metrics counts the bus's traffic and its durable commits",
    )?;

    let _ = stop.send(());
    let relay_repo = tokio::time::timeout(Duration::from_secs(20), relay)
        .await
        .context("the relay did not stop")??;
    let _ = stop_metrics.send(());
    let mut relay_rows = rows(relay_repo);
    check(
        relay_rows.table("tasks").scan()? == consumer_rows,
        "the relay, a storing peer, holds every row too",
    )?;
    println!("pattern holds: event bus, data consumers, monitoring");
    Ok(())
}
