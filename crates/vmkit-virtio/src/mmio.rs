//! The virtio-mmio transport, "version 2" register layout (virtio 1.2 §4.2.2).

use std::fmt;
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vm_memory::GuestMemoryMmap;
use vmkit_irq::InterruptLine;
use vmm_sys_util::eventfd::EventFd;

use crate::common::{config_access_ok, QueueArea, VirtioState};
#[cfg(test)]
use crate::common::{S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FAILED, S_FEATURES_OK, S_NEEDS_RESET};
use crate::device::VirtioDevice;
#[cfg(test)]
use crate::device::{ActivateContext, FEATURE_VERSION_1};
use crate::events::QueueEventHandler;
use crate::interrupt::{
    MmioInterrupt, VirtioInterrupt, INTERRUPT_STATUS_CONFIG, INTERRUPT_STATUS_USED_RING,
};
use crate::queue::VirtioMemory;
use crate::state::MmioTransportState;
use crate::Result;
#[cfg(test)]
use crate::{ActivateError, Error};
#[cfg(test)]
use vm_memory::GuestAddress;

/// "virt" in little endian: the MagicValue register.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The Version register: 2, the virtio 1.x ("modern") layout.
pub const MMIO_VERSION: u32 = 2;
/// The size of a virtio-mmio device's region: registers, then config space from 0x100.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, the register to register as a KVM ioeventfd.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Register offsets of the version 2 layout.
pub mod regs {
    /// MagicValue (R).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Version (R).
    pub const VERSION: u64 = 0x004;
    /// DeviceID (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// VendorID (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// DeviceFeatures (R): 32 feature bits selected by DeviceFeaturesSel.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// DeviceFeaturesSel (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// DriverFeatures (W).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// DriverFeaturesSel (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// QueueSel (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// QueueNumMax (R).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// QueueNum (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// QueueReady (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// QueueNotify (W).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// InterruptStatus (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// InterruptACK (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Status (RW).
    pub const STATUS: u64 = 0x070;
    /// QueueDescLow (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// QueueDescHigh (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// QueueDriverLow (W): the available ring.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// QueueDriverHigh (W).
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// QueueDeviceLow (W): the used ring.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// QueueDeviceHigh (W).
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// SHMSel (W).
    pub const SHM_SEL: u64 = 0x0ac;
    /// SHMLenLow (R).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// SHMLenHigh (R).
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// SHMBaseLow (R).
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// SHMBaseHigh (R).
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// ConfigGeneration (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// An eventfd to register with KVM for a queue's notifications: `KVM_IOEVENTFD` at
/// `addr`, 4 bytes, with `datamatch`.
#[derive(Debug)]
pub struct MmioNotifier<'a> {
    /// The queue index.
    pub queue: u16,
    /// The guest physical address of QueueNotify.
    pub addr: u64,
    /// The value the driver writes for this queue (its index).
    pub datamatch: u32,
    /// The eventfd KVM signals; the transport passes clones of it to the device and to
    /// [`QueueEventHandler`].
    pub eventfd: &'a EventFd,
}

/// A virtio device on virtio-mmio.
///
/// Implements vm-device's [`MutDeviceMmio`]: register `Arc<Mutex<MmioTransport>>` on the
/// MMIO bus for [`MMIO_SIZE`] bytes. Registers are 32-bit: other widths and misaligned
/// accesses are ignored (reads return `0xFF` bytes); the configuration space from
/// [`CONFIG_SPACE_OFFSET`] takes 1-, 2- and 4-byte accesses, and 8-byte ones as two 4-byte
/// halves. Nothing a guest writes panics the VMM.
pub struct MmioTransport<M: VirtioMemory = GuestMemoryMmap> {
    state: VirtioState<M>,
    interrupt: Arc<MmioInterrupt>,
    vendor_id: u32,
}

impl<M: VirtioMemory> fmt::Debug for MmioTransport<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.state.device_type)
            .field("status", &format_args!("{:#x}", self.status()))
            .field(
                "driver_features",
                &format_args!("{:#x}", self.state.driver_features),
            )
            .field("activated", &self.state.activated)
            .finish_non_exhaustive()
    }
}

