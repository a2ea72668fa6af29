//! A framed, message-level view of one TLS connection, with a deadline on every receive.

use std::time::Duration;

use bytes::Bytes;
use ferry_migrate::{SideError, SideErrorKind};
use ferry_proto::{ErrorInfo, Frame, FrameCodec, FrameKind, Message, ProtoError};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("no message within {0} s")]
    Timeout(u64),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("peer reported {0}")]
    Remote(ErrorInfo),
    #[error("unexpected message from peer: {0}")]
    Unexpected(String),
}

impl ConnError {
    /// Maps a transport failure onto the engine's vocabulary: anything but an answered error
    /// leaves the remote step's outcome unknown.
    pub fn into_side(self, step: &str) -> SideError {
        match self {
            ConnError::Remote(info) => SideError::from_info(SideErrorKind::Failed, info),
            ConnError::Timeout(s) => SideError::new(
                SideErrorKind::Timeout,
                step,
                format!("no answer within {s} s"),
            ),
            ConnError::Unexpected(m) => SideError::failed(step, format!("unexpected answer: {m}")),
            other => SideError::new(SideErrorKind::ConnectionLost, step, other.to_string()),
        }
    }
}

pub struct Conn<S> {
    framed: Framed<S, FrameCodec>,
}

/// Short description of a message for error text, without dumping payloads.
pub fn describe(m: &Message) -> String {
    let s = serde_json::to_string(m).unwrap_or_default();
    let mut short: String = s.chars().take(160).collect();
    if s.len() > short.len() {
        short.push('…');
    }
    short
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S) -> Self {
        Conn {
            framed: Framed::new(stream, FrameCodec),
        }
    }

    /// The raw stream and any bytes already read past the last frame, for channels that switch
    /// from messages to a plain byte tunnel after the greeting.
    pub fn into_parts(self) -> (S, bytes::BytesMut) {
        let parts = self.framed.into_parts();
        (parts.io, parts.read_buf)
    }

    pub async fn send(&mut self, m: &Message) -> Result<(), ConnError> {
        self.framed.send(Frame::control(m)?).await?;
        Ok(())
    }

    pub async fn send_data(&mut self, data: Bytes) -> Result<(), ConnError> {
        self.framed.feed(Frame::data(data)).await?;
        Ok(())
    }

    /// Queues a data or chunk frame; like [`Conn::send_data`], flushed by the next `send`.
    pub async fn feed_frame(&mut self, frame: Frame) -> Result<(), ConnError> {
        self.framed.feed(frame).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), ConnError> {
        self.framed.flush().await?;
        Ok(())
    }

    pub async fn recv_frame(&mut self, timeout: Duration) -> Result<Frame, ConnError> {
        match tokio::time::timeout(timeout, self.framed.next()).await {
            Err(_) => Err(ConnError::Timeout(timeout.as_secs())),
            Ok(None) => Err(ConnError::Closed),
            Ok(Some(r)) => Ok(r?),
        }
    }

    /// Next control message; a peer's `Error` becomes `ConnError::Remote`.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Message, ConnError> {
        let f = self.recv_frame(timeout).await?;
        if f.kind != FrameKind::Control {
            return Err(ConnError::Proto(ProtoError::UnexpectedData));
        }
        match f.into_message()? {
            Message::Error(info) => Err(ConnError::Remote(info)),
            m => Ok(m),
        }
    }

    /// Sends `m` and returns the answer.
    pub async fn call(&mut self, m: &Message, timeout: Duration) -> Result<Message, ConnError> {
        self.send(m).await?;
        self.recv(timeout).await
    }
}

/// Tunnels bytes both ways between a greeted channel and a local socket until both sides end:
/// as `Chunk` frames when both agents agreed on them, else raw (see `ferry_transfer::bridge`).
pub async fn bridge<S, T>(
    conn: Conn<S>,
    local: T,
    opts: ferry_transfer::BridgeOptions,
) -> Result<ferry_transfer::BridgeTotals, ferry_transfer::BridgeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (remote, pending) = conn.into_parts();
    ferry_transfer::bridge(remote, pending, local, opts).await
}
