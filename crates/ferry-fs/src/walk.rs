//! Reading a source tree.
//!
//! The source may belong to a running container, so every entry is reached from an open
//! directory fd with `O_NOFOLLOW`, and an entry that vanishes or changes type between `readdir`
//! and `open` is skipped rather than failing the pass: it is not in the pass's manifest, so the
//! next pass sends it.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use crate::entry::{Meta, TreeMode};
use crate::error::{io_err, FsError, Result};
use crate::path::RelPath;
use crate::sys::{self, Stat, XTarget};

/// What kind of inode an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
    /// Overlay whiteout (char device 0/0 in an upper dir).
    Whiteout,
}

pub(crate) struct Item {
    pub path: RelPath,
    pub st: Stat,
    pub kind: Kind,
    pub meta: Meta,
    pub opaque: bool,
    pub fd: Option<OwnedFd>,
    pub target: Vec<u8>,
}

impl Item {
    pub fn rdev(&self) -> (u32, u32) {
        match self.kind {
            Kind::CharDev | Kind::BlockDev => (
                sys::dev_major(self.st.st_rdev),
                sys::dev_minor(self.st.st_rdev),
            ),
            _ => (0, 0),
        }
    }

    /// Whether another name in the tree may share this inode.
    pub fn linkable(&self) -> bool {
        !matches!(self.kind, Kind::Dir | Kind::Whiteout) && self.st.st_nlink > 1
    }
}

type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

enum XattrUse {
    Keep,
    Skip,
    Opaque,
}

fn classify_xattr(
    name: &[u8],
    value: &[u8],
    mode: TreeMode,
) -> std::result::Result<XattrUse, &'static str> {
    if name.starts_with(b"user.") || name == b"security.capability" {
        return Ok(XattrUse::Keep);
    }
    if mode == TreeMode::OverlayUpper {
        match name {
            b"trusted.overlay.opaque" if value == b"y" => return Ok(XattrUse::Opaque),
            b"trusted.overlay.opaque"
            | b"trusted.overlay.redirect"
            | b"trusted.overlay.whiteout" => return Ok(XattrUse::Keep),
            b"trusted.overlay.metacopy" => {
                return Err("overlay metacopy file (data lives in a lower layer)")
            }
            _ => {}
        }
    }
    Ok(XattrUse::Skip)
}

/// Whether an attribute of this name is one this crate carries for `mode` (so an applier may
/// remove it when the source no longer has it).
pub(crate) fn is_carried_xattr(name: &[u8], mode: TreeMode) -> bool {
    name.starts_with(b"user.")
        || name == b"security.capability"
        || (mode == TreeMode::OverlayUpper
            && matches!(
                name,
                b"trusted.overlay.opaque"
                    | b"trusted.overlay.redirect"
                    | b"trusted.overlay.whiteout"
            ))
}

/// Reads the carried attributes; `Ok(None)` when the entry vanished meanwhile.
fn read_xattrs(t: &XTarget<'_>, mode: TreeMode, path: &RelPath) -> Result<Option<(Xattrs, bool)>> {
    let names = match sys::list_xattrs(t) {
        Ok(n) => n,
        Err(e) if vanished(&e) => return Ok(None),
        Err(e) => return Err(io_err("listxattr", path, e)),
    };
    let mut out = Vec::new();
    let mut opaque = false;
    for name in names {
        if !(name.starts_with(b"user.")
            || name.starts_with(b"security.")
            || name.starts_with(b"trusted."))
        {
            continue;
        }
        let value = match sys::get_xattr(t, &name) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) if vanished(&e) => return Ok(None),
            Err(e) => return Err(io_err("getxattr", path, e)),
        };
        match classify_xattr(&name, &value, mode) {
            Ok(XattrUse::Keep) => out.push((name, value)),
            Ok(XattrUse::Skip) => {}
            Ok(XattrUse::Opaque) => opaque = true,
            Err(what) => {
                return Err(FsError::Unsupported {
                    path: path.to_string(),
                    what,
                })
            }
        }
    }
    out.sort();
    Ok(Some((out, opaque)))
}

