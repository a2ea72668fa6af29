//! Pre-copy checkpoints: iterative `runc checkpoint --pre-dump` rounds copy a running
//! container's memory while it keeps running, each round writing only the pages the kernel's
//! soft-dirty bits say changed since the previous one; a final dump then freezes the container
//! and writes just the pages dirtied since the last round. The freeze window shrinks from
//! "all memory" to "the working set dirtied in one round".
//!
//! Directory layout, for `images` and `work` chosen by the caller:
//!
//! ```text
//! images/1/            round 1 (full copy, no parent)
//! images/2/parent -> ../1
//! ...
//! images/final/parent -> ../N
//! work/1/dump.log, work/1/stats-dump, ...
//! ```
//!
//! CRIU resolves `--parent-path` relative to the image directory and records it as the
//! relative `parent` symlink; a restore follows that chain, so the target must receive every
//! round's directory under the same names.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::checkpoint::RuncHandle;
pub use crate::image::ImageError as StatsError;
use crate::image::{next_field, read_u32_le, take, Field};
use crate::proc::{quote_log, quote_text, run, ToolError};

/// At most this many pre-dump rounds. Go-criu's phaul uses 8: a workload that dirties memory
/// faster than CRIU copies it never converges, and each further round only costs time.
pub const MAX_ROUNDS: usize = 8;

/// A round that wrote fewer pages than this (256 KiB) means the working set is copied: the
/// final dump's freeze cannot get meaningfully shorter by another round (phaul's
/// `minPagesWritten`).
pub const MIN_PAGES_WRITTEN: u64 = 64;

/// A round that wrote at least this many more pages than the round before means the workload
/// dirties faster than rounds copy, so waiting longer makes the final dump bigger, not smaller
/// (phaul's `maxGrowDelta`).
pub const MAX_GROWTH_PAGES: u64 = 32;

/// A round must write at least this share (percent) fewer pages than the one before to be worth
/// another: a working set that a live client keeps rewriting plateaus (measured in the
/// soft-dirty guest: Redis under one client settled at ~1 630 pages a round from round 2 on),
/// and further rounds then only add CPU time and bytes without shortening the final freeze.
pub const MIN_SHRINK_PERCENT: u64 = 10;

/// Image directory name of the final (freezing) dump, beside the numbered rounds.
pub const FINAL_DIR: &str = "final";

/// CRIU's `stats-dump` service image: two magic words, then one length-prefixed `StatsEntry`.
const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
const STATS_MAGIC: u32 = 0x5709_3306;

/// The counters of one dump or pre-dump, CRIU's `dump_stats_entry` (images/stats.proto).
/// Times are microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpStats {
    pub freezing_time_us: u32,
    pub frozen_time_us: u32,
    pub memdump_time_us: u32,
    pub memwrite_time_us: u32,
    pub pages_scanned: u64,
    pub pages_skipped_parent: u64,
    pub pages_written: u64,
    pub irmap_resolve_us: Option<u32>,
    pub pages_lazy: u64,
    pub page_pipes: Option<u64>,
    pub page_pipe_bufs: Option<u64>,
    pub shpages_scanned: Option<u64>,
    pub shpages_skipped_parent: Option<u64>,
    pub shpages_written: Option<u64>,
}

/// One pre-dump round (or the final dump) as the caller observed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundStats {
    /// 1-based round number; the final dump carries the number it would have had.
    pub round: u32,
    pub image_dir: PathBuf,
    /// Wall time of the whole `runc checkpoint` call, which CRIU's own timers do not cover
    /// (runc start-up, CRIU's RPC set-up, parasite injection).
    pub wall_ms: u64,
    pub stats: DumpStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// [`MAX_ROUNDS`] rounds are done.
    MaxRounds,
    /// The last round wrote fewer than [`MIN_PAGES_WRITTEN`] pages.
    Converged,
    /// The last round wrote at least [`MAX_GROWTH_PAGES`] more pages than the one before.
    Growing,
    /// The last round shrank the dirty set by less than [`MIN_SHRINK_PERCENT`].
    Stalled,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::MaxRounds => "max-rounds",
            StopReason::Converged => "converged",
            StopReason::Growing => "growing",
            StopReason::Stalled => "stalled",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrecopyDecision {
    Continue,
    Stop { reason: StopReason },
}

