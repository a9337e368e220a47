//! The transport-independent device model: what every virtio device implements.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::{InterruptReason, VirtioInterrupt};
use crate::queue::{ActiveQueue, QueueParts, QueueWatch, VirtioMemory};
use crate::ActivateError;

/// `VIRTIO_F_RING_INDIRECT_DESC` (bit 28) as a mask.
pub const FEATURE_RING_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// `VIRTIO_F_RING_EVENT_IDX` (bit 29) as a mask.
pub const FEATURE_RING_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// `VIRTIO_F_VERSION_1` (bit 32) as a mask. Transports always offer it and require it.
pub const FEATURE_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// The ring features this crate's queue plumbing implements (on virtio-queue): indirect
/// descriptors and event-index notification suppression.
pub const RING_FEATURES: u64 = FEATURE_RING_INDIRECT_DESC | FEATURE_RING_EVENT_IDX;

/// A virtio device, independent of the transport (virtio-mmio, virtio-pci) it sits on, and
/// generic over the guest memory type `M` as virtio-queue is (default: `GuestMemoryMmap`
/// without a dirty bitmap; any [`VirtioMemory`] works, a bitmap-tracking one included).
///
/// The transport owns the device as `Arc<Mutex<dyn VirtioDevice<M>>>`, runs the status and
/// feature negotiation, keeps the queue configuration the driver writes and, when the
/// driver sets `DRIVER_OK`, hands the device an [`ActivateContext`]: guest memory, the
/// ready queues (each an [`ActiveQueue`], the virtqueue protocol), and an interrupt. The
/// device never sees the transport, the bus or KVM.
///
/// Queue notifications reach [`process_queue`](Self::process_queue) through the
/// transport's [`QueueEventHandler`](crate::QueueEventHandler), an event-manager subscriber,
/// which holds the device's lock only while it calls the device (it polls a queue, when the
/// device asked for it with [`ActiveQueue::set_poll`], without it).
pub trait VirtioDevice<M: VirtioMemory = GuestMemoryMmap>: Send {
    /// The virtio device ID (1 net, 2 block, 3 console, 4 entropy…).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue, in queue order: each a power of two, at most 32768.
    fn queue_max_sizes(&self) -> &[u16];

    /// The device-specific feature bits the device offers. The transport adds
    /// `VIRTIO_F_VERSION_1` and the ring features of [`ring_features`](Self::ring_features).
    fn device_features(&self) -> u64;

    /// Which of [`RING_FEATURES`] the transport may offer for this device (default: both;
    /// mask a bit out if the device's own processing cannot honour it).
    fn ring_features(&self) -> u64 {
        RING_FEATURES
    }

    /// The features the driver accepted (a subset of what was offered, `VERSION_1`
    /// included), once, when the transport accepts `FEATURES_OK`.
    fn ack_features(&mut self, features: u64);

    /// Reads the device configuration space at `offset` into `data` (1, 2 or 4 bytes,
    /// pre-filled with zeros). Out-of-range reads should leave the zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space at `offset` (1, 2 or 4 bytes). Writes to
    /// read-only or unknown fields should be ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device with what the driver set up. On error the transport sets
    /// `DEVICE_NEEDS_RESET` and the device stays inactive.
    fn activate(&mut self, context: ActivateContext<M>) -> Result<(), ActivateError>;

    /// Handles a notification of queue `index` (the driver made buffers available), with
    /// the queue's [`pop`](ActiveQueue::pop), [`complete`](ActiveQueue::complete) and
    /// [`signal_used`](ActiveQueue::signal_used). A device that polls its notifiers itself
    /// may leave the default, which does nothing.
    fn process_queue(&mut self, index: u16) {
        let _ = index;
    }

    /// Eventfds the device owns and wants the VMM's event loop to watch besides the queue
    /// notifiers (an I/O completion eventfd, say), each with a token the device chooses.
    /// The transport asks once, when it builds its
    /// [`QueueEventHandler`](crate::QueueEventHandler), so the fds must live as long as the
    /// device (across resets); the handler calls
    /// [`process_device_event`](Self::process_device_event) with the token when one fires.
    /// Default: none.
    fn device_events(&self) -> std::io::Result<Vec<(u16, EventFd)>> {
        Ok(Vec::new())
    }

