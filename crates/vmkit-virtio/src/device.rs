//! The transport-independent device model: what every virtio device implements.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::{InterruptReason, VirtioInterrupt};
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

/// A virtio device, independent of the transport (virtio-mmio, virtio-pci) it sits on.
///
/// The transport owns the device as `Arc<Mutex<dyn VirtioDevice>>`, runs the status and
/// feature negotiation, keeps the queue configuration the driver writes and, when the
/// driver sets `DRIVER_OK`, hands the device an [`ActivateContext`]: guest memory, the
/// ready queues, one notifier per queue and an interrupt. The device never sees the
/// transport, the bus or KVM.
///
/// Queue notifications reach [`process_queue`](Self::process_queue) through
/// [`QueueEventHandler`](crate::QueueEventHandler), an event-manager subscriber: a device
/// that keeps its context and implements `process_queue` with
/// [`ActivateContext::process_queue`] needs no event loop of its own.
pub trait VirtioDevice: Send {
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
    fn activate(&mut self, context: ActivateContext) -> Result<(), ActivateError>;

    /// Handles a notification of queue `index` (the driver made buffers available). Called by
    /// [`QueueEventHandler`](crate::QueueEventHandler) and test harnesses; a device that
    /// polls its notifiers itself may leave the default, which does nothing.
    fn process_queue(&mut self, index: u16) {
        let _ = index;
    }

    /// Eventfds the device owns and wants the VMM's event loop to watch besides the queue
    /// notifiers (an I/O completion eventfd, say), each with a token the device chooses.
    /// [`QueueEventHandler`](crate::QueueEventHandler) asks once, when the transport builds
    /// it, so the fds must live as long as the device (across resets), and calls
    /// [`process_device_event`](Self::process_device_event) with the token when one fires.
    /// Default: none.
    fn device_events(&self) -> std::io::Result<Vec<(u16, EventFd)>> {
        Ok(Vec::new())
    }

    /// Handles a readable [`device_events`](Self::device_events) fd, after the handler
    /// consumed its counter. Default: nothing.
    fn process_device_event(&mut self, token: u16) {
        let _ = token;
    }

    /// Returns the device to its state before activation (negotiated features forgotten),
    /// giving back the context it was activated with, if any.
    fn reset(&mut self) -> Option<ActivateContext>;
}

/// The `DEVICE_NEEDS_RESET` state shared between a transport and an activated device.
///
/// The device sets it (through [`ActivateContext::set_needs_reset`]) when the driver broke
/// the queue rules; the transport shows it in its status register.
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

/// A queue the driver made ready, as the device gets it at activation.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The queue's index on the transport.
    pub index: u16,
    /// The virtio-queue split ring, configured and validated against guest memory,
    /// with `EVENT_IDX` set as negotiated.
    pub queue: Queue,
    /// Signalled when the driver notifies this queue (a KVM ioeventfd in a VMM). The
    /// generic [`QueueEventHandler`](crate::QueueEventHandler) watches a clone of it;
    /// a device running its own I/O thread may poll it instead.
    pub notifier: EventFd,
}

/// What a device gets when the driver sets `DRIVER_OK`.
///
/// A device keeps it (typically as `Option<ActivateContext>`) until
/// [`VirtioDevice::reset`] gives it back.
pub struct ActivateContext {
    memory: GuestMemoryMmap,
    features: u64,
    queues: Vec<ActiveQueue>,
    interrupt: Arc<dyn VirtioInterrupt>,
    needs_reset: NeedsReset,
}

impl fmt::Debug for ActivateContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActivateContext")
            .field("features", &format_args!("{:#x}", self.features))
            .field("queues", &self.queues)
            .field("needs_reset", &self.needs_reset.is_set())
            .finish_non_exhaustive()
    }
}

impl ActivateContext {
    /// A context (transports build it; so do device unit tests).
    pub fn new(
        memory: GuestMemoryMmap,
        features: u64,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
        needs_reset: NeedsReset,
    ) -> Self {
        Self {
            memory,
            features,
            queues,
            interrupt,
            needs_reset,
        }
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
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
    pub fn queues(&self) -> &[ActiveQueue] {
        &self.queues
    }

    /// The ready queue with this index.
    pub fn queue(&self, index: u16) -> Option<&ActiveQueue> {
        self.queues.iter().find(|q| q.index == index)
    }

    /// The ready queue with this index, mutably.
    pub fn queue_mut(&mut self, index: u16) -> Option<&mut ActiveQueue> {
        self.queues.iter_mut().find(|q| q.index == index)
    }

    /// Memory and a queue at once (for devices that drive virtio-queue themselves).
    pub fn memory_and_queue(&mut self, index: u16) -> Option<(&GuestMemoryMmap, &mut ActiveQueue)> {
        let q = self.queues.iter_mut().find(|q| q.index == index)?;
        Some((&self.memory, q))
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
    /// from. Processing should stop until the driver resets the device.
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

    pub(crate) fn parts_mut(
        &mut self,
        index: u16,
    ) -> Option<(
        &GuestMemoryMmap,
        &mut ActiveQueue,
        &Arc<dyn VirtioInterrupt>,
    )> {
        let q = self.queues.iter_mut().find(|q| q.index == index)?;
        Some((&self.memory, q, &self.interrupt))
    }
}
