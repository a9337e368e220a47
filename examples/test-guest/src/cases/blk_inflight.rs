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

impl Slots<'_> {
    /// Writes every slot until the queue is full, then takes the
    /// completions; returns how many were in flight.
    fn write_all(&mut self, blk: &mut Blk) -> Result<usize, String> {
        let mut writes = 0;
        for i in 0..MAX {
            // SAFETY: reqs[i], bufs[i], resps[i] are not touched until
            // `complete_write_blocks` returns them (or the device is reset).
            let sent = unsafe {
                blk.write_blocks_nb(
                    sector(i) as usize,
                    &mut self.reqs[i],
                    self.bufs[i],
                    &mut self.resps[i],
                )
            };
            match sent {
                Ok(t) => {
                    self.tokens[i] = Some(t);
                    writes += 1;
                }
                Err(Error::QueueFull) => break,
                Err(e) => return Err(format!("write {}: {}", i, e)),
            }
        }
        let Slots {
            bufs,
            reqs,
            resps,
            tokens,
        } = self;
        drain(blk, tokens, |blk, i, t| {
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
        Ok(writes)
    }

    /// Reads the first `writes` slots back the same way; returns how many.
    fn read_back(&mut self, blk: &mut Blk, writes: usize) -> Result<usize, String> {
        let mut reads = 0;
        for i in 0..writes {
            // SAFETY: as for the writes.
            let sent = unsafe {
                blk.read_blocks_nb(
                    sector(i) as usize,
                    &mut self.reqs[i],
                    self.bufs[i],
                    &mut self.resps[i],
                )
            };
            match sent {
                Ok(t) => {
                    self.tokens[i] = Some(t);
                    reads += 1;
                }
                Err(Error::QueueFull) => break,
                Err(e) => return Err(format!("read {}: {}", i, e)),
            }
        }
        let Slots {
            bufs,
            reqs,
            resps,
            tokens,
        } = self;
        drain(blk, tokens, |blk, i, t| {
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
        Ok(reads)
    }
}
