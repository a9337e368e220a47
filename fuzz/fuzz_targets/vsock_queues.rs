//! `vmkit_virtio_vsock::Vsock` through its real data path: receive, transmit and event
//! queues laid out in guest memory from fuzzer input, the device activated on them, then a
//! sequence of queue notifications, host-side actions on real Unix sockets (listeners at
//! `<dir>/v.sock_52` and `_53` that accept, read, write, shut down or close; host clients of
//! `<dir>/v.sock` writing `CONNECT <port>\n`, part of it or garbage, then data), host events,
//! more chains offered by the "driver", transmit headers rewritten, transport resets, device
//! resets and re-activations.
//!
//! Guest memory is 128 KiB in two adjacent regions; the three queues (16 entries) sit in the
//! first 12 KiB as in `net_queues`. The transmit chains are mostly structured packets: a
//! 44-byte header (guest CID to CID 2, ports from a small set that includes the listeners,
//! an unbound port and the host ports the device gives host clients, type stream, op 1..=7
//! mostly, `len` mostly the data's length, `buf_alloc`/`fwd_cnt` arbitrary) in its own
//! descriptor, with the data inline or in a second descriptor (up to 64 KiB), sometimes
//! damaged (a flipped header bit, a short or device-writable header descriptor, a header
//! past the end of memory or across the region boundary, a short data descriptor, a stray
//! `next`); the others are arbitrary descriptors as in `net_queues`. Receive chains are one
//! buffer, a header plus a data descriptor (up to 64 KiB), or arbitrary; event chains one
//! small buffer or arbitrary. No indirect descriptors, so the oracle knows every buffer.
//!
//! Inputs are compact (one-byte enum tags) and short inputs mean something: all-zero
//! header bytes are a request from guest port 1024 to the listener on port 52 with a 64 KiB
//! buffer, every chain is made available unless heads are given, eight full-size receive
//! buffers are offered unless receive chains are given, and unless the input's flags say
//! otherwise the transmit and event queues are notified after activation, the listeners
//! accept before every operation and a host event follows every host-side action (as the
//! VMM's event loop would run it once the device's epoll fd is readable).
//!
//! The device is created per run (guest CID 3, at most 4 connections, 4 KiB `buf_alloc`)
//! on a socket path in a directory of this process's own, and dropped at the end of the
//! run with every host socket, so nothing is left over from one run to the next.
//!
//! Oracles, besides "never panics" (overflow checks are on):
//! - guest memory changes only in the used rings and in buffers of descriptors marked
//!   device-writable (checked at the end, and before each write the harness makes);
//! - `connections()` never exceeds `max_connections` (after every operation);
//! - after every operation, for each used element the device added: its id is a descriptor
//!   index, and its length is at most the chain's device-writable length (receive), 0
//!   (transmit), 0 or 4 (event); and no more elements than the ring holds were added at once
//!   (unless a device-writable buffer overlaps the queue area, where the device may rewrite
//!   the rings: then only the memory oracle applies);
//! - the device logs no warning (its host poll giving up after its bound of rounds, which
//!   means sockets that keep waking themselves; an `epoll_wait`, `accept` or `epoll_ctl`
//!   failure, which here would mean leaked descriptors).
#![no_main]

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::{
    ActivateContext, InterruptReason, NeedsReset, VirtioDevice, VirtioInterrupt,
    FEATURE_RING_EVENT_IDX, FEATURE_VERSION_1,
};
use vmkit_virtio_vsock::{Vsock, VsockConfig, HOST_CID, MAX_PKT_LEN, VIRTIO_VSOCK_F_STREAM};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const REGION: u64 = 0x1_0000;
const MEM: u64 = 2 * REGION;
const QSIZE: u16 = 16;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
/// Per queue (receive, transmit, event): table at base, avail at base + 0x100, used at
/// base + 0x200.
const QUEUE_BASES: [u64; 3] = [0x0, 0x1000, 0x2000];
const USED: u64 = 0x200;
const AVAIL: u64 = 0x100;
/// Where arbitrary buffers mostly go (everything past the queues).
const DATA: u64 = 0x3000;
/// Structured buffers, by descriptor index: transmit headers (64 bytes each), transmit data
/// and inline packets (256 each), receive buffers (512 each), event buffers (16 each).
const TX_HDRS: u64 = 0x3000;
const TX_DATA: u64 = 0x3400;
const RX_SLOTS: u64 = 0x4400;
const EV_SLOTS: u64 = 0x6400;
/// Large data buffers (up to 64 KiB): the whole second region.
const LARGE: u64 = REGION;
const HDR: u32 = 44;

const CID: u64 = 3;
const MAX_CONNECTIONS: usize = 4;
const BUF_ALLOC: u32 = 4096;
/// Host ports with a listener at `<dir>/v.sock_<port>`.
const LISTEN_PORTS: [u32; 2] = [52, 53];
/// The first host port the device gives a host client's connection.
const LOCAL: u32 = 1 << 30;
/// Host ports packets mostly go to: the listeners, a port nothing listens on, and the
/// device's first host-client ports.
const HOST_PORTS: [u32; 6] = [52, 53, 54, LOCAL, LOCAL + 1, LOCAL + 2];
const GUEST_PORTS: [u32; 3] = [1024, 1025, 1026];
const MAX_OPS: usize = 48;
const MAX_PEERS: usize = 6;

