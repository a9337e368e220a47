//! `test=blk-verify[:MiB]`, on every writable blk device: the test pattern
//! (`blk_data`) over the first MiBs of the disk (64, or N when named as
//! `blk-verify:N`, 16 under `all`; at most the disk) in blocking 128 KiB
//! writes through `VirtIOBlk` (less when `size_max` says so), then read
//! back and every sector checked.

use crate::cases::blk_data::{check, fill, new_tag, Span, MIB_SECTORS};
use crate::cases::support::{Ctx, Want};
use crate::drivers::blk::{Blk, BlkDisk};
use crate::drivers::transport::Health;
use crate::platform::arch::rdtsc;
use crate::platform::ram::Arena;
use crate::platform::time::cycles_to_ns;
use crate::println;
use alloc::format;
use alloc::string::String;
use virtio_drivers::device::blk::SECTOR_SIZE;

/// MiB covered when named without a size, and under `all`.
const NAMED_MIB: u64 = 64;
const ALL_MIB: u64 = 16;

pub fn run(ctx: &Ctx, disk: &BlkDisk, want: Want) -> Result<String, String> {
    let mib = match want {
        Want::Named(Some(mib)) => mib,
        Want::Named(None) => NAMED_MIB,
        Want::All => ALL_MIB,
    };
    let total = mib.saturating_mul(MIB_SECTORS).min(disk.capacity);
    if total == 0 {
        return Err(String::from("empty disk"));
    }
    let chunk = (disk.request_bytes() / SECTOR_SIZE) as u64;
    // SAFETY: the only arena while this test runs.
    let arena = unsafe { Arena::new(ctx.ram) }?;
    let buf = arena.take(chunk as usize * SECTOR_SIZE)?;
    let (mut blk, health) = disk.open(ctx.devices)?;
    let pass = Span {
        sectors: 0..total,
        chunk,
        tag: new_tag(),
    };

    let t0 = rdtsc();
    pass.write(&health, &mut blk, buf)?;
    let t1 = rdtsc();
    pass.read(&health, &mut blk, buf)?;
    let t2 = rdtsc();
    println!(
        "blk-verify: {} MiB written in {} ms, read in {} ms{}",
        total / MIB_SECTORS,
        cycles_to_ns(t1 - t0) / 1_000_000,
        cycles_to_ns(t2 - t1) / 1_000_000,
        disk.dev.tag()
    );
    Ok(String::new())
}

impl Span {
    fn write(&self, health: &Health, blk: &mut Blk, buf: &mut [u8]) -> Result<(), String> {
        for (lba, n) in self.requests() {
            fill(&mut buf[..n], lba, self.tag);
            health
                .blocking(|| blk.write_blocks(lba as usize, &buf[..n]))
                .and_then(|r| r.map_err(|e| format!("{}", e)))
                .map_err(|e| format!("write at sector {}: {}", lba, e))?;
        }
        Ok(())
    }

    fn read(&self, health: &Health, blk: &mut Blk, buf: &mut [u8]) -> Result<(), String> {
        for (lba, n) in self.requests() {
            health
                .blocking(|| blk.read_blocks(lba as usize, &mut buf[..n]))
                .and_then(|r| r.map_err(|e| format!("{}", e)))
                .map_err(|e| format!("read at sector {}: {}", lba, e))?;
            check(&mut buf[..n], lba, self.tag)?;
        }
        Ok(())
    }
}
