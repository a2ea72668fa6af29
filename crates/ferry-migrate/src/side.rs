use std::future::Future;
use std::path::PathBuf;

use ferry_proto::{ErrorInfo, HostFacts, NetworkReport, PrepareRequest, RestoreInfo, TargetState};

/// Why a step failed; the engine's rollback decisions depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SideErrorKind {
    /// The side refused before changing anything (bad input, incompatible host).
    Refused,
    /// The step ran and failed.
    Failed,
    /// The step did not answer in time: its outcome on the remote side is unknown.
    Timeout,
    /// The connection to the remote side broke: its outcome is unknown.
    ConnectionLost,
    /// The operator cancelled.
    Cancelled,
}

/// A failed step: which step, what happened, and the tool log lines (CRIU, runc) that say why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{step}: {message}")]
pub struct SideError {
    pub kind: SideErrorKind,
    pub step: String,
    pub message: String,
    pub tool_log: Vec<String>,
}

impl SideError {
    pub fn new(kind: SideErrorKind, step: impl Into<String>, message: impl Into<String>) -> Self {
        SideError {
            kind,
            step: step.into(),
            message: message.into(),
            tool_log: Vec::new(),
        }
    }
    pub fn failed(step: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(SideErrorKind::Failed, step, message)
    }
    pub fn refused(step: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(SideErrorKind::Refused, step, message)
    }
    pub fn with_log(mut self, lines: Vec<String>) -> Self {
        self.tool_log = lines;
        self
    }
    /// Whether the remote side may or may not have done the step.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self.kind,
            SideErrorKind::Timeout | SideErrorKind::ConnectionLost | SideErrorKind::Cancelled
        )
    }
    pub fn info(&self) -> ErrorInfo {
        ErrorInfo {
            step: self.step.clone(),
            message: self.message.clone(),
            tool_log: self.tool_log.clone(),
        }
    }
    pub fn from_info(kind: SideErrorKind, info: ErrorInfo) -> Self {
        SideError {
            kind,
            step: info.step,
            message: info.message,
            tool_log: info.tool_log,
        }
    }
}

/// What the source learned in preflight, without changing anything.
#[derive(Debug, Clone)]
pub struct SourcePreflight {
    pub facts: HostFacts,
    /// `criu cpuinfo dump` of the source, for the target to check against its own CPU.
    pub cpuinfo: Option<Vec<u8>>,
    /// How the target should create the container (everything but the migration id filled in).
    pub prepare: PrepareRequest,
    pub networks: Vec<NetworkReport>,
    pub warnings: Vec<String>,
}

/// One file of a CRIU image set, read from `path` and written as `rel` on the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    pub rel: String,
    pub path: PathBuf,
    pub size: u64,
    pub mode: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DumpedImages {
    pub dir: PathBuf,
    pub files: Vec<ImageFile>,
}

impl DumpedImages {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// One pre-copy round the source copied while the container ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundImages {
    /// The round's CRIU images, named `pre-<round>/<file>` for the target.
    pub images: DumpedImages,
    /// CRIU's counts for the round (`bytes` and `send_ms` are the engine's to fill in).
    pub report: ferry_proto::MemoryRound,
    /// Set on the round after which the stop rules end pre-copy: why.
    pub last: Option<String>,
}

/// Progress callback: (bytes done, bytes total).
pub type ProgressFn = dyn Fn(u64, u64) + Send + Sync;

