//! Just enough ACPI: find the RSDP, walk the XSDT/RSDT, and read the MADT
//! (CPUs, IOAPIC, IRQ overrides), the FADT (sleep, PM1 and reset registers),
//! the `_S5_` package of the DSDT and the MCFG (PCI ECAM of segment 0).
//!
//! Every table is checksummed and every field read is bounded by the table's
//! own length; tables that fail are ignored.

use crate::platform::arch::{outb, outl, outw};
use crate::platform::boot::MAX_CPUS;
use crate::platform::phys::{self, Le};
use crate::println;

/// Largest number of IOAPICs kept from the MADT.
pub const MAX_IOAPICS: usize = 8;

const HEADER_LEN: usize = 36;
/// Refuse absurd table lengths (a corrupt header must not make us read 4 GiB).
const TABLE_MAX: usize = 1 << 20;

/// Where the RSDP was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsdpSource {
    StartInfo,
    Scan,
}

/// An ACPI generic address structure.
#[derive(Clone, Copy, Debug)]
pub struct Gas {
    pub space: u8,
    pub bit_width: u8,
    pub bit_offset: u8,
    pub access_size: u8,
    pub address: u64,
}

impl Gas {
    fn parse(t: &[u8], off: usize) -> Option<Gas> {
        let gas = Gas {
            space: t.u8_at(off)?,
            bit_width: t.u8_at(off + 1)?,
            bit_offset: t.u8_at(off + 2)?,
            access_size: t.u8_at(off + 3)?,
            address: t.u64_at(off + 4)?,
        };
        (gas.address != 0).then_some(gas)
    }

    fn width_bits(&self) -> u32 {
        match self.access_size {
            1 => 8,
            2 => 16,
            3 => 32,
            4 => 64,
            _ => match self.bit_width {
                16 => 16,
                32 => 32,
                64 => 64,
                _ => 8,
            },
        }
    }

    /// Writes `value` (shifted by the bit offset) in System I/O or System
    /// Memory space; other spaces are ignored.
    pub fn write(&self, value: u64) {
        let v = value << self.bit_offset;
        match self.space {
            1 => {
                let Ok(port) = u16::try_from(self.address) else {
                    return;
                };
                match self.width_bits() {
                    8 => outb(port, v as u8),
                    16 => outw(port, v as u16),
                    _ => outl(port, v as u32),
                }
            }
            0 => {
                let width = self.width_bits() as usize / 8;
                if phys::bytes(self.address, width).is_none() {
                    return;
                }
                // SAFETY: the register lies inside the identity mapping (checked
                // above) and is a firmware-described ACPI register, not RAM
                // that Rust owns.
                unsafe {
                    match width {
                        1 => core::ptr::write_volatile(self.address as *mut u8, v as u8),
                        2 => core::ptr::write_volatile(self.address as *mut u16, v as u16),
                        4 => core::ptr::write_volatile(self.address as *mut u32, v as u32),
                        _ => core::ptr::write_volatile(self.address as *mut u64, v),
                    }
                }
            }
            _ => {}
        }
    }
}

/// What the guest learned from the ACPI tables.
#[derive(Clone, Copy, Debug)]
pub struct Acpi {
    pub rsdp: u64,
    pub rsdp_source: RsdpSource,
    /// APIC IDs of the enabled processors, in MADT order.
    pub cpu_ids: [u32; MAX_CPUS],
    pub cpu_count: usize,
    /// Enabled processors beyond `MAX_CPUS`, counted but not kept.
    pub cpus_total: usize,
    pub madt_found: bool,
    pub lapic_addr: u64,
    /// First IOAPIC: (MMIO address, GSI base).
    pub ioapic: Option<(u32, u32)>,
    /// Every IOAPIC (up to `MAX_IOAPICS`), in MADT order: (address, GSI base).
    pub ioapics: [(u32, u32); MAX_IOAPICS],
    pub ioapic_count: usize,
    /// GSI of ISA IRQ 4 (COM1), after interrupt source overrides.
    pub com1_gsi: u32,
    /// FADT SLEEP_CONTROL_REG (hardware-reduced ACPI).
    pub sleep_control: Option<Gas>,
    /// FADT PM1a control block (fixed-hardware ACPI).
    pub pm1a_control: Option<Gas>,
    /// FADT RESET_REG and value, when RESET_REG_SUP is set.
    pub reset: Option<(Gas, u8)>,
    /// SLP_TYP for S5 from the DSDT (5 when not found).
    pub s5_type: u8,
    pub s5_found: bool,
    /// The ECAM window of PCI segment 0 (see `Mcfg`): from the MCFG, else
    /// from the DSDT's `_CBA`.
    pub mcfg: Option<Mcfg>,
    /// `_CBA` of the DSDT (the first one: segment 0's host bridge).
    pub cba: Option<u64>,
}

