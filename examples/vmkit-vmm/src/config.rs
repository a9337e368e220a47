//! The command line and what it means.

use std::path::PathBuf;

use clap::Parser;
use vmkit_virtio::RateLimiterConfig;
use vmkit_virtio_blk::{BlockConfig, DiskSource, EngineKind};

use crate::limits::{check_rates, disk_rate_key, net_rate_key, parse_rng_bw, set_rate};

/// The reference VMM of vmkit: boots a Linux kernel (bzImage or ELF) or a PVH kernel.
#[derive(Debug, Clone, Parser)]
#[command(name = "vmkit", version, about)]
pub struct Args {
    /// Kernel image: bzImage, ELF vmlinux, or an ELF with a PVH note (the format is detected).
    /// Without it, the VM is described by `--config-file` or through `--api-sock`.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk loaded next to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u32,
    /// Guest RAM, e.g. 512M or 2G (K, M, G, T: powers of 1024).
    #[arg(long, default_value = "128M", value_parser = parse_size, value_name = "SIZE")]
    pub memory: u64,
    /// Back guest RAM with 2 MiB pages from the host's hugetlb pool
    /// (`/proc/sys/vm/nr_hugepages` must hold enough).
    #[arg(long, conflicts_with = "no_thp")]
    pub hugepages: bool,
    /// Back guest RAM with 4 KiB pages only: no transparent huge pages (which vmkit asks for
    /// by default, as QEMU does), for the smallest resident footprint.
    #[arg(long)]
    pub no_thp: bool,
    /// Where COM1 goes: stdio, `file=PATH[,max_size=SIZE]` or off. The file is created or
    /// truncated once every other check has passed (a symbolic link there is refused);
    /// output past `max_size` is dropped. `,,` is a comma in PATH.
    #[arg(long, default_value = "stdio", value_parser = parse_serial, value_name = "WHERE")]
    pub serial: SerialOutput,
    /// Add a virtio-rng device (entropy from the host's getrandom).
    #[arg(long)]
    pub rng: bool,
    /// Limit the virtio-rng device (implies `--rng`) to RATE bytes a second (e.g. 1M; K, M,
    /// G: powers of 1024).
    #[arg(long = "rng-bw", value_parser = parse_rng_bw, value_name = "RATE")]
    pub rng_rate_limiter: Option<RateLimiterConfig>,
    /// A virtio-console (the guest's hvc0): stdio, `file=PATH[,max_size=SIZE]` (as for
    /// `--serial`), pty or off. With stdio, host stdin goes to the console rather than to
    /// the serial port.
    #[arg(long, default_value = "off", value_parser = parse_console, value_name = "WHERE")]
    pub console: ConsoleOutput,
    /// Bytes of guest output (serial, console) that may wait for a reader that does not keep
    /// up, per destination; beyond, output is dropped and counted in the metrics, so a
    /// stdout nobody reads never stalls the guest (4K to 64M).
    #[arg(long, default_value = "1M", value_parser = parse_output_buffer, value_name = "SIZE")]
    pub output_buffer: usize,
    /// A virtio-blk disk (repeatable):
    /// `path=FILE[,readonly=on][,direct=on][,lock=off][,engine=sync|io_uring][,serial=ID][,queues=N][,poll_us=N]`.
    /// `[,bw=RATE][,bw_burst=SIZE][,iops=N][,iops_burst=N]`: bw limits the guest to RATE
    /// bytes a second (10M: K, M, G are powers of 1024), iops to N requests a second, each
    /// with an optional one-time burst on top.
    /// In this and every `key=value` option, a comma inside a value is written `,,`
    /// (`path=a,,b.img` is the file `a,b.img`), and a key given twice is an error.
    #[arg(long, value_parser = parse_disk, value_name = "SPEC")]
    pub disk: Vec<DiskSpec>,
    /// A virtio-net card (repeatable), on an existing TAP interface:
    /// `tap=NAME[,mac=MAC][,mtu=N][,queues=N][,poll_us=N]` (one queue pair per vCPU by default
    /// when the TAP is multi-queue), or on a TAP fd this process inherited:
    /// `fd=N[,mac=MAC][,mtu=N][,poll_us=N]`; both take rate limits per direction:
    /// `[,rx_bw=RATE][,tx_bw=RATE][,rx_ops=N][,tx_ops=N]` (bytes and frames a second) and
    /// their one-time bursts `rx_bw_burst=`, `tx_bw_burst=`, `rx_ops_burst=`, `tx_ops_burst=`.
    #[arg(long, value_parser = parse_net, value_name = "SPEC")]
    pub net: Vec<NetSpec>,
    /// A virtio-vsock device with Firecracker's hybrid vsock host side:
    /// `cid=N,socket=PATH[,poll_us=N]`. The guest is CID N (3 to 4294967294); host programs connect to
    /// the Unix socket PATH and send `CONNECT <port>\n`; guest connections to host port P go
    /// to the Unix socket `PATH_P`.
    #[arg(long, value_parser = parse_vsock, value_name = "SPEC")]
    pub vsock: Option<VsockSpec>,
    /// The transport of the virtio devices: mmio (virtio-mmio windows on the command line and in
    /// the DSDT) or pci (virtio-pci functions on PCI bus 0, MSI-X, ECAM in the MCFG).
    #[arg(long, value_enum, default_value_t = Transport::Mmio)]
    pub transport: Transport,
    /// Do not add `virtio_mmio.device=` entries to the kernel command line: the guest finds its
    /// virtio-mmio devices through the DSDT alone (kernels with ACPI). Without this flag both
    /// are given, which kernels without ACPI need.
    #[arg(long)]
    pub no_mmio_cmdline: bool,
    /// The CPU model the guest sees: host (all KVM supports) or pvm (hides what a software
    /// emulator of guest kernel mode, like the kvm_pvm module's, rejects: XSAVE, AVX, CX16,
    /// PCID, FSGSBASE, SMAP, PKU, RDPID, RDRAND, POPCNT, ERMS, ...; see docs/linux-guest.md).
    #[arg(long, default_value = "host", value_name = "NAME")]
    pub cpu_template: vmkit_vcpu::CpuTemplate,
    /// Boot an ELF vmlinux through its 64-bit Linux entry even when it has a PVH note.
    #[arg(long)]
    pub no_pvh: bool,
    /// Print when the guest is entered and each vCPU's exit counters to stderr.
    #[arg(long)]
    pub stats: bool,
    /// What the VMM and its crates log: off, error, warn, info, debug or trace.
    #[arg(long, alias = "level", default_value = "warn", value_name = "LEVEL")]
    pub log_level: log::LevelFilter,
    /// Where the log goes (a file, appended to, or a FIFO); stderr without it.
    #[arg(long, alias = "log-path", value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Serve Firecracker's REST API on this Unix socket (which must not exist yet). Without
    /// `--kernel` or `--config-file`, the VM is configured and started through it.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// The VM in Firecracker's JSON layout (`boot-source`, `machine-config`, `drives`,
    /// `network-interfaces`, `vsock`, `entropy`, `logger`, `metrics`); it boots at once.
    /// The other flags give what the file leaves out (`--serial`, `--transport`...).
    #[arg(long, value_name = "FILE", conflicts_with = "kernel")]
    pub config_file: Option<PathBuf>,
    /// No API socket: the VM comes from `--config-file` (or `--kernel`) alone.
    #[arg(long, conflicts_with = "api_sock")]
    pub no_api: bool,
    /// Start the VM from a snapshot instead of booting one: DIR holds `vmstate` (the VM's
    /// state) and `memory` (guest RAM), the names a snapshot taken for `--restore` gets. The
    /// snapshot says what the VM is (vCPUs, memory, devices, transport), so the flags that
    /// describe a VM (`--kernel`, `--config-file`, `--cpus`, `--memory`, `--disk`, `--net`,
    /// `--vsock`, `--rng`, ...) are refused with it; `--serial`, `--console`, the API, logs,
    /// metrics and the sandbox flags apply as usual.
    #[arg(long, value_name = "DIR", conflicts_with_all = RESTORE_CONFLICTS)]
    pub restore: Option<PathBuf>,
    /// With `--restore` and `--api-sock`: keep the restored VM paused until `PATCH /vm`
    /// resumes it.
    #[arg(long, requires_all = ["restore", "api_sock"])]
    pub restore_paused: bool,
    /// With `--restore`: open the drive ID (its `drive_id`; the N-th `--disk`, counted from 0,
    /// is `blockN`, as in the metrics) from PATH instead of the image it was snapshotted with; the capacity
    /// must be the same (repeatable, one per drive).
    #[arg(long, value_name = "ID=PATH", value_parser = parse_restore_drive, requires = "restore")]
    pub restore_drive: Vec<RestoreDrive>,
    /// With `--restore`: attach the card ID (its `iface_id`; the N-th `--net`, counted from 0,
    /// is `netN`, as in the metrics) to the TAP interface TAP instead of the one it was snapshotted with
    /// (repeatable, one per card).
    #[arg(long, value_name = "ID=TAP", value_parser = parse_restore_net, requires = "restore")]
    pub restore_net: Vec<RestoreNet>,
    /// With `--restore`: the vsock device's host side listens on this Unix socket instead of
    /// the snapshotted one (which must not exist, as for `--vsock`).
    #[arg(long, value_name = "PATH", requires = "restore")]
    pub restore_vsock: Option<PathBuf>,
    /// Track the pages the guest and the devices write (KVM's dirty log and vmkit's own
    /// bitmaps), so that a `Diff` snapshot holds only those; with `--restore` too.
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// The instance's ID, as `GET /` reports it.
    #[arg(long, default_value = "anonymous-instance", value_name = "ID")]
    pub id: String,
    /// Metrics, one JSON object a line, to this file (appended to) or FIFO, on the API's
    /// `FlushMetrics` and every `--metrics-interval` seconds.
    #[arg(long, alias = "metrics-path", value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,
    /// Seconds between two metrics lines (0: only on `FlushMetrics` and at the end; at most a
    /// day).
    #[arg(long, default_value_t = 60, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub metrics_interval: u64,
    /// On SIGTERM, SIGINT or SIGHUP the guest is asked to shut down (the ACPI power button,
    /// then Ctrl-Alt-Del on its i8042); after this many seconds (at most a day), or on a
    /// second signal, it is stopped.
    #[arg(long, default_value_t = 10, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub shutdown_timeout: u64,
    /// Restrict vmkit's file system access with Landlock, from just before the vCPUs start, to
    /// the paths the VM was given (disks, read-only ones read-only; output, log and metrics
    /// files; the vsock socket's directory) and `--landlock-allow`'s. A `PATCH /drives` to any
    /// other path is then refused. Fails at start on a kernel without Landlock.
    #[arg(long)]
    pub landlock: bool,
    /// With `--landlock`: also allow PATH (a file, or a directory and all beneath it),
    /// read-write, or read-only with `:ro` (repeatable), e.g. for the images a `PATCH /drives`
    /// will swap in.
    #[arg(long, value_name = "PATH[:ro]", value_parser = parse_landlock_allow,
          requires = "landlock")]
    pub landlock_allow: Vec<LandlockAllow>,
    /// The seccomp filters of vmkit's threads (vCPU, event loop, API; see "Sandboxing" in
    /// README.md): kill (a call outside a thread's list kills vmkit with SIGSYS), log (the
    /// kernel logs it, the call goes through) or off.
    #[arg(long, value_enum, default_value_t = SeccompMode::Kill, value_name = "MODE")]
    pub seccomp: SeccompMode,
    /// Run as this user once /dev/kvm, the disks, TAPs and sockets are open and the devices
    /// are built, before the guest runs: `UID:GID` (numbers; the only group is GID).
    #[arg(long, value_parser = parse_user, value_name = "UID:GID")]
    pub user: Option<vmkit_seccomp::UserIds>,
    /// Tests only (the `seccomp-test-hook` feature, never in release builds): make the
    /// named thread kind (vcpu, vmm, api) call a syscall outside its list once the VM runs.
    #[cfg(feature = "seccomp-test-hook")]
    #[arg(long, hide = true, value_name = "KIND")]
    pub seccomp_test_violate: Option<String>,
    /// Tests only (the `seccomp-test-hook` feature): the API thread, once restricted by
    /// `--landlock`, tries to open this file for reading and says how that went.
    #[cfg(feature = "seccomp-test-hook")]
    #[arg(long, hide = true, value_name = "PATH")]
    pub landlock_test_api_open: Option<PathBuf>,
}

