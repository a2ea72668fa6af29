//! Wiring a restored container's network before the pause instead of inside it.
//!
//! Docker 20.10's libnetwork sets a container's network up from a runc prestart hook:
//! `libnetwork-setkey` re-executes dockerd, whose daemon then moves the interfaces into the new
//! namespace and re-executes itself twice more (the IPv6 setting, the embedded DNS's iptables
//! rules). In a restore that hook runs inside CRIU's restore: ~160 ms of the pause here. The
//! runtime wrapper instead makes the namespace itself while the migration is still being
//! prepared, asks dockerd to wire it (the hook's own unix-socket call, so Docker's sandbox
//! state is exactly what the hook would have left), points the bundle at it and drops the hook.
//! CRIU then restores into it as an external namespace, which the source dumped as such.
//!
//! Until the restored sockets exist, the wired namespace holds the container's IP and MAC
//! while the source still runs there: it is kept silent (no ARP answers, filter policies DROP
//! but loopback), so it never answers for the address nor resets a connection it does not know
//! yet. CRIU's `pre-resume` action script ([`unquiet`]) lifts that just before the restored
//! tasks run.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// First argument of Docker's network hook.
pub const SETKEY_ARG: &str = "libnetwork-setkey";
/// runc's name for an external network namespace at checkpoint and restore
/// (`extRoot` + `Net` + `NS`): the dump must use it for runc's restore to hand the namespace in.
pub const EXTERNAL_NETNS_KEY: &str = "extRootNetNS";
/// The hook kinds Docker has put the setkey hook under.
const HOOK_KINDS: [&str; 2] = ["prestart", "createRuntime"];

/// libnetwork's hook, as Docker wrote it into the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetKeyHook {
    pub exec_root: PathBuf,
    pub container_id: String,
    pub controller_id: String,
}

impl SetKeyHook {
    /// The daemon's socket the hook talks to.
    pub fn socket(&self) -> PathBuf {
        self.exec_root
            .join("libnetwork")
            .join(format!("{}.sock", self.controller_id))
    }
}

/// Parses the hook's arguments the way Go's `flag` package does for `-exec-root`
/// (`-exec-root=X`, `--exec-root=X`, `-exec-root X`), then the container and controller ids.
pub fn parse_setkey_args(args: &[String]) -> Option<SetKeyHook> {
    let (first, rest) = args.split_first()?;
    if first != SETKEY_ARG {
        return None;
    }
    let mut exec_root = PathBuf::from("/run/docker");
    let mut positional = Vec::new();
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let flag = a.strip_prefix("--").or_else(|| a.strip_prefix('-'));
        match flag {
            Some(f) if !positional.is_empty() || f.is_empty() => positional.push(a.clone()),
            Some(f) => match f.split_once('=') {
                Some(("exec-root", v)) => exec_root = PathBuf::from(v),
                None if f == "exec-root" => exec_root = PathBuf::from(it.next()?),
                _ => return None,
            },
            None => positional.push(a.clone()),
        }
    }
    match positional.as_slice() {
        [cid, ctrl, ..] if !cid.is_empty() && !ctrl.is_empty() => Some(SetKeyHook {
            exec_root,
            container_id: cid.clone(),
            controller_id: ctrl.clone(),
        }),
        _ => None,
    }
}

/// The setkey hook of an OCI spec, if Docker configures this container's network through one.
pub fn find_setkey_hook(spec: &Value) -> Option<SetKeyHook> {
    let hooks = spec.get("hooks")?;
    HOOK_KINDS.iter().find_map(|kind| {
        hooks.get(kind)?.as_array()?.iter().find_map(|h| {
            let args: Vec<String> = h
                .get("args")?
                .as_array()?
                .iter()
                .map(|a| a.as_str().map(str::to_string))
                .collect::<Option<_>>()?;
            parse_setkey_args(&args)
        })
    })
}

