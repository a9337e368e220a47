//! The glue that runs an activated device from its queue notifiers, and polls a queue after
//! a notification when the device asked for it.

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::device::VirtioDevice;
use crate::queue::{read_avail_idx, QueueWatch, VirtioMemory};

/// Locks a device, recovering it if a previous holder panicked (a device bug must not take
/// the transport down with it).
pub(crate) fn lock_device<'a, M: VirtioMemory>(
    device: &'a Mutex<dyn VirtioDevice<M> + 'static>,
) -> MutexGuard<'a, dyn VirtioDevice<M> + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polling rounds after one notification before the event thread goes back to its other
/// work (notifications are on again then, so the next request simply arrives as one): a
/// driver that never stops submitting cannot hold the thread.
pub const MAX_POLL_ROUNDS: u32 = 256;

/// The epoll data of a device event: this bit plus the device's token (queue notifiers
/// carry their index, below it).
const DEVICE_EVENT: u32 = 1 << 16;

struct WatchedQueue<M> {
    index: u16,
    notifier: EventFd,
    watch: Arc<QueueWatch<M>>,
}

/// An event-manager subscriber that watches a device's queue notifiers and calls
/// [`VirtioDevice::process_queue`] for each one that fires, and the device's own eventfds
/// ([`VirtioDevice::device_events`], e.g. I/O completions) calling
/// [`VirtioDevice::process_device_event`].
///
/// When a queue has a polling window ([`ActiveQueue::set_poll`](crate::ActiveQueue::set_poll)),
/// a notification starts a poll: the handler keeps the driver's notifications suppressed and
/// watches the available ring for the window, *without the device's lock*, serving new
/// chains (and the device's events) as they come, up to [`MAX_POLL_ROUNDS`] windows; then it
/// turns notifications back on through one last `process_queue`. A vCPU reading the device's
/// registers meanwhile waits for one `process_queue` at most.
///
/// Get one from the transport
/// ([`MmioTransport::queue_event_handler`](crate::MmioTransport::queue_event_handler)) and
/// add it to the VMM's `EventManager` once, at start-up: the notifiers live as long as the
/// transport, across device resets and re-activations (a notification for a queue the
/// device has not activated is a no-op in the device).
pub struct QueueEventHandler<M: VirtioMemory = GuestMemoryMmap> {
    device: Arc<Mutex<dyn VirtioDevice<M>>>,
    queues: Vec<WatchedQueue<M>>,
    device_events: Vec<(u16, EventFd)>,
    readable_fds: Vec<(u16, OwnedFd)>,
}

