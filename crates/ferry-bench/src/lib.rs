//! The ferry benchmark: ferry's migration strategies side by side with the manual
//! `docker checkpoint` path an operator has today, on the local test bed.
//!
//! For every Redis size and every case (the manual path first, then each ferry strategy) one
//! run: a fresh Redis container on host a loaded with 1000-byte values until its RSS is about
//! the size, a client in the test bed's client namespace sending INCR+SET every
//! `interval_ms` on one connection (with a per-reply latency log), the migration a → b, the
//! client stopped 2 s later. Recorded per case: the client-visible gap, the migration's total
//! time, bytes moved, CPU time and peak RSS of the processes doing the work, and the gap
//! ratio manual/strategy. Results go to `out_dir`: `bench.json` (every raw number),
//! `bench.md` (tables) and `latency-<size>.svg` (latency around the migration, one line per
//! case).
//!
//! The manual path and ferry run in one process, one after another, on the same hosts, so the
//! comparison does not depend on a machine's mood between two separate runs.
//!
//! Needs root and the test bed (`ferry testbed up`); shares it with other users: containers
//! are named `bench-*` and use 198.18.0.160–179 only.

mod client;
mod error;
mod ferry;
mod manual;
mod procfs;
mod render;
mod svg;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_testbed::{HostInfo, TestbedConfig, TestbedInfo};
use serde::{Deserialize, Serialize};

pub use client::{parse_latency_log, ClientSummary, LatencyPoint};
pub use error::BenchError;
pub use ferry::{parse_strategies, FerryRun, BASELINE_STRATEGY};
pub use manual::ManualTimings;
pub use procfs::ProcUsage;
pub use render::markdown;
pub use svg::{latency_chart, Series};

/// Sizes (Redis RSS, MiB) benchmarked by default.
pub const DEFAULT_SIZES_MB: [u64; 3] = [64, 512, 2048];
/// The client's request interval by default; the field notes measured with 5 ms.
pub const DEFAULT_INTERVAL_MS: u64 = 5;
/// Name of the manual docker checkpoint case in reports.
pub const MANUAL: &str = "manual";
/// Redis value size; the field notes' figures use 1000-byte values.
pub const VALUE_SIZE: u64 = 1000;
/// RSS one 1000-byte key adds to Redis 7 (jemalloc's 1024-byte class for the value plus
/// key, dict entry and object), measured on the test bed: 60,000 keys grew RSS by 65.3 MiB.
pub const BYTES_PER_KEY: u64 = 1115;
/// Our slice of the macvlan network: e2e tests use .131–.150, Docker's own pool the rest.
const IP_FIRST: u8 = 160;
/// .160–.178 for cases, .179 for the strategy probe.
const CASE_IPS: u8 = 19;
const PROBE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 179);
const PROBE_NAME: &str = "bench-probe";
/// How long the client runs before the migration starts, so the chart shows a baseline.
const LEAD_IN: Duration = Duration::from_secs(1);
/// How long the client keeps running after the migration, to catch the retransmit gap that
/// follows the first reply from the target.
const SETTLE: Duration = Duration::from_secs(2);
const REDIS_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What to benchmark. `strategies` empty means: stop-and-copy plus every other strategy
/// `ferry migrate --strategy` accepts (strategies the hosts refuse in preflight are reported
/// as unsupported, not run).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchOptions {
    pub sizes_mb: Vec<u64>,
    pub strategies: Vec<String>,
    /// The `ferry` binary to benchmark; `ferry-workload` must be next to it (as cargo builds).
    pub ferry_exe: PathBuf,
    pub out_dir: PathBuf,
    pub interval_ms: u64,
    /// `ferry migrate --compress` for every ferry case: on the test bed the link is a veth, as
    /// fast as memory, so the policy's cost in CPU is what a comparison of policies shows.
    pub compress: ferry_proto::Compression,
}

impl BenchOptions {
    /// Defaults: sizes 64/512/2048 MiB, strategies discovered, 5 ms interval.
    pub fn new(ferry_exe: impl Into<PathBuf>, out_dir: impl Into<PathBuf>) -> BenchOptions {
        BenchOptions {
            sizes_mb: DEFAULT_SIZES_MB.to_vec(),
            strategies: Vec::new(),
            ferry_exe: ferry_exe.into(),
            out_dir: out_dir.into(),
            interval_ms: DEFAULT_INTERVAL_MS,
            compress: ferry_proto::Compression::default(),
        }
    }

    fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: String| Err(BenchError::Options(m));
        if self.sizes_mb.is_empty() {
            return bad("no sizes given".into());
        }
        if let Some(s) = self.sizes_mb.iter().find(|s| **s < 16 || **s > 65_536) {
            return bad(format!(
                "size {s} MB is outside 16..=65536 (Redis itself takes ~12 MB)"
            ));
        }
        if self.interval_ms == 0 || self.interval_ms > 10_000 {
            return bad(format!(
                "interval {} ms is outside 1..=10000",
                self.interval_ms
            ));
        }
        if !self.ferry_exe.is_file() {
            return bad(format!("{} does not exist", self.ferry_exe.display()));
        }
        if !workload_exe(&self.ferry_exe).is_file() {
            return bad(format!(
                "{} does not exist (build the workspace's binaries)",
                workload_exe(&self.ferry_exe).display()
            ));
        }
        for s in &self.strategies {
            if s == MANUAL || s.is_empty() || s.contains(char::is_whitespace) {
                return bad(format!("strategy name {s:?} is not usable"));
            }
        }
        Ok(())
    }
}

fn workload_exe(ferry_exe: &Path) -> PathBuf {
    ferry_exe.with_file_name("ferry-workload")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaseStatus {
    /// Migrated, and the client kept its connection and an unbroken counter.
    Ok,
    /// Something failed: `error` says what (the numbers recorded so far are kept).
    Failed,
    /// The hosts refused the strategy in preflight: `note` says why.
    Unsupported,
}

/// Per-host figure (host a = source, b = target).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct PerHost {
    pub a: f64,
    pub b: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct PerHostBytes {
    pub a: u64,
    pub b: u64,
}

/// One size × one case.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaseReport {
    pub size_mb: u64,
    /// `manual` or a ferry strategy name.
    pub case: String,
    pub status: CaseStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub attempts: u32,
    /// The first attempt's error when the case was retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_attempt_error: Option<String>,
    pub container: String,
    pub ip: String,
    pub keys: u64,
    pub load_ms: f64,
    /// Source Redis RSS after loading (MiB).
    pub rss_mb: Option<f64>,
    /// Restored Redis RSS on the target (MiB).
    pub target_rss_mb: Option<f64>,
    /// The client's connection survived and its counter never skipped.
    pub connection_kept: Option<bool>,
    pub client_gap_ms: Option<f64>,
    pub total_ms: Option<f64>,
    /// manual: the checkpoint directory; ferry: `bytes_sent`.
    pub bytes: Option<u64>,
    /// Bytes each host's `eth0` sent from migration start until the client stopped: what
    /// really crossed the network, including what a report's `bytes_sent` leaves out (pages
    /// post-copy serves lazily) and minus what never crossed it (the manual path copies
    /// through the file system here). Includes other users' traffic on a shared test bed.
    #[serde(default)]
    pub wire_tx_bytes: Option<PerHostBytes>,
    /// The "agent CPU" column: the agents for ferry, dockerd+containerd+shims for manual.
    pub work_cpu_s: Option<f64>,
    pub work_peak_rss_mb: Option<PerHost>,
    pub agents_cpu_s: Option<f64>,
    /// dockerd + containerd + the benchmarked container's shims, both hosts.
    pub docker_cpu_s: Option<f64>,
    pub gap_ratio_vs_manual: Option<f64>,
    /// How long the client's longest gap went on after the migration had returned (ferry
    /// committed / `docker start` came back): the client only resends when its TCP
    /// retransmission timer fires, and that timer backs off while the container is frozen.
    #[serde(default)]
    pub gap_after_migration_ms: Option<f64>,
    pub migration_start_unix_ms: Option<f64>,
    pub migration_end_unix_ms: Option<f64>,
    /// The machine is shared (other tests, builds): its 1-minute load average when the
    /// migration started and how busy all its CPUs were from then until the client stopped.
    #[serde(default)]
    pub load_avg_1m: Option<f64>,
    #[serde(default)]
    pub machine_busy_pct: Option<f64>,
    pub client: Option<ClientSummary>,
    pub manual: Option<ManualTimings>,
    pub ferry: Option<FerryRun>,
    pub processes: Vec<ProcUsage>,
    pub dir: PathBuf,
}