    /// File descriptors the device reads itself and wants watched for readability (a TAP,
    /// a socket), each with a token the device chooses, distinct from its
    /// [`device_events`](Self::device_events) tokens. The handler watches them
    /// edge-triggered and never reads them: when one becomes readable it calls
    /// [`process_device_event`](Self::process_device_event) with the token, and the device
    /// reads until the fd would block (or until it chooses to stop, say for lack of guest
    /// buffers, resuming on a later queue notification). Asked for once, as
    /// `device_events`: return duplicates (`try_clone`) of fds that live as long as the
    /// device. Default: none.
    fn readable_fds(&self) -> std::io::Result<Vec<(u16, std::os::fd::OwnedFd)>> {
        Ok(Vec::new())
    }

    /// Handles a readable [`device_events`](Self::device_events) fd, after the handler
    /// consumed its counter, or a [`readable_fds`](Self::readable_fds) fd that became
    /// readable. Default: nothing.
    fn process_device_event(&mut self, token: u16) {
        let _ = token;
    }

    /// Brings the device to rest for a pause: host I/O it has in flight that would write
    /// guest memory (reads completing into guest buffers) is waited for and completed into
    /// the used rings, so that nothing touches guest memory until its events are processed
    /// again. A VMM calls it after it stopped dispatching the device's events. The device
    /// takes no new requests here. Default: nothing (devices without asynchronous host I/O).
    fn quiesce(&mut self) {}

    /// Returns the device to its state before activation (negotiated features forgotten),
    /// giving back the context it was activated with, if any. The device writes no ring
    /// and no status after it returns (no used entry, no request status, no interrupt). It
    /// should return at once (a vCPU waits on it): host I/O still in flight may be left to
    /// finish, and orphaned reads may still fill their guest buffers (the memory stays
    /// mapped while the device holds a clone of it), as long as their completions are
    /// dropped and a re-activated device does not hand the driver's new buffers out before
    /// that I/O is over.
    fn reset(&mut self) -> Option<ActivateContext<M>>;
}

/// Copies the bytes of a device's configuration space `space` at `offset` into `data`, for
/// [`VirtioDevice::read_config`]: a read that does not lie wholly inside `space` (the
/// driver's offset and width are not to be trusted) leaves `data` as it is.
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    let Some(end) = start.checked_add(data.len()).filter(|e| *e <= space.len()) else {
        return;
    };
    data.copy_from_slice(&space[start..end]);
}

/// The `DEVICE_NEEDS_RESET` state shared between a transport and an activated device.
///
/// The device's queues set it (through [`ActiveQueue`]'s methods, or
/// [`ActivateContext::set_needs_reset`]) when the driver broke the queue rules; the transport
/// shows it in its status register.
#[derive(Clone, Debug, Default)]
pub struct NeedsReset(Arc<AtomicBool>);

impl NeedsReset {
    /// A flag that is clear.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag.
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a device gets when the driver sets `DRIVER_OK`.
///
/// A device keeps it (typically as `Option<ActivateContext<M>>`) until
/// [`VirtioDevice::reset`] gives it back.
pub struct ActivateContext<M: VirtioMemory = GuestMemoryMmap> {
    memory: M,
    features: u64,
    /// The ready queues, by index (`None`: not made ready by the driver).
    queues: Vec<Option<ActiveQueue<M>>>,
    interrupt: Arc<dyn VirtioInterrupt>,
    needs_reset: NeedsReset,
}

impl<M: VirtioMemory> fmt::Debug for ActivateContext<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActivateContext")
            .field("features", &format_args!("{:#x}", self.features))
            .field("queues", &self.queues)
            .field("needs_reset", &self.needs_reset.is_set())
            .finish_non_exhaustive()
    }
}

