//! The relay on a real socket (127.0.0.1, port 0) with engine clients.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tandem_engine::automerge::{ROOT, ReadDoc, transaction::Transactable};
use tandem_engine::protocol::Message;
use tandem_engine::{
    ConnectionId, Direction, DocumentId, MemoryStorage, Output, PeerId, RedbStorage, Repo,
    RepoConfig, ServeOnRequest, ShareAll,
};
use tandem_relay::{RelayConfig, serve};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message as Ws;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Client {
    repo: Repo<MemoryStorage>,
    ws: Socket,
}

const CONN: ConnectionId = ConnectionId(1);

impl Client {
    async fn connect(url: &str, name: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut repo = Repo::open(
            MemoryStorage::new(),
            RepoConfig::new(PeerId::new(name)),
            ShareAll,
        )
        .unwrap();
        repo.connect(CONN, Direction::Outgoing).unwrap();
        Self { repo, ws }
    }

    /// Drive the client until `done` holds, failing after 10 s.
    async fn until(&mut self, what: &str, mut done: impl FnMut(&mut Repo<MemoryStorage>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.repo.flush().unwrap();
            while let Some(out) = self.repo.poll_output() {
                if let Output::Send { frame, .. } = out {
                    self.ws.send(Ws::Binary(frame.into())).await.unwrap();
                }
            }
            if done(&mut self.repo) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            if let Ok(Some(Ok(Ws::Binary(b)))) =
                tokio::time::timeout(Duration::from_millis(50), self.ws.next()).await
            {
                self.repo.receive(0, CONN, &b).unwrap();
            }
        }
    }
}

/// The relay has acknowledged (stored) everything this client has of `doc`.
fn acked(repo: &mut Repo<MemoryStorage>, doc: &DocumentId) -> bool {
    let mut ours = repo.heads(doc).unwrap();
    ours.sort();
    repo.remote_heads(CONN, doc).is_some_and(|mut h| {
        h.sort();
        h == ours
    })
}

fn value(repo: &mut Repo<MemoryStorage>, doc: &DocumentId) -> Option<i64> {
    repo.view(doc, |d| {
        d.get(ROOT, "n")
            .ok()
            .flatten()
            .and_then(|(v, _)| v.as_i64())
    })
    .ok()
    .flatten()
}

async fn start(
    repo: Repo<RedbStorage>,
) -> (
    String,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Repo<RedbStorage>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, repo, RelayConfig::default(), async {
        let _ = stopped.await;
    }));
    (url, stop, task)
}

fn server_repo(dir: &tempfile::TempDir) -> Repo<RedbStorage> {
    Repo::open(
        RedbStorage::open(dir.path().join("relay.redb")).unwrap(),
        RepoConfig::new(PeerId::new("relay")),
        ServeOnRequest,
    )
    .unwrap()
}

#[tokio::test]
async fn clients_sync_through_the_relay_and_changes_fan_out() {
    let dir = tempfile::tempdir().unwrap();
    let (url, stop, task) = start(server_repo(&dir)).await;
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
    stop.send(()).unwrap();
    let mut relay = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("relay did not shut down")
        .unwrap();
    let n = relay
        .view(&doc, |d| d.get(ROOT, "n").unwrap().unwrap().0.as_i64())
        .unwrap();
    assert_eq!(n, Some(2));
}

#[tokio::test]
async fn garbage_gets_an_error_and_a_close_and_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _stop, _task) = start(server_repo(&dir)).await;
    let mut good = Client::connect(&url, "good").await;
    let doc = good.repo.create().unwrap();
    good.repo.change(&doc, |d| d.put(ROOT, "n", 7)).unwrap();
    good.until("the relay to store the document", |r| acked(r, &doc))
        .await;

    for (name, frame) in [
        (
            "garbage bytes",
            Ws::Binary(vec![0xde, 0xad, 0xbe, 0xef].into()),
        ),
        ("a text frame", Ws::Text("{\"type\":\"join\"}".into())),
    ] {
        let (mut bad, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        bad.send(frame).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), bad.next())
            .await
            .unwrap_or_else(|_| panic!("{name}: no reply"));
        match reply {
            Some(Ok(Ws::Binary(b))) => assert!(
                matches!(Message::decode(&b), Ok(Message::Error { .. })),
                "{name}: not an error frame"
            ),
            other => panic!("{name}: expected an error frame, got {other:?}"),
        }
        let next = tokio::time::timeout(Duration::from_secs(5), bad.next())
            .await
            .unwrap();
        assert!(
            matches!(next, Some(Ok(Ws::Close(_))) | None | Some(Err(_))),
            "{name}: connection not closed: {next:?}"
        );
    }
    good.repo.change(&doc, |d| d.put(ROOT, "n", 8)).unwrap();
    let mut other = Client::connect(&url, "other").await;
    good.until("the relay to store the change", |r| acked(r, &doc))
        .await;
    other.repo.request(doc).unwrap();
    other
        .until("the good peer's data", |r| value(r, &doc) == Some(8))
        .await;
}