/// Whether to run another pre-dump round after `history` (oldest first), or go to the final
/// dump. Rules are checked in phaul's order: round budget, convergence, growth; then a stall
/// (phaul has no such rule and keeps copying a plateaued working set until its budget ends).
///
/// Unlike phaul, growth is only judged from the second round on: phaul compares round 1 with
/// an all-zero "previous" entry, so any first round that writes 64 pages or more stops the
/// iteration at once and pre-copy degenerates into a single pre-dump.
pub fn next_step(history: &[RoundStats]) -> PrecopyDecision {
    let Some(last) = history.last() else {
        return PrecopyDecision::Continue;
    };
    if history.len() >= MAX_ROUNDS {
        return PrecopyDecision::Stop {
            reason: StopReason::MaxRounds,
        };
    }
    let written = last.stats.pages_written;
    if written < MIN_PAGES_WRITTEN {
        return PrecopyDecision::Stop {
            reason: StopReason::Converged,
        };
    }
    if let [.., prev, _] = history {
        if written.saturating_sub(prev.stats.pages_written) >= MAX_GROWTH_PAGES {
            return PrecopyDecision::Stop {
                reason: StopReason::Growing,
            };
        }
        if written * 100 > prev.stats.pages_written * (100 - MIN_SHRINK_PERCENT) {
            return PrecopyDecision::Stop {
                reason: StopReason::Stalled,
            };
        }
    }
    PrecopyDecision::Continue
}

fn u32_field(name: &'static str, v: u64) -> Result<u32, StatsError> {
    u32::try_from(v).map_err(|_| StatsError::OutOfRange { name, value: v })
}

/// Decodes a `dump_stats_entry` message body. Unknown fields are skipped, so a newer CRIU that
/// adds counters still parses.
pub fn decode_dump_stats(buf: &[u8]) -> Result<DumpStats, StatsError> {
    let mut s = DumpStats::default();
    let mut seen = [false; 10];
    let mut pos = 0;
    while pos < buf.len() {
        let (number, wire_type, field) = next_field(buf, &mut pos)?;
        let Field::Varint(v) = field else {
            if (1..=14).contains(&number) {
                return Err(StatsError::WireType {
                    field: number,
                    wire_type,
                    expected: 0,
                });
            }
            continue;
        };
        match number {
            1 => s.freezing_time_us = u32_field("freezing_time", v)?,
            2 => s.frozen_time_us = u32_field("frozen_time", v)?,
            3 => s.memdump_time_us = u32_field("memdump_time", v)?,
            4 => s.memwrite_time_us = u32_field("memwrite_time", v)?,
            5 => s.pages_scanned = v,
            6 => s.pages_skipped_parent = v,
            7 => s.pages_written = v,
            8 => s.irmap_resolve_us = Some(u32_field("irmap_resolve", v)?),
            9 => s.pages_lazy = v,
            10 => s.page_pipes = Some(v),
            11 => s.page_pipe_bufs = Some(v),
            12 => s.shpages_scanned = Some(v),
            13 => s.shpages_skipped_parent = Some(v),
            14 => s.shpages_written = Some(v),
            _ => {}
        }
        if let Some(flag) = usize::try_from(number).ok().and_then(|n| seen.get_mut(n)) {
            *flag = true;
        }
    }
    const REQUIRED: [(usize, &str); 8] = [
        (1, "freezing_time"),
        (2, "frozen_time"),
        (3, "memdump_time"),
        (4, "memwrite_time"),
        (5, "pages_scanned"),
        (6, "pages_skipped_parent"),
        (7, "pages_written"),
        (9, "pages_lazy"),
    ];
    for (n, name) in REQUIRED {
        if !seen[n] {
            return Err(StatsError::Missing(name));
        }
    }
    Ok(s)
}

