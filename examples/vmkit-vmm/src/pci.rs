//! Wiring virtio devices onto PCI bus 0: the root bus with its host bridge (port CAM at 0xCF8,
//! ECAM in the MCFG), a window for BARs, MSI-X vectors as KVM MSI routes with irqfds, and
//! ioeventfds on each queue's notify register that follow the BAR when the guest moves it.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::GuestMemoryMmap;
use vmkit_boot::{DsdtDevice, PciHostBridge};
use vmkit_bus::{mmio_range, pio_range, IoBus, MmioAllocator};
use vmkit_irq::{EventFdLine, InterruptLine, Irqchip, MsiGsiAllocator, MsiMessage};
use vmkit_pci::{
    BarEvent, BarObserver, ForbiddenRanges, MsiVectorSink, MsixMessage, PciBarWindow, PciBus,
    PciConfigIo, PciConfigMmio,
};
use vmkit_virtio::pci::VirtioPciDevice;
use vmkit_virtio::{QueueEventHandler, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

use crate::vm::Error;

/// ECAM for bus 0 (1 MiB), described in the MCFG.
pub const ECAM_BASE: u64 = 0xE000_0000;
const ECAM_SIZE: u64 = 1 << 20;
/// Where BARs live (the host bridge's 32-bit window in the DSDT).
pub const BAR_WINDOW_START: u64 = 0xC000_0000;
const BAR_WINDOW_SIZE: u64 = 0x1000_0000;
/// The last GSI KVM routes (it takes 4096 routes).
const LAST_GSI: u32 = 4095;

/// MSI-X vectors of one function as KVM MSI routes, one GSI and irqfd per vector.
struct KvmMsiSink {
    vm: Arc<VmFd>,
    irqchip: Arc<Mutex<Irqchip>>,
    gsis: Arc<Mutex<MsiGsiAllocator>>,
    /// vector → (GSI, line); created on the vector's first route.
    vectors: Mutex<HashMap<u16, (u32, EventFdLine)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MsiVectorSink for KvmMsiSink {
    fn update(&self, vector: u16, message: Option<MsixMessage>, _masked: bool) -> io::Result<()> {
        let mut vectors = lock(&self.vectors);
        let gsi = match vectors.get(&vector) {
            Some(&(gsi, _)) => gsi,
            None => {
                let Some(_) = message else { return Ok(()) };
                let gsi = lock(&self.gsis).allocate().map_err(io::Error::other)?;
                let line = lock(&self.irqchip)
                    .line(&self.vm, gsi)
                    .map_err(io::Error::other)?;
                vectors.insert(vector, (gsi, line));
                gsi
            }
        };
        let mut chip = lock(&self.irqchip);
        match message {
            Some(m) => chip
                .set_msi_route(
                    &self.vm,
                    gsi,
                    MsiMessage {
                        address: m.address,
                        data: m.data,
                    },
                )
                .map_err(io::Error::other),
            None => chip
                .remove_msi_route(&self.vm, gsi)
                .map_err(io::Error::other),
        }
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        match lock(&self.vectors).get(&vector) {
            Some((_, line)) => line.trigger(),
            // No route yet: the guest has not programmed this vector; nothing to deliver.
            None => Ok(()),
        }
    }
}

/// Moves a function's notify ioeventfds with its BAR 0.
struct NotifyFollower {
    vm: Arc<VmFd>,
    /// slot → (offset of each notify register in BAR 0, its eventfd).
    notifiers: Mutex<HashMap<u8, Vec<(u64, EventFd)>>>,
}

impl BarObserver for NotifyFollower {
    fn bar_event(&self, event: &BarEvent) {
        let BarEvent::Moved { bdf, bar, old, new } = event else {
            return;
        };
        if bar.index != 0 {
            return;
        }
        let notifiers = lock(&self.notifiers);
        let Some(list) = notifiers.get(&bdf.device) else {
            return;
        };
        for (offset, fd) in list {
            if let Some(old) = old {
                let _ = self.vm.unregister_ioevent(
                    fd,
                    &IoEventAddress::Mmio(old + offset),
                    NoDatamatch,
                );
            }
            if let Some(new) = new {
                // If this fails, the write still reaches the device through an MMIO exit.
                let _ =
                    self.vm
                        .register_ioevent(fd, &IoEventAddress::Mmio(new + offset), NoDatamatch);
            }
        }
    }
}

/// PCI bus 0 of a VM.
pub struct VirtioPci {
    vm: Arc<VmFd>,
    irqchip: Arc<Mutex<Irqchip>>,
    bus: Arc<PciBus>,
    bars: MmioAllocator,
    gsis: Arc<Mutex<MsiGsiAllocator>>,
    follower: Arc<NotifyFollower>,
    /// The queue event handlers, for the event loop.
    pub handlers: Vec<QueueEventHandler>,
}

impl VirtioPci {
    /// Creates bus 0 and puts its configuration mechanisms and BAR window on `io`.
    /// `forbidden` lists what BARs may never cover (RAM, other devices).
    pub fn new(
        vm: Arc<VmFd>,
        irqchip: Arc<Mutex<Irqchip>>,
        io: &mut IoBus,
        mut forbidden: Vec<std::ops::RangeInclusive<u64>>,
    ) -> Result<Self, Error> {
        let window = BAR_WINDOW_START..=BAR_WINDOW_START + BAR_WINDOW_SIZE - 1;
        forbidden.push(ECAM_BASE..=ECAM_BASE + ECAM_SIZE - 1);
        let bus = Arc::new(PciBus::new(window, Arc::new(ForbiddenRanges(forbidden)))?);
        let follower = Arc::new(NotifyFollower {
            vm: vm.clone(),
            notifiers: Mutex::new(HashMap::new()),
        });
        bus.set_observer(follower.clone());
        io.register_pio(
            pio_range(0xcf8, 8)?,
            Arc::new(Mutex::new(PciConfigIo::new(bus.clone()))),
        )?;
        io.register_mmio(
            mmio_range(ECAM_BASE, ECAM_SIZE)?,
            Arc::new(Mutex::new(PciConfigMmio::new(bus.clone()))),
        )?;
        io.register_mmio(
            mmio_range(BAR_WINDOW_START, BAR_WINDOW_SIZE)?,
            Arc::new(Mutex::new(PciBarWindow::new(bus.clone()))),
        )?;
        Ok(Self {
            vm,
            irqchip,
            bus,
            bars: MmioAllocator::new(BAR_WINDOW_START..BAR_WINDOW_START + BAR_WINDOW_SIZE)?,
            gsis: Arc::new(Mutex::new(MsiGsiAllocator::new(LAST_GSI))),
            follower,
            handlers: Vec::new(),
        })
    }

    /// Puts `device` on the bus as a virtio-pci function with its BAR assigned.
    pub fn add(
        &mut self,
        mem: &GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(), Error> {
        let sink = Arc::new(KvmMsiSink {
            vm: self.vm.clone(),
            irqchip: self.irqchip.clone(),
            gsis: self.gsis.clone(),
            vectors: Mutex::new(HashMap::new()),
        });
        // The BAR size is known once the transport exists: build it unplaced, then place it.
        let probe = VirtioPciDevice::new(device.clone(), mem.clone(), sink.clone(), 0)?;
        let size = probe.bar_size();
        drop(probe);
        let range = self.bars.allocate(size, size)?;
        let base = range.base().0;
        let function = VirtioPciDevice::new(device, mem.clone(), sink, base)?;
        let mut follow = Vec::new();
        for n in function.queue_notifiers(base) {
            self.vm
                .register_ioevent(n.eventfd, &IoEventAddress::Mmio(n.addr), NoDatamatch)
                .map_err(|source| Error::IoEvent {
                    addr: n.addr,
                    source,
                })?;
            follow.push((
                n.addr - base,
                n.eventfd.try_clone().map_err(Error::EventFd)?,
            ));
        }
        self.handlers.push(function.queue_event_handler()?);
        let bdf = self.bus.add_device(Arc::new(Mutex::new(function)))?;
        self.bus.enable_decoding(bdf.device);
        lock(&self.follower.notifiers).insert(bdf.device, follow);
        Ok(())
    }

    /// The host bridge for the DSDT (and, with it, the MCFG).
    pub fn dsdt_device(&self) -> DsdtDevice {
        // Both constants are below 4 GiB.
        DsdtDevice::PciHostBridge(PciHostBridge::bus0(
            ECAM_BASE,
            (BAR_WINDOW_START as u32, BAR_WINDOW_SIZE as u32),
        ))
    }
}
