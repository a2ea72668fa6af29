//! Opening an iptables-nft filter table over netlink, in-process.
//!
//! Opening a silenced network namespace happens at CRIU's pre-resume step, inside the pause.
//! `iptables-restore` (the nft flavour) takes 12–25 ms a run here, most of it loading its
//! extensions and fetching the kernel's rule cache. Deleting the table instead is quick to ask
//! for but costs the caller an RCU grace period per family (8–13 ms measured: closing the
//! socket waits until the base chains have left their hooks). Setting the base chains'
//! policies to accept and flushing their rules keeps the hooks, so nothing waits: one batch per
//! family, well under a millisecond, leaving the table as `iptables-restore` of an empty,
//! accepting `*filter` would. The quiet rules are written once, outside the pause, by
//! `iptables-restore`. Listing and deleting tables is here for the `inet CRIU-<id>` table of
//! CRIU's nftables network lock, which a CRIU killed while it held the lock leaves behind.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELRULE: u16 = 8;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NF_ACCEPT: u32 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;

/// Address families of nftables tables (`NFPROTO_*`).
pub const NFPROTO_INET: u8 = 1;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;

/// The base chains `iptables-restore` makes in a `*filter` table.
pub const FILTER_CHAINS: [&str; 3] = ["INPUT", "FORWARD", "OUTPUT"];

/// What opening found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Yes,
    /// No such table or chain (ENOENT): nothing to open, or the rules live in another backend
    /// (iptables-legacy). The kernel applied none of the batch.
    NotThere,
}

fn push_msg(
    buf: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let len = (NLMSG_HDRLEN + 4 + attrs.len()) as u32;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0);
    buf.extend_from_slice(&res_id.to_be_bytes());
    buf.extend_from_slice(attrs);
}

fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut a = Vec::with_capacity(len.next_multiple_of(4));
    a.extend_from_slice(&(len as u16).to_ne_bytes());
    a.extend_from_slice(&ty.to_ne_bytes());
    a.extend_from_slice(payload);
    a.resize(len.next_multiple_of(4), 0);
    a
}

fn string_attr(ty: u16, value: &str) -> Vec<u8> {
    let mut v = value.as_bytes().to_vec();
    v.push(0);
    attr(ty, &v)
}

