//! The runc-wrapping OCI runtime ferry registers in daemon.json (`"runtimes": {"ferry": ...}`).
//!
//! Docker can start a container from a checkpoint but passes CRIU no options of ours, and the
//! host-wide `/etc/criu/runc.conf` would leak them to every other tool on the host. The wrapper
//! passes every call straight to runc, except a `restore` of a container for which the agent
//! left an overrides file: then it points runc at the agent's own image and work directories
//! (so containerd's copy of the checkpoint stays tiny and CRIU's log survives containerd's
//! cleanup) and adds the CRIU options the migration needs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Per-container restore options, written by the agent before it asks Docker to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreOverrides {
    pub image_path: PathBuf,
    pub work_path: PathBuf,
    pub tcp_established: bool,
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Deadline for runc's restore. A CRIU restore fed bad images can spin forever and wedge
    /// the daemon's start call; past this the wrapper kills runc and CRIU and reports failure.
    #[serde(default = "default_restore_timeout")]
    pub timeout_s: u64,
    /// A CRIU configuration file for this restore only, handed to runc through the bundle's
    /// `org.criu.config` annotation: the one way to give CRIU options runc has no flag for
    /// (`network-lock nftables`) without touching the host-wide `/etc/criu/runc.conf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu_config: Option<PathBuf>,
    /// Wire the network namespace before the restore instead of from Docker's hook inside it
    /// (see [`crate::prewire`]); the source dumped it as external.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prewire: Option<Prewire>,
}

/// How the wrapper wires the namespace and, when parked, when it may go on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prewire {
    /// After wiring, wait for the agent's word on `go_fifo`: Docker's whole start path runs
    /// while the source is still being frozen and dumped, and only CRIU's restore is left.
    pub park: bool,
    pub go_fifo: PathBuf,
    /// Where the wrapper reports what it did (an [`ArmReport`]), once wired.
    pub report: PathBuf,
    /// Longest wait for the word; past it the restore gives up and Docker's start fails.
    pub park_timeout_s: u64,
}

/// The wrapper's account of wiring, for the agent waiting on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmReport {
    /// The namespace was wired ahead (false: Docker sets this container's network up some
    /// other way, and the restore goes on as Docker would run it).
    pub prewired: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Words the agent writes on the go fifo.
pub const GO: u8 = b'g';
pub const ABORT: u8 = b'a';

fn default_restore_timeout() -> u64 {
    90
}

/// What the wrapper saw and did, for the agent to clean up after and to quote on failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRecord {
    /// The directory containerd unpacked its checkpoint copy into (removed by the agent).
    pub original_image_path: Option<String>,
    pub args: Vec<String>,
    pub exit_code: i32,
}

pub fn overrides_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("runtime").join(format!("{id}.json"))
}

pub fn record_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("runtime").join(format!("{id}.result.json"))
}

pub fn criu_config_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("runtime").join(format!("{id}.criu.conf"))
}

pub fn arm_report_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("runtime").join(format!("{id}.armed.json"))
}

pub fn go_fifo_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("runtime").join(format!("{id}.go"))
}

pub fn action_script_path(state_dir: &Path) -> PathBuf {
    state_dir.join("runtime").join("criu-action.sh")
}

/// runc's annotation naming the CRIU configuration file of a container.
const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";

/// The bundle directory of a runc subcommand (`--bundle`/`-b`, else the working directory).
pub fn bundle_dir(args: &[String], sub: usize) -> PathBuf {
    let mut it = args[sub + 1..].iter();
    while let Some(a) = it.next() {
        if a == "--bundle" || a == "-b" {
            if let Some(v) = it.next() {
                return PathBuf::from(v);
            }
        } else if let Some(v) = a.strip_prefix("--bundle=") {
            return PathBuf::from(v);
        }
    }
    PathBuf::from(".")
}

fn read_spec(bundle: &Path) -> Result<serde_json::Value, String> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))
}

