//! Manifests: what a tree holds, in a form two hosts can compare, and what changed since.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use crate::entry::{Timestamp, TreeMode};
use crate::error::{io_err, Result};
use crate::path::RelPath;
use crate::sys;
use crate::walk::{self, Item, Kind};
use crate::wire::{self, ContentHasher, DATA_CHUNK};

/// Host-local identity of an entry when the manifest was taken. Not compared by
/// [`Manifest::diff`] (inode numbers and ctimes never match across hosts) but it is what makes
/// [`changed_since`] cheap: an inode whose ctime has not moved has not changed, without
/// rereading its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalStat {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_nlink`.
    pub nlink: u64,
    /// `st_ctime`, which every content or metadata change moves and no one can set back.
    pub ctime: Timestamp,
}

/// One entry of a manifest. Fields that mean nothing for a kind are zero (a directory's size,
/// everything but the kind of a whiteout), so comparing all of them is right for every kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// The path; [`RelPath::root`] for the root.
    pub path: RelPath,
    /// Inode kind.
    pub kind: Kind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Logical size of regular files and symlinks.
    pub size: u64,
    /// Modification time.
    pub mtime: Timestamp,
    /// Device major/minor of device nodes.
    pub rdev: (u32, u32),
    /// Content digest ([`ContentHasher`]) of a file, digest of a symlink's target.
    pub digest: [u8; 32],
    /// Digest of the carried extended attributes.
    pub xattrs_digest: [u8; 32],
    /// Directory is an overlay opaque dir.
    pub opaque: bool,
    /// For the second and later names of an inode: the first name (in manifest order).
    pub link: Option<RelPath>,
    /// Host-local identity, when taken on this host.
    pub local: Option<LocalStat>,
}

impl ManifestEntry {
    pub(crate) fn from_item(item: &Item, digest: [u8; 32]) -> ManifestEntry {
        let whiteout = item.kind == Kind::Whiteout;
        let size = match item.kind {
            Kind::File => item.st.st_size as u64,
            Kind::Symlink => item.target.len() as u64,
            _ => 0,
        };
        let digest = match item.kind {
            Kind::File => digest,
            Kind::Symlink => wire::link_digest(&item.target),
            _ => [0u8; 32],
        };
        ManifestEntry {
            path: item.path.clone(),
            kind: item.kind,
            mode: if whiteout { 0 } else { item.meta.mode },
            uid: if whiteout { 0 } else { item.meta.uid },
            gid: if whiteout { 0 } else { item.meta.gid },
            size,
            mtime: if whiteout {
                Timestamp::default()
            } else {
                item.meta.mtime
            },
            rdev: item.rdev(),
            digest,
            xattrs_digest: if whiteout {
                [0u8; 32]
            } else {
                wire::xattrs_digest(&item.meta.xattrs)
            },
            opaque: item.opaque,
            link: None,
            local: Some(LocalStat {
                dev: item.st.st_dev,
                ino: item.st.st_ino,
                nlink: item.st.st_nlink,
                ctime: sys::stat_ctime(&item.st),
            }),
        }
    }

    fn linkable(&self) -> bool {
        !matches!(self.kind, Kind::Dir | Kind::Whiteout) && self.local.is_some_and(|l| l.nlink > 1)
    }
}

/// A sorted description of a whole tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// How the tree was read.
    pub mode: TreeMode,
    /// Entries in [`RelPath`] order, the root first.
    pub entries: Vec<ManifestEntry>,
}

/// One way two manifests differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Where.
    pub path: RelPath,
    /// What.
    pub what: DiffKind,
}

/// What differs at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiffKind {
    /// Present only in the manifest `diff` was called on.
    OnlyInLeft,
    /// Present only in the other manifest.
    OnlyInRight,
    /// Present in both with a different value of `field`.
    Field {
        /// Field name.
        field: &'static str,
        /// Value on the left.
        left: String,
        /// Value on the right.
        right: String,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.what {
            DiffKind::OnlyInLeft => write!(f, "{}: only in left", self.path),
            DiffKind::OnlyInRight => write!(f, "{}: only in right", self.path),
            DiffKind::Field { field, left, right } => {
                write!(f, "{}: {field} {left} != {right}", self.path)
            }
        }
    }
}

