//! `vmkit_virtio_blk::request::parse`: a virtio-blk request from an arbitrary descriptor
//! chain over arbitrary guest memory, against arbitrary limits.
//!
//! Guest memory is 64 KiB in two adjacent 32 KiB regions (so buffers can straddle a region
//! boundary), filled with fuzzer bytes. Descriptors are mostly small addresses and lengths
//! inside it, sometimes near its end or anywhere in the 64-bit space. The request header
//! is written at the first descriptor (when that is readable and in memory) with a type
//! drawn mostly from the known ones, so runs get past the type dispatch; discard and
//! write-zeroes segments come from the memory bytes.
//!
//! Oracles, besides "never panics" (overflow checks are on):
//! - the parser writes no guest memory;
//! - on `Ok`: the status byte is the last byte of the last descriptor, which is
//!   device-writable; the data segments are, in chain order, what is left of each
//!   descriptor once the header (the chain's first 16 bytes) and the status byte (its last)
//!   are taken out, one per descriptor with something left, and the descriptor each comes
//!   from has the direction the type needs (IN/GET_ID writable, OUT readable) — a segment
//!   is attributed by its position, not by the addresses (descriptors may overlap, and a
//!   segment may then lie in several of them); IN/OUT data is a multiple of 512 bytes,
//!   within `seg_max` segments, and `sector + sectors <= capacity`; GET_ID has ≥ 20 bytes;
//!   discard/write-zeroes have 1..=max_seg ranges, each within the capacity and
//!   `max_*_sectors`, unmap only on write-zeroes; an unsupported type is a type other than
//!   the six (or DISCARD/WRITE_ZEROES not negotiated);
//! - on `Err` with a status address: it is the last byte of the last descriptor, which is
//!   device-writable; `UNSUPP` only for flag errors.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::Descriptor;
use vmkit_virtio_blk::request::{
    parse, Limits, RequestError, RequestKind, Segment, HEADER_SIZE, ID_BYTES, SECTOR_SIZE,
    S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};

const REGION: u64 = 0x8000;
const MEM: u64 = 2 * REGION;
const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

#[derive(Arbitrary, Debug)]
enum Addr {
    /// Inside memory, mostly.
    Small(u16),
    /// Close to the end of memory (or just past it).
    NearEnd(u8),
    /// Anywhere.
    Any(u64),
}

#[derive(Arbitrary, Debug)]
enum Len {
    Small(u8),
    Sectors(u8),
    Medium(u16),
    Any(u32),
}

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: Addr,
    len: Len,
    writable: bool,
}

#[derive(Arbitrary, Debug)]
enum Type {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Other(u32),
}

