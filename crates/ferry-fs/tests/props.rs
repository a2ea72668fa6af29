//! Property tests: random trees survive encode → apply unchanged; damaged streams never apply.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use common::*;

/// Durability (syncfs) is beside the point of these tests and would dominate their run time.
fn fast(mode: TreeMode) -> ApplyOptions {
    ApplyOptions {
        durable: false,
        ..ApplyOptions::fresh(mode)
    }
}
use ferry_fs::{manifest, ApplyOptions, StreamReader, TreeMode};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Content {
    Dense(Vec<u8>),
    /// (size, [(offset, bytes)]): a sparse file with a few data islands.
    Sparse(u64, Vec<(u64, Vec<u8>)>),
}

#[derive(Debug, Clone)]
enum Node {
    File {
        content: Content,
        mode: u32,
        owner: (u32, u32),
        xattrs: Vec<(String, Vec<u8>)>,
    },
    Dir {
        mode: u32,
        xattrs: Vec<(String, Vec<u8>)>,
    },
    Symlink {
        target: String,
    },
    Hardlink {
        to: usize,
    },
    Fifo,
}

#[derive(Debug, Clone)]
struct Spec {
    /// (parent index among earlier dirs or None for root, name, node, mtime)
    nodes: Vec<(usize, String, Node, i64)>,
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-c]{1,2}",
        "[a-z0-9._-]{1,12}",
        Just("..dots".to_string()),
        Just("sp ace".to_string()),
        Just("\u{fc}nic\u{f6}de".to_string()),
    ]
}

fn xattrs() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    prop::collection::vec(
        (
            "user\\.[a-z]{1,8}",
            prop::collection::vec(any::<u8>(), 0..40),
        ),
        0..3,
    )
}

fn content() -> impl Strategy<Value = Content> {
    prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..3000).prop_map(Content::Dense),
        1 => (0usize..200_000).prop_map(|n| Content::Dense(vec![0xA5; n])),
        2 => (1u64..4_000_000, prop::collection::vec((0u64..4_000_000, prop::collection::vec(any::<u8>(), 1..5000)), 0..4))
            .prop_map(|(size, islands)| Content::Sparse(size, islands)),
    ]
}

fn node() -> impl Strategy<Value = Node> {
    prop_oneof![
        5 => (content(), prop::sample::select(vec![0o644, 0o600, 0o755, 0o4755, 0o2750, 0o400, 0o000]),
              prop::sample::select(vec![(0, 0), (1000, 1000), (999, 5), (65534, 65534)]), xattrs())
            .prop_map(|(content, mode, owner, xattrs)| Node::File { content, mode, owner, xattrs }),
        3 => (prop::sample::select(vec![0o755, 0o700, 0o1777, 0o555, 0o2775]), xattrs())
            .prop_map(|(mode, xattrs)| Node::Dir { mode, xattrs }),
        2 => prop_oneof![
                Just("target".to_string()), Just("../../../etc/passwd".to_string()),
                Just("/".to_string()), Just("a/b/c".to_string()), "[a-z/.]{1,20}"]
            .prop_map(|target| Node::Symlink { target }),
        2 => (0usize..64).prop_map(|to| Node::Hardlink { to }),
        1 => Just(Node::Fifo),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    prop::collection::vec((0usize..64, name(), node(), 0i64..2_000_000_000), 0..40)
        .prop_map(|nodes| Spec { nodes })
}

/// Materialises a spec; returns whether anything unusual was skipped (name collisions are).
fn build(root: &Path, spec: &Spec) {
    let mut dirs: Vec<std::path::PathBuf> = vec![root.to_path_buf()];
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    let mut dir_meta: Vec<(std::path::PathBuf, u32, i64)> = Vec::new();
    for (parent, name, node, mtime) in &spec.nodes {
        let dir = dirs[parent % dirs.len()].clone();
        let path = dir.join(name);
        if fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        match node {
            Node::File {
                content,
                mode,
                owner,
                xattrs,
            } => {
                match content {
                    Content::Dense(b) => fs::write(&path, b).unwrap(),
                    Content::Sparse(size, islands) => {
                        fs::File::create(&path).unwrap().set_len(*size).unwrap();
                        for (off, b) in islands {
                            write_at(
                                &path,
                                off % size,
                                &b[..b.len().min((size - off % size) as usize)],
                            );
                        }
                    }
                }
                for (n, v) in xattrs {
                    set_xattr(&path, n, v);
                }
                lchown(&path, owner.0, owner.1);
                fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).unwrap();
                set_times(&path, *mtime, 17);
                files.push(path);
            }
            Node::Dir { mode, xattrs } => {
                fs::create_dir(&path).unwrap();
                for (n, v) in xattrs {
                    set_xattr(&path, n, v);
                }
                dirs.push(path.clone());
                dir_meta.push((path, *mode, *mtime));
            }
            Node::Symlink { target } => {
                symlink(target, &path).unwrap();
                set_times(&path, *mtime, 0);
            }
            Node::Hardlink { to } => {
                if !files.is_empty() {
                    fs::hard_link(&files[to % files.len()], &path).unwrap();
                }
            }
            Node::Fifo => mknod(&path, libc::S_IFIFO | 0o644, 0, 0),
        }
    }
    for (path, mode, mtime) in dir_meta.iter().rev() {
        fs::set_permissions(path, fs::Permissions::from_mode(*mode)).unwrap();
        set_times(path, *mtime, 999);
    }
}

