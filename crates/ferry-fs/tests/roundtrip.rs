//! Whole trees through encode → apply, first and incremental passes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

mod common;

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;
use ferry_fs::{changed_since, manifest, ApplyOptions, FsError, Kind, StreamReader, TreeMode};

/// A tree with one of everything a plain tree can hold.
fn build_rich(root: &Path) {
    fs::create_dir_all(root.join("etc/conf.d")).unwrap();
    fs::create_dir_all(root.join("var/lib/db")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("etc/hostname"), b"box\n").unwrap();
    fs::write(root.join("etc/conf.d/a.conf"), vec![7u8; 200_000]).unwrap();
    fs::write(root.join("zero-len"), b"").unwrap();
    fs::write(root.join("\u{e9}t\u{e9}"), b"utf8 name").unwrap();
    {
        use std::os::unix::ffi::OsStrExt;
        let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9");
        fs::write(root.join(latin1), b"latin-1 name").unwrap();
    }
    // sparse: data at 0, a 10 MiB hole, data at the end, then a trailing hole
    let sparse = root.join("var/lib/db/sparse.img");
    write_at(&sparse, 0, &[1u8; 8192]);
    write_at(&sparse, 10 << 20, &[2u8; 4096]);
    fs::OpenOptions::new()
        .write(true)
        .open(&sparse)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    fs::write(root.join("var/lib/db/zeros-dense"), vec![0u8; 300_000]).unwrap();
    symlink("hostname", root.join("etc/link-rel")).unwrap();
    symlink("/etc/shadow", root.join("etc/link-abs")).unwrap();
    symlink("../../..", root.join("var/lib/up")).unwrap();
    fs::hard_link(root.join("etc/hostname"), root.join("var/hostname-hl")).unwrap();
    fs::hard_link(root.join("etc/hostname"), root.join("hostname-hl2")).unwrap();
    let bin = root.join("suid-bin");
    fs::write(&bin, b"#!/bin/true\n").unwrap();
    lchown(&bin, 0, 0);
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o4755)).unwrap();
    let capbin = root.join("cap-bin");
    fs::write(&capbin, b"cap").unwrap();
    // VFS_CAP_REVISION_2, cap_net_bind_service permitted+effective
    let cap: [u8; 20] = [0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    set_xattr(&capbin, "security.capability", &cap);
    set_xattr(&root.join("etc/hostname"), "user.origin", b"test");
    set_xattr(&root.join("etc"), "user.dir", b"\x00\x01binary");
    let owned = root.join("var/lib/db/owned");
    fs::write(&owned, b"db").unwrap();
    lchown(&owned, 999, 998);
    lchown(&root.join("var/lib/db"), 999, 998);
    lchown(&root.join("etc/link-rel"), 5, 6);
    fs::set_permissions(root.join("var/lib/db"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o1777)).unwrap();
    mknod(&root.join("fifo"), libc::S_IFIFO | 0o640, 0, 0);
    mknod(&root.join("null-dev"), libc::S_IFCHR | 0o666, 1, 3);
    mknod(&root.join("blk-dev"), libc::S_IFBLK | 0o600, 7, 42);
    mknod(&root.join("wh"), libc::S_IFCHR, 0, 0);
    set_times(&root.join("etc/hostname"), 1_000_000_000, 123_456_789);
    set_times(&root.join("etc/link-abs"), 1_100_000_000, 5);
    // directories last, deepest first, so their times stick
    for d in [
        "var/lib/db",
        "var/lib",
        "var",
        "etc/conf.d",
        "etc",
        "empty",
        "",
    ] {
        set_times(&root.join(d), 1_200_000_000, 999_999_999);
    }
}

