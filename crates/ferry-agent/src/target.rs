//! The target side: what this agent does when another agent migrates a container to it, and
//! the source agent's handles on a remote target ([`RemoteTarget`], [`ImagesChannel`]).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_migrate::{
    DumpedImages, PreparedTarget, ProgressFn, SideError, SideErrorKind, TargetSide, Transport,
};
use ferry_proto::{
    ErrorInfo, Fault, FrameKind, HostFacts, Message, PrepareRequest, Purpose, RestoreInfo,
    Strategy, TargetState, PROTOCOL_VERSION,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::conn::{describe, Conn, ConnError};
use crate::host::HostEnv;

/// A post-copy fetch in progress: CRIU's lazy-pages daemon and the signal that its page
/// channel to the source closed.
struct LazyFetch {
    daemon: ferry_criu::LazyPagesDaemon,
    tunnel_closed: Arc<tokio::sync::Notify>,
    /// Known when the read-ahead proxy runs: what a failure report says was lost.
    arrival: Option<PageArrival>,
}

struct PageArrival {
    /// Bytes of the lazy ranges in the pagemap images: all the source's page server holds.
    lazy_bytes: u64,
    /// Page bytes handed to the lazy-pages daemon so far.
    delivered: Arc<std::sync::atomic::AtomicU64>,
}

impl PageArrival {
    /// How much arrived and how much is lost, for the operator.
    fn describe(&self) -> String {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let got = self
            .delivered
            .load(std::sync::atomic::Ordering::Relaxed)
            .min(self.lazy_bytes);
        format!(
            "{:.1} of the {:.1} MiB of memory pages left at the source had arrived; {:.1} MiB are lost",
            mib(got),
            mib(self.lazy_bytes),
            mib(self.lazy_bytes - got)
        )
    }
}

/// Buffer between the read-ahead proxy and the page tunnel, each way.
const READ_AHEAD_PIPE: usize = 1 << 20;

/// How long the lazy-pages daemon may outlive its page channel before the target gives up.
const PAGE_CHANNEL_GRACE: Duration = Duration::from_secs(3);

/// The outcome of a resumed post-copy's page fetch, once known: `Ok` when every page arrived.
type PagesOutcome = Option<Result<(), ErrorInfo>>;

/// The watchdog of a resumed post-copy: it owns the lazy-pages daemon from the resume on, so
/// a source that dies is acted on at once (the container stopped, the loss logged here), not
/// only when a `Commit` arrives on a control channel that may already be gone.
struct PagesWatch {
    outcome: tokio::sync::watch::Receiver<PagesOutcome>,
    task: tokio::task::AbortHandle,
}

/// Signals when the page tunnel task ends, however it ends.
struct NotifyOnDrop(Arc<tokio::sync::Notify>);

impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

fn err(step: &str, message: impl std::fmt::Display) -> ErrorInfo {
    ErrorInfo {
        step: step.into(),
        message: message.to_string(),
        tool_log: vec![],
    }
}

#[derive(Debug)]
struct TargetMigration {
    state: TargetState,
    prepare: PrepareRequest,
    container_id: Option<String>,
    dir: PathBuf,
    checkpoint_dir: Option<PathBuf>,
    ctrd_copy: Option<String>,
    images_complete: bool,
    /// Pre-copy rounds whose images have all arrived (they arrive in order).
    memory_rounds: u32,
    /// Volumes this migration created here, removed again on rollback.
    created_volumes: Vec<String>,
    /// Existing volumes with content the operator allowed ferry to replace.
    replaceable_volumes: Vec<String>,
    /// `(volume data dir, its old content set aside)`: removed on commit, put back on rollback.
    replaced: Vec<(PathBuf, PathBuf)>,
    /// Manifest of each volume read back after its first pass, by volume index.
    first_pass_manifests: HashMap<usize, ferry_fs::Manifest>,
    /// Learnt while preparing, so the restore (inside the pause) asks nobody.
    restore_env: RestoreEnv,
}

/// What the restore needs to know about this host, found out before the source freezes.
#[derive(Debug, Clone, Default)]
struct RestoreEnv {
    docker_root: Option<String>,
    /// The runtime wrapper wired the container's network namespace while the migration was
    /// prepared (see `ferry_criu::prewire`); every restore of it must join that namespace.
    prewired: bool,
    /// The container's overlay upper dir, learnt before a parked start.
    upper_dir: Option<PathBuf>,
    /// The container's `Mounts`, learnt before a parked start (while it is parked Docker
    /// answers no inspect of the container).
    mounts: Option<serde_json::Value>,
}

/// What a restore step (arming, staging, the restore itself) works from, copied out of the
/// registry so its lock is not held across the step.
struct RestoreParts {
    container_id: String,
    dir: PathBuf,
    prepare: PrepareRequest,
    env: RestoreEnv,
    images_complete: bool,
    memory_rounds: u32,
}

/// A `docker start --checkpoint` begun while the migration was prepared: Docker's whole start
/// path has run and the runtime wrapper waits on `fifo` for the images.
struct Parked {
    task: tokio::task::JoinHandle<Result<(), String>>,
    fifo: PathBuf,
    /// See [`looked_up_paths`].
    looked_up: Vec<Vec<u8>>,
}

impl Parked {
    /// Tells the wrapper to go on (`GO`) or give up (`ABORT`). The fifo is opened without
    /// blocking: with no reader the wrapper is gone, which the start task reports.
    fn signal(&self, word: u8) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.fifo)
            .map_err(|e| {
                format!(
                    "the parked restore is not listening on {}: {e}",
                    self.fifo.display()
                )
            })?;
        f.write_all(&[word])
            .map_err(|e| format!("writing to {}: {e}", self.fifo.display()))
    }

    /// Calls the parked start off and waits for Docker to report it ended.
    async fn abort(self) {
        let _ = self.signal(ferry_criu::runtime::ABORT);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

/// How long a parked restore waits for its images before Docker's start gives up: the dump
/// and transfer of a stop-and-copy grow with memory, a post-copy's images are small. A lost
/// source ends the wait sooner, through the rollback that follows.
fn park_limit(strategy: Strategy) -> Duration {
    match strategy {
        s if s.lazy_pages() => Duration::from_secs(300),
        _ => Duration::from_secs(3600),
    }
}

fn upper_dir_of(inspect: &serde_json::Value) -> Option<PathBuf> {
    inspect
        .pointer("/GraphDriver/Data/UpperDir")
        .and_then(|v| v.as_str())
        .map(PathBuf::from)
}

/// Paths Docker's start looks up in the container's root before the runtime runs: the working
/// directory and every mount point. A parked start has the overlay mounted with these lookups
/// cached, so the upper dir may then change anywhere except at them or their ancestors (an
/// overlay dentry cached without an upper would hide what arrives under it).
fn looked_up_paths(inspect: &serde_json::Value) -> Vec<Vec<u8>> {
    let mut out: Vec<String> = [
        "/etc/hosts",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/dev/shm",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(w) = inspect
        .pointer("/Config/WorkingDir")
        .and_then(|v| v.as_str())
    {
        out.push(w.to_string());
    }
    for m in inspect
        .get("Mounts")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        if let Some(d) = m.get("Destination").and_then(|v| v.as_str()) {
            out.push(d.to_string());
        }
    }
    if let Some(t) = inspect
        .pointer("/HostConfig/Tmpfs")
        .and_then(|v| v.as_object())
    {
        out.extend(t.keys().cloned());
    }
    out.into_iter()
        .map(|p| p.trim_matches('/').as_bytes().to_vec())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Whether `entry` (a layer path, relative) is one of `looked_up` or an ancestor of one.
fn shadows(entry: &[u8], looked_up: &[Vec<u8>]) -> bool {
    looked_up.iter().any(|l| {
        l.as_slice() == entry || (l.starts_with(entry) && l.get(entry.len()) == Some(&b'/'))
    })
}

/// Whether the writable-layer stream must not be applied under a parked start's mounted
/// overlay (see [`looked_up_paths`]).
fn layer_conflicts(stream: &Path, looked_up: &[Vec<u8>]) -> Result<bool, String> {
    let f = std::fs::File::open(stream).map_err(|e| format!("{}: {e}", stream.display()))?;
    let mut r =
        ferry_fs::StreamReader::new(std::io::BufReader::new(f)).map_err(|e| e.to_string())?;
    loop {
        match r.next_record().map_err(|e| e.to_string())? {
            ferry_fs::Record::Entry(e)
                if !e.path().is_root() && shadows(e.path().as_bytes(), looked_up) =>
            {
                return Ok(true)
            }
            ferry_fs::Record::End(_) => return Ok(false),
            _ => {}
        }
    }
}

/// Where a received file goes: a file in the images dir, or (a volume's first pass) straight
/// into the volume, applied on a blocking thread as the frames arrive.
enum Sink {
    File(tokio::fs::File),
    Apply(
        Option<tokio::sync::mpsc::Sender<bytes::Bytes>>,
        tokio::task::JoinHandle<Result<ferry_fs::Manifest, String>>,
    ),
}

impl Sink {
    async fn write(&mut self, data: bytes::Bytes) -> Result<(), String> {
        match self {
            Sink::File(f) => f.write_all(&data).await.map_err(|e| e.to_string()),
            Sink::Apply(tx, task) => {
                let sent = match tx {
                    Some(tx) => tx.send(data).await.is_ok(),
                    None => false,
                };
                if sent {
                    return Ok(());
                }
                // The applier stopped reading: its own error says why.
                tx.take();
                match task.await {
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(_)) => Err("the stream ended before its data did".into()),
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }

    /// The manifest read back after a first pass was applied; None for a plain file.
    async fn finish(self) -> Result<Option<ferry_fs::Manifest>, String> {
        match self {
            Sink::File(mut f) => f.flush().await.map(|_| None).map_err(|e| e.to_string()),
            Sink::Apply(tx, task) => {
                drop(tx);
                task.await.map_err(|e| e.to_string())?.map(Some)
            }
        }
    }
}

/// Migrations arriving at this host, by migration id.
#[derive(Clone)]
pub struct Targets {
    env: HostEnv,
    map: Arc<Mutex<HashMap<String, TargetMigration>>>,
    /// Post-copy: the lazy-pages daemon of each restored migration, until all pages arrived.
    lazy: Arc<Mutex<HashMap<String, LazyFetch>>>,
    /// Post-copy: the page watchdog of each resumed migration, until it is committed.
    pages: Arc<Mutex<HashMap<String, PagesWatch>>>,
    /// Restores started while their migration was prepared, waiting for the images.
    parked: Arc<Mutex<HashMap<String, Parked>>>,
    client_tls: Arc<rustls::ClientConfig>,
}

/// Writes a script CRIU runs, readable and executable by root only.
fn write_executable(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700))?;
    std::fs::rename(&tmp, path)
}

/// Where a received image file goes: the final image set is flat; pre-copy rounds come as
/// `pre-<round>/<file>` and each round gets a directory of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageName<'a> {
    Final(&'a str),
    Round(u32, &'a str),
}

/// Parses a received file name, refusing anything that could leave the migration's directory
/// or name a round beyond pre-copy's round limit.
pub fn parse_image_name(name: &str) -> Option<ImageName<'_>> {
    // `parent` is the link the target makes between rounds, never a received file.
    let plain = |f: &str| safe_image_name(f) && f != "parent";
    if let Some((round, file)) = name.strip_prefix("pre-").and_then(|r| r.split_once('/')) {
        if round.is_empty() || !round.bytes().all(|b| b.is_ascii_digit()) || round.starts_with('0')
        {
            return None;
        }
        let round: u32 = round.parse().ok()?;
        let max = u32::try_from(ferry_criu::precopy::MAX_ROUNDS).unwrap_or(u32::MAX);
        return (round <= max && plain(file)).then_some(ImageName::Round(round, file));
    }
    plain(name).then_some(ImageName::Final(name))
}

/// Directory of pre-copy round `round` inside a migration's directory.
fn round_dir(migration_dir: &Path, round: u32) -> PathBuf {
    migration_dir.join("pre").join(round.to_string())
}

/// Makes round `round`'s directory, linked to the round before as CRIU's `parent` (the
/// target writes the links itself: no received name is ever a link).
fn make_round_dir(migration_dir: &Path, round: u32) -> std::io::Result<PathBuf> {
    let dir = round_dir(migration_dir, round);
    std::fs::create_dir_all(&dir)?;
    if round > 1 {
        let link = dir.join("parent");
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("../{}", round - 1), &link)?;
        }
    }
    Ok(dir)
}

