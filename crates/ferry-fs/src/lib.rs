//! Moving a container's file system state between hosts.
//!
//! Docker's checkpoint carries a container's memory only; what it owns on disk — the overlay2
//! writable layer (upper dir) and its local-driver volumes — must arrive on the target too.
//! This crate is the pure-data part of that: [`StreamWriter`] walks a directory into a stream
//! of [`Entry`]s in a self-verifying binary format (see [`wire`]), [`StreamReader`] decodes such
//! a stream and [`StreamReader::apply_into`] creates it under a destination without ever letting
//! a path escape it, and [`manifest()`] / [`Manifest::diff`] prove two trees identical.
//!
//! A migration streams the tree once while the container runs (`write_tree`, keeping the
//! summary's manifest), then, with the container frozen, streams only [`changed_since`] that
//! manifest (`write_paths`) and applies it with [`ApplyTarget::Update`].
//!
//! All I/O is synchronous std I/O; async callers run it in `spawn_blocking` and bridge bytes
//! through a pipe or channel.

pub mod apply;
pub mod entry;
pub mod error;
pub mod manifest;
pub mod path;
pub mod reader;
mod sys;
mod walk;
pub mod wire;
pub mod writer;

pub use apply::{clean_stale_staging, ApplyOptions, ApplySummary, ApplyTarget};
pub use entry::{Entry, Extent, Meta, Timestamp, TreeMode};
pub use error::{FsError, Result};
pub use manifest::{
    changed_since, manifest, DiffKind, Difference, LocalStat, Manifest, ManifestEntry,
};
pub use path::{PathError, RelPath};
pub use reader::{Record, StreamReader, Trailer};
pub use walk::Kind;
pub use wire::{ContentHasher, Counts};
pub use writer::{StreamWriter, WriteSummary};
