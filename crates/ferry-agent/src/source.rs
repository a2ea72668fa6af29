//! The source side of a migration on this host.
//!
//! Freezing keeps everything needed to resume. The processes stop first — `docker pause` for
//! stop-and-copy, the freezer cgroup written directly for post-copy (see `crate::freezer`) —
//! and only then the network: our own rules lock the container's network namespace (so the
//! frozen kernel neither ACKs data the target will never see nor leaks a FIN/RST when the
//! source is finally removed) and ARP answers go off for the moving addresses. What clients
//! send in between is queued by the kernel and dumped with the socket. The dump leaves the
//! processes in place (a post-copy dump keeps them seized until every page is served).
//! Rollback is therefore an unlock and a thaw — no restore on the source, nothing lost.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_docker::{ContainerView, Docker};
use ferry_migrate::{
    DumpedImages, ImageFile, SideError, SideErrorKind, SourcePreflight, SourceSide,
};
use ferry_proto::{NetworkAttachment, NetworkReport, PrepareRequest, Strategy};
use std::sync::Arc;
use tracing::{info, warn};

use crate::host::{has_cap_sys_resource, HostEnv};

impl LocalSource {
    /// CRIU's configuration for a dump whose network namespace the target wired ahead.
    /// This dump's own CRIU configuration (runc has no flags for these options), or `None`
    /// when it needs none: the network namespace the target wired ahead is dumped as
    /// external, a lazy dump reads its pages from the frozen tasks where CRIU can, and the
    /// network is locked with nftables where both hosts' CRIU can.
    fn dump_config(&self, pid: u32, lazy: bool) -> Result<Option<PathBuf>, SideError> {
        use std::os::unix::fs::MetadataExt;
        let mut text = String::new();
        if self.external_netns {
            let ns = format!("/proc/{pid}/ns/net");
            let ino = std::fs::metadata(&ns)
                .map_err(|e| side_err("dump", format!("{ns}: {e}")))?
                .ino();
            text.push_str(&ferry_criu::prewire::external_netns_line(ino));
        }
        if lazy && self.criu_lazy_pages_read {
            text.push_str(ferry_criu::LAZY_PAGES_READ_LINE);
        }
        if self.nft_lock {
            text.push_str(ferry_criu::NFT_LOCK_LINE);
        }
        if text.is_empty() {
            return Ok(None);
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| side_err("dump", format!("{}: {e}", self.dir.display())))?;
        let path = self.dir.join("criu-dump.conf");
        std::fs::write(&path, text)
            .map_err(|e| side_err("dump", format!("{}: {e}", path.display())))?;
        Ok(Some(path))
    }
}

pub struct LocalSource {
    env: HostEnv,
    docker: Arc<Docker>,
    container: String,
    migration_id: String,
    fault: Option<ferry_proto::Fault>,
    dump_timeout: Duration,
    view: Option<ContainerView>,
    saved_restart_policy: Option<serde_json::Value>,
    locked: bool,
    arp_off: Vec<String>,
    paused: bool,
    dir: PathBuf,
    strategy: Strategy,
    lazy: Option<ferry_criu::LazyDump>,
    pages: PageServers,
    page_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    page_tunnel_closed: std::sync::Arc<tokio::sync::Notify>,
    page_reads: std::sync::Arc<ReadsLane>,
    source_agent: Option<String>,
    /// The container's overlay2 upper dir: the files it wrote, carried to the target's layer.
    upper_dir: Option<PathBuf>,
    volumes: Vec<crate::volumes::VolumeRef>,
    overwrite_volumes: bool,
    /// `--shared` declarations: mounts they cover are neither carried nor refused.
    shared: Vec<String>,
    /// Post-copy: the container's cgroup was frozen by us (rollback thaws it).
    frozen: bool,
    /// Post-copy: our network lock and ARP switch-off, done while the images cross (CRIU's own
    /// lock already holds then); joined before the target restores (`settle`).
    late_lock: Option<tokio::task::JoinHandle<LateLock>>,
    /// Post-copy: interfaces whose ARP answers go off once the dump is taken.
    pending_arp_off: Vec<String>,
    /// Where the pause went on this side, for the report.
    steps_ms: std::collections::BTreeMap<String, u64>,
    /// The target wired the container's network namespace ahead: dump it as external.
    external_netns: bool,
    /// This host's CRIU can leave a lazy dump's pages in the frozen tasks (learnt in the
    /// preflight, as `criu check` takes longer than the pause should).
    criu_lazy_pages_read: bool,
    /// This host's CRIU can lock the network with nftables (learnt in the preflight).
    criu_nft_lock: bool,
    /// The dump locks the network with nftables: this host's CRIU and the target's can.
    nft_lock: bool,
    /// The lazy dump was taken with `--lazy-pages-read`.
    lazy_pages_read: bool,
    /// Pre-copy: the pre-dump rounds taken so far, and whether the stop rules ended them.
    rounds: Vec<ferry_criu::RoundStats>,
    rounds_done: bool,
    /// CRIU's statistics of the final dump, once written.
    dump_stats: Option<ferry_proto::CriuDumpStats>,
}

