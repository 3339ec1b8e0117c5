//! `samod-peer`: a samod 0.16 (the Rust automerge-repo) client that dials a
//! WebSocket sync server and does one thing with one document, so that
//! Tandem's interop test (tests/tests/samod_interop.rs) can check samod
//! against the relay from outside.
//!
//! ```text
//! samod-peer [--timeout <secs>] <ws-url> create <key> <int>
//!     a new document {key: int}; prints its automerge: URL once the server
//!     has acknowledged it (advertised heads that include it)
//! samod-peer [--timeout <secs>] <ws-url> set <doc-url> <key> <int>
//!     change a document it fetches from the server; returns once acknowledged
//! samod-peer [--timeout <secs>] <ws-url> get <doc-url> <key>
//!     prints the integer at `key` (or `none`)
//! samod-peer [--timeout <secs>] <ws-url> wait <doc-url> <key> <int>
//!     returns (printing the value) once the document holds that value
//! ```
//!
//! Results go to stdout, one line; diagnostics to stderr. Exit code 0 on
//! success, 1 on any failure (including the timeout, 20 s by default), 2 on
//! bad usage.

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{Automerge, AutomergeError, ROOT, ReadDoc};
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt, TryStreamExt};
use samod::{AutomergeUrl, BackoffConfig, DialError, DocHandle, Repo, Transport, Url};
use tokio_tungstenite::tungstenite::Message;

const USAGE: &str = "usage: samod-peer [--timeout <secs>] <ws-url> \
    (create <key> <int> | set <doc-url> <key> <int> | get <doc-url> <key> | wait <doc-url> <key> <int>)";

#[derive(Debug)]
enum Mode {
    Create {
        key: String,
        value: i64,
    },
    Set {
        doc: AutomergeUrl,
        key: String,
        value: i64,
    },
    Get {
        doc: AutomergeUrl,
        key: String,
    },
    Wait {
        doc: AutomergeUrl,
        key: String,
        value: i64,
    },
}

#[derive(Debug)]
struct Args {
    timeout: Duration,
    url: Url,
    mode: Mode,
}

fn parse_args(mut args: Vec<String>) -> Result<Args, String> {
    let mut timeout = Duration::from_secs(20);
    if args.first().map(String::as_str) == Some("--timeout") {
        let secs = args.get(1).ok_or("--timeout needs a number of seconds")?;
        let secs: u64 = secs
            .parse()
            .map_err(|e| format!("--timeout {secs:?}: {e}"))?;
        timeout = Duration::from_secs(secs);
        args.drain(..2);
    }
    let url = args.first().ok_or("missing the server URL")?;
    let url = Url::parse(url).map_err(|e| format!("bad server URL {url:?}: {e}"))?;
    let doc = |i: usize| -> Result<AutomergeUrl, String> {
        let text = args.get(i).ok_or("missing the document URL")?;
        text.parse()
            .map_err(|e| format!("bad document URL {text:?}: {e:?}"))
    };
    let key = |i: usize| -> Result<String, String> {
        args.get(i).cloned().ok_or_else(|| "missing the key".into())
    };
    let int = |i: usize| -> Result<i64, String> {
        let text = args.get(i).ok_or("missing the value")?;
        text.parse()
            .map_err(|e| format!("the value {text:?} is not an integer: {e}"))
    };
    let (mode, arity) = match args.get(1).map(String::as_str) {
        Some("create") => (
            Mode::Create {
                key: key(2)?,
                value: int(3)?,
            },
            4,
        ),
        Some("set") => (
            Mode::Set {
                doc: doc(2)?,
                key: key(3)?,
                value: int(4)?,
            },
            5,
        ),
        Some("get") => (
            Mode::Get {
                doc: doc(2)?,
                key: key(3)?,
            },
            4,
        ),
        Some("wait") => (
            Mode::Wait {
                doc: doc(2)?,
                key: key(3)?,
                value: int(4)?,
            },
            5,
        ),
        Some(other) => return Err(format!("unknown mode {other:?}")),
        None => return Err("missing the mode".into()),
    };
    if args.len() != arity {
        return Err(format!("unexpected arguments after {:?}", &args[..arity]));
    }
    Ok(Args { timeout, url, mode })
}

