//! What a migration tells its caller while it runs ([`Event`]) and when it ends ([`Report`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::msg::{Compression, ErrorInfo, Strategy};

/// Phases of a migration, in the order the state machine walks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Preflight,
    Prepare,
    /// Data copied while the container still runs (volumes, first pass).
    Precopy,
    Freeze,
    Dump,
    Transfer,
    Restore,
    Commit,
    Rollback,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preflight => "preflight",
            Phase::Prepare => "prepare",
            Phase::Precopy => "precopy",
            Phase::Freeze => "freeze",
            Phase::Dump => "dump",
            Phase::Transfer => "transfer",
            Phase::Restore => "restore",
            Phase::Commit => "commit",
            Phase::Rollback => "rollback",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    PhaseStarted { phase: Phase },
    PhaseFinished { phase: Phase, ms: u64 },
    Progress { phase: Phase, done: u64, total: u64 },
    Note { message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Migrated,
    RolledBack,
    /// The target's state could not be learned after the commit request: the source is kept
    /// frozen and nothing is deleted, for an operator to decide.
    InDoubt,
    /// Post-copy: the target had resumed when the source stopped serving pages, so the pages
    /// not fetched by then are gone. Both containers are kept, stopped; the error says how much
    /// arrived and what is lost.
    PagesLost,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NetworkReport {
    pub network: String,
    pub driver: String,
    pub ipv4: Option<String>,
    pub mac: Option<String>,
    /// Whether established connections from outside the hosts can survive on this network.
    pub external_connections_survive: bool,
    pub note: String,
}

/// What a compression policy came to over a migration's bulk streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompressionDecision {
    /// The policy was `off`: plain `Data` frames throughout.
    Off,
    /// Every stream that was measured (or, under `on`, every stream) went compressed.
    Compressed,
    /// `auto` measured too little gain and sent the streams plain (all-zero chunks still elided).
    Plain,
    /// `auto` compressed some streams and not others.
    Mixed,
    /// The target predates compression, so everything went as plain `Data` frames.
    PeerUnsupported,
}

impl CompressionDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            CompressionDecision::Off => "off",
            CompressionDecision::Compressed => "compressed",
            CompressionDecision::Plain => "plain",
            CompressionDecision::Mixed => "mixed",
            CompressionDecision::PeerUnsupported => "peer-unsupported",
        }
    }
}

impl std::fmt::Display for CompressionDecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressionReport {
    pub policy: Compression,
    pub decision: CompressionDecision,
    /// Uncompressed over compressed size of the chunks zstd was tried on while `auto` measured
    /// (all-zero chunks left out: they say nothing about the rest); absent if none was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_ratio: Option<f64>,
    /// Streams `auto` kept compressing, and streams it sent plain, after measuring.
    #[serde(default)]
    pub streams_compressed: u64,
    #[serde(default)]
    pub streams_plain: u64,
}

/// How a named volume travelled: the first pass while the container ran, the final pass of
/// what changed, taken while it was frozen (and so part of the downtime).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VolumeTransfer {
    pub name: String,
    pub first_pass_bytes: u64,
    pub first_pass_ms: u64,
    pub final_pass_bytes: u64,
    pub final_pass_ms: u64,
    /// Entries (files, dirs, links) the final pass carried.
    pub final_pass_entries: u64,
}

