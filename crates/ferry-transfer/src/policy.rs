//! When to compress: the `auto` policy's measurements ([`AutoState`], pure and clock-free) and
//! the encoder that applies a [`Compression`] policy chunk by chunk ([`ChunkEncoder`]).

use std::io::Cursor;
use std::sync::Arc;

use bytes::Bytes;
use ferry_proto::Compression;

use crate::chunk::{self, ChunkError, Encoding, CHUNK_HEADER_LEN, MAX_CHUNK};
use crate::stats::TransferStats;

/// zstd level 1: its fastest regular level (~420 MiB/s per core on Redis memory here), since the
/// point is to fill the link, not to save disk space; higher levels gain a few percent of ratio
/// for several times the CPU.
pub const ZSTD_LEVEL: i32 = 1;

/// `auto` keeps compressing a stream only while zstd shrinks what it measured at least this
/// much (uncompressed / compressed).
///
/// Compressing removes 1 − 1/ratio of the bytes on the wire and costs about a core per
/// 420 MiB/s of input. At 1.2 a sixth of the bytes go, which pays on any link the CPU
/// outruns (1 GbE, a shared link, anything under `--bandwidth-limit`); below it the saving is
/// within what TLS records, TCP and the receiver's decompression take back, for the same CPU.
/// Redis-like memory (≈1.75×) clears it easily; already compressed, encrypted or random data
/// (≈1.0×) never does.
pub const AUTO_MIN_RATIO: f64 = 1.2;

/// How much of a stream `auto` measures before it decides: enough to see past one odd region
/// (a thousand pages), and about 10 ms of zstd, a small price on any image where the choice
/// matters. All-zero chunks are not counted: they are elided whatever the policy and say
/// nothing about the rest.
pub const AUTO_PROBE_BYTES: u64 = 4 << 20;

/// While compressing, `auto` re-checks the ratio over windows this long, since memory images
/// mix regions (heap, mapped files, buffers already compressed) and the gain can fall away.
pub const AUTO_RECHECK_BYTES: u64 = 64 << 20;

/// After this much of a stream went plain, `auto` measures again, in case the data changed.
pub const AUTO_REPROBE_AFTER: u64 = 64 << 20;

/// Where the ratio and zstd's speed say compressing should pay, `auto` still times the stream
/// over this much sent compressed, then this much sent plain, and keeps compressing only if
/// that moved the data faster. The link estimate cannot see everything that bounds a stream:
/// the receiver's CPU (decompression and what it does with the data), or a sender whose cores
/// the receiver shares. On the test bed's veths both hosts share two cores, and compressing
/// the post-copy pages cost ~0.2 s of a 512 MB migration's 2.2 s. 16 MiB is ~50 ms at the
/// test bed's pace and ~130 ms on 1 GbE: long enough to smooth out single chunks.
pub const AUTO_PACE_BYTES: u64 = 16 << 20;

/// Compressing costs CPU at the same pace, so it has to move the stream at least this much
/// faster than plain frames did.
pub const AUTO_PACE_MARGIN: f64 = 1.05;

/// After timing showed plain frames to be faster, `auto` measures again only after this much
/// more of the stream: each measurement compresses `AUTO_PROBE_BYTES + AUTO_PACE_BYTES`.
pub const AUTO_REPROBE_AFTER_PACE: u64 = 512 << 20;

/// `auto` compresses only where zstd outruns the link by this factor. The uploader compresses
/// the next chunk while the previous one is on the wire, so compressing moves data at
/// min(zstd speed, link × ratio) against the link's own speed plain: it pays exactly when zstd
/// is faster than the link, and the margin keeps a link about as fast as one core of zstd (a
/// local 10 GbE, the test bed's veths) on plain frames, where compressing would only add CPU.
pub const AUTO_LINK_MARGIN: f64 = 1.25;

/// Chunks shorter than this are sent plain without trying zstd and without being measured: its
/// frame overhead and lack of history make such chunks (CRIU's page requests are a few dozen
/// bytes) come out larger.
pub const MIN_TRY_LEN: usize = 256;

