//! The harness on virtio-pci: virtio-drivers' `PciRoot` enumerates our bus through our
//! port or ECAM configuration handlers, and a `Transport` mirroring virtio-drivers'
//! `PciTransport` register sequences drives the device through our BAR window.

use std::fmt;
use std::mem::size_of;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventManager, SubscriberOps};
use virtio_drivers::transport::pci::bus::{
    Command, ConfigurationAccess, DeviceFunction, PciRoot, PCI_CAP_ID_VNDR,
};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport as DriversPciTransport};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error as DriverError, PhysAddr, PAGE_SIZE};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::{MutDeviceMmio, MutDevicePio};
use vm_memory::GuestMemoryMmap;
use vmkit_bus::IoBus;
use vmkit_irq::{CountingLine, RecordingSink};
use vmkit_pci::{AllowAll, PciBus, PciConfigIo, PciConfigMmio, PCI_CONFIG_IO_PORT};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::guest_memory;
use super::hal::GuestHal;
use super::harness::HARNESS_DMA_BASE;
use crate::pci::{common_cfg as cc, PciTransport};
use crate::{PciTransportState, QueueEventHandler, VirtioDevice};

/// Where the harness's ECAM window would be (only passed as `base`).
pub const HARNESS_ECAM_BASE: u64 = 0xE000_0000;
/// The harness's BAR window: BAR 0 of the device starts at its bottom.
pub const HARNESS_PCI_WINDOW: std::ops::RangeInclusive<u64> = 0xC000_0000..=0xDFFF_FFFF;
/// The slot the harness puts the device in (00:03.0).
pub const HARNESS_PCI_SLOT: u8 = 3;

const DEFAULT_MEMORY: usize = 16 << 20;

/// How virtio-drivers reaches configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CamKind {
    /// Ports 0xCF8/0xCFC (256 bytes a function).
    Ports,
    /// ECAM (4 KiB a function).
    Ecam,
}

/// virtio-drivers' [`ConfigurationAccess`] over our [`PciConfigIo`] or [`PciConfigMmio`]
/// handlers, with the accesses a CPU would make.
#[derive(Clone)]
pub struct HarnessCam {
    kind: CamKind,
    io: Arc<Mutex<PciConfigIo>>,
    ecam: Arc<Mutex<PciConfigMmio>>,
}

impl fmt::Debug for HarnessCam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HarnessCam")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl HarnessCam {
    fn ecam_offset(df: DeviceFunction, reg: u8) -> u64 {
        (u64::from(df.bus) << 20)
            | (u64::from(df.device) << 15)
            | (u64::from(df.function) << 12)
            | u64::from(reg)
    }

    fn address(df: DeviceFunction, reg: u8) -> u32 {
        0x8000_0000
            | (u32::from(df.bus) << 16)
            | (u32::from(df.device) << 11)
            | (u32::from(df.function) << 8)
            | u32::from(reg & 0xFC)
    }
}

impl ConfigurationAccess for HarnessCam {
    fn read_word(&self, df: DeviceFunction, reg: u8) -> u32 {
        let mut b = [0u8; 4];
        match self.kind {
            CamKind::Ecam => self.ecam.lock().unwrap().mmio_read(
                MmioAddress(HARNESS_ECAM_BASE),
                Self::ecam_offset(df, reg),
                &mut b,
            ),
            CamKind::Ports => {
                let mut io = self.io.lock().unwrap();
                let base = PioAddress(PCI_CONFIG_IO_PORT);
                io.pio_write(base, 0, &Self::address(df, reg).to_le_bytes());
                io.pio_read(base, 4, &mut b);
            }
        }
        u32::from_le_bytes(b)
    }

