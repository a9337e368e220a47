//! Queue plumbing on virtio-queue: the processing loop with notification suppression, and
//! descriptor chain validation.

use std::ops::Deref;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::device::ActivateContext;
use crate::interrupt::{InterruptReason, VirtioInterrupt};
use crate::{Error, Result};

/// `VRING_AVAIL_F_NO_INTERRUPT`: without `EVENT_IDX`, the driver's hint that it does not
/// want used-buffer interrupts.
const VRING_AVAIL_F_NO_INTERRUPT: u16 =
    virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;

/// What one [`ActivateContext::process_queue`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueRun {
    /// Descriptor chains taken from the available ring and returned in the used ring.
    pub chains: usize,
    /// Whether the driver was interrupted (the suppression rules allowed it).
    pub interrupted: bool,
}

/// Why a descriptor chain is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain did not end where it should: a loop, a chain longer than the queue (or
    /// indirect table), a next index outside the table, an indirect table that is
    /// misaligned, nested or outside memory, or more than 4 GiB in total.
    #[error("descriptor chain is malformed (loop, too long, bad next index or indirect table)")]
    Malformed,
    /// A buffer lies (partly) outside guest memory.
    #[error("descriptor buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// The buffer's guest address.
        addr: u64,
        /// The buffer's length.
        len: u32,
    },
}

/// The descriptors of a chain (indirect tables followed), checked: the chain ends
/// properly and every buffer lies inside guest memory.
///
/// virtio-queue's iterator stops silently at a loop, an over-long chain or a bad index;
/// this tells those apart from a chain that ended, since the last descriptor it yields
/// then still has `VIRTQ_DESC_F_NEXT` set (or it yields nothing).
pub fn chain_descriptors<M>(
    chain: DescriptorChain<M>,
) -> std::result::Result<Vec<Descriptor>, ChainError>
where
    M: Clone + Deref,
    M::Target: GuestMemory,
{
    let mem_check = chain.clone();
    let mem = mem_check.memory();
    let descs: Vec<Descriptor> = chain.collect();
    match descs.last() {
        None => return Err(ChainError::Malformed),
        Some(last) if last.has_next() => return Err(ChainError::Malformed),
        Some(_) => {}
    }
    for d in &descs {
        let Ok(len) = usize::try_from(d.len()) else {
            return Err(ChainError::OutsideMemory {
                addr: d.addr().raw_value(),
                len: d.len(),
            });
        };
        let access = if d.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if len > 0 && !GuestMemory::check_range(mem, d.addr(), len, access) {
            return Err(ChainError::OutsideMemory {
                addr: d.addr().raw_value(),
                len: d.len(),
            });
        }
    }
    Ok(descs)
}

/// Whether the driver wants an interrupt for what was just added to the used ring.
///
/// With `EVENT_IDX`, virtio-queue's `needs_notification` (the `used_event` rule); without
/// it, the `VRING_AVAIL_F_NO_INTERRUPT` flag of the available ring, which virtio-queue
/// does not read.
pub fn needs_interrupt(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> std::result::Result<bool, virtio_queue::Error> {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem);
    }
    // Order the used ring writes before reading the driver's flags.
    fence(Ordering::SeqCst);
    let flags: u16 = mem
        .load(GuestAddress(queue.avail_ring()), Ordering::Acquire)
        .map_err(virtio_queue::Error::GuestMemory)?;
    Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
}

