//! Control messages. Every connection opens with [`Message::Hello`] naming its purpose, so one
//! listening port serves the CLI, agent-to-agent control and bulk image channels.

use serde::{Deserialize, Serialize};

use crate::report::{Event, Report};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Hello {
        protocol: u32,
        purpose: Purpose,
    },
    HelloOk {
        protocol: u32,
        agent: String,
        /// Optional wire features this agent reads (e.g. [`crate::FEATURE_CHUNKS`]); an older
        /// agent sends none, so a peer only uses what is listed here.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    Error(ErrorInfo),

    /// Ask an agent about its host. `cpuinfo` is the peer's `criu cpuinfo dump` image: when
    /// given, the agent also checks that a checkpoint from that CPU can run on its own.
    Check {
        cpuinfo: Option<Vec<u8>>,
    },
    CheckReply(HostFacts),

    /// CLI → source agent: start a migration; answered by `Event`s and one final `Report`.
    Migrate(MigrateRequest),
    Event(Event),
    Report(Box<Report>),
    /// CLI → source agent: stop and roll back if not yet committed.
    Cancel,

    /// Source agent → target agent on a `Control` channel.
    Prepare(PrepareRequest),
    Prepared {
        container_id: String,
        /// The target wired the container's network namespace ahead of the restore (see
        /// `PrepareRequest::prewire_netns`): the source must dump it as external.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        prewired_netns: bool,
        /// The target's CRIU restores an nftables network lock. CRIU's restore uses the lock
        /// method the dump recorded, so the source takes this one only when the target can.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        nft_lock: bool,
    },
    Restore,
    Restored(RestoreInfo),
    Commit,
    Committed,
    Abort,
    Aborted {
        detail: String,
    },
    /// Asked on a fresh connection when a control channel broke at an uncertain moment.
    Status {
        migration_id: String,
    },
    StatusReply {
        state: TargetState,
    },

    /// On an `Images` channel: a file follows as `Data` frames, closed by `FileEnd`.
    FileStart {
        path: String,
        size: u64,
        mode: u32,
    },
    FileEnd {
        sha256: String,
    },
    ImagesDone {
        files: u64,
        bytes: u64,
    },
    ImagesReceived {
        files: u64,
        bytes: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Purpose {
    Cli,
    Control {
        migration_id: String,
    },
    Images {
        migration_id: String,
    },
    /// Post-copy: a byte tunnel from the target's CRIU lazy-pages daemon to the source's CRIU
    /// page server, which itself only ever listens on the source's loopback.
    Pages {
        migration_id: String,
        /// The dialler wants `Chunk` frames instead of a raw byte tunnel; both sides switch only
        /// if the answering agent also lists [`crate::FEATURE_CHUNKS`] in its `HelloOk`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        chunks: bool,
    },
    /// Post-copy: the target's read-ahead reads the seized tasks' lazy pages from the source
    /// agent itself, in the page server's protocol, on a channel of its own beside CRIU's
    /// (see `ferry_pages::reader`). Dialled only where the prepare request says
    /// `page_reads`.
    PageReads {
        migration_id: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        chunks: bool,
    },
    /// The target pulls an image it lacks from the source (`docker save` streamed as `Data`
    /// frames, closed by `ImagesDone`).
    Image {
        image_id: String,
    },
}

/// A failure as it crosses the wire: which step, what happened, and the failing tool's own log
/// lines (CRIU, runc) that say why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ErrorInfo {
    pub step: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_log: Vec<String>,
}

impl std::fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.message)?;
        for line in &self.tool_log {
            write!(f, "\n    | {line}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    #[default]
    Auto,
    StopAndCopy,
    PreCopy,
    PostCopy,
    Hybrid,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Auto => "auto",
            Strategy::StopAndCopy => "stop-and-copy",
            Strategy::PreCopy => "pre-copy",
            Strategy::PostCopy => "post-copy",
            Strategy::Hybrid => "hybrid",
        }
    }

    /// Whether memory pages follow the restore (served by the source's page server), which
    /// lets the pause stay short but ties the target to the source until every page arrived.
    pub fn lazy_pages(self) -> bool {
        matches!(self, Strategy::PostCopy | Strategy::Hybrid)
    }

    /// Whether memory is copied in pre-dump rounds while the container still runs.
    pub fn memory_rounds(self) -> bool {
        matches!(self, Strategy::PreCopy | Strategy::Hybrid)
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Faults a test can ask the target to suffer, so rollback is exercised on the real code path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// The target damages the received page images so CRIU's restore really fails.
    TargetRestore,
}

