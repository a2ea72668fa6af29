//! The Engine API client: one HTTP/1.1 connection per call, a deadline on every call.
//!
//! One connection per request keeps the client free of pooling state: a migration makes tens
//! of calls, not thousands, and a fresh connection can never be a half-dead pooled one after the
//! daemon restarted (which ferry's own preflight may cause).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::host::{host_from_env_values, Endpoint};
use crate::util::{percent_encode, seg, with_query, ApiVersion, MAX_API_VERSION, MIN_API_VERSION};
use crate::DockerError;

/// Deadline for ordinary calls. Docker answers those in milliseconds; 30 s only trips when the
/// daemon is wedged, and then failing beats hanging a migration forever.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Deadline for calls whose cost grows with the container: `start` from a checkpoint (measured
/// ~21 s per GB through containerd), removal of a large rootfs, image import.
pub const DEFAULT_LONG_TIMEOUT: Duration = Duration::from_secs(300);

/// Largest answer body we buffer. Inspect/list answers are kilobytes; this only bounds damage
/// from a misbehaving peer on a tcp:// host.
const MAX_BODY: usize = 64 << 20;

/// A Docker daemon and the API version we speak to it.
#[derive(Debug, Clone)]
pub struct Docker {
    endpoint: Endpoint,
    api_version: String,
    timeout: Duration,
    long_timeout: Duration,
}

/// A daemon answer before interpretation.
struct Answer {
    status: u16,
    body: Bytes,
    api_version_header: Option<String>,
}

/// Aborts the connection-driver task when the request future is dropped (e.g. on timeout),
/// which closes the socket instead of leaving a task reading from a wedged daemon.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum ExchangeError {
    Http(hyper::Error),
    Body(Box<dyn std::error::Error + Send + Sync>),
}

async fn exchange<S>(
    io: S,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ExchangeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(ExchangeError::Http)?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        // Errors surface through send_request/body reads; nothing to add here.
        let _ = conn.await;
    }));
    let resp = sender
        .send_request(req)
        .await
        .map_err(ExchangeError::Http)?;
    let (parts, body) = resp.into_parts();
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(ExchangeError::Body)?
        .to_bytes();
    Ok((parts.status, parts.headers, bytes))
}

/// Extracts the daemon's error text: `{"message": ...}` for the Engine API, raw text otherwise.
fn daemon_message(status: u16, body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Some(m) = v.get("message").and_then(Value::as_str) {
            return m.to_string();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("no message")
            .to_string();
    }
    let mut t: String = text.chars().take(2000).collect();
    if t.len() < text.len() {
        t.push('…');
    }
    t
}

impl Docker {
    /// A client for the daemon `DOCKER_HOST` names (default `unix:///var/run/docker.sock`),
    /// speaking the oldest API we support until [`Docker::negotiate`] is called.
    pub fn from_env() -> Result<Docker, DockerError> {
        let host = std::env::var("DOCKER_HOST").ok();
        let tls = std::env::var("DOCKER_TLS_VERIFY").ok();
        Ok(Docker::with_endpoint(host_from_env_values(
            host.as_deref(),
            tls.as_deref(),
        )?))
    }

    /// A client for `host` (`unix:///path` or `tcp://host:port`), not yet negotiated: it speaks
    /// API 1.41, which every daemon we support understands, until [`Docker::negotiate`].
    pub fn new(host: &str) -> Result<Docker, DockerError> {
        Ok(Docker::with_endpoint(Endpoint::parse(host)?))
    }

    /// A client for an already parsed endpoint.
    pub fn with_endpoint(endpoint: Endpoint) -> Docker {
        Docker {
            endpoint,
            api_version: MIN_API_VERSION.to_string(),
            timeout: DEFAULT_TIMEOUT,
            long_timeout: DEFAULT_LONG_TIMEOUT,
        }
    }

    /// [`Docker::new`] plus [`Docker::negotiate`].
    pub async fn connect(host: &str) -> Result<Docker, DockerError> {
        let mut d = Docker::new(host)?;
        d.negotiate().await?;
        Ok(d)
    }

