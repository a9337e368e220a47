//! Local APIC (xAPIC, MMIO) and IOAPIC access from CPL3.

use crate::platform::arch::{mmio_read32, mmio_write32, pause};
use crate::platform::boot::VECTOR_SPURIOUS;

/// Register offsets of the local APIC.
pub mod reg {
    pub const ID: u64 = 0x20;
    pub const EOI: u64 = 0xb0;
    pub const SVR: u64 = 0xf0;
    pub const ICR_LOW: u64 = 0x300;
    pub const ICR_HIGH: u64 = 0x310;
    pub const LVT_TIMER: u64 = 0x320;
    pub const TIMER_INITIAL: u64 = 0x380;
    pub const TIMER_CURRENT: u64 = 0x390;
    pub const TIMER_DIVIDE: u64 = 0x3e0;
}

/// LVT mask bit.
pub const LVT_MASKED: u32 = 1 << 16;
/// LVT timer periodic mode.
pub const LVT_PERIODIC: u32 = 1 << 17;

/// The local APIC of the CPU running this code.
#[derive(Clone, Copy, Debug)]
pub struct Lapic {
    base: u64,
}

impl Lapic {
    /// The local APIC at `base` (from the MADT; 0xFEE00000 everywhere).
    pub fn new(base: u64) -> Lapic {
        Lapic {
            base: base & 0xffff_f000,
        }
    }

    /// Address of the EOI register (for the interrupt stubs).
    pub fn eoi_addr(&self) -> u64 {
        self.base + reg::EOI
    }

    /// Reads a register.
    pub fn read(&self, reg: u64) -> u32 {
        // SAFETY: `base` is the LAPIC page (below 4 GiB, identity-mapped, user)
        // and `reg` one of its 32-bit registers.
        unsafe { mmio_read32(self.base + reg) }
    }

    /// Writes a register.
    pub fn write(&self, reg: u64, value: u32) {
        // SAFETY: as for `read`; LAPIC registers do not alias RAM.
        unsafe { mmio_write32(self.base + reg, value) }
    }

    /// This CPU's APIC ID (xAPIC ID register bits 31:24). Preferred over
    /// CPUID at CPL3, which a hypervisor may run natively on the host CPU.
    pub fn id(&self) -> u32 {
        self.read(reg::ID) >> 24
    }

    /// Software-enables the APIC with the spurious vector.
    pub fn enable(&self) {
        self.write(reg::SVR, 0x100 | u32::from(VECTOR_SPURIOUS));
    }

    /// Sends an IPI (`icr_low` = delivery mode, level, vector) to `apic_id`
    /// and waits (bounded) for the delivery-status bit to clear.
    pub fn send_ipi(&self, apic_id: u32, icr_low: u32) {
        self.write(reg::ICR_HIGH, apic_id << 24);
        self.write(reg::ICR_LOW, icr_low);
        for _ in 0..100_000 {
            if self.read(reg::ICR_LOW) & (1 << 12) == 0 {
                break;
            }
            pause();
        }
    }
}

/// An IOAPIC.
#[derive(Clone, Copy, Debug)]
pub struct IoApic {
    base: u64,
    gsi_base: u32,
}

impl IoApic {
    /// The IOAPIC at `base` serving GSIs from `gsi_base`.
    pub fn new(base: u32, gsi_base: u32) -> IoApic {
        IoApic {
            base: u64::from(base),
            gsi_base,
        }
    }

    fn write(&self, index: u32, value: u32) {
        // SAFETY: IOREGSEL (base+0) and IOWIN (base+0x10) of the MADT's IOAPIC,
        // below 4 GiB and identity-mapped; they do not alias RAM.
        unsafe {
            mmio_write32(self.base, index);
            mmio_write32(self.base + 0x10, value);
        }
    }

    fn read(&self, index: u32) -> u32 {
        // SAFETY: as for `write`; reading IOWIN has no side effects.
        unsafe {
            mmio_write32(self.base, index);
            mmio_read32(self.base + 0x10)
        }
    }

    /// Whether this IOAPIC has a pin for `gsi` (IOAPICVER bits 23:16 hold
    /// the highest redirection entry).
    pub fn serves(&self, gsi: u32) -> bool {
        let pins = ((self.read(1) >> 16) & 0xff) + 1;
        gsi.checked_sub(self.gsi_base).is_some_and(|p| p < pins)
    }

    /// Programs the redirection entry of `gsi`: fixed delivery, physical
    /// destination `apic_id`, edge, active high; masked when `masked`.
    /// Returns false when `gsi` is not served by this IOAPIC.
    pub fn route(&self, gsi: u32, vector: u8, apic_id: u32, masked: bool) -> bool {
        let Some(pin) = gsi.checked_sub(self.gsi_base).filter(|&p| p < 240) else {
            return false;
        };
        let low = u32::from(vector) | if masked { LVT_MASKED } else { 0 };
        self.write(0x10 + 2 * pin + 1, apic_id << 24);
        self.write(0x10 + 2 * pin, low);
        true
    }
}

/// Masks every line of both legacy 8259 PICs.
pub fn mask_pic() {
    crate::platform::arch::outb(0x21, 0xff);
    crate::platform::arch::outb(0xa1, 0xff);
}