impl<M: VirtioMemory> MmioTransport<M> {
    /// Puts `device` on virtio-mmio, with DMA to `memory` and its interrupt on `line` (an
    /// irqfd-backed line in a VMM).
    ///
    /// Creates one non-blocking eventfd per queue for notifications (see
    /// [`queue_notifiers`](Self::queue_notifiers)).
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice<M>>>,
        memory: M,
        line: Arc<dyn InterruptLine>,
    ) -> Result<Self> {
        Ok(Self {
            state: VirtioState::new("virtio-mmio", device, memory, true)?,
            interrupt: Arc::new(MmioInterrupt::new(line)),
            vendor_id: 0,
        })
    }

    /// Sets the VendorID register (default 0).
    pub fn with_vendor_id(mut self, vendor_id: u32) -> Self {
        self.vendor_id = vendor_id;
        self
    }

    /// The device.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice<M>>> {
        &self.state.device
    }

    /// The interrupt (InterruptStatus and ConfigGeneration live there).
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// The Status register as the driver reads it (`DEVICE_NEEDS_RESET` included).
    pub fn status(&self) -> u32 {
        self.state.status()
    }

    /// Whether the device is running (the driver set `DRIVER_OK` and it activated).
    pub fn is_activated(&self) -> bool {
        self.state.activated
    }

    /// The features offered to the driver: the device's, `VERSION_1` and the ring features.
    pub fn offered_features(&self) -> u64 {
        self.state.offered
    }

    /// The features the driver wrote (accepted once `FEATURES_OK` reads back set).
    pub fn driver_features(&self) -> u64 {
        self.state.driver_features
    }

    /// The QueueNotify ioeventfds to register with KVM for a device at `base`: one per queue,
    /// at `base + 0x50`, 4 bytes, datamatch = queue index. Until registered (or when KVM
    /// lets a write through), a QueueNotify write signals the same eventfd from the MMIO exit.
    pub fn queue_notifiers(&self, base: u64) -> Vec<MmioNotifier<'_>> {
        let Some(addr) = base.checked_add(QUEUE_NOTIFY_OFFSET) else {
            return Vec::new();
        };
        self.state
            .notifiers
            .iter()
            .enumerate()
            .filter_map(|(i, fd)| {
                let queue = u16::try_from(i).ok()?;
                Some(MmioNotifier {
                    queue,
                    addr,
                    datamatch: u32::from(queue),
                    eventfd: fd,
                })
            })
            .collect()
    }

    /// The glue to add to the VMM's event manager: it watches clones of the queue
    /// notifiers and runs [`VirtioDevice::process_queue`].
    pub fn queue_event_handler(&self) -> Result<QueueEventHandler<M>> {
        self.state.queue_event_handler()
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let s = &mut self.state;
        match offset {
            regs::DEVICE_FEATURES_SEL => s.device_features_sel = value,
            regs::DRIVER_FEATURES => s.write_driver_features(value),
            regs::DRIVER_FEATURES_SEL => s.driver_features_sel = value,
            regs::QUEUE_SEL => s.queue_sel = value,
            regs::QUEUE_NUM => s.write_queue_size(value),
            regs::QUEUE_READY => s.write_queue_ready(value),
            regs::QUEUE_NOTIFY => s.notify(value),
            regs::INTERRUPT_ACK => self.interrupt.ack(value),
            regs::STATUS => {
                let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
                if s.write_status(value, &interrupt) {
                    self.reset();
                }
            }
            regs::QUEUE_DESC_LOW => s.write_queue_address_half(QueueArea::Desc, false, value),
            regs::QUEUE_DESC_HIGH => s.write_queue_address_half(QueueArea::Desc, true, value),
            regs::QUEUE_DRIVER_LOW => s.write_queue_address_half(QueueArea::Driver, false, value),
            regs::QUEUE_DRIVER_HIGH => s.write_queue_address_half(QueueArea::Driver, true, value),
            regs::QUEUE_DEVICE_LOW => s.write_queue_address_half(QueueArea::Device, false, value),
            regs::QUEUE_DEVICE_HIGH => s.write_queue_address_half(QueueArea::Device, true, value),
            regs::SHM_SEL => {}
            _ => log::debug!(
                "virtio-mmio: write to read-only or unknown register {offset:#x} ignored"
            ),
        }
    }

    /// The transport's state for a snapshot, taken while the VM is paused and the device
    /// quiesced (its queues do not move): status, features, queues (with the ring positions
    /// of the queues the device runs) and the interrupt registers.
    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            common: self.state.save(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
        }
    }

    /// Restores `state` into this freshly built transport of the same device (same type,
    /// features, queue count and maximum sizes), before the guest runs. Every value is
    /// checked; when the state says the device ran, the device gets the driver's features and
    /// is activated with its queues at the saved ring positions, through the checks of a
    /// guest's `DRIVER_OK` (a ring outside guest memory is an error, not a running device).
    /// Each running queue's interrupt and the configuration interrupt are then raised once:
    /// a spurious interrupt is harmless, a lost one would hang the driver.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`](crate::Error::InvalidState) for a state that does not fit
    /// the device or holds a value out of range, or a device that refuses to activate.
    pub fn restore(&mut self, state: &MmioTransportState) -> Result<()> {
        if state.interrupt_status & !(INTERRUPT_STATUS_USED_RING | INTERRUPT_STATUS_CONFIG) != 0 {
            return Err(crate::Error::InvalidState(format!(
                "interrupt status {:#x} has unknown bits",
                state.interrupt_status
            )));
        }
        if !state.common.dma_allowed {
            return Err(crate::Error::InvalidState(
                "virtio-mmio always allows DMA".into(),
            ));
        }
        self.state.check(&state.common)?;
        // Before the activation: a device may interrupt as it starts (vsock's transport
        // reset event), and that must not be overwritten.
        self.interrupt
            .set_registers(state.interrupt_status, state.config_generation);
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let activated = self.state.restore(&state.common, &interrupt)?;
        if activated {
            self.state.kick(&*interrupt);
        }
        Ok(())
    }

    /// Device reset (the driver wrote 0 to Status): the device gives back its context;
    /// queues, features, selectors, interrupt status and `DEVICE_NEEDS_RESET` are cleared;
    /// ConfigGeneration moves on (the device's configuration is back to its defaults).
    pub fn reset(&mut self) {
        self.state.reset();
        self.interrupt.clear();
        self.interrupt.bump_config_generation();
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.state.device_type,
            regs::VENDOR_ID => self.vendor_id,
            regs::DEVICE_FEATURES => self.state.device_features_window(),
            regs::QUEUE_NUM_MAX => self
                .state
                .selected_ref()
                .map_or(0, |s| u32::from(s.queue.max_size())),
            regs::QUEUE_READY => self.state.selected_ref().map_or(0, |s| u32::from(s.ready)),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.status(),
            // No shared memory regions: a length and base of -1.
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH | regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => {
                u32::MAX
            }
            regs::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => 0,
        }
    }
}