    /// [`Docker::from_env`] plus [`Docker::negotiate`].
    pub async fn connect_env() -> Result<Docker, DockerError> {
        let mut d = Docker::from_env()?;
        d.negotiate().await?;
        Ok(d)
    }

    /// Picks the API version: min(daemon's ApiVersion, 1.44), refusing below 1.41.
    ///
    /// Asks the unversioned `GET /version` (which every daemon from 20.10 to 29 answers at its own
    /// newest version) rather than guessing, because request *and* answer shapes depend on the
    /// version in the path (MAC placement, multi-network create, Aliases contents).
    pub async fn negotiate(&mut self) -> Result<(), DockerError> {
        let path = "/version";
        let ans = self
            .raw(Method::GET, path, None, None, self.timeout)
            .await?;
        let (daemon_api, daemon_min, daemon_version) = if (200..300).contains(&ans.status) {
            let v: Value =
                serde_json::from_slice(&ans.body).map_err(|source| DockerError::Decode {
                    method: "GET".into(),
                    path: path.into(),
                    source,
                })?;
            let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
            let api = s("ApiVersion").ok_or_else(|| DockerError::Unexpected {
                method: "GET".into(),
                path: path.into(),
                detail: "no ApiVersion in the answer".into(),
            })?;
            (
                api,
                s("MinAPIVersion"),
                s("Version").unwrap_or_else(|| "(unknown version)".into()),
            )
        } else if let Some(api) = ans.api_version_header.clone() {
            // A daemon that refuses unversioned calls still names its version in a header.
            (api, None, "(unknown version)".into())
        } else {
            return Err(DockerError::Daemon {
                method: "GET".into(),
                path: path.into(),
                status: ans.status,
                message: daemon_message(ans.status, &ans.body),
            });
        };
        let unsupported = || DockerError::UnsupportedApiVersion {
            daemon_version: daemon_version.clone(),
            daemon_api: daemon_api.clone(),
            daemon_min: daemon_min.clone().unwrap_or_else(|| "unknown".into()),
            needed_min: MIN_API_VERSION.into(),
            ferry_max: MAX_API_VERSION.into(),
        };
        let theirs = ApiVersion::parse(&daemon_api)?;
        let chosen = theirs.min(ApiVersion::parse(MAX_API_VERSION)?);
        if chosen < ApiVersion::parse(MIN_API_VERSION)? {
            return Err(unsupported());
        }
        if let Some(min) = &daemon_min {
            if ApiVersion::parse(min)? > chosen {
                return Err(unsupported());
            }
        }
        self.api_version = chosen.to_string();
        tracing::debug!(endpoint = %self.endpoint, daemon = %daemon_version, daemon_api = %daemon_api, api = %self.api_version, "negotiated Docker API version");
        Ok(())
    }

    /// The API version in use ("1.41".."1.44").
    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    /// Overrides the negotiated version (e.g. to build bodies for an older peer in tests).
    pub fn set_api_version(&mut self, v: &str) -> Result<(), DockerError> {
        self.api_version = ApiVersion::parse(v)?.to_string();
        Ok(())
    }

    /// The daemon address.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sets the deadline for ordinary calls.
    pub fn with_timeout(mut self, t: Duration) -> Docker {
        self.timeout = t;
        self
    }

