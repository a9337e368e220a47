//! The command line and the configuration it becomes.

use std::path::PathBuf;

use clap::Parser;

/// The reference VMM of vmkit: boots a Linux kernel (bzImage or ELF) or a PVH kernel.
#[derive(Debug, Parser)]
#[command(name = "vmkit", version, about)]
pub struct Args {
    /// Kernel image: bzImage, ELF vmlinux, or an ELF with a PVH note (the format is detected).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
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
    #[arg(long)]
    pub hugepages: bool,
    /// Where COM1 goes: stdio, file=PATH or off.
    #[arg(long, default_value = "stdio", value_parser = parse_serial, value_name = "WHERE")]
    pub serial: SerialOutput,
    /// Add a virtio-rng device (entropy from the host's getrandom) on virtio-mmio.
    #[arg(long)]
    pub rng: bool,
    /// A virtio-console (the guest's hvc0) on virtio-mmio: stdio, file=PATH, pty or off. With
    /// stdio, host stdin goes to the console rather than to the serial port.
    #[arg(long, default_value = "off", value_parser = parse_console, value_name = "WHERE")]
    pub console: ConsoleOutput,
    /// A virtio-blk disk (repeatable):
    /// `path=FILE[,readonly=on][,direct=on][,engine=sync|io_uring][,serial=ID][,queues=N][,poll_us=N]`.
    #[arg(long, value_parser = parse_disk, value_name = "SPEC")]
    pub disk: Vec<DiskSpec>,
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
    /// Print each vCPU's exit counters to stderr when the VM ends.
    #[arg(long)]
    pub stats: bool,
}

/// Where the serial port's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's stdout, and stdin to the guest.
    Stdio,
    /// A file (created or truncated).
    File(PathBuf),
    /// Nowhere: the port exists, output is dropped.
    Off,
}

/// The I/O engine of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskEngine {
    /// preadv/pwritev on the VMM's event thread.
    Sync,
    /// io_uring: many requests in flight, completions through an eventfd.
    IoUring,
}

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image file.
    pub path: PathBuf,
    /// The guest may not write.
    pub readonly: bool,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// The I/O engine.
    pub engine: DiskEngine,
    /// The id GET_ID returns (at most 20 bytes).
    pub serial: Option<String>,
    /// Request queues; `None`: one per vCPU.
    pub queues: Option<u16>,
    /// Microseconds to keep polling a queue after serving it (0: off).
    pub poll_us: u32,
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}={v}: use on or off")),
    }
}

/// How long a disk queue is polled after a kick by default (see docs/benchmarks.md).
pub const DEFAULT_POLL_US: u32 = 50;

/// Parses
/// `path=FILE[,readonly=on][,direct=on][,engine=sync|io_uring][,serial=ID][,queues=N][,poll_us=N]`.
pub fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    let mut spec = DiskSpec {
        path: PathBuf::new(),
        readonly: false,
        direct: false,
        engine: DiskEngine::Sync,
        serial: None,
        queues: None,
        poll_us: DEFAULT_POLL_US,
    };
    for item in s.split(',') {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("'{item}' is not key=value"))?;
        match k {
            "path" if !v.is_empty() => spec.path = PathBuf::from(v),
            "readonly" => spec.readonly = on_off(k, v)?,
            "direct" => spec.direct = on_off(k, v)?,
            "engine" => {
                spec.engine = match v {
                    "sync" => DiskEngine::Sync,
                    "io_uring" => DiskEngine::IoUring,
                    _ => return Err(format!("engine={v}: use sync or io_uring")),
                }
            }
            "serial" if v.len() <= 20 && v.bytes().all(|b| b.is_ascii_graphic()) => {
                spec.serial = Some(v.to_string())
            }
            "serial" => return Err(format!("serial={v}: at most 20 printable ASCII characters")),
            "queues" => {
                let n: u16 = v.parse().map_err(|_| format!("queues={v}: not a number"))?;
                if n == 0 || n > 64 {
                    return Err(format!("queues={v}: use 1 to 64"));
                }
                spec.queues = Some(n);
            }
            "poll_us" => {
                spec.poll_us = v
                    .parse()
                    .ok()
                    .filter(|n| *n <= 1000)
                    .ok_or_else(|| format!("poll_us={v}: use 0 to 1000"))?;
            }
            _ => return Err(format!("unknown or empty disk option '{item}'")),
        }
    }
    if spec.path.as_os_str().is_empty() {
        return Err("path=FILE is required".into());
    }
    Ok(spec)
}