/// Rewrites `config.json` whole, by rename, so runc never reads half of it.
fn write_spec(bundle: &Path, spec: &serde_json::Value) -> Result<(), String> {
    let path = bundle.join("config.json");
    let bytes = serde_json::to_vec(spec).map_err(|e| format!("encoding the spec: {e}"))?;
    let tmp = bundle.join(".config.json.ferry");
    std::fs::write(&tmp, bytes).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("replacing {}: {e}", path.display()))
}

fn with_criu_config(spec: &mut serde_json::Value, conf: &Path) -> Result<(), String> {
    let obj = spec
        .as_object_mut()
        .ok_or_else(|| "the spec is not a JSON object".to_string())?;
    let ann = obj
        .entry("annotations")
        .or_insert_with(|| serde_json::json!({}));
    let ann = ann
        .as_object_mut()
        .ok_or_else(|| "the spec's annotations are not an object".to_string())?;
    ann.insert(
        CRIU_CONFIG_ANNOTATION.into(),
        serde_json::Value::String(conf.to_string_lossy().into_owned()),
    );
    Ok(())
}

/// Sets the bundle's `org.criu.config` annotation to `conf`.
pub fn set_criu_config(bundle: &Path, conf: &Path) -> Result<(), String> {
    let mut spec = read_spec(bundle)?;
    with_criu_config(&mut spec, conf)?;
    write_spec(bundle, &spec)
}

/// Wires the bundle's network namespace ahead (see [`crate::prewire`]) and hands CRIU its
/// configuration; None when the bundle has no setkey hook (then only the configuration).
fn prewire_bundle(
    bundle: &Path,
    conf: Option<&Path>,
    timeout: std::time::Duration,
) -> Result<Option<crate::prewire::QuietNetns>, String> {
    let mut spec = read_spec(bundle)?;
    let wired = match crate::prewire::find_setkey_hook(&spec) {
        None => None,
        Some(hook) => {
            let ns = crate::prewire::QuietNetns::create()?;
            crate::prewire::set_key(&hook, &ns.path(), timeout)?;
            let path = ns
                .docker_path(&hook.exec_root)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|| ns.path());
            spec = crate::prewire::prewired_spec(&spec, &path)?;
            Some(ns)
        }
    };
    if let Some(conf) = conf {
        with_criu_config(&mut spec, conf)?;
    }
    if wired.is_some() || conf.is_some() {
        write_spec(bundle, &spec)?;
    }
    Ok(wired)
}

fn write_json_atomic<T: Serialize>(path: &Path, value: &T) {
    if let Ok(bytes) = serde_json::to_vec_pretty(value) {
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

/// Waits for the agent's word on the fifo. Opened read-write, so it never blocks on open and
/// never reads end-of-file while the agent has not written.
fn wait_go(fifo: &Path, limit: std::time::Duration) -> Result<(), String> {
    use std::io::Read;
    use std::os::fd::AsFd;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fifo)
        .map_err(|e| format!("opening {}: {e}", fifo.display()))?;
    let ms = limit.as_millis().min(i32::MAX as u128) as i32;
    let timeout = nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX);
    let mut fds = [nix::poll::PollFd::new(
        f.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    loop {
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) => {
                return Err(format!(
                    "the agent gave no word to restore within {} s",
                    limit.as_secs()
                ))
            }
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("waiting on {}: {e}", fifo.display())),
        }
    }
    let mut b = [0u8; 1];
    match f.read(&mut b) {
        Ok(1) if b[0] == GO => Ok(()),
        Ok(_) => Err("the agent called the restore off".into()),
        Err(e) => Err(format!("reading {}: {e}", fifo.display())),
    }
}

/// runc's global flags that take a value, so the subcommand can be told from their values.
const GLOBAL_WITH_VALUE: &[&str] = &["--root", "--log", "--log-format", "--criu", "--rootless"];

