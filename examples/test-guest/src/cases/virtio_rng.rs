//! `test=virtio-rng`: from every rng device, 1 MiB in 4 KiB requests
//! through virtio-drivers' `VirtIORng` (timed: the `virtio-rng: <n> bytes
//! in <ms> ms (<KiB/s> KiB/s)` line), checked not to be constant; then the
//! driver is dropped (queue unset, device reset) and a new one on a new
//! transport must still deliver. One `test virtio-rng:` line per transport
//! with an rng device (mmio unsuffixed, pci with ` (pci)`).

use crate::cases::support::{report, Ctx, Want};
use crate::drivers::hal::GuestHal;
use crate::drivers::transport::{Health, StrictTransport};
use crate::drivers::virtio::{Bus, Device, Devices};
use crate::platform::arch::rdtsc;
use crate::platform::time::cycles_to_ns;
use crate::println;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::DeviceType;

/// Bytes read from each rng device.
const TOTAL: usize = 1 << 20;
/// Size of each request.
const CHUNK: usize = 4096;
/// Block size for the "not constant" check.
const BLOCK: usize = 4096;

type Rng = VirtIORng<GuestHal, StrictTransport>;

pub fn run(ctx: &Ctx, _: Want) {
    let devices = ctx.devices;
    if !devices.has(DeviceType::EntropySource) {
        report("virtio-rng", "", Err(String::from("no rng device")));
        return;
    }
    for bus in [Bus::Mmio, Bus::Pci] {
        let mut found = false;
        let mut failure = None;
        for dev in devices
            .iter()
            .filter(|d| d.kind == DeviceType::EntropySource && d.bus() == bus)
        {
            found = true;
            if let Err(why) = one(devices, dev) {
                failure.get_or_insert(why);
            }
        }
        if found {
            report(
                "virtio-rng",
                bus.suffix(),
                failure.map_or(Ok(String::new()), Err),
            );
        }
    }
}

/// A driver on a fresh transport, and the transport's health.
fn open(devices: &Devices, dev: &Device, what: &str) -> Result<(Rng, Rc<Health>), String> {
    let transport = devices.open(dev)?;
    let health = transport.health();
    let rng = Rng::new(transport).map_err(|e| health.explain(format!("{}: {}", what, e)))?;
    health.check()?;
    Ok((rng, health))
}

fn one(devices: &Devices, dev: &Device) -> Result<(), String> {
    let (mut rng, health) = open(devices, dev, "init")?;
    let t0 = rdtsc();
    let spread = read_stream(&health, &mut rng)?;
    let ns = cycles_to_ns(rdtsc() - t0).max(1);
    println!(
        "virtio-rng: {} bytes in {} ms ({} KiB/s){}",
        TOTAL,
        ns / 1_000_000,
        (TOTAL as u128 * 1_000_000_000 / 1024 / u128::from(ns)),
        dev.tag()
    );
    let distinct = spread.seen.iter().filter(|&&s| s).count();
    if distinct < 200 {
        return Err(format!("only {} distinct byte values", distinct));
    }
    if spread.const_blocks > 0 {
        return Err(format!("{} constant 4 KiB blocks", spread.const_blocks));
    }
    // Reset: dropping the driver unsets the queue (mmio) and its transport
    // resets the device (both); then a new driver on a new transport must work.
    drop(rng);
    health.check()?;
    reuse(devices, dev)?;
    println!("virtio-rng: reset and reuse ok{}", dev.tag());
    Ok(())
}

/// What the byte stream looked like.
struct Spread {
    seen: [bool; 256],
    /// Position in the current `BLOCK`, its first byte, whether it is all that.
    block_pos: usize,
    block_first: u8,
    block_const: bool,
    const_blocks: usize,
}

impl Spread {
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.seen[usize::from(b)] = true;
            if self.block_pos == 0 {
                (self.block_first, self.block_const) = (b, true);
            } else if b != self.block_first {
                self.block_const = false;
            }
            self.block_pos += 1;
            if self.block_pos == BLOCK {
                self.const_blocks += usize::from(self.block_const);
                self.block_pos = 0;
            }
        }
    }
}

/// `TOTAL` bytes in `CHUNK` requests, one in flight.
fn read_stream(health: &Health, rng: &mut Rng) -> Result<Spread, String> {
    let mut spread = Spread {
        seen: [false; 256],
        block_pos: 0,
        block_first: 0,
        block_const: true,
        const_blocks: 0,
    };
    let mut buf = [0u8; CHUNK];
    let (mut total, mut empty_replies) = (0usize, 0u32);
    while total < TOTAL {
        let want = CHUNK.min(TOTAL - total);
        // Zeroed first: a device that claims bytes it never wrote shows up
        // as constant blocks.
        buf[..want].fill(0);
        let n = health
            .blocking(|| rng.request_entropy(&mut buf[..want]))
            .and_then(|r| r.map_err(|e| format!("{}", e)))
            .map_err(|e| format!("request after {} bytes: {}", total, e))?;
        if n > want {
            return Err(format!(
                "device reported {} bytes for a {}-byte buffer",
                n, want
            ));
        }
        if n == 0 {
            empty_replies += 1;
            if empty_replies >= 1000 {
                return Err(format!("1000 empty replies after {} bytes", total));
            }
            continue;
        }
        spread.add(&buf[..n]);
        total += n;
    }
    Ok(spread)
}

/// After the reset: a new driver on a new transport, 256 bytes, not constant.
fn reuse(devices: &Devices, dev: &Device) -> Result<(), String> {
    let (mut rng, health) = open(devices, dev, "init after reset")?;
    let mut small = [0u8; 256];
    let n = health
        .blocking(|| rng.request_entropy(&mut small))
        .and_then(|r| r.map_err(|e| format!("{}", e)))
        .map_err(|e| format!("request after reset: {}", e))?;
    if n > small.len() {
        return Err(format!(
            "device reported {} bytes for a {}-byte buffer after reset",
            n,
            small.len()
        ));
    }
    if n == 0 || small[..n].iter().all(|&b| b == small[0]) {
        return Err(format!("{} constant bytes after reset", n));
    }
    drop(rng);
    health.check()
}
