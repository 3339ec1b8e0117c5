//! `tandem`: run a relay, look inside a store.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tandem_engine::automerge::ReadDoc;
use tandem_engine::rows::{Rows, TableSchema};
use tandem_engine::{DocumentId, PeerId, RedbStorage, Repo, RepoConfig, ServeOnRequest};
use tandem_relay::{Auth, Claims, Grant, RelayConfig, mint, serve};
use tokio::net::TcpListener;

/// automerge's columnar documents make many small allocations and frees;
/// with mimalloc a single-row write takes about a quarter less CPU than
/// with glibc malloc (docs/benchmarks.md, row layer, "Run L").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tandem: a collaborative state engine. `tandem serve` runs a relay that
/// automerge-repo clients (JS, samod, Tandem) connect to.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log format: `human` or `json` (one JSON object per line).
    #[arg(
        long,
        global = true,
        env = "TANDEM_LOG_FORMAT",
        default_value = "human"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// `tandem serve` settings. Each comes from the flag, else its environment
/// variable, else the `--config` TOML file (same names, e.g.
/// `max-message-size = 1048576`), else the default shown.
#[derive(Debug, Default, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ServeOptions {
    /// A TOML file with any of these settings.
    #[arg(long, env = "TANDEM_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:3030].
    #[arg(long, env = "TANDEM_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory of the store, created if missing [default: tandem-data].
    #[arg(long, env = "TANDEM_DATA")]
    data: Option<PathBuf>,
    /// Largest message accepted, in bytes [default: 16 MiB].
    #[arg(long, env = "TANDEM_MAX_MESSAGE_SIZE")]
    max_message_size: Option<usize>,
    /// Frames queued per connection before it is dropped as a slow reader [default: 1024].
    #[arg(long, env = "TANDEM_OUTBOUND_QUEUE")]
    outbound_queue: Option<usize>,
    /// Connections served at once [default: 10000].
    #[arg(long, env = "TANDEM_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Frames per second read from one connection at most [default: 2000].
    #[arg(long, env = "TANDEM_MAX_FRAMES_PER_SECOND")]
    max_frames_per_second: Option<u32>,
    /// Seconds without hearing from a connection before it is closed [default: 45].
    #[arg(long, env = "TANDEM_IDLE_TIMEOUT")]
    idle_timeout: Option<u64>,
    /// Secret that signs access tokens (see `tandem token`); clients then
    /// need a valid token.
    #[arg(long, env = "TANDEM_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Let anyone connect without a token, with read-write access to every
    /// document. Meant for local development.
    #[arg(long, env = "TANDEM_ALLOW_ANONYMOUS", conflicts_with = "secret")]
    #[serde(default)]
    allow_anonymous: bool,
    /// Also serve `/metrics` (Prometheus) and `/healthz` over HTTP here.
    #[arg(long, env = "TANDEM_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Flow control: sync messages with changes a client may have
    /// unanswered per document; later changes wait for its answer and go
    /// together (or after 250 ms without one). 0 sends every flush's
    /// changes at once, however far behind the client is [default: 0].
    #[arg(long, env = "TANDEM_SYNC_WINDOW")]
    sync_window: Option<usize>,
    /// A client that has left the relay's messages about a document
    /// unanswered for 2 s, with at least this many changes to it
    /// unconfirmed, is sent nothing more about it until it answers (each
    /// message would cost the relay in proportion to them). 0: no bound
    /// [default: 1000].
    #[arg(long, env = "TANDEM_MAX_UNANSWERED_CHANGES")]
    max_unanswered_changes: Option<usize>,
}

