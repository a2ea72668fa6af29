//! The stream format, version 1.
//!
//! ```text
//! stream  := header record* end
//! header  := "FERRYFS\0" version:u16 mode:u8 reserved:u8(=0) flags:u32(=0)      16 bytes
//! record  := tag:u8 len:u32 payload[len]                 len <= MAX_RECORD_LEN (2 MiB)
//! ```
//! All integers are little-endian. Records, by tag:
//!
//! | tag  | record     | payload |
//! |------|------------|---------|
//! | 0x01 | ROOT       | meta |
//! | 0x02 | DIR        | path meta |
//! | 0x03 | FILE       | path meta size:u64 n:u32 (offset:u64 len:u64)×n — then DATA… FILE_END |
//! | 0x04 | SYMLINK    | path meta target:b16 |
//! | 0x05 | HARDLINK   | path target:b16 |
//! | 0x06 | WHITEOUT   | path |
//! | 0x07 | OPAQUE     | path |
//! | 0x08 | FIFO       | path meta |
//! | 0x09 | CHARDEV    | path meta major:u32 minor:u32 |
//! | 0x0a | BLOCKDEV   | path meta major:u32 minor:u32 |
//! | 0x0b | REMOVE     | path |
//! | 0x10 | DATA       | raw bytes (1 ..= 1 MiB), the next bytes of the current file's extents |
//! | 0x11 | FILE_END   | content digest:\[u8;32\] |
//! | 0x7f | END        | entries:u64 files:u64 data_bytes:u64 stream_sha256:\[u8;32\] |
//!
//! ```text
//! path  := b16 (validated: relative, no '.', '..' or empty components, <= 4096 bytes)
//! b16   := len:u16 bytes[len]        b32 := len:u32 bytes[len]
//! meta  := mode:u32 uid:u32 gid:u32 atime_s:i64 atime_ns:u32 mtime_s:i64 mtime_ns:u32
//!          nxattr:u16 (name:b16 value:b32)×nxattr          names strictly ascending
//! ```
//!
//! A FILE's extents are sorted and disjoint, at most [`MAX_EXTENTS`]; DATA records fill them in
//! order and never straddle two extents; everything else is a hole. FILE_END carries the file's
//! content digest (see [`ContentHasher`]), which the decoder recomputes. END carries the record
//! counts and the SHA-256 of every stream byte before END's own tag, so a stream cut at a record
//! boundary, reordered or altered anywhere is refused. Every payload must be consumed exactly.

use sha2::{Digest, Sha256};

use crate::entry::{Entry, Extent, Meta, Timestamp};
use crate::path::{self, PathError, RelPath};

/// First eight bytes of every stream.
pub const MAGIC: [u8; 8] = *b"FERRYFS\0";
/// Format version written and accepted.
pub const VERSION: u16 = 1;
/// Header size in bytes.
pub const HEADER_LEN: usize = 16;
/// Largest record payload a decoder accepts; it never allocates more than this from a length.
pub const MAX_RECORD_LEN: u32 = 2 << 20;
/// Size of DATA records written (the last one of an extent may be shorter).
pub const DATA_CHUNK: usize = 1 << 20;
/// Most extents one FILE record may list; files more fragmented than that have their smallest
/// holes sent as zeros.
pub const MAX_EXTENTS: usize = 4096;
/// Most extended attributes one entry may carry.
pub const MAX_XATTRS: usize = 1024;
/// Longest attribute value (Linux `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE: usize = 65536;
/// Longest attribute name (Linux `XATTR_NAME_MAX`).
pub const MAX_XATTR_NAME: usize = 255;
/// Longest symlink target (Linux `PATH_MAX` less the NUL).
pub const MAX_LINK_TARGET: usize = 4095;
/// Block size of the content digest.
pub const CONTENT_BLOCK: u64 = 64 * 1024;

pub(crate) mod tag {
    pub const ROOT: u8 = 0x01;
    pub const DIR: u8 = 0x02;
    pub const FILE: u8 = 0x03;
    pub const SYMLINK: u8 = 0x04;
    pub const HARDLINK: u8 = 0x05;
    pub const WHITEOUT: u8 = 0x06;
    pub const OPAQUE: u8 = 0x07;
    pub const FIFO: u8 = 0x08;
    pub const CHARDEV: u8 = 0x09;
    pub const BLOCKDEV: u8 = 0x0a;
    pub const REMOVE: u8 = 0x0b;
    pub const DATA: u8 = 0x10;
    pub const FILE_END: u8 = 0x11;
    pub const END: u8 = 0x7f;
}

