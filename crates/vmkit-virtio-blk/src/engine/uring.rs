//! The io_uring engine: reads, writes and flushes in flight together, one `io_uring_enter`
//! per queue kick, completions signalled on an eventfd registered with the ring.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::register::Restriction;
use io_uring::{opcode, types, IoUring};
use vm_memory::{GuestMemoryMmap, Permissions};
use vmkit_virtio::MappedMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::{resolve, BlockEngine, BlockOp, Completion, IoObserver, IoVecs, NoObserver, IOV_MAX};
use crate::disk::Disk;

/// The most operations one engine keeps in flight (and its submission queue size).
pub const MAX_IN_FLIGHT: u32 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Reading or writing the data (resubmitted until all of it moved).
    Transfer,
    /// `fdatasync` (a FLUSH, or the write-through sync after a write).
    Sync,
}

/// The `user_data` bit of our `IORING_OP_ASYNC_CANCEL` entries (an operation's is its slot).
const CANCEL: u64 = 1 << 63;

#[derive(Debug)]
struct InFlight {
    token: u64,
    /// Started before a [`detach`](BlockEngine::detach): its completion is dropped.
    orphan: bool,
    write: bool,
    sync_after: bool,
    stage: Stage,
    fd: RawFd,
    offset: u64,
    iov: IoVecs,
    start: usize,
}

/// io_uring: `IORING_OP_READV`/`WRITEV` straight into guest memory and
/// `IORING_OP_FSYNC(DATASYNC)`, many in flight, no thread of ours per request (the kernel
/// completes page-cache hits inline and punts the rest to its own workers). DISCARD and
/// WRITE_ZEROES are rare and run synchronously (`fallocate`) in `submit`.
///
/// Every completion raises [`completion_fd`](BlockEngine::completion_fd) (registered with
/// `IORING_REGISTER_EVENTFD`). `IORING_REGISTER_EVENTFD_ASYNC`, which skips completions
/// posted inline at submission, lost wake-ups in our engine tests (a completion arrived
/// after `commit` without a signal, Linux 6.18), so we pay one spurious wake-up for inline
/// completions (which the device reaps right after `commit` anyway).
pub struct IoUringEngine<M: MappedMemory = GuestMemoryMmap> {
    // Declared first so it is dropped first, after `Drop` waited for everything in flight.
    ring: IoUring,
    disk: Arc<Disk>,
    eventfd: EventFd,
    memory: Option<M>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    capacity: usize,
    /// Entries pushed to the submission queue and not yet handed to the kernel.
    unsubmitted: usize,
    observer: Arc<dyn IoObserver>,
    /// Operations in flight that a detach orphaned (counted in `in_flight` too).
    orphans: usize,
    /// `IORING_OP_ASYNC_CANCEL` entries whose completion has not been reaped.
    cancels: usize,
    /// The memory orphans were started on, kept mapped until the last of them is reaped.
    retired: Vec<M>,
}

impl<M: MappedMemory> std::fmt::Debug for IoUringEngine<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoUringEngine")
            .field("capacity", &self.capacity)
            .field("in_flight", &self.in_flight)
            .field("attached", &self.memory.is_some())
            .finish_non_exhaustive()
    }
}

/// The only operations an engine's ring accepts (`IORING_RESTRICTION_SQE_OP`): the
/// transfers, the sync, and the cancellation of a reset's orphans. Anything else submitted
/// to it completes with `-EACCES`.
const ALLOWED_OPS: [u8; 4] = [
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::AsyncCancel::CODE,
];

impl<M: MappedMemory> IoUringEngine<M> {
    /// An engine on `disk` keeping up to `max_in_flight` operations in flight (rounded up
    /// to a power of two, at most [`MAX_IN_FLIGHT`]).
    pub fn new(disk: Arc<Disk>, max_in_flight: u32) -> io::Result<Self> {
        let entries = max_in_flight.clamp(8, MAX_IN_FLIGHT).next_power_of_two();
        // Disabled until restricted: the ring can then carry only the operations this
        // engine submits, and no further registration, whatever else is written into its
        // (process-visible) submission queue. Seccomp never sees io_uring's operations, so
        // without this a thread allowed `io_uring_enter` could open files or sockets
        // through the ring (Firecracker restricts its rings the same way).
        let ring = IoUring::builder()
            .dontfork()
            .setup_r_disabled()
            .build(entries)?;
        let eventfd = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        let submitter = ring.submitter();
        submitter.register_eventfd(eventfd.as_raw_fd())?;
        submitter.register_restrictions(&mut ALLOWED_OPS.map(Restriction::sqe_op))?;
        submitter.register_enable_rings()?;
        let capacity = ring.params().sq_entries() as usize;
        Ok(Self {
            ring,
            disk,
            eventfd,
            memory: None,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            capacity,
            unsubmitted: 0,
            observer: Arc::new(NoObserver),
            orphans: 0,
            cancels: 0,
            retired: Vec::new(),
        })
    }

