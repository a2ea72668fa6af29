//! Minimal RESP2 encoder and parser, enough for INCR/SET/GET/SCAN with pipelining.

use std::io::{self, BufRead};

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Value>>),
}

/// Appends one command as an array of bulk strings, the only request form Redis must accept.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Upper bound on bulk and array sizes so a corrupt stream cannot make us allocate gigabytes.
const MAX_LEN: i64 = 512 * 1024 * 1024;

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_line<R: BufRead>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let n = r.read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    if !line.ends_with(b"\r\n") {
        return Err(bad("reply line not terminated by CRLF"));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn parse_int(b: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad integer {:?}", String::from_utf8_lossy(b))))
}

/// Reads exactly one reply; nested arrays are read recursively.
pub fn read_value<R: BufRead>(r: &mut R) -> io::Result<Value> {
    let line = read_line(r)?;
    let (&tag, rest) = line.split_first().ok_or_else(|| bad("empty reply line"))?;
    match tag {
        b'+' => Ok(Value::Simple(String::from_utf8_lossy(rest).into_owned())),
        b'-' => Ok(Value::Error(String::from_utf8_lossy(rest).into_owned())),
        b':' => Ok(Value::Int(parse_int(rest)?)),
        b'$' => {
            let len = parse_int(rest)?;
            if len < 0 {
                return Ok(Value::Bulk(None));
            }
            if len > MAX_LEN {
                return Err(bad(format!("bulk length {len} too large")));
            }
            let mut buf = vec![0u8; len as usize + 2];
            r.read_exact(&mut buf)?;
            if !buf.ends_with(b"\r\n") {
                return Err(bad("bulk string not terminated by CRLF"));
            }
            buf.truncate(len as usize);
            Ok(Value::Bulk(Some(buf)))
        }
        b'*' => {
            let len = parse_int(rest)?;
            if len < 0 {
                return Ok(Value::Array(None));
            }
            if len > MAX_LEN {
                return Err(bad(format!("array length {len} too large")));
            }
            let mut items = Vec::with_capacity(len.min(4096) as usize);
            for _ in 0..len {
                items.push(read_value(r)?);
            }
            Ok(Value::Array(Some(items)))
        }
        other => Err(bad(format!("unknown reply type byte {other:#04x}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn encodes_bulk_array() {
        let mut out = Vec::new();
        encode(&mut out, &[b"SET", b"k", b""]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
    }

    #[test]
    fn parses_every_type() {
        let data = b"+OK\r\n-ERR x y\r\n:-42\r\n$3\r\na\r\n\r\n$-1\r\n*2\r\n$1\r\n0\r\n*1\r\n$2\r\nk1\r\n*-1\r\n";
        let mut r = Cursor::new(&data[..]);
        assert_eq!(read_value(&mut r).unwrap(), Value::Simple("OK".into()));
        assert_eq!(read_value(&mut r).unwrap(), Value::Error("ERR x y".into()));
        assert_eq!(read_value(&mut r).unwrap(), Value::Int(-42));
        assert_eq!(
            read_value(&mut r).unwrap(),
            Value::Bulk(Some(b"a\r\n".to_vec()))
        );
        assert_eq!(read_value(&mut r).unwrap(), Value::Bulk(None));
        assert_eq!(
            read_value(&mut r).unwrap(),
            Value::Array(Some(vec![
                Value::Bulk(Some(b"0".to_vec())),
                Value::Array(Some(vec![Value::Bulk(Some(b"k1".to_vec()))])),
            ]))
        );
        assert_eq!(read_value(&mut r).unwrap(), Value::Array(None));
        assert_eq!(
            read_value(&mut r).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn roundtrip_through_encoder() {
        let mut out = Vec::new();
        encode(&mut out, &[b"GET", b"bin\0\r\nary"]);
        let mut r = Cursor::new(&out[..]);
        let v = read_value(&mut r).unwrap();
        assert_eq!(
            v,
            Value::Array(Some(vec![
                Value::Bulk(Some(b"GET".to_vec())),
                Value::Bulk(Some(b"bin\0\r\nary".to_vec())),
            ]))
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            &b"?x\r\n"[..],
            b":abc\r\n",
            b"+OK\n",
            b"$5\r\nab\r\n",
            b"$3\r\nabcde",
        ] {
            assert!(read_value(&mut Cursor::new(bad)).is_err(), "{bad:?}");
        }
    }
}