/// Why an entry could not be encoded or decoded.
#[derive(Debug)]
pub(crate) enum WireError {
    Malformed(String),
    Path { raw: Vec<u8>, reason: PathError },
}

fn bad(what: impl Into<String>) -> WireError {
    WireError::Malformed(what.into())
}

// ---------------------------------------------------------------- encoding

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_b16(out: &mut Vec<u8>, b: &[u8]) -> Result<(), WireError> {
    let n = u16::try_from(b.len()).map_err(|_| bad("field longer than 65535 bytes"))?;
    put_u16(out, n);
    out.extend_from_slice(b);
    Ok(())
}

fn put_meta(out: &mut Vec<u8>, m: &Meta) -> Result<(), WireError> {
    put_u32(out, m.mode);
    put_u32(out, m.uid);
    put_u32(out, m.gid);
    out.extend_from_slice(&m.atime.sec.to_le_bytes());
    put_u32(out, m.atime.nsec);
    out.extend_from_slice(&m.mtime.sec.to_le_bytes());
    put_u32(out, m.mtime.nsec);
    if m.xattrs.len() > MAX_XATTRS {
        return Err(bad(format!(
            "{} extended attributes (max {MAX_XATTRS})",
            m.xattrs.len()
        )));
    }
    put_u16(out, m.xattrs.len() as u16);
    for (name, value) in &m.xattrs {
        if name.is_empty() || name.len() > MAX_XATTR_NAME || value.len() > MAX_XATTR_VALUE {
            return Err(bad("extended attribute name or value out of bounds"));
        }
        put_b16(out, name)?;
        put_u32(out, value.len() as u32);
        out.extend_from_slice(value);
    }
    Ok(())
}

/// Encodes an entry's payload into `out`, returning its tag.
pub(crate) fn encode_entry(e: &Entry, out: &mut Vec<u8>) -> Result<u8, WireError> {
    out.clear();
    let t = match e {
        Entry::Root { meta } => {
            put_meta(out, meta)?;
            tag::ROOT
        }
        Entry::Dir { path, meta } => {
            put_b16(out, path.as_bytes())?;
            put_meta(out, meta)?;
            tag::DIR
        }
        Entry::File {
            path,
            meta,
            size,
            extents,
        } => {
            put_b16(out, path.as_bytes())?;
            put_meta(out, meta)?;
            put_u64(out, *size);
            if extents.len() > MAX_EXTENTS {
                return Err(bad("too many extents"));
            }
            put_u32(out, extents.len() as u32);
            for (off, len) in extents {
                put_u64(out, *off);
                put_u64(out, *len);
            }
            tag::FILE
        }
        Entry::Symlink { path, meta, target } => {
            put_b16(out, path.as_bytes())?;
            put_meta(out, meta)?;
            put_b16(out, target)?;
            tag::SYMLINK
        }
        Entry::Hardlink { path, target } => {
            put_b16(out, path.as_bytes())?;
            put_b16(out, target.as_bytes())?;
            tag::HARDLINK
        }
        Entry::Whiteout { path } => {
            put_b16(out, path.as_bytes())?;
            tag::WHITEOUT
        }
        Entry::Opaque { path } => {
            put_b16(out, path.as_bytes())?;
            tag::OPAQUE
        }
        Entry::Fifo { path, meta } => {
            put_b16(out, path.as_bytes())?;
            put_meta(out, meta)?;
            tag::FIFO
        }
        Entry::CharDev {
            path,
            meta,
            major,
            minor,
        }
        | Entry::BlockDev {
            path,
            meta,
            major,
            minor,
        } => {
            put_b16(out, path.as_bytes())?;
            put_meta(out, meta)?;
            put_u32(out, *major);
            put_u32(out, *minor);
            if matches!(e, Entry::CharDev { .. }) {
                tag::CHARDEV
            } else {
                tag::BLOCKDEV
            }
        }
        Entry::Remove { path } => {
            put_b16(out, path.as_bytes())?;
            tag::REMOVE
        }
    };
    if out.len() > MAX_RECORD_LEN as usize {
        return Err(bad("entry metadata larger than a record"));
    }
    Ok(t)
}

pub(crate) fn encode_header(mode: crate::TreeMode) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[10] = mode.to_byte();
    h
}

// ---------------------------------------------------------------- decoding

