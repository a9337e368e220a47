//! The guest physical address map of an x86_64 vmkit VM: every fixed address a vmkit crate
//! or VMM writes to or places a device at, in one place.
//!
//! ```text
//! 0x0000_0500  GDT (entry state)            0x0000_9000  PML4, PDPT, PD (64-bit entry)
//! 0x0000_0520  IDT (entry state)            0x0002_0000  kernel command line
//! 0x0000_6000  PVH hvm_start_info page      0x0009_FC00  EBDA: MP table
//! 0x0000_7000  Linux zero page              0x000E_0000  ACPI tables (RSDP first)
//! 0x0000_8000  boot stack (grows down)      0x0010_0000  high memory: the kernel
//! ---------------------------------------- RAM up to 3 GiB --------------------------------
//! 0xC000_0000  PCI BAR window (256 MiB)     0xE000_0000  PCI ECAM, bus 0 (1 MiB)
//! 0xD000_0000  virtio-mmio windows          0xFEA0_0000  ACPI GED event register
//! 0xD0F0_0000  unassigned (probes, benches) 0xFEC0_0000  IOAPIC
//!                                           0xFEE0_0000  local APICs
//! ---------------------------------------- RAM again from 4 GiB ---------------------------
//! ```
//!
//! [`REGIONS`] lists the fixed regions; a unit test checks that none overlaps another, and
//! that the boot-time ones lie in low RAM below the EBDA.

use std::ops::{Range, RangeInclusive};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 0x1000;

// ---- Low memory: what the VMM writes before the first instruction. ----

/// The GDT of the entry state (4 entries).
pub const GDT_ADDR: u64 = 0x500;
/// Size of the GDT area.
pub const GDT_SIZE: u64 = 0x20;
/// The (empty) IDT of the 64-bit entry state.
pub const IDT_ADDR: u64 = 0x520;
/// Size of the IDT area.
pub const IDT_SIZE: u64 = 0x8;

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

/// Initial stack pointer of the 64-bit Linux entry (the stack grows down into the page
/// below the page tables, as in the boot protocol's examples).
pub const BOOT_STACK: u64 = 0x8ff0;
/// The page the boot stack lives in.
pub const BOOT_STACK_PAGE: u64 = 0x8000;

/// PML4 of the identity page tables of the 64-bit entry; the PDPT and the PD follow at
/// +4 KiB and +8 KiB.
pub const PML4_ADDR: u64 = 0x9000;
/// End (exclusive) of the three page-table pages.
pub const PAGE_TABLES_END: u64 = PML4_ADDR + 3 * PAGE_SIZE;

/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Maximum size of the kernel command line, NUL terminator included.
pub const CMDLINE_MAX_SIZE: usize = 0x1000;

/// Start of the legacy hole (EBDA, VGA, BIOS area); RAM below it in the E820 map. The MP
/// table is written here.
pub const EBDA_START: u64 = 0x9_FC00;
/// ACPI tables live in [`ACPI_START`], [`ACPI_END`]); the RSDP is at the start.
pub const ACPI_START: u64 = 0xE_0000;
/// End (exclusive) of the ACPI table area.
pub const ACPI_END: u64 = 0x10_0000;

/// First byte above the legacy hole: "high memory", where kernels are loaded.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

// ---- The 32-bit MMIO gap: no RAM, devices only. ----

