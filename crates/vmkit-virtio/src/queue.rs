//! The virtqueue protocol, written once: taking available chains (checked), returning them
//! in the used ring, interrupting the driver when the suppression rules allow, and leaving
//! notifications off while the queue is polled.

use std::fmt;
use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use crate::device::NeedsReset;
use crate::interrupt::{InterruptReason, VirtioInterrupt};
pub(crate) use crate::memory::VirtioMemory;
use crate::metrics::{Counter, DeviceMetrics};
use crate::{Error, Result};

/// `VRING_AVAIL_F_NO_INTERRUPT`: without `EVENT_IDX`, the driver's hint that it does not
/// want used-buffer interrupts.
const VRING_AVAIL_F_NO_INTERRUPT: u16 =
    virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;
/// Size of the used ring's header (flags, idx) and of one used element.
const USED_HEADER: u64 = 4;
const USED_ELEMENT: u64 = 8;

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
    M: Clone + std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut out = Vec::new();
    collect_chain(chain, &mut out)?;
    Ok(out)
}

/// [`chain_descriptors`] into a reused vector.
fn collect_chain<M>(
    chain: DescriptorChain<M>,
    out: &mut Vec<Descriptor>,
) -> std::result::Result<(), ChainError>
where
    M: Clone + std::ops::Deref,
    M::Target: GuestMemory,
{
    out.clear();
    let for_memory = chain.clone();
    let mem = for_memory.memory();
    out.extend(chain);
    match out.last() {
        None => return Err(ChainError::Malformed),
        Some(last) if last.has_next() => return Err(ChainError::Malformed),
        Some(_) => {}
    }
    for d in out.iter() {
        let outside = ChainError::OutsideMemory {
            addr: d.addr().raw_value(),
            len: d.len(),
        };
        let Ok(len) = usize::try_from(d.len()) else {
            return Err(outside);
        };
        let access = if d.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if len > 0 && !GuestMemory::check_range(mem, d.addr(), len, access) {
            return Err(outside);
        }
    }
    Ok(())
}

/// A descriptor chain taken from the available ring by [`ActiveQueue::pop`].
///
/// Return it with [`ActiveQueue::complete`] (its [`head`](Self::head) and how many bytes the
/// device wrote into its buffers), now or later: a device may hold many in flight.
pub struct Chain<'a, M> {
    head: u16,
    descriptors: std::result::Result<&'a [Descriptor], ChainError>,
    memory: &'a M,
    raw: DescriptorChain<&'a M>,
}

impl<M> fmt::Debug for Chain<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chain")
            .field("head", &self.head)
            .field("descriptors", &self.descriptors)
            .finish_non_exhaustive()
    }
}

impl<'a, M> Chain<'a, M> {
    /// The head index, which identifies the chain in the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The chain's descriptors (indirect tables followed), or why the chain is unusable: a
    /// loop, an over-long chain, a bad index, a buffer outside guest memory. Every buffer
    /// given lies inside guest memory, device-writable ones in writable memory. A device
    /// completes an unusable chain with length 0 (or an error status it can place).
    pub fn descriptors(&self) -> std::result::Result<&'a [Descriptor], ChainError> {
        self.descriptors
    }

    /// Guest memory, to read and write the chain's buffers.
    pub fn memory(&self) -> &'a M {
        self.memory
    }

    /// The chain as virtio-queue's iterator, for parsers written against it (virtio-vsock's
    /// `VsockPacket`, say). Check [`descriptors`](Self::descriptors) first: the iterator
    /// itself stops silently at a loop or a bad index, and does not check that buffers lie
    /// in guest memory.
    pub fn descriptor_chain(&self) -> DescriptorChain<&'a M> {
        self.raw.clone()
    }
}

/// What a queue and the [`QueueEventHandler`](crate::QueueEventHandler) watching it share:
/// whether and how long to poll the queue after a notification, and where its available
/// ring is (with a handle on guest memory), so the handler can watch it without the
/// device's lock.
#[derive(Debug)]
pub(crate) struct QueueWatch<M> {
    /// The polling window in nanoseconds (0: no polling).
    poll_ns: AtomicU64,
    /// Set while the handler polls: an empty ring leaves notifications suppressed.
    polling: AtomicBool,
    /// Set while the device's rate limiter holds the queue: the handler does not poll it.
    throttled: AtomicBool,
    /// Guest memory and the available ring's address, while the queue is active.
    ring: Mutex<Option<(M, GuestAddress)>>,
    /// The active queue's `next_avail << 16 | next_used`, kept by the queue as it moves, so
    /// the transport can save the ring positions of a queue the device holds.
    positions: AtomicU32,
}

