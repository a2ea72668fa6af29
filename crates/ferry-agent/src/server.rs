use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_migrate::{Engine, EngineOptions, MigrationPlan};
use ferry_proto::{
    BandwidthReport, ErrorInfo, Message, MigrateRequest, Purpose, Report, TransferSettings,
    FEATURE_CHUNKS, PROTOCOL_VERSION,
};
use ferry_transfer::{BridgeOptions, Pacer, TransferStats};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::conn::{describe, Conn, ConnError};
use crate::host::{HostEnv, Probe};
use crate::source::LocalSource;
use crate::target::{ImagesChannel, RemoteTarget, Targets};
use crate::AgentError;

/// Bound on the TLS handshake and greeting, so a silent peer cannot hold a task.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a target waits between control messages before treating the source as gone.
const CONTROL_IDLE: Duration = Duration::from_secs(1800);

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub listen: SocketAddr,
    pub tls_dir: PathBuf,
    pub state_dir: PathBuf,
    /// The operator's consent to raise host settings post-copy needs (fs.pipe-max-size).
    pub tune_host: bool,
}

/// Raises fs.pipe-max-size to what CRIU's page server needs when root lacks CAP_SYS_RESOURCE.
fn tune_host() -> Result<Option<String>, String> {
    let path = "/proc/sys/fs/pipe-max-size";
    let cur: u64 = std::fs::read_to_string(path)
        .map_err(|e| format!("{path}: {e}"))?
        .trim()
        .parse()
        .unwrap_or(0);
    if crate::host::has_cap_sys_resource() || cur >= ferry_migrate::PIPE_NEEDED {
        return Ok(None);
    }
    std::fs::write(path, ferry_migrate::PIPE_NEEDED.to_string())
        .map_err(|e| format!("raising {path}: {e}"))?;
    Ok(Some(format!(
        "raised fs.pipe-max-size from {cur} to {} for post-copy",
        ferry_migrate::PIPE_NEEDED
    )))
}

struct Shared {
    env: HostEnv,
    listen: SocketAddr,
    pages: crate::source::PageServers,
    /// How each migration leaving this host sends its bulk streams, by migration id, for the
    /// page tunnel the target opens after the images went.
    transfers: std::sync::Mutex<HashMap<String, MigrationTransfer>>,
    targets: Targets,
    client_tls: Arc<rustls::ClientConfig>,
}

/// One migration's compression policy, and the pacer and counters its image upload and page
/// tunnel share: one bandwidth budget for everything it sends to the target.
#[derive(Clone, Default)]
struct MigrationTransfer {
    settings: TransferSettings,
    pacer: Pacer,
    stats: Arc<TransferStats>,
}

impl MigrationTransfer {
    fn new(settings: TransferSettings) -> Self {
        MigrationTransfer {
            settings,
            pacer: Pacer::new(settings.bandwidth_limit_bytes_per_s),
            stats: Arc::default(),
        }
    }

    /// Adds to `report` what compression saved and what the bandwidth limit cost.
    fn fill(&self, report: &mut Report) {
        let snap = self.stats.snapshot();
        report.bytes_uncompressed = report.bytes_sent.saturating_add(snap.saved());
        report.compression = Some(snap.report(self.settings.compression));
        let limit = self.settings.bandwidth_limit_bytes_per_s;
        if limit > 0 {
            report.bandwidth = Some(BandwidthReport {
                limit_bytes_per_s: limit,
                paced_ms: u64::try_from(self.pacer.paced().as_millis()).unwrap_or(u64::MAX),
            });
        }
    }
}