/// Where the ECAM window came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EcamSource {
    /// An MCFG allocation for segment 0, with its bus range.
    Mcfg,
    /// The host bridge's `_CBA` in the DSDT (no MCFG): the bus range is not
    /// read from `_CRS`, only bus 0 is assumed.
    Cba,
}

/// An MCFG allocation for PCI segment 0: the ECAM base (the address of bus
/// 0's configuration space, as the PCI Firmware spec defines it) and the bus
/// range it decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mcfg {
    pub base: u64,
    pub bus_start: u8,
    pub bus_end: u8,
    pub source: EcamSource,
}

/// Reads and validates the table at `addr`: returns its bytes (exactly its
/// length) when the length is sane and the checksum is zero.
fn table(addr: u64) -> Option<&'static [u8]> {
    let header = phys::bytes(addr, HEADER_LEN)?;
    let len = header.u32_at(4)? as usize;
    if !(HEADER_LEN..=TABLE_MAX).contains(&len) {
        return None;
    }
    let t = phys::bytes(addr, len)?;
    (checksum(t) == 0).then_some(t)
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
}

fn valid_rsdp(addr: u64) -> bool {
    let Some(r) = phys::bytes(addr, 20) else {
        return false;
    };
    if &r[..8] != b"RSD PTR " || checksum(r) != 0 {
        return false;
    }
    if r[15] >= 2 {
        let Some(len) = phys::bytes(addr, 36).and_then(|x| x.u32_at(20)) else {
            return false;
        };
        match phys::bytes(addr, len as usize) {
            Some(full) if len >= 36 => checksum(full) == 0,
            _ => false,
        }
    } else {
        true
    }
}

fn find_rsdp(hint: u64) -> Option<(u64, RsdpSource)> {
    if hint != 0 && valid_rsdp(hint) {
        return Some((hint, RsdpSource::StartInfo));
    }
    (0xe0000u64..0x100000)
        .step_by(16)
        .find(|&a| valid_rsdp(a))
        .map(|a| (a, RsdpSource::Scan))
}

impl Acpi {
    /// Finds and parses the tables; `None` when there is no valid RSDP.
    pub fn discover(rsdp_hint: u64) -> Option<Acpi> {
        let (rsdp, rsdp_source) = find_rsdp(rsdp_hint)?;
        let mut acpi = Acpi {
            rsdp,
            rsdp_source,
            cpu_ids: [0; MAX_CPUS],
            cpu_count: 0,
            cpus_total: 0,
            madt_found: false,
            lapic_addr: 0xfee0_0000,
            ioapic: None,
            ioapics: [(0, 0); MAX_IOAPICS],
            ioapic_count: 0,
            com1_gsi: 4,
            sleep_control: None,
            pm1a_control: None,
            reset: None,
            s5_type: 5,
            s5_found: false,
            mcfg: None,
            cba: None,
        };
        let r = phys::bytes(rsdp, 36)?;
        let xsdt = if r[15] >= 2 {
            r.u64_at(24).unwrap_or(0)
        } else {
            0
        };
        let (root, entry_size) = match xsdt {
            0 => (u64::from(r.u32_at(16)?), 4),
            x => (x, 8),
        };
        let root = table(root)?;
        for entry in root[HEADER_LEN..].chunks_exact(entry_size) {
            let addr = match entry_size {
                8 => entry.u64_at(0)?,
                _ => u64::from(entry.u32_at(0)?),
            };
            let Some(t) = table(addr) else { continue };
            match &t[..4] {
                b"APIC" => acpi.parse_madt(t),
                b"FACP" => acpi.parse_fadt(t),
                b"MCFG" => acpi.parse_mcfg(t),
                _ => {}
            }
        }
        // No MCFG (QEMU's microvm has none): the host bridge's `_CBA`.
        if acpi.mcfg.is_none() {
            acpi.mcfg = acpi.cba.map(|base| Mcfg {
                base,
                bus_start: 0,
                bus_end: 0,
                source: EcamSource::Cba,
            });
        }
        Some(acpi)
    }

