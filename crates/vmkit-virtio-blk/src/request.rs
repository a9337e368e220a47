//! virtio-blk request parsing (virtio 1.2 §5.2.6): a descriptor chain in, a typed and fully
//! checked [`Request`] out, or a [`BadRequest`] saying which status to answer with.
//!
//! The parser reads guest memory (the 16-byte header, discard/write-zeroes segments) and
//! never writes it. Every buffer it returns is a piece of a descriptor of the chain, with
//! the direction the request type needs, inside guest memory; every sector range is
//! within the capacity, computed with checked arithmetic. It is independent of the
//! queue: give it the chain's descriptors (from [`vmkit_virtio::chain_descriptors`]) —
//! which is also how the `blk_request` fuzz target drives it.
//!
//! Framing is free (`VIRTIO_F_ANY_LAYOUT` is implied by `VERSION_1`): the header is the
//! first 16 bytes of the chain, possibly spread over several driver-readable descriptors
//! and possibly sharing its last one with data; the status is the last byte of the last
//! descriptor, which must be device-writable; the data is everything in between.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};
use vmkit_virtio::Descriptor;

/// The size of a sector, the unit of `sector` fields and of the capacity.
pub const SECTOR_SIZE: u64 = 512;
/// The size of the request header (`type`, `reserved`, `sector`).
pub const HEADER_SIZE: usize = 16;
/// The size of a discard / write-zeroes segment (`sector`, `num_sectors`, `flags`).
pub const DISCARD_SEGMENT_SIZE: usize = 16;
/// The size of the device ID a `GET_ID` request returns.
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// `VIRTIO_BLK_T_IN`.
pub const T_IN: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
/// `VIRTIO_BLK_T_OUT`.
pub const T_OUT: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
/// `VIRTIO_BLK_T_FLUSH`.
pub const T_FLUSH: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
/// `VIRTIO_BLK_T_GET_ID`.
pub const T_GET_ID: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID;
/// `VIRTIO_BLK_T_DISCARD`.
pub const T_DISCARD: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_DISCARD;
/// `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const T_WRITE_ZEROES: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES;

/// `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const FLAG_UNMAP: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// What the device allows, against which requests are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The disk size in 512-byte sectors.
    pub capacity: u64,
    /// At most this many data descriptors per request (`seg_max`).
    pub seg_max: u32,
    /// Whether `DISCARD` was negotiated (else it is an unsupported type).
    pub discard: bool,
    /// Whether `WRITE_ZEROES` was negotiated (else it is an unsupported type).
    pub write_zeroes: bool,
    /// At most this many sectors per discard segment.
    pub max_discard_sectors: u32,
    /// At most this many segments per discard request.
    pub max_discard_seg: u32,
    /// At most this many sectors per write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// At most this many segments per write-zeroes request.
    pub max_write_zeroes_seg: u32,
}

/// A piece of guest memory: one descriptor's buffer, or the part of one that is data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// One range of a discard or write-zeroes request, checked against the capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors (may be 0: nothing to do).
    pub num_sectors: u32,
    /// Write-zeroes only: the driver allows deallocating the range.
    pub unmap: bool,
}

