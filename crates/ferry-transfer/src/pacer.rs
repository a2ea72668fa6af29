//! `--bandwidth-limit`: a token bucket in its GCRA form ([`TokenBucket`], plain arithmetic on
//! nanoseconds, so tests need no clock) behind an async handle ([`Pacer`]) that sleeps on the
//! tokio clock, never while holding its lock.

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

const NANOS_PER_S: u128 = 1_000_000_000;

/// Smallest burst a bucket allows: a few frames' worth, so small page requests are never held
/// back behind each other.
pub const MIN_BURST: u64 = 64 << 10;

/// Smallest chunk a paced stream is cut into.
pub const MIN_PACED_CHUNK: usize = 16 << 10;

/// Burst allowance for `rate`: 50 ms of it (at least [`MIN_BURST`]). Smooth enough not to flood
/// a shared link's queues, coarse enough that the sleeps stay well above timer resolution.
pub fn default_burst(rate: NonZeroU64) -> u64 {
    (rate.get() / 20).max(MIN_BURST)
}

/// How long `bytes` take at `rate`, in nanoseconds, rounded up.
pub fn cost_ns(bytes: u64, rate: NonZeroU64) -> u64 {
    let ns = (bytes as u128 * NANOS_PER_S).div_ceil(rate.get() as u128);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// Chunk size for a stream under a limit: a quarter second of it, between
/// [`MIN_PACED_CHUNK`] and `max`, so each send waits at most that long and a receiver waiting
/// for the next frame hears from the sender often; `max` when unlimited.
pub fn chunk_len(limit_bytes_per_s: u64, max: usize) -> usize {
    if limit_bytes_per_s == 0 {
        return max;
    }
    usize::try_from(limit_bytes_per_s / 4)
        .unwrap_or(max)
        .clamp(MIN_PACED_CHUNK.min(max), max)
}

/// A rate limit as a theoretical arrival time (GCRA): sending `n` bytes pushes it `n / rate`
/// later, and a send may start once it is no more than the burst allowance ahead of now.
///
/// Whatever the sizes and timing of the sends, the bytes sent before any send starts at time
/// `t` are at most `rate × t + burst`, and a sender that never pauses reaches the rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    rate: NonZeroU64,
    burst: u64,
    tat_ns: u64,
}

impl TokenBucket {
    pub fn new(rate: NonZeroU64) -> Self {
        Self::with_burst(rate, default_burst(rate))
    }

    pub fn with_burst(rate: NonZeroU64, burst: u64) -> Self {
        TokenBucket {
            rate,
            burst,
            tat_ns: 0,
        }
    }

    pub fn rate(&self) -> NonZeroU64 {
        self.rate
    }

    /// Books `n` bytes to be sent at `now_ns` (nanoseconds on a clock that starts at 0 and never
    /// goes back) and returns how many nanoseconds the caller must wait before sending them.
    pub fn reserve(&mut self, now_ns: u64, n: u64) -> u64 {
        let tau = cost_ns(self.burst, self.rate);
        let wait = self.tat_ns.saturating_sub(now_ns.saturating_add(tau));
        self.tat_ns = self
            .tat_ns
            .max(now_ns)
            .saturating_add(cost_ns(n, self.rate));
        wait
    }
}

#[derive(Debug)]
struct Shared {
    limit: u64,
    origin: Instant,
    bucket: Mutex<TokenBucket>,
    paced_ns: AtomicU64,
}

/// An async rate limit; clones share one budget. [`Pacer::unlimited`] costs nothing.
#[derive(Debug, Clone, Default)]
pub struct Pacer {
    shared: Option<Arc<Shared>>,
}

impl Pacer {
    /// A pacer for `bytes_per_s`; 0 is unlimited.
    pub fn new(bytes_per_s: u64) -> Self {
        match NonZeroU64::new(bytes_per_s) {
            None => Self::unlimited(),
            Some(rate) => Pacer {
                shared: Some(Arc::new(Shared {
                    limit: rate.get(),
                    origin: Instant::now(),
                    bucket: Mutex::new(TokenBucket::new(rate)),
                    paced_ns: AtomicU64::new(0),
                })),
            },
        }
    }

    pub fn unlimited() -> Self {
        Pacer { shared: None }
    }

    /// Bytes per second, 0 when unlimited.
    pub fn limit(&self) -> u64 {
        self.shared.as_ref().map_or(0, |s| s.limit)
    }

