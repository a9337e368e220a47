//! The virtio-blk device: features, configuration space, and the request path from the
//! available ring through the parser and an engine to the used ring.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::{
    ActivateContext, ActivateError, ActiveQueue, Chain, Counter, DeviceMetrics, MappedMemory,
    RateLimiter, RateLimiterUpdate, VirtioDevice,
};
use vmm_sys_util::eventfd::EventFd;

use crate::disk::{Disk, DiskOptions};
use crate::engine::{mark_dirty, BlockEngine, BlockOp, Completion, IoUringEngine, SyncEngine};
use crate::request::{
    self, BadRequest, Limits, RequestKind, Segment, ID_BYTES, SECTOR_SIZE, S_IOERR, S_OK, S_UNSUPP,
};
use crate::{
    BlockConfig, DiskSource, EngineKind, Error, BLOCK_DEVICE_TYPE, MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEGMENTS,
};

/// The size of the configuration space we expose (through `write_zeroes_may_unmap` and its
/// padding; the secure-erase and zoned fields are not offered).
pub const CONFIG_SPACE_SIZE: usize = 60;

/// The token of the io_uring completion eventfd in [`VirtioDevice::device_events`].
const COMPLETION_EVENT: u16 = 0;
/// The token of the rate limiter's timerfd in [`VirtioDevice::readable_fds`].
const LIMITER_EVENT: u16 = 1;

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
    /// For reads: the guest buffers the kernel fills, marked dirty when it is done.
    filled: Vec<Segment>,
}

/// The requests of a [`Block`] device between the rings and the engine: what is in flight,
/// which queue waits for room, and the counters. It owns no ring: every method is handed the
/// queue (or the context) it works on.
#[derive(Debug)]
struct Requests<M: MappedMemory> {
    engine: Box<dyn BlockEngine<M>>,
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
    completions: Vec<Completion>,
    stats: BlockStats,
    /// The VMM's counters ([`BlockConfig::metrics`]).
    metrics: Arc<dyn DeviceMetrics>,
    /// [`BlockConfig::rate_limiter`]: while it is throttled no request is taken.
    limiter: RateLimiter,
}

/// What became of a request [`Requests::start`] was handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Started {
    /// Answered already (status written), with this used length.
    Answered(u32),
    /// In flight in the engine.
    InFlight,
    /// Not started: the rate limiter has no tokens for it (the chain goes back).
    Throttled,
}

/// The virtio-blk device. Put it on a transport as `Arc<Mutex<Block>>`; it works on any
/// [`MappedMemory`] (`GuestMemoryMmap` by default, with or without a dirty bitmap: pages the
/// engines fill are marked dirty).
#[derive(Debug)]
pub struct Block<M: MappedMemory = GuestMemoryMmap> {
    requests: Requests<M>,
    disk: Arc<Disk>,
    queue_sizes: Vec<u16>,
    block_size: u32,
    /// How long the event handler polls a queue after a notification (zero: not at all).
    poll: Duration,
    active: Option<ActivateContext<M>>,
    /// Restored from a snapshot and not activated since: the next activation serves what
    /// the driver made available before the snapshot (its notification may have been
    /// taken by the VMM that paused, never to reach this device).
    restored: bool,
}

fn bit(b: u32) -> u64 {
    1 << b
}

impl Block {
    /// Opens and validates the image and sets up the engine, for `GuestMemoryMmap`. Each
    /// unusable disk is a distinct [`Error`]: missing, a directory, not a file or block
    /// device, not writable while `read_only` is off, empty, a size not a multiple of the
    /// block size, `O_DIRECT` refused; and the configuration is checked (queues, queue size,
    /// block size, serial).
    pub fn new(config: BlockConfig) -> Result<Self, Error> {
        Self::for_memory(config)
    }
}

