//! The guest command line: space-separated `key=value` pairs.
//!
//! `test=smp,timer,serial-irq,virtio-rng,virtio-console,virtio-irq,pci,all`
//! (and the virtio-blk tests `blk-verify[:MiB]`, `blk-inflight`, `blk-ro`,
//! `blk-discard`, `blk-serial`), `bench=pio:N`, `bench=mmio:N[:ADDR]`,
//! `bench=blk-rand4k|blk-seq128k:QD:SECONDS` (comma-separated, repeatable),
//! `blk-write-flush=SECTOR:HEX32`,
//! `exit=poweroff|reset|halt`, `pci=auto|ecam|cam|off`, and any number of
//! `virtio_mmio.device=SIZE@ADDR[:IRQ[:ID]]` (the form Linux parses).

use crate::println;

/// How the guest ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// ACPI S5 through the FADT.
    Poweroff,
    /// i8042 reset, then the FADT reset register.
    Reset,
    /// `cli; hlt` forever.
    Halt,
}

/// Which PCI configuration access mechanism to use for bus 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciMode {
    /// ECAM when the MCFG describes one for bus 0, else port CAM if present.
    Auto,
    /// ECAM from the MCFG only.
    Ecam,
    /// Ports 0xCF8/0xCFC only.
    Cam,
    /// No PCI scan.
    Off,
}

/// Largest number of `virtio_mmio.device=` entries kept.
pub const VIRTIO_MMIO_MAX: usize = 16;

/// One `virtio_mmio.device=SIZE@ADDR[:IRQ[:ID]]` entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioDevice {
    /// Size of the register window in bytes.
    pub size: u64,
    /// Physical address of the register window.
    pub addr: u64,
    /// Interrupt (taken as a GSI); `None` when the entry has no `:IRQ`.
    pub irq: Option<u32>,
}

/// Whether a virtio test was asked for: not at all, by name, or by `all`
/// (which runs it only when a matching device is present).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    No,
    Named,
    IfPresent,
}

impl Want {
    fn upgrade(&mut self, to: Want) {
        if *self != Want::Named {
            *self = to;
        }
    }
}

/// One VM-exit benchmark, timed at CPL3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitBench {
    /// `bench=pio:N`: N byte writes `out 0x80, al`.
    Pio(u64),
    /// `bench=mmio:N[:ADDR]`: N 32-bit writes to guest-physical `addr`.
    Mmio { n: u64, addr: u64 },
}

/// `bench=mmio`'s address when none is given (a sink device in vmkit's
/// VMM; unassigned in QEMU's microvm, where writes still exit to QEMU).
pub const MMIO_BENCH_ADDR: u64 = 0xd0f0_0000;
/// Largest number of `bench=pio`/`bench=mmio` entries kept.
pub const EXIT_BENCH_MAX: usize = 8;

/// A virtio-blk benchmark workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkWorkload {
    /// 4 KiB reads at random 4 KiB-aligned offsets.
    Rand4k,
    /// 128 KiB reads, sequential, wrapping at the end of the disk.
    Seq128k,
}

/// One `bench=blk-...:QD:SECONDS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkBench {
    pub workload: BlkWorkload,
    /// Requests kept in flight (1 to `BLK_BENCH_MAX_QD`).
    pub qd: usize,
    pub seconds: u64,
}

/// Largest benchmark queue depth (the benchmark's own queue of 128
/// descriptors, 3 per request).
pub const BLK_BENCH_MAX_QD: usize = 42;
/// Largest number of `bench=blk-...` entries kept.
pub const BLK_BENCH_MAX: usize = 8;
/// `blk-verify`'s size when named without one, and under `all`.
pub const BLK_VERIFY_MIB: u64 = 64;
pub const BLK_VERIFY_ALL_MIB: u64 = 16;