impl<M> Default for QueueWatch<M> {
    fn default() -> Self {
        Self {
            poll_ns: AtomicU64::new(0),
            polling: AtomicBool::new(false),
            throttled: AtomicBool::new(false),
            ring: Mutex::new(None),
            positions: AtomicU32::new(0),
        }
    }
}

impl<M: Clone> QueueWatch<M> {
    pub(crate) fn poll(&self) -> Duration {
        Duration::from_nanos(self.poll_ns.load(Ordering::Relaxed))
    }

    pub(crate) fn set_polling(&self, on: bool) {
        self.polling.store(on, Ordering::SeqCst);
    }

    pub(crate) fn polling(&self) -> bool {
        self.polling.load(Ordering::SeqCst)
    }

    /// Whether the device's rate limiter holds the queue.
    pub(crate) fn throttled(&self) -> bool {
        self.throttled.load(Ordering::SeqCst)
    }

    pub(crate) fn set_throttled(&self, on: bool) {
        self.throttled.store(on, Ordering::SeqCst);
    }

    /// Guest memory and the available ring's address, while the queue is active.
    pub(crate) fn ring(&self) -> Option<(M, GuestAddress)> {
        self.lock_ring().clone()
    }

    fn activate(&self, memory: M, avail_ring: GuestAddress) {
        *self.lock_ring() = Some((memory, avail_ring));
    }

    /// The active queue's `(next_avail, next_used)` as it last recorded them.
    pub(crate) fn positions(&self) -> (u16, u16) {
        let p = self.positions.load(Ordering::SeqCst);
        ((p >> 16) as u16, p as u16)
    }

    fn record_positions(&self, queue: &Queue) {
        let p = (u32::from(queue.next_avail()) << 16) | u32::from(queue.next_used());
        self.positions.store(p, Ordering::SeqCst);
    }
}

impl<M> QueueWatch<M> {
    fn lock_ring(&self) -> MutexGuard<'_, Option<(M, GuestAddress)>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn deactivate(&self) {
        *self.lock_ring() = None;
        self.poll_ns.store(0, Ordering::Relaxed);
        self.polling.store(false, Ordering::SeqCst);
        self.throttled.store(false, Ordering::SeqCst);
    }
}

/// The driver's available index of the queue whose available ring is at `avail_ring`.
pub(crate) fn read_avail_idx<M: GuestMemory>(mem: &M, avail_ring: GuestAddress) -> Option<u16> {
    let addr = avail_ring.checked_add(2)?;
    mem.load::<u16>(addr, Ordering::Acquire)
        .ok()
        .map(u16::from_le)
}

/// A queue the driver made ready, as the device gets it at activation: the one place the
/// virtqueue protocol lives.
///
/// ```text
/// while let Ok(Some(chain)) = queue.pop() {        // checked chains, suppression loop
///     let head = chain.head();
///     let len = serve(chain.memory(), chain.descriptors());
///     let _ = queue.complete(head, len);            // used ring
/// }
/// let _ = queue.signal_used();                      // EVENT_IDX / NO_INTERRUPT rules
/// ```
///
/// [`pop`](Self::pop) runs virtio's notification-suppression loop: driver notifications go
/// off while chains are taken; when the ring is empty they come back on and the ring is
/// checked once more, so a chain made available in between is not missed. While the
/// transport's event handler polls the queue (see [`set_poll`](Self::set_poll)), an empty
/// ring leaves them off instead. A corrupt ring (the available index running more than a
/// queue ahead, ring memory that cannot be accessed, a head outside the queue) puts the
/// device in `DEVICE_NEEDS_RESET` (with a configuration interrupt) and every later call does
/// nothing.
pub struct ActiveQueue<M> {
    index: u16,
    queue: Queue,
    notifier: EventFd,
    memory: M,
    interrupt: Arc<dyn VirtioInterrupt>,
    needs_reset: NeedsReset,
    watch: Arc<QueueWatch<M>>,
    /// Whether driver notifications are on, as this queue last set them.
    notifications: bool,
    /// The available index as last read.
    avail: Wrapping<u16>,
    /// Chains were completed since the last [`signal_used`](Self::signal_used).
    unsignalled: bool,
    /// The descriptors of the chain last popped.
    scratch: Vec<Descriptor>,
    /// A chain was popped and may be given back with [`undo_pop`](Self::undo_pop).
    undoable: bool,
    /// The next `pop` returns a chain given back with `undo_pop` (counted already).
    redo: bool,
    /// Where malformed chains and interrupts are counted, if the device said.
    metrics: Option<Arc<dyn DeviceMetrics>>,
}