impl ActivateContext {
    /// Serves every available chain of queue `index` with `handle`, which returns how many
    /// bytes it wrote into the chain's device-writable buffers (the used length).
    ///
    /// The loop is virtio's notification-suppression loop: driver notifications are
    /// disabled while chains are taken (with `EVENT_IDX`, `avail_event` is moved past what
    /// was seen), re-enabled, and the ring is checked once more so a chain made available
    /// in between is not missed. The driver is then interrupted once, if the suppression
    /// rules (`used_event` or `VRING_AVAIL_F_NO_INTERRUPT`) allow.
    ///
    /// A corrupt ring (available index running ahead by more than the queue size, a head
    /// index outside the queue, ring memory that cannot be accessed) puts the device in
    /// `DEVICE_NEEDS_RESET` and returns the error; so does a failure to interrupt. Check
    /// each chain's buffers with [`chain_descriptors`].
    pub fn process_queue<F>(&mut self, index: u16, mut handle: F) -> Result<QueueRun>
    where
        F: FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> u32,
    {
        if self.needs_reset() {
            return Ok(QueueRun::default());
        }
        let Some((mem, q, interrupt)) = self.parts_mut(index) else {
            return Err(Error::NoSuchQueue(index));
        };
        let result = run_queue(mem, &mut q.queue, index, interrupt.as_ref(), &mut handle);
        if let Err(e) = &result {
            log::warn!("virtio: queue {index}: {e}; device needs reset");
            self.set_needs_reset();
        }
        result
    }
}