/// Where pre-dump round `n` goes among the images the target receives; the target keeps each
/// round in a directory of its own and links them the way CRIU's `parent` chain expects.
pub fn round_file_name(round: u32, file: &str) -> String {
    format!("pre-{round}/{file}")
}

/// What the post-copy lock task managed before it ended.
#[derive(Debug, Default)]
struct LateLock {
    locked: bool,
    arp_off: Vec<String>,
    error: Option<String>,
}

/// Name of the writable-layer stream among the images sent to the target.
pub const ROOTFS_STREAM: &str = "ferry-rootfs.stream";

/// Writes the container's writable layer as a `ferry-fs` stream into the image directory.
fn write_layer(upper: &std::path::Path, out: &std::path::Path) -> Result<u64, String> {
    let summary = crate::volumes::write_with(out, |w| {
        w.write_tree(upper, ferry_fs::TreeMode::OverlayUpper)
    })?;
    Ok(summary.counts.data_bytes)
}

/// Loopback ports of the CRIU page servers of post-copy dumps in flight, by migration id, so
/// the agent can tunnel the target's authenticated `Pages` channel to the right one.
pub type PageServers =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, PageServer>>>;

/// One post-copy page server: its loopback port and the bytes tunnelled to the target so far.
#[derive(Clone, Default)]
pub struct PageServer {
    pub port: u16,
    pub bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Signalled when the tunnel closed and `bytes` is final.
    pub closed: std::sync::Arc<tokio::sync::Notify>,
    /// Set once a page reader lane is open; its `closed` is signalled when it has ended and
    /// added its bytes to `bytes`.
    pub reads: std::sync::Arc<ReadsLane>,
    /// The dump's images, whose pagemaps say which pages the page reader may serve.
    pub images: PathBuf,
    /// The container's first process: its cgroup holds the seized tasks.
    pub pid: u32,
}

#[derive(Debug, Default)]
pub struct ReadsLane {
    pub opened: std::sync::atomic::AtomicBool,
    /// Page bytes the reader served.
    pub served: std::sync::atomic::AtomicU64,
    pub closed: tokio::sync::Notify,
}

fn free_loopback_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// CRIU's `stats-dump` in the report's terms.
fn report_stats(st: &ferry_criu::DumpStats) -> ferry_proto::CriuDumpStats {
    ferry_proto::CriuDumpStats {
        freezing_us: u64::from(st.freezing_time_us),
        frozen_us: u64::from(st.frozen_time_us),
        memdump_us: u64::from(st.memdump_time_us),
        memwrite_us: u64::from(st.memwrite_time_us),
        pages_scanned: st.pages_scanned,
        pages_written: st.pages_written,
        pages_lazy: st.pages_lazy,
        pages_in_parent: st.pages_skipped_parent,
    }
}

/// Thaws the container's freezer cgroup: a post-copy dump killed half-way leaves the tasks frozen
/// by CRIU or by us, not by Docker, so `docker unpause` would not know to.
fn thaw(pid: u32) -> Result<bool, String> {
    crate::freezer::Freezer::of(pid)
        .and_then(|f| f.thaw())
        .map_err(|e| e.to_string())
}

/// Sub-directory of a migration's directory that holds the pre-dump rounds (`pre/1`, …).
const PRE_DIR: &str = "pre";

/// How long the kernel may take to freeze every task of the container.
const FREEZE_LIMIT: Duration = Duration::from_secs(5);

fn side_err(step: &str, e: impl std::fmt::Display) -> SideError {
    SideError::failed(step, e.to_string())
}

