//! Loopback tests of the page tunnel: a fake CRIU page server and lazy-pages daemon talk
//! request/response through two bridges joined by an in-memory channel.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::{timeout, Instant};

use super::*;
use crate::chunk;

const REQUESTS: u64 = 40;

/// The pages answered for request `i`: compressible text, all-zero pages or noise, of sizes
/// from a page to twice the read size (so one answer spans several frames).
fn answer(i: u64) -> Vec<u8> {
    let len = [4096, 12288, 65536, READ_LEN * 2 + 100][(i % 4) as usize];
    let mut s = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    match (i / 4) % 3 {
        0 => (0..len)
            .map(|_| b"key:value "[(next() % 10) as usize])
            .collect(),
        1 => vec![0u8; len],
        _ => (0..len).map(|_| (next() >> 32) as u8).collect(),
    }
}

/// CRIU's page server as far as the tunnel can tell: reads a 16-byte request, writes the pages.
async fn page_server(mut sock: DuplexStream) {
    let mut req = [0u8; 16];
    while sock.read_exact(&mut req).await.is_ok() {
        let i = u64::from_be_bytes(req[..8].try_into().unwrap());
        sock.write_all(&answer(i)).await.unwrap();
    }
    sock.shutdown().await.unwrap();
}

fn opts(framed: bool, compression: Compression, limit: u64) -> BridgeOptions {
    BridgeOptions {
        framed,
        compression,
        pacer: Pacer::new(limit),
        stats: Arc::default(),
    }
}

struct Run {
    source: BridgeTotals,
    target: BridgeTotals,
    source_stats: crate::StatsSnapshot,
    took: Duration,
}

/// Runs every request through source and target bridges; each exchange must complete on its
/// own within a second (of real time, or of virtual time when paused, far above what pacing
/// adds per exchange): a tunnel that waited for more bytes would stall here.
async fn run(framed: bool, source: Compression, target: Compression, limit: u64) -> Run {
    let (src_chan, tgt_chan) = duplex(64 << 10);
    let (server_end, src_local) = duplex(64 << 10);
    let (mut daemon, tgt_local) = duplex(64 << 10);
    let src_opts = opts(framed, source, limit);
    let source_stats = src_opts.stats.clone();
    let src = tokio::spawn(bridge(src_chan, BytesMut::new(), src_local, src_opts));
    let tgt = tokio::spawn(bridge(
        tgt_chan,
        BytesMut::new(),
        tgt_local,
        opts(framed, target, limit),
    ));
    let server = tokio::spawn(page_server(server_end));
    let start = Instant::now();
    for i in 0..REQUESTS {
        let want = answer(i);
        let mut got = vec![0u8; want.len()];
        let mut req = [0u8; 16];
        req[..8].copy_from_slice(&i.to_be_bytes());
        timeout(Duration::from_secs(1), async {
            daemon.write_all(&req).await.unwrap();
            daemon.read_exact(&mut got).await.unwrap();
        })
        .await
        .unwrap_or_else(|_| panic!("request {i} got no complete answer"));
        assert!(got == want, "answer {i} differs");
    }
    let took = start.elapsed();
    daemon.shutdown().await.unwrap();
    let mut rest = Vec::new();
    daemon.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    server.await.unwrap();
    Run {
        source: src.await.unwrap().unwrap(),
        target: tgt.await.unwrap().unwrap(),
        source_stats: source_stats.snapshot(),
        took,
    }
}

fn answered_bytes() -> u64 {
    (0..REQUESTS).map(|i| answer(i).len() as u64).sum()
}

#[tokio::test]
async fn pages_round_trip_compressed() {
    let r = run(true, Compression::Auto, Compression::Auto, 0).await;
    assert_eq!(r.source.to_peer.raw, answered_bytes());
    assert_eq!(r.target.from_peer.raw, answered_bytes());
    assert_eq!(r.target.to_peer.raw, REQUESTS * 16);
    assert_eq!(r.source.from_peer.raw, REQUESTS * 16);
    assert_eq!(r.source.to_peer.wire, r.target.from_peer.wire);
    // Text and zero pages shrink, noise does not grow by more than the frame headers.
    assert!(
        r.source.to_peer.wire < answered_bytes() / 2,
        "{:?}",
        r.source
    );
    assert!(r.source_stats.chunks_zstd > 0 && r.source_stats.chunks_zeros > 0);
    assert_eq!(r.source_stats.wire, r.source.to_peer.wire);
}

#[tokio::test]
async fn pages_round_trip_framed_but_plain() {
    let r = run(true, Compression::Off, Compression::Off, 0).await;
    assert_eq!(r.target.from_peer.raw, answered_bytes());
    assert!(r.source.to_peer.wire > answered_bytes());
    assert_eq!(r.source_stats.chunks_zstd + r.source_stats.chunks_zeros, 0);
}

