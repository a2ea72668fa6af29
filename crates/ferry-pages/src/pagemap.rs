//! The lazy page ranges of each process of a checkpoint, read from its `pagemap-<pid>.img`:
//! a CRIU image (two magics) of length-prefixed protobuf records, a `pagemap_head` and then
//! one `pagemap_entry` per run of pages. Entries flagged `PE_LAZY` are the ones the
//! source's page server holds and the lazy-pages daemon will ask for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_criu::image::{next_field, read_u32_le, take, Field, ImageError};

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
    let mut pos = 0;
    let (m0, m1) = (
        read_u32_le(bytes, &mut pos).map_err(said)?,
        read_u32_le(bytes, &mut pos).map_err(said)?,
    );
    if (m0, m1) != (IMG_COMMON_MAGIC, PAGEMAP_MAGIC) {
        return Err(format!("not a pagemap image (magics {m0:#x} {m1:#x})"));
    }
    let mut set = RangeSet::new();
    let mut first = true;
    while pos < bytes.len() {
        let len = read_u32_le(bytes, &mut pos).map_err(said)? as usize;
        if len > MAX_RECORD {
            return Err(format!("a record of {len} bytes at offset {pos}"));
        }
        let rec = take(bytes, &mut pos, len).map_err(said)?;
        if first {
            first = false;
            continue;
        }
        let e = entry(rec).map_err(said)?;
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

/// An image decoding error as the operator reads it.
fn said(e: ImageError) -> String {
    match e {
        ImageError::Truncated { at } => format!("cut short at byte {at}"),
        e => e.to_string(),
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Entry {
    vaddr: u64,
    nr_pages: u64,
    flags: u64,
}

/// Decodes a `pagemap_entry`: `vaddr` = 1, `compat_nr_pages` = 2, `flags` = 4, `nr_pages` = 5
/// (which, when present, overrides 2).
fn entry(rec: &[u8]) -> Result<Entry, ImageError> {
    let mut pos = 0;
    let mut e = Entry::default();
    let mut nr64 = None;
    while pos < rec.len() {
        let (number, _, field) = next_field(rec, &mut pos)?;
        let Field::Varint(v) = field else { continue };
        match number {
            1 => e.vaddr = v,
            2 => e.nr_pages = v,
            4 => e.flags = v,
            5 => nr64 = Some(v),
            _ => {}
        }
    }
    if let Some(n) = nr64 {
        e.nr_pages = n;
    }
    Ok(e)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ferry_criu::image::write_varint as varint;

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
