//! The validating decoder.
//!
//! [`StreamReader::next_record`] enforces the whole grammar of [`crate::wire`] — bounded lengths,
//! record order, extents filled exactly, content digests, END counts and the stream digest — so
//! whatever consumes records (the applier, a listing tool) only ever sees a stream prefix that
//! is well-formed so far, and learns of tampering at the latest at END.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

use crate::entry::{Entry, Extent, TreeMode};
use crate::error::{FsError, Result};
use crate::path::RelPath;
use crate::wire::{self, tag, ContentHasher, Counts, WireError};

/// One decoded record.
#[derive(Debug)]
pub enum Record<'a> {
    /// An entry. A [`Entry::File`] is followed by its data and a [`Record::FileEnd`].
    Entry(Entry),
    /// The next bytes of the current file, to be written at `offset`.
    Data {
        /// Offset within the file.
        offset: u64,
        /// The bytes.
        bytes: &'a [u8],
    },
    /// The current file is complete and its content digest matched.
    FileEnd {
        /// The verified content digest.
        digest: [u8; 32],
    },
    /// The stream is complete, its counts and digest matched; nothing more will be read.
    End(Trailer),
}

/// What the END record vouched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Record counts.
    pub counts: Counts,
    /// Total stream length in bytes, header and END included.
    pub stream_bytes: u64,
    /// SHA-256 of the stream before END.
    pub digest: [u8; 32],
}

enum State {
    Entries,
    File {
        path: RelPath,
        extents: Vec<Extent>,
        idx: usize,
        pos: u64,
        hasher: Box<ContentHasher>,
    },
    Done,
}

