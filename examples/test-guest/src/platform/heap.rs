//! The heap `alloc` needs (virtio-drivers allocates its queues, DMA pages
//! and console buffer through it): a bump allocator over a static region of
//! the image's .bss, so it is identity-mapped, user-accessible and owned by
//! nothing else. Set up at build time, nothing to do at boot.
//!
//! Freeing the most recent allocation moves the bump pointer back, and the
//! whole heap is reclaimed once nothing is live, which covers how the
//! drivers use it (set up, request, tear down, set up again). Blocks up to
//! 1 MiB come in power-of-two size classes with a free list each:
//! virtio-drivers allocates an indirect descriptor list per request and
//! frees it when the request completes, in completion order, so with many
//! requests in flight (virtio-blk) a pure bump heap would never get them
//! back; and its vsock driver allocates a receive buffer per queue entry and
//! a ring per connection, freed in no particular order when connections
//! close and the driver is dropped.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Heap size: the virtio tests use a few pages per queue, the vsock test up
/// to about 1.5 MiB (64 KiB receive buffers, per-connection rings). Pages
/// never allocated are never touched.
pub const HEAP_SIZE: usize = 4 << 20;

#[repr(C, align(4096))]
struct Region(UnsafeCell<[u8; HEAP_SIZE]>);

// SAFETY: the bytes are only handed out through `Bump`, which gives each
// allocation a disjoint range.
unsafe impl Sync for Region {}

static REGION: Region = Region(UnsafeCell::new([0; HEAP_SIZE]));

/// Size classes: 16 << i bytes for i < CLASSES (16 B to 1 MiB).
const CLASSES: usize = 17;
/// Largest alignment of a size-class block (larger blocks are page-aligned).
const CLASS_ALIGN_MAX: usize = 4096;

/// The global allocator. Only the BSP runs Rust code (the APs halt at CPL0),
/// so the atomics are for soundness, not for contention.
pub struct Bump {
    /// Offset of the first free byte.
    next: AtomicUsize,
    /// Live allocations.
    live: AtomicUsize,
    /// Per size class, the address of the first free block (0: none); each
    /// free block holds the address of the next.
    free: [AtomicUsize; CLASSES],
}

#[global_allocator]
static HEAP: Bump = Bump {
    next: AtomicUsize::new(0),
    live: AtomicUsize::new(0),
    free: [const { AtomicUsize::new(0) }; CLASSES],
};

/// The size class of `layout` (block size `16 << class`, aligned to its
/// size up to `CLASS_ALIGN_MAX`), if it is small enough for one and asks for
/// no more alignment than a block has.
fn class(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(16);
    (size <= 16 << (CLASSES - 1) && layout.align() <= CLASS_ALIGN_MAX)
        .then(|| (size.next_power_of_two() / 16).trailing_zeros() as usize)
}

/// Size and alignment of a block of class `c`.
fn block(c: usize) -> (usize, usize) {
    let size = 16 << c;
    (size, size.min(CLASS_ALIGN_MAX))
}

fn base() -> usize {
    REGION.0.get() as usize
}

impl Bump {
    /// Bump allocation of `size` bytes aligned to `align`.
    fn bump(&self, size: usize, align: usize) -> *mut u8 {
        let mut next = self.next.load(Ordering::Relaxed);
        loop {
            let start = (base() + next).next_multiple_of(align) - base();
            let Some(end) = start.checked_add(size).filter(|&e| e <= HEAP_SIZE) else {
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
}

// SAFETY: `alloc` returns disjoint, suitably aligned ranges inside REGION
// (or null when it is exhausted): a size-class block is either fresh from the
// bump pointer (aligned to its size, at most a page, which `class` checked
// covers the request's alignment) or one that `dealloc` put on its free
// list, i.e. no longer live. `dealloc` only moves the bump pointer back over
// the range being freed when it is the last one handed out, or to zero (all
// free lists emptied) when nothing is live, so no live allocation is ever
// handed out again.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(c) = class(layout) else {
            return self.bump(layout.size(), layout.align());
        };
        let head = self.free[c].load(Ordering::Relaxed);
        if head != 0 {
            // SAFETY: a free block of this class (at least 16 bytes, aligned
            // to at least 16) whose first word `dealloc` wrote.
            let next = unsafe { (head as *const usize).read() };
            self.free[c].store(next, Ordering::Relaxed);
            self.live.fetch_add(1, Ordering::Relaxed);
            return head as *mut u8;
        }
        let (size, align) = block(c);
        self.bump(size, align)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(c) = class(layout) {
            // SAFETY: the block (16 << c bytes, aligned to at least 16) is
            // ours again; its first word links it into the free list.
            unsafe { (ptr as *mut usize).write(self.free[c].load(Ordering::Relaxed)) };
            self.free[c].store(ptr as usize, Ordering::Relaxed);
            if self.live.fetch_sub(1, Ordering::Relaxed) == 1 {
                self.reset();
            }
            return;
        }
        let start = ptr as usize - base();
        // The last allocation: give its bytes back (alignment padding stays).
        let _ = self.next.compare_exchange(
            start + layout.size(),
            start,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        if self.live.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.reset();
        }
    }
}

impl Bump {
    /// Nothing is live: start over (only the BSP allocates).
    fn reset(&self) {
        for f in &self.free {
            f.store(0, Ordering::Relaxed);
        }
        self.next.store(0, Ordering::Relaxed);
    }
}