struct Cur<'a> {
    b: &'a [u8],
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(bad(format!("payload too short for {what}")));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u16(&mut self, what: &str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, WireError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn b16(&mut self, what: &str) -> Result<&'a [u8], WireError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }
    fn path(&mut self) -> Result<RelPath, WireError> {
        let raw = self.b16("path")?;
        path::validate(raw).map_err(|reason| WireError::Path {
            raw: raw.to_vec(),
            reason,
        })?;
        RelPath::new(raw.to_vec()).map_err(|reason| WireError::Path {
            raw: raw.to_vec(),
            reason,
        })
    }
    fn time(&mut self, what: &str) -> Result<Timestamp, WireError> {
        let sec = self.u64(what)? as i64;
        let nsec = self.u32(what)?;
        if nsec >= 1_000_000_000 {
            return Err(bad(format!("{what} nanoseconds out of range")));
        }
        Ok(Timestamp { sec, nsec })
    }
    fn meta(&mut self) -> Result<Meta, WireError> {
        let mode = self.u32("mode")?;
        if mode & !0o7777 != 0 {
            return Err(bad(format!("mode {mode:o} has bits beyond 0o7777")));
        }
        let uid = self.u32("uid")?;
        let gid = self.u32("gid")?;
        let atime = self.time("atime")?;
        let mtime = self.time("mtime")?;
        let n = self.u16("xattr count")? as usize;
        if n > MAX_XATTRS {
            return Err(bad(format!("{n} extended attributes (max {MAX_XATTRS})")));
        }
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(n.min(self.b.len() / 6));
        for _ in 0..n {
            let name = self.b16("xattr name")?;
            if name.is_empty() || name.len() > MAX_XATTR_NAME || name.contains(&0) {
                return Err(bad("extended attribute name empty, too long or with NUL"));
            }
            let vlen = self.u32("xattr value")? as usize;
            if vlen > MAX_XATTR_VALUE {
                return Err(bad(format!("extended attribute value of {vlen} bytes")));
            }
            let value = self.take(vlen, "xattr value")?;
            if let Some((prev, _)) = xattrs.last() {
                if prev.as_slice() >= name {
                    return Err(bad("extended attribute names not strictly ascending"));
                }
            }
            xattrs.push((name.to_vec(), value.to_vec()));
        }
        Ok(Meta {
            mode,
            uid,
            gid,
            atime,
            mtime,
            xattrs,
        })
    }
    fn done(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(bad(format!("{} trailing bytes in payload", self.b.len())))
        }
    }
}

/// Decodes one entry record's payload.
pub(crate) fn decode_entry(t: u8, payload: &[u8]) -> Result<Entry, WireError> {
    let mut c = Cur { b: payload };
    let e = match t {
        tag::ROOT => Entry::Root { meta: c.meta()? },
        tag::DIR => Entry::Dir {
            path: c.path()?,
            meta: c.meta()?,
        },
        tag::FILE => {
            let path = c.path()?;
            let meta = c.meta()?;
            let size = c.u64("size")?;
            if size > i64::MAX as u64 {
                return Err(bad(format!("file size {size} beyond i64")));
            }
            let n = c.u32("extent count")? as usize;
            if n > MAX_EXTENTS {
                return Err(bad(format!("{n} extents (max {MAX_EXTENTS})")));
            }
            let mut extents: Vec<Extent> = Vec::with_capacity(n.min(c.b.len() / 16));
            let mut floor = 0u64;
            for _ in 0..n {
                let off = c.u64("extent offset")?;
                let len = c.u64("extent length")?;
                let end = off
                    .checked_add(len)
                    .ok_or_else(|| bad("extent end overflows"))?;
                if len == 0 || off < floor || end > size {
                    return Err(bad(format!(
                        "extent ({off}, {len}) empty, unsorted, overlapping or past size {size}"
                    )));
                }
                floor = end;
                extents.push((off, len));
            }
            Entry::File {
                path,
                meta,
                size,
                extents,
            }
        }
        tag::SYMLINK => {
            let path = c.path()?;
            let meta = c.meta()?;
            let target = c.b16("symlink target")?;
            if target.is_empty() || target.len() > MAX_LINK_TARGET || target.contains(&0) {
                return Err(bad("symlink target empty, too long or with NUL"));
            }
            Entry::Symlink {
                path,
                meta,
                target: target.to_vec(),
            }
        }
        tag::HARDLINK => Entry::Hardlink {
            path: c.path()?,
            target: c.path()?,
        },
        tag::WHITEOUT => Entry::Whiteout { path: c.path()? },
        tag::OPAQUE => Entry::Opaque { path: c.path()? },
        tag::FIFO => Entry::Fifo {
            path: c.path()?,
            meta: c.meta()?,
        },
        tag::CHARDEV | tag::BLOCKDEV => {
            let path = c.path()?;
            let meta = c.meta()?;
            let major = c.u32("major")?;
            let minor = c.u32("minor")?;
            if t == tag::CHARDEV {
                Entry::CharDev {
                    path,
                    meta,
                    major,
                    minor,
                }
            } else {
                Entry::BlockDev {
                    path,
                    meta,
                    major,
                    minor,
                }
            }
        }
        tag::REMOVE => Entry::Remove { path: c.path()? },
        other => return Err(bad(format!("unknown record tag {other:#04x}"))),
    };
    c.done()?;
    Ok(e)
}

