//! `test=blk-ro`, on every read-only blk device: a write must complete with
//! status IOERR, a read must still work.

use crate::cases::support::{Ctx, Want};
use crate::drivers::blk::{drain, status_name, BlkDisk};
use crate::platform::ram::Arena;
use alloc::format;
use alloc::string::String;
use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus, SECTOR_SIZE};
use virtio_drivers::Error;

pub fn run(ctx: &Ctx, disk: &BlkDisk, _: Want) -> Result<String, String> {
    // SAFETY: the only arena while this test runs.
    let arena = unsafe { Arena::new(ctx.ram) }?;
    let buf = arena.take(4096)?;
    buf.fill(0x5a);
    let mut req = BlkReq::default();
    let mut resp = BlkResp::default();
    // Declared after the buffers: dropped (device reset) before them.
    let (mut blk, health) = disk.open(ctx.devices)?;
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
    health
        .blocking(|| blk.read_blocks(0, buf))
        .and_then(|r| r.map_err(|e| format!("{}", e)))
        .map_err(|e| format!("read after refused write: {}", e))?;
    Ok(format!(" (write refused: {})", status_name(status)))
}