/// Enums take a one-byte tag (arbitrary's derive takes four), so inputs stay short.
fn tag(u: &mut Unstructured<'_>, n: u8) -> arbitrary::Result<u8> {
    Ok(u8::arbitrary(u)? % n)
}

#[derive(Debug)]
enum Addr {
    Data(u16),
    NearEnd(u8),
    Any(u64),
}

impl<'a> Arbitrary<'a> for Addr {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match tag(u, 3)? {
            0 => Self::Data(u.arbitrary()?),
            1 => Self::NearEnd(u.arbitrary()?),
            _ => Self::Any(u.arbitrary()?),
        })
    }
}

#[derive(Debug)]
enum Len {
    Small(u8),
    Medium(u16),
    Any(u32),
}

impl<'a> Arbitrary<'a> for Len {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match tag(u, 3)? {
            0 => Self::Small(u.arbitrary()?),
            1 => Self::Medium(u.arbitrary()?),
            _ => Self::Any(u.arbitrary()?),
        })
    }
}

/// An arbitrary descriptor, as in `net_queues`.
#[derive(Arbitrary, Debug)]
struct Desc {
    addr: Addr,
    len: Len,
    next: bool,
    writable: bool,
    next_index: u8,
}

/// A packet header, each field drawn mostly from what the device acts on; all-zero input
/// bytes make a request from guest port 1024 to host port 52 with a 64 KiB buffer.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Hdr {
    /// Under 240: 1..=7 (0 is a request); else an unknown operation.
    op: u8,
    /// Under 216: source one of `GUEST_PORTS` and destination one of `HOST_PORTS`; else
    /// odd ports.
    ports: u8,
    /// Under 224: the data's length; else a bit past it, over 64 KiB, or near `u32::MAX`.
    len: u8,
    /// Shutdown flags (the low two bits).
    flags: u8,
    /// Under 224: nothing odd; else the CIDs (spoofed, swapped, high bits), the type or the
    /// flags are.
    odd: u8,
    /// XOR 64 Ki.
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn bytes(&self, data_len: u32) -> [u8; 44] {
        let (mut src_cid, mut dst_cid) = (CID, HOST_CID);
        let mut type_ = 1u16;
        let mut flags = u32::from(self.flags & 3);
        if self.odd >= 224 {
            let k = usize::from(self.odd % 16);
            match k {
                0..=7 => {
                    (src_cid, dst_cid) = [
                        (7, HOST_CID),
                        (CID, 9),
                        (HOST_CID, CID),
                        (CID | 1 << 32, HOST_CID),
                        (CID, HOST_CID | 1 << 32),
                        (u64::MAX, HOST_CID),
                        (0, 0),
                        (CID, u64::MAX),
                    ][k]
                }
                8..=13 => type_ = [0, 2, 3, u16::MAX, 0x101, 0x8001][k - 8],
                _ => flags = u32::from(self.flags) | u32::from(self.flags) << 24,
            }
        }
        let (src_port, dst_port) = if self.ports < 216 {
            let p = usize::from(self.ports);
            (GUEST_PORTS[p % 3], HOST_PORTS[p / 3 % 6])
        } else {
            [
                (0, 52),
                (u32::MAX, 52),
                (1024, 0),
                (1024, u32::MAX),
                (LOCAL, 52),
                (1024, LOCAL - 1),
                (1024, LOCAL + 3),
                (52, 1024),
            ][usize::from(self.ports % 8)]
        };
        let op = if self.op < 240 {
            1 + u16::from(self.op % 7)
        } else {
            [0, 8, 9, 99, u16::MAX, 0x105, 0x101, 0x8003][usize::from(self.op % 8)]
        };
        let len = match self.len {
            0..=223 => data_len,
            224..=239 => data_len + 1 + u32::from(self.len - 224),
            240..=247 => MAX_PKT_LEN + u32::from(self.len - 240),
            _ => u32::MAX - u32::from(self.len - 248),
        };
        let mut b = [0u8; 44];
        b[0..8].copy_from_slice(&src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&src_port.to_le_bytes());
        b[20..24].copy_from_slice(&dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&len.to_le_bytes());
        b[28..30].copy_from_slice(&type_.to_le_bytes());
        b[30..32].copy_from_slice(&op.to_le_bytes());
        b[32..36].copy_from_slice(&flags.to_le_bytes());
        b[36..40].copy_from_slice(&(self.buf_alloc ^ 0x1_0000).to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Debug)]
enum Payload {
    /// The header alone.
    None,
    /// Up to 255 bytes in a second descriptor.
    Small(u8),
    /// Up to 211 bytes after the header in the same descriptor.
    Inline(u8),
    /// 1 byte to 64 KiB in a second descriptor (in the second region).
    Large(u16),
}

impl<'a> Arbitrary<'a> for Payload {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match tag(u, 4)? {
            0 => Self::None,
            1 => Self::Small(u.arbitrary()?),
            2 => Self::Inline(u.arbitrary()?),
            _ => Self::Large(u.arbitrary()?),
        })
    }
}

