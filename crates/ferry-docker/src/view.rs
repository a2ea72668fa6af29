//! A typed view of the parts of `docker inspect` a migration decides on.
//!
//! Raw inspect JSON differs between Docker versions (see the fixtures); this view normalises
//! what ferry reads so the rest of ferry does not carry version quirks around.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::DockerError;

/// What a migration needs from `docker inspect`.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerView {
    /// Full container ID.
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    /// The exact image (`sha256:...`) the rootfs diff sits on; a tag may mean something else on
    /// the target.
    pub image_id: String,
    /// `Config.Image`, the reference as the operator gave it (for messages and image transfer).
    pub image_ref: String,
    pub running: bool,
    pub paused: bool,
    pub restarting: bool,
    /// `State.Status`: created, running, paused, restarting, removing, exited, dead.
    pub status: String,
    /// Host PID of the container's init process (0 when not running).
    pub pid: u32,
    /// `HostConfig.RestartPolicy` as the daemon reports it (`{"Name": "no"}` if absent).
    pub restart_policy: Value,
    /// `HostConfig.Runtime` ("runc" if absent).
    pub runtime: String,
    /// `HostConfig.NetworkMode` ("default", "bridge", "host", "none", a network, "container:...").
    pub network_mode: String,
    /// `Config.Hostname`.
    pub hostname: String,
    /// One per attached network, sorted by network name.
    pub networks: Vec<NetworkEndpoint>,
    /// Mounts as the daemon reports them, plus `HostConfig.Tmpfs` entries (which `Mounts` omits).
    pub mounts: Vec<MountView>,
    /// `Config.User` ("" = the image's default, normally root).
    pub user: String,
    /// `Config.Labels`.
    pub labels: BTreeMap<String, String>,
}

/// A container's attachment to one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkEndpoint {
    /// Network name (the key in `NetworkSettings.Networks`): names, not IDs, are what match
    /// across hosts.
    pub network: String,
    /// This host's ID of that network.
    pub network_id: String,
    /// Current IPv4 address (None when not running or not assigned).
    pub ipv4: Option<String>,
    pub ipv4_prefix_len: Option<u8>,
    pub gateway: Option<String>,
    /// Current global IPv6 address.
    pub ipv6: Option<String>,
    pub mac: Option<String>,
    /// User-given aliases. The container's short ID and hostname are removed: daemons up to API
    /// 1.44 add both on their own (20.10 in the endpoint, 26+ only in the answer for old
    /// clients), 1.45+ report neither, and the target daemon adds its own again.
    pub aliases: Vec<String>,
    /// Configured `IPAMConfig.IPv4Address` (a fixed address the operator asked for).
    pub ipam_ipv4: Option<String>,
    /// Configured `IPAMConfig.IPv6Address`.
    pub ipam_ipv6: Option<String>,
}

/// One mount of the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountView {
    /// "bind", "volume", "tmpfs" (others such as "npipe"/"cluster"/"image" are passed through).
    pub kind: String,
    /// Host path for binds and volumes ("" for tmpfs).
    pub source: String,
    /// Path inside the container.
    pub destination: String,
    /// Volume name (anonymous volumes have a 64-hex name too).
    pub name: Option<String>,
    /// Volume driver ("local" for ordinary volumes).
    pub driver: Option<String>,
    /// Writable.
    pub rw: bool,
}

fn opt_str(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn req_str(v: &Value, ptr: &str) -> Result<String, DockerError> {
    match v.pointer(ptr) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(DockerError::bad_inspect(
            ptr,
            format!("expected a string, found {other}"),
        )),
        None => Err(DockerError::bad_inspect(ptr, "missing")),
    }
}

fn req_bool(v: &Value, ptr: &str) -> Result<bool, DockerError> {
    match v.pointer(ptr) {
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(DockerError::bad_inspect(
            ptr,
            format!("expected a boolean, found {other}"),
        )),
        None => Err(DockerError::bad_inspect(ptr, "missing")),
    }
}

/// The short ID Docker uses as an automatic alias and default hostname.
pub(crate) fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Aliases minus the ones the daemon adds by itself (short ID, hostname; see [`NetworkEndpoint::aliases`]).
pub(crate) fn user_aliases(ep: &Value, id: &str, hostname: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in ep
        .get("Aliases")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if a.is_empty() || a == short_id(id) || a == id || (!hostname.is_empty() && a == hostname) {
            continue;
        }
        if !out.iter().any(|x| x == a) {
            out.push(a.to_string());
        }
    }
    out
}

