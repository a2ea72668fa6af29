use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use ferry_proto::{ErrorInfo, Event, MemoryRounds, Outcome, Phase, Report, Strategy, TargetState};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::compat::{choose_strategy, compat_problems};
/// Runs one phase on a field of the engine while the engine's other fields stay borrowable.
macro_rules! step {
    ($self:ident, $phase:expr, $limit:expr, $fut:expr) => {{
        let (res, ms) = timed(&$self.cancel, &$self.events, $phase, $limit, $fut).await;
        $self.add_phase($phase, ms);
        res
    }};
}

use crate::side::{SideError, SideErrorKind, SourceSide, TargetSide, Transport};

/// What to migrate, where, and how.
#[derive(Debug, Clone)]
pub struct MigrationPlan {
    pub migration_id: String,
    pub container: String,
    pub source: String,
    pub target: String,
    pub strategy: Strategy,
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Bound for any one step; a step that does not answer in time counts as failed.
    pub step_timeout: Duration,
    /// Bound for the image transfer, which grows with memory size.
    pub transfer_timeout: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            step_timeout: Duration::from_secs(120),
            transfer_timeout: Duration::from_secs(1800),
        }
    }
}

/// Drives one migration through its phases. Owns the three parties for the migration's life.
pub struct Engine<S, T, X> {
    source: S,
    target: T,
    transport: X,
    opts: EngineOptions,
    events: Option<UnboundedSender<Event>>,
    cancel: CancellationToken,
    phases: BTreeMap<String, u64>,
}

/// How far the migration got, which decides what rollback must undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Reached {
    Nothing,
    TargetPrepared,
    /// Pre-copy rounds have written images on the source, which its rollback removes.
    MemoryCopied,
    SourceFrozen,
    CommitRequested,
}

struct Failure {
    error: SideError,
    reached: Reached,
}

impl<S: SourceSide, T: TargetSide, X: Transport> Engine<S, T, X> {
    pub fn new(source: S, target: T, transport: X, opts: EngineOptions) -> Self {
        Engine {
            source,
            target,
            transport,
            opts,
            events: None,
            cancel: CancellationToken::new(),
            phases: BTreeMap::new(),
        }
    }

    pub fn with_events(mut self, tx: UnboundedSender<Event>) -> Self {
        self.events = Some(tx);
        self
    }

    pub fn with_cancel(mut self, token: CancellationToken) -> Self {
        self.cancel = token;
        self
    }

    fn emit(&self, ev: Event) {
        if let Some(tx) = &self.events {
            let _ = tx.send(ev);
        }
    }

    fn add_phase(&mut self, phase: Phase, ms: u64) {
        *self.phases.entry(phase.as_str().to_string()).or_insert(0) += ms;
    }

    pub async fn run(mut self, plan: MigrationPlan) -> Report {
        let span = info_span!("migration", id = %plan.migration_id, container = %plan.container);
        async move {
            let started = Instant::now();
            let mut report = Report {
                migration_id: plan.migration_id.clone(),
                container: plan.container.clone(),
                source: plan.source.clone(),
                target: plan.target.clone(),
                strategy: plan.strategy,
                strategy_reason: String::new(),
                outcome: Outcome::RolledBack,
                downtime_ms: 0,
                total_ms: 0,
                bytes_sent: 0,
                bytes_uncompressed: 0,
                compression: None,
                bandwidth: None,
                phases_ms: BTreeMap::new(),
                downtime_steps_ms: BTreeMap::new(),
                prewired_netns: false,
                restore_parked: false,
                lazy_pages_read: false,
                page_reader_bytes: 0,
                announced_at_resume: Vec::new(),
                network_lock_nftables: false,
                networks: Vec::new(),
                error: None,
                rollback_errors: Vec::new(),
                warnings: Vec::new(),
                volumes: Vec::new(),
                memory_rounds: None,
                criu_dump: None,
            };
            let mut frozen_at: Option<Instant> = None;
            let result = self.forward(&plan, &mut report, &mut frozen_at).await;
            match result {
                Ok(()) => {
                    report.outcome = Outcome::Migrated;
                    info!(downtime_ms = report.downtime_ms, "migrated");
                }
                Err(failure) => {
                    warn!(error = %failure.error, "migration failed; rolling back");
                    report.error = Some(failure.error.info());
                    report.outcome = self.rollback(failure, &mut report).await;
                    if report.outcome != Outcome::Migrated {
                        if let Some(t) = frozen_at {
                            report.downtime_ms = t.elapsed().as_millis() as u64;
                        }
                    }
                }
            }
            report.total_ms = started.elapsed().as_millis() as u64;
            report.phases_ms = std::mem::take(&mut self.phases);
            report
        }
        .instrument(span)
        .await
    }