impl ServeOptions {
    /// Fill what the command line and environment left unset from the
    /// `--config` file.
    fn with_file(self) -> Result<Self> {
        let Some(path) = &self.config else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        let file: ServeOptions = toml::from_str(&text)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        Ok(Self {
            config: self.config,
            listen: self.listen.or(file.listen),
            data: self.data.or(file.data),
            max_message_size: self.max_message_size.or(file.max_message_size),
            outbound_queue: self.outbound_queue.or(file.outbound_queue),
            max_connections: self.max_connections.or(file.max_connections),
            max_frames_per_second: self.max_frames_per_second.or(file.max_frames_per_second),
            idle_timeout: self.idle_timeout.or(file.idle_timeout),
            secret: self.secret.or(file.secret),
            allow_anonymous: self.allow_anonymous || file.allow_anonymous,
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            sync_window: self.sync_window.or(file.sync_window),
            max_unanswered_changes: self.max_unanswered_changes.or(file.max_unanswered_changes),
        })
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay: a storing automerge-repo sync server over WebSocket.
    Serve(ServeOptions),
    /// Mint an access token signed with the relay's secret.
    Token {
        /// The relay's secret (the same as `tandem serve --secret`).
        #[arg(long, env = "TANDEM_SECRET", hide_env_values = true)]
        secret: String,
        /// Documents the token may read and write: a document id, an
        /// `automerge:` URL, or `*` for every document. Repeatable.
        #[arg(long = "write", value_name = "DOC")]
        write: Vec<String>,
        /// Documents the token may only read. Repeatable.
        #[arg(long = "read", value_name = "DOC")]
        read: Vec<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 24 * 3600)]
        ttl: u64,
        /// Who the token is for (shown in the relay's logs).
        #[arg(long)]
        subject: Option<String>,
    },
    /// Compact every document of a store: fold its incremental chunks into
    /// one snapshot (atomically, document by document) and report the
    /// documents and stored bytes before and after. The store must not be in
    /// use: stop the relay first.
    Compact {
        /// Directory of the store.
        #[arg(long, env = "TANDEM_DATA", default_value = "tandem-data")]
        data: PathBuf,
    },
    /// List the documents of a store with their heads and stored size, and
    /// its tables with their row counts.
    Inspect {
        /// Directory of the store.
        #[arg(long, env = "TANDEM_DATA", default_value = "tandem-data")]
        data: PathBuf,
        /// Also print each document's root keys.
        #[arg(long)]
        keys: bool,
        /// Also print every row of every table.
        #[arg(long)]
        rows: bool,
    },
    /// Write tables as JSON lines (one header line per table, then one line
    /// per row), with a progress bar on a terminal. The store must not be in use.
    Export {
        /// Directory of the store.
        #[arg(long, env = "TANDEM_DATA", default_value = "tandem-data")]
        data: PathBuf,
        /// Tables to export (repeatable) [default: every table].
        #[arg(long = "table", value_name = "NAME")]
        tables: Vec<String>,
        /// Output file [default: standard output].
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Read JSON lines written by `tandem export` into a store (created if
    /// missing), upserting every row. Importing the same file twice leaves the
    /// same rows. The store must not be in use.
    Import {
        /// Directory of the store.
        #[arg(long, env = "TANDEM_DATA", default_value = "tandem-data")]
        data: PathBuf,
        /// The JSON lines file (`-` for standard input).
        file: PathBuf,
        /// Rows per durable commit.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
}

fn store_path(data: &std::path::Path) -> PathBuf {
    data.join("store.redb")
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Serve(options) => {
            let options = options.with_file()?;
            let defaults = RelayConfig::default();
            let listen = options
                .listen
                .unwrap_or_else(|| "127.0.0.1:3030".parse().expect("valid address"));
            let data = options.data.unwrap_or_else(|| "tandem-data".into());
            let (secret, allow_anonymous, metrics_listen) = (
                options.secret,
                options.allow_anonymous,
                options.metrics_listen,
            );
            let auth = match (secret, allow_anonymous) {
                (Some(secret), _) if secret.len() < 16 => {
                    bail!(
                        "the secret is too short: use at least 16 characters (e.g. `openssl rand -hex 32`)"
                    )
                }
                (Some(secret), _) => Auth::tokens(secret.into_bytes()),
                (None, true) => Auth::Anonymous,
                (None, false) => bail!(
                    "no authentication configured for {listen}: pass --secret <SECRET> (clients then need a token from `tandem token`) \
                     or --allow-anonymous to let anyone read and write every document"
                ),
            };
            let path = store_path(&data);
            let storage = RedbStorage::open(&path).with_context(|| {
                format!(
                    "cannot open the store at {} (is another relay using it? pass --data to choose another directory)",
                    path.display()
                )
            })?;
            let mut repo_config = RepoConfig::new(PeerId::random("tandem-relay"));
            // Every peer acknowledges every change it receives: writing their
            // sync states at most once a second (and when they leave), not
            // with every flush, spares a durable commit per batch of
            // acknowledgements (RepoConfig::sync_state_interval).
            repo_config.sync_state_interval = 1_000;
            repo_config.sync_window = options.sync_window.unwrap_or(0);
            if let Some(n) = options.max_unanswered_changes {
                repo_config.max_unanswered_changes = n;
            }
            let repo = Repo::open(storage, repo_config, auth.policy())?;
            let anonymous = matches!(auth, Auth::Anonymous);
            if anonymous && !listen.ip().is_loopback() {
                tracing::warn!(%listen, "serving without authentication on a non-loopback address: anyone who can reach it can read and write any document");
            }
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen} (in use? pass --listen)"))?;
            let addr = listener.local_addr()?;
            let shutdown = shutdown_signal()?;
            println!(
                "tandem relay listening on ws://{addr} (store {}, {})",
                path.display(),
                if matches!(auth, Auth::Anonymous) {
                    "anonymous access"
                } else {
                    "tokens required"
                }
            );
            // One stdout line only: scripts read the URL from it and may
            // close the pipe after it.
            tracing::info!(
                "point automerge-repo clients (JS WebSocketClientAdapter, samod, tandem_relay::Client) at ws://{addr}; Ctrl-C or SIGTERM stops the relay after flushing"
            );
            let config = RelayConfig {
                max_message_size: options
                    .max_message_size
                    .unwrap_or(defaults.max_message_size),
                outbound_queue: options.outbound_queue.unwrap_or(defaults.outbound_queue),
                max_connections: options.max_connections.unwrap_or(defaults.max_connections),
                max_frames_per_second: options
                    .max_frames_per_second
                    .unwrap_or(defaults.max_frames_per_second),
                idle_timeout: options
                    .idle_timeout
                    .map_or(defaults.idle_timeout, std::time::Duration::from_secs),
                auth,
                ..defaults
            };
            let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
            let http = match metrics_listen {
                Some(at) => {
                    let http_listener = TcpListener::bind(at).await.with_context(|| {
                        format!("cannot listen on {at} for metrics (in use? pass --metrics-listen)")
                    })?;
                    println!("metrics on http://{}/metrics", http_listener.local_addr()?);
                    Some(tokio::spawn(tandem_relay::metrics::serve_http(
                        http_listener,
                        config.stats.clone(),
                        async {
                            let _ = http_stopped.await;
                        },
                    )))
                }
                None => None,
            };
            let mut repo = serve(listener, repo, config, shutdown).await;
            let _ = stop_http.send(());
            if let Some(http) = http {
                let _ = http.await;
            }
            repo.flush()?;
            tracing::info!("relay stopped; everything acknowledged is stored");
            Ok(())
        }
        Command::Token {
            secret,
            write,
            read,
            ttl,
            subject,
        } => {
            if write.is_empty() && read.is_empty() {
                bail!(
                    "a token must grant something: pass --write <DOC> or --read <DOC> (`*` for every document)"
                );
            }
            let grant = |doc: &str, writable: bool| -> Result<Grant> {
                Ok(match (doc, writable) {
                    ("*", true) => Grant::read_write_all(),
                    ("*", false) => Grant::read_all(),
                    (id, w) => {
                        let id: DocumentId = match id.parse::<tandem_engine::AutomergeUrl>() {
                            Ok(url) => url.document,
                            Err(_) => id.parse().with_context(|| {
                                format!("{id:?} is not a document id, an automerge: URL or `*`")
                            })?,
                        };
                        if w {
                            Grant::read_write(id)
                        } else {
                            Grant::read(id)
                        }
                    }
                })
            };
            let mut docs = Vec::new();
            for d in &write {
                docs.push(grant(d, true)?);
            }
            for d in &read {
                docs.push(grant(d, false)?);
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let claims = Claims {
                docs,
                exp: now + ttl,
                sub: subject,
            };
            println!("{}", mint(secret.as_bytes(), &claims));
            Ok(())
        }
        Command::Compact { data } => compact(&data),
        Command::Export { data, tables, out } => export(&data, &tables, out.as_deref()),
        Command::Import { data, file, batch } => import(&data, &file, batch),
        Command::Inspect { data, keys, rows } => {
            let path = store_path(&data);
            let mut repo = open_offline(&data, "inspect", false)?;
            let ids = repo.document_ids()?;
            println!(
                "store {} ({}), {} documents",
                path.display(),
                repo.storage_id(),
                ids.len()
            );
            for id in ids {
                match repo.view(&id, |d| {
                    (
                        d.get_heads(),
                        d.save().len(),
                        d.keys(tandem_engine::automerge::ROOT).collect::<Vec<_>>(),
                    )
                }) {
                    Ok((heads, size, root_keys)) => {
                        let heads: Vec<String> = heads
                            .iter()
                            .map(|h| h.to_string()[..12].to_owned())
                            .collect();
                        println!("{}  {size:>9} bytes  heads {}", id.url(), heads.join(","));
                        if keys {
                            println!("    keys: {}", root_keys.join(", "));
                        }
                    }
                    Err(e) => println!("{}  error: {e}", id.url()),
                }
            }
            inspect_tables(Rows::with_system_clock(repo), rows)
        }
    }
}

/// The tables part of `tandem inspect`.
fn inspect_tables(mut store: Rows<RedbStorage>, print_rows: bool) -> Result<()> {
    let tables = store.stored_tables()?;
    println!("{} tables", tables.len());
    for (name, shards) in tables {
        store.define(TableSchema::new(&name).shards(shards));
        let all = store.table(&name).scan()?;
        let conflicted = all.iter().filter(|r| !r.conflicts().is_empty()).count();
        println!(
            "table {name}: {} rows, {shards} catalog shards, {conflicted} rows with concurrent values",
            all.len()
        );
        if print_rows {
            for row in all {
                let values: Vec<String> = row
                    .values()
                    .iter()
                    .map(|(c, v)| format!("{c}={v}"))
                    .collect();
                println!("    {}  {}", row.key, values.join(" "));
            }
        }
    }
    Ok(())
}

/// Open a store for an offline command (`compact`, `inspect`, `export`,
/// `import`), with errors that say what to do.
fn open_offline(data: &std::path::Path, command: &str, create: bool) -> Result<Repo<RedbStorage>> {
    let path = store_path(data);
    if !create && !path.exists() {
        bail!("no store at {} (pass --data <DIR>)", path.display());
    }
    if create {
        std::fs::create_dir_all(data)
            .with_context(|| format!("cannot create the directory {}", data.display()))?;
    }
    let storage = RedbStorage::open(&path).map_err(|e| {
        // redb locks the file while a process has it open.
        if e.to_string().contains("already open") {
            anyhow::anyhow!(
                "the store at {} is in use by another process (a running `tandem serve`?): \
                 stop it, then run `tandem {command}` again",
                path.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("cannot open the store at {}", path.display()))
        }
    })?;
    Ok(Repo::open(
        storage,
        RepoConfig::new(PeerId::new(format!("tandem-{command}"))),
        ServeOnRequest,
    )?)
}

fn progress_bar(len: Option<u64>, what: &str) -> indicatif::ProgressBar {
    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::no_length(),
    };
    style_bar(&bar, what);
    bar
}

