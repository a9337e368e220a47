//! One run of a VMM: spawned with stdout and stderr piped, each stdout line handed to the
//! caller as it arrives (with the time since the spawn), reaped with `wait4` for its rusage;
//! and what vmkit's `--stats` says on stderr.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::vmm::{Setup, Vmm};

/// The guest's first serial line.
pub const READY_LINE: &str = "vmkit-test-guest: ready";

/// A VMM process that ran to its end.
#[derive(Debug)]
pub struct Finished {
    /// Its stdout (the guest's serial output).
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// The raw wait status.
    pub status: i32,
    /// From just before the spawn to the reaping, ms.
    pub exit_ms: f64,
    /// User plus system CPU time of the process, ms.
    pub cpu_ms: f64,
    /// `ru_maxrss`: peak resident set, KiB.
    pub max_rss_kib: u64,
    /// CLOCK_MONOTONIC just before the spawn, ns.
    pub t0_ns: u64,
}

impl Finished {
    /// `self` if the process exited with status 0, else an error with its output.
    pub fn check(self, who: &str) -> Result<Self, String> {
        if libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == 0 {
            return Ok(self);
        }
        Err(format!(
            "{who} failed (wait status {}): {}\n{}",
            self.status, self.stderr, self.stdout
        ))
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the clock `std::time::Instant` uses on Linux, and the one
/// vmkit's `--stats` prints).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec, a local we own and pass by a valid
    // exclusive pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn timeval_ms(t: libc::timeval) -> f64 {
    t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3
}

/// Reaps `child` with `wait4`: its wait status and rusage. `child` must not have been waited
/// for already (nor be waited for afterwards).
fn reap(child: &Child) -> Result<(i32, libc::rusage), String> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain integers and timevals, for which all-zero bytes are valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not reaped yet (std only reaps in `wait`/`try_wait`,
    // which nothing calls on it), so the pid cannot have been reused; wait4 writes only the
    // status and the rusage, locals we own and pass by valid exclusive pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    if r != pid {
        return Err(format!("wait4({pid}): {}", std::io::Error::last_os_error()));
    }
    Ok((status, ru))
}

/// Reads `from` to its end on a thread of its own (so neither pipe can fill up and stall
/// the VMM while the other is read).
fn drain(from: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut f) = from {
            let _ = f.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Hands each stdout line of `child` to `on_line` with the ms since `start`; returns all
/// of stdout.
fn read_lines(
    child: &mut Child,
    start: Instant,
    on_line: &mut dyn FnMut(&str, f64, &mut Child) -> Result<(), String>,
) -> Result<String, String> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut reader = BufReader::new(stdout);
    let (mut all, mut buf) = (String::new(), Vec::new());
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(all);
        }
        let line = String::from_utf8_lossy(&buf);
        let at_ms = start.elapsed().as_secs_f64() * 1e3;
        on_line(line.trim_end_matches(['\n', '\r']), at_ms, child)?;
        all.push_str(&line);
    }
}

/// Runs `cmd` (whose stdin the caller set) to its end, handing each stdout line to `on_line`
/// as it arrives. Should `on_line` fail, the process is killed and reaped, and the error
/// returned.
pub fn run_with(
    mut cmd: Command,
    who: &str,
    mut on_line: impl FnMut(&str, f64, &mut Child) -> Result<(), String>,
) -> Result<Finished, String> {
    let t0_ns = monotonic_ns();
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {who}: {e}"))?;
    let stderr = drain(child.stderr.take());
    let read = read_lines(&mut child, start, &mut on_line);
    if read.is_err() {
        let _ = child.kill();
    }
    let reaped = reap(&child);
    let exit_ms = start.elapsed().as_secs_f64() * 1e3;
    let stderr = stderr.join().unwrap_or_default();
    let stdout = read.map_err(|e| format!("{who}: {e}\n{stderr}"))?;
    let (status, ru) = reaped?;
    Ok(Finished {
        stdout,
        stderr,
        status,
        exit_ms,
        cpu_ms: timeval_ms(ru.ru_utime) + timeval_ms(ru.ru_stime),
        max_rss_kib: ru.ru_maxrss.max(0) as u64,
        t0_ns,
    })
}