/// Start of the 32-bit MMIO gap: no RAM between here and [`MMIO_GAP_END`].
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End (exclusive) of the 32-bit MMIO gap: 4 GiB, where high RAM starts.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// Where PCI BARs are placed (the host bridge's 32-bit memory window in the DSDT).
pub const PCI_BAR_WINDOW: Range<u64> = 0xC000_0000..0xD000_0000;
/// Where virtio-mmio devices get their 4 KiB windows (3840 of them).
pub const VIRTIO_MMIO_WINDOW: Range<u64> = 0xD000_0000..0xD0F0_0000;
/// Deliberately left empty: nothing is ever placed here, so guest accesses exit to the VMM
/// and read all ones (the exit-cost benchmark writes here in every VMM it compares).
pub const UNASSIGNED_MMIO: Range<u64> = 0xD0F0_0000..0xE000_0000;
/// PCI Express ECAM of bus 0 (described in the MCFG).
pub const PCI_ECAM: Range<u64> = 0xE000_0000..0xE010_0000;
/// The page of the ACPI Generic Event Device's event register (`ACPI0013` in the DSDT, the
/// power button's path on this hardware-reduced platform).
///
/// A fixed address, like the IOAPIC's, because the DSDT names it; it is where QEMU's
/// `microvm` machine puts its GED. It lies in the gap's free stretch between the ECAM and the
/// IOAPIC, clear of every allocator's window and of a full 256-bus ECAM
/// (`0xE000_0000..0xF000_0000`). Only the register's first bytes are decoded; the rest of
/// the page is reserved so that nothing else is ever placed there.
pub const GED_ADDR: u64 = 0xFEA0_0000;
/// The IOAPIC's registers.
pub const IOAPIC_ADDR: u64 = 0xFEC0_0000;
/// The local APICs' registers (each vCPU sees its own here).
pub const LAPIC_ADDR: u64 = 0xFEE0_0000;
/// The top of the gap, from the IOAPIC up (APICs, and what firmware would put there): never
/// a BAR.
pub const PLATFORM_MMIO: Range<u64> = IOAPIC_ADDR..MMIO_GAP_END;

// ---- Interrupts. ----

/// IOAPIC pins given to virtio-mmio devices (0–4 are the PC's: PIT, keyboard, cascade,
/// COM2, COM1).
pub const VIRTIO_MMIO_GSIS: RangeInclusive<u32> = 5..=23;
/// The ACPI Generic Event Device's interrupt (edge, active high): ISA IRQ 3.
///
/// Every other IOAPIC pin is taken or handed out: 0 and 2 are the PIT's (ISA IRQ 0 is
/// overridden to GSI 2), 1 the keyboard's, 4 COM1's, and [`VIRTIO_MMIO_GSIS`] (5–23) belong
/// to the virtio-mmio allocator; GSIs from 24 up are not IOAPIC pins (MSI routes only). Pin 3
/// is COM2's on a PC, and vmkit has no COM2; as an ISA IRQ it is edge-triggered and active
/// high without any MADT override, which is what the GED's `_CRS` says.
pub const GED_GSI: u32 = 3;
/// The last GSI KVM routes (it takes 4096 routes); MSI routes use the GSIs above the IOAPIC
/// pins up to this one.
pub const LAST_GSI: u32 = 4095;

/// A named fixed region of the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// What it is.
    pub name: &'static str,
    /// Where it is.
    pub range: Range<u64>,
}

const fn region(name: &'static str, start: u64, end: u64) -> Region {
    Region {
        name,
        range: start..end,
    }
}

/// Every fixed region, in address order. RAM itself is not listed: it is everything below
/// [`MMIO_GAP_START`] and from [`MMIO_GAP_END`] up, as much as the guest has.
pub const REGIONS: &[Region] = &[
    region("GDT", GDT_ADDR, GDT_ADDR + GDT_SIZE),
    region("IDT", IDT_ADDR, IDT_ADDR + IDT_SIZE),
    region("PVH start info", PVH_INFO_START, PVH_INFO_END),
    region("zero page", ZERO_PAGE_START, ZERO_PAGE_START + PAGE_SIZE),
    region("boot stack", BOOT_STACK_PAGE, BOOT_STACK_PAGE + PAGE_SIZE),
    region("page tables", PML4_ADDR, PAGE_TABLES_END),
    region(
        "command line",
        CMDLINE_START,
        CMDLINE_START + CMDLINE_MAX_SIZE as u64,
    ),
    region("EBDA (MP table)", EBDA_START, ACPI_START),
    region("ACPI tables", ACPI_START, ACPI_END),
    region("PCI BAR window", PCI_BAR_WINDOW.start, PCI_BAR_WINDOW.end),
    region(
        "virtio-mmio windows",
        VIRTIO_MMIO_WINDOW.start,
        VIRTIO_MMIO_WINDOW.end,
    ),
    region(
        "unassigned MMIO",
        UNASSIGNED_MMIO.start,
        UNASSIGNED_MMIO.end,
    ),
    region("PCI ECAM", PCI_ECAM.start, PCI_ECAM.end),
    region("ACPI GED", GED_ADDR, GED_ADDR + PAGE_SIZE),
    region("IOAPIC", IOAPIC_ADDR, IOAPIC_ADDR + PAGE_SIZE),
    region("local APIC", LAPIC_ADDR, LAPIC_ADDR + PAGE_SIZE),
];

