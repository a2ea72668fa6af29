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
}

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
    if let Ok(bytes) = serde_json::to_vec_pretty(&record) {
        let path = record_path(state_dir, &id);
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
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
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return st.code().unwrap_or(128),
            Ok(None) if std::time::Instant::now() >= deadline => {
                let pgid = child.id() as i32;
                // SAFETY: kill(2) with a negative pid signals the process group we created.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
                let _ = child.wait();
                eprintln!(
                    "ferry runtime: runc restore did not finish within {} s and was killed",
                    limit.as_secs()
                );
                return 124;
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => {
                eprintln!("ferry runtime: waiting for runc: {e}");
                return 127;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
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