/// The flags `--restore` refuses: each describes a VM, which the snapshot already does.
const RESTORE_CONFLICTS: [&str; 16] = [
    "kernel",
    "initramfs",
    "cmdline",
    "cpus",
    "memory",
    "hugepages",
    "rng",
    "rng_rate_limiter",
    "disk",
    "net",
    "vsock",
    "transport",
    "no_mmio_cmdline",
    "cpu_template",
    "no_pvh",
    "config_file",
];

/// The file of a snapshot directory that holds the VM's state.
pub const SNAPSHOT_STATE_FILE: &str = "vmstate";
/// The file of a snapshot directory that holds guest RAM.
pub const SNAPSHOT_MEMORY_FILE: &str = "memory";

/// What `--restore` and its companion flags ask for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreArgs {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Keep the VM paused once restored (`--restore-paused`).
    pub paused: bool,
    /// Drives opened from other images (at most one per ID).
    pub drives: Vec<RestoreDrive>,
    /// Cards attached to other TAP interfaces (at most one per ID).
    pub nets: Vec<RestoreNet>,
    /// Another host socket for the vsock device.
    pub vsock: Option<PathBuf>,
    /// Track dirty pages in the restored VM (`--track-dirty-pages`).
    pub track_dirty_pages: bool,
}

impl RestoreArgs {
    /// `DIR/vmstate`: the VM's state.
    pub fn state_file(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_STATE_FILE)
    }

    /// `DIR/memory`: guest RAM.
    pub fn memory_file(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_MEMORY_FILE)
    }
}

