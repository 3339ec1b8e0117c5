//! `tandem-loadgen seed` and `tandem-loadgen cold-start`: how long after
//! launch a server over a store of many documents completes its first sync.
//!
//! `seed` writes a Tandem store of N small documents (the layout of
//! `tandem serve --data DIR`) and, with `--export`, every document as a JSON
//! line `{"id": <bs58check id>, "heads": [<hex>], "data": <base64 of the
//! saved document>}`, so
//! that another server's store can hold the very same documents under the same
//! ids (relay/bench/seed-node-store.mjs does it for the Node server). It
//! prints the URL of the document in the middle, the one to request.
//!
//! `cold-start -- COMMAND ARGS...` then, `--runs` times: picks a free port,
//! puts it wherever `{port}` appears in the arguments, starts the clock and
//! launches the command. It connects to `ws://127.0.0.1:PORT` every
//! `--retry-ms` until the WebSocket upgrade succeeds (accepted), sends `join`,
//! requests `--doc` and waits for the sync message that brings the document
//! (synced). A connection that is accepted but closed, or answered with
//! doc-unavailable, before the document arrives counts as unserved, and the
//! client connects again. The server is then stopped with SIGTERM (SIGKILL
//! after 10 s) and waited for, so the next run opens a cleanly closed store.

