//! `tandem-loadgen`: the relay benchmarks' load generator, pointed alike at
//! Tandem's relay and at any other automerge-repo v1 sync server.
//!
//! - no subcommand: the fan-out benchmark (below; relay/bench/fanout.sh);
//! - `idle`: memory per idle connection (relay/bench/idle.sh, module `idle`);
//! - `seed` and `cold-start`: first sync after launch over a store of many
//!   documents (relay/bench/coldstart.sh, module `cold_start`);
//! - `apply-cost`: what a fan-out reader pays automerge per applied batch,
//!   without server or network (module `apply_cost`).
//!
//! `--compare A B` prints two JSON reports of the same kind side by side.
//!
//! # Fan-out
//!
//! One writer and N readers, each an automerge-repo client (the engine's
//! `Repo<MemoryStorage>` over tokio-tungstenite), on one document of any
//! automerge-repo v1 sync server (Tandem's relay, the Node sync server, ...).
//! The readers are one tokio task each; the writer runs on a thread of its
//! own, so that neither its pace nor its send times depend on how busy the
//! readers are. The writer creates the document and waits until the
//! server has stored it; the readers request it. Then, per phase, the writer
//! puts `v` (a sequence number) in one change at a time, with its send time
//! (Unix microseconds) as the change's message. (`--stamp field` puts the
//! send time in the document instead, as key `t` beside `v`: every change
//! then overwrites two keys, and automerge's apply, which walks the history
//! of each key it writes, costs the readers and the server about twice as
//! much per change. `--records N` spreads the writes over N records, maps
//! `r0` to `r{N-1}`: change n writes `v` = n in record n mod N, and its
//! message names the record, where a reader reads the value.) The phases:
//!
//! 1. at `--rate` changes/s for `--phase-secs`;
//! 2. as fast as it can (one change, flush, send, repeat) for `--phase-secs`.
//!
//! After each phase it waits up to `--drain-secs` for every reader to see the
//! last value. A reader handles every frame that has arrived (runs of sync
//! frames for the document merged into one, as a client that fell behind
//! does) and then observes the document, as an application rendering it
//! would: it records each distinct value of `v` it observes and its latency
//! (observation time minus the send time: the same machine's clock), and, as a
//! diagnostic, when the last frame handled was read off the socket (the rest
//! is the reader's own queue and apply). The readers' sockets are read on a
//! thread of their own, so that this arrival time is when the server's bytes
//! reached the process, not when a busy reader got round to reading them.
//!
//! With `--server-pid` the server's CPU time and RSS are sampled from /proc
//! every 500 ms. `--json` prints the report as JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tandem_engine::automerge::transaction::{CommitOptions, Transactable};
use tandem_engine::automerge::{Automerge, AutomergeError, ObjType, ROOT, ReadDoc};
use tandem_engine::protocol::coalesce_sync_frames;
use tandem_engine::{
    ConnectionId, Direction, DocumentId, Event, MemoryStorage, Output, PeerId, Repo, RepoConfig,
    ShareAll,
};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

// The other benchmarks, one file each beside this one (a directory without
// main.rs, so cargo does not take them for binaries).
#[path = "tandem-loadgen/apply_cost.rs"]
mod apply_cost;
#[path = "tandem-loadgen/cold_start.rs"]
mod cold_start;
#[path = "tandem-loadgen/idle.rs"]
mod idle;

/// Load generator for the relay benchmarks. Without a subcommand: fan-out,
/// 1 writer and N readers on one document.
#[derive(Debug, Parser)]
#[command(version, subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Bench>,
    /// WebSocket URL of the sync server.
    #[arg(long, required_unless_present = "compare")]
    url: Option<String>,
    /// Reader clients.
    #[arg(long, default_value_t = 50)]
    readers: usize,
    /// Changes per second in phase 1.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Length of each phase, in seconds.
    #[arg(long, default_value_t = 10.0)]
    phase_secs: f64,
    /// Longest wait after each phase for every reader to see its last value.
    #[arg(long, default_value_t = 10.0)]
    drain_secs: f64,
    /// Longest wait for connecting and loading the document.
    #[arg(long, default_value_t = 30.0)]
    setup_secs: f64,
    /// Width of the windows (by send time) for the p99-over-time series.
    #[arg(long, default_value_t = 2.0)]
    window_secs: f64,
    /// Process id of the server, to sample its CPU and RSS from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Name of the server in the report.
    #[arg(long, default_value = "server")]
    label: String,
    /// Where the writer puts each change's send time: in the change's
    /// message (`message`, the default: the document holds only `v`), or in
    /// the document beside `v` (`field`: a second key overwritten by every
    /// change, which automerge's apply then walks too).
    #[arg(long, value_enum, default_value_t = Stamp::Message)]
    stamp: Stamp,
    /// Records in the document (0: none, the writer overwrites `v` at the
    /// root). With N records, the document is created with maps `r0` to
    /// `r{N-1}`, each with `v` = 0, and change n writes `v` = n in record
    /// n mod N: the shape of an application's records, where automerge's
    /// apply walks the history of one record instead of every change ever
    /// made. Needs `--stamp message`.
    #[arg(long, default_value_t = 0)]
    records: u32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Print two JSON reports of the same benchmark (from --json) side by
    /// side, with ratios A/B.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    compare: Option<Vec<PathBuf>>,
}

impl Args {
    fn workload(&self) -> Workload {
        Workload {
            stamp: self.stamp,
            records: self.records,
        }
    }
}

/// Where the send time of a change travels (see `Args::stamp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Stamp {
    Message,
    Field,
}

