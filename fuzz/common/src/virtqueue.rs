//! `vmkit_virtio::ActiveQueue`, the virtqueue protocol every vmkit device uses, driven as a
//! device would drive it, over a split ring a fuzzed driver fills.
//!
//! The queue (2 to 64 entries, `EVENT_IDX` or not) sits in 128 KiB of guest memory in two
//! adjacent regions. The driver adds chains built from buffer lists, laid out directly or
//! through an indirect table, sometimes damaged (a flipped direction, a bad length or
//! address, a wild `next`, a loop, an early end, a nested indirect flag), or writes hostile
//! descriptors, heads and available indices, flags and `used_event`. The "device" pops,
//! completes (the chain's writable length, or any head and length), gives a chain back
//! (`undo_pop`) and signals.
//!
//! Oracles, besides "never panics":
//! - every descriptor of a chain `pop` accepts lies inside guest memory, and a chain has at
//!   most as many descriptors as the queue has entries (direct) or its indirect table holds;
//! - while the driver has behaved (no hostile write, no damaged chain, no descriptor reused
//!   in flight): `pop` returns the chains in the order they were published, each with
//!   exactly the descriptors written (address, length, direction), and `None` only when all
//!   were taken; each `complete` adds one used element with that head and length;
//! - no lost wake-up: when `pop` finds the ring empty (no reset pending), notifications are
//!   on (with `EVENT_IDX`, `avail_event` equals the available index; without, the used
//!   ring's `NO_NOTIFY` flag is clear);
//! - `signal_used` interrupts exactly when the driver asked: with `EVENT_IDX` when the used
//!   index passed `used_event` since the last check (virtio 1.2 §2.7.10), without unless
//!   `NO_INTERRUPT` is set; and it reports what it did;
//! - guest memory changes only in the used ring and in device-writable buffers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use virtio_queue::{Queue, QueueT};
use vmkit_virtio::{ActivateContext, InterruptReason, NeedsReset, VirtioInterrupt};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest::{Guest, WriteOracle};
use crate::ring::{Alloc, Buf, Damage, Desc, Form, Len, RawRing, Ring, F_INDIRECT, F_WRITE};

const REGION: u64 = 0x1_0000;
const RING_BASE: u64 = 0x0;
const DATA: std::ops::Range<u64> = 0x1000..2 * REGION;

/// One buffer of a chain: a length and a direction.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct BufInput {
    /// Its length.
    pub len: Len,
    /// Device-writable.
    pub writable: bool,
}

/// A chain a driver adds.
#[derive(Arbitrary, Debug, Clone)]
pub struct ChainInput {
    /// Up to 8 buffers.
    #[arbitrary(with = crate::seeds::up_to::<BufInput, 8>)]
    pub bufs: Vec<BufInput>,
    /// Direct or indirect.
    pub form: Form,
    /// A fault, mostly none.
    pub damage: Damage,
}

/// What the driver and the device do, in order.
#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    /// The driver adds a chain.
    Add(ChainInput),
    /// The driver writes hostile ring contents.
    Raw(RawRing),
    /// The device pops a chain and, if asked, completes it with its writable length.
    Pop {
        /// Complete it at once.
        complete: bool,
    },
    /// The device pops a chain and gives it back.
    PopUndo,
    /// The device completes any head with any length.
    Complete(u16, u32),
    /// The device signals the driver.
    Signal,
    /// The driver sets `used_event`.
    UsedEvent(u16),
    /// The driver sets the available ring's flags.
    AvailFlags(u16),
}

/// A run.
#[derive(Arbitrary, Debug, Clone)]
pub struct Input {
    /// Queue size: 2 << (this % 6).
    pub size_log: u8,
    /// Negotiate `EVENT_IDX`.
    pub event_idx: bool,
    /// Let the driver misbehave: without it, hostile writes, damage and completions of
    /// arbitrary heads are skipped, so every chain is checked against the model.
    pub hostile: bool,
    /// Byte guest memory starts as.
    pub fill: u8,
    /// Up to 64 operations.
    #[arbitrary(with = crate::seeds::many::<Op, 64>)]
    pub ops: Vec<Op>,
}

/// Runs `data` as an [`Input`].
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

#[derive(Default)]
struct Irq(AtomicU64);

