//! Configuration, the layout derived from it, and the description handed to tests.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const AGENT_PORT: u16 = 7070;
pub const BRIDGE_NETNS: &str = "ferry-br";
pub const CLIENT_NETNS: &str = "ferry-client";
/// Root-namespace end of the link to the segment, so a ferry CLI on the host reaches agents.
pub const CTL_IFACE: &str = "ferry-ctl";
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 50);
pub const CTL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub const SEGMENT_PREFIX: u8 = 24;
pub const MACVLAN_NETWORK: &str = "ferrynet";
pub const MACVLAN_SUBNET: &str = "198.18.0.0/24";
/// Docker hands out container addresses only from here, away from hosts, client and ctl.
pub const MACVLAN_IP_RANGE: &str = "198.18.0.128/25";
pub const MACVLAN_GATEWAY: &str = "198.18.0.254";
pub const BRIDGE_NETWORK: &str = "ferrybr";
pub const BRIDGE_SUBNET: &str = "198.19.5.0/24";
pub const WORKLOAD_IMAGE: &str = "ferry-workload:latest";
pub const REDIS_IMAGE: &str = "ferry-redis:latest";
/// Built only with [`TestbedConfig::with_userns_hosts`]: its server runs as uid 999.
pub const POSTGRES_IMAGE: &str = "ferry-postgres:latest";
pub const POSTGRES_PORT: u16 = 5432;
/// Port `ferry-workload serve` listens on inside the workload image.
pub const WORKLOAD_PORT: u16 = 7000;
pub const REDIS_PORT: u16 = 6379;
/// Set to `1` to tolerate a ferry binary that cannot yet run `pki init` / `agent`.
pub const NO_AGENTS_ENV: &str = "FERRY_TESTBED_NO_AGENTS";

/// Every host the test bed may create; `c` only with [`TestbedConfig::with_incompatible_host`],
/// `d` and `e` only with [`TestbedConfig::with_userns_hosts`].
pub(crate) const ALL_HOSTS: [(&str, Ipv4Addr); 5] = [
    ("a", Ipv4Addr::new(198, 18, 0, 1)),
    ("b", Ipv4Addr::new(198, 18, 0, 2)),
    ("c", Ipv4Addr::new(198, 18, 0, 3)),
    ("d", Ipv4Addr::new(198, 18, 0, 4)),
    ("e", Ipv4Addr::new(198, 18, 0, 5)),
];

/// Hosts whose dockerd runs with `"userns-remap": "default"`.
pub(crate) const USERNS_HOSTS: [&str; 2] = ["d", "e"];

#[derive(Clone, Debug)]
pub struct TestbedConfig {
    /// Persistent state: docker data roots, PKI, logs, testbed.json.
    pub root: PathBuf,
    /// Runtime state that must not outlive the daemons: sockets, exec roots, pid files.
    pub run_dir: PathBuf,
    /// The ferry binary, for `ferry pki init` and `ferry agent`.
    pub ferry_exe: PathBuf,
    /// The ferry-workload binary copied into the images.
    pub workload_exe: PathBuf,
    /// Adds host `c`, whose Docker lacks experimental mode and the ferry runtime, so
    /// preflight refusals can be tested.
    pub with_incompatible_host: bool,
    /// Adds hosts `d` and `e`, whose dockerds remap container root to an unprivileged host
    /// uid range (`userns-remap`). Root here lacks CAP_SYS_RESOURCE, so CRIU can dump
    /// processes of non-root uids only inside a user namespace owned by root: these hosts are
    /// where containers that must not run as root (PostgreSQL) are migrated.
    pub with_userns_hosts: bool,
}

impl TestbedConfig {
    pub fn new(ferry_exe: PathBuf, workload_exe: PathBuf) -> Self {
        TestbedConfig {
            root: PathBuf::from("/var/lib/ferry-testbed"),
            run_dir: PathBuf::from("/run/ferry-testbed"),
            ferry_exe,
            workload_exe,
            with_incompatible_host: false,
            with_userns_hosts: false,
        }
    }

