//! Moving an IPv4 address's L2 ownership from the source to the target.

use std::fs::File;
use std::mem;
use std::net::Ipv4Addr;
use std::time::Duration;

use nix::sched::CloneFlags;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{tool, NetError};

/// Spacing of repeated announcements: close enough to finish well inside a migration's
/// downtime, far enough apart that one dropped frame does not take its neighbours with it.
pub const GARP_INTERVAL: Duration = Duration::from_millis(20);

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARPHRD_ETHER: u16 = 1;
const ARPOP_REQUEST: u16 = 1;

/// An Ethernet frame carrying a gratuitous ARP request (RFC 5227 announcement): broadcast,
/// sender and target IP both `ip`, target hardware address zero.
///
/// The request form is used because Linux neighbours update an existing entry from it
/// regardless of `arp_accept`, and switches learn the source MAC from any frame.
pub fn build_garp_frame(ip: Ipv4Addr, mac: [u8; 6]) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&ARPHRD_ETHER.to_be_bytes());
    f[16..18].copy_from_slice(&ETH_P_IP.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&ARPOP_REQUEST.to_be_bytes());
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Interface names go straight into `ip` argv and `if_nametoindex`; reject what the kernel
/// would never accept so the error says so instead of a confusing tool message.
fn check_iface(name: &str) -> Result<(), NetError> {
    let invalid = |reason| {
        Err(NetError::InvalidInterface {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 15 {
        return invalid("must be 1 to 15 bytes");
    }
    if name.starts_with('-')
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b <= b' ' || b == 0x7f)
    {
        return invalid("contains '/', ':', whitespace or a control character, or starts with '-'");
    }
    Ok(())
}

/// Turns ARP on or off for `iface` inside the namespace of `pid`.
///
/// Off on the frozen source keeps it from answering ARP for the address that moves, so the
/// L2 segment learns only the target. Toggling also flushes that interface's neighbour table.
pub async fn set_arp(pid: u32, iface: &str, on: bool) -> Result<(), NetError> {
    check_iface(iface)?;
    let state = if on { "on" } else { "off" };
    let step = format!("turning ARP {state} for {iface} of pid {pid}");
    tool::in_netns(
        &step,
        pid,
        "ip",
        &["link", "set", "dev", iface, "arp", state],
        None,
    )
    .await
    .map(drop)
}

/// Announces `ip` at `mac` from inside the namespace of `pid`, `count` times [`GARP_INTERVAL`]
/// apart. Returns once the first announcement is out (the repeats, which only cover a lost
/// frame, follow from the same thread), so a restore is not held up by the intervals.
///
/// `setns` changes only the calling thread, so the work runs on a dedicated thread that exits
/// afterwards: doing it on a tokio worker (or a reused blocking-pool thread) would silently move
/// unrelated tasks into the container's network namespace.
pub async fn gratuitous_arp(
    pid: u32,
    iface: &str,
    ip: Ipv4Addr,
    mac: [u8; 6],
    count: u32,
) -> Result<(), NetError> {
    check_iface(iface)?;
    if count == 0 {
        return Ok(());
    }
    let iface = iface.to_string();
    let step = format!("announcing {ip} on {iface} of pid {pid}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread_step = step.clone();
    std::thread::Builder::new()
        .name("ferry-garp".into())
        .spawn(move || {
            let mut tx = Some(tx);
            let res = send_garps(&thread_step, pid, &iface, ip, mac, count, || {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Ok(()));
                }
            });
            match (res, tx.take()) {
                (Err(e), Some(tx)) => {
                    let _ = tx.send(Err(e));
                }
                (Err(e), None) => tracing::warn!("{thread_step}: a repeat failed: {e}"),
                (Ok(()), _) => {}
            }
        })
        .map_err(|cause| NetError::Io {
            step: format!("{step}: starting a thread"),
            cause,
        })?;
    rx.await.map_err(|_| NetError::Io {
        step: step.clone(),
        cause: std::io::Error::other("the announcing thread ended without a result"),
    })?
}

fn send_garps(
    step: &str,
    pid: u32,
    iface: &str,
    ip: Ipv4Addr,
    mac: [u8; 6],
    count: u32,
    first_sent: impl FnMut(),
) -> Result<(), NetError> {
    let io_err = |what: &str, cause: std::io::Error| NetError::Io {
        step: format!("{step}: {what}"),
        cause,
    };
    let ns_path = format!("/proc/{pid}/ns/net");
    let ns = File::open(&ns_path).map_err(|e| io_err(&format!("opening {ns_path}"), e))?;
    nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| io_err(&format!("entering {ns_path}"), std::io::Error::from(e)))?;

    send_garps_here(step, pid, iface, ip, mac, count, first_sent).map(drop)
}

