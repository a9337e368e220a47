//! The Intel MultiProcessor Specification (1.4) table: how a kernel without ACPI finds its
//! CPUs, the IOAPIC and the ISA interrupt wiring.
//!
//! Linux built without ACPI (or booted with `acpi=off`) reads it; without one it runs every
//! interrupt through the PIC and sees one CPU. Kernels with ACPI use the MADT instead. The table
//! states the same machine as [`AcpiConfig`](crate::AcpiConfig)'s MADT: CPUs with APIC ID =
//! index, one IOAPIC at GSI base 0, ISA IRQ 0 (the PIT) on pin 2 and every other IRQ on its
//! own pin, LINT0 = ExtINT and LINT1 = NMI on every CPU.
//!
//! Written here rather than taken from a crate: no rust-vmm crate builds MP tables
//! (Firecracker and crosvm each keep one inside their VMM).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{ACPI_START, EBDA_START};
use crate::{Error, Result};
use crate::{IOAPIC_ADDR32 as IOAPIC_ADDR, LAPIC_ADDR32 as LAPIC_ADDR};

/// Where the MP floating pointer goes: the start of the last KiB of base memory, one of the
/// places a kernel searches. The configuration table follows it.
pub const MPTABLE_START: u64 = EBDA_START;
/// The table must end before this address (the ACPI area).
pub const MPTABLE_LIMIT: u64 = ACPI_START;

/// What the MP table describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpTableConfig {
    /// Number of vCPUs (1 to 255); APIC ID = index, vCPU 0 is the bootstrap processor.
    pub num_cpus: u32,
    /// IOAPIC ID (default 0; must not be a CPU's APIC ID in a strict reading of the spec,
    /// but Linux and KVM do not mind, and it matches the MADT).
    pub ioapic_id: u8,
    /// IOAPIC MMIO address (default 0xFEC0_0000).
    pub ioapic_addr: u32,
    /// IOAPIC input pins (default 24, KVM's in-kernel IOAPIC).
    pub ioapic_pins: u8,
}

impl Default for MpTableConfig {
    fn default() -> Self {
        MpTableConfig {
            num_cpus: 1,
            ioapic_id: 0,
            ioapic_addr: IOAPIC_ADDR,
            ioapic_pins: 24,
        }
    }
}

const SPEC_REV: u8 = 4;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
/// Processor entry flags: enabled, bootstrap processor.
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// CPU signature (family 6) and feature flags (FPU, APIC) of the processor entries; Linux
/// takes the real values from CPUID.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// The APIC version the entries report (integrated local APIC), and the IOAPIC's (KVM: 0x11).
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

/// Sum of `bytes`, as the value that makes the whole sum zero.
fn checksum_for(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, &b| s.wrapping_add(b))
        .wrapping_neg()
}

/// The MP floating pointer and configuration table as bytes, for a floating pointer placed
/// at `start` (the configuration table follows it).
pub fn build_mptable(cfg: &MpTableConfig, start: u64) -> Result<Vec<u8>> {
    if cfg.num_cpus == 0 || cfg.num_cpus > 255 {
        return Err(Error::InvalidMpTable(format!(
            "{} vCPUs: 1 to 255 are supported",
            cfg.num_cpus
        )));
    }
    if cfg.ioapic_pins == 0 {
        return Err(Error::InvalidMpTable("an IOAPIC needs pins".into()));
    }
    let table_addr = u32::try_from(start + FLOATING_POINTER_LEN as u64)
        .map_err(|_| Error::InvalidMpTable(format!("table at {start:#x} is above 4 GiB")))?;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for i in 0..cfg.num_cpus {
        // At most 255, checked above.
        let id = i as u8;
        let flags = CPU_ENABLED | if i == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, cfg.ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&cfg.ioapic_addr.to_le_bytes());
    count += 1;
    // ISA IRQ 0 (the PIT) on pin 2, IRQ 2 (the cascade) nowhere, every other IRQ on its own
    // pin; flags 0 = polarity and trigger conform to the bus (ISA: edge, active high). The
    // IRQs above 15 are the VMM's device GSIs, stated on the ISA bus as other VMMs do.
    for irq in 0..cfg.ioapic_pins {
        let pin = match irq {
            0 => 2,
            2 => continue,
            n => n,
        };
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, ISA_BUS_ID, irq]);
        entries.extend_from_slice(&[cfg.ioapic_id, pin]);
        count += 1;
    }
    // LINT0 of every local APIC (0xFF) is ExtINT (the PIC), LINT1 the NMI.
    for (kind, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, ISA_BUS_ID, 0, 0xFF, lint]);
        count += 1;
    }

    let table_len = u16::try_from(HEADER_LEN + entries.len())
        .map_err(|_| Error::InvalidMpTable("configuration table over 64 KiB".into()))?;
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"VMKIT   ");
    table.extend_from_slice(b"VMKIT-VM    ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum_for(&table);

    let mut bytes = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    bytes.extend_from_slice(b"_MP_");
    bytes.extend_from_slice(&table_addr.to_le_bytes());
    // Length in 16-byte units, revision, checksum, feature bytes: a table is present (byte 1
    // = 0), virtual wire mode (IMCRP clear).
    bytes.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    bytes[10] = checksum_for(&bytes);
    bytes.extend_from_slice(&table);
    Ok(bytes)
}

