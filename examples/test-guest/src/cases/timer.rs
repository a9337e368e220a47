//! `test=timer`: the LAPIC timer, periodic, divide by 16, 2 ms period,
//! vector 0x20: 10 ticks within 2 s.

use crate::cases::support::{report, Ctx, Want};
use crate::platform::apic::{reg, Lapic, LVT_MASKED, LVT_PERIODIC};
use crate::platform::arch::{cli, sti};
use crate::platform::boot::{self, VECTOR_TIMER};
use crate::platform::time::{delay_us, wait_until};
use crate::println;
use alloc::format;
use alloc::string::String;
use core::sync::atomic::Ordering;

/// Ticks to wait for.
const WANTED: u64 = 10;

pub fn run(ctx: &Ctx, _: Want) {
    report("timer", "", ticks(ctx.lapic));
}

/// LAPIC timer ticks in 1 ms (divide by 16, one-shot, masked).
pub fn calibrate(lapic: &Lapic) -> u32 {
    lapic.write(reg::TIMER_DIVIDE, 0x3); // divide by 16
    lapic.write(reg::LVT_TIMER, LVT_MASKED | u32::from(VECTOR_TIMER));
    lapic.write(reg::TIMER_INITIAL, u32::MAX);
    delay_us(1000);
    let per_ms = u32::MAX - lapic.read(reg::TIMER_CURRENT);
    lapic.write(reg::TIMER_INITIAL, 0);
    per_ms
}

fn ticks(lapic: &Lapic) -> Result<String, String> {
    let per_ms = calibrate(lapic);
    if per_ms == 0 {
        println!("timer: 0 lapic interrupts");
        return Err(String::from("lapic timer does not count"));
    }
    let start = boot::timer_ticks().load(Ordering::Relaxed);
    lapic.write(reg::LVT_TIMER, LVT_PERIODIC | u32::from(VECTOR_TIMER));
    lapic.write(reg::TIMER_INITIAL, per_ms.saturating_mul(2).max(1));
    sti();
    wait_until(2_000_000, || {
        boot::timer_ticks().load(Ordering::Relaxed) - start >= WANTED
    });
    cli();
    lapic.write(reg::LVT_TIMER, LVT_MASKED | u32::from(VECTOR_TIMER));
    lapic.write(reg::TIMER_INITIAL, 0);

    let n = boot::timer_ticks().load(Ordering::Relaxed) - start;
    println!("timer: {} lapic interrupts", n);
    if n >= WANTED {
        Ok(String::new())
    } else {
        Err(format!("{} of {} ticks in 2 s", n, WANTED))
    }
}
