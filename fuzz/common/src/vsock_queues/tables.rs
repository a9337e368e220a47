//! The vsock target's descriptor tables: structured transmit packets, receive and event
//! buffers, or arbitrary descriptors, as [`ring::Desc`]s to write into the tables.

use crate::ring::{Desc, F_NEXT, F_WRITE};

use super::input::{self, Addr, EvChain, Len, Packet, Payload, RxChain, TxChain};
use super::{DATA, EV_SLOTS, HDR, LARGE, MEM, QSIZE, REGION, RX_SLOTS, TX_DATA, TX_HDRS};

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

fn raw(d: &input::Desc) -> Desc {
    Desc {
        addr: addr(&d.addr),
        len: len(&d.len),
        flags: if d.next { F_NEXT } else { 0 } | if d.writable { F_WRITE } else { 0 },
        next: u16::from(d.next_index) % QSIZE,
    }
}

/// A queue's descriptors (by index), the indices chains start at, and bytes to write.
#[derive(Default)]
pub(super) struct Table {
    pub(super) descs: Vec<Desc>,
    pub(super) starts: Vec<u16>,
    pub(super) writes: Vec<(u64, Vec<u8>)>,
    /// Transmit packets: where the header is, and the data length it was built for.
    pub(super) packets: Vec<(u64, u32)>,
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

pub(super) fn tx_table(chains: &[TxChain]) -> Table {
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
        let mut h = Desc {
            addr: if inline {
                TX_DATA + 0x100 * slot
            } else {
                TX_HDRS + 0x40 * slot
            },
            len: HDR + if inline { data_len } else { 0 },
            flags: if data.is_some() { F_NEXT } else { 0 },
            next: if data.is_some() { i + 1 } else { 0 },
        };
        let mut d = data.map(|addr| Desc {
            addr,
            len: data_len,
            flags: 0,
            next: 0,
        });
        let mut bytes = p.hdr.bytes(data_len);
        if p.damage >= 240 {
            damage(p, data_len, &mut bytes, &mut h, &mut d);
        }
        t.writes.push((h.addr, bytes.to_vec()));
        t.packets.push((h.addr, data_len));
        t.starts.push(i);
        t.descs.push(h);
        t.descs.extend(d);
    }
    t
}

/// Damages packet `p` as its `damage % 8` says: a flipped header bit, a short or
/// device-writable header descriptor, a header past the end of memory or across the region
/// boundary, a short data descriptor, a stray `next`.
fn damage(p: &Packet, data_len: u32, bytes: &mut [u8; 44], h: &mut Desc, d: &mut Option<Desc>) {
    let a = p.damage_arg;
    match p.damage % 8 {
        0 => bytes[usize::from(a % 44)] ^= 1 << (a >> 5),
        1 => h.len = u32::from(a) % HDR,
        2 => h.flags |= F_WRITE,
        3 => match d {
            Some(d) => d.flags |= F_WRITE,
            None => h.len += 1 + u32::from(a),
        },
        4 => {
            h.flags |= F_NEXT;
            h.next = u16::from(a) % QSIZE;
        }
        // The header runs past the end of memory.
        5 => h.addr = MEM - u64::from(a % 44),
        // The header straddles the two regions.
        6 => h.addr = REGION - 1 - u64::from(a % 43),
        _ => match d {
            Some(d) => d.len = u32::from(a) % (data_len + 1),
            None => h.len = HDR + u32::from(a),
        },
    }
}

pub(super) fn rx_table(chains: &[RxChain]) -> Table {
    let mut t = Table::default();
    for c in chains {
        let i = t.next();
        let slot = RX_SLOTS + 0x200 * u64::from(i);
        let descs = match c {
            RxChain::Single(n) => vec![Desc {
                addr: slot,
                len: HDR + 468 - u32::from(*n) % 469,
                flags: F_WRITE,
                next: 0,
            }],
            RxChain::Split {
                hdr_extra,
                data,
                large,
            } => vec![
                Desc {
                    addr: slot,
                    len: HDR + u32::from(hdr_extra % 16),
                    flags: F_WRITE | F_NEXT,
                    next: i + 1,
                },
                match large {
                    true => Desc {
                        addr: LARGE,
                        len: 0x1_0000 - u32::from(*data),
                        flags: F_WRITE,
                        next: 0,
                    },
                    false => Desc {
                        addr: slot + 0x200,
                        len: 0x200 - u32::from(*data) % 0x201,
                        flags: F_WRITE,
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

pub(super) fn event_table(chains: &[EvChain]) -> Table {
    let mut t = Table::default();
    for c in chains.iter().take(usize::from(QSIZE)) {
        let i = t.next();
        t.starts.push(i);
        t.descs.push(match c {
            EvChain::Slot(n) => Desc {
                addr: EV_SLOTS + 0x10 * u64::from(i),
                len: 16 - u32::from(*n) % 17,
                flags: F_WRITE,
                next: 0,
            },
            EvChain::Raw(d) => raw(d),
        });
    }
    t
}

/// Head choice `sel`: under 240, the start of a chain; else a descriptor index.
pub(super) fn head(sel: u8, starts: &[u16]) -> u16 {
    if sel < 240 && !starts.is_empty() {
        starts[usize::from(sel) % starts.len()]
    } else {
        u16::from(sel) % QSIZE
    }
}
