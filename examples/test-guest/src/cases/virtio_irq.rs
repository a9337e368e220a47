//! `test=virtio-irq`: on the first rng device of each transport, 8 requests
//! each completed by a device interrupt. virtio-mmio: the entry's GSI
//! through the IOAPIC serving it, vector 0x25, edge (`mmio`); virtio-pci:
//! MSI-X, config vector 0x26 and queue vector 0x27, the second half of the
//! requests re-aimed at an online AP when there is one (`pci`).
//!
//! virtio-drivers' `VirtIORng` has no non-blocking request in 0.13, so this
//! uses its building blocks (`begin_init`, `VirtQueue`, `finish_init`) on a
//! `StrictTransport`, and looks at the used ring only after the interrupt.

use crate::cases::support::{report, Ctx, Want};
use crate::drivers::hal::GuestHal;
use crate::drivers::msix::{self, Msix};
use crate::drivers::transport::StrictTransport;
use crate::drivers::virtio::{Bus, Device, Devices, Location};
use crate::platform::apic::{mask_pic, IoApic};
use crate::platform::arch::{cli, sti};
use crate::platform::boot::{self, MAX_CPUS, MSIX_VECTORS, VECTOR_MSIX, VECTOR_VIRTIO};
use crate::platform::pci::Cam;
use crate::platform::time::wait_until;
use crate::println;
use alloc::format;
use alloc::string::String;
use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};
use virtio_drivers::device::common::Feature;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::bus::{Command, ConfigurationAccess, DeviceFunction};
use virtio_drivers::transport::{DeviceType, InterruptStatus, Transport};

/// Requests made, each completed by its interrupt.
const REQUESTS: u64 = 8;

/// The queue the requests go through (queue 0, 8 entries).
type Queue = VirtQueue<GuestHal, 8>;

pub fn run(ctx: &Ctx, _: Want) {
    let devices = ctx.devices;
    if !devices.has(DeviceType::EntropySource) {
        println!("virtio-irq: 0 interrupts");
        report("virtio-irq", "", Err(String::from("no rng device")));
        return;
    }
    if let Some(dev) = devices.first(DeviceType::EntropySource, Bus::Mmio) {
        mmio(ctx, dev);
    }
    if let Some(dev) = devices.first(DeviceType::EntropySource, Bus::Pci) {
        pci(ctx, dev);
    }
}