impl ContainerView {
    /// Reads the view from `GET /containers/{id}/json` output (any API version 1.41..).
    pub fn from_inspect(v: &Value) -> Result<ContainerView, DockerError> {
        let id = req_str(v, "/Id")?;
        let name = req_str(v, "/Name")?.trim_start_matches('/').to_string();
        let image_id = req_str(v, "/Image")?;
        let image_ref = req_str(v, "/Config/Image")?;
        let running = req_bool(v, "/State/Running")?;
        let paused = req_bool(v, "/State/Paused")?;
        let restarting = req_bool(v, "/State/Restarting")?;
        let status = v
            .pointer("/State/Status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let pid = match v.pointer("/State/Pid") {
            None | Some(Value::Null) => 0,
            Some(p) => p
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| {
                    DockerError::bad_inspect("/State/Pid", format!("not a valid pid: {p}"))
                })?,
        };
        let host_config = v
            .get("HostConfig")
            .ok_or_else(|| DockerError::bad_inspect("/HostConfig", "missing"))?;
        let restart_policy = match host_config.get("RestartPolicy") {
            Some(p) if p.is_object() => p.clone(),
            _ => serde_json::json!({ "Name": "no", "MaximumRetryCount": 0 }),
        };
        let runtime = opt_str(host_config, "Runtime").unwrap_or_else(|| "runc".to_string());
        let network_mode = host_config
            .get("NetworkMode")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let config = v
            .get("Config")
            .ok_or_else(|| DockerError::bad_inspect("/Config", "missing"))?;
        let hostname = config
            .get("Hostname")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let user = config
            .get("User")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let mut labels = BTreeMap::new();
        if let Some(l) = config.get("Labels").and_then(Value::as_object) {
            for (k, val) in l {
                labels.insert(k.clone(), val.as_str().unwrap_or_default().to_string());
            }
        }

        let mut networks = Vec::new();
        match v.pointer("/NetworkSettings/Networks") {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) => {
                for (net, ep) in map {
                    let ipam = ep.get("IPAMConfig").cloned().unwrap_or(Value::Null);
                    networks.push(NetworkEndpoint {
                        network: net.clone(),
                        network_id: ep
                            .get("NetworkID")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        ipv4: opt_str(ep, "IPAddress"),
                        ipv4_prefix_len: ep
                            .get("IPPrefixLen")
                            .and_then(Value::as_u64)
                            .filter(|p| *p > 0 && *p <= 32)
                            .map(|p| p as u8),
                        gateway: opt_str(ep, "Gateway"),
                        ipv6: opt_str(ep, "GlobalIPv6Address"),
                        mac: opt_str(ep, "MacAddress"),
                        aliases: user_aliases(ep, &id, &hostname),
                        ipam_ipv4: opt_str(&ipam, "IPv4Address"),
                        ipam_ipv6: opt_str(&ipam, "IPv6Address"),
                    });
                }
            }
            Some(other) => {
                return Err(DockerError::bad_inspect(
                    "/NetworkSettings/Networks",
                    format!("expected an object, found {other}"),
                ))
            }
        }
        networks.sort_by(|a, b| a.network.cmp(&b.network));

        let mut mounts = Vec::new();
        for (i, m) in v
            .get("Mounts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let field = |k: &str| format!("/Mounts/{i}/{k}");
            let kind = m
                .get("Type")
                .and_then(Value::as_str)
                .ok_or_else(|| DockerError::bad_inspect(field("Type"), "missing"))?;
            let destination = m
                .get("Destination")
                .and_then(Value::as_str)
                .ok_or_else(|| DockerError::bad_inspect(field("Destination"), "missing"))?;
            mounts.push(MountView {
                kind: kind.to_string(),
                source: m
                    .get("Source")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                destination: destination.to_string(),
                name: opt_str(m, "Name"),
                driver: opt_str(m, "Driver"),
                rw: m.get("RW").and_then(Value::as_bool).unwrap_or(true),
            });
        }
        // `--tmpfs` mounts live only in HostConfig.Tmpfs; a migration must know of them too
        // (their content is in memory, not in any volume or rootfs diff).
        if let Some(t) = host_config.get("Tmpfs").and_then(Value::as_object) {
            for (dest, opts) in t {
                if mounts.iter().any(|m| &m.destination == dest) {
                    continue;
                }
                let ro = opts
                    .as_str()
                    .unwrap_or("")
                    .split(',')
                    .any(|o| o.trim() == "ro");
                mounts.push(MountView {
                    kind: "tmpfs".into(),
                    source: String::new(),
                    destination: dest.clone(),
                    name: None,
                    driver: None,
                    rw: !ro,
                });
            }
        }

        Ok(ContainerView {
            id,
            name,
            image_id,
            image_ref,
            running,
            paused,
            restarting,
            status,
            pid,
            restart_policy,
            runtime,
            network_mode,
            hostname,
            networks,
            mounts,
            user,
            labels,
        })
    }

    /// The endpoint on `network`, if attached.
    pub fn network(&self, network: &str) -> Option<&NetworkEndpoint> {
        self.networks.iter().find(|n| n.network == network)
    }
}
