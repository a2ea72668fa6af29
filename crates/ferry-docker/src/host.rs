//! Where the daemon is: the `DOCKER_HOST` forms the docker CLI accepts, minus the ones we do not speak.

use std::path::PathBuf;

use crate::DockerError;

/// The daemon socket used when `DOCKER_HOST` is unset or empty, as for the docker CLI.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// The port the docker CLI assumes for `tcp://host` without one (plain HTTP).
const DEFAULT_TCP_PORT: u16 = 2375;

/// A parsed daemon address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket (the normal, local case; root-equivalent access).
    Unix(PathBuf),
    /// `host:port` for plain HTTP over TCP. Kept as the authority string so it can be both
    /// connected to and sent as the `Host` header unchanged (IPv6 stays bracketed).
    Tcp(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

impl Endpoint {
    /// Parses `unix:///path`, `unix://` (default socket), `tcp://host[:port][/]`.
    ///
    /// ssh://, npipe:// and fd:// are refused by name rather than misread, so an operator with a
    /// CLI context pointing elsewhere learns why ferry cannot follow it.
    pub fn parse(host: &str) -> Result<Endpoint, DockerError> {
        let invalid = |reason: &str| DockerError::InvalidHost {
            host: host.to_string(),
            reason: reason.to_string(),
        };
        let host_trim = host.trim();
        let Some((scheme, rest)) = host_trim.split_once("://") else {
            return Err(invalid("expected unix:///path or tcp://host:port"));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "unix" => {
                if rest.is_empty() {
                    // `unix://` alone means the default socket for the CLI too.
                    return Ok(Endpoint::Unix(PathBuf::from("/var/run/docker.sock")));
                }
                if !rest.starts_with('/') {
                    return Err(invalid(
                        "a unix socket path must be absolute (unix:///path)",
                    ));
                }
                Ok(Endpoint::Unix(PathBuf::from(rest)))
            }
            "tcp" => {
                let authority = rest.strip_suffix('/').unwrap_or(rest);
                if authority.is_empty() {
                    return Err(invalid("tcp:// needs a host"));
                }
                if authority.contains('/') {
                    return Err(invalid("a path after tcp://host:port is not supported"));
                }
                if authority.contains('@') {
                    return Err(invalid("user info in tcp:// is not supported"));
                }
                Ok(Endpoint::Tcp(
                    with_default_port(authority).map_err(|r| invalid(&r))?,
                ))
            }
            "http" => Err(invalid(
                "use tcp://host:port (as for the docker CLI) instead of http://",
            )),
            other => Err(DockerError::UnsupportedScheme {
                host: host.to_string(),
                scheme: other.to_string(),
            }),
        }
    }
}

/// Adds the CLI's default port when none is given; validates the port when one is.
fn with_default_port(authority: &str) -> Result<String, String> {
    if let Some(inner) = authority.strip_prefix('[') {
        // [v6] or [v6]:port
        let Some((addr, after)) = inner.split_once(']') else {
            return Err("unterminated [ in IPv6 address".into());
        };
        if addr.is_empty() {
            return Err("empty IPv6 address".into());
        }
        return match after {
            "" => Ok(format!("[{addr}]:{DEFAULT_TCP_PORT}")),
            p if p.starts_with(':') => check_port(&p[1..]).map(|port| format!("[{addr}]:{port}")),
            _ => Err("garbage after ]".into()),
        };
    }
    match authority.rsplit_once(':') {
        None => Ok(format!("{authority}:{DEFAULT_TCP_PORT}")),
        Some((h, _)) if h.contains(':') => {
            Err("IPv6 addresses must be in brackets: tcp://[::1]:2375".into())
        }
        Some((h, p)) if !h.is_empty() => check_port(p).map(|port| format!("{h}:{port}")),
        Some(_) => Err("missing host before the port".into()),
    }
}

fn check_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("invalid port {p:?}")),
        Ok(port) => Ok(port),
    }
}

