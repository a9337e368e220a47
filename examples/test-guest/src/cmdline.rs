//! The guest command line: space-separated `key=value` pairs.
//!
//! `test=NAME[,NAME...]` (names from `cases::CASES`, `all`, and
//! `blk-verify:MiB`), `bench=pio:N`, `bench=mmio:N[:ADDR]`,
//! `bench=blk-rand4k|blk-seq128k:QD:SECONDS`, `bench=net-tx|net-rx:SECONDS`
//! (comma-separated, repeatable), `blk-write-flush=SECTOR:HEX32`, `hold=serial|ticks:N`,
//! `exit=poweroff|reset|halt`, `pci=auto|ecam|cam|off`, the
//! `test=virtio-net` parameters `net_ip=A.B.C.D`, `net_peer=A.B.C.D`,
//! `net_port=N` and `net_bytes=N[K|M|G]`, the `test=virtio-vsock`
//! parameters `vsock_port=`, `vsock_echo_port=`, `vsock_refused_port=`,
//! `vsock_listen=`, `vsock_bytes=`, `vsock_conns=`, `vsock_chunk=` and
//! `vsock_cases=`, the `test=soak` parameter `soak_rounds=N`,
//! `bench=vsock-tx|vsock-rx:SECONDS` and
//! `bench=vsock-lat:N`, and any number of
//! `virtio_mmio.device=SIZE@ADDR[:IRQ[:ID]]` (the form Linux parses).
//!
//! The types these turn into belong to the modules that use them; this
//! module only parses, and reports what it does not understand.

use crate::bench::blk::{BlkBench, Workload, MAX_QD};
use crate::bench::exits::{ExitBench, MMIO_BENCH_ADDR};
use crate::bench::hold::Hold;
use crate::bench::net::{Direction, NetBench};
use crate::bench::vsock::VsockBench;
use crate::cases::blk_write_flush::WriteFlush;
use crate::cases::soak;
use crate::cases::virtio_net::NetParams;
use crate::cases::virtio_vsock::{SubCases, VsockParams};
use crate::cases::{BadItem, Selection};
use crate::drivers::pci::PciMode;
use crate::drivers::virtio::MmioDevice;
use crate::platform::power::Exit;
use crate::println;
use core::net::Ipv4Addr;

/// Largest number of `virtio_mmio.device=` entries kept.
pub const VIRTIO_MMIO_MAX: usize = 16;
/// Largest number of `bench=pio`/`bench=mmio` entries kept.
pub const EXIT_BENCH_MAX: usize = 8;
/// Largest number of `bench=blk-...` entries kept.
pub const BLK_BENCH_MAX: usize = 8;
/// Largest number of `bench=net-...` entries kept.
pub const NET_BENCH_MAX: usize = 4;
/// Largest number of `bench=vsock-...` entries kept.
pub const VSOCK_BENCH_MAX: usize = 4;
/// Largest `net_bytes=` and `vsock_bytes=` (1 TiB).
pub const NET_BYTES_MAX: u64 = 1 << 40;
/// Largest `vsock_conns=`.
pub const VSOCK_CONNS_MAX: u32 = 64;
/// Largest `vsock_chunk=` (64 KiB, the usual largest vsock packet).
pub const VSOCK_CHUNK_MAX: u64 = 64 << 10;

/// What the command line asks for.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// The `test=` cases.
    pub tests: Selection,
    pub pci: PciMode,
    /// The `virtio_mmio.device=` entries, in command-line order.
    virtio_mmio: [MmioDevice; VIRTIO_MMIO_MAX],
    virtio_mmio_count: usize,
    /// `bench=pio`/`bench=mmio` entries, in command-line order.
    exit_benches: [Option<ExitBench>; EXIT_BENCH_MAX],
    /// `bench=blk-...` entries, in command-line order.
    blk_benches: [Option<BlkBench>; BLK_BENCH_MAX],
    /// `bench=net-...` entries, in command-line order.
    net_benches: [Option<NetBench>; NET_BENCH_MAX],
    /// `bench=vsock-...` entries, in command-line order.
    vsock_benches: [Option<VsockBench>; VSOCK_BENCH_MAX],
    pub write_flush: Option<WriteFlush>,
    pub hold: Option<Hold>,
    pub exit: Exit,
    /// The `net_*=` parameters of `test=virtio-net`.
    pub net: NetParams,
    /// The `vsock_*=` parameters of `test=virtio-vsock` and the vsock
    /// benchmarks.
    pub vsock: VsockParams,
    /// `soak_rounds=` of `test=soak`.
    pub soak_rounds: u32,
}

