//! CPU time and memory of the processes that do a migration's work, sampled from /proc.
//!
//! Which processes: the two agents for ferry; for the manual path the Docker stack of both
//! hosts (dockerd, containerd) plus the containerd shims of the benchmarked container, because
//! `runc checkpoint/restore` and CRIU run as children of the shim — which is reparented to
//! init, so neither dockerd's nor containerd's `cutime` ever contains them. Children are not
//! sampled themselves: a parent's `cutime`/`cstime` include every child it reaped (and those
//! children's reaped children), so summing self+children time of the long-lived "roots"
//! counts each short-lived runc/CRIU exactly once, however briefly it lived.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

/// Sampling period for RSS; the brief asks for 50 ms, short enough to catch a dump's buffers.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(50);
/// Shims are discovered by scanning /proc, which costs more than sampling known pids: do it
/// every few samples only. A shim lives as long as its container, so none is missed.
const DISCOVER_EVERY: u32 = 4;

/// What one /proc/<pid>/stat tells about CPU time, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatTimes {
    pub utime: u64,
    pub stime: u64,
    pub cutime: u64,
    pub cstime: u64,
    /// Since boot, in clock ticks: tells whether the process started after sampling began.
    pub starttime: u64,
}

impl StatTimes {
    pub fn total(&self) -> u64 {
        self.utime + self.stime + self.cutime + self.cstime
    }
}

/// Parses `/proc/<pid>/stat`. The command name may contain spaces and parentheses, so fields
/// are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<StatTimes> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): utime is field 14, starttime field 22.
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<i64>().ok());
    Some(StatTimes {
        utime: n(11)?.max(0) as u64,
        stime: n(12)?.max(0) as u64,
        cutime: n(13)?.max(0) as u64,
        cstime: n(14)?.max(0) as u64,
        starttime: n(19)?.max(0) as u64,
    })
}

/// `VmRSS` and `VmHWM` from `/proc/<pid>/status`, in KiB.
pub fn parse_status_mem(text: &str) -> (Option<u64>, Option<u64>) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resident set size of `pid` in KiB, or None if the process is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_mem(&text).0
}

/// `(busy, total)` jiffies over all CPUs from the first line of `/proc/stat`; the test bed
/// shares the machine, so a case records how busy the machine was while it ran.
pub fn parse_cpu_line(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

pub fn cpu_jiffies() -> Option<(u64, u64)> {
    parse_cpu_line(&fs::read_to_string("/proc/stat").ok()?)
}

/// Busy share of all CPUs between two [`cpu_jiffies`] readings, in percent.
pub fn busy_pct(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let total = after.1.checked_sub(before.1)?;
    let busy = after.0.checked_sub(before.0)?;
    (total > 0).then(|| busy as f64 * 100.0 / total as f64)
}

/// The 1-minute load average.
pub fn loadavg() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Clock ticks per second; 100 on every Linux this runs on, but ask rather than assume.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions and only reads a constant.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

fn uptime_ticks(ticks: u64) -> u64 {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * ticks as f64) as u64)
        .unwrap_or(0)
}

/// `-id` of a containerd shim whose `-address` lies under `exec_root`, from its argv.
pub fn shim_id(cmdline: &[u8], exec_root: &Path) -> Option<String> {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let first = String::from_utf8_lossy(args.first()?);
    if !first.contains("containerd-shim") {
        return None;
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| *a == flag.as_bytes())
            .and_then(|i| args.get(i + 1))
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let address = value("-address")?;
    if !Path::new(&address).starts_with(exec_root) {
        return None;
    }
    value("-id")
}

/// A process to watch: fixed at the start (agent, dockerd, containerd) or found while
/// sampling (a shim).
#[derive(Debug, Clone)]
pub struct Watch {
    pub host: String,
    pub role: String,
    pub pid: u32,
    /// For shims: the container id, so only the benchmarked container's shims are kept.
    pub container_id: Option<String>,
}

/// Where a host's roots live: pid files of agent, dockerd and containerd, and the exec root
/// that tells its shims apart from other hosts'.
#[derive(Debug, Clone)]
pub struct HostProcs {
    pub host: String,
    pub agent_pidfile: PathBuf,
    pub dockerd_pidfile: PathBuf,
    pub containerd_pidfile: PathBuf,
    pub exec_root: PathBuf,
}