/// Links the final images to the last pre-copy round, so CRIU's restore (and the lazy-pages
/// daemon) find the pages the final dump left there.
fn link_final_to_round(migration_dir: &Path, round: u32) -> std::io::Result<()> {
    let link = migration_dir.join("images").join("parent");
    if std::fs::symlink_metadata(&link).is_ok() {
        std::fs::remove_file(&link)?;
    }
    std::os::unix::fs::symlink(format!("../pre/{round}"), &link)
}

/// A file name inside a flat CRIU image directory: one normal component, nothing else.
pub fn safe_image_name(name: &str) -> bool {
    let p = Path::new(name);
    let mut comps = p.components();
    matches!(
        (comps.next(), comps.next()),
        (Some(Component::Normal(_)), None)
    ) && !name.contains('/')
        && !name.contains('\0')
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .filter_map(|p| u8::from_str_radix(p, 16).ok())
        .collect();
    if parts.len() == 6 && s.split(':').count() == 6 {
        let mut m = [0u8; 6];
        m.copy_from_slice(&parts);
        Some(m)
    } else {
        None
    }
}

impl Targets {
    pub fn new(env: HostEnv, client_tls: Arc<rustls::ClientConfig>) -> Self {
        Targets {
            env,
            map: Arc::default(),
            lazy: Arc::default(),
            pages: Arc::default(),
            parked: Arc::default(),
            client_tls,
        }
    }

    async fn restore_parts(&self, id: &str, step: &str) -> Result<RestoreParts, ErrorInfo> {
        let map = self.map.lock().await;
        let m = map
            .get(id)
            .ok_or_else(|| err(step, format!("no prepared migration {id}")))?;
        Ok(RestoreParts {
            container_id: m
                .container_id
                .clone()
                .ok_or_else(|| err(step, "no target container"))?,
            dir: m.dir.clone(),
            prepare: m.prepare.clone(),
            env: m.restore_env.clone(),
            images_complete: m.images_complete,
            memory_rounds: m.memory_rounds,
        })
    }

