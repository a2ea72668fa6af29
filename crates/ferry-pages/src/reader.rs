//! The source agent's own page reader: a second page channel for the target's read-ahead.
//!
//! CRIU's page server answers one request at a time on its one connection, so a page fault
//! the target forwards there waits behind every read-ahead request queued before it (4–12 ms
//! each in the settled transfer of a 512 MB post-copy), and the read-ahead must hold back
//! while the restored process faults. A lazy dump keeps the tasks seized until the last page
//! has been served, their memory unchanged, so the source agent can read the lazy ranges
//! itself (`process_vm_readv`, as CRIU's own `--lazy-pages-read` does) and answer the
//! read-ahead on a connection of its own, leaving CRIU's connection to the faults.
//!
//! The reader speaks the page server's protocol (a `PS_IOV_GET` answered by a `PS_IOV_ADD_F`
//! header and the pages), so the proxy handles both lanes alike. It serves only the lazy
//! ranges of the checkpoint's pagemap images and closes the channel on anything else; the
//! proxy then carries on through CRIU's connection alone.

use std::collections::BTreeMap;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::pagemap::LazyPages;
use crate::ps::{PsIov, IOV_LEN, PAGE_SIZE, PS_IOV_GET};

/// Most pages one request may ask for: the proxy asks for 64 at a time; CRIU's daemon for at
/// most 4 MiB.
pub const MAX_READ_PAGES: u64 = 4096;

/// Memory of the checkpointed processes, by the page server's process id.
pub trait TaskMemory {
    /// Fills `buf` with the bytes at `vaddr` of process `dst`, all of them or an error.
    fn read(&mut self, dst: u64, vaddr: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

/// The seized tasks of a lazy dump, read with `process_vm_readv`.
#[derive(Debug, Clone, Default)]
pub struct SeizedTasks {
    /// Host pid by the page server's id (the pid in the container's namespace).
    pids: BTreeMap<u64, i32>,
}

impl SeizedTasks {
    pub fn new(pids: BTreeMap<u64, i32>) -> Self {
        SeizedTasks { pids }
    }

    pub fn len(&self) -> usize {
        self.pids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
    }
}

impl TaskMemory for SeizedTasks {
    fn read(&mut self, dst: u64, vaddr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let pid = *self.pids.get(&dst).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no seized task with id {dst}"),
            )
        })?;
        let mut done = 0usize;
        while done < buf.len() {
            let len = buf.len() - done;
            let remote = [nix::sys::uio::RemoteIoVec {
                base: (vaddr as usize).wrapping_add(done),
                len,
            }];
            let mut local = [std::io::IoSliceMut::new(&mut buf[done..])];
            let n = nix::sys::uio::process_vm_readv(
                nix::unistd::Pid::from_raw(pid),
                &mut local,
                &remote,
            )
            .map_err(std::io::Error::from)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "pid {pid}: nothing readable at {:#x}",
                        vaddr as usize + done
                    ),
                ));
            }
            done += n;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    pub requests: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("refused a request for {nr} pages at {vaddr:#x} of process {dst}: {why}")]
    Refused {
        dst: u64,
        vaddr: u64,
        nr: u64,
        why: String,
    },
    #[error("reading {nr} pages at {vaddr:#x} of process {dst}: {source}")]
    Read {
        dst: u64,
        vaddr: u64,
        nr: u64,
        source: std::io::Error,
    },
}