impl LocalSource {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        env: HostEnv,
        container: String,
        migration_id: String,
        fault: Option<ferry_proto::Fault>,
        dump_timeout: Duration,
        pages: PageServers,
        source_agent: Option<String>,
    ) -> Self {
        let dir = env.state_dir.join("migrations").join(&migration_id);
        LocalSource {
            docker: env.docker.clone(),
            env,
            container,
            migration_id,
            fault,
            dump_timeout,
            view: None,
            saved_restart_policy: None,
            locked: false,
            arp_off: Vec::new(),
            paused: false,
            dir,
            strategy: Strategy::StopAndCopy,
            lazy: None,
            pages,
            page_bytes: Default::default(),
            page_tunnel_closed: Default::default(),
            page_reads: Default::default(),
            upper_dir: None,
            volumes: Vec::new(),
            source_agent,
            overwrite_volumes: false,
            shared: Vec::new(),
            frozen: false,
            late_lock: None,
            pending_arp_off: Vec::new(),
            steps_ms: Default::default(),
            external_netns: false,
            criu_lazy_pages_read: false,
            criu_nft_lock: false,
            nft_lock: false,
            lazy_pages_read: false,
            rounds: Vec::new(),
            rounds_done: false,
            dump_stats: None,
        }
    }

    /// The operator's choices about data ferry does not carry or that exists on the target.
    pub fn with_data_options(mut self, overwrite_volumes: bool, shared: Vec<String>) -> Self {
        self.overwrite_volumes = overwrite_volumes;
        self.shared = shared;
        self
    }

    /// Waits for the post-copy lock and ARP switch-off begun after the dump, recording what
    /// holds so a rollback undoes exactly that.
    /// Stops the post-copy CRIU without letting the dumped tasks run in TCP repair mode. CRIU
    /// thaws a cgroup it found frozen once it holds the tasks by ptrace; killed, it lets them
    /// run with their sockets still in repair mode, where a read fails and the application
    /// drops the connection (a queued request makes that immediate), and a socket answers the
    /// clients' next segments with resets. Frozen again first, they only run once repair mode
    /// is off.
    async fn stop_criu_frozen(&mut self, pid: u32, step: &str) -> Vec<SideError> {
        let mut errs = Vec::new();
        let refrozen = tokio::task::spawn_blocking(move || {
            crate::freezer::Freezer::of(pid).and_then(|f| f.freeze(FREEZE_LIMIT))
        })
        .await;
        let freeze_step = format!("{step}: freeze before stopping CRIU");
        match refrozen {
            Ok(Ok(_)) => self.frozen = true,
            Ok(Err(e)) => errs.push(side_err(&freeze_step, e)),
            Err(e) => errs.push(side_err(&freeze_step, e)),
        }
        if let Some(mut lazy) = self.lazy.take() {
            lazy.abort().await;
        }
        match ferry_net::repair_off(pid) {
            Ok(n) => info!(sockets = n, "TCP repair mode turned off after CRIU stopped"),
            Err(e) => errs.push(side_err(&format!("{step}: TCP repair off"), e)),
        }
        errs
    }

    /// Ends an attempt that did not commit: CRIU's logs are kept for the operator, the image
    /// directory goes. Returns the failure, if removing it failed.
    fn drop_attempt(&self, step: &str) -> Option<SideError> {
        for p in crate::logs::keep(
            &self.env.state_dir,
            &self.migration_id,
            "source",
            &self.dir.join("work"),
        ) {
            warn!("keeping CRIU's logs: {p}");
        }
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Some(side_err(
                &format!("{step}: remove images"),
                format!("{}: {e}", self.dir.display()),
            )),
            _ => None,
        }
    }

    /// Reads CRIU's statistics of a plain final dump; a report without them is still a report,
    /// so a failure is only logged. A lazy dump's are not worth reading: the page server CRIU
    /// starts for the lazy pages resets the dump's counters (`init_stats` in
    /// `cr_page_server`), and the file written when it ends holds only a frozen time that
    /// spans the whole page transfer.
    fn read_dump_stats(&mut self) {
        match ferry_criu::read_stats_dump(&self.dir.join("work")) {
            Ok(st) => self.dump_stats = Some(report_stats(&st)),
            Err(e) => warn!("final dump statistics: {e}"),
        }
    }

    async fn join_late_lock(&mut self) -> Result<(), String> {
        let Some(h) = self.late_lock.take() else {
            return Ok(());
        };
        let done = h
            .await
            .map_err(|e| format!("the lock task ended abnormally: {e}"))?;
        self.locked |= done.locked;
        self.arp_off.extend(done.arp_off);
        done.error.map_or(Ok(()), Err)
    }

    fn view(&self) -> Result<&ContainerView, SideError> {
        self.view
            .as_ref()
            .ok_or_else(|| SideError::failed("source", "preflight did not run"))
    }
}

/// Owner uid of the user namespace `/proc/<pid>/ns/user` (ioctl NS_GET_OWNER_UID).
fn userns_owner(pid: u32) -> Option<u32> {
    use std::os::fd::AsRawFd;
    const NS_GET_OWNER_UID: libc::c_ulong = 0xb704;
    let f = std::fs::File::open(format!("/proc/{pid}/ns/user")).ok()?;
    let mut uid: libc::uid_t = 0;
    // SAFETY: NS_GET_OWNER_UID writes one uid_t into the pointer; the fd is open for the call.
    let rc = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            NS_GET_OWNER_UID,
            &mut uid as *mut libc::uid_t,
        )
    };
    (rc == 0).then_some(uid)
}

/// Uids of the container's processes that CRIU cannot dump from here, so preflight can name
/// the cause CRIU would otherwise report deep inside a dump ("Can't get rlimit"). Processes in
/// a user namespace owned by root (Docker's userns-remap) are fine: root has every capability
/// there.
fn foreign_uid_processes(init_pid: u32) -> Vec<(u32, u32, String)> {
    let Ok(ns) = std::fs::read_link(format!("/proc/{init_pid}/ns/pid")) else {
        return vec![];
    };
    let own_userns = std::fs::read_link("/proc/self/ns/user").ok();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/ns/pid"))
            .ok()
            .as_ref()
            != Some(&ns)
        {
            continue;
        }
        if std::fs::read_link(format!("/proc/{pid}/ns/user")).ok() != own_userns
            && userns_owner(pid) == Some(nix::unistd::geteuid().as_raw())
        {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or("")
            .trim()
            .to_string();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0);
        if uid != 0 {
            out.push((pid, uid, name));
        }
    }
    out
}

