//! Minimal images built from this machine's own binaries, so the test bed needs no registry:
//! imported once on host a and copied to the others with save/load, which keeps image IDs
//! identical everywhere (a migration target must have the very same image).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use futures::future::try_join_all;

use crate::cmd::{self, command};
use crate::config::{
    HostInfo, TestbedConfig, POSTGRES_IMAGE, POSTGRES_PORT, REDIS_IMAGE, REDIS_PORT,
    WORKLOAD_IMAGE, WORKLOAD_PORT,
};
use crate::dockerd::{docker_command, DOCKER_TIMEOUT};
use crate::error::TestbedError;

pub(crate) const KEY_LABEL: &str = "ferry.testbed.key";
/// Bump when the image recipe changes so existing images are rebuilt.
const RECIPE_VERSION: &str = "3";
const BUSYBOX: &str = "/bin/busybox";
const REDIS_SERVER: &str = "/usr/bin/redis-server";
/// Debian's PostgreSQL 15 server, the same build as the host's pgbench and psql clients.
pub(crate) const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PG_LIB: &str = "/usr/lib/postgresql/15/lib";
const PG_SHARE: &str = "/usr/share/postgresql/15";
/// PostgreSQL refuses to run as root; this uid is what CRIU must dump (see `with_userns_hosts`).
const PG_UID: u32 = 999;
const PG_DATA: &str = "/var/lib/postgresql/data";
/// Initialises the cluster in the (volume-backed) data directory on first start, then becomes
/// the server. Trust authentication and `fsync` on: a test database whose every committed row
/// is counted after a migration.
const PG_START: &str = r#"#!/bin/sh
set -e
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  initdb -D "$PGDATA" -U postgres --auth=trust --locale=C -E UTF8 >/tmp/initdb.log 2>&1
  echo "host all all 0.0.0.0/0 trust" >> "$PGDATA/pg_hba.conf"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp \
  -c shared_buffers=32MB -c max_connections=20 -c fsync=on
"#;
/// Applets linked in both images so `docker exec` has a shell and the basics.
const APPLETS: &[&str] = &[
    "sh", "cat", "ls", "sleep", "echo", "ps", "kill", "grep", "env", "true", "false", "mkdir", "rm",
];
/// Fixed mtime so the same inputs give the same layer.
const MTIME: u64 = 1_700_000_000;
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Clone)]
pub(crate) struct ImageSpec {
    pub name: &'static str,
    /// (source on this machine, path in the image)
    files: Vec<(PathBuf, String)>,
    dirs: Vec<(&'static str, u32)>,
    /// Directories owned by a non-root uid: (path, mode, uid).
    owned_dirs: Vec<(&'static str, u32, u32)>,
    /// Extra lines for /etc/passwd and /etc/group.
    users: Vec<(String, String)>,
    /// Files generated here: (path in the image, content, mode).
    generated: Vec<(&'static str, String, u32)>,
    changes: Vec<String>,
    pub key: String,
}

/// Paths of the shared libraries and loader `ldd` reports for `exe`; empty for static binaries.
pub(crate) fn parse_ldd(out: &str) -> Vec<String> {
    let mut libs = Vec::new();
    for line in out.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(p.to_string());
        }
    }
    libs
}

async fn ldd(exe: &Path) -> Result<Vec<String>, TestbedError> {
    let step = format!("list libraries of {}", exe.display());
    let out = cmd::output(&step, command("ldd", &[exe]), None, cmd::SHORT).await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(TestbedError::unexpected(
            step,
            cmd::tail(text.as_bytes(), 1000),
        ));
    }
    Ok(parse_ldd(&text))
}

