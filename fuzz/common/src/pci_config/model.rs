//! The model `pci_config` checks the bus against: configuration space as the spec says it
//! must read, the mechanisms' decoding, and capability walks.

use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use vmkit_pci::{
    BarKind, Bdf, PciBar, PciBus, PciDevice, CAP_ID_MSIX, CAP_ID_VENDOR, COMMAND_MEMORY_SPACE,
};

/// Where a configuration access lands, as the mechanism decodes it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Target {
    pub(super) bus: u8,
    pub(super) dev: u8,
    pub(super) func: u8,
    pub(super) reg: u16,
}

/// An access through one mechanism: a port offset from 0xCF8 or an ECAM offset.
#[derive(Debug, Clone, Copy)]
pub(super) enum Mech {
    Port(u16),
    Ecam(u64),
}

pub(super) fn overlaps(a: &RangeInclusive<u64>, b: &RangeInclusive<u64>) -> bool {
    a.start() <= b.end() && b.start() <= a.end()
}

pub(super) fn flag_bits(kind: BarKind) -> u32 {
    if kind.is_memory() {
        0xF
    } else {
        0x3
    }
}

/// What BAR register `reg` (0–5) reads after all ones is written to it.
pub(super) fn size_mask(bars: &[PciBar], reg: usize) -> u32 {
    for b in bars {
        let mask = !(b.size - 1);
        if b.index == reg {
            let flags = match b.kind {
                BarKind::Io => 1,
                BarKind::Memory32 { prefetchable } => u32::from(prefetchable) << 3,
                BarKind::Memory64 { prefetchable } => (u32::from(prefetchable) << 3) | 4,
            };
            return (mask as u32 & !flag_bits(b.kind)) | flags;
        }
        if b.index + 1 == reg && matches!(b.kind, BarKind::Memory64 { .. }) {
            return (mask >> 32) as u32;
        }
    }
    0
}

/// One function's configuration space as the spec says it must read: the first 256 bytes
/// (the rest reads 0), and the bits the guest may change.
pub(super) struct Func {
    pub(super) regs: [u32; 64],
    pub(super) wmask: [u32; 64],
    pub(super) bars: Vec<PciBar>,
    pub(super) dev: Arc<Mutex<dyn PciDevice>>,
}

impl Func {
    pub(super) fn new(dev: Arc<Mutex<dyn PciDevice>>) -> Self {
        let mut regs = [0u32; 64];
        let bars: Vec<PciBar> = {
            let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
            for (i, r) in regs.iter_mut().enumerate() {
                let mut b = [0u8; 4];
                d.read_config(4 * i as u16, &mut b);
                *r = u32::from_le_bytes(b);
            }
            (0..6).filter_map(|i| d.bar(i)).collect()
        };
        let mut wmask = [0u32; 64];
        wmask[1] = 0x0407; // command: I/O, memory, bus master, INTx disable
        wmask[0x3C / 4] = 0xFF; // interrupt line
        for b in &bars {
            let mask = !(b.size - 1);
            wmask[4 + b.index] = mask as u32 & !flag_bits(b.kind);
            if matches!(b.kind, BarKind::Memory64 { .. }) {
                wmask[5 + b.index] = (mask >> 32) as u32;
            }
        }
        let mut f = Self {
            regs,
            wmask,
            bars,
            dev,
        };
        if let Some(at) = walk(|reg, len| f.read(reg, len))
            .into_iter()
            .find(|(_, id)| *id == CAP_ID_MSIX)
        {
            f.wmask[usize::from(at.0) / 4] |= 0xC000 << 16; // MSI-X enable, function mask
        }
        f
    }

    pub(super) fn read(&self, reg: u16, len: usize) -> u32 {
        let word = self.regs.get(usize::from(reg) / 4).copied().unwrap_or(0);
        let v = word >> (8 * (reg % 4));
        if len == 4 {
            v
        } else {
            v & ((1 << (8 * len)) - 1)
        }
    }

    pub(super) fn write(&mut self, reg: u16, data: &[u8]) {
        let Some(word) = self.regs.get_mut(usize::from(reg) / 4) else {
            return;
        };
        let shift = 8 * u32::from(reg % 4);
        let mut b = [0u8; 4];
        b[..data.len()].copy_from_slice(data);
        let lane = if data.len() == 4 {
            u32::MAX
        } else {
            ((1 << (8 * data.len())) - 1) << shift
        };
        let mask = self.wmask[usize::from(reg) / 4] & lane;
        *word = (*word & !mask) | ((u32::from_le_bytes(b) << shift) & mask);
    }

    pub(super) fn decoding(&self) -> bool {
        self.regs[1] as u16 & COMMAND_MEMORY_SPACE != 0
    }

    pub(super) fn bar_address(&self, b: &PciBar) -> u64 {
        let low = u64::from(self.regs[4 + b.index] & !flag_bits(b.kind));
        match b.kind {
            BarKind::Memory64 { .. } => (u64::from(self.regs[5 + b.index]) << 32) | low,
            _ => low,
        }
    }

