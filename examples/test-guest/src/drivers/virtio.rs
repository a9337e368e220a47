//! virtio devices, driven by the third-party `virtio-drivers` crate at CPL3,
//! on either transport: virtio-mmio (discovered from the command line's
//! `virtio_mmio.device=` entries) and virtio-pci (found on PCI bus 0, see
//! `pci.rs`); and the `virtio-rng`, `virtio-console` and `virtio-irq` tests.
//!
//! The driver code is virtio-drivers' own; this module only supplies its
//! `Hal` (identity mapping, DMA pages from the heap), the register windows
//! and, for MSI-X, the table and the common-config vector fields that
//! virtio-drivers does not program.

use crate::platform::acpi::Acpi;
use crate::platform::apic::{mask_pic, IoApic};
use crate::platform::arch::{cli, rdtsc, sti};
use crate::platform::boot::{self, MSIX_VECTORS, VECTOR_MSIX, VECTOR_VIRTIO};
use crate::cmdline::MmioDevice;
use crate::drivers::pci::{self, BarWindow, Cam};
use crate::println;
use crate::platform::time::{cycles_to_ns, wait_until};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::cell::{RefCell, UnsafeCell};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};
use virtio_drivers::device::common::Feature;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, MmioVersion, VirtIOHeader};
use virtio_drivers::transport::pci::bus::{
    Command, ConfigurationAccess, DeviceFunction, PciRoot, PCI_CAP_ID_VNDR,
};
use virtio_drivers::transport::pci::{
    virtio_device_type, PciTransport, VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_VENDOR_ID,
};
use virtio_drivers::transport::{
    DeviceStatus, DeviceType, DeviceTypeError, InterruptStatus, SomeTransport, Transport,
};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// virtio-drivers' view of this machine: physical = virtual (identity map),
/// DMA memory from the heap, nothing to share or bounce.
pub struct GuestHal;

