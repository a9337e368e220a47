//! virtio-drivers' `Hal` for this machine: physical = virtual (the identity
//! mapping), DMA memory from the heap, nothing to share or bounce.

use core::alloc::Layout;
use core::ptr::NonNull;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// The DMA HAL every virtio-drivers queue and driver here runs on.
pub struct GuestHal;

fn dma_layout(pages: usize) -> Option<Layout> {
    Layout::from_size_align(pages.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()
}

// SAFETY: `dma_alloc` returns zeroed, page-aligned heap memory that nothing
// else uses until `dma_dealloc` gives it back (or paddr 0, which virtio-drivers
// treats as failure); addresses are identity-mapped, so the physical address
// the device sees is the pointer itself; MMIO windows are identity-mapped too.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let ptr = match dma_layout(pages) {
            // SAFETY: the layout has a non-zero size (checked by the guard);
            // a zero-page request falls through to the null pointer below.
            Some(layout) if layout.size() != 0 => unsafe { alloc::alloc::alloc_zeroed(layout) },
            _ => core::ptr::null_mut(),
        };
        match NonNull::new(ptr) {
            Some(p) => (ptr as PhysAddr, p),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        match dma_layout(pages) {
            Some(layout) => {
                // SAFETY: the caller passes what `dma_alloc` returned for
                // `pages`, allocated with this same layout.
                unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
                0
            }
            None => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
