//! Finding and removing whatever a previous (possibly killed) run left behind.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::{TestbedConfig, ALL_HOSTS, BRIDGE_NETNS, CLIENT_NETNS};

const CLIENT_GRACE: Duration = Duration::from_secs(1);
use crate::error::TestbedError;
use crate::topology;

pub(crate) fn read_pidfile(path: &Path) -> Option<i32> {
    fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
}

/// The process's argv joined by spaces, or None if it is gone.
pub(crate) fn cmdline(pid: i32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Alive and not a zombie.
pub(crate) fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name, which may itself contain spaces.
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// A pid from a pid file counts only if the process still looks like the one that wrote it;
/// pids are reused and a stale file must not make us kill a stranger.
pub(crate) fn pidfile_process(path: &Path, markers: &[&str]) -> Option<i32> {
    let pid = read_pidfile(path)?;
    let cl = cmdline(pid)?;
    (alive(pid) && markers.iter().all(|m| cl.contains(m))).then_some(pid)
}

fn netns_pids_sync(ns: &str) -> Vec<i32> {
    // Same comparison `ip netns pids` makes, without spawning it per namespace.
    let Ok(target) = fs::metadata(Path::new("/run/netns").join(ns)) else {
        return Vec::new();
    };
    use std::os::unix::fs::MetadataExt;
    let (dev, ino) = (target.dev(), target.ino());
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(m) = fs::metadata(format!("/proc/{pid}/ns/net")) {
            if m.dev() == dev && m.ino() == ino {
                out.push(pid);
            }
        }
    }
    out
}

/// Container ids that exist in our data roots: their processes live in their own network
/// namespaces and survive the death of their shim, so they are found through their cgroups.
fn our_container_ids(cfg: &TestbedConfig, hosts: &[&str]) -> HashSet<String> {
    let mut ids = HashSet::new();
    for h in hosts {
        let root = cfg.layout(h).data_root();
        // Under userns-remap dockerd keeps its state in `<data-root>/<uid>.<gid>/`.
        let mut dirs = vec![root.join("containers")];
        if let Ok(rd) = fs::read_dir(&root) {
            dirs.extend(
                rd.flatten()
                    .filter(|e| {
                        e.file_name().to_str().is_some_and(|n| {
                            n.split_once('.').is_some_and(|(u, g)| {
                                !u.is_empty()
                                    && !g.is_empty()
                                    && u.bytes().chain(g.bytes()).all(|b| b.is_ascii_digit())
                            })
                        })
                    })
                    .map(|e| e.path().join("containers")),
            );
        }
        for dir in dirs {
            if let Ok(rd) = fs::read_dir(dir) {
                for e in rd.flatten() {
                    if let Some(name) = e.file_name().to_str() {
                        if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                            ids.insert(name.to_string());
                        }
                    }
                }
            }
        }
    }
    ids
}

fn container_pids(ids: &HashSet<String>) -> Vec<i32> {
    let mut out = Vec::new();
    if ids.is_empty() {
        return out;
    }
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cg) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        let hit = cg.lines().any(|line| {
            let path = line.splitn(3, ':').nth(2).unwrap_or("");
            path.split('/').any(|seg| {
                let seg = seg.strip_prefix("docker-").unwrap_or(seg);
                let seg = seg.strip_suffix(".scope").unwrap_or(seg);
                ids.contains(seg)
            })
        });
        if hit {
            out.push(pid);
        }
    }
    out
}

/// Everything that belongs to `hosts` (and, with `shared`, to the bridge and client
/// namespaces): daemons and agents by pid file, anything inside their namespaces, and
/// container processes by cgroup.
pub(crate) fn our_processes(cfg: &TestbedConfig, hosts: &[&str], shared: bool) -> BTreeSet<i32> {
    let mut pids = BTreeSet::new();
    for h in hosts {
        let l = cfg.layout(h);
        let data_root = l.data_root().to_string_lossy().into_owned();
        let exec_root = l.exec_root().to_string_lossy().into_owned();
        let state_dir = l.state_dir().to_string_lossy().into_owned();
        pids.extend(pidfile_process(&l.dockerd_pidfile(), &[&data_root]));
        pids.extend(pidfile_process(&l.containerd_pidfile(), &[&exec_root]));
        pids.extend(pidfile_process(&l.agent_pidfile(), &[&state_dir]));
        pids.extend(netns_pids_sync(&format!("ferry-{h}")));
    }
    if shared {
        pids.extend(netns_pids_sync(CLIENT_NETNS));
        pids.extend(netns_pids_sync(BRIDGE_NETNS));
    }
    pids.extend(container_pids(&our_container_ids(cfg, hosts)));
    let me = std::process::id() as i32;
    pids.retain(|p| *p > 1 && *p != me && alive(*p));
    pids
}

/// Kills everything `our_processes` finds. Twice, because a dying dockerd or shim can still
/// fork a child between the scan and the kill. A polite shutdown would only cost time: every
/// daemon here recovers from an unclean stop.
async fn kill_processes(
    cfg: &TestbedConfig,
    hosts: &[&str],
    shared: bool,
    problems: &mut Vec<String>,
) {
    for _ in 0..2 {
        let pids = our_processes(cfg, hosts, shared);
        if pids.is_empty() {
            break;
        }
        tracing::info!(
            count = pids.len(),
            ?pids,
            ?hosts,
            "killing leftover test bed processes"
        );
        let left = signal_all(&pids, Signal::SIGKILL, Duration::from_secs(10)).await;
        if !left.is_empty() {
            problems.push(format!("processes still alive after SIGKILL: {left:?}"));
        }
    }
}

