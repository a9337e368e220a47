use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::device::NeedsReset;
use crate::ActivateContext;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
const MEM: usize = 0x10_0000;
const USED: GuestAddress = GuestAddress(0x1000);

#[derive(Default)]
struct Irq(Mutex<Vec<InterruptReason>>);
impl VirtioInterrupt for Irq {
    fn trigger(&self, reason: InterruptReason) -> std::io::Result<()> {
        self.0.lock().unwrap().push(reason);
        Ok(())
    }
}
impl Irq {
    fn get(&self) -> Vec<InterruptReason> {
        self.0.lock().unwrap().clone()
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
}

struct Rig {
    ctx: ActivateContext,
    irq: Arc<Irq>,
    nr: NeedsReset,
    watch: Arc<QueueWatch<GuestMemoryMmap>>,
}

impl Rig {
    fn q(&mut self) -> &mut ActiveQueue<GuestMemoryMmap> {
        self.ctx.queue_mut(0).unwrap()
    }
}

fn rig(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, event_idx: bool) -> Rig {
    let mut queue: Queue = vq.create_queue().unwrap();
    // virtio-queue's mock lays the used ring over the end of the available ring
    // (`SplitQueueRing::end` counts elements, not bytes): move it out of the way.
    queue.try_set_used_ring_address(USED).unwrap();
    queue.set_event_idx(event_idx);
    let irq = Arc::new(Irq::default());
    let nr = NeedsReset::new();
    let watch = Arc::new(QueueWatch::default());
    let ctx = ActivateContext::with_watches(
        mem.clone(),
        0,
        vec![(0, queue, EventFd::new(EFD_NONBLOCK).unwrap(), watch.clone())],
        irq.clone(),
        nr.clone(),
    );
    Rig {
        ctx,
        irq,
        nr,
        watch,
    }
}

fn add_simple_chains(vq: &MockSplitQueue<GuestMemoryMmap>, n: u16, first: u16) {
    for i in 0..n {
        let d = first + i;
        vq.add_desc_chains(&[desc(0x8000 + u64::from(d) * 0x100, 0x100, WRITE, 0)], d)
            .unwrap();
    }
}

fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(USED.unchecked_add(2)).unwrap()
}

/// Serves every chain with `len`; returns the heads seen.
fn serve_all(q: &mut ActiveQueue<GuestMemoryMmap>, len: u32) -> Vec<u16> {
    let mut heads = Vec::new();
    while let Ok(Some(chain)) = q.pop() {
        let head = chain.head();
        assert!(chain.descriptors().is_ok());
        heads.push(head);
        q.complete(head, len).unwrap();
    }
    heads
}

#[test]
fn batches_chains_and_interrupts_once() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let mut r = rig(&m, &vq, false);
    add_simple_chains(&vq, 3, 0);
    assert!(r.q().has_available());
    assert_eq!(serve_all(r.q(), 0x80), [0, 1, 2]);
    assert!(!r.q().has_available());
    assert_eq!(used_idx(&m), 3);
    let len: u32 = m.read_obj(USED.unchecked_add(4 + 8 * 2 + 4)).unwrap();
    assert_eq!(len, 0x80);
    assert!(r.q().signal_used().unwrap());
    assert_eq!(r.irq.get(), [InterruptReason::Queue(0)]);
    // Notifications are re-enabled (used.flags = 0) once the ring is empty.
    assert_eq!(m.read_obj::<u16>(USED).unwrap(), 0);
    // Nothing new: no work, no interrupt.
    assert!(serve_all(r.q(), 1).is_empty());
    assert!(!r.q().signal_used().unwrap());
    assert_eq!(r.irq.get().len(), 1);
}

#[test]
fn notifications_are_off_while_chains_are_taken() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let mut r = rig(&m, &vq, false);
    add_simple_chains(&vq, 2, 0);
    let head = r.q().pop().unwrap().unwrap().head();
    // NO_NOTIFY set while the device works through the ring…
    assert_eq!(m.read_obj::<u16>(USED).unwrap(), 1);
    r.q().complete(head, 0).unwrap();
    // …a chain the driver adds meanwhile is found by the same loop…
    add_simple_chains(&vq, 1, 2);
    assert_eq!(serve_all(r.q(), 0), [1, 2]);
    // …and notifications are back on at the end.
    assert_eq!(m.read_obj::<u16>(USED).unwrap(), 0);
}