/// One nftables transaction: `msgs` (type, family, attributes), each acknowledged, between a
/// batch begin and end whose sequence numbers run from `first_seq` on; returns the batch and
/// the sequence numbers of the acknowledged messages.
fn batch(
    first_seq: u32,
    msgs: impl IntoIterator<Item = (u16, u8, Vec<u8>)>,
) -> (Vec<u8>, Vec<u32>) {
    let mut buf = Vec::new();
    let mut seq = first_seq;
    let mut acked = Vec::new();
    push_msg(
        &mut buf,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    for (msg, family, attrs) in msgs {
        seq += 1;
        push_msg(
            &mut buf,
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            family,
            0,
            &attrs,
        );
        acked.push(seq);
    }
    seq += 1;
    push_msg(
        &mut buf,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    (buf, acked)
}

/// The batch that opens `table` of `family`: every chain's rules flushed and its policy set
/// to accept. Its messages carry sequence numbers from `first_seq` on; returns the batch and
/// the sequence numbers of the messages that ask for an acknowledgement.
pub fn open_table_batch(
    family: u8,
    table: &str,
    chains: &[&str],
    first_seq: u32,
) -> (Vec<u8>, Vec<u32>) {
    let msgs = chains.iter().flat_map(|chain| {
        let flush = [
            string_attr(NFTA_RULE_TABLE, table),
            string_attr(NFTA_RULE_CHAIN, chain),
        ]
        .concat();
        let policy = [
            string_attr(NFTA_CHAIN_TABLE, table),
            string_attr(NFTA_CHAIN_NAME, chain),
            attr(NFTA_CHAIN_POLICY, &NF_ACCEPT.to_be_bytes()),
        ]
        .concat();
        [
            (NFT_MSG_DELRULE, family, flush),
            (NFT_MSG_NEWCHAIN, family, policy),
        ]
    });
    batch(first_seq, msgs)
}

/// The request for every table of `family` (a netlink dump).
pub fn list_tables_request(family: u8, seq: u32) -> Vec<u8> {
    let mut buf = Vec::new();
    push_msg(
        &mut buf,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
        0,
        &[],
    );
    buf
}

/// The table names in one buffer of a table dump, and whether the dump ended in it.
pub fn table_names(buf: &[u8]) -> (Vec<String>, bool) {
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
    };
    let (mut names, mut done) = (Vec::new(), false);
    let mut off = 0;
    while let (Some(len), Some(ty)) = (u32_at(off), u16_at(off + 4)) {
        let len = len as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        if ty == NLMSG_DONE || ty == NLMSG_ERROR {
            done = true;
        } else if ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE {
            let mut a = off + NLMSG_HDRLEN + 4;
            while let (Some(alen), Some(aty)) = (u16_at(a), u16_at(a + 2)) {
                let alen = alen as usize;
                if alen < 4 || a + alen > off + len {
                    break;
                }
                if aty & 0x3fff == NFTA_TABLE_NAME {
                    let raw = &buf[a + 4..a + alen];
                    let raw = raw.split(|b| *b == 0).next().unwrap_or(raw);
                    names.push(String::from_utf8_lossy(raw).into_owned());
                }
                a += alen.next_multiple_of(4);
            }
        }
        off += len.next_multiple_of(4);
    }
    (names, done)
}

/// The batch that deletes the tables `names` of `family`, each message acknowledged.
pub fn delete_tables_batch(family: u8, names: &[String], first_seq: u32) -> (Vec<u8>, Vec<u32>) {
    batch(
        first_seq,
        names
            .iter()
            .map(|n| (NFT_MSG_DELTABLE, family, string_attr(NFTA_TABLE_NAME, n))),
    )
}

/// Prefix of the `inet` table CRIU's nftables network lock makes (`CRIU-<run id>`).
pub const CRIU_LOCK_TABLE_PREFIX: &str = "CRIU-";

/// The nftables network locks CRIU left in the network namespace of `pid`.
pub fn criu_lock_tables(pid: u32) -> Result<Vec<String>, String> {
    in_netns_of(pid, criu_tables_here)
}

fn criu_tables_here(nl: &NetfilterSocket) -> Result<Vec<String>, String> {
    Ok(nl
        .tables(NFPROTO_INET)
        .map_err(|e| format!("listing nftables tables: {e}"))?
        .into_iter()
        .filter(|t| t.starts_with(CRIU_LOCK_TABLE_PREFIX))
        .collect())
}

/// Removes the nftables network locks CRIU left in the network namespace of `pid` (a CRIU
/// killed while it held one, before it could unlock); returns their names.
pub fn remove_criu_lock_tables(pid: u32) -> Result<Vec<String>, String> {
    in_netns_of(pid, |nl| {
        let names = criu_tables_here(nl)?;
        if !names.is_empty() {
            nl.delete_tables(NFPROTO_INET, &names)
                .map_err(|e| format!("deleting {}: {e}", names.join(", ")))?;
        }
        Ok(names)
    })
}

fn in_netns_of<T: Send + 'static>(
    pid: u32,
    f: impl FnOnce(&NetfilterSocket) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|e| format!("opening the network namespace of {pid}: {e}"))?;
    std::thread::spawn(move || -> Result<T, String> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering the network namespace of {pid}: {e}"))?;
        let nl = NetfilterSocket::new(Duration::from_secs(2))
            .map_err(|e| format!("netfilter netlink socket: {e}"))?;
        f(&nl)
    })
    .join()
    .map_err(|_| "the namespace thread panicked".to_string())?
}