/// Reads a stream written by [`crate::StreamWriter`].
pub struct StreamReader<R: Read> {
    inner: R,
    mode: TreeMode,
    offset: u64,
    sha: Sha256,
    buf: Vec<u8>,
    state: State,
    counts: Counts,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header.
    pub fn new(inner: R) -> Result<Self> {
        let mut r = StreamReader {
            inner,
            mode: TreeMode::Plain,
            offset: 0,
            sha: Sha256::new(),
            buf: Vec::new(),
            state: State::Entries,
            counts: Counts::default(),
        };
        let mut h = [0u8; wire::HEADER_LEN];
        r.read_exact_hashed(&mut h, "header", true)?;
        if h[..8] != wire::MAGIC {
            return Err(r.malformed(0, "not a ferry-fs stream (bad magic)"));
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != wire::VERSION {
            return Err(r.malformed(8, format!("unsupported format version {version}")));
        }
        r.mode = TreeMode::from_byte(h[10])
            .ok_or_else(|| r.malformed(10, format!("unknown tree mode {}", h[10])))?;
        if h[11] != 0 || h[12..16] != [0, 0, 0, 0] {
            return Err(r.malformed(11, "reserved header bytes are not zero"));
        }
        Ok(r)
    }

    /// The mode the stream was written in.
    pub fn mode(&self) -> TreeMode {
        self.mode
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn malformed(&self, offset: u64, what: impl Into<String>) -> FsError {
        FsError::Malformed {
            offset,
            what: what.into(),
        }
    }

    fn read_exact_hashed(
        &mut self,
        buf: &mut [u8],
        reading: &'static str,
        hash: bool,
    ) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(FsError::Truncated {
                        offset: self.offset + got as u64,
                        reading,
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(FsError::Io {
                        step: "read stream",
                        path: format!("<stream at byte {}>", self.offset + got as u64),
                        source: e,
                    })
                }
            }
        }
        if hash {
            self.sha.update(&buf[..]);
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Decodes and validates the next record.
    pub fn next_record(&mut self) -> Result<Record<'_>> {
        if matches!(self.state, State::Done) {
            return Err(self.malformed(self.offset, "read past the END record"));
        }
        let at = self.offset;
        let mut head = [0u8; 5];
        let mut got = 0;
        while got < 5 {
            match self.inner.read(&mut head[got..]) {
                Ok(0) => {
                    return Err(FsError::Truncated {
                        offset: at + got as u64,
                        reading: "record header",
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(FsError::Io {
                        step: "read stream",
                        path: format!("<stream at byte {at}>"),
                        source: e,
                    })
                }
            }
        }
        self.offset += 5;
        let t = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if len > wire::MAX_RECORD_LEN {
            return Err(self.malformed(
                at,
                format!(
                    "record length {len} exceeds the bound {}",
                    wire::MAX_RECORD_LEN
                ),
            ));
        }
        let is_end = t == tag::END;
        if !is_end {
            self.sha.update(head);
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.resize(len as usize, 0);
        let read = self.read_exact_hashed(&mut buf, "record payload", !is_end);
        self.buf = buf;
        read?;

        match t {
            tag::DATA => self.on_data(at),
            tag::FILE_END => self.on_file_end(at),
            tag::END => self.on_end(at),
            _ => {
                if !matches!(self.state, State::Entries) {
                    return Err(self.malformed(at, "entry record inside a file's data"));
                }
                let entry = wire::decode_entry(t, &self.buf).map_err(|e| match e {
                    WireError::Malformed(what) => self.malformed(at, what),
                    WireError::Path { raw, reason } => FsError::InvalidPath {
                        path: String::from_utf8_lossy(&raw).into_owned(),
                        reason,
                    },
                })?;
                if matches!(entry, Entry::Whiteout { .. } | Entry::Opaque { .. })
                    && self.mode != TreeMode::OverlayUpper
                {
                    return Err(self.malformed(at, "overlay record in a plain stream"));
                }
                if matches!(entry, Entry::Root { .. }) && self.counts.entries != 0 {
                    return Err(self.malformed(at, "ROOT record after other entries"));
                }
                self.counts.entries += 1;
                if let Entry::File {
                    path,
                    size,
                    extents,
                    ..
                } = &entry
                {
                    self.counts.files += 1;
                    self.state = State::File {
                        path: path.clone(),
                        extents: extents.clone(),
                        idx: 0,
                        pos: extents.first().map_or(0, |e| e.0),
                        hasher: Box::new(ContentHasher::new(*size)),
                    };
                }
                Ok(Record::Entry(entry))
            }
        }
    }

    fn on_data(&mut self, at: u64) -> Result<Record<'_>> {
        let n = self.buf.len() as u64;
        let offset = match &mut self.state {
            State::File {
                extents,
                idx,
                pos,
                hasher,
                ..
            } => {
                let Some(&(start, len)) = extents.get(*idx) else {
                    return Err(FsError::Malformed {
                        offset: at,
                        what: "DATA beyond the file's extents".into(),
                    });
                };
                let end = start + len;
                if n == 0 || n > end - *pos {
                    return Err(FsError::Malformed {
                        offset: at,
                        what: format!("DATA of {n} bytes does not fit the extent ({start}, {len})"),
                    });
                }
                let offset = *pos;
                hasher.update(offset, &self.buf);
                *pos += n;
                if *pos == end {
                    *idx += 1;
                    if let Some(&(next, _)) = extents.get(*idx) {
                        *pos = next;
                    }
                }
                offset
            }
            _ => return Err(self.malformed(at, "DATA outside a file")),
        };
        self.counts.data_bytes += n;
        Ok(Record::Data {
            offset,
            bytes: &self.buf,
        })
    }

    fn on_file_end(&mut self, at: u64) -> Result<Record<'_>> {
        if self.buf.len() != 32 {
            return Err(self.malformed(at, "FILE_END payload is not 32 bytes"));
        }
        match std::mem::replace(&mut self.state, State::Entries) {
            State::File {
                path,
                extents,
                idx,
                hasher,
                ..
            } => {
                if idx != extents.len() {
                    return Err(self.malformed(at, format!("FILE_END before all data of {path}")));
                }
                let digest = hasher.finish();
                if digest[..] != self.buf[..] {
                    return Err(FsError::Checksum {
                        what: format!("content of {path}"),
                    });
                }
                Ok(Record::FileEnd { digest })
            }
            other => {
                self.state = other;
                Err(self.malformed(at, "FILE_END outside a file"))
            }
        }
    }

    fn on_end(&mut self, at: u64) -> Result<Record<'_>> {
        if !matches!(self.state, State::Entries) {
            return Err(self.malformed(at, "END inside a file"));
        }
        let (counts, digest) = wire::decode_end(&self.buf).map_err(|e| match e {
            WireError::Malformed(w) => self.malformed(at, w),
            WireError::Path { .. } => self.malformed(at, "bad END"),
        })?;
        let ours: [u8; 32] = std::mem::take(&mut self.sha).finalize().into();
        if ours != digest {
            return Err(FsError::Checksum {
                what: "whole stream".into(),
            });
        }
        if counts != self.counts {
            return Err(self.malformed(
                at,
                format!(
                    "END counts {:?} but the stream had {:?}",
                    counts, self.counts
                ),
            ));
        }
        self.state = State::Done;
        Ok(Record::End(Trailer {
            counts,
            stream_bytes: self.offset,
            digest,
        }))
    }

    /// Reads the rest of the stream, validating it and discarding the content.
    pub fn verify_to_end(&mut self) -> Result<Trailer> {
        loop {
            if let Record::End(t) = self.next_record()? {
                return Ok(t);
            }
        }
    }
}
