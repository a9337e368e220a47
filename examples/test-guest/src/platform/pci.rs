//! PCI configuration access for bus 0: ports 0xCF8/0xCFC ("port CAM") or
//! ECAM (the MCFG's window), both as virtio-drivers `ConfigurationAccess`
//! implementations so its `PciRoot` and `PciTransport` run on them.
//!
//! Enumeration, BAR assignment and the mapping of an ECAM window above
//! 4 GiB are in `drivers::pci`.

use crate::platform::acpi::Mcfg;
use crate::platform::arch::{inl, outb, outl};
use virtio_drivers::transport::pci::bus::{Cam as CamKind, ConfigurationAccess, DeviceFunction};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// One configuration access mechanism for bus 0 (and, for ECAM, the buses
/// its MCFG entry covers). Reads outside what it decodes return all ones,
/// writes there are dropped, as a master abort would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cam(Mechanism);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mechanism {
    /// Configuration mechanism #1: ports 0xCF8 (address) and 0xCFC (data),
    /// 256 bytes per function, from CPL3 (IOPL=3 and the TSS bitmap).
    Port,
    /// Memory-mapped ECAM: 4 KiB per function at
    /// `base + (bus << 20 | device << 15 | function << 12)`.
    Ecam(Mcfg),
}

impl Cam {
    /// Ports 0xCF8/0xCFC (whether they work is `port_cam_present`'s
    /// question; absent, reads return what the ports float to).
    pub const PORT: Cam = Cam(Mechanism::Port);

    /// ECAM through the window of `mcfg`.
    ///
    /// # Safety
    /// The window (buses `bus_start..=bus_end`, 1 MiB each, from
    /// `base + (bus_start << 20)`) must be mapped at its physical address,
    /// user-accessible and uncached, for the rest of the run, and hold
    /// device registers only (no RAM that Rust code owns).
    pub unsafe fn ecam(mcfg: Mcfg) -> Cam {
        Cam(Mechanism::Ecam(mcfg))
    }

    fn ecam_addr(mcfg: &Mcfg, df: DeviceFunction, offset: u8) -> Option<u64> {
        if df.bus < mcfg.bus_start || df.bus > mcfg.bus_end || !df.valid() {
            return None;
        }
        let off = CamKind::Ecam.cam_offset(df, offset & 0xfc);
        Some(mcfg.base + u64::from(off))
    }

    fn port_address(df: DeviceFunction, offset: u8) -> u32 {
        0x8000_0000
            | u32::from(df.bus) << 16
            | u32::from(df.device & 0x1f) << 11
            | u32::from(df.function & 0x7) << 8
            | u32::from(offset & 0xfc)
    }
}

impl ConfigurationAccess for Cam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        match &self.0 {
            Mechanism::Port => {
                outl(CONFIG_ADDRESS, Cam::port_address(df, offset));
                inl(CONFIG_DATA)
            }
            Mechanism::Ecam(mcfg) => match Cam::ecam_addr(mcfg, df, offset) {
                // SAFETY: `ecam_addr` keeps the address inside the MCFG window
                // (bus range checked, offset < 4 KiB, 4-byte aligned), which
                // `Cam::ecam`'s caller guarantees is mapped, uncached device
                // registers that no Rust object aliases.
                Some(addr) => unsafe { core::ptr::read_volatile(addr as *const u32) },
                None => u32::MAX,
            },
        }
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        match &self.0 {
            Mechanism::Port => {
                outl(CONFIG_ADDRESS, Cam::port_address(df, offset));
                outl(CONFIG_DATA, data);
            }
            Mechanism::Ecam(mcfg) => {
                if let Some(addr) = Cam::ecam_addr(mcfg, df, offset) {
                    // SAFETY: as for `read_word`: a 4-byte aligned register
                    // inside the mapped window, not memory Rust owns.
                    unsafe { core::ptr::write_volatile(addr as *mut u32, data) }
                }
            }
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        *self
    }
}

/// Whether ports 0xCF8/0xCFC implement configuration mechanism #1 (Linux's
/// `pci_check_type1`: a byte write to 0xCFB, then CONFIG_ADDRESS must hold
/// 0x80000000 written as a dword; the old value is put back).
pub fn port_cam_present() -> bool {
    outb(CONFIG_ADDRESS + 3, 0x01);
    let saved = inl(CONFIG_ADDRESS);
    outl(CONFIG_ADDRESS, 0x8000_0000);
    let present = inl(CONFIG_ADDRESS) == 0x8000_0000;
    outl(CONFIG_ADDRESS, saved);
    present
}
