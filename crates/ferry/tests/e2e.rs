//! End-to-end tests: real dockerds, real CRIU, on the local test bed (`ferry testbed up`).
//!
//! They drive the `ferry` binary exactly as an operator would and check the outcome from the
//! outside: the client's own view of its connection, `docker` on both hosts, and the
//! container's network namespace. They need root; with FERRY_E2E unset they are skipped
//! locally and fail in CI (CI=true), so they can never be silently skipped there.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());
static BED: OnceLock<Value> = OnceLock::new();

fn enabled() -> bool {
    if std::env::var("FERRY_E2E").as_deref() == Ok("1") {
        return true;
    }
    if std::env::var("CI").is_ok() {
        panic!("end-to-end tests must run in CI: set FERRY_E2E=1 (scripts/test.sh does)");
    }
    eprintln!("skipping: FERRY_E2E=1 not set");
    false
}

fn ferry() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

fn workload() -> PathBuf {
    ferry().with_file_name("ferry-workload")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn bed() -> &'static Value {
    BED.get_or_init(|| {
        // Inside the soft-dirty guest (scripts/vm-e2e.sh) only hosts a and b are needed, and
        // every further dockerd costs minutes under emulation.
        let args: &[&str] = if std::env::var("FERRY_E2E_TESTBED").as_deref() == Ok("minimal") {
            &["testbed", "up", "--json"]
        } else {
            &[
                "testbed",
                "up",
                "--with-incompatible-host",
                "--with-userns-hosts",
                "--json",
            ]
        };
        let out = run(Command::new(ferry()).args(args));
        assert!(
            out.status.success(),
            "testbed up failed:\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("testbed up --json prints its description")
    })
}

fn host(name: &str) -> &'static Value {
    bed()["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no host {name}"))
}

fn addr(h: &str) -> String {
    host(h)["agent_addr"].as_str().unwrap().to_string()
}

fn client_tls() -> String {
    bed()["client_tls_dir"].as_str().unwrap().to_string()
}

fn docker(h: &str, args: &[&str]) -> Output {
    run(Command::new("/usr/bin/docker")
        .arg("-H")
        .arg(host(h)["docker_host"].as_str().unwrap())
        .args(args))
}

fn docker_ok(h: &str, args: &[&str]) -> String {
    let out = docker(h, args);
    assert!(
        out.status.success(),
        "docker {args:?} on {h} failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn inspect(h: &str, name: &str) -> Option<Value> {
    let out = docker(h, &["inspect", name]);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array()?.first().cloned()
}

fn remove_everywhere(name: &str) {
    for h in bed()["hosts"].as_array().unwrap() {
        let _ = docker(h["name"].as_str().unwrap(), &["rm", "-f", name]);
    }
}

/// `ferry migrate ... --json`: exit status, the report (if one was printed) and stderr.
fn migrate(name: &str, from: &str, to: &str, extra: &[&str]) -> (bool, Option<Value>, String) {
    let tls = client_tls();
    let mut args = vec![
        "migrate",
        name,
        "--from",
        from,
        "--to",
        to,
        "--tls-dir",
        &tls,
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = run(Command::new(ferry()).args(&args));
    let report = serde_json::from_slice(&out.stdout).ok();
    (out.status.success(), report, text(&out.stderr))
}

/// `docker run -d` on host a with a fixed address on `network`; `rest` is options then image.
fn run_on_a(name: &str, network: &str, ip: &str, rest: &[&str]) {
    let mut args = vec![
        "run",
        "-d",
        "--name",
        name,
        "--network",
        network,
        "--ip",
        ip,
    ];
    args.extend_from_slice(rest);
    docker_ok("a", &args);
}

/// Migrates `name` from host a to host b and returns the report, failing the test otherwise.
fn migrate_ok(name: &str, extra: &[&str]) -> Value {
    let (ok, report, stderr) = migrate(name, &addr("a"), &addr("b"), extra);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert!(ok, "migrate failed: {report}\n{stderr}");
    assert_no_runtime_files_left("b", name);
    report
}

/// A committed migration leaves none of the runtime wrapper's per-container files (the parked
/// restore's fifo and report, overrides, CRIU config, restore record) in the target's state.
fn assert_no_runtime_files_left(h: &str, name: &str) {
    let id = inspect(h, name).expect("the migrated container exists")["Id"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = PathBuf::from(host(h)["state_dir"].as_str().unwrap()).join("runtime");
    let left: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&id))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{} after commit: {left:?}", dir.display());
}

/// A workload client in the client namespace. Each has its own directory, and one a failed
/// test leaves behind is killed when dropped, so it can never answer for the next test.
struct Client {
    child: Child,
    stop: PathBuf,
    out: PathBuf,
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = self.out.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

static CLIENTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Client {
    fn start(kind: &str, target: &str) -> Client {
        let n = CLIENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ferry-e2e-{}-{}-{n}", kind, std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (stop, out) = (dir.join("stop"), dir.join("summary.json"));
        let child = Command::new("ip")
            .args(["netns", "exec", bed()["client_netns"].as_str().unwrap()])
            .arg(workload())
            .args([
                kind,
                "--addr",
                target,
                "--interval-ms",
                "5",
                "--duration-s",
                "600",
            ])
            .arg("--stop-file")
            .arg(&stop)
            .arg("--out")
            .arg(&out)
            .stdin(Stdio::null())
            .spawn()
            .expect("client starts");
        Client { child, stop, out }
    }

    fn finish(mut self) -> Value {
        std::fs::write(&self.stop, b"stop").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        serde_json::from_slice(&std::fs::read(&self.out).expect("client wrote a summary"))
            .expect("summary is JSON")
    }
}

fn in_client_ns(args: &[&str]) -> String {
    let out = run(Command::new("ip")
        .args(["netns", "exec", bed()["client_netns"].as_str().unwrap()])
        .arg(workload())
        .args(args));
    assert!(
        out.status.success(),
        "ferry-workload {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn settle() {
    std::thread::sleep(Duration::from_millis(1500));
}

fn record_metrics(name: &str, v: Value) {
    let path = ferry().with_file_name("e2e-metrics.json");
    let mut all: Value = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    all[name] = v;
    let _ = std::fs::write(&path, serde_json::to_vec_pretty(&all).unwrap());
}

/// ferry's and CRIU's iptables lock rules and CRIU's nftables lock tables in `pid`'s netns.
fn lock_rules(pid: u64) -> String {
    let out = run(Command::new("nsenter").args(["-t", &pid.to_string(), "-n", "iptables-save"]));
    let mut left: Vec<String> = text(&out.stdout)
        .lines()
        .filter(|l| l.contains("FERRY") || l.contains("CRIU"))
        .map(str::to_string)
        .collect();
    let tables = ferry_criu::nftables::criu_lock_tables(pid as u32)
        .unwrap_or_else(|e| panic!("listing the nftables tables of {pid}: {e}"));
    left.extend(tables.into_iter().map(|t| format!("table inet {t}")));
    left.join("\n")
}

fn assert_running_untouched(h: &str, name: &str, restart: &str) -> Value {
    let c = inspect(h, name).unwrap_or_else(|| panic!("{name} is gone from {h}"));
    assert_eq!(
        c["State"]["Running"], true,
        "{name} on {h} is not running: {}",
        c["State"]
    );
    assert_eq!(c["State"]["Paused"], false, "{name} on {h} was left paused");
    assert_eq!(
        c["HostConfig"]["RestartPolicy"]["Name"], restart,
        "restart policy on {h} was not restored"
    );
    let pid = c["State"]["Pid"].as_u64().unwrap();
    assert_eq!(
        lock_rules(pid),
        "",
        "network-lock rules left in {name}'s namespace"
    );
    c
}

#[test]
fn a_counter_server_migrates_with_its_client_connection_and_state() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip) = ("e2e-counter", "198.18.0.131");
    remove_everywhere(name);
    let image = bed()["workload_image"].as_str().unwrap();
    run_on_a(
        name,
        "ferrynet",
        ip,
        &[
            "--restart",
            "unless-stopped",
            "-l",
            "app=counter",
            "-e",
            "MODE=demo",
            image,
        ],
    );
    let before = inspect("a", name).unwrap();
    let client = Client::start("client", &format!("{ip}:7000"));
    settle();
    let report = migrate_ok(name, &["--strategy", "stop-and-copy"]);
    assert_eq!(report["outcome"], "migrated");
    assert_eq!(report["strategy"], "stop-and-copy");
    // CRIU's own statistics of the dump: everything written, nothing left lazy.
    let c = &report["criu_dump"];
    assert!(
        c["pages_written"].as_u64().unwrap() > 0 && c["pages_lazy"].as_u64() == Some(0),
        "{report}"
    );
    for p in [
        "preflight",
        "prepare",
        "freeze",
        "dump",
        "transfer",
        "restore",
        "commit",
    ] {
        assert!(
            report["phases_ms"][p].is_u64(),
            "phase {p} missing: {report}"
        );
    }
    assert!(report["bytes_sent"].as_u64().unwrap() > 0);
    settle();
    let summary = client.finish();
    assert_eq!(summary["ok"], true, "client: {summary}");
    assert_eq!(summary["continuous"], true, "counter state lost: {summary}");
    assert!(summary["replies"].as_u64().unwrap() > 100, "{summary}");
    record_metrics(
        "counter",
        serde_json::json!({"report": report, "client": summary}),
    );

    assert!(
        inspect("a", name).is_none(),
        "the source container is still on host a"
    );
    let after = inspect("b", name).expect("container exists on host b");
    assert_eq!(after["State"]["Running"], true);
    let net = |v: &Value, k: &str| v["NetworkSettings"]["Networks"]["ferrynet"][k].clone();
    assert_eq!(net(&after, "IPAddress"), ip);
    assert_eq!(net(&after, "MacAddress"), net(&before, "MacAddress"));
    for k in ["Image", "Cmd", "Entrypoint", "Labels", "WorkingDir", "User"] {
        assert_eq!(
            after["Config"][k], before["Config"][k],
            "Config.{k} differs"
        );
    }
    assert!(after["Config"]["Env"]
        .as_array()
        .unwrap()
        .contains(&Value::from("MODE=demo")));
    assert_eq!(
        after["HostConfig"]["RestartPolicy"]["Name"],
        "unless-stopped"
    );
    // The plain docker CLI owns the container on the target.
    assert_eq!(
        docker_ok("b", &["exec", name, "/bin/busybox", "echo", "inside"]).trim(),
        "inside"
    );
    assert!(docker_ok("b", &["ps", "--format", "{{.Names}}"])
        .lines()
        .any(|l| l == name));
    assert!(docker("b", &["logs", name]).status.success());
    docker_ok("b", &["stop", "-t", "2", name]);
    remove_everywhere(name);
}

#[test]
fn redis_with_100k_keys_migrates_under_a_live_client() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip) = ("e2e-redis", "198.18.0.132");
    let (target, expected) = redis_on_a(name, ip, 100_000);
    let loaded: Value = serde_json::from_str(&in_client_ns(&[
        "redis-digest",
        "--addr",
        &target,
        "--match",
        "key:*",
    ]))
    .unwrap();
    assert_eq!(
        loaded["digest"], expected["digest"],
        "load did not produce the expected data"
    );

    let client = Client::start("redis-client", &target);
    settle();
    // A shared link: `--compress auto` (the default) weighs zstd's measured speed against the
    // limit and Redis memory's measured ratio, and compresses.
    let report = migrate_ok(
        name,
        &[
            "--strategy",
            "stop-and-copy",
            "--bandwidth-limit",
            "100MiB/s",
        ],
    );
    settle();
    let summary = client.finish();
    assert_redis_intact(&target, 100_000, &expected, &summary);
    assert_eq!(report["compression"]["policy"], "auto", "{report}");
    assert!(
        matches!(
            report["compression"]["decision"].as_str(),
            Some("compressed" | "mixed")
        ),
        "{}",
        report["compression"]
    );
    assert!(
        report["bytes_uncompressed"].as_u64().unwrap() > report["bytes_sent"].as_u64().unwrap(),
        "{report}"
    );
    assert!(inspect("a", name).is_none());
    record_metrics(
        "redis",
        serde_json::json!({"report": report, "client": summary}),
    );
    remove_everywhere(name);
}

