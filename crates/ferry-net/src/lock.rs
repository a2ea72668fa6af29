//! Firewall locks inside a container's network namespace.
//!
//! State is read with `iptables-save` (the machine format `iptables-restore` consumes, not the
//! human listing) and changed with one `iptables-restore --noflush` transaction per address
//! family, so a lock is never half applied within a family. IPv6 is locked too whenever the
//! kernel has it: a frozen source must stay silent on every protocol.

use std::path::Path;

use crate::{tool, NetError};

/// Our chain; distinct from CRIU's `CRIU` so rollback can tell whose lock is whose.
pub const LOCK_CHAIN: &str = "FERRY-LOCK";
/// The chain CRIU's iptables network lock leaves behind when CRIU dies mid-dump.
pub const CRIU_CHAIN: &str = "CRIU";

const BUILTIN_CHAINS: [&str; 3] = ["INPUT", "FORWARD", "OUTPUT"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
}

/// IPv6 rules can only be managed where the kernel has IPv6; `if_inet6` exists exactly then.
fn families(pid: u32) -> Vec<Family> {
    if Path::new(&format!("/proc/{pid}/net/if_inet6")).exists() {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// The `*filter` section of an `iptables-save` dump.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FilterTable {
    pub chains: Vec<String>,
    /// `(chain, rule spec after "-A CHAIN ")` in dump order, which is evaluation order.
    pub rules: Vec<(String, String)>,
}

impl FilterTable {
    fn has_chain(&self, chain: &str) -> bool {
        self.chains.iter().any(|c| c == chain)
    }

    fn rules_of<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.rules
            .iter()
            .filter(move |(c, _)| c == chain)
            .map(|(_, r)| r.as_str())
    }

    /// Every rule, in any chain but `target` itself, that jumps or goes to `target`.
    fn references_to<'a>(
        &'a self,
        target: &'a str,
    ) -> impl Iterator<Item = &'a (String, String)> + 'a {
        self.rules
            .iter()
            .filter(move |(chain, spec)| chain != target && jumps_to(spec, target))
    }

    /// In force only when every builtin chain sends packets to our chain first and it drops.
    pub fn is_locked(&self) -> bool {
        self.has_chain(LOCK_CHAIN)
            && self.rules_of(LOCK_CHAIN).eq(["-j DROP"])
            && BUILTIN_CHAINS
                .iter()
                .all(|chain| self.rules_of(chain).next() == Some(lock_jump().as_str()))
    }
}

fn lock_jump() -> String {
    format!("-j {LOCK_CHAIN}")
}

fn jumps_to(spec: &str, target: &str) -> bool {
    let words: Vec<&str> = spec.split_whitespace().collect();
    words
        .windows(2)
        .any(|w| matches!(w[0], "-j" | "--jump" | "-g" | "--goto") && w[1] == target)
}

/// Parses the `*filter` section of `iptables-save` output; an absent section is an empty table.
pub fn parse_iptables_save(dump: &str) -> Result<FilterTable, String> {
    let mut table = FilterTable::default();
    let mut in_filter = false;
    for (n, line) in dump.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            in_filter = name == "filter";
            continue;
        }
        if !in_filter {
            continue;
        }
        if line == "COMMIT" {
            in_filter = false;
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl
                .split_whitespace()
                .next()
                .ok_or_else(|| format!("line {}: empty chain", n + 1))?;
            table.chains.push(chain.to_string());
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
            table
                .rules
                .push((chain.to_string(), spec.trim().to_string()));
        } else {
            return Err(format!("line {}: unexpected {line:?}", n + 1));
        }
    }
    Ok(table)
}

/// The transaction that leaves exactly our lock in place, whatever was there before.
fn lock_script(table: &FilterTable) -> String {
    let mut s = String::from("*filter\n");
    // Declaring an existing chain under --noflush empties it, so rerunning converges.
    s.push_str(&format!(":{LOCK_CHAIN} - [0:0]\n"));
    for (chain, spec) in table.references_to(LOCK_CHAIN) {
        s.push_str(&format!("-D {chain} {spec}\n"));
    }
    for chain in BUILTIN_CHAINS {
        s.push_str(&format!("-I {chain} 1 -j {LOCK_CHAIN}\n"));
    }
    s.push_str(&format!("-A {LOCK_CHAIN} -j DROP\nCOMMIT\n"));
    s
}