/// Sending time below which a link estimate is not trusted: shorter samples mostly measure
/// socket buffers filling.
pub const LINK_MIN_NS: u64 = 5_000_000;

/// The link's throughput as a sender's writes see it (pacing and backpressure included),
/// published for the `auto` policy of that sender's [`ChunkEncoder`]s
/// ([`ChunkEncoder::with_link_estimate`]). Early on, socket buffers absorb writes and make the
/// link look fast, which leans towards sending plain; `auto` measures again later in a stream,
/// once the estimate has settled.
#[derive(Debug, Default)]
pub struct LinkMeter {
    bytes: std::sync::atomic::AtomicU64,
    ns: std::sync::atomic::AtomicU64,
    /// bytes/s, 0 until enough was sent.
    estimate: Arc<std::sync::atomic::AtomicU64>,
}

impl LinkMeter {
    /// The estimate an encoder reads.
    pub fn estimate(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.estimate.clone()
    }

    /// Adds one write of `bytes` that took `took`; the estimate never exceeds an operator's
    /// `limit` (bytes/s, 0 = none), which stands in for it until enough was measured.
    pub fn record(&self, bytes: u64, took: std::time::Duration, limit: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let took = took.as_nanos() as u64;
        let bytes = self.bytes.fetch_add(bytes, Relaxed) + bytes;
        let ns = self.ns.fetch_add(took, Relaxed) + took;
        if ns >= LINK_MIN_NS {
            let measured = (bytes as u128 * 1_000_000_000 / ns as u128) as u64;
            let link = if limit > 0 {
                measured.min(limit)
            } else {
                measured
            };
            self.estimate.store(link, Relaxed);
        } else if limit > 0 {
            self.estimate.store(limit, Relaxed);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoPhase {
    /// Measuring: every chunk is compressed (and sent plain when that did not shrink it).
    Probing,
    /// The probe said compressing pays: timing the stream while compressing.
    PaceCompressed,
    /// Then timing it while sending plain.
    PacePlain,
    Compressing,
    Plain,
}

/// A decision `auto` reached when a measuring window closed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub compress: bool,
    pub ratio: f64,
}

/// uncompressed / compressed, for sizes as the encoder measured them.
pub fn ratio(uncompressed: u64, compressed: u64) -> f64 {
    uncompressed as f64 / compressed.max(1) as f64
}

/// The `auto` policy's state for one stream, fed with what each chunk came to.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoState {
    phase: AutoPhase,
    window_in: u64,
    window_out: u64,
    /// Time zstd spent on the window's chunks, when measured.
    window_ns: u64,
    /// The link's measured (or configured) throughput, when known.
    link_bps: Option<u64>,
    plain_run: u64,
    /// How much plain stream makes `auto` measure again.
    reprobe_after: u64,
    decided: Option<bool>,
    /// The wall time since the encoder's previous chunk, for the chunk observed next.
    gap_ns: Option<u64>,
    /// The pace window's bytes and time. Its first chunk only starts the clock: the gap
    /// before it still carries the previous window's last chunk.
    pace_in: u64,
    pace_ns: u64,
    pace_started: bool,
    /// Bytes per second while compressing, once that window closed (`None`: not timed).
    pace_compressed: Option<f64>,
}

impl Default for AutoState {
    fn default() -> Self {
        AutoState {
            phase: AutoPhase::Probing,
            window_in: 0,
            window_out: 0,
            window_ns: 0,
            link_bps: None,
            plain_run: 0,
            reprobe_after: AUTO_REPROBE_AFTER,
            decided: None,
            gap_ns: None,
            pace_in: 0,
            pace_ns: 0,
            pace_started: false,
            pace_compressed: None,
        }
    }
}

impl AutoState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn phase(&self) -> AutoPhase {
        self.phase
    }

    /// The last decision, or `None` while the first measurement is still open.
    pub fn decided(&self) -> Option<bool> {
        self.decided
    }