    async fn forward(
        &mut self,
        plan: &MigrationPlan,
        report: &mut Report,
        frozen_at: &mut Option<Instant>,
    ) -> Result<(), Failure> {
        let step_to = self.opts.step_timeout;
        let fail = |reached| move |error| Failure { error, reached };

        // Preflight: both sides inspected, nothing changed yet.
        let sp = {
            step!(self, Phase::Preflight, step_to, self.source.preflight())
                .map_err(fail(Reached::Nothing))?
        };
        let tf = {
            let cpuinfo = sp.cpuinfo.clone();
            step!(
                self,
                Phase::Preflight,
                step_to,
                self.target.preflight(cpuinfo)
            )
            .map_err(fail(Reached::Nothing))?
        };
        report.networks = sp.networks.clone();
        report.warnings.extend(sp.warnings.iter().cloned());
        report.warnings.extend(
            tf.warnings
                .iter()
                .map(|w| format!("target {}: {w}", tf.agent)),
        );
        let problems = compat_problems(&sp.facts, &tf);
        if !problems.is_empty() {
            return Err(Failure {
                error: SideError::refused(
                    "preflight",
                    format!(
                        "hosts cannot migrate this container: {}",
                        problems.join("; ")
                    ),
                ),
                reached: Reached::Nothing,
            });
        }
        let choice = choose_strategy(plan.strategy, &sp.facts, &tf).map_err(|why| Failure {
            error: SideError::refused("preflight", why),
            reached: Reached::Nothing,
        })?;
        report.strategy = choice.strategy;
        report.strategy_reason = choice.reason;
        self.emit(Event::Note {
            message: format!("strategy {}: {}", report.strategy, report.strategy_reason),
        });

        let mut prepare = sp.prepare.clone();
        prepare.migration_id = plan.migration_id.clone();
        prepare.strategy = report.strategy;
        prepare.prewire_netns &= tf.prewire_netns;
        let prepared = {
            // A prepare whose answer was lost may have created the container: roll it back too.
            step!(self, Phase::Prepare, step_to, self.target.prepare(&prepare))
                .map_err(fail(Reached::TargetPrepared))?
        };
        self.source.target_prepared(&prepared);
        report.prewired_netns = prepared.prewired_netns;

        let pre = step!(self, Phase::Precopy, step_to, self.source.precopy())
            .map_err(fail(Reached::TargetPrepared))?;
        if !pre.files.is_empty() {
            let limit = self.opts.transfer_timeout;
            let (cancel, events) = (self.cancel.clone(), self.events.clone());
            let no_progress = |_: u64, _: u64| {};
            let fut = self.transport.send_images(&pre, &no_progress);
            let (res, ms) = timed(&cancel, &events, Phase::Precopy, limit, fut).await;
            self.add_phase(Phase::Precopy, ms);
            report.bytes_sent += res.map_err(fail(Reached::TargetPrepared))?;
        }
        if report.strategy.memory_rounds() {
            let rounds = self.memory_rounds().await?;
            report.bytes_sent += rounds.rounds.iter().map(|r| r.bytes).sum::<u64>();
            report.memory_rounds = Some(rounds);
        }
        if report.strategy.lazy_pages() {
            // Only where the dump is short: a channel left idle through a long stop-and-copy
            // dump could outlive the target's wait for its first file.
            self.transport.warm_up().await;
        }
        {
            *frozen_at = Some(Instant::now());
            step!(
                self,
                Phase::Freeze,
                step_to,
                self.source.freeze(report.strategy)
            )
            .map_err(fail(Reached::SourceFrozen))?;
        }
        let images = {
            step!(self, Phase::Dump, step_to, self.source.dump())
                .map_err(fail(Reached::SourceFrozen))?
        };
        report.lazy_pages_read = self.source.lazy_pages_read();
        report.network_lock_nftables = self.source.network_lock_nftables();
        if let Some(st) = self.source.dump_stats() {
            report.criu_dump = Some(st);
            if let Some(rounds) = report.memory_rounds.as_mut() {
                rounds.final_pages_written = Some(st.pages_written);
                rounds.final_pages_in_parent = Some(st.pages_in_parent);
            }
        }
        let total = images.total_bytes();
        self.emit(Event::Progress {
            phase: Phase::Transfer,
            done: 0,
            total,
        });
        {
            let events = self.events.clone();
            let progress = move |done: u64, total: u64| {
                if let Some(tx) = &events {
                    let _ = tx.send(Event::Progress {
                        phase: Phase::Transfer,
                        done,
                        total,
                    });
                }
            };
            let limit = self.opts.transfer_timeout;
            let (cancel, events) = (self.cancel.clone(), self.events.clone());
            let fut = self.transport.send_images(&images, &progress);
            let (res, ms) = timed(&cancel, &events, Phase::Transfer, limit, fut).await;
            self.add_phase(Phase::Transfer, ms);
            let sent = res.map_err(fail(Reached::SourceFrozen))?;
            report.bytes_sent += sent;
        }
        {
            step!(self, Phase::Transfer, step_to, self.source.settle())
                .map_err(fail(Reached::SourceFrozen))?;
        }
        let restored = {
            step!(self, Phase::Restore, step_to, self.target.restore())
                .map_err(fail(Reached::SourceFrozen))?
        };
        if let Some(t) = frozen_at {
            report.downtime_ms = t.elapsed().as_millis() as u64;
        }
        report.restore_parked = restored.parked;
        report.announced_at_resume = restored.announced_at_resume.clone();
        report.downtime_steps_ms = self.source.step_times();
        report.downtime_steps_ms.extend(
            restored
                .steps_ms
                .iter()
                .map(|(k, v)| (format!("target_{k}"), *v)),
        );
        if restored.garp_sent.is_empty() {
            report
                .warnings
                .push("target sent no gratuitous ARP (no L2 address to announce)".into());
        }

        {
            step!(self, Phase::Commit, step_to, self.target.commit())
                .map_err(fail(Reached::CommitRequested))?;
        }
        let source_commit = { step!(self, Phase::Commit, step_to, self.source.commit()) };
        report.bytes_sent += self.source.extra_bytes_sent();
        report.page_reader_bytes = self.source.page_reader_bytes();
        report.volumes = self.source.volume_transfers();
        match source_commit {
            Ok(w) => report.warnings.extend(w),
            Err(e) => report
                .warnings
                .push(format!("migrated, but the source could not clean up: {e}")),
        }
        Ok(())
    }

