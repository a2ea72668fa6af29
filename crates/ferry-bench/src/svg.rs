//! A hand-written SVG line chart of per-reply latency around the migration, one line per case.
//!
//! Hand-written because the chart is simple and a plotting crate would be the biggest
//! dependency of the workspace. The y axis is logarithmic: a healthy reply takes ~0.1 ms and
//! the manual path's pause tens of seconds, and both must be readable on one chart.

use std::fmt::Write;

/// One case's line.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    /// `(seconds since this case's migration started, latency ms)`.
    pub points: Vec<(f64, f64)>,
    /// When this case's migration finished, in the same seconds.
    pub end_s: Option<f64>,
}

const W: f64 = 980.0;
const H: f64 = 500.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 56.0;
const BOTTOM: f64 = 62.0;
/// Colour-blind-safe (Okabe–Ito), manual first.
const COLOURS: [&str; 7] = [
    "#D55E00", "#0072B2", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `target` ticks over `span`.
pub fn nice_step(span: f64, target: f64) -> f64 {
    if !(span.is_finite() && span > 0.0) {
        return 1.0;
    }
    let raw = span / target.max(1.0);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn ms_label(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{} s", fmt_num(ms / 1000.0))
    } else {
        format!("{} ms", fmt_num(ms))
    }
}

fn fmt_num(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// Keeps the highest point per horizontal pixel, so a spike one reply wide survives
/// thinning while a 20,000-reply line stays small.
fn thin(points: &[(f64, f64)], px: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    let mut col: Option<(i64, usize)> = None;
    for &(x, y) in points {
        let c = px(x).round() as i64;
        match col {
            Some((pc, idx)) if pc == c => {
                if y > out[idx].1 {
                    out[idx] = (x, y);
                }
            }
            _ => {
                out.push((x, y));
                col = Some((c, out.len() - 1));
            }
        }
    }
    out
}

/// Replies slower than this get a wait ramp (see [`with_wait_ramps`]).
pub const RAMP_MIN_MS: f64 = 20.0;

/// Adds, before each reply that took at least `min_ms`, the age of the request still waiting
/// for it: rising from the send time (`x - latency`) to the reply. A plain line from the last
/// fast reply to the slow one would draw a diagonal that looks like latency growing
/// gradually; the ramp shows what the client actually experienced at each moment — how long
/// it had been waiting. On the log axis the ramp shoots up and flattens.
pub fn with_wait_ramps(points: &[(f64, f64)], min_ms: f64) -> Vec<(f64, f64)> {
    const STEPS: u32 = 32;
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(points.len());
    for &(x, y) in points {
        if y >= min_ms && y.is_finite() {
            let send = x - y / 1000.0;
            let prev = out.last().copied();
            let start_age = prev.map_or(0.05, |p| p.1.max(0.05)).min(y);
            for k in 0..STEPS {
                let age = start_age * (y / start_age).powf(f64::from(k) / f64::from(STEPS));
                let ax = send + age / 1000.0;
                if prev.is_none_or(|p| ax > p.0) && ax < x {
                    out.push((ax, age));
                }
            }
        }
        out.push((x, y));
    }
    out
}

/// Renders the chart. Series without points still get a legend entry, so a case that did
/// not run is visibly absent rather than silently missing.
pub fn latency_chart(title: &str, subtitle: &str, series: &[Series]) -> String {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let mut x_min = all().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let mut x_max = all().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    if !x_min.is_finite() || !x_max.is_finite() || x_max <= x_min {
        (x_min, x_max) = (-1.0, 1.0);
    }
    x_min = x_min.min(0.0);
    let y_lo = all()
        .map(|p| p.1)
        .filter(|y| *y > 0.0)
        .fold(f64::INFINITY, f64::min);
    let y_hi = all().map(|p| p.1).fold(0.0, f64::max);
    let dec_lo = if y_lo.is_finite() {
        y_lo.log10().floor()
    } else {
        -1.0
    };
    let dec_hi = if y_hi > 0.0 {
        y_hi.log10().ceil().max(dec_lo + 1.0)
    } else {
        dec_lo + 4.0
    };
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let xp = |x: f64| LEFT + (x - x_min) / (x_max - x_min) * pw;
    let yp = |y: f64| {
        let l = y.max(10f64.powf(dec_lo)).log10();
        TOP + ph - (l - dec_lo) / (dec_hi - dec_lo) * ph
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="16" font-weight="bold">{}</text>"#,
        LEFT,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="40" fill="#555">{}</text>"##,
        LEFT,
        esc(subtitle)
    );

    // Grid and y ticks: one per decade.
    let mut d = dec_lo;
    while d <= dec_hi + 1e-9 {
        let y = yp(10f64.powf(d));
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            LEFT + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            ms_label(10f64.powf(d))
        );
        d += 1.0;
    }
    // x ticks.
    let step = nice_step(x_max - x_min, 10.0);
    let mut x = (x_min / step).ceil() * step;
    while x <= x_max + 1e-9 {
        let px = xp(x);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/>"##,
            TOP + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + ph + 18.0,
            fmt_num(x)
        );
        x += step;
    }
    // Axes and labels.
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time since the migration started (s)</text>"#,
        LEFT + pw / 2.0,
        H - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">reply latency (log scale)</text>"#,
        TOP + ph / 2.0
    );
    // Migration start.
    let x0 = xp(0.0);
    let _ = writeln!(
        s,
        r#"<line x1="{x0:.1}" y1="{TOP}" x2="{x0:.1}" y2="{:.1}" stroke="black" stroke-dasharray="4 3"/>"#,
        TOP + ph
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" font-size="11">migration starts</text>"#,
        x0 + 4.0,
        TOP + 12.0
    );

    // Lines, migration ends and legend.
    let lx = LEFT + pw + 16.0;
    let _ = writeln!(
        s,
        r#"<text x="{lx:.1}" y="{:.1}" font-weight="bold">case</text>"#,
        TOP + 4.0
    );
    for (i, se) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts = thin(&with_wait_ramps(&se.points, RAMP_MIN_MS), xp);
        if !pts.is_empty() {
            let mut path = String::new();
            for (x, y) in &pts {
                let _ = write!(path, "{:.1},{:.1} ", xp(*x), yp(*y));
            }
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.3" stroke-linejoin="round" points="{}"/>"#,
                path.trim_end()
            );
        }
        if let Some(e) = se.end_s.filter(|e| *e >= x_min && *e <= x_max) {
            let px = xp(e);
            let _ = writeln!(
                s,
                r#"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="{colour}" stroke-dasharray="2 3" stroke-width="1"/>"#,
                TOP + ph
            );
        }
        let ly = TOP + 24.0 + i as f64 * 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="3"/>"#,
            ly - 4.0,
            lx + 22.0,
            ly - 4.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{ly:.1}">{}</text>"#,
            lx + 28.0,
            esc(&se.label)
        );
    }
    let ny = TOP + 24.0 + series.len() as f64 * 20.0 + 8.0;
    let _ = writeln!(
        s,
        r##"<text x="{lx:.1}" y="{ny:.1}" font-size="11" fill="#555">dotted: that case's migration ends</text>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="{lx:.1}" y="{:.1}" font-size="11" fill="#555">ramps: how long the pending</text>"##,
        ny + 16.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{lx:.1}" y="{:.1}" font-size="11" fill="#555">request has waited so far</text>"##,
        ny + 30.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(10.0, 10.0), 1.0);
        assert_eq!(nice_step(47.0, 10.0), 5.0);
        assert_eq!(nice_step(0.9, 10.0), 0.1);
        assert_eq!(nice_step(0.0, 10.0), 1.0);
        assert_eq!(nice_step(130.0, 10.0), 20.0);
    }

    #[test]
    fn labels() {
        assert_eq!(ms_label(0.1), "0.1 ms");
        assert_eq!(ms_label(100.0), "100 ms");
        assert_eq!(ms_label(10000.0), "10 s");
        assert_eq!(fmt_num(-0.0), "0");
        assert_eq!(fmt_num(2.5), "2.5");
    }

    #[test]
    fn thinning_keeps_spikes() {
        let pts: Vec<(f64, f64)> = (0..1000)
            .map(|i| (i as f64 / 1000.0, if i == 501 { 500.0 } else { 0.1 }))
            .collect();
        let t = thin(&pts, |x| x * 10.0);
        assert!(t.len() <= 12, "{}", t.len());
        assert!(t.iter().any(|p| p.1 == 500.0));
    }

    #[test]
    fn wait_ramp_rises_from_send_to_reply() {
        let pts = vec![(0.0, 0.2), (0.005, 0.2), (2.0, 1500.0), (2.005, 0.3)];
        let r = with_wait_ramps(&pts, RAMP_MIN_MS);
        assert!(r.len() > pts.len() + 10, "{}", r.len());
        assert!(r.windows(2).all(|w| w[1].0 >= w[0].0), "x never goes back");
        // The ramp starts at the send time (2.0 - 1.5 s) near the baseline...
        let first = r.iter().find(|p| p.0 > 0.005).unwrap();
        assert!((first.0 - 0.5).abs() < 0.01 && first.1 < 1.0, "{first:?}");
        // ...and every ramp point is the age since sending.
        for p in r.iter().filter(|p| p.0 > 0.4 && p.0 < 2.0) {
            assert!(((p.0 - 0.5) * 1000.0 - p.1).abs() < 1e-6, "{p:?}");
        }
        assert_eq!(r.last(), Some(&(2.005, 0.3)));
        // Fast replies are left alone.
        assert_eq!(with_wait_ramps(&pts[..2], RAMP_MIN_MS), pts[..2].to_vec());
    }

    #[test]
    fn chart_is_well_formed_and_escaped() {
        let series = vec![
            Series {
                label: "manual: gap 4840 ms".into(),
                points: vec![(-1.0, 0.1), (0.0, 0.09), (4.8, 4835.0), (5.0, 0.2)],
                end_s: Some(4.9),
            },
            Series {
                label: "a<b & \"c\"".into(),
                points: vec![],
                end_s: None,
            },
        ];
        let svg = latency_chart("t", "sub", &series);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a&lt;b &amp; &quot;c&quot;"));
        assert!(svg.contains("<polyline"));
        assert!(svg.contains(">1 s<") || svg.contains(">10 s<"), "{svg}");
        assert_eq!(svg.matches("<polyline").count(), 1);
        // No NaN or infinities leak into coordinates.
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn empty_chart_still_renders() {
        let svg = latency_chart("t", "", &[]);
        assert!(svg.contains("</svg>") && !svg.contains("NaN"));
    }
}
