//! The README's main job: a live migration between two local test hosts while a client keeps
//! counting on one TCP connection.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_agent::client::AgentClient;
use ferry_proto::{MigrateRequest, Outcome, Strategy};

const NAME: &str = "ferry-demo-counter";
const IP: &str = "198.18.0.140";

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    json: bool,
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let cfg = super::testbed::config()?;
    eprintln!("ferry demo: bringing up the test bed (two Docker hosts on one L2 segment)");
    let info = ferry_testbed::up(&cfg).await?;
    let (ha, hb) = match (info.host("a"), info.host("b")) {
        (Some(a), Some(b)) => (a.clone(), b.clone()),
        _ => bail!("the test bed has no hosts a and b"),
    };
    for h in [&ha, &hb] {
        let _ = ferry_testbed::docker(h, &["rm", "-f", NAME]).await;
    }
    ferry_testbed::docker(
        &ha,
        &[
            "run",
            "-d",
            "--name",
            NAME,
            "--network",
            &info.macvlan_network,
            "--ip",
            IP,
            &info.workload_image,
        ],
    )
    .await
    .context("starting the demo workload on host a")?;
    eprintln!("ferry demo: counter server {NAME} runs on host a at {IP}:7000");

    let dir = tempdir()?;
    let stop = dir.join("stop");
    let out = dir.join("client.json");
    let mut client = tokio::process::Command::new("ip")
        .args(["netns", "exec", &info.client_netns])
        .arg(&cfg.workload_exe)
        .args([
            "client",
            "--addr",
            &format!("{IP}:7000"),
            "--interval-ms",
            "10",
            "--duration-s",
            "120",
        ])
        .arg("--stop-file")
        .arg(&stop)
        .arg("--out")
        .arg(&out)
        .kill_on_drop(true)
        .spawn()
        .context("starting the client in the client namespace")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!(
        "ferry demo: client connected from {}; migrating a → b",
        info.client_ip
    );

    let api = AgentClient::new(&info.client_tls_dir, Duration::from_secs(10))?;
    let req = MigrateRequest {
        container: NAME.into(),
        target: hb.agent_addr.to_string(),
        strategy: Strategy::StopAndCopy,
        step_timeout_s: 120,
        fault: None,
        compression: Default::default(),
        bandwidth_limit_bytes_per_s: 0,
        overwrite_volumes: false,
        shared: vec![],
    };
    let report = super::migrate::drive(&api, ha.agent_addr, req, a.json).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::write(&stop, b"stop").context("stopping the client")?;
    let _ = tokio::time::timeout(Duration::from_secs(40), client.wait()).await;
    let summary: serde_json::Value = std::fs::read(&out)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(
            || serde_json::json!({"ok": false, "errors": ["the client wrote no summary"]}),
        );
    let on_b = ferry_testbed::docker(
        &hb,
        &[
            "ps",
            "--filter",
            &format!("name=^{NAME}$"),
            "--format",
            "{{.Names}} {{.Status}}",
        ],
    )
    .await
    .unwrap_or_default();
    let on_a = ferry_testbed::docker(
        &ha,
        &[
            "ps",
            "-a",
            "--filter",
            &format!("name=^{NAME}$"),
            "--format",
            "{{.Names}} {{.Status}}",
        ],
    )
    .await
    .unwrap_or_default();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"report": report, "client": summary})
            )?
        );
    } else {
        super::migrate::print_human(&report);
        println!(
            "client: {} replies on one connection, counter {} → {}, continuous {}, longest gap {} ms",
            summary["replies"], summary["first"], summary["last"], summary["continuous"], summary["max_gap_ms"]
        );
        println!(
            "host b: {}",
            if on_b.trim().is_empty() {
                "(not running)"
            } else {
                on_b.trim()
            }
        );
        println!(
            "host a: {}",
            if on_a.trim().is_empty() {
                "(container gone)"
            } else {
                on_a.trim()
            }
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ok = report.outcome == Outcome::Migrated && summary["ok"].as_bool() == Some(true);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("ferry-demo-{}", ferry_agent::new_id()));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}
