//! What a client saw during a run, reduced to the numbers a migration test asserts on.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// Gaps longer than this are listed individually: they are the migration's visible pause.
pub const GAP_REPORT_MS: f64 = 100.0;
/// Keeps a flapping run from producing a multi-megabyte summary.
const MAX_ERRORS: usize = 100;

/// Tracks inter-reply gaps on the fly so arbitrarily long runs use constant memory
/// (apart from the list of long gaps).
#[derive(Debug, Default, Clone)]
pub struct Gaps {
    prev_ms: Option<f64>,
    pub max_gap_ms: f64,
    /// `(t_ms, gap_ms)` where `t_ms` is when the gap began (the earlier reply), relative to start.
    pub over: Vec<(f64, f64)>,
}

impl Gaps {
    /// Records a successful reply at `t_ms` since the client started.
    pub fn record(&mut self, t_ms: f64) {
        if let Some(prev) = self.prev_ms {
            let gap = t_ms - prev;
            if gap > self.max_gap_ms {
                self.max_gap_ms = gap;
            }
            if gap > GAP_REPORT_MS {
                self.over.push((prev, gap));
            }
        }
        self.prev_ms = Some(t_ms);
    }
}

/// Run summary written as JSON at the end of every client run, failed or not.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub replies: u64,
    pub first: Option<i64>,
    pub last: Option<i64>,
    pub continuous: bool,
    pub gaps: Gaps,
    pub errors: Vec<String>,
    dropped_errors: u64,
    /// Only reported by the Redis client.
    pub sets: Option<u64>,
    pub elapsed_ms: f64,
    pub stopped_by: String,
}

impl Summary {
    pub fn new() -> Summary {
        Summary {
            continuous: true,
            ..Summary::default()
        }
    }

    /// Records one counter value; a value other than previous+1 means state was lost or duplicated.
    pub fn counter(&mut self, value: i64, t_ms: f64) {
        if let Some(prev) = self.last {
            if value != prev.wrapping_add(1) {
                self.continuous = false;
                self.error(format!(
                    "at {t_ms:.1} ms: counter {value} follows {prev} (expected {})",
                    prev.wrapping_add(1)
                ));
            }
        } else {
            self.first = Some(value);
        }
        self.last = Some(value);
        self.replies += 1;
        self.gaps.record(t_ms);
    }

    pub fn error(&mut self, msg: String) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(msg);
        } else {
            self.dropped_errors += 1;
        }
    }

    /// A run is good only if it saw replies, never broke and never skipped a value.
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.continuous && self.replies > 0
    }

    pub fn to_json(&self) -> String {
        let opt = |v: Option<i64>| v.map_or("null".to_string(), |v| v.to_string());
        let mut errors: Vec<String> = self.errors.iter().map(|e| json_str(e)).collect();
        if self.dropped_errors > 0 {
            errors.push(json_str(&format!(
                "... {} more errors",
                self.dropped_errors
            )));
        }
        let gaps: Vec<String> = self
            .gaps
            .over
            .iter()
            .map(|(t, g)| format!("[{},{}]", num(*t), num(*g)))
            .collect();
        let mut s = format!(
            "{{\"replies\":{},\"first\":{},\"last\":{},\"continuous\":{},\"max_gap_ms\":{},\"errors\":[{}],\"ok\":{},\"gaps_over_100ms\":[{}],\"elapsed_ms\":{},\"stopped_by\":{}",
            self.replies,
            opt(self.first),
            opt(self.last),
            self.continuous,
            num(self.gaps.max_gap_ms),
            errors.join(","),
            self.ok(),
            gaps.join(","),
            num(self.elapsed_ms),
            json_str(&self.stopped_by),
        );
        if let Some(sets) = self.sets {
            s.push_str(&format!(",\"sets\":{sets}"));
        }
        s.push('}');
        s
    }
}

/// JSON has no NaN/Infinity; three decimals are plenty for millisecond timings.
pub fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "0".to_string()
    }
}

pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes `text` to `path` via a temporary file and rename, so a test polling for the file
/// never reads half a summary.
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "output path has no file name")
    })?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

/// Prints to stdout or writes the file; used by every client on every exit path.
pub fn emit(out: Option<&Path>, text: &str) -> io::Result<()> {
    match out {
        Some(p) => write_atomic(p, text),
        None => {
            let mut so = io::stdout().lock();
            so.write_all(text.as_bytes())?;
            so.write_all(b"\n")?;
            so.flush()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_track_max_and_long_ones() {
        let mut g = Gaps::default();
        for t in [0.0, 5.0, 10.0, 600.0, 605.0, 810.0, 815.0] {
            g.record(t);
        }
        assert_eq!(g.max_gap_ms, 590.0);
        assert_eq!(g.over, vec![(10.0, 590.0), (605.0, 205.0)]);
    }

    #[test]
    fn single_reply_has_no_gap() {
        let mut g = Gaps::default();
        g.record(42.0);
        assert_eq!(g.max_gap_ms, 0.0);
        assert!(g.over.is_empty());
    }

    #[test]
    fn exactly_threshold_is_not_reported() {
        let mut g = Gaps::default();
        g.record(0.0);
        g.record(100.0);
        assert!(g.over.is_empty());
        assert_eq!(g.max_gap_ms, 100.0);
    }

    #[test]
    fn continuity_break_is_an_error() {
        let mut s = Summary::new();
        s.counter(7, 0.0);
        s.counter(8, 5.0);
        assert!(s.ok());
        s.counter(1, 10.0);
        assert!(!s.continuous);
        assert!(!s.ok());
        assert_eq!(s.first, Some(7));
        assert_eq!(s.last, Some(1));
        assert_eq!(s.errors.len(), 1);
    }

    #[test]
    fn empty_run_is_not_ok_and_json_is_well_formed() {
        let mut s = Summary::new();
        s.stopped_by = "stop \"file\"".into();
        assert!(!s.ok());
        let j = s.to_json();
        assert!(j.starts_with("{\"replies\":0,\"first\":null,\"last\":null,\"continuous\":true"));
        assert!(j.contains("\"stopped_by\":\"stop \\\"file\\\"\""));
        assert!(j.ends_with('}'));
    }

    #[test]
    fn json_lists_gaps_and_sets() {
        let mut s = Summary::new();
        s.counter(1, 0.0);
        s.counter(2, 250.5);
        s.sets = Some(2);
        let j = s.to_json();
        assert!(j.contains("\"gaps_over_100ms\":[[0.000,250.500]]"), "{j}");
        assert!(j.contains("\"max_gap_ms\":250.500"));
        assert!(j.contains("\"ok\":true"));
        assert!(j.ends_with(",\"sets\":2}"));
    }

    #[test]
    fn atomic_write_replaces_file() {
        let dir = std::env::temp_dir().join(format!("ferry-workload-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("out.json");
        write_atomic(&p, "{\"a\":1}").unwrap();
        write_atomic(&p, "{\"a\":2}").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "{\"a\":2}\n");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