pub async fn serve(opts: AgentOptions) -> Result<(), AgentError> {
    if opts.tune_host {
        match tune_host() {
            Ok(Some(note)) => info!("{note}"),
            Ok(None) => {}
            Err(e) => warn!("--tune-host: {e}"),
        }
    }
    let identity = ferry_tls::load_identity(&opts.tls_dir)?;
    let name = identity.common_name().to_string();
    let server_cfg = ferry_tls::server_config(&identity)?;
    let client_tls = ferry_tls::client_config(&identity)?;
    let env = HostEnv::discover(name.clone(), opts.state_dir.clone()).await?;
    let facts = env.facts(None, Probe::Fresh).await;
    for p in &facts.problems {
        warn!("host problem: {p}");
    }
    let refresh = env.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(crate::host::PROBE_REFRESH).await;
            refresh.refresh_probes().await;
        }
    });
    let shared = Arc::new(Shared {
        targets: Targets::new(env.clone(), client_tls.clone()),
        env,
        client_tls,
        listen: opts.listen,
        pages: Default::default(),
        transfers: Default::default(),
    });
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: opts.listen,
            source,
        })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
    info!(agent = %name, listen = %opts.listen, "agent listening");
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(
            async move {
                let (stream, who) = match ferry_tls::accept(tcp, &acceptor, GREETING_TIMEOUT).await
                {
                    Ok(x) => x,
                    Err(e) => {
                        warn!("refused {peer}: {e}");
                        return;
                    }
                };
                if let Err(e) = handle(shared, Conn::new(stream), who.common_name).await {
                    warn!("connection from {peer}: {e}");
                }
            }
            .instrument(info_span!("conn", %peer)),
        );
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut conn: Conn<S>,
    who: String,
) -> Result<(), AgentError> {
    let purpose = match conn.recv(GREETING_TIMEOUT).await? {
        Message::Hello { protocol, purpose } if protocol == PROTOCOL_VERSION => purpose,
        Message::Hello { protocol, .. } => {
            let e = ErrorInfo {
                step: "hello".into(),
                message: format!(
                    "protocol {protocol} not supported (this agent speaks {PROTOCOL_VERSION})"
                ),
                tool_log: vec![],
            };
            conn.send(&Message::Error(e.clone())).await?;
            return Err(AgentError::Remote(e));
        }
        other => return Err(ConnError::Unexpected(describe(&other)).into()),
    };
    conn.send(&Message::HelloOk {
        protocol: PROTOCOL_VERSION,
        agent: shared.env.name.clone(),
        features: vec![FEATURE_CHUNKS.to_string()],
    })
    .await?;
    info!(peer = %who, ?purpose, "session");
    match purpose {
        Purpose::Cli => serve_cli(shared, conn).await,
        Purpose::Control { migration_id } => {
            shared
                .targets
                .serve_control(conn, migration_id, CONTROL_IDLE, Duration::from_secs(100))
                .await;
            Ok(())
        }
        Purpose::Pages {
            migration_id,
            chunks,
        } => {
            let Some(crate::source::PageServer {
                port,
                bytes,
                closed,
                ..
            }) = page_server(&shared, &migration_id)
            else {
                let message = format!("no page server for migration {migration_id}");
                return refuse(conn, "pages", message).await;
            };
            let local = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| {
                    AgentError::Setup(format!(
                        "connecting to the page server on 127.0.0.1:{port}: {e}"
                    ))
                })?;
            let _ = local.set_nodelay(true);
            let opts = page_channel_options(&shared, &migration_id, chunks);
            match crate::conn::bridge(conn, local, opts).await {
                Ok(t) => {
                    bytes.fetch_add(t.to_peer.wire, std::sync::atomic::Ordering::Relaxed);
                    info!(migration = %migration_id, to_criu = t.from_peer.raw, from_criu = t.to_peer.raw, to_target_wire = t.to_peer.wire, framed = chunks, "page tunnel closed")
                }
                Err(e) => warn!(migration = %migration_id, "page tunnel: {e}"),
            }
            closed.notify_one();
            Ok(())
        }
        Purpose::PageReads {
            migration_id,
            chunks,
        } => serve_page_reads(&shared, conn, &migration_id, chunks).await,
        Purpose::Image { image_id } => serve_image(&shared, conn, &image_id).await,
        Purpose::Images { migration_id } => {
            let reply = match shared
                .targets
                .receive_images(&mut conn, &migration_id, Duration::from_secs(120))
                .await
            {
                Ok((files, bytes)) => Message::ImagesReceived { files, bytes },
                Err(e) => Message::Error(e),
            };
            conn.send(&reply).await?;
            Ok(())
        }
    }
}

