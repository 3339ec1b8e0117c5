//! The relay's limits on real sockets: a slow reader is dropped at its bound
//! without slowing others, idle connections are closed while pinged ones stay,
//! and a fast sender is throttled without losing anything.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::{Client, acked, server_repo, start, value};
use tandem_engine::DocumentId;
use tandem_engine::ServeOnRequest;
use tandem_engine::automerge::{ROOT, transaction::Transactable};
use tandem_engine::protocol::Message;
use tandem_relay::{RelayConfig, RelayStats};

/// Incompressible text, so the frames really are large.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// A document created by the first client and fetched by the others; the
/// last one reads through a small socket buffer when `small_last` is set.
async fn shared_doc(url: &str, names: &[&str], small_last: bool) -> (DocumentId, Vec<Client>) {
    let mut clients = Vec::new();
    let mut first = Client::connect(url, names[0]).await;
    let doc = first.repo.create().unwrap();
    first.repo.change(&doc, |d| d.put(ROOT, "n", 0)).unwrap();
    first
        .until("the relay to store the document", |r| acked(r, &doc))
        .await;
    clients.push(first);
    for (i, name) in names.iter().enumerate().skip(1) {
        let mut c = if small_last && i == names.len() - 1 {
            Client::connect_small_buffer(url, name).await
        } else {
            Client::connect(url, name).await
        };
        c.repo.request(doc).unwrap();
        c.until("the document", |r| value(r, &doc) == Some(0)).await;
        clients.push(c);
    }
    (doc, clients)
}

/// A relay with an outbound queue of 4 frames per connection, and three
/// clients on one document: a writer, a fast reader, and a slow one that is
/// subscribed and from then on never reads (through a small socket buffer).
/// Keep `_slow` and `_relay` bound for the whole test.
struct SlowReader {
    stats: Arc<RelayStats>,
    doc: DocumentId,
    writer: Client,
    fast: Client,
    _slow: Client,
    _relay: support::Relay,
}

impl SlowReader {
    async fn start(repo: tandem_engine::Repo<tandem_engine::RedbStorage>) -> Self {
        let stats = Arc::new(RelayStats::default());
        let config = RelayConfig {
            outbound_queue: 4,
            stats: stats.clone(),
            ..RelayConfig::default()
        };
        let relay = start(repo, config).await;
        let (doc, mut clients) = shared_doc(&relay.url, &["writer", "fast", "slow"], true).await;
        let _slow = clients.pop().unwrap();
        let fast = clients.pop().unwrap();
        let writer = clients.pop().unwrap();
        Self {
            stats,
            doc,
            writer,
            fast,
            _slow,
            _relay: relay,
        }
    }
}

/// A writer's run of changes of `size` bytes of noise, at most `count`,
/// each acknowledged by the relay before the next (so each is its own frame
/// to every reader), the fast reader reading for `pause` after each.
struct Writes {
    count: i64,
    size: usize,
    pause: Duration,
}

impl Writes {
    /// Write until the relay drops a slow reader or `count` changes are made.
    async fn until_a_slow_reader_is_dropped(
        &self,
        writer: &mut Client,
        fast: &mut Client,
        doc: &DocumentId,
        stats: &RelayStats,
    ) {
        for i in 1..=self.count {
            writer
                .repo
                .change(doc, |d| {
                    d.put(ROOT, "blob", noise(i as u64, self.size))?;
                    d.put(ROOT, "n", i)
                })
                .unwrap();
            writer
                .until("the relay to store the change", |r| acked(r, doc))
                .await;
            fast.run_for(self.pause).await;
            if stats.slow_readers() > 0 {
                break;
            }
        }
    }
}

