//! Checkpoints a Docker-managed container with the runc that manages it, bypassing
//! `docker checkpoint create` (which copies every image through containerd's content store:
//! 4.6 s where runc takes 0.2–0.5 s for 286 MB, per the field notes).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proc::{quote_log, quote_text, ToolError};

/// How to address one container's runc: binary, state root and bundle, all discovered from the
/// container's containerd shim so nothing about the daemon's layout is assumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncHandle {
    pub binary: String,
    /// `--root` for runc: the shim's runtime root joined with the containerd namespace.
    pub root: PathBuf,
    pub bundle: PathBuf,
    pub id: String,
}

fn parse_ppid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:").and_then(|v| v.trim().parse().ok()))
}

fn discovery_error(message: String) -> ToolError {
    ToolError::Other {
        step: "discover runc".into(),
        message,
        log: vec![],
    }
}

/// Finds the runc managing container `id` whose init process is `pid`: the init's parent is the
/// containerd shim, whose working directory is the bundle; the bundle's `options.json` names
/// the runc binary and root, and its parent directory is the containerd namespace.
pub fn discover_runc(pid: u32, id: &str, default_binary: &str) -> Result<RuncHandle, ToolError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| discovery_error(format!("container process {pid} is not visible: {e}")))?;
    let shim = parse_ppid(&status)
        .ok_or_else(|| discovery_error(format!("no PPid in /proc/{pid}/status")))?;
    let bundle = std::fs::read_link(format!("/proc/{shim}/cwd")).map_err(|e| {
        discovery_error(format!(
            "cannot read the shim's ({shim}) working directory: {e}"
        ))
    })?;
    if !bundle.join("config.json").exists() {
        return Err(discovery_error(format!(
            "the parent of process {pid} (pid {shim}, cwd {}) is not a containerd shim with an OCI bundle; is the agent in the same mount namespace as dockerd?",
            bundle.display()
        )));
    }
    let namespace = bundle
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            discovery_error(format!(
                "bundle path {} has no namespace component",
                bundle.display()
            ))
        })?;
    let (binary, root) = match std::fs::read(bundle.join("options.json")) {
        Ok(bytes) => {
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| discovery_error(format!("{}/options.json: {e}", bundle.display())))?;
            let binary = v
                .get("binary_name")
                .and_then(|b| b.as_str())
                .filter(|b| !b.is_empty())
                .unwrap_or(default_binary);
            let root = v
                .get("root")
                .and_then(|b| b.as_str())
                .filter(|b| !b.is_empty())
                .unwrap_or("/run/containerd/runc");
            (binary.to_string(), PathBuf::from(root))
        }
        Err(_) => (
            default_binary.to_string(),
            PathBuf::from("/run/containerd/runc"),
        ),
    };
    Ok(RuncHandle {
        binary,
        root: root.join(namespace),
        bundle,
        id: id.to_string(),
    })
}

#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    pub image_dir: PathBuf,
    pub work_dir: PathBuf,
    pub tcp_established: bool,
    /// Keep the processes after the dump (they stay frozen if the cgroup was frozen before):
    /// rollback is then an unpause, with no restore on the source.
    pub leave_running: bool,
    pub timeout: Duration,
    /// A CRIU configuration file for this dump only. runc has no flag for most CRIU options and
    /// reads its own configuration host-wide, but the `criu swrk` it starts inherits its
    /// environment, and CRIU reads the file `CRIU_CONFIG_FILE` names before runc's options.
    pub criu_config: Option<PathBuf>,
    /// Pre-copy: the last pre-dump round's image directory, relative to `image_dir` (runc
    /// refuses an absolute one). Pages unchanged since that round stay there, so the dump
    /// writes (or, lazily, serves) only what the container dirtied after it.
    pub parent: Option<String>,
}

/// The variable CRIU reads a configuration file's path from.
pub const CRIU_CONFIG_ENV: &str = "CRIU_CONFIG_FILE";

