use automerge::{AutoCommit, Change, ROOT, transaction::Transactable};
fn main() {
    let hist: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    let mode = std::env::args().nth(2).unwrap_or_default();
    let mut w = AutoCommit::new();
    let mut changes: Vec<Vec<u8>> = Vec::new();
    for i in 0..(hist + 200) {
        w.put(ROOT, "v", i as u64).unwrap();
        w.put(ROOT, "t", i as i64 * 7).unwrap();
        w.commit();
        changes.push(w.get_last_local_change().unwrap().raw_bytes().to_vec());
    }
    let mut r = AutoCommit::new();
    let first: Vec<Change> = changes[..hist]
        .iter()
        .map(|b| Change::from_bytes(b.clone()).unwrap())
        .collect();
    r.apply_changes(first).unwrap();
    if mode == "reload" {
        r = AutoCommit::load(&r.save()).unwrap();
    }
    let t = std::time::Instant::now();
    if mode == "batch" {
        for chunk in changes[hist..].chunks(10) {
            r.apply_changes(chunk.iter().map(|b| Change::from_bytes(b.clone()).unwrap()))
                .unwrap();
        }
        println!("{:?} per change in batches of 10", t.elapsed() / 200);
        return;
    }
    for b in &changes[hist..] {
        r.apply_changes([Change::from_bytes(b.clone()).unwrap()])
            .unwrap();
    }
    println!("{:?} per apply", t.elapsed() / 200);
    let t = std::time::Instant::now();
    for i in 0..200 {
        r.put(ROOT, "v", i as u64).unwrap();
        r.commit();
    }
    println!("{:?} per local put+commit", t.elapsed() / 200);
}
