//! Deterministic fuzzing inside the normal test suite (the cargo-fuzz target in `fuzz/` goes
//! further but needs nightly): 10,000 seeded inputs — random bytes, byte-level mutations of
//! valid streams, and record-level mutations re-sealed with a correct END so they get past the
//! checksum into the semantic checks. None may panic; each either applies completely or leaves
//! nothing behind; a canary next to the destination is never touched.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

mod common;

use std::fs;
use std::os::unix::fs::symlink;
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
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

fn seeds() -> Vec<Vec<u8>> {
    let t = tmp();
    let root = t.path();
    fs::create_dir_all(root.join("d/e")).unwrap();
    fs::write(root.join("d/e/f"), b"hello").unwrap();
    fs::write(root.join("g"), vec![1u8; 3000]).unwrap();
    fs::hard_link(root.join("g"), root.join("h")).unwrap();
    symlink("d/e/f", root.join("l")).unwrap();
    symlink("/", root.join("abs")).unwrap();
    write_at(&root.join("s"), 70_000, b"x");
    mknod(&root.join("wh"), libc::S_IFCHR, 0, 0);
    set_xattr(&root.join("d"), "trusted.overlay.opaque", b"y");
    set_xattr(&root.join("g"), "user.a", b"b");
    let mut out = vec![
        encode(root, TreeMode::Plain).0,
        encode(root, TreeMode::OverlayUpper).0,
    ];
    out.push(encode_paths(root, TreeMode::Plain, &[p("g"), p("gone"), p("d/e")]).0);
    out
}

/// (tag, payload) records of a stream, END excluded.
fn records(stream: &[u8]) -> (Vec<u8>, Vec<(u8, Vec<u8>)>) {
    let header = stream[..16].to_vec();
    let mut recs = Vec::new();
    let mut i = 16;
    while i + 5 <= stream.len() {
        let tag = stream[i];
        let len = u32::from_le_bytes(stream[i + 1..i + 5].try_into().unwrap()) as usize;
        if tag == END {
            break;
        }
        recs.push((tag, stream[i + 5..i + 5 + len].to_vec()));
        i += 5 + len;
    }
    (header, recs)
}

/// Reassembles records with a correct END for whatever they now are.
fn seal(header: &[u8], recs: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = header.to_vec();
    let (mut entries, mut files, mut data) = (0u64, 0u64, 0u64);
    for (tag, payload) in recs {
        out.push(*tag);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
        match *tag {
            DATA => data += payload.len() as u64,
            FILE_END => {}
            FILE => {
                files += 1;
                entries += 1
            }
            _ => entries += 1,
        }
    }
    let digest: [u8; 32] = Sha256::digest(&out).into();
    out.push(END);
    out.extend_from_slice(&56u32.to_le_bytes());
    for v in [entries, files, data] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&digest);
    out
}

const NASTY: &[&[u8]] = &[
    b"..",
    b"/",
    b"/etc",
    b"abs/x",
    b"../../etc/shadow",
    b"l/x",
    b"d/e/f/x",
    b"",
    b".",
    b"a//b",
];

