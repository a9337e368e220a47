//! The virtio-pci modern transport (virtio 1.2 §4.1), feature `pci`: a
//! [`vmkit_pci::PciDevice`] with the common, notify, ISR and device configuration
//! structures in one 64-bit memory BAR, and MSI-X with one vector per queue plus one for
//! configuration changes.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmkit_bus::IoBus;
//! use vmkit_irq::RecordingSink;
//! use vmkit_pci::{BarEvent, BarObserver, ForbiddenRanges, PciBus};
//! use vmkit_virtio::pci::{PciTransport, VIRTIO_PCI_BAR};
//! use vmkit_virtio::{ActivateContext, ActivateError, VirtioDevice};
//!
//! struct Nothing;
//! impl VirtioDevice for Nothing {
//!     fn device_type(&self) -> u32 { 4 }
//!     fn queue_max_sizes(&self) -> &[u16] { &[64] }
//!     fn device_features(&self) -> u64 { 0 }
//!     fn ack_features(&mut self, _: u64) {}
//!     fn read_config(&self, _: u64, _: &mut [u8]) {}
//!     fn write_config(&mut self, _: u64, _: &[u8]) {}
//!     fn activate(&mut self, _: ActivateContext) -> Result<(), ActivateError> { Ok(()) }
//!     fn reset(&mut self) -> Option<ActivateContext> { None }
//! }
//!
//! /// Moves the notify ioeventfds when the guest moves BAR 0 (vmkit-kvm's PCI platform
//! /// does this with KVM).
//! struct MoveIoeventfds;
//! impl BarObserver for MoveIoeventfds {
//!     fn bar_event(&self, event: &BarEvent) {
//!         if event.bar.index == VIRTIO_PCI_BAR {
//!             // unregister at `event.old`, register `transport.queue_notifiers(new)`
//!             let _ = (event.old, event.new);
//!         }
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let memory: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! let sink = RecordingSink::new(); // the VMM's KVM MSI routes + irqfds (vmkit_irq::KvmMsiSink)
//! // The BAR's size is known before the transport is built: place it, then build.
//! assert_eq!(PciTransport::bar_size_for(1), 0x8000);
//! let transport = PciTransport::new(Arc::new(Mutex::new(Nothing)), memory, sink, 0xC000_0000)?;
//! for n in transport.queue_notifiers(0xC000_0000) {
//!     assert_eq!(n.addr, 0xC000_3000 + 4 * u64::from(n.queue));
//!     // vm.register_ioevent(n.eventfd, &IoEventAddress::Mmio(n.addr), NoDatamatch)?;
//! }
//! let handler = transport.queue_event_handler()?; // onto the VMM's event manager
//! # drop(handler);
//!
//! let vm_bus = Arc::new(IoBus::new());
//! let pci = PciBus::new(&vm_bus, 0xC000_0000..=0xDFFF_FFFF, Arc::new(ForbiddenRanges(vec![0..=0xBFFF_FFFF])))?;
//! pci.set_observer(Arc::new(MoveIoeventfds));
//! let bdf = pci.add_device(Arc::new(Mutex::new(transport)))?;
//! assert_eq!((bdf.device, bdf.function), (1, 0));
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vm_memory::GuestMemoryMmap;
use vmkit_irq::{InterruptLine, MsiVectorSink};
use vmkit_pci::{
    BarKind, ConfigSpace, MsixTable, PciBar, PciDevice, PciIds, CAP_ID_VENDOR, COMMAND_BUS_MASTER,
};
use vmm_sys_util::eventfd::EventFd;

use crate::common::{config_access_ok, QueueArea, VirtioState};
use crate::device::VirtioDevice;
use crate::events::QueueEventHandler;
use crate::interrupt::{
    InterruptReason, VirtioInterrupt, INTERRUPT_STATUS_CONFIG, INTERRUPT_STATUS_USED_RING,
};
use crate::queue::VirtioMemory;
use crate::state::PciTransportState;
use crate::{Error, Result};

/// The PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1AF4;
/// Modern virtio devices have PCI device ID `0x1040 + device type`.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// The revision ID of a modern (non-transitional) device.
pub const VIRTIO_PCI_REVISION: u8 = 1;
/// The subsystem ID this transport reports (modern devices use 0x40 or above).
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// "No vector" in `msix_config` and `queue_msix_vector`.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xFFFF;
/// The BAR holding every virtio structure and the MSI-X table (64-bit memory, BARs 0–1).
pub const VIRTIO_PCI_BAR: usize = 0;
/// `notify_off_multiplier`: queue `n` is notified at `NOTIFY_OFFSET + 4 * n`.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

/// Where the structures sit in the BAR.
pub mod bar_offsets {
    /// Common configuration (§4.1.4.3).
    pub const COMMON_CFG_OFFSET: u64 = 0x0000;
    /// Size of the common configuration structure (up to `queue_device`).
    pub const COMMON_CFG_SIZE: u64 = 0x38;
    /// ISR status (§4.1.4.5), one byte.
    pub const ISR_OFFSET: u64 = 0x1000;
    /// Device-specific configuration (§4.1.4.6).
    pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
    /// Size of the device configuration window.
    pub const DEVICE_CFG_SIZE: u64 = 0x1000;
    /// Notifications (§4.1.4.4): 4 bytes per queue.
    pub const NOTIFY_OFFSET: u64 = 0x3000;
}