/// The CRIU configuration line of ferry's `--lazy-pages-read` patch (`patches/criu`): a lazy
/// dump gives its lazy pages only a map and reads each run from the still-frozen tasks when
/// the page server is asked, instead of splicing all of them into pipes while the tasks are
/// frozen, which made the pause grow with the memory. Only for a CRIU whose `criu check
/// --feature lazy_pages_read` passes: any other refuses the unknown option.
pub const LAZY_PAGES_READ_LINE: &str = "lazy-pages-read\n";

/// The CRIU configuration line of a dump that locks the network with nftables: one in-process
/// transaction to lock and one to unlock, where the iptables lock runs `iptables-restore` per
/// family and step (five runs, ~60 ms, in the restore alone). CRIU's restore unlocks with the
/// method the dump recorded, whatever its own configuration says.
pub const NFT_LOCK_LINE: &str = "network-lock nftables\n";

/// `runc checkpoint`. On failure the error quotes CRIU's dump.log and runc's own message.
pub async fn checkpoint(h: &RuncHandle, o: &CheckpointOptions) -> Result<(), ToolError> {
    for d in [&o.image_dir, &o.work_dir] {
        std::fs::create_dir_all(d).map_err(|e| ToolError::Other {
            step: "checkpoint".into(),
            message: format!("cannot create {}: {e}", d.display()),
            log: vec![],
        })?;
    }
    let root = h.root.to_string_lossy().into_owned();
    let image = o.image_dir.to_string_lossy().into_owned();
    let work = o.work_dir.to_string_lossy().into_owned();
    let mut args: Vec<&str> = vec![
        "--root",
        &root,
        "checkpoint",
        "--image-path",
        &image,
        "--work-path",
        &work,
    ];
    if o.tcp_established {
        args.push("--tcp-established");
    }
    if o.leave_running {
        args.push("--leave-running");
    }
    if let Some(p) = &o.parent {
        args.push("--parent-path");
        args.push(p);
    }
    args.push(&h.id);
    let env: Vec<(&str, &std::ffi::OsStr)> = o
        .criu_config
        .iter()
        .map(|c| (CRIU_CONFIG_ENV, c.as_os_str()))
        .collect();
    let out = crate::proc::run_with_env("checkpoint", &h.binary, &args, &env, o.timeout)
        .await
        .map_err(|e| match e {
            ToolError::Timeout {
                step,
                program,
                secs,
                ..
            } => ToolError::Timeout {
                step,
                program,
                secs,
                log: quote_log(&o.work_dir.join("dump.log")),
            },
            other => other,
        })?;
    if out.status != 0 {
        let mut log = quote_log(&o.work_dir.join("dump.log"));
        log.extend(quote_text(&out.stderr));
        return Err(ToolError::Failed {
            step: "checkpoint".into(),
            program: format!("{} checkpoint", h.binary),
            status: format!("exit {}", out.status),
            log,
        });
    }
    Ok(())
}