/// The host the container leaves.
pub trait SourceSide: Send {
    fn preflight(&mut self) -> impl Future<Output = Result<SourcePreflight, SideError>> + Send;
    /// Data that can be copied while the container still runs (first pass of its volumes);
    /// what changes afterwards goes with the dump.
    fn precopy(&mut self) -> impl Future<Output = Result<DumpedImages, SideError>> + Send {
        async { Ok(DumpedImages::default()) }
    }
    /// Pre-copy and hybrid: copies one more round of the container's memory while it runs
    /// (a CRIU pre-dump on top of the previous round). `None` when this source copies no
    /// memory ahead.
    fn memory_round(
        &mut self,
    ) -> impl Future<Output = Result<Option<RoundImages>, SideError>> + Send {
        async { Ok(None) }
    }
    /// CRIU's statistics of the final dump, read after `dump`. `None` for a lazy dump: CRIU
    /// resets its counters when it starts the page server.
    fn dump_stats(&self) -> Option<ferry_proto::CriuDumpStats> {
        None
    }
    /// Whether the lazy dump left the pages in the frozen tasks, read on request
    /// (`--lazy-pages-read`), rather than spliced into pipes inside the pause.
    /// The final dump locked the network with nftables (one in-process transaction) rather
    /// than iptables (an `iptables-restore` per family and step).
    fn network_lock_nftables(&self) -> bool {
        false
    }
    fn lazy_pages_read(&self) -> bool {
        false
    }
    /// Stops the container's processes and its network without losing anything; undone by
    /// `rollback`.
    fn freeze(
        &mut self,
        strategy: ferry_proto::Strategy,
    ) -> impl Future<Output = Result<(), SideError>> + Send;
    fn dump(&mut self) -> impl Future<Output = Result<DumpedImages, SideError>> + Send;
    /// What the target prepared, which shapes the dump (a network namespace the target wired
    /// ahead is dumped as external).
    fn target_prepared(&mut self, _target: &PreparedTarget) {}
    /// Finishes what the dump left running in the background (post-copy locks the source's
    /// network while its images cross) before the target may resume. A failure rolls back.
    fn settle(&mut self) -> impl Future<Output = Result<(), SideError>> + Send {
        async { Ok(()) }
    }
    /// The container now runs on the target: remove it here. Failures are warnings, since the
    /// migration itself has succeeded.
    fn commit(&mut self) -> impl Future<Output = Result<Vec<String>, SideError>> + Send;
    /// Resumes the container where it was frozen and removes every trace of the attempt.
    /// Reports each cleanup step that failed instead of stopping at the first.
    fn rollback(&mut self) -> impl Future<Output = Vec<SideError>> + Send;
    /// Post-copy whose pages were lost after the target resumed: the target's container is
    /// stopped and has run past the freeze, so resuming the source would silently undo what
    /// it did. Ends what still serves pages and keeps the source container, resumed nowhere,
    /// for the operator. Returns what it left where (for the report) and its failures.
    fn abandon(&mut self) -> impl Future<Output = (Vec<String>, Vec<SideError>)> + Send {
        async { (Vec::new(), Vec::new()) }
    }
    /// Bytes this side sent outside the transport (post-copy pages through their own tunnel).
    fn extra_bytes_sent(&self) -> u64 {
        0
    }
    /// Post-copy: page bytes the source agent read from the seized tasks itself for the
    /// target's read-ahead, rather than CRIU's page server.
    fn page_reader_bytes(&self) -> u64 {
        0
    }
    /// How each named volume travelled (first and final pass), for the report.
    fn volume_transfers(&self) -> Vec<ferry_proto::VolumeTransfer> {
        Vec::new()
    }
    /// Milliseconds of the pause spent in this side's own steps (freezing, CRIU's dump, ...),
    /// so the report can say what the downtime was made of.
    fn step_times(&self) -> std::collections::BTreeMap<String, u64> {
        Default::default()
    }
}

/// What the target made of a prepare.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreparedTarget {
    pub container_id: String,
    /// The target's restore will join a network namespace it wired beforehand.
    pub prewired_netns: bool,
    /// The target's CRIU restores an nftables network lock (the dump may take one).
    pub nft_lock: bool,
}

/// The host the container goes to.
pub trait TargetSide: Send {
    fn preflight(
        &mut self,
        cpuinfo: Option<Vec<u8>>,
    ) -> impl Future<Output = Result<HostFacts, SideError>> + Send;
    fn prepare(
        &mut self,
        req: &PrepareRequest,
    ) -> impl Future<Output = Result<PreparedTarget, SideError>> + Send;
    fn restore(&mut self) -> impl Future<Output = Result<RestoreInfo, SideError>> + Send;
    fn commit(&mut self) -> impl Future<Output = Result<(), SideError>> + Send;
    /// Removes the half-made container and every received file; Ok only when the target
    /// confirms nothing of the attempt runs there.
    fn rollback(&mut self) -> impl Future<Output = Result<(), SideError>> + Send;
    /// Asks the target, on a fresh connection if needed, what became of this migration.
    fn status(&mut self) -> impl Future<Output = Result<TargetState, SideError>> + Send;
}

/// Carries the dumped images from source to target.
pub trait Transport: Send {
    fn send_images(
        &mut self,
        images: &DumpedImages,
        progress: &ProgressFn,
    ) -> impl Future<Output = Result<u64, SideError>> + Send;
    /// Opens the channel the next `send_images` will use, so a short pause does not include
    /// its handshake. Best effort: `send_images` connects itself when this did not.
    fn warm_up(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}
