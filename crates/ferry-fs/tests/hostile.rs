//! Hand-built hostile streams, all with a valid END: each is refused, nothing lands in the
//! destination, and nothing is written outside it (a canary directory stays as it was).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

mod common;

use std::fs;
use std::path::Path;

use common::*;
use ferry_fs::{manifest, ApplyOptions, FsError, PathError, StreamReader, TreeMode};

struct Scene {
    _t: tempfile::TempDir,
    base: std::path::PathBuf,
    canary: std::path::PathBuf,
    dest: std::path::PathBuf,
}

fn scene() -> Scene {
    let t = tmp();
    let base = t.path().to_path_buf();
    let canary = base.join("canary");
    fs::create_dir(&canary).unwrap();
    fs::write(canary.join("shadow"), b"secret").unwrap();
    let dest = base.join("dest");
    Scene {
        _t: t,
        base,
        canary,
        dest,
    }
}

impl Scene {
    fn canary_manifest(&self) -> ferry_fs::Manifest {
        manifest(&self.canary, TreeMode::Plain).unwrap()
    }

    /// Applies fresh, expects an error, and checks nothing was left anywhere.
    fn refuse(&self, bytes: &[u8], mode: TreeMode) -> FsError {
        let before = self.canary_manifest();
        let err = apply(bytes, &self.dest, ApplyOptions::fresh(mode))
            .expect_err("hostile stream applied");
        assert_same(&before, &self.canary_manifest());
        assert_eq!(
            listing(&self.base),
            ["canary"],
            "dest or staging left behind after: {err}"
        );
        err
    }
}

fn expect_invalid_path(err: FsError, want: PathError) {
    match err {
        FsError::InvalidPath { reason, .. } => assert_eq!(reason, want),
        other => panic!("expected InvalidPath({want:?}), got {other}"),
    }
}

fn expect_refused(err: FsError, entry: &str) {
    match &err {
        FsError::Refused { entry: e, .. } => assert_eq!(e, entry, "{err}"),
        other => panic!("expected Refused for {entry}, got {other}"),
    }
}

#[test]
fn dotdot_paths_are_refused() {
    let s = scene();
    for path in [&b"../x"[..], b"a/../../x", b"..", b"a/.."] {
        let bytes = RawStream::new(0)
            .root()
            .dir(b"a")
            .file(path, b"pwned")
            .finish();
        expect_invalid_path(s.refuse(&bytes, TreeMode::Plain), PathError::DotDot);
    }
    assert!(!s.base.join("x").exists());
}

#[test]
fn absolute_and_odd_paths_are_refused() {
    let s = scene();
    let abs = format!("{}/pwned", s.canary.display());
    for (path, want) in [
        (abs.as_bytes(), PathError::Absolute),
        (&b"/etc/x"[..], PathError::Absolute),
        (b"./x", PathError::Dot),
        (b"a//x", PathError::EmptyComponent),
        (b"", PathError::Empty),
        (b"a\0b", PathError::Nul),
    ] {
        let bytes = RawStream::new(0).root().file(path, b"pwned").finish();
        expect_invalid_path(s.refuse(&bytes, TreeMode::Plain), want);
    }
}

#[test]
fn writing_through_a_streamed_symlink_is_refused() {
    let s = scene();
    let canary = s.canary.to_str().unwrap().as_bytes().to_vec();
    let bytes = RawStream::new(0)
        .root()
        .symlink(b"a", &canary)
        .file(b"a/pwned", b"x")
        .finish();
    expect_refused(s.refuse(&bytes, TreeMode::Plain), "a/pwned");
    let bytes = RawStream::new(0)
        .root()
        .symlink(b"a", &canary)
        .dir(b"a/sub")
        .finish();
    expect_refused(s.refuse(&bytes, TreeMode::Plain), "a/sub");
    let bytes = RawStream::new(0)
        .root()
        .symlink(b"a", b"..")
        .symlink(b"a/ln", b"x")
        .finish();
    expect_refused(s.refuse(&bytes, TreeMode::Plain), "a/ln");
    let bytes = RawStream::new(1)
        .root()
        .symlink(b"a", &canary)
        .path_only(WHITEOUT, b"a/shadow")
        .finish();
    expect_refused(s.refuse(&bytes, TreeMode::OverlayUpper), "a/shadow");
    assert_eq!(fs::read(s.canary.join("shadow")).unwrap(), b"secret");
}

#[test]
fn symlink_to_root_then_child_is_refused() {
    let s = scene();
    let name = format!("ferry-fs-hostile-{}", std::process::id());
    let path = format!("a/{name}");
    let bytes = RawStream::new(0)
        .root()
        .symlink(b"a", b"/")
        .file(path.as_bytes(), b"x")
        .finish();
    expect_refused(s.refuse(&bytes, TreeMode::Plain), &path);
    let escaped = Path::new("/").join(&name);
    let existed = escaped.exists();
    let _ = fs::remove_file(&escaped);
    assert!(!existed, "wrote through the symlink to /");
}

