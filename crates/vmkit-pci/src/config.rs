//! A type 0 configuration space: header fields, BAR registers with sizing, writable masks and
//! the capability list.

use std::fmt;

use crate::{Error, Result};

/// Size of a function's configuration space (PCI Express: 4 KiB).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the part of configuration space the port mechanism (0xCF8/0xCFC) reaches.
pub const LEGACY_CONFIG_SPACE_SIZE: usize = 256;

/// Register offsets of the type 0 header.
pub mod offsets {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command (16 bits).
    pub const COMMAND: u16 = 0x04;
    /// Status (16 bits).
    pub const STATUS: u16 = 0x06;
    /// Revision ID (8 bits).
    pub const REVISION_ID: u16 = 0x08;
    /// Programming interface (8 bits).
    pub const PROG_IF: u16 = 0x09;
    /// Subclass (8 bits).
    pub const SUBCLASS: u16 = 0x0A;
    /// Base class (8 bits).
    pub const CLASS: u16 = 0x0B;
    /// Header type (8 bits; bit 7: multi-function).
    pub const HEADER_TYPE: u16 = 0x0E;
    /// BAR 0; BAR n is at `BAR0 + 4 * n`.
    pub const BAR0: u16 = 0x10;
    /// Subsystem vendor ID (16 bits).
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2C;
    /// Subsystem ID (16 bits).
    pub const SUBSYSTEM_ID: u16 = 0x2E;
    /// Capabilities pointer (8 bits).
    pub const CAPABILITIES_POINTER: u16 = 0x34;
    /// Interrupt line (8 bits, read-write scratch for the OS).
    pub const INTERRUPT_LINE: u16 = 0x3C;
    /// Interrupt pin (8 bits; 0 = none).
    pub const INTERRUPT_PIN: u16 = 0x3D;
}

/// Command register: I/O space decoding.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command register: memory space decoding.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register: bus master (DMA and MSI) enable.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the capability list is present.
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Capability ID of a vendor-specific capability (virtio-pci uses these).
pub const CAP_ID_VENDOR: u8 = 0x09;

/// Where the capability list starts: right after the type 0 header.
const FIRST_CAPABILITY: usize = 0x40;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// 32-bit memory space.
    Memory32 {
        /// Reads have no side effects (bit 3).
        prefetchable: bool,
    },
    /// 64-bit memory space; takes this BAR register and the next.
    Memory64 {
        /// Reads have no side effects (bit 3).
        prefetchable: bool,
    },
    /// I/O space.
    Io,
}

impl BarKind {
    /// Whether it decodes memory space.
    pub fn is_memory(self) -> bool {
        !matches!(self, BarKind::Io)
    }

    /// The read-only low bits of the BAR register.
    fn flags(self) -> u32 {
        match self {
            BarKind::Memory32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Memory64 { prefetchable } => (u32::from(prefetchable) << 3) | 0b100,
            BarKind::Io => 1,
        }
    }

    fn flag_bits(self) -> u32 {
        if self.is_memory() {
            0xF
        } else {
            0x3
        }
    }

    /// The highest address plus one the BAR can hold.
    fn limit(self) -> u128 {
        match self {
            BarKind::Memory64 { .. } => 1 << 64,
            _ => 1 << 32,
        }
    }
}

/// A BAR as its device defines it and as the guest programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBar {
    /// Which BAR register (0–5; a 64-bit BAR also takes `index + 1`).
    pub index: usize,
    /// What it decodes.
    pub kind: BarKind,
    /// Its size in bytes: a power of two.
    pub size: u64,
    /// The address the BAR register holds now.
    pub address: u64,
}

impl PciBar {
    /// `[address, address + size)` as an inclusive range, or `None` if it wraps.
    pub fn range(&self) -> Option<std::ops::RangeInclusive<u64>> {
        let last = self.address.checked_add(self.size - 1)?;
        Some(self.address..=last)
    }
}

