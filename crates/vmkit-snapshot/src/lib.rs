//! The state file of a vmkit snapshot: a small versioned container around a
//! [postcard](https://docs.rs/postcard)-encoded payload, checksummed and written atomically.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "VMKITSNP"
//!      8     4  format version (little endian), FORMAT_VERSION
//!     12     1  snapshot kind: 1 Full, 2 Diff
//!     13     3  reserved, zero
//!     16    32  vmkit version that wrote it (ASCII, NUL padded)
//!     48     8  payload length n (little endian)
//!     56     n  payload (postcard)
//!   56+n     8  CRC-64/XZ of bytes 0..56+n (little endian)
//! ```
//!
//! A state file is hostile input: [`decode_state`] checks the size (at most
//! [`MAX_STATE_SIZE`], exactly header + payload + checksum), the magic, the version, the
//! checksum, the header's fields, and decodes the payload with postcard, whose sequence
//! lengths only allocate as the bytes they describe arrive; every failure is one line
//! naming what is wrong (for a payload that does not decode, the path to the failing value
//! through serde_path_to_error: postcard encodes structs as tuples, so the path counts
//! positions, `[1][0]` being the first element of the second field). The container knows nothing of what it carries: the payload type
//! is the caller's (the VMM's whole-VM state).
//!
//! ```
//! use vmkit_snapshot::{decode_state, encode_state, SnapshotKind};
//!
//! #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
//! struct Counter { name: String, value: u64 }
//!
//! let state = Counter { name: "ticks".into(), value: 42 };
//! let bytes = encode_state(SnapshotKind::Full, &state)?;
//! let (header, back): (_, Counter) = decode_state(&bytes)?;
//! assert_eq!(back, state);
//! assert_eq!(header.kind, SnapshotKind::Full);
//!
//! // One flipped bit anywhere is refused.
//! let mut bad = bytes.clone();
//! bad[60] ^= 1;
//! let e = decode_state::<Counter>(&bad).unwrap_err();
//! assert!(e.to_string().contains("checksum"), "{e}");
//! # Ok::<(), vmkit_snapshot::Error>(())
//! ```
#![deny(missing_docs)]

#[cfg(feature = "vm")]
pub mod vm;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"VMKITSNP";
/// The format this vmkit writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The largest state file read or written: 64 MiB (a VM's device and vCPU state is a few
/// hundred KiB; guest RAM is in the memory file, not here).
pub const MAX_STATE_SIZE: u64 = 64 << 20;
/// Bytes before the payload.
pub const HEADER_SIZE: usize = 56;
/// Bytes after the payload (the checksum).
pub const TRAILER_SIZE: usize = 8;
/// Room for the vmkit version in the header.
const VERSION_FIELD: usize = 32;