#[test]
fn a_failed_restore_on_the_target_rolls_back_and_the_client_never_notices_a_break() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip) = ("e2e-fault", "198.18.0.133");
    remove_everywhere(name);
    run_on_a(
        name,
        "ferrynet",
        ip,
        &[
            "--restart",
            "always",
            bed()["workload_image"].as_str().unwrap(),
        ],
    );
    let client = Client::start("client", &format!("{ip}:7000"));
    settle();
    let (ok, report, stderr) = migrate(
        name,
        &addr("a"),
        &addr("b"),
        &[
            "--strategy",
            "stop-and-copy",
            "--inject-fault",
            "target-restore",
        ],
    );
    assert!(!ok, "migrate must fail");
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert_eq!(report["outcome"], "rolled-back", "{report}");
    let err = &report["error"];
    assert!(err["step"].as_str().unwrap().contains("restore"), "{err}");
    assert!(
        !err["tool_log"].as_array().unwrap().is_empty(),
        "CRIU's own log lines are quoted: {err}"
    );
    assert!(
        report["rollback_errors"].is_null()
            || report["rollback_errors"].as_array().unwrap().is_empty(),
        "{report}"
    );
    assert_running_untouched("a", name, "always");
    assert!(
        inspect("b", name).is_none(),
        "a half-made container was left on host b"
    );
    settle();
    let summary = client.finish();
    assert_eq!(
        summary["ok"], true,
        "the client's connection broke: {summary}"
    );
    assert_eq!(summary["continuous"], true, "{summary}");
    remove_everywhere(name);
}

