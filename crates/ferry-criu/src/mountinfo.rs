//! Reading `/proc/<pid>/mountinfo`.

use std::path::PathBuf;

/// Decodes the octal escapes (`\040` for a space) the kernel writes in mountinfo's path fields.
/// The path stays bytes: a mount point need not be UTF-8.
pub fn unescape_path(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u16::from(b[i + 1] - b'0') * 64
                + u16::from(b[i + 2] - b'0') * 8
                + u16::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_decoded_and_the_rest_kept() {
        let table = [
            ("/run/b\\040x/netns", "/run/b x/netns"),
            ("/a\\011b\\134c", "/a\tb\\c"),
            ("/plain", "/plain"),
            ("/trailing\\04", "/trailing\\04"),
            ("/not\\9octal", "/not\\9octal"),
        ];
        for (field, want) in table {
            assert_eq!(unescape_path(field), PathBuf::from(want), "{field}");
        }
    }
}
