//! The root bus: devices, configuration access through ports and ECAM, and BARs mapped on
//! the VM's bus where their registers say, when the place is acceptable.

use std::fmt;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{DeviceMmio, MutDeviceMmio, MutDevicePio};
use vmkit_bus::{mmio_range, pio_range, IoBus};

use crate::config::{
    offsets, ConfigSpace, PciBar, PciIds, COMMAND_MEMORY_SPACE, CONFIG_SPACE_SIZE,
};
use crate::{Error, Result};

/// The first configuration port: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC–0xCFF.
pub const PCI_CONFIG_IO_PORT: u16 = 0xCF8;
/// How many ports the configuration mechanism takes (0xCF8–0xCFF).
pub const PCI_CONFIG_IO_PORT_SIZE: u16 = 8;
/// ECAM: bytes per bus (32 devices × 8 functions × 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// The number of device slots on a bus.
pub const PCI_SLOTS: usize = 32;
/// The host bridge's vendor ID (Intel).
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
/// The host bridge's device ID (the one Cloud Hypervisor uses for its virtual host bridge).
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0D57;

/// A PCI function the bus routes configuration and BAR accesses to.
///
/// The bus checks accesses before they reach the device: configuration accesses are 1, 2 or
/// 4 bytes, naturally aligned, inside 4 KiB; BAR accesses fall inside a BAR the bus has
/// mapped, with the offset from the BAR's start. Most implementations own a
/// [`ConfigSpace`] and forward to it.
pub trait PciDevice: Send {
    /// Reads configuration space at `offset` into `data`.
    fn read_config(&mut self, offset: u16, data: &mut [u8]);

    /// Writes configuration space at `offset`.
    fn write_config(&mut self, offset: u16, data: &[u8]);

    /// BAR `index` (0–5) as defined and as its registers hold it now; `None` for an
    /// undefined BAR or the upper half of a 64-bit one.
    fn bar(&self, index: usize) -> Option<PciBar>;

    /// The bus mapped BAR `index` at `new` (`None`: unmapped), having had it at `old`. The
    /// default does nothing; a device that gives out absolute addresses (ioeventfds) may
    /// note it, though the bus's [`BarObserver`] is the usual place.
    fn bar_moved(&mut self, index: usize, old: Option<u64>, new: Option<u64>) {
        let _ = (index, old, new);
    }

    /// A read of `data.len()` bytes at `offset` in BAR `index`.
    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]);

    /// A write at `offset` in BAR `index`.
    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]);
}

/// A bus/device/function address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf {
    /// Bus (always 0 here).
    pub bus: u8,
    /// Device (0–31).
    pub device: u8,
    /// Function (0–7).
    pub function: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Decides whether a BAR may be mapped at a place: the caller knows where RAM and its own
/// fixed devices are; the bus itself already refuses ranges outside its BAR window and
/// ranges overlapping another mapped BAR.
pub trait BarValidator: Send + Sync {
    /// `Err(reason)` to refuse mapping `range`.
    fn check(&self, range: &RangeInclusive<u64>) -> std::result::Result<(), String>;
}

/// Accepts anything inside the window (for tests, or a window that holds no RAM).
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl BarValidator for AllowAll {
    fn check(&self, _: &RangeInclusive<u64>) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// Refuses ranges overlapping any of a list (RAM, the ECAM window, the IOAPIC…).
#[derive(Clone, Debug, Default)]
pub struct ForbiddenRanges(pub Vec<RangeInclusive<u64>>);

impl BarValidator for ForbiddenRanges {
    fn check(&self, range: &RangeInclusive<u64>) -> std::result::Result<(), String> {
        match self
            .0
            .iter()
            .find(|r| r.start() <= range.end() && range.start() <= r.end())
        {
            Some(r) => Err(format!("overlaps {:#x}..={:#x}", r.start(), r.end())),
            None => Ok(()),
        }
    }
}

/// A change of a BAR's mapping, as the bus reports it: the BAR is now mapped at `new`
/// (`None`: unmapped — memory decoding off, or its register holds an address the bus
/// refuses), having been at `old`. Accesses go there already; absolute-address resources
/// (KVM ioeventfds on the device's notify registers) must move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarEvent {
    /// The function.
    pub bdf: Bdf,
    /// The BAR, with the address its registers hold.
    pub bar: PciBar,
    /// Its previous mapping.
    pub old: Option<u64>,
    /// Its new mapping.
    pub new: Option<u64>,
}