#[test]
fn hostile_hard_links_are_refused() {
    let s = scene();
    let bytes = RawStream::new(0)
        .root()
        .hardlink(b"x", b"../../etc/shadow")
        .finish();
    expect_invalid_path(s.refuse(&bytes, TreeMode::Plain), PathError::DotDot);
    let bytes = RawStream::new(0)
        .root()
        .hardlink(b"x", b"/etc/shadow")
        .finish();
    expect_invalid_path(s.refuse(&bytes, TreeMode::Plain), PathError::Absolute);
    let canary = s.canary.to_str().unwrap().as_bytes().to_vec();
    let bytes = RawStream::new(0)
        .root()
        .symlink(b"a", &canary)
        .hardlink(b"x", b"a/shadow")
        .finish();
    expect_refused(s.refuse(&bytes, TreeMode::Plain), "x");
    let bytes = RawStream::new(0)
        .root()
        .hardlink(b"x", b"later")
        .file(b"later", b"l")
        .finish();
    expect_refused(s.refuse(&bytes, TreeMode::Plain), "x");
    let bytes = RawStream::new(0)
        .root()
        .dir(b"d")
        .hardlink(b"x", b"d")
        .finish();
    expect_refused(s.refuse(&bytes, TreeMode::Plain), "x");
    let bytes = RawStream::new(0)
        .root()
        .file(b"f", b"1")
        .hardlink(b"f", b"f")
        .finish();
    expect_refused(s.refuse(&bytes, TreeMode::Plain), "f");
    assert_eq!(fs::read(s.canary.join("shadow")).unwrap(), b"secret");
}

#[test]
fn oversized_lengths_are_refused_without_allocating() {
    let s = scene();
    let mut bytes = RawStream::new(0).root().bytes.clone();
    bytes.push(FILE);
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    match s.refuse(&bytes, TreeMode::Plain) {
        FsError::Malformed { what, .. } => assert!(what.contains("exceeds the bound"), "{what}"),
        other => panic!("{other}"),
    }
    // a length inside the bound but more than the stream holds: truncated, not a 2 MiB read
    let mut bytes = RawStream::new(0).root().bytes.clone();
    bytes.push(DATA);
    bytes.extend_from_slice(&(2u32 << 20).to_le_bytes());
    assert!(matches!(
        s.refuse(&bytes, TreeMode::Plain),
        FsError::Truncated { .. }
    ));
    // inner counts far beyond the payload
    let mut payload = Vec::new();
    b16(&mut payload, b"f");
    payload.extend(meta(0o644, &[]));
    payload.extend_from_slice(&100u64.to_le_bytes());
    payload.extend_from_slice(&u32::MAX.to_le_bytes());
    let bytes = RawStream::new(0).root().record(FILE, &payload).finish();
    assert!(matches!(
        s.refuse(&bytes, TreeMode::Plain),
        FsError::Malformed { .. }
    ));
    let mut m = meta(0o644, &[]);
    let n = m.len();
    m[n - 2..].copy_from_slice(&u16::MAX.to_le_bytes());
    let mut payload = Vec::new();
    b16(&mut payload, b"d");
    payload.extend(m);
    let bytes = RawStream::new(0).root().record(DIR, &payload).finish();
    assert!(matches!(
        s.refuse(&bytes, TreeMode::Plain),
        FsError::Malformed { .. }
    ));
}