    /// Sets the deadline for calls that scale with container size (start, remove, import).
    pub fn with_long_timeout(mut self, t: Duration) -> Docker {
        self.long_timeout = t;
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn long_timeout(&self) -> Duration {
        self.long_timeout
    }

    fn api_ge(&self, v: &str) -> bool {
        match (ApiVersion::parse(&self.api_version), ApiVersion::parse(v)) {
            (Ok(a), Ok(b)) => a >= b,
            _ => false,
        }
    }

    /// One HTTP exchange, under `timeout`, with `target` sent as is.
    async fn raw(
        &self,
        method: Method,
        target: &str,
        body: Option<Bytes>,
        content_type: Option<&str>,
        timeout: Duration,
    ) -> Result<Answer, DockerError> {
        let m = method.to_string();
        let host_header = match &self.endpoint {
            // Any name works on a unix socket; the CLI sends "api.moby.localhost", older ones "docker".
            Endpoint::Unix(_) => "docker".to_string(),
            Endpoint::Tcp(a) => a.clone(),
        };
        let has_body = body.is_some();
        let mut builder = Request::builder()
            .method(method)
            .uri(target)
            .header(header::HOST, host_header)
            .header(
                header::USER_AGENT,
                concat!("ferry-docker/", env!("CARGO_PKG_VERSION")),
            );
        if has_body {
            builder = builder.header(
                header::CONTENT_TYPE,
                content_type.unwrap_or("application/json"),
            );
        }
        let req = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|source| DockerError::Request {
                method: m.clone(),
                path: target.into(),
                source,
            })?;

        let endpoint = self.endpoint.clone();
        let work = async {
            let res = match &endpoint {
                Endpoint::Unix(p) => {
                    let s = tokio::net::UnixStream::connect(p).await.map_err(|source| {
                        DockerError::Connect {
                            method: m.clone(),
                            path: target.into(),
                            endpoint: endpoint.to_string(),
                            source,
                        }
                    })?;
                    exchange(s, req).await
                }
                Endpoint::Tcp(a) => {
                    let s = tokio::net::TcpStream::connect(a.as_str())
                        .await
                        .map_err(|source| DockerError::Connect {
                            method: m.clone(),
                            path: target.into(),
                            endpoint: endpoint.to_string(),
                            source,
                        })?;
                    // Small requests, latency matters (migration downtime): no Nagle.
                    let _ = s.set_nodelay(true);
                    exchange(s, req).await
                }
            };
            res.map_err(|e| match e {
                ExchangeError::Http(source) => DockerError::Http {
                    method: m.clone(),
                    path: target.into(),
                    endpoint: endpoint.to_string(),
                    source,
                },
                ExchangeError::Body(source) => DockerError::Body {
                    method: m.clone(),
                    path: target.into(),
                    source,
                },
            })
        };
        let (status, headers, body) =
            tokio::time::timeout(timeout, work)
                .await
                .map_err(|_| DockerError::Timeout {
                    method: m.clone(),
                    path: target.into(),
                    endpoint: self.endpoint.to_string(),
                    after: timeout,
                })??;
        let api_version_header = headers
            .get("api-version")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(Answer {
            status: status.as_u16(),
            body,
            api_version_header,
        })
    }

