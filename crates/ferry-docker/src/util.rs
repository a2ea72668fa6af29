//! Small helpers: API version comparison and percent-encoding.

use crate::DockerError;

/// The oldest API ferry speaks: Docker 20.10's. Older daemons lack what the migration path
/// relies on (cgroupns fields, `?checkpoint=` behaviour as measured on 20.10).
pub const MIN_API_VERSION: &str = "1.41";

/// The newest API ferry speaks. 1.44 (Docker 25) is where per-endpoint MAC addresses and
/// creating a container on several networks at once arrived; later versions change inspect
/// shapes (1.45 drops the short ID from Aliases, 1.52 omits unset image fields) that we have not
/// checked every use against. Docker 29 raised its minimum to 1.44, so this still reaches it.
pub const MAX_API_VERSION: &str = "1.44";

/// `MAJOR.MINOR` as numbers, so "1.9" < "1.41" compares right (string comparison would not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiVersion(pub u32, pub u32);

impl ApiVersion {
    pub fn parse(s: &str) -> Result<ApiVersion, DockerError> {
        let bad = || DockerError::BadApiVersion(s.to_string());
        let (maj, min) = s.trim().split_once('.').ok_or_else(bad)?;
        Ok(ApiVersion(
            maj.parse().map_err(|_| bad())?,
            min.parse().map_err(|_| bad())?,
        ))
    }
}

impl std::fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, plus the bytes in `keep`.
///
/// Query values need this (a checkpoint or container name with `&`/`=`/`#` would otherwise
/// change the request); path segments keep `:` and `@` (image references, digests) and, for
/// images, `/` (repository paths), which the daemon's router expects raw as the CLI sends them.
pub fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || keep.contains(&b)
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Encodes a query value.
pub fn q(s: &str) -> String {
    percent_encode(s, &[])
}

/// Encodes a single path segment (container/network name or ID).
pub fn seg(s: &str) -> String {
    percent_encode(s, b":@")
}

/// Builds `path?k=v&...` with every value encoded.
pub fn with_query(path: &str, query: &[(&str, &str)]) -> String {
    if query.is_empty() {
        return path.to_string();
    }
    let parts: Vec<String> = query
        .iter()
        .map(|(k, v)| format!("{}={}", q(k), q(v)))
        .collect();
    format!("{path}?{}", parts.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(ApiVersion::parse("1.9").unwrap() < ApiVersion::parse("1.41").unwrap());
        assert!(ApiVersion::parse("1.44").unwrap() < ApiVersion::parse("2.0").unwrap());
        assert_eq!(ApiVersion::parse(" 1.41 ").unwrap().to_string(), "1.41");
        for bad in ["", "1", "1.x", "v1.41", "1.41.0"] {
            assert!(ApiVersion::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn encoding() {
        assert_eq!(q("pre copy&x=1#y"), "pre%20copy%26x%3D1%23y");
        assert_eq!(q("ckpt-1_a.b~"), "ckpt-1_a.b~");
        assert_eq!(q("é"), "%C3%A9");
        assert_eq!(seg("sha256:abc"), "sha256:abc");
        assert_eq!(seg("a/b"), "a%2Fb");
        assert_eq!(
            percent_encode("reg:5000/lib/redis:7", b":@/"),
            "reg:5000/lib/redis:7"
        );
        assert_eq!(
            with_query("/x", &[("signal", "SIGKILL"), ("t", "5")]),
            "/x?signal=SIGKILL&t=5"
        );
        assert_eq!(with_query("/x", &[]), "/x");
    }
}
