//! Snapshot state of the transports: plain serde types a VMM saves while the VM is paused
//! and restores into freshly built transports of the same devices.
//!
//! Everything here comes from a file and is checked on restore: a value out of range is an
//! [`Error::InvalidState`](crate::Error::InvalidState), never a panic.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

/// virtio-queue's [`QueueState`] (which has no serde), field for field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The maximum size the device offers.
    pub max_size: u16,
    /// The next available ring entry the device takes.
    pub next_avail: u16,
    /// The next used ring entry the device fills.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` negotiated.
    pub event_idx_enabled: bool,
    /// The queue size the driver chose.
    pub size: u16,
    /// virtio-queue's ready flag.
    pub ready: bool,
    /// The descriptor table's guest address.
    pub desc_table: u64,
    /// The available ring's guest address.
    pub avail_ring: u64,
    /// The used ring's guest address.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// One queue slot of a transport: what the driver configured and whether the device runs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueSlotState {
    /// The QueueReady / `queue_enable` register.
    pub ready: bool,
    /// Which fields hold a value the transport refused (bit 0 size, 1 descriptor table,
    /// 2 driver area, 3 device area).
    pub invalid: u8,
    /// The device runs this queue.
    pub active: bool,
    /// The descriptor, driver and device area registers as the driver wrote them.
    pub addrs: [u64; 3],
    /// The ring: size, addresses and, for an active queue, where the device is in it.
    pub queue: QueueSnapshot,
}

/// The transport-independent state of a virtio transport (status, features, queues).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VirtioTransportState {
    /// The device type, checked against the device restored into.
    pub device_type: u32,
    /// The features the transport offered, checked against the device restored into.
    pub offered_features: u64,
    /// The device status (without `DEVICE_NEEDS_RESET`, see `needs_reset`).
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The driver's features.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Every queue slot, by index.
    pub queues: Vec<QueueSlotState>,
    /// The device was activated.
    pub activated: bool,
    /// `DEVICE_NEEDS_RESET` was set.
    pub needs_reset: bool,
    /// The device could access guest memory (virtio-pci's bus mastering).
    pub dma_allowed: bool,
    /// `DRIVER_OK` was written while DMA was not allowed.
    pub activation_pending: bool,
}

/// The state of a [`MmioTransport`](crate::MmioTransport).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// Status, features and queues.
    pub common: VirtioTransportState,
    /// The InterruptStatus register.
    pub interrupt_status: u32,
    /// The ConfigGeneration register.
    pub config_generation: u32,
}

/// The state of a [`PciTransport`](crate::pci::PciTransport) (feature `pci`).
#[cfg(feature = "pci")]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PciTransportState {
    /// Status, features and queues.
    pub common: VirtioTransportState,
    /// The function's configuration space (command register, BAR 0, MSI-X control…).
    pub config: vmkit_pci::ConfigSpaceState,
    /// The MSI-X table, pending bits, enable and function mask.
    pub msix: vmkit_pci::MsixState,
    /// The ISR status bits not yet read.
    pub isr: u8,
    /// `config_msix_vector`.
    pub config_vector: u16,
    /// Each queue's `queue_msix_vector`.
    pub queue_vectors: Vec<u16>,
    /// The configuration generation.
    pub config_generation: u32,
}