impl<M: MappedMemory> Block<M> {
    /// As [`Block::new`], for guest memory of type `M`.
    pub fn for_memory(config: BlockConfig) -> Result<Self, Error> {
        let kind = config.engine;
        let observer = config.observer.clone();
        let slots = u32::from(config.queues) * u32::from(config.queue_size);
        Self::with_engine(config, |disk| {
            let engine: Box<dyn BlockEngine<M>> = match kind {
                EngineKind::Sync => Box::new(SyncEngine::new(disk).with_observer(observer)),
                EngineKind::IoUring => Box::new(
                    IoUringEngine::new(disk, slots)
                        .map_err(Error::IoUring)?
                        .with_observer(observer),
                ),
            };
            Ok(engine)
        })
    }

    /// As [`Block::for_memory`], with the engine `engine` makes on the opened image instead
    /// of the one `config.engine` names (which is ignored): another backend, or one a test
    /// controls.
    pub fn with_engine(
        config: BlockConfig,
        engine: impl FnOnce(Arc<Disk>) -> Result<Box<dyn BlockEngine<M>>, Error>,
    ) -> Result<Self, Error> {
        config.check()?;
        let mut serial = [0u8; ID_BYTES];
        serial[..config.serial.len()].copy_from_slice(config.serial.as_bytes());
        let disk = Arc::new(Disk::open(
            config.source,
            DiskOptions {
                read_only: config.read_only,
                direct: config.direct,
                block_size: config.block_size,
                lock: config.lock,
            },
        )?);
        let engine = engine(disk.clone())?;
        let queues = usize::from(config.queues);
        Ok(Self {
            requests: Requests {
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
                completions: Vec::new(),
                stats: BlockStats::default(),
                metrics: config.metrics,
                limiter: RateLimiter::new(config.rate_limiter).map_err(Error::RateLimiter)?,
            },
            disk,
            queue_sizes: vec![config.queue_size; queues],
            block_size: config.block_size,
            poll: Duration::from_micros(u64::from(config.poll_us)),
            active: None,
            restored: false,
        })
    }

