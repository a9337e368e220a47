//! The vsock target's input types: compact (one-byte enum tags), so short inputs mean
//! something (see the target's documentation).

use arbitrary::{Arbitrary, Unstructured};
use vmkit_virtio_vsock::{HOST_CID, MAX_PKT_LEN};

use super::{CID, GUEST_PORTS, HOST_PORTS, LOCAL};

/// Enums take a one-byte tag (arbitrary's derive takes four), so inputs stay short.
pub(crate) fn tag(u: &mut Unstructured<'_>, n: u8) -> arbitrary::Result<u8> {
    Ok(u8::arbitrary(u)? % n)
}

#[derive(Debug)]
pub(crate) enum Addr {
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
pub(crate) enum Len {
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
pub(crate) struct Desc {
    pub(crate) addr: Addr,
    pub(crate) len: Len,
    pub(crate) next: bool,
    pub(crate) writable: bool,
    pub(crate) next_index: u8,
}

/// A packet header, each field drawn mostly from what the device acts on; all-zero input
/// bytes make a request from guest port 1024 to host port 52 with a 64 KiB buffer.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub(crate) struct Hdr {
    /// Under 240: 1..=7 (0 is a request); else an unknown operation.
    pub(crate) op: u8,
    /// Under 216: source one of `GUEST_PORTS` and destination one of `HOST_PORTS`; else
    /// odd ports.
    pub(crate) ports: u8,
    /// Under 224: the data's length; else a bit past it, over 64 KiB, or near `u32::MAX`.
    pub(crate) len: u8,
    /// Shutdown flags (the low two bits).
    pub(crate) flags: u8,
    /// Under 224: nothing odd; else the CIDs (spoofed, swapped, high bits), the type or the
    /// flags are.
    pub(crate) odd: u8,
    /// XOR 64 Ki.
    pub(crate) buf_alloc: u32,
    pub(crate) fwd_cnt: u32,
}

impl Hdr {
    /// The source and destination ports.
    fn port_pair(&self) -> (u32, u32) {
        if self.ports < 216 {
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
        }
    }

    /// The header bytes for a packet carrying `data_len` bytes.
    pub(crate) fn bytes(&self, data_len: u32) -> [u8; 44] {
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
        let (src_port, dst_port) = self.port_pair();
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
pub(crate) enum Payload {
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
pub(crate) struct Packet {
    pub(crate) hdr: Hdr,
    pub(crate) payload: Payload,
    /// 240 and over: damaged, as `damage % 8` says (with `damage_arg`).
    pub(crate) damage: u8,
    pub(crate) damage_arg: u8,
}

#[derive(Debug)]
pub(crate) enum TxChain {
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
pub(crate) enum RxChain {
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
pub(crate) enum EvChain {
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
pub(crate) struct QueueInput<C> {
    pub(crate) chains: Vec<C>,
    pub(crate) heads: Option<Vec<u8>>,
    pub(crate) extra_avail: Option<u16>,
}

/// What a host client writes when it connects to `<dir>/v.sock`.
#[derive(Debug)]
pub(crate) enum Line {
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
pub(crate) enum Op {
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

/// The fuzzer's input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// Bit 0: `EVENT_IDX`; bit 1: `VIRTIO_VSOCK_F_STREAM` acknowledged; bit 2: no
    /// notification of the transmit and event queues right after activation; bit 3: host
    /// events only by `HostEvent` (else also after every host-side action); bit 4: the
    /// listeners accept only by `Accept` (else before every operation).
    pub(crate) features: u8,
    pub(crate) tx: QueueInput<TxChain>,
    pub(crate) ops: Vec<Op>,
    /// No chains: eight full-size single buffers.
    pub(crate) rx: QueueInput<RxChain>,
    pub(crate) event: QueueInput<EvChain>,
    pub(crate) fill: u8,
}
