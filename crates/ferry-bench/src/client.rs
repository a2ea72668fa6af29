//! The Redis client that measures what a user of the container sees: `ferry-workload
//! redis-client` in the test bed's client namespace, one connection, INCR+SET every tick,
//! with a per-exchange latency log.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::Child;

use crate::error::BenchError;

/// How long a stopped client may take to write its summary and exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The fields of the client's JSON summary the benchmark uses (see `ferry-workload` usage).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ClientSummary {
    pub replies: u64,
    #[serde(default)]
    pub first: Option<i64>,
    #[serde(default)]
    pub last: Option<i64>,
    pub continuous: bool,
    pub max_gap_ms: f64,
    #[serde(default)]
    pub errors: Vec<String>,
    pub ok: bool,
    /// `[ms since client start when the gap began, gap ms]`.
    #[serde(default)]
    pub gaps_over_100ms: Vec<(f64, f64)>,
    #[serde(default)]
    pub elapsed_ms: f64,
    #[serde(default)]
    pub stopped_by: String,
    #[serde(default)]
    pub sets: Option<u64>,
}

/// One exchange from the latency log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyPoint {
    /// Wall clock (Unix ms) when the reply arrived.
    pub unix_ms: f64,
    pub latency_ms: f64,
}

/// Parses `ferry-workload --latency-log` output: a `# ... start_unix_ms=S` header, then
/// `t_ms latency_ms` lines relative to S. Malformed lines are skipped (a killed client may
/// leave half a line).
pub fn parse_latency_log(text: &str) -> Result<Vec<LatencyPoint>, String> {
    let mut lines = text.lines();
    let header = lines.next().ok_or("latency log is empty")?;
    let start: f64 = header
        .split_whitespace()
        .find_map(|w| w.strip_prefix("start_unix_ms="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("latency log header lacks start_unix_ms: {header:?}"))?;
    Ok(lines
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let t: f64 = it.next()?.parse().ok()?;
            let lat: f64 = it.next()?.parse().ok()?;
            Some(LatencyPoint {
                unix_ms: start + t,
                latency_ms: lat,
            })
        })
        .collect())
}

