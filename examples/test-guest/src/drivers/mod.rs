//! Device drivers, on top of `platform`: mapping register windows above
//! 4 GiB, PCI enumeration and BAR set-up, virtio discovery on both
//! transports, the DMA HAL and `StrictTransport` for virtio-drivers, MSI-X,
//! virtio-blk (virtio-drivers' `VirtIOBlk`, and `BlkQueue` for what it
//! lacks), virtio-net as a smoltcp device (`Nic`), and virtio-vsock
//! through virtio-drivers' connection manager (`Vsock`).

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
pub mod vsock;
