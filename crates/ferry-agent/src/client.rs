//! What the CLI uses to talk to agents.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::{Event, HostFacts, Message, MigrateRequest, Purpose, Report};
use tokio_util::sync::CancellationToken;

use crate::conn::ConnError;
use crate::target::dial;
use crate::AgentError;

pub struct AgentClient {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl AgentClient {
    pub fn new(tls_dir: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let id = ferry_tls::load_identity(tls_dir)?;
        Ok(AgentClient {
            tls: ferry_tls::client_config(&id)?,
            timeout,
        })
    }

    pub async fn check(
        &self,
        addr: SocketAddr,
        cpuinfo: Option<Vec<u8>>,
    ) -> Result<HostFacts, AgentError> {
        let mut conn = dial(addr, self.tls.clone(), Purpose::Cli, self.timeout).await?;
        match conn
            .call(&Message::Check { cpuinfo }, Duration::from_secs(120))
            .await
        {
            Ok(Message::CheckReply(f)) => Ok(f),
            Ok(other) => Err(ConnError::Unexpected(crate::conn::describe(&other)).into()),
            Err(ConnError::Remote(e)) => Err(AgentError::Remote(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs a migration on the source agent, calling `on_event` for each progress event. When
    /// `cancel` fires the agent is asked to stop (it rolls back) and its report still arrives.
    pub async fn migrate(
        &self,
        source: SocketAddr,
        req: MigrateRequest,
        cancel: CancellationToken,
        mut on_event: impl FnMut(&Event),
    ) -> Result<Report, AgentError> {
        let mut conn = dial(source, self.tls.clone(), Purpose::Cli, self.timeout).await?;
        conn.send(&Message::Migrate(req)).await?;
        let mut cancel_sent = false;
        loop {
            let next = tokio::select! {
                m = conn.recv(Duration::from_secs(86400)) => m,
                _ = cancel.cancelled(), if !cancel_sent => {
                    cancel_sent = true;
                    conn.send(&Message::Cancel).await?;
                    continue;
                }
            };
            match next {
                Ok(Message::Event(ev)) => on_event(&ev),
                Ok(Message::Report(r)) => return Ok(*r),
                Ok(other) => {
                    return Err(ConnError::Unexpected(crate::conn::describe(&other)).into())
                }
                Err(ConnError::Remote(e)) => return Err(AgentError::Remote(e)),
                Err(e) => return Err(e.into()),
            }
        }
    }
}
