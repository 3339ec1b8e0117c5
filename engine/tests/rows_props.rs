//! Property test of the row layer: 3 to 5 replicas make random inserts,
//! updates, deletes, counter increments and text edits under every conflict
//! strategy, with random clocks and random partial syncs in between. Once
//! everything is synced, every replica holds identical rows, and the value of
//! every register is the one its strategy names.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use tandem_engine::rows::{
    Resolver, Rows, Strategy as Conflict, SyncLink, TableSchema, Timestamp, Value,
};
use tandem_engine::{MemoryStorage, PeerId, Repo, RepoConfig, ShareAll};

const TABLES: [&str; 4] = ["lww", "fww", "mv", "custom"];
const COLUMNS: [&str; 2] = ["a", "b"];

#[derive(Clone, Debug)]
enum Op {
    Write {
        r: usize,
        t: usize,
        key: u8,
        col: usize,
        value: i64,
        /// Through `upsert_many` (its deferred catalog listing) instead of `upsert`.
        many: bool,
    },
    Increment {
        r: usize,
        t: usize,
        key: u8,
        by: i64,
    },
    Type {
        r: usize,
        t: usize,
        key: u8,
        at_start: bool,
    },
    Delete {
        r: usize,
        t: usize,
        key: u8,
    },
    Sync {
        a: usize,
        b: usize,
    },
    Tick {
        r: usize,
        ms: u64,
    },
    /// `upsert_many` of 40 keys `b<batch>.<i>` (about 20 per catalog
    /// shard, so each shard's listing is a page of its own).
    Bulk {
        r: usize,
        t: usize,
        batch: u8,
    },
}

const BULK: i64 = 40;

