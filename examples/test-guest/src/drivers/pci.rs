//! PCI bus 0: choosing the configuration access mechanism (and mapping an
//! ECAM window), the scan of bus 0, and BAR checks (and assignment when the
//! VMM left a BAR at 0). The access itself is `platform::pci::Cam`.

use crate::drivers::mmio::map_mmio;
use crate::platform::acpi::{EcamSource, Mcfg};
use crate::platform::pci::{port_cam_present, Cam};
use crate::println;
use alloc::vec::Vec;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Command, ConfigurationAccess, DeviceFunction, DeviceFunctionInfo, MemoryBarType,
    PciRoot,
};

/// Which PCI configuration access mechanism to use for bus 0 (`pci=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciMode {
    /// ECAM when the MCFG describes one for bus 0, else port CAM if present.
    Auto,
    /// ECAM from the MCFG only.
    Ecam,
    /// Ports 0xCF8/0xCFC only.
    Cam,
    /// No PCI scan.
    Off,
}

/// Maps the ECAM window of `mcfg` (buses start..=end, 1 MiB each).
pub fn open_ecam(mcfg: Mcfg) -> Option<Cam> {
    let start = mcfg.base + (u64::from(mcfg.bus_start) << 20);
    let size = (u64::from(mcfg.bus_end - mcfg.bus_start) + 1) << 20;
    if !map_mmio(start, size) {
        return None;
    }
    // SAFETY: `map_mmio` just made the whole window (every bus of the entry)
    // accessible at its physical address, uncached, for the rest of the run;
    // the firmware describes it as the ECAM, so it holds device registers.
    Some(unsafe { Cam::ecam(mcfg) })
}

/// Prints `pci: ecam 0x<base> buses <a>-<b> (<mcfg|_cba>)`.
pub fn print_ecam(m: &Mcfg) {
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
            Ok(Cam::PORT)
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
        if let Some(BarInfo::Memory {
            address_type,
            prefetchable,
            address,
            size,
        }) = *bar
        {
            let bar = MemoryBar {
                df,
                index: index as u8,
                width64: address_type == MemoryBarType::Width64,
                prefetchable,
                address,
                size,
            };
            ok &= bar.place(root, window);
        }
    }
    let (_, command) = root.get_status_command(df);
    root.set_command(df, command | Command::MEMORY_SPACE | Command::BUS_MASTER);
    ok
}

/// One memory BAR of a function, as virtio-drivers' sizing read it.
struct MemoryBar {
    df: DeviceFunction,
    index: u8,
    width64: bool,
    prefetchable: bool,
    address: u64,
    size: u64,
}

impl MemoryBar {
    /// Keeps the VMM's address or assigns one from `window`, maps it, and
    /// prints the BAR's line; false when it has no usable address.
    fn place(&self, root: &mut PciRoot<Cam>, window: &mut BarWindow) -> bool {
        let (addr, by) = if self.address != 0 {
            (Some(self.address), "vmm")
        } else {
            (self.assign(root, window), "guest")
        };
        let (df, index, size) = (self.df, self.index, self.size);
        let width = if self.width64 { "mem64" } else { "mem32" };
        let pref = if self.prefetchable { " pref" } else { "" };
        match addr {
            Some(a) if map_mmio(a, size) => {
                println!(
                    "pci: {} bar {} 0x{:x} size 0x{:x} {}{} ({})",
                    df, index, a, size, width, pref, by
                );
                true
            }
            Some(a) => {
                println!(
                    "pci: {} bar {} 0x{:x} size 0x{:x} {}{} ({}): cannot be mapped",
                    df, index, a, size, width, pref, by
                );
                false
            }
            None => {
                println!(
                    "pci: {} bar {} size 0x{:x} {}{}: no room in the window",
                    df, index, size, width, pref
                );
                false
            }
        }
    }

    /// Takes an address from `window` (announcing the window once) and
    /// writes it to the BAR.
    fn assign(&self, root: &mut PciRoot<Cam>, window: &mut BarWindow) -> Option<u64> {
        if !window.announced {
            println!(
                "pci: assigning bars from 0x{:x}-0x{:x}",
                window.next,
                window.end - 1
            );
            window.announced = true;
        }
        let addr = window.take(self.size)?;
        if self.width64 {
            root.set_bar_64(self.df, self.index, addr);
        } else {
            root.set_bar_32(self.df, self.index, addr as u32);
        }
        Some(addr)
    }
}