impl HostProcs {
    pub fn from_info(h: &ferry_testbed::HostInfo) -> HostProcs {
        let run = h
            .exec_root
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| h.exec_root.clone());
        HostProcs {
            host: h.name.clone(),
            agent_pidfile: run.join("agent.pid"),
            dockerd_pidfile: run.join("dockerd.pid"),
            containerd_pidfile: h.exec_root.join("containerd").join("containerd.pid"),
            exec_root: h.exec_root.clone(),
        }
    }

    fn roots(&self) -> Vec<Watch> {
        let read = |p: &Path| {
            fs::read_to_string(p)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
        };
        [
            ("agent", &self.agent_pidfile),
            ("dockerd", &self.dockerd_pidfile),
            ("containerd", &self.containerd_pidfile),
        ]
        .into_iter()
        .filter_map(|(role, p)| {
            read(p).map(|pid| Watch {
                host: self.host.clone(),
                role: role.to_string(),
                pid,
                container_id: None,
            })
        })
        .collect()
    }
}

/// What one watched process used during the window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcUsage {
    pub host: String,
    pub role: String,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Own plus reaped children's CPU time during the window, in seconds.
    pub cpu_s: f64,
    /// Highest RSS seen, or the process's VmHWM when that grew during the window, in MiB.
    pub peak_rss_mb: f64,
    pub samples: u32,
}

#[derive(Debug, Clone)]
struct Track {
    watch: Watch,
    baseline: u64,
    last: u64,
    peak_rss_kib: u64,
    hwm_start: Option<u64>,
    hwm_last: Option<u64>,
    samples: u32,
}

#[derive(Debug, Default)]
struct State {
    tracks: BTreeMap<u32, Track>,
}

impl State {
    fn sample(&mut self, w: &Watch, started_ticks: u64) {
        let Some(times) = fs::read_to_string(format!("/proc/{}/stat", w.pid))
            .ok()
            .and_then(|t| parse_stat(&t))
        else {
            return;
        };
        let (rss, hwm) = fs::read_to_string(format!("/proc/{}/status", w.pid))
            .map(|t| parse_status_mem(&t))
            .unwrap_or((None, None));
        let t = self.tracks.entry(w.pid).or_insert_with(|| Track {
            watch: w.clone(),
            // Started after the window opened: everything it used belongs to the window.
            baseline: if times.starttime >= started_ticks {
                0
            } else {
                times.total()
            },
            last: times.total(),
            peak_rss_kib: 0,
            hwm_start: if times.starttime >= started_ticks {
                Some(0)
            } else {
                hwm
            },
            hwm_last: hwm,
            samples: 0,
        });
        // A recycled pid would go backwards: keep the old process's figures.
        if times.total() >= t.last {
            t.last = times.total();
        }
        t.peak_rss_kib = t.peak_rss_kib.max(rss.unwrap_or(0));
        if hwm.is_some() {
            t.hwm_last = hwm;
        }
        t.samples += 1;
    }
}

/// Samples the watched processes every [`SAMPLE_PERIOD`] in a background task until
/// [`Sampler::finish`]; dropping it stops the task.
pub struct Sampler {
    state: Arc<Mutex<State>>,
    stop: Arc<tokio::sync::Notify>,
    task: Option<JoinHandle<()>>,
    hosts: Vec<HostProcs>,
    started_ticks: u64,
    ticks: u64,
}

fn discover_shims(hosts: &[HostProcs]) -> Vec<Watch> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        for h in hosts {
            if let Some(id) = shim_id(&cmdline, &h.exec_root) {
                out.push(Watch {
                    host: h.host.clone(),
                    role: "shim".into(),
                    pid,
                    container_id: Some(id),
                });
            }
        }
    }
    out
}

