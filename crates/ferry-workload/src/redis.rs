//! Redis clients: a continuity-checking INCR client, a bulk loader and an order-independent digest.

use std::io::{self, BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use crate::client::{connect, connect_for, describe, finish, ms_since, run_loop, ClientOpts};
use crate::resp::{encode, read_value, Value};
use crate::summary::{json_str, Summary};

const BATCH: u64 = 1000;
pub const COUNTER_KEY: &str = "ferry:counter";

pub fn client(opts: ClientOpts) -> i32 {
    let mut summary = Summary::new();
    summary.sets = Some(0);
    let stream = match connect_for(&opts) {
        Ok(s) => s,
        Err(e) => {
            summary.error(format!("connect {}: {}", opts.addr, describe(&e)));
            summary.stopped_by = "error".to_string();
            return finish(&opts, &summary);
        }
    };
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            summary.error(format!("clone socket: {e}"));
            summary.stopped_by = "error".to_string();
            return finish(&opts, &summary);
        }
    };
    let mut reader = BufReader::new(stream);
    let mut i: u64 = 0;
    let mut buf = Vec::new();
    run_loop(&opts, &mut summary, |summary, started| {
        buf.clear();
        let idx = i.to_string();
        let key = format!("live:{idx}");
        encode(&mut buf, &[b"INCR", COUNTER_KEY.as_bytes()]);
        encode(&mut buf, &[b"SET", key.as_bytes(), idx.as_bytes()]);
        i += 1;
        writer
            .write_all(&buf)
            .map_err(|e| format!("at {:.1} ms: send: {}", ms_since(started), describe(&e)))?;
        let incr = read_value(&mut reader)
            .map_err(|e| format!("at {:.1} ms: receive: {}", ms_since(started), describe(&e)))?;
        let t = ms_since(started);
        let set = read_value(&mut reader)
            .map_err(|e| format!("at {:.1} ms: receive: {}", ms_since(started), describe(&e)))?;
        match incr {
            Value::Int(n) => summary.counter(n, t),
            other => summary.error(format!("at {t:.1} ms: INCR answered {other:?}")),
        }
        match set {
            Value::Simple(ref s) if s == "OK" => {
                if let Some(sets) = summary.sets.as_mut() {
                    *sets += 1;
                }
            }
            other => summary.error(format!("at {t:.1} ms: SET answered {other:?}")),
        }
        Ok(())
    });
    finish(&opts, &summary)
}

/// splitmix64: tiny, seedable and good enough to make values incompressible-ish and reproducible.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The value stored under `key:<i>`, derived from the seed and index alone so any party can
/// recompute it without talking to Redis.
pub fn value_for(seed: u64, i: u64, size: usize) -> Vec<u8> {
    let mut state = seed ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        let mut r = splitmix64(&mut state);
        for _ in 0..8 {
            if out.len() == size {
                break;
            }
            out.push(ALPHABET[(r & 63) as usize]);
            r >>= 8;
        }
    }
    out
}

pub fn key_for(i: u64) -> String {
    format!("key:{i}")
}

fn expect_ok(v: Value, what: &str) -> io::Result<()> {
    match v {
        Value::Simple(s) if s == "OK" => Ok(()),
        other => Err(io::Error::other(format!(
            "{what}: unexpected reply {other:?}"
        ))),
    }
}

fn open(addr: SocketAddr) -> io::Result<(BufWriter<TcpStream>, BufReader<TcpStream>)> {
    let s = connect(addr)?;
    let w = BufWriter::with_capacity(1 << 20, s.try_clone()?);
    Ok((w, BufReader::with_capacity(1 << 20, s)))
}

pub fn load(addr: SocketAddr, keys: u64, value_size: usize, seed: u64) -> io::Result<String> {
    let started = Instant::now();
    let (mut w, mut r) = open(addr)?;
    let mut buf = Vec::new();
    let mut start = 0;
    while start < keys {
        let end = (start + BATCH).min(keys);
        buf.clear();
        for i in start..end {
            encode(
                &mut buf,
                &[
                    b"SET",
                    key_for(i).as_bytes(),
                    &value_for(seed, i, value_size),
                ],
            );
        }
        w.write_all(&buf)?;
        w.flush()?;
        for i in start..end {
            expect_ok(read_value(&mut r)?, &format!("SET {}", key_for(i)))?;
        }
        start = end;
    }
    Ok(format!(
        "{{\"keys\":{keys},\"value_size\":{value_size},\"seed\":{seed},\"elapsed_ms\":{}}}",
        crate::summary::num(started.elapsed().as_secs_f64() * 1000.0)
    ))
}