/// One `--restore-drive ID=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreDrive {
    /// The drive's ID.
    pub id: String,
    /// The image to open instead.
    pub path: PathBuf,
}

/// One `--restore-net ID=TAP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreNet {
    /// The card's ID.
    pub id: String,
    /// The TAP interface to attach it to instead.
    pub tap: String,
}

/// Splits `ID=VALUE` at its first `=`; an empty ID or value is an error.
fn id_value<'a>(s: &'a str, what: &str) -> Result<(&'a str, &'a str), String> {
    match s.split_once('=') {
        Some((id, v)) if !id.is_empty() && !v.is_empty() => Ok((id, v)),
        _ => Err(format!("'{s}' is not ID={what}")),
    }
}

/// Parses `--restore-drive ID=PATH` (the path may hold `=`).
pub fn parse_restore_drive(s: &str) -> Result<RestoreDrive, String> {
    let (id, path) = id_value(s, "PATH")?;
    Ok(RestoreDrive {
        id: id.to_string(),
        path: PathBuf::from(path),
    })
}

/// Parses `--restore-net ID=TAP`; TAP must be a valid interface name (1 to 15 bytes, no
/// `/`, `:` or white space, not `.` or `..`).
pub fn parse_restore_net(s: &str) -> Result<RestoreNet, String> {
    let (id, tap) = id_value(s, "TAP")?;
    let bad_byte = |b: u8| b == b'/' || b == b':' || b.is_ascii_whitespace();
    if tap.len() > 15 || tap == "." || tap == ".." || tap.bytes().any(bad_byte) {
        return Err(format!(
            "'{tap}' is not an interface name (1 to 15 bytes, no '/', ':' or spaces)"
        ));
    }
    Ok(RestoreNet {
        id: id.to_string(),
        tap: tap.to_string(),
    })
}

impl Args {
    /// Parses the command line as clap does, then the checks across flags clap cannot make
    /// ([`Args::restore_args`]): an error of either is a usage error.
    pub fn try_parse_checked() -> Result<Self, clap::Error> {
        let args = Self::try_parse()?;
        args.restore_args()
            .map_err(|e| clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, e))?;
        Ok(args)
    }

    /// `--restore` and its companions, checked (`None` without `--restore`).
    ///
    /// # Errors
    ///
    /// A drive or card given twice.
    pub fn restore_args(&self) -> Result<Option<RestoreArgs>, String> {
        let Some(dir) = &self.restore else {
            return Ok(None);
        };
        for (i, d) in self.restore_drive.iter().enumerate() {
            if self.restore_drive.iter().take(i).any(|e| e.id == d.id) {
                return Err(format!("--restore-drive {}= is given twice", d.id));
            }
        }
        for (i, n) in self.restore_net.iter().enumerate() {
            if self.restore_net.iter().take(i).any(|e| e.id == n.id) {
                return Err(format!("--restore-net {}= is given twice", n.id));
            }
        }
        Ok(Some(RestoreArgs {
            dir: dir.clone(),
            paused: self.restore_paused,
            drives: self.restore_drive.clone(),
            nets: self.restore_net.clone(),
            vsock: self.restore_vsock.clone(),
            track_dirty_pages: self.track_dirty_pages,
        }))
    }
}

/// One `--landlock-allow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LandlockAllow {
    /// A file, or a directory (everything beneath it).
    pub path: PathBuf,
    /// Read-only (`:ro`), else read-write.
    pub read_only: bool,
}

/// Parses `PATH`, `PATH:ro` or `PATH:rw`; an empty path is an error.
pub fn parse_landlock_allow(s: &str) -> Result<LandlockAllow, String> {
    let (path, read_only) = match (s.strip_suffix(":ro"), s.strip_suffix(":rw")) {
        (Some(p), _) => (p, true),
        (None, Some(p)) => (p, false),
        (None, None) => (s, false),
    };
    if path.is_empty() {
        return Err(format!("'{s}' has no path (PATH, PATH:ro or PATH:rw)"));
    }
    Ok(LandlockAllow {
        path: PathBuf::from(path),
        read_only,
    })
}

/// `--seccomp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// A call outside a thread's list kills the process (SIGSYS).
    Kill,
    /// A call outside a thread's list is logged by the kernel and goes through.
    Log,
    /// No filters.
    Off,
}

/// `--user UID:GID`.
pub fn parse_user(s: &str) -> Result<vmkit_seccomp::UserIds, String> {
    let (uid, gid) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected UID:GID (numbers)"))?;
    let id = |v: &str, what: &str| {
        v.parse::<u32>()
            .ok()
            .filter(|&n| n != u32::MAX)
            .ok_or_else(|| format!("{s:?}: the {what} {v:?} is not a number below 4294967295"))
    };
    let uid = id(uid, "UID")?;
    if uid == 0 {
        return Err(format!(
            "{s:?}: UID 0 is root, which keeps every privilege; leave --user out instead"
        ));
    }
    Ok(vmkit_seccomp::UserIds {
        uid,
        gid: id(gid, "GID")?,
    })
}

