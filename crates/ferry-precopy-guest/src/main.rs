//! `ferry-precopy-guest guest` is the test driver inside the QEMU guest;
//! `ferry-precopy-guest workload` is the process of the container it migrates.

mod guest;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_precopy_guest::{workload, WorkloadSpec};

#[derive(Parser)]
#[command(about = "CRIU pre-copy proof inside a guest")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole test (as the guest's init does) and print the result line.
    Guest(GuestArgs),
    /// Be the container's process.
    Workload(WorkloadArgs),
}

#[derive(Args, Clone, Copy)]
struct SpecArgs {
    /// Size of the verified buffer.
    #[arg(long, default_value_t = 256)]
    mb: u64,
    /// Pages the workload keeps rewriting (the first ones of the buffer).
    #[arg(long, default_value_t = 4096)]
    hot_pages: u64,
    /// Pages rewritten per tick.
    #[arg(long, default_value_t = 32)]
    dirty_per_tick: u64,
    #[arg(long, default_value_t = 10)]
    tick_ms: u64,
    /// Advise the buffer against transparent huge pages (MADV_NOHUGEPAGE).
    #[arg(long)]
    no_huge_pages: bool,
}

impl SpecArgs {
    fn spec(self) -> WorkloadSpec {
        WorkloadSpec {
            mb: self.mb,
            pages: self.mb * 1024 * 1024 / workload::PAGE as u64,
            hot_pages: self.hot_pages,
            dirty_per_tick: self.dirty_per_tick,
            tick_ms: self.tick_ms,
            huge_pages: !self.no_huge_pages,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Cgroup {
    V1,
    V2,
}

#[derive(Args)]
struct GuestArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// OCI bundle whose rootfs holds this binary and its libraries.
    #[arg(long, default_value = "/bundle")]
    bundle: PathBuf,
    /// Where images and CRIU work directories go.
    #[arg(long, default_value = "/var/lib/ferry-precopy")]
    data: PathBuf,
    #[arg(long, value_enum, default_value_t = Cgroup::V2)]
    cgroup: Cgroup,
    /// Skip pre-copy: one plain dump, for comparison.
    #[arg(long)]
    baseline: bool,
}

#[derive(Args)]
struct WorkloadArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// Directory for the progress and verification files.
    #[arg(long, default_value = "/state")]
    state: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Workload(a) => match workload::run(&a.spec.spec(), &a.state) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // stderr is /dev/null by now; leave the reason where the driver looks.
                let _ = workload::write_atomic(&a.state, "error", e.to_string().as_bytes());
                ExitCode::FAILURE
            }
        },
        Cmd::Guest(a) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .init();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = guest::Options {
                spec: a.spec.spec(),
                bundle: a.bundle,
                data: a.data,
                cgroup: a.cgroup,
                baseline: a.baseline,
            };
            rt.block_on(guest::main(opts))
        }
    }
}
