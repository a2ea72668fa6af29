//! Thin, fd-relative wrappers over the system calls this crate needs.
//!
//! Everything goes through a directory fd plus one name component, opened with `O_NOFOLLOW`, so
//! neither a hostile stream nor a container racing the walk can redirect a read or a write
//! through a symlink.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::entry::Timestamp;

pub(crate) type Stat = libc::stat;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_retry(mut f: impl FnMut() -> libc::c_int) -> io::Result<libc::c_int> {
    loop {
        let r = f();
        if r >= 0 {
            return Ok(r);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub(crate) fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in name"))
}

/// Opens a caller-given directory path (followed: the caller names its own roots).
pub(crate) fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path.as_os_str().as_bytes())?;
    let fd = cvt_retry(|| unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn openat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    let fd = cvt_retry(|| unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode as libc::c_uint,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a subdirectory without following a symlink in its place.
pub(crate) fn open_subdir(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// Opens a regular file for reading without touching its atime where permitted.
pub(crate) fn open_read(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    match openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_NOATIME | libc::O_NONBLOCK,
        0,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            openat(dir, name, libc::O_RDONLY | libc::O_NONBLOCK, 0)
        }
        r => r,
    }
}

pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    let mut st = MaybeUninit::<Stat>::uninit();
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    Ok(unsafe { st.assume_init() })
}

pub(crate) fn lstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Stat> {
    let mut st = MaybeUninit::<Stat>::uninit();
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

/// `lstatat`, with "not there" as `None`.
pub(crate) fn lstatat_opt(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<Stat>> {
    match lstatat(dir, name) {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub(crate) fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

pub(crate) fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, dev: u64) -> io::Result<()> {
    cvt(unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::mode_t,
            dev as libc::dev_t,
        )
    })
    .map(drop)
}

pub(crate) fn linkat(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
) -> io::Result<()> {
    cvt(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            0,
        )
    })
    .map(drop)
}

pub(crate) fn renameat(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
) -> io::Result<()> {
    cvt(unsafe {
        libc::renameat(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
        )
    })
    .map(drop)
}

pub(crate) fn fchownat_nofollow(
    dir: BorrowedFd<'_>,
    name: &CStr,
    uid: u32,
    gid: u32,
) -> io::Result<()> {
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub(crate) fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

pub(crate) fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) }).map(drop)
}

/// `fchmodat` on a name the caller has just created itself (fifo, device node) in a directory
/// only it writes to; Linux has no no-follow chmod for those before `fchmodat2`.
pub(crate) fn fchmodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t, 0) })
        .map(drop)
}

fn timespec(t: Timestamp) -> libc::timespec {
    libc::timespec {
        tv_sec: t.sec as libc::time_t,
        tv_nsec: t.nsec as libc::c_long,
    }
}

pub(crate) fn utimensat_nofollow(
    dir: BorrowedFd<'_>,
    name: &CStr,
    atime: Timestamp,
    mtime: Timestamp,
) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub(crate) fn futimens(fd: BorrowedFd<'_>, atime: Timestamp, mtime: Timestamp) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), ts.as_ptr()) }).map(drop)
}

pub(crate) fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub(crate) fn stat_atime(st: &Stat) -> Timestamp {
    Timestamp {
        sec: st.st_atime,
        nsec: st.st_atime_nsec as u32,
    }
}

pub(crate) fn stat_mtime(st: &Stat) -> Timestamp {
    Timestamp {
        sec: st.st_mtime,
        nsec: st.st_mtime_nsec as u32,
    }
}

pub(crate) fn stat_ctime(st: &Stat) -> Timestamp {
    Timestamp {
        sec: st.st_ctime,
        nsec: st.st_ctime_nsec as u32,
    }
}

pub(crate) fn dev_major(dev: u64) -> u32 {
    libc::major(dev as libc::dev_t)
}

pub(crate) fn dev_minor(dev: u64) -> u32 {
    libc::minor(dev as libc::dev_t)
}

pub(crate) fn makedev(major: u32, minor: u32) -> u64 {
    libc::makedev(major, minor) as u64
}

/// Where extended attributes are read or written: an open fd (files, directories), or a name in
/// a directory fd reached through `/proc/self/fd` with the no-follow `l*xattr` calls (symlinks,
/// fifos, devices, which cannot be opened for this).
pub(crate) enum XTarget<'a> {
    Fd(BorrowedFd<'a>),
    Name(CString),
}