/// Lists the files of an image directory (CRIU writes a flat one).
pub fn image_files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf, u64, u32)>> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_file() {
            out.push((
                entry.file_name().to_string_lossy().into_owned(),
                entry.path(),
                meta.len(),
                meta.permissions().mode() & 0o7777,
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// A lazy (post-copy) dump in progress: CRIU has dumped everything but memory and serves the
/// pages from its page server until the restored side has them all, then ends the source.
pub struct LazyDump {
    child: tokio::process::Child,
    work_dir: PathBuf,
    pgid: i32,
}

impl LazyDump {
    /// Waits for CRIU to finish serving pages; an error quotes its dump log.
    pub async fn wait_done(&mut self, timeout: Duration) -> Result<(), ToolError> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Err(_) => Err(ToolError::Timeout {
                step: "serve pages".into(),
                program: "runc checkpoint --lazy-pages".into(),
                secs: timeout.as_secs(),
                log: quote_log(&self.work_dir.join("dump.log")),
            }),
            Ok(Err(e)) => Err(ToolError::Other {
                step: "serve pages".into(),
                message: e.to_string(),
                log: vec![],
            }),
            Ok(Ok(st)) if st.success() => Ok(()),
            Ok(Ok(st)) => Err(ToolError::Failed {
                step: "serve pages".into(),
                program: "runc checkpoint --lazy-pages".into(),
                status: st.to_string(),
                log: quote_log(&self.work_dir.join("dump.log")),
            }),
        }
    }

    /// Whether CRIU is still serving pages.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills runc and CRIU (their own process group) and reaps them.
    pub async fn abort(&mut self) {
        // SAFETY: kill(2) on the process group this dump was started in.
        unsafe {
            libc::kill(-self.pgid, libc::SIGKILL);
        }
        let _ = self.child.wait().await;
    }
}

/// Starts `runc checkpoint --lazy-pages --page-server ADDR` and returns once CRIU reports on the
/// status fd that everything but the pages is dumped and the page server is listening.
pub async fn checkpoint_lazy(
    h: &RuncHandle,
    o: &CheckpointOptions,
    page_server: std::net::SocketAddr,
) -> Result<LazyDump, ToolError> {
    use std::os::fd::{AsRawFd, IntoRawFd};
    let other = |message: String| ToolError::Other {
        step: "lazy checkpoint".into(),
        message,
        log: vec![],
    };
    for d in [&o.image_dir, &o.work_dir] {
        std::fs::create_dir_all(d)
            .map_err(|e| other(format!("cannot create {}: {e}", d.display())))?;
    }
    let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| other(format!("pipe: {e}")))?;
    let tx_fd = tx.as_raw_fd();
    let mut cmd = tokio::process::Command::new(&h.binary);
    cmd.arg("--root").arg(&h.root).arg("checkpoint");
    cmd.arg("--image-path")
        .arg(&o.image_dir)
        .arg("--work-path")
        .arg(&o.work_dir);
    cmd.arg("--lazy-pages")
        .arg("--page-server")
        .arg(page_server.to_string());
    cmd.arg("--status-fd").arg(tx_fd.to_string());
    if let Some(c) = &o.criu_config {
        cmd.env(CRIU_CONFIG_ENV, c);
    }
    if o.tcp_established {
        cmd.arg("--tcp-established");
    }
    if let Some(p) = &o.parent {
        cmd.arg("--parent-path").arg(p);
    }
    cmd.arg(&h.id);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd.process_group(0).kill_on_drop(true);
    // SAFETY: only async-signal-safe fcntl between fork and exec, to let runc inherit the
    // status fd (everything else stays close-on-exec).
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(tx_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| ToolError::Spawn {
        step: "lazy checkpoint".into(),
        program: h.binary.clone(),
        source,
    })?;
    drop(tx);
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    let mut dump = LazyDump {
        child,
        work_dir: o.work_dir.clone(),
        pgid,
    };
    let raw = rx.into_raw_fd();
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        // SAFETY: `raw` is the read end we own, moved into this File exactly once.
        let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let mut b = [0u8; 1];
        f.read(&mut b).map(|n| n == 1)
    });
    let ok = match tokio::time::timeout(o.timeout, ready).await {
        Ok(Ok(Ok(true))) => true,
        Ok(_) => false,
        Err(_) => {
            dump.abort().await;
            return Err(ToolError::Timeout {
                step: "lazy checkpoint".into(),
                program: format!("{} checkpoint --lazy-pages", h.binary),
                secs: o.timeout.as_secs(),
                log: quote_log(&o.work_dir.join("dump.log")),
            });
        }
    };
    if !ok {
        let status = dump
            .child
            .wait()
            .await
            .map(|s| s.to_string())
            .unwrap_or_default();
        let mut log = quote_log(&o.work_dir.join("dump.log"));
        if let Some(mut e) = dump.child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let mut s = String::new();
            let _ = e.read_to_string(&mut s).await;
            log.extend(quote_text(&s));
        }
        return Err(ToolError::Failed {
            step: "lazy checkpoint".into(),
            program: format!("{} checkpoint --lazy-pages", h.binary),
            status,
            log,
        });
    }
    Ok(dump)
}