/// The virtio-blk part of the command line.
#[derive(Clone, Copy, Debug)]
pub struct BlkConfig {
    pub verify: Want,
    /// MiB written and checked by `blk-verify`.
    pub verify_mib: u64,
    pub inflight: Want,
    /// `blk-ro`: runs on read-only devices (under `all` in place of the
    /// writing tests).
    pub ro: Want,
    pub discard: Want,
    pub serial: Want,
    /// `blk-write-flush=SECTOR:HEX32`.
    pub write_flush: Option<(u64, u32)>,
    pub benches: [Option<BlkBench>; BLK_BENCH_MAX],
}

/// What the command line asks for.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub test_smp: bool,
    pub test_timer: bool,
    pub test_serial_irq: bool,
    pub test_virtio_rng: Want,
    pub test_virtio_console: Want,
    pub test_virtio_irq: Want,
    /// `test=pci`: bus 0 through port CAM and ECAM must look the same
    /// (not part of `all`).
    pub test_pci: bool,
    pub pci: PciMode,
    /// The `virtio_mmio.device=` entries, in command-line order.
    pub virtio_mmio: [MmioDevice; VIRTIO_MMIO_MAX],
    pub virtio_mmio_count: usize,
    /// `bench=pio`/`bench=mmio` entries, in command-line order.
    pub exit_benches: [Option<ExitBench>; EXIT_BENCH_MAX],
    pub blk: BlkConfig,
    pub exit: Exit,
}