/// Decodes a whole `stats-dump` file: service magic, stats magic, a little-endian u32 length,
/// then a `stats_entry` whose field 1 is the `dump_stats_entry`.
pub fn parse_stats_dump(file: &[u8]) -> Result<DumpStats, StatsError> {
    let mut pos = 0;
    for expected in [IMG_SERVICE_MAGIC, STATS_MAGIC] {
        let found = read_u32_le(file, &mut pos)?;
        if found != expected {
            return Err(StatsError::BadMagic { found, expected });
        }
    }
    let len = read_u32_le(file, &mut pos)? as usize;
    let entry = take(file, &mut pos, len)?;
    if pos != file.len() {
        return Err(StatsError::Trailing(file.len() - pos));
    }
    let mut dump = None;
    let mut p = 0;
    while p < entry.len() {
        let (number, wire_type, field) = next_field(entry, &mut p)?;
        if number == 1 {
            match field {
                Field::Bytes(b) => dump = Some(decode_dump_stats(b)?),
                _ => {
                    return Err(StatsError::WireType {
                        field: 1,
                        wire_type,
                        expected: 2,
                    })
                }
            }
        }
    }
    dump.ok_or(StatsError::Missing("dump"))
}

/// Reads `stats-dump` from a dump's work directory: CRIU writes it to its working directory,
/// which runc sets to `--work-path`, not to the image directory.
pub fn read_stats_dump(work_dir: &Path) -> Result<DumpStats, ToolError> {
    let path = work_dir.join("stats-dump");
    let bytes = std::fs::read(&path).map_err(|e| ToolError::Other {
        step: "read dump stats".into(),
        message: format!("cannot read {}: {e}", path.display()),
        log: quote_log(&work_dir.join("dump.log")),
    })?;
    parse_stats_dump(&bytes).map_err(|e| ToolError::Other {
        step: "read dump stats".into(),
        message: format!("{}: {e}", path.display()),
        log: vec![],
    })
}

/// Where the rounds go, and how long one `runc checkpoint` may take.
#[derive(Debug, Clone)]
pub struct PrecopyOptions {
    /// Parent of the per-round image directories (`1`, `2`, …, `final`).
    pub images: PathBuf,
    /// Parent of the per-round CRIU work directories (logs and `stats-dump`), kept apart from
    /// the images so that only images need to travel.
    pub work: PathBuf,
    pub tcp_established: bool,
    pub timeout: Duration,
}

impl PrecopyOptions {
    pub fn round_dir(&self, round: u32) -> PathBuf {
        self.images.join(round.to_string())
    }
    pub fn final_dir(&self) -> PathBuf {
        self.images.join(FINAL_DIR)
    }
    fn work_dir(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }
}

/// `--parent-path` for a dump following `round`: runc refuses absolute paths and CRIU resolves
/// the path from the new image directory, which sits beside the parent.
pub fn parent_arg(round: u32) -> String {
    format!("../{round}")
}

fn fresh_dir(step: &str, dir: &Path) -> Result<(), ToolError> {
    let other = |message: String| ToolError::Other {
        step: step.into(),
        message,
        log: vec![],
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| other(format!("cannot create {}: {e}", dir.display())))?;
    let mut entries =
        std::fs::read_dir(dir).map_err(|e| other(format!("cannot list {}: {e}", dir.display())))?;
    if entries.next().is_some() {
        // Left-over images of an earlier attempt would be taken as this round's.
        return Err(other(format!("{} is not empty", dir.display())));
    }
    Ok(())
}

