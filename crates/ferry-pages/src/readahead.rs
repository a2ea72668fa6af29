//! The read-ahead proxy between CRIU's lazy-pages daemon and the source's page server.
//!
//! The daemon speaks the page-server protocol to this proxy as it would to the page server:
//! `PS_IOV_GET` requests answered in order by a header and the pages, and a final
//! `PS_IOV_CLOSE` answered by a status. The proxy keeps up to [`ReadAheadOptions::window`]
//! bytes of the pages it knows are still at the source (the lazy ranges of the pagemap)
//! requested ahead, many requests in flight, and answers each daemon request:
//!
//! - from the window when its first page is there (as much of the request as is contiguous
//!   there: CRIU accepts a shorter answer and asks again for the rest);
//! - after waiting, when its first page is on its way;
//! - otherwise by forwarding it, cut short of the next page that is on its way, so no page
//!   crosses the link twice.
//!
//! Nothing is read ahead before the daemon's first request of more than a page: until CRIU's
//! restore has finished, it asks only for the pages the restore faults on, and each would
//! wait behind whatever read-ahead was sent before it.
//!
//! With a second upstream, the source agent's own page reader ([`read_ahead_split`],
//! [`crate::reader`]), the read-ahead goes there and CRIU's page server gets only the daemon's
//! own requests: faults then wait behind nothing but each other, and the read-ahead need not
//! hold back while the restored process faults.
//!
//! Only ranges of the pagemap's lazy set are ever requested ahead: CRIU's page server treats a
//! request for pages it does not hold as fatal, and its death takes the source with it. The
//! daemon's background transfer walks each process's ranges in address order, so a request
//! of more than one page at `vaddr` means nothing below `vaddr` will be asked for again:
//! what the window holds there is dropped and counted as wasted.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};

use crate::pagemap::LazyPages;
use crate::ps::{
    PsIov, CLOSE_ANSWER_LEN, IOV_LEN, PAGE_SIZE, PS_IOV_ADD_F, PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE,
    PS_IOV_GET,
};
use crate::ranges::RangeSet;

#[derive(Debug, Clone, Copy)]
pub struct ReadAheadOptions {
    /// Most bytes requested ahead and not yet taken by the daemon, in flight or here: the
    /// bound on what the proxy holds in memory.
    pub window: u64,
    /// Pages per read-ahead request.
    pub chunk_pages: u64,
    /// Most bytes of read-ahead requests sent and not yet answered. A page fault the window
    /// cannot answer is forwarded behind them on the one connection the page server serves
    /// in order, so this bounds its wait; a few chunks already cover the tunnel's round trip.
    pub in_flight: u64,
    /// In the settling time (see [`Self::settle_for`]), after a fault had to be forwarded, no
    /// new read-ahead is sent for this long. A restored process faults in bursts (one request
    /// touches several pages, each fault blocking it until answered), and every read-ahead
    /// request sent meanwhile would queue before the burst's next fault on the page server's
    /// one connection.
    pub fault_quiet: std::time::Duration,
    /// A fault on the page after (or two after) the previous fault of the same process is
    /// taken for a walk: the next this many pages are requested ahead right behind it. A
    /// restored Redis walks its tables page by page, each fault a round trip of its own
    /// (~0.3 ms); 0 turns this off.
    pub sequential_pages: u64,
    /// In the settling time, until the quiet time after a forwarded fault has passed, a
    /// background request of the daemon that the window cannot answer is forwarded cut to at
    /// most this many pages (CRIU asks again for the rest): the daemon sends it before its
    /// next fault, whose answer then waits behind it on the page server's one connection.
    pub quiet_forward_pages: u64,
    /// The settling time, from the daemon's first background request on. That is when the
    /// restored process answers the requests its clients sent during the pause, page fault
    /// after page fault, and each fault's wait is what they see. Later a busy process faults
    /// all the time: going quiet after every fault then left most of the memory to CRIU's own
    /// background requests, one round trip at a time, and a fault waited behind those (up to
    /// 4 MiB each) anyway. After it the read-ahead never goes quiet and keeps up to
    /// [`Self::bulk_in_flight`] asked for (512 MB post-copies, four runs: commit 2.6–3.0 s
    /// against 3.2–4.1 s, the client's p99 latency while pages arrived 14–23 ms against
    /// 31–38 ms).
    pub settle_for: std::time::Duration,
    /// After the settling time, most bytes of read-ahead requests sent and not yet answered.
    pub bulk_in_flight: u64,
}

