//! The virtio 1.2 numbers this guest uses that virtio-drivers 0.13 keeps
//! private or does not have: virtio-blk feature bits, configuration
//! offsets and request types, virtio-mmio queue registers, the virtio-pci
//! common configuration's MSI-X fields, and the PCI MSI-X capability.

/// virtio-blk feature bits (virtio 1.2, 5.2.3).
pub mod blk_feature {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// VIRTIO_F_VERSION_1 (virtio 1.2, 6).
pub const F_VERSION_1: u64 = 1 << 32;

/// virtio-blk configuration offsets (virtio 1.2, 5.2.4).
pub mod blk_config {
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
}

/// virtio-blk request types (virtio 1.2, 5.2.6).
pub mod blk_request {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
    /// WRITE_ZEROES segment flag: the device may unmap (punch a hole).
    pub const FLAG_UNMAP: u32 = 1;
}

/// virtio-blk request status bytes (virtio 1.2, 5.2.6).
pub mod blk_status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// virtio-mmio version 2 registers (virtio 1.2, 4.2.2) that the
/// QueueReady handshake of `StrictTransport::queue_unset` writes.
pub mod mmio_reg {
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    /// QueueDescLow/High, QueueDriverLow/High, QueueDeviceLow/High.
    pub const QUEUE_ADDRESSES: [u64; 6] = [0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4];
}

/// virtio-pci common configuration offsets (virtio 1.2, 4.1.4.3) of the
/// fields virtio-drivers 0.13 does not write.
pub mod pci_common {
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// "No vector" in `msix_config` / `queue_msix_vector`.
    pub const NO_VECTOR: u16 = 0xffff;
}

/// The PCI MSI-X capability (PCI Local Bus 3.0, 6.8.2).
pub mod msix {
    /// Capability id.
    pub const CAP_ID: u8 = 0x11;
    /// Message control (upper half of the capability's first dword): enable.
    pub const ENABLE: u32 = 1 << 31;
    /// Message control: function mask.
    pub const FUNCTION_MASK: u32 = 1 << 30;
}
