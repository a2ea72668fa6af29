//! What this host is and can do, discovered from the daemon and the system — never configured.

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
        })
    }

    pub fn scratch(&self, what: &str) -> PathBuf {
        self.state_dir
            .join("scratch")
            .join(format!("{what}-{}", crate::new_id()))
    }

    /// Everything `ferry check` reports, and every reason this host cannot take part.
    pub async fn facts(&self, peer_cpuinfo: Option<&[u8]>) -> HostFacts {
        let mut f = HostFacts {
            agent: self.name.clone(),
            hostname: read_trim("/proc/sys/kernel/hostname"),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            arch: std::env::consts::ARCH.to_string(),
            cap_sys_resource: has_cap_sys_resource(),
            pipe_max_size: read_trim("/proc/sys/fs/pipe-max-size").parse().unwrap_or(0),
            ..Default::default()
        };
        // The probes are independent processes and calls: side by side.
        let criu_facts = async {
            match &self.criu {
                Some(criu) => Some(ferry_criu::criu_facts(criu).await),
                None => None,
            }
        };
        let runc_version = async {
            match &self.runc {
                Some(runc) => Some(ferry_criu::runc_version(runc).await),
                None => None,
            }
        };
        let (criu_facts, runc_version, docker_info) =
            tokio::join!(criu_facts, runc_version, self.docker.info());
        match (&self.criu, criu_facts) {
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
                Err(e) => f.problems.push(format!("{e} {}", e.log().join(" / "))),
            },
        }
        match runc_version {
            None => f.problems.push(format!(
                "runc not found in PATH or {}",
                TOOL_DIRS.join(", ")
            )),
            Some(Ok(v)) => f.runc_version = Some(v),
            Some(Err(e)) => f.problems.push(e.to_string()),
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
            let scratch = self.scratch("cpuinfo-check");
            match ferry_criu::cpuinfo_check(criu, &scratch, peer).await {
                Ok(Ok(())) => f.cpu_compatible = Some(true),
                Ok(Err(lines)) => {
                    f.cpu_compatible = Some(false);
                    f.cpu_check_log = lines;
                }
                Err(e) => f.problems.push(e.to_string()),
            }
            let _ = std::fs::remove_dir_all(&scratch);
        }
        f
    }

    pub async fn cpuinfo(&self) -> Option<Vec<u8>> {
        let criu = self.criu.as_ref()?;
        let scratch = self.scratch("cpuinfo-dump");
        let r = ferry_criu::cpuinfo_dump(criu, &scratch).await.ok();
        let _ = std::fs::remove_dir_all(&scratch);
        r
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

    #[test]
    fn criu_versions_compare() {
        assert!(version_at_least("4.2.1", MIN_CRIU));
        assert!(version_at_least("5.0", MIN_CRIU));
        assert!(!version_at_least("4.1", MIN_CRIU));
        assert!(!version_at_least("3.17.1", MIN_CRIU));
    }
}
