//! The transport-independent part of a virtio transport: device status and feature
//! negotiation (virtio 1.2 §3.1, §2.1–2.2), the queue configuration the driver writes and its
//! validation, activation, notifications and reset. `MmioTransport` and the virtio-pci
//! transport are register layouts over this.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::device::{
    ActivateContext, NeedsReset, VirtioDevice, FEATURE_RING_EVENT_IDX, FEATURE_VERSION_1,
    RING_FEATURES,
};
use crate::events::{lock_device, QueueEventHandler};
use crate::interrupt::VirtioInterrupt;
use crate::queue::{QueueWatch, VirtioMemory};
use crate::state::{QueueSlotState, VirtioTransportState};
use crate::{ActivateError, Error, Result};

/// The status bits a saved state may hold.
const KNOWN_STATUS: u32 = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK | S_FAILED;

/// The largest queue the spec allows.
pub(crate) const MAX_QUEUE_SIZE: u16 = 32768;

pub(crate) const S_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub(crate) const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
pub(crate) const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
pub(crate) const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
pub(crate) const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
pub(crate) const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

// Which queue fields hold a value the device refused (bitmask of a slot's `invalid`).
const BAD_SIZE: u8 = 1;
const BAD_DESC: u8 = 2;
const BAD_DRIVER: u8 = 4;
const BAD_DEVICE: u8 = 8;

/// The three queue areas, as the driver addresses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QueueArea {
    /// The descriptor table.
    Desc = 0,
    /// The driver (available) ring.
    Driver = 1,
    /// The device (used) ring.
    Device = 2,
}

/// A queue as the transport keeps it while the driver configures it.
#[derive(Debug)]
pub(crate) struct QueueSlot {
    pub(crate) queue: Queue,
    /// The QueueReady / queue_enable register.
    pub(crate) ready: bool,
    /// Fields the driver wrote invalid values to (`BAD_*`).
    invalid: u8,
    /// Handed to the device at activation.
    pub(crate) active: bool,
    /// The descriptor, driver and device area registers as written.
    pub(crate) addrs: [u64; 3],
}

impl QueueSlot {
    fn new(max_size: u16) -> Result<Self> {
        let queue = Queue::new(max_size).map_err(|_| Error::InvalidQueueMaxSize {
            index: 0,
            size: max_size,
        })?;
        Ok(Self {
            queue,
            ready: false,
            invalid: 0,
            active: false,
            addrs: [0; 3],
        })
    }
}

/// The state every virtio transport keeps, and the rules the driver meets.
pub(crate) struct VirtioState<M: VirtioMemory> {
    /// "virtio-mmio" or "virtio-pci", for log messages.
    name: &'static str,
    pub(crate) device: Arc<Mutex<dyn VirtioDevice<M>>>,
    memory: M,
    pub(crate) device_type: u32,
    max_sizes: Vec<u16>,
    pub(crate) offered: u64,
    pub(crate) slots: Vec<QueueSlot>,
    pub(crate) notifiers: Vec<EventFd>,
    /// Shared with the queue event handler: polling, and where each active ring is.
    watches: Vec<Arc<QueueWatch<M>>>,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    pub(crate) driver_features: u64,
    pub(crate) queue_sel: u32,
    status: u32,
    pub(crate) activated: bool,
    needs_reset: NeedsReset,
    /// Whether the device may access guest memory (virtio-pci: the command register's bus
    /// master bit; always on virtio-mmio).
    dma_allowed: bool,
    /// `DRIVER_OK` was written while DMA was not allowed: the device starts when it is.
    activation_pending: bool,
}

