//! The guest command line: space-separated `key=value` pairs.
//!
//! `test=smp,timer,serial-irq,virtio-rng,virtio-console,virtio-irq,pci,all`,
//! `bench=pio:N`, `exit=poweroff|reset|halt`, `pci=auto|ecam|cam|off`, and
//! any number of `virtio_mmio.device=SIZE@ADDR[:IRQ[:ID]]` (the form Linux
//! parses).

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
    /// Number of `out 0x80` writes to time, if any.
    pub bench_pio: Option<u64>,
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
            bench_pio: None,
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
                            "all" => {
                                cfg.test_smp = true;
                                cfg.test_timer = true;
                                cfg.test_serial_irq = true;
                                cfg.test_virtio_rng.upgrade(Want::IfPresent);
                                cfg.test_virtio_console.upgrade(Want::IfPresent);
                                cfg.test_virtio_irq.upgrade(Want::IfPresent);
                            }
                            other => println!("cmdline: unknown test {}", other),
                        }
                    }
                }
                "bench" => match value
                    .strip_prefix("pio:")
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    Some(n) => cfg.bench_pio = Some(n),
                    None => println!("cmdline: bad value bench={}", value),
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
