//! Table tests of ContainerView and create_body_from_inspect against inspect output.
//!
//! Fixtures: `inspect-20.10-*` were captured from Docker 20.10.24 (API 1.41); `inspect-28-*`
//! follow moby v28.5.2's types as answered at API 1.44 (compat Aliases with short ID and
//! hostname, DNSNames, GwPriority, no Config.MacAddress, cgroup v2 defaults).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use ferry_docker::{create_body_from_inspect, ContainerView, DockerError, Treatment, FIELD_RULES};
use serde_json::{json, Value};

fn fixture(name: &str) -> Value {
    let text = match name {
        "20.10-macvlan-running" => include_str!("fixtures/inspect-20.10-macvlan-running.json"),
        "20.10-link-running" => include_str!("fixtures/inspect-20.10-link-running.json"),
        "20.10-created" => include_str!("fixtures/inspect-20.10-created.json"),
        "28-bridge-running" => include_str!("fixtures/inspect-28-bridge-running.json"),
        "28-macvlan-exited" => include_str!("fixtures/inspect-28-macvlan-exited.json"),
        other => panic!("no fixture {other}"),
    };
    serde_json::from_str(text).expect("fixture is JSON")
}

fn net<'a>(v: &'a ContainerView, name: &str) -> &'a ferry_docker::NetworkEndpoint {
    v.network(name)
        .unwrap_or_else(|| panic!("{}: no network {name}", v.name))
}