/// Announces `ip` at `mac` on `iface` of the calling thread's network namespace (that of `pid`,
/// which errors name), `count` times [`GARP_INTERVAL`] apart (blocking). Returns the packet
/// socket it sent on: closing one waits for an RCU grace period (`packet_release` calls
/// `synchronize_net`), 10–25 ms on a busy 2-core host, which a caller inside a pause keeps
/// out of it by closing the socket later.
fn send_garps_here(
    step: &str,
    pid: u32,
    iface: &str,
    ip: Ipv4Addr,
    mac: [u8; 6],
    count: u32,
    mut first_sent: impl FnMut(),
) -> Result<Socket, NetError> {
    let io_err = |what: &str, cause: std::io::Error| NetError::Io {
        step: format!("{step}: {what}"),
        cause,
    };
    let ifindex = match nix::net::if_::if_nametoindex(iface) {
        Ok(index) => index,
        Err(nix::errno::Errno::ENODEV) => {
            return Err(NetError::NoSuchInterface {
                step: step.to_string(),
                pid,
                iface: iface.to_string(),
            })
        }
        Err(e) => return Err(io_err(&format!("looking up {iface}"), e.into())),
    };

    // Protocol 0: the socket only sends (the frame carries its EtherType), so no receive hook
    // is registered, and binding it does not first take one down, which waits for an RCU
    // grace period.
    let socket = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(0)))
        .map_err(|e| io_err("opening a packet socket", e))?;
    socket
        .bind(&link_addr(ifindex)?)
        .map_err(|e| io_err(&format!("binding to {iface}"), e))?;

    let frame = build_garp_frame(ip, mac);
    for n in 0..count {
        if n > 0 {
            std::thread::sleep(GARP_INTERVAL);
        }
        let sent = socket
            .send(&frame)
            .map_err(|e| io_err(&format!("sending announcement {}", n + 1), e))?;
        if sent != frame.len() {
            return Err(io_err(
                "sending",
                std::io::Error::other(format!("sent {sent} of {} bytes", frame.len())),
            ));
        }
        if n == 0 {
            first_sent();
        }
    }
    Ok(socket)
}

/// One announcement of every IPv4 address of every interface but loopback in the calling
/// thread's network namespace, at its interface's MAC; returns `(interface, address)` for each
/// one sent.
///
/// This is for a thread that has already entered a restored container's namespace at the
/// moment its tasks are about to resume (CRIU's pre-resume action, its sockets restored and
/// out of repair mode): the L2 segment then sends the clients' traffic to the target as the
/// tasks run, instead of after the rest of `docker start` (CRIU's exit, runc's and
/// containerd's answers, 30–80 ms here).
pub fn announce_all_here() -> Result<Announced, NetError> {
    let step = "announcing the namespace's addresses";
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| NetError::Io {
        step: format!("{step}: listing addresses"),
        cause: e.into(),
    })?;
    let mut macs: std::collections::BTreeMap<String, [u8; 6]> = Default::default();
    let mut ips: Vec<(String, Ipv4Addr)> = Vec::new();
    for a in addrs {
        if a.flags
            .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
        {
            continue;
        }
        let Some(addr) = a.address else { continue };
        if let Some(ll) = addr.as_link_addr() {
            if let Some(mac) = ll.addr() {
                macs.insert(a.interface_name.clone(), mac);
            }
        } else if let Some(sin) = addr.as_sockaddr_in() {
            ips.push((a.interface_name.clone(), sin.ip()));
        }
    }
    let mut announced = Announced::default();
    for (iface, ip) in ips {
        let Some(mac) = macs.get(&iface).copied().filter(|m| *m != [0; 6]) else {
            continue;
        };
        check_iface(&iface)?;
        let socket = send_garps_here(step, std::process::id(), &iface, ip, mac, 1, || {})?;
        announced.sockets.push(socket);
        announced.sent.push((iface, ip));
    }
    Ok(announced)
}

