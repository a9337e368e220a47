//! The virtio-blk device: features, configuration space, and the request path from the
//! available ring through the parser and an engine to the used ring.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::{
    chain_descriptors, needs_interrupt, ActivateContext, ActivateError, InterruptReason,
    VirtioDevice,
};
use vmm_sys_util::eventfd::EventFd;

use crate::disk::{Disk, DiskOptions};
use crate::engine::{BlockEngine, BlockOp, Completion, IoUringEngine, SyncEngine};
use crate::request::{
    self, BadRequest, Limits, RequestKind, ID_BYTES, SECTOR_SIZE, S_IOERR, S_OK, S_UNSUPP,
};
use crate::{
    BlockConfig, EngineKind, Error, BLOCK_DEVICE_TYPE, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS,
    MAX_QUEUES,
};

/// The size of the configuration space we expose (through `write_zeroes_may_unmap` and its
/// padding; the secure-erase and zoned fields are not offered).
pub const CONFIG_SPACE_SIZE: usize = 60;

/// The token of the io_uring completion eventfd in [`VirtioDevice::device_events`].
const COMPLETION_EVENT: u16 = 0;

/// Counters of a [`Block`] device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Requests taken from the rings (chains).
    pub requests: u64,
    /// `IN` requests completed OK.
    pub reads: u64,
    /// `OUT` requests completed OK.
    pub writes: u64,
    /// `FLUSH` requests completed OK.
    pub flushes: u64,
    /// `DISCARD` requests completed OK.
    pub discards: u64,
    /// `WRITE_ZEROES` requests completed OK.
    pub write_zeroes: u64,
    /// `GET_ID` requests completed OK.
    pub get_ids: u64,
    /// Bytes read into guest memory.
    pub bytes_read: u64,
    /// Bytes written to the image.
    pub bytes_written: u64,
    /// Malformed requests answered `IOERR` (or returned unanswered: no status byte).
    pub bad_requests: u64,
    /// Requests answered `UNSUPP`.
    pub unsupported: u64,
    /// Writes refused on a read-only disk.
    pub read_only_refusals: u64,
    /// Requests the engine failed (`IOERR`).
    pub io_errors: u64,
    /// The most requests in flight at once.
    pub max_in_flight: u64,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

#[derive(Debug)]
struct Pending {
    queue: u16,
    head: u16,
    status: GuestAddress,
    /// Used length on success (data written + status).
    ok_len: u32,
    op: Op,
    bytes: u64,
}

/// What the device keeps apart from the activation context (so both can be borrowed).
#[derive(Debug)]
struct Core {
    engine: Box<dyn BlockEngine>,
    read_only: bool,
    capacity: u64,
    seg_max: u32,
    serial: [u8; ID_BYTES],
    acked: u64,
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Requests in flight, per queue index.
    queue_in_flight: Vec<u32>,
    /// Queues that stopped taking requests because the engine or the queue was full.
    starved: Vec<bool>,
    /// Queues that put entries in their used ring since their last interrupt check.
    touched: Vec<bool>,
    completions: Vec<Completion>,
    stats: BlockStats,
    /// How long to watch a queue after serving it (zero: not at all).
    poll: Duration,
}

/// The virtio-blk device. Put it on a transport as `Arc<Mutex<Block>>`.
#[derive(Debug)]
pub struct Block {
    core: Core,
    disk: Arc<Disk>,
    queue_sizes: Vec<u16>,
    block_size: u32,
    active: Option<ActivateContext>,
}

fn bit(b: u32) -> u64 {
    1 << b
}

