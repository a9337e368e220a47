//! `StrictTransport`: virtio-drivers' MMIO and PCI transports driven in
//! the order virtio 1.2 §3.1.1 gives, with every wait for the device bounded.
//!
//! It implements virtio-drivers' `Transport` by delegating to the crate's
//! own transport, so the crate's device drivers (`VirtIORng`,
//! `VirtIOConsole`, `VirtIOBlk`) and `VirtQueue` run on it unchanged. It
//! overrides where virtio-drivers 0.13 deviates from the specification:
//!
//! - `begin_init` there writes ACKNOWLEDGE|DRIVER in one status write, does
//!   not wait for the reset, and never re-reads FEATURES_OK. Here each step
//!   is its own write (0, 1, 3, 0xb, then 0xf in `finish_init`), the reset
//!   is confirmed by reading 0 back, and FEATURES_OK must still be set when
//!   the status is re-read; if not, the device gets FAILED, `max_queue_size`
//!   reports 0 (so no driver sets up a queue on it) and `finish_init` does
//!   not set DRIVER_OK. A legacy device (VERSION_1 not negotiated, only
//!   virtio-mmio version 1) has no FEATURES_OK (3.1.2): it goes 0, 1, 3, 7.
//! - Its waits have no bound: the blocking driver calls
//!   (`VirtQueue::add_notify_wait_pop`) spin on the used ring, the
//!   virtio-mmio version 2 `queue_unset` spins on QueueReady, the
//!   `PciTransport` drop spins on the status, `read_consistent` on the
//!   config generation. Here: `Health::blocking` makes `notify` wait (5 s)
//!   for the used ring to catch up; on a timeout the device is reset and the
//!   outstanding buffers are handed back as used with length 0, so the
//!   driver returns instead of spinning; the QueueReady handshake, the reset
//!   and the config generation are waited for with a bound too.
//!
//! Every failure is recorded in the transport's `Health`, which the caller
//! keeps (a shared handle) after handing the transport to a driver, and
//! turns into the `FAIL` line of its test.

use crate::drivers::doorbell::{self, Register};
use crate::drivers::spec::{mmio_reg, F_VERSION_1};
use crate::platform::time::wait_until;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use core::cell::Cell;
use core::fmt;
use core::mem::ManuallyDrop;
use core::ops::BitAnd;
use core::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};
use virtio_drivers::transport::{
    DeviceStatus, DeviceType, InterruptStatus, SomeTransport, Transport,
};
use virtio_drivers::{Error, PhysAddr, Result, PAGE_SIZE};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Bound on the status reading 0 after a reset.
const RESET_TIMEOUT_US: u64 = 1_000_000;
/// Bound on a request the blocking driver calls wait for.
const USED_TIMEOUT_US: u64 = 5_000_000;
/// Bound on QueueReady reading 0 after it was cleared.
const QUEUE_READY_TIMEOUT_US: u64 = 1_000_000;
/// Bound on the configuration generation holding still.
const CONFIG_TIMEOUT_US: u64 = 1_000_000;
/// Queues whose rings are tracked (the console uses 2).
const MAX_QUEUES: usize = 4;

/// What went wrong with a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The status did not read back as 0 after a reset.
    Reset { status: u32 },
    /// FEATURES_OK was clear when the status was read back.
    FeaturesRefused { features: u64 },
    /// The used ring of `queue` did not catch up with the available ring.
    UsedRing { queue: u16 },
    /// QueueReady of `queue` did not read back as 0 after it was cleared.
    QueueReady { queue: u16 },
    /// The configuration generation kept changing.
    ConfigGeneration,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Failure::Reset { status } => write!(
                f,
                "timeout waiting for the device to reset (status 0x{:x})",
                status
            ),
            Failure::FeaturesRefused { features } => {
                write!(f, "device refused features 0x{:x}", features)
            }
            Failure::UsedRing { queue } => {
                write!(f, "timeout waiting for the used ring of queue {}", queue)
            }
            Failure::QueueReady { queue } => {
                write!(f, "timeout waiting for QueueReady {} to read 0", queue)
            }
            Failure::ConfigGeneration => {
                write!(f, "timeout waiting for a stable config generation")
            }
        }
    }
}

/// A device's record, shared between its `StrictTransport` and the test
/// that drives it (the driver owns the transport).
#[derive(Default)]
pub struct Health {
    /// The first failure (later ones are usually its consequences).
    failure: Cell<Option<Failure>>,
    /// Whether `notify` waits for the used ring (`blocking`).
    blocking: Cell<bool>,
    /// The sizes `max_queue_size` reported, per queue.
    queue_max: [Cell<u32>; MAX_QUEUES],
}

