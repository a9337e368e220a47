//! Boot an x86_64 Linux guest: load a kernel (bzImage, ELF vmlinux, or PVH ELF) with its
//! command line, initrd and boot parameters, and write hardware-reduced ACPI tables.
//!
//! The heavy lifting is done by rust-vmm crates: `linux-loader` reads the images into guest
//! memory, parses the PVH note and writes the zero page / `hvm_start_info`; `acpi_tables`
//! encodes the tables and the AML. This crate adds format detection, validation with clear
//! errors, placement by the one guest address map (`vmkit_memory::layout`), the E820 /
//! PVH memory map, initrd placement, the content of the ACPI tables, and an MP table
//! ([`create_mptable`]) for kernels without ACPI.
//!
//! # Example
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//! use vmkit_boot::{create_acpi_tables, AcpiConfig, DsdtDevice, IrqTrigger, PciHostBridge};
//!
//! let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 128 << 20)])?;
//! let cfg = AcpiConfig {
//!     num_cpus: 2,
//!     devices: vec![
//!         DsdtDevice::virtio_mmio(0, 0xD000_0000, 0x1000, 5, IrqTrigger::Edge),
//!         // ECAM at 0xE000_0000 (bus 0, in the MCFG), BARs in 0xC000_0000..0xD000_0000.
//!         DsdtDevice::PciHostBridge(PciHostBridge::bus0(0xE000_0000, (0xC000_0000, 0x1000_0000))),
//!     ],
//!     ..AcpiConfig::default()
//! };
//! let rsdp = create_acpi_tables(&mem, &cfg)?;
//! assert_eq!(rsdp, GuestAddress(0xE_0000));
//! let mut sig = [0u8; 8];
//! mem.read_slice(&mut sig, rsdp)?;
//! assert_eq!(&sig, b"RSD PTR ");
//!
//! // Then load the kernel, handing the RSDP to it:
//! // let loaded = vmkit_boot::load(&mem, &mut kernel_file, vmkit_boot::BootConfig {
//! //     cmdline: "console=ttyS0", rsdp: Some(rsdp), ..Default::default() })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod acpi;
pub mod e820;
mod error;
mod loader;
pub mod mptable;

pub use acpi::{
    build_acpi_tables, create_acpi_tables, AcpiConfig, AcpiTable, DsdtDevice, GedConfig,
    IrqTrigger, MmioDevice, PciHostBridge,
};
pub use e820::{memory_map, MemoryMapEntry, MemoryType};
pub use error::{Error, Result};
pub use loader::{load, BootConfig, EntryPoint, KernelFormat, LoadedKernel, ProtocolChoice};
pub use mptable::{create_mptable, MpTableConfig};

use vmkit_memory::layout;

/// The IOAPIC and local APIC addresses as the 32-bit fields of the ACPI and MP tables hold
/// them.
const IOAPIC_ADDR32: u32 = layout::IOAPIC_ADDR as u32;
const LAPIC_ADDR32: u32 = layout::LAPIC_ADDR as u32;
// Both lie in the 32-bit MMIO gap (the layout's tests check it); the LAPIC is the higher.
const _: () = assert!(layout::LAPIC_ADDR <= u32::MAX as u64);

/// Re-exported so that callers can build custom DSDT devices ([`DsdtDevice::Custom`]) with
/// the same `acpi_tables` version.
pub use acpi_tables;
/// Re-exported for [`LoadedKernel::setup_header`] and the boot protocol structures.
pub use linux_loader;
