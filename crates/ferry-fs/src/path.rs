//! Validated relative paths.
//!
//! Container file names are arbitrary bytes (anything but `/` and NUL), so paths are kept as
//! bytes rather than `String`: a Latin-1 file name in an image must migrate, not abort the
//! migration. Validation lives in the only constructor, so an [`crate::Entry`] can never hold a
//! path that climbs out of the tree.

use std::cmp::Ordering;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Longest path accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest single component accepted, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// Which rule a candidate path breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The empty string names no entry (the tree root is [`RelPath::root`]).
    #[error("empty path")]
    Empty,
    /// Starts with `/`.
    #[error("absolute path")]
    Absolute,
    /// Has a `..` component.
    #[error("contains a '..' component")]
    DotDot,
    /// Has a `.` component.
    #[error("contains a '.' component")]
    Dot,
    /// Has `//` or a trailing `/`.
    #[error("contains an empty component")]
    EmptyComponent,
    /// Has a NUL byte, which no Linux path can hold.
    #[error("contains a NUL byte")]
    Nul,
    /// Longer than [`MAX_PATH_LEN`].
    #[error("longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    /// A component longer than [`MAX_NAME_LEN`].
    #[error("has a component longer than {MAX_NAME_LEN} bytes")]
    NameTooLong,
}

/// A `/`-separated path relative to a tree root, never absolute, never containing `..`, `.` or
/// empty components. The root itself is the distinguished empty [`RelPath::root`].
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct RelPath(Vec<u8>);

/// Checks `bytes` against every rule of [`RelPath`] without allocating.
pub fn validate(bytes: &[u8]) -> Result<(), PathError> {
    if bytes.is_empty() {
        return Err(PathError::Empty);
    }
    if bytes.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    if bytes.contains(&0) {
        return Err(PathError::Nul);
    }
    if bytes[0] == b'/' {
        return Err(PathError::Absolute);
    }
    for comp in bytes.split(|&b| b == b'/') {
        match comp {
            b"" => return Err(PathError::EmptyComponent),
            b"." => return Err(PathError::Dot),
            b".." => return Err(PathError::DotDot),
            c if c.len() > MAX_NAME_LEN => return Err(PathError::NameTooLong),
            _ => {}
        }
    }
    Ok(())
}

impl RelPath {
    /// Validates and wraps a non-root path.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let bytes = bytes.into();
        validate(&bytes)?;
        Ok(RelPath(bytes))
    }

    /// The tree root.
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    pub(crate) const fn root_const() -> Self {
        RelPath(Vec::new())
    }

    /// Whether this names the tree root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The raw bytes (empty for the root).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The components from the root down (none for the root).
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    /// The containing directory; `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        if self.is_root() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some(RelPath(self.0[..i].to_vec())),
            None => Some(RelPath::root()),
        }
    }

    /// The last component; `None` for the root.
    pub fn file_name(&self) -> Option<&[u8]> {
        if self.is_root() {
            return None;
        }
        self.0.rsplit(|&b| b == b'/').next()
    }

    /// This path extended by one component.
    pub fn join(&self, name: &[u8]) -> Result<RelPath, PathError> {
        let mut bytes = Vec::with_capacity(self.0.len() + 1 + name.len());
        bytes.extend_from_slice(&self.0);
        if !self.is_root() {
            bytes.push(b'/');
        }
        bytes.extend_from_slice(name);
        RelPath::new(bytes)
    }

    /// Whether `ancestor` is this path or one of its ancestors (component-wise; the root is
    /// everyone's ancestor).
    pub fn starts_with(&self, ancestor: &RelPath) -> bool {
        if ancestor.is_root() {
            return true;
        }
        self.0.starts_with(&ancestor.0)
            && (self.0.len() == ancestor.0.len() || self.0[ancestor.0.len()] == b'/')
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        self.components().count()
    }

    /// As a relative [`PathBuf`] (empty for the root), for joining onto a root.
    pub fn to_path_buf(&self) -> PathBuf {
        PathBuf::from(OsStr::from_bytes(&self.0))
    }
}