/// Writes the MP table at [`MPTABLE_START`]; returns the floating pointer's address.
pub fn create_mptable<M: GuestMemoryBackend>(mem: &M, cfg: &MpTableConfig) -> Result<GuestAddress> {
    let bytes = build_mptable(cfg, MPTABLE_START)?;
    let end = MPTABLE_START + bytes.len() as u64;
    if end > MPTABLE_LIMIT || !mem.check_range(GuestAddress(MPTABLE_START), bytes.len()) {
        return Err(Error::InvalidMpTable(format!(
            "[{MPTABLE_START:#x}, {end:#x}) is not guest RAM below {MPTABLE_LIMIT:#x}"
        )));
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|source| Error::GuestMemory {
            context: "MP table",
            source,
        })?;
    Ok(GuestAddress(MPTABLE_START))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
    }

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    /// The entries of the configuration table, each as (type, bytes).
    fn entries(b: &[u8]) -> Vec<&[u8]> {
        let table = &b[FLOATING_POINTER_LEN..];
        let mut out = Vec::new();
        let mut o = HEADER_LEN;
        for _ in 0..u16_at(table, 34) {
            let len = if table[o] == ENTRY_PROCESSOR { 20 } else { 8 };
            out.push(&table[o..o + len]);
            o += len;
        }
        assert_eq!(o, usize::from(u16_at(table, 4)), "entries fill the table");
        out
    }

    #[test]
    fn floating_pointer_and_header_are_valid() {
        let b = build_mptable(&MpTableConfig::default(), 0x9fc00).unwrap();
        assert_eq!(&b[..4], b"_MP_");
        assert_eq!(u32_at(&b, 4), 0x9fc10, "points right after itself");
        assert_eq!((b[8], b[9]), (1, 4), "16 bytes, spec 1.4");
        assert_eq!(sum(&b[..16]), 0, "floating pointer checksum");
        assert_eq!(&b[11..16], &[0; 5], "a table is present; virtual wire mode");
        let t = &b[16..];
        assert_eq!(&t[..4], b"PCMP");
        let len = usize::from(u16_at(t, 4));
        assert_eq!(len, t.len());
        assert_eq!(sum(&t[..len]), 0, "table checksum");
        assert_eq!(u32_at(t, 36), 0xFEE0_0000, "local APIC address");
    }

    #[test]
    fn entries_state_the_same_machine_as_the_madt() {
        let cfg = MpTableConfig {
            num_cpus: 3,
            ..Default::default()
        };
        let b = build_mptable(&cfg, MPTABLE_START).unwrap();
        let e = entries(&b);
        let cpus: Vec<_> = e.iter().filter(|e| e[0] == ENTRY_PROCESSOR).collect();
        assert_eq!(cpus.len(), 3);
        for (i, c) in cpus.iter().enumerate() {
            assert_eq!(c[1], i as u8, "APIC ID = index");
            assert_eq!(c[3] & CPU_ENABLED, CPU_ENABLED);
            assert_eq!(c[3] & CPU_BSP != 0, i == 0, "only vCPU 0 is the BSP");
        }
        let buses: Vec<_> = e.iter().filter(|e| e[0] == ENTRY_BUS).collect();
        assert_eq!(buses.len(), 1);
        assert_eq!(&buses[0][2..8], b"ISA   ");
        let ioapic: Vec<_> = e.iter().filter(|e| e[0] == ENTRY_IOAPIC).collect();
        assert_eq!(ioapic.len(), 1);
        assert_eq!(u32_at(ioapic[0], 4), 0xFEC0_0000);
        // (source IRQ, pin) of the I/O interrupt entries.
        let irqs: Vec<(u8, u8)> = e
            .iter()
            .filter(|e| e[0] == ENTRY_IO_INTERRUPT)
            .map(|e| (e[5], e[7]))
            .collect();
        assert_eq!(irqs.len(), 23, "24 pins but IRQ 2");
        assert_eq!(
            irqs[0],
            (0, 2),
            "the PIT on pin 2, as the MADT's override says"
        );
        assert!(!irqs.iter().any(|&(irq, _)| irq == 2));
        assert!(irqs[1..].iter().all(|&(irq, pin)| irq == pin));
        assert_eq!(irqs.last(), Some(&(23, 23)));
        let locals: Vec<(u8, u8)> = e
            .iter()
            .filter(|e| e[0] == ENTRY_LOCAL_INTERRUPT)
            .map(|e| (e[1], e[7]))
            .collect();
        assert_eq!(locals, vec![(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)]);
    }

    #[test]
    fn bad_configurations_are_errors() {
        for n in [0, 256] {
            let cfg = MpTableConfig {
                num_cpus: n,
                ..Default::default()
            };
            let err = build_mptable(&cfg, MPTABLE_START).unwrap_err();
            assert!(err.to_string().contains("1 to 255"), "{err}");
        }
        let cfg = MpTableConfig {
            ioapic_pins: 0,
            ..Default::default()
        };
        assert!(build_mptable(&cfg, MPTABLE_START).is_err());
        assert!(build_mptable(&MpTableConfig::default(), 1 << 32).is_err());
    }

    #[test]
    fn the_largest_table_fits_below_the_acpi_area_and_is_written() {
        let cfg = MpTableConfig {
            num_cpus: 255,
            ..Default::default()
        };
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let at = create_mptable(&mem, &cfg).unwrap();
        assert_eq!(at, GuestAddress(MPTABLE_START));
        let want = build_mptable(&cfg, MPTABLE_START).unwrap();
        assert!(MPTABLE_START + want.len() as u64 <= MPTABLE_LIMIT);
        let mut got = vec![0u8; want.len()];
        mem.read_slice(&mut got, at).unwrap();
        assert_eq!(got, want);
        assert_eq!(entries(&want).len(), 255 + 1 + 1 + 23 + 2);
    }

    #[test]
    fn too_little_memory_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9_0000)]).unwrap();
        let err = create_mptable(&mem, &MpTableConfig::default()).unwrap_err();
        assert!(err.to_string().contains("not guest RAM"), "{err}");
    }
}
