//! `Doorbell`: a `Transport` wrapper through which a driver's queue
//! notifications are held, then sent the way the device asked for them.
//!
//! Two things in virtio-drivers 0.13 cost VM exits per packet:
//!
//! - with VIRTIO_F_EVENT_IDX, `VirtQueue::should_notify` notifies whenever
//!   the available index has passed the device's `avail_event`, that is on
//!   every buffer while the device is busy and has not moved `avail_event`
//!   on (which is how it suppresses notifications);
//! - `PciTransport::notify` writes `queue_select` and reads
//!   `queue_notify_off` (two more exits to the VMM) before it writes the
//!   notify register.
//!
//! Here `notify` only marks the queue once `Bell::set_register` has named
//! its notify register; `Bell::flush`, which the driver's owner calls after
//! each round of work, then applies the specification's test (2.7.10,
//! `vring_need_event`: notify only if `avail_event` lies between the index
//! at the previous notification and the new one, read after a full fence)
//! and writes the register itself. So several buffers added in one round
//! cost at most one notification, and none when the device is still busy
//! with the queue. With EVENT_IDX the test is made on every flush, not
//! only when the crate asked (its own test has no fence and does not wrap,
//! see `BlkQueue` in the README), so no notification the device asked for
//! is lost. Before a register is named, notifications go through the
//! wrapped transport (filtered the same way). Everything else is
//! delegated.

use crate::drivers::msix::common_cfg;
use crate::drivers::spec::pci_common;
use crate::drivers::virtio::{Device, Devices, Location};
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use core::cell::Cell;
use core::fmt::Debug;
use core::ops::BitAnd;
use core::sync::atomic::{fence, AtomicU16, Ordering};
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, PCI_CAP_ID_VNDR};
use virtio_drivers::transport::pci::VIRTIO_PCI_CAP_NOTIFY_CFG;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// VIRTIO_F_EVENT_IDX.
const F_EVENT_IDX: u64 = 1 << 29;
/// Queues tracked (net: receive and transmit).
const QUEUES: usize = 2;

/// A queue's notify register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Register {
    /// virtio-mmio QueueNotify (32-bit write of the queue index).
    Mmio(u64),
    /// A virtio-pci notify address (16-bit write of the queue index).
    Pci(u64),
}

/// Where a queue's indices are (with EVENT_IDX).
#[derive(Clone, Copy, Debug)]
struct Ring {
    /// The available ring's `idx` (driver area + 2).
    avail_idx: u64,
    /// The used ring's `avail_event` (device area + 4 + 8 × size).
    avail_event: u64,
}

/// One queue's state.
#[derive(Clone, Copy, Debug, Default)]
struct Queue {
    ring: Option<Ring>,
    /// The available index at the last notification.
    notified: u16,
    /// A notification was asked for since the last `flush`.
    pending: bool,
    register: Option<Register>,
}

fn load16(addr: u64) -> u16 {
    // SAFETY: `addr` is a 2-aligned u16 in the rings of a queue set up
    // through `queue_set` and not unset since (memory the driver's
    // `VirtQueue` owns while the driver is alive, and `Bell` users only
    // flush while it is); the driver and the device access the rings
    // through raw pointers and atomics only.
    unsafe { AtomicU16::from_ptr(addr as *mut u16) }.load(Ordering::Acquire)
}

/// The notification state shared by a `Doorbell` (inside the driver) and
/// the driver's owner, who flushes it.
#[derive(Default)]
pub struct Bell {
    queues: [Cell<Queue>; QUEUES],
    /// Notifications sent, per queue.
    sent: [Cell<u64>; QUEUES],
}

impl Bell {
    fn queue(&self, queue: u16) -> Option<&Cell<Queue>> {
        self.queues.get(usize::from(queue))
    }

    fn count(&self, queue: u16) {
        if let Some(c) = self.sent.get(usize::from(queue)) {
            c.set(c.get() + 1);
        }
    }

