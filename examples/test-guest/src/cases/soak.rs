//! `test=soak` (only when named; `soak_rounds=N` rounds, default 10): a
//! long, steady workload to snapshot in the middle of. Every online CPU
//! runs its LAPIC timer (periodic, 2 ms, vector `VECTOR_CPU_TIMER`, counted
//! per APIC ID; the APs program theirs when the `VECTOR_TIMER_SETUP` IPI
//! reaches them where they are parked). Each round, on the first writable
//! blk device and the first rng device (kept open across rounds):
//! - 256 bytes of entropy, zeroed first, must hold at least 64 distinct
//!   values;
//! - 8 writes of 4 KiB in flight at once (at least 2, or it fails) of the
//!   round's deterministic pattern (`blk_data` with the tag `SOAK_TAG +
//!   round`) to odd blocks of the round's 64 KiB region, completed, read
//!   back the same way and checked;
//! - then it waits for 50 more BSP timer ticks (about 100 ms; 2 s at most),
//!   and every online CPU's count must have grown during the round;
//!
//! and prints `soak: round I ok`. After the last round the timers stop and
//! it prints `soak: N rounds ok` and `test soak: ok`. Tick counts are on
//! `soak: ticks` lines of their own, so that the summary is the same on
//! every run (and after a restore).

use crate::cases::blk_data::{check, fill};
use crate::cases::blk_slots::{Dir, Slots};
use crate::cases::support::{report, Ctx, Want};
use crate::cases::timer::calibrate;
use crate::drivers::blk::Blk;
use crate::drivers::hal::GuestHal;
use crate::drivers::transport::{Health, StrictTransport};
use crate::platform::apic::{reg, Lapic, LVT_MASKED, LVT_PERIODIC};
use crate::platform::arch::{cli, sti};
use crate::platform::boot::{self, MAX_CPUS, VECTOR_CPU_TIMER, VECTOR_TIMER_SETUP};
use crate::platform::ram::Arena;
use crate::platform::time::{delay_us, wait_until};
use crate::println;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::DeviceType;

/// Rounds without `soak_rounds=`.
pub const DEFAULT_ROUNDS: u32 = 10;
/// Largest `soak_rounds=`.
pub const MAX_ROUNDS: u32 = 100_000;
/// Writes (and reads) a round tries to have in flight.
const SLOTS: usize = 8;
/// At most this many regions are cycled through (4 MiB).
const MAX_REGIONS: u64 = 64;
/// The pattern's tag of round 0 ("soak" in its high bytes).
const SOAK_TAG: u64 = 0x736f_616b_0000_0000;
/// BSP timer ticks a round waits for after its I/O.
const ROUND_TICKS: u64 = 50;
/// How long (vCPU time) a round waits for its ticks before it fails.
const ROUND_TICKS_TIMEOUT_US: u64 = 20_000_000;
/// Entropy bytes a round reads, and how many distinct values they need.
const RNG_BYTES: usize = 256;
const RNG_DISTINCT: usize = 64;

type Rng = VirtIORng<GuestHal, StrictTransport>;

pub fn run(ctx: &Ctx, _: Want) {
    report("soak", "", soak(ctx));
}

/// The online CPUs' APIC IDs (the BSP first), below 255.
fn cpu_ids(ctx: &Ctx) -> Vec<u32> {
    let mut ids = alloc::vec![ctx.bsp_apic_id];
    for slot in boot::ap_apic_ids().iter().skip(1) {
        let v = slot.load(Ordering::Acquire);
        let id = v & 0x7fff_ffff;
        if v & 0x8000_0000 != 0 && id < 0xff && id != ctx.bsp_apic_id {
            ids.push(id);
        }
    }
    ids
}

fn ticks(id: u32) -> u64 {
    boot::cpu_timer_ticks()[id as usize % MAX_CPUS].load(Ordering::Relaxed)
}

/// Programs every online CPU's timer: `initial` ticks of the divided
/// clock, periodic, or stopped (masked) when `initial` is 0.
fn set_timers(lapic: &Lapic, ids: &[u32], initial: u32) {
    let lvt = u32::from(VECTOR_CPU_TIMER)
        | if initial == 0 {
            LVT_MASKED
        } else {
            LVT_PERIODIC
        };
    let (lvt_cell, initial_cell) = boot::cpu_timer_setup();
    lvt_cell.store(lvt, Ordering::SeqCst);
    initial_cell.store(initial, Ordering::SeqCst);
    lapic.write(reg::TIMER_DIVIDE, 0x3);
    lapic.write(reg::LVT_TIMER, lvt);
    lapic.write(reg::TIMER_INITIAL, initial);
    for &id in ids.iter().skip(1) {
        // Fixed delivery, level assert.
        lapic.send_ipi(id, 0x4000 | u32::from(VECTOR_TIMER_SETUP));
    }
    // Let the APs take the IPI before the values change again.
    delay_us(1000);
}