impl Block {
    /// Opens and validates the image and sets up the engine. Each unusable disk is a
    /// distinct [`Error`]: missing, a directory, not a file or block device, not writable
    /// while `read_only` is off, empty, a size not a multiple of the block size, `O_DIRECT`
    /// refused; and the configuration is checked (queues, queue size, block size, serial).
    pub fn new(config: BlockConfig) -> Result<Self, Error> {
        if config.queues == 0 || config.queues > MAX_QUEUES {
            return Err(Error::InvalidQueues(config.queues));
        }
        if !config.queue_size.is_power_of_two() || config.queue_size < 4 {
            return Err(Error::InvalidQueueSize(config.queue_size));
        }
        if !config.block_size.is_power_of_two() || !(512..=4096).contains(&config.block_size) {
            return Err(Error::InvalidBlockSize(config.block_size));
        }
        if config.serial.len() > ID_BYTES {
            return Err(Error::SerialTooLong(config.serial.len()));
        }
        let mut serial = [0u8; ID_BYTES];
        serial[..config.serial.len()].copy_from_slice(config.serial.as_bytes());
        let disk = Arc::new(Disk::open(
            config.source,
            DiskOptions {
                read_only: config.read_only,
                direct: config.direct,
                block_size: config.block_size,
            },
        )?);
        let slots = u32::from(config.queues) * u32::from(config.queue_size);
        let engine: Box<dyn BlockEngine> = match config.engine {
            EngineKind::Sync => Box::new(SyncEngine::new(disk.clone())),
            EngineKind::IoUring => {
                Box::new(IoUringEngine::new(disk.clone(), slots).map_err(Error::IoUring)?)
            }
        };
        let queues = usize::from(config.queues);
        Ok(Self {
            core: Core {
                engine,
                read_only: config.read_only,
                capacity: disk.size() / SECTOR_SIZE,
                seg_max: u32::from(config.queue_size) - 2,
                serial,
                acked: 0,
                pending: Vec::new(),
                free: Vec::new(),
                queue_in_flight: vec![0; queues],
                starved: vec![false; queues],
                touched: vec![false; queues],
                completions: Vec::new(),
                stats: BlockStats::default(),
                poll: Duration::from_micros(u64::from(config.poll_us)),
            },
            disk,
            queue_sizes: vec![config.queue_size; queues],
            block_size: config.block_size,
            active: None,
        })
    }