impl Stamp {
    fn name(self) -> &'static str {
        match self {
            Stamp::Message => "message",
            Stamp::Field => "field",
        }
    }
}

/// What the writer writes and the readers read (see `Args::stamp` and
/// `Args::records`).
#[derive(Debug, Clone, Copy)]
struct Workload {
    stamp: Stamp,
    records: u32,
}

impl Workload {
    fn record(self, v: u64) -> String {
        format!("r{}", v % u64::from(self.records))
    }

    /// The document's first change: `v` = 0 (in every record, if any).
    fn create(
        self,
        repo: &mut Repo<MemoryStorage>,
        doc: &DocumentId,
        t: i64,
    ) -> Result<(), tandem_engine::RepoError> {
        if self.records == 0 {
            return self.write(repo, doc, 0, t);
        }
        let options = CommitOptions::default().with_message(format!("{t} 0"));
        repo.change_with(doc, options, |d| {
            for r in 0..self.records {
                let record = d.put_object(ROOT, self.record(u64::from(r)), ObjType::Map)?;
                d.put(&record, "v", 0u64)?;
            }
            Ok(())
        })
    }

    /// Write `v` in one change of `doc`, sent at `t`.
    fn write(
        self,
        repo: &mut Repo<MemoryStorage>,
        doc: &DocumentId,
        v: u64,
        t: i64,
    ) -> Result<(), tandem_engine::RepoError> {
        if self.records > 0 {
            // The message says when, and which record: a reader reads the
            // value from the document.
            let options = CommitOptions::default().with_message(format!("{t} {v}"));
            let key = self.record(v);
            return repo.change_with(doc, options, |d| {
                let Some((_, record)) = d.get(ROOT, &key)? else {
                    return Err(AutomergeError::InvalidObjId(key.clone()));
                };
                d.put(&record, "v", v)
            });
        }
        match self.stamp {
            Stamp::Message => {
                let options = CommitOptions::default().with_message(t.to_string());
                repo.change_with(doc, options, |d| d.put(ROOT, "v", v))
            }
            Stamp::Field => repo.change(doc, |d| {
                d.put(ROOT, "v", v)?;
                d.put(ROOT, "t", t)
            }),
        }
    }

    /// The newest value in `d` and the send time of the change that wrote
    /// it. With records: the value the head change wrote, read from its
    /// record (the change's message names it).
    fn read(self, d: &Automerge) -> Option<(u64, i64)> {
        if self.records > 0 {
            let heads = d.get_heads();
            let [head] = heads.as_slice() else {
                return None; // one writer: never forked
            };
            let meta = d.get_change_meta_by_hash(head)?;
            let (t, v) = meta.message.as_deref()?.split_once(' ')?;
            let (t, v): (i64, u64) = (t.parse().ok()?, v.parse().ok()?);
            let (_, record) = d.get(ROOT, self.record(v)).ok().flatten()?;
            let stored = d.get(&record, "v").ok().flatten()?.0.as_u64()?;
            return (stored == v).then_some((v, t));
        }
        let (v, op) = d.get(ROOT, "v").ok().flatten()?;
        let v = v.as_u64()?;
        let t = match self.stamp {
            Stamp::Field => d.get(ROOT, "t").ok().flatten()?.0.as_i64()?,
            Stamp::Message => {
                let change = d.get_change_meta_by_hash(&d.hash_for_opid(&op)?)?;
                change.message.as_deref()?.parse().ok()?
            }
        };
        Some((v, t))
    }
}

#[derive(Debug, clap::Subcommand)]
enum Bench {
    /// Memory per idle connection: connect N clients that each complete the
    /// handshake and load one document, then read the server's RSS.
    Idle(idle::IdleArgs),
    /// Write a Tandem store of N small documents (and export them, to seed
    /// another server with the same documents); prints the id to request.
    Seed(cold_start::SeedArgs),
    /// Launch a server command repeatedly and time each launch until the
    /// first sync of a stored document completes.
    ColdStart(cold_start::ColdStartArgs),
    /// What a fan-out reader pays automerge to apply a batch of changes to a
    /// key with a history, without server or network: the floor under any
    /// server's fan-out latency on this machine.
    ApplyCost(apply_cost::ApplyCostArgs),
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const CONN: ConnectionId = ConnectionId(1);
/// The kernel's USER_HZ: /proc reports CPU times in these ticks (100 on
/// every mainstream Linux architecture).
const TICKS_PER_SEC: f64 = 100.0;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

// ---- one automerge-repo client ------------------------------------------

/// Open a WebSocket to `url` (by `deadline`).
async fn open_socket(
    url: &str,
    deadline: Instant,
    config: Option<WebSocketConfig>,
) -> Result<Socket> {
    let connecting = tokio_tungstenite::connect_async_with_config(url, config, false);
    let (ws, _) = tokio::time::timeout_at(deadline, connecting)
        .await
        .context("timed out connecting")?
        .with_context(|| format!("cannot connect to {url}"))?;
    Ok(ws)
}

/// The repo settings of a client that only measures.
fn measuring_config(name: String) -> RepoConfig {
    let mut config = RepoConfig::new(PeerId::new(name));
    // It never compacts its in-memory store. Compaction re-encodes the
    // whole document, and every reader reaches the threshold at the same
    // change, so all of them would stall together (the 100/s phase did at
    // about its 430th change).
    config.documents.compaction_min_bytes = usize::MAX;
    // Plain protocol v1 with every server, so that Tandem's relay and the
    // Node server are measured on the same frames (Tandem's batch extension
    // would only be negotiated with the relay).
    config.batch_bytes = 0;
    // Nor does it hold messages for a server slow to answer (automerge-repo
    // clients have no such bound): with it, the writer would send a
    // server that answers late its changes in fewer, larger messages, and
    // the two servers would no longer get the same load.
    config.max_unanswered_changes = 0;
    config
}

struct Client {
    repo: Repo<MemoryStorage>,
    sink: SplitSink<Socket, Ws>,
    /// Frames read from the socket, with when they were read (Unix µs).
    frames: mpsc::UnboundedReceiver<(i64, Vec<u8>)>,
    /// The server answered `join` with `peer`.
    ready: bool,
    /// The server said it does not have a document we asked for.
    unavailable: bool,
    /// Why the connection ended, once it has.
    closed: Option<String>,
    /// Nothing waits past this.
    deadline: Instant,
    frames_in: u64,
    bytes_in: u64,
    frames_out: u64,
}

impl Client {
    async fn connect(url: &str, name: String, deadline: Instant) -> Result<Self> {
        Self::connect_with(url, name, deadline, None).await
    }

