//! The state machine against fake sides: every failure point must roll back exactly what was
//! done, and the commit rule must never resume a source next to a committed target.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::{
    CriuFeatures, HostFacts, Outcome, PrepareRequest, RestoreInfo, Strategy, TargetState,
};
use tokio_util::sync::CancellationToken;

use crate::*;

type Log = Arc<Mutex<Vec<String>>>;

/// What the fake source says crossed outside the transport (post-copy pages).
const PAGE_BYTES: u64 = 7 << 20;

fn push(log: &Log, s: &str) {
    log.lock().unwrap().push(s.to_string());
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum At {
    None,
    SourcePreflight,
    Incompatible,
    Prepare,
    Freeze,
    Dump,
    Transfer,
    Settle,
    TransferHang,
    Restore,
    RestoreHang,
    CommitLostThenCommitted,
    CommitLostThenUnreachable,
    CommitLostThenRolledBack,
    CommitPagesLost,
}

fn facts(name: &str) -> HostFacts {
    HostFacts {
        agent: name.into(),
        arch: "x86_64".into(),
        criu_version: Some("4.2.1".into()),
        criu_features: CriuFeatures {
            tcp_established: true,
            uffd: true,
            uffd_noncoop: true,
            mem_dirty_track: false,
            network_lock_nftables: true,
            lazy_pages_read: true,
        },
        docker_experimental: true,
        ferry_runtime: true,
        pipe_max_size: crate::compat::PIPE_NEEDED,
        ..Default::default()
    }
}

struct FakeSource {
    log: Log,
    /// What `target_prepared` told the source about the target's network namespace.
    prewired: Arc<Mutex<Option<bool>>>,
    at: At,
    rollback_errors: usize,
    /// Pre-copy: pages each round writes; the source stops after the last one.
    rounds: Vec<u64>,
    /// Pre-copy: the round (1-based) whose pre-dump fails.
    round_fails: Option<u32>,
    rounds_taken: u32,
    /// The target said its CRIU restores an nftables lock.
    nft_lock: bool,
}

impl SourceSide for FakeSource {
    fn network_lock_nftables(&self) -> bool {
        self.nft_lock
    }
    async fn memory_round(&mut self) -> Result<Option<RoundImages>, SideError> {
        let n = self.rounds_taken + 1;
        let Some(&pages) = self.rounds.get(self.rounds_taken as usize) else {
            return Ok(None);
        };
        push(&self.log, &format!("source.round{n}"));
        if self.round_fails == Some(n) {
            return Err(SideError::failed(
                format!("precopy: pre-dump round {n}"),
                "criu failed",
            ));
        }
        self.rounds_taken = n;
        Ok(Some(RoundImages {
            images: DumpedImages {
                dir: "/nonexistent".into(),
                files: vec![ImageFile {
                    rel: format!("pre-{n}/pages-1.img"),
                    path: "/nonexistent/pages-1.img".into(),
                    size: pages * 4096,
                    mode: 0o600,
                }],
            },
            report: ferry_proto::MemoryRound {
                round: n,
                pages_written: pages,
                ..Default::default()
            },
            last: (n as usize == self.rounds.len()).then(|| "too-few-pages".to_string()),
        }))
    }
    fn dump_stats(&self) -> Option<ferry_proto::CriuDumpStats> {
        (self.rounds_taken > 0).then_some(ferry_proto::CriuDumpStats {
            pages_written: 3,
            pages_in_parent: 97,
            ..Default::default()
        })
    }
    fn target_prepared(&mut self, target: &PreparedTarget) {
        *self.prewired.lock().unwrap() = Some(target.prewired_netns);
        self.nft_lock = target.nft_lock;
    }
    async fn preflight(&mut self) -> Result<SourcePreflight, SideError> {
        push(&self.log, "source.preflight");
        if self.at == At::SourcePreflight {
            return Err(SideError::refused("preflight", "no such container: nope"));
        }
        let mut facts = facts("a");
        facts.criu_features.mem_dirty_track = !self.rounds.is_empty();
        Ok(SourcePreflight {
            facts,
            cpuinfo: Some(vec![1]),
            prepare: PrepareRequest {
                migration_id: String::new(),
                strategy: Strategy::Auto,
                transfer: Default::default(),
                container_name: "c".into(),
                image_id: "sha256:x".into(),
                image_ref: None,
                create_body: serde_json::json!({}),
                networks: vec![],
                fault: None,
                source_agent: None,
                volumes: vec![],
                overwrite_volumes: false,
                shared_paths: vec![],
                prewire_netns: true,
                page_reads: false,
            },
            networks: vec![],
            warnings: vec![],
        })
    }
    async fn freeze(&mut self, _strategy: Strategy) -> Result<(), SideError> {
        push(&self.log, "source.freeze");
        if self.at == At::Freeze {
            return Err(SideError::failed("freeze", "pause failed"));
        }
        Ok(())
    }
    async fn dump(&mut self) -> Result<DumpedImages, SideError> {
        push(&self.log, "source.dump");
        if self.at == At::Dump {
            return Err(SideError::failed("dump", "criu failed")
                .with_log(vec!["Error (criu/cr-dump.c:1): x".into()]));
        }
        Ok(DumpedImages {
            dir: "/nonexistent".into(),
            files: vec![ImageFile {
                rel: "pages-1.img".into(),
                path: "/nonexistent/pages-1.img".into(),
                size: 4096,
                mode: 0o600,
            }],
        })
    }
    async fn settle(&mut self) -> Result<(), SideError> {
        push(&self.log, "source.settle");
        if self.at == At::Settle {
            return Err(SideError::failed("settle: network lock", "iptables failed"));
        }
        Ok(())
    }
    async fn commit(&mut self) -> Result<Vec<String>, SideError> {
        push(&self.log, "source.commit");
        Ok(vec![])
    }
    fn extra_bytes_sent(&self) -> u64 {
        PAGE_BYTES
    }
    async fn abandon(&mut self) -> (Vec<String>, Vec<SideError>) {
        push(&self.log, "source.abandon");
        (vec!["source kept frozen".into()], Vec::new())
    }
    async fn rollback(&mut self) -> Vec<SideError> {
        push(&self.log, "source.rollback");
        (0..self.rollback_errors)
            .map(|i| SideError::failed(format!("rollback step {i}"), "could not"))
            .collect()
    }
}

struct FakeTarget {
    log: Log,
    at: At,
    incompatible: bool,
    /// Whether this target says it can wire a network namespace ahead.
    prewire: bool,
}

impl TargetSide for FakeTarget {
    async fn preflight(&mut self, cpuinfo: Option<Vec<u8>>) -> Result<HostFacts, SideError> {
        push(&self.log, "target.preflight");
        assert_eq!(
            cpuinfo,
            Some(vec![1]),
            "the source's cpuinfo reaches the target"
        );
        let mut f = facts("b");
        if self.incompatible {
            f.docker_experimental = false;
        }
        f.prewire_netns = self.prewire;
        Ok(f)
    }
    async fn prepare(&mut self, req: &PrepareRequest) -> Result<PreparedTarget, SideError> {
        push(&self.log, "target.prepare");
        assert_eq!(req.migration_id, "m-1");
        if self.at == At::Prepare {
            return Err(SideError::failed("prepare", "name in use"));
        }
        assert!(
            self.prewire || !req.prewire_netns,
            "prewiring is asked only of a target that offers it"
        );
        Ok(PreparedTarget {
            container_id: "cid".into(),
            prewired_netns: req.prewire_netns,
            nft_lock: self.prewire,
        })
    }
    async fn restore(&mut self) -> Result<RestoreInfo, SideError> {
        push(&self.log, "target.restore");
        match self.at {
            At::Restore => Err(SideError::failed("restore", "criu restore failed")
                .with_log(vec!["Error (criu/cr-restore.c:1)".into()])),
            At::RestoreHang => std::future::pending().await,
            _ => Ok(RestoreInfo {
                container_id: "cid".into(),
                pid: 42,
                docker_start_ms: 1,
                garp_sent: vec!["eth0".into()],
                announced_at_resume: vec![],
                steps_ms: Default::default(),
                parked: true,
            }),
        }
    }
    async fn commit(&mut self) -> Result<(), SideError> {
        push(&self.log, "target.commit");
        match self.at {
            At::CommitLostThenCommitted
            | At::CommitLostThenUnreachable
            | At::CommitLostThenRolledBack => Err(SideError::new(
                SideErrorKind::ConnectionLost,
                "commit",
                "connection reset",
            )),
            At::CommitPagesLost => Err(SideError::failed(
                "commit (target): fetch pages",
                "not every page arrived",
            )),
            _ => Ok(()),
        }
    }
    async fn rollback(&mut self) -> Result<(), SideError> {
        push(&self.log, "target.rollback");
        if self.at == At::CommitLostThenUnreachable {
            return Err(SideError::new(
                SideErrorKind::ConnectionLost,
                "rollback",
                "unreachable",
            ));
        }
        Ok(())
    }
    async fn status(&mut self) -> Result<TargetState, SideError> {
        push(&self.log, "target.status");
        match self.at {
            At::CommitLostThenCommitted => Ok(TargetState::Committed),
            At::CommitLostThenRolledBack => Ok(TargetState::RolledBack),
            At::CommitPagesLost => Ok(TargetState::PagesLost),
            _ => Err(SideError::new(
                SideErrorKind::ConnectionLost,
                "status",
                "unreachable",
            )),
        }
    }
}

struct FakeTransport {
    log: Log,
    at: At,
}

impl Transport for FakeTransport {
    async fn send_images(
        &mut self,
        images: &DumpedImages,
        progress: &ProgressFn,
    ) -> Result<u64, SideError> {
        push(&self.log, "transport.send");
        match self.at {
            At::Transfer => Err(SideError::new(
                SideErrorKind::ConnectionLost,
                "transfer",
                "broken pipe",
            )),
            At::TransferHang => std::future::pending().await,
            _ => {
                progress(images.total_bytes(), images.total_bytes());
                Ok(images.total_bytes())
            }
        }
    }
}

async fn run_with(
    at: At,
    rollback_errors: usize,
    cancel: Option<CancellationToken>,
) -> (ferry_proto::Report, Vec<String>) {
    let (report, calls, _) = run_full(at, rollback_errors, cancel, true).await;
    (report, calls)
}

/// [`run_with`], also saying whether the target offers prewiring and what the source learnt.
async fn run_full(
    at: At,
    rollback_errors: usize,
    cancel: Option<CancellationToken>,
    target_prewires: bool,
) -> (ferry_proto::Report, Vec<String>, Option<bool>) {
    let plan = Rounds {
        strategy: Strategy::Auto,
        pages: vec![],
        fails: None,
    };
    run_plan(at, rollback_errors, cancel, target_prewires, plan).await
}

/// A pre-copy set-up: the strategy asked for, the pages of each round, the round that fails.
struct Rounds {
    strategy: Strategy,
    pages: Vec<u64>,
    fails: Option<u32>,
}

async fn run_rounds(at: At, plan: Rounds) -> (ferry_proto::Report, Vec<String>) {
    let (report, calls, _) = run_plan(at, 0, None, true, plan).await;
    (report, calls)
}

async fn run_plan(
    at: At,
    rollback_errors: usize,
    cancel: Option<CancellationToken>,
    target_prewires: bool,
    plan: Rounds,
) -> (ferry_proto::Report, Vec<String>, Option<bool>) {
    let log: Log = Arc::default();
    let prewired: Arc<Mutex<Option<bool>>> = Arc::default();
    let engine = Engine::new(
        FakeSource {
            log: log.clone(),
            prewired: prewired.clone(),
            at,
            rollback_errors,
            rounds: plan.pages,
            round_fails: plan.fails,
            rounds_taken: 0,
            nft_lock: false,
        },
        FakeTarget {
            log: log.clone(),
            at,
            incompatible: at == At::Incompatible,
            prewire: target_prewires,
        },
        FakeTransport {
            log: log.clone(),
            at,
        },
        EngineOptions {
            step_timeout: Duration::from_secs(5),
            transfer_timeout: Duration::from_secs(5),
        },
    );
    let engine = match cancel {
        Some(c) => engine.with_cancel(c),
        None => engine,
    };
    let report = engine
        .run(MigrationPlan {
            migration_id: "m-1".into(),
            container: "c".into(),
            source: "a".into(),
            target: "b".into(),
            strategy: plan.strategy,
        })
        .await;
    let calls = log.lock().unwrap().clone();
    let learnt = *prewired.lock().unwrap();
    (report, calls, learnt)
}

#[tokio::test]
async fn the_source_dumps_for_a_prewired_netns_only_when_the_target_offered_one() {
    for (offers, want) in [(true, Some(true)), (false, Some(false))] {
        let (report, _, learnt) = run_full(At::None, 0, None, offers).await;
        assert_eq!(report.outcome, Outcome::Migrated);
        assert_eq!(learnt, want, "target offers prewiring: {offers}");
        assert_eq!(Some(report.prewired_netns), want, "the report says so too");
        assert_eq!(
            report.network_lock_nftables, offers,
            "the dump's lock method follows what the target can restore"
        );
        assert!(report.restore_parked);
    }
    let (_, _, learnt) = run_full(At::Prepare, 0, None, true).await;
    assert_eq!(learnt, None, "a failed prepare tells the source nothing");
}

fn calls(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

const FORWARD: &[&str] = &[
    "source.preflight",
    "target.preflight",
    "target.prepare",
    "source.freeze",
    "source.dump",
    "transport.send",
    "source.settle",
    "target.restore",
];

#[tokio::test]
async fn happy_path_walks_every_phase_in_order() {
    let (report, log) = run_with(At::None, 0, None).await;
    assert_eq!(report.outcome, Outcome::Migrated);
    let mut want = FORWARD.to_vec();
    want.extend(["target.commit", "source.commit"]);
    assert_eq!(log, calls(&want));
    assert_eq!(
        report.bytes_sent,
        4096 + PAGE_BYTES,
        "images plus the pages"
    );
    assert_eq!(report.strategy, Strategy::PostCopy);
    assert!(report.strategy_reason.starts_with("auto:"));
    for p in [
        "preflight",
        "prepare",
        "freeze",
        "dump",
        "transfer",
        "restore",
        "commit",
    ] {
        assert!(
            report.phases_ms.contains_key(p),
            "{p} missing from {:?}",
            report.phases_ms
        );
    }
    assert!(report.error.is_none());
}

#[tokio::test]
async fn failures_roll_back_exactly_what_was_done() {
    let cases: &[(At, &[&str], &str)] = &[
        (At::SourcePreflight, &["source.preflight"], "preflight"),
        (
            At::Incompatible,
            &["source.preflight", "target.preflight"],
            "preflight",
        ),
        (
            At::Prepare,
            &[
                "source.preflight",
                "target.preflight",
                "target.prepare",
                "target.rollback",
            ],
            "prepare",
        ),
        (
            At::Freeze,
            &[
                "source.preflight",
                "target.preflight",
                "target.prepare",
                "source.freeze",
                "target.rollback",
                "source.rollback",
            ],
            "freeze",
        ),
        (
            At::Dump,
            &[
                "source.preflight",
                "target.preflight",
                "target.prepare",
                "source.freeze",
                "source.dump",
                "target.rollback",
                "source.rollback",
            ],
            "dump",
        ),
        (
            At::Transfer,
            &[
                "source.preflight",
                "target.preflight",
                "target.prepare",
                "source.freeze",
                "source.dump",
                "transport.send",
                "target.rollback",
                "source.rollback",
            ],
            "transfer",
        ),
        (
            At::Restore,
            &[
                "source.preflight",
                "target.preflight",
                "target.prepare",
                "source.freeze",
                "source.dump",
                "transport.send",
                "source.settle",
                "target.restore",
                "target.rollback",
                "source.rollback",
            ],
            "restore",
        ),
        (
            At::Settle,
            &[
                "source.preflight",
                "target.preflight",
                "target.prepare",
                "source.freeze",
                "source.dump",
                "transport.send",
                "source.settle",
                "target.rollback",
                "source.rollback",
            ],
            "settle: network lock",
        ),
    ];
    for (at, want, step) in cases {
        let (report, log) = run_with(*at, 0, None).await;
        assert_eq!(report.outcome, Outcome::RolledBack, "{at:?}");
        assert_eq!(log, calls(want), "{at:?}");
        let err = report.error.expect("an error is reported");
        assert_eq!(err.step, *step, "{at:?}");
    }
}

#[tokio::test]
async fn tool_log_lines_reach_the_report() {
    let (report, _) = run_with(At::Restore, 0, None).await;
    assert_eq!(
        report.error.unwrap().tool_log,
        vec!["Error (criu/cr-restore.c:1)".to_string()]
    );
}

#[tokio::test]
async fn incompatible_target_is_refused_before_any_change_with_the_reason() {
    let (report, _) = run_with(At::Incompatible, 0, None).await;
    let err = report.error.unwrap();
    assert!(err.message.contains("experimental"), "{}", err.message);
}

#[tokio::test]
async fn lost_commit_answer_with_committed_target_finishes_the_migration() {
    let (report, log) = run_with(At::CommitLostThenCommitted, 0, None).await;
    assert_eq!(report.outcome, Outcome::Migrated);
    assert!(report.error.is_none());
    assert_eq!(
        &log[log.len() - 3..],
        &calls(&["target.commit", "target.status", "source.commit"])[..]
    );
}

#[tokio::test]
async fn lost_commit_answer_with_unreachable_target_keeps_the_source_frozen() {
    let (report, log) = run_with(At::CommitLostThenUnreachable, 0, None).await;
    assert_eq!(report.outcome, Outcome::InDoubt);
    assert!(!log.contains(&"source.rollback".to_string()));
    assert!(!log.contains(&"source.commit".to_string()));
}

#[tokio::test]
async fn lost_commit_answer_with_rolled_back_target_resumes_the_source() {
    let (report, log) = run_with(At::CommitLostThenRolledBack, 0, None).await;
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert_eq!(
        &log[log.len() - 3..],
        &calls(&["target.status", "target.rollback", "source.rollback"])[..]
    );
}

#[tokio::test]
async fn pages_lost_after_the_resume_is_its_own_outcome_and_resumes_nothing() {
    let (report, log) = run_with(At::CommitPagesLost, 0, None).await;
    assert_eq!(report.outcome, Outcome::PagesLost);
    assert_eq!(
        &log[log.len() - 3..],
        &calls(&["target.commit", "target.status", "source.abandon"])[..]
    );
    assert!(!log.contains(&"source.rollback".to_string()));
    assert!(!log.contains(&"target.rollback".to_string()));
    assert!(!log.contains(&"source.commit".to_string()));
    assert_eq!(report.error.unwrap().step, "commit (target): fetch pages");
    assert!(report.warnings.contains(&"source kept frozen".to_string()));
    assert!(
        report.bytes_sent >= PAGE_BYTES,
        "the pages that did cross count: {}",
        report.bytes_sent
    );
}

#[tokio::test]
async fn rollback_reports_its_own_failures() {
    let (report, _) = run_with(At::Restore, 2, None).await;
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert_eq!(report.rollback_errors.len(), 2);
}

#[tokio::test]
async fn cancellation_mid_transfer_rolls_back() {
    let token = CancellationToken::new();
    let t2 = token.clone();
    let handle = tokio::spawn(async move { run_with(At::TransferHang, 0, Some(t2)).await });
    tokio::task::yield_now().await;
    token.cancel();
    let (report, log) = handle.await.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert!(log.ends_with(&calls(&["target.rollback", "source.rollback"])));
    assert_eq!(report.error.unwrap().message, "cancelled by the operator");
}

#[tokio::test(start_paused = true)]
async fn a_restore_that_never_answers_times_out_and_rolls_back() {
    let (report, log) = run_with(At::RestoreHang, 0, None).await;
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert!(log.ends_with(&calls(&[
        "target.restore",
        "target.rollback",
        "source.rollback"
    ])));
    assert!(report.error.unwrap().message.contains("no answer within"));
}

#[tokio::test]
async fn pre_copy_sends_each_round_before_the_next_and_reports_them() {
    let (report, log) = run_rounds(
        At::None,
        Rounds {
            strategy: Strategy::PreCopy,
            pages: vec![5000, 300, 20],
            fails: None,
        },
    )
    .await;
    assert_eq!(report.outcome, Outcome::Migrated, "{:?}", report.error);
    assert_eq!(report.strategy, Strategy::PreCopy);
    let want = calls(&[
        "source.preflight",
        "target.preflight",
        "target.prepare",
        "source.round1",
        "transport.send",
        "source.round2",
        "transport.send",
        "source.round3",
        "transport.send",
        "source.freeze",
        "source.dump",
        "transport.send",
        "source.settle",
        "target.restore",
        "target.commit",
        "source.commit",
    ]);
    assert_eq!(log, want);
    let rounds = report.memory_rounds.expect("memory rounds in the report");
    let written: Vec<u64> = rounds.rounds.iter().map(|r| r.pages_written).collect();
    assert_eq!(written, vec![5000, 300, 20]);
    let sent: Vec<u64> = rounds.rounds.iter().map(|r| r.bytes).collect();
    assert_eq!(sent, vec![5000 * 4096, 300 * 4096, 20 * 4096]);
    assert_eq!(rounds.stop_reason, "too-few-pages");
    assert_eq!(
        (rounds.final_pages_written, rounds.final_pages_in_parent),
        (Some(3), Some(97))
    );
    assert_eq!(
        report.criu_dump.map(|c| c.pages_in_parent),
        Some(97),
        "CRIU's statistics reach the report"
    );
    assert_eq!(
        report.bytes_sent,
        5320 * 4096 + 4096 + PAGE_BYTES,
        "rounds, final images and pages all count"
    );
}

#[tokio::test]
async fn auto_with_soft_dirty_takes_rounds_then_a_lazy_final_dump() {
    let (report, log) = run_rounds(
        At::None,
        Rounds {
            strategy: Strategy::Auto,
            pages: vec![100],
            fails: None,
        },
    )
    .await;
    assert_eq!(report.outcome, Outcome::Migrated, "{:?}", report.error);
    assert_eq!(
        report.strategy,
        Strategy::Hybrid,
        "{}",
        report.strategy_reason
    );
    assert_eq!(log[3], "source.round1");
    assert_eq!(report.memory_rounds.map(|r| r.rounds.len()), Some(1));
}

#[tokio::test]
async fn a_failed_round_rolls_back_both_sides_without_freezing() {
    let (report, log) = run_rounds(
        At::None,
        Rounds {
            strategy: Strategy::PreCopy,
            pages: vec![5000, 300],
            fails: Some(2),
        },
    )
    .await;
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert_eq!(
        report.error.as_ref().map(|e| e.step.as_str()),
        Some("precopy: pre-dump round 2")
    );
    assert!(!log.iter().any(|c| c == "source.freeze"), "{log:?}");
    assert!(
        log.ends_with(&calls(&["target.rollback", "source.rollback"])),
        "{log:?}"
    );
    assert_eq!(report.downtime_ms, 0, "nothing was frozen");
}

#[tokio::test]
async fn pre_copy_without_soft_dirty_is_refused_before_any_change() {
    let (report, log) = run_rounds(
        At::None,
        Rounds {
            strategy: Strategy::PreCopy,
            pages: vec![],
            fails: None,
        },
    )
    .await;
    assert_eq!(report.outcome, Outcome::RolledBack);
    let e = report.error.expect("an error");
    assert!(
        e.message.contains("pre-copy needs soft-dirty"),
        "{}",
        e.message
    );
    assert_eq!(log, calls(&["source.preflight", "target.preflight"]));
}
