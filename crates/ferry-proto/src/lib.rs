//! Wire types shared by the ferry CLI and agents, and the frame codec that carries them.
//!
//! Nothing here performs I/O: the agents wrap [`codec::FrameCodec`] around their TLS streams.
//! Control messages are JSON (debuggable, tolerant to added fields); bulk data travels in raw
//! `Data` frames, or in `Chunk` frames when both peers speak them (compressed or plain, each frame
//! saying which).

pub mod codec;
pub mod msg;
pub mod report;

pub use codec::{Frame, FrameCodec, FrameKind, ProtoError, FEATURE_CHUNKS, MAX_FRAME_PAYLOAD};
pub use msg::*;
pub use report::*;

/// Protocol version spoken by this build; peers with another major refuse each other in `Hello`.
pub const PROTOCOL_VERSION: u32 = 1;
