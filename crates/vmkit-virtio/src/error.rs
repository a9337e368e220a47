//! The error types of this crate.

use std::io;

/// Errors of this crate's constructors and of queue processing.
///
/// Guest register accesses never fail: the bus traits have no error path, so the transport
/// ignores what it cannot handle and, where the spec says so, sets `DEVICE_NEEDS_RESET`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating or cloning an eventfd failed.
    #[error("failed to create or clone an eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// A device declared a queue maximum size that is 0, not a power of two or above 32768.
    #[error("queue {index}: maximum size {size} is not a power of two in 1..=32768")]
    InvalidQueueMaxSize {
        /// The queue index.
        index: usize,
        /// The size the device declared.
        size: u16,
    },
    /// A device declared more queues than a transport can address.
    #[error("a device declared {0} queues; at most 65535 are addressable")]
    TooManyQueues(usize),
    /// The activated device has no queue with this index.
    #[error("no active queue {0}")]
    NoSuchQueue(u16),
    /// The driver's available index is more than a queue size ahead of the device: the ring
    /// is corrupt.
    #[error("queue {index}: available index {avail} is more than {size} entries ahead of {next}")]
    InvalidAvailIndex {
        /// The queue index.
        index: u16,
        /// The driver's available index.
        avail: u16,
        /// The device's next available index.
        next: u16,
        /// The queue size.
        size: u16,
    },
    /// An available ring entry could not be read from guest memory.
    #[error("queue {0}: the available ring cannot be read")]
    AvailRingUnreadable(u16),
    /// virtio-queue refused an access to the rings (guest memory outside RAM, a head
    /// index outside the queue…).
    #[error("queue {index}: {source}")]
    Queue {
        /// The queue index.
        index: u16,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// Raising an interrupt failed.
    #[error("failed to raise an interrupt: {0}")]
    Interrupt(#[source] io::Error),
    /// A device type beyond what a PCI device ID can hold.
    #[cfg(feature = "pci")]
    #[error("virtio-pci: device type {0} has no PCI device ID (0x1040 + type)")]
    DeviceTypeOutOfRange(u32),
    /// A saved transport state does not fit the transport it is restored into, or holds a
    /// value out of range.
    #[error("transport restore: {0}")]
    InvalidState(String),
    /// Building the PCI function failed.
    #[cfg(feature = "pci")]
    #[error("virtio-pci: {0}")]
    Pci(#[source] vmkit_pci::Error),
}

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Why a device refused to activate. The transport then sets `DEVICE_NEEDS_RESET`.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not make a queue ready that the device needs.
    #[error("queue {0} is required but not ready")]
    MissingQueue(u16),
    /// The device was already active (the transport resets it before activating again).
    #[error("the device is already active")]
    AlreadyActive,
    /// The negotiated features do not work together (the device's own rule).
    #[error("unsupported feature combination {0:#x}")]
    Features(u64),
    /// A host resource (file, thread, eventfd…) could not be set up.
    #[error("failed to set up the device: {0}")]
    Io(#[source] io::Error),
}