    /// Post-copy: starts CRIU's lazy-pages daemon against a loopback port whose one connection
    /// is tunnelled, over an authenticated channel, to the source's page server.
    async fn start_lazy_pages(
        &self,
        id: &str,
        prepare: &PrepareRequest,
        images: &Path,
        work: &Path,
    ) -> Result<(), ErrorInfo> {
        let step = "restore (target): lazy pages";
        let criu = self
            .env
            .criu
            .clone()
            .ok_or_else(|| err(step, "criu not found"))?;
        let source: SocketAddr = prepare
            .source_agent
            .as_deref()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| err(step, "the source did not say where its agent listens"))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| err(step, format!("binding a loopback port: {e}")))?;
        let local = listener.local_addr().map_err(|e| err(step, e))?;
        let ask_chunks = prepare.transfer.compression != ferry_proto::Compression::Off;
        let pages = dial_features(
            source,
            self.client_tls.clone(),
            Purpose::Pages {
                migration_id: id.to_string(),
                chunks: ask_chunks,
            },
            Duration::from_secs(10),
        );
        let reads = async {
            if !prepare.page_reads {
                return None;
            }
            let purpose = Purpose::PageReads {
                migration_id: id.to_string(),
                chunks: ask_chunks,
            };
            match dial_features(
                source,
                self.client_tls.clone(),
                purpose,
                Duration::from_secs(10),
            )
            .await
            {
                Ok(c) => Some(c),
                Err(e) => {
                    warn!(migration = %id, "no page reader lane, reading ahead through the page server: {e}");
                    None
                }
            }
        };
        let (pages, reads) = tokio::join!(pages, reads);
        let (tunnel, features) = pages.map_err(|e| {
            err(
                step,
                format!("opening the page channel to the source agent {source}: {e}"),
            )
        })?;
        let mut daemon = ferry_criu::LazyPagesDaemon::start(&criu, images, work, local)
            .map_err(|e| err(step, e))?;
        // The daemon dials the page server only once the restore attaches to it, so the tunnel
        // is joined in the background and a daemon that never dials is killed with the restore.
        let mid = id.to_string();
        let opts = ferry_transfer::BridgeOptions {
            framed: ask_chunks && features.iter().any(|f| f == ferry_proto::FEATURE_CHUNKS),
            compression: prepare.transfer.compression,
            pacer: ferry_transfer::Pacer::new(prepare.transfer.bandwidth_limit_bytes_per_s),
            stats: Arc::default(),
        };
        // Without the lazy ranges the tunnel still works, only without read-ahead.
        let lazy = match ferry_pages::lazy_pages(images) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(migration = %id, "no read-ahead of the pages: {e}");
                None
            }
        };
        let arrival = lazy.as_ref().map(|l| PageArrival {
            lazy_bytes: l.values().map(|r| r.len()).sum(),
            delivered: Arc::default(),
        });
        let delivered = arrival.as_ref().map(|a| a.delivered.clone());
        let tunnel_closed = Arc::new(tokio::sync::Notify::new());
        let closed = tunnel_closed.clone();
        tokio::spawn(async move {
            let _signal = NotifyOnDrop(closed);
            let sock = match tokio::time::timeout(Duration::from_secs(120), listener.accept()).await
            {
                Ok(Ok((sock, _))) => sock,
                Ok(Err(e)) => {
                    warn!(migration = %mid, "accepting the lazy-pages daemon: {e}");
                    return;
                }
                Err(_) => {
                    warn!(migration = %mid, "the lazy-pages daemon never dialled the page server");
                    return;
                }
            };
            let _ = sock.set_nodelay(true);
            let (Some(lazy), Some(delivered)) = (lazy, delivered) else {
                match crate::conn::bridge(tunnel, sock, opts).await {
                    Ok(t) => {
                        info!(migration = %mid, from_source = t.from_peer.raw, from_source_wire = t.from_peer.wire, to_source = t.to_peer.raw, "page tunnel closed")
                    }
                    Err(e) => warn!(migration = %mid, "page tunnel: {e}"),
                }
                return;
            };
            // The daemon talks to the read-ahead proxy, the proxy to the page server through
            // the tunnel (and to the source agent's page reader, where there is one); whichever
            // ends first closes its side, which ends the other.
            let (near, far) = tokio::io::duplex(READ_AHEAD_PIPE);
            let ra = ferry_pages::ReadAheadOptions::default();
            let (proxied, tunnelled) = match reads {
                Some((lane, lane_features)) => {
                    let lane_opts = ferry_transfer::BridgeOptions {
                        framed: ask_chunks
                            && lane_features
                                .iter()
                                .any(|f| f == ferry_proto::FEATURE_CHUNKS),
                        compression: opts.compression,
                        pacer: opts.pacer.clone(),
                        stats: Arc::default(),
                    };
                    let (r_near, r_far) = tokio::io::duplex(READ_AHEAD_PIPE);
                    let proxy =
                        ferry_pages::read_ahead_split(sock, near, r_near, lazy, ra, &delivered);
                    let lane = async {
                        if let Err(e) = crate::conn::bridge(lane, r_far, lane_opts).await {
                            warn!(migration = %mid, "page reader lane: {e}");
                        }
                    };
                    let (proxied, tunnelled, ()) =
                        tokio::join!(proxy, crate::conn::bridge(tunnel, far, opts), lane);
                    (proxied, tunnelled)
                }
                None => {
                    let proxy = ferry_pages::read_ahead_counted(sock, near, lazy, ra, &delivered);
                    tokio::join!(proxy, crate::conn::bridge(tunnel, far, opts))
                }
            };
            match proxied {
                Ok(r) => {
                    info!(migration = %mid, fetched_ahead = r.fetched_ahead, fetched_by_reader = r.fetched_by_reader, reader_lost = r.reader_lost, served_ahead = r.served_ahead, forwarded = r.forwarded, wasted = r.wasted, requests = r.requests, peak_held = r.peak_held, peak_in_flight = r.peak_in_flight, "read-ahead done")
                }
                Err(e) => warn!(migration = %mid, "read-ahead: {e}"),
            }
            match tunnelled {
                Ok(t) => {
                    info!(migration = %mid, from_source = t.from_peer.raw, from_source_wire = t.from_peer.wire, to_source = t.to_peer.raw, "page tunnel closed")
                }
                Err(e) => warn!(migration = %mid, "page tunnel: {e}"),
            }
        });
        if let Err(e) = daemon.wait_socket(Duration::from_secs(10)).await {
            daemon.kill().await;
            return Err(ErrorInfo {
                step: step.into(),
                message: e.to_string(),
                tool_log: e.log().to_vec(),
            });
        }
        self.lazy.lock().await.insert(
            id.to_string(),
            LazyFetch {
                daemon,
                tunnel_closed,
                arrival,
            },
        );
        Ok(())
    }

    pub async fn state(&self, id: &str) -> TargetState {
        self.map
            .lock()
            .await
            .get(id)
            .map(|m| m.state)
            .unwrap_or(TargetState::Unknown)
    }

    pub async fn prepare(&self, req: PrepareRequest) -> Result<PreparedTarget, ErrorInfo> {
        let step = "prepare (target)";
        if req.migration_id.is_empty() || !safe_image_name(&req.migration_id) {
            return Err(err(
                step,
                format!("invalid migration id {:?}", req.migration_id),
            ));
        }
        let docker = &self.env.docker;
        if docker
            .inspect_container(&req.container_name)
            .await
            .map_err(|e| err(step, e))?
            .is_some()
        {
            return Err(err(
                step,
                format!(
                    "a container named {:?} already exists on target {}",
                    req.container_name, self.env.name
                ),
            ));
        }
        if docker
            .inspect_image(&req.image_id)
            .await
            .map_err(|e| err(step, e))?
            .is_none()
        {
            self.pull_image(&req).await?;
        }
        for n in &req.networks {
            let net = docker
                .inspect_network(&n.network)
                .await
                .map_err(|e| err(step, e))?
                .ok_or_else(|| {
                    err(
                        step,
                        format!(
                            "network {:?} does not exist on target {}",
                            n.network, self.env.name
                        ),
                    )
                })?;
            let driver = net.get("Driver").and_then(|d| d.as_str()).unwrap_or("");
            if driver != n.driver {
                return Err(err(
                    step,
                    format!(
                        "network {:?} is a {driver} network on the target but {} on the source",
                        n.network, n.driver
                    ),
                ));
            }
            if let Some(ip) = &n.ipv4 {
                if let Some(containers) = net.get("Containers").and_then(|c| c.as_object()) {
                    for (cid, c) in containers {
                        let addr = c.get("IPv4Address").and_then(|a| a.as_str()).unwrap_or("");
                        if addr.split('/').next() == Some(ip.as_str()) {
                            return Err(err(step, format!("address {ip} is already used on network {:?} of the target by container {}", n.network, &cid[..12.min(cid.len())])));
                        }
                    }
                }
            }
        }
        let missing: Vec<&String> = req
            .shared_paths
            .iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        if !missing.is_empty() {
            return Err(err(
                step,
                format!(
                    "bind mounts declared shared do not exist on target {}: {}",
                    self.env.name,
                    missing
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let mut created_volumes = Vec::new();
        let mut replaceable_volumes = Vec::new();
        for v in &req.volumes {
            match docker.inspect_volume(v).await.map_err(|e| err(step, e))? {
                None => created_volumes.push(v.clone()),
                Some(vol) => {
                    let mp = vol.get("Mountpoint").and_then(|m| m.as_str()).unwrap_or("");
                    let has_content = std::fs::read_dir(mp)
                        .map(|mut d| d.next().is_some())
                        .unwrap_or(true);
                    if has_content && !req.overwrite_volumes {
                        return Err(err(step, format!("volume {v:?} already exists on target {} with content; remove it, pick another target, or pass --overwrite-volumes to replace its content", self.env.name)));
                    }
                    if has_content {
                        replaceable_volumes.push(v.clone());
                    }
                }
            }
        }
        let mut body = req.create_body.clone();
        if let Some(r) = &req.image_ref {
            let same = docker
                .inspect_image(r)
                .await
                .ok()
                .flatten()
                .and_then(|i| i.get("Id").and_then(|v| v.as_str()).map(str::to_string));
            if same.as_deref() == Some(req.image_id.as_str()) {
                if let Some(cfg) = body.as_object_mut() {
                    cfg.insert("Image".into(), serde_json::Value::String(r.clone()));
                }
            }
        }
        if let Some(hc) = body.get_mut("HostConfig").and_then(|h| h.as_object_mut()) {
            hc.insert(
                "Runtime".into(),
                serde_json::Value::String(crate::FERRY_RUNTIME.into()),
            );
        }
        let nft_lock = match &self.env.criu {
            Some(criu) => ferry_criu::facts::has_feature(criu, "network_lock_nftables").await,
            None => false,
        };
        let restore_env = RestoreEnv {
            docker_root: docker.info().await.ok().and_then(|i| {
                i.get("DockerRootDir")
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            }),
            prewired: false,
            upper_dir: None,
            mounts: None,
        };
        let dir = self.env.state_dir.join("incoming").join(&req.migration_id);
        std::fs::create_dir_all(dir.join("images"))
            .map_err(|e| err(step, format!("{}: {e}", dir.display())))?;
        std::fs::create_dir_all(dir.join("work"))
            .map_err(|e| err(step, format!("{}: {e}", dir.display())))?;
        let mut map = self.map.lock().await;
        map.insert(
            req.migration_id.clone(),
            TargetMigration {
                state: TargetState::Prepared,
                prepare: req.clone(),
                container_id: None,
                dir: dir.clone(),
                checkpoint_dir: None,
                ctrd_copy: None,
                images_complete: false,
                memory_rounds: 0,
                created_volumes: Vec::new(),
                replaceable_volumes,
                replaced: Vec::new(),
                first_pass_manifests: HashMap::new(),
                restore_env,
            },
        );
        drop(map);
        let id = docker
            .create_container(&req.container_name, &body)
            .await
            .map_err(|e| err(step, format!("creating the container: {e}")))?;
        if let Some(m) = self.map.lock().await.get_mut(&req.migration_id) {
            m.container_id = Some(id.clone());
            m.created_volumes = created_volumes;
        }
        info!(container = %req.container_name, id = %id, "target container created");
        let prewired = if req.prewire_netns {
            self.arm(&req.migration_id, Duration::from_secs(120))
                .await?
        } else {
            false
        };
        Ok(PreparedTarget {
            container_id: id,
            prewired_netns: prewired,
            nft_lock,
        })
    }

    /// Starts the restore now, outside the pause: `docker start --checkpoint` runs Docker's
    /// whole start path, and the runtime wrapper wires the network namespace and then waits
    /// for `restore` to say the images are in place. Returns whether the namespace was wired.
    async fn arm(&self, id: &str, timeout: Duration) -> Result<bool, ErrorInfo> {
        let step = "prepare (target): parked restore";
        let parts = self.restore_parts(id, step).await?;
        let (cid, strategy) = (parts.container_id, parts.prepare.strategy);
        let fifo = ferry_criu::runtime::go_fifo_path(&self.env.state_dir, &cid);
        let report = ferry_criu::runtime::arm_report_path(&self.env.state_dir, &cid);
        if let Some(parent) = fifo.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| err(step, format!("{}: {e}", parent.display())))?;
        }
        let _ = std::fs::remove_file(&fifo);
        let _ = std::fs::remove_file(&report);
        nix::unistd::mkfifo(
            &fifo,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .map_err(|e| err(step, format!("mkfifo {}: {e}", fifo.display())))?;
        let prewire = ferry_criu::runtime::Prewire {
            park: true,
            go_fifo: fifo.clone(),
            report: report.clone(),
            park_timeout_s: park_limit(strategy).as_secs(),
        };
        let cp_name = self.stage(id, timeout, Some(prewire)).await?;
        // Learnt now: while the start is parked Docker answers no inspect of the container.
        let inspect = self
            .env
            .docker
            .inspect_container(&cid)
            .await
            .map_err(|e| err(step, e))?
            .ok_or_else(|| err(step, "target container vanished"))?;
        let looked_up = looked_up_paths(&inspect);
        if let Some(m) = self.map.lock().await.get_mut(id) {
            m.restore_env.upper_dir = upper_dir_of(&inspect);
            m.restore_env.mounts = inspect.get("Mounts").cloned();
        }
        let docker = self.env.docker.clone();
        let start_cid = cid.clone();
        let task = tokio::spawn(async move {
            docker
                .start_container(&start_cid, Some(&cp_name))
                .await
                .map_err(|e| e.to_string())
        });
        let parked = Parked {
            task,
            fifo,
            looked_up,
        };
        let deadline = Instant::now() + timeout;
        let armed = loop {
            if let Ok(bytes) = std::fs::read(&report) {
                match serde_json::from_slice::<ferry_criu::runtime::ArmReport>(&bytes) {
                    Ok(r) => break r,
                    Err(e) => {
                        parked.abort().await;
                        return Err(err(step, format!("{}: {e}", report.display())));
                    }
                }
            }
            if parked.task.is_finished() {
                let why = match parked.task.await {
                    Ok(Ok(())) => "it ended without restoring".to_string(),
                    Ok(Err(e)) => e,
                    Err(e) => e.to_string(),
                };
                return Err(err(
                    step,
                    format!("docker start from checkpoint ended before the restore was armed: {why} (is the container's runtime {}?)", crate::FERRY_RUNTIME),
                ));
            }
            if Instant::now() > deadline {
                parked.abort().await;
                return Err(err(
                    step,
                    format!(
                        "the runtime wrapper did not arm the restore within {} s",
                        timeout.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if let Some(e) = armed.error {
            parked.abort().await;
            return Err(err(step, format!("wiring the network namespace: {e}")));
        }
        if let Some(m) = self.map.lock().await.get_mut(id) {
            m.restore_env.prewired = armed.prewired;
        }
        self.parked.lock().await.insert(id.to_string(), parked);
        info!(
            id,
            prewired = armed.prewired,
            "restore parked until the images arrive"
        );
        Ok(armed.prewired)
    }

    /// Leaves everything the runtime wrapper reads for this restore: its overrides, CRIU's
    /// configuration and the checkpoint stub Docker insists on. Returns the checkpoint's name.
    async fn stage(
        &self,
        id: &str,
        timeout: Duration,
        prewire: Option<ferry_criu::runtime::Prewire>,
    ) -> Result<String, ErrorInfo> {
        let step = "restore (target)";
        let RestoreParts {
            container_id,
            dir,
            prepare,
            env: renv,
            ..
        } = self.restore_parts(id, step).await?;
        let images = dir.join("images");
        let work = dir.join("work");
        let mut extra_args = vec![];
        if prepare.strategy.lazy_pages() {
            extra_args.push("--lazy-pages".to_string());
        }
        let opath = ferry_criu::runtime::overrides_path(&self.env.state_dir, &container_id);
        let rpath = ferry_criu::runtime::record_path(&self.env.state_dir, &container_id);
        if let Some(parent) = opath.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| err(step, format!("{}: {e}", parent.display())))?;
        }
        let mut conf_text = String::new();
        if prewire.is_some() {
            let script = ferry_criu::runtime::action_script_path(&self.env.state_dir);
            let exe = std::env::current_exe()
                .map_err(|e| err(step, format!("finding ferry's own binary: {e}")))?;
            write_executable(&script, &ferry_criu::prewire::action_script(&exe))
                .map_err(|e| err(step, format!("{}: {e}", script.display())))?;
            conf_text.push_str(&format!("action-script {}\n", script.display()));
        }
        let criu_config = if conf_text.is_empty() {
            None
        } else {
            let conf = ferry_criu::runtime::criu_config_path(&self.env.state_dir, &container_id);
            std::fs::write(&conf, conf_text)
                .map_err(|e| err(step, format!("{}: {e}", conf.display())))?;
            Some(conf)
        };
        let overrides = ferry_criu::runtime::RestoreOverrides {
            image_path: images.clone(),
            work_path: work.clone(),
            tcp_established: true,
            extra_args,
            timeout_s: timeout.as_secs().saturating_sub(10).max(10),
            criu_config,
            prewire,
        };
        let _ = std::fs::remove_file(&rpath);
        std::fs::write(&opath, serde_json::to_vec(&overrides).unwrap_or_default())
            .map_err(|e| err(step, format!("{}: {e}", opath.display())))?;

        let root = match renv.docker_root {
            Some(r) => r,
            None => self
                .env
                .docker
                .info()
                .await
                .map_err(|e| err(step, e))?
                .get("DockerRootDir")
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| err(step, "Docker does not report DockerRootDir"))?,
        };
        let root = root.as_str();
        if let Some(owner) = crate::userns::remapped_root(root) {
            let blocked = crate::userns::unreachable_ancestors(&self.env.state_dir);
            if !blocked.is_empty() {
                return Err(err(
                    step,
                    format!(
                        "this dockerd remaps container root to uid {}, which cannot reach the checkpoint images: give {} search permission (o+x)",
                        owner.0,
                        blocked.join(", ")
                    ),
                ));
            }
            crate::userns::grant(&self.env.state_dir, &dir, owner).map_err(|e| {
                err(
                    step,
                    format!(
                        "handing the checkpoint images to the remapped root uid {}: {e}",
                        owner.0
                    ),
                )
            })?;
        }
        let cp_name = format!("ferry-{id}");
        let cp_dir = Path::new(root)
            .join("containers")
            .join(&container_id)
            .join("checkpoints")
            .join(&cp_name);
        std::fs::create_dir_all(&cp_dir)
            .map_err(|e| err(step, format!("{}: {e}", cp_dir.display())))?;
        // Docker insists on a checkpoint directory; the real images are handed to runc by the
        // runtime wrapper, so containerd copies only this note through its content store.
        let _ = std::fs::write(
            cp_dir.join("FERRY"),
            format!("images for this restore are in {}\n", images.display()),
        );
        if let Some(m) = self.map.lock().await.get_mut(id) {
            m.checkpoint_dir = Some(cp_dir.clone());
        }
        Ok(cp_name)
    }

    /// Brings the container's image from the source agent: `docker save` there, streamed over
    /// the agents' channel into `docker load` here, never staged whole.
    async fn pull_image(&self, req: &PrepareRequest) -> Result<(), ErrorInfo> {
        let step = "prepare (target): image transfer";
        let source: SocketAddr = req
            .source_agent
            .as_deref()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                err(
                    step,
                    format!(
                        "image {} is not on target {} and the source agent's address is unknown",
                        req.image_id, self.env.name
                    ),
                )
            })?;
        let mut conn = dial(
            source,
            self.client_tls.clone(),
            Purpose::Image {
                image_id: req.image_id.clone(),
            },
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| err(step, e))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
        let docker = self.env.docker.clone();
        let load = tokio::spawn(async move { docker.load_image(rx).await });
        let mut got = 0u64;
        let outcome: Result<(), ErrorInfo> = loop {
            let frame = match conn.recv_frame(Duration::from_secs(120)).await {
                Ok(f) => f,
                Err(e) => break Err(err(step, e)),
            };
            match frame.kind {
                FrameKind::Chunk => {
                    break Err(err(step, "unexpected chunk frame in an image pull"))
                }
                FrameKind::Data => {
                    got += frame.payload.len() as u64;
                    if tx.send(frame.payload).await.is_err() {
                        break Err(err(step, "docker load stopped reading"));
                    }
                }
                FrameKind::Control => match frame.into_message() {
                    Ok(Message::ImagesDone { bytes, .. }) if bytes == got => break Ok(()),
                    Ok(Message::ImagesDone { bytes, .. }) => {
                        break Err(err(
                            step,
                            format!("source sent {bytes} bytes, {got} arrived"),
                        ))
                    }
                    Ok(Message::Error(e)) => break Err(e),
                    Ok(other) => break Err(err(step, format!("unexpected {}", describe(&other)))),
                    Err(e) => break Err(err(step, e)),
                },
            }
        };
        drop(tx);
        let loaded = load.await.map_err(|e| err(step, e))?;
        outcome?;
        loaded.map_err(|e| err(step, format!("docker load: {e}")))?;
        match self.env.docker.inspect_image(&req.image_id).await {
            Ok(Some(_)) => {
                info!(image = %req.image_id, bytes = got, "image pulled from the source");
                Ok(())
            }
            _ => Err(err(
                step,
                format!(
                    "after loading {got} bytes, image {} is still not present",
                    req.image_id
                ),
            )),
        }
    }

    /// Receives one image set; every file is checked against the sender's SHA-256.
    pub async fn receive_images<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Conn<S>,
        id: &str,
        timeout: Duration,
    ) -> Result<(u64, u64), ErrorInfo> {
        let step = "receive images";
        let (mig_dir, rounds_done, takes_rounds) = {
            let map = self.map.lock().await;
            let m = map
                .get(id)
                .ok_or_else(|| err(step, format!("no prepared migration {id}")))?;
            if m.state != TargetState::Prepared {
                return Err(err(
                    step,
                    format!("migration {id} is {:?}, not waiting for images", m.state),
                ));
            }
            (
                m.dir.clone(),
                m.memory_rounds,
                m.prepare.strategy.memory_rounds(),
            )
        };
        let dir = mig_dir.join("images");
        // The pre-copy round this image set carries, if it is one.
        let mut set_round: Option<u32> = None;
        let (mut files, mut bytes) = (0u64, 0u64);
        let mut chunks = ferry_transfer::ChunkDecoder::new();
        loop {
            let msg = conn.recv(timeout).await.map_err(|e| err(step, e))?;
            match msg {
                Message::FileStart { path, size, mode } => {
                    let Some(name) = parse_image_name(&path) else {
                        return Err(err(
                            step,
                            format!("refused image file name {path:?}: neither a plain file name nor pre-<round>/<file name>"),
                        ));
                    };
                    let dest = match name {
                        ImageName::Final(file) => {
                            if set_round.is_some() {
                                return Err(err(
                                    step,
                                    format!("{path}: a final image inside a pre-copy round's set"),
                                ));
                            }
                            dir.join(file)
                        }
                        ImageName::Round(round, file) => {
                            if !takes_rounds {
                                return Err(err(step, format!("{path}: a pre-copy round for a migration whose strategy copies no memory ahead")));
                            }
                            if files > 0 && set_round != Some(round) {
                                return Err(err(
                                    step,
                                    format!("{path}: files of different rounds in one image set"),
                                ));
                            }
                            if round != rounds_done + 1 {
                                return Err(err(step, format!("{path}: round {round} arrived after round {rounds_done}; rounds must come in order")));
                            }
                            set_round = Some(round);
                            make_round_dir(&mig_dir, round)
                                .map_err(|e| err(step, format!("round {round}: {e}")))?
                                .join(file)
                        }
                    };
                    let mut sink = match crate::volumes::first_pass_index(&path) {
                        Some(index) => {
                            let (name, data) = self.volume_dest(id, index).await?;
                            let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
                            let task = tokio::task::spawn_blocking(move || {
                                crate::volumes::apply_stream(
                                    crate::volumes::ChannelReader::new(rx),
                                    &data,
                                )
                                .map_err(|e| format!("volume {name:?}: {e}"))
                            });
                            Sink::Apply(Some(tx), task)
                        }
                        None => Sink::File(
                            tokio::fs::OpenOptions::new()
                                .write(true)
                                .create_new(true)
                                .open(&dest)
                                .await
                                .map_err(|e| err(step, format!("{}: {e}", dest.display())))?,
                        ),
                    };
                    let mut hasher = Sha256::new();
                    let mut got = 0u64;
                    let want = loop {
                        let frame = conn.recv_frame(timeout).await.map_err(|e| err(step, e))?;
                        match frame.kind {
                            FrameKind::Data | FrameKind::Chunk => {
                                let payload = chunks
                                    .frame_bytes(frame)
                                    .map_err(|e| err(step, format!("{path}: {e}")))?;
                                got += payload.len() as u64;
                                if got > size {
                                    return Err(err(
                                        step,
                                        format!(
                                            "{path}: more data than the announced {size} bytes"
                                        ),
                                    ));
                                }
                                hasher.update(&payload);
                                sink.write(payload)
                                    .await
                                    .map_err(|e| err(step, format!("{path}: {e}")))?;
                            }
                            FrameKind::Control => {
                                match frame.into_message().map_err(|e| err(step, e))? {
                                    Message::FileEnd { sha256 } => break sha256,
                                    other => {
                                        return Err(err(
                                            step,
                                            format!(
                                                "unexpected {} inside file {path}",
                                                describe(&other)
                                            ),
                                        ))
                                    }
                                }
                            }
                        }
                    };
                    let applied = sink
                        .finish()
                        .await
                        .map_err(|e| err(step, format!("{path}: {e}")))?;
                    let have = hex::encode(hasher.finalize());
                    if got != size || have != want {
                        return Err(err(step, format!("{path}: received {got} of {size} bytes, sha256 {have} where the source sent {want}")));
                    }
                    use std::os::unix::fs::PermissionsExt;
                    let _ = std::fs::set_permissions(
                        &dest,
                        std::fs::Permissions::from_mode(mode & 0o777),
                    );
                    if let (Some(m), Some(index)) =
                        (applied, crate::volumes::first_pass_index(&path))
                    {
                        if let Some(t) = self.map.lock().await.get_mut(id) {
                            t.first_pass_manifests.insert(index, m);
                        }
                    }
                    files += 1;
                    bytes += size;
                }
                Message::ImagesDone { files: f, bytes: b } => {
                    if f != files || b != bytes {
                        return Err(err(
                            step,
                            format!("source sent {f} files / {b} bytes, {files} / {bytes} arrived"),
                        ));
                    }
                    if let Some(m) = self.map.lock().await.get_mut(id) {
                        match set_round {
                            Some(round) => m.memory_rounds = round,
                            None => m.images_complete = true,
                        }
                    }
                    return Ok((files, bytes));
                }
                other => return Err(err(step, format!("unexpected {}", describe(&other)))),
            }
        }
    }

    pub async fn restore(&self, id: &str, timeout: Duration) -> Result<RestoreInfo, ErrorInfo> {
        let step = "restore (target)";
        let RestoreParts {
            container_id,
            dir,
            prepare,
            env: renv,
            images_complete,
            memory_rounds,
        } = self.restore_parts(id, step).await?;
        if !images_complete {
            return Err(err(step, "the checkpoint images have not all arrived"));
        }
        let images = dir.join("images");
        if memory_rounds > 0 {
            link_final_to_round(&dir, memory_rounds).map_err(|e| {
                err(
                    step,
                    format!("linking the images to pre-copy round {memory_rounds}: {e}"),
                )
            })?;
        }
        let work = dir.join("work");
        if prepare.fault == Some(Fault::TargetRestore) {
            damage_pages(&images).map_err(|e| err(step, format!("fault injection: {e}")))?;
            warn!("fault injected: process tree image damaged before restore");
        }
        let mut steps = std::collections::BTreeMap::new();
        let mut clock = Instant::now();
        let mut lap = |name: &str| {
            let ms = clock.elapsed().as_millis() as u64;
            steps.insert(name.to_string(), ms);
            clock = Instant::now();
            ms
        };
        self.apply_volumes(id, &images).await?;
        lap("volumes");
        // A parked start stays registered until it is told to go, so that a failure before
        // then leaves it to the rollback to call off.
        let looked_up = self
            .parked
            .lock()
            .await
            .get(id)
            .map(|p| p.looked_up.clone());
        let stream = images.join(crate::source::ROOTFS_STREAM);
        if stream.exists() {
            let conflicts = match &looked_up {
                Some(l) => layer_conflicts(&stream, l).map_err(|e| err(step, e))?,
                None => false,
            };
            if conflicts {
                if let Some(p) = self.parked.lock().await.remove(id) {
                    // Docker's parked start cached lookups the layer would change under its
                    // overlay: start again once the layer is in place, wiring the namespace
                    // inline.
                    info!(id, "the writable layer changes paths Docker's start looked up: the parked restore starts over");
                    p.abort().await;
                }
            }
            self.apply_layer(&container_id, renv.upper_dir.clone(), &stream, &dir)
                .await?;
        }
        lap("layer");
        if prepare.strategy.lazy_pages() {
            self.start_lazy_pages(id, &prepare, &images, &work).await?;
        }
        lap("lazy_pages_daemon");
        let rpath = ferry_criu::runtime::record_path(&self.env.state_dir, &container_id);
        let parked = self.parked.lock().await.remove(id);
        let went_parked = parked.is_some();
        let start_res = match parked {
            Some(p) => {
                let go = p.signal(ferry_criu::runtime::GO);
                lap("overrides");
                match go {
                    Ok(()) => match tokio::time::timeout(timeout, p.task).await {
                        Ok(Ok(r)) => Ok(r.map_err(|e| e.to_string())),
                        Ok(Err(e)) => Ok(Err(e.to_string())),
                        Err(_) => Err(()),
                    },
                    Err(e) => {
                        p.abort().await;
                        Ok(Err(e))
                    }
                }
            }
            None => {
                let prewire = renv.prewired.then(|| ferry_criu::runtime::Prewire {
                    park: false,
                    go_fifo: ferry_criu::runtime::go_fifo_path(&self.env.state_dir, &container_id),
                    report: ferry_criu::runtime::arm_report_path(
                        &self.env.state_dir,
                        &container_id,
                    ),
                    park_timeout_s: timeout.as_secs().max(1),
                });
                let cp_name = self.stage(id, timeout, prewire).await?;
                lap("overrides");
                match tokio::time::timeout(
                    timeout,
                    self.env
                        .docker
                        .start_container(&container_id, Some(&cp_name)),
                )
                .await
                {
                    Ok(r) => Ok(r.map_err(|e| e.to_string())),
                    Err(_) => Err(()),
                }
            }
        };
        let docker_start_ms = lap("docker_start");
        let resume_within_start = ferry_criu::prewire::resumed_at(&images).and_then(|at| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_secs_f64()
                * 1000.0;
            let before_end = (now - at).max(0.0) as u64;
            Some(docker_start_ms.saturating_sub(before_end))
        });
        let record: Option<ferry_criu::runtime::RestoreRecord> = std::fs::read(&rpath)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(r) = &record {
            if let Some(m) = self.map.lock().await.get_mut(id) {
                m.ctrd_copy = r.original_image_path.clone();
            }
        }
        let timed_out = start_res.is_err();
        let start_err = match start_res {
            Err(()) => Some(format!(
                "docker start from checkpoint did not finish within {} s",
                timeout.as_secs()
            )),
            Ok(Err(e)) => Some(format!("docker start from checkpoint failed: {e}")),
            Ok(Ok(())) => None,
        };
        if let Some(message) = start_err {
            let mut tool_log = ferry_criu::quote_log(&work.join("restore.log"));
            // The wrapper writes its record once runc returns, so after a timeout its absence
            // says nothing about whether it ran.
            if record.is_none() && !timed_out {
                tool_log.push(format!(
                    "(the {} runtime wrapper was not called: is the container's runtime {}?)",
                    crate::FERRY_RUNTIME,
                    crate::FERRY_RUNTIME
                ));
            }
            return Err(ErrorInfo {
                step: step.into(),
                message,
                tool_log,
            });
        }
        let inspect = self
            .env
            .docker
            .wait_running(&container_id, Duration::from_secs(10))
            .await
            .map_err(|e| ErrorInfo {
                step: step.into(),
                message: format!("restored container is not running: {e}"),
                tool_log: ferry_criu::quote_log(&work.join("restore.log")),
            })?;
        let pid = inspect
            .pointer("/State/Pid")
            .and_then(|p| p.as_u64())
            .unwrap_or(0) as u32;
        lap("wait_running");
        let garp_sent = self.announce(pid, &prepare).await;
        lap("announce");
        if let Some(ms) = resume_within_start {
            // Part of docker_start, not a step of its own: the tasks ran from this point on.
            steps.insert("resumed_within_docker_start".into(), ms);
        }
        if let Some(m) = self.map.lock().await.get_mut(id) {
            m.state = TargetState::Restored;
        }
        info!(container = %prepare.container_name, pid, docker_start_ms, "restored");
        if prepare.strategy.lazy_pages() {
            self.watch_pages(id).await;
        }
        Ok(RestoreInfo {
            container_id,
            pid,
            docker_start_ms,
            garp_sent,
            announced_at_resume: ferry_criu::prewire::announced_at_resume(&images),
            steps_ms: steps,
            parked: went_parked,
        })
    }

    /// Applies both passes of every volume into the target's volume of the same name and checks
    /// the result against the source's digest before anything is restored.
    /// Name and data dir of the migration's `index`th volume in the target container. With
    /// `--overwrite-volumes`, a volume that had content here gets it set aside first (once).
    async fn volume_dest(&self, id: &str, index: usize) -> Result<(String, PathBuf), ErrorInfo> {
        let step = "volumes (target)";
        let (name, container_id, replaceable, cached) = {
            let map = self.map.lock().await;
            let m = map
                .get(id)
                .ok_or_else(|| err(step, format!("no prepared migration {id}")))?;
            let name = m.prepare.volumes.get(index).cloned().ok_or_else(|| {
                err(
                    step,
                    format!("volume stream {index} names no volume of this migration"),
                )
            })?;
            let cid = m
                .container_id
                .clone()
                .ok_or_else(|| err(step, "no target container"))?;
            let replaceable = m.replaceable_volumes.contains(&name);
            (name, cid, replaceable, m.restore_env.mounts.clone())
        };
        let mounts = match cached {
            Some(m) => m,
            None => self
                .env
                .docker
                .inspect_container(&container_id)
                .await
                .map_err(|e| err(step, e))?
                .unwrap_or_default()
                .get("Mounts")
                .cloned()
                .unwrap_or_default(),
        };
        let dest = mounts
            .as_array()
            .and_then(|ms| {
                ms.iter()
                    .find(|m| m.get("Name").and_then(|n| n.as_str()) == Some(name.as_str()))
            })
            .and_then(|m| m.get("Source").and_then(|s| s.as_str()))
            .map(PathBuf::from)
            .ok_or_else(|| err(step, format!("the target container has no volume {name:?}")))?;
        let done = self
            .map
            .lock()
            .await
            .get(id)
            .is_some_and(|m| m.replaced.iter().any(|(d, _)| *d == dest));
        if replaceable && !done {
            let aside = crate::volumes::set_aside(&dest, id).map_err(|e| {
                err(
                    step,
                    format!("volume {name:?}: setting its old content aside: {e}"),
                )
            })?;
            if let Some(m) = self.map.lock().await.get_mut(id) {
                m.replaced.push((dest.clone(), aside));
            }
        }
        Ok((name, dest))
    }

    /// The final pass of each volume (the first was applied as it arrived), then the digest
    /// check against the source's.
    async fn apply_volumes(&self, id: &str, images: &Path) -> Result<(), ErrorInfo> {
        let step = "restore (target): volumes";
        let mut index = 0usize;
        loop {
            let note_path = images.join(crate::volumes::digest_name(index));
            if !note_path.exists() {
                return Ok(());
            }
            let note: serde_json::Value = std::fs::read(&note_path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| err(step, format!("unreadable {}", note_path.display())))?;
            let name = note
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_string();
            let want = note
                .get("digest")
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_string();
            let (_, dest) = self.volume_dest(id, index).await?;
            let streams: Vec<PathBuf> = (0..2u8)
                .map(|p| images.join(crate::volumes::stream_name(index, p)))
                .filter(|p| p.exists())
                .collect();
            let before = self
                .map
                .lock()
                .await
                .get_mut(id)
                .and_then(|m| m.first_pass_manifests.remove(&index));
            let (dest2, streams2, want2) = (dest.clone(), streams.clone(), want.clone());
            tokio::task::spawn_blocking(move || {
                crate::volumes::apply_passes(&streams2, &dest2, &want2, before.as_ref())
            })
            .await
            .map_err(|e| err(step, e))?
            .map_err(|e| err(step, format!("volume {name:?}: {e}")))?;
            for p in streams.iter().chain(std::iter::once(&note_path)) {
                let _ = std::fs::remove_file(p);
            }
            info!(volume = %name, "volume arrived and verified");
            index += 1;
        }
    }

    /// Writes the source's writable layer into the new container's own upper dir before CRIU
    /// restores: files the processes hold open must be where they were.
    /// `upper`: the layer's directory when it was learnt before a parked start (Docker then
    /// answers no inspect of the container until the start ends).
    async fn apply_layer(
        &self,
        container_id: &str,
        upper: Option<PathBuf>,
        stream: &Path,
        dir: &Path,
    ) -> Result<(), ErrorInfo> {
        let step = "restore (target): writable layer";
        let upper = match upper {
            Some(u) => u,
            None => {
                let inspect = self
                    .env
                    .docker
                    .inspect_container(container_id)
                    .await
                    .map_err(|e| err(step, e))?
                    .ok_or_else(|| err(step, "target container vanished"))?;
                upper_dir_of(&inspect).ok_or_else(|| {
                    err(
                        step,
                        "the target's storage driver is not overlay2: cannot place the writable layer",
                    )
                })?
            }
        };
        let kept = dir.join(crate::source::ROOTFS_STREAM);
        std::fs::rename(stream, &kept)
            .map_err(|e| err(step, format!("{}: {e}", stream.display())))?;
        tokio::task::spawn_blocking(move || -> Result<u64, String> {
            let f = std::fs::File::open(&kept).map_err(|e| format!("{}: {e}", kept.display()))?;
            let r = ferry_fs::StreamReader::new(std::io::BufReader::with_capacity(1 << 20, f))
                .map_err(|e| e.to_string())?;
            let summary = r
                .apply_into(
                    &upper,
                    &ferry_fs::ApplyOptions::update(ferry_fs::TreeMode::OverlayUpper),
                )
                .map_err(|e| e.to_string())?;
            let _ = std::fs::remove_file(&kept);
            Ok(summary.counts.data_bytes)
        })
        .await
        .map_err(|e| err(step, e))?
        .map_err(|e| err(step, e))?;
        Ok(())
    }

    /// Gratuitous ARP for every moved address, so switches and neighbours learn the new port at
    /// once instead of after their MAC tables age out.
    async fn announce(&self, pid: u32, prepare: &PrepareRequest) -> Vec<String> {
        let mut sent = Vec::new();
        let ifaces = match ferry_net::interfaces(pid).await {
            Ok(i) => i,
            Err(e) => {
                warn!("cannot list the restored container's interfaces: {e}");
                return sent;
            }
        };
        for n in &prepare.networks {
            let (Some(ip), Some(mac)) = (
                n.ipv4.as_deref().and_then(|i| i.parse::<Ipv4Addr>().ok()),
                n.mac.as_deref().and_then(parse_mac),
            ) else {
                continue;
            };
            let Some(iface) = ifaces.iter().find(|i| i.ipv4.contains(&ip)) else {
                continue;
            };
            match ferry_net::gratuitous_arp(pid, &iface.name, ip, mac, 3).await {
                Ok(()) => sent.push(format!("{}:{ip}", iface.name)),
                Err(e) => warn!("gratuitous ARP for {ip} on {}: {e}", iface.name),
            }
        }
        sent
    }

    fn cleanup_files(&self, m: &TargetMigration) -> Vec<String> {
        let mut problems = crate::logs::keep(
            &self.env.state_dir,
            &m.prepare.migration_id,
            "target",
            &m.dir.join("work"),
        );
        let mut rm = |p: &Path| {
            let r = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
            if let Err(e) = r {
                if e.kind() != std::io::ErrorKind::NotFound {
                    problems.push(format!("{}: {e}", p.display()));
                }
            }
        };
        rm(&m.dir);
        if let Some(cp) = &m.checkpoint_dir {
            rm(cp);
        }
        if let Some(c) = &m.ctrd_copy {
            // Only ever containerd's own temp copy, never a path the peer could choose.
            if Path::new(c).starts_with(std::env::temp_dir()) && c.contains("ctrd-checkpoint") {
                rm(Path::new(c));
            }
        }
        if let Some(cid) = &m.container_id {
            rm(&ferry_criu::runtime::overrides_path(
                &self.env.state_dir,
                cid,
            ));
            rm(&ferry_criu::runtime::record_path(&self.env.state_dir, cid));
            rm(&ferry_criu::runtime::criu_config_path(
                &self.env.state_dir,
                cid,
            ));
            rm(&ferry_criu::runtime::go_fifo_path(&self.env.state_dir, cid));
            rm(&ferry_criu::runtime::arm_report_path(
                &self.env.state_dir,
                cid,
            ));
        }
        problems
    }

    /// Hands a resumed post-copy's lazy-pages daemon to a watchdog task that waits for every
    /// page and, if they do not all arrive, stops the container and logs what was lost.
    async fn watch_pages(&self, id: &str) {
        let Some(fetch) = self.lazy.lock().await.remove(id) else {
            return;
        };
        let (tx, rx) = tokio::sync::watch::channel(None);
        let this = self.clone();
        let mid = id.to_string();
        let task = tokio::spawn(async move {
            let outcome = this.fetch_pages(&mid, fetch).await;
            match &outcome {
                Ok(()) => info!(migration = %mid, "every page arrived"),
                Err(e) => warn!(migration = %mid, "{}: {}", e.step, e.message),
            }
            let _ = tx.send(Some(outcome));
        });
        self.pages.lock().await.insert(
            id.to_string(),
            PagesWatch {
                outcome: rx,
                task: task.abort_handle(),
            },
        );
    }

    /// Waits until the lazy-pages daemon has every page. If it never will, the restored
    /// container is stopped rather than left spinning on the faults no page will answer.
    async fn fetch_pages(&self, id: &str, fetch: LazyFetch) -> Result<(), ErrorInfo> {
        let LazyFetch {
            mut daemon,
            tunnel_closed,
            arrival,
        } = fetch;
        // Post-copy: the container runs already; the migration is done when every page is
        // here. A daemon still running well after its page channel closed never will be.
        let outcome = tokio::select! {
            r = daemon.wait_done(Duration::from_secs(3600)) => r,
            _ = async { tunnel_closed.notified().await; tokio::time::sleep(PAGE_CHANNEL_GRACE).await } => {
                Err(ferry_criu::ToolError::Other {
                    step: "fetch pages".into(),
                    message: "the page channel to the source closed before every page arrived".into(),
                    log: daemon.log(),
                })
            }
        };
        if let Err(e) = outcome {
            daemon.kill().await;
            let cid = {
                let mut map = self.map.lock().await;
                map.get_mut(id).and_then(|m| {
                    m.state = TargetState::PagesLost;
                    m.container_id.clone()
                })
            };
            let mut message = format!(
                "post-copy failed after the target resumed: not every page arrived ({e}); the source's memory pages that had not been fetched are lost"
            );
            if let Some(a) = &arrival {
                message.push_str(&format!(" ({})", a.describe()));
            }
            if let Some(cid) = cid {
                // A restored process missing pages would spin on its faults: stop it.
                let killed = self.env.docker.kill(&cid, "KILL").await;
                let running = match self.env.docker.inspect_container(&cid).await {
                    Ok(Some(c)) => c
                        .pointer("/State/Running")
                        .and_then(|r| r.as_bool())
                        .unwrap_or(false),
                    _ => false,
                };
                match (killed, running) {
                    (_, false) => message.push_str("; the target container was stopped"),
                    (Err(k), true) => {
                        message.push_str(&format!("; stopping the target container failed: {k}"))
                    }
                    (Ok(()), true) => message
                        .push_str("; the target container was killed but still shows as running"),
                }
            }
            return Err(ErrorInfo {
                step: "commit (target): fetch pages".into(),
                message,
                tool_log: daemon.log(),
            });
        }
        Ok(())
    }

    pub async fn commit(&self, id: &str) -> Result<(), ErrorInfo> {
        let outcome = self.pages.lock().await.get(id).map(|w| w.outcome.clone());
        if let Some(mut rx) = outcome {
            // Post-copy: the container runs already; the migration is done when every page is
            // here.
            let outcome = match rx.wait_for(|o| o.is_some()).await {
                Ok(o) => o.clone(),
                Err(_) => None,
            };
            match outcome {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(err(
                        "commit (target): fetch pages",
                        "the page watchdog ended without an outcome",
                    ))
                }
            }
        }
        let mut map = self.map.lock().await;
        let m = map
            .get_mut(id)
            .ok_or_else(|| err("commit (target)", format!("no migration {id}")))?;
        if m.state != TargetState::Restored {
            return Err(err(
                "commit (target)",
                format!("migration {id} is {:?}, not restored", m.state),
            ));
        }
        m.state = TargetState::Committed;
        drop(map);
        self.pages.lock().await.remove(id);
        let mut map = self.map.lock().await;
        let Some(m) = map.get_mut(id) else {
            return Ok(());
        };
        let mut problems = self.cleanup_files(m);
        for (_, aside) in std::mem::take(&mut m.replaced) {
            if let Err(e) = std::fs::remove_dir_all(&aside) {
                problems.push(format!(
                    "removing replaced volume content {}: {e}",
                    aside.display()
                ));
            }
        }
        for p in problems {
            warn!("cleanup after commit: {p}");
        }
        Ok(())
    }

    /// Removes the half-made container and every file of the attempt. Idempotent. The
    /// registry lock is never held across a Docker call: one wedged call must not stall every
    /// other migration on this host.
    pub async fn rollback(&self, id: &str) -> Result<String, ErrorInfo> {
        let (container_id, name, snapshot) = {
            let map = self.map.lock().await;
            let Some(m) = map.get(id) else {
                return Ok("nothing of this migration exists here".into());
            };
            match m.state {
                TargetState::Committed => {
                    return Err(err(
                        "rollback (target)",
                        format!("migration {id} is already committed"),
                    ))
                }
                TargetState::RolledBack => return Ok("already rolled back".into()),
                _ => {}
            }
            (
                m.container_id.clone(),
                m.prepare.container_name.clone(),
                TargetMigration {
                    state: m.state,
                    prepare: m.prepare.clone(),
                    container_id: m.container_id.clone(),
                    dir: m.dir.clone(),
                    checkpoint_dir: m.checkpoint_dir.clone(),
                    ctrd_copy: m.ctrd_copy.clone(),
                    images_complete: m.images_complete,
                    memory_rounds: m.memory_rounds,
                    created_volumes: m.created_volumes.clone(),
                    replaceable_volumes: m.replaceable_volumes.clone(),
                    replaced: m.replaced.clone(),
                    first_pass_manifests: HashMap::new(),
                    restore_env: m.restore_env.clone(),
                },
            )
        };
        let mut problems = Vec::new();
        if let Some(p) = self.parked.lock().await.remove(id) {
            p.abort().await;
        }
        if let Some(LazyFetch { mut daemon, .. }) = self.lazy.lock().await.remove(id) {
            daemon.kill().await;
        }
        if let Some(w) = self.pages.lock().await.remove(id) {
            // Dropping the watchdog's daemon kills it (kill_on_drop).
            w.task.abort();
        }
        if let Some(cid) = &container_id {
            if let Err(e) = self.env.docker.remove_container(cid, true).await {
                problems.push(format!("removing container {cid}: {e}"));
            }
        } else if let Ok(Some(c)) = self.env.docker.inspect_container(&name).await {
            // A create whose answer never came back: remove it only if it is ours (ferry runtime).
            if c.pointer("/HostConfig/Runtime").and_then(|r| r.as_str())
                == Some(crate::FERRY_RUNTIME)
                && c.pointer("/State/Status").and_then(|s| s.as_str()) == Some("created")
            {
                if let Some(cid) = c.get("Id").and_then(|i| i.as_str()) {
                    if let Err(e) = self.env.docker.remove_container(cid, true).await {
                        problems.push(format!("removing container {cid}: {e}"));
                    }
                }
            }
        }
        for v in &snapshot.created_volumes {
            if let Err(e) = self.env.docker.remove_volume(v).await {
                problems.push(format!("removing volume {v}: {e}"));
            }
        }
        let replaced = self
            .map
            .lock()
            .await
            .get_mut(id)
            .map(|m| std::mem::take(&mut m.replaced))
            .unwrap_or_default();
        for (data, aside) in &replaced {
            if let Err(e) = crate::volumes::put_back(data, aside) {
                problems.push(format!(
                    "putting back the old content of {} (kept in {}): {e}",
                    data.display(),
                    aside.display()
                ));
            }
        }
        let latest = self
            .map
            .lock()
            .await
            .get(id)
            .and_then(|m| m.ctrd_copy.clone());
        let snapshot = TargetMigration {
            ctrd_copy: latest.or(snapshot.ctrd_copy.clone()),
            ..snapshot
        };
        problems.extend(self.cleanup_files(&snapshot));
        if problems.is_empty() {
            if let Some(m) = self.map.lock().await.get_mut(id) {
                m.state = TargetState::RolledBack;
            }
            Ok("target container and received images removed".into())
        } else {
            Err(err("rollback (target)", problems.join("; ")))
        }
    }

    /// The source's control channel ended before `Commit`. Normally the source resumes
    /// whenever it cannot reach us, so nothing may keep running here: roll back. A post-copy
    /// restore is the exception: the source's memory now only exists as pages in flight, so
    /// the target finishes on its own — it keeps the container if every page arrives and stops
    /// it (reporting what was lost) if not.
    async fn session_lost(&self, id: &str, why: &str) {
        let (state, strategy) = {
            let map = self.map.lock().await;
            match map.get(id) {
                Some(m) => (m.state, m.prepare.strategy),
                None => return,
            }
        };
        if matches!(
            state,
            TargetState::Committed
                | TargetState::RolledBack
                | TargetState::Unknown
                | TargetState::PagesLost
        ) {
            return;
        }
        if state == TargetState::Restored && strategy.lazy_pages() {
            warn!(migration = %id, "control channel lost ({why}) after a post-copy restore: waiting for the remaining pages");
            match self.commit(id).await {
                Ok(()) => {
                    info!(migration = %id, "every page arrived without the source agent: the container stays here")
                }
                Err(e) => warn!(migration = %id, "{e}"),
            }
            return;
        }
        warn!(migration = %id, "control channel lost ({why}) before commit: rolling back");
        if let Err(e) = self.rollback(id).await {
            warn!(migration = %id, "rollback after a lost channel failed: {e}");
        }
    }

    /// Serves one control channel. A channel that ends before `Commit` rolls the migration back:
    /// the source resumes whenever it cannot reach us, so nothing may keep running here.
    pub async fn serve_control<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut conn: Conn<S>,
        id: String,
        idle: Duration,
        step_timeout: Duration,
    ) {
        loop {
            let msg = match conn.recv(idle).await {
                Ok(m) => m,
                Err(e) => {
                    self.session_lost(&id, &e.to_string()).await;
                    return;
                }
            };
            let reply = match msg {
                Message::Check { cpuinfo } => Message::CheckReply(
                    self.env
                        .facts(cpuinfo.as_deref(), crate::host::Probe::Recent)
                        .await,
                ),
                Message::Prepare(req) if req.migration_id == id => match self.prepare(req).await {
                    Ok(p) => Message::Prepared {
                        container_id: p.container_id,
                        prewired_netns: p.prewired_netns,
                        nft_lock: p.nft_lock,
                    },
                    Err(e) => Message::Error(e),
                },
                Message::Restore => match self.restore(&id, step_timeout).await {
                    Ok(info) => Message::Restored(info),
                    Err(e) => Message::Error(e),
                },
                Message::Commit => match self.commit(&id).await {
                    Ok(()) => Message::Committed,
                    Err(e) => Message::Error(e),
                },
                Message::Abort => match self.rollback(&id).await {
                    Ok(detail) => Message::Aborted { detail },
                    Err(e) => Message::Error(e),
                },
                Message::Status { migration_id } => Message::StatusReply {
                    state: self.state(&migration_id).await,
                },
                other => Message::Error(err("control", format!("unexpected {}", describe(&other)))),
            };
            if conn.send(&reply).await.is_err() {
                self.session_lost(&id, "the answer could not be sent").await;
                return;
            }
        }
    }
}

