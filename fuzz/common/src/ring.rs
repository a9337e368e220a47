//! Virtqueues in guest memory, written the way a driver (or a hostile one) writes them.
//!
//! [`Ring`] is the driver's view of one split virtqueue: it writes descriptors, indirect
//! tables and available-ring entries into [`Guest`] memory, tells the [`WriteOracle`] which
//! buffers it made device-writable, and reads back the used ring. Two ways to fill it:
//! - [`Ring::add_chain`] lays out a chain of buffers from a list of [`Buf`]s, directly in the
//!   table or through an indirect table, then applies an optional [`Damage`] (a flipped
//!   direction, a bad length or address, a `next` out of the table, a loop): the inputs
//!   request builders make, so most runs carry requests a device accepts;
//! - [`Ring::add_raw`] writes arbitrary [`RawDesc`]s and heads, with an available index that
//!   may run ahead of what was written, and arbitrary ring flags and `used_event`.

use arbitrary::Arbitrary;

use crate::guest::{Guest, WriteOracle};

/// `VIRTQ_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
pub const F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`.
pub const F_INDIRECT: u16 = 4;

/// One descriptor as it sits in a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Desc {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `F_*` flags.
    pub flags: u16,
    /// The next descriptor's index (with `F_NEXT`).
    pub next: u16,
}

impl Desc {
    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// A fuzzed guest address: mostly in the data area, sometimes close to the end of memory
/// (so buffers run past it), sometimes anything.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr {
    /// An offset into the data area (taken modulo its size).
    Data(u16),
    /// This many bytes before the end of guest memory.
    NearEnd(u16),
    /// Any address.
    Any(u64),
}

impl Addr {
    /// The address, for a data area of `data` and guest memory ending at `end`.
    pub fn resolve(self, data: &std::ops::Range<u64>, end: u64) -> u64 {
        match self {
            Addr::Data(o) => {
                let span = data.end.saturating_sub(data.start).max(1);
                data.start + u64::from(o) % span
            }
            Addr::NearEnd(b) => end.saturating_sub(u64::from(b)),
            Addr::Any(a) => a,
        }
    }
}

/// A fuzzed length: mostly small, sometimes whole sectors, sometimes anything.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Len {
    /// 0–255 bytes.
    Small(u8),
    /// A multiple of 512 bytes (0–127 sectors).
    Sectors(u8),
    /// 0–65535 bytes.
    Medium(u16),
    /// Any length.
    Any(u32),
}

impl Len {
    /// The length in bytes.
    pub fn get(self) -> u32 {
        match self {
            Len::Small(n) => u32::from(n),
            Len::Sectors(n) => u32::from(n & 0x7F) * 512,
            Len::Medium(n) => u32::from(n),
            Len::Any(n) => n,
        }
    }
}

/// A descriptor written as the input says, flags and `next` included.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct RawDesc {
    /// Where the buffer is.
    pub addr: Addr,
    /// Its length.
    pub len: Len,
    /// `NEXT`, `WRITE`, `INDIRECT` bits (and any others) as given.
    pub flags: u8,
    /// The next index (taken modulo the queue size, or as given when `wild_next`).
    pub next: u8,
    /// Leave `next` unreduced (it may then point outside the table).
    pub wild_next: bool,
}

/// Hostile ring contents: descriptors, heads, an available index that may run ahead.
#[derive(Arbitrary, Clone, Debug)]
pub struct RawRing {
    /// Descriptors, from index 0.
    #[arbitrary(with = crate::seeds::up_to::<RawDesc, 16>)]
    pub descs: Vec<RawDesc>,
    /// Heads pushed on the available ring (taken modulo the queue size).
    #[arbitrary(with = crate::seeds::up_to::<u8, 16>)]
    pub heads: Vec<u8>,
    /// Moves the available index after the heads (a driver running ahead, or behind).
    pub skew: Skew,
    /// The available ring's flags (`NO_INTERRUPT` is bit 0).
    pub avail_flags: u16,
    /// The `used_event` field (read by a device with `EVENT_IDX`).
    pub used_event: u16,
}

/// How far a hostile driver moves the available index past the heads it wrote.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skew {
    /// Not at all.
    Exact,
    /// 0–3 entries ahead (stale entries become available).
    Ahead(u8),
    /// Anywhere (far ahead of the device is a corrupt ring).
    Any(u16),
}

impl Skew {
    /// The amount added to the available index.
    pub fn get(self) -> u16 {
        match self {
            Skew::Exact => 0,
            Skew::Ahead(n) => u16::from(n % 4),
            Skew::Any(n) => n,
        }
    }
}

/// One buffer of a chain a builder lays out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Where it is (`None`: allocated in the data area).
    pub addr: Option<u64>,
    /// Its length.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

impl Buf {
    /// A device-readable buffer of `len` bytes at a fresh place in the data area.
    pub fn read(len: u32) -> Self {
        Self {
            addr: None,
            len,
            writable: false,
        }
    }

    /// A device-writable buffer of `len` bytes at a fresh place in the data area.
    pub fn write(len: u32) -> Self {
        Self {
            addr: None,
            len,
            writable: true,
        }
    }
}

/// How a chain is laid out.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// Descriptors in the ring's table.
    Direct,
    /// One table descriptor pointing at an indirect table in the data area.
    Indirect,
}

/// A fault a request builder may put in a chain it otherwise lays out correctly. Indices
/// are taken modulo the chain's length.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Damage {
    /// None: a well-formed chain.
    None,
    /// Flip descriptor i's direction.
    FlipDirection(u8),
    /// Set descriptor i's length.
    Length(u8, Len),
    /// Move descriptor i's buffer.
    Address(u8, Addr),
    /// Point descriptor i's `next` at any index (taken as given).
    Next(u8, u16),
    /// Make the last descriptor chain back to the first (a loop).
    Loop,
    /// Drop the last descriptor (the chain ends early).
    Truncate,
    /// Set `INDIRECT` on descriptor i too (an indirect table naming another, or a table
    /// descriptor that also chains).
    Indirect(u8),
}

/// A bump allocator over the data area; wraps to its start when full (buffers of later
/// chains may then overlap earlier ones, as a careless driver's would).
#[derive(Clone, Debug)]
pub struct Alloc {
    area: std::ops::Range<u64>,
    next: u64,
}

impl Alloc {
    /// Allocates from `area`.
    pub fn new(area: std::ops::Range<u64>) -> Self {
        Self {
            next: area.start,
            area,
        }
    }

    /// The area.
    pub fn area(&self) -> &std::ops::Range<u64> {
        &self.area
    }

    /// Whether the next `len` bytes would start over at the area's start.
    pub fn would_wrap(&self, len: u64) -> bool {
        ((self.next + 15) & !15).saturating_add(len) > self.area.end
    }

    /// Starts handing out from the area's start again (nothing earlier is in use).
    pub fn reset(&mut self) {
        self.next = self.area.start;
    }

    /// `len` bytes, 16-byte aligned; buffers larger than the area start at its start.
    pub fn take(&mut self, len: u32) -> u64 {
        let len = u64::from(len);
        let aligned = (self.next + 15) & !15;
        let at = if aligned + len <= self.area.end {
            aligned
        } else {
            self.area.start
        };
        self.next = at.saturating_add(len).min(self.area.end);
        at
    }
}

/// The driver's side of one split virtqueue in guest memory.
#[derive(Clone, Debug)]
pub struct Ring {
    /// Entries.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    avail_idx: u16,
    next_desc: u16,
    seen_used: u16,
}

impl Ring {
    /// A queue of `size` entries (a power of two) with its three areas packed from `base`:
    /// table, available ring, then the used ring 4-byte aligned.
    pub fn at(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Self::new(size, desc, avail, used)
    }

    /// A queue whose areas the caller placed.
    pub fn new(size: u16, desc: u64, avail: u64, used: u64) -> Self {
        Self {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            next_desc: 0,
            seen_used: 0,
        }
    }

    /// Bytes from `base` that [`Ring::at`] uses for a queue of `size`.
    pub fn footprint(size: u16) -> u64 {
        let r = Self::at(0, size);
        r.used + 6 + 8 * u64::from(size)
    }

    /// The table slot the next [`add_chain`](Self::add_chain) starts at.
    pub fn next_desc_slot(&self) -> usize {
        usize::from(self.next_desc)
    }

    /// Tells `oracle` the used ring may change and the table and available ring are orders.
    pub fn register(&self, oracle: &mut WriteOracle) {
        let n = u64::from(self.size);
        oracle.allow(self.used, 6 + 8 * n);
        oracle.control(self.desc, 16 * n);
        oracle.control(self.avail, 6 + 2 * n);
    }

    /// Writes descriptor `index` of the table.
    pub fn write_desc(&self, g: &Guest, index: u16, d: Desc) {
        g.write(self.desc + 16 * u64::from(index), &d.bytes());
    }

    /// Pushes `head` on the available ring and publishes the new index.
    pub fn publish(&mut self, g: &Guest, head: u16) {
        let slot = u64::from(self.avail_idx % self.size.max(1));
        g.write(self.avail + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        g.write(self.avail + 2, &self.avail_idx.to_le_bytes());
    }

    /// Moves the available index by `n` without writing entries (a driver running ahead of
    /// what it wrote) and publishes it.
    pub fn advance_avail(&mut self, g: &Guest, n: u16) {
        self.avail_idx = self.avail_idx.wrapping_add(n);
        g.write(self.avail + 2, &self.avail_idx.to_le_bytes());
    }

    /// Sets the available ring's flags.
    pub fn set_avail_flags(&self, g: &Guest, flags: u16) {
        g.write(self.avail, &flags.to_le_bytes());
    }

    /// Sets `used_event` (after the available ring's entries).
    pub fn set_used_event(&self, g: &Guest, value: u16) {
        g.write(
            self.avail + 4 + 2 * u64::from(self.size),
            &value.to_le_bytes(),
        );
    }

    /// The used ring's index as the device left it.
    pub fn used_idx(&self, g: &Guest) -> u16 {
        g.read_u16(self.used + 2)
    }

    /// The used elements added since the last call: `(id, len)`, at most `size` of them (a
    /// device that moved the index further is reported by the count, see the return).
    pub fn take_used(&mut self, g: &Guest) -> (u16, Vec<(u32, u32)>) {
        let idx = self.used_idx(g);
        let added = idx.wrapping_sub(self.seen_used);
        let n = added.min(self.size);
        let mut out = Vec::with_capacity(usize::from(n));
        for i in 0..n {
            let slot = u64::from(self.seen_used.wrapping_add(i) % self.size.max(1));
            let at = self.used + 4 + 8 * slot;
            out.push((g.read_u32(at), g.read_u32(at + 4)));
        }
        self.seen_used = idx;
        (added, out)
    }

    /// Lays out `bufs` as one chain (see [`Damage`]), publishes it, and returns its head and
    /// the descriptors as written (after the damage). Writable buffers and indirect tables
    /// are told to `oracle`.
    pub fn add_chain(
        &mut self,
        g: &Guest,
        oracle: &mut WriteOracle,
        alloc: &mut Alloc,
        bufs: &[Buf],
        form: Form,
        damage: Damage,
    ) -> (u16, Vec<Desc>) {
        let mut descs: Vec<Desc> = bufs
            .iter()
            .map(|b| Desc {
                addr: b.addr.unwrap_or_else(|| alloc.take(b.len)),
                len: b.len,
                flags: if b.writable { F_WRITE } else { 0 },
                next: 0,
            })
            .collect();
        let n = descs.len();
        // Chain them: in the table from the next free slot, or 0.. in an indirect table.
        let first = match form {
            Form::Direct => self.next_desc,
            Form::Indirect => 0,
        };
        let size = match form {
            Form::Direct => self.size.max(1),
            Form::Indirect => u16::MAX,
        };
        for (i, d) in descs.iter_mut().enumerate() {
            if i + 1 < n {
                d.flags |= F_NEXT;
                d.next = first.wrapping_add(i as u16 + 1) % size;
            }
        }
        apply(&mut descs, damage, first, alloc.area(), g.size());
        // As the device will read them: a descriptor the damage made INDIRECT points at a
        // "table" (whatever its buffer holds) whose writable entries the device may use.
        for d in &descs {
            self.allow_desc(g, oracle, *d);
        }
        let head = match form {
            Form::Direct => {
                for (i, d) in descs.iter().enumerate() {
                    self.write_desc(g, first.wrapping_add(i as u16) % size, *d);
                }
                self.next_desc = first.wrapping_add(n.max(1) as u16) % size;
                first
            }
            Form::Indirect => {
                let len = 16 * n as u32;
                let table = alloc.take(len);
                for (i, d) in descs.iter().enumerate() {
                    g.write(table + 16 * i as u64, &d.bytes());
                }
                oracle.control(table, u64::from(len));
                let head = self.next_desc;
                let td = Desc {
                    addr: table,
                    len,
                    flags: F_INDIRECT,
                    next: 0,
                };
                self.write_desc(g, head, td);
                self.next_desc = (head + 1) % self.size.max(1);
                head
            }
        };
        self.publish(g, head);
        (head, descs)
    }

    /// Writes hostile ring contents from the table's start: every descriptor as given, the
    /// heads, then the available index moved by `extra_avail`. Writable buffers, including
    /// those of indirect tables as guest memory holds them now, are told to `oracle`.
    pub fn add_raw(
        &mut self,
        g: &Guest,
        oracle: &mut WriteOracle,
        data: &std::ops::Range<u64>,
        raw: &RawRing,
    ) {
        let size = self.size.max(1);
        for (i, r) in raw.descs.iter().take(usize::from(size)).enumerate() {
            let d = Desc {
                addr: r.addr.resolve(data, g.size()),
                len: r.len.get(),
                flags: u16::from(r.flags),
                next: if r.wild_next {
                    u16::from(r.next)
                } else {
                    u16::from(r.next) % size
                },
            };
            self.write_desc(g, i as u16, d);
            self.allow_desc(g, oracle, d);
        }
        for h in raw.heads.iter().take(usize::from(size)) {
            self.publish(g, u16::from(*h) % size);
        }
        self.avail_idx = self.avail_idx.wrapping_add(raw.skew.get());
        g.write(self.avail + 2, &self.avail_idx.to_le_bytes());
        self.set_avail_flags(g, raw.avail_flags);
        self.set_used_event(g, raw.used_event);
    }

    fn allow_desc(&self, g: &Guest, oracle: &mut WriteOracle, d: Desc) {
        if d.flags & F_WRITE != 0 {
            oracle.allow(d.addr, u64::from(d.len));
        }
        if d.flags & F_INDIRECT != 0 {
            oracle.control(d.addr, u64::from(d.len));
            // Every writable entry of the table as memory holds it (read in one piece, as
            // much of it as lies in memory).
            let end = d.addr.saturating_add(u64::from(d.len)).min(g.size());
            let mut table = vec![0u8; end.saturating_sub(d.addr) as usize / 16 * 16];
            if table.is_empty() || !g.mem_read(d.addr, &mut table) {
                return;
            }
            for e in table.chunks_exact(16) {
                let flags = u16::from_le_bytes([e[12], e[13]]);
                if flags & F_WRITE != 0 {
                    let addr = u64::from_le_bytes(e[..8].try_into().unwrap_or_default());
                    let len = u32::from_le_bytes(e[8..12].try_into().unwrap_or_default());
                    oracle.allow(addr, u64::from(len));
                }
            }
        }
    }
}

fn apply(descs: &mut Vec<Desc>, damage: Damage, first: u16, data: &std::ops::Range<u64>, end: u64) {
    let n = descs.len();
    if n == 0 {
        return;
    }
    let at = |i: u8| usize::from(i) % n;
    match damage {
        Damage::None => {}
        Damage::FlipDirection(i) => descs[at(i)].flags ^= F_WRITE,
        Damage::Length(i, l) => descs[at(i)].len = l.get(),
        Damage::Address(i, a) => descs[at(i)].addr = a.resolve(data, end),
        Damage::Next(i, next) => {
            let d = &mut descs[at(i)];
            d.flags |= F_NEXT;
            d.next = next;
        }
        Damage::Loop => {
            let last = &mut descs[n - 1];
            last.flags |= F_NEXT;
            last.next = first;
        }
        Damage::Truncate => {
            descs.pop();
            if let Some(last) = descs.last_mut() {
                last.flags &= !F_NEXT;
            }
        }
        Damage::Indirect(i) => descs[at(i)].flags |= F_INDIRECT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_is_laid_out_linked_and_published() {
        let g = Guest::new(0x4000, 0);
        let mut o = WriteOracle::new();
        let mut r = Ring::at(0, 8);
        r.register(&mut o);
        let mut a = Alloc::new(0x1000..0x8000);
        let (head, d) = r.add_chain(
            &g,
            &mut o,
            &mut a,
            &[Buf::read(16), Buf::write(512), Buf::write(1)],
            Form::Direct,
            Damage::None,
        );
        assert_eq!(head, 0);
        assert_eq!(d[0].flags, F_NEXT);
        assert_eq!(d[1].flags, F_NEXT | F_WRITE);
        assert_eq!((d[1].next, d[2].flags), (2, F_WRITE));
        assert_eq!(g.read_u16(r.avail + 2), 1);
        assert_eq!(g.read_u16(r.avail + 4), 0);
        assert!(o.allows(d[1].addr) && !o.allows(d[0].addr));
        let (head, d) = r.add_chain(
            &g,
            &mut o,
            &mut a,
            &[Buf::write(8)],
            Form::Indirect,
            Damage::None,
        );
        assert_eq!(head, 3);
        assert_eq!(g.read_u16(r.avail + 6), 3);
        assert!(o.allows(d[0].addr));
    }
}
