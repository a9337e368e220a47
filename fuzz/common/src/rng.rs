//! `vmkit_virtio_rng::Rng`, activated directly on one split ring in guest memory that a
//! fuzzed driver fills, served through the real `process_queue`.
//!
//! The queue (2 to 64 entries, `EVENT_IDX` or not) sits in 128 KiB of guest memory in two
//! adjacent regions; the per-chain bound is fuzzed too. The driver adds chains built from
//! buffer lists (directly or through an indirect table; damaged only in hostile runs) or, in
//! hostile runs, writes raw descriptors, heads and available indices; it notifies the
//! device (`process_queue`) and resets it (re-activated at once on fresh rings).
//!
//! Oracles, besides "never panics":
//! - guest memory changes only in the used ring and device-writable buffers;
//! - every used element names a head below the queue size, and its length is at most the
//!   bound and at most the device-writable bytes of the chain as the table holds it;
//! - unless the device entered `DEVICE_NEEDS_RESET`, the counters grow by what the used
//!   ring shows (one request per used element, bytes the sum of their lengths);
//! - in behaving runs (no hostile write, no damage, no descriptor or buffer reused in
//!   flight): every posted chain is served, in order, with `min(writable bytes, bound)`
//!   bytes (the README: the bound is spread over the writable descriptors in order; virtio
//!   1.2 §5.4.6.1: one byte at least when there is room), the device changes exactly the
//!   first `len` writable bytes (a used length of 32 bytes or more that changed nothing is
//!   a lie) and nothing after them, and every counter matches the model (no refused chain);
//! - after the whole sequence, a reset and re-activation on fresh rings, a legitimate
//!   request is served in full.
//!
//! The driver-side bookkeeping ([`Mem`], [`Side`], [`Posted`]) is shared with the console
//! target.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use virtio_queue::{Queue, QueueT};
use vmkit_virtio::{ActivateContext, InterruptReason, NeedsReset, VirtioDevice, VirtioInterrupt};
use vmkit_virtio_rng::{Rng, RngConfig, RngStats, DEFAULT_MAX_BYTES_PER_CHAIN};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest::{Guest, WriteOracle};
use crate::ring::{
    Alloc, Buf, Damage, Desc, Form, Len, RawRing, Ring, F_INDIRECT, F_NEXT, F_WRITE,
};
use crate::virtqueue::{BufInput, ChainInput};

const REGION: u64 = 0x1_0000;
const RING_BASE: u64 = 0x0;
/// Where chains' buffers and indirect tables go (the rings sit below).
pub const DATA: Range<u64> = 0x1000..2 * REGION;
/// Buffer lengths are taken modulo this.
const MAX_BUF: u32 = 0x1000;

/// What the driver and the device do, in order.
#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    /// The driver adds a chain.
    Add(ChainInput),
    /// The driver writes hostile ring contents (hostile runs only).
    Raw(RawRing),
    /// The driver notifies the queue: the device serves what is available.
    Process,
    /// The driver resets the device and activates it again on fresh rings.
    Reset,
}

/// A run.
#[derive(Arbitrary, Debug, Clone)]
pub struct Input {
    /// Queue size: 2 << (this % 6).
    pub size_log: u8,
    /// Negotiate `EVENT_IDX`.
    pub event_idx: bool,
    /// Let the driver misbehave: without it, raw writes and damage are skipped and a chain
    /// is only added when its descriptors and buffers are free, so every request is checked
    /// against the model.
    pub hostile: bool,
    /// Byte guest memory starts as.
    pub fill: u8,
    /// `max_bytes_per_chain` (0: the default, 64 KiB).
    pub limit: u16,
    /// Up to 64 operations.
    #[arbitrary(with = crate::seeds::many::<Op, 64>)]
    pub ops: Vec<Op>,
}

/// What a run reached.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Requests the device completed before the recovery check.
    pub served: usize,
    /// Bytes the device wrote before the recovery check.
    pub bytes: u64,
    /// Requests checked against the model.
    pub checked: usize,
}

/// Runs `data` as an [`Input`].
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