fn soak(ctx: &Ctx) -> Result<String, String> {
    let rounds = ctx.soak_rounds;
    let disk = ctx
        .disks
        .iter()
        .find(|d| !d.ro)
        .ok_or_else(|| String::from("no writable blk device"))?;
    let region = Slots::span(SLOTS);
    let regions = (disk.capacity / region).min(MAX_REGIONS);
    if regions == 0 {
        return Err(String::from("disk too small"));
    }
    // SAFETY: the only arena while this test runs.
    let arena = unsafe { Arena::new(ctx.ram) }?;
    let mut slots = Slots::new(&arena, SLOTS)?;
    // Declared after the buffers: dropped (device reset) before them.
    let (mut blk, blk_health) = disk.open(ctx.devices)?;
    let (mut rng, rng_health) = open_rng(ctx)?;
    let ids = cpu_ids(ctx);
    println!("soak: {} rounds on {} cpus", rounds, ids.len());
    let per_ms = calibrate(ctx.lapic);
    if per_ms == 0 {
        return Err(String::from("lapic timer does not count"));
    }
    set_timers(ctx.lapic, &ids, per_ms.saturating_mul(2).max(1));
    sti();
    let mut result = Ok(());
    for round in 1..=u64::from(rounds) {
        slots.base = (round % regions) * region;
        let work = Work {
            blk: &mut blk,
            blk_health: &blk_health,
            rng: &mut rng,
            rng_health: &rng_health,
        };
        result = one_round(round, &mut slots, work, &ids);
        if result.is_err() {
            break;
        }
        println!("soak: round {} ok", round);
    }
    cli();
    set_timers(ctx.lapic, &ids, 0);
    result?;
    println!("soak: {} rounds ok", rounds);
    Ok(String::new())
}

/// The first rng device (either transport), on a fresh transport.
fn open_rng(ctx: &Ctx) -> Result<(Rng, Rc<Health>), String> {
    let dev = ctx
        .devices
        .iter()
        .find(|d| d.kind == DeviceType::EntropySource)
        .ok_or_else(|| String::from("no rng device"))?;
    let transport = ctx.devices.open(dev)?;
    let health = transport.health();
    let rng = Rng::new(transport).map_err(|e| health.explain(format!("rng init: {}", e)))?;
    health.check()?;
    Ok((rng, health))
}

/// The devices a round uses.
struct Work<'a> {
    blk: &'a mut Blk,
    blk_health: &'a Health,
    rng: &'a mut Rng,
    rng_health: &'a Health,
}

fn one_round(round: u64, slots: &mut Slots, work: Work, ids: &[u32]) -> Result<(), String> {
    let start: Vec<u64> = ids.iter().map(|&id| ticks(id)).collect();
    let fail = |what: String| format!("round {}: {}", round, what);
    entropy(work.rng, work.rng_health).map_err(fail)?;
    let tag = SOAK_TAG | round;
    for i in 0..SLOTS {
        let sector = slots.sector(i);
        fill(slots.bufs[i], sector, tag);
    }
    let writes = slots
        .round_trip(work.blk, Dir::Write, SLOTS)
        .map_err(fail)?;
    for b in slots.bufs.iter_mut() {
        b.fill(0);
    }
    let reads = slots
        .round_trip(work.blk, Dir::Read, writes)
        .map_err(fail)?;
    for i in 0..reads {
        let sector = slots.sector(i);
        check(slots.bufs[i], sector, tag).map_err(fail)?;
    }
    if writes.min(reads) < 2 {
        return Err(fail(format!(
            "only {} request in flight",
            writes.min(reads)
        )));
    }
    work.blk_health.check().map_err(fail)?;
    let bsp = ids.first().copied().unwrap_or(0);
    let bsp_start = start.first().copied().unwrap_or(0);
    // 100 ms when the vCPU runs undisturbed; a host short of CPU coalesces ticks, so the
    // bound only catches a timer that stopped.
    wait_until(ROUND_TICKS_TIMEOUT_US, || {
        ticks(bsp).wrapping_sub(bsp_start) >= ROUND_TICKS
    });
    let grown: Vec<u64> = ids
        .iter()
        .zip(&start)
        .map(|(&id, &s)| ticks(id).wrapping_sub(s))
        .collect();
    println!("soak: ticks {:?} in round {}", grown, round);
    if let Some((id, _)) = ids.iter().zip(&grown).find(|(_, &n)| n == 0) {
        return Err(fail(format!("no timer tick on apic {}", id)));
    }
    let bsp_ticks = grown.first().copied().unwrap_or(0);
    if bsp_ticks < ROUND_TICKS {
        return Err(fail(format!(
            "{} of {} bsp ticks in {} s",
            bsp_ticks,
            ROUND_TICKS,
            ROUND_TICKS_TIMEOUT_US / 1_000_000
        )));
    }
    Ok(())
}

/// `RNG_BYTES` from the rng, zeroed first: at least `RNG_DISTINCT` values.
fn entropy(rng: &mut Rng, health: &Health) -> Result<(), String> {
    let mut buf = [0u8; RNG_BYTES];
    let mut got = 0;
    for _ in 0..16 {
        if got == buf.len() {
            break;
        }
        let n = health
            .blocking(|| rng.request_entropy(&mut buf[got..]))
            .and_then(|r| r.map_err(|e| format!("{}", e)))
            .map_err(|e| format!("rng request: {}", e))?;
        got += n.min(buf.len() - got);
    }
    let mut seen = [false; 256];
    for &b in &buf[..got] {
        seen[usize::from(b)] = true;
    }
    let distinct = seen.iter().filter(|&&s| s).count();
    if distinct < RNG_DISTINCT {
        return Err(format!(
            "{} distinct values in {} entropy bytes",
            distinct, got
        ));
    }
    health.check()
}