impl Config {
    /// Parses `cmdline`, reporting (and ignoring) what it does not understand.
    pub fn parse(cmdline: &str) -> Config {
        let mut cfg = Config {
            test_smp: false,
            test_timer: false,
            test_serial_irq: false,
            test_virtio_rng: Want::No,
            test_virtio_console: Want::No,
            test_virtio_irq: Want::No,
            test_pci: false,
            pci: PciMode::Auto,
            virtio_mmio: [MmioDevice::default(); VIRTIO_MMIO_MAX],
            virtio_mmio_count: 0,
            exit_benches: [None; EXIT_BENCH_MAX],
            blk: BlkConfig {
                verify: Want::No,
                verify_mib: BLK_VERIFY_ALL_MIB,
                inflight: Want::No,
                ro: Want::No,
                discard: Want::No,
                serial: Want::No,
                write_flush: None,
                benches: [None; BLK_BENCH_MAX],
            },
            exit: Exit::Poweroff,
        };
        for word in cmdline.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                "test" => {
                    for name in value.split(',').filter(|n| !n.is_empty()) {
                        match name {
                            "smp" => cfg.test_smp = true,
                            "timer" => cfg.test_timer = true,
                            "serial-irq" => cfg.test_serial_irq = true,
                            "virtio-rng" => cfg.test_virtio_rng = Want::Named,
                            "virtio-console" => cfg.test_virtio_console = Want::Named,
                            "virtio-irq" => cfg.test_virtio_irq = Want::Named,
                            "pci" => cfg.test_pci = true,
                            "blk-inflight" => cfg.blk.inflight = Want::Named,
                            "blk-ro" => cfg.blk.ro = Want::Named,
                            "blk-discard" => cfg.blk.discard = Want::Named,
                            "blk-serial" => cfg.blk.serial = Want::Named,
                            "blk-verify" => {
                                cfg.blk.verify = Want::Named;
                                cfg.blk.verify_mib = BLK_VERIFY_MIB;
                            }
                            _ if name.starts_with("blk-verify:") => {
                                match name["blk-verify:".len()..]
                                    .parse::<u64>()
                                    .ok()
                                    .filter(|&m| (1..=1 << 20).contains(&m))
                                {
                                    Some(mib) => {
                                        cfg.blk.verify = Want::Named;
                                        cfg.blk.verify_mib = mib;
                                    }
                                    None => println!("cmdline: bad value test={}", name),
                                }
                            }
                            "all" => {
                                cfg.test_smp = true;
                                cfg.test_timer = true;
                                cfg.test_serial_irq = true;
                                cfg.test_virtio_rng.upgrade(Want::IfPresent);
                                cfg.test_virtio_console.upgrade(Want::IfPresent);
                                cfg.test_virtio_irq.upgrade(Want::IfPresent);
                                cfg.blk.verify.upgrade(Want::IfPresent);
                                cfg.blk.inflight.upgrade(Want::IfPresent);
                                cfg.blk.ro.upgrade(Want::IfPresent);
                                cfg.blk.discard.upgrade(Want::IfPresent);
                                cfg.blk.serial.upgrade(Want::IfPresent);
                            }
                            other => println!("cmdline: unknown test {}", other),
                        }
                    }
                }
                "bench" => {
                    for item in value.split(',') {
                        let added = if item.starts_with("blk-") {
                            parse_blk_bench(item).map(|b| push(&mut cfg.blk.benches, b))
                        } else {
                            parse_exit_bench(item).map(|b| push(&mut cfg.exit_benches, b))
                        };
                        match added {
                            Some(true) => {}
                            Some(false) => println!("cmdline: too many bench={}", item),
                            None => println!("cmdline: bad value bench={}", item),
                        }
                    }
                }
                "blk-write-flush" => match parse_write_flush(value) {
                    Some(wf) => cfg.blk.write_flush = Some(wf),
                    None => println!("cmdline: bad value blk-write-flush={}", value),
                },
                "exit" => match value {
                    "poweroff" => cfg.exit = Exit::Poweroff,
                    "reset" => cfg.exit = Exit::Reset,
                    "halt" => cfg.exit = Exit::Halt,
                    other => println!("cmdline: bad value exit={}", other),
                },
                "pci" => match value {
                    "auto" => cfg.pci = PciMode::Auto,
                    "ecam" => cfg.pci = PciMode::Ecam,
                    "cam" => cfg.pci = PciMode::Cam,
                    "off" => cfg.pci = PciMode::Off,
                    other => println!("cmdline: bad value pci={}", other),
                },
                "virtio_mmio.device" => match parse_mmio_device(value) {
                    Some(dev) if cfg.virtio_mmio_count < VIRTIO_MMIO_MAX => {
                        cfg.virtio_mmio[cfg.virtio_mmio_count] = dev;
                        cfg.virtio_mmio_count += 1;
                    }
                    Some(_) => println!("cmdline: too many virtio_mmio.device={}", value),
                    None => println!("cmdline: bad value virtio_mmio.device={}", value),
                },
                other => println!("cmdline: unknown key {}", other),
            }
        }
        cfg
    }

    /// The `virtio_mmio.device=` entries.
    pub fn virtio_mmio(&self) -> &[MmioDevice] {
        &self.virtio_mmio[..self.virtio_mmio_count]
    }

    /// The `bench=pio`/`bench=mmio` entries, in command-line order.
    pub fn exit_benches(&self) -> impl Iterator<Item = ExitBench> + '_ {
        self.exit_benches.iter().flatten().copied()
    }
}

/// Puts `item` in the first free slot; false when there is none.
fn push<T>(slots: &mut [Option<T>], item: T) -> bool {
    match slots.iter_mut().find(|s| s.is_none()) {
        Some(slot) => {
            *slot = Some(item);
            true
        }
        None => false,
    }
}

/// Parses `pio:N` / `mmio:N[:ADDR]` (N decimal, ADDR hex with or without
/// `0x`, at most 16 digits). The address is checked when the benchmark runs.
fn parse_exit_bench(item: &str) -> Option<ExitBench> {
    let mut fields = item.split(':');
    let kind = fields.next()?;
    let n = fields.next()?.parse::<u64>().ok()?;
    let bench = match kind {
        "pio" => ExitBench::Pio(n),
        "mmio" => ExitBench::Mmio {
            n,
            addr: match fields.next() {
                Some(hex) => parse_hex64(hex)?,
                None => MMIO_BENCH_ADDR,
            },
        },
        _ => return None,
    };
    if fields.next().is_some() {
        return None;
    }
    Some(bench)
}

