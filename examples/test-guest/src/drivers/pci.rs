//! PCI bus 0: configuration access through ports 0xCF8/0xCFC ("port CAM")
//! or ECAM (the MCFG's window), both as virtio-drivers `ConfigurationAccess`
//! implementations so its `PciRoot` and `PciTransport` run on them; the scan
//! of bus 0, BAR checks (and assignment when the VMM left a BAR at 0), and
//! `test=pci` (both mechanisms must show the same bus).

use crate::platform::acpi::{EcamSource, Mcfg};
use crate::platform::arch::{inl, outb, outl};
use crate::cmdline::PciMode;
use crate::println;
use crate::drivers::virtio::map_mmio;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Cam as CamKind, Command, ConfigurationAccess, DeviceFunction, DeviceFunctionInfo,
    MemoryBarType, PciRoot,
};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// One configuration access mechanism for bus 0 (and, for ECAM, the buses
/// its MCFG entry covers). Reads outside what it decodes return all ones,
/// writes there are dropped, as a master abort would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cam {
    /// Configuration mechanism #1: ports 0xCF8 (address) and 0xCFC (data),
    /// 256 bytes per function, from CPL3 (IOPL=3 and the TSS bitmap).
    Port,
    /// Memory-mapped ECAM: 4 KiB per function at
    /// `base + (bus << 20 | device << 15 | function << 12)`.
    Ecam(Mcfg),
}

impl Cam {
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
        match self {
            Cam::Port => {
                outl(CONFIG_ADDRESS, Cam::port_address(df, offset));
                inl(CONFIG_DATA)
            }
            Cam::Ecam(mcfg) => match Cam::ecam_addr(mcfg, df, offset) {
                // SAFETY: inside the MCFG window, which `open_ecam` mapped
                // (identity, user, uncached above 4 GiB); device registers
                // that no Rust object aliases; 4-byte aligned.
                Some(addr) => unsafe { core::ptr::read_volatile(addr as *const u32) },
                None => u32::MAX,
            },
        }
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        match self {
            Cam::Port => {
                outl(CONFIG_ADDRESS, Cam::port_address(df, offset));
                outl(CONFIG_DATA, data);
            }
            Cam::Ecam(mcfg) => {
                if let Some(addr) = Cam::ecam_addr(mcfg, df, offset) {
                    // SAFETY: as for `read_word`.
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

/// Maps the ECAM window of `mcfg` (buses start..=end, 1 MiB each).
fn open_ecam(mcfg: Mcfg) -> Option<Cam> {
    let start = mcfg.base + (u64::from(mcfg.bus_start) << 20);
    let size = (u64::from(mcfg.bus_end - mcfg.bus_start) + 1) << 20;
    map_mmio(start, size).then_some(Cam::Ecam(mcfg))
}

fn print_ecam(m: &Mcfg) {
    println!(
        "pci: ecam 0x{:x} buses {}-{} ({})",
        m.base,
        m.bus_start,
        m.bus_end,
        match m.source {
            EcamSource::Mcfg => "mcfg",
            EcamSource::Cba => "_cba",
        }
    );
}

/// Picks the mechanism for `mode`: prints
/// `pci: ecam 0x<base> buses <a>-<b> (<mcfg|_cba>)`, `pci: port cam`, or
/// `pci: none (<why>)` and returns it.
pub fn choose(mode: PciMode, mcfg: Option<Mcfg>) -> Option<Cam> {
    let ecam = || -> Result<Cam, &'static str> {
        let m = mcfg.ok_or("no ecam")?;
        print_ecam(&m);
        open_ecam(m).ok_or("ecam cannot be mapped")
    };
    let port = || -> Result<Cam, &'static str> {
        if port_cam_present() {
            println!("pci: port cam");
            Ok(Cam::Port)
        } else {
            Err("no port cam")
        }
    };
    let chosen = match mode {
        PciMode::Off => Err("pci=off"),
        PciMode::Ecam => ecam(),
        PciMode::Cam => port(),
        PciMode::Auto if mcfg.is_some() => ecam(),
        PciMode::Auto => port().map_err(|_| "no ecam, no port cam"),
    };
    match chosen {
        Ok(cam) => Some(cam),
        Err(why) => {
            println!("pci: none ({})", why);
            None
        }
    }
}

/// A function found on bus 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    pub df: DeviceFunction,
    pub info: DeviceFunctionInfo,
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
    pub subclass: u8,
    /// Header type (bits 6:0; 0 = endpoint, 1 = PCI-PCI bridge).
    pub header_type: u8,
}

/// Scans bus 0 with virtio-drivers' `enumerate_bus`, keeping functions 1-7
/// only of multi-function devices (header type bit 7 of function 0), prints
/// `pci: 00:<dev>.<fn> <vendor>:<device> class <cc><ss>` per function and
/// `pci: <n> functions`.
pub fn scan(root: &PciRoot<Cam>, cam: &Cam) -> Vec<Function> {
    let mut found = Vec::new();
    let mut multi = false;
    for (df, info) in root.enumerate_bus(0) {
        let header = (cam.read_word(df, 0x0c) >> 16) as u8;
        if df.function == 0 {
            multi = header & 0x80 != 0;
        } else if !multi {
            continue;
        }
        let f = Function {
            df,
            vendor: info.vendor_id,
            device: info.device_id,
            class: info.class,
            subclass: info.subclass,
            header_type: header & 0x7f,
            info,
        };
        println!(
            "pci: {} {:04x}:{:04x} class {:02x}{:02x}",
            df, f.vendor, f.device, f.class, f.subclass
        );
        found.push(f);
    }
    println!("pci: {} functions", found.len());
    found
}

/// Where BARs the VMM left at 0 are placed: microvm's (`pcie=on`) 32-bit
/// PCI window, which is also inside q35's PCI hole when RAM below 4 GiB ends
/// at or below 3 GiB. The window is cut short at the ECAM if that lies inside.
pub const BAR_WINDOW: (u64, u64) = (0xc000_0000, 0xe000_0000);

/// Allocator state for BAR assignment.
pub struct BarWindow {
    next: u64,
    end: u64,
    announced: bool,
}

impl BarWindow {
    /// The fixed window, shortened so it stays below the ECAM base when the
    /// ECAM starts inside it.
    pub fn new(ecam_base: Option<u64>) -> BarWindow {
        let (start, mut end) = BAR_WINDOW;
        if let Some(base) = ecam_base.filter(|&b| b > start && b < end) {
            end = base;
        }
        BarWindow {
            next: start,
            end,
            announced: false,
        }
    }

