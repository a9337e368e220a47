//! `test=blk-discard`, on every writable blk device, through `BlkQueue`
//! (virtio-drivers' `VirtIOBlk` has neither request): the 1 MiB at the
//! MiB-aligned middle of the disk written, DISCARDed in segments of at most
//! `max_discard_sectors`, read (zeros or not, info only); written again,
//! WRITE_ZEROES (with UNMAP when `write_zeroes_may_unmap`), read: must be
//! all zero.

use crate::cases::blk_data::{check, fill, first_nonzero, new_tag, Span, MIB_SECTORS};
use crate::cases::support::{Ctx, Want};
use crate::drivers::blk::BlkDisk;
use crate::drivers::blk_queue::{self, BlkQueue};
use crate::drivers::spec::{blk_config, blk_feature, blk_request, blk_status};
use crate::platform::ram::Arena;
use crate::println;
use alloc::format;
use alloc::string::String;
use virtio_drivers::device::blk::SECTOR_SIZE;

/// Sectors it works on: 1 MiB.
const SECTORS: u64 = MIB_SECTORS;

type Queue = BlkQueue<16>;

pub fn run(ctx: &Ctx, disk: &BlkDisk, _: Want) -> Result<String, String> {
    let both = blk_feature::DISCARD | blk_feature::WRITE_ZEROES;
    if disk.offered & blk_feature::DISCARD == 0 {
        return Err(String::from("not offered"));
    }
    if disk.offered & blk_feature::WRITE_ZEROES == 0 {
        return Err(String::from("write-zeroes not offered"));
    }
    if disk.capacity < SECTORS {
        return Err(String::from("disk too small"));
    }
    let start = (disk.capacity / 2 / SECTORS) * SECTORS;
    let area = Span {
        sectors: start..start + SECTORS,
        chunk: (disk.request_bytes() / SECTOR_SIZE) as u64,
        tag: new_tag(),
    };
    // SAFETY: the only arena while this test runs.
    let arena = unsafe { Arena::new(ctx.ram) }?;
    let buf = arena.take(area.chunk as usize * SECTOR_SIZE)?;
    // Declared after the buffer: dropped (device reset) before it.
    let mut queue = Queue::new(ctx.devices.open(&disk.dev)?, blk_queue::FEATURES)?;
    if queue.features & both != both {
        return Err(String::from("not negotiated"));
    }
    discard(&area, &mut queue, buf, disk)?;
    write_zeroes(&area, &mut queue, buf, disk)
}

/// DISCARD over the pattern; what reads come back is only reported.
fn discard(area: &Span, queue: &mut Queue, buf: &mut [u8], disk: &BlkDisk) -> Result<(), String> {
    let max = u64::from(queue.config_u32(blk_config::MAX_DISCARD_SECTORS)).max(1);
    let alignment = queue.config_u32(blk_config::DISCARD_SECTOR_ALIGNMENT);
    area.write_pattern(queue, buf)?;
    area.segments(queue, blk_request::DISCARD, max, 0)?;
    println!(
        "blk-discard: discarded {} sectors at {} (max {} per request, alignment {}){}",
        SECTORS,
        area.sectors.start,
        max,
        alignment,
        disk.dev.tag()
    );
    let after = area.read_back(queue, buf)?;
    let seen = if after.zeros {
        "zeros"
    } else if after.pattern {
        "old data"
    } else {
        "mixed"
    };
    println!(
        "blk-discard: reads after discard: {}{}",
        seen,
        disk.dev.tag()
    );
    Ok(())
}

/// WRITE_ZEROES over the pattern: must read back as zeros.
fn write_zeroes(
    area: &Span,
    queue: &mut Queue,
    buf: &mut [u8],
    disk: &BlkDisk,
) -> Result<String, String> {
    let max = u64::from(queue.config_u32(blk_config::MAX_WRITE_ZEROES_SECTORS)).max(1);
    let may_unmap = queue.config_u32(blk_config::WRITE_ZEROES_MAY_UNMAP) & 0xff != 0;
    area.write_pattern(queue, buf)?;
    let flags = if may_unmap {
        blk_request::FLAG_UNMAP
    } else {
        0
    };
    area.segments(queue, blk_request::WRITE_ZEROES, max, flags)?;
    println!(
        "blk-discard: wrote zeroes over {} sectors at {}{}{}",
        SECTORS,
        area.sectors.start,
        if may_unmap { " (unmap)" } else { "" },
        disk.dev.tag()
    );
    match area.read_back(queue, buf)? {
        ReadBack { zeros: true, .. } => Ok(String::new()),
        ReadBack { first_nonzero, .. } => Err(format!(
            "sector {} not zero after write-zeroes",
            first_nonzero.unwrap_or(area.sectors.start)
        )),
    }
}

/// What the area read back as.
struct ReadBack {
    zeros: bool,
    pattern: bool,
    first_nonzero: Option<u64>,
}

impl Span {
    fn write_pattern(&self, queue: &mut Queue, buf: &mut [u8]) -> Result<(), String> {
        for (lba, n) in self.requests() {
            fill(&mut buf[..n], lba, self.tag);
            expect_ok("write", lba, queue.read_write(true, lba, &mut buf[..n])?)?;
        }
        Ok(())
    }

    fn read_back(&self, queue: &mut Queue, buf: &mut [u8]) -> Result<ReadBack, String> {
        let mut seen = ReadBack {
            zeros: true,
            pattern: true,
            first_nonzero: None,
        };
        for (lba, n) in self.requests() {
            expect_ok("read", lba, queue.read_write(false, lba, &mut buf[..n])?)?;
            if let Some(s) = first_nonzero(&mut buf[..n], lba) {
                seen.zeros = false;
                seen.first_nonzero.get_or_insert(s);
            }
            if seen.pattern && check(&mut buf[..n], lba, self.tag).is_err() {
                seen.pattern = false;
            }
        }
        Ok(seen)
    }

    /// DISCARD or WRITE_ZEROES (`kind`) over the area, `max` sectors each.
    fn segments(&self, queue: &mut Queue, kind: u32, max: u64, flags: u32) -> Result<(), String> {
        let what = if kind == blk_request::DISCARD {
            "discard"
        } else {
            "write-zeroes"
        };
        let mut lba = self.sectors.start;
        while lba < self.sectors.end {
            let n = max.min(self.sectors.end - lba).min(u64::from(u32::MAX));
            expect_ok(
                what,
                lba,
                queue.segment_request(kind, lba, n as u32, flags)?,
            )?;
            lba += n;
        }
        Ok(())
    }
}

fn expect_ok(what: &str, sector: u64, status: u8) -> Result<(), String> {
    match status {
        blk_status::OK => Ok(()),
        blk_status::IOERR => Err(format!("{} at sector {}: IOERR", what, sector)),
        blk_status::UNSUPP => Err(format!("{} at sector {}: UNSUPP", what, sector)),
        s => Err(format!("{} at sector {}: status {}", what, sector, s)),
    }
}
