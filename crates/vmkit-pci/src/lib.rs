//! A KVM-free PCI layer for VMMs: PCI bus 0 with a host bridge, configuration through ports
//! 0xCF8/0xCFC and through ECAM giving the same view, BAR sizing, BAR relocation validated
//! against the caller's memory map, the capability list, and MSI-X with vectors delivered
//! through a small trait.
//!
//! | piece | what it is |
//! |---|---|
//! | [`PciBus`] | bus 0: the [`HostBridge`] at 00.0, devices in slots 1–31, each mapped BAR registered on the VM's one `vmkit_bus::IoBus` where its registers say |
//! | [`PciDevice`] | what a function implements: config reads/writes, its BARs, BAR accesses |
//! | [`ConfigSpace`] | a 4 KiB type 0 header with writable masks, BAR sizing and the capability list, for devices to own |
//! | [`PciConfigIo`] | configuration mechanism #1 on ports 0xCF8–0xCFF, a vm-device [`MutDevicePio`](vm_device::MutDevicePio) |
//! | [`PciConfigMmio`] | ECAM, 4 KiB per function, 1 MiB for bus 0, a [`MutDeviceMmio`](vm_device::MutDeviceMmio) |
//! | [`BarValidator`], [`BarObserver`], [`BarEvent`] | who may refuse a BAR's place (RAM, fixed devices), who hears about moves |
//! | [`MsixTable`] | MSI-X table, PBA, masking and pending bits, delivered through vmkit-irq's `MsiVectorSink` (the VMM's KVM routes, behind a trait) |
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_bus::IoBus;
//! use vmkit_pci::{
//!     BarKind, ConfigSpace, ForbiddenRanges, PciBar, PciBus, PciDevice, PciIds, ECAM_BUS_SIZE,
//! };
//!
//! /// A device with one 4 KiB register BAR of scratch memory.
//! struct Scratch { config: ConfigSpace, regs: [u8; 4096] }
//!
//! impl PciDevice for Scratch {
//!     fn read_config(&mut self, offset: u16, data: &mut [u8]) { self.config.read(offset, data) }
//!     fn write_config(&mut self, offset: u16, data: &[u8]) { self.config.write(offset, data) }
//!     fn bar(&self, index: usize) -> Option<PciBar> { self.config.bar(index) }
//!     // The bus registers the BAR for its exact size: `offset + len` fits in it.
//!     fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
//!         let o = offset as usize;
//!         data.copy_from_slice(&self.regs[o..o + data.len()]);
//!     }
//!     fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
//!         let o = offset as usize;
//!         self.regs[o..o + data.len()].copy_from_slice(data);
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! const ECAM: u64 = 0xE000_0000;
//! const WINDOW: std::ops::RangeInclusive<u64> = 0xC000_0000..=0xDFFF_FFFF;
//! // The VM's one bus, which the vCPUs dispatch on.
//! let vm_bus = Arc::new(IoBus::new());
//! // RAM ends at 0xC000_0000 in this guest; nothing may map over the ECAM window either.
//! let validator = ForbiddenRanges(vec![0..=0xBFFF_FFFF, ECAM..=ECAM + ECAM_BUS_SIZE - 1]);
//! let pci = Arc::new(PciBus::new(&vm_bus, WINDOW, Arc::new(validator))?);
//! pci.register_config_access(ECAM)?; // ports 0xCF8–0xCFF and the ECAM, on `vm_bus`
//!
//! let mut config = ConfigSpace::new(PciIds { vendor_id: 0x1234, device_id: 0x11, ..Default::default() });
//! config.add_bar(0, BarKind::Memory32 { prefetchable: false }, 0x1000, 0xC000_0000)?;
//! let bdf = pci.add_device(Arc::new(Mutex::new(Scratch { config, regs: [0; 4096] })))?;
//! assert_eq!(bdf.device, 1);
//!
//! // The guest reads 01.0's IDs through ECAM, turns memory decoding on through the ports…
//! let mut id = [0u8; 4];
//! vm_bus.mmio_read(ECAM + (1 << 15), &mut id);
//! assert_eq!(u32::from_le_bytes(id), 0x0011_1234);
//! vm_bus.pio_write(0xCF8, &0x8000_0804u32.to_le_bytes()); // 00:01.0, register 0x04
//! vm_bus.pio_write(0xCFC, &2u16.to_le_bytes());
//! // …and the BAR answers where it was put, as a range of its own on the VM's bus.
//! vm_bus.mmio_write(0xC000_0010, &[42]);
//! let mut b = [0u8];
//! vm_bus.mmio_read(0xC000_0010, &mut b);
//! assert_eq!(b, [42]);
//! assert!(vm_bus.mmio_ranges().contains(&(0xC000_0000..=0xC000_0FFF)));
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod bus;
mod config;
mod error;
mod msix;

pub use bus::{
    AllowAll, BarEvent, BarObserver, BarValidator, Bdf, ForbiddenRanges, HostBridge, PciBus,
    PciConfigIo, PciConfigMmio, PciDevice, ECAM_BUS_SIZE, HOST_BRIDGE_DEVICE_ID,
    HOST_BRIDGE_VENDOR_ID, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE, PCI_SLOTS,
};
pub use config::{
    offsets, BarKind, ConfigSpace, ConfigSpaceState, PciBar, PciIds, CAP_ID_MSIX, CAP_ID_VENDOR,
    COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE,
    CONFIG_SPACE_SIZE, LEGACY_CONFIG_SPACE_SIZE, STATUS_CAPABILITIES_LIST,
};
pub use error::{Error, Result};
pub use msix::{
    MsixState, MsixTable, MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK, MSIX_ENTRY_SIZE,
    MSIX_MAX_VECTORS, MSIX_VECTOR_MASKED,
};

#[cfg(test)]
mod tests;
