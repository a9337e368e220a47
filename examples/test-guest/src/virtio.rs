//! virtio-mmio devices, driven by the third-party `virtio-drivers` crate at
//! CPL3: discovery from the command line's `virtio_mmio.device=` entries,
//! and the `virtio-rng`, `virtio-console` and `virtio-irq` tests.
//!
//! The driver code is virtio-drivers' own; this module only supplies its
//! `Hal` (identity mapping, DMA pages from the heap) and the register windows.

use crate::acpi::Acpi;
use crate::apic::{mask_pic, IoApic};
use crate::arch::{cli, rdtsc, sti};
use crate::boot::{self, VECTOR_VIRTIO};
use crate::cmdline::{MmioDevice, VIRTIO_MMIO_MAX};
use crate::println;
use crate::time::{cycles_to_ns, wait_until};
use alloc::format;
use alloc::string::String;
use core::alloc::Layout;
use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};
use virtio_drivers::device::common::Feature;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, MmioVersion, VirtIOHeader};
use virtio_drivers::transport::{
    DeviceStatus, DeviceType, DeviceTypeError, InterruptStatus, Transport,
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
fn map_mmio(addr: u64, size: u64) -> bool {
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

/// A device that passed discovery.
#[derive(Clone, Copy, Debug)]
pub struct Device {
    pub mmio: MmioDevice,
    pub kind: DeviceType,
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

impl Device {
    fn transport(&self) -> Result<MmioTransport<'static>, String> {
        open(&self.mmio)
    }
}

/// The devices found.
pub struct Devices {
    list: [Option<Device>; VIRTIO_MMIO_MAX],
    count: usize,
}

impl Devices {
    fn iter(&self) -> impl Iterator<Item = &Device> + '_ {
        self.list[..self.count].iter().flatten()
    }

    /// Whether a device of `kind` is present.
    pub fn has(&self, kind: DeviceType) -> bool {
        self.iter().any(|d| d.kind == kind)
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
        list: [None; VIRTIO_MMIO_MAX],
        count: 0,
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
                devices.list[devices.count] = Some(Device { mmio, kind });
                devices.count += 1;
            }
            Err(why) => println!(
                "virtio: mmio 0x{:x} size 0x{:x} irq {}: {}",
                mmio.addr, mmio.size, irq, why
            ),
        }
    }
    println!("virtio: {} mmio devices", devices.count);
    devices
}

/// Bytes read from each rng device.
const RNG_TOTAL: usize = 1 << 20;
/// Size of each request.
const RNG_CHUNK: usize = 4096;
/// Block size for the "not constant" check.
const RNG_BLOCK: usize = 4096;

/// `test=virtio-rng`: 1 MiB from every rng device through `VirtIORng`, a
/// check that it is not constant, then reset (drop) and reuse.
pub fn rng(devices: &Devices) {
    let mut found = false;
    let mut failure = None;
    for dev in devices
        .iter()
        .filter(|d| d.kind == DeviceType::EntropySource)
    {
        found = true;
        if let Err(why) = rng_one(dev) {
            failure.get_or_insert(why);
        }
    }
    match (found, failure) {
        (false, _) => println!("test virtio-rng: FAIL no rng device"),
        (true, Some(why)) => println!("test virtio-rng: FAIL {}", why),
        (true, None) => println!("test virtio-rng: ok"),
    }
}

fn rng_one(dev: &Device) -> Result<(), String> {
    let transport = dev.transport()?;
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
        "virtio-rng: {} bytes in {} ms ({} KiB/s)",
        total,
        ns / 1_000_000,
        (total as u128 * 1_000_000_000 / 1024 / u128::from(ns))
    );
    let distinct = seen.iter().filter(|&&s| s).count();
    if distinct < 200 {
        return Err(format!("only {} distinct byte values", distinct));
    }
    if const_blocks > 0 {
        return Err(format!("{} constant 4 KiB blocks", const_blocks));
    }

    // Reset: dropping the driver unsets the queue and its transport writes
    // status 0; then a new driver on a new transport must work again.
    drop(rng);
    let transport = dev.transport()?;
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
    println!("virtio-rng: reset and reuse ok");
    Ok(())
}

/// The line written to the console.
const CONSOLE_LINE: &[u8] = b"hello from the virtio console\n";