#[derive(Arbitrary, Debug)]
struct Packet {
    hdr: Hdr,
    payload: Payload,
    /// 240 and over: damaged, as `damage % 8` says (with `damage_arg`).
    damage: u8,
    damage_arg: u8,
}

#[derive(Debug)]
enum TxChain {
    Packet(Packet),
    Raw(Desc),
}

impl<'a> Arbitrary<'a> for TxChain {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        // Mostly packets.
        Ok(match tag(u, 8)? {
            7 => Self::Raw(u.arbitrary()?),
            _ => Self::Packet(u.arbitrary()?),
        })
    }
}

#[derive(Debug)]
enum RxChain {
    /// One buffer: a header and 468 - (`n` % 469) bytes (exactly a header, sometimes).
    Single(u16),
    /// A header descriptor (with up to 15 spare bytes), then a data descriptor of 512 -
    /// (`data` % 513) bytes or, `large`, 64 Ki - `data`.
    Split {
        hdr_extra: u8,
        data: u16,
        large: bool,
    },
    Raw(Desc),
}

impl<'a> Arbitrary<'a> for RxChain {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match tag(u, 4)? {
            0 | 1 => Self::Single(u.arbitrary()?),
            2 => Self::Split {
                hdr_extra: u.arbitrary()?,
                data: u.arbitrary()?,
                large: u.arbitrary()?,
            },
            _ => Self::Raw(u.arbitrary()?),
        })
    }
}

#[derive(Debug)]
enum EvChain {
    /// One buffer of 16 - (`n` % 17) bytes.
    Slot(u8),
    Raw(Desc),
}

impl<'a> Arbitrary<'a> for EvChain {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match tag(u, 2)? {
            0 => Self::Slot(u.arbitrary()?),
            _ => Self::Raw(u.arbitrary()?),
        })
    }
}

/// A queue's chains, the heads made available at activation (`None`: every chain, in
/// order; else under 240 the start of a chain, 240 and up a descriptor index) and how far
/// the available index runs ahead of them.
#[derive(Arbitrary, Debug)]
struct QueueInput<C> {
    chains: Vec<C>,
    heads: Option<Vec<u8>>,
    extra_avail: Option<u16>,
}

/// What a host client writes when it connects to `<dir>/v.sock`.
#[derive(Debug)]
enum Line {
    /// `CONNECT <port>\n` (port under 240: one of `GUEST_PORTS`), then `data`.
    Connect { port: u8, data: Vec<u8> },
    /// The first `cut` bytes of such a line.
    Partial { port: u8, cut: u8 },
    /// Anything.
    Raw(Vec<u8>),
}

impl<'a> Arbitrary<'a> for Line {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match tag(u, 4)? {
            0 | 1 => Self::Connect {
                port: u.arbitrary()?,
                data: u.arbitrary()?,
            },
            2 => Self::Partial {
                port: u.arbitrary()?,
                cut: u.arbitrary()?,
            },
            _ => Self::Raw(u.arbitrary()?),
        })
    }
}

#[derive(Debug)]
enum Op {
    /// `process_queue(q % 4)` (3 is no queue).
    Notify(u8),
    /// The driver makes more chains available on queue `queue % 3` (heads as in
    /// `QueueInput`), and notifies if `notify`.
    Offer {
        queue: u8,
        heads: Vec<u8>,
        notify: bool,
    },
    /// The driver writes a new header into transmit packet `packet`'s buffer.
    Rewrite {
        packet: u8,
        hdr: Hdr,
    },
    /// `process_device_event(0)`.
    HostEvent,
    /// Listener `l % 2` accepts a connection, if one is pending.
    Accept(u8),
    /// A host client connects to `<dir>/v.sock` and writes `Line`.
    Connect(Line),
    /// Peer `peer` (accepted or client) writes `len` bytes (times 256 if `big`) of `byte`.
    PeerWrite {
        peer: u8,
        len: u8,
        big: bool,
        byte: u8,
    },
    /// Peer `peer` reads up to `len` × 16 bytes.
    PeerRead {
        peer: u8,
        len: u8,
    },
    /// Peer `peer` shuts down its write side, or both.
    PeerShutdown {
        peer: u8,
        both: bool,
    },
    PeerClose(u8),
    /// Listener `l % 2` closes (its socket file stays: connections to it are refused).
    CloseListener(u8),
    TransportReset,
    Reset,
    /// Activates the device again after a reset, on the same rings (indices zeroed).
    Activate,
}

