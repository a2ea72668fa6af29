//! Applying a stream to a destination directory.
//!
//! # Staging and commit
//!
//! Nothing in the destination is touched while the stream is being read. Every entry is first
//! created in a staging directory `<dest>.ferry-partial-<id>` next to `dest` (same file system,
//! so the commit is renames only), and only once END has vouched for the whole stream is it
//! committed:
//!
//! * [`ApplyTarget::Fresh`]: `dest` must be absent or an empty directory; the staged tree is
//!   renamed onto it in one `rename(2)`. A failed apply leaves `dest` exactly as it was.
//! * [`ApplyTarget::Update`] (incremental passes): staged entries are renamed into `dest` one by
//!   one, whatever they replace being moved aside into the staging directory first; directories
//!   that already exist keep their identity and only get their metadata updated. If any step
//!   fails, every step already taken is undone in reverse order, so `dest` again holds what it
//!   held before.
//!
//! The staging directory is removed in every case, also when unwinding from a panic. A crash of
//! the whole process leaves it behind; [`clean_stale_staging`] removes such leftovers.
//!
//! # Safety
//!
//! Paths are validated by the decoder (relative, no `..`). Every further step resolves paths
//! one component at a time from a directory fd with `O_NOFOLLOW`, in staging and in `dest`
//! alike, so an entry under a symlink — one the stream created (`a -> /etc`, then `a/passwd`) or
//! one already in `dest` — is refused instead of followed. Hard links may only name entries
//! already staged from this stream. Only the attributes this crate itself carries may be set.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::entry::{Entry, Meta, Timestamp, TreeMode};
use crate::error::{io_err, refused, FsError, Result};
use crate::path::RelPath;
use crate::reader::{Record, StreamReader};
use crate::sys::{self, XTarget};
use crate::walk::{self, is_carried_xattr, vanished, Parent};
use crate::wire::Counts;

/// Where and how to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions {
    /// What the destination is: an overlay upper dir gets whiteouts and opaque attributes, a
    /// plain directory gets whiteouts applied as deletions.
    pub mode: TreeMode,
    /// First pass into an empty destination, or a later pass onto it.
    pub target: ApplyTarget,
    /// `syncfs` the staged tree before committing it and the destination after: the source
    /// side deletes its copy once the target reports success, so that report must survive a
    /// power cut. One file-system-wide sync instead of an fsync per file keeps it cheap.
    pub durable: bool,
}

impl ApplyOptions {
    /// A first, complete pass.
    pub fn fresh(mode: TreeMode) -> Self {
        ApplyOptions {
            mode,
            target: ApplyTarget::Fresh,
            durable: true,
        }
    }

    /// An incremental pass onto an earlier result.
    pub fn update(mode: TreeMode) -> Self {
        ApplyOptions {
            mode,
            target: ApplyTarget::Update,
            durable: true,
        }
    }
}

/// What the destination holds before the apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyTarget {
    /// Nothing: `dest` is absent or an empty directory, and the stream starts with ROOT.
    Fresh,
    /// An earlier result, which the stream's entries replace, update or remove.
    Update,
}

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplySummary {
    /// Record counts of the stream.
    pub counts: Counts,
    /// Stream length in bytes.
    pub stream_bytes: u64,
    /// Entries renamed into `dest` (1 for a fresh apply: the whole tree).
    pub placed: u64,
    /// Existing directories whose metadata was updated in place.
    pub updated_dirs: u64,
    /// Paths removed from `dest` (removals and whiteouts applied as deletions).
    pub removed: u64,
}

impl<R: Read> StreamReader<R> {
    /// Applies the rest of the stream under `dest`; see the [module docs](crate::apply) for the
    /// staging, commit and safety rules.
    pub fn apply_into(self, dest: &Path, opts: &ApplyOptions) -> Result<ApplySummary> {
        apply(self, dest, opts)
    }
}

const STAGING_TAG: &str = ".ferry-partial-";

