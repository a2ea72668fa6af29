//! `bench.md`: the numbers a reader compares, as Markdown tables.

use std::fmt::Write;

use crate::{BenchReport, CaseReport, CaseStatus, MANUAL};

/// Phases in the order a migration walks them, for the pause breakdown.
const PHASE_ORDER: [&str; 8] = [
    "preflight",
    "prepare",
    "freeze",
    "dump",
    "transfer",
    "restore",
    "commit",
    "rollback",
];

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}"))
        .unwrap_or_else(|| "–".into())
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_048_576.0)
}

/// `YYYY-MM-DD HH:MM:SS UTC` from Unix ms, without a date crate (Howard Hinnant's
/// days-to-civil algorithm).
pub fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn status_cell(c: &CaseReport) -> Option<String> {
    match c.status {
        CaseStatus::Ok => None,
        CaseStatus::Unsupported => Some(format!(
            "unsupported: {}",
            c.note.as_deref().unwrap_or("refused in preflight")
        )),
        CaseStatus::Failed => Some(format!(
            "FAILED: {}",
            c.error.as_deref().unwrap_or("unknown error")
        )),
    }
}

fn one_line(s: &str) -> String {
    let s = s.replace(['\n', '|'], " ");
    if s.chars().count() > 160 {
        let cut: String = s.chars().take(157).collect();
        format!("{cut}...")
    } else {
        s
    }
}

/// The case's own byte count, plus what the network really carried when that is much more
/// (post-copy's `bytes_sent` leaves out the pages served lazily).
fn bytes_cell(c: &CaseReport) -> String {
    let Some(b) = c.bytes else {
        return "–".into();
    };
    match c.wire_tx_bytes {
        Some(w) if c.case != MANUAL && w.a > 2 * b + (1 << 20) => {
            format!("{} (wire: {})", mib(b), mib(w.a))
        }
        _ => mib(b),
    }
}

fn breakdown(c: &CaseReport) -> String {
    if let Some(m) = &c.manual {
        return format!(
            "checkpoint {:.0} + copy {:.0} + start {:.0} ms (create beforehand {:.0} ms)",
            m.checkpoint_ms, m.copy_ms, m.start_ms, m.create_ms
        );
    }
    if let Some(r) = c.ferry.as_ref().and_then(|f| f.report.as_ref()) {
        let parts: Vec<String> = PHASE_ORDER
            .iter()
            .filter_map(|p| r.phases_ms.get(*p).map(|ms| format!("{p} {ms}")))
            .collect();
        let mut line = format!("{} ms; downtime {} ms", parts.join(", "), r.downtime_ms);
        if !r.downtime_steps_ms.is_empty() {
            let steps: Vec<String> = r
                .downtime_steps_ms
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            line.push_str(&format!(" (of which {} ms)", steps.join(", ")));
        }
        if let Some(d) = &r.criu_dump {
            line.push_str(&format!(
                "; CRIU: {} pages scanned ({} written, {} lazy), collecting them {:.0} ms frozen",
                d.pages_scanned,
                d.pages_written,
                d.pages_lazy,
                d.memdump_us as f64 / 1000.0
            ));
        }
        if let Some(z) = &r.compression {
            line.push_str(&format!("; compression {} → {}", z.policy, z.decision));
            if r.bytes_uncompressed > r.bytes_sent {
                line.push_str(&format!(" ({} before)", mib(r.bytes_uncompressed)));
            }
        }
        return line;
    }
    "–".into()
}

