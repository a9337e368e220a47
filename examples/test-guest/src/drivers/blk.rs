//! virtio-blk on either transport: the identification line printed at
//! discovery, the `blk-*` tests, `bench=blk-*` and `blk-write-flush=`.
//!
//! Reads, writes, FLUSH and GET_ID go through virtio-drivers' `VirtIOBlk`
//! (blocking and non-blocking API). DISCARD and WRITE_ZEROES, which it does
//! not expose, and the benchmarks, which need more requests in flight than
//! its 16-entry queue holds, use `Raw`: the crate's `VirtQueue` on the
//! device's queue 0 with the requests built here (header, data or segment,
//! status byte), like the `virtio-irq` test does for rng.
//!
//! Data buffers come from an arena at the top of the largest RAM region
//! above the image (`Ram`), not from the 512 KiB heap: a benchmark at queue
//! depth 32 with 128 KiB requests needs 4 MiB. Everything runs at CPL3 and
//! polls the used ring (no interrupts).

use crate::platform::arch::{pause, rdtsc};
use crate::cmdline::{BlkBench, BlkConfig, BlkWorkload, Want};
use crate::println;
use crate::platform::pvh::MemEntry;
use crate::platform::time::{cycles_to_ns, us_to_cycles};
use crate::drivers::virtio::{Device, Devices, GuestHal};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::Cell;
use core::sync::atomic::{fence, Ordering};
use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, DeviceType, SomeTransport, Transport};
use virtio_drivers::{Error, PAGE_SIZE};

/// Feature bits (virtio 1.2, 5.2.3 and 6).
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_VERSION_1: u64 = 1 << 32;

/// Device configuration offsets (virtio 1.2, 5.2.4).
const CFG_SIZE_MAX: usize = 8;
const CFG_SEG_MAX: usize = 12;
const CFG_BLK_SIZE: usize = 20;
const CFG_MAX_DISCARD_SECTORS: usize = 36;
const CFG_DISCARD_ALIGNMENT: usize = 44;
const CFG_MAX_WRITE_ZEROES_SECTORS: usize = 48;
const CFG_WRITE_ZEROES_MAY_UNMAP: usize = 56;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
/// WRITE_ZEROES segment flag: the device may unmap (punch a hole).
const WZ_UNMAP: u32 = 1;

/// Largest request the tests make: 128 KiB (less when `size_max` says so).
const MAX_REQUEST: usize = 128 << 10;
/// Sectors per MiB.
const MIB_SECTORS: u64 = (1 << 20) / SECTOR_SIZE as u64;
/// How long a request may take before a test gives up.
const TIMEOUT_US: u64 = 5_000_000;

// ---------------------------------------------------------------------------
// DMA buffers

extern "C" {
    /// End of the image (linker.ld).
    static __image_end: u8;
}

/// Most of the free RAM the arena takes.
const ARENA_MAX: u64 = 32 << 20;

/// Free RAM for data buffers: the top (up to 32 MiB) of the largest RAM
/// range above the image and below 3 GiB (the write-back part of the boot
/// mapping).
#[derive(Clone, Copy, Debug)]
pub struct Ram {
    start: u64,
    end: u64,
}

/// Finds the arena's RAM in the memory map.
pub fn free_ram(map: &[MemEntry]) -> Option<Ram> {
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let best = map
        .iter()
        .filter(|e| e.is_ram())
        .filter_map(|e| {
            let start = e.addr.max(image_end).next_multiple_of(4096);
            let end = e.addr.saturating_add(e.size).min(3 << 30) & !4095;
            (end > start).then_some(Ram { start, end })
        })
        .max_by_key(|r| r.end - r.start)?;
    Some(Ram {
        start: best.start.max(best.end.saturating_sub(ARENA_MAX)),
        end: best.end,
    })
}

/// Hands out disjoint, 4 KiB-aligned buffers from `Ram`; everything is given
/// back when the arena goes away (one test at a time).
struct Arena {
    next: Cell<u64>,
    end: u64,
}

impl Arena {
    /// # Safety
    /// No other `Arena` may exist meanwhile, and nothing else may use `ram`
    /// (it is RAM left free after boot).
    unsafe fn new(ram: Option<Ram>) -> Result<Arena, String> {
        let ram = ram.ok_or_else(|| String::from("no free ram for buffers"))?;
        Ok(Arena {
            next: Cell::new(ram.start),
            end: ram.end,
        })
    }

    /// A zero-filled buffer of `len` bytes.
    #[allow(clippy::mut_from_ref)] // each call returns a range no other call returns
    fn take(&self, len: usize) -> Result<&mut [u8], String> {
        let start = self.next.get();
        let end = start
            .checked_add(len as u64)
            .map(|e| e.next_multiple_of(4096))
            .filter(|&e| e <= self.end)
            .ok_or_else(|| format!("no room for a {}-byte buffer", len))?;
        self.next.set(end);
        // SAFETY: [start, start + len) is identity-mapped RAM (below 3 GiB,
        // user, write-back) that only this arena hands out, once.
        let buf = unsafe { core::slice::from_raw_parts_mut(start as *mut u8, len) };
        buf.fill(0);
        Ok(buf)
    }

