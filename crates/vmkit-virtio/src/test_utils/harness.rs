//! virtio-drivers' `Transport` over our `MmioTransport`'s register handlers.

use std::fmt;
use std::mem::size_of;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventManager, SubscriberOps};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error as DriverError, PhysAddr, PAGE_SIZE};
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::GuestMemoryMmap;
use vmkit_irq::CountingLine;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::guest_memory;
use super::hal::GuestHal;
use crate::mmio::{regs, CONFIG_SPACE_OFFSET, MMIO_MAGIC_VALUE, MMIO_SIZE, MMIO_VERSION};
use crate::{MmioTransport, MmioTransportState, QueueEventHandler, VirtioDevice};

/// Where the harness pretends the device's registers are (only passed as `base`).
pub const HARNESS_MMIO_BASE: u64 = 0xD000_0000;
/// Where the harness's DMA window starts in guest memory; it runs to the end of memory.
pub const HARNESS_DMA_BASE: u64 = 0x10_0000;

const DEFAULT_MEMORY: usize = 16 << 20;

/// A device on our [`MmioTransport`], driven in-process by virtio-drivers.
///
/// ```
/// # use std::sync::{Arc, Mutex};
/// # use vmkit_virtio::test_utils::{GuestHal, Harness};
/// # fn device() -> Arc<Mutex<dyn vmkit_virtio::VirtioDevice>> { panic!("your device") }
/// # fn no_run() {
/// let harness = Harness::new(device());
/// let mut rng = virtio_drivers::device::rng::VirtIORng::<GuestHal, _>::new(harness.transport())
///     .unwrap();
/// let mut buf = [0u8; 64];
/// rng.request_entropy(&mut buf).unwrap();
/// assert!(harness.interrupts() > 0);
/// # }
/// ```
///
/// Its guest memory (16 MiB by default) backs virtio-drivers' DMA through [`GuestHal`]:
/// the driver writes real descriptors and rings there, our transport validates them and
/// our device serves them. [`HarnessTransport::notify`] writes QueueNotify, which signals
/// the queue's eventfd, then runs a [`QueueEventHandler`] in an event-manager loop once,
/// so a blocking driver call completes on the test thread. One harness per thread, and
/// drop the driver before the harness.
pub struct Harness {
    memory: GuestMemoryMmap,
    mmio: Arc<Mutex<MmioTransport>>,
    line: Arc<CountingLine>,
    /// Bumped when [`restore_transport`](Self::restore_transport) puts a new transport in.
    epoch: Arc<AtomicUsize>,
}

impl fmt::Debug for Harness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Harness")
            .field("interrupts", &self.interrupts())
            .finish_non_exhaustive()
    }
}

