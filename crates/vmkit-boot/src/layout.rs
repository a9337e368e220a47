//! The guest physical addresses this crate writes to (x86_64).
//!
//! They follow the memory map of `docs/architecture.md`; the VMM must not put anything else
//! there.

/// `hvm_start_info` for PVH boot (one page, shared with the module list and memory map).
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after `hvm_start_info`.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map, after the module list; it may grow up to [`PVH_INFO_END`].
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// End (exclusive) of the PVH page.
pub const PVH_INFO_END: u64 = 0x7000;

/// Linux zero page (`boot_params`, 4 KiB).
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Maximum size of the kernel command line, NUL terminator included.
pub const CMDLINE_MAX_SIZE: usize = 0x1000;

/// Start of the legacy hole (EBDA, VGA, BIOS area); RAM below it in the E820 map.
pub const EBDA_START: u64 = 0x9_FC00;
/// ACPI tables live in [`ACPI_START`, [`ACPI_END`]); the RSDP is at the start.
pub const ACPI_START: u64 = 0xE_0000;
/// End (exclusive) of the ACPI table area.
pub const ACPI_END: u64 = 0x10_0000;

/// First byte above the legacy hole: "high memory", where kernels are loaded.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap; the initrd is placed below it.
pub const MMIO_GAP_START: u64 = 0xC000_0000;

/// Default IOAPIC address.
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;
/// Local APIC address.
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;

/// Page size used to align the initrd.
pub const PAGE_SIZE: u64 = 0x1000;