#[derive(Clone, Copy, Debug)]
struct BarDef {
    kind: BarKind,
    size: u64,
}

/// A function's 4 KiB configuration space, type 0 header.
///
/// Reads and writes go through a per-bit writable mask: read-only fields (IDs, class, the
/// capability list, BAR flag bits and the BAR address bits below the BAR's size) keep their
/// value whatever the guest writes. That is what makes BAR sizing work: writing all ones
/// to a BAR register reads back the size mask with the flag bits. Devices own one and
/// forward [`PciDevice`](crate::PciDevice) config accesses to [`read`](Self::read) and
/// [`write`](Self::write).
#[derive(Clone)]
pub struct ConfigSpace {
    regs: Vec<u32>,
    wmask: Vec<u32>,
    bars: [Option<BarDef>; 6],
    last_capability: Option<usize>,
    next_capability: usize,
}

impl fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor_id", &format_args!("{:#06x}", self.read_u16(0)))
            .field("device_id", &format_args!("{:#06x}", self.read_u16(2)))
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

/// The state of a [`ConfigSpace`] for a snapshot: its 1024 registers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigSpaceState {
    /// The 32-bit registers, offset 0 first.
    pub regs: Vec<u32>,
}

/// The identity of a function: what the header's read-only fields say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Base class, subclass, programming interface.
    pub class: (u8, u8, u8),
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
}

