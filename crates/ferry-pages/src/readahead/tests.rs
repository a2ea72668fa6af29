//! The proxy between a fake lazy-pages daemon and a fake page server that both keep CRIU's
//! rules: the server clamps answers at the end of its buffers and dies when asked for a page
//! it does not hold; the daemon asks for each page until it has it, faults at random and
//! walks its ranges in address order in between.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::ps::{lazy_dst, PS_IOV_GET};

/// Fails a test whose proxy, fake daemon or fake page server stops making progress, instead
/// of hanging the suite.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(120), f)
        .await
        .expect("no progress for 120 s: a side waits for a message that never comes")
}

fn content(dst: u64, page: u64) -> u8 {
    (dst.wrapping_mul(31) ^ page.wrapping_mul(7) ^ (page >> 12)) as u8
}

fn page_bytes(dst: u64, vaddr: u64, nr: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity((nr * PAGE_SIZE) as usize);
    for p in 0..nr {
        let addr = vaddr + p * PAGE_SIZE;
        v.extend(std::iter::repeat_n(content(dst, addr), PAGE_SIZE as usize));
    }
    v
}

/// The page server: answers GETs within `held`, cut at every `buf_pages` boundary as CRIU's
/// page pipes cut them; a GET for a page outside `held` is fatal, as in CRIU. Returns the page
/// bytes it sent.
async fn page_server(mut s: DuplexStream, held: LazyPages, buf_pages: u64) -> Result<u64, String> {
    let mut sent = 0u64;
    loop {
        let mut hb = [0u8; IOV_LEN];
        if s.read_exact(&mut hb).await.is_err() {
            return Ok(sent);
        }
        let req = PsIov::decode(&hb);
        match req.command() {
            PS_IOV_GET => {
                let (_, e) = held
                    .get(&req.dst_id)
                    .and_then(|r| r.containing(req.vaddr))
                    .ok_or_else(|| {
                        format!("asked for {:#x} of {:#x}, not held", req.vaddr, req.dst_id)
                    })?;
                let buf_end = (req.vaddr / PAGE_SIZE / buf_pages + 1) * buf_pages * PAGE_SIZE;
                let end = e.min(buf_end).min(req.vaddr + req.nr_pages * PAGE_SIZE);
                let nr = (end - req.vaddr) / PAGE_SIZE;
                s.write_all(&PsIov::pages(req.dst_id, req.vaddr, nr).encode())
                    .await
                    .map_err(|e| e.to_string())?;
                s.write_all(&page_bytes(req.dst_id, req.vaddr, nr))
                    .await
                    .map_err(|e| e.to_string())?;
                sent += nr * PAGE_SIZE;
            }
            PS_IOV_CLOSE => {
                s.write_all(&0i32.to_le_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok(sent);
            }
            c => return Err(format!("unexpected command {c:#x}")),
        }
    }
}

/// The daemon: until every lazy page is here, either faults on a pseudo-random missing page
/// (one page) or asks for the start of its first range (up to `xfer` pages). With `pipelined`,
/// a fault and a background request go out before either answer is read, as CRIU's async
/// reads allow. Checks every answer's pages; returns how many page bytes it received.
async fn daemon(
    mut s: DuplexStream,
    lazy: LazyPages,
    seed: u64,
    fault_every: u64,
    xfer: u64,
    pipelined: bool,
) -> Result<u64, String> {
    let mut missing = lazy.clone();
    let mut rng = seed | 1;
    let mut step = 0u64;
    let mut received = 0u64;
    let total: u64 = lazy.values().map(|r| r.len()).sum();
    while received < total {
        step += 1;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mut reqs = Vec::new();
        let fault = fault_every > 0 && step.is_multiple_of(fault_every);
        if fault || pipelined {
            // A fault on a random missing page.
            let all: Vec<(u64, u64, u64)> = missing
                .iter()
                .flat_map(|(d, r)| r.iter().map(move |(s, e)| (*d, s, e)))
                .collect();
            let (d, s0, e0) = all[(rng as usize) % all.len()];
            let pages = (e0 - s0) / PAGE_SIZE;
            let v = s0 + (rng >> 20) % pages * PAGE_SIZE;
            reqs.push((d, v, 1));
        }
        if !fault || pipelined {
            let (d, r) = missing.iter().find(|(_, r)| !r.is_empty()).unwrap();
            let (s0, e0) = r.first().unwrap();
            let nr = ((e0 - s0) / PAGE_SIZE).min(xfer);
            if !reqs
                .iter()
                .any(|(rd, rv, _)| rd == d && *rv >= s0 && *rv < s0 + nr * PAGE_SIZE)
            {
                reqs.push((*d, s0, nr));
            }
        }
        for (d, v, nr) in &reqs {
            s.write_all(&PsIov::get(*d, *v, *nr).encode())
                .await
                .map_err(|e| e.to_string())?;
        }
        for (d, v, nr) in reqs {
            let mut hb = [0u8; IOV_LEN];
            s.read_exact(&mut hb)
                .await
                .map_err(|e| format!("answer header: {e}"))?;
            let h = PsIov::decode(&hb);
            if h.dst_id != d || h.vaddr != v || h.nr_pages == 0 || h.nr_pages > nr {
                return Err(format!(
                    "answer {h:?} to a request for {nr} at {v:#x} of {d:#x}"
                ));
            }
            let mut data = vec![0u8; (h.nr_pages * PAGE_SIZE) as usize];
            s.read_exact(&mut data)
                .await
                .map_err(|e| format!("answer data: {e}"))?;
            if data != page_bytes(d, v, h.nr_pages) {
                return Err(format!("wrong content at {v:#x} of {d:#x}"));
            }
            let end = v + h.nr_pages * PAGE_SIZE;
            let m = missing.get_mut(&d).unwrap();
            if m.intersection(v, end)
                .iter()
                .map(|(a, b)| b - a)
                .sum::<u64>()
                != end - v
            {
                return Err(format!("pages at {v:#x}..{end:#x} of {d:#x} arrived twice"));
            }
            m.remove(v, end);
            received += end - v;
        }
    }
    s.write_all(
        &PsIov {
            cmd: PS_IOV_CLOSE,
            nr_pages: 0,
            vaddr: 0,
            dst_id: 0,
        }
        .encode(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut st = [0u8; 4];
    s.read_exact(&mut st)
        .await
        .map_err(|e| format!("close answer: {e}"))?;
    Ok(received)
}

struct Run {
    stats: ReadAheadStats,
    source_sent: u64,
    received: u64,
}

async fn run(
    lazy: LazyPages,
    opts: ReadAheadOptions,
    seed: u64,
    fault_every: u64,
    pipelined: bool,
) -> Run {
    let (d_near, d_far) = tokio::io::duplex(1 << 20);
    let (s_near, s_far) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(page_server(s_far, lazy.clone(), 5));
    let dmn = tokio::spawn(daemon(
        d_far,
        lazy.clone(),
        seed,
        fault_every,
        64,
        pipelined,
    ));
    let delivered = AtomicU64::new(0);
    let stats = read_ahead_counted(d_near, s_near, lazy, opts, &delivered)
        .await
        .expect("proxy");
    assert_eq!(
        delivered.load(Ordering::Relaxed),
        stats.served_ahead + stats.forwarded,
        "the running count of what the daemon got"
    );
    let received = dmn.await.unwrap().expect("daemon");
    assert_eq!(delivered.load(Ordering::Relaxed), received);
    let source_sent = server.await.unwrap().expect("page server");
    Run {
        stats,
        source_sent,
        received,
    }
}

/// The proxy between a daemon end and a source end, each a duplex pipe of `buf` bytes.
fn spawn_proxy(
    lazy: LazyPages,
    opts: ReadAheadOptions,
    buf: usize,
) -> (
    tokio::task::JoinHandle<Result<ReadAheadStats, ReadAheadError>>,
    DuplexStream,
    DuplexStream,
) {
    let (d_near, d_far) = tokio::io::duplex(buf);
    let (s_near, s_far) = tokio::io::duplex(buf);
    (
        tokio::spawn(read_ahead(d_near, s_near, lazy, opts)),
        d_far,
        s_far,
    )
}

fn layout(runs: &[(u32, u64, u64)]) -> LazyPages {
    let mut m: LazyPages = BTreeMap::new();
    for (pid, start_page, pages) in runs {
        m.entry(lazy_dst(*pid))
            .or_default()
            .insert(start_page * PAGE_SIZE, (start_page + pages) * PAGE_SIZE);
    }
    m
}

#[tokio::test]
async fn every_page_arrives_once_and_most_come_from_the_window() {
    within(async {
        let lazy = layout(&[
            (1, 0x10, 300),
            (1, 0x400, 77),
            (1, 0x1000, 1),
            (9, 0x20, 150),
        ]);
        let total: u64 = lazy.values().map(|r| r.len()).sum();
        let opts = ReadAheadOptions {
            window: 64 * PAGE_SIZE,
            chunk_pages: 16,
            in_flight: 32 * PAGE_SIZE,
            fault_quiet: std::time::Duration::ZERO,
            sequential_pages: 0,
            quiet_forward_pages: 16,
            settle_for: std::time::Duration::from_secs(3600),
            bulk_in_flight: 32 * PAGE_SIZE,
        };
        let r = run(lazy, opts, 42, 3, false).await;
        assert!(r.stats.peak_in_flight <= opts.in_flight, "{:?}", r.stats);
        assert_eq!(r.received, total);
        assert_eq!(
            r.stats.served_ahead + r.stats.forwarded,
            total,
            "{:?}",
            r.stats
        );
        assert_eq!(
            r.source_sent,
            r.stats.fetched_ahead + r.stats.forwarded,
            "{:?}",
            r.stats
        );
        assert!(r.stats.served_ahead > total / 2, "{:?}", r.stats);
        assert_eq!(r.stats.wasted, 0, "{:?}", r.stats);
        assert!(r.stats.peak_held <= opts.window, "{:?}", r.stats);
    })
    .await
}

#[tokio::test]
async fn with_no_lazy_ranges_known_it_is_a_plain_forwarder() {
    within(async {
        let lazy = layout(&[(1, 0x10, 40)]);
        let (d_near, d_far) = tokio::io::duplex(1 << 20);
        let (s_near, s_far) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(page_server(s_far, lazy.clone(), 5));
        let dmn = tokio::spawn(daemon(d_far, lazy.clone(), 7, 2, 64, false));
        let stats = read_ahead(
            d_near,
            s_near,
            LazyPages::new(),
            ReadAheadOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(dmn.await.unwrap().unwrap(), 40 * PAGE_SIZE);
        assert_eq!(server.await.unwrap().unwrap(), 40 * PAGE_SIZE);
        assert_eq!(stats.fetched_ahead, 0);
        assert_eq!(stats.forwarded, 40 * PAGE_SIZE);
    })
    .await
}

#[tokio::test]
async fn a_source_that_dies_fails_the_proxy_instead_of_hanging() {
    within(async {
        let lazy = layout(&[(1, 0x10, 400)]);
        let (proxy, mut d_far, mut s_far) = spawn_proxy(lazy, ReadAheadOptions::default(), 1 << 20);
        // Nothing is read ahead before the daemon names the process, so it asks first; the
        // source reads a request, then is gone.
        d_far
            .write_all(&PsIov::get(lazy_dst(1), 0x10 * PAGE_SIZE, 1).encode())
            .await
            .unwrap();
        let mut hb = [0u8; IOV_LEN];
        s_far.read_exact(&mut hb).await.unwrap();
        drop(s_far);
        let err = proxy.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                ReadAheadError::SourceClosed(_) | ReadAheadError::Io { .. }
            ),
            "{err}"
        );
        // The daemon sees its connection end rather than wait for an answer.
        let mut buf = [0u8; 1];
        assert_eq!(d_far.read(&mut buf).await.unwrap(), 0);
    })
    .await
}

#[tokio::test]
async fn commands_only_a_dump_sends_are_refused_by_name() {
    within(async {
        let (proxy, mut d_far, _s_far) =
            spawn_proxy(LazyPages::new(), ReadAheadOptions::default(), 1 << 16);
        d_far
            .write_all(
                &PsIov {
                    cmd: 1,
                    nr_pages: 1,
                    vaddr: 0,
                    dst_id: 0,
                }
                .encode(),
            )
            .await
            .unwrap();
        let err = proxy.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("command 0x1"), "{err}");
    })
    .await
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the layout, window and fault pattern: every page arrives once with the right
    /// content, the source is never asked for a page it does not hold, what it sends is what
    /// the daemon got plus what was wasted, and the window bound holds.
    #[test]
    fn any_layout_and_fault_pattern(
        runs in proptest::collection::vec((1u32..4, 0u64..2000, 1u64..200), 1..6),
        window_pages in 1u64..80,
        chunk_pages in 1u64..40,
        in_flight_pages in 1u64..60,
        quiet_us in prop_oneof![Just(0u64), 1u64..300],
        seq_pages in prop_oneof![Just(0u64), 1u64..20],
        quiet_forward_pages in 1u64..40,
        settle_us in prop_oneof![Just(0u64), 1u64..3000],
        bulk_in_flight_pages in 1u64..60,
        seed: u64,
        fault_every in 0u64..5,
        pipelined: bool,
        // No reader lane, one that serves to the end, or one that dies after so many answers.
        lane in prop_oneof![Just(None), Just(Some(None)), (0usize..8).prop_map(|n| Some(Some(n)))],
    ) {
        let lazy = layout(&runs);
        let total: u64 = lazy.values().map(|r| r.len()).sum();
        let opts = ReadAheadOptions {
            window: window_pages * PAGE_SIZE,
            chunk_pages,
            in_flight: in_flight_pages * PAGE_SIZE,
            fault_quiet: std::time::Duration::from_micros(quiet_us),
            sequential_pages: seq_pages,
            quiet_forward_pages,
            settle_for: std::time::Duration::from_micros(settle_us),
            bulk_in_flight: bulk_in_flight_pages * PAGE_SIZE,
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let r = match lane {
            None => rt.block_on(run(lazy, opts, seed, fault_every, pipelined)),
            Some(dies) => {
                let r = rt.block_on(within(split_run(lazy, opts, seed, fault_every, dies)));
                prop_assert_eq!(r.reader_sent, r.stats.fetched_by_reader);
                // A reader that is never asked more than it answers is never lost.
                prop_assert!(!r.stats.reader_lost || dies.is_some());
                Run { stats: r.stats, source_sent: r.server_sent + r.reader_sent, received: r.received }
            }
        };
        prop_assert_eq!(r.received, total);
        prop_assert_eq!(r.stats.served_ahead + r.stats.forwarded, total);
        prop_assert_eq!(r.source_sent, r.stats.fetched_ahead + r.stats.forwarded);
        prop_assert_eq!(r.stats.fetched_ahead, r.stats.served_ahead + r.stats.wasted);
        // This daemon never skips a page it will not ask for, so nothing fetched ahead may be
        // left over: a page fetched twice would be.
        prop_assert_eq!(r.stats.wasted, 0);
        // A walk's next pages are asked for behind its fault whatever the bounds: at most
        // `sequential_pages` more.
        let seq = seq_pages * PAGE_SIZE;
        prop_assert!(r.stats.peak_held <= opts.window.max(chunk_pages * PAGE_SIZE) + seq);
        let in_flight = opts.in_flight.max(opts.bulk_in_flight);
        prop_assert!(r.stats.peak_in_flight <= in_flight.max(chunk_pages * PAGE_SIZE) + seq);
        prop_assert!(r.stats.peak_in_flight <= r.stats.peak_held);
    }
}

#[tokio::test]
async fn faults_before_the_background_transfer_are_never_queued_behind_read_ahead() {
    within(async {
        let lazy = layout(&[(1, 0x10, 400)]);
        let (proxy, mut d_far, mut s_far) = spawn_proxy(lazy, ReadAheadOptions::default(), 1 << 20);
        // Restore-time faults: one page each. The source must see exactly these requests.
        for page in [0x20u64, 0x90, 0x31] {
            let vaddr = page * PAGE_SIZE;
            d_far
                .write_all(&PsIov::get(lazy_dst(1), vaddr, 1).encode())
                .await
                .unwrap();
            let mut hb = [0u8; IOV_LEN];
            s_far.read_exact(&mut hb).await.unwrap();
            let req = PsIov::decode(&hb);
            assert_eq!((req.vaddr, req.nr_pages), (vaddr, 1), "{req:?}");
            s_far
                .write_all(&PsIov::pages(lazy_dst(1), vaddr, 1).encode())
                .await
                .unwrap();
            s_far
                .write_all(&page_bytes(lazy_dst(1), vaddr, 1))
                .await
                .unwrap();
            d_far.read_exact(&mut hb).await.unwrap();
            let mut data = vec![0u8; PAGE_SIZE as usize];
            d_far.read_exact(&mut data).await.unwrap();
            assert_eq!(data, page_bytes(lazy_dst(1), vaddr, 1));
        }
        // The first background request starts the read-ahead: the source now gets requests
        // beyond what the daemon asked for.
        d_far
            .write_all(&PsIov::get(lazy_dst(1), 0x10 * PAGE_SIZE, 16).encode())
            .await
            .unwrap();
        let mut asked = 0u64;
        let mut hb = [0u8; IOV_LEN];
        while asked <= 16 {
            s_far.read_exact(&mut hb).await.unwrap();
            asked += PsIov::decode(&hb).nr_pages;
        }
        drop(s_far);
        drop(d_far);
        let _ = proxy.await.unwrap();
    })
    .await
}

#[tokio::test]
async fn after_a_forwarded_fault_no_read_ahead_goes_out_until_it_has_been_quiet() {
    within(async {
        let lazy = layout(&[(1, 0x10, 4000)]);
        // A window far smaller than the layout: the fault lands beyond what is read ahead.
        let opts = ReadAheadOptions {
            window: 256 * PAGE_SIZE,
            chunk_pages: 64,
            in_flight: 128 * PAGE_SIZE,
            fault_quiet: std::time::Duration::from_secs(3600),
            sequential_pages: 0,
            quiet_forward_pages: 16,
            settle_for: std::time::Duration::from_secs(3600),
            bulk_in_flight: 4096 * PAGE_SIZE,
        };
        let (proxy, mut d_far, mut s_far) = spawn_proxy(lazy, opts, 64 << 20);
        // The source answers every request at once and records them all.
        let source = tokio::spawn(async move {
            let mut asked = Vec::new();
            let mut hb = [0u8; IOV_LEN];
            loop {
                s_far.read_exact(&mut hb).await.unwrap();
                let r = PsIov::decode(&hb);
                asked.push(r);
                if r.cmd == PS_IOV_CLOSE {
                    s_far.write_all(&0i32.to_le_bytes()).await.unwrap();
                    return asked;
                }
                s_far
                    .write_all(&PsIov::pages(r.dst_id, r.vaddr, r.nr_pages).encode())
                    .await
                    .unwrap();
                s_far
                    .write_all(&page_bytes(r.dst_id, r.vaddr, r.nr_pages))
                    .await
                    .unwrap();
            }
        });
        // The background transfer starts the read-ahead; a fault far beyond it is forwarded;
        // the next background request is served from the window, which makes room.
        let mut hb = [0u8; IOV_LEN];
        for (vaddr, nr) in [(0x10u64, 16u64), (0xE00, 1), (0x20, 64)] {
            d_far
                .write_all(&PsIov::get(lazy_dst(1), vaddr * PAGE_SIZE, nr).encode())
                .await
                .unwrap();
            d_far.read_exact(&mut hb).await.unwrap();
            assert_eq!(PsIov::decode(&hb).nr_pages, nr, "{:?}", PsIov::decode(&hb));
            let mut data = vec![0u8; (nr * PAGE_SIZE) as usize];
            d_far.read_exact(&mut data).await.unwrap();
        }
        d_far
            .write_all(
                &PsIov {
                    cmd: PS_IOV_CLOSE,
                    nr_pages: 0,
                    vaddr: 0,
                    dst_id: 0,
                }
                .encode(),
            )
            .await
            .unwrap();
        d_far.read_exact(&mut [0u8; 4]).await.unwrap();
        let asked = source.await.unwrap();
        let fault = asked
            .iter()
            .position(|r| r.nr_pages == 1 && r.vaddr == 0xE00 * PAGE_SIZE)
            .expect("the fault was forwarded");
        assert!(
            fault > 1,
            "read-ahead had started before the fault: {asked:?}"
        );
        assert_eq!(
            proxy.await.unwrap().unwrap().served_ahead,
            64 * PAGE_SIZE,
            "the last request came from the window"
        );
        // There was room, yet after the fault the source hears only the close.
        assert_eq!(asked.len(), fault + 2, "{:?}", &asked[fault..]);
    })
    .await
}

#[tokio::test]
async fn a_process_the_daemon_never_names_is_never_read_ahead() {
    within(async {
        // The pagemap names processes 1 and 9; the page server (and the daemon) know only 1, as
        // when an id is spelled differently on each side. Asking for 9 would kill the server.
        let known = layout(&[(1, 0x10, 120)]);
        let mut lazy = known.clone();
        lazy.extend(layout(&[(9, 0x10, 120)]));
        let (d_near, d_far) = tokio::io::duplex(1 << 20);
        let (s_near, s_far) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(page_server(s_far, known.clone(), 5));
        let dmn = tokio::spawn(daemon(d_far, known, 3, 4, 64, false));
        let stats = read_ahead(d_near, s_near, lazy, ReadAheadOptions::default())
            .await
            .unwrap();
        assert_eq!(dmn.await.unwrap().unwrap(), 120 * PAGE_SIZE);
        assert_eq!(server.await.unwrap().unwrap(), 120 * PAGE_SIZE);
        assert!(stats.served_ahead > 0, "{stats:?}");
    })
    .await
}

/// A process that walks its memory page by page, each fault answered before the next.
async fn walk(d: &mut DuplexStream, dst: u64, first_page: u64, pages: u64) -> u64 {
    let mut got = 0;
    for p in first_page..first_page + pages {
        let v = p * PAGE_SIZE;
        d.write_all(&PsIov::get(dst, v, 1).encode()).await.unwrap();
        let mut hb = [0u8; IOV_LEN];
        d.read_exact(&mut hb).await.unwrap();
        let h = PsIov::decode(&hb);
        assert_eq!(
            (h.dst_id, h.vaddr, h.nr_pages),
            (dst, v, 1),
            "answer to the fault at {v:#x}"
        );
        let mut data = vec![0u8; PAGE_SIZE as usize];
        d.read_exact(&mut data).await.unwrap();
        assert!(
            data == page_bytes(dst, v, 1),
            "page {v:#x} carries someone else's bytes"
        );
        got += 1;
    }
    got
}

#[tokio::test]
async fn a_walk_page_by_page_is_answered_ahead_after_its_first_two_faults() {
    within(async {
        // With 8: the faults at 0x10 and 0x11 are forwarded, the second asks for 0x12..0x1a
        // behind it; then every ninth page is a fault forwarded with the next eight behind it
        // (0x1a, 0x23, 0x2c, 0x35, the last followed by the range's remaining two).
        for (seq, want_forwarded) in [(8u64, 6), (0, 40)] {
            let lazy = layout(&[(1, 0x10, 40), (1, 0x100, 4)]);
            let opts = ReadAheadOptions {
                sequential_pages: seq,
                ..ReadAheadOptions::default()
            };
            let (d_near, mut d_far) = tokio::io::duplex(1 << 20);
            let (s_near, s_far) = tokio::io::duplex(1 << 20);
            let server = tokio::spawn(page_server(s_far, lazy.clone(), 1000));
            let proxy = tokio::spawn(read_ahead(d_near, s_near, lazy, opts));
            let got = walk(&mut d_far, lazy_dst(1), 0x10, 40).await;
            assert_eq!(got, 40);
            // The other range is asked for once, by the daemon's background transfer.
            d_far
                .write_all(&PsIov::get(lazy_dst(1), 0x100 * PAGE_SIZE, 4).encode())
                .await
                .unwrap();
            let mut hb = [0u8; IOV_LEN];
            d_far.read_exact(&mut hb).await.unwrap();
            let mut data = vec![0u8; (PsIov::decode(&hb).nr_pages * PAGE_SIZE) as usize];
            d_far.read_exact(&mut data).await.unwrap();
            let close = PsIov {
                cmd: PS_IOV_CLOSE,
                nr_pages: 0,
                vaddr: 0,
                dst_id: 0,
            };
            d_far.write_all(&close.encode()).await.unwrap();
            let mut st = [0u8; 4];
            d_far.read_exact(&mut st).await.unwrap();
            let stats = proxy.await.unwrap().expect("proxy");
            let sent = server.await.unwrap().expect("page server");
            assert_eq!(sent, 44 * PAGE_SIZE, "every page crossed once: {stats:?}");
            assert_eq!(
                stats.forwarded / PAGE_SIZE,
                want_forwarded + PsIov::decode(&hb).nr_pages,
                "sequential_pages {seq}: {stats:?}"
            );
            assert_eq!(stats.sequential > 0, seq > 0, "{stats:?}");
        }
    })
    .await
}

/// The daemon asks for `nr` pages at `vaddr`; the source must see exactly that request, and
/// its answer must reach the daemon.
async fn passes_through(d: &mut DuplexStream, s: &mut DuplexStream, vaddr: u64, nr: u64) {
    passes_through_as(d, s, vaddr, nr, nr).await
}

/// As [`passes_through`], the source seeing the request for `asked` pages cut to `nr`.
async fn passes_through_as(
    d: &mut DuplexStream,
    s: &mut DuplexStream,
    vaddr: u64,
    asked: u64,
    nr: u64,
) {
    let dst = lazy_dst(1);
    d.write_all(&PsIov::get(dst, vaddr, asked).encode())
        .await
        .unwrap();
    let mut hb = [0u8; IOV_LEN];
    s.read_exact(&mut hb).await.unwrap();
    let req = PsIov::decode(&hb);
    assert_eq!((req.vaddr, req.nr_pages), (vaddr, nr), "{req:?}");
    s.write_all(&PsIov::pages(dst, vaddr, nr).encode())
        .await
        .unwrap();
    s.write_all(&page_bytes(dst, vaddr, nr)).await.unwrap();
    d.read_exact(&mut hb).await.unwrap();
    assert_eq!(PsIov::decode(&hb).nr_pages, nr);
    let mut data = vec![0u8; (nr * PAGE_SIZE) as usize];
    d.read_exact(&mut data).await.unwrap();
    assert!(data == page_bytes(dst, vaddr, nr));
}

#[tokio::test]
async fn the_rest_of_a_walk_asked_behind_its_fault_is_not_the_background_transfer() {
    within(async {
        let lazy = layout(&[(1, 0x10, 400)]);
        let (proxy, mut d_far, mut s_far) = spawn_proxy(lazy, ReadAheadOptions::default(), 1 << 20);
        // A fault at 0x40, then (CRIU's walk-ahead) the 16 pages after it: both go to the
        // source as asked, and no read-ahead follows them.
        passes_through(&mut d_far, &mut s_far, 0x40 * PAGE_SIZE, 1).await;
        passes_through(&mut d_far, &mut s_far, 0x41 * PAGE_SIZE, 16).await;
        // Had that started the read-ahead, the source would now see read-ahead requests
        // before this fault.
        passes_through(&mut d_far, &mut s_far, 0x90 * PAGE_SIZE, 1).await;
        // Several pages that do not follow a fault are the background transfer. Nothing
        // below 0x41 was dropped from what is read ahead: the read-ahead goes on from the
        // end of this request, not from 0x51.
        d_far
            .write_all(&PsIov::get(lazy_dst(1), 0x10 * PAGE_SIZE, 16).encode())
            .await
            .unwrap();
        let mut hb = [0u8; IOV_LEN];
        s_far.read_exact(&mut hb).await.unwrap();
        let first = PsIov::decode(&hb);
        assert_eq!((first.vaddr, first.nr_pages), (0x10 * PAGE_SIZE, 16));
        s_far.read_exact(&mut hb).await.unwrap();
        let ahead = PsIov::decode(&hb);
        assert_eq!(ahead.vaddr, 0x20 * PAGE_SIZE, "{ahead:?}");
        drop(s_far);
        drop(d_far);
        let _ = proxy.await.unwrap();
    })
    .await
}

#[tokio::test]
async fn a_background_request_behind_recent_faults_is_forwarded_cut_short() {
    within(async {
        // Hours, not milliseconds: the test does not depend on how fast it runs.
        let hour = std::time::Duration::from_secs(3600);
        let zero = std::time::Duration::ZERO;
        // (quiet after a fault, how long cutting lasts, pages the source is asked for)
        for (quiet, cut_for, want) in [(hour, hour, 16u64), (zero, hour, 64), (hour, zero, 64)] {
            let lazy = layout(&[(1, 0x10, 400)]);
            let opts = ReadAheadOptions {
                fault_quiet: quiet,
                settle_for: cut_for,
                ..ReadAheadOptions::default()
            };
            let (proxy, mut d_far, mut s_far) = spawn_proxy(lazy, opts, 1 << 20);
            passes_through(&mut d_far, &mut s_far, 0x90 * PAGE_SIZE, 1).await;
            // The daemon's background transfer asks for 64 pages the window does not hold.
            passes_through_as(&mut d_far, &mut s_far, 0x10 * PAGE_SIZE, 64, want).await;
            drop(s_far);
            drop(d_far);
            let _ = proxy.await.unwrap();
        }
    })
    .await
}

/// The next request the source hears, as (page, pages).
async fn heard(s: &mut DuplexStream) -> (u64, u64) {
    let mut hb = [0u8; IOV_LEN];
    s.read_exact(&mut hb).await.unwrap();
    let r = PsIov::decode(&hb);
    (r.vaddr / PAGE_SIZE, r.nr_pages)
}

#[tokio::test]
async fn once_settled_read_ahead_keeps_the_bulk_in_flight_and_goes_on_behind_faults() {
    within(async {
        let lazy = layout(&[(1, 0x10, 4000)]);
        let opts = ReadAheadOptions {
            window: 256 * PAGE_SIZE,
            chunk_pages: 16,
            in_flight: 16 * PAGE_SIZE,
            // Were the proxy still settling, this quiet time would stop the read-ahead after
            // the fault for an hour.
            fault_quiet: std::time::Duration::from_secs(3600),
            sequential_pages: 0,
            quiet_forward_pages: 16,
            settle_for: std::time::Duration::ZERO,
            bulk_in_flight: 64 * PAGE_SIZE,
        };
        let (proxy, mut d_far, mut s_far) = spawn_proxy(lazy, opts, 64 << 20);
        let dst = lazy_dst(1);
        let mut hb = [0u8; IOV_LEN];
        let answer = |r: (u64, u64)| {
            let mut v = PsIov::pages(dst, r.0 * PAGE_SIZE, r.1).encode().to_vec();
            v.extend(page_bytes(dst, r.0 * PAGE_SIZE, r.1));
            v
        };
        // The daemon's background request is forwarded, and four chunks are read ahead.
        d_far
            .write_all(&PsIov::get(dst, 0x10 * PAGE_SIZE, 16).encode())
            .await
            .unwrap();
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(heard(&mut s_far).await);
        }
        assert_eq!(
            got,
            vec![(0x10, 16), (0x20, 16), (0x30, 16), (0x40, 16), (0x50, 16)]
        );
        s_far.write_all(&answer(got[0])).await.unwrap();
        d_far.read_exact(&mut hb).await.unwrap();
        d_far
            .read_exact(&mut vec![0u8; (16 * PAGE_SIZE) as usize])
            .await
            .unwrap();
        // With the read-ahead unanswered, the next request the source hears is the fault: the
        // read-ahead stopped at bulk_in_flight (four chunks), not at in_flight (one).
        d_far
            .write_all(&PsIov::get(dst, 0xE00 * PAGE_SIZE, 1).encode())
            .await
            .unwrap();
        assert_eq!(heard(&mut s_far).await, (0xE00, 1));
        for r in got[1..].iter().chain([&(0xE00, 1)]) {
            s_far.write_all(&answer(*r)).await.unwrap();
        }
        d_far.read_exact(&mut hb).await.unwrap();
        assert_eq!(PsIov::decode(&hb).vaddr, 0xE00 * PAGE_SIZE);
        d_far
            .read_exact(&mut vec![0u8; PAGE_SIZE as usize])
            .await
            .unwrap();
        // Right behind the fault, without a quiet time, the read-ahead goes on.
        assert_eq!(heard(&mut s_far).await, (0x60, 16));
        drop(s_far);
        drop(d_far);
        let _ = proxy.await.unwrap();
    })
    .await
}

/// A page reader that answers its first `answers` requests as the page server would, then
/// closes the channel unanswered.
async fn failing_reader(mut s: DuplexStream, answers: usize) -> u64 {
    let mut sent = 0u64;
    for _ in 0..answers {
        let mut hb = [0u8; IOV_LEN];
        if s.read_exact(&mut hb).await.is_err() {
            return sent;
        }
        let req = PsIov::decode(&hb);
        s.write_all(&PsIov::pages(req.dst_id, req.vaddr, req.nr_pages).encode())
            .await
            .unwrap();
        s.write_all(&page_bytes(req.dst_id, req.vaddr, req.nr_pages))
            .await
            .unwrap();
        sent += req.nr_pages * PAGE_SIZE;
    }
    let mut hb = [0u8; IOV_LEN];
    let _ = s.read_exact(&mut hb).await;
    sent
}

struct SplitRun {
    stats: ReadAheadStats,
    server_sent: u64,
    reader_sent: u64,
    received: u64,
}

/// The proxy with a reader lane: `reader_answers` of `None` is a reader that serves as the page
/// server does; `Some(n)` one that dies after `n` answers.
async fn split_run(
    lazy: LazyPages,
    opts: ReadAheadOptions,
    seed: u64,
    fault_every: u64,
    reader_answers: Option<usize>,
) -> SplitRun {
    let (d_near, d_far) = tokio::io::duplex(1 << 20);
    let (s_near, s_far) = tokio::io::duplex(1 << 20);
    let (r_near, r_far) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(page_server(s_far, lazy.clone(), 5));
    let reader = match reader_answers {
        None => tokio::spawn(page_server(r_far, lazy.clone(), 1 << 20)),
        Some(n) => tokio::spawn(async move { Ok(failing_reader(r_far, n).await) }),
    };
    let dmn = tokio::spawn(daemon(d_far, lazy.clone(), seed, fault_every, 64, true));
    let delivered = AtomicU64::new(0);
    let stats = read_ahead_split(d_near, s_near, r_near, lazy, opts, &delivered)
        .await
        .expect("proxy");
    let received = dmn.await.unwrap().expect("daemon");
    assert_eq!(delivered.load(Ordering::Relaxed), received);
    SplitRun {
        stats,
        server_sent: server.await.unwrap().expect("page server"),
        reader_sent: reader.await.unwrap().expect("reader"),
        received,
    }
}

fn split_opts() -> ReadAheadOptions {
    ReadAheadOptions {
        window: 64 * PAGE_SIZE,
        chunk_pages: 16,
        in_flight: 16 * PAGE_SIZE,
        // Were the read-ahead held back after faults, as on the page server's one connection,
        // this would stop it for an hour after the first.
        fault_quiet: std::time::Duration::from_secs(3600),
        sequential_pages: 0,
        quiet_forward_pages: 16,
        settle_for: std::time::Duration::from_secs(3600),
        bulk_in_flight: 48 * PAGE_SIZE,
    }
}

#[tokio::test]
async fn with_a_reader_lane_the_read_ahead_goes_there_and_the_page_server_gets_the_daemons_requests(
) {
    let lazy = layout(&[(1, 0x10, 300), (1, 0x400, 77), (9, 0x20, 150)]);
    let total: u64 = lazy.values().map(|r| r.len()).sum();
    let r = within(split_run(lazy, split_opts(), 42, 3, None)).await;
    assert_eq!(r.received, total);
    assert_eq!(
        r.stats.served_ahead + r.stats.forwarded,
        total,
        "{:?}",
        r.stats
    );
    assert!(!r.stats.reader_lost, "{:?}", r.stats);
    assert_eq!(
        r.stats.fetched_by_reader, r.stats.fetched_ahead,
        "{:?}",
        r.stats
    );
    assert_eq!(r.reader_sent, r.stats.fetched_by_reader, "{:?}", r.stats);
    assert_eq!(r.server_sent, r.stats.forwarded, "{:?}", r.stats);
    // Faults every third step do not hold the read-ahead back: most pages come through it.
    assert!(r.stats.served_ahead > total / 2, "{:?}", r.stats);
    // ... with up to the bulk amount asked for, not the settling time's.
    assert!(
        r.stats.peak_in_flight > split_opts().in_flight,
        "{:?}",
        r.stats
    );
    assert!(
        r.stats.peak_in_flight <= split_opts().bulk_in_flight,
        "{:?}",
        r.stats
    );
    assert_eq!(r.stats.wasted, 0, "{:?}", r.stats);
}

#[tokio::test]
async fn a_reader_lane_that_dies_hands_what_it_owed_back_to_the_page_server() {
    let lazy = layout(&[(1, 0x10, 600), (3, 0x900, 90)]);
    let total: u64 = lazy.values().map(|r| r.len()).sum();
    for answers in [0usize, 1, 5] {
        // Back on the page server's one connection, the quiet time after faults applies again.
        let opts = ReadAheadOptions {
            fault_quiet: std::time::Duration::ZERO,
            ..split_opts()
        };
        let r = within(split_run(lazy.clone(), opts, 7, 4, Some(answers))).await;
        assert_eq!(r.received, total, "after {answers} answers");
        assert!(r.stats.reader_lost, "after {answers}: {:?}", r.stats);
        assert_eq!(r.reader_sent, r.stats.fetched_by_reader, "{:?}", r.stats);
        assert_eq!(
            r.server_sent + r.reader_sent,
            r.stats.fetched_ahead + r.stats.forwarded,
            "after {answers}: {:?}",
            r.stats
        );
        assert_eq!(
            r.stats.served_ahead + r.stats.forwarded,
            total,
            "{:?}",
            r.stats
        );
        assert_eq!(r.stats.wasted, 0, "after {answers}: {:?}", r.stats);
        // The read-ahead went on through the page server after the loss.
        assert!(
            r.stats.fetched_ahead > r.stats.fetched_by_reader,
            "after {answers}: {:?}",
            r.stats
        );
    }
}