/// Removes staging directories left next to `dest` by applies that were killed mid-way.
/// Returns how many were removed.
pub fn clean_stale_staging(dest: &Path) -> Result<usize> {
    let (parent, name) = split_dest(dest)?;
    let prefix = format!("{}{STAGING_TAG}", name.to_string_lossy());
    let mut n = 0;
    let rd = std::fs::read_dir(&parent).map_err(|e| io_err("readdir", parent.display(), e))?;
    for ent in rd {
        let ent = ent.map_err(|e| io_err("readdir", parent.display(), e))?;
        if ent.file_name().to_string_lossy().starts_with(&prefix) {
            let p = ent.path();
            std::fs::remove_dir_all(&p)
                .map_err(|e| io_err("remove stale staging", p.display(), e))?;
            n += 1;
        }
    }
    Ok(n)
}

fn split_dest(dest: &Path) -> Result<(PathBuf, std::ffi::OsString)> {
    let name = dest.file_name().ok_or_else(|| {
        io_err(
            "split destination",
            dest.display(),
            std::io::ErrorKind::InvalidInput.into(),
        )
    })?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_os_string()))
}

/// The staging directory; removed on drop unless a failed rollback needs what it holds.
struct Staging {
    path: PathBuf,
    keep: bool,
}

impl Staging {
    fn create(dest: &Path) -> Result<Staging> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let (parent, name) = split_dest(dest)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!(
            "{}-{}-{}",
            std::process::id(),
            nanos,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = parent.join(format!("{}{STAGING_TAG}{id}", name.to_string_lossy()));
        std::fs::create_dir(&path).map_err(|e| io_err("create staging", path.display(), e))?;
        let staging = Staging { path, keep: false };
        let p = &staging.path;
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| io_err("chmod staging", p.display(), e))?;
        for sub in ["tree", "undo"] {
            let s = p.join(sub);
            std::fs::create_dir(&s).map_err(|e| io_err("create staging", s.display(), e))?;
        }
        Ok(staging)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

struct DirRec {
    path: RelPath,
    meta: Meta,
    opaque: bool,
    /// Created new (in staging); otherwise an existing `dest` directory updated in place.
    placed: bool,
}

enum Action {
    /// Rename the staged entry into `dest`; the index of its [`DirRec`] when it is a directory.
    Place(RelPath, Option<usize>),
    DirMeta(usize),
    Remove(RelPath),
}

struct OpenFile {
    path: RelPath,
    fd: OwnedFd,
    meta: Meta,
}

struct Applier {
    mode: TreeMode,
    update: bool,
    tree: OwnedFd,
    dest_root: Option<OwnedFd>,
    stack: Vec<(Vec<u8>, OwnedFd)>,
    dirs: Vec<DirRec>,
    placed_dirs: HashSet<RelPath>,
    actions: Vec<Action>,
    last_dir: Option<usize>,
    file: Option<OpenFile>,
    saw_root: bool,
}

fn exists_err(path: &RelPath, e: std::io::Error, step: &'static str) -> FsError {
    if e.raw_os_error() == Some(libc::EEXIST) {
        refused(path, "duplicate entry, or an entry after its own contents")
    } else {
        io_err(step, path, e)
    }
}

/// Sets `meta` (less times) and the wanted attributes on an open file or directory; with
/// `sync`, carried attributes that are not wanted are removed.
fn set_fd_meta(
    fd: BorrowedFd<'_>,
    path: &RelPath,
    meta: &Meta,
    opaque: bool,
    mode: TreeMode,
    sync: bool,
) -> Result<()> {
    sys::fchown(fd, meta.uid, meta.gid).map_err(|e| io_err("chown", path, e))?;
    sys::fchmod(fd, meta.mode).map_err(|e| io_err("chmod", path, e))?;
    set_xattrs(&XTarget::Fd(fd), path, meta, opaque, mode, sync)
}

fn wanted_xattrs(meta: &Meta, opaque: bool, mode: TreeMode) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut want: Vec<(Vec<u8>, Vec<u8>)> = meta
        .xattrs
        .iter()
        .filter(|(n, _)| is_carried_xattr(n, mode))
        .cloned()
        .collect();
    if opaque && mode == TreeMode::OverlayUpper {
        want.retain(|(n, _)| n != b"trusted.overlay.opaque");
        want.push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
    }
    want
}

