use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Start (or repair) the local test hosts, their dockerds and agents.
    Up {
        /// Also start host c: a dockerd without experimental mode or the ferry runtime.
        #[arg(long)]
        with_incompatible_host: bool,
        /// Also start hosts d and e, whose dockerds run with userns-remap (for containers
        /// whose processes are not root, on hosts where root lacks CAP_SYS_RESOURCE).
        #[arg(long)]
        with_userns_hosts: bool,
        #[arg(long)]
        json: bool,
    },
    /// Stop everything the test bed started and remove its namespaces.
    Down,
    /// Print the running test bed's description.
    Status,
}

/// The test bed's config with binaries found next to this executable.
pub fn config() -> anyhow::Result<ferry_testbed::TestbedConfig> {
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    let workload = exe
        .parent()
        .map(|d| d.join("ferry-workload"))
        .unwrap_or_else(|| PathBuf::from("ferry-workload"));
    if !workload.is_file() {
        anyhow::bail!(
            "ferry-workload is not next to {} (build the whole workspace: cargo build --release)",
            exe.display()
        );
    }
    Ok(ferry_testbed::TestbedConfig::new(exe, workload))
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let mut cfg = config()?;
    match a.action {
        Action::Up {
            with_incompatible_host,
            with_userns_hosts,
            json,
        } => {
            cfg.with_incompatible_host = with_incompatible_host;
            cfg.with_userns_hosts = with_userns_hosts;
            let info = ferry_testbed::up(&cfg).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                for h in &info.hosts {
                    println!(
                        "host {}: agent {} docker {} tls {}",
                        h.name,
                        h.agent_addr,
                        h.docker_host,
                        h.tls_dir.display()
                    );
                }
                println!(
                    "client namespace {} ({}); CLI TLS dir {}",
                    info.client_netns,
                    info.client_ip,
                    info.client_tls_dir.display()
                );
            }
        }
        Action::Down => ferry_testbed::down(&cfg).await?,
        Action::Status => {
            let info = ferry_testbed::load_info(&cfg).await?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
