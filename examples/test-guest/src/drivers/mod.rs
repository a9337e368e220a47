//! Device drivers: PCI enumeration, virtio discovery and transports, virtio-blk.

pub mod blk;
pub mod pci;
pub mod virtio;