    /// Whether the next chunk should be tried with zstd.
    pub fn wants_zstd(&self) -> bool {
        !matches!(self.phase, AutoPhase::Plain | AutoPhase::PacePlain)
    }

    /// Records the wall time since the encoder's previous chunk; call it before the chunk's
    /// `observe_tried` or `observe_plain`.
    pub fn observe_gap(&mut self, ns: u64) {
        self.gap_ns = Some(ns);
    }

    /// Counts a chunk of `raw` bytes into the pace window; the window's pace in bytes per
    /// second once it holds [`AUTO_PACE_BYTES`] (`None` inside: not timed).
    fn pace(&mut self, raw: u64) -> Option<Option<f64>> {
        let gap = self.gap_ns.take();
        if !self.pace_started {
            self.pace_started = true;
            return None;
        }
        self.pace_in = self.pace_in.saturating_add(raw);
        self.pace_ns = self.pace_ns.saturating_add(gap.unwrap_or(0));
        if self.pace_in < AUTO_PACE_BYTES {
            return None;
        }
        let bps = (self.pace_ns > 0).then(|| self.pace_in as f64 * 1e9 / self.pace_ns as f64);
        self.pace_in = 0;
        self.pace_ns = 0;
        self.pace_started = false;
        Some(bps)
    }

    /// Records how long zstd took on the chunk about to be passed to [`Self::observe_tried`].
    pub fn observe_cost(&mut self, ns: u64) {
        self.window_ns = self.window_ns.saturating_add(ns);
    }

    /// The link's throughput in bytes per second as last measured (0 = unknown).
    pub fn set_link(&mut self, bytes_per_s: u64) {
        self.link_bps = (bytes_per_s > 0).then_some(bytes_per_s);
    }

    /// zstd's measured input speed over the window, when timed.
    fn zstd_bps(&self) -> Option<f64> {
        (self.window_ns > 0).then(|| self.window_in as f64 * 1e9 / self.window_ns as f64)
    }

    /// Whether the link is slow enough for compression to pay (unknown speeds do not veto).
    fn link_allows(&self) -> bool {
        match (self.link_bps, self.zstd_bps()) {
            (Some(link), Some(zstd)) => zstd > link as f64 * AUTO_LINK_MARGIN,
            _ => true,
        }
    }

    /// Records a chunk zstd was tried on: `raw` bytes in, `out` bytes out (`raw` when zstd could
    /// not shrink it). Returns the decision when this chunk closed a measuring window.
    ///
    /// A probe that finds compressing worthwhile leads to the pace windows (the decision says
    /// `compress`, and the stream compresses while the first is timed); the decision after
    /// them comes from [`Self::observe_plain`].
    pub fn observe_tried(&mut self, raw: u64, out: u64) -> Option<Decision> {
        self.window_in = self.window_in.saturating_add(raw);
        self.window_out = self.window_out.saturating_add(out);
        let window = match self.phase {
            AutoPhase::Probing => AUTO_PROBE_BYTES,
            AutoPhase::Compressing => AUTO_RECHECK_BYTES,
            AutoPhase::PaceCompressed => {
                if let Some(bps) = self.pace(raw) {
                    self.pace_compressed = bps;
                    self.phase = AutoPhase::PacePlain;
                }
                return None;
            }
            AutoPhase::Plain | AutoPhase::PacePlain => return None,
        };
        if self.window_in < window {
            return None;
        }
        let r = ratio(self.window_in, self.window_out);
        let compress = r >= AUTO_MIN_RATIO && self.link_allows();
        self.phase = match (compress, self.phase) {
            (false, _) => AutoPhase::Plain,
            (true, AutoPhase::Probing) => AutoPhase::PaceCompressed,
            (true, _) => AutoPhase::Compressing,
        };
        self.window_in = 0;
        self.window_out = 0;
        self.window_ns = 0;
        self.plain_run = 0;
        self.reprobe_after = AUTO_REPROBE_AFTER;
        self.gap_ns = None;
        self.pace_in = 0;
        self.pace_ns = 0;
        self.pace_started = false;
        self.decided = Some(compress);
        Some(Decision { compress, ratio: r })
    }