impl<M: VirtioMemory> ActivateContext<M> {
    /// A context over `queues`, `(index, queue, notifier)` each (device unit tests build
    /// one this way; `test_utils::activate_context` does it over mock rings).
    pub fn new(
        memory: M,
        features: u64,
        queues: Vec<(u16, Queue, EventFd)>,
        interrupt: Arc<dyn VirtioInterrupt>,
        needs_reset: NeedsReset,
    ) -> Self {
        let queues = queues
            .into_iter()
            .map(|(index, queue, notifier)| {
                (index, queue, notifier, Arc::new(QueueWatch::default()))
            })
            .collect();
        Self::with_watches(memory, features, queues, interrupt, needs_reset)
    }

    /// As [`new`](Self::new), with the transport's watch of each queue.
    pub(crate) fn with_watches(
        memory: M,
        features: u64,
        queues: Vec<(u16, Queue, EventFd, Arc<QueueWatch<M>>)>,
        interrupt: Arc<dyn VirtioInterrupt>,
        needs_reset: NeedsReset,
    ) -> Self {
        let mut by_index: Vec<Option<ActiveQueue<M>>> = Vec::new();
        for (index, queue, notifier, watch) in queues {
            let i = usize::from(index);
            if by_index.len() <= i {
                by_index.resize_with(i + 1, || None);
            }
            let parts = QueueParts {
                memory: memory.clone(),
                interrupt: interrupt.clone(),
                needs_reset: needs_reset.clone(),
                watch,
            };
            by_index[i] = Some(ActiveQueue::new(index, queue, notifier, parts));
        }
        Self {
            memory,
            features,
            queues: by_index,
            interrupt,
            needs_reset,
        }
    }

    /// Guest memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// The negotiated features (`VERSION_1` and ring features included).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether feature bit `bit` was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.features & (1 << bit) != 0
    }

    /// The ready queues, in index order.
    pub fn queues(&self) -> impl Iterator<Item = &ActiveQueue<M>> {
        self.queues.iter().flatten()
    }

    /// The ready queues, in index order, mutably.
    pub fn queues_mut(&mut self) -> impl Iterator<Item = &mut ActiveQueue<M>> {
        self.queues.iter_mut().flatten()
    }

    /// The ready queue with this index.
    pub fn queue(&self, index: u16) -> Option<&ActiveQueue<M>> {
        self.queues.get(usize::from(index))?.as_ref()
    }

    /// The ready queue with this index, mutably.
    pub fn queue_mut(&mut self, index: u16) -> Option<&mut ActiveQueue<M>> {
        self.queues.get_mut(usize::from(index))?.as_mut()
    }

    /// The interrupt.
    pub fn interrupt(&self) -> &Arc<dyn VirtioInterrupt> {
        &self.interrupt
    }

    /// Sends a configuration change notification (after the device changed its config).
    pub fn signal_config(&self) -> std::io::Result<()> {
        self.interrupt.trigger(InterruptReason::Config)
    }

    /// Enters `DEVICE_NEEDS_RESET` and notifies the driver with a configuration change
    /// interrupt, as the spec asks of a device that met a driver error it cannot recover
    /// from. Processing should stop until the driver resets the device (the queues do
    /// nothing more).
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.is_set() {
            self.needs_reset.set();
            if let Err(e) = self.interrupt.trigger(InterruptReason::Config) {
                log::warn!("virtio: failed to signal DEVICE_NEEDS_RESET: {e}");
            }
        }
    }

    /// Whether the device is in `DEVICE_NEEDS_RESET`.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.is_set()
    }
}

#[cfg(test)]
mod tests {
    use super::read_config_space;

    #[test]
    fn config_reads_stay_inside_the_space() {
        let space = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let mut d = [0u8; 4];
        read_config_space(&space, 4, &mut d);
        assert_eq!(d, [5, 6, 7, 8]);
        for (offset, len) in [(5, 4), (8, 1), (u64::MAX, 2), (u64::MAX - 1, 4)] {
            let mut d = vec![0xaa; len];
            read_config_space(&space, offset, &mut d);
            assert!(d.iter().all(|b| *b == 0xaa), "{offset} {len}");
        }
        let mut d = [0u8; 2];
        read_config_space(&space, 6, &mut d);
        assert_eq!(d, [7, 8]);
    }
}