    fn parse_madt(&mut self, t: &[u8]) {
        if self.madt_found {
            return;
        }
        self.madt_found = true;
        if let Some(a) = t.u32_at(36) {
            self.lapic_addr = u64::from(a);
        }
        let mut off = 44;
        while off + 2 <= t.len() {
            let kind = t[off];
            let len = usize::from(t[off + 1]);
            if len < 2 || off + len > t.len() {
                break;
            }
            let e = &t[off..off + len];
            let flags_enabled = |at: usize| e.u32_at(at).unwrap_or(0) & 1 != 0;
            match (kind, len) {
                // Processor local APIC: enabled when flags bit 0 is set.
                (0, 8..) if flags_enabled(4) => self.add_cpu(u32::from(e[3])),
                // Processor local x2APIC.
                (9, 16..) if flags_enabled(8) => self.add_cpu(e.u32_at(4).unwrap_or(0)),
                // IOAPICs: the first one is reported, all are kept.
                (1, 12..) => {
                    let entry = (e.u32_at(4).unwrap_or(0), e.u32_at(8).unwrap_or(0));
                    if self.ioapic.is_none() {
                        self.ioapic = Some(entry);
                    }
                    if self.ioapic_count < MAX_IOAPICS {
                        self.ioapics[self.ioapic_count] = entry;
                        self.ioapic_count += 1;
                    }
                }
                // Interrupt source override for ISA IRQ 4.
                (2, 10..) if e[3] == 4 => self.com1_gsi = e.u32_at(4).unwrap_or(4),
                // Local APIC address override.
                (5, 12..) => self.lapic_addr = e.u64_at(4).unwrap_or(self.lapic_addr),
                _ => {}
            }
            off += len;
        }
    }

    /// The IOAPIC whose GSI range starts closest below `gsi`: (address, GSI
    /// base). Whether it has a pin for `gsi` is for the caller to check.
    pub fn ioapic_for(&self, gsi: u32) -> Option<(u32, u32)> {
        self.ioapics[..self.ioapic_count]
            .iter()
            .copied()
            .filter(|&(_, base)| base <= gsi)
            .max_by_key(|&(_, base)| base)
    }

    /// MCFG: 8 reserved bytes after the header, then 16-byte allocations
    /// (base u64, segment u16, start bus u8, end bus u8, reserved u32); the
    /// first one for segment 0 with start <= end is kept.
    fn parse_mcfg(&mut self, t: &[u8]) {
        if self.mcfg.is_some() {
            return;
        }
        let Some(entries) = t.get(HEADER_LEN + 8..) else {
            return;
        };
        self.mcfg = entries.chunks_exact(16).find_map(|e| {
            let base = e.u64_at(0)?;
            let segment = u16::from(e.u8_at(8)?) | u16::from(e.u8_at(9)?) << 8;
            let (bus_start, bus_end) = (e.u8_at(10)?, e.u8_at(11)?);
            (segment == 0 && base != 0 && bus_start <= bus_end).then_some(Mcfg {
                base,
                bus_start,
                bus_end,
                source: EcamSource::Mcfg,
            })
        });
    }

    fn add_cpu(&mut self, apic_id: u32) {
        if self.cpu_count < MAX_CPUS {
            self.cpu_ids[self.cpu_count] = apic_id;
            self.cpu_count += 1;
        }
        self.cpus_total += 1;
    }