fn dma_layout(pages: usize) -> Option<Layout> {
    Layout::from_size_align(pages.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()
}

// SAFETY: `dma_alloc` returns zeroed, page-aligned heap memory that nothing
// else uses until `dma_dealloc` gives it back (or paddr 0, which virtio-drivers
// treats as failure); addresses are identity-mapped, so the physical address
// the device sees is the pointer itself; MMIO windows are identity-mapped too.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let ptr = match dma_layout(pages) {
            // SAFETY: the layout has a non-zero size (pages >= 1 in virtio-drivers)
            // or, for 0 pages, `checked` below turns the result into a failure.
            Some(layout) if layout.size() != 0 => unsafe { alloc::alloc::alloc_zeroed(layout) },
            _ => core::ptr::null_mut(),
        };
        match NonNull::new(ptr) {
            Some(p) => (ptr as PhysAddr, p),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        match dma_layout(pages) {
            Some(layout) => {
                // SAFETY: the caller passes what `dma_alloc` returned for `pages`.
                unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
                0
            }
            None => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// Page directories for MMIO windows above 4 GiB (one per GiB touched).
const SPARE_PDS: usize = 4;

#[repr(C, align(4096))]
struct SparePds(UnsafeCell<[[u64; 512]; SPARE_PDS]>);

// SAFETY: only `map_mmio` writes them, each at most once (claimed through
// `SPARE_USED`), before the PDPT entry that makes the CPU use it.
unsafe impl Sync for SparePds {}

static SPARE: SparePds = SparePds(UnsafeCell::new([[0; 512]; SPARE_PDS]));
static SPARE_USED: AtomicUsize = AtomicUsize::new(0);

const GIB: u64 = 1 << 30;

/// Makes `[addr, addr + size)` accessible at CPL3, uncached. Below 4 GiB the
/// boot mapping already does (the top GiB uncached); up to 512 GiB this adds
/// 2 MiB uncached user pages through a spare page directory per GiB, written
/// from CPL3 like every other page-table byte. A not-present entry becoming
/// present needs no TLB flush.
pub fn map_mmio(addr: u64, size: u64) -> bool {
    let Some(end) = addr.checked_add(size) else {
        return false;
    };
    if end <= 4 * GIB {
        return true;
    }
    if end > 512 * GIB {
        return false;
    }
    for gib in (addr / GIB).max(4)..=(end - 1) / GIB {
        // SAFETY: `gib` < 512 indexes the boot PDPT (one 4 KiB table).
        let pdpte = unsafe { boot::boot_pdpt().add(gib as usize) };
        // SAFETY: an aligned u64 of the PDPT, mapped user-writable.
        if unsafe { pdpte.read_volatile() } & 1 != 0 {
            continue;
        }
        let index = SPARE_USED.fetch_add(1, Ordering::Relaxed);
        if index >= SPARE_PDS {
            return false;
        }
        // SAFETY: page directory `index` was just claimed and nothing uses it yet.
        let pd = unsafe { SPARE.0.get().cast::<[u64; 512]>().add(index).cast::<u64>() };
        for j in 0..512u64 {
            // P | RW | US | PWT | PCD | PS: 2 MiB, uncached, like the MMIO hole.
            // SAFETY: j < 512 entries of the claimed directory.
            unsafe {
                pd.add(j as usize)
                    .write_volatile(gib * GIB + (j << 21) + 0x9f)
            };
        }
        // SAFETY: as above; the directory is complete before it becomes visible.
        unsafe { pdpte.write_volatile(pd as u64 | 0x7) };
    }
    true
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
pub(crate) enum Bus {
    Mmio,
    Pci,
}

impl Bus {
    /// Suffix of the `test ...:` lines: none for mmio (the lines from
    /// before virtio-pci existed), ` (pci)` for pci.
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Bus::Mmio => "",
            Bus::Pci => " (pci)",
        }
    }
}

impl Device {
    pub(crate) fn bus(&self) -> Bus {
        match self.at {
            Location::Mmio(_) => Bus::Mmio,
            Location::Pci(_) => Bus::Pci,
        }
    }

    /// Suffix of a device's detail lines: none for mmio, ` (pci 00:01.0)`.
    pub(crate) fn tag(&self) -> String {
        match self.at {
            Location::Mmio(_) => String::new(),
            Location::Pci(df) => format!(" (pci {})", df),
        }
    }
}

/// A fresh virtio-drivers transport over the registers of `mmio`. Only one
/// may exist at a time per device (dropping it resets the device).
fn open(mmio: &MmioDevice) -> Result<MmioTransport<'static>, String> {
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
/// discovery). Dropping it resets the device.
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
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Device> + '_ {
        self.list.iter()
    }

    /// Whether a device of `kind` is present (on either transport).
    pub fn has(&self, kind: DeviceType) -> bool {
        self.iter().any(|d| d.kind == kind)
    }

    pub(crate) fn transport(&self, dev: &Device) -> Result<SomeTransport<'static>, String> {
        match dev.at {
            Location::Mmio(mmio) => open(&mmio).map(SomeTransport::from),
            Location::Pci(df) => self.pci_transport(df).map(SomeTransport::from),
        }
    }

    fn pci_transport(&self, df: DeviceFunction) -> Result<PciTransport, String> {
        let (root, _) = self.pci.as_ref().ok_or_else(|| String::from("no pci"))?;
        open_pci(&mut root.borrow_mut(), df)
    }
}

