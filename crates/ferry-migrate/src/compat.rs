//! Whether two hosts can migrate a container between them, and with which strategy. Pure
//! functions of the two hosts' facts so every rule has a table test.

use ferry_proto::{HostFacts, Strategy};

/// Strategies this build can drive end to end. `auto` never picks one outside this list.
pub const IMPLEMENTED: &[Strategy] = &[
    Strategy::StopAndCopy,
    Strategy::PreCopy,
    Strategy::PostCopy,
    Strategy::Hybrid,
];

/// Pipe size CRIU's page server needs for post-copy.
pub const PIPE_NEEDED: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrategyChoice {
    pub strategy: Strategy,
    pub reason: String,
}

fn version_tuple(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.trim().split(['.', '-']).map(|p| p.parse::<u32>().ok());
    let major = it.next()??;
    let minor = it.next().flatten().unwrap_or(0);
    let patch = it.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// Everything that makes the pair unfit for any migration, each naming the host and the cause.
pub fn compat_problems(source: &HostFacts, target: &HostFacts) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (side, f) in [("source", source), ("target", target)] {
        for p in &f.problems {
            out.push(format!("{side} {}: {p}", f.agent));
        }
    }
    if !source.arch.is_empty() && !target.arch.is_empty() && source.arch != target.arch {
        out.push(format!(
            "architectures differ: source {} is {}, target {} is {}",
            source.agent, source.arch, target.agent, target.arch
        ));
    }
    if let (Some(sv), Some(tv)) = (&source.criu_version, &target.criu_version) {
        match (version_tuple(sv), version_tuple(tv)) {
            (Some(s), Some(t)) if (t.0, t.1) < (s.0, s.1) => out.push(format!(
                "target {} runs CRIU {tv}, older than the source's {sv}: images may not restore",
                target.agent
            )),
            (None, _) | (_, None) => {
                out.push(format!("cannot compare CRIU versions {sv:?} and {tv:?}"))
            }
            _ => {}
        }
    }
    if !source.criu_features.tcp_established {
        out.push(format!(
            "source {}: CRIU cannot dump established TCP connections",
            source.agent
        ));
    }
    if !target.criu_features.tcp_established {
        out.push(format!(
            "target {}: CRIU cannot restore established TCP connections",
            target.agent
        ));
    }
    if !target.docker_experimental {
        out.push(format!(
            "target {}: dockerd is not in experimental mode, so it cannot start a container from a checkpoint (set \"experimental\": true in daemon.json)",
            target.agent
        ));
    }
    if !target.ferry_runtime {
        out.push(format!(
            "target {}: dockerd has no \"ferry\" runtime registered in daemon.json \"runtimes\" (ferry restores through it to pass CRIU options per container)",
            target.agent
        ));
    }
    match (source.userns_remap(), target.userns_remap()) {
        (s, t) if s == t => {}
        (s, t) => {
            let show = |r: Option<(u32, u32)>| match r {
                Some((u, g)) => format!("remaps container root to {u}:{g} (userns-remap)"),
                None => "does not remap user namespaces".to_string(),
            };
            out.push(format!(
                "user namespace mapping differs: source {} {}, target {} {}; files and processes would change owner (configure the same userns-remap range on both daemons)",
                source.agent,
                show(s),
                target.agent,
                show(t)
            ));
        }
    }
    if target.cpu_compatible == Some(false) {
        let why = if target.cpu_check_log.is_empty() {
            String::new()
        } else {
            format!(": {}", target.cpu_check_log.join(" / "))
        };
        out.push(format!(
            "target {}: CPU is not compatible with the source's (criu cpuinfo check){why}",
            target.agent
        ));
    }
    out
}

