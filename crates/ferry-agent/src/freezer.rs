//! The container's freezer cgroup, driven directly (cgroup v1 `freezer.state`, v2
//! `cgroup.freeze`).
//!
//! Post-copy freezes the container itself instead of leaving it to CRIU: CRIU polls a cgroup-v1
//! freezer in 100 ms steps (`seize.c`, `freeze_processes`), which alone was 40% of the dump
//! window, while finding the cgroup already frozen it seizes at once. A frozen container's kernel
//! still ACKs and queues what its clients send until CRIU locks the network; CRIU dumps those
//! queues, so a request sent during the pause is answered by the target as soon as it resumes
//! rather than after the client's retransmission timer.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often the state file is re-read while the kernel is still freezing.
const FREEZE_POLL: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum FreezerError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no freezer cgroup found for pid {0} in /proc/{0}/cgroup")]
    NotFound(u32),
    #[error("{path} still not frozen after {waited:?} (state {state:?})")]
    Timeout {
        path: PathBuf,
        waited: Duration,
        state: String,
    },
}

/// Where a process's freezer lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freezer {
    /// `freezer.state` of a v1 hierarchy: THAWED, FREEZING or FROZEN.
    V1(PathBuf),
    /// The cgroup directory of a v2 hierarchy (`cgroup.freeze`, `cgroup.events`).
    V2(PathBuf),
}

impl Freezer {
    /// Finds the freezer of `pid` from `/proc/<pid>/cgroup`.
    pub fn of(pid: u32) -> Result<Freezer, FreezerError> {
        let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let text = std::fs::read_to_string(&path).map_err(|source| FreezerError::Read {
            path: path.clone(),
            source,
        })?;
        let found = parse_proc_cgroup(&text, Path::new("/sys/fs/cgroup"), |p| p.exists());
        found.ok_or(FreezerError::NotFound(pid))
    }

