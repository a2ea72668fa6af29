//! Writes a few valid streams into a directory, as a seed corpus for `cargo fuzz run decode`.
//!
//! Usage: `cargo run -p ferry-fs --example fuzz_seeds -- crates/ferry-fs/fuzz/corpus/decode`

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use ferry_fs::{StreamWriter, TreeMode};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).ok_or("usage: fuzz_seeds OUT_DIR")?;
    fs::create_dir_all(&out)?;
    let src = tempfile::tempdir()?;
    let root = src.path();
    fs::create_dir_all(root.join("d/e"))?;
    fs::write(root.join("d/e/f"), b"hello")?;
    fs::write(root.join("g"), vec![1u8; 100])?;
    fs::hard_link(root.join("g"), root.join("h"))?;
    symlink("d/e/f", root.join("l"))?;
    let sparse = fs::File::create(root.join("s"))?;
    sparse.set_len(1 << 20)?;
    std::os::unix::fs::FileExt::write_at(&sparse, b"x", 70_000)?;
    for (i, mode) in [TreeMode::Plain, TreeMode::OverlayUpper]
        .into_iter()
        .enumerate()
    {
        let mut w = StreamWriter::new(Vec::new());
        w.write_tree(root, mode)?;
        fs::write(Path::new(&out).join(format!("tree-{i}")), w.into_inner())?;
    }
    let mut w = StreamWriter::new(Vec::new());
    w.write_paths(
        root,
        TreeMode::Plain,
        &[
            ferry_fs::RelPath::root(),
            ferry_fs::RelPath::try_from("gone")?,
        ],
    )?;
    fs::write(Path::new(&out).join("paths"), w.into_inner())?;
    Ok(())
}
