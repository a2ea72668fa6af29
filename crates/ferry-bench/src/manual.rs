//! The baseline: what an operator can do today with Docker alone (the field notes' "manual
//! docker checkpoint path"), reproduced step by step so ferry is compared with the real thing:
//!
//! 1. beforehand, not part of the pause: `docker create` on the target with the same name,
//!    image, network, `--ip` and `--mac-address`;
//! 2. `docker checkpoint create <c> cp1` on the source (default checkpoint dir, container exits);
//! 3. copy `<a data root>/containers/<id>/checkpoints/cp1` into the target container's
//!    `checkpoints/` (both data roots are plain directories in the root namespace here);
//! 4. `docker start --checkpoint cp1 <c>` on the target.
//!
//! Docker has no switch for established TCP connections, so an operator puts
//! `tcp-established` into `/etc/criu/runc.conf`; that file is host-wide, so it exists only for
//! the duration of the manual case ([`CriuConf`]) and never while a ferry case runs.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_testbed::HostInfo;
use serde::{Deserialize, Serialize};

use crate::error::BenchError;

pub const CHECKPOINT: &str = "cp1";
pub const CRIU_CONF: &str = "/etc/criu/runc.conf";
/// First line of the config we write (CRIU skips `#` lines): a file that starts with it was
/// left by a benchmark that was killed mid-case, and is removed rather than "restored".
const CONF_MARKER: &str =
    "# written by ferry-bench for the manual docker checkpoint path; removed when that case ends";
const CTRD_PREFIX: &str = "ctrd-checkpoint";

/// Timings and sizes of one manual migration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ManualTimings {
    /// `docker create` on the target, done before the pause (not part of `total_ms`).
    pub create_ms: f64,
    pub checkpoint_ms: f64,
    pub copy_ms: f64,
    pub start_ms: f64,
    /// checkpoint + copy + start: the operator's migration, the container down throughout.
    pub total_ms: f64,
    pub checkpoint_bytes: u64,
    pub checkpoint_files: u64,
    /// `/tmp/ctrd-checkpoint*` copies of this checkpoint that containerd left and we removed.
    pub ctrd_copies_removed: u64,
    pub source_id: String,
    pub target_id: String,
}

/// Installs `tcp-established` as `/etc/criu/runc.conf` and puts back whatever was there
/// (or nothing) on [`CriuConf::restore`] or drop, so an early return cannot leave the
/// host-wide option behind.
pub struct CriuConf {
    path: PathBuf,
    previous: Option<Vec<u8>>,
    created_dir: bool,
    restored: bool,
}

impl CriuConf {
    pub fn install() -> Result<CriuConf, BenchError> {
        Self::install_at(Path::new(CRIU_CONF))
    }

    pub fn install_at(path: &Path) -> Result<CriuConf, BenchError> {
        let step = "write the CRIU config for the manual path";
        let dir = path
            .parent()
            .ok_or_else(|| BenchError::failed(step, "config path has no parent"))?;
        let created_dir = !dir.exists();
        if created_dir {
            fs::create_dir_all(dir).map_err(|e| BenchError::io(step, dir, e))?;
        }
        let previous = match fs::read(path) {
            Ok(b) if b.starts_with(CONF_MARKER.as_bytes()) => {
                tracing::warn!(
                    "{} was left by a killed benchmark: replacing it",
                    path.display()
                );
                None
            }
            Ok(b) => Some(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(BenchError::io(step, path, e)),
        };
        let guard = CriuConf {
            path: path.to_path_buf(),
            previous,
            created_dir,
            restored: false,
        };
        fs::write(path, format!("{CONF_MARKER}\ntcp-established\n"))
            .map_err(|e| BenchError::io(step, path, e))?;
        Ok(guard)
    }

    pub fn restore(mut self) -> Result<(), BenchError> {
        self.restore_inner()
    }

    fn restore_inner(&mut self) -> Result<(), BenchError> {
        if self.restored {
            return Ok(());
        }
        self.restored = true;
        let step = "restore the CRIU config after the manual path";
        match &self.previous {
            Some(b) => fs::write(&self.path, b).map_err(|e| BenchError::io(step, &self.path, e))?,
            None => match fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(BenchError::io(step, &self.path, e)),
            },
        }
        if self.created_dir {
            if let Some(dir) = self.path.parent() {
                // Only if empty: someone may have put something there meanwhile.
                let _ = fs::remove_dir(dir);
            }
        }
        Ok(())
    }
}

impl Drop for CriuConf {
    fn drop(&mut self) {
        if let Err(e) = self.restore_inner() {
            tracing::error!(error = %e, "could not restore {}", self.path.display());
        }
    }
}