/// Offsets in the common configuration structure (§4.1.4.3).
pub mod common_cfg {
    /// `device_feature_select` (u32, RW).
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// `device_feature` (u32, RO).
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// `driver_feature_select` (u32, RW).
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// `driver_feature` (u32, RW).
    pub const DRIVER_FEATURE: u64 = 0x0C;
    /// `config_msix_vector` (u16, RW).
    pub const MSIX_CONFIG: u64 = 0x10;
    /// `num_queues` (u16, RO).
    pub const NUM_QUEUES: u64 = 0x12;
    /// `device_status` (u8, RW).
    pub const DEVICE_STATUS: u64 = 0x14;
    /// `config_generation` (u8, RO).
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// `queue_select` (u16, RW).
    pub const QUEUE_SELECT: u64 = 0x16;
    /// `queue_size` (u16, RW).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// `queue_msix_vector` (u16, RW).
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1A;
    /// `queue_enable` (u16, RW).
    pub const QUEUE_ENABLE: u64 = 0x1C;
    /// `queue_notify_off` (u16, RO).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1E;
    /// `queue_desc` (u64, RW).
    pub const QUEUE_DESC: u64 = 0x20;
    /// `queue_driver` (u64, RW).
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// `queue_device` (u64, RW).
    pub const QUEUE_DEVICE: u64 = 0x30;
}

const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;

/// The virtio-pci interrupt: MSI-X vectors per reason when MSI-X is enabled, else the ISR
/// status byte and an optional INTx line.
pub struct PciInterrupt {
    isr: AtomicU32,
    generation: AtomicU32,
    msix: Arc<MsixTable>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    intx: OnceLock<Arc<dyn InterruptLine>>,
}

impl fmt::Debug for PciInterrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciInterrupt")
            .field("isr", &self.isr.load(Ordering::SeqCst))
            .field("config_vector", &self.config_vector())
            .finish_non_exhaustive()
    }
}

impl PciInterrupt {
    fn new(msix: Arc<MsixTable>, queues: usize) -> Self {
        Self {
            isr: AtomicU32::new(0),
            generation: AtomicU32::new(0),
            msix,
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            intx: OnceLock::new(),
        }
    }

    /// The `config_msix_vector` register.
    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::SeqCst)
    }

    /// Queue `index`'s `queue_msix_vector` register.
    pub fn queue_vector(&self, index: u16) -> u16 {
        self.queue_vectors
            .get(usize::from(index))
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::SeqCst))
    }

    /// The configuration generation (its low byte is `config_generation`).
    pub fn config_generation(&self) -> u32 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Reads and clears the ISR status (what a driver's ISR read does).
    pub fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::SeqCst) as u8
    }

    /// The MSI-X table.
    pub fn msix(&self) -> &Arc<MsixTable> {
        &self.msix
    }

    fn valid_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix.vectors() {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// The registers of a saved state (checked by the caller).
    fn set_registers(&self, state: &PciTransportState) {
        self.isr.store(u32::from(state.isr), Ordering::SeqCst);
        self.generation
            .store(state.config_generation, Ordering::SeqCst);
        self.config_vector
            .store(state.config_vector, Ordering::SeqCst);
        for (v, saved) in self.queue_vectors.iter().zip(&state.queue_vectors) {
            v.store(*saved, Ordering::SeqCst);
        }
    }

    fn reset(&self) {
        self.isr.store(0, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        for v in &self.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, reason: InterruptReason) -> io::Result<()> {
        let vector = match reason {
            InterruptReason::Config => {
                self.generation.fetch_add(1, Ordering::SeqCst);
                // Set whether or not MSI-X is enabled (§4.1.5.3).
                self.isr.fetch_or(INTERRUPT_STATUS_CONFIG, Ordering::SeqCst);
                self.config_vector()
            }
            InterruptReason::Queue(i) => self.queue_vector(i),
        };
        if self.msix.enabled() {
            if vector == VIRTIO_MSI_NO_VECTOR {
                return Ok(());
            }
            return self.msix.trigger(vector).map(|_| ());
        }
        if let InterruptReason::Queue(_) = reason {
            self.isr
                .fetch_or(INTERRUPT_STATUS_USED_RING, Ordering::SeqCst);
        }
        match self.intx.get() {
            Some(line) => line.trigger(),
            None => Ok(()),
        }
    }
}

/// A notification address to register with KVM as an ioeventfd: any write of `len` bytes
/// (2 from Linux and virtio-drivers) at `addr`, no datamatch (each queue has its own
/// address) — `register_ioevent(eventfd, &IoEventAddress::Mmio(addr), NoDatamatch)`.
#[derive(Debug)]
pub struct PciNotifier<'a> {
    /// The queue index.
    pub queue: u16,
    /// The guest physical address of the queue's notify register.
    pub addr: u64,
    /// The eventfd KVM signals.
    pub eventfd: &'a EventFd,
}

/// A virtio device on virtio-pci (modern, virtio 1.x only).
///
/// Add it to a [`vmkit_pci::PciBus`] as `Arc<Mutex<PciTransport>>`. Its BAR 0 (64-bit
/// memory, not prefetchable, [`bar_size`](Self::bar_size) bytes) holds the common
/// configuration at 0, ISR at 0x1000, device configuration at 0x2000, notify registers at
/// 0x3000 (4 bytes a queue), then the MSI-X table and PBA. Common configuration fields take
/// their natural width only (64-bit fields also as two 32-bit halves); other accesses read
/// all ones and are ignored. The status, feature and queue rules are those of
/// [`MmioTransport`](crate::MmioTransport).
pub struct PciTransport<M: VirtioMemory = GuestMemoryMmap> {
    state: VirtioState<M>,
    config: ConfigSpace,
    interrupt: Arc<PciInterrupt>,
    msix_cap: u16,
    bar_size: u64,
    table_offset: u64,
    pba_offset: u64,
}

impl<M: VirtioMemory> fmt::Debug for PciTransport<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciTransport")
            .field("device_type", &self.state.device_type)
            .field("status", &format_args!("{:#x}", self.state.status()))
            .field("activated", &self.state.activated)
            .field("bar", &self.config.bar(VIRTIO_PCI_BAR))
            .finish_non_exhaustive()
    }
}