/// Every kernel answer in a netlink reply: (sequence number, errno), errno 0 for success.
pub fn answers(buf: &[u8]) -> Vec<(u32, i32)> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
    };
    let mut out = Vec::new();
    let mut off = 0;
    while let (Some(len), Some(ty), Some(seq)) = (
        u32_at(off),
        buf.get(off + 4..off + 6)
            .map(|b| u16::from_ne_bytes([b[0], b[1]])),
        u32_at(off + 8),
    ) {
        let len = len as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        if ty == NLMSG_ERROR {
            if let Some(e) = u32_at(off + 16) {
                out.push((seq, (e as i32).wrapping_neg()));
            }
        }
        off += len.next_multiple_of(4);
    }
    out
}

/// A `NETLINK_NETFILTER` socket of the network namespace of the thread that made it.
///
/// Closing one right after a commit waits for the kernel's deferred clean-up of that commit
/// (an RCU grace period, 8–13 ms here): whoever opens a namespace inside the pause keeps the
/// socket and closes it afterwards.
pub struct NetfilterSocket {
    fd: OwnedFd,
}

impl NetfilterSocket {
    /// Each answer is awaited at most `timeout`.
    pub fn new(timeout: Duration) -> io::Result<Self> {
        use nix::sys::socket::{
            setsockopt, socket, sockopt, AddressFamily, SockFlag, SockProtocol, SockType,
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )?;
        let tv = nix::sys::time::TimeVal::new(
            timeout.as_secs() as libc::time_t,
            timeout.subsec_micros() as libc::suseconds_t,
        );
        setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
        Ok(NetfilterSocket { fd })
    }