impl VirtioInterrupt for Irq {
    fn trigger(&self, reason: InterruptReason) -> std::io::Result<()> {
        if let InterruptReason::Queue(_) = reason {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The driver's model of the queue while it behaves.
struct Model {
    clean: bool,
    published: VecDeque<(u16, Vec<Desc>)>,
    in_use: Vec<bool>,
    last_checked_used: u16,
}

/// Whether `data` pops and checks at least one chain against the driver's model (the
/// goal the generated seeds are selected for).
pub fn reaches_goal(data: &[u8]) -> bool {
    Input::arbitrary_take_rest(Unstructured::new(data)).is_ok_and(|i| run(&i).checked > 0)
}

/// What a run reached (for the tests that check seeds and inputs get somewhere).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Chains popped whose descriptors were accepted.
    pub accepted: usize,
    /// Of those, chains checked against the driver's model.
    pub checked: usize,
    /// Interrupts raised by `signal_used`.
    pub interrupts: u64,
}

/// Runs one input.
pub fn run(input: &Input) -> Report {
    let size: u16 = 2 << (input.size_log % 6);
    let g = Guest::new(REGION, input.fill);
    let mut oracle = WriteOracle::new();
    let mut ring = Ring::at(RING_BASE, size);
    ring.register(&mut oracle);
    g.write(ring.avail, &[0; 4]);
    g.write(ring.used, &[0; 4]);
    let mut alloc = Alloc::new(DATA);
    let mut queue = Queue::new(size).expect("queue size is a power of two");
    queue.set_desc_table_address(Some(ring.desc as u32), Some(0));
    queue.set_avail_ring_address(Some(ring.avail as u32), Some(0));
    queue.set_used_ring_address(Some(ring.used as u32), Some(0));
    queue.set_event_idx(input.event_idx);
    queue.set_ready(true);
    let irq = Arc::new(Irq::default());
    let notifier = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let ctx = ActivateContext::new(
        g.mem.clone(),
        0,
        vec![(0, queue, notifier)],
        irq.clone(),
        NeedsReset::new(),
    );
    let mut ctx = ctx;
    let mut m = Model {
        clean: true,
        published: VecDeque::new(),
        in_use: vec![false; usize::from(size)],
        last_checked_used: 0,
    };
    let mut step = Step {
        g: &g,
        ring: &mut ring,
        oracle: &mut oracle,
        alloc: &mut alloc,
        irq: &irq,
        m: &mut m,
        report: Report::default(),
    };
    for op in input.ops.iter().take(64) {
        let q = ctx.queue_mut(0).expect("queue 0 is active");
        match op {
            Op::Raw(_) | Op::Complete(..) if !input.hostile => {}
            Op::Add(c) if !input.hostile => step.add(&ChainInput {
                damage: Damage::None,
                ..c.clone()
            }),
            _ => step.apply(q, op),
        }
    }
    let mut report = step.report;
    report.interrupts = irq.0.load(Ordering::Relaxed);
    oracle.check_guest(&g, "virtqueue");
    report
}

struct Step<'a> {
    g: &'a Guest,
    ring: &'a mut Ring,
    oracle: &'a mut WriteOracle,
    alloc: &'a mut Alloc,
    irq: &'a Arc<Irq>,
    m: &'a mut Model,
    report: Report,
}

type Active = vmkit_virtio::ActiveQueue<vm_memory::GuestMemoryMmap>;

impl Step<'_> {
    fn apply(&mut self, q: &mut Active, op: &Op) {
        match op {
            Op::Add(c) => self.add(c),
            Op::Raw(r) => {
                self.m.clean = false;
                self.ring.add_raw(self.g, self.oracle, &DATA, r);
            }
            Op::Pop { complete } => self.pop(q, *complete),
            Op::PopUndo => {
                let popped = matches!(q.pop(), Ok(Some(_)));
                if popped {
                    q.undo_pop();
                }
            }
            Op::Complete(head, len) => {
                self.m.clean = false;
                let _ = q.complete(*head, *len);
            }
            Op::Signal => self.signal(q),
            Op::UsedEvent(v) => self.ring.set_used_event(self.g, *v),
            Op::AvailFlags(f) => self.ring.set_avail_flags(self.g, *f),
        }
    }

