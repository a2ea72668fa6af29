//! Sends image files on an `Images` channel, compressed and paced as the migration asks.
//!
//! Each chunk is hashed and encoded on a blocking thread while the previous one is written to
//! the channel, so zstd (and SHA-256) overlap the network instead of adding to it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use ferry_migrate::SideError;
use ferry_proto::{Compression, Frame, FrameKind, TransferSettings};
use ferry_transfer::{ChunkEncoder, ChunkError, Pacer, TransferStats};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::conn::{Conn, ConnError};

/// Chunk size of image streams: large enough to keep TLS records full and give zstd context,
/// far below the frame limit.
pub const CHUNK: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: encoding a chunk: {source}")]
    Encode { path: PathBuf, source: ChunkError },
    #[error("{path}: the encoding thread failed: {message}")]
    Worker { path: PathBuf, message: String },
    #[error("{0}")]
    Send(#[from] ConnError),
}

impl UploadError {
    pub fn into_side(self, step: &str) -> SideError {
        match self {
            UploadError::Send(e) => e.into_side(step),
            other => SideError::failed(step, other.to_string()),
        }
    }
}

/// One file as it went: its SHA-256, its size and the bytes it took on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSent {
    pub sha256: String,
    pub bytes: u64,
    pub wire: u64,
}

/// The sending end of one `Images` channel.
pub struct Uploader {
    /// `None` sends plain `Data` frames: compression is off, or the target predates it.
    encoder: Option<ChunkEncoder>,
    pacer: Pacer,
    stats: Arc<TransferStats>,
    /// Measured link throughput, read by the encoder.
    link: ferry_transfer::policy::LinkMeter,
}

impl Uploader {
    /// `peer_reads_chunks`: the target listed `chunks` in its `HelloOk`.
    pub fn new(
        settings: TransferSettings,
        peer_reads_chunks: bool,
        pacer: Pacer,
        stats: Arc<TransferStats>,
    ) -> Self {
        let wanted = settings.compression != Compression::Off;
        if wanted && !peer_reads_chunks {
            stats.mark_peer_unsupported();
        }
        let link = ferry_transfer::policy::LinkMeter::default();
        let encoder = (wanted && peer_reads_chunks).then(|| {
            ChunkEncoder::new(settings.compression, stats.clone())
                .with_link_estimate(link.estimate())
        });
        Uploader {
            encoder,
            pacer,
            stats,
            link,
        }
    }

