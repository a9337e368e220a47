//! The PIO and MMIO buses a VMM dispatches guest I/O exits to.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vm_device::bus::BusManager;
use vm_device::bus::{self as vmd_bus, MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};

use crate::error::{BusKind, Error, Result};

/// A device on the PIO bus, as the bus holds it.
///
/// A `MutDevicePio` model wrapped as `Arc<Mutex<Model>>` is one (vm-device implements
/// `DevicePio` for `Mutex<T: MutDevicePio>` and for `Arc<T: DevicePio>`).
pub type PioDevice = Arc<dyn DevicePio + Send + Sync>;

/// A device on the MMIO bus, as the bus holds it.
pub type MmioDevice = Arc<dyn DeviceMmio + Send + Sync>;

/// The outcome of a guest access dispatched on an [`IoBus`].
///
/// Not an error: guests probe addresses where nothing lives (Linux reads 0x2F8 looking
/// for COM2, for instance), and the VMM only needs to count such accesses.
#[must_use = "an unmapped access is worth counting"]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// A device handled the access.
    Handled,
    /// No single registered range covers the whole access: nothing is there, the access
    /// straddles the end of a range (vm-device does not split accesses across ranges), or
    /// the access is empty or wraps past the end of the address space. No device was
    /// called; a read buffer was filled with `0xFF` (a floating bus).
    Unmapped,
}

impl Access {
    /// Whether a device handled the access.
    #[inline]
    pub fn is_handled(self) -> bool {
        self == Access::Handled
    }
}

/// Builds a PIO range of `len` ports from `base`, checked like vm-device checks it
/// (non-empty, not past port `0xFFFF`).
pub fn pio_range(base: u16, len: u16) -> Result<PioRange> {
    PioRange::new(PioAddress(base), len).map_err(|_| Error::InvalidRange {
        bus: BusKind::Pio,
        base: base.into(),
        len: len.into(),
    })
}

/// Builds an MMIO range of `len` bytes from `base` (non-empty, not past `u64::MAX`).
pub fn mmio_range(base: u64, len: u64) -> Result<MmioRange> {
    MmioRange::new(MmioAddress(base), len).map_err(|_| Error::InvalidRange {
        bus: BusKind::Mmio,
        base,
        len,
    })
}

/// The PIO and MMIO buses of a VM: vm-device's [`IoManager`] with errors that name the
/// ranges involved and dispatch that reports unmapped accesses instead of failing.
///
/// Share it between the vCPU threads and whoever moves devices as an `Arc<IoBus>`: both
/// dispatch and (de)registration take `&self`. Dispatch looks the range up under a read
/// lock (a `BTreeMap` range search in vm-device, no allocation), takes a reference to the
/// device and lets go of the lock before calling it, so a device may itself register or
/// deregister ranges (a PCI function whose BAR the guest moves) while being called. The only
/// lock held while a device runs is the device's own (the `Mutex` of a `MutDevicePio`).
#[derive(Default)]
pub struct IoBus {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    io: IoManager,
    // Registered ranges, base -> last. Only read on registration, to name the range a new
    // one overlaps (vm-device's error does not say which); dispatch never touches them.
    pio_ranges: BTreeMap<u64, u64>,
    mmio_ranges: BTreeMap<u64, u64>,
}

impl fmt::Debug for IoBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Ranges<'a>(&'a BTreeMap<u64, u64>);
        impl fmt::Debug for Ranges<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list()
                    .entries(self.0.iter().map(|(b, l)| *b..=*l))
                    .finish()
            }
        }
        let inner = self.read();
        f.debug_struct("IoBus")
            .field("pio", &Ranges(&inner.pio_ranges))
            .field("mmio", &Ranges(&inner.mmio_ranges))
            .finish()
    }
}

/// The registered range overlapping `base..=last`, if any. Registered ranges are disjoint,
/// so the one starting last at or before `last` is the only candidate that matters: any
/// range before it ends before it starts.
fn overlapping(ranges: &BTreeMap<u64, u64>, base: u64, last: u64) -> Option<RangeInclusive<u64>> {
    ranges
        .range(..=last)
        .next_back()
        .filter(|(_, &l)| l >= base)
        .map(|(&b, &l)| b..=l)
}