fn fnv(h: &mut u64, data: &[u8]) {
    for &b in data {
        *h ^= u64::from(b);
        *h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    *h ^= 0xff;
    *h = h.wrapping_mul(0x0000_0100_0000_01b3);
}

async fn spec(
    name: &'static str,
    exes: Vec<(PathBuf, String)>,
    dirs: Vec<(&'static str, u32)>,
    changes: Vec<String>,
) -> Result<ImageSpec, TestbedError> {
    spec_with(name, exes, vec![], dirs, changes).await
}

/// Like [`spec`], plus `data`: files copied as they are (no library lookup).
async fn spec_with(
    name: &'static str,
    exes: Vec<(PathBuf, String)>,
    data: Vec<(PathBuf, String)>,
    dirs: Vec<(&'static str, u32)>,
    changes: Vec<String>,
) -> Result<ImageSpec, TestbedError> {
    let mut files: Vec<(PathBuf, String)> = exes.clone();
    files.extend(data);
    let mut seen: BTreeSet<String> = files.iter().map(|(_, d)| d.clone()).collect();
    for (exe, _) in &exes {
        for lib in ldd(exe).await? {
            if seen.insert(lib.clone()) {
                files.push((PathBuf::from(&lib), lib));
            }
        }
    }
    // The key covers what goes in: a rebuilt binary (new size or mtime) yields a new image.
    let step = format!("describe image {name}");
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    fnv(&mut h, RECIPE_VERSION.as_bytes());
    fnv(&mut h, name.as_bytes());
    for c in &changes {
        fnv(&mut h, c.as_bytes());
    }
    for (src, dest) in &files {
        let m = fs::metadata(src).map_err(|e| TestbedError::io(&step, src, e))?;
        fnv(&mut h, dest.as_bytes());
        fnv(&mut h, &m.size().to_le_bytes());
        fnv(&mut h, &m.mtime().to_le_bytes());
        fnv(&mut h, &m.mtime_nsec().to_le_bytes());
    }
    Ok(ImageSpec {
        name,
        files,
        dirs,
        owned_dirs: vec![],
        users: vec![],
        generated: vec![],
        changes,
        key: format!("{h:016x}"),
    })
}

/// Every regular file under `dir` (recursively), skipping entries `skip` rejects by name.
fn tree_files(
    dir: &Path,
    skip: &dyn Fn(&str) -> bool,
) -> Result<Vec<(PathBuf, String)>, TestbedError> {
    let step = format!("list {}", dir.display());
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = fs::read_dir(&d).map_err(|e| TestbedError::io(&step, &d, e))?;
        for e in rd {
            let e = e.map_err(|e| TestbedError::io(&step, &d, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if skip(&name) {
                continue;
            }
            let path = e.path();
            let meta = fs::metadata(&path).map_err(|e| TestbedError::io(&step, &path, e))?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let dest = path.to_string_lossy().into_owned();
                out.push((path, dest));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// PostgreSQL 15 from the host's own packages, running as uid 999 with its data directory
/// meant for a named volume.
async fn postgres_spec() -> Result<ImageSpec, TestbedError> {
    let bin = Path::new(PG_BIN);
    if !bin.join("postgres").is_file() {
        return Err(TestbedError::Precondition {
            step: "build the PostgreSQL image".into(),
            detail: format!(
                "{PG_BIN}/postgres is missing: install postgresql-15 (scripts/install-deps.sh does)"
            ),
        });
    }
    let exes = vec![
        (bin.join("postgres"), format!("{PG_BIN}/postgres")),
        (bin.join("initdb"), format!("{PG_BIN}/initdb")),
        (PathBuf::from(BUSYBOX), BUSYBOX.to_string()),
    ];
    let mut data = tree_files(Path::new(PG_LIB), &|n| {
        n.starts_with("llvmjit") || n == "bitcode"
    })?;
    data.extend(tree_files(Path::new(PG_SHARE), &|n| {
        n == "man" || n == "contrib"
    })?);
    let utc = PathBuf::from("/usr/share/zoneinfo/Etc/UTC");
    if utc.is_file() {
        data.push((utc.clone(), "/usr/share/zoneinfo/Etc/UTC".into()));
        data.push((utc, "/usr/share/zoneinfo/UTC".into()));
    }
    let pg_port = POSTGRES_PORT.to_string();
    let mut s = spec_with(
        POSTGRES_IMAGE,
        exes,
        data,
        vec![
            ("/tmp", 0o1777),
            ("/root", 0o700),
            ("/proc", 0o555),
            ("/sys", 0o555),
            ("/dev", 0o755),
        ],
        vec![
            format!("ENTRYPOINT {}", json_array(&["/usr/local/bin/pg-start"])),
            format!("ENV PATH={PG_BIN}:/usr/local/bin:/usr/bin:/bin"),
            format!("ENV PGDATA={PG_DATA}"),
            "ENV TZ=UTC".to_string(),
            format!("USER {PG_UID}:{PG_UID}"),
            format!("LABEL ferry.testbed.port={pg_port}"),
        ],
    )
    .await?;
    s.owned_dirs = vec![
        ("/var/lib/postgresql", 0o755, PG_UID),
        (PG_DATA, 0o700, PG_UID),
    ];
    s.users = vec![(
        format!("postgres:x:{PG_UID}:{PG_UID}:postgres:/var/lib/postgresql:/bin/sh"),
        format!("postgres:x:{PG_UID}:"),
    )];
    s.generated = vec![("/usr/local/bin/pg-start", PG_START.to_string(), 0o755)];
    let mut h = u64::from_str_radix(&s.key, 16).unwrap_or(0);
    fnv(&mut h, PG_START.as_bytes());
    s.key = format!("{h:016x}");
    Ok(s)
}

fn json_array(v: &[&str]) -> String {
    serde_json::Value::from(v.iter().map(|s| s.to_string()).collect::<Vec<_>>()).to_string()
}

/// No EXPOSE in either image: on macvlan dockerd logs a warning for every exposed port.
pub(crate) async fn specs(cfg: &TestbedConfig) -> Result<Vec<ImageSpec>, TestbedError> {
    let busybox = (PathBuf::from(BUSYBOX), BUSYBOX.to_string());
    let base_dirs = vec![
        ("/tmp", 0o1777),
        ("/root", 0o700),
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/dev", 0o755),
    ];
    let wl_port = WORKLOAD_PORT.to_string();
    let workload = spec(
        WORKLOAD_IMAGE,
        vec![
            (
                cfg.workload_exe.clone(),
                "/usr/local/bin/ferry-workload".to_string(),
            ),
            busybox.clone(),
        ],
        base_dirs.clone(),
        vec![
            format!(
                "ENTRYPOINT {}",
                json_array(&["/usr/local/bin/ferry-workload", "serve", "--port", &wl_port])
            ),
            format!("ENV {PATH_ENV}"),
        ],
    );
    let mut redis_dirs = base_dirs;
    redis_dirs.push(("/data", 0o755));
    let redis_port = REDIS_PORT.to_string();
    let redis = spec(
        REDIS_IMAGE,
        vec![
            (PathBuf::from(REDIS_SERVER), REDIS_SERVER.to_string()),
            busybox,
        ],
        redis_dirs,
        vec![
            format!(
                "CMD {}",
                json_array(&[
                    REDIS_SERVER,
                    "--port",
                    &redis_port,
                    "--protected-mode",
                    "no",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
            ),
            format!("ENV {PATH_ENV}"),
            "WORKDIR /data".to_string(),
        ],
    );
    let mut out = vec![workload.await?, redis.await?];
    if cfg.with_userns_hosts {
        out.push(postgres_spec().await?);
    }
    Ok(out)
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_size(size);
    h
}

struct RootfsBuilder {
    tar: tar::Builder<Vec<u8>>,
    dirs: BTreeSet<String>,
    step: String,
}

impl RootfsBuilder {
    fn io(&self, path: impl Into<PathBuf>, e: std::io::Error) -> TestbedError {
        TestbedError::io(&self.step, path, e)
    }

    fn dir(&mut self, path: &str, mode: u32) -> Result<(), TestbedError> {
        let rel = path.trim_start_matches('/').trim_end_matches('/');
        if rel.is_empty() || self.dirs.contains(rel) {
            return Ok(());
        }
        if let Some((parent, _)) = rel.rsplit_once('/') {
            self.dir(parent, 0o755)?;
        }
        let mut h = header(tar::EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut h, format!("{rel}/"), std::io::empty())
            .map_err(|e| TestbedError::io(&self.step, rel, e))?;
        self.dirs.insert(rel.to_string());
        Ok(())
    }

    fn parent(&mut self, path: &str) -> Result<(), TestbedError> {
        match path.trim_start_matches('/').rsplit_once('/') {
            Some((parent, _)) => self.dir(parent, 0o755),
            None => Ok(()),
        }
    }

    fn owned_dir(&mut self, path: &str, mode: u32, uid: u32) -> Result<(), TestbedError> {
        let rel = path.trim_start_matches('/').trim_end_matches('/');
        if let Some((parent, _)) = rel.rsplit_once('/') {
            self.dir(parent, 0o755)?;
        }
        let mut h = header(tar::EntryType::Directory, mode, 0);
        h.set_uid(u64::from(uid));
        h.set_gid(u64::from(uid));
        self.tar
            .append_data(&mut h, format!("{rel}/"), std::io::empty())
            .map_err(|e| TestbedError::io(&self.step, rel, e))?;
        self.dirs.insert(rel.to_string());
        Ok(())
    }

    fn file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), TestbedError> {
        self.parent(path)?;
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        self.tar
            .append_data(&mut h, path.trim_start_matches('/'), data)
            .map_err(|e| TestbedError::io(&self.step, path, e))
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<(), TestbedError> {
        self.parent(path)?;
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut h, path.trim_start_matches('/'), target)
            .map_err(|e| TestbedError::io(&self.step, path, e))
    }
}

/// The rootfs as a tar stream; symlinked sources (merged /usr) are stored as regular files at
/// the path the loader asks for.
fn build_rootfs(spec: &ImageSpec) -> Result<Vec<u8>, TestbedError> {
    let mut b = RootfsBuilder {
        tar: tar::Builder::new(Vec::new()),
        dirs: BTreeSet::new(),
        step: format!("build rootfs of {}", spec.name),
    };
    for (d, mode) in &spec.dirs {
        b.dir(d, *mode)?;
    }
    for (d, mode, uid) in &spec.owned_dirs {
        b.owned_dir(d, *mode, *uid)?;
    }
    let mut passwd = String::from("root:x:0:0:root:/root:/bin/sh\n");
    let mut group = String::from("root:x:0:\n");
    for (p, g) in &spec.users {
        passwd.push_str(p);
        passwd.push('\n');
        group.push_str(g);
        group.push('\n');
    }
    b.file("/etc/passwd", passwd.as_bytes(), 0o644)?;
    b.file("/etc/group", group.as_bytes(), 0o644)?;
    for (path, content, mode) in &spec.generated {
        b.file(path, content.as_bytes(), *mode)?;
    }
    for (src, dest) in &spec.files {
        let data = fs::read(src).map_err(|e| b.io(src, e))?;
        let mode = fs::metadata(src)
            .map_err(|e| b.io(src, e))?
            .permissions()
            .mode()
            & 0o7777;
        b.file(dest, &data, mode)?;
    }
    for applet in APPLETS {
        b.symlink(&format!("/bin/{applet}"), BUSYBOX)?;
    }
    b.tar
        .into_inner()
        .map_err(|e| TestbedError::io(&b.step, spec.name, e))
}

/// `(image id, key label)` of `name` on `host`, or None if the image is missing.
async fn inspect(host: &HostInfo, name: &str) -> Result<Option<(String, String)>, TestbedError> {
    let step = format!("inspect image {name} on host {}", host.name);
    let fmt = format!("{{{{.Id}}}}|{{{{index .Config.Labels \"{KEY_LABEL}\"}}}}");
    let out = cmd::output(
        &step,
        docker_command(&host.docker_host, &["image", "inspect", "-f", &fmt, name]),
        None,
        DOCKER_TIMEOUT,
    )
    .await?;
    if !out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .trim()
        .split_once('|')
        .map(|(id, key)| (id.to_string(), key.to_string())))
}

async fn import(host: &HostInfo, spec: &ImageSpec) -> Result<(), TestbedError> {
    let step = format!("import image {} on host {}", spec.name, host.name);
    let started = Instant::now();
    let owned = spec.clone();
    let rootfs = tokio::task::spawn_blocking(move || build_rootfs(&owned))
        .await
        .map_err(|e| {
            TestbedError::unexpected(&step, format!("rootfs builder task failed: {e}"))
        })??;
    let label = format!("LABEL {KEY_LABEL}={}", spec.key);
    let mut args: Vec<&str> = vec!["import"];
    for c in spec.changes.iter().chain(std::iter::once(&label)) {
        args.push("-c");
        args.push(c);
    }
    args.push("-");
    args.push(spec.name);
    let bytes = rootfs.len();
    cmd::run_input(
        &step,
        docker_command(&host.docker_host, &args),
        Some(rootfs),
        DOCKER_TIMEOUT,
    )
    .await?;
    tracing::info!(image = spec.name, host = %host.name, bytes, elapsed_ms = started.elapsed().as_millis() as u64, "image imported");
    Ok(())
}

/// `docker save` on `from` piped into `docker load` on `to`.
async fn copy_images(from: &HostInfo, to: &HostInfo, names: &[&str]) -> Result<(), TestbedError> {
    let step = format!(
        "copy images {names:?} from host {} to host {}",
        from.name, to.name
    );
    let started = Instant::now();
    let mut save_args = vec!["save"];
    save_args.extend_from_slice(names);
    let mut save = docker_command(&from.docker_host, &save_args);
    save.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut load = docker_command(&to.docker_host, &["load", "-q"]);
    load.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (save_desc, load_desc) = (cmd::describe(&save), cmd::describe(&load));
    let spawn_err = |cmd: &str, source| TestbedError::Spawn {
        step: step.clone(),
        cmd: cmd.to_string(),
        source,
    };
    let mut save = save.spawn().map_err(|e| spawn_err(&save_desc, e))?;
    let mut load = load.spawn().map_err(|e| spawn_err(&load_desc, e))?;
    let (Some(mut src), Some(mut dst)) = (save.stdout.take(), load.stdin.take()) else {
        return Err(TestbedError::unexpected(
            &step,
            "pipes to docker save/load missing",
        ));
    };
    let pipe = async move {
        let n = tokio::io::copy(&mut src, &mut dst).await;
        drop(dst);
        n
    };
    let work = async { tokio::join!(pipe, save.wait_with_output(), load.wait_with_output()) };
    let (copied, save_out, load_out) =
        tokio::time::timeout(DOCKER_TIMEOUT, work)
            .await
            .map_err(|_| TestbedError::Timeout {
                step: step.clone(),
                cmd: format!("{save_desc} | {load_desc}"),
                timeout: DOCKER_TIMEOUT,
            })?;
    for (desc, out) in [(&save_desc, save_out), (&load_desc, load_out)] {
        let out = out.map_err(|e| spawn_err(desc, e))?;
        if !out.status.success() {
            return Err(TestbedError::Command {
                step: step.clone(),
                cmd: desc.clone(),
                status: out.status.to_string(),
                stderr: cmd::tail(&out.stderr, 2000),
            });
        }
    }
    let bytes = copied.map_err(|e| TestbedError::unexpected(&step, format!("pipe: {e}")))?;
    tracing::info!(from = %from.name, to = %to.name, bytes, elapsed_ms = started.elapsed().as_millis() as u64, "images copied");
    Ok(())
}

/// Replaced images would otherwise pile up in the data roots with every rebuilt binary.
async fn prune_dangling(host: &HostInfo) -> Result<(), TestbedError> {
    let step = format!("remove replaced images on host {}", host.name);
    cmd::run(
        &step,
        docker_command(&host.docker_host, &["image", "prune", "-f"]),
        DOCKER_TIMEOUT,
    )
    .await
    .map(|_| ())
}

/// True if every host has every image with the current key and host a's image ID.
pub(crate) async fn images_ok(hosts: &[HostInfo], specs: &[ImageSpec]) -> bool {
    for spec in specs {
        let mut reference: Option<String> = None;
        for host in hosts {
            match inspect(host, spec.name).await {
                Ok(Some((id, key))) if key == spec.key => match &reference {
                    None => reference = Some(id),
                    Some(r) if *r == id => {}
                    Some(_) => return false,
                },
                _ => return false,
            }
        }
    }
    true
}

pub(crate) async fn ensure(hosts: &[HostInfo], specs: &[ImageSpec]) -> Result<(), TestbedError> {
    let Some((first, others)) = hosts.split_first() else {
        return Ok(());
    };
    let mut ids = Vec::new();
    let mut rebuilt = false;
    for spec in specs {
        let current = inspect(first, spec.name).await?;
        let id = match current {
            Some((id, key)) if key == spec.key => id,
            _ => {
                import(first, spec).await?;
                rebuilt = true;
                inspect(first, spec.name)
                    .await?
                    .map(|(id, _)| id)
                    .ok_or_else(|| {
                        TestbedError::unexpected(
                            format!("import image {}", spec.name),
                            "image missing right after import",
                        )
                    })?
            }
        };
        ids.push((spec.name, id));
    }
    if rebuilt {
        prune_dangling(first).await?;
    }
    try_join_all(others.iter().map(|host| {
        let ids = &ids;
        async move {
            let mut missing = Vec::new();
            for (name, id) in ids {
                if inspect(host, name).await?.map(|(i, _)| i).as_deref() != Some(id.as_str()) {
                    missing.push(*name);
                }
            }
            if !missing.is_empty() {
                copy_images(first, host, &missing).await?;
                prune_dangling(host).await?;
            }
            Ok::<(), TestbedError>(())
        }
    }))
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parsing() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\tlibmissing.so => not found\n";
        assert_eq!(
            parse_ldd(out),
            vec![
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn rootfs_has_parents_before_children_and_applets() {
        let spec = ImageSpec {
            name: "t",
            files: vec![(PathBuf::from("/bin/busybox"), "/bin/busybox".into())],
            dirs: vec![("/tmp", 0o1777)],
            owned_dirs: vec![("/var/lib/pg", 0o700, 999)],
            users: vec![("pg:x:999:999::/:/bin/sh".into(), "pg:x:999:".into())],
            generated: vec![("/usr/local/bin/start", "#!/bin/sh\n".into(), 0o755)],
            changes: vec![],
            key: "k".into(),
        };
        let data = build_rootfs(&spec).unwrap();
        let mut ar = tar::Archive::new(&data[..]);
        let mut names = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            names.push((
                e.path().unwrap().to_string_lossy().into_owned(),
                h.entry_type(),
                h.mode().unwrap(),
            ));
        }
        let pos = |n: &str| {
            names
                .iter()
                .position(|(p, _, _)| p == n)
                .unwrap_or_else(|| panic!("{n} missing: {names:?}"))
        };
        assert!(pos("bin/") < pos("bin/busybox"));
        assert!(pos("etc/") < pos("etc/passwd"));
        assert_eq!(names[pos("tmp/")].2, 0o1777);
        assert_eq!(names[pos("bin/sh")].1, tar::EntryType::Symlink);
        assert_eq!(names[pos("bin/busybox")].2 & 0o111, 0o111);
        assert_eq!(names[pos("var/lib/pg/")].2, 0o700);
        assert!(pos("var/lib/") < pos("var/lib/pg/"));
        assert_eq!(names[pos("usr/local/bin/start")].2, 0o755);
        let mut ar = tar::Archive::new(&data[..]);
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            if path == "var/lib/pg/" {
                assert_eq!(e.header().uid().unwrap(), 999);
            }
            if path == "etc/passwd" {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut e, &mut text).unwrap();
                assert!(
                    text.contains("root:x:0:0") && text.contains("pg:x:999:999"),
                    "{text}"
                );
            }
        }
    }
}
