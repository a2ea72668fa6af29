//! Optional per-exchange latency log for the clients (`--latency-log FILE`).
//!
//! The summary only keeps the longest gap; a benchmark that plots latency around a migration
//! needs every exchange. One line per exchange keeps the format trivial to parse and plot.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Buffered, and flushed at most every [`FLUSH_EVERY`] (after an exchange has been timed, so
/// writing never adds to a measured latency): often enough that a benchmark can follow the
/// file live, e.g. to see the first reply after a migration.
pub struct LatencyLog {
    out: BufWriter<File>,
    last_flush: Instant,
}

pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

impl LatencyLog {
    /// Creates the file and writes the header. `start_unix_ms` anchors the relative `t_ms`
    /// values to wall-clock time, so they can be lined up with events seen by other processes.
    pub fn create(path: &Path) -> io::Result<LatencyLog> {
        let start_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0);
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
        writeln!(out, "{}", header(start_unix_ms))?;
        out.flush()?;
        Ok(LatencyLog {
            out,
            last_flush: Instant::now(),
        })
    }

    /// `t_ms`: when the reply arrived, ms since the client started; `latency_ms`: since the
    /// request was sent.
    pub fn record(&mut self, t_ms: f64, latency_ms: f64) -> io::Result<()> {
        writeln!(self.out, "{}", line(t_ms, latency_ms))?;
        if self.last_flush.elapsed() >= FLUSH_EVERY {
            self.out.flush()?;
            self.last_flush = Instant::now();
        }
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
}

pub fn header(start_unix_ms: f64) -> String {
    format!("# t_ms latency_ms start_unix_ms={start_unix_ms:.3}")
}

pub fn line(t_ms: f64, latency_ms: f64) -> String {
    format!("{t_ms:.3} {latency_ms:.3}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_header_and_lines() {
        let dir = std::env::temp_dir().join(format!("ferry-latency-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("lat.log");
        let mut log = LatencyLog::create(&p).unwrap();
        log.record(5.0, 0.25).unwrap();
        std::thread::sleep(FLUSH_EVERY);
        log.record(10.5, 1.125).unwrap();
        // Flushed without finish(): readable while the client runs.
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().count(), 3);
        log.finish().unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("# t_ms latency_ms start_unix_ms="),
            "{text}"
        );
        let start: f64 = lines[0].rsplit('=').next().unwrap().parse().unwrap();
        assert!(start > 1.6e12, "{start}");
        assert_eq!(&lines[1..], ["5.000 0.250", "10.500 1.125"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