fn field_diffs(a: &ManifestEntry, b: &ManifestEntry, out: &mut Vec<Difference>) {
    let mut push = |field: &'static str, left: String, right: String| {
        if left != right {
            out.push(Difference {
                path: a.path.clone(),
                what: DiffKind::Field { field, left, right },
            });
        }
    };
    push("kind", format!("{:?}", a.kind), format!("{:?}", b.kind));
    push("mode", format!("{:o}", a.mode), format!("{:o}", b.mode));
    push("uid", a.uid.to_string(), b.uid.to_string());
    push("gid", a.gid.to_string(), b.gid.to_string());
    push("size", a.size.to_string(), b.size.to_string());
    push("mtime", a.mtime.to_string(), b.mtime.to_string());
    push("rdev", format!("{:?}", a.rdev), format!("{:?}", b.rdev));
    push("content", hex::encode(a.digest), hex::encode(b.digest));
    push(
        "xattrs",
        hex::encode(a.xattrs_digest),
        hex::encode(b.xattrs_digest),
    );
    push("opaque", a.opaque.to_string(), b.opaque.to_string());
    push(
        "hardlink",
        a.link.as_ref().map_or("-".into(), |p| p.to_string()),
        b.link.as_ref().map_or("-".into(), |p| p.to_string()),
    );
}

impl Manifest {
    pub(crate) fn from_unsorted(mode: TreeMode, mut entries: Vec<ManifestEntry>) -> Manifest {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        entries.dedup_by(|b, a| a.path == b.path);
        let mut m = Manifest { mode, entries };
        m.relink();
        m
    }

    /// Recomputes hard-link groups from the host-local inode identities.
    fn relink(&mut self) {
        let mut first: HashMap<(u64, u64), RelPath> = HashMap::new();
        for e in &mut self.entries {
            if !e.linkable() {
                if e.local.is_some() {
                    e.link = None;
                }
                continue;
            }
            let Some(l) = e.local else { continue };
            match first.get(&(l.dev, l.ino)) {
                Some(p) => e.link = Some(p.clone()),
                None => {
                    first.insert((l.dev, l.ino), e.path.clone());
                    e.link = None;
                }
            }
        }
    }