/// The `--bandwidth-limit` of a migration and what it cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BandwidthReport {
    pub limit_bytes_per_s: u64,
    /// Total time sends to the target were held back to stay under the limit.
    pub paced_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub migration_id: String,
    pub container: String,
    pub source: String,
    pub target: String,
    pub strategy: Strategy,
    pub strategy_reason: String,
    pub outcome: Outcome,
    /// Time the container was frozen, from freeze until the target reported it running.
    pub downtime_ms: u64,
    pub total_ms: u64,
    /// Bytes on the wire to the target (images and post-copy pages, after compression).
    pub bytes_sent: u64,
    /// What `bytes_sent` would have been without compression; equal to it when nothing was
    /// compressed (0 in reports of agents that predate compression).
    #[serde(default)]
    pub bytes_uncompressed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<BandwidthReport>,
    pub phases_ms: BTreeMap<String, u64>,
    /// What the pause was made of: the source's and the target's own steps inside the freeze,
    /// dump and restore phases, in milliseconds (`source_*`, `target_*`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub downtime_steps_ms: BTreeMap<String, u64>,
    /// The target wired the network namespace while the migration was prepared.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prewired_netns: bool,
    /// The target's restore had been parked since the prepare (Docker's start path ran outside
    /// the pause); false when it had to start over or was not parked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restore_parked: bool,
    /// The source's lazy dump left the pages in the frozen container and CRIU read each run
    /// when the target asked (`--lazy-pages-read`), so the pause did not grow with the memory
    /// by splicing all of it into pipes first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lazy_pages_read: bool,
    /// Post-copy: page bytes the source agent read from the seized tasks itself and sent on a
    /// channel of its own for the target's read-ahead, leaving CRIU's page server to the
    /// faults.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub page_reader_bytes: u64,
    /// `interface:address` the target announced (gratuitous ARP) from the container's
    /// namespace as its tasks resumed, so the clients' traffic reached them without waiting
    /// for the rest of `docker start`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub announced_at_resume: Vec<String>,
    /// CRIU locked the container's network with nftables at the dump, so its restore unlocked
    /// it in one transaction, where iptables costs five `iptables-restore` runs (~60 ms here)
    /// inside the pause. Both hosts' CRIU must be built with libnftables.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network_lock_nftables: bool,
    pub networks: Vec<NetworkReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollback_errors: Vec<ErrorInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeTransfer>,
    /// Pre-copy and hybrid: the memory rounds copied while the container ran, and why they
    /// stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_rounds: Option<MemoryRounds>,
    /// CRIU's own statistics of the final dump, which say how much of the dump step was the
    /// memory and how much the rest (descriptors, mounts, sockets). Absent for lazy dumps
    /// (post-copy, hybrid): CRIU resets the dump's counters when it starts the page server
    /// for the lazy pages, so the statistics it writes at the end hold nothing of the dump.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu_dump: Option<CriuDumpStats>,
}

/// CRIU's `stats-dump` of one dump, in microseconds and pages.
///
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CriuDumpStats {
    /// Waiting for the kernel to freeze the tasks.
    pub freezing_us: u64,
    pub frozen_us: u64,
    /// Scanning the page maps and collecting the pages into pipes, with the tasks frozen.
    pub memdump_us: u64,
    /// Writing (or sending) the collected pages.
    pub memwrite_us: u64,
    pub pages_scanned: u64,
    /// Pages written into the images.
    pub pages_written: u64,
    /// Pages left for the lazy-pages daemon to fetch.
    pub pages_lazy: u64,
    /// Pages unchanged since the parent (pre-dump round) images.
    pub pages_in_parent: u64,
}

/// The pre-dump rounds of a pre-copy or hybrid migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRounds {
    pub rounds: Vec<MemoryRound>,
    /// Why no further round ran (CRIU's page counts met a stop rule, or the round limit).
    pub stop_reason: String,
    /// Pages the final dump wrote, and pages it found unchanged since the last round, from
    /// CRIU's statistics of that dump. Absent for hybrid, whose final dump is lazy (see
    /// `Report::criu_dump`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_pages_written: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_pages_in_parent: Option<u64>,
}

/// One pre-dump round, from CRIU's own statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRound {
    pub round: u32,
    pub pages_scanned: u64,
    pub pages_written: u64,
    /// Pages unchanged since the previous round, left in its images.
    pub pages_in_parent: u64,
    /// How long the container was frozen for this round (CRIU freezes briefly to collect
    /// the dirty pages, then copies them while it runs).
    pub frozen_ms: u64,
    pub dump_ms: u64,
    pub bytes: u64,
    pub send_ms: u64,
}