/// Whether `data` gets at least one byte of entropy into a guest buffer before the
/// recovery check (the goal the generated seeds are selected for).
pub fn reaches_goal(data: &[u8]) -> bool {
    Input::arbitrary_take_rest(Unstructured::new(data)).is_ok_and(|i| run(&i).bytes > 0)
}

/// Runs one input.
pub fn run(input: &Input) -> Report {
    let size: u16 = 2 << (input.size_log % 6);
    let limit = match input.limit {
        0 => DEFAULT_MAX_BYTES_PER_CHAIN,
        n => u32::from(n),
    };
    let config = RngConfig {
        max_bytes_per_chain: limit,
    };
    let mut h = Harness {
        mem: Mem::new(input.fill, !input.hostile),
        sides: Vec::new(),
        dev: Rng::new(config).expect("a nonzero bound"),
        needs_reset: NeedsReset::new(),
        irq: Arc::new(Irq::default()),
        size,
        limit,
        input,
        report: Report::default(),
    };
    h.reset();
    for op in input.ops.iter().take(64) {
        h.step(op);
    }
    h.mem.check("rng");
    h.recover();
    h.mem.check("rng, recovery");
    h.report
}

struct Harness<'a> {
    mem: Mem,
    sides: Vec<Side>,
    dev: Rng,
    needs_reset: NeedsReset,
    irq: Arc<Irq>,
    size: u16,
    limit: u32,
    input: &'a Input,
    report: Report,
}

impl Harness<'_> {
    fn step(&mut self, op: &Op) {
        match op {
            Op::Add(c) => {
                self.mem.post(&mut self.sides, 0, c);
            }
            Op::Raw(r) if self.input.hostile => {
                let ring = &mut self.sides[0].ring;
                ring.add_raw(&self.mem.g, &mut self.mem.oracle, &DATA, r);
            }
            Op::Raw(_) => {}
            Op::Process => self.process(),
            Op::Reset => self.reset(),
        }
    }

    /// Resets the device (if active) and activates it on a fresh ring.
    fn reset(&mut self) {
        let _ = self.dev.reset();
        self.sides = vec![Side::new(&mut self.mem, RING_BASE, self.size)];
        let (needs_reset, _) = activate(
            &mut self.dev,
            &self.mem,
            &self.sides,
            self.input.event_idx,
            self.irq.clone(),
        );
        self.needs_reset = needs_reset;
    }

    /// Notifies the queue and judges what the device did.
    fn process(&mut self) {
        let before = self.dev.stats();
        self.dev.process_queue(0);
        let after = self.dev.stats();
        let (added, used) = self.sides[0].ring.take_used(&self.mem.g);
        let side = &self.sides[0];
        for &(id, len) in &used {
            assert!(len <= self.limit, "used length {len} above the bound");
            check_used(&self.mem, side, id, len, "rng");
        }
        let total: u64 = used.iter().map(|&(_, len)| u64::from(len)).sum();
        self.report.served += usize::from(added);
        self.report.bytes += total;
        if !self.needs_reset.is_set() {
            assert_eq!(after.requests - before.requests, u64::from(added));
            assert_eq!(after.bytes - before.bytes, total, "bytes counted");
        }
        if self.input.hostile {
            self.sides[0].posted.clear();
        } else {
            self.check_model(before, after, &used);
        }
    }

    /// A behaving driver's chains are all served, in order, as [`expected_len`] says.
    fn check_model(&mut self, before: RngStats, after: RngStats, used: &[(u32, u32)]) {
        let posted = self.sides[0].take_posted();
        assert_eq!(used.len(), posted.len(), "posted chains and used elements");
        let mut readable = 0;
        for (p, &(id, len)) in posted.iter().zip(used) {
            assert_eq!(id, u32::from(p.head), "chains completed out of order");
            let (want, met) = expected_len(&p.descs, self.limit);
            assert_eq!(len, want, "chain {id}: used length");
            readable += met;
            if len >= 32 {
                assert!(
                    !unchanged_prefix(&self.mem.g, &p.descs, len),
                    "chain {id}: used length {len} but no byte changed"
                );
            }
            check_writes(&self.mem.g, &p.descs, len, None);
        }
        self.report.checked += posted.len();
        assert_eq!(after.bad_chains, before.bad_chains, "a good chain refused");
        assert_eq!(after.entropy_errors, before.entropy_errors);
        let met = after.readable_descriptors - before.readable_descriptors;
        assert_eq!(met, readable, "readable descriptors counted");
    }

    /// After everything: reset, fresh rings, one 64-byte request, served in full.
    fn recover(&mut self) {
        let (served, bytes) = (self.report.served, self.report.bytes);
        self.reset();
        let chain = ChainInput {
            bufs: vec![BufInput {
                len: Len::Small(64),
                writable: true,
            }],
            form: Form::Direct,
            damage: Damage::None,
        };
        let posted = self
            .mem
            .post(&mut self.sides, 0, &chain)
            .expect("a fresh ring takes a chain");
        let before = self.dev.stats();
        self.dev.process_queue(0);
        let (added, used) = self.sides[0].ring.take_used(&self.mem.g);
        let want = 64.min(self.limit);
        assert_eq!(
            (added, used),
            (1, vec![(u32::from(posted.head), want)]),
            "a legitimate request after reset"
        );
        assert_eq!(self.dev.stats().bytes - before.bytes, u64::from(want));
        check_writes(&self.mem.g, &posted.descs, want, None);
        (self.report.served, self.report.bytes) = (served, bytes);
    }
}

