//! The guest memory types the virtio stack works on.

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, GuestMemoryMmap};

/// The guest memory types the virtio stack works on: any vm-memory [`GuestMemory`] that is a
/// cheap handle (`Clone`) shared between threads — `GuestMemoryMmap`, with or without a
/// dirty-page bitmap, and others.
pub trait VirtioMemory: GuestMemory + Clone + Send + Sync + 'static {}

impl<T: GuestMemory + Clone + Send + Sync + 'static> VirtioMemory for T {}

/// Guest memory mapped in this process for as long as any clone of the handle lives, so a
/// device may give the kernel raw pointers into it (`preadv`, io_uring) while it keeps a
/// clone, and the kernel may write there after the call that took them returned.
///
/// # Safety
///
/// An implementor guarantees that every host address it hands out (through
/// [`GuestMemory::get_slices`] and the like) stays mapped, to the same guest memory, until
/// the last clone of the value it came from is dropped: vm-memory's `GuestMemoryMmap` holds
/// each region in an `Arc` and unmaps it when the last one goes.
pub unsafe trait MappedMemory: VirtioMemory {}

// SAFETY: a `GuestMemoryMmap` (`GuestRegionCollection<GuestRegionMmap<B>>`) keeps each region
// as an `Arc<GuestRegionMmap<B>>`, cloned with the collection, and a region unmaps its mapping
// only in its `Drop`: a pointer into it is valid while any clone of the collection lives.
unsafe impl<B: Bitmap + Send + Sync + 'static> MappedMemory for GuestMemoryMmap<B> {}