#[test]
fn rich_tree_roundtrips() {
    let src = tmp();
    let dst = tmp();
    build_rich(src.path());
    let before = manifest(src.path(), TreeMode::Plain).unwrap();
    let (bytes, sum) = encode(src.path(), TreeMode::Plain);
    assert_same(&before, &sum.manifest);
    let dest = dest_in(&dst);
    let applied = apply(&bytes, &dest, ApplyOptions::fresh(TreeMode::Plain)).unwrap();
    assert_eq!(applied.counts, sum.counts);
    assert_eq!(applied.stream_bytes, bytes.len() as u64);
    assert_same(&before, &manifest(&dest, TreeMode::Plain).unwrap());
    assert_eq!(listing(dst.path()), ["dest"], "staging was removed");

    // holes stayed holes
    let src_blocks = fs::metadata(src.path().join("var/lib/db/sparse.img"))
        .unwrap()
        .blocks();
    let dst_meta = fs::metadata(dest.join("var/lib/db/sparse.img")).unwrap();
    assert_eq!(dst_meta.len(), 20 << 20);
    assert!(
        dst_meta.blocks() <= src_blocks + 16,
        "{} vs {src_blocks}",
        dst_meta.blocks()
    );
    assert!(dst_meta.blocks() * 512 < 1 << 20);
    // only data extents went over the wire
    assert!(sum.counts.data_bytes < 1 << 20, "{}", sum.counts.data_bytes);
    // hard links are links
    let a = fs::metadata(dest.join("etc/hostname")).unwrap();
    let b = fs::metadata(dest.join("var/hostname-hl")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 3));
    assert_eq!(
        fs::metadata(dest.join("suid-bin")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert!(get_xattr(&dest.join("cap-bin"), "security.capability").is_some());
    assert_eq!(
        fs::read_link(dest.join("etc/link-abs")).unwrap(),
        Path::new("/etc/shadow")
    );
    assert_eq!(fs::read(dest.join("etc/hostname")).unwrap(), b"box\n");
}

#[test]
fn fresh_apply_onto_empty_dir_and_refuses_non_empty() {
    let src = tmp();
    let dst = tmp();
    build_rich(src.path());
    let (bytes, _) = encode(src.path(), TreeMode::Plain);
    let dest = dest_in(&dst);
    fs::create_dir(&dest).unwrap();
    apply(&bytes, &dest, ApplyOptions::fresh(TreeMode::Plain)).unwrap();
    assert_trees_equal(src.path(), &dest, TreeMode::Plain);
    match apply(&bytes, &dest, ApplyOptions::fresh(TreeMode::Plain)) {
        Err(FsError::DestNotEmpty { .. }) => {}
        other => panic!("expected DestNotEmpty, got {other:?}"),
    }
}

#[test]
fn overlay_mode_carries_whiteouts_and_opaque_dirs() {
    let src = tmp();
    let dst = tmp();
    let root = src.path();
    fs::create_dir_all(root.join("opq/sub")).unwrap();
    fs::write(root.join("opq/sub/f"), b"x").unwrap();
    set_xattr(&root.join("opq"), "trusted.overlay.opaque", b"y");
    set_xattr(&root.join("opq"), "user.keep", b"1");
    mknod(&root.join("gone"), libc::S_IFCHR, 0, 0);
    mknod(&root.join("opq/gone2"), libc::S_IFCHR, 0, 0);
    fs::write(root.join("origin-file"), b"o").unwrap();
    set_xattr(
        &root.join("origin-file"),
        "trusted.overlay.origin",
        b"\x00host-specific",
    );
    let want = manifest(root, TreeMode::OverlayUpper).unwrap();
    assert!(want.get(&p("opq")).unwrap().opaque);
    assert_eq!(want.get(&p("gone")).unwrap().kind, Kind::Whiteout);

    let (bytes, _) = encode(root, TreeMode::OverlayUpper);
    let dest = dest_in(&dst);
    apply(&bytes, &dest, ApplyOptions::fresh(TreeMode::OverlayUpper)).unwrap();
    assert_same(&want, &manifest(&dest, TreeMode::OverlayUpper).unwrap());
    assert_eq!(
        get_xattr(&dest.join("opq"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        get_xattr(&dest.join("origin-file"), "trusted.overlay.origin"),
        None
    );
    let wh = fs::symlink_metadata(dest.join("gone")).unwrap();
    assert_eq!((wh.mode() & libc::S_IFMT, wh.rdev()), (libc::S_IFCHR, 0));

    // The same stream applied to a plain destination: whiteouts have nothing to delete.
    let plain = dst.path().join("plain");
    apply(&bytes, &plain, ApplyOptions::fresh(TreeMode::Plain)).unwrap();
    assert!(fs::symlink_metadata(plain.join("gone")).is_err());
    assert!(get_xattr(&plain.join("opq"), "trusted.overlay.opaque").is_none());
    assert_eq!(fs::read(plain.join("opq/sub/f")).unwrap(), b"x");
}

#[test]
fn metacopy_upper_is_refused_not_silently_emptied() {
    let src = tmp();
    fs::write(src.path().join("meta-only"), b"").unwrap();
    set_xattr(
        &src.path().join("meta-only"),
        "trusted.overlay.metacopy",
        b"",
    );
    let mut w = ferry_fs::StreamWriter::new(Vec::new());
    match w.write_tree(src.path(), TreeMode::OverlayUpper) {
        Err(FsError::Unsupported { path, .. }) => assert_eq!(path, "meta-only"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

/// Mutations between the passes: content, metadata, new, deleted, type changes, links.
fn mutate(root: &Path) {
    fs::write(root.join("etc/conf.d/a.conf"), b"rewritten").unwrap();
    fs::write(root.join("etc/new-file"), vec![3u8; 50_000]).unwrap();
    fs::create_dir_all(root.join("newdir/deeper")).unwrap();
    fs::write(root.join("newdir/deeper/x"), b"x").unwrap();
    symlink("x", root.join("newdir/deeper/lx")).unwrap();
    fs::remove_file(root.join("zero-len")).unwrap();
    fs::remove_dir_all(root.join("var/lib/db")).unwrap();
    fs::remove_dir(root.join("empty")).unwrap();
    fs::write(root.join("empty"), b"was a dir").unwrap();
    fs::remove_file(root.join("fifo")).unwrap();
    fs::create_dir(root.join("fifo")).unwrap();
    fs::write(root.join("fifo/inside"), b"i").unwrap();
    fs::set_permissions(root.join("suid-bin"), fs::Permissions::from_mode(0o755)).unwrap();
    set_xattr(&root.join("etc/hostname"), "user.second", b"2");
    fs::hard_link(root.join("etc/new-file"), root.join("new-hl")).unwrap();
    fs::remove_file(root.join("hostname-hl2")).unwrap();
    set_times(&root.join("etc/link-abs"), 1_300_000_000, 1);
}

#[test]
fn incremental_pass_makes_target_identical() {
    let src = tmp();
    let dst = tmp();
    build_rich(src.path());
    let (bytes, first) = encode(src.path(), TreeMode::Plain);
    let dest = dest_in(&dst);
    apply(&bytes, &dest, ApplyOptions::fresh(TreeMode::Plain)).unwrap();

    assert!(
        changed_since(src.path(), &first.manifest)
            .unwrap()
            .is_empty(),
        "nothing changed yet"
    );
    mutate(src.path());
    let changed = changed_since(src.path(), &first.manifest).unwrap();
    let names: Vec<String> = changed.iter().map(|p| p.to_string()).collect();
    for must in [
        "etc/conf.d/a.conf",
        "etc/new-file",
        "newdir/deeper/x",
        "zero-len",
        "var/lib/db",
        "empty",
        "fifo/inside",
    ] {
        assert!(
            names.contains(&must.to_string()),
            "{must} missing from {names:?}"
        );
    }
    assert!(
        !names.contains(&"var/lib/db/owned".to_string()),
        "covered by removing var/lib/db"
    );
    assert!(
        !names.contains(&"etc/link-rel".to_string()),
        "untouched entries are not resent"
    );

    let (delta, second) = encode_paths(src.path(), TreeMode::Plain, &changed);
    assert!(delta.len() < bytes.len());
    let sum = apply(&delta, &dest, ApplyOptions::update(TreeMode::Plain)).unwrap();
    assert!(sum.removed >= 2, "{sum:?}");
    assert_trees_equal(src.path(), &dest, TreeMode::Plain);
    assert_eq!(listing(dst.path()), ["dest"]);

    // the absorbed manifest is a valid baseline for a third pass
    let mut baseline = first.manifest.clone();
    baseline.absorb(&second.manifest, &second.removed);
    assert_same(&baseline, &manifest(src.path(), TreeMode::Plain).unwrap());
    fs::write(src.path().join("third"), b"3").unwrap();
    let changed = changed_since(src.path(), &baseline).unwrap();
    let names: Vec<String> = changed.iter().map(|p| p.to_string()).collect();
    assert_eq!(names, [".", "third"]);
    let (delta, _) = encode_paths(src.path(), TreeMode::Plain, &changed);
    apply(&delta, &dest, ApplyOptions::update(TreeMode::Plain)).unwrap();
    assert_trees_equal(src.path(), &dest, TreeMode::Plain);
}

#[test]
fn failed_commit_rolls_back_to_the_previous_tree() {
    if !is_root() {
        eprintln!("skipped: needs root for chattr +i");
        return;
    }
    let src = tmp();
    let dst = tmp();
    build_rich(src.path());
    let (bytes, first) = encode(src.path(), TreeMode::Plain);
    let dest = dest_in(&dst);
    apply(&bytes, &dest, ApplyOptions::fresh(TreeMode::Plain)).unwrap();
    let before = manifest(&dest, TreeMode::Plain).unwrap();

    mutate(src.path());
    let changed = changed_since(src.path(), &first.manifest).unwrap();
    let (delta, _) = encode_paths(src.path(), TreeMode::Plain, &changed);
    // An immutable directory late in the commit order makes the commit fail half-way.
    let blocker = dest.join("var/lib");
    let status = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&blocker)
        .status()
        .unwrap();
    assert!(status.success());
    let res = apply(&delta, &dest, ApplyOptions::update(TreeMode::Plain));
    std::process::Command::new("chattr")
        .arg("-i")
        .arg(&blocker)
        .status()
        .unwrap();
    let err = res.expect_err("commit must fail on the immutable directory");
    eprintln!("commit error: {err}");
    assert!(err.to_string().contains("var/lib"), "{err}");
    assert_same(&before, &manifest(&dest, TreeMode::Plain).unwrap());
    assert_eq!(
        listing(dst.path()),
        ["dest"],
        "staging and undo were removed"
    );
}

#[test]
fn reader_reports_records_and_trailer() {
    let src = tmp();
    build_rich(src.path());
    let (bytes, sum) = encode(src.path(), TreeMode::Plain);
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let t = r.verify_to_end().unwrap();
    assert_eq!(t.counts, sum.counts);
    assert_eq!(t.stream_bytes, bytes.len() as u64);
    assert!(r.next_record().is_err(), "nothing after END");
}

#[test]
fn overlay_layer_applied_onto_a_plain_tree_deletes_and_replaces() {
    let t = tmp();
    let dest = t.path().join("dest");
    fs::create_dir_all(dest.join("d")).unwrap();
    fs::write(dest.join("a"), b"a").unwrap();
    fs::write(dest.join("keep"), b"k").unwrap();
    fs::write(dest.join("d/x"), b"x").unwrap();
    fs::write(dest.join("d/y"), b"y").unwrap();
    let bytes = RawStream::new(1)
        .path_only(WHITEOUT, b"a")
        .dir(b"d")
        .path_only(OPAQUE, b"d")
        .file(b"d/z", b"z")
        .finish();
    let sum = apply(&bytes, &dest, ApplyOptions::update(TreeMode::Plain)).unwrap();
    assert_eq!(sum.removed, 1);
    assert!(!dest.join("a").exists());
    assert_eq!(
        listing(&dest.join("d")),
        ["z"],
        "opaque dir replaced the old one wholesale"
    );
    assert_eq!(fs::read(dest.join("keep")).unwrap(), b"k");
    assert_eq!(listing(t.path()), ["dest"]);
}

#[test]
fn changed_since_a_foreign_manifest_compares_content() {
    let src = tmp();
    build_rich(src.path());
    let mut m = manifest(src.path(), TreeMode::Plain).unwrap();
    for e in &mut m.entries {
        e.local = None;
    }
    assert!(changed_since(src.path(), &m).unwrap().is_empty());
    let f = src.path().join("etc/hostname");
    fs::write(&f, b"BOX\n").unwrap();
    set_times(&f, 1_000_000_000, 123_456_789);
    let names: Vec<String> = changed_since(src.path(), &m)
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(names, ["etc/hostname", "hostname-hl2", "var/hostname-hl"]);
}