/// The used length the device owes a chain, and how many readable descriptors it meets:
/// writable descriptors in order, each filled up to the bound left; the walk stops when
/// the bound is reached.
fn expected_len(descs: &[Desc], limit: u32) -> (u32, u64) {
    let (mut written, mut readable) = (0u32, 0u64);
    for d in descs {
        if d.flags & F_WRITE == 0 {
            readable += 1;
            continue;
        }
        let room = limit - written;
        if room == 0 {
            break;
        }
        written += d.len.min(room);
    }
    (written, readable)
}

/// Whether the first `len` writable bytes of `descs` all read as the driver left them.
fn unchanged_prefix(g: &Guest, descs: &[Desc], len: u32) -> bool {
    let shadow = g.expected();
    let mut left = len as usize;
    for d in descs.iter().filter(|d| d.flags & F_WRITE != 0) {
        let k = left.min(d.len as usize);
        let mut now = vec![0u8; k];
        g.mem_read(d.addr, &mut now);
        let start = d.addr as usize;
        if now != shadow[start..start + k] {
            return false;
        }
        left -= k;
    }
    true
}

/// Checks that the device changed the writable buffers of `descs` only in their first
/// `len` bytes (in order) and, if `content` is given, that those bytes are `content`;
/// then takes the buffers as they are as what memory should hold (the chain is done).
pub fn check_writes(g: &Guest, descs: &[Desc], len: u32, content: Option<&[u8]>) {
    let shadow = g.expected();
    let (mut left, mut off) = (len as usize, 0usize);
    let mut seen = Vec::new();
    for d in descs.iter().filter(|d| d.flags & F_WRITE != 0) {
        let n = d.len as usize;
        let mut now = vec![0u8; n];
        g.mem_read(d.addr, &mut now);
        let start = d.addr as usize;
        let was = &shadow[start..start + n];
        let k = left.min(n);
        if let Some(c) = content {
            assert_eq!(
                &now[..k],
                &c[off..off + k],
                "buffer {:#x}: contents",
                d.addr
            );
        }
        assert!(
            now[k..] == was[k..],
            "buffer {:#x}+{n:#x}: written past the used length ({k} of it used)",
            d.addr
        );
        left -= k;
        off += k;
        seen.push((d.addr, now));
    }
    drop(shadow);
    assert_eq!(left, 0, "used length {len} above the writable bytes");
    // The chain is back with the driver: what the device wrote is now what memory should
    // hold, so a later chain over the same buffers (they are free again) is judged
    // against it, not against the bytes from before.
    for (addr, now) in seen {
        g.write(addr, &now);
    }
}

