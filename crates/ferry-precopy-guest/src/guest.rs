//! The driver: prepares the guest for runc and CRIU, runs the container, pre-copies it with
//! `ferry_criu::precopy`, dumps, restores, and has the restored workload verify itself.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use ferry_criu::precopy::{self, PrecopyOptions};
use ferry_criu::proc::quote_text;
use ferry_criu::{quote_log, run, RuncHandle, ToolError};
use ferry_precopy_guest::workload::{
    read_json, result_name, write_atomic, Progress, Verification, PROGRESS, REQUEST,
};
use ferry_precopy_guest::{Report, RestoreReport, Round, Verdict, WorkloadSpec, MARKER};
use serde_json::json;

use crate::Cgroup;

pub struct Options {
    pub spec: WorkloadSpec,
    pub bundle: PathBuf,
    pub data: PathBuf,
    pub cgroup: Cgroup,
    pub baseline: bool,
}

const CONTAINER_ID: &str = "ferry-precopy";
const RUNC: &str = "runc";
const CRIU: &str = "criu";
const RUNC_ROOT: &str = "/run/ferry-precopy/runc";

/// Per runc or CRIU call. Under TCG a full dump of a few hundred MiB takes tens of seconds;
/// this only bounds a hang.
const TOOL_TIMEOUT: Duration = Duration::from_secs(600);
/// For the workload to fill its buffer, or to verify it, under TCG.
const WAIT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the dumped source must show no progress to count as stopped: many ticks.
const STILLNESS: Duration = Duration::from_secs(1);

