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
    /// Sizes and times of both passes, for the report.
    pub transfer: ferry_proto::VolumeTransfer,
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
/// target must reproduce. Returns the digest and how many entries the pass carried.
///
/// The digest is the baseline with what this pass sent folded in: only changed files are read
/// again, so the time the container stays frozen grows with the change, not the volume.
pub fn final_pass(path: &Path, baseline: &Manifest, out: &Path) -> Result<(String, u64), String> {
    let changed = ferry_fs::changed_since(path, baseline).map_err(|e| e.to_string())?;
    let sent = write_with(out, |w| w.write_paths(path, TreeMode::Plain, &changed))?;
    let mut now = baseline.clone();
    now.absorb(&sent.manifest, &sent.removed);
    Ok((tree_digest(&now), changed.len() as u64))
}

/// The manifest of `dest` after `changed_since(dest, before)` found these changes: `before`
/// with the changed paths read again from disk.
fn refreshed(dest: &Path, before: &Manifest) -> Result<Manifest, String> {
    let changed = ferry_fs::changed_since(dest, before).map_err(|e| e.to_string())?;
    let mut w = StreamWriter::new(std::io::sink());
    let summary = w
        .write_paths(dest, TreeMode::Plain, &changed)
        .map_err(|e| e.to_string())?;
    let mut now = before.clone();
    now.absorb(&summary.manifest, &summary.removed);
    Ok(now)
}

/// Index of the volume whose first-pass stream is named `file`, if it is one.
pub fn first_pass_index(file: &str) -> Option<usize> {
    file.strip_prefix("ferry-volume-")?
        .strip_suffix(".0.stream")?
        .parse()
        .ok()
}

/// A blocking reader over chunks arriving on an async channel, so a stream can be applied on a
/// blocking thread while its frames still arrive: the target never stages it whole on disk.
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    current: bytes::Bytes,
}

impl ChannelReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<bytes::Bytes>) -> Self {
        ChannelReader {
            rx,
            current: bytes::Bytes::new(),
        }
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Applies one stream from `r` into `dest` (a first pass, applied while the source still runs)
/// and returns the manifest of `dest` read back from disk: the base the final pass's check
/// builds on, computed before the freeze rather than during it.
pub fn apply_stream(r: impl std::io::Read, dest: &Path) -> Result<Manifest, String> {
    let r = ferry_fs::StreamReader::new(std::io::BufReader::with_capacity(1 << 20, r))
        .map_err(|e| e.to_string())?;
    r.apply_into(dest, &ferry_fs::ApplyOptions::update(TreeMode::Plain))
        .map_err(|e| e.to_string())?;
    ferry_fs::manifest(dest, TreeMode::Plain).map_err(|e| e.to_string())
}

/// Applies the passes in order into the target volume and checks the result's digest.
///
/// With `before` (the manifest read back after the first pass) only what changed since is read
/// again; without it the whole volume is.
pub fn apply_passes(
    streams: &[PathBuf],
    dest: &Path,
    want: &str,
    before: Option<&Manifest>,
) -> Result<(), String> {
    for s in streams {
        let f = std::fs::File::open(s).map_err(|e| format!("{}: {e}", s.display()))?;
        let r = ferry_fs::StreamReader::new(std::io::BufReader::with_capacity(1 << 20, f))
            .map_err(|e| e.to_string())?;
        r.apply_into(dest, &ferry_fs::ApplyOptions::update(TreeMode::Plain))
            .map_err(|e| format!("{}: {e}", s.display()))?;
    }
    let now = match before {
        Some(b) => refreshed(dest, b)?,
        None => ferry_fs::manifest(dest, TreeMode::Plain).map_err(|e| e.to_string())?,
    };
    let got = tree_digest(&now);
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
    fn first_pass_stream_names_give_their_volume_index() {
        for (name, want) in [
            ("ferry-volume-0.0.stream", Some(0)),
            ("ferry-volume-12.0.stream", Some(12)),
            ("ferry-volume-0.1.stream", None),
            ("ferry-volume-x.0.stream", None),
            ("pages-1.img", None),
        ] {
            assert_eq!(first_pass_index(name), want, "{name}");
        }
    }

    #[test]
    fn a_stream_fed_through_the_channel_reader_applies_like_a_file() {
        let base = std::env::temp_dir().join(format!("ferry-vol-chan-{}", std::process::id()));
        let (src, dst) = (base.join("src"), base.join("dst"));
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::write(src.join("sub").join("f"), vec![7u8; 300_000]).unwrap();
        let stream = base.join("s");
        first_pass(&src, &stream).unwrap();
        let bytes = std::fs::read(&stream).unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let feeder = std::thread::spawn(move || {
            for c in bytes.chunks(4096) {
                tx.blocking_send(bytes::Bytes::copy_from_slice(c)).unwrap();
            }
        });
        let m = apply_stream(ChannelReader::new(rx), &dst).unwrap();
        assert_eq!(
            tree_digest(&m),
            tree_digest(&ferry_fs::manifest(&src, TreeMode::Plain).unwrap())
        );
        feeder.join().unwrap();
        assert_eq!(
            std::fs::read(dst.join("sub").join("f")).unwrap(),
            vec![7u8; 300_000]
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

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

#[cfg(test)]
mod pass_tests {
    use super::*;

    /// The digest the source computes incrementally must equal a full read of the target after
    /// both passes, through the target's own incremental check, and a tampered file must fail it.
    #[test]
    fn incremental_digests_match_a_full_read_and_catch_damage() {
        let base = std::env::temp_dir().join(format!("ferry-vol-pass-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (src, dst) = (base.join("src"), base.join("dst"));
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        for i in 0..20 {
            std::fs::write(src.join("d").join(format!("f{i}")), vec![i as u8; 10_000]).unwrap();
        }
        let first = base.join("0.stream");
        let baseline = first_pass(&src, &first).unwrap();
        let before = apply_stream(std::fs::File::open(&first).unwrap(), &dst).unwrap();
        std::fs::write(src.join("d").join("f3"), b"changed").unwrap();
        std::fs::remove_file(src.join("d").join("f4")).unwrap();
        std::fs::write(src.join("new"), b"new").unwrap();
        let second = base.join("1.stream");
        let (want, entries) = final_pass(&src, &baseline, &second).unwrap();
        assert!(entries >= 3, "{entries}");
        assert_eq!(
            want,
            tree_digest(&ferry_fs::manifest(&src, TreeMode::Plain).unwrap())
        );
        apply_passes(std::slice::from_ref(&second), &dst, &want, Some(&before)).unwrap();
        assert_eq!(
            want,
            tree_digest(&ferry_fs::manifest(&dst, TreeMode::Plain).unwrap())
        );
        std::fs::write(dst.join("d").join("f5"), b"tampered").unwrap();
        let e = apply_passes(&[], &dst, &want, Some(&before)).unwrap_err();
        assert!(e.contains("differs"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