impl TryFrom<&str> for RelPath {
    type Error = PathError;
    fn try_from(s: &str) -> Result<Self, PathError> {
        RelPath::new(s.as_bytes())
    }
}

/// Orders component-wise, as a depth-first walk with sorted directories visits paths: a
/// directory comes right before its own contents (`a`, `a/b`, `a-b`), so a sorted list can be
/// streamed as is.
impl Ord for RelPath {
    fn cmp(&self, other: &Self) -> Ordering {
        let key = |b: &u8| if *b == b'/' { 0u8 } else { *b };
        self.0.iter().map(key).cmp(other.0.iter().map(key))
    }
}

impl PartialOrd for RelPath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str(".")
        } else {
            f.write_str(&String::from_utf8_lossy(&self.0))
        }
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_table() {
        let long_name = "x".repeat(256);
        let ok_name = "x".repeat(255);
        let too_long = "a/".repeat(2048) + "a";
        let cases: &[(&[u8], Result<(), PathError>)] = &[
            (b"a", Ok(())),
            (b"a/b/c", Ok(())),
            (b".hidden", Ok(())),
            (b"..hidden", Ok(())),
            (b"a/...", Ok(())),
            (b"a/b..", Ok(())),
            (b"\xff\xfe latin", Ok(())),
            (ok_name.as_bytes(), Ok(())),
            (b"", Err(PathError::Empty)),
            (b"/", Err(PathError::Absolute)),
            (b"/etc/x", Err(PathError::Absolute)),
            (b"..", Err(PathError::DotDot)),
            (b"../x", Err(PathError::DotDot)),
            (b"a/../../etc/shadow", Err(PathError::DotDot)),
            (b"a/..", Err(PathError::DotDot)),
            (b".", Err(PathError::Dot)),
            (b"./a", Err(PathError::Dot)),
            (b"a/./b", Err(PathError::Dot)),
            (b"a//b", Err(PathError::EmptyComponent)),
            (b"a/", Err(PathError::EmptyComponent)),
            (b"a\0b", Err(PathError::Nul)),
            (long_name.as_bytes(), Err(PathError::NameTooLong)),
            (too_long.as_bytes(), Err(PathError::TooLong)),
        ];
        for (input, want) in cases {
            assert_eq!(
                validate(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(RelPath::new(input.to_vec()).map(|_| ()), *want);
        }
    }

    #[test]
    fn parent_name_join() {
        let p = RelPath::try_from("a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().as_bytes(), b"a/b");
        assert_eq!(p.file_name().unwrap(), b"c");
        assert_eq!(p.depth(), 3);
        let top = RelPath::try_from("a").unwrap();
        assert!(top.parent().unwrap().is_root());
        assert!(RelPath::root().parent().is_none());
        assert_eq!(RelPath::root().join(b"x").unwrap().as_bytes(), b"x");
        assert_eq!(RelPath::root().join(b".."), Err(PathError::DotDot));
        assert_eq!(top.join(b"a/b"), Ok(RelPath::try_from("a/a/b").unwrap()));
        assert_eq!(top.join(b""), Err(PathError::EmptyComponent));
    }

    #[test]
    fn starts_with_is_component_wise() {
        let ab = RelPath::try_from("a/b").unwrap();
        assert!(ab.starts_with(&RelPath::try_from("a").unwrap()));
        assert!(ab.starts_with(&ab));
        assert!(ab.starts_with(&RelPath::root()));
        assert!(!RelPath::try_from("ab/c")
            .unwrap()
            .starts_with(&RelPath::try_from("a").unwrap()));
    }

    #[test]
    fn order_puts_directories_before_siblings_sharing_a_prefix() {
        let mut v: Vec<RelPath> = ["a-b", "a/b", "a", "a/b/c", "b", "a.b"]
            .iter()
            .map(|s| RelPath::try_from(*s).unwrap())
            .collect();
        v.push(RelPath::root());
        v.sort();
        let got: Vec<String> = v.iter().map(|p| p.to_string()).collect();
        assert_eq!(got, [".", "a", "a/b", "a/b/c", "a-b", "a.b", "b"]);
    }
}
