//! The L2 segment: one bridge in its own namespace, every host, the client and the root
//! namespace attached by veths. A shared segment is what lets a migrated container keep its
//! IP and MAC (and so its TCP connections) without any routing change.

use std::net::Ipv4Addr;
use std::path::Path;

use crate::cmd::{self, ip, ip_quiet};
use crate::config::{
    TestbedConfig, ALL_HOSTS, BRIDGE_NETNS, CLIENT_IP, CLIENT_NETNS, CTL_IFACE, CTL_IP,
    SEGMENT_PREFIX,
};
use crate::error::TestbedError;

/// Every namespace the test bed may own, including host `c` even when not configured, so a
/// teardown also removes what a differently configured run left.
pub(crate) fn all_namespaces() -> Vec<String> {
    let mut v: Vec<String> = ALL_HOSTS
        .iter()
        .map(|(h, _)| format!("ferry-{h}"))
        .collect();
    v.push(CLIENT_NETNS.to_string());
    v.push(BRIDGE_NETNS.to_string());
    v
}

pub(crate) fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

pub(crate) fn ctl_link_exists() -> bool {
    Path::new("/sys/class/net").join(CTL_IFACE).exists()
}

/// Creates namespace `ns` with lo up and a veth whose inner end is `eth0` with `addr`,
/// the outer end enslaved to the bridge.
async fn attach(ns: &str, port: &str, addr: Ipv4Addr) -> Result<(), TestbedError> {
    let step = format!("attach namespace {ns} to the segment");
    ip(&step, &["netns", "add", ns]).await?;
    ip(&step, &["-n", ns, "link", "set", "lo", "up"]).await?;
    ip(
        &step,
        &[
            "-n",
            BRIDGE_NETNS,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ],
    )
    .await?;
    ip(
        &step,
        &[
            "-n",
            BRIDGE_NETNS,
            "link",
            "set",
            port,
            "master",
            "br0",
            "up",
        ],
    )
    .await?;
    let cidr = format!("{addr}/{SEGMENT_PREFIX}");
    ip(&step, &["-n", ns, "addr", "add", &cidr, "dev", "eth0"]).await?;
    ip(&step, &["-n", ns, "link", "set", "eth0", "up"]).await?;
    Ok(())
}

pub(crate) async fn create(cfg: &TestbedConfig) -> Result<(), TestbedError> {
    let step = "create the bridge namespace";
    ip(step, &["netns", "add", BRIDGE_NETNS]).await?;
    ip(step, &["-n", BRIDGE_NETNS, "link", "set", "lo", "up"]).await?;
    ip(
        step,
        &["-n", BRIDGE_NETNS, "link", "add", "br0", "type", "bridge"],
    )
    .await?;
    ip(step, &["-n", BRIDGE_NETNS, "link", "set", "br0", "up"]).await?;

    for (h, addr) in ALL_HOSTS
        .iter()
        .filter(|(h, _)| cfg.host_names().contains(h))
    {
        let ns = format!("ferry-{h}");
        attach(&ns, &format!("veth-{h}"), *addr).await?;
        // dockerd turns the FORWARD policy to DROP when it has to enable forwarding itself.
        cmd::run(
            &format!("enable forwarding in {ns}"),
            cmd::command(
                "ip",
                &[
                    "netns",
                    "exec",
                    &ns,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_forward=1",
                ],
            ),
            cmd::SHORT,
        )
        .await?;
    }
    attach(CLIENT_NETNS, "veth-client", CLIENT_IP).await?;

    let step = "attach the root namespace to the segment";
    ip(
        step,
        &[
            "link",
            "add",
            CTL_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            "veth-ctl",
            "netns",
            BRIDGE_NETNS,
        ],
    )
    .await?;
    ip(
        step,
        &[
            "-n",
            BRIDGE_NETNS,
            "link",
            "set",
            "veth-ctl",
            "master",
            "br0",
            "up",
        ],
    )
    .await?;
    let cidr = format!("{CTL_IP}/{SEGMENT_PREFIX}");
    ip(step, &["addr", "add", &cidr, "dev", CTL_IFACE]).await?;
    ip(step, &["link", "set", CTL_IFACE, "up"]).await?;
    Ok(())
}

/// Removes every namespace and the root-namespace veth; missing pieces are fine.
pub(crate) async fn destroy() {
    for ns in all_namespaces() {
        if netns_exists(&ns) && !ip_quiet(&["netns", "delete", &ns]).await {
            tracing::warn!(netns = %ns, "ip netns delete failed");
        }
    }
    if ctl_link_exists() {
        ip_quiet(&["link", "delete", CTL_IFACE]).await;
    }
}