pub(crate) fn vanished(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP) | Some(libc::ENXIO)
    )
}

fn meta_from(st: &Stat, xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Meta {
    Meta {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        atime: sys::stat_atime(st),
        mtime: sys::stat_mtime(st),
        xattrs,
    }
}

fn kind_of(st: &Stat, mode: TreeMode) -> Option<Kind> {
    Some(match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFREG => Kind::File,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        libc::S_IFCHR if mode == TreeMode::OverlayUpper && st.st_rdev == 0 => Kind::Whiteout,
        libc::S_IFCHR => Kind::CharDev,
        libc::S_IFBLK => Kind::BlockDev,
        _ => return None,
    })
}

/// Outcome of looking at one name.
pub(crate) enum Look {
    Found(Box<Item>),
    /// Not there (any more), or raced into something else.
    Gone,
    /// A socket: meaningless without its listener, and CRIU re-binds the ones it restores.
    Socket,
}

/// Examines `name` in `dir`, opening files and directories without following symlinks.
pub(crate) fn inspect(
    dir: BorrowedFd<'_>,
    name: &CStr,
    path: RelPath,
    mode: TreeMode,
) -> Result<Look> {
    let st = match sys::lstatat(dir, name) {
        Ok(st) => st,
        Err(e) if vanished(&e) => return Ok(Look::Gone),
        Err(e) => return Err(io_err("lstat", &path, e)),
    };
    let Some(kind) = kind_of(&st, mode) else {
        return Ok(if st.st_mode & libc::S_IFMT == libc::S_IFSOCK {
            Look::Socket
        } else {
            Look::Gone
        });
    };
    match kind {
        Kind::Dir | Kind::File => {
            let opened = if kind == Kind::Dir {
                sys::open_subdir(dir, name)
            } else {
                sys::open_read(dir, name)
            };
            let fd = match opened {
                Ok(fd) => fd,
                Err(e) if vanished(&e) => return Ok(Look::Gone),
                Err(e) => return Err(io_err("open", &path, e)),
            };
            let st = sys::fstat(fd.as_fd()).map_err(|e| io_err("fstat", &path, e))?;
            if kind_of(&st, mode) != Some(kind) {
                return Ok(Look::Gone);
            }
            let Some((xattrs, opaque)) = read_xattrs(&XTarget::Fd(fd.as_fd()), mode, &path)? else {
                return Ok(Look::Gone);
            };
            Ok(Look::Found(Box::new(Item {
                path,
                meta: meta_from(&st, xattrs),
                st,
                kind,
                opaque: opaque && kind == Kind::Dir,
                fd: Some(fd),
                target: Vec::new(),
            })))
        }
        _ => {
            let target = if kind == Kind::Symlink {
                match sys::readlinkat(dir, name) {
                    Ok(t) => t,
                    Err(e) if vanished(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                        return Ok(Look::Gone)
                    }
                    Err(e) => return Err(io_err("readlink", &path, e)),
                }
            } else {
                Vec::new()
            };
            let xattrs = if kind == Kind::Whiteout {
                Vec::new()
            } else {
                let t = XTarget::name_in(dir, name).map_err(|e| io_err("xattr path", &path, e))?;
                match read_xattrs(&t, mode, &path)? {
                    Some((x, _)) => x,
                    None => return Ok(Look::Gone),
                }
            };
            Ok(Look::Found(Box::new(Item {
                path,
                meta: meta_from(&st, xattrs),
                st,
                kind,
                opaque: false,
                fd: None,
                target,
            })))
        }
    }
}

/// Examines the root directory itself.
pub(crate) fn inspect_root(root: &Path, mode: TreeMode) -> Result<Item> {
    let fd = sys::open_dir_path(root).map_err(|e| io_err("open root", root.display(), e))?;
    let st = sys::fstat(fd.as_fd()).map_err(|e| io_err("fstat", root.display(), e))?;
    let (xattrs, _) =
        read_xattrs(&XTarget::Fd(fd.as_fd()), mode, &RelPath::root())?.ok_or_else(|| {
            io_err(
                "listxattr",
                root.display(),
                io::Error::from_raw_os_error(libc::ENOENT),
            )
        })?;
    Ok(Item {
        path: RelPath::root(),
        meta: meta_from(&st, xattrs),
        st,
        kind: Kind::Dir,
        opaque: false,
        fd: Some(fd),
        target: Vec::new(),
    })
}