/// The END record's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Entry records (everything but DATA, FILE_END and END).
    pub entries: u64,
    /// FILE records.
    pub files: u64,
    /// Sum of DATA payload lengths.
    pub data_bytes: u64,
}

pub(crate) const END_LEN: usize = 8 * 3 + 32;

pub(crate) fn encode_end(c: &Counts, digest: &[u8; 32]) -> [u8; END_LEN] {
    let mut out = [0u8; END_LEN];
    out[0..8].copy_from_slice(&c.entries.to_le_bytes());
    out[8..16].copy_from_slice(&c.files.to_le_bytes());
    out[16..24].copy_from_slice(&c.data_bytes.to_le_bytes());
    out[24..56].copy_from_slice(digest);
    out
}

pub(crate) fn decode_end(payload: &[u8]) -> Result<(Counts, [u8; 32]), WireError> {
    if payload.len() != END_LEN {
        return Err(bad(format!(
            "END payload of {} bytes, want {END_LEN}",
            payload.len()
        )));
    }
    let mut c = Cur { b: payload };
    let counts = Counts {
        entries: c.u64("entries")?,
        files: c.u64("files")?,
        data_bytes: c.u64("data bytes")?,
    };
    let mut d = [0u8; 32];
    d.copy_from_slice(c.take(32, "digest")?);
    Ok((counts, d))
}

// ---------------------------------------------------------------- content digest

/// The content digest of a regular file, independent of how it is laid out on disk.
///
/// `SHA-256("ferry-content-v1\0" || size:u64 || (index:u64 || block)*)` over the file's
/// 64 KiB blocks (the last one short) that contain a non-zero byte. Holes and all-zero blocks
/// contribute nothing, so a sparse file hashes the same as its dense copy, and — the reason for
/// the construction — neither side ever hashes the zeros of a hole: a hostile FILE record
/// declaring an exabyte of holes costs nothing to verify.
pub struct ContentHasher {
    size: u64,
    block: Vec<u8>,
    cur: Option<u64>,
    dirty: bool,
    sha: Sha256,
}