impl IoBus {
    /// An empty pair of buses.
    pub fn new() -> Self {
        Self::default()
    }

    // A device panicking while the bus was locked cannot leave the maps half-updated (every
    // update is one insert or remove), so a poisoned lock is taken over.
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `device` for the ports of `range`.
    ///
    /// The device sees accesses as `(base of range, offset into range, data)`. Ranges are
    /// not merged: two adjacent ranges are two devices as far as dispatch goes.
    ///
    /// # Errors
    ///
    /// [`Error::Overlap`] naming the registered range if `range` shares a port with it.
    pub fn register_pio(&self, range: PioRange, device: PioDevice) -> Result<()> {
        let (base, last) = (u64::from(range.base().0), u64::from(range.last().0));
        let mut inner = self.write();
        check_free(BusKind::Pio, &inner.pio_ranges, base, last)?;
        let inner = &mut *inner;
        inner
            .io
            .register_pio(range, device)
            .map_err(|e| refused(BusKind::Pio, &inner.pio_ranges, base, last, e))?;
        inner.pio_ranges.insert(base, last);
        Ok(())
    }

    /// Registers `device` for the guest physical addresses of `range`.
    ///
    /// # Errors
    ///
    /// [`Error::Overlap`] naming the registered range if `range` shares an address with it.
    pub fn register_mmio(&self, range: MmioRange, device: MmioDevice) -> Result<()> {
        let (base, last) = (range.base().0, range.last().0);
        let mut inner = self.write();
        check_free(BusKind::Mmio, &inner.mmio_ranges, base, last)?;
        let inner = &mut *inner;
        inner
            .io
            .register_mmio(range, device)
            .map_err(|e| refused(BusKind::Mmio, &inner.mmio_ranges, base, last, e))?;
        inner.mmio_ranges.insert(base, last);
        Ok(())
    }

    /// Removes the device whose range contains `port`, returning the range and the device.
    pub fn deregister_pio(&self, port: u16) -> Option<(PioRange, PioDevice)> {
        let mut inner = self.write();
        let (range, device) = inner.io.deregister_pio(PioAddress(port))?;
        inner.pio_ranges.remove(&u64::from(range.base().0));
        Some((range, device))
    }

    /// Removes the device whose range contains `addr`, returning the range and the device.
    pub fn deregister_mmio(&self, addr: u64) -> Option<(MmioRange, MmioDevice)> {
        let mut inner = self.write();
        let (range, device) = inner.io.deregister_mmio(MmioAddress(addr))?;
        inner.mmio_ranges.remove(&range.base().0);
        Some((range, device))
    }

    /// The registered PIO ranges (inclusive), in address order.
    pub fn pio_ranges(&self) -> Vec<RangeInclusive<u16>> {
        // The map only holds ranges built from u16 ports.
        self.read()
            .pio_ranges
            .iter()
            .map(|(&b, &l)| b as u16..=l as u16)
            .collect()
    }

    /// The registered MMIO ranges (inclusive), in address order.
    pub fn mmio_ranges(&self) -> Vec<RangeInclusive<u64>> {
        self.read()
            .mmio_ranges
            .iter()
            .map(|(&b, &l)| b..=l)
            .collect()
    }

    /// The PIO device whose range covers all of `port..port + len`, with its range's base.
    #[inline]
    fn pio_target(&self, port: u16, len: usize) -> Option<(PioAddress, PioDevice)> {
        let inner = self.read();
        let bus = BusManager::<PioAddress>::bus(&inner.io);
        let (range, device) = bus.check_access(PioAddress(port), len).ok()?;
        Some((range.base(), device.clone()))
    }

    /// The MMIO device whose range covers all of `addr..addr + len`, with its range's base.
    #[inline]
    fn mmio_target(&self, addr: u64, len: usize) -> Option<(MmioAddress, MmioDevice)> {
        let inner = self.read();
        let bus = BusManager::<MmioAddress>::bus(&inner.io);
        let (range, device) = bus.check_access(MmioAddress(addr), len).ok()?;
        Some((range.base(), device.clone()))
    }

