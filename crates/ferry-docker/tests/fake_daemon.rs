//! Client behaviour against a scripted fake daemon on a Unix socket: request lines and
//! encoding, status handling, error text, timeouts, version negotiation, the pre-1.44
//! multi-network create, wait_running's state machine.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_docker::{Docker, DockerError};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

#[derive(Debug, Clone)]
struct Req {
    method: String,
    target: String,
    body: Vec<u8>,
}

impl Req {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

enum Reply {
    Json(u16, Value),
    Text(u16, &'static str),
    /// Never answer (a wedged daemon).
    Hang,
}

type Handler = Arc<dyn Fn(&Req, usize) -> Reply + Send + Sync>;

struct Fake {
    _dir: tempfile::TempDir,
    host: String,
    log: Arc<Mutex<Vec<Req>>>,
}

impl Fake {
    fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }
}

async fn read_request(s: &mut tokio::net::UnixStream) -> Option<Req> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Req {
        method,
        target,
        body,
    })
}

async fn fake(handler: impl Fn(&Req, usize) -> Reply + Send + Sync + 'static) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docker.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let handler: Handler = Arc::new(handler);
    let log2 = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            let log = log2.clone();
            tokio::spawn(async move {
                let Some(req) = read_request(&mut s).await else {
                    return;
                };
                let n = {
                    let mut l = log.lock().unwrap();
                    l.push(req.clone());
                    l.len() - 1
                };
                let (status, body) = match handler(&req, n) {
                    Reply::Json(st, v) => (st, v.to_string()),
                    Reply::Text(st, t) => (st, t.to_string()),
                    Reply::Hang => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                };
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nApi-Version: 1.47\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Fake {
        host: format!("unix://{}", path.display()),
        _dir: dir,
        log,
    }
}

fn version_reply(api: &str, min: &str) -> Reply {
    Reply::Json(
        200,
        json!({"Version": "fake", "ApiVersion": api, "MinAPIVersion": min}),
    )
}

#[tokio::test]
async fn negotiation_table() {
    let cases = [
        ("1.47", "1.12", Ok("1.44")),
        ("1.44", "1.24", Ok("1.44")),
        ("1.43", "1.12", Ok("1.43")),
        ("1.41", "1.12", Ok("1.41")),
        ("1.40", "1.12", Err(())),
        ("1.52", "1.45", Err(())),
    ];
    for (api, min, want) in cases {
        let f = fake(move |_, _| version_reply(api, min)).await;
        let got = Docker::connect(&f.host).await;
        match (got, want) {
            (Ok(d), Ok(v)) => assert_eq!(d.api_version(), v, "daemon {api}"),
            (Err(e @ DockerError::UnsupportedApiVersion { .. }), Err(())) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(api) && msg.contains("1.41") && msg.contains("1.44"),
                    "{msg}"
                );
            }
            (got, want) => panic!("daemon {api}: got {got:?}, want {want:?}"),
        }
        assert_eq!(f.requests()[0].target, "/version");
    }
}

#[tokio::test]
async fn negotiation_falls_back_to_header_when_unversioned_calls_are_refused() {
    let f = fake(|_, _| {
        Reply::Json(
            400,
            json!({"message": "unversioned API calls are not supported"}),
        )
    })
    .await;
    let d = Docker::connect(&f.host).await.unwrap();
    // the fake sends Api-Version: 1.47
    assert_eq!(d.api_version(), "1.44");
}