impl SectorRange {
    /// The range in bytes: `(offset, length)`. Cannot overflow for a parsed range (it is
    /// within the capacity, itself from a file size).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.sector.saturating_mul(SECTOR_SIZE),
            u64::from(self.num_sectors) * SECTOR_SIZE,
        )
    }
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`: read from `sector` into the (device-writable) `data` segments.
    In {
        /// First sector.
        sector: u64,
        /// Where the data goes, in order; total a multiple of 512.
        data: Vec<Segment>,
    },
    /// `VIRTIO_BLK_T_OUT`: write the (driver-readable) `data` segments at `sector`.
    Out {
        /// First sector.
        sector: u64,
        /// The data, in order; total a multiple of 512.
        data: Vec<Segment>,
    },
    /// `VIRTIO_BLK_T_FLUSH`. Data descriptors, if any, are ignored (as QEMU does).
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: the device ID goes into the first 20 bytes of `data`.
    GetId {
        /// Device-writable segments, at least 20 bytes in total.
        data: Vec<Segment>,
    },
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard {
        /// The ranges (at most `max_discard_seg`, none with the unmap flag).
        ranges: Vec<SectorRange>,
    },
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes {
        /// The ranges (at most `max_write_zeroes_seg`).
        ranges: Vec<SectorRange>,
    },
    /// A type this device does not implement (or whose feature was not negotiated): the
    /// answer is `VIRTIO_BLK_S_UNSUPP`.
    Unsupported {
        /// The request type.
        request_type: u32,
    },
}

/// A parsed, checked request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// Where the status byte goes (device-writable, last byte of the chain).
    pub status: GuestAddress,
}

impl Request {
    /// Whether the request modifies the disk (refused on a read-only disk).
    pub fn is_write(&self) -> bool {
        matches!(
            self.kind,
            RequestKind::Out { .. } | RequestKind::Discard { .. } | RequestKind::WriteZeroes { .. }
        )
    }

    /// The bytes of data the device writes into the chain when the request succeeds (the
    /// status byte not included).
    pub fn data_written_len(&self) -> u32 {
        match &self.kind {
            RequestKind::In { data, .. } => {
                let total: u64 = data.iter().map(|s| u64::from(s.len)).sum();
                u32::try_from(total).unwrap_or(u32::MAX)
            }
            RequestKind::GetId { .. } => ID_BYTES as u32,
            _ => 0,
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain has no descriptor, or its last descriptor is driver-readable or empty:
    /// there is nowhere to put the status.
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
    /// A descriptor lies (partly) outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The chain starts with fewer than 16 driver-readable bytes.
    #[error("the request header is not 16 driver-readable bytes")]
    BadHeader,
    /// A data buffer has the wrong direction for the request type (IN and GET_ID data must
    /// be device-writable, OUT/DISCARD/WRITE_ZEROES data driver-readable).
    #[error("a data descriptor has the wrong direction for the request type")]
    WrongDirection,
    /// IN/OUT data that is not a multiple of 512 bytes.
    #[error("data length {0} is not a multiple of 512")]
    NotSectorMultiple(u64),
    /// More data descriptors than `seg_max`.
    #[error("{count} data segments, more than seg_max {max}")]
    TooManySegments {
        /// Data descriptors in the request.
        count: usize,
        /// The limit.
        max: u32,
    },
    /// A sector range reaching past the capacity, or whose end overflows.
    #[error("sectors {sector}+{sectors} are outside the capacity of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors (saturated).
        sectors: u64,
        /// The capacity.
        capacity: u64,
    },
    /// A GET_ID buffer shorter than 20 bytes.
    #[error("GET_ID buffer of {0} bytes; 20 needed")]
    IdBufferTooShort(u64),
    /// DISCARD/WRITE_ZEROES data that is not a non-empty multiple of 16 bytes.
    #[error("discard/write-zeroes data of {0} bytes is not a non-empty multiple of 16")]
    BadSegmentData(u64),
    /// More DISCARD/WRITE_ZEROES segments than `max_discard_seg`/`max_write_zeroes_seg`.
    #[error("{count} discard/write-zeroes segments, more than {max}")]
    TooManyRanges {
        /// Segments in the request.
        count: u64,
        /// The limit.
        max: u32,
    },
    /// A DISCARD/WRITE_ZEROES segment larger than `max_*_sectors`.
    #[error("a segment of {sectors} sectors, more than {max}")]
    RangeTooLarge {
        /// Sectors in the segment.
        sectors: u32,
        /// The limit.
        max: u32,
    },
    /// A DISCARD/WRITE_ZEROES segment with an unknown flag, or DISCARD with the unmap flag
    /// (the spec's answer is UNSUPP).
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
    /// Guest memory could not be read (cannot happen for a checked chain).
    #[error("guest memory could not be read")]
    Memory,
}

impl RequestError {
    /// The status byte for this error: `UNSUPP` for unsupported flags, else `IOERR`.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedFlags(_) => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

/// A refused request: why, and where its status byte goes if the chain has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadRequest {
    /// The status byte's address; `None` when the chain has no usable status byte (the
    /// chain is then returned with nothing written).
    pub status: Option<GuestAddress>,
    /// Why.
    pub error: RequestError,
}

/// A buffer of the chain with its direction.
#[derive(Clone, Copy)]
struct Piece {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// Parses the descriptors of one chain (indirect tables already followed, in chain order).
///
/// `Ok` for a request the device can execute (or must answer `UNSUPP` for unknown types);
/// `Err` with the status to answer otherwise. Reads at most the header and the discard
/// segments from guest memory; writes nothing.
pub fn parse<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    limits: &Limits,
) -> Result<Request, BadRequest> {
    // Every descriptor inside guest memory, with its direction's access.
    for d in descs {
        let len = d.len() as usize;
        let access = if d.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if len > 0 && !GuestMemory::check_range(mem, d.addr(), len, access) {
            return Err(BadRequest {
                status: None,
                error: RequestError::OutsideMemory {
                    addr: d.addr().raw_value(),
                    len: d.len(),
                },
            });
        }
    }
    // The status byte: the last byte of the last descriptor, device-writable.
    let status = match descs.last() {
        Some(last) if last.is_write_only() && last.len() > 0 => last
            .addr()
            .checked_add(u64::from(last.len()) - 1)
            .ok_or(BadRequest {
                status: None,
                error: RequestError::NoStatus,
            })?,
        _ => {
            return Err(BadRequest {
                status: None,
                error: RequestError::NoStatus,
            })
        }
    };
    let bad = |error| BadRequest {
        status: Some(status),
        error,
    };

    // The pieces between the header and the status byte; the header gathered on the way.
    let mut header = [0u8; HEADER_SIZE];
    let mut have = 0usize;
    let mut pieces: Vec<Piece> = Vec::new();
    let n = descs.len();
    for (i, d) in descs.iter().enumerate() {
        let mut addr = d.addr();
        let mut len = d.len();
        if i == n - 1 {
            len -= 1; // the status byte
        }
        if have < HEADER_SIZE && len > 0 {
            if d.is_write_only() {
                return Err(bad(RequestError::BadHeader));
            }
            let take = (HEADER_SIZE - have).min(len as usize);
            mem.read_slice(&mut header[have..have + take], addr)
                .map_err(|_| bad(RequestError::Memory))?;
            have += take;
            // `take` <= 16 and inside a descriptor checked to be in memory.
            addr = addr.unchecked_add(take as u64);
            len -= take as u32;
        }
        if len > 0 {
            pieces.push(Piece {
                addr,
                len,
                writable: d.is_write_only(),
            });
        }
    }
    if have < HEADER_SIZE {
        return Err(bad(RequestError::BadHeader));
    }
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let total: u64 = pieces.iter().map(|p| u64::from(p.len)).sum();
    let segments = |writable: bool| -> Result<Vec<Segment>, BadRequest> {
        if pieces.iter().any(|p| p.writable != writable) {
            return Err(bad(RequestError::WrongDirection));
        }
        if pieces.len() > limits.seg_max as usize {
            return Err(bad(RequestError::TooManySegments {
                count: pieces.len(),
                max: limits.seg_max,
            }));
        }
        Ok(pieces
            .iter()
            .map(|p| Segment {
                addr: p.addr,
                len: p.len,
            })
            .collect())
    };
    let check_range = |sector: u64, sectors: u64| -> Result<(), BadRequest> {
        match sector.checked_add(sectors) {
            Some(end) if end <= limits.capacity => Ok(()),
            _ => Err(bad(RequestError::OutOfRange {
                sector,
                sectors,
                capacity: limits.capacity,
            })),
        }
    };

    let kind = match request_type {
        T_IN | T_OUT => {
            let data = segments(request_type == T_IN)?;
            if !total.is_multiple_of(SECTOR_SIZE) {
                return Err(bad(RequestError::NotSectorMultiple(total)));
            }
            check_range(sector, total / SECTOR_SIZE)?;
            if request_type == T_IN {
                RequestKind::In { sector, data }
            } else {
                RequestKind::Out { sector, data }
            }
        }
        T_FLUSH => RequestKind::Flush,
        T_GET_ID => {
            let data = segments(true)?;
            if total < ID_BYTES as u64 {
                return Err(bad(RequestError::IdBufferTooShort(total)));
            }
            RequestKind::GetId { data }
        }
        T_DISCARD | T_WRITE_ZEROES => {
            let discard = request_type == T_DISCARD;
            if (discard && !limits.discard) || (!discard && !limits.write_zeroes) {
                return Ok(Request {
                    kind: RequestKind::Unsupported { request_type },
                    status,
                });
            }
            let data = segments(false)?;
            let (max_seg, max_sectors) = if discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            if total == 0 || !total.is_multiple_of(DISCARD_SEGMENT_SIZE as u64) {
                return Err(bad(RequestError::BadSegmentData(total)));
            }
            let count = total / DISCARD_SEGMENT_SIZE as u64;
            if count > u64::from(max_seg) {
                return Err(bad(RequestError::TooManyRanges {
                    count,
                    max: max_seg,
                }));
            }
            let raw = gather(mem, &data, total as usize).map_err(bad)?;
            let mut ranges = Vec::with_capacity(count as usize);
            for entry in raw.chunks_exact(DISCARD_SEGMENT_SIZE) {
                let mut s = [0u8; 8];
                s.copy_from_slice(&entry[0..8]);
                let sector = u64::from_le_bytes(s);
                let num_sectors = u32::from_le_bytes([entry[8], entry[9], entry[10], entry[11]]);
                let flags = u32::from_le_bytes([entry[12], entry[13], entry[14], entry[15]]);
                let allowed = if discard { 0 } else { FLAG_UNMAP };
                if flags & !allowed != 0 {
                    return Err(bad(RequestError::UnsupportedFlags(flags)));
                }
                if num_sectors > max_sectors {
                    return Err(bad(RequestError::RangeTooLarge {
                        sectors: num_sectors,
                        max: max_sectors,
                    }));
                }
                check_range(sector, u64::from(num_sectors))?;
                ranges.push(SectorRange {
                    sector,
                    num_sectors,
                    unmap: flags & FLAG_UNMAP != 0,
                });
            }
            if discard {
                RequestKind::Discard { ranges }
            } else {
                RequestKind::WriteZeroes { ranges }
            }
        }
        request_type => RequestKind::Unsupported { request_type },
    };
    Ok(Request { kind, status })
}

/// Reads the first `len` bytes of `segments` (which hold at least that many).
fn gather<M: GuestMemory>(
    mem: &M,
    segments: &[Segment],
    len: usize,
) -> Result<Vec<u8>, RequestError> {
    let mut out = vec![0u8; len];
    let mut at = 0;
    for s in segments {
        if at == len {
            break;
        }
        let n = (s.len as usize).min(len - at);
        mem.read_slice(&mut out[at..at + n], s.addr)
            .map_err(|_| RequestError::Memory)?;
        at += n;
    }
    Ok(out)
}

/// Writes `bytes` into the start of `segments` (which hold at least that many). For
/// GET_ID and tests.
pub(crate) fn scatter<M: GuestMemory>(
    mem: &M,
    segments: &[Segment],
    bytes: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut at = 0;
    for s in segments {
        if at == bytes.len() {
            break;
        }
        let n = (s.len as usize).min(bytes.len() - at);
        mem.write_slice(&bytes[at..at + n], s.addr)?;
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const MEM: u64 = 0x10_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            capacity: 64,
            seg_max: 4,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 16,
            max_discard_seg: 2,
            max_write_zeroes_sectors: 16,
            max_write_zeroes_seg: 2,
        }
    }

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn header(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn seg(m: &GuestMemoryMmap, at: u64, sector: u64, n: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&s, GuestAddress(at)).unwrap();
    }

    fn err(r: Result<Request, BadRequest>) -> (Option<GuestAddress>, RequestError) {
        let e = r.unwrap_err();
        (e.status, e.error)
    }

    #[test]
    fn read_write_and_any_layout() {
        let m = mem();
        header(&m, 0x1000, T_IN, 2);
        let r = parse(
            &m,
            &[
                d(0x1000, 16, 0),
                d(0x2000, 512, W),
                d(0x3000, 1024, W),
                d(0x4000, 1, W),
            ],
            &limits(),
        )
        .unwrap();
        assert_eq!(r.status, GuestAddress(0x4000));
        assert_eq!(
            r.kind,
            RequestKind::In {
                sector: 2,
                data: vec![
                    Segment {
                        addr: GuestAddress(0x2000),
                        len: 512
                    },
                    Segment {
                        addr: GuestAddress(0x3000),
                        len: 1024
                    }
                ]
            }
        );
        assert_eq!(r.data_written_len(), 1536);
        // Header split over two descriptors, data sharing the header's second descriptor.
        header(&m, 0x1000, T_OUT, 63);
        let high: [u8; 8] = m.read_obj(GuestAddress(0x1008)).unwrap();
        m.write_slice(&high, GuestAddress(0x5000)).unwrap();
        let r = parse(
            &m,
            &[d(0x1000, 8, 0), d(0x5000, 8 + 512, 0), d(0x6000, 1, W)],
            &limits(),
        )
        .unwrap();
        assert_eq!(
            r.kind,
            RequestKind::Out {
                sector: 63,
                data: vec![Segment {
                    addr: GuestAddress(0x5008),
                    len: 512
                }]
            }
        );
        assert_eq!(r.status, GuestAddress(0x6000));
        assert!(r.is_write());
        // Writable bytes before the status byte of an OUT request are data going the
        // wrong way.
        assert_eq!(
            err(parse(
                &m,
                &[d(0x1000, 8, 0), d(0x5000, 8 + 512, 0), d(0x6000, 4, W)],
                &limits()
            )),
            (Some(GuestAddress(0x6003)), RequestError::WrongDirection)
        );
        // Status sharing the last data descriptor of an IN request.
        header(&m, 0x1000, T_IN, 0);
        let r = parse(&m, &[d(0x1000, 16, 0), d(0x2000, 513, W)], &limits()).unwrap();
        assert_eq!(r.status, GuestAddress(0x2200));
        assert!(matches!(r.kind, RequestKind::In { sector: 0, ref data } if data[0].len == 512));
    }

    #[test]
    fn status_must_be_writable_and_last() {
        let m = mem();
        header(&m, 0x1000, T_IN, 0);
        assert_eq!(
            err(parse(&m, &[], &limits())),
            (None, RequestError::NoStatus)
        );
        // Read-only status.
        assert_eq!(
            err(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 1, 0)], &limits())),
            (None, RequestError::NoStatus)
        );
        // Zero-length status.
        assert_eq!(
            err(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 0, W)], &limits())),
            (None, RequestError::NoStatus)
        );
        // Only a header.
        assert_eq!(
            err(parse(&m, &[d(0x1000, 16, 0)], &limits())),
            (None, RequestError::NoStatus)
        );
    }

    #[test]
    fn header_must_be_16_readable_bytes() {
        let m = mem();
        header(&m, 0x1000, T_FLUSH, 0);
        let s = Some(GuestAddress(0x2000));
        assert_eq!(
            err(parse(&m, &[d(0x1000, 15, 0), d(0x2000, 1, W)], &limits())),
            (s, RequestError::BadHeader)
        );
        assert_eq!(
            err(parse(&m, &[d(0x2000, 17, W)], &limits())),
            (Some(GuestAddress(0x2010)), RequestError::BadHeader)
        );
        assert_eq!(
            err(parse(
                &m,
                &[d(0x1000, 8, 0), d(0x3000, 8, W), d(0x2000, 1, W)],
                &limits()
            )),
            (s, RequestError::BadHeader)
        );
        assert_eq!(
            parse(&m, &[d(0x1000, 16, 0), d(0x2000, 1, W)], &limits())
                .unwrap()
                .kind,
            RequestKind::Flush
        );
    }

    #[test]
    fn directions_lengths_and_ranges() {
        let m = mem();
        let l = limits();
        let s = Some(GuestAddress(0x4000));
        let st = d(0x4000, 1, W);
        header(&m, 0x1000, T_IN, 0);
        // IN into a driver-readable buffer.
        assert_eq!(
            err(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 512, 0), st], &l)),
            (s, RequestError::WrongDirection)
        );
        // Not a multiple of 512.
        assert_eq!(
            err(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 511, W), st], &l)),
            (s, RequestError::NotSectorMultiple(511))
        );
        // OUT from a device-writable buffer.
        header(&m, 0x1000, T_OUT, 0);
        assert_eq!(
            err(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 512, W), st], &l)),
            (s, RequestError::WrongDirection)
        );
        // Past the capacity: 63 + 2 > 64.
        header(&m, 0x1000, T_OUT, 63);
        assert_eq!(
            err(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 1024, 0), st], &l)),
            (
                s,
                RequestError::OutOfRange {
                    sector: 63,
                    sectors: 2,
                    capacity: 64
                }
            )
        );
        // Exactly to the end is fine; a zero-length request at the end too.
        assert!(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 512, 0), st], &l).is_ok());
        header(&m, 0x1000, T_OUT, 64);
        assert!(parse(&m, &[d(0x1000, 16, 0), st], &l).is_ok());
        // Overflowing sector + length.
        header(&m, 0x1000, T_IN, u64::MAX);
        assert!(matches!(
            err(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 512, W), st], &l)),
            (_, RequestError::OutOfRange { .. })
        ));
        // Too many segments.
        let mut many = vec![d(0x1000, 16, 0)];
        many.extend((0..5).map(|i| d(0x8000 + i * 0x200, 512, W)));
        many.push(st);
        header(&m, 0x1000, T_IN, 0);
        assert_eq!(
            err(parse(&m, &many, &l)),
            (s, RequestError::TooManySegments { count: 5, max: 4 })
        );
        // Buffers outside memory, or crossing its end: refused before anything is read.
        assert!(matches!(
            err(parse(&m, &[d(0x1000, 16, 0), d(MEM - 256, 512, W), st], &l)),
            (None, RequestError::OutsideMemory { .. })
        ));
        assert!(matches!(
            err(parse(
                &m,
                &[d(0x1000, 16, 0), d(u64::MAX - 10, 512, W), st],
                &l
            )),
            (None, RequestError::OutsideMemory { .. })
        ));
    }

    #[test]
    fn get_id_and_unknown() {
        let m = mem();
        let l = limits();
        header(&m, 0x1000, T_GET_ID, 0);
        let r = parse(
            &m,
            &[d(0x1000, 16, 0), d(0x2000, 20, W), d(0x3000, 1, W)],
            &l,
        )
        .unwrap();
        assert!(matches!(r.kind, RequestKind::GetId { .. }));
        assert_eq!(r.data_written_len(), 20);
        assert_eq!(
            err(parse(
                &m,
                &[d(0x1000, 16, 0), d(0x2000, 19, W), d(0x3000, 1, W)],
                &l
            )),
            (
                Some(GuestAddress(0x3000)),
                RequestError::IdBufferTooShort(19)
            )
        );
        assert_eq!(
            err(parse(
                &m,
                &[d(0x1000, 16, 0), d(0x2000, 20, 0), d(0x3000, 1, W)],
                &l
            ))
            .1,
            RequestError::WrongDirection
        );
        header(&m, 0x1000, 0x7777, 0);
        assert_eq!(
            parse(&m, &[d(0x1000, 16, 0), d(0x3000, 1, W)], &l)
                .unwrap()
                .kind,
            RequestKind::Unsupported {
                request_type: 0x7777
            }
        );
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        let mut l = limits();
        let st = d(0x4000, 1, W);
        let s = Some(GuestAddress(0x4000));
        header(&m, 0x1000, T_DISCARD, 0);
        seg(&m, 0x2000, 8, 8, 0);
        seg(&m, 0x2010, 56, 8, 0);
        let r = parse(&m, &[d(0x1000, 16, 0), d(0x2000, 32, 0), st], &l).unwrap();
        assert_eq!(
            r.kind,
            RequestKind::Discard {
                ranges: vec![
                    SectorRange {
                        sector: 8,
                        num_sectors: 8,
                        unmap: false
                    },
                    SectorRange {
                        sector: 56,
                        num_sectors: 8,
                        unmap: false
                    }
                ]
            }
        );
        assert_eq!(
            err(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 24, 0), st], &l)),
            (s, RequestError::BadSegmentData(24))
        );
        assert_eq!(
            err(parse(&m, &[d(0x1000, 16, 0), st], &l)),
            (s, RequestError::BadSegmentData(0))
        );
        assert_eq!(
            err(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 48, 0), st], &l)),
            (s, RequestError::TooManyRanges { count: 3, max: 2 })
        );
        assert_eq!(
            err(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 32, W), st], &l)),
            (s, RequestError::WrongDirection)
        );
        // Past the capacity, overflowing, too large.
        seg(&m, 0x2010, 60, 8, 0);
        assert!(matches!(
            err(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 32, 0), st], &l)),
            (_, RequestError::OutOfRange { sector: 60, .. })
        ));
        seg(&m, 0x2010, u64::MAX - 2, 8, 0);
        assert!(matches!(
            err(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 32, 0), st], &l)),
            (_, RequestError::OutOfRange { .. })
        ));
        seg(&m, 0x2010, 0, 17, 0);
        assert_eq!(
            err(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 32, 0), st], &l)).1,
            RequestError::RangeTooLarge {
                sectors: 17,
                max: 16
            }
        );
        // The unmap flag: UNSUPP for discard, fine for write zeroes; other flags UNSUPP.
        seg(&m, 0x2010, 0, 8, FLAG_UNMAP);
        let e = parse(&m, &[d(0x1000, 16, 0), d(0x2000, 32, 0), st], &l).unwrap_err();
        assert_eq!(e.error, RequestError::UnsupportedFlags(FLAG_UNMAP));
        assert_eq!(e.error.status(), S_UNSUPP);
        header(&m, 0x1000, T_WRITE_ZEROES, 0);
        let r = parse(&m, &[d(0x1000, 16, 0), d(0x2000, 32, 0), st], &l).unwrap();
        assert!(matches!(r.kind, RequestKind::WriteZeroes { ref ranges } if ranges[1].unmap));
        seg(&m, 0x2010, 0, 8, 2);
        assert_eq!(
            err(parse(&m, &[d(0x1000, 16, 0), d(0x2000, 32, 0), st], &l)).1,
            RequestError::UnsupportedFlags(2)
        );
        // Segments split across descriptors are gathered.
        seg(&m, 0x2010, 4, 2, 0);
        let r = parse(
            &m,
            &[d(0x1000, 16, 0), d(0x2000, 20, 0), d(0x2014, 12, 0), st],
            &l,
        )
        .unwrap();
        assert!(matches!(r.kind, RequestKind::WriteZeroes { ref ranges } if ranges[1].sector == 4));
        // Not negotiated: unsupported.
        l.write_zeroes = false;
        assert_eq!(
            parse(&m, &[d(0x1000, 16, 0), d(0x2000, 32, 0), st], &l)
                .unwrap()
                .kind,
            RequestKind::Unsupported {
                request_type: T_WRITE_ZEROES
            }
        );
    }
}