    /// Records a chunk sent plain without trying zstd. Returns the decision when it closed
    /// the plain pace window: compress only if compressing moved the stream
    /// [`AUTO_PACE_MARGIN`] times faster (or either window could not be timed).
    pub fn observe_plain(&mut self, raw: u64) -> Option<Decision> {
        match self.phase {
            AutoPhase::Plain => {
                self.plain_run = self.plain_run.saturating_add(raw);
                if self.plain_run >= self.reprobe_after {
                    self.phase = AutoPhase::Probing;
                    self.plain_run = 0;
                }
                None
            }
            AutoPhase::PacePlain => {
                let plain = self.pace(raw)?;
                let compressed = self.pace_compressed.take();
                let compress = match (compressed, plain) {
                    (Some(c), Some(p)) => c >= p * AUTO_PACE_MARGIN,
                    _ => true,
                };
                let r = ratio(self.window_in, self.window_out);
                self.window_in = 0;
                self.window_out = 0;
                self.window_ns = 0;
                self.plain_run = 0;
                self.decided = Some(compress);
                if compress {
                    self.phase = AutoPhase::Compressing;
                } else {
                    self.phase = AutoPhase::Plain;
                    self.reprobe_after = AUTO_REPROBE_AFTER_PACE;
                }
                Some(Decision { compress, ratio: r })
            }
            _ => {
                self.gap_ns = None;
                None
            }
        }
    }
}

/// Turns one stream's chunks into `Chunk` frame payloads under a [`Compression`] policy, and
/// records what it did in a [`TransferStats`].
pub struct ChunkEncoder {
    policy: Compression,
    auto: AutoState,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// zstd could not set up its context (out of memory): the stream goes plain, which is
    /// always correct.
    zstd_unavailable: bool,
    stats: Arc<TransferStats>,
    finished: bool,
    /// The sender's running estimate of the link's throughput (bytes/s, 0 = unknown).
    link: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// When the previous chunk was encoded: the sender's pace, for `auto`'s pace windows.
    last_chunk: Option<std::time::Instant>,
}

impl ChunkEncoder {
    pub fn new(policy: Compression, stats: Arc<TransferStats>) -> Self {
        ChunkEncoder {
            policy,
            auto: AutoState::new(),
            zstd: None,
            zstd_unavailable: false,
            stats,
            finished: false,
            link: None,
            last_chunk: None,
        }
    }

    /// Lets `auto` weigh zstd's speed against the link's, as the sender measures it.
    pub fn with_link_estimate(mut self, link: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.link = Some(link);
        self
    }

    pub fn policy(&self) -> Compression {
        self.policy
    }

    pub fn auto_state(&self) -> &AutoState {
        &self.auto
    }

    /// The `Chunk` frame payload for `raw`, which must be at most [`MAX_CHUNK`] bytes.
    pub fn encode(&mut self, raw: &[u8]) -> Result<Bytes, ChunkError> {
        if raw.len() > MAX_CHUNK {
            return Err(ChunkError::TooLarge(raw.len()));
        }
        let (encoding, payload) = self.choose(raw)?;
        self.stats.record_chunk(
            encoding,
            chunk::frame_len(raw.len()),
            chunk::frame_len(payload.len()),
        );
        Ok(payload)
    }