/// Told about every [`BarEvent`] (from the vCPU thread that made the configuration write,
/// with no bus lock held).
pub trait BarObserver: Send + Sync {
    /// A BAR moved, appeared or disappeared.
    fn bar_event(&self, event: &BarEvent);
}

/// A device as the bus holds it.
type SharedDevice = Arc<Mutex<dyn PciDevice>>;

struct Slot {
    device: SharedDevice,
    /// Where each memory BAR is mapped now.
    mapped: [Option<PciBar>; 6],
}

struct Inner {
    slots: Vec<Option<Slot>>,
    window: RangeInclusive<u64>,
    validator: Arc<dyn BarValidator>,
    observer: Option<Arc<dyn BarObserver>>,
}

/// PCI bus 0: a host bridge at 00.0 and up to 31 devices (function 0 each).
///
/// The bus decodes on the VM's one [`IoBus`]: [`register_config_access`](Self::register_config_access)
/// puts [`PciConfigIo`] at ports 0xCF8–0xCFF and [`PciConfigMmio`] (ECAM) over 1 MiB there,
/// and each BAR, once mapped, is registered there as a range of its own that reaches the
/// device directly. BARs follow their registers: when the guest turns memory decoding on
/// or writes a BAR, the bus deregisters the old range and registers the new one (vm-device's
/// register/deregister), if the new place is inside the bus's window, clear of every other
/// BAR and allowed by the [`BarValidator`]; otherwise the BAR is unmapped until the guest
/// writes an acceptable address. The registers always keep what the guest wrote (a size
/// mask left by BAR sizing included): the bus never rewrites them.
pub struct PciBus {
    inner: Mutex<Inner>,
    // Weak: the IoBus holds the bus's configuration mechanisms, which hold the bus.
    io: Weak<IoBus>,
}

impl fmt::Debug for PciBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("PciBus")
            .field("devices", &s.slots.iter().filter(|s| s.is_some()).count())
            .field(
                "window",
                &format_args!("{:#x}..={:#x}", s.window.start(), s.window.end()),
            )
            .finish_non_exhaustive()
    }
}

/// The host bridge at 00.0: class 06.00, no BARs.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self {
            config: ConfigSpace::new(PciIds {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                revision: 0,
                class: (0x06, 0x00, 0x00),
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn bar(&self, _index: usize) -> Option<PciBar> {
        None
    }
    fn read_bar(&mut self, _index: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }
    fn write_bar(&mut self, _index: usize, _offset: u64, _data: &[u8]) {}
}

fn lock_dev(d: &Mutex<dyn PciDevice>) -> MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

fn config_access_ok(offset: u64, len: usize, limit: usize) -> bool {
    matches!(len, 1 | 2 | 4)
        && offset.is_multiple_of(len as u64)
        && offset.saturating_add(len as u64) <= limit as u64
}

/// Why the bus does not map a BAR where its registers point.
fn refusal(inner: &Inner, slot_index: usize, bar: &PciBar) -> Option<String> {
    let Some(range) = bar.range() else {
        return Some("the range wraps".into());
    };
    if range.start() < inner.window.start() || range.end() > inner.window.end() {
        return Some(format!(
            "outside the PCI window {:#x}..={:#x}",
            inner.window.start(),
            inner.window.end()
        ));
    }
    for (i, slot) in inner.slots.iter().enumerate() {
        let Some(slot) = slot else { continue };
        for other in slot.mapped.iter().flatten() {
            if i == slot_index && other.index == bar.index {
                continue;
            }
            if let Some(r) = other.range() {
                if r.start() <= range.end() && range.start() <= r.end() {
                    return Some(format!("overlaps BAR {} of device {i:02x}", other.index));
                }
            }
        }
    }
    inner.validator.check(&range).err()
}

/// Whether a BAR's registers hold its own size mask (all ones written to size it).
fn holds_size_mask(bar: &PciBar) -> bool {
    let mask = !(bar.size - 1);
    match bar.kind {
        crate::BarKind::Memory64 { .. } => bar.address == mask,
        _ => bar.address == mask & 0xFFFF_FFFF,
    }
}

/// A mapped memory BAR as a device on the [`IoBus`]: accesses go straight to the function.
/// The bus registers it for exactly the BAR's size, so every access it sees fits the BAR.
struct BarMmio {
    device: SharedDevice,
    index: usize,
}

impl DeviceMmio for BarMmio {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        lock_dev(&self.device).read_bar(self.index, offset, data);
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        lock_dev(&self.device).write_bar(self.index, offset, data);
    }
}