/// Announces the IPv4 addresses of `ifaces` of the container `pid` from its own namespace.
async fn announce_again(pid: u32, ifaces: &[String]) -> Vec<SideError> {
    let step = "rollback: announce the addresses again";
    let listed = match ferry_net::interfaces(pid).await {
        Ok(l) => l,
        Err(e) => return vec![side_err(step, e)],
    };
    let mut errs = Vec::new();
    for i in listed.iter().filter(|i| ifaces.contains(&i.name)) {
        let Some(mac) = i.mac else { continue };
        for ip in &i.ipv4 {
            if let Err(e) = ferry_net::gratuitous_arp(pid, &i.name, *ip, mac, 3).await {
                errs.push(side_err(step, format!("{}: {e}", i.name)));
            }
        }
    }
    errs
}

impl SourceSide for LocalSource {
    async fn preflight(&mut self) -> Result<SourcePreflight, SideError> {
        let step = "preflight (source)";
        let inspect = self
            .docker
            .inspect_container(&self.container)
            .await
            .map_err(|e| side_err(step, e))?
            .ok_or_else(|| {
                SideError::refused(
                    step,
                    format!(
                        "no container named {:?} on source {}",
                        self.container, self.env.name
                    ),
                )
            })?;
        let view = ContainerView::from_inspect(&inspect).map_err(|e| side_err(step, e))?;
        if !view.running || view.restarting {
            let status = inspect
                .pointer("/State/Status")
                .and_then(|s| s.as_str())
                .unwrap_or("unknown");
            return Err(SideError::refused(step, format!("container {} is not running (status {status}): only running containers are live-migrated", view.name)));
        }
        if view.paused {
            return Err(SideError::refused(step, format!("container {} is paused: unpause it first (ferry pauses it itself while freezing)", view.name)));
        }
        let is_shared = |m: &&ferry_docker::MountView| {
            ferry_proto::shared_covers(&self.shared, m.name.as_deref(), &m.source)
        };
        let foreign: Vec<String> = view
            .mounts
            .iter()
            .filter(|m| {
                m.kind == "bind"
                    || (m.kind == "volume" && m.driver.as_deref().unwrap_or("local") != "local")
            })
            .filter(|m| !is_shared(m))
            .map(|m| {
                format!(
                    "{} {} -> {}",
                    m.kind,
                    m.name.clone().unwrap_or_else(|| m.source.clone()),
                    m.destination
                )
            })
            .collect();
        if !foreign.is_empty() {
            return Err(SideError::refused(
                step,
                format!("container {} has mounts whose data ferry cannot carry (bind mounts and volumes of drivers other than local): {}; declare storage both hosts share with --shared PATH|VOLUME to leave it alone", view.name, foreign.join(", ")),
            ));
        }
        if !has_cap_sys_resource() {
            let procs = foreign_uid_processes(view.pid);
            if !procs.is_empty() {
                let list: Vec<String> = procs
                    .iter()
                    .take(5)
                    .map(|(p, u, n)| format!("{n} (pid {p}, uid {u})"))
                    .collect();
                return Err(SideError::refused(
                    step,
                    format!(
                        "container {} runs processes as non-root uids ({}) and root on this host lacks CAP_SYS_RESOURCE, so CRIU cannot read their rlimits (\"Can't get rlimit\"); run the container as root or in a user namespace (dockerd userns-remap)",
                        view.name,
                        list.join(", ")
                    ),
                ));
            }
        }
        let shared_paths: Vec<String> = view
            .mounts
            .iter()
            .filter(|m| m.kind == "bind")
            .filter(is_shared)
            .map(|m| m.source.clone())
            .collect();
        self.volumes = view
            .mounts
            .iter()
            .filter(|m| m.kind == "volume" && m.driver.as_deref().unwrap_or("local") == "local")
            .filter(|m| !is_shared(m))
            .filter_map(|m| {
                m.name.clone().map(|name| crate::volumes::VolumeRef {
                    name: name.clone(),
                    path: PathBuf::from(&m.source),
                    baseline: None,
                    transfer: ferry_proto::VolumeTransfer {
                        name: name.clone(),
                        ..Default::default()
                    },
                })
            })
            .collect();
        let handle = ferry_criu::discover_runc(
            view.pid,
            &view.id,
            self.env.runc.as_deref().unwrap_or("runc"),
        )
        .map_err(|e| SideError::refused(step, e.to_string()))?;
        info!(runc = %handle.binary, root = %handle.root.display(), "runc discovered");

        // The CPU image comes with the facts' probe: asked second, it is already kept.
        let facts = self.env.facts(None, crate::host::Probe::Recent).await;
        let cpuinfo = self.env.cpuinfo(crate::host::Probe::Recent).await;
        let body = ferry_docker::create_body_from_inspect(
            &inspect,
            Some(crate::FERRY_RUNTIME),
            self.docker.api_version(),
        )
        .map_err(|e| side_err(step, e))?;
        let mut networks = Vec::new();
        let mut reports = Vec::new();
        for ep in &view.networks {
            let net = self
                .docker
                .inspect_network(&ep.network)
                .await
                .map_err(|e| side_err(step, e))?;
            let driver = net
                .as_ref()
                .and_then(|n| n.get("Driver"))
                .and_then(|d| d.as_str())
                .unwrap_or("unknown")
                .to_string();
            let subnet = net
                .as_ref()
                .and_then(|n| n.pointer("/IPAM/Config/0/Subnet"))
                .and_then(|s| s.as_str())
                .map(str::to_string);
            let l2 = matches!(driver.as_str(), "macvlan" | "ipvlan");
            let note = if l2 {
                format!("{driver} network {}: the address moves with the container on the shared L2 segment and established connections survive", ep.network)
            } else {
                format!(
                    "{driver} network {}: the container keeps its address inside the target host's network of the same subnet, but external established connections only survive on an L2 (macvlan/ipvlan) or routed network",
                    ep.network
                )
            };
            reports.push(NetworkReport {
                network: ep.network.clone(),
                driver: driver.clone(),
                ipv4: ep.ipv4.clone(),
                mac: ep.mac.clone(),
                external_connections_survive: l2,
                note,
            });
            networks.push(NetworkAttachment {
                network: ep.network.clone(),
                driver,
                ipv4: ep.ipv4.clone(),
                mac: ep.mac.clone(),
                subnet,
            });
        }
        let prepare = PrepareRequest {
            migration_id: self.migration_id.clone(),
            strategy: Strategy::StopAndCopy,
            transfer: Default::default(),
            container_name: view.name.clone(),
            image_id: view.image_id.clone(),
            image_ref: Some(view.image_ref.clone())
                .filter(|r| !r.is_empty() && *r != view.image_id),
            create_body: body,
            networks,
            fault: self.fault,
            source_agent: self.source_agent.clone(),
            volumes: self.volumes.iter().map(|v| v.name.clone()).collect(),
            overwrite_volumes: self.overwrite_volumes,
            shared_paths,
            // Only a namespace of its own that Docker wires from its hook: not the host's,
            // none, or another container's.
            prewire_netns: !matches!(view.network_mode.as_str(), "host" | "none")
                && !view.network_mode.starts_with("container:"),
            page_reads: true,
        };
        let mut warnings = vec![];
        match (
            inspect
                .pointer("/GraphDriver/Name")
                .and_then(|v| v.as_str()),
            inspect
                .pointer("/GraphDriver/Data/UpperDir")
                .and_then(|v| v.as_str()),
        ) {
            (Some("overlay2"), Some(upper)) => self.upper_dir = Some(PathBuf::from(upper)),
            (driver, _) => warnings.push(format!(
                "the writable layer is not carried for storage driver {}",
                driver.unwrap_or("unknown")
            )),
        }
        self.view = Some(view);
        self.criu_lazy_pages_read = facts.criu_features.lazy_pages_read;
        self.criu_nft_lock = facts.criu_features.network_lock_nftables;
        Ok(SourcePreflight {
            facts,
            cpuinfo,
            prepare,
            networks: reports,
            warnings,
        })
    }

