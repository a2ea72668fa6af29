//! Measures encode + apply throughput on a generated tree, and a second pass after changing part
//! of it. The encoder and the applier run in two threads joined by an OS pipe, as the agent
//! runs them on both ends of its channel.
//!
//! Usage: `cargo run --release -p ferry-fs --example throughput -- BASE_DIR [MiB] [CHANGED_MiB]`
//! (defaults 1024 and 10). BASE_DIR must not exist; it is removed afterwards. As root, page
//! caches are dropped before the cold runs.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_fs::{changed_since, manifest, ApplyOptions, StreamReader, StreamWriter, TreeMode};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Rng(u64);

impl Rng {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

/// 90% of the bytes in 1 MiB files, 10% in 8 KiB files, spread over 32 directories.
fn generate(root: &Path, mib: u64) -> Res<(u64, u64)> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut buf = vec![0u8; 1 << 20];
    let (mut files, mut bytes) = (0u64, 0u64);
    let big = mib * 9 / 10;
    let small = (mib << 20) / 10 / 8192;
    for i in 0..big {
        let d = root.join(format!("big/{:02}", i % 32));
        fs::create_dir_all(&d)?;
        rng.fill(&mut buf);
        fs::write(d.join(format!("f{i:05}")), &buf)?;
        files += 1;
        bytes += buf.len() as u64;
    }
    for i in 0..small {
        let d = root.join(format!("small/{:02}", i % 32));
        fs::create_dir_all(&d)?;
        rng.fill(&mut buf[..8192]);
        fs::write(d.join(format!("s{i:06}")), &buf[..8192])?;
        files += 1;
        bytes += 8192;
    }
    Ok((files, bytes))
}

fn drop_caches() -> bool {
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}

fn pipe_with_big_buffer() -> Res<(std::io::PipeReader, std::io::PipeWriter)> {
    let (r, w) = std::io::pipe()?;
    use std::os::fd::AsRawFd;
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    Ok((r, w))
}

struct Pass {
    wall: Duration,
    stream_bytes: u64,
    data_bytes: u64,
    entries: u64,
}

/// Streams `paths` (or the whole tree) from `src` into `dest` through a pipe.
fn transfer(
    src: &Path,
    dest: &Path,
    paths: Option<Vec<ferry_fs::RelPath>>,
    opts: ApplyOptions,
) -> Res<(Pass, ferry_fs::WriteSummary)> {
    let (r, w) = pipe_with_big_buffer()?;
    let t = Instant::now();
    let src2 = src.to_path_buf();
    let writer = std::thread::spawn(move || -> Res<ferry_fs::WriteSummary> {
        let mut sw = StreamWriter::new(w);
        let s = match paths {
            None => sw.write_tree(&src2, TreeMode::Plain)?,
            Some(p) => sw.write_paths(&src2, TreeMode::Plain, &p)?,
        };
        sw.into_inner().flush()?;
        Ok(s)
    });
    let applied =
        StreamReader::new(std::io::BufReader::with_capacity(1 << 20, r))?.apply_into(dest, &opts);
    let written = writer.join().map_err(|_| "writer thread panicked")??;
    let applied = applied?;
    Ok((
        Pass {
            wall: t.elapsed(),
            stream_bytes: applied.stream_bytes,
            data_bytes: applied.counts.data_bytes,
            entries: applied.counts.entries,
        },
        written,
    ))
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let base = PathBuf::from(
        args.next()
            .ok_or("usage: throughput BASE_DIR [MiB] [CHANGED_MiB]")?,
    );
    let mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let changed_mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    if base.exists() {
        return Err(format!("{} exists", base.display()).into());
    }
    let src = base.join("src");
    fs::create_dir_all(&src)?;
    let t = Instant::now();
    let (files, bytes) = generate(&src, mib)?;
    println!(
        "generated {files} files, {} MiB in {:.1?}",
        bytes >> 20,
        t.elapsed()
    );

    // encode only, into a sink
    let cold = drop_caches();
    let t = Instant::now();
    let mut sw = StreamWriter::new(std::io::sink());
    let s = sw.write_tree(&src, TreeMode::Plain)?;
    let d = t.elapsed();
    println!(
        "encode only ({} cache): {:.2?}, {:.0} MiB/s, stream {} bytes for {} data bytes",
        if cold { "cold" } else { "warm" },
        d,
        mb_s(s.counts.data_bytes, d),
        s.stream_bytes,
        s.counts.data_bytes
    );
    let t = Instant::now();
    let mut sw = StreamWriter::new(std::io::sink());
    let s = sw.write_tree(&src, TreeMode::Plain)?;
    let d = t.elapsed();
    println!(
        "encode only (warm cache): {d:.2?}, {:.0} MiB/s",
        mb_s(s.counts.data_bytes, d)
    );

    // encode + apply through a pipe
    for (name, durable, cold) in [
        ("warm cache, no sync", false, false),
        ("cold cache, no sync", false, true),
        ("cold cache, durable", true, true),
    ] {
        let dest = base.join(format!("dest-{}", name.replace([' ', ','], "-")));
        if cold {
            drop_caches();
        }
        let opts = ApplyOptions {
            durable,
            ..ApplyOptions::fresh(TreeMode::Plain)
        };
        let (pass, _) = transfer(&src, &dest, None, opts)?;
        println!(
            "encode+apply, {name}: {:.2?}, {:.0} MiB/s data, {} entries, stream overhead {:.3}%",
            pass.wall,
            mb_s(pass.data_bytes, pass.wall),
            pass.entries,
            (pass.stream_bytes - pass.data_bytes) as f64 * 100.0 / pass.data_bytes as f64
        );
        if !durable {
            fs::remove_dir_all(&dest)?;
        } else {
            fs::rename(&dest, base.join("dest"))?;
        }
    }
    let dest = base.join("dest");

    // second pass: rewrite CHANGED_MiB in big files, touch a few small ones, delete and add some
    let baseline = {
        let mut sw = StreamWriter::new(std::io::sink());
        sw.write_tree(&src, TreeMode::Plain)?.manifest
    };
    let mut rng = Rng(42);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..changed_mib {
        rng.fill(&mut buf);
        fs::write(src.join(format!("big/{:02}/f{i:05}", i % 32)), &buf)?;
    }
    fs::write(src.join("small/00/new-file"), b"new")?;
    fs::remove_file(src.join("small/01/s000001"))?;
    let t = Instant::now();
    let changed = changed_since(&src, &baseline)?;
    let scan = t.elapsed();
    let opts = ApplyOptions::update(TreeMode::Plain);
    let (pass, _) = transfer(&src, &dest, Some(changed.clone()), opts)?;
    println!(
        "second pass after changing {changed_mib} MiB: changed_since {:.2?} ({} paths), transfer {:.2?}, stream {} bytes ({} data)",
        scan,
        changed.len(),
        pass.wall,
        pass.stream_bytes,
        pass.data_bytes
    );
    let t = Instant::now();
    let a = manifest(&src, TreeMode::Plain)?;
    let b = manifest(&dest, TreeMode::Plain)?;
    let diffs = a.diff(&b);
    println!(
        "manifest of both trees: {:.2?}, {} differences",
        t.elapsed(),
        diffs.len()
    );
    for d in diffs.iter().take(10) {
        println!("  {d}");
    }
    fs::remove_dir_all(&base)?;
    if !diffs.is_empty() {
        return Err("trees differ".into());
    }
    Ok(())
}