    fn add(&mut self, c: &ChainInput) {
        let bufs: Vec<Buf> = c
            .bufs
            .iter()
            .take(8)
            .map(|b| Buf {
                addr: None,
                len: b.len.get() % 0x4000,
                writable: b.writable,
            })
            .collect();
        if bufs.is_empty() {
            return;
        }
        // A driver does not put a new indirect table over memory still in flight: when
        // the data area would start over, it waits until nothing is in flight.
        let need: u64 = bufs.iter().map(|b| u64::from(b.len) + 16).sum::<u64>() + 16 * 9;
        // (Once the model is off, wrapping over tables in flight is one more hostile act.)
        if self.m.clean && self.alloc.would_wrap(need) {
            if self.m.in_use.iter().any(|u| *u) {
                return;
            }
            self.alloc.reset();
        }
        let size = usize::from(self.ring.size);
        let slots = if c.form == Form::Direct {
            bufs.len()
        } else {
            1
        };
        let free = self.m.in_use.iter().filter(|u| !**u).count();
        if slots > free {
            return; // a correct driver waits for descriptors
        }
        let first = self.next_free();
        let contiguous = (0..slots).all(|i| !self.m.in_use[(first + i) % size]);
        let (head, descs) =
            self.ring
                .add_chain(self.g, self.oracle, self.alloc, &bufs, c.form, c.damage);
        if c.damage != Damage::None || !contiguous || usize::from(head) != first {
            self.m.clean = false;
        }
        for i in 0..slots {
            self.m.in_use[(first + i) % size] = true;
        }
        self.m.published.push_back((head, descs));
    }

    /// The slot `Ring::add_chain` will use next (it allocates round-robin).
    fn next_free(&self) -> usize {
        // Ring::add_chain starts at the slot after the last chain's; mirror it from the
        // published heads' layout by reading the table the same way: the next head is the
        // ring's own counter, which equals the number of slots used so far modulo size.
        self.ring.next_desc_slot()
    }

    fn pop(&mut self, q: &mut Active, complete: bool) {
        let avail = self.g.read_u16(self.ring.avail + 2);
        let popped = match q.pop() {
            Ok(Some(chain)) => {
                let head = chain.head();
                let descs = chain.descriptors().map(|d| d.to_vec());
                Some((head, descs))
            }
            Ok(None) => {
                self.check_notifications_on(q, avail);
                None
            }
            Err(_) => {
                self.m.clean = false;
                None
            }
        };
        let expected = self.m.published.pop_front();
        let Some((head, descs)) = popped else {
            if self.m.clean {
                assert!(
                    expected.is_none(),
                    "pop found no chain but one was published"
                );
            }
            return;
        };
        let mut writable = 0u32;
        if let Ok(descs) = &descs {
            self.report.accepted += 1;
            self.check_inside(descs, head);
            writable = descs
                .iter()
                .filter(|d| d.is_write_only())
                .fold(0u32, |n, d| n.saturating_add(d.len()));
        }
        if self.m.clean {
            self.report.checked += 1;
            self.check_expected(head, &descs, expected);
        }
        if complete {
            self.complete(q, head, writable);
        }
    }

    fn check_inside(&self, descs: &[virtio_queue::desc::split::Descriptor], head: u16) {
        let limit = usize::from(self.ring.size).max(0x1_0000 / 16);
        assert!(
            descs.len() <= limit,
            "chain {head}: {} descriptors",
            descs.len()
        );
        for d in descs {
            if d.len() > 0 {
                assert!(
                    self.inside(d.addr().0, d.len()),
                    "chain {head}: buffer {:#x}+{:#x} outside guest memory",
                    d.addr().0,
                    d.len()
                );
            }
        }
    }

    /// Whether `len` bytes from `addr` lie in guest memory (one range from 0).
    fn inside(&self, addr: u64, len: u32) -> bool {
        addr.checked_add(u64::from(len))
            .is_some_and(|end| end <= self.g.size())
    }

    fn check_expected(
        &mut self,
        head: u16,
        got: &Result<Vec<virtio_queue::desc::split::Descriptor>, vmkit_virtio::ChainError>,
        expected: Option<(u16, Vec<Desc>)>,
    ) {
        let Some((want_head, want)) = expected else {
            panic!("pop returned chain {head} that was never published");
        };
        assert_eq!(head, want_head, "chains popped out of order");
        let inside = want
            .iter()
            .all(|d| d.len == 0 || self.inside(d.addr, d.len));
        match got {
            Ok(got) => {
                let got: Vec<(u64, u32, bool)> = got
                    .iter()
                    .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                    .collect();
                let want: Vec<(u64, u32, bool)> = want
                    .iter()
                    .map(|d| (d.addr, d.len, d.flags & F_WRITE != 0))
                    .collect();
                assert_eq!(
                    got, want,
                    "chain {head}: descriptors differ from what was written"
                );
            }
            Err(e) => assert!(
                !inside || want.iter().any(|d| d.flags & F_INDIRECT != 0),
                "chain {head}: a well-formed chain refused: {e}"
            ),
        }
    }