/// Resolves the host the docker CLI would use from environment values (passed in, for testing).
///
/// Docker contexts (`docker context use`) are not read: ferry runs as a daemon-side agent where
/// `DOCKER_HOST` or the default socket is the norm, and a context could name TLS or ssh anyway.
pub(crate) fn host_from_env_values(
    docker_host: Option<&str>,
    tls_verify: Option<&str>,
) -> Result<Endpoint, DockerError> {
    let host = match docker_host {
        Some(h) if !h.trim().is_empty() => h.trim(),
        _ => DEFAULT_HOST,
    };
    let endpoint = Endpoint::parse(host)?;
    if matches!(endpoint, Endpoint::Tcp(_)) && tls_verify.is_some_and(|v| !v.is_empty()) {
        // The CLI would speak TLS here; talking plain HTTP to a TLS port would fail obscurely.
        return Err(DockerError::UnsupportedScheme {
            host: host.to_string(),
            scheme: "tcp+tls (DOCKER_TLS_VERIFY is set)".into(),
        });
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok: &[(&str, Endpoint)] = &[
            (
                "unix:///var/run/docker.sock",
                Endpoint::Unix("/var/run/docker.sock".into()),
            ),
            (
                "unix:///run/x/docker.sock",
                Endpoint::Unix("/run/x/docker.sock".into()),
            ),
            ("unix://", Endpoint::Unix("/var/run/docker.sock".into())),
            (
                "tcp://127.0.0.1:2375",
                Endpoint::Tcp("127.0.0.1:2375".into()),
            ),
            (
                "tcp://127.0.0.1:2375/",
                Endpoint::Tcp("127.0.0.1:2375".into()),
            ),
            ("tcp://dockerhost", Endpoint::Tcp("dockerhost:2375".into())),
            ("TCP://h:1", Endpoint::Tcp("h:1".into())),
            ("tcp://[::1]:2376", Endpoint::Tcp("[::1]:2376".into())),
            ("tcp://[fd00::5]", Endpoint::Tcp("[fd00::5]:2375".into())),
        ];
        for (input, want) in ok {
            assert_eq!(&Endpoint::parse(input).unwrap(), want, "{input}");
        }
        let unsupported = ["ssh://me@host", "npipe:////./pipe/docker_engine", "fd://"];
        for input in unsupported {
            match Endpoint::parse(input) {
                Err(DockerError::UnsupportedScheme { .. }) => {}
                other => panic!("{input}: {other:?}"),
            }
        }
        let invalid = [
            "",
            "/var/run/docker.sock",
            "unix://relative.sock",
            "tcp://",
            "tcp://h:0",
            "tcp://h:x",
            "tcp://h:1/api",
            "tcp://::1:2375",
            "http://h:2375",
            "tcp://[::1",
            "tcp://:2375",
        ];
        for input in invalid {
            match Endpoint::parse(input) {
                Err(DockerError::InvalidHost { .. }) => {}
                other => panic!("{input}: {other:?}"),
            }
        }
    }

    #[test]
    fn env_resolution() {
        assert_eq!(
            host_from_env_values(None, None).unwrap(),
            Endpoint::Unix("/var/run/docker.sock".into())
        );
        assert_eq!(
            host_from_env_values(Some(""), None).unwrap(),
            Endpoint::Unix("/var/run/docker.sock".into())
        );
        assert_eq!(
            host_from_env_values(Some("tcp://h:1"), Some("")).unwrap(),
            Endpoint::Tcp("h:1".into())
        );
        assert!(matches!(
            host_from_env_values(Some("tcp://h:1"), Some("1")),
            Err(DockerError::UnsupportedScheme { .. })
        ));
        // TLS settings do not matter for a unix socket (the CLI ignores them there too).
        assert!(host_from_env_values(Some("unix:///s"), Some("1")).is_ok());
        let e = host_from_env_values(Some("ssh://root@box"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ssh") && e.contains("not supported"), "{e}");
    }
}
