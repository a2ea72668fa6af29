use std::io;
use std::path::PathBuf;
use std::time::Duration;

use ferry_testbed::TestbedError;

/// Every failure names the benchmark step it happened in ("load bench-64m-manual with 57000
/// keys", "docker checkpoint create on host a", ...), so a failed case in `bench.json` says
/// what broke without a log.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid benchmark options: {0}")]
    Options(String),
    #[error("{step}: {source}")]
    Testbed {
        step: String,
        #[source]
        source: TestbedError,
    },
    #[error("{step}: {}: {source}", path.display())]
    Io {
        step: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{step}: cannot run `{cmd}`: {source}")]
    Spawn {
        step: String,
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("{step}: `{cmd}` failed ({status}): {detail}")]
    Command {
        step: String,
        cmd: String,
        status: String,
        detail: String,
    },
    #[error("{step}: not done within {timeout:?}")]
    Timeout { step: String, timeout: Duration },
    #[error("{step}: {source}")]
    Json {
        step: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{step}: {detail}")]
    Failed { step: String, detail: String },
}

impl BenchError {
    pub(crate) fn io(step: impl Into<String>, path: impl Into<PathBuf>, source: io::Error) -> Self {
        BenchError::Io {
            step: step.into(),
            path: path.into(),
            source,
        }
    }

    pub(crate) fn testbed(step: impl Into<String>, source: TestbedError) -> Self {
        BenchError::Testbed {
            step: step.into(),
            source,
        }
    }

    pub(crate) fn failed(step: impl Into<String>, detail: impl Into<String>) -> Self {
        BenchError::Failed {
            step: step.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn json(step: impl Into<String>, source: serde_json::Error) -> Self {
        BenchError::Json {
            step: step.into(),
            source,
        }
    }
}