impl PciBus {
    /// Bus 0 with the host bridge at 00.0, decoding on `io`. BARs may be mapped only inside
    /// `window` (the memory window the DSDT's host bridge `_CRS` gives the guest), and only
    /// where `validator` agrees (RAM and the VMM's fixed devices are its business).
    pub fn new(
        io: &Arc<IoBus>,
        window: RangeInclusive<u64>,
        validator: Arc<dyn BarValidator>,
    ) -> Result<Self> {
        if window.is_empty() {
            return Err(Error::InvalidWindow {
                base: *window.start(),
                size: 0,
            });
        }
        let mut slots: Vec<Option<Slot>> = (0..PCI_SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            device: Arc::new(Mutex::new(HostBridge::default())),
            mapped: [None; 6],
        });
        Ok(Self {
            inner: Mutex::new(Inner {
                slots,
                window,
                validator,
                observer: None,
            }),
            io: Arc::downgrade(io),
        })
    }

    /// Registers the two configuration mechanisms of the bus on its [`IoBus`]: [`PciConfigIo`]
    /// at [`PCI_CONFIG_IO_PORT`] and [`PciConfigMmio`] (ECAM, [`ECAM_BUS_SIZE`] bytes for
    /// bus 0) at `ecam_base`.
    pub fn register_config_access(self: &Arc<Self>, ecam_base: u64) -> Result<()> {
        let io = self.io.upgrade().ok_or(Error::NoIoBus)?;
        io.register_pio(
            pio_range(PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE)?,
            Arc::new(Mutex::new(PciConfigIo::new(self.clone()))),
        )?;
        io.register_mmio(
            mmio_range(ecam_base, ECAM_BUS_SIZE)?,
            Arc::new(Mutex::new(PciConfigMmio::new(self.clone()))),
        )?;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets who hears about BAR moves.
    pub fn set_observer(&self, observer: Arc<dyn BarObserver>) {
        self.lock().observer = Some(observer);
    }

    /// The memory window BARs live in.
    pub fn window(&self) -> RangeInclusive<u64> {
        self.lock().window.clone()
    }

    /// Puts `device` in the lowest free slot (1–31); returns its address. Its BARs are not
    /// mapped until the guest (or [`enable_decoding`](Self::enable_decoding)) turns memory
    /// decoding on.
    pub fn add_device(&self, device: Arc<Mutex<dyn PciDevice>>) -> Result<Bdf> {
        let slot = {
            let s = self.lock();
            (1..PCI_SLOTS)
                .find(|i| s.slots[*i].is_none())
                .ok_or(Error::BusFull)?
        };
        self.add_device_at(slot as u8, device)
    }

    /// Puts `device` in slot `slot` (1–31).
    pub fn add_device_at(&self, slot: u8, device: Arc<Mutex<dyn PciDevice>>) -> Result<Bdf> {
        let mut s = self.lock();
        let entry = s
            .slots
            .get_mut(usize::from(slot))
            .filter(|e| slot != 0 && e.is_none())
            .ok_or(Error::SlotUnavailable(slot))?;
        *entry = Some(Slot {
            device,
            mapped: [None; 6],
        });
        Ok(Bdf {
            bus: 0,
            device: slot,
            function: 0,
        })
    }

    /// The device in slot `slot`.
    pub fn device(&self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        self.lock()
            .slots
            .get(usize::from(slot))?
            .as_ref()
            .map(|s| s.device.clone())
    }

    /// Where BAR `bar` of the device in `slot` is mapped now.
    pub fn bar_mapping(&self, slot: u8, bar: usize) -> Option<PciBar> {
        *self
            .lock()
            .slots
            .get(usize::from(slot))?
            .as_ref()?
            .mapped
            .get(bar)?
    }

    /// Sets the memory-space bit of a device's command register, as firmware would before
    /// the OS starts, mapping its BARs (validated as for a guest write).
    pub fn enable_decoding(&self, slot: u8) {
        let cmd = {
            let Some(dev) = self.device(slot) else { return };
            let mut b = [0u8; 2];
            lock_dev(&dev).read_config(offsets::COMMAND, &mut b);
            u16::from_le_bytes(b) | COMMAND_MEMORY_SPACE
        };
        self.config_write(
            Bdf {
                bus: 0,
                device: slot,
                function: 0,
            },
            offsets::COMMAND,
            &cmd.to_le_bytes(),
        );
    }

    /// A configuration read of function `bdf` at `offset`. Anything absent or malformed
    /// reads all ones (vendor 0xFFFF: no device).
    pub fn config_read(&self, bdf: Bdf, offset: u16, data: &mut [u8]) {
        data.fill(0xFF);
        if bdf.bus != 0
            || bdf.function != 0
            || !config_access_ok(offset.into(), data.len(), CONFIG_SPACE_SIZE)
        {
            return;
        }
        if let Some(dev) = self.device(bdf.device) {
            lock_dev(&dev).read_config(offset, data);
        }
    }

    /// A configuration write to function `bdf` at `offset` (any width the function takes);
    /// then maps, moves or unmaps the function's BARs as its command and BAR registers now
    /// say.
    pub fn config_write(&self, bdf: Bdf, offset: u16, data: &[u8]) {
        if bdf.bus != 0
            || bdf.function != 0
            || !config_access_ok(offset.into(), data.len(), CONFIG_SPACE_SIZE)
        {
            return;
        }
        let Some(dev) = self.device(bdf.device) else {
            return;
        };
        lock_dev(&dev).write_config(offset, data);
        self.remap(bdf, &dev);
    }

    /// Brings the mappings of the device in `slot`'s BARs in line with its command and BAR
    /// registers (telling the [`BarObserver`] what moved), as after a guest configuration
    /// write: for a device whose configuration space was restored from a snapshot behind the
    /// bus's back.
    pub fn refresh_mappings(&self, slot: u8) {
        let Some(dev) = self.device(slot) else {
            return;
        };
        let bdf = Bdf {
            bus: 0,
            device: slot,
            function: 0,
        };
        self.remap(bdf, &dev);
    }

    fn remap(&self, bdf: Bdf, dev: &SharedDevice) {
        let (bars, command) = {
            let mut d = lock_dev(dev);
            let mut b = [0u8; 2];
            d.read_config(offsets::COMMAND, &mut b);
            let bars: Vec<PciBar> = (0..6).filter_map(|i| d.bar(i)).collect();
            (bars, u16::from_le_bytes(b))
        };
        let (events, observer) = self.update_mappings(bdf, dev, &bars, command);
        for event in &events {
            log::debug!(
                "pci {bdf}: BAR {} {:x?} -> {:x?}",
                event.bar.index,
                event.old,
                event.new
            );
            lock_dev(dev).bar_moved(event.bar.index, event.old, event.new);
            if let Some(o) = &observer {
                o.bar_event(event);
            }
        }
    }

    /// Brings the mappings of `bdf`'s memory BARs in line with its registers, on this bus's
    /// table and on the IoBus. Returns what moved, and the observer to tell.
    fn update_mappings(
        &self,
        bdf: Bdf,
        dev: &SharedDevice,
        bars: &[PciBar],
        command: u16,
    ) -> (Vec<BarEvent>, Option<Arc<dyn BarObserver>>) {
        let io = self.io.upgrade();
        let mut inner = self.lock();
        let slot_index = usize::from(bdf.device);
        let mut events = Vec::new();
        for bar in bars.iter().filter(|b| b.kind.is_memory()) {
            let Some(current) = inner.slots[slot_index]
                .as_ref()
                .map(|s| s.mapped[bar.index])
            else {
                break;
            };
            let decoding = command & COMMAND_MEMORY_SPACE != 0 && bar.address != 0;
            let mut wanted = decoding.then_some(*bar);
            if wanted.map(|b| b.address) == current.map(|b| b.address) {
                continue;
            }
            if let Some(why) = wanted.and_then(|b| refusal(&inner, slot_index, &b)) {
                if holds_size_mask(bar) {
                    log::debug!("pci {bdf}: BAR {} holds its size mask: unmapped", bar.index);
                } else {
                    log::warn!(
                        "pci {bdf}: BAR {} at {:#x} not mapped: {why}",
                        bar.index,
                        bar.address
                    );
                }
                wanted = None;
            }
            if let Some(io) = &io {
                if let Some(old) = current {
                    io.deregister_mmio(old.address);
                }
                wanted = wanted.filter(|b| register_bar(io, dev, b, bdf));
            }
            if wanted.map(|b| b.address) == current.map(|b| b.address) {
                continue;
            }
            if let Some(slot) = inner.slots[slot_index].as_mut() {
                slot.mapped[bar.index] = wanted;
            }
            events.push(BarEvent {
                bdf,
                bar: *bar,
                old: current.map(|b| b.address),
                new: wanted.map(|b| b.address),
            });
        }
        (events, inner.observer.clone())
    }
}