/// Damages the checkpoint so CRIU's restore fails for real, early and deterministically (fault
/// injection for tests): the process tree image is cut short.
fn damage_pages(images: &Path) -> std::io::Result<()> {
    let path = images.join("pstree.img");
    let f = std::fs::OpenOptions::new().write(true).open(&path)?;
    f.set_len(6)
}

type ClientTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Opens an authenticated connection to an agent and announces its purpose.
pub async fn dial(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    purpose: Purpose,
    timeout: Duration,
) -> Result<Conn<ClientTls>, ConnError> {
    Ok(dial_features(addr, tls, purpose, timeout).await?.0)
}

/// [`dial`], also returning the optional wire features the agent listed in its `HelloOk`.
pub async fn dial_features(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    purpose: Purpose,
    timeout: Duration,
) -> Result<(Conn<ClientTls>, Vec<String>), ConnError> {
    let stream = ferry_tls::connect(addr, tls, timeout)
        .await
        .map_err(|e| ConnError::Unexpected(format!("connecting to agent {addr}: {e}")))?;
    let mut conn = Conn::new(stream);
    match conn.call(&Message::Hello { protocol: PROTOCOL_VERSION, purpose }, timeout).await {
        Ok(Message::HelloOk { features, .. }) => Ok((conn, features)),
        Ok(other) => Err(ConnError::Unexpected(describe(&other))),
        Err(ConnError::Closed) => Err(ConnError::Unexpected(format!("agent {addr} closed the connection during the greeting (is this client's certificate signed by the agent's CA?)"))),
        Err(e) => Err(e),
    }
}