    fn choose(&mut self, raw: &[u8]) -> Result<(Encoding, Bytes), ChunkError> {
        if self.policy == Compression::Off {
            return Ok((Encoding::Plain, chunk::plain(raw)?));
        }
        let now = std::time::Instant::now();
        let gap = self.last_chunk.replace(now).map(|l| now - l);
        if !raw.is_empty() && chunk::is_all_zero(raw) {
            return Ok((Encoding::Zeros, chunk::zeros(raw.len())?));
        }
        let measured = self.policy == Compression::Auto && raw.len() >= MIN_TRY_LEN;
        if let (true, Some(gap)) = (measured, gap) {
            self.auto.observe_gap(gap.as_nanos() as u64);
        }
        let try_zstd =
            raw.len() >= MIN_TRY_LEN && (self.policy == Compression::On || self.auto.wants_zstd());
        if !try_zstd {
            if measured {
                self.auto.observe_plain(raw.len() as u64);
            }
            return Ok((Encoding::Plain, chunk::plain(raw)?));
        }
        let started = std::time::Instant::now();
        let compressed = self.compress(raw);
        let ns = started.elapsed().as_nanos() as u64;
        let out = compressed
            .as_ref()
            .map_or(raw.len(), |c| c.len() - CHUNK_HEADER_LEN) as u64;
        self.stats.record_tried(raw.len() as u64, out);
        if self.policy == Compression::Auto {
            if let Some(link) = &self.link {
                self.auto
                    .set_link(link.load(std::sync::atomic::Ordering::Relaxed));
            }
            self.auto.observe_cost(ns);
            self.auto.observe_tried(raw.len() as u64, out);
        }
        match compressed {
            Some(c) => Ok((Encoding::Zstd, c)),
            None => Ok((Encoding::Plain, chunk::plain(raw)?)),
        }
    }

    /// A zstd chunk for `raw` if zstd makes it strictly smaller. The output buffer is only as
    /// large as the plain chunk, so zstd gives up as soon as it would not gain.
    fn compress(&mut self, raw: &[u8]) -> Option<Bytes> {
        if self.zstd_unavailable {
            return None;
        }
        let cctx = match &mut self.zstd {
            Some(c) => c,
            None => match zstd::bulk::Compressor::new(ZSTD_LEVEL) {
                Ok(c) => self.zstd.insert(c),
                Err(_) => {
                    self.zstd_unavailable = true;
                    return None;
                }
            },
        };
        let mut buf: Vec<u8> = Vec::with_capacity(CHUNK_HEADER_LEN + raw.len());
        buf.extend_from_slice(&chunk::header(Encoding::Zstd, raw.len()));
        let n = {
            let mut cursor = Cursor::new(&mut buf);
            cursor.set_position(CHUNK_HEADER_LEN as u64);
            cctx.compress_to_buffer(raw, &mut cursor).ok()?
        };
        if n >= raw.len() || buf.len() != CHUNK_HEADER_LEN + n {
            return None;
        }
        Some(Bytes::from(buf))
    }

    /// Ends the current stream and starts measuring a new one, keeping the zstd context.
    pub fn restart(&mut self) {
        self.finish();
        self.auto = AutoState::new();
        self.last_chunk = None;
        self.finished = false;
    }

    /// Ends the stream: records whether `auto` ended up compressing it. Later calls do nothing.
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.policy == Compression::Auto {
            self.stats.record_stream(self.auto.decided());
        }
    }
}

impl Drop for ChunkEncoder {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_meter_waits_for_enough_time_and_respects_the_limit() {
        use std::sync::atomic::Ordering::Relaxed;
        let ms = std::time::Duration::from_millis;
        let m = LinkMeter::default();
        m.record(1 << 20, ms(1), 0);
        assert_eq!(m.estimate().load(Relaxed), 0);
        m.record(1 << 20, ms(1), 50 << 20);
        assert_eq!(m.estimate().load(Relaxed), 50 << 20);
        // 4 MiB in 8 ms in all: 500 MiB/s.
        m.record(2 << 20, ms(6), 0);
        assert_eq!(m.estimate().load(Relaxed), 500 << 20);
        m.record(0, ms(0), 100 << 20);
        assert_eq!(m.estimate().load(Relaxed), 100 << 20);
    }