fn run_queue<F>(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    index: u16,
    interrupt: &dyn VirtioInterrupt,
    handle: &mut F,
) -> Result<QueueRun>
where
    F: FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    let qerr = |source| Error::Queue { index, source };
    let mut run = QueueRun::default();
    loop {
        queue.disable_notification(mem).map_err(qerr)?;
        // virtio-queue's iterator refuses (and only logs) an available index running more
        // than a queue size ahead; check it here to report it.
        let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(qerr)?;
        let pending = avail.0.wrapping_sub(queue.next_avail());
        if pending > queue.size() {
            return Err(Error::InvalidAvailIndex {
                index,
                avail: avail.0,
                next: queue.next_avail(),
                size: queue.size(),
            });
        }
        for _ in 0..pending {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return Err(Error::AvailRingUnreadable(index));
            };
            let head = chain.head_index();
            let len = handle(mem, chain);
            queue.add_used(mem, head, len).map_err(qerr)?;
            run.chains += 1;
        }
        if !queue.enable_notification(mem).map_err(qerr)? {
            break;
        }
    }
    if run.chains > 0 && needs_interrupt(queue, mem).map_err(qerr)? {
        interrupt
            .trigger(InterruptReason::Queue(index))
            .map_err(Error::Interrupt)?;
        run.interrupted = true;
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InterruptReason, NeedsReset};
    use std::sync::{Arc, Mutex};
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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

    fn context(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        event_idx: bool,
    ) -> (ActivateContext, Arc<Irq>, NeedsReset) {
        let mut queue: Queue = vq.create_queue().unwrap();
        // virtio-queue's mock lays the used ring over the end of the available ring
        // (`SplitQueueRing::end` counts elements, not bytes): move it out of the way.
        queue.try_set_used_ring_address(USED).unwrap();
        queue.set_event_idx(event_idx);
        let irq = Arc::new(Irq::default());
        let nr = NeedsReset::new();
        let ctx = ActivateContext::new(
            mem.clone(),
            0,
            vec![crate::ActiveQueue {
                index: 0,
                queue,
                notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
            }],
            irq.clone(),
            nr.clone(),
        );
        (ctx, irq, nr)
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

    #[test]
    fn batches_chains_and_interrupts_once() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let (mut ctx, irq, _) = context(&m, &vq, false);
        add_simple_chains(&vq, 3, 0);
        let mut seen = Vec::new();
        let run = ctx
            .process_queue(0, |_, chain| {
                seen.push(chain.head_index());
                0x80
            })
            .unwrap();
        assert_eq!(
            run,
            QueueRun {
                chains: 3,
                interrupted: true
            }
        );
        assert_eq!(seen, [0, 1, 2]);
        assert_eq!(used_idx(&m), 3);
        let len: u32 = m.read_obj(USED.unchecked_add(4 + 8 * 2 + 4)).unwrap();
        assert_eq!(len, 0x80);
        assert_eq!(irq.get(), [InterruptReason::Queue(0)]);
        // Notifications are re-enabled (used.flags = 0) once the ring is empty.
        assert_eq!(m.read_obj::<u16>(USED).unwrap(), 0);
        // Nothing new: no work, no interrupt.
        assert_eq!(ctx.process_queue(0, |_, _| 0).unwrap(), QueueRun::default());
        assert_eq!(irq.get().len(), 1);
    }

    #[test]
    fn event_idx_in_both_directions() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let (mut ctx, irq, _) = context(&m, &vq, true);
        let used_event = vq.avail_addr().unchecked_add(4 + 2 * 16);
        let avail_event = USED.unchecked_add(4 + 8 * 16);
        // The driver wants an interrupt once entry 5 is used.
        m.write_obj(5u16, used_event).unwrap();
        add_simple_chains(&vq, 3, 0);
        let run = ctx.process_queue(0, |_, _| 1).unwrap();
        assert_eq!(
            run,
            QueueRun {
                chains: 3,
                interrupted: false
            }
        );
        // The device asks to be notified at the next new entry.
        assert_eq!(m.read_obj::<u16>(avail_event).unwrap(), 3);
        add_simple_chains(&vq, 3, 3);
        let run = ctx.process_queue(0, |_, _| 1).unwrap();
        assert_eq!(
            run,
            QueueRun {
                chains: 3,
                interrupted: true
            }
        );
        assert_eq!(m.read_obj::<u16>(avail_event).unwrap(), 6);
        assert_eq!(irq.get(), [InterruptReason::Queue(0)]);
    }

    #[test]
    fn no_interrupt_flag_without_event_idx() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let (mut ctx, irq, _) = context(&m, &vq, false);
        m.write_obj(1u16, vq.avail_addr()).unwrap(); // VRING_AVAIL_F_NO_INTERRUPT
        add_simple_chains(&vq, 2, 0);
        let run = ctx.process_queue(0, |_, _| 1).unwrap();
        assert_eq!(
            run,
            QueueRun {
                chains: 2,
                interrupted: false
            }
        );
        assert!(irq.get().is_empty());
    }

    #[test]
    fn avail_index_running_ahead_needs_reset() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let (mut ctx, irq, nr) = context(&m, &vq, false);
        m.write_obj(17u16, vq.avail_addr().unchecked_add(2))
            .unwrap();
        let mut calls = 0;
        let err = ctx.process_queue(0, |_, _| {
            calls += 1;
            0
        });
        assert!(matches!(
            err,
            Err(Error::InvalidAvailIndex { avail: 17, .. })
        ));
        assert_eq!(calls, 0);
        assert!(nr.is_set());
        assert_eq!(irq.get(), [InterruptReason::Config]);
        // Stopped until reset.
        assert_eq!(ctx.process_queue(0, |_, _| 0).unwrap(), QueueRun::default());
    }

    #[test]
    fn head_index_outside_the_queue_needs_reset() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let (mut ctx, _irq, nr) = context(&m, &vq, false);
        m.write_obj(40u16, vq.avail_addr().unchecked_add(4))
            .unwrap();
        m.write_obj(1u16, vq.avail_addr().unchecked_add(2)).unwrap();
        let err = ctx.process_queue(0, |_, chain| {
            assert_eq!(chain_descriptors(chain).err(), Some(ChainError::Malformed));
            0
        });
        assert!(matches!(err, Err(Error::Queue { index: 0, .. })), "{err:?}");
        assert!(nr.is_set());
    }

    #[test]
    fn unknown_queue() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let (mut ctx, _irq, nr) = context(&m, &vq, false);
        assert!(matches!(
            ctx.process_queue(3, |_, _| 0),
            Err(Error::NoSuchQueue(3))
        ));
        assert!(!nr.is_set());
    }

    #[test]
    fn rings_outside_memory_need_reset() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let (mut ctx, _irq, nr) = context(&m, &vq, false);
        ctx.queue_mut(0)
            .unwrap()
            .queue
            .try_set_avail_ring_address(GuestAddress(MEM as u64 + 0x1000))
            .unwrap();
        assert!(ctx.process_queue(0, |_, _| 0).is_err());
        assert!(nr.is_set());
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
}
