use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The agent's state directory, where per-container restore overrides are left.
    #[arg(long)]
    state_dir: PathBuf,
    /// The runc to delegate to (default: the first found in the usual places).
    #[arg(long)]
    runc: Option<String>,
    /// runc's own arguments, passed through.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn run(a: Args) -> ExitCode {
    let code = ferry_criu::runtime::run_wrapper(&a.state_dir, a.runc.as_deref(), a.args);
    ExitCode::from(code.clamp(0, 255) as u8)
}
