//! The L2 segment: one bridge in its own namespace, every host, the client and the root
//! namespace attached by veths. A shared segment is what lets a migrated container keep its
//! IP and MAC (and so its TCP connections) without any routing change.

use std::net::Ipv4Addr;
use std::path::Path;

use crate::cmd::{self, ip, ip_quiet};
use crate::config::{
    ALL_HOSTS, BRIDGE_NETNS, CLIENT_IP, CLIENT_NETNS, CTL_IFACE, CTL_IP, SEGMENT_PREFIX,
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

/// The parts every host depends on: bridge, client namespace, root-namespace link.
pub(crate) fn shared_exists() -> bool {
    netns_exists(BRIDGE_NETNS) && netns_exists(CLIENT_NETNS) && ctl_link_exists()
}

/// Locally administered and derived from the address, so a rebuilt host (or client) comes
/// back with the MAC its peers have cached: a fresh random MAC left the root namespace's ARP
/// entry pointing at the old one and the agent unreachable for over 30 s.
pub(crate) fn segment_mac(addr: Ipv4Addr) -> String {
    let o = addr.octets();
    format!("02:66:72:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
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
    ip(
        &step,
        &[
            "-n",
            ns,
            "link",
            "set",
            "eth0",
            "address",
            &segment_mac(addr),
        ],
    )
    .await?;
    let cidr = format!("{addr}/{SEGMENT_PREFIX}");
    ip(&step, &["-n", ns, "addr", "add", &cidr, "dev", "eth0"]).await?;
    ip(&step, &["-n", ns, "link", "set", "eth0", "up"]).await?;
    Ok(())
}

/// The bridge, the client namespace and the root namespace's link: everything but the hosts.
pub(crate) async fn create_shared() -> Result<(), TestbedError> {
    let step = "create the bridge namespace";
    ip(step, &["netns", "add", BRIDGE_NETNS]).await?;
    ip(step, &["-n", BRIDGE_NETNS, "link", "set", "lo", "up"]).await?;
    ip(
        step,
        // Short MAC ageing: a test that starts a container again on the host it left, with the
        // same MAC and no frame sent yet, must not wait minutes for the switch to forget.
        &[
            "-n",
            BRIDGE_NETNS,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "ageing_time",
            "200",
        ],
    )
    .await?;
    ip(step, &["-n", BRIDGE_NETNS, "link", "set", "br0", "up"]).await?;

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
    ip(
        step,
        &["link", "set", CTL_IFACE, "address", &segment_mac(CTL_IP)],
    )
    .await?;
    let cidr = format!("{CTL_IP}/{SEGMENT_PREFIX}");
    ip(step, &["addr", "add", &cidr, "dev", CTL_IFACE]).await?;
    ip(step, &["link", "set", CTL_IFACE, "up"]).await?;
    Ok(())
}

/// A host namespace on the segment, with forwarding on.
pub(crate) async fn create_host(host: &str, addr: Ipv4Addr) -> Result<(), TestbedError> {
    let ns = format!("ferry-{host}");
    attach(&ns, &format!("veth-{host}"), addr).await?;
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
    Ok(())
}

/// Removes a host's namespace and its port on the bridge; missing pieces are fine.
pub(crate) async fn destroy_host(host: &str) {
    let ns = format!("ferry-{host}");
    if netns_exists(&ns) && !ip_quiet(&["netns", "delete", &ns]).await {
        tracing::warn!(netns = %ns, "ip netns delete failed");
    }
    // Normally gone with its peer; left over if a run died between creating and moving it.
    if netns_exists(BRIDGE_NETNS) {
        ip_quiet(&[
            "-n",
            BRIDGE_NETNS,
            "link",
            "delete",
            &format!("veth-{host}"),
        ])
        .await;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_stable_unicast_and_distinct() {
        assert_eq!(
            segment_mac(Ipv4Addr::new(198, 18, 0, 1)),
            "02:66:72:12:00:01"
        );
        assert_ne!(segment_mac(CLIENT_IP), segment_mac(CTL_IP));
    }
}