impl CaseReport {
    fn new(size_mb: u64, case: &str, ip: Ipv4Addr, dir: PathBuf) -> CaseReport {
        CaseReport {
            size_mb,
            case: case.to_string(),
            status: CaseStatus::Failed,
            error: None,
            note: None,
            attempts: 0,
            first_attempt_error: None,
            container: container_name(size_mb, case),
            ip: ip.to_string(),
            keys: 0,
            load_ms: 0.0,
            rss_mb: None,
            target_rss_mb: None,
            connection_kept: None,
            client_gap_ms: None,
            total_ms: None,
            bytes: None,
            wire_tx_bytes: None,
            work_cpu_s: None,
            work_peak_rss_mb: None,
            agents_cpu_s: None,
            docker_cpu_s: None,
            gap_ratio_vs_manual: None,
            gap_after_migration_ms: None,
            migration_start_unix_ms: None,
            migration_end_unix_ms: None,
            load_avg_1m: None,
            machine_busy_pct: None,
            client: None,
            manual: None,
            ferry: None,
            processes: Vec::new(),
            dir,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StrategyStatus {
    pub name: String,
    pub supported: bool,
    /// Why not, or what the probe saw.
    pub note: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BenchReport {
    pub started_unix_ms: u64,
    pub finished_unix_ms: u64,
    pub ferry_exe: PathBuf,
    pub interval_ms: u64,
    /// The `--compress` policy the ferry cases ran with (older reports: auto).
    #[serde(default)]
    pub compress: ferry_proto::Compression,
    pub value_size: u64,
    pub sizes_mb: Vec<u64>,
    pub strategies: Vec<StrategyStatus>,
    pub cases: Vec<CaseReport>,
    /// bench.json, bench.md and the charts.
    pub files: Vec<PathBuf>,
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

pub fn container_name(size_mb: u64, case: &str) -> String {
    let safe: String = case
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("bench-{size_mb}m-{safe}")
}

/// Keys to load so that Redis's RSS reaches about `size_mb`, given its RSS when empty.
pub fn keys_for(size_mb: u64, empty_rss_kib: u64) -> u64 {
    let want = (size_mb * 1024).saturating_sub(empty_rss_kib) * 1024;
    (want / BYTES_PER_KEY).max(1000)
}

/// Bounds that grow with the size: loading runs at ~110 MB/s here, the manual path took
/// ~45 s per GiB in the field notes; both get several times that.
fn load_timeout(size_mb: u64) -> Duration {
    Duration::from_secs(60 + size_mb / 4)
}
fn migrate_timeout(size_mb: u64) -> Duration {
    Duration::from_secs(180 + size_mb / 4)
}
fn step_timeout_s(size_mb: u64) -> u64 {
    (size_mb / 8).max(120)
}

/// Everything a case needs about the test bed.
struct Ctx {
    opts: BenchOptions,
    cfg: TestbedConfig,
    bed: TestbedInfo,
    a: HostInfo,
    b: HostInfo,
    workload: PathBuf,
    procs: Vec<procfs::HostProcs>,
}

async fn bring_up(cfg: &TestbedConfig) -> Result<(TestbedInfo, HostInfo, HostInfo), BenchError> {
    let bed = ferry_testbed::up(cfg)
        .await
        .map_err(|e| BenchError::testbed("bring the test bed up", e))?;
    let host = |n: &str| {
        bed.host(n)
            .cloned()
            .ok_or_else(|| BenchError::failed("bring the test bed up", format!("no host {n}")))
    };
    let (a, b) = (host("a")?, host("b")?);
    Ok((bed, a, b))
}

impl Ctx {
    async fn docker(&self, h: &HostInfo, args: &[&str]) -> Result<String, BenchError> {
        ferry_testbed::docker(h, args).await.map_err(|e| {
            BenchError::testbed(
                format!(
                    "docker {} on host {}",
                    args.first().copied().unwrap_or(""),
                    h.name
                ),
                e,
            )
        })
    }

    /// Best effort: `docker rm -f` on both hosts (absent is fine).
    async fn remove_everywhere(&self, name: &str) {
        for h in [&self.a, &self.b] {
            if let Err(e) = ferry_testbed::docker(h, &["rm", "-f", name]).await {
                let text = e.to_string();
                if !text.contains("No such container") {
                    tracing::warn!(host = %h.name, container = name, error = %text, "cleanup failed");
                }
            }
        }
    }

    /// Removes `bench-*` containers a killed earlier run left behind.
    async fn remove_leftovers(&self) {
        for h in [&self.a, &self.b] {
            let Ok(out) = ferry_testbed::docker(
                h,
                &[
                    "ps",
                    "-a",
                    "--filter",
                    "name=^bench-",
                    "--format",
                    "{{.Names}}",
                ],
            )
            .await
            else {
                continue;
            };
            for name in out
                .lines()
                .map(str::trim)
                .filter(|n| n.starts_with("bench-"))
            {
                tracing::info!(host = %h.name, container = name, "removing a leftover");
                let _ = ferry_testbed::docker(h, &["rm", "-f", name]).await;
            }
        }
    }

    async fn in_client_ns(&self, args: &[&str], timeout: Duration) -> Result<String, BenchError> {
        let step = format!(
            "run {} in {}",
            args.get(1).copied().unwrap_or(""),
            self.bed.client_netns
        );
        ferry_testbed::netns_exec(&self.bed.client_netns, args, timeout)
            .await
            .map_err(|e| BenchError::testbed(step, e))
    }

    /// A fresh Redis on host a at `ip`, answering the client namespace.
    async fn start_redis(&self, name: &str, ip: &str) -> Result<(), BenchError> {
        self.remove_everywhere(name).await;
        self.docker(
            &self.a,
            &[
                "run",
                "-d",
                "--name",
                name,
                "--network",
                &self.bed.macvlan_network,
                "--ip",
                ip,
                &self.bed.redis_image,
            ],
        )
        .await?;
        // The same IP (and so MAC) may have ended on host b in an earlier case: the bridge
        // would keep sending it there until its entry ages out. A fresh ARP from the client
        // makes the container answer from host a, which the bridge learns at once.
        let _ = ferry_testbed::netns_exec(
            &self.bed.client_netns,
            &["ip", "neigh", "flush", "to", ip],
            Duration::from_secs(5),
        )
        .await;
        let addr = format!("{ip}:{}", ferry_testbed::REDIS_PORT);
        let workload = self.workload.to_string_lossy().into_owned();
        let started = Instant::now();
        loop {
            let r = self
                .in_client_ns(
                    &[
                        &workload,
                        "redis-load",
                        "--addr",
                        &addr,
                        "--keys",
                        "0",
                        "--value-size",
                        "1",
                    ],
                    Duration::from_secs(5),
                )
                .await;
            match r {
                Ok(_) => return Ok(()),
                Err(e) if started.elapsed() > REDIS_READY_TIMEOUT => {
                    return Err(BenchError::failed(
                        format!("wait for {name} to answer at {addr}"),
                        format!("not ready after {REDIS_READY_TIMEOUT:?}: {e}"),
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn container_pid(&self, h: &HostInfo, name: &str) -> Result<u32, BenchError> {
        let out = self
            .docker(h, &["inspect", "-f", "{{.State.Pid}}", name])
            .await?;
        out.trim()
            .parse::<u32>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                BenchError::failed(
                    format!("read {name}'s pid on host {}", h.name),
                    format!("not running (pid {:?})", out.trim()),
                )
            })
    }

    /// `eth0` transmit counter of a host, read inside its network namespace.
    async fn tx_bytes(&self, h: &HostInfo) -> Option<u64> {
        ferry_testbed::netns_exec(
            &h.netns,
            &["cat", "/sys/class/net/eth0/statistics/tx_bytes"],
            Duration::from_secs(5),
        )
        .await
        .ok()?
        .trim()
        .parse()
        .ok()
    }

    async fn rss_mb(&self, h: &HostInfo, name: &str) -> Option<f64> {
        let pid = self.container_pid(h, name).await.ok()?;
        procfs::rss_kib(pid).map(|k| k as f64 / 1024.0)
    }

    async fn container_id(&self, h: &HostInfo, name: &str) -> Option<String> {
        self.docker(h, &["inspect", "-f", "{{.Id}}", name])
            .await
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// Tries a strategy on an empty Redis: supported unless preflight refuses it.
    async fn probe(&self, strategy: &str) -> StrategyStatus {
        let ip = PROBE_IP.to_string();
        let res = async {
            self.start_redis(PROBE_NAME, &ip).await?;
            ferry::migrate(&ferry::MigrateArgs {
                ferry_exe: &self.opts.ferry_exe,
                container: PROBE_NAME,
                from: &self.a.agent_addr.to_string(),
                to: &self.b.agent_addr.to_string(),
                tls_dir: &self.bed.client_tls_dir,
                strategy,
                compress: self.opts.compress,
                step_timeout_s: 120,
                timeout: Duration::from_secs(300),
            })
            .await
        }
        .await;
        self.remove_everywhere(PROBE_NAME).await;
        match res {
            Ok(run) => match (run.refused_in_preflight(), run.failure()) {
                (Some(why), _) => StrategyStatus {
                    name: strategy.into(),
                    supported: false,
                    note: why,
                },
                (None, None) => StrategyStatus {
                    name: strategy.into(),
                    supported: true,
                    note: "probe migration of an empty Redis succeeded".into(),
                },
                (None, Some(f)) => StrategyStatus {
                    name: strategy.into(),
                    supported: true,
                    note: format!("probe migration failed after preflight: {f}"),
                },
            },
            Err(e) => StrategyStatus {
                name: strategy.into(),
                supported: true,
                note: format!("probe could not run: {e}"),
            },
        }
    }

    /// One attempt at one case; fills `rep` as it goes so a failure keeps what was measured.
    async fn run_case(&self, rep: &mut CaseReport) -> Result<(), BenchError> {
        let name = rep.container.clone();
        let ip = rep.ip.clone();
        let addr = format!("{ip}:{}", ferry_testbed::REDIS_PORT);
        std::fs::create_dir_all(&rep.dir)
            .map_err(|e| BenchError::io("create the case directory", &rep.dir, e))?;

        // 1. Fresh Redis, loaded to size.
        self.start_redis(&name, &ip).await?;
        let pid = self.container_pid(&self.a, &name).await?;
        let empty = procfs::rss_kib(pid).unwrap_or(0);
        rep.keys = keys_for(rep.size_mb, empty);
        let workload = self.workload.to_string_lossy().into_owned();
        let keys = rep.keys.to_string();
        let vs = VALUE_SIZE.to_string();
        let t = Instant::now();
        self.in_client_ns(
            &[
                &workload,
                "redis-load",
                "--addr",
                &addr,
                "--keys",
                &keys,
                "--value-size",
                &vs,
            ],
            load_timeout(rep.size_mb),
        )
        .await
        .map_err(|e| BenchError::failed(format!("load {name} with {keys} keys"), e.to_string()))?;
        rep.load_ms = t.elapsed().as_secs_f64() * 1000.0;
        rep.rss_mb = procfs::rss_kib(pid).map(|k| k as f64 / 1024.0);
        let source_id = self.container_id(&self.a, &name).await.unwrap_or_default();

        // The manual path's target container is created beforehand, outside the pause.
        let manual_target = if rep.case == MANUAL {
            Some(manual::prepare_target(&self.a, &self.b, &name, &self.bed.macvlan_network).await?)
        } else {
            None
        };

        // 2. The client, with a lead-in so the chart has a baseline.
        let max_run = migrate_timeout(rep.size_mb) + Duration::from_secs(120);
        let mut client = client::Client::start(
            &self.bed.client_netns,
            &self.workload,
            &addr,
            self.opts.interval_ms,
            &rep.dir,
            max_run,
            migrate_timeout(rep.size_mb) + Duration::from_secs(30),
        )?;
        tokio::time::sleep(LEAD_IN).await;
        client.check_running()?;

        // 3. The migration, with the workers sampled throughout.
        rep.load_avg_1m = procfs::loadavg();
        let cpu_before = procfs::cpu_jiffies();
        let tx_before = (self.tx_bytes(&self.a).await, self.tx_bytes(&self.b).await);
        let sampler = procfs::Sampler::start(self.procs.clone());
        rep.migration_start_unix_ms = Some(unix_ms());
        let timeout = migrate_timeout(rep.size_mb);
        let migrated: Result<(), BenchError> = match &manual_target {
            Some((sid, tid, create_ms)) => {
                let step = format!("manual migration of {name}");
                match tokio::time::timeout(
                    timeout,
                    manual::migrate(&self.a, &self.b, &name, sid, tid),
                )
                .await
                {
                    Err(_) => Err(BenchError::Timeout { step, timeout }),
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(mut m)) => {
                        m.create_ms = *create_ms;
                        rep.total_ms = Some(m.total_ms);
                        rep.bytes = Some(m.checkpoint_bytes);
                        rep.manual = Some(m);
                        Ok(())
                    }
                }
            }
            None => {
                let run = ferry::migrate(&ferry::MigrateArgs {
                    ferry_exe: &self.opts.ferry_exe,
                    container: &name,
                    from: &self.a.agent_addr.to_string(),
                    to: &self.b.agent_addr.to_string(),
                    tls_dir: &self.bed.client_tls_dir,
                    strategy: &rep.case,
                    compress: self.opts.compress,
                    step_timeout_s: step_timeout_s(rep.size_mb),
                    timeout,
                })
                .await;
                match run {
                    Err(e) => Err(e),
                    Ok(run) => {
                        let failure = run.failure();
                        if let Some(r) = &run.report {
                            rep.total_ms = Some(r.total_ms as f64);
                            rep.bytes = Some(r.bytes_sent);
                        }
                        let _ = std::fs::write(
                            rep.dir.join("migrate.json"),
                            serde_json::to_vec_pretty(&run).unwrap_or_default(),
                        );
                        rep.ferry = Some(run);
                        match failure {
                            None => Ok(()),
                            Some(f) => Err(BenchError::failed(
                                format!("ferry migrate {name} --strategy {}", rep.case),
                                f,
                            )),
                        }
                    }
                }
            }
        };
        let end = unix_ms();
        rep.migration_end_unix_ms = Some(end);

        // 4. Let the client come back and see the aftermath, then collect everything.
        if migrated.is_ok() && !client.wait_resumed(end, migrate_timeout(rep.size_mb)).await {
            tracing::warn!(container = %name, "the client did not resume after the migration");
        }
        tokio::time::sleep(SETTLE).await;
        let target_id = self.container_id(&self.b, &name).await.unwrap_or_default();
        let usage = sampler.finish(&[source_id, target_id]).await;
        if let (Some(b), Some(a)) = (cpu_before, procfs::cpu_jiffies()) {
            rep.machine_busy_pct = procfs::busy_pct(b, a);
        }
        if let ((Some(a0), Some(b0)), Some(a1), Some(b1)) = (
            tx_before,
            self.tx_bytes(&self.a).await,
            self.tx_bytes(&self.b).await,
        ) {
            rep.wire_tx_bytes = Some(PerHostBytes {
                a: a1.saturating_sub(a0),
                b: b1.saturating_sub(b0),
            });
        }
        let summary = client.stop().await;
        self.record_usage(rep, usage);
        rep.target_rss_mb = self.rss_mb(&self.b, &name).await;
        migrated?;
        let summary = summary?;
        rep.client_gap_ms = Some(summary.max_gap_ms);
        rep.gap_after_migration_ms = gap_after(
            &rep.dir.join("latency.log"),
            &summary,
            rep.migration_end_unix_ms,
        );
        let kept = summary.ok && summary.continuous;
        rep.connection_kept = Some(kept);
        let errors = summary.errors.join("; ");
        rep.client = Some(summary);
        if kept {
            rep.status = CaseStatus::Ok;
        } else {
            // A measured outcome, not a test bed hiccup: recorded, not retried.
            rep.status = CaseStatus::Failed;
            rep.error = Some(format!("client connection not kept: {errors}"));
        }
        Ok(())
    }

    fn record_usage(&self, rep: &mut CaseReport, usage: Vec<ProcUsage>) {
        let sum = |f: &dyn Fn(&ProcUsage) -> bool| {
            usage.iter().filter(|u| f(u)).map(|u| u.cpu_s).sum::<f64>()
        };
        let is_agent = |u: &ProcUsage| u.role == "agent";
        let agents = sum(&is_agent);
        let docker = sum(&|u: &ProcUsage| !is_agent(u));
        let peak = |host: &str, f: &dyn Fn(&ProcUsage) -> bool| {
            usage
                .iter()
                .filter(|u| u.host == host && f(u))
                .map(|u| u.peak_rss_mb)
                .sum::<f64>()
        };
        rep.agents_cpu_s = Some(agents);
        rep.docker_cpu_s = Some(docker);
        if rep.case == MANUAL {
            let f = |u: &ProcUsage| !is_agent(u);
            rep.work_cpu_s = Some(docker);
            rep.work_peak_rss_mb = Some(PerHost {
                a: peak("a", &f),
                b: peak("b", &f),
            });
        } else {
            rep.work_cpu_s = Some(agents);
            rep.work_peak_rss_mb = Some(PerHost {
                a: peak("a", &is_agent),
                b: peak("b", &is_agent),
            });
        }
        rep.processes = usage;
    }
}

/// End of the client's longest gap minus the migration's end (see
/// [`CaseReport::gap_after_migration_ms`]); the log's header anchors client time to wall time.
fn gap_after(log: &Path, summary: &ClientSummary, end_unix_ms: Option<f64>) -> Option<f64> {
    let header = std::fs::read_to_string(log).ok()?;
    let start: f64 = header
        .lines()
        .next()?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("start_unix_ms="))?
        .parse()
        .ok()?;
    let (t, g) = summary
        .gaps_over_100ms
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))?;
    Some(start + t + g - end_unix_ms?)
}

/// manual gap / case gap for every case of a size that has both.
fn fill_ratios(cases: &mut [CaseReport]) {
    let manual: Vec<(u64, f64)> = cases
        .iter()
        .filter(|c| c.case == MANUAL && c.status == CaseStatus::Ok)
        .filter_map(|c| c.client_gap_ms.map(|g| (c.size_mb, g)))
        .collect();
    for c in cases.iter_mut() {
        c.gap_ratio_vs_manual = manual
            .iter()
            .find(|(s, _)| *s == c.size_mb)
            .and_then(|(_, m)| c.client_gap_ms.filter(|g| *g > 0.0).map(|g| m / g));
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), BenchError> {
    let step = "write the benchmark results";
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(|e| BenchError::io(step, &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| BenchError::io(step, path, e))
}

/// bench.json and bench.md, rewritten after every case so an interrupted run keeps its results.
fn write_reports(out_dir: &Path, report: &mut BenchReport) -> Result<(), BenchError> {
    let json = out_dir.join("bench.json");
    let md = out_dir.join("bench.md");
    for p in [&json, &md] {
        if !report.files.contains(p) {
            report.files.push(p.clone());
        }
    }
    let text = serde_json::to_vec_pretty(&report)
        .map_err(|e| BenchError::json("serialise bench.json", e))?;
    write_atomic(&json, &text)?;
    write_atomic(&md, render::markdown(report).as_bytes())
}

/// The latency chart of one size: every case that has a latency log, aligned on its own
/// migration start.
fn write_chart(out_dir: &Path, report: &mut BenchReport, size_mb: u64) -> Result<(), BenchError> {
    let mut series = Vec::new();
    for c in report.cases.iter().filter(|c| c.size_mb == size_mb) {
        let (Some(start), Some(end)) = (c.migration_start_unix_ms, c.migration_end_unix_ms) else {
            continue;
        };
        let log = c.dir.join("latency.log");
        let points = match std::fs::read_to_string(&log) {
            Ok(t) => client::parse_latency_log(&t).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let gap = match (c.connection_kept, c.client_gap_ms) {
            (Some(false), _) => "connection lost".to_string(),
            (_, Some(g)) => format!("gap {g:.0} ms"),
            (_, None) => "failed".into(),
        };
        series.push(Series {
            label: format!("{}: {gap}", c.case),
            points: points
                .iter()
                .map(|p| ((p.unix_ms - start) / 1000.0, p.latency_ms))
                .collect(),
            end_s: Some((end - start) / 1000.0),
        });
    }
    let rss = report
        .cases
        .iter()
        .filter(|c| c.size_mb == size_mb)
        .filter_map(|c| c.rss_mb)
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join("/");
    let svg = svg::latency_chart(
        &format!("Client latency around the migration: Redis {size_mb} MB"),
        &format!(
            "one connection, INCR+SET every {} ms, host a → b; Redis RSS {rss} MB; each line aligned on its own migration start",
            report.interval_ms
        ),
        &series,
    );
    let path = out_dir.join(format!("latency-{size_mb}.svg"));
    write_atomic(&path, svg.as_bytes())?;
    if !report.files.contains(&path) {
        report.files.push(path);
    }
    Ok(())
}

/// Rewrites bench.json, bench.md and every size's chart from `report` (e.g. one read back
/// from an earlier run's bench.json, after a change to the rendering).
pub fn write_outputs(out_dir: &Path, report: &mut BenchReport) -> Result<(), BenchError> {
    let sizes: Vec<u64> = report.sizes_mb.clone();
    for size in sizes {
        if report.cases.iter().any(|c| c.size_mb == size) {
            write_chart(out_dir, report, size)?;
        }
    }
    write_reports(out_dir, report)
}

/// Reads an earlier run's bench.json.
pub fn load_report(out_dir: &Path) -> Result<BenchReport, BenchError> {
    let path = out_dir.join("bench.json");
    let text = std::fs::read(&path).map_err(|e| BenchError::io("read bench.json", &path, e))?;
    serde_json::from_slice(&text).map_err(|e| BenchError::json("parse bench.json", e))
}

/// Runs the benchmark (see the crate docs). Brings the test bed up first (as `ferry testbed
/// up` does, with `opts.ferry_exe`: agents running another build are restarted with it) and
/// removes `bench-*` containers a killed run left. Progress is logged with `tracing`. Fails only when it cannot start or write its
/// results; a case that fails is recorded in the report (`status: failed`, `error`) and the
/// benchmark goes on, after one retry with the test bed repaired (it is shared, and may have
/// been restarted under us).
pub async fn run(opts: BenchOptions) -> Result<BenchReport, BenchError> {
    opts.validate()?;
    std::fs::create_dir_all(&opts.out_dir)
        .map_err(|e| BenchError::io("create the output directory", &opts.out_dir, e))?;
    let workload = workload_exe(&opts.ferry_exe);
    let cfg = TestbedConfig::new(opts.ferry_exe.clone(), workload.clone());
    let (bed, a, b) = bring_up(&cfg).await?;
    let procs = vec![
        procfs::HostProcs::from_info(&a),
        procfs::HostProcs::from_info(&b),
    ];
    let mut ctx = Ctx {
        opts: opts.clone(),
        cfg,
        bed,
        a,
        b,
        workload,
        procs,
    };
    ctx.remove_leftovers().await;

    let names = if opts.strategies.is_empty() {
        ferry::discover_strategies(&opts.ferry_exe).await?
    } else {
        let mut v: Vec<String> = Vec::new();
        for s in &opts.strategies {
            if !v.contains(s) {
                v.push(s.clone());
            }
        }
        v
    };
    let mut strategies = Vec::new();
    for n in &names {
        let st = if n == BASELINE_STRATEGY {
            StrategyStatus {
                name: n.clone(),
                supported: true,
                note: "every build implements it".into(),
            }
        } else {
            tracing::info!(strategy = %n, "probing");
            ctx.probe(n).await
        };
        tracing::info!(strategy = %n, supported = st.supported, note = %st.note, "strategy");
        strategies.push(st);
    }

    let mut report = BenchReport {
        started_unix_ms: unix_ms() as u64,
        finished_unix_ms: 0,
        ferry_exe: opts.ferry_exe.clone(),
        interval_ms: opts.interval_ms,
        compress: opts.compress,
        value_size: VALUE_SIZE,
        sizes_mb: opts.sizes_mb.clone(),
        strategies: strategies.clone(),
        cases: Vec::new(),
        files: Vec::new(),
    };
    let mut next_ip: u8 = 0;
    let mut take_ip = || {
        let ip = Ipv4Addr::new(198, 18, 0, IP_FIRST + next_ip % CASE_IPS);
        next_ip = next_ip.wrapping_add(1);
        ip
    };
    let cases: Vec<(String, Option<String>)> = std::iter::once((MANUAL.to_string(), None))
        .chain(
            strategies
                .iter()
                .map(|s| (s.name.clone(), (!s.supported).then(|| s.note.clone()))),
        )
        .collect();
    for &size in &opts.sizes_mb {
        for (case, unsupported) in &cases {
            let dir = opts.out_dir.join(format!("{size}m-{case}"));
            let mut rep = CaseReport::new(size, case, take_ip(), dir);
            if let Some(why) = unsupported {
                rep.status = CaseStatus::Unsupported;
                rep.note = Some(why.clone());
                report.cases.push(rep);
                continue;
            }
            tracing::info!(size_mb = size, case = %case, ip = %rep.ip, "case starts");
            rep.attempts = 1;
            let mut res = ctx.run_case(&mut rep).await;
            ctx.remove_everywhere(&rep.container).await;
            if let Err(e) = res {
                tracing::warn!(size_mb = size, case = %case, error = %e, "case failed: repairing the test bed and retrying once");
                let first = e.to_string();
                // The test bed is shared: it may have been restarted under us.
                if let Ok((bed, a, b)) = bring_up(&ctx.cfg).await {
                    (ctx.bed, ctx.a, ctx.b) = (bed, a, b);
                }
                rep = CaseReport::new(size, case, take_ip(), rep.dir.clone());
                rep.attempts = 2;
                rep.first_attempt_error = Some(first);
                res = ctx.run_case(&mut rep).await;
                ctx.remove_everywhere(&rep.container).await;
            }
            if let Err(e) = res {
                rep.status = CaseStatus::Failed;
                rep.error = Some(e.to_string());
            }
            tracing::info!(
                size_mb = size,
                case = %case,
                status = ?rep.status,
                gap_ms = ?rep.client_gap_ms,
                total_ms = ?rep.total_ms,
                "case done"
            );
            report.cases.push(rep);
            fill_ratios(&mut report.cases);
            write_reports(&opts.out_dir, &mut report)?;
        }
        write_chart(&opts.out_dir, &mut report, size)?;
    }
    report.finished_unix_ms = unix_ms() as u64;
    write_outputs(&opts.out_dir, &mut report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(size: u64, name: &str, gap: Option<f64>, status: CaseStatus) -> CaseReport {
        let mut c = CaseReport::new(size, name, Ipv4Addr::new(198, 18, 0, 160), PathBuf::new());
        c.client_gap_ms = gap;
        c.status = status;
        c
    }

    #[test]
    fn ratios_are_per_size_and_need_a_good_manual_run() {
        let mut cases = vec![
            case(64, MANUAL, Some(3000.0), CaseStatus::Ok),
            case(64, "stop-and-copy", Some(1500.0), CaseStatus::Ok),
            case(512, MANUAL, Some(20000.0), CaseStatus::Failed),
            case(512, "stop-and-copy", Some(5000.0), CaseStatus::Ok),
            case(64, "pre-copy", None, CaseStatus::Unsupported),
        ];
        fill_ratios(&mut cases);
        let r: Vec<Option<f64>> = cases.iter().map(|c| c.gap_ratio_vs_manual).collect();
        assert_eq!(r, [Some(1.0), Some(2.0), None, None, None]);
    }

    #[test]
    fn keys_and_names() {
        // 64 MiB wanted, 12 MiB already resident: 52 MiB of 1115-byte keys.
        assert_eq!(keys_for(64, 12 * 1024), 52 * 1024 * 1024 / BYTES_PER_KEY);
        assert_eq!(keys_for(16, 20 * 1024), 1000);
        assert_eq!(
            container_name(64, "stop-and-copy"),
            "bench-64m-stop-and-copy"
        );
        assert_eq!(container_name(2048, "x/y z"), "bench-2048m-x-y-z");
    }

    #[test]
    fn gap_after_migration_from_log_header() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("latency.log");
        std::fs::write(&log, "# t_ms latency_ms start_unix_ms=10000.000\n1.0 0.1\n").unwrap();
        let summary = ClientSummary {
            gaps_over_100ms: vec![(500.0, 150.0), (1000.0, 4000.0)],
            ..ClientSummary::default()
        };
        // Longest gap ends at 10000 + 1000 + 4000 = 15000; the migration returned at 14000.
        assert_eq!(gap_after(&log, &summary, Some(14000.0)), Some(1000.0));
        assert_eq!(gap_after(&log, &summary, None), None);
        assert_eq!(gap_after(&d.path().join("none"), &summary, Some(1.0)), None);
    }

    #[test]
    fn options_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let ferry = d.path().join("ferry");
        let mut o = BenchOptions::new(&ferry, d.path().join("out"));
        assert!(
            matches!(o.validate(), Err(BenchError::Options(m)) if m.contains("does not exist"))
        );
        std::fs::write(&ferry, b"").unwrap();
        assert!(
            matches!(o.validate(), Err(BenchError::Options(m)) if m.contains("ferry-workload"))
        );
        std::fs::write(d.path().join("ferry-workload"), b"").unwrap();
        assert!(o.validate().is_ok());
        o.sizes_mb = vec![];
        assert!(o.validate().is_err());
        o.sizes_mb = vec![64];
        o.strategies = vec![MANUAL.into()];
        assert!(o.validate().is_err());
        o.strategies = vec![];
        o.interval_ms = 0;
        assert!(o.validate().is_err());
    }
}