impl Health {
    fn record(&self, failure: Failure) {
        if self.failure.get().is_none() {
            self.failure.set(Some(failure));
        }
    }

    /// The first failure, if any.
    pub fn failure(&self) -> Option<Failure> {
        self.failure.get()
    }

    /// `Err` with the first failure's text, if there was one.
    pub fn check(&self) -> core::result::Result<(), String> {
        match self.failure() {
            Some(f) => Err(format!("{}", f)),
            None => Ok(()),
        }
    }

    /// The first failure's text when there is one (it explains `other`,
    /// which is usually its consequence), else `other`.
    pub fn explain(&self, other: String) -> String {
        self.failure().map_or(other, |f| format!("{}", f))
    }

    /// Runs `f`, a blocking virtio-drivers call, with `notify` waiting (with
    /// a bound) for each request it makes; `Err` when a wait failed (or an
    /// earlier failure is on record).
    pub fn blocking<R>(&self, f: impl FnOnce() -> R) -> core::result::Result<R, String> {
        self.blocking.set(true);
        let r = f();
        self.blocking.set(false);
        self.check().map(|()| r)
    }

    /// The maximum size the device reported for `queue` (0 before a driver
    /// asked).
    pub fn queue_max(&self, queue: u16) -> u32 {
        self.queue_max
            .get(usize::from(queue))
            .map_or(0, |c| c.get())
    }
}

/// Where a queue's rings are (from `queue_set`; identity-mapped).
#[derive(Clone, Copy, Debug)]
struct Rings {
    size: u16,
    /// The driver area (available ring): flags u16, idx u16, ring[size] u16.
    avail: u64,
    /// The device area (used ring): flags u16, idx u16, ring[size] {id u32, len u32}.
    used: u64,
}

impl Rings {
    fn word(addr: u64) -> *mut u16 {
        addr as *mut u16
    }

    fn load16(addr: u64) -> u16 {
        // SAFETY: `addr` is a 2-aligned u16 inside the rings of a queue set
        // up through `queue_set` (and not unset since): memory a `VirtQueue`
        // allocated from `GuestHal` (identity-mapped heap). These accessors
        // run only from `notify`, which a driver calls while that
        // `VirtQueue` is alive, so the memory is there; the driver and the
        // device access the rings only through raw pointers and atomics,
        // never through Rust references, so an atomic access is sound.
        unsafe { AtomicU16::from_ptr(Rings::word(addr)) }.load(Ordering::Acquire)
    }

    fn store16(addr: u64, value: u16) {
        // SAFETY: as for `load16`.
        unsafe { AtomicU16::from_ptr(Rings::word(addr)) }.store(value, Ordering::Release)
    }

    fn store32(addr: u64, value: u32) {
        // SAFETY: as for `load16`: a 4-aligned u32 of the used ring.
        unsafe { AtomicU32::from_ptr(addr as *mut u32) }.store(value, Ordering::Relaxed)
    }

    fn avail_idx(&self) -> u16 {
        Rings::load16(self.avail + 2)
    }

    fn used_idx(&self) -> u16 {
        Rings::load16(self.used + 2)
    }

    /// Hands every buffer the device has not used back as used, with
    /// length 0, as the device would: each element gets the head of the
    /// chain the available ring has in that slot, then the index moves.
    /// Only called after the device was reset (or failed to reset and so
    /// stopped honouring the protocol): the driver can then take its
    /// buffers back instead of waiting forever.
    fn retire_pending(&self) {
        let (mut idx, end) = (self.used_idx(), self.avail_idx());
        while idx != end {
            let slot = u64::from(idx % self.size);
            let head = Rings::load16(self.avail + 4 + 2 * slot);
            let elem = self.used + 4 + 8 * slot;
            Rings::store32(elem, u32::from(head));
            Rings::store32(elem + 4, 0);
            idx = idx.wrapping_add(1);
        }
        fence(Ordering::Release);
        Rings::store16(self.used + 2, end);
    }
}

/// A virtio-drivers transport driven as the specification orders, with
/// bounded waits (see the module documentation).
pub struct StrictTransport {
    /// Never dropped: `PciTransport`'s drop waits for the reset without a
    /// bound; `drop` below resets with one. Neither transport owns memory.
    inner: ManuallyDrop<SomeTransport<'static>>,
    /// Register window of a virtio-mmio version 2 device, for the
    /// QueueReady handshake of `queue_unset`.
    mmio_v2: Option<u64>,
    /// The status bits set since the last reset.
    status: DeviceStatus,
    rings: [Option<Rings>; MAX_QUEUES],
    /// Per queue, a notify register `notify` writes itself (`notify_directly`)
    /// instead of going through the wrapped transport.
    direct: [Option<Register>; MAX_QUEUES],
    health: Rc<Health>,
}

