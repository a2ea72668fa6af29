//! End-to-end check of the test bed on this machine. Needs root and docker.io; it brings up
//! (and leaves up) the shared test bed, so it is opt-in: `cargo test -p ferry-testbed -- --ignored`.
//! Set FERRY_TESTBED_NO_AGENTS=1 if the ferry binary cannot run agents yet.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_testbed::{docker, netns_exec, TestbedConfig};

fn config() -> TestbedConfig {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("debug");
    TestbedConfig::new(target.join("ferry"), target.join("ferry-workload"))
}

fn json_field<'a>(json: &'a str, key: &str) -> &'a str {
    let start = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("{key} missing in {json}"))
        + key.len()
        + 3;
    let rest = &json[start..];
    let end = rest.find([',', '}']).unwrap();
    rest[..end].trim_matches('"')
}

/// Containers of earlier (possibly failed) runs of this test hold the fixed addresses.
async fn remove_test_containers(host: &ferry_testbed::HostInfo) {
    let ids = docker(host, &["ps", "-aq", "--filter", "name=^it-"])
        .await
        .unwrap();
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids);
        docker(host, &args).await.unwrap();
    }
}

async fn wait_for_log(host: &ferry_testbed::HostInfo, name: &str, needle: &str) {
    for _ in 0..100 {
        if docker(host, &["logs", name])
            .await
            .unwrap()
            .contains(needle)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} never logged {needle:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and docker.io; starts the shared test bed"]
async fn up_reach_recover() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let cfg = config();
    let t = Instant::now();
    let info = ferry_testbed::up(&cfg).await.expect("up");
    eprintln!("up: {:?}", t.elapsed());
    let a = info.host("a").unwrap().clone();
    let b = info.host("b").unwrap().clone();
    let wl = cfg.workload_exe.to_string_lossy().into_owned();
    remove_test_containers(&a).await;
    remove_test_containers(&b).await;

    for image in [&info.workload_image, &info.redis_image] {
        let ida = docker(&a, &["image", "inspect", "-f", "{{.Id}}", image])
            .await
            .unwrap();
        let idb = docker(&b, &["image", "inspect", "-f", "{{.Id}}", image])
            .await
            .unwrap();
        assert_eq!(ida, idb, "{image} differs between hosts");
    }

    let name = format!("it-wl-{}", std::process::id());
    docker(
        &a,
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            &info.macvlan_network,
            "--ip",
            "198.18.0.130",
            &info.workload_image,
        ],
    )
    .await
    .unwrap();
    wait_for_log(&a, &name, "listening").await;
    let summary = netns_exec(
        &info.client_netns,
        &[
            &wl,
            "client",
            "--addr",
            "198.18.0.130:7000",
            "--interval-ms",
            "5",
            "--duration-s",
            "1",
        ],
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert_eq!(json_field(&summary, "ok"), "true", "{summary}");
    assert_eq!(json_field(&summary, "first"), "1", "{summary}");

    let redis = format!("it-redis-{}", std::process::id());
    docker(
        &b,
        &[
            "run",
            "-d",
            "--name",
            &redis,
            "--network",
            &info.macvlan_network,
            "--ip",
            "198.18.0.131",
            &info.redis_image,
        ],
    )
    .await
    .unwrap();
    let addr = "198.18.0.131:6379";
    let mut loaded = None;
    for _ in 0..50 {
        match netns_exec(
            &info.client_netns,
            &[
                &wl,
                "redis-load",
                "--addr",
                addr,
                "--keys",
                "20000",
                "--value-size",
                "100",
            ],
            Duration::from_secs(60),
        )
        .await
        {
            Ok(out) => {
                loaded = Some(out);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(loaded.is_some(), "redis never accepted the load");
    let digest = netns_exec(
        &info.client_netns,
        &[&wl, "redis-digest", "--addr", addr, "--match", "key:*"],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let expected = netns_exec(
        &info.client_netns,
        &[
            &wl,
            "expected-digest",
            "--keys",
            "20000",
            "--value-size",
            "100",
        ],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(
        json_field(&digest, "digest"),
        json_field(&expected, "digest")
    );
    assert_eq!(json_field(&digest, "keys"), "20000");

    let t = Instant::now();
    let again = ferry_testbed::up(&cfg).await.expect("warm up");
    eprintln!("warm up: {:?}", t.elapsed());
    assert_eq!(again.hosts, info.hosts);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(
        ferry_testbed::load_info(&cfg).await.unwrap().hosts,
        info.hosts
    );

    // A crashed daemon makes the next `up` rebuild that host from a clean slate, and only it.
    let pid: i32 = std::fs::read_to_string(cfg.run_dir.join("a/dockerd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = Instant::now();
    ferry_testbed::up(&cfg).await.expect("up after kill");
    eprintln!("up after kill -9 dockerd: {:?}", t.elapsed());
    assert_eq!(docker(&a, &["ps", "-aq"]).await.unwrap().trim(), "");
    let still = netns_exec(
        &info.client_netns,
        &[&wl, "redis-digest", "--addr", addr, "--match", "key:*"],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(
        json_field(&still, "digest"),
        json_field(&expected, "digest")
    );
    docker(&b, &["rm", "-f", &redis]).await.unwrap();
}