fn all_zero(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

impl ContentHasher {
    /// Starts the digest of a file of `size` bytes.
    pub fn new(size: u64) -> Self {
        let mut sha = Sha256::new();
        sha.update(b"ferry-content-v1\0");
        sha.update(size.to_le_bytes());
        ContentHasher {
            size,
            block: vec![0u8; CONTENT_BLOCK as usize],
            cur: None,
            dirty: false,
            sha,
        }
    }

    fn block_len(&self, idx: u64) -> usize {
        (self.size - idx * CONTENT_BLOCK).min(CONTENT_BLOCK) as usize
    }

    fn flush(&mut self) {
        if let Some(idx) = self.cur.take() {
            if self.dirty {
                let len = self.block_len(idx);
                if !all_zero(&self.block[..len]) {
                    self.sha.update(idx.to_le_bytes());
                    self.sha.update(&self.block[..len]);
                }
                self.block.fill(0);
                self.dirty = false;
            }
        }
    }

    /// Adds `data` found at `offset`. Calls must come in ascending, non-overlapping order and
    /// stay within the size; the gaps between them are zeros.
    pub fn update(&mut self, mut offset: u64, mut data: &[u8]) {
        let room = self.size.saturating_sub(offset);
        if (data.len() as u64) > room {
            data = &data[..room as usize];
        }
        while !data.is_empty() {
            let idx = offset / CONTENT_BLOCK;
            let within = (offset % CONTENT_BLOCK) as usize;
            let blen = self.block_len(idx);
            let n = (blen - within).min(data.len());
            if within == 0 && n == blen {
                self.flush();
                if !all_zero(&data[..n]) {
                    self.sha.update(idx.to_le_bytes());
                    self.sha.update(&data[..n]);
                }
            } else {
                if self.cur != Some(idx) {
                    self.flush();
                    self.cur = Some(idx);
                }
                self.block[within..within + n].copy_from_slice(&data[..n]);
                self.dirty = true;
            }
            offset += n as u64;
            data = &data[n..];
        }
    }

    /// The digest.
    pub fn finish(mut self) -> [u8; 32] {
        self.flush();
        self.sha.finalize().into()
    }
}

/// Digest of a symlink target, as manifests record it.
pub(crate) fn link_digest(target: &[u8]) -> [u8; 32] {
    let mut sha = Sha256::new();
    sha.update(b"ferry-symlink-v1\0");
    sha.update(target);
    sha.finalize().into()
}

/// Digest of an attribute list, as manifests record it.
pub(crate) fn xattrs_digest(x: &[(Vec<u8>, Vec<u8>)]) -> [u8; 32] {
    let mut sha = Sha256::new();
    sha.update(b"ferry-xattrs-v1\0");
    for (n, v) in x {
        sha.update((n.len() as u64).to_le_bytes());
        sha.update(n);
        sha.update((v.len() as u64).to_le_bytes());
        sha.update(v);
    }
    sha.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(content: &[u8]) -> [u8; 32] {
        let mut sha = Sha256::new();
        sha.update(b"ferry-content-v1\0");
        sha.update((content.len() as u64).to_le_bytes());
        for (i, block) in content.chunks(CONTENT_BLOCK as usize).enumerate() {
            if block.iter().any(|&b| b != 0) {
                sha.update((i as u64).to_le_bytes());
                sha.update(block);
            }
        }
        sha.finalize().into()
    }

    #[test]
    fn content_digest_ignores_layout() {
        let size = 3 * CONTENT_BLOCK as usize + 1234;
        let mut content = vec![0u8; size];
        content[10] = 1;
        content[2 * CONTENT_BLOCK as usize + 7] = 9;
        content[size - 1] = 3;
        let want = reference(&content);

        let mut dense = ContentHasher::new(size as u64);
        dense.update(0, &content);
        assert_eq!(dense.finish(), want);

        let mut pieces = ContentHasher::new(size as u64);
        for (i, chunk) in content.chunks(1000).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                pieces.update((i * 1000) as u64, chunk);
            }
        }
        assert_eq!(pieces.finish(), want);

        let mut other = content.clone();
        other[11] = 1;
        assert_ne!(reference(&other), want);
    }

    #[test]
    fn entries_roundtrip() {
        let meta = Meta {
            mode: 0o4755,
            uid: 1,
            gid: 2,
            atime: Timestamp { sec: -5, nsec: 7 },
            mtime: Timestamp {
                sec: 1 << 40,
                nsec: 999_999_999,
            },
            xattrs: vec![
                (b"user.a".to_vec(), vec![]),
                (b"user.b".to_vec(), vec![0, 1]),
            ],
        };
        let p = |s: &str| RelPath::try_from(s).unwrap();
        let entries = vec![
            Entry::Root { meta: meta.clone() },
            Entry::Dir {
                path: p("d"),
                meta: meta.clone(),
            },
            Entry::File {
                path: p("d/f"),
                meta: meta.clone(),
                size: 100,
                extents: vec![(0, 10), (50, 50)],
            },
            Entry::Symlink {
                path: p("l"),
                meta: meta.clone(),
                target: b"/etc/passwd".to_vec(),
            },
            Entry::Hardlink {
                path: p("h"),
                target: p("d/f"),
            },
            Entry::Whiteout { path: p("w") },
            Entry::Opaque { path: p("d") },
            Entry::Fifo {
                path: p("p"),
                meta: meta.clone(),
            },
            Entry::CharDev {
                path: p("c"),
                meta: meta.clone(),
                major: 1,
                minor: 3,
            },
            Entry::BlockDev {
                path: p("b"),
                meta,
                major: 8,
                minor: 0,
            },
            Entry::Remove { path: p("r") },
        ];
        let mut buf = Vec::new();
        for e in entries {
            let t = encode_entry(&e, &mut buf).unwrap();
            assert_eq!(decode_entry(t, &buf).unwrap(), e);
            if !buf.is_empty() {
                assert!(decode_entry(t, &buf[..buf.len() - 1]).is_err());
                let mut longer = buf.clone();
                longer.push(0);
                assert!(decode_entry(t, &longer).is_err());
            }
        }
    }
}
