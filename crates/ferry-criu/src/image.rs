//! CRIU image files at the byte level: little-endian u32 magics and record lengths, and the
//! protobuf messages inside. Every image ferry reads (`stats-dump`, `pagemap-*`) goes through
//! this one decoder.

/// Why a CRIU image (or a record in it) could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("truncated at byte {at}")]
    Truncated { at: usize },
    #[error("varint at byte {at} is longer than 64 bits")]
    VarintOverflow { at: usize },
    #[error("bad magic {found:#010x}, expected {expected:#010x}")]
    BadMagic { found: u32, expected: u32 },
    #[error("field {field} has wire type {wire_type}, expected {expected}")]
    WireType {
        field: u64,
        wire_type: u8,
        expected: u8,
    },
    #[error("unsupported wire type {wire_type} (field {field})")]
    UnsupportedWireType { field: u64, wire_type: u8 },
    #[error("field {name} = {value} does not fit in 32 bits")]
    OutOfRange { name: &'static str, value: u64 },
    #[error("required field {0} is missing")]
    Missing(&'static str),
    #[error("{0} trailing bytes after the entry")]
    Trailing(usize),
}

/// Decodes a protobuf base-128 varint at `*pos`, advancing `*pos` past it.
pub fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, ImageError> {
    let start = *pos;
    let mut value: u64 = 0;
    for i in 0..10 {
        let byte = *buf.get(*pos).ok_or(ImageError::Truncated { at: *pos })?;
        *pos += 1;
        // The tenth byte carries bit 63 only.
        if i == 9 && byte > 1 {
            return Err(ImageError::VarintOverflow { at: start });
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(ImageError::VarintOverflow { at: start })
}

/// The next `len` bytes at `*pos`, advancing past them.
pub fn take<'a>(buf: &'a [u8], pos: &mut usize, len: usize) -> Result<&'a [u8], ImageError> {
    let end = pos
        .checked_add(len)
        .filter(|&e| e <= buf.len())
        .ok_or(ImageError::Truncated { at: buf.len() })?;
    let s = &buf[*pos..end];
    *pos = end;
    Ok(s)
}

/// A little-endian u32 at `*pos` (CRIU's image magics and record lengths).
pub fn read_u32_le(buf: &[u8], pos: &mut usize) -> Result<u32, ImageError> {
    let b = take(buf, pos, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// One protobuf field: its number and value (varint, or the bytes of a length-delimited one).
pub enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// Reads one field of a protobuf message at `*pos`: its number, wire type and value.
pub fn next_field<'a>(buf: &'a [u8], pos: &mut usize) -> Result<(u64, u8, Field<'a>), ImageError> {
    let key = read_varint(buf, pos)?;
    let number = key >> 3;
    let wire_type = (key & 7) as u8;
    let field = match wire_type {
        0 => Field::Varint(read_varint(buf, pos)?),
        1 => {
            take(buf, pos, 8)?;
            Field::Fixed
        }
        2 => {
            let len = read_varint(buf, pos)?;
            let len = usize::try_from(len).map_err(|_| ImageError::Truncated { at: *pos })?;
            Field::Bytes(take(buf, pos, len)?)
        }
        5 => {
            take(buf, pos, 4)?;
            Field::Fixed
        }
        _ => {
            return Err(ImageError::UnsupportedWireType {
                field: number,
                wire_type,
            })
        }
    };
    Ok((number, wire_type, field))
}

/// Appends `v` as a protobuf varint: how tests build the images this module reads.
pub fn write_varint(mut v: u64, out: &mut Vec<u8>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn varint_edges() {
        let mut p = 0;
        assert_eq!(read_varint(&[0x00], &mut p), Ok(0));
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        p = 0;
        assert_eq!(read_varint(&max, &mut p), Ok(u64::MAX));
        assert_eq!(p, 10);
        let over = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        p = 0;
        assert_eq!(
            read_varint(&over, &mut p),
            Err(ImageError::VarintOverflow { at: 0 })
        );
        let long = [0x80; 11];
        p = 0;
        assert!(read_varint(&long, &mut p).is_err());
        p = 0;
        assert_eq!(
            read_varint(&[0x80, 0x80], &mut p),
            Err(ImageError::Truncated { at: 2 })
        );
    }

    proptest! {
        #[test]
        fn varint_round_trips(values in proptest::collection::vec(any::<u64>(), 1..20)) {
            let mut buf = Vec::new();
            for v in &values {
                write_varint(*v, &mut buf);
            }
            let mut pos = 0;
            for v in &values {
                prop_assert_eq!(read_varint(&buf, &mut pos), Ok(*v));
            }
            prop_assert_eq!(pos, buf.len());
        }

        #[test]
        fn varint_never_reads_past_its_input(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            let mut pos = 0;
            match read_varint(&bytes, &mut pos) {
                Ok(_) => {
                    prop_assert!((1..=10).contains(&pos) && pos <= bytes.len());
                    prop_assert!(bytes[pos - 1] & 0x80 == 0);
                }
                Err(_) => prop_assert!(pos <= bytes.len()),
            }
        }
    }
}