    /// Reports each step to `observer` (see [`IoObserver`]): the transfer when its last
    /// completion is reaped, the sync when the `IORING_OP_FSYNC` completion is.
    pub fn with_observer(mut self, observer: Arc<dyn IoObserver>) -> Self {
        self.observer = observer;
        self
    }

    fn alloc(&mut self, f: InFlight) -> usize {
        self.in_flight += 1;
        if let Some(i) = self.free.pop() {
            self.slots[i] = Some(f);
            i
        } else {
            self.slots.push(Some(f));
            self.slots.len() - 1
        }
    }

    fn release(&mut self, slot: usize) -> Option<InFlight> {
        let f = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        self.in_flight -= 1;
        Some(f)
    }

    /// Pushes the next submission of `slot` (its current stage).
    fn push(&mut self, slot: usize) -> io::Result<()> {
        let Some(f) = self.slots.get(slot).and_then(Option::as_ref) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let fd = types::Fd(f.fd);
        let entry = match f.stage {
            Stage::Sync => opcode::Fsync::new(types::Fd(self.disk.fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Stage::Transfer => {
                let rest = &f.iov.as_slice()[f.start..];
                let n = rest.len().min(IOV_MAX) as u32;
                if f.write {
                    opcode::Writev::new(fd, rest.as_ptr(), n)
                        .offset(f.offset)
                        .build()
                } else {
                    opcode::Readv::new(fd, rest.as_ptr(), n)
                        .offset(f.offset)
                        .build()
                }
            }
        }
        .user_data(slot as u64);
        for _ in 0..2 {
            // SAFETY: the entry's buffers (the iovec array and the guest memory it points
            // to) live in `self.slots[slot]` and in `self.memory` until the completion of
            // this entry is reaped: a slot is released only in `complete`, `detach` moves
            // the memory clone to `retired` while orphans are in flight (dropped only when
            // the last one is reaped), and `Drop` waits for every entry in flight before
            // anything is freed. The guest memory stays mapped while a clone of it is held,
            // which is what `M: MappedMemory` guarantees.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            // Full: hand what is queued to the kernel and try again.
            self.commit()?;
        }
        Err(io::Error::from_raw_os_error(libc::EBUSY))
    }

    /// Handles one CQE; returns a completion when the operation is over.
    fn complete(&mut self, slot: usize, res: i32) -> Option<Completion> {
        let f = self.slots.get_mut(slot)?.as_mut()?;
        if f.orphan {
            // Whatever it did (done, short, cancelled), it is over for us: the kernel no
            // longer touches its buffers; nothing is resubmitted or reported.
            self.release(slot);
            self.orphans -= 1;
            if self.orphans == 0 {
                self.retired.clear();
            }
            return None;
        }
        let mut outcome: Option<io::Result<()>> = None;
        if res < 0 {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                // Resubmit the same stage.
            } else {
                if f.stage == Stage::Sync {
                    self.observer
                        .synced(f.token, &Err(io::Error::from_raw_os_error(-res)));
                }
                outcome = Some(Err(io::Error::from_raw_os_error(-res)));
            }
        } else {
            match f.stage {
                Stage::Sync => {
                    let r = Ok(());
                    self.observer.synced(f.token, &r);
                    outcome = Some(r);
                }
                Stage::Transfer if res == 0 => {
                    outcome = Some(Err(if f.write {
                        io::Error::from(io::ErrorKind::WriteZero)
                    } else {
                        io::Error::from(io::ErrorKind::UnexpectedEof)
                    }));
                }
                Stage::Transfer => {
                    let n = res as usize;
                    f.offset += n as u64;
                    let mut start = f.start;
                    f.iov.advance(&mut start, n);
                    f.start = start;
                    if f.start >= f.iov.len() {
                        self.observer.transferred(f.token);
                        if f.sync_after {
                            f.stage = Stage::Sync;
                        } else {
                            outcome = Some(Ok(()));
                        }
                    }
                }
            }
        }
        match outcome {
            Some(result) => {
                let f = self.release(slot)?;
                Some(Completion {
                    token: f.token,
                    result,
                })
            }
            None => match self.push(slot) {
                Ok(()) => None,
                Err(e) => {
                    let f = self.release(slot)?;
                    Some(Completion {
                        token: f.token,
                        result: Err(e),
                    })
                }
            },
        }
    }

    /// Moves every available CQE through [`complete`](Self::complete).
    fn drain_cq(&mut self, out: &mut Vec<Completion>) -> usize {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in &cqes {
            if slot & CANCEL != 0 {
                // A cancellation's own answer (done, not found, already running): the
                // operation it aimed at completes on its own CQE either way.
                self.cancels = self.cancels.saturating_sub(1);
                continue;
            }
            if let Some(c) = self.complete(*slot as usize, *res) {
                out.push(c);
            }
        }
        cqes.len()
    }

    /// Blocks until everything in flight is done; completions are dropped.
    fn wait_all(&mut self) {
        let mut dropped = Vec::new();
        while self.in_flight > 0 || self.cancels > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.unsubmitted = 0,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    // Cannot wait: the ring is unusable. Nothing can be done safely but to
                    // keep the memory (leak it) so the kernel never writes freed pages.
                    log::error!("virtio-blk: io_uring wait failed with I/O in flight: {e}");
                    std::mem::forget(self.memory.take());
                    std::mem::forget(std::mem::take(&mut self.retired));
                    for s in self.slots.iter_mut() {
                        std::mem::forget(s.take());
                    }
                    self.in_flight = 0;
                    self.orphans = 0;
                    self.cancels = 0;
                    return;
                }
            }
            self.drain_cq(&mut dropped);
            dropped.clear();
        }
    }
}

