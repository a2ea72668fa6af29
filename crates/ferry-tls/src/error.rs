use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Every failure names the step that failed and carries its cause in the message itself, so a
/// caller that only forwards `to_string()` (as the agents do over the wire) loses nothing.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid agent name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    #[error("agent name {0:?} is given more than once")]
    DuplicateName(String),

    #[error("{step} {}: {cause}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        cause: io::Error,
    },

    /// A file exists but its content is unusable; `reason` says what is wrong with it.
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },

    #[error("{step}: {cause}")]
    Generate { step: String, cause: rcgen::Error },

    #[error("{step}: {cause}")]
    Rustls {
        step: &'static str,
        cause: rustls::Error,
    },

    #[error("building the client-certificate verifier: {0}")]
    Verifier(rustls::server::VerifierBuilderError),

    #[error("connecting to {addr}: {cause}")]
    Connect { addr: SocketAddr, cause: io::Error },

    #[error("reading the peer address of an accepted connection: {0}")]
    PeerAddr(io::Error),

    #[error("TLS handshake with {peer}: {cause}")]
    Handshake { peer: SocketAddr, cause: io::Error },

    #[error("{step} with {peer} timed out after {after:?}")]
    Timeout {
        step: &'static str,
        peer: SocketAddr,
        after: Duration,
    },

    #[error("peer {peer} presented an unusable certificate: {reason}")]
    PeerIdentity { peer: SocketAddr, reason: String },
}

impl TlsError {
    pub(crate) fn io(step: &'static str, path: impl Into<PathBuf>, cause: io::Error) -> Self {
        TlsError::Io {
            step,
            path: path.into(),
            cause,
        }
    }

    pub(crate) fn bad(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        TlsError::BadFile {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn generate(step: impl Into<String>, cause: rcgen::Error) -> Self {
        TlsError::Generate {
            step: step.into(),
            cause,
        }
    }
}