/// Dials plain `ws://` with tokio-tungstenite and hands samod the binary
/// frames (samod's own `tungstenite` feature would also build a TLS stack).
struct WsDialer {
    url: Url,
}

impl samod::Dialer for WsDialer {
    type Error = Infallible;

    fn url(&self) -> Url {
        self.url.clone()
    }

    fn connect(&self) -> BoxFuture<'static, Result<Transport, DialError<Infallible>>> {
        let url = self.url.clone();
        Box::pin(async move {
            let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .map_err(DialError::transient)?;
            let (sink, stream) = ws.split();
            // Binary frames carry the protocol; pings, pongs and the close
            // frame are tungstenite's business (the stream ends after a close).
            let stream = stream
                .try_filter_map(|m| async move {
                    Ok(match m {
                        Message::Binary(bytes) => Some(bytes.to_vec()),
                        _ => None,
                    })
                })
                .boxed();
            let sink = sink.with(|bytes: Vec<u8>| {
                futures::future::ready(Ok::<_, tokio_tungstenite::tungstenite::Error>(
                    Message::Binary(bytes.into()),
                ))
            });
            Ok(Transport::new(stream, sink))
        })
    }
}

/// The integer at `key` in the document's root.
fn read_int(doc: &Automerge, key: &str) -> Option<i64> {
    match doc.get(ROOT, key) {
        Ok(Some((value, _))) => value.as_i64(),
        _ => None,
    }
}

fn put_int(doc: &mut Automerge, key: &str, value: i64) -> Result<(), String> {
    doc.transact::<_, _, AutomergeError>(|tx| tx.put(ROOT, key, value))
        .map(|_| ())
        .map_err(|e| format!("cannot change the document: {:?}", e.error))
}

async fn find(repo: &Repo, doc: &AutomergeUrl) -> Result<DocHandle, String> {
    repo.find(doc.document_id().clone())
        .await
        .map_err(|_| "the repo stopped".to_owned())?
        .ok_or_else(|| format!("{doc} is unavailable: the server does not have it"))
}

async fn run(args: Args) -> Result<String, String> {
    let repo = Repo::build_tokio().load().await;
    let backoff = BackoffConfig {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
        max_retries: Some(20),
    };
    let dialer = repo
        .dial(
            backoff,
            Arc::new(WsDialer {
                url: args.url.clone(),
            }),
        )
        .map_err(|_| "the repo stopped before dialing".to_owned())?;
    let server = dialer
        .established()
        .await
        .map_err(|e| format!("cannot connect to {}: {e:?}", args.url))?;
    // (samod reports our own storage id beside the server's peer id: not shown.)
    eprintln!("samod-peer: connected to {}", server.peer_id);
    let conn = dialer
        .connection_id()
        .ok_or("the connection dropped right after the handshake")?;
    let out = match args.mode {
        Mode::Create { key, value } => {
            let mut doc = Automerge::new();
            put_int(&mut doc, &key, value)?;
            let handle = repo
                .create(doc)
                .await
                .map_err(|_| "the repo stopped".to_owned())?;
            handle.they_have_our_changes(conn).await;
            handle.url().to_string()
        }
        Mode::Set { doc, key, value } => {
            let handle = find(&repo, &doc).await?;
            handle.with_document(|d| put_int(d, &key, value))?;
            handle.they_have_our_changes(conn).await;
            value.to_string()
        }
        Mode::Get { doc, key } => {
            let handle = find(&repo, &doc).await?;
            handle
                .with_document(|d| read_int(d, &key))
                .map_or_else(|| "none".to_owned(), |v| v.to_string())
        }
        Mode::Wait { doc, key, value } => {
            let handle = find(&repo, &doc).await?;
            // Subscribe before looking, so a change in between is not missed.
            let mut changes = handle.changes();
            while handle.with_document(|d| read_int(d, &key)) != Some(value) {
                changes
                    .next()
                    .await
                    .ok_or("the document's change stream ended")?;
            }
            value.to_string()
        }
    };
    repo.stop().await;
    Ok(out)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1).collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("samod-peer: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let timeout = args.timeout;
    let mode = format!("{:?}", args.mode);
    match tokio::time::timeout(timeout, run(args)).await {
        Ok(Ok(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("samod-peer: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("samod-peer: timed out after {timeout:?} doing {mode}");
            ExitCode::FAILURE
        }
    }
}