/// Registers BAR `bar` of `dev` on `io`; false (logged) if the IoBus refuses the range.
fn register_bar(io: &IoBus, dev: &SharedDevice, bar: &PciBar, bdf: Bdf) -> bool {
    let device = Arc::new(BarMmio {
        device: dev.clone(),
        index: bar.index,
    });
    match mmio_range(bar.address, bar.size).and_then(|r| io.register_mmio(r, device)) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("pci {bdf}: BAR {} not mapped: {e}", bar.index);
            false
        }
    }
}

/// Configuration mechanism #1: CONFIG_ADDRESS at 0xCF8 (32-bit, bit 31 enable, bus, device,
/// function, register) and CONFIG_DATA at 0xCFC–0xCFF (1-, 2- and 4-byte accesses inside
/// the dword). Register it for [`PCI_CONFIG_IO_PORT_SIZE`] ports at [`PCI_CONFIG_IO_PORT`].
#[derive(Debug)]
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: u32,
}

impl PciConfigIo {
    /// The port mechanism of `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus, address: 0 }
    }

    /// Where CONFIG_DATA + `port_offset` points, if enabled.
    fn target(&self, port_offset: u16, len: usize) -> Option<(Bdf, u16)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let within = u64::from(port_offset);
        if !config_access_ok(within, len, 4) {
            return None;
        }
        let bdf = Bdf {
            bus: (self.address >> 16) as u8,
            device: ((self.address >> 11) & 0x1F) as u8,
            function: ((self.address >> 8) & 0x7) as u8,
        };
        Some((bdf, (self.address & 0xFC) as u16 + port_offset))
    }
}