#[test]
fn peers_without_a_certificate_from_the_ca_are_refused() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rogue = std::env::temp_dir().join(format!("ferry-e2e-rogue-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&rogue);
    let out = run(Command::new(ferry())
        .args(["pki", "init", "--dir"])
        .arg(&rogue)
        .args(["--agent", "x=127.0.0.1"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rogue_client = rogue.join("client");
    let log_path = host("a")["agent_log"].as_str().unwrap().to_string();
    let log_before = std::fs::read_to_string(&log_path).unwrap_or_default().len();
    let out = run(Command::new(ferry())
        .args(["check", "--to", &addr("a"), "--tls-dir"])
        .arg(&rogue_client));
    assert!(
        !out.status.success(),
        "an agent answered a client of another CA"
    );
    let out = run(Command::new(ferry())
        .args([
            "migrate",
            "whatever",
            "--from",
            &addr("a"),
            "--to",
            &addr("b"),
            "--tls-dir",
        ])
        .arg(&rogue_client));
    assert!(!out.status.success());
    // A TLS client that trusts the agent but presents a certificate of another CA, and one that
    // presents none: both must be refused in the handshake, before any request is read.
    let real_ca = PathBuf::from(bed()["pki_dir"].as_str().unwrap())
        .join("ca")
        .join("ca.pem");
    let openssl = |with_cert: bool| -> String {
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-quiet", "-connect", &addr("a"), "-CAfile"])
            .arg(&real_ca);
        if with_cert {
            cmd.arg("-cert")
                .arg(rogue_client.join("cert.pem"))
                .arg("-key")
                .arg(rogue_client.join("key.pem"));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl runs");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            let _ = stdin.write_all(b"\0\0\0\x20\x01{\"type\":\"check\",\"cpuinfo\":null}");
            std::thread::sleep(Duration::from_millis(1500));
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.stdout.is_empty(),
            "a refused client got an answer: {:?}",
            text(&out.stdout)
        );
        text(&out.stderr)
    };
    let foreign = openssl(true);
    assert!(foreign.contains("unknown ca"), "{foreign}");
    let none = openssl(false);
    assert!(none.contains("certificate required"), "{none}");
    let log = wait_for("the agent to log both refusals", || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let new = log[log_before.min(log.len())..].to_string();
        (new.contains("UnknownIssuer") && new.contains("no certificates")).then_some(new)
    });
    let new = &log;
    assert!(
        new.contains("UnknownIssuer"),
        "the agent names the foreign certificate: {new}"
    );
    assert!(
        new.contains("no certificates"),
        "the agent names the missing certificate: {new}"
    );
    assert!(
        !new.contains("purpose=Cli"),
        "a session was opened for an unauthenticated client: {new}"
    );
    let _ = std::fs::remove_dir_all(&rogue);
}

/// Whether this kernel tracks soft-dirty pages (CRIU's pre-dump needs it; the test bed's
/// hosts share the kernel).
fn soft_dirty_here() -> bool {
    Command::new("criu")
        .args(["check", "--feature", "mem_dirty_track"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn bad_input_is_refused_with_a_clear_error_and_changes_nothing() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip) = ("e2e-bad", "198.18.0.134");
    remove_everywhere(name);
    remove_everywhere("e2e-stopped");
    let image = bed()["workload_image"].as_str().unwrap();
    run_on_a(name, "ferrynet", ip, &["--restart", "on-failure", image]);
    docker_ok("a", &["create", "--name", "e2e-stopped", image]);

    let cases: Vec<(&str, String, Vec<&str>, &str)> = vec![
        ("no-such-container", addr("b"), vec![], "no container named"),
        ("e2e-stopped", addr("b"), vec![], "not running"),
        (
            name,
            "198.18.0.99:7070".to_string(),
            vec!["--step-timeout", "5"],
            "unreachable",
        ),
        (name, addr("c"), vec![], "experimental"),
    ];
    let mut cases = cases;
    if !soft_dirty_here() {
        cases.push((
            name,
            addr("b"),
            vec!["--strategy", "pre-copy"],
            "pre-copy needs soft-dirty memory tracking on source",
        ));
        cases.push((
            name,
            addr("b"),
            vec!["--strategy", "hybrid"],
            "hybrid needs soft-dirty memory tracking on source",
        ));
    }
    for (container, to, extra, needle) in cases {
        let (ok, report, stderr) = migrate(container, &addr("a"), &to, &extra);
        assert!(!ok, "{container} → {to} must fail");
        let msg = report
            .as_ref()
            .map(|r| r["error"].to_string())
            .unwrap_or_default()
            + &stderr;
        assert!(
            msg.contains(needle),
            "{container} → {to}: expected {needle:?} in: {msg}"
        );
        if let Some(r) = &report {
            assert_eq!(r["outcome"], "rolled-back");
        }
        assert_running_untouched("a", name, "on-failure");
        for h in ["b", "c"] {
            assert!(
                inspect(h, container).is_none(),
                "{container} appeared on {h}"
            );
        }
    }
    let (ok, _, stderr) = migrate(name, &addr("a"), &addr("a"), &[]);
    assert!(!ok && stderr.contains("same agent"), "{stderr}");
    assert_eq!(
        inspect("a", "e2e-stopped").unwrap()["State"]["Status"],
        "created"
    );
    remove_everywhere(name);
    remove_everywhere("e2e-stopped");
}

#[test]
fn a_container_on_a_bridge_network_migrates_and_the_report_says_what_survives() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip) = ("e2e-bridge", "198.19.5.10");
    remove_everywhere(name);
    run_on_a(
        name,
        "ferrybr",
        ip,
        &[bed()["workload_image"].as_str().unwrap()],
    );
    let (ok, report, stderr) = migrate(name, &addr("a"), &addr("b"), &[]);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert!(ok, "{report}\n{stderr}");
    let net = &report["networks"][0];
    assert_eq!(net["driver"], "bridge");
    assert_eq!(net["external_connections_survive"], false);
    assert!(net["note"].as_str().unwrap().contains("L2"), "{net}");
    let after = inspect("b", name).unwrap();
    assert_eq!(
        after["NetworkSettings"]["Networks"]["ferrybr"]["IPAddress"],
        ip
    );
    assert_eq!(
        docker_ok("b", &["exec", name, "/bin/busybox", "echo", "ok"]).trim(),
        "ok"
    );
    remove_everywhere(name);
}

/// The client kept one connection and an unbroken counter, every loaded value is unchanged,
/// and every key the client wrote during the migration is there.
fn assert_redis_intact(target: &str, keys: u64, expected: &Value, summary: &Value) {
    assert_eq!(summary["ok"], true, "client: {summary}");
    assert_eq!(summary["continuous"], true, "{summary}");
    let digest = |pattern: &str| -> Value {
        serde_json::from_str(&in_client_ns(&[
            "redis-digest",
            "--addr",
            target,
            "--match",
            pattern,
        ]))
        .unwrap()
    };
    let after = digest("key:*");
    assert_eq!(after["keys"].as_u64(), Some(keys));
    assert_eq!(
        after["digest"], expected["digest"],
        "values changed across the migration"
    );
    assert_eq!(
        digest("live:*")["keys"],
        summary["sets"],
        "keys written during the migration are missing"
    );
}

/// Loads `keys` × 1000 B into a fresh Redis on host a and returns its address and expected digest.
fn redis_on_a(name: &str, ip: &str, keys: u64) -> (String, Value) {
    remove_everywhere(name);
    run_on_a(
        name,
        "ferrynet",
        ip,
        &[bed()["redis_image"].as_str().unwrap()],
    );
    let target = format!("{ip}:6379");
    wait_for("redis to answer", || {
        let out = run(Command::new("ip")
            .args(["netns", "exec", bed()["client_netns"].as_str().unwrap()])
            .arg(workload())
            .args(["redis-digest", "--addr", &target]));
        out.status.success().then_some(())
    });
    let keys = keys.to_string();
    in_client_ns(&[
        "redis-load",
        "--addr",
        &target,
        "--keys",
        &keys,
        "--value-size",
        "1000",
    ]);
    let expected: Value = serde_json::from_str(&in_client_ns(&[
        "expected-digest",
        "--keys",
        &keys,
        "--value-size",
        "1000",
    ]))
    .unwrap();
    (target, expected)
}

#[test]
fn post_copy_is_chosen_automatically_and_moves_230mb_of_redis_under_a_live_client() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip) = ("e2e-postcopy", "198.18.0.135");
    let (target, expected) = redis_on_a(name, ip, 200_000);
    let client = Client::start("redis-client", &target);
    settle();
    let report = migrate_ok(name, &[]);
    assert_eq!(
        report["strategy"], "post-copy",
        "auto picks post-copy where userfaultfd works: {report}"
    );
    assert!(report["strategy_reason"]
        .as_str()
        .unwrap()
        .starts_with("auto:"));
    // Pages travel through their own tunnel and are counted: about the data size, once, and
    // no more than that on the wire (compression may make it less).
    let raw = report["bytes_uncompressed"].as_u64().unwrap();
    let sent = report["bytes_sent"].as_u64().unwrap();
    assert!(
        raw > 200_000_000 && raw < 330_000_000 && sent <= raw,
        "bytes {raw} uncompressed, {sent} on the wire: {report}"
    );
    assert!(
        report["phases_ms"]["transfer"].as_u64().unwrap()
            < report["phases_ms"]["commit"].as_u64().unwrap(),
        "pages must move after the restore: {report}"
    );
    // Most of them are read ahead from the seized tasks by the source agent itself, on a
    // channel beside CRIU's page server, which is left to the faults.
    let by_reader = report["page_reader_bytes"].as_u64().unwrap_or(0);
    assert!(
        by_reader > 150_000_000 && by_reader <= raw,
        "{by_reader} bytes through the page reader: {report}"
    );
    // CRIU resets a lazy dump's counters when it starts the page server: no statistics
    // rather than zeros passed off as the dump's.
    assert!(report["criu_dump"].is_null(), "{report}");
    // The report says where the pause went, from both sides.
    for step in [
        "source_freeze_cgroup",
        "source_criu_dump",
        "source_settle",
        "target_docker_start",
        "target_lazy_pages_daemon",
    ] {
        assert!(
            report["downtime_steps_ms"][step].is_u64(),
            "{step} missing from downtime_steps_ms: {report}"
        );
    }
    // CRIU's logs outlive the migration's scratch directories, and the restore read the
    // configuration ferry handed it through the bundle (its nftables network lock).
    let id = report["migration_id"].as_str().unwrap();
    let logs = |h: &str| {
        PathBuf::from(host(h)["state_dir"].as_str().unwrap())
            .join("logs")
            .join(id)
    };
    assert!(logs("a").join("source-dump.log").is_file(), "{report}");
    let restore_log = std::fs::read_to_string(logs("b").join("target-restore.log"))
        .expect("the target keeps CRIU's restore log");
    assert!(
        restore_log.contains("Parsing config file") && restore_log.contains(".criu.conf"),
        "CRIU did not read ferry's configuration file"
    );
    assert!(logs("b").join("target-lazy-pages.log").is_file());
    // Docker's start path ran before the pause, into a namespace the wrapper wired, and CRIU
    // ran ferry's action script to open it before resume.
    assert_eq!(report["prewired_netns"], true, "{report}");
    assert_eq!(report["restore_parked"], true, "{report}");
    // That action also announced the container's address as its tasks resumed, before the
    // rest of `docker start`.
    assert!(
        report["announced_at_resume"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(&format!("eth0:{ip}")))),
        "{report}"
    );
    // scripts/install-deps.sh builds CRIU with patches/criu: the lazy pages stay in the frozen
    // source and are read on request, not spliced into pipes inside the pause.
    assert_eq!(report["lazy_pages_read"], true, "{report}");
    // Both CRIUs are built with libnftables: the dump takes the nftables lock, so the restore
    // unlocks in one transaction instead of five iptables-restore runs; the tmpfs mounts
    // Docker masks paths with are empty and cross without tar (patches/criu).
    assert_eq!(report["network_lock_nftables"], true, "{report}");
    // The pre-resume action stamped when the tasks were let go, inside docker start.
    let steps = &report["downtime_steps_ms"];
    assert!(
        steps["target_resumed_within_docker_start"].is_u64(),
        "no resume stamp in {steps}"
    );
    assert!(
        restore_log.contains("was empty: nothing to extract"),
        "every tmpfs went through tar"
    );
    assert!(
        restore_log.contains("criu-action.sh") && restore_log.contains("Found id extRootNetNS"),
        "CRIU did not restore into the wired namespace through ferry's action script"
    );
    settle();
    let summary = client.finish();
    assert_redis_intact(&target, 200_000, &expected, &summary);
    assert!(
        inspect("a", name).is_none(),
        "the source is removed once every page arrived"
    );
    assert_eq!(inspect("b", name).unwrap()["State"]["Running"], true);
    record_metrics(
        "post-copy",
        serde_json::json!({"report": report, "client": summary}),
    );
    remove_everywhere(name);
}

