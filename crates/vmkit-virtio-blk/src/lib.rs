//! virtio-blk (virtio 1.2 §5.2, device ID 2) for [vmkit-virtio] transports, on a raw image
//! file or block device, with two engines behind one trait:
//!
//! | piece | what it is |
//! |---|---|
//! | [`Block`] | the device: features, config space, request dispatch, completions, interrupts; [`Block::replace_disk`] swaps the image under a running device |
//! | [`BlockConfig`] | image (path or opened [`File`]), `read_only`, `direct`, [`EngineKind`], serial, queues, queue size, block size |
//! | [`request`] | the request parser: a descriptor chain in, a checked [`Request`](request::Request) or the status to answer out |
//! | [`Disk`] | the opened, validated image both engines work on |
//! | [`BlockState`] | snapshot/restore: [`Block::state`] and [`Block::restore`] (capacity, read-only, block size, queues checked; serial restored) |
//! | [`BlockEngine`] | the backend trait; [`SyncEngine`] (`preadv`/`pwritev`) and [`IoUringEngine`] (io_uring, completions on an eventfd) |
//!
//! Features offered: `SEG_MAX`, `BLK_SIZE`, `FLUSH`, `RO` (read-only disks), `DISCARD`
//! and `WRITE_ZEROES` (writable disks), `MQ` (more than one queue), and from the
//! transport `VERSION_1`, `RING_INDIRECT_DESC`, `RING_EVENT_IDX`. `GET_ID` returns the
//! configured serial.
//!
//! Durability: a write completes only once the engine reports it done; FLUSH completes
//! only after `fdatasync` returned; a driver that did not negotiate `FLUSH` gets
//! write-through (each write is followed by `fdatasync` before it completes).
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_virtio::{MmioTransport, VirtioDevice};
//! use vmkit_virtio_blk::{Block, BlockConfig, EngineKind};
//! # use vm_memory::{GuestAddress, GuestMemoryMmap};
//! # let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! # let line = Arc::new(vmkit_irq::CountingLine::new());
//! # let dir = std::env::temp_dir().join(format!("vmkit-blk-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let image = dir.join("disk.img");
//! std::fs::File::create(&image)?.set_len(4 << 20)?; // a 4 MiB raw image
//!
//! let mut config = BlockConfig::new(&image);
//! config.engine = EngineKind::IoUring;
//! config.serial = "vmkit-disk-0".into();
//! let disk = Arc::new(Mutex::new(Block::new(config)?));
//! assert_eq!(disk.lock().unwrap().capacity(), 8192); // 512-byte sectors
//!
//! let transport = MmioTransport::new(disk.clone(), memory, line)?;
//! // The VMM registers the transport on its MMIO bus, the QueueNotify ioeventfds, and adds
//! // the queue event handler to its event manager: the handler also watches the device's
//! // io_uring completion eventfd (VirtioDevice::device_events), so completions are
//! // processed by the same event loop.
//! let _handler = transport.queue_event_handler()?;
//! assert_eq!(disk.lock().unwrap().device_events()?.len(), 1);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [vmkit-virtio]: https://crates.io/crates/vmkit-virtio
#![deny(missing_docs)]

mod device;
mod disk;
pub mod engine;
pub mod request;
mod state;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmkit_virtio::{DeviceMetrics, NoMetrics, RateLimiterConfig};

pub use device::{Block, BlockStats, CONFIG_SPACE_SIZE};
pub use disk::{Disk, DiskOptions, DEFAULT_DIRECT_ALIGN};
pub use engine::{
    BlockEngine, BlockOp, Completion, IoObserver, IoUringEngine, NoObserver, SyncEngine,
};
pub use state::BlockState;

/// The virtio device ID of a block device.
pub const BLOCK_DEVICE_TYPE: u32 = 2;
/// The default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// The most queues a device can have.
pub const MAX_QUEUES: u16 = 256;
/// The longest polling window [`BlockConfig::poll_us`] takes, in microseconds (a millisecond
/// of spinning per notification is already more than any measured gain asks for).
pub const MAX_POLL_US: u32 = 1000;
/// The most sectors one discard or write-zeroes segment may cover (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// The most segments one discard or write-zeroes request may carry.
pub const MAX_DISCARD_SEGMENTS: u32 = 16;

/// Where the image is.
#[derive(Clone, Debug)]
pub enum DiskSource {
    /// A path, opened read-write (read-only with `read_only`).
    Path(PathBuf),
    /// A file the VMM opened (its access mode must allow writing unless `read_only`),
    /// shared so that a configuration can be cloned: the device duplicates the descriptor if
    /// the configuration still holds it.
    File(Arc<File>),
}

