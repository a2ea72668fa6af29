//! What this host is and can do, discovered from the daemon and the system — never configured.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ferry_docker::Docker;
use ferry_proto::HostFacts;

use crate::AgentError;

/// Directories searched for criu/runc besides `PATH`: a source build installs to /usr/local/sbin,
/// which a minimal service `PATH` may lack.
const TOOL_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// Oldest CRIU that dumps INET sockets on current kernels (4.1 fails on >= 6.16, 3.17 on the vDSO).
const MIN_CRIU: (u32, u32) = (4, 2);

/// Linux capability number of CAP_SYS_RESOURCE.
const CAP_SYS_RESOURCE: u32 = 24;

/// How long the tools' answers (`criu --version`, `criu check` and its feature checks, `runc
/// --version`, the cpuinfo dump and checks) stand for a migration's preflight. They change only
/// with the kernel or the tools, and asking again cost every migration ~60–100 ms of
/// processes on each host, one host after the other. A tool replaced in place is noticed at
/// once (its size, mtime or inode changed); `ferry check` always asks again.
pub const PROBE_MAX_AGE: Duration = Duration::from_secs(120);

/// How often an agent asks its tools again in the background, so that a preflight finds
/// answers younger than [`PROBE_MAX_AGE`].
pub const PROBE_REFRESH: Duration = Duration::from_secs(45);

/// Most peer CPU images whose `criu cpuinfo check` answer is kept.
const CPU_CHECKS_KEPT: usize = 16;

/// Whether a caller takes the tools' recent answers or wants them asked again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Recent,
    Fresh,
}

/// What identifies an installed tool: replaced or rebuilt, one of these changes.
type ToolId = Option<(u64, Option<SystemTime>, u64)>;

fn tool_id(path: Option<&str>) -> ToolId {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path?).ok()?;
    Some((m.len(), m.modified().ok(), m.ino()))
}

/// A `criu cpuinfo check` answer: compatible, or CRIU's reasons why not; or why it could not
/// be asked.
type CpuCheck = Result<Result<(), Vec<String>>, String>;

/// The tools' answers at one time, errors already rendered for the operator.
#[derive(Debug, Clone)]
struct Probed {
    at: Instant,
    tools: [ToolId; 2],
    criu: Option<Result<ferry_criu::CriuFacts, String>>,
    runc: Option<Result<String, String>>,
    cpuinfo: Option<Vec<u8>>,
    /// `criu cpuinfo check` answers, by the peer's image.
    cpu_checks: HashMap<Vec<u8>, CpuCheck>,
}

impl Probed {
    fn usable(&self, tools: &[ToolId; 2]) -> bool {
        self.at.elapsed() < PROBE_MAX_AGE && &self.tools == tools
    }
}

pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path_var = std::env::var("PATH").unwrap_or_default();
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .chain(TOOL_DIRS.iter().copied())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The host side of an agent: its Docker, tools and private state directory.
#[derive(Clone)]
pub struct HostEnv {
    pub name: String,
    pub docker: Arc<Docker>,
    pub docker_host: String,
    pub criu: Option<String>,
    pub runc: Option<String>,
    pub state_dir: PathBuf,
    probed: Arc<Mutex<Option<Probed>>>,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn cap_eff_has(status: &str, cap: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .map(|mask| mask & (1u64 << cap) != 0)
        .unwrap_or(false)
}

pub fn has_cap_sys_resource() -> bool {
    cap_eff_has(&read_trim("/proc/self/status"), CAP_SYS_RESOURCE)
}

fn version_at_least(v: &str, min: (u32, u32)) -> bool {
    let mut it = v
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = it.next().unwrap_or(0);
    let minor = it.next().unwrap_or(0);
    (major, minor) >= min
}

impl HostEnv {
    /// Connects to Docker the way the docker CLI does (`DOCKER_HOST`, else the default socket)
    /// and locates criu and runc.
    pub async fn discover(name: String, state_dir: PathBuf) -> Result<HostEnv, AgentError> {
        let docker_host =
            std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
        let docker = Docker::connect(&docker_host).await.map_err(|e| {
            AgentError::Setup(format!(
                "cannot reach Docker at {docker_host} (DOCKER_HOST): {e}"
            ))
        })?;
        std::fs::create_dir_all(&state_dir).map_err(|e| {
            AgentError::Setup(format!(
                "cannot create state dir {}: {e}",
                state_dir.display()
            ))
        })?;
        Ok(HostEnv {
            name,
            docker: Arc::new(docker),
            docker_host,
            criu: find_tool("criu").map(|p| p.to_string_lossy().into_owned()),
            runc: find_tool("runc").map(|p| p.to_string_lossy().into_owned()),
            state_dir,
            probed: Arc::default(),
        })
    }

    pub fn scratch(&self, what: &str) -> PathBuf {
        self.state_dir
            .join("scratch")
            .join(format!("{what}-{}", crate::new_id()))
    }

    fn tool_ids(&self) -> [ToolId; 2] {
        [tool_id(self.criu.as_deref()), tool_id(self.runc.as_deref())]
    }