/// Where the serial port's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's stdout, and stdin to the guest.
    Stdio,
    /// A file (created or truncated, opened last).
    File(OutputFile),
    /// Nowhere: the port exists, output is dropped.
    Off,
}

/// Where the virtio-console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// No console device.
    Off,
    /// The VMM's stdout, and stdin to the guest.
    Stdio,
    /// A file (created or truncated, opened last).
    File(OutputFile),
    /// A new pseudo-terminal; its path is printed on stderr.
    Pty,
}

/// `file=PATH[,max_size=SIZE]` of `--serial` and `--console`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// The file: created or truncated once every other check has passed; a symbolic link
    /// there is refused.
    pub path: PathBuf,
    /// After this many bytes, further output is dropped (and counted).
    pub max_size: Option<u64>,
}

/// The transport of the virtio devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// virtio-mmio.
    Mmio,
    /// virtio-pci (modern) with MSI-X.
    Pci,
}

/// How long a disk queue is polled after a notification unless `poll_us=` says otherwise
/// (see docs/benchmarks.md: 4 KiB QD 1 reads from the page cache gain most).
pub const DEFAULT_POLL_US: u32 = 50;

/// One `--disk`: the device crate's own configuration, checked against its limits.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// The device's configuration (its queue count is a placeholder when
    /// [`queues_per_vcpu`](Self::queues_per_vcpu) is set).
    pub config: BlockConfig,
    /// `queues=` was not given: one request queue per vCPU.
    pub queues_per_vcpu: bool,
    /// The API's `drive_id` (`None` for `--disk`): its metrics' name and what
    /// `PATCH /drives/{id}` finds it by.
    pub id: Option<String>,
}

/// Where a `--net` card's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackendSpec {
    /// An existing TAP interface, opened by name.
    Tap(String),
    /// A TAP queue fd this process inherited (opened with `IFF_VNET_HDR`).
    Fd(i32),
}

/// One `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The backend.
    pub backend: NetBackendSpec,
    /// The guest's MAC (`None`: its driver picks one).
    pub mac: Option<[u8; 6]>,
    /// The MTU the guest is told (`None`: not offered).
    pub mtu: Option<u16>,
    /// Queue pairs (`None`: one per vCPU if the TAP is multi-queue, else one).
    pub queues: Option<u16>,
    /// Transmit ring polling after a notification, in µs (0: none).
    pub poll_us: u32,
    /// Received frames' rate limiter.
    pub rx_rate_limiter: RateLimiterConfig,
    /// Transmitted frames' rate limiter.
    pub tx_rate_limiter: RateLimiterConfig,
    /// The API's `iface_id` (`None` for `--net`): what `PATCH /network-interfaces/{id}`
    /// finds it by.
    pub id: Option<String>,
}

/// `--vsock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockSpec {
    /// The guest's CID.
    pub cid: u64,
    /// The Unix socket host programs connect to.
    pub socket: PathBuf,
    /// Transmit ring polling after a notification, in µs (0: none).
    pub poll_us: u32,
}

/// Parses `cid=N,socket=PATH[,poll_us=N]`; a key given twice, a reserved CID (0, 1, 2, 2³² − 1 and up)
/// or an empty path is an error.
pub fn parse_vsock(s: &str) -> Result<VsockSpec, String> {
    let (mut cid, mut socket) = (None, None);
    let mut poll_us = 0;
    for (k, v) in &key_values(s)? {
        match k.as_str() {
            "cid" => cid = Some(number::<u64>(k, v)?),
            "poll_us" => poll_us = number(k, v)?,
            "socket" if !v.is_empty() => socket = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown or empty vsock option '{k}={v}'")),
        }
    }
    let cid = cid.ok_or("cid=N is required")?;
    if cid < 3 || cid >= u64::from(u32::MAX) {
        return Err(format!(
            "cid={cid}: 0, 1 and 2 are reserved (hypervisor, loopback, host); use 3 to 4294967294"
        ));
    }
    let socket = socket.ok_or("socket=PATH is required")?;
    Ok(VsockSpec {
        cid,
        socket,
        poll_us,
    })
}

/// The `key=value` items of a comma-separated option, the one splitter of every option with
/// keys (`--disk`, `--net`, `--vsock`, `--serial file=`, `--console file=`).
///
/// A doubled comma is a literal comma, as in QEMU (`path=a,,b.img` is the file `a,b.img`).
/// An item that is not `key=value`, an empty key, a key not in `[a-z0-9_]`, an empty value
/// and a key given twice are errors naming the item or key: a later `readonly=off` never
/// silently overrides an earlier `readonly=on`.
fn key_values(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut items: Vec<(String, String)> = Vec::new();
    for item in split_escaped(s) {
        let (k, v) = item.split_once('=').ok_or_else(|| {
            format!("'{item}' is not key=value (a comma in a value is written ,,)")
        })?;
        if k.is_empty()
            || !k
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(format!("'{item}': '{k}' is not an option name"));
        }
        if v.is_empty() {
            return Err(format!("{k}= needs a value"));
        }
        if items.iter().any(|(seen, _)| seen == k) {
            return Err(format!("{k}= is given twice"));
        }
        items.push((k.to_string(), v.to_string()));
    }
    Ok(items)
}

/// Splits `s` at single commas; `,,` is a literal comma.
fn split_escaped(s: &str) -> Vec<String> {
    let (mut items, mut item) = (Vec::new(), String::new());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            item.push(c);
        } else if chars.next_if_eq(&',').is_some() {
            item.push(',');
        } else {
            items.push(std::mem::take(&mut item));
        }
    }
    items.push(item);
    items
}

/// Parses `xx:xx:xx:xx:xx:xx` (a unicast address).
pub fn parse_mac(v: &str) -> Result<[u8; 6], String> {
    let bad = || format!("mac={v}: not a MAC address like 52:54:00:12:34:56");
    let mut mac = [0u8; 6];
    let mut parts = v.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!("mac={v}: a multicast address cannot be a card's"));
    }
    Ok(mac)
}

