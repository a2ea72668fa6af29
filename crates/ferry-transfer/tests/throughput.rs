//! Throughput and ratio of the chunk codec on Redis-like memory and on random bytes. Ignored
//! by default (timing, not correctness): `cargo test --release -p ferry-transfer -- --ignored
//! --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ferry_transfer::{ChunkDecoder, ChunkEncoder, Compression, TransferStats};

const MIB: usize = 1 << 20;
const SIZE: usize = 256 * MIB;
const PAGE: usize = 4096;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Pages as a Redis heap holding `ferry-workload`'s values looks to CRIU: each entry a small
/// header with a pointer, `key:<i>` and a 1000-byte value drawn from a 64-letter alphabet, and
/// about 30% of the pages all zero.
fn redis_like() -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(SIZE + PAGE);
    let mut rng = 7u64;
    let mut key = 0u64;
    let mut heap = 0x7f3a_1c00_0000u64;
    while out.len() < SIZE {
        if splitmix64(&mut rng) % 10 < 3 {
            out.resize(out.len() + PAGE, 0);
            continue;
        }
        let page_end = out.len() + PAGE;
        while out.len() < page_end {
            heap += 1040 + (splitmix64(&mut rng) % 64);
            out.extend_from_slice(&heap.to_le_bytes());
            out.extend_from_slice(&((1000u32 << 3) | 1).to_le_bytes());
            out.extend_from_slice(format!("key:{key}").as_bytes());
            key += 1;
            let mut s = 42 ^ key.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            for _ in 0..125 {
                let mut r = splitmix64(&mut s);
                for _ in 0..8 {
                    out.push(ALPHABET[(r & 63) as usize]);
                    r >>= 8;
                }
            }
        }
        out.truncate(page_end);
    }
    out.truncate(SIZE);
    out
}

fn random() -> Vec<u8> {
    let mut s = 11u64;
    (0..SIZE / 8)
        .flat_map(|_| splitmix64(&mut s).to_le_bytes())
        .collect()
}

fn measure(name: &str, data: &[u8], policy: Compression) {
    let stats = Arc::new(TransferStats::default());
    let mut enc = ChunkEncoder::new(policy, stats.clone());
    let t = Instant::now();
    let chunks: Vec<Bytes> = data.chunks(MIB).map(|c| enc.encode(c).unwrap()).collect();
    let enc_s = t.elapsed().as_secs_f64();
    drop(enc);
    let mut dec = ChunkDecoder::new();
    let t = Instant::now();
    let mut n = 0usize;
    for c in chunks {
        n += dec.decode(c).unwrap().len();
    }
    let dec_s = t.elapsed().as_secs_f64();
    assert_eq!(n, data.len());
    let s = stats.snapshot();
    let mib = data.len() as f64 / MIB as f64;
    println!(
        "{name:<10} {:<4}: wire ratio {:.3} (zstd measured {}), encode {:>6.0} MiB/s, decode {:>6.0} MiB/s; chunks zstd {} plain {} zero {}",
        policy.as_str(),
        s.uncompressed as f64 / s.wire as f64,
        s.measured_ratio().map_or("-".into(), |r| format!("{r:.3}")),
        mib / enc_s,
        mib / dec_s,
        s.chunks_zstd,
        s.chunks_plain,
        s.chunks_zeros,
    );
}

/// Page-sized chunks, as the page tunnel may see them when CRIU answers one page at a time.
fn measure_pages(name: &str, data: &[u8]) {
    let stats = Arc::new(TransferStats::default());
    let mut enc = ChunkEncoder::new(Compression::Auto, stats.clone());
    let t = Instant::now();
    for c in data[..64 * MIB].chunks(PAGE) {
        enc.encode(c).unwrap();
    }
    let s = stats.snapshot();
    println!(
        "{name:<10} auto, 4 KiB chunks: wire ratio {:.3}, encode {:>6.0} MiB/s",
        s.uncompressed as f64 / s.wire as f64,
        64.0 / t.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore]
fn throughput() {
    let redis = redis_like();
    let noise = random();
    // The first pass faults in the allocator's memory; the second is the one to read.
    for pass in ["warm-up", "measured"] {
        println!("-- {pass}");
        for policy in [Compression::Auto, Compression::On, Compression::Off] {
            measure("redis-like", &redis, policy);
            measure("random", &noise, policy);
        }
    }
    measure_pages("redis-like", &redis);
    measure_pages("random", &noise);
}