/// Runs one `runc checkpoint` with `extra` options into fresh image and work directories and
/// returns CRIU's statistics for it.
async fn runc_dump(
    h: &RuncHandle,
    o: &PrecopyOptions,
    step: &str,
    round: u32,
    image_dir: PathBuf,
    work_dir: PathBuf,
    extra: &[&str],
) -> Result<RoundStats, ToolError> {
    fresh_dir(step, &image_dir)?;
    fresh_dir(step, &work_dir)?;
    let root = h.root.to_string_lossy().into_owned();
    let image = image_dir.to_string_lossy().into_owned();
    let work = work_dir.to_string_lossy().into_owned();
    let mut args: Vec<&str> = vec![
        "--root",
        &root,
        "checkpoint",
        "--image-path",
        &image,
        "--work-path",
        &work,
    ];
    args.extend_from_slice(extra);
    if o.tcp_established {
        args.push("--tcp-established");
    }
    args.push(&h.id);
    let started = Instant::now();
    let out = run(step, &h.binary, &args, o.timeout)
        .await
        .map_err(|e| match e {
            ToolError::Timeout {
                step,
                program,
                secs,
                ..
            } => ToolError::Timeout {
                step,
                program,
                secs,
                log: quote_log(&work_dir.join("dump.log")),
            },
            other => other,
        })?;
    let wall_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if out.status != 0 {
        let mut log = quote_log(&work_dir.join("dump.log"));
        log.extend(quote_text(&out.stderr));
        return Err(ToolError::Failed {
            step: step.into(),
            program: format!("{} checkpoint", h.binary),
            status: format!("exit {}", out.status),
            log,
        });
    }
    let stats = read_stats_dump(&work_dir)?;
    tracing::info!(
        wall_ms,
        pages_scanned = stats.pages_scanned,
        pages_written = stats.pages_written,
        pages_skipped_parent = stats.pages_skipped_parent,
        frozen_us = stats.frozen_time_us,
        "{step} done"
    );
    Ok(RoundStats {
        round,
        image_dir,
        wall_ms,
        stats,
    })
}

/// Pre-dump round `round` (1-based) into `images/<round>`, on top of round `round - 1`. The
/// container keeps running; CRIU resets its soft-dirty bits so the next round sees only what
/// changed after this one.
pub async fn pre_dump(
    h: &RuncHandle,
    o: &PrecopyOptions,
    round: u32,
) -> Result<RoundStats, ToolError> {
    let parent = (round > 1).then(|| parent_arg(round - 1));
    let mut extra = vec!["--pre-dump"];
    if let Some(p) = &parent {
        extra.push("--parent-path");
        extra.push(p);
    }
    let name = round.to_string();
    runc_dump(
        h,
        o,
        "pre-dump",
        round,
        o.round_dir(round),
        o.work_dir(&name),
        &extra,
    )
    .instrument(tracing::info_span!("pre-dump", round))
    .await
}

/// The final dump into `images/final`, on top of pre-dump round `last_round` (none: a plain
/// full dump). Without `leave_running` runc stops the container and deletes it afterwards.
pub async fn final_dump(
    h: &RuncHandle,
    o: &PrecopyOptions,
    last_round: Option<u32>,
    leave_running: bool,
) -> Result<RoundStats, ToolError> {
    let parent = last_round.map(parent_arg);
    let mut extra = Vec::new();
    if let Some(p) = &parent {
        extra.push("--parent-path");
        extra.push(p.as_str());
    }
    if leave_running {
        extra.push("--leave-running");
    }
    let round = last_round.unwrap_or(0) + 1;
    runc_dump(
        h,
        o,
        "final dump",
        round,
        o.final_dir(),
        o.work_dir(FINAL_DIR),
        &extra,
    )
    .instrument(tracing::info_span!("final-dump", round))
    .await
}

/// The pre-dump rounds of one migration and why they stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Precopy {
    pub rounds: Vec<RoundStats>,
    pub reason: StopReason,
}

impl Precopy {
    pub fn last_round(&self) -> Option<u32> {
        self.rounds.last().map(|r| r.round)
    }
}

