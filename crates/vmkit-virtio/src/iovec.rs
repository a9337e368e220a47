//! Guest buffers as `iovec`s, for devices that hand them to the kernel (`readv`, `writev`,
//! `preadv`, io_uring) instead of copying through vm-memory.

use std::io;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use crate::memory::MappedMemory;

/// A list of iovecs pointing into guest memory, reused from one I/O to the next.
///
/// `libc::iovec` holds raw pointers and so is neither `Send` nor `Sync`; these point into
/// guest memory, which is shared between threads anyway ([`MappedMemory`] is `Send` and
/// `Sync`), and are only dereferenced by the kernel. They stay valid as long as the memory
/// handle they were resolved from (or any clone of it) lives, which [`MappedMemory`]
/// guarantees: keep a clone until the kernel is done with them.
#[derive(Debug, Default)]
pub struct IoVecs(Vec<libc::iovec>);

// SAFETY: see the type's documentation: the pointers are plain addresses into the guest's
// shared mapping; moving the list to another thread does not create aliasing Rust
// references, and only the kernel reads or writes through them.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the iovecs of the guest buffer `addr`+`len` in `memory`, for the kernel to
    /// read (`access` [`Permissions::Read`]) or write ([`Permissions::Write`]). A buffer
    /// crossing from one guest memory region into the next becomes several iovecs.
    ///
    /// # Errors
    ///
    /// `EFAULT` when the buffer is not (all) inside guest memory with that access; the list
    /// may then hold part of the buffer.
    pub fn push<M: MappedMemory>(
        &mut self,
        memory: &M,
        addr: GuestAddress,
        len: usize,
        access: Permissions,
    ) -> io::Result<()> {
        let efault = || io::Error::from_raw_os_error(libc::EFAULT);
        if len == 0 {
            return Ok(());
        }
        let slices = GuestMemory::get_slices(memory, addr, len, access).map_err(|_| efault())?;
        for slice in slices {
            let slice = slice.map_err(|_| efault())?;
            self.0.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
        Ok(())
    }

    /// Appends an iovec over host memory the caller owns (a header it built, say). The
    /// caller keeps `buf` alive and unmoved until the kernel is done with the list.
    pub fn push_host(&mut self, buf: &mut [u8]) {
        self.0.push(libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        });
    }

    /// Empties the list, keeping its allocation.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// The iovecs, for `readv`/`writev`/io_uring.
    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.0
    }

    /// How many iovecs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(address, length)` of each iovec (for alignment checks).
    pub fn shapes(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.0.iter().map(|v| (v.iov_base as usize, v.iov_len))
    }

    /// The total length.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|v| v.iov_len as u64).sum()
    }

    /// Drops the first `n` bytes after a partial transfer: consumed iovecs are skipped
    /// (`start` moves), the first remaining one is shortened in place.
    pub fn advance(&mut self, start: &mut usize, mut n: usize) {
        while n > 0 && *start < self.0.len() {
            let v = &mut self.0[*start];
            if n >= v.iov_len {
                n -= v.iov_len;
                *start += 1;
            } else {
                // Still inside the same buffer.
                v.iov_base = (v.iov_base as usize + n) as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
        // Skip empty iovecs so a transfer never starts with nothing to move.
        while *start < self.0.len() && self.0[*start].iov_len == 0 {
            *start += 1;
        }
    }
}

/// Marks the guest pages of `addr`+`len` dirty in `memory`'s bitmap (if it keeps one): for
/// what the kernel wrote into guest memory through iovecs, which vm-memory cannot see. Call
/// it once the write is done, so a dirty-page scan never misses it.
pub fn mark_dirty<M: GuestMemory>(memory: &M, addr: GuestAddress, len: usize) {
    let Ok(slices) = memory.get_slices(addr, len, Permissions::Write) else {
        return;
    };
    for slice in slices.flatten() {
        slice.bitmap().mark_dirty(0, slice.len());
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    #[test]
    fn buffers_across_regions_split_and_outside_ones_fail() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let mut iov = IoVecs::new();
        iov.push(&mem, GuestAddress(0xf00), 0x200, Permissions::Write)
            .unwrap();
        assert_eq!(iov.len(), 2);
        assert_eq!(iov.total(), 0x200);
        iov.push(&mem, GuestAddress(0), 0, Permissions::Read)
            .unwrap();
        assert_eq!(iov.len(), 2, "empty buffers add nothing");
        let err = iov
            .push(&mem, GuestAddress(0x1f00), 0x200, Permissions::Read)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
        iov.clear();
        assert!(iov.is_empty());
    }

    #[test]
    fn advance_skips_and_shortens() {
        let mut a = [0u8; 4];
        let mut b = [0u8; 0];
        let mut c = [0u8; 8];
        let mut iov = IoVecs::new();
        iov.push_host(&mut a);
        iov.push_host(&mut b);
        iov.push_host(&mut c);
        let mut start = 0;
        iov.advance(&mut start, 6);
        assert_eq!(start, 2);
        assert_eq!(iov.as_slice()[2].iov_len, 6);
        iov.advance(&mut start, 6);
        assert_eq!(start, 3);
    }
}
