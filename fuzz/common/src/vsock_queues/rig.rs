//! The vsock target's driver side: guest memory (kept from one run to the next), the three
//! rings, the write oracle and the used-ring oracles.

use std::cell::RefCell;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmkit_virtio::{
    ActivateContext, InterruptReason, NeedsReset, VirtioInterrupt, FEATURE_RING_EVENT_IDX,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest::{Guest, WriteOracle};
use crate::ring::{Desc, Ring, F_NEXT, F_WRITE};

use super::tables::{head, Table};
use super::{AVAIL, DATA, MEM, QSIZE, QUEUE_BASES, REGION, USED};

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn trigger(&self, _: InterruptReason) -> std::io::Result<()> {
        Ok(())
    }
}

thread_local! {
    /// Guest memory, kept from one run to the next (mapping and faulting it in anew each
    /// run would cost more than the run).
    static MEMORY: RefCell<Option<Guest>> = const { RefCell::new(None) };
}

/// This thread's guest memory, every byte set to `fill` (and the shadow with it).
fn guest(fill: u8) -> Guest {
    let g = MEMORY
        .with(|m| m.borrow_mut().take())
        .unwrap_or_else(|| Guest::new(REGION, 0));
    g.write(0, &vec![fill; MEM as usize]);
    g
}

fn ring(q: usize) -> Ring {
    let base = QUEUE_BASES[q];
    Ring::new(QSIZE, base, base + AVAIL, base + USED)
}

/// Descriptor `i` of the table at `base`, as memory holds it now.
fn read_desc(g: &Guest, base: u64, i: u16) -> Desc {
    let mut b = [0u8; 16];
    g.mem_read(base + 16 * u64::from(i), &mut b);
    let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = b;
    Desc {
        addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        len: u32::from_le_bytes([l0, l1, l2, l3]),
        flags: u16::from_le_bytes([f0, f1]),
        next: u16::from_le_bytes([n0, n1]),
    }
}

/// The device-writable buffers of the table at `base` (all 16 entries, whatever they hold).
fn writable_buffers(g: &Guest, base: u64) -> Vec<(u64, u64)> {
    (0..QSIZE)
        .map(|i| read_desc(g, base, i))
        .filter(|d| d.flags & F_WRITE != 0)
        .map(|d| (d.addr, u64::from(d.len)))
        .collect()
}

/// The total device-writable length of the chain at `head` of the table at `base`, walked as
/// the device may (at most a queue's worth of descriptors; an upper bound for a broken
/// chain).
fn chain_writable(g: &Guest, base: u64, head: u16) -> u64 {
    let mut total = 0u64;
    let mut i = head;
    for _ in 0..QSIZE {
        let d = read_desc(g, base, i);
        if d.flags & F_WRITE != 0 {
            total += u64::from(d.len);
        }
        if d.flags & F_NEXT == 0 || d.next >= QSIZE {
            break;
        }
        i = d.next;
    }
    total
}

/// Guest memory, the driver's side of the three queues, and the oracles.
pub(super) struct Rig {
    pub(super) g: Guest,
    oracle: WriteOracle,
    /// No device-writable buffer overlaps the queue area: the tables and used rings change
    /// only as the device completes chains.
    clean: bool,
    rings: [Ring; 3],
    starts: [Vec<u16>; 3],
    /// Transmit packets' header addresses and data lengths.
    pub(super) packets: Vec<(u64, u32)>,
    features: u64,
}

impl Rig {
    /// Memory filled with `fill`, then the tables, the initial available rings (`heads`
    /// per queue: `None` is every chain) moved on by `extra`, and zeroed used rings.
    pub(super) fn new(
        fill: u8,
        features: u64,
        tables: [Table; 3],
        heads: [Option<&[u8]>; 3],
        extra: [Option<u16>; 3],
    ) -> Self {
        let g = guest(fill);
        let mut oracle = WriteOracle::new();
        let mut rings = [ring(0), ring(1), ring(2)];
        for (q, t) in tables.iter().enumerate() {
            let r = &mut rings[q];
            r.register(&mut oracle);
            for (i, d) in t.descs.iter().enumerate() {
                r.write_desc(&g, i as u16, *d);
            }
            for (a, bytes) in &t.writes {
                if a.saturating_add(bytes.len() as u64) <= MEM {
                    g.write(*a, bytes);
                }
            }
            let heads: Vec<u16> = match heads[q] {
                None => t.starts.clone(),
                Some(sels) => sels.iter().map(|sel| head(*sel, &t.starts)).collect(),
            };
            for h in heads.iter().take(usize::from(QSIZE)) {
                r.publish(&g, *h);
            }
            r.advance_avail(&g, extra[q].unwrap_or(0));
            g.write(r.used, &[0; 4]);
        }
        let writable: Vec<(u64, u64)> = QUEUE_BASES
            .iter()
            .flat_map(|b| writable_buffers(&g, *b))
            .collect();
        let clean = !writable.iter().any(|(a, l)| *l > 0 && *a < DATA);
        for (a, l) in writable {
            oracle.allow(a, l);
        }
        let [rx, tx, ev] = tables;
        Self {
            g,
            oracle,
            clean,
            rings,
            starts: [rx.starts, tx.starts, ev.starts],
            packets: tx.packets,
            features,
        }
    }