impl<M: VirtioMemory> VirtioState<M> {
    /// Validates the device's queue sizes; one non-blocking eventfd per queue.
    pub(crate) fn new(
        name: &'static str,
        device: Arc<Mutex<dyn VirtioDevice<M>>>,
        memory: M,
        dma_allowed: bool,
    ) -> Result<Self> {
        let (device_type, max_sizes, offered) = {
            let d = lock_device(&device);
            let offered =
                d.device_features() | FEATURE_VERSION_1 | (d.ring_features() & RING_FEATURES);
            (d.device_type(), d.queue_max_sizes().to_vec(), offered)
        };
        if max_sizes.len() > usize::from(u16::MAX) {
            return Err(Error::TooManyQueues(max_sizes.len()));
        }
        for (index, &size) in max_sizes.iter().enumerate() {
            if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
                return Err(Error::InvalidQueueMaxSize { index, size });
            }
        }
        let slots = max_sizes
            .iter()
            .map(|&s| QueueSlot::new(s))
            .collect::<Result<Vec<_>>>()?;
        let notifiers = max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::EventFd))
            .collect::<Result<Vec<_>>>()?;
        let watches = max_sizes
            .iter()
            .map(|_| Arc::new(QueueWatch::default()))
            .collect();
        Ok(Self {
            name,
            device,
            memory,
            device_type,
            max_sizes,
            offered,
            slots,
            notifiers,
            watches,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
            needs_reset: NeedsReset::new(),
            dma_allowed,
            activation_pending: false,
        })
    }

    /// The status as the driver reads it (`DEVICE_NEEDS_RESET` included).
    pub(crate) fn status(&self) -> u32 {
        if self.needs_reset.is_set() {
            self.status | S_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The queue count.
    #[cfg_attr(not(feature = "pci"), allow(dead_code))]
    pub(crate) fn num_queues(&self) -> usize {
        self.slots.len()
    }

    /// The 32 offered feature bits the device features selector points at.
    pub(crate) fn device_features_window(&self) -> u32 {
        match self.device_features_sel {
            0 => self.offered as u32,
            1 => (self.offered >> 32) as u32,
            _ => 0,
        }
    }

    /// A handler over clones of the notifiers.
    pub(crate) fn queue_event_handler(&self) -> Result<QueueEventHandler<M>> {
        let notifiers = self
            .notifiers
            .iter()
            .zip(&self.watches)
            .enumerate()
            .filter_map(|(i, fds)| Some((u16::try_from(i).ok()?, fds)))
            .map(|(i, (fd, watch))| {
                let fd = fd.try_clone().map_err(Error::EventFd)?;
                Ok((i, fd, watch.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        let device = lock_device(&self.device);
        let device_events = device.device_events().map_err(Error::EventFd)?;
        let readable_fds = device.readable_fds().map_err(Error::EventFd)?;
        drop(device);
        Ok(
            QueueEventHandler::with_watches(self.device.clone(), notifiers)
                .with_device_events(device_events)
                .with_readable_fds(readable_fds),
        )
    }

    pub(crate) fn selected(&mut self) -> Option<&mut QueueSlot> {
        self.slots.get_mut(usize::try_from(self.queue_sel).ok()?)
    }

    pub(crate) fn selected_ref(&self) -> Option<&QueueSlot> {
        self.slots.get(usize::try_from(self.queue_sel).ok()?)
    }

    /// The selected queue, if the driver may still configure it: before `DRIVER_OK` and
    /// while the queue is not ready (virtio 1.2 §4.2.2.3, §4.1.4.3.2).
    fn configurable(&mut self) -> Option<&mut QueueSlot> {
        if self.status & S_DRIVER_OK != 0 || self.activated {
            log::debug!("{}: queue configuration after DRIVER_OK ignored", self.name);
            return None;
        }
        self.selected().filter(|s| !s.ready)
    }

    /// The driver features register for the selected window (only between `DRIVER` and
    /// `FEATURES_OK`, virtio 1.2 §3.1.1).
    pub(crate) fn write_driver_features(&mut self, value: u32) {
        if self.status & S_DRIVER == 0 || self.status & S_FEATURES_OK != 0 {
            log::debug!(
                "{}: driver features write outside negotiation ignored",
                self.name
            );
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            // Feature bits past 63 do not exist; the driver must write 0 there.
            _ => return,
        };
        let mask = 0xFFFF_FFFF_u64 << shift;
        self.driver_features = (self.driver_features & !mask) | (u64::from(value) << shift);
    }

    /// The driver features window it reads back.
    #[cfg_attr(not(feature = "pci"), allow(dead_code))]
    pub(crate) fn driver_features_window(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// Sets the selected queue's size: 0, not a power of two or above the maximum is
    /// refused, and the queue cannot be made live until the driver writes a valid size.
    pub(crate) fn write_queue_size(&mut self, value: u32) {
        let name = self.name;
        let Some(slot) = self.configurable() else {
            return;
        };
        match u16::try_from(value)
            .ok()
            .map(|v| slot.queue.try_set_size(v))
        {
            Some(Ok(())) => slot.invalid &= !BAD_SIZE,
            _ => {
                log::warn!("{name}: invalid queue size {value}");
                slot.invalid |= BAD_SIZE;
            }
        }
    }

    /// Sets the low or high half of a queue area address (virtio-mmio's registers).
    pub(crate) fn write_queue_address_half(&mut self, area: QueueArea, high: bool, value: u32) {
        let Some(current) = self.selected_ref().map(|s| s.addrs[area as usize]) else {
            return;
        };
        let addr = if high {
            (current & 0xFFFF_FFFF) | (u64::from(value) << 32)
        } else {
            (current & !0xFFFF_FFFF) | u64::from(value)
        };
        self.write_queue_address(area, addr);
    }

    /// Sets a queue area address. The registers hold what the driver wrote; the queue
    /// takes the address only when it is valid, and the queue cannot go live while a
    /// register holds an invalid one.
    pub(crate) fn write_queue_address(&mut self, area: QueueArea, addr: u64) {
        let name = self.name;
        let Some(slot) = self.configurable() else {
            return;
        };
        let field = match area {
            QueueArea::Desc => BAD_DESC,
            QueueArea::Driver => BAD_DRIVER,
            QueueArea::Device => BAD_DEVICE,
        };
        slot.addrs[area as usize] = addr;
        let q = &mut slot.queue;
        let ok = match area {
            QueueArea::Desc => q.try_set_desc_table_address(GuestAddress(addr)).is_ok(),
            QueueArea::Driver => q.try_set_avail_ring_address(GuestAddress(addr)).is_ok(),
            QueueArea::Device => q.try_set_used_ring_address(GuestAddress(addr)).is_ok(),
        };
        if ok {
            slot.invalid &= !field;
        } else {
            log::warn!("{name}: misaligned queue address {addr:#x}");
            slot.invalid |= field;
        }
    }

    /// QueueReady / queue_enable.
    pub(crate) fn write_queue_ready(&mut self, value: u32) {
        let running = self.status & S_DRIVER_OK != 0 || self.activated;
        let name = self.name;
        let Some(slot) = self.selected() else {
            return;
        };
        match value {
            // Before DRIVER_OK this takes the queue back for configuration. After it (without
            // VIRTIO_F_RING_RESET, which is not offered) the device keeps using the queue until
            // the driver resets it; the register reads back 0 so a driver tearing down before
            // its reset (as virtio-drivers does) does not wait forever.
            0 => {
                if running {
                    log::debug!("{name}: queue ready = 0 while running; takes effect at reset");
                }
                slot.ready = false;
            }
            1 if !running => slot.ready = true,
            _ => log::debug!("{name}: queue ready = {value} ignored"),
        }
    }

    /// A notification of queue `index`: signals its eventfd if the device runs it.
    pub(crate) fn notify(&self, index: u32) {
        // With VIRTIO_F_NOTIFICATION_DATA (not offered) the value would carry more; here it is
        // the queue index. A notification for a queue the device does not run is ignored.
        let Some(i) = usize::try_from(index).ok() else {
            return;
        };
        let Some(slot) = self.slots.get(i) else {
            log::debug!(
                "{}: notify for queue {index} out of range ignored",
                self.name
            );
            return;
        };
        if !slot.active {
            log::debug!("{}: notify for inactive queue {index} ignored", self.name);
            return;
        }
        if let Some(fd) = self.notifiers.get(i) {
            // Fails only when the counter would overflow: a notification is pending anyway.
            let _ = fd.write(1);
        }
    }

    /// A status write. `0` is a reset, which the transport handles (it has interrupt state
    /// of its own to clear): this returns `true` and does nothing else.
    pub(crate) fn write_status(
        &mut self,
        value: u32,
        interrupt: &Arc<dyn VirtioInterrupt>,
    ) -> bool {
        if value == 0 {
            return true;
        }
        // DEVICE_NEEDS_RESET belongs to the device; a driver writing back what it read
        // carries it along.
        let value = value & !S_NEEDS_RESET;
        if self.status & !value != 0 {
            log::warn!(
                "{}: status {value:#x} clears bits of {:#x}; ignored",
                self.name,
                self.status
            );
            return false;
        }
        let new = value & !self.status;
        self.log_merged_steps(new);
        let mut status = self.status | (new & (S_ACKNOWLEDGE | S_DRIVER | S_FAILED));
        if new & S_FEATURES_OK != 0 && self.accept_features(status) {
            status |= S_FEATURES_OK;
        }
        if new & S_DRIVER_OK != 0 && self.driver_ok(status, interrupt) {
            status |= S_DRIVER_OK;
        }
        self.status = status;
        false
    }

    /// The spec has the driver set one step per write (ACKNOWLEDGE, DRIVER, FEATURES_OK,
    /// then DRIVER_OK, virtio 1.2 §3.1.1) and re-read FEATURES_OK. Several steps in one write
    /// are accepted, as QEMU does (virtio-drivers 0.13 writes ACKNOWLEDGE | DRIVER at once),
    /// and noted here.
    fn log_merged_steps(&self, new: u32) {
        let steps = new & (S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        if steps.count_ones() > 1 {
            log::debug!(
                "{}: merged status write: steps {steps:#x} in one write (from {:#x}); accepted",
                self.name,
                self.status
            );
        }
    }

    /// FEATURES_OK: the driver's features must have been offered and include VERSION_1.
    fn accept_features(&mut self, status: u32) -> bool {
        let name = self.name;
        let unoffered = self.driver_features & !self.offered;
        if status & S_DRIVER == 0 {
            log::warn!("{name}: FEATURES_OK before DRIVER refused");
        } else if unoffered != 0 {
            log::warn!(
                "{name}: driver accepted features {unoffered:#x} not offered; FEATURES_OK refused"
            );
        } else if self.driver_features & FEATURE_VERSION_1 == 0 {
            log::warn!("{name}: driver without VIRTIO_F_VERSION_1; FEATURES_OK refused");
        } else {
            lock_device(&self.device).ack_features(self.driver_features);
            return true;
        }
        false
    }

    /// DRIVER_OK: activates the device (or, while DMA is not allowed, when it becomes so).
    /// Returns whether the bit is accepted.
    fn driver_ok(&mut self, status: u32, interrupt: &Arc<dyn VirtioInterrupt>) -> bool {
        let name = self.name;
        if status & S_FEATURES_OK == 0 {
            log::warn!("{name}: DRIVER_OK without FEATURES_OK; device needs reset");
            self.needs_reset.set();
            return false;
        }
        if !self.dma_allowed {
            log::debug!(
                "{name}: DRIVER_OK with bus mastering off: the device starts when it is on"
            );
            self.activation_pending = true;
            return true;
        }
        self.start(interrupt)
    }

    /// Activates the device; a failure puts it in DEVICE_NEEDS_RESET. Returns whether it
    /// started.
    fn start(&mut self, interrupt: &Arc<dyn VirtioInterrupt>) -> bool {
        match self.activate(interrupt) {
            Ok(()) => {
                log::debug!(
                    "{}: device type {} activated with features {:#x}",
                    self.name,
                    self.device_type,
                    self.driver_features
                );
                self.activated = true;
            }
            Err(e) => {
                log::warn!("{}: activation failed: {e}; device needs reset", self.name);
                self.needs_reset.set();
            }
        }
        self.activated
    }

    /// Whether the device may access guest memory (virtio-pci: bus mastering). Turned on,
    /// it starts a device whose driver already set DRIVER_OK; turned off under a running
    /// device, it stops the device (nothing may touch guest memory any more) and sets
    /// DEVICE_NEEDS_RESET: the driver must reset it to use it again.
    #[cfg_attr(not(feature = "pci"), allow(dead_code))]
    pub(crate) fn set_dma_allowed(&mut self, allowed: bool, interrupt: &Arc<dyn VirtioInterrupt>) {
        if allowed == self.dma_allowed {
            return;
        }
        self.dma_allowed = allowed;
        if allowed && std::mem::take(&mut self.activation_pending) {
            if !self.start(interrupt) {
                self.status &= !S_DRIVER_OK;
            }
        } else if !allowed && self.activated {
            log::warn!(
                "{}: bus mastering turned off under a running device: stopped, needs reset",
                self.name
            );
            self.stop_device();
            self.activated = false;
            self.needs_reset.set();
        }
    }

    fn activate(
        &mut self,
        interrupt: &Arc<dyn VirtioInterrupt>,
    ) -> std::result::Result<(), ActivateError> {
        let event_idx = self.driver_features & FEATURE_RING_EVENT_IDX != 0;
        // Validate every ready queue before giving any away.
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if !slot.ready {
                continue;
            }
            let index = u16::try_from(i).unwrap_or(u16::MAX);
            slot.queue.set_ready(true);
            slot.queue.set_event_idx(event_idx);
            if slot.invalid != 0 || !slot.queue.is_valid(&self.memory) {
                return Err(ActivateError::MissingQueue(index));
            }
        }
        let mut queues = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if !slot.ready {
                continue;
            }
            let index = u16::try_from(i).unwrap_or(u16::MAX);
            let notifier = self.notifiers[i].try_clone().map_err(ActivateError::Io)?;
            // The slot keeps a copy of the configuration (size, addresses), for snapshots.
            let copy = Queue::try_from(slot.queue.state())
                .map_err(|_| ActivateError::MissingQueue(index))?;
            let queue = std::mem::replace(&mut slot.queue, copy);
            slot.active = true;
            queues.push((index, queue, notifier, self.watches[i].clone()));
        }
        let context = ActivateContext::with_watches(
            self.memory.clone(),
            self.driver_features,
            queues,
            interrupt.clone(),
            self.needs_reset.clone(),
        );
        lock_device(&self.device).activate(context)
    }

    /// Takes the device's context back (see `VirtioDevice::reset`) and forgets where its
    /// rings were.
    fn stop_device(&mut self) {
        drop(lock_device(&self.device).reset());
        for w in &self.watches {
            w.deactivate();
        }
        for slot in &mut self.slots {
            slot.active = false;
        }
    }

    /// Device reset: the device gives back its context; queues, features, selectors and
    /// `DEVICE_NEEDS_RESET` are cleared, pending notifications dropped.
    pub(crate) fn reset(&mut self) {
        self.stop_device();
        self.activation_pending = false;
        for (slot, &max) in self.slots.iter_mut().zip(&self.max_sizes) {
            slot.queue.reset();
            debug_assert_eq!(slot.queue.max_size(), max);
            slot.ready = false;
            slot.invalid = 0;
            slot.active = false;
            slot.addrs = [0; 3];
        }
        for fd in &self.notifiers {
            // Drop notifications of the old session.
            let _ = fd.read();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.activated = false;
        self.needs_reset = NeedsReset::new();
    }

    /// Configuration space read, 1/2/4 bytes (8 as two 4-byte halves), `data` zero-filled.
    pub(crate) fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let device = lock_device(&self.device);
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            if let Some(at) = offset.checked_add(4 * i as u64) {
                device.read_config(at, chunk);
            }
        }
    }

    /// Configuration space write, as [`read_config`](Self::read_config).
    pub(crate) fn write_config(&self, offset: u64, data: &[u8]) {
        let mut device = lock_device(&self.device);
        for (i, chunk) in data.chunks(4).enumerate() {
            if let Some(at) = offset.checked_add(4 * i as u64) {
                device.write_config(at, chunk);
            }
        }
    }
}

impl<M: VirtioMemory> VirtioState<M> {
    /// The state to save; the device is quiesced (its queues do not move).
    pub(crate) fn save(&self) -> VirtioTransportState {
        let queues = self
            .slots
            .iter()
            .zip(&self.watches)
            .enumerate()
            .map(|(i, (slot, watch))| {
                let mut queue = crate::state::QueueSnapshot::from(slot.queue.state());
                if slot.active {
                    (queue.next_avail, queue.next_used) = watch.positions();
                    let held = queue.next_avail.wrapping_sub(queue.next_used);
                    if held != 0 {
                        log::warn!(
                            "{}: queue {i}: {held} chains taken and not completed at the \
                             snapshot; a restored device will not complete them",
                            self.name
                        );
                    }
                }
                QueueSlotState {
                    ready: slot.ready,
                    invalid: slot.invalid,
                    active: slot.active,
                    addrs: slot.addrs,
                    queue,
                }
            })
            .collect();
        VirtioTransportState {
            device_type: self.device_type,
            offered_features: self.offered,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues,
            activated: self.activated,
            needs_reset: self.needs_reset.is_set(),
            dma_allowed: self.dma_allowed,
            activation_pending: self.activation_pending,
        }
    }

    /// Checks `state` against this transport's device and the rules a driver meets.
    pub(crate) fn check(&self, state: &VirtioTransportState) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidState(m));
        if self.status != 0 || self.activated || self.activation_pending {
            return bad("the transport is in use; restore into a freshly built one".into());
        }
        if state.device_type != self.device_type {
            return bad(format!(
                "saved device type {} but the device is type {}",
                state.device_type, self.device_type
            ));
        }
        if state.offered_features != self.offered {
            return bad(format!(
                "saved offered features {:#x} but the device offers {:#x}",
                state.offered_features, self.offered
            ));
        }
        if state.queues.len() != self.slots.len() {
            return bad(format!(
                "{} saved queues but the device has {}",
                state.queues.len(),
                self.slots.len()
            ));
        }
        if state.status & !KNOWN_STATUS != 0 {
            return bad(format!("status {:#x} has unknown bits", state.status));
        }
        let features_ok = state.status & S_FEATURES_OK != 0;
        let driver_ok = state.status & S_DRIVER_OK != 0;
        if features_ok && state.driver_features & !self.offered != 0 {
            return bad(format!(
                "driver features {:#x} were not offered ({:#x})",
                state.driver_features, self.offered
            ));
        }
        if features_ok && state.driver_features & FEATURE_VERSION_1 == 0 {
            return bad("driver features lack VIRTIO_F_VERSION_1".into());
        }
        if driver_ok && !features_ok {
            return bad("DRIVER_OK without FEATURES_OK".into());
        }
        if state.activated && (!driver_ok || !state.dma_allowed) {
            return bad("activated without DRIVER_OK or without DMA".into());
        }
        if state.activation_pending && (!driver_ok || state.dma_allowed || state.activated) {
            return bad("activation pending out of order".into());
        }
        let event_idx = state.driver_features & FEATURE_RING_EVENT_IDX != 0;
        for (i, (q, &max)) in state.queues.iter().zip(&self.max_sizes).enumerate() {
            self.check_queue(i, q, max, state.activated)?;
            if q.active && q.queue.event_idx_enabled != event_idx {
                return bad(format!(
                    "queue {i}: EVENT_IDX {} but the driver's features say {event_idx}",
                    q.queue.event_idx_enabled
                ));
            }
        }
        Ok(())
    }

    fn check_queue(&self, i: usize, q: &QueueSlotState, max: u16, activated: bool) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidState(format!("queue {i}: {m}")));
        if q.queue.max_size != max {
            return bad(format!(
                "saved maximum size {} but the device's is {max}",
                q.queue.max_size
            ));
        }
        if q.invalid & !(BAD_SIZE | BAD_DESC | BAD_DRIVER | BAD_DEVICE) != 0 {
            return bad(format!("invalid-field bits {:#x} unknown", q.invalid));
        }
        let rings = [q.queue.desc_table, q.queue.avail_ring, q.queue.used_ring];
        for (area, bit) in [BAD_DESC, BAD_DRIVER, BAD_DEVICE].into_iter().enumerate() {
            if q.invalid & bit == 0 && q.addrs[area] != rings[area] {
                return bad(format!(
                    "area register {:#x} is not the ring address {:#x} it was taken for",
                    q.addrs[area], rings[area]
                ));
            }
        }
        if Queue::try_from(virtio_queue::QueueState::from(q.queue)).is_err() {
            return bad(format!(
                "size {} (maximum {max}) or ring addresses {:#x}/{:#x}/{:#x} invalid",
                q.queue.size, q.queue.desc_table, q.queue.avail_ring, q.queue.used_ring
            ));
        }
        // A running queue the driver wrote ready = 0 to stays active until reset.
        if (q.active && !activated) || (activated && q.ready && !q.active) {
            return bad("active without a running device, or ready and not active".into());
        }
        if !q.active && (q.queue.next_avail != 0 || q.queue.next_used != 0) {
            // A queue the device never ran starts at 0 (a reset zeroes it too).
            return bad(format!(
                "not running but at ring positions {}/{}",
                q.queue.next_avail, q.queue.next_used
            ));
        }
        if q.active {
            if q.invalid != 0 {
                return bad("active with an invalid field".into());
            }
            let used = q.queue.next_avail.wrapping_sub(q.queue.next_used);
            if used > q.queue.size {
                return bad(format!(
                    "next_avail {} is more than the queue size ahead of next_used {}",
                    q.queue.next_avail, q.queue.next_used
                ));
            }
        }
        Ok(())
    }

    /// Restores `state` into this freshly built transport (the device is not reset: it may
    /// hold restored state of its own): checked; an activated device gets
    /// its features and is activated with its queues where they were, through the checks of
    /// `DRIVER_OK` (a ring outside guest memory is an error). Returns whether it activated.
    pub(crate) fn restore(
        &mut self,
        state: &VirtioTransportState,
        interrupt: &Arc<dyn VirtioInterrupt>,
    ) -> Result<bool> {
        self.check(state)?;
        for (i, (slot, q)) in self.slots.iter_mut().zip(&state.queues).enumerate() {
            slot.queue = Queue::try_from(virtio_queue::QueueState::from(q.queue))
                .map_err(|e| Error::InvalidState(format!("queue {i}: {e}")))?;
            // Activation takes the ready slots; `ready` is set as saved once it ran.
            slot.ready = q.ready || q.active;
            slot.invalid = q.invalid;
            slot.addrs = q.addrs;
        }
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.dma_allowed = state.dma_allowed;
        self.activation_pending = state.activation_pending;
        if state.status & S_FEATURES_OK != 0 {
            lock_device(&self.device).ack_features(self.driver_features);
        }
        if state.activated {
            self.restart(interrupt)?;
        }
        for (slot, q) in self.slots.iter_mut().zip(&state.queues) {
            slot.ready = q.ready;
        }
        if state.needs_reset {
            self.needs_reset.set();
        }
        Ok(state.activated)
    }

    /// Activates the device with the restored queues, every ring checked first.
    fn restart(&mut self, interrupt: &Arc<dyn VirtioInterrupt>) -> Result<()> {
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.ready && !slot.queue.is_valid(&self.memory) {
                return Err(Error::InvalidState(format!(
                    "queue {i}: rings outside guest memory"
                )));
            }
        }
        self.activate(interrupt)
            .map_err(|e| Error::InvalidState(format!("the device refused to activate: {e}")))?;
        self.activated = true;
        Ok(())
    }

    /// Raises each active queue's interrupt once, after a restored activation: a spurious
    /// used-buffer interrupt is harmless, a lost one hangs a driver. Not the configuration
    /// interrupt: it would tell the driver the configuration changed (and bump the
    /// generation) when it did not; a pending one is in the restored interrupt status.
    pub(crate) fn kick(&self, interrupt: &dyn VirtioInterrupt) {
        for (i, slot) in self.slots.iter().enumerate() {
            if let (true, Ok(i)) = (slot.active, u16::try_from(i)) {
                let _ = interrupt.trigger(crate::InterruptReason::Queue(i));
            }
        }
    }
}

/// Whether a device configuration access of `len` bytes at `offset` is one the
/// transports take: 1 byte anywhere, 2 bytes even, 4 and 8 bytes 4-aligned.
pub(crate) fn config_access_ok(offset: u64, len: usize) -> bool {
    match len {
        1 => true,
        2 => offset.is_multiple_of(2),
        4 | 8 => offset.is_multiple_of(4),
        _ => false,
    }
}
