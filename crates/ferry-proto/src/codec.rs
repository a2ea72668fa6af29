//! Length-prefixed frames: `u32 BE payload length | u8 kind | payload`.
//!
//! The length is checked against [`MAX_FRAME_PAYLOAD`] before any buffer is reserved, so a
//! hostile or corrupt peer cannot make the decoder allocate unbounded memory.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Largest payload a frame may carry. Image and page streams are chunked well below this.
pub const MAX_FRAME_PAYLOAD: usize = 4 * 1024 * 1024;
/// Bytes before the payload: length (4) and kind (1).
pub const HEADER_LEN: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A JSON-encoded [`crate::msg::Message`].
    Control = 1,
    /// Raw bytes continuing the stream announced by the last control message.
    Data = 2,
    /// Like `Data`, but the payload starts with a chunk header saying how the bytes are encoded
    /// (plain, zstd, all zero; see the `ferry-transfer` crate). Sent only to peers that listed
    /// [`FEATURE_CHUNKS`] in their `HelloOk`, so an older peer never sees one; if one did, it
    /// would refuse the unknown kind instead of taking encoded bytes for data.
    Chunk = 3,
}

/// Feature a peer lists in `HelloOk` (and asks for in a `Pages` hello) when it reads
/// [`FrameKind::Chunk`] frames.
pub const FEATURE_CHUNKS: &str = "chunks";

impl FrameKind {
    fn from_u8(v: u8) -> Result<Self, ProtoError> {
        match v {
            1 => Ok(FrameKind::Control),
            2 => Ok(FrameKind::Data),
            3 => Ok(FrameKind::Chunk),
            other => Err(ProtoError::UnknownKind(other)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Bytes,
}

impl Frame {
    pub fn control(msg: &crate::msg::Message) -> Result<Frame, ProtoError> {
        let payload = serde_json::to_vec(msg).map_err(|e| ProtoError::Json(e.to_string()))?;
        Ok(Frame {
            kind: FrameKind::Control,
            payload: Bytes::from(payload),
        })
    }

    pub fn data(payload: Bytes) -> Frame {
        Frame {
            kind: FrameKind::Data,
            payload,
        }
    }

    pub fn chunk(payload: Bytes) -> Frame {
        Frame {
            kind: FrameKind::Chunk,
            payload,
        }
    }

    /// Parses a control frame's JSON; a data frame where a message was expected is an error.
    pub fn into_message(self) -> Result<crate::msg::Message, ProtoError> {
        match self.kind {
            FrameKind::Control => {
                serde_json::from_slice(&self.payload).map_err(|e| ProtoError::Json(e.to_string()))
            }
            FrameKind::Data | FrameKind::Chunk => Err(ProtoError::UnexpectedData),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_PAYLOAD} bytes")]
    TooLarge(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed control message: {0}")]
    Json(String),
    #[error("data frame received where a control message was expected")]
    UnexpectedData,
    #[error("i/o: {0}")]
    Io(String),
}

impl From<std::io::Error> for ProtoError {
    fn from(e: std::io::Error) -> Self {
        ProtoError::Io(e.to_string())
    }
}

/// Encodes a frame into `dst`.
pub fn encode(frame: &Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
    let len = frame.payload.len();
    if len > MAX_FRAME_PAYLOAD {
        return Err(ProtoError::TooLarge(len));
    }
    dst.reserve(HEADER_LEN + len);
    dst.put_u32(len as u32);
    dst.put_u8(frame.kind as u8);
    dst.put_slice(&frame.payload);
    Ok(())
}

/// Decodes one frame from the front of `src`, or returns `None` when more bytes are needed.
pub fn decode(src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > MAX_FRAME_PAYLOAD {
        return Err(ProtoError::TooLarge(len));
    }
    let kind = FrameKind::from_u8(src[4])?;
    if src.len() < HEADER_LEN + len {
        // Reserve only up to the bounded frame size announced above.
        src.reserve(HEADER_LEN + len - src.len());
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    let payload = src.split_to(len).freeze();
    Ok(Some(Frame { kind, payload }))
}

/// [`tokio_util::codec`] adapter so agents can use `Framed<TlsStream, FrameCodec>`.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = ProtoError;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        decode(src)
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = ProtoError;
    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
        encode(&item, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind_strategy() -> impl Strategy<Value = FrameKind> {
        prop_oneof![
            Just(FrameKind::Control),
            Just(FrameKind::Data),
            Just(FrameKind::Chunk)
        ]
    }

    proptest! {
        #[test]
        fn any_frame_round_trips(kind in kind_strategy(), payload in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let frame = Frame { kind, payload: Bytes::from(payload) };
            let mut buf = BytesMut::new();
            encode(&frame, &mut buf).unwrap();
            let decoded = decode(&mut buf).unwrap().unwrap();
            prop_assert_eq!(decoded, frame);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn frames_split_anywhere_reassemble(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..512), 1..8), cut in 0usize..4096) {
            let mut wire = BytesMut::new();
            for p in &payloads {
                encode(&Frame::data(Bytes::from(p.clone())), &mut wire).unwrap();
            }
            let cut = cut.min(wire.len());
            let mut rx = BytesMut::new();
            rx.extend_from_slice(&wire[..cut]);
            let mut out = Vec::new();
            while let Some(f) = decode(&mut rx).unwrap() { out.push(f.payload.to_vec()); }
            rx.extend_from_slice(&wire[cut..]);
            while let Some(f) = decode(&mut rx).unwrap() { out.push(f.payload.to_vec()); }
            prop_assert_eq!(out, payloads);
        }

        #[test]
        fn truncated_frames_never_yield(payload in proptest::collection::vec(any::<u8>(), 1..2048), keep in 0usize..2048) {
            let mut wire = BytesMut::new();
            encode(&Frame::data(Bytes::from(payload.clone())), &mut wire).unwrap();
            let keep = keep % wire.len();
            let mut rx = BytesMut::from(&wire[..keep]);
            prop_assert_eq!(decode(&mut rx).unwrap(), None);
            // A truncated frame never makes the buffer grow past the announced, bounded size.
            prop_assert!(rx.capacity() <= HEADER_LEN + MAX_FRAME_PAYLOAD.max(payload.len()) + 64);
        }

        #[test]
        fn oversized_lengths_are_refused_before_allocating(len in (MAX_FRAME_PAYLOAD as u32 + 1)..=u32::MAX, kind in 0u8..=255) {
            let mut rx = BytesMut::new();
            rx.put_u32(len);
            rx.put_u8(kind);
            let before = rx.capacity();
            prop_assert_eq!(decode(&mut rx), Err(ProtoError::TooLarge(len as usize)));
            prop_assert_eq!(rx.capacity(), before);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut rx = BytesMut::from(&bytes[..]);
            let _ = decode(&mut rx);
        }
    }

    #[test]
    fn unknown_kind_is_refused() {
        let mut rx = BytesMut::new();
        rx.put_u32(0);
        rx.put_u8(9);
        assert_eq!(decode(&mut rx), Err(ProtoError::UnknownKind(9)));
    }

    #[test]
    fn encoding_oversized_payload_is_refused() {
        let frame = Frame::data(Bytes::from(vec![0u8; MAX_FRAME_PAYLOAD + 1]));
        let mut buf = BytesMut::new();
        assert_eq!(
            encode(&frame, &mut buf),
            Err(ProtoError::TooLarge(MAX_FRAME_PAYLOAD + 1))
        );
        assert!(buf.is_empty());
    }
}