impl From<PathBuf> for DiskSource {
    fn from(p: PathBuf) -> Self {
        DiskSource::Path(p)
    }
}

impl From<&Path> for DiskSource {
    fn from(p: &Path) -> Self {
        DiskSource::Path(p.to_path_buf())
    }
}

impl From<&PathBuf> for DiskSource {
    fn from(p: &PathBuf) -> Self {
        DiskSource::Path(p.clone())
    }
}

impl From<&str> for DiskSource {
    fn from(p: &str) -> Self {
        DiskSource::Path(PathBuf::from(p))
    }
}

impl From<File> for DiskSource {
    fn from(f: File) -> Self {
        DiskSource::File(Arc::new(f))
    }
}

/// Which engine serves the requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineKind {
    /// `preadv`/`pwritev` on the event thread ([`SyncEngine`]).
    #[default]
    Sync,
    /// io_uring, many requests in flight ([`IoUringEngine`]).
    IoUring,
}

/// Configuration of a [`Block`] device.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    /// The image.
    pub source: DiskSource,
    /// Open read-only and offer `VIRTIO_BLK_F_RO` (writes answer `IOERR`).
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`) for requests whose buffers are aligned.
    pub direct: bool,
    /// Take an advisory lock on the image (shared when `read_only`, exclusive otherwise),
    /// so a second VM on it fails to open it ([`Error::Locked`]); on by default.
    pub lock: bool,
    /// The engine.
    pub engine: EngineKind,
    /// The ID `GET_ID` returns: at most 20 bytes, zero-padded.
    pub serial: String,
    /// Request queues (`MQ` when more than 1); the VMM's default is one per vCPU.
    pub queues: u16,
    /// The size of each queue (a power of two, 4 to 32768); `seg_max` is 2 less.
    pub queue_size: u16,
    /// The logical block size offered with `BLK_SIZE` (a power of two, 512 to 4096); the
    /// image size must be a multiple of it.
    pub block_size: u32,
    /// After serving a queue, keep watching its available ring for this long with the
    /// driver's notifications suppressed, so a driver that submits again soon does so
    /// without a VM exit (0: off). Costs the event thread that much spinning per kick.
    pub poll_us: u32,
    /// Where the device counts (default [`NoMetrics`]); see the
    /// crate's README for what each [`Counter`](vmkit_virtio::Counter) means here.
    pub metrics: Arc<dyn DeviceMetrics>,
    /// What the engine reports as each request's transfer and sync finish (default
    /// [`NoObserver`]): a seam for tracing and for the durability tests.
    pub observer: Arc<dyn IoObserver>,
    /// Firecracker's `rate_limiter`: bytes of `IN`/`OUT` data and of the ranges a
    /// `WRITE_ZEROES` covers, and requests (every request is an operation, a `FLUSH` and a
    /// `DISCARD` included; a `DISCARD` costs no bytes). Default:
    /// none; [`Block::update_rate_limiter`] changes it at run time.
    pub rate_limiter: RateLimiterConfig,
}

impl BlockConfig {
    /// A writable, buffered, synchronous, single-queue disk on `source`, with an empty
    /// serial and 512-byte blocks.
    pub fn new(source: impl Into<DiskSource>) -> Self {
        Self {
            source: source.into(),
            read_only: false,
            direct: false,
            lock: true,
            engine: EngineKind::Sync,
            serial: String::new(),
            queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            block_size: 512,
            poll_us: 0,
            metrics: Arc::new(NoMetrics),
            observer: Arc::new(NoObserver),
            rate_limiter: RateLimiterConfig::default(),
        }
    }

    /// Counts into `metrics` (an [`AtomicMetrics`](vmkit_virtio::AtomicMetrics) the VMM
    /// keeps a clone of, say).
    pub fn with_metrics(mut self, metrics: Arc<dyn DeviceMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Checks the settings against this crate's limits, without touching the image: 1 to
    /// [`MAX_QUEUES`] queues, a queue size that is a power of two in 4..=32768, a block
    /// size that is a power of two in 512..=4096, a serial of at most 20 bytes, polling of
    /// at most [`MAX_POLL_US`]. [`Block::new`] checks the same; a VMM calls this when it
    /// parses its configuration, to report a bad value before anything is opened.
    pub fn check(&self) -> Result<(), Error> {
        if self.queues == 0 || self.queues > MAX_QUEUES {
            return Err(Error::InvalidQueues(self.queues));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < 4 {
            return Err(Error::InvalidQueueSize(self.queue_size));
        }
        if !self.block_size.is_power_of_two() || !(512..=4096).contains(&self.block_size) {
            return Err(Error::InvalidBlockSize(self.block_size));
        }
        if self.serial.len() > request::ID_BYTES {
            return Err(Error::SerialTooLong(self.serial.len()));
        }
        if self.poll_us > MAX_POLL_US {
            return Err(Error::InvalidPoll(self.poll_us));
        }
        Ok(())
    }
}

/// Errors of [`Block::new`] and [`Block::replace_disk`]: a disk that cannot be used, each a
/// clear error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image does not exist.
    #[error("disk image {0}: no such file")]
    NotFound(PathBuf),
    /// The image is a directory.
    #[error("disk image {0} is a directory")]
    IsDirectory(PathBuf),
    /// The image is neither a regular file nor a block device.
    #[error("disk image {0} is not a regular file or block device")]
    NotAFile(PathBuf),
    /// The image cannot be opened for writing and `read_only` is off.
    #[error("disk image {path} is not writable (use read-only): {source}")]
    NotWritable {
        /// The image.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The image cannot be opened or examined.
    #[error("disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The image is empty.
    #[error("disk image {0} is empty")]
    Empty(PathBuf),
    /// The image size is not a multiple of the block size (512 bytes or more).
    #[error(
        "disk image {path}: size {size} is not a multiple of the {block_size}-byte block size"
    )]
    SizeNotMultiple {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The block size.
        block_size: u32,
    },
    /// Another open image (of this process or another: a second VM on it, say) holds an
    /// incompatible advisory lock on it: an exclusive one, or a shared one while this
    /// image is to be written.
    #[error("disk image {0} is in use by another process (locked)")]
    Locked(PathBuf),
    /// The advisory lock could not be taken for another reason (a file system without
    /// locks: `lock` off skips it).
    #[error("disk image {path}: cannot lock it: {source}")]
    Lock {
        /// The image.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// `direct` was asked for but the file system refuses `O_DIRECT`.
    #[error("disk image {path}: O_DIRECT not supported here: {source}")]
    DirectUnsupported {
        /// The image.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A block size that is not a power of two in 512..=4096.
    #[error("block size {0} is not a power of two in 512..=4096")]
    InvalidBlockSize(u32),
    /// A queue count of 0 or above [`MAX_QUEUES`].
    #[error("{0} queues; 1 to 256 allowed")]
    InvalidQueues(u16),
    /// A queue size that is not a power of two in 4..=32768.
    #[error("queue size {0} is not a power of two in 4..=32768")]
    InvalidQueueSize(u16),
    /// A serial longer than 20 bytes.
    #[error("serial of {0} bytes; at most 20")]
    SerialTooLong(usize),
    /// A polling window above [`MAX_POLL_US`].
    #[error("poll_us={0}: at most {MAX_POLL_US} microseconds")]
    InvalidPoll(u32),
    /// The io_uring instance (or its eventfd) could not be set up.
    #[error("failed to set up io_uring: {0}")]
    IoUring(#[source] io::Error),
    /// The rate limiter's timerfd could not be created.
    #[error("failed to set up the rate limiter: {0}")]
    RateLimiter(#[source] io::Error),
    /// [`Block::replace_disk`]: the engine could not be switched to the new image (it still
    /// had I/O in flight after the device waited for it); the old image is still served.
    #[error("failed to switch the engine to the new disk image: {0}")]
    ReplaceDisk(#[source] io::Error),
    /// [`Block::restore`]: the image has another capacity than the one the guest saw.
    #[error("restored disk image has {image} sectors; the snapshot's had {saved}")]
    StateCapacity {
        /// The capacity in the snapshot, in sectors.
        saved: u64,
        /// The capacity of the image the device was built on, in sectors.
        image: u64,
    },
    /// [`Block::restore`]: the snapshot's device was read-only and this one is not, or the
    /// other way round.
    #[error("the snapshot's disk was {} the restored one is {}", if *saved { "read-only;" } else { "writable;" }, if *saved { "not" } else { "read-only" })]
    StateReadOnly {
        /// Whether the snapshot's device was read-only.
        saved: bool,
    },
    /// [`Block::restore`]: a device parameter differs from the snapshot's.
    #[error("{what} {saved} in the snapshot; the restored device has {device}")]
    StateMismatch {
        /// The parameter.
        what: &'static str,
        /// Its value in the snapshot.
        saved: u64,
        /// Its value in the device built for the restore.
        device: u64,
    },
}