    /// The entry at `path`.
    pub fn get(&self, path: &RelPath) -> Option<&ManifestEntry> {
        self.entries
            .binary_search_by(|e| e.path.cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Every way `other` differs from `self`, in path order; empty when the trees are the same.
    pub fn diff(&self, other: &Manifest) -> Vec<Difference> {
        let mut out = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < self.entries.len() || j < other.entries.len() {
            let ord = match (self.entries.get(i), other.entries.get(j)) {
                (Some(a), Some(b)) => a.path.cmp(&b.path),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match ord {
                std::cmp::Ordering::Less => {
                    out.push(Difference {
                        path: self.entries[i].path.clone(),
                        what: DiffKind::OnlyInLeft,
                    });
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    out.push(Difference {
                        path: other.entries[j].path.clone(),
                        what: DiffKind::OnlyInRight,
                    });
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    field_diffs(&self.entries[i], &other.entries[j], &mut out);
                    i += 1;
                    j += 1;
                }
            }
        }
        out
    }

    /// Folds in what an incremental pass sent (`delta`, from its [`crate::WriteSummary`]) and
    /// removed, so the result describes the destination after that pass and can seed the next
    /// [`changed_since`].
    pub fn absorb(&mut self, delta: &Manifest, removed: &[RelPath]) {
        let replaced_by_non_dir: Vec<&RelPath> = delta
            .entries
            .iter()
            .filter(|e| e.kind != Kind::Dir)
            .map(|e| &e.path)
            .chain(removed.iter())
            .collect();
        let sent: HashSet<&RelPath> = delta.entries.iter().map(|e| &e.path).collect();
        let mut entries: Vec<ManifestEntry> = self
            .entries
            .drain(..)
            .filter(|e| {
                !sent.contains(&e.path)
                    && !replaced_by_non_dir.iter().any(|p| e.path.starts_with(p))
            })
            .collect();
        entries.extend(delta.entries.iter().cloned());
        *self = Manifest::from_unsorted(self.mode, entries);
    }
}

/// Content digest of an open regular file, reading only its data extents.
pub(crate) fn file_digest(fd: BorrowedFd<'_>, size: u64, path: &RelPath) -> Result<[u8; 32]> {
    let extents = sys::data_extents(fd, size).map_err(|e| io_err("seek data", path, e))?;
    let mut h = ContentHasher::new(size);
    let mut buf = vec![0u8; DATA_CHUNK];
    'extents: for (off, len) in extents {
        let mut pos = off;
        while pos < off + len {
            let want = ((off + len - pos) as usize).min(buf.len());
            let n = sys::pread(fd, &mut buf[..want], pos).map_err(|e| io_err("read", path, e))?;
            if n == 0 {
                break 'extents;
            }
            h.update(pos, &buf[..n]);
            pos += n as u64;
        }
    }
    Ok(h.finish())
}

fn full_entry(item: &Item) -> Result<ManifestEntry> {
    let digest = match (&item.kind, &item.fd) {
        (Kind::File, Some(fd)) => file_digest(fd.as_fd(), item.st.st_size as u64, &item.path)?,
        _ => [0u8; 32],
    };
    Ok(ManifestEntry::from_item(item, digest))
}

/// Describes the tree at `root`, reading every file's content. Sockets are left out, as the
/// stream leaves them out.
pub fn manifest(root: &Path, mode: TreeMode) -> Result<Manifest> {
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    walk::walk(
        root,
        mode,
        &mut |item| {
            entries.push(full_entry(item)?);
            Ok(())
        },
        &mut skipped,
    )?;
    Ok(Manifest::from_unsorted(mode, entries))
}

fn light_changed(old: &ManifestEntry, new: &ManifestEntry) -> bool {
    let (Some(a), Some(b)) = (old.local, new.local) else {
        return true;
    };
    a != b
        || old.kind != new.kind
        || old.mode != new.mode
        || old.uid != new.uid
        || old.gid != new.gid
        || old.size != new.size
        || old.mtime != new.mtime
        || old.rdev != new.rdev
        || old.opaque != new.opaque
        || old.link != new.link
}

/// Paths of `root` that differ from `since`: changed and new entries, and deleted ones (which
/// [`crate::StreamWriter::write_paths`] sends as removals). Entries whose inode identity and
/// ctime are unchanged are trusted without rereading; entries of a manifest taken elsewhere
/// (no [`LocalStat`]) are compared by content. A deleted path under a deleted (or no longer
/// directory) ancestor is left out: removing the ancestor covers it.
pub fn changed_since(root: &Path, since: &Manifest) -> Result<Vec<RelPath>> {
    let mode = since.mode;
    let mut current = Vec::new();
    let mut skipped = Vec::new();
    walk::walk(
        root,
        mode,
        &mut |item| {
            let needs_content = since
                .get(&item.path)
                .is_some_and(|old| old.local.is_none() && old.kind == item.kind);
            current.push(if needs_content {
                full_entry(item)?
            } else {
                ManifestEntry::from_item(item, [0u8; 32])
            });
            Ok(())
        },
        &mut skipped,
    )?;
    let now = Manifest::from_unsorted(mode, current);

    let mut changed = Vec::new();
    let mut deleted = Vec::new();
    let mut gone_dirs: HashSet<RelPath> = HashSet::new();
    let (mut i, mut j) = (0, 0);
    while i < since.entries.len() || j < now.entries.len() {
        let ord = match (since.entries.get(i), now.entries.get(j)) {
            (Some(a), Some(b)) => a.path.cmp(&b.path),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match ord {
            std::cmp::Ordering::Less => {
                let old = &since.entries[i];
                deleted.push(old.path.clone());
                if old.kind == Kind::Dir {
                    gone_dirs.insert(old.path.clone());
                }
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                changed.push(now.entries[j].path.clone());
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let (old, new) = (&since.entries[i], &now.entries[j]);
                let differs = if old.local.is_none() {
                    let mut d = Vec::new();
                    field_diffs(old, new, &mut d);
                    !d.is_empty()
                } else {
                    light_changed(old, new)
                };
                if differs {
                    changed.push(new.path.clone());
                }
                if old.kind == Kind::Dir && new.kind != Kind::Dir {
                    gone_dirs.insert(old.path.clone());
                }
                i += 1;
                j += 1;
            }
        }
    }
    for d in deleted {
        let mut anc = d.parent();
        let mut covered = false;
        while let Some(a) = anc {
            if gone_dirs.contains(&a) {
                covered = true;
                break;
            }
            anc = a.parent();
        }
        if !covered {
            changed.push(d);
        }
    }
    changed.sort();
    Ok(changed)
}
