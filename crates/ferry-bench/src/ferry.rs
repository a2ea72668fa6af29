//! Running `ferry migrate` exactly as an operator would, and finding out which strategies the
//! CLI accepts and the test bed's hosts support.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ferry_proto::{Outcome, Report};
use serde::{Deserialize, Serialize};

use crate::error::BenchError;

/// Always benchmarked: the strategy every build implements.
pub const BASELINE_STRATEGY: &str = "stop-and-copy";

/// Strategy names from `ferry migrate --help` ("[possible values: auto, stop-and-copy, ...]"),
/// without `auto` (it resolves to one of the others) and with stop-and-copy first. Reading
/// the help rather than hard-coding the list means a build that adds a strategy is
/// benchmarked without touching this crate.
pub fn parse_strategies(help: &str) -> Vec<String> {
    let mut out = vec![BASELINE_STRATEGY.to_string()];
    let line = help
        .lines()
        .skip_while(|l| !l.contains("--strategy"))
        .take(4)
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(rest) = line.split("possible values:").nth(1) {
        let list = rest.split(']').next().unwrap_or("");
        for v in list.split(',').map(str::trim).filter(|v| !v.is_empty()) {
            if v != "auto" && !out.iter().any(|o| o == v) {
                out.push(v.to_string());
            }
        }
    }
    out
}

/// Asks the CLI which strategies it accepts.
pub async fn discover_strategies(ferry_exe: &Path) -> Result<Vec<String>, BenchError> {
    let step = "list the strategies `ferry migrate` accepts";
    let mut c = tokio::process::Command::new(ferry_exe);
    c.args(["migrate", "--help"])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), c.output())
        .await
        .map_err(|_| BenchError::Timeout {
            step: step.into(),
            timeout: Duration::from_secs(30),
        })?
        .map_err(|source| BenchError::Spawn {
            step: step.into(),
            cmd: format!("{} migrate --help", ferry_exe.display()),
            source,
        })?;
    Ok(parse_strategies(&String::from_utf8_lossy(&out.stdout)))
}

/// One `ferry migrate --json` run: its report (when it printed one), wall time and stderr.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FerryRun {
    pub exit_ok: bool,
    pub wall_ms: f64,
    pub report: Option<Report>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stderr_tail: String,
}

impl FerryRun {
    /// Why the migration did not happen, if it did not.
    pub fn failure(&self) -> Option<String> {
        match &self.report {
            Some(r) if r.outcome == Outcome::Migrated && self.exit_ok => None,
            Some(r) => Some(format!(
                "outcome {:?}{}",
                r.outcome,
                r.error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            )),
            None => Some(format!("no report; stderr: {}", self.stderr_tail)),
        }
    }

    /// The refusal reason when preflight turned the strategy down before changing anything.
    pub fn refused_in_preflight(&self) -> Option<String> {
        let r = self.report.as_ref()?;
        let e = r.error.as_ref()?;
        let only_preflight = r.phases_ms.keys().all(|k| k == "preflight");
        (r.outcome == Outcome::RolledBack && e.step == "preflight" && only_preflight)
            .then(|| e.message.clone())
    }
}

pub struct MigrateArgs<'a> {
    pub ferry_exe: &'a Path,
    pub container: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub tls_dir: &'a Path,
    pub strategy: &'a str,
    pub compress: ferry_proto::Compression,
    pub step_timeout_s: u64,
    pub timeout: Duration,
}

