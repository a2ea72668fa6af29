//! The encoder.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::os::fd::AsFd;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::entry::{Entry, Extent, TreeMode};
use crate::error::{io_err, FsError, Result};
use crate::manifest::{Manifest, ManifestEntry};
use crate::path::RelPath;
use crate::sys;
use crate::walk::{self, Item, Kind, Look, Parent};
use crate::wire::{self, tag, ContentHasher, Counts, WireError, DATA_CHUNK, MAX_EXTENTS};

/// What one stream carried.
#[derive(Debug, Clone)]
pub struct WriteSummary {
    /// Record counts, as written in END.
    pub counts: Counts,
    /// Stream length in bytes.
    pub stream_bytes: u64,
    /// The entries sent, as read while sending: stat taken before the content, digest of the
    /// content actually sent. For [`StreamWriter::write_tree`] this is the baseline for
    /// [`crate::changed_since`]: anything modified while it was being read has a newer ctime
    /// and is picked up by the next pass.
    pub manifest: Manifest,
    /// Paths sent as [`Entry::Remove`].
    pub removed: Vec<RelPath>,
    /// Sockets, which are not carried.
    pub skipped: Vec<RelPath>,
}

/// Writes a tree (or part of one) as a stream into `W`.
///
/// Each `write_*` call writes one complete stream, header to END. The writer buffers
/// internally; `W` is flushed at the end of each stream.
pub struct StreamWriter<W: Write> {
    inner: W,
}

struct Enc<'a, W: Write> {
    out: BufWriter<&'a mut W>,
    sha: Sha256,
    bytes: u64,
    counts: Counts,
    scratch: Vec<u8>,
    buf: Vec<u8>,
    links: HashMap<(u64, u64), (RelPath, [u8; 32])>,
    sent: Vec<ManifestEntry>,
}

fn write_err(e: std::io::Error) -> FsError {
    io_err("write stream", "<stream>", e)
}

impl<'a, W: Write> Enc<'a, W> {
    fn begin(w: &'a mut W, mode: TreeMode) -> Result<Self> {
        let mut enc = Enc {
            out: BufWriter::with_capacity(256 * 1024, w),
            sha: Sha256::new(),
            bytes: 0,
            counts: Counts::default(),
            scratch: Vec::new(),
            buf: vec![0u8; DATA_CHUNK],
            links: HashMap::new(),
            sent: Vec::new(),
        };
        enc.raw(&wire::encode_header(mode))?;
        Ok(enc)
    }

    fn raw(&mut self, b: &[u8]) -> Result<()> {
        self.out.write_all(b).map_err(write_err)?;
        self.sha.update(b);
        self.bytes += b.len() as u64;
        Ok(())
    }

    fn frame(&mut self, t: u8, len: usize) -> Result<()> {
        let mut h = [0u8; 5];
        h[0] = t;
        h[1..].copy_from_slice(&(len as u32).to_le_bytes());
        self.raw(&h)
    }

