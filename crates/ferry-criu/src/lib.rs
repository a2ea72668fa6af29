//! Runs runc and CRIU for ferry: host feature checks, checkpoints of Docker-managed containers
//! through the runc that owns them (at once, or pre-copied in rounds), and the runtime wrapper
//! that gives `docker start --checkpoint` per-container CRIU options.
//!
//! Every external process gets explicit stdio, a timeout after which it is killed and reaped,
//! and on failure an error that quotes the lines of the tool's own log that say why.

pub mod checkpoint;
pub mod facts;
pub mod image;
pub mod mountinfo;
pub mod nftables;
pub mod precopy;
pub mod prewire;
pub mod proc;
pub mod runtime;

pub use checkpoint::{
    checkpoint, checkpoint_lazy, discover_runc, CheckpointOptions, LazyDump, LazyPagesDaemon,
    RuncHandle, LAZY_PAGES_READ_LINE, NFT_LOCK_LINE,
};
pub use facts::{cpuinfo_check, cpuinfo_dump, criu_facts, runc_version, CriuFacts};
pub use precopy::{
    final_dump, next_step, parse_stats_dump, pre_dump, read_stats_dump, run_precopy, DumpStats,
    Precopy, PrecopyDecision, PrecopyOptions, RoundStats, StatsError, StopReason,
};
pub use proc::{quote_log, run, CmdOutput, ToolError};