impl Sampler {
    pub fn start(hosts: Vec<HostProcs>) -> Sampler {
        let ticks = clock_ticks();
        let started_ticks = uptime_ticks(ticks);
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(tokio::sync::Notify::new());
        let roots: Vec<Watch> = hosts.iter().flat_map(HostProcs::roots).collect();
        let (st, sp, hs) = (state.clone(), stop.clone(), hosts.clone());
        let task = tokio::spawn(async move {
            let mut shims = discover_shims(&hs);
            // Counts down to the next discovery (no `is_multiple_of`: MSRV 1.85).
            let mut until_discovery = DISCOVER_EVERY;
            let mut interval = tokio::time::interval(SAMPLE_PERIOD);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = sp.notified() => break,
                    _ = interval.tick() => {}
                }
                until_discovery -= 1;
                if until_discovery == 0 {
                    shims = discover_shims(&hs);
                    until_discovery = DISCOVER_EVERY;
                }
                let mut s = st.lock().unwrap_or_else(PoisonError::into_inner);
                for w in roots.iter().chain(shims.iter()) {
                    s.sample(w, started_ticks);
                }
            }
        });
        Sampler {
            state,
            stop,
            task: Some(task),
            hosts,
            started_ticks,
            ticks,
        }
    }

    /// Stops sampling, takes one last sample of everything still alive, and returns the
    /// usage per process. Shims are kept only for `container_ids` (the benchmarked container
    /// on either host); other containers' shims are not this case's work.
    pub async fn finish(mut self, container_ids: &[String]) -> Vec<ProcUsage> {
        self.stop.notify_one();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let roots: Vec<Watch> = self.hosts.iter().flat_map(HostProcs::roots).collect();
        let shims = discover_shims(&self.hosts);
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for w in roots.iter().chain(shims.iter()) {
            // Only pids already tracked: a root restarted meanwhile is not this window's.
            if s.tracks.contains_key(&w.pid) {
                s.sample(w, self.started_ticks);
            }
        }
        let ticks = self.ticks as f64;
        s.tracks
            .values()
            .filter(|t| match &t.watch.container_id {
                None => true,
                Some(id) => container_ids.iter().any(|c| c == id),
            })
            .map(|t| {
                let mut peak = t.peak_rss_kib;
                if let (Some(start), Some(last)) = (t.hwm_start, t.hwm_last) {
                    if last > start {
                        peak = peak.max(last);
                    }
                }
                ProcUsage {
                    host: t.watch.host.clone(),
                    role: t.watch.role.clone(),
                    pid: t.watch.pid,
                    container_id: t.watch.container_id.clone(),
                    cpu_s: t.last.saturating_sub(t.baseline) as f64 / ticks,
                    peak_rss_mb: peak as f64 / 1024.0,
                    samples: t.samples,
                }
            })
            .collect()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_name() {
        let line = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 10 5 20 0 3 0 987654 1000000 200 18446744073709551615";
        let t = parse_stat(line).unwrap();
        assert_eq!(
            t,
            StatTimes {
                utime: 250,
                stime: 75,
                cutime: 10,
                cstime: 5,
                starttime: 987654
            }
        );
        assert_eq!(t.total(), 340);
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("1 (x) S 1 2").is_none());
    }

    #[test]
    fn status_memory_fields() {
        let s = "Name:\tredis\nVmPeak:\t 1 kB\nVmHWM:\t   78884 kB\nVmRSS:\t   11972 kB\n";
        assert_eq!(parse_status_mem(s), (Some(11972), Some(78884)));
        assert_eq!(parse_status_mem("Name: x\n"), (None, None));
    }

    #[test]
    fn machine_cpu() {
        let t = "cpu  100 5 50 800 45 0 0 0 0 0\ncpu0 1 2 3 4 5\n";
        assert_eq!(parse_cpu_line(t), Some((155, 1000)));
        assert_eq!(busy_pct((155, 1000), (255, 1200)), Some(50.0));
        assert_eq!(busy_pct((155, 1000), (155, 1000)), None);
        assert!(cpu_jiffies().is_some());
        assert!(loadavg().is_some());
    }

    #[test]
    fn own_stat_parses() {
        let me = std::process::id();
        let t = parse_stat(&fs::read_to_string(format!("/proc/{me}/stat")).unwrap()).unwrap();
        assert!(t.starttime > 0);
        assert!(rss_kib(me).unwrap() > 0);
    }

    #[test]
    fn shim_ids_by_exec_root() {
        let argv = b"/usr/bin/containerd-shim-runc-v2\0-namespace\0moby\0-id\0abc123\0-address\0/run/ferry-testbed/b/exec/containerd/containerd.sock\0";
        assert_eq!(
            shim_id(argv, Path::new("/run/ferry-testbed/b/exec")).as_deref(),
            Some("abc123")
        );
        assert_eq!(shim_id(argv, Path::new("/run/ferry-testbed/a/exec")), None);
        assert_eq!(
            shim_id(
                b"/usr/sbin/dockerd\0-id\0x\0-address\0/run/ferry-testbed/b/exec/s\0",
                Path::new("/run/ferry-testbed/b/exec")
            ),
            None
        );
    }

    #[tokio::test]
    async fn sampler_counts_own_cpu() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("agent.pid");
        fs::write(&pidfile, std::process::id().to_string()).unwrap();
        let hp = HostProcs {
            host: "t".into(),
            agent_pidfile: pidfile,
            dockerd_pidfile: dir.path().join("none"),
            containerd_pidfile: dir.path().join("none"),
            exec_root: dir.path().join("exec"),
        };
        let s = Sampler::start(vec![hp]);
        // Burn CPU on a blocking thread (counted: same process).
        tokio::task::spawn_blocking(|| {
            let until = std::time::Instant::now() + Duration::from_millis(400);
            let mut x = 0u64;
            while std::time::Instant::now() < until {
                x = x.wrapping_mul(31).wrapping_add(7);
            }
            std::hint::black_box(x);
        })
        .await
        .unwrap();
        let usage = s.finish(&[]).await;
        assert_eq!(usage.len(), 1, "{usage:?}");
        assert!(usage[0].cpu_s >= 0.2, "{usage:?}");
        assert!(usage[0].peak_rss_mb > 0.0);
        assert!(usage[0].samples >= 3);
    }
}