impl<M: MappedMemory> BlockEngine<M> for IoUringEngine<M> {
    fn attach(&mut self, memory: M) {
        // Orphans of an earlier detach keep their own memory clone (`retired`).
        self.memory = Some(memory);
    }

    fn detach(&mut self) {
        // Returns at once: what is in flight becomes orphaned, each with an
        // IORING_OP_ASYNC_CANCEL after it (a read still waiting for the disk ends early;
        // one the kernel already runs finishes). Their CQEs are reaped and dropped later,
        // and the memory stays mapped until the last of them.
        let mut cancels = Vec::new();
        for (i, f) in self.slots.iter_mut().enumerate() {
            if let Some(f) = f.as_mut().filter(|f| !f.orphan) {
                f.orphan = true;
                self.orphans += 1;
                cancels.push(i as u64);
            }
        }
        for slot in cancels {
            let entry = opcode::AsyncCancel::new(slot)
                .build()
                .user_data(slot | CANCEL);
            // SAFETY: a cancellation carries no buffer; it names the operation by its
            // user_data only.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.unsubmitted += 1;
                self.cancels += 1;
            }
            // A full queue: no cancellation for this one, which completes on its own.
        }
        if let Err(e) = self.commit() {
            log::warn!("virtio-blk: io_uring cancel: {e}");
        }
        if let Some(m) = self.memory.take() {
            if self.orphans > 0 {
                self.retired.push(m);
            }
        }
    }

    fn cancelling(&self) -> usize {
        self.orphans + self.cancels
    }

    fn can_submit(&self) -> bool {
        // While a cancellation is outstanding, its target's slot (its user_data) must not
        // be reused by a new operation it could hit.
        self.in_flight < self.capacity && self.cancels == 0
    }

    fn submit(&mut self, op: BlockOp, token: u64) -> Option<io::Result<()>> {
        let Some(memory) = &self.memory else {
            return Some(Err(io::Error::from_raw_os_error(libc::ENXIO)));
        };
        let (write, sync_after, offset, data, flush) = match op {
            BlockOp::Read { offset, data } => (false, false, offset, data, false),
            BlockOp::Write { offset, data, sync } => (true, sync, offset, data, false),
            BlockOp::Flush => (false, false, 0, Vec::new(), true),
            BlockOp::Discard { ranges } => {
                return Some(
                    ranges
                        .iter()
                        .try_for_each(|(off, len)| self.disk.discard(*off, *len)),
                )
            }
            BlockOp::WriteZeroes { ranges, sync } => {
                let r = ranges
                    .iter()
                    .try_for_each(|(off, len, unmap)| self.disk.write_zeroes(*off, *len, *unmap));
                if r.is_ok() {
                    self.observer.transferred(token);
                }
                return Some(r.and_then(|()| {
                    if !sync {
                        return Ok(());
                    }
                    let r = self.disk.datasync();
                    self.observer.synced(token, &r);
                    r
                }));
            }
        };
        // The kernel writes guest memory for a read, reads it for a write.
        let access = if write {
            Permissions::Read
        } else {
            Permissions::Write
        };
        let iov = match resolve(memory, &data, access) {
            Ok(iov) => iov,
            Err(e) => return Some(Err(e)),
        };
        let fd = self.disk.fd_for(offset, iov.shapes());
        let nothing_to_move = iov.total() == 0;
        let stage = if flush || (nothing_to_move && sync_after) {
            Stage::Sync
        } else if nothing_to_move {
            return Some(Ok(()));
        } else {
            Stage::Transfer
        };
        let mut start = 0;
        let mut iov = iov;
        iov.advance(&mut start, 0);
        let slot = self.alloc(InFlight {
            token,
            orphan: false,
            write,
            sync_after,
            stage,
            fd,
            offset,
            iov,
            start,
        });
        match self.push(slot) {
            Ok(()) => None,
            Err(e) => {
                self.release(slot);
                Some(Err(e))
            }
        }
    }

    fn commit(&mut self) -> io::Result<()> {
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(_) => self.unsubmitted = 0,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        loop {
            if let Err(e) = self.commit() {
                log::warn!("virtio-blk: io_uring submit: {e}");
            }
            if self.drain_cq(out) == 0 {
                break;
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn completion_fd(&self) -> Option<&EventFd> {
        Some(&self.eventfd)
    }

    fn replace_disk(&mut self, disk: Arc<Disk>) -> io::Result<()> {
        // An operation in flight holds the raw descriptor of the old image (it resubmits
        // short transfers on it, and its sync stage uses `self.disk`): closing that image
        // under it could send the rest to whatever file reuses the descriptor number.
        if self.in_flight > 0 {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        self.disk = disk;
        Ok(())
    }
}

impl<M: MappedMemory> Drop for IoUringEngine<M> {
    fn drop(&mut self) {
        // The kernel may still write guest memory for requests in flight: wait for them
        // before the iovecs and the memory clone are dropped.
        self.wait_all();
    }
}

#[cfg(test)]
mod restriction_tests {
    use super::*;
    use crate::disk::DiskOptions;
    use crate::DiskSource;

    /// The ring takes only the engine's own operations: an `OPENAT` (what code that took
    /// over a thread allowed `io_uring_enter` would submit) completes with `EACCES`, and
    /// nothing more can be registered. Without the restriction the open succeeds.
    #[test]
    fn the_ring_refuses_operations_the_engine_does_not_submit() {
        let path =
            std::env::temp_dir().join(format!("vmkit-uring-restricted-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let options = DiskOptions {
            read_only: false,
            direct: false,
            block_size: 512,
            lock: false,
        };
        let disk = Arc::new(Disk::open(DiskSource::Path(path.clone()), options).unwrap());
        let mut engine = IoUringEngine::<vm_memory::GuestMemoryMmap>::new(disk, 8).unwrap();
        let name = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), name.as_ptr())
            .flags(libc::O_RDONLY | libc::O_CLOEXEC)
            .build()
            .user_data(u64::MAX);
        // SAFETY: `name` outlives the operation: its completion is waited for below.
        unsafe { engine.ring.submission().push(&open).unwrap() };
        engine.ring.submit_and_wait(1).unwrap();
        let result = engine.ring.completion().next().unwrap().result();
        if result >= 0 {
            // SAFETY: the descriptor the unrestricted open returned is ours to close.
            unsafe { libc::close(result) };
        }
        let _ = std::fs::remove_file(&path);
        assert_eq!(result, -libc::EACCES, "an OPENAT went through the ring");
        assert!(
            engine.ring.submitter().register_files(&[0]).is_err(),
            "a registration went through"
        );
    }
}
