//! `test=blk-inflight`, on every writable blk device: as many 4 KiB writes
//! as `VirtIOBlk`'s queue takes (up to 32, `write_blocks_nb` until
//! `QueueFull`) at distinct, non-adjacent blocks, completed in used-ring
//! order through `peek_used`/`complete_write_blocks`; then the same blocks
//! read back the same way and checked.

use crate::cases::blk_data::{check, fill, new_tag};
use crate::cases::support::{Ctx, Want};
use crate::drivers::blk::{drain, status_name, Blk, BlkDisk};
use crate::platform::ram::Arena;
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_drivers::device::blk::{BlkReq, BlkResp, SECTOR_SIZE};
use virtio_drivers::Error;

/// Requests it tries to have in flight.
const MAX: usize = 32;
const BLOCK: usize = 4096;
const BLOCK_SECTORS: u64 = (BLOCK / SECTOR_SIZE) as u64;

/// Odd 4 KiB blocks: distinct, never adjacent (no merging).
fn sector(i: usize) -> u64 {
    (2 * i as u64 + 1) * BLOCK_SECTORS
}

/// The requests' memory: per slot a header, a data block and a response.
struct Slots<'a> {
    bufs: Vec<&'a mut [u8]>,
    reqs: Vec<BlkReq>,
    resps: Vec<BlkResp>,
    tokens: [Option<u16>; MAX],
}

pub fn run(ctx: &Ctx, disk: &BlkDisk, _: Want) -> Result<String, String> {
    if disk.capacity < (2 * MAX as u64 + 1) * BLOCK_SECTORS {
        return Err(String::from("disk too small"));
    }
    // SAFETY: the only arena while this test runs.
    let arena = unsafe { Arena::new(ctx.ram) }?;
    let mut slots = Slots {
        bufs: arena.take_many(MAX, BLOCK)?,
        reqs: (0..MAX).map(|_| BlkReq::default()).collect(),
        resps: (0..MAX).map(|_| BlkResp::default()).collect(),
        tokens: [None; MAX],
    };
    // Declared after the buffers: dropped (device reset) before them.
    let (mut blk, _health) = disk.open(ctx.devices)?;
    let tag = new_tag();
    for (i, b) in slots.bufs.iter_mut().enumerate() {
        fill(b, sector(i), tag);
    }
    let writes = slots.write_all(&mut blk)?;
    for b in slots.bufs.iter_mut() {
        b.fill(0);
    }
    let reads = slots.read_back(&mut blk, writes)?;
    for (i, b) in slots.bufs.iter_mut().enumerate().take(reads) {
        check(b, sector(i), tag)?;
    }
    let n = writes.min(reads);
    if n < 2 {
        return Err(format!("only {} request in flight", n));
    }
    println!(
        "blk-inflight: {} requests in flight, all completed{}",
        n,
        disk.dev.tag()
    );
    Ok(String::new())
}

/// Which way the requests go.
#[derive(Clone, Copy)]
enum Dir {
    Write,
    Read,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Write => "write",
            Dir::Read => "read",
        }
    }
}

impl Slots<'_> {
    /// Writes every slot until the queue is full, then takes the
    /// completions; returns how many were in flight.
    fn write_all(&mut self, blk: &mut Blk) -> Result<usize, String> {
        self.round_trip(blk, Dir::Write, MAX)
    }

    /// Reads the first `writes` slots back the same way; returns how many.
    fn read_back(&mut self, blk: &mut Blk, writes: usize) -> Result<usize, String> {
        self.round_trip(blk, Dir::Read, writes)
    }

    /// Submits the first `count` slots in direction `dir` until the queue is
    /// full, then completes them in used-ring order; returns how many went.
    fn round_trip(&mut self, blk: &mut Blk, dir: Dir, count: usize) -> Result<usize, String> {
        let mut sent_n = 0;
        for i in 0..count {
            let (req, buf, resp) = (&mut self.reqs[i], &mut *self.bufs[i], &mut self.resps[i]);
            // SAFETY: reqs[i], bufs[i], resps[i] are not touched until the
            // matching `complete_*_blocks` returns them (or the device is reset).
            let sent = unsafe {
                match dir {
                    Dir::Write => blk.write_blocks_nb(sector(i) as usize, req, buf, resp),
                    Dir::Read => blk.read_blocks_nb(sector(i) as usize, req, buf, resp),
                }
            };
            match sent {
                Ok(t) => {
                    self.tokens[i] = Some(t);
                    sent_n += 1;
                }
                Err(Error::QueueFull) => break,
                Err(e) => return Err(format!("{} {}: {}", dir.name(), i, e)),
            }
        }
        let Slots {
            bufs,
            reqs,
            resps,
            tokens,
        } = self;
        drain(blk, tokens, |blk, i, t| {
            let (req, buf, resp) = (&reqs[i], &mut *bufs[i], &mut resps[i]);
            // SAFETY: the buffers given to `*_blocks_nb` for this token.
            let done = unsafe {
                match dir {
                    Dir::Write => blk.complete_write_blocks(t, req, buf, resp),
                    Dir::Read => blk.complete_read_blocks(t, req, buf, resp),
                }
            };
            let status = status_name(resps[i].status());
            done.map_err(|e| format!("{} {}: {} (status {})", dir.name(), i, e, status))
        })?;
        Ok(sent_n)
    }
}