impl<'a> Arbitrary<'a> for Op {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match tag(u, 16)? {
            0 | 1 => Self::Notify(u.arbitrary()?),
            2 => Self::Offer {
                queue: u.arbitrary()?,
                heads: u.arbitrary()?,
                notify: u.arbitrary()?,
            },
            3 => Self::Rewrite {
                packet: u.arbitrary()?,
                hdr: u.arbitrary()?,
            },
            4 | 5 => Self::HostEvent,
            6 => Self::Accept(u.arbitrary()?),
            7 => Self::Connect(u.arbitrary()?),
            8 => Self::PeerWrite {
                peer: u.arbitrary()?,
                len: u.arbitrary()?,
                big: u.arbitrary()?,
                byte: u.arbitrary()?,
            },
            9 => Self::PeerRead {
                peer: u.arbitrary()?,
                len: u.arbitrary()?,
            },
            10 => Self::PeerShutdown {
                peer: u.arbitrary()?,
                both: u.arbitrary()?,
            },
            11 => Self::PeerClose(u.arbitrary()?),
            12 => Self::CloseListener(u.arbitrary()?),
            13 => Self::TransportReset,
            14 => Self::Reset,
            _ => Self::Activate,
        })
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Bit 0: `EVENT_IDX`; bit 1: `VIRTIO_VSOCK_F_STREAM` acknowledged; bit 2: no
    /// notification of the transmit and event queues right after activation; bit 3: host
    /// events only by `HostEvent` (else also after every host-side action); bit 4: the
    /// listeners accept only by `Accept` (else before every operation).
    features: u8,
    tx: QueueInput<TxChain>,
    ops: Vec<Op>,
    /// No chains: eight full-size single buffers.
    rx: QueueInput<RxChain>,
    event: QueueInput<EvChain>,
    fill: u8,
}

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn trigger(&self, _: InterruptReason) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn addr(a: &Addr) -> u64 {
    match a {
        Addr::Data(o) => DATA + u64::from(*o) % (MEM - DATA),
        Addr::NearEnd(b) => MEM - u64::from(*b),
        Addr::Any(x) => *x,
    }
}

fn len(l: &Len) -> u32 {
    match l {
        Len::Small(n) => u32::from(*n),
        Len::Medium(n) => u32::from(*n),
        Len::Any(n) => *n,
    }
}

fn raw(d: &Desc) -> RawDesc {
    RawDesc {
        addr: addr(&d.addr),
        len: len(&d.len),
        flags: if d.next { NEXT } else { 0 } | if d.writable { WRITE } else { 0 },
        next: u16::from(d.next_index) % QSIZE,
    }
}

/// A queue's descriptors (by index), the indices chains start at, and bytes to write.
#[derive(Default)]
struct Table {
    descs: Vec<RawDesc>,
    starts: Vec<u16>,
    writes: Vec<(u64, Vec<u8>)>,
    /// Transmit packets: where the header is, and the data length it was built for.
    packets: Vec<(u64, u32)>,
}

impl Table {
    fn next(&self) -> u16 {
        self.descs.len() as u16
    }

    /// Room for `n` more descriptors.
    fn room(&self, n: u16) -> bool {
        self.next() + n <= QSIZE
    }
}

fn tx_table(chains: &[TxChain]) -> Table {
    let mut t = Table::default();
    for c in chains {
        let i = t.next();
        let p = match c {
            TxChain::Raw(d) if t.room(1) => {
                t.starts.push(i);
                t.descs.push(raw(d));
                continue;
            }
            TxChain::Packet(p) => p,
            TxChain::Raw(_) => break,
        };
        let slot = u64::from(i);
        let (data_len, data) = match p.payload {
            Payload::None => (0, None),
            Payload::Small(n) => (u32::from(n), Some(TX_DATA + 0x100 * (slot + 1))),
            Payload::Inline(n) => (u32::from(n) % 212, None),
            Payload::Large(n) => (u32::from(n) + 1, Some(LARGE)),
        };
        if !t.room(if data.is_some() { 2 } else { 1 }) {
            break;
        }
        let inline = matches!(p.payload, Payload::Inline(_));
        let mut h = RawDesc {
            addr: if inline {
                TX_DATA + 0x100 * slot
            } else {
                TX_HDRS + 0x40 * slot
            },
            len: HDR + if inline { data_len } else { 0 },
            flags: if data.is_some() { NEXT } else { 0 },
            next: if data.is_some() { i + 1 } else { 0 },
        };
        let mut d = data.map(|addr| RawDesc {
            addr,
            len: data_len,
            flags: 0,
            next: 0,
        });
        let mut bytes = p.hdr.bytes(data_len);
        if p.damage >= 240 {
            let a = p.damage_arg;
            match p.damage % 8 {
                0 => bytes[usize::from(a % 44)] ^= 1 << (a >> 5),
                1 => h.len = u32::from(a) % HDR,
                2 => h.flags |= WRITE,
                3 => match &mut d {
                    Some(d) => d.flags |= WRITE,
                    None => h.len += 1 + u32::from(a),
                },
                4 => {
                    h.flags |= NEXT;
                    h.next = u16::from(a) % QSIZE;
                }
                // The header runs past the end of memory.
                5 => h.addr = MEM - u64::from(a % 44),
                // The header straddles the two regions.
                6 => h.addr = REGION - 1 - u64::from(a % 43),
                _ => match &mut d {
                    Some(d) => d.len = u32::from(a) % (data_len + 1),
                    None => h.len = HDR + u32::from(a),
                },
            }
        }
        t.writes.push((h.addr, bytes.to_vec()));
        t.packets.push((h.addr, data_len));
        t.starts.push(i);
        t.descs.push(h);
        t.descs.extend(d);
    }
    t
}

