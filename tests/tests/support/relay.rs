//! The relay as `tandem serve --allow-anonymous` runs it, in process on
//! 127.0.0.1:0 with a redb store in a temporary directory.

use tandem_engine::{PeerId, RedbStorage, Repo, RepoConfig};
use tandem_relay::{RelayConfig, serve};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A running relay.
pub struct Relay {
    pub url: String,
    pub stop: oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<Repo<RedbStorage>>,
    _dir: tempfile::TempDir,
}

/// The relay as `tandem serve --allow-anonymous` runs it, on 127.0.0.1:0.
pub async fn start_relay() -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let config = RelayConfig::default();
    let repo = Repo::open(
        RedbStorage::open(dir.path().join("store.redb")).unwrap(),
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
        _dir: dir,
    }
}
