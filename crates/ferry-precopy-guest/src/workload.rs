//! The container's process. It owns a buffer whose every page holds a pattern derived from a
//! random nonce, the page number and how often that page was rewritten (its generation), keeps
//! rewriting random pages of a hot set, and on request checks every page against the pattern
//! its generation table predicts. After a restore that check proves that each page came back
//! in its latest version, not a stale copy from an earlier pre-dump round; the nonce and the
//! tick counter prove that the process continued instead of starting again.
//!
//! It talks to the driver through small JSON files in a state directory of its root
//! filesystem, written by rename so the driver never reads half a file and no descriptor stays
//! open across a dump.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::WorkloadSpec;

pub const PAGE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE / 8;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// File the workload rewrites every few ticks.
pub const PROGRESS: &str = "progress";
/// File the driver writes (an id) to ask for a verification.
pub const REQUEST: &str = "verify-request";

pub fn result_name(id: u64) -> String {
    format!("verify-{id}")
}

/// Ticks between two progress files: often enough for the driver to see the counter move
/// between rounds, rare enough not to add noticeably to the dirtied pages.
const PROGRESS_EVERY: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub nonce: u64,
    pub ticks: u64,
    pub page_writes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub id: u64,
    pub nonce: u64,
    pub ticks: u64,
    pub pages: u64,
    pub mismatched_pages: u64,
    pub ms: u64,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn page_seed(nonce: u64, page: usize, generation: u32) -> u64 {
    splitmix64(splitmix64(nonce ^ page as u64) ^ u64::from(generation))
}

/// The verified buffer and the generation of each of its pages.
pub struct Memory {
    nonce: u64,
    words: Vec<u64>,
    generations: Vec<u32>,
    rng: u64,
    page_writes: u64,
}

impl Memory {
    /// Allocates and writes every page, so all of them are resident and none is the zero page.
    /// Without `huge_pages` the buffer is advised against transparent huge pages first.
    pub fn new(pages: usize, nonce: u64, huge_pages: bool) -> Memory {
        let mut m = Memory {
            nonce,
            words: vec![0; pages * WORDS_PER_PAGE],
            generations: vec![0; pages],
            rng: splitmix64(nonce) | 1,
            page_writes: 0,
        };
        if !huge_pages {
            m.advise_no_huge_pages();
        }
        for p in 0..pages {
            m.write_page(p);
        }
        m
    }

    /// Best effort: MADV_NOHUGEPAGE over the page-aligned part of the buffer, before any page
    /// is touched.
    fn advise_no_huge_pages(&mut self) {
        let start = self.words.as_mut_ptr() as usize;
        let end = start + self.words.len() * 8;
        let aligned = start.next_multiple_of(PAGE);
        if end > aligned {
            let len = (end - aligned) / PAGE * PAGE;
            // SAFETY: the range lies inside the buffer this Memory owns; madvise changes no
            // contents, only the kernel's choice of page size.
            unsafe {
                libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE);
            }
        }
    }

    pub fn pages(&self) -> usize {
        self.generations.len()
    }

    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    pub fn page_writes(&self) -> u64 {
        self.page_writes
    }

    fn write_page(&mut self, p: usize) {
        let seed = page_seed(self.nonce, p, self.generations[p]);
        let page = &mut self.words[p * WORDS_PER_PAGE..(p + 1) * WORDS_PER_PAGE];
        for (i, w) in page.iter_mut().enumerate() {
            *w = seed ^ (i as u64).wrapping_mul(GOLDEN);
        }
        self.page_writes += 1;
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Rewrites `count` pages picked at random among the first `hot` ones, each with its next
    /// generation.
    pub fn dirty(&mut self, hot: usize, count: usize) {
        let hot = hot.clamp(1, self.pages().max(1));
        for _ in 0..count {
            let p = (self.next_random() % hot as u64) as usize;
            self.generations[p] = self.generations[p].wrapping_add(1);
            self.write_page(p);
        }
    }

    /// Number of pages whose content is not what their generation predicts.
    pub fn mismatched_pages(&self) -> u64 {
        let mut bad = 0;
        for (p, page) in self.words.chunks_exact(WORDS_PER_PAGE).enumerate() {
            let seed = page_seed(self.nonce, p, self.generations[p]);
            let ok = page
                .iter()
                .enumerate()
                .all(|(i, w)| *w == seed ^ (i as u64).wrapping_mul(GOLDEN));
            if !ok {
                bad += 1;
            }
        }
        bad
    }
}

/// Writes `name` in `dir` through a temporary file and a rename.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(name))
}