fn class_of(device_type: u32) -> (u8, u8, u8) {
    match device_type {
        1 => (0x02, 0x00, 0x00), // network controller
        2 => (0x01, 0x00, 0x00), // mass storage (SCSI, as QEMU reports it)
        3 => (0x07, 0x80, 0x00), // communication, other
        _ => (0xFF, 0x00, 0x00), // unclassified
    }
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut body = vec![cap_len, cfg_type, VIRTIO_PCI_BAR as u8, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        body.extend_from_slice(&x.to_le_bytes());
    }
    body
}

/// Where the MSI-X table and PBA go in BAR 0, and the BAR's size, for `queues` queues.
fn bar_plan(queues: usize) -> (u64, u64, u64) {
    let vectors = queues as u64 + 1;
    let notify_size =
        (queues.max(1) as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)).next_multiple_of(0x1000);
    let table_offset = bar_offsets::NOTIFY_OFFSET + notify_size;
    let table_size = vectors * vmkit_pci::MSIX_ENTRY_SIZE;
    let pba_offset = table_offset + table_size.next_multiple_of(0x1000);
    let pba_size = vectors.div_ceil(64) * 8;
    let bar_size = (pba_offset + pba_size.next_multiple_of(0x1000)).next_power_of_two();
    (table_offset, pba_offset, bar_size)
}

impl PciTransport {
    /// The size of BAR 0 of a transport for a device with `queues` queues (a power of two),
    /// known before the transport is built, so a VMM can place the BAR first.
    pub fn bar_size_for(queues: usize) -> u64 {
        bar_plan(queues).2
    }
}

