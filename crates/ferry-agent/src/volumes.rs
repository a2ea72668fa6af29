//! Named volumes: a first pass copied while the container runs, a second pass of only what
//! changed, taken while it is frozen, and a digest of the whole tree the target must match
//! before the container is restored.

use std::path::{Path, PathBuf};

use ferry_fs::{Manifest, StreamWriter, TreeMode};
use sha2::{Digest, Sha256};

/// A local-driver volume of the container, by name and host path of its data.
#[derive(Debug, Clone)]
pub struct VolumeRef {
    pub name: String,
    pub path: PathBuf,
    /// What the first pass sent: the baseline for the second.
    pub baseline: Option<Manifest>,
}

pub fn stream_name(index: usize, pass: u8) -> String {
    format!("ferry-volume-{index}.{pass}.stream")
}

pub fn digest_name(index: usize) -> String {
    format!("ferry-volume-{index}.json")
}

/// A digest of a tree that means the same on every host: content, kind, mode, owner, size,
/// times, device numbers and xattrs of every path — but no inode numbers.
pub fn tree_digest(m: &Manifest) -> String {
    let mut h = Sha256::new();
    for e in &m.entries {
        h.update(e.path.as_bytes());
        h.update(
            format!(
                "\0{:?}|{}|{}|{}|{}|{:?}|{:?}|{:?}|{}\n",
                e.kind, e.mode, e.uid, e.gid, e.size, e.mtime, e.rdev, e.xattrs_digest, e.opaque
            )
            .as_bytes(),
        );
        h.update(e.digest);
    }
    hex::encode(h.finalize())
}

/// Writes one complete stream into a new file at `out`.
pub(crate) fn write_with(
    out: &Path,
    f: impl FnOnce(
        &mut StreamWriter<std::io::BufWriter<std::fs::File>>,
    ) -> ferry_fs::Result<ferry_fs::WriteSummary>,
) -> Result<ferry_fs::WriteSummary, String> {
    let file = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut w = StreamWriter::new(std::io::BufWriter::with_capacity(1 << 20, file));
    let summary = f(&mut w).map_err(|e| e.to_string())?;
    let mut inner = w.into_inner();
    std::io::Write::flush(&mut inner).map_err(|e| e.to_string())?;
    Ok(summary)
}

/// First pass: the whole volume, while the container runs.
pub fn first_pass(path: &Path, out: &Path) -> Result<Manifest, String> {
    Ok(write_with(out, |w| w.write_tree(path, TreeMode::Plain))?.manifest)
}

/// Second pass, with the container frozen: what changed since `baseline`, and the digest the
/// target must reproduce.
pub fn final_pass(path: &Path, baseline: &Manifest, out: &Path) -> Result<String, String> {
    let changed = ferry_fs::changed_since(path, baseline).map_err(|e| e.to_string())?;
    write_with(out, |w| w.write_paths(path, TreeMode::Plain, &changed))?;
    let now = ferry_fs::manifest(path, TreeMode::Plain).map_err(|e| e.to_string())?;
    Ok(tree_digest(&now))
}

/// Applies the passes in order into the target volume and checks the result's digest.
pub fn apply_passes(streams: &[PathBuf], dest: &Path, want: &str) -> Result<(), String> {
    for s in streams {
        let f = std::fs::File::open(s).map_err(|e| format!("{}: {e}", s.display()))?;
        let r = ferry_fs::StreamReader::new(std::io::BufReader::with_capacity(1 << 20, f))
            .map_err(|e| e.to_string())?;
        r.apply_into(dest, &ferry_fs::ApplyOptions::update(TreeMode::Plain))
            .map_err(|e| format!("{}: {e}", s.display()))?;
    }
    let got = tree_digest(&ferry_fs::manifest(dest, TreeMode::Plain).map_err(|e| e.to_string())?);
    if got != want {
        return Err(format!(
            "volume content differs from the source's after applying (digest {got}, source {want})"
        ));
    }
    Ok(())
}

/// `--overwrite-volumes`: moves the content of a volume's data dir aside (a rename, on the same
/// file system) and leaves an empty dir with the same owner and mode in its place, so a failed
/// migration can put the operator's data back untouched. Returns where it went.
pub fn set_aside(data: &Path, migration_id: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let name = data
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{}: no directory name", data.display()))?;
    let aside = data.with_file_name(format!("{name}.ferry-replaced-{migration_id}"));
    let meta = std::fs::metadata(data).map_err(|e| format!("{}: {e}", data.display()))?;
    std::fs::rename(data, &aside)
        .map_err(|e| format!("{} -> {}: {e}", data.display(), aside.display()))?;
    let made = std::fs::create_dir(data)
        .and_then(|_| std::os::unix::fs::chown(data, Some(meta.uid()), Some(meta.gid())))
        .and_then(|_| std::fs::set_permissions(data, meta.permissions()));
    if let Err(e) = made {
        let _ = std::fs::remove_dir(data);
        let _ = std::fs::rename(&aside, data);
        return Err(format!("{}: {e}", data.display()));
    }
    Ok(aside)
}

/// Undoes [`set_aside`]: whatever the attempt wrote is removed and the old content returns.
pub fn put_back(data: &Path, aside: &Path) -> Result<(), String> {
    if !aside.exists() {
        return Err("the set-aside copy is missing".into());
    }
    if data.exists() {
        std::fs::remove_dir_all(data).map_err(|e| format!("{}: {e}", data.display()))?;
    }
    std::fs::rename(aside, data).map_err(|e| format!("{}: {e}", aside.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn set_aside_then_put_back_restores_the_old_content_and_mode() {
        let base = std::env::temp_dir().join(format!("ferry-vol-aside-{}", std::process::id()));
        let data = base.join("_data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("old.txt"), b"operator data").unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750)).unwrap();
        let aside = set_aside(&data, "m1").unwrap();
        assert!(std::fs::read_dir(&data).unwrap().next().is_none());
        assert_eq!(
            std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
            0o750
        );
        std::fs::write(data.join("new.txt"), b"half written").unwrap();
        put_back(&data, &aside).unwrap();
        assert_eq!(
            std::fs::read(data.join("old.txt")).unwrap(),
            b"operator data"
        );
        assert!(!data.join("new.txt").exists());
        assert!(!aside.exists());
        assert!(put_back(&data, &aside).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