#[test]
fn a_post_copy_that_fails_before_the_target_resumes_rolls_back_with_connections_intact() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip) = ("e2e-postcopy-fault", "198.18.0.136");
    let (target, expected) = redis_on_a(name, ip, 20_000);
    let client = Client::start("redis-client", &target);
    settle();
    let (ok, report, stderr) = migrate(
        name,
        &addr("a"),
        &addr("b"),
        &[
            "--strategy",
            "post-copy",
            "--inject-fault",
            "target-restore",
        ],
    );
    assert!(!ok);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert_eq!(report["outcome"], "rolled-back", "{report}");
    assert!(
        !report["error"]["tool_log"].as_array().unwrap().is_empty(),
        "{report}"
    );
    assert_running_untouched("a", name, "no");
    assert!(inspect("b", name).is_none());
    settle();
    let summary = client.finish();
    assert_eq!(
        summary["ok"], true,
        "the connection broke on rollback: {summary}"
    );
    let after: Value = serde_json::from_str(&in_client_ns(&[
        "redis-digest",
        "--addr",
        &target,
        "--match",
        "key:*",
    ]))
    .unwrap();
    assert_eq!(after["digest"], expected["digest"]);
    remove_everywhere(name);
}

/// Sets a `user.` extended attribute on a file inside a running container, from the host
/// (busybox has no setfattr), through the container's root as seen from its init process.
fn set_xattr_in(h: &str, name: &str, path: &str, key: &str, value: &str) {
    let pid = inspect(h, name).unwrap()["State"]["Pid"].as_u64().unwrap();
    let p = std::ffi::CString::new(format!("/proc/{pid}/root{path}")).unwrap();
    let k = std::ffi::CString::new(key).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            k.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {path}: {}",
        std::io::Error::last_os_error()
    );
}

fn get_xattr_in(h: &str, name: &str, path: &str, key: &str) -> Option<String> {
    let pid = inspect(h, name).unwrap()["State"]["Pid"].as_u64().unwrap();
    let p = std::ffi::CString::new(format!("/proc/{pid}/root{path}")).unwrap();
    let k = std::ffi::CString::new(key).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let n = unsafe { libc::lgetxattr(p.as_ptr(), k.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then(|| String::from_utf8_lossy(&buf[..n as usize]).into_owned())
}

/// Directory sizes and block counts depend on a directory's history, not its content, so the
/// listing leaves them out; `srv/ghostdir` is listed without its mtime because CRIU re-creates
/// and unlinks the deleted-but-open file there during the restore, which the kernel records.
///
/// The issue's whole picture in one container: it wrote, changed and deleted files in its
/// rootfs (modes, owners, times, a hard link, a symlink, a sparse file, an xattr) and in a
/// named volume, keeps a deleted file open, has a tmpfs with content, and runs from an image
/// the target lacks. After the migration the rootfs diff, a listing of every changed path's
/// metadata and content, the volume's manifest and the tmpfs content match the source's, the
/// process still reads its deleted-but-open file, and the client's connection survived.
#[test]
fn everything_the_container_owns_arrives_on_a_host_without_its_image() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip, image, vol) = (
        "e2e-layer",
        "198.18.0.137",
        "e2e-layer-image:1",
        "e2e-layer-vol",
    );
    remove_everywhere(name);
    remove_everywhere("e2e-layer-src");
    for h in ["a", "b"] {
        let _ = docker(h, &["rmi", "-f", image]);
        let _ = docker(h, &["volume", "rm", "-f", vol]);
    }
    let base = bed()["workload_image"].as_str().unwrap();
    docker_ok(
        "a",
        &["run", "--name", "e2e-layer-src", "--network", "none", "--entrypoint", "/bin/sh", base, "-c",
          "mkdir -p /srv/keep && echo in-image > /srv/keep/image.txt && echo gone-soon > /srv/keep/delete-me.txt"],
    );
    docker_ok("a", &["commit", "e2e-layer-src", image]);
    let image_id = docker_ok("a", &["image", "inspect", "--format", "{{.Id}}", image])
        .trim()
        .to_string();
    assert!(
        !docker("b", &["image", "inspect", &image_id])
            .status
            .success(),
        "host b must lack the image"
    );

    let bb = "/bin/busybox";
    let script = format!(
        "set -e; mkdir -p /srv/dir && echo created > /srv/dir/new.txt && echo appended >> /etc/passwd \
         && rm /bin/false /srv/keep/delete-me.txt && echo changed >> /srv/keep/image.txt \
         && rm -rf /srv/keep && mkdir /srv/keep && echo opaque-now > /srv/keep/only.txt \
         && echo mode > /srv/dir/mode.txt && {bb} chmod 640 /srv/dir/mode.txt && {bb} chown 1234:5678 /srv/dir/mode.txt \
         && {bb} touch -d '2001-02-03 04:05:06' /srv/dir/mode.txt \
         && echo linked > /srv/dir/hard1 && {bb} ln /srv/dir/hard1 /srv/dir/hard2 && {bb} ln -s ../dir/new.txt /srv/dir/sym \
         && {bb} dd if=/dev/zero of=/srv/dir/sparse bs=1 count=1 seek=67108863 2>/dev/null \
         && echo xattr > /srv/dir/xattr.txt \
         && echo vol-first > /data/first.txt && echo vol-gone > /data/gone.txt && rm /data/gone.txt \
         && mkdir -p /data/sub && {bb} dd if=/dev/urandom of=/data/sub/blob bs=65536 count=16 2>/dev/null \
         && echo in-tmpfs > /scratch/note.txt \
         && mkdir /srv/ghostdir && echo ghost-content > /srv/ghostdir/ghost.txt \
         && exec 3</srv/ghostdir/ghost.txt && rm /srv/ghostdir/ghost.txt \
         && exec /usr/local/bin/ferry-workload serve --port 7000"
    );
    run_on_a(
        name,
        "ferrynet",
        ip,
        &[
            "-v",
            &format!("{vol}:/data"),
            "--tmpfs",
            "/scratch",
            "--entrypoint",
            "/bin/sh",
            image,
            "-c",
            &script,
        ],
    );
    wait_for("the server to listen", || {
        let tcp = docker_ok("a", &["exec", name, "/bin/cat", "/proc/net/tcp"]);
        tcp.lines()
            .any(|l| l.contains(":1B58 00000000:0000 0A"))
            .then_some(())
    });
    let client = Client::start("client", &format!("{ip}:7000"));
    settle();
    set_xattr_in("a", name, "/srv/dir/xattr.txt", "user.ferry", "carried");
    let listing = |h: &str| -> String {
        docker_ok(
            h,
            &["exec", name, "/bin/sh", "-c", &format!(
                "cd / && {bb} find srv data scratch etc/passwd | {bb} sort | while read p; do \
                 if [ \"$p\" = srv/ghostdir ]; then {bb} stat -c '%n %F %a %u:%g %h' \"$p\"; \
                 elif [ -d \"$p\" ]; then {bb} stat -c '%n %F %a %u:%g %Y %h' \"$p\"; \
                 else {bb} stat -c '%n %F %a %u:%g %s %Y %h %b' \"$p\"; fi; done; \
                 {bb} find srv data scratch -type f | {bb} sort | while read p; do {bb} md5sum \"$p\"; done; \
                 {bb} stat -c %i srv/dir/hard1 srv/dir/hard2 | {bb} uniq | {bb} wc -l; \
                 {bb} readlink srv/dir/sym; cat /proc/1/fd/3; ls /bin/false 2>&1 | head -c 20; echo")],
        )
    };
    let diff = |h: &str| -> String {
        let mut lines: Vec<String> = docker_ok(h, &["diff", name])
            .lines()
            .map(str::to_string)
            .collect();
        lines.sort();
        lines.join("\n")
    };
    let (before, diff_before) = (listing("a"), diff("a"));
    let inspect_before = inspect("a", name).unwrap();
    for needle in [
        "srv/dir/sparse regular file 644 0:0 67108864",
        "ghost-content",
        "scratch/note.txt regular file 644 0:0 9",
        "srv/dir/mode.txt regular file 640 1234:5678 5 981173106",
    ] {
        assert!(
            before.contains(needle),
            "setup: {needle:?} missing in:\n{before}"
        );
    }
    let report = migrate_ok(name, &["--strategy", "stop-and-copy"]);
    assert_eq!(
        docker_ok("b", &["image", "inspect", "--format", "{{.Id}}", &image_id]).trim(),
        image_id,
        "the image arrived"
    );
    let after = listing("b");
    assert_eq!(after, before, "files, volume or tmpfs differ on the target");
    assert_eq!(diff("b"), diff_before, "docker diff differs on the target");
    let inspect_after = inspect("b", name).unwrap();
    let mut diffs = Vec::new();
    diff_json(
        "",
        &without_own_alias(inspect_before.clone()),
        &without_own_alias(inspect_after.clone()),
        &mut diffs,
    );
    assert!(
        diffs.is_empty(),
        "inspect differs beyond the listed fields:\n{}",
        diffs.join("\n")
    );
    let mounts = |v: &Value| -> Vec<String> {
        let mut m: Vec<String> = v["Mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                format!(
                    "{} {} {} {}",
                    m["Type"], m["Name"], m["Destination"], m["RW"]
                )
            })
            .collect();
        m.sort();
        m
    };
    assert_eq!(mounts(&inspect_after), mounts(&inspect_before));
    assert_eq!(
        inspect_after["HostConfig"]["Tmpfs"],
        inspect_before["HostConfig"]["Tmpfs"]
    );
    assert_eq!(
        get_xattr_in("b", name, "/srv/dir/xattr.txt", "user.ferry").as_deref(),
        Some("carried")
    );
    let summary = client.finish();
    assert_eq!(summary["ok"], true, "{summary}");
    record_metrics(
        "everything_arrives",
        serde_json::json!({"report": report, "client": summary}),
    );
    remove_everywhere(name);
    remove_everywhere("e2e-layer-src");
    for h in ["a", "b"] {
        let _ = docker(h, &["rmi", "-f", &image_id]);
        let _ = docker(h, &["volume", "rm", "-f", vol]);
    }
}