    /// A versioned call: `/v{api}{path}`. Statuses in `also_ok` are returned rather than turned
    /// into [`DockerError::Daemon`] (404 for inspect, 304 for start/stop...).
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
        also_ok: &[u16],
    ) -> Result<(u16, Bytes, String), DockerError> {
        let target = format!("/v{}{}", self.api_version, path);
        let m = method.to_string();
        let bytes = match body {
            Some(v) => Some(Bytes::from(serde_json::to_vec(v).map_err(|source| {
                DockerError::Decode {
                    method: m.clone(),
                    path: target.clone(),
                    source,
                }
            })?)),
            None => None,
        };
        let ans = self.raw(method, &target, bytes, None, timeout).await?;
        if (200..300).contains(&ans.status) || also_ok.contains(&ans.status) {
            return Ok((ans.status, ans.body, target));
        }
        Err(DockerError::Daemon {
            method: m,
            path: target,
            status: ans.status,
            message: daemon_message(ans.status, &ans.body),
        })
    }

    fn decode(method: &str, target: &str, body: &[u8]) -> Result<Value, DockerError> {
        serde_json::from_slice(body).map_err(|source| DockerError::Decode {
            method: method.into(),
            path: target.into(),
            source,
        })
    }

    async fn get_json(&self, path: &str) -> Result<Value, DockerError> {
        let (_, body, target) = self
            .call(Method::GET, path, None, self.timeout, &[])
            .await?;
        Self::decode("GET", &target, &body)
    }

    async fn get_json_opt(&self, path: &str) -> Result<Option<Value>, DockerError> {
        let (status, body, target) = self
            .call(Method::GET, path, None, self.timeout, &[404])
            .await?;
        if status == 404 {
            return Ok(None);
        }
        Self::decode("GET", &target, &body).map(Some)
    }

    /// `GET /_ping`: "OK" when the daemon is up. Cheap liveness probe.
    pub async fn ping(&self) -> Result<String, DockerError> {
        let (_, body, _) = self
            .call(Method::GET, "/_ping", None, self.timeout, &[])
            .await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// `GET /version`.
    pub async fn version(&self) -> Result<Value, DockerError> {
        self.get_json("/version").await
    }

    /// `GET /info` (callers read ExperimentalBuild, DockerRootDir, Runtimes, CgroupVersion...).
    pub async fn info(&self) -> Result<Value, DockerError> {
        self.get_json("/info").await
    }

    /// `GET /containers/{id}/json`; `None` if there is no such container.
    pub async fn inspect_container(&self, name_or_id: &str) -> Result<Option<Value>, DockerError> {
        self.get_json_opt(&format!("/containers/{}/json", seg(name_or_id)))
            .await
    }

    /// `POST /containers/create?name=...`; returns the new container's Id.
    ///
    /// Below API 1.44 the daemon reads a MAC only from the top-level `MacAddress`, so the
    /// primary endpoint's `MacAddress` is copied there when the body has none. It also refuses
    /// a create naming several networks, so the body is sent
    /// with only the primary one (the one `HostConfig.NetworkMode` names) and the others are
    /// attached with `POST /networks/{net}/connect` before returning; if one of those fails the
    /// half-made container is removed, so callers see create as all-or-nothing on every version.
    /// Those extra networks keep their IP and aliases but not their MAC: below 1.44 the daemon
    /// has no way to set a MAC on a secondary endpoint.
    pub async fn create_container(&self, name: &str, body: &Value) -> Result<String, DockerError> {
        let endpoints = body
            .pointer("/NetworkingConfig/EndpointsConfig")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if self.api_ge("1.44") {
            return self.create_one(name, body).await;
        }
        let mode = body
            .pointer("/HostConfig/NetworkMode")
            .and_then(Value::as_str)
            .unwrap_or("");
        let primary =
            primary_network(mode, endpoints.keys().map(String::as_str)).unwrap_or_default();
        let mut first = body.clone();
        // Below 1.44 the daemon reads only the container-wide MAC; fill it from the primary
        // endpoint so a body written for 1.44 keeps its MAC on an old daemon too.
        let primary_mac = endpoints
            .get(&primary)
            .and_then(|e| e.get("MacAddress"))
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty());
        if let (Some(mac), Some(obj)) = (primary_mac, first.as_object_mut()) {
            if obj
                .get("MacAddress")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                obj.insert("MacAddress".into(), Value::String(mac.to_string()));
            }
        }
        if endpoints.len() <= 1 {
            return self.create_one(name, &first).await;
        }
        let mut rest = Vec::new();
        if let Some(eps) = first
            .pointer_mut("/NetworkingConfig/EndpointsConfig")
            .and_then(Value::as_object_mut)
        {
            let keys: Vec<String> = eps.keys().cloned().collect();
            for k in keys {
                if k != primary {
                    if let Some(ep) = eps.remove(&k) {
                        rest.push((k, ep));
                    }
                }
            }
        }
        let id = self.create_one(name, &first).await?;
        for (net, ep) in rest {
            if ep
                .get("MacAddress")
                .and_then(Value::as_str)
                .is_some_and(|m| !m.is_empty())
            {
                tracing::warn!(container = %name, network = %net, api = %self.api_version,
                    "Docker API below 1.44 cannot set a MAC address on a secondary network; the daemon will pick one");
            }
            if let Err(e) = self.connect_network(&net, &id, &ep).await {
                if let Err(cleanup) = self.remove_container(&id, true).await {
                    tracing::warn!(container = %id, error = %cleanup, "removing a half-created container failed");
                }
                return Err(e);
            }
        }
        Ok(id)
    }

    async fn create_one(&self, name: &str, body: &Value) -> Result<String, DockerError> {
        let path = with_query("/containers/create", &[("name", name)]);
        let (_, bytes, target) = self
            .call(Method::POST, &path, Some(body), self.timeout, &[])
            .await?;
        let v = Self::decode("POST", &target, &bytes)?;
        if let Some(w) = v.get("Warnings").and_then(Value::as_array) {
            for w in w.iter().filter_map(Value::as_str) {
                tracing::warn!(container = %name, warning = %w, "Docker warned on create");
            }
        }
        v.get("Id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| DockerError::Unexpected {
                method: "POST".into(),
                path: target,
                detail: "no Id in the answer".into(),
            })
    }

    /// `POST /networks/{net}/connect` with an endpoint config (IPAMConfig, Aliases, ...).
    pub async fn connect_network(
        &self,
        network: &str,
        container: &str,
        endpoint_config: &Value,
    ) -> Result<(), DockerError> {
        let body = json!({ "Container": container, "EndpointConfig": endpoint_config });
        self.call(
            Method::POST,
            &format!("/networks/{}/connect", seg(network)),
            Some(&body),
            self.timeout,
            &[],
        )
        .await?;
        Ok(())
    }

    /// `POST /containers/{id}/start`, or `?checkpoint=NAME` to restore from
    /// `<container dir>/checkpoints/NAME`. 304 (already running) is success: a retried start
    /// after a timeout must not fail a migration that in fact went through. Uses the long
    /// deadline because a restore copies the whole image set through containerd.
    pub async fn start_container(
        &self,
        id: &str,
        checkpoint: Option<&str>,
    ) -> Result<(), DockerError> {
        self.start_container_with_timeout(id, checkpoint, self.long_timeout)
            .await
    }

    /// [`Docker::start_container`] with an explicit deadline.
    pub async fn start_container_with_timeout(
        &self,
        id: &str,
        checkpoint: Option<&str>,
        timeout: Duration,
    ) -> Result<(), DockerError> {
        let base = format!("/containers/{}/start", seg(id));
        let path = match checkpoint {
            Some(c) => with_query(&base, &[("checkpoint", c)]),
            None => base,
        };
        self.call(Method::POST, &path, None, timeout, &[304])
            .await?;
        Ok(())
    }

    /// `POST /containers/{id}/pause` (cgroup freezer).
    pub async fn pause(&self, id: &str) -> Result<(), DockerError> {
        self.call(
            Method::POST,
            &format!("/containers/{}/pause", seg(id)),
            None,
            self.timeout,
            &[],
        )
        .await?;
        Ok(())
    }

    /// `POST /containers/{id}/unpause`.
    pub async fn unpause(&self, id: &str) -> Result<(), DockerError> {
        self.call(
            Method::POST,
            &format!("/containers/{}/unpause", seg(id)),
            None,
            self.timeout,
            &[],
        )
        .await?;
        Ok(())
    }

    /// `POST /containers/{id}/kill?signal=SIG` ("SIGKILL", "TERM", "9" all work).
    pub async fn kill(&self, id: &str, signal: &str) -> Result<(), DockerError> {
        let path = with_query(
            &format!("/containers/{}/kill", seg(id)),
            &[("signal", signal)],
        );
        self.call(Method::POST, &path, None, self.timeout, &[])
            .await?;
        Ok(())
    }

    /// `POST /containers/{id}/stop?t=N`; 304 (already stopped) is success. The deadline is
    /// the grace period plus the ordinary timeout, since the daemon answers only after the kill.
    pub async fn stop(&self, id: &str, timeout_s: u32) -> Result<(), DockerError> {
        let path = with_query(
            &format!("/containers/{}/stop", seg(id)),
            &[("t", &timeout_s.to_string())],
        );
        let deadline = self.timeout + Duration::from_secs(u64::from(timeout_s));
        self.call(Method::POST, &path, None, deadline, &[304])
            .await?;
        Ok(())
    }

    /// `DELETE /containers/{id}?force=..&v=false`. 404 is success (idempotent cleanup after a
    /// failed migration). Volumes are never removed: `v=false` is sent explicitly because a
    /// migrated container's volumes may be the only copy of its data.
    pub async fn remove_container(&self, id: &str, force: bool) -> Result<(), DockerError> {
        let path = with_query(
            &format!("/containers/{}", seg(id)),
            &[
                ("force", if force { "true" } else { "false" }),
                ("v", "false"),
            ],
        );
        self.call(Method::DELETE, &path, None, self.long_timeout, &[404])
            .await?;
        Ok(())
    }

    /// `POST /containers/{id}/update {"RestartPolicy": policy}`: ferry sets the source's policy
    /// to "no" before checkpointing, or Docker restarts it empty the moment CRIU kills it.
    pub async fn update_restart_policy(&self, id: &str, policy: &Value) -> Result<(), DockerError> {
        let body = json!({ "RestartPolicy": policy });
        let (_, bytes, _) = self
            .call(
                Method::POST,
                &format!("/containers/{}/update", seg(id)),
                Some(&body),
                self.timeout,
                &[],
            )
            .await?;
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            for w in v
                .get("Warnings")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                tracing::warn!(container = %id, warning = %w, "Docker warned on update");
            }
        }
        Ok(())
    }

    /// `GET /images/{name}/json`; `None` if absent. `name` may be an ID, `repo:tag` or digest.
    pub async fn inspect_image(&self, id: &str) -> Result<Option<Value>, DockerError> {
        self.get_json_opt(&format!("/images/{}/json", percent_encode(id, b":@/")))
            .await
    }

    /// `GET /networks/{id}`; `None` if absent.
    pub async fn inspect_network(&self, name_or_id: &str) -> Result<Option<Value>, DockerError> {
        self.get_json_opt(&format!("/networks/{}", seg(name_or_id)))
            .await
    }

    /// `POST /networks/create` with a full body (`{"Name":..,"Driver":..,"IPAM":..,"Options":..}`);
    /// returns the network's Id.
    pub async fn create_network(&self, body: &Value) -> Result<String, DockerError> {
        let (_, bytes, target) = self
            .call(
                Method::POST,
                "/networks/create",
                Some(body),
                self.timeout,
                &[],
            )
            .await?;
        let v = Self::decode("POST", &target, &bytes)?;
        v.get("Id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| DockerError::Unexpected {
                method: "POST".into(),
                path: target,
                detail: "no Id in the answer".into(),
            })
    }

    /// `DELETE /networks/{id}`; 404 is success.
    pub async fn remove_network(&self, name_or_id: &str) -> Result<(), DockerError> {
        self.call(
            Method::DELETE,
            &format!("/networks/{}", seg(name_or_id)),
            None,
            self.timeout,
            &[404],
        )
        .await?;
        Ok(())
    }

    /// `DELETE /volumes/{name}`; 404 is success. Only ever called explicitly (tests, cleanup of
    /// a volume ferry itself created), never as a side effect of removing a container.
    /// `GET /volumes/{name}`; `None` if absent.
    pub async fn inspect_volume(&self, name: &str) -> Result<Option<Value>, DockerError> {
        self.get_json_opt(&format!("/volumes/{}", seg(name))).await
    }

    pub async fn remove_volume(&self, name: &str) -> Result<(), DockerError> {
        self.call(
            Method::DELETE,
            &format!("/volumes/{}", seg(name)),
            None,
            self.timeout,
            &[404],
        )
        .await?;
        Ok(())
    }

    /// `GET /containers/json?all=..`.
    pub async fn list_containers(&self, all: bool) -> Result<Vec<Value>, DockerError> {
        let path = with_query(
            "/containers/json",
            &[("all", if all { "true" } else { "false" })],
        );
        let v = self.get_json(&path).await?;
        match v {
            Value::Array(a) => Ok(a),
            _ => Err(DockerError::Unexpected {
                method: "GET".into(),
                path: format!("/v{}{}", self.api_version, path),
                detail: "expected a JSON array".into(),
            }),
        }
    }

    /// `GET /containers/{id}/logs?stdout&stderr[&tail=N]`: the container's output as text,
    /// stdout and stderr interleaved. For diagnostics (why did a restored container die?)
    /// and tests; not a streaming follower.
    pub async fn logs(&self, id: &str, tail: Option<u32>) -> Result<String, DockerError> {
        let tail = tail.map(|t| t.to_string()).unwrap_or_else(|| "all".into());
        let path = with_query(
            &format!("/containers/{}/logs", seg(id)),
            &[("stdout", "true"), ("stderr", "true"), ("tail", &tail)],
        );
        let (_, body, _) = self
            .call(Method::GET, &path, None, self.timeout, &[])
            .await?;
        Ok(String::from_utf8_lossy(&demux_logs(&body)).into_owned())
    }

    /// `POST /images/create?fromSrc=-`: imports a root file system tar as an image (`docker
    /// import`), with Dockerfile-style `changes` such as `CMD ["/bin/sh"]`. The daemon answers
    /// 200 with a progress stream even when the import fails, so the stream is scanned for
    /// `"error"` and that is returned as a daemon error. Returns the image ID when the daemon
    /// reports it.
    pub async fn import_image(
        &self,
        tar: Bytes,
        repo: &str,
        tag: &str,
        changes: &[&str],
    ) -> Result<Option<String>, DockerError> {
        let mut q: Vec<(&str, &str)> = vec![("fromSrc", "-"), ("repo", repo), ("tag", tag)];
        for c in changes {
            q.push(("changes", c));
        }
        let target = format!("/v{}{}", self.api_version, with_query("/images/create", &q));
        let ans = self
            .raw(
                Method::POST,
                &target,
                Some(tar),
                Some("application/x-tar"),
                self.long_timeout,
            )
            .await?;
        if !(200..300).contains(&ans.status) {
            return Err(DockerError::Daemon {
                method: "POST".into(),
                path: target,
                status: ans.status,
                message: daemon_message(ans.status, &ans.body),
            });
        }
        let mut id = None;
        for v in serde_json::Deserializer::from_slice(&ans.body).into_iter::<Value>() {
            let v = v.map_err(|source| DockerError::Decode {
                method: "POST".into(),
                path: target.clone(),
                source,
            })?;
            if let Some(e) = v.get("error").and_then(Value::as_str) {
                return Err(DockerError::Daemon {
                    method: "POST".into(),
                    path: target,
                    status: ans.status,
                    message: e.to_string(),
                });
            }
            if let Some(s) = v.get("status").and_then(Value::as_str) {
                if s.starts_with("sha256:") {
                    id = Some(s.to_string());
                }
            }
        }
        Ok(id)
    }

    /// `POST /containers/{id}/checkpoints` (experimental daemons only): Docker's own
    /// checkpoint, the slow baseline path. `exit` stops the container after dumping.
    pub async fn create_checkpoint(
        &self,
        id: &str,
        name: &str,
        exit: bool,
    ) -> Result<(), DockerError> {
        let body = json!({ "CheckpointID": name, "Exit": exit });
        self.call(
            Method::POST,
            &format!("/containers/{}/checkpoints", seg(id)),
            Some(&body),
            self.long_timeout,
            &[],
        )
        .await?;
        Ok(())
    }

    /// `GET /containers/{id}/checkpoints` (experimental daemons only): names under the
    /// container's checkpoints/ dir.
    pub async fn list_checkpoints(&self, id: &str) -> Result<Vec<String>, DockerError> {
        let v = self
            .get_json(&format!("/containers/{}/checkpoints", seg(id)))
            .await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("Name").and_then(Value::as_str).map(str::to_string))
            .collect())
    }

    /// `DELETE /containers/{id}/checkpoints/{name}` (experimental daemons only). Idempotent:
    /// a missing container (404) or checkpoint is success. Docker 20.10 to 28 answer a missing
    /// checkpoint with *500* "checkpoint X does not exist for container Y", so that answer is
    /// recognised by its text.
    pub async fn delete_checkpoint(&self, id: &str, name: &str) -> Result<(), DockerError> {
        let path = format!("/containers/{}/checkpoints/{}", seg(id), seg(name));
        match self
            .call(Method::DELETE, &path, None, self.timeout, &[404])
            .await
        {
            Err(DockerError::Daemon {
                status: 500,
                message,
                ..
            }) if message.contains("does not exist for container") => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Ok(()),
        }
    }

    /// Polls inspect until `State.Running` (a paused container counts as running), and returns
    /// that inspect. Fails at once when the container is exited/dead, or "created" with an
    /// `State.Error` (a failed `start --checkpoint` leaves it there), naming the exit code and
    /// error. Keeps waiting through "restarting" (the restart policy may bring it back) and a
    /// plain "created" (a start may be in flight). Call it after `start_container` returned.
    ///
    /// Polls every 20 ms at first, backing off to 250 ms: the first answers decide migration
    /// downtime, later ones only cost daemon load.
    pub async fn wait_running(&self, id: &str, timeout: Duration) -> Result<Value, DockerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut interval = Duration::from_millis(20);
        let mut last_status = String::from("unknown");
        loop {
            let inspect = match tokio::time::timeout_at(deadline, self.inspect_container(id)).await
            {
                Ok(r) => r?,
                Err(_) => break,
            };
            let Some(v) = inspect else {
                return Err(DockerError::Vanished { id: id.to_string() });
            };
            let state = v.get("State").cloned().unwrap_or(Value::Null);
            let b = |k: &str| state.get(k).and_then(Value::as_bool).unwrap_or(false);
            let status = state
                .get("Status")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let error = state
                .get("Error")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if b("Running") {
                return Ok(v);
            }
            let gone = matches!(status.as_str(), "exited" | "dead" | "removing")
                || b("Dead")
                || (status == "created" && !error.is_empty());
            if gone && !b("Restarting") {
                return Err(DockerError::NotRunning {
                    id: id.to_string(),
                    status,
                    exit_code: state.get("ExitCode").and_then(Value::as_i64).unwrap_or(-1),
                    error,
                });
            }
            last_status = status;
            if tokio::time::Instant::now() + interval >= deadline {
                break;
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(250));
        }
        Err(DockerError::WaitTimeout {
            id: id.to_string(),
            after: timeout,
            status: last_status,
        })
    }
}

