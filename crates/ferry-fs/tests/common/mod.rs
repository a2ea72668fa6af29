#![allow(dead_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use ferry_fs::{
    manifest, ApplyOptions, ApplySummary, FsError, Manifest, RelPath, StreamReader, StreamWriter,
    TreeMode, WriteSummary,
};
use sha2::{Digest, Sha256};

pub fn encode(root: &Path, mode: TreeMode) -> (Vec<u8>, WriteSummary) {
    let mut w = StreamWriter::new(Vec::new());
    let s = w.write_tree(root, mode).expect("write_tree");
    (w.into_inner(), s)
}

pub fn encode_paths(root: &Path, mode: TreeMode, paths: &[RelPath]) -> (Vec<u8>, WriteSummary) {
    let mut w = StreamWriter::new(Vec::new());
    let s = w.write_paths(root, mode, paths).expect("write_paths");
    (w.into_inner(), s)
}

pub fn apply(bytes: &[u8], dest: &Path, opts: ApplyOptions) -> Result<ApplySummary, FsError> {
    StreamReader::new(bytes)?.apply_into(dest, &opts)
}

pub fn assert_same(a: &Manifest, b: &Manifest) {
    let d = a.diff(b);
    assert!(
        d.is_empty(),
        "trees differ:\n{}",
        d.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

pub fn assert_trees_equal(a: &Path, b: &Path, mode: TreeMode) {
    assert_same(
        &manifest(a, mode).expect("manifest a"),
        &manifest(b, mode).expect("manifest b"),
    );
}

/// Names in `dir`, sorted: used to show that a failed apply left nothing behind.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        None
    } else {
        buf.truncate(r as usize);
        Some(buf)
    }
}

pub fn set_times(p: &Path, sec: i64, nsec: i64) {
    let c = cpath(p);
    let ts = [
        libc::timespec {
            tv_sec: sec - 1000,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

pub fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

pub fn mknod(p: &Path, mode: u32, major: u32, minor: u32) {
    let c = cpath(p);
    let r = unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// Writes `data` at `offset` of a file, creating it.
pub fn write_at(p: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(p)
        .unwrap();
    f.write_all_at(data, offset).unwrap();
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A stream built record by record from the format description alone, so hostile and odd
/// streams can be made with a valid END (counts and digest), proving that refusals come from
/// the checks on content, not from the checksum.
pub struct RawStream {
    pub bytes: Vec<u8>,
    pub entries: u64,
    pub files: u64,
    pub data: u64,
}

pub const ROOT: u8 = 0x01;
pub const DIR: u8 = 0x02;
pub const FILE: u8 = 0x03;
pub const SYMLINK: u8 = 0x04;
pub const HARDLINK: u8 = 0x05;
pub const WHITEOUT: u8 = 0x06;
pub const OPAQUE: u8 = 0x07;
pub const FIFO: u8 = 0x08;
pub const CHARDEV: u8 = 0x09;
pub const REMOVE: u8 = 0x0b;
pub const DATA: u8 = 0x10;
pub const FILE_END: u8 = 0x11;
pub const END: u8 = 0x7f;

pub fn b16(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

/// mode uid gid atime mtime and attributes.
pub fn meta(mode: u32, xattrs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&mode.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    for _ in 0..2 {
        m.extend_from_slice(&1_600_000_000i64.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
    }
    m.extend_from_slice(&(xattrs.len() as u16).to_le_bytes());
    for (n, v) in xattrs {
        b16(&mut m, n.as_bytes());
        m.extend_from_slice(&(v.len() as u32).to_le_bytes());
        m.extend_from_slice(v);
    }
    m
}

/// The content digest of a dense file, per the format description.
pub fn content_digest(content: &[u8]) -> [u8; 32] {
    let mut sha = Sha256::new();
    sha.update(b"ferry-content-v1\0");
    sha.update((content.len() as u64).to_le_bytes());
    for (i, block) in content.chunks(64 * 1024).enumerate() {
        if block.iter().any(|&b| b != 0) {
            sha.update((i as u64).to_le_bytes());
            sha.update(block);
        }
    }
    sha.finalize().into()
}

impl RawStream {
    pub fn new(mode: u8) -> Self {
        let mut bytes = b"FERRYFS\0".to_vec();
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.push(mode);
        bytes.extend_from_slice(&[0; 5]);
        RawStream {
            bytes,
            entries: 0,
            files: 0,
            data: 0,
        }
    }

    pub fn record(&mut self, tag: u8, payload: &[u8]) -> &mut Self {
        self.bytes.push(tag);
        self.bytes
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(payload);
        match tag {
            DATA => self.data += payload.len() as u64,
            FILE_END => {}
            FILE => {
                self.files += 1;
                self.entries += 1
            }
            _ => self.entries += 1,
        }
        self
    }

    pub fn root(&mut self) -> &mut Self {
        self.record(ROOT, &meta(0o755, &[]))
    }

    pub fn dir(&mut self, path: &[u8]) -> &mut Self {
        let mut p = Vec::new();
        b16(&mut p, path);
        p.extend(meta(0o755, &[]));
        self.record(DIR, &p)
    }

    pub fn symlink(&mut self, path: &[u8], target: &[u8]) -> &mut Self {
        let mut p = Vec::new();
        b16(&mut p, path);
        p.extend(meta(0o777, &[]));
        b16(&mut p, target);
        self.record(SYMLINK, &p)
    }

    pub fn hardlink(&mut self, path: &[u8], target: &[u8]) -> &mut Self {
        let mut p = Vec::new();
        b16(&mut p, path);
        b16(&mut p, target);
        self.record(HARDLINK, &p)
    }

    pub fn path_only(&mut self, tag: u8, path: &[u8]) -> &mut Self {
        let mut p = Vec::new();
        b16(&mut p, path);
        self.record(tag, &p)
    }

    /// A dense file with its data and digest.
    pub fn file(&mut self, path: &[u8], content: &[u8]) -> &mut Self {
        self.file_meta(path, content, &meta(0o644, &[]))
    }

    pub fn file_meta(&mut self, path: &[u8], content: &[u8], meta: &[u8]) -> &mut Self {
        let mut p = Vec::new();
        b16(&mut p, path);
        p.extend_from_slice(meta);
        p.extend_from_slice(&(content.len() as u64).to_le_bytes());
        if content.is_empty() {
            p.extend_from_slice(&0u32.to_le_bytes());
        } else {
            p.extend_from_slice(&1u32.to_le_bytes());
            p.extend_from_slice(&0u64.to_le_bytes());
            p.extend_from_slice(&(content.len() as u64).to_le_bytes());
        }
        self.record(FILE, &p);
        for chunk in content.chunks(1 << 20) {
            self.record(DATA, chunk);
        }
        self.record(FILE_END, &content_digest(content))
    }

    /// END with correct counts and digest.
    pub fn finish(&mut self) -> Vec<u8> {
        let digest: [u8; 32] = Sha256::digest(&self.bytes).into();
        let mut out = self.bytes.clone();
        out.push(END);
        out.extend_from_slice(&56u32.to_le_bytes());
        out.extend_from_slice(&self.entries.to_le_bytes());
        out.extend_from_slice(&self.files.to_le_bytes());
        out.extend_from_slice(&self.data.to_le_bytes());
        out.extend_from_slice(&digest);
        out
    }
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-fs-test")
        .tempdir_in("/tmp")
        .unwrap()
}

pub fn p(s: &str) -> RelPath {
    RelPath::try_from(s).unwrap()
}

pub fn dest_in(t: &tempfile::TempDir) -> PathBuf {
    t.path().join("dest")
}
