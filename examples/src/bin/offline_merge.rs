//! Two replicas edit the same document offline, then merge through a store.
//!
//! `laptop` and `phone` each keep their own redb store on disk; `hub` is a
//! storing peer (what the relay will be). Both replicas go offline, edit the
//! same shopping list concurrently, reconnect through the hub, and end with
//! identical documents: every item kept, the concurrent title edits resolved
//! the same way on both, and the conflict visible to the application.
//!
//! Run: `cargo run -p tandem-examples --bin offline_merge [-- <data dir>]`

use anyhow::{Context, Result, ensure};
use tandem_engine::automerge::{ObjType, ROOT, ReadDoc, transaction::Transactable};
use tandem_engine::{
    Automerge, DocumentId, PeerId, RedbStorage, Repo, RepoConfig, ServeOnRequest, ShareAll,
    sync_in_process,
};

type Replica = Repo<RedbStorage>;

fn open(dir: &std::path::Path, name: &str) -> Result<Replica> {
    let storage = RedbStorage::open(dir.join(format!("{name}.redb")))
        .with_context(|| format!("opening {name}'s store"))?;
    Ok(Repo::open(
        storage,
        RepoConfig::new(PeerId::new(name)),
        ShareAll,
    )?)
}

fn show(label: &str, doc: &Automerge) -> String {
    let title = doc
        .get(ROOT, "title")
        .ok()
        .flatten()
        .map(|(v, _)| v.as_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let items: Vec<String> = match doc.get(ROOT, "items").ok().flatten() {
        Some((_, list)) => (0..doc.length(&list))
            .filter_map(|i| doc.get(&list, i).ok().flatten())
            .map(|(v, _)| v.as_str().unwrap_or_default().to_owned())
            .collect(),
        None => vec![],
    };
    let line = format!("{label:>7}: title={title:?} items={items:?}");
    println!("{line}");
    format!("{title:?} {items:?}")
}

fn add_item(repo: &mut Replica, doc: &DocumentId, item: &str) -> Result<()> {
    repo.change(doc, |d| {
        let (_, list) = d.get(ROOT, "items")?.expect("items list exists");
        let len = d.length(&list);
        d.insert(&list, len, item)
    })?;
    Ok(())
}

fn main() -> Result<()> {
    let _tmp;
    let dir = match std::env::args().nth(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            _tmp = tempfile::tempdir()?;
            _tmp.path().to_path_buf()
        }
    };
    println!("stores in {}", dir.display());
    let mut laptop = open(&dir, "laptop")?;
    let mut phone = open(&dir, "phone")?;
    let mut hub = Repo::open(
        RedbStorage::open(dir.join("hub.redb"))?,
        RepoConfig::new(PeerId::new("hub")),
        ServeOnRequest,
    )?;

    // 1. The laptop creates the list and syncs it to the hub.
    let list = laptop.create()?;
    laptop.change(&list, |d| {
        d.put(ROOT, "title", "Groceries")?;
        let items = d.put_object(ROOT, "items", ObjType::List)?;
        d.insert(&items, 0, "bread")
    })?;
    laptop.flush()?;
    sync_in_process(&mut laptop, &mut hub, 100)?;
    println!("document {}", list.url());

    // 2. The phone fetches it from the hub by id.
    phone.request(list)?;
    sync_in_process(&mut phone, &mut hub, 100)?;
    ensure!(phone.contains(&list)?, "phone did not receive the list");

    // 3. Both go offline and edit the same list concurrently.
    println!("-- offline edits --");
    laptop.change(&list, |d| d.put(ROOT, "title", "Groceries for Saturday"))?;
    add_item(&mut laptop, &list, "milk")?;
    phone.change(&list, |d| d.put(ROOT, "title", "Weekend groceries"))?;
    add_item(&mut phone, &list, "apples")?;
    laptop.flush()?;
    phone.flush()?;
    laptop.view(&list, |d| show("laptop", d))?;
    phone.view(&list, |d| show("phone", d))?;

    // 4. Back online: each syncs with the hub (twice, so both see everything).
    println!("-- after reconnecting through the hub --");
    for _ in 0..2 {
        sync_in_process(&mut laptop, &mut hub, 100)?;
        sync_in_process(&mut phone, &mut hub, 100)?;
    }
    let a = laptop.view(&list, |d| show("laptop", d))?;
    let b = phone.view(&list, |d| show("phone", d))?;
    ensure!(a == b, "replicas diverged");
    ensure!(laptop.heads(&list)? == phone.heads(&list)?, "heads differ");
    let conflict = phone.view(&list, |d| {
        d.get_all(ROOT, "title").map(|all| {
            all.into_iter()
                .map(|(v, _)| v.to_string())
                .collect::<Vec<_>>()
        })
    })??;
    println!("concurrent titles (automerge keeps both, picks one deterministically): {conflict:?}");

    // 5. Everything is on disk: reopen the phone's store and read it back.
    drop(phone);
    let mut phone = open(&dir, "phone")?;
    let c = phone.view(&list, |d| show("reopened", d))?;
    ensure!(c == a, "reopened store differs");
    let feed = phone.feed().read(tandem_engine::Cursor::START, 100)?;
    println!(
        "phone's change feed holds {} commits; both replicas converged",
        feed.len()
    );
    Ok(())
}