    /// The capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.core.capacity
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.core.read_only
    }

    /// Whether the data path uses `O_DIRECT`, and its buffer alignment.
    pub fn direct(&self) -> Option<u32> {
        self.disk.direct().then(|| self.disk.direct_align())
    }

    /// The counters.
    pub fn stats(&self) -> BlockStats {
        self.core.stats
    }

    /// Whether the driver has activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Requests in flight in the engine.
    pub fn in_flight(&self) -> usize {
        self.core.engine.in_flight()
    }

    /// The engine's completion eventfd (io_uring), which the VMM's event loop watches —
    /// [`VirtioDevice::device_events`] hands a clone of it to vmkit-virtio's
    /// `QueueEventHandler`, so a VMM using that handler needs nothing more. When it fires,
    /// read it and call [`process_completions`](Self::process_completions).
    pub fn completion_fd(&self) -> Option<&EventFd> {
        self.core.engine.completion_fd()
    }

    /// Completes what the engine finished (status byte, used ring, one interrupt per
    /// queue as the suppression rules allow), then resumes queues that were waiting for
    /// room. Returns how many requests completed.
    pub fn process_completions(&mut self) -> usize {
        let limits = self.limits();
        let Some(ctx) = self.active.as_mut() else {
            return 0;
        };
        let core = &mut self.core;
        let mut done = core.reap(ctx);
        // Queues that stopped for lack of room take requests again.
        for q in 0..core.starved.len() {
            if core.starved[q] && core.has_room(ctx, q as u16) {
                done += core.run(ctx, q as u16, &limits);
            }
        }
        core.interrupt(ctx);
        done
    }

    fn limits(&self) -> Limits {
        Limits {
            capacity: self.core.capacity,
            seg_max: self.core.seg_max,
            discard: self.core.acked & bit(VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: self.core.acked & bit(VIRTIO_BLK_F_WRITE_ZEROES) != 0,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEGMENTS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEGMENTS,
        }
    }

    fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        c[0..8].copy_from_slice(&self.core.capacity.to_le_bytes());
        // size_max (8) not offered; seg_max:
        c[12..16].copy_from_slice(&self.core.seg_max.to_le_bytes());
        // geometry (16..20) not offered; blk_size:
        c[20..24].copy_from_slice(&self.block_size.to_le_bytes());
        // topology (24..32) not offered; writeback: 1 when the driver negotiated FLUSH.
        c[32] = u8::from(self.core.acked & bit(VIRTIO_BLK_F_FLUSH) != 0);
        c[34..36].copy_from_slice(&(self.queue_sizes.len() as u16).to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        let align = self.block_size / SECTOR_SIZE as u32;
        c[44..48].copy_from_slice(&align.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Takes requests from queue `index` until it is empty (or the engine is full),
    /// submits them in one batch, completes what is done. Returns requests completed.
    fn run_queue(&mut self, index: u16) -> usize {
        let limits = self.limits();
        let Some(ctx) = self.active.as_mut() else {
            return 0;
        };
        let mut done = self.core.run(ctx, index, &limits);
        self.core.interrupt(ctx);
        if self.core.poll.is_zero() || ctx.needs_reset() {
            return done;
        }
        // Watch the ring for a while with notifications suppressed: a driver that submits
        // again within `poll` does so without a VM exit. Completions of the engine are
        // taken meanwhile, so polling never delays them.
        let mut deadline = Instant::now() + self.core.poll;
        // A driver that never stops submitting must not keep the event thread here: after
        // this many rounds it goes back to its event loop (notifications are on again, so
        // the next request simply arrives as a notification).
        let mut rounds = 0u32;
        loop {
            rounds += 1;
            if self.core.suppress_notifications(ctx, index).is_err() {
                break;
            }
            let mut work = false;
            while Instant::now() < deadline {
                if self.core.engine.in_flight() > 0 {
                    let n = self.core.reap(ctx);
                    if n > 0 {
                        done += n;
                        self.core.interrupt(ctx);
                    }
                }
                if self.core.avail_pending(ctx, index) {
                    work = true;
                    break;
                }
                std::hint::spin_loop();
            }
            // Serve what arrived; `run` ends by re-enabling notifications and checking the
            // ring once more, so nothing is missed when polling stops.
            done += self.core.run(ctx, index, &limits);
            self.core.interrupt(ctx);
            if !work || ctx.needs_reset() || rounds >= MAX_POLL_ROUNDS {
                break;
            }
            deadline = Instant::now() + self.core.poll;
        }
        done
    }
}

/// Polling rounds per kick before the event thread returns to its other work.
const MAX_POLL_ROUNDS: u32 = 256;

/// A ring the driver corrupted.
#[derive(Debug, thiserror::Error)]
enum RingError {
    #[error("available index {avail} is more than a queue ahead of {next}")]
    AvailIndex { avail: u16, next: u16 },
    #[error("the available ring cannot be read")]
    Unreadable,
    #[error("{0}")]
    Queue(#[from] virtio_queue::Error),
}

impl Core {
    /// Asks the driver not to notify queue `index`: with EVENT_IDX, `avail_event` is put
    /// just behind the next entry (the driver notifies only when it crosses it); without,
    /// the used ring's NO_NOTIFY flag. `take_requests` undoes this when it re-enables them.
    fn suppress_notifications(
        &self,
        ctx: &mut ActivateContext,
        index: u16,
    ) -> Result<(), RingError> {
        let Some((mem, aq)) = ctx.memory_and_queue(index) else {
            return Ok(());
        };
        let q = &mut aq.queue;
        if !q.event_idx_enabled() {
            q.disable_notification(mem)?;
            return Ok(());
        }
        // The used ring was validated at activation: header, size elements, avail_event.
        let addr = q
            .used_ring()
            .checked_add(4 + 8 * u64::from(q.size()))
            .ok_or(RingError::Unreadable)?;
        mem.store(
            q.next_avail().wrapping_sub(1).to_le(),
            GuestAddress(addr),
            Ordering::Release,
        )
        .map_err(|_| RingError::Unreadable)?;
        Ok(())
    }

    /// Whether the driver has made entries available on queue `index` that are not taken.
    fn avail_pending(&self, ctx: &mut ActivateContext, index: u16) -> bool {
        let Some((mem, aq)) = ctx.memory_and_queue(index) else {
            return false;
        };
        let next = aq.queue.next_avail();
        aq.queue
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != next)
    }

    /// Whether queue `index` may take another request: the engine has room and the queue
    /// has fewer than its size in flight.
    fn has_room(&self, ctx: &ActivateContext, index: u16) -> bool {
        let Some(q) = ctx.queue(index) else {
            return false;
        };
        self.engine.can_submit()
            && self.queue_in_flight[usize::from(index)] < u32::from(q.queue.size())
    }

    /// Takes and starts requests of queue `index`, submits them as one batch, completes
    /// what finished; again while the queue stopped for room and room was made. The
    /// caller interrupts. Returns requests completed.
    fn run(&mut self, ctx: &mut ActivateContext, index: u16, limits: &Limits) -> usize {
        let mut done = 0;
        loop {
            if ctx.needs_reset() {
                return done;
            }
            self.starved[usize::from(index)] = false;
            if let Err(e) = self.take_requests(ctx, index, limits, &mut done) {
                log::warn!("virtio-blk: queue {index}: {e}; device needs reset");
                ctx.set_needs_reset();
                return done;
            }
            if let Err(e) = self.engine.commit() {
                log::warn!("virtio-blk: submitting I/O: {e}");
            }
            done += self.reap(ctx);
            if !(self.starved[usize::from(index)] && self.has_room(ctx, index)) {
                return done;
            }
        }
    }

    fn take_requests(
        &mut self,
        ctx: &mut ActivateContext,
        index: u16,
        limits: &Limits,
        done: &mut usize,
    ) -> Result<(), RingError> {
        let qi = usize::from(index);
        let Some((mem, aq)) = ctx.memory_and_queue(index) else {
            return Ok(());
        };
        let queue = &mut aq.queue;
        loop {
            queue.disable_notification(mem)?;
            let avail = queue.avail_idx(mem, Ordering::Acquire)?;
            let pending = avail.0.wrapping_sub(queue.next_avail());
            if pending > queue.size() {
                return Err(RingError::AvailIndex {
                    avail: avail.0,
                    next: queue.next_avail(),
                });
            }
            for _ in 0..pending {
                // Room for one more? (A driver re-offering heads still in flight cannot
                // make us hold more than a queue's worth.)
                if !self.engine.can_submit() || self.queue_in_flight[qi] >= u32::from(queue.size())
                {
                    // Notifications stay off: completions resume this queue.
                    self.starved[qi] = true;
                    return Ok(());
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    return Err(RingError::Unreadable);
                };
                let head = chain.head_index();
                self.stats.requests += 1;
                if let Some(len) = self.start(mem, chain, index, head, limits) {
                    queue.add_used(mem, head, len)?;
                    self.touched[qi] = true;
                    *done += 1;
                }
            }
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        Ok(())
    }

    /// Parses and starts one request. `Some(used length)` when it is answered already
    /// (status written), `None` when it is in flight.
    fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        queue: u16,
        head: u16,
        limits: &Limits,
    ) -> Option<u32> {
        let answer = |status: GuestAddress, s: u8| -> u32 {
            // The status byte was checked to be device-writable guest memory.
            u32::from(mem.write_obj(s, status).is_ok())
        };
        let Ok(descs) = chain_descriptors(chain) else {
            self.stats.bad_requests += 1;
            return Some(0);
        };
        let req = match request::parse(mem, &descs, limits) {
            Ok(r) => r,
            Err(BadRequest { status, error }) => {
                log::debug!("virtio-blk: bad request: {error}");
                if error.status() == S_UNSUPP {
                    self.stats.unsupported += 1;
                } else {
                    self.stats.bad_requests += 1;
                }
                return Some(status.map_or(0, |s| answer(s, error.status())));
            }
        };
        let status = req.status;
        if req.is_write() && self.read_only {
            self.stats.read_only_refusals += 1;
            return Some(answer(status, S_IOERR));
        }
        let ok_len = req.data_written_len().saturating_add(1);
        let writethrough = self.acked & bit(VIRTIO_BLK_F_FLUSH) == 0;
        let (op, kind, bytes) = match req.kind {
            RequestKind::In { sector, data } => {
                let bytes = data.iter().map(|s| u64::from(s.len)).sum();
                let offset = sector * SECTOR_SIZE;
                (BlockOp::Read { offset, data }, Op::Read, bytes)
            }
            RequestKind::Out { sector, data } => {
                let bytes = data.iter().map(|s| u64::from(s.len)).sum();
                let offset = sector * SECTOR_SIZE;
                let op = BlockOp::Write {
                    offset,
                    data,
                    sync: writethrough,
                };
                (op, Op::Write, bytes)
            }
            RequestKind::Flush => (BlockOp::Flush, Op::Flush, 0),
            RequestKind::GetId { data } => {
                if request::scatter(mem, &data, &self.serial).is_err() {
                    return Some(answer(status, S_IOERR));
                }
                self.stats.get_ids += 1;
                let written = answer(status, S_OK);
                return Some(if written == 1 { ok_len } else { 0 });
            }
            RequestKind::Discard { ranges } => {
                let ranges = ranges.iter().map(|r| r.bytes()).collect();
                (BlockOp::Discard { ranges }, Op::Discard, 0)
            }
            RequestKind::WriteZeroes { ranges } => {
                let ranges = ranges
                    .iter()
                    .map(|r| {
                        let (off, len) = r.bytes();
                        (off, len, r.unmap)
                    })
                    .collect();
                let op = BlockOp::WriteZeroes {
                    ranges,
                    sync: writethrough,
                };
                (op, Op::WriteZeroes, 0)
            }
            RequestKind::Unsupported { .. } => {
                self.stats.unsupported += 1;
                return Some(answer(status, S_UNSUPP));
            }
        };
        let pending = Pending {
            queue,
            head,
            status,
            ok_len,
            op: kind,
            bytes,
        };
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.pending.push(None);
                self.pending.len() - 1
            }
        };
        match self.engine.submit(op, slot as u64) {
            Some(result) => {
                self.free.push(slot);
                let len = self.finish(mem, &pending, result);
                Some(len)
            }
            None => {
                self.pending[slot] = Some(pending);
                self.queue_in_flight[usize::from(queue)] += 1;
                let n = self.engine.in_flight() as u64;
                self.stats.max_in_flight = self.stats.max_in_flight.max(n);
                None
            }
        }
    }

    /// Writes the status of a finished request; returns its used length.
    fn finish(&mut self, mem: &GuestMemoryMmap, p: &Pending, result: io::Result<()>) -> u32 {
        let (status, len) = match result {
            Ok(()) => {
                let s = &mut self.stats;
                match p.op {
                    Op::Read => {
                        s.reads += 1;
                        s.bytes_read += p.bytes;
                    }
                    Op::Write => {
                        s.writes += 1;
                        s.bytes_written += p.bytes;
                    }
                    Op::Flush => s.flushes += 1,
                    Op::Discard => s.discards += 1,
                    Op::WriteZeroes => s.write_zeroes += 1,
                }
                (S_OK, p.ok_len)
            }
            Err(e) => {
                log::warn!("virtio-blk: {:?} failed: {e}", p.op);
                self.stats.io_errors += 1;
                (S_IOERR, 1)
            }
        };
        if mem.write_obj(status, p.status).is_ok() {
            len
        } else {
            0
        }
    }

    /// Completes what the engine finished; returns how many.
    fn reap(&mut self, ctx: &mut ActivateContext) -> usize {
        let mut completions = std::mem::take(&mut self.completions);
        self.engine.reap(&mut completions);
        let n = completions.len();
        for c in completions.drain(..) {
            let Some(p) = usize::try_from(c.token)
                .ok()
                .and_then(|i| self.pending.get_mut(i))
                .and_then(Option::take)
            else {
                continue;
            };
            self.free.push(c.token as usize);
            let qi = usize::from(p.queue);
            self.queue_in_flight[qi] = self.queue_in_flight[qi].saturating_sub(1);
            let Some((mem, aq)) = ctx.memory_and_queue(p.queue) else {
                continue;
            };
            let len = self.finish(mem, &p, c.result);
            if let Err(e) = aq.queue.add_used(mem, p.head, len) {
                log::warn!("virtio-blk: queue {}: {e}; device needs reset", p.queue);
                ctx.set_needs_reset();
                break;
            }
            self.touched[qi] = true;
        }
        self.completions = completions;
        n
    }

    /// Interrupts each queue that used buffers, if the driver wants it.
    fn interrupt(&mut self, ctx: &mut ActivateContext) {
        for qi in 0..self.touched.len() {
            if !std::mem::take(&mut self.touched[qi]) {
                continue;
            }
            let index = qi as u16;
            let interrupt = ctx.interrupt().clone();
            let Some((mem, aq)) = ctx.memory_and_queue(index) else {
                continue;
            };
            match needs_interrupt(&mut aq.queue, mem) {
                Ok(true) => {
                    if let Err(e) = interrupt.trigger(InterruptReason::Queue(index)) {
                        log::warn!("virtio-blk: interrupt for queue {index}: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    log::warn!("virtio-blk: queue {index}: {e}; device needs reset");
                    ctx.set_needs_reset();
                }
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        BLOCK_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        let mut f =
            bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_FLUSH);
        if self.core.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        if self.queue_sizes.len() > 1 {
            f |= bit(VIRTIO_BLK_F_MQ);
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.core.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(end) = start.checked_add(data.len()) {
            if end <= config.len() {
                data.copy_from_slice(&config[start..end]);
            }
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing is writable (`writeback` needs CONFIG_WCE, not offered).
    }

    fn activate(&mut self, context: ActivateContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if context.queues().is_empty() {
            return Err(ActivateError::MissingQueue(0));
        }
        self.core.engine.attach(context.memory().clone());
        self.active = Some(context);
        Ok(())
    }

    fn process_queue(&mut self, index: u16) {
        if usize::from(index) < self.queue_sizes.len() {
            self.run_queue(index);
        }
    }

    fn device_events(&self) -> io::Result<Vec<(u16, EventFd)>> {
        match self.core.engine.completion_fd() {
            Some(fd) => Ok(vec![(COMPLETION_EVENT, fd.try_clone()?)]),
            None => Ok(Vec::new()),
        }
    }

    fn process_device_event(&mut self, token: u16) {
        if token == COMPLETION_EVENT {
            self.process_completions();
        }
    }

    fn reset(&mut self) -> Option<ActivateContext> {
        // Nothing may touch guest memory after the reset: wait for what is in flight.
        self.core.engine.detach();
        self.core.pending.clear();
        self.core.free.clear();
        self.core.queue_in_flight.fill(0);
        self.core.starved.fill(false);
        self.core.touched.fill(false);
        self.core.acked = 0;
        self.active.take()
    }
}
