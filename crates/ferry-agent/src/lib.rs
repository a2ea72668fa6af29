//! The ferry agent: one per Docker host. It answers `check`, drives migrations of its own
//! containers (the source side, with the engine of `ferry-migrate`), and receives containers
//! from other agents (the target side). Every connection is mutually authenticated TLS.

pub mod client;
pub mod conn;
pub mod freezer;
pub mod host;
pub mod logs;
pub mod server;
pub mod source;
pub mod target;
pub mod upload;
pub mod userns;
pub mod volumes;

pub use server::{serve, AgentOptions};

/// Name of the runc-wrapping runtime the target restores through (see `ferry_criu::runtime`).
pub const FERRY_RUNTIME: &str = "ferry";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent setup: {0}")]
    Setup(String),
    #[error("tls: {0}")]
    Tls(#[from] ferry_tls::TlsError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Conn(#[from] conn::ConnError),
    #[error("{0}")]
    Remote(ferry_proto::ErrorInfo),
}

/// A short random id for migrations and scratch directories.
pub fn new_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("{n:016x}")
}