    /// Connect with these WebSocket settings (tungstenite's defaults: None).
    async fn connect_with(
        url: &str,
        name: String,
        deadline: Instant,
        config: Option<WebSocketConfig>,
    ) -> Result<Self> {
        let ws = open_socket(url, deadline, config).await?;
        Self::over(ws, measuring_config(name), deadline, None).await
    }

    /// Like `connect`, with the socket opened and read on `io`, a runtime
    /// whose one thread does nothing else: a frame's arrival time is then
    /// when the server's bytes reached this process, however busy the
    /// readers' own runtime is with applying changes.
    async fn connect_on(url: &str, name: String, deadline: Instant, io: &Handle) -> Result<Self> {
        let url = url.to_owned();
        let ws = io
            .spawn(async move { open_socket(&url, deadline, None).await })
            .await??;
        Self::over(ws, measuring_config(name), deadline, Some(io)).await
    }

    /// A client on an open WebSocket, read on `io` (or the current runtime):
    /// sends `join` at once.
    async fn over(
        ws: Socket,
        config: RepoConfig,
        deadline: Instant,
        io: Option<&Handle>,
    ) -> Result<Self> {
        let (sink, mut stream) = ws.split();
        let (tx, frames) = mpsc::unbounded_channel();
        // Read eagerly, so the server never waits on us (and pings are answered).
        let read = async move {
            while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, stream.next()).await {
                match msg {
                    Ok(Ws::Binary(b)) => {
                        if tx.send((now_us(), b.to_vec())).is_err() {
                            break;
                        }
                    }
                    Ok(Ws::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        match io {
            Some(io) => drop(io.spawn(read)),
            None => drop(tokio::spawn(read)),
        }
        let mut repo = Repo::open(MemoryStorage::new(), config, ShareAll)?;
        repo.connect(CONN, Direction::Outgoing)?;
        let mut client = Self {
            repo,
            sink,
            frames,
            ready: false,
            unavailable: false,
            closed: None,
            deadline,
            frames_in: 0,
            bytes_in: 0,
            frames_out: 0,
        };
        client.pump().await;
        Ok(client)
    }

    /// Hand a frame to the repo.
    fn receive(&mut self, frame: &[u8]) {
        self.frames_in += 1;
        self.bytes_in += frame.len() as u64;
        self.apply(frame);
    }

    fn apply(&mut self, frame: &[u8]) {
        if let Err(e) = self.repo.receive((now_us() / 1000) as u64, CONN, frame) {
            self.closed.get_or_insert(format!("receive failed: {e}"));
        }
    }

    /// Hand the repo `first` and every frame already queued behind it, each
    /// run of sync frames about one document merged into one, as a client
    /// that fell behind does (`coalesce_sync_frames`: one automerge apply
    /// instead of one per frame). Returns when the last was read off the
    /// socket.
    fn receive_queued(&mut self, first: (i64, Vec<u8>)) -> i64 {
        let (mut at, frame) = first;
        let mut frames = vec![frame];
        while let Ok((later, frame)) = self.frames.try_recv() {
            at = later;
            frames.push(frame);
        }
        self.frames_in += frames.len() as u64;
        self.bytes_in += frames.iter().map(|f| f.len() as u64).sum::<u64>();
        coalesce_sync_frames(&mut frames);
        for frame in &frames {
            self.apply(frame);
        }
        at
    }

    /// Flush the repo and send what it produced.
    async fn pump(&mut self) {
        if let Err(e) = self.repo.flush() {
            self.closed.get_or_insert(format!("flush failed: {e}"));
            return;
        }
        let mut any = false;
        while let Some(out) = self.repo.poll_output() {
            match out {
                Output::Send { frame, .. } if self.closed.is_none() => {
                    self.frames_out += 1;
                    any = true;
                    if self.sink.feed(Ws::Binary(frame.into())).await.is_err() {
                        self.closed.get_or_insert("send failed".into());
                    }
                }
                Output::Send { .. } => {}
                Output::Close { reason, .. } => {
                    self.closed.get_or_insert(format!(
                        "closed by the protocol: {}",
                        reason.unwrap_or_else(|| "leave".into())
                    ));
                }
                Output::Event(Event::PeerDisconnected { .. }) => {
                    self.closed.get_or_insert("peer disconnected".into());
                }
                Output::Event(Event::PeerConnected(_)) => self.ready = true,
                Output::Event(Event::DocumentUnavailable { .. }) => self.unavailable = true,
                Output::Event(_) => {}
            }
        }
        if any && self.closed.is_none() {
            match tokio::time::timeout_at(self.deadline, self.sink.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.closed.get_or_insert(format!("send failed: {e}"));
                }
                Err(_) => {
                    self.closed.get_or_insert("send timed out".into());
                }
            }
        }
    }

    /// Wait for the next frame (or `until`); false once the socket is gone.
    async fn next_frame(&mut self, until: Instant) -> Option<(i64, Vec<u8>)> {
        match tokio::time::timeout_at(until.min(self.deadline), self.frames.recv()).await {
            Ok(Some(f)) => Some(f),
            Ok(None) => {
                self.closed.get_or_insert("socket closed".into());
                None
            }
            Err(_) => None,
        }
    }

    /// Create a document with `fill`, send it, and wait until the server
    /// has stored it (its heads include ours).
    async fn create_stored(
        &mut self,
        until: Instant,
        fill: impl FnOnce(&mut Repo<MemoryStorage>, &DocumentId) -> Result<(), tandem_engine::RepoError>,
    ) -> Result<DocumentId> {
        let doc = self.repo.create()?;
        fill(&mut self.repo, &doc)?;
        self.pump().await;
        while !heads_contain(&mut self.repo, &doc) {
            if let Some(e) = &self.closed {
                bail!("lost the connection while creating a document: {e}");
            }
            if Instant::now() >= until {
                bail!("the server did not store the new document in time");
            }
            if let Some(frame) = self.next_frame(until).await {
                self.receive_queued(frame);
                self.pump().await;
            }
        }
        Ok(doc)
    }

    /// Receive until `done(self)` holds, the connection ends or `until`.
    async fn run_until(&mut self, until: Instant, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        while !done(self) {
            if self.closed.is_some()
                || self.unavailable
                || Instant::now() >= until.min(self.deadline)
            {
                return false;
            }
            if let Some(frame) = self.next_frame(until).await {
                self.receive_queued(frame);
                self.pump().await;
            }
        }
        true
    }

    /// The document has arrived (it was empty here until the server sent it).
    fn has(&mut self, doc: &DocumentId) -> bool {
        self.repo.heads(doc).is_ok_and(|h| !h.is_empty())
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.sink.close()).await;
    }
}

fn heads_contain(repo: &mut Repo<MemoryStorage>, doc: &DocumentId) -> bool {
    repo.is_acknowledged(CONN, doc).unwrap_or(false)
}

// ---- the writer ----------------------------------------------------------

/// What the writer sent in one phase.
#[derive(Debug, Clone, Copy)]
struct Sent {
    first: u64,
    last: u64,
    start_us: i64,
    end_us: i64,
}

enum WriterCmd {
    Phase {
        rate: Option<f64>,
        secs: f64,
        reply: oneshot::Sender<Sent>,
    },
}

struct Writer {
    client: Client,
    doc: DocumentId,
    seq: u64,
    workload: Workload,
}

impl Writer {
    fn put(&mut self) {
        self.seq += 1;
        let (v, t) = (self.seq, now_us());
        if let Err(e) = self.workload.write(&mut self.client.repo, &self.doc, v, t) {
            self.client
                .closed
                .get_or_insert(format!("change failed: {e}"));
        }
    }