/// Wall-clock time of the newest complete line of a latency log that is still being written
/// (the client flushes it every 200 ms): reads the header and only the file's tail.
pub fn last_reply_unix_ms(path: &Path) -> Option<f64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = [0u8; 256];
    let n = f.read(&mut head).ok()?;
    let header = String::from_utf8_lossy(&head[..n]);
    let start: f64 = header
        .lines()
        .next()?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("start_unix_ms="))?
        .parse()
        .ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut tail = String::new();
    f.read_to_string(&mut tail).ok()?;
    // Only lines ending in '\n' are complete.
    let complete = &tail[..tail.rfind('\n')?];
    let t: f64 = complete
        .lines()
        .next_back()
        .filter(|l| !l.starts_with('#'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(start + t)
}

/// A running client; killed if dropped before [`Client::stop`].
pub struct Client {
    child: Child,
    stop_file: PathBuf,
    summary: PathBuf,
    latency_log: PathBuf,
}

impl Client {
    /// Starts the client against `addr` with files in `dir`. `max_run` bounds its life on its
    /// own, in case the benchmark dies without stopping it; `read_timeout` must outlast the
    /// longest pause measured, or the client would call a slow migration a lost connection.
    pub fn start(
        netns: &str,
        workload_exe: &Path,
        addr: &str,
        interval_ms: u64,
        dir: &Path,
        max_run: Duration,
        read_timeout: Duration,
    ) -> Result<Client, BenchError> {
        let step = format!("start the redis client against {addr}");
        let stop_file = dir.join("client.stop");
        let summary = dir.join("client.json");
        let latency_log = dir.join("latency.log");
        for p in [&stop_file, &summary, &latency_log] {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(BenchError::io(&step, p, e)),
            }
        }
        let stderr_path = dir.join("client.stderr");
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(|e| BenchError::io(&step, &stderr_path, e))?;
        let mut c = ferry_testbed::netns_command(netns, workload_exe);
        c.arg("redis-client")
            .args(["--addr", addr])
            .args(["--interval-ms", &interval_ms.to_string()])
            .args(["--duration-s", &max_run.as_secs().to_string()])
            .args(["--read-timeout-s", &read_timeout.as_secs().to_string()])
            .arg("--stop-file")
            .arg(&stop_file)
            .arg("--out")
            .arg(&summary)
            .arg("--latency-log")
            .arg(&latency_log)
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        let child = c.spawn().map_err(|source| BenchError::Spawn {
            step,
            cmd: format!(
                "ip netns exec {netns} {} redis-client",
                workload_exe.display()
            ),
            source,
        })?;
        Ok(Client {
            child,
            stop_file,
            summary,
            latency_log,
        })
    }

    /// Fails if the client already exited, e.g. because it could not connect.
    pub fn check_running(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::failed(
                "redis client",
                format!(
                    "exited early ({status}); summary: {}",
                    std::fs::read_to_string(&self.summary).unwrap_or_default()
                ),
            )),
            Err(e) => Err(BenchError::failed(
                "redis client",
                format!("cannot poll: {e}"),
            )),
        }
    }

    /// Waits until the client has had a reply at or after `since_unix_ms` (it resumed after
    /// the migration), it exits, or `timeout` passes; returns whether it resumed. The client
    /// resends only when its TCP retransmission timer fires, which can be seconds after the
    /// container is back: stopping it before would cut the gap short.
    pub async fn wait_resumed(&mut self, since_unix_ms: f64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if last_reply_unix_ms(&self.latency_log).is_some_and(|t| t >= since_unix_ms) {
                return true;
            }
            if self.check_running().is_err() || tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks the client to stop (stop file), waits for its summary, and returns it.
    pub async fn stop(mut self) -> Result<ClientSummary, BenchError> {
        let step = "stop the redis client";
        std::fs::write(&self.stop_file, b"stop")
            .map_err(|e| BenchError::io(step, &self.stop_file, e))?;
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(BenchError::failed(step, format!("wait: {e}"))),
            Err(_) => {
                let _ = self.child.kill().await;
                return Err(BenchError::Timeout {
                    step: step.into(),
                    timeout: STOP_TIMEOUT,
                });
            }
        }
        let text = std::fs::read_to_string(&self.summary)
            .map_err(|e| BenchError::io("read the client summary", &self.summary, e))?;
        serde_json::from_str(&text).map_err(|e| BenchError::json("parse the client summary", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_summary_as_workload_writes_it() {
        let j = r#"{"replies":630,"first":651,"last":1280,"continuous":true,"max_gap_ms":4839.890,"errors":[],"ok":true,"gaps_over_100ms":[[1095.794,4839.890]],"elapsed_ms":7987.044,"stopped_by":"stop-file","sets":630}"#;
        let s: ClientSummary = serde_json::from_str(j).unwrap();
        assert!(s.ok && s.continuous);
        assert_eq!(s.max_gap_ms, 4839.89);
        assert_eq!(s.gaps_over_100ms, vec![(1095.794, 4839.89)]);
        assert_eq!(s.sets, Some(630));
    }

    #[test]
    fn last_reply_ignores_a_half_written_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("latency.log");
        std::fs::write(&p, "# t_ms latency_ms start_unix_ms=1000.000\n").unwrap();
        assert_eq!(last_reply_unix_ms(&p), None);
        let mut text = String::from("# t_ms latency_ms start_unix_ms=1000.000\n");
        for i in 0..2000 {
            text.push_str(&format!("{}.000 0.100\n", i * 5));
        }
        text.push_str("99999.0");
        std::fs::write(&p, &text).unwrap();
        assert_eq!(last_reply_unix_ms(&p), Some(1000.0 + 1999.0 * 5.0));
        assert_eq!(last_reply_unix_ms(&d.path().join("none")), None);
    }

    #[test]
    fn parses_latency_log() {
        let text = "# t_ms latency_ms start_unix_ms=1000.5\n0.088 0.081\n5.175 0.093\n5935.689 4835.517\n12.3";
        let p = parse_latency_log(text).unwrap();
        assert_eq!(p.len(), 3);
        assert!((p[0].unix_ms - 1000.588).abs() < 1e-9);
        assert_eq!(p[2].latency_ms, 4835.517);
        assert!(parse_latency_log("").is_err());
        assert!(parse_latency_log("# no start\n1 2\n").is_err());
    }
}