/// The target as the source agent sees it: one control channel, reopened only to learn the
/// outcome or to abort after it broke.
pub struct RemoteTarget {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    migration_id: String,
    conn: Option<Conn<ClientTls>>,
    step_timeout: Duration,
    transfer: ferry_proto::TransferSettings,
}

impl RemoteTarget {
    pub fn new(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        migration_id: String,
        step_timeout: Duration,
    ) -> Self {
        RemoteTarget {
            addr,
            tls,
            migration_id,
            conn: None,
            step_timeout,
            transfer: Default::default(),
        }
    }

    /// The migration's compression and bandwidth limit, handed to the target in `Prepare`.
    pub fn with_transfer(mut self, transfer: ferry_proto::TransferSettings) -> Self {
        self.transfer = transfer;
        self
    }

    async fn call(
        &mut self,
        step: &str,
        m: Message,
        timeout: Duration,
    ) -> Result<Message, SideError> {
        if self.conn.is_none() {
            let purpose = Purpose::Control {
                migration_id: self.migration_id.clone(),
            };
            let conn = dial(self.addr, self.tls.clone(), purpose, self.step_timeout)
                .await
                .map_err(|e| match e {
                    ConnError::Unexpected(m) => {
                        SideError::new(SideErrorKind::ConnectionLost, step, m)
                    }
                    other => other.into_side(step),
                })?;
            self.conn = Some(conn);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(SideError::new(
                SideErrorKind::ConnectionLost,
                step,
                "no connection",
            ));
        };
        match conn.call(&m, timeout).await {
            Ok(reply) => Ok(reply),
            Err(e) => {
                if !matches!(e, ConnError::Remote(_)) {
                    self.conn = None;
                }
                Err(e.into_side(step))
            }
        }
    }
}