/// The spec with the setkey hook removed and its network namespace set to `netns`.
pub fn prewired_spec(spec: &Value, netns: &str) -> Result<Value, String> {
    let mut out = spec.clone();
    if let Some(hooks) = out.get_mut("hooks").and_then(Value::as_object_mut) {
        for kind in HOOK_KINDS {
            if let Some(list) = hooks.get_mut(kind).and_then(Value::as_array_mut) {
                list.retain(|h| {
                    h.get("args")
                        .and_then(Value::as_array)
                        .and_then(|a| a.first())
                        .and_then(Value::as_str)
                        != Some(SETKEY_ARG)
                });
            }
        }
    }
    let namespaces = out
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
        .ok_or("the spec has no linux.namespaces list")?;
    let net = namespaces
        .iter_mut()
        .find(|n| n.get("type").and_then(Value::as_str) == Some("network"))
        .ok_or("the spec has no network namespace to wire")?;
    let net = net
        .as_object_mut()
        .ok_or("a namespace entry is not an object")?;
    net.insert("path".into(), Value::String(netns.to_string()));
    Ok(out)
}

/// What libnetwork's hook sends the daemon.
#[derive(serde::Serialize)]
struct SetKeyData<'a> {
    #[serde(rename = "ContainerID")]
    container_id: &'a str,
    #[serde(rename = "Key")]
    key: &'a str,
}

/// The daemon's answer when it wired the namespace.
const SETKEY_SUCCESS: &[u8] = b"success";

/// Asks dockerd to wire the namespace at `key` for the hook's container, as the hook would.
pub fn set_key(hook: &SetKeyHook, key: &str, timeout: Duration) -> Result<(), String> {
    let sock = hook.socket();
    let mut c = std::os::unix::net::UnixStream::connect(&sock)
        .map_err(|e| format!("connecting to dockerd's {}: {e}", sock.display()))?;
    c.set_read_timeout(Some(timeout))
        .and_then(|_| c.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{}: {e}", sock.display()))?;
    let body = serde_json::to_vec(&SetKeyData {
        container_id: &hook.container_id,
        key,
    })
    .map_err(|e| format!("encoding the set-key request: {e}"))?;
    c.write_all(&body)
        .map_err(|e| format!("sending the set-key request to {}: {e}", sock.display()))?;
    let mut buf = [0u8; 1024];
    let n = c
        .read(&mut buf)
        .map_err(|e| format!("reading dockerd's set-key answer: {e}"))?;
    if &buf[..n] == SETKEY_SUCCESS {
        Ok(())
    } else {
        Err(format!(
            "dockerd refused to wire the network namespace: {}",
            String::from_utf8_lossy(&buf[..n]).trim()
        ))
    }
}

/// Filter rules that let only loopback through; applied whole, replacing the (empty) table.
const QUIET_RULES: &str = "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT DROP [0:0]\n-A INPUT -i lo -j ACCEPT\n-A OUTPUT -o lo -j ACCEPT\nCOMMIT\n";
/// The kernel's defaults for a new namespace's filter table.
const OPEN_RULES: &str =
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
/// `arp_ignore` 8: answer no ARP request at all; 0 is a new namespace's default.
const ARP_IGNORE_ALL: &str = "8";
const ARP_IGNORE_DEFAULT: &str = "0";
/// An `iptables-restore` of a few lines; it waits for the xtables lock at most this long.
const IPTABLES_TIMEOUT: Duration = Duration::from_secs(10);

fn find_tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs each `tool` (an `*tables-restore`) with its `rules` on stdin, all at once, in the
/// calling thread's network namespace (a child inherits it), each killed past the timeout;
/// an error quotes the failing tool's stderr. Where it opens a namespace at the pre-resume step
/// (the fallback of [`Opener`]) it runs inside the pause, where two one after the other cost
/// ~25 ms here.
fn restore_rules(runs: &[(&str, &str)]) -> Result<(), String> {
    use std::process::{Child, Command, Stdio};
    let mut children: Vec<(&str, Child)> = Vec::new();
    let mut first_err = None;
    for (tool, rules) in runs {
        let path = find_tool(tool);
        let spawned = Command::new(&path)
            .arg("--wait")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                first_err.get_or_insert(format!("running {}: {e}", path.display()));
                continue;
            }
        };
        // Dropping stdin after the write is the end of input the tool waits for.
        if let Some(mut stdin) = child.stdin.take() {
            if let Err(e) = stdin.write_all(rules.as_bytes()) {
                first_err.get_or_insert(format!("feeding {tool}: {e}"));
            }
        }
        children.push((tool, child));
    }
    let deadline = std::time::Instant::now() + IPTABLES_TIMEOUT;
    for (tool, mut child) in children {
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Ok(s),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(format!("{tool} did not finish within {IPTABLES_TIMEOUT:?}"));
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(format!("waiting for {tool}: {e}"));
                }
            }
        };
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                first_err.get_or_insert(format!("{tool} failed ({s}): {}", err.trim()));
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Makes the calling thread's namespace silent: no ARP answers, filter policies DROP but
/// loopback; [`Opener`] undoes it.
fn make_quiet() -> Result<(), String> {
    // /proc/sys shows the network namespace of the thread that opens it.
    let arp = Path::new("/proc/sys/net/ipv4/conf/all/arp_ignore");
    std::fs::write(arp, ARP_IGNORE_ALL).map_err(|e| format!("{}: {e}", arp.display()))?;
    let mut runs = vec![("iptables-restore", QUIET_RULES)];
    if has_ipv6() {
        runs.push(("ip6tables-restore", QUIET_RULES));
    }
    restore_rules(&runs)
}