#[test]
fn huge_sparse_file_is_refused_quickly() {
    let s = scene();
    let mut payload = Vec::new();
    b16(&mut payload, b"huge");
    payload.extend(meta(0o644, &[]));
    payload.extend_from_slice(&(i64::MAX as u64).to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    let bytes = RawStream::new(0).root().record(FILE, &payload).finish();
    let t = std::time::Instant::now();
    let err = s.refuse(&bytes, TreeMode::Plain);
    assert!(t.elapsed().as_secs() < 5, "took {:?}: {err}", t.elapsed());
}

#[test]
fn stream_violations_are_refused() {
    let s = scene();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "no root in a fresh apply",
            RawStream::new(0).file(b"f", b"x").finish(),
        ),
        ("empty stream", RawStream::new(0).finish()),
        (
            "duplicate entry",
            RawStream::new(0)
                .root()
                .file(b"f", b"1")
                .file(b"f", b"2")
                .finish(),
        ),
        (
            "dir after its contents",
            RawStream::new(0)
                .root()
                .dir(b"d")
                .file(b"d/f", b"1")
                .dir(b"d")
                .finish(),
        ),
        (
            "parent never streamed",
            RawStream::new(0).root().file(b"nodir/f", b"1").finish(),
        ),
        (
            "file under a file",
            RawStream::new(0)
                .root()
                .file(b"f", b"1")
                .file(b"f/g", b"1")
                .finish(),
        ),
        (
            "whiteout in a plain stream",
            RawStream::new(0).root().path_only(WHITEOUT, b"w").finish(),
        ),
        (
            "opaque not after its dir",
            RawStream::new(1)
                .root()
                .dir(b"d")
                .file(b"d/f", b"1")
                .path_only(OPAQUE, b"d")
                .finish(),
        ),
        ("second root", RawStream::new(0).root().root().finish()),
        (
            "data outside a file",
            RawStream::new(0).root().record(DATA, b"abc").finish(),
        ),
        (
            "file end outside a file",
            RawStream::new(0).root().record(FILE_END, &[0; 32]).finish(),
        ),
        ("foreign xattr", {
            let mut p = Vec::new();
            b16(&mut p, b"f");
            p.extend(meta(0o644, &[("security.selinux", b"system_u")]));
            p.extend_from_slice(&0u64.to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
            RawStream::new(0)
                .root()
                .record(FILE, &p)
                .record(FILE_END, &content_digest(b""))
                .finish()
        }),
        ("mode beyond 07777", {
            let mut p = Vec::new();
            b16(&mut p, b"d");
            p.extend(meta(0o100755, &[]));
            RawStream::new(0).root().record(DIR, &p).finish()
        }),
        ("wrong content digest", {
            let mut r = RawStream::new(0);
            r.root();
            let mut p = Vec::new();
            b16(&mut p, b"f");
            p.extend(meta(0o644, &[]));
            p.extend_from_slice(&3u64.to_le_bytes());
            p.extend_from_slice(&1u32.to_le_bytes());
            p.extend_from_slice(&0u64.to_le_bytes());
            p.extend_from_slice(&3u64.to_le_bytes());
            r.record(FILE, &p)
                .record(DATA, b"abc")
                .record(FILE_END, &content_digest(b"abd"));
            r.finish()
        }),
        ("data past an extent", {
            let mut r = RawStream::new(0);
            r.root();
            let mut p = Vec::new();
            b16(&mut p, b"f");
            p.extend(meta(0o644, &[]));
            p.extend_from_slice(&3u64.to_le_bytes());
            p.extend_from_slice(&1u32.to_le_bytes());
            p.extend_from_slice(&0u64.to_le_bytes());
            p.extend_from_slice(&3u64.to_le_bytes());
            r.record(FILE, &p).record(DATA, b"abcd");
            r.finish()
        }),
        ("bad magic", {
            let mut b = RawStream::new(0).root().finish();
            b[0] = b'X';
            b
        }),
        ("future version", {
            let mut b = RawStream::new(0).root().finish();
            b[8] = 2;
            b
        }),
        (
            "unknown tag",
            RawStream::new(0).root().record(0x55, b"").finish(),
        ),
    ];
    for (what, bytes) in cases {
        let err = s.refuse(
            &bytes,
            if bytes.get(10) == Some(&1) {
                TreeMode::OverlayUpper
            } else {
                TreeMode::Plain
            },
        );
        eprintln!("{what}: {err}");
    }
}

#[test]
fn update_does_not_follow_symlinks_already_in_dest() {
    let s = scene();
    // a previous pass left `link -> canary` in dest
    let first = RawStream::new(0)
        .root()
        .symlink(b"link", s.canary.to_str().unwrap().as_bytes())
        .finish();
    apply(&first, &s.dest, ApplyOptions::fresh(TreeMode::Plain)).unwrap();
    let before = s.canary_manifest();
    let dest_before = manifest(&s.dest, TreeMode::Plain).unwrap();
    for bytes in [
        RawStream::new(0).file(b"link/pwned", b"x").finish(),
        RawStream::new(0).dir(b"link/d").finish(),
        RawStream::new(0)
            .file(b"link/shadow", b"overwritten")
            .finish(),
    ] {
        let err = apply(&bytes, &s.dest, ApplyOptions::update(TreeMode::Plain))
            .expect_err("followed dest symlink");
        assert!(matches!(err, FsError::Refused { .. }), "{err}");
    }
    // removals under the symlink are no-ops, never deletions in the canary
    let bytes = RawStream::new(0).path_only(REMOVE, b"link/shadow").finish();
    apply(&bytes, &s.dest, ApplyOptions::update(TreeMode::Plain)).unwrap();
    let bytes = RawStream::new(1)
        .path_only(WHITEOUT, b"link/shadow")
        .finish();
    apply(&bytes, &s.dest, ApplyOptions::update(TreeMode::Plain)).unwrap();
    assert_same(&before, &s.canary_manifest());
    assert_same(&dest_before, &manifest(&s.dest, TreeMode::Plain).unwrap());
    assert_eq!(listing(&s.base), ["canary", "dest"]);
}

#[test]
fn valid_raw_stream_applies() {
    // The hand-built format agrees with the crate's decoder when nothing is hostile.
    let s = scene();
    let bytes = RawStream::new(0)
        .root()
        .dir(b"d")
        .file(b"d/f", b"hello")
        .symlink(b"l", b"d/f")
        .hardlink(b"h", b"d/f")
        .finish();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    r.verify_to_end().unwrap();
    apply(&bytes, &s.dest, ApplyOptions::fresh(TreeMode::Plain)).unwrap();
    assert_eq!(fs::read(s.dest.join("h")).unwrap(), b"hello");
    assert!(symlink_points(&s.dest.join("l"), "d/f"));
}

fn symlink_points(p: &Path, to: &str) -> bool {
    fs::read_link(p)
        .map(|t| t == Path::new(to))
        .unwrap_or(false)
}
