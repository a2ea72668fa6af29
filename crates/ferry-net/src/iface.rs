//! Interfaces of a container's network namespace, read from `ip -j addr show`.

use std::net::Ipv4Addr;

use serde::Deserialize;

use crate::{tool, NetError};

/// A non-loopback interface as the migration needs it: which MAC to announce and which IPv4
/// addresses move with the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    /// `None` for links without an Ethernet address (tunnels, `none` link type).
    pub mac: Option<[u8; 6]>,
    pub ipv4: Vec<Ipv4Addr>,
}

pub async fn interfaces(pid: u32) -> Result<Vec<Iface>, NetError> {
    let step = format!("listing interfaces of pid {pid}");
    let json = tool::in_netns(&step, pid, "ip", &["-j", "addr", "show"], None).await?;
    parse_ip_addr_json(&json).map_err(|reason| NetError::Parse {
        step,
        command: format!("nsenter --target {pid} --net -- ip -j addr show"),
        reason,
    })
}

#[derive(Deserialize)]
struct Link {
    /// Absent in the empty objects some iproute2 versions emit for filtered-out links.
    ifname: Option<String>,
    link_type: Option<String>,
    address: Option<String>,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    addr_info: Vec<Addr>,
}

#[derive(Deserialize)]
struct Addr {
    family: Option<String>,
    local: Option<String>,
}

/// Parses `ip -j addr show`, skipping loopback.
pub fn parse_ip_addr_json(json: &str) -> Result<Vec<Iface>, String> {
    let links: Vec<Link> = serde_json::from_str(json).map_err(|e| format!("bad JSON: {e}"))?;
    let mut out = Vec::new();
    for link in links {
        let Some(name) = link.ifname else { continue };
        if link.link_type.as_deref() == Some("loopback")
            || link.flags.iter().any(|f| f == "LOOPBACK")
        {
            continue;
        }
        let mac = match (link.link_type.as_deref(), link.address.as_deref()) {
            (Some("ether"), Some(addr)) => {
                Some(parse_mac(addr).ok_or_else(|| format!("{name}: bad MAC {addr:?}"))?)
            }
            _ => None,
        };
        let mut ipv4 = Vec::new();
        for addr in link
            .addr_info
            .iter()
            .filter(|a| a.family.as_deref() == Some("inet"))
        {
            let Some(local) = addr.local.as_deref() else {
                continue;
            };
            ipv4.push(
                local
                    .parse()
                    .map_err(|_| format!("{name}: bad IPv4 address {local:?}"))?,
            );
        }
        out.push(Iface { name, mac, ipv4 });
    }
    Ok(out)
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER: &str = include_str!("../tests/fixtures/ip-addr-docker.json");
    const FILTERED: &str = include_str!("../tests/fixtures/ip-addr-filtered.json");

    #[test]
    fn docker_container() {
        let ifaces = parse_ip_addr_json(DOCKER).unwrap();
        assert_eq!(
            ifaces,
            vec![
                Iface {
                    name: "tunl0".into(),
                    mac: None,
                    ipv4: vec![]
                },
                Iface {
                    name: "eth0".into(),
                    mac: Some([0x02, 0x42, 0xac, 0x11, 0x00, 0x02]),
                    ipv4: vec![Ipv4Addr::new(172, 17, 0, 2), Ipv4Addr::new(198, 18, 5, 9)],
                },
            ]
        );
    }

    #[test]
    fn empty_objects_are_skipped() {
        let ifaces = parse_ip_addr_json(FILTERED).unwrap();
        assert_eq!(
            ifaces,
            vec![Iface {
                name: "eth0".into(),
                mac: Some([0x0a, 0, 0, 0, 0, 1]),
                ipv4: vec![]
            }]
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_ip_addr_json("Device \"x\" does not exist.").is_err());
        assert!(parse_ip_addr_json(
            r#"[{"ifname":"e","link_type":"ether","address":"zz:00:00:00:00:00"}]"#
        )
        .is_err());
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:42:AC:11:00:02"),
            Some([0x02, 0x42, 0xac, 0x11, 0, 2])
        );
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "2:42:ac:11:00:02",
            "0g:42:ac:11:00:02",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