    fn take(&mut self, size: u64) -> Option<u64> {
        let addr = self.next.checked_next_multiple_of(size.max(16))?;
        let end = addr.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(addr)
    }
}

/// Checks the memory BARs of `df` (an endpoint): a BAR at 0 gets an address
/// from `window` (naturally aligned; 64-bit BARs too, below 4 GiB); a BAR
/// above 4 GiB is mapped. Prints one line per memory BAR; then turns on
/// memory decoding and bus mastering. Returns false when a BAR could not be
/// placed or mapped.
pub fn setup_bars(root: &mut PciRoot<Cam>, df: DeviceFunction, window: &mut BarWindow) -> bool {
    let Ok(bars) = root.bars(df) else {
        println!("pci: {} bad bar type", df);
        return false;
    };
    let mut ok = true;
    for (index, bar) in bars.iter().enumerate() {
        let Some(BarInfo::Memory {
            address_type,
            prefetchable,
            address,
            size,
        }) = *bar
        else {
            continue;
        };
        let width = if address_type == MemoryBarType::Width64 {
            "mem64"
        } else {
            "mem32"
        };
        let pref = if prefetchable { " pref" } else { "" };
        let (addr, by) = if address != 0 {
            (Some(address), "vmm")
        } else {
            if !window.announced {
                println!(
                    "pci: assigning bars from 0x{:x}-0x{:x}",
                    window.next,
                    window.end - 1
                );
                window.announced = true;
            }
            let addr = window.take(size);
            if let Some(a) = addr {
                if address_type == MemoryBarType::Width64 {
                    root.set_bar_64(df, index as u8, a);
                } else {
                    root.set_bar_32(df, index as u8, a as u32);
                }
            }
            (addr, "guest")
        };
        match addr {
            Some(a) if map_mmio(a, size) => println!(
                "pci: {} bar {} 0x{:x} size 0x{:x} {}{} ({})",
                df, index, a, size, width, pref, by
            ),
            Some(a) => {
                println!(
                    "pci: {} bar {} 0x{:x} size 0x{:x} {}{} ({}): cannot be mapped",
                    df, index, a, size, width, pref, by
                );
                ok = false;
            }
            None => {
                println!(
                    "pci: {} bar {} size 0x{:x} {}{}: no room in the window",
                    df, index, size, width, pref
                );
                ok = false;
            }
        }
    }
    let (_, command) = root.get_status_command(df);
    root.set_command(df, command | Command::MEMORY_SPACE | Command::BUS_MASTER);
    ok
}

/// `test=pci`: bus 0 through port CAM and through ECAM (segment 0 of the
/// MCFG); each view prints its functions, then the lists and the first 256
/// bytes of every function's configuration space must match.
pub fn test_cam_ecam(mcfg: Option<Mcfg>) {
    let result = (|| -> Result<(), String> {
        if !port_cam_present() {
            return Err(String::from("no port cam"));
        }
        let m = mcfg.ok_or_else(|| String::from("no ecam"))?;
        println!("pci: port cam");
        let port = PciRoot::new(Cam::Port);
        let via_port = scan(&port, &Cam::Port);
        print_ecam(&m);
        let ecam = open_ecam(m).ok_or_else(|| String::from("ecam cannot be mapped"))?;
        let via_ecam = scan(&PciRoot::new(ecam), &ecam);
        if via_port != via_ecam {
            return Err(format!(
                "cam lists {} functions, ecam {}",
                via_port.len(),
                via_ecam.len()
            ));
        }
        for f in &via_port {
            for off in (0..=0xfcu8).step_by(4) {
                let (a, b) = (Cam::Port.read_word(f.df, off), ecam.read_word(f.df, off));
                if a != b {
                    return Err(format!(
                        "{} offset 0x{:02x}: cam 0x{:08x} ecam 0x{:08x}",
                        f.df, off, a, b
                    ));
                }
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => println!("test pci-cam-ecam: ok"),
        Err(why) => println!("test pci-cam-ecam: FAIL {}", why),
    }
}
