//! The I/O engines behind one trait: [`SyncEngine`] (`preadv`/`pwritev` on the event
//! thread) and [`IoUringEngine`] (many requests in flight, batched submission, completions
//! through an eventfd).
//!
//! Engines take requests in guest addresses ([`BlockOp`]) and resolve them against the
//! guest memory they were [attached](BlockEngine::attach) to, straight into iovecs that
//! point at the guest's buffers: no bounce copies, and no way for a caller to hand an
//! engine a host pointer.

mod sync;
mod uring;

use std::fmt;
use std::io;
use std::sync::Arc;

use vm_memory::{GuestMemory, GuestMemoryMmap, Permissions};
use vmkit_virtio::MappedMemory;
use vmm_sys_util::eventfd::EventFd;

use crate::disk::Disk;
use crate::request::Segment;

pub use sync::SyncEngine;
pub use uring::{IoUringEngine, MAX_IN_FLIGHT};

/// Linux's `UIO_MAXIOV`: at most this many iovecs per `preadv`/`pwritev`/`IORING_OP_READV`.
pub(crate) const IOV_MAX: usize = 1024;

/// One operation on the disk, in guest addresses and byte offsets (already checked against
/// the capacity and guest memory by the request parser).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockOp {
    /// Read at `offset` into the guest buffers `data`.
    Read {
        /// Byte offset in the image.
        offset: u64,
        /// Guest buffers, in order.
        data: Vec<Segment>,
    },
    /// Write the guest buffers `data` at `offset`; with `sync`, `fdatasync` before the
    /// write counts as done (write-through, when the driver did not negotiate FLUSH).
    Write {
        /// Byte offset in the image.
        offset: u64,
        /// Guest buffers, in order.
        data: Vec<Segment>,
        /// Make it durable before completing.
        sync: bool,
    },
    /// `fdatasync`.
    Flush,
    /// Punch holes: `(offset, length)` in bytes.
    Discard {
        /// The ranges.
        ranges: Vec<(u64, u64)>,
    },
    /// Make ranges read as zeros.
    WriteZeroes {
        /// The ranges, `(offset, length, unmap)`: bytes, and whether the driver allows
        /// deallocating the range.
        ranges: Vec<(u64, u64, bool)>,
        /// Make it durable before completing (write-through).
        sync: bool,
    },
}

/// A finished operation: the token it was submitted with and how it went.
#[derive(Debug)]
pub struct Completion {
    /// The caller's token.
    pub token: u64,
    /// The outcome.
    pub result: io::Result<()>,
}

/// A disk backend. The device calls, from its (single) event thread:
/// [`attach`](Self::attach) at activation, [`submit`](Self::submit) for each request of a
/// queue kick and [`commit`](Self::commit) once after them, [`reap`](Self::reap) when the
/// [`completion_fd`](Self::completion_fd) fires, and [`detach`](Self::detach) at reset.
pub trait BlockEngine<M: MappedMemory = GuestMemoryMmap>: Send + fmt::Debug {
    /// Starts serving requests on this guest memory (a clone is kept while attached).
    fn attach(&mut self, memory: M);

    /// Lets go of the guest memory for new operations (the driver reset the device), and
    /// returns at once: every operation in flight is orphaned — cancelled where the engine
    /// can — and its completion, when [`reap`](Self::reap) meets it, is dropped, never
    /// reported. Until then the kernel may still write into the buffers of an orphaned
    /// read: the engine keeps its clone of the memory mapped until the last orphan is
    /// reaped ([`cancelling`](Self::cancelling) is then 0). Orphans count as
    /// [in flight](Self::in_flight).
    fn detach(&mut self);

    /// Orphans of [`detach`](Self::detach) (and cancellations) not reaped yet. A device
    /// must not let a driver that re-activated it reuse buffers while this is not 0: an
    /// orphaned read could still land in them. Default: 0, right only for engines that
    /// complete every operation in [`submit`](Self::submit): an asynchronous engine (one
    /// whose operations can still be at the kernel after [`detach`](Self::detach)) must
    /// override it, or a re-activated device could hand out buffers an orphaned read is
    /// about to fill.
    fn cancelling(&self) -> usize {
        0
    }

