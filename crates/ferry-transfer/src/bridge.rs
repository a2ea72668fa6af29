//! The post-copy page tunnel: bytes both ways between a greeted channel to the peer agent and a
//! local CRIU socket (the page server on the source, the lazy-pages daemon on the target).
//!
//! CRIU speaks request/response over it, so nothing is ever held back to gather more: each read
//! from the local socket goes out at once as its own frame (compressed or not, each frame says)
//! and is flushed, and each frame from the peer is written and flushed as soon as it is whole.

use std::sync::Arc;

use bytes::BytesMut;
use ferry_proto::codec::{decode, encode};
use ferry_proto::{Compression, Frame, ProtoError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::chunk::{frame_len, ChunkDecoder, ChunkError};
use crate::pacer::Pacer;
use crate::policy::{ChunkEncoder, LinkMeter};
use crate::stats::TransferStats;

/// Largest read from the local socket, and so the largest chunk: CRIU answers a page request
/// with up to this much in one go, and bigger chunks compress better; a read never waits for
/// it to fill.
pub const READ_LEN: usize = 256 << 10;

/// Spare room kept in the receive buffer for the next read.
const RECV_RESERVE: usize = 64 << 10;

pub struct BridgeOptions {
    /// Both agents agreed on `Chunk` frames; otherwise bytes cross as a raw tunnel, as with
    /// agents that predate compression.
    pub framed: bool,
    /// Applies to what this side sends; the peer's frames say how each was encoded.
    pub compression: Compression,
    /// Paces what this side sends.
    pub pacer: Pacer,
    pub stats: Arc<TransferStats>,
}

/// Bytes one direction carried: as the local socket saw them, and on the channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionTotals {
    pub raw: u64,
    pub wire: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BridgeTotals {
    pub to_peer: DirectionTotals,
    pub from_peer: DirectionTotals,
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("{step}: {source}")]
    Frame {
        step: &'static str,
        source: ProtoError,
    },
    #[error("{step}: {source}")]
    Chunk {
        step: &'static str,
        source: ChunkError,
    },
    #[error("the peer closed the page channel in the middle of a frame ({0} bytes left over)")]
    Truncated(usize),
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> BridgeError {
    move |source| BridgeError::Io { step, source }
}

/// Runs the tunnel until both directions have ended (each end closing its side in turn, as
/// `tokio::io::copy_bidirectional` does) or one fails. `pending` holds bytes of the channel
/// already read past its greeting.
pub async fn bridge<R, L>(
    remote: R,
    pending: BytesMut,
    local: L,
    opts: BridgeOptions,
) -> Result<BridgeTotals, BridgeError>
where
    R: AsyncRead + AsyncWrite + Unpin,
    L: AsyncRead + AsyncWrite + Unpin,
{
    let (remote_rd, remote_wr) = tokio::io::split(remote);
    let (local_rd, local_wr) = tokio::io::split(local);
    let read_len = opts.pacer.chunk_len(READ_LEN);
    let up = async {
        if opts.framed {
            // A page tunnel over a link faster than zstd stays plain, where compressing would
            // only delay the page a fault waits for.
            let meter = LinkMeter::default();
            let enc = ChunkEncoder::new(opts.compression, opts.stats.clone())
                .with_link_estimate(meter.estimate());
            send_frames(local_rd, remote_wr, enc, &opts.pacer, read_len, &meter).await
        } else {
            send_raw(local_rd, remote_wr, &opts.pacer, &opts.stats, read_len).await
        }
    };
    let down = async {
        if opts.framed {
            receive_frames(remote_rd, pending, local_wr).await
        } else {
            receive_raw(remote_rd, pending, local_wr).await
        }
    };
    let (to_peer, from_peer) = tokio::try_join!(up, down)?;
    Ok(BridgeTotals { to_peer, from_peer })
}

async fn send_frames<R, W>(
    mut from: R,
    mut to: W,
    mut enc: ChunkEncoder,
    pacer: &Pacer,
    read_len: usize,
    meter: &LinkMeter,
) -> Result<DirectionTotals, BridgeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; read_len];
    let mut frame = BytesMut::new();
    let mut t = DirectionTotals::default();
    loop {
        let n = from
            .read(&mut buf)
            .await
            .map_err(io("reading from the local socket"))?;
        if n == 0 {
            enc.finish();
            to.shutdown()
                .await
                .map_err(io("closing the channel to the peer"))?;
            return Ok(t);
        }
        let payload = enc.encode(&buf[..n]).map_err(|source| BridgeError::Chunk {
            step: "encoding a chunk for the peer",
            source,
        })?;
        frame.clear();
        encode(&Frame::chunk(payload), &mut frame).map_err(|source| BridgeError::Frame {
            step: "framing a chunk for the peer",
            source,
        })?;
        let started = std::time::Instant::now();
        pacer.pace(frame.len()).await;
        to.write_all(&frame)
            .await
            .map_err(io("writing to the peer"))?;
        to.flush().await.map_err(io("writing to the peer"))?;
        meter.record(frame.len() as u64, started.elapsed(), pacer.limit());
        t.raw += n as u64;
        t.wire += frame.len() as u64;
    }
}