#[tokio::test]
async fn request_lines_and_statuses() {
    let f = fake(|r, _| match (r.method.as_str(), r.target.as_str()) {
        (_, "/version") => version_reply("1.44", "1.24"),
        ("POST", t) if t.contains("/start") => Reply::Text(304, ""),
        ("POST", t) if t.contains("/stop") => Reply::Text(304, ""),
        ("POST", t) if t.contains("/kill") => {
            Reply::Json(409, json!({"message": "Container abc is not running"}))
        }
        ("GET", "/v1.44/containers/gone/json") => {
            Reply::Json(404, json!({"message": "No such container: gone"}))
        }
        ("GET", "/v1.44/images/reg:5000/lib/redis:7/json") => {
            Reply::Json(200, json!({"Id": "sha256:1"}))
        }
        ("GET", "/v1.44/networks/nope") => {
            Reply::Json(404, json!({"message": "network nope not found"}))
        }
        ("DELETE", _) => Reply::Json(404, json!({"message": "No such container"})),
        ("POST", t) if t.contains("/update") => Reply::Json(200, json!({"Warnings": []})),
        ("POST", t) if t.contains("/pause") => Reply::Text(500, "cgroup freezer exploded\n"),
        ("GET", t) if t.starts_with("/v1.44/containers/json") => {
            Reply::Json(200, json!([{"Id": "a"}, {"Id": "b"}]))
        }
        _ => Reply::Json(418, json!({"message": "unexpected"})),
    })
    .await;
    let d = Docker::connect(&f.host).await.unwrap();

    d.start_container("abc", Some("pre copy&1")).await.unwrap();
    d.start_container("abc", None).await.unwrap();
    d.stop("abc", 7).await.unwrap();
    assert!(d.inspect_container("gone").await.unwrap().is_none());
    assert!(d.inspect_network("nope").await.unwrap().is_none());
    assert_eq!(
        d.inspect_image("reg:5000/lib/redis:7")
            .await
            .unwrap()
            .unwrap()["Id"],
        "sha256:1"
    );
    d.remove_container("gone", true).await.unwrap();
    d.update_restart_policy("abc", &json!({"Name": "no"}))
        .await
        .unwrap();
    assert_eq!(d.list_containers(true).await.unwrap().len(), 2);

    let e = d.kill("abc", "SIGKILL").await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    let msg = e.to_string();
    assert!(
        msg.contains("POST /v1.44/containers/abc/kill?signal=SIGKILL")
            && msg.contains("409")
            && msg.contains("is not running"),
        "{msg}"
    );

    let e = d.pause("abc").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "POST /v1.44/containers/abc/pause: Docker daemon answered 500: cgroup freezer exploded"
    );

    let targets: Vec<String> = f
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.target))
        .collect();
    let want = [
        "GET /version",
        "POST /v1.44/containers/abc/start?checkpoint=pre%20copy%261",
        "POST /v1.44/containers/abc/start",
        "POST /v1.44/containers/abc/stop?t=7",
        "GET /v1.44/containers/gone/json",
        "GET /v1.44/networks/nope",
        "GET /v1.44/images/reg:5000/lib/redis:7/json",
        "DELETE /v1.44/containers/gone?force=true&v=false",
        "POST /v1.44/containers/abc/update",
        "GET /v1.44/containers/json?all=true",
        "POST /v1.44/containers/abc/kill?signal=SIGKILL",
        "POST /v1.44/containers/abc/pause",
    ];
    assert_eq!(targets, want);
    assert_eq!(
        f.requests()[8].json(),
        json!({"RestartPolicy": {"Name": "no"}})
    );
}

