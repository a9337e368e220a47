//! virtio discovery on both transports: virtio-mmio windows named on the
//! command line (`virtio_mmio.device=`) and virtio-pci functions on PCI bus
//! 0; and opening a discovered device as a `StrictTransport` for the
//! virtio-drivers device drivers the tests use.

use crate::drivers::hal::GuestHal;
use crate::drivers::mmio::map_mmio;
use crate::drivers::pci::{self, BarWindow};
use crate::drivers::transport::StrictTransport;
use crate::platform::pci::Cam;
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{RefCell, RefMut};
use core::ptr::NonNull;
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, MmioVersion, VirtIOHeader};
use virtio_drivers::transport::pci::bus::{DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport, VIRTIO_VENDOR_ID};
use virtio_drivers::transport::{DeviceType, DeviceTypeError, SomeTransport, Transport};

/// One `virtio_mmio.device=SIZE@ADDR[:IRQ[:ID]]` entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioDevice {
    /// Size of the register window in bytes.
    pub size: u64,
    /// Physical address of the register window.
    pub addr: u64,
    /// Interrupt (taken as a GSI); `None` when the entry has no `:IRQ`.
    pub irq: Option<u32>,
}

/// Where a device sits.
#[derive(Clone, Copy, Debug)]
pub enum Location {
    /// A `virtio_mmio.device=` window.
    Mmio(MmioDevice),
    /// A function on PCI bus 0.
    Pci(DeviceFunction),
}

/// A device that passed discovery.
#[derive(Clone, Copy, Debug)]
pub struct Device {
    pub at: Location,
    pub kind: DeviceType,
}

/// The two transports, for grouping test output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bus {
    Mmio,
    Pci,
}

impl Bus {
    /// Suffix of the `test ...:` lines: none for mmio (the lines from
    /// before virtio-pci existed), ` (pci)` for pci.
    pub fn suffix(self) -> &'static str {
        match self {
            Bus::Mmio => "",
            Bus::Pci => " (pci)",
        }
    }
}

impl Device {
    pub fn bus(&self) -> Bus {
        match self.at {
            Location::Mmio(_) => Bus::Mmio,
            Location::Pci(_) => Bus::Pci,
        }
    }

    /// Suffix of a device's detail lines: none for mmio, ` (pci 00:01.0)`.
    pub fn tag(&self) -> String {
        match self.at {
            Location::Mmio(_) => String::new(),
            Location::Pci(df) => format!(" (pci {})", df),
        }
    }
}

/// A fresh virtio-drivers transport over the registers of `mmio`. Only one
/// may be in use at a time per device.
fn open_mmio(mmio: &MmioDevice) -> Result<MmioTransport<'static>, String> {
    let header = NonNull::new(mmio.addr as *mut VirtIOHeader)
        .ok_or_else(|| String::from("mmio window at 0"))?;
    // SAFETY: discovery checked the window is mapped (identity, user,
    // uncached), 4-byte aligned and at most 4 GiB; it is device memory that
    // no Rust object aliases, valid for the whole run. MmioTransport checks
    // the magic value before using anything else.
    unsafe { MmioTransport::new(header, mmio.size as usize) }.map_err(|e| match e {
        MmioError::BadMagic(magic) => format!("bad magic 0x{:08x}", magic),
        MmioError::UnsupportedVersion(v) => format!("unsupported version {}", v),
        MmioError::InvalidDeviceID(DeviceTypeError::InvalidDeviceType(0)) => {
            String::from("no device (id 0)")
        }
        MmioError::InvalidDeviceID(DeviceTypeError::InvalidDeviceType(id)) => {
            format!("unknown device id {}", id)
        }
        MmioError::MmioRegionTooSmall => String::from("window smaller than 0x100"),
    })
}

/// A fresh virtio-drivers PCI transport for `df` (its BARs set up by
/// discovery).
fn open_pci(root: &mut PciRoot<Cam>, df: DeviceFunction) -> Result<PciTransport, String> {
    PciTransport::new::<GuestHal, Cam>(root, df).map_err(|e| format!("{}", e))
}

/// The devices found, and the PCI root they were found on.
pub struct Devices {
    list: Vec<Device>,
    /// The root (virtio-drivers' `PciRoot`) and a copy of its configuration
    /// access (the root keeps its own private), when PCI was scanned.
    pci: Option<(RefCell<PciRoot<Cam>>, Cam)>,
}