/// Inspect fields that must differ between the container that left and the one that arrived;
/// everything else has to be equal.
const INSPECT_DIFFERS: &[(&str, &str)] = &[
    ("Id", "a new container on the target host"),
    ("Created", "creation time of the target container"),
    ("State", "pids, start times and health history are per process run"),
    ("ResolvConfPath", "host path under the target's data root, named by the new ID"),
    ("HostnamePath", "same"),
    ("HostsPath", "same"),
    ("LogPath", "same"),
    ("GraphDriver", "the target's own overlay2 layer directories"),
    ("RestartCount", "counts restarts on this host only"),
    ("HostConfig.Runtime", "the target restores through ferry's runc-wrapping runtime"),
    ("Config.Image", "the image reference: the ID on the target unless the same name resolves to it (it does here)"),
    ("NetworkSettings.SandboxID", "network sandbox of the target host"),
    ("NetworkSettings.SandboxKey", "same"),
    ("NetworkSettings.Networks.*.NetworkID", "network IDs are per host; names are shared"),
    ("NetworkSettings.Networks.*.EndpointID", "endpoint of the target host"),
    ("NetworkSettings.Networks.*.IPAMConfig", "the target pins the address the source had been given"),
    ("NetworkSettings.Networks.*.DriverOpts", "null vs empty map across create paths"),
    ("Mounts", "volume Source paths lie under each host's data root; type, name, destination and mode are compared separately"),
    ("Config.MacAddress", "below API 1.44 the only place a create can pin the MAC; the endpoint's MAC is compared"),
];

/// Docker adds each container's own short ID to its network aliases; that one must differ.
/// Docker adds a container's short ID, and on the target also its hostname (the source's short
/// ID unless one was set), as network aliases of its own: neither is the operator's.
fn without_own_alias(mut v: Value) -> Value {
    let short: String = v["Id"].as_str().unwrap_or("").chars().take(12).collect();
    let hostname = v["Config"]["Hostname"].as_str().unwrap_or("").to_string();
    if let Some(nets) = v
        .pointer_mut("/NetworkSettings/Networks")
        .and_then(|n| n.as_object_mut())
    {
        for ep in nets.values_mut() {
            if let Some(aliases) = ep.get_mut("Aliases").and_then(|a| a.as_array_mut()) {
                aliases.retain(|a| {
                    a.as_str() != Some(short.as_str()) && a.as_str() != Some(hostname.as_str())
                });
            }
        }
    }
    v
}

fn ignored(path: &str) -> bool {
    INSPECT_DIFFERS.iter().any(|(p, _)| {
        let pat: Vec<&str> = p.split('.').collect();
        let got: Vec<&str> = path.split('.').collect();
        got.len() >= pat.len() && pat.iter().zip(&got).all(|(a, b)| *a == "*" || a == b)
    })
}

fn diff_json(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    if !path.is_empty() && ignored(path) {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff_json(
                    &p,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("{path}: {a} → {b}")),
        _ => {}
    }
}

#[test]
fn the_target_container_is_configured_like_the_source_field_by_field() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip) = ("e2e-config", "198.18.0.138");
    remove_everywhere(name);
    run_on_a(
        name,
        "ferrynet",
        ip,
        &[
            "--network-alias",
            "cfg-alias",
            "--restart",
            "on-failure:3",
            "-l",
            "tier=cache",
            "-l",
            "owner=ops",
            "-e",
            "A=1",
            "-e",
            "B=two words",
            "--workdir",
            "/tmp",
            "--user",
            "0:0",
            "--hostname",
            "cfg-host",
            "--cap-add",
            "NET_ADMIN",
            "--cap-drop",
            "MKNOD",
            "--ulimit",
            "nofile=1024:2048",
            "--sysctl",
            "net.ipv4.tcp_keepalive_time=600",
            "--memory",
            "256m",
            "--cpu-shares",
            "512",
            "--pids-limit",
            "200",
            "--log-opt",
            "max-size=1m",
            "--health-cmd",
            "/bin/true",
            "--health-interval",
            "30s",
            "--stop-signal",
            "SIGINT",
            "--stop-timeout",
            "7",
            bed()["workload_image"].as_str().unwrap(),
        ],
    );
    let before = inspect("a", name).unwrap();
    migrate_ok(name, &["--strategy", "stop-and-copy"]);
    let after = inspect("b", name).unwrap();
    let mut diffs = Vec::new();
    diff_json(
        "",
        &without_own_alias(before.clone()),
        &without_own_alias(after.clone()),
        &mut diffs,
    );
    assert!(
        diffs.is_empty(),
        "inspect differs beyond the listed fields:\n{}",
        diffs.join("\n")
    );
    // The ignored fields are ignored for a reason, not hiding a loss.
    assert_eq!(after["State"]["Running"], true);
    assert_eq!(
        after["NetworkSettings"]["Networks"]["ferrynet"]["IPAddress"],
        ip
    );
    remove_everywhere(name);
}

#[test]
fn a_target_without_the_image_gets_it_from_the_source() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip, image) = ("e2e-image", "198.18.0.139", "e2e-only-on-a:1");
    remove_everywhere(name);
    remove_everywhere("e2e-image-src");
    for h in ["a", "b"] {
        let _ = docker(h, &["rmi", "-f", image]);
    }
    let base = bed()["workload_image"].as_str().unwrap();
    docker_ok(
        "a",
        &[
            "run",
            "--name",
            "e2e-image-src",
            "--network",
            "none",
            "--entrypoint",
            "/bin/sh",
            base,
            "-c",
            "echo from-a-only > /image-layer.txt",
        ],
    );
    docker_ok(
        "a",
        &[
            "commit",
            "--change",
            r#"ENTRYPOINT ["/usr/local/bin/ferry-workload","serve","--port","7000"]"#,
            "e2e-image-src",
            image,
        ],
    );
    let id = docker_ok("a", &["image", "inspect", "--format", "{{.Id}}", image])
        .trim()
        .to_string();
    assert!(
        !docker("b", &["image", "inspect", &id]).status.success(),
        "host b must lack the image"
    );
    run_on_a(name, "ferrynet", ip, &[image]);
    let client = Client::start("client", &format!("{ip}:7000"));
    settle();
    migrate_ok(name, &["--strategy", "stop-and-copy"]);
    assert_eq!(
        docker_ok("b", &["image", "inspect", "--format", "{{.Id}}", &id]).trim(),
        id,
        "the same image arrived"
    );
    assert_eq!(
        docker_ok("b", &["exec", name, "/bin/cat", "/image-layer.txt"]).trim(),
        "from-a-only"
    );
    let summary = client.finish();
    assert_eq!(summary["ok"], true, "{summary}");
    remove_everywhere(name);
    remove_everywhere("e2e-image-src");
    for h in ["a", "b"] {
        let _ = docker(h, &["rmi", "-f", &id]);
    }
}