impl ConfigSpace {
    /// A type 0 header with these IDs, no BARs, no capabilities, no interrupt pin, and only
    /// the command register's I/O, memory, bus master and INTx-disable bits and the
    /// interrupt line writable.
    pub fn new(ids: PciIds) -> Self {
        let mut c = Self {
            regs: vec![0; CONFIG_SPACE_SIZE / 4],
            wmask: vec![0; CONFIG_SPACE_SIZE / 4],
            bars: [None; 6],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        c.set_u16(offsets::VENDOR_ID, ids.vendor_id);
        c.set_u16(offsets::DEVICE_ID, ids.device_id);
        c.set_u8(offsets::REVISION_ID, ids.revision);
        c.set_u8(offsets::CLASS, ids.class.0);
        c.set_u8(offsets::SUBCLASS, ids.class.1);
        c.set_u8(offsets::PROG_IF, ids.class.2);
        c.set_u16(offsets::SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor_id);
        c.set_u16(offsets::SUBSYSTEM_ID, ids.subsystem_id);
        c.set_writable(
            offsets::COMMAND,
            2,
            u32::from(
                COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE,
            ),
        );
        c.set_writable(offsets::INTERRUPT_LINE, 1, 0xFF);
        c
    }

    fn lane(offset: u16, len: usize) -> Option<(usize, u32, u32)> {
        let offset = usize::from(offset);
        let ok = match len {
            1 => true,
            2 => offset.is_multiple_of(2),
            4 => offset.is_multiple_of(4),
            _ => false,
        };
        if !ok || offset + len > CONFIG_SPACE_SIZE {
            return None;
        }
        let shift = 8 * (offset % 4) as u32;
        let mask = if len == 4 {
            u32::MAX
        } else {
            ((1u32 << (8 * len)) - 1) << shift
        };
        Some((offset / 4, shift, mask))
    }

    /// Reads `data` (1, 2 or 4 bytes, naturally aligned, inside 4 KiB) at `offset`. Other
    /// accesses read all ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        let Some((reg, shift, _)) = Self::lane(offset, data.len()) else {
            data.fill(0xFF);
            return;
        };
        let v = (self.regs[reg] >> shift).to_le_bytes();
        data.copy_from_slice(&v[..data.len()]);
    }

    /// Writes `data` (1, 2 or 4 bytes, naturally aligned, inside 4 KiB) at `offset`, through
    /// the writable mask. Other accesses are ignored.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        let Some((reg, shift, lane)) = Self::lane(offset, data.len()) else {
            return;
        };
        let mut b = [0u8; 4];
        b[..data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(b) << shift;
        let mask = self.wmask[reg] & lane;
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
    }

    /// The 32-bit register at `offset` (rounded down to a multiple of 4).
    pub fn read_u32(&self, offset: u16) -> u32 {
        self.regs
            .get(usize::from(offset) / 4)
            .copied()
            .unwrap_or(u32::MAX)
    }

    /// The 16-bit field at `offset` (even).
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// The 8-bit field at `offset`.
    pub fn read_u8(&self, offset: u16) -> u8 {
        let mut b = [0u8; 1];
        self.read(offset, &mut b);
        b[0]
    }

    /// Sets a field regardless of the writable mask (device side).
    pub fn set_bytes(&mut self, offset: u16, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            let at = usize::from(offset) + i;
            if at >= CONFIG_SPACE_SIZE {
                return;
            }
            let shift = 8 * (at % 4) as u32;
            self.regs[at / 4] =
                (self.regs[at / 4] & !(0xFF << shift)) | (u32::from(*byte) << shift);
        }
    }

    /// Sets a 16-bit field regardless of the writable mask.
    pub fn set_u16(&mut self, offset: u16, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Sets an 8-bit field regardless of the writable mask.
    pub fn set_u8(&mut self, offset: u16, value: u8) {
        self.set_bytes(offset, &[value]);
    }

    /// Makes the bits of `mask` (a `len`-byte field at `offset`) writable by the guest.
    pub fn set_writable(&mut self, offset: u16, len: usize, mask: u32) {
        for (i, byte) in mask.to_le_bytes().iter().take(len).enumerate() {
            let at = usize::from(offset) + i;
            if at >= CONFIG_SPACE_SIZE {
                return;
            }
            let shift = 8 * (at % 4) as u32;
            self.wmask[at / 4] =
                (self.wmask[at / 4] & !(0xFF << shift)) | (u32::from(*byte) << shift);
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(offsets::COMMAND)
    }

    /// Sets the interrupt pin (1 = INTA#; 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.set_u8(offsets::INTERRUPT_PIN, pin);
    }

    /// Defines BAR `index` of `kind` and `size` (a power of two; at least 16 bytes for memory,
    /// 4 for I/O) at `address` (aligned to `size`; 0 leaves it unassigned).
    pub fn add_bar(&mut self, index: usize, kind: BarKind, size: u64, address: u64) -> Result<()> {
        let wide = matches!(kind, BarKind::Memory64 { .. });
        if index > 5
            || (wide && index > 4)
            || self.bar_taken(index)
            || (wide && self.bar_taken(index + 1))
        {
            return Err(Error::InvalidBarIndex(index));
        }
        let min = if kind.is_memory() { 16 } else { 4 };
        if !size.is_power_of_two() || size < min || u128::from(size) > kind.limit() / 2 {
            return Err(Error::InvalidBarSize(size));
        }
        if !address.is_multiple_of(size) || u128::from(address) + u128::from(size) > kind.limit() {
            return Err(Error::InvalidBarAddress(address));
        }
        self.bars[index] = Some(BarDef { kind, size });
        let mask = !(size - 1);
        let reg = offsets::BAR0 + 4 * index as u16;
        self.set_writable(reg, 4, (mask as u32) & !kind.flag_bits());
        if wide {
            self.set_writable(reg + 4, 4, (mask >> 32) as u32);
        }
        self.set_bar_address(index, address);
        Ok(())
    }

    fn bar_taken(&self, index: usize) -> bool {
        self.bars[index].is_some()
            || (index > 0
                && matches!(
                    self.bars[index - 1],
                    Some(BarDef {
                        kind: BarKind::Memory64 { .. },
                        ..
                    })
                ))
    }

    /// BAR `index` as defined and programmed (`None` if undefined, or the upper half of a
    /// 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<PciBar> {
        let def = (*self.bars.get(index)?)?;
        let reg = usize::from(offsets::BAR0) / 4 + index;
        let low = u64::from(self.regs[reg] & !def.kind.flag_bits());
        let high = match def.kind {
            BarKind::Memory64 { .. } => u64::from(self.regs[reg + 1]),
            _ => 0,
        };
        Some(PciBar {
            index,
            kind: def.kind,
            size: def.size,
            address: (high << 32) | low,
        })
    }

    /// Sets BAR `index`'s address registers (device side: the bus reverts a refused move
    /// with it). Bits below the BAR size are dropped; an undefined BAR is left alone.
    pub fn set_bar_address(&mut self, index: usize, address: u64) {
        let Some(Some(def)) = self.bars.get(index).copied() else {
            return;
        };
        let address = address & !(def.size - 1);
        let reg = usize::from(offsets::BAR0) / 4 + index;
        self.regs[reg] = (address as u32 & !def.kind.flag_bits()) | def.kind.flags();
        if let BarKind::Memory64 { .. } = def.kind {
            self.regs[reg + 1] = (address >> 32) as u32;
        }
    }

    /// Whether the bytes `[offset, offset + len)` touch BAR register `index` (or its upper
    /// half).
    pub fn touches_bar(&self, index: usize, offset: u16, len: usize) -> bool {
        let Some(Some(def)) = self.bars.get(index) else {
            return false;
        };
        let start = usize::from(offsets::BAR0) + 4 * index;
        let end = start
            + if matches!(def.kind, BarKind::Memory64 { .. }) {
                8
            } else {
                4
            };
        let o = usize::from(offset);
        o < end && o + len > start
    }

    /// The registers, for a snapshot.
    pub fn state(&self) -> ConfigSpaceState {
        ConfigSpaceState {
            regs: self.regs.clone(),
        }
    }

    /// Restores the guest-writable bits of `state` into this configuration space, built the
    /// same way (same IDs, BARs and capabilities). The bus does not see this: a VMM has it
    /// bring the BAR mappings in line afterwards (`PciBus::refresh_mappings`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] for a register count other than 1024 or a read-only bit that
    /// differs (another function's state); nothing is changed then.
    pub fn restore(&mut self, state: &ConfigSpaceState) -> Result<()> {
        if state.regs.len() != self.regs.len() {
            return Err(Error::InvalidState(format!(
                "{} configuration registers, not {}",
                state.regs.len(),
                self.regs.len()
            )));
        }
        let differs = self
            .regs
            .iter()
            .zip(&self.wmask)
            .zip(&state.regs)
            .position(|((r, m), s)| (r ^ s) & !m != 0);
        if let Some(i) = differs {
            return Err(Error::InvalidState(format!(
                "configuration register {:#x}: read-only bits differ (another function?)",
                4 * i
            )));
        }
        for ((r, m), s) in self.regs.iter_mut().zip(&self.wmask).zip(&state.regs) {
            *r = (*r & !m) | (s & m);
        }
        Ok(())
    }

    /// Appends a capability: `id`, the next pointer (filled in by the next capability), then
    /// `body`. The capability is padded to a multiple of 4 bytes and read-only (use
    /// [`set_writable`](Self::set_writable) for its writable fields). Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<u16> {
        let len = (body.len() + 2).next_multiple_of(4);
        let at = self.next_capability;
        if at + len > LEGACY_CONFIG_SPACE_SIZE {
            return Err(Error::NoCapabilitySpace(len));
        }
        let offset = at as u16;
        self.set_bytes(offset, &[id, 0]);
        self.set_bytes(offset + 2, body);
        match self.last_capability {
            Some(prev) => self.set_u8(prev as u16 + 1, offset as u8),
            None => {
                self.set_u8(offsets::CAPABILITIES_POINTER, offset as u8);
                let status = self.read_u16(offsets::STATUS) | STATUS_CAPABILITIES_LIST;
                self.set_u16(offsets::STATUS, status);
            }
        }
        self.last_capability = Some(at);
        self.next_capability = at + len;
        Ok(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs() -> ConfigSpace {
        ConfigSpace::new(PciIds {
            vendor_id: 0x1AF4,
            device_id: 0x1044,
            revision: 1,
            class: (0xFF, 0, 0),
            subsystem_vendor_id: 0x1AF4,
            subsystem_id: 0x40,
        })
    }

    fn w32(c: &mut ConfigSpace, off: u16, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    #[test]
    fn state_restores_writable_bits_and_refuses_another_function() {
        let mut a = cs();
        a.add_bar(
            0,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x1000,
            0,
        )
        .unwrap();
        w32(&mut a, 0x10, 0xC000_0000);
        w32(&mut a, 0x04, 0x6);
        w32(&mut a, 0x3C, 0x0B);
        let state = a.state();
        let mut b = cs();
        b.add_bar(
            0,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x1000,
            0,
        )
        .unwrap();
        b.restore(&state).unwrap();
        assert_eq!(b.state(), state);
        assert_eq!(b.bar(0).unwrap().address, 0xC000_0000);
        assert_eq!(b.command(), 0x6);

        // Another device ID, a missing register, a read-only bit set: refused, unchanged.
        let mut other = state.clone();
        other.regs[0] = 0x1041_1AF4;
        let err = b.restore(&other).unwrap_err().to_string();
        assert!(err.contains("register 0x0"), "{err}");
        let mut short = state.clone();
        short.regs.pop();
        assert!(matches!(b.restore(&short), Err(Error::InvalidState(_))));
        let mut ro = state.clone();
        ro.regs[0x3C / 4] |= 0x100; // the interrupt pin
        assert!(matches!(b.restore(&ro), Err(Error::InvalidState(_))));
        assert_eq!(b.state(), state);
    }

    #[test]
    fn ids_are_read_only() {
        let mut c = cs();
        w32(&mut c, 0, 0xFFFF_FFFF);
        w32(&mut c, 8, 0);
        assert_eq!(c.read_u32(0), 0x1044_1AF4);
        assert_eq!(c.read_u32(8), 0xFF00_0001);
        assert_eq!(c.read_u16(0x2C), 0x1AF4);
    }

    #[test]
    fn bar_sizing_32_64_io() {
        let mut c = cs();
        c.add_bar(
            0,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x1000,
            0xE000_0000,
        )
        .unwrap();
        c.add_bar(
            1,
            BarKind::Memory64 { prefetchable: true },
            0x4000,
            0x1_0000_0000,
        )
        .unwrap();
        c.add_bar(3, BarKind::Io, 0x20, 0xC000).unwrap();
        assert_eq!(c.read_u32(0x10), 0xE000_0000);
        assert_eq!(c.read_u32(0x14), 0x0000_000C);
        assert_eq!(c.read_u32(0x18), 1);
        assert_eq!(c.read_u32(0x1C), 0xC001);
        for r in [0x10, 0x14, 0x18, 0x1C, 0x20] {
            w32(&mut c, r, 0xFFFF_FFFF);
        }
        assert_eq!(c.read_u32(0x10), 0xFFFF_F000);
        assert_eq!(
            c.read_u32(0x14),
            0xFFFF_C00C,
            "64-bit prefetchable flags kept"
        );
        assert_eq!(c.read_u32(0x18), 0xFFFF_FFFF);
        assert_eq!(c.read_u32(0x1C), 0xFFFF_FFE1);
        assert_eq!(c.read_u32(0x20), 0, "undefined BAR reads 0");
        assert_eq!(c.read_u32(0x24), 0);
        // The address as the guest writes it, bits below the size dropped.
        w32(&mut c, 0x10, 0xD000_0123);
        assert_eq!(c.bar(0).unwrap().address, 0xD000_0000);
        w32(&mut c, 0x14, 0x8000_4000);
        w32(&mut c, 0x18, 0x2);
        assert_eq!(c.bar(1).unwrap().address, 0x2_8000_4000);
        assert!(c.bar(2).is_none(), "upper half of BAR 1");
        assert!(c.touches_bar(1, 0x18, 1));
        assert!(!c.touches_bar(1, 0x1C, 4));
    }

    #[test]
    fn bad_bars_refused() {
        let mut c = cs();
        let m = BarKind::Memory32 {
            prefetchable: false,
        };
        assert_eq!(c.add_bar(6, m, 0x1000, 0), Err(Error::InvalidBarIndex(6)));
        assert_eq!(
            c.add_bar(
                5,
                BarKind::Memory64 {
                    prefetchable: false
                },
                0x1000,
                0
            ),
            Err(Error::InvalidBarIndex(5))
        );
        assert_eq!(
            c.add_bar(0, m, 0x1800, 0),
            Err(Error::InvalidBarSize(0x1800))
        );
        assert_eq!(c.add_bar(0, m, 8, 0), Err(Error::InvalidBarSize(8)));
        assert_eq!(
            c.add_bar(0, m, 0x1000, 0x800),
            Err(Error::InvalidBarAddress(0x800))
        );
        c.add_bar(
            0,
            BarKind::Memory64 {
                prefetchable: false,
            },
            0x1000,
            0,
        )
        .unwrap();
        assert_eq!(c.add_bar(1, m, 0x1000, 0), Err(Error::InvalidBarIndex(1)));
    }

    #[test]
    fn capability_list() {
        let mut c = cs();
        assert_eq!(c.read_u16(offsets::STATUS) & STATUS_CAPABILITIES_LIST, 0);
        let a = c
            .add_capability(CAP_ID_VENDOR, &[14, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        let b = c.add_capability(CAP_ID_MSIX, &[0; 10]).unwrap();
        assert_eq!((a, b), (0x40, 0x50));
        assert_ne!(c.read_u16(offsets::STATUS) & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(c.read_u8(0x34), 0x40);
        assert_eq!(c.read_u16(0x40), 0x5009);
        assert_eq!(c.read_u16(0x50), 0x0011);
        // Read-only.
        w32(&mut c, 0x40, 0);
        assert_eq!(c.read_u16(0x40), 0x5009);
        let big = vec![0u8; 200];
        assert_eq!(
            c.add_capability(9, &big),
            Err(Error::NoCapabilitySpace(204))
        );
    }

    #[test]
    fn hostile_accesses() {
        let mut c = cs();
        let mut b = [0u8; 4];
        c.read(0x1001, &mut b[..2]);
        assert_eq!(b[..2], [0xFF, 0xFF]);
        c.read(0xFFE, &mut b);
        assert_eq!(b, [0xFF; 4]);
        c.read(0x1000, &mut b[..1]);
        let mut b3 = [0u8; 3];
        c.read(0, &mut b3);
        assert_eq!(b3, [0xFF; 3]);
        c.write(0xFFF, &[1]);
        c.write(0x1000, &[1]);
        c.write(u16::MAX, &[1, 2, 3, 4]);
        c.write(0, &[]);
        c.read(0, &mut []);
        c.set_bytes(0xFFE, &[1, 2, 3, 4]);
        c.set_writable(0xFFE, 4, u32::MAX);
        assert_eq!(c.read_u32(0x2000), u32::MAX);
        // Command: only the defined bits stick; byte writes to the upper byte too.
        c.write(4, &[0xFF, 0xFF]);
        assert_eq!(c.command(), 0x0407);
        c.write(0x3C, &[0x0B]);
        c.write(0x3D, &[0x7]);
        assert_eq!(c.read_u16(0x3C), 0x000B);
    }
}
