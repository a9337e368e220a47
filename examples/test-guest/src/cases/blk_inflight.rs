//! `test=blk-inflight`, on every writable blk device: as many 4 KiB writes
//! as `VirtIOBlk`'s queue takes (up to 32, `write_blocks_nb` until
//! `QueueFull`) at distinct, non-adjacent blocks, completed in used-ring
//! order through `peek_used`/`complete_write_blocks`; then the same blocks
//! read back the same way and checked.

use crate::cases::blk_data::{check, fill, new_tag};
use crate::cases::blk_slots::{Dir, Slots};
use crate::cases::support::{Ctx, Want};
use crate::drivers::blk::BlkDisk;
use crate::platform::ram::Arena;
use crate::println;
use alloc::format;
use alloc::string::String;

/// Requests it tries to have in flight.
const MAX: usize = 32;

pub fn run(ctx: &Ctx, disk: &BlkDisk, _: Want) -> Result<String, String> {
    if disk.capacity < Slots::span(MAX) {
        return Err(String::from("disk too small"));
    }
    // SAFETY: the only arena while this test runs.
    let arena = unsafe { Arena::new(ctx.ram) }?;
    let mut slots = Slots::new(&arena, MAX)?;
    // Declared after the buffers: dropped (device reset) before them.
    let (mut blk, _health) = disk.open(ctx.devices)?;
    let tag = new_tag();
    for i in 0..MAX {
        let sector = slots.sector(i);
        fill(slots.bufs[i], sector, tag);
    }
    let writes = slots.round_trip(&mut blk, Dir::Write, MAX)?;
    for b in slots.bufs.iter_mut() {
        b.fill(0);
    }
    let reads = slots.round_trip(&mut blk, Dir::Read, writes)?;
    for i in 0..reads {
        let sector = slots.sector(i);
        check(slots.bufs[i], sector, tag)?;
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