    fn recv_into(&self, buf: &mut [u8]) -> io::Result<usize> {
        use nix::sys::socket::{recv, MsgFlags};
        loop {
            match recv(self.fd.as_raw_fd(), buf, MsgFlags::empty()) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        use nix::sys::socket::{sendto, MsgFlags, NetlinkAddr};
        sendto(
            self.fd.as_raw_fd(),
            msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map(|_| ())
        .map_err(io::Error::from)
    }

    /// The names of every table of `family`.
    pub fn tables(&self, family: u8) -> io::Result<Vec<String>> {
        self.send(&list_tables_request(family, 1))?;
        let mut buf = vec![0u8; 65536];
        let mut all = Vec::new();
        loop {
            let n = self.recv_into(&mut buf)?;
            if let Some((_, errno)) = answers(&buf[..n]).into_iter().find(|(_, e)| *e != 0) {
                return Err(io::Error::from_raw_os_error(errno));
            }
            let (names, done) = table_names(&buf[..n]);
            all.extend(names);
            if done || n == 0 {
                return Ok(all);
            }
        }
    }

    /// Deletes the tables `names` of `family` in one transaction.
    pub fn delete_tables(&self, family: u8, names: &[String]) -> io::Result<()> {
        let (msg, mut waiting) = delete_tables_batch(family, names, 1);
        self.send(&msg)?;
        let mut buf = vec![0u8; 16384];
        while !waiting.is_empty() {
            let n = self.recv_into(&mut buf)?;
            for (seq, errno) in answers(&buf[..n]) {
                match errno {
                    0 => waiting.retain(|s| *s != seq),
                    e => return Err(io::Error::from_raw_os_error(e)),
                }
            }
        }
        Ok(())
    }

    /// Opens the iptables `*filter` table of `family`.
    pub fn open_filter_table(&self, family: u8) -> io::Result<Opened> {
        use nix::sys::socket::{recv, sendto, MsgFlags, NetlinkAddr};
        let (msg, mut waiting) = open_table_batch(family, "filter", &FILTER_CHAINS, 1);
        sendto(
            self.fd.as_raw_fd(),
            &msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        let mut buf = vec![0u8; 16384];
        while !waiting.is_empty() {
            let n = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for (seq, errno) in answers(&buf[..n]) {
                match errno {
                    0 => waiting.retain(|s| *s != seq),
                    // A failed message aborts the whole batch, and the rest answer alike.
                    libc::ENOENT => return Ok(Opened::NotThere),
                    e => return Err(io::Error::from_raw_os_error(e)),
                }
            }
        }
        Ok(Opened::Yes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_ne_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    #[test]
    fn the_batch_flushes_and_opens_every_chain_between_begin_and_end() {
        let (b, acked) = open_table_batch(NFPROTO_IPV6, "filter", &["INPUT"], 7);
        assert_eq!(acked, vec![8, 9]);
        // begin
        assert_eq!((u32_at(&b, 0), u16_at(&b, 4), u32_at(&b, 8)), (20, 0x10, 7));
        assert_eq!(&b[18..20], &NFNL_SUBSYS_NFTABLES.to_be_bytes());
        // flush: table "filter\0" (4 + 7 → 12) and chain "INPUT\0" (4 + 6 → 12)
        let flush = 20;
        assert_eq!((u32_at(&b, flush), u16_at(&b, flush + 4)), (44, 0x0a08));
        assert_eq!(u16_at(&b, flush + 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!((u32_at(&b, flush + 8), b[flush + 16]), (8, NFPROTO_IPV6));
        assert_eq!((u16_at(&b, flush + 20), u16_at(&b, flush + 22)), (11, 1));
        assert_eq!(&b[flush + 24..flush + 32], b"filter\0\0");
        assert_eq!((u16_at(&b, flush + 32), u16_at(&b, flush + 34)), (10, 2));
        assert_eq!(&b[flush + 36..flush + 44], b"INPUT\0\0\0");
        // policy: table, chain and NFTA_CHAIN_POLICY = NF_ACCEPT in network order
        let pol = flush + 44;
        assert_eq!((u32_at(&b, pol), u16_at(&b, pol + 4)), (52, 0x0a03));
        assert_eq!(u32_at(&b, pol + 8), 9);
        assert_eq!((u16_at(&b, pol + 44), u16_at(&b, pol + 46)), (8, 5));
        assert_eq!(&b[pol + 48..pol + 52], &[0, 0, 0, 1]);
        // end
        let end = pol + 52;
        assert_eq!(
            (u32_at(&b, end), u16_at(&b, end + 4), u32_at(&b, end + 8)),
            (20, 0x11, 10)
        );
        assert_eq!(b.len(), end + 20);
        let (all, acked) = open_table_batch(NFPROTO_IPV4, "filter", &FILTER_CHAINS, 1);
        assert_eq!(acked, vec![2, 3, 4, 5, 6, 7]);
        assert_eq!(all.len(), 20 + 3 * (44 + 52) + 20);
    }

    fn error_msg(seq: u32, errno: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&(-errno).to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]);
        m
    }

    #[test]
    fn answers_carry_their_sequence_number_and_errno() {
        let mut two = error_msg(5, libc::EPERM);
        two.extend(error_msg(2, 0));
        type Case<'a> = (&'a [u8], Vec<(u32, i32)>);
        let table: [Case; 4] = [
            (&error_msg(2, libc::ENOENT), vec![(2, libc::ENOENT)]),
            (&two, vec![(5, libc::EPERM), (2, 0)]),
            (&two[..50], vec![(5, libc::EPERM)]),
            (&[], vec![]),
        ];
        for (buf, want) in table {
            assert_eq!(answers(buf), want);
        }
    }

    fn table_msg(name: &str) -> Vec<u8> {
        let mut m = Vec::new();
        push_msg(
            &mut m,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE,
            0x2,
            1,
            NFPROTO_INET,
            0,
            &[
                string_attr(NFTA_TABLE_NAME, name),
                attr(2, &0u32.to_be_bytes()),
            ]
            .concat(),
        );
        m
    }

    #[test]
    fn a_table_dump_yields_every_name_and_says_when_it_ended() {
        let mut done = Vec::new();
        push_msg(&mut done, NLMSG_DONE, 0x2, 1, 0, 0, &[]);
        let two = [table_msg("CRIU-1f2e"), table_msg("filter")].concat();
        let table: [(Vec<u8>, Vec<&str>, bool); 4] = [
            (two.clone(), vec!["CRIU-1f2e", "filter"], false),
            (
                [two.clone(), done.clone()].concat(),
                vec!["CRIU-1f2e", "filter"],
                true,
            ),
            (done.clone(), vec![], true),
            (two[..two.len() - 3].to_vec(), vec!["CRIU-1f2e"], false),
        ];
        for (buf, want, ended) in table {
            let (names, d) = table_names(&buf);
            assert_eq!(
                (names.iter().map(String::as_str).collect::<Vec<_>>(), d),
                (want, ended)
            );
        }
    }

    #[test]
    fn the_delete_batch_names_each_table_between_begin_and_end() {
        let (b, acked) = delete_tables_batch(NFPROTO_INET, &["CRIU-ab".to_string()], 4);
        assert_eq!(acked, vec![5]);
        assert_eq!((u16_at(&b, 4), u32_at(&b, 8)), (0x10, 4));
        let del = 20;
        // "CRIU-ab\0" is 8 bytes: a 12-byte attribute
        assert_eq!((u32_at(&b, del), u16_at(&b, del + 4)), (32, 0x0a02));
        assert_eq!((u32_at(&b, del + 8), b[del + 16]), (5, NFPROTO_INET));
        assert_eq!(&b[del + 24..del + 32], b"CRIU-ab\0");
        assert_eq!(
            (
                u32_at(&b, del + 32),
                u16_at(&b, del + 36),
                u32_at(&b, del + 40)
            ),
            (20, 0x11, 6)
        );
        assert_eq!(b.len(), del + 32 + 20);
    }

    #[test]
    fn a_lock_table_left_in_a_namespace_is_found_and_removed() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "not root: a_lock_table_left_in_a_namespace_is_found_and_removed checks nothing"
            );
            return;
        }
        let r = std::thread::spawn(|| -> io::Result<(Vec<String>, Vec<String>)> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let nl = NetfilterSocket::new(Duration::from_secs(2))?;
            let mut batch = Vec::new();
            push_msg(
                &mut batch,
                NFNL_MSG_BATCH_BEGIN,
                NLM_F_REQUEST,
                1,
                0,
                NFNL_SUBSYS_NFTABLES,
                &[],
            );
            push_msg(
                &mut batch,
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE,
                NLM_F_REQUEST | NLM_F_ACK | 0x400,
                2,
                NFPROTO_INET,
                0,
                &string_attr(NFTA_TABLE_NAME, "CRIU-test"),
            );
            push_msg(
                &mut batch,
                NFNL_MSG_BATCH_END,
                NLM_F_REQUEST,
                3,
                0,
                NFNL_SUBSYS_NFTABLES,
                &[],
            );
            nl.send(&batch)?;
            let mut buf = vec![0u8; 4096];
            let n = nl.recv_into(&mut buf)?;
            assert_eq!(answers(&buf[..n]), vec![(2, 0)], "creating the table");
            let before = nl.tables(NFPROTO_INET)?;
            nl.delete_tables(NFPROTO_INET, &before)?;
            Ok((before, nl.tables(NFPROTO_INET)?))
        })
        .join()
        .expect("thread");
        let (before, after) = r.expect("netlink");
        assert_eq!(before, vec!["CRIU-test".to_string()]);
        assert!(after.is_empty(), "{after:?}");
    }

    #[test]
    fn a_namespace_without_the_table_is_reported_as_such() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: a_namespace_without_the_table_is_reported_as_such checks nothing");
            return;
        }
        let r = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            NetfilterSocket::new(Duration::from_secs(2))?.open_filter_table(NFPROTO_IPV4)
        })
        .join()
        .expect("thread");
        assert_eq!(r.expect("netlink"), Opened::NotThere);
    }
}