    async fn precopy(&mut self) -> Result<DumpedImages, SideError> {
        let dir = self.dir.join("precopy");
        std::fs::create_dir_all(&dir)
            .map_err(|e| side_err("precopy", format!("{}: {e}", dir.display())))?;
        let mut files = Vec::new();
        for (i, v) in self.volumes.iter_mut().enumerate() {
            let name = crate::volumes::stream_name(i, 0);
            let out = dir.join(&name);
            let (path, out2) = (v.path.clone(), out.clone());
            let started = std::time::Instant::now();
            let baseline =
                tokio::task::spawn_blocking(move || crate::volumes::first_pass(&path, &out2))
                    .await
                    .map_err(|e| side_err("precopy", e))?
                    .map_err(|e| side_err("precopy", format!("volume {}: {e}", v.name)))?;
            v.baseline = Some(baseline);
            let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            v.transfer.first_pass_ms = started.elapsed().as_millis() as u64;
            v.transfer.first_pass_bytes = size;
            files.push(ImageFile {
                rel: name,
                path: out,
                size,
                mode: 0o600,
            });
        }
        Ok(DumpedImages { dir, files })
    }

    async fn memory_round(&mut self) -> Result<Option<ferry_migrate::RoundImages>, SideError> {
        if self.rounds_done {
            return Ok(None);
        }
        let view = self.view()?.clone();
        let round = u32::try_from(self.rounds.len() + 1).unwrap_or(u32::MAX);
        let step = format!("precopy: pre-dump round {round}");
        let handle = ferry_criu::discover_runc(
            view.pid,
            &view.id,
            self.env.runc.as_deref().unwrap_or("runc"),
        )
        .map_err(|e| side_err(&step, e))?;
        let opts = ferry_criu::PrecopyOptions {
            images: self.dir.join(PRE_DIR),
            work: self.dir.join("work").join(PRE_DIR),
            tcp_established: true,
            timeout: self.dump_timeout,
        };
        let r = ferry_criu::pre_dump(&handle, &opts, round)
            .await
            .map_err(|e| SideError::failed(&step, e.to_string()).with_log(e.log().to_vec()))?;
        let files = ferry_criu::checkpoint::image_files(&r.image_dir)
            .map_err(|e| side_err(&step, format!("{}: {e}", r.image_dir.display())))?;
        let report = ferry_proto::MemoryRound {
            round,
            pages_scanned: r.stats.pages_scanned,
            pages_written: r.stats.pages_written,
            pages_in_parent: r.stats.pages_skipped_parent,
            frozen_ms: u64::from(r.stats.frozen_time_us) / 1000,
            dump_ms: r.wall_ms,
            bytes: 0,
            send_ms: 0,
        };
        let images = DumpedImages {
            dir: r.image_dir.clone(),
            files: files
                .into_iter()
                .map(|(rel, path, size, mode)| ImageFile {
                    rel: round_file_name(round, &rel),
                    path,
                    size,
                    mode,
                })
                .collect(),
        };
        self.rounds.push(r);
        let last = match ferry_criu::next_step(&self.rounds) {
            ferry_criu::PrecopyDecision::Stop { reason } => {
                self.rounds_done = true;
                Some(reason.to_string())
            }
            ferry_criu::PrecopyDecision::Continue => None,
        };
        Ok(Some(ferry_migrate::RoundImages {
            images,
            report,
            last,
        }))
    }