impl Default for ReadAheadOptions {
    /// `in_flight` is 1 MiB: in the settling time a fault that misses the window waits behind
    /// it, 14–20 ms at 4 MiB in the first post-copy logs (the two slowest faults of a 64 MB
    /// restore, 34 of its first 150 ms of fault service), and four 256 KiB chunks still cover
    /// the tunnel's round trip. Afterwards 4 MiB: 1 MiB held the page rate at ~185 MB/s where
    /// 4 MiB reached ~220 MB/s on the test bed.
    fn default() -> Self {
        ReadAheadOptions {
            window: 16 << 20,
            chunk_pages: 64,
            in_flight: 1 << 20,
            fault_quiet: std::time::Duration::from_millis(20),
            sequential_pages: 16,
            quiet_forward_pages: 16,
            settle_for: std::time::Duration::from_millis(500),
            bulk_in_flight: 4 << 20,
        }
    }
}

/// What the proxy did, for the migration's log and report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadAheadStats {
    /// Page bytes that arrived through read-ahead requests.
    pub fetched_ahead: u64,
    /// Page bytes the daemon got from the window.
    pub served_ahead: u64,
    /// Page bytes the daemon got through forwarded requests.
    pub forwarded: u64,
    /// Page bytes fetched ahead that the daemon never asked for.
    pub wasted: u64,
    /// Daemon requests answered.
    pub requests: u64,
    /// Most bytes held ahead at once.
    pub peak_held: u64,
    /// Most bytes of read-ahead requests unanswered at once.
    pub peak_in_flight: u64,
    /// Faults taken for a walk, each followed by a request for the pages after it.
    pub sequential: u64,
    /// Page bytes that arrived on the reader lane.
    pub fetched_by_reader: u64,
    /// The reader lane failed and the read-ahead went on through the page server.
    pub reader_lost: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadAheadError {
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("the lazy-pages daemon sent {0}")]
    Daemon(String),
    #[error("the page server answered {0}")]
    Source(String),
    #[error("the page channel to the source closed with {0} requests unanswered")]
    SourceClosed(usize),
}

/// The largest answer believed: CRIU's background requests stop at 4 MiB, faults are a page.
const MAX_ANSWER: u64 = 64 << 20;

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> ReadAheadError {
    move |source| ReadAheadError::Io { step, source }
}

enum Expect {
    Ahead { dst: u64, start: u64, nr: u64 },
    Forward(oneshot::Sender<(PsIov, Bytes)>),
    Close(oneshot::Sender<[u8; CLOSE_ANSWER_LEN]>),
}

#[derive(Default)]
struct State {
    lazy: LazyPages,
    /// Lazy pages neither requested ahead nor forwarded yet.
    wanted: LazyPages,
    in_flight: BTreeMap<u64, RangeSet>,
    /// Process ids the daemon has asked for: only these are read ahead, so an id the page
    /// server would not know is never sent by the proxy itself.
    seen: std::collections::BTreeSet<u64>,
    /// The daemon has asked for more than a page: its background transfer, which CRIU starts
    /// only once the restore has finished, is under way. Until then every request is a fault
    /// of the restore itself (each thread's stack, the restorer's own pages), and read-ahead
    /// queued before them on the page server's one connection would only lengthen the pause.
    background: bool,
    /// No read-ahead is sent before this (see [`ReadAheadOptions::fault_quiet`]).
    quiet_until: Option<tokio::time::Instant>,
    fault_quiet: std::time::Duration,
    /// The last single-page request (a fault), by process and address.
    last_fault: Option<(u64, u64)>,
    sequential_pages: u64,
    quiet_forward_pages: u64,
    settle_for: std::time::Duration,
    /// When the daemon's first background request arrived.
    background_since: Option<tokio::time::Instant>,
    /// Pages here, by process and start address.
    window: BTreeMap<u64, BTreeMap<u64, Bytes>>,
    /// Bytes in flight ahead plus bytes in `window`.
    held: u64,
    /// Bytes asked for ahead and not yet answered.
    asked: u64,
    expect: VecDeque<Expect>,
    /// Answers due on the reader lane (see [`read_ahead_split`]), in order.
    expect_reader: VecDeque<Expect>,
    /// The reader lane is there and has not failed: read-ahead goes through it.
    reader_open: bool,
    closing: bool,
    source_gone: bool,
    stats: ReadAheadStats,
}