#[test]
fn event_idx_in_both_directions() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let mut r = rig(&m, &vq, true);
    let used_event = vq.avail_addr().unchecked_add(4 + 2 * 16);
    let avail_event = USED.unchecked_add(4 + 8 * 16);
    // The driver wants an interrupt once entry 5 is used.
    m.write_obj(5u16, used_event).unwrap();
    add_simple_chains(&vq, 3, 0);
    assert_eq!(serve_all(r.q(), 1).len(), 3);
    assert!(!r.q().signal_used().unwrap());
    // The device asks to be notified at the next new entry.
    assert_eq!(m.read_obj::<u16>(avail_event).unwrap(), 3);
    add_simple_chains(&vq, 3, 3);
    assert_eq!(serve_all(r.q(), 1).len(), 3);
    assert!(r.q().signal_used().unwrap());
    assert_eq!(m.read_obj::<u16>(avail_event).unwrap(), 6);
    assert_eq!(r.irq.get(), [InterruptReason::Queue(0)]);
}

#[test]
fn polling_leaves_notifications_suppressed_until_it_ends() {
    for event_idx in [false, true] {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let mut r = rig(&m, &vq, event_idx);
        let avail_event = USED.unchecked_add(4 + 8 * 16);
        r.q().set_poll(Duration::from_micros(50));
        assert_eq!(r.watch.poll(), Duration::from_micros(50));
        assert_eq!(r.watch.ring().map(|(_, a)| a), Some(vq.avail_addr()));
        r.watch.set_polling(true);
        add_simple_chains(&vq, 2, 0);
        assert_eq!(serve_all(r.q(), 0).len(), 2);
        if event_idx {
            // Just behind the next entry: the driver will not notify for entry 2.
            assert_eq!(m.read_obj::<u16>(avail_event).unwrap(), 1, "{event_idx}");
        } else {
            assert_eq!(m.read_obj::<u16>(USED).unwrap(), 1, "NO_NOTIFY");
        }
        // Polling ends: the last pass turns them back on.
        r.watch.set_polling(false);
        assert!(serve_all(r.q(), 0).is_empty());
        if event_idx {
            assert_eq!(m.read_obj::<u16>(avail_event).unwrap(), 2);
        } else {
            assert_eq!(m.read_obj::<u16>(USED).unwrap(), 0);
        }
    }
    // Dropping the queue (device reset) forgets its ring and polling.
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let r = rig(&m, &vq, false);
    let watch = r.watch.clone();
    drop(r);
    assert!(watch.ring().is_none());
    assert!(watch.poll().is_zero());
}

#[test]
fn no_interrupt_flag_without_event_idx() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let mut r = rig(&m, &vq, false);
    m.write_obj(1u16, vq.avail_addr()).unwrap(); // VRING_AVAIL_F_NO_INTERRUPT
    add_simple_chains(&vq, 2, 0);
    assert_eq!(serve_all(r.q(), 1).len(), 2);
    assert!(!r.q().signal_used().unwrap());
    assert!(r.irq.get().is_empty());
}

#[test]
fn avail_index_running_ahead_needs_reset() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let mut r = rig(&m, &vq, false);
    m.write_obj(17u16, vq.avail_addr().unchecked_add(2))
        .unwrap();
    let err = r.q().pop().unwrap_err();
    assert!(
        matches!(err, Error::InvalidAvailIndex { avail: 17, .. }),
        "{err}"
    );
    assert!(r.nr.is_set());
    assert_eq!(r.irq.get(), [InterruptReason::Config]);
    // Stopped until reset: nothing popped, completed or signalled, no second interrupt.
    assert!(r.q().pop().unwrap().is_none());
    r.q().complete(0, 1).unwrap();
    assert!(!r.q().signal_used().unwrap());
    assert_eq!(used_idx(&m), 0);
    assert_eq!(r.irq.get().len(), 1);
}

#[test]
fn head_index_outside_the_queue_needs_reset() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let mut r = rig(&m, &vq, false);
    m.write_obj(40u16, vq.avail_addr().unchecked_add(4))
        .unwrap();
    m.write_obj(1u16, vq.avail_addr().unchecked_add(2)).unwrap();
    let chain = r.q().pop().unwrap().unwrap();
    assert_eq!(chain.descriptors().err(), Some(ChainError::Malformed));
    let head = chain.head();
    let err = r.q().complete(head, 0).unwrap_err();
    assert!(matches!(err, Error::Queue { index: 0, .. }), "{err:?}");
    assert!(r.nr.is_set());
}

#[test]
fn rings_outside_memory_need_reset() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(MEM as u64 + 0x1000))
        .unwrap();
    let nr = NeedsReset::new();
    let ctx = ActivateContext::new(
        m.clone(),
        0,
        vec![(0, queue, EventFd::new(EFD_NONBLOCK).unwrap())],
        Arc::new(Irq::default()),
        nr.clone(),
    );
    let mut ctx = ctx;
    assert!(ctx.queue_mut(0).unwrap().pop().is_err());
    assert!(nr.is_set());
    assert!(ctx.queue_mut(3).is_none(), "no such queue");
}

