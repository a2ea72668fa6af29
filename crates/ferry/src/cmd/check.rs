use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_agent::client::AgentClient;
use ferry_agent::host::{HostEnv, Probe};
use ferry_proto::HostFacts;

#[derive(clap::Args)]
pub struct Args {
    /// Peer agents (IP:PORT) to check as migration targets of this host.
    #[arg(long = "to")]
    to: Vec<SocketAddr>,
    /// The CLI's TLS directory, needed with --to.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

fn print_facts(f: &HostFacts) {
    println!(
        "{} ({} {}, kernel {})",
        f.agent, f.hostname, f.arch, f.kernel
    );
    println!(
        "  criu      {}",
        f.criu_version.as_deref().unwrap_or("missing")
    );
    let ft = &f.criu_features;
    println!(
        "  features  tcp-established {} uffd {} uffd-noncoop {} soft-dirty {} lazy-pages-read {}",
        yes(ft.tcp_established),
        yes(ft.uffd),
        yes(ft.uffd_noncoop),
        yes(ft.mem_dirty_track),
        yes(ft.lazy_pages_read)
    );
    println!(
        "  runc      {}",
        f.runc_version.as_deref().unwrap_or("missing")
    );
    println!(
        "  docker    {} (API {}), experimental {}, ferry runtime {}",
        f.docker_version.as_deref().unwrap_or("unreachable"),
        f.docker_api_version.as_deref().unwrap_or("-"),
        yes(f.docker_experimental),
        yes(f.ferry_runtime)
    );
    println!(
        "  host      CAP_SYS_RESOURCE {}, fs.pipe-max-size {}",
        yes(f.cap_sys_resource),
        f.pipe_max_size
    );
    if let Some(c) = f.cpu_compatible {
        println!(
            "  cpu       compatible with this host's checkpoints: {}",
            yes(c)
        );
    }
    for p in &f.problems {
        println!("  PROBLEM   {p}");
    }
    for w in &f.warnings {
        println!("  warning   {w}");
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    if !a.to.is_empty() && a.tls_dir.is_none() {
        bail!("--to needs --tls-dir (the CLI's TLS directory)");
    }
    let scratch = std::env::temp_dir().join(format!("ferry-check-{}", std::process::id()));
    // This host may be a workstation without Docker: peers are still checked, against its CPU.
    let (local, cpuinfo) = match HostEnv::discover("local".into(), scratch.clone()).await {
        Ok(env) => {
            let facts = env.facts(None, Probe::Fresh).await;
            (Some(facts), env.cpuinfo(Probe::Recent).await)
        }
        Err(e) if !a.to.is_empty() => {
            eprintln!("ferry check: this host is not a Docker host ({e}); checking the peers only");
            let cpuinfo = match ferry_agent::host::find_tool("criu") {
                Some(criu) => ferry_criu::cpuinfo_dump(&criu.to_string_lossy(), &scratch)
                    .await
                    .ok(),
                None => None,
            };
            (None, cpuinfo)
        }
        Err(e) => return Err(anyhow::Error::new(e).context("checking this host")),
    };
    let mut peers = Vec::new();
    if let Some(dir) = &a.tls_dir {
        let client = AgentClient::new(dir, Duration::from_secs(10))?;
        for addr in &a.to {
            let f = client
                .check(*addr, cpuinfo.clone())
                .await
                .with_context(|| format!("checking agent {addr}"))?;
            peers.push(f);
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let mut problems = local.as_ref().map(|l| l.problems.len()).unwrap_or(0);
    let pair_problems: Vec<Vec<String>> = peers
        .iter()
        .map(|p| match &local {
            Some(l) => ferry_migrate::compat_problems(l, p),
            None => {
                let mut v = p.problems.clone();
                if p.cpu_compatible == Some(false) {
                    v.push(format!(
                        "CPU is not compatible with this host's: {}",
                        p.cpu_check_log.join(" / ")
                    ));
                }
                v
            }
        })
        .collect();
    problems += pair_problems.iter().map(|p| p.len()).sum::<usize>();
    // What `ferry migrate` with `--strategy auto` would pick towards each peer, and why.
    let auto: Vec<Option<String>> = peers
        .iter()
        .map(|p| {
            local.as_ref().map(|l| {
                match ferry_migrate::choose_strategy(ferry_proto::Strategy::Auto, l, p) {
                    Ok(c) => format!("{} ({})", c.strategy, c.reason),
                    Err(why) => format!("none: {why}"),
                }
            })
        })
        .collect();
    if a.json {
        let v = serde_json::json!({"local": local, "peers": peers, "pair_problems": pair_problems, "auto_strategy": auto});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if let Some(l) = &local {
            print_facts(l);
        }
        for ((p, pp), auto) in peers.iter().zip(&pair_problems).zip(&auto) {
            print_facts(p);
            if pp.is_empty() {
                println!("  → this host can migrate containers to {}", p.agent);
                if let Some(s) = auto {
                    println!("  → strategy auto: {s}");
                }
            }
            for x in pp {
                println!("  → cannot migrate to {}: {x}", p.agent);
            }
        }
    }
    Ok(if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