impl State {
    /// When the settling time ends (see [`ReadAheadOptions::settle_for`]), once the background
    /// transfer has started.
    fn settles_at(&self) -> Option<tokio::time::Instant> {
        self.background_since.map(|t| t + self.settle_for)
    }

    fn settled(&self, now: tokio::time::Instant) -> bool {
        self.settles_at().is_some_and(|t| t <= now)
    }

    /// Takes up to `nr` contiguous pages at `vaddr` out of the window.
    fn take(&mut self, dst: u64, vaddr: u64, nr: u64) -> Option<Bytes> {
        let w = self.window.get_mut(&dst)?;
        let (&s, _) = w.range(..=vaddr).next_back()?;
        let bytes = w.get(&s)?.clone();
        let e = s + bytes.len() as u64;
        if e <= vaddr {
            return None;
        }
        w.remove(&s);
        let end = e.min(vaddr.saturating_add(nr.saturating_mul(PAGE_SIZE)));
        if s < vaddr {
            w.insert(s, bytes.slice(..(vaddr - s) as usize));
        }
        if end < e {
            w.insert(end, bytes.slice((end - s) as usize..));
        }
        let got = bytes.slice((vaddr - s) as usize..(end - s) as usize);
        self.held -= got.len() as u64;
        self.stats.served_ahead += got.len() as u64;
        Some(got)
    }

    /// Drops what the daemon has walked past: pages of `dst` below `vaddr`.
    fn passed(&mut self, dst: u64, vaddr: u64) {
        if let Some(w) = self.wanted.get_mut(&dst) {
            w.remove(0, vaddr);
        }
        let Some(w) = self.window.get_mut(&dst) else {
            return;
        };
        let below: Vec<u64> = w.range(..vaddr).map(|(s, _)| *s).collect();
        for s in below {
            let Some(bytes) = w.remove(&s) else { continue };
            let e = s + bytes.len() as u64;
            let cut = if e > vaddr {
                w.insert(vaddr, bytes.slice((vaddr - s) as usize..));
                vaddr - s
            } else {
                e - s
            };
            self.held -= cut;
            self.stats.wasted += cut;
        }
    }

    fn in_flight_at(&self, dst: u64, vaddr: u64) -> bool {
        self.in_flight
            .get(&dst)
            .is_some_and(|r| r.containing(vaddr).is_some())
    }

