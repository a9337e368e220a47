//! The synchronous engine: each operation runs to completion in `submit`, on the thread
//! that processes the queue, with `preadv`/`pwritev` straight into guest memory.

use std::io;
use std::sync::Arc;

use vm_memory::{GuestMemoryMmap, Permissions};
use vmkit_virtio::MappedMemory;
use vmm_sys_util::eventfd::EventFd;

use super::{resolve, BlockEngine, BlockOp, Completion, IoObserver, IoVecs, NoObserver, IOV_MAX};
use crate::disk::Disk;

/// `preadv`/`pwritev`/`fdatasync`/`fallocate` on the calling thread. Simple and with the
/// lowest latency at queue depth 1 from the page cache; a request blocks the event thread
/// for as long as the host takes.
pub struct SyncEngine<M: MappedMemory = GuestMemoryMmap> {
    disk: Arc<Disk>,
    memory: Option<M>,
    observer: Arc<dyn IoObserver>,
}

impl<M: MappedMemory> std::fmt::Debug for SyncEngine<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncEngine")
            .field("disk", &self.disk)
            .field("attached", &self.memory.is_some())
            .finish()
    }
}

impl<M: MappedMemory> SyncEngine<M> {
    /// An engine on `disk`.
    pub fn new(disk: Arc<Disk>) -> Self {
        Self {
            disk,
            memory: None,
            observer: Arc::new(NoObserver),
        }
    }

    /// Reports each step to `observer` (see [`IoObserver`]).
    pub fn with_observer(mut self, observer: Arc<dyn IoObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// `fdatasync` for operation `token`, reported to the observer.
    fn sync(&self, token: u64) -> io::Result<()> {
        let r = self.disk.datasync();
        self.observer.synced(token, &r);
        r
    }

    fn run(&self, op: BlockOp, token: u64) -> io::Result<()> {
        let Some(memory) = &self.memory else {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        };
        match op {
            BlockOp::Read { offset, data } => {
                let mut iov = resolve(memory, &data, Permissions::Write)?;
                let fd = self.disk.fd_for(offset, iov.shapes());
                transfer(fd, false, offset, &mut iov)?;
                self.observer.transferred(token);
                Ok(())
            }
            BlockOp::Write { offset, data, sync } => {
                let mut iov = resolve(memory, &data, Permissions::Read)?;
                let fd = self.disk.fd_for(offset, iov.shapes());
                transfer(fd, true, offset, &mut iov)?;
                self.observer.transferred(token);
                if sync {
                    self.sync(token)?;
                }
                Ok(())
            }
            BlockOp::Flush => self.sync(token),
            BlockOp::Discard { ranges } => ranges
                .iter()
                .try_for_each(|(off, len)| self.disk.discard(*off, *len)),
            BlockOp::WriteZeroes { ranges, sync } => {
                ranges
                    .iter()
                    .try_for_each(|(off, len, unmap)| self.disk.write_zeroes(*off, *len, *unmap))?;
                self.observer.transferred(token);
                if sync {
                    self.sync(token)?;
                }
                Ok(())
            }
        }
    }
}

/// `preadv`/`pwritev` of all of `iov` at `offset`, retrying short transfers and `EINTR`.
/// End of file before the end (the image shrank under us) is `UnexpectedEof`.
pub(crate) fn transfer(
    fd: std::os::unix::io::RawFd,
    write: bool,
    offset: u64,
    iov: &mut IoVecs,
) -> io::Result<()> {
    let mut start = 0;
    let mut offset = offset;
    iov.advance(&mut start, 0);
    while start < iov.len() {
        let rest = &iov.as_slice()[start..];
        let count = rest.len().min(IOV_MAX) as libc::c_int;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `rest` is a live array of `count` iovecs, each pointing into guest memory
        // that stays mapped for this call (the engine holds a clone of the memory, and the
        // parser checked every buffer lies inside it). The kernel reads (pwritev) or
        // writes (preadv) those bytes only; no Rust reference to them exists, and the
        // guest racing with the copy can only change the data, not our memory safety.
        let r = unsafe {
            if write {
                libc::pwritev(fd, rest.as_ptr(), count, off)
            } else {
                libc::preadv(fd, rest.as_ptr(), count, off)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(if write {
                io::Error::from(io::ErrorKind::WriteZero)
            } else {
                io::Error::from(io::ErrorKind::UnexpectedEof)
            });
        }
        offset += r as u64;
        iov.advance(&mut start, r as usize);
    }
    Ok(())
}

impl<M: MappedMemory> BlockEngine<M> for SyncEngine<M> {
    fn attach(&mut self, memory: M) {
        self.memory = Some(memory);
    }

    fn detach(&mut self) {
        self.memory = None;
    }

    fn can_submit(&self) -> bool {
        true
    }

    fn submit(&mut self, op: BlockOp, token: u64) -> Option<io::Result<()>> {
        Some(self.run(op, token))
    }

    fn commit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, _out: &mut Vec<Completion>) {}

    fn in_flight(&self) -> usize {
        0
    }

    fn completion_fd(&self) -> Option<&EventFd> {
        None
    }

    fn replace_disk(&mut self, disk: Arc<Disk>) -> io::Result<()> {
        // Nothing is ever in flight: each operation ran to completion in `submit`.
        self.disk = disk;
        Ok(())
    }
}
