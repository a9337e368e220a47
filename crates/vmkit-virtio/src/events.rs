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
/// [`VirtioDevice::process_queue`] for each one that fires, and the device's own eventfds
/// ([`VirtioDevice::device_events`], e.g. I/O completions) calling
/// [`VirtioDevice::process_device_event`].
///
/// Get one from the transport ([`MmioTransport::queue_event_handler`](crate::MmioTransport::queue_event_handler))
/// and add it to the VMM's `EventManager` once, at start-up: the notifiers live as long as
/// the transport, across device resets and re-activations (a notification for a queue the
/// device has not activated is a no-op in the device).
pub struct QueueEventHandler {
    device: Arc<Mutex<dyn VirtioDevice>>,
    notifiers: Vec<(u16, EventFd)>,
    device_events: Vec<(u16, EventFd)>,
}

/// The epoll data of a device event: this bit plus the device's token (queue notifiers
/// carry their index, below it).
const DEVICE_EVENT: u32 = 1 << 16;

impl fmt::Debug for QueueEventHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueEventHandler")
            .field(
                "queues",
                &self.notifiers.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
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

impl QueueEventHandler {
    /// A handler calling `device` for each `(queue index, notifier)` pair.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, notifiers: Vec<(u16, EventFd)>) -> Self {
        Self {
            device,
            notifiers,
            device_events: Vec::new(),
        }
    }

    /// Also watches these device-owned eventfds, `(token, fd)` (the transports' handlers
    /// carry [`VirtioDevice::device_events`]).
    pub fn with_device_events(mut self, events: Vec<(u16, EventFd)>) -> Self {
        self.device_events = events;
        self
    }

    /// Consumes a pending signal of the device event `token` (if any) and runs the
    /// device's [`process_device_event`](VirtioDevice::process_device_event). Returns
    /// whether a signal was pending.
    pub fn handle_device_event(&mut self, token: u16) -> bool {
        let Some((_, fd)) = self.device_events.iter().find(|(t, _)| *t == token) else {
            return false;
        };
        if fd.read().is_err() {
            return false;
        }
        lock_device(&self.device).process_device_event(token);
        true
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
        let tokens: Vec<u16> = self.device_events.iter().map(|(t, _)| *t).collect();
        indices.into_iter().filter(|i| self.handle(*i)).count()
            + tokens
                .into_iter()
                .filter(|t| self.handle_device_event(*t))
                .count()
    }
}

impl MutEventSubscriber for QueueEventHandler {
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
        for (index, fd) in &self.notifiers {
            if let Err(e) = ops.add(Events::with_data(fd, u32::from(*index), EventSet::IN)) {
                log::error!("virtio: cannot watch the notifier of queue {index}: {e}");
            }
        }
        for (token, fd) in &self.device_events {
            let data = DEVICE_EVENT | u32::from(*token);
            if let Err(e) = ops.add(Events::with_data(fd, data, EventSet::IN)) {
                log::error!("virtio: cannot watch device event {token}: {e}");
            }
        }
    }
}