/// Walks `root` depth-first, directories before their contents, names in byte order, calling
/// `visit` for the root and every entry. Sockets go to `skipped`.
pub(crate) fn walk(
    root: &Path,
    mode: TreeMode,
    visit: &mut dyn FnMut(&mut Item) -> Result<()>,
    skipped: &mut Vec<RelPath>,
) -> Result<()> {
    struct Frame {
        fd: OwnedFd,
        path: RelPath,
        names: std::vec::IntoIter<CString>,
    }
    let mut root_item = inspect_root(root, mode)?;
    visit(&mut root_item)?;
    let Some(root_fd) = root_item.fd.take() else {
        return Ok(());
    };
    let names =
        sys::read_dir_names(root_fd.as_fd()).map_err(|e| io_err("readdir", root.display(), e))?;
    let mut stack = vec![Frame {
        fd: root_fd,
        path: RelPath::root(),
        names: names.into_iter(),
    }];
    while let Some(frame) = stack.last_mut() {
        let Some(name) = frame.names.next() else {
            stack.pop();
            continue;
        };
        let path = frame
            .path
            .join(name.to_bytes())
            .map_err(|reason| FsError::InvalidPath {
                path: format!(
                    "{}/{}",
                    frame.path,
                    String::from_utf8_lossy(name.to_bytes())
                ),
                reason,
            })?;
        let mut item = match inspect(frame.fd.as_fd(), &name, path, mode)? {
            Look::Found(item) => item,
            Look::Gone => continue,
            Look::Socket => {
                if let Ok(p) = frame.path.join(name.to_bytes()) {
                    skipped.push(p);
                }
                continue;
            }
        };
        visit(&mut item)?;
        if item.kind == Kind::Dir {
            if let Some(fd) = item.fd.take() {
                let names = match sys::read_dir_names(fd.as_fd()) {
                    Ok(n) => n,
                    Err(e) if vanished(&e) => continue,
                    Err(e) => return Err(io_err("readdir", &item.path, e)),
                };
                stack.push(Frame {
                    fd,
                    path: item.path,
                    names: names.into_iter(),
                });
            }
        }
    }
    Ok(())
}

/// Outcome of resolving a path's parent under a root without following symlinks.
pub(crate) enum Parent {
    /// The parent directory, and the final name in it.
    Dir(OwnedFd, CString),
    /// Some ancestor is missing or is not a real directory.
    Missing,
}

/// Opens the parent of `path` under `root`, one `O_NOFOLLOW` component at a time.
pub(crate) fn open_parent(root: BorrowedFd<'_>, path: &RelPath) -> Result<Parent> {
    let comps: Vec<&[u8]> = path.components().collect();
    let Some((last, dirs)) = comps.split_last() else {
        return Err(FsError::InvalidPath {
            path: path.to_string(),
            reason: crate::path::PathError::Empty,
        });
    };
    let mut cur: Option<OwnedFd> = None;
    for c in dirs {
        let cname = sys::cstring(c).map_err(|e| io_err("open", path, e))?;
        let dir = match &cur {
            Some(fd) => fd.as_fd(),
            None => root,
        };
        match sys::open_subdir(dir, &cname) {
            Ok(fd) => cur = Some(fd),
            Err(e) if vanished(&e) => return Ok(Parent::Missing),
            Err(e) => return Err(io_err("open parent", path, e)),
        }
    }
    let fd = match cur {
        Some(fd) => fd,
        None => root
            .try_clone_to_owned()
            .map_err(|e| io_err("dup", path, e))?,
    };
    let name = sys::cstring(last).map_err(|e| io_err("open", path, e))?;
    Ok(Parent::Dir(fd, name))
}