    /// Notifications sent to `queue` so far (through `flush` or the
    /// wrapped transport).
    pub fn sent(&self, queue: u16) -> u64 {
        self.sent.get(usize::from(queue)).map_or(0, Cell::get)
    }

    /// Names the notify register of `queue`: from now on its notifications
    /// wait for `flush`.
    pub fn set_register(&self, queue: u16, register: Register) {
        if let Some(cell) = self.queue(queue) {
            cell.set(Queue {
                register: Some(register),
                ..cell.get()
            });
        }
    }

    /// Whether the device asked for a notification of `queue` since the
    /// last one (always, without EVENT_IDX); if so, the current available
    /// index counts as notified.
    fn wanted(&self, queue: u16) -> bool {
        let Some(cell) = self.queue(queue) else {
            return true;
        };
        let mut q = cell.get();
        let Some(ring) = q.ring else {
            return true;
        };
        // The new available index must be visible before `avail_event` is
        // read (the device writes `avail_event`, then reads the index).
        fence(Ordering::SeqCst);
        let new = load16(ring.avail_idx);
        let event = load16(ring.avail_event);
        let wanted = new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(q.notified);
        if wanted {
            q.notified = new;
            cell.set(q);
        }
        wanted
    }

    /// Sends the notifications the device wants: with EVENT_IDX, checked
    /// for every queue with a register whether the driver asked or not
    /// (virtio-drivers' own test can miss one when `avail_event` is read
    /// before the new index is visible, or across the index's wrap);
    /// without, for the queues the driver asked for since the last flush.
    pub fn flush(&self) {
        for (index, cell) in self.queues.iter().enumerate() {
            let q = cell.get();
            if !q.pending && q.ring.is_none() {
                continue;
            }
            cell.set(Queue {
                pending: false,
                ..q
            });
            let queue = index as u16;
            match q.register {
                Some(reg) if self.wanted(queue) => {
                    self.count(queue);
                    ring(reg, queue)
                }
                _ => {}
            }
        }
    }
}

/// Writes `queue` to its notify register.
pub fn ring(register: Register, queue: u16) {
    match register {
        // SAFETY: QueueNotify of a virtio-mmio window that discovery
        // checked and mapped (identity, uncached); device memory no Rust
        // object aliases (the transport holds raw pointers only).
        Register::Mmio(addr) => unsafe {
            core::ptr::write_volatile(addr as *mut u32, u32::from(queue))
        },
        // SAFETY: a notify address inside the function's notify capability
        // in a memory BAR discovery set up and mapped; as above.
        Register::Pci(addr) => unsafe { core::ptr::write_volatile(addr as *mut u16, queue) },
    }
}

/// `T` with notifications held and filtered as the module describes.
pub struct Doorbell<T: Transport> {
    inner: T,
    event_idx: bool,
    bell: Rc<Bell>,
}

impl<T: Transport> Doorbell<T> {
    pub fn new(inner: T) -> Self {
        Doorbell {
            inner,
            event_idx: false,
            bell: Rc::new(Bell::default()),
        }
    }

    /// The shared state, to name registers and flush with.
    pub fn bell(&self) -> Rc<Bell> {
        self.bell.clone()
    }
}

impl<T: Transport> Transport for Doorbell<T> {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.write_driver_features(driver_features)
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    /// Marks the queue for `Bell::flush`; without a named register,
    /// notifies now if the device wants it.
    fn notify(&mut self, queue: u16) {
        let Some(cell) = self.bell.queue(queue) else {
            return self.inner.notify(queue);
        };
        let q = cell.get();
        if q.register.is_some() {
            cell.set(Queue { pending: true, ..q });
        } else if self.bell.wanted(queue) {
            self.bell.count(queue);
            self.inner.notify(queue)
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status)
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    /// Delegates; with EVENT_IDX, remembers where the queue's indices are.
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        if let Some(cell) = self.bell.queue(queue) {
            let ring = self.event_idx.then_some(Ring {
                avail_idx: driver_area + 2,
                avail_event: device_area + 4 + 8 * u64::from(size),
            });
            cell.set(Queue {
                ring,
                notified: 0,
                pending: false,
                register: None,
            });
        }
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }

    fn queue_unset(&mut self, queue: u16) {
        if let Some(cell) = self.bell.queue(queue) {
            cell.set(Queue::default());
        }
        self.inner.queue_unset(queue)
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    /// Delegates, and notes whether EVENT_IDX was negotiated.
    fn begin_init<F: bitflags::Flags<Bits = u64> + BitAnd<Output = F> + Debug>(
        &mut self,
        supported_features: F,
    ) -> F {
        let features = self.inner.begin_init(supported_features);
        self.event_idx = features.bits() & F_EVENT_IDX != 0;
        features
    }

    fn finish_init(&mut self) {
        self.inner.finish_init()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<V: FromBytes + IntoBytes>(&self, offset: usize) -> Result<V> {
        self.inner.read_config_space(offset)
    }

    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> Result<()> {
        self.inner.write_config_space(offset, value)
    }

    fn read_consistent<V>(&self, f: impl Fn() -> Result<V>) -> Result<V> {
        self.inner.read_consistent(f)
    }
}

/// virtio-mmio QueueNotify (virtio 1.2, 4.2.2; the same in version 1).
const MMIO_QUEUE_NOTIFY: u64 = 0x050;
/// `queue_notify_off` in the virtio-pci common configuration (4.1.4.3).
const PCI_QUEUE_NOTIFY_OFF: u64 = 0x1e;

/// The notify registers of `queues` of `dev`: QueueNotify of its mmio
/// window, or on PCI the notify capability's address plus each queue's
/// `queue_notify_off` × `notify_off_multiplier` (read once here, after the
/// driver set the queues up: it writes `queue_select`).
pub fn registers<const N: usize>(
    devices: &Devices,
    dev: &Device,
    queues: [u16; N],
) -> core::result::Result<[Register; N], String> {
    let df = match dev.at {
        Location::Mmio(m) => return Ok(queues.map(|_| Register::Mmio(m.addr + MMIO_QUEUE_NOTIFY))),
        Location::Pci(df) => df,
    };
    let cam = devices.pci_cam()?;
    let mut root = devices.pci_root()?;
    let cap = root
        .capabilities(df)
        .find(|c| {
            c.id == PCI_CAP_ID_VNDR && (c.private_header >> 8) as u8 == VIRTIO_PCI_CAP_NOTIFY_CFG
        })
        .ok_or_else(|| String::from("no notify capability"))?;
    let bar = cam.read_word(df, cap.offset + 4) as u8;
    let offset = u64::from(cam.read_word(df, cap.offset + 8));
    let multiplier = u64::from(cam.read_word(df, cap.offset + 16));
    let base = match root.bar_info(df, bar) {
        Ok(Some(info)) => info.memory_address_size().map(|(addr, _)| addr),
        _ => None,
    }
    .filter(|&addr| addr != 0)
    .ok_or_else(|| format!("notify bar {} not a memory bar in use", bar))?;
    let common = common_cfg(&mut root, &cam, df)?;
    Ok(queues.map(|q| {
        // SAFETY: registers of the common configuration, in a BAR discovery
        // set up and mapped (identity, uncached); device memory no Rust
        // object aliases, and the driver is not using it meanwhile.
        let notify_off = unsafe {
            core::ptr::write_volatile((common + pci_common::QUEUE_SELECT) as *mut u16, q);
            core::ptr::read_volatile((common + PCI_QUEUE_NOTIFY_OFF) as *const u16)
        };
        Register::Pci(base + offset + u64::from(notify_off) * multiplier)
    }))
}
