//! `docker inspect` of a container on one host → the `POST /containers/create` body that makes
//! the same container on another host, ready for `start --checkpoint`.
//!
//! The body is Config (whole) + HostConfig (whole) + NetworkingConfig built from the endpoints,
//! with the exceptions in [`FIELD_RULES`]. Copying whole objects rather than picking fields
//! means options Docker adds later are carried without a ferry change; the rules list what must
//! *not* be carried verbatim.

use serde_json::{json, Map, Value};

use crate::client::primary_network;
use crate::util::ApiVersion;
use crate::view::user_aliases;
use crate::DockerError;

/// How a field of the inspect data is treated when building the create body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Not sent at all.
    Dropped,
    /// Not sent when 0/null (which means "unset"); sent as is otherwise.
    DroppedIfZero,
    /// Sent with a value other than the inspected one (or only under a condition).
    Rewritten,
    /// Built from inspect data outside Config/HostConfig.
    Built,
    /// Sent unchanged although it may not fit the target: listed so nobody "fixes" it silently.
    KeptHostSpecific,
}

/// One entry of [`FIELD_RULES`].
#[derive(Debug, Clone, Copy)]
pub struct FieldRule {
    /// Dotted path in the inspect data (`*` = every network).
    pub field: &'static str,
    pub treatment: Treatment,
    /// Why the field differs from a verbatim copy.
    pub why: &'static str,
}