#[derive(Debug, PartialEq)]
struct D {
    len: u32,
    write: bool,
}

fn chain_of(
    m: &GuestMemoryMmap,
    descs: &[RawDescriptor],
) -> std::result::Result<Vec<D>, ChainError> {
    let vq = MockSplitQueue::new(m, 16);
    vq.add_desc_chains(descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(m).unwrap();
    chain_descriptors(chain).map(|v| {
        v.iter()
            .map(|d| D {
                len: d.len(),
                write: d.is_write_only(),
            })
            .collect()
    })
}

#[test]
fn chain_validation() {
    let m = mem();
    // A proper chain.
    let ok = chain_of(&m, &[desc(0x8000, 16, NEXT, 1), desc(0x9000, 64, WRITE, 0)]).unwrap();
    assert_eq!(ok.len(), 2);
    assert!(ok[1].write);
    // A loop: 0 -> 1 -> 0.
    assert_eq!(
        chain_of(&m, &[desc(0x8000, 16, NEXT, 1), desc(0x9000, 16, NEXT, 0)]),
        Err(ChainError::Malformed)
    );
    // A self loop.
    assert_eq!(
        chain_of(&m, &[desc(0x8000, 16, NEXT, 0)]),
        Err(ChainError::Malformed)
    );
    // A chain longer than the queue: 16 linked descriptors, then one more.
    let long: Vec<_> = (0..16u16)
        .map(|i| desc(0x8000, 1, NEXT, (i + 1) % 16))
        .collect();
    assert_eq!(chain_of(&m, &long), Err(ChainError::Malformed));
    // Next index outside the table.
    assert_eq!(
        chain_of(&m, &[desc(0x8000, 16, NEXT, 99)]),
        Err(ChainError::Malformed)
    );
    // Buffers outside memory, or crossing its end.
    assert_eq!(
        chain_of(&m, &[desc(MEM as u64, 1, WRITE, 0)]),
        Err(ChainError::OutsideMemory {
            addr: MEM as u64,
            len: 1
        })
    );
    assert!(chain_of(&m, &[desc(MEM as u64 - 8, 16, 0, 0)]).is_err());
    assert!(chain_of(&m, &[desc(u64::MAX - 4, 16, WRITE, 0)]).is_err());
    // More than 4 GiB in total.
    assert_eq!(
        chain_of(
            &m,
            &[desc(0x8000, u32::MAX, NEXT, 1), desc(0x9000, 2, 0, 0)]
        ),
        Err(ChainError::Malformed)
    );
}

#[test]
fn indirect_tables() {
    let m = mem();
    // A table of two descriptors at 0x20000.
    m.write_obj(desc(0x8000, 16, NEXT, 1), GuestAddress(0x2_0000))
        .unwrap();
    m.write_obj(desc(0x9000, 32, WRITE, 0), GuestAddress(0x2_0010))
        .unwrap();
    let d = chain_of(&m, &[desc(0x2_0000, 32, INDIRECT, 0)]).unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d[1].len, 32);
    // A loop inside the table.
    m.write_obj(desc(0x9000, 32, WRITE | NEXT, 0), GuestAddress(0x2_0010))
        .unwrap();
    assert_eq!(
        chain_of(&m, &[desc(0x2_0000, 32, INDIRECT, 0)]),
        Err(ChainError::Malformed)
    );
    // Nested indirect.
    m.write_obj(desc(0x2_0000, 32, INDIRECT, 0), GuestAddress(0x2_0010))
        .unwrap();
    assert_eq!(
        chain_of(&m, &[desc(0x2_0000, 32, INDIRECT, 0)]),
        Err(ChainError::Malformed)
    );
    // Table length not a multiple of 16, or table outside memory.
    assert_eq!(
        chain_of(&m, &[desc(0x2_0000, 24, INDIRECT, 0)]),
        Err(ChainError::Malformed)
    );
    assert_eq!(
        chain_of(&m, &[desc(MEM as u64, 32, INDIRECT, 0)]),
        Err(ChainError::Malformed)
    );
}

#[test]
fn pop_hands_out_checked_chains_and_malformed_ones_are_completed_by_the_device() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let mut r = rig(&m, &vq, false);
    vq.add_desc_chains(
        &[
            desc(0x8000, 16, 0, 0),
            desc(MEM as u64, 16, WRITE, 0), // outside memory
            desc(0x9000, 16, NEXT, 2),      // a self loop
        ],
        0,
    )
    .unwrap();
    let mut seen = Vec::new();
    while let Ok(Some(chain)) = r.q().pop() {
        seen.push((chain.head(), chain.descriptors().map(|d| d.len()).ok()));
        let head = chain.head();
        r.q().complete(head, 0).unwrap();
    }
    assert_eq!(seen, [(0, Some(1)), (1, None), (2, None)]);
    assert!(
        !r.nr.is_set(),
        "a bad chain is the device's business, not a ring error"
    );
    assert_eq!(used_idx(&m), 3);
}