    /// `n` buffers of `len` bytes.
    fn take_many(&self, n: usize, len: usize) -> Result<Vec<&mut [u8]>, String> {
        Ok(self.take(n * len)?.chunks_exact_mut(len).collect())
    }
}

// ---------------------------------------------------------------------------
// Patterns: every 512-byte sector holds 64 little-endian words: its sector
// number, a per-run tag, 61 xorshift64 words seeded from both, and an
// FNV-1a-style checksum (word-wise) of the first 63.

fn words(sector: &mut [u8]) -> &mut [u64] {
    assert!(sector.len().is_multiple_of(8) && (sector.as_ptr() as usize).is_multiple_of(8));
    // SAFETY: the bytes are 8-aligned and a multiple of 8 long; u64 has no
    // invalid bit patterns; the byte slice is not used while this lives.
    unsafe { core::slice::from_raw_parts_mut(sector.as_mut_ptr().cast::<u64>(), sector.len() / 8) }
}

fn checksum(w: &[u64]) -> u64 {
    w.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Fills `buf` (whole sectors) with the pattern of sectors `first..`.
fn fill(buf: &mut [u8], first: u64, tag: u64) {
    for (i, s) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        let w = words(s);
        let lba = first + i as u64;
        w[0] = lba;
        w[1] = tag;
        let mut x = lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ tag;
        if x == 0 {
            x = 1;
        }
        for v in &mut w[2..63] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *v = x;
        }
        w[63] = checksum(&w[..63]);
    }
}

/// Checks `buf` holds the pattern of sectors `first..`.
fn check(buf: &mut [u8], first: u64, tag: u64) -> Result<(), String> {
    for (i, s) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        let w = words(s);
        let lba = first + i as u64;
        if checksum(&w[..63]) != w[63] {
            return Err(format!("sector {}: bad checksum", lba));
        }
        if w[0] != lba {
            return Err(format!("sector {}: holds sector {}", lba, w[0]));
        }
        if w[1] != tag {
            return Err(format!("sector {}: stale data (another run's tag)", lba));
        }
    }
    Ok(())
}

/// The first non-zero sector of `buf` (sectors `first..`), if any.
fn first_nonzero(buf: &mut [u8], first: u64) -> Option<u64> {
    buf.chunks_exact_mut(SECTOR_SIZE)
        .position(|s| words(s).iter().any(|&w| w != 0))
        .map(|i| first + i as u64)
}

/// A per-run tag (never 0).
fn new_tag() -> u64 {
    rdtsc().wrapping_mul(0x2545_f491_4f6c_dd1d) | 1
}

fn status_name(s: RespStatus) -> String {
    match s {
        RespStatus::OK => String::from("OK"),
        RespStatus::IO_ERR => String::from("IOERR"),
        RespStatus::UNSUPPORTED => String::from("UNSUPP"),
        RespStatus::NOT_READY => String::from("not completed"),
        other => format!("{:?}", other),
    }
}

// ---------------------------------------------------------------------------
// Identification

/// What discovery learnt about a block device.
pub struct BlkInfo {
    dev: Device,
    /// In 512-byte sectors.
    capacity: u64,
    ro: bool,
    /// The device's feature bits.
    offered: u64,
    /// `size_max` when offered (bytes per segment).
    size_max: Option<u32>,
    /// Queue 0's maximum size.
    queue_max: u32,
}

impl BlkInfo {
    /// Bytes per request for the tests: 128 KiB, or `size_max` rounded down
    /// to 4 KiB (the `VirtIOBlk` requests have one data segment).
    fn request_bytes(&self) -> usize {
        match self.size_max {
            Some(m) => MAX_REQUEST.min(m as usize & !4095).max(4096),
            None => MAX_REQUEST,
        }
    }
}

fn open_blk(
    devices: &Devices,
    info: &BlkInfo,
) -> Result<VirtIOBlk<GuestHal, SomeTransport<'static>>, String> {
    VirtIOBlk::new(devices.transport(&info.dev)?).map_err(|e| format!("init: {}", e))
}

/// Prints, per block device, `virtio-blk: capacity <n> sectors, <ro|rw>,
/// serial <id>` (GET_ID through `VirtIOBlk`) and an info line with its
/// features and limits; the device is reset afterwards.
pub fn identify(devices: &Devices) -> Vec<BlkInfo> {
    let mut infos = Vec::new();
    for dev in devices.iter().filter(|d| d.kind == DeviceType::Block) {
        match identify_one(devices, dev) {
            Ok(info) => infos.push(info),
            Err(why) => println!("virtio-blk: {}{}", why, dev.tag()),
        }
    }
    infos
}