fn rx_table(chains: &[RxChain]) -> Table {
    let mut t = Table::default();
    for c in chains {
        let i = t.next();
        let slot = RX_SLOTS + 0x200 * u64::from(i);
        let descs = match c {
            RxChain::Single(n) => vec![RawDesc {
                addr: slot,
                len: HDR + 468 - u32::from(*n) % 469,
                flags: WRITE,
                next: 0,
            }],
            RxChain::Split {
                hdr_extra,
                data,
                large,
            } => vec![
                RawDesc {
                    addr: slot,
                    len: HDR + u32::from(hdr_extra % 16),
                    flags: WRITE | NEXT,
                    next: i + 1,
                },
                match large {
                    true => RawDesc {
                        addr: LARGE,
                        len: 0x1_0000 - u32::from(*data),
                        flags: WRITE,
                        next: 0,
                    },
                    false => RawDesc {
                        addr: slot + 0x200,
                        len: 0x200 - u32::from(*data) % 0x201,
                        flags: WRITE,
                        next: 0,
                    },
                },
            ],
            RxChain::Raw(d) => vec![raw(d)],
        };
        if !t.room(descs.len() as u16) {
            break;
        }
        t.starts.push(i);
        t.descs.extend(descs);
    }
    t
}

fn event_table(chains: &[EvChain]) -> Table {
    let mut t = Table::default();
    for c in chains.iter().take(usize::from(QSIZE)) {
        let i = t.next();
        t.starts.push(i);
        t.descs.push(match c {
            EvChain::Slot(n) => RawDesc {
                addr: EV_SLOTS + 0x10 * u64::from(i),
                len: 16 - u32::from(*n) % 17,
                flags: WRITE,
                next: 0,
            },
            EvChain::Raw(d) => raw(d),
        });
    }
    t
}

/// Head choice `sel`: under 240, the start of a chain; else a descriptor index.
fn head(sel: u8, starts: &[u16]) -> u16 {
    if sel < 240 && !starts.is_empty() {
        starts[usize::from(sel) % starts.len()]
    } else {
        u16::from(sel) % QSIZE
    }
}

/// The device-writable buffers of queue table `base` (all 16 entries, whatever they hold).
fn writable_buffers(mem: &GuestMemoryMmap, base: u64) -> Vec<(u64, u64)> {
    (0..u64::from(QSIZE))
        .filter_map(|i| {
            let at = base + 16 * i;
            let a: u64 = mem.read_obj(GuestAddress(at)).unwrap();
            let l: u32 = mem.read_obj(GuestAddress(at + 8)).unwrap();
            let f: u16 = mem.read_obj(GuestAddress(at + 12)).unwrap();
            (f & WRITE != 0).then_some((a, u64::from(l)))
        })
        .collect()
}

/// The total device-writable length of the chain at `head` of table `base`, walked as the
/// device may (at most a queue's worth of descriptors; an upper bound for a broken chain).
fn chain_writable(mem: &GuestMemoryMmap, base: u64, head: u16) -> u64 {
    let mut total = 0u64;
    let mut i = head;
    for _ in 0..QSIZE {
        let at = base + 16 * u64::from(i);
        let l: u32 = mem.read_obj(GuestAddress(at + 8)).unwrap();
        let f: u16 = mem.read_obj(GuestAddress(at + 12)).unwrap();
        let n: u16 = mem.read_obj(GuestAddress(at + 14)).unwrap();
        if f & WRITE != 0 {
            total += u64::from(l);
        }
        if f & NEXT == 0 || n >= QSIZE {
            break;
        }
        i = n;
    }
    total
}

fn in_allowed(i: u64, allowed: &[(u64, u64)]) -> bool {
    allowed
        .iter()
        .any(|(a, l)| i >= *a && i < a.saturating_add(*l))
}

/// The first byte that changed outside `allowed` (compared a chunk at a time: most of
/// memory does not change).
fn changed_outside(before: &[u8], after: &[u8], allowed: &[(u64, u64)]) -> Option<usize> {
    const CHUNK: usize = 512;
    before
        .chunks(CHUNK)
        .zip(after.chunks(CHUNK))
        .enumerate()
        .filter(|(_, (b, a))| b != a)
        .find_map(|(c, (b, a))| {
            (0..b.len())
                .map(|i| c * CHUNK + i)
                .find(|&i| b[i % CHUNK] != a[i % CHUNK] && !in_allowed(i as u64, allowed))
        })
}

fn overlaps(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    ranges
        .iter()
        .any(|(a, l)| *l > 0 && *a < end && a.saturating_add(*l) > start)
}

/// Guest memory, what it should hold outside device-writable places, and the driver's side.
struct Rig {
    mem: GuestMemoryMmap,
    /// Memory as the harness left it; the device may change only `allowed` places.
    shadow: Vec<u8>,
    allowed: Vec<(u64, u64)>,
    /// No device-writable buffer overlaps the queue area: the tables and used rings change
    /// only as the device completes chains.
    clean: bool,
    starts: [Vec<u16>; 3],
    /// Transmit packets' header addresses and data lengths.
    packets: Vec<(u64, u32)>,
    /// The available index the driver published, and the used index checked so far.
    avail: [u16; 3],
    seen: [u16; 3],
    features: u64,
}

impl Rig {
    fn fail(&self, at: u64) -> ! {
        panic!(
            "the device wrote guest memory at {at:#x}, outside the used rings and writable buffers"
        );
    }