async fn serve_cli<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut conn: Conn<S>,
) -> Result<(), AgentError> {
    loop {
        let msg = match conn.recv(Duration::from_secs(600)).await {
            Ok(m) => m,
            Err(ConnError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match msg {
            Message::Check { cpuinfo } => {
                let facts = shared.env.facts(cpuinfo.as_deref(), Probe::Fresh).await;
                conn.send(&Message::CheckReply(facts)).await?;
            }
            Message::Migrate(req) => return run_migration(shared, conn, req).await,
            other => {
                let e = ErrorInfo {
                    step: "cli".into(),
                    message: format!("unexpected {}", describe(&other)),
                    tool_log: vec![],
                };
                conn.send(&Message::Error(e)).await?;
            }
        }
    }
}

async fn run_migration<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut conn: Conn<S>,
    req: MigrateRequest,
) -> Result<(), AgentError> {
    let bad = |message: String| ErrorInfo {
        step: "migrate".into(),
        message,
        tool_log: vec![],
    };
    let target: SocketAddr = match req.target.parse() {
        Ok(a) => a,
        Err(_) => {
            conn.send(&Message::Error(bad(format!(
                "target {:?} is not an IP:PORT address",
                req.target
            ))))
            .await?;
            return Ok(());
        }
    };
    if req.step_timeout_s == 0 {
        conn.send(&Message::Error(bad(
            "step timeout must be at least 1 s".into()
        )))
        .await?;
        return Ok(());
    }
    if let Err(problem) = ferry_transfer::check_bandwidth_limit(req.bandwidth_limit_bytes_per_s) {
        conn.send(&Message::Error(bad(format!("bandwidth limit: {problem}"))))
            .await?;
        return Ok(());
    }
    let id = crate::new_id();
    let transfer = MigrationTransfer::new(req.transfer());
    if let Ok(mut m) = shared.transfers.lock() {
        m.insert(id.clone(), transfer.clone());
    }
    let step_timeout = Duration::from_secs(req.step_timeout_s);
    let source = LocalSource::new(
        shared.env.clone(),
        req.container.clone(),
        id.clone(),
        req.fault,
        step_timeout,
        shared.pages.clone(),
        Some(shared.listen.to_string()),
    )
    .with_data_options(req.overwrite_volumes, req.shared.clone());
    let remote = RemoteTarget::new(target, shared.client_tls.clone(), id.clone(), step_timeout)
        .with_transfer(transfer.settings);
    let images = ImagesChannel::new(target, shared.client_tls.clone(), id.clone(), step_timeout)
        .with_transfer(
            transfer.settings,
            transfer.pacer.clone(),
            transfer.stats.clone(),
        );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let engine = Engine::new(
        source,
        remote,
        images,
        EngineOptions {
            step_timeout,
            transfer_timeout: Duration::from_secs(3600),
        },
    )
    .with_events(tx)
    .with_cancel(cancel.clone());
    let plan = MigrationPlan {
        migration_id: id.clone(),
        container: req.container.clone(),
        source: shared.env.name.clone(),
        target: req.target.clone(),
        strategy: req.strategy,
    };
    // The migration runs on its own task: losing the CLI cancels it, which rolls back, but
    // never abandons it half-way.
    let mut job = tokio::spawn(engine.run(plan));
    let mut cli_alive = true;
    let report = loop {
        tokio::select! {
            done = &mut job => break done,
            ev = rx.recv() => {
                if let Some(ev) = ev {
                    if cli_alive && conn.send(&Message::Event(ev)).await.is_err() {
                        cli_alive = false;
                        cancel.cancel();
                    }
                }
            }
            msg = conn.recv(Duration::from_secs(86400)), if cli_alive => {
                match msg {
                    Ok(Message::Cancel) => { info!("cancelled by the CLI"); cancel.cancel(); }
                    Ok(other) => warn!("ignoring {} during a migration", describe(&other)),
                    Err(e) => { warn!("CLI connection lost ({e}): cancelling"); cli_alive = false; cancel.cancel(); }
                }
            }
        }
    };
    if let Ok(mut m) = shared.transfers.lock() {
        m.remove(&id);
    }
    while let Ok(ev) = rx.try_recv() {
        if cli_alive && conn.send(&Message::Event(ev)).await.is_err() {
            cli_alive = false;
        }
    }
    let report = match report {
        Ok(mut r) => {
            transfer.fill(&mut r);
            r
        }
        Err(e) => {
            let info = bad(format!("migration task failed: {e}"));
            if cli_alive {
                conn.send(&Message::Error(info.clone())).await?;
            }
            return Err(AgentError::Remote(info));
        }
    };
    info!(outcome = ?report.outcome, downtime_ms = report.downtime_ms, "migration finished");
    if cli_alive {
        conn.send(&Message::Report(Box::new(report))).await?;
    }
    Ok(())
}

/// Streams `docker save` of one image to a target that lacks it.
async fn serve_image<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    mut conn: Conn<S>,
    image_id: &str,
) -> Result<(), AgentError> {
    let docker = shared.env.docker.clone();
    let fail = |message: String| ErrorInfo {
        step: "image transfer (source)".into(),
        message,
        tool_log: vec![],
    };
    match docker.inspect_image(image_id).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            conn.send(&Message::Error(fail(format!(
                "image {image_id} is not on this host"
            ))))
            .await?;
            return Ok(());
        }
        Err(e) => {
            conn.send(&Message::Error(fail(e.to_string()))).await?;
            return Ok(());
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    let id = image_id.to_string();
    let save = tokio::spawn(async move { docker.save_image(&id, tx).await });
    let mut sent = 0u64;
    while let Some(chunk) = rx.recv().await {
        for part in chunk.chunks(1 << 20) {
            sent += part.len() as u64;
            conn.send_data(bytes::Bytes::copy_from_slice(part)).await?;
        }
    }
    match save.await {
        Ok(Ok(_)) => {
            conn.send(&Message::ImagesDone {
                files: 1,
                bytes: sent,
            })
            .await?
        }
        Ok(Err(e)) => conn.send(&Message::Error(fail(e.to_string()))).await?,
        Err(e) => conn.send(&Message::Error(fail(e.to_string()))).await?,
    }
    info!(image = %image_id, bytes = sent, "image sent");
    Ok(())
}

