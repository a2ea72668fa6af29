//! The migration state machine and the traits its three parties implement.
//!
//! A migration walks explicit phases — preflight, prepare, freeze, dump, transfer, restore,
//! commit — and any failure before the commit point walks the rollback phase instead. The
//! source side, the target side and the image transport are traits so the same engine drives
//! real agents in production and fakes in tests (the shape of go-criu's phaul Local/Remote pair
//! and cloud-hypervisor's vm-migration).
//!
//! The commit point is the target's `Committed` answer. Before the commit request is sent the
//! target rolls itself back on any lost session, so the source may safely resume; after it was
//! sent and no answer came, the engine asks the target for its state and keeps the source
//! frozen (outcome `in-doubt`) if it cannot learn it, because resuming the source next to a
//! committed target would run the container twice.

mod compat;
mod engine;
mod side;

pub use compat::{choose_strategy, compat_problems, StrategyChoice, PIPE_NEEDED};
pub use engine::{Engine, EngineOptions, MigrationPlan};
pub use side::{
    DumpedImages, ImageFile, PreparedTarget, ProgressFn, RoundImages, SideError, SideErrorKind,
    SourcePreflight, SourceSide, TargetSide, Transport,
};

#[cfg(test)]
mod tests;