    fn complete(&mut self, q: &mut Active, head: u16, len: u32) {
        let used_before = self.ring.used_idx(self.g);
        let ok = q.complete(head, len).is_ok();
        let size = usize::from(self.ring.size);
        if self.m.clean && ok {
            let (added, elems) = self.ring.take_used(self.g);
            assert_eq!(added, 1, "complete added {added} used elements");
            assert_eq!(
                elems[0],
                (u32::from(head), len),
                "used element after {used_before}"
            );
            // Free the chain's descriptors (the driver reclaims them from the used ring).
            let mut i = usize::from(head);
            loop {
                self.m.in_use[i % size] = false;
                let d = self.read_desc(i as u16);
                if d.flags & crate::ring::F_NEXT == 0 || (d.next as usize) >= size {
                    break;
                }
                i = usize::from(d.next);
                if !self.m.in_use[i % size] {
                    break;
                }
            }
        } else {
            self.ring.take_used(self.g);
        }
    }

    fn read_desc(&self, index: u16) -> Desc {
        let at = self.ring.desc + 16 * u64::from(index);
        let mut b = [0u8; 16];
        self.g.mem_read(at, &mut b);
        Desc {
            addr: u64::from_le_bytes(b[..8].try_into().unwrap_or_default()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    fn check_notifications_on(&self, q: &Active, avail: u16) {
        if q.needs_reset() || !self.m.clean {
            return;
        }
        let now = self.g.read_u16(self.ring.avail + 2);
        if now != avail {
            return;
        }
        if q.event_idx() {
            let at = self.ring.used + 4 + 8 * u64::from(self.ring.size);
            let avail_event = self.g.read_u16(at);
            assert_eq!(
                avail_event, avail,
                "ring empty but avail_event is not the available index: a lost wake-up"
            );
        } else {
            let flags = self.g.read_u16(self.ring.used);
            assert_eq!(
                flags & 1,
                0,
                "ring empty but NO_NOTIFY is set: a lost wake-up"
            );
        }
    }

    fn signal(&mut self, q: &mut Active) {
        let irqs = self.irq.0.load(Ordering::Relaxed);
        let used = self.ring.used_idx(self.g);
        let used_event = self
            .g
            .read_u16(self.ring.avail + 4 + 2 * u64::from(self.ring.size));
        let flags = self.g.read_u16(self.ring.avail);
        let old = self.m.last_checked_used;
        let pending = used != old;
        let reset = q.needs_reset();
        let signalled = q.signal_used().ok();
        let fired = self.irq.0.load(Ordering::Relaxed) - irqs;
        assert_eq!(
            fired,
            u64::from(signalled == Some(true)),
            "signal_used's result and the interrupts differ"
        );
        if !self.m.clean || reset {
            self.m.last_checked_used = used;
            return;
        }
        if pending {
            let want = if q.event_idx() {
                used.wrapping_sub(used_event).wrapping_sub(1) < used.wrapping_sub(old)
            } else {
                flags & 1 == 0
            };
            assert_eq!(signalled, Some(want), "signal_used: used {used}, last check {old}, used_event {used_event}, flags {flags:#x}");
            self.m.last_checked_used = used;
        } else {
            assert_eq!(signalled, Some(false), "signalled with nothing completed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(bufs: &[(u32, bool)], form: Form) -> Op {
        Op::Add(ChainInput {
            bufs: bufs
                .iter()
                .map(|&(n, w)| BufInput {
                    len: Len::Medium(n as u16),
                    writable: w,
                })
                .collect(),
            form,
            damage: Damage::None,
        })
    }

    #[test]
    fn a_behaving_driver_gets_its_chains_back_in_order_with_interrupts_as_asked() {
        for event_idx in [false, true] {
            let mut ops = vec![
                chain(&[(16, false), (512, true), (1, true)], Form::Direct),
                chain(&[(100, false)], Form::Indirect),
                chain(&[(8, true)], Form::Direct),
            ];
            ops.extend([Op::Pop { complete: true }, Op::Signal, Op::UsedEvent(5)]);
            ops.extend([
                Op::Pop { complete: true },
                Op::Pop { complete: true },
                Op::Signal,
            ]);
            ops.extend([Op::Pop { complete: false }, Op::Signal]);
            let input = Input {
                size_log: 2,
                event_idx,
                hostile: false,
                fill: 0,
                ops,
            };
            let r = run(&input);
            assert_eq!((r.accepted, r.checked), (3, 3), "event_idx {event_idx}");
            // With EVENT_IDX the driver asked for an interrupt after used index 5 only.
            assert_eq!(r.interrupts, if event_idx { 1 } else { 2 });
        }
    }

    #[test]
    fn the_generated_seeds_pop_and_check_chains() {
        let reached = crate::seeds::for_target("virtqueue")
            .iter()
            .filter(|s| reaches_goal(s))
            .count();
        assert!(reached >= 16, "only {reached} seeds check a chain");
    }
}
