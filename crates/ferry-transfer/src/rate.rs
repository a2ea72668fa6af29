//! Rates as people write them: `50MiB/s`, `400Mbit/s`, `1Gbps`, `0` for unlimited.
//!
//! `B` is a byte and `b` or `bit` a bit; `k`, `M`, `G`, `T` are powers of 1000 and `Ki`, `Mi`,
//! `Gi`, `Ti` powers of 1024 (prefixes in either case); `/s` or `ps` may follow; a bare number
//! is bytes per second.

/// Slowest limit accepted: below it a migration of even a small container would outlast the
/// agents' timeouts (a receiver waits 120 s for each frame) by far.
pub const MIN_BANDWIDTH_LIMIT: u64 = 64 << 10;

const EXPECTED: &str = "expected a rate such as 50MiB/s, 400Mbit/s or 1Gbps, or 0 for no limit";
const UNITS: &str = "expected B, kB, MB, GB, KiB, MiB, GiB (bytes) or bit, kbit, Mbit, Gbit, \
                     Mibit (bits; also b, Mb, Mbps), optionally followed by /s";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bandwidth limit '{input}': {problem}")]
pub struct RateError {
    pub input: String,
    pub problem: RateProblem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateProblem {
    #[error("empty; {}", EXPECTED)]
    Empty,
    #[error("no number; {}", EXPECTED)]
    NoNumber,
    #[error("negative rates mean nothing; {}", EXPECTED)]
    Negative,
    #[error("malformed number '{0}'")]
    BadNumber(String),
    #[error("unknown unit '{0}'; {units}", units = UNITS)]
    UnknownUnit(String),
    #[error("too large (more than {} bytes/s)", u64::MAX)]
    TooLarge,
    #[error(
        "{bytes_per_s} bytes/s is below the minimum of {} (64 KiB/s); use 0 for no limit",
        MIN_BANDWIDTH_LIMIT
    )]
    BelowMinimum { bytes_per_s: u64 },
}

/// Parses a `--bandwidth-limit` into bytes per second, 0 meaning unlimited.
pub fn parse_bandwidth_limit(input: &str) -> Result<u64, RateError> {
    let fail = |problem| RateError {
        input: input.to_string(),
        problem,
    };
    let rate = parse_rate(input.trim()).map_err(fail)?;
    check_bandwidth_limit(rate).map_err(fail)?;
    Ok(rate)
}

/// Checks a limit in bytes per second as it arrives in a request: 0 (unlimited) or at least
/// [`MIN_BANDWIDTH_LIMIT`].
pub fn check_bandwidth_limit(bytes_per_s: u64) -> Result<(), RateProblem> {
    if bytes_per_s != 0 && bytes_per_s < MIN_BANDWIDTH_LIMIT {
        return Err(RateProblem::BelowMinimum { bytes_per_s });
    }
    Ok(())
}

fn parse_rate(s: &str) -> Result<u64, RateProblem> {
    if s.is_empty() {
        return Err(RateProblem::Empty);
    }
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    if s.starts_with('-') {
        return Err(RateProblem::Negative);
    }
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(num_end);
    if number.is_empty() {
        return Err(RateProblem::NoNumber);
    }
    let (mantissa, scale) = parse_decimal(number)?;
    let (numerator, denominator) = unit_factor(unit.trim())?;
    let bytes = mantissa
        .checked_mul(numerator)
        .ok_or(RateProblem::TooLarge)?
        / (denominator * scale);
    let bytes = u64::try_from(bytes).map_err(|_| RateProblem::TooLarge)?;
    if bytes == 0 && mantissa != 0 {
        return Err(RateProblem::BelowMinimum { bytes_per_s: 0 });
    }
    Ok(bytes)
}

/// `12.5` → (125, 10): digits without the point, and the power of ten it stood for.
fn parse_decimal(number: &str) -> Result<(u128, u128), RateProblem> {
    let bad = || RateProblem::BadNumber(number.to_string());
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') || frac.len() > 18 {
        return Err(bad());
    }
    let digits = format!("{int}{frac}");
    let mantissa: u128 = digits.parse().map_err(|_| RateProblem::TooLarge)?;
    Ok((mantissa, 10u128.pow(frac.len() as u32)))
}

/// A unit as a fraction of bytes per second: (multiplier, divisor).
fn unit_factor(unit: &str) -> Result<(u128, u128), RateProblem> {
    let unknown = || RateProblem::UnknownUnit(unit.to_string());
    if unit.is_empty() {
        return Ok((1, 1));
    }
    let base = unit
        .strip_suffix("/s")
        .or_else(|| unit.strip_suffix("/S"))
        .or_else(|| unit.strip_suffix("ps"))
        .unwrap_or(unit)
        .trim_end();
    let lower = base.to_ascii_lowercase();
    let (prefix_len, bits) = if let Some(p) = lower
        .strip_suffix("bits")
        .or_else(|| lower.strip_suffix("bit"))
    {
        (p.len(), true)
    } else if let Some(p) = lower
        .strip_suffix("bytes")
        .or_else(|| lower.strip_suffix("byte"))
    {
        (p.len(), false)
    } else if base.ends_with('B') {
        (base.len() - 1, false)
    } else if base.ends_with('b') {
        (base.len() - 1, true)
    } else {
        return Err(unknown());
    };
    let prefix = &lower[..prefix_len];
    let multiplier: u128 = match prefix {
        "" => 1,
        "k" => 1_000,
        "m" => 1_000_000,
        "g" => 1_000_000_000,
        "t" => 1_000_000_000_000,
        "ki" => 1 << 10,
        "mi" => 1 << 20,
        "gi" => 1 << 30,
        "ti" => 1 << 40,
        _ => return Err(unknown()),
    };
    Ok((multiplier, if bits { 8 } else { 1 }))
}