    /// A write by the driver: checks first that the device left these bytes alone (unless
    /// allowed), then writes both memory and the shadow.
    fn write(&mut self, at: u64, bytes: &[u8]) {
        let end = at.saturating_add(bytes.len() as u64);
        if end > MEM {
            return;
        }
        let mut now = vec![0u8; bytes.len()];
        self.mem.read_slice(&mut now, GuestAddress(at)).unwrap();
        let (s, e) = (at as usize, end as usize);
        if let Some(j) =
            (s..e).find(|&j| now[j - s] != self.shadow[j] && !in_allowed(j as u64, &self.allowed))
        {
            self.fail(j as u64);
        }
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        self.shadow[s..e].copy_from_slice(bytes);
    }

    fn queues(&self) -> Vec<(u16, Queue, EventFd)> {
        QUEUE_BASES
            .iter()
            .enumerate()
            .map(|(i, base)| {
                let mut q = Queue::new(QSIZE).unwrap();
                q.set_desc_table_address(Some(*base as u32), Some(0));
                q.set_avail_ring_address(Some((base + AVAIL) as u32), Some(0));
                q.set_used_ring_address(Some((base + USED) as u32), Some(0));
                q.set_event_idx(self.features & FEATURE_RING_EVENT_IDX != 0);
                q.set_ready(true);
                (i as u16, q, EventFd::new(EFD_NONBLOCK).unwrap())
            })
            .collect()
    }

    fn context(&self) -> ActivateContext {
        ActivateContext::new(
            self.mem.clone(),
            self.features,
            self.queues(),
            Arc::new(NoIrq),
            NeedsReset::new(),
        )
    }

    /// The driver makes `heads` available on queue `q`.
    fn offer(&mut self, q: usize, heads: &[u8]) {
        let avail = QUEUE_BASES[q] + AVAIL;
        for sel in heads.iter().take(usize::from(QSIZE)) {
            let h = head(*sel, &self.starts[q]);
            let slot = avail + 4 + 2 * u64::from(self.avail[q] % QSIZE);
            self.write(slot, &h.to_le_bytes());
            self.avail[q] = self.avail[q].wrapping_add(1);
        }
        self.write(avail + 2, &self.avail[q].to_le_bytes());
    }

    /// The oracles on what the device put in the used rings since the last check.
    fn check_used(&mut self) {
        if !self.clean {
            // The device may have rewritten descriptor tables through a buffer on them:
            // whatever they now say is writable may be written.
            for base in QUEUE_BASES {
                let more = writable_buffers(&self.mem, base);
                self.allowed.extend(more);
            }
            self.allowed.sort_unstable();
            self.allowed.dedup();
            return;
        }
        for (q, base) in QUEUE_BASES.iter().enumerate() {
            let used = base + USED;
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            let n = idx.wrapping_sub(self.seen[q]);
            assert!(
                n <= QSIZE,
                "queue {q}: the device added {n} used elements at once (used index {} to {idx})",
                self.seen[q]
            );
            for k in 0..n {
                let at = used + 4 + 8 * u64::from(self.seen[q].wrapping_add(k) % QSIZE);
                let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                assert!(id < u32::from(QSIZE), "queue {q}: used id {id}");
                let writable = chain_writable(&self.mem, *base, id as u16);
                match q {
                    0 => assert!(
                        u64::from(len) <= writable,
                        "receive chain {id}: used length {len} over its {writable} writable bytes"
                    ),
                    1 => assert_eq!(len, 0, "transmit chain {id}: used length {len}"),
                    _ => assert!(
                        len == 0 || (len == 4 && writable >= 4),
                        "event chain {id}: used length {len} ({writable} writable bytes)"
                    ),
                }
            }
            self.seen[q] = idx;
        }
    }
}

/// Panics on the device's warnings (the last oracle).
struct PanicOnWarn;

impl log::Log for PanicOnWarn {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }

    fn log(&self, r: &log::Record<'_>) {
        if r.level() <= log::Level::Warn && r.target().starts_with("vmkit_virtio_vsock") {
            panic!("the device logged a warning: {}", r.args());
        }
    }

    fn flush(&self) {}
}

/// Guest memory and the two memory-sized buffers, kept from one run to the next (mapping
/// and faulting them in anew each run would cost more than the run).
struct Scratch {
    mem: GuestMemoryMmap,
    shadow: Vec<u8>,
    after: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

impl Scratch {
    fn take() -> Self {
        SCRATCH
            .with(|s| s.borrow_mut().take())
            .unwrap_or_else(|| Self {
                mem: GuestMemoryMmap::from_ranges(&[
                    (GuestAddress(0), REGION as usize),
                    (GuestAddress(REGION), REGION as usize),
                ])
                .unwrap(),
                shadow: vec![0; MEM as usize],
                after: vec![0; MEM as usize],
            })
    }

    fn put_back(self) {
        SCRATCH.with(|s| *s.borrow_mut() = Some(self));
    }
}

const DIR_PREFIX: &str = "vmkit-fuzz-vsock-";

/// The per-process directory of the sockets.
fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| std::env::temp_dir().join(format!("{DIR_PREFIX}{}", std::process::id())))
}

/// Removes the directories of processes that are gone (a crash skips the exit hook).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

extern "C" fn remove_dir() {
    let _ = std::fs::remove_dir_all(dir());
}

fn listen(path: &Path) -> UnixListener {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).unwrap();
    l.set_nonblocking(true).unwrap();
    l
}

