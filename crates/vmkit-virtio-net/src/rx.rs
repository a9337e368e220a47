//! Receive buffers: chains taken from a receive queue and held until a frame fills them,
//! so frames are read straight into guest memory with one `readv`.

use std::collections::VecDeque;

use vm_memory::{Address, Bytes, GuestAddress, Permissions};
use vmkit_virtio::{ActiveQueue, Descriptor, IoVecs, MappedMemory};

use crate::header::NET_HDR_LEN;

/// Linux's `UIO_MAXIOV`: the most iovecs one `readv` takes.
const IOV_MAX: usize = 1024;

/// A chain held for a frame.
#[derive(Clone, Copy, Debug)]
struct Held {
    head: u16,
    /// How many of the front segments are its buffers.
    segments: usize,
    len: u32,
}

/// How one frame was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Placed {
    /// Chains the frame took.
    pub(crate) chains: u16,
}

/// What [`RxBuffers::take`] did with a popped chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Held for the next frames.
    Held,
    /// Unusable (malformed, a device-readable buffer, shorter than a header): returned empty.
    Refused,
}

/// The chains taken from one receive queue and not yet used, in order, with their
/// device-writable buffers.
#[derive(Debug, Default)]
pub(crate) struct RxBuffers {
    segments: VecDeque<(GuestAddress, u32)>,
    chains: VecDeque<Held>,
    /// Sum of the held chains' lengths.
    total: u64,
}

impl RxBuffers {
    /// Holds chains from `q` until they add up to `need` bytes (`mergeable`: a frame may take
    /// several), or one chain (not `mergeable`). Unusable chains are completed empty and
    /// counted in `refused`, and those the queue found malformed in `queue_refused` too. Returns whether there is enough; when not, the queue's
    /// notifications are back on (its `pop` found the ring empty), so the driver's next
    /// buffers bring the device back.
    pub(crate) fn fill<M: MappedMemory>(
        &mut self,
        q: &mut ActiveQueue<M>,
        need: u64,
        mergeable: bool,
        refused: &mut u64,
        queue_refused: &mut u64,
    ) -> bool {
        while !self.enough(need, mergeable) {
            let Ok(Some(chain)) = q.pop() else {
                return false;
            };
            let head = chain.head();
            let taken = match chain.descriptors() {
                Ok(descs) => self.take(head, descs),
                Err(_) => {
                    *queue_refused += 1;
                    Taken::Refused
                }
            };
            if taken == Taken::Refused {
                *refused += 1;
                let _ = q.complete(head, 0);
            }
        }
        true
    }

    fn enough(&self, need: u64, mergeable: bool) -> bool {
        if mergeable {
            self.total >= need
        } else {
            !self.chains.is_empty()
        }
    }

    /// Holds one chain's buffers, if they are all device-writable and hold a header.
    pub(crate) fn take(&mut self, head: u16, descs: &[Descriptor]) -> Taken {
        let mut len: u32 = 0;
        for d in descs {
            if !d.is_write_only() {
                return Taken::Refused;
            }
            // The queue checked that a chain is at most 4 GiB in total.
            len = len.saturating_add(d.len());
        }
        if (len as usize) < NET_HDR_LEN {
            return Taken::Refused;
        }
        self.segments.extend(
            descs
                .iter()
                .filter(|d| d.len() > 0)
                .map(|d| (d.addr(), d.len())),
        );
        let segments = descs.iter().filter(|d| d.len() > 0).count();
        self.chains.push_back(Held {
            head,
            segments,
            len,
        });
        self.total += u64::from(len);
        Taken::Held
    }