fn set_xattrs(
    t: &XTarget<'_>,
    path: &RelPath,
    meta: &Meta,
    opaque: bool,
    mode: TreeMode,
    sync: bool,
) -> Result<()> {
    let want = wanted_xattrs(meta, opaque, mode);
    if sync {
        let have = sys::list_xattrs(t).map_err(|e| io_err("listxattr", path, e))?;
        for name in have {
            if is_carried_xattr(&name, mode) && !want.iter().any(|(n, _)| *n == name) {
                sys::remove_xattr(t, &name).map_err(|e| io_err("removexattr", path, e))?;
            }
        }
    }
    for (name, value) in &want {
        sys::set_xattr(t, name, value).map_err(|e| io_err("setxattr", path, e))?;
    }
    Ok(())
}

/// Snapshot of an existing directory's metadata, to put back on rollback.
fn dir_meta_of(fd: BorrowedFd<'_>, path: &RelPath, mode: TreeMode) -> Result<(Meta, bool)> {
    let st = sys::fstat(fd).map_err(|e| io_err("fstat", path, e))?;
    let t = XTarget::Fd(fd);
    let mut xattrs = Vec::new();
    let mut opaque = false;
    for name in sys::list_xattrs(&t).map_err(|e| io_err("listxattr", path, e))? {
        if !is_carried_xattr(&name, mode) {
            continue;
        }
        if let Some(v) = sys::get_xattr(&t, &name).map_err(|e| io_err("getxattr", path, e))? {
            if name == b"trusted.overlay.opaque" && v == b"y" {
                opaque = true;
            } else {
                xattrs.push((name, v));
            }
        }
    }
    xattrs.sort();
    Ok((
        Meta {
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            atime: sys::stat_atime(&st),
            mtime: sys::stat_mtime(&st),
            xattrs,
        },
        opaque,
    ))
}

/// Opens the directory at `path` under `root` without following symlinks; `None` if it is not
/// a real directory.
fn open_dir_under(root: BorrowedFd<'_>, path: &RelPath) -> Result<Option<OwnedFd>> {
    if path.is_root() {
        return root
            .try_clone_to_owned()
            .map(Some)
            .map_err(|e| io_err("dup", path, e));
    }
    match walk::open_parent(root, path)? {
        Parent::Missing => Ok(None),
        Parent::Dir(p, name) => match sys::open_subdir(p.as_fd(), &name) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if vanished(&e) => Ok(None),
            Err(e) => Err(io_err("open", path, e)),
        },
    }
}

impl Applier {
    fn covered(&self, path: &RelPath) -> bool {
        let mut p = path.parent();
        while let Some(a) = p {
            if self.placed_dirs.contains(&a) {
                return true;
            }
            p = a.parent();
        }
        false
    }

    fn dest_is_dir(&self, path: &RelPath) -> Result<bool> {
        let Some(root) = &self.dest_root else {
            return Ok(false);
        };
        Ok(open_dir_under(root.as_fd(), path)?.is_some())
    }