    /// The capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.requests.capacity
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.requests.read_only
    }

    /// The logical block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The number of request queues.
    pub fn queue_count(&self) -> u16 {
        // At most MAX_QUEUES (256), checked by `BlockConfig::check`.
        self.queue_sizes.len() as u16
    }

    /// The serial, zero-padded (snapshot/restore).
    pub(crate) fn serial_bytes(&self) -> [u8; ID_BYTES] {
        self.requests.serial
    }

    /// Replaces the serial and marks the device restored (snapshot/restore).
    pub(crate) fn set_restored(&mut self, serial: [u8; ID_BYTES]) {
        self.requests.serial = serial;
        self.restored = true;
    }

    /// Whether the data path uses `O_DIRECT`, and its buffer alignment.
    pub fn direct(&self) -> Option<u32> {
        self.disk.direct().then(|| self.disk.direct_align())
    }

    /// The counters.
    pub fn stats(&self) -> BlockStats {
        self.requests.stats
    }

    /// Whether the driver has activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Requests in flight in the engine.
    pub fn in_flight(&self) -> usize {
        self.requests.engine.in_flight()
    }

    /// The engine's completion eventfd (io_uring), which the VMM's event loop watches —
    /// [`VirtioDevice::device_events`] hands a clone of it to vmkit-virtio's
    /// `QueueEventHandler`, so a VMM using that handler needs nothing more. When it fires,
    /// read it and call [`process_completions`](Self::process_completions).
    pub fn completion_fd(&self) -> Option<&EventFd> {
        self.requests.engine.completion_fd()
    }

    /// Completes what the engine finished (status byte, used ring, one interrupt per
    /// queue as the suppression rules allow), then resumes queues that were waiting for
    /// room. Returns how many requests completed.
    pub fn process_completions(&mut self) -> usize {
        let limits = self.limits();
        let Some(ctx) = self.active.as_mut() else {
            // Reset: only orphans can complete, and the engine drops them.
            self.requests.reap_orphans();
            return 0;
        };
        let r = &mut self.requests;
        let mut done = r.reap(ctx);
        // Queues that stopped for lack of room take requests again.
        done += r.resume_starved(ctx, &limits);
        signal_all(ctx);
        done
    }

    /// Replaces the rate limiter's buckets (full, new ones) that `update` names, running or
    /// not, and keeps the others with their tokens (a
    /// [`RateLimiterConfig`](vmkit_virtio::RateLimiterConfig) replaces both):
    /// what Firecracker's `PATCH /drives/{id}` with a `rate_limiter` does. Queues the old
    /// limiter held are served again at once (unless the update keeps both buckets).
    pub fn update_rate_limiter(&mut self, update: impl Into<RateLimiterUpdate>) {
        let update = update.into();
        if update.is_keep() {
            return;
        }
        self.requests.limiter.update(update);
        self.resume_throttled();
    }

    /// The rate limiter (its buckets' levels, whether it holds the queues).
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.requests.limiter
    }

    /// The limiter's timer fired (or it was updated): serves every queue again.
    fn resume_throttled(&mut self) {
        self.requests.limiter.timer_expired();
        let limits = self.limits();
        let Some(ctx) = self.active.as_mut() else {
            return;
        };
        let indices: Vec<u16> = ctx.queues().map(|q| q.index()).collect();
        for q in ctx.queues_mut() {
            q.set_throttled(false);
        }
        for index in indices {
            self.requests.run(ctx, index, &limits);
        }
        signal_all(ctx);
    }

    /// Swaps the image under the device, running or not — what Firecracker's
    /// `PATCH /drives/{id}` with a new `path_on_host` does (to hand a VM a new data image,
    /// say).
    ///
    /// The new image is opened and checked exactly as [`Block::new`] opens the configured
    /// one, with this device's `read_only`, `direct` and block size, and gives the same
    /// [`Error`]s (`NotFound`, `IsDirectory`, `NotAFile`, `NotWritable`, `Empty`,
    /// `SizeNotMultiple`, `DirectUnsupported`, `Open`); on any of them the device is left
    /// as it was, still serving the old image.
    ///
    /// Then, if the device is active, every request in flight on the old image is waited
    /// for and completed into the used rings (as [`VirtioDevice::quiesce`] does), so no
    /// request is served partly from each file. The engine switches to the new image, the
    /// capacity (configuration space offset 0) becomes the new size, and the driver gets a
    /// configuration change interrupt so it rereads it. Requests taken from the rings from
    /// then on go to the new image and are checked against the new capacity (past it:
    /// `IOERR`, as any out-of-range request). The serial, queues and counters stay. Before
    /// activation the image is simply swapped (there is no driver to interrupt).
    ///
    /// The old image is closed: writes the driver completed are in it (in the host's page
    /// cache unless the driver flushed), nothing more is written to it.
    /// [`Error::ReplaceDisk`] is returned, the old image kept, if the engine still had I/O
    /// in flight after the wait (it cannot, short of a broken io_uring instance).
    ///
    /// Blocks the calling thread (holding the device's lock) until the old image's
    /// requests are done.
    pub fn replace_disk(&mut self, source: impl Into<DiskSource>) -> Result<(), Error> {
        // The new image is locked before the old one is let go of (the same file shares
        // the old one's lock).
        let disk = Arc::new(Disk::reopen(
            source.into(),
            DiskOptions {
                read_only: self.requests.read_only,
                direct: self.disk.direct(),
                block_size: self.block_size,
                lock: self.disk.locked(),
            },
            &self.disk,
        )?);
        match self.active.as_mut() {
            Some(ctx) => self.requests.drain(ctx),
            None => self.requests.wait_orphans(),
        }
        let swapped = self.requests.engine.replace_disk(disk.clone());
        if swapped.is_ok() {
            self.requests.capacity = disk.size() / SECTOR_SIZE;
            self.disk = disk;
        }
        let limits = self.limits();
        if let Some(ctx) = self.active.as_mut() {
            if swapped.is_ok() {
                if let Err(e) = ctx.signal_config() {
                    log::warn!("virtio-blk: configuration change interrupt: {e}");
                }
            }
            // The wait made room: queues that had stopped for it take requests again (on
            // the new image).
            self.requests.resume_starved(ctx, &limits);
            signal_all(ctx);
        }
        swapped.map_err(Error::ReplaceDisk)
    }

    fn limits(&self) -> Limits {
        let r = &self.requests;
        Limits {
            capacity: r.capacity,
            seg_max: r.seg_max,
            discard: r.acked & bit(VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: r.acked & bit(VIRTIO_BLK_F_WRITE_ZEROES) != 0,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEGMENTS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEGMENTS,
        }
    }

    fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let r = &self.requests;
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        c[0..8].copy_from_slice(&r.capacity.to_le_bytes());
        // size_max (8) not offered; seg_max:
        c[12..16].copy_from_slice(&r.seg_max.to_le_bytes());
        // geometry (16..20) not offered; blk_size:
        c[20..24].copy_from_slice(&self.block_size.to_le_bytes());
        // topology (24..32) not offered; writeback: 1 when the driver negotiated FLUSH.
        c[32] = u8::from(r.acked & bit(VIRTIO_BLK_F_FLUSH) != 0);
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
}