impl Devices {
    pub fn iter(&self) -> impl Iterator<Item = &Device> + '_ {
        self.list.iter()
    }

    /// Whether a device of `kind` is present (on either transport).
    pub fn has(&self, kind: DeviceType) -> bool {
        self.iter().any(|d| d.kind == kind)
    }

    /// The first device of `kind` on `bus`.
    pub fn first(&self, kind: DeviceType, bus: Bus) -> Option<&Device> {
        self.iter().find(|d| d.kind == kind && d.bus() == bus)
    }

    /// A transport for `dev`, driven as the specification orders (see
    /// `StrictTransport`). Only one may be in use at a time per device.
    pub fn open(&self, dev: &Device) -> Result<StrictTransport, String> {
        match dev.at {
            Location::Mmio(mmio) => {
                let t = open_mmio(&mmio)?;
                let v2 = (t.version() == MmioVersion::Modern).then_some(mmio.addr);
                Ok(StrictTransport::new(SomeTransport::from(t), v2))
            }
            Location::Pci(df) => {
                let mut root = self.pci_root()?;
                let t = open_pci(&mut root, df)?;
                Ok(StrictTransport::new(SomeTransport::from(t), None))
            }
        }
    }

    /// The PCI root (for the MSI-X set-up of `test=virtio-irq`).
    pub fn pci_root(&self) -> Result<RefMut<'_, PciRoot<Cam>>, String> {
        let (root, _) = self.pci.as_ref().ok_or_else(|| String::from("no pci"))?;
        Ok(root.borrow_mut())
    }

    /// A copy of the PCI configuration access (`PciRoot` keeps its own).
    pub fn pci_cam(&self) -> Result<Cam, String> {
        self.pci
            .as_ref()
            .map(|&(_, cam)| cam)
            .ok_or_else(|| String::from("no pci"))
    }
}

fn kind_name(kind: DeviceType) -> String {
    match kind {
        DeviceType::EntropySource => String::from("rng"),
        DeviceType::Console => String::from("console"),
        DeviceType::Block => String::from("block"),
        DeviceType::Network => String::from("net"),
        DeviceType::Socket => String::from("vsock"),
        other => format!("type {}", other as u32),
    }
}

/// Checks a `virtio_mmio.device=` window and reads its device type and
/// version; only reads registers.
fn check_mmio(mmio: &MmioDevice) -> Result<(DeviceType, MmioVersion), String> {
    if !mmio.addr.is_multiple_of(4) {
        return Err(String::from("not 4-byte aligned"));
    }
    if mmio.size > 1 << 32 {
        return Err(String::from("window larger than 4 GiB"));
    }
    if !map_mmio(mmio.addr, mmio.size) {
        return Err(String::from("cannot be mapped"));
    }
    let t = open_mmio(mmio)?;
    let found = (t.device_type(), t.version());
    // Discovery only reads: forgetting the transport skips the reset that
    // dropping it would write.
    core::mem::forget(t);
    Ok(found)
}

/// Checks each `virtio_mmio.device=` window through virtio-drivers'
/// `MmioTransport` (magic, version 1 or 2, a non-zero device id), prints a
/// line per window and `virtio: <n> mmio devices`.
pub fn discover(entries: &[MmioDevice]) -> Devices {
    let mut devices = Devices {
        list: Vec::new(),
        pci: None,
    };
    for &mmio in entries {
        let irq = match mmio.irq {
            Some(irq) => format!("{}", irq),
            None => String::from("none"),
        };
        match check_mmio(&mmio) {
            Ok((kind, version)) => {
                println!(
                    "virtio: mmio 0x{:x} size 0x{:x} irq {}: {} (version {})",
                    mmio.addr,
                    mmio.size,
                    irq,
                    kind_name(kind),
                    if version == MmioVersion::Legacy { 1 } else { 2 }
                );
                devices.list.push(Device {
                    at: Location::Mmio(mmio),
                    kind,
                });
            }
            Err(why) => println!(
                "virtio: mmio 0x{:x} size 0x{:x} irq {}: {}",
                mmio.addr, mmio.size, irq, why
            ),
        }
    }
    println!("virtio: {} mmio devices", devices.list.len());
    devices
}

/// Scans PCI bus 0 through `cam` and adds its virtio functions: BARs
/// checked (assigned from `pci::BAR_WINDOW` when at 0, mapped when above
/// 4 GiB), memory decoding and bus mastering on, then opened with
/// virtio-drivers' `PciTransport` (modern capabilities). Prints
/// `virtio: pci <bdf> <kind> (<modern|transitional>)` or
/// `virtio: pci <bdf>: <why>` per virtio function and
/// `virtio: <n> pci devices`.
pub fn discover_pci(devices: &mut Devices, cam: Cam, ecam_base: Option<u64>) {
    let mut root = PciRoot::new(cam);
    let functions = pci::scan(&root, &cam);
    let mut window = BarWindow::new(ecam_base);
    let mut count = 0;
    for f in functions.iter().filter(|f| f.vendor == VIRTIO_VENDOR_ID) {
        if f.header_type != 0 {
            continue;
        }
        let Some(kind) = virtio_device_type(&f.info) else {
            println!("virtio: pci {}: unknown device id 0x{:04x}", f.df, f.device);
            continue;
        };
        if !pci::setup_bars(&mut root, f.df, &mut window) {
            println!("virtio: pci {}: bars not usable", f.df);
            continue;
        }
        match open_pci(&mut root, f.df) {
            Ok(t) => {
                // Discovery only reads: no reset on the way out.
                core::mem::forget(t);
                let model = if f.device >= 0x1040 {
                    "modern"
                } else {
                    "transitional"
                };
                println!("virtio: pci {} {} ({})", f.df, kind_name(kind), model);
                devices.list.push(Device {
                    at: Location::Pci(f.df),
                    kind,
                });
                count += 1;
            }
            Err(why) => println!("virtio: pci {}: {}", f.df, why),
        }
    }
    println!("virtio: {} pci devices", count);
    devices.pci = Some((RefCell::new(root), cam));
}