    /// Take every frame that is ready, then flush and send.
    async fn handle_ready(&mut self) {
        let mut any = false;
        while let Ok((_, f)) = self.client.frames.try_recv() {
            self.client.receive(&f);
            any = true;
        }
        if any {
            self.client.pump().await;
        }
    }

    async fn phase(&mut self, rate: Option<f64>, secs: f64) -> Sent {
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        let (first, start_us) = (self.seq + 1, now_us());
        match rate {
            Some(rate) => {
                let period = Duration::from_secs_f64(1.0 / rate);
                let mut n = 0u32;
                loop {
                    let due = start + period * n;
                    if due >= end || self.client.closed.is_some() {
                        break;
                    }
                    while Instant::now() < due {
                        if let Some((_, f)) = self.client.next_frame(due).await {
                            self.client.receive(&f);
                            self.handle_ready().await;
                        }
                        if self.client.closed.is_some() {
                            break;
                        }
                    }
                    self.put();
                    self.client.pump().await;
                    n += 1;
                }
            }
            None => {
                while Instant::now() < end && self.client.closed.is_none() {
                    self.put();
                    self.client.pump().await;
                    self.handle_ready().await;
                    tokio::task::yield_now().await;
                }
            }
        }
        Sent {
            first,
            last: self.seq,
            start_us,
            end_us: now_us(),
        }
    }

    async fn run(mut self, mut cmds: mpsc::Receiver<WriterCmd>) -> Client {
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(WriterCmd::Phase { rate, secs, reply }) => {
                        let sent = self.phase(rate, secs).await;
                        let _ = reply.send(sent);
                    }
                    None => break,
                },
                f = self.client.frames.recv() => match f {
                    Some((_, f)) => {
                        self.client.receive(&f);
                        self.handle_ready().await;
                    }
                    None => {
                        self.client.closed.get_or_insert("socket closed".into());
                        break;
                    }
                },
                _ = tokio::time::sleep_until(self.client.deadline) => break,
            }
        }
        self.client
    }
}

