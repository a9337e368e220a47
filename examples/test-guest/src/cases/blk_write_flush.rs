//! `blk-write-flush=SECTOR:VALUE` (a command-line item of its own, not a
//! `test=` case: it runs after everything else and does not return): on
//! the first writable blk device, one sector of `VALUE` (little-endian
//! u32s) written at `SECTOR`, FLUSH, then `blk-flushed: <sector>` and halt,
//! for the host to kill the VMM and read the file.

use crate::drivers::blk::BlkDisk;
use crate::drivers::spec::blk_feature;
use crate::drivers::virtio::Devices;
use crate::platform::arch::halt_forever;
use crate::platform::ram::{Arena, FreeRam};
use crate::println;
use alloc::format;
use alloc::string::String;
use virtio_drivers::device::blk::SECTOR_SIZE;

/// What `blk-write-flush=` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteFlush {
    pub sector: u64,
    pub value: u32,
}

/// Runs it; returns (after a `FAIL` line) only when that did not work.
pub fn run(devices: &Devices, disks: &[BlkDisk], wf: WriteFlush, ram: Option<FreeRam>) {
    let Some(disk) = disks.iter().find(|d| !d.ro) else {
        println!("blk-write-flush: FAIL no writable blk device");
        return;
    };
    if let Err(why) = write_and_flush(devices, disk, wf, ram) {
        println!("blk-write-flush: FAIL {}{}", why, disk.dev.tag());
    }
}

fn write_and_flush(
    devices: &Devices,
    disk: &BlkDisk,
    wf: WriteFlush,
    ram: Option<FreeRam>,
) -> Result<(), String> {
    if wf.sector >= disk.capacity {
        return Err(format!(
            "sector {} beyond capacity {}",
            wf.sector, disk.capacity
        ));
    }
    // SAFETY: the only arena from now on (the guest halts after).
    let arena = unsafe { Arena::new(ram) }?;
    let buf = arena.take(SECTOR_SIZE)?;
    for c in buf.chunks_exact_mut(4) {
        c.copy_from_slice(&wf.value.to_le_bytes());
    }
    let (mut blk, health) = disk.open(devices)?;
    health
        .blocking(|| blk.write_blocks(wf.sector as usize, buf))
        .and_then(|r| r.map_err(|e| format!("{}", e)))
        .map_err(|e| format!("write: {}", e))?;
    health
        .blocking(|| blk.flush())
        .and_then(|r| r.map_err(|e| format!("{}", e)))
        .map_err(|e| format!("flush: {}", e))?;
    if disk.offered & blk_feature::FLUSH == 0 {
        println!("blk-write-flush: no FLUSH feature (write-through device)");
    }
    println!("blk-flushed: {}", wf.sector);
    halt_forever()
}