#[test]
fn undo_pop_gives_the_last_chain_back_once() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let mut r = rig(&m, &vq, false);
    add_simple_chains(&vq, 2, 0);
    let head = r.q().pop().unwrap().unwrap().head();
    assert_eq!(head, 0);
    r.q().undo_pop();
    // A second undo without a pop in between does nothing.
    r.q().undo_pop();
    let chain = r.q().pop().unwrap().unwrap();
    assert_eq!(chain.head(), 0);
    // The raw chain is the same chain.
    let raw: Vec<_> = chain.descriptor_chain().collect();
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0].addr(), GuestAddress(0x8000));
    r.q().complete(0, 0).unwrap();
    // After a completion there is nothing to give back.
    r.q().undo_pop();
    assert_eq!(serve_all(r.q(), 0), [1]);
    assert_eq!(used_idx(&m), 2);
}

#[test]
fn give_back_returns_the_chains_taken_last_and_the_snapshot_position_with_them() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let mut r = rig(&m, &vq, false);
    add_simple_chains(&vq, 4, 0);
    // Chain 0 served, chains 1..=3 taken and held (receive buffers waiting for a frame).
    let head = r.q().pop().unwrap().unwrap().head();
    r.q().complete(head, 0).unwrap();
    for want in 1..=3 {
        assert_eq!(r.q().pop().unwrap().unwrap().head(), want);
    }
    assert_eq!(r.watch.positions(), (4, 1));
    // Capped at what is outstanding.
    assert_eq!(r.q().give_back(10), 3);
    assert_eq!(r.watch.positions(), (1, 1));
    assert_eq!(r.q().state().next_avail, 1);
    assert_eq!(r.q().give_back(1), 0, "nothing outstanding");
    assert_eq!(serve_all(r.q(), 0), [1, 2, 3]);
    assert_eq!(used_idx(&m), 4);
}

#[test]
fn metrics_count_malformed_chains_once_and_interrupts_sent() {
    use crate::metrics::{AtomicMetrics, Counter};
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let mut r = rig(&m, &vq, false);
    let metrics = Arc::new(AtomicMetrics::new());
    r.q().set_metrics(metrics.clone());
    vq.add_desc_chains(
        &[
            desc(0x8000, 16, 0, 0),
            desc(MEM as u64, 16, WRITE, 0), // outside memory
            desc(0x9000, 16, NEXT, 2),      // a self loop
        ],
        0,
    )
    .unwrap();
    // The good chain: not malformed.
    let head = r.q().pop().unwrap().unwrap().head();
    r.q().complete(head, 0).unwrap();
    assert_eq!(metrics.get(Counter::Malformed), 0);
    // The chain outside memory, given back and taken again: counted once.
    assert!(r.q().pop().unwrap().unwrap().descriptors().is_err());
    r.q().undo_pop();
    let head = {
        let chain = r.q().pop().unwrap().unwrap();
        assert!(chain.descriptors().is_err());
        chain.head()
    };
    r.q().complete(head, 0).unwrap();
    assert_eq!(metrics.get(Counter::Malformed), 1);
    // The loop.
    let head = r.q().pop().unwrap().unwrap().head();
    r.q().complete(head, 0).unwrap();
    assert_eq!(metrics.get(Counter::Malformed), 2);
    assert!(r.q().pop().unwrap().is_none());
    // One interrupt sent, one counted; none when nothing was completed.
    assert_eq!(metrics.get(Counter::Interrupts), 0);
    assert!(r.q().signal_used().unwrap());
    assert!(!r.q().signal_used().unwrap());
    assert_eq!(metrics.get(Counter::Interrupts), 1);
    // Suppressed by the driver (NO_INTERRUPT): not counted.
    add_simple_chains(&vq, 1, 3);
    m.write_obj(VRING_AVAIL_F_NO_INTERRUPT.to_le(), vq.avail_addr())
        .unwrap();
    assert_eq!(serve_all(r.q(), 0), [3]);
    assert!(!r.q().signal_used().unwrap());
    assert_eq!(metrics.get(Counter::Interrupts), 1);
    let s = metrics.snapshot();
    assert_eq!(s.iter().map(|(_, v)| v).sum::<u64>(), 3, "{s:?}");
}