impl<M: VirtioMemory> MutDeviceMmio for MmioTransport<M> {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if let Some(config) = offset.checked_sub(CONFIG_SPACE_OFFSET) {
            if !config_access_ok(config, data.len()) {
                data.fill(0xFF);
                return;
            }
            // An 8-byte access is two 32-bit ones (virtio 1.2 §4.2.2.2).
            self.state.read_config(config, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            log::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0xFF);
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if let Some(config) = offset.checked_sub(CONFIG_SPACE_OFFSET) {
            if config_access_ok(config, data.len()) {
                self.state.write_config(config, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestMemoryMmap;
    use vmkit_irq::CountingLine;

    const ACK: u32 = S_ACKNOWLEDGE;
    const DRV: u32 = S_DRIVER;
    const FOK: u32 = S_FEATURES_OK;
    const DOK: u32 = S_DRIVER_OK;
    const MEM: usize = 0x10_0000;
    const BASE: MmioAddress = MmioAddress(0xD000_0000);

    /// A two-queue device recording what the transport does to it.
    #[derive(Default)]
    struct Probe {
        config: [u8; 8],
        acked: Option<u64>,
        active: Option<ActivateContext>,
        processed: Arc<AtomicUsize>,
        resets: usize,
        refuse: bool,
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
        fn ack_features(&mut self, features: u64) {
            self.acked = Some(features);
        }
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
            if self.refuse {
                return Err(ActivateError::MissingQueue(0));
            }
            self.active = Some(ctx);
            Ok(())
        }
        fn process_queue(&mut self, _index: u16) {
            self.processed.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&mut self) -> Option<ActivateContext> {
            self.resets += 1;
            self.acked = None;
            self.active.take()
        }
    }

    struct T {
        mmio: MmioTransport,
        dev: Arc<Mutex<Probe>>,
    }

    fn transport_with(probe: Probe) -> T {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let dev = Arc::new(Mutex::new(probe));
        let mmio = MmioTransport::new(dev.clone(), mem, Arc::new(CountingLine::new())).unwrap();
        T { mmio, dev }
    }

    fn transport() -> T {
        transport_with(Probe::default())
    }

    impl T {
        fn r(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.mmio.mmio_read(BASE, offset, &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, offset: u64, v: u32) {
            self.mmio.mmio_write(BASE, offset, &v.to_le_bytes());
        }
        fn features(&mut self, f: u64) {
            self.w(regs::DRIVER_FEATURES_SEL, 0);
            self.w(regs::DRIVER_FEATURES, f as u32);
            self.w(regs::DRIVER_FEATURES_SEL, 1);
            self.w(regs::DRIVER_FEATURES, (f >> 32) as u32);
        }
        fn negotiate(&mut self) {
            self.w(regs::STATUS, ACK);
            self.w(regs::STATUS, ACK | DRV);
            self.features(FEATURE_VERSION_1 | 1);
            self.w(regs::STATUS, ACK | DRV | FOK);
            assert_eq!(self.r(regs::STATUS), ACK | DRV | FOK);
        }
        fn queue(&mut self, index: u32, size: u32, desc: u64, avail: u64, used: u64) {
            self.w(regs::QUEUE_SEL, index);
            self.w(regs::QUEUE_NUM, size);
            self.w(regs::QUEUE_DESC_LOW, desc as u32);
            self.w(regs::QUEUE_DESC_HIGH, (desc >> 32) as u32);
            self.w(regs::QUEUE_DRIVER_LOW, avail as u32);
            self.w(regs::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
            self.w(regs::QUEUE_DEVICE_LOW, used as u32);
            self.w(regs::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
            self.w(regs::QUEUE_READY, 1);
        }
        fn good_queue(&mut self) {
            self.queue(0, 16, 0x1000, 0x2000, 0x3000);
        }
        fn driver_ok(&mut self) -> u32 {
            let s = self.r(regs::STATUS);
            self.w(regs::STATUS, s | DOK);
            self.r(regs::STATUS)
        }
        fn needs_reset(&mut self) -> bool {
            self.r(regs::STATUS) & S_NEEDS_RESET != 0
        }
    }

    #[test]
    fn identity_registers() {
        let mut t = transport();
        assert_eq!(t.r(regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(t.r(regs::VERSION), 2);
        assert_eq!(t.r(regs::DEVICE_ID), 0x1A);
        assert_eq!(t.r(regs::VENDOR_ID), 0);
        assert_eq!(t.r(regs::SHM_LEN_LOW), u32::MAX);
        assert_eq!(t.r(regs::SHM_BASE_HIGH), u32::MAX);
        assert_eq!(t.r(regs::CONFIG_GENERATION), 0);
    }

    #[test]
    fn feature_select_windows() {
        let mut t = transport();
        t.w(regs::DEVICE_FEATURES_SEL, 0);
        assert_eq!(t.r(regs::DEVICE_FEATURES), 0b101 | (3 << 28));
        t.w(regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(t.r(regs::DEVICE_FEATURES), 1); // VERSION_1
        t.w(regs::DEVICE_FEATURES_SEL, 2);
        assert_eq!(t.r(regs::DEVICE_FEATURES), 0);
        t.w(regs::DEVICE_FEATURES_SEL, u32::MAX);
        assert_eq!(t.r(regs::DEVICE_FEATURES), 0);
    }

    #[test]
    fn features_only_between_driver_and_features_ok() {
        let mut t = transport();
        t.features(FEATURE_VERSION_1); // before DRIVER: ignored
        assert_eq!(t.mmio.driver_features(), 0);
        t.w(regs::STATUS, ACK | DRV);
        t.w(regs::DRIVER_FEATURES_SEL, 2);
        t.w(regs::DRIVER_FEATURES, 0xFFFF_FFFF); // no such window
        assert_eq!(t.mmio.driver_features(), 0);
        t.features(FEATURE_VERSION_1 | 4);
        t.w(regs::STATUS, ACK | DRV | FOK);
        assert_eq!(t.r(regs::STATUS), ACK | DRV | FOK);
        assert_eq!(t.dev.lock().unwrap().acked, Some(FEATURE_VERSION_1 | 4));
        t.features(FEATURE_VERSION_1 | 1); // after FEATURES_OK: ignored
        assert_eq!(t.mmio.driver_features(), FEATURE_VERSION_1 | 4);
    }

    #[test]
    fn features_ok_refused_for_unoffered_features() {
        let mut t = transport();
        t.w(regs::STATUS, ACK | DRV);
        t.features(FEATURE_VERSION_1 | 2); // bit 1 not offered
        t.w(regs::STATUS, ACK | DRV | FOK);
        assert_eq!(t.r(regs::STATUS), ACK | DRV, "FEATURES_OK reads back clear");
        assert_eq!(t.dev.lock().unwrap().acked, None);
        // The driver may try again with a valid set.
        t.features(FEATURE_VERSION_1);
        t.w(regs::STATUS, ACK | DRV | FOK);
        assert_eq!(t.r(regs::STATUS), ACK | DRV | FOK);
    }

    #[test]
    fn features_ok_refused_without_version_1() {
        let mut t = transport();
        t.w(regs::STATUS, ACK | DRV);
        t.features(1);
        t.w(regs::STATUS, ACK | DRV | FOK);
        assert_eq!(t.r(regs::STATUS) & FOK, 0);
    }

    #[test]
    fn features_ok_refused_before_driver() {
        let mut t = transport();
        t.w(regs::STATUS, ACK | FOK);
        assert_eq!(t.r(regs::STATUS), ACK);
    }

    #[test]
    fn driver_ok_without_features_ok_needs_reset() {
        let mut t = transport();
        t.w(regs::STATUS, ACK | DRV);
        t.good_queue();
        t.w(regs::STATUS, ACK | DRV | DOK);
        assert_eq!(t.r(regs::STATUS), ACK | DRV | S_NEEDS_RESET);
        assert!(!t.mmio.is_activated());
        assert!(t.dev.lock().unwrap().active.is_none());
        // Reset recovers.
        t.w(regs::STATUS, 0);
        assert_eq!(t.r(regs::STATUS), 0);
        t.negotiate();
        t.good_queue();
        assert_eq!(t.driver_ok(), ACK | DRV | FOK | DOK);
    }

    #[test]
    fn activation_hands_over_ready_queues() {
        let mut t = transport();
        t.negotiate();
        t.good_queue();
        assert_eq!(t.driver_ok(), ACK | DRV | FOK | DOK);
        let dev = t.dev.lock().unwrap();
        let ctx = dev.active.as_ref().unwrap();
        assert_eq!(ctx.queues().count(), 1);
        let q = ctx.queue(0).unwrap().state();
        assert_eq!(
            (q.size, q.desc_table, q.avail_ring, q.used_ring),
            (16, 0x1000, 0x2000, 0x3000)
        );
        assert!(!q.event_idx_enabled);
        assert_eq!(ctx.features(), FEATURE_VERSION_1 | 1);
    }

    #[test]
    fn activation_refused_by_device_needs_reset() {
        let mut t = transport_with(Probe {
            refuse: true,
            ..Default::default()
        });
        t.negotiate();
        t.good_queue();
        assert_eq!(t.driver_ok() & (DOK | S_NEEDS_RESET), S_NEEDS_RESET);
    }

    #[test]
    fn queue_outside_ram_needs_reset() {
        for (desc, avail, used) in [
            (MEM as u64, 0x2000, 0x3000),
            (0x1000, MEM as u64 - 2, 0x3000),
            (0x1000, 0x2000, MEM as u64 - 8),
            (0xFFFF_FFFF_FFFF_FFF0, 0x2000, 0x3000),
        ] {
            let mut t = transport();
            t.negotiate();
            t.queue(0, 16, desc, avail, used);
            assert_eq!(t.driver_ok() & (DOK | S_NEEDS_RESET), S_NEEDS_RESET);
            assert!(!t.mmio.is_activated());
        }
    }

    #[test]
    fn misaligned_queue_needs_reset() {
        for (desc, avail, used) in [
            (0x1008, 0x2000, 0x3000),
            (0x1000, 0x2001, 0x3000),
            (0x1000, 0x2000, 0x3002),
        ] {
            let mut t = transport();
            t.negotiate();
            t.queue(0, 16, desc, avail, used);
            assert!(
                t.driver_ok() & S_NEEDS_RESET != 0,
                "{desc:#x} {avail:#x} {used:#x}"
            );
        }
        // Corrected before QueueReady: fine.
        let mut t = transport();
        t.negotiate();
        t.w(regs::QUEUE_DESC_LOW, 0x1004);
        t.good_queue();
        assert_eq!(t.driver_ok(), ACK | DRV | FOK | DOK);
    }

    #[test]
    fn bad_queue_sizes_need_reset() {
        for size in [0u32, 3, 24, 512, 0x1_0000 + 16] {
            let mut t = transport();
            t.negotiate();
            t.queue(0, size, 0x1000, 0x2000, 0x3000);
            assert!(t.driver_ok() & S_NEEDS_RESET != 0, "size {size}");
        }
        // A bad size on a queue the driver does not make ready does not matter.
        let mut t = transport();
        t.negotiate();
        t.w(regs::QUEUE_SEL, 1);
        t.w(regs::QUEUE_NUM, 3);
        t.good_queue();
        assert_eq!(t.driver_ok(), ACK | DRV | FOK | DOK);
    }

    #[test]
    fn queue_num_max_and_selection() {
        let mut t = transport();
        t.w(regs::QUEUE_SEL, 0);
        assert_eq!(t.r(regs::QUEUE_NUM_MAX), 256);
        t.w(regs::QUEUE_SEL, 1);
        assert_eq!(t.r(regs::QUEUE_NUM_MAX), 16);
        t.w(regs::QUEUE_SEL, 2);
        assert_eq!(t.r(regs::QUEUE_NUM_MAX), 0);
        t.w(regs::QUEUE_READY, 1); // nonexistent queue: ignored
        assert_eq!(t.r(regs::QUEUE_READY), 0);
        t.w(regs::QUEUE_SEL, u32::MAX);
        assert_eq!(t.r(regs::QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn queue_config_locked_while_ready_and_after_driver_ok() {
        let mut t = transport();
        t.negotiate();
        t.good_queue();
        // Ready: configuration writes are ignored.
        t.w(regs::QUEUE_DESC_LOW, 0x8000);
        t.w(regs::QUEUE_NUM, 3);
        t.w(regs::QUEUE_SEL, 1);
        t.queue(1, 16, 0x4000, 0x5000, 0x6000);
        assert_eq!(t.driver_ok(), ACK | DRV | FOK | DOK);
        {
            let dev = t.dev.lock().unwrap();
            let ctx = dev.active.as_ref().unwrap();
            assert_eq!(ctx.queue(0).unwrap().state().desc_table, 0x1000);
            assert_eq!(ctx.queue(0).unwrap().size(), 16);
        }
        // After DRIVER_OK nothing changes, and QueueReady=1 is ignored.
        t.w(regs::QUEUE_SEL, 1);
        t.w(regs::QUEUE_READY, 0);
        assert_eq!(t.r(regs::QUEUE_READY), 0, "reads back what was written");
        t.w(regs::QUEUE_READY, 1);
        assert_eq!(t.r(regs::QUEUE_READY), 0);
        t.w(regs::QUEUE_NUM, 8);
        assert_eq!(
            t.dev
                .lock()
                .unwrap()
                .active
                .as_ref()
                .unwrap()
                .queues()
                .count(),
            2
        );
    }

    #[test]
    fn notify_signals_only_active_queues() {
        let mut t = transport();
        let handler_fds: Vec<_> = t
            .mmio
            .queue_notifiers(0)
            .iter()
            .map(|n| n.eventfd.try_clone().unwrap())
            .collect();
        // Before activation: ignored.
        t.w(regs::QUEUE_NOTIFY, 0);
        assert!(handler_fds[0].read().is_err());
        t.negotiate();
        t.good_queue();
        t.driver_ok();
        t.w(regs::QUEUE_NOTIFY, 0);
        assert_eq!(handler_fds[0].read().unwrap(), 1);
        // Configured but not ready queue 1, out of range 2 and huge: ignored.
        t.w(regs::QUEUE_NOTIFY, 1);
        t.w(regs::QUEUE_NOTIFY, 2);
        t.w(regs::QUEUE_NOTIFY, u32::MAX);
        assert!(handler_fds[1].read().is_err());
        assert!(handler_fds[0].read().is_err());
    }

    #[test]
    fn queue_event_handler_runs_the_device() {
        let mut t = transport();
        let processed = t.dev.lock().unwrap().processed.clone();
        let mut handler = t.mmio.queue_event_handler().unwrap();
        t.negotiate();
        t.good_queue();
        t.driver_ok();
        assert_eq!(handler.poll(), 0);
        t.w(regs::QUEUE_NOTIFY, 0);
        t.w(regs::QUEUE_NOTIFY, 0);
        assert_eq!(handler.poll(), 1, "two notifications, one run");
        assert_eq!(processed.load(Ordering::SeqCst), 1);

        let mut em = event_manager::EventManager::<QueueEventHandler>::new().unwrap();
        event_manager::SubscriberOps::add_subscriber(&mut em, handler);
        t.w(regs::QUEUE_NOTIFY, 0);
        assert_eq!(em.run_with_timeout(0).unwrap(), 1);
        assert_eq!(processed.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn ioeventfd_list() {
        let t = transport();
        let n = t.mmio.queue_notifiers(0xD000_0000);
        assert_eq!(n.len(), 2);
        assert_eq!((n[0].queue, n[0].addr, n[0].datamatch), (0, 0xD000_0050, 0));
        assert_eq!((n[1].queue, n[1].addr, n[1].datamatch), (1, 0xD000_0050, 1));
        assert!(t.mmio.queue_notifiers(u64::MAX).is_empty());
    }

    #[test]
    fn read_only_registers_ignore_writes() {
        let mut t = transport();
        for reg in [
            regs::MAGIC_VALUE,
            regs::VERSION,
            regs::DEVICE_ID,
            regs::VENDOR_ID,
            regs::DEVICE_FEATURES,
            regs::QUEUE_NUM_MAX,
            regs::INTERRUPT_STATUS,
            regs::CONFIG_GENERATION,
            regs::SHM_LEN_LOW,
            0x0fc - 4,
        ] {
            t.w(reg, 0xDEAD_BEEF);
        }
        assert_eq!(t.r(regs::MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(t.r(regs::DEVICE_ID), 0x1A);
        assert_eq!(t.r(regs::QUEUE_NUM_MAX), 256);
        assert_eq!(t.r(regs::INTERRUPT_STATUS), 0);
        assert_eq!(t.r(regs::CONFIG_GENERATION), 0);
        // Write-only registers read as 0.
        assert_eq!(t.r(regs::QUEUE_NUM), 0);
        assert_eq!(t.r(regs::QUEUE_NOTIFY), 0);
    }

    #[test]
    fn wrong_width_and_misaligned_register_accesses() {
        let mut t = transport();
        for len in [1usize, 2, 3, 8] {
            let mut data = vec![0u8; len];
            t.mmio.mmio_read(BASE, regs::MAGIC_VALUE, &mut data);
            assert!(data.iter().all(|b| *b == 0xFF), "{len}-byte read");
        }
        let mut data = [0u8; 4];
        t.mmio.mmio_read(BASE, regs::MAGIC_VALUE + 1, &mut data);
        assert_eq!(data, [0xFF; 4]);
        // A byte write to Status and a misaligned one do nothing.
        t.mmio.mmio_write(BASE, regs::STATUS, &[ACK as u8]);
        t.mmio.mmio_write(BASE, regs::STATUS + 2, &[1, 0, 0, 0]);
        t.mmio
            .mmio_write(BASE, regs::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(t.r(regs::STATUS), 0);
        t.mmio.mmio_write(BASE, regs::STATUS, &[]);
        t.mmio.mmio_read(BASE, regs::STATUS, &mut []);
    }

    #[test]
    fn config_space_widths() {
        let mut t = transport();
        t.dev.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8];
        let c = CONFIG_SPACE_OFFSET;
        let mut b1 = [0u8; 1];
        t.mmio.mmio_read(BASE, c + 3, &mut b1);
        assert_eq!(b1, [4]);
        let mut b2 = [0u8; 2];
        t.mmio.mmio_read(BASE, c + 2, &mut b2);
        assert_eq!(b2, [3, 4]);
        let mut b8 = [0u8; 8];
        t.mmio.mmio_read(BASE, c, &mut b8);
        assert_eq!(b8, [1, 2, 3, 4, 5, 6, 7, 8]);
        // Misaligned or odd widths: 0xFF, writes ignored.
        t.mmio.mmio_read(BASE, c + 1, &mut b2);
        assert_eq!(b2, [0xFF; 2]);
        let mut b3 = [0u8; 3];
        t.mmio.mmio_read(BASE, c, &mut b3);
        assert_eq!(b3, [0xFF; 3]);
        t.mmio.mmio_write(BASE, c + 2, &[9, 9, 9, 9]);
        t.mmio.mmio_write(BASE, c, &[9, 9, 9]);
        assert_eq!(t.dev.lock().unwrap().config, [1, 2, 3, 4, 5, 6, 7, 8]);
        t.mmio
            .mmio_write(BASE, c, &[10, 20, 30, 40, 50, 60, 70, 80]);
        assert_eq!(
            t.dev.lock().unwrap().config,
            [10, 20, 30, 40, 50, 60, 70, 80]
        );
        // Past the device's config: zeros; far past the region: still no panic.
        let mut b4 = [0u8; 4];
        t.mmio.mmio_read(BASE, c + 0x100, &mut b4);
        assert_eq!(b4, [0; 4]);
        t.mmio.mmio_read(BASE, u64::MAX - 3, &mut b4);
        t.mmio.mmio_write(BASE, u64::MAX - 3, &b4);
    }

    #[test]
    fn status_bits_cannot_be_cleared_without_reset() {
        let mut t = transport();
        t.negotiate();
        t.w(regs::STATUS, ACK);
        assert_eq!(t.r(regs::STATUS), ACK | DRV | FOK);
        // Writing back DEVICE_NEEDS_RESET is harmless; FAILED sticks.
        t.w(regs::STATUS, ACK | DRV | FOK | S_NEEDS_RESET | S_FAILED);
        assert_eq!(t.r(regs::STATUS), ACK | DRV | FOK | S_FAILED);
    }

    #[test]
    fn reset_clears_everything() {
        let mut t = transport();
        t.negotiate();
        t.good_queue();
        t.driver_ok();
        t.mmio
            .interrupt()
            .trigger(crate::InterruptReason::Queue(0))
            .unwrap();
        t.mmio
            .interrupt()
            .trigger(crate::InterruptReason::Config)
            .unwrap();
        assert_eq!(t.r(regs::INTERRUPT_STATUS), 3);
        let gen = t.r(regs::CONFIG_GENERATION);
        t.w(regs::INTERRUPT_ACK, 1);
        assert_eq!(t.r(regs::INTERRUPT_STATUS), 2);
        t.dev
            .lock()
            .unwrap()
            .active
            .as_ref()
            .unwrap()
            .set_needs_reset();
        assert!(t.needs_reset());
        t.w(regs::QUEUE_SEL, 1);

        t.w(regs::STATUS, 0);
        assert_eq!(t.r(regs::STATUS), 0);
        assert_eq!(t.r(regs::INTERRUPT_STATUS), 0);
        assert!(t.r(regs::CONFIG_GENERATION) > gen);
        assert!(!t.mmio.is_activated());
        assert_eq!(t.mmio.driver_features(), 0);
        {
            let dev = t.dev.lock().unwrap();
            assert!(dev.active.is_none());
            assert_eq!(dev.acked, None);
            assert_eq!(dev.resets, 1);
        }
        // Selectors back to 0, queues unconfigured.
        assert_eq!(t.r(regs::QUEUE_NUM_MAX), 256);
        assert_eq!(t.r(regs::QUEUE_READY), 0);
        // The next session starts clean.
        t.negotiate();
        t.good_queue();
        assert_eq!(t.driver_ok(), ACK | DRV | FOK | DOK);
    }

    #[test]
    fn invalid_device_queue_sizes_are_refused() {
        struct Bad(Vec<u16>);
        impl VirtioDevice for Bad {
            fn device_type(&self) -> u32 {
                1
            }
            fn queue_max_sizes(&self) -> &[u16] {
                &self.0
            }
            fn device_features(&self) -> u64 {
                0
            }
            fn ack_features(&mut self, _: u64) {}
            fn read_config(&self, _: u64, _: &mut [u8]) {}
            fn write_config(&mut self, _: u64, _: &[u8]) {}
            fn activate(&mut self, _: ActivateContext) -> std::result::Result<(), ActivateError> {
                Ok(())
            }
            fn reset(&mut self) -> Option<ActivateContext> {
                None
            }
        }
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        for sizes in [vec![0u16], vec![256, 3], vec![65535]] {
            let err = MmioTransport::new(
                Arc::new(Mutex::new(Bad(sizes))),
                mem.clone(),
                Arc::new(CountingLine::new()),
            )
            .unwrap_err();
            assert!(matches!(err, Error::InvalidQueueMaxSize { .. }), "{err}");
        }
    }
}