/// `begin_init` (VERSION_1, EVENT_IDX), `before_queue` (MSI-X vectors),
/// `VirtQueue::new` (queue 0, size 8), `finish_init`, device notifications
/// on, interrupt status read once.
fn start_queue(
    transport: &mut StrictTransport,
    before_queue: impl FnOnce() -> Result<(), String>,
) -> Result<Queue, String> {
    let health = transport.health();
    let features = transport.begin_init(Feature::RING_EVENT_IDX | Feature::VERSION_1);
    health.check()?;
    before_queue()?;
    let event_idx = features.contains(Feature::RING_EVENT_IDX);
    let mut queue = Queue::new(transport, 0, false, event_idx)
        .map_err(|e| health.explain(format!("queue: {}", e)))?;
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
fn run_requests(
    transport: &mut StrictTransport,
    queue: &mut Queue,
    range: Range<u64>,
    counter: &AtomicU64,
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

/// Resets the device (confirmed) before the queue memory and the request
/// buffer go away; a reset that did not complete turns success into failure.
fn finish(
    mut transport: StrictTransport,
    queue: Queue,
    result: Result<(), String>,
) -> Result<(), String> {
    let reset = transport.reset().map_err(|f| format!("{}", f));
    drop(transport);
    drop(queue);
    result.and(reset)
}

fn mmio(ctx: &Ctx, dev: &Device) {
    let start = boot::virtio_irqs().load(Ordering::Relaxed);
    let result = mmio_requests(ctx, dev);
    let n = boot::virtio_irqs().load(Ordering::Relaxed) - start;
    println!("virtio-irq: {} interrupts", n);
    let result = result.and_then(|()| match n {
        n if n >= REQUESTS => Ok(String::new()),
        n => Err(format!("{} interrupts for {} requests", n, REQUESTS)),
    });
    report("virtio-irq", "", result);
}

/// The IOAPIC serving the GSI of the mmio entry `dev`.
fn ioapic_for(ctx: &Ctx, dev: &Device) -> Result<(IoApic, u32), String> {
    let Location::Mmio(mmio) = dev.at else {
        return Err(String::from("not an mmio device"));
    };
    let gsi = mmio
        .irq
        .ok_or_else(|| format!("no irq for the rng at 0x{:x}", mmio.addr))?;
    let (base, gsi_base) = ctx
        .acpi
        .and_then(|a| a.ioapic_for(gsi))
        .ok_or_else(|| String::from("no ioapic"))?;
    let ioapic = IoApic::new(base, gsi_base);
    if !ioapic.serves(gsi) {
        return Err(format!("gsi {} not on an ioapic", gsi));
    }
    Ok((ioapic, gsi))
}

fn mmio_requests(ctx: &Ctx, dev: &Device) -> Result<(), String> {
    let (ioapic, gsi) = ioapic_for(ctx, dev)?;
    let mut transport = ctx.devices.open(dev)?;
    let mut queue = start_queue(&mut transport, || Ok(()))?;

    mask_pic();
    ioapic.route(gsi, VECTOR_VIRTIO, ctx.bsp_apic_id, false);
    sti();
    println!(
        "virtio-irq: rng on gsi {} vector {:#04x}",
        gsi, VECTOR_VIRTIO
    );
    let mut buf = [0u8; 64];
    let counter = boot::virtio_irqs();
    let range = 0..REQUESTS;
    let result = run_requests(&mut transport, &mut queue, range, counter, true, &mut buf);
    cli();
    ioapic.route(gsi, VECTOR_VIRTIO, ctx.bsp_apic_id, true);
    finish(transport, queue, result)
}

/// Interrupt counts of the MSI-X stubs, per vector and per APIC ID.
struct MsixCounts {
    vectors: [u64; MSIX_VECTORS],
    cpus: [u64; MAX_CPUS],
}

impl MsixCounts {
    fn now() -> MsixCounts {
        MsixCounts {
            vectors: core::array::from_fn(|i| boot::msix_irqs()[i].load(Ordering::Relaxed)),
            cpus: core::array::from_fn(|i| boot::msix_cpu_irqs()[i].load(Ordering::Relaxed)),
        }
    }
}

fn pci(ctx: &Ctx, dev: &Device) {
    let before = MsixCounts::now();
    let result = pci_requests(ctx, dev);
    let after = MsixCounts::now();
    let total: u64 = (0..MSIX_VECTORS)
        .map(|i| after.vectors[i] - before.vectors[i])
        .sum();
    let queue_irqs = after.vectors[1] - before.vectors[1];
    println!("virtio-irq: {} msi-x interrupts", total);
    let took = |id: u32| after.cpus[(id & 63) as usize] - before.cpus[(id & 63) as usize];
    for i in 0..MAX_CPUS {
        let n = took(i as u32);
        if n > 0 {
            println!("virtio-irq: apic {} took {}", i, n);
        }
    }
    let result = result.and_then(|()| match ctx.online.first_ap {
        _ if queue_irqs < REQUESTS => Err(format!(
            "{} interrupts for {} requests",
            queue_irqs, REQUESTS
        )),
        Some(id) if took(id) == 0 => Err(format!("apic {} took none", id)),
        _ => Ok(String::new()),
    });
    report("virtio-irq", Bus::Pci.suffix(), result);
}

/// The MSI-X state of a function, to change for the test and put back.
struct MsixSetup {
    df: DeviceFunction,
    cam: Cam,
    msix: Msix,
    /// The common configuration (for the vector fields).
    common: u64,
    /// The command register and the capability's first dword, as found.
    command: Command,
    control: u32,
}

impl MsixSetup {
    fn find(devices: &Devices, df: DeviceFunction) -> Result<MsixSetup, String> {
        let cam = devices.pci_cam()?;
        let mut root = devices.pci_root()?;
        let msix = Msix::find(&mut root, &cam, df)?;
        let common = msix::common_cfg(&mut root, &cam, df)?;
        let command = root.get_status_command(df).1;
        if msix.entries < 2 {
            return Err(format!("msi-x table has {} entry", msix.entries));
        }
        let control = cam.read_word(df, msix.cap);
        Ok(MsixSetup {
            df,
            cam,
            msix,
            common,
            command,
            control,
        })
    }

    /// Table entry 0 (config) → `VECTOR_MSIX`, entry 1 (queue 0) →
    /// `VECTOR_MSIX + 1`, both to `apic` and unmasked; MSI-X on, function
    /// unmasked, INTx off.
    fn enable(&mut self, devices: &Devices, apic: u32) -> Result<(), String> {
        self.msix.set_entry(0, apic, VECTOR_MSIX, false);
        self.msix.set_entry(1, apic, VECTOR_MSIX + 1, false);
        let control = Msix::enabled(self.control);
        self.cam.write_word(self.df, self.msix.cap, control);
        let command = self.command | Command::INTERRUPT_DISABLE;
        devices.pci_root()?.set_command(self.df, command);
        Ok(())
    }

    /// Entries masked, message control and command as they were.
    fn restore(&mut self, devices: &Devices, apic: u32) {
        self.msix.set_entry(0, apic, VECTOR_MSIX, true);
        self.msix.set_entry(1, apic, VECTOR_MSIX + 1, true);
        self.cam.write_word(self.df, self.msix.cap, self.control);
        if let Ok(mut root) = devices.pci_root() {
            root.set_command(self.df, self.command);
        }
    }
}

/// MSI-X on (`MsixSetup::enable`), `msix_config` ← 0 and
/// `queue_msix_vector` ← 1 after FEATURES_OK, before the queue is enabled;
/// the first half of the requests interrupt the BSP, then entry 1 is
/// re-aimed at the first online AP.
fn pci_requests(ctx: &Ctx, dev: &Device) -> Result<(), String> {
    let Location::Pci(df) = dev.at else {
        return Err(String::from("not a pci device"));
    };
    let bsp = ctx.bsp_apic_id;
    let mut setup = MsixSetup::find(ctx.devices, df)?;
    setup.enable(ctx.devices, bsp)?;
    let result = ctx
        .devices
        .open(dev)
        .and_then(|transport| msix_requests(ctx, transport, &setup));
    setup.restore(ctx.devices, bsp);
    result
}

fn msix_requests(
    ctx: &Ctx,
    mut transport: StrictTransport,
    setup: &MsixSetup,
) -> Result<(), String> {
    let mut queue = start_queue(&mut transport, || msix::set_vectors(setup.common, 0, 1))?;
    println!(
        "virtio-irq: rng {} msi-x {} entries at 0x{:x}: config vector {:#04x}, queue 0 vector {:#04x}, apic {}",
        setup.df,
        setup.msix.entries,
        setup.msix.table,
        VECTOR_MSIX,
        VECTOR_MSIX + 1,
        ctx.bsp_apic_id
    );
    sti();
    let half = REQUESTS / 2;
    let counter = &boot::msix_irqs()[1];
    let mut buf = [0u8; 64];
    let mut r = run_requests(
        &mut transport,
        &mut queue,
        0..half,
        counter,
        false,
        &mut buf,
    );
    if r.is_ok() {
        if let Some(id) = ctx.online.first_ap {
            setup.msix.set_entry(1, id, VECTOR_MSIX + 1, false);
            println!(
                "virtio-irq: queue 0 vector {:#04x} to apic {} from request {}",
                VECTOR_MSIX + 1,
                id,
                half
            );
        }
        let range = half..REQUESTS;
        r = run_requests(&mut transport, &mut queue, range, counter, false, &mut buf);
    }
    cli();
    finish(transport, queue, r)
}