use std::io::{BufWriter, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use serde_json::{Value, json};
use tandem_engine::automerge::ROOT;
use tandem_engine::automerge::transaction::Transactable;
use tandem_engine::{
    AutomergeUrl, DocumentId, PeerId, RedbStorage, Repo, RepoConfig, ServeOnRequest,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Client, compare_rows, emit, f, round1};

/// Settings of `tandem-loadgen seed`.
#[derive(Debug, clap::Args)]
pub(crate) struct SeedArgs {
    /// Directory of the new store (as `tandem serve --data`); it must not
    /// hold a store yet.
    #[arg(long)]
    data: PathBuf,
    /// Documents to write.
    #[arg(long, default_value_t = 10_000)]
    docs: usize,
    /// Documents per durable commit.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Also write every document here, one JSON line each.
    #[arg(long)]
    export: Option<PathBuf>,
}

/// Settings of `tandem-loadgen cold-start`.
#[derive(Debug, clap::Args)]
pub(crate) struct ColdStartArgs {
    /// The document to request: its id or `automerge:` URL.
    #[arg(long)]
    doc: String,
    /// Launches to time.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Longest wait for the first sync of one launch, in seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout_secs: f64,
    /// Pause between connection attempts, in milliseconds.
    #[arg(long, default_value_t = 1)]
    retry_ms: u64,
    /// While an accepted connection waits for its answer, open another one
    /// every this many milliseconds (default: only reconnect once a
    /// connection ends, as one client would).
    #[arg(long)]
    probe_ms: Option<u64>,
    /// Connections in flight at most with `--probe-ms`.
    #[arg(long, default_value_t = 200)]
    max_probes: usize,
    /// Pause between runs, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pause_ms: u64,
    /// Append the server's stdout and stderr to this file (else discarded).
    #[arg(long)]
    server_log: Option<PathBuf>,
    /// Name of the server in the report.
    #[arg(long, default_value = "server")]
    label: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// The server command; `{port}` in an argument becomes the port.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

/// The fields of seeded document `i`: a small record, as an app keeps many.
fn fill(
    d: &mut tandem_engine::automerge::AutoCommit,
    i: usize,
) -> Result<(), tandem_engine::automerge::AutomergeError> {
    d.put(ROOT, "title", format!("Document {i}"))?;
    d.put(ROOT, "n", i as u64)?;
    d.put(ROOT, "done", i.is_multiple_of(3))?;
    d.put(ROOT, "owner", format!("user-{}", i % 97))?;
    d.put(
        ROOT,
        "body",
        format!(
            "Seeded for the cold-start benchmark; record {i} of a store of many small documents."
        ),
    )?;
    d.put(ROOT, "updated", 1_790_000_000_000i64 + i as i64)
}

pub(crate) fn seed(args: &SeedArgs) -> Result<()> {
    if args.docs == 0 || args.batch == 0 {
        bail!("--docs and --batch must be at least 1");
    }
    let path = args.data.join("store.redb");
    if path.exists() {
        bail!(
            "{} exists already: pass a new --data directory",
            path.display()
        );
    }
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("cannot create {}", args.data.display()))?;
    let mut repo = Repo::open(
        RedbStorage::open(&path)?,
        RepoConfig::new(PeerId::new("tandem-loadgen-seed")),
        ServeOnRequest,
    )?;
    let mut export = match &args.export {
        Some(p) => Some(BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let middle = args.docs / 2;
    let mut picked = None;
    for i in 0..args.docs {
        let id = repo.create()?;
        repo.change(&id, |d| fill(d, i))?;
        if let Some(out) = &mut export {
            let (bytes, heads) = repo.view(&id, |d| (d.save(), d.get_heads()))?;
            let heads: Vec<String> = heads.iter().map(ToString::to_string).collect();
            let line = json!({"id": id.to_string(), "heads": heads, "data": b64.encode(bytes)});
            writeln!(out, "{line}")?;
        }
        if i == middle {
            picked = Some(id);
        }
        if (i + 1).is_multiple_of(args.batch) {
            repo.flush()?;
        }
    }
    repo.flush()?;
    if let Some(mut out) = export {
        out.flush()?;
    }
    let picked = picked.expect("docs >= 1, so the middle one exists");
    eprintln!("wrote {} documents to {}", args.docs, path.display());
    println!("{}", picked.url());
    Ok(())
}

pub(crate) fn main(args: &ColdStartArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let doc: DocumentId = match args.doc.parse::<AutomergeUrl>() {
        Ok(url) => url.document,
        Err(_) => args
            .doc
            .parse()
            .with_context(|| format!("{:?} is not a document id or automerge: URL", args.doc))?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    for n in 0..args.runs {
        if n > 0 {
            std::thread::sleep(Duration::from_millis(args.pause_ms));
        }
        let run = runtime.block_on(launch(args, doc))?;
        eprintln!(
            "[{}] run {}: accepted {} ms, first sync {} ms",
            args.label,
            n + 1,
            f(&run["accepted_ms"]),
            f(&run["synced_ms"])
        );
        runs.push(run);
    }
    let report = summarize(args, &runs);
    emit(&report, args.json, print)
}

/// A port free a moment ago (the server binds it next; the race is benign
/// on a machine running one benchmark).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn ms(d: Duration) -> f64 {
    round1(d.as_secs_f64() * 1000.0)
}

/// One launch, measured; the server is stopped whatever happens.
async fn launch(args: &ColdStartArgs, doc: DocumentId) -> Result<Value> {
    let port = free_port()?;
    let argv: Vec<String> = args
        .command
        .iter()
        .map(|a| a.replace("{port}", &port.to_string()))
        .collect();
    let output = || -> Result<Stdio> {
        Ok(match &args.server_log {
            Some(p) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open {}", p.display()))?
                .into(),
            None => Stdio::null(),
        })
    };
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(output()?)
        .stderr(output()?);
    let launched = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {}", argv[0]))?;
    let url = format!("ws://127.0.0.1:{port}");
    let measured = first_sync(args, &url, doc, launched, &mut child).await;
    stop(&mut child).await?;
    measured
}

/// How one connection attempt ended.
enum Attempt {
    /// Nothing accepted it (not listening yet, or the upgrade failed).
    Refused,
    /// Accepted, then closed or answered doc-unavailable, or still waiting
    /// at the deadline.
    Unserved {
        accepted: Duration,
        ended: Duration,
        why: String,
    },
    /// The document arrived.
    Synced {
        accepted: Duration,
        handshake: Option<Duration>,
        synced: Duration,
    },
}

/// How long, after the first sync, connections accepted before it are given
/// to be served too; those still unanswered then count against the server.
const GRACE: Duration = Duration::from_secs(1);

/// Client `n`: connect once, join, request `doc`, wait for it.
async fn attempt(
    n: u64,
    url: String,
    doc: DocumentId,
    launched: Instant,
    deadline: Instant,
    on_accept: mpsc::UnboundedSender<(u64, Duration)>,
) -> Result<(u64, Attempt)> {
    // TCP_NODELAY, as the JS client (ws) sets it.
    let connecting = tokio_tungstenite::connect_async_with_config(url, None, true);
    let Ok(Ok((ws, _))) = tokio::time::timeout_at(deadline, connecting).await else {
        return Ok((n, Attempt::Refused));
    };
    let accepted = launched.elapsed();
    let _ = on_accept.send((n, accepted));
    // Ephemeral: the servers then keep no sync state for it, so repeated
    // runs leave the stores as they were.
    let mut config = RepoConfig::new(PeerId::new(format!("cold-start-{n}")));
    config.ephemeral = true;
    let mut client = Client::over(ws, config, deadline, None).await?;
    client.repo.request(doc)?;
    client.pump().await;
    let mut handshake = None;
    let synced = client
        .run_until(deadline, |c| {
            if c.ready && handshake.is_none() {
                handshake = Some(launched.elapsed());
            }
            c.has(&doc)
        })
        .await;
    let ended = launched.elapsed();
    let why = match (&client.closed, client.unavailable) {
        (Some(e), _) => e.clone(),
        (None, true) => "doc-unavailable".into(),
        (None, false) => "no answer by the deadline".into(),
    };
    client.close().await;
    let outcome = if synced {
        Attempt::Synced {
            accepted,
            handshake,
            synced: ended,
        }
    } else {
        Attempt::Unserved {
            accepted,
            ended,
            why,
        }
    };
    Ok((n, outcome))
}

/// Connect until a connection is accepted and the document arrives on it.
/// Without `--probe-ms` one client does it, as an automerge-repo client
/// would: it connects again only once a connection is refused or ends.
/// With it, while accepted connections wait, a new one is opened every
/// `--probe-ms`: the first to be served shows when the server could first
/// serve, even if it left earlier connections unanswered. After the first
/// sync, connections accepted before it get [`GRACE`] to be served too.
async fn first_sync(
    args: &ColdStartArgs,
    url: &str,
    doc: DocumentId,
    launched: Instant,
    child: &mut Child,
) -> Result<Value> {
    let deadline = launched + Duration::from_secs_f64(args.timeout_secs);
    let retry = Duration::from_millis(args.retry_ms);
    let probe = args.probe_ms.map(Duration::from_millis);
    let mut attempts = tokio::task::JoinSet::new();
    let (mut started, mut refused, mut served_later) = (0u64, 0u64, 0u64);
    let mut first_accepted: Option<Duration> = None;
    // Accepted and not finished: attempt number -> when. (An attempt may
    // finish before its acceptance is read here: `finished` keeps it out.)
    let mut waiting = std::collections::HashMap::new();
    let mut finished = std::collections::HashSet::new();
    let mut unserved = Vec::new();
    let mut first: Option<(Value, Duration)> = None;
    let mut grace_end = deadline;
    let mut next = Instant::now();
    let mut check = tokio::time::interval(Duration::from_millis(20));
    let (on_accept, mut accepts) = mpsc::unbounded_channel();
    loop {
        if first.is_some() && attempts.is_empty() {
            break;
        }
        let may_start = first.is_none()
            && match probe {
                None => attempts.is_empty(),
                Some(_) => attempts.len() < args.max_probes,
            };
        tokio::select! {
            () = tokio::time::sleep_until(next), if may_start => {
                started += 1;
                let task = attempt(started, url.to_owned(), doc, launched, deadline, on_accept.clone());
                attempts.spawn(task);
                // Until something is accepted, attempts are refused at once.
                next = Instant::now() + match (probe, first_accepted) {
                    (Some(p), Some(_)) => p,
                    _ => retry,
                };
            }
            Some((n, at)) = accepts.recv() => {
                if !finished.contains(&n) {
                    waiting.insert(n, at);
                }
                if first_accepted.is_none() {
                    first_accepted = Some(at);
                    if let Some(p) = probe {
                        next = Instant::now() + p;
                    }
                }
            }
            Some(done) = attempts.join_next(), if !attempts.is_empty() => {
                let (n, outcome) = done??;
                waiting.remove(&n);
                finished.insert(n);
                match outcome {
                    Attempt::Refused => {
                        refused += 1;
                        next = next.min(Instant::now() + retry);
                    }
                    Attempt::Unserved { accepted, ended, why } => {
                        unserved.push(json!({"accepted_ms": ms(accepted), "ended_ms": ms(ended), "why": why}));
                    }
                    Attempt::Synced { .. } if first.is_some() => served_later += 1,
                    Attempt::Synced { accepted, handshake, synced } => {
                        let run = json!({
                            "accepted_ms": ms(first_accepted.map_or(accepted, |f| f.min(accepted))),
                            "handshake_ms": handshake.map(ms),
                            "synced_ms": ms(synced),
                            "this_connection_accepted_ms": ms(accepted),
                            "attempts": started,
                            "refused": refused,
                        });
                        first = Some((run, synced));
                        grace_end = Instant::now() + GRACE;
                    }
                }
            }
            () = tokio::time::sleep_until(grace_end), if first.is_some() => break,
            _ = check.tick(), if first.is_none() => {
                if let Some(status) = child.try_wait()? {
                    bail!("the server exited ({status}) before serving the document");
                }
                if Instant::now() >= deadline {
                    bail!(
                        "no first sync within {} s ({started} connection attempts, {} accepted but unserved)",
                        args.timeout_secs,
                        unserved.len()
                    );
                }
            }
        }
    }
    let (mut run, synced) = first.expect("the loop ends only after the first sync");
    while let Ok((n, at)) = accepts.try_recv() {
        if !finished.contains(&n) {
            waiting.insert(n, at);
        }
    }
    // Accepted before the first sync and still without the document.
    let unanswered = waiting.values().filter(|&&at| at < synced).count();
    run["unserved"] = json!(unserved);
    run["served_after_the_first"] = json!(served_later);
    run["unanswered_after_grace"] = json!(unanswered);
    Ok(run)
}

/// SIGTERM, wait up to 10 s, then SIGKILL.
async fn stop(child: &mut Child) -> Result<()> {
    if child.try_wait()?.is_none() {
        // std has no SIGTERM and the workspace forbids unsafe: use kill(1).
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    }
    for _ in 0..1000 {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "warning: server {} ignored SIGTERM for 10 s; killing it",
        child.id()
    );
    child.kill()?;
    child.wait()?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let m = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    json!(round1(m))
}

fn summarize(args: &ColdStartArgs, runs: &[Value]) -> Value {
    let col = |k: &str| -> Vec<f64> { runs.iter().filter_map(|r| r[k].as_f64()).collect() };
    let synced = col("synced_ms");
    let waited: Vec<f64> = runs
        .iter()
        .filter_map(|r| Some(r["synced_ms"].as_f64()? - r["this_connection_accepted_ms"].as_f64()?))
        .collect();
    let unserved: usize = runs
        .iter()
        .map(|r| r["unserved"].as_array().map_or(0, Vec::len))
        .sum();
    let unanswered: u64 = runs
        .iter()
        .filter_map(|r| r["unanswered_after_grace"].as_u64())
        .sum();
    json!({
        "kind": "cold-start",
        "label": args.label,
        "doc": args.doc,
        "command": args.command.join(" "),
        "probe_ms": args.probe_ms,
        "runs": runs.len(),
        "synced_ms": {
            "median": median(synced.clone()),
            "min": synced.iter().copied().reduce(f64::min),
            "max": synced.iter().copied().reduce(f64::max),
        },
        "accepted_ms_median": median(col("accepted_ms")),
        "handshake_ms_median": median(col("handshake_ms")),
        "accepted_to_synced_ms_median": median(waited),
        "attempts_median": median(col("attempts")),
        "unserved_connections": unserved,
        "unanswered_connections": unanswered,
        "each": runs,
    })
}

const ROWS: &[(&str, &str)] = &[
    ("first sync after launch, median (ms)", "/synced_ms/median"),
    ("first sync, fastest run (ms)", "/synced_ms/min"),
    ("first sync, slowest run (ms)", "/synced_ms/max"),
    (
        "first connection accepted, median (ms)",
        "/accepted_ms_median",
    ),
    ("handshake done, median (ms)", "/handshake_ms_median"),
    (
        "accepted -> synced, median (ms)",
        "/accepted_to_synced_ms_median",
    ),
    ("connection attempts, median", "/attempts_median"),
    (
        "accepted, then closed unserved (all runs)",
        "/unserved_connections",
    ),
    (
        "accepted, unanswered 1 s after (all runs)",
        "/unanswered_connections",
    ),
];

fn print(r: &Value) {
    println!(
        "cold start: {}, {} runs, document {}",
        f(&r["label"]),
        f(&r["runs"]),
        f(&r["doc"])
    );
    for (label, ptr) in ROWS {
        println!(
            "  {label:<40} {}",
            f(r.pointer(ptr).unwrap_or(&Value::Null))
        );
    }
    for (i, run) in r["each"].as_array().into_iter().flatten().enumerate() {
        println!(
            "  run {}: accepted {} ms, handshake {} ms, synced {} ms, {} attempts",
            i + 1,
            f(&run["accepted_ms"]),
            f(&run["handshake_ms"]),
            f(&run["synced_ms"]),
            f(&run["attempts"])
        );
    }
}

pub(crate) fn compare(a: &Value, b: &Value) -> Result<()> {
    println!(
        "cold start: {} runs each, first sync of one stored document",
        f(&a["runs"])
    );
    compare_rows(a, b, ROWS);
    for r in [a, b] {
        let each: Vec<String> = r["each"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|run| f(&run["synced_ms"]))
            .collect();
        println!(
            "{} first sync per run (ms): {}",
            f(&r["label"]),
            each.join(", ")
        );
    }
    Ok(())
}
