//! The POST / debug port: records guest writes for benchmarks and boot diagnostics.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use vm_device::bus::{MmioAddress, PioAddress, PioAddressOffset};
use vm_device::{DeviceMmio, DevicePio, MutDevicePio};

/// Number of ports of the debug port (one: 0x80).
pub const DEBUG_PORT_COUNT: u16 = 1;

/// What the debug port has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugPortStats {
    /// One-byte writes since creation or the last [`DebugPort::reset`].
    pub writes: u64,
    /// The last value written, if any.
    pub last_value: Option<u8>,
    /// Host `CLOCK_MONOTONIC` time of the first write, in ns (with timestamps on).
    pub first_write_ns: Option<u64>,
    /// Host `CLOCK_MONOTONIC` time of the last write, in ns (with timestamps on).
    pub last_write_ns: Option<u64>,
}

impl DebugPortStats {
    /// Time from the first to the last write, in ns (with timestamps on and a write seen).
    pub fn span_ns(&self) -> Option<u64> {
        Some(self.last_write_ns?.saturating_sub(self.first_write_ns?))
    }
}

/// The debug (POST) port, usually at 0x80: counts one-byte writes and keeps the last value
/// and the host time of the first and last write.
///
/// It is built for a PIO-exit benchmark, so a write costs a few atomic operations (one or
/// two locked instructions, uncontended with one writing vCPU) plus, with timestamps on,
/// one `clock_gettime(CLOCK_MONOTONIC)`, a vDSO call without a syscall (tens of ns,
/// against the microseconds of the exit itself). The state is all
/// atomics: implement [`DevicePio`] directly and register it as `Arc<DebugPort>` with no
/// `Mutex`, so vCPUs never contend on a lock here. ([`MutDevicePio`] is implemented too,
/// for uniformity with the other devices, if it is registered as `Arc<Mutex<DebugPort>>`.)
///
/// Reads return the last value written (`0xFF` before any, and for accesses that are not
/// one byte). Linux itself writes to 0x80 as an I/O delay, so expect writes beyond the
/// benchmark's.
#[derive(Debug)]
pub struct DebugPort {
    timestamps: bool,
    writes: AtomicU64,
    last_value: AtomicU8,
    // u64::MAX = no write yet.
    first_ns: AtomicU64,
    // 0 = no write yet.
    last_ns: AtomicU64,
}

impl Default for DebugPort {
    fn default() -> Self {
        Self::new()
    }
}

/// Host `CLOCK_MONOTONIC`, in ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes one `timespec` through the pointer, which points to a
    // live, exclusively borrowed local of that type, and keeps no reference to it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // CLOCK_MONOTONIC is always supported on Linux and the pointer is valid: it cannot fail.
    debug_assert_eq!(rc, 0);
    // A monotonic clock is never negative.
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

impl DebugPort {
    /// A debug port recording timestamps.
    pub fn new() -> Self {
        Self::with_timestamps(true)
    }

    /// A debug port recording timestamps or not; without, a write is an atomic store and an
    /// atomic increment, and no clock read.
    pub fn with_timestamps(timestamps: bool) -> Self {
        Self {
            timestamps,
            writes: AtomicU64::new(0),
            last_value: AtomicU8::new(0xFF),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
        }
    }

    /// Records a guest write of `value`.
    #[inline]
    pub fn record(&self, value: u8) {
        self.last_value.store(value, Ordering::Relaxed);
        if self.timestamps {
            let now = monotonic_ns();
            // Plain loads first: the read-modify-writes (locked instructions) only run when
            // they change something. min/max rather than stores so that concurrent vCPUs
            // racing between the clock read and the store cannot leave an earlier time last.
            if now < self.first_ns.load(Ordering::Relaxed) {
                self.first_ns.fetch_min(now, Ordering::Relaxed);
            }
            if now > self.last_ns.load(Ordering::Relaxed) {
                self.last_ns.fetch_max(now, Ordering::Relaxed);
            }
        }
        // Last, with release ordering: a reader that sees the count sees the rest.
        self.writes.fetch_add(1, Ordering::Release);
    }

    /// What the port has seen.
    ///
    /// Read while vCPUs write, the fields may come from different writes; read after the
    /// vCPUs stopped (or joined) for exact figures.
    pub fn stats(&self) -> DebugPortStats {
        let writes = self.writes.load(Ordering::Acquire);
        let first = self.first_ns.load(Ordering::Relaxed);
        let last = self.last_ns.load(Ordering::Relaxed);
        DebugPortStats {
            writes,
            last_value: (writes != 0).then(|| self.last_value.load(Ordering::Relaxed)),
            first_write_ns: (first != u64::MAX).then_some(first),
            last_write_ns: (last != 0).then_some(last),
        }
    }

    /// Forgets everything seen so far (between benchmark runs).
    pub fn reset(&self) {
        self.writes.store(0, Ordering::Relaxed);
        self.last_value.store(0xFF, Ordering::Relaxed);
        self.first_ns.store(u64::MAX, Ordering::Relaxed);
        self.last_ns.store(0, Ordering::Relaxed);
    }

