//! Running `nsenter`, `ip` and `iptables` with bounded time and captured diagnostics.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::NetError;

/// Generous for a single netlink or nftables transaction, yet short enough that a wedged tool
/// cannot stall a migration that is holding a container frozen.
pub(crate) const TOOL_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `program args…` inside the network namespace of `pid` (mount namespace stays the
/// host's, so the host's binaries are used) and returns its stdout.
pub(crate) async fn in_netns(
    step: &str,
    pid: u32,
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<String, NetError> {
    let pid = pid.to_string();
    let mut full = vec!["--target", pid.as_str(), "--net", "--", program];
    full.extend_from_slice(args);
    run(step, "nsenter", &full, stdin, TOOL_TIMEOUT).await
}

pub(crate) async fn run(
    step: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<String, NetError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|cause| NetError::Spawn {
            step: step.to_string(),
            command: command.clone(),
            cause,
        })?;

    let mut child_stdin = child.stdin.take();
    let mut child_stdout = child.stdout.take();
    let mut child_stderr = child.stderr.take();
    let input = stdin.unwrap_or_default();

    let finished = tokio::time::timeout(timeout, async {
        let write = async {
            if let Some(mut pipe) = child_stdin.take() {
                // A tool that exits early closes its end; its exit status and stderr explain why.
                let _ = pipe.write_all(input).await;
            }
        };
        let (_, out, err, status) = tokio::join!(
            write,
            read_all(child_stdout.as_mut()),
            read_all(child_stderr.as_mut()),
            child.wait()
        );
        (out, err, status)
    })
    .await;

    let (out, err, status) = match finished {
        Ok(done) => done,
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(NetError::Timeout {
                step: step.to_string(),
                command,
                after: timeout,
            });
        }
    };
    let status = status.map_err(|cause| NetError::Io {
        step: format!("{step}: waiting for `{command}`"),
        cause,
    })?;
    let stdout = out.map_err(|cause| NetError::Io {
        step: format!("{step}: reading stdout of `{command}`"),
        cause,
    })?;
    let stderr = err.map_err(|cause| NetError::Io {
        step: format!("{step}: reading stderr of `{command}`"),
        cause,
    })?;

    if !status.success() {
        let stderr = String::from_utf8_lossy(&stderr)
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        return Err(NetError::Tool {
            step: step.to_string(),
            command,
            status: status.to_string(),
            stderr,
        });
    }
    String::from_utf8(stdout).map_err(|_| NetError::Parse {
        step: step.to_string(),
        command,
        reason: "output is not UTF-8".to_string(),
    })
}

async fn read_all<R: tokio::io::AsyncRead + Unpin>(
    pipe: Option<&mut R>,
) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    if let Some(pipe) = pipe {
        pipe.read_to_end(&mut buf).await?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stdout_and_stdin() {
        let out = run("echo", "cat", &[], Some(b"hi\n"), TOOL_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(out, "hi\n");
    }

    #[tokio::test]
    async fn failure_quotes_stderr() {
        let err = run(
            "testing",
            "sh",
            &["-c", "echo first >&2; echo second >&2; exit 3"],
            None,
            TOOL_TIMEOUT,
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("testing: `sh -c"), "{msg}");
        assert!(
            msg.contains("exit status: 3") && msg.ends_with("stderr: first | second"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn timeout_kills_and_reaps() {
        let start = std::time::Instant::now();
        let err = run(
            "waiting",
            "sleep",
            &["30"],
            None,
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, NetError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn missing_program() {
        let err = run("x", "/nonexistent/tool", &[], None, TOOL_TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(err, NetError::Spawn { .. }), "{err}");
    }
}
