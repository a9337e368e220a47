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

use arbitrary::{Arbitrary, Unstructured};
use vm_memory::{Address, GuestAddress};
use vmkit_virtio::Descriptor;
use vmkit_virtio_blk::request::{
    parse, BadRequest, Limits, Request, RequestError, RequestKind, Segment, HEADER_SIZE, ID_BYTES,
    SECTOR_SIZE, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};

use crate::guest::Guest;

const REGION: u64 = 0x8000;
const MEM: u64 = 2 * REGION;
const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

/// A descriptor's address.
#[derive(Arbitrary, Debug)]
pub enum Addr {
    /// Inside memory, mostly (modulo its size).
    Small(u16),
    /// Close to the end of memory (or just past it).
    NearEnd(u8),
    /// Anywhere.
    Any(u64),
}

/// A descriptor's length.
#[derive(Arbitrary, Debug)]
pub enum Len {
    /// 0–255 bytes.
    Small(u8),
    /// 0–15 sectors.
    Sectors(u8),
    /// 0–65535 bytes.
    Medium(u16),
    /// Anything.
    Any(u32),
}

/// One descriptor of the chain.
#[derive(Arbitrary, Debug)]
pub struct Desc {
    /// Its buffer.
    pub addr: Addr,
    /// Its length.
    pub len: Len,
    /// Device-writable.
    pub writable: bool,
}

/// The request type written in the header (`blk_device`'s request builder uses it too).
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// `T_IN`.
    In,
    /// `T_OUT`.
    Out,
    /// `T_FLUSH`.
    Flush,
    /// `T_GET_ID`.
    GetId,
    /// `T_DISCARD`.
    Discard,
    /// `T_WRITE_ZEROES`.
    WriteZeroes,
    /// Any value.
    Other(u32),
}

/// The sector written in the header.
#[derive(Arbitrary, Debug)]
pub enum Sector {
    /// 0–255.
    Small(u8),
    /// Up to 7 sectors before the capacity.
    NearCapacity(u8),
    /// Anything.
    Any(u64),
}

/// The fuzzer's input: the device's limits, the header, the chain and guest memory.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// The disk's size in sectors.
    pub capacity: u16,
    /// `seg_max`.
    pub seg_max: u8,
    /// `DISCARD` negotiated.
    pub discard: bool,
    /// `WRITE_ZEROES` negotiated.
    pub write_zeroes: bool,
    /// `max_discard_sectors`.
    pub max_discard_sectors: u16,
    /// `max_discard_seg`.
    pub max_discard_seg: u8,
    /// `max_write_zeroes_sectors`.
    pub max_write_zeroes_sectors: u16,
    /// `max_write_zeroes_seg`.
    pub max_write_zeroes_seg: u8,
    /// Write the header at the first descriptor (else memory holds whatever it holds).
    pub write_header: bool,
    /// The header's type.
    pub request_type: Type,
    /// The header's sector.
    pub sector: Sector,
    /// The chain (inputs of more than 64 are not run).
    pub descs: Vec<Desc>,
    /// Guest memory from address 0 (the rest is zero).
    pub memory: Vec<u8>,
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
/// 16) and the status byte (its last), where something is left. This is how a segment is
/// attributed to its descriptor: by position, not by address (descriptors may overlap).
pub fn data_pieces(descs: &[Descriptor]) -> Vec<(usize, Segment)> {
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
            // `len` is at most a descriptor's length.
            pieces.push((
                i,
                Segment {
                    addr,
                    len: len as u32,
                },
            ));
        }
    }
    pieces
}

fn limits(input: &Input) -> Limits {
    Limits {
        capacity: u64::from(input.capacity),
        seg_max: u32::from(input.seg_max),
        discard: input.discard,
        write_zeroes: input.write_zeroes,
        max_discard_sectors: u32::from(input.max_discard_sectors),
        max_discard_seg: u32::from(input.max_discard_seg),
        max_write_zeroes_sectors: u32::from(input.max_write_zeroes_sectors),
        max_write_zeroes_seg: u32::from(input.max_write_zeroes_seg),
    }
}

