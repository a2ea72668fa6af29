//! Compresses and paces the bulk streams between agents: checkpoint images and post-copy pages.
//!
//! - [`chunk`]: the `Chunk` frame payload, a 5-byte header (encoding, uncompressed length) and
//!   the bytes, plain, zstd-compressed or elided when all zero. Decoding is bounded: a chunk
//!   never expands past [`chunk::MAX_CHUNK`], whatever its header or zstd frame claims.
//! - [`policy`]: [`Compression`] `off`/`on`/`auto`; `auto` measures zstd on each stream's first
//!   chunks and keeps compressing only while it gains enough ([`policy::AUTO_MIN_RATIO`]).
//! - [`pacer`]: a token bucket for `--bandwidth-limit`, its arithmetic apart from the clock.
//! - [`rate`]: parsing and printing rates such as `50MiB/s` or `400Mbit/s`.
//! - [`bridge`]: the post-copy page tunnel, each read chunk sent at once as its own frame.
//! - [`stats`]: what was sent, before and after compression, for the migration report.

pub mod bridge;
pub mod chunk;
pub mod pacer;
pub mod policy;
pub mod rate;
pub mod stats;

pub use bridge::{bridge, BridgeError, BridgeOptions, BridgeTotals, DirectionTotals};
pub use chunk::{ChunkDecoder, ChunkError, Encoding, CHUNK_HEADER_LEN, MAX_CHUNK};
pub use ferry_proto::{Compression, TransferSettings};
pub use pacer::{Pacer, TokenBucket};
pub use policy::{ChunkEncoder, AUTO_MIN_RATIO};
pub use rate::{check_bandwidth_limit, format_rate, parse_bandwidth_limit, RateError};
pub use stats::{StatsSnapshot, TransferStats};