pub fn markdown(r: &BenchReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# ferry benchmark: live migration vs the manual `docker checkpoint` path\n"
    );
    let _ = writeln!(
        s,
        "Run {} – {}. Redis loaded with {}-byte values to the given RSS; one client connection \
         (INCR+SET every {} ms) from the test bed's client namespace; host a → host b on the \
         local test bed (macvlan, shared L2); ferry's compression policy `{}`. MB = 2^20 bytes.\n",
        utc(r.started_unix_ms),
        utc(r.finished_unix_ms),
        r.value_size,
        r.interval_ms,
        r.compress.as_str()
    );
    let _ = writeln!(
        s,
        "| size | case | client gap ms | total ms | bytes | agent CPU s | agent peak RSS MB (a / b) | gap ratio vs manual |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    let mut manual_note = false;
    for c in &r.cases {
        if let Some(st) = status_cell(c).filter(|_| c.client_gap_ms.is_none()) {
            let _ = writeln!(
                s,
                "| {} MB | {} | {} | | | | | |",
                c.size_mb,
                c.case,
                one_line(&st)
            );
            continue;
        }
        let mark = if c.case == MANUAL {
            manual_note = true;
            " ¹"
        } else {
            ""
        };
        let peak = c
            .work_peak_rss_mb
            .as_ref()
            .map(|p| format!("{:.0} / {:.0}{mark}", p.a, p.b))
            .unwrap_or_else(|| "–".into());
        let gap = match (c.status, c.connection_kept) {
            // The longest gap before the client gave up is not the migration's gap.
            (_, Some(false)) => "connection lost (FAILED)".to_string(),
            (CaseStatus::Failed, _) => format!("{} (FAILED)", opt(c.client_gap_ms, 0)),
            _ => opt(c.client_gap_ms, 0),
        };
        let _ = writeln!(
            s,
            "| {} MB | {} | {} | {} | {} | {}{} | {} | {} |",
            c.size_mb,
            c.case,
            gap,
            opt(c.total_ms, 0),
            bytes_cell(c),
            opt(c.work_cpu_s, 2),
            if c.work_cpu_s.is_some() { mark } else { "" },
            peak,
            opt(c.gap_ratio_vs_manual, 1),
        );
    }
    if manual_note {
        let _ = writeln!(
            s,
            "\n¹ manual path: no agent is involved; the figures are dockerd + containerd + the \
             container's containerd shims (which run runc and CRIU) of both hosts.\n"
        );
    }
    let _ = writeln!(s, "\nclient gap: the longest time between two replies the client saw (`max_gap_ms`). total: manual = checkpoint + copy + start (the container is down throughout); ferry = the CLI's `total_ms` (preflight to commit). bytes: manual = checkpoint directory size (copied through the file system here); ferry = the report's `bytes_sent`, with what host a's interface really sent when that is much more. CPU: user+system time of the processes (and their reaped children) during the migration and 2 s after it.\n");

    let _ = writeln!(s, "## Details\n");
    let _ = writeln!(
        s,
        "| size | case | Redis RSS MB (a → b) | keys | load s | pause breakdown | gap after migration returned ms | wire MB sent by a / b | docker CPU s | agents CPU s | connection kept | machine load (1 min avg / busy %) | note |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for c in &r.cases {
        let note = status_cell(c)
            .or_else(|| c.note.clone())
            .map(|n| one_line(&n))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "| {} MB | {} | {} → {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |",
            c.size_mb,
            c.case,
            opt(c.rss_mb, 0),
            opt(c.target_rss_mb, 0),
            c.keys,
            opt(Some(c.load_ms / 1000.0).filter(|v| *v > 0.0), 1),
            breakdown(c),
            opt(c.gap_after_migration_ms, 0),
            c.wire_tx_bytes
                .map(|w| format!(
                    "{:.1} / {:.1}",
                    w.a as f64 / 1_048_576.0,
                    w.b as f64 / 1_048_576.0
                ))
                .unwrap_or_else(|| "–".into()),
            opt(c.docker_cpu_s, 2),
            opt(c.agents_cpu_s, 2),
            c.connection_kept
                .map(|k| if k { "yes" } else { "NO" })
                .unwrap_or("–"),
            opt(c.load_avg_1m, 2),
            opt(c.machine_busy_pct, 0),
            note
        );
    }
    if !r.strategies.is_empty() {
        let _ = writeln!(s, "\n## Strategies\n");
        for st in &r.strategies {
            let _ = writeln!(
                s,
                "- {}: {}",
                st.name,
                if st.supported {
                    "benchmarked".to_string()
                } else {
                    format!("unsupported: {}", one_line(&st.note))
                }
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{PerHost, PerHostBytes};

    fn report() -> BenchReport {
        let base: CaseReport = serde_json::from_value(serde_json::json!({
            "size_mb": 64, "case": "manual", "status": "ok", "attempts": 1,
            "container": "bench-64m-manual", "ip": "198.18.0.160", "keys": 49000,
            "load_ms": 300.0, "rss_mb": 65.0, "target_rss_mb": 59.0, "connection_kept": true,
            "client_gap_ms": 3000.0, "total_ms": 3050.0, "bytes": 58_000_000u64,
            "work_cpu_s": 3.5, "work_peak_rss_mb": {"a": 150.0, "b": 145.0},
            "agents_cpu_s": 0.0, "docker_cpu_s": 3.5, "gap_ratio_vs_manual": 1.0,
            "migration_start_unix_ms": 1.0, "migration_end_unix_ms": 2.0,
            "client": null, "manual": null, "ferry": null, "processes": [], "dir": "/x"
        }))
        .unwrap();
        let mut post = base.clone();
        post.case = "post-copy".into();
        post.bytes = Some(1 << 20);
        post.wire_tx_bytes = Some(PerHostBytes {
            a: 60 << 20,
            b: 1 << 20,
        });
        post.client_gap_ms = Some(1000.0);
        post.gap_ratio_vs_manual = Some(3.0);
        post.work_peak_rss_mb = Some(PerHost { a: 14.0, b: 11.0 });
        let mut pre = base.clone();
        pre.case = "pre-copy".into();
        pre.status = CaseStatus::Unsupported;
        pre.note = Some("not | implemented".into());
        pre.client_gap_ms = None;
        let mut lost = base.clone();
        lost.case = "stop-and-copy".into();
        lost.status = CaseStatus::Failed;
        lost.connection_kept = Some(false);
        lost.error = Some("client connection not kept".into());
        BenchReport {
            started_unix_ms: 0,
            finished_unix_ms: 1000,
            ferry_exe: "/f".into(),
            interval_ms: 5,
            compress: ferry_proto::Compression::Auto,
            value_size: 1000,
            sizes_mb: vec![64],
            strategies: vec![],
            cases: vec![base, post, pre, lost],
            files: vec![],
        }
    }

    #[test]
    fn table_rows() {
        let md = markdown(&report());
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| 64 MB")).collect();
        assert_eq!(rows.len(), 8, "{md}");
        assert_eq!(
            rows[0],
            "| 64 MB | manual | 3000 | 3050 | 55.3 MB | 3.50 ¹ | 150 / 145 ¹ | 1.0 |"
        );
        assert!(
            rows[1].contains("| 1.0 MB (wire: 60.0 MB) |"),
            "{}",
            rows[1]
        );
        assert!(rows[1].ends_with("| 14 / 11 | 3.0 |"), "{}", rows[1]);
        assert_eq!(
            rows[2],
            "| 64 MB | pre-copy | unsupported: not   implemented | | | | | |"
        );
        assert!(
            rows[3].contains("| connection lost (FAILED) |"),
            "{}",
            rows[3]
        );
        assert!(md.contains("¹ manual path"));
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_576_702_430), "2026-11-25 03:18:22 UTC");
    }

    #[test]
    fn one_line_strips_pipes_and_truncates() {
        assert_eq!(one_line("a|b\nc"), "a b c");
        assert_eq!(one_line(&"x".repeat(300)).chars().count(), 160);
    }
}