    fn parse_fadt(&mut self, t: &[u8]) {
        let flags = t.u32_at(112).unwrap_or(0);
        const RESET_REG_SUP: u32 = 1 << 10;
        if flags & RESET_REG_SUP != 0 {
            if let (Some(gas), Some(value)) = (Gas::parse(t, 116), t.u8_at(128)) {
                self.reset = Some((gas, value));
            }
        }
        self.sleep_control = Gas::parse(t, 244);
        self.pm1a_control = Gas::parse(t, 172).or_else(|| {
            let port = t.u32_at(64).filter(|&p| p != 0)?;
            Some(Gas {
                space: 1,
                bit_width: 16,
                bit_offset: 0,
                access_size: 2,
                address: u64::from(port),
            })
        });
        let dsdt = match t.u64_at(140).filter(|&x| x != 0) {
            Some(x) => x,
            None => u64::from(t.u32_at(40).unwrap_or(0)),
        };
        if let Some(dsdt) = table(dsdt).filter(|d| &d[..4] == b"DSDT") {
            if let Some(typ) = s5_sleep_type(&dsdt[HEADER_LEN..]) {
                self.s5_type = typ;
                self.s5_found = true;
            }
            self.cba = cba_base(&dsdt[HEADER_LEN..]);
        }
    }
}

/// Finds the first `_CBA` in AML, as `Name(_CBA, n)` or as
/// `Method(_CBA) { Return (n) }` (QEMU's GPEX), and returns `n`.
fn cba_base(aml: &[u8]) -> Option<u64> {
    let pos = aml.windows(4).position(|w| w == b"_CBA")?;
    let mut i = pos + 4;
    // A method: flags byte, then ReturnOp.
    if aml.u8_at(i + 1)? == 0xa4 && aml.u8_at(i)? & 0xf0 == 0 {
        i += 2;
    }
    let int = |len: usize| -> Option<u64> {
        let b = aml.get(i + 1..i + 1 + len)?;
        Some(b.iter().rev().fold(0u64, |v, &x| v << 8 | u64::from(x)))
    };
    match aml.u8_at(i)? {
        0x0a => int(1),
        0x0b => int(2),
        0x0c => int(4),
        0x0e => int(8),
        _ => None,
    }
    .filter(|&b| b != 0)
}

/// Finds `Name(_S5_, Package(){ typ, ... })` in AML and returns `typ`.
fn s5_sleep_type(aml: &[u8]) -> Option<u8> {
    let pos = aml.windows(4).position(|w| w == b"_S5_")?;
    let mut i = pos + 4;
    if aml.u8_at(i)? != 0x12 {
        return None; // not a PackageOp
    }
    i += 1;
    let lead = aml.u8_at(i)?;
    i += 1 + usize::from(lead >> 6); // PkgLength: lead byte + 0..3 more
    i += 1; // NumElements
    match aml.u8_at(i)? {
        0x0a => aml.u8_at(i + 1), // BytePrefix
        0x00 => Some(0),          // ZeroOp
        0x01 => Some(1),          // OneOp
        _ => None,
    }
}

/// Prints the `acpi:`, `cpus:` and `ioapic:` lines; returns the number of
/// CPUs (enabled MADT entries, or 1 without a MADT).
pub fn report(acpi: Option<&Acpi>) -> usize {
    match acpi {
        Some(a) => println!(
            "acpi: rsdp 0x{:x} ({}), s5 {}{}",
            a.rsdp,
            if a.rsdp_source == RsdpSource::StartInfo {
                "start_info"
            } else {
                "scan"
            },
            a.s5_type,
            if a.s5_found { "" } else { " (default)" }
        ),
        None => println!("acpi: none"),
    }
    let cpus = match acpi {
        Some(a) if a.madt_found && a.cpus_total > 0 => {
            println!("cpus: {} (madt)", a.cpus_total);
            a.cpus_total
        }
        _ => {
            println!("cpus: 1 (cpuid)");
            1
        }
    };
    match acpi.and_then(|a| a.ioapic) {
        Some((addr, gsi)) => println!("ioapic: 0x{:x} gsi {}", addr, gsi),
        None => println!("ioapic: none"),
    }
    cpus
}