    /// The first address above `vaddr` whose page is here or on its way.
    fn next_ahead(&self, dst: u64, vaddr: u64) -> Option<u64> {
        let here = self
            .window
            .get(&dst)
            .and_then(|w| w.range(vaddr + 1..).next().map(|(s, _)| *s));
        let coming = self
            .in_flight
            .get(&dst)
            .and_then(|r| r.next_start(vaddr + 1));
        match (here, coming) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next run of wanted pages to request ahead, taken out of `wanted`.
    fn next_chunk(&mut self, chunk_pages: u64) -> Option<(u64, u64, u64)> {
        loop {
            let (&dst, set) = self
                .wanted
                .iter()
                .find(|(d, s)| self.background && !s.is_empty() && self.seen.contains(d))?;
            let (s, e) = set.first()?;
            let end = e.min(s + chunk_pages * PAGE_SIZE);
            let lazy_ok = self
                .lazy
                .get(&dst)
                .and_then(|l| l.containing(s))
                .is_some_and(|(_, le)| le >= end);
            if let Some(w) = self.wanted.get_mut(&dst) {
                w.remove(s, end);
            }
            if !lazy_ok {
                // Cannot happen (wanted is a subset of lazy); never ask the page server for
                // a page it may not hold.
                continue;
            }
            self.in_flight.entry(dst).or_default().insert(s, end);
            self.held += end - s;
            self.asked += end - s;
            self.stats.peak_held = self.stats.peak_held.max(self.held);
            self.stats.peak_in_flight = self.stats.peak_in_flight.max(self.asked);
            return Some((dst, s, (end - s) / PAGE_SIZE));
        }
    }

    /// When the fault at `vaddr` (forwarded up to `stop`) follows the previous one closely,
    /// the wanted run from `stop` on, up to [`ReadAheadOptions::sequential_pages`] and short
    /// of anything here or on its way, taken out of `wanted` as a read-ahead request.
    fn sequential_after(
        &mut self,
        prev: Option<(u64, u64)>,
        dst: u64,
        vaddr: u64,
        stop: u64,
    ) -> Option<(u64, u64, u64)> {
        let walking =
            prev.is_some_and(|(d, v)| d == dst && v < vaddr && vaddr - v <= 2 * PAGE_SIZE);
        if !walking || self.sequential_pages == 0 {
            return None;
        }
        let (s, e) = self.wanted.get(&dst)?.containing(stop)?;
        let mut end = e.min(stop + self.sequential_pages * PAGE_SIZE);
        if let Some(n) = self.next_ahead(dst, vaddr) {
            end = end.min(n);
        }
        let lazy_ok = self
            .lazy
            .get(&dst)
            .and_then(|l| l.containing(stop))
            .is_some_and(|(_, le)| le >= end);
        if s > stop || end <= stop || !lazy_ok {
            return None;
        }
        if let Some(w) = self.wanted.get_mut(&dst) {
            w.remove(stop, end);
        }
        self.in_flight.entry(dst).or_default().insert(stop, end);
        self.held += end - stop;
        self.asked += end - stop;
        self.stats.peak_held = self.stats.peak_held.max(self.held);
        self.stats.peak_in_flight = self.stats.peak_in_flight.max(self.asked);
        self.stats.sequential += 1;
        Some((dst, stop, (end - stop) / PAGE_SIZE))
    }

    /// A read-ahead answer of `data` (a prefix of the request, possibly empty) to the request
    /// for `nr` pages at `start`: into the window, and what it left out wanted again.
    fn arrived_ahead(&mut self, dst: u64, start: u64, nr: u64, data: Bytes) {
        let (got, end) = (data.len() as u64, start + nr * PAGE_SIZE);
        if let Some(f) = self.in_flight.get_mut(&dst) {
            f.remove(start, end);
        }
        self.held -= end - start - got;
        self.asked -= end - start;
        self.stats.fetched_ahead += got;
        if got > 0 {
            self.window.entry(dst).or_default().insert(start, data);
        }
        if start + got < end {
            self.want_again(dst, start + got, end);
        }
    }

    /// Puts back what an answer left out of a request, as far as it is lazy.
    fn want_again(&mut self, dst: u64, start: u64, end: u64) {
        let Some(lazy) = self.lazy.get(&dst) else {
            return;
        };
        let parts = lazy.intersection(start, end);
        let w = self.wanted.entry(dst).or_default();
        for (s, e) in parts {
            w.insert(s, e);
        }
    }
}

struct Shared<W, V> {
    st: Mutex<State>,
    changed: Notify,
    writer: tokio::sync::Mutex<W>,
    /// The reader lane's writer, where there is one.
    reader: Option<tokio::sync::Mutex<V>>,
}

impl<W: AsyncWrite + Unpin, V: AsyncWrite + Unpin> Shared<W, V> {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another task panicked mid-update; the proxy's state is
        // still the best account of what is where.
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a request to the page server, its answer expected after every earlier one.
    async fn send(&self, req: PsIov, expect: Expect) -> Result<(), ReadAheadError> {
        let mut w = self.writer.lock().await;
        {
            let mut st = self.state();
            if st.source_gone {
                return Err(ReadAheadError::SourceClosed(st.expect.len()));
            }
            st.expect.push_back(expect);
        }
        self.changed.notify_waiters();
        w.write_all(&req.encode())
            .await
            .map_err(io("sending a request to the page server"))?;
        w.flush()
            .await
            .map_err(io("sending a request to the page server"))
    }

    /// Sends a read-ahead request on the reader lane while it is open, else to the page
    /// server. A reader lane that cannot be written to is given up, not fatal.
    async fn send_ahead(&self, dst: u64, start: u64, nr: u64) -> Result<(), ReadAheadError> {
        let req = PsIov::get(dst, start, nr);
        if let Some(lane) = &self.reader {
            let mut w = lane.lock().await;
            let open = {
                let mut st = self.state();
                if st.reader_open {
                    st.expect_reader.push_back(Expect::Ahead { dst, start, nr });
                }
                st.reader_open
            };
            if open {
                let sent = match w.write_all(&req.encode()).await {
                    Ok(()) => w.flush().await,
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(()) => {
                        self.changed.notify_waiters();
                        return Ok(());
                    }
                    Err(e) => {
                        self.reader_lost(&format!("sending a request: {e}"));
                        return Ok(());
                    }
                }
            }
        }
        self.send(req, Expect::Ahead { dst, start, nr }).await
    }

