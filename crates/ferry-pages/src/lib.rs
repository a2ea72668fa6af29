//! Post-copy page read-ahead on the target.
//!
//! CRIU's lazy-pages daemon fetches the pages no fault has asked for yet one request at a
//! time, and shrinks each request back to 64 KiB whenever the restored process faults
//! (`update_xfer_len` in `criu/uffd.c`). Across a link with a round trip of a millisecond and a
//! process that faults every few, that caps the background transfer far below the link. The
//! target agent knows from the checkpoint's pagemap images exactly which pages are still at the
//! source, so it fetches them itself, many requests in flight, into a bounded window, and
//! answers the daemon's requests from there at local speed; what it has not fetched yet it
//! forwards, as a plain tunnel would.
//!
//! - [`ps`]: the page-server wire header (`struct page_server_iov`) and its commands.
//! - [`pagemap`]: the lazy ranges of each process, read from `pagemap-<pid>.img`.
//! - [`ranges`]: page-aligned range sets.
//! - [`readahead`]: the proxy between the daemon and the source's page server.
//! - [`reader`]: the source agent's own reader of the seized tasks' lazy pages, a second
//!   channel for the read-ahead.

pub mod pagemap;
pub mod ps;
pub mod ranges;
pub mod readahead;
pub mod reader;

pub use pagemap::{lazy_pages, LazyPages, PagemapError};
pub use ps::{lazy_dst, PsIov, PAGE_SIZE};
pub use ranges::RangeSet;
pub use readahead::{
    read_ahead, read_ahead_counted, read_ahead_split, ReadAheadError, ReadAheadOptions,
    ReadAheadStats,
};
pub use reader::{namespace_pids, serve_reads, ReaderError, ReaderStats, SeizedTasks, TaskMemory};