/// The bytes a request costs in the rate limiter's bandwidth bucket: a read's or a write's
/// data (as Firecracker counts them), and the bytes a `WRITE_ZEROES` covers (where the file
/// system can neither punch nor zero a range the zeros are written: up to 16 ranges of
/// 2 GiB each, which the buckets must bound; one larger than the bucket passes as any
/// oversize request does and leaves a debt). A `DISCARD` costs no bytes: it is a hole punch
/// or nothing, never data written. Firecracker offers neither.
fn data_bytes(kind: &RequestKind) -> u64 {
    match kind {
        RequestKind::In { data, .. } | RequestKind::Out { data, .. } => {
            data.iter().map(|s| u64::from(s.len)).sum()
        }
        // At most 16 ranges of 2^22 sectors: cannot overflow; saturate all the same.
        RequestKind::WriteZeroes { ranges } => ranges
            .iter()
            .fold(0u64, |sum, r| sum.saturating_add(r.bytes().1)),
        _ => 0,
    }
}

/// Interrupts the driver for every queue that used buffers, as its suppression rules allow.
fn signal_all<M: MappedMemory>(ctx: &mut ActivateContext<M>) {
    for q in ctx.queues_mut() {
        // An error leaves the device in DEVICE_NEEDS_RESET, which the queue already set.
        let _ = q.signal_used();
    }
}

impl<M: MappedMemory> Requests<M> {
    /// Whether queue `q` may take another request: the engine has room and the queue
    /// has fewer than its size in flight.
    fn has_room(&self, q: &ActiveQueue<M>) -> bool {
        let in_flight = self.queue_in_flight.get(usize::from(q.index()));
        // After a reset, the requests orphaned in flight must be over before a buffer the
        // re-activated driver offers can be used: one of them could still land in it.
        self.engine.cancelling() == 0
            && self.engine.can_submit()
            && in_flight.is_some_and(|n| *n < u32::from(q.size()))
    }

    fn set_starved(&mut self, index: u16, starved: bool) {
        if let Some(s) = self.starved.get_mut(usize::from(index)) {
            *s = starved;
        }
    }

    fn is_starved(&self, index: u16) -> bool {
        self.starved
            .get(usize::from(index))
            .copied()
            .unwrap_or(false)
    }

    /// Takes and starts requests of queue `index`, submits them as one batch, completes
    /// what finished; again while the queue stopped for room and room was made. The
    /// caller interrupts. Returns requests completed.
    fn run(&mut self, ctx: &mut ActivateContext<M>, index: u16, limits: &Limits) -> usize {
        let mut done = 0;
        loop {
            let Some(q) = ctx.queue_mut(index) else {
                return done;
            };
            self.set_starved(index, false);
            done += self.take_requests(q, limits);
            if self.limiter.is_throttled() {
                // Every queue waits for the limiter's timer, unpolled.
                for q in ctx.queues_mut() {
                    q.set_throttled(true);
                }
            }
            if let Err(e) = self.engine.commit() {
                log::warn!("virtio-blk: submitting I/O: {e}");
            }
            done += self.reap(ctx);
            let room = ctx.queue(index).is_some_and(|q| self.has_room(q));
            if ctx.needs_reset() || !(self.is_starved(index) && room) {
                return done;
            }
        }
    }