    pub(crate) fn host_names(&self) -> Vec<&'static str> {
        ALL_HOSTS
            .iter()
            .map(|(h, _)| *h)
            .filter(|h| match *h {
                "c" => self.with_incompatible_host,
                h if USERNS_HOSTS.contains(&h) => self.with_userns_hosts,
                _ => true,
            })
            .collect()
    }

    pub(crate) fn info_path(&self) -> PathBuf {
        self.root.join("testbed.json")
    }

    /// Written once bridge, client namespace and root link exist; its absence means an `up`
    /// died half-way and the next one must start over rather than trust what it finds.
    pub(crate) fn shared_marker(&self) -> PathBuf {
        self.run_dir.join("segment-ready")
    }

    pub(crate) fn lock_path(&self) -> PathBuf {
        self.root.join(".lock")
    }

    pub(crate) fn pki_dir(&self) -> PathBuf {
        self.root.join("pki")
    }

    pub(crate) fn layout(&self, host: &str) -> HostLayout {
        HostLayout {
            dir: self.root.join(host),
            run: self.run_dir.join(host),
        }
    }

    pub(crate) fn host_info(&self, name: &str, ip: Ipv4Addr) -> HostInfo {
        let l = self.layout(name);
        HostInfo {
            name: name.to_string(),
            netns: format!("ferry-{name}"),
            ip,
            docker_host: format!("unix://{}", l.socket().display()),
            data_root: l.data_root(),
            exec_root: l.exec_root(),
            agent_addr: SocketAddr::new(ip.into(), AGENT_PORT),
            tls_dir: self.pki_dir().join(name),
            state_dir: l.state_dir(),
            agent_log: l.agent_log(),
            compatible: name != "c",
            userns_remap: USERNS_HOSTS.contains(&name),
        }
    }

    /// What `up` promises to build; also what a healthy test bed's testbed.json must equal.
    pub(crate) fn expected_info(&self) -> TestbedInfo {
        let hosts = ALL_HOSTS
            .iter()
            .filter(|(h, _)| self.host_names().contains(h))
            .map(|(h, ip)| self.host_info(h, *ip))
            .collect();
        TestbedInfo {
            hosts,
            client_netns: CLIENT_NETNS.to_string(),
            client_ip: CLIENT_IP,
            ctl_ip: CTL_IP,
            macvlan_network: MACVLAN_NETWORK.to_string(),
            macvlan_subnet: MACVLAN_SUBNET.to_string(),
            bridge_network: BRIDGE_NETWORK.to_string(),
            pki_dir: self.pki_dir(),
            client_tls_dir: self.pki_dir().join("client"),
            workload_image: WORKLOAD_IMAGE.to_string(),
            redis_image: REDIS_IMAGE.to_string(),
            postgres_image: self.with_userns_hosts.then(|| POSTGRES_IMAGE.to_string()),
        }
    }
}

/// Per-host file locations; persistent ones under `root/<h>`, runtime ones under `run_dir/<h>`.
pub(crate) struct HostLayout {
    pub dir: PathBuf,
    pub run: PathBuf,
}

impl HostLayout {
    pub fn data_root(&self) -> PathBuf {
        self.dir.join("docker")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("ferry")
    }
    pub fn daemon_json(&self) -> PathBuf {
        self.dir.join("daemon.json")
    }
    pub fn runtime_script(&self) -> PathBuf {
        self.dir.join("ferry-runtime")
    }
    pub fn launch_script(&self) -> PathBuf {
        self.dir.join("dockerd-launch.sh")
    }
    pub fn dockerd_log(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
    pub fn exec_root(&self) -> PathBuf {
        self.run.join("exec")
    }
    pub fn socket(&self) -> PathBuf {
        self.run.join("docker.sock")
    }
    pub fn dockerd_pidfile(&self) -> PathBuf {
        self.run.join("dockerd.pid")
    }
    /// Written once this host's dockerd is up and emptied of leftovers.
    pub fn ready_marker(&self) -> PathBuf {
        self.run.join("ready")
    }
    pub fn agent_pidfile(&self) -> PathBuf {
        self.run.join("agent.pid")
    }
    pub fn containerd_pidfile(&self) -> PathBuf {
        self.exec_root().join("containerd").join("containerd.pid")
    }
}

/// One simulated Docker host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HostInfo {
    /// "a", "b" or "c".
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// `unix:///run/ferry-testbed/<h>/docker.sock`, usable from the root namespace.
    pub docker_host: String,
    pub data_root: PathBuf,
    pub exec_root: PathBuf,
    pub agent_addr: SocketAddr,
    pub tls_dir: PathBuf,
    pub state_dir: PathBuf,
    pub agent_log: PathBuf,
    /// False for host `c`: no experimental mode, no ferry runtime.
    pub compatible: bool,
    /// True for hosts `d` and `e`: dockerd runs with `userns-remap`.
    #[serde(default)]
    pub userns_remap: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TestbedInfo {
    pub hosts: Vec<HostInfo>,
    pub client_netns: String,
    pub client_ip: Ipv4Addr,
    /// Address of the root namespace on the segment.
    pub ctl_ip: Ipv4Addr,
    pub macvlan_network: String,
    pub macvlan_subnet: String,
    pub bridge_network: String,
    pub pki_dir: PathBuf,
    pub client_tls_dir: PathBuf,
    pub workload_image: String,
    pub redis_image: String,
    #[serde(default)]
    pub postgres_image: Option<String>,
}

impl TestbedInfo {
    pub fn host(&self, name: &str) -> Option<&HostInfo> {
        self.hosts.iter().find(|h| h.name == name)
    }
}