#[tokio::test]
async fn timeouts_and_connection_errors() {
    let f = fake(|_, _| Reply::Hang).await;
    let d = Docker::new(&f.host)
        .unwrap()
        .with_timeout(Duration::from_millis(200));
    let t0 = std::time::Instant::now();
    let e = d.info().await.unwrap_err();
    assert!(matches!(e, DockerError::Timeout { .. }), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(e.to_string().contains("GET /v1.41/info"), "{e}");

    let d = Docker::new("unix:///nonexistent/ferry/docker.sock").unwrap();
    let e = d.version().await.unwrap_err();
    assert!(matches!(e, DockerError::Connect { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("GET /v1.41/version") && msg.contains("/nonexistent/ferry/docker.sock"),
        "{msg}"
    );

    // A port nobody listens on (loopback only).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let e = Docker::connect(&format!("tcp://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(matches!(e, DockerError::Connect { .. }), "{e:?}");
}

fn two_network_body() -> Value {
    json!({
        "Image": "sha256:1",
        "MacAddress": "02:00:00:00:00:01",
        "HostConfig": {"NetworkMode": "macnet"},
        "NetworkingConfig": {"EndpointsConfig": {
            "appnet": {"IPAMConfig": {"IPv4Address": "10.0.6.20"}, "Aliases": ["web-db"], "MacAddress": "02:00:00:00:00:02"},
            "macnet": {"IPAMConfig": {"IPv4Address": "10.0.5.140"}, "MacAddress": "02:00:00:00:00:01"}
        }}
    })
}

#[tokio::test]
async fn create_splits_networks_below_1_44() {
    let f = fake(|r, _| match (r.method.as_str(), r.target.as_str()) {
        (_, "/version") => version_reply("1.41", "1.12"),
        ("POST", t) if t.starts_with("/v1.41/containers/create") => {
            Reply::Json(201, json!({"Id": "newid", "Warnings": ["w1"]}))
        }
        ("POST", "/v1.41/networks/appnet/connect") => Reply::Json(200, json!(null)),
        _ => Reply::Json(418, json!({"message": "unexpected"})),
    })
    .await;
    let d = Docker::connect(&f.host).await.unwrap();
    assert_eq!(
        d.create_container("copy", &two_network_body())
            .await
            .unwrap(),
        "newid"
    );
    let reqs = f.requests();
    assert_eq!(reqs[1].target, "/v1.41/containers/create?name=copy");
    let create = reqs[1].json();
    assert_eq!(
        create["NetworkingConfig"]["EndpointsConfig"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["macnet"]
    );
    assert_eq!(create["MacAddress"], "02:00:00:00:00:01");
    assert_eq!(reqs[2].target, "/v1.41/networks/appnet/connect");
    assert_eq!(
        reqs[2].json(),
        json!({"Container": "newid", "EndpointConfig": {"IPAMConfig": {"IPv4Address": "10.0.6.20"}, "Aliases": ["web-db"], "MacAddress": "02:00:00:00:00:02"}})
    );
    assert_eq!(reqs.len(), 3);
}

#[tokio::test]
async fn create_below_1_44_is_all_or_nothing() {
    let f = fake(|r, _| match (r.method.as_str(), r.target.as_str()) {
        (_, "/version") => version_reply("1.41", "1.12"),
        ("POST", t) if t.starts_with("/v1.41/containers/create") => {
            Reply::Json(201, json!({"Id": "newid"}))
        }
        ("POST", "/v1.41/networks/appnet/connect") => {
            Reply::Json(403, json!({"message": "Address already in use"}))
        }
        ("DELETE", _) => Reply::Text(204, ""),
        _ => Reply::Json(418, json!({"message": "unexpected"})),
    })
    .await;
    let d = Docker::connect(&f.host).await.unwrap();
    let e = d
        .create_container("copy", &two_network_body())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("POST /v1.41/networks/appnet/connect")
            && e.to_string().contains("Address already in use"),
        "{e}"
    );
    let last = f.requests().last().cloned().unwrap();
    assert_eq!(
        format!("{} {}", last.method, last.target),
        "DELETE /v1.41/containers/newid?force=true&v=false"
    );
}

#[tokio::test]
async fn create_sends_all_networks_at_1_44() {
    let f = fake(|r, _| match r.target.as_str() {
        "/version" => version_reply("1.45", "1.24"),
        _ => Reply::Json(201, json!({"Id": "newid"})),
    })
    .await;
    let d = Docker::connect(&f.host).await.unwrap();
    d.create_container("copy", &two_network_body())
        .await
        .unwrap();
    let reqs = f.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs[1].json()["NetworkingConfig"]["EndpointsConfig"]
            .as_object()
            .unwrap()
            .len(),
        2
    );
}

fn state(status: &str, running: bool, exit: i64, error: &str) -> Reply {
    Reply::Json(
        200,
        json!({"Id": "abc", "State": {"Status": status, "Running": running, "Paused": false, "Restarting": status == "restarting",
        "Dead": false, "Pid": if running { 42 } else { 0 }, "ExitCode": exit, "Error": error}}),
    )
}

#[tokio::test]
async fn wait_running_state_machine() {
    // created -> restarting -> running
    let f = fake(|r, n| match r.target.as_str() {
        "/version" => version_reply("1.44", "1.24"),
        _ => match n {
            1 => state("created", false, 0, ""),
            2 => state("restarting", false, 1, ""),
            _ => state("running", true, 0, ""),
        },
    })
    .await;
    let d = Docker::connect(&f.host).await.unwrap();
    let v = d.wait_running("abc", Duration::from_secs(5)).await.unwrap();
    assert_eq!(v["State"]["Pid"], 42);

    let cases: Vec<(Reply, &str)> = vec![
        (state("exited", false, 3, ""), "exit code 3"),
        (
            state("created", false, 128, "criu failed: type NOTIFY errno 0"),
            "criu failed",
        ),
        (state("dead", false, 137, ""), "status dead"),
    ];
    for (reply, needle) in cases {
        let reply = Arc::new(Mutex::new(Some(reply)));
        let f = fake(move |_, _| {
            reply
                .lock()
                .unwrap()
                .take()
                .unwrap_or(Reply::Text(500, "again?"))
        })
        .await;
        let d = Docker::new(&f.host).unwrap();
        let e = d
            .wait_running("abc", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, DockerError::NotRunning { .. }), "{e:?}");
        assert!(e.to_string().contains(needle), "{e}");
    }

    let f = fake(|_, _| Reply::Json(404, json!({"message": "No such container"}))).await;
    let e = Docker::new(&f.host)
        .unwrap()
        .wait_running("abc", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(e, DockerError::Vanished { .. }), "{e:?}");

    let f = fake(|_, _| state("created", false, 0, "")).await;
    let t0 = std::time::Instant::now();
    let e = Docker::new(&f.host)
        .unwrap()
        .wait_running("abc", Duration::from_millis(400))
        .await
        .unwrap_err();
    assert!(
        matches!(e, DockerError::WaitTimeout { ref status, .. } if status == "created"),
        "{e:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2));

    // A daemon that hangs mid-wait still ends at the deadline.
    let f = fake(|_, _| Reply::Hang).await;
    let e = Docker::new(&f.host)
        .unwrap()
        .wait_running("abc", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, DockerError::WaitTimeout { .. }), "{e:?}");
}

#[tokio::test]
async fn import_reports_stream_errors() {
    let f = fake(|r, _| {
        if r.target.contains("repo=bad") {
            Reply::Text(200, "{\"status\":\"Downloading\"}\r\n{\"errorDetail\":{\"message\":\"archive/tar: invalid tar header\"},\"error\":\"archive/tar: invalid tar header\"}\r\n")
        } else {
            Reply::Text(200, "{\"status\":\"sha256:feed\"}\r\n")
        }
    })
    .await;
    let d = Docker::new(&f.host).unwrap();
    let id = d
        .import_image(
            bytes::Bytes::from_static(b"tar"),
            "good",
            "latest",
            &["CMD [\"/bin/busybox\",\"sleep\",\"1000\"]"],
        )
        .await
        .unwrap();
    assert_eq!(id.as_deref(), Some("sha256:feed"));
    let e = d
        .import_image(bytes::Bytes::from_static(b"tar"), "bad", "latest", &[])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("invalid tar header"), "{e}");
    let r = &f.requests()[0];
    assert_eq!(r.target, "/v1.41/images/create?fromSrc=-&repo=good&tag=latest&changes=CMD%20%5B%22%2Fbin%2Fbusybox%22%2C%22sleep%22%2C%221000%22%5D");
    assert_eq!(r.body, b"tar");
}

#[tokio::test]
async fn create_below_1_44_moves_the_primary_mac_to_the_top_level() {
    let f = fake(|r, _| match r.target.as_str() {
        "/version" => version_reply("1.41", "1.12"),
        _ => Reply::Json(201, json!({"Id": "newid"})),
    })
    .await;
    let d = Docker::connect(&f.host).await.unwrap();
    let body = json!({"Image": "sha256:1", "HostConfig": {"NetworkMode": "br"},
        "NetworkingConfig": {"EndpointsConfig": {"br": {"MacAddress": "02:fe:00:00:00:01"}}}});
    d.create_container("one", &body).await.unwrap();
    assert_eq!(f.requests()[1].json()["MacAddress"], "02:fe:00:00:00:01");
    // An explicit top-level MAC wins.
    let mut body2 = body.clone();
    body2["MacAddress"] = json!("02:fe:00:00:00:09");
    d.create_container("two", &body2).await.unwrap();
    assert_eq!(f.requests()[2].json()["MacAddress"], "02:fe:00:00:00:09");
}