async fn send_raw<R, W>(
    mut from: R,
    mut to: W,
    pacer: &Pacer,
    stats: &TransferStats,
    read_len: usize,
) -> Result<DirectionTotals, BridgeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; read_len];
    let mut t = DirectionTotals::default();
    loop {
        let n = from
            .read(&mut buf)
            .await
            .map_err(io("reading from the local socket"))?;
        if n == 0 {
            to.shutdown()
                .await
                .map_err(io("closing the channel to the peer"))?;
            return Ok(t);
        }
        pacer.pace(n).await;
        to.write_all(&buf[..n])
            .await
            .map_err(io("writing to the peer"))?;
        to.flush().await.map_err(io("writing to the peer"))?;
        stats.record(n as u64, n as u64);
        t.raw += n as u64;
        t.wire += n as u64;
    }
}

async fn receive_frames<R, W>(
    mut from: R,
    pending: BytesMut,
    mut to: W,
) -> Result<DirectionTotals, BridgeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = pending;
    let mut dec = ChunkDecoder::new();
    let mut t = DirectionTotals::default();
    loop {
        while let Some(frame) = decode(&mut buf).map_err(|source| BridgeError::Frame {
            step: "reading from the peer",
            source,
        })? {
            let wire = frame_len(frame.payload.len());
            let bytes = dec
                .frame_bytes(frame)
                .map_err(|source| BridgeError::Chunk {
                    step: "decoding a chunk from the peer",
                    source,
                })?;
            to.write_all(&bytes)
                .await
                .map_err(io("writing to the local socket"))?;
            to.flush()
                .await
                .map_err(io("writing to the local socket"))?;
            t.raw += bytes.len() as u64;
            t.wire += wire;
        }
        buf.reserve(RECV_RESERVE);
        let n = from
            .read_buf(&mut buf)
            .await
            .map_err(io("reading from the peer"))?;
        if n == 0 {
            if !buf.is_empty() {
                return Err(BridgeError::Truncated(buf.len()));
            }
            to.shutdown()
                .await
                .map_err(io("closing the local socket"))?;
            return Ok(t);
        }
    }
}

async fn receive_raw<R, W>(
    mut from: R,
    pending: BytesMut,
    mut to: W,
) -> Result<DirectionTotals, BridgeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut t = DirectionTotals::default();
    if !pending.is_empty() {
        to.write_all(&pending)
            .await
            .map_err(io("writing to the local socket"))?;
        to.flush()
            .await
            .map_err(io("writing to the local socket"))?;
        t.raw += pending.len() as u64;
        t.wire += pending.len() as u64;
    }
    let mut buf = vec![0u8; READ_LEN];
    loop {
        let n = from
            .read(&mut buf)
            .await
            .map_err(io("reading from the peer"))?;
        if n == 0 {
            to.shutdown()
                .await
                .map_err(io("closing the local socket"))?;
            return Ok(t);
        }
        to.write_all(&buf[..n])
            .await
            .map_err(io("writing to the local socket"))?;
        to.flush()
            .await
            .map_err(io("writing to the local socket"))?;
        t.raw += n as u64;
        t.wire += n as u64;
    }
}

#[cfg(test)]
mod tests;
