//! Running external tools (ip, docker, nsenter) with timeouts, so a wedged daemon turns into an
//! error naming the command instead of a hung test.

use std::ffi::OsStr;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::error::TestbedError;

pub(crate) const SHORT: Duration = Duration::from_secs(15);

pub(crate) fn command<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c.stdin(Stdio::null());
    c.kill_on_drop(true);
    c
}

/// The command line as a human would type it, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let std = cmd.as_std();
    let mut s = std.get_program().to_string_lossy().into_owned();
    for a in std.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains([' ', '\'', '"']) {
            s.push_str(&format!("{a:?}"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Removes terminal colour sequences (`ESC [ ... letter`): tools and daemon logs add them even
/// when not writing to a terminal, and they make error text unreadable and unmatchable.
pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for n in chars.by_ref() {
                if n.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Keeps error messages readable when a tool dumps pages of output.
pub(crate) fn tail(bytes: &[u8], max: usize) -> String {
    let s = strip_ansi(&String::from_utf8_lossy(bytes));
    let s = s.trim();
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

fn status_text(out: &Output) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (out.status.code(), out.status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".to_string(),
    }
}

/// Runs to completion, capturing output; a timeout kills the command.
pub(crate) async fn output(
    step: &str,
    mut cmd: Command,
    input: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Output, TestbedError> {
    let desc = describe(&cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if input.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().map_err(|source| TestbedError::Spawn {
        step: step.to_string(),
        cmd: desc.clone(),
        source,
    })?;
    let feed = match (input, child.stdin.take()) {
        (Some(data), Some(mut stdin)) => Some(tokio::spawn(async move {
            let r = stdin.write_all(&data).await;
            drop(stdin);
            r
        })),
        _ => None,
    };
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(source)) => {
            return Err(TestbedError::Spawn {
                step: step.to_string(),
                cmd: desc,
                source,
            })
        }
        Err(_) => {
            return Err(TestbedError::Timeout {
                step: step.to_string(),
                cmd: desc,
                timeout,
            })
        }
    };
    if let Some(feed) = feed {
        // A write error only matters if the command also failed; its own stderr says more.
        let write_err = match feed.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let (Some(e), true) = (write_err, out.status.success()) {
            return Err(TestbedError::Unexpected {
                step: step.to_string(),
                detail: format!("`{desc}` succeeded but its input could not be written: {e}"),
            });
        }
    }
    Ok(out)
}

/// Runs and requires success; returns stdout.
pub(crate) async fn run(
    step: &str,
    cmd: Command,
    timeout: Duration,
) -> Result<String, TestbedError> {
    run_input(step, cmd, None, timeout).await
}

pub(crate) async fn run_input(
    step: &str,
    cmd: Command,
    input: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<String, TestbedError> {
    let desc = describe(&cmd);
    let out = output(step, cmd, input, timeout).await?;
    if !out.status.success() {
        let mut stderr = tail(&out.stderr, 2000);
        if stderr.is_empty() {
            stderr = tail(&out.stdout, 2000);
        }
        return Err(TestbedError::Command {
            step: step.to_string(),
            cmd: desc,
            status: status_text(&out),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip <args>` in the root namespace.
pub(crate) async fn ip(step: &str, args: &[&str]) -> Result<String, TestbedError> {
    run(step, command("ip", args), SHORT).await
}

/// `ip <args>` whose failure is expected when the object is already gone (teardown).
pub(crate) async fn ip_quiet(args: &[&str]) -> bool {
    matches!(output("teardown", command("ip", args), None, SHORT).await, Ok(o) if o.status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_quotes_awkward_args() {
        let c = command("docker", &["import", "-c", "CMD [\"a\"]", ""]);
        assert_eq!(describe(&c), "docker import -c \"CMD [\\\"a\\\"]\" \"\"");
    }

    #[test]
    fn ansi_colours_are_removed() {
        assert_eq!(
            strip_ansi("error: unexpected argument '\u{1b}[33minit\u{1b}[0m' found"),
            "error: unexpected argument 'init' found"
        );
        assert_eq!(
            tail(b"\x1b[2m2026\x1b[0m \x1b[32m INFO\x1b[0m x", 100),
            "2026  INFO x"
        );
    }

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail(b"  abc  ", 10), "abc");
        assert_eq!(tail(b"0123456789", 4), "...6789");
    }

    #[tokio::test]
    async fn run_reports_status_stderr_and_timeout() {
        let ok = run("t", command("sh", &["-c", "echo hi"]), SHORT)
            .await
            .unwrap();
        assert_eq!(ok, "hi\n");
        let e = run("t", command("sh", &["-c", "echo bad >&2; exit 3"]), SHORT)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, TestbedError::Command { status, stderr, .. } if status == "exit status 3" && stderr == "bad"),
            "{e}"
        );
        let e = run("t", command("sleep", &["5"]), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(e, TestbedError::Timeout { .. }));
        let e = run("t", command("/nonexistent/x", &[] as &[&str]), SHORT)
            .await
            .unwrap_err();
        assert!(matches!(e, TestbedError::Spawn { .. }));
        let echoed = run_input(
            "t",
            command("cat", &[] as &[&str]),
            Some(b"abc".to_vec()),
            SHORT,
        )
        .await
        .unwrap();
        assert_eq!(echoed, "abc");
    }
}
