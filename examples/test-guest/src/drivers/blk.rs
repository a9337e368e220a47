//! virtio-blk devices through virtio-drivers' `VirtIOBlk`: what discovery
//! learns about each (the identification lines), opening the driver, and
//! taking the completions of non-blocking requests with a bound.

use crate::drivers::hal::GuestHal;
use crate::drivers::spec::{blk_config, blk_feature};
use crate::drivers::transport::{Health, StrictTransport};
use crate::drivers::virtio::{Device, Devices};
use crate::platform::arch::pause;
use crate::platform::time::Deadline;
use crate::println;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_drivers::device::blk::{RespStatus, VirtIOBlk};
use virtio_drivers::transport::{DeviceType, Transport};

/// The virtio-drivers block driver on a `StrictTransport`.
pub type Blk = VirtIOBlk<GuestHal, StrictTransport>;

/// Largest request the tests make: 128 KiB (less when `size_max` says so).
const MAX_REQUEST: usize = 128 << 10;
/// How long a request may take before a test gives up.
pub const TIMEOUT_US: u64 = 5_000_000;

/// What discovery learnt about a block device.
pub struct BlkDisk {
    pub dev: Device,
    /// In 512-byte sectors.
    pub capacity: u64,
    pub ro: bool,
    /// The device's feature bits.
    pub offered: u64,
    /// `size_max` when offered (bytes per segment).
    pub size_max: Option<u32>,
    /// Queue 0's maximum size.
    pub queue_max: u32,
}

impl BlkDisk {
    /// Bytes per request for the tests: 128 KiB, or `size_max` rounded down
    /// to 4 KiB (the `VirtIOBlk` requests have one data segment).
    pub fn request_bytes(&self) -> usize {
        match self.size_max {
            Some(m) => MAX_REQUEST.min(m as usize & !4095).max(4096),
            None => MAX_REQUEST,
        }
    }

    /// `VirtIOBlk` on a fresh transport, and the transport's health.
    pub fn open(&self, devices: &Devices) -> Result<(Blk, Rc<Health>), String> {
        let transport = devices.open(&self.dev)?;
        let health = transport.health();
        let blk = VirtIOBlk::new(transport).map_err(|e| health.explain(format!("init: {}", e)))?;
        health.check()?;
        Ok((blk, health))
    }
}

/// Prints, per block device, `virtio-blk: capacity <n> sectors, <ro|rw>,
/// serial <id>` (GET_ID through `VirtIOBlk`) and an info line with its
/// features and limits; the device is reset afterwards.
pub fn identify(devices: &Devices) -> Vec<BlkDisk> {
    let mut disks = Vec::new();
    for dev in devices.iter().filter(|d| d.kind == DeviceType::Block) {
        match identify_one(devices, dev) {
            Ok(disk) => disks.push(disk),
            Err(why) => println!("virtio-blk: {}{}", why, dev.tag()),
        }
    }
    disks
}

/// The limits from the configuration, read after DRIVER (3.1.1 step 4
/// allows reading it before the features are accepted).
struct Limits {
    size_max: Option<u32>,
    seg_max: Option<u32>,
    blk_size: Option<u32>,
}

fn read_limits(t: &StrictTransport, offered: u64) -> Limits {
    let field = |feature: u64, offset: usize| {
        (offered & feature != 0)
            .then(|| t.read_config_space::<u32>(offset).ok())
            .flatten()
    };
    Limits {
        size_max: field(blk_feature::SIZE_MAX, blk_config::SIZE_MAX),
        seg_max: field(blk_feature::SEG_MAX, blk_config::SEG_MAX),
        blk_size: field(blk_feature::BLK_SIZE, blk_config::BLK_SIZE),
    }
}

fn identify_one(devices: &Devices, dev: &Device) -> Result<BlkDisk, String> {
    let mut t = devices.open(dev)?;
    let health = t.health();
    let offered = t.probe()?;
    let limits = read_limits(&t, offered);
    let mut blk = Blk::new(t).map_err(|e| health.explain(format!("init: {}", e)))?;
    health.check()?;
    let serial = read_serial(&health, &mut blk);
    let disk = BlkDisk {
        dev: *dev,
        capacity: blk.capacity(),
        ro: blk.readonly(),
        offered,
        size_max: limits.size_max,
        queue_max: health.queue_max(0),
    };
    drop(blk);
    println!(
        "virtio-blk: capacity {} sectors, {}, serial {}{}",
        disk.capacity,
        if disk.ro { "ro" } else { "rw" },
        serial,
        dev.tag()
    );
    let opt = |v: Option<u32>| v.map_or(String::from("-"), |v| format!("{}", v));
    println!(
        "virtio-blk: features 0x{:x}, seg_max {}, size_max {}, blk_size {}, queue max {}{}",
        offered,
        opt(limits.seg_max),
        opt(limits.size_max),
        opt(limits.blk_size),
        disk.queue_max,
        dev.tag()
    );
    Ok(disk)
}

/// GET_ID, printable: `(none)` when empty, `?` for what is not graphic ASCII.
fn read_serial(health: &Health, blk: &mut Blk) -> String {
    let mut id = [0u8; 20];
    match health.blocking(|| blk.device_id(&mut id)) {
        Ok(Ok(0)) => String::from("(none)"),
        Ok(Ok(n)) => id[..n]
            .iter()
            .map(|&b| {
                if (0x21..0x7f).contains(&b) {
                    b as char
                } else {
                    '?'
                }
            })
            .collect(),
        Ok(Err(e)) => format!("(error: {})", e),
        Err(why) => format!("(error: {})", why),
    }
}

/// A status byte's name in the `FAIL` lines.
pub fn status_name(s: RespStatus) -> String {
    match s {
        RespStatus::OK => String::from("OK"),
        RespStatus::IO_ERR => String::from("IOERR"),
        RespStatus::UNSUPPORTED => String::from("UNSUPP"),
        RespStatus::NOT_READY => String::from("not completed"),
        other => format!("{:?}", other),
    }
}

/// Takes completions (in used-ring order) until no token in `tokens` is
/// left, `complete(blk, slot, token)` for each; 5 s without one fails.
pub fn drain(
    blk: &mut Blk,
    tokens: &mut [Option<u16>],
    mut complete: impl FnMut(&mut Blk, usize, u16) -> Result<(), String>,
) -> Result<(), String> {
    let mut deadline = Deadline::new(TIMEOUT_US);
    while tokens.iter().any(Option::is_some) {
        match blk.peek_used() {
            Some(token) => {
                let slot = tokens
                    .iter()
                    .position(|&t| t == Some(token))
                    .ok_or_else(|| format!("device used unknown token {}", token))?;
                complete(blk, slot, token)?;
                tokens[slot] = None;
                deadline = Deadline::new(TIMEOUT_US);
            }
            None if deadline.expired() => {
                let left = tokens.iter().filter(|t| t.is_some()).count();
                return Err(format!("{} requests not completed in 5 s", left));
            }
            None => pause(),
        }
    }
    Ok(())
}
