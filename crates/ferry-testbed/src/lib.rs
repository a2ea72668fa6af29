//! A local multi-host Docker test bed in network namespaces.
//!
//! Two (optionally three) "Docker hosts" on one machine: each is a network namespace with its
//! own dockerd (own data root, exec root, socket) and a ferry agent, all on one L2 segment
//! (`198.18.0.0/24`) together with a client namespace and the root namespace. A container on
//! the `ferrynet` macvlan network keeps its address wherever it runs, which is what a live
//! migration needs to keep TCP connections.
//!
//! ```text
//!  ferry-a 198.18.0.1 ─┐
//!  ferry-b 198.18.0.2 ─┤
//! (ferry-c 198.18.0.3)─┼─ br0 in netns ferry-br
//!  ferry-client .50 ───┤
//!  root ns ferry-ctl .10
//! ```
//!
//! [`up`] converges to that state from anything (nothing, a healthy test bed, or the debris of
//! a killed run); [`down`] removes it but keeps data roots (so images survive) and the PKI.

mod agent;
mod cleanup;
mod cmd;
mod config;
mod dockerd;
mod error;
mod images;
mod topology;

use std::fs;
use std::time::{Duration, Instant};

use futures::future::{join_all, try_join_all};
use nix::fcntl::{Flock, FlockArg};

pub use config::{
    HostInfo, TestbedConfig, TestbedInfo, AGENT_PORT, BRIDGE_NETNS, BRIDGE_NETWORK, BRIDGE_SUBNET,
    CLIENT_IP, CLIENT_NETNS, CTL_IFACE, CTL_IP, MACVLAN_GATEWAY, MACVLAN_IP_RANGE, MACVLAN_NETWORK,
    MACVLAN_SUBNET, NO_AGENTS_ENV, POSTGRES_IMAGE, POSTGRES_PORT, REDIS_IMAGE, REDIS_PORT,
    WORKLOAD_IMAGE, WORKLOAD_PORT,
};
pub use dockerd::DOCKER_CLI;
pub use error::TestbedError;

/// Serialises `up`, `down` and agent restarts across threads and processes (parallel tests).
async fn lock(cfg: &TestbedConfig) -> Result<Flock<fs::File>, TestbedError> {
    let step = "lock the test bed";
    fs::create_dir_all(&cfg.root).map_err(|e| TestbedError::io(step, &cfg.root, e))?;
    let path = cfg.lock_path();
    // std opens with O_CLOEXEC, so daemons started while the lock is held do not inherit it.
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| TestbedError::io(step, &path, e))?;
    tokio::task::spawn_blocking(move || Flock::lock(file, FlockArg::LockExclusive))
        .await
        .map_err(|e| TestbedError::unexpected(step, format!("lock task failed: {e}")))?
        .map_err(|(_, errno)| TestbedError::io(step, path, errno.into()))
}

fn preflight(cfg: &TestbedConfig) -> Result<(), TestbedError> {
    let step = "check test bed prerequisites";
    let fail = |detail: String| {
        Err(TestbedError::Precondition {
            step: step.into(),
            detail,
        })
    };
    if !nix::unistd::geteuid().is_root() {
        return fail("must run as root (namespaces, mounts, dockerd)".into());
    }
    if !cfg.workload_exe.is_file() {
        return fail(format!(
            "workload binary {} does not exist",
            cfg.workload_exe.display()
        ));
    }
    if !agent::agents_optional() && !cfg.ferry_exe.is_file() {
        return fail(format!(
            "ferry binary {} does not exist",
            cfg.ferry_exe.display()
        ));
    }
    if !std::path::Path::new(DOCKER_CLI).is_file() {
        return fail(format!("{DOCKER_CLI} does not exist"));
    }
    Ok(())
}