/// Parses `tap=NAME[,mac=MAC][,mtu=N][,queues=N][,poll_us=N]` or
/// `fd=N[,mac=MAC][,mtu=N][,poll_us=N]`; a key given twice is an error. The limits (MTU,
/// polling window) are the device crate's, checked when the card is built.
pub fn parse_net(s: &str) -> Result<NetSpec, String> {
    let (mut backend, mut mac, mut mtu, mut queues) = (None, None, None, None);
    let mut poll_us = 0;
    let (mut rx_rate_limiter, mut tx_rate_limiter) = Default::default();
    for (k, v) in &key_values(s)? {
        if let Some((rx, key)) = net_rate_key(k) {
            let limiter = if rx {
                &mut rx_rate_limiter
            } else {
                &mut tx_rate_limiter
            };
            set_rate(limiter, k, key, v)?;
            continue;
        }
        match k.as_str() {
            "tap" | "fd" if backend.is_some() => return Err("give one of tap= and fd=".into()),
            "tap" if !v.is_empty() => backend = Some(NetBackendSpec::Tap(v.to_string())),
            "fd" => backend = Some(NetBackendSpec::Fd(number(k, v)?)),
            "mac" => mac = Some(parse_mac(v)?),
            "mtu" => mtu = Some(number(k, v)?),
            "queues" => queues = Some(number(k, v)?),
            "poll_us" => poll_us = number(k, v)?,
            _ => return Err(format!("unknown or empty net option '{k}={v}'")),
        }
    }
    let backend = backend.ok_or("tap=NAME or fd=N is required")?;
    if matches!(backend, NetBackendSpec::Fd(_)) && queues.is_some() {
        return Err("queues= needs tap=NAME (an fd is one queue)".into());
    }
    if matches!(backend, NetBackendSpec::Fd(fd) if fd < 3) {
        return Err("fd= must be an inherited TAP fd, not 0, 1 or 2".into());
    }
    check_rates(&rx_rate_limiter, "rx_", "ops")?;
    check_rates(&tx_rate_limiter, "tx_", "ops")?;
    Ok(NetSpec {
        backend,
        mac,
        mtu,
        queues,
        poll_us,
        rx_rate_limiter,
        tx_rate_limiter,
        id: None,
    })
}

impl DiskSpec {
    /// The device's configuration for a VM with `cpus` vCPUs.
    pub fn block_config(&self, cpus: u32) -> BlockConfig {
        let mut c = self.config.clone();
        if self.queues_per_vcpu {
            // --cpus is at most 254, below the crate's queue limit; were it more, the
            // limit, which the device's own check then holds.
            let per_vcpu = u16::try_from(cpus).unwrap_or(u16::MAX);
            c.queues = per_vcpu.min(vmkit_virtio_blk::MAX_QUEUES);
        }
        c
    }
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}={v}: use on or off")),
    }
}

fn number<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{key}={v}: not a number"))
}

/// Sets one `key=value` of a `--disk` on `spec`.
fn disk_option(spec: &mut DiskSpec, k: &str, v: &str) -> Result<(), String> {
    let c = &mut spec.config;
    if let Some(key) = disk_rate_key(k) {
        return set_rate(&mut c.rate_limiter, k, key, v);
    }
    match k {
        "path" if !v.is_empty() => c.source = DiskSource::Path(PathBuf::from(v)),
        "readonly" => c.read_only = on_off(k, v)?,
        "direct" => c.direct = on_off(k, v)?,
        "lock" => c.lock = on_off(k, v)?,
        "engine" => {
            c.engine = match v {
                "sync" => EngineKind::Sync,
                "io_uring" => EngineKind::IoUring,
                _ => return Err(format!("engine={v}: use sync or io_uring")),
            }
        }
        "serial" if v.bytes().all(|b| b.is_ascii_graphic()) => c.serial = v.to_string(),
        "serial" => return Err(format!("serial={v}: printable ASCII only")),
        "queues" => {
            c.queues = number(k, v)?;
            spec.queues_per_vcpu = false;
        }
        "poll_us" => c.poll_us = number(k, v)?,
        _ => return Err(format!("unknown or empty disk option '{k}={v}'")),
    }
    Ok(())
}

/// Parses
/// `path=FILE[,readonly=on][,direct=on][,lock=off][,engine=sync|io_uring][,serial=ID][,queues=N][,poll_us=N]`
/// `[,bw=RATE][,bw_burst=SIZE][,iops=N][,iops_burst=N]`
/// into vmkit-virtio-blk's `BlockConfig` and checks it against that crate's limits
/// (`BlockConfig::check`), the only ones: this parser repeats none of them.
pub fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    let mut config = BlockConfig::new(PathBuf::new());
    config.poll_us = DEFAULT_POLL_US;
    let mut spec = DiskSpec {
        config,
        queues_per_vcpu: true,
        id: None,
    };
    for (k, v) in &key_values(s)? {
        disk_option(&mut spec, k, v)?;
    }
    if matches!(&spec.config.source, DiskSource::Path(p) if p.as_os_str().is_empty()) {
        return Err("path=FILE is required".into());
    }
    check_rates(&spec.config.rate_limiter, "", "iops")?;
    spec.config.check().map_err(|e| e.to_string())?;
    Ok(spec)
}

/// Parses `stdio`, `file=PATH[,max_size=SIZE]`, `pty` or `off`.
pub fn parse_console(s: &str) -> Result<ConsoleOutput, String> {
    match s {
        "pty" => Ok(ConsoleOutput::Pty),
        "stdio" => Ok(ConsoleOutput::Stdio),
        "off" => Ok(ConsoleOutput::Off),
        _ => output_file(s).map(ConsoleOutput::File).map_err(|e| {
            e.unwrap_or_else(|| format!("'{s}' is not one of stdio, file=PATH, pty, off"))
        }),
    }
}

/// Parses `stdio`, `file=PATH[,max_size=SIZE]` or `off`.
pub fn parse_serial(s: &str) -> Result<SerialOutput, String> {
    match s {
        "stdio" => Ok(SerialOutput::Stdio),
        "off" => Ok(SerialOutput::Off),
        _ => output_file(s)
            .map(SerialOutput::File)
            .map_err(|e| e.unwrap_or_else(|| format!("'{s}' is not one of stdio, file=PATH, off"))),
    }
}

/// `file=PATH[,max_size=SIZE]`: `Err(Some(why))` for a malformed one, `Err(None)` for
/// anything not starting with `file=`.
fn output_file(s: &str) -> Result<OutputFile, Option<String>> {
    if !s.starts_with("file=") {
        return Err(None);
    }
    let mut file = OutputFile {
        path: PathBuf::new(),
        max_size: None,
    };
    for (k, v) in &key_values(s)? {
        match k.as_str() {
            "file" => file.path = PathBuf::from(v),
            "max_size" => file.max_size = Some(parse_size(v)?),
            _ => return Err(Some(format!("unknown output option '{k}={v}'"))),
        }
    }
    Ok(file)
}

