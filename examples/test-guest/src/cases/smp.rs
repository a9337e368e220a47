//! `test=smp`: every CPU of the MADT came online (brought up at boot, see
//! `platform::smp`).

use crate::cases::support::{report, Ctx, Want};
use alloc::format;
use alloc::string::String;

pub fn run(ctx: &Ctx, _: Want) {
    let result = if ctx.online.count == ctx.cpus {
        Ok(String::new())
    } else {
        Err(format!("{}/{}", ctx.online.count, ctx.cpus))
    };
    report("smp", "", result);
}
