pub mod agent;
pub mod bench;
pub mod check;
pub mod demo;
pub mod migrate;
pub mod pki;
pub mod runtime;
pub mod testbed;

/// Logs go to stderr so `--json` output on stdout stays machine-readable.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