fn identify_one(devices: &Devices, dev: &Device) -> Result<BlkInfo, String> {
    let mut t = devices.transport(dev)?;
    let offered = t.read_device_features();
    let queue_max = t.max_queue_size(0);
    let field = |feature: u64, offset: usize| {
        (offered & feature != 0)
            .then(|| t.read_config_space::<u32>(offset).ok())
            .flatten()
    };
    let size_max = field(F_SIZE_MAX, CFG_SIZE_MAX);
    let seg_max = field(F_SEG_MAX, CFG_SEG_MAX);
    let blk_size = field(F_BLK_SIZE, CFG_BLK_SIZE);
    let mut blk = VirtIOBlk::<GuestHal, _>::new(t).map_err(|e| format!("init: {}", e))?;
    let mut id = [0u8; 20];
    let serial = match blk.device_id(&mut id) {
        Ok(0) => String::from("(none)"),
        Ok(n) => id[..n]
            .iter()
            .map(|&b| {
                if (0x21..0x7f).contains(&b) {
                    b as char
                } else {
                    '?'
                }
            })
            .collect(),
        Err(e) => format!("(error: {})", e),
    };
    let info = BlkInfo {
        dev: *dev,
        capacity: blk.capacity(),
        ro: blk.readonly(),
        offered,
        size_max,
        queue_max,
    };
    drop(blk);
    println!(
        "virtio-blk: capacity {} sectors, {}, serial {}{}",
        info.capacity,
        if info.ro { "ro" } else { "rw" },
        serial,
        dev.tag()
    );
    let opt = |v: Option<u32>| v.map_or(String::from("-"), |v| format!("{}", v));
    println!(
        "virtio-blk: features 0x{:x}, seg_max {}, size_max {}, blk_size {}, queue max {}{}",
        offered,
        opt(seg_max),
        opt(size_max),
        opt(blk_size),
        queue_max,
        dev.tag()
    );
    Ok(info)
}

// ---------------------------------------------------------------------------
// Tests

/// Runs the `blk-*` tests asked for: per device, `blk-serial`, then on a
/// writable device `blk-verify`, `blk-inflight`, `blk-discard`, on a
/// read-only one `blk-ro`. Named tests without a device they apply to fail.
pub fn tests(devices: &Devices, infos: &[BlkInfo], cfg: &BlkConfig, ram: Option<Ram>) {
    let none = |want: Want, name: &str, what: &str| {
        if want == Want::Named {
            println!("test {}: FAIL no {}blk device", name, what);
        }
    };
    let any_rw = infos.iter().any(|i| !i.ro);
    let any_ro = infos.iter().any(|i| i.ro);
    for info in infos {
        let suffix = info.dev.bus().suffix();
        let report = |name: &str, r: Result<String, String>| match r {
            Ok(extra) => println!("test {}: ok{}{}", name, extra, suffix),
            Err(why) => println!("test {}: FAIL {}{}", name, why, suffix),
        };
        if cfg.serial != Want::No {
            report("blk-serial", serial(devices, info));
        }
        if !info.ro {
            if cfg.verify != Want::No {
                report("blk-verify", verify(devices, info, cfg.verify_mib, ram));
            }
            if cfg.inflight != Want::No {
                report("blk-inflight", inflight(devices, info, ram));
            }
            if cfg.discard != Want::No {
                report("blk-discard", discard(devices, info, ram));
            }
        } else if cfg.ro != Want::No {
            report("blk-ro", read_only(devices, info, ram));
        }
    }
    if infos.is_empty() {
        none(cfg.serial, "blk-serial", "");
    }
    if !any_rw {
        none(cfg.verify, "blk-verify", "writable ");
        none(cfg.inflight, "blk-inflight", "writable ");
        none(cfg.discard, "blk-discard", "writable ");
    }
    if !any_ro {
        none(cfg.ro, "blk-ro", "read-only ");
    }
}

/// `blk-serial`: GET_ID returns a non-empty id.
fn serial(devices: &Devices, info: &BlkInfo) -> Result<String, String> {
    let mut blk = open_blk(devices, info)?;
    let mut id = [0u8; 20];
    match blk.device_id(&mut id) {
        Ok(0) => Err(String::from("empty id")),
        Ok(_) => Ok(String::new()),
        Err(e) => Err(format!("get_id: {}", e)),
    }
}

/// `blk-verify`: the pattern over the first `mib` MiB (at most the whole
/// disk) in `request_bytes` writes, then read back and checked.
fn verify(devices: &Devices, info: &BlkInfo, mib: u64, ram: Option<Ram>) -> Result<String, String> {
    let total = mib.saturating_mul(MIB_SECTORS).min(info.capacity);
    if total == 0 {
        return Err(String::from("empty disk"));
    }
    let chunk = (info.request_bytes() / SECTOR_SIZE) as u64;
    // SAFETY: the only arena while this test runs.
    let arena = unsafe { Arena::new(ram) }?;
    let buf = arena.take(chunk as usize * SECTOR_SIZE)?;
    let mut blk = open_blk(devices, info)?;
    let tag = new_tag();

    let t0 = rdtsc();
    for lba in (0..total).step_by(chunk as usize) {
        let n = chunk.min(total - lba) as usize * SECTOR_SIZE;
        fill(&mut buf[..n], lba, tag);
        blk.write_blocks(lba as usize, &buf[..n])
            .map_err(|e| format!("write at sector {}: {}", lba, e))?;
    }
    let t1 = rdtsc();
    for lba in (0..total).step_by(chunk as usize) {
        let n = chunk.min(total - lba) as usize * SECTOR_SIZE;
        blk.read_blocks(lba as usize, &mut buf[..n])
            .map_err(|e| format!("read at sector {}: {}", lba, e))?;
        check(&mut buf[..n], lba, tag)?;
    }
    let t2 = rdtsc();
    println!(
        "blk-verify: {} MiB written in {} ms, read in {} ms{}",
        total / MIB_SECTORS,
        cycles_to_ns(t1 - t0) / 1_000_000,
        cycles_to_ns(t2 - t1) / 1_000_000,
        info.dev.tag()
    );
    Ok(String::new())
}

