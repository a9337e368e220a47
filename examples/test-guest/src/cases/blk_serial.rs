//! `test=blk-serial`, on every blk device: GET_ID returns a non-empty id.

use crate::cases::support::{Ctx, Want};
use crate::drivers::blk::BlkDisk;
use alloc::format;
use alloc::string::String;

pub fn run(ctx: &Ctx, disk: &BlkDisk, _: Want) -> Result<String, String> {
    let (mut blk, health) = disk.open(ctx.devices)?;
    let mut id = [0u8; 20];
    let got = health
        .blocking(|| blk.device_id(&mut id))
        .and_then(|r| r.map_err(|e| format!("{}", e)));
    match got {
        Ok(0) => Err(String::from("empty id")),
        Ok(_) => Ok(String::new()),
        Err(e) => Err(format!("get_id: {}", e)),
    }
}