fn op(replicas: usize) -> impl Strategy<Value = Op> {
    let r = 0..replicas;
    let t = 0..TABLES.len();
    let key = 0u8..4;
    prop_oneof![
        4 => (r.clone(), t.clone(), key.clone(), 0..COLUMNS.len(), -50i64..50, any::<bool>())
            .prop_map(|(r, t, key, col, value, many)| Op::Write { r, t, key, col, value, many }),
        2 => (r.clone(), t.clone(), key.clone(), -5i64..6)
            .prop_map(|(r, t, key, by)| Op::Increment { r, t, key, by }),
        2 => (r.clone(), t.clone(), key.clone(), any::<bool>())
            .prop_map(|(r, t, key, at_start)| Op::Type { r, t, key, at_start }),
        1 => (r.clone(), t.clone(), key).prop_map(|(r, t, key)| Op::Delete { r, t, key }),
        3 => (r.clone(), r.clone()).prop_map(|(a, b)| Op::Sync { a, b }),
        2 => (r.clone(), 0u64..3).prop_map(|(r, ms)| Op::Tick { r, ms }),
        1 => (r, t, 0u8..3).prop_map(|(r, t, batch)| Op::Bulk { r, t, batch }),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, Vec<Op>)> {
    (3usize..=5).prop_flat_map(|n| (Just(n), proptest::collection::vec(op(n), 1..60)))
}

fn schemas() -> Vec<TableSchema> {
    let max_value: Resolver = Arc::new(|_, versions| {
        versions
            .iter()
            .map(|v| v.value.clone())
            .max_by_key(|v| v.as_int().unwrap_or(i64::MIN))
            .expect("at least two versions")
    });
    let strategies = [
        Conflict::LastWriterWins,
        Conflict::FirstWriterWins,
        Conflict::MultiValue,
        Conflict::Custom(max_value),
    ];
    TABLES
        .iter()
        .zip(strategies)
        .map(|(t, s)| {
            TableSchema::new(*t)
                .strategy(s)
                .counter("votes")
                .text("notes")
                .shards(2)
        })
        .collect()
}

struct Replica {
    rows: Rows<MemoryStorage>,
    clock: Arc<AtomicU64>,
}

/// What the replicas did, to check the merged result against.
#[derive(Default)]
struct Model {
    /// Every register write: (table, key, column) -> (timestamp, value).
    writes: BTreeMap<(usize, u8, usize), Vec<(Timestamp, i64)>>,
    increments: BTreeMap<(usize, u8), i64>,
    tokens: BTreeMap<(usize, u8), Vec<String>>,
    /// Keys a delete touched anywhere: revives reset them, so the simple
    /// per-register rules are checked only on the others.
    deleted: BTreeSet<(usize, u8)>,
    /// Bulk batches written: (table, batch).
    bulk: BTreeSet<(usize, u8)>,
}

fn pair(v: &mut [Replica], i: usize, j: usize) -> (&mut Replica, &mut Replica) {
    if i < j {
        let (l, r) = v.split_at_mut(j);
        (&mut l[i], &mut r[0])
    } else {
        let (l, r) = v.split_at_mut(i);
        (&mut r[0], &mut l[j])
    }
}

fn run(n: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut replicas: Vec<Replica> = (0..n)
        .map(|i| {
            let repo = Repo::open(
                MemoryStorage::new(),
                RepoConfig::new(PeerId::new(format!("r{i}"))),
                ShareAll,
            )
            .unwrap();
            let clock = Arc::new(AtomicU64::new(1_000));
            let c = clock.clone();
            let mut rows = Rows::new(repo, move || c.load(Ordering::SeqCst));
            for s in schemas() {
                rows.define(s);
            }
            Replica { rows, clock }
        })
        .collect();
    let mut model = Model::default();
    let mut token = 0;
    for op in ops {
        match *op {
            Op::Write {
                r,
                t,
                key,
                col,
                value,
                many,
            } => {
                let rows = &mut replicas[r].rows;
                let k = key.to_string();
                let mut table = rows.table(TABLES[t]);
                let columns = [(COLUMNS[col], Value::Int(value))];
                if many {
                    assert_eq!(table.upsert_many([(&k, columns)]).unwrap(), 1);
                } else {
                    table.upsert(&k, columns).unwrap();
                }
                let versions = table.versions(&k, COLUMNS[col]).unwrap();
                prop_assert_eq!(versions.len(), 1, "a write supersedes what its replica saw");
                model
                    .writes
                    .entry((t, key, col))
                    .or_default()
                    .push((versions[0].at.clone(), value));
            }
            Op::Increment { r, t, key, by } => {
                let mut table = replicas[r].rows.table(TABLES[t]);
                if table.increment(&key.to_string(), "votes", by).is_ok() {
                    *model.increments.entry((t, key)).or_default() += by;
                }
            }
            Op::Type {
                r,
                t,
                key,
                at_start,
            } => {
                token += 1;
                let word = format!("<{r}.{token}>");
                let mut table = replicas[r].rows.table(TABLES[t]);
                let k = key.to_string();
                let Some(row) = table.get(&k).unwrap() else {
                    continue;
                };
                let len = row
                    .get("notes")
                    .and_then(Value::as_str)
                    .map_or(0, |s| s.chars().count());
                let at = if at_start { 0 } else { len };
                table.splice_text(&k, "notes", at, 0, &word).unwrap();
                model.tokens.entry((t, key)).or_default().push(word);
            }
            Op::Delete { r, t, key } => {
                let mut table = replicas[r].rows.table(TABLES[t]);
                if table.delete(&key.to_string()).is_ok() {
                    model.deleted.insert((t, key));
                }
            }
            Op::Sync { a, b } if a != b => {
                let (x, y) = pair(&mut replicas, a, b);
                SyncLink::new(format!("{}-{}", a.min(b), a.max(b)))
                    .run(&mut x.rows, &mut y.rows)
                    .unwrap();
            }
            Op::Sync { .. } => {}
            Op::Tick { r, ms } => {
                replicas[r].clock.fetch_add(ms, Ordering::SeqCst);
            }
            Op::Bulk { r, t, batch } => {
                let rows = (0..BULK).map(|i| {
                    let columns = [("a", Value::Int(i64::from(batch) * 100 + i))];
                    (format!("b{batch}.{i}"), columns)
                });
                let written = replicas[r].rows.table(TABLES[t]).upsert_many(rows);
                prop_assert_eq!(written.unwrap(), BULK as usize);
                model.bulk.insert((t, batch));
            }
        }
    }
    // Heal: two passes of a star around replica 0 reach everyone.
    for _ in 0..2 {
        for i in 1..n {
            let (x, y) = pair(&mut replicas, 0, i);
            SyncLink::new(format!("0-{i}"))
                .run(&mut x.rows, &mut y.rows)
                .unwrap();
        }
    }
    for (t, name) in TABLES.iter().enumerate() {
        let reference = replicas[0].rows.table(name).scan().unwrap();
        for r in replicas.iter_mut().skip(1) {
            prop_assert_eq!(
                &r.rows.table(name).scan().unwrap(),
                &reference,
                "table {}",
                name
            );
        }
        // Every bulk row is there once, and every version of its column is
        // the only value ever written to it. Written by two replicas
        // concurrently, a multi-value table keeps both versions (equal as
        // they are) and shows no value until the application resolves it.
        for &(_, batch) in model.bulk.iter().filter(|(bt, _)| *bt == t) {
            for i in 0..BULK {
                let key = format!("b{batch}.{i}");
                let row = reference.iter().find(|row| row.key == key);
                prop_assert!(row.is_some(), "table {} lost bulk row {}", name, key);
                let written = Value::Int(i64::from(batch) * 100 + i);
                let versions = replicas[0].rows.table(name).versions(&key, "a").unwrap();
                prop_assert!(!versions.is_empty());
                prop_assert!(
                    versions.iter().all(|v| v.value == written),
                    "{:?}",
                    versions
                );
                let value = row.and_then(|row| row.get("a").cloned());
                if t == 2 && versions.len() > 1 {
                    prop_assert_eq!(value, None);
                } else {
                    prop_assert_eq!(value, Some(written));
                }
            }
        }
        let bulk_rows = reference.iter().filter(|row| row.key.starts_with('b'));
        prop_assert_eq!(
            bulk_rows.count(),
            model.bulk.iter().filter(|(bt, _)| *bt == t).count() * BULK as usize
        );
        for row in reference.iter().filter(|row| !row.key.starts_with('b')) {
            let key: u8 = row.key.parse().unwrap();
            if model.deleted.contains(&(t, key)) {
                continue;
            }
            let mut table = replicas[0].rows.table(name);
            for (col, column) in COLUMNS.iter().enumerate() {
                let Some(writes) = model.writes.get(&(t, key, col)) else {
                    prop_assert!(row.get(column).is_none());
                    continue;
                };
                let versions = table.versions(&row.key, column).unwrap();
                for v in &versions {
                    prop_assert!(
                        writes.contains(&(v.at.clone(), v.value.as_int().unwrap())),
                        "version {:?} was never written",
                        v
                    );
                }
                // The latest write of all is never superseded (anything that
                // saw it writes a later timestamp), so it is always a version.
                let latest = writes.iter().max().unwrap();
                prop_assert!(versions.iter().any(|v| v.at == latest.0));
                let value = row.get(column).cloned();
                let expected = match t {
                    0 => Some(Value::Int(latest.1)),
                    1 => Some(versions[0].value.clone()),
                    2 => (versions.len() == 1).then(|| versions[0].value.clone()),
                    _ => versions
                        .iter()
                        .map(|v| v.value.clone())
                        .max_by_key(|v| v.as_int()),
                };
                prop_assert_eq!(value, expected, "table {} column {}", name, column);
            }
            let votes = model.increments.get(&(t, key)).copied().unwrap_or(0);
            prop_assert_eq!(row.get("votes"), Some(&Value::Int(votes)));
            let notes = row
                .get("notes")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            for word in model.tokens.get(&(t, key)).into_iter().flatten() {
                prop_assert_eq!(
                    notes.matches(word.as_str()).count(),
                    1,
                    "{} in {:?}",
                    word,
                    notes
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_and_every_register_holds_its_strategys_winner((n, ops) in scenario()) {
        run(n, &ops)?;
    }
}