/// Every field of `docker inspect` that is not copied verbatim into the create body, and why.
/// `Dropped`/`DroppedIfZero` entries under `Config.`/`HostConfig.` are applied generically from
/// this table; the others are implemented in [`create_body_from_inspect`] (one test per rule).
pub const FIELD_RULES: &[FieldRule] = &[
    // --- Config ---
    FieldRule { field: "Config.Image", treatment: Treatment::Rewritten,
        why: "set to the image ID (inspect `Image`): a tag can name another image on the target or be re-tagged later, and the checkpoint and rootfs diff belong to exactly this image" },
    FieldRule { field: "Config.MacAddress", treatment: Treatment::Rewritten,
        why: "API >= 1.44: removed, the MAC goes per endpoint (the field is deprecated and the daemon rejects a value that disagrees with the endpoint's); API < 1.44: set to the primary network's current MAC, the only MAC old daemons read. Also read: when the primary endpoint has no current MAC (container not running) the configured Config.MacAddress is used for it" },
    FieldRule { field: "Config.Hostname", treatment: Treatment::Rewritten,
        why: "cleared when the container shares the host's or another container's UTS/network namespace (it is then the source machine's name, and Docker refuses a hostname with container: networking); kept otherwise, even when it is the source's short ID, because the processes already saw it and CRIU restores the UTS namespace with it" },
    FieldRule { field: "Config.Domainname", treatment: Treatment::Rewritten,
        why: "cleared under the same condition as Config.Hostname" },
    // --- HostConfig ---
    FieldRule { field: "HostConfig.ContainerIDFile", treatment: Treatment::Dropped,
        why: "a --cidfile path on the machine where `docker run` ran; client-side, meaningless on the target" },
    FieldRule { field: "HostConfig.KernelMemory", treatment: Treatment::DroppedIfZero,
        why: "deprecated kernel-memory limit; 0 means unset, API >= 1.42 daemons ignore it and cgroup v2 has no such limit" },
    FieldRule { field: "HostConfig.KernelMemoryTCP", treatment: Treatment::DroppedIfZero,
        why: "deprecated (API 1.51) and removed (API 1.52); 0 means unset" },
    FieldRule { field: "HostConfig.Links", treatment: Treatment::Rewritten,
        why: "inspect shows legacy links as `/other:/self/alias`, create expects `other:alias`" },
    FieldRule { field: "HostConfig.NetworkMode", treatment: Treatment::Rewritten,
        why: "a network ID (or ID prefix) is replaced by the network's name: IDs are per host, names are what both hosts share" },
    FieldRule { field: "HostConfig.Runtime", treatment: Treatment::Rewritten,
        why: "replaced when a runtime is given: the target restores through a runc-wrapping runtime (lazy pages, own work dir); kept otherwise" },
    FieldRule { field: "HostConfig.RestartPolicy", treatment: Treatment::KeptHostSpecific,
        why: "kept: the target gets the original policy. Pass an inspect taken *before* ferry sets the source's policy to `no`" },
    FieldRule { field: "HostConfig.PortBindings", treatment: Treatment::KeptHostSpecific,
        why: "kept: a HostIp that exists only on the source makes start fail on the target, which is better than silently publishing on another address" },
    FieldRule { field: "HostConfig.Binds/Mounts/Devices/CgroupParent", treatment: Treatment::KeptHostSpecific,
        why: "kept: host paths and devices must exist on the target; named volumes are created empty if absent (ferry copies their data)" },
    FieldRule { field: "HostConfig.VolumesFrom/IpcMode/PidMode container:*", treatment: Treatment::KeptHostSpecific,
        why: "kept: they name other containers, which must exist on the target under that name; the daemon says so if not" },
    // --- NetworkingConfig, built from NetworkSettings.Networks ---
    FieldRule { field: "NetworkSettings.Networks", treatment: Treatment::Built,
        why: "becomes NetworkingConfig.EndpointsConfig keyed by network name (not ID); none for host/none/container: modes" },
    FieldRule { field: "NetworkSettings.Networks.*.IPAMConfig.IPv4Address", treatment: Treatment::Built,
        why: "set to the current IPAddress (else the configured one) so peers keep talking to the same address; not on the default bridge, where Docker refuses fixed addresses" },
    FieldRule { field: "NetworkSettings.Networks.*.IPAMConfig.IPv6Address", treatment: Treatment::Built,
        why: "set to the current GlobalIPv6Address (else the configured one), same reason" },
    FieldRule { field: "NetworkSettings.Networks.*.MacAddress", treatment: Treatment::Built,
        why: "set to the current MAC so peers' ARP caches stay valid (restored TCP connections keep working); below API 1.44 daemons read only Config.MacAddress" },
    FieldRule { field: "NetworkSettings.Networks.*.Aliases", treatment: Treatment::Built,
        why: "without the container's short ID and hostname, which daemons add on their own; the source's short ID names nothing on the target" },
    FieldRule { field: "NetworkSettings.Networks.*.{NetworkID,EndpointID,Gateway,IPAddress,IPPrefixLen,IPv6Gateway,GlobalIPv6Address,GlobalIPv6PrefixLen,DNSNames}", treatment: Treatment::Dropped,
        why: "operational data the target daemon assigns; IDs are per host; DNSNames is read-only" },
    FieldRule { field: "NetworkSettings.Networks.*.GwPriority", treatment: Treatment::Dropped,
        why: "API 1.48+; we speak at most 1.44, where the daemon zeroes it anyway" },
    // --- the rest of inspect ---
    FieldRule { field: "Mounts", treatment: Treatment::Dropped,
        why: "derived from HostConfig.Binds/Mounts and Config.Volumes, which are sent; anonymous volumes get a new name on the target (find it by Destination in the new container's inspect)" },
    FieldRule { field: "Id,Created,Path,Args,State,Name,RestartCount,ResolvConfPath,HostnamePath,HostsPath,LogPath,Driver,Platform,MountLabel,ProcessLabel,AppArmorProfile,ExecIDs,GraphDriver,SizeRw,SizeRootFs,ImageManifestDescriptor,NetworkSettings.*", treatment: Treatment::Dropped,
        why: "state of the source container, not configuration (Path/Args derive from Entrypoint/Cmd; the name is a create parameter)" },
];

fn object<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>, DockerError> {
    match v.get(field) {
        Some(Value::Object(m)) => Ok(m),
        Some(other) => Err(DockerError::bad_inspect(
            field,
            format!("expected an object, found {other}"),
        )),
        None => Err(DockerError::bad_inspect(field, "missing")),
    }
}

