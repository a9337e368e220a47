//! Free RAM for DMA data buffers: the top (up to 32 MiB) of the largest RAM
//! range above the image, handed out by an `Arena`. The heap (4 MiB, in
//! the image's .bss) is for the drivers' own rings and buffers; data
//! buffers (a benchmark at queue depth 32 with 128 KiB requests needs
//! 4 MiB) come from here.

use crate::platform::pvh::MemEntry;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::Cell;

extern "C" {
    /// End of the image (linker.ld).
    static __image_end: u8;
}

/// Most of the free RAM the arena takes.
const ARENA_MAX: u64 = 32 << 20;
/// End of the write-back part of the boot mapping.
const WRITE_BACK_END: u64 = 3 << 30;

/// Free RAM for data buffers: the top (up to 32 MiB) of the largest RAM
/// range above the image and below 3 GiB (the write-back part of the boot
/// mapping).
#[derive(Clone, Copy, Debug)]
pub struct FreeRam {
    start: u64,
    end: u64,
}

/// Finds the arena's RAM in the memory map.
pub fn free_ram(map: &[MemEntry]) -> Option<FreeRam> {
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let best = map
        .iter()
        .filter(|e| e.is_ram())
        .filter_map(|e| {
            let start = e.addr.max(image_end).next_multiple_of(4096);
            let end = e.addr.saturating_add(e.size).min(WRITE_BACK_END) & !4095;
            (end > start).then_some(FreeRam { start, end })
        })
        .max_by_key(|r| r.end - r.start)?;
    Some(FreeRam {
        start: best.start.max(best.end.saturating_sub(ARENA_MAX)),
        end: best.end,
    })
}

/// Hands out disjoint, 4 KiB-aligned buffers from `FreeRam`; everything is
/// given back when the arena goes away (one test at a time).
pub struct Arena {
    next: Cell<u64>,
    end: u64,
}

impl Arena {
    /// # Safety
    /// No other `Arena` may exist meanwhile, and nothing else may use `ram`
    /// (it is RAM left free after boot).
    pub unsafe fn new(ram: Option<FreeRam>) -> Result<Arena, String> {
        let ram = ram.ok_or_else(|| String::from("no free ram for buffers"))?;
        Ok(Arena {
            next: Cell::new(ram.start),
            end: ram.end,
        })
    }

    /// A zero-filled buffer of `len` bytes.
    #[allow(clippy::mut_from_ref)] // each call returns a range no other call returns
    pub fn take(&self, len: usize) -> Result<&mut [u8], String> {
        let start = self.next.get();
        let end = start
            .checked_add(len as u64)
            .map(|e| e.next_multiple_of(4096))
            .filter(|&e| e <= self.end)
            .ok_or_else(|| format!("no room for a {}-byte buffer", len))?;
        self.next.set(end);
        // SAFETY: [start, start + len) is identity-mapped RAM (below 3 GiB,
        // user, write-back) inside `FreeRam`, which `new`'s caller guarantees
        // nothing else uses; `next` only moves up, so no other call returns
        // any of it while the arena (which the slice borrows) lives.
        let buf = unsafe { core::slice::from_raw_parts_mut(start as *mut u8, len) };
        buf.fill(0);
        Ok(buf)
    }

    /// `n` buffers of `len` bytes.
    pub fn take_many(&self, n: usize, len: usize) -> Result<Vec<&mut [u8]>, String> {
        Ok(self.take(n * len)?.chunks_exact_mut(len).collect())
    }
}