/// Index of the runc subcommand in `args`.
pub fn subcommand_index(args: &[String]) -> Option<usize> {
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a.starts_with('-') {
            if GLOBAL_WITH_VALUE.contains(&a.as_str()) {
                i += 1;
            }
        } else {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Rewrites a `restore` invocation with the overrides; returns the new args and the image path
/// containerd had given.
pub fn rewrite_restore(
    args: &[String],
    sub: usize,
    o: &RestoreOverrides,
) -> (Vec<String>, Option<String>) {
    let mut out: Vec<String> = args[..=sub].to_vec();
    out.extend(o.extra_args.iter().cloned());
    let mut original = None;
    let mut saw_work = false;
    let mut saw_tcp = false;
    let mut i = sub + 1;
    while i < args.len() {
        let a = &args[i];
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        match flag.as_str() {
            "--image-path" | "--work-path" => {
                let value = match inline {
                    Some(v) => v,
                    None => {
                        i += 1;
                        args.get(i).cloned().unwrap_or_default()
                    }
                };
                if flag == "--image-path" {
                    original = Some(value);
                    out.push("--image-path".into());
                    out.push(o.image_path.to_string_lossy().into_owned());
                } else {
                    saw_work = true;
                    out.push("--work-path".into());
                    out.push(o.work_path.to_string_lossy().into_owned());
                }
            }
            "--tcp-established" => {
                saw_tcp = true;
                out.push(a.clone());
            }
            _ => out.push(a.clone()),
        }
        i += 1;
    }
    let id = out.pop();
    if original.is_none() {
        out.push("--image-path".into());
        out.push(o.image_path.to_string_lossy().into_owned());
    }
    if !saw_work {
        out.push("--work-path".into());
        out.push(o.work_path.to_string_lossy().into_owned());
    }
    if o.tcp_established && !saw_tcp {
        out.push("--tcp-established".into());
    }
    if let Some(id) = id {
        out.push(id);
    }
    (out, original)
}

fn find_runc() -> String {
    for p in [
        "/usr/sbin/runc",
        "/usr/bin/runc",
        "/usr/local/sbin/runc",
        "/usr/local/bin/runc",
    ] {
        if Path::new(p).exists() {
            return p.to_string();
        }
    }
    "runc".to_string()
}

/// Entry point of `ferry runtime`: returns the exit code to leave with. Only a restore with
/// overrides is run as a child (to record its result); everything else becomes runc by exec.
pub fn run_wrapper(state_dir: &Path, runc: Option<&str>, args: Vec<String>) -> i32 {
    use std::os::unix::process::CommandExt;
    let runc = runc.map(str::to_string).unwrap_or_else(find_runc);
    let sub = subcommand_index(&args);
    let restore = sub.filter(|&i| args[i] == "restore");
    let overrides = restore.and_then(|_| args.last()).and_then(|id| {
        let bytes = std::fs::read(overrides_path(state_dir, id)).ok()?;
        serde_json::from_slice::<RestoreOverrides>(&bytes)
            .ok()
            .map(|o| (id.clone(), o))
    });
    let (Some(sub), Some((id, o))) = (restore, overrides) else {
        let err = std::process::Command::new(&runc).args(&args).exec();
        eprintln!("ferry runtime: cannot exec {runc}: {err}");
        return 127;
    };
    let (new_args, original) = rewrite_restore(&args, sub, &o);
    let bundle = bundle_dir(&args, sub);
    // Holds the wired namespace open (its path is one of our fds) until runc is done.
    let mut _wired = None;
    if let Some(p) = &o.prewire {
        let limit = std::time::Duration::from_secs(p.park_timeout_s.max(1));
        match prewire_bundle(&bundle, o.criu_config.as_deref(), limit) {
            Ok(ns) => {
                let prewired = ns.is_some();
                if let Some(ns) = &ns {
                    // Without it the pre-resume action opens the namespace itself, slower.
                    if let Err(e) = ns.serve_open(&o.image_path.join(crate::prewire::OPEN_SOCKET)) {
                        eprintln!("ferry runtime: the namespace opener: {e}");
                    }
                }
                _wired = ns;
                write_json_atomic(
                    &p.report,
                    &ArmReport {
                        prewired,
                        error: None,
                    },
                );
            }
            Err(e) => {
                write_json_atomic(
                    &p.report,
                    &ArmReport {
                        prewired: false,
                        error: Some(e.clone()),
                    },
                );
                eprintln!("ferry runtime: cannot wire the network namespace: {e}");
                return 1;
            }
        }
        if p.park {
            if let Err(e) = wait_go(&p.go_fifo, limit) {
                eprintln!("ferry runtime: {e}");
                return 1;
            }
        }
    } else if let Some(conf) = &o.criu_config {
        if let Err(e) = set_criu_config(&bundle, conf) {
            eprintln!("ferry runtime: cannot hand CRIU its configuration: {e}");
            return 1;
        }
    }
    let code = run_with_deadline(
        &runc,
        &new_args,
        std::time::Duration::from_secs(o.timeout_s.max(1)),
    );
    let record = RestoreRecord {
        original_image_path: original,
        args: new_args,
        exit_code: code,
    };
    write_json_atomic(&record_path(state_dir, &id), &record);
    code
}

/// Runs runc in its own process group (CRIU included) and kills the whole group at the deadline.
fn run_with_deadline(runc: &str, args: &[String], limit: std::time::Duration) -> i32 {
    use std::os::unix::process::CommandExt;
    let mut child = match std::process::Command::new(runc)
        .args(args)
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry runtime: cannot run {runc}: {e}");
            return 127;
        }
    };
    // The restore is inside the migration's pause: wait on the child itself, not by polling,
    // and let a watchdog thread enforce the deadline.
    let pgid = child.id() as i32;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(limit) {
            // SAFETY: kill(2) with a negative pid signals the process group we created. Only a
            // kill racing the reap at the very deadline could meet a group whose leader had just
            // exited, and the kernel does not hand that id out again within microseconds.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            return true;
        }
        false
    });
    let status = child.wait();
    let _ = done_tx.send(());
    let killed = watchdog.join().unwrap_or(false);
    match status {
        Ok(_) if killed => {
            eprintln!(
                "ferry runtime: runc restore did not finish within {} s and was killed",
                limit.as_secs()
            );
            124
        }
        Ok(st) => st.code().unwrap_or(128),
        Err(e) => {
            eprintln!("ferry runtime: waiting for runc: {e}");
            127
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn runc_exit_codes_pass_through_and_the_deadline_kills_the_group() {
        let sh = |script: &str| vec!["-c".to_string(), script.to_string()];
        let long = std::time::Duration::from_secs(30);
        assert_eq!(run_with_deadline("/bin/sh", &sh("exit 0"), long), 0);
        assert_eq!(run_with_deadline("/bin/sh", &sh("exit 3"), long), 3);
        // A grandchild in the same group dies with it: the shell waits for it otherwise.
        let short = std::time::Duration::from_millis(200);
        assert_eq!(
            run_with_deadline("/bin/sh", &sh("sleep 30 & wait"), short),
            124
        );
        assert_eq!(run_with_deadline("/nonexistent/runc", &[], long), 127);
    }

    #[test]
    fn the_bundle_is_found_in_every_spelling() {
        assert_eq!(
            bundle_dir(&s(&["--root", "/r", "restore", "--bundle", "/b", "x"]), 2),
            PathBuf::from("/b")
        );
        assert_eq!(
            bundle_dir(&s(&["restore", "-b", "/c", "x"]), 0),
            PathBuf::from("/c")
        );
        assert_eq!(
            bundle_dir(&s(&["restore", "--bundle=/d", "x"]), 0),
            PathBuf::from("/d")
        );
        assert_eq!(bundle_dir(&s(&["restore", "x"]), 0), PathBuf::from("."));
    }

    #[test]
    fn the_criu_config_annotation_is_added_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spec = serde_json::json!({"ociVersion": "1.0.2", "annotations": {"a": "b"}, "process": {"args": ["redis"]}});
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        set_criu_config(dir.path(), Path::new("/s/x.criu.conf")).unwrap();
        let back: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(back["annotations"]["org.criu.config"], "/s/x.criu.conf");
        assert_eq!(back["annotations"]["a"], "b");
        assert_eq!(back["process"], spec["process"]);
        // No annotations at all yet.
        std::fs::write(dir.path().join("config.json"), r#"{"ociVersion":"1"}"#).unwrap();
        set_criu_config(dir.path(), Path::new("/c")).unwrap();
        let back: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(back["annotations"]["org.criu.config"], "/c");
        // A broken spec is named, not overwritten.
        std::fs::write(dir.path().join("config.json"), "not json").unwrap();
        let e = set_criu_config(dir.path(), Path::new("/c")).unwrap_err();
        assert!(e.contains("config.json is not JSON"), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("config.json")).unwrap(),
            "not json"
        );
    }

    #[test]
    fn a_parked_restore_goes_on_the_agents_word_only() {
        let dir = tempfile::tempdir().expect("tmp");
        for (word, ok) in [(Some(GO), true), (Some(ABORT), false), (None, false)] {
            let fifo = dir.path().join("go");
            let _ = std::fs::remove_file(&fifo);
            nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
            let writer = {
                let fifo = fifo.clone();
                std::thread::spawn(move || {
                    if let Some(w) = word {
                        use std::io::Write;
                        // Opened like the agent does: it fails rather than blocks with no reader.
                        loop {
                            let f = std::fs::OpenOptions::new()
                                .write(true)
                                .custom_flags(libc::O_NONBLOCK)
                                .open(&fifo);
                            if let Ok(mut f) = f {
                                f.write_all(&[w]).expect("write");
                                return;
                            }
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                    }
                })
            };
            let res = wait_go(&fifo, std::time::Duration::from_millis(500));
            writer.join().expect("writer");
            assert_eq!(res.is_ok(), ok, "{word:?}: {res:?}");
        }
    }

    #[test]
    fn subcommand_is_found_after_global_flags() {
        assert_eq!(
            subcommand_index(&s(&[
                "--root",
                "/r",
                "--log",
                "/l",
                "--log-format",
                "json",
                "restore",
                "x"
            ])),
            Some(6)
        );
        assert_eq!(
            subcommand_index(&s(&["--systemd-cgroup", "state", "x"])),
            Some(1)
        );
        assert_eq!(subcommand_index(&s(&["--root"])), None);
    }

    #[test]
    fn restore_is_pointed_at_our_images_with_our_options() {
        let o = RestoreOverrides {
            image_path: "/ferry/img".into(),
            work_path: "/ferry/work".into(),
            tcp_established: true,
            extra_args: vec![],
            timeout_s: 90,
            criu_config: None,
            prewire: None,
        };
        let args = s(&[
            "--root",
            "/r",
            "restore",
            "--image-path",
            "/tmp/ctrd-checkpoint1",
            "--work-path",
            "/tmp/w",
            "--bundle",
            "/b",
            "--detach",
            "cid",
        ]);
        let (new, orig) = rewrite_restore(&args, 2, &o);
        assert_eq!(orig.as_deref(), Some("/tmp/ctrd-checkpoint1"));
        assert_eq!(
            new,
            s(&[
                "--root",
                "/r",
                "restore",
                "--image-path",
                "/ferry/img",
                "--work-path",
                "/ferry/work",
                "--bundle",
                "/b",
                "--detach",
                "--tcp-established",
                "cid"
            ])
        );
    }

    #[test]
    fn inline_values_and_missing_flags_are_handled() {
        let o = RestoreOverrides {
            image_path: "/i".into(),
            work_path: "/w".into(),
            tcp_established: false,
            extra_args: vec!["--lazy-pages".into()],
            timeout_s: 90,
            criu_config: None,
            prewire: None,
        };
        let args = s(&["restore", "--image-path=/tmp/c", "--tcp-established", "cid"]);
        let (new, orig) = rewrite_restore(&args, 0, &o);
        assert_eq!(orig.as_deref(), Some("/tmp/c"));
        assert_eq!(
            new,
            s(&[
                "restore",
                "--lazy-pages",
                "--image-path",
                "/i",
                "--tcp-established",
                "--work-path",
                "/w",
                "cid"
            ])
        );
    }
}