// Relations between the constants, checked when the crate is built.
const _: () = {
    // The page tables map 1 GiB with 2 MiB pages: three pages, as reserved.
    assert!(PAGE_TABLES_END - PML4_ADDR == 3 * PAGE_SIZE);
    // The stack pointer lies inside its page.
    assert!(BOOT_STACK >= BOOT_STACK_PAGE && BOOT_STACK < BOOT_STACK_PAGE + PAGE_SIZE);
    // PVH's pieces lie inside its page, in order.
    assert!(PVH_INFO_START < PVH_MODLIST_START && PVH_MODLIST_START < PVH_MEMMAP_START);
    assert!(PVH_MEMMAP_START < PVH_INFO_END);
    // virtio-mmio pins are IOAPIC pins the PC does not use.
    assert!(*VIRTIO_MMIO_GSIS.start() > 4 && *VIRTIO_MMIO_GSIS.end() < 24);
    // virtio-mmio windows are 4 KiB, page aligned: room for 3840.
    assert!(VIRTIO_MMIO_WINDOW.start.is_multiple_of(PAGE_SIZE));
    assert!((VIRTIO_MMIO_WINDOW.end - VIRTIO_MMIO_WINDOW.start) / PAGE_SIZE == 3840);
    // The GED's page is page aligned and addressable by the DSDT's 32-bit descriptors.
    assert!(GED_ADDR.is_multiple_of(PAGE_SIZE) && GED_ADDR + PAGE_SIZE <= MMIO_GAP_END);
    // The GED's pin is an IOAPIC pin outside the virtio-mmio range and not the PC's PIT (0,
    // 2), keyboard (1) or COM1 (4).
    assert!(GED_GSI < 24 && GED_GSI < *VIRTIO_MMIO_GSIS.start());
    assert!(GED_GSI != 0 && GED_GSI != 1 && GED_GSI != 2 && GED_GSI != 4);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_disjoint_and_in_order() {
        for pair in REGIONS.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            assert!(a.range.start < a.range.end, "{} is empty", a.name);
            assert!(
                a.range.end <= b.range.start,
                "{} {:#x?} overlaps or follows {} {:#x?}",
                a.name,
                a.range,
                b.name,
                b.range
            );
        }
    }

    #[test]
    fn boot_data_is_in_low_ram_below_the_ebda_and_devices_in_the_gap() {
        for r in REGIONS {
            let boot_data = r.range.end <= EBDA_START;
            let legacy_hole = r.range.start >= EBDA_START && r.range.end <= HIGH_MEMORY_START;
            let gap = r.range.start >= MMIO_GAP_START && r.range.end <= MMIO_GAP_END;
            assert!(
                boot_data || legacy_hole || gap,
                "{} {:#x?}",
                r.name,
                r.range
            );
        }
    }

    #[test]
    fn device_windows_stay_below_the_platform_devices() {
        for w in [
            &PCI_BAR_WINDOW,
            &VIRTIO_MMIO_WINDOW,
            &UNASSIGNED_MMIO,
            &PCI_ECAM,
        ] {
            assert!(w.end <= PLATFORM_MMIO.start, "{w:#x?}");
        }
    }

    #[test]
    fn ged_page_is_outside_every_window_and_a_full_ecam() {
        let ged = GED_ADDR..GED_ADDR + PAGE_SIZE;
        let overlaps = |w: &Range<u64>| ged.start < w.end && w.start < ged.end;
        // The ECAM as it would grow to 256 buses.
        let full_ecam = PCI_ECAM.start..PCI_ECAM.start + (256 << 20);
        for w in [
            &PCI_BAR_WINDOW,
            &VIRTIO_MMIO_WINDOW,
            &UNASSIGNED_MMIO,
            &full_ecam,
            &PLATFORM_MMIO,
        ] {
            assert!(!overlaps(w), "GED page {ged:#x?} overlaps {w:#x?}");
        }
        assert!(ged.start >= MMIO_GAP_START && ged.end <= MMIO_GAP_END);
        assert!(REGIONS.iter().any(|r| r.range == ged));
        assert!(!VIRTIO_MMIO_GSIS.contains(&GED_GSI));
    }
}