impl<M> fmt::Debug for ActiveQueue<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActiveQueue")
            .field("index", &self.index)
            .field("size", &self.queue.size())
            .field("next_avail", &self.queue.next_avail())
            .field("next_used", &self.queue.next_used())
            .field("event_idx", &self.queue.event_idx_enabled())
            .finish_non_exhaustive()
    }
}

/// What a transport hands a queue at activation besides the ring.
pub(crate) struct QueueParts<M> {
    pub(crate) memory: M,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) needs_reset: NeedsReset,
    pub(crate) watch: Arc<QueueWatch<M>>,
}

impl<M: VirtioMemory> ActiveQueue<M> {
    pub(crate) fn new(index: u16, queue: Queue, notifier: EventFd, parts: QueueParts<M>) -> Self {
        parts
            .watch
            .activate(parts.memory.clone(), GuestAddress(queue.avail_ring()));
        parts.watch.record_positions(&queue);
        // A restored queue starts where it was: nothing is available until the driver's
        // index moves past `next_avail`.
        let avail = Wrapping(queue.next_avail());
        Self {
            index,
            queue,
            notifier,
            memory: parts.memory,
            interrupt: parts.interrupt,
            needs_reset: parts.needs_reset,
            watch: parts.watch,
            notifications: true,
            avail,
            unsignalled: false,
            scratch: Vec::new(),
            undoable: false,
            redo: false,
            metrics: None,
        }
    }

    /// Counts in `metrics`, from now on, what the queue sees for the device:
    /// [`Counter::Malformed`] for each chain [`pop`](Self::pop) returns unusable (a chain
    /// given back with [`undo_pop`](Self::undo_pop) counts once), and
    /// [`Counter::Interrupts`] for each interrupt [`signal_used`](Self::signal_used) sends.
    /// A device calls it at activation with the metrics of its configuration, and then
    /// counts only the malformed chains its own parsing rejects.
    pub fn set_metrics(&mut self, metrics: Arc<dyn DeviceMetrics>) {
        self.metrics = Some(metrics);
    }

    /// The queue's index on the transport.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The queue size the driver chose.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// Whether `VIRTIO_F_RING_EVENT_IDX` was negotiated.
    pub fn event_idx(&self) -> bool {
        self.queue.event_idx_enabled()
    }

    /// Guest memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// Signalled when the driver notifies this queue (a KVM ioeventfd in a VMM). The
    /// transport's [`QueueEventHandler`](crate::QueueEventHandler) watches a clone of it; a
    /// device may signal it itself to have the queue processed on the event thread (new
    /// host input for a receive queue, say).
    pub fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    /// virtio-queue's state of the ring (addresses, indices), for snapshots.
    pub fn state(&self) -> virtio_queue::QueueState {
        self.queue.state()
    }