/// Takes a pending connection of `listener`, if any, as a peer.
fn accept(listener: &Option<UnixListener>, peers: &mut Vec<UnixStream>) -> bool {
    let Some(Ok((s, _))) = listener.as_ref().map(|l| l.accept()) else {
        return false;
    };
    s.set_nonblocking(true).unwrap();
    peers.push(s);
    true
}

fn guest_port(sel: u8) -> u32 {
    if sel < 240 {
        GUEST_PORTS[usize::from(sel) % GUEST_PORTS.len()]
    } else {
        [0, u32::MAX, 52, LOCAL][usize::from(sel % 4)]
    }
}

fn host_action(op: &Op, listeners: &mut [Option<UnixListener>; 2], peers: &mut Vec<UnixStream>) {
    let peer = |peers: &mut Vec<UnixStream>, p: u8| -> Option<usize> {
        (!peers.is_empty()).then(|| usize::from(p) % peers.len())
    };
    match op {
        Op::Accept(l) => {
            if peers.len() < MAX_PEERS {
                accept(&listeners[usize::from(l % 2)], peers);
            }
        }
        Op::Connect(line) => {
            if peers.len() >= MAX_PEERS {
                return;
            }
            // A Unix connect does not block while the backlog has room; the device's
            // listener has room for far more than MAX_OPS clients.
            let mut s = UnixStream::connect(dir().join("v.sock")).unwrap();
            s.set_nonblocking(true).unwrap();
            let bytes = match line {
                Line::Connect { port, data } => {
                    let mut b = format!("CONNECT {}\n", guest_port(*port)).into_bytes();
                    b.extend(data.iter().take(256));
                    b
                }
                Line::Partial { port, cut } => {
                    let b = format!("CONNECT {}\n", guest_port(*port)).into_bytes();
                    b[..usize::from(*cut) % b.len()].to_vec()
                }
                Line::Raw(b) => b.iter().take(64).copied().collect(),
            };
            let _ = s.write(&bytes);
            peers.push(s);
        }
        Op::PeerWrite {
            peer: p,
            len,
            big,
            byte,
        } => {
            if let Some(i) = peer(peers, *p) {
                let n = usize::from(*len) * if *big { 256 } else { 1 };
                let _ = peers[i].write(&vec![*byte; n]);
            }
        }
        Op::PeerRead { peer: p, len } => {
            if let Some(i) = peer(peers, *p) {
                let mut buf = vec![0u8; usize::from(*len) * 16];
                let _ = peers[i].read(&mut buf);
            }
        }
        Op::PeerShutdown { peer: p, both } => {
            if let Some(i) = peer(peers, *p) {
                let how = match both {
                    true => std::net::Shutdown::Both,
                    false => std::net::Shutdown::Write,
                };
                let _ = peers[i].shutdown(how);
            }
        }
        Op::PeerClose(p) => {
            if let Some(i) = peer(peers, *p) {
                peers.swap_remove(i);
            }
        }
        Op::CloseListener(l) => listeners[usize::from(l % 2)] = None,
        _ => unreachable!(),
    }
}

