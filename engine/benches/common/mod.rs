//! The workloads both bench harnesses measure, so they measure the same thing.

use std::path::PathBuf;

use automerge::{AutoCommit, ROOT, transaction::Transactable};
use redb::{Database, TableDefinition};
use tandem_engine::{PeerId, RedbStorage, Repo, RepoConfig, ShareAll};

const RAW: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("t");

/// A temporary directory on the project's disk (target/), not a tmpfs, so
/// fsync costs what it costs.
pub fn bench_dir() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// A repo on a redb file.
pub fn repo_at(path: &std::path::Path) -> Repo<RedbStorage> {
    Repo::open(
        RedbStorage::open(path).unwrap(),
        RepoConfig::new(PeerId::new("bench")),
        ShareAll,
    )
    .unwrap()
}

/// The floor of durable commits: one raw redb insert, committed durably.
pub fn raw_redb_commit(db: &Database, key: u64) {
    let txn = db.begin_write().unwrap();
    txn.open_table(RAW)
        .unwrap()
        .insert(key, b"value-0123456789".as_slice())
        .unwrap();
    txn.commit().unwrap();
}

/// The five fields of [`five_fields`], written into an empty document in
/// one batch (`init_root_from_hydrate`): bare automerge's fastest way to
/// create them.
#[allow(dead_code)] // each bench binary compiles this module; not all use it
pub fn five_fields_at_once(d: &mut AutoCommit, i: usize) -> Result<(), automerge::AutomergeError> {
    use automerge::{ScalarValue, hydrate};
    let s = |v: ScalarValue| hydrate::Value::Scalar(v);
    let root: std::collections::HashMap<String, hydrate::Value> = [
        ("id", s(ScalarValue::Int(i as i64))),
        ("title", s(ScalarValue::Str(format!("task {i}").into()))),
        ("done", s(ScalarValue::Boolean(i.is_multiple_of(2)))),
        ("owner", s(ScalarValue::Str("ada".into()))),
        ("priority", s(ScalarValue::F64((i % 5) as f64))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    d.init_root_from_hydrate(&hydrate::Map::from(root))
}

/// A small five-field document, like a task row.
pub fn five_fields(d: &mut AutoCommit, i: usize) -> Result<(), automerge::AutomergeError> {
    d.put(ROOT, "id", i as i64)?;
    d.put(ROOT, "title", format!("task {i}"))?;
    d.put(ROOT, "done", i.is_multiple_of(2))?;
    d.put(ROOT, "owner", "ada")?;
    d.put(ROOT, "priority", (i % 5) as f64)?;
    Ok(())
}
