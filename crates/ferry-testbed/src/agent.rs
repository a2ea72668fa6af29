//! The PKI and one `ferry agent` per host, started inside its dockerd's network and mount
//! namespaces so it sees the daemon's container mounts and binds on the host's address.

use std::fs;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cleanup::{alive, pidfile_process};
use crate::cmd::{self, command};
use crate::config::{HostInfo, TestbedConfig, NO_AGENTS_ENV};
use crate::dockerd::{detach, log_tail, open_log, DAEMON_PATH};
use crate::error::TestbedError;

const PKI_TIMEOUT: Duration = Duration::from_secs(60);
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(5);

/// While `ferry agent`/`ferry pki` do not exist yet, the rest of the test bed can still be used.
pub(crate) fn agents_optional() -> bool {
    std::env::var(NO_AGENTS_ENV).is_ok_and(|v| v == "1")
}

const IDENTITY_FILES: [&str; 3] = ["ca.pem", "cert.pem", "key.pem"];

/// Every agent's and the CLI's identity directory holds Docker-layout TLS files.
pub(crate) fn pki_complete(cfg: &TestbedConfig, hosts: &[HostInfo]) -> bool {
    let client = cfg.pki_dir().join("client");
    hosts
        .iter()
        .map(|h| h.tls_dir.as_path())
        .chain(std::iter::once(client.as_path()))
        .all(|d| IDENTITY_FILES.iter().all(|f| d.join(f).is_file()))
}

/// Runs `ferry pki init` unless every identity exists; the command reuses an existing CA and
/// only adds what is missing (e.g. host c on a later run).
pub(crate) async fn ensure_pki(
    cfg: &TestbedConfig,
    hosts: &[HostInfo],
) -> Result<(), TestbedError> {
    if pki_complete(cfg, hosts) {
        return Ok(());
    }
    let step = "create the test bed PKI";
    let pki = cfg.pki_dir();
    let mut args: Vec<String> = vec!["--dir".into(), pki.to_string_lossy().into_owned()];
    for h in hosts {
        args.push("--agent".into());
        args.push(format!("{}={}", h.name, h.ip));
    }
    let with_init: Vec<String> = ["pki", "init"]
        .iter()
        .map(|s| s.to_string())
        .chain(args.iter().cloned())
        .collect();
    match cmd::run(step, command(&cfg.ferry_exe, &with_init), PKI_TIMEOUT).await {
        Ok(_) => {}
        // Some builds of the CLI spell it `ferry pki --dir ...` without the `init` verb.
        Err(TestbedError::Command { stderr, .. })
            if stderr.contains("unexpected argument 'init'") =>
        {
            let plain: Vec<String> = std::iter::once("pki".to_string()).chain(args).collect();
            cmd::run(step, command(&cfg.ferry_exe, &plain), PKI_TIMEOUT).await?;
        }
        Err(e) => return Err(e),
    }
    if !pki_complete(cfg, hosts) {
        return Err(TestbedError::unexpected(
            step,
            format!("`ferry pki` succeeded but some identity under {} lacks ca.pem, cert.pem or key.pem", pki.display()),
        ));
    }
    Ok(())
}

pub(crate) async fn listening(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

fn agent_pid(cfg: &TestbedConfig, host: &HostInfo) -> Option<i32> {
    let state = host.state_dir.to_string_lossy().into_owned();
    pidfile_process(&cfg.layout(&host.name).agent_pidfile(), &[&state])
}

/// The agent runs the current `ferry_exe`: same file (device and inode) as its executable, so
/// a rebuilt or differently configured binary gets a fresh agent on the next `up`.
pub(crate) fn runs_current_binary(cfg: &TestbedConfig, host: &HostInfo) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(pid) = agent_pid(cfg, host) else {
        return false;
    };
    match (
        fs::metadata(format!("/proc/{pid}/exe")),
        fs::metadata(&cfg.ferry_exe),
    ) {
        (Ok(running), Ok(wanted)) => running.dev() == wanted.dev() && running.ino() == wanted.ino(),
        _ => false,
    }
}