fn fail(step: &str, message: impl Into<String>) -> ToolError {
    ToolError::Other {
        step: step.into(),
        message: message.into(),
        log: vec![],
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub async fn main(o: Options) -> ExitCode {
    let started = Instant::now();
    let mut report = Report {
        verdict: Verdict::Fail,
        error: None,
        error_log: vec![],
        kernel: String::new(),
        thp_mode: String::new(),
        baseline: o.baseline,
        cgroup: match o.cgroup {
            Cgroup::V1 => "v1".into(),
            Cgroup::V2 => "v2".into(),
        },
        mem_dirty_track: false,
        workload: o.spec,
        verified_before: None,
        rounds: vec![],
        stop_reason: None,
        final_dump: None,
        restore: None,
        guest_ms: 0,
    };
    let outcome = drive(&o, &mut report).await;
    cleanup().await;
    match outcome {
        Ok(()) => report.verdict = Verdict::Pass,
        Err(e) => {
            tracing::error!("{e}");
            for l in e.log() {
                tracing::error!("  {l}");
            }
            print_newest_log(&o.data.join("work"));
            report.error = Some(e.to_string());
            report.error_log = e.log().to_vec();
        }
    }
    report.guest_ms = ms(started.elapsed());
    let line = match serde_json::to_string(&report) {
        Ok(j) => format!("{MARKER} {j}"),
        Err(e) => format!("{MARKER} {{\"verdict\":\"fail\",\"error\":\"report: {e}\"}}"),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    if report.verdict == Verdict::Pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn drive(o: &Options, report: &mut Report) -> Result<(), ToolError> {
    setup_mounts(o.cgroup)?;
    report.kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    report.thp_mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let check = run(
        "criu check",
        CRIU,
        &["check", "--feature", "mem_dirty_track"],
        Duration::from_secs(60),
    )
    .await?;
    report.mem_dirty_track = check.status == 0;
    if !report.mem_dirty_track {
        let mut log = quote_text(&check.stdout);
        log.extend(quote_text(&check.stderr));
        return Err(ToolError::Other {
            step: "criu check".into(),
            message: format!(
                "criu check --feature mem_dirty_track failed on kernel {} (exit {}): pre-dumps need soft-dirty tracking",
                report.kernel, check.status
            ),
            log,
        });
    }

    let state = o.bundle.join("rootfs/state");
    std::fs::create_dir_all(&state)
        .map_err(|e| fail("bundle", format!("{}: {e}", state.display())))?;
    write_config(o)?;
    std::fs::create_dir_all(RUNC_ROOT).map_err(|e| fail("runc root", e.to_string()))?;
    runc_detached(
        "start container",
        &[
            "run",
            "--detach",
            "--bundle",
            &o.bundle.to_string_lossy(),
            CONTAINER_ID,
        ],
        None,
    )
    .await?;
    tracing::info!(
        mb = o.spec.mb,
        "container started; waiting for the workload to fill its buffer"
    );
    let first = wait_for("workload start", WAIT_TIMEOUT, || {
        workload_error(&state)?;
        progress(&state)
    })
    .await?;
    let verified = verify(&state, 1).await?;
    if verified.mismatched_pages != 0 || verified.nonce != first.nonce {
        return Err(fail(
            "verify before dump",
            format!("the running workload does not verify: {verified:?}"),
        ));
    }
    report.verified_before = Some(verified);

    let handle = RuncHandle {
        binary: RUNC.into(),
        root: RUNC_ROOT.into(),
        bundle: o.bundle.clone(),
        id: CONTAINER_ID.into(),
    };
    let popts = PrecopyOptions {
        images: o.data.join("images"),
        work: o.data.join("work"),
        tcp_established: false,
        timeout: TOOL_TIMEOUT,
    };
    let last_round = if o.baseline {
        None
    } else {
        precopy_rounds(&handle, &popts, &state, report).await?
    };
    let fin = precopy::final_dump(&handle, &popts, last_round, false).await?;
    tracing::info!(
        wall_ms = fin.wall_ms,
        written = fin.stats.pages_written,
        frozen_us = fin.stats.frozen_time_us,
        "final dump"
    );
    report.final_dump = Some(fin);
    let at_dump = progress(&state)?.ok_or_else(|| fail("final dump", "no progress file"))?;
    tokio::time::sleep(STILLNESS).await;
    let later = progress(&state)?.ok_or_else(|| fail("final dump", "no progress file"))?;
    if later.ticks != at_dump.ticks {
        return Err(fail(
            "final dump",
            format!(
                "the source kept running after its dump (ticks {} then {})",
                at_dump.ticks, later.ticks
            ),
        ));
    }

    let restore_work = popts.work.join("restore");
    std::fs::create_dir_all(&restore_work).map_err(|e| fail("restore", e.to_string()))?;
    let started = Instant::now();
    runc_detached(
        "restore",
        &[
            "restore",
            "--detach",
            "--image-path",
            &popts.final_dir().to_string_lossy(),
            "--work-path",
            &restore_work.to_string_lossy(),
            "--bundle",
            &o.bundle.to_string_lossy(),
            CONTAINER_ID,
        ],
        Some(&restore_work.join("restore.log")),
    )
    .await?;
    let restore_ms = ms(started.elapsed());
    tracing::info!(
        wall_ms = restore_ms,
        "restored; asking the workload to verify"
    );
    let after = verify(&state, 2).await?;
    let resumed = wait_for("restored workload progress", WAIT_TIMEOUT, || {
        Ok(progress(&state)?.filter(|p| p.ticks > after.ticks))
    })
    .await?;
    let r = RestoreReport {
        wall_ms: restore_ms,
        ticks_at_dump: at_dump.ticks,
        ticks_after_restore: resumed.ticks,
        nonce_before: first.nonce,
        nonce_after: after.nonce,
        verified_pages: after.pages,
        mismatched_pages: after.mismatched_pages,
    };
    tracing::info!(?r, "restore verdict");
    report.restore = Some(r.clone());
    if r.nonce_after != r.nonce_before {
        return Err(fail(
            "verify after restore",
            "the workload has a new nonce: it started again instead of being restored",
        ));
    }
    if r.mismatched_pages != 0 || r.verified_pages != o.spec.pages {
        return Err(fail(
            "verify after restore",
            format!(
                "{} of {} pages differ from what the workload wrote",
                r.mismatched_pages, r.verified_pages
            ),
        ));
    }
    if after.ticks < at_dump.ticks {
        return Err(fail(
            "verify after restore",
            format!(
                "the tick counter went back from {} to {}",
                at_dump.ticks, after.ticks
            ),
        ));
    }
    Ok(())
}

/// The tail of the CRIU log written last: the quoted error lines rarely show what a helper
/// CRIU ran (tar, for tmpfs) printed before it failed.
fn print_newest_log(work: &Path) {
    let logs = std::fs::read_dir(work)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter(|f| f.path().extension().is_some_and(|e| e == "log"))
        .filter_map(|f| Some((f.metadata().ok()?.modified().ok()?, f.path())));
    let Some((_, newest)) = logs.max() else {
        return;
    };
    let Ok(text) = std::fs::read_to_string(&newest) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    eprintln!("--- last lines of {} ---", newest.display());
    for l in &lines[lines.len().saturating_sub(40)..] {
        eprintln!("{l}");
    }
    eprintln!("---");
}

/// The pre-dump rounds, each reported with the workload's tick count right after it.
async fn precopy_rounds(
    handle: &RuncHandle,
    popts: &PrecopyOptions,
    state: &Path,
    report: &mut Report,
) -> Result<Option<u32>, ToolError> {
    let mut ticks_seen: Vec<u64> = Vec::new();
    let mut progress_error = None;
    let pre = precopy::run_precopy(handle, popts, |r| {
        match progress(state) {
            Ok(Some(p)) => ticks_seen.push(p.ticks),
            Ok(None) => ticks_seen.push(0),
            Err(e) => progress_error = Some(e),
        }
        tracing::info!(
            round = r.round,
            wall_ms = r.wall_ms,
            scanned = r.stats.pages_scanned,
            written = r.stats.pages_written,
            skipped_parent = r.stats.pages_skipped_parent,
            "pre-dump round"
        );
    })
    .await?;
    if let Some(e) = progress_error {
        return Err(e);
    }
    report.rounds = pre
        .rounds
        .iter()
        .zip(&ticks_seen)
        .map(|(r, &t)| Round {
            dump: r.clone(),
            workload_ticks: t,
        })
        .collect();
    report.stop_reason = Some(pre.reason);

    Ok(pre.last_round())
}

fn progress(state: &Path) -> Result<Option<Progress>, ToolError> {
    read_json(state, PROGRESS).map_err(|e| fail("read progress", e.to_string()))
}

fn workload_error(state: &Path) -> Result<(), ToolError> {
    match std::fs::read_to_string(state.join("error")) {
        Ok(e) => Err(fail("workload", e)),
        Err(_) => Ok(()),
    }
}

/// Asks the workload to check its whole buffer and waits for the answer.
async fn verify(state: &Path, id: u64) -> Result<Verification, ToolError> {
    write_atomic(state, REQUEST, id.to_string().as_bytes())
        .map_err(|e| fail("verify", e.to_string()))?;
    let name = result_name(id);
    let v: Verification = wait_for("verification", WAIT_TIMEOUT, || {
        workload_error(state)?;
        read_json(state, &name).map_err(|e| fail("verify", e.to_string()))
    })
    .await?;
    tracing::info!(
        id,
        pages = v.pages,
        mismatched = v.mismatched_pages,
        ms = v.ms,
        "workload verified its buffer"
    );
    Ok(v)
}

async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut poll: impl FnMut() -> Result<Option<T>, ToolError>,
) -> Result<T, ToolError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = poll()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(fail(what, format!("nothing after {} s", timeout.as_secs())));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs runc with all stdio on /dev/null: a detached container inherits runc's descriptors,
/// so pipes would never reach end-of-file. runc's own log (JSON) and, when given, CRIU's log
/// say why it failed.
async fn runc_detached(
    step: &str,
    args: &[&str],
    criu_log: Option<&Path>,
) -> Result<(), ToolError> {
    let log = Path::new(RUNC_ROOT).join(format!("{}.log", step.replace(' ', "-")));
    let _ = std::fs::remove_file(&log);
    let mut cmd = tokio::process::Command::new(RUNC);
    cmd.arg("--root")
        .arg(RUNC_ROOT)
        .arg("--log")
        .arg(&log)
        .arg("--log-format")
        .arg("json")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| ToolError::Spawn {
        step: step.into(),
        program: RUNC.into(),
        source,
    })?;
    let quote = || {
        let mut l = criu_log.map(quote_log).unwrap_or_default();
        l.extend(quote_log(&log));
        l
    };
    match tokio::time::timeout(TOOL_TIMEOUT, child.wait()).await {
        Err(_) => Err(ToolError::Timeout {
            step: step.into(),
            program: RUNC.into(),
            secs: TOOL_TIMEOUT.as_secs(),
            log: quote(),
        }),
        Ok(Err(e)) => Err(fail(step, e.to_string())),
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(ToolError::Failed {
            step: step.into(),
            program: format!("{RUNC} {}", args.first().copied().unwrap_or_default()),
            status: st.to_string(),
            log: quote(),
        }),
    }
}

/// Best effort: leaves no container behind whatever failed.
async fn cleanup() {
    let t = Duration::from_secs(30);
    let _ = run(
        "cleanup",
        RUNC,
        &["--root", RUNC_ROOT, "kill", CONTAINER_ID, "KILL"],
        t,
    )
    .await;
    let _ = run(
        "cleanup",
        RUNC,
        &["--root", RUNC_ROOT, "delete", "--force", CONTAINER_ID],
        t,
    )
    .await;
}

fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines()
                .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn mount(fstype: &str, target: &str, data: Option<&str>) -> Result<(), ToolError> {
    use nix::mount::MsFlags;
    std::fs::create_dir_all(target).map_err(|e| fail("mount", format!("{target}: {e}")))?;
    nix::mount::mount(
        Some(fstype),
        target,
        Some(fstype),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        data,
    )
    .map_err(|e| fail("mount", format!("{fstype} on {target}: {e}")))
}

/// What runc and CRIU expect of a host: /proc, /sys, /run, /tmp, /dev/pts (CRIU probes it)
/// and a cgroup hierarchy —
/// either the unified one or one v1 hierarchy per controller, as older Docker hosts have.
fn setup_mounts(cgroup: Cgroup) -> Result<(), ToolError> {
    if !Path::new("/proc/self").exists() {
        mount("proc", "/proc", None)?;
    }
    let have = mount_points();
    for (fstype, target) in [
        ("sysfs", "/sys"),
        ("tmpfs", "/run"),
        ("tmpfs", "/tmp"),
        ("devpts", "/dev/pts"),
    ] {
        if !have.iter().any(|m| m == target) {
            mount(fstype, target, None)?;
        }
    }
    if have.iter().any(|m| m == "/sys/fs/cgroup") {
        return Ok(());
    }
    match cgroup {
        Cgroup::V2 => mount("cgroup2", "/sys/fs/cgroup", None)?,
        Cgroup::V1 => {
            mount("tmpfs", "/sys/fs/cgroup", Some("mode=755"))?;
            let list = std::fs::read_to_string("/proc/cgroups")
                .map_err(|e| fail("cgroup v1", e.to_string()))?;
            for line in list.lines().filter(|l| !l.starts_with('#')) {
                let f: Vec<&str> = line.split_whitespace().collect();
                if let [name, _, _, "1"] = f.as_slice() {
                    let target = format!("/sys/fs/cgroup/{name}");
                    std::fs::create_dir_all(&target)
                        .map_err(|e| fail("cgroup v1", format!("{target}: {e}")))?;
                    nix::mount::mount(
                        Some("cgroup"),
                        target.as_str(),
                        Some("cgroup"),
                        nix::mount::MsFlags::empty(),
                        Some(*name),
                    )
                    .map_err(|e| fail("cgroup v1", format!("{name}: {e}")))?;
                }
            }
        }
    }
    // Kernel messages would interleave with the result line on the serial console.
    let _ = std::fs::write("/proc/sys/kernel/printk", "1 4 1 7");
    Ok(())
}

/// An OCI config like `runc spec` writes, minus the network namespace (CRIU would need `ip`
/// and `iptables-save` in the guest to dump one; the container shares the guest's, which has
/// only loopback) and with a cgroup namespace on v2 only, as Docker does.
fn write_config(o: &Options) -> Result<(), ToolError> {
    let s = &o.spec;
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if matches!(o.cgroup, Cgroup::V2) {
        namespaces.push(json!({"type": "cgroup"}));
    }
    let caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];
    let mut args: Vec<String> = ["/bin/ferry-precopy-guest", "workload", "--state", "/state"]
        .map(String::from)
        .into();
    for (flag, v) in [
        ("--mb", s.mb),
        ("--hot-pages", s.hot_pages),
        ("--dirty-per-tick", s.dirty_per_tick),
        ("--tick-ms", s.tick_ms),
    ] {
        args.push(flag.into());
        args.push(v.to_string());
    }
    if !s.huge_pages {
        args.push("--no-huge-pages".into());
    }
    let config = json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps, "ambient": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "precopy",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        ],
        "linux": {
            "cgroupsPath": format!("/{CONTAINER_ID}"),
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": namespaces,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    });
    let path = o.bundle.join("config.json");
    let bytes = serde_json::to_vec_pretty(&config).map_err(|e| fail("bundle", e.to_string()))?;
    std::fs::write(&path, bytes).map_err(|e| fail("bundle", format!("{}: {e}", path.display())))
}