    fn write_word(&mut self, df: DeviceFunction, reg: u8, data: u32) {
        match self.kind {
            CamKind::Ecam => self.ecam.lock().unwrap().mmio_write(
                MmioAddress(HARNESS_ECAM_BASE),
                Self::ecam_offset(df, reg),
                &data.to_le_bytes(),
            ),
            CamKind::Ports => {
                let mut io = self.io.lock().unwrap();
                let base = PioAddress(PCI_CONFIG_IO_PORT);
                io.pio_write(base, 0, &Self::address(df, reg).to_le_bytes());
                io.pio_write(base, 4, &data.to_le_bytes());
            }
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        self.clone()
    }
}

/// A device on our virtio-pci transport, on our PCI bus, driven in-process by
/// virtio-drivers: the PCI counterpart of [`Harness`](super::Harness), sharing its
/// [`GuestHal`] and guest memory set-up.
///
/// [`transport`](Self::transport) enumerates bus 0 with virtio-drivers' `PciRoot` (through
/// the port or ECAM handler), checks that virtio-drivers' own `PciTransport::new` accepts
/// the device's capabilities and BAR, turns on memory decoding and bus mastering, and
/// returns a [`PciHarnessTransport`]. virtio-drivers' `PciTransport` itself cannot drive
/// the device in-process: it dereferences pointers to the BAR, and nothing here traps
/// those accesses the way a vCPU's MMIO exit does, so `PciHarnessTransport` makes the
/// same register accesses through our BAR window instead.
pub struct PciHarness {
    /// Bumped when [`restore_transport`](Self::restore_transport) puts a new transport in.
    epoch: Arc<AtomicUsize>,
    memory: GuestMemoryMmap,
    vm_bus: Arc<IoBus>,
    bus: Arc<PciBus>,
    device: Arc<Mutex<PciTransport>>,
    io: Arc<Mutex<PciConfigIo>>,
    ecam: Arc<Mutex<PciConfigMmio>>,
    sink: Arc<RecordingSink>,
    intx: Arc<CountingLine>,
}

impl fmt::Debug for PciHarness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciHarness").finish_non_exhaustive()
    }
}