/// Checks a used element against the chain as the table holds it: a head below the queue
/// size, a length within the chain's device-writable bytes (skipped when a writable buffer
/// covers a table, which the device may then have rewritten).
pub fn check_used(mem: &Mem, side: &Side, id: u32, len: u32, what: &str) {
    let size = side.ring.size;
    assert!(
        id < u32::from(size),
        "{what}: used id {id}, queue size {size}"
    );
    if mem.oracle.self_modifying() {
        return;
    }
    let room = writable_bytes(&mem.g, &side.ring, id as u16);
    assert!(
        u64::from(len) <= room,
        "{what}: chain {id} completed with {len} bytes, {room} writable"
    );
}

fn read_desc(g: &Guest, at: u64) -> Desc {
    let mut b = [0u8; 16];
    g.mem_read(at, &mut b);
    Desc {
        addr: u64::from_le_bytes(b[..8].try_into().unwrap_or_default()),
        len: u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()),
        flags: u16::from_le_bytes([b[12], b[13]]),
        next: u16::from_le_bytes([b[14], b[15]]),
    }
}

/// The device-writable bytes of chain `head`, walked as virtio-queue walks it (at most a
/// table's worth of descriptors, an indirect table ending the chain); an upper bound for
/// a malformed chain, which must be completed with 0.
fn writable_bytes(g: &Guest, ring: &Ring, head: u16) -> u64 {
    let (mut total, mut i) = (0u64, head);
    for _ in 0..ring.size {
        if i >= ring.size {
            break;
        }
        let d = read_desc(g, ring.desc + 16 * u64::from(i));
        if d.flags & F_INDIRECT != 0 {
            return total + table_writable(g, d);
        }
        if d.flags & F_WRITE != 0 {
            total += u64::from(d.len);
        }
        if d.flags & F_NEXT == 0 {
            break;
        }
        i = d.next;
    }
    total
}

fn table_writable(g: &Guest, table: Desc) -> u64 {
    let n = u64::from(table.len / 16).min(g.size() / 16);
    let (mut total, mut i) = (0u64, 0u64);
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        // A loop makes the chain malformed (completed with 0): stop at the first repeat.
        if i >= n || std::mem::replace(&mut seen[i as usize], true) {
            break;
        }
        let d = read_desc(g, table.addr.saturating_add(16 * i));
        if d.flags & F_WRITE != 0 {
            total += u64::from(d.len);
        }
        if d.flags & F_NEXT == 0 {
            break;
        }
        i = u64::from(d.next);
    }
    total
}

/// Counts queue interrupts.
#[derive(Default, Debug)]
pub struct Irq(pub AtomicU64);