fn kind_name(kind: DeviceType) -> String {
    match kind {
        DeviceType::EntropySource => String::from("rng"),
        DeviceType::Console => String::from("console"),
        DeviceType::Block => String::from("block"),
        DeviceType::Network => String::from("net"),
        other => format!("type {}", other as u32),
    }
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
        let checked = if mmio.addr % 4 != 0 {
            Err(String::from("not 4-byte aligned"))
        } else if mmio.size > 1 << 32 {
            Err(String::from("window larger than 4 GiB"))
        } else if !map_mmio(mmio.addr, mmio.size) {
            Err(String::from("cannot be mapped"))
        } else {
            open(&mmio).map(|t| {
                let found = (t.device_type(), t.version());
                // Discovery only reads: forgetting the transport skips the
                // reset that dropping it would write.
                core::mem::forget(t);
                found
            })
        };
        match checked {
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
                println!(
                    "virtio: pci {} {} ({})",
                    f.df,
                    kind_name(kind),
                    if f.device >= 0x1040 {
                        "modern"
                    } else {
                        "transitional"
                    }
                );
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

/// Bytes read from each rng device.
const RNG_TOTAL: usize = 1 << 20;
/// Size of each request.
const RNG_CHUNK: usize = 4096;
/// Block size for the "not constant" check.
const RNG_BLOCK: usize = 4096;

/// `test=virtio-rng`: 1 MiB from every rng device through `VirtIORng`, a
/// check that it is not constant, then reset (drop) and reuse. One
/// `test virtio-rng:` line per transport with an rng device (mmio
/// unsuffixed, pci with ` (pci)`).
pub fn rng(devices: &Devices) {
    if !devices.has(DeviceType::EntropySource) {
        println!("test virtio-rng: FAIL no rng device");
        return;
    }
    for bus in [Bus::Mmio, Bus::Pci] {
        let mut found = false;
        let mut failure = None;
        for dev in devices
            .iter()
            .filter(|d| d.kind == DeviceType::EntropySource && d.bus() == bus)
        {
            found = true;
            if let Err(why) = rng_one(devices, dev) {
                failure.get_or_insert(why);
            }
        }
        match (found, failure) {
            (false, _) => {}
            (true, Some(why)) => println!("test virtio-rng: FAIL {}{}", why, bus.suffix()),
            (true, None) => println!("test virtio-rng: ok{}", bus.suffix()),
        }
    }
}

fn rng_one(devices: &Devices, dev: &Device) -> Result<(), String> {
    let transport = devices.transport(dev)?;
    let mut rng = VirtIORng::<GuestHal, _>::new(transport).map_err(|e| format!("init: {}", e))?;

    let mut buf = [0u8; RNG_CHUNK];
    let mut seen = [false; 256];
    let (mut block_pos, mut block_first, mut block_const) = (0usize, 0u8, true);
    let mut const_blocks = 0usize;
    let mut empty_replies = 0u32;
    let mut total = 0usize;
    let t0 = rdtsc();
    while total < RNG_TOTAL {
        let want = RNG_CHUNK.min(RNG_TOTAL - total);
        // Zeroed first: a device that claims bytes it never wrote shows up
        // as constant blocks.
        buf[..want].fill(0);
        let n = rng
            .request_entropy(&mut buf[..want])
            .map_err(|e| format!("request after {} bytes: {}", total, e))?;
        if n > want {
            return Err(format!(
                "device reported {} bytes for a {}-byte buffer",
                n, want
            ));
        }
        if n == 0 {
            empty_replies += 1;
            if empty_replies >= 1000 {
                return Err(format!("1000 empty replies after {} bytes", total));
            }
            continue;
        }
        for &b in &buf[..n] {
            seen[usize::from(b)] = true;
            if block_pos == 0 {
                (block_first, block_const) = (b, true);
            } else if b != block_first {
                block_const = false;
            }
            block_pos += 1;
            if block_pos == RNG_BLOCK {
                const_blocks += usize::from(block_const);
                block_pos = 0;
            }
        }
        total += n;
    }
    let ns = cycles_to_ns(rdtsc() - t0).max(1);
    println!(
        "virtio-rng: {} bytes in {} ms ({} KiB/s){}",
        total,
        ns / 1_000_000,
        (total as u128 * 1_000_000_000 / 1024 / u128::from(ns)),
        dev.tag()
    );
    let distinct = seen.iter().filter(|&&s| s).count();
    if distinct < 200 {
        return Err(format!("only {} distinct byte values", distinct));
    }
    if const_blocks > 0 {
        return Err(format!("{} constant 4 KiB blocks", const_blocks));
    }

    // Reset: dropping the driver unsets the queue (mmio) and its transport
    // writes status 0 (both); then a new driver on a new transport must work.
    drop(rng);
    let transport = devices.transport(dev)?;
    let mut rng =
        VirtIORng::<GuestHal, _>::new(transport).map_err(|e| format!("init after reset: {}", e))?;
    let mut small = [0u8; 256];
    let n = rng
        .request_entropy(&mut small)
        .map_err(|e| format!("request after reset: {}", e))?;
    if n > small.len() {
        return Err(format!(
            "device reported {} bytes for a {}-byte buffer after reset",
            n,
            small.len()
        ));
    }
    if n == 0 || small[..n].iter().all(|&b| b == small[0]) {
        return Err(format!("{} constant bytes after reset", n));
    }
    drop(rng);
    println!("virtio-rng: reset and reuse ok{}", dev.tag());
    Ok(())
}

/// The line written to the console.
const CONSOLE_LINE: &[u8] = b"hello from the virtio console\n";

/// `test=virtio-console`: on the first console device of each transport,
/// one line out through `VirtIOConsole` (port 0), then up to 100 ms for
/// input.
pub fn console(devices: &Devices) {
    if !devices.has(DeviceType::Console) {
        println!("test virtio-console: FAIL no console device");
        return;
    }
    for bus in [Bus::Mmio, Bus::Pci] {
        if let Some(dev) = devices
            .iter()
            .find(|d| d.kind == DeviceType::Console && d.bus() == bus)
        {
            console_one(devices, dev, bus.suffix());
        }
    }
}

fn console_one(devices: &Devices, dev: &Device, suffix: &str) {
    let transport = match devices.transport(dev) {
        Ok(t) => t,
        Err(why) => {
            println!("test virtio-console: FAIL {}{}", why, suffix);
            return;
        }
    };
    let mut con = match VirtIOConsole::<GuestHal, _>::new(transport) {
        Ok(c) => c,
        Err(e) => {
            println!("test virtio-console: FAIL init: {}{}", e, suffix);
            return;
        }
    };
    if let Err(e) = con.send_bytes(CONSOLE_LINE) {
        println!("test virtio-console: FAIL send: {}{}", e, suffix);
        return;
    }
    println!("test virtio-console: ok{}", suffix);

    let mut received = 0usize;
    let mut failed = false;
    wait_until(100_000, || {
        loop {
            match con.recv(true) {
                Ok(Some(_)) => received += 1,
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        failed
    });
    if received > 0 {
        println!("virtio-console: received {} bytes{}", received, suffix);
    }
    drop(con);
}

/// Requests made in `test=virtio-irq`, each completed by its interrupt.
const IRQ_REQUESTS: u64 = 8;

/// `test=virtio-irq`: on the first rng device of each transport, 8
/// requests each completed by a device interrupt. virtio-mmio: the GSI
/// through the IOAPIC (`irq_mmio`); virtio-pci: MSI-X (`irq_pci`), with the
/// second half of the requests aimed at `ap` (an online AP's APIC ID) when
/// there is one.
pub fn irq(devices: &Devices, acpi: Option<&Acpi>, bsp_apic_id: u32, ap: Option<u32>) {
    if !devices.has(DeviceType::EntropySource) {
        println!("virtio-irq: 0 interrupts");
        println!("test virtio-irq: FAIL no rng device");
        return;
    }
    let first = |bus| {
        devices
            .iter()
            .find(|d| d.kind == DeviceType::EntropySource && d.bus() == bus)
    };
    if let Some(dev) = first(Bus::Mmio) {
        irq_mmio(devices, dev, acpi, bsp_apic_id);
    }
    if let Some(dev) = first(Bus::Pci) {
        irq_pci(devices, dev, bsp_apic_id, ap);
    }
}

fn irq_mmio(devices: &Devices, dev: &Device, acpi: Option<&Acpi>, bsp_apic_id: u32) {
    let start = boot::virtio_irqs().load(Ordering::Relaxed);
    let result = irq_mmio_run(devices, dev, acpi, bsp_apic_id);
    let n = boot::virtio_irqs().load(Ordering::Relaxed) - start;
    println!("virtio-irq: {} interrupts", n);
    match result {
        Ok(()) if n >= IRQ_REQUESTS => println!("test virtio-irq: ok"),
        Ok(()) => println!(
            "test virtio-irq: FAIL {} interrupts for {} requests",
            n, IRQ_REQUESTS
        ),
        Err(why) => println!("test virtio-irq: FAIL {}", why),
    }
}

fn irq_mmio_run(
    devices: &Devices,
    dev: &Device,
    acpi: Option<&Acpi>,
    bsp_apic_id: u32,
) -> Result<(), String> {
    let Location::Mmio(mmio) = dev.at else {
        return Err(String::from("not an mmio device"));
    };
    let gsi = mmio
        .irq
        .ok_or_else(|| format!("no irq for the rng at 0x{:x}", mmio.addr))?;
    let (base, gsi_base) = acpi
        .and_then(|a| a.ioapic_for(gsi))
        .ok_or_else(|| String::from("no ioapic"))?;
    let ioapic = IoApic::new(base, gsi_base);
    if !ioapic.serves(gsi) {
        return Err(format!("gsi {} not on an ioapic", gsi));
    }

    let mut transport = devices.transport(dev)?;
    let mut queue = start_queue(&mut transport, |_| Ok(()))?;

    mask_pic();
    ioapic.route(gsi, VECTOR_VIRTIO, bsp_apic_id, false);
    sti();
    println!(
        "virtio-irq: rng on gsi {} vector {:#04x}",
        gsi, VECTOR_VIRTIO
    );
    let counter = boot::virtio_irqs();
    let mut buf = [0u8; 64];
    let result = run_requests(
        &mut transport,
        &mut queue,
        0..IRQ_REQUESTS,
        counter,
        true,
        &mut buf,
    );
    cli();
    ioapic.route(gsi, VECTOR_VIRTIO, bsp_apic_id, true);
    // Reset before the queue memory and `buf` go away.
    transport.set_status(DeviceStatus::empty());
    drop(transport);
    drop(queue);
    result
}

/// `begin_init` (VERSION_1, EVENT_IDX), `before_queue` (MSI-X vectors),
/// `VirtQueue::new` (queue 0, size 8), `finish_init`, device notifications
/// on, interrupt status read once.
fn start_queue<T: Transport>(
    transport: &mut T,
    before_queue: impl FnOnce(&mut T) -> Result<(), String>,
) -> Result<VirtQueue<GuestHal, 8>, String> {
    let features = transport.begin_init(Feature::RING_EVENT_IDX | Feature::VERSION_1);
    before_queue(transport)?;
    let mut queue = VirtQueue::<GuestHal, 8>::new(
        transport,
        0,
        false,
        features.contains(Feature::RING_EVENT_IDX),
    )
    .map_err(|e| format!("queue: {}", e))?;
    transport.finish_init();
    queue.set_dev_notify(true);
    transport.ack_interrupt();
    Ok(queue)
}

/// Requests `range` on queue 0: each a 64-byte buffer added and notified;
/// then up to 100 ms for `counter` to move (the used ring is not looked at
/// before), then (when `check_isr`) `ack_interrupt` must report the
/// used-buffer bit, and `pop_used` must return the buffer. The caller owns
/// `buf` and resets the device before it goes away (a request may still be
/// outstanding after an error).
fn run_requests<T: Transport>(
    transport: &mut T,
    queue: &mut VirtQueue<GuestHal, 8>,
    range: core::ops::Range<u64>,
    counter: &core::sync::atomic::AtomicU64,
    check_isr: bool,
    buf: &mut [u8; 64],
) -> Result<(), String> {
    for i in range {
        let before = counter.load(Ordering::Relaxed);
        // SAFETY: `buf` is not touched again until `pop_used` returns it, or
        // until the caller has reset the device (so it no longer writes it).
        let token = unsafe { queue.add(&[], &mut [&mut buf[..]]) }
            .map_err(|e| format!("request {}: {}", i, e))?;
        if queue.should_notify() {
            transport.notify(0);
        }
        if !wait_until(100_000, || counter.load(Ordering::Relaxed) > before) {
            return Err(format!("no interrupt for request {} in 100 ms", i));
        }
        if check_isr {
            let status = transport.ack_interrupt();
            if !status.contains(InterruptStatus::QUEUE_INTERRUPT) {
                return Err(format!(
                    "request {}: interrupt status {:#x}",
                    i,
                    status.bits()
                ));
            }
        }
        // SAFETY: the buffers `add` was given for `token`.
        unsafe { queue.pop_used(token, &[], &mut [&mut buf[..]]) }
            .map_err(|e| format!("request {}: interrupt but {}", i, e))?;
    }
    Ok(())
}

/// The MSI-X capability of a function.
struct Msix {
    /// Offset of the capability in configuration space.
    cap: u8,
    /// Address of the table (BAR + offset).
    table: u64,
    /// Table size.
    entries: u16,
}

/// MSI-X capability id.
const PCI_CAP_ID_MSIX: u8 = 0x11;
/// Message control (upper half of the capability's first dword): enable.
const MSIX_ENABLE: u32 = 1 << 31;
/// Message control: function mask.
const MSIX_FUNCTION_MASK: u32 = 1 << 30;
/// virtio common config offsets (virtio 1.2, 4.1.4.3) of the fields
/// virtio-drivers 0.13 does not write.
const COMMON_MSIX_CONFIG: u64 = 0x10;
const COMMON_QUEUE_SELECT: u64 = 0x16;
const COMMON_QUEUE_MSIX_VECTOR: u64 = 0x1a;
/// "No vector" in `msix_config` / `queue_msix_vector`.
const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

fn memory_bar(root: &mut PciRoot<Cam>, df: DeviceFunction, bar: u8) -> Result<u64, String> {
    match root.bar_info(df, bar) {
        Ok(Some(info)) => match info.memory_address_size() {
            Some((addr, _)) if addr != 0 => Ok(addr),
            _ => Err(format!("bar {} not a memory bar in use", bar)),
        },
        _ => Err(format!("bar {} not usable", bar)),
    }
}

fn find_msix(root: &mut PciRoot<Cam>, cam: &Cam, df: DeviceFunction) -> Result<Msix, String> {
    let cap = root
        .capabilities(df)
        .find(|c| c.id == PCI_CAP_ID_MSIX)
        .ok_or_else(|| String::from("no msi-x capability"))?;
    let table_word = cam.read_word(df, cap.offset + 4);
    let bar = memory_bar(root, df, (table_word & 7) as u8)?;
    Ok(Msix {
        cap: cap.offset,
        table: bar + u64::from(table_word & !7),
        entries: (cap.private_header & 0x7ff) + 1,
    })
}

/// Address of the virtio common configuration structure of `df` (its first
/// `VIRTIO_PCI_CAP_COMMON_CFG` capability, as virtio-drivers picks it).
fn common_cfg(root: &mut PciRoot<Cam>, cam: &Cam, df: DeviceFunction) -> Result<u64, String> {
    let cap = root
        .capabilities(df)
        .find(|c| {
            c.id == PCI_CAP_ID_VNDR && (c.private_header >> 8) as u8 == VIRTIO_PCI_CAP_COMMON_CFG
        })
        .ok_or_else(|| String::from("no common config capability"))?;
    let bar = cam.read_word(df, cap.offset + 4) as u8;
    let offset = cam.read_word(df, cap.offset + 8);
    Ok(memory_bar(root, df, bar)? + u64::from(offset))
}

fn write16(addr: u64, value: u16) {
    // SAFETY: a register of a BAR that discovery mapped (identity, user);
    // device memory that no Rust object aliases (the transport's pointers
    // are MMIO pointers, used from this same thread only).
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

fn read16(addr: u64) -> u16 {
    // SAFETY: as for `write16`; these registers read without side effects.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

fn write32(addr: u64, value: u32) {
    // SAFETY: as for `write16` (the MSI-X table, in a mapped BAR).
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Programs MSI-X table entry `n`: message address
/// `0xFEE00000 | apic_id << 12` (physical destination, no redirection hint),
/// data = `vector` (fixed, edge); masked while being written.
fn msix_entry(msix: &Msix, n: u16, apic_id: u32, vector: u8, masked: bool) {
    let entry = msix.table + 16 * u64::from(n);
    write32(entry + 12, 1);
    write32(entry, 0xfee0_0000 | (apic_id & 0xff) << 12);
    write32(entry + 4, 0);
    write32(entry + 8, u32::from(vector));
    write32(entry + 12, u32::from(masked));
}

fn irq_pci(devices: &Devices, dev: &Device, bsp_apic_id: u32, ap: Option<u32>) {
    let vectors = boot::msix_irqs();
    let cpus = boot::msix_cpu_irqs();
    let start: [u64; MSIX_VECTORS] = core::array::from_fn(|i| vectors[i].load(Ordering::Relaxed));
    let cpu_start: [u64; boot::MAX_CPUS] =
        core::array::from_fn(|i| cpus[i].load(Ordering::Relaxed));
    let result = irq_pci_run(devices, dev, bsp_apic_id, ap);
    let total: u64 = (0..MSIX_VECTORS)
        .map(|i| vectors[i].load(Ordering::Relaxed) - start[i])
        .sum();
    let queue_irqs = vectors[1].load(Ordering::Relaxed) - start[1];
    println!("virtio-irq: {} msi-x interrupts", total);
    let took = |id: u32| {
        let i = (id & 63) as usize;
        cpus[i].load(Ordering::Relaxed) - cpu_start[i]
    };
    for (i, c) in cpus.iter().enumerate() {
        let n = c.load(Ordering::Relaxed) - cpu_start[i];
        if n > 0 {
            println!("virtio-irq: apic {} took {}", i, n);
        }
    }
    match result {
        Ok(()) if queue_irqs < IRQ_REQUESTS => println!(
            "test virtio-irq: FAIL {} interrupts for {} requests (pci)",
            queue_irqs, IRQ_REQUESTS
        ),
        Ok(()) => match ap {
            Some(id) if took(id) == 0 => {
                println!("test virtio-irq: FAIL apic {} took none (pci)", id)
            }
            _ => println!("test virtio-irq: ok (pci)"),
        },
        Err(why) => println!("test virtio-irq: FAIL {} (pci)", why),
    }
}

/// MSI-X on: table entry 0 (config) → `VECTOR_MSIX`, entry 1 (queue 0) →
/// `VECTOR_MSIX + 1`, both to the BSP, the function unmasked, INTx off;
/// `msix_config` ← 0 and `queue_msix_vector` ← 1 written (and read back)
/// after FEATURES_OK, before the queue is enabled. The first half of the
/// requests interrupt the BSP; then entry 1 is re-aimed at `ap`.
fn irq_pci_run(
    devices: &Devices,
    dev: &Device,
    bsp_apic_id: u32,
    ap: Option<u32>,
) -> Result<(), String> {
    let Location::Pci(df) = dev.at else {
        return Err(String::from("not a pci device"));
    };
    let (root, cam) = devices.pci.as_ref().ok_or_else(|| String::from("no pci"))?;
    let (msix, common, command) = {
        let mut root = root.borrow_mut();
        let msix = find_msix(&mut root, cam, df)?;
        let common = common_cfg(&mut root, cam, df)?;
        (msix, common, root.get_status_command(df).1)
    };
    if msix.entries < 2 {
        return Err(format!("msi-x table has {} entry", msix.entries));
    }
    let control = cam.read_word(df, msix.cap);

    msix_entry(&msix, 0, bsp_apic_id, VECTOR_MSIX, false);
    msix_entry(&msix, 1, bsp_apic_id, VECTOR_MSIX + 1, false);
    let mut cam_w = *cam;
    cam_w.write_word(df, msix.cap, (control | MSIX_ENABLE) & !MSIX_FUNCTION_MASK);
    root.borrow_mut()
        .set_command(df, command | Command::INTERRUPT_DISABLE);

    let mut transport = devices.pci_transport(df)?;
    let mut buf = [0u8; 64];
    let result = (|| {
        let mut queue = start_queue(&mut transport, |_| {
            write16(common + COMMON_MSIX_CONFIG, 0);
            write16(common + COMMON_QUEUE_SELECT, 0);
            write16(common + COMMON_QUEUE_MSIX_VECTOR, 1);
            match (
                read16(common + COMMON_MSIX_CONFIG),
                read16(common + COMMON_QUEUE_MSIX_VECTOR),
            ) {
                (0, 1) => Ok(()),
                (VIRTIO_MSI_NO_VECTOR, _) => Err(String::from("device refused config vector 0")),
                (_, VIRTIO_MSI_NO_VECTOR) => Err(String::from("device refused queue vector 1")),
                (c, q) => Err(format!("vectors read back as {} and {}", c, q)),
            }
        })?;
        println!(
            "virtio-irq: rng {} msi-x {} entries at 0x{:x}: config vector {:#04x}, queue 0 vector {:#04x}, apic {}",
            df,
            msix.entries,
            msix.table,
            VECTOR_MSIX,
            VECTOR_MSIX + 1,
            bsp_apic_id
        );
        sti();
        let half = IRQ_REQUESTS / 2;
        let counter = &boot::msix_irqs()[1];
        let mut r = run_requests(
            &mut transport,
            &mut queue,
            0..half,
            counter,
            false,
            &mut buf,
        );
        if r.is_ok() {
            if let Some(id) = ap {
                msix_entry(&msix, 1, id, VECTOR_MSIX + 1, false);
                println!(
                    "virtio-irq: queue 0 vector {:#04x} to apic {} from request {}",
                    VECTOR_MSIX + 1,
                    id,
                    half
                );
            }
            r = run_requests(
                &mut transport,
                &mut queue,
                half..IRQ_REQUESTS,
                counter,
                false,
                &mut buf,
            );
        }
        cli();
        // Reset before the queue memory and `buf` go away.
        transport.set_status(DeviceStatus::empty());
        drop(queue);
        r
    })();
    drop(transport);
    msix_entry(&msix, 0, bsp_apic_id, VECTOR_MSIX, true);
    msix_entry(&msix, 1, bsp_apic_id, VECTOR_MSIX + 1, true);
    cam_w.write_word(df, msix.cap, control);
    root.borrow_mut().set_command(df, command);
    result
}
