//! Mapping device register windows (virtio-mmio windows, PCI BARs, an ECAM
//! window) that lie above 4 GiB, where the boot mapping ends.

use crate::platform::boot;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Page directories for MMIO windows above 4 GiB (one per GiB touched).
const SPARE_PDS: usize = 4;

#[repr(C, align(4096))]
struct SparePds(UnsafeCell<[[u64; 512]; SPARE_PDS]>);

// SAFETY: only `map_mmio` writes them, each at most once (claimed through
// `SPARE_USED`), before the PDPT entry that makes the CPU use it.
unsafe impl Sync for SparePds {}

static SPARE: SparePds = SparePds(UnsafeCell::new([[0; 512]; SPARE_PDS]));
static SPARE_USED: AtomicUsize = AtomicUsize::new(0);

const GIB: u64 = 1 << 30;

/// Makes `[addr, addr + size)` accessible at CPL3, uncached. Below 4 GiB the
/// boot mapping already does (the top GiB uncached); up to 512 GiB this adds
/// 2 MiB uncached user pages through a spare page directory per GiB, written
/// from CPL3 like every other page-table byte. A not-present entry becoming
/// present needs no TLB flush.
pub fn map_mmio(addr: u64, size: u64) -> bool {
    let Some(end) = addr.checked_add(size) else {
        return false;
    };
    if end <= 4 * GIB {
        return true;
    }
    if end > 512 * GIB {
        return false;
    }
    ((addr / GIB).max(4)..=(end - 1) / GIB).all(map_gib)
}

/// Maps GiB number `gib` (4 to 511) with 2 MiB uncached user pages unless
/// its PDPT entry is already present; false when no spare directory is left.
fn map_gib(gib: u64) -> bool {
    // SAFETY: `gib` < 512 indexes the boot PDPT (one 4 KiB table).
    let pdpte = unsafe { boot::boot_pdpt().add(gib as usize) };
    // SAFETY: an aligned u64 of the PDPT, mapped user-writable.
    if unsafe { pdpte.read_volatile() } & 1 != 0 {
        return true;
    }
    let index = SPARE_USED.fetch_add(1, Ordering::Relaxed);
    if index >= SPARE_PDS {
        return false;
    }
    // SAFETY: page directory `index` < SPARE_PDS was just claimed and
    // nothing uses it yet.
    let pd = unsafe { SPARE.0.get().cast::<[u64; 512]>().add(index).cast::<u64>() };
    for j in 0..512u64 {
        // P | RW | US | PWT | PCD | PS: 2 MiB, uncached, like the MMIO hole.
        // SAFETY: j < 512 entries of the claimed directory.
        unsafe {
            pd.add(j as usize)
                .write_volatile(gib * GIB + (j << 21) + 0x9f)
        };
    }
    // SAFETY: as above; the directory is complete before it becomes visible.
    unsafe { pdpte.write_volatile(pd as u64 | 0x7) };
    true
}