/// Serves page reads on `conn` until the other side closes it. Returns an error, and so closes
/// the channel, on a request outside `lazy` or a read that fails.
pub async fn serve_reads<S, M>(
    conn: S,
    lazy: &LazyPages,
    mem: &mut M,
) -> Result<ReaderStats, ReaderError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    M: TaskMemory,
{
    let (mut rd, mut wr) = tokio::io::split(conn);
    let mut stats = ReaderStats::default();
    let mut buf = Vec::new();
    loop {
        let mut hb = [0u8; IOV_LEN];
        match rd.read_exact(&mut hb).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(stats),
            Err(source) => {
                return Err(ReaderError::Io {
                    step: "reading a page request",
                    source,
                })
            }
        }
        let req = PsIov::decode(&hb);
        let (dst, vaddr, nr) = (req.dst_id, req.vaddr, req.nr_pages);
        let refuse = |why: String| ReaderError::Refused {
            dst,
            vaddr,
            nr,
            why,
        };
        if req.command() != PS_IOV_GET {
            return Err(refuse(format!(
                "command {:#x}: only page requests are served here",
                req.cmd
            )));
        }
        if nr == 0 || nr > MAX_READ_PAGES || vaddr % PAGE_SIZE != 0 {
            return Err(refuse(format!(
                "between 1 and {MAX_READ_PAGES} whole pages are served"
            )));
        }
        let end = vaddr
            .checked_add(nr * PAGE_SIZE)
            .ok_or_else(|| refuse("past the end of the address space".into()))?;
        let inside = lazy
            .get(&dst)
            .and_then(|r| r.containing(vaddr))
            .is_some_and(|(_, e)| e >= end);
        if !inside {
            return Err(refuse("not within one lazy range of the checkpoint".into()));
        }
        let len = (end - vaddr) as usize;
        buf.resize(len, 0);
        mem.read(dst, vaddr, &mut buf)
            .map_err(|source| ReaderError::Read {
                dst,
                vaddr,
                nr,
                source,
            })?;
        let io = |source| ReaderError::Io {
            step: "sending pages",
            source,
        };
        wr.write_all(&PsIov::pages(dst, vaddr, nr).encode())
            .await
            .map_err(io)?;
        wr.write_all(&buf).await.map_err(io)?;
        wr.flush().await.map_err(io)?;
        stats.requests += 1;
        stats.bytes += len as u64;
    }
}

/// The host pid of each process of a container by its pid in the container's namespace: the
/// last `NSpid` field of `/proc/<pid>/status` for each pid in `host_pids`. Processes that are
/// gone are left out.
pub fn namespace_pids(host_pids: &[i32]) -> BTreeMap<u64, i32> {
    let mut out = BTreeMap::new();
    for &pid in host_pids {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        if let Some(ns) = nspid(&status) {
            out.insert(ns, pid);
        }
    }
    out
}

