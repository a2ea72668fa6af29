//! Streamed image save/load: an image moves between hosts without being staged whole in
//! memory or on disk (`GET /images/{id}/get` → the peer → `POST /images/load`).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{header, Method, Request};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use crate::host::Endpoint;
use crate::util::percent_encode;
use crate::{Docker, DockerError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Between two chunks of an image stream; a stalled daemon or peer ends the transfer.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(120);

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

impl Docker {
    async fn open(&self, method: &str, path: &str) -> Result<Box<dyn Io>, DockerError> {
        let err = |source| DockerError::Connect {
            method: method.into(),
            path: path.into(),
            endpoint: self.endpoint().to_string(),
            source,
        };
        Ok(match &self.endpoint() {
            Endpoint::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await.map_err(err)?),
            Endpoint::Tcp(a) => Box::new(
                tokio::net::TcpStream::connect(a.as_str())
                    .await
                    .map_err(err)?,
            ),
        })
    }

    /// Streams `docker save` of one image into `tx`; returns the bytes sent.
    pub async fn save_image(&self, id: &str, tx: mpsc::Sender<Bytes>) -> Result<u64, DockerError> {
        let path = format!(
            "/v{}/images/{}/get",
            self.api_version(),
            percent_encode(id, b":@/")
        );
        let io = self.open("GET", &path).await?;
        let http = |source| DockerError::Http {
            method: "GET".into(),
            path: path.clone(),
            endpoint: self.endpoint().to_string(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(http)?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(Method::GET)
            .uri(&path)
            .header(header::HOST, "docker")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|source| DockerError::Request {
                method: "GET".into(),
                path: path.clone(),
                source,
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        if status != 200 {
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            driver.abort();
            return Err(DockerError::Daemon {
                method: "GET".into(),
                path,
                status,
                message: String::from_utf8_lossy(&bytes).trim().to_string(),
            });
        }
        let mut total = 0u64;
        loop {
            let frame = match tokio::time::timeout(CHUNK_TIMEOUT, body.frame()).await {
                Err(_) => {
                    driver.abort();
                    return Err(DockerError::Timeout {
                        method: "GET".into(),
                        path,
                        endpoint: self.endpoint().to_string(),
                        after: CHUNK_TIMEOUT,
                    });
                }
                Ok(None) => break,
                Ok(Some(f)) => f.map_err(|e| DockerError::Body {
                    method: "GET".into(),
                    path: path.clone(),
                    source: Box::new(e),
                })?,
            };
            if let Ok(data) = frame.into_data() {
                total += data.len() as u64;
                if tx.send(data).await.is_err() {
                    driver.abort();
                    return Err(DockerError::Body {
                        method: "GET".into(),
                        path,
                        source: "the receiver of the image stream went away".into(),
                    });
                }
            }
        }
        driver.abort();
        Ok(total)
    }

    /// `docker load` with the image tar streamed from `rx` (ends when the sender is dropped).
    pub async fn load_image(&self, rx: mpsc::Receiver<Bytes>) -> Result<(), DockerError> {
        let path = format!("/v{}/images/load?quiet=1", self.api_version());
        let io = self.open("POST", &path).await?;
        let http = |source| DockerError::Http {
            method: "POST".into(),
            path: path.clone(),
            endpoint: self.endpoint().to_string(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(http)?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut rx = rx;
        let stream = futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
                .map(|o| o.map(|b| Ok::<_, BoxError>(Frame::data(b))))
        });
        let req = Request::builder()
            .method(Method::POST)
            .uri(&path)
            .header(header::HOST, "docker")
            .header(header::CONTENT_TYPE, "application/x-tar")
            .body(StreamBody::new(stream))
            .map_err(|source| DockerError::Request {
                method: "POST".into(),
                path: path.clone(),
                source,
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        driver.abort();
        let text = String::from_utf8_lossy(&bytes);
        // The daemon reports load errors inside a 200 JSON message stream.
        let stream_error = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
        if status != 200 || stream_error.is_some() {
            return Err(DockerError::Daemon {
                method: "POST".into(),
                path,
                status,
                message: stream_error.unwrap_or_else(|| text.trim().to_string()),
            });
        }
        Ok(())
    }
}