    /// Dispatches a guest read of `data.len()` bytes from `port`.
    ///
    /// On [`Access::Unmapped`] `data` is filled with `0xFF`, what a read of an empty port
    /// returns on a PC.
    #[inline]
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> Access {
        match self.pio_target(port, data.len()) {
            Some((base, device)) => {
                device.pio_read(base, port - base.0, data);
                Access::Handled
            }
            None => unmapped_read(data),
        }
    }

    /// Dispatches a guest write of `data` to `port`.
    #[inline]
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Access {
        match self.pio_target(port, data.len()) {
            Some((base, device)) => {
                device.pio_write(base, port - base.0, data);
                Access::Handled
            }
            None => Access::Unmapped,
        }
    }

    /// Dispatches a guest read of `data.len()` bytes at `addr`.
    ///
    /// On [`Access::Unmapped`] `data` is filled with `0xFF` (all ones, as a PCI master abort
    /// reads).
    #[inline]
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> Access {
        match self.mmio_target(addr, data.len()) {
            Some((base, device)) => {
                device.mmio_read(base, addr - base.0, data);
                Access::Handled
            }
            None => unmapped_read(data),
        }
    }

    /// Dispatches a guest write of `data` at `addr`.
    #[inline]
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> Access {
        match self.mmio_target(addr, data.len()) {
            Some((base, device)) => {
                device.mmio_write(base, addr - base.0, data);
                Access::Handled
            }
            None => Access::Unmapped,
        }
    }
}

#[cold]
fn unmapped_read(data: &mut [u8]) -> Access {
    data.fill(0xFF);
    Access::Unmapped
}

fn check_free(bus: BusKind, ranges: &BTreeMap<u64, u64>, base: u64, last: u64) -> Result<()> {
    match overlapping(ranges, base, last) {
        Some(existing) => Err(Error::Overlap {
            bus,
            new: base..=last,
            existing,
        }),
        None => Ok(()),
    }
}