    fn dump_stats(&self) -> Option<ferry_proto::CriuDumpStats> {
        self.dump_stats
    }

    fn lazy_pages_read(&self) -> bool {
        self.lazy_pages_read
    }

    fn network_lock_nftables(&self) -> bool {
        self.nft_lock
    }

    fn target_prepared(&mut self, target: &ferry_migrate::PreparedTarget) {
        self.external_netns = target.prewired_netns;
        self.nft_lock = target.nft_lock && self.criu_nft_lock;
    }

    async fn freeze(&mut self, strategy: Strategy) -> Result<(), SideError> {
        let step = "freeze";
        self.strategy = strategy;
        let view = self.view()?.clone();
        // Docker would restart a container with a restart policy the moment it looks dead.
        self.saved_restart_policy = Some(view.restart_policy.clone());
        self.docker
            .update_restart_policy(&view.id, &serde_json::json!({"Name": "no"}))
            .await
            .map_err(|e| side_err(step, format!("setting restart policy to no: {e}")))?;
        let ifaces: Vec<String> = ferry_net::interfaces(view.pid)
            .await
            .map_err(|e| side_err(step, e))?
            .into_iter()
            .filter(|i| !i.ipv4.is_empty())
            .map(|i| i.name)
            .collect();
        // The processes stop before the network does: a reply written after the lock (or after
        // ARP off, which flushes the neighbour table) would sit unsent in the socket and reach
        // the client only when the target's retransmission timer fires, a second later. What
        // clients send meanwhile is ACKed and queued by the kernel and dumped with the socket.
        if strategy.lazy_pages() {
            // A lazy dump must end the source itself once the pages are served, which a cgroup
            // frozen by Docker would prevent; CRIU leaves a cgroup it found frozen to die.
            // CRIU locks the network itself before it reads the sockets; ours follows the dump
            // (see `settle`). See `crate::freezer`.
            let freezer = crate::freezer::Freezer::of(view.pid).map_err(|e| side_err(step, e))?;
            self.frozen = true;
            let took = tokio::task::spawn_blocking(move || freezer.freeze(FREEZE_LIMIT))
                .await
                .map_err(|e| side_err(step, e))?
                .map_err(|e| side_err(step, e))?;
            self.steps_ms
                .insert("source_freeze_cgroup".into(), took.as_millis() as u64);
            self.pending_arp_off = ifaces;
        } else {
            self.docker
                .pause(&view.id)
                .await
                .map_err(|e| side_err(step, format!("pausing: {e}")))?;
            self.paused = true;
            ferry_net::lock(view.pid)
                .await
                .map_err(|e| side_err(step, e))?;
            self.locked = true;
            for name in ifaces {
                ferry_net::set_arp(view.pid, &name, false)
                    .await
                    .map_err(|e| side_err(step, format!("ARP off on {name}: {e}")))?;
                self.arp_off.push(name);
            }
        }
        Ok(())
    }