/// The network a pre-1.44 create should carry: the one `NetworkMode` names ("default" means
/// the default bridge), else the first by name so the choice is stable.
pub(crate) fn primary_network<'a>(
    network_mode: &str,
    names: impl Iterator<Item = &'a str>,
) -> Option<String> {
    let names: Vec<&str> = names.collect();
    let wanted = if network_mode.is_empty() || network_mode == "default" {
        "bridge"
    } else {
        network_mode
    };
    if let Some(n) = names.iter().find(|n| **n == wanted) {
        return Some(n.to_string());
    }
    let mut sorted = names;
    sorted.sort_unstable();
    sorted.first().map(|s| s.to_string())
}

/// Strips Docker's log multiplexing (8-byte frame headers: stream, 0, 0, 0, u32 BE length) from a
/// non-TTY container's logs; TTY logs (no headers) are returned as they are.
pub(crate) fn demux_logs(body: &[u8]) -> Vec<u8> {
    let framed = |b: &[u8]| b.len() >= 8 && b[0] <= 2 && b[1..4] == [0, 0, 0];
    if !framed(body) {
        return body.to_vec();
    }
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while framed(rest) {
        let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let end = (8 + len).min(rest.len());
        out.extend_from_slice(&rest[8..end]);
        rest = &rest[end..];
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demux() {
        let mut b = vec![1, 0, 0, 0, 0, 0, 0, 6];
        b.extend_from_slice(b"tick 1");
        b.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 4]);
        b.extend_from_slice(b"err\n");
        assert_eq!(demux_logs(&b), b"tick 1err\n");
        assert_eq!(demux_logs(b"plain tty output"), b"plain tty output");
        // truncated frame: keep what is there
        assert_eq!(demux_logs(&[1, 0, 0, 0, 0, 0, 0, 9, b'a']), b"a");
        assert_eq!(demux_logs(&[]), b"");
    }

    #[test]
    fn primary_network_choice() {
        let nets = ["zeta", "alpha", "bridge"];
        assert_eq!(
            primary_network("zeta", nets.iter().copied()).as_deref(),
            Some("zeta")
        );
        assert_eq!(
            primary_network("default", nets.iter().copied()).as_deref(),
            Some("bridge")
        );
        assert_eq!(
            primary_network("gone", nets.iter().copied()).as_deref(),
            Some("alpha")
        );
        assert_eq!(primary_network("x", std::iter::empty()), None);
    }
}