    /// Pre-copy rounds while the container runs, each round's images sent before the next
    /// starts, until the source's stop rules end them. Every round is a pre-dump: nothing is
    /// frozen for longer than CRIU's page collection, so a failure here rolls back only the
    /// target.
    async fn memory_rounds(&mut self) -> Result<MemoryRounds, Failure> {
        let limit = self.opts.transfer_timeout;
        let fail = |error| Failure {
            error,
            reached: Reached::MemoryCopied,
        };
        let mut out = MemoryRounds::default();
        loop {
            let round =
                step!(self, Phase::Precopy, limit, self.source.memory_round()).map_err(fail)?;
            let Some(mut round) = round else {
                if out.rounds.is_empty() {
                    return Err(fail(SideError::failed(
                        "precopy",
                        "the source copied no memory round for a strategy that needs them",
                    )));
                }
                out.stop_reason = "the source ended its rounds".into();
                break;
            };
            let (cancel, events) = (self.cancel.clone(), self.events.clone());
            let no_progress = |_: u64, _: u64| {};
            let fut = self.transport.send_images(&round.images, &no_progress);
            let (res, ms) = timed(&cancel, &events, Phase::Precopy, limit, fut).await;
            self.add_phase(Phase::Precopy, ms);
            round.report.bytes = res.map_err(fail)?;
            round.report.send_ms = ms;
            let r = &round.report;
            info!(
                round = r.round,
                pages_written = r.pages_written,
                pages_in_parent = r.pages_in_parent,
                bytes = r.bytes,
                "memory round sent"
            );
            self.emit(Event::Note {
                message: format!(
                    "memory round {}: {} pages copied ({} unchanged since the round before), {} bytes sent in {} ms",
                    r.round, r.pages_written, r.pages_in_parent, r.bytes, ms
                ),
            });
            out.rounds.push(round.report);
            if let Some(why) = round.last {
                out.stop_reason = why;
                break;
            }
        }
        Ok(out)
    }

