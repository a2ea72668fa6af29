//! The lazy page ranges of each process of a checkpoint, read from its `pagemap-<pid>.img`:
//! a CRIU image (two magics) of length-prefixed protobuf records, a `pagemap_head` and then
//! one `pagemap_entry` per run of pages. Entries flagged `PE_LAZY` are the ones the
//! source's page server holds and the lazy-pages daemon will ask for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::ps::{lazy_dst, PAGE_SIZE};
use crate::ranges::RangeSet;

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
const PE_LAZY: u64 = 1 << 1;
/// No process of a container maps more than this; a record claiming more is corrupt.
const MAX_RECORD: usize = 1 << 20;

/// Lazy ranges (byte addresses, page-aligned) by page-server id of the process.
pub type LazyPages = BTreeMap<u64, RangeSet>;

#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
}

/// Every process's lazy ranges in the image directory `dir`.
pub fn lazy_pages(dir: &Path) -> Result<LazyPages, PagemapError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PagemapError::Io { path, source }
    };
    let mut out = LazyPages::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("pagemap-"))
            .and_then(|n| n.strip_suffix(".img"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let ranges = parse(&bytes).map_err(|what| PagemapError::Format {
            path: path.clone(),
            what,
        })?;
        if !ranges.is_empty() {
            out.insert(lazy_dst(pid), ranges);
        }
    }
    Ok(out)
}

/// The lazy ranges of one pagemap image.
pub fn parse(bytes: &[u8]) -> Result<RangeSet, String> {
    let mut r = Reader { b: bytes, at: 0 };
    let (m0, m1) = (r.u32()?, r.u32()?);
    if (m0, m1) != (IMG_COMMON_MAGIC, PAGEMAP_MAGIC) {
        return Err(format!("not a pagemap image (magics {m0:#x} {m1:#x})"));
    }
    let mut set = RangeSet::new();
    let mut first = true;
    while r.at < r.b.len() {
        let len = r.u32()? as usize;
        if len > MAX_RECORD {
            return Err(format!("a record of {len} bytes at offset {}", r.at));
        }
        let rec = r.take(len)?;
        if first {
            first = false;
            continue;
        }
        let e = entry(rec)?;
        if e.flags & PE_LAZY != 0 && e.nr_pages > 0 {
            let end = e
                .nr_pages
                .checked_mul(PAGE_SIZE)
                .and_then(|n| e.vaddr.checked_add(n))
                .ok_or_else(|| format!("entry at {:#x} overflows", e.vaddr))?;
            if e.vaddr % PAGE_SIZE != 0 {
                return Err(format!("entry at {:#x} is not page-aligned", e.vaddr));
            }
            set.insert(e.vaddr, end);
        }
    }
    Ok(set)
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Entry {
    vaddr: u64,
    nr_pages: u64,
    flags: u64,
}

/// Decodes a `pagemap_entry`: `vaddr` = 1, `compat_nr_pages` = 2, `flags` = 4, `nr_pages` = 5
/// (which, when present, overrides 2).
fn entry(rec: &[u8]) -> Result<Entry, String> {
    let mut r = Reader { b: rec, at: 0 };
    let mut e = Entry::default();
    let mut nr64 = None;
    while r.at < r.b.len() {
        let key = r.varint()?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = r.varint()?;
                match field {
                    1 => e.vaddr = v,
                    2 => e.nr_pages = v,
                    4 => e.flags = v,
                    5 => nr64 = Some(v),
                    _ => {}
                }
            }
            1 => {
                r.take(8)?;
            }
            2 => {
                let n = r.varint()? as usize;
                r.take(n)?;
            }
            5 => {
                r.take(4)?;
            }
            w => return Err(format!("pagemap entry field {field} has wire type {w}")),
        }
    }
    if let Some(n) = nr64 {
        e.nr_pages = n;
    }
    Ok(e)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| format!("cut short at offset {} (wanted {n} bytes)", self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("varint too long at offset {}", self.at))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    /// A pagemap image as CRIU writes it, for `(vaddr, nr_pages, flags)` entries.
    pub(crate) fn image(entries: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(IMG_COMMON_MAGIC.to_le_bytes());
        out.extend(PAGEMAP_MAGIC.to_le_bytes());
        let head = [0x08, 0x01];
        out.extend((head.len() as u32).to_le_bytes());
        out.extend(head);
        for (vaddr, nr, flags) in entries {
            let mut rec = Vec::new();
            rec.push(0x08);
            varint(*vaddr, &mut rec);
            rec.push(0x10);
            varint(*nr, &mut rec);
            rec.push(0x20);
            varint(*flags, &mut rec);
            rec.push(0x28);
            varint(*nr, &mut rec);
            out.extend((rec.len() as u32).to_le_bytes());
            out.extend(rec);
        }
        out
    }

    #[test]
    fn only_lazy_entries_count() {
        let img = image(&[
            (0x1000, 2, PE_LAZY),
            (0x3000, 1, PE_LAZY),
            (0x10000, 4, 1 << 2),
            (0x20000, 1, PE_LAZY | 1 << 2),
        ]);
        let set = parse(&img).unwrap();
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            vec![(0x1000, 0x4000), (0x20000, 0x21000)]
        );
    }

    #[test]
    fn bad_images_say_what_is_wrong() {
        let img = image(&[(0x1000, 2, PE_LAZY)]);
        assert!(parse(&img[..img.len() - 3])
            .unwrap_err()
            .contains("cut short"));
        let mut wrong = img.clone();
        wrong[4] ^= 1;
        assert!(parse(&wrong).unwrap_err().contains("not a pagemap image"));
        assert!(parse(&image(&[(0x1001, 1, PE_LAZY)]))
            .unwrap_err()
            .contains("page-aligned"));
    }

    #[test]
    fn a_directory_yields_one_set_per_process() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("pagemap-1.img"),
            image(&[(0x1000, 2, PE_LAZY)]),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("pagemap-9.img"),
            image(&[(0x5000, 1, 1 << 2)]),
        )
        .unwrap();
        std::fs::write(dir.path().join("pagemap-shmem-3.img"), b"x").unwrap();
        std::fs::write(dir.path().join("pages-1.img"), b"x").unwrap();
        let all = lazy_pages(dir.path()).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[&lazy_dst(1)].len(), 0x2000);
    }
}