impl<'a> XTarget<'a> {
    pub(crate) fn name_in(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<XTarget<'a>> {
        let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        p.extend_from_slice(name.to_bytes());
        Ok(XTarget::Name(cstring(&p)?))
    }
}

fn grow_loop(mut call: impl FnMut(*mut u8, usize) -> isize) -> io::Result<Vec<u8>> {
    let mut size = 256usize;
    loop {
        let mut buf = vec![0u8; size];
        let n = call(buf.as_mut_ptr(), buf.len());
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && size < (1 << 20) {
            size *= 4;
            continue;
        }
        return Err(e);
    }
}

pub(crate) fn list_xattrs(t: &XTarget<'_>) -> io::Result<Vec<Vec<u8>>> {
    let raw = grow_loop(|p, n| unsafe {
        match t {
            XTarget::Fd(fd) => libc::flistxattr(fd.as_raw_fd(), p.cast(), n),
            XTarget::Name(c) => libc::llistxattr(c.as_ptr(), p.cast(), n),
        }
    });
    let raw = match raw {
        Ok(r) => r,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(raw
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| n.to_vec())
        .collect())
}

/// Reads one attribute; `None` when it vanished since it was listed.
pub(crate) fn get_xattr(t: &XTarget<'_>, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let cname = cstring(name)?;
    let r = grow_loop(|p, n| unsafe {
        match t {
            XTarget::Fd(fd) => libc::fgetxattr(fd.as_raw_fd(), cname.as_ptr(), p.cast(), n),
            XTarget::Name(c) => libc::lgetxattr(c.as_ptr(), cname.as_ptr(), p.cast(), n),
        }
    });
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn set_xattr(t: &XTarget<'_>, name: &[u8], value: &[u8]) -> io::Result<()> {
    let cname = cstring(name)?;
    cvt(unsafe {
        match t {
            XTarget::Fd(fd) => libc::fsetxattr(
                fd.as_raw_fd(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            ),
            XTarget::Name(c) => libc::lsetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            ),
        }
    })
    .map(drop)
}

pub(crate) fn remove_xattr(t: &XTarget<'_>, name: &[u8]) -> io::Result<()> {
    let cname = cstring(name)?;
    let r = cvt(unsafe {
        match t {
            XTarget::Fd(fd) => libc::fremovexattr(fd.as_raw_fd(), cname.as_ptr()),
            XTarget::Name(c) => libc::lremovexattr(c.as_ptr(), cname.as_ptr()),
        }
    });
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
        r => r.map(drop),
    }
}

/// Data ranges of an open regular file of `size` bytes, found with `SEEK_DATA`/`SEEK_HOLE`.
/// File systems without hole reporting yield one extent covering the whole file.
pub(crate) fn data_extents(fd: BorrowedFd<'_>, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let raw: RawFd = fd.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let data = unsafe { libc::lseek(raw, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break,
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if out.is_empty() && pos == 0 => {
                    return Ok(vec![(0, size)]);
                }
                _ => return Err(e),
            }
        }
        let data = data as u64;
        if data >= size {
            break;
        }
        let hole = unsafe { libc::lseek(raw, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = (hole as u64).min(size);
        if end <= data {
            break;
        }
        out.push((data, end - data));
        pos = end;
    }
    Ok(out)
}

pub(crate) fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let n = cvt_retry_isize(|| unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            off as libc::off_t,
        )
    })?;
    Ok(n as usize)
}

pub(crate) fn pwrite_all(fd: BorrowedFd<'_>, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let n = cvt_retry_isize(|| unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                off as libc::off_t,
            )
        })?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwrite wrote nothing",
            ));
        }
        buf = &buf[n as usize..];
        off += n as u64;
    }
    Ok(())
}

fn cvt_retry_isize(mut f: impl FnMut() -> isize) -> io::Result<isize> {
    loop {
        let r = f();
        if r >= 0 {
            return Ok(r);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub(crate) fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    if size > i64::MAX as u64 {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    }
    cvt_retry(|| unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) }).map(drop)
}

/// Directory entry names of an open directory, sorted bytewise, without `.` and `..`.
pub(crate) fn read_dir_names(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let proc_path = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let mut names = Vec::new();
    for ent in std::fs::read_dir(proc_path)? {
        let ent = ent?;
        names.push(cstring(ent.file_name().as_bytes())?);
    }
    names.sort();
    Ok(names)
}

pub(crate) fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}