/// FNV-1a 64: trivially reimplemented by a test in any language.
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Fnv {
    pub fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn entry(&mut self, key: &[u8], value: &[u8]) {
        self.update(key);
        self.update(&[0]);
        self.update(value);
        self.update(&[0]);
    }
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

fn digest_json(keys: u64, skipped: u64, fnv: &Fnv, started: Instant) -> String {
    format!(
        "{{\"keys\":{keys},\"digest\":{},\"skipped_non_string\":{skipped},\"elapsed_ms\":{}}}",
        json_str(&fnv.hex()),
        crate::summary::num(started.elapsed().as_secs_f64() * 1000.0)
    )
}

/// Digest over all string keys (optionally matching a SCAN pattern), sorted so the result does
/// not depend on hash-table order, which differs between a Redis and its restored copy.
pub fn digest(addr: SocketAddr, pattern: Option<&str>) -> io::Result<String> {
    let started = Instant::now();
    let (mut w, mut r) = open(addr)?;
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut cursor = b"0".to_vec();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let mut args: Vec<&[u8]> = vec![b"SCAN", &cursor, b"COUNT", b"1000"];
        if let Some(p) = pattern {
            args.push(b"MATCH");
            args.push(p.as_bytes());
        }
        encode(&mut buf, &args);
        w.write_all(&buf)?;
        w.flush()?;
        let reply = read_value(&mut r)?;
        let Value::Array(Some(mut parts)) = reply else {
            return Err(io::Error::other(format!(
                "SCAN: unexpected reply {reply:?}"
            )));
        };
        if parts.len() != 2 {
            return Err(io::Error::other("SCAN: reply is not [cursor, keys]"));
        }
        let batch = parts.pop();
        let next = parts.pop();
        match (next, batch) {
            (Some(Value::Bulk(Some(c))), Some(Value::Array(Some(items)))) => {
                for item in items {
                    if let Value::Bulk(Some(k)) = item {
                        keys.push(k);
                    }
                }
                cursor = c;
            }
            other => {
                return Err(io::Error::other(format!(
                    "SCAN: unexpected parts {other:?}"
                )))
            }
        }
        if cursor == b"0" {
            break;
        }
    }
    keys.sort_unstable();
    keys.dedup();
    let mut fnv = Fnv::new();
    let mut counted = 0u64;
    let mut skipped = 0u64;
    for chunk in keys.chunks(BATCH as usize) {
        buf.clear();
        for k in chunk {
            encode(&mut buf, &[b"GET", k]);
        }
        w.write_all(&buf)?;
        w.flush()?;
        for k in chunk {
            match read_value(&mut r)? {
                Value::Bulk(Some(v)) => {
                    fnv.entry(k, &v);
                    counted += 1;
                }
                // Deleted between SCAN and GET, or not a string: neither is part of the data set.
                Value::Bulk(None) | Value::Error(_) => skipped += 1,
                other => return Err(io::Error::other(format!("GET: unexpected reply {other:?}"))),
            }
        }
    }
    Ok(digest_json(counted, skipped, &fnv, started))
}

/// The digest `digest --match 'key:*'` must report right after `load` with the same arguments.
pub fn expected_digest(keys: u64, value_size: usize, seed: u64) -> String {
    let started = Instant::now();
    let mut names: Vec<(String, u64)> = (0..keys).map(|i| (key_for(i), i)).collect();
    names.sort_unstable();
    let mut fnv = Fnv::new();
    for (k, i) in &names {
        fnv.entry(k.as_bytes(), &value_for(seed, *i, value_size));
    }
    digest_json(keys, 0, &fnv, started)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_deterministic_and_sized() {
        assert_eq!(value_for(1, 5, 100), value_for(1, 5, 100));
        assert_ne!(value_for(1, 5, 100), value_for(1, 6, 100));
        assert_ne!(value_for(1, 5, 100), value_for(2, 5, 100));
        assert_eq!(value_for(1, 5, 13).len(), 13);
        assert_eq!(value_for(1, 5, 0).len(), 0);
        assert_eq!(&value_for(1, 5, 100)[..13], &value_for(1, 5, 13)[..]);
    }

    #[test]
    fn fnv_matches_reference_vectors() {
        let mut f = Fnv::new();
        assert_eq!(f.hex(), "cbf29ce484222325");
        f.update(b"a");
        assert_eq!(f.hex(), "af63dc4c8601ec8c");
        let mut f = Fnv::new();
        f.update(b"foobar");
        assert_eq!(f.hex(), "85944171f73967e8");
    }

    #[test]
    fn expected_digest_is_sorted_by_key_text() {
        let j = expected_digest(12, 4, 1);
        let mut f = Fnv::new();
        for i in [0u64, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9] {
            f.entry(key_for(i).as_bytes(), &value_for(1, i, 4));
        }
        assert!(j.contains(&format!("\"digest\":\"{}\"", f.hex())), "{j}");
        assert!(j.starts_with("{\"keys\":12,"));
    }
}