impl<M: VirtioMemory> fmt::Debug for QueueEventHandler<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueEventHandler")
            .field(
                "queues",
                &self.queues.iter().map(|q| q.index).collect::<Vec<_>>(),
            )
            .field(
                "device_events",
                &self
                    .device_events
                    .iter()
                    .map(|(t, _)| *t)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl<M: VirtioMemory> QueueEventHandler<M> {
    /// A handler calling `device` for each `(queue index, notifier)` pair (no polling: the
    /// transports' handlers poll).
    pub fn new(device: Arc<Mutex<dyn VirtioDevice<M>>>, notifiers: Vec<(u16, EventFd)>) -> Self {
        let notifiers = notifiers
            .into_iter()
            .map(|(i, fd)| (i, fd, Arc::new(QueueWatch::default())))
            .collect();
        Self::with_watches(device, notifiers)
    }

    pub(crate) fn with_watches(
        device: Arc<Mutex<dyn VirtioDevice<M>>>,
        notifiers: Vec<(u16, EventFd, Arc<QueueWatch<M>>)>,
    ) -> Self {
        Self {
            device,
            queues: notifiers
                .into_iter()
                .map(|(index, notifier, watch)| WatchedQueue {
                    index,
                    notifier,
                    watch,
                })
                .collect(),
            device_events: Vec::new(),
            readable_fds: Vec::new(),
        }
    }

    /// Also watches these device-owned eventfds, `(token, fd)` (the transports' handlers
    /// carry [`VirtioDevice::device_events`]).
    pub fn with_device_events(mut self, events: Vec<(u16, EventFd)>) -> Self {
        self.device_events = events;
        self
    }

    /// Also watches these fds the device reads itself, `(token, fd)` (the transports'
    /// handlers carry [`VirtioDevice::readable_fds`]): edge-triggered, never read here.
    pub fn with_readable_fds(mut self, fds: Vec<(u16, OwnedFd)>) -> Self {
        self.readable_fds = fds;
        self
    }

    fn lock(&self) -> MutexGuard<'_, dyn VirtioDevice<M> + 'static> {
        lock_device(&self.device)
    }

    /// Consumes a pending signal of the device event `token` (if any) and runs the
    /// device's [`process_device_event`](VirtioDevice::process_device_event). Returns
    /// whether a signal was pending.
    pub fn handle_device_event(&mut self, token: u16) -> bool {
        if self.readable_fds.iter().any(|(t, _)| *t == token) {
            self.lock().process_device_event(token);
            return true;
        }
        let Some((_, fd)) = self.device_events.iter().find(|(t, _)| *t == token) else {
            return false;
        };
        if fd.read().is_err() {
            return false;
        }
        self.lock().process_device_event(token);
        true
    }

    /// Serves every device event that is pending, without blocking.
    fn poll_device_events(&mut self) {
        for i in 0..self.device_events.len() {
            let token = self.device_events[i].0;
            if self.device_events[i].1.read().is_ok() {
                self.lock().process_device_event(token);
            }
        }
    }

    /// Consumes a pending notification of queue `index` (if any) and runs the device's
    /// queue processing, polling the queue afterwards if it has a polling window. Returns
    /// whether a notification was pending.
    pub fn handle(&mut self, index: u16) -> bool {
        let Some(q) = self.queues.iter().position(|q| q.index == index) else {
            return false;
        };
        // Non-blocking: `Err(WouldBlock)` when nothing is pending.
        if self.queues[q].notifier.read().is_err() {
            return false;
        }
        let watch = self.queues[q].watch.clone();
        // A queue its device's rate limiter holds is not polled: the device's timer brings
        // it back.
        match watch
            .ring()
            .filter(|_| !watch.poll().is_zero() && !watch.throttled())
        {
            Some((memory, avail_ring)) => self.poll_queue(index, &watch, &memory, avail_ring),
            None => self.lock().process_queue(index),
        }
        true
    }

    /// Serves queue `index`, then watches its available ring for the polling window with
    /// notifications suppressed, serving what arrives; ends with notifications on.
    fn poll_queue(
        &mut self,
        index: u16,
        watch: &QueueWatch<M>,
        memory: &M,
        avail_ring: vm_memory::GuestAddress,
    ) {
        watch.set_polling(true);
        // What the device has been given the chance to see: anything past it is new.
        let mut seen = read_avail_idx(memory, avail_ring);
        self.lock().process_queue(index);
        for _ in 0..MAX_POLL_ROUNDS {
            if watch.throttled() {
                break;
            }
            let deadline = Instant::now() + watch.poll();
            let mut arrived = false;
            while Instant::now() < deadline && seen.is_some() {
                self.poll_device_events();
                let now = read_avail_idx(memory, avail_ring);
                if now != seen {
                    seen = now;
                    arrived = true;
                    break;
                }
                std::hint::spin_loop();
            }
            if !arrived {
                break;
            }
            self.lock().process_queue(index);
        }
        watch.set_polling(false);
        // Notifications back on, and the ring checked once more, by the device's own pop.
        self.lock().process_queue(index);
    }

    /// Runs [`handle`](Self::handle) for every queue and
    /// [`handle_device_event`](Self::handle_device_event) for every device event; returns
    /// how many had a signal pending. For tests and for VMMs that poll instead of using
    /// event-manager.
    pub fn poll(&mut self) -> usize {
        let indices: Vec<u16> = self.queues.iter().map(|q| q.index).collect();
        let tokens: Vec<u16> = self.device_events.iter().map(|(t, _)| *t).collect();
        let readable: Vec<u16> = self
            .readable_fds
            .iter()
            .filter(|(_, fd)| is_readable(fd))
            .map(|(t, _)| *t)
            .collect();
        readable
            .into_iter()
            .filter(|t| self.handle_device_event(*t))
            .count()
            + indices.into_iter().filter(|i| self.handle(*i)).count()
            + tokens
                .into_iter()
                .filter(|t| self.handle_device_event(*t))
                .count()
    }
}

impl<M: VirtioMemory> MutEventSubscriber for QueueEventHandler<M> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        // The queue index (or DEVICE_EVENT | token) travels in the epoll data.
        let data = events.data();
        if data & DEVICE_EVENT != 0 {
            if let Ok(token) = u16::try_from(data & !DEVICE_EVENT) {
                self.handle_device_event(token);
            }
            return;
        }
        let Ok(index) = u16::try_from(data) else {
            return;
        };
        self.handle(index);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for q in &self.queues {
            let data = u32::from(q.index);
            if let Err(e) = ops.add(Events::with_data(&q.notifier, data, EventSet::IN)) {
                log::error!(
                    "virtio: cannot watch the notifier of queue {}: {e}",
                    q.index
                );
            }
        }
        for (token, fd) in &self.device_events {
            let data = DEVICE_EVENT | u32::from(*token);
            if let Err(e) = ops.add(Events::with_data(fd, data, EventSet::IN)) {
                log::error!("virtio: cannot watch device event {token}: {e}");
            }
        }
        for (token, fd) in &self.readable_fds {
            let data = DEVICE_EVENT | u32::from(*token);
            let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::with_data_raw(fd.as_raw_fd(), data, set)) {
                log::error!("virtio: cannot watch device fd {token}: {e}");
            }
        }
    }
}

