//! The page server's request and answer header, as CRIU 4.x lays out `struct page_server_iov`
//! on x86-64 (`criu/page-xfer.c`): a `u32` command, four bytes of padding, then `nr_pages`,
//! `vaddr` and `dst_id` as `u64`, all little-endian.

pub const PAGE_SIZE: u64 = 4096;

/// Size of the header on the wire.
pub const IOV_LEN: usize = 32;

/// An answer carrying pages: `PS_IOV_ADD_F` with the flags in the upper 16 bits.
pub const PS_IOV_ADD_F: u32 = 6;
pub const PS_IOV_GET: u32 = 7;
pub const PS_IOV_CLOSE: u32 = 0x1023;
pub const PS_IOV_FORCE_CLOSE: u32 = 0x1024;

const PS_CMD_BITS: u32 = 16;
const PS_CMD_MASK: u32 = (1 << PS_CMD_BITS) - 1;

/// `PE_PRESENT` of `criu/include/pagemap.h`, the flag the page server puts on an answer.
pub const PE_PRESENT: u32 = 1 << 2;

/// The size of CRIU's close answer, an `int32` status.
pub const CLOSE_ANSWER_LEN: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PsIov {
    pub cmd: u32,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: u64,
}

impl PsIov {
    /// The request for `nr_pages` pages at `vaddr` of the process `dst_id` names.
    pub fn get(dst_id: u64, vaddr: u64, nr_pages: u64) -> Self {
        PsIov {
            cmd: PS_IOV_GET,
            nr_pages,
            vaddr,
            dst_id,
        }
    }

    /// The header of an answer carrying `nr_pages` pages, as the page server sends it.
    pub fn pages(dst_id: u64, vaddr: u64, nr_pages: u64) -> Self {
        PsIov {
            cmd: (PE_PRESENT << PS_CMD_BITS) | PS_IOV_ADD_F,
            nr_pages,
            vaddr,
            dst_id,
        }
    }

    /// The command without its flags.
    pub fn command(&self) -> u32 {
        self.cmd & PS_CMD_MASK
    }

    pub fn encode(&self) -> [u8; IOV_LEN] {
        let mut b = [0u8; IOV_LEN];
        b[0..4].copy_from_slice(&self.cmd.to_le_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; IOV_LEN]) -> Self {
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let mut c = [0u8; 4];
        c.copy_from_slice(&b[0..4]);
        PsIov {
            cmd: u32::from_le_bytes(c),
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        }
    }

    /// Bytes of page data that follow this header when it is an answer.
    pub fn data_len(&self) -> Option<usize> {
        self.nr_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|n| usize::try_from(n).ok())
    }
}

/// The id the lazy-pages daemon names a process by in its `PS_IOV_GET` requests: the plain
/// virtual pid (`pr->img_id`), which the page server looks up with `pstree_item_by_virt`, not
/// the type-tagged id a dump's `PS_IOV_ADD` carries. The proxy still only reads ahead for an
/// id once the daemon itself has used it.
pub fn lazy_dst(pid: u32) -> u64 {
    u64::from(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_get_request_is_laid_out_as_criu_sends_it() {
        let b = PsIov::get(lazy_dst(1), 0x7f00_0000_1000, 16).encode();
        assert_eq!(&b[0..4], &7u32.to_le_bytes());
        assert_eq!(&b[4..8], &[0, 0, 0, 0]);
        assert_eq!(&b[8..16], &16u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x7f00_0000_1000u64.to_le_bytes());
        assert_eq!(&b[24..32], &1u64.to_le_bytes());
    }

    #[test]
    fn an_answer_carries_add_f_with_present() {
        let a = PsIov::pages(lazy_dst(7), 0x1000, 2);
        assert_eq!(a.command(), PS_IOV_ADD_F);
        assert_eq!(a.cmd >> 16, PE_PRESENT);
        assert_eq!(a.data_len(), Some(8192));
    }

    proptest! {
        #[test]
        fn headers_round_trip(cmd: u32, nr: u64, vaddr: u64, dst: u64) {
            let h = PsIov { cmd, nr_pages: nr, vaddr, dst_id: dst };
            prop_assert_eq!(PsIov::decode(&h.encode()), h);
        }
    }
}
