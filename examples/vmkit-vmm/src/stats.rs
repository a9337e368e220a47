//! What `--stats` prints on stderr: when the guest was entered (for start-up figures, on the
//! same clock a parent process reads) and each vCPU's exit counters.

use vmkit_vcpu::VcpuStats;

/// CLOCK_MONOTONIC in nanoseconds (the clock `std::time::Instant` uses on Linux).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time this process used so far, in microseconds.
fn cpu_time_us() -> u64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the rusage we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The moment the vCPUs were let into the guest (every seccomp filter installed).
pub fn entering_guest() {
    eprintln!(
        "vmkit: entering guest at monotonic_ns={} cpu_us={}",
        monotonic_ns(),
        cpu_time_us()
    );
}

/// Each vCPU's exit counters, and the debug port's count.
pub fn vcpus_stopped(stats: &[Option<VcpuStats>], debug_port_writes: u64) {
    for (i, s) in stats.iter().enumerate() {
        if let Some(s) = s {
            eprintln!(
                "vmkit: vcpu{i}: {} pio exits, {} mmio exits, {} interrupted",
                s.pio_exits, s.mmio_exits, s.interrupted
            );
        }
    }
    eprintln!("vmkit: debug port: {debug_port_writes} writes (port 0x80)");
}