/// Requests `blk-inflight` tries to have in flight.
const INFLIGHT_MAX: usize = 32;
const INFLIGHT_BLOCK: usize = 4096;

/// Takes completions (in used-ring order) until no token in `tokens` is
/// left, `complete(blk, slot, token)` for each; 5 s without one fails.
fn drain(
    blk: &mut VirtIOBlk<GuestHal, SomeTransport<'static>>,
    tokens: &mut [Option<u16>],
    mut complete: impl FnMut(
        &mut VirtIOBlk<GuestHal, SomeTransport<'static>>,
        usize,
        u16,
    ) -> Result<(), String>,
) -> Result<(), String> {
    let mut deadline = rdtsc() + us_to_cycles(TIMEOUT_US);
    while tokens.iter().any(Option::is_some) {
        match blk.peek_used() {
            Some(token) => {
                let slot = tokens
                    .iter()
                    .position(|&t| t == Some(token))
                    .ok_or_else(|| format!("device used unknown token {}", token))?;
                complete(blk, slot, token)?;
                tokens[slot] = None;
                deadline = rdtsc() + us_to_cycles(TIMEOUT_US);
            }
            None if rdtsc() > deadline => {
                let left = tokens.iter().filter(|t| t.is_some()).count();
                return Err(format!("{} requests not completed in 5 s", left));
            }
            None => pause(),
        }
    }
    Ok(())
}

/// `blk-inflight`: as many 4 KiB writes as the queue takes (up to 32,
/// `write_blocks_nb` until `QueueFull`) at distinct, non-adjacent blocks,
/// completed through `peek_used`/`complete_write_blocks`; then the same
/// blocks read back the same way and checked.
fn inflight(devices: &Devices, info: &BlkInfo, ram: Option<Ram>) -> Result<String, String> {
    let per = (INFLIGHT_BLOCK / SECTOR_SIZE) as u64;
    if info.capacity < (2 * INFLIGHT_MAX as u64 + 1) * per {
        return Err(String::from("disk too small"));
    }
    // Odd 4 KiB blocks: distinct, never adjacent (no merging).
    let sector = |i: usize| (2 * i as u64 + 1) * per;
    // SAFETY: the only arena while this test runs.
    let arena = unsafe { Arena::new(ram) }?;
    let mut bufs = arena.take_many(INFLIGHT_MAX, INFLIGHT_BLOCK)?;
    let mut reqs: Vec<BlkReq> = (0..INFLIGHT_MAX).map(|_| BlkReq::default()).collect();
    let mut resps: Vec<BlkResp> = (0..INFLIGHT_MAX).map(|_| BlkResp::default()).collect();
    let mut tokens = [None; INFLIGHT_MAX];
    // Declared after the buffers: dropped (device reset) before them.
    let mut blk = open_blk(devices, info)?;
    let tag = new_tag();
    for (i, b) in bufs.iter_mut().enumerate() {
        fill(b, sector(i), tag);
    }

    let mut writes = 0;
    for i in 0..INFLIGHT_MAX {
        // SAFETY: reqs[i], bufs[i], resps[i] are not touched until
        // `complete_write_blocks` returns them (or the device is reset).
        match unsafe {
            blk.write_blocks_nb(sector(i) as usize, &mut reqs[i], bufs[i], &mut resps[i])
        } {
            Ok(t) => {
                tokens[i] = Some(t);
                writes += 1;
            }
            Err(Error::QueueFull) => break,
            Err(e) => return Err(format!("write {}: {}", i, e)),
        }
    }
    drain(&mut blk, &mut tokens, |blk, i, t| {
        // SAFETY: the buffers given to `write_blocks_nb` for this token.
        unsafe { blk.complete_write_blocks(t, &reqs[i], bufs[i], &mut resps[i]) }.map_err(|e| {
            format!(
                "write {}: {} (status {})",
                i,
                e,
                status_name(resps[i].status())
            )
        })
    })?;

    for b in bufs.iter_mut() {
        b.fill(0);
    }
    let mut reads = 0;
    for i in 0..writes {
        // SAFETY: as for the writes.
        match unsafe {
            blk.read_blocks_nb(sector(i) as usize, &mut reqs[i], bufs[i], &mut resps[i])
        } {
            Ok(t) => {
                tokens[i] = Some(t);
                reads += 1;
            }
            Err(Error::QueueFull) => break,
            Err(e) => return Err(format!("read {}: {}", i, e)),
        }
    }
    drain(&mut blk, &mut tokens, |blk, i, t| {
        // SAFETY: the buffers given to `read_blocks_nb` for this token.
        unsafe { blk.complete_read_blocks(t, &reqs[i], bufs[i], &mut resps[i]) }.map_err(|e| {
            format!(
                "read {}: {} (status {})",
                i,
                e,
                status_name(resps[i].status())
            )
        })
    })?;
    for (i, b) in bufs.iter_mut().enumerate().take(reads) {
        check(b, sector(i), tag)?;
    }
    let n = writes.min(reads);
    if n < 2 {
        return Err(format!("only {} request in flight", n));
    }
    println!(
        "blk-inflight: {} requests in flight, all completed{}",
        n,
        info.dev.tag()
    );
    Ok(String::new())
}

