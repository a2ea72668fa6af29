use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use ferry_agent::client::AgentClient;
use ferry_proto::{Compression, Event, Fault, MigrateRequest, Outcome, Phase, Report, Strategy};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum StrategyArg {
    Auto,
    StopAndCopy,
    PreCopy,
    PostCopy,
    Hybrid,
}

impl From<StrategyArg> for Strategy {
    fn from(s: StrategyArg) -> Strategy {
        match s {
            StrategyArg::Auto => Strategy::Auto,
            StrategyArg::StopAndCopy => Strategy::StopAndCopy,
            StrategyArg::PreCopy => Strategy::PreCopy,
            StrategyArg::PostCopy => Strategy::PostCopy,
            StrategyArg::Hybrid => Strategy::Hybrid,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressArg {
    /// Measure each stream's first chunks and compress only where zstd gains enough.
    Auto,
    On,
    Off,
}

impl From<CompressArg> for Compression {
    fn from(c: CompressArg) -> Compression {
        match c {
            CompressArg::Auto => Compression::Auto,
            CompressArg::On => Compression::On,
            CompressArg::Off => Compression::Off,
        }
    }
}

/// Clap's parser for `--bandwidth-limit`, so a bad rate stops the command before it connects.
fn parse_limit(s: &str) -> Result<u64, String> {
    ferry_transfer::parse_bandwidth_limit(s).map_err(|e| e.to_string())
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum FaultArg {
    TargetRestore,
}

#[derive(clap::Args)]
pub struct Args {
    /// Name or ID of the running container on the source host.
    container: String,
    /// Source agent, IP:PORT.
    #[arg(long)]
    from: SocketAddr,
    /// Target agent, IP:PORT (as the source agent reaches it).
    #[arg(long)]
    to: SocketAddr,
    /// The CLI's TLS directory (`DIR/client` from `ferry pki init`).
    #[arg(long)]
    tls_dir: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    strategy: StrategyArg,
    /// Print one JSON report object instead of human output.
    #[arg(long)]
    json: bool,
    /// Upper bound for each remote step, in seconds.
    #[arg(long, default_value_t = 120)]
    step_timeout: u64,
    /// Compress checkpoint images and post-copy pages with zstd (`auto`: only streams whose
    /// first chunks compress well).
    #[arg(long, value_enum, default_value = "auto")]
    compress: CompressArg,
    /// Most the source sends to the target, e.g. 50MiB/s or 400Mbit/s (0: unlimited, the
    /// default); the target holds its page requests to the same rate.
    #[arg(long, value_name = "RATE", value_parser = parse_limit)]
    bandwidth_limit: Option<u64>,
    /// Replace the content of a volume of the same name that already has content on the
    /// target (kept aside until the migration commits, put back if it rolls back).
    #[arg(long)]
    overwrite_volumes: bool,
    /// Declare an absolute host PATH (bind mounts under it) or a VOLUME name (of any driver)
    /// shared by both hosts: ferry leaves its data alone instead of refusing the container.
    /// Repeat for several.
    #[arg(long = "shared", value_name = "PATH|VOLUME")]
    shared: Vec<String>,
    /// Test hook: make the target fail in the named step, to exercise rollback.
    #[arg(long, value_enum, hide = true)]
    inject_fault: Option<FaultArg>,
}

impl Args {
    fn validate(&self) -> anyhow::Result<()> {
        if self.container.trim().is_empty() {
            bail!("container name is empty");
        }
        if self.from == self.to {
            bail!("--from and --to are the same agent ({})", self.from);
        }
        if self.step_timeout == 0 {
            bail!("--step-timeout must be at least 1 second");
        }
        for v in &self.shared {
            ferry_proto::validate_shared(v).map_err(anyhow::Error::msg)?;
        }
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            if !self.tls_dir.join(f).is_file() {
                bail!("--tls-dir {}: {f} is missing", self.tls_dir.display());
            }
        }
        Ok(())
    }
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    a.validate()?;
    let client = AgentClient::new(&a.tls_dir, Duration::from_secs(10))?;
    let req = MigrateRequest {
        container: a.container.clone(),
        target: a.to.to_string(),
        strategy: a.strategy.into(),
        step_timeout_s: a.step_timeout,
        fault: a
            .inject_fault
            .map(|FaultArg::TargetRestore| Fault::TargetRestore),
        compression: a.compress.into(),
        bandwidth_limit_bytes_per_s: a.bandwidth_limit.unwrap_or(0),
        overwrite_volumes: a.overwrite_volumes,
        shared: a.shared.clone(),
    };
    let report = drive(&client, a.from, req, a.json).await?;
    let json = a.json;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    Ok(if report.outcome == Outcome::Migrated {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Runs a migration through the source agent with live phase output (unless `json`), and
/// turns Ctrl-C into a cancellation the agent rolls back.
pub async fn drive(
    client: &AgentClient,
    from: SocketAddr,
    req: MigrateRequest,
    json: bool,
) -> anyhow::Result<Report> {
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("ferry: interrupted: rolling back");
            c2.cancel();
        }
    });
    let mut bar: Option<ProgressBar> = None;
    let mut last_phase: Option<Phase> = None;
    let strategy = req.strategy;
    let result = client
        .migrate(from, req, cancel, |ev| {
            if let Event::PhaseStarted { phase } = ev {
                last_phase = Some(*phase);
            }
            if json {
                return;
            }
            match ev {
                Event::PhaseStarted { phase } if *phase != Phase::Transfer => {
                    eprintln!("  {phase:<10} …")
                }
                Event::PhaseFinished { phase, ms } => {
                    if let Some(b) = bar.take() {
                        b.finish_and_clear();
                    }
                    eprintln!("  {phase:<10} done in {ms} ms");
                }
                Event::Progress { total, done, .. } => {
                    let b = bar.get_or_insert_with(|| {
                        let b = ProgressBar::new(*total);
                        if let Ok(style) = ProgressStyle::with_template(
                            "  transfer   [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                        ) {
                            b.set_style(style.progress_chars("=> "));
                        }
                        b
                    });
                    b.set_length(*total);
                    b.set_position(*done);
                }
                Event::Note { message } => eprintln!("  {message}"),
                _ => {}
            }
        })
        .await;
    let report = match result {
        Ok(r) => r,
        Err(e) if last_phase.is_none() => return Err(e.into()),
        Err(e) => {
            let during = last_phase
                .map(|p| format!(" during {p}"))
                .unwrap_or_default();
            let hint = match last_phase {
                Some(Phase::Restore) | Some(Phase::Commit) if strategy != Strategy::StopAndCopy => {
                    "; if the target had resumed (post-copy) it finishes on its own: check the container on the target host"
                }
                Some(Phase::Restore) | Some(Phase::Commit) => "; the target rolls back unless it had committed: check both hosts",
                _ => "; nothing was committed: the target rolls back on its own and the source resumes",
            };
            anyhow::bail!("lost the source agent {from}{during}: {e}{hint}");
        }
    };
    Ok(report)
}

pub fn print_human(r: &Report) {
    let outcome = match r.outcome {
        Outcome::Migrated => "migrated",
        Outcome::RolledBack => "rolled back",
        Outcome::InDoubt => "IN DOUBT (source kept frozen; check the target)",
        Outcome::PagesLost => {
            "PAGES LOST (post-copy: the source stopped serving pages after the target resumed)"
        }
    };
    println!("{} {} → {}: {outcome}", r.container, r.source, r.target);
    println!("  strategy {} ({})", r.strategy, r.strategy_reason);
    println!(
        "  downtime {} ms, total {} ms, {} bytes sent",
        r.downtime_ms, r.total_ms, r.bytes_sent
    );
    if let Some(line) = transfer_line(r) {
        println!("  {line}");
    }
    let phases: Vec<String> = r
        .phases_ms
        .iter()
        .map(|(k, v)| format!("{k} {v} ms"))
        .collect();
    println!("  phases: {}", phases.join(", "));
    if let Some(m) = &r.memory_rounds {
        let rounds: Vec<String> = m
            .rounds
            .iter()
            .map(|x| format!("{} pages", x.pages_written))
            .collect();
        let last = match (m.final_pages_written, m.final_pages_in_parent) {
            (Some(w), Some(p)) => {
                format!("; the final dump wrote {w} pages and found {p} unchanged")
            }
            _ => String::new(),
        };
        println!(
            "  memory rounds while running: {} ({}), stopped: {}{last}",
            m.rounds.len(),
            rounds.join(", "),
            m.stop_reason,
        );
    }
    if let Some(c) = &r.criu_dump {
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "  CRIU's final dump: {} pages scanned, {} written, {} lazy, {} in the parent; collecting them took {:.1} ms of the freeze, writing {:.1} ms",
            c.pages_scanned,
            c.pages_written,
            c.pages_lazy,
            c.pages_in_parent,
            ms(c.memdump_us),
            ms(c.memwrite_us),
        );
    }
    for v in &r.volumes {
        println!(
            "  volume {}: first pass {} bytes in {} ms while running, final pass {} bytes ({} entries) in {} ms while frozen",
            v.name,
            v.first_pass_bytes,
            v.first_pass_ms,
            v.final_pass_bytes,
            v.final_pass_entries,
            v.final_pass_ms
        );
    }
    for n in &r.networks {
        println!("  network: {}", n.note);
    }
    if let Some(e) = &r.error {
        println!("  error: {e}");
    }
    for e in &r.rollback_errors {
        println!("  rollback problem: {e}");
    }
    for w in &r.warnings {
        println!("  warning: {w}");
    }
}

/// One line on compression and pacing, when the agent reported them.
fn transfer_line(r: &Report) -> Option<String> {
    let c = r.compression.as_ref()?;
    let mut line = format!("compression {} → {}", c.policy, c.decision);
    if let Some(ratio) = c.measured_ratio {
        line.push_str(&format!(" (zstd measured {ratio:.2}×)"));
    }
    if r.bytes_uncompressed > r.bytes_sent {
        line.push_str(&format!(
            ", {} bytes before compression",
            r.bytes_uncompressed
        ));
    }
    if let Some(b) = &r.bandwidth {
        line.push_str(&format!(
            "; bandwidth limit {}, held back {} ms",
            ferry_transfer::format_rate(b.limit_bytes_per_s),
            b.paced_ms
        ));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(extra: &[&str]) -> Result<Args, String> {
        let base = [
            "ferry",
            "redis",
            "--from",
            "10.0.0.1:7070",
            "--to",
            "10.0.0.2:7070",
            "--tls-dir",
            "/x",
        ];
        Cli::try_parse_from(base.iter().chain(extra))
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn transfer_flags_default_to_auto_and_unlimited() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.compress, CompressArg::Auto);
        assert_eq!(a.bandwidth_limit, None);
    }

    #[test]
    fn transfer_flags_parse() {
        let a = parse(&["--compress", "off", "--bandwidth-limit", "400Mbit/s"]).unwrap();
        assert_eq!(Compression::from(a.compress), Compression::Off);
        assert_eq!(a.bandwidth_limit, Some(50_000_000));
        let a = parse(&["--bandwidth-limit", "0"]).unwrap();
        assert_eq!(a.bandwidth_limit, Some(0));
    }

    #[test]
    fn bad_transfer_flags_are_refused_with_the_reason() {
        let e = parse(&["--bandwidth-limit", "12 parsecs"])
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("bandwidth limit '12 parsecs': unknown unit 'parsecs'"),
            "{e}"
        );
        let e = parse(&["--compress", "max"]).err().unwrap_or_default();
        assert!(e.contains("'max'"), "{e}");
    }
}
