//! Virtio devices on PCI bus 0: the bus's configuration mechanisms (ports 0xCF8 and ECAM),
//! BARs placed in the address map's PCI window and registered on the VM's bus, MSI-X
//! vectors as KVM MSI routes with an irqfd each, and the queues' notify ioeventfds, which
//! follow BAR 0 when the guest moves it.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmkit_boot::{DsdtDevice, PciHostBridge};
use vmkit_bus::{IoBus, MmioAllocator};
use vmkit_irq::{Irqchip, KvmMsiSink, MsiGsiAllocator};
use vmkit_memory::layout::{LAST_GSI, PCI_BAR_WINDOW, PCI_ECAM};
use vmkit_pci::{BarEvent, BarObserver, Bdf, ForbiddenRanges, PciBus};
use vmkit_virtio::pci::{PciTransport, VIRTIO_PCI_BAR};
use vmkit_virtio::{PciTransportState, QueueEventHandler, VirtioDevice, VirtioMemory};
use vmm_sys_util::eventfd::EventFd;

use crate::machine::lock;
use crate::{Error, Machine, Result};

/// Moves each function's notify ioeventfds with its BAR 0.
struct NotifyFollower {
    vm: Arc<VmFd>,
    /// slot → (offset of each notify register in BAR 0, its eventfd).
    notifiers: Mutex<HashMap<u8, Vec<(u64, EventFd)>>>,
}

impl BarObserver for NotifyFollower {
    fn bar_event(&self, event: &BarEvent) {
        if event.bar.index != VIRTIO_PCI_BAR {
            return;
        }
        let notifiers = lock(&self.notifiers);
        let Some(list) = notifiers.get(&event.bdf.device) else {
            return;
        };
        for (offset, fd) in list {
            if let Some(old) = event.old.and_then(|b| b.checked_add(*offset)) {
                if let Err(e) =
                    self.vm
                        .unregister_ioevent(fd, &IoEventAddress::Mmio(old), NoDatamatch)
                {
                    log::warn!(
                        "pci {}: notify ioeventfd at {old:#x} not removed: {e}",
                        event.bdf
                    );
                }
            }
            if let Some(new) = event.new.and_then(|b| b.checked_add(*offset)) {
                // If this fails, the write still reaches the device through an MMIO exit.
                if let Err(e) =
                    self.vm
                        .register_ioevent(fd, &IoEventAddress::Mmio(new), NoDatamatch)
                {
                    log::warn!(
                        "pci {}: notify ioeventfd at {new:#x} not added (exits instead): {e}",
                        event.bdf
                    );
                }
            }
        }
    }
}

/// A transport of any guest memory type, for snapshots.
trait Stateful: Send + Sync {
    fn state(&self) -> PciTransportState;
    fn restore(&self, state: &PciTransportState) -> vmkit_virtio::Result<()>;
}

impl<M: VirtioMemory> Stateful for Mutex<PciTransport<M>> {
    fn state(&self) -> PciTransportState {
        lock(self).state()
    }

    fn restore(&self, state: &PciTransportState) -> vmkit_virtio::Result<()> {
        lock(self).restore(state)
    }
}

/// PCI bus 0 of a VM, with virtio devices on it.
pub struct PciPlatform {
    vm: Arc<VmFd>,
    irqchip: Arc<Mutex<Irqchip>>,
    bus: Arc<PciBus>,
    bars: MmioAllocator,
    gsis: Arc<Mutex<MsiGsiAllocator>>,
    follower: Arc<NotifyFollower>,
    /// Each attached function's slot and transport, in attach order.
    transports: Vec<(u8, Arc<dyn Stateful>)>,
}

impl std::fmt::Debug for PciPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciPlatform")
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

fn inclusive(r: &std::ops::Range<u64>) -> RangeInclusive<u64> {
    r.start..=r.end - 1
}

impl PciPlatform {
    /// Bus 0 of `machine`: the configuration ports and the ECAM of the address map on its
    /// bus, BARs allowed in the address map's PCI window and never over RAM.
    pub fn new(machine: &Machine) -> Result<Self> {
        let ram: Vec<RangeInclusive<u64>> = machine
            .memory()
            .iter()
            .map(|r| r.start_addr().0..=r.last_addr().0)
            .collect();
        Self::with_parts(
            machine.vm().clone(),
            machine.irqchip().clone(),
            machine.bus(),
            ram,
        )
    }