    fn parent_fd(&self) -> BorrowedFd<'_> {
        match self.stack.last() {
            Some((_, fd)) => fd.as_fd(),
            None => self.tree.as_fd(),
        }
    }

    /// Points the cached staging directory chain at `path`'s parent and returns the final name.
    /// In an update, a parent that only exists in `dest` gets a stand-in staging directory.
    fn enter_parent(&mut self, path: &RelPath) -> Result<CString> {
        let comps: Vec<&[u8]> = path.components().collect();
        let Some((last, dirs)) = comps.split_last() else {
            return Err(refused(path, "empty path"));
        };
        let mut k = 0;
        while k < self.stack.len() && k < dirs.len() && self.stack[k].0 == dirs[k] {
            k += 1;
        }
        self.stack.truncate(k);
        for (i, c) in dirs.iter().enumerate().skip(k) {
            let cname = sys::cstring(c).map_err(|e| io_err("open", path, e))?;
            let prefix =
                || RelPath::new(dirs[..=i].join(&b'/')).unwrap_or_else(|_| RelPath::root());
            let fd = match sys::open_subdir(self.parent_fd(), &cname) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let pre = prefix();
                    if !self.update {
                        return Err(refused(
                            path,
                            format!("parent {pre} was not streamed before it"),
                        ));
                    }
                    if self.covered(&pre) || !self.dest_is_dir(&pre)? {
                        return Err(refused(
                            path,
                            format!("parent {pre} is neither streamed nor a directory in the destination"),
                        ));
                    }
                    sys::mkdirat(self.parent_fd(), &cname, 0o700)
                        .map_err(|e| io_err("mkdir", &pre, e))?;
                    sys::open_subdir(self.parent_fd(), &cname)
                        .map_err(|e| io_err("open", &pre, e))?
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                    return Err(refused(
                        path,
                        format!("parent {} is not a directory (symlink or file)", prefix()),
                    ));
                }
                Err(e) => return Err(io_err("open", path, e)),
            };
            self.stack.push((c.to_vec(), fd));
        }
        sys::cstring(last).map_err(|e| io_err("open", path, e))
    }

    fn check_xattrs(path: &RelPath, meta: &Meta) -> Result<()> {
        for (name, _) in &meta.xattrs {
            if !is_carried_xattr(name, TreeMode::OverlayUpper) {
                return Err(refused(
                    path,
                    format!(
                        "carries attribute {} which streams never carry",
                        String::from_utf8_lossy(name)
                    ),
                ));
            }
        }
        Ok(())
    }

    fn place(&mut self, path: &RelPath, covered: bool) {
        if self.update && !covered {
            self.actions.push(Action::Place(path.clone(), None));
        }
    }

    /// Ownership, mode, attributes and times of a just-created non-directory, non-file node.
    fn finish_node(&self, path: &RelPath, name: &CString, meta: &Meta, chmod: bool) -> Result<()> {
        let dir = self.parent_fd();
        sys::fchownat_nofollow(dir, name, meta.uid, meta.gid)
            .map_err(|e| io_err("chown", path, e))?;
        if chmod {
            sys::fchmodat(dir, name, meta.mode).map_err(|e| io_err("chmod", path, e))?;
        }
        if !meta.xattrs.is_empty() {
            let t = XTarget::name_in(dir, name).map_err(|e| io_err("xattr path", path, e))?;
            set_xattrs(&t, path, meta, false, self.mode, false)?;
        }
        sys::utimensat_nofollow(dir, name, meta.atime, meta.mtime)
            .map_err(|e| io_err("utimes", path, e))
    }

    fn entry(&mut self, e: Entry) -> Result<()> {
        let last_dir = self.last_dir.take();
        if let Some(meta) = e.meta() {
            Self::check_xattrs(e.path(), meta)?;
        }
        if let Entry::Root { meta } = e {
            self.saw_root = true;
            self.dirs.push(DirRec {
                path: RelPath::root(),
                meta,
                opaque: false,
                placed: !self.update,
            });
            if self.update {
                self.actions.push(Action::DirMeta(self.dirs.len() - 1));
            }
            return Ok(());
        }
        if !self.update && !self.saw_root {
            return Err(refused(
                e.path(),
                "a fresh apply needs the stream to start with ROOT",
            ));
        }
        let covered = self.update && self.covered(e.path());
        match e {
            Entry::Root { .. } => Ok(()),
            Entry::Dir { path, meta } => {
                let placed = !self.update || covered || !self.dest_is_dir(&path)?;
                let name = self.enter_parent(&path)?;
                sys::mkdirat(self.parent_fd(), &name, 0o700)
                    .map_err(|e| exists_err(&path, e, "mkdir"))?;
                self.dirs.push(DirRec {
                    path: path.clone(),
                    meta,
                    opaque: false,
                    placed,
                });
                let idx = self.dirs.len() - 1;
                if self.update && !covered {
                    if placed {
                        self.placed_dirs.insert(path.clone());
                        self.actions.push(Action::Place(path, Some(idx)));
                    } else {
                        self.actions.push(Action::DirMeta(idx));
                    }
                }
                self.last_dir = Some(idx);
                Ok(())
            }
            Entry::Opaque { path } => {
                let Some(idx) = last_dir.filter(|&i| self.dirs[i].path == path) else {
                    return Err(refused(
                        &path,
                        "OPAQUE does not directly follow its directory",
                    ));
                };
                if self.mode == TreeMode::OverlayUpper {
                    self.dirs[idx].opaque = true;
                } else if !self.dirs[idx].placed {
                    // A plain destination has no layers to hide: an opaque directory replaces
                    // the existing one wholesale.
                    self.dirs[idx].placed = true;
                    self.placed_dirs.insert(path.clone());
                    if let Some(last) = self.actions.last_mut() {
                        *last = Action::Place(path, Some(idx));
                    }
                }
                Ok(())
            }
            Entry::File {
                path, meta, size, ..
            } => {
                let name = self.enter_parent(&path)?;
                let fd = sys::openat(
                    self.parent_fd(),
                    &name,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    0o600,
                )
                .map_err(|e| exists_err(&path, e, "create"))?;
                sys::ftruncate(fd.as_fd(), size).map_err(|e| io_err("truncate", &path, e))?;
                self.place(&path, covered);
                self.file = Some(OpenFile { path, fd, meta });
                Ok(())
            }
            Entry::Symlink { path, meta, target } => {
                let name = self.enter_parent(&path)?;
                let t = sys::cstring(&target).map_err(|e| io_err("symlink", &path, e))?;
                sys::symlinkat(&t, self.parent_fd(), &name)
                    .map_err(|e| exists_err(&path, e, "symlink"))?;
                self.finish_node(&path, &name, &meta, false)?;
                self.place(&path, covered);
                Ok(())
            }
            Entry::Hardlink { path, target } => {
                let not_streamed = || {
                    refused(
                        &path,
                        format!("hard link target {target} was not streamed before it"),
                    )
                };
                let (tdir, tname) = match walk::open_parent(self.tree.as_fd(), &target)? {
                    Parent::Dir(d, n) => (d, n),
                    Parent::Missing => return Err(not_streamed()),
                };
                match sys::lstatat_opt(tdir.as_fd(), &tname)
                    .map_err(|e| io_err("lstat", &target, e))?
                {
                    None => return Err(not_streamed()),
                    Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                        return Err(refused(
                            &path,
                            format!("hard link target {target} is a directory"),
                        ))
                    }
                    Some(_) => {}
                }
                let name = self.enter_parent(&path)?;
                sys::linkat(tdir.as_fd(), &tname, self.parent_fd(), &name)
                    .map_err(|e| exists_err(&path, e, "link"))?;
                self.place(&path, covered);
                Ok(())
            }
            Entry::Whiteout { path } => {
                if self.mode == TreeMode::OverlayUpper {
                    let name = self.enter_parent(&path)?;
                    sys::mknodat(self.parent_fd(), &name, libc::S_IFCHR, 0)
                        .map_err(|e| exists_err(&path, e, "mknod whiteout"))?;
                    self.place(&path, covered);
                } else if self.update && !covered {
                    self.actions.push(Action::Remove(path));
                }
                Ok(())
            }
            Entry::Fifo { path, meta } => self.node(path, meta, libc::S_IFIFO, 0, covered),
            Entry::CharDev {
                path,
                meta,
                major,
                minor,
            } => self.node(
                path,
                meta,
                libc::S_IFCHR,
                sys::makedev(major, minor),
                covered,
            ),
            Entry::BlockDev {
                path,
                meta,
                major,
                minor,
            } => self.node(
                path,
                meta,
                libc::S_IFBLK,
                sys::makedev(major, minor),
                covered,
            ),
            Entry::Remove { path } => {
                if self.update && !covered {
                    self.actions.push(Action::Remove(path));
                }
                Ok(())
            }
        }
    }

    fn node(
        &mut self,
        path: RelPath,
        meta: Meta,
        kind: u32,
        dev: u64,
        covered: bool,
    ) -> Result<()> {
        let name = self.enter_parent(&path)?;
        sys::mknodat(self.parent_fd(), &name, kind | 0o600, dev)
            .map_err(|e| exists_err(&path, e, "mknod"))?;
        self.finish_node(&path, &name, &meta, true)?;
        self.place(&path, covered);
        Ok(())
    }

    fn data(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let Some(f) = &self.file else {
            return Err(refused("<data>", "data outside a file"));
        };
        sys::pwrite_all(f.fd.as_fd(), bytes, offset).map_err(|e| io_err("write", &f.path, e))
    }

    fn file_end(&mut self) -> Result<()> {
        let Some(f) = self.file.take() else {
            return Err(refused("<file end>", "no open file"));
        };
        let fd = f.fd.as_fd();
        set_fd_meta(fd, &f.path, &f.meta, false, self.mode, false)?;
        sys::futimens(fd, f.meta.atime, f.meta.mtime).map_err(|e| io_err("utimes", &f.path, e))
    }

    /// Gives staged directories their metadata, deepest first, now that nothing more will be
    /// created in them.
    fn finish_staged_dirs(&mut self) -> Result<()> {
        self.stack.clear();
        for d in self.dirs.iter().rev().filter(|d| d.placed) {
            let fd = open_dir_under(self.tree.as_fd(), &d.path)?
                .ok_or_else(|| refused(&d.path, "staged directory vanished"))?;
            set_fd_meta(fd.as_fd(), &d.path, &d.meta, d.opaque, self.mode, false)?;
            sys::futimens(fd.as_fd(), d.meta.atime, d.meta.mtime)
                .map_err(|e| io_err("utimes", &d.path, e))?;
        }
        Ok(())
    }
}