#[test]
fn view_20_10_macvlan_running() {
    let v = ContainerView::from_inspect(&fixture("20.10-macvlan-running")).unwrap();
    assert_eq!(
        v.id,
        "c6d0a6657a6a22c2931b4c535734893bca3ccea1ed19657348f2cd05f80c7e7a"
    );
    assert_eq!(v.name, "redis");
    assert_eq!(
        v.image_id,
        "sha256:c9306ee266216bd81d21f93e473fa9bc53c722d2c6239af7ffa199db89fc2976"
    );
    assert_eq!(v.image_ref, "example/redis:7.0");
    assert!(v.running && !v.paused && !v.restarting);
    assert_eq!(v.status, "running");
    assert_eq!(v.pid, 14532);
    assert_eq!(
        v.restart_policy,
        json!({"Name": "unless-stopped", "MaximumRetryCount": 0})
    );
    assert_eq!(v.runtime, "runc");
    assert_eq!(v.network_mode, "macnet");
    assert_eq!(v.hostname, "cache-1");
    assert_eq!(v.user, "0:0");
    assert_eq!(
        v.labels.get("com.example.tier").map(String::as_str),
        Some("db")
    );
    assert_eq!(v.labels.len(), 3);

    assert_eq!(
        v.networks
            .iter()
            .map(|n| n.network.as_str())
            .collect::<Vec<_>>(),
        ["appnet", "macnet"]
    );
    let mac = net(&v, "macnet");
    assert_eq!(
        mac.network_id,
        "bacb132a55b831fb2342740d3f6f29f02f006bb9d604c277cafce0b26a505405"
    );
    assert_eq!(mac.ipv4.as_deref(), Some("10.213.5.140"));
    assert_eq!(mac.ipv4_prefix_len, Some(24));
    assert_eq!(mac.gateway.as_deref(), Some("10.213.5.1"));
    assert_eq!(mac.mac.as_deref(), Some("02:42:0a:d5:05:8c"));
    assert_eq!(mac.ipam_ipv4.as_deref(), Some("10.213.5.140"));
    // 20.10 reports ["cache", "<short id>", "<hostname>"]: only the user's alias is kept.
    assert_eq!(mac.aliases, ["cache"]);
    assert_eq!(mac.ipv6, None);
    let app = net(&v, "appnet");
    assert_eq!(app.ipv4.as_deref(), Some("10.213.6.20"));
    assert_eq!(app.aliases, ["web-db"]);

    let kinds: Vec<(&str, &str, Option<&str>, bool)> = v
        .mounts
        .iter()
        .map(|m| {
            (
                m.kind.as_str(),
                m.destination.as_str(),
                m.name.as_deref(),
                m.rw,
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("volume", "/srv/redis", Some("redisdata"), true),
            ("bind", "/hosttmp", None, false),
            ("tmpfs", "/scratch", None, true),
            (
                "volume",
                "/data",
                Some("34a11192188cf32c89f9e6309d0b10b9570df9e545af0cb4b0f722d02e14bb64"),
                true
            ),
            // --tmpfs is only in HostConfig.Tmpfs, not in Mounts
            ("tmpfs", "/run", None, true),
        ]
    );
    assert_eq!(v.mounts[0].driver.as_deref(), Some("local"));
    assert_eq!(
        v.mounts[0].source,
        "/var/lib/docker/volumes/redisdata/_data"
    );
    assert_eq!(v.mounts[1].source, "/tmp");
}

/// network, ipv4, mac, aliases, ipam_ipv4, ipv6
type NetRow = (
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    Vec<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
);
/// A change to a fixture.
type Mutation = Box<dyn Fn(&mut Value)>;

#[test]
fn view_table() {
    struct Case {
        fixture: &'static str,
        name: &'static str,
        running: bool,
        status: &'static str,
        pid: u32,
        restart: Value,
        runtime: &'static str,
        user: &'static str,
        nets: Vec<NetRow>,
        mounts: Vec<(&'static str, &'static str)>,
    }
    let cases = vec![
        Case {
            fixture: "20.10-link-running",
            name: "web",
            running: true,
            status: "running",
            pid: v_pid("20.10-link-running"),
            restart: json!({"Name": "on-failure", "MaximumRetryCount": 3}),
            runtime: "runc",
            user: "",
            nets: vec![(
                "appnet",
                Some("10.213.6.2"),
                Some("02:42:0a:d5:06:02"),
                vec![],
                None,
                None,
            )],
            mounts: vec![("volume", "/data")],
        },
        Case {
            fixture: "20.10-created",
            name: "created1",
            running: false,
            status: "created",
            pid: 0,
            restart: json!({"Name": "no", "MaximumRetryCount": 0}),
            runtime: "runc",
            user: "",
            // 20.10 keeps a --mac-address of a never-started container only in Config.MacAddress.
            nets: vec![("macnet", None, None, vec![], Some("10.213.5.150"), None)],
            // The image's anonymous volume exists from create on.
            mounts: vec![("volume", "/data")],
        },
        Case {
            fixture: "28-bridge-running",
            name: "app",
            running: true,
            status: "running",
            pid: 48213,
            restart: json!({"Name": "always", "MaximumRetryCount": 0}),
            runtime: "runc",
            user: "",
            nets: vec![
                (
                    "backend",
                    Some("10.88.0.7"),
                    Some("0e:9d:5a:31:c4:07"),
                    vec!["api"],
                    None,
                    Some("fd00:88::7"),
                ),
                (
                    "bridge",
                    Some("172.17.0.3"),
                    Some("7a:2f:91:0c:5e:41"),
                    vec![],
                    None,
                    None,
                ),
            ],
            mounts: vec![
                ("volume", "/var/lib/app"),
                ("bind", "/etc/app"),
                ("tmpfs", "/tmp"),
            ],
        },
        Case {
            fixture: "28-macvlan-exited",
            name: "pg",
            running: false,
            status: "exited",
            pid: 0,
            restart: json!({"Name": "on-failure", "MaximumRetryCount": 5}),
            runtime: "ferry-runc",
            user: "postgres",
            // Docker 28 keeps the MAC on a stopped endpoint; hostname alias removed like the short ID.
            nets: vec![(
                "macnet",
                None,
                Some("02:42:0a:14:00:28"),
                vec!["postgres"],
                Some("10.20.0.40"),
                None,
            )],
            mounts: vec![
                ("volume", "/var/lib/postgresql/data"),
                ("tmpfs", "/run/postgresql"),
            ],
        },
    ];
    for c in cases {
        let v = ContainerView::from_inspect(&fixture(c.fixture))
            .unwrap_or_else(|e| panic!("{}: {e}", c.fixture));
        assert_eq!(v.name, c.name, "{}", c.fixture);
        assert_eq!(v.running, c.running, "{}", c.fixture);
        assert_eq!(v.status, c.status, "{}", c.fixture);
        assert_eq!(v.pid, c.pid, "{}", c.fixture);
        assert_eq!(v.restart_policy, c.restart, "{}", c.fixture);
        assert_eq!(v.runtime, c.runtime, "{}", c.fixture);
        assert_eq!(v.user, c.user, "{}", c.fixture);
        let got: Vec<_> = v
            .networks
            .iter()
            .map(|n| {
                (
                    n.network.as_str(),
                    n.ipv4.as_deref(),
                    n.mac.as_deref(),
                    n.aliases.iter().map(String::as_str).collect::<Vec<_>>(),
                    n.ipam_ipv4.as_deref(),
                    n.ipv6.as_deref(),
                )
            })
            .collect();
        assert_eq!(got, c.nets, "{}", c.fixture);
        let mounts: Vec<_> = v
            .mounts
            .iter()
            .map(|m| (m.kind.as_str(), m.destination.as_str()))
            .collect();
        assert_eq!(mounts, c.mounts, "{}", c.fixture);
    }
}

fn v_pid(f: &str) -> u32 {
    fixture(f)
        .pointer("/State/Pid")
        .and_then(Value::as_u64)
        .unwrap() as u32
}

#[test]
fn view_paused_and_errors() {
    let mut f = fixture("20.10-macvlan-running");
    f["State"]["Paused"] = json!(true);
    f["State"]["Status"] = json!("paused");
    let v = ContainerView::from_inspect(&f).unwrap();
    assert!(v.running && v.paused);

    let bad: Vec<(&str, Mutation)> = vec![
        (
            "/Id",
            Box::new(|v: &mut Value| {
                v.as_object_mut().unwrap().remove("Id");
            }),
        ),
        ("/Image", Box::new(|v: &mut Value| v["Image"] = json!(5))),
        (
            "/State/Running",
            Box::new(|v: &mut Value| {
                v["State"].as_object_mut().unwrap().remove("Running");
            }),
        ),
        (
            "/State/Pid",
            Box::new(|v: &mut Value| v["State"]["Pid"] = json!(-1)),
        ),
        (
            "/State/Pid",
            Box::new(|v: &mut Value| v["State"]["Pid"] = json!(1u64 << 40)),
        ),
        (
            "/NetworkSettings/Networks",
            Box::new(|v: &mut Value| v["NetworkSettings"]["Networks"] = json!([])),
        ),
        (
            "/Mounts/0/Destination",
            Box::new(|v: &mut Value| {
                v["Mounts"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("Destination");
            }),
        ),
        (
            "/HostConfig",
            Box::new(|v: &mut Value| {
                v.as_object_mut().unwrap().remove("HostConfig");
            }),
        ),
    ];
    for (field, mutate) in bad {
        let mut f = fixture("20.10-macvlan-running");
        mutate(&mut f);
        match ContainerView::from_inspect(&f) {
            Err(DockerError::BadInspect { field: got, .. }) => assert_eq!(got, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    // Null networks (container with networking disabled) is fine.
    let mut f = fixture("20.10-macvlan-running");
    f["NetworkSettings"]["Networks"] = Value::Null;
    assert!(ContainerView::from_inspect(&f).unwrap().networks.is_empty());
}

/// `(pointer, Some(value))` = must equal; `(pointer, None)` = must be absent.
type Checks = Vec<(&'static str, Option<Value>)>;

fn check(label: &str, body: &Value, checks: &Checks) {
    for (ptr, want) in checks {
        let got = body.pointer(ptr);
        match want {
            Some(w) => assert_eq!(got, Some(w), "{label}: {ptr}\nbody: {body:#}"),
            None => assert!(got.is_none(), "{label}: {ptr} should be absent, is {got:?}"),
        }
    }
}

#[test]
fn create_body_table() {
    let img_2010 = json!("sha256:c9306ee266216bd81d21f93e473fa9bc53c722d2c6239af7ffa199db89fc2976");
    let common_absent: Checks = vec![
        ("/Id", None),
        ("/State", None),
        ("/Name", None),
        ("/Mounts", None),
        ("/NetworkSettings", None),
        ("/GraphDriver", None),
        ("/Path", None),
        ("/Args", None),
        ("/HostConfig/ContainerIDFile", None),
    ];
    let cases: Vec<(&str, &str, Option<&str>, &str, Checks)> = vec![
        (
            "macvlan 20.10 -> 1.44 via ferry runtime",
            "20.10-macvlan-running",
            Some("ferry-runc"),
            "1.44",
            vec![
                ("/Image", Some(img_2010.clone())),
                ("/MacAddress", None),
                ("/Hostname", Some(json!("cache-1"))),
                ("/User", Some(json!("0:0"))),
                ("/WorkingDir", Some(json!("/srv"))),
                ("/Cmd", Some(json!(["/bin/busybox", "sleep", "100000"]))),
                (
                    "/Env",
                    Some(json!([
                        "REDIS_ARGS=--appendonly yes",
                        "TZ=UTC",
                        "APPVAR=fromimage"
                    ])),
                ),
                (
                    "/Labels",
                    Some(
                        json!({"com.example.owner": "ops", "com.example.tier": "db", "org.example.image": "yes"}),
                    ),
                ),
                ("/StopSignal", Some(json!("SIGINT"))),
                ("/StopTimeout", Some(json!(20))),
                ("/Healthcheck/Interval", Some(json!(5000000000u64))),
                ("/Volumes", Some(json!({"/data": {}}))),
                ("/HostConfig/Runtime", Some(json!("ferry-runc"))),
                (
                    "/HostConfig/RestartPolicy",
                    Some(json!({"Name": "unless-stopped", "MaximumRetryCount": 0})),
                ),
                (
                    "/HostConfig/Binds",
                    Some(json!(["redisdata:/srv/redis", "/tmp:/hosttmp:ro"])),
                ),
                ("/HostConfig/Tmpfs", Some(json!({"/run": "rw,size=64m"}))),
                ("/HostConfig/Mounts/0/Target", Some(json!("/scratch"))),
                ("/HostConfig/Memory", Some(json!(268435456))),
                ("/HostConfig/CapAdd", Some(json!(["NET_ADMIN"]))),
                ("/HostConfig/NetworkMode", Some(json!("macnet"))),
                ("/HostConfig/KernelMemory", None),
                ("/HostConfig/KernelMemoryTCP", None),
                (
                    "/NetworkingConfig/EndpointsConfig/macnet",
                    Some(json!({
                "IPAMConfig": {"IPv4Address": "10.213.5.140"},
                "Aliases": ["cache"],
                "MacAddress": "02:42:0a:d5:05:8c"})),
                ),
                (
                    "/NetworkingConfig/EndpointsConfig/appnet",
                    Some(json!({
                "IPAMConfig": {"IPv4Address": "10.213.6.20"},
                "Aliases": ["web-db"],
                "MacAddress": "02:42:0a:d5:06:14"})),
                ),
            ],
        ),
        (
            "macvlan 20.10 -> 1.41 keeps runtime, MAC top-level",
            "20.10-macvlan-running",
            None,
            "1.41",
            vec![
                ("/HostConfig/Runtime", Some(json!("runc"))),
                // Primary network = NetworkMode (macnet), not the alphabetically first (appnet).
                ("/MacAddress", Some(json!("02:42:0a:d5:05:8c"))),
                (
                    "/NetworkingConfig/EndpointsConfig/macnet/MacAddress",
                    Some(json!("02:42:0a:d5:05:8c")),
                ),
            ],
        ),
        (
            "endpoint link and port binding",
            "20.10-link-running",
            None,
            "1.41",
            vec![
                ("/Image", Some(img_2010.clone())),
                ("/MacAddress", Some(json!("02:42:0a:d5:06:02"))),
                ("/Hostname", Some(json!("97459da6c47d"))),
                ("/ExposedPorts", Some(json!({"80/tcp": {}}))),
                (
                    "/HostConfig/PortBindings",
                    Some(json!({"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]})),
                ),
                (
                    "/HostConfig/RestartPolicy",
                    Some(json!({"Name": "on-failure", "MaximumRetryCount": 3})),
                ),
                // Short ID alias removed, dynamic IP pinned, endpoint link kept.
                (
                    "/NetworkingConfig/EndpointsConfig/appnet",
                    Some(json!({
                "IPAMConfig": {"IPv4Address": "10.213.6.2"},
                "MacAddress": "02:42:0a:d5:06:02",
                "Links": ["redis:db"]})),
                ),
            ],
        ),
        (
            "never started 20.10: configured IP and MAC",
            "20.10-created",
            None,
            "1.44",
            vec![
                ("/MacAddress", None),
                (
                    "/NetworkingConfig/EndpointsConfig/macnet",
                    Some(json!({
                "IPAMConfig": {"IPv4Address": "10.213.5.150"},
                "MacAddress": "02:42:0a:d5:05:96"})),
                ),
            ],
        ),
        (
            "never started 20.10 -> 1.41",
            "20.10-created",
            None,
            "1.41",
            vec![("/MacAddress", Some(json!("02:42:0a:d5:05:96")))],
        ),
        (
            "28 default bridge + user network",
            "28-bridge-running",
            None,
            "1.44",
            vec![
                (
                    "/Image",
                    Some(json!(
                        "sha256:3b25b682ea82b2db3cc4fd48db818be788ee3f902ac7378090cf2624ec2442df"
                    )),
                ),
                ("/Hostname", Some(json!("5e1f3a9b7c2d"))),
                ("/Entrypoint", Some(json!(["/docker-entrypoint.sh"]))),
                ("/Healthcheck/StartInterval", Some(json!(1000000000u64))),
                ("/HostConfig/Links", Some(json!(["redis:db"]))),
                (
                    "/HostConfig/Annotations",
                    Some(json!({"org.example.team": "web"})),
                ),
                (
                    "/HostConfig/LogConfig",
                    Some(json!({"Type": "json-file", "Config": {"max-size": "10m"}})),
                ),
                ("/HostConfig/NanoCpus", Some(json!(500000000))),
                ("/HostConfig/NetworkMode", Some(json!("bridge"))),
                // Default bridge: no fixed IP, no aliases (Docker refuses both there); MAC kept.
                (
                    "/NetworkingConfig/EndpointsConfig/bridge",
                    Some(json!({"MacAddress": "7a:2f:91:0c:5e:41"})),
                ),
                (
                    "/NetworkingConfig/EndpointsConfig/backend",
                    Some(json!({
                "IPAMConfig": {"IPv4Address": "10.88.0.7", "IPv6Address": "fd00:88::7"},
                "Aliases": ["api"],
                "MacAddress": "0e:9d:5a:31:c4:07"})),
                ),
                ("/NetworkingConfig/EndpointsConfig/backend/DNSNames", None),
                ("/NetworkingConfig/EndpointsConfig/backend/GwPriority", None),
                ("/NetworkingConfig/EndpointsConfig/backend/NetworkID", None),
            ],
        ),
        (
            "28 -> 1.41 target: MAC of NetworkMode's network",
            "28-bridge-running",
            None,
            "1.41",
            vec![("/MacAddress", Some(json!("7a:2f:91:0c:5e:41")))],
        ),
        (
            "28 stopped, NetworkMode by ID prefix",
            "28-macvlan-exited",
            None,
            "1.44",
            vec![
                ("/HostConfig/NetworkMode", Some(json!("macnet"))),
                ("/HostConfig/Runtime", Some(json!("ferry-runc"))),
                ("/HostConfig/Init", Some(json!(true))),
                ("/HostConfig/PidsLimit", Some(json!(512))),
                (
                    "/HostConfig/Sysctls",
                    Some(json!({"net.ipv4.tcp_keepalive_time": "60"})),
                ),
                ("/HostConfig/Mounts/0/Source", Some(json!("pgdata"))),
                (
                    "/HostConfig/ExtraHosts",
                    Some(json!(["db.internal:10.20.0.5"])),
                ),
                ("/Hostname", Some(json!("pg-primary"))),
                ("/Domainname", Some(json!("db.example"))),
                ("/User", Some(json!("postgres"))),
                (
                    "/NetworkingConfig/EndpointsConfig/macnet",
                    Some(json!({
                "IPAMConfig": {"IPv4Address": "10.20.0.40"},
                "Aliases": ["postgres"],
                "MacAddress": "02:42:0a:14:00:28"})),
                ),
            ],
        ),
    ];
    for (label, fx, runtime, api, checks) in cases {
        let body = create_body_from_inspect(&fixture(fx), runtime, api)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        check(label, &body, &common_absent);
        check(label, &body, &checks);
    }
}

#[test]
fn create_body_shared_namespaces() {
    // host networking: no endpoints, no hostname (it would be the source machine's name), no MAC.
    let mut f = fixture("28-bridge-running");
    f["HostConfig"]["NetworkMode"] = json!("host");
    f["NetworkSettings"]["Networks"] = json!({"host": {"IPAMConfig": null, "Links": null, "Aliases": null, "MacAddress": "",
        "NetworkID": "0d1f", "EndpointID": "e1", "Gateway": "", "IPAddress": "", "IPPrefixLen": 0}});
    f["Config"]["Hostname"] = json!("source-machine");
    for api in ["1.41", "1.44"] {
        let b = create_body_from_inspect(&f, None, api).unwrap();
        check(
            "host",
            &b,
            &vec![
                ("/Hostname", Some(json!(""))),
                ("/Domainname", Some(json!(""))),
                ("/MacAddress", None),
                ("/NetworkingConfig/EndpointsConfig", Some(json!({}))),
                ("/HostConfig/NetworkMode", Some(json!("host"))),
            ],
        );
    }
    // another container's network namespace
    let mut f = fixture("28-bridge-running");
    f["HostConfig"]["NetworkMode"] = json!("container:sidecar");
    f["NetworkSettings"]["Networks"] = json!({});
    let b = create_body_from_inspect(&f, None, "1.44").unwrap();
    check(
        "container:",
        &b,
        &vec![
            ("/Hostname", Some(json!(""))),
            ("/NetworkingConfig/EndpointsConfig", Some(json!({}))),
            ("/HostConfig/NetworkMode", Some(json!("container:sidecar"))),
        ],
    );
    // host UTS namespace only
    let mut f = fixture("28-bridge-running");
    f["HostConfig"]["UTSMode"] = json!("host");
    let b = create_body_from_inspect(&f, None, "1.44").unwrap();
    check(
        "uts host",
        &b,
        &vec![
            ("/Hostname", Some(json!(""))),
            (
                "/NetworkingConfig/EndpointsConfig/backend/MacAddress",
                Some(json!("0e:9d:5a:31:c4:07")),
            ),
        ],
    );
}

#[test]
fn create_body_generic_drops_follow_the_table() {
    let mut f = fixture("20.10-macvlan-running");
    f["HostConfig"]["ContainerIDFile"] = json!("/root/x.cid");
    f["HostConfig"]["KernelMemory"] = json!(1048576);
    let b = create_body_from_inspect(&f, None, "1.44").unwrap();
    // A non-zero kernel memory limit is configuration: kept.
    assert_eq!(b.pointer("/HostConfig/KernelMemory"), Some(&json!(1048576)));
    for rule in FIELD_RULES
        .iter()
        .filter(|r| r.treatment == Treatment::Dropped)
    {
        let Some(key) = rule
            .field
            .strip_prefix("HostConfig.")
            .or_else(|| rule.field.strip_prefix("Config."))
        else {
            continue;
        };
        let section = if rule.field.starts_with("HostConfig.") {
            "/HostConfig"
        } else {
            ""
        };
        assert!(
            b.pointer(&format!("{section}/{key}")).is_none(),
            "{} still present",
            rule.field
        );
    }
}

#[test]
fn create_body_errors() {
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "no image",
            Box::new(|v: &mut Value| {
                v.as_object_mut().unwrap().remove("Image");
            }),
            "Image",
        ),
        (
            "empty image",
            Box::new(|v: &mut Value| v["Image"] = json!("")),
            "Image",
        ),
        (
            "config not object",
            Box::new(|v: &mut Value| v["Config"] = json!("x")),
            "Config",
        ),
        (
            "no hostconfig",
            Box::new(|v: &mut Value| {
                v.as_object_mut().unwrap().remove("HostConfig");
            }),
            "HostConfig",
        ),
        (
            "networks not object",
            Box::new(|v: &mut Value| v["NetworkSettings"]["Networks"] = json!(1)),
            "NetworkSettings.Networks",
        ),
    ];
    for (label, mutate, field) in cases {
        let mut f = fixture("20.10-macvlan-running");
        mutate(&mut f);
        match create_body_from_inspect(&f, None, "1.44") {
            Err(DockerError::BadInspect { field: got, .. }) => assert_eq!(got, field, "{label}"),
            other => panic!("{label}: {other:?}"),
        }
    }
    assert!(matches!(
        create_body_from_inspect(&fixture("20.10-created"), None, "latest"),
        Err(DockerError::BadApiVersion(_))
    ));
}