    /// Undoes what `reached` says was done. Returns the outcome: rolled back, or — when the
    /// commit was requested and the target's state cannot be learned — in doubt.
    async fn rollback(&mut self, failure: Failure, report: &mut Report) -> Outcome {
        if failure.reached == Reached::Nothing {
            return Outcome::RolledBack;
        }
        self.emit(Event::PhaseStarted {
            phase: Phase::Rollback,
        });
        let started = Instant::now();
        let step_to = self.opts.step_timeout;
        let outcome = async {
            if failure.reached == Reached::CommitRequested {
                match tokio::time::timeout(step_to, self.target.status()).await {
                    Ok(Ok(TargetState::Committed)) => {
                        info!("target committed although its answer was lost: finishing on the source");
                        report.error = None;
                        match tokio::time::timeout(step_to, self.source.commit()).await {
                            Ok(Ok(w)) => report.warnings.extend(w),
                            Ok(Err(e)) => report.warnings.push(format!("migrated, but the source could not clean up: {e}")),
                            Err(_) => report.warnings.push("migrated, but the source cleanup timed out".into()),
                        }
                        return Outcome::Migrated;
                    }
                    Ok(Ok(TargetState::PagesLost)) => {
                        warn!("post-copy lost pages after the target resumed: nothing to resume");
                        report.bytes_sent += self.source.extra_bytes_sent();
                        let errs = tokio::time::timeout(step_to, self.source.abandon()).await;
                        match errs {
                            Ok((notes, errs)) => {
                                report.warnings.extend(notes);
                                report.rollback_errors.extend(errs.iter().map(|e| e.info()))
                            }
                            Err(_) => report.rollback_errors.push(ErrorInfo {
                                step: "abandon: source".into(),
                                message: format!("no answer within {} s", step_to.as_secs()),
                                tool_log: vec![],
                            }),
                        }
                        return Outcome::PagesLost;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        report.rollback_errors.push(e.info());
                        return Outcome::InDoubt;
                    }
                    Err(_) => {
                        report.rollback_errors.push(ErrorInfo {
                            step: "rollback: target status".into(),
                            message: format!("no answer within {} s", step_to.as_secs()),
                            tool_log: vec![],
                        });
                        return Outcome::InDoubt;
                    }
                }
            }
            let target_res = tokio::time::timeout(step_to, self.target.rollback()).await;
            let target_ok = match target_res {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    report.rollback_errors.push(e.info());
                    false
                }
                Err(_) => {
                    report.rollback_errors.push(ErrorInfo {
                        step: "rollback: target".into(),
                        message: format!("no answer within {} s", step_to.as_secs()),
                        tool_log: vec![],
                    });
                    false
                }
            };
            if !target_ok && failure.reached == Reached::CommitRequested {
                return Outcome::InDoubt;
            }
            // Without a commit request the target rolls itself back when the session ends, so
            // resuming the source is safe even when the target could not confirm.
            if failure.reached >= Reached::MemoryCopied {
                match tokio::time::timeout(step_to, self.source.rollback()).await {
                    Ok(errs) => report.rollback_errors.extend(errs.iter().map(|e| e.info())),
                    Err(_) => report.rollback_errors.push(ErrorInfo {
                        step: "rollback: source".into(),
                        message: format!("no answer within {} s", step_to.as_secs()),
                        tool_log: vec![],
                    }),
                }
            }
            Outcome::RolledBack
        }
        .instrument(info_span!("phase", name = "rollback"))
        .await;
        let ms = started.elapsed().as_millis() as u64;
        self.phases.insert(Phase::Rollback.as_str().into(), ms);
        self.emit(Event::PhaseFinished {
            phase: Phase::Rollback,
            ms,
        });
        outcome
    }
}

/// Runs one phase's future: announced, timed, bounded by `limit`, abandoned on cancellation.
async fn timed<R>(
    cancel: &CancellationToken,
    events: &Option<UnboundedSender<Event>>,
    phase: Phase,
    limit: Duration,
    fut: impl Future<Output = Result<R, SideError>>,
) -> (Result<R, SideError>, u64) {
    if let Some(tx) = events {
        let _ = tx.send(Event::PhaseStarted { phase });
    }
    let started = Instant::now();
    let res = async {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(SideError::new(SideErrorKind::Cancelled, phase.as_str(), "cancelled by the operator")),
            r = tokio::time::timeout(limit, fut) => match r {
                Ok(r) => r,
                Err(_) => Err(SideError::new(SideErrorKind::Timeout, phase.as_str(), format!("no answer within {} s", limit.as_secs()))),
            },
        }
    }
    .instrument(info_span!("phase", name = phase.as_str()))
    .await;
    let ms = started.elapsed().as_millis() as u64;
    if let Some(tx) = events {
        let _ = tx.send(Event::PhaseFinished { phase, ms });
    }
    (res, ms)
}