/// Whether the bulk streams (checkpoint images, post-copy pages) are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Bytes go as they are, in plain `Data` frames as before compression existed.
    Off,
    /// Every chunk is compressed (and still sent plain when zstd does not make it smaller).
    On,
    /// Each stream measures zstd on its first chunks and keeps compressing only where it gains.
    #[default]
    Auto,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Off => "off",
            Compression::On => "on",
            Compression::Auto => "auto",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one migration's bulk streams travel: chosen by the operator on the source and handed to
/// the target, which applies them to what it sends back (post-copy page requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TransferSettings {
    #[serde(default)]
    pub compression: Compression,
    /// Most bytes per second a host sends to its peer for this migration; 0 is unlimited.
    #[serde(default)]
    pub bandwidth_limit_bytes_per_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    pub container: String,
    /// `IP:PORT` of the target agent, as the source agent reaches it.
    pub target: String,
    pub strategy: Strategy,
    /// Upper bound for any single remote step, in seconds.
    pub step_timeout_s: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    #[serde(default)]
    pub compression: Compression,
    /// 0 (or absent, from an older CLI) is unlimited.
    #[serde(default)]
    pub bandwidth_limit_bytes_per_s: u64,
    /// Replace the content of a same-named volume that already exists on the target (its old
    /// content is kept aside until commit and put back on rollback).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overwrite_volumes: bool,
    /// Host paths (and volume names) the operator declares shared between the hosts: bind
    /// mounts under them and those volumes are left alone instead of refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared: Vec<String>,
}

impl MigrateRequest {
    pub fn transfer(&self) -> TransferSettings {
        TransferSettings {
            compression: self.compression,
            bandwidth_limit_bytes_per_s: self.bandwidth_limit_bytes_per_s,
        }
    }
}

/// Whether `declared` (from `--shared`) covers a mount: a volume by its name, or any mount
/// whose host path lies under an absolute declared path (component-wise, so `/srv/a` does not
/// cover `/srv/ab`).
pub fn shared_covers(declared: &[String], volume_name: Option<&str>, host_path: &str) -> bool {
    declared.iter().any(|d| {
        if d.starts_with('/') {
            !host_path.is_empty() && std::path::Path::new(host_path).starts_with(d)
        } else {
            volume_name == Some(d.as_str())
        }
    })
}

