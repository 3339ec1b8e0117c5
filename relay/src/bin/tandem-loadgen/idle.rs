//! `tandem-loadgen idle`: memory per idle connection.
//!
//! A setup client creates one small document and waits until the server has
//! stored it; the server's RSS is then read (`before`). N clients connect, at
//! most `--concurrency` of them being set up at a time; each completes the
//! handshake (`join`, answered by `peer`) and, unless `--no-request`, loads
//! that document, then stays connected and idle (its reader task answers the
//! server's pings). After `--settle-secs` the RSS is read again (`with
//! clients`): (with clients - before) / connected is the memory per
//! connection. Last, every client closes and, after the settle time, the RSS
//! is read once more, to show what the server gives back.
//!
//! RSS is VmRSS from /proc/PID/status, the median of five readings 100 ms
//! apart. One process per side: the server is never in this process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tandem_engine::automerge::ROOT;
use tandem_engine::automerge::transaction::Transactable;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{Client, compare_rows, emit, f, proc_sample, round1, round2};

/// Settings of `tandem-loadgen idle`.
#[derive(Debug, clap::Args)]
pub(crate) struct IdleArgs {
    /// WebSocket URL of the sync server.
    #[arg(long)]
    url: String,
    /// Process id of the server, whose RSS is read from /proc.
    #[arg(long)]
    server_pid: u32,
    /// Idle clients to connect.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Clients being set up at once at most.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Only the handshake: request no document.
    #[arg(long)]
    no_request: bool,
    /// Pause before each RSS reading, in seconds.
    #[arg(long, default_value_t = 3.0)]
    settle_secs: f64,
    /// Longest the whole run may take, in seconds.
    #[arg(long, default_value_t = 180.0)]
    timeout_secs: f64,
    /// Name of the server in the report.
    #[arg(long, default_value = "server")]
    label: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn main(args: &IdleArgs) -> Result<()> {
    if args.clients == 0 || args.concurrency == 0 {
        bail!("--clients and --concurrency must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run(args))?;
    emit(&report, args.json, print)
}

/// The median of five VmRSS readings of `pid`, 100 ms apart, in KiB.
async fn rss_kib(pid: &str) -> Result<u64> {
    let mut readings = Vec::new();
    for i in 0..5 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let sample = proc_sample(pid).with_context(|| format!("process {pid} is gone"))?;
        readings.push(sample.rss_kb);
    }
    readings.sort_unstable();
    Ok(readings[readings.len() / 2])
}

async fn run(args: &IdleArgs) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout_secs);
    let settle = Duration::from_secs_f64(args.settle_secs);
    let pid = args.server_pid.to_string();
    // The idle clients' own buffers only cost this process memory; keep them small.
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0);

    let mut setup = Client::connect(&args.url, "idle-setup".into(), deadline).await?;
    let doc = setup
        .create_stored(deadline, |repo, doc| {
            repo.change(doc, |d| {
                d.put(ROOT, "title", "idle benchmark")?;
                d.put(ROOT, "clients", args.clients as u64)
            })
        })
        .await
        .context("setup client")?;
    tokio::time::sleep(settle).await;
    let before = rss_kib(&pid).await?;

    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let mut connecting = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let (permits, url) = (permits.clone(), args.url.clone());
        let wanted = (!args.no_request).then_some(doc);
        connecting.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let name = format!("idle-{i}");
            let mut client = Client::connect_with(&url, name, deadline, Some(ws_config)).await?;
            if let Some(doc) = wanted {
                client.repo.request(doc)?;
                client.pump().await;
            }
            let done = client
                .run_until(deadline, |c| {
                    c.ready && wanted.is_none_or(|doc| c.has(&doc))
                })
                .await;
            if !done {
                bail!(
                    "not set up: {}",
                    client.closed.clone().unwrap_or_else(|| {
                        if client.unavailable {
                            "document unavailable".into()
                        } else {
                            "timed out".into()
                        }
                    })
                );
            }
            anyhow::Ok(client)
        }));
    }
    let mut clients = Vec::with_capacity(args.clients);
    let mut errors = Vec::new();
    for task in connecting {
        match task.await? {
            Ok(c) => clients.push(c),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    if clients.is_empty() {
        bail!(
            "no client could connect: {}",
            errors.first().map_or("", String::as_str)
        );
    }
    eprintln!(
        "[{}] {} of {} clients connected in {connect_secs:.2} s",
        args.label,
        clients.len(),
        args.clients
    );
    tokio::time::sleep(settle).await;
    let with_clients = rss_kib(&pid).await?;
    let open = clients.iter().filter(|c| !c.frames.is_closed()).count();
    let loadgen_rss = proc_sample("self").map_or(0, |s| s.rss_kb);

    let connected = clients.len();
    let closing: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(c.close()))
        .collect();
    for c in closing {
        let _ = c.await;
    }
    setup.close().await;
    tokio::time::sleep(settle).await;
    let after_close = rss_kib(&pid).await?;

    let per_connection = (with_clients as f64 - before as f64) / connected as f64;
    Ok(json!({
        "kind": "idle",
        "label": args.label,
        "url": args.url,
        "clients": args.clients,
        "connected": connected,
        "open_at_reading": open,
        "failed": errors.len(),
        "first_error": errors.first(),
        "document_requested": !args.no_request,
        "connect_secs": round2(connect_secs),
        "rss_before_mib": round1(before as f64 / 1024.0),
        "rss_with_clients_mib": round1(with_clients as f64 / 1024.0),
        "rss_after_close_mib": round1(after_close as f64 / 1024.0),
        "per_connection_kib": round1(per_connection),
        "loadgen_rss_mib": round1(loadgen_rss as f64 / 1024.0),
    }))
}

const ROWS: &[(&str, &str)] = &[
    ("memory per connection (KiB)", "/per_connection_kib"),
    ("server RSS before (MiB)", "/rss_before_mib"),
    ("server RSS with the clients (MiB)", "/rss_with_clients_mib"),
    ("server RSS after they closed (MiB)", "/rss_after_close_mib"),
    ("clients connected", "/connected"),
    ("still open at the reading", "/open_at_reading"),
    ("time to connect them all (s)", "/connect_secs"),
];

fn print(r: &Value) {
    println!(
        "idle: {} at {}, {} clients (document requested: {})",
        f(&r["label"]),
        f(&r["url"]),
        f(&r["clients"]),
        f(&r["document_requested"])
    );
    for (label, ptr) in ROWS {
        println!(
            "  {label:<40} {}",
            f(r.pointer(ptr).unwrap_or(&Value::Null))
        );
    }
    if let Some(e) = r["first_error"].as_str() {
        println!("  {} failed; first error: {e}", f(&r["failed"]));
    }
}

pub(crate) fn compare(a: &Value, b: &Value) -> Result<()> {
    println!(
        "idle connections: {} clients each, document requested: {}",
        f(&a["clients"]),
        f(&a["document_requested"])
    );
    compare_rows(a, b, ROWS);
    for r in [a, b] {
        if let Some(e) = r["first_error"].as_str() {
            println!(
                "{}: {} failed; first error: {e}",
                f(&r["label"]),
                f(&r["failed"])
            );
        }
    }
    Ok(())
}
