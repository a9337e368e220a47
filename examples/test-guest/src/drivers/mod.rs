//! Device drivers, on top of `platform`: mapping register windows above
//! 4 GiB, PCI enumeration and BAR set-up, virtio discovery on both
//! transports, the DMA HAL and `StrictTransport` for virtio-drivers, MSI-X,
//! virtio-blk (virtio-drivers' `VirtIOBlk`, and `BlkQueue` for what it
//! lacks), and virtio-net as a smoltcp device (`Nic`).

pub mod blk;
pub mod blk_queue;
pub mod doorbell;
pub mod hal;
pub mod mmio;
pub mod msix;
pub mod net;
pub mod pci;
pub mod spec;
pub mod transport;
pub mod virtio;