/// `test=virtio-console`: one line out through `VirtIOConsole` (port 0),
/// then up to 100 ms for input.
pub fn console(devices: &Devices) {
    let Some(dev) = devices.iter().find(|d| d.kind == DeviceType::Console) else {
        println!("test virtio-console: FAIL no console device");
        return;
    };
    let transport = match dev.transport() {
        Ok(t) => t,
        Err(why) => {
            println!("test virtio-console: FAIL {}", why);
            return;
        }
    };
    let mut con = match VirtIOConsole::<GuestHal, _>::new(transport) {
        Ok(c) => c,
        Err(e) => {
            println!("test virtio-console: FAIL init: {}", e);
            return;
        }
    };
    if let Err(e) = con.send_bytes(CONSOLE_LINE) {
        println!("test virtio-console: FAIL send: {}", e);
        return;
    }
    println!("test virtio-console: ok");

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
        println!("virtio-console: received {} bytes", received);
    }
    drop(con);
}

/// Requests made in `test=virtio-irq`, each completed by its interrupt.
const IRQ_REQUESTS: u64 = 8;

/// `test=virtio-irq`: the first rng device's IRQ routed through the IOAPIC
/// (edge, active high, vector 0x25, to the BSP); each request is submitted
/// with virtio-drivers' non-blocking queue API, its completion is learned
/// from the interrupt (not by polling the used ring), acknowledged with
/// `ack_interrupt`, then popped.
pub fn irq(devices: &Devices, acpi: Option<&Acpi>, bsp_apic_id: u32) {
    let start = boot::virtio_irqs().load(Ordering::Relaxed);
    let result = irq_run(devices, acpi, bsp_apic_id);
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

fn irq_run(devices: &Devices, acpi: Option<&Acpi>, bsp_apic_id: u32) -> Result<(), String> {
    let dev = devices
        .iter()
        .find(|d| d.kind == DeviceType::EntropySource)
        .ok_or_else(|| String::from("no rng device"))?;
    let gsi = dev
        .mmio
        .irq
        .ok_or_else(|| format!("no irq for the rng at 0x{:x}", dev.mmio.addr))?;
    let (base, gsi_base) = acpi
        .and_then(|a| a.ioapic_for(gsi))
        .ok_or_else(|| String::from("no ioapic"))?;
    let ioapic = IoApic::new(base, gsi_base);
    if !ioapic.serves(gsi) {
        return Err(format!("gsi {} not on an ioapic", gsi));
    }

    let mut transport = dev.transport()?;
    let features = transport.begin_init(Feature::RING_EVENT_IDX | Feature::VERSION_1);
    let mut queue = VirtQueue::<GuestHal, 8>::new(
        &mut transport,
        0,
        false,
        features.contains(Feature::RING_EVENT_IDX),
    )
    .map_err(|e| format!("queue: {}", e))?;
    transport.finish_init();
    queue.set_dev_notify(true);
    transport.ack_interrupt();

    mask_pic();
    ioapic.route(gsi, VECTOR_VIRTIO, bsp_apic_id, false);
    sti();
    println!(
        "virtio-irq: rng on gsi {} vector {:#04x}",
        gsi, VECTOR_VIRTIO
    );
    let mut result = Ok(());
    let mut buf = [0u8; 64];
    for i in 0..IRQ_REQUESTS {
        let before = boot::virtio_irqs().load(Ordering::Relaxed);
        // SAFETY: `buf` is not touched again until `pop_used` returns it, or
        // until the device has been reset below (so it no longer writes it).
        let token = match unsafe { queue.add(&[], &mut [&mut buf]) } {
            Ok(t) => t,
            Err(e) => {
                result = Err(format!("request {}: {}", i, e));
                break;
            }
        };
        if queue.should_notify() {
            transport.notify(0);
        }
        if !wait_until(100_000, || {
            boot::virtio_irqs().load(Ordering::Relaxed) > before
        }) {
            result = Err(format!("no interrupt for request {} in 100 ms", i));
            break;
        }
        let status = transport.ack_interrupt();
        if !status.contains(InterruptStatus::QUEUE_INTERRUPT) {
            result = Err(format!(
                "request {}: interrupt status {:#x}",
                i,
                status.bits()
            ));
            break;
        }
        // SAFETY: the buffers `add` was given for `token`.
        if let Err(e) = unsafe { queue.pop_used(token, &[], &mut [&mut buf]) } {
            result = Err(format!("request {}: interrupt but {}", i, e));
            break;
        }
    }
    cli();
    ioapic.route(gsi, VECTOR_VIRTIO, bsp_apic_id, true);
    // Reset before the queue memory and `buf` go away.
    transport.set_status(DeviceStatus::empty());
    drop(transport);
    drop(queue);
    result
}