/// The innermost pid of a `/proc/<pid>/status` text.
fn nspid(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ps::{lazy_dst, PS_IOV_ADD_F};
    use tokio::io::DuplexStream;

    /// Memory whose every byte says which process and page it belongs to.
    struct Patterned {
        reads: Vec<(u64, u64, usize)>,
    }

    fn byte(dst: u64, addr: u64) -> u8 {
        (dst as u8).wrapping_mul(17) ^ ((addr / PAGE_SIZE) as u8)
    }

    impl TaskMemory for Patterned {
        fn read(&mut self, dst: u64, vaddr: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.reads.push((dst, vaddr, buf.len()));
            for (i, b) in buf.iter_mut().enumerate() {
                *b = byte(dst, vaddr + i as u64);
            }
            Ok(())
        }
    }

    fn lazy() -> LazyPages {
        let mut l = LazyPages::new();
        l.entry(lazy_dst(1))
            .or_default()
            .insert(0x10 * PAGE_SIZE, 0x20 * PAGE_SIZE);
        l.entry(lazy_dst(7))
            .or_default()
            .insert(0x100 * PAGE_SIZE, 0x101 * PAGE_SIZE);
        l
    }

    async fn ask(c: &mut DuplexStream, dst: u64, page: u64, nr: u64) -> Option<(PsIov, Vec<u8>)> {
        c.write_all(&PsIov::get(dst, page * PAGE_SIZE, nr).encode())
            .await
            .ok()?;
        let mut hb = [0u8; IOV_LEN];
        c.read_exact(&mut hb).await.ok()?;
        let h = PsIov::decode(&hb);
        let mut data = vec![0u8; (h.nr_pages * PAGE_SIZE) as usize];
        c.read_exact(&mut data).await.ok()?;
        Some((h, data))
    }

    #[tokio::test]
    async fn lazy_pages_are_answered_as_the_page_server_answers_them() {
        let (mut near, far) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut mem = Patterned { reads: vec![] };
            let r = serve_reads(far, &lazy(), &mut mem).await;
            (r, mem.reads)
        });
        let (h, data) = ask(&mut near, 1, 0x12, 3).await.unwrap();
        assert_eq!(h.command(), PS_IOV_ADD_F);
        assert_eq!(h, PsIov::pages(1, 0x12 * PAGE_SIZE, 3));
        for (i, b) in data.iter().enumerate() {
            assert_eq!(*b, byte(1, 0x12 * PAGE_SIZE + i as u64), "byte {i}");
        }
        let (h, _) = ask(&mut near, 7, 0x100, 1).await.unwrap();
        assert_eq!(h.nr_pages, 1);
        drop(near);
        let (r, reads) = server.await.unwrap();
        assert_eq!(
            r.unwrap(),
            ReaderStats {
                requests: 2,
                bytes: 4 * PAGE_SIZE
            }
        );
        assert_eq!(
            reads,
            vec![
                (1, 0x12 * PAGE_SIZE, 3 * PAGE_SIZE as usize),
                (7, 0x100 * PAGE_SIZE, PAGE_SIZE as usize)
            ]
        );
    }

    #[tokio::test]
    async fn anything_but_whole_lazy_pages_closes_the_channel_unread() {
        // (process, first page, pages, what the error names)
        let cases: &[(u64, u64, u64, &str)] = &[
            (1, 0x1f, 2, "not within one lazy range"),
            (1, 0x0f, 1, "not within one lazy range"),
            (2, 0x10, 1, "not within one lazy range"),
            (1, 0x10, 0, "whole pages"),
            (1, 0x10, MAX_READ_PAGES + 1, "whole pages"),
        ];
        for &(dst, page, nr, says) in cases {
            let (mut near, far) = tokio::io::duplex(1 << 20);
            let server = tokio::spawn(async move {
                let mut mem = Patterned { reads: vec![] };
                let r = serve_reads(far, &lazy(), &mut mem).await;
                (r, mem.reads)
            });
            assert!(ask(&mut near, dst, page, nr).await.is_none());
            let (r, reads) = server.await.unwrap();
            let e = r.unwrap_err().to_string();
            assert!(e.contains(says), "{dst} {page:#x} {nr}: {e}");
            assert!(reads.is_empty(), "{dst} {page:#x} {nr}: read {reads:?}");
        }
        let (mut near, far) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut mem = Patterned { reads: vec![] };
            serve_reads(far, &lazy(), &mut mem).await
        });
        let mut odd = PsIov::get(1, 0x10 * PAGE_SIZE + 8, 1).encode();
        near.write_all(&odd).await.unwrap();
        assert!(server.await.unwrap().is_err(), "an unaligned address");
        odd[0] = 0x23;
        let (mut near, far) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut mem = Patterned { reads: vec![] };
            serve_reads(far, &lazy(), &mut mem).await
        });
        near.write_all(&odd).await.unwrap();
        let e = server.await.unwrap().unwrap_err().to_string();
        assert!(e.contains("only page requests"), "{e}");
    }

    #[test]
    fn the_innermost_namespace_pid_names_the_process() {
        let status =
            "Name:\tredis-server\nTgid:\t4242\nPid:\t4242\nNSpid:\t4242\t1\nNSpgid:\t4242\t1\n";
        assert_eq!(nspid(status), Some(1));
        assert_eq!(nspid("Pid:\t9\nNSpid:\t9\n"), Some(9));
        assert_eq!(nspid("Pid:\t9\n"), None);
    }

    #[test]
    fn this_process_reads_its_own_memory_through_the_seized_task_reader() {
        let page: Vec<u8> = (0..PAGE_SIZE as usize * 3)
            .map(|i| (i % 251) as u8)
            .collect();
        let me = std::process::id() as i32;
        let mut tasks = SeizedTasks::new(BTreeMap::from([(1u64, me)]));
        let mut buf = vec![0u8; page.len()];
        tasks.read(1, page.as_ptr() as u64, &mut buf).unwrap();
        assert_eq!(buf, page);
        let e = tasks.read(2, page.as_ptr() as u64, &mut buf).unwrap_err();
        assert!(e.to_string().contains("no seized task with id 2"), "{e}");
        let pids = namespace_pids(&[me]);
        assert_eq!(pids.values().copied().collect::<Vec<_>>(), vec![me]);
    }
}