    /// The iovecs a frame is read into: every held chain (`mergeable`) or the first.
    pub(crate) fn iovecs<M: MappedMemory>(
        &self,
        memory: &M,
        mergeable: bool,
        iov: &mut IoVecs,
    ) -> std::io::Result<()> {
        iov.clear();
        let count = if mergeable {
            self.segments.len()
        } else {
            self.chains.front().map_or(0, |c| c.segments)
        };
        for (addr, len) in self.segments.iter().take(count.min(IOV_MAX)) {
            iov.push(memory, *addr, *len as usize, Permissions::Write)?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at offset `at` of the held buffers (a frame's header or
    /// destination address after a read).
    pub(crate) fn read_at<M: MappedMemory>(&self, memory: &M, at: usize, buf: &mut [u8]) -> bool {
        self.walk(at, buf.len(), |addr, off, n| {
            memory.read_slice(&mut buf[off..off + n], addr).is_ok()
        })
    }

    /// Writes `bytes` at offset `at` of the held buffers.
    fn write_at<M: MappedMemory>(&self, memory: &M, at: usize, bytes: &[u8]) -> bool {
        self.walk(at, bytes.len(), |addr, off, n| {
            memory.write_slice(&bytes[off..off + n], addr).is_ok()
        })
    }

    /// Calls `f(guest address, offset in the piece, length)` for each piece of the `len`
    /// bytes at offset `at` of the held buffers; false if they end first or `f` fails.
    fn walk(
        &self,
        at: usize,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> bool,
    ) -> bool {
        let (mut skip, mut done) = (at, 0);
        for (addr, seg_len) in &self.segments {
            let seg_len = *seg_len as usize;
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let n = (seg_len - skip).min(len - done);
            // `skip < seg_len`, inside a buffer the queue checked to lie in guest memory.
            let Some(addr) = addr.checked_add(skip as u64) else {
                return false;
            };
            if !f(addr, done, n) {
                return false;
            }
            done += n;
            skip = 0;
            if done == len {
                return true;
            }
        }
        done == len
    }

    /// Returns the chains a `len`-byte frame filled to the used ring (the first with
    /// `num_buffers` set to how many it took), marking what was written dirty.
    pub(crate) fn complete<M: MappedMemory>(
        &mut self,
        q: &mut ActiveQueue<M>,
        len: usize,
        mergeable: bool,
    ) -> Placed {
        let mut chains: u16 = 0;
        let mut left = len;
        let mut covered = 0usize;
        for held in self.chains.iter() {
            chains += 1;
            covered += held.len as usize;
            if covered >= left || !mergeable {
                break;
            }
        }
        let _ = self.write_at(
            q.memory(),
            crate::header::NUM_BUFFERS_OFFSET,
            &chains.to_le_bytes(),
        );
        for _ in 0..chains {
            let Some(held) = self.chains.pop_front() else {
                break;
            };
            let used = left.min(held.len as usize);
            left -= used;
            let mut dirty = used;
            for (addr, seg_len) in self.segments.drain(..held.segments) {
                let n = dirty.min(seg_len as usize);
                vmkit_virtio::mark_dirty(q.memory(), addr, n);
                dirty -= n;
            }
            self.total -= u64::from(held.len);
            // At most the chain's length, a u32.
            let _ = q.complete(held.head, used as u32);
        }
        Placed { chains }
    }

    /// Returns every held chain to the used ring empty; returns how many.
    pub(crate) fn return_all<M: MappedMemory>(&mut self, q: &mut ActiveQueue<M>) -> u16 {
        let mut n = 0u16;
        for held in self.chains.drain(..) {
            let _ = q.complete(held.head, 0);
            n = n.saturating_add(1);
        }
        self.segments.clear();
        self.total = 0;
        n
    }

    /// Gives every held chain back to the queue unused (they are the last ones taken: the
    /// oldest is filled first): the driver's buffers are available again, the next pops take
    /// them, and a snapshot records them as available, not taken. A chain that cannot be
    /// given back (none, while they are the last taken) is completed empty instead. Returns
    /// how many were completed.
    pub(crate) fn give_back<M: MappedMemory>(&mut self, q: &mut ActiveQueue<M>) -> u16 {
        let held = u16::try_from(self.chains.len()).unwrap_or(u16::MAX);
        let given = q.give_back(held);
        let completed = held - given;
        for chain in self.chains.drain(..).take(usize::from(completed)) {
            let _ = q.complete(chain.head, 0);
        }
        self.segments.clear();
        self.total = 0;
        completed
    }

    /// Forgets every held chain (the device was reset: the queue is gone).
    pub(crate) fn clear(&mut self) {
        self.segments.clear();
        self.chains.clear();
        self.total = 0;
    }
}