    /// Gives up the reader lane: what was asked of it and not answered is wanted again, to
    /// be asked of the page server.
    fn reader_lost(&self, why: &str) {
        {
            let mut st = self.state();
            if !st.reader_open {
                return;
            }
            st.reader_open = false;
            st.stats.reader_lost = true;
            for e in std::mem::take(&mut st.expect_reader) {
                if let Expect::Ahead { dst, start, nr } = e {
                    let end = start + nr * PAGE_SIZE;
                    if let Some(f) = st.in_flight.get_mut(&dst) {
                        f.remove(start, end);
                    }
                    st.held -= end - start;
                    st.asked -= end - start;
                    st.want_again(dst, start, end);
                }
            }
        }
        if !self.state().closing {
            tracing::warn!("page reader lane lost, reading ahead through the page server: {why}");
        }
        self.changed.notify_waiters();
    }
}

/// Serves the lazy-pages daemon on `daemon` from the page server on `source` until the daemon
/// has closed, reading ahead the `lazy` ranges.
pub async fn read_ahead<D, S>(
    daemon: D,
    source: S,
    lazy: LazyPages,
    opts: ReadAheadOptions,
) -> Result<ReadAheadStats, ReadAheadError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    read_ahead_counted(daemon, source, lazy, opts, &AtomicU64::new(0)).await
}

/// [`read_ahead`], adding every page byte handed to the daemon to `delivered` as it goes: when
/// the source dies mid-transfer the proxy returns an error, and this count is what tells the
/// operator how much of the memory had arrived.
pub async fn read_ahead_counted<D, S>(
    daemon: D,
    source: S,
    lazy: LazyPages,
    opts: ReadAheadOptions,
    delivered: &AtomicU64,
) -> Result<ReadAheadStats, ReadAheadError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    proxy(
        daemon,
        source,
        None::<tokio::io::DuplexStream>,
        lazy,
        opts,
        delivered,
    )
    .await
}

/// [`read_ahead_counted`] with a second upstream, `reader`: the source agent's own reader of
/// the seized tasks (see [`crate::reader`]), which speaks the page server's protocol. The
/// read-ahead goes there and CRIU's page server gets only the daemon's own requests, so a
/// forwarded fault no longer waits behind read-ahead on the page server's one connection: the
/// read-ahead never goes quiet after faults and keeps [`ReadAheadOptions::bulk_in_flight`]
/// asked for from the daemon's first background request on. A reader lane that fails or
/// closes is given up and what it owed is asked of the page server.
pub async fn read_ahead_split<D, S, R>(
    daemon: D,
    source: S,
    reader: R,
    lazy: LazyPages,
    opts: ReadAheadOptions,
    delivered: &AtomicU64,
) -> Result<ReadAheadStats, ReadAheadError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + AsyncWrite + Unpin,
{
    proxy(daemon, source, Some(reader), lazy, opts, delivered).await
}

async fn proxy<D, S, R>(
    daemon: D,
    source: S,
    reader: Option<R>,
    lazy: LazyPages,
    opts: ReadAheadOptions,
    delivered: &AtomicU64,
) -> Result<ReadAheadStats, ReadAheadError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + AsyncWrite + Unpin,
{
    let (src_rd, src_wr) = tokio::io::split(source);
    let (reader_rd, reader_wr) = match reader.map(tokio::io::split) {
        Some((r, w)) => (Some(r), Some(w)),
        None => (None, None),
    };
    let sh = Shared {
        st: Mutex::new(State {
            wanted: lazy.clone(),
            lazy,
            reader_open: reader_wr.is_some(),
            ..State::default()
        }),
        changed: Notify::new(),
        writer: tokio::sync::Mutex::new(src_wr),
        reader: reader_wr.map(tokio::sync::Mutex::new),
    };
    let opts = ReadAheadOptions {
        window: opts.window.max(PAGE_SIZE),
        chunk_pages: opts.chunk_pages.max(1),
        in_flight: opts.in_flight.max(PAGE_SIZE),
        fault_quiet: opts.fault_quiet,
        sequential_pages: opts.sequential_pages,
        quiet_forward_pages: opts.quiet_forward_pages.max(1),
        settle_for: opts.settle_for,
        bulk_in_flight: opts.bulk_in_flight.max(PAGE_SIZE),
    };
    {
        let mut st = sh.state();
        st.fault_quiet = opts.fault_quiet;
        st.sequential_pages = opts.sequential_pages;
        st.quiet_forward_pages = opts.quiet_forward_pages;
        st.settle_for = opts.settle_for;
    }
    let lane = async {
        if let Some(rd) = reader_rd {
            if let Err(e) = read_reader_answers(&sh, rd).await {
                sh.reader_lost(&e.to_string());
            } else {
                sh.reader_lost("the reader closed its channel");
            }
        }
        std::future::pending::<Result<(), ReadAheadError>>().await
    };
    let reader = async {
        let r: Result<(), ReadAheadError> = read_answers(&sh, src_rd).await;
        let pending = {
            let mut st = sh.state();
            st.source_gone = true;
            // Dropping the senders fails every forwarded request still waiting.
            std::mem::take(&mut st.expect).len()
        };
        sh.changed.notify_waiters();
        match r {
            Ok(()) if pending == 0 => std::future::pending::<Result<(), ReadAheadError>>().await,
            Ok(()) => Err(ReadAheadError::SourceClosed(pending)),
            Err(e) => Err(e),
        }
    };
    let ahead = async {
        request_ahead(&sh, &opts).await?;
        std::future::pending::<Result<(), ReadAheadError>>().await
    };
    let background = async { tokio::try_join!(reader, ahead, lane).map(|_| ()) };
    let result = tokio::select! {
        r = serve_daemon(&sh, daemon, delivered) => r,
        r = background => r,
    };
    let mut st = sh.state();
    let left: u64 = st
        .window
        .values()
        .flat_map(|w| w.values())
        .map(|b| b.len() as u64)
        .sum();
    st.stats.wasted += left;
    result.map(|()| st.stats)
}