fn fixed_tree() -> (tempfile::TempDir, Vec<u8>) {
    fixed_tree_sized(70_000)
}

fn fixed_tree_sized(big: usize) -> (tempfile::TempDir, Vec<u8>) {
    let t = tmp();
    let root = t.path().join("src");
    fs::create_dir(&root).unwrap();
    fs::create_dir_all(root.join("d/e")).unwrap();
    fs::write(root.join("d/e/f"), b"some content here").unwrap();
    fs::write(root.join("big"), vec![9u8; big]).unwrap();
    write_at(&root.join("sparse"), 200_000, b"tail");
    symlink("d/e/f", root.join("ln")).unwrap();
    fs::hard_link(root.join("big"), root.join("big2")).unwrap();
    set_xattr(&root.join("d"), "user.k", b"v");
    let (bytes, _) = encode(&root, TreeMode::Plain);
    (t, bytes)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_roundtrip(spec in spec()) {
        let t = tmp();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        build(&src, &spec);
        let want = manifest(&src, TreeMode::Plain).unwrap();
        let (bytes, sum) = encode(&src, TreeMode::Plain);
        assert_same(&want, &sum.manifest);
        let dest = t.path().join("dest");
        apply(&bytes, &dest, fast(TreeMode::Plain)).unwrap();
        assert_same(&want, &manifest(&dest, TreeMode::Plain).unwrap());
        // the same tree read as an overlay upper dir round-trips too
        let (bytes, _) = encode(&src, TreeMode::OverlayUpper);
        let dest2 = t.path().join("dest2");
        apply(&bytes, &dest2, fast(TreeMode::OverlayUpper)).unwrap();
        assert_same(&manifest(&src, TreeMode::OverlayUpper).unwrap(), &manifest(&dest2, TreeMode::OverlayUpper).unwrap());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn truncated_streams_are_refused_and_leave_nothing(cut_frac in 0.0f64..1.0) {
        let (t, bytes) = fixed_tree();
        let cut = ((bytes.len() as f64) * cut_frac) as usize;
        let dest = t.path().join("dest");
        let res = apply(&bytes[..cut], &dest, fast(TreeMode::Plain));
        prop_assert!(res.is_err(), "cut at {cut} of {} applied", bytes.len());
        prop_assert_eq!(listing(t.path()), vec!["src".to_string()]);
    }

    #[test]
    fn corrupted_streams_are_refused_and_leave_nothing(pos_frac in 0.0f64..1.0, flip in 1u8..=255) {
        let (t, mut bytes) = fixed_tree();
        let pos = ((bytes.len() as f64) * pos_frac) as usize % bytes.len();
        bytes[pos] ^= flip;
        let dest = t.path().join("dest");
        let res = apply(&bytes, &dest, fast(TreeMode::Plain));
        prop_assert!(res.is_err(), "flip {flip:#x} at {pos} of {} applied", bytes.len());
        prop_assert_eq!(listing(t.path()), vec!["src".to_string()]);
    }
}

/// Every single cut point, not just sampled ones: small stream, all prefixes refused.
#[test]
fn every_prefix_is_refused() {
    let (t, bytes) = fixed_tree_sized(3000);
    let dest = t.path().join("dest");
    for cut in 0..bytes.len() {
        let r = StreamReader::new(&bytes[..cut])
            .and_then(|r| r.apply_into(&dest, &fast(TreeMode::Plain)));
        assert!(r.is_err(), "prefix of {cut} bytes applied");
        if cut % 4096 == 0 {
            assert_eq!(listing(t.path()), ["src"]);
        }
    }
    assert_eq!(listing(t.path()), ["src"]);
    apply(&bytes, &dest, fast(TreeMode::Plain)).unwrap();
}