impl<M: VirtioMemory> PciTransport<M> {
    /// Puts `device` on virtio-pci with DMA to `memory`, its MSI-X vectors delivered
    /// through `sink`, and BAR 0 at `bar_address` (aligned to
    /// [`bar_size_for`](PciTransport::bar_size_for); 0 leaves it for the guest to assign).
    /// One non-blocking eventfd per queue.
    ///
    /// The device may access guest memory only while the command register's bus master
    /// bit is set: a driver setting `DRIVER_OK` before it starts the device when it sets the
    /// bit, and a driver clearing it under a running device stops the device, which then
    /// needs a reset.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice<M>>>,
        memory: M,
        sink: Arc<dyn MsiVectorSink>,
        bar_address: u64,
    ) -> Result<Self> {
        let state = VirtioState::new("virtio-pci", device, memory, false)?;
        let queues = state.num_queues();
        let vectors = queues + 1;
        let device_id = u16::try_from(state.device_type)
            .ok()
            .and_then(|t| VIRTIO_PCI_DEVICE_ID_BASE.checked_add(t))
            .ok_or(Error::DeviceTypeOutOfRange(state.device_type))?;
        let msix = Arc::new(MsixTable::new(vectors, sink).map_err(Error::Pci)?);
        let (table_offset, pba_offset, bar_size) = bar_plan(queues);

        let mut config = ConfigSpace::new(PciIds {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id,
            revision: VIRTIO_PCI_REVISION,
            class: class_of(state.device_type),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        });
        config
            .add_bar(
                VIRTIO_PCI_BAR,
                BarKind::Memory64 {
                    prefetchable: false,
                },
                bar_size,
                bar_address,
            )
            .map_err(Error::Pci)?;
        for (cfg_type, offset, length, extra) in [
            (
                CAP_COMMON_CFG,
                bar_offsets::COMMON_CFG_OFFSET,
                bar_offsets::COMMON_CFG_SIZE,
                None,
            ),
            (
                CAP_NOTIFY_CFG,
                bar_offsets::NOTIFY_OFFSET,
                queues.max(1) as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                Some(NOTIFY_OFF_MULTIPLIER),
            ),
            (CAP_ISR_CFG, bar_offsets::ISR_OFFSET, 1, None),
            (
                CAP_DEVICE_CFG,
                bar_offsets::DEVICE_CFG_OFFSET,
                bar_offsets::DEVICE_CFG_SIZE,
                None,
            ),
        ] {
            config
                .add_capability(CAP_ID_VENDOR, &virtio_cap(cfg_type, offset, length, extra))
                .map_err(Error::Pci)?;
        }
        let msix_cap = msix
            .add_capability(
                &mut config,
                VIRTIO_PCI_BAR as u8,
                table_offset as u32,
                VIRTIO_PCI_BAR as u8,
                pba_offset as u32,
            )
            .map_err(Error::Pci)?;
        let interrupt = Arc::new(PciInterrupt::new(msix, queues));
        Ok(Self {
            state,
            config,
            interrupt,
            msix_cap,
            bar_size,
            table_offset,
            pba_offset,
        })
    }

    /// Adds an INTx line, raised (with the ISR status set) while MSI-X is disabled. Without
    /// one, such interrupts only set the ISR status. The interrupt pin stays 0: describing
    /// INTx routing to the guest (`_PRT`) is the VMM's business.
    pub fn with_intx(self, line: Arc<dyn InterruptLine>) -> Self {
        let _ = self.interrupt.intx.set(line);
        self
    }

    /// The size of BAR 0 (a power of two).
    pub fn bar_size(&self) -> u64 {
        self.bar_size
    }

    /// BAR 0 as its registers hold it now.
    pub fn bar(&self) -> Option<PciBar> {
        self.config.bar(VIRTIO_PCI_BAR)
    }

    /// The device.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice<M>>> {
        &self.state.device
    }

    /// The interrupt (MSI-X vectors, ISR, configuration generation).
    pub fn interrupt(&self) -> &Arc<PciInterrupt> {
        &self.interrupt
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u32 {
        self.state.status()
    }

    /// Whether the device is running.
    pub fn is_activated(&self) -> bool {
        self.state.activated
    }

    /// The features the driver wrote.
    pub fn driver_features(&self) -> u64 {
        self.state.driver_features
    }

    /// The offset of the MSI-X capability in configuration space.
    pub fn msix_capability(&self) -> u16 {
        self.msix_cap
    }

    /// The notify ioeventfds for BAR 0 at `bar_base`: queue `n` at
    /// `bar_base + 0x3000 + 4n`. Re-register them when the bus reports BAR 0 moved.
    pub fn queue_notifiers(&self, bar_base: u64) -> Vec<PciNotifier<'_>> {
        self.state
            .notifiers
            .iter()
            .enumerate()
            .filter_map(|(i, fd)| {
                let queue = u16::try_from(i).ok()?;
                let addr = bar_base
                    .checked_add(bar_offsets::NOTIFY_OFFSET)?
                    .checked_add(u64::from(queue) * u64::from(NOTIFY_OFF_MULTIPLIER))?;
                Some(PciNotifier {
                    queue,
                    addr,
                    eventfd: fd,
                })
            })
            .collect()
    }

    /// The glue to add to the VMM's event manager.
    pub fn queue_event_handler(&self) -> Result<QueueEventHandler<M>> {
        self.state.queue_event_handler()
    }

    /// The transport's state for a snapshot (VM paused, device quiesced): what
    /// [`MmioTransport::state`](crate::MmioTransport::state) saves, plus configuration space,
    /// MSI-X table and PBA, the ISR and the vector assignments.
    pub fn state(&self) -> PciTransportState {
        let i = &self.interrupt;
        PciTransportState {
            common: self.state.save(),
            config: self.config.state(),
            msix: i.msix.state(),
            isr: i.isr.load(Ordering::SeqCst) as u8,
            config_vector: i.config_vector(),
            queue_vectors: i
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
            config_generation: i.config_generation(),
        }
    }

    /// Restores `state` into this freshly built transport of the same device, before the
    /// guest runs, as [`MmioTransport::restore`](crate::MmioTransport::restore) does, plus
    /// configuration space (BAR 0, command register), the MSI-X table, PBA and control (each
    /// vector's route given to the MSI sink again: KVM MSI routes with `KvmMsiSink`), the
    /// ISR and the vector assignments. Everything is checked before anything changes. The
    /// bus does not see the configuration change: have it map BAR 0 where the state says
    /// (`vmkit_pci::PciBus::refresh_mappings`; vmkit-kvm's `PciPlatform::restore` does).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] for a state that does not fit the device or holds a value out
    /// of range, or a device that refuses to activate.
    pub fn restore(&mut self, state: &PciTransportState) -> Result<()> {
        let config = self.check_state(state)?;
        self.state.check(&state.common)?;
        self.interrupt
            .msix
            .restore(&state.msix)
            .map_err(|e| Error::InvalidState(e.to_string()))?;
        self.config = config;
        self.interrupt.set_registers(state);
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        if self.state.restore(&state.common, &interrupt)? {
            self.state.kick(&*interrupt);
        }
        Ok(())
    }

    /// Checks what is PCI-specific in `state`; returns the restored configuration space.
    fn check_state(&self, state: &PciTransportState) -> Result<ConfigSpace> {
        let bad = |m: String| Err(Error::InvalidState(m));
        let vectors = self.interrupt.msix.vectors();
        let valid = |v: u16| v == VIRTIO_MSI_NO_VECTOR || usize::from(v) < vectors;
        if state.queue_vectors.len() != self.state.num_queues() {
            return bad(format!(
                "{} queue vectors for {} queues",
                state.queue_vectors.len(),
                self.state.num_queues()
            ));
        }
        if let Some(v) = std::iter::once(&state.config_vector)
            .chain(&state.queue_vectors)
            .find(|v| !valid(**v))
        {
            return bad(format!("MSI-X vector {v} of a table of {vectors}"));
        }
        if u32::from(state.isr) & !(INTERRUPT_STATUS_USED_RING | INTERRUPT_STATUS_CONFIG) != 0 {
            return bad(format!("ISR {:#x} has unknown bits", state.isr));
        }
        let mut config = self.config.clone();
        config
            .restore(&state.config)
            .map_err(|e| Error::InvalidState(e.to_string()))?;
        let control = config.read_u16(self.msix_cap + 2);
        let enabled = control & vmkit_pci::MSIX_CONTROL_ENABLE != 0;
        let masked = control & vmkit_pci::MSIX_CONTROL_FUNCTION_MASK != 0;
        if (enabled, masked) != (state.msix.enabled, state.msix.function_mask) {
            return bad("MSI-X enable or function mask differs from the capability's".into());
        }
        let bus_master = config.command() & COMMAND_BUS_MASTER != 0;
        if bus_master != state.common.dma_allowed {
            return bad("DMA allowed differs from the command register's bus master bit".into());
        }
        Ok(config)
    }

    /// Device reset (the driver wrote 0 to `device_status`): as virtio-mmio's, plus the
    /// MSI-X vector assignments back to `NO_VECTOR` and pending MSI-X messages dropped (the
    /// MSI-X table, PCI state, stays).
    pub fn reset(&mut self) {
        self.state.reset();
        self.interrupt.reset();
        self.interrupt.msix.clear_pending();
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        use common_cfg::*;
        let s = &self.state;
        let q = s.selected_ref();
        let value: u64 = match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => s.device_features_sel.into(),
            (DEVICE_FEATURE, 4) => s.device_features_window().into(),
            (DRIVER_FEATURE_SELECT, 4) => s.driver_features_sel.into(),
            (DRIVER_FEATURE, 4) => s.driver_features_window().into(),
            (MSIX_CONFIG, 2) => self.interrupt.config_vector().into(),
            (NUM_QUEUES, 2) => s.num_queues() as u64,
            (DEVICE_STATUS, 1) => u64::from(s.status() as u8),
            (CONFIG_GENERATION, 1) => u64::from(self.interrupt.config_generation() as u8),
            (QUEUE_SELECT, 2) => u64::from(s.queue_sel as u16),
            (QUEUE_SIZE, 2) => q.map_or(0, |q| {
                use virtio_queue::QueueT;
                q.queue.size().into()
            }),
            (QUEUE_MSIX_VECTOR, 2) => match q {
                Some(_) => self.interrupt.queue_vector(s.queue_sel as u16).into(),
                None => VIRTIO_MSI_NO_VECTOR.into(),
            },
            (QUEUE_ENABLE, 2) => q.map_or(0, |q| u64::from(q.ready)),
            (QUEUE_NOTIFY_OFF, 2) => q.map_or(0, |_| u64::from(s.queue_sel as u16)),
            (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE, 8) => {
                q.map_or(0, |q| q.addrs[((offset - QUEUE_DESC) / 8) as usize])
            }
            (QUEUE_DESC..=0x37, 4) if offset.is_multiple_of(4) => q.map_or(0, |q| {
                let a = q.addrs[((offset - QUEUE_DESC) / 8) as usize];
                if offset.is_multiple_of(8) {
                    a & 0xFFFF_FFFF
                } else {
                    a >> 32
                }
            }),
            _ => {
                log::debug!(
                    "virtio-pci: {}-byte common config read at {offset:#x} ignored",
                    data.len()
                );
                data.fill(0xFF);
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        use common_cfg::*;
        let mut b = [0u8; 8];
        if data.len() > 8 {
            return;
        }
        b[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(b);
        let v32 = value as u32;
        let s = &mut self.state;
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => s.device_features_sel = v32,
            (DRIVER_FEATURE_SELECT, 4) => s.driver_features_sel = v32,
            (DRIVER_FEATURE, 4) => s.write_driver_features(v32),
            (MSIX_CONFIG, 2) => {
                let v = self.interrupt.valid_vector(value as u16);
                self.interrupt.config_vector.store(v, Ordering::SeqCst);
            }
            (DEVICE_STATUS, 1) => {
                let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
                if s.write_status(v32, &interrupt) {
                    self.reset();
                }
            }
            (QUEUE_SELECT, 2) => s.queue_sel = v32,
            (QUEUE_SIZE, 2) => s.write_queue_size(v32),
            (QUEUE_MSIX_VECTOR, 2) => {
                let index = s.queue_sel as usize;
                if let Some(slot) = self.interrupt.queue_vectors.get(index) {
                    slot.store(self.interrupt.valid_vector(value as u16), Ordering::SeqCst);
                }
            }
            (QUEUE_ENABLE, 2) => s.write_queue_ready(v32),
            (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE, 8) => {
                s.write_queue_address(area(offset), value)
            }
            (QUEUE_DESC..=0x37, 4) if offset.is_multiple_of(4) => {
                s.write_queue_address_half(area(offset), !offset.is_multiple_of(8), v32)
            }
            _ => log::debug!(
                "virtio-pci: {}-byte common config write at {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

fn area(offset: u64) -> QueueArea {
    match offset {
        common_cfg::QUEUE_DESC..=0x27 => QueueArea::Desc,
        common_cfg::QUEUE_DRIVER..=0x2F => QueueArea::Driver,
        _ => QueueArea::Device,
    }
}

fn within(offset: u64, start: u64, size: u64) -> Option<u64> {
    offset.checked_sub(start).filter(|o| *o < size)
}

impl<M: VirtioMemory> PciDevice for PciTransport<M> {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        let control = self.config.read_u16(self.msix_cap + 2);
        self.interrupt.msix.set_control(control);
        let bus_master = self.config.command() & COMMAND_BUS_MASTER != 0;
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.state.set_dma_allowed(bus_master, &interrupt);
    }

    fn bar(&self, index: usize) -> Option<PciBar> {
        self.config.bar(index)
    }

    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        if index != VIRTIO_PCI_BAR {
            data.fill(0xFF);
            return;
        }
        let msix = self.interrupt.msix.clone();
        if let Some(o) = within(
            offset,
            bar_offsets::COMMON_CFG_OFFSET,
            bar_offsets::COMMON_CFG_SIZE,
        ) {
            self.read_common(o, data);
        } else if offset == bar_offsets::ISR_OFFSET && data.len() == 1 {
            data[0] = self.interrupt.take_isr();
        } else if let Some(o) = within(
            offset,
            bar_offsets::DEVICE_CFG_OFFSET,
            bar_offsets::DEVICE_CFG_SIZE,
        ) {
            if config_access_ok(o, data.len()) {
                self.state.read_config(o, data);
            } else {
                data.fill(0xFF);
            }
        } else if let Some(o) = within(offset, self.table_offset, msix.table_size()) {
            msix.read_table(o, data);
        } else if let Some(o) = within(offset, self.pba_offset, msix.pba_size()) {
            msix.read_pba(o, data);
        } else {
            // Notify registers are write-only; holes read as zero-less all ones.
            data.fill(0xFF);
        }
    }

    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]) {
        if index != VIRTIO_PCI_BAR {
            return;
        }
        let msix = self.interrupt.msix.clone();
        let notify_size = self.state.num_queues() as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
        if let Some(o) = within(
            offset,
            bar_offsets::COMMON_CFG_OFFSET,
            bar_offsets::COMMON_CFG_SIZE,
        ) {
            self.write_common(o, data);
        } else if let Some(o) = within(
            offset,
            bar_offsets::DEVICE_CFG_OFFSET,
            bar_offsets::DEVICE_CFG_SIZE,
        ) {
            if config_access_ok(o, data.len()) {
                self.state.write_config(o, data);
            }
        } else if let Some(o) = within(offset, bar_offsets::NOTIFY_OFFSET, notify_size) {
            // What an ioeventfd would catch: the queue is the address, whatever the value.
            if o.is_multiple_of(u64::from(NOTIFY_OFF_MULTIPLIER)) && matches!(data.len(), 1 | 2 | 4)
            {
                self.state
                    .notify((o / u64::from(NOTIFY_OFF_MULTIPLIER)) as u32);
            }
        } else if let Some(o) = within(offset, self.table_offset, msix.table_size()) {
            msix.write_table(o, data);
        } else {
            log::debug!("virtio-pci: write to read-only BAR offset {offset:#x} ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::common_cfg::*;
    use super::*;
    use crate::common::{S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET};
    use crate::device::{ActivateContext, FEATURE_VERSION_1};
    use crate::ActivateError;
    use vm_memory::GuestAddress;
    use vmkit_irq::RecordingSink;
    use vmkit_pci::MSIX_CONTROL_ENABLE;

    const ACK: u8 = S_ACKNOWLEDGE as u8;
    const DRV: u8 = S_DRIVER as u8;
    const FOK: u8 = S_FEATURES_OK as u8;
    const DOK: u8 = S_DRIVER_OK as u8;
    const MEM: usize = 0x10_0000;

    #[derive(Default)]
    struct Probe {
        config: [u8; 8],
        active: Option<ActivateContext>,
        resets: usize,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            0x1A
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 16]
        }
        fn device_features(&self) -> u64 {
            0b101
        }
        fn ack_features(&mut self, _features: u64) {}
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                if let Some(v) = self.config.get(offset as usize + i) {
                    *b = *v;
                }
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(v) = self.config.get_mut(offset as usize + i) {
                    *v = *b;
                }
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> std::result::Result<(), ActivateError> {
            self.active = Some(ctx);
            Ok(())
        }
        fn reset(&mut self) -> Option<ActivateContext> {
            self.resets += 1;
            self.active.take()
        }
    }

    struct T {
        pci: PciTransport,
        dev: Arc<Mutex<Probe>>,
        sink: Arc<RecordingSink>,
    }

    /// A transport as a driver finds it after enabling the function: memory decoding and
    /// bus mastering on.
    fn transport() -> T {
        let mut t = transport_without_bus_master();
        t.command(vmkit_pci::COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER);
        t
    }

    fn transport_without_bus_master() -> T {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let dev = Arc::new(Mutex::new(Probe::default()));
        let sink = RecordingSink::new();
        let pci = PciTransport::new(dev.clone(), mem, sink.clone(), 0xC000_0000).unwrap();
        T { pci, dev, sink }
    }

    impl T {
        fn command(&mut self, bits: u16) {
            self.pci
                .write_config(vmkit_pci::offsets::COMMAND, &bits.to_le_bytes());
        }
        fn r(&mut self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.pci.read_bar(0, off, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn w(&mut self, off: u64, len: usize, v: u64) {
            self.pci.write_bar(0, off, &v.to_le_bytes()[..len]);
        }
        fn status(&mut self) -> u8 {
            self.r(DEVICE_STATUS, 1) as u8
        }
        fn negotiate(&mut self) {
            self.w(DEVICE_STATUS, 1, u64::from(ACK | DRV));
            self.w(DRIVER_FEATURE_SELECT, 4, 0);
            self.w(DRIVER_FEATURE, 4, 1);
            self.w(DRIVER_FEATURE_SELECT, 4, 1);
            self.w(DRIVER_FEATURE, 4, FEATURE_VERSION_1 >> 32);
            self.w(DEVICE_STATUS, 1, u64::from(ACK | DRV | FOK));
            assert_eq!(self.status(), ACK | DRV | FOK);
        }
        fn queue(&mut self, index: u16, size: u16, desc: u64, avail: u64, used: u64) {
            self.w(QUEUE_SELECT, 2, index.into());
            self.w(QUEUE_SIZE, 2, size.into());
            self.w(QUEUE_DESC, 8, desc);
            self.w(QUEUE_DRIVER, 4, avail & 0xFFFF_FFFF);
            self.w(QUEUE_DRIVER + 4, 4, avail >> 32);
            self.w(QUEUE_DEVICE, 8, used);
            self.w(QUEUE_ENABLE, 2, 1);
        }
    }

    #[test]
    fn identity_and_layout() {
        let mut t = transport();
        let c = &t.pci.config;
        assert_eq!(
            c.read_u32(0),
            0x105A_1AF4,
            "vendor 0x1AF4, device 0x1040 + 0x1A"
        );
        assert_eq!(c.read_u8(8), 1, "revision 1");
        assert_eq!(c.read_u16(0x2C), 0x1AF4);
        let bar = t.pci.bar().unwrap();
        assert_eq!((bar.address, bar.size), (0xC000_0000, 0x8000));
        assert_eq!(t.r(NUM_QUEUES, 2), 2);
        assert_eq!(t.r(MSIX_CONFIG, 2), 0xFFFF);
        t.w(QUEUE_SELECT, 2, 1);
        assert_eq!(
            t.r(QUEUE_SIZE, 2),
            16,
            "max size until the driver writes one"
        );
        assert_eq!(t.r(QUEUE_NOTIFY_OFF, 2), 1);
        assert_eq!(t.r(QUEUE_MSIX_VECTOR, 2), 0xFFFF);
        t.w(QUEUE_SELECT, 2, 2);
        assert_eq!(t.r(QUEUE_SIZE, 2), 0, "no such queue");
        // Feature windows.
        t.w(DEVICE_FEATURE_SELECT, 4, 0);
        assert_eq!(t.r(DEVICE_FEATURE, 4), 0b101 | (3 << 28));
        t.w(DEVICE_FEATURE_SELECT, 4, 1);
        assert_eq!(t.r(DEVICE_FEATURE, 4), 1);
        t.w(DEVICE_FEATURE_SELECT, 4, 9);
        assert_eq!(t.r(DEVICE_FEATURE, 4), 0);
        let n = t.pci.queue_notifiers(0xC000_0000);
        assert_eq!(
            n.iter().map(|n| (n.queue, n.addr)).collect::<Vec<_>>(),
            vec![(0, 0xC000_3000), (1, 0xC000_3004)]
        );
    }

    #[test]
    fn status_machine_matches_mmio() {
        let mut t = transport();
        // Features outside negotiation are ignored; FEATURES_OK needs VERSION_1.
        t.w(DRIVER_FEATURE, 4, 1);
        assert_eq!(t.pci.driver_features(), 0);
        t.w(DEVICE_STATUS, 1, u64::from(ACK | DRV));
        t.w(DEVICE_STATUS, 1, u64::from(ACK | DRV | FOK));
        assert_eq!(t.status(), ACK | DRV, "no VERSION_1: refused");
        // DRIVER_OK without FEATURES_OK: needs reset.
        t.queue(0, 16, 0x1000, 0x2000, 0x3000);
        t.w(DEVICE_STATUS, 1, u64::from(ACK | DRV | DOK));
        assert_eq!(t.status(), ACK | DRV | S_NEEDS_RESET as u8);
        t.w(DEVICE_STATUS, 1, 0);
        assert_eq!(t.status(), 0);
        t.negotiate();
        t.queue(0, 16, 0x1000, 0x2000, 0x3000);
        assert_eq!(t.r(QUEUE_DESC, 8), 0x1000);
        assert_eq!(t.r(QUEUE_DRIVER + 4, 4), 0);
        t.w(DEVICE_STATUS, 1, u64::from(ACK | DRV | FOK | DOK));
        assert_eq!(t.status(), ACK | DRV | FOK | DOK);
        assert!(t.pci.is_activated());
        assert_eq!(
            t.dev
                .lock()
                .unwrap()
                .active
                .as_ref()
                .unwrap()
                .queues()
                .count(),
            1
        );
        // Locked after DRIVER_OK.
        t.w(QUEUE_SELECT, 2, 1);
        t.w(QUEUE_SIZE, 2, 8);
        t.w(QUEUE_ENABLE, 2, 1);
        assert_eq!(t.r(QUEUE_ENABLE, 2), 0);
        // Clearing bits without a reset: ignored.
        t.w(DEVICE_STATUS, 1, u64::from(ACK));
        assert_eq!(t.status(), ACK | DRV | FOK | DOK);
    }

    #[test]
    fn hostile_queues_need_reset() {
        for (size, desc, avail, used) in [
            (0u16, 0x1000u64, 0x2000u64, 0x3000u64),
            (3, 0x1000, 0x2000, 0x3000),
            (512, 0x1000, 0x2000, 0x3000),
            (16, MEM as u64, 0x2000, 0x3000),
            (16, 0x1008, 0x2000, 0x3000),
            (16, 0xFFFF_FFFF_FFFF_FFF0, 0x2000, 0x3000),
        ] {
            let mut t = transport();
            t.negotiate();
            t.queue(0, size, desc, avail, used);
            t.w(DEVICE_STATUS, 1, u64::from(ACK | DRV | FOK | DOK));
            assert_eq!(
                t.status() & (DOK | S_NEEDS_RESET as u8),
                S_NEEDS_RESET as u8
            );
            assert!(!t.pci.is_activated());
        }
    }

    #[test]
    fn notify_only_active_queues() {
        let mut t = transport();
        let fds: Vec<_> = t
            .pci
            .queue_notifiers(0)
            .iter()
            .map(|n| n.eventfd.try_clone().unwrap())
            .collect();
        t.w(bar_offsets::NOTIFY_OFFSET, 2, 0);
        assert!(fds[0].read().is_err(), "before activation");
        t.negotiate();
        t.queue(0, 16, 0x1000, 0x2000, 0x3000);
        t.w(DEVICE_STATUS, 1, u64::from(ACK | DRV | FOK | DOK));
        t.w(bar_offsets::NOTIFY_OFFSET, 2, 0);
        assert_eq!(fds[0].read().unwrap(), 1);
        t.w(bar_offsets::NOTIFY_OFFSET + 4, 2, 1); // queue 1 not ready
        t.w(bar_offsets::NOTIFY_OFFSET + 8, 2, 2); // past the notify region
        t.w(bar_offsets::NOTIFY_OFFSET + 2, 2, 0); // misaligned
        assert!(fds[0].read().is_err());
        assert!(fds[1].read().is_err());
    }

    #[test]
    fn wrong_widths_and_read_only_fields() {
        let mut t = transport();
        for (off, len) in [
            (DEVICE_FEATURE_SELECT, 2),
            (DEVICE_STATUS, 4),
            (DEVICE_STATUS, 2),
            (QUEUE_SELECT, 4),
            (QUEUE_SIZE, 1),
            (QUEUE_DESC + 2, 4),
            (QUEUE_DESC, 2),
            (0x34, 8),
            (0x38, 4),
            (0x100, 4),
        ] {
            assert_eq!(t.r(off, len), u64::MAX >> (64 - 8 * len), "{off:#x}/{len}");
            t.w(off, len, 0x7);
        }
        assert_eq!(t.status(), 0);
        assert_eq!(t.r(QUEUE_SELECT, 2), 0);
        // Read-only fields ignore writes.
        t.w(NUM_QUEUES, 2, 9);
        t.w(DEVICE_FEATURE, 4, 0);
        t.w(CONFIG_GENERATION, 1, 9);
        t.w(QUEUE_NOTIFY_OFF, 2, 9);
        t.w(bar_offsets::ISR_OFFSET, 1, 3);
        assert_eq!(t.r(NUM_QUEUES, 2), 2);
        assert_eq!(t.r(QUEUE_NOTIFY_OFF, 2), 0);
        assert_eq!(t.r(bar_offsets::ISR_OFFSET, 1), 0);
        // Anywhere in the BAR, any width, other BARs: no panic.
        for off in [
            0u64,
            0xFFF,
            0x1001,
            0x2FFF,
            0x3FFE,
            0x4000,
            0x5000,
            0x7FFF,
            0x8000,
            u64::MAX,
        ] {
            for len in [0usize, 1, 2, 3, 4, 8, 16] {
                let mut d = vec![0u8; len];
                t.pci.read_bar(0, off, &mut d);
                t.pci.write_bar(0, off, &d);
                t.pci.read_bar(2, off, &mut d);
                t.pci.write_bar(5, off, &d);
            }
        }
        // Device config window: widths as on virtio-mmio.
        t.dev.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(t.r(bar_offsets::DEVICE_CFG_OFFSET + 2, 2), 0x0403);
        assert_eq!(
            t.r(bar_offsets::DEVICE_CFG_OFFSET, 8),
            0x0807_0605_0403_0201
        );
        assert_eq!(t.r(bar_offsets::DEVICE_CFG_OFFSET + 1, 2), 0xFFFF);
    }

    #[test]
    fn interrupts_isr_and_vectors() {
        let mut t = transport();
        let irq = t.pci.interrupt().clone();
        // MSI-X off: ISR bits, read-to-clear.
        irq.trigger(InterruptReason::Queue(0)).unwrap();
        irq.trigger(InterruptReason::Config).unwrap();
        assert_eq!(t.r(CONFIG_GENERATION, 1), 1);
        assert_eq!(t.r(bar_offsets::ISR_OFFSET, 1), 3);
        assert_eq!(t.r(bar_offsets::ISR_OFFSET, 1), 0);
        // MSI-X on: config → msix_config, queue → its vector; entries unmasked.
        let cap = t.pci.msix_capability();
        t.pci
            .write_config(cap + 2, &MSIX_CONTROL_ENABLE.to_le_bytes());
        for v in 0..3u64 {
            t.w(0x4000 + 16 * v + 12, 4, 0);
        }
        t.w(MSIX_CONFIG, 2, 2);
        t.w(QUEUE_SELECT, 2, 1);
        t.w(QUEUE_MSIX_VECTOR, 2, 0);
        t.w(QUEUE_SELECT, 2, 0);
        t.w(QUEUE_MSIX_VECTOR, 2, 3); // beyond the 3-entry table
        assert_eq!(t.r(QUEUE_MSIX_VECTOR, 2), 0xFFFF);
        t.sink.take();
        irq.trigger(InterruptReason::Config).unwrap();
        irq.trigger(InterruptReason::Queue(1)).unwrap();
        irq.trigger(InterruptReason::Queue(0)).unwrap(); // NO_VECTOR: nothing
        irq.trigger(InterruptReason::Queue(9)).unwrap(); // no such queue: nothing
        assert_eq!(t.sink.triggers(), vec![2, 0]);
        assert_eq!(
            t.r(bar_offsets::ISR_OFFSET, 1),
            2,
            "config bit set even with MSI-X"
        );
        // Reset: vectors back to NO_VECTOR.
        t.w(DEVICE_STATUS, 1, 0);
        assert_eq!(t.r(MSIX_CONFIG, 2), 0xFFFF);
        t.w(QUEUE_SELECT, 2, 1);
        assert_eq!(t.r(QUEUE_MSIX_VECTOR, 2), 0xFFFF);
        assert_eq!(t.dev.lock().unwrap().resets, 1);
    }

    #[test]
    fn no_dma_while_bus_mastering_is_off() {
        // DRIVER_OK before bus mastering: accepted, the device starts when it comes on.
        let mut t = transport_without_bus_master();
        t.negotiate();
        t.queue(0, 16, 0x1000, 0x2000, 0x3000);
        t.w(DEVICE_STATUS, 1, u64::from(ACK | DRV | FOK | DOK));
        assert_eq!(t.status(), ACK | DRV | FOK | DOK);
        assert!(!t.pci.is_activated());
        assert!(t.dev.lock().unwrap().active.is_none(), "no context, no DMA");
        t.command(COMMAND_BUS_MASTER);
        assert!(t.pci.is_activated());
        assert!(t.dev.lock().unwrap().active.is_some());
        // Turned off under the running device: stopped (context taken back), needs reset.
        t.command(0);
        assert!(!t.pci.is_activated());
        assert!(t.dev.lock().unwrap().active.is_none());
        assert_eq!(t.dev.lock().unwrap().resets, 1);
        assert_ne!(t.status() & S_NEEDS_RESET as u8, 0);
        // Turning it on again does not restart it; a reset and a new session do.
        t.command(COMMAND_BUS_MASTER);
        assert!(!t.pci.is_activated());
        t.w(DEVICE_STATUS, 1, 0);
        assert_eq!(t.status(), 0);
        t.negotiate();
        t.queue(0, 16, 0x1000, 0x2000, 0x3000);
        t.w(DEVICE_STATUS, 1, u64::from(ACK | DRV | FOK | DOK));
        assert!(t.pci.is_activated());
    }

    #[test]
    fn reset_drops_pending_msix_messages() {
        let mut t = transport();
        let cap = t.pci.msix_capability();
        t.pci
            .write_config(cap + 2, &MSIX_CONTROL_ENABLE.to_le_bytes());
        t.negotiate();
        t.w(QUEUE_SELECT, 2, 0);
        t.w(QUEUE_MSIX_VECTOR, 2, 1);
        t.queue(0, 16, 0x1000, 0x2000, 0x3000);
        t.w(DEVICE_STATUS, 1, u64::from(ACK | DRV | FOK | DOK));
        // Vector 1 is still masked (entries come out of reset masked): the message waits.
        t.pci
            .interrupt()
            .trigger(InterruptReason::Queue(0))
            .unwrap();
        assert!(t.pci.interrupt().msix().is_pending(1));
        t.w(DEVICE_STATUS, 1, 0);
        assert!(!t.pci.interrupt().msix().is_pending(1), "dropped at reset");
        assert!(t.pci.interrupt().msix().enabled(), "PCI state stays");
        assert!(t.sink.triggers().is_empty());
    }
}
