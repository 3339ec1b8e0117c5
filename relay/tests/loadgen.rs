//! The benchmark harness itself: `tandem-loadgen` runs a short fan-out
//! against a real `tandem serve` on 127.0.0.1 and reports what its readers
//! saw, and `apply-cost` reports one row per pair of sizes. Figures are not
//! judged here (they are the benchmarks' business); the harness must work.

mod support;

use std::process::Command;

use serde_json::Value;

fn loadgen(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem-loadgen"))
        .args(args)
        .output()
        .expect("cannot run tandem-loadgen");
    assert!(
        out.status.success(),
        "tandem-loadgen {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON report")
}

/// A short fan-out (3 readers, 1 s per phase) against a new relay, with
/// `extra` arguments for the load generator.
fn short_fan_out(extra: &[&str]) -> Value {
    let data = tempfile::tempdir().unwrap();
    let (mut relay, url) = support::start_binary(data.path(), &["--allow-anonymous"]);
    let pid = relay.id().to_string();
    let mut args = vec![
        "--url",
        &url,
        "--server-pid",
        &pid,
        "--readers",
        "3",
        "--rate",
        "20",
        "--phase-secs",
        "1",
        "--drain-secs",
        "20",
        "--json",
    ];
    args.extend_from_slice(extra);
    let report = loadgen(&args);
    relay.kill().unwrap();
    relay.wait().unwrap();
    report
}

#[test]
fn a_short_fan_out_reaches_every_reader() {
    let report = short_fan_out(&[]);
    assert_eq!(report["readers"], 3);
    assert_eq!(report["readers_disconnected"].as_array().unwrap().len(), 0);
    let phases = report["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 2, "a paced phase and a full-speed one");
    for phase in phases {
        let name = &phase["phase"];
        let sent = phase["sent"].as_u64().unwrap();
        assert!(sent > 0, "{name}: nothing sent");
        assert_eq!(phase["caught_up_readers"], 3, "{name}: {phase}");
        // Every reader saw at least the last value, and never more values
        // than were sent.
        let seen = &phase["distinct_seen"];
        assert!(seen["min"].as_u64().unwrap() >= 1, "{name}: {seen}");
        assert!(seen["max"].as_u64().unwrap() <= sent, "{name}: {seen}");
        assert!(phase["latency_ms"]["observations"].as_u64().unwrap() >= 3);
        // The server was sampled.
        assert!(phase["server"].is_object(), "{name}: {}", phase["server"]);
    }
    assert!(report["frames"]["to_readers"].as_u64().unwrap() >= 3);
}

#[test]
fn a_fan_out_over_records_reads_each_value_from_its_record() {
    let report = short_fan_out(&["--records", "7"]);
    assert_eq!(report["records"], 7);
    assert_eq!(report["readers_disconnected"].as_array().unwrap().len(), 0);
    for phase in report["phases"].as_array().unwrap() {
        let name = &phase["phase"];
        assert_eq!(phase["caught_up_readers"], 3, "{name}: {phase}");
        // A reader only counts a value it found in the record the change
        // names: every reader saw some, and the last.
        let seen = &phase["distinct_seen"];
        assert!(seen["min"].as_u64().unwrap() >= 1, "{name}: {seen}");
        let windows = phase["p99_by_send_window"].as_array().unwrap();
        assert!(!windows.is_empty(), "{name}");
        for w in windows {
            // Bytes reach the socket before the reader has applied them.
            let (p99, arrival) = (w["p99_ms"].as_f64(), w["arrival_p99_ms"].as_f64());
            assert!(arrival.unwrap() <= p99.unwrap(), "{name}: {w}");
        }
    }
}

#[test]
fn records_need_the_stamp_in_the_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem-loadgen"))
        .args([
            "--url",
            "ws://127.0.0.1:9",
            "--records",
            "3",
            "--stamp",
            "field",
        ])
        .output()
        .expect("cannot run tandem-loadgen");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--records needs --stamp message"),
        "{stderr}"
    );
}

#[test]
fn apply_cost_reports_every_pair_of_sizes() {
    let report = loadgen(&[
        "apply-cost",
        "--history",
        "10,50",
        "--batch",
        "1,4",
        "--reps",
        "3",
        "--readers",
        "2",
        "--json",
    ]);
    let rows = report["rows"].as_array().unwrap();
    let pairs: Vec<(u64, u64)> = rows
        .iter()
        .map(|r| (r["history"].as_u64().unwrap(), r["batch"].as_u64().unwrap()))
        .collect();
    assert_eq!(pairs, [(10, 1), (10, 4), (50, 1), (50, 4)]);
    for row in rows {
        let batch = row["us_per_batch"].as_f64().unwrap();
        let change = row["us_per_change"].as_f64().unwrap();
        let all = row["ms_for_all_readers"].as_f64().unwrap();
        assert!(batch > 0.0, "{row}");
        let per = row["batch"].as_f64().unwrap();
        assert!((change * per - batch).abs() <= 0.1 * per + 0.1, "{row}");
        assert!((all - batch * 2.0 / 1000.0).abs() <= 0.1, "{row}");
    }
}