const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Errors of this crate: each one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("state file {path}: cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file (or its directory).
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_STATE_SIZE`].
    #[error("state file of {size} bytes is larger than the {max} bytes allowed")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The file ends early.
    #[error("state file is truncated: {size} bytes, {needed} needed")]
    Truncated {
        /// Its size.
        size: u64,
        /// The size its header calls for.
        needed: u64,
    },
    /// Bytes follow the checksum.
    #[error("state file has {extra} bytes after its checksum")]
    TrailingBytes {
        /// How many.
        extra: u64,
    },
    /// Not a vmkit state file.
    #[error("not a vmkit state file (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// A format this vmkit does not read.
    #[error("state file format version {found} not supported (this vmkit reads {supported})")]
    UnsupportedVersion {
        /// The file's version.
        found: u32,
        /// The one this vmkit reads.
        supported: u32,
    },
    /// The checksum does not match the contents.
    #[error("state file checksum mismatch: stored {stored:#018x}, computed {computed:#018x} (the file is corrupted)")]
    ChecksumMismatch {
        /// The checksum in the file.
        stored: u64,
        /// The checksum of the contents.
        computed: u64,
    },
    /// A header field is invalid (the checksum matched: a writer's bug, not corruption).
    #[error("state file header: {0}")]
    BadHeader(&'static str),
    /// The payload could not be encoded.
    #[error("cannot encode the snapshot state: {0}")]
    Encode(String),
    /// The payload does not decode as the expected type.
    #[error("state file payload does not decode at `{path}`: {message}")]
    Decode {
        /// Where decoding failed: positions of fields and elements (`[1][0]`: the second
        /// field's first element; `.` for the top level).
        path: String,
        /// postcard's message.
        message: String,
    },
    /// The payload decoded but bytes of it were left over.
    #[error("state file payload has {0} undecoded bytes at its end")]
    TrailingPayload(usize),
    /// The path is not a regular file (a FIFO, a device, a directory).
    #[error("state file {0}: not a regular file")]
    NotAFile(PathBuf),
    /// The state decoded but a value is out of range (feature `vm`).
    #[error("invalid snapshot state: {0}")]
    Invalid(String),
    /// The snapshot's vCPUs cannot run on this host's CPU (feature `vm`).
    #[error("the snapshot was taken on an incompatible CPU: {0}")]
    Incompatible(String),
}

/// Result of this crate's functions.
pub type Result<T> = std::result::Result<T, Error>;

/// What a snapshot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SnapshotKind {
    /// The whole memory file.
    Full,
    /// Only the pages written since the previous snapshot.
    Diff,
}

impl SnapshotKind {
    fn to_byte(self) -> u8 {
        match self {
            Self::Full => 1,
            Self::Diff => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Full),
            2 => Some(Self::Diff),
            _ => None,
        }
    }
}

/// The header of a state file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The container's format version.
    pub format_version: u32,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// The vmkit version that wrote it.
    pub vmkit_version: String,
    /// Length of the payload in bytes.
    pub payload_len: u64,
}

/// `payload` in a state file's bytes: header, postcard payload, checksum.
pub fn encode_state<T: Serialize>(kind: SnapshotKind, payload: &T) -> Result<Vec<u8>> {
    let body = postcard::to_allocvec(payload).map_err(|e| Error::Encode(e.to_string()))?;
    encode_raw(kind, &body)
}

/// A state file's bytes around an already encoded payload `body`: header and checksum.
/// (What [`encode_state`] does after postcard; for tools and fuzzers that make payloads of
/// their own.)
pub fn encode_raw(kind: SnapshotKind, body: &[u8]) -> Result<Vec<u8>> {
    let total = (HEADER_SIZE + body.len() + TRAILER_SIZE) as u64;
    if total > MAX_STATE_SIZE {
        return Err(Error::TooLarge {
            size: total,
            max: MAX_STATE_SIZE,
        });
    }
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&[kind.to_byte(), 0, 0, 0]);
    let mut version = [0u8; VERSION_FIELD];
    let ours = env!("CARGO_PKG_VERSION").as_bytes();
    let n = ours.len().min(VERSION_FIELD);
    version[..n].copy_from_slice(&ours[..n]);
    out.extend_from_slice(&version);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let crc = CRC.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// A little-endian integer from up to 8 bytes.
fn le(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(bytes) {
        *d = *s;
    }
    u64::from_le_bytes(b)
}

/// The header of `bytes`, checked: size, magic, version, checksum, fields.
fn check(bytes: &[u8]) -> Result<Header> {
    let size = bytes.len() as u64;
    if size > MAX_STATE_SIZE {
        return Err(Error::TooLarge {
            size,
            max: MAX_STATE_SIZE,
        });
    }
    let minimum = (HEADER_SIZE + TRAILER_SIZE) as u64;
    let truncated = Error::Truncated {
        size,
        needed: minimum,
    };
    match bytes.get(..MAGIC.len()) {
        Some(m) if m == MAGIC => {}
        // A prefix of the magic: a file cut short, not another kind of file.
        None if MAGIC.starts_with(bytes) => return Err(truncated),
        _ => {
            let mut magic = [0u8; 8];
            for (d, s) in magic.iter_mut().zip(bytes) {
                *d = *s;
            }
            return Err(Error::BadMagic(magic));
        }
    }
    let found = bytes.get(8..12).map(le).ok_or(truncated)? as u32;
    if found != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            found,
            supported: FORMAT_VERSION,
        });
    }
    let payload_len = bytes.get(48..56).map(le).ok_or(Error::Truncated {
        size,
        needed: minimum,
    })?;
    let needed = payload_len.saturating_add(minimum);
    if size < needed {
        return Err(Error::Truncated { size, needed });
    }
    if size > needed {
        return Err(Error::TrailingBytes {
            extra: size - needed,
        });
    }
    // `size == needed >= minimum`: the checksum is the last 8 bytes.
    let (contents, trailer) = bytes.split_at(bytes.len() - TRAILER_SIZE);
    let stored = le(trailer);
    let computed = CRC.checksum(contents);
    if stored != computed {
        return Err(Error::ChecksumMismatch { stored, computed });
    }
    header_fields(contents, found, payload_len)
}

/// The header's fields of `contents` (at least [`HEADER_SIZE`] bytes) after the checks of
/// size and checksum.
fn header_fields(contents: &[u8], format_version: u32, payload_len: u64) -> Result<Header> {
    let short = Error::BadHeader("shorter than a header");
    let kind = contents
        .get(12)
        .and_then(|&b| SnapshotKind::from_byte(b))
        .ok_or(Error::BadHeader("unknown snapshot kind"))?;
    if contents.get(13..16).ok_or(short)? != [0, 0, 0] {
        return Err(Error::BadHeader("reserved bytes are not zero"));
    }
    let field = contents
        .get(16..16 + VERSION_FIELD)
        .ok_or(Error::BadHeader("shorter than a header"))?;
    let (text, padding) = field.split_at(field.iter().position(|&b| b == 0).unwrap_or(field.len()));
    if padding.iter().any(|&b| b != 0) || !text.is_ascii() {
        return Err(Error::BadHeader(
            "the vmkit version is not NUL-padded ASCII",
        ));
    }
    Ok(Header {
        format_version,
        kind,
        vmkit_version: String::from_utf8_lossy(text).into_owned(),
        payload_len,
    })
}

/// The header and payload of a state file's bytes, every part checked.
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<(Header, T)> {
    let header = check(bytes)?;
    // `check` proved the size: header, `payload_len` bytes, checksum.
    let payload = bytes
        .get(HEADER_SIZE..bytes.len().saturating_sub(TRAILER_SIZE))
        .unwrap_or_default();
    let mut de = postcard::Deserializer::from_bytes(payload);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| Error::Decode {
        path: e.path().to_string(),
        message: e.into_inner().to_string(),
    })?;
    let rest = de.finalize().map_err(|e| Error::Decode {
        path: ".".into(),
        message: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(Error::TrailingPayload(rest.len()));
    }
    Ok((header, value))
}

/// Reads and decodes the state file at `path`. Its size is checked against
/// [`MAX_STATE_SIZE`] before it is read.
pub fn read_state<T: DeserializeOwned>(path: &Path) -> Result<(Header, T)> {
    let io = |what| {
        move |source| Error::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    // Non-blocking: a FIFO named as a state file is not waited on (and then refused).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io("open"))?;
    let meta = file.metadata().map_err(io("stat"))?;
    if !meta.is_file() {
        return Err(Error::NotAFile(path.to_path_buf()));
    }
    let size = meta.len();
    if size > MAX_STATE_SIZE {
        return Err(Error::TooLarge {
            size,
            max: MAX_STATE_SIZE,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // `take`: a file that grows meanwhile is read no further than the limit allows (and is
    // then refused as too large).
    file.take(MAX_STATE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(io("read"))?;
    decode_state(&bytes)
}

/// Writes `payload` as a state file at `path`, atomically: to a temporary file in the same
/// directory, synced, renamed over `path`, and the directory synced. A crash leaves the old
/// file or the new one, never a part of one.
pub fn write_state<T: Serialize>(path: &Path, kind: SnapshotKind, payload: &T) -> Result<()> {
    let bytes = encode_state(kind, payload)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or(Error::BadHeader("the state file path has no file name"))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    // Left over by a crash of an earlier process of this pid, if any.
    let _ = std::fs::remove_file(&tmp);
    let result = write_synced(&tmp, &bytes).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|source| Error::Io {
            what: "rename the temporary file over it",
            path: path.to_path_buf(),
            source,
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    let d = File::open(&dir).map_err(|source| Error::Io {
        what: "open the directory",
        path: dir.clone(),
        source,
    })?;
    d.sync_all().map_err(|source| Error::Io {
        what: "sync the directory",
        path: dir,
        source,
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |what| {
        move |source| Error::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut f = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("create"))?;
    f.write_all(bytes).map_err(io("write"))?;
    f.sync_all().map_err(io("sync"))
}

#[cfg(test)]
mod tests;