fn non_empty_str<'a>(v: Option<&'a Value>, key: &str) -> Option<&'a str> {
    v.and_then(|v| v.get(key))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn is_zero(v: &Value) -> bool {
    v.is_null() || v.as_i64() == Some(0) || v.as_u64() == Some(0)
}

/// Applies the table's generic drops to one section ("Config" or "HostConfig").
fn apply_drops(section: &str, obj: &mut Map<String, Value>) {
    for rule in FIELD_RULES {
        let Some(key) = rule
            .field
            .strip_prefix(section)
            .and_then(|r| r.strip_prefix('.'))
        else {
            continue;
        };
        match rule.treatment {
            Treatment::Dropped => {
                obj.remove(key);
            }
            Treatment::DroppedIfZero if obj.get(key).is_some_and(is_zero) => {
                obj.remove(key);
            }
            _ => {}
        }
    }
}

/// `/other:/self/alias` → `other:alias`; anything else is passed through.
fn rewrite_link(link: &str) -> String {
    match link.split_once(':') {
        Some((target, alias)) if target.starts_with('/') => {
            format!(
                "{}:{}",
                target.trim_start_matches('/'),
                alias.rsplit('/').next().unwrap_or(alias)
            )
        }
        _ => link.to_string(),
    }
}

/// Network modes that are not a network of their own.
fn is_special_mode(mode: &str) -> bool {
    matches!(mode, "host" | "none") || mode.starts_with("container:")
}