    fn entry(&mut self, e: &Entry) -> Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let t = wire::encode_entry(e, &mut scratch).map_err(|err| match err {
            WireError::Malformed(what) => FsError::Refused {
                entry: e.path().to_string(),
                reason: format!("cannot be encoded: {what}"),
            },
            WireError::Path { raw, reason } => FsError::InvalidPath {
                path: String::from_utf8_lossy(&raw).into_owned(),
                reason,
            },
        })?;
        let r = self
            .frame(t, scratch.len())
            .and_then(|_| self.raw(&scratch));
        self.scratch = scratch;
        r?;
        self.counts.entries += 1;
        if t == tag::FILE {
            self.counts.files += 1;
        }
        Ok(())
    }

    fn data_from_buf(&mut self, n: usize) -> Result<()> {
        self.frame(tag::DATA, n)?;
        let buf = std::mem::take(&mut self.buf);
        let r = self.raw(&buf[..n]);
        self.buf = buf;
        r?;
        self.counts.data_bytes += n as u64;
        Ok(())
    }

    /// Streams the data extents of an open file, padding with zeros where it shrank meanwhile.
    fn file_data(&mut self, item: &Item, extents: &[Extent], size: u64) -> Result<[u8; 32]> {
        let Some(fd) = item.fd.as_ref() else {
            return Err(io_err(
                "read",
                &item.path,
                std::io::Error::from_raw_os_error(libc::EBADF),
            ));
        };
        let mut hasher = ContentHasher::new(size);
        let mut eof = false;
        for &(off, len) in extents {
            let end = off + len;
            let mut pos = off;
            while pos < end {
                let want = ((end - pos) as usize).min(DATA_CHUNK);
                let mut got = 0;
                while got < want && !eof {
                    let n = sys::pread(fd.as_fd(), &mut self.buf[got..want], pos + got as u64)
                        .map_err(|e| io_err("read", &item.path, e))?;
                    if n == 0 {
                        eof = true;
                    }
                    got += n;
                }
                self.buf[got..want].fill(0);
                hasher.update(pos, &self.buf[..want]);
                self.data_from_buf(want)?;
                pos += want as u64;
            }
        }
        let digest = hasher.finish();
        self.frame(tag::FILE_END, 32)?;
        self.raw(&digest)?;
        Ok(digest)
    }

    fn item(&mut self, item: &Item, mode: TreeMode) -> Result<()> {
        let path = item.path.clone();
        if path.is_root() {
            self.entry(&Entry::Root {
                meta: item.meta.clone(),
            })?;
            self.sent.push(ManifestEntry::from_item(item, [0u8; 32]));
            return Ok(());
        }
        let ident = (item.st.st_dev, item.st.st_ino);
        if item.linkable() {
            if let Some((first, digest)) = self.links.get(&ident).cloned() {
                self.entry(&Entry::Hardlink {
                    path,
                    target: first,
                })?;
                self.sent.push(ManifestEntry::from_item(item, digest));
                return Ok(());
            }
        }
        let meta = item.meta.clone();
        let mut digest = [0u8; 32];
        match item.kind {
            Kind::Dir => {
                self.entry(&Entry::Dir {
                    path: path.clone(),
                    meta,
                })?;
                if item.opaque && mode == TreeMode::OverlayUpper {
                    self.entry(&Entry::Opaque { path })?;
                }
            }
            Kind::File => {
                let size = item.st.st_size as u64;
                let fd = item.fd.as_ref().ok_or_else(|| {
                    io_err(
                        "read",
                        &path,
                        std::io::Error::from_raw_os_error(libc::EBADF),
                    )
                })?;
                let extents = sys::data_extents(fd.as_fd(), size)
                    .map_err(|e| io_err("seek data", &path, e))?;
                let extents = limit_extents(extents, MAX_EXTENTS);
                self.entry(&Entry::File {
                    path,
                    meta,
                    size,
                    extents: extents.clone(),
                })?;
                digest = self.file_data(item, &extents, size)?;
            }
            Kind::Symlink => self.entry(&Entry::Symlink {
                path,
                meta,
                target: item.target.clone(),
            })?,
            Kind::Fifo => self.entry(&Entry::Fifo { path, meta })?,
            Kind::CharDev | Kind::BlockDev => {
                let (major, minor) = item.rdev();
                self.entry(&if item.kind == Kind::CharDev {
                    Entry::CharDev {
                        path,
                        meta,
                        major,
                        minor,
                    }
                } else {
                    Entry::BlockDev {
                        path,
                        meta,
                        major,
                        minor,
                    }
                })?
            }
            Kind::Whiteout => self.entry(&Entry::Whiteout { path })?,
        }
        if item.linkable() {
            self.links.insert(ident, (item.path.clone(), digest));
        }
        self.sent.push(ManifestEntry::from_item(item, digest));
        Ok(())
    }

    fn end(
        mut self,
        mode: TreeMode,
        removed: Vec<RelPath>,
        skipped: Vec<RelPath>,
    ) -> Result<WriteSummary> {
        let digest: [u8; 32] = std::mem::take(&mut self.sha).finalize().into();
        let end = wire::encode_end(&self.counts, &digest);
        let mut h = [0u8; 5];
        h[0] = tag::END;
        h[1..].copy_from_slice(&(end.len() as u32).to_le_bytes());
        self.out.write_all(&h).map_err(write_err)?;
        self.out.write_all(&end).map_err(write_err)?;
        self.bytes += (h.len() + end.len()) as u64;
        self.out.flush().map_err(write_err)?;
        Ok(WriteSummary {
            counts: self.counts,
            stream_bytes: self.bytes,
            manifest: Manifest::from_unsorted(mode, std::mem::take(&mut self.sent)),
            removed,
            skipped,
        })
    }
}

