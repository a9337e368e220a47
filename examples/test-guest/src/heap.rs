//! The heap `alloc` needs (virtio-drivers allocates its queues, DMA pages
//! and console buffer through it): a bump allocator over a static region of
//! the image's .bss, so it is identity-mapped, user-accessible and owned by
//! nothing else. Set up at build time, nothing to do at boot.
//!
//! Freeing the most recent allocation moves the bump pointer back, and the
//! whole heap is reclaimed once nothing is live, which covers how the
//! drivers use it (set up, request, tear down, set up again).

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Heap size: far more than the virtio tests use (a few pages per queue).
pub const HEAP_SIZE: usize = 512 * 1024;

#[repr(C, align(4096))]
struct Region(UnsafeCell<[u8; HEAP_SIZE]>);

// SAFETY: the bytes are only handed out through `Bump`, which gives each
// allocation a disjoint range.
unsafe impl Sync for Region {}

static REGION: Region = Region(UnsafeCell::new([0; HEAP_SIZE]));

/// The global allocator. Only the BSP runs Rust code (the APs halt at CPL0),
/// so the atomics are for soundness, not for contention.
pub struct Bump {
    /// Offset of the first free byte.
    next: AtomicUsize,
    /// Live allocations.
    live: AtomicUsize,
}

#[global_allocator]
static HEAP: Bump = Bump {
    next: AtomicUsize::new(0),
    live: AtomicUsize::new(0),
};

fn base() -> usize {
    REGION.0.get() as usize
}

// SAFETY: `alloc` returns disjoint, suitably aligned ranges inside REGION
// (or null when it is exhausted); `dealloc` only moves the bump pointer back
// over the range being freed when it is the last one handed out, or to zero
// when nothing is live, so no live allocation is ever handed out again.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut next = self.next.load(Ordering::Relaxed);
        loop {
            let start = (base() + next).next_multiple_of(layout.align()) - base();
            let Some(end) = start.checked_add(layout.size()).filter(|&e| e <= HEAP_SIZE) else {
                return core::ptr::null_mut();
            };
            match self
                .next
                .compare_exchange(next, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.live.fetch_add(1, Ordering::Relaxed);
                    return (base() + start) as *mut u8;
                }
                Err(now) => next = now,
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let start = ptr as usize - base();
        // The last allocation: give its bytes back (alignment padding stays).
        let _ = self.next.compare_exchange(
            start + layout.size(),
            start,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        if self.live.fetch_sub(1, Ordering::Relaxed) == 1 {
            // Nothing is live: start over (only the BSP allocates).
            self.next.store(0, Ordering::Relaxed);
        }
    }
}