/// The writer, on a thread of its own with its own (single-threaded)
/// runtime: in the shared runtime it would take its turn behind every
/// reader with a frame to handle, so "as fast as it can" would mean as fast
/// as the readers let it, and the send times of the rate phase would jitter
/// with their load. It connects, creates the document (sent on `doc`), runs
/// the phases it is sent, and closes when `cmds` closes.
fn spawn_writer(
    url: String,
    deadline: Instant,
    setup_end: Instant,
    workload: Workload,
    cmds: mpsc::Receiver<WriterCmd>,
    doc: oneshot::Sender<Result<DocumentId>>,
) -> Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("loadgen-writer".into())
        .spawn(move || {
            runtime.block_on(async move {
                let setup = async {
                    let mut client =
                        Client::connect(&url, "loadgen-writer".into(), deadline).await?;
                    let t = now_us();
                    let id = client
                        .create_stored(setup_end, |repo, doc| workload.create(repo, doc, t))
                        .await?;
                    anyhow::Ok((client, id))
                };
                let (client, id) = match setup.await {
                    Ok(ok) => ok,
                    Err(e) => {
                        let _ = doc.send(Err(e));
                        return;
                    }
                };
                let _ = doc.send(Ok(id));
                let writer = Writer {
                    client,
                    doc: id,
                    seq: 0,
                    workload,
                };
                writer.run(cmds).await.close().await;
            });
        })?;
    Ok(thread)
}

// ---- the readers ---------------------------------------------------------

/// One distinct value a reader observed.
#[derive(Debug, Clone, Copy)]
struct Seen {
    v: u64,
    sent_us: i64,
    /// When the frame that brought it was read from the socket.
    arrived_us: i64,
    seen_us: i64,
}

struct ReaderReport {
    seen: Vec<Seen>,
    closed: Option<String>,
    frames_in: u64,
    bytes_in: u64,
    frames_out: u64,
}

/// `progress` holds the last value seen plus one (0: nothing yet).
async fn reader(
    mut client: Client,
    doc: DocumentId,
    workload: Workload,
    progress: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> ReaderReport {
    let mut seen = Vec::new();
    let mut last: Option<u64> = None;
    // What the application sees: the document after everything that had
    // arrived was applied.
    let mut observe = |client: &mut Client, first: (i64, Vec<u8>)| {
        let arrived_us = client.receive_queued(first);
        if let Some((v, t)) = client.repo.view(&doc, |d| workload.read(d)).ok().flatten()
            && last.is_none_or(|l| v > l)
        {
            last = Some(v);
            seen.push(Seen {
                v,
                sent_us: t,
                arrived_us,
                seen_us: now_us(),
            });
            progress.store(v + 1, Ordering::Release);
        }
    };
    if let Err(e) = client.repo.request(doc) {
        client.closed.get_or_insert(format!("request failed: {e}"));
    }
    client.pump().await;
    while client.closed.is_none() {
        tokio::select! {
            _ = stop.changed() => break,
            f = client.frames.recv() => match f {
                Some(frame) => {
                    observe(&mut client, frame);
                    client.pump().await;
                }
                None => {
                    client.closed.get_or_insert("socket closed".into());
                }
            },
            _ = tokio::time::sleep_until(client.deadline) => break,
        }
    }
    let report = ReaderReport {
        seen,
        closed: client.closed.clone(),
        frames_in: client.frames_in,
        bytes_in: client.bytes_in,
        frames_out: client.frames_out,
    };
    client.close().await;
    report
}

// ---- /proc sampling ------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct ProcSample {
    at_us: i64,
    cpu_secs: f64,
    rss_kb: u64,
}

fn proc_sample(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Some(ProcSample {
        at_us: now_us(),
        cpu_secs: (utime + stime) / TICKS_PER_SEC,
        rss_kb,
    })
}

/// Sample `pid` every 500 ms until `stop`.
fn sampler(
    pid: String,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<ProcSample>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => match proc_sample(&pid) {
                    Some(s) => samples.push(s),
                    None => break, // the process is gone
                },
                _ = stop.changed() => break,
            }
        }
        samples
    })
}

/// CPU (% of one core) and peak RSS between two times, from the samples.
fn usage(samples: &[ProcSample], from_us: i64, to_us: i64) -> Value {
    let inside: Vec<&ProcSample> = samples
        .iter()
        .filter(|s| s.at_us >= from_us && s.at_us <= to_us)
        .collect();
    let (Some(a), Some(b)) = (inside.first(), inside.last()) else {
        return Value::Null;
    };
    let wall = (b.at_us - a.at_us) as f64 / 1e6;
    let cpu = if wall > 0.0 {
        (b.cpu_secs - a.cpu_secs) / wall * 100.0
    } else {
        0.0
    };
    json!({
        "cpu_percent": round1(cpu),
        "cpu_secs": round2(b.cpu_secs - a.cpu_secs),
        "rss_peak_mb": round1(inside.iter().map(|s| s.rss_kb).max().unwrap_or(0) as f64 / 1024.0),
        "rss_end_mb": round1(b.rss_kb as f64 / 1024.0),
    })
}

// ---- statistics ----------------------------------------------------------

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Nearest-rank percentile of sorted values.
fn pct<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms(us: Option<i64>) -> Value {
    us.map_or(Value::Null, |u| json!(round1(u as f64 / 1000.0)))
}

