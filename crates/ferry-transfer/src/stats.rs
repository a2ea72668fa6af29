//! What a migration's bulk streams sent, before and after compression, shared by the tasks
//! that send them (image upload, page tunnel) and read once for the report.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use ferry_proto::{Compression, CompressionDecision, CompressionReport};

use crate::chunk::Encoding;

#[derive(Debug, Default)]
pub struct TransferStats {
    uncompressed: AtomicU64,
    wire: AtomicU64,
    tried_in: AtomicU64,
    tried_out: AtomicU64,
    chunks_plain: AtomicU64,
    chunks_zstd: AtomicU64,
    chunks_zeros: AtomicU64,
    streams_compressed: AtomicU64,
    streams_plain: AtomicU64,
    peer_unsupported: AtomicBool,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Bytes the streams would have taken on the wire sent plain.
    pub uncompressed: u64,
    /// Bytes they took.
    pub wire: u64,
    /// Input and output of the chunks zstd was tried on (output = input where it did not gain).
    pub tried_in: u64,
    pub tried_out: u64,
    pub chunks_plain: u64,
    pub chunks_zstd: u64,
    pub chunks_zeros: u64,
    /// Streams `auto` ended up compressing, and ended up sending plain.
    pub streams_compressed: u64,
    pub streams_plain: u64,
    /// A peer could not read compressed chunks, so its streams went plain.
    pub peer_unsupported: bool,
}

impl TransferStats {
    /// Records bytes sent outside a [`crate::ChunkEncoder`] (plain `Data` frames, a raw tunnel).
    pub fn record(&self, uncompressed: u64, wire: u64) {
        self.uncompressed.fetch_add(uncompressed, Relaxed);
        self.wire.fetch_add(wire, Relaxed);
    }

    pub(crate) fn record_chunk(&self, encoding: Encoding, uncompressed: u64, wire: u64) {
        self.record(uncompressed, wire);
        let counter = match encoding {
            Encoding::Plain => &self.chunks_plain,
            Encoding::Zstd => &self.chunks_zstd,
            Encoding::Zeros => &self.chunks_zeros,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn record_tried(&self, input: u64, output: u64) {
        self.tried_in.fetch_add(input, Relaxed);
        self.tried_out.fetch_add(output, Relaxed);
    }

    pub(crate) fn record_stream(&self, compressed: Option<bool>) {
        match compressed {
            Some(true) => self.streams_compressed.fetch_add(1, Relaxed),
            Some(false) => self.streams_plain.fetch_add(1, Relaxed),
            None => 0,
        };
    }

    pub fn mark_peer_unsupported(&self) {
        self.peer_unsupported.store(true, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            uncompressed: self.uncompressed.load(Relaxed),
            wire: self.wire.load(Relaxed),
            tried_in: self.tried_in.load(Relaxed),
            tried_out: self.tried_out.load(Relaxed),
            chunks_plain: self.chunks_plain.load(Relaxed),
            chunks_zstd: self.chunks_zstd.load(Relaxed),
            chunks_zeros: self.chunks_zeros.load(Relaxed),
            streams_compressed: self.streams_compressed.load(Relaxed),
            streams_plain: self.streams_plain.load(Relaxed),
            peer_unsupported: self.peer_unsupported.load(Relaxed),
        }
    }
}

impl StatsSnapshot {
    /// uncompressed / compressed over the chunks zstd was tried on, to three decimals.
    pub fn measured_ratio(&self) -> Option<f64> {
        if self.tried_out == 0 {
            return None;
        }
        Some((crate::policy::ratio(self.tried_in, self.tried_out) * 1000.0).round() / 1000.0)
    }

    /// Bytes compression kept off the wire.
    pub fn saved(&self) -> u64 {
        self.uncompressed.saturating_sub(self.wire)
    }

    pub fn decision(&self, policy: Compression) -> CompressionDecision {
        if policy == Compression::Off {
            return CompressionDecision::Off;
        }
        if self.peer_unsupported {
            return CompressionDecision::PeerUnsupported;
        }
        if policy == Compression::On {
            return CompressionDecision::Compressed;
        }
        match (self.streams_compressed, self.streams_plain) {
            (0, 0) if self.chunks_zstd > 0 => CompressionDecision::Compressed,
            (0, 0) => CompressionDecision::Plain,
            (_, 0) => CompressionDecision::Compressed,
            (0, _) => CompressionDecision::Plain,
            _ => CompressionDecision::Mixed,
        }
    }

    pub fn report(&self, policy: Compression) -> CompressionReport {
        CompressionReport {
            policy,
            decision: self.decision(policy),
            measured_ratio: self.measured_ratio(),
            streams_compressed: self.streams_compressed,
            streams_plain: self.streams_plain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let s = |c, p, z| StatsSnapshot {
            streams_compressed: c,
            streams_plain: p,
            chunks_zstd: z,
            ..Default::default()
        };
        use CompressionDecision as D;
        assert_eq!(s(0, 0, 0).decision(Compression::Off), D::Off);
        assert_eq!(s(0, 0, 0).decision(Compression::On), D::Compressed);
        assert_eq!(s(0, 0, 0).decision(Compression::Auto), D::Plain);
        assert_eq!(s(0, 0, 3).decision(Compression::Auto), D::Compressed);
        assert_eq!(s(2, 0, 3).decision(Compression::Auto), D::Compressed);
        assert_eq!(s(0, 2, 3).decision(Compression::Auto), D::Plain);
        assert_eq!(s(1, 2, 3).decision(Compression::Auto), D::Mixed);
        let old = StatsSnapshot {
            peer_unsupported: true,
            ..Default::default()
        };
        assert_eq!(old.decision(Compression::Auto), D::PeerUnsupported);
        assert_eq!(old.decision(Compression::Off), D::Off);
    }

    #[test]
    fn ratio_is_rounded_and_absent_without_measurements() {
        let mut s = StatsSnapshot::default();
        assert_eq!(s.measured_ratio(), None);
        s.tried_in = 1750;
        s.tried_out = 999;
        assert_eq!(s.measured_ratio(), Some(1.752));
    }
}
