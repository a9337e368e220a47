//! vCPU exits of another process, counted by the kernel and read at any moment: a perf
//! counter (`perf_event_open`) per vCPU thread on KVM's tracepoints, the same for every VMM.
//!
//! - *exits to the VMM*: `kvm:kvm_userspace_exit` with reason `KVM_EXIT_IO` or
//!   `KVM_EXIT_MMIO` (what vmkit's `--stats` counts);
//! - *MMIO/PIO exits*: every guest access that left the guest, whether KVM completed it
//!   (ioeventfd queue notifications, the in-kernel PIT and PIC) or the VMM did:
//!   `kvm:kvm_mmio` without its `unsatisfied-read` records (a read completed by the VMM
//!   is recorded twice), `kvm:kvm_fast_mmio` and `kvm:kvm_pio`.
//!
//! Both leave out the guest's serial port (COM1, ports 0x3f8–0x3ff: `kvm:kvm_pio` there,
//! every one of which goes to the VMM), so that the test guest's own report lines are not
//! counted as the network's.
//!
//! `kvm:kvm_exit` would count every exit, but this host's KVM (kvm_pvm) never fires it, and
//! debugfs (`/sys/kernel/debug/kvm/PID-FD/exits`) is closed by kernel lockdown.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;

/// `struct perf_event_attr` up to `config1` (PERF_ATTR_SIZE_VER0, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// disabled, inherit, … exclude_*: all clear (counting from the open, this thread only).
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_TRACEPOINT: u32 = 2;
/// `_IOW('$', 6, char *)`.
const PERF_EVENT_IOC_SET_FILTER: u64 = 0x4008_2406;

/// The tracepoints counted for each figure, with their filters (COM1 is ports 1016–1023).
const TO_VMM: [(&str, Option<&str>); 1] =
    [("kvm_userspace_exit", Some("reason == 2 || reason == 6"))];
const COM1: [(&str, Option<&str>); 1] = [("kvm_pio", Some("port >= 1016 && port <= 1023"))];
const MMIO_PIO: [(&str, Option<&str>); 3] = [
    ("kvm_mmio", Some("type != 0")),
    ("kvm_fast_mmio", None),
    ("kvm_pio", Some("port < 1016 || port > 1023")),
];

/// The id of tracepoint `kvm:NAME` from tracefs.
fn tracepoint_id(name: &str) -> Result<u64, String> {
    let paths = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
    let read = |p: &str| std::fs::read_to_string(format!("{p}/events/kvm/{name}/id")).ok();
    let text = paths
        .iter()
        .find_map(|p| read(p))
        .ok_or_else(|| format!("no tracepoint kvm:{name} in tracefs"))?;
    text.trim()
        .parse()
        .map_err(|e| format!("kvm:{name} id: {e}"))
}

/// A counter of tracepoint `id` on thread `tid`, counting from now.
fn open(tid: i32, id: u64, filter: Option<&str>) -> Result<File, String> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: id,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid perf_event_attr of the size it declares, alive for the call;
    // the other arguments are plain integers (this thread `tid`, any CPU, no group, no flags).
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, &attr, tid, -1, -1, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("perf_event_open(tracepoint {id}, tid {tid}): {e}"));
    }
    // SAFETY: `fd` is a new file descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd as i32) };
    if let Some(f) = filter {
        let f = CString::new(f).map_err(|e| e.to_string())?;
        // SAFETY: `file` is an open perf event; the filter is a NUL-terminated string alive
        // for the call, which the kernel only reads.
        let r = unsafe { libc::ioctl(fd as i32, PERF_EVENT_IOC_SET_FILTER as _, f.as_ptr()) };
        if r != 0 {
            return Err(format!("perf filter: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(file)
}

/// The counters on some threads.
#[derive(Debug)]
pub struct KvmCounters {
    to_vmm: Vec<File>,
    com1: Vec<File>,
    mmio_pio: Vec<File>,
}

/// Counts since [`KvmCounters::attach`], COM1 left out.
#[derive(Debug, Clone, Copy, Default)]
pub struct Exits {
    /// Exits to the VMM.
    pub to_vmm: u64,
    /// MMIO and PIO exits, completed in KVM or by the VMM.
    pub mmio_pio: u64,
}

impl KvmCounters {
    /// Counters on threads `tids` (the vCPU threads) from now.
    pub fn attach(tids: &[i32]) -> Result<Self, String> {
        let open_all = |events: &[(&str, Option<&str>)]| -> Result<Vec<File>, String> {
            let mut files = Vec::new();
            for (name, filter) in events {
                let id = tracepoint_id(name)?;
                for &tid in tids {
                    files.push(open(tid, id, *filter)?);
                }
            }
            Ok(files)
        };
        Ok(Self {
            to_vmm: open_all(&TO_VMM)?,
            com1: open_all(&COM1)?,
            mmio_pio: open_all(&MMIO_PIO)?,
        })
    }

    /// The counts so far.
    pub fn read(&self) -> Exits {
        let sum = |files: &[File]| -> u64 {
            files
                .iter()
                .map(|mut f| {
                    let mut b = [0u8; 8];
                    f.read_exact(&mut b).map_or(0, |()| u64::from_ne_bytes(b))
                })
                .sum()
        };
        Exits {
            to_vmm: sum(&self.to_vmm).saturating_sub(sum(&self.com1)),
            mmio_pio: sum(&self.mmio_pio),
        }
    }
}
