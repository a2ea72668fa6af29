//! The payload of a `Chunk` frame: `u8 encoding | u32 BE uncompressed length | body`.
//!
//! The uncompressed length is in the header so the receiver can refuse an oversized chunk
//! before it allocates or decompresses anything, and can hand zstd an output buffer of exactly
//! that size: a zstd frame that would expand further fails instead of growing the buffer.

use bytes::{BufMut, Bytes, BytesMut};
use ferry_proto::codec::HEADER_LEN;
use ferry_proto::{Frame, FrameKind, MAX_FRAME_PAYLOAD};

/// Bytes before a chunk's body: encoding (1) and uncompressed length (4).
pub const CHUNK_HEADER_LEN: usize = 5;
/// Largest uncompressed chunk: one that still fits a frame when sent plain, so the encoder can
/// always fall back to plain and a decoder never has to accept more than a frame could carry.
pub const MAX_CHUNK: usize = MAX_FRAME_PAYLOAD - CHUNK_HEADER_LEN;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// The body is the bytes themselves.
    Plain = 0,
    /// The body is one or more zstd frames.
    Zstd = 1,
    /// No body: the chunk is that many zero bytes.
    Zeros = 2,
}

impl Encoding {
    fn from_u8(v: u8) -> Result<Self, ChunkError> {
        match v {
            0 => Ok(Encoding::Plain),
            1 => Ok(Encoding::Zstd),
            2 => Ok(Encoding::Zeros),
            other => Err(ChunkError::UnknownEncoding(other)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk of {0} bytes is shorter than its {CHUNK_HEADER_LEN}-byte header")]
    Truncated(usize),
    #[error("unknown chunk encoding {0}")]
    UnknownEncoding(u8),
    #[error("chunk of {0} bytes exceeds the limit of {MAX_CHUNK} bytes")]
    TooLarge(usize),
    #[error("plain chunk announces {announced} bytes but carries {carried}")]
    LengthMismatch { announced: usize, carried: usize },
    #[error("all-zero chunk carries {0} bytes of body")]
    ZerosWithBody(usize),
    #[error("zstd chunk announcing {announced} bytes: {message}")]
    Zstd { announced: usize, message: String },
    #[error("zstd chunk decompressed to {got} bytes where {announced} were announced")]
    ZstdLength { announced: usize, got: usize },
    #[error("a control message arrived inside a data stream")]
    NotData,
}

/// The 5-byte chunk header; callers have checked `raw_len <= MAX_CHUNK`.
pub(crate) fn header(encoding: Encoding, raw_len: usize) -> [u8; CHUNK_HEADER_LEN] {
    let n = (raw_len as u32).to_be_bytes();
    [encoding as u8, n[0], n[1], n[2], n[3]]
}

/// Splits a chunk into its encoding, uncompressed length and body, refusing a length above
/// [`MAX_CHUNK`] before anything is allocated for it.
pub fn parse(payload: &[u8]) -> Result<(Encoding, usize, &[u8]), ChunkError> {
    if payload.len() < CHUNK_HEADER_LEN {
        return Err(ChunkError::Truncated(payload.len()));
    }
    let encoding = Encoding::from_u8(payload[0])?;
    let raw_len = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]) as usize;
    if raw_len > MAX_CHUNK {
        return Err(ChunkError::TooLarge(raw_len));
    }
    Ok((encoding, raw_len, &payload[CHUNK_HEADER_LEN..]))
}

/// A plain chunk carrying `raw` as it is.
pub fn plain(raw: &[u8]) -> Result<Bytes, ChunkError> {
    if raw.len() > MAX_CHUNK {
        return Err(ChunkError::TooLarge(raw.len()));
    }
    let mut out = BytesMut::with_capacity(CHUNK_HEADER_LEN + raw.len());
    out.put_slice(&header(Encoding::Plain, raw.len()));
    out.put_slice(raw);
    Ok(out.freeze())
}

/// A chunk standing for `raw_len` zero bytes.
pub fn zeros(raw_len: usize) -> Result<Bytes, ChunkError> {
    if raw_len > MAX_CHUNK {
        return Err(ChunkError::TooLarge(raw_len));
    }
    Ok(Bytes::copy_from_slice(&header(Encoding::Zeros, raw_len)))
}

/// Whether every byte is zero. Checked a page at a time so it stops early on real data, and
/// with a branch-free fold inside each page so the compiler vectorizes it.
pub fn is_all_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|page| page.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Wire bytes a chunk payload of `len` bytes takes as a frame.
pub fn frame_len(len: usize) -> u64 {
    (HEADER_LEN + len) as u64
}

/// Decodes chunks; keeps one zstd context for the whole stream.
#[derive(Default)]
pub struct ChunkDecoder {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl ChunkDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes a data frame stands for: a `Data` frame's payload as it is, a `Chunk` frame's
    /// decoded.
    pub fn frame_bytes(&mut self, frame: Frame) -> Result<Bytes, ChunkError> {
        match frame.kind {
            FrameKind::Data => Ok(frame.payload),
            FrameKind::Chunk => self.decode(frame.payload),
            FrameKind::Control => Err(ChunkError::NotData),
        }
    }