    /// Fails if the device changed any of `len` bytes from `at` outside the allowed ranges
    /// (checked before the driver writes them, which would hide such a write).
    fn guard(&self, at: u64, len: u64) {
        if self.oracle.self_modifying() || at.saturating_add(len) > MEM {
            return;
        }
        let expected = self.g.expected();
        let mut now = vec![0u8; len as usize];
        self.g.mem_read(at, &mut now);
        let (s, e) = (at as usize, (at + len) as usize);
        if let Some(j) =
            (s..e).find(|&j| now[j - s] != expected[j] && !self.oracle.allows(j as u64))
        {
            panic!("vsock: the device wrote guest memory at {j:#x}, outside the used rings and writable buffers");
        }
    }

    /// A write by the driver (after [`guard`](Self::guard)).
    pub(super) fn write(&mut self, at: u64, bytes: &[u8]) {
        self.guard(at, bytes.len() as u64);
        self.g.write(at, bytes);
    }

    /// The queues as the device gets them at activation.
    fn queues(&self) -> Vec<(u16, Queue, EventFd)> {
        self.rings
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut q = Queue::new(QSIZE).expect("a queue of 16");
                q.set_desc_table_address(Some(r.desc as u32), Some(0));
                q.set_avail_ring_address(Some(r.avail as u32), Some(0));
                q.set_used_ring_address(Some(r.used as u32), Some(0));
                q.set_event_idx(self.features & FEATURE_RING_EVENT_IDX != 0);
                q.set_ready(true);
                (i as u16, q, EventFd::new(EFD_NONBLOCK).expect("eventfd"))
            })
            .collect()
    }

    /// What `activate` takes.
    pub(super) fn context(&self) -> ActivateContext {
        ActivateContext::new(
            self.g.mem.clone(),
            self.features,
            self.queues(),
            Arc::new(NoIrq),
            NeedsReset::new(),
        )
    }

    /// The driver sets the queues up again after a reset: indices back to 0.
    pub(super) fn reset_rings(&mut self) {
        for q in 0..3 {
            let r = ring(q);
            self.write(r.avail + 2, &[0, 0]);
            self.write(r.used, &[0; 4]);
            self.rings[q] = r;
        }
    }

    /// The driver makes `heads` available on queue `q`.
    pub(super) fn offer(&mut self, q: usize, heads: &[u8]) {
        let r = &self.rings[q];
        self.guard(r.avail, 4 + 2 * u64::from(QSIZE));
        for sel in heads.iter().take(usize::from(QSIZE)) {
            let h = head(*sel, &self.starts[q]);
            self.rings[q].publish(&self.g, h);
        }
        self.rings[q].advance_avail(&self.g, 0);
    }

    /// The oracles on what the device put in the used rings since the last check.
    pub(super) fn check_used(&mut self) {
        if !self.clean {
            // The device may have rewritten the rings through a buffer on them.
            return;
        }
        for q in 0..3 {
            let (added, used) = self.rings[q].take_used(&self.g);
            assert!(
                added <= QSIZE,
                "queue {q}: the device added {added} used elements at once"
            );
            for (id, len) in used {
                check_used_elem(&self.g, q, id, len);
            }
        }
    }

    /// The memory oracle at the end of a run; gives the memory back for the next run.
    pub(super) fn finish(self) {
        self.oracle.check_guest(&self.g, "vsock");
        MEMORY.with(|m| *m.borrow_mut() = Some(self.g));
    }
}

/// One used element of queue `q`: its id is a descriptor index, its length at most the
/// chain's device-writable length (receive), 0 (transmit), 0 or 4 (event).
fn check_used_elem(g: &Guest, q: usize, id: u32, len: u32) {
    assert!(id < u32::from(QSIZE), "queue {q}: used id {id}");
    let writable = chain_writable(g, QUEUE_BASES[q], id as u16);
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