/// Parses `--output-buffer`: a size from 4 KiB to 64 MiB.
fn parse_output_buffer(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    if !(4 << 10..=64 << 20).contains(&n) {
        return Err(format!("'{s}' is outside 4K to 64M"));
    }
    usize::try_from(n).map_err(|_| format!("'{s}' is too large"))
}

/// Parses a size such as `512M`, `2G`, `1048576` or `64MiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!("'{s}' is not a size (examples: 512M, 2G)"));
    }
    let (num, suffix) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is too large"))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "'{s}' has an unknown unit '{suffix}' (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn user_ids_are_two_numbers() {
        let u = super::parse_user("65534:100").unwrap();
        assert_eq!((u.uid, u.gid), (65534, 100));
        assert!(
            super::parse_user("0:0").is_err(),
            "root is not a user to drop to"
        );
        assert!(super::parse_user("1000:0").is_ok());
        for bad in [
            "",
            "65534",
            "nobody:nogroup",
            "1:",
            ":1",
            "1:2:3",
            "-1:0",
            "4294967295:0",
        ] {
            let e = super::parse_user(bad).unwrap_err();
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
    }

    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in [
            "",
            "M",
            "12Q",
            "1.5G",
            "-1G",
            "99999999999999999999",
            "17179869184G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serial() {
        assert_eq!(parse_serial("stdio"), Ok(SerialOutput::Stdio));
        assert_eq!(parse_serial("off"), Ok(SerialOutput::Off));
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(SerialOutput::File(OutputFile {
                path: "/tmp/x".into(),
                max_size: None
            }))
        );
        assert_eq!(parse_serial("file="), Err("file= needs a value".into()));
        assert_eq!(
            parse_serial("file=/tmp/a,,b,max_size=1M"),
            Ok(SerialOutput::File(OutputFile {
                path: "/tmp/a,b".into(),
                max_size: Some(1 << 20)
            }))
        );
        for (bad, says) in [
            ("file=a,file=b", "file= is given twice"),
            ("file=a,max_size=1M,max_size=2M", "max_size= is given twice"),
            ("file=a,max_size=lots", "not a size"),
            ("file=a,append=on", "unknown output option"),
            ("file=a,", "'' is not key=value"),
        ] {
            let e = parse_serial(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(parse_serial("pty").is_err());
    }

    fn path_of(d: &DiskSpec) -> PathBuf {
        match &d.config.source {
            DiskSource::Path(p) => p.clone(),
            DiskSource::File(_) => PathBuf::new(),
        }
    }

    #[test]
    fn disks() {
        let d = parse_disk("path=/d.img").unwrap();
        assert_eq!(path_of(&d), PathBuf::from("/d.img"));
        let c = &d.config;
        assert!(!c.read_only && !c.direct && c.serial.is_empty() && d.queues_per_vcpu);
        assert!(c.lock, "images are locked by default");
        assert!(!parse_disk("path=a,lock=off").unwrap().config.lock);
        assert_eq!((c.poll_us, c.engine), (DEFAULT_POLL_US, EngineKind::Sync));
        assert_eq!(parse_disk("path=a,poll_us=0").unwrap().config.poll_us, 0);
        // One queue per vCPU unless told otherwise.
        assert_eq!(d.block_config(4).queues, 4);
        let d = parse_disk("path=a,readonly=on,direct=on,engine=io_uring,serial=disk0,queues=2")
            .unwrap();
        let c = &d.config;
        assert!(c.read_only && c.direct && !d.queues_per_vcpu);
        assert_eq!(
            (c.engine, c.serial.as_str(), c.queues),
            (EngineKind::IoUring, "disk0", 2)
        );
        assert_eq!(d.block_config(4).queues, 2);
        // The device crate's limits, not ours: 256 queues pass, 257 do not.
        assert!(parse_disk("path=a,queues=256").is_ok());
        for (bad, says) in [
            ("", "key=value"),
            ("readonly=on", "path=FILE"),
            ("path=", "path= needs a value"),
            (
                "path=a,readonly=on,readonly=off",
                "readonly= is given twice",
            ),
            ("path=a,path=b", "path= is given twice"),
            ("path=a,readonly=maybe", "use on or off"),
            ("path=a,engine=aio", "sync or io_uring"),
            ("path=a,queues=0", "queues"),
            ("path=a,queues=257", "queues"),
            ("path=a,queues=x", "not a number"),
            ("path=a,serial=123456789012345678901", "at most 20"),
            ("path=a,serial=a b", "printable"),
            ("path=a,colour=red", "unknown"),
            ("path=a,direct", "key=value"),
            ("path=a,poll_us=5000", "poll_us"),
            ("path=a,poll_us=-1", "not a number"),
            ("path=a,bw=0", "above 0"),
            ("path=a,bw=fast", "not a size"),
            ("path=a,bw_burst=1M", "bw_burst= needs bw="),
            ("path=a,iops_burst=8", "iops_burst= needs iops="),
        ] {
            let e = parse_disk(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn disk_and_net_rate_limits() {
        let d = parse_disk("path=a,bw=10M,bw_burst=1M,iops=1000").unwrap();
        let l = d.config.rate_limiter;
        let bw = l.bandwidth.unwrap();
        assert_eq!(
            (bw.rate_per_second(), bw.one_time_burst),
            (10 << 20, 1 << 20)
        );
        assert_eq!(l.ops.unwrap().rate_per_second(), 1000);
        assert!(parse_disk("path=a")
            .unwrap()
            .config
            .rate_limiter
            .is_unlimited());
        let n = parse_net("tap=t,rx_bw=1M,tx_ops=100,tx_ops_burst=10").unwrap();
        assert_eq!(
            n.rx_rate_limiter.bandwidth.unwrap().rate_per_second(),
            1 << 20
        );
        assert_eq!(n.rx_rate_limiter.ops, None);
        assert_eq!(n.tx_rate_limiter.ops.unwrap().one_time_burst, 10);
        assert!(n.tx_rate_limiter.bandwidth.is_none());
        let e = parse_net("tap=t,rx_bw_burst=1").unwrap_err();
        assert!(e.contains("rx_bw_burst= needs rx_bw="), "{e}");
        assert!(parse_net("tap=t,rx_iops=1")
            .unwrap_err()
            .contains("unknown"));
        let a = Args::try_parse_from(["vmkit", "--rng-bw", "64K"]).unwrap();
        let rng = a.rng_rate_limiter.unwrap().bandwidth.unwrap();
        assert_eq!(rng.rate_per_second(), 64 << 10);
        assert!(Args::try_parse_from(["vmkit", "--rng-bw", "0"]).is_err());
    }

    #[test]
    fn a_doubled_comma_is_a_comma() {
        let d = parse_disk("path=a,,b,,,readonly=on").unwrap();
        assert_eq!(path_of(&d), PathBuf::from("a,b,"));
        assert!(d.config.read_only);
        assert_eq!(
            path_of(&parse_disk("path=,,,,x").unwrap()),
            PathBuf::from(",,x")
        );
        let v = parse_vsock("cid=3,socket=/tmp/v,,1").unwrap();
        assert_eq!(v.socket, PathBuf::from("/tmp/v,1"));
        // Escaped, the comma separates nothing: this is one path.
        let d = parse_disk("path=a,,readonly=on").unwrap();
        assert_eq!(path_of(&d), PathBuf::from("a,readonly=on"));
        assert!(!d.config.read_only);
        assert_eq!(split_escaped("a,,,b"), ["a,", "b"]);
        assert_eq!(split_escaped("a,,,,b"), ["a,,b"]);
        assert_eq!(split_escaped(""), [""]);
        for (bad, says) in [
            ("path=a,", "'' is not key=value"),
            (",path=a", "'' is not key=value"),
            ("path=a,,,", "'' is not key=value"),
            ("path=a,=on", "'' is not an option name"),
            ("path=a,Readonly=on", "not an option name"),
            (",,path=a", "',path' is not an option name"),
        ] {
            let e = parse_disk(bad).map(|_| ()).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn vsocks() {
        let v = parse_vsock("cid=3,socket=/tmp/v.sock").unwrap();
        assert_eq!((v.cid, v.socket), (3, PathBuf::from("/tmp/v.sock")));
        let v = parse_vsock("socket=a,cid=4294967294").unwrap();
        assert_eq!((v.cid, v.poll_us), (4294967294, 0));
        assert_eq!(
            parse_vsock("cid=3,socket=a,poll_us=50").unwrap().poll_us,
            50
        );
        for (bad, says) in [
            ("cid=2,socket=a", "reserved"),
            ("cid=0,socket=a", "reserved"),
            ("cid=1,socket=a", "reserved"),
            ("cid=4294967295,socket=a", "reserved"),
            ("cid=x,socket=a", "not a number"),
            ("cid=3", "socket=PATH is required"),
            ("socket=a", "cid=N is required"),
            ("cid=3,socket=", "socket= needs a value"),
            ("cid=3,socket=a,cid=4", "given twice"),
            ("cid=3,socket=a,mtu=5", "unknown"),
            ("cid=3;socket=a", "not a number"),
        ] {
            let e = parse_vsock(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn nets() {
        let n = parse_net("tap=vmtap0").unwrap();
        assert_eq!(n.backend, NetBackendSpec::Tap("vmtap0".into()));
        assert_eq!((n.mac, n.mtu, n.queues), (None, None, None));
        let n = parse_net("tap=t,mac=52:54:00:ab:CD:ef,mtu=9000,queues=2").unwrap();
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!((n.mtu, n.queues), (Some(9000), Some(2)));
        assert_eq!(parse_net("tap=t").unwrap().poll_us, 0);
        assert_eq!(parse_net("tap=t,poll_us=50").unwrap().poll_us, 50);
        let n = parse_net("fd=7,mac=02:00:00:00:00:01").unwrap();
        assert_eq!(n.backend, NetBackendSpec::Fd(7));
        for (bad, says) in [
            ("", "key=value"),
            ("mac=52:54:00:12:34:56", "tap=NAME or fd=N"),
            ("tap=", "tap= needs a value"),
            ("tap=a,tap=b", "twice"),
            ("tap=a,fd=4", "one of"),
            ("tap=a,mac=52:54:00:12:34", "not a MAC"),
            ("tap=a,mac=52:54:00:12:34:56:78", "not a MAC"),
            ("tap=a,mac=5g:54:00:12:34:56", "not a MAC"),
            ("tap=a,mac=01:00:5e:00:00:01", "multicast"),
            ("tap=a,mtu=big", "not a number"),
            ("tap=a,mtu=70000", "not a number"),
            ("tap=a,mac=52:54:00:12:34:56,mac=52:54:00:12:34:57", "twice"),
            ("fd=7,queues=2", "queues= needs tap"),
            ("fd=1", "not 0, 1 or 2"),
            ("tap=a,speed=10G", "unknown"),
        ] {
            let e = parse_net(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn console() {
        assert_eq!(parse_console("pty"), Ok(ConsoleOutput::Pty));
        assert_eq!(parse_console("off"), Ok(ConsoleOutput::Off));
        assert_eq!(parse_console("stdio"), Ok(ConsoleOutput::Stdio));
        assert_eq!(
            parse_console("file=/tmp/c"),
            Ok(ConsoleOutput::File(OutputFile {
                path: "/tmp/c".into(),
                max_size: None
            }))
        );
        assert!(parse_console("tty").is_err());
        assert!(parse_console("file=").is_err());
    }

    #[test]
    fn landlock_allow() {
        let ro = parse_landlock_allow("/srv/images:ro").unwrap();
        assert_eq!(
            (ro.path, ro.read_only),
            (PathBuf::from("/srv/images"), true)
        );
        let rw = parse_landlock_allow("/srv/a.img:rw").unwrap();
        assert_eq!(
            (rw.path, rw.read_only),
            (PathBuf::from("/srv/a.img"), false)
        );
        let plain = parse_landlock_allow("b:c.img").unwrap();
        assert_eq!(
            (plain.path, plain.read_only),
            (PathBuf::from("b:c.img"), false)
        );
        for bad in ["", ":ro", ":rw"] {
            assert!(parse_landlock_allow(bad).is_err(), "{bad}");
        }
        // Only with --landlock.
        assert!(Args::try_parse_from(["vmkit", "--landlock-allow", "/srv"]).is_err());
        let a =
            Args::try_parse_from(["vmkit", "--landlock", "--landlock-allow", "/srv:ro"]).unwrap();
        assert!(a.landlock && a.landlock_allow[0].read_only);
        assert!(!Args::try_parse_from(["vmkit"]).unwrap().landlock);
    }

    /// `vmkit EXTRA…` parsed.
    fn parse_restore(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec!["vmkit"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    /// `--restore` and its companions, in full and alone.
    #[test]
    fn restore_flags_parse_into_restore_args() {
        let parse = parse_restore;
        let a = parse(&[
            "--restore",
            "/s",
            "--api-sock",
            "/a",
            "--restore-paused",
            "--restore-drive",
            "root=/i/r=1.img",
            "--restore-drive",
            "block1=/i/d",
            "--restore-net",
            "eth0=tap1",
            "--restore-vsock",
            "/v.sock",
            "--track-dirty-pages",
            "--serial",
            "off",
        ])
        .unwrap();
        let r = a.restore_args().unwrap().unwrap();
        assert_eq!(r.state_file(), PathBuf::from("/s/vmstate"));
        assert_eq!(r.memory_file(), PathBuf::from("/s/memory"));
        assert!(r.paused && r.track_dirty_pages);
        assert_eq!(
            r.drives,
            [
                RestoreDrive {
                    id: "root".into(),
                    path: "/i/r=1.img".into()
                },
                RestoreDrive {
                    id: "block1".into(),
                    path: "/i/d".into()
                }
            ]
        );
        assert_eq!(
            r.nets,
            [RestoreNet {
                id: "eth0".into(),
                tap: "tap1".into()
            }]
        );
        assert_eq!(r.vsock, Some(PathBuf::from("/v.sock")));
        let plain = parse(&["--restore", "/s"]).unwrap();
        let r = plain.restore_args().unwrap().unwrap();
        assert!(!r.paused && !r.track_dirty_pages && r.drives.is_empty() && r.vsock.is_none());
        assert_eq!(parse(&["--kernel", "k"]).unwrap().restore_args(), Ok(None));
        assert!(
            parse(&["--kernel", "k", "--track-dirty-pages"])
                .unwrap()
                .track_dirty_pages
        );
    }

    /// The flags that describe a VM conflict with `--restore`; the companions need it.
    #[test]
    fn restore_conflicts_and_companions_are_usage_errors() {
        let parse = parse_restore;
        // A flag that describes the VM conflicts with the snapshot's description.
        for flags in [
            &["--kernel", "k"][..],
            &["--config-file", "c"],
            &["--cpus", "2"],
            &["--memory", "1G"],
            &["--disk", "path=d"],
            &["--net", "tap=t"],
            &["--vsock", "cid=3,socket=v"],
            &["--rng"],
            &["--transport", "pci"],
            &["--cmdline", "quiet"],
            &["--hugepages"],
            &["--cpu-template", "pvm"],
        ] {
            let mut argv = vec!["--restore", "/s"];
            argv.extend_from_slice(flags);
            let e = parse(&argv).unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{flags:?}"
            );
        }
        // The companions need --restore (and --restore-paused an API to resume through).
        for flags in [
            &["--restore-paused", "--api-sock", "a"][..],
            &["--restore-drive", "a=b"],
            &["--restore-net", "a=t"],
            &["--restore-vsock", "v"],
            &["--restore", "/s", "--restore-paused"],
        ] {
            assert_eq!(
                parse(flags).unwrap_err().kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{flags:?}"
            );
        }
    }

    /// Malformed `ID=VALUE`s, TAP names, and an ID given twice.
    #[test]
    fn restore_ids_and_taps_are_checked() {
        let parse = parse_restore;
        for (bad, says) in [
            ("a", "is not ID=TAP"),
            ("=t", "is not ID=TAP"),
            ("a=", "is not ID=TAP"),
            ("a=tap0123456789abc", "not an interface name"),
            ("a=t/1", "not an interface name"),
            ("a=t 1", "not an interface name"),
            ("a=..", "not an interface name"),
        ] {
            let e = parse_restore_net(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(parse_restore_net("a=tap0123456789ab").is_ok());
        assert!(parse_restore_drive("root").unwrap_err().contains("ID=PATH"));
        assert!(parse_restore_drive("root=").is_err());
        let twice = parse(&[
            "--restore",
            "/s",
            "--restore-net",
            "e=a",
            "--restore-net",
            "e=b",
        ]);
        let e = twice.unwrap().restore_args().unwrap_err();
        assert!(e.contains("--restore-net e= is given twice"), "{e}");
        let twice = parse(&[
            "--restore",
            "/s",
            "--restore-drive",
            "r=a",
            "--restore-drive",
            "r=b",
        ]);
        let e = twice.unwrap().restore_args().unwrap_err();
        assert!(e.contains("--restore-drive r= is given twice"), "{e}");
    }

    #[test]
    fn command_line() {
        let a = Args::try_parse_from(["vmkit", "--kernel", "k", "--cpus", "4", "--memory", "1G"])
            .unwrap();
        assert_eq!((a.cpus, a.memory), (4, 1 << 30));
        assert_eq!(a.log_level, log::LevelFilter::Warn);
        assert_eq!(Args::try_parse_from(["vmkit"]).unwrap().kernel, None);
        assert!(Args::try_parse_from(["vmkit", "--api-sock", "a", "--no-api"]).is_err());
        assert!(Args::try_parse_from(["vmkit", "--kernel", "k", "--config-file", "c"]).is_err());
        let a = Args::try_parse_from(["vmkit", "--level", "info", "--log-path", "l"]).unwrap();
        assert_eq!(a.log_level, log::LevelFilter::Info);
        assert_eq!(a.log_file, Some(PathBuf::from("l")));
        for flag in ["--shutdown-timeout", "--metrics-interval"] {
            assert!(Args::try_parse_from(["vmkit", flag, "86400"]).is_ok());
            assert!(
                Args::try_parse_from(["vmkit", flag, "86401"]).is_err(),
                "{flag}"
            );
        }
        assert!(Args::try_parse_from(["vmkit", "--kernel", "k", "--memory", "lots"]).is_err());
        let a = Args::try_parse_from(["vmkit", "--kernel", "k", "--log-level", "debug"]).unwrap();
        assert_eq!(a.log_level, log::LevelFilter::Debug);
        assert!(Args::try_parse_from(["vmkit", "--kernel", "k", "--log-level", "loud"]).is_err());
        assert!(
            Args::try_parse_from(["vmkit", "--kernel", "k", "--hugepages", "--no-thp"]).is_err()
        );
    }
}
