//! The row layer over the relay: three native clients with their own redb
//! stores edit the same table rows concurrently, one of them offline for a
//! while; a fourth that knows only the table's name discovers every row.
//! All converge to the same rows.

mod support;

use std::path::Path;
use std::time::Duration;

use tandem_engine::rows::{Row, Rows, TableSchema, Value};
use tandem_engine::{PeerId, RedbStorage, Repo, RepoConfig, ServeOnRequest, ShareAll};
use tandem_relay::{Client, ClientConfig, ConnectionState, RelayConfig};

use support::{server_repo, start, wait_until};

type Native = Client<RedbStorage>;

fn schema() -> TableSchema {
    TableSchema::new("tasks").counter("votes").text("notes")
}

fn client(dir: &Path, name: &str, url: &str) -> Native {
    let repo = Repo::open(
        RedbStorage::open(dir.join(format!("{name}.redb"))).unwrap(),
        RepoConfig::new(PeerId::new(name)),
        ShareAll,
    )
    .unwrap();
    let mut rows = Rows::with_system_clock(repo);
    rows.define(schema());
    let config = ClientConfig {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        ..ClientConfig::default()
    };
    Client::start_rows(rows, url, config).unwrap()
}

async fn scan(c: &Native) -> Vec<Row> {
    c.rows(|rows| rows.table("tasks").scan()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_edit_the_same_rows_with_one_offline_and_converge() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start(server_repo(&dir, ServeOnRequest), RelayConfig::default()).await;
    let a = client(dir.path(), "a", &relay.url);
    let b = client(dir.path(), "b", &relay.url);
    let c = client(dir.path(), "c", &relay.url);
    for x in [&a, &b, &c] {
        x.sync_table("tasks").await.unwrap();
    }
    a.rows(|rows| {
        let mut t = rows.table("tasks");
        for i in 0..5 {
            t.insert(
                &format!("t{i}"),
                [
                    ("title", Value::from(format!("task {i}"))),
                    ("done", false.into()),
                ],
            )?;
        }
        Ok(())
    })
    .await
    .unwrap();
    for (name, x) in [("b", &b), ("c", &c)] {
        wait_until(&format!("{name} to discover a's rows"), 15, || async {
            scan(x).await.len() == 5
        })
        .await;
    }

    // b goes offline; everyone edits the same rows meanwhile.
    b.offline().await.unwrap();
    wait_until("b offline", 10, || async {
        b.state() == ConnectionState::Offline
    })
    .await;
    for (who, x) in [("a", &a), ("b", &b), ("c", &c)] {
        let who = who.to_owned();
        x.rows(move |rows| {
            let mut t = rows.table("tasks");
            t.update("t0", [("title", Value::from(format!("t0 by {who}")))])?;
            t.increment("t1", "votes", 1)?;
            t.splice_text("t2", "notes", 0, 0, &format!("[{who}]"))?;
            t.insert(
                &format!("new-{who}"),
                [("title", Value::from(who.as_str()))],
            )?;
            Ok(())
        })
        .await
        .unwrap();
    }
    a.rows(|rows| rows.table("tasks").delete("t3"))
        .await
        .unwrap();
    b.rows(|rows| {
        rows.table("tasks")
            .update("t3", [("done", Value::Bool(true))])
    })
    .await
    .unwrap();
    b.online().await.unwrap();

    // A fourth replica that knows only the table's name.
    let d = client(dir.path(), "d", &relay.url);
    d.sync_table("tasks").await.unwrap();

    wait_until("all four to hold the same rows", 30, || async {
        let (ra, rb, rc, rd) = (
            scan(&a).await,
            scan(&b).await,
            scan(&c).await,
            scan(&d).await,
        );
        ra.len() == 7 && ra == rb && rb == rc && rc == rd
    })
    .await;
    let rows = scan(&d).await;
    let get = |k: &str| rows.iter().find(|r| r.key == k).unwrap();
    assert!(
        rows.iter().all(|r| r.key != "t3"),
        "delete wins over b's offline update"
    );
    assert_eq!(
        get("t1").get("votes"),
        Some(&Value::Int(3)),
        "increments add up"
    );
    let notes = get("t2")
        .get("notes")
        .and_then(Value::as_str)
        .unwrap()
        .to_owned();
    for who in ["[a]", "[b]", "[c]"] {
        assert!(notes.contains(who), "{notes:?} keeps {who}");
    }
    // b wrote offline, so its title is concurrent with the others' (a's and
    // c's may be ordered: c can have seen a's before writing).
    let versions = get("t0")
        .conflict("title")
        .expect("a conflict, visible")
        .to_vec();
    assert!(
        versions.iter().any(|v| v.value == Value::from("t0 by b")),
        "{versions:?}"
    );
    let winner = versions.iter().max_by(|x, y| x.at.cmp(&y.at)).unwrap();
    assert_eq!(
        get("t0").get("title"),
        Some(&winner.value),
        "last writer wins"
    );
    for x in [a, b, c, d] {
        x.shutdown().await.unwrap();
    }
    relay.stop().await;
}

/// The relay's counter `name` (Prometheus text).
fn counter(stats: &tandem_relay::RelayStats, name: &str) -> f64 {
    let text = stats.render();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

fn frames(stats: &tandem_relay::RelayStats) -> f64 {
    counter(stats, "tandem_frames_in_total") + counter(stats, "tandem_frames_out_total")
}

/// Native clients and the relay negotiate Tandem's batch extension over
/// real sockets: 400 rows go up and come down to a new replica in a few
/// dozen frames rather than a few per row. A client that declines it
/// (`batch_bytes: 0`) is served plain frames and ends with the same rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_clients_move_many_rows_in_batch_frames_and_a_plain_one_still_syncs() {
    const ROWS: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let stats = std::sync::Arc::new(tandem_relay::RelayStats::default());
    let config = RelayConfig {
        stats: stats.clone(),
        ..RelayConfig::default()
    };
    let relay = start(server_repo(&dir, ServeOnRequest), config).await;
    let a = client(dir.path(), "a", &relay.url);
    a.sync_table("tasks").await.unwrap();
    a.rows(|rows| {
        let mut t = rows.table("tasks");
        for i in 0..ROWS {
            t.insert(&format!("r{i:03}"), [("n", Value::Int(i as i64))])?;
        }
        Ok(())
    })
    .await
    .unwrap();
    let d = client(dir.path(), "d", &relay.url);
    d.sync_table("tasks").await.unwrap();
    wait_until("d to discover a's rows", 30, || async {
        scan(&d).await.len() == ROWS
    })
    .await;
    let batched = frames(&stats);
    eprintln!("batched: {batched} frames");
    // Plain frames: a request, an answer and an acknowledgement per row for
    // d alone, beside a's uploads.
    assert!(
        batched < ROWS as f64,
        "{batched} frames in and out for {ROWS} rows up and down"
    );

    let repo = Repo::open(
        RedbStorage::open(dir.path().join("plain.redb")).unwrap(),
        RepoConfig {
            batch_bytes: 0,
            ..RepoConfig::new(PeerId::new("plain"))
        },
        ShareAll,
    )
    .unwrap();
    let mut rows = Rows::with_system_clock(repo);
    rows.define(schema());
    let plain = Client::start_rows(rows, &relay.url, ClientConfig::default()).unwrap();
    plain.sync_table("tasks").await.unwrap();
    wait_until("the plain client to discover the rows", 30, || async {
        scan(&plain).await.len() == ROWS
    })
    .await;
    let added = frames(&stats) - batched;
    // At the least a request and an answer per row.
    assert!(
        added >= 2.0 * ROWS as f64,
        "{added} frames for a plain client's {ROWS} rows"
    );
    assert_eq!(scan(&plain).await, scan(&d).await);
    for x in [a, d, plain] {
        x.shutdown().await.unwrap();
    }
    relay.stop().await;
}
