//! The one error type of this crate.
//!
//! Every variant that comes from talking to the daemon names the call (`method`, `path` with its
//! query) because a migration makes dozens of calls against two daemons, and "404 No such
//! container" is useless in a log without knowing which call on which side said it.

use std::time::Duration;

/// Errors from parsing a Docker host, talking to the daemon, or reading `docker inspect` data.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The host string (`DOCKER_HOST` or an argument) could not be understood.
    #[error("invalid Docker host {host:?}: {reason}")]
    InvalidHost { host: String, reason: String },

    /// A scheme the docker CLI knows but ferry does not speak (ssh://, npipe://, fd://, TLS).
    #[error("unsupported Docker host {host:?}: scheme {scheme:?} is not supported (use unix:///path or tcp://host:port with plain HTTP)")]
    UnsupportedScheme { host: String, scheme: String },

    /// The socket could not be opened (daemon down, wrong path, permissions).
    #[error("{method} {path}: cannot connect to the Docker daemon at {endpoint}: {source}")]
    Connect {
        method: String,
        path: String,
        endpoint: String,
        #[source]
        source: std::io::Error,
    },

    /// The HTTP exchange broke after the socket was open.
    #[error("{method} {path}: HTTP exchange with {endpoint} failed: {source}")]
    Http {
        method: String,
        path: String,
        endpoint: String,
        #[source]
        source: hyper::Error,
    },

    /// The response body could not be read whole (connection dropped, or larger than we accept).
    #[error("{method} {path}: reading the daemon's answer failed: {source}")]
    Body {
        method: String,
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// No complete answer in time. Docker calls hang rather than fail when the daemon is wedged
    /// (e.g. containerd stuck on a checkpoint), so every call has a deadline.
    #[error("{method} {path}: no complete answer from {endpoint} within {after:?}")]
    Timeout {
        method: String,
        path: String,
        endpoint: String,
        after: Duration,
    },

    /// The daemon answered with an error status; `message` is its `{"message": ...}` (or raw body).
    #[error("{method} {path}: Docker daemon answered {status}: {message}")]
    Daemon {
        method: String,
        path: String,
        status: u16,
        message: String,
    },

    /// The daemon's answer was not the JSON we expected.
    #[error("{method} {path}: cannot decode the daemon's answer: {source}")]
    Decode {
        method: String,
        path: String,
        #[source]
        source: serde_json::Error,
    },

    /// The daemon's answer was JSON but lacked something we need.
    #[error("{method} {path}: unexpected answer: {detail}")]
    Unexpected {
        method: String,
        path: String,
        detail: String,
    },

    /// The request could not even be built (bad characters in a header or URI).
    #[error("{method} {path}: cannot build the request: {source}")]
    Request {
        method: String,
        path: String,
        #[source]
        source: hyper::http::Error,
    },

    /// The daemon's API range and ours do not overlap.
    #[error("Docker {daemon_version} offers API {daemon_api} (minimum {daemon_min}); ferry needs API {needed_min} or newer and speaks at most {ferry_max}")]
    UnsupportedApiVersion {
        daemon_version: String,
        daemon_api: String,
        daemon_min: String,
        needed_min: String,
        ferry_max: String,
    },

    /// A version string that is not `MAJOR.MINOR`.
    #[error("invalid API version {0:?}: expected MAJOR.MINOR such as 1.44")]
    BadApiVersion(String),

    /// `docker inspect` data lacks a field or has it in a shape we cannot use.
    #[error("container inspect data: {field}: {problem}")]
    BadInspect { field: String, problem: String },

    /// `wait_running`: the container stopped (or never started) instead of running.
    #[error("container {id} is not running: status {status}, exit code {exit_code}{}", if error.is_empty() { String::new() } else { format!(", error: {error}") })]
    NotRunning {
        id: String,
        status: String,
        exit_code: i64,
        error: String,
    },

    /// `wait_running`: the container was still not running at the deadline.
    #[error("container {id} was not running within {after:?} (last status {status})")]
    WaitTimeout {
        id: String,
        after: Duration,
        status: String,
    },

    /// The container went away while we waited for it.
    #[error("container {id} disappeared while waiting for it to run")]
    Vanished { id: String },
}

impl DockerError {
    /// The HTTP status the daemon answered, if this error is a daemon answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            DockerError::Daemon { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True if the daemon said 404 (no such container/image/network/...).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    pub(crate) fn bad_inspect(field: impl Into<String>, problem: impl Into<String>) -> Self {
        DockerError::BadInspect {
            field: field.into(),
            problem: problem.into(),
        }
    }
}