    /// Asks the tools, side by side: they are independent processes.
    async fn probe_tools(&self) -> Probed {
        let tools = self.tool_ids();
        let criu_facts = async {
            match &self.criu {
                Some(criu) => Some(
                    ferry_criu::criu_facts(criu)
                        .await
                        .map_err(|e| format!("{e} {}", e.log().join(" / "))),
                ),
                None => None,
            }
        };
        let runc_version = async {
            match &self.runc {
                Some(runc) => Some(
                    ferry_criu::runc_version(runc)
                        .await
                        .map_err(|e| e.to_string()),
                ),
                None => None,
            }
        };
        let cpuinfo = async {
            let criu = self.criu.as_ref()?;
            let scratch = self.scratch("cpuinfo-dump");
            let r = ferry_criu::cpuinfo_dump(criu, &scratch).await.ok();
            let _ = std::fs::remove_dir_all(&scratch);
            r
        };
        let (criu, runc, cpuinfo) = tokio::join!(criu_facts, runc_version, cpuinfo);
        Probed {
            at: Instant::now(),
            tools,
            criu,
            runc,
            cpuinfo,
            cpu_checks: HashMap::new(),
        }
    }

    /// The tools' answers: the kept ones where recent enough and asked for, else new ones
    /// (which are kept).
    async fn probed(&self, probe: Probe) -> Probed {
        if probe == Probe::Recent {
            let tools = self.tool_ids();
            if let Ok(g) = self.probed.lock() {
                if let Some(p) = g.as_ref().filter(|p| p.usable(&tools)) {
                    return p.clone();
                }
            }
        }
        let p = self.probe_tools().await;
        if let Ok(mut g) = self.probed.lock() {
            *g = Some(p.clone());
        }
        p
    }

    /// Asks the tools again, for the agent's background refresh.
    pub async fn refresh_probes(&self) {
        self.probed(Probe::Fresh).await;
    }

    /// `criu cpuinfo check` of a peer's CPU image, kept with the answers it was asked with.
    async fn cpu_check(&self, criu: &str, probed: &Probed, peer: &[u8]) -> CpuCheck {
        if let Some(r) = probed.cpu_checks.get(peer) {
            return r.clone();
        }
        let scratch = self.scratch("cpuinfo-check");
        let r = ferry_criu::cpuinfo_check(criu, &scratch, peer)
            .await
            .map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&scratch);
        if let Ok(mut g) = self.probed.lock() {
            if let Some(kept) = g.as_mut().filter(|k| k.at == probed.at) {
                if kept.cpu_checks.len() >= CPU_CHECKS_KEPT {
                    kept.cpu_checks.clear();
                }
                kept.cpu_checks.insert(peer.to_vec(), r.clone());
            }
        }
        r
    }