/// `blk-ro`: a write to a read-only device must complete with IOERR; a
/// read must still work.
fn read_only(devices: &Devices, info: &BlkInfo, ram: Option<Ram>) -> Result<String, String> {
    // SAFETY: the only arena while this test runs.
    let arena = unsafe { Arena::new(ram) }?;
    let buf = arena.take(4096)?;
    buf.fill(0x5a);
    let mut req = BlkReq::default();
    let mut resp = BlkResp::default();
    let mut blk = open_blk(devices, info)?;
    if !blk.readonly() {
        return Err(String::from("device is writable"));
    }
    let mut tokens = [None];
    // SAFETY: req, buf and resp are left alone until completion (or reset).
    tokens[0] = Some(
        unsafe { blk.write_blocks_nb(0, &mut req, &buf[..SECTOR_SIZE], &mut resp) }
            .map_err(|e| format!("submit: {}", e))?,
    );
    let mut result = Ok(());
    drain(&mut blk, &mut tokens, |blk, _, t| {
        // SAFETY: the buffers given to `write_blocks_nb`.
        result = unsafe { blk.complete_write_blocks(t, &req, &buf[..SECTOR_SIZE], &mut resp) };
        Ok(())
    })?;
    let status = resp.status();
    match (result, status) {
        (Err(Error::IoError), RespStatus::IO_ERR) => {}
        (Ok(()), _) => return Err(String::from("write succeeded")),
        (_, s) => return Err(format!("write status {}, want IOERR", status_name(s))),
    }
    blk.read_blocks(0, buf)
        .map_err(|e| format!("read after refused write: {}", e))?;
    Ok(format!(" (write refused: {})", status_name(status)))
}

// ---------------------------------------------------------------------------
// Requests built here on the crate's VirtQueue

/// Queue 0 of a block device driven directly: direct descriptors (header,
/// data or DISCARD/WRITE_ZEROES segment, status), polled, without EVENT_IDX:
/// notifications are suppressed through the ring flags (the device's
/// NO_NOTIFY while it works, the driver's NO_INTERRUPT always). virtio-drivers
/// 0.13's EVENT_IDX check (`avail_idx >= avail_event + 1`, not wrapping) never
/// kicks a batch that takes `avail_idx` past 65535 while `avail_event` has
/// not, and `add` has no full fence between publishing `avail_idx` and
/// `should_notify` reading the device's side; both stalled queue depth 32.
struct Raw<const N: usize> {
    /// Declared first: dropped (device reset) before the queue memory.
    transport: SomeTransport<'static>,
    queue: VirtQueue<GuestHal, N>,
    features: u64,
    notifies: u64,
}

/// Features `Raw` accepts.
const RAW_FEATURES: u64 =
    F_VERSION_1 | F_RO | F_FLUSH | F_SEG_MAX | F_SIZE_MAX | F_BLK_SIZE | F_DISCARD | F_WRITE_ZEROES;

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

impl<const N: usize> Raw<N> {
    /// Initialises the device (virtio 1.2, 3.1.1) with `want` ∩ offered.
    fn new(mut transport: SomeTransport<'static>, want: u64) -> Result<Self, String> {
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let features = transport.read_device_features() & want;
        transport.write_driver_features(features);
        let ok = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
        transport.set_status(ok);
        if features & F_VERSION_1 != 0 && !transport.get_status().contains(ok) {
            return Err(format!("device refused features 0x{:x}", features));
        }
        transport.set_guest_page_size(PAGE_SIZE as u32);
        let mut queue = VirtQueue::new(&mut transport, 0, false, false)
            .map_err(|e| format!("queue of {}: {}", N, e))?;
        transport.finish_init();
        // Polled: no used-buffer interrupts (VIRTQ_AVAIL_F_NO_INTERRUPT).
        queue.set_dev_notify(false);
        Ok(Raw {
            transport,
            queue,
            features,
            notifies: 0,
        })
    }

    /// Notifies the device unless it suppressed notifications: the
    /// available index is published before the device's flags are read
    /// (a full fence: a store followed by a load may pass it otherwise).
    fn kick(&mut self) {
        fence(Ordering::SeqCst);
        if self.queue.should_notify() {
            self.transport.notify(0);
            self.notifies += 1;
        }
    }