    async fn dump(&mut self) -> Result<DumpedImages, SideError> {
        let view = self.view()?.clone();
        let handle = ferry_criu::discover_runc(
            view.pid,
            &view.id,
            self.env.runc.as_deref().unwrap_or("runc"),
        )
        .map_err(|e| side_err("dump", e))?;
        let image_dir = self.dir.join("images");
        let opts = ferry_criu::CheckpointOptions {
            image_dir: image_dir.clone(),
            work_dir: self.dir.join("work"),
            tcp_established: true,
            leave_running: !self.strategy.lazy_pages(),
            timeout: self.dump_timeout,
            criu_config: self.dump_config(view.pid, self.strategy.lazy_pages())?,
            parent: self
                .rounds
                .last()
                .map(|r| format!("../{PRE_DIR}/{}", r.round)),
        };
        if self.strategy.lazy_pages() {
            let port = free_loopback_port().map_err(|e| {
                side_err(
                    "dump",
                    format!("no free loopback port for the page server: {e}"),
                )
            })?;
            if let Ok(mut m) = self.pages.lock() {
                m.insert(
                    self.migration_id.clone(),
                    PageServer {
                        port,
                        bytes: self.page_bytes.clone(),
                        closed: self.page_tunnel_closed.clone(),
                        reads: self.page_reads.clone(),
                        images: image_dir.clone(),
                        pid: view.pid,
                    },
                );
            }
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let started = std::time::Instant::now();
            let lazy = ferry_criu::checkpoint_lazy(&handle, &opts, addr)
                .await
                .map_err(|e| SideError::failed("dump", e.to_string()).with_log(e.log().to_vec()))?;
            self.steps_ms.insert(
                "source_criu_dump".into(),
                started.elapsed().as_millis() as u64,
            );
            self.lazy = Some(lazy);
            self.lazy_pages_read = self.criu_lazy_pages_read;
            let (pid, ifaces) = (view.pid, std::mem::take(&mut self.pending_arp_off));
            self.late_lock = Some(tokio::spawn(async move {
                let mut done = LateLock::default();
                if let Err(e) = ferry_net::lock(pid).await {
                    done.error = Some(e.to_string());
                    return done;
                }
                done.locked = true;
                for name in ifaces {
                    if let Err(e) = ferry_net::set_arp(pid, &name, false).await {
                        done.error = Some(format!("ARP off on {name}: {e}"));
                        return done;
                    }
                    done.arp_off.push(name);
                }
                done
            }));
        } else {
            let started = std::time::Instant::now();
            ferry_criu::checkpoint(&handle, &opts)
                .await
                .map_err(|e| SideError::failed("dump", e.to_string()).with_log(e.log().to_vec()))?;
            self.steps_ms.insert(
                "source_criu_dump".into(),
                started.elapsed().as_millis() as u64,
            );
            self.read_dump_stats();
        }
        let data_started = std::time::Instant::now();
        for (i, v) in self.volumes.iter_mut().enumerate() {
            let Some(baseline) = v.baseline.clone() else {
                continue;
            };
            let (path, out) = (
                v.path.clone(),
                image_dir.join(crate::volumes::stream_name(i, 1)),
            );
            let started = std::time::Instant::now();
            let out2 = out.clone();
            let (digest, entries) = tokio::task::spawn_blocking(move || {
                crate::volumes::final_pass(&path, &baseline, &out2)
            })
            .await
            .map_err(|e| side_err("dump: volumes", e))?
            .map_err(|e| side_err("dump: volumes", format!("volume {}: {e}", v.name)))?;
            v.transfer.final_pass_ms = started.elapsed().as_millis() as u64;
            v.transfer.final_pass_bytes = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            v.transfer.final_pass_entries = entries;
            let note = serde_json::json!({"name": v.name, "digest": digest});
            std::fs::write(
                image_dir.join(crate::volumes::digest_name(i)),
                note.to_string(),
            )
            .map_err(|e| side_err("dump: volumes", e))?;
        }
        if let Some(upper) = self.upper_dir.clone() {
            let out = image_dir.join(ROOTFS_STREAM);
            tokio::task::spawn_blocking(move || write_layer(&upper, &out))
                .await
                .map_err(|e| side_err("dump: writable layer", e))?
                .map_err(|e| side_err("dump: writable layer", e))?;
        }
        self.steps_ms.insert(
            "source_volumes_and_layer".into(),
            data_started.elapsed().as_millis() as u64,
        );
        let files = ferry_criu::checkpoint::image_files(&image_dir)
            .map_err(|e| side_err("dump", format!("{}: {e}", image_dir.display())))?;
        Ok(DumpedImages {
            dir: image_dir,
            files: files
                .into_iter()
                .map(|(rel, path, size, mode)| ImageFile {
                    rel,
                    path,
                    size,
                    mode,
                })
                .collect(),
        })
    }