    /// Whether the device is in `DEVICE_NEEDS_RESET` (a queue of it met a corrupt ring).
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.is_set()
    }

    /// After each notification, keep watching the available ring for `window` with the
    /// driver's notifications suppressed, so a driver that submits again soon does so
    /// without a VM exit ([`Duration::ZERO`], the default: no polling). The transport's
    /// event handler polls without the device's lock and calls
    /// [`VirtioDevice::process_queue`](crate::VirtioDevice::process_queue) for what arrives;
    /// it costs the event thread up to `window` of spinning per notification (bounded in
    /// rounds, so a driver that never stops submitting cannot hold it).
    pub fn set_poll(&mut self, window: Duration) {
        let ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        self.watch.poll_ns.store(ns, Ordering::Relaxed);
    }

    /// Marks the queue held by the device's rate limiter (`true`) or served again
    /// (`false`). While it is held, the transport's event handler does not poll it after a
    /// notification (nor goes on polling it), so a throttled queue costs nothing until the
    /// device's timer fires; the device takes no chain from it meanwhile (a chain it took
    /// and cannot serve yet goes back with [`undo_pop`](Self::undo_pop)).
    pub fn set_throttled(&mut self, throttled: bool) {
        self.watch.set_throttled(throttled);
    }

    /// Whether [`set_throttled`](Self::set_throttled) holds the queue.
    pub fn is_throttled(&self) -> bool {
        self.watch.throttled()
    }

    /// Puts the device in `DEVICE_NEEDS_RESET` for `error`, once, and returns it.
    fn fail(&self, error: Error) -> Error {
        if !self.needs_reset.is_set() {
            log::warn!("virtio: {error}; device needs reset");
            self.needs_reset.set();
            if let Err(e) = self.interrupt.trigger(InterruptReason::Config) {
                log::warn!("virtio: failed to signal DEVICE_NEEDS_RESET: {e}");
            }
        }
        error
    }

    fn ring_error(&self, source: virtio_queue::Error) -> Error {
        self.fail(Error::Queue {
            index: self.index,
            source,
        })
    }

    /// Reads the available index; a driver running more than a queue ahead is an error.
    fn refresh_avail(&mut self) -> Result<()> {
        let avail = self
            .queue
            .avail_idx(&self.memory, Ordering::Acquire)
            .map_err(|e| self.ring_error(e))?;
        let next = self.queue.next_avail();
        if avail.0.wrapping_sub(next) > self.queue.size() {
            return Err(self.fail(Error::InvalidAvailIndex {
                index: self.index,
                avail: avail.0,
                next,
                size: self.queue.size(),
            }));
        }
        self.avail = avail;
        Ok(())
    }

    /// Leaves driver notifications off while the queue is polled: with `EVENT_IDX`,
    /// `avail_event` just behind the next entry (the driver only notifies when it crosses
    /// it); without, the used ring's `NO_NOTIFY` flag.
    fn suppress(&mut self) -> Result<()> {
        if !self.queue.event_idx_enabled() {
            return self
                .queue
                .disable_notification(&self.memory)
                .map_err(|e| self.ring_error(e));
        }
        // The used ring was validated at activation: header, `size` elements, avail_event.
        let offset = USED_HEADER + USED_ELEMENT * u64::from(self.queue.size());
        let stored = GuestAddress(self.queue.used_ring())
            .checked_add(offset)
            .ok_or(virtio_queue::Error::AddressOverflow)
            .and_then(|at| {
                let behind = self.queue.next_avail().wrapping_sub(1);
                self.memory
                    .store(behind.to_le(), at, Ordering::Release)
                    .map_err(virtio_queue::Error::GuestMemory)
            });
        stored.map_err(|e| self.ring_error(e))
    }

    /// Moves to the next available chain: `Ok(true)` when there is one to pop, `Ok(false)`
    /// when the ring is empty (notifications back on, or left off while polling).
    fn advance(&mut self) -> Result<bool> {
        loop {
            if self.notifications {
                self.queue
                    .disable_notification(&self.memory)
                    .map_err(|e| self.ring_error(e))?;
                self.notifications = false;
            }
            if self.avail.0 == self.queue.next_avail() {
                self.refresh_avail()?;
            }
            if self.avail.0 != self.queue.next_avail() {
                return Ok(true);
            }
            if self.watch.polling() {
                self.suppress()?;
                return Ok(false);
            }
            let more = self
                .queue
                .enable_notification(&self.memory)
                .map_err(|e| self.ring_error(e))?;
            self.notifications = true;
            if !more {
                return Ok(false);
            }
        }
    }

    /// The next available chain, checked, or `None` when the ring is empty (or the device
    /// needs a reset). The chain borrows the queue: take what you need from it, then
    /// [`complete`](Self::complete) its head, now or after the I/O.
    ///
    /// # Errors
    ///
    /// A corrupt ring ([`Error::InvalidAvailIndex`], [`Error::AvailRingUnreadable`],
    /// [`Error::Queue`]): the device is then in `DEVICE_NEEDS_RESET` already.
    pub fn pop(&mut self) -> Result<Option<Chain<'_, M>>> {
        let redo = std::mem::take(&mut self.redo);
        if self.needs_reset.is_set() || !self.advance()? {
            return Ok(None);
        }
        let Some(chain) = self.queue.pop_descriptor_chain(&self.memory) else {
            return Err(self.fail(Error::AvailRingUnreadable(self.index)));
        };
        self.watch.record_positions(&self.queue);
        let head = chain.head_index();
        let raw = chain.clone();
        let checked = collect_chain(chain, &mut self.scratch);
        if let (Err(_), Some(m), false) = (&checked, &self.metrics, redo) {
            m.inc(Counter::Malformed);
        }
        self.undoable = true;
        Ok(Some(Chain {
            head,
            descriptors: checked.map(|()| self.scratch.as_slice()),
            memory: &self.memory,
            raw,
        }))
    }

    /// Gives back the chain [`pop`](Self::pop) returned last, unused: the next `pop`
    /// returns it again. For a device that takes a receive chain before it knows it has
    /// something to put in it. Does nothing unless the last call on the queue was a `pop`
    /// that returned a chain.
    pub fn undo_pop(&mut self) {
        if std::mem::take(&mut self.undoable) {
            self.queue.go_to_previous_position();
            self.watch.record_positions(&self.queue);
            self.redo = true;
        }
    }

    /// Gives back the `count` chains taken last and not completed, unused: the following
    /// pops return them again, and a snapshot taken now records them as available, not
    /// taken. For a device that holds chains it has not filled (receive buffers waiting for
    /// host input) when it is asked to rest for a snapshot: a restored device starts from the
    /// saved ring position and would never complete chains taken before it. The chains
    /// given back must be the last ones taken (a device holding receive chains in the order
    /// it took them and filling the oldest first has exactly those); `count` is capped at
    /// the number taken and not completed. Returns how many were given back.
    pub fn give_back(&mut self, count: u16) -> u16 {
        let outstanding = self.queue.next_avail().wrapping_sub(self.queue.next_used());
        let n = count.min(outstanding);
        for _ in 0..n {
            self.queue.go_to_previous_position();
        }
        if n > 0 {
            self.undoable = false;
            self.redo = true;
            self.watch.record_positions(&self.queue);
        }
        n
    }

    /// Puts chain `head` in the used ring with `len` bytes written into its buffers.
    ///
    /// # Errors
    ///
    /// A head outside the queue or a used ring that cannot be written: the device is then
    /// in `DEVICE_NEEDS_RESET`.
    pub fn complete(&mut self, head: u16, len: u32) -> Result<()> {
        self.undoable = false;
        if self.needs_reset.is_set() {
            return Ok(());
        }
        self.queue
            .add_used(&self.memory, head, len)
            .map_err(|e| self.ring_error(e))?;
        self.watch.record_positions(&self.queue);
        self.unsignalled = true;
        Ok(())
    }

    /// Interrupts the driver for what was completed since the last call, if the driver
    /// wants it: with `EVENT_IDX`, once the used index passes its `used_event`; without,
    /// unless it set `VRING_AVAIL_F_NO_INTERRUPT`. Returns whether it interrupted.
    ///
    /// # Errors
    ///
    /// The ring cannot be read, or the interrupt cannot be raised: the device is then in
    /// `DEVICE_NEEDS_RESET`.
    pub fn signal_used(&mut self) -> Result<bool> {
        if !std::mem::take(&mut self.unsignalled) || self.needs_reset.is_set() {
            return Ok(false);
        }
        if !self.driver_wants_interrupt()? {
            return Ok(false);
        }
        self.interrupt
            .trigger(InterruptReason::Queue(self.index))
            .map_err(|e| self.fail(Error::Interrupt(e)))?;
        if let Some(m) = &self.metrics {
            m.inc(Counter::Interrupts);
        }
        Ok(true)
    }

    fn driver_wants_interrupt(&mut self) -> Result<bool> {
        if self.queue.event_idx_enabled() {
            return self
                .queue
                .needs_notification(&self.memory)
                .map_err(|e| self.ring_error(e));
        }
        // Order the used ring writes before reading the driver's flags.
        fence(Ordering::SeqCst);
        let flags: u16 = self
            .memory
            .load(GuestAddress(self.queue.avail_ring()), Ordering::Acquire)
            .map_err(|e| self.ring_error(virtio_queue::Error::GuestMemory(e)))?;
        Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
    }

    /// Whether the driver has made chains available that are not taken yet (an atomic read
    /// of its index; notifications are not touched).
    pub fn has_available(&self) -> bool {
        read_avail_idx(&self.memory, GuestAddress(self.queue.avail_ring()))
            .is_some_and(|avail| avail != self.queue.next_avail())
    }
}

impl<M> Drop for ActiveQueue<M> {
    fn drop(&mut self) {
        self.watch.deactivate();
    }
}

#[cfg(test)]
mod tests;