#[test]
fn a_named_volume_written_during_the_migration_arrives_complete() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip, vol) = ("e2e-volume", "198.18.0.141", "e2e-vol");
    remove_everywhere(name);
    for h in ["a", "b"] {
        let _ = docker(h, &["volume", "rm", "-f", vol]);
    }
    // Writes a file and 8 MiB once, then keeps rewriting a counter while it runs. The counter is
    // replaced by a rename so that a reader never meets it truncated but not yet rewritten.
    let script = "echo first > /data/first.txt && /bin/busybox dd if=/dev/urandom of=/data/big.bin bs=1048576 count=8 2>/dev/null \
        && (i=0; while true; i=$((i+1)); do echo $i > /data/counter.tmp; /bin/busybox mv /data/counter.tmp /data/counter.txt; /bin/busybox usleep 5000; done) & \
        exec /usr/local/bin/ferry-workload serve --port 7000";
    run_on_a(
        name,
        "ferrynet",
        ip,
        &[
            "-v",
            &format!("{vol}:/data"),
            "--entrypoint",
            "/bin/sh",
            bed()["workload_image"].as_str().unwrap(),
            "-c",
            script,
        ],
    );
    let client = Client::start("client", &format!("{ip}:7000"));
    settle();
    let sum = |h: &str| {
        docker_ok(
            h,
            &[
                "exec",
                name,
                "/bin/busybox",
                "md5sum",
                "/data/big.bin",
                "/data/first.txt",
            ],
        )
    };
    let before = sum("a");
    // Random volume data: nothing to gain from compression, and a limit low enough to matter.
    let limit = 4u64 << 20;
    let report = migrate_ok(
        name,
        &[
            "--strategy",
            "stop-and-copy",
            "--compress",
            "off",
            "--bandwidth-limit",
            "4MiB/s",
        ],
    );
    assert!(report["phases_ms"]["precopy"].is_u64(), "{report}");
    assert_eq!(report["compression"]["decision"], "off", "{report}");
    assert_eq!(report["bandwidth"]["limit_bytes_per_s"], limit, "{report}");
    assert!(
        report["bandwidth"]["paced_ms"].as_u64().unwrap() > 0,
        "{report}"
    );
    let bytes = report["bytes_sent"].as_u64().unwrap();
    assert!(bytes > 8 << 20, "{report}");
    let sending_ms = report["phases_ms"]["precopy"].as_u64().unwrap()
        + report["phases_ms"]["transfer"].as_u64().unwrap();
    assert!(
        sending_ms * limit >= bytes * 1000 * 9 / 10,
        "{bytes} bytes went out in {sending_ms} ms, faster than the {limit} B/s limit allows"
    );
    let vols = report["volumes"]
        .as_array()
        .expect("volume figures in the report");
    assert_eq!(vols[0]["name"], vol);
    assert!(
        vols[0]["first_pass_bytes"].as_u64().unwrap() > 8 << 20,
        "{report}"
    );
    assert_eq!(sum("b"), before, "volume content differs on the target");
    // The counter keeps counting from where it was: the loop was migrated with its volume.
    let c1: u64 = docker_ok("b", &["exec", name, "/bin/cat", "/data/counter.txt"])
        .trim()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let c2: u64 = docker_ok("b", &["exec", name, "/bin/cat", "/data/counter.txt"])
        .trim()
        .parse()
        .unwrap();
    assert!(c2 > c1 && c1 > 10, "counter {c1} → {c2}");
    assert!(docker("b", &["volume", "inspect", vol]).status.success());
    let summary = client.finish();
    assert_eq!(summary["ok"], true, "{summary}");
    remove_everywhere(name);
    for h in ["a", "b"] {
        let _ = docker(h, &["volume", "rm", "-f", vol]);
    }
}

/// Starts `ferry migrate --strategy post-copy` of `name` from a to b and returns it once the
/// target runs the container, pages still on their way.
fn post_copy_until_resumed(name: &str, extra: &[&str]) -> std::process::Child {
    let tls = client_tls();
    let (from, to) = (addr("a"), addr("b"));
    let child = Command::new(ferry())
        .args([
            "migrate",
            name,
            "--from",
            &from,
            "--to",
            &to,
            "--tls-dir",
            &tls,
        ])
        .args(["--strategy", "post-copy"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the target to resume the container", || {
        inspect("b", name)
            .filter(|c| c["State"]["Running"] == true)
            .map(|_| ())
    });
    child
}

/// The known risk of post-copy: once the target runs, the source's memory exists only as pages
/// in flight. A source agent that dies then must be reported, and the target container stopped
/// rather than left spinning on missing pages. Stop-and-copy (or pre-copy) is the safe choice.
#[test]
fn a_post_copy_whose_source_agent_dies_mid_transfer_is_reported_and_the_target_stopped() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip) = ("e2e-postcopy-death", "198.18.0.142");
    // ~460 MB so the pages take seconds to arrive after the restore.
    let _ = redis_on_a(name, ip, 400_000);
    let b_log = host("b")["agent_log"].as_str().unwrap().to_string();
    let b_log_before = std::fs::read_to_string(&b_log).unwrap_or_default().len();
    let child = post_copy_until_resumed(name, &[]);
    let pidfile =
        PathBuf::from(host("a")["exec_root"].as_str().unwrap()).with_file_name("agent.pid");
    let pid = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .to_string();
    assert!(run(Command::new("kill").args(["-9", &pid]))
        .status
        .success());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "the CLI must not report success");
    assert!(
        stderr.contains("lost the source agent")
            && (stderr.contains("during commit") || stderr.contains("during restore")),
        "{stderr}"
    );
    assert!(stderr.contains("finishes on its own"), "{stderr}");
    let log = wait_for("the target to report the lost pages", || {
        let log = std::fs::read_to_string(&b_log).unwrap_or_default();
        let new = log[b_log_before.min(log.len())..].to_string();
        new.contains("not every page arrived").then_some(new)
    });
    assert!(log.contains("the target container was stopped"), "{log}");
    wait_for("the target container to be stopped", || {
        inspect("b", name)
            .filter(|c| c["State"]["Running"] == false)
            .map(|_| ())
    });
    // Bring the source agent back for the tests that follow.
    let up = run(Command::new(ferry()).args(["testbed", "up", "--with-incompatible-host"]));
    assert!(up.status.success(), "{}", text(&up.stderr));
    remove_everywhere(name);
}

/// The freezer state of the cgroup of `pid` (v1 `freezer.state`, or v2 `cgroup.freeze` as
/// FROZEN/THAWED).
fn freezer_states(pid: u64) -> Vec<String> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut out = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrl, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        if ctrl == "freezer" {
            if let Ok(s) =
                std::fs::read_to_string(format!("/sys/fs/cgroup/freezer{path}/freezer.state"))
            {
                out.push(s.trim().to_string());
            }
        } else if ctrl.is_empty() {
            if let Ok(s) = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cgroup.freeze")) {
                out.push(if s.trim() == "1" {
                    "FROZEN".into()
                } else {
                    "THAWED".into()
                });
            }
        }
    }
    out
}

/// The CRIU process serving a post-copy's pages on a source: the child of the `runc checkpoint
/// --lazy-pages` that the source agent started.
fn lazy_page_server() -> Option<u32> {
    let cmdline = |pid: &str| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default()
    };
    let procs: Vec<String> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    let runc: Vec<&String> = procs
        .iter()
        .filter(|p| {
            let c = cmdline(p);
            c.contains(" checkpoint ") && c.contains("--lazy-pages")
        })
        .collect();
    procs.iter().find_map(|p| {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let after = stat.rsplit_once(") ")?.1;
        let ppid = after.split_whitespace().nth(1)?;
        (stat.contains("(criu)") && runc.iter().any(|r| r.as_str() == ppid))
            .then(|| p.parse().ok())
            .flatten()
    })
}