fn unexpected(step: &str, m: &Message) -> SideError {
    SideError::failed(step, format!("unexpected answer {}", describe(m)))
}

impl TargetSide for RemoteTarget {
    async fn preflight(&mut self, cpuinfo: Option<Vec<u8>>) -> Result<HostFacts, SideError> {
        let step = "preflight (target)";
        match self
            .call(step, Message::Check { cpuinfo }, self.step_timeout)
            .await
        {
            Ok(Message::CheckReply(f)) => Ok(f),
            Ok(other) => Err(unexpected(step, &other)),
            Err(mut e) => {
                if e.kind == SideErrorKind::ConnectionLost {
                    e.kind = SideErrorKind::Refused;
                    e.message = format!("target agent {} unreachable: {}", self.addr, e.message);
                }
                Err(e)
            }
        }
    }
    async fn prepare(&mut self, req: &PrepareRequest) -> Result<PreparedTarget, SideError> {
        let req = PrepareRequest {
            transfer: self.transfer,
            ..req.clone()
        };
        match self
            .call("prepare", Message::Prepare(req), self.step_timeout)
            .await?
        {
            Message::Prepared {
                container_id,
                prewired_netns,
                nft_lock,
            } => Ok(PreparedTarget {
                container_id,
                prewired_netns,
                nft_lock,
            }),
            other => Err(unexpected("prepare", &other)),
        }
    }
    async fn restore(&mut self) -> Result<RestoreInfo, SideError> {
        match self
            .call("restore", Message::Restore, self.step_timeout)
            .await?
        {
            Message::Restored(info) => Ok(info),
            other => Err(unexpected("restore", &other)),
        }
    }
    async fn commit(&mut self) -> Result<(), SideError> {
        match self
            .call("commit", Message::Commit, self.step_timeout)
            .await?
        {
            Message::Committed => Ok(()),
            other => Err(unexpected("commit", &other)),
        }
    }
    async fn rollback(&mut self) -> Result<(), SideError> {
        match self
            .call("rollback (target)", Message::Abort, self.step_timeout)
            .await?
        {
            Message::Aborted { .. } => Ok(()),
            other => Err(unexpected("rollback (target)", &other)),
        }
    }
    async fn status(&mut self) -> Result<TargetState, SideError> {
        self.conn = None;
        let m = Message::Status {
            migration_id: self.migration_id.clone(),
        };
        match self.call("status (target)", m, self.step_timeout).await? {
            Message::StatusReply { state } => Ok(state),
            other => Err(unexpected("status (target)", &other)),
        }
    }
}