/// A rate for people: `unlimited`, or bytes per second in binary units (`50 MiB/s`).
pub fn format_rate(bytes_per_s: u64) -> String {
    if bytes_per_s == 0 {
        return "unlimited".into();
    }
    let units = ["B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"];
    let mut v = bytes_per_s as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if (v - v.round()).abs() < 0.05 {
        format!("{} {}", v.round(), units[i])
    } else {
        format!("{v:.1} {}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        let table: &[(&str, u64)] = &[
            ("0", 0),
            ("0MiB/s", 0),
            ("unlimited", 0),
            ("65536", 65536),
            ("50MiB/s", 50 << 20),
            ("50 MiB/s", 50 << 20),
            ("50mib", 50 << 17),
            ("  50MiB/s ", 50 << 20),
            ("1.5GiB/s", 3 << 29),
            ("100MB/s", 100_000_000),
            ("100kB/s", 100_000),
            ("100KB", 100_000),
            ("400Mbit/s", 50_000_000),
            ("400 mbit/s", 50_000_000),
            ("400Mb/s", 50_000_000),
            ("400Mbps", 50_000_000),
            ("1Gbps", 125_000_000),
            ("1gbit", 125_000_000),
            ("10Gbit/s", 1_250_000_000),
            ("8Mibit/s", 1 << 20),
            ("1MBps", 1_000_000),
            ("65536 bytes/s", 65536),
            ("64KiB/s", 64 << 10),
            ("1TiB/s", 1 << 40),
            (".5GB/s", 500_000_000),
            ("0.5MiB", 524288),
            ("1.0GB", 1_000_000_000),
        ];
        for (input, want) in table {
            assert_eq!(parse_bandwidth_limit(input), Ok(*want), "{input:?}");
        }
    }

    #[test]
    fn bad_rates_say_what_is_wrong() {
        let table: &[(&str, &str)] = &[
            (
                "12 parsecs",
                "bandwidth limit '12 parsecs': unknown unit 'parsecs'; expected B, kB",
            ),
            (
                "",
                "bandwidth limit '': empty; expected a rate such as 50MiB/s",
            ),
            ("   ", "bandwidth limit '   ': empty"),
            ("fast", "bandwidth limit 'fast': no number"),
            ("MiB/s", "bandwidth limit 'MiB/s': no number"),
            (
                "-5MiB/s",
                "bandwidth limit '-5MiB/s': negative rates mean nothing",
            ),
            (
                "1.2.3MB",
                "bandwidth limit '1.2.3MB': malformed number '1.2.3'",
            ),
            (".", "bandwidth limit '.': malformed number '.'"),
            ("50XB/s", "bandwidth limit '50XB/s': unknown unit 'XB/s'"),
            ("50 Mi", "bandwidth limit '50 Mi': unknown unit 'Mi'"),
            ("5e6", "bandwidth limit '5e6': unknown unit 'e6'"),
            (
                "100",
                "bandwidth limit '100': 100 bytes/s is below the minimum of 65536",
            ),
            (
                "1KiB/s",
                "bandwidth limit '1KiB/s': 1024 bytes/s is below the minimum",
            ),
            ("0.1B/s", "bandwidth limit '0.1B/s': 0 bytes/s is below"),
            (
                "99999999999999999999TiB/s",
                "bandwidth limit '99999999999999999999TiB/s': too large",
            ),
        ];
        for (input, want) in table {
            let got = parse_bandwidth_limit(input)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_else(|| format!("{input:?} parsed"));
            assert!(got.starts_with(want), "{input:?}: {got}");
        }
    }

    #[test]
    fn requests_are_checked_like_the_flag() {
        assert_eq!(check_bandwidth_limit(0), Ok(()));
        assert_eq!(check_bandwidth_limit(MIN_BANDWIDTH_LIMIT), Ok(()));
        assert_eq!(
            check_bandwidth_limit(1),
            Err(RateProblem::BelowMinimum { bytes_per_s: 1 })
        );
    }

    #[test]
    fn rates_print() {
        assert_eq!(format_rate(0), "unlimited");
        assert_eq!(format_rate(50 << 20), "50 MiB/s");
        assert_eq!(format_rate(50_000_000), "47.7 MiB/s");
        assert_eq!(format_rate(65536), "64 KiB/s");
        assert_eq!(format_rate(100), "100 B/s");
    }
}
