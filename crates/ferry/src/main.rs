//! `ferry`: live-migrate running Docker containers between hosts.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live-migrate running Docker containers between hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the CA and the agents' and CLI's certificates.
    Pki(cmd::pki::Args),
    /// Run the agent next to a dockerd.
    Agent(cmd::agent::Args),
    /// Move a running container from one agent's host to another's.
    Migrate(cmd::migrate::Args),
    /// Check this host (and peers) for what migration needs.
    Check(cmd::check::Args),
    /// Local test hosts in network namespaces, for demos and tests.
    Testbed(cmd::testbed::Args),
    /// Benchmark the strategies against the manual docker checkpoint path on the test bed.
    Bench(cmd::bench::Args),
    /// Bring up the test bed and live-migrate a stateful workload with a connected client.
    Demo(cmd::demo::Args),
    /// The runc-wrapping OCI runtime registered in daemon.json (called by containerd).
    #[command(hide = true)]
    Runtime(cmd::runtime::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::Runtime(args) = cli.command {
        return cmd::runtime::run(args);
    }
    cmd::init_tracing();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let res = rt.block_on(async move {
        match cli.command {
            Command::Pki(a) => cmd::pki::run(a).await,
            Command::Agent(a) => cmd::agent::run(a).await,
            Command::Migrate(a) => cmd::migrate::run(a).await,
            Command::Check(a) => cmd::check::run(a).await,
            Command::Testbed(a) => cmd::testbed::run(a).await,
            Command::Demo(a) => cmd::demo::run(a).await,
            Command::Bench(a) => cmd::bench::run(a).await,
            Command::Runtime(_) => Ok(std::process::ExitCode::SUCCESS),
        }
    });
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