#[tokio::test]
async fn pages_round_trip_as_a_raw_tunnel() {
    let r = run(false, Compression::Auto, Compression::Auto, 0).await;
    assert_eq!(r.source.to_peer.raw, answered_bytes());
    assert_eq!(r.source.to_peer.wire, answered_bytes());
    assert_eq!(r.target.from_peer.wire, answered_bytes());
    assert_eq!(r.source_stats.uncompressed, r.source_stats.wire);
}

#[tokio::test(start_paused = true)]
async fn pages_round_trip_paced() {
    let limit = 4 << 20;
    for framed in [true, false] {
        let r = run(framed, Compression::On, Compression::On, limit).await;
        assert_eq!(r.target.from_peer.raw, answered_bytes());
        // The last frame may start once everything before it had its time, less the burst.
        let burst = crate::pacer::default_burst(std::num::NonZeroU64::new(limit).unwrap());
        let floor = r
            .source
            .to_peer
            .wire
            .saturating_sub(READ_LEN as u64 + 10 + burst);
        assert!(
            r.took >= Duration::from_secs_f64(floor as f64 / limit as f64),
            "framed {framed}: {:?} for {} bytes at {limit} B/s",
            r.took,
            r.source.to_peer.wire
        );
    }
}

/// Bytes of the channel read before the bridge started (with the greeting) are delivered first,
/// whether they end inside a frame or not.
#[tokio::test]
async fn pending_bytes_are_delivered_first() {
    let parts: Vec<Vec<u8>> = (0..6u64).map(answer).collect();
    let mut enc = ChunkEncoder::new(Compression::On, Arc::default());
    let mut wire = BytesMut::new();
    for p in &parts {
        for c in p.chunks(READ_LEN) {
            encode(&Frame::chunk(enc.encode(c).unwrap()), &mut wire).unwrap();
        }
    }
    let all: Vec<u8> = parts.concat();
    for (framed, stream) in [(true, wire.to_vec()), (false, all.clone())] {
        for cut in [0, 3, 7, stream.len() / 2, stream.len()] {
            let (mut peer, chan) = duplex(1 << 20);
            let (mut daemon, local) = duplex(1 << 20);
            let pending = BytesMut::from(&stream[..cut]);
            let b = tokio::spawn(bridge(
                chan,
                pending,
                local,
                opts(framed, Compression::Auto, 0),
            ));
            let rest = stream[cut..].to_vec();
            let writer = tokio::spawn(async move {
                peer.write_all(&rest).await.unwrap();
                peer.shutdown().await.unwrap();
                peer
            });
            let mut got = Vec::new();
            daemon.read_to_end(&mut got).await.unwrap();
            assert!(got == all, "framed {framed}, cut {cut}");
            daemon.shutdown().await.unwrap();
            let _peer = writer.await.unwrap();
            let t = b.await.unwrap().unwrap();
            assert_eq!(t.from_peer.raw, all.len() as u64);
        }
    }
}

async fn feed_target(wire: Vec<u8>) -> Result<BridgeTotals, BridgeError> {
    let (mut peer, chan) = duplex(1 << 20);
    let (mut daemon, local) = duplex(1 << 20);
    let b = tokio::spawn(bridge(
        chan,
        BytesMut::new(),
        local,
        opts(true, Compression::Auto, 0),
    ));
    peer.write_all(&wire).await.unwrap();
    peer.shutdown().await.unwrap();
    let mut sink = Vec::new();
    let _ = daemon.read_to_end(&mut sink).await;
    let _ = daemon.shutdown().await;
    b.await.unwrap()
}

#[tokio::test]
async fn a_frame_cut_short_is_an_error() {
    let mut wire = BytesMut::new();
    encode(&Frame::chunk(chunk::plain(&[7u8; 100]).unwrap()), &mut wire).unwrap();
    let err = feed_target(wire[..50].to_vec()).await.unwrap_err();
    assert!(matches!(err, BridgeError::Truncated(50)), "{err}");
}

#[tokio::test]
async fn a_corrupt_chunk_is_an_error() {
    let mut bad = chunk::plain(&[7u8; 100]).unwrap().to_vec();
    bad[0] = 9;
    let mut wire = BytesMut::new();
    encode(&Frame::chunk(Bytes::from(bad)), &mut wire).unwrap();
    let err = feed_target(wire.to_vec()).await.unwrap_err();
    assert!(
        err.to_string().contains("unknown chunk encoding 9"),
        "{err}"
    );
}

#[tokio::test]
async fn a_control_message_inside_the_tunnel_is_an_error() {
    let mut wire = BytesMut::new();
    let msg = ferry_proto::Message::Abort;
    encode(&Frame::control(&msg).unwrap(), &mut wire).unwrap();
    let err = feed_target(wire.to_vec()).await.unwrap_err();
    assert!(err.to_string().contains("control message"), "{err}");
}

#[tokio::test]
async fn an_oversized_frame_is_refused() {
    let mut wire = vec![0xff, 0xff, 0xff, 0xff, 3];
    wire.extend_from_slice(&[0; 32]);
    let err = feed_target(wire).await.unwrap_err();
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
}