/// A bar with a length shows progress and time left; without, a spinner.
fn style_bar(bar: &indicatif::ProgressBar, what: &str) {
    let template = if bar.length().is_some() {
        format!("{{bar:40}} {{pos}}/{{len}} {what} ({{per_sec}}, eta {{eta}})")
    } else {
        format!("{{spinner}} {{pos}} {what} ({{per_sec}})")
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
}

/// `tandem export`: tables as JSON lines.
fn export(data: &std::path::Path, tables: &[String], out: Option<&std::path::Path>) -> Result<()> {
    let mut rows = Rows::with_system_clock(open_offline(data, "export", false)?);
    let mut sink: Box<dyn std::io::Write> = match out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let bar = progress_bar(None, "rows");
    let report = tandem_relay::tables::export(&mut rows, tables, &mut sink, |done, total| {
        if bar.length().is_none() {
            bar.set_length(total as u64);
            style_bar(&bar, "rows");
        }
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    eprintln!("exported {} tables, {} rows", report.tables, report.rows);
    Ok(())
}

/// `tandem import`: JSON lines into a store.
fn import(data: &std::path::Path, file: &std::path::Path, batch: usize) -> Result<()> {
    let (input, len): (Box<dyn std::io::BufRead>, Option<u64>) = if file.as_os_str() == "-" {
        (
            Box::new(std::io::BufReader::new(std::io::stdin().lock())),
            None,
        )
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
        let len = f.metadata().ok().map(|m| m.len());
        (Box::new(std::io::BufReader::new(f)), len)
    };
    let mut rows = Rows::with_system_clock(open_offline(data, "import", true)?);
    let bar = progress_bar(len, "bytes");
    let report = tandem_relay::tables::import(&mut rows, input, batch, |_, read| {
        bar.set_position(read);
    })
    .with_context(|| format!("importing {}", file.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "imported {} tables, {} rows into {}",
        report.tables,
        report.rows,
        store_path(data).display()
    );
    Ok(())
}

/// `tandem compact`: every document folded into one snapshot.
fn compact(data: &std::path::Path) -> Result<()> {
    let path = store_path(data);
    let mut repo = open_offline(data, "compact", false)?;
    let ids = repo.document_ids()?;
    let (mut before, mut after, mut rewritten) = (0usize, 0usize, 0usize);
    let mut failed = 0usize;
    for id in &ids {
        match repo.compact(id) {
            Ok((b, a)) => {
                before += b;
                after += a;
                if a != b {
                    rewritten += 1;
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("{}: not compacted: {e}", id.url());
            }
        }
    }
    let saved = match before {
        0 => 0.0,
        b => 100.0 * b.saturating_sub(after) as f64 / b as f64,
    };
    println!(
        "store {}: {} documents, {rewritten} rewritten; document bytes {before} -> {after} ({saved:.0}% less)",
        path.display(),
        ids.len()
    );
    if failed > 0 {
        bail!(
            "{failed} of {} documents could not be compacted (listed above; the others were): \
             `tandem inspect --data {}` shows what is wrong with them",
            ids.len(),
            data.display()
        );
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,automerge=warn".into());
    // Colours only on a terminal: logs piped to a file or CI stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Install the SIGINT and SIGTERM handlers now, before the relay announces
/// its URL (so a signal sent right after the banner is a graceful stop, not
/// the default kill); the future completes on either.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term =
            signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
        let mut int =
            signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutting down: closing connections and flushing");
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down: closing connections and flushing");
        })
    }
}