/// Absolute, symlink-free binary paths: they are baked into the runtime scripts and agent
/// command lines, and compared with running agents' executables.
fn canonical(cfg: &TestbedConfig) -> TestbedConfig {
    let mut c = cfg.clone();
    for p in [&mut c.ferry_exe, &mut c.workload_exe] {
        if let Ok(abs) = fs::canonicalize(&*p) {
            *p = abs;
        }
    }
    c
}

fn mark(path: &std::path::Path) -> Result<(), TestbedError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| TestbedError::io("write a ready marker", dir, e))?;
    }
    fs::write(path, b"").map_err(|e| TestbedError::io("write a ready marker", path, e))
}

/// Keeps a healthy host as it is; rebuilds an unhealthy one (namespace, dockerd, no
/// containers) without touching the other hosts.
async fn ensure_host(cfg: &TestbedConfig, host: &HostInfo) -> Result<(), TestbedError> {
    let marker = cfg.layout(&host.name).ready_marker();
    if topology::netns_exists(&host.netns) && marker.is_file() && dockerd::healthy(cfg, host).await
    {
        return Ok(());
    }
    tracing::info!(host = %host.name, "host not running: rebuilding it");
    cleanup::teardown_host(cfg, &host.name).await?;
    topology::create_host(&host.name, host.ip).await?;
    dockerd::start(cfg, host).await?;
    dockerd::reset(host).await?;
    mark(&marker)
}

/// Failures tolerated only under `FERRY_TESTBED_NO_AGENTS=1`.
fn agent_failure(e: TestbedError) -> Result<(), TestbedError> {
    if agent::agents_optional() {
        tracing::warn!(error = %e, "{NO_AGENTS_ENV}=1: continuing without agents");
        Ok(())
    } else {
        Err(e)
    }
}

async fn ensure_agent(cfg: &TestbedConfig, host: &HostInfo) -> Result<(), TestbedError> {
    if agent::runs_current_binary(cfg, host) && agent::listening(host.agent_addr).await {
        return Ok(());
    }
    agent::stop(cfg, host).await?;
    agent::start(cfg, host).await.map(|_| ())
}

fn write_info(cfg: &TestbedConfig, info: &TestbedInfo) -> Result<(), TestbedError> {
    let step = "write testbed.json";
    let path = cfg.info_path();
    let text = serde_json::to_string_pretty(info).map_err(|source| TestbedError::Json {
        step: step.into(),
        path: path.clone(),
        source,
    })?;
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, text).map_err(|e| TestbedError::io(step, &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| TestbedError::io(step, &path, e))
}

/// Brings the test bed up, or checks that it is and returns quickly.
///
/// Whatever is unhealthy is rebuilt, and only that: a missing bridge, client namespace or
/// root link means everything left by an earlier run is killed and removed first; a host
/// whose namespace or dockerd is gone is torn down and rebuilt alone, its fresh dockerd
/// starting without containers or volumes; images, networks, PKI and agents are checked and
/// repaired individually (an agent also when it runs an older build of `ferry_exe`).
/// A running host `c` is left alone when `with_incompatible_host` is false.
pub async fn up(cfg: &TestbedConfig) -> Result<TestbedInfo, TestbedError> {
    let cfg = &canonical(cfg);
    preflight(cfg)?;
    let _lock = lock(cfg).await?;
    let started = Instant::now();
    let info = cfg.expected_info();

    if !(topology::shared_exists() && cfg.shared_marker().is_file()) {
        tracing::info!("segment not running: tearing down leftovers and starting over");
        cleanup::teardown(cfg).await?;
        topology::create_shared().await?;
        mark(&cfg.shared_marker())?;
    }
    try_join_all(info.hosts.iter().map(|h| ensure_host(cfg, h))).await?;

    for h in info.hosts.iter().filter(|h| h.compatible) {
        dockerd::write_runtime_script(cfg, h)?;
    }
    let specs = images::specs(cfg).await?;
    if !images::images_ok(&info.hosts, &specs).await {
        images::ensure(&info.hosts, &specs).await?;
    }
    try_join_all(info.hosts.iter().map(|h| async move {
        if dockerd::networks_ok(h).await {
            Ok(())
        } else {
            dockerd::ensure_networks(h).await
        }
    }))
    .await?;

    match agent::ensure_pki(cfg, &info.hosts).await {
        Ok(()) => {
            for r in join_all(info.hosts.iter().map(|h| ensure_agent(cfg, h))).await {
                if let Err(e) = r {
                    agent_failure(e)?;
                }
            }
        }
        Err(e) => agent_failure(e)?,
    }

    write_info(cfg, &info)?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "test bed up"
    );
    Ok(info)
}

