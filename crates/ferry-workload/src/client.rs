//! The line-protocol client: one connection for the whole run, so a migration that breaks or
//! resets the connection shows up as a failure rather than being papered over by a reconnect.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::latency::LatencyLog;
use crate::stop::Stop;
use crate::summary::{emit, Summary};

/// Long enough to ride out a slow migration, short enough that a lost connection ends the run.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ClientOpts {
    pub addr: SocketAddr,
    pub interval: Duration,
    pub stop: Stop,
    pub out: Option<PathBuf>,
    /// `--latency-log FILE`: one `t_ms latency_ms` line per exchange (see `latency`).
    pub latency_log: Option<PathBuf>,
    /// `--read-timeout-s S` (default [`READ_TIMEOUT`]): a benchmark of a migration path that
    /// pauses longer than 30 s (the manual docker path at 2 GB) must not count that pause as
    /// a lost connection.
    pub read_timeout: Duration,
}

/// Connects like [`connect`], with the run's own read/write timeout.
pub fn connect_for(opts: &ClientOpts) -> io::Result<TcpStream> {
    let s = connect(opts.addr)?;
    s.set_read_timeout(Some(opts.read_timeout))?;
    s.set_write_timeout(Some(opts.read_timeout))?;
    Ok(s)
}

pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    s.set_write_timeout(Some(READ_TIMEOUT))?;
    Ok(s)
}

pub fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!("timed out: {e}"),
        _ => e.to_string(),
    }
}

/// Runs ticks until a stop condition or a connection failure; `tick` performs one exchange.
/// Always returns the summary so the caller can write it whatever happened.
pub fn run_loop(
    opts: &ClientOpts,
    summary: &mut Summary,
    mut tick: impl FnMut(&mut Summary, Instant) -> Result<(), String>,
) {
    let mut log = match opts.latency_log.as_deref().map(LatencyLog::create) {
        None => None,
        Some(Ok(log)) => Some(log),
        Some(Err(e)) => {
            summary.error(format!("create latency log: {e}"));
            summary.stopped_by = "error".to_string();
            return;
        }
    };
    let started = Instant::now();
    let mut next = started;
    loop {
        if let Some(reason) = opts.stop.sleep_until(next) {
            summary.stopped_by = reason.to_string();
            break;
        }
        let sent_ms = ms_since(started);
        if let Err(e) = tick(summary, started) {
            summary.error(e);
            summary.stopped_by = "error".to_string();
            break;
        }
        if let Some(l) = log.as_mut() {
            let t = ms_since(started);
            if let Err(e) = l.record(t, t - sent_ms) {
                summary.error(format!("write latency log: {e}"));
                log = None;
            }
        }
        next = (next + opts.interval).max(Instant::now());
    }
    summary.elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    if let Some(Err(e)) = log.map(LatencyLog::finish) {
        summary.error(format!("write latency log: {e}"));
    }
}

pub fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

pub fn finish(opts: &ClientOpts, summary: &Summary) -> i32 {
    if let Err(e) = emit(opts.out.as_deref(), &summary.to_json()) {
        eprintln!("cannot write summary: {e}");
        return 2;
    }
    if summary.ok() {
        0
    } else {
        1
    }
}

pub fn run(opts: ClientOpts) -> i32 {
    let mut summary = Summary::new();
    let stream = match connect_for(&opts) {
        Ok(s) => s,
        Err(e) => {
            summary.error(format!("connect {}: {}", opts.addr, describe(&e)));
            summary.stopped_by = "error".to_string();
            return finish(&opts, &summary);
        }
    };
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            summary.error(format!("clone socket: {e}"));
            summary.stopped_by = "error".to_string();
            return finish(&opts, &summary);
        }
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    run_loop(&opts, &mut summary, |summary, started| {
        writer
            .write_all(b"INCR\n")
            .map_err(|e| format!("at {:.1} ms: send: {}", ms_since(started), describe(&e)))?;
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| format!("at {:.1} ms: receive: {}", ms_since(started), describe(&e)))?;
        let t = ms_since(started);
        if n == 0 {
            return Err(format!("at {t:.1} ms: connection closed by peer"));
        }
        let value: i64 = line
            .trim_end()
            .parse()
            .map_err(|_| format!("at {t:.1} ms: unexpected reply {:?}", line.trim_end()))?;
        summary.counter(value, t);
        Ok(())
    });
    finish(&opts, &summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn read_timeout_ends_a_silent_run_and_logs_latency() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Answers twice, then goes silent with the connection open.
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            for n in 1..=2 {
                line.clear();
                r.read_line(&mut line).unwrap();
                w.write_all(format!("{n}\n").as_bytes()).unwrap();
            }
            std::thread::sleep(Duration::from_secs(1));
        });
        let dir = std::env::temp_dir().join(format!("ferry-client-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (out, log) = (dir.join("summary.json"), dir.join("latency.log"));
        let started = Instant::now();
        let code = run(ClientOpts {
            addr,
            interval: Duration::from_millis(5),
            stop: Stop::new(Some(Duration::from_secs(10)), None),
            out: Some(out.clone()),
            latency_log: Some(log.clone()),
            read_timeout: Duration::from_millis(300),
        });
        assert_eq!(code, 1);
        assert!(started.elapsed() < Duration::from_secs(2));
        let summary = std::fs::read_to_string(&out).unwrap();
        assert!(summary.contains("timed out"), "{summary}");
        assert!(summary.contains("\"replies\":2"), "{summary}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
