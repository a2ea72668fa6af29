//! Takes a container's TCP sockets out of repair mode.
//!
//! CRIU puts every established socket into TCP repair mode while it dumps and takes them out
//! again only if it finishes normally. A post-copy dump that is aborted (CRIU killed while it
//! serves pages) leaves them in repair mode, and such a socket answers the peer's next segment
//! with a reset: the rollback would resume the processes with every connection dead. Each
//! socket is reached through `pidfd_getfd` (a duplicate of the task's own descriptor), so the
//! change applies to the very socket the process holds.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::NetError;

/// `TCP_REPAIR` option value that leaves repair mode without sending a window probe.
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;

fn io(step: &str, e: std::io::Error) -> NetError {
    NetError::Io {
        step: step.to_string(),
        cause: e,
    }
}

/// Every task in the pid namespace of `pid` (the container's init).
fn container_tasks(pid: u32) -> Result<Vec<u32>, NetError> {
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid"))
        .map_err(|e| io("repair off: container pid namespace", e))?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .map_err(|e| io("repair off: /proc", e))?
        .flatten()
    {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{p}/ns/pid"))
            .ok()
            .as_ref()
            == Some(&ns)
        {
            out.push(p);
        }
    }
    Ok(out)
}

fn socket_inode(link: &std::path::Path) -> Option<u64> {
    let target = std::fs::read_link(link).ok()?;
    let s = target.to_str()?;
    s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Turns repair mode off on every TCP socket the container's tasks hold. Returns how many
/// sockets were in repair mode. Sockets shared between tasks are handled once.
pub fn repair_off(pid: u32) -> Result<usize, NetError> {
    let mut seen = HashSet::new();
    let mut fixed = 0;
    for task in container_tasks(pid)? {
        // SAFETY: plain syscall; a negative return is checked below.
        let pidfd =
            unsafe { libc::syscall(libc::SYS_pidfd_open, task as libc::c_int, 0) } as libc::c_int;
        if pidfd < 0 {
            continue;
        }
        // SAFETY: pidfd_open returned a fresh descriptor we now own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{task}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Some(inode) = socket_inode(&fd.path()) else {
                continue;
            };
            if !seen.insert(inode) {
                continue;
            }
            let Some(num) = fd
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<libc::c_int>().ok())
            else {
                continue;
            };
            // SAFETY: plain syscall duplicating the task's descriptor into ours.
            let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), num, 0) }
                as libc::c_int;
            if dup < 0 {
                continue;
            }
            // SAFETY: pidfd_getfd returned a fresh descriptor we now own.
            let sock = unsafe { OwnedFd::from_raw_fd(dup) };
            if in_repair(&sock) {
                let v: libc::c_int = TCP_REPAIR_OFF_NO_WP;
                // SAFETY: setsockopt with a valid int option on a socket descriptor we own.
                let r = unsafe {
                    libc::setsockopt(
                        sock.as_raw_fd(),
                        libc::IPPROTO_TCP,
                        libc::TCP_REPAIR,
                        (&v as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if r != 0 {
                    return Err(io(
                        &format!("repair off: socket fd {num} of task {task}"),
                        std::io::Error::last_os_error(),
                    ));
                }
                fixed += 1;
            }
        }
    }
    Ok(fixed)
}

fn in_repair(sock: &OwnedFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a local int; non-TCP sockets fail and count as not in repair.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0 && v != 0
}