impl MutDevicePio for PciConfigIo {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target(offset - 4, data.len()) {
                Some((bdf, reg)) => self.bus.config_read(bdf, reg, data),
                None => data.fill(0xFF),
            },
            _ => data.fill(0xFF),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    // Reserved bits 30:24 and 1:0 read back as 0.
                    self.address = u32::from_le_bytes(b) & 0x80FF_FFFC;
                }
            }
            4..=7 => {
                if let Some((bdf, reg)) = self.target(offset - 4, data.len()) {
                    self.bus.config_write(bdf, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM (the PCI Express enhanced configuration access mechanism): 4 KiB per function,
/// 1 MiB per bus. Register it over the window the MCFG table describes ([`ECAM_BUS_SIZE`]
/// for bus 0); accesses beyond bus 0 read all ones.
#[derive(Debug)]
pub struct PciConfigMmio {
    bus: Arc<PciBus>,
}

impl PciConfigMmio {
    /// The ECAM of `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus }
    }

    fn decode(offset: u64) -> Option<(Bdf, u16)> {
        if offset >= ECAM_BUS_SIZE * 256 {
            return None;
        }
        Some((
            Bdf {
                bus: (offset >> 20) as u8,
                device: ((offset >> 15) & 0x1F) as u8,
                function: ((offset >> 12) & 0x7) as u8,
            },
            (offset & 0xFFF) as u16,
        ))
    }
}

impl MutDeviceMmio for PciConfigMmio {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        match Self::decode(offset) {
            Some((bdf, reg)) => self.bus.config_read(bdf, reg, data),
            None => data.fill(0xFF),
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if let Some((bdf, reg)) = Self::decode(offset) {
            self.bus.config_write(bdf, reg, data);
        }
    }
}