fn tail(b: &[u8], n: usize) -> String {
    let s = String::from_utf8_lossy(b);
    let s = s.trim();
    let start = s.len().saturating_sub(n);
    let start = (start..=s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// `ferry migrate <c> --from A --to B --tls-dir D --strategy S --json`, bounded by
/// `timeout` (the CLI is killed then; the agents roll back on the lost connection).
pub async fn migrate(a: &MigrateArgs<'_>) -> Result<FerryRun, BenchError> {
    let step = format!("ferry migrate {} --strategy {}", a.container, a.strategy);
    let mut c = tokio::process::Command::new(a.ferry_exe);
    c.args([
        "migrate",
        a.container,
        "--from",
        a.from,
        "--to",
        a.to,
        "--tls-dir",
    ])
    .arg(a.tls_dir)
    .args(["--strategy", a.strategy, "--compress", a.compress.as_str()])
    .args(["--json", "--step-timeout"])
    .arg(a.step_timeout_s.to_string())
    .stdin(Stdio::null())
    .kill_on_drop(true);
    let started = Instant::now();
    let out = tokio::time::timeout(a.timeout, c.output())
        .await
        .map_err(|_| BenchError::Timeout {
            step: step.clone(),
            timeout: a.timeout,
        })?
        .map_err(|source| BenchError::Spawn {
            step: step.clone(),
            cmd: format!("{} migrate", a.ferry_exe.display()),
            source,
        })?;
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok(FerryRun {
        exit_ok: out.status.success(),
        wall_ms,
        report: serde_json::from_slice(&out.stdout).ok(),
        stderr_tail: tail(&out.stderr, 2000),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELP: &str = "Usage: ferry migrate [OPTIONS] --from <FROM> --to <TO> --tls-dir <TLS_DIR> <CONTAINER>

Options:
      --from <FROM>                  Source agent, IP:PORT
      --strategy <STRATEGY>          [default: auto] [possible values: auto, stop-and-copy, pre-copy, post-copy, hybrid]
      --json                         Print one JSON report object instead of human output
";

    #[test]
    fn strategies_from_help() {
        assert_eq!(
            parse_strategies(HELP),
            ["stop-and-copy", "pre-copy", "post-copy", "hybrid"]
        );
        assert_eq!(parse_strategies("nothing useful"), ["stop-and-copy"]);
        let wrapped = "  --strategy <STRATEGY>\n          How to move memory\n          [default: auto]\n          [possible values: auto, post-copy, stop-and-copy]\n";
        assert_eq!(parse_strategies(wrapped), ["stop-and-copy", "post-copy"]);
    }

    fn run_with(report: serde_json::Value, exit_ok: bool) -> FerryRun {
        FerryRun {
            exit_ok,
            wall_ms: 1.0,
            report: Some(serde_json::from_value(report).unwrap()),
            stderr_tail: String::new(),
        }
    }

    fn report(
        outcome: &str,
        phases: serde_json::Value,
        error: Option<(&str, &str)>,
    ) -> serde_json::Value {
        let mut r = serde_json::json!({
            "migration_id": "x", "container": "c", "source": "a", "target": "b",
            "strategy": "pre-copy", "strategy_reason": "", "outcome": outcome,
            "downtime_ms": 0, "total_ms": 417, "bytes_sent": 0, "phases_ms": phases, "networks": []
        });
        if let Some((step, message)) = error {
            r["error"] = serde_json::json!({"step": step, "message": message});
        }
        r
    }

    #[test]
    fn preflight_refusal_is_recognised() {
        let refused = run_with(
            report(
                "rolled-back",
                serde_json::json!({"preflight": 416}),
                Some((
                    "preflight",
                    "strategy pre-copy is not implemented in this build",
                )),
            ),
            false,
        );
        assert_eq!(
            refused.refused_in_preflight().as_deref(),
            Some("strategy pre-copy is not implemented in this build")
        );
        assert!(refused.failure().unwrap().contains("not implemented"));

        let late = run_with(
            report(
                "rolled-back",
                serde_json::json!({"preflight": 4, "prepare": 9, "rollback": 3}),
                Some(("restore", "criu failed")),
            ),
            false,
        );
        assert_eq!(late.refused_in_preflight(), None);

        let ok = run_with(
            report("migrated", serde_json::json!({"preflight": 4}), None),
            true,
        );
        assert_eq!(ok.failure(), None);
        assert_eq!(ok.refused_in_preflight(), None);
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("héllo".as_bytes(), 4), "llo");
        assert_eq!(tail(b"  ab  ", 10), "ab");
    }
}