/// Streams image sets to the target on a channel of their own, so the control channel stays
/// responsive and later strategies can run several streams at once.
pub struct ImagesChannel {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    migration_id: String,
    timeout: Duration,
    transfer: ferry_proto::TransferSettings,
    pacer: ferry_transfer::Pacer,
    stats: Arc<ferry_transfer::TransferStats>,
    /// A connection opened before the pause (`warm_up`), taken by the next `send_images`.
    warm: Option<(Conn<ClientTls>, Vec<String>)>,
}

impl ImagesChannel {
    pub fn new(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        migration_id: String,
        timeout: Duration,
    ) -> Self {
        ImagesChannel {
            addr,
            tls,
            migration_id,
            timeout,
            transfer: Default::default(),
            pacer: Default::default(),
            stats: Default::default(),
            warm: None,
        }
    }

    /// Compresses under `transfer.compression` and sends through `pacer` (shared with the
    /// migration's page tunnel), counting into `stats`.
    pub fn with_transfer(
        mut self,
        transfer: ferry_proto::TransferSettings,
        pacer: ferry_transfer::Pacer,
        stats: Arc<ferry_transfer::TransferStats>,
    ) -> Self {
        self.transfer = transfer;
        self.pacer = pacer;
        self.stats = stats;
        self
    }
}

