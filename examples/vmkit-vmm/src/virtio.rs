//! Wiring a virtio device onto the VM over virtio-mmio: an MMIO window and a GSI, an irqfd for
//! its interrupt, an ioeventfd per queue for its notifications, and its description for the
//! guest (command line entry and DSDT device).

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmkit_boot::{DsdtDevice, IrqTrigger};
use vmkit_bus::{GsiAllocator, IoBus, MmioAllocator};
use vmkit_irq::Irqchip;
use vmkit_virtio::{cmdline_entry, MmioTransport, QueueEventHandler, VirtioDevice, MMIO_SIZE};

use crate::vm::Error;

/// Where virtio-mmio windows go: after the PCI BAR window (0xC000_0000), below the debug
/// MMIO page (0xD0F0_0000); room for 3840 devices of 4 KiB.
pub const MMIO_WINDOW: std::ops::Range<u64> = 0xD000_0000..DEBUG_MMIO;
/// The debug MMIO page: writes are counted (the MMIO-exit benchmark writes here).
pub const DEBUG_MMIO: u64 = 0xD0F0_0000;
/// IOAPIC pins free for devices (0–4 are the PC's, COM1 is 4).
pub const DEVICE_GSIS: std::ops::RangeInclusive<u32> = 5..=23;

/// The virtio-mmio devices of a VM, as the rest of the VMM needs them.
pub struct VirtioMmio {
    windows: MmioAllocator,
    gsis: GsiAllocator,
    /// (base, GSI) of each device, in order.
    placed: Vec<(u64, u32)>,
    /// The queue event handlers, for the event loop.
    pub handlers: Vec<QueueEventHandler>,
}

impl VirtioMmio {
    pub fn new() -> Result<Self, Error> {
        Ok(Self {
            windows: MmioAllocator::new(MMIO_WINDOW)?,
            gsis: GsiAllocator::new(DEVICE_GSIS)?,
            placed: Vec::new(),
            handlers: Vec::new(),
        })
    }

    /// Puts `device` on the bus behind a virtio-mmio transport.
    pub fn add(
        &mut self,
        vm: &VmFd,
        irqchip: &Irqchip,
        mem: &GuestMemoryMmap,
        bus: &mut IoBus,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(), Error> {
        let range = self.windows.allocate(MMIO_SIZE, MMIO_SIZE)?;
        let base = range.base().0;
        let gsi = self.gsis.allocate()?;
        let line = Arc::new(irqchip.line(vm, gsi)?);
        let transport = MmioTransport::new(device, mem.clone(), line)?;
        for n in transport.queue_notifiers(base) {
            vm.register_ioevent(n.eventfd, &IoEventAddress::Mmio(n.addr), n.datamatch)
                .map_err(|source| Error::IoEvent {
                    addr: n.addr,
                    source,
                })?;
        }
        self.handlers.push(transport.queue_event_handler()?);
        bus.register_mmio(range, Arc::new(Mutex::new(transport)))?;
        self.placed.push((base, gsi));
        Ok(())
    }

    /// `virtio_mmio.device=` entries for the kernel command line.
    pub fn cmdline(&self) -> String {
        self.placed
            .iter()
            .map(|&(base, gsi)| cmdline_entry(base, gsi))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `LNRO0005` devices for the DSDT.
    pub fn dsdt_devices(&self) -> Vec<DsdtDevice> {
        self.placed
            .iter()
            .enumerate()
            .map(|(uid, &(base, gsi))| {
                // MMIO_WINDOW lies below 4 GiB, so the base fits the DSDT's 32-bit resource.
                DsdtDevice::virtio_mmio(
                    uid as u32,
                    base as u32,
                    MMIO_SIZE as u32,
                    gsi,
                    IrqTrigger::Edge,
                )
            })
            .collect()
    }
}