/// Writes the header at the first descriptor if the input says so; returns the type the
/// parser must then see (`None`: any, the header is not all there or may be overwritten).
fn write_header(g: &Guest, input: &Input, descs: &[Descriptor], limits: &Limits) -> Option<u32> {
    let first = descs.first()?;
    if !input.write_header || first.is_write_only() {
        return None;
    }
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
    let mut h = [0u8; HEADER_SIZE];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    let take = (first.len() as usize).min(HEADER_SIZE);
    // Ignored when outside memory.
    let written = g.write(first.addr().0, &h[..take]);
    let status_inside = descs.len() == 1 && first.len() as usize <= HEADER_SIZE;
    (written && take == HEADER_SIZE && !status_inside).then_some(request_type)
}

/// Decodes an input from the fuzzer's bytes and runs it (nothing to run if they do not
/// decode).
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

/// Runs `input`, panicking when an oracle fails.
pub fn run(input: &Input) {
    let _ = parse_and_check(input);
}

/// Whether `data` decodes to a request the parser accepts (for seed selection).
pub fn reaches_goal(data: &[u8]) -> bool {
    Input::arbitrary_take_rest(Unstructured::new(data))
        .is_ok_and(|input| matches!(parse_and_check(&input), Some(Ok(_))))
}

/// Runs `input` and returns what the parser said (`None`: the input is not run).
fn parse_and_check(input: &Input) -> Option<Result<Request, BadRequest>> {
    if input.descs.len() > 64 {
        return None;
    }
    let g = Guest::new(REGION, 0);
    let n = input.memory.len().min(MEM as usize);
    g.write(0, &input.memory[..n]);
    let limits = limits(input);
    let descs: Vec<Descriptor> = input.descs.iter().map(descriptor).collect();
    let known_type = write_header(&g, input, &descs, &limits);

    let before = g.snapshot();
    let result = parse(&g.mem, &descs, &limits);
    assert!(before == g.snapshot(), "the parser wrote guest memory");
    match &result {
        Err(bad) => check_refused(&descs, bad),
        Ok(req) => check_request(&descs, &limits, known_type, req),
    }
    Some(result)
}

/// The status byte of a chain ending with `d`.
fn status_of(d: &Descriptor) -> GuestAddress {
    d.addr().unchecked_add(u64::from(d.len()) - 1)
}

fn check_refused(descs: &[Descriptor], bad: &BadRequest) {
    if let Some(s) = bad.status {
        let d = descs.last().expect("a status without descriptors");
        assert!(d.is_write_only() && d.len() > 0);
        assert_eq!(s, status_of(d));
    }
    if bad.error.status() == S_UNSUPP {
        assert!(matches!(bad.error, RequestError::UnsupportedFlags(_)));
    }
}