/// Whether the calling thread's namespace has IPv6, so its quiet rules cover it too.
fn has_ipv6() -> bool {
    Path::new("/proc/thread-self/net/if_inet6").exists()
}

/// How long the kernel may take to answer a netlink batch.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(2);

/// What opening a silenced namespace takes, made ready in it beforehand: the `arp_ignore`
/// file and a netfilter netlink socket, opened by the thread that is in the namespace. The
/// filter tables are opened over netlink (see `crate::nftables`); where a table is not an
/// nftables one (iptables-legacy) or the socket could not be made, `iptables-restore` of
/// `OPEN_RULES` does it, which is right in every case.
struct Opener {
    arp: std::fs::File,
    nl: Option<crate::nftables::NetfilterSocket>,
    ipv6: bool,
}

impl Opener {
    /// In the calling thread's network namespace.
    fn prepare() -> Result<Self, String> {
        let arp_path = "/proc/sys/net/ipv4/conf/all/arp_ignore";
        let arp = std::fs::OpenOptions::new()
            .write(true)
            .open(arp_path)
            .map_err(|e| format!("{arp_path}: {e}"))?;
        let nl = crate::nftables::NetfilterSocket::new(NETLINK_TIMEOUT)
            .map_err(|e| tracing::debug!("a netfilter netlink socket: {e}"))
            .ok();
        Ok(Opener {
            arp,
            nl,
            ipv6: has_ipv6(),
        })
    }

    fn open(&self) -> Result<(), String> {
        use crate::nftables::{Opened, NFPROTO_IPV4, NFPROTO_IPV6};
        use std::os::unix::fs::FileExt;
        self.arp
            .write_at(ARP_IGNORE_DEFAULT.as_bytes(), 0)
            .map_err(|e| format!("arp_ignore: {e}"))?;
        let mut families = vec![(NFPROTO_IPV4, "iptables-restore")];
        if self.ipv6 {
            families.push((NFPROTO_IPV6, "ip6tables-restore"));
        }
        let mut fallback = Vec::new();
        for (family, tool) in families {
            let opened = self.nl.as_ref().map(|nl| nl.open_filter_table(family));
            if !matches!(opened, Some(Ok(Opened::Yes))) {
                fallback.push((tool, OPEN_RULES));
            }
        }
        if fallback.is_empty() {
            return Ok(());
        }
        restore_rules(&fallback)
    }
}

/// A new, silent network namespace held open by this process.
pub struct QuietNetns {
    fd: OwnedFd,
}

