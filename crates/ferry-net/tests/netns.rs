//! Root-only tests against real network namespaces that the tests create and delete.
//!
//! Each test builds its own pair `ferrytest-net-<pid>-<tag>-{a,b}` joined by a veth
//! (198.18.0.1 in `a`, 198.18.0.2 in `b`) and runs `sleep` in `a`; the pid of that `sleep`
//! addresses namespace `a` exactly as a container's pid would. Traffic never leaves the pair.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_net::{
    announce_all_here, build_garp_frame, gratuitous_arp, interfaces, is_locked, lock,
    remove_criu_lock, set_arp, unlock, Iface, NetError,
};

const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const A_MAC: [u8; 6] = [0x02, 0x00, 0xc6, 0x12, 0x00, 0x01];
const A_MAC_STR: &str = "02:00:c6:12:00:01";

/// Owns the namespaces and the `sleep`; dropping it (also on a failed assertion) removes them.
struct TestNet {
    a: String,
    b: String,
    sleeper: Option<Child>,
}

impl TestNet {
    /// `None` (and the test is skipped) when not root: namespaces need CAP_SYS_ADMIN.
    fn new(tag: &str) -> Option<TestNet> {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping: network namespace tests need root");
            return None;
        }
        let base = format!("ferrytest-net-{}-{tag}", std::process::id());
        let mut net = TestNet {
            a: format!("{base}-a"),
            b: format!("{base}-b"),
            sleeper: None,
        };
        for ns in [&net.a, &net.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            sh(&["ip", "netns", "add", ns]);
        }
        let (a, b) = (net.a.clone(), net.b.clone());
        sh(&[
            "ip", "-n", &a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &b,
        ]);
        sh(&["ip", "-n", &a, "link", "set", "va", "address", A_MAC_STR]);
        sh(&["ip", "-n", &a, "addr", "add", "198.18.0.1/24", "dev", "va"]);
        sh(&["ip", "-n", &b, "addr", "add", "198.18.0.2/24", "dev", "vb"]);
        for (ns, dev) in [(&a, "va"), (&b, "vb")] {
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }

        let child = Command::new("ip")
            .args(["netns", "exec", &a, "sleep", "600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        net.sleeper = Some(child);
        // `ip netns exec` enters the namespace before exec'ing sleep; wait until it has.
        let want = std::fs::metadata(format!("/run/netns/{a}")).unwrap().ino();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| m.ino())
            .ok()
            != Some(want)
        {
            assert!(Instant::now() < deadline, "sleep never entered {a}");
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(net)
    }

    fn pid(&self) -> u32 {
        self.sleeper.as_ref().unwrap().id()
    }

    fn listen_in_a(&self) -> TcpListener {
        in_ns(&self.a, || TcpListener::bind((A_IP, 0)).unwrap())
    }

    /// A TCP handshake from `b` to `a`: needs ARP and IP in both directions.
    fn connect_from_b(&self, port: u16, timeout: Duration) -> std::io::Result<()> {
        let addr = SocketAddr::from((A_IP, port));
        in_ns(&self.b, move || {
            TcpStream::connect_timeout(&addr, timeout).map(drop)
        })
    }

    fn neigh_in_b(&self) -> serde_json::Value {
        let out = sh(&[
            "ip",
            "-n",
            &self.b,
            "-j",
            "neigh",
            "show",
            "198.18.0.1",
            "dev",
            "vb",
        ]);
        let entries: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        entries
            .into_iter()
            .next()
            .unwrap_or(serde_json::Value::Null)
    }

    fn save_in_a(&self, tool: &str) -> String {
        sh(&["ip", "netns", "exec", &self.a, tool])
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if let Some(mut child) = self.sleeper.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn sh(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sh_stdin(argv: &[&str], input: &str) {
    use std::io::Write;
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{argv:?}");
}

/// Runs `f` on a fresh thread inside namespace `ns`; sockets it creates stay in `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// Captures, in namespace `ns`, up to `n` ARP frames sent from `mac` (at most 5 s); returns
/// once the capture socket is open.
fn capture_arp(ns: &str, mac: [u8; 6], n: usize) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ns = ns.to_string();
    let capture = std::thread::spawn(move || {
        in_ns(&ns, move || {
            let proto = socket2::Protocol::from(i32::from(0x0806u16.to_be()));
            let sock =
                socket2::Socket::new(socket2::Domain::PACKET, socket2::Type::RAW, Some(proto))
                    .unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut frames = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(5);
            while frames.len() < n && Instant::now() < deadline {
                let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1600];
                if let Ok(len) = sock.recv(&mut buf) {
                    let frame: Vec<u8> = buf[..len]
                        .iter()
                        .map(|b| unsafe { b.assume_init() })
                        .collect();
                    if frame.get(6..12) == Some(&mac[..]) {
                        frames.push(frame);
                    }
                }
            }
            frames
        })
    });
    ready_rx.recv().unwrap();
    capture
}

fn thread_netns() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
}

#[tokio::test]
async fn interfaces_of_the_namespace() {
    let Some(net) = TestNet::new("ifaces") else {
        return;
    };
    let ifaces = interfaces(net.pid()).await.unwrap();
    assert_eq!(
        ifaces,
        vec![Iface {
            name: "va".into(),
            mac: Some(A_MAC),
            ipv4: vec![A_IP]
        }]
    );
}

#[tokio::test]
async fn lock_silences_and_unlock_restores() {
    let Some(net) = TestNet::new("lock") else {
        return;
    };
    let pid = net.pid();
    let listener = net.listen_in_a();
    let port = listener.local_addr().unwrap().port();
    sh(&[
        "ip", "netns", "exec", &net.a, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "9",
        "-j", "ACCEPT",
    ]);

    net.connect_from_b(port, Duration::from_secs(3)).unwrap();
    assert!(!is_locked(pid).await.unwrap());

    lock(pid).await.unwrap();
    lock(pid).await.unwrap();
    assert!(is_locked(pid).await.unwrap());
    let v4 = net.save_in_a("iptables-save");
    assert_eq!(v4.matches("-j FERRY-LOCK").count(), 3, "{v4}");
    assert!(
        v4.contains("-A INPUT -j FERRY-LOCK\n-A INPUT -p tcp"),
        "jump must come first:\n{v4}"
    );
    assert!(net
        .save_in_a("ip6tables-save")
        .contains("-A OUTPUT -j FERRY-LOCK"));

    let err = net
        .connect_from_b(port, Duration::from_secs(1))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");

    unlock(pid).await.unwrap();
    unlock(pid).await.unwrap();
    assert!(!is_locked(pid).await.unwrap());
    let v4 = net.save_in_a("iptables-save");
    assert!(!v4.contains("FERRY-LOCK"), "{v4}");
    assert!(
        v4.contains("-A INPUT -p tcp -m tcp --dport 9 -j ACCEPT"),
        "unrelated rule lost:\n{v4}"
    );
    assert!(!net.save_in_a("ip6tables-save").contains("FERRY-LOCK"));
    net.connect_from_b(port, Duration::from_secs(3)).unwrap();
}

#[tokio::test]
async fn leftover_criu_lock_is_removed() {
    let Some(net) = TestNet::new("criu") else {
        return;
    };
    let pid = net.pid();
    let listener = net.listen_in_a();
    let port = listener.local_addr().unwrap().port();
    assert!(!remove_criu_lock(pid).await.unwrap());

    // Exactly what CRIU 4.x's iptables network lock installs.
    let criu = "*filter\n:CRIU - [0:0]\n-I INPUT -j CRIU\n-I OUTPUT -j CRIU\n\
                -A CRIU -m mark --mark 0xC114 -j ACCEPT\n-A CRIU -j DROP\nCOMMIT\n";
    for tool in ["iptables-restore", "ip6tables-restore"] {
        sh_stdin(
            &["ip", "netns", "exec", &net.a, tool, "-w", "--noflush"],
            criu,
        );
    }
    net.connect_from_b(port, Duration::from_secs(1))
        .unwrap_err();

    assert!(remove_criu_lock(pid).await.unwrap());
    assert!(!remove_criu_lock(pid).await.unwrap());
    assert!(!net.save_in_a("iptables-save").contains("CRIU"));
    assert!(!net.save_in_a("ip6tables-save").contains("CRIU"));
    net.connect_from_b(port, Duration::from_secs(3)).unwrap();
}

#[tokio::test]
async fn arp_off_stops_replies() {
    let Some(net) = TestNet::new("arp") else {
        return;
    };
    let pid = net.pid();
    let listener = net.listen_in_a();
    let port = listener.local_addr().unwrap().port();
    net.connect_from_b(port, Duration::from_secs(3)).unwrap();
    assert_eq!(net.neigh_in_b()["lladdr"], A_MAC_STR);

    set_arp(pid, "va", false).await.unwrap();
    sh(&["ip", "-n", &net.b, "neigh", "flush", "dev", "vb"]);
    net.connect_from_b(port, Duration::from_secs(2))
        .unwrap_err();
    let neigh = net.neigh_in_b();
    assert!(
        neigh.get("lladdr").is_none(),
        "a is still resolvable: {neigh}"
    );

    set_arp(pid, "va", true).await.unwrap();
    net.connect_from_b(port, Duration::from_secs(5)).unwrap();
    assert_eq!(net.neigh_in_b()["lladdr"], A_MAC_STR);
}

#[tokio::test]
async fn gratuitous_arp_reaches_and_updates_the_peer() {
    let Some(net) = TestNet::new("garp") else {
        return;
    };
    let pid = net.pid();
    let listener = net.listen_in_a();
    net.connect_from_b(
        listener.local_addr().unwrap().port(),
        Duration::from_secs(3),
    )
    .unwrap();
    assert_eq!(net.neigh_in_b()["lladdr"], A_MAC_STR);

    let new_mac = [0x02, 0x00, 0xc6, 0x12, 0xbe, 0xef];
    let capture = capture_arp(&net.b, new_mac, 3);

    let before = thread_netns();
    gratuitous_arp(pid, "va", A_IP, new_mac, 3).await.unwrap();
    assert_eq!(
        thread_netns(),
        before,
        "the caller's thread must stay in its namespace"
    );

    let frames = capture.join().unwrap();
    assert_eq!(frames.len(), 3, "expected three announcements");
    let want = build_garp_frame(A_IP, new_mac);
    for frame in frames {
        assert_eq!(frame[..42], want[..]);
    }
    assert_eq!(net.neigh_in_b()["lladdr"], "02:00:c6:12:be:ef");
}

/// What a restored container's namespace announces as its tasks resume: each IPv4 address at
/// its own interface's MAC, seen in the peer namespace; loopback never.
#[test]
fn every_address_of_the_namespace_is_announced_from_inside_it() {
    let Some(net) = TestNet::new("resume") else {
        return;
    };
    let capture = capture_arp(&net.b, A_MAC, 1);
    let (announced, open) = in_ns(&net.a, || (announce_all_here().unwrap(), packet_sockets()));
    assert_eq!(announced.sent, vec![("va".to_string(), A_IP)]);
    let frames = capture.join().unwrap();
    assert_eq!(frames.len(), 1, "no announcement reached b");
    assert_eq!(frames[0][..42], build_garp_frame(A_IP, A_MAC)[..]);
    // Inside a restore's pause the socket must not be closed yet (that waits for an RCU grace
    // period), and it never had a receive hook to take down (nor queues what it would get).
    assert_eq!(
        open,
        vec![(0, false)],
        "a's packet sockets (protocol, hooked)"
    );
    let after = in_ns(&net.a, move || {
        drop(announced);
        packet_sockets()
    });
    assert_eq!(after, vec![], "closed once dropped");
}

/// The calling thread's namespace's packet sockets, as `(protocol, receive hook registered)`
/// from `/proc/thread-self/net/packet`.
fn packet_sockets() -> Vec<(u16, bool)> {
    let table = std::fs::read_to_string("/proc/thread-self/net/packet").unwrap();
    let mut head = table.lines().next().unwrap().split_whitespace();
    let col = |name: &str, head: &mut std::str::SplitWhitespace| head.position(|c| c == name);
    let proto = col("Proto", &mut head.clone()).unwrap();
    let running = col("R", &mut head).unwrap();
    table
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                u16::from_str_radix(f[proto], 16).unwrap(),
                f[running] != "0",
            )
        })
        .collect()
}

#[tokio::test]
async fn errors_say_what_and_why() {
    let Some(net) = TestNet::new("err") else {
        return;
    };
    let pid = net.pid();

    let err = interfaces(999_999_999).await.unwrap_err();
    assert!(matches!(err, NetError::Tool { .. }), "{err}");
    assert!(err.to_string().contains("/proc/999999999/ns/net"), "{err}");

    let err = set_arp(pid, "nope0", false).await.unwrap_err();
    assert!(
        err.to_string()
            .ends_with("stderr: Cannot find device \"nope0\""),
        "{err}"
    );

    let err = gratuitous_arp(pid, "nope0", A_IP, A_MAC, 1)
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::NoSuchInterface { .. }), "{err}");

    let err = lock(999_999_999).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("locking the network of pid 999999999"),
        "{err}"
    );
}