    /// Freezes the cgroup and waits until the kernel reports every task frozen.
    pub fn freeze(&self, limit: Duration) -> Result<Duration, FreezerError> {
        let started = Instant::now();
        let (file, value) = match self {
            Freezer::V1(state) => (state.clone(), "FROZEN"),
            Freezer::V2(dir) => (dir.join("cgroup.freeze"), "1"),
        };
        std::fs::write(&file, value).map_err(|source| FreezerError::Write {
            path: file.clone(),
            source,
        })?;
        loop {
            let (frozen, state) = self.is_frozen()?;
            if frozen {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= limit {
                return Err(FreezerError::Timeout {
                    path: file,
                    waited: started.elapsed(),
                    state,
                });
            }
            std::thread::sleep(FREEZE_POLL);
        }
    }

    /// Thaws the cgroup if it is frozen or freezing; returns whether it had to.
    pub fn thaw(&self) -> Result<bool, FreezerError> {
        let (file, value, thawed) = match self {
            Freezer::V1(state) => (state.clone(), "THAWED", "THAWED"),
            Freezer::V2(dir) => (dir.join("cgroup.freeze"), "0", "0"),
        };
        let now = read(&file)?;
        if now.trim() == thawed {
            return Ok(false);
        }
        std::fs::write(&file, value)
            .map_err(|source| FreezerError::Write { path: file, source })?;
        Ok(true)
    }

    /// The pids of the processes in the cgroup (`cgroup.procs` beside the freezer's state).
    pub fn procs(&self) -> Result<Vec<i32>, FreezerError> {
        let dir = match self {
            Freezer::V1(state) => state.parent().unwrap_or(Path::new("/")).to_path_buf(),
            Freezer::V2(dir) => dir.clone(),
        };
        Ok(read(&dir.join("cgroup.procs"))?
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// Whether every task is frozen, with the raw state for error messages.
    fn is_frozen(&self) -> Result<(bool, String), FreezerError> {
        match self {
            Freezer::V1(state) => {
                let s = read(state)?;
                Ok((s.trim() == "FROZEN", s.trim().to_string()))
            }
            Freezer::V2(dir) => {
                let s = read(&dir.join("cgroup.events"))?;
                Ok((v2_frozen(&s), s.replace('\n', " ").trim().to_string()))
            }
        }
    }
}

fn read(path: &Path) -> Result<String, FreezerError> {
    std::fs::read_to_string(path).map_err(|source| FreezerError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// `frozen 1` in a v2 `cgroup.events`.
fn v2_frozen(events: &str) -> bool {
    events
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["frozen", "1"])
}

/// Picks the freezer out of `/proc/<pid>/cgroup`: a v1 line naming the `freezer` controller
/// wins; otherwise the v2 line (`0::/path`) under the unified mount (`root` itself, or its
/// `unified` subdirectory on hybrid hosts), if its `cgroup.freeze` exists.
fn parse_proc_cgroup(text: &str, root: &Path, exists: impl Fn(&Path) -> bool) -> Option<Freezer> {
    let mut v2 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if ctrls.split(',').any(|c| c == "freezer") {
            return Some(Freezer::V1(
                root.join("freezer").join(rel).join("freezer.state"),
            ));
        }
        if ctrls.is_empty() && v2.is_none() {
            for base in [root.to_path_buf(), root.join("unified")] {
                let dir = base.join(rel);
                if exists(&dir.join("cgroup.freeze")) {
                    v2 = Some(Freezer::V2(dir));
                    break;
                }
            }
        }
    }
    v2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_freezer_line_wins() {
        let text = "12:freezer:/docker/abc\n11:memory:/docker/abc\n0::/docker/abc\n";
        let f = parse_proc_cgroup(text, Path::new("/sys/fs/cgroup"), |_| true);
        assert_eq!(
            f,
            Some(Freezer::V1(PathBuf::from(
                "/sys/fs/cgroup/freezer/docker/abc/freezer.state"
            )))
        );
    }

    #[test]
    fn v2_needs_a_cgroup_freeze_file() {
        let text = "0::/system.slice/docker-abc.scope\n";
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            parse_proc_cgroup(text, root, |p| p
                == Path::new("/sys/fs/cgroup/system.slice/docker-abc.scope/cgroup.freeze")),
            Some(Freezer::V2(PathBuf::from(
                "/sys/fs/cgroup/system.slice/docker-abc.scope"
            )))
        );
        assert_eq!(
            parse_proc_cgroup(text, root, |p| p
                == Path::new(
                    "/sys/fs/cgroup/unified/system.slice/docker-abc.scope/cgroup.freeze"
                )),
            Some(Freezer::V2(PathBuf::from(
                "/sys/fs/cgroup/unified/system.slice/docker-abc.scope"
            )))
        );
        assert_eq!(parse_proc_cgroup(text, root, |_| false), None);
        assert_eq!(parse_proc_cgroup("garbage\n", root, |_| true), None);
    }

    #[test]
    fn v2_events_are_read_by_field() {
        assert!(v2_frozen("populated 1\nfrozen 1\n"));
        assert!(!v2_frozen("populated 1\nfrozen 0\n"));
        assert!(!v2_frozen("frozen 10\n"));
    }

    #[test]
    fn freeze_and_thaw_a_v1_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("freezer.state");
        std::fs::write(&state, "THAWED\n").unwrap();
        let f = Freezer::V1(state.clone());
        // A plain file reads back what was written, as a cgroup that froze at once would.
        f.freeze(Duration::from_secs(1)).unwrap();
        assert_eq!(std::fs::read_to_string(&state).unwrap(), "FROZEN");
        assert!(f.thaw().unwrap());
        assert!(!f.thaw().unwrap());
    }

    #[test]
    fn a_v2_cgroup_that_never_freezes_times_out_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.freeze"), "0").unwrap();
        std::fs::write(dir.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let f = Freezer::V2(dir.path().to_path_buf());
        let e = f.freeze(Duration::from_millis(20)).unwrap_err();
        assert!(
            matches!(&e, FreezerError::Timeout { path, .. } if path.ends_with("cgroup.freeze")),
            "{e}"
        );
    }
}