/// Reads a JSON state file; `Ok(None)` when it does not exist yet.
pub fn read_json<T: DeserializeOwned>(dir: &Path, name: &str) -> io::Result<Option<T>> {
    match std::fs::read(dir.join(name)) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn random_nonce() -> io::Result<u64> {
    let mut b = [0u8; 8];
    // SAFETY: getrandom(2) writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from_le_bytes(b))
}

/// Points stdin, stdout and stderr at the container's own `/dev/null`: the descriptors runc
/// handed over belong to the guest's mount namespace, which CRIU cannot restore inside the
/// container's.
fn detach_stdio() -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors; `null` stays open until then.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs forever: fills the buffer, then dirties, reports progress and answers verification
/// requests. Returns only on an I/O error.
pub fn run(spec: &WorkloadSpec, state: &Path) -> io::Result<()> {
    detach_stdio()?;
    let nonce = random_nonce()?;
    let pages = usize::try_from(spec.pages).map_err(|e| io::Error::other(e.to_string()))?;
    let hot = usize::try_from(spec.hot_pages).map_err(|e| io::Error::other(e.to_string()))?;
    let per_tick =
        usize::try_from(spec.dirty_per_tick).map_err(|e| io::Error::other(e.to_string()))?;
    let mut mem = Memory::new(pages, nonce, spec.huge_pages);
    let mut ticks: u64 = 0;
    let mut answered: u64 = 0;
    let tick = Duration::from_millis(spec.tick_ms);
    loop {
        mem.dirty(hot, per_tick);
        ticks += 1;
        if ticks % PROGRESS_EVERY == 1 {
            let p = Progress {
                nonce,
                ticks,
                page_writes: mem.page_writes(),
            };
            write_atomic(state, PROGRESS, &serde_json::to_vec(&p)?)?;
        }
        if let Ok(text) = std::fs::read_to_string(state.join(REQUEST)) {
            if let Ok(id) = text.trim().parse::<u64>() {
                if id > answered {
                    let started = Instant::now();
                    let mismatched_pages = mem.mismatched_pages();
                    let v = Verification {
                        id,
                        nonce,
                        ticks,
                        pages: mem.pages() as u64,
                        mismatched_pages,
                        ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    };
                    write_atomic(state, &result_name(id), &serde_json::to_vec(&v)?)?;
                    answered = id;
                }
            }
        }
        std::thread::sleep(tick);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_buffer_verifies() {
        let m = Memory::new(64, 7, false);
        assert_eq!(m.mismatched_pages(), 0);
        assert_eq!(m.page_writes(), 64);
    }

    #[test]
    fn dirtying_keeps_the_buffer_consistent_and_stays_in_the_hot_set() {
        let mut m = Memory::new(64, 7, false);
        m.dirty(8, 1000);
        assert_eq!(m.mismatched_pages(), 0);
        assert_eq!(m.page_writes(), 1064);
        assert!(m.generations[8..].iter().all(|&g| g == 0));
        assert!(m.generations[..8].iter().all(|&g| g > 0));
    }

    #[test]
    fn a_stale_page_is_detected() {
        let mut m = Memory::new(16, 7, true);
        let old: Vec<u64> = m.words[..WORDS_PER_PAGE].to_vec();
        m.dirty(1, 1);
        assert_eq!(m.mismatched_pages(), 0);
        m.words[..WORDS_PER_PAGE].copy_from_slice(&old);
        assert_eq!(m.mismatched_pages(), 1);
    }

    #[test]
    fn a_single_flipped_bit_or_a_zeroed_page_is_detected() {
        let mut m = Memory::new(16, 7, true);
        m.words[5 * WORDS_PER_PAGE + 511] ^= 1 << 40;
        assert_eq!(m.mismatched_pages(), 1);
        m.words[9 * WORDS_PER_PAGE..10 * WORDS_PER_PAGE].fill(0);
        assert_eq!(m.mismatched_pages(), 2);
    }

    #[test]
    fn a_lost_generation_table_is_detected() {
        let mut m = Memory::new(16, 7, true);
        m.dirty(4, 20);
        m.generations.fill(0);
        assert!(m.mismatched_pages() > 0);
    }

    #[test]
    fn another_nonce_gives_other_content() {
        let a = Memory::new(4, 1, true);
        let b = Memory::new(4, 2, true);
        assert!(a.words.iter().zip(&b.words).all(|(x, y)| x != y));
    }

    #[test]
    fn state_files_round_trip_and_a_missing_one_is_none() {
        let d = std::env::temp_dir().join(format!("ferry-precopy-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        assert_eq!(read_json::<Progress>(&d, PROGRESS).unwrap(), None);
        let p = Progress {
            nonce: 1,
            ticks: 2,
            page_writes: 3,
        };
        write_atomic(&d, PROGRESS, &serde_json::to_vec(&p).unwrap()).unwrap();
        assert_eq!(read_json::<Progress>(&d, PROGRESS).unwrap(), Some(p));
        std::fs::write(d.join("bad"), b"{").unwrap();
        assert!(read_json::<Progress>(&d, "bad").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