    /// One request, waited for (5 s; then the device is reset, since the
    /// buffers are about to go away).
    fn run<'a>(
        &mut self,
        inputs: &'a [&'a [u8]],
        outputs: &'a mut [&'a mut [u8]],
    ) -> Result<(), String> {
        // SAFETY: the buffers stay borrowed until `pop_used` below, or the
        // device is reset before this returns.
        let token =
            unsafe { self.queue.add(inputs, outputs) }.map_err(|e| format!("add: {}", e))?;
        self.kick();
        let end = rdtsc() + us_to_cycles(TIMEOUT_US);
        while !self.queue.can_pop() {
            if rdtsc() > end {
                self.transport.set_status(DeviceStatus::empty());
                return Err(String::from("request not completed in 5 s"));
            }
            pause();
        }
        // SAFETY: the buffers given to `add` for `token`.
        unsafe { self.queue.pop_used(token, inputs, outputs) }
            .map(|_| ())
            .map_err(|e| format!("pop: {}", e))
    }

    /// A read or write of `data` at `sector`; returns the status byte.
    fn rw(&mut self, write: bool, sector: u64, data: &mut [u8]) -> Result<u8, String> {
        let hdr = header(if write { T_OUT } else { T_IN }, sector);
        let mut status = [0xffu8];
        if write {
            self.run(&[&hdr, data], &mut [&mut status])?;
        } else {
            self.run(&[&hdr], &mut [data, &mut status])?;
        }
        Ok(status[0])
    }

    /// A DISCARD or WRITE_ZEROES of one segment; returns the status byte.
    fn dwz(&mut self, kind: u32, sector: u64, sectors: u32, flags: u32) -> Result<u8, String> {
        let hdr = header(kind, 0);
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..].copy_from_slice(&flags.to_le_bytes());
        let mut status = [0xffu8];
        self.run(&[&hdr, &seg], &mut [&mut status])?;
        Ok(status[0])
    }

    fn config(&self, offset: usize) -> u32 {
        self.transport.read_config_space::<u32>(offset).unwrap_or(0)
    }
}

impl<const N: usize> Drop for Raw<N> {
    fn drop(&mut self) {
        self.transport.set_status(DeviceStatus::empty());
    }
}

fn expect_ok(what: &str, sector: u64, status: u8) -> Result<(), String> {
    match status {
        0 => Ok(()),
        1 => Err(format!("{} at sector {}: IOERR", what, sector)),
        2 => Err(format!("{} at sector {}: UNSUPP", what, sector)),
        s => Err(format!("{} at sector {}: status {}", what, sector, s)),
    }
}

/// Sectors `blk-discard` works on: 1 MiB.
const DISCARD_SECTORS: u64 = MIB_SECTORS;

/// `blk-discard`: 1 MiB in the middle of the disk written, DISCARDed, read
/// (zeros allowed, not required); written again, WRITE_ZEROES (unmap when
/// the device allows it), read: must be zeros.
fn discard(devices: &Devices, info: &BlkInfo, ram: Option<Ram>) -> Result<String, String> {
    if info.offered & F_DISCARD == 0 {
        return Err(String::from("not offered"));
    }
    if info.offered & F_WRITE_ZEROES == 0 {
        return Err(String::from("write-zeroes not offered"));
    }
    if info.capacity < DISCARD_SECTORS {
        return Err(String::from("disk too small"));
    }
    let start = (info.capacity / 2 / DISCARD_SECTORS) * DISCARD_SECTORS;
    let chunk = (info.request_bytes() / SECTOR_SIZE) as u64;
    // SAFETY: the only arena while this test runs.
    let arena = unsafe { Arena::new(ram) }?;
    let buf = arena.take(chunk as usize * SECTOR_SIZE)?;
    let mut raw = Raw::<16>::new(devices.transport(&info.dev)?, RAW_FEATURES)?;
    if raw.features & (F_DISCARD | F_WRITE_ZEROES) != F_DISCARD | F_WRITE_ZEROES {
        return Err(String::from("not negotiated"));
    }
    let max_discard = u64::from(raw.config(CFG_MAX_DISCARD_SECTORS)).max(1);
    let max_wz = u64::from(raw.config(CFG_MAX_WRITE_ZEROES_SECTORS)).max(1);
    let may_unmap = raw.config(CFG_WRITE_ZEROES_MAY_UNMAP) & 0xff != 0;
    let alignment = raw.config(CFG_DISCARD_ALIGNMENT);
    let tag = new_tag();
    let range = start..start + DISCARD_SECTORS;

    let write_pattern = |raw: &mut Raw<16>, buf: &mut [u8]| -> Result<(), String> {
        for lba in range.clone().step_by(chunk as usize) {
            let n = chunk.min(range.end - lba) as usize * SECTOR_SIZE;
            fill(&mut buf[..n], lba, tag);
            expect_ok("write", lba, raw.rw(true, lba, &mut buf[..n])?)?;
        }
        Ok(())
    };
    // Whether the range reads as zeros, the pattern, or neither.
    let read_back =
        |raw: &mut Raw<16>, buf: &mut [u8]| -> Result<(bool, bool, Option<u64>), String> {
            let (mut zeros, mut pattern, mut bad) = (true, true, None);
            for lba in range.clone().step_by(chunk as usize) {
                let n = chunk.min(range.end - lba) as usize * SECTOR_SIZE;
                expect_ok("read", lba, raw.rw(false, lba, &mut buf[..n])?)?;
                if let Some(s) = first_nonzero(&mut buf[..n], lba) {
                    zeros = false;
                    bad.get_or_insert(s);
                }
                if pattern && check(&mut buf[..n], lba, tag).is_err() {
                    pattern = false;
                }
            }
            Ok((zeros, pattern, bad))
        };
    let segments = |raw: &mut Raw<16>, kind: u32, max: u64, flags: u32| -> Result<(), String> {
        let mut lba = range.start;
        while lba < range.end {
            let n = max.min(range.end - lba).min(u64::from(u32::MAX));
            let what = if kind == T_DISCARD {
                "discard"
            } else {
                "write-zeroes"
            };
            expect_ok(what, lba, raw.dwz(kind, lba, n as u32, flags)?)?;
            lba += n;
        }
        Ok(())
    };

    write_pattern(&mut raw, buf)?;
    segments(&mut raw, T_DISCARD, max_discard, 0)?;
    println!(
        "blk-discard: discarded {} sectors at {} (max {} per request, alignment {}){}",
        DISCARD_SECTORS,
        start,
        max_discard,
        alignment,
        info.dev.tag()
    );
    let (zeros, pattern, _) = read_back(&mut raw, buf)?;
    println!(
        "blk-discard: reads after discard: {}{}",
        if zeros {
            "zeros"
        } else if pattern {
            "old data"
        } else {
            "mixed"
        },
        info.dev.tag()
    );

    write_pattern(&mut raw, buf)?;
    let flags = if may_unmap { WZ_UNMAP } else { 0 };
    segments(&mut raw, T_WRITE_ZEROES, max_wz, flags)?;
    println!(
        "blk-discard: wrote zeroes over {} sectors at {}{}{}",
        DISCARD_SECTORS,
        start,
        if may_unmap { " (unmap)" } else { "" },
        info.dev.tag()
    );
    match read_back(&mut raw, buf)? {
        (true, _, _) => Ok(String::new()),
        (false, _, bad) => Err(format!(
            "sector {} not zero after write-zeroes",
            bad.unwrap_or(start)
        )),
    }
}

