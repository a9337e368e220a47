//! Virtio devices on virtio-mmio: a 4 KiB window and an IOAPIC pin each, the interrupt as a
//! KVM irqfd, each queue's notifications as a KVM ioeventfd, and the device's description
//! for the guest (a kernel command-line entry and a DSDT device).

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;
use vmkit_boot::{DsdtDevice, IrqTrigger};
use vmkit_bus::{GsiAllocator, IoBus, MmioAllocator};
use vmkit_irq::Irqchip;
use vmkit_memory::layout::{VIRTIO_MMIO_GSIS, VIRTIO_MMIO_WINDOW};
use vmkit_virtio::{
    MmioTransport, MmioTransportState, QueueEventHandler, VirtioDevice, VirtioMemory, MMIO_SIZE,
};

use crate::machine::lock;
use crate::{Error, Machine, Result};

/// Where a device was put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// The base of its 4 KiB register window.
    pub base: u64,
    /// Its IOAPIC pin.
    pub gsi: u32,
}

/// A transport of any guest memory type, for snapshots.
trait Stateful: Send + Sync {
    fn state(&self) -> MmioTransportState;
    fn restore(&self, state: &MmioTransportState) -> vmkit_virtio::Result<()>;
}

impl<M: VirtioMemory> Stateful for Mutex<MmioTransport<M>> {
    fn state(&self) -> MmioTransportState {
        lock(self).state()
    }

    fn restore(&self, state: &MmioTransportState) -> vmkit_virtio::Result<()> {
        lock(self).restore(state)
    }
}

/// The virtio-mmio devices of a VM.
pub struct MmioPlatform {
    vm: Arc<VmFd>,
    irqchip: Arc<Mutex<Irqchip>>,
    bus: Arc<IoBus>,
    windows: MmioAllocator,
    gsis: GsiAllocator,
    placed: Vec<MmioSlot>,
    /// Each attached transport, in attach order.
    transports: Vec<Arc<dyn Stateful>>,
}

impl std::fmt::Debug for MmioPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioPlatform")
            .field("placed", &self.placed)
            .finish_non_exhaustive()
    }
}

impl MmioPlatform {
    /// Devices of `machine`, placed in the address map's virtio-mmio window with its pins.
    pub fn new(machine: &Machine) -> Result<Self> {
        Self::with_parts(
            machine.vm().clone(),
            machine.irqchip().clone(),
            machine.bus().clone(),
        )
    }

    /// As [`new`](Self::new), for a VMM that holds its VM, irqchip and bus itself.
    pub fn with_parts(
        vm: Arc<VmFd>,
        irqchip: Arc<Mutex<Irqchip>>,
        bus: Arc<IoBus>,
    ) -> Result<Self> {
        Ok(Self {
            vm,
            irqchip,
            bus,
            windows: MmioAllocator::new(VIRTIO_MMIO_WINDOW)?,
            gsis: GsiAllocator::new(VIRTIO_MMIO_GSIS)?,
            placed: Vec::new(),
            transports: Vec::new(),
        })
    }

    /// Puts `device` behind a virtio-mmio transport with DMA to `memory`: a window and a
    /// pin, the interrupt as an irqfd, one ioeventfd per queue (QueueNotify with the queue
    /// index as datamatch), the registers on the bus. Returns the handler to add to the
    /// VMM's event manager.
    pub fn attach<M: VirtioMemory>(
        &mut self,
        memory: M,
        device: Arc<Mutex<dyn VirtioDevice<M>>>,
    ) -> Result<QueueEventHandler<M>> {
        let range = self.windows.allocate(MMIO_SIZE, MMIO_SIZE)?;
        let base = range.base().0;
        let gsi = self.gsis.allocate()?;
        let line = Arc::new(lock(&self.irqchip).line(&self.vm, gsi)?);
        let transport = MmioTransport::new(device, memory, line)?;
        for n in transport.queue_notifiers(base) {
            self.vm
                .register_ioevent(n.eventfd, &IoEventAddress::Mmio(n.addr), n.datamatch)
                .map_err(|source| Error::IoEvent {
                    addr: n.addr,
                    source,
                })?;
        }
        let handler = transport.queue_event_handler()?;
        let transport = Arc::new(Mutex::new(transport));
        self.bus.register_mmio(range, transport.clone())?;
        self.placed.push(MmioSlot { base, gsi });
        self.transports.push(transport);
        Ok(handler)
    }

    /// Each transport's state, in attach order, for a snapshot (the VM paused and the
    /// devices quiesced).
    pub fn states(&self) -> Vec<MmioTransportState> {
        self.transports.iter().map(|t| t.state()).collect()
    }

    /// Restores `states` into the transports, in attach order, before the guest runs: the
    /// VMM attached the same devices in the same order (and restored each device's own
    /// state) first. See [`MmioTransport::restore`].
    ///
    /// # Errors
    ///
    /// [`Error::TransportCount`] when the number of states is not the number of devices;
    /// [`Error::TransportRestore`] naming the device a state does not fit.
    pub fn restore(&self, states: &[MmioTransportState]) -> Result<()> {
        if states.len() != self.transports.len() {
            return Err(Error::TransportCount {
                transport: "virtio-mmio",
                saved: states.len(),
                attached: self.transports.len(),
            });
        }
        for (index, (t, s)) in self.transports.iter().zip(states).enumerate() {
            t.restore(s)
                .map_err(|source| Error::TransportRestore { index, source })?;
        }
        Ok(())
    }

    /// Where each device went, in the order they were attached.
    pub fn slots(&self) -> &[MmioSlot] {
        &self.placed
    }

    /// Adds a `virtio_mmio.device=4K@BASE:GSI` entry per device to `cmdline`, for kernels
    /// that find virtio-mmio devices on their command line (all of them without ACPI).
    pub fn add_to_cmdline(&self, cmdline: &mut Cmdline) -> Result<()> {
        for slot in &self.placed {
            cmdline.add_virtio_mmio_device(MMIO_SIZE, GuestAddress(slot.base), slot.gsi, None)?;
        }
        Ok(())
    }

    /// An `LNRO0005` device per device, for the DSDT (kernels with ACPI find them there).
    pub fn dsdt_devices(&self) -> Vec<DsdtDevice> {
        self.placed
            .iter()
            .enumerate()
            .map(|(uid, slot)| {
                // The virtio-mmio window lies below 4 GiB (a layout test says so), so the
                // base fits the DSDT's 32-bit resource.
                DsdtDevice::virtio_mmio(
                    uid as u32,
                    slot.base as u32,
                    MMIO_SIZE as u32,
                    slot.gsi,
                    IrqTrigger::Edge,
                )
            })
            .collect()
    }
}