fn mutate_record(rng: &mut StdRng, recs: &mut Vec<(u8, Vec<u8>)>) {
    if recs.is_empty() {
        return;
    }
    let i = rng.gen_range(0..recs.len());
    match rng.gen_range(0..9) {
        0 => {
            recs.remove(i);
        }
        1 => {
            let r = recs[i].clone();
            recs.insert(rng.gen_range(0..=recs.len()), r);
        }
        2 => {
            let j = rng.gen_range(0..recs.len());
            recs.swap(i, j);
        }
        3 => {
            recs[i].0 = [
                ROOT, DIR, FILE, SYMLINK, HARDLINK, WHITEOUT, OPAQUE, FIFO, CHARDEV, REMOVE, DATA,
                FILE_END,
            ][rng.gen_range(0..12)]
        }
        4 | 5 => {
            let payload = &mut recs[i].1;
            if !payload.is_empty() {
                let k = rng.gen_range(0..payload.len());
                payload[k] ^= 1 << rng.gen_range(0..8);
            }
        }
        6 => {
            // replace the leading path with a nasty one
            let payload = &mut recs[i].1;
            if payload.len() >= 2 {
                let n = u16::from_le_bytes([payload[0], payload[1]]) as usize;
                if payload.len() >= 2 + n {
                    let nasty = NASTY[rng.gen_range(0..NASTY.len())];
                    let mut np = (nasty.len() as u16).to_le_bytes().to_vec();
                    np.extend_from_slice(nasty);
                    np.extend_from_slice(&payload[2 + n..]);
                    *payload = np;
                }
            }
        }
        7 => {
            let payload = &mut recs[i].1;
            let cut = rng.gen_range(0..=payload.len());
            payload.truncate(cut);
        }
        _ => {
            let payload = &mut recs[i].1;
            let k = rng.gen_range(0..=payload.len());
            let extra: Vec<u8> = (0..rng.gen_range(1..16)).map(|_| rng.gen()).collect();
            payload.splice(k..k, extra);
        }
    }
}

fn mutate_bytes(rng: &mut StdRng, b: &mut Vec<u8>) {
    for _ in 0..rng.gen_range(1..4) {
        if b.is_empty() {
            b.push(rng.gen());
            continue;
        }
        let i = rng.gen_range(0..b.len());
        match rng.gen_range(0..5) {
            0 => b[i] ^= 1 << rng.gen_range(0..8),
            1 => b[i] = rng.gen(),
            2 => b.truncate(i),
            3 => {
                let end = (i + rng.gen_range(1..64)).min(b.len());
                b.drain(i..end);
            }
            _ => {
                if i + 4 <= b.len() {
                    b[i..i + 4].copy_from_slice(&[0xff, 0xff, 0xff, 0x7f]);
                }
            }
        }
    }
}

#[test]
fn ten_thousand_seeded_inputs() {
    let seeds = seeds();
    let t = tmp();
    let base = t.path();
    let canary = base.join("canary");
    fs::create_dir(&canary).unwrap();
    fs::write(canary.join("x"), b"canary").unwrap();
    let canary_before = manifest(&canary, TreeMode::Plain).unwrap();
    let work = base.join("work");
    fs::create_dir(&work).unwrap();
    let dest = work.join("dest");
    let mut rng = StdRng::seed_from_u64(0x5eed_f5f5);
    let (mut applied, mut refused) = (0u32, 0u32);
    for i in 0..10_000u32 {
        let input = match i % 10 {
            0 => (0..rng.gen_range(0..600)).map(|_| rng.gen()).collect(),
            1..=4 => {
                let mut b = seeds[rng.gen_range(0..seeds.len())].clone();
                mutate_bytes(&mut rng, &mut b);
                b
            }
            _ => {
                let (header, mut recs) = records(&seeds[rng.gen_range(0..seeds.len())]);
                for _ in 0..rng.gen_range(1..4) {
                    mutate_record(&mut rng, &mut recs);
                }
                seal(&header, &recs)
            }
        };
        let mode = if i % 2 == 0 {
            TreeMode::Plain
        } else {
            TreeMode::OverlayUpper
        };
        let res = StreamReader::new(&input[..]).and_then(|r| r.apply_into(&dest, &fast(mode)));
        match res {
            Ok(_) => {
                applied += 1;
                assert_eq!(listing(&work), ["dest"]);
                fs::remove_dir_all(&dest).unwrap();
            }
            Err(_) => {
                refused += 1;
                assert!(
                    listing(&work).is_empty(),
                    "input {i} left {:?}",
                    listing(&work)
                );
            }
        }
    }
    assert_same(&canary_before, &manifest(&canary, TreeMode::Plain).unwrap());
    assert_eq!(listing(base), ["canary", "work"]);
    assert!(!Path::new("/x").exists());
    eprintln!("fuzz-like: {applied} applied, {refused} refused");
    assert!(
        applied > 100,
        "mutations too destructive to reach commits: {applied}"
    );
}