// vm-device refused a range our own check let through. Its `register` only fails on an
// overlap, which our check has ruled out; map whatever it says to the closest error.
fn refused(
    bus: BusKind,
    ranges: &BTreeMap<u64, u64>,
    base: u64,
    last: u64,
    err: vmd_bus::Error,
) -> Error {
    match err {
        vmd_bus::Error::DeviceOverlap => Error::Overlap {
            bus,
            new: base..=last,
            existing: overlapping(ranges, base, last).unwrap_or(base..=last),
        },
        _ => Error::InvalidRange {
            bus,
            base,
            len: last - base + 1,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_device::bus::{MmioAddressOffset, PioAddressOffset};
    use vm_device::{MutDeviceMmio, MutDevicePio};

    /// Records every access; reads return `id` then `offset` then `0xAA`s.
    #[derive(Default)]
    struct Recorder {
        id: u8,
        log: Vec<(&'static str, u64, u64, Vec<u8>)>,
    }

    impl Recorder {
        fn new(id: u8) -> Arc<Mutex<Self>> {
            Arc::new(Mutex::new(Recorder {
                id,
                log: Vec::new(),
            }))
        }
        fn fill(&self, offset: u64, data: &mut [u8]) {
            data.fill(0xAA);
            if let Some(b) = data.get_mut(0) {
                *b = self.id;
            }
            if let Some(b) = data.get_mut(1) {
                *b = offset as u8;
            }
        }
    }

    impl MutDevicePio for Recorder {
        fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
            self.fill(offset.into(), data);
            self.log
                .push(("pio_read", base.0.into(), offset.into(), data.to_vec()));
        }
        fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
            self.log
                .push(("pio_write", base.0.into(), offset.into(), data.to_vec()));
        }
    }

    impl MutDeviceMmio for Recorder {
        fn mmio_read(&mut self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
            self.fill(offset, data);
            self.log.push(("mmio_read", base.0, offset, data.to_vec()));
        }
        fn mmio_write(&mut self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
            self.log.push(("mmio_write", base.0, offset, data.to_vec()));
        }
    }

    fn log(dev: &Arc<Mutex<Recorder>>) -> Vec<(&'static str, u64, u64, Vec<u8>)> {
        dev.lock().unwrap().log.clone()
    }

    /// A device that moves its own range on a write: what a PCI function does when the
    /// guest reprograms its BAR through a register of that very BAR's device.
    struct Mover {
        bus: std::sync::Weak<IoBus>,
        writes: std::sync::atomic::AtomicU64,
    }

    impl vm_device::DeviceMmio for Mover {
        fn mmio_read(&self, _: MmioAddress, _: MmioAddressOffset, data: &mut [u8]) {
            data.fill(7);
        }
        fn mmio_write(&self, base: MmioAddress, _: MmioAddressOffset, data: &[u8]) {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let Some(bus) = self.bus.upgrade() else {
                return;
            };
            let new = u64::from(data[0]) << 12;
            let (_, me) = bus.deregister_mmio(base.0).expect("registered");
            bus.register_mmio(mmio_range(new, 0x1000).unwrap(), me)
                .expect("free");
        }
    }

    #[test]
    fn a_device_can_move_its_own_range_while_being_called() {
        let bus = Arc::new(IoBus::new());
        let mover = Arc::new(Mover {
            bus: Arc::downgrade(&bus),
            writes: Default::default(),
        });
        bus.register_mmio(mmio_range(0x1000, 0x1000).unwrap(), mover.clone())
            .unwrap();
        // Called at 0x1000, it moves itself to 0x5000 (no deadlock on the bus lock).
        assert!(bus.mmio_write(0x1004, &[5]).is_handled());
        assert_eq!(bus.mmio_ranges(), vec![0x5000..=0x5FFF]);
        let mut b = [0u8];
        assert_eq!(bus.mmio_read(0x1004, &mut b), Access::Unmapped);
        assert!(bus.mmio_read(0x5004, &mut b).is_handled());
        assert_eq!(b, [7]);
        // And from several threads at once, each move lands (no lost registration).
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let mut b = [0u8];
                        let _ = bus.mmio_read(0x5000 + t, &mut b);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(mover.writes.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn bus_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<IoBus>();
        check::<Arc<IoBus>>();
    }

    #[test]
    fn pio_overlap_rejected_both_directions_adjacent_accepted() {
        let bus = IoBus::new();
        bus.register_pio(pio_range(0x3F8, 8).unwrap(), Recorder::new(1))
            .unwrap();

        // New range starting inside the existing one.
        let err = bus
            .register_pio(pio_range(0x3FF, 2).unwrap(), Recorder::new(2))
            .unwrap_err();
        assert_eq!(
            err,
            Error::Overlap {
                bus: BusKind::Pio,
                new: 0x3FF..=0x400,
                existing: 0x3F8..=0x3FF
            }
        );
        assert_eq!(
            err.to_string(),
            "PIO range 0x3ff..=0x400 overlaps the registered range 0x3f8..=0x3ff"
        );
        // New range ending inside the existing one.
        let err = bus
            .register_pio(pio_range(0x3F0, 9).unwrap(), Recorder::new(2))
            .unwrap_err();
        assert!(matches!(err, Error::Overlap { existing, .. } if existing == (0x3F8..=0x3FF)));
        // New range covering the existing one.
        let err = bus
            .register_pio(pio_range(0x300, 0x200).unwrap(), Recorder::new(2))
            .unwrap_err();
        assert!(matches!(err, Error::Overlap { existing, .. } if existing == (0x3F8..=0x3FF)));
        // New range inside the existing one.
        let err = bus
            .register_pio(pio_range(0x3FA, 1).unwrap(), Recorder::new(2))
            .unwrap_err();
        assert!(matches!(err, Error::Overlap { existing, .. } if existing == (0x3F8..=0x3FF)));

        // Adjacent on both sides is fine.
        bus.register_pio(pio_range(0x3F0, 8).unwrap(), Recorder::new(3))
            .unwrap();
        bus.register_pio(pio_range(0x400, 1).unwrap(), Recorder::new(4))
            .unwrap();
        assert_eq!(
            bus.pio_ranges(),
            vec![0x3F0..=0x3F7, 0x3F8..=0x3FF, 0x400..=0x400]
        );
    }

    #[test]
    fn mmio_overlap_rejected_both_directions_adjacent_accepted() {
        let bus = IoBus::new();
        bus.register_mmio(mmio_range(0xD000_0000, 0x1000).unwrap(), Recorder::new(1))
            .unwrap();
        for (base, len) in [(0xCFFF_F000, 0x1001), (0xD000_0FFF, 0x1000), (0, u64::MAX)] {
            let err = bus
                .register_mmio(mmio_range(base, len).unwrap(), Recorder::new(2))
                .unwrap_err();
            assert_eq!(
                err,
                Error::Overlap {
                    bus: BusKind::Mmio,
                    new: base..=base + (len - 1),
                    existing: 0xD000_0000..=0xD000_0FFF
                }
            );
        }
        bus.register_mmio(mmio_range(0xCFFF_F000, 0x1000).unwrap(), Recorder::new(3))
            .unwrap();
        bus.register_mmio(mmio_range(0xD000_1000, 0x1000).unwrap(), Recorder::new(4))
            .unwrap();
        assert_eq!(bus.mmio_ranges().len(), 3);
    }

    #[test]
    fn invalid_ranges() {
        assert_eq!(
            pio_range(0x10, 0).unwrap_err(),
            Error::InvalidRange {
                bus: BusKind::Pio,
                base: 0x10,
                len: 0
            }
        );
        assert!(pio_range(0xFFFF, 2).is_err());
        assert!(pio_range(0xFFFF, 1).is_ok());
        assert!(mmio_range(u64::MAX, 2).is_err());
        assert!(mmio_range(0, 0).is_err());
    }

    #[test]
    fn pio_dispatch_reaches_the_right_device_with_offset() {
        let bus = IoBus::new();
        let com1 = Recorder::new(1);
        let next = Recorder::new(2);
        bus.register_pio(pio_range(0x3F8, 8).unwrap(), com1.clone())
            .unwrap();
        bus.register_pio(pio_range(0x400, 4).unwrap(), next.clone())
            .unwrap();

        assert_eq!(bus.pio_write(0x3FD, &[0x42]), Access::Handled);
        let mut data = [0u8; 2];
        assert!(bus.pio_read(0x3FE, &mut data).is_handled());
        assert_eq!(data, [1, 6]);
        let mut word = [0u8; 4];
        assert!(bus.pio_read(0x400, &mut word).is_handled());
        assert_eq!(word, [2, 0, 0xAA, 0xAA]);

        assert_eq!(
            log(&com1),
            vec![
                ("pio_write", 0x3F8, 5, vec![0x42]),
                ("pio_read", 0x3F8, 6, vec![1, 6])
            ]
        );
        assert_eq!(
            log(&next),
            vec![("pio_read", 0x400, 0, vec![2, 0, 0xAA, 0xAA])]
        );
    }

    #[test]
    fn mmio_dispatch_reaches_the_right_device_with_offset() {
        let bus = IoBus::new();
        let a = Recorder::new(1);
        let b = Recorder::new(2);
        bus.register_mmio(mmio_range(0xD000_0000, 0x1000).unwrap(), a.clone())
            .unwrap();
        bus.register_mmio(mmio_range(0xD000_1000, 0x200).unwrap(), b.clone())
            .unwrap();
        assert!(bus
            .mmio_write(0xD000_1070, &0xDEAD_BEEFu32.to_le_bytes())
            .is_handled());
        let mut q = [0u8; 8];
        assert!(bus.mmio_read(0xD000_0FF8, &mut q).is_handled());
        assert_eq!(q[..2], [1, 0xF8]);
        assert_eq!(
            log(&b),
            vec![(
                "mmio_write",
                0xD000_1000,
                0x70,
                vec![0xEF, 0xBE, 0xAD, 0xDE]
            )]
        );
        assert_eq!(log(&a).len(), 1);
        assert_eq!(log(&a)[0].2, 0xFF8);
    }

    #[test]
    fn unmapped_access_reported_and_reads_float_high() {
        let bus = IoBus::new();
        let dev = Recorder::new(1);
        bus.register_pio(pio_range(0x3F8, 8).unwrap(), dev.clone())
            .unwrap();
        bus.register_mmio(mmio_range(0xD000_0000, 0x1000).unwrap(), dev.clone())
            .unwrap();

        let mut data = [0u8; 1];
        assert_eq!(bus.pio_read(0x2F8, &mut data), Access::Unmapped);
        assert_eq!(data, [0xFF]);
        assert_eq!(bus.pio_write(0x3F7, &[1]), Access::Unmapped);
        assert_eq!(bus.pio_write(0x400, &[1]), Access::Unmapped);
        let mut data = [0u8; 4];
        assert_eq!(bus.mmio_read(0xD000_1000, &mut data), Access::Unmapped);
        assert_eq!(data, [0xFF; 4]);
        assert_eq!(bus.mmio_write(0xCFFF_FFFF, &[1]), Access::Unmapped);
        // Empty accesses and accesses wrapping the address space are refused, not panics.
        assert_eq!(bus.pio_write(0x3F8, &[]), Access::Unmapped);
        assert_eq!(bus.pio_write(0xFFFF, &[1, 2]), Access::Unmapped);
        assert_eq!(bus.mmio_write(u64::MAX, &[1, 2]), Access::Unmapped);
        assert!(log(&dev).is_empty());
    }

    #[test]
    fn access_spanning_a_range_boundary_is_unmapped() {
        // vm-device's `check_access`: the whole access must fit in one registered range;
        // it is never split across ranges, not even adjacent ones of the same device.
        let bus = IoBus::new();
        let a = Recorder::new(1);
        let b = Recorder::new(2);
        bus.register_pio(pio_range(0x10, 4).unwrap(), a.clone())
            .unwrap();
        bus.register_pio(pio_range(0x14, 4).unwrap(), b.clone())
            .unwrap();
        bus.register_mmio(mmio_range(0x1000, 0x10).unwrap(), a.clone())
            .unwrap();

        // Last two ports of `a` plus the first two of `b`.
        let mut data = [0u8; 4];
        assert_eq!(bus.pio_read(0x12, &mut data), Access::Unmapped);
        assert_eq!(data, [0xFF; 4]);
        assert_eq!(bus.pio_write(0x13, &[0, 0]), Access::Unmapped);
        // Running off the end into nothing.
        assert_eq!(bus.pio_write(0x16, &[0, 0, 0, 0]), Access::Unmapped);
        assert_eq!(bus.mmio_write(0x100C, &[0; 8]), Access::Unmapped);
        assert!(log(&a).is_empty() && log(&b).is_empty());

        // Exactly up to the last byte is inside.
        assert!(bus.pio_write(0x12, &[0, 0]).is_handled());
        assert!(bus.mmio_write(0x1008, &[0; 8]).is_handled());
        assert_eq!(log(&a).len(), 2);
    }

    #[test]
    fn deregister_frees_the_range() {
        let bus = IoBus::new();
        bus.register_pio(pio_range(0x60, 5).unwrap(), Recorder::new(1))
            .unwrap();
        let (range, _dev) = bus.deregister_pio(0x62).unwrap();
        assert_eq!((range.base().0, range.size()), (0x60, 5));
        assert!(bus.deregister_pio(0x60).is_none());
        assert_eq!(bus.pio_write(0x60, &[1]), Access::Unmapped);
        bus.register_pio(pio_range(0x60, 1).unwrap(), Recorder::new(2))
            .unwrap();

        bus.register_mmio(mmio_range(0xD000_0000, 0x1000).unwrap(), Recorder::new(1))
            .unwrap();
        assert!(bus.deregister_mmio(0xD000_0FFF).is_some());
        assert_eq!(bus.mmio_ranges().len(), 0);
        bus.register_mmio(mmio_range(0xD000_0000, 0x2000).unwrap(), Recorder::new(1))
            .unwrap();
    }

    #[test]
    fn shared_between_threads() {
        let bus = IoBus::new();
        let dev = Recorder::new(7);
        bus.register_pio(pio_range(0x80, 1).unwrap(), dev.clone())
            .unwrap();
        let bus = Arc::new(bus);
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        assert!(bus.pio_write(0x80, &[i]).is_handled());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(log(&dev).len(), 400);
    }
}