impl QuietNetns {
    /// Made on a thread of its own, so this process's own namespace never changes.
    pub fn create() -> Result<Self, String> {
        let worker = std::thread::spawn(|| -> Result<OwnedFd, String> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
            let f = std::fs::File::open("/proc/thread-self/ns/net")
                .map_err(|e| format!("opening the new network namespace: {e}"))?;
            make_quiet()?;
            Ok(OwnedFd::from(f))
        });
        let fd = worker
            .join()
            .map_err(|_| "the namespace thread panicked".to_string())??;
        Ok(QuietNetns { fd })
    }

    /// Serves requests to open this namespace on the unix socket `sock`, from a thread that
    /// lives in the namespace with its netlink socket and `arp_ignore` file ready, so that the
    /// pre-resume action, inside the pause, only asks (~1 ms instead of 20–40 ms of
    /// `iptables-restore` and socket clean-up). The thread and its sockets last as long as
    /// this process: closing the netlink socket after its commit would wait for the kernel's
    /// clean-up, which then happens when the wrapper ends, after the restore.
    pub fn serve_open(&self, sock: &Path) -> Result<(), String> {
        let ns = self
            .fd
            .try_clone()
            .map_err(|e| format!("duplicating the namespace descriptor: {e}"))?;
        match std::fs::remove_file(sock) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("removing a stale {}: {e}", sock.display()))
            }
            _ => {}
        }
        let listener = std::os::unix::net::UnixListener::bind(sock)
            .map_err(|e| format!("binding {}: {e}", sock.display()))?;
        let announced = sock.with_file_name(ANNOUNCED_FILE);
        let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
        std::thread::spawn(move || {
            let ready = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("entering the wired namespace: {e}"))
                .and_then(|()| Opener::prepare());
            let opener = match ready {
                Ok(r) => {
                    let _ = tx.send(Ok(()));
                    r
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            // Closed when this process ends, after the restore: closing them inside the pause
            // would wait for the kernel (see `ferry_net::Announced`).
            let mut sockets = Vec::new();
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { continue };
                let mut b = [0u8; 1];
                if c.read_exact(&mut b).is_err() {
                    continue;
                }
                let answer = match opener.open() {
                    Ok(()) => {
                        sockets.extend(announce_at_resume(&announced));
                        "ok\n".to_string()
                    }
                    Err(e) => format!("{e}\n"),
                };
                let _ = c.write_all(answer.as_bytes());
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| "the namespace opener did not start".to_string())?
    }

    /// A path naming the namespace for as long as this process lives.
    pub fn path(&self) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd())
    }

    pub fn inode(&self) -> Result<u64, String> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.path())
            .map(|m| m.ino())
            .map_err(|e| format!("{}: {e}", self.path()))
    }

    /// Where dockerd bind-mounted the namespace once it wired it (its sandbox key, under
    /// `<exec-root>/netns`): the path that lives exactly as long as Docker's sandbox, so runc's
    /// state of the restored container names it rather than an fd of this short-lived process
    /// (runc reads that path again at the container's next checkpoint).
    pub fn docker_path(&self, exec_root: &Path) -> Option<PathBuf> {
        let ino = self.inode().ok()?;
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        find_nsfs_mount(&info, ino, &exec_root.join("netns"))
    }
}

/// The mount point under `under` of the network namespace `ino`, from a mountinfo table.
pub fn find_nsfs_mount(mountinfo: &str, ino: u64, under: &Path) -> Option<PathBuf> {
    let want_root = format!("net:[{ino}]");
    mountinfo.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        let fstype = fields.get(sep + 1)?;
        let (root, point) = (fields.get(3)?, fields.get(4)?);
        if *fstype != "nsfs" || *root != want_root {
            return None;
        }
        let point = crate::mountinfo::unescape_path(point);
        point.starts_with(under).then_some(point)
    })
}

/// Lifts the silence from the network namespace of `pid` (the restored container's init).
pub fn unquiet(pid: u32) -> Result<(), String> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|e| format!("opening the network namespace of {pid}: {e}"))?;
    std::thread::spawn(move || -> Result<(), String> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering the network namespace of {pid}: {e}"))?;
        Opener::prepare()?.open()
    })
    .join()
    .map_err(|_| "the namespace thread panicked".to_string())?
}

