//! `EventIdx`: a `Transport` wrapper that sends only the queue
//! notifications a VIRTIO_F_EVENT_IDX device asked for.
//!
//! virtio-drivers 0.13's `VirtQueue::should_notify` with EVENT_IDX
//! notifies whenever the available index has passed the device's
//! `avail_event`, that is on every buffer while the device is busy and
//! has not moved `avail_event` on (which is how it suppresses them): one
//! notification, and so one VM exit, per packet. The driver calls
//! `notify` after each `add`; this wrapper then applies the
//! specification's test (2.7.10, `vring_need_event`): notify only if
//! `avail_event` lies between the index at the previous notification and
//! the new one. The crate's test being looser, every notification the
//! specification requires still reaches the device.
//!
//! Everything else is delegated.

use core::fmt::Debug;
use core::ops::BitAnd;
use core::sync::atomic::{fence, AtomicU16, Ordering};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// VIRTIO_F_EVENT_IDX.
const F_EVENT_IDX: u64 = 1 << 29;
/// Queues tracked (net: receive and transmit).
const QUEUES: usize = 2;

/// Where a queue's indices are, and the available index last notified.
#[derive(Clone, Copy, Debug)]
struct Ring {
    /// The available ring's `idx` (driver area + 2).
    avail_idx: u64,
    /// The used ring's `avail_event` (device area + 4 + 8 × size).
    avail_event: u64,
    notified: u16,
}

fn load16(addr: u64) -> u16 {
    // SAFETY: `addr` is a 2-aligned u16 in the rings of a queue set up
    // through `queue_set` and not unset since (memory the driver's
    // `VirtQueue` owns while it calls `notify`); the driver and the device
    // access the rings through raw pointers and atomics only.
    unsafe { AtomicU16::from_ptr(addr as *mut u16) }.load(Ordering::Acquire)
}

/// `T` with notifications filtered as the module describes.
pub struct EventIdx<T: Transport> {
    inner: T,
    event_idx: bool,
    rings: [Option<Ring>; QUEUES],
}

impl<T: Transport> EventIdx<T> {
    pub fn new(inner: T) -> Self {
        EventIdx {
            inner,
            event_idx: false,
            rings: [None; QUEUES],
        }
    }

    /// Whether the device asked for a notification of `queue` now.
    fn wanted(&mut self, queue: u16) -> bool {
        let Some(ring) = self
            .rings
            .get_mut(usize::from(queue))
            .and_then(Option::as_mut)
        else {
            return true;
        };
        // The new available index must be visible before `avail_event` is
        // read (the device writes `avail_event`, then reads the index).
        fence(Ordering::SeqCst);
        let new = load16(ring.avail_idx);
        let event = load16(ring.avail_event);
        let old = ring.notified;
        let wanted = new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old);
        if wanted {
            ring.notified = new;
        }
        wanted
    }
}

impl<T: Transport> Transport for EventIdx<T> {
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

    fn notify(&mut self, queue: u16) {
        if self.wanted(queue) {
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
        if let Some(slot) = self.rings.get_mut(usize::from(queue)) {
            *slot = self.event_idx.then_some(Ring {
                avail_idx: driver_area + 2,
                avail_event: device_area + 4 + 8 * u64::from(size),
                notified: 0,
            });
        }
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }

    fn queue_unset(&mut self, queue: u16) {
        if let Some(slot) = self.rings.get_mut(usize::from(queue)) {
            *slot = None;
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