/// Checks one `--shared` value: an absolute path without `..`, or a volume name.
pub fn validate_shared(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("--shared: empty value (give an absolute host path or a volume name)".into());
    }
    if value.starts_with('/') {
        if value.split('/').any(|c| c == "..") {
            return Err(format!(
                "--shared {value:?}: the path must not contain '..'"
            ));
        }
        return Ok(());
    }
    if value.contains('/') {
        return Err(format!(
            "--shared {value:?}: a relative path; give an absolute host path or a volume name"
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(format!("--shared {value:?}: not a valid volume name"));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareRequest {
    pub migration_id: String,
    pub strategy: Strategy,
    /// Compression and bandwidth limit of this migration, stamped by the source agent when it
    /// sends the request; absent from an older source, which never speaks `Chunk` frames.
    #[serde(default)]
    pub transfer: TransferSettings,
    pub container_name: String,
    pub image_id: String,
    /// The name the container was created from (`Config.Image`), kept on the target when it
    /// names the same image there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ref: Option<String>,
    /// Body for the Engine API's `POST /containers/create`, derived from the source's inspect.
    pub create_body: serde_json::Value,
    pub networks: Vec<NetworkAttachment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Named (local-driver) volumes whose data ferry carries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// `IP:PORT` of the source agent, for channels the target opens (post-copy pages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_agent: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overwrite_volumes: bool,
    /// Host paths of bind mounts declared shared: they must exist on the target too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_paths: Vec<String>,
    /// Wire the container's network namespace while the migration is prepared, with Docker's
    /// whole start path parked until the images arrive, instead of inside the pause.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prewire_netns: bool,
    /// Post-copy: the source agent reads the seized tasks' lazy pages itself on a
    /// [`Purpose::PageReads`] channel, for the target's read-ahead.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub page_reads: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAttachment {
    pub network: String,
    pub driver: String,
    pub ipv4: Option<String>,
    pub mac: Option<String>,
    pub subnet: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RestoreInfo {
    pub container_id: String,
    pub pid: u32,
    /// Wall time of Docker's start-from-checkpoint call on the target.
    pub docker_start_ms: u64,
    pub garp_sent: Vec<String>,
    /// `interface:address` announced from the container's namespace at the moment its tasks
    /// resumed (CRIU's pre-resume action), before `docker start` returned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub announced_at_resume: Vec<String>,
    /// Milliseconds of each step of the restore on the target (volumes, layer, lazy-pages
    /// daemon, Docker's start, the wait for it to run, the ARP announcement).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub steps_ms: std::collections::BTreeMap<String, u64>,
    /// The restore went on from a start parked since the prepare.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub parked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetState {
    Unknown,
    Prepared,
    Restored,
    Committed,
    RolledBack,
    /// Post-copy: the target resumed but not every page arrived; its container was stopped.
    PagesLost,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CriuFeatures {
    pub tcp_established: bool,
    pub uffd: bool,
    pub uffd_noncoop: bool,
    pub mem_dirty_track: bool,
    /// CRIU was built with libnftables: its network lock is one in-process transaction instead
    /// of six `iptables-restore` runs (~50 ms of a restore's pause here).
    #[serde(default)]
    pub network_lock_nftables: bool,
    /// CRIU carries ferry's `--lazy-pages-read` patch: a lazy dump leaves the pages in the
    /// frozen tasks and reads them when asked, instead of splicing every page into pipes while
    /// the tasks are frozen (~50 ms per GiB of the post-copy pause here).
    #[serde(default)]
    pub lazy_pages_read: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HostFacts {
    pub agent: String,
    pub hostname: String,
    pub kernel: String,
    pub arch: String,
    pub criu_version: Option<String>,
    pub criu_features: CriuFeatures,
    pub runc_version: Option<String>,
    pub docker_version: Option<String>,
    pub docker_api_version: Option<String>,
    pub docker_experimental: bool,
    pub docker_data_root: Option<String>,
    pub docker_runtimes: Vec<String>,
    /// The runc-wrapping runtime ferry restores through is registered in daemon.json.
    pub ferry_runtime: bool,
    pub cap_sys_resource: bool,
    pub pipe_max_size: u64,
    /// This host's agent can wire a restored container's network namespace before the pause
    /// (not under user-namespace remapping, where the namespace must belong to the container's
    /// user namespace).
    #[serde(default)]
    pub prewire_netns: bool,
    /// Result of `criu cpuinfo check` against the peer's CPU, when one was sent.
    pub cpu_compatible: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_check_log: Vec<String>,
    /// How old the answers of criu and runc were (an agent keeps them for a while; `ferry
    /// check` asks again). None from agents that always asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probed_ms_ago: Option<u64>,
    /// Reasons this host cannot take part in a migration at all.
    pub problems: Vec<String>,
    /// Things that work but an operator should know.
    pub warnings: Vec<String>,
}

/// The remapped root `(uid, gid)` of a daemon, read from its `DockerRootDir`, which a remapped
/// dockerd places in `<data-root>/<uid>.<gid>`; None for a daemon without remapping.
pub fn remapped_root(docker_root_dir: &str) -> Option<(u32, u32)> {
    let last = std::path::Path::new(docker_root_dir)
        .file_name()?
        .to_str()?;
    let (u, g) = last.split_once('.')?;
    if u.is_empty() || g.is_empty() || !u.bytes().chain(g.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((u.parse().ok()?, g.parse().ok()?))
}

impl HostFacts {
    /// The daemon's remapped root uid and gid when it runs with `userns-remap`.
    pub fn userns_remap(&self) -> Option<(u32, u32)> {
        self.docker_data_root.as_deref().and_then(remapped_root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Frame;

    #[test]
    fn shared_declarations_cover_paths_component_wise_and_volumes_by_name() {
        let d = vec!["/srv/shared".to_string(), "nfsvol".to_string()];
        for (vol, path, want) in [
            (None, "/srv/shared", true),
            (None, "/srv/shared/x/y", true),
            (None, "/srv/sharedx", false),
            (None, "/srv", false),
            (Some("nfsvol"), "/var/lib/docker/volumes/nfsvol/_data", true),
            (Some("other"), "/var/lib/docker/volumes/other/_data", false),
            (None, "", false),
        ] {
            assert_eq!(shared_covers(&d, vol, path), want, "{vol:?} {path}");
        }
    }

    #[test]
    fn shared_values_are_validated() {
        for ok in ["/srv/x", "/", "vol_1", "my.vol-2"] {
            assert!(validate_shared(ok).is_ok(), "{ok}");
        }
        for (bad, needle) in [
            ("", "empty"),
            ("/srv/../etc", "'..'"),
            ("srv/x", "relative"),
            ("bad name", "not a valid volume name"),
        ] {
            let e = validate_shared(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn remapped_root_is_read_from_the_root_dir_name() {
        for (dir, want) in [
            ("/var/lib/docker/100000.100000", Some((100000, 100000))),
            ("/x/d/docker/231072.231073/", Some((231072, 231073))),
            ("/var/lib/docker", None),
            ("/var/lib/docker/1.", None),
            ("/var/lib/docker/a.b", None),
            ("/var/lib/docker/1.2.3", None),
            ("", None),
        ] {
            assert_eq!(remapped_root(dir), want, "{dir}");
        }
    }

    #[test]
    fn messages_round_trip_through_frames() {
        let msgs = vec![
            Message::Hello {
                protocol: 1,
                purpose: Purpose::Images {
                    migration_id: "m1".into(),
                },
            },
            Message::Check {
                cpuinfo: Some(vec![1, 2, 3]),
            },
            Message::Migrate(MigrateRequest {
                container: "redis".into(),
                target: "198.18.0.2:7070".into(),
                strategy: Strategy::StopAndCopy,
                step_timeout_s: 60,
                fault: Some(Fault::TargetRestore),
                compression: Compression::On,
                bandwidth_limit_bytes_per_s: 50 << 20,
                overwrite_volumes: true,
                shared: vec!["/srv/shared".into()],
            }),
            Message::Error(ErrorInfo {
                step: "restore".into(),
                message: "x".into(),
                tool_log: vec!["Error (criu)".into()],
            }),
            Message::StatusReply {
                state: TargetState::Restored,
            },
        ];
        for m in msgs {
            let f = Frame::control(&m).unwrap();
            assert_eq!(f.into_message().unwrap(), m);
        }
    }

    #[test]
    fn strategy_names_are_kebab_case() {
        assert_eq!(
            serde_json::to_string(&Strategy::StopAndCopy).unwrap(),
            "\"stop-and-copy\""
        );
        assert_eq!(Strategy::PostCopy.as_str(), "post-copy");
    }

    /// Messages from agents that predate compression still parse, with compression left to
    /// `auto`, no bandwidth limit, no features and a raw page tunnel.
    #[test]
    fn older_peers_messages_get_defaults() {
        let m: Message = serde_json::from_str(
            r#"{"type":"migrate","container":"c","target":"1.2.3.4:1","strategy":"auto","step_timeout_s":5}"#,
        )
        .unwrap();
        let Message::Migrate(req) = m else {
            panic!("not a migrate: {m:?}")
        };
        assert_eq!(req.transfer(), TransferSettings::default());
        assert_eq!(req.compression, Compression::Auto);

        let m: Message =
            serde_json::from_str(r#"{"type":"hello_ok","protocol":1,"agent":"a"}"#).unwrap();
        assert_eq!(
            m,
            Message::HelloOk {
                protocol: 1,
                agent: "a".into(),
                features: vec![]
            }
        );
        let m: Message = serde_json::from_str(
            r#"{"type":"hello","protocol":1,"purpose":{"kind":"pages","migration_id":"m"}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            Message::Hello {
                protocol: 1,
                purpose: Purpose::Pages {
                    migration_id: "m".into(),
                    chunks: false
                }
            }
        );
    }

    #[test]
    fn compression_names_are_kebab_case() {
        for (c, s) in [
            (Compression::Off, "off"),
            (Compression::On, "on"),
            (Compression::Auto, "auto"),
        ] {
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{s}\""));
            assert_eq!(c.as_str(), s);
        }
    }
}
