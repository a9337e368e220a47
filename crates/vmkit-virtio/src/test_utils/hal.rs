//! virtio-drivers' `Hal` over guest memory.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// What the HAL allocates from: a page range of guest memory.
struct HalState {
    memory: GuestMemoryMmap,
    /// Host address of guest address 0 of the DMA window's region, and the window.
    base: u64,
    pages: usize,
    used: Vec<bool>,
    /// Bounce buffers handed out by `share`: guest address → pages.
    bounces: BTreeMap<u64, usize>,
    /// Stand-ins for MMIO mappings (see `mmio_phys_to_virt`), freed with the state.
    scratch: Vec<Box<[u64]>>,
}

thread_local! {
    static STATE: RefCell<Option<HalState>> = const { RefCell::new(None) };
}

impl HalState {
    fn alloc(&mut self, pages: usize) -> Option<u64> {
        if pages == 0 {
            return None;
        }
        let mut run = 0;
        for i in 0..self.used.len() {
            run = if self.used[i] { 0 } else { run + 1 };
            if run == pages {
                let first = i + 1 - pages;
                self.used[first..=i].fill(true);
                return Some(self.base + (first * PAGE_SIZE) as u64);
            }
        }
        None
    }

    fn free(&mut self, paddr: u64, pages: usize) {
        let Some(first) = paddr.checked_sub(self.base).map(|o| o as usize / PAGE_SIZE) else {
            return;
        };
        if let Some(range) = self.used.get_mut(first..first.saturating_add(pages)) {
            range.fill(false);
        }
    }

    fn host(&self, paddr: u64) -> Option<NonNull<u8>> {
        let ptr = self.memory.get_host_address(GuestAddress(paddr)).ok()?;
        NonNull::new(ptr)
    }

    /// The guest address of host memory, if `[ptr, ptr + len)` lies inside guest memory.
    fn guest_of(&self, ptr: *const u8, len: usize) -> Option<u64> {
        use vm_memory::GuestMemoryRegion;
        let ptr = ptr as usize;
        for region in self.memory.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .ok()? as usize;
            let size = usize::try_from(region.len()).ok()?;
            if ptr >= host && ptr.checked_add(len)? <= host + size {
                return Some(region.start_addr().0 + (ptr - host) as u64);
            }
        }
        None
    }
}

/// virtio-drivers' [`Hal`] over the guest memory of the current thread's [`Harness`]:
/// `dma_alloc` hands out pages of guest memory (physical address = guest address, virtual
/// address = where the VMM maps it), `share` translates a buffer that already lies in
/// guest memory and otherwise bounces it through guest pages (copied in before the device
/// sees it, copied back by `unshare`), since the driver's own buffers live on the test's
/// heap or stack, which the device cannot reach.
///
/// The state is thread-local: one harness per test thread, and the driver must run on the
/// thread that created it.
///
/// [`Harness`]: crate::test_utils::Harness
#[derive(Debug)]
pub struct GuestHal;

impl GuestHal {
    /// Makes `[base, base + pages * 4 KiB)` of `memory` the DMA window of this thread.
    pub(crate) fn install(memory: GuestMemoryMmap, base: u64, pages: usize) {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            assert!(s.is_none(), "one virtio-drivers harness per thread");
            *s = Some(HalState {
                memory,
                base,
                pages,
                used: vec![false; pages],
                bounces: BTreeMap::new(),
                scratch: Vec::new(),
            });
        });
    }

    /// Removes this thread's DMA window.
    pub(crate) fn uninstall() {
        STATE.with(|s| s.borrow_mut().take());
    }

    /// Pages of the DMA window in use (allocations and bounce buffers).
    pub fn pages_in_use() -> usize {
        STATE.with(|s| {
            s.borrow()
                .as_ref()
                .map_or(0, |s| s.used.iter().filter(|u| **u).count().min(s.pages))
        })
    }
}

// SAFETY: `dma_alloc` returns zeroed pages of guest memory that no other allocation
// overlaps (the page map marks them used until `dma_dealloc`), with the host address the
// guest memory mapping gives for them, valid while the harness (which owns a clone of the
// mapping) lives; `share` returns a guest address whose memory holds the buffer's content
// (the buffer itself, or a bounce copy) for the device to access until `unshare`;
// `mmio_phys_to_virt` returns heap memory of at least `size` bytes that lives as long as
// the harness.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            let Some(state) = s.as_mut() else {
                return (0, NonNull::dangling());
            };
            let Some(paddr) = state.alloc(pages) else {
                return (0, NonNull::dangling());
            };
            let zeros = vec![0u8; pages * PAGE_SIZE];
            if state
                .memory
                .write_slice(&zeros, GuestAddress(paddr))
                .is_err()
            {
                return (0, NonNull::dangling());
            }
            match state.host(paddr) {
                Some(v) => (paddr, v),
                None => (0, NonNull::dangling()),
            }
        })
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        STATE.with(|s| {
            if let Some(state) = s.borrow_mut().as_mut() {
                state.free(paddr, pages);
            }
        });
        0
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // The harness transports do not map MMIO: they call the transport's handlers. A
        // driver that maps registers anyway (virtio-drivers' `PciTransport::new`, which the
        // PCI harness runs to check our capabilities parse) gets zeroed scratch memory,
        // 8-byte aligned and valid while the harness lives, that no device sees.
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            let Some(state) = s.as_mut() else {
                return NonNull::dangling();
            };
            let mut buf = vec![0u64; size.div_ceil(8).max(1)].into_boxed_slice();
            let ptr = NonNull::from(&mut buf[0]).cast::<u8>();
            state.scratch.push(buf);
            ptr
        })
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            let Some(state) = s.as_mut() else {
                return 0;
            };
            let len = buffer.len();
            let ptr = buffer.cast::<u8>().as_ptr();
            if let Some(paddr) = state.guest_of(ptr, len) {
                return paddr;
            }
            let pages = len.div_ceil(PAGE_SIZE).max(1);
            let Some(paddr) = state.alloc(pages) else {
                return 0;
            };
            state.bounces.insert(paddr, pages);
            if direction != BufferDirection::DeviceToDriver {
                // SAFETY: virtio-drivers passes a buffer valid for reads of `len` bytes
                // (the `share` contract), not mutated while shared.
                let src = unsafe { std::slice::from_raw_parts(ptr, len) };
                let _ = state.memory.write_slice(src, GuestAddress(paddr));
            }
            paddr
        })
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            let Some(state) = s.as_mut() else {
                return;
            };
            let Some(pages) = state.bounces.remove(&paddr) else {
                // Shared in place: nothing to copy.
                return;
            };
            if direction != BufferDirection::DriverToDevice {
                let len = buffer.len();
                // SAFETY: the buffer passed to `share` is valid for writes of `len` bytes
                // again now that the device is done with it (the `unshare` contract).
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(buffer.cast::<u8>().as_ptr(), len) };
                let _ = state.memory.read_slice(dst, GuestAddress(paddr));
            }
            state.free(paddr, pages);
        });
    }
}
