//! Drive the test bed by hand: `cargo run -p ferry-testbed --example testbed -- up|down|info|restart-agent H|stop-agent H [--with-c]`.
//! Binaries default to the workspace's target/debug; override with FERRY_EXE / FERRY_WORKLOAD_EXE.

use std::path::PathBuf;
use std::time::Instant;

use ferry_testbed::TestbedConfig;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug");
    let exe = |var: &str, name: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| target.join(name))
    };
    let mut cfg = TestbedConfig::new(
        exe("FERRY_EXE", "ferry"),
        exe("FERRY_WORKLOAD_EXE", "ferry-workload"),
    );
    cfg.with_incompatible_host = args.iter().any(|a| a == "--with-c");
    let started = Instant::now();
    match args.first().map(String::as_str) {
        Some("up") => {
            let info = ferry_testbed::up(&cfg).await?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        Some("down") => ferry_testbed::down(&cfg).await?,
        Some(cmd @ ("restart-agent" | "stop-agent")) => {
            let info = ferry_testbed::load_info(&cfg).await?;
            let host = args.get(1).ok_or("which host?")?;
            if cmd == "restart-agent" {
                ferry_testbed::restart_agent(&cfg, &info, host).await?;
            } else {
                ferry_testbed::stop_agent(&cfg, &info, host).await?;
            }
        }
        Some("info") => println!(
            "{}",
            serde_json::to_string_pretty(&ferry_testbed::load_info(&cfg).await?)?
        ),
        _ => {
            return Err(
                "usage: testbed up|down|info|restart-agent H|stop-agent H [--with-c]".into(),
            )
        }
    }
    eprintln!("took {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}