impl Harness {
    /// A harness with 16 MiB of guest memory.
    ///
    /// # Panics
    ///
    /// If the transport cannot be built (invalid queue sizes, no eventfds) or another
    /// harness lives on this thread.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        Self::with_memory(device, DEFAULT_MEMORY)
    }

    /// A harness with `memory_size` bytes of guest memory (more than 1 MiB).
    ///
    /// # Panics
    ///
    /// As [`new`](Self::new).
    pub fn with_memory(device: Arc<Mutex<dyn VirtioDevice>>, memory_size: usize) -> Self {
        let memory = guest_memory(memory_size);
        let line = Arc::new(CountingLine::new());
        let mmio = MmioTransport::new(device, memory.clone(), line.clone())
            .expect("failed to build the MMIO transport");
        let pages = (memory_size - HARNESS_DMA_BASE as usize) / PAGE_SIZE;
        GuestHal::install(memory.clone(), HARNESS_DMA_BASE, pages);
        Self {
            memory,
            mmio: Arc::new(Mutex::new(mmio)),
            line,
            epoch: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A snapshot restore in-process: builds a new transport for `device` over the same
    /// guest memory and interrupt line, restores `state` into it (see
    /// [`MmioTransport::restore`]) and puts it in place of the current one, which is dropped.
    /// A driver on a [`HarnessTransport`] carries on with the new transport (its next
    /// notification watches the new queue eventfds).
    ///
    /// # Errors
    ///
    /// What `MmioTransport::new` or `restore` returns; the current transport then stays.
    pub fn restore_transport(
        &self,
        device: Arc<Mutex<dyn VirtioDevice>>,
        state: &MmioTransportState,
    ) -> crate::Result<()> {
        let mut mmio = MmioTransport::new(device, self.memory.clone(), self.line.clone())?;
        mmio.restore(state)?;
        *self.mmio() = mmio;
        self.epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// A virtio-drivers transport over the device's registers, for a driver's `new`.
    ///
    /// # Panics
    ///
    /// If the event manager or the eventfd clones cannot be created.
    pub fn transport(&self) -> HarnessTransport {
        HarnessTransport::new(self.mmio.clone(), self.epoch.clone())
    }

    /// Our transport.
    pub fn mmio(&self) -> MutexGuard<'_, MmioTransport> {
        self.mmio.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Our transport, shared.
    pub fn mmio_arc(&self) -> &Arc<Mutex<MmioTransport>> {
        &self.mmio
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// How many times the device raised its interrupt line.
    pub fn interrupts(&self) -> u64 {
        self.line.count()
    }

    /// Reads a 32-bit register (or config space at `0x100 + offset`) as a driver would.
    pub fn read32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio()
            .mmio_read(MmioAddress(HARNESS_MMIO_BASE), offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register as a driver would.
    pub fn write32(&self, offset: u64, value: u32) {
        self.mmio()
            .mmio_write(MmioAddress(HARNESS_MMIO_BASE), offset, &value.to_le_bytes());
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        GuestHal::uninstall();
    }
}

/// virtio-drivers' [`Transport`] implemented over [`MmioTransport`]'s MMIO handlers, the
/// register sequences mirroring virtio-drivers' own MMIO transport (modern layout).
pub struct HarnessTransport {
    mmio: Arc<Mutex<MmioTransport>>,
    epoch: Arc<AtomicUsize>,
    /// The epoch `events` watches the transport of.
    seen: usize,
    events: EventManager<QueueEventHandler>,
    device_type: DeviceType,
    notifications: u64,
}

impl fmt::Debug for HarnessTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HarnessTransport")
            .field("device_type", &self.device_type)
            .field("notifications", &self.notifications)
            .finish_non_exhaustive()
    }
}

impl HarnessTransport {
    fn new(mmio: Arc<Mutex<MmioTransport>>, epoch: Arc<AtomicUsize>) -> Self {
        let seen = epoch.load(Ordering::SeqCst);
        let events = Self::events_for(&mmio);
        let mut t = Self {
            mmio,
            epoch,
            seen,
            events,
            device_type: DeviceType::EntropySource,
            notifications: 0,
        };
        // As virtio-drivers' `MmioTransport::new_from_unique` checks.
        assert_eq!(t.read32(regs::MAGIC_VALUE), MMIO_MAGIC_VALUE, "bad magic");
        assert_eq!(
            t.read32(regs::VERSION),
            MMIO_VERSION,
            "not a version 2 device"
        );
        t.device_type =
            DeviceType::try_from(t.read32(regs::DEVICE_ID)).expect("unknown device type");
        t
    }

    fn events_for(mmio: &Arc<Mutex<MmioTransport>>) -> EventManager<QueueEventHandler> {
        let handler = mmio
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_event_handler()
            .expect("failed to clone the queue notifiers");
        let mut events = EventManager::new().expect("failed to create an event manager");
        events.add_subscriber(handler);
        events
    }

    /// Queue notifications the driver sent.
    pub fn notifications(&self) -> u64 {
        self.notifications
    }

    fn access(&self, offset: u64, data: &mut [u8], write: bool) {
        let mut mmio = self.mmio.lock().unwrap_or_else(|e| e.into_inner());
        if write {
            mmio.mmio_write(MmioAddress(HARNESS_MMIO_BASE), offset, data);
        } else {
            mmio.mmio_read(MmioAddress(HARNESS_MMIO_BASE), offset, data);
        }
    }

    fn read32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.access(offset, &mut b, false);
        u32::from_le_bytes(b)
    }

    fn write32(&mut self, offset: u64, value: u32) {
        let mut b = value.to_le_bytes();
        self.access(offset, &mut b, true);
    }

    /// Config space accesses as a CPU would make them for a `T`: one access of its size
    /// when that is 1, 2, 4 or 8 bytes, else 4-byte then 1-byte pieces.
    fn config(&self, offset: usize, data: &mut [u8], write: bool) -> Result<(), DriverError> {
        let end = offset
            .checked_add(data.len())
            .ok_or(DriverError::ConfigSpaceTooSmall)?;
        if end as u64 > MMIO_SIZE - CONFIG_SPACE_OFFSET {
            return Err(DriverError::ConfigSpaceTooSmall);
        }
        let base = CONFIG_SPACE_OFFSET + offset as u64;
        if matches!(data.len(), 1 | 2 | 4 | 8) {
            self.access(base, data, write);
            return Ok(());
        }
        let mut at = 0;
        while at < data.len() {
            let n = if data.len() - at >= 4 { 4 } else { 1 };
            self.access(base + at as u64, &mut data[at..at + n], write);
            at += n;
        }
        Ok(())
    }
}

impl Transport for HarnessTransport {
    fn device_type(&self) -> DeviceType {
        self.device_type
    }

    fn read_device_features(&mut self) -> u64 {
        self.write32(regs::DEVICE_FEATURES_SEL, 0);
        let low = u64::from(self.read32(regs::DEVICE_FEATURES));
        self.write32(regs::DEVICE_FEATURES_SEL, 1);
        let high = u64::from(self.read32(regs::DEVICE_FEATURES));
        low | (high << 32)
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.write32(regs::DRIVER_FEATURES_SEL, 0);
        self.write32(regs::DRIVER_FEATURES, driver_features as u32);
        self.write32(regs::DRIVER_FEATURES_SEL, 1);
        self.write32(regs::DRIVER_FEATURES, (driver_features >> 32) as u32);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.write32(regs::QUEUE_SEL, queue.into());
        self.read32(regs::QUEUE_NUM_MAX)
    }

    fn notify(&mut self, queue: u16) {
        self.notifications += 1;
        let epoch = self.epoch.load(Ordering::SeqCst);
        if epoch != self.seen {
            // The harness restored a new transport: watch its queue eventfds.
            self.events = Self::events_for(&self.mmio);
            self.seen = epoch;
        }
        self.write32(regs::QUEUE_NOTIFY, queue.into());
        // What the VMM's event loop does when the ioeventfd fires.
        let _ = self.events.run_with_timeout(0);
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_retain(self.read32(regs::STATUS))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.write32(regs::STATUS, status.bits());
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.write32(regs::QUEUE_SEL, queue.into());
        self.write32(regs::QUEUE_NUM, size);
        self.write32(regs::QUEUE_DESC_LOW, descriptors as u32);
        self.write32(regs::QUEUE_DESC_HIGH, (descriptors >> 32) as u32);
        self.write32(regs::QUEUE_DRIVER_LOW, driver_area as u32);
        self.write32(regs::QUEUE_DRIVER_HIGH, (driver_area >> 32) as u32);
        self.write32(regs::QUEUE_DEVICE_LOW, device_area as u32);
        self.write32(regs::QUEUE_DEVICE_HIGH, (device_area >> 32) as u32);
        self.write32(regs::QUEUE_READY, 1);
    }

    fn queue_unset(&mut self, queue: u16) {
        self.write32(regs::QUEUE_SEL, queue.into());
        self.write32(regs::QUEUE_READY, 0);
        // virtio-drivers spins until it reads 0 back; a device that never clears it would
        // hang the test, so check once instead.
        assert_eq!(
            self.read32(regs::QUEUE_READY),
            0,
            "QueueReady did not read back 0"
        );
        for reg in [
            regs::QUEUE_NUM,
            regs::QUEUE_DESC_LOW,
            regs::QUEUE_DESC_HIGH,
            regs::QUEUE_DRIVER_LOW,
            regs::QUEUE_DRIVER_HIGH,
            regs::QUEUE_DEVICE_LOW,
            regs::QUEUE_DEVICE_HIGH,
        ] {
            self.write32(reg, 0);
        }
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.write32(regs::QUEUE_SEL, queue.into());
        self.read32(regs::QUEUE_READY) != 0
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let interrupt = self.read32(regs::INTERRUPT_STATUS);
        if interrupt != 0 {
            self.write32(regs::INTERRUPT_ACK, interrupt);
            InterruptStatus::from_bits_truncate(interrupt)
        } else {
            InterruptStatus::empty()
        }
    }

    fn read_config_generation(&self) -> u32 {
        self.read32(regs::CONFIG_GENERATION)
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, DriverError> {
        let mut buf = vec![0u8; size_of::<T>()];
        self.config(offset, &mut buf, false)?;
        T::read_from_bytes(&buf).map_err(|_| DriverError::ConfigSpaceTooSmall)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<(), DriverError> {
        let mut buf = value.as_bytes().to_vec();
        self.config(offset, &mut buf, true)
    }
}

impl Drop for HarnessTransport {
    fn drop(&mut self) {
        // As virtio-drivers' MMIO transport does: reset the device.
        self.set_status(DeviceStatus::empty());
    }
}