fn phase_stats(
    name: &str,
    sent: Sent,
    drain: (i64, usize),
    readers: &[ReaderReport],
    window_secs: f64,
    server: &[ProcSample],
    client: &[ProcSample],
) -> Value {
    let n_sent = sent.last + 1 - sent.first;
    let secs = (sent.end_us - sent.start_us) as f64 / 1e6;
    let mut distinct: Vec<u64> = Vec::new();
    let mut latencies: Vec<i64> = Vec::new();
    let mut arrivals: Vec<i64> = Vec::new();
    let mut rates: Vec<f64> = Vec::new();
    // By send window: latencies, and arrivals at the socket.
    let mut windows: BTreeMap<i64, (Vec<i64>, Vec<i64>)> = BTreeMap::new();
    let window_us = (window_secs * 1e6) as i64;
    for r in readers {
        let mine: Vec<&Seen> = r
            .seen
            .iter()
            .filter(|s| s.v >= sent.first && s.v <= sent.last)
            .collect();
        distinct.push(mine.len() as u64);
        for s in &mine {
            let (lat, arrival) = (s.seen_us - s.sent_us, s.arrived_us - s.sent_us);
            latencies.push(lat);
            arrivals.push(arrival);
            let window = windows
                .entry((s.sent_us - sent.start_us) / window_us)
                .or_default();
            window.0.push(lat);
            window.1.push(arrival);
        }
        // Delivered: how far the reader's copy advanced, over the time it took.
        rates.push(match mine.last() {
            Some(s) => {
                let took = (s.seen_us - sent.start_us).max(1) as f64 / 1e6;
                (s.v + 1 - sent.first) as f64 / took
            }
            None => 0.0,
        });
    }
    distinct.sort_unstable();
    latencies.sort_unstable();
    arrivals.sort_unstable();
    rates.sort_by(f64::total_cmp);
    let pct_of = |d: Option<u64>| {
        d.map_or(Value::Null, |d| {
            json!(round1(d as f64 * 100.0 / n_sent.max(1) as f64))
        })
    };
    let windows: Vec<Value> = windows
        .into_iter()
        .map(|(k, (mut l, mut a))| {
            l.sort_unstable();
            a.sort_unstable();
            json!({
                "from_s": round1(k as f64 * window_secs),
                "observations": l.len(),
                "p50_ms": ms(pct(&l, 50.0)),
                "p99_ms": ms(pct(&l, 99.0)),
                "arrival_p99_ms": ms(pct(&a, 99.0)),
            })
        })
        .collect();
    let phase_end = drain.0;
    json!({
        "phase": name,
        "sent": n_sent,
        "send_secs": round2(secs),
        "send_rate": round1(n_sent as f64 / secs.max(1e-9)),
        "readers": readers.len(),
        "distinct_seen": {
            "min": distinct.first(),
            "median": pct(&distinct, 50.0),
            "max": distinct.last(),
            "min_percent": pct_of(distinct.first().copied()),
            "median_percent": pct_of(pct(&distinct, 50.0)),
        },
        "latency_ms": {
            "observations": latencies.len(),
            "p50": ms(pct(&latencies, 50.0)),
            "p99": ms(pct(&latencies, 99.0)),
            "max": ms(latencies.last().copied()),
        },
        // Diagnostic: send to the frame's arrival at the reader's socket
        // task (the rest of the latency is the reader's own queue and apply).
        "arrival_ms": {
            "p50": ms(pct(&arrivals, 50.0)),
            "p99": ms(pct(&arrivals, 99.0)),
        },
        "delivered_per_reader_per_sec": {
            "min": rates.first().map(|r| round1(*r)),
            "median": pct(&rates, 50.0).map(round1),
        },
        "delivered_total_per_sec": round1(rates.iter().sum::<f64>()),
        "caught_up_readers": drain.1,
        "catch_up_secs": round2((phase_end - sent.end_us) as f64 / 1e6),
        "p99_by_send_window": windows,
        "server": usage(server, sent.start_us, phase_end),
        "loadgen": usage(client, sent.start_us, phase_end),
    })
}

// ---- the run -------------------------------------------------------------