    /// Everything `ferry check` reports, and every reason this host cannot take part.
    pub async fn facts(&self, peer_cpuinfo: Option<&[u8]>, probe: Probe) -> HostFacts {
        let mut f = HostFacts {
            agent: self.name.clone(),
            hostname: read_trim("/proc/sys/kernel/hostname"),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            arch: std::env::consts::ARCH.to_string(),
            cap_sys_resource: has_cap_sys_resource(),
            pipe_max_size: read_trim("/proc/sys/fs/pipe-max-size").parse().unwrap_or(0),
            ..Default::default()
        };
        let (probed, docker_info) = tokio::join!(self.probed(probe), self.docker.info());
        f.probed_ms_ago = Some(probed.at.elapsed().as_millis() as u64);
        match (&self.criu, probed.criu.clone()) {
            (None, _) | (_, None) => f.problems.push(format!(
                "criu not found in PATH or {}",
                TOOL_DIRS.join(", ")
            )),
            (Some(criu), Some(facts)) => match facts {
                Ok(cf) => {
                    if !version_at_least(&cf.version, MIN_CRIU) {
                        f.problems.push(format!(
                            "CRIU {} at {criu} is too old: {}.{} or newer is needed (older ones fail on the vDSO or on INET sockets of kernels >= 6.16)",
                            cf.version, MIN_CRIU.0, MIN_CRIU.1
                        ));
                    }
                    if !cf.features.tcp_established {
                        f.problems
                            .push(format!("`criu check` fails: {}", cf.check_log.join(" / ")));
                    }
                    f.criu_version = Some(cf.version);
                    f.criu_features = cf.features;
                }
                Err(e) => f.problems.push(e),
            },
        }
        match probed.runc.clone() {
            None => f.problems.push(format!(
                "runc not found in PATH or {}",
                TOOL_DIRS.join(", ")
            )),
            Some(Ok(v)) => f.runc_version = Some(v),
            Some(Err(e)) => f.problems.push(e),
        }
        match docker_info {
            Ok(info) => {
                f.docker_version = info
                    .get("ServerVersion")
                    .and_then(|v| v.as_str())
                    .map(str::to_string);
                f.docker_api_version = Some(self.docker.api_version().to_string());
                f.docker_experimental = info
                    .get("ExperimentalBuild")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                f.docker_data_root = info
                    .get("DockerRootDir")
                    .and_then(|v| v.as_str())
                    .map(str::to_string);
                if let Some(rt) = info.get("Runtimes").and_then(|v| v.as_object()) {
                    f.docker_runtimes = rt.keys().cloned().collect();
                }
                f.ferry_runtime = f.docker_runtimes.iter().any(|r| r == crate::FERRY_RUNTIME);
                f.prewire_netns = f
                    .docker_data_root
                    .as_deref()
                    .is_some_and(|r| ferry_proto::remapped_root(r).is_none());
                if !f.docker_experimental {
                    f.problems.push("dockerd is not in experimental mode (\"experimental\": true in daemon.json): it cannot start containers from checkpoints".into());
                }
                if !f.ferry_runtime {
                    f.problems.push(format!(
                        "dockerd has no \"{}\" runtime: add {{\"runtimes\": {{\"{}\": {{\"path\": \"/usr/local/bin/ferry-runtime\"}}}}}} to daemon.json, where that script runs `ferry runtime --state-dir {} -- \"$@\"`",
                        crate::FERRY_RUNTIME,
                        crate::FERRY_RUNTIME,
                        self.state_dir.display()
                    ));
                }
            }
            Err(e) => f.problems.push(format!(
                "Docker at {} does not answer: {e}",
                self.docker_host
            )),
        }
        if !f.cap_sys_resource && f.pipe_max_size < ferry_migrate::PIPE_NEEDED {
            f.warnings.push(format!(
                "post-copy from this host needs fs.pipe-max-size >= {} (now {}) because root lacks CAP_SYS_RESOURCE: start the agent with --tune-host to raise it",
                ferry_migrate::PIPE_NEEDED,
                f.pipe_max_size
            ));
        }
        if !f.criu_features.uffd {
            f.warnings.push(
                "userfaultfd is not available: this host cannot be a post-copy target".into(),
            );
        }
        if !f.cap_sys_resource && f.userns_remap().is_none() {
            f.warnings.push("root lacks CAP_SYS_RESOURCE here: CRIU cannot dump processes running as another uid (\"Can't get rlimit\"); such containers are refused in preflight unless dockerd runs with userns-remap".into());
        }
        if let (Some(peer), Some(criu)) = (peer_cpuinfo, &self.criu) {
            match self.cpu_check(criu, &probed, peer).await {
                Ok(Ok(())) => f.cpu_compatible = Some(true),
                Ok(Err(lines)) => {
                    f.cpu_compatible = Some(false);
                    f.cpu_check_log = lines;
                }
                Err(e) => f.problems.push(e),
            }
        }
        f
    }

    /// This host's CPU image (`criu cpuinfo dump`), for the peer's `criu cpuinfo check`.
    pub async fn cpuinfo(&self, probe: Probe) -> Option<Vec<u8>> {
        self.probed(probe).await.cpuinfo
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_parse() {
        let s = "Name:\tx\nCapEff:\t000001fffeffffff\n";
        assert!(!cap_eff_has(s, CAP_SYS_RESOURCE));
        assert!(cap_eff_has(s, 21));
        assert!(cap_eff_has("CapEff:\t000001ffffffffff\n", CAP_SYS_RESOURCE));
    }

    fn probed(at: Instant, tools: [ToolId; 2]) -> Probed {
        Probed {
            at,
            tools,
            criu: None,
            runc: None,
            cpuinfo: None,
            cpu_checks: HashMap::new(),
        }
    }

    #[test]
    fn kept_answers_stand_only_while_recent_and_for_the_same_tools() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("criu");
        std::fs::write(&tool, b"v1").unwrap();
        let path = tool.to_str().unwrap();
        let ids = [tool_id(Some(path)), tool_id(None)];
        assert!(ids[0].is_some());
        assert_eq!(ids[1], None);
        assert!(probed(Instant::now(), ids).usable(&ids));
        if let Some(old) = Instant::now().checked_sub(PROBE_MAX_AGE) {
            assert!(!probed(old, ids).usable(&ids));
        }
        // Replaced in place (a new file under the same name, as an install does).
        let fresh = dir.path().join("criu.new");
        std::fs::write(&fresh, b"v2, longer").unwrap();
        std::fs::rename(&fresh, &tool).unwrap();
        let now = [tool_id(Some(path)), tool_id(None)];
        assert_ne!(now, ids);
        assert!(!probed(Instant::now(), ids).usable(&now));
        std::fs::remove_file(&tool).unwrap();
        assert_eq!(tool_id(Some(path)), None);
    }

    #[test]
    fn criu_versions_compare() {
        assert!(version_at_least("4.2.1", MIN_CRIU));
        assert!(version_at_least("5.0", MIN_CRIU));
        assert!(!version_at_least("4.1", MIN_CRIU));
        assert!(!version_at_least("3.17.1", MIN_CRIU));
    }
}