/// Picks the strategy: the requested one if both hosts support it, or for `auto` the best one
/// both support among those this build implements. The reason is shown to the operator.
pub fn choose_strategy(
    requested: Strategy,
    source: &HostFacts,
    target: &HostFacts,
) -> Result<StrategyChoice, String> {
    let post_copy_ok = target.criu_features.uffd && target.criu_features.uffd_noncoop;
    // CRIU's page server tees pages through 4 MiB pipes: without CAP_SYS_RESOURCE the source
    // needs fs.pipe-max-size at least that big (`ferry agent --tune-host` raises it).
    let source_pipes_ok = source.cap_sys_resource || source.pipe_max_size >= PIPE_NEEDED;
    let pre_copy_ok = source.criu_features.mem_dirty_track;
    let supported = |s: Strategy| -> Result<(), String> {
        if !IMPLEMENTED.contains(&s) {
            return Err(format!(
                "strategy {s} is not implemented in this build (available: {})",
                names(IMPLEMENTED)
            ));
        }
        match s {
            Strategy::PostCopy if !post_copy_ok => Err(format!("post-copy needs userfaultfd on target {}", target.agent)),
            Strategy::PostCopy if !source_pipes_ok => Err(format!(
                "post-copy needs fs.pipe-max-size >= {PIPE_NEEDED} (or CAP_SYS_RESOURCE) on source {}, which has {} (start its agent with --tune-host)",
                source.agent, source.pipe_max_size
            )),
            Strategy::PreCopy if !pre_copy_ok => Err(format!(
                "pre-copy needs soft-dirty memory tracking on source {} (criu --feature mem_dirty_track)",
                source.agent
            )),
            Strategy::Hybrid if !pre_copy_ok => Err(format!(
                "hybrid needs soft-dirty memory tracking on source {} (criu --feature mem_dirty_track)",
                source.agent
            )),
            Strategy::Hybrid if !post_copy_ok => Err(format!("hybrid needs userfaultfd on target {}", target.agent)),
            Strategy::Hybrid if !source_pipes_ok => Err(format!(
                "hybrid needs fs.pipe-max-size >= {PIPE_NEEDED} (or CAP_SYS_RESOURCE) on source {}, which has {} (start its agent with --tune-host)",
                source.agent, source.pipe_max_size
            )),
            _ => Ok(()),
        }
    };
    if requested != Strategy::Auto {
        supported(requested)?;
        return Ok(StrategyChoice {
            strategy: requested,
            reason: "requested by the operator".into(),
        });
    }
    let mut passed_over = Vec::new();
    for candidate in [
        Strategy::Hybrid,
        Strategy::PostCopy,
        Strategy::PreCopy,
        Strategy::StopAndCopy,
    ] {
        match supported(candidate) {
            Ok(()) => {
                let mut reason =
                    format!("auto: {candidate} is the best strategy both hosts support");
                if !passed_over.is_empty() {
                    reason.push_str(&format!(" ({})", passed_over.join("; ")));
                }
                return Ok(StrategyChoice {
                    strategy: candidate,
                    reason,
                });
            }
            Err(why) => passed_over.push(why),
        }
    }
    Err(format!("no strategy is usable: {}", passed_over.join("; ")))
}

