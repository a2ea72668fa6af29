use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{step}: cannot start {program}: {source}")]
    Spawn {
        step: String,
        program: String,
        source: std::io::Error,
    },
    #[error("{step}: {program} did not finish within {secs} s and was killed")]
    Timeout {
        step: String,
        program: String,
        secs: u64,
        log: Vec<String>,
    },
    #[error("{step}: {program} failed ({status})")]
    Failed {
        step: String,
        program: String,
        status: String,
        log: Vec<String>,
    },
    #[error("{step}: {message}")]
    Other {
        step: String,
        message: String,
        log: Vec<String>,
    },
}

impl ToolError {
    /// The tool's own lines explaining the failure, for the operator.
    pub fn log(&self) -> &[String] {
        match self {
            ToolError::Timeout { log, .. }
            | ToolError::Failed { log, .. }
            | ToolError::Other { log, .. } => log,
            ToolError::Spawn { .. } => &[],
        }
    }
    pub fn step(&self) -> &str {
        match self {
            ToolError::Spawn { step, .. }
            | ToolError::Timeout { step, .. }
            | ToolError::Failed { step, .. }
            | ToolError::Other { step, .. } => step,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args` with null stdin, captured output, and a hard timeout (killed and reaped
/// on expiry). A non-zero exit is returned as `Ok` so callers that probe can read it; use
/// [`CmdOutput::ok_or`] to turn it into an error.
pub async fn run(
    step: &str,
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<CmdOutput, ToolError> {
    run_with_env(step, program, args, &[], timeout).await
}

/// [`run`] with extra environment variables.
pub async fn run_with_env(
    step: &str,
    program: &str,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
    timeout: Duration,
) -> Result<CmdOutput, ToolError> {
    let mut cmd = Command::new(program);
    cmd.envs(env.iter().copied());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| ToolError::Spawn {
        step: step.into(),
        program: program.into(),
        source,
    })?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(CmdOutput {
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Ok(Err(source)) => Err(ToolError::Spawn {
            step: step.into(),
            program: program.into(),
            source,
        }),
        // kill_on_drop kills the child; tokio reaps it in the background.
        Err(_) => Err(ToolError::Timeout {
            step: step.into(),
            program: program.into(),
            secs: timeout.as_secs(),
            log: vec![],
        }),
    }
}

impl CmdOutput {
    pub fn ok_or(self, step: &str, program: &str) -> Result<CmdOutput, ToolError> {
        if self.status == 0 {
            return Ok(self);
        }
        let mut log = quote_text(&self.stderr);
        if log.is_empty() {
            log = quote_text(&self.stdout);
        }
        Err(ToolError::Failed {
            step: step.into(),
            program: program.into(),
            status: format!("exit {}", self.status),
            log,
        })
    }
}

/// Most lines of a tool log an error message carries.
const MAX_QUOTED: usize = 12;

/// Picks the lines of a CRIU/runc log that say why it failed: CRIU's `Error (file:line)` lines
/// first, then runc's JSON `"level":"error"` messages, falling back to the log's last lines.
pub fn quote_text(text: &str) -> Vec<String> {
    let mut picked: Vec<String> = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() {
            continue;
        }
        if l.starts_with('{') {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                if v.get("level").and_then(|x| x.as_str()) == Some("error") {
                    if let Some(msg) = v.get("msg").and_then(|x| x.as_str()) {
                        picked.push(msg.trim().to_string());
                    }
                }
                continue;
            }
        }
        if l.contains("Error (")
            || l.starts_with("Error")
            || l.contains("FAILED")
            || l.starts_with("criu failed")
        {
            picked.push(l.to_string());
        }
    }
    if picked.is_empty() {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let from = lines.len().saturating_sub(5);
        picked = lines[from..].iter().map(|s| s.trim().to_string()).collect();
    }
    if picked.len() > MAX_QUOTED {
        let drop = picked.len() - MAX_QUOTED;
        picked.drain(..drop);
    }
    picked
}

/// [`quote_text`] of a log file; a missing file yields a line saying so.
pub fn quote_log(path: &Path) -> Vec<String> {
    match std::fs::read(path) {
        Ok(bytes) => quote_text(&String::from_utf8_lossy(&bytes)),
        Err(e) => vec![format!("(no log at {}: {e})", path.display())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_error_lines_are_quoted() {
        let log = "(00.001) Version: 4.2.1\n(00.010) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted\n(00.011) Dumping FAILED.\n";
        assert_eq!(
            quote_text(log),
            vec![
                "(00.010) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted",
                "(00.011) Dumping FAILED."
            ]
        );
    }

    #[test]
    fn runc_json_errors_are_quoted() {
        let log = "{\"level\":\"info\",\"msg\":\"x\"}\n{\"level\":\"error\",\"msg\":\"criu failed: type NOTIFY errno 0\\nlog file: /x/restore.log\",\"time\":\"t\"}\n";
        assert_eq!(
            quote_text(log),
            vec!["criu failed: type NOTIFY errno 0\nlog file: /x/restore.log"]
        );
    }

    #[test]
    fn without_error_lines_the_tail_is_quoted() {
        let log = (1..=9)
            .map(|i| format!("line {i}"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            quote_text(&log),
            vec!["line 5", "line 6", "line 7", "line 8", "line 9"]
        );
    }

    #[test]
    fn quoting_is_bounded() {
        let log = (0..100)
            .map(|i| format!("Error (x.c:{i}): y"))
            .collect::<Vec<_>>()
            .join("\n");
        let q = quote_text(&log);
        assert_eq!(q.len(), MAX_QUOTED);
        assert!(q[MAX_QUOTED - 1].contains(":99)"));
    }

    #[tokio::test]
    async fn a_hanging_tool_is_killed_at_its_timeout() {
        let err = run("probe", "sleep", &["30"], Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, ToolError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_missing_tool_is_named() {
        let err = run("probe", "/nonexistent/criu", &[], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/criu"), "{err}");
    }
}
