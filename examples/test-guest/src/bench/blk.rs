//! `bench=blk-rand4k:QD:S` and `bench=blk-seq128k:QD:S`, on every blk
//! device: S seconds of reads with QD in flight through `BlkQueue` (the
//! device's queue 0 of 128, 64, 32 or 16 descriptors, as large as the
//! device allows; `VirtIOBlk`'s queue of 16 holds at most 16 requests).
//! Every completion is checked (status 0) and its slot resubmitted at once,
//! one notify check per batch; then the rest drained.

use crate::drivers::blk::{BlkDisk, TIMEOUT_US};
use crate::drivers::blk_queue::{self, header, BlkQueue};
use crate::drivers::spec::{blk_feature, blk_request};
use crate::drivers::virtio::Devices;
use crate::platform::arch::{pause, rdtsc};
use crate::platform::ram::{Arena, FreeRam};
use crate::platform::time::{cycles_to_ns, us_to_cycles};
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use virtio_drivers::device::blk::SECTOR_SIZE;

/// A benchmark workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// 4 KiB reads at random 4 KiB-aligned offsets.
    Rand4k,
    /// 128 KiB reads, sequential, wrapping at the end of the disk.
    Seq128k,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Rand4k => "blk-rand4k",
            Workload::Seq128k => "blk-seq128k",
        }
    }

    /// Bytes per request.
    fn size(self) -> usize {
        match self {
            Workload::Rand4k => 4096,
            Workload::Seq128k => 128 << 10,
        }
    }
}

/// One `bench=blk-...:QD:SECONDS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkBench {
    pub workload: Workload,
    /// Requests kept in flight (1 to `MAX_QD`).
    pub qd: usize,
    pub seconds: u64,
}

/// Largest queue depth (the largest queue, 128 descriptors, 3 per request).
pub const MAX_QD: usize = 42;

/// Runs each benchmark on every block device.
pub fn run(devices: &Devices, disks: &[BlkDisk], benches: &[BlkBench], ram: Option<FreeRam>) {
    for b in benches {
        let name = b.workload.name();
        if disks.is_empty() {
            println!("bench {} qd{}: FAIL no blk device", name, b.qd);
        }
        for disk in disks {
            let r = match disk.queue_max {
                m if m >= 128 => on_queue::<128>(devices, disk, b, ram),
                m if m >= 64 => on_queue::<64>(devices, disk, b, ram),
                m if m >= 32 => on_queue::<32>(devices, disk, b, ram),
                _ => on_queue::<16>(devices, disk, b, ram),
            };
            if let Err(why) = r {
                println!("bench {} qd{}: FAIL {}{}", name, b.qd, why, disk.dev.tag());
            }
        }
    }
}

/// xorshift64 (the generator of the blk tests' data, `cases::blk_data`).
fn next_random(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The sectors a workload reads, in order.
struct Sectors {
    workload: Workload,
    /// Sectors per request.
    per: u64,
    capacity: u64,
    random: u64,
    next_seq: u64,
}

impl Sectors {
    fn next(&mut self) -> u64 {
        match self.workload {
            Workload::Rand4k => {
                next_random(&mut self.random) % (self.capacity / self.per) * self.per
            }
            Workload::Seq128k => {
                let s = self.next_seq;
                self.next_seq = if s + 2 * self.per > self.capacity {
                    0
                } else {
                    s + self.per
                };
                s
            }
        }
    }
}

/// Checks that `b` can run on `disk` with a queue of `n` descriptors.
fn check(disk: &BlkDisk, b: &BlkBench, n: usize) -> Result<(), String> {
    let size = b.workload.size();
    if disk.capacity < (size / SECTOR_SIZE) as u64 {
        return Err(String::from("disk smaller than one request"));
    }
    if let Some(m) = disk.size_max.filter(|&m| (m as usize) < size) {
        return Err(format!("size_max {} below the request size", m));
    }
    if b.qd * 3 > n {
        return Err(format!("queue of {} holds {} requests", n, n / 3));
    }
    Ok(())
}

fn on_queue<const N: usize>(
    devices: &Devices,
    disk: &BlkDisk,
    b: &BlkBench,
    ram: Option<FreeRam>,
) -> Result<(), String> {
    check(disk, b, N)?;
    let size = b.workload.size();
    // SAFETY: the only arena while this benchmark runs.
    let arena = unsafe { Arena::new(ram) }?;
    let mut slots = Slots::new(arena.take_many(b.qd, size)?);
    // Declared after the buffers: dropped (device reset) before them.
    let want = blk_queue::FEATURES & !(blk_feature::DISCARD | blk_feature::WRITE_ZEROES);
    let mut queue = BlkQueue::<N>::new(devices.open(&disk.dev)?, want)?;
    let mut sectors = Sectors {
        workload: b.workload,
        per: (size / SECTOR_SIZE) as u64,
        capacity: disk.capacity,
        random: rdtsc() | 1,
        next_seq: 0,
    };
    let t0 = rdtsc();
    let end = t0 + us_to_cycles(b.seconds * 1_000_000);
    let done = slots.keep_busy(&mut queue, &mut sectors, end)?;
    let ns = cycles_to_ns(rdtsc() - t0).max(1);
    let per_s = u128::from(done) * 1_000_000_000 / u128::from(ns);
    let mib_10 = u128::from(done) * size as u128 * 10_000_000_000 / u128::from(ns) / (1 << 20);
    let (name, tag) = (b.workload.name(), disk.dev.tag());
    println!(
        "bench {} qd{}: {} requests in {} ms, {} req/s, {}.{} MiB/s{}",
        name,
        b.qd,
        done,
        ns / 1_000_000,
        per_s,
        mib_10 / 10,
        mib_10 % 10,
        tag
    );
    println!(
        "blk-bench: {} qd{}: {} notifies for {} requests, queue {}{}",
        name, b.qd, queue.notifies, done, N, tag
    );
    Ok(())
}

/// The requests in flight: per slot a header, a data buffer, a status
/// byte, the sector read and the token while it is busy.
struct Slots<'a> {
    hdrs: Vec<[u8; 16]>,
    data: Vec<&'a mut [u8]>,
    status: Vec<[u8; 1]>,
    sectors: Vec<u64>,
    tokens: Vec<Option<u16>>,
}

