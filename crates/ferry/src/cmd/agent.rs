use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on (mutual TLS only).
    #[arg(long)]
    listen: SocketAddr,
    /// This agent's TLS directory (ca.pem, cert.pem, key.pem), as made by `ferry pki init`.
    #[arg(long)]
    tls_dir: PathBuf,
    /// Where the agent keeps images in flight and runtime overrides.
    #[arg(long, default_value = "/var/lib/ferry")]
    state_dir: PathBuf,
    /// Allow the agent to raise host settings post-copy needs (fs.pipe-max-size to 4 MiB when
    /// root lacks CAP_SYS_RESOURCE). `ferry check` reports them either way.
    #[arg(long)]
    tune_host: bool,
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    ferry_agent::serve(ferry_agent::AgentOptions {
        listen: a.listen,
        tls_dir: a.tls_dir,
        state_dir: a.state_dir,
        tune_host: a.tune_host,
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}