/// Builds the body of `POST /containers/create` that recreates the inspected container on
/// another host with the same image, configuration, addresses and MACs. `runtime` replaces
/// `HostConfig.Runtime`; `api_version` is the version spoken to the *target* daemon (it decides
/// where the MAC goes). See [`FIELD_RULES`] for everything not copied verbatim.
pub fn create_body_from_inspect(
    inspect: &Value,
    runtime: Option<&str>,
    api_version: &str,
) -> Result<Value, DockerError> {
    let api = ApiVersion::parse(api_version)?;
    let per_endpoint_mac = api >= ApiVersion(1, 44);

    let id = inspect
        .get("Id")
        .and_then(Value::as_str)
        .ok_or_else(|| DockerError::bad_inspect("Id", "missing"))?;
    let image_id = non_empty_str(Some(inspect), "Image")
        .ok_or_else(|| DockerError::bad_inspect("Image", "missing or empty"))?;
    let mut config = object(inspect, "Config")?.clone();
    let mut host = object(inspect, "HostConfig")?.clone();
    let empty = Map::new();
    let networks = match inspect.pointer("/NetworkSettings/Networks") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(DockerError::bad_inspect(
                "NetworkSettings.Networks",
                format!("expected an object, found {other}"),
            ))
        }
    };

    apply_drops("Config", &mut config);
    apply_drops("HostConfig", &mut host);

    // Config.Image
    config.insert("Image".into(), Value::String(image_id.to_string()));
    // Config.MacAddress (re-added below for API < 1.44)
    config.remove("MacAddress");

    // HostConfig.NetworkMode: ID → name
    let mut mode = host
        .get("NetworkMode")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if !mode.is_empty()
        && !is_special_mode(&mode)
        && !matches!(mode.as_str(), "default" | "bridge")
        && !networks.contains_key(&mode)
    {
        let by_id = networks.iter().find(|(_, ep)| {
            ep.get("NetworkID")
                .and_then(Value::as_str)
                .is_some_and(|nid| {
                    nid == mode || (mode.len() >= 12 && nid.starts_with(mode.as_str()))
                })
        });
        if let Some((name, _)) = by_id {
            mode = name.clone();
            host.insert("NetworkMode".into(), Value::String(mode.clone()));
        }
    }

    // Config.Hostname / Domainname
    let uts_host = host.get("UTSMode").and_then(Value::as_str) == Some("host");
    if mode == "host" || mode.starts_with("container:") || uts_host {
        config.insert("Hostname".into(), Value::String(String::new()));
        config.insert("Domainname".into(), Value::String(String::new()));
    }
    let hostname = inspect
        .pointer("/Config/Hostname")
        .and_then(Value::as_str)
        .unwrap_or("");

    // HostConfig.Links
    if let Some(Value::Array(links)) = host.get_mut("Links") {
        for l in links.iter_mut() {
            if let Some(s) = l.as_str() {
                *l = Value::String(rewrite_link(s));
            }
        }
    }

    // HostConfig.Runtime
    if let Some(r) = runtime {
        host.insert("Runtime".into(), Value::String(r.to_string()));
    }

    // NetworkingConfig.EndpointsConfig
    let mut endpoints = Map::new();
    if !is_special_mode(&mode) {
        for (net, ep) in networks {
            if is_special_mode(net) {
                continue;
            }
            let user_defined = net != "bridge";
            let ipam_in = ep.get("IPAMConfig").filter(|v| v.is_object());
            let mut out = Map::new();
            if user_defined {
                let mut ipam = Map::new();
                let v4 = non_empty_str(Some(ep), "IPAddress")
                    .or_else(|| non_empty_str(ipam_in, "IPv4Address"));
                if let Some(v4) = v4 {
                    ipam.insert("IPv4Address".into(), json!(v4));
                }
                let v6 = non_empty_str(Some(ep), "GlobalIPv6Address")
                    .or_else(|| non_empty_str(ipam_in, "IPv6Address"));
                if let Some(v6) = v6 {
                    ipam.insert("IPv6Address".into(), json!(v6));
                }
                if let Some(ll) = ipam_in
                    .and_then(|i| i.get("LinkLocalIPs"))
                    .filter(|l| l.as_array().is_some_and(|a| !a.is_empty()))
                {
                    ipam.insert("LinkLocalIPs".into(), ll.clone());
                }
                if !ipam.is_empty() {
                    out.insert("IPAMConfig".into(), Value::Object(ipam));
                }
                let aliases = user_aliases(ep, id, hostname);
                if !aliases.is_empty() {
                    out.insert("Aliases".into(), json!(aliases));
                }
            }
            if let Some(mac) = non_empty_str(Some(ep), "MacAddress") {
                out.insert("MacAddress".into(), json!(mac));
            }
            if let Some(links) = ep
                .get("Links")
                .filter(|l| l.as_array().is_some_and(|a| !a.is_empty()))
            {
                out.insert("Links".into(), links.clone());
            }
            if let Some(opts) = ep
                .get("DriverOpts")
                .filter(|o| o.as_object().is_some_and(|m| !m.is_empty()))
            {
                out.insert("DriverOpts".into(), opts.clone());
            }
            endpoints.insert(net.clone(), Value::Object(out));
        }
    }

    let primary = primary_network(&mode, endpoints.keys().map(String::as_str));
    // A container that is not running has no current MAC; a MAC the operator fixed with
    // --mac-address is then only in Config.MacAddress (always so on 20.10) and belongs to the
    // primary network.
    if let (Some(primary), Some(configured)) =
        (&primary, non_empty_str(inspect.get("Config"), "MacAddress"))
    {
        if let Some(Value::Object(ep)) = endpoints.get_mut(primary) {
            ep.entry("MacAddress").or_insert_with(|| json!(configured));
        }
    }
    // Config.MacAddress below API 1.44: the primary network's MAC.
    if !per_endpoint_mac {
        if let Some(primary) = &primary {
            if let Some(mac) = endpoints
                .get(primary)
                .and_then(|e| e.get("MacAddress"))
                .and_then(Value::as_str)
            {
                config.insert("MacAddress".into(), json!(mac));
            }
        }
    }

    let mut body = config;
    body.insert("HostConfig".into(), Value::Object(host));
    body.insert(
        "NetworkingConfig".into(),
        json!({ "EndpointsConfig": endpoints }),
    );
    Ok(Value::Object(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_rewrite() {
        assert_eq!(rewrite_link("/redis:/web/db"), "redis:db");
        assert_eq!(rewrite_link("redis:db"), "redis:db");
        assert_eq!(rewrite_link("/redis:db"), "redis:db");
    }

    #[test]
    fn rules_are_documented() {
        for r in FIELD_RULES {
            assert!(!r.why.is_empty() && !r.field.is_empty());
        }
    }
}