impl Config {
    /// Parses `cmdline`, reporting (and ignoring) what it does not understand.
    pub fn parse(cmdline: &str) -> Config {
        let mut cfg = Config {
            tests: Selection::NONE,
            pci: PciMode::Auto,
            virtio_mmio: [MmioDevice::default(); VIRTIO_MMIO_MAX],
            virtio_mmio_count: 0,
            exit_benches: [None; EXIT_BENCH_MAX],
            blk_benches: [None; BLK_BENCH_MAX],
            net_benches: [None; NET_BENCH_MAX],
            vsock_benches: [None; VSOCK_BENCH_MAX],
            write_flush: None,
            hold: None,
            exit: Exit::Poweroff,
            net: NetParams::DEFAULT,
            vsock: VsockParams::DEFAULT,
            soak_rounds: soak::DEFAULT_ROUNDS,
        };
        for word in cmdline.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            cfg.apply(key, value);
        }
        cfg
    }

    /// Takes one `key=value`.
    fn apply(&mut self, key: &str, value: &str) {
        let taken = match key {
            "test" => {
                self.add_tests(value);
                true
            }
            "bench" => {
                self.add_benches(value);
                true
            }
            "virtio_mmio.device" => {
                self.add_mmio_device(value);
                true
            }
            "blk-write-flush" => parse_write_flush(value)
                .map(|wf| self.write_flush = Some(wf))
                .is_some(),
            "hold" => parse_hold(value).map(|h| self.hold = Some(h)).is_some(),
            "exit" => parse_exit(value).map(|e| self.exit = e).is_some(),
            "pci" => parse_pci(value).map(|p| self.pci = p).is_some(),
            "net_ip" | "net_peer" | "net_port" | "net_bytes" => self.net_param(key, value),
            "vsock_port" | "vsock_echo_port" | "vsock_refused_port" | "vsock_listen"
            | "vsock_bytes" | "vsock_conns" | "vsock_chunk" | "vsock_cases" => {
                self.vsock_param(key, value)
            }
            "soak_rounds" => value
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=soak::MAX_ROUNDS).contains(n))
                .map(|n| self.soak_rounds = n)
                .is_some(),
            other => {
                println!("cmdline: unknown key {}", other);
                true
            }
        };
        if !taken {
            println!("cmdline: bad value {}={}", key, value);
        }
    }

    /// Takes one `net_*=` parameter; false for a bad value.
    fn net_param(&mut self, key: &str, value: &str) -> bool {
        let net = &mut self.net;
        match key {
            "net_ip" => value.parse::<Ipv4Addr>().map(|ip| net.ip = ip).is_ok(),
            "net_peer" => value.parse::<Ipv4Addr>().map(|ip| net.peer = ip).is_ok(),
            "net_port" => match value.parse::<u16>() {
                Ok(port) if port != 0 => {
                    net.port = port;
                    true
                }
                _ => false,
            },
            _ => parse_net_bytes(value).map(|n| net.bytes = n).is_some(),
        }
    }

    /// Takes one `vsock_*=` parameter; false for a bad value.
    fn vsock_param(&mut self, key: &str, value: &str) -> bool {
        let vsock = &mut self.vsock;
        // vsock ports are 32-bit; 0xffffffff is VMADDR_PORT_ANY.
        let port = || value.parse::<u32>().ok().filter(|&p| p != u32::MAX);
        let taken = match key {
            "vsock_port" => port().map(|p| vsock.port = p),
            "vsock_echo_port" => port().map(|p| vsock.echo_port = p),
            "vsock_refused_port" => port().map(|p| vsock.refused_port = p),
            "vsock_listen" => port().map(|p| vsock.listen = p),
            "vsock_bytes" => parse_net_bytes(value).map(|n| vsock.bytes = n),
            "vsock_conns" => value
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=VSOCK_CONNS_MAX).contains(n))
                .map(|n| vsock.conns = n),
            "vsock_chunk" => parse_net_bytes(value)
                .filter(|&n| n <= VSOCK_CHUNK_MAX)
                .map(|n| vsock.chunk = n as u32),
            _ => SubCases::parse(value).map(|c| vsock.cases = c),
        };
        taken.is_some()
    }

    fn add_tests(&mut self, value: &str) {
        for item in value.split(',').filter(|n| !n.is_empty()) {
            match self.tests.add(item) {
                Ok(()) => {}
                Err(BadItem::Unknown) => println!("cmdline: unknown test {}", item),
                Err(BadItem::BadValue) => println!("cmdline: bad value test={}", item),
            }
        }
    }

    fn add_benches(&mut self, value: &str) {
        for item in value.split(',') {
            let added = if item.starts_with("blk-") {
                parse_blk_bench(item).map(|b| push(&mut self.blk_benches, b))
            } else if item.starts_with("net-") {
                parse_net_bench(item).map(|b| push(&mut self.net_benches, b))
            } else if item.starts_with("vsock-") {
                VsockBench::parse(item).map(|b| push(&mut self.vsock_benches, b))
            } else {
                parse_exit_bench(item).map(|b| push(&mut self.exit_benches, b))
            };
            match added {
                Some(true) => {}
                Some(false) => println!("cmdline: too many bench={}", item),
                None => println!("cmdline: bad value bench={}", item),
            }
        }
    }

    fn add_mmio_device(&mut self, value: &str) {
        match parse_mmio_device(value) {
            Some(dev) if self.virtio_mmio_count < VIRTIO_MMIO_MAX => {
                self.virtio_mmio[self.virtio_mmio_count] = dev;
                self.virtio_mmio_count += 1;
            }
            Some(_) => println!("cmdline: too many virtio_mmio.device={}", value),
            None => println!("cmdline: bad value virtio_mmio.device={}", value),
        }
    }

    /// The `virtio_mmio.device=` entries.
    pub fn virtio_mmio(&self) -> &[MmioDevice] {
        &self.virtio_mmio[..self.virtio_mmio_count]
    }

    /// The `bench=pio`/`bench=mmio` entries, in command-line order.
    pub fn exit_benches(&self) -> impl Iterator<Item = ExitBench> + '_ {
        self.exit_benches.iter().flatten().copied()
    }

    /// The `bench=blk-...` entries, in command-line order.
    pub fn blk_benches(&self) -> impl Iterator<Item = BlkBench> + '_ {
        self.blk_benches.iter().flatten().copied()
    }

    /// The `bench=net-...` entries, in command-line order.
    pub fn net_benches(&self) -> impl Iterator<Item = NetBench> + '_ {
        self.net_benches.iter().flatten().copied()
    }

    /// The `bench=vsock-...` entries, in command-line order.
    pub fn vsock_benches(&self) -> impl Iterator<Item = VsockBench> + '_ {
        self.vsock_benches.iter().flatten().copied()
    }
}