    /// Sends the bytes of the file at `path` as data frames (the caller frames them with
    /// `FileStart`/`FileEnd`), calling `progress` with each chunk's size once it is handed to
    /// the channel.
    pub async fn send_file<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        path: &Path,
        mut progress: impl FnMut(u64),
    ) -> Result<FileSent, UploadError> {
        let read_err = |source| UploadError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::open(path).await.map_err(read_err)?;
        if let Some(enc) = self.encoder.as_mut() {
            enc.restart();
        }
        let chunk_len = self.pacer.chunk_len(CHUNK);
        let mut hasher = Sha256::new();
        let mut encoder = self.encoder.take();
        let mut ready: Option<(Frame, u64)> = None;
        let mut sent = FileSent {
            sha256: String::new(),
            bytes: 0,
            wire: 0,
        };
        let outcome = loop {
            let mut buf = BytesMut::zeroed(chunk_len);
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => break Err(read_err(e)),
            };
            if n == 0 {
                break Ok(());
            }
            buf.truncate(n);
            let raw = buf.freeze();
            let job = tokio::task::spawn_blocking(move || {
                hasher.update(&raw);
                let frame = encode(encoder.as_mut(), raw);
                (hasher, encoder, frame)
            });
            let sent_previous = match ready.take() {
                Some((frame, n)) => self.send(conn, frame, n, &mut sent, &mut progress).await,
                None => Ok(()),
            };
            let (h, e, frame) = job.await.map_err(|e| UploadError::Worker {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            hasher = h;
            encoder = e;
            if let Err(e) = sent_previous {
                break Err(e);
            }
            match frame {
                Ok(f) => ready = Some((f, n as u64)),
                Err(source) => {
                    break Err(UploadError::Encode {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        self.encoder = encoder;
        outcome?;
        if let Some((frame, n)) = ready.take() {
            self.send(conn, frame, n, &mut sent, &mut progress).await?;
        }
        if let Some(enc) = self.encoder.as_mut() {
            enc.finish();
        }
        sent.sha256 = hex::encode(hasher.finalize());
        Ok(sent)
    }

    async fn send<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Conn<S>,
        frame: Frame,
        raw: u64,
        sent: &mut FileSent,
        progress: &mut impl FnMut(u64),
    ) -> Result<(), UploadError> {
        let wire = ferry_transfer::chunk::frame_len(frame.payload.len());
        let started = std::time::Instant::now();
        self.pacer.pace(wire as usize).await;
        let plain = frame.kind == FrameKind::Data;
        conn.feed_frame(frame).await?;
        // Bytes handed to the channel over the time the hand-over took, pacing included.
        self.link
            .record(wire, started.elapsed(), self.pacer.limit());
        if plain {
            self.stats.record(wire, wire);
        }
        sent.bytes += raw;
        sent.wire += wire;
        progress(raw);
        Ok(())
    }
}

fn encode(encoder: Option<&mut ChunkEncoder>, raw: Bytes) -> Result<Frame, ChunkError> {
    match encoder {
        Some(enc) => Ok(Frame::chunk(enc.encode(&raw)?)),
        None => Ok(Frame::data(raw)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::FrameKind;
    use ferry_transfer::ChunkDecoder;
    use std::time::Duration;

    /// Half text, a run of zero pages, then noise: every encoding appears.
    fn image(len: usize) -> Vec<u8> {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        (0..len)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                match i * 3 / len {
                    0 => b"value:0123456789abcdef "[(s % 23) as usize],
                    1 => 0,
                    _ => (s >> 40) as u8,
                }
            })
            .collect()
    }

    async fn send_and_receive(
        settings: TransferSettings,
        peer_reads_chunks: bool,
    ) -> (
        Vec<u8>,
        FileSent,
        Vec<FrameKind>,
        ferry_transfer::StatsSnapshot,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages-1.img");
        let data = image(5 * CHUNK + 1234);
        std::fs::write(&path, &data).unwrap();
        let (a, b) = tokio::io::duplex(1 << 20);
        let stats = Arc::new(TransferStats::default());
        let mut up = Uploader::new(
            settings,
            peer_reads_chunks,
            Pacer::new(settings.bandwidth_limit_bytes_per_s),
            stats.clone(),
        );
        let receiver = tokio::spawn(async move {
            let mut rx = Conn::new(b);
            let mut dec = ChunkDecoder::new();
            let (mut got, mut kinds) = (Vec::new(), Vec::new());
            while let Ok(f) = rx.recv_frame(Duration::from_secs(5)).await {
                kinds.push(f.kind);
                got.extend_from_slice(&dec.frame_bytes(f).unwrap());
            }
            (got, kinds)
        });
        let mut tx = Conn::new(a);
        let mut progressed = 0;
        let sent = up
            .send_file(&mut tx, &path, |n| progressed += n)
            .await
            .unwrap();
        tx.flush().await.unwrap();
        drop(tx);
        let (got, kinds) = receiver.await.unwrap();
        assert_eq!(progressed, data.len() as u64);
        assert!(got == data);
        assert_eq!(sent.bytes, data.len() as u64);
        assert_eq!(sent.sha256, hex::encode(Sha256::digest(&data)));
        (got, sent, kinds, stats.snapshot())
    }

    #[tokio::test]
    async fn auto_compresses_images_for_a_peer_that_reads_chunks() {
        let (_, sent, kinds, stats) = send_and_receive(TransferSettings::default(), true).await;
        assert!(kinds.iter().all(|k| *k == FrameKind::Chunk));
        assert!(sent.wire < sent.bytes, "{sent:?}");
        assert_eq!(stats.wire, sent.wire);
        assert!(stats.chunks_zstd > 0 && stats.chunks_zeros > 0);
    }

    #[tokio::test]
    async fn older_peers_and_off_get_plain_data_frames() {
        for (compression, chunks) in [(Compression::Auto, false), (Compression::Off, true)] {
            let settings = TransferSettings {
                compression,
                bandwidth_limit_bytes_per_s: 0,
            };
            let (_, sent, kinds, stats) = send_and_receive(settings, chunks).await;
            assert!(kinds.iter().all(|k| *k == FrameKind::Data));
            assert_eq!(sent.wire, sent.bytes + 5 * kinds.len() as u64);
            assert_eq!((stats.uncompressed, stats.wire), (sent.wire, sent.wire));
            assert_eq!(stats.peer_unsupported, !chunks);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_limited_upload_is_cut_small_and_paced() {
        let settings = TransferSettings {
            compression: Compression::On,
            bandwidth_limit_bytes_per_s: 1 << 20,
        };
        let start = tokio::time::Instant::now();
        let (_, sent, kinds, _) = send_and_receive(settings, true).await;
        assert!(kinds.len() >= 20, "{} frames", kinds.len());
        // The last chunk (256 KiB at this rate) may start once the rest had its time, less the
        // 64 KiB burst.
        let floor = sent.wire.saturating_sub((256 << 10) + (64 << 10)) as f64 / (1 << 20) as f64;
        assert!(
            start.elapsed().as_secs_f64() >= floor,
            "{:?}",
            start.elapsed()
        );
    }
}