fn remove_path(path: &Path, problems: &mut Vec<String>) {
    let r = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    if let Err(e) = r {
        if e.kind() != std::io::ErrorKind::NotFound {
            problems.push(format!("remove {}: {e}", path.display()));
        }
    }
}

fn result(step: &str, problems: Vec<String>) -> Result<(), TestbedError> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(TestbedError::unexpected(step, problems.join("; ")))
    }
}

/// Removes one host (processes, namespace, runtime dir) and leaves the rest running, so a
/// crashed host is rebuilt without disturbing the others.
pub(crate) async fn teardown_host(cfg: &TestbedConfig, host: &str) -> Result<(), TestbedError> {
    let mut problems = Vec::new();
    kill_processes(cfg, &[host], false, &mut problems).await;
    let l = cfg.layout(host);
    problems.extend(unmount_leftovers(&[&l.run, &l.dir]));
    topology::destroy_host(host).await;
    if topology::netns_exists(&format!("ferry-{host}")) {
        problems.push(format!("network namespace ferry-{host} still exists"));
    }
    remove_path(&l.run, &mut problems);
    result(&format!("tear down host {host}"), problems)
}

/// Sends `signal` to `pids` and waits until none is alive or `wait` passes; returns survivors.
pub(crate) async fn signal_all(pids: &BTreeSet<i32>, signal: Signal, wait: Duration) -> Vec<i32> {
    for &p in pids {
        match kill(Pid::from_raw(p), signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pid = p, error = %e, ?signal, "kill failed"),
        }
    }
    let deadline = Instant::now() + wait;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Mount points under any of `bases` in our mount namespace, deepest first.
pub(crate) fn mounts_under(mountinfo: &str, bases: &[&Path]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(ferry_criu::mountinfo::unescape_path)
        .filter(|p| bases.iter().any(|b| p.starts_with(b)))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn unmount_leftovers(bases: &[&Path]) -> Vec<String> {
    let mut problems = Vec::new();
    let info = match fs::read_to_string("/proc/self/mountinfo") {
        Ok(s) => s,
        Err(e) => return vec![format!("read /proc/self/mountinfo: {e}")],
    };
    for m in mounts_under(&info, bases) {
        match nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) => problems.push(format!("umount {}: {e}", m.display())),
        }
    }
    problems
}

/// Stops everything and removes runtime state; keeps data roots (images survive) and the PKI.
pub(crate) async fn teardown(cfg: &TestbedConfig) -> Result<(), TestbedError> {
    let mut problems = Vec::new();
    // Test clients get a moment to write their summaries; they stop within ~20 ms of SIGTERM.
    let clients: BTreeSet<i32> = netns_pids_sync(CLIENT_NETNS)
        .into_iter()
        .filter(|p| alive(*p))
        .collect();
    if !clients.is_empty() {
        signal_all(&clients, Signal::SIGTERM, CLIENT_GRACE).await;
    }
    let all: Vec<&str> = ALL_HOSTS.iter().map(|(h, _)| *h).collect();
    kill_processes(cfg, &all, true, &mut problems).await;
    problems.extend(unmount_leftovers(&[&cfg.root, &cfg.run_dir]));
    topology::destroy().await;
    for ns in topology::all_namespaces() {
        if topology::netns_exists(&ns) {
            problems.push(format!("network namespace {ns} still exists"));
        }
    }
    if topology::ctl_link_exists() {
        problems.push("link ferry-ctl still exists".to_string());
    }
    remove_path(&cfg.run_dir, &mut problems);
    remove_path(&cfg.info_path(), &mut problems);
    result("tear down the test bed", problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_filter_is_deepest_first_and_unescaped() {
        let mi = "\
22 1 8:1 / / rw - ext4 /dev/vda rw
30 22 0:5 / /run/ferry-testbed/a/exec/netns/x rw - nsfs nsfs rw
31 22 0:6 / /run/ferry-testbed rw - tmpfs t rw
32 22 0:7 / /var/lib/ferry-testbed/a\\040b rw - tmpfs t rw
33 22 0:8 / /run/ferry-testbedX rw - tmpfs t rw
";
        let got = mounts_under(
            mi,
            &[
                Path::new("/run/ferry-testbed"),
                Path::new("/var/lib/ferry-testbed"),
            ],
        );
        assert_eq!(
            got,
            vec![
                PathBuf::from("/run/ferry-testbed/a/exec/netns/x"),
                PathBuf::from("/var/lib/ferry-testbed/a b"),
                PathBuf::from("/run/ferry-testbed"),
            ]
        );
    }

    #[test]
    fn self_is_alive_and_bogus_pid_is_not() {
        assert!(alive(std::process::id() as i32));
        assert!(!alive(i32::MAX));
        assert!(cmdline(std::process::id() as i32).is_some());
    }
}