    #[test]
    fn auto_compresses_only_where_zstd_outruns_the_link() {
        // 4 MiB measured at a 2x ratio in 10 ms: zstd at ~420 MB/s.
        for (link, want) in [
            (0u64, true),
            (50_000_000, true),
            (300_000_000, true),
            (400_000_000, false),
            (2_000_000_000, false),
        ] {
            let mut a = AutoState::new();
            a.set_link(link);
            a.observe_cost(10_000_000);
            let d = a
                .observe_tried(AUTO_PROBE_BYTES, AUTO_PROBE_BYTES / 2)
                .unwrap();
            assert_eq!(d.compress, want, "link {link} B/s");
        }
        let mut untimed = AutoState::new();
        untimed.set_link(2_000_000_000);
        assert!(
            untimed
                .observe_tried(AUTO_PROBE_BYTES, AUTO_PROBE_BYTES / 2)
                .unwrap()
                .compress
        );
    }
    use crate::chunk::ChunkDecoder;
    use proptest::prelude::*;

    fn text(len: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                b"abcdefgh"[(s & 7) as usize]
            })
            .collect()
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    fn encoding(payload: &[u8]) -> u8 {
        payload[0]
    }

    #[test]
    fn probe_decides_to_compress_compressible_data() {
        let mut a = AutoState::new();
        let step = 1 << 20;
        let mut decision = None;
        for _ in 0..4 {
            decision = a.observe_tried(step, step / 2).or(decision);
        }
        assert_eq!(
            decision,
            Some(Decision {
                compress: true,
                ratio: 2.0
            })
        );
        assert_eq!(a.phase(), AutoPhase::PaceCompressed);
        assert!(a.wants_zstd());
    }

    /// Feeds one pace window of 1 MiB chunks, each `ns` after the previous one, and returns
    /// the decision that closed it (plain windows decide; compressed ones lead to plain).
    fn pace_window(a: &mut AutoState, ns: u64) -> Option<Decision> {
        let step = 1 << 20;
        let mut d = None;
        // One chunk more than the window: the first only starts the clock.
        for i in 0..=(AUTO_PACE_BYTES / step) {
            // The first chunk's gap belongs to the previous window and must not count.
            a.observe_gap(if i == 0 { 1_000_000_000 } else { ns });
            d = if a.wants_zstd() {
                a.observe_tried(step, step / 2)
            } else {
                a.observe_plain(step)
            }
            .or(d);
        }
        d
    }

    fn probed() -> AutoState {
        let mut a = AutoState::new();
        a.observe_tried(AUTO_PROBE_BYTES, AUTO_PROBE_BYTES / 2);
        assert_eq!(a.phase(), AutoPhase::PaceCompressed);
        a
    }

    #[test]
    fn compressing_stays_only_where_it_moved_the_stream_faster() {
        // ns per 1 MiB chunk compressed, then plain: what the pace windows saw.
        for (compressed_ns, plain_ns, want) in [
            (5_000_000u64, 8_000_000u64, true), // a slow link: compressing pays
            (4_000_000, 4_000_000, false),      // as fast: the CPU is spent for nothing
            (3_900_000, 4_000_000, false),      // 2.5% faster: inside the margin
            (3_700_000, 4_000_000, true),       // 8% faster
            (6_000_000, 3_000_000, false),      // a receiver that decompresses slower
            (0, 4_000_000, true),               // compressed window not timed
            (4_000_000, 0, true),               // plain window not timed
        ] {
            let mut a = probed();
            assert_eq!(pace_window(&mut a, compressed_ns), None);
            assert_eq!(
                a.phase(),
                AutoPhase::PacePlain,
                "{compressed_ns}/{plain_ns}"
            );
            assert!(!a.wants_zstd());
            let d = pace_window(&mut a, plain_ns).expect("the plain window decides");
            assert_eq!(d.compress, want, "{compressed_ns}/{plain_ns}");
            assert_eq!(a.decided(), Some(want));
            let phase = if want {
                AutoPhase::Compressing
            } else {
                AutoPhase::Plain
            };
            assert_eq!(a.phase(), phase);
        }
    }

    #[test]
    fn a_stream_timed_faster_plain_is_measured_again_only_much_later() {
        let mut a = probed();
        pace_window(&mut a, 4_000_000);
        assert!(!pace_window(&mut a, 2_000_000).unwrap().compress);
        let step = 1 << 20;
        for _ in 0..(AUTO_REPROBE_AFTER / step) {
            a.observe_plain(step);
        }
        assert_eq!(a.phase(), AutoPhase::Plain);
        for _ in (AUTO_REPROBE_AFTER / step)..(AUTO_REPROBE_AFTER_PACE / step) {
            a.observe_plain(step);
        }
        assert_eq!(a.phase(), AutoPhase::Probing);
        // A probe that fails on the ratio goes back to the short wait.
        a.observe_tried(AUTO_PROBE_BYTES, AUTO_PROBE_BYTES);
        assert_eq!(a.phase(), AutoPhase::Plain);
        for _ in 0..(AUTO_REPROBE_AFTER / step) {
            a.observe_plain(step);
        }
        assert_eq!(a.phase(), AutoPhase::Probing);
    }

    #[test]
    fn probe_gives_up_below_the_threshold_and_measures_again_later() {
        let mut a = AutoState::new();
        let step = 1 << 20;
        for _ in 0..4 {
            a.observe_tried(step, step * 10 / 11);
        }
        assert_eq!(a.phase(), AutoPhase::Plain);
        assert_eq!(a.decided(), Some(false));
        assert!(!a.wants_zstd());
        for _ in 0..(AUTO_REPROBE_AFTER / step) {
            a.observe_plain(step);
        }
        assert_eq!(a.phase(), AutoPhase::Probing);
    }

    #[test]
    fn compressing_stops_when_the_data_turns_incompressible() {
        let mut a = probed();
        pace_window(&mut a, 0);
        pace_window(&mut a, 0);
        assert_eq!(a.phase(), AutoPhase::Compressing);
        let d = a.observe_tried(AUTO_RECHECK_BYTES, AUTO_RECHECK_BYTES);
        assert_eq!(
            d,
            Some(Decision {
                compress: false,
                ratio: 1.0
            })
        );
        assert_eq!(a.phase(), AutoPhase::Plain);
    }

    #[test]
    fn auto_compresses_text_and_leaves_noise_plain() {
        let chunk = 256 << 10;
        let stats = Arc::new(TransferStats::default());
        let mut text_enc = ChunkEncoder::new(Compression::Auto, stats.clone());
        let mut noise_enc = ChunkEncoder::new(Compression::Auto, stats.clone());
        let mut d = ChunkDecoder::new();
        for i in 0..40 {
            let t = text(chunk, i + 1);
            let p = text_enc.encode(&t).unwrap();
            assert_eq!(encoding(&p), Encoding::Zstd as u8);
            assert_eq!(&d.decode(p).unwrap()[..], &t[..]);
            let n = noise(chunk, i + 1);
            let p = noise_enc.encode(&n).unwrap();
            assert_eq!(encoding(&p), Encoding::Plain as u8);
            assert_eq!(&d.decode(p).unwrap()[..], &n[..]);
        }
        // 6 MiB after the 4 MiB probe: still inside the compressed pace window.
        assert_eq!(text_enc.auto_state().phase(), AutoPhase::PaceCompressed);
        assert_eq!(noise_enc.auto_state().phase(), AutoPhase::Plain);
        drop(text_enc);
        drop(noise_enc);
        let s = stats.snapshot();
        assert_eq!((s.streams_compressed, s.streams_plain), (1, 1));
        // Noise was only tried while probing: 16 of its 40 chunks.
        assert_eq!(s.tried_in, (40 + 16) * chunk as u64);
    }

    #[test]
    fn zero_chunks_are_elided_and_not_measured() {
        let stats = Arc::new(TransferStats::default());
        let mut enc = ChunkEncoder::new(Compression::Auto, stats.clone());
        for _ in 0..100 {
            let p = enc.encode(&vec![0u8; 1 << 20]).unwrap();
            assert_eq!(&p[..], &chunk::header(Encoding::Zeros, 1 << 20));
        }
        assert_eq!(enc.auto_state().phase(), AutoPhase::Probing);
        let s = stats.snapshot();
        assert_eq!(s.tried_in, 0);
        assert_eq!(s.chunks_zeros, 100);
        assert_eq!(s.wire, 100 * 10);
    }

    #[test]
    fn off_sends_everything_plain_even_zeros() {
        let stats = Arc::new(TransferStats::default());
        let mut enc = ChunkEncoder::new(Compression::Off, stats.clone());
        for data in [vec![0u8; 4096], text(4096, 3)] {
            let p = enc.encode(&data).unwrap();
            assert_eq!(encoding(&p), Encoding::Plain as u8);
        }
        assert_eq!(stats.snapshot().tried_in, 0);
    }

    #[test]
    fn on_falls_back_to_plain_when_zstd_does_not_shrink() {
        let stats = Arc::new(TransferStats::default());
        let mut enc = ChunkEncoder::new(Compression::On, stats.clone());
        let n = noise(64 << 10, 9);
        let p = enc.encode(&n).unwrap();
        assert_eq!(encoding(&p), Encoding::Plain as u8);
        assert_eq!(p.len(), n.len() + CHUNK_HEADER_LEN);
        let t = text(64 << 10, 9);
        assert_eq!(encoding(&enc.encode(&t).unwrap()), Encoding::Zstd as u8);
    }

    #[test]
    fn small_chunks_are_not_tried() {
        let stats = Arc::new(TransferStats::default());
        let mut enc = ChunkEncoder::new(Compression::On, stats.clone());
        let p = enc.encode(b"GET page 0x7f00 count 1").unwrap();
        assert_eq!(encoding(&p), Encoding::Plain as u8);
        assert_eq!(stats.snapshot().tried_in, 0);
    }

    #[test]
    fn oversized_chunks_are_refused() {
        let mut enc = ChunkEncoder::new(Compression::On, Arc::default());
        assert_eq!(
            enc.encode(&vec![1u8; MAX_CHUNK + 1]),
            Err(ChunkError::TooLarge(MAX_CHUNK + 1))
        );
        assert!(enc.encode(&vec![1u8; MAX_CHUNK]).is_ok());
    }

    fn policy_strategy() -> impl Strategy<Value = Compression> {
        prop_oneof![
            Just(Compression::Off),
            Just(Compression::On),
            Just(Compression::Auto)
        ]
    }

    proptest! {
        #[test]
        fn encoder_output_always_decodes_to_the_input(
            policy in policy_strategy(),
            chunks in proptest::collection::vec((0usize..3, 0usize..20000, any::<u64>()), 1..12),
        ) {
            let mut enc = ChunkEncoder::new(policy, Arc::default());
            let mut dec = ChunkDecoder::new();
            for (kind, len, seed) in chunks {
                let raw = match kind { 0 => vec![0u8; len], 1 => text(len, seed), _ => noise(len, seed) };
                let payload = enc.encode(&raw).unwrap();
                prop_assert!(payload.len() <= raw.len() + CHUNK_HEADER_LEN);
                prop_assert_eq!(&dec.decode(payload).unwrap()[..], &raw[..]);
            }
        }

        #[test]
        fn auto_decides_exactly_at_the_probe_window(sizes in proptest::collection::vec((1u64..(1 << 20), 1u64..(1 << 20)), 1..64)) {
            let mut a = AutoState::new();
            let mut seen = 0u64;
            let mut out = 0u64;
            for (raw, o) in sizes {
                let o = o.min(raw);
                seen += raw;
                out += o;
                let d = a.observe_tried(raw, o);
                if seen >= AUTO_PROBE_BYTES {
                    let d = d.expect("the window closed");
                    prop_assert_eq!(d.compress, ratio(seen, out) >= AUTO_MIN_RATIO);
                    break;
                }
                prop_assert_eq!(d, None);
                prop_assert_eq!(a.phase(), AutoPhase::Probing);
            }
        }
    }
}