enum Undo {
    Placed(RelPath),
    MovedAside(RelPath, CString),
    Meta(RelPath, Meta, bool),
}

/// The incremental commit, with its journal for rollback.
struct Commit<'a> {
    ap: &'a Applier,
    dest_root: BorrowedFd<'a>,
    undo: OwnedFd,
    journal: Vec<Undo>,
    parent_times: HashMap<RelPath, (Timestamp, Timestamp)>,
    seq: u64,
    placed: u64,
    updated: u64,
    removed: u64,
}

impl Commit<'_> {
    fn next_name(&mut self) -> Result<CString> {
        self.seq += 1;
        sys::cstring(format!("{}", self.seq).as_bytes()).map_err(|e| io_err("name", "undo", e))
    }

    fn dest_parent(&self, path: &RelPath) -> Result<Option<(OwnedFd, CString)>> {
        match walk::open_parent(self.dest_root, path)? {
            Parent::Dir(d, n) => Ok(Some((d, n))),
            Parent::Missing => Ok(None),
        }
    }

    /// Records the times of the directory holding `path` before its first change.
    fn touch(&mut self, path: &RelPath, dir: BorrowedFd<'_>) -> Result<()> {
        let parent = path.parent().unwrap_or_else(RelPath::root);
        if let std::collections::hash_map::Entry::Vacant(slot) = self.parent_times.entry(parent) {
            let st = sys::fstat(dir).map_err(|e| io_err("fstat", slot.key(), e))?;
            slot.insert((sys::stat_atime(&st), sys::stat_mtime(&st)));
        }
        Ok(())
    }

    fn move_aside(&mut self, path: &RelPath, dir: BorrowedFd<'_>, name: &CString) -> Result<bool> {
        if sys::lstatat_opt(dir, name)
            .map_err(|e| io_err("lstat", path, e))?
            .is_none()
        {
            return Ok(false);
        }
        let aside = self.next_name()?;
        sys::renameat(dir, name, self.undo.as_fd(), &aside)
            .map_err(|e| io_err("move aside", path, e))?;
        self.journal.push(Undo::MovedAside(path.clone(), aside));
        Ok(true)
    }

    fn run(&mut self) -> Result<()> {
        for action in &self.ap.actions {
            match action {
                Action::Place(p, _) => {
                    let (dir, name) = self.dest_parent(p)?.ok_or_else(|| {
                        refused(p, "parent is missing or not a directory in the destination")
                    })?;
                    self.touch(p, dir.as_fd())?;
                    self.move_aside(p, dir.as_fd(), &name)?;
                    let (sdir, sname) = match walk::open_parent(self.ap.tree.as_fd(), p)? {
                        Parent::Dir(d, n) => (d, n),
                        Parent::Missing => return Err(refused(p, "staged entry vanished")),
                    };
                    sys::renameat(sdir.as_fd(), &sname, dir.as_fd(), &name)
                        .map_err(|e| io_err("rename into place", p, e))?;
                    self.journal.push(Undo::Placed(p.clone()));
                    self.placed += 1;
                }
                Action::DirMeta(i) => {
                    let d = &self.ap.dirs[*i];
                    let fd = open_dir_under(self.dest_root, &d.path)?.ok_or_else(|| {
                        refused(&d.path, "directory vanished from the destination")
                    })?;
                    let (old, old_opaque) = dir_meta_of(fd.as_fd(), &d.path, self.ap.mode)?;
                    self.journal
                        .push(Undo::Meta(d.path.clone(), old, old_opaque));
                    set_fd_meta(fd.as_fd(), &d.path, &d.meta, d.opaque, self.ap.mode, true)?;
                    self.updated += 1;
                }
                Action::Remove(p) => {
                    let Some((dir, name)) = self.dest_parent(p)? else {
                        continue;
                    };
                    self.touch(p, dir.as_fd())?;
                    if self.move_aside(p, dir.as_fd(), &name)? {
                        self.removed += 1;
                    }
                }
            }
        }
        let mut timed: HashSet<&RelPath> = HashSet::new();
        for action in &self.ap.actions {
            let d = match action {
                Action::DirMeta(i) => &self.ap.dirs[*i],
                Action::Place(_, Some(i)) => &self.ap.dirs[*i],
                Action::Place(_, None) => continue,
                Action::Remove(_) => continue,
            };
            if let Some(fd) = open_dir_under(self.dest_root, &d.path)? {
                sys::futimens(fd.as_fd(), d.meta.atime, d.meta.mtime)
                    .map_err(|e| io_err("utimes", &d.path, e))?;
            }
            timed.insert(&d.path);
        }
        for (p, (atime, mtime)) in &self.parent_times {
            if timed.contains(p) {
                continue;
            }
            if let Some(fd) = open_dir_under(self.dest_root, p)? {
                sys::futimens(fd.as_fd(), *atime, *mtime).map_err(|e| io_err("utimes", p, e))?;
            }
        }
        Ok(())
    }

    /// Undoes the journal in reverse. Keeps going past a failing step, so one stuck entry does
    /// not leave every other change in place, and reports the first failure.
    fn rollback(&mut self) -> Result<()> {
        let mut first_err = None;
        while let Some(u) = self.journal.pop() {
            if let Err(e) = self.undo_one(u) {
                first_err.get_or_insert(e);
            }
        }
        let times: Vec<(RelPath, (Timestamp, Timestamp))> = self
            .parent_times
            .iter()
            .map(|(p, t)| (p.clone(), *t))
            .collect();
        for (p, (atime, mtime)) in times {
            let r = open_dir_under(self.dest_root, &p).and_then(|fd| match fd {
                Some(fd) => {
                    sys::futimens(fd.as_fd(), atime, mtime).map_err(|e| io_err("utimes", &p, e))
                }
                None => Ok(()),
            });
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn undo_one(&mut self, u: Undo) -> Result<()> {
        match u {
            Undo::Placed(p) => {
                if let Some((dir, name)) = self.dest_parent(&p)? {
                    let trash = self.next_name()?;
                    sys::renameat(dir.as_fd(), &name, self.undo.as_fd(), &trash)
                        .map_err(|e| io_err("roll back placement", &p, e))?;
                }
            }
            Undo::MovedAside(p, aside) => {
                let (dir, name) = self
                    .dest_parent(&p)?
                    .ok_or_else(|| refused(&p, "parent vanished during rollback"))?;
                sys::renameat(self.undo.as_fd(), &aside, dir.as_fd(), &name)
                    .map_err(|e| io_err("restore original", &p, e))?;
            }
            Undo::Meta(p, meta, opaque) => {
                if let Some(fd) = open_dir_under(self.dest_root, &p)? {
                    if dir_meta_of(fd.as_fd(), &p, self.ap.mode)? != (meta.clone(), opaque) {
                        set_fd_meta(fd.as_fd(), &p, &meta, opaque, self.ap.mode, true)?;
                        sys::futimens(fd.as_fd(), meta.atime, meta.mtime)
                            .map_err(|e| io_err("utimes", &p, e))?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn apply<R: Read>(
    mut reader: StreamReader<R>,
    dest: &Path,
    opts: &ApplyOptions,
) -> Result<ApplySummary> {
    let update = opts.target == ApplyTarget::Update;
    let dest_root = if update {
        Some(sys::open_dir_path(dest).map_err(|e| io_err("open destination", dest.display(), e))?)
    } else {
        match std::fs::symlink_metadata(dest) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("stat destination", dest.display(), e)),
            Ok(m) => {
                let empty = m.is_dir()
                    && std::fs::read_dir(dest)
                        .map_err(|e| io_err("readdir", dest.display(), e))?
                        .next()
                        .is_none();
                if !empty {
                    return Err(FsError::DestNotEmpty {
                        path: dest.display().to_string(),
                    });
                }
            }
        }
        None
    };
    let mut staging = Staging::create(dest)?;
    let tree_path = staging.path.join("tree");
    let tree = sys::open_dir_path(&tree_path)
        .map_err(|e| io_err("open staging", tree_path.display(), e))?;
    let mut ap = Applier {
        mode: opts.mode,
        update,
        tree,
        dest_root,
        stack: Vec::new(),
        dirs: Vec::new(),
        placed_dirs: HashSet::new(),
        actions: Vec::new(),
        last_dir: None,
        file: None,
        saw_root: false,
    };
    let trailer = loop {
        match reader.next_record()? {
            Record::Entry(e) => ap.entry(e)?,
            Record::Data { offset, bytes } => ap.data(offset, bytes)?,
            Record::FileEnd { .. } => ap.file_end()?,
            Record::End(t) => break t,
        }
    };
    if !update && !ap.saw_root {
        return Err(refused(
            ".",
            "a fresh apply needs the stream to start with ROOT",
        ));
    }
    ap.finish_staged_dirs()?;
    if opts.durable {
        sys::syncfs(ap.tree.as_fd()).map_err(|e| io_err("syncfs", tree_path.display(), e))?;
    }

    let mut summary = ApplySummary {
        counts: trailer.counts,
        stream_bytes: trailer.stream_bytes,
        placed: 0,
        updated_dirs: 0,
        removed: 0,
    };
    match &ap.dest_root {
        None => {
            std::fs::rename(&tree_path, dest)
                .map_err(|e| io_err("rename into place", dest.display(), e))?;
            if let Some(root) = ap.dirs.first() {
                let fd = sys::open_dir_path(dest)
                    .map_err(|e| io_err("open destination", dest.display(), e))?;
                sys::futimens(fd.as_fd(), root.meta.atime, root.meta.mtime)
                    .map_err(|e| io_err("utimes", dest.display(), e))?;
            }
            summary.placed = 1;
        }
        Some(root) => {
            let undo_path = staging.path.join("undo");
            let undo = sys::open_dir_path(&undo_path)
                .map_err(|e| io_err("open staging", undo_path.display(), e))?;
            let mut c = Commit {
                ap: &ap,
                dest_root: root.as_fd(),
                undo,
                journal: Vec::new(),
                parent_times: HashMap::new(),
                seq: 0,
                placed: 0,
                updated: 0,
                removed: 0,
            };
            if let Err(cause) = c.run() {
                return Err(match c.rollback() {
                    Ok(()) => cause,
                    Err(rb) => {
                        staging.keep = true;
                        FsError::RollbackFailed {
                            cause: Box::new(cause),
                            rollback: Box::new(rb),
                            undo_dir: undo_path.display().to_string(),
                        }
                    }
                });
            }
            summary.placed = c.placed;
            summary.updated_dirs = c.updated;
            summary.removed = c.removed;
        }
    }
    if opts.durable {
        let fd =
            sys::open_dir_path(dest).map_err(|e| io_err("open destination", dest.display(), e))?;
        sys::syncfs(fd.as_fd()).map_err(|e| io_err("syncfs", dest.display(), e))?;
    }
    Ok(summary)
}