fuzz_target!(
    init: {
        // libFuzzer's main is not Rust's: SIGPIPE is not ignored yet, and the device writes
        // to host sockets whose peers may have gone (its documentation asks for this).
        // SAFETY: setting a signal's disposition to SIG_IGN and registering an exit hook
        // are sound at any time.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            libc::atexit(remove_dir);
        }
        remove_stale_dirs();
        let _ = std::fs::remove_dir_all(dir());
        std::fs::create_dir_all(dir()).unwrap();
        log::set_logger(&PanicOnWarn).unwrap();
        log::set_max_level(log::LevelFilter::Warn);
    },
    |input: Input| {
        let Scratch {
            mem,
            mut shadow,
            mut after,
        } = Scratch::take();
        shadow.fill(input.fill);
        mem.write_slice(&shadow, GuestAddress(0)).unwrap();

        let path = dir().join("v.sock");
        let _ = std::fs::remove_file(&path);
        let mut config = VsockConfig::new(CID, &path);
        config.max_connections = MAX_CONNECTIONS;
        config.buf_alloc = BUF_ALLOC;
        config.queue_size = QSIZE;
        let mut dev = Vsock::new(config).expect("Vsock::new");
        let listener_paths = LISTEN_PORTS.map(|p| dir().join(format!("v.sock_{p}")));
        let mut listeners = listener_paths.clone().map(|p| Some(listen(&p)));
        let mut peers: Vec<UnixStream> = Vec::new();

        let features = FEATURE_VERSION_1
            | u64::from(input.features & 1) * FEATURE_RING_EVENT_IDX
            | u64::from(input.features >> 1 & 1) << VIRTIO_VSOCK_F_STREAM;
        dev.ack_features(features);

        // The tables, the initial available rings, zeroed used rings.
        let default_rx = [0, 0, 0, 0, 0, 0, 0, 0].map(RxChain::Single);
        let rx_chains = match input.rx.chains.is_empty() {
            true => &default_rx[..],
            false => &input.rx.chains[..],
        };
        let tables = [
            rx_table(rx_chains),
            tx_table(&input.tx.chains),
            event_table(&input.event.chains),
        ];
        let queue_heads = [&input.rx.heads, &input.tx.heads, &input.event.heads];
        let extra = [input.rx.extra_avail, input.tx.extra_avail, input.event.extra_avail];
        let mut avail = [0u16; 3];
        for (q, t) in tables.iter().enumerate() {
            let base = QUEUE_BASES[q];
            for (i, d) in t.descs.iter().enumerate() {
                let at = base + 16 * i as u64;
                mem.write_obj(d.addr, GuestAddress(at)).unwrap();
                mem.write_obj(d.len, GuestAddress(at + 8)).unwrap();
                mem.write_obj(d.flags, GuestAddress(at + 12)).unwrap();
                mem.write_obj(d.next, GuestAddress(at + 14)).unwrap();
            }
            for (a, bytes) in &t.writes {
                if a.saturating_add(bytes.len() as u64) <= MEM {
                    mem.write_slice(bytes, GuestAddress(*a)).unwrap();
                }
            }
            let heads: Vec<u16> = match queue_heads[q] {
                None => t.starts.clone(),
                Some(sels) => sels.iter().map(|sel| head(*sel, &t.starts)).collect(),
            };
            let n = heads.len().min(usize::from(QSIZE));
            for (i, h) in heads.iter().take(n).enumerate() {
                mem.write_obj(*h, GuestAddress(base + AVAIL + 4 + 2 * i as u64)).unwrap();
            }
            avail[q] = (n as u16).wrapping_add(extra[q].unwrap_or(0));
            mem.write_obj(avail[q], GuestAddress(base + AVAIL + 2)).unwrap();
            mem.write_obj(0u32, GuestAddress(base + USED)).unwrap();
        }
        let mut allowed: Vec<(u64, u64)> = QUEUE_BASES.iter().map(|b| (b + USED, 0x100)).collect();
        let mut writable = Vec::new();
        for base in QUEUE_BASES {
            writable.extend(writable_buffers(&mem, base));
        }
        let clean = !overlaps(&writable, 0, DATA);
        allowed.extend(writable);
        mem.read_slice(&mut shadow, GuestAddress(0)).unwrap();
        let [rx_t, tx_t, ev_t] = tables;
        let mut rig = Rig {
            mem: mem.clone(),
            shadow,
            allowed,
            clean,
            starts: [rx_t.starts, tx_t.starts, ev_t.starts],
            packets: tx_t.packets,
            avail,
            seen: [0; 3],
            features,
        };

        dev.activate(rig.context()).expect("activate");
        if input.features & 4 == 0 {
            // The driver notifies what it made available.
            dev.process_queue(1);
            dev.process_queue(2);
        }
        rig.check_used();
        for op in input.ops.iter().take(MAX_OPS) {
            if input.features & 16 == 0 {
                // The host programs behind the listeners accept what came in.
                for l in 0..2 {
                    while peers.len() < MAX_PEERS && accept(&listeners[l], &mut peers) {}
                }
            }
            match op {
                Op::Notify(q) => dev.process_queue(u16::from(q % 4)),
                Op::Offer {
                    queue,
                    heads,
                    notify,
                } => {
                    let q = usize::from(queue % 3);
                    rig.offer(q, heads);
                    if *notify {
                        dev.process_queue(q as u16);
                    }
                }
                Op::Rewrite { packet, hdr } => {
                    if !rig.packets.is_empty() {
                        let (at, data_len) = rig.packets[usize::from(*packet) % rig.packets.len()];
                        rig.write(at, &hdr.bytes(data_len));
                    }
                }
                Op::HostEvent => dev.process_device_event(0),
                Op::TransportReset => dev.transport_reset(),
                Op::Reset => {
                    let _ = dev.reset();
                }
                Op::Activate => {
                    if dev.is_active() {
                        assert!(dev.activate(rig.context()).is_err(), "activated twice");
                    } else {
                        // The driver sets the queues up again: indices back to 0.
                        for (q, base) in QUEUE_BASES.iter().enumerate() {
                            rig.write(base + AVAIL + 2, &[0, 0]);
                            rig.write(base + USED, &[0; 4]);
                            rig.avail[q] = 0;
                            rig.seen[q] = 0;
                        }
                        dev.activate(rig.context()).unwrap();
                    }
                }
                host => {
                    host_action(host, &mut listeners, &mut peers);
                    if input.features & 8 == 0 {
                        // What the VMM's event loop does once the device's epoll fd is
                        // readable; else only `HostEvent` runs it (host actions batched).
                        dev.process_device_event(0);
                    }
                }
            }
            assert!(
                dev.connections() <= MAX_CONNECTIONS,
                "{} connections, over the limit of {MAX_CONNECTIONS}",
                dev.connections()
            );
            rig.check_used();
        }

        mem.read_slice(&mut after, GuestAddress(0)).unwrap();
        if let Some(i) = changed_outside(&rig.shadow, &after, &rig.allowed) {
            rig.fail(i as u64);
        }
        // Every host socket closes here; the device removes its socket file.
        drop(dev);
        drop(peers);
        drop(listeners);
        for p in &listener_paths {
            let _ = std::fs::remove_file(p);
        }
        Scratch::put_back(Scratch {
            mem,
            shadow: rig.shadow,
            after,
        });
    }
);