/// Parses 1 to 16 hex digits, with or without `0x`.
fn parse_hex64(s: &str) -> Option<u64> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Parses `blk-rand4k:QD:SECONDS` / `blk-seq128k:QD:SECONDS`.
fn parse_blk_bench(item: &str) -> Option<BlkBench> {
    let mut fields = item.split(':');
    let workload = match fields.next()? {
        "blk-rand4k" => BlkWorkload::Rand4k,
        "blk-seq128k" => BlkWorkload::Seq128k,
        _ => return None,
    };
    let qd = fields
        .next()?
        .parse::<usize>()
        .ok()
        .filter(|q| (1..=BLK_BENCH_MAX_QD).contains(q))?;
    let seconds = fields
        .next()?
        .parse::<u64>()
        .ok()
        .filter(|s| (1..=3600).contains(s))?;
    if fields.next().is_some() {
        return None;
    }
    Some(BlkBench {
        workload,
        qd,
        seconds,
    })
}

/// Parses `SECTOR:HEX32` (SECTOR decimal, the value hex with or without
/// `0x`).
fn parse_write_flush(value: &str) -> Option<(u64, u32)> {
    let (sector, hex) = value.split_once(':')?;
    let sector = sector.parse::<u64>().ok()?;
    let hex = hex
        .strip_prefix("0x")
        .or_else(|| hex.strip_prefix("0X"))
        .unwrap_or(hex);
    if hex.is_empty() || hex.len() > 8 {
        return None;
    }
    Some((sector, u32::from_str_radix(hex, 16).ok()?))
}

/// Parses a leading unsigned integer the way C's `strtoull(s, _, 0)` does
/// (`0x` hex, leading `0` octal, else decimal); returns it and the rest.
fn parse_c_uint(s: &str) -> Option<(u64, &str)> {
    let (radix, digits) = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (16, hex)
    } else if s.len() > 1 && s.starts_with('0') && s.as_bytes()[1].is_ascii_digit() {
        (8, &s[1..])
    } else {
        (10, s)
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    let value = u64::from_str_radix(&digits[..end], radix).ok()?;
    Some((value, &digits[end..]))
}

/// Parses Linux's `virtio_mmio.device=` value: `SIZE@ADDR[:IRQ[:ID]]`, SIZE
/// as `memparse` reads it (a C integer with an optional K/M/G/T/P/E suffix),
/// ADDR a C integer (`0x` hex), IRQ and ID decimal. Linux requires the IRQ;
/// this guest also takes an entry without one (polling only).
pub fn parse_mmio_device(value: &str) -> Option<MmioDevice> {
    let (size, rest) = parse_c_uint(value)?;
    let (shift, rest) = match rest.as_bytes().first() {
        Some(b'K' | b'k') => (10, &rest[1..]),
        Some(b'M' | b'm') => (20, &rest[1..]),
        Some(b'G' | b'g') => (30, &rest[1..]),
        Some(b'T' | b't') => (40, &rest[1..]),
        Some(b'P' | b'p') => (50, &rest[1..]),
        Some(b'E' | b'e') => (60, &rest[1..]),
        _ => (0, rest),
    };
    let size = size.checked_mul(1u64 << shift).filter(|&s| s != 0)?;
    let (addr, rest) = parse_c_uint(rest.strip_prefix('@')?)?;
    addr.checked_add(size)?;
    let mut dev = MmioDevice {
        size,
        addr,
        irq: None,
    };
    if rest.is_empty() {
        return Some(dev);
    }
    let mut fields = rest.strip_prefix(':')?.splitn(2, ':');
    dev.irq = Some(fields.next()?.parse::<u32>().ok()?);
    if let Some(id) = fields.next() {
        // The platform-device id Linux takes: checked, otherwise unused.
        id.parse::<i32>().ok()?;
    }
    Some(dev)
}