/// CRIU's lazy-pages daemon on the restoring side: it connects to the page server (here, a
/// local end of ferry's tunnel), serves page faults of the restored tasks through
/// userfaultfd, and pushes the remaining pages in the background until all have arrived.
pub struct LazyPagesDaemon {
    child: tokio::process::Child,
    work_dir: PathBuf,
}

impl LazyPagesDaemon {
    pub fn start(
        criu: &str,
        image_dir: &Path,
        work_dir: &Path,
        page_server: std::net::SocketAddr,
    ) -> Result<LazyPagesDaemon, ToolError> {
        std::fs::create_dir_all(work_dir).map_err(|e| ToolError::Other {
            step: "lazy-pages".into(),
            message: format!("cannot create {}: {e}", work_dir.display()),
            log: vec![],
        })?;
        let mut cmd = tokio::process::Command::new(criu);
        cmd.arg("lazy-pages").arg("--page-server");
        cmd.arg("--address")
            .arg(page_server.ip().to_string())
            .arg("--port")
            .arg(page_server.port().to_string());
        cmd.arg("--images-dir")
            .arg(image_dir)
            .arg("--work-dir")
            .arg(work_dir);
        cmd.arg("-v4").arg("--log-file").arg("lazy-pages.log");
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd.kill_on_drop(true);
        let child = cmd.spawn().map_err(|source| ToolError::Spawn {
            step: "lazy-pages".into(),
            program: criu.into(),
            source,
        })?;
        Ok(LazyPagesDaemon {
            child,
            work_dir: work_dir.to_path_buf(),
        })
    }

    /// Waits until the daemon's socket for the restore exists (it appears once the daemon is
    /// connected to the page server), or the daemon died.
    pub async fn wait_socket(&mut self, timeout: Duration) -> Result<(), ToolError> {
        let sock = self.work_dir.join("lazy-pages.socket");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if sock.exists() {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(ToolError::Failed {
                    step: "lazy-pages".into(),
                    program: "criu lazy-pages".into(),
                    status: st.to_string(),
                    log: self.log(),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ToolError::Timeout {
                    step: "lazy-pages".into(),
                    program: "criu lazy-pages".into(),
                    secs: timeout.as_secs(),
                    log: self.log(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for every page to have arrived (the daemon exits 0 then).
    pub async fn wait_done(&mut self, timeout: Duration) -> Result<(), ToolError> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Err(_) => Err(ToolError::Timeout {
                step: "fetch pages".into(),
                program: "criu lazy-pages".into(),
                secs: timeout.as_secs(),
                log: self.log(),
            }),
            Ok(Err(e)) => Err(ToolError::Other {
                step: "fetch pages".into(),
                message: e.to_string(),
                log: vec![],
            }),
            Ok(Ok(st)) if st.success() => Ok(()),
            Ok(Ok(st)) => Err(ToolError::Failed {
                step: "fetch pages".into(),
                program: "criu lazy-pages".into(),
                status: st.to_string(),
                log: self.log(),
            }),
        }
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    pub fn log(&self) -> Vec<String> {
        quote_log(&self.work_dir.join("lazy-pages.log"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppid_parses() {
        assert_eq!(
            parse_ppid("Name:\tredis\nPPid:\t1234\nTracerPid:\t0\n"),
            Some(1234)
        );
        assert_eq!(parse_ppid("Name:\tx\n"), None);
    }

    #[test]
    fn a_process_whose_parent_is_not_a_shim_is_refused() {
        let err = discover_runc(std::process::id(), "x", "runc").unwrap_err();
        assert!(err.to_string().contains("not a containerd shim"), "{err}");
    }
}