    /// As [`new`](Self::new), for a VMM that holds its VM, irqchip and bus itself;
    /// `forbidden` lists what a BAR may never cover inside the window (RAM, mostly).
    pub fn with_parts(
        vm: Arc<VmFd>,
        irqchip: Arc<Mutex<Irqchip>>,
        io: &Arc<IoBus>,
        forbidden: Vec<RangeInclusive<u64>>,
    ) -> Result<Self> {
        let bus = Arc::new(PciBus::new(
            io,
            inclusive(&PCI_BAR_WINDOW),
            Arc::new(ForbiddenRanges(forbidden)),
        )?);
        bus.register_config_access(PCI_ECAM.start)?;
        let follower = Arc::new(NotifyFollower {
            vm: vm.clone(),
            notifiers: Mutex::new(HashMap::new()),
        });
        bus.set_observer(follower.clone());
        Ok(Self {
            vm,
            irqchip,
            bus,
            bars: MmioAllocator::new(PCI_BAR_WINDOW)?,
            gsis: Arc::new(Mutex::new(MsiGsiAllocator::new(LAST_GSI))),
            follower,
            transports: Vec::new(),
        })
    }

    /// Puts `device` on the bus as a virtio-pci function with DMA to `memory`: BAR 0 placed
    /// and decoding (as firmware leaves it), MSI-X vectors through KVM MSI routes, one notify
    /// ioeventfd per queue. Returns the function's address and the handler to add to the
    /// VMM's event manager.
    pub fn attach<M: VirtioMemory>(
        &mut self,
        memory: M,
        device: Arc<Mutex<dyn VirtioDevice<M>>>,
    ) -> Result<(Bdf, QueueEventHandler<M>)> {
        let sink = Arc::new(KvmMsiSink::new(
            self.vm.clone(),
            self.irqchip.clone(),
            self.gsis.clone(),
        ));
        let queues = lock(&device).queue_max_sizes().len();
        let size = PciTransport::bar_size_for(queues);
        let base = self.bars.allocate(size, size)?.base().0;
        let function = PciTransport::new(device, memory, sink, base)?;
        let mut follow = Vec::new();
        for n in function.queue_notifiers(base) {
            let fd = n.eventfd.try_clone().map_err(Error::EventFd)?;
            follow.push((n.addr - base, fd));
        }
        let handler = function.queue_event_handler()?;
        let function = Arc::new(Mutex::new(function));
        let bdf = self.bus.add_device(function.clone())?;
        self.transports.push((bdf.device, function));
        // Before decoding starts, so the follower registers the ioeventfds at the BAR.
        lock(&self.follower.notifiers).insert(bdf.device, follow);
        self.bus.enable_decoding(bdf.device);
        if self.bus.bar_mapping(bdf.device, VIRTIO_PCI_BAR).is_none() {
            return Err(Error::Pci(vmkit_pci::Error::InvalidBarAddress(base)));
        }
        Ok((bdf, handler))
    }

    /// Each function's state, in attach order, for a snapshot (the VM paused and the
    /// devices quiesced).
    pub fn states(&self) -> Vec<PciTransportState> {
        self.transports.iter().map(|(_, t)| t.state()).collect()
    }

    /// Restores `states` into the functions, in attach order, before the guest runs: the VMM
    /// attached the same devices in the same order (and restored each device's own state)
    /// first. Each function gets its configuration space, MSI-X table (its vectors' KVM MSI
    /// routes programmed again) and virtio state (see `PciTransport::restore`); then the bus
    /// maps its BARs where the state says, and the notify ioeventfds follow.
    ///
    /// # Errors
    ///
    /// [`Error::TransportCount`] when the number of states is not the number of functions;
    /// [`Error::TransportRestore`] naming the function a state does not fit.
    pub fn restore(&self, states: &[PciTransportState]) -> Result<()> {
        if states.len() != self.transports.len() {
            return Err(Error::TransportCount {
                transport: "virtio-pci",
                saved: states.len(),
                attached: self.transports.len(),
            });
        }
        for (index, ((slot, t), s)) in self.transports.iter().zip(states).enumerate() {
            t.restore(s)
                .map_err(|source| Error::TransportRestore { index, source })?;
            self.bus.refresh_mappings(*slot);
        }
        Ok(())
    }

    /// The bus.
    pub fn bus(&self) -> &Arc<PciBus> {
        &self.bus
    }

    /// The host bridge for the DSDT (and, with it, the MCFG).
    pub fn dsdt_device(&self) -> DsdtDevice {
        // The window and the ECAM lie below 4 GiB (a layout test says so).
        DsdtDevice::PciHostBridge(PciHostBridge::bus0(
            PCI_ECAM.start,
            (
                PCI_BAR_WINDOW.start as u32,
                (PCI_BAR_WINDOW.end - PCI_BAR_WINDOW.start) as u32,
            ),
        ))
    }
}