impl ImagesChannel {
    async fn dial_images(&self) -> Result<(Conn<ClientTls>, Vec<String>), ConnError> {
        dial_features(
            self.addr,
            self.tls.clone(),
            Purpose::Images {
                migration_id: self.migration_id.clone(),
            },
            self.timeout,
        )
        .await
    }
}

impl Transport for ImagesChannel {
    async fn warm_up(&mut self) {
        match self.dial_images().await {
            Ok(c) => self.warm = Some(c),
            Err(e) => warn!("opening the images channel ahead of the pause: {e}"),
        }
    }

    async fn send_images(
        &mut self,
        images: &DumpedImages,
        progress: &ProgressFn,
    ) -> Result<u64, SideError> {
        let step = "transfer";
        let lost = |e: ConnError| e.into_side(step);
        let (mut conn, features) = match self.warm.take() {
            Some(c) => c,
            None => self
                .dial_images()
                .await
                .map_err(|e| SideError::new(SideErrorKind::ConnectionLost, step, e.to_string()))?,
        };
        let mut uploader = crate::upload::Uploader::new(
            self.transfer,
            features.iter().any(|f| f == ferry_proto::FEATURE_CHUNKS),
            self.pacer.clone(),
            self.stats.clone(),
        );
        let total = images.total_bytes();
        let mut done = 0u64;
        let mut wire = 0u64;
        for f in &images.files {
            conn.send(&Message::FileStart {
                path: f.rel.clone(),
                size: f.size,
                mode: f.mode,
            })
            .await
            .map_err(lost)?;
            let sent = uploader
                .send_file(&mut conn, &f.path, |n| {
                    done += n;
                    progress(done, total);
                })
                .await
                .map_err(|e| e.into_side(step))?;
            wire += sent.wire;
            if sent.bytes != f.size {
                return Err(SideError::failed(
                    step,
                    format!(
                        "{} changed size while being sent ({} → {})",
                        f.path.display(),
                        f.size,
                        sent.bytes
                    ),
                ));
            }
            conn.send(&Message::FileEnd {
                sha256: sent.sha256,
            })
            .await
            .map_err(lost)?;
        }
        let n = images.files.len() as u64;
        match conn
            .call(
                &Message::ImagesDone {
                    files: n,
                    bytes: total,
                },
                self.timeout,
            )
            .await
            .map_err(lost)?
        {
            Message::ImagesReceived { .. } => Ok(wire),
            other => Err(unexpected(step, &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_conflicts_with_a_parked_start_only_where_docker_looked() {
        let dir = tempfile::tempdir().expect("tmp");
        let upper = dir.path().join("upper");
        std::fs::create_dir(&upper).expect("mkdir");
        let stream = dir.path().join("layer.stream");
        crate::volumes::write_with(&stream, |w| {
            w.write_tree(&upper, ferry_fs::TreeMode::OverlayUpper)
        })
        .expect("write");
        let inspect = serde_json::json!({
            "Config": {"WorkingDir": "/data"},
            "Mounts": [{"Destination": "/srv/vol"}],
            "HostConfig": {"Tmpfs": {"/run/t": ""}}
        });
        let looked = looked_up_paths(&inspect);
        assert_eq!(layer_conflicts(&stream, &looked), Ok(false));
        std::fs::create_dir_all(upper.join("tmp")).expect("tmp");
        std::fs::create_dir_all(upper.join("srvx")).expect("srvx");
        let rewrite = || {
            crate::volumes::write_with(&stream, |w| {
                w.write_tree(&upper, ferry_fs::TreeMode::OverlayUpper)
            })
            .expect("write")
        };
        rewrite();
        assert_eq!(layer_conflicts(&stream, &looked), Ok(false), "/tmp, /srvx");
        for (path, why) in [
            ("etc", "/etc/hosts"),
            ("srv", "/srv/vol"),
            ("data", "workdir"),
            ("run/t", "tmpfs"),
        ] {
            std::fs::create_dir_all(upper.join(path)).expect("dir");
            rewrite();
            assert_eq!(layer_conflicts(&stream, &looked), Ok(true), "{why}");
            std::fs::remove_dir_all(upper.join(path.split('/').next().unwrap_or(path)))
                .expect("rm");
        }
    }

    #[test]
    fn image_names_must_be_plain() {
        for ok in ["pages-1.img", "core-42.img", "inventory.img"] {
            assert!(safe_image_name(ok), "{ok}");
        }
        for bad in ["", "..", ".", "/etc/passwd", "a/b", "../x", "x/..", "a\0b"] {
            assert!(!safe_image_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn round_names_are_numbered_in_range_and_plain_inside() {
        let table: &[(&str, Option<ImageName>)] = &[
            ("pages-1.img", Some(ImageName::Final("pages-1.img"))),
            (
                "pre-1/pages-1.img",
                Some(ImageName::Round(1, "pages-1.img")),
            ),
            (
                "pre-8/pagemap-7.img",
                Some(ImageName::Round(8, "pagemap-7.img")),
            ),
            ("pre-9/pages-1.img", None),
            ("pre-0/pages-1.img", None),
            ("pre-01/pages-1.img", None),
            ("pre-/pages-1.img", None),
            ("pre-1x/pages-1.img", None),
            ("pre-1/../x", None),
            ("pre-1/a/b", None),
            ("pre-1/", None),
            ("pre-1/parent", None),
            ("parent", None),
            ("pre-1", Some(ImageName::Final("pre-1"))),
            ("pre-99999999999/x", None),
            ("x/pre-1/y", None),
        ];
        for (name, want) in table {
            assert_eq!(parse_image_name(name).as_ref(), want.as_ref(), "{name:?}");
        }
    }

    #[test]
    fn rounds_chain_to_each_other_and_the_final_images_to_the_last() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mig = tmp.path();
        std::fs::create_dir_all(mig.join("images")).expect("images");
        for round in 1..=3 {
            let d = make_round_dir(mig, round).expect("round dir");
            std::fs::write(d.join("pages-1.img"), format!("round {round}")).expect("write");
            // A second file of the same round finds the directory and its link in place.
            make_round_dir(mig, round).expect("again");
        }
        link_final_to_round(mig, 3).expect("link");
        link_final_to_round(mig, 3).expect("relinking replaces the link");
        let mut at = mig.join("images");
        for round in (1..=3).rev() {
            at = at.join("parent");
            let text = std::fs::read_to_string(at.join("pages-1.img")).expect("read via chain");
            assert_eq!(text, format!("round {round}"));
        }
        assert!(!at.join("parent").exists(), "round 1 has no parent");
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("02:42:c6:12:00:82"),
            Some([2, 0x42, 0xc6, 0x12, 0, 0x82])
        );
        assert_eq!(parse_mac("02:42:c6:12:00"), None);
        assert_eq!(parse_mac("zz:42:c6:12:00:82"), None);
    }
}