    /// Pops and starts requests of `q` while there is room; returns how many were answered
    /// at once. When room runs out the queue is marked starved: completions resume it.
    fn take_requests(&mut self, q: &mut ActiveQueue<M>, limits: &Limits) -> usize {
        let mut done = 0;
        loop {
            // A driver re-offering heads still in flight cannot make us hold more than a
            // queue's worth.
            if !self.has_room(q) {
                self.set_starved(q.index(), true);
                return done;
            }
            if self.limiter.is_throttled() {
                return done;
            }
            let index = q.index();
            let Ok(Some(chain)) = q.pop() else {
                return done;
            };
            let head = chain.head();
            let started = self.start(&chain, index, limits);
            if started == Started::Throttled {
                // Back in the available ring, for when the timer fires.
                q.undo_pop();
                self.metrics.inc(Counter::Throttled);
                return done;
            }
            self.stats.requests += 1;
            self.metrics.inc(Counter::Requests);
            if let Started::Answered(len) = started {
                // An error leaves the device in DEVICE_NEEDS_RESET; `pop` then stops.
                let _ = q.complete(head, len);
                done += 1;
            }
        }
    }

    /// Parses and starts one request, if the rate limiter has the tokens for it.
    fn start(&mut self, chain: &Chain<'_, M>, queue: u16, limits: &Limits) -> Started {
        let mem = chain.memory();
        let answer = |status: GuestAddress, s: u8| -> u32 {
            // The status byte was checked to be device-writable guest memory.
            u32::from(mem.write_obj(s, status).is_ok())
        };
        let Ok(descs) = chain.descriptors() else {
            self.stats.bad_requests += 1;
            return Started::Answered(0);
        };
        let req = match request::parse(mem, descs, limits) {
            Ok(r) => r,
            Err(BadRequest { status, error }) => {
                log::debug!("virtio-blk: bad request: {error}");
                if error.status() == S_UNSUPP {
                    self.stats.unsupported += 1;
                } else {
                    self.stats.bad_requests += 1;
                    self.metrics.inc(Counter::Malformed);
                }
                return Started::Answered(status.map_or(0, |s| answer(s, error.status())));
            }
        };
        // Every request is an operation; reads and writes count their data's bytes.
        if !self.limiter.consume(data_bytes(&req.kind), 1) {
            return Started::Throttled;
        }
        let status = req.status;
        if req.is_write() && self.read_only {
            self.stats.read_only_refusals += 1;
            return Started::Answered(answer(status, S_IOERR));
        }
        let ok_len = req.data_written_len().saturating_add(1);
        let writethrough = self.acked & bit(VIRTIO_BLK_F_FLUSH) == 0;
        let (op, kind, bytes, filled) = match req.kind {
            RequestKind::In { sector, data } => {
                let bytes = data.iter().map(|s| u64::from(s.len)).sum();
                let offset = sector * SECTOR_SIZE;
                let filled = data.clone();
                (BlockOp::Read { offset, data }, Op::Read, bytes, filled)
            }
            RequestKind::Out { sector, data } => {
                let bytes = data.iter().map(|s| u64::from(s.len)).sum();
                let offset = sector * SECTOR_SIZE;
                let op = BlockOp::Write {
                    offset,
                    data,
                    sync: writethrough,
                };
                (op, Op::Write, bytes, Vec::new())
            }
            RequestKind::Flush => (BlockOp::Flush, Op::Flush, 0, Vec::new()),
            RequestKind::GetId { data } => {
                if request::scatter(mem, &data, &self.serial).is_err() {
                    return Started::Answered(answer(status, S_IOERR));
                }
                self.stats.get_ids += 1;
                let written = answer(status, S_OK);
                return Started::Answered(if written == 1 { ok_len } else { 0 });
            }
            RequestKind::Discard { ranges } => {
                let ranges = ranges.iter().map(|r| r.bytes()).collect();
                (BlockOp::Discard { ranges }, Op::Discard, 0, Vec::new())
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
                (op, Op::WriteZeroes, 0, Vec::new())
            }
            RequestKind::Unsupported { .. } => {
                self.stats.unsupported += 1;
                return Started::Answered(answer(status, S_UNSUPP));
            }
        };
        let pending = Pending {
            queue,
            head: chain.head(),
            status,
            ok_len,
            op: kind,
            bytes,
            filled,
        };
        match self.submit(mem, op, pending) {
            Some(len) => Started::Answered(len),
            None => Started::InFlight,
        }
    }

