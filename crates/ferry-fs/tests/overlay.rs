//! A real overlay mount: the upper dir streamed into a fresh upper dir gives the same merged
//! view over the same lower dir. Needs root; skipped (with a note) otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use ferry_fs::{changed_since, manifest, ApplyOptions, Kind, TreeMode};

struct Mount(PathBuf);

impl Mount {
    fn overlay(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> Option<Mount> {
        fs::create_dir_all(upper).unwrap();
        fs::create_dir_all(work).unwrap();
        fs::create_dir_all(merged).unwrap();
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(merged)
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "skipped: overlay mount failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(Mount(merged.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn build_lower(lower: &Path) {
    fs::create_dir_all(lower.join("etc")).unwrap();
    fs::create_dir_all(lower.join("usr/share/doc")).unwrap();
    fs::create_dir_all(lower.join("replaced/deep")).unwrap();
    fs::write(lower.join("etc/config"), b"lower config\n").unwrap();
    fs::write(lower.join("etc/to-delete"), b"will be whited out").unwrap();
    fs::write(lower.join("etc/to-chmod"), b"same content").unwrap();
    fs::write(lower.join("usr/share/doc/readme"), vec![b'r'; 10_000]).unwrap();
    fs::write(lower.join("replaced/old1"), b"old").unwrap();
    fs::write(lower.join("replaced/deep/old2"), b"old").unwrap();
    symlink("config", lower.join("etc/cfg-link")).unwrap();
}

fn mutate_merged(m: &Path) {
    fs::write(m.join("new-file"), b"created in the container").unwrap();
    let mut cfg = fs::read(m.join("etc/config")).unwrap();
    cfg.extend_from_slice(b"appended in the container\n");
    fs::write(m.join("etc/config"), cfg).unwrap();
    fs::remove_file(m.join("etc/to-delete")).unwrap();
    fs::set_permissions(m.join("etc/to-chmod"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_dir_all(m.join("replaced")).unwrap();
    fs::create_dir(m.join("replaced")).unwrap();
    fs::write(m.join("replaced/new"), b"new").unwrap();
    fs::create_dir_all(m.join("var/log")).unwrap();
    write_at(&m.join("var/log/sparse.log"), 5 << 20, b"end");
    fs::hard_link(m.join("new-file"), m.join("var/new-file-hl")).unwrap();
    symlink("/etc/config", m.join("abs-link")).unwrap();
    set_xattr(&m.join("new-file"), "user.tag", b"t");
    fs::remove_file(m.join("etc/cfg-link")).unwrap();
}

#[test]
fn streamed_upper_dir_reproduces_the_merged_view() {
    if !is_root() {
        eprintln!("skipped: needs root to mount overlayfs");
        return;
    }
    let t = tmp();
    let base = t.path();
    let lower = base.join("lower");
    build_lower(&lower);
    let upper = base.join("upper");
    let Some(m1) = Mount::overlay(&lower, &upper, &base.join("work"), &base.join("merged")) else {
        return;
    };
    mutate_merged(&m1.0);

    // stream the upper dir while it is mounted, as the agent does
    let up_manifest = manifest(&upper, TreeMode::OverlayUpper).unwrap();
    assert_eq!(
        up_manifest.get(&p("etc/to-delete")).unwrap().kind,
        Kind::Whiteout
    );
    assert!(
        up_manifest.get(&p("replaced")).unwrap().opaque,
        "replacing a lower dir makes it opaque"
    );
    let (bytes, sum) = encode(&upper, TreeMode::OverlayUpper);
    assert!(
        sum.counts.data_bytes < 1 << 20,
        "sparse log sent as data: {}",
        sum.counts.data_bytes
    );
    let upper2 = base.join("upper2");
    apply(&bytes, &upper2, ApplyOptions::fresh(TreeMode::OverlayUpper)).unwrap();
    assert_same(
        &up_manifest,
        &manifest(&upper2, TreeMode::OverlayUpper).unwrap(),
    );

    let Some(m2) = Mount::overlay(&lower, &upper2, &base.join("work2"), &base.join("merged2"))
    else {
        return;
    };
    let merged1 = manifest(&m1.0, TreeMode::Plain).unwrap();
    let merged2 = manifest(&m2.0, TreeMode::Plain).unwrap();
    assert_same(&merged1, &merged2);
    assert!(merged2.get(&p("etc/to-delete")).is_none());
    assert!(
        merged2.get(&p("replaced/old1")).is_none(),
        "opaque dir hides the lower content"
    );
    assert!(merged2.get(&p("replaced/new")).is_some());
    assert_eq!(
        fs::read(m2.0.join("usr/share/doc/readme")).unwrap().len(),
        10_000
    );

    // a second pass after more changes in the running container
    fs::write(
        m1.0.join("usr/share/doc/readme"),
        b"copied up on the second pass",
    )
    .unwrap();
    fs::remove_file(m1.0.join("new-file")).unwrap();
    fs::remove_file(m1.0.join("etc/config")).unwrap();
    fs::write(m1.0.join("late"), b"late").unwrap();
    drop(m2);
    let changed = changed_since(&upper, &sum.manifest).unwrap();
    let (delta, _) = encode_paths(&upper, TreeMode::OverlayUpper, &changed);
    apply(
        &delta,
        &upper2,
        ApplyOptions::update(TreeMode::OverlayUpper),
    )
    .unwrap();
    assert_same(
        &manifest(&upper, TreeMode::OverlayUpper).unwrap(),
        &manifest(&upper2, TreeMode::OverlayUpper).unwrap(),
    );
    let _ = fs::remove_dir_all(base.join("work2"));
    let Some(m2) = Mount::overlay(&lower, &upper2, &base.join("work2"), &base.join("merged2"))
    else {
        return;
    };
    assert_same(
        &manifest(&m1.0, TreeMode::Plain).unwrap(),
        &manifest(&m2.0, TreeMode::Plain).unwrap(),
    );
    assert_eq!(
        fs::read(m2.0.join("usr/share/doc/readme")).unwrap(),
        b"copied up on the second pass"
    );
    assert!(!m2.0.join("etc/config").exists());
}