/// The page server dying once the target runs (the source agent lives on): the report's
/// outcome is `pages-lost`, its error says how much of the memory had arrived and how much is
/// lost, nothing is resumed or rolled back, and both containers are left stopped.
#[test]
fn a_post_copy_whose_page_server_dies_after_the_resume_reports_pages_lost_with_amounts() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip) = ("e2e-postcopy-lost", "198.18.0.143");
    let _ = redis_on_a(name, ip, 400_000);
    let child = post_copy_until_resumed(name, &["--json"]);
    let server = wait_for("the source's page server", lazy_page_server);
    assert!(run(Command::new("kill").args(["-9", &server.to_string()]))
        .status
        .success());
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the CLI must not report success");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} / {}", text(&out.stdout), text(&out.stderr)));
    assert_eq!(report["outcome"], "pages-lost", "{report}");
    let err = report["error"]["message"].as_str().unwrap_or_default();
    assert!(err.contains("not every page arrived"), "{report}");
    assert!(err.contains("MiB are lost"), "{report}");
    assert!(err.contains("the target container was stopped"), "{report}");
    // Some pages had reached the target and some had not: the figures are real, not zero.
    let lost: f64 = err
        .split(" MiB are lost")
        .next()
        .and_then(|h| h.rsplit("; ").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no lost figure in {err}"));
    assert!(lost > 0.0, "{err}");
    assert!(
        report["rollback_errors"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "nothing is rolled back, so nothing fails to: {report}"
    );
    let target = inspect("b", name).expect("the target container is kept");
    assert_eq!(target["State"]["Running"], false, "{target}");
    // CRIU let the source's tasks go when it died: they are frozen again, not serving a
    // stale copy next to the target, and not gone.
    let source = inspect("a", name).expect("the source container is kept");
    let pid = source["State"]["Pid"].as_u64().unwrap_or(0);
    assert!(pid > 0, "the source's processes live: {source}");
    let states = freezer_states(pid);
    assert!(
        states.iter().all(|s| s == "FROZEN") && !states.is_empty(),
        "{states:?}"
    );
    let warnings = report["warnings"].to_string();
    assert!(warnings.contains("kept frozen"), "{warnings}");
    remove_everywhere(name);
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Runs a PostgreSQL client (`psql`, `pgbench`) from the host's packages in the client
/// namespace, against the server at `ip`.
fn pg_client(tool: &str, ip: &str, args: &[&str]) -> Output {
    run(Command::new("ip")
        .args(["netns", "exec", bed()["client_netns"].as_str().unwrap()])
        .arg(format!("{PG_BIN}/{tool}"))
        .args(["-h", ip, "-U", "postgres"])
        .args(args))
}

fn pg_query(ip: &str, sql: &str) -> Option<String> {
    let out = pg_client("psql", ip, &["-d", "postgres", "-Atc", sql]);
    out.status
        .success()
        .then(|| text(&out.stdout).trim().to_string())
}

fn run_postgres(h: &str, name: &str, ip: &str, volume: Option<&str>) {
    let image = bed()["postgres_image"]
        .as_str()
        .expect("the test bed has a PostgreSQL image (testbed up --with-userns-hosts)");
    let mount = volume.map(|v| format!("{v}:/var/lib/postgresql/data"));
    let mut args = vec![
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "ferrynet",
        "--ip",
        ip,
    ];
    if let Some(m) = &mount {
        args.extend(["-v", m.as_str()]);
    }
    args.push(image);
    docker_ok(h, &args);
    wait_for("PostgreSQL to accept connections", || {
        pg_query(ip, "select 1").filter(|v| v == "1")
    });
}

/// A real database under a real client: PostgreSQL (which refuses to run as root, so its
/// processes are uid 999) migrated by stop-and-copy while pgbench's four connections write.
/// Root here lacks CAP_SYS_RESOURCE, so CRIU can only dump it inside a user namespace owned by
/// root: on hosts without userns-remap preflight must say so, and between a remapped and a
/// plain daemon ferry must refuse, both before touching anything.
#[test]
fn postgresql_under_pgbench_migrates_with_every_committed_row_and_its_connections() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (plain, plain_ip) = ("e2e-pg-plain", "198.18.0.150");
    let (name, ip, vol) = ("e2e-pg", "198.18.0.151", "e2e-pgdata");
    remove_everywhere(plain);
    remove_everywhere(name);
    for h in ["d", "e"] {
        let _ = docker(h, &["volume", "rm", "-f", vol]);
    }

    run_postgres("a", plain, plain_ip, None);
    let (ok, report, stderr) = migrate(plain, &addr("a"), &addr("b"), &[]);
    let msg = report.map(|r| r["error"].to_string()).unwrap_or_default() + &stderr;
    assert!(
        !ok,
        "a uid-999 container must be refused on a host without userns-remap"
    );
    for needle in [
        "non-root uids",
        "CAP_SYS_RESOURCE",
        "userns-remap",
        "postgres (pid",
    ] {
        assert!(msg.contains(needle), "expected {needle:?} in: {msg}");
    }
    assert_running_untouched("a", plain, "no");
    assert!(inspect("b", plain).is_none());
    remove_everywhere(plain);

    run_postgres("d", name, ip, Some(vol));
    let init = pg_client("pgbench", ip, &["-i", "-s", "2", "-q", "postgres"]);
    assert!(init.status.success(), "pgbench -i: {}", text(&init.stderr));

    let (ok, report, stderr) = migrate(name, &addr("d"), &addr("a"), &[]);
    let msg = report.map(|r| r["error"].to_string()).unwrap_or_default() + &stderr;
    assert!(
        !ok && msg.contains("user namespace mapping differs"),
        "{msg}"
    );
    assert_running_untouched("d", name, "no");
    assert!(inspect("a", name).is_none());

    // pgbench writes a line per committed transaction into its log (cwd), without reconnecting:
    // a connection that broke would abort its client and fail the run.
    let dir = std::env::temp_dir().join(format!("ferry-e2e-pgbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bench = Command::new("ip")
        .args(["netns", "exec", bed()["client_netns"].as_str().unwrap()])
        .arg(format!("{PG_BIN}/pgbench"))
        .args([
            "-h", ip, "-U", "postgres", "-c", "4", "-T", "16", "-n", "-l", "postgres",
        ])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench starts");
    std::thread::sleep(Duration::from_secs(4));
    let (ok, report, stderr) = migrate(
        name,
        &addr("d"),
        &addr("e"),
        &["--strategy", "stop-and-copy"],
    );
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert!(ok, "migrate failed: {report}\n{stderr}");
    let migrated_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let bench = bench.wait_with_output().expect("pgbench finishes");
    assert!(
        bench.status.success(),
        "pgbench failed after the migration: {}\n{}",
        text(&bench.stdout),
        text(&bench.stderr)
    );
    let mut committed = 0u64;
    let mut latest = 0u64;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        for line in std::fs::read_to_string(e.path()).unwrap().lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert!(f.len() >= 6, "pgbench log line {line:?}");
            assert_ne!(f[2], "failed", "a transaction failed: {line}");
            committed += 1;
            latest = latest.max(f[4].parse().unwrap());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(committed > 0);
    assert!(
        latest > migrated_at,
        "no transaction committed after the migration (last at {latest}, migrated at {migrated_at})"
    );
    let rows: u64 = pg_query(ip, "select count(*) from pgbench_history")
        .expect("the migrated server answers")
        .parse()
        .unwrap();
    assert_eq!(rows, committed, "history rows vs committed transactions");
    let c = inspect("e", name).expect("the container is on e");
    assert_eq!(c["State"]["Running"], true);
    assert!(
        inspect("d", name).is_none(),
        "the source container is gone after commit"
    );
    let ps = docker_ok("e", &["exec", name, "/bin/ps", "-o", "user,args"]);
    assert!(ps.contains("postgres: checkpointer"), "{ps}");
    record_metrics(
        "postgres_pgbench",
        serde_json::json!({"committed": committed, "report": report}),
    );
    remove_everywhere(name);
    for h in ["d", "e"] {
        let _ = docker(h, &["volume", "rm", "-f", vol]);
    }
}

fn volume_files(h: &str, vol: &str) -> String {
    let image = bed()["workload_image"].as_str().unwrap();
    let mount = format!("{vol}:/v");
    let out = docker_ok(
        h,
        &[
            "run", "--rm", "--network", "none", "-v", &mount, "--entrypoint", "/bin/sh", image, "-c",
            "cd /v && /bin/busybox find . -type f | /bin/busybox sort | while read f; do echo \"$f=$(cat $f)\"; done",
        ],
    );
    out.trim().to_string()
}

/// Data ferry does not carry is the operator's call: a bind mount is refused by name until it
/// is declared shared (then left alone, and the target must have the path), and a volume that
/// already has content on the target is refused until `--overwrite-volumes`, which keeps the
/// old content aside and puts it back when the migration rolls back.
#[test]
fn shared_binds_and_existing_target_volumes_are_handled_as_the_operator_declares() {
    if !enabled() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip, vol) = ("e2e-shared", "198.18.0.142", "e2e-ow-vol");
    let shared = "/var/lib/ferry-testbed/e2e-shared";
    remove_everywhere(name);
    for h in ["a", "b"] {
        let _ = docker(h, &["volume", "rm", "-f", vol]);
    }
    let _ = std::fs::remove_dir_all(shared);
    std::fs::create_dir_all(shared).unwrap();
    std::fs::write(format!("{shared}/both-hosts.txt"), "on shared storage\n").unwrap();
    let image = bed()["workload_image"].as_str().unwrap();
    docker_ok("b", &["volume", "create", vol]);
    let old = {
        let mount = format!("{vol}:/v");
        docker_ok(
            "b",
            &[
                "run",
                "--rm",
                "--network",
                "none",
                "-v",
                &mount,
                "--entrypoint",
                "/bin/sh",
                image,
                "-c",
                "echo operator-data > /v/old.txt",
            ],
        );
        volume_files("b", vol)
    };
    assert_eq!(old, "./old.txt=operator-data");
    let bind = format!("{shared}:/shared");
    let volume = format!("{vol}:/data");
    run_on_a(
        name,
        "ferrynet",
        ip,
        &["-v", &bind, "-v", &volume, "--entrypoint", "/bin/sh", image, "-c",
          "echo from-source > /data/new.txt && exec /usr/local/bin/ferry-workload serve --port 7000"],
    );
    wait_for("the volume to be written", || {
        docker("a", &["exec", name, "/bin/cat", "/data/new.txt"])
            .status
            .success()
            .then_some(())
    });

    let attempts: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "--shared"),
        (
            vec!["--shared", "/var/lib/ferry-testbed/e2e-sharedx"],
            "bind /var/lib/ferry-testbed/e2e-shared",
        ),
        (vec!["--shared", shared], "--overwrite-volumes"),
        (
            vec![
                "--shared",
                shared,
                "--overwrite-volumes",
                "--inject-fault",
                "target-restore",
            ],
            "restore",
        ),
    ];
    for (extra, needle) in attempts {
        let (ok, report, stderr) = migrate(name, &addr("a"), &addr("b"), &extra);
        let msg = report
            .as_ref()
            .map(|r| r["error"].to_string())
            .unwrap_or_default()
            + &stderr;
        assert!(!ok, "{extra:?} must fail");
        assert!(
            msg.contains(needle),
            "{extra:?}: expected {needle:?} in: {msg}"
        );
        assert_running_untouched("a", name, "no");
        assert!(
            inspect("b", name).is_none(),
            "{extra:?}: container left on b"
        );
        assert_eq!(
            volume_files("b", vol),
            old,
            "{extra:?}: the target volume's content changed"
        );
    }
    let (ok, _, stderr) = migrate(name, &addr("a"), &addr("b"), &["--shared", "/srv/../etc"]);
    assert!(!ok && stderr.contains("'..'"), "{stderr}");

    migrate_ok(
        name,
        &[
            "--shared",
            shared,
            "--overwrite-volumes",
            "--strategy",
            "stop-and-copy",
        ],
    );
    assert_eq!(
        volume_files("b", vol),
        "./new.txt=from-source",
        "the volume holds the source's content only"
    );
    assert_eq!(
        docker_ok("b", &["exec", name, "/bin/cat", "/shared/both-hosts.txt"]).trim(),
        "on shared storage"
    );
    docker_ok(
        "b",
        &[
            "exec",
            name,
            "/bin/sh",
            "-c",
            "echo written-on-b > /shared/after.txt",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(format!("{shared}/after.txt"))
            .unwrap()
            .trim(),
        "written-on-b"
    );
    let leftovers: Vec<String> = std::fs::read_dir(
        bed()["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == "b")
            .unwrap()["data_root"]
            .as_str()
            .unwrap()
            .to_string()
            + &format!("/volumes/{vol}"),
    )
    .unwrap()
    .flatten()
    .map(|e| e.file_name().to_string_lossy().into_owned())
    .filter(|n| n.contains("ferry-replaced"))
    .collect();
    assert!(
        leftovers.is_empty(),
        "set-aside copies left after commit: {leftovers:?}"
    );
    remove_everywhere(name);
    for h in ["a", "b"] {
        let _ = docker(h, &["volume", "rm", "-f", vol]);
    }
    let _ = std::fs::remove_dir_all(shared);
}

/// Pre-copy needs soft-dirty tracking, which this host's kernel may lack: then the test is
/// run by `scripts/vm-e2e.sh` in a guest whose kernel has it, where FERRY_E2E_SOFT_DIRTY=required
/// turns a missing tracker into a failure instead of a skip.
fn soft_dirty_or_skip() -> bool {
    if soft_dirty_here() {
        return true;
    }
    if std::env::var("FERRY_E2E_SOFT_DIRTY").as_deref() == Ok("required") {
        panic!(
            "FERRY_E2E_SOFT_DIRTY=required but `criu check --feature mem_dirty_track` fails here"
        );
    }
    eprintln!("skipping here: no soft-dirty tracking on this kernel; scripts/vm-e2e.sh runs this test in a guest that has it");
    false
}

fn assert_rounds(report: &Value, strategy: &str) {
    assert_eq!(report["strategy"], strategy, "{report}");
    let m = &report["memory_rounds"];
    let rounds = m["rounds"]
        .as_array()
        .unwrap_or_else(|| panic!("no memory rounds: {report}"));
    assert!(!rounds.is_empty(), "{report}");
    assert!(rounds.len() <= 8, "the round limit holds: {report}");
    // Round 1 copies the whole data set while the container runs.
    assert!(
        rounds[0]["pages_written"].as_u64().unwrap() * 4096 > 10_000_000,
        "round 1 copied the data: {report}"
    );
    assert!(
        rounds.iter().all(|r| r["bytes"].as_u64().unwrap() > 0),
        "{report}"
    );
    assert!(
        !m["stop_reason"].as_str().unwrap_or("").is_empty(),
        "{report}"
    );
}

#[test]
fn pre_copy_then_hybrid_move_redis_there_and_back_under_one_live_client() {
    if !enabled() || !soft_dirty_or_skip() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (name, ip) = ("e2e-precopy", "198.18.0.141");
    let keys = 20_000;
    let (target, expected) = redis_on_a(name, ip, keys);
    let client = Client::start("redis-client", &target);
    settle();

    let report = migrate_ok(name, &["--strategy", "pre-copy"]);
    // The guest's run is the only record of these figures (scripts/vm-e2e.sh keeps its console).
    eprintln!("pre-copy report: {report}");
    assert_rounds(&report, "pre-copy");
    // The final dump wrote only what changed since the last round: the bulk stayed in the
    // rounds' images, which the target chained as CRIU's parents.
    let m = &report["memory_rounds"];
    let (written, kept) = (
        m["final_pages_written"].as_u64().unwrap(),
        m["final_pages_in_parent"].as_u64().unwrap(),
    );
    assert!(
        kept > written,
        "final dump wrote {written} pages and found {kept} in the rounds: {report}"
    );
    assert!(inspect("a", name).is_none(), "the source container is gone");
    assert_eq!(inspect("b", name).unwrap()["State"]["Running"], true);
    settle();

    // Back again with auto: both hosts have soft-dirty and userfaultfd, so hybrid.
    let (ok, report, stderr) = migrate(name, &addr("b"), &addr("a"), &[]);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert!(ok, "migrate back failed: {report}\n{stderr}");
    eprintln!("hybrid report: {report}");
    assert_rounds(&report, "hybrid");
    // CRIU resets a lazy dump's counters when it starts the page server: no statistics
    // rather than zeros passed off as the dump's.
    assert!(report["criu_dump"].is_null(), "{report}");
    assert!(
        report["strategy_reason"]
            .as_str()
            .unwrap()
            .starts_with("auto:"),
        "{report}"
    );
    assert!(inspect("b", name).is_none());
    settle();

    // The same container and data once more without rounds, so the guest's run shows what
    // the rounds took out of the freeze on the same emulated machine.
    let plain = migrate_ok(name, &["--strategy", "stop-and-copy"]);
    eprintln!("stop-and-copy report: {plain}");
    assert!(plain["memory_rounds"].is_null(), "{plain}");
    settle();
    let summary = client.finish();
    eprintln!("client: {summary}");
    assert_redis_intact(&target, keys, &expected, &summary);
    remove_everywhere(name);
}
