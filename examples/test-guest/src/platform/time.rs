//! TSC frequency (CPUID or PIT calibration) and TSC-based delays.

use crate::platform::arch::{cpuid, inb, outb, pause, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

/// How the TSC frequency was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TscSource {
    Cpuid,
    Pit,
}

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

/// TSC frequency in kHz (0 before `init`).
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Determines the TSC frequency; returns it in kHz and how it was found.
pub fn init() -> (u64, TscSource) {
    let (khz, source) = match from_cpuid() {
        Some(khz) => (khz, TscSource::Cpuid),
        None => (calibrate_with_pit(), TscSource::Pit),
    };
    // A broken PIT must not leave us dividing by zero: assume 1 GHz.
    let khz = if khz == 0 { 1_000_000 } else { khz };
    TSC_KHZ.store(khz, Ordering::Relaxed);
    (khz, source)
}

fn from_cpuid() -> Option<u64> {
    // Hypervisor timing leaf (VMware convention, also QEMU/KVM): EAX = TSC kHz.
    if cpuid(1, 0).ecx & (1 << 31) != 0 {
        let max = cpuid(0x4000_0000, 0).eax;
        if (0x4000_0010..0x4000_0100).contains(&max) {
            let khz = cpuid(0x4000_0010, 0).eax;
            if khz != 0 {
                return Some(u64::from(khz));
            }
        }
    }
    let max = cpuid(0, 0).eax;
    if max >= 0x15 {
        let l = cpuid(0x15, 0);
        let (den, num, mut crystal) = (u64::from(l.eax), u64::from(l.ebx), u64::from(l.ecx));
        if den != 0 && num != 0 {
            if crystal == 0 && max >= 0x16 {
                // SDM: crystal = base frequency * denominator / numerator.
                crystal = u64::from(cpuid(0x16, 0).eax) * 1_000_000 * den / num;
            }
            if crystal != 0 {
                return Some(crystal * num / den / 1000);
            }
        }
    }
    None
}

/// Times ~10 ms of PIT channel 0 with the TSC, reading the counter back
/// with the latch command. (Channel 2 gated through port 0x61 is the classic
/// way, but QEMU microvm has no port 0x61.) The PIC is masked first so the
/// channel-0 interrupt goes nowhere.
fn calibrate_with_pit() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    const TARGET: u64 = 11_932; // 10 ms of PIT ticks

    fn read_counter() -> (u64, u64) {
        outb(0x43, 0x00); // latch channel 0
        let tsc = rdtsc();
        let lo = u64::from(inb(0x40));
        let hi = u64::from(inb(0x40));
        ((hi << 8) | lo, tsc)
    }

    crate::platform::apic::mask_pic();
    outb(0x43, 0x30); // channel 0, lobyte/hibyte, mode 0 (count down once)
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    let (first, t0) = read_counter();
    let (mut last, mut t1) = (first, t0);
    for i in 0..1_000_000u32 {
        (last, t1) = read_counter();
        // Done, wrapped, or no PIT at all (the count never moves).
        if last > first || first - last >= TARGET || (i >= 2000 && last == first) {
            break;
        }
    }
    let ticks = first.saturating_sub(last);
    if ticks == 0 {
        return 0;
    }
    (t1 - t0) * PIT_HZ / ticks / 1000
}

/// TSC cycles in `us` microseconds.
pub fn us_to_cycles(us: u64) -> u64 {
    us * tsc_khz() / 1000
}

/// Converts a TSC delta to nanoseconds.
pub fn cycles_to_ns(cycles: u64) -> u64 {
    (u128::from(cycles) * 1_000_000 / u128::from(tsc_khz().max(1))) as u64
}

/// Busy-waits `us` microseconds (at CPL3).
pub fn delay_us(us: u64) {
    let end = rdtsc() + us_to_cycles(us);
    while rdtsc() < end {
        pause();
    }
}

/// Two looks at the clock further apart than this were a pause of the VM
/// (for a snapshot, say) or of this vCPU by the host: a [`Deadline`] does
/// not count the time between them.
const PAUSE_GAP_US: u64 = 50_000;

/// A timeout in time this vCPU was seen running. Each [`expired`] call
/// counts the TSC cycles since the previous one, unless there were more
/// than 50 ms of them (or the TSC went back): so a guest paused, or
/// snapshotted and restored, in the middle of a wait does not time out the
/// moment it runs again, while a device that never answers still does.
///
/// [`expired`]: Deadline::expired
pub struct Deadline {
    left: u64,
    last: u64,
    gap: u64,
}

impl Deadline {
    /// `us` microseconds from now.
    pub fn new(us: u64) -> Deadline {
        Deadline {
            left: us_to_cycles(us),
            last: rdtsc(),
            gap: us_to_cycles(PAUSE_GAP_US),
        }
    }

    /// Whether the time is up.
    pub fn expired(&mut self) -> bool {
        let now = rdtsc();
        let step = now.wrapping_sub(self.last);
        self.last = now;
        if step <= self.gap {
            self.left = self.left.saturating_sub(step);
        }
        self.left == 0
    }
}

/// Spins (at CPL3) until `done()` or `timeout_us` of running time (see
/// [`Deadline`]) elapse; returns `done()`.
pub fn wait_until(timeout_us: u64, mut done: impl FnMut() -> bool) -> bool {
    let mut deadline = Deadline::new(timeout_us);
    loop {
        if done() {
            return true;
        }
        if deadline.expired() {
            return done();
        }
        pause();
    }
}