/// The transport of the virtio devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// virtio-mmio.
    Mmio,
    /// virtio-pci (modern) with MSI-X.
    Pci,
}

/// Where the virtio-console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// No console device.
    Off,
    /// The VMM's stdout, and stdin to the guest.
    Stdio,
    /// A file (created or truncated).
    File(PathBuf),
    /// A new pseudo-terminal; its path is printed on stderr.
    Pty,
}

/// Parses `stdio`, `file=PATH`, `pty` or `off`.
pub fn parse_console(s: &str) -> Result<ConsoleOutput, String> {
    match s {
        "pty" => Ok(ConsoleOutput::Pty),
        _ => parse_serial(s)
            .map(|o| match o {
                SerialOutput::Stdio => ConsoleOutput::Stdio,
                SerialOutput::File(p) => ConsoleOutput::File(p),
                SerialOutput::Off => ConsoleOutput::Off,
            })
            .map_err(|_| format!("'{s}' is not one of stdio, file=PATH, pty, off")),
    }
}

/// Parses `stdio`, `file=PATH` or `off`.
pub fn parse_serial(s: &str) -> Result<SerialOutput, String> {
    match s {
        "stdio" => Ok(SerialOutput::Stdio),
        "off" => Ok(SerialOutput::Off),
        _ => match s.strip_prefix("file=") {
            Some("") => Err("file= needs a path".into()),
            Some(p) => Ok(SerialOutput::File(PathBuf::from(p))),
            None => Err(format!("'{s}' is not one of stdio, file=PATH, off")),
        },
    }
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
            Ok(SerialOutput::File("/tmp/x".into()))
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("pty").is_err());
    }

    #[test]
    fn disks() {
        let d = parse_disk("path=/d.img").unwrap();
        assert_eq!(d.path, PathBuf::from("/d.img"));
        assert!(!d.readonly && !d.direct && d.serial.is_none() && d.queues.is_none());
        assert_eq!(d.poll_us, DEFAULT_POLL_US);
        assert_eq!(parse_disk("path=a,poll_us=0").unwrap().poll_us, 0);
        assert_eq!(d.engine, DiskEngine::Sync);
        let d = parse_disk("path=a,readonly=on,direct=on,engine=io_uring,serial=disk0,queues=2")
            .unwrap();
        assert!(d.readonly && d.direct);
        assert_eq!(
            (d.engine, d.serial.as_deref(), d.queues),
            (DiskEngine::IoUring, Some("disk0"), Some(2))
        );
        for bad in [
            "",
            "readonly=on",
            "path=",
            "path=a,readonly=maybe",
            "path=a,engine=aio",
            "path=a,queues=0",
            "path=a,queues=x",
            "path=a,serial=123456789012345678901",
            "path=a,colour=red",
            "path=a,direct",
            "path=a,poll_us=5000",
            "path=a,poll_us=-1",
        ] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn console() {
        assert_eq!(parse_console("pty"), Ok(ConsoleOutput::Pty));
        assert_eq!(parse_console("off"), Ok(ConsoleOutput::Off));
        assert_eq!(parse_console("stdio"), Ok(ConsoleOutput::Stdio));
        assert_eq!(
            parse_console("file=/tmp/c"),
            Ok(ConsoleOutput::File("/tmp/c".into()))
        );
        assert!(parse_console("tty").is_err());
        assert!(parse_console("file=").is_err());
    }

    #[test]
    fn command_line() {
        let a = Args::try_parse_from(["vmkit", "--kernel", "k", "--cpus", "4", "--memory", "1G"])
            .unwrap();
        assert_eq!((a.cpus, a.memory), (4, 1 << 30));
        assert!(Args::try_parse_from(["vmkit"]).is_err());
        assert!(Args::try_parse_from(["vmkit", "--kernel", "k", "--memory", "lots"]).is_err());
    }
}