/// The transaction that removes `chain` and every reference to it, or `None` if nothing is
/// there to remove.
fn removal_script(table: &FilterTable, chain: &str) -> Option<String> {
    let refs: Vec<_> = table.references_to(chain).collect();
    if refs.is_empty() && !table.has_chain(chain) {
        return None;
    }
    let mut s = String::from("*filter\n");
    for (from, spec) in refs {
        s.push_str(&format!("-D {from} {spec}\n"));
    }
    if table.has_chain(chain) {
        s.push_str(&format!("-F {chain}\n-X {chain}\n"));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

async fn read_table(step: &str, pid: u32, family: Family) -> Result<FilterTable, NetError> {
    let dump = tool::in_netns(step, pid, family.save(), &[], None).await?;
    parse_iptables_save(&dump).map_err(|reason| NetError::Parse {
        step: step.to_string(),
        command: format!("nsenter --target {pid} --net -- {}", family.save()),
        reason,
    })
}

async fn apply(step: &str, pid: u32, family: Family, script: &str) -> Result<(), NetError> {
    tracing::debug!(pid, ?family, script, "{step}");
    tool::in_netns(
        step,
        pid,
        family.restore(),
        &["-w", "5", "--noflush"],
        Some(script.as_bytes()),
    )
    .await
    .map(drop)
}

/// Holds the network of a frozen source silent from freeze until commit or rollback.
///
/// A kernel ACK sent by the source for data the target never saw would corrupt the TCP stream
/// after the switch, so everything is dropped in INPUT, OUTPUT and FORWARD, our jump placed
/// first in each. Idempotent; on failure, the families this call locked are unlocked again so
/// the caller never holds a lock that covers IPv4 but not IPv6.
pub async fn lock(pid: u32) -> Result<(), NetError> {
    let step = format!("locking the network of pid {pid}");
    let mut done = Vec::new();
    for family in families(pid) {
        let result = async {
            let table = read_table(&step, pid, family).await?;
            if table.is_locked() {
                return Ok(false);
            }
            apply(&step, pid, family, &lock_script(&table))
                .await
                .map(|()| true)
        }
        .await;
        match result {
            Ok(true) => done.push(family),
            Ok(false) => {}
            Err(e) => {
                for undo in done {
                    if let Err(undo_err) = remove_chain(&step, pid, undo, LOCK_CHAIN).await {
                        tracing::warn!(pid, error = %undo_err, "could not undo a partial network lock");
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Removes our lock. Idempotent: an absent lock is success. Every family is attempted even if
/// one fails, so a rollback frees as much of the network as it can.
pub async fn unlock(pid: u32) -> Result<(), NetError> {
    let step = format!("unlocking the network of pid {pid}");
    remove_everywhere(&step, pid, LOCK_CHAIN).await.map(drop)
}

/// True only when the lock is fully in force for every address family.
pub async fn is_locked(pid: u32) -> Result<bool, NetError> {
    let step = format!("checking the network lock of pid {pid}");
    for family in families(pid) {
        if !read_table(&step, pid, family).await?.is_locked() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Removes CRIU's iptables network lock, which outlives a CRIU killed mid-dump.
/// Returns whether anything of it was present.
pub async fn remove_criu_lock(pid: u32) -> Result<bool, NetError> {
    let step = format!("removing CRIU's network lock from pid {pid}");
    remove_everywhere(&step, pid, CRIU_CHAIN).await
}

async fn remove_everywhere(step: &str, pid: u32, chain: &str) -> Result<bool, NetError> {
    let mut found = false;
    let mut first_error = None;
    for family in families(pid) {
        match remove_chain(step, pid, family, chain).await {
            Ok(present) => found |= present,
            Err(e) => {
                tracing::warn!(pid, ?family, error = %e, "{step}");
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(found), Err)
}

async fn remove_chain(step: &str, pid: u32, family: Family, chain: &str) -> Result<bool, NetError> {
    let table = read_table(step, pid, family).await?;
    match removal_script(&table, chain) {
        Some(script) => apply(step, pid, family, &script).await.map(|()| true),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCKED: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Wed Nov 25 02:45:28 2026
*nat
:PREROUTING ACCEPT [0:0]
:DOCKER_OUTPUT - [0:0]
-A PREROUTING -j DOCKER_OUTPUT
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:FERRY-LOCK - [0:0]
-A INPUT -j FERRY-LOCK
-A INPUT -p tcp -m tcp --dport 22 -m comment --comment \"keep me\" -j ACCEPT
-A FORWARD -j FERRY-LOCK
-A OUTPUT -j FERRY-LOCK
-A FERRY-LOCK -j DROP
COMMIT
# Completed on Wed Nov 25 02:45:28 2026
";

    const CRIU: &str = "\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CRIU - [0:0]
-A INPUT -j CRIU
-A OUTPUT -j CRIU
-A CRIU -m mark --mark 0xc114 -j ACCEPT
-A CRIU -j DROP
COMMIT
";

    #[test]
    fn parses_only_filter() {
        let t = parse_iptables_save(LOCKED).unwrap();
        assert_eq!(t.chains, ["INPUT", "FORWARD", "OUTPUT", "FERRY-LOCK"]);
        assert_eq!(t.rules.len(), 5);
        assert_eq!(
            t.rules[1].1,
            "-p tcp -m tcp --dport 22 -m comment --comment \"keep me\" -j ACCEPT"
        );
        assert!(t.is_locked());
        assert_eq!(parse_iptables_save("").unwrap(), FilterTable::default());
        assert!(parse_iptables_save("*filter\nbogus\nCOMMIT\n").is_err());
    }

    #[test]
    fn lock_state() {
        assert!(!parse_iptables_save(CRIU).unwrap().is_locked());
        let not_first =
            LOCKED.replace("-A INPUT -j FERRY-LOCK\n-A INPUT -p tcp", "-A INPUT -p tcp");
        let not_first = not_first.replace(
            "COMMIT\n# Completed",
            "-A INPUT -j FERRY-LOCK\nCOMMIT\n# Completed",
        );
        assert!(!parse_iptables_save(&not_first).unwrap().is_locked());
        let no_drop = LOCKED.replace("-A FERRY-LOCK -j DROP\n", "");
        assert!(!parse_iptables_save(&no_drop).unwrap().is_locked());
        let no_output = LOCKED.replace("-A OUTPUT -j FERRY-LOCK\n", "");
        assert!(!parse_iptables_save(&no_output).unwrap().is_locked());
    }

    #[test]
    fn lock_script_converges() {
        let fresh = lock_script(&FilterTable::default());
        assert_eq!(
            fresh,
            "*filter\n:FERRY-LOCK - [0:0]\n-I INPUT 1 -j FERRY-LOCK\n-I FORWARD 1 -j FERRY-LOCK\n\
             -I OUTPUT 1 -j FERRY-LOCK\n-A FERRY-LOCK -j DROP\nCOMMIT\n"
        );
        let again = lock_script(&parse_iptables_save(LOCKED).unwrap());
        assert_eq!(again.matches("-D ").count(), 3);
        assert!(again.starts_with("*filter\n:FERRY-LOCK - [0:0]\n-D INPUT -j FERRY-LOCK\n"));
    }

    #[test]
    fn removal_scripts() {
        let t = parse_iptables_save(LOCKED).unwrap();
        assert_eq!(
            removal_script(&t, LOCK_CHAIN).unwrap(),
            "*filter\n-D INPUT -j FERRY-LOCK\n-D FORWARD -j FERRY-LOCK\n-D OUTPUT -j FERRY-LOCK\n\
             -F FERRY-LOCK\n-X FERRY-LOCK\nCOMMIT\n"
        );
        assert_eq!(removal_script(&t, CRIU_CHAIN), None);
        let c = parse_iptables_save(CRIU).unwrap();
        assert_eq!(
            removal_script(&c, CRIU_CHAIN).unwrap(),
            "*filter\n-D INPUT -j CRIU\n-D OUTPUT -j CRIU\n-F CRIU\n-X CRIU\nCOMMIT\n"
        );
        assert_eq!(removal_script(&c, LOCK_CHAIN), None);
    }

    #[test]
    fn jump_detection() {
        assert!(jumps_to("-j CRIU", "CRIU"));
        assert!(jumps_to("-s 198.18.0.1/32 -g CRIU", "CRIU"));
        assert!(!jumps_to("-j CRIU-OTHER", "CRIU"));
        assert!(!jumps_to("-m comment --comment CRIU -j ACCEPT", "CRIU"));
    }
}
