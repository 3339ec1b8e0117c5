//! The relay as `tandem serve --allow-anonymous` runs it, in process on
//! 127.0.0.1:0 with a redb store in a temporary directory.

use std::time::{Duration, Instant};

use tandem_engine::automerge::{ROOT, ReadDoc};
use tandem_engine::{
    Automerge, DocumentId, MemoryStorage, PeerId, RedbStorage, Repo, RepoConfig, ShareAll,
};
use tandem_relay::{Client, ClientConfig, RelayConfig, serve};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A running relay.
pub struct Relay {
    pub url: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Repo<RedbStorage>>,
    store: Store,
}

/// The directory of a relay's store, kept to start a relay on it again.
pub struct Store(tempfile::TempDir);

impl Store {
    /// An empty store directory, to fill before a relay starts on it.
    pub fn new() -> Self {
        Store(tempfile::tempdir().unwrap())
    }

    /// The redb file a relay on this store opens.
    pub fn redb(&self) -> std::path::PathBuf {
        self.0.path().join("store.redb")
    }
}

impl Relay {
    /// Shut down gracefully (within `limit`) and hand back what it stored.
    pub async fn stop(self, limit: Duration) -> Repo<RedbStorage> {
        self.stop_keeping_store(limit).await.0
    }

    /// Shut down gracefully (within `limit`), handing back what it stored
    /// and its store's directory, for [`start_relay_on`].
    pub async fn stop_keeping_store(self, limit: Duration) -> (Repo<RedbStorage>, Store) {
        self.stop.send(()).unwrap();
        let repo = tokio::time::timeout(limit, self.task)
            .await
            .expect("the relay did not shut down")
            .unwrap();
        (repo, self.store)
    }
}

/// The relay as `tandem serve --allow-anonymous` runs it, on 127.0.0.1:0.
pub async fn start_relay() -> Relay {
    start_relay_with(RelayConfig::default()).await
}

/// The relay with `config` (auth, limits), on 127.0.0.1:0.
pub async fn start_relay_with(config: RelayConfig) -> Relay {
    start_relay_on(Store::new(), config).await
}

/// The relay with `config` over the store in `store` (a restart, with
/// nothing in memory), on 127.0.0.1:0.
pub async fn start_relay_on(store: Store, config: RelayConfig) -> Relay {
    let repo = Repo::open(
        RedbStorage::open(store.redb()).unwrap(),
        RepoConfig::new(PeerId::new("tandem-relay")),
        config.auth.policy(),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, repo, config, async {
        let _ = stopped.await;
    }));
    Relay {
        url,
        stop,
        task,
        store,
    }
}

/// A native Tandem client (in-memory store) of the relay at `url`.
pub fn native(url: &str, name: &str) -> Client<MemoryStorage> {
    let repo = Repo::open(
        MemoryStorage::new(),
        RepoConfig::new(PeerId::new(name)),
        ShareAll,
    )
    .unwrap();
    let config = ClientConfig {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    };
    Client::start(repo, url, config).unwrap()
}

/// The integer at the document's root key `n`, the value the interop tests write.
pub fn n(d: &Automerge) -> Option<i64> {
    d.get(ROOT, "n")
        .ok()
        .flatten()
        .and_then(|(v, _)| v.as_i64())
}

/// Wait until the native client reads `n == want`, failing after `limit`.
pub async fn wait_native(
    client: &Client<MemoryStorage>,
    doc: DocumentId,
    want: i64,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        let got = client.view(doc, n).await.ok().flatten();
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the native client never saw n = {want} (last saw {got:?}; state {:?})",
            client.state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until the relay acknowledges the native client's change, failing after `limit`.
pub async fn wait_acknowledged(client: &Client<MemoryStorage>, doc: DocumentId, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !client.acknowledged(doc).await.unwrap() {
        assert!(
            Instant::now() < deadline,
            "the relay never acknowledged the native client's change"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