/// `vmm` booting the guest with `cmdline` (128 MiB) and `extra` arguments, stdin empty.
pub fn run(setup: &Setup, vmm: Vmm, cmdline: &str, extra: &[&str]) -> Result<Finished, String> {
    let mut cmd = setup.command(vmm, "128M", cmdline);
    cmd.args(extra).stdin(Stdio::null());
    run_with(cmd, vmm.name(), |_, _, _| Ok(()))
}

/// One timed boot, the start-up figures.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    /// Process start → guest ready line, ms.
    pub ready_ms: f64,
    /// Process start → exit, ms.
    pub exit_ms: f64,
    /// Process start → vmkit entering the guest, ms (vmkit only).
    pub setup_ms: Option<f64>,
    /// vmkit's CPU time until it entered the guest, ms (vmkit only).
    pub setup_cpu_ms: Option<f64>,
    /// CPU time of the whole run, ms.
    pub cpu_ms: f64,
    /// vCPU exits to the VMM, PIO and MMIO (vmkit only).
    pub exits: Option<f64>,
}

/// Runs `vmm` once with `extra` arguments and times it; fails unless it exits with 0.
pub fn timed(setup: &Setup, vmm: Vmm, cmdline: &str, extra: &[&str]) -> Result<Timed, String> {
    let mut ready_ms = None;
    let mut cmd = setup.command(vmm, "128M", cmdline);
    cmd.args(extra).stdin(Stdio::null());
    let done = run_with(cmd, vmm.name(), |line, at_ms, _| {
        if ready_ms.is_none() && line.contains(READY_LINE) {
            ready_ms = Some(at_ms);
        }
        Ok(())
    })?
    .check(vmm.name())?;
    let entry = entry_line(&done.stderr, done.t0_ns);
    Ok(Timed {
        ready_ms: ready_ms
            .ok_or_else(|| format!("{}: no ready line:\n{}", vmm.name(), done.stdout))?,
        exit_ms: done.exit_ms,
        setup_ms: entry.map(|e| e.0),
        setup_cpu_ms: entry.map(|e| e.1),
        cpu_ms: done.cpu_ms,
        exits: vcpu_exits(&done.stderr),
    })
}

/// From vmkit's `--stats` line `vmkit: entering guest at monotonic_ns=N cpu_us=M`: (ms from
/// `t0_ns` to guest entry, CPU ms until then).
pub fn entry_line(stderr: &str, t0_ns: u64) -> Option<(f64, f64)> {
    let rest = stderr
        .lines()
        .find_map(|l| l.strip_prefix("vmkit: entering guest at monotonic_ns="))?;
    let (ns, cpu) = rest.split_once(" cpu_us=")?;
    let ns: u64 = ns.parse().ok()?;
    let cpu: u64 = cpu.trim().parse().ok()?;
    Some((ns.saturating_sub(t0_ns) as f64 / 1e6, cpu as f64 / 1e3))
}

/// The vCPU exits of one kind (`pio` or `mmio`) vmkit's `--stats` counted, over all vCPUs
/// (`vmkit: vcpu0: 782 pio exits, 128 mmio exits, 1 interrupted`); `None` without such lines.
pub fn exit_count(stderr: &str, kind: &str) -> Option<f64> {
    let counts: Vec<f64> = stderr
        .lines()
        .filter(|l| l.starts_with("vmkit: vcpu") && l.contains(" exits, "))
        .filter_map(|l| {
            let before = l.split(&format!(" {kind} exits")).next()?;
            before.rsplit(' ').next()?.parse().ok()
        })
        .collect();
    (!counts.is_empty()).then(|| counts.iter().sum())
}

/// PIO plus MMIO exits of all vCPUs by vmkit's `--stats`.
pub fn vcpu_exits(stderr: &str) -> Option<f64> {
    Some(exit_count(stderr, "pio")? + exit_count(stderr, "mmio")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_lines() {
        let err = "vmkit: entering guest at monotonic_ns=3000000 cpu_us=1500\n\
                   vmkit: vcpu0: 782 pio exits, 128 mmio exits, 1 interrupted\n\
                   vmkit: vcpu1: 2 pio exits, 0 mmio exits, 0 interrupted\n\
                   vmkit: debug port: 5 writes (port 0x80)\n";
        assert_eq!(entry_line(err, 1_000_000), Some((2.0, 1.5)));
        assert_eq!(exit_count(err, "pio"), Some(784.0));
        assert_eq!(exit_count(err, "mmio"), Some(128.0));
        assert_eq!(exit_count("", "pio"), None);
        assert_eq!(vcpu_exits(err), Some(912.0));
    }
}
