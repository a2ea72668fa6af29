use std::io;
use std::time::Duration;

/// Every failure names the step and carries its cause in the message itself, so a caller that
/// only forwards `to_string()` (as the agents do over the wire) still says why.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{step}: cannot run `{command}`: {cause}")]
    Spawn {
        step: String,
        command: String,
        cause: io::Error,
    },

    /// The tool ran and failed; `stderr` holds its own lines, which say why.
    #[error(
        "{step}: `{command}` failed ({status}); stderr: {}",
        quote_lines(stderr)
    )]
    Tool {
        step: String,
        command: String,
        status: String,
        stderr: Vec<String>,
    },

    #[error("{step}: `{command}` did not finish within {after:?} and was killed")]
    Timeout {
        step: String,
        command: String,
        after: Duration,
    },

    #[error("{step}: cannot understand the output of `{command}`: {reason}")]
    Parse {
        step: String,
        command: String,
        reason: String,
    },

    #[error("invalid interface name {name:?}: {reason}")]
    InvalidInterface { name: String, reason: &'static str },

    #[error("{step}: interface {iface:?} does not exist in the network namespace of pid {pid}")]
    NoSuchInterface {
        step: String,
        pid: u32,
        iface: String,
    },

    #[error("{step}: {cause}")]
    Io { step: String, cause: io::Error },
}

fn quote_lines(lines: &[String]) -> String {
    if lines.is_empty() {
        "(empty)".to_string()
    } else {
        lines.join(" | ")
    }
}