/// Environment CRIU gives an action script.
pub const SCRIPT_ACTION_ENV: &str = "CRTOOLS_SCRIPT_ACTION";
pub const SCRIPT_INIT_PID_ENV: &str = "CRTOOLS_INIT_PID";
/// The restore's image directory, as a path through CRIU's own descriptor of it.
pub const SCRIPT_IMAGE_DIR_ENV: &str = "CRTOOLS_IMAGE_DIR";
/// The unix socket, in the restore's image directory, on which the runtime wrapper that wired
/// the namespace opens it when the pre-resume action asks (see [`QuietNetns::serve_open`]).
pub const OPEN_SOCKET: &str = "ferry-open.sock";
/// Written by the pre-resume action into the restore's image directory once the namespace is
/// open: the wall-clock time (Unix milliseconds) at which CRIU was about to resume the tasks.
/// `docker start` returns well after that (CRIU's exit, runc's and containerd's answers), so
/// this is what says how much of it the container was really down for.
pub const RESUMED_FILE: &str = "ferry-resumed-at-ms";
/// Written by the namespace's opener into the restore's image directory once it has announced
/// the container's addresses at the resume: one `interface address` line per announcement.
pub const ANNOUNCED_FILE: &str = "ferry-announced-at-resume";
/// How long the action waits for the wrapper to open the namespace.
const OPEN_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The action at which the wired namespace is opened: every socket is restored and CRIU's own
/// lock is off, and no restored task runs yet.
pub const UNQUIET_ACTION: &str = "pre-resume";

/// The action script CRIU runs at every step of the restore: a shell filter, so the steps that
/// are not ours cost one `sh` each rather than a start of ferry.
pub fn action_script(ferry: &Path) -> String {
    format!(
        "#!/bin/sh\n[ \"${SCRIPT_ACTION_ENV}\" = {UNQUIET_ACTION} ] || exit 0\nexec '{}' runtime --criu-action\n",
        ferry.display().to_string().replace('\'', "'\\''")
    )
}

/// `ferry runtime --criu-action`: what to do for the action CRIU names in the environment.
/// The wrapper that wired the namespace opens it when asked on [`OPEN_SOCKET`] in the image
/// directory; without that socket (an older wrapper, or a path too long to bind) the action
/// opens the namespace itself, 20–40 ms slower.
pub fn run_action(
    action: Option<&str>,
    init_pid: Option<&str>,
    image_dir: Option<&str>,
) -> Result<(), String> {
    if action != Some(UNQUIET_ACTION) {
        return Ok(());
    }
    let opened = match image_dir.and_then(|dir| ask_open(&Path::new(dir).join(OPEN_SOCKET))) {
        Some(answer) => answer,
        None => {
            let pid: u32 = init_pid
                .ok_or(format!("CRIU gave no {SCRIPT_INIT_PID_ENV}"))?
                .parse()
                .map_err(|e| format!("{SCRIPT_INIT_PID_ENV} is not a pid: {e}"))?;
            unquiet(pid)
        }
    };
    if let (Ok(()), Some(dir)) = (&opened, image_dir) {
        // Only a measurement: the restore must not fail for want of it.
        let _ = stamp_resumed(Path::new(dir));
    }
    opened
}

fn stamp_resumed(dir: &Path) -> std::io::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(std::io::Error::other)?;
    std::fs::write(
        dir.join(RESUMED_FILE),
        format!("{:.3}\n", now.as_secs_f64() * 1000.0),
    )
}

/// Announces the opened namespace's addresses (see [`ferry_net::announce_all_here`]) and
/// records which in `file`. Only ever a head start: the agent announces them again once
/// `docker start` has returned, so a failure here is logged, not fatal. The sockets it sent on
/// come back to be closed after the pause.
fn announce_at_resume(file: &Path) -> Option<ferry_net::Announced> {
    match ferry_net::announce_all_here() {
        Ok(announced) => {
            let text: String = announced
                .sent
                .iter()
                .map(|(iface, ip)| format!("{iface} {ip}\n"))
                .collect();
            let _ = std::fs::write(file, text);
            Some(announced)
        }
        Err(e) => {
            tracing::warn!("announcing the addresses at the resume: {e}");
            None
        }
    }
}

