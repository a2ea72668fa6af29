use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Every failure names the step that failed (e.g. "start dockerd on host a") and its cause,
/// so a broken test bed can be diagnosed from the error alone.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("{step}: cannot run `{cmd}`: {source}")]
    Spawn {
        step: String,
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("{step}: `{cmd}` failed ({status}): {stderr}")]
    Command {
        step: String,
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{step}: `{cmd}` did not finish within {timeout:?}")]
    Timeout {
        step: String,
        cmd: String,
        timeout: Duration,
    },
    #[error("{step}: {}: {source}", path.display())]
    Io {
        step: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{step}: {}: {source}", path.display())]
    Json {
        step: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{step}: {what} not ready after {waited:?}: {detail}")]
    NotReady {
        step: String,
        what: String,
        waited: Duration,
        detail: String,
    },
    #[error("{step}: {detail}")]
    Unexpected { step: String, detail: String },
    #[error("{step}: precondition not met: {detail}")]
    Precondition { step: String, detail: String },
    #[error("no host named {0:?} in the test bed")]
    UnknownHost(String),
}

impl TestbedError {
    pub(crate) fn io(step: impl Into<String>, path: impl Into<PathBuf>, source: io::Error) -> Self {
        TestbedError::Io {
            step: step.into(),
            path: path.into(),
            source,
        }
    }

    pub(crate) fn unexpected(step: impl Into<String>, detail: impl Into<String>) -> Self {
        TestbedError::Unexpected {
            step: step.into(),
            detail: detail.into(),
        }
    }
}