/// Kills every test bed process (daemons, shims, containers, agents, anything in our
/// namespaces), unmounts leftovers and removes namespaces, veths, runtime dirs and
/// testbed.json. Works on a half-built or crashed test bed; keeps data roots and the PKI.
pub async fn down(cfg: &TestbedConfig) -> Result<(), TestbedError> {
    let _lock = lock(cfg).await?;
    cleanup::teardown(cfg).await
}

/// Reads the description written by the last successful [`up`].
pub async fn load_info(cfg: &TestbedConfig) -> Result<TestbedInfo, TestbedError> {
    let step = "read testbed.json";
    let path = cfg.info_path();
    let text = tokio::fs::read_to_string(&path)
        .await
        .map_err(|e| TestbedError::io(step, &path, e))?;
    serde_json::from_str(&text).map_err(|source| TestbedError::Json {
        step: step.into(),
        path,
        source,
    })
}

fn find_host<'a>(info: &'a TestbedInfo, host: &str) -> Result<&'a HostInfo, TestbedError> {
    info.host(host)
        .ok_or_else(|| TestbedError::UnknownHost(host.to_string()))
}

/// Stops the host's agent (if running) and starts a fresh one; returns once it listens.
pub async fn restart_agent(
    cfg: &TestbedConfig,
    info: &TestbedInfo,
    host: &str,
) -> Result<(), TestbedError> {
    let h = find_host(info, host)?;
    let _lock = lock(cfg).await?;
    agent::stop(cfg, h).await?;
    agent::start(cfg, h).await.map(|_| ())
}

/// Stops the host's agent, e.g. to test what ferry does when an agent is unreachable.
pub async fn stop_agent(
    cfg: &TestbedConfig,
    info: &TestbedInfo,
    host: &str,
) -> Result<(), TestbedError> {
    let h = find_host(info, host)?;
    let _lock = lock(cfg).await?;
    agent::stop(cfg, h).await
}

/// Runs `/usr/bin/docker -H <host's socket> <args>` (5 min timeout); returns stdout.
pub async fn docker(host: &HostInfo, args: &[&str]) -> Result<String, TestbedError> {
    let step = format!(
        "docker {} on host {}",
        args.first().copied().unwrap_or(""),
        host.name
    );
    dockerd::docker_run(&step, host, args).await
}

/// A command that runs `program` inside network namespace `netns` (via `ip netns exec`), for
/// background processes such as a workload client; set args and stdio, then spawn it.
pub fn netns_command(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("ip");
    c.args(["netns", "exec", netns])
        .arg(program)
        .stdin(std::process::Stdio::null());
    c
}

/// Runs `args[0] args[1..]` inside `netns` and returns its stdout; fails on a non-zero exit
/// or when `timeout` passes (the command is then killed).
pub async fn netns_exec(
    netns: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<String, TestbedError> {
    let (program, rest) = args
        .split_first()
        .ok_or_else(|| TestbedError::Precondition {
            step: format!("run a command in {netns}"),
            detail: "empty command".into(),
        })?;
    let mut c = netns_command(netns, program);
    c.args(rest).kill_on_drop(true);
    cmd::run(&format!("run {program} in {netns}"), c, timeout).await
}
