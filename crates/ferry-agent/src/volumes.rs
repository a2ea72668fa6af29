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