#[derive(Arbitrary, Debug)]
enum Sector {
    Small(u8),
    NearCapacity(u8),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
struct Input {
    capacity: u16,
    seg_max: u8,
    discard: bool,
    write_zeroes: bool,
    max_discard_sectors: u16,
    max_discard_seg: u8,
    max_write_zeroes_sectors: u16,
    max_write_zeroes_seg: u8,
    write_header: bool,
    request_type: Type,
    sector: Sector,
    descs: Vec<Desc>,
    memory: Vec<u8>,
}

fn descriptor(d: &Desc) -> Descriptor {
    let addr = match d.addr {
        Addr::Small(a) => u64::from(a) % MEM,
        Addr::NearEnd(a) => MEM - u64::from(a),
        Addr::Any(a) => a,
    };
    let len = match d.len {
        Len::Small(l) => u32::from(l),
        Len::Sectors(n) => u32::from(n % 16) * 512,
        Len::Medium(l) => u32::from(l),
        Len::Any(l) => l,
    };
    Descriptor::new(addr, len, if d.writable { WRITE } else { 0 }, 0)
}

/// The data pieces of a chain the parser accepted, in chain order, with the index of the
/// descriptor each comes from: every descriptor minus the header bytes (the chain's first
/// 16) and the status byte (its last), where something is left.
fn data_pieces(descs: &[Descriptor]) -> Vec<(usize, Segment)> {
    let mut header_left = HEADER_SIZE as u64;
    let mut pieces = Vec::new();
    for (i, d) in descs.iter().enumerate() {
        let mut len = u64::from(d.len());
        if i + 1 == descs.len() {
            len = len.saturating_sub(1);
        }
        let take = header_left.min(len);
        header_left -= take;
        len -= take;
        if len > 0 {
            let addr = GuestAddress(d.addr().0.saturating_add(take));
            pieces.push((i, Segment { addr, len: len as u32 }));
        }
    }
    pieces
}

fuzz_target!(|input: Input| {
    if input.descs.len() > 64 {
        return;
    }
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION as usize),
        (GuestAddress(REGION), REGION as usize),
    ])
    .unwrap();
    let n = input.memory.len().min(MEM as usize);
    mem.write_slice(&input.memory[..n], GuestAddress(0))
        .unwrap();
    let limits = Limits {
        capacity: u64::from(input.capacity),
        seg_max: u32::from(input.seg_max),
        discard: input.discard,
        write_zeroes: input.write_zeroes,
        max_discard_sectors: u32::from(input.max_discard_sectors),
        max_discard_seg: u32::from(input.max_discard_seg),
        max_write_zeroes_sectors: u32::from(input.max_write_zeroes_sectors),
        max_write_zeroes_seg: u32::from(input.max_write_zeroes_seg),
    };
    let descs: Vec<Descriptor> = input.descs.iter().map(descriptor).collect();
    let request_type = match input.request_type {
        Type::In => T_IN,
        Type::Out => T_OUT,
        Type::Flush => T_FLUSH,
        Type::GetId => T_GET_ID,
        Type::Discard => T_DISCARD,
        Type::WriteZeroes => T_WRITE_ZEROES,
        Type::Other(t) => t,
    };
    let sector = match input.sector {
        Sector::Small(s) => u64::from(s),
        Sector::NearCapacity(s) => limits.capacity.wrapping_sub(u64::from(s % 8)),
        Sector::Any(s) => s,
    };
    // The type the parser must see, when the whole header went into the first descriptor.
    let mut known_type = None;
    if let Some(first) = descs.first() {
        if input.write_header && !first.is_write_only() {
            let mut h = [0u8; HEADER_SIZE];
            h[0..4].copy_from_slice(&request_type.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            let take = (first.len() as usize).min(HEADER_SIZE);
            // Ignored when outside memory.
            let written = mem.write_slice(&h[..take], first.addr()).is_ok();
            let status_inside = descs.len() == 1 && first.len() as usize <= HEADER_SIZE;
            if written && take == HEADER_SIZE && !status_inside {
                known_type = Some(request_type);
            }
        }
    }
    let is_type = |t: u32| known_type.is_none_or(|k| k == t);

    let mut before = vec![0u8; MEM as usize];
    mem.read_slice(&mut before, GuestAddress(0)).unwrap();
    let result = parse(&mem, &descs, &limits);
    let mut after = vec![0u8; MEM as usize];
    mem.read_slice(&mut after, GuestAddress(0)).unwrap();
    assert!(before == after, "the parser wrote guest memory");

    let last = descs.last();
    let status_of = |d: &Descriptor| d.addr().unchecked_add(u64::from(d.len()) - 1);
    match result {
        Err(bad) => {
            if let Some(s) = bad.status {
                let d = last.expect("a status without descriptors");
                assert!(d.is_write_only() && d.len() > 0);
                assert_eq!(s, status_of(d));
            }
            if bad.error.status() == S_UNSUPP {
                assert!(matches!(bad.error, RequestError::UnsupportedFlags(_)));
            }
        }
        Ok(req) => {
            let d = last.expect("a request without descriptors");
            assert!(
                d.is_write_only() && d.len() > 0,
                "status not device-writable"
            );
            assert_eq!(req.status, status_of(d));
            let pieces = data_pieces(&descs);
            let check_data = |data: &[Segment], writable: bool| -> u64 {
                assert!(data.len() <= limits.seg_max as usize, "more than seg_max");
                assert_eq!(data.len(), pieces.len(), "not one segment per data descriptor");
                let mut total = 0u64;
                for (s, (i, piece)) in data.iter().zip(&pieces) {
                    assert!(s.len > 0);
                    assert_eq!(s, piece, "segment is not what descriptor {i} holds past the header");
                    assert_eq!(
                        descs[*i].is_write_only(),
                        writable,
                        "a segment with the wrong direction"
                    );
                    if *i == descs.len() - 1 {
                        assert!(
                            s.addr.0 + u64::from(s.len) <= req.status.0,
                            "data over the status byte"
                        );
                    }
                    total += u64::from(s.len);
                }
                total
            };
            match &req.kind {
                RequestKind::In { sector, data } | RequestKind::Out { sector, data } => {
                    let writable = matches!(req.kind, RequestKind::In { .. });
                    assert!(
                        is_type(if writable { T_IN } else { T_OUT }),
                        "type mismatch"
                    );
                    let total = check_data(data, writable);
                    assert_eq!(total % SECTOR_SIZE, 0);
                    assert!(sector + total / SECTOR_SIZE <= limits.capacity);
                }
                RequestKind::Flush => assert!(is_type(T_FLUSH)),
                RequestKind::GetId { data } => {
                    assert!(is_type(T_GET_ID));
                    assert!(check_data(data, true) >= ID_BYTES as u64);
                }
                RequestKind::Discard { ranges } | RequestKind::WriteZeroes { ranges } => {
                    let discard = matches!(req.kind, RequestKind::Discard { .. });
                    let (max_seg, max_sectors) = if discard {
                        assert!(limits.discard && is_type(T_DISCARD));
                        (limits.max_discard_seg, limits.max_discard_sectors)
                    } else {
                        assert!(limits.write_zeroes && is_type(T_WRITE_ZEROES));
                        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
                    };
                    assert!(!ranges.is_empty() && ranges.len() <= max_seg as usize);
                    for r in ranges {
                        assert!(r.num_sectors <= max_sectors);
                        assert!(r.sector + u64::from(r.num_sectors) <= limits.capacity);
                        assert!(!(discard && r.unmap), "unmap on discard");
                        let (off, len) = r.bytes();
                        assert!(off + len <= limits.capacity * SECTOR_SIZE);
                    }
                }
                RequestKind::Unsupported { request_type: t } => {
                    assert!(is_type(*t));
                    assert!(
                        ![T_IN, T_OUT, T_FLUSH, T_GET_ID].contains(t)
                            && !(*t == T_DISCARD && limits.discard)
                            && !(*t == T_WRITE_ZEROES && limits.write_zeroes),
                        "a known, negotiated type reported unsupported"
                    );
                }
            }
        }
    }
});