    pub(super) fn bar_state(&self) -> (bool, Vec<u64>) {
        (
            self.decoding(),
            self.bars.iter().map(|b| self.bar_address(b)).collect(),
        )
    }
}

/// Walks a capability list with `read(reg, len)`: (offset, id) of each capability. Panics
/// if the list does not end within 48 steps or leaves 0x40..=0xFC.
pub(super) fn walk(mut read: impl FnMut(u16, usize) -> u32) -> Vec<(u16, u8)> {
    let mut found = Vec::new();
    if read(0, 2) == 0xFFFF || read(6, 2) & 0x10 == 0 {
        return found;
    }
    let mut at = read(0x34, 1) as u16;
    while at != 0 {
        assert!(
            found.len() < 48,
            "capability list longer than 48: {found:x?}"
        );
        assert!(
            (0x40..=0xFC).contains(&at) && at.is_multiple_of(4),
            "capability pointer {at:#x}"
        );
        let header = read(at, 4);
        found.push((at, header as u8));
        let len = if header as u8 == CAP_ID_VENDOR {
            (header >> 16) as u8
        } else {
            12
        };
        for o in (4..u16::from(len)).step_by(4) {
            read(at + o, 4);
        }
        at = (header >> 8) as u8 as u16;
    }
    found
}

/// The model of the bus: CONFIG_ADDRESS, every function, and the mappings the events told.
pub(super) struct Model {
    pub(super) cf8: u32,
    pub(super) funcs: Vec<Option<Func>>,
    pub(super) mapped: [[Option<u64>; 6]; 32],
}

impl Model {
    pub(super) fn new(bus: &PciBus) -> Self {
        let funcs = (0..32).map(|s| bus.device(s).map(Func::new)).collect();
        Self {
            cf8: 0,
            funcs,
            mapped: [[None; 6]; 32],
        }
    }

    pub(super) fn port_decode(&self, offset: u16, len: usize) -> Option<Target> {
        let within = offset.checked_sub(4).filter(|w| *w < 4)?;
        let ok =
            matches!(len, 1 | 2 | 4) && within % len as u16 == 0 && usize::from(within) + len <= 4;
        (ok && self.cf8 & 0x8000_0000 != 0).then_some(Target {
            bus: (self.cf8 >> 16) as u8,
            dev: ((self.cf8 >> 11) & 0x1F) as u8,
            func: ((self.cf8 >> 8) & 7) as u8,
            reg: (self.cf8 & 0xFC) as u16 + within,
        })
    }

    pub(super) fn ecam_decode(offset: u64) -> Option<Target> {
        (offset < 1 << 28).then_some(Target {
            bus: (offset >> 20) as u8,
            dev: ((offset >> 15) & 0x1F) as u8,
            func: ((offset >> 12) & 7) as u8,
            reg: (offset & 0xFFF) as u16,
        })
    }

    pub(super) fn decode(&self, mech: Mech, len: usize) -> Option<Target> {
        match mech {
            Mech::Port(o) => self.port_decode(o, len),
            Mech::Ecam(o) => Self::ecam_decode(o),
        }
    }

    /// The function a configuration access reaches, if the bus accepts it.
    pub(super) fn accepts(&self, t: Target, len: usize) -> Option<usize> {
        let ok = t.bus == 0
            && t.func == 0
            && matches!(len, 1 | 2 | 4)
            && usize::from(t.reg) % len == 0
            && usize::from(t.reg) + len <= 4096;
        let slot = usize::from(t.dev);
        (ok && self.funcs[slot].is_some()).then_some(slot)
    }

    pub(super) fn expect_read(&self, mech: Mech, len: usize) -> Vec<u8> {
        let value = match (mech, self.decode(mech, len)) {
            (Mech::Port(0), _) if len == 4 => Some(self.cf8),
            (_, Some(t)) => self
                .accepts(t, len)
                .and_then(|s| self.funcs[s].as_ref())
                .map(|f| f.read(t.reg, len)),
            _ => None,
        };
        match value {
            Some(v) => v.to_le_bytes()[..len].to_vec(),
            None => vec![0xFF; len],
        }
    }

    /// Every function reads as modelled, and its BAR registers say what `bar()` says.
    pub(super) fn check_all(&self, bus: &PciBus) {
        for (slot, f) in self.funcs.iter().enumerate() {
            let Some(f) = f else { continue };
            let bdf = Bdf {
                bus: 0,
                device: slot as u8,
                function: 0,
            };
            for reg in (0..0x100).step_by(4).chain([0x100, 0xFFC]) {
                let mut b = [0u8; 4];
                bus.config_read(bdf, reg, &mut b);
                assert_eq!(
                    u32::from_le_bytes(b),
                    f.read(reg, 4),
                    "{bdf} register {reg:#x}"
                );
            }
        }
    }
}