    /// Decodes one chunk payload. Never yields more than [`MAX_CHUNK`] bytes, and never
    /// allocates more than the header announces.
    pub fn decode(&mut self, payload: Bytes) -> Result<Bytes, ChunkError> {
        let (encoding, raw_len, body) = parse(&payload)?;
        match encoding {
            Encoding::Plain => {
                if body.len() != raw_len {
                    return Err(ChunkError::LengthMismatch {
                        announced: raw_len,
                        carried: body.len(),
                    });
                }
                Ok(payload.slice(CHUNK_HEADER_LEN..))
            }
            Encoding::Zeros => {
                if !body.is_empty() {
                    return Err(ChunkError::ZerosWithBody(body.len()));
                }
                Ok(Bytes::from(vec![0u8; raw_len]))
            }
            Encoding::Zstd => {
                let zstd_err = |e: std::io::Error| ChunkError::Zstd {
                    announced: raw_len,
                    message: e.to_string(),
                };
                let dctx = match &mut self.zstd {
                    Some(d) => d,
                    None => self
                        .zstd
                        .insert(zstd::bulk::Decompressor::new().map_err(zstd_err)?),
                };
                let mut out = Vec::with_capacity(raw_len);
                let got = dctx
                    .decompress_to_buffer(body, &mut out)
                    .map_err(zstd_err)?;
                if got != raw_len || out.len() != raw_len {
                    return Err(ChunkError::ZstdLength {
                        announced: raw_len,
                        got,
                    });
                }
                Ok(Bytes::from(out))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn zstd_chunk(raw: &[u8]) -> Bytes {
        let body = zstd::bulk::compress(raw, 1).unwrap();
        let mut out = header(Encoding::Zstd, raw.len()).to_vec();
        out.extend_from_slice(&body);
        Bytes::from(out)
    }

    #[test]
    fn a_zstd_bomb_is_refused_without_expanding() {
        // 16 MiB of zeros compress to a few KiB; announcing a small size must not let it out.
        let bomb = zstd::bulk::compress(&vec![0u8; 16 << 20], 1).unwrap();
        let mut payload = header(Encoding::Zstd, 4096).to_vec();
        payload.extend_from_slice(&bomb);
        let err = ChunkDecoder::new()
            .decode(Bytes::from(payload))
            .unwrap_err();
        assert!(
            matches!(
                err,
                ChunkError::Zstd {
                    announced: 4096,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn announced_lengths_over_the_limit_are_refused_before_decoding() {
        for enc in [Encoding::Plain, Encoding::Zstd, Encoding::Zeros] {
            let payload = Bytes::copy_from_slice(&header(enc, MAX_CHUNK + 1));
            assert_eq!(
                ChunkDecoder::new().decode(payload),
                Err(ChunkError::TooLarge(MAX_CHUNK + 1))
            );
        }
        let mut p = vec![1u8, 0xff, 0xff, 0xff, 0xff];
        p.extend_from_slice(&[0; 16]);
        assert_eq!(
            ChunkDecoder::new().decode(Bytes::from(p)),
            Err(ChunkError::TooLarge(u32::MAX as usize))
        );
    }

    #[test]
    fn a_zstd_chunk_shorter_than_announced_is_refused() {
        let mut payload = zstd_chunk(b"hello hello hello hello").to_vec();
        payload[1..5].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(
            ChunkDecoder::new().decode(Bytes::from(payload)),
            Err(ChunkError::ZstdLength {
                announced: 100,
                got: 23
            })
        );
    }

    #[test]
    fn data_frames_pass_through_and_control_frames_are_refused() {
        let mut d = ChunkDecoder::new();
        let raw = Bytes::from_static(b"legacy");
        assert_eq!(d.frame_bytes(Frame::data(raw.clone())), Ok(raw));
        let ctl = Frame {
            kind: FrameKind::Control,
            payload: Bytes::from_static(b"{}"),
        };
        assert_eq!(d.frame_bytes(ctl), Err(ChunkError::NotData));
    }

    #[test]
    fn zero_detection() {
        assert!(is_all_zero(&[]));
        assert!(is_all_zero(&[0; 10000]));
        let mut v = vec![0u8; 10000];
        v[9999] = 1;
        assert!(!is_all_zero(&v));
    }

    proptest! {
        #[test]
        fn every_encoding_round_trips(raw in proptest::collection::vec(any::<u8>(), 0..20000), zero in any::<bool>()) {
            let raw = if zero { vec![0u8; raw.len()] } else { raw };
            let mut d = ChunkDecoder::new();
            prop_assert_eq!(&d.decode(plain(&raw).unwrap()).unwrap()[..], &raw[..]);
            prop_assert_eq!(&d.decode(zstd_chunk(&raw)).unwrap()[..], &raw[..]);
            if zero {
                prop_assert_eq!(&d.decode(zeros(raw.len()).unwrap()).unwrap()[..], &raw[..]);
            }
        }

        #[test]
        fn truncated_chunks_are_errors(raw in proptest::collection::vec(any::<u8>(), 1..4000), cut in any::<prop::sample::Index>(), zstd in any::<bool>()) {
            let chunk = if zstd { zstd_chunk(&raw) } else { plain(&raw).unwrap() };
            let keep = cut.index(chunk.len());
            prop_assert!(ChunkDecoder::new().decode(chunk.slice(..keep)).is_err());
        }

        #[test]
        fn corrupt_chunks_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..4000), flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8), zstd in any::<bool>()) {
            let chunk = if zstd { zstd_chunk(&raw) } else { plain(&raw).unwrap() };
            let mut bad = chunk.to_vec();
            for (at, x) in flips {
                let i = at.index(bad.len());
                bad[i] ^= x;
            }
            if let Ok(out) = ChunkDecoder::new().decode(Bytes::from(bad)) {
                prop_assert!(out.len() <= MAX_CHUNK);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(out) = ChunkDecoder::new().decode(Bytes::from(bytes)) {
                prop_assert!(out.len() <= MAX_CHUNK);
            }
        }
    }
}
