//! The glue that runs an activated device from its queue notifiers.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::device::VirtioDevice;

/// Locks a device, recovering it if a previous holder panicked (a device bug must not take
/// the transport down with it).
pub(crate) fn lock_device<'a>(
    device: &'a Mutex<dyn VirtioDevice + 'static>,
) -> MutexGuard<'a, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

/// An event-manager subscriber that watches a device's queue notifiers and calls
/// [`VirtioDevice::process_queue`] for each one that fires.
///
/// Get one from the transport ([`MmioTransport::queue_event_handler`](crate::MmioTransport::queue_event_handler))
/// and add it to the VMM's `EventManager` once, at start-up: the notifiers live as long as
/// the transport, across device resets and re-activations (a notification for a queue the
/// device has not activated is a no-op in the device).
pub struct QueueEventHandler {
    device: Arc<Mutex<dyn VirtioDevice>>,
    notifiers: Vec<(u16, EventFd)>,
}

impl fmt::Debug for QueueEventHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueEventHandler")
            .field(
                "queues",
                &self.notifiers.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl QueueEventHandler {
    /// A handler calling `device` for each `(queue index, notifier)` pair.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, notifiers: Vec<(u16, EventFd)>) -> Self {
        Self { device, notifiers }
    }

    /// Consumes a pending notification of queue `index` (if any) and runs the device's
    /// queue processing. Returns whether a notification was pending.
    pub fn handle(&mut self, index: u16) -> bool {
        let Some((_, fd)) = self.notifiers.iter().find(|(i, _)| *i == index) else {
            return false;
        };
        // Non-blocking: `Err(WouldBlock)` when nothing is pending.
        if fd.read().is_err() {
            return false;
        }
        lock_device(&self.device).process_queue(index);
        true
    }

    /// Runs [`handle`](Self::handle) for every queue; returns how many had a pending
    /// notification. For tests and for VMMs that poll instead of using event-manager.
    pub fn poll(&mut self) -> usize {
        let indices: Vec<u16> = self.notifiers.iter().map(|(i, _)| *i).collect();
        indices.into_iter().filter(|i| self.handle(*i)).count()
    }
}

impl MutEventSubscriber for QueueEventHandler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        // The queue index travels in the epoll data; it was a u16 when registered.
        let Ok(index) = u16::try_from(events.data()) else {
            return;
        };
        self.handle(index);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, fd) in &self.notifiers {
            if let Err(e) = ops.add(Events::with_data(fd, u32::from(*index), EventSet::IN)) {
                log::error!("virtio: cannot watch the notifier of queue {index}: {e}");
            }
        }
    }
}