/// Runs pre-dump rounds until [`next_step`] says stop. `after_round` sees each round as it
/// completes (to ship its images, or to observe the workload) before the next one starts.
pub async fn run_precopy(
    h: &RuncHandle,
    o: &PrecopyOptions,
    mut after_round: impl FnMut(&RoundStats),
) -> Result<Precopy, ToolError> {
    let mut rounds: Vec<RoundStats> = Vec::new();
    loop {
        let n = u32::try_from(rounds.len() + 1).unwrap_or(u32::MAX);
        let r = pre_dump(h, o, n).await?;
        after_round(&r);
        rounds.push(r);
        if let PrecopyDecision::Stop { reason } = next_step(&rounds) {
            tracing::info!(rounds = rounds.len(), %reason, "pre-copy stops");
            return Ok(Precopy { rounds, reason });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::write_varint;
    use proptest::prelude::*;

    fn field(n: u64, v: u64, out: &mut Vec<u8>) {
        write_varint(n << 3, out);
        write_varint(v, out);
    }

    /// A `stats-dump` file as CRIU 4.2 writes it, built by hand.
    fn stats_file(body: &[u8]) -> Vec<u8> {
        let mut entry = vec![0x0a];
        write_varint(body.len() as u64, &mut entry);
        entry.extend_from_slice(body);
        let mut f = Vec::new();
        f.extend_from_slice(&IMG_SERVICE_MAGIC.to_le_bytes());
        f.extend_from_slice(&STATS_MAGIC.to_le_bytes());
        f.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        f.extend_from_slice(&entry);
        f
    }

    fn full_body() -> Vec<u8> {
        let mut b = Vec::new();
        for (n, v) in [
            (1, 1200),
            (2, 345_678),
            (3, 90_000),
            (4, 250_000),
            (5, 66_000),
            (6, 61_000),
            (7, 4_321),
            (8, 0),
            (9, 0),
            (10, 3),
            (11, 17),
            (12, 0),
            (13, 0),
            (14, 0),
        ] {
            field(n, v, &mut b);
        }
        b
    }

    #[test]
    fn a_hand_built_stats_dump_decodes() {
        let s = parse_stats_dump(&stats_file(&full_body())).unwrap();
        assert_eq!(
            s,
            DumpStats {
                freezing_time_us: 1200,
                frozen_time_us: 345_678,
                memdump_time_us: 90_000,
                memwrite_time_us: 250_000,
                pages_scanned: 66_000,
                pages_skipped_parent: 61_000,
                pages_written: 4_321,
                irmap_resolve_us: Some(0),
                pages_lazy: 0,
                page_pipes: Some(3),
                page_pipe_bufs: Some(17),
                shpages_scanned: Some(0),
                shpages_skipped_parent: Some(0),
                shpages_written: Some(0),
            }
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    /// `stats-dump` files CRIU 4.2.1 wrote in the precopy VM test (kernel 6.1, runc 1.1.5):
    /// pre-dump round 2 and the final dump, each on top of its parent.
    #[test]
    fn stats_dumps_written_by_criu_decode() {
        let round2 = hex(
            "40 59 10 55 06 33 09 57 2b 00 00 00 0a 29 08 90 90 07 10 a3 b2 0a 18 82 95 03 20 ba \
             a8 05 28 ad 93 04 30 e5 e0 03 38 95 20 40 00 48 00 50 05 58 06 60 00 68 00 70 00",
        );
        let s = parse_stats_dump(&round2).unwrap();
        assert_eq!(
            (
                s.freezing_time_us,
                s.frozen_time_us,
                s.memdump_time_us,
                s.memwrite_time_us
            ),
            (116_752, 170_275, 51_842, 87_098)
        );
        assert_eq!(
            (s.pages_scanned, s.pages_skipped_parent, s.pages_written),
            (68_013, 61_541, 4_117)
        );
        assert_eq!((s.page_pipes, s.page_pipe_bufs), (Some(5), Some(6)));

        let fin = hex(
            "40 59 10 55 06 33 09 57 2a 00 00 00 0a 28 08 f6 4e 10 fb 8f 3d 18 91 c7 06 20 9a cb \
             04 28 ad 93 04 30 ed e0 03 38 8d 20 40 00 48 00 50 06 58 06 60 00 68 00 70 00",
        );
        let s = parse_stats_dump(&fin).unwrap();
        assert_eq!(s.frozen_time_us, 1_001_467);
        assert_eq!(
            (s.pages_scanned, s.pages_skipped_parent, s.pages_written),
            (68_013, 61_549, 4_109)
        );
    }

    #[test]
    fn literal_bytes_decode() {
        // freezing 300 us (ac 02), pages_scanned 65536 (80 80 04), written 1, others 0.
        let body = [
            0x08, 0xac, 0x02, 0x10, 0x00, 0x18, 0x00, 0x20, 0x00, 0x28, 0x80, 0x80, 0x04, 0x30,
            0x00, 0x38, 0x01, 0x48, 0x00,
        ];
        let mut file = vec![
            0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 21, 0, 0, 0, 0x0a, 19,
        ];
        file.extend_from_slice(&body);
        let s = parse_stats_dump(&file).unwrap();
        assert_eq!(s.freezing_time_us, 300);
        assert_eq!(s.pages_scanned, 65_536);
        assert_eq!(s.pages_written, 1);
        assert_eq!(s.page_pipes, None);
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut b = full_body();
        field(15, 99, &mut b);
        write_varint((16 << 3) | 2, &mut b);
        b.extend_from_slice(&[3, 1, 2, 3]);
        write_varint((17 << 3) | 5, &mut b);
        b.extend_from_slice(&[0, 0, 0, 0]);
        write_varint((200 << 3) | 1, &mut b);
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        let s = parse_stats_dump(&stats_file(&b)).unwrap();
        assert_eq!(s.pages_written, 4_321);
    }

    #[test]
    fn a_missing_required_field_is_named() {
        let mut b = Vec::new();
        for n in [1, 2, 3, 4, 5, 6, 9] {
            field(n, 1, &mut b);
        }
        assert_eq!(
            parse_stats_dump(&stats_file(&b)),
            Err(StatsError::Missing("pages_written"))
        );
    }

    #[test]
    fn a_restore_stats_file_has_no_dump_entry() {
        let mut entry = vec![0x12, 2, 0x08, 0x01];
        let mut f = Vec::new();
        f.extend_from_slice(&IMG_SERVICE_MAGIC.to_le_bytes());
        f.extend_from_slice(&STATS_MAGIC.to_le_bytes());
        f.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        f.append(&mut entry);
        assert_eq!(parse_stats_dump(&f), Err(StatsError::Missing("dump")));
    }

    #[test]
    fn wrong_magic_and_truncation_are_errors() {
        let mut f = stats_file(&full_body());
        f[4] ^= 1;
        assert!(matches!(
            parse_stats_dump(&f),
            Err(StatsError::BadMagic { expected, .. }) if expected == STATS_MAGIC
        ));
        let f = stats_file(&full_body());
        for cut in 0..f.len() {
            assert!(parse_stats_dump(&f[..cut]).is_err(), "cut at {cut}");
        }
        let mut f = stats_file(&full_body());
        f.push(0);
        assert_eq!(parse_stats_dump(&f), Err(StatsError::Trailing(1)));
    }

    #[test]
    fn a_time_beyond_u32_is_refused() {
        let mut b = full_body();
        field(2, u64::from(u32::MAX) + 1, &mut b);
        assert!(matches!(
            parse_stats_dump(&stats_file(&b)),
            Err(StatsError::OutOfRange {
                name: "frozen_time",
                ..
            })
        ));
    }

    #[test]
    fn a_known_field_with_the_wrong_wire_type_is_refused() {
        let mut b = full_body();
        b.extend_from_slice(&[(7 << 3) | 2, 1, 0]);
        assert!(matches!(
            parse_stats_dump(&stats_file(&b)),
            Err(StatsError::WireType { field: 7, .. })
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_stats_dump(&bytes);
            let _ = decode_dump_stats(&bytes);
        }
    }

    fn rounds(written: &[u64]) -> Vec<RoundStats> {
        written
            .iter()
            .enumerate()
            .map(|(i, &w)| RoundStats {
                round: i as u32 + 1,
                image_dir: PathBuf::from(format!("/i/{}", i + 1)),
                wall_ms: 1,
                stats: DumpStats {
                    pages_scanned: 65_536,
                    pages_written: w,
                    ..DumpStats::default()
                },
            })
            .collect()
    }

    #[test]
    fn stop_rules() {
        use PrecopyDecision::*;
        use StopReason::*;
        let table: &[(&[u64], PrecopyDecision)] = &[
            (&[], Continue),
            // A large first round goes on: growth needs two rounds to compare.
            (&[65_536], Continue),
            (&[65_536, 4_000], Continue),
            (&[65_536, 4_000, 4_031], Stop { reason: Stalled }),
            (&[65_536, 4_000, 3_601], Stop { reason: Stalled }),
            (&[65_536, 4_000, 3_600], Continue),
            (&[1_637, 1_630], Stop { reason: Stalled }),
            (&[65_536, 4_000, 4_032], Stop { reason: Growing }),
            (&[65_536, 4_000, 9_000], Stop { reason: Growing }),
            (&[65_536, 63], Stop { reason: Converged }),
            (&[65_536, 64], Continue),
            (&[40], Stop { reason: Converged }),
            (&[0], Stop { reason: Converged }),
            // Convergence is judged before growth.
            (&[10, 63], Stop { reason: Converged }),
            (&[9_000, 8_000, 7_000, 6_000, 5_000, 4_000, 3_000], Continue),
            (
                &[9_000, 8_000, 7_000, 6_000, 5_000, 4_000, 3_000, 2_000],
                Stop { reason: MaxRounds },
            ),
            // The round budget wins over the other rules.
            (
                &[9_000, 8_000, 7_000, 6_000, 5_000, 4_000, 3_000, 10],
                Stop { reason: MaxRounds },
            ),
            (
                &[9_000, 8_000, 7_000, 6_000, 5_000, 4_000, 3_000, 9_000],
                Stop { reason: MaxRounds },
            ),
        ];
        for (written, want) in table {
            assert_eq!(next_step(&rounds(written)), *want, "{written:?}");
        }
    }

    #[test]
    fn a_parent_path_resolves_to_the_previous_round() {
        let base =
            std::env::temp_dir().join(format!("ferry-precopy-parent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let o = PrecopyOptions {
            images: base.join("images"),
            work: base.join("work"),
            tcp_established: false,
            timeout: Duration::from_secs(1),
        };
        for r in [3, 4] {
            std::fs::create_dir_all(o.round_dir(r)).unwrap();
        }
        std::fs::create_dir_all(o.final_dir()).unwrap();
        let resolved = o.round_dir(4).join(parent_arg(3)).canonicalize().unwrap();
        assert_eq!(resolved, o.round_dir(3).canonicalize().unwrap());
        let resolved = o.final_dir().join(parent_arg(4)).canonicalize().unwrap();
        assert_eq!(resolved, o.round_dir(4).canonicalize().unwrap());
        assert!(Path::new(&parent_arg(1)).is_relative());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn stop_reasons_serialise_as_their_names() {
        for r in [
            StopReason::MaxRounds,
            StopReason::Converged,
            StopReason::Growing,
            StopReason::Stalled,
        ] {
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{r}\""));
        }
    }

    #[test]
    fn a_non_empty_round_dir_is_refused() {
        let d = std::env::temp_dir().join(format!("ferry-precopy-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        fresh_dir("t", &d).unwrap();
        std::fs::write(d.join("pages-1.img"), b"x").unwrap();
        let err = fresh_dir("t", &d).unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
