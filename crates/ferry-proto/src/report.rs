//! What a migration tells its caller while it runs ([`Event`]) and when it ends ([`Report`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::msg::{ErrorInfo, Strategy};

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    pub bytes_sent: u64,
    pub phases_ms: BTreeMap<String, u64>,
    pub networks: Vec<NetworkReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollback_errors: Vec<ErrorInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeTransfer>,
}