/// What a channel sent while nothing was asked of it: closing then ends it; anything else is
/// an error.
fn unasked(r: std::io::Result<u8>, step: &'static str) -> Result<(), ReadAheadError> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
        Err(source) => Err(ReadAheadError::Io { step, source }),
        Ok(b) => Err(ReadAheadError::Source(format!(
            "{step}: byte {b:#x} nobody asked for"
        ))),
    }
}

/// Takes the reader lane's answers while it is open. An answer is applied only if the lane
/// is still open once it has been read: [`Shared::reader_lost`] hands what the lane owed back
/// to the page server, answers included.
async fn read_reader_answers<R, W, V>(sh: &Shared<W, V>, mut rd: R) -> Result<(), ReadAheadError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    V: AsyncWrite + Unpin,
{
    loop {
        let (dst, start, nr) = loop {
            let notified = sh.changed.notified();
            {
                let st = sh.state();
                if !st.reader_open {
                    return Ok(());
                }
                if let Some(Expect::Ahead { dst, start, nr }) = st.expect_reader.front() {
                    break (*dst, *start, *nr);
                }
            }
            tokio::select! {
                biased;
                _ = notified => {}
                r = rd.read_u8() => return unasked(r, "reading from the page reader"),
            }
        };
        let (head, data) = read_pages(&mut rd, Some((dst, start, nr))).await?;
        {
            let mut st = sh.state();
            if !st.reader_open {
                return Ok(());
            }
            st.expect_reader.pop_front();
            st.stats.fetched_by_reader += head.nr_pages * PAGE_SIZE;
            st.arrived_ahead(dst, start, nr, data);
        }
        sh.changed.notify_waiters();
    }
}

async fn read_answers<R, W, V>(sh: &Shared<W, V>, mut rd: R) -> Result<(), ReadAheadError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    V: AsyncWrite + Unpin,
{
    loop {
        let expect = loop {
            let notified = sh.changed.notified();
            {
                let mut st = sh.state();
                if let Some(e) = st.expect.pop_front() {
                    break e;
                }
                if st.closing && st.source_gone {
                    return Ok(());
                }
            }
            tokio::select! {
                biased;
                _ = notified => {}
                r = rd.read_u8() => return unasked(r, "reading from the page server"),
            }
        };
        match expect {
            Expect::Close(tx) => {
                let mut status = [0u8; CLOSE_ANSWER_LEN];
                rd.read_exact(&mut status)
                    .await
                    .map_err(io("reading the page server's close answer"))?;
                let _ = tx.send(status);
            }
            Expect::Forward(tx) => {
                let (head, data) = read_pages(&mut rd, None).await?;
                let _ = tx.send((head, data));
            }
            Expect::Ahead { dst, start, nr } => {
                let (_, data) = read_pages(&mut rd, Some((dst, start, nr))).await?;
                sh.state().arrived_ahead(dst, start, nr, data);
                sh.changed.notify_waiters();
            }
        }
    }
}