    /// Hands `op` to the engine: `Some(used length)` when it finished at once.
    fn submit(&mut self, mem: &M, op: BlockOp, pending: Pending) -> Option<u32> {
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
                Some(self.finish(mem, &pending, result))
            }
            None => {
                if let Some(n) = self.queue_in_flight.get_mut(usize::from(pending.queue)) {
                    *n += 1;
                }
                self.pending[slot] = Some(pending);
                let n = self.engine.in_flight() as u64;
                self.stats.max_in_flight = self.stats.max_in_flight.max(n);
                None
            }
        }
    }

    /// Writes the status of a finished request (and marks what a read filled dirty);
    /// returns its used length.
    fn finish(&mut self, mem: &M, p: &Pending, result: io::Result<()>) -> u32 {
        let (status, len) = match result {
            Ok(()) => {
                let s = &mut self.stats;
                match p.op {
                    Op::Read => {
                        mark_dirty(mem, &p.filled);
                        s.reads += 1;
                        s.bytes_read += p.bytes;
                        self.metrics.inc(Counter::ReadOps);
                        self.metrics.add(Counter::ReadBytes, p.bytes);
                    }
                    Op::Write => {
                        s.writes += 1;
                        s.bytes_written += p.bytes;
                        self.metrics.inc(Counter::WriteOps);
                        self.metrics.add(Counter::WriteBytes, p.bytes);
                    }
                    Op::Flush => {
                        s.flushes += 1;
                        self.metrics.inc(Counter::Flushes);
                    }
                    Op::Discard => s.discards += 1,
                    Op::WriteZeroes => s.write_zeroes += 1,
                }
                (S_OK, p.ok_len)
            }
            Err(e) => {
                log::warn!("virtio-blk: {:?} failed: {e}", p.op);
                self.stats.io_errors += 1;
                self.metrics.inc(Counter::Errors);
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
    fn reap(&mut self, ctx: &mut ActivateContext<M>) -> usize {
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
            if let Some(n) = self.queue_in_flight.get_mut(usize::from(p.queue)) {
                *n = n.saturating_sub(1);
            }
            let Some(q) = ctx.queue_mut(p.queue) else {
                continue;
            };
            let len = self.finish(q.memory(), &p, c.result);
            // An error leaves the device in DEVICE_NEEDS_RESET; later completes do nothing.
            let _ = q.complete(p.head, len);
        }
        self.completions = completions;
        n
    }

    /// Waits for everything in flight and completes it into the used rings (the caller
    /// interrupts); takes no new request.
    fn drain(&mut self, ctx: &mut ActivateContext<M>) {
        self.reap(ctx);
        while self.engine.in_flight() > 0 || self.engine.cancelling() > 0 {
            if let Some(fd) = self.engine.completion_fd() {
                let _ = fd.read();
                wait_readable(fd, 10);
            }
            self.reap(ctx);
        }
    }

    /// Reaps while not active: everything in flight is an orphan of the reset, whose
    /// completion the engine drops (nothing here touches a ring).
    fn reap_orphans(&mut self) {
        self.engine.reap(&mut self.completions);
        debug_assert!(self.completions.is_empty(), "only orphans are in flight");
        self.completions.clear();
    }

    /// Waits, while not active, until the orphans of the reset are over.
    fn wait_orphans(&mut self) {
        self.reap_orphans();
        while self.engine.in_flight() > 0 || self.engine.cancelling() > 0 {
            if let Some(fd) = self.engine.completion_fd() {
                let _ = fd.read();
                wait_readable(fd, 10);
            }
            self.reap_orphans();
        }
    }

    /// Runs the queues that stopped for lack of room and have room again; returns requests
    /// completed (the caller interrupts).
    fn resume_starved(&mut self, ctx: &mut ActivateContext<M>, limits: &Limits) -> usize {
        let mut done = 0;
        for qi in 0..self.starved.len() {
            let index = qi as u16;
            if self.is_starved(index) && ctx.queue(index).is_some_and(|q| self.has_room(q)) {
                done += self.run(ctx, index, limits);
            }
        }
        done
    }
}

impl<M: MappedMemory> VirtioDevice<M> for Block<M> {
    fn device_type(&self) -> u32 {
        BLOCK_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        let mut f =
            bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_FLUSH);
        if self.requests.read_only {
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
        self.requests.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        vmkit_virtio::read_config_space(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing is writable (`writeback` needs CONFIG_WCE, not offered).
    }

    fn activate(&mut self, mut context: ActivateContext<M>) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if context.queues().next().is_none() {
            return Err(ActivateError::MissingQueue(0));
        }
        let throttled = self.requests.limiter.is_throttled();
        for q in context.queues_mut() {
            q.set_poll(self.poll);
            q.set_metrics(self.requests.metrics.clone());
            q.set_throttled(throttled);
        }
        self.requests.engine.attach(context.memory().clone());
        self.active = Some(context);
        if std::mem::take(&mut self.restored) {
            let (limits, queues) = (self.limits(), self.queue_count());
            if let Some(ctx) = self.active.as_mut() {
                for index in 0..queues {
                    self.requests.run(ctx, index, &limits);
                }
                signal_all(ctx);
            }
        }
        Ok(())
    }

    fn process_queue(&mut self, index: u16) {
        self.requests.metrics.inc(Counter::Notifications);
        let limits = self.limits();
        let Some(ctx) = self.active.as_mut() else {
            return;
        };
        self.requests.run(ctx, index, &limits);
        signal_all(ctx);
    }

    fn device_events(&self) -> io::Result<Vec<(u16, EventFd)>> {
        match self.requests.engine.completion_fd() {
            Some(fd) => Ok(vec![(COMPLETION_EVENT, fd.try_clone()?)]),
            None => Ok(Vec::new()),
        }
    }

    fn readable_fds(&self) -> io::Result<Vec<(u16, std::os::fd::OwnedFd)>> {
        Ok(vec![(LIMITER_EVENT, self.requests.limiter.timer_fd()?)])
    }

    fn process_device_event(&mut self, token: u16) {
        match token {
            COMPLETION_EVENT => {
                self.process_completions();
            }
            LIMITER_EVENT => self.resume_throttled(),
            _ => {}
        }
    }

    fn quiesce(&mut self) {
        let Some(ctx) = self.active.as_mut() else {
            // Orphans of a reset may still write guest memory: a pause waits for them too.
            self.requests.wait_orphans();
            return;
        };
        // Completions of what is in flight go to the used rings; no new request is taken.
        self.requests.drain(ctx);
        signal_all(ctx);
    }

    fn reset(&mut self) -> Option<ActivateContext<M>> {
        // Returns at once (the vCPU that wrote status 0 holds the device's lock): what is
        // in flight is orphaned in the engine, which drops its completions when the device
        // thread reaps them (`process_completions`), so no status byte or used ring is
        // written after this. A re-activation is accepted meanwhile, but its queues take no
        // request until the orphans are over (`has_room`).
        let r = &mut self.requests;
        r.engine.detach();
        r.completions.clear();
        r.pending.clear();
        r.free.clear();
        r.queue_in_flight.fill(0);
        r.starved.fill(false);
        r.acked = 0;
        self.restored = false;
        self.active.take()
    }
}

/// Waits up to `ms` milliseconds for `fd` to become readable.
fn wait_readable(fd: &EventFd, ms: i32) {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}