fn names(list: &[Strategy]) -> String {
    list.iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::CriuFeatures;

    fn host(name: &str) -> HostFacts {
        HostFacts {
            agent: name.into(),
            arch: "x86_64".into(),
            criu_version: Some("4.2.1".into()),
            criu_features: CriuFeatures {
                tcp_established: true,
                uffd: true,
                uffd_noncoop: true,
                mem_dirty_track: false,
                network_lock_nftables: false,
                lazy_pages_read: false,
            },
            docker_experimental: true,
            ferry_runtime: true,
            cpu_compatible: Some(true),
            pipe_max_size: PIPE_NEEDED,
            ..Default::default()
        }
    }

    #[test]
    fn compatible_pair_has_no_problems() {
        assert!(compat_problems(&host("a"), &host("b")).is_empty());
    }

    #[test]
    fn each_incompatibility_is_named() {
        type Edit = fn(&mut HostFacts, &mut HostFacts);
        let cases: Vec<(&str, Edit)> = vec![
            ("architectures differ", |_, t| t.arch = "aarch64".into()),
            ("older than the source", |_, t| {
                t.criu_version = Some("3.17".into())
            }),
            ("not in experimental mode", |_, t| {
                t.docker_experimental = false
            }),
            ("no \"ferry\" runtime", |_, t| t.ferry_runtime = false),
            ("CPU is not compatible", |_, t| {
                t.cpu_compatible = Some(false)
            }),
            ("cannot dump established TCP", |s, _| {
                s.criu_features.tcp_established = false
            }),
            ("source a: criu not found", |s, _| {
                s.problems.push("criu not found".into())
            }),
            ("cannot compare CRIU versions", |_, t| {
                t.criu_version = Some("garbage".into())
            }),
            ("target b does not remap", |s, _| {
                s.docker_data_root = Some("/var/lib/docker/100000.100000".into())
            }),
            ("source a does not remap", |_, t| {
                t.docker_data_root = Some("/var/lib/docker/100000.100000".into())
            }),
            ("target b remaps container root to 200000:200000", |s, t| {
                s.docker_data_root = Some("/var/lib/docker/100000.100000".into());
                t.docker_data_root = Some("/d/200000.200000".into());
            }),
        ];
        for (needle, edit) in cases {
            let (mut s, mut t) = (host("a"), host("b"));
            edit(&mut s, &mut t);
            let problems = compat_problems(&s, &t);
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{needle}: {problems:?}"
            );
        }
    }

    #[test]
    fn the_same_remapping_on_both_hosts_is_fine() {
        let (mut s, mut t) = (host("a"), host("b"));
        s.docker_data_root = Some("/x/docker/100000.100000".into());
        t.docker_data_root = Some("/y/docker/100000.100000".into());
        assert!(compat_problems(&s, &t).is_empty());
    }

    #[test]
    fn newer_target_criu_is_fine() {
        let mut t = host("b");
        t.criu_version = Some("4.3.0".into());
        assert!(compat_problems(&host("a"), &t).is_empty());
    }

    #[test]
    fn auto_picks_an_implemented_strategy_and_says_why() {
        let c = choose_strategy(Strategy::Auto, &host("a"), &host("b")).unwrap();
        assert!(IMPLEMENTED.contains(&c.strategy));
        assert!(c.reason.starts_with("auto:"), "{}", c.reason);
    }

    #[test]
    fn auto_prefers_post_copy_where_userfaultfd_works_and_falls_back_without_it() {
        let c = choose_strategy(Strategy::Auto, &host("a"), &host("b")).unwrap();
        assert_eq!(c.strategy, Strategy::PostCopy);
        let mut t = host("b");
        t.criu_features.uffd = false;
        let c = choose_strategy(Strategy::Auto, &host("a"), &t).unwrap();
        assert_eq!(c.strategy, Strategy::StopAndCopy);
        assert!(c.reason.contains("userfaultfd"), "{}", c.reason);
        let mut s = host("a");
        s.pipe_max_size = 1024 * 1024;
        let err = choose_strategy(Strategy::PostCopy, &s, &host("b")).unwrap_err();
        assert!(err.contains("pipe-max-size"), "{err}");
        s.cap_sys_resource = true;
        assert!(choose_strategy(Strategy::PostCopy, &s, &host("b")).is_ok());
    }

    #[test]
    fn with_soft_dirty_on_the_source_auto_picks_hybrid_and_each_lack_is_named() {
        let mut s = host("a");
        s.criu_features.mem_dirty_track = true;
        let c = choose_strategy(Strategy::Auto, &s, &host("b")).unwrap();
        assert_eq!(c.strategy, Strategy::Hybrid);
        assert_eq!(
            choose_strategy(Strategy::PreCopy, &s, &host("b"))
                .unwrap()
                .strategy,
            Strategy::PreCopy
        );
        let mut t = host("b");
        t.criu_features.uffd = false;
        let c = choose_strategy(Strategy::Auto, &s, &t).unwrap();
        assert_eq!(c.strategy, Strategy::PreCopy);
        assert!(
            c.reason.contains("hybrid needs userfaultfd on target b"),
            "{}",
            c.reason
        );
        let mut small = s.clone();
        small.pipe_max_size = 1024 * 1024;
        let err = choose_strategy(Strategy::Hybrid, &small, &host("b")).unwrap_err();
        assert!(
            err.contains("pipe-max-size") && err.contains("source a"),
            "{err}"
        );
        assert_eq!(
            choose_strategy(Strategy::Auto, &small, &host("b"))
                .unwrap()
                .strategy,
            Strategy::PreCopy
        );
    }

    #[test]
    fn unimplemented_or_unsupported_requests_are_refused() {
        let err = choose_strategy(Strategy::PreCopy, &host("a"), &host("b")).unwrap_err();
        assert!(
            err.contains("pre-copy needs soft-dirty") && err.contains("source a"),
            "{err}"
        );
        let err = choose_strategy(Strategy::Hybrid, &host("a"), &host("b")).unwrap_err();
        assert!(err.contains("hybrid needs soft-dirty"), "{err}");
        let ok = choose_strategy(Strategy::StopAndCopy, &host("a"), &host("b")).unwrap();
        assert_eq!(ok.strategy, Strategy::StopAndCopy);
    }
}