/// SIGTERM, then SIGKILL after a grace period; a missing agent is not an error.
pub(crate) async fn stop(cfg: &TestbedConfig, host: &HostInfo) -> Result<(), TestbedError> {
    let step = format!("stop the agent on host {}", host.name);
    let pidfile = cfg.layout(&host.name).agent_pidfile();
    if let Some(pid) = agent_pid(cfg, host) {
        let p = Pid::from_raw(pid);
        match kill(p, Signal::SIGTERM) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                return Err(TestbedError::unexpected(
                    &step,
                    format!("SIGTERM {pid}: {e}"),
                ))
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        while alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if alive(pid) {
            tracing::warn!(host = %host.name, pid, "agent ignored SIGTERM, killing it");
            let _ = kill(p, Signal::SIGKILL);
            let deadline = Instant::now() + STOP_GRACE;
            while alive(pid) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if alive(pid) {
                return Err(TestbedError::unexpected(
                    &step,
                    format!("agent {pid} survived SIGKILL"),
                ));
            }
        }
    }
    match fs::remove_file(&pidfile) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TestbedError::io(&step, pidfile, e)),
    }
}

/// Starts the agent and waits until its port accepts connections from the root namespace.
pub(crate) async fn start(cfg: &TestbedConfig, host: &HostInfo) -> Result<i32, TestbedError> {
    let step = format!("start the agent on host {}", host.name);
    let l = cfg.layout(&host.name);
    let data_root = host.data_root.to_string_lossy().into_owned();
    let dockerd = pidfile_process(&l.dockerd_pidfile(), &[&data_root]).ok_or_else(|| {
        TestbedError::Precondition {
            step: step.clone(),
            detail: format!("dockerd of host {} is not running", host.name),
        }
    })?;
    fs::create_dir_all(&host.state_dir).map_err(|e| TestbedError::io(&step, &host.state_dir, e))?;
    let log = open_log(&step, &host.agent_log, "ferry agent")?;
    let log2 = log
        .try_clone()
        .map_err(|e| TestbedError::io(&step, &host.agent_log, e))?;
    let target = dockerd.to_string();
    let listen = host.agent_addr.to_string();
    let mut c = command("nsenter", &["--target", &target, "--net", "--mount", "--"]);
    c.arg(&cfg.ferry_exe)
        .args(["agent", "--listen", &listen, "--tls-dir"])
        .arg(&host.tls_dir)
        .arg("--state-dir")
        .arg(&host.state_dir)
        .arg("--tune-host")
        .env("DOCKER_HOST", &host.docker_host)
        .env("RUST_LOG", "info")
        .env("PATH", DAEMON_PATH)
        .kill_on_drop(false)
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    detach(&mut c);
    let desc = cmd::describe(&c);
    let mut child = c.spawn().map_err(|source| TestbedError::Spawn {
        step: step.clone(),
        cmd: desc,
        source,
    })?;
    // nsenter without --pid execs in place, so this is the agent's own pid.
    let pid = child
        .id()
        .ok_or_else(|| TestbedError::unexpected(&step, "agent exited before its pid was known"))?;
    let pidfile = l.agent_pidfile();
    fs::write(&pidfile, format!("{pid}\n")).map_err(|e| TestbedError::io(&step, &pidfile, e))?;
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let _ = fs::remove_file(&pidfile);
            return Err(TestbedError::NotReady {
                step,
                what: format!("agent on {listen}"),
                waited: started.elapsed(),
                detail: format!("exited with {status}; log: {}", log_tail(&host.agent_log)),
            });
        }
        if listening(host.agent_addr).await {
            tracing::info!(host = %host.name, pid, elapsed_ms = started.elapsed().as_millis() as u64, "agent listening");
            return Ok(pid as i32);
        }
        if started.elapsed() > LISTEN_TIMEOUT {
            return Err(TestbedError::NotReady {
                step,
                what: format!("agent on {listen}"),
                waited: started.elapsed(),
                detail: format!("port not accepting; log: {}", log_tail(&host.agent_log)),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