impl<'a> Slots<'a> {
    fn new(data: Vec<&'a mut [u8]>) -> Slots<'a> {
        let qd = data.len();
        Slots {
            hdrs: vec![[0u8; 16]; qd],
            data,
            status: vec![[0u8; 1]; qd],
            sectors: vec![0u64; qd],
            tokens: vec![None; qd],
        }
    }

    /// Adds the read of slot `i` at `sector` (not notified).
    fn submit<const N: usize>(
        &mut self,
        queue: &mut BlkQueue<N>,
        i: usize,
        sector: u64,
    ) -> Result<(), String> {
        self.sectors[i] = sector;
        self.hdrs[i] = header(blk_request::IN, sector);
        self.status[i][0] = 0xff;
        // SAFETY: the slot's buffers are left alone until `complete` returns
        // them, or the device is reset (drop of `queue`, before them).
        let token = unsafe {
            queue.submit(
                &[&self.hdrs[i][..]],
                &mut [&mut *self.data[i], &mut self.status[i][..]],
            )
        }?;
        self.tokens[i] = Some(token);
        Ok(())
    }

    /// Takes the completion of `token`; returns its slot.
    fn complete<const N: usize>(
        &mut self,
        queue: &mut BlkQueue<N>,
        token: u16,
    ) -> Result<usize, String> {
        let i = self
            .tokens
            .iter()
            .position(|&t| t == Some(token))
            .ok_or_else(|| format!("device used unknown token {}", token))?;
        // SAFETY: the buffers given to `submit` for this token.
        unsafe {
            queue.complete(
                token,
                &[&self.hdrs[i][..]],
                &mut [&mut *self.data[i], &mut self.status[i][..]],
            )
        }?;
        self.tokens[i] = None;
        if self.status[i][0] != 0 {
            return Err(format!(
                "read at sector {}: status {}",
                self.sectors[i], self.status[i][0]
            ));
        }
        Ok(i)
    }

    /// Keeps every slot busy until `end` (TSC), then drains; returns the
    /// requests completed. 5 s without a completion fails.
    fn keep_busy<const N: usize>(
        &mut self,
        queue: &mut BlkQueue<N>,
        sectors: &mut Sectors,
        end: u64,
    ) -> Result<u64, String> {
        for i in 0..self.tokens.len() {
            self.submit(queue, i, sectors.next())?;
        }
        queue.kick();
        let (mut done, mut stopping) = (0u64, false);
        let mut deadline = rdtsc() + us_to_cycles(TIMEOUT_US);
        while self.tokens.iter().any(Option::is_some) {
            let mut resubmitted = false;
            while let Some(token) = queue.peek_used() {
                let i = self.complete(queue, token)?;
                done += 1;
                stopping = stopping || rdtsc() >= end;
                if !stopping {
                    self.submit(queue, i, sectors.next())?;
                    resubmitted = true;
                }
                deadline = rdtsc() + us_to_cycles(TIMEOUT_US);
            }
            if resubmitted {
                queue.kick();
            } else if rdtsc() > deadline {
                let left = self.tokens.iter().filter(|t| t.is_some()).count();
                return Err(format!("{} requests not completed in 5 s", left));
            } else {
                pause();
            }
        }
        Ok(done)
    }
}
