use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The agent's state directory, where per-container restore overrides are left.
    #[arg(long, required_unless_present = "criu_action")]
    state_dir: Option<PathBuf>,
    /// The runc to delegate to (default: the first found in the usual places).
    #[arg(long)]
    runc: Option<String>,
    /// Run as CRIU's action script of a restore (the action and the restored init's pid come
    /// in CRIU's environment): opens the network namespace the wrapper wired before resume.
    #[arg(long, conflicts_with_all = ["state_dir", "args"])]
    criu_action: bool,
    /// runc's own arguments, passed through.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn run(a: Args) -> ExitCode {
    if a.criu_action {
        use ferry_criu::prewire::{
            run_action, SCRIPT_ACTION_ENV, SCRIPT_IMAGE_DIR_ENV, SCRIPT_INIT_PID_ENV,
        };
        let action = std::env::var(SCRIPT_ACTION_ENV).ok();
        let pid = std::env::var(SCRIPT_INIT_PID_ENV).ok();
        let images = std::env::var(SCRIPT_IMAGE_DIR_ENV).ok();
        return match run_action(action.as_deref(), pid.as_deref(), images.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry runtime --criu-action: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(state_dir) = a.state_dir else {
        eprintln!("ferry runtime: --state-dir is required");
        return ExitCode::from(2);
    };
    let code = ferry_criu::runtime::run_wrapper(&state_dir, a.runc.as_deref(), a.args);
    ExitCode::from(code.clamp(0, 255) as u8)
}