/// Checks the data segments of an accepted request: exactly the chain's data pieces, each
/// with its own descriptor's direction; returns their total length.
fn check_data(
    descs: &[Descriptor],
    limits: &Limits,
    req: &Request,
    data: &[Segment],
    writable: bool,
) -> u64 {
    let pieces = data_pieces(descs);
    assert!(data.len() <= limits.seg_max as usize, "more than seg_max");
    assert_eq!(
        data.len(),
        pieces.len(),
        "not one segment per data descriptor"
    );
    let mut total = 0u64;
    for (s, (i, piece)) in data.iter().zip(&pieces) {
        assert!(s.len > 0);
        assert_eq!(
            s, piece,
            "segment is not what descriptor {i} holds past the header"
        );
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
}

fn check_request(descs: &[Descriptor], limits: &Limits, known_type: Option<u32>, req: &Request) {
    let d = descs.last().expect("a request without descriptors");
    assert!(
        d.is_write_only() && d.len() > 0,
        "status not device-writable"
    );
    assert_eq!(req.status, status_of(d));
    let is_type = |t: u32| known_type.is_none_or(|k| k == t);
    match &req.kind {
        RequestKind::In { sector, data } | RequestKind::Out { sector, data } => {
            let writable = matches!(req.kind, RequestKind::In { .. });
            assert!(
                is_type(if writable { T_IN } else { T_OUT }),
                "type mismatch"
            );
            let total = check_data(descs, limits, req, data, writable);
            assert_eq!(total % SECTOR_SIZE, 0);
            assert!(sector + total / SECTOR_SIZE <= limits.capacity);
        }
        RequestKind::Flush => assert!(is_type(T_FLUSH)),
        RequestKind::GetId { data } => {
            assert!(is_type(T_GET_ID));
            assert!(check_data(descs, limits, req, data, true) >= ID_BYTES as u64);
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
                !([T_IN, T_OUT, T_FLUSH, T_GET_ID].contains(t)
                    || (*t == T_DISCARD && limits.discard)
                    || (*t == T_WRITE_ZEROES && limits.write_zeroes)),
                "a known, negotiated type reported unsupported"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds;

    fn decode(data: &[u8]) -> Input {
        Input::arbitrary_take_rest(Unstructured::new(data)).expect("the input decodes")
    }

    /// The reproducer of the oracle bug: a legal request whose data segment also lies in an
    /// earlier, driver-readable descriptor (the old oracle, attributing the segment by
    /// address, called it a segment with the wrong direction).
    #[test]
    fn overlapping_descriptors_regression() {
        let data = include_bytes!("../../regressions/blk_request/overlapping-descriptors");
        let input = decode(data);
        let result = parse_and_check(&input).expect("run");
        let req = result.expect("the parser accepts the request");
        let descs: Vec<Descriptor> = input.descs.iter().map(descriptor).collect();
        let segments = match &req.kind {
            RequestKind::In { data, .. } | RequestKind::GetId { data } => data.clone(),
            other => panic!("not a request with device-writable data: {other:?}"),
        };
        // The first descriptor holding a segment by address is a readable one.
        let misattributed = segments.iter().any(|s| {
            descs
                .iter()
                .find(|d| {
                    d.addr().0 <= s.addr.0
                        && s.addr.0 + u64::from(s.len) <= d.addr().0 + u64::from(d.len())
                })
                .is_some_and(|d| !d.is_write_only())
        });
        assert!(misattributed, "{descs:?} {segments:?}");
    }

    /// The same situation built by hand: GET_ID with a header descriptor and a data
    /// descriptor over the same bytes.
    #[test]
    fn a_data_descriptor_over_the_header_is_attributed_to_itself() {
        let desc = |addr: u16, len: u8, writable: bool| Desc {
            addr: Addr::Small(addr),
            len: Len::Small(len),
            writable,
        };
        let input = Input {
            capacity: 8,
            seg_max: 4,
            discard: false,
            write_zeroes: false,
            max_discard_sectors: 0,
            max_discard_seg: 0,
            max_write_zeroes_sectors: 0,
            max_write_zeroes_seg: 0,
            write_header: true,
            request_type: Type::GetId,
            sector: Sector::Small(0),
            descs: vec![
                desc(0x1000, 16, false),
                desc(0x1000, 8, true),
                desc(0x3000, 13, true),
            ],
            memory: Vec::new(),
        };
        let req = parse_and_check(&input).expect("run").expect("accepted");
        let RequestKind::GetId { data } = req.kind else {
            panic!("{:?}", req.kind)
        };
        assert_eq!(data.len(), 2);
        assert_eq!((data[0].addr.0, data[0].len), (0x1000, 8));
    }

    /// Random bytes decode and reach the parser. They do not get a request accepted: a
    /// random chain's last descriptor is rarely device-writable and in memory, so the parser
    /// stops at the status byte (`NoStatus`, `OutsideMemory`); the fuzzer's corpus gets past it.
    #[test]
    fn seeds_decode_and_reach_the_parser() {
        let seeds = seeds::for_target("blk_request");
        let runs: Vec<_> = seeds.iter().map(|s| parse_and_check(&decode(s))).collect();
        let parsed = runs.iter().filter(|r| r.is_some()).count();
        let accepted = runs.iter().filter(|r| matches!(r, Some(Ok(_)))).count();
        eprintln!(
            "blk_request seeds: {parsed} of {} run, {accepted} accepted",
            seeds.len()
        );
        assert!(parsed > seeds.len() / 2);
    }
}