/// What [`announce_all_here`] sent, and the packet sockets it sent on. Dropping this closes
/// them, which waits for an RCU grace period per socket: inside a pause, keep it until the
/// tasks run (the announcement at a restore's resume cost 24–28 ms of CRIU's 60–70 ms restore
/// when it closed its socket at once).
#[derive(Debug, Default)]
pub struct Announced {
    /// `(interface, address)` of each announcement.
    pub sent: Vec<(String, Ipv4Addr)>,
    sockets: Vec<Socket>,
}

fn link_addr(ifindex: u32) -> Result<SockAddr, NetError> {
    let index = i32::try_from(ifindex).map_err(|_| NetError::Io {
        step: "building a link-layer address".into(),
        cause: std::io::Error::other(format!("interface index {ifindex} out of range")),
    })?;
    // SAFETY: sockaddr_storage is plain data for which all-zero is valid, and it is large and
    // aligned enough to hold a sockaddr_ll, whose length is passed along.
    unsafe {
        let mut storage: libc::sockaddr_storage = mem::zeroed();
        let ll = &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_ll>();
        ll.sll_family = libc::AF_PACKET as libc::sa_family_t;
        // No protocol: bound for sending only, with no receive hook (see `send_garps_here`).
        ll.sll_protocol = 0;
        ll.sll_ifindex = index;
        Ok(SockAddr::new(
            storage,
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_frame_bytes() {
        let frame = build_garp_frame(
            Ipv4Addr::new(198, 18, 0, 1),
            [0x02, 0x42, 0xc6, 0x12, 0x00, 0x01],
        );
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // destination: broadcast
            0x02, 0x42, 0xc6, 0x12, 0x00, 0x01, // source MAC
            0x08, 0x06,                         // EtherType ARP
            0x00, 0x01,                         // hardware type Ethernet
            0x08, 0x00,                         // protocol IPv4
            6, 4,                               // address lengths
            0x00, 0x01,                         // request
            0x02, 0x42, 0xc6, 0x12, 0x00, 0x01, // sender MAC
            198, 18, 0, 1,                      // sender IP
            0, 0, 0, 0, 0, 0,                   // target MAC: unknown
            198, 18, 0, 1,                      // target IP = sender IP
        ];
        assert_eq!(frame, want);
    }

    #[test]
    fn garp_frame_table() {
        for (ip, mac) in [
            (Ipv4Addr::new(0, 0, 0, 0), [0u8; 6]),
            (Ipv4Addr::new(255, 255, 255, 255), [0xff; 6]),
            (Ipv4Addr::new(198, 19, 255, 254), [1, 2, 3, 4, 5, 6]),
        ] {
            let f = build_garp_frame(ip, mac);
            assert_eq!(f[..6], [0xff; 6]);
            assert_eq!(f[6..12], mac);
            assert_eq!(f[12..22], [0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
            assert_eq!(f[22..28], mac);
            assert_eq!(f[28..32], ip.octets());
            assert_eq!(f[32..38], [0; 6]);
            assert_eq!(f[38..42], ip.octets());
        }
    }

    #[test]
    fn interface_names() {
        for ok in ["eth0", "veth-a", "a", "123456789012345"] {
            assert!(check_iface(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1234567890123456", "a/b", "a b", "-x", "eth0:1", "a\n"] {
            assert!(check_iface(bad).is_err(), "{bad:?}");
        }
    }
}