impl PciHarness {
    /// A harness with 16 MiB of guest memory.
    ///
    /// # Panics
    ///
    /// If the transport cannot be built or another harness lives on this thread.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let memory = guest_memory(DEFAULT_MEMORY);
        let sink = RecordingSink::new();
        let intx = Arc::new(CountingLine::new());
        let pci = PciTransport::new(
            device,
            memory.clone(),
            sink.clone(),
            *HARNESS_PCI_WINDOW.start(),
        )
        .expect("failed to build the virtio-pci transport")
        .with_intx(intx.clone());
        let device = Arc::new(Mutex::new(pci));
        let vm_bus = Arc::new(IoBus::new());
        let bus = Arc::new(
            PciBus::new(&vm_bus, HARNESS_PCI_WINDOW, Arc::new(AllowAll)).expect("PCI bus"),
        );
        bus.add_device_at(HARNESS_PCI_SLOT, device.clone())
            .expect("PCI slot");
        let pages = (DEFAULT_MEMORY - HARNESS_DMA_BASE as usize) / PAGE_SIZE;
        GuestHal::install(memory.clone(), HARNESS_DMA_BASE, pages);
        Self {
            epoch: Arc::new(AtomicUsize::new(0)),
            memory,
            io: Arc::new(Mutex::new(PciConfigIo::new(bus.clone()))),
            ecam: Arc::new(Mutex::new(PciConfigMmio::new(bus.clone()))),
            vm_bus,
            bus,
            device,
            sink,
            intx,
        }
    }

    /// virtio-drivers' view of our configuration space.
    pub fn cam(&self, kind: CamKind) -> HarnessCam {
        HarnessCam {
            kind,
            io: self.io.clone(),
            ecam: self.ecam.clone(),
        }
    }

    /// Enumerates bus 0 through `kind`, finds the virtio device, checks virtio-drivers'
    /// `PciTransport::new` accepts it, enables it, and returns a transport for a driver.
    ///
    /// # Panics
    ///
    /// If enumeration does not find exactly the host bridge and one virtio device, or
    /// virtio-drivers refuses the capabilities.
    pub fn transport(&self, kind: CamKind) -> PciHarnessTransport {
        let mut root = PciRoot::new(self.cam(kind));
        let found: Vec<_> = root.enumerate_bus(0).collect();
        assert_eq!(found.len(), 2, "host bridge and the device: {found:?}");
        let (df, info) = found
            .into_iter()
            .find(|(_, info)| virtio_device_type(info).is_some())
            .expect("no virtio device on bus 0");
        assert_eq!(df.device, HARNESS_PCI_SLOT);
        let device_type = virtio_device_type(&info).expect("virtio device type");
        // virtio-drivers' own parser must accept our capabilities and BAR (it maps them
        // through the HAL's scratch memory; its Drop resets that scratch copy only).
        drop(
            DriversPciTransport::new::<GuestHal, _>(&mut root, df)
                .expect("virtio-drivers refused our device"),
        );
        root.set_command(df, Command::MEMORY_SPACE | Command::BUS_MASTER);
        PciHarnessTransport::new(
            root,
            self.cam(kind),
            df,
            device_type,
            self.vm_bus.clone(),
            self.device.clone(),
            self.epoch.clone(),
        )
    }

    /// Our device.
    pub fn device(&self) -> MutexGuard<'_, PciTransport> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot restore in-process: builds a new transport for `device` over the same
    /// guest memory, MSI sink and INTx line, restores `state` into it (see
    /// [`PciTransport::restore`]), puts it in the bus slot in place of the current one and
    /// has the bus map its BARs where the state says. A driver on a
    /// [`PciHarnessTransport`] carries on with it.
    ///
    /// # Errors
    ///
    /// What `PciTransport::new` or `restore` returns; the current transport then stays.
    pub fn restore_transport(
        &self,
        device: Arc<Mutex<dyn VirtioDevice>>,
        state: &PciTransportState,
    ) -> crate::Result<()> {
        let mut pci = PciTransport::new(
            device,
            self.memory.clone(),
            self.sink.clone(),
            *HARNESS_PCI_WINDOW.start(),
        )?
        .with_intx(self.intx.clone());
        pci.restore(state)?;
        *self.device() = pci;
        self.bus.refresh_mappings(HARNESS_PCI_SLOT);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Our PCI bus.
    pub fn bus(&self) -> &Arc<PciBus> {
        &self.bus
    }

    /// The bus the device's BAR is registered on (where a vCPU's accesses would go).
    pub fn vm_bus(&self) -> &Arc<IoBus> {
        &self.vm_bus
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// What the MSI-X sink heard.
    pub fn sink(&self) -> &Arc<RecordingSink> {
        &self.sink
    }

    /// How many times the device raised INTx (interrupts while MSI-X is disabled).
    pub fn intx_interrupts(&self) -> u64 {
        self.intx.count()
    }
}

impl Drop for PciHarness {
    fn drop(&mut self) {
        GuestHal::uninstall();
    }
}

/// The virtio structures' places, as the capabilities say.
#[derive(Clone, Copy, Debug, Default)]
struct Regions {
    common: u64,
    notify: u64,
    notify_multiplier: u32,
    isr: u64,
    device: u64,
    device_len: u64,
}

/// virtio-drivers' [`Transport`] with the register accesses of its `PciTransport` (same
/// fields, same widths, same order), made through our BAR window rather than pointers.
pub struct PciHarnessTransport {
    root: PciRoot<HarnessCam>,
    cam: HarnessCam,
    df: DeviceFunction,
    device_type: DeviceType,
    vm_bus: Arc<IoBus>,
    device: Arc<Mutex<PciTransport>>,
    epoch: Arc<AtomicUsize>,
    /// The epoch `events` watches the transport of.
    seen: usize,
    events: EventManager<QueueEventHandler>,
    regions: Regions,
    notifications: u64,
}

impl fmt::Debug for PciHarnessTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciHarnessTransport")
            .field("device_type", &self.device_type)
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

impl PciHarnessTransport {
    fn new(
        root: PciRoot<HarnessCam>,
        cam: HarnessCam,
        df: DeviceFunction,
        device_type: DeviceType,
        vm_bus: Arc<IoBus>,
        device: Arc<Mutex<PciTransport>>,
        epoch: Arc<AtomicUsize>,
    ) -> Self {
        let seen = epoch.load(Ordering::SeqCst);
        let events = Self::events_for(&device);
        let mut t = Self {
            root,
            cam,
            df,
            device_type,
            vm_bus,
            device,
            epoch,
            seen,
            events,
            regions: Regions::default(),
            notifications: 0,
        };
        t.regions = t.find_regions();
        t
    }

    fn events_for(device: &Arc<Mutex<PciTransport>>) -> EventManager<QueueEventHandler> {
        let handler = device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_event_handler()
            .expect("failed to clone the queue notifiers");
        let mut events = EventManager::new().expect("failed to create an event manager");
        events.add_subscriber(handler);
        events
    }

    /// The capability walk of virtio-drivers' `PciTransport::new`, resolved to guest
    /// physical addresses through the BAR registers.
    fn find_regions(&mut self) -> Regions {
        let cam = self.cam.clone();
        let mut r = Regions::default();
        let caps: Vec<_> = self.root.capabilities(self.df).collect();
        for cap in caps.into_iter().filter(|c| c.id == PCI_CAP_ID_VNDR) {
            let cfg_type = (cap.private_header >> 8) as u8;
            let bar = cam.read_word(self.df, cap.offset + 4) as u8;
            let offset = u64::from(cam.read_word(self.df, cap.offset + 8));
            let length = u64::from(cam.read_word(self.df, cap.offset + 12));
            let info = self
                .root
                .bar_info(self.df, bar)
                .expect("BAR info")
                .expect("BAR in use");
            let (base, _) = info.memory_address_size().expect("memory BAR");
            let addr = base + offset;
            match cfg_type {
                1 => r.common = addr,
                2 => {
                    r.notify = addr;
                    r.notify_multiplier = cam.read_word(self.df, cap.offset + 16);
                }
                3 => r.isr = addr,
                4 => {
                    r.device = addr;
                    r.device_len = length;
                }
                _ => {}
            }
        }
        r
    }

    /// The PCI root, for tests that look at configuration space.
    pub fn root(&mut self) -> &mut PciRoot<HarnessCam> {
        &mut self.root
    }

    /// Where BAR 0's common configuration is now (after a test moved the BAR, call
    /// [`rescan`](Self::rescan)).
    pub fn common_cfg_address(&self) -> u64 {
        self.regions.common
    }

    /// Reads the capabilities and BARs again.
    pub fn rescan(&mut self) {
        self.regions = self.find_regions();
    }

    /// Queue notifications the driver sent.
    pub fn notifications(&self) -> u64 {
        self.notifications
    }

    fn read(&self, addr: u64, data: &mut [u8]) {
        let _ = self.vm_bus.mmio_read(addr, data);
    }

    fn write(&self, addr: u64, data: &[u8]) {
        let _ = self.vm_bus.mmio_write(addr, data);
    }

    fn r<const N: usize>(&self, field: u64) -> [u8; N] {
        let mut b = [0u8; N];
        self.read(self.regions.common + field, &mut b);
        b
    }

    fn r8(&self, f: u64) -> u8 {
        self.r::<1>(f)[0]
    }
    fn r16(&self, f: u64) -> u16 {
        u16::from_le_bytes(self.r(f))
    }
    fn r32(&self, f: u64) -> u32 {
        u32::from_le_bytes(self.r(f))
    }
    fn w8(&self, f: u64, v: u8) {
        self.write(self.regions.common + f, &[v]);
    }
    fn w16(&self, f: u64, v: u16) {
        self.write(self.regions.common + f, &v.to_le_bytes());
    }
    fn w32(&self, f: u64, v: u32) {
        self.write(self.regions.common + f, &v.to_le_bytes());
    }
    fn w64(&self, f: u64, v: u64) {
        self.write(self.regions.common + f, &v.to_le_bytes());
    }

    /// Config space accesses as virtio-drivers' `PciTransport` makes them: one volatile
    /// access of the type's size.
    fn config(&self, offset: usize, data: &mut [u8], write: bool) -> Result<(), DriverError> {
        if self.regions.device == 0 {
            return Err(DriverError::ConfigSpaceMissing);
        }
        if offset + data.len() > self.regions.device_len as usize {
            return Err(DriverError::ConfigSpaceTooSmall);
        }
        let addr = self.regions.device + offset as u64;
        let mut at = 0;
        while at < data.len() {
            let n = match data.len() - at {
                n if n >= 8 && data.len() == 8 => 8,
                n if n >= 4 => 4,
                n if n >= 2 => 2,
                _ => 1,
            };
            if write {
                self.write(addr + at as u64, &data[at..at + n]);
            } else {
                self.read(addr + at as u64, &mut data[at..at + n]);
            }
            at += n;
        }
        Ok(())
    }

    /// Our device.
    pub fn device(&self) -> MutexGuard<'_, PciTransport> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Transport for PciHarnessTransport {
    fn device_type(&self) -> DeviceType {
        self.device_type
    }

    fn read_device_features(&mut self) -> u64 {
        self.w32(cc::DEVICE_FEATURE_SELECT, 0);
        let low = u64::from(self.r32(cc::DEVICE_FEATURE));
        self.w32(cc::DEVICE_FEATURE_SELECT, 1);
        low | (u64::from(self.r32(cc::DEVICE_FEATURE)) << 32)
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.w32(cc::DRIVER_FEATURE_SELECT, 0);
        self.w32(cc::DRIVER_FEATURE, driver_features as u32);
        self.w32(cc::DRIVER_FEATURE_SELECT, 1);
        self.w32(cc::DRIVER_FEATURE, (driver_features >> 32) as u32);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.w16(cc::QUEUE_SELECT, queue);
        self.r16(cc::QUEUE_SIZE).into()
    }

    fn notify(&mut self, queue: u16) {
        self.notifications += 1;
        let epoch = self.epoch.load(Ordering::SeqCst);
        if epoch != self.seen {
            // The harness restored a new transport: watch its queue eventfds.
            self.events = Self::events_for(&self.device);
            self.seen = epoch;
        }
        self.w16(cc::QUEUE_SELECT, queue);
        let off = u64::from(self.r16(cc::QUEUE_NOTIFY_OFF));
        let addr = self.regions.notify + off * u64::from(self.regions.notify_multiplier);
        self.write(addr, &queue.to_le_bytes());
        // What the VMM's event loop does when the ioeventfd fires.
        let _ = self.events.run_with_timeout(0);
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.r8(cc::DEVICE_STATUS).into())
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.w8(cc::DEVICE_STATUS, status.bits() as u8);
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
        self.w16(cc::QUEUE_SELECT, queue);
        self.w16(cc::QUEUE_SIZE, size as u16);
        self.w64(cc::QUEUE_DESC, descriptors);
        self.w64(cc::QUEUE_DRIVER, driver_area);
        self.w64(cc::QUEUE_DEVICE, device_area);
        self.w16(cc::QUEUE_ENABLE, 1);
    }

    fn queue_unset(&mut self, _queue: u16) {
        // As virtio-drivers' PciTransport: queues cannot be unset on PCI.
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.w16(cc::QUEUE_SELECT, queue);
        self.r16(cc::QUEUE_ENABLE) == 1
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let mut b = [0u8; 1];
        self.read(self.regions.isr, &mut b);
        InterruptStatus::from_bits_retain(b[0].into())
    }

    fn read_config_generation(&self) -> u32 {
        self.r8(cc::CONFIG_GENERATION).into()
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

impl Drop for PciHarnessTransport {
    fn drop(&mut self) {
        // As virtio-drivers' PciTransport does: reset the device.
        self.set_status(DeviceStatus::empty());
    }
}