// ---------------------------------------------------------------------------
// Benchmarks

/// Runs each `bench=blk-...` on every block device.
pub fn benches(devices: &Devices, infos: &[BlkInfo], cfg: &BlkConfig, ram: Option<Ram>) {
    for b in cfg.benches.iter().flatten() {
        let name = match b.workload {
            BlkWorkload::Rand4k => "blk-rand4k",
            BlkWorkload::Seq128k => "blk-seq128k",
        };
        if infos.is_empty() {
            println!("bench {} qd{}: FAIL no blk device", name, b.qd);
        }
        for info in infos {
            let r = match info.queue_max {
                m if m >= 128 => bench_n::<128>(devices, info, b, name, ram),
                m if m >= 64 => bench_n::<64>(devices, info, b, name, ram),
                m if m >= 32 => bench_n::<32>(devices, info, b, name, ram),
                _ => bench_n::<16>(devices, info, b, name, ram),
            };
            if let Err(why) = r {
                println!("bench {} qd{}: FAIL {}{}", name, b.qd, why, info.dev.tag());
            }
        }
    }
}

/// xorshift64.
fn next_random(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn bench_n<const N: usize>(
    devices: &Devices,
    info: &BlkInfo,
    b: &BlkBench,
    name: &str,
    ram: Option<Ram>,
) -> Result<(), String> {
    let size = match b.workload {
        BlkWorkload::Rand4k => 4096usize,
        BlkWorkload::Seq128k => 128 << 10,
    };
    let per = (size / SECTOR_SIZE) as u64;
    if info.capacity < per {
        return Err(String::from("disk smaller than one request"));
    }
    if let Some(m) = info.size_max.filter(|&m| (m as usize) < size) {
        return Err(format!("size_max {} below the request size", m));
    }
    if b.qd * 3 > N {
        return Err(format!("queue of {} holds {} requests", N, N / 3));
    }
    let qd = b.qd;
    // SAFETY: the only arena while this benchmark runs.
    let arena = unsafe { Arena::new(ram) }?;
    let mut data = arena.take_many(qd, size)?;
    let mut hdrs = alloc::vec![[0u8; 16]; qd];
    let mut status = alloc::vec![[0u8; 1]; qd];
    let mut tokens = alloc::vec![0u16; qd];
    // Declared after the buffers: dropped (device reset) before them.
    let mut raw = Raw::<N>::new(
        devices.transport(&info.dev)?,
        RAW_FEATURES & !(F_DISCARD | F_WRITE_ZEROES),
    )?;

    let mut rng = rdtsc() | 1;
    let mut seq = 0u64;
    let blocks = info.capacity / per;
    let mut next_sector = || match b.workload {
        BlkWorkload::Rand4k => next_random(&mut rng) % blocks * per,
        BlkWorkload::Seq128k => {
            let s = seq;
            seq = if seq + 2 * per > info.capacity {
                0
            } else {
                seq + per
            };
            s
        }
    };
    /// Adds the read of slot `i` (`hdr`, `data`, `status`) at `sector`.
    fn submit<const N: usize>(
        raw: &mut Raw<N>,
        hdr: &mut [u8; 16],
        data: &mut [u8],
        status: &mut [u8; 1],
        sector: u64,
    ) -> Result<u16, String> {
        *hdr = header(T_IN, sector);
        status[0] = 0xff;
        // SAFETY: the slot's buffers are left alone until `pop_used` returns
        // them, or the device is reset (drop of `raw`, before them).
        unsafe { raw.queue.add(&[&hdr[..]], &mut [data, &mut status[..]]) }
            .map_err(|e| format!("add: {}", e))
    }

    let t0 = rdtsc();
    let end = t0 + us_to_cycles(b.seconds * 1_000_000);
    let mut sectors = alloc::vec![0u64; qd];
    for i in 0..qd {
        sectors[i] = next_sector();
        tokens[i] = submit(&mut raw, &mut hdrs[i], data[i], &mut status[i], sectors[i])?;
    }
    raw.kick();
    let mut outstanding = qd;
    let mut busy = vec_of(qd, true);
    let mut done = 0u64;
    let mut stopping = false;
    let mut deadline = rdtsc() + us_to_cycles(TIMEOUT_US);
    while outstanding > 0 {
        let mut resubmitted = false;
        while let Some(token) = raw.queue.peek_used() {
            let i = (0..qd)
                .find(|&i| busy[i] && tokens[i] == token)
                .ok_or_else(|| format!("device used unknown token {}", token))?;
            // SAFETY: the buffers given to `add` for this token.
            unsafe {
                raw.queue.pop_used(
                    token,
                    &[&hdrs[i][..]],
                    &mut [&mut *data[i], &mut status[i][..]],
                )
            }
            .map_err(|e| format!("pop: {}", e))?;
            if status[i][0] != 0 {
                return Err(format!(
                    "read at sector {}: status {}",
                    sectors[i], status[i][0]
                ));
            }
            done += 1;
            busy[i] = false;
            outstanding -= 1;
            if !stopping && rdtsc() >= end {
                stopping = true;
            }
            if !stopping {
                sectors[i] = next_sector();
                tokens[i] = submit(&mut raw, &mut hdrs[i], data[i], &mut status[i], sectors[i])?;
                busy[i] = true;
                outstanding += 1;
                resubmitted = true;
            }
            deadline = rdtsc() + us_to_cycles(TIMEOUT_US);
        }
        if resubmitted {
            raw.kick();
        } else if rdtsc() > deadline {
            return Err(format!("{} requests not completed in 5 s", outstanding));
        } else {
            pause();
        }
    }
    let ns = cycles_to_ns(rdtsc() - t0).max(1);
    let per_s = u128::from(done) * 1_000_000_000 / u128::from(ns);
    let mib_10 = u128::from(done) * size as u128 * 10_000_000_000 / u128::from(ns) / (1 << 20);
    println!(
        "bench {} qd{}: {} requests in {} ms, {} req/s, {}.{} MiB/s{}",
        name,
        qd,
        done,
        ns / 1_000_000,
        per_s,
        mib_10 / 10,
        mib_10 % 10,
        info.dev.tag()
    );
    println!(
        "blk-bench: {} qd{}: {} notifies for {} requests, queue {}{}",
        name,
        qd,
        raw.notifies,
        done,
        N,
        info.dev.tag()
    );
    Ok(())
}

fn vec_of(n: usize, v: bool) -> Vec<bool> {
    alloc::vec![v; n]
}

// ---------------------------------------------------------------------------
// Write, flush, halt

/// `blk-write-flush=SECTOR:VALUE`: on the first writable block device, one
/// sector of `value` (little-endian u32s) written at `sector`, FLUSH, then
/// `blk-flushed: <sector>` and halt (the host kills the VMM and reads the
/// file). Returns (after a `FAIL` line) only when that did not work.
pub fn write_flush(
    devices: &Devices,
    infos: &[BlkInfo],
    (sector, value): (u64, u32),
    ram: Option<Ram>,
) {
    let Some(info) = infos.iter().find(|i| !i.ro) else {
        println!("blk-write-flush: FAIL no writable blk device");
        return;
    };
    let r: Result<(), String> = (|| {
        if sector >= info.capacity {
            return Err(format!(
                "sector {} beyond capacity {}",
                sector, info.capacity
            ));
        }
        // SAFETY: the only arena from now on (the guest halts after).
        let arena = unsafe { Arena::new(ram) }?;
        let buf = arena.take(SECTOR_SIZE)?;
        for c in buf.chunks_exact_mut(4) {
            c.copy_from_slice(&value.to_le_bytes());
        }
        let mut blk = open_blk(devices, info)?;
        blk.write_blocks(sector as usize, buf)
            .map_err(|e| format!("write: {}", e))?;
        blk.flush().map_err(|e| format!("flush: {}", e))?;
        if info.offered & F_FLUSH == 0 {
            println!("blk-write-flush: no FLUSH feature (write-through device)");
        }
        println!("blk-flushed: {}", sector);
        crate::platform::arch::halt_forever()
    })();
    if let Err(why) = r {
        println!("blk-write-flush: FAIL {}{}", why, info.dev.tag());
    }
}
