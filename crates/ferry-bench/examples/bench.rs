//! Runs the benchmark by hand, until `ferry bench` exists:
//!
//! `cargo run --release -p ferry-bench --example bench -- [--sizes 64,512] [--strategies stop-and-copy] [--out DIR] [--ferry PATH] [--interval-ms 5]`
//!
//! `... --example bench -- --rerender DIR` rewrites DIR's bench.md and charts from its bench.json.
//!
//! The ferry binary defaults to the workspace's target/release/ferry (build it first:
//! `cargo build --release --workspace --bins`). Needs root and the test bed.

use std::path::PathBuf;

use ferry_bench::BenchOptions;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let default_ferry =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/ferry");
    let mut opts = BenchOptions::new(default_ferry, "bench-out");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let list = || value.split(',').map(str::trim).filter(|s| !s.is_empty());
        match flag.as_str() {
            "--sizes" => opts.sizes_mb = list().map(str::parse).collect::<Result<_, _>>()?,
            "--strategies" => opts.strategies = list().map(String::from).collect(),
            "--out" => opts.out_dir = value.into(),
            "--ferry" => opts.ferry_exe = value.into(),
            "--interval-ms" => opts.interval_ms = value.parse()?,
            "--rerender" => {
                let dir = PathBuf::from(value);
                let mut report = ferry_bench::load_report(&dir)?;
                ferry_bench::write_outputs(&dir, &mut report)?;
                print!("{}", ferry_bench::markdown(&report));
                return Ok(());
            }
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let report = ferry_bench::run(opts).await?;
    print!("{}", ferry_bench::markdown(&report));
    for f in &report.files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}
