//! `bench=pio:N` and `bench=mmio:N[:ADDR]`: the cost of a port-I/O and of an
//! MMIO-write VM exit, timed at CPL3.

use crate::platform::arch::{mmio_store32_eax, outb, rdtsc};
use crate::platform::boot;
use crate::platform::pvh::MemEntry;
use crate::platform::time::cycles_to_ns;
use crate::println;
use alloc::format;
use alloc::string::String;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

/// One VM-exit benchmark, timed at CPL3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitBench {
    /// `bench=pio:N`: N byte writes `out 0x80, al`.
    Pio(u64),
    /// `bench=mmio:N[:ADDR]`: N 32-bit writes to guest-physical `addr`.
    Mmio { n: u64, addr: u64 },
}

/// `bench=mmio`'s address when none is given (a sink device in vmkit's
/// VMM; unassigned in QEMU's microvm, where writes still exit to QEMU).
pub const MMIO_BENCH_ADDR: u64 = 0xd0f0_0000;

/// The debug port: every VMM records or ignores writes to it.
const DEBUG_PORT: u16 = 0x80;

const GIB: u64 = 1 << 30;
const PAGE_2M: u64 = 1 << 21;

/// Runs the `bench=pio`/`bench=mmio` entries in command-line order.
pub fn run(benches: impl Iterator<Item = ExitBench>, memmap: &[MemEntry]) {
    for b in benches {
        match b {
            ExitBench::Pio(n) => pio(n),
            ExitBench::Mmio { n, addr } => mmio(n, addr, memmap),
        }
    }
}

/// Writes `n` bytes to port 0x80 and prints the average cost.
pub fn pio(n: u64) {
    let start = rdtsc();
    for i in 0..n {
        outb(DEBUG_PORT, i as u8);
    }
    let cycles = rdtsc() - start;
    let per_exit = cycles_to_ns(cycles).checked_div(n).unwrap_or(0);
    println!("bench pio: {} exits, {} ns/exit", n, per_exit);
}

/// Writes `n` 32-bit words to guest-physical `addr` (`mov dword [addr], eax`
/// on an uncached user mapping) and prints the average cost.
pub fn mmio(n: u64, addr: u64, memmap: &[MemEntry]) {
    let ptr = match target(addr, memmap) {
        Ok(p) => p,
        Err(why) => {
            println!("bench mmio: FAIL {}", why);
            return;
        }
    };
    let start = rdtsc();
    for i in 0..n {
        // SAFETY: `ptr` maps `addr`, which `target` checked is outside every
        // memory-map entry except reserved ones: no memory Rust code owns.
        unsafe { mmio_store32_eax(ptr, i as u32) };
    }
    let cycles = rdtsc() - start;
    let per_exit = cycles_to_ns(cycles).checked_div(n).unwrap_or(0);
    println!("bench mmio: {} exits, {} ns/exit", n, per_exit);
}

/// Checks `addr` and returns the virtual address to write: `addr` itself in
/// the boot mapping's uncached top GiB (3-4 GiB), else a fresh uncached alias
/// of its 2 MiB page (below 3 GiB the boot mapping is write-back).
fn target(addr: u64, memmap: &[MemEntry]) -> Result<u64, String> {
    if addr & 3 != 0 {
        return Err(format!("0x{:x} not 4-byte aligned", addr));
    }
    if addr >= 512 * GIB {
        return Err(format!("0x{:x} not below 512 GiB", addr));
    }
    let map = memmap.iter().filter(|e| e.size != 0);
    if map.clone().next().is_none() {
        return Err(format!("0x{:x}: no memory map to check it against", addr));
    }
    // Anything but "reserved" (RAM, ACPI, NVS, unusable, other types) may be
    // memory: a write there would not exit and might hit the guest itself.
    if let Some(e) = map
        .filter(|e| e.kind != 2)
        .find(|e| addr < e.addr.saturating_add(e.size) && e.addr < addr + 4)
    {
        let kind = match e.kind {
            1 => "ram",
            3 => "acpi",
            4 => "nvs",
            5 => "unusable",
            _ => "memory",
        };
        return Err(format!(
            "0x{:x} in {} 0x{:016x}-0x{:016x}",
            addr,
            kind,
            e.addr,
            e.addr.saturating_add(e.size - 1)
        ));
    }
    if (3 * GIB..4 * GIB).contains(&addr) {
        return Ok(addr);
    }
    alias(addr).ok_or_else(|| format!("0x{:x} cannot be mapped", addr))
}

/// Page tables of the alias window at 512 GiB (PML4 entry 1): a PDPT whose
/// entry 0 is a page directory of 2 MiB uncached user pages, handed out one
/// per `bench=mmio` entry outside 3-4 GiB.
#[repr(C, align(4096))]
struct AliasTables(UnsafeCell<[[u64; 512]; 2]>);

// SAFETY: only `alias` writes them, on the BSP, each page-directory entry at
// most once (claimed through `ALIAS_USED`) and the PDPT only before PML4
// entry 1 makes it visible.
unsafe impl Sync for AliasTables {}

static ALIAS: AliasTables = AliasTables(UnsafeCell::new([[0; 512]; 2]));
static ALIAS_USED: AtomicUsize = AtomicUsize::new(0);

/// Virtual base of the alias window (PML4 entry 1).
const ALIAS_BASE: u64 = 512 * GIB;

/// Maps the 2 MiB page holding `addr` (below 512 GiB) at a fresh slot of the
/// alias window, uncached and user-accessible, and returns the alias of
/// `addr`. Entries only go from not present to present: no TLB flush.
fn alias(addr: u64) -> Option<u64> {
    let slot = ALIAS_USED.fetch_add(1, Ordering::Relaxed);
    if slot >= 512 {
        return None;
    }
    let tables = ALIAS.0.get().cast::<u64>();
    // SAFETY: entry 1 of the boot PML4 (one 4 KiB table, user-writable).
    let pml4e = unsafe { boot::boot_pml4().add(1) };
    // SAFETY: an aligned u64 of the PML4.
    if unsafe { pml4e.read_volatile() } & 1 == 0 {
        // SAFETY: entry 0 of the alias PDPT (table 0), not yet in use; the
        // tables are in the image, identity-mapped, so the pointer is the
        // physical address.
        unsafe { tables.write_volatile(tables.add(512) as u64 | 0x7) };
        // SAFETY: as above; the PDPT is complete before it becomes visible.
        unsafe { pml4e.write_volatile(tables as u64 | 0x7) };
    }
    // P | RW | US | PWT | PCD | PS: 2 MiB, uncached, like the MMIO hole.
    // SAFETY: entry `slot` < 512 of the alias page directory (table 1),
    // claimed above and not present until now.
    unsafe {
        tables
            .add(512 + slot)
            .write_volatile((addr & !(PAGE_2M - 1)) | 0x9f)
    };
    Some(ALIAS_BASE + slot as u64 * PAGE_2M + (addr & (PAGE_2M - 1)))
}