async fn run(args: &Args, url: &str, io: &Handle) -> Result<Value> {
    let total = args.setup_secs + 2.0 * (args.phase_secs + args.drain_secs) + 30.0;
    let deadline = Instant::now() + Duration::from_secs_f64(total);
    let setup_end = Instant::now() + Duration::from_secs_f64(args.setup_secs);
    let (stop_tx, stop_rx) = watch::channel(false);
    let server_sampler = args
        .server_pid
        .map(|p| sampler(p.to_string(), stop_rx.clone()));
    let client_sampler = sampler("self".into(), stop_rx.clone());
    let setup_start = now_us();

    // The writer creates the document and waits until the server stored it.
    let (writer_tx, writer_rx) = mpsc::channel(1);
    let (doc_tx, doc_rx) = oneshot::channel();
    let writer = spawn_writer(
        url.to_owned(),
        deadline,
        setup_end,
        args.workload(),
        writer_rx,
        doc_tx,
    )?;
    let doc = doc_rx
        .await
        .map_err(|_| anyhow::anyhow!("the writer ended during setup"))?
        .with_context(|| format!("writer setup (within {} s)", args.setup_secs))?;

    // Readers connect and request the document.
    let mut connecting = Vec::new();
    for i in 0..args.readers {
        let (url, io) = (url.to_owned(), io.clone());
        connecting.push(tokio::spawn(async move {
            Client::connect_on(&url, format!("loadgen-reader-{i}"), deadline, &io).await
        }));
    }
    let mut progress = Vec::new();
    let mut readers = Vec::new();
    for c in connecting {
        let client = c.await??;
        let p = Arc::new(AtomicU64::new(0));
        progress.push(p.clone());
        readers.push(tokio::spawn(reader(
            client,
            doc,
            args.workload(),
            p,
            stop_rx.clone(),
        )));
    }
    let all_seen = |min: u64| progress.iter().all(|p| p.load(Ordering::Acquire) > min);
    while !all_seen(0) {
        if Instant::now() >= setup_end {
            let n = progress
                .iter()
                .filter(|p| p.load(Ordering::Acquire) > 0)
                .count();
            bail!(
                "only {n} of {} readers loaded the document within {} s",
                args.readers,
                args.setup_secs
            );
        }
        if readers.iter().any(|r| r.is_finished()) {
            bail!("a reader ended during setup (disconnected?)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let setup_secs = (now_us() - setup_start) as f64 / 1e6;
    eprintln!(
        "[{}] {} readers have the document after {setup_secs:.2} s",
        args.label, args.readers
    );

    // The phases, each followed by a drain.
    let mut phases = Vec::new();
    for (name, rate) in [("rate", Some(args.rate)), ("full-speed", None)] {
        let (reply, sent) = oneshot::channel();
        writer_tx
            .send(WriterCmd::Phase {
                rate,
                secs: args.phase_secs,
                reply,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the writer ended early"))?;
        let sent = sent
            .await
            .map_err(|_| anyhow::anyhow!("the writer ended during a phase"))?;
        let drain_end = Instant::now() + Duration::from_secs_f64(args.drain_secs);
        while !all_seen(sent.last) && Instant::now() < drain_end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let caught_up = progress
            .iter()
            .filter(|p| p.load(Ordering::Acquire) > sent.last)
            .count();
        eprintln!(
            "[{}] phase {name}: sent {} values in {:.2} s; {caught_up}/{} readers caught up",
            args.label,
            sent.last + 1 - sent.first,
            (sent.end_us - sent.start_us) as f64 / 1e6,
            args.readers
        );
        phases.push((name, sent, (now_us(), caught_up)));
    }
    let _ = stop_tx.send(true);
    drop(writer_tx);
    let mut reports = Vec::new();
    for r in readers {
        reports.push(r.await?);
    }
    tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the writer panicked"))?;
    let server_samples = match server_sampler {
        Some(s) => s.await?,
        None => Vec::new(),
    };
    let client_samples = client_sampler.await?;

    let disconnected: Vec<Value> = reports
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.closed.as_ref().map(|c| json!({"reader": i, "why": c})))
        .collect();
    let phase_values: Vec<Value> = phases
        .iter()
        .map(|(name, sent, drain)| {
            phase_stats(
                name,
                *sent,
                *drain,
                &reports,
                args.window_secs,
                &server_samples,
                &client_samples,
            )
        })
        .collect();
    Ok(json!({
        "kind": "fan-out",
        "label": args.label,
        "url": url,
        "readers": args.readers,
        "stamp": args.stamp.name(),
        "records": args.records,
        "rate": args.rate,
        "phase_secs": args.phase_secs,
        "setup_secs": round2(setup_secs),
        "phases": phase_values,
        "readers_disconnected": disconnected,
        "frames": {
            "to_readers": reports.iter().map(|r| r.frames_in).sum::<u64>(),
            "bytes_to_readers": reports.iter().map(|r| r.bytes_in).sum::<u64>(),
            "from_readers": reports.iter().map(|r| r.frames_out).sum::<u64>(),
        },
        "server_peak_rss_mb": server_samples.iter().map(|s| s.rss_kb).max().map(|k| round1(k as f64 / 1024.0)),
    }))
}

// ---- printing ------------------------------------------------------------

fn f(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The rows printed for one phase: (label, JSON pointer inside the phase).
const ROWS: &[(&str, &str)] = &[
    ("values sent", "/sent"),
    ("send rate (/s)", "/send_rate"),
    ("distinct seen min", "/distinct_seen/min"),
    ("distinct seen median", "/distinct_seen/median"),
    ("seen % min", "/distinct_seen/min_percent"),
    ("seen % median", "/distinct_seen/median_percent"),
    ("latency p50 (ms)", "/latency_ms/p50"),
    ("latency p99 (ms)", "/latency_ms/p99"),
    ("latency max (ms)", "/latency_ms/max"),
    ("arrival at socket p50 (ms)", "/arrival_ms/p50"),
    ("arrival at socket p99 (ms)", "/arrival_ms/p99"),
    (
        "delivered/s per reader (median)",
        "/delivered_per_reader_per_sec/median",
    ),
    ("delivered/s all readers", "/delivered_total_per_sec"),
    ("readers caught up", "/caught_up_readers"),
    ("catch-up after phase (s)", "/catch_up_secs"),
    ("server CPU (% of a core)", "/server/cpu_percent"),
    ("server RSS peak (MB)", "/server/rss_peak_mb"),
    ("loadgen CPU (% of a core)", "/loadgen/cpu_percent"),
];

/// One p99 (`key`: "p99_ms" or "arrival_p99_ms") per send window.
fn windows_line(phase: &Value, key: &str) -> String {
    phase["p99_by_send_window"]
        .as_array()
        .map(|w| {
            w.iter()
                .map(|w| format!("{}s:{}", f(&w["from_s"]), f(&w[key])))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn print_report(r: &Value) {
    println!(
        "{}: {} readers, {} (rate phase {} changes/s, {} s per phase; setup {} s)",
        f(&r["label"]),
        f(&r["readers"]),
        f(&r["url"]),
        f(&r["rate"]),
        f(&r["phase_secs"]),
        f(&r["setup_secs"])
    );
    for p in r["phases"].as_array().into_iter().flatten() {
        println!("  phase {}", f(&p["phase"]));
        for (label, ptr) in ROWS {
            println!(
                "    {label:<34} {}",
                f(p.pointer(ptr).unwrap_or(&Value::Null))
            );
        }
        println!(
            "    p99 by 2 s send window (ms)        {}",
            windows_line(p, "p99_ms")
        );
        println!(
            "    arrival p99 by send window (ms)    {}",
            windows_line(p, "arrival_p99_ms")
        );
    }
    println!(
        "  readers disconnected: {}",
        r["readers_disconnected"].as_array().map_or(0, Vec::len)
    );
}

/// A/B with two decimals, or "-".
fn ratio(a: &Value, b: &Value) -> String {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if y != 0.0 => format!("{:.2}", x / y),
        _ => "-".into(),
    }
}

/// Print `rows` (label, JSON pointer) of two reports side by side with A/B.
fn compare_rows(a: &Value, b: &Value, rows: &[(&str, &str)]) {
    let (an, bn) = (f(&a["label"]), f(&b["label"]));
    println!(
        "  {:<40} {:>12} {:>12} {:>10}",
        "",
        an,
        bn,
        format!("{an}/{bn}")
    );
    for (label, ptr) in rows {
        let va = a.pointer(ptr).unwrap_or(&Value::Null);
        let vb = b.pointer(ptr).unwrap_or(&Value::Null);
        println!(
            "  {label:<40} {:>12} {:>12} {:>10}",
            f(va),
            f(vb),
            ratio(va, vb)
        );
    }
}

fn compare(a_path: &Path, b_path: &Path) -> Result<()> {
    let load = |p: &Path| -> Result<Value> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a loadgen JSON report", p.display()))
    };
    let (a, b) = (load(a_path)?, load(b_path)?);
    if a["kind"] != b["kind"] {
        bail!("the two reports are of different benchmarks");
    }
    match a["kind"].as_str() {
        Some("idle") => return idle::compare(&a, &b),
        Some("cold-start") => return cold_start::compare(&a, &b),
        Some("apply-cost") => {
            bail!("apply-cost reports measure automerge alone: nothing to compare")
        }
        _ => {}
    }
    let (an, bn) = (f(&a["label"]), f(&b["label"]));
    println!(
        "fan-out: {} readers, rate phase {} changes/s, {} s per phase, send time in the {}, {} records",
        f(&a["readers"]),
        f(&a["rate"]),
        f(&a["phase_secs"]),
        f(&a["stamp"]),
        f(&a["records"])
    );
    if a["stamp"] != b["stamp"] || a["records"] != b["records"] {
        bail!("the two reports ran different workloads (--stamp, --records)");
    }
    let empty = Vec::new();
    let (ap, bp) = (
        a["phases"].as_array().unwrap_or(&empty),
        b["phases"].as_array().unwrap_or(&empty),
    );
    for (pa, pb) in ap.iter().zip(bp) {
        println!();
        println!("phase {}", f(&pa["phase"]));
        println!(
            "  {:<34} {:>12} {:>12} {:>10}",
            "",
            an,
            bn,
            format!("{an}/{bn}")
        );
        for (label, ptr) in ROWS {
            let va = pa.pointer(ptr).unwrap_or(&Value::Null);
            let vb = pb.pointer(ptr).unwrap_or(&Value::Null);
            println!(
                "  {label:<34} {:>12} {:>12} {:>10}",
                f(va),
                f(vb),
                ratio(va, vb)
            );
        }
        for (title, key) in [
            ("p99 by 2 s send window (ms)", "p99_ms"),
            (
                "arrival at the socket, p99 by send window (ms)",
                "arrival_p99_ms",
            ),
        ] {
            println!("  {title}");
            println!("    {an}: {}", windows_line(pa, key));
            println!("    {bn}: {}", windows_line(pb, key));
        }
    }
    println!();
    for r in [&a, &b] {
        let d = r["readers_disconnected"].as_array().map_or(0, Vec::len);
        println!(
            "{}: readers disconnected {d}, frames to readers {}, server peak RSS {} MB",
            f(&r["label"]),
            f(&r["frames"]["to_readers"]),
            f(&r["server_peak_rss_mb"])
        );
        if let Some(list) = r["readers_disconnected"].as_array() {
            for x in list.iter().take(5) {
                println!("    reader {}: {}", f(&x["reader"]), f(&x["why"]));
            }
        }
    }
    Ok(())
}

/// Print a report as pretty JSON, or through `human`.
fn emit(report: &Value, json: bool, human: impl FnOnce(&Value)) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        human(report);
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(paths) = &args.compare {
        return compare(&paths[0], &paths[1]);
    }
    match &args.command {
        Some(Bench::Idle(a)) => return idle::main(a),
        Some(Bench::Seed(a)) => return cold_start::seed(a),
        Some(Bench::ColdStart(a)) => return cold_start::main(a),
        Some(Bench::ApplyCost(a)) => return apply_cost::main(a),
        None => {}
    }
    let url = args.url.clone().context("--url is required")?;
    if args.rate <= 0.0 || args.phase_secs <= 0.0 || args.window_secs <= 0.0 {
        bail!("--rate, --phase-secs and --window-secs must be positive");
    }
    if args.records > 0 && args.stamp != Stamp::Message {
        bail!("--records needs --stamp message (the change's message names the record)");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The readers' sockets, on a thread of their own (`Client::connect_on`).
    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("loadgen-sockets")
        .enable_all()
        .build()?;
    let report = runtime.block_on(run(&args, &url, io.handle()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}
