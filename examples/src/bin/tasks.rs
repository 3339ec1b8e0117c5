//! A terminal task list that keeps working offline against its own store and
//! merges through a relay when it reconnects.
//!
//! ```text
//! tasks --store tasks.redb --relay ws://127.0.0.1:3030 [--token T] [--list automerge:...]
//! ```
//!
//! Commands on stdin, one per line: `add <title>`, `done <n>`, `list`,
//! `offline`, `online`, `status`, `quit`. Every edit is committed to the local
//! redb store before the prompt returns, whether the relay is reachable or
//! not; the client reconnects by itself (backoff with jitter) and sends what
//! is missing. Without `--list` it opens the list already in the store, or
//! starts a new one and prints its URL: pass that URL as `--list` to a second
//! instance (with its own store) to share the list.
//!
//! Run a relay with `tandem serve --allow-anonymous`, then two instances:
//! `cargo run -p tandem-examples --bin tasks -- --store a.redb --relay ws://127.0.0.1:3030`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use tandem_engine::automerge::{ObjType, ROOT, ReadDoc, transaction::Transactable};
use tandem_engine::{
    Automerge, AutomergeUrl, DocumentId, Origin, PeerId, RedbStorage, Repo, RepoConfig, ShareAll,
};
use tandem_relay::{Client, ClientConfig, ClientEvent};

type Tasks = Client<RedbStorage>;

struct Args {
    store: PathBuf,
    relay: String,
    token: Option<String>,
    list: Option<DocumentId>,
}

fn parse_args() -> Result<Args> {
    let usage =
        "usage: tasks --store FILE --relay ws://HOST:PORT [--token T] [--list automerge:...]";
    let (mut store, mut relay, mut token, mut list) = (None, None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{flag} needs a value\n{usage}"))
        };
        match flag.as_str() {
            "--store" => store = Some(PathBuf::from(value()?)),
            "--relay" => relay = Some(value()?),
            "--token" => token = Some(value()?),
            "--list" => {
                let text = value()?;
                let id = match text.parse::<AutomergeUrl>() {
                    Ok(url) => url.document,
                    Err(_) => text.parse().with_context(|| format!("bad list {text:?}"))?,
                };
                list = Some(id);
            }
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{usage}"),
        }
    }
    Ok(Args {
        store: store.context(usage)?,
        relay: relay.unwrap_or_else(|| "ws://127.0.0.1:3030".into()),
        token,
        list,
    })
}

/// The tasks, in creation order: (key, title, done).
fn read(doc: &Automerge) -> Option<Vec<(String, String, bool)>> {
    let (_, tasks) = doc.get(ROOT, "tasks").ok()??;
    Some(
        doc.keys(&tasks)
            .filter_map(|key| {
                let (_, task) = doc.get(&tasks, &key).ok()??;
                let title = doc.get(&task, "title").ok()??.0.into_string().ok()?;
                let done = doc.get(&task, "done").ok()??.0.as_bool()?;
                Some((key, title, done))
            })
            .collect(),
    )
}

async fn print_list(client: &Tasks, doc: DocumentId) -> Result<()> {
    let tasks = client.view(doc, read).await?;
    println!("list {} ({})", doc.url(), client.state());
    match tasks {
        None => println!("  (waiting for the list from the relay)"),
        Some(t) if t.is_empty() => println!("  (no tasks)"),
        Some(t) => {
            for (i, (_, title, done)) in t.iter().enumerate() {
                println!("  {}. [{}] {title}", i + 1, if *done { 'x' } else { ' ' });
            }
        }
    }
    Ok(())
}

async fn add(client: &Tasks, doc: DocumentId, title: String) -> Result<bool> {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    // Sorted by creation time; the random part keeps replicas from colliding.
    let key = format!("{millis:013}-{}", DocumentId::random());
    let added = client
        .change(doc, move |d| {
            let Some((_, tasks)) = d.get(ROOT, "tasks")? else {
                return Ok(false);
            };
            let task = d.put_object(&tasks, key, ObjType::Map)?;
            d.put(&task, "title", title)?;
            d.put(&task, "done", false)?;
            Ok(true)
        })
        .await?;
    Ok(added)
}

async fn done(client: &Tasks, doc: DocumentId, n: usize) -> Result<bool> {
    let Some(key) = client
        .view(doc, move |d| read(d)?.into_iter().nth(n.checked_sub(1)?))
        .await?
        .map(|t| t.0)
    else {
        return Ok(false);
    };
    client
        .change(doc, move |d| {
            let (_, tasks) = d.get(ROOT, "tasks")?.expect("read above");
            let (_, task) = d.get(&tasks, &key)?.expect("read above");
            d.put(&task, "done", true)
        })
        .await?;
    Ok(true)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let storage = RedbStorage::open(&args.store)
        .with_context(|| format!("cannot open the store {}", args.store.display()))?;
    let repo = Repo::open(storage, RepoConfig::new(PeerId::random("tasks")), ShareAll)?;
    let stored = repo.document_ids()?;
    let config = ClientConfig {
        token: args.token,
        ..ClientConfig::default()
    };
    let client = Client::start(repo, args.relay, config)?;
    let doc = match args.list.or_else(|| stored.first().copied()) {
        // Stored: offered to the relay on every connect. Not stored: asked for.
        Some(doc) => {
            client.request(doc).await?;
            doc
        }
        None => {
            let doc = client.create().await?;
            client
                .change(doc, |d| {
                    d.put_object(ROOT, "tasks", ObjType::Map).map(|_| ())
                })
                .await?;
            doc
        }
    };
    print_list(&client, doc).await?;

    // Remote changes and connection changes are printed as they happen.
    let mut events = client.subscribe();
    let watcher = client.clone();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            match event {
                ClientEvent::Committed(e) if e.document == doc && e.origin != Origin::Local => {
                    println!("(updated from the relay)");
                    let _ = print_list(&watcher, doc).await;
                }
                ClientEvent::State(state) => println!("connection: {state}"),
                ClientEvent::Unavailable(d) if d == doc => {
                    println!("the relay does not have this list (yet)")
                }
                _ => {}
            }
        }
    });

    // Stdin is read on a thread: commands arrive as lines.
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let line = line.trim();
        let (command, rest) = line.split_once(' ').unwrap_or((line, ""));
        match command {
            "" => continue,
            "add" if !rest.trim().is_empty() => {
                if !add(&client, doc, rest.trim().to_owned()).await? {
                    println!("the list has not arrived from the relay yet");
                    continue;
                }
            }
            "done" => match rest.trim().parse() {
                Ok(n) if done(&client, doc, n).await? => {}
                _ => {
                    println!("no task {:?}", rest.trim());
                    continue;
                }
            },
            "list" => {}
            "offline" => client.offline().await?,
            "online" => client.online().await?,
            "status" => {
                let synced = client.acknowledged(doc).await?;
                let stats = client.stats();
                println!(
                    "status: {}; synced: {}; sent {} bytes, received {} bytes",
                    client.state(),
                    if synced { "yes" } else { "no" },
                    stats.bytes_sent,
                    stats.bytes_received
                );
                continue;
            }
            "quit" | "exit" => break,
            _ => {
                println!("commands: add <title>, done <n>, list, offline, online, status, quit");
                continue;
            }
        }
        print_list(&client, doc).await?;
    }
    client.shutdown().await?;
    println!("bye");
    Ok(())
}