/// Post-copy: serves the target's read-ahead from the seized tasks of a lazy dump (see
/// `ferry_pages::reader`), on the same framing, compression and pacing as the page tunnel.
async fn serve_page_reads<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: Conn<S>,
    migration_id: &str,
    chunks: bool,
) -> Result<(), AgentError> {
    let found = page_server(shared, migration_id)
        .ok_or_else(|| format!("no page server for migration {migration_id}"));
    let tasks = found.and_then(|ps| {
        let lazy = ferry_pages::lazy_pages(&ps.images).map_err(|e| e.to_string())?;
        let procs = crate::freezer::Freezer::of(ps.pid)
            .and_then(|f| f.procs())
            .map_err(|e| e.to_string())?;
        let tasks = ferry_pages::SeizedTasks::new(ferry_pages::namespace_pids(&procs));
        if tasks.is_empty() {
            return Err(format!(
                "no process of the container's cgroup (pid {}) is left to read",
                ps.pid
            ));
        }
        ps.reads
            .opened
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok((lazy, tasks, ps))
    });
    let (lazy, mut tasks, lane) = match tasks {
        Ok(t) => t,
        Err(message) => return refuse(conn, "page reads", message).await,
    };
    let opts = page_channel_options(shared, migration_id, chunks);
    let (near, far) = tokio::io::duplex(PAGE_READS_PIPE);
    let (served, bridged) = tokio::join!(
        ferry_pages::serve_reads(near, &lazy, &mut tasks),
        crate::conn::bridge(conn, far, opts)
    );
    match served {
        Ok(st) => {
            lane.reads
                .served
                .fetch_add(st.bytes, std::sync::atomic::Ordering::Relaxed);
            info!(migration = %migration_id, requests = st.requests, bytes = st.bytes, processes = tasks.len(), "page reads done")
        }
        Err(e) => warn!(migration = %migration_id, "page reads: {e}"),
    }
    match bridged {
        Ok(t) => {
            lane.bytes
                .fetch_add(t.to_peer.wire, std::sync::atomic::Ordering::Relaxed);
        }
        Err(e) => warn!(migration = %migration_id, "page reads channel: {e}"),
    }
    lane.reads.closed.notify_one();
    Ok(())
}

/// The source side of a post-copy's page channels, registered at its lazy dump.
fn page_server(shared: &Shared, migration_id: &str) -> Option<crate::source::PageServer> {
    shared
        .pages
        .lock()
        .ok()
        .and_then(|m| m.get(migration_id).cloned())
}

/// A page channel carries the migration's compression, bandwidth limit and byte counts.
fn page_channel_options(shared: &Shared, migration_id: &str, chunks: bool) -> BridgeOptions {
    let transfer = shared
        .transfers
        .lock()
        .ok()
        .and_then(|m| m.get(migration_id).cloned())
        .unwrap_or_default();
    BridgeOptions {
        framed: chunks,
        compression: transfer.settings.compression,
        pacer: transfer.pacer,
        stats: transfer.stats,
    }
}

/// Answers a channel that cannot be served with an error naming why.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Conn<S>,
    step: &str,
    message: String,
) -> Result<(), AgentError> {
    let e = ErrorInfo {
        step: step.into(),
        message,
        tool_log: vec![],
    };
    conn.send(&Message::Error(e.clone())).await?;
    Err(AgentError::Remote(e))
}

/// The pipe between the page reader and its channel: a few read-ahead answers.
const PAGE_READS_PIPE: usize = 1 << 20;
