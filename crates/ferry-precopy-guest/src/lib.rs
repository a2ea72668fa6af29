//! Pre-copy, proven in a guest: `scripts/precopy-vm.sh` boots a kernel with soft-dirty
//! tracking under QEMU and runs this crate's binary there as the test driver (`guest`), which
//! starts a runc container running the same binary as a memory-dirtying workload (`workload`),
//! pre-dumps it in rounds, dumps, restores and has the workload check its own memory.
//!
//! The driver prints one line, [`MARKER`] followed by a JSON [`Report`], on the serial
//! console; the host script and the e2e test read only that line.

pub mod workload;

use ferry_criu::precopy::{RoundStats, StopReason};
use serde::{Deserialize, Serialize};

/// Prefix of the guest's one result line on the console.
pub const MARKER: &str = "FERRY-PRECOPY-RESULT";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
}

/// How the workload dirties memory; chosen by the driver, reported so the figures can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Size of the verified buffer.
    pub mb: u64,
    /// The buffer in 4 KiB pages.
    pub pages: u64,
    /// The first `hot_pages` pages are the ones rewritten while it runs.
    pub hot_pages: u64,
    /// Pages rewritten per tick, picked at random from the hot set.
    pub dirty_per_tick: u64,
    pub tick_ms: u64,
    /// Whether the buffer may use transparent huge pages. Soft-dirty bits of a huge page cover
    /// all of its 512 small pages, so one write makes a pre-dump copy 2 MiB.
    pub huge_pages: bool,
}

/// A pre-dump round and how far the workload had got when it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    #[serde(flatten)]
    pub dump: RoundStats,
    /// The workload's tick counter read right after the round; it goes up between rounds
    /// because a pre-dump leaves the container running.
    pub workload_ticks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// Wall time of `runc restore` (CRIU reads the final images and follows `parent` links).
    pub wall_ms: u64,
    /// The source workload's last tick count, read after the final dump (and checked to stay
    /// put, so the dump really stopped it).
    pub ticks_at_dump: u64,
    /// A tick count of the restored workload, taken after its verification.
    pub ticks_after_restore: u64,
    /// Random at the workload's start: a restarted workload would pick a new one.
    pub nonce_before: u64,
    pub nonce_after: u64,
    pub verified_pages: u64,
    pub mismatched_pages: u64,
}

/// Everything the guest measured, up to the first failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub verdict: Verdict,
    pub error: Option<String>,
    /// Lines of the failing tool's log that say why.
    pub error_log: Vec<String>,
    pub kernel: String,
    /// The guest kernel's transparent huge page mode, as
    /// /sys/kernel/mm/transparent_hugepage/enabled shows it.
    pub thp_mode: String,
    /// No pre-dump rounds: a plain dump and restore, to compare the freeze with.
    pub baseline: bool,
    /// `v1` or `v2`: the cgroup layout the guest mounted for runc.
    pub cgroup: String,
    pub mem_dirty_track: bool,
    pub workload: WorkloadSpec,
    /// The workload's own check of its buffer before any dump: proves the check runs.
    pub verified_before: Option<workload::Verification>,
    pub rounds: Vec<Round>,
    pub stop_reason: Option<StopReason>,
    pub final_dump: Option<RoundStats>,
    pub restore: Option<RestoreReport>,
    pub guest_ms: u64,
}

impl Report {
    /// Finds the result line in console output (which may carry `\r` and kernel noise).
    pub fn find_in(console: &str) -> Option<Result<Report, serde_json::Error>> {
        console
            .lines()
            .rev()
            .find_map(|l| {
                let l = l.trim_end_matches('\r');
                l.find(MARKER).map(|i| l[i + MARKER.len()..].trim())
            })
            .map(serde_json::from_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_marker_line_wins_and_noise_is_ignored() {
        let spec = WorkloadSpec {
            mb: 1,
            pages: 256,
            hot_pages: 16,
            dirty_per_tick: 1,
            tick_ms: 10,
            huge_pages: true,
        };
        let mut r = Report {
            verdict: Verdict::Fail,
            error: Some("x".into()),
            error_log: vec![],
            kernel: "6.1".into(),
            thp_mode: "always [madvise] never".into(),
            baseline: false,
            cgroup: "v2".into(),
            mem_dirty_track: true,
            workload: spec,
            verified_before: None,
            rounds: vec![],
            stop_reason: None,
            final_dump: None,
            restore: None,
            guest_ms: 5,
        };
        let first = serde_json::to_string(&r).unwrap();
        r.verdict = Verdict::Pass;
        let second = serde_json::to_string(&r).unwrap();
        let console = format!(
            "booting\r\n{MARKER} {first}\r\n[ 1.0] noise\r\n{MARKER} {second}\r\npower down\r\n"
        );
        let got = Report::find_in(&console).unwrap().unwrap();
        assert_eq!(got.verdict, Verdict::Pass);
        assert!(Report::find_in("no result here\n").is_none());
        assert!(Report::find_in(&format!("{MARKER} {{not json"))
            .unwrap()
            .is_err());
    }
}
