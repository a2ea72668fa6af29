//! CRIU pre-copy, end to end, in a QEMU guest (`scripts/precopy-vm.sh`): the host kernel may
//! lack soft-dirty tracking, Debian's cloud kernel in the guest has it.
//!
//! Runs with FERRY_E2E=1 (or FERRY_PRECOPY_VM=1). Without either it is skipped locally and
//! fails in CI, so it is never silently skipped there; with it, a missing QEMU or kernel is a
//! failure that says which.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use ferry_criu::precopy::{next_step, PrecopyDecision, RoundStats};
use ferry_precopy_guest::{Report, Verdict};

fn enabled() -> bool {
    let on = |v: &str| std::env::var(v).as_deref() == Ok("1");
    if on("FERRY_E2E") || on("FERRY_PRECOPY_VM") {
        return true;
    }
    if std::env::var("CI").is_ok() {
        panic!("the pre-copy VM test must run in CI: set FERRY_E2E=1 (scripts/test.sh does)");
    }
    eprintln!("skipping: neither FERRY_E2E=1 nor FERRY_PRECOPY_VM=1 is set");
    false
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn precopy_in_a_guest_shrinks_the_final_dump_and_restores_intact_memory() {
    if !enabled() {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/precopy-vm.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .env(
            "FERRY_PRECOPY_GUEST_BIN",
            env!("CARGO_BIN_EXE_ferry-precopy-guest"),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "precopy-vm.sh took {:.0} s, {}",
        started.elapsed().as_secs_f64(),
        out.status
    );
    let report = match Report::find_in(&stdout) {
        Some(Ok(r)) => r,
        Some(Err(e)) => panic!("unreadable result line ({e}):\n{stdout}"),
        None => panic!(
            "{} reported no result ({}):\n{}",
            script.display(),
            out.status,
            tail(&stderr, 60)
        ),
    };
    assert_eq!(
        report.verdict,
        Verdict::Pass,
        "guest test failed: {:?}\n{}\n--- console ---\n{}",
        report.error,
        report.error_log.join("\n"),
        tail(&stderr, 60)
    );
    assert!(
        out.status.success(),
        "script failed after a pass: {}",
        out.status
    );
    assert!(report.mem_dirty_track);
    assert!(!report.baseline);

    let pages = report.workload.pages;
    let rounds: Vec<RoundStats> = report.rounds.iter().map(|r| r.dump.clone()).collect();
    let first = &rounds.first().expect("no pre-dump round ran").stats;
    eprintln!("stop: {:?}", report.stop_reason);
    for r in &rounds {
        eprintln!(
            "round {}: scanned {} written {} from parent {} frozen {} us wall {} ms",
            r.round,
            r.stats.pages_scanned,
            r.stats.pages_written,
            r.stats.pages_skipped_parent,
            r.stats.frozen_time_us,
            r.wall_ms
        );
    }

    // The stop rules, re-applied to the reported rounds, go on exactly until the last one and
    // stop there for the reason the guest gave.
    for k in 1..rounds.len() {
        assert_eq!(
            next_step(&rounds[..k]),
            PrecopyDecision::Continue,
            "pre-copy went on after round {k} although the rules said stop"
        );
    }
    let reason = report.stop_reason.expect("no stop reason reported");
    assert_eq!(next_step(&rounds), PrecopyDecision::Stop { reason });

    // Round 1 copies the whole buffer; later rounds take most of it from their parent.
    assert!(
        first.pages_written >= pages,
        "round 1 wrote {} pages, the buffer has {pages}",
        first.pages_written
    );
    assert_eq!(first.pages_skipped_parent, 0);
    for r in &rounds[1..] {
        assert!(
            r.stats.pages_skipped_parent >= pages / 2,
            "round {} took only {} pages from its parent",
            r.round,
            r.stats.pages_skipped_parent
        );
    }
    // Pre-dumps leave the container running.
    let ticks: Vec<u64> = report.rounds.iter().map(|r| r.workload_ticks).collect();
    if ticks.len() > 1 {
        assert!(
            ticks[ticks.len() - 1] > ticks[0],
            "the workload made no progress during pre-copy: {ticks:?}"
        );
    }

    let fin = report.final_dump.as_ref().expect("no final dump");
    eprintln!(
        "final dump: written {} from parent {} frozen {} us wall {} ms",
        fin.stats.pages_written,
        fin.stats.pages_skipped_parent,
        fin.stats.frozen_time_us,
        fin.wall_ms
    );
    assert!(
        fin.stats.pages_written * 8 <= first.pages_written,
        "the final dump wrote {} pages, not far fewer than round 1's {}",
        fin.stats.pages_written,
        first.pages_written
    );
    assert!(fin.stats.pages_skipped_parent >= pages / 2);

    let r = report.restore.as_ref().expect("no restore report");
    eprintln!("restore: {r:?}");
    assert_eq!(
        r.nonce_after, r.nonce_before,
        "the restored workload is a new one"
    );
    assert_eq!(r.verified_pages, pages);
    assert_eq!(r.mismatched_pages, 0);
    assert!(
        r.ticks_after_restore > r.ticks_at_dump,
        "the restored workload did not continue from tick {} (saw {})",
        r.ticks_at_dump,
        r.ticks_after_restore
    );
}