impl StrictTransport {
    /// Wraps `inner`; `mmio_v2` is the register window of a virtio-mmio
    /// version 2 device (`None` for version 1 and for PCI).
    pub fn new(inner: SomeTransport<'static>, mmio_v2: Option<u64>) -> StrictTransport {
        StrictTransport {
            inner: ManuallyDrop::new(inner),
            mmio_v2,
            status: DeviceStatus::empty(),
            rings: [None; MAX_QUEUES],
            direct: [None; MAX_QUEUES],
            health: Rc::new(Health::default()),
        }
    }

    /// The device's record, to keep after handing the transport to a driver.
    pub fn health(&self) -> Rc<Health> {
        self.health.clone()
    }

    /// From now on `notify(queue)` writes `register` (found with
    /// `doorbell::registers`) itself: on PCI that is one write instead of
    /// virtio-drivers' three accesses (`queue_select`, `queue_notify_off`,
    /// the notify address). Still waits with `Health::blocking`.
    pub fn notify_directly(&mut self, queue: u16, register: Register) {
        if let Some(slot) = self.direct.get_mut(usize::from(queue)) {
            *slot = Some(register);
        }
    }

    /// Resets the device: status ← 0, then waits (bounded) for the status
    /// to read 0, as 2.4.1 and 4.1.4.3.2 require before it is used again.
    pub fn reset(&mut self) -> core::result::Result<(), Failure> {
        self.inner.set_status(DeviceStatus::empty());
        self.status = DeviceStatus::empty();
        if wait_until(RESET_TIMEOUT_US, || self.inner.get_status().is_empty()) {
            return Ok(());
        }
        let failure = Failure::Reset {
            status: self.inner.get_status().bits(),
        };
        self.health.record(failure);
        Err(failure)
    }

    /// Sets one more status bit: one step, one write.
    fn step(&mut self, bit: DeviceStatus) {
        self.status |= bit;
        self.inner.set_status(self.status);
    }

    /// Records `failure` and sets FAILED: the driver gives up on the device.
    fn give_up(&mut self, failure: Failure) {
        self.health.record(failure);
        self.step(DeviceStatus::FAILED);
    }

    /// Steps 1-3 of 3.1.1 (reset, ACKNOWLEDGE, DRIVER) and the offered
    /// features (step 4). The device-specific configuration may be read
    /// now (not written); `negotiate` (or a driver's `begin_init`)
    /// continues from here without another reset.
    pub fn probe(&mut self) -> core::result::Result<u64, String> {
        self.reset().map_err(|f| format!("{}", f))?;
        self.step(DeviceStatus::ACKNOWLEDGE);
        self.step(DeviceStatus::DRIVER);
        Ok(self.inner.read_device_features())
    }

    /// Steps 1-6 of 3.1.1 (1-3 only if `probe` did not just do them):
    /// accepts `supported` ∩ offered, then FEATURES_OK, re-read. Returns
    /// the negotiated features; a refusal (or a reset that did not
    /// complete) is recorded in `health`, after which no queue can be set
    /// up and `finish_init` leaves DRIVER_OK clear.
    pub fn negotiate(&mut self, supported: u64) -> u64 {
        let probed = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER;
        if self.status != probed && self.probe().is_err() {
            return 0;
        }
        let features = self.inner.read_device_features() & supported;
        self.inner.write_driver_features(features);
        // A legacy device has no FEATURES_OK (3.1.2, 4.2.4): steps 5-6 skipped.
        if features & F_VERSION_1 != 0 {
            self.step(DeviceStatus::FEATURES_OK);
            if !self.inner.get_status().contains(DeviceStatus::FEATURES_OK) {
                self.give_up(Failure::FeaturesRefused { features });
                return features;
            }
        }
        // virtio-mmio version 1 needs it before its queues (a no-op else).
        self.inner.set_guest_page_size(PAGE_SIZE as u32);
        features
    }

    /// With `Health::blocking`: waits for the used ring of `queue` to catch
    /// up with its available ring; on a timeout resets the device and hands
    /// the outstanding buffers back (see `Rings::retire_pending`).
    fn wait_used(&mut self, queue: u16) {
        let Some(rings) = self.rings.get(usize::from(queue)).copied().flatten() else {
            return;
        };
        let caught_up = || rings.used_idx() == rings.avail_idx();
        // After a failure the device is reset: nothing is coming.
        if self.health.failure().is_none() && wait_until(USED_TIMEOUT_US, caught_up) {
            return;
        }
        self.health.record(Failure::UsedRing { queue });
        let _ = self.reset();
        rings.retire_pending();
    }