    async fn commit(&mut self) -> Result<Vec<String>, SideError> {
        let mut warnings = Vec::new();
        let view = self.view()?.clone();
        if let Err(e) = self.join_late_lock().await {
            // CRIU's own lock still silences the kill; ours is the second layer.
            warnings.push(format!("network lock after the dump: {e}"));
        }
        if let Some(lazy) = self.lazy.as_mut() {
            // Every page has reached the target when the target commits; CRIU then ends.
            if let Err(e) = lazy.wait_done(Duration::from_secs(60)).await {
                warnings.push(format!(
                    "the source's page server did not end cleanly: {e} {}",
                    e.log().join(" / ")
                ));
                lazy.abort().await;
            }
            let _ =
                tokio::time::timeout(Duration::from_secs(5), self.page_tunnel_closed.notified())
                    .await;
            if self
                .page_reads
                .opened
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), self.page_reads.closed.notified())
                        .await;
            }
            self.lazy = None;
            if let Ok(mut m) = self.pages.lock() {
                m.remove(&self.migration_id);
            }
        }
        warnings.extend(crate::logs::keep(
            &self.env.state_dir,
            &self.migration_id,
            "source",
            &self.dir.join("work"),
        ));
        // The lock rules stay until the namespace is gone, so the kill sends nothing on the wire.
        if let Err(e) = self.docker.remove_container(&view.id, true).await {
            warnings.push(format!("removing the source container {}: {e}", view.name));
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warnings.push(format!("removing {}: {e}", self.dir.display()));
            }
        }
        Ok(warnings)
    }

    async fn abandon(&mut self) -> (Vec<String>, Vec<SideError>) {
        let mut notes = Vec::new();
        let mut errs = Vec::new();
        let view = self.view.clone();
        // CRIU holds the dumped tasks until every page is served; a page server that died let
        // them go, running again with the memory of the freeze but cut off from the network.
        // Frozen, they are neither a second, stale copy of the service nor lost: the operator
        // decides.
        let alive = view
            .as_ref()
            .is_some_and(|v| Path::new(&format!("/proc/{}", v.pid)).exists());
        if let (Some(v), true) = (&view, alive) {
            errs.extend(self.stop_criu_frozen(v.pid, "abandon").await);
            notes.push(format!(
                "the source container {} is kept frozen and cut off from the network, with its memory as it was at the freeze (without what the target did after resuming), its writable layer and volumes; its restart policy stays 'no'",
                v.name
            ));
        } else {
            if let Some(mut lazy) = self.lazy.take() {
                lazy.abort().await;
            }
            if let Some(v) = &view {
                notes.push(format!(
                    "the source container {}'s processes are gone; it is kept with its writable layer and volumes",
                    v.name
                ));
            }
        }
        if let Ok(mut m) = self.pages.lock() {
            m.remove(&self.migration_id);
        }
        errs.extend(self.drop_attempt("abandon"));
        (notes, errs)
    }

    async fn rollback(&mut self) -> Vec<SideError> {
        let mut errs = Vec::new();
        let Some(view) = self.view.clone() else {
            return errs;
        };
        if let Err(e) = self.join_late_lock().await {
            errs.push(side_err("rollback: network lock", e));
        }
        if self.lazy.is_some() {
            errs.extend(self.stop_criu_frozen(view.pid, "rollback").await);
        }
        if self.frozen {
            match thaw(view.pid) {
                Ok(_) => self.frozen = false,
                Err(e) => errs.push(side_err("rollback: thaw", e)),
            }
        }
        if let Ok(mut m) = self.pages.lock() {
            m.remove(&self.migration_id);
        }
        if self.paused {
            match self.docker.unpause(&view.id).await {
                Ok(()) => self.paused = false,
                Err(e) => errs.push(side_err("rollback: unpause", e)),
            }
        }
        let silenced = std::mem::take(&mut self.arp_off);
        for iface in &silenced {
            if let Err(e) = ferry_net::set_arp(view.pid, iface, true).await {
                errs.push(side_err("rollback: ARP on", format!("{iface}: {e}")));
            }
        }
        match ferry_net::remove_criu_lock(view.pid).await {
            Ok(true) => warn!("removed a network-lock chain CRIU left behind"),
            Ok(false) => {}
            Err(e) => errs.push(side_err("rollback: CRIU lock", e)),
        }
        if self.nft_lock {
            let pid = view.pid;
            match tokio::task::spawn_blocking(move || {
                ferry_criu::nftables::remove_criu_lock_tables(pid)
            })
            .await
            {
                Ok(Ok(t)) if !t.is_empty() => {
                    warn!(tables = %t.join(", "), "removed a network lock CRIU left behind")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => errs.push(side_err("rollback: CRIU nftables lock", e)),
                Err(e) => errs.push(side_err("rollback: CRIU nftables lock", e.to_string())),
            }
        }
        if self.locked {
            match ferry_net::unlock(view.pid).await {
                Ok(()) => self.locked = false,
                Err(e) => errs.push(side_err("rollback: unlock network", e)),
            }
        }
        // The target may have announced the addresses as its restore resumed the tasks (see
        // `ferry_net::announce_all_here`) and failed after that: take them back.
        if !silenced.is_empty() {
            errs.extend(announce_again(view.pid, &silenced).await);
        }
        if let Some(policy) = self.saved_restart_policy.take() {
            if let Err(e) = self.docker.update_restart_policy(&view.id, &policy).await {
                errs.push(side_err("rollback: restart policy", e));
            }
        }
        errs.extend(self.drop_attempt("rollback"));
        let _ = SideErrorKind::Failed;
        errs
    }

    async fn settle(&mut self) -> Result<(), SideError> {
        let started = std::time::Instant::now();
        let res = self.join_late_lock().await;
        self.steps_ms
            .insert("source_settle".into(), started.elapsed().as_millis() as u64);
        res.map_err(|e| side_err("settle: network lock", e))
    }

    fn step_times(&self) -> std::collections::BTreeMap<String, u64> {
        self.steps_ms.clone()
    }

    fn volume_transfers(&self) -> Vec<ferry_proto::VolumeTransfer> {
        self.volumes.iter().map(|v| v.transfer.clone()).collect()
    }

    fn extra_bytes_sent(&self) -> u64 {
        self.page_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn page_reader_bytes(&self) -> u64 {
        self.page_reads
            .served
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}
