//! Several 4 KiB blk requests in flight at once, for `blk-inflight` and
//! `soak`: per slot a header, a data block and a response; slot `i` goes
//! to the odd block `base + (2i + 1) * 8` (distinct, never adjacent, so the
//! host cannot merge them). `round_trip` submits slots with
//! `write_blocks_nb`/`read_blocks_nb` until the queue is full, then
//! completes them in used-ring order (`peek_used`, `complete_*_blocks`).

use crate::drivers::blk::{drain, status_name, Blk};
use crate::platform::ram::Arena;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_drivers::device::blk::{BlkReq, BlkResp, SECTOR_SIZE};
use virtio_drivers::Error;

/// Bytes per request.
pub const BLOCK: usize = 4096;
/// Sectors per request.
pub const BLOCK_SECTORS: u64 = (BLOCK / SECTOR_SIZE) as u64;

/// Which way the requests go.
#[derive(Clone, Copy)]
pub enum Dir {
    Write,
    Read,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Write => "write",
            Dir::Read => "read",
        }
    }
}

/// The requests' memory.
pub struct Slots<'a> {
    pub bufs: Vec<&'a mut [u8]>,
    reqs: Vec<BlkReq>,
    resps: Vec<BlkResp>,
    tokens: Vec<Option<u16>>,
    /// The first sector of the region the slots go to.
    pub base: u64,
}

impl<'a> Slots<'a> {
    /// `n` slots with their buffers from `arena`, at `base` 0.
    pub fn new(arena: &'a Arena, n: usize) -> Result<Self, String> {
        Ok(Slots {
            bufs: arena.take_many(n, BLOCK)?,
            reqs: (0..n).map(|_| BlkReq::default()).collect(),
            resps: (0..n).map(|_| BlkResp::default()).collect(),
            tokens: alloc::vec![None; n],
            base: 0,
        })
    }

    /// The first sector of slot `i`.
    pub fn sector(&self, i: usize) -> u64 {
        self.base + (2 * i as u64 + 1) * BLOCK_SECTORS
    }

    /// Sectors from `base` the slots cover (the even blocks between them
    /// included).
    pub fn span(n: usize) -> u64 {
        2 * n as u64 * BLOCK_SECTORS
    }

    /// Submits the first `count` slots in direction `dir` until the queue is
    /// full, then completes them in used-ring order; returns how many went.
    pub fn round_trip(&mut self, blk: &mut Blk, dir: Dir, count: usize) -> Result<usize, String> {
        let mut sent_n = 0;
        for i in 0..count.min(self.bufs.len()) {
            let at = self.sector(i) as usize;
            let (req, buf, resp) = (&mut self.reqs[i], &mut *self.bufs[i], &mut self.resps[i]);
            // SAFETY: reqs[i], bufs[i], resps[i] are not touched until the
            // matching `complete_*_blocks` returns them (or the device is reset).
            let sent = unsafe {
                match dir {
                    Dir::Write => blk.write_blocks_nb(at, req, buf, resp),
                    Dir::Read => blk.read_blocks_nb(at, req, buf, resp),
                }
            };
            match sent {
                Ok(t) => {
                    self.tokens[i] = Some(t);
                    sent_n += 1;
                }
                Err(Error::QueueFull) => break,
                Err(e) => return Err(format!("{} {}: {}", dir.name(), i, e)),
            }
        }
        let Slots {
            bufs,
            reqs,
            resps,
            tokens,
            ..
        } = self;
        drain(blk, tokens, |blk, i, t| {
            let (req, buf, resp) = (&reqs[i], &mut *bufs[i], &mut resps[i]);
            // SAFETY: the buffers given to `*_blocks_nb` for this token.
            let done = unsafe {
                match dir {
                    Dir::Write => blk.complete_write_blocks(t, req, buf, resp),
                    Dir::Read => blk.complete_read_blocks(t, req, buf, resp),
                }
            };
            let status = status_name(resps[i].status());
            done.map_err(|e| format!("{} {}: {} (status {})", dir.name(), i, e, status))
        })?;
        Ok(sent_n)
    }
}