/// Reads one page answer; `asked` is what a read-ahead request asked for, to check it against.
async fn read_pages<R: AsyncRead + Unpin>(
    rd: &mut R,
    asked: Option<(u64, u64, u64)>,
) -> Result<(PsIov, Bytes), ReadAheadError> {
    let mut hb = [0u8; IOV_LEN];
    rd.read_exact(&mut hb)
        .await
        .map_err(io("reading an answer header from the page server"))?;
    let head = PsIov::decode(&hb);
    if head.command() != PS_IOV_ADD_F {
        return Err(ReadAheadError::Source(format!(
            "command {:#x} where pages were due",
            head.cmd
        )));
    }
    if let Some((dst, start, nr)) = asked {
        if head.dst_id != dst || head.vaddr != start || head.nr_pages > nr || head.nr_pages == 0 {
            return Err(ReadAheadError::Source(format!(
                "{} pages at {:#x} of {:#x} to a request for {nr} at {start:#x} of {dst:#x}",
                head.nr_pages, head.vaddr, head.dst_id
            )));
        }
    }
    let len = head
        .data_len()
        .filter(|l| *l as u64 <= MAX_ANSWER)
        .ok_or_else(|| ReadAheadError::Source(format!("{} pages in one answer", head.nr_pages)))?;
    // Read into spare capacity rather than a zeroed buffer: every page byte would be
    // written twice.
    let mut data = BytesMut::with_capacity(len);
    while data.len() < len {
        let want = (len - data.len()) as u64;
        let n = (&mut *rd)
            .take(want)
            .read_buf(&mut data)
            .await
            .map_err(io("reading pages from the page server"))?;
        if n == 0 {
            return Err(io("reading pages from the page server")(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
    }
    Ok((head, data.freeze()))
}

async fn request_ahead<W: AsyncWrite + Unpin, V: AsyncWrite + Unpin>(
    sh: &Shared<W, V>,
    opts: &ReadAheadOptions,
) -> Result<(), ReadAheadError> {
    let chunk = opts.chunk_pages * PAGE_SIZE;
    loop {
        let notified = sh.changed.notified();
        let (next, quiet) = {
            let mut st = sh.state();
            if st.closing || st.source_gone {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            // With the reader lane, read-ahead no longer queues before faults.
            let settled = st.settled(now) || st.reader_open;
            let quiet = st.quiet_until.filter(|t| *t > now && !settled);
            let in_flight = if settled {
                opts.bulk_in_flight
            } else {
                opts.in_flight
            };
            let room = st.held + chunk <= opts.window && st.asked + chunk <= in_flight;
            if quiet.is_none() && (st.held == 0 || room) {
                (st.next_chunk(opts.chunk_pages), None)
            } else {
                // The quiet time also ends when the settling time does.
                (None, quiet.map(|q| st.settles_at().map_or(q, |t| t.min(q))))
            }
        };
        match (next, quiet) {
            (Some((dst, start, nr)), _) => sh.send_ahead(dst, start, nr).await?,
            (None, Some(until)) => {
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
            (None, None) => notified.await,
        }
    }
}

enum Answer {
    Here(Bytes),
    /// Forward up to this address, then ask ahead for this run (a walk's next pages).
    Forward(u64, Option<(u64, u64, u64)>),
}

async fn serve_daemon<D, W, V>(
    sh: &Shared<W, V>,
    daemon: D,
    delivered: &AtomicU64,
) -> Result<(), ReadAheadError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
    V: AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(daemon);
    loop {
        let mut hb = [0u8; IOV_LEN];
        match rd.read_exact(&mut hb).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io("reading from the lazy-pages daemon")(e)),
        }
        let req = PsIov::decode(&hb);
        match req.command() {
            PS_IOV_GET => {
                let (head, data) = answer(sh, req).await?;
                wr.write_all(&head.encode())
                    .await
                    .map_err(io("answering the lazy-pages daemon"))?;
                wr.write_all(&data)
                    .await
                    .map_err(io("answering the lazy-pages daemon"))?;
                wr.flush()
                    .await
                    .map_err(io("answering the lazy-pages daemon"))?;
                sh.state().stats.requests += 1;
                delivered.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                sh.state().closing = true;
                sh.changed.notify_waiters();
                let (tx, rx) = oneshot::channel();
                sh.send(req, Expect::Close(tx)).await?;
                let status = rx.await.map_err(|_| ReadAheadError::SourceClosed(1))?;
                wr.write_all(&status)
                    .await
                    .map_err(io("answering the lazy-pages daemon's close"))?;
                wr.flush()
                    .await
                    .map_err(io("answering the lazy-pages daemon's close"))?;
                return Ok(());
            }
            other => {
                return Err(ReadAheadError::Daemon(format!(
                    "page-server command {other:#x}, which only a dump sends"
                )))
            }
        }
    }
}

async fn answer<W: AsyncWrite + Unpin, V: AsyncWrite + Unpin>(
    sh: &Shared<W, V>,
    req: PsIov,
) -> Result<(PsIov, Bytes), ReadAheadError> {
    let (dst, vaddr, nr) = (req.dst_id, req.vaddr, req.nr_pages);
    if nr == 0 || vaddr % PAGE_SIZE != 0 {
        return Err(ReadAheadError::Daemon(format!(
            "a request for {nr} pages at {vaddr:#x}"
        )));
    }
    let end = vaddr.saturating_add(nr.saturating_mul(PAGE_SIZE));
    // A request of several pages right after a one-page fault is the rest of a walk the
    // daemon fetches behind the fault (CRIU patch 0007), not its background transfer: it says
    // nothing about what the daemon is done with below it.
    let (prev_fault, fault) = {
        let mut st = sh.state();
        if nr == 1 {
            (st.last_fault.replace((dst, vaddr)), true)
        } else {
            let walk = st.last_fault == Some((dst, vaddr.wrapping_sub(PAGE_SIZE)));
            (None, walk)
        }
    };
    let decided = loop {
        let notified = sh.changed.notified();
        {
            let mut st = sh.state();
            let started = !fault && !st.background;
            st.background |= !fault;
            if started {
                st.background_since = Some(tokio::time::Instant::now());
            }
            if st.seen.insert(dst) || started {
                sh.changed.notify_waiters();
            }
            if !fault {
                st.passed(dst, vaddr);
            }
            if let Some(b) = st.take(dst, vaddr, nr) {
                break Answer::Here(b);
            }
            if !st.in_flight_at(dst, vaddr) {
                let mut stop = st.next_ahead(dst, vaddr).map_or(end, |n| n.min(end));
                let now = tokio::time::Instant::now();
                let quiet = st.quiet_until.is_some_and(|t| t > now);
                if !fault && quiet && !st.settled(now) {
                    stop = stop.min(vaddr.saturating_add(st.quiet_forward_pages * PAGE_SIZE));
                }
                if let Some(w) = st.wanted.get_mut(&dst) {
                    w.remove(vaddr, stop);
                }
                let next = if nr == 1 {
                    st.quiet_until = Some(tokio::time::Instant::now() + st.fault_quiet);
                    st.sequential_after(prev_fault, dst, vaddr, stop)
                } else {
                    None
                };
                break Answer::Forward(stop, next);
            }
        }
        notified.await;
    };
    match decided {
        Answer::Here(b) => {
            sh.changed.notify_waiters();
            Ok((PsIov::pages(dst, vaddr, b.len() as u64 / PAGE_SIZE), b))
        }
        Answer::Forward(stop, next) => {
            let asked = (stop - vaddr) / PAGE_SIZE;
            let (tx, rx) = oneshot::channel();
            sh.send(PsIov::get(dst, vaddr, asked), Expect::Forward(tx))
                .await?;
            if let Some((d, start, n)) = next {
                sh.send(
                    PsIov::get(d, start, n),
                    Expect::Ahead {
                        dst: d,
                        start,
                        nr: n,
                    },
                )
                .await?;
            }
            let (head, data) = rx.await.map_err(|_| ReadAheadError::SourceClosed(1))?;
            if head.dst_id != dst || head.vaddr != vaddr || head.nr_pages > asked {
                return Err(ReadAheadError::Source(format!(
                    "{} pages at {:#x} of {:#x} to a request for {asked} at {vaddr:#x} of {dst:#x}",
                    head.nr_pages, head.vaddr, head.dst_id
                )));
            }
            let got_end = vaddr + head.nr_pages * PAGE_SIZE;
            {
                let mut st = sh.state();
                if nr == 1 {
                    st.quiet_until = Some(tokio::time::Instant::now() + st.fault_quiet);
                }
                st.stats.forwarded += data.len() as u64;
                if got_end < stop {
                    st.want_again(dst, got_end, stop);
                }
            }
            sh.changed.notify_waiters();
            Ok((head, data))
        }
    }
}

#[cfg(test)]
mod tests;