    /// Chunk size for streams under this pacer (see [`chunk_len`]).
    pub fn chunk_len(&self, max: usize) -> usize {
        chunk_len(self.limit(), max)
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn pace(&self, n: usize) {
        let Some(s) = &self.shared else {
            return;
        };
        let now = u64::try_from(s.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let wait = {
            let mut bucket = s.bucket.lock().unwrap_or_else(|p| p.into_inner());
            bucket.reserve(now, n as u64)
        };
        if wait > 0 {
            s.paced_ns.fetch_add(wait, Relaxed);
            tokio::time::sleep(Duration::from_nanos(wait)).await;
        }
    }

    /// Total time sends were held back so far.
    pub fn paced(&self) -> Duration {
        Duration::from_nanos(self.shared.as_ref().map_or(0, |s| s.paced_ns.load(Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rate(r: u64) -> NonZeroU64 {
        NonZeroU64::new(r).unwrap()
    }

    #[test]
    fn an_idle_sender_may_burst_then_is_held_to_the_rate() {
        let mut b = TokenBucket::with_burst(rate(1000), 500);
        assert_eq!(b.reserve(0, 500), 0);
        // 500 bytes booked = 0.5 s, all within the 0.5 s allowance.
        assert_eq!(b.reserve(0, 500), 0);
        // Now a full second is booked: the next send waits until that is back within 0.5 s.
        assert_eq!(b.reserve(0, 100), 500_000_000);
        // Idle long enough, the allowance is back.
        assert_eq!(b.reserve(10_000_000_000, 500), 0);
    }

    #[test]
    fn a_frame_larger_than_the_burst_goes_at_once_and_the_next_waits_for_it() {
        let mut b = TokenBucket::with_burst(rate(1 << 20), 64 << 10);
        assert_eq!(b.reserve(0, 4 << 20), 0);
        let wait = b.reserve(0, 1);
        assert_eq!(wait, 4_000_000_000 - cost_ns(64 << 10, rate(1 << 20)));
    }

    #[test]
    fn chunk_lengths_follow_the_limit() {
        assert_eq!(chunk_len(0, 1 << 20), 1 << 20);
        assert_eq!(chunk_len(100 << 20, 1 << 20), 1 << 20);
        assert_eq!(chunk_len(1 << 20, 1 << 20), 256 << 10);
        assert_eq!(chunk_len(1000, 1 << 20), MIN_PACED_CHUNK);
        assert_eq!(chunk_len(1000, 100), 100);
    }

    #[test]
    fn cost_rounds_up_and_saturates() {
        assert_eq!(cost_ns(1, rate(3)), 333_333_334);
        assert_eq!(cost_ns(u64::MAX, rate(1)), u64::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_sleeps_on_the_tokio_clock() {
        let p = Pacer::new(1 << 20);
        let start = Instant::now();
        for _ in 0..8 {
            p.pace(256 << 10).await;
        }
        // The last send starts once the 1.75 MiB before it had their time at 1 MiB/s, less the
        // 64 KiB burst allowance: 1750 ms − 62.5 ms.
        let took = start.elapsed();
        assert!(took >= Duration::from_micros(1_687_500), "{took:?}");
        assert!(took <= Duration::from_millis(1_700), "{took:?}");
        // Each sleep may overrun to the timer's next millisecond, which the next wait absorbs.
        let paced = p.paced();
        assert!(
            paced <= took && paced + Duration::from_millis(8) >= took,
            "{paced:?}"
        );
        assert_eq!(p.limit(), 1 << 20);
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_sleeps() {
        let p = Pacer::new(0);
        let start = Instant::now();
        p.pace(usize::MAX).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(p.limit(), 0);
    }

    proptest! {
        /// Bytes sent before any send starts never exceed rate × its start time + burst.
        #[test]
        fn never_exceeds_rate_plus_burst(
            r in 1u64..(1 << 32),
            burst in 0u64..(1 << 24),
            sends in proptest::collection::vec((0u64..2_000_000_000, 1u64..(8 << 20)), 1..64),
        ) {
            let mut b = TokenBucket::with_burst(rate(r), burst);
            let mut clock = 0u64;
            let mut before = 0u64;
            for (gap, n) in sends {
                clock += gap;
                let start = clock + b.reserve(clock, n);
                // Slack for the rounding of nanosecond costs.
                let slack = (r as u128).div_ceil(NANOS_PER_S) + 1;
                let allowed = (r as u128 * start as u128 / NANOS_PER_S) + burst as u128 + slack;
                prop_assert!((before as u128) <= allowed, "{before} bytes before {start} ns, allowed {allowed}");
                before += n;
                clock = start;
            }
        }

        /// A sender that never pauses starts each send exactly when the bytes before it, less
        /// the burst allowance, have had their time: the limit is reached, not undershot.
        #[test]
        fn a_busy_sender_reaches_the_rate(
            r in 1u64..(1 << 32),
            burst in 0u64..(1 << 24),
            sizes in proptest::collection::vec(1u64..(8 << 20), 1..64),
        ) {
            let mut b = TokenBucket::with_burst(rate(r), burst);
            let mut clock = 0u64;
            let mut booked = 0u64;
            for n in sizes {
                let start = clock + b.reserve(clock, n);
                let due = booked.saturating_sub(cost_ns(burst, rate(r)));
                prop_assert_eq!(start, clock.max(due));
                booked += cost_ns(n, rate(r));
                clock = start;
            }
        }

        #[test]
        fn waits_never_overflow(now in any::<u64>(), n in any::<u64>(), r in 1u64.., burst in any::<u64>()) {
            let mut b = TokenBucket::with_burst(rate(r), burst);
            let _ = b.reserve(now, n);
            let _ = b.reserve(now, n);
        }
    }
}
