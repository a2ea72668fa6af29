use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Create (or complete) the CA and one identity per agent plus `client/`.
    Init(InitArgs),
}

#[derive(clap::Args)]
pub struct InitArgs {
    /// Directory for the CA and one sub-directory per agent plus `client/`.
    #[arg(long)]
    dir: PathBuf,
    /// An agent as NAME=IP; its certificate is valid for that IP.
    #[arg(long = "agent", value_name = "NAME=IP", required = true)]
    agents: Vec<String>,
}

fn parse_agent(s: &str) -> anyhow::Result<(String, IpAddr)> {
    let Some((name, ip)) = s.split_once('=') else {
        bail!("--agent {s:?}: expected NAME=IP")
    };
    let ip: IpAddr = ip
        .parse()
        .with_context(|| format!("--agent {s:?}: {ip:?} is not an IP address"))?;
    Ok((name.to_string(), ip))
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let Action::Init(a) = a.action;
    let agents = a
        .agents
        .iter()
        .map(|s| parse_agent(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let summary = ferry_tls::init_pki(&a.dir, &agents)?;
    if summary.ca_created {
        println!("created CA in {}", a.dir.join(ferry_tls::CA_DIR).display());
    }
    for n in &summary.created {
        println!("created {}", a.dir.join(n).display());
    }
    for n in &summary.kept {
        println!("kept {}", a.dir.join(n).display());
    }
    Ok(ExitCode::SUCCESS)
}