    /// The virtio-mmio version 2 way to stop a queue (4.2.2.2): QueueReady
    /// ← 0 and read back until 0 (bounded), then size and addresses ← 0.
    fn unset_mmio_queue(&mut self, base: u64, queue: u16) {
        let write = |offset: u64, value: u32| {
            // SAFETY: `base` is the register window of this device, checked
            // (aligned, ≥ 0x100 bytes) and mapped uncached at discovery;
            // these offsets are registers below 0x100. Device registers are
            // not memory any Rust object owns, and the wrapped transport
            // (which holds raw pointers to them, never references) is not
            // in use while `&mut self` is held here.
            unsafe { core::ptr::write_volatile((base + offset) as *mut u32, value) }
        };
        let read = |offset: u64| {
            // SAFETY: as for `write`; reading QueueReady has no side effect.
            unsafe { core::ptr::read_volatile((base + offset) as *const u32) }
        };
        write(mmio_reg::QUEUE_SEL, u32::from(queue));
        write(mmio_reg::QUEUE_READY, 0);
        if !wait_until(QUEUE_READY_TIMEOUT_US, || read(mmio_reg::QUEUE_READY) == 0) {
            self.health.record(Failure::QueueReady { queue });
        }
        write(mmio_reg::QUEUE_NUM, 0);
        for offset in mmio_reg::QUEUE_ADDRESSES {
            write(offset, 0);
        }
    }
}

impl Drop for StrictTransport {
    /// Resets the device (confirmed, bounded) before the driver's queue
    /// memory, dropped after its transport, goes away. The wrapped
    /// transport is not dropped (see `inner`).
    fn drop(&mut self) {
        let _ = self.reset();
    }
}

impl Transport for StrictTransport {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.write_driver_features(driver_features)
    }

    /// 0 once the device failed, so no driver sets up a queue on it.
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        if self.health.failure().is_some() {
            return 0;
        }
        let max = self.inner.max_queue_size(queue);
        if let Some(cell) = self.health.queue_max.get(usize::from(queue)) {
            cell.set(max);
        }
        max
    }

    /// Notifies (through the register named by `notify_directly`, if
    /// any); within `Health::blocking`, then waits for the request.
    fn notify(&mut self, queue: u16) {
        match self.direct.get(usize::from(queue)).copied().flatten() {
            Some(register) => doorbell::ring(register, queue),
            None => self.inner.notify(queue),
        }
        if self.health.blocking.get() {
            self.wait_used(queue);
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    /// 0 is a reset, confirmed (bounded); anything else is written as is.
    fn set_status(&mut self, status: DeviceStatus) {
        if status.is_empty() {
            let _ = self.reset();
        } else {
            self.status = status;
            self.inner.set_status(status);
        }
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    /// Delegates, and remembers where the rings are (for `wait_used`).
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        if let Some(slot) = self.rings.get_mut(usize::from(queue)) {
            *slot = Some(Rings {
                size: size.clamp(1, 1 << 15) as u16,
                avail: driver_area,
                used: device_area,
            });
        }
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }

    /// virtio-mmio version 2: the QueueReady handshake with a bound;
    /// otherwise the crate's (version 1 writes zeros, PCI does nothing).
    fn queue_unset(&mut self, queue: u16) {
        if let Some(slot) = self.rings.get_mut(usize::from(queue)) {
            *slot = None;
        }
        match self.mmio_v2 {
            Some(base) => self.unset_mmio_queue(base, queue),
            None => self.inner.queue_unset(queue),
        }
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    /// Steps 1-6 of 3.1.1, one status bit per write (see `negotiate`).
    fn begin_init<F: bitflags::Flags<Bits = u64> + BitAnd<Output = F> + fmt::Debug>(
        &mut self,
        supported_features: F,
    ) -> F {
        F::from_bits_truncate(self.negotiate(supported_features.bits()))
    }

    /// Step 8, DRIVER_OK; or FAILED when negotiation failed.
    fn finish_init(&mut self) {
        if self.health.failure().is_some() {
            self.step(DeviceStatus::FAILED);
        } else {
            self.step(DeviceStatus::DRIVER_OK);
        }
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T> {
        self.inner.read_config_space(offset)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<()> {
        self.inner.write_config_space(offset, value)
    }

    /// As the crate's, but gives up (`NotReady`, and a recorded failure)
    /// when the generation keeps changing for a second.
    fn read_consistent<T>(&self, f: impl Fn() -> Result<T>) -> Result<T> {
        let mut result = None;
        let stable = wait_until(CONFIG_TIMEOUT_US, || {
            let before = self.read_config_generation();
            let r = f();
            let same = before == self.read_config_generation();
            result = Some(r);
            same
        });
        match result {
            Some(r) if stable => r,
            _ => {
                self.health.record(Failure::ConfigGeneration);
                Err(Error::NotReady)
            }
        }
    }
}
