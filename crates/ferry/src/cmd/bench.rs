//! `ferry bench`: the manual `docker checkpoint` path against each strategy, side by side, on
//! the local test bed.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};

#[derive(clap::Args)]
pub struct Args {
    /// Redis data sizes in MB.
    #[arg(long, value_delimiter = ',', default_value = "64,512,2048")]
    sizes: Vec<u64>,
    /// Strategies to compare with the manual path (default: every one the hosts support).
    #[arg(long, value_delimiter = ',')]
    strategies: Vec<String>,
    /// Where bench.json, bench.md and the latency SVGs go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// The client's interval between commands, in ms.
    #[arg(long, default_value_t = 5)]
    interval_ms: u64,
    /// The compression policy of every ferry case (`ferry migrate --compress`).
    #[arg(long, value_enum, default_value_t = super::migrate::CompressArg::Auto)]
    compress: super::migrate::CompressArg,
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    if a.sizes.is_empty() || a.sizes.contains(&0) {
        bail!("--sizes needs sizes of at least 1 MB");
    }
    if a.interval_ms == 0 {
        bail!("--interval-ms must be at least 1");
    }
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    let mut opts = ferry_bench::BenchOptions::new(exe, a.out.clone());
    opts.sizes_mb = a.sizes;
    opts.strategies = a.strategies;
    opts.interval_ms = a.interval_ms;
    opts.compress = a.compress.into();
    let report = ferry_bench::run(opts).await?;
    println!("{}", ferry_bench::markdown(&report));
    println!("results in {}", a.out.display());
    let failed = report
        .cases
        .iter()
        .any(|c| c.status == ferry_bench::CaseStatus::Failed);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
