//! The one error type of this crate.
//!
//! Every variant names the step that failed and the path (or stream entry) it failed on, so a
//! migration log line is enough to know what to look at on which host.

use std::io;

use crate::path::PathError;

/// Why a stream, a tree walk or an apply failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A system call failed on a path.
    #[error("{step} {path}: {source}")]
    Io {
        /// The operation, e.g. `"open"`, `"mknodat"`, `"read stream"`.
        step: &'static str,
        /// The path it was applied to, relative to the tree root where possible.
        path: String,
        #[source]
        source: io::Error,
    },
    /// The stream ended before its final record.
    #[error("stream truncated at byte {offset} while reading {reading}")]
    Truncated {
        /// Stream offset at which the bytes ran out.
        offset: u64,
        /// What the decoder was reading.
        reading: &'static str,
    },
    /// The stream violates the format: bad header, oversized length, unknown tag, records out
    /// of order, inconsistent counts.
    #[error("malformed stream at byte {offset}: {what}")]
    Malformed {
        /// Stream offset of the record that is wrong.
        offset: u64,
        /// What is wrong with it.
        what: String,
    },
    /// A digest in the stream does not match the bytes received.
    #[error("checksum mismatch for {what}")]
    Checksum {
        /// The file whose content trailer failed, or `"whole stream"`.
        what: String,
    },
    /// A path in the stream (or given by a caller) is not a clean relative path.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The offending path, lossily decoded.
        path: String,
        /// Which rule it breaks.
        reason: PathError,
    },
    /// A well-formed entry that applying would make unsafe or inconsistent: it would escape the
    /// destination, pass through a symlink, link to something not streamed before, and so on.
    #[error("refused entry {entry}: {reason}")]
    Refused {
        /// The entry's path, lossily decoded.
        entry: String,
        /// Why it was refused.
        reason: String,
    },
    /// The source tree holds something this crate cannot carry faithfully.
    #[error("unsupported {what} at {path}")]
    Unsupported {
        /// The path in the source tree.
        path: String,
        /// What is unsupported.
        what: &'static str,
    },
    /// A fresh apply was asked for but the destination already has content.
    #[error("destination {path} exists and is not an empty directory")]
    DestNotEmpty {
        /// The destination directory.
        path: String,
    },
    /// Applying failed and so did undoing the part already committed; the destination may be
    /// inconsistent and `undo_dir` may still hold moved-aside originals.
    #[error("{cause}; rolling back also failed: {rollback} (originals kept under {undo_dir})")]
    RollbackFailed {
        /// The failure that triggered the rollback.
        cause: Box<FsError>,
        /// The failure of the rollback itself.
        rollback: Box<FsError>,
        /// Where moved-aside originals remain.
        undo_dir: String,
    },
}

/// Crate-wide result alias.
pub type Result<T, E = FsError> = std::result::Result<T, E>;

pub(crate) fn io_err(
    step: &'static str,
    path: impl std::fmt::Display,
    source: io::Error,
) -> FsError {
    FsError::Io {
        step,
        path: path.to_string(),
        source,
    }
}

pub(crate) fn refused(entry: impl std::fmt::Display, reason: impl Into<String>) -> FsError {
    FsError::Refused {
        entry: entry.to_string(),
        reason: reason.into(),
    }
}