/// What the namespace's opener announced at the resume of the restore from `images`, as
/// `interface:address`.
pub fn announced_at_resume(images: &Path) -> Vec<String> {
    std::fs::read_to_string(images.join(ANNOUNCED_FILE))
        .map(|t| {
            t.lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(i, a)| format!("{i}:{a}"))
                .collect()
        })
        .unwrap_or_default()
}

/// When the pre-resume action of the restore from `images` ran (Unix milliseconds), if it did.
pub fn resumed_at(images: &Path) -> Option<f64> {
    std::fs::read_to_string(images.join(RESUMED_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|ms: &f64| ms.is_finite() && *ms > 0.0)
}

/// Asks the wrapper on `sock` to open the namespace; None when no wrapper listens there.
fn ask_open(sock: &Path) -> Option<Result<(), String>> {
    let mut c = std::os::unix::net::UnixStream::connect(sock).ok()?;
    let asked = (|| -> std::io::Result<String> {
        c.set_read_timeout(Some(OPEN_ANSWER_TIMEOUT))?;
        c.write_all(b"o")?;
        let mut answer = String::new();
        c.read_to_string(&mut answer)?;
        Ok(answer)
    })();
    Some(match asked {
        Ok(a) if a.trim() == "ok" => Ok(()),
        Ok(a) => Err(format!(
            "the runtime wrapper could not open the namespace: {}",
            a.trim()
        )),
        Err(e) => Err(format!(
            "asking the runtime wrapper on {}: {e}",
            sock.display()
        )),
    })
}

/// The CRIU configuration line that dumps the container's network namespace as external, for
/// a restore into a namespace the target wired beforehand.
pub fn external_netns_line(netns_inode: u64) -> String {
    format!("external net[{netns_inode}]:{EXTERNAL_NETNS_KEY}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn setkey_arguments_parse_in_every_spelling_go_accepts() {
        let want = |root: &str| SetKeyHook {
            exec_root: PathBuf::from(root),
            container_id: "c1".into(),
            controller_id: "977a87ec5da8".into(),
        };
        let table: [(&[&str], Option<SetKeyHook>); 7] = [
            (
                &[SETKEY_ARG, "-exec-root=/run/x", "c1", "977a87ec5da8"],
                Some(want("/run/x")),
            ),
            (
                &[SETKEY_ARG, "--exec-root=/run/x", "c1", "977a87ec5da8"],
                Some(want("/run/x")),
            ),
            (
                &[SETKEY_ARG, "-exec-root", "/run/x", "c1", "977a87ec5da8"],
                Some(want("/run/x")),
            ),
            (
                &[SETKEY_ARG, "c1", "977a87ec5da8"],
                Some(want("/run/docker")),
            ),
            (&[SETKEY_ARG, "c1"], None),
            (&[SETKEY_ARG, "-bogus=1", "c1", "977a87ec5da8"], None),
            (&["something-else", "c1", "977a87ec5da8"], None),
        ];
        for (args, expected) in table {
            assert_eq!(parse_setkey_args(&s(args)), expected, "{args:?}");
        }
    }

    fn docker_spec() -> Value {
        json!({
            "hooks": {"prestart": [
                {"path": "/usr/bin/other", "args": ["other"]},
                {"path": "/proc/10743/exe", "args": [SETKEY_ARG, "-exec-root=/run/b/exec", "c1", "977a87ec5da8"]}
            ]},
            "linux": {"namespaces": [{"type": "mount"}, {"type": "network"}, {"type": "pid"}]},
            "annotations": {"keep": "me"}
        })
    }

    #[test]
    fn the_hook_is_found_and_replaced_by_the_wired_namespace() {
        let spec = docker_spec();
        let hook = find_setkey_hook(&spec).expect("hook");
        assert_eq!(
            hook.socket(),
            PathBuf::from("/run/b/exec/libnetwork/977a87ec5da8.sock")
        );
        let out = prewired_spec(&spec, "/proc/1/fd/5").expect("rewrite");
        assert_eq!(find_setkey_hook(&out), None);
        assert_eq!(out["hooks"]["prestart"].as_array().map(Vec::len), Some(1));
        assert_eq!(out["hooks"]["prestart"][0]["args"][0], "other");
        assert_eq!(out["linux"]["namespaces"][1]["path"], "/proc/1/fd/5");
        assert_eq!(out["linux"]["namespaces"][0].get("path"), None);
        assert_eq!(out["annotations"]["keep"], "me");
    }

    #[test]
    fn a_spec_without_a_network_namespace_is_refused() {
        let spec = json!({"linux": {"namespaces": [{"type": "mount"}]}});
        assert!(prewired_spec(&spec, "/x").is_err());
        assert_eq!(find_setkey_hook(&spec), None);
    }

    #[test]
    fn set_key_speaks_libnetworks_protocol() {
        let dir = tempfile::tempdir().expect("tmp");
        let hook = SetKeyHook {
            exec_root: dir.path().to_path_buf(),
            container_id: "c1".into(),
            controller_id: "ctl".into(),
        };
        std::fs::create_dir_all(dir.path().join("libnetwork")).expect("mkdir");
        for (answer, ok) in [
            (&b"success"[..], true),
            (&b"no sandbox present for c1"[..], false),
        ] {
            let l = std::os::unix::net::UnixListener::bind(hook.socket()).expect("bind");
            let server = std::thread::spawn(move || {
                let (mut c, _) = l.accept().expect("accept");
                let mut buf = [0u8; 1280];
                let n = c.read(&mut buf).expect("read");
                c.write_all(answer).expect("write");
                serde_json::from_slice::<Value>(&buf[..n]).expect("json")
            });
            let res = set_key(&hook, "/proc/7/ns/net", Duration::from_secs(5));
            let got = server.join().expect("server");
            assert_eq!(got, json!({"ContainerID": "c1", "Key": "/proc/7/ns/net"}));
            assert_eq!(res.is_ok(), ok, "{res:?}");
            if !ok {
                assert!(res.unwrap_err().contains("no sandbox present"));
            }
            std::fs::remove_file(hook.socket()).expect("rm");
        }
    }

    /// Quiet and open in a namespace of its own, as the target does; needs root and iptables
    /// (the test bed's hosts and CI have both), and says so rather than pass without them.
    #[test]
    fn a_quiet_namespace_is_opened_again_over_netlink() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: a_quiet_namespace_is_opened_again_over_netlink checks nothing");
            return;
        }
        let policies = || -> String {
            let out = std::process::Command::new(find_tool("iptables"))
                .args(["-w", "-S"])
                .output()
                .expect("iptables -S");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            make_quiet().expect("quiet");
            assert!(policies().contains("-P INPUT DROP"), "{}", policies());
            // The netlink path alone opens it: no iptables-restore fallback in this check.
            assert_eq!(
                crate::nftables::NetfilterSocket::new(Duration::from_secs(2))
                    .expect("netlink socket")
                    .open_filter_table(crate::nftables::NFPROTO_IPV4)
                    .expect("netlink"),
                crate::nftables::Opened::Yes
            );
            let p = policies();
            assert!(p.contains("-P INPUT ACCEPT") && !p.contains("DROP"), "{p}");
            assert!(!p.contains("-A "), "rules left: {p}");
            make_quiet().expect("quiet again");
            Opener::prepare().expect("prepare").open().expect("open");
            let p = policies();
            assert!(p.contains("-P OUTPUT ACCEPT") && !p.contains("DROP"), "{p}");
            let arp = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/arp_ignore")
                .expect("arp_ignore");
            assert_eq!(arp.trim(), ARP_IGNORE_DEFAULT);
        })
        .join()
        .expect("the namespace thread failed");
    }

    /// The wrapper's opener, asked as CRIU's action asks: the namespace it holds is open
    /// afterwards, and the action never touched it itself (it was given no pid to enter).
    #[test]
    fn the_action_has_the_wrapper_open_the_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: the_action_has_the_wrapper_open_the_namespace checks nothing");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let ns = QuietNetns::create().expect("quiet namespace");
        let policies = |ns: &QuietNetns| -> String {
            let fd = ns.fd.try_clone().expect("dup");
            std::thread::spawn(move || {
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let out = std::process::Command::new(find_tool("iptables"))
                    .args(["-w", "-S"])
                    .output()
                    .expect("iptables -S");
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .join()
            .expect("thread")
        };
        assert!(policies(&ns).contains("-P INPUT DROP"));
        ns.serve_open(&dir.path().join(OPEN_SOCKET)).expect("serve");
        let images = dir.path().to_string_lossy().into_owned();
        assert_eq!(resumed_at(dir.path()), None, "nothing resumed yet");
        for round in 0..2 {
            assert_eq!(
                run_action(Some(UNQUIET_ACTION), None, Some(&images)),
                Ok(()),
                "round {round}"
            );
            let at = resumed_at(dir.path()).expect("the action stamps the resume");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs_f64()
                * 1000.0;
            assert!(at <= now && now - at < 60_000.0, "stamped {at}, now {now}");
            let p = policies(&ns);
            assert!(
                p.contains("-P INPUT ACCEPT") && !p.contains("DROP") && !p.contains("-A "),
                "{p}"
            );
        }
    }

    #[test]
    fn a_resume_stamp_is_read_only_when_it_is_a_time() {
        let dir = tempfile::tempdir().expect("tmp");
        for (text, want) in [
            ("1796642168501.192\n", Some(1796642168501.192)),
            ("0\n", None),
            ("soon", None),
            ("NaN", None),
        ] {
            std::fs::write(dir.path().join(RESUMED_FILE), text).expect("write");
            assert_eq!(resumed_at(dir.path()), want, "{text:?}");
        }
    }

    #[test]
    fn only_the_pre_resume_action_does_anything() {
        assert_eq!(run_action(None, None, None), Ok(()));
        assert_eq!(run_action(Some("network-unlock"), Some("1"), None), Ok(()));
        assert!(run_action(Some(UNQUIET_ACTION), None, None).is_err());
        assert!(run_action(Some(UNQUIET_ACTION), Some("x"), Some("/nonexistent")).is_err());
        let script = action_script(Path::new("/opt/fer'ry"));
        assert!(script.contains("= pre-resume ] || exit 0"));
        assert!(script.contains("exec '/opt/fer'\\''ry' runtime --criu-action"));
    }

    #[test]
    fn dockers_bind_mount_of_the_namespace_is_found_in_mountinfo() {
        let info = "\
24 1 0:22 / / rw,relatime - ext4 /dev/vda rw
610 24 0:4 net:[4026532577] /run/other/netns/x rw shared:5 - nsfs nsfs rw
611 24 0:4 net:[4026532999] /run/b\\040x/exec/netns/1a2b3c4d5e6f rw shared:5 - nsfs nsfs rw
612 24 0:4 net:[4026532577] /run/b\\040x/exec/netns/0a0b0c0d0e0f rw - nsfs nsfs rw
";
        let under = Path::new("/run/b x/exec/netns");
        assert_eq!(
            find_nsfs_mount(info, 4026532577, under),
            Some(PathBuf::from("/run/b x/exec/netns/0a0b0c0d0e0f"))
        );
        assert_eq!(find_nsfs_mount(info, 4026532000, under), None);
        assert_eq!(
            find_nsfs_mount(info, 4026532577, Path::new("/run/elsewhere")),
            None
        );
    }

    #[test]
    fn the_external_netns_line_uses_runcs_key() {
        assert_eq!(
            external_netns_line(4026532577),
            "external net[4026532577]:extRootNetNS\n"
        );
    }
}