/// Whether `fd` is readable now (a zero-timeout `poll`).
fn is_readable(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call; timeout 0 never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::device::NeedsReset;
    use crate::interrupt::{InterruptReason, VirtioInterrupt};
    use crate::{ActivateContext, ActivateError};

    struct NoIrq;
    impl VirtioInterrupt for NoIrq {
        fn trigger(&self, _: InterruptReason) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Completes every chain; counts the chains and the calls.
    struct Counter {
        ctx: Option<ActivateContext>,
        chains: Arc<AtomicUsize>,
        calls: Arc<AtomicUsize>,
    }

    impl VirtioDevice for Counter {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn device_features(&self) -> u64 {
            0
        }
        fn ack_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            self.ctx = Some(ctx);
            Ok(())
        }
        fn process_queue(&mut self, index: u16) {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let Some(q) = self.ctx.as_mut().and_then(|c| c.queue_mut(index)) else {
                return;
            };
            while let Ok(Some(chain)) = q.pop() {
                let head = chain.head();
                let _ = q.complete(head, 0);
                self.chains.fetch_add(1, Ordering::SeqCst);
            }
            let _ = q.signal_used();
        }
        fn reset(&mut self) -> Option<ActivateContext> {
            self.ctx.take()
        }
    }

    fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, n: u16) {
        let d = RawDescriptor::from(Descriptor::new(0x8000, 16, 0, 0));
        vq.add_desc_chains(&[d], n).unwrap();
    }

    /// A `Counter` on a one-queue mock ring (used ring at 0x1000) polled for `window`, and
    /// the handler watching it.
    struct Rig {
        watch: Arc<QueueWatch<GuestMemoryMmap>>,
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        handler: QueueEventHandler,
        notifier: EventFd,
        chains: Arc<AtomicUsize>,
        calls: Arc<AtomicUsize>,
    }

    fn rig(window: Duration) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(0x1000))
            .unwrap();
        let watch = Arc::new(QueueWatch::default());
        let notifier = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut ctx = ActivateContext::with_watches(
            mem.clone(),
            0,
            vec![(0, queue, notifier.try_clone().unwrap(), watch.clone())],
            Arc::new(NoIrq),
            NeedsReset::new(),
        );
        ctx.queue_mut(0).unwrap().set_poll(window);
        let (chains, calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Counter {
            ctx: Some(ctx),
            chains: chains.clone(),
            calls: calls.clone(),
        }));
        let handler = QueueEventHandler::with_watches(
            device.clone(),
            vec![(0, notifier.try_clone().unwrap(), watch.clone())],
        );
        Rig {
            watch,
            mem,
            device,
            handler,
            notifier,
            chains,
            calls,
        }
    }

    #[test]
    fn a_poll_serves_chains_without_notifications_and_without_holding_the_device() {
        let Rig {
            mem,
            device,
            mut handler,
            notifier,
            chains,
            calls,
            ..
        } = rig(Duration::from_millis(200));
        // The same rings as the rig's (the mock writes where its own layout says).
        let vq = MockSplitQueue::new(&mem, 16);
        let used_flags = GuestAddress(0x1000);
        // One notified chain; the handler then polls on the event thread.
        add_chain(&vq, 0);
        notifier.write(1).unwrap();
        let event_thread = std::thread::spawn(move || handler.handle(0));
        while chains.load(Ordering::SeqCst) < 1 {
            std::thread::yield_now();
        }
        // While it polls: notifications are off, and the device's lock is free.
        assert_eq!(mem.read_obj::<u16>(used_flags).unwrap(), 1, "NO_NOTIFY");
        drop(device.lock().unwrap());
        // A chain added without a notification is served by the poll.
        add_chain(&vq, 1);
        while chains.load(Ordering::SeqCst) < 2 {
            std::thread::yield_now();
        }
        assert!(event_thread.join().unwrap());
        // The poll ended (200 ms without new chains) with notifications back on.
        assert_eq!(mem.read_obj::<u16>(used_flags).unwrap(), 0);
        assert_eq!(chains.load(Ordering::SeqCst), 2);
        assert!(calls.load(Ordering::SeqCst) >= 3, "notified, polled, final");
        assert!(notifier.read().is_err(), "no notification was needed");
    }

    #[test]
    fn a_throttled_queue_is_not_polled() {
        let Rig {
            mem,
            watch,
            mut handler,
            notifier,
            calls,
            ..
        } = rig(Duration::from_secs(30));
        let vq = MockSplitQueue::new(&mem, 16);
        add_chain(&vq, 0);
        watch.set_throttled(true);
        notifier.write(1).unwrap();
        let start = Instant::now();
        assert!(handler.handle(0));
        // One call (the device sees the notification), no 30 s window of polling.
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(!watch.polling());
    }

    #[test]
    fn a_driver_that_never_stops_cannot_hold_the_event_thread() {
        let Rig {
            mem,
            mut handler,
            notifier,
            chains,
            calls,
            ..
        } = rig(Duration::from_secs(1));
        let used_idx = GuestAddress(0x1002);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            // The driver: a new chain as soon as the last one is used, forever.
            s.spawn(|| {
                // The same rings as `vq` (the mock is not Sync: one of its own).
                let vq = MockSplitQueue::new(&mem, 16);
                let mut n = 0u16;
                while !stop.load(Ordering::SeqCst) {
                    if mem.read_obj::<u16>(used_idx).unwrap() == n {
                        add_chain(&vq, n % 16);
                        n = n.wrapping_add(1);
                    }
                    std::hint::spin_loop();
                }
            });
            notifier.write(1).unwrap();
            assert!(handler.handle(0), "returns although work never stops");
            stop.store(true, Ordering::SeqCst);
        });
        let calls = calls.load(Ordering::SeqCst);
        assert!(calls <= MAX_POLL_ROUNDS as usize + 2, "{calls} calls");
        assert!(chains.load(Ordering::SeqCst) > 16, "the poll served chains");
    }
}
