//! The entries a stream carries.

use crate::path::RelPath;

/// How a tree is to be read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TreeMode {
    /// A plain directory, such as a local-driver volume's `_data`: every inode is what it says.
    Plain,
    /// An overlayfs upper dir (Docker's overlay2 `diff`): a char device 0/0 is a whiteout and a
    /// directory with `trusted.overlay.opaque=y` hides the lower layers' content.
    OverlayUpper,
}

impl TreeMode {
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            TreeMode::Plain => 0,
            TreeMode::OverlayUpper => 1,
        }
    }

    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(TreeMode::Plain),
            1 => Some(TreeMode::OverlayUpper),
            _ => None,
        }
    }
}

/// A point in time as the kernel stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub sec: i64,
    /// Nanoseconds, below 1e9.
    pub nsec: u32,
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:09}", self.sec, self.nsec)
    }
}

/// Inode metadata carried with every entry that has an inode of its own.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`0o7777`); never the file type.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Access time, restored so tools that look at it (tmpwatch, mail) behave the same.
    pub atime: Timestamp,
    /// Modification time.
    pub mtime: Timestamp,
    /// Extended attributes kept by the tree mode, sorted by name: `user.*` and
    /// `security.capability`, plus `trusted.overlay.redirect`/`whiteout` and non-`y` opaque
    /// values for an overlay upper dir. Others (ACLs, SELinux labels, overlay's host-specific
    /// `origin`/`impure`/`nlink`) are skipped: they are either host-bound or not used by the
    /// containers ferry moves.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One data range of a file: `(offset, length)`. Everything between extents is a hole.
pub type Extent = (u64, u64);

/// One streamed entry, in the order the applier must create them: a directory before its
/// contents, a hard link after the entry it links to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The tree root's own metadata; when present it is the first entry.
    Root {
        /// Root metadata.
        meta: Meta,
    },
    /// A directory.
    Dir {
        /// Where.
        path: RelPath,
        /// Its metadata.
        meta: Meta,
    },
    /// A regular file; its data follows as chunks covering `extents` in order, then its
    /// content digest.
    File {
        /// Where.
        path: RelPath,
        /// Its metadata.
        meta: Meta,
        /// Logical size; the tail after the last extent is a hole.
        size: u64,
        /// Data ranges, sorted and disjoint. A dense file has one `(0, size)`.
        extents: Vec<Extent>,
    },
    /// A symbolic link. The target is never followed by this crate.
    Symlink {
        /// Where.
        path: RelPath,
        /// Its metadata (mode is ignored by Linux).
        meta: Meta,
        /// Raw target bytes.
        target: Vec<u8>,
    },
    /// Another name for an entry that appeared earlier in the same stream.
    Hardlink {
        /// The new name.
        path: RelPath,
        /// The earlier entry.
        target: RelPath,
    },
    /// Overlay whiteout: the path is deleted in this layer.
    Whiteout {
        /// Where.
        path: RelPath,
    },
    /// The directory just streamed at this path is opaque: lower layers' content under it is
    /// hidden.
    Opaque {
        /// The directory.
        path: RelPath,
    },
    /// A named pipe.
    Fifo {
        /// Where.
        path: RelPath,
        /// Its metadata.
        meta: Meta,
    },
    /// A character device.
    CharDev {
        /// Where.
        path: RelPath,
        /// Its metadata.
        meta: Meta,
        /// Device major.
        major: u32,
        /// Device minor.
        minor: u32,
    },
    /// A block device.
    BlockDev {
        /// Where.
        path: RelPath,
        /// Its metadata.
        meta: Meta,
        /// Device major.
        major: u32,
        /// Device minor.
        minor: u32,
    },
    /// The path no longer exists in the source: remove it (and everything under it) from the
    /// destination. Only incremental streams carry these; unlike [`Entry::Whiteout`] it leaves
    /// no marker, so a lower layer's file shows through again where there is one.
    Remove {
        /// Where.
        path: RelPath,
    },
}

impl Entry {
    /// The entry's path; the root for [`Entry::Root`].
    pub fn path(&self) -> &RelPath {
        static ROOT: RelPath = RelPath::root_const();
        match self {
            Entry::Root { .. } => &ROOT,
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::Hardlink { path, .. }
            | Entry::Whiteout { path }
            | Entry::Opaque { path }
            | Entry::Fifo { path, .. }
            | Entry::CharDev { path, .. }
            | Entry::BlockDev { path, .. }
            | Entry::Remove { path } => path,
        }
    }

    /// The entry's metadata, for the variants that carry an inode of their own.
    pub fn meta(&self) -> Option<&Meta> {
        match self {
            Entry::Root { meta }
            | Entry::Dir { meta, .. }
            | Entry::File { meta, .. }
            | Entry::Symlink { meta, .. }
            | Entry::Fifo { meta, .. }
            | Entry::CharDev { meta, .. }
            | Entry::BlockDev { meta, .. } => Some(meta),
            _ => None,
        }
    }
}