/// Caps the extent list at `max` by sending the smallest holes as zeros, so that record sizes
/// stay bounded for any file; the largest holes are kept.
pub(crate) fn limit_extents(extents: Vec<Extent>, max: usize) -> Vec<Extent> {
    if extents.len() <= max || max == 0 {
        return extents;
    }
    let mut gaps: Vec<(u64, usize)> = extents
        .windows(2)
        .enumerate()
        .map(|(i, w)| (w[1].0 - (w[0].0 + w[0].1), i))
        .collect();
    gaps.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut keep = vec![false; extents.len()];
    for &(_, i) in gaps.iter().take(max - 1) {
        keep[i] = true;
    }
    let mut out: Vec<Extent> = Vec::with_capacity(max);
    let mut cur = extents[0];
    for (i, &(off, len)) in extents.iter().enumerate().skip(1) {
        if keep[i - 1] {
            out.push(cur);
            cur = (off, len);
        } else {
            cur.1 = off + len - cur.0;
        }
    }
    out.push(cur);
    out
}

impl<W: Write> StreamWriter<W> {
    /// Wraps a sink.
    pub fn new(inner: W) -> Self {
        StreamWriter { inner }
    }

    /// Gives the sink back.
    pub fn into_inner(self) -> W {
        self.inner
    }

    /// Streams the whole tree at `root`: the root's metadata, then every entry depth-first,
    /// directories before their contents. In [`TreeMode::OverlayUpper`] a char device 0/0 is
    /// sent as a whiteout and an opaque directory as DIR + OPAQUE; names of one inode after the
    /// first become hard links; files are read by data extent so holes stay holes.
    pub fn write_tree(&mut self, root: &Path, mode: TreeMode) -> Result<WriteSummary> {
        let mut enc = Enc::begin(&mut self.inner, mode)?;
        let mut skipped = Vec::new();
        walk::walk(root, mode, &mut |item| enc.item(item, mode), &mut skipped)?;
        enc.end(mode, Vec::new(), skipped)
    }

    /// Streams only `paths` of the tree at `root` (non-recursively: a directory is sent without
    /// its contents), in tree order; the root is sent when [`RelPath::root`] is listed. A path
    /// that no longer exists is sent as [`Entry::Remove`]. Meant for the output of
    /// [`crate::changed_since`].
    pub fn write_paths(
        &mut self,
        root: &Path,
        mode: TreeMode,
        paths: &[RelPath],
    ) -> Result<WriteSummary> {
        let mut sorted: Vec<&RelPath> = paths.iter().collect();
        sorted.sort();
        sorted.dedup();
        let mut root_item = walk::inspect_root(root, mode)?;
        let Some(root_fd) = root_item.fd.take() else {
            return Err(io_err(
                "open root",
                root.display(),
                std::io::Error::from_raw_os_error(libc::EBADF),
            ));
        };
        let mut enc = Enc::begin(&mut self.inner, mode)?;
        let mut removed = Vec::new();
        let mut skipped = Vec::new();
        for p in sorted {
            if p.is_root() {
                enc.item(&root_item, mode)?;
                continue;
            }
            let look = match walk::open_parent(root_fd.as_fd(), p)? {
                Parent::Missing => Look::Gone,
                Parent::Dir(dir, name) => walk::inspect(dir.as_fd(), &name, p.clone(), mode)?,
            };
            match look {
                Look::Found(item) => enc.item(&item, mode)?,
                Look::Gone => {
                    enc.entry(&Entry::Remove { path: p.clone() })?;
                    removed.push(p.clone());
                }
                Look::Socket => {
                    enc.entry(&Entry::Remove { path: p.clone() })?;
                    removed.push(p.clone());
                    skipped.push(p.clone());
                }
            }
        }
        enc.end(mode, removed, skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::limit_extents;

    #[test]
    fn limit_extents_keeps_largest_holes() {
        let ext = vec![(0, 1), (2, 1), (100, 1), (103, 1), (1000, 1)];
        assert_eq!(limit_extents(ext.clone(), 10), ext);
        assert_eq!(
            limit_extents(ext.clone(), 3),
            vec![(0, 3), (100, 4), (1000, 1)]
        );
        assert_eq!(limit_extents(ext.clone(), 1), vec![(0, 1001)]);
        assert_eq!(limit_extents(ext, 2), vec![(0, 104), (1000, 1)]);
    }
}