#[tokio::test]
async fn a_slow_reader_is_dropped_and_does_not_slow_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let SlowReader {
        stats,
        doc,
        mut writer,
        mut fast,
        _slow,
        _relay,
    } = SlowReader::start(server_repo(&dir, ServeOnRequest)).await;

    // Changes of 256 KiB: the slow reader's socket buffers fill, then
    // its queue of 4 frames, and it is dropped.
    let writes = Writes {
        count: 40,
        size: 256 * 1024,
        pause: Duration::from_millis(1),
    };
    writes
        .until_a_slow_reader_is_dropped(&mut writer, &mut fast, &doc, &stats)
        .await;
    let last = value(&mut writer.repo, &doc).unwrap();
    fast.until("every change at the fast reader", |r| {
        value(r, &doc) == Some(last)
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.slow_readers() == 0 {
        assert!(
            Instant::now() < deadline,
            "the slow reader was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With flow control, a reader that never answers is sent at most one
/// message per window timeout: it still reaches its bound and is dropped,
/// and the others get every change.
#[tokio::test]
async fn with_a_sync_window_a_slow_reader_is_still_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let repo = tandem_engine::Repo::open(
        tandem_engine::RedbStorage::open(dir.path().join("relay.redb")).unwrap(),
        tandem_engine::RepoConfig {
            sync_window: 1,
            sync_window_timeout: 20,
            ..tandem_engine::RepoConfig::new(tandem_engine::PeerId::new("relay"))
        },
        ServeOnRequest,
    )
    .unwrap();
    let SlowReader {
        stats,
        doc,
        mut writer,
        mut fast,
        _slow,
        _relay,
    } = SlowReader::start(repo).await;
    let writes = Writes {
        count: 400,
        size: 64 * 1024,
        pause: Duration::from_millis(5),
    };
    writes
        .until_a_slow_reader_is_dropped(&mut writer, &mut fast, &doc, &stats)
        .await;
    assert!(
        stats.slow_readers() > 0,
        "the slow reader was never dropped"
    );
    let last = value(&mut writer.repo, &doc).unwrap();
    fast.until("every change at the fast reader", |r| {
        value(r, &doc) == Some(last)
    })
    .await;
}

#[tokio::test]
async fn idle_connections_close_and_pinged_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(RelayStats::default());
    let config = RelayConfig {
        ping_interval: Duration::from_millis(50),
        idle_timeout: Duration::from_millis(400),
        stats: stats.clone(),
        ..RelayConfig::default()
    };
    let relay = start(server_repo(&dir, ServeOnRequest), config).await;

    // A client that reads answers the relay's pings (tungstenite does it on
    // read), so it outlives the idle timeout several times over.
    let (mut alive, _) = tokio_tungstenite::connect_async(relay.url.as_str())
        .await
        .unwrap();
    let end = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < end {
        match tokio::time::timeout(Duration::from_millis(100), alive.next()).await {
            Err(_) | Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("a pinged connection was closed: {other:?}"),
        }
    }
    assert_eq!(stats.idle_closed(), 0);

    // A client that neither reads nor writes is closed.
    let (_silent, _) = tokio_tungstenite::connect_async(relay.url.as_str())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.idle_closed() == 0 {
        assert!(
            Instant::now() < deadline,
            "an idle connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_fast_sender_is_throttled_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(RelayStats::default());
    let config = RelayConfig {
        max_frames_per_second: 50,
        stats: stats.clone(),
        ..RelayConfig::default()
    };
    let relay = start(server_repo(&dir, ServeOnRequest), config).await;
    let (doc, mut clients) = shared_doc(&relay.url, &["sender", "listener"], false).await;
    let mut listener = clients.pop().unwrap();
    let mut sender = clients.pop().unwrap();

    // 150 ephemeral messages at once: three times the per-second budget.
    const COUNT: u64 = 150;
    for count in 1..=COUNT {
        let frame = Message::Ephemeral {
            sender_id: tandem_engine::PeerId::new("sender"),
            target_id: tandem_engine::PeerId::new("relay"),
            count,
            session_id: "s".into(),
            document_id: doc,
            data: count.to_be_bytes().to_vec(),
        };
        use futures_util::SinkExt;
        sender
            .ws
            .send(tokio_tungstenite::tungstenite::Message::Binary(
                frame.encode().into(),
            ))
            .await
            .unwrap();
    }
    listener
        .until_event("every ephemeral message", |e| {
            matches!(e, tandem_engine::Event::Ephemeral { data, .. } if data == &COUNT.to_be_bytes())
        })
        .await;
    let received = listener
        .events
        .iter()
        .filter(|e| matches!(e, tandem_engine::Event::Ephemeral { .. }))
        .count();
    assert_eq!(received as u64, COUNT, "throttling lost messages");
    assert!(stats.throttled() > 0, "the sender was never throttled");
}

/// Sync frames with changes that arrive on `ws` within `time`, unread by any
/// repo.
async fn read_raw(ws: &mut support::Socket, time: Duration, into: &mut Vec<Vec<u8>>) {
    let end = tokio::time::Instant::now() + time;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(end, ws.next()).await {
        if let tokio_tungstenite::tungstenite::Message::Binary(b) = msg {
            into.push(b.to_vec());
        }
    }
}

/// Messages with changes among `frames`.
fn with_changes(frames: &[Vec<u8>]) -> usize {
    frames
        .iter()
        .filter(|f| match Message::decode(f).unwrap() {
            Message::Sync { data, .. } => !tandem_engine::automerge::sync::Message::decode(&data)
                .unwrap()
                .changes
                .is_empty(),
            _ => false,
        })
        .count()
}

/// A client that reads its socket (so pings are answered and nothing backs
/// up) but never answers a sync message: once it has left
/// `--max-unanswered-changes` unconfirmed for the grace (2 s), the relay
/// sends it nothing more about the document, while the others get every
/// change; when it finally reads and answers, it gets them all.
#[tokio::test]
async fn a_client_that_never_answers_is_sent_nothing_past_the_bound() {
    let data = tempfile::tempdir().unwrap();
    let (mut relay, url) = support::start_binary(
        data.path(),
        &["--allow-anonymous", "--max-unanswered-changes", "20"],
    );
    let (doc, mut clients) = shared_doc(&url, &["writer", "fast", "mute"], false).await;
    let mut mute = clients.pop().unwrap();
    let mut fast = clients.pop().unwrap();
    let mut writer = clients.pop().unwrap();

    let mut unread = Vec::new();
    let mut within_grace = 0;
    for i in 1..=100 {
        writer.repo.change(&doc, |d| d.put(ROOT, "n", i)).unwrap();
        writer
            .until("the relay to store the change", |r| acked(r, &doc))
            .await;
        fast.run_for(Duration::from_millis(1)).await;
        read_raw(&mut mute.ws, Duration::from_millis(1), &mut unread).await;
        if i == 30 {
            // Past the grace, with 30 changes unconfirmed.
            read_raw(&mut mute.ws, Duration::from_millis(2_200), &mut unread).await;
            within_grace = with_changes(&unread);
        }
    }
    fast.until("every change at the fast reader", |r| {
        value(r, &doc) == Some(100)
    })
    .await;
    read_raw(&mut mute.ws, Duration::from_millis(300), &mut unread).await;
    assert!(
        within_grace >= 20,
        "{within_grace} messages with changes within the grace"
    );
    assert_eq!(
        with_changes(&unread),
        within_grace,
        "messages with changes to a client that never answered, past the grace"
    );

    for f in &unread {
        mute.repo.receive(0, support::CONN, f).unwrap();
    }
    mute.until("every change at the client that answered at last", |r| {
        value(r, &doc) == Some(100)
    })
    .await;
    relay.kill().unwrap();
    relay.wait().unwrap();
}