/// `(name, size)` of every regular file directly in `dir`: a fingerprint of a checkpoint.
fn listing(dir: &Path) -> io::Result<BTreeSet<(String, u64)>> {
    let mut out = BTreeSet::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let md = e.metadata()?;
        if md.is_file() {
            out.insert((e.file_name().to_string_lossy().into_owned(), md.len()));
        }
    }
    Ok(out)
}

/// Names of the `ctrd-checkpoint*` directories in `tmp`.
pub fn ctrd_dirs(tmp: &Path) -> BTreeSet<String> {
    fs::read_dir(tmp)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(CTRD_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the `ctrd-checkpoint*` dirs that appeared since `before` and hold exactly the
/// files of `checkpoint` (same names and sizes): copies of *our* checkpoint. Another user's
/// migration running at the same time on this test bed leaves its own copies, which differ
/// and stay untouched.
pub fn remove_ctrd_copies(
    tmp: &Path,
    before: &BTreeSet<String>,
    checkpoint: &Path,
) -> Result<u64, BenchError> {
    let step = "remove containerd's checkpoint copies";
    let ours = listing(checkpoint).map_err(|e| BenchError::io(step, checkpoint, e))?;
    let mut removed = 0;
    for name in ctrd_dirs(tmp).difference(before) {
        let dir = tmp.join(name);
        if listing(&dir).is_ok_and(|l| l == ours) {
            fs::remove_dir_all(&dir).map_err(|e| BenchError::io(step, &dir, e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Total size and file count of a directory tree.
pub fn tree_size(dir: &Path) -> io::Result<(u64, u64)> {
    let (mut bytes, mut files) = (0, 0);
    for e in fs::read_dir(dir)? {
        let e = e?;
        let md = fs::symlink_metadata(e.path())?;
        if md.is_dir() {
            let (b, f) = tree_size(&e.path())?;
            bytes += b;
            files += f;
        } else {
            bytes += md.len();
            files += 1;
        }
    }
    Ok((bytes, files))
}

/// Plain recursive copy keeping permissions: what `cp -a` of a checkpoint does here.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    fs::set_permissions(to, fs::metadata(from)?.permissions())?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let md = fs::symlink_metadata(&src)?;
        if md.is_dir() {
            copy_tree(&src, &dst)?;
        } else if md.file_type().is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
        } else {
            fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

fn docker_err(step: &str, e: ferry_testbed::TestbedError) -> BenchError {
    BenchError::testbed(step, e)
}

/// `docker inspect` of one container as JSON.
pub async fn inspect(host: &HostInfo, name: &str) -> Result<serde_json::Value, BenchError> {
    let step = format!("inspect {name} on host {}", host.name);
    let out = ferry_testbed::docker(host, &["inspect", name])
        .await
        .map_err(|e| docker_err(&step, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| BenchError::json(&step, e))?;
    v.as_array()
        .and_then(|a| a.first())
        .cloned()
        .ok_or_else(|| BenchError::failed(step, "inspect returned no container"))
}

/// Step 1 (before the pause): the target container, created like the source.
pub async fn prepare_target(
    a: &HostInfo,
    b: &HostInfo,
    name: &str,
    network: &str,
) -> Result<(String, String, f64), BenchError> {
    let c = inspect(a, name).await?;
    let step = format!("read {name}'s identity on host a");
    let field = |v: &serde_json::Value| v.as_str().map(str::to_string);
    let source_id = field(&c["Id"]).ok_or_else(|| BenchError::failed(&step, "no Id"))?;
    let image =
        field(&c["Config"]["Image"]).ok_or_else(|| BenchError::failed(&step, "no image"))?;
    let net = &c["NetworkSettings"]["Networks"][network];
    let ip = field(&net["IPAddress"])
        .filter(|s| !s.is_empty())
        .ok_or_else(|| BenchError::failed(&step, format!("not on network {network}")))?;
    let mac = field(&net["MacAddress"])
        .filter(|s| !s.is_empty())
        .ok_or_else(|| BenchError::failed(&step, format!("no MAC on {network}")))?;
    let started = Instant::now();
    let create_step = format!("docker create {name} on host {}", b.name);
    let out = ferry_testbed::docker(
        b,
        &[
            "create",
            "--name",
            name,
            "--network",
            network,
            "--ip",
            &ip,
            "--mac-address",
            &mac,
            &image,
        ],
    )
    .await
    .map_err(|e| docker_err(&create_step, e))?;
    let target_id = out.trim().to_string();
    if target_id.is_empty() {
        return Err(BenchError::failed(create_step, "no container id printed"));
    }
    Ok((source_id, target_id, ms(started)))
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Steps 2–4, with the CRIU config in place only while they run.
pub async fn migrate(
    a: &HostInfo,
    b: &HostInfo,
    name: &str,
    source_id: &str,
    target_id: &str,
) -> Result<ManualTimings, BenchError> {
    let tmp = std::env::temp_dir();
    let before = ctrd_dirs(&tmp);
    let src = a
        .data_root
        .join("containers")
        .join(source_id)
        .join("checkpoints")
        .join(CHECKPOINT);
    let dst = b
        .data_root
        .join("containers")
        .join(target_id)
        .join("checkpoints")
        .join(CHECKPOINT);
    let conf = CriuConf::install()?;
    let started = Instant::now();

    let t = Instant::now();
    let step = format!(
        "docker checkpoint create {name} {CHECKPOINT} on host {}",
        a.name
    );
    ferry_testbed::docker(a, &["checkpoint", "create", name, CHECKPOINT])
        .await
        .map_err(|e| docker_err(&step, e))?;
    let checkpoint_ms = ms(t);

    let t = Instant::now();
    let (s2, d2) = (src.clone(), dst.clone());
    tokio::task::spawn_blocking(move || copy_tree(&s2, &d2))
        .await
        .map_err(|e| BenchError::failed("copy the checkpoint", format!("copy task failed: {e}")))?
        .map_err(|e| BenchError::io("copy the checkpoint to host b", &src, e))?;
    let copy_ms = ms(t);

    let t = Instant::now();
    let step = format!(
        "docker start --checkpoint {CHECKPOINT} {name} on host {}",
        b.name
    );
    ferry_testbed::docker(b, &["start", "--checkpoint", CHECKPOINT, name])
        .await
        .map_err(|e| docker_err(&step, e))?;
    let start_ms = ms(t);
    let total_ms = ms(started);
    conf.restore()?;

    let (checkpoint_bytes, checkpoint_files) =
        tree_size(&dst).map_err(|e| BenchError::io("measure the checkpoint", &dst, e))?;
    let ctrd_copies_removed = remove_ctrd_copies(&tmp, &before, &dst)?;
    Ok(ManualTimings {
        create_ms: 0.0,
        checkpoint_ms,
        copy_ms,
        start_ms,
        total_ms,
        checkpoint_bytes,
        checkpoint_files,
        ctrd_copies_removed,
        source_id: source_id.to_string(),
        target_id: target_id.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_conf_restores_previous_content_or_absence() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("criu").join("runc.conf");
        {
            let g = CriuConf::install_at(&p).unwrap();
            let text = fs::read_to_string(&p).unwrap();
            assert!(text.ends_with("\ntcp-established\n"), "{text}");
            assert!(text.starts_with('#'), "{text}");
            g.restore().unwrap();
        }
        assert!(!p.exists());
        assert!(!p.parent().unwrap().exists(), "created dir removed again");

        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, "log-file /x\n").unwrap();
        {
            let _g = CriuConf::install_at(&p).unwrap();
            assert!(fs::read_to_string(&p).unwrap().contains("tcp-established"));
            // dropped without restore(): still put back
        }
        assert_eq!(fs::read_to_string(&p).unwrap(), "log-file /x\n");

        // A killed run's leftover is not "previous content": it goes away.
        fs::write(&p, format!("{CONF_MARKER}\ntcp-established\n")).unwrap();
        CriuConf::install_at(&p).unwrap().restore().unwrap();
        assert!(!p.exists());
    }

    #[test]
    fn removes_only_new_copies_of_our_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        let tmp = d.path().join("tmp");
        let cp = d.path().join("cp1");
        for dir in [&tmp, &cp] {
            fs::create_dir_all(dir).unwrap();
        }
        fs::write(cp.join("pages-1.img"), vec![1u8; 100]).unwrap();
        fs::write(cp.join("inventory.img"), b"inv").unwrap();
        let old = tmp.join("ctrd-checkpoint1");
        copy_tree(&cp, &old).unwrap();
        let before = ctrd_dirs(&tmp);
        let ours = tmp.join("ctrd-checkpoint2");
        copy_tree(&cp, &ours).unwrap();
        let theirs = tmp.join("ctrd-checkpoint3");
        fs::create_dir_all(&theirs).unwrap();
        fs::write(theirs.join("pages-1.img"), vec![1u8; 99]).unwrap();
        fs::write(tmp.join("unrelated"), b"x").unwrap();

        assert_eq!(remove_ctrd_copies(&tmp, &before, &cp).unwrap(), 1);
        assert!(old.exists(), "existed before: not ours to judge");
        assert!(!ours.exists());
        assert!(theirs.exists(), "different checkpoint: someone else's");
        assert_eq!(tree_size(&cp).unwrap(), (103, 2));
    }

    #[test]
    fn copy_tree_keeps_content_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("s");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub").join("f"), b"hello").unwrap();
        fs::set_permissions(src.join("sub").join("f"), fs::Permissions::from_mode(0o600)).unwrap();
        let dst = d.path().join("d").join("cp1");
        copy_tree(&src, &dst).unwrap();
        assert_eq!(fs::read(dst.join("sub").join("f")).unwrap(), b"hello");
        let mode = fs::metadata(dst.join("sub").join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