    /// Whether another operation can be submitted now (an engine bounds what it has in
    /// flight; the device stops taking requests from the rings until completions free room).
    fn can_submit(&self) -> bool;

    /// Starts `op`. `Some(result)` when it finished already (always, for the synchronous
    /// engine), `None` when it is in flight and [`reap`](Self::reap) will return it with
    /// `token`.
    fn submit(&mut self, op: BlockOp, token: u64) -> Option<io::Result<()>>;

    /// Hands what [`submit`](Self::submit) queued to the kernel (one system call for a
    /// whole queue kick).
    fn commit(&mut self) -> io::Result<()>;

    /// Moves finished operations into `out`, without blocking.
    fn reap(&mut self, out: &mut Vec<Completion>);

    /// Operations in flight.
    fn in_flight(&self) -> usize;

    /// An eventfd that becomes readable when completions are ready (`None` for engines
    /// that complete in [`submit`](Self::submit)).
    fn completion_fd(&self) -> Option<&EventFd>;

    /// Serves every later operation from `disk` instead of the current image (which is
    /// let go of). Refused with `EBUSY`, nothing changed, while anything is
    /// [in flight](Self::in_flight): an operation in flight belongs to the file it was
    /// started on, so the caller reaps everything first. The completion eventfd and the
    /// attached memory stay as they are.
    fn replace_disk(&mut self, disk: Arc<Disk>) -> io::Result<()>;
}

/// What an engine reports as each step of an operation finishes, on the thread that sees it
/// (the one that submits for [`SyncEngine`], the one that reaps for [`IoUringEngine`]), before
/// the operation is handed back as done. A seam for tracing, and what the durability tests
/// stand on: they record these steps with the used ring's index at that moment, so a FLUSH
/// (or a write-through write) that reaches the used ring before its sync returned, or with
/// no sync at all, is seen. The default methods do nothing ([`NoObserver`]).
pub trait IoObserver: Send + Sync + fmt::Debug {
    /// The data of operation `token` moved (all of it: a write reached the file, a read
    /// filled guest memory).
    fn transferred(&self, token: u64) {
        let _ = token;
    }

    /// The `fdatasync` of operation `token` (a FLUSH, or the write-through sync after a
    /// write) returned `result`.
    fn synced(&self, token: u64, result: &io::Result<()>) {
        let _ = (token, result);
    }
}

/// The [`IoObserver`] that observes nothing (the default).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl IoObserver for NoObserver {}

pub(crate) use vmkit_virtio::IoVecs;

/// The iovecs of `segments` in `memory`, for the kernel to read (`access` Read) or write
/// (Write). Each segment must be inside guest memory (the parser checked it; a segment that
/// is not yields `EFAULT`).
///
/// The pointers stay valid as long as `memory` (or any clone of it) lives, which
/// [`MappedMemory`] guarantees. Engines keep their clone until nothing is in flight.
pub(crate) fn resolve<M: MappedMemory>(
    memory: &M,
    segments: &[Segment],
    access: Permissions,
) -> io::Result<IoVecs> {
    let mut iov = IoVecs::new();
    for s in segments {
        iov.push(memory, s.addr, s.len as usize, access)?;
    }
    Ok(iov)
}

/// Marks the guest pages of `segments` dirty in `memory`'s bitmap (if it keeps one): for
/// what the kernel wrote into guest memory through iovecs, which vm-memory cannot see.
/// Called once the write is done, so a dirty-page scan never misses it.
pub(crate) fn mark_dirty<M: GuestMemory>(memory: &M, segments: &[Segment]) {
    for s in segments {
        vmkit_virtio::mark_dirty(memory, s.addr, s.len as usize);
    }
}

#[cfg(test)]
mod tests;
