//! A VM's base: KVM, guest memory in KVM's slots, the in-kernel irqchip, the one bus the
//! vCPUs dispatch on, and the notifier every way of ending the VM reports to.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::{Kvm, VmFd};
use vmkit_bus::IoBus;
use vmkit_irq::{EventFdLine, Irqchip, IrqchipConfig};
use vmkit_legacy::EventFdExit;
use vmkit_memory::{
    create_guest_memory, register_memory_slots_with, take_bitmap_dirty, DirtyPages, GuestRam,
    MemoryConfig, MemorySlots,
};

use crate::{Error, Result};

/// What to build.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Guest RAM: size and backing.
    pub memory: MemoryConfig,
    /// The in-kernel interrupt controllers (PIT or not).
    pub irqchip: IrqchipConfig,
    /// Track the pages written since the last [`Machine::take_dirty_pages`], for diff
    /// snapshots: the memory slots log dirty pages in KVM (`KVM_MEM_LOG_DIRTY_PAGES`) and
    /// the regions carry vm-memory dirty bitmaps (device and VMM writes), whatever
    /// `memory.track_dirty` says. Costs a write fault per page the guest writes after each
    /// take.
    pub track_dirty_pages: bool,
}

impl MachineConfig {
    /// `memory` bytes of RAM (transparent huge pages), the irqchip with a PIT.
    pub fn new(memory: u64) -> Self {
        Self {
            memory: MemoryConfig::new(memory),
            irqchip: IrqchipConfig::default(),
            track_dirty_pages: false,
        }
    }
}

/// A VM with its memory, interrupt controller and bus, ready for vCPUs and devices.
///
/// Built in the order KVM wants: the VM, guest memory as memory slots, then the irqchip
/// (before any vCPU, which attaches its LAPIC to it at creation). Everything is shared
/// (`Arc`) with what the VMM builds on it: vCPU threads dispatch on [`bus`](Self::bus), the
/// virtio platforms register ioeventfds on [`vm`](Self::vm) and lines on
/// [`irqchip`](Self::irqchip), devices report the VM's end to [`exit`](Self::exit).
pub struct Machine {
    kvm: Kvm,
    vm: Arc<VmFd>,
    memory: GuestRam,
    // Declared after `vm`: the slots are dropped (and the mappings with them) only after the
    // VM that uses them.
    slots: MemorySlots,
    irqchip: Arc<Mutex<Irqchip>>,
    bus: Arc<IoBus>,
    exit: Arc<EventFdExit>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

/// Opens `/dev/kvm`, telling a missing module from missing permissions.
pub fn open_kvm() -> Result<Kvm> {
    if !Path::new("/dev/kvm").exists() {
        return Err(Error::NoKvm);
    }
    Kvm::new().map_err(Error::KvmOpen)
}

impl Machine {
    /// Opens KVM and builds the VM's base as `config` says.
    pub fn new(config: &MachineConfig) -> Result<Self> {
        let kvm = open_kvm()?;
        let vm = Arc::new(kvm.create_vm().map_err(Error::CreateVm)?);
        let memory = create_guest_memory(&MemoryConfig {
            track_dirty: config.memory.track_dirty || config.track_dirty_pages,
            ..config.memory.clone()
        })?;
        let slots = register_memory_slots_with(&vm, &memory, config.track_dirty_pages)?;
        let irqchip = Irqchip::new(&vm, config.irqchip)?;
        let exit = EventFdExit::new()?;
        Ok(Self {
            kvm,
            vm,
            memory,
            slots,
            irqchip: Arc::new(Mutex::new(irqchip)),
            bus: Arc::new(IoBus::new()),
            exit: Arc::new(exit),
        })
    }

    /// The KVM handle (CPUID, MSR lists, limits).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// The pages written since the machine was built or since the last call: those the
    /// guest wrote (KVM's dirty log of every slot) and those devices and the VMM wrote
    /// through vm-memory (the regions' bitmaps); both are cleared. Call it with the vCPUs
    /// and devices paused, or pages written meanwhile land in one take or the next.
    ///
    /// An error unless the machine was built with
    /// [`track_dirty_pages`](MachineConfig::track_dirty_pages).
    pub fn take_dirty_pages(&self) -> Result<DirtyPages> {
        let mut dirty = self.slots.take_dirty_log(&self.vm)?;
        dirty.union(&take_bitmap_dirty(&self.memory))?;
        Ok(dirty)
    }

    /// The in-kernel PIC, IOAPIC and PIT, and the GSI routing table.
    pub fn irqchip(&self) -> &Arc<Mutex<Irqchip>> {
        &self.irqchip
    }

    /// The irqchip, locked (a poisoned lock is taken over: the routing table is only ever
    /// replaced whole).
    pub fn lock_irqchip(&self) -> MutexGuard<'_, Irqchip> {
        lock(&self.irqchip)
    }

    /// The PIO and MMIO bus the vCPUs dispatch on.
    pub fn bus(&self) -> &Arc<IoBus> {
        &self.bus
    }

    /// Where devices, vCPUs and the VMM report that the VM should end; its eventfd wakes
    /// the VMM's event loop.
    pub fn exit(&self) -> &Arc<EventFdExit> {
        &self.exit
    }

    /// An interrupt line for `gsi`: an eventfd registered as a KVM irqfd, so a device
    /// raising it injects the interrupt with no exit to the VMM.
    pub fn line(&self, gsi: u32) -> Result<Arc<EventFdLine>> {
        Ok(Arc::new(self.lock_irqchip().line(&self.vm, gsi)?))
    }
}

pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
