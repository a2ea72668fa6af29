//! The real benchmark at 64 MB (manual path + every ferry strategy), on the local test bed.
//!
//! Opt-in: it needs root and the test bed, takes a minute or two and loads the machine, so it
//! runs only with FERRY_BENCH=1 (never as part of the normal test run):
//!
//!     cargo build --release --workspace --bins
//!     FERRY_BENCH=1 cargo test --release -p ferry-bench --test bench -- --nocapture
//!
//! Results go to $FERRY_BENCH_OUT (default: a temporary directory that is kept).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use std::path::PathBuf;

use ferry_bench::{BenchOptions, CaseStatus, MANUAL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_64mb_manual_vs_ferry() {
    if std::env::var("FERRY_BENCH").as_deref() != Ok("1") {
        eprintln!("skipping: set FERRY_BENCH=1 to run the 64 MB benchmark");
        return;
    }
    let ferry = std::env::var_os("FERRY_EXE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/ferry")
        });
    let out = std::env::var_os("FERRY_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| tempfile::tempdir().expect("temp dir").keep());
    let mut opts = BenchOptions::new(ferry, &out);
    opts.sizes_mb = vec![64];
    let report = ferry_bench::run(opts).await.expect("benchmark runs");
    println!("{}", ferry_bench::markdown(&report));
    println!("results in {}", out.display());

    let case = |name: &str| {
        report
            .cases
            .iter()
            .find(|c| c.case == name)
            .unwrap_or_else(|| panic!("no {name} case"))
    };
    for name in [MANUAL, "stop-and-copy"] {
        let c = case(name);
        assert_eq!(c.status, CaseStatus::Ok, "{name}: {:?}", c.error);
        assert_eq!(c.connection_kept, Some(true), "{name}");
        assert!(c.client_gap_ms.unwrap() > 0.0, "{name}");
        assert!(
            c.bytes.unwrap() > 32 << 20,
            "{name}: a 64 MB Redis moves at least 32 MB"
        );
        assert!(c.rss_mb.unwrap() > 48.0, "{name}: RSS {:?}", c.rss_mb);
    }
    assert!(case("stop-and-copy").gap_ratio_vs_manual.is_some());
    for f in &report.files {
        assert!(f.is_file(), "{} missing", f.display());
    }
    assert!(out.join("latency-64.svg").is_file());
}