    #[inline]
    fn read(&self, offset: PioAddressOffset, data: &mut [u8]) {
        match data {
            [b] if offset == 0 => *b = self.last_value.load(Ordering::Relaxed),
            _ => data.fill(0xFF),
        }
    }

    #[inline]
    fn write(&self, offset: PioAddressOffset, data: &[u8]) {
        if let (&[value], 0) = (data, offset) {
            self.record(value);
        }
    }
}

impl DevicePio for DebugPort {
    #[inline]
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        self.read(offset, data);
    }

    #[inline]
    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.write(offset, data);
    }
}

/// On the MMIO bus (e.g. a 4 KiB page for an MMIO-exit benchmark) a write of any width at
/// offset 0 is one write, recorded with its first byte; reads at offset 0 return the last
/// value in the first byte and `0xFF` in the others.
impl DeviceMmio for DebugPort {
    #[inline]
    fn mmio_read(&self, _base: MmioAddress, offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
        if let (Some(b), 0) = (data.first_mut(), offset) {
            *b = self.last_value.load(Ordering::Relaxed);
        }
    }

    #[inline]
    fn mmio_write(&self, _base: MmioAddress, offset: u64, data: &[u8]) {
        if let (Some(&value), 0) = (data.first(), offset) {
            self.record(value);
        }
    }
}

impl MutDevicePio for DebugPort {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        self.read(offset, data);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const BASE: PioAddress = PioAddress(0x80);

    #[test]
    fn mmio_writes_of_any_width_count_once_at_offset_0() {
        let d = DebugPort::new();
        let base = MmioAddress(0xD0F0_0000);
        d.mmio_write(base, 0, &0x1234_5678u32.to_le_bytes());
        d.mmio_write(base, 0, &[9]);
        d.mmio_write(base, 4, &[7, 7, 7, 7]); // not offset 0: ignored
        d.mmio_write(base, 0, &[]); // empty: ignored
        let st = d.stats();
        assert_eq!(st.writes, 2);
        assert_eq!(st.last_value, Some(9));
        let mut r = [0u8; 4];
        d.mmio_read(base, 0, &mut r);
        assert_eq!(r, [9, 0xFF, 0xFF, 0xFF]);
        d.mmio_read(base, 8, &mut r);
        assert_eq!(r, [0xFF; 4]);
    }

    #[test]
    fn counts_writes_keeps_last_value_and_times() {
        let port = DebugPort::new();
        assert_eq!(port.stats(), DebugPortStats::default());
        let mut b = [0u8];
        DevicePio::pio_read(&port, BASE, 0, &mut b);
        assert_eq!(b, [0xFF]);

        let before = monotonic_ns();
        DevicePio::pio_write(&port, BASE, 0, &[0x12]);
        let first = port.stats();
        assert_eq!(first.writes, 1);
        assert_eq!(first.last_value, Some(0x12));
        assert!(first.first_write_ns.unwrap() >= before);
        assert_eq!(first.first_write_ns, first.last_write_ns);
        assert_eq!(first.span_ns(), Some(0));

        std::thread::sleep(std::time::Duration::from_millis(2));
        DevicePio::pio_write(&port, BASE, 0, &[0x34]);
        let after = monotonic_ns();
        let st = port.stats();
        assert_eq!(st.writes, 2);
        assert_eq!(st.last_value, Some(0x34));
        assert_eq!(st.first_write_ns, first.first_write_ns);
        assert!(st.last_write_ns.unwrap() <= after);
        assert!(st.span_ns().unwrap() >= 2_000_000);
        DevicePio::pio_read(&port, BASE, 0, &mut b);
        assert_eq!(b, [0x34]);

        // Wrong sizes and offsets are not writes.
        DevicePio::pio_write(&port, BASE, 0, &[1, 2]);
        DevicePio::pio_write(&port, BASE, 1, &[1]);
        DevicePio::pio_write(&port, BASE, 0, &[]);
        assert_eq!(port.stats().writes, 2);
        let mut w = [0u8; 2];
        DevicePio::pio_read(&port, BASE, 0, &mut w);
        assert_eq!(w, [0xFF; 2]);

        port.reset();
        assert_eq!(port.stats(), DebugPortStats::default());
    }

    #[test]
    fn without_timestamps_and_behind_a_mutex() {
        let port = Mutex::new(DebugPort::with_timestamps(false));
        // Through vm-device's blanket `DevicePio for Mutex<T: MutDevicePio>`.
        DevicePio::pio_write(&port, BASE, 0, &[7]);
        let st = port.lock().unwrap().stats();
        assert_eq!(st.writes, 1);
        assert_eq!(st.last_value, Some(7));
        assert_eq!(
            (st.first_write_ns, st.last_write_ns, st.span_ns()),
            (None, None, None)
        );
    }

    #[test]
    fn concurrent_writers_all_counted() {
        let port = Arc::new(DebugPort::new());
        let threads: Vec<_> = (0..4u8)
            .map(|i| {
                let port = port.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        DevicePio::pio_write(&*port, BASE, 0, &[i]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let st = port.stats();
        assert_eq!(st.writes, 4000);
        assert!(st.last_value.unwrap() < 4);
        assert!(st.first_write_ns.unwrap() <= st.last_write_ns.unwrap());
    }
}