fn parse_exit(value: &str) -> Option<Exit> {
    match value {
        "poweroff" => Some(Exit::Poweroff),
        "reset" => Some(Exit::Reset),
        "halt" => Some(Exit::Halt),
        _ => None,
    }
}

fn parse_pci(value: &str) -> Option<PciMode> {
    match value {
        "auto" => Some(PciMode::Auto),
        "ecam" => Some(PciMode::Ecam),
        "cam" => Some(PciMode::Cam),
        "off" => Some(PciMode::Off),
        _ => None,
    }
}

fn parse_hold(value: &str) -> Option<Hold> {
    if let Some(n) = value.strip_prefix("ticks:") {
        let n = n.parse::<u32>().ok()?;
        return (1..=crate::bench::hold::MAX_TICKS)
            .contains(&n)
            .then_some(Hold::Ticks(n));
    }
    match value {
        "serial" => Some(Hold::Serial),
        _ => None,
    }
}

/// Parses `net_bytes=` (and `vsock_bytes=`, `vsock_chunk=`): decimal with
/// an optional binary `K`, `M` or `G` suffix, 1 to `NET_BYTES_MAX`.
fn parse_net_bytes(value: &str) -> Option<u64> {
    let (digits, shift) = match value.as_bytes().last()? {
        b'K' | b'k' => (&value[..value.len() - 1], 10),
        b'M' | b'm' => (&value[..value.len() - 1], 20),
        b'G' | b'g' => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits
        .parse::<u64>()
        .ok()?
        .checked_mul(1 << shift)
        .filter(|n| (1..=NET_BYTES_MAX).contains(n))
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
        "blk-rand4k" => Workload::Rand4k,
        "blk-seq128k" => Workload::Seq128k,
        _ => return None,
    };
    let qd = fields
        .next()?
        .parse::<usize>()
        .ok()
        .filter(|q| (1..=MAX_QD).contains(q))?;
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

/// Parses `net-tx:SECONDS` / `net-rx:SECONDS` (1 to 3600).
fn parse_net_bench(item: &str) -> Option<NetBench> {
    let (kind, seconds) = item.split_once(':')?;
    let direction = match kind {
        "net-tx" => Direction::Tx,
        "net-rx" => Direction::Rx,
        _ => return None,
    };
    let seconds = seconds
        .parse::<u64>()
        .ok()
        .filter(|s| (1..=3600).contains(s))?;
    Some(NetBench { direction, seconds })
}

/// Parses `SECTOR:HEX32` (SECTOR decimal, the value hex with or without
/// `0x`).
fn parse_write_flush(value: &str) -> Option<WriteFlush> {
    let (sector, hex) = value.split_once(':')?;
    let hex = hex
        .strip_prefix("0x")
        .or_else(|| hex.strip_prefix("0X"))
        .unwrap_or(hex);
    if hex.is_empty() || hex.len() > 8 {
        return None;
    }
    Some(WriteFlush {
        sector: sector.parse::<u64>().ok()?,
        value: u32::from_str_radix(hex, 16).ok()?,
    })
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