impl VirtioInterrupt for Irq {
    fn trigger(&self, reason: InterruptReason) -> std::io::Result<()> {
        if let InterruptReason::Queue(_) = reason {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Activates `dev` on `sides` (queue `i` is `sides[i]`); returns its `DEVICE_NEEDS_RESET`
/// flag and a clone of each queue's notifier.
pub fn activate<D: VirtioDevice>(
    dev: &mut D,
    mem: &Mem,
    sides: &[Side],
    event_idx: bool,
    irq: Arc<Irq>,
) -> (NeedsReset, Vec<EventFd>) {
    let mut queues = Vec::new();
    let mut notifiers = Vec::new();
    for (i, s) in sides.iter().enumerate() {
        let fd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        notifiers.push(fd.try_clone().expect("eventfd clone"));
        queues.push((i as u16, s.queue(event_idx), fd));
    }
    let features = (1u64 << 32) | (u64::from(event_idx) << 29);
    let needs_reset = NeedsReset::new();
    let ctx = ActivateContext::new(
        mem.g.mem.clone(),
        features,
        queues,
        irq,
        needs_reset.clone(),
    );
    dev.activate(ctx).expect("activation of a reset device");
    (needs_reset, notifiers)
}

/// A chain the driver made available and has not had back.
#[derive(Debug, Clone)]
pub struct Posted {
    /// Its head.
    pub head: u16,
    /// Its descriptors as written (inside the indirect table for an indirect chain).
    pub descs: Vec<Desc>,
    /// Table slots it holds.
    pub slots: usize,
    /// Its indirect table.
    pub table: Option<Range<u64>>,
}

impl Posted {
    /// Its buffers' and indirect table's ranges.
    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let bufs = self
            .descs
            .iter()
            .map(|d| d.addr..d.addr.saturating_add(u64::from(d.len)));
        bufs.chain(self.table.clone())
    }

    /// Its device-writable bytes.
    pub fn writable(&self) -> u64 {
        let w = self.descs.iter().filter(|d| d.flags & F_WRITE != 0);
        w.map(|d| u64::from(d.len)).sum()
    }
}

/// One queue as the driver sees it.
#[derive(Debug)]
pub struct Side {
    /// The ring in guest memory.
    pub ring: Ring,
    /// Chains posted and not returned, oldest first (behaving runs).
    pub posted: VecDeque<Posted>,
    slots: usize,
}

impl Side {
    /// A fresh ring of `size` at `base` (indices zeroed), registered with `mem`.
    pub fn new(mem: &mut Mem, base: u64, size: u16) -> Self {
        let ring = Ring::at(base, size);
        mem.g.write(ring.avail, &[0; 4]);
        mem.g.write(ring.used, &[0; 4]);
        mem.register(&ring);
        Self {
            ring,
            posted: VecDeque::new(),
            slots: 0,
        }
    }

    /// A ready `Queue` on this ring.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let r = &self.ring;
        let mut q = Queue::new(r.size).expect("queue size is a power of two");
        q.set_desc_table_address(Some(r.desc as u32), Some(0));
        q.set_avail_ring_address(Some(r.avail as u32), Some(0));
        q.set_used_ring_address(Some(r.used as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    /// Takes the `n` oldest posted chains back (all of them if fewer).
    pub fn take_first(&mut self, n: usize) -> Vec<Posted> {
        let n = n.min(self.posted.len());
        let out: Vec<Posted> = self.posted.drain(..n).collect();
        self.slots -= out.iter().map(|p| p.slots).sum::<usize>();
        out
    }

    /// Takes every posted chain back.
    pub fn take_posted(&mut self) -> Vec<Posted> {
        self.take_first(usize::MAX)
    }
}

/// Guest memory, the write oracle and the data-area allocator.
///
/// In behaving runs the oracle is renewed whenever the allocator wraps (an epoch): the
/// guest is checked, the device's writes so far are accepted into the shadow, and the new
/// oracle allows only the used rings and the chains still posted. A later buffer over an
/// old indirect table then does not switch the check off, and a write into a buffer the
/// device already returned is caught.
#[derive(Debug)]
pub struct Mem {
    /// Guest memory.
    pub g: Guest,
    /// The write oracle.
    pub oracle: WriteOracle,
    alloc: Alloc,
    cursor: u64,
    careful: bool,
    allowed: Vec<Range<u64>>,
    rings: Vec<Ring>,
}

impl Mem {
    /// Memory filled with `fill`; `careful`: a behaving driver (epochs, no reuse in flight).
    pub fn new(fill: u8, careful: bool) -> Self {
        Self {
            g: Guest::new(REGION, fill),
            oracle: WriteOracle::new(),
            alloc: Alloc::new(DATA),
            cursor: DATA.start,
            careful,
            allowed: Vec::new(),
            rings: Vec::new(),
        }
    }

    /// Tells the oracle about `ring`.
    pub fn register(&mut self, ring: &Ring) {
        ring.register(&mut self.oracle);
        self.allowed
            .push(ring.used..ring.used + 6 + 8 * u64::from(ring.size));
        if !self.rings.iter().any(|r| r.desc == ring.desc) {
            self.rings.push(ring.clone());
        }
    }

    /// Panics if the device wrote outside what the driver allowed.
    pub fn check(&self, what: &str) {
        self.oracle.check_guest(&self.g, what);
    }

    /// Adds `c` to `sides[which]` (undamaged and only where nothing posted is touched, for a
    /// careful driver, which otherwise waits: `None`).
    pub fn post(&mut self, sides: &mut [Side], which: usize, c: &ChainInput) -> Option<Posted> {
        let bufs: Vec<Buf> = c.bufs.iter().take(8).map(to_buf).collect();
        if bufs.is_empty() {
            return None;
        }
        let slots = if c.form == Form::Direct {
            bufs.len()
        } else {
            1
        };
        let damage = if self.careful { Damage::None } else { c.damage };
        if self.careful {
            let side = &sides[which];
            if side.slots + slots > usize::from(side.ring.size) {
                return None; // a careful driver waits for descriptors
            }
            let (ranges, wraps) = self.plan(&bufs, c.form);
            if wraps {
                self.new_epoch(sides);
            }
            let busy: Vec<Range<u64>> = sides
                .iter()
                .flat_map(|s| s.posted.iter().flat_map(Posted::ranges))
                .collect();
            if ranges.iter().any(|r| busy.iter().any(|b| overlap(r, b))) {
                return None; // nor does it reuse a buffer in flight
            }
            self.cursor = ranges.last().map_or(self.cursor, |r| r.end);
        }
        let side = &mut sides[which];
        let (head, descs) = side.ring.add_chain(
            &self.g,
            &mut self.oracle,
            &mut self.alloc,
            &bufs,
            c.form,
            damage,
        );
        let table = (c.form == Form::Indirect).then(|| {
            let t = read_desc(&self.g, side.ring.desc + 16 * u64::from(head));
            t.addr..t.addr.saturating_add(u64::from(t.len))
        });
        for d in descs.iter().filter(|d| d.flags & F_WRITE != 0) {
            self.allowed
                .push(d.addr..d.addr.saturating_add(u64::from(d.len)));
        }
        let p = Posted {
            head,
            descs,
            slots,
            table,
        };
        side.slots += slots;
        side.posted.push_back(p.clone());
        Some(p)
    }

    /// Where the allocator would put the buffers (then the indirect table), and whether it
    /// wraps on the way.
    fn plan(&self, bufs: &[Buf], form: Form) -> (Vec<Range<u64>>, bool) {
        let mut a = self.alloc.clone();
        let mut lens: Vec<u32> = bufs.iter().map(|b| b.len).collect();
        if form == Form::Indirect {
            lens.push(16 * bufs.len() as u32);
        }
        let (mut cursor, mut wraps, mut out) = (self.cursor, false, Vec::new());
        for len in lens {
            let at = a.take(len);
            wraps |= at < cursor;
            cursor = at + u64::from(len);
            out.push(at..cursor);
        }
        (out, wraps)
    }

    /// Checks the guest, accepts the device's writes so far, and starts an oracle that
    /// allows only the used rings and what is still posted.
    fn new_epoch(&mut self, sides: &[Side]) {
        self.check("epoch");
        for r in std::mem::take(&mut self.allowed) {
            let mut now = vec![0u8; (r.end - r.start) as usize];
            if self.g.mem_read(r.start, &mut now) {
                self.g.write(r.start, &now);
            }
        }
        self.oracle = WriteOracle::new();
        for ring in std::mem::take(&mut self.rings) {
            self.register(&ring);
        }
        for p in sides.iter().flat_map(|s| s.posted.iter()) {
            for d in p.descs.iter().filter(|d| d.flags & F_WRITE != 0) {
                self.oracle.allow(d.addr, u64::from(d.len));
                self.allowed
                    .push(d.addr..d.addr.saturating_add(u64::from(d.len)));
            }
            if let Some(t) = &p.table {
                self.oracle.control(t.start, t.end - t.start);
            }
        }
        self.cursor = DATA.start;
    }
}

fn to_buf(b: &BufInput) -> Buf {
    Buf {
        addr: None,
        len: b.len.get() % MAX_BUF,
        writable: b.writable,
    }
}

fn overlap(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(bufs: &[(u16, bool)], form: Form) -> Op {
        Op::Add(ChainInput {
            bufs: bufs
                .iter()
                .map(|&(n, w)| BufInput {
                    len: Len::Medium(n),
                    writable: w,
                })
                .collect(),
            form,
            damage: Damage::None,
        })
    }

    fn input(limit: u16, hostile: bool, ops: Vec<Op>) -> Input {
        Input {
            size_log: 3,
            event_idx: false,
            hostile,
            fill: 0xA5,
            limit,
            ops,
        }
    }

    #[test]
    fn behaving_chains_get_their_writable_bytes_up_to_the_bound() {
        let ops = vec![
            chain(&[(16, false), (100, true), (50, true)], Form::Direct),
            chain(&[(300, true)], Form::Indirect),
            chain(&[(8, false)], Form::Direct),
            Op::Process,
            chain(&[(64, true)], Form::Direct),
            Op::Reset,
            chain(&[(64, true)], Form::Direct),
            Op::Process,
        ];
        let r = run(&input(0, false, ops.clone()));
        assert_eq!((r.served, r.checked, r.bytes), (4, 4, 150 + 300 + 64));
        // A bound of 120 spans the first chain's two writable descriptors.
        let r = run(&input(120, false, ops));
        assert_eq!((r.served, r.checked, r.bytes), (4, 4, 120 + 120 + 64));
    }

    #[test]
    fn a_zero_length_writable_descriptor_does_not_end_the_request() {
        let ops = vec![chain(&[(0, true), (40, true)], Form::Direct), Op::Process];
        let r = run(&input(0, false, ops));
        assert_eq!((r.checked, r.bytes), (1, 40));
    }

    #[test]
    fn epochs_keep_the_write_oracle_on() {
        // 40 chains of 3 KiB cycle the 124 KiB data area several times.
        let mut ops = Vec::new();
        for _ in 0..32 {
            ops.extend([chain(&[(3000, true)], Form::Indirect), Op::Process]);
        }
        let r = run(&input(0, false, ops));
        assert_eq!((r.served, r.checked, r.bytes), (32, 32, 32 * 3000));
    }

    #[test]
    fn hostile_rings_are_survived_and_the_device_recovers() {
        let raw = RawRing {
            descs: vec![crate::ring::RawDesc {
                addr: crate::ring::Addr::NearEnd(8),
                len: Len::Small(64),
                flags: F_WRITE as u8,
                next: 0,
                wild_next: false,
            }],
            heads: vec![0, 0, 9],
            skew: crate::ring::Skew::Any(1000),
            avail_flags: 0,
            used_event: 0,
        };
        let ops = vec![Op::Raw(raw), Op::Process, Op::Process];
        run(&input(0, true, ops));
    }

    #[test]
    fn the_used_length_bound_can_fail() {
        let mut mem = Mem::new(0, true);
        let mut sides = vec![Side::new(&mut mem, RING_BASE, 8)];
        let c = ChainInput {
            bufs: vec![BufInput {
                len: Len::Small(10),
                writable: true,
            }],
            form: Form::Indirect,
            damage: Damage::None,
        };
        let p = mem.post(&mut sides, 0, &c).expect("posted");
        check_used(&mem, &sides[0], u32::from(p.head), 10, "t");
        let over = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_used(&mem, &sides[0], 0, 11, "t")
        }));
        assert!(over.is_err());
        let id = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_used(&mem, &sides[0], 8, 0, "t")
        }));
        assert!(id.is_err());
    }

    #[test]
    fn regressions() {
        let dir = crate::replay::fuzz_dir().join("regressions/rng");
        let n = crate::replay::replay_dir("rng", &dir, usize::MAX, fuzz);
        assert!(n >= 1, "the zero-length descriptor reproducer is kept");
    }

    #[test]
    fn the_generated_seeds_serve_entropy() {
        let reached = crate::seeds::for_target("rng")
            .iter()
            .filter(|s| reaches_goal(s))
            .count();
        assert!(reached >= 16, "only {reached} seeds serve a request");
    }
}
