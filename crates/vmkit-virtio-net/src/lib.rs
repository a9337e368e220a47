//! virtio-net (virtio 1.2 §5.1) for [vmkit-virtio] transports, on a Linux TAP or any
//! [`NetBackend`]: the guest's frames go through the host's own network stack, and the
//! device adds as little as it can on the way.
//!
//! - device ID 1; one receive and one transmit queue per queue pair, then the control
//!   queue; 256 entries each by default;
//! - features: `VERSION_1`, `MAC` and `MTU` (when configured), `STATUS` (link up), `CSUM`,
//!   `HOST_TSO4`/`TSO6`/`UFO`, `GUEST_CSUM`/`TSO4`/`TSO6`/`UFO` (as far as the backend can:
//!   [`Tap`] probes the kernel), `MRG_RXBUF`, `CTRL_VQ`, `CTRL_RX` (promiscuous,
//!   all-multicast, MAC filter tables), `MQ` (with more than one backend), and the ring
//!   features `EVENT_IDX` and `INDIRECT_DESC`;
//! - **transmit**: each chain's 12-byte header is copied to the stack and checked against
//!   the negotiated features ([`NetHeader::check_tx`]), then header and payload go to the
//!   backend in one `writev`, the payload straight from guest memory: no allocation, no
//!   copy; a malformed chain (device-writable buffer, no header, more than
//!   [`MAX_FRAME_LEN`], a header asking for what was not negotiated) is dropped and counted
//!   in [`NetStats`], and the device goes on;
//! - **receive**: the device holds the guest's receive chains until they can take the
//!   largest frame the features allow, then `readv`s one frame straight into them (with
//!   `MRG_RXBUF` across several chains, `num_buffers` set); when the guest has no buffers
//!   the device stops reading the backend and waits for the driver's next notification; the
//!   backend's fd is watched edge-triggered (through
//!   [`VirtioDevice::readable_fds`](vmkit_virtio::VirtioDevice::readable_fds)), and the
//!   device reads until it would block;
//! - **control queue**: [`RxFilter`] (promiscuous until the driver says otherwise, as QEMU
//!   does), `VQ_PAIRS_SET`; malformed or unknown commands answer `VIRTIO_NET_ERR`;
//! - **snapshot/restore**: `quiesce` gives held receive chains back empty; [`Net::state`]
//!   saves MAC, MTU, queue pairs and the receive filter ([`NetState`]); [`Net::restore`]
//!   puts them into a device built on the same or other backends.
//!
//! Guest memory is written only through the device-writable buffers of receive and control
//! chains the queue checked; pages the kernel wrote through `readv` are marked dirty.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_virtio::{MmioTransport, VirtioDevice};
//! use vmkit_virtio_net::{Net, NetBackend, NetConfig, Tap};
//! # use vm_memory::{GuestAddress, GuestMemoryMmap};
//! # let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! # let line = Arc::new(vmkit_irq::CountingLine::new());
//!
//! // A TAP the operator created (`ip tuntap add vmtap0 mode tap vnet_hdr`), if there is one.
//! let backends: Vec<Box<dyn NetBackend>> = match Tap::open("vmtap0") {
//!     Ok(tap) => vec![Box::new(tap)],
//!     Err(e) => {
//!         eprintln!("{e}"); // "TAP interface vmtap0 does not exist", say
//!         return Ok(());
//!     }
//! };
//! let mut config = NetConfig::new(backends);
//! config.mac = Some([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
//! let net = Arc::new(Mutex::new(Net::new(config)?));
//! let transport = MmioTransport::new(net.clone(), memory, line)?;
//! assert_eq!(net.lock().unwrap().device_type(), 1);
//! // The queue event handler also watches the TAP (readable_fds):
//! let _handler = transport.queue_event_handler()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [vmkit-virtio]: https://crates.io/crates/vmkit-virtio
#![deny(missing_docs)]

use std::sync::Arc;

use vmkit_virtio::{Counter, DeviceMetrics, NoMetrics, RateLimiterConfig};

mod backend;
pub mod ctrl;
mod device;
mod features;
mod header;
mod rx;
mod state;
mod tx;

pub use backend::{NetBackend, Tap};
pub use ctrl::RxFilter;
pub use device::{Net, CONFIG_SPACE_SIZE, NET_DEVICE_TYPE};
pub use features::*;
pub use header::*;
pub use state::NetState;
pub use tx::MAX_FRAME_LEN;

/// The default size of each queue.
pub const NET_QUEUE_SIZE: u16 = 256;
/// The longest transmit polling window [`NetConfig::poll_us`] takes (a millisecond).
pub const MAX_POLL_US: u32 = 1000;

/// Errors of the TAP backend and of [`Net::new`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a usable interface name (empty, 16 bytes or more, or with `/`, space or NUL).
    #[error("'{0}' is not a valid interface name")]
    TapName(String),
    /// No interface of that name (vmkit opens TAPs, it does not create them).
    #[error(
        "TAP interface {0} does not exist (create it with `ip tuntap add {0} mode tap vnet_hdr`)"
    )]
    NoSuchTap(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] std::io::Error),
    /// An ioctl on the TAP failed (`EPERM`: no permission; `EINVAL`/`EBUSY`: not a TAP, or
    /// its flags differ, e.g. not multi-queue).
    #[error("TAP {name}: {what} failed: {source}")]
    Tap {
        /// The interface (or fd).
        name: String,
        /// The failed operation.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// An fd handed over is a TAP opened without `IFF_VNET_HDR | IFF_NO_PI`.
    #[error("TAP {0} was not opened with IFF_VNET_HDR and IFF_NO_PI")]
    NotVnetTap(String),
    /// A queue-pair count of 0 or more than 0x8000.
    #[error("{0} queue pairs: must be 1 to 32768")]
    Queues(u16),
    /// A queue size that is not a power of two up to 32768.
    #[error("queue size {0} is not a power of two up to 32768")]
    QueueSize(u16),
    /// An MTU below IPv4's minimum of 68.
    #[error("MTU {0} is below 68")]
    Mtu(u16),
    /// A polling window above [`MAX_POLL_US`].
    #[error("poll_us={0}: at most {MAX_POLL_US} microseconds")]
    Poll(u32),
    /// A rate limiter's timerfd could not be created.
    #[error("failed to set up a rate limiter: {0}")]
    RateLimiter(#[source] std::io::Error),
    /// [`Net::restore`]: a saved state that is out of range or does not fit this device.
    #[error("invalid virtio-net state: {0}")]
    State(String),
}

/// Configuration of a [`Net`].
#[derive(Debug)]
pub struct NetConfig {
    /// One backend per queue pair (one [`Tap`] queue each, from [`Tap::open_queues`]).
    pub backends: Vec<Box<dyn NetBackend>>,
    /// The MAC the guest gets (`VIRTIO_NET_F_MAC`); `None`: the driver picks one.
    pub mac: Option<[u8; 6]>,
    /// The MTU the guest is told (`VIRTIO_NET_F_MTU`); `None`: not offered (1500 assumed).
    pub mtu: Option<u16>,
    /// The maximum size of each queue.
    pub queue_size: u16,
    /// After a transmit notification, keep watching the transmit ring this long (µs, at
    /// most [`MAX_POLL_US`]) with the driver's notifications suppressed, so a guest sending
    /// again soon does so without a VM exit (vmkit-virtio's queue polling); 0: no polling.
    pub poll_us: u32,
    /// Where the device counts (default [`NoMetrics`]); the crate's README says what each
    /// [`Counter`] means here.
    pub metrics: Arc<dyn DeviceMetrics>,
    /// Firecracker's `rx_rate_limiter`: bytes (frame, header not counted) and frames
    /// received. Default: none.
    pub rx_rate_limiter: RateLimiterConfig,
    /// Firecracker's `tx_rate_limiter`: bytes (frame, header not counted) and frames sent.
    /// Default: none.
    pub tx_rate_limiter: RateLimiterConfig,
}

impl NetConfig {
    /// A configuration over `backends`, without MAC or MTU, with 256-entry queues.
    pub fn new(backends: Vec<Box<dyn NetBackend>>) -> Self {
        Self {
            backends,
            mac: None,
            mtu: None,
            queue_size: NET_QUEUE_SIZE,
            poll_us: 0,
            metrics: Arc::new(NoMetrics),
            rx_rate_limiter: RateLimiterConfig::default(),
            tx_rate_limiter: RateLimiterConfig::default(),
        }
    }

    /// Counts into `metrics` (an [`AtomicMetrics`](vmkit_virtio::AtomicMetrics) the VMM
    /// keeps a clone of, say).
    pub fn with_metrics(mut self, metrics: Arc<dyn DeviceMetrics>) -> Self {
        self.metrics = metrics;
        self
    }
}

/// Counters of a [`Net`], over all queue pairs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames sent to the backend.
    pub tx_frames: u64,
    /// Their bytes (headers not counted).
    pub tx_bytes: u64,
    /// Transmit chains dropped as malformed: loops, bad indices, buffers outside memory,
    /// device-writable buffers.
    pub tx_malformed: u64,
    /// Transmit chains too short for a header or longer than [`MAX_FRAME_LEN`] plus one.
    pub tx_bad_length: u64,
    /// Frames dropped for their header ([`HeaderError`]).
    pub tx_bad_header: u64,
    /// Frames the backend refused.
    pub tx_backend_errors: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes (headers not counted).
    pub rx_bytes: u64,
    /// Receive chains those frames took.
    pub rx_buffers: u64,
    /// Receive chains returned unused: malformed, with a device-readable buffer, or shorter
    /// than a header.
    pub rx_bad_chains: u64,
    /// Frames the receive filter dropped.
    pub rx_filtered: u64,
    /// Reads the backend failed.
    pub rx_backend_errors: u64,
    /// Times reception stopped for lack of guest buffers.
    pub rx_waits: u64,
    /// Control commands run.
    pub ctrl_commands: u64,
    /// Control commands refused (or chains unusable).
    pub ctrl_refused: u64,
}

impl NetStats {
    /// Adds to `metrics` what changed since `before`; `queue_refused` chains of those the
    /// queue already counted as malformed. Once per batch: nothing per frame.
    fn publish(&self, before: &NetStats, queue_refused: u64, metrics: &dyn DeviceMetrics) {
        let d = |now: u64, then: u64| now.wrapping_sub(then);
        let tx_frames = d(self.tx_frames, before.tx_frames);
        let tx_malformed = d(self.tx_malformed, before.tx_malformed)
            + d(self.tx_bad_length, before.tx_bad_length)
            + d(self.tx_bad_header, before.tx_bad_header);
        let tx_errors = d(self.tx_backend_errors, before.tx_backend_errors);
        let rx_buffers = d(self.rx_buffers, before.rx_buffers);
        let rx_bad = d(self.rx_bad_chains, before.rx_bad_chains);
        let counts = [
            (
                Counter::Requests,
                tx_frames + tx_malformed + tx_errors + rx_buffers + rx_bad,
            ),
            (Counter::WriteOps, tx_frames),
            (Counter::WriteBytes, d(self.tx_bytes, before.tx_bytes)),
            (Counter::ReadOps, d(self.rx_frames, before.rx_frames)),
            (Counter::ReadBytes, d(self.rx_bytes, before.rx_bytes)),
            (
                Counter::Errors,
                tx_errors + d(self.rx_backend_errors, before.rx_backend_errors),
            ),
            (
                Counter::Malformed,
                (tx_malformed + rx_bad).saturating_sub(queue_refused),
            ),
            (Counter::Dropped, d(self.rx_filtered, before.rx_filtered)),
        ];
        for (counter, n) in counts {
            if n > 0 {
                metrics.add(counter, n);
            }
        }
    }

    fn count_tx(&mut self, result: Result<usize, tx::TxDrop>) {
        match result {
            Ok(len) => {
                self.tx_frames += 1;
                self.tx_bytes += len as u64;
            }
            Err(tx::TxDrop::Malformed) => self.tx_malformed += 1,
            Err(tx::TxDrop::TooShort(_) | tx::TxDrop::TooLarge(_)) => self.tx_bad_length += 1,
            Err(tx::TxDrop::Header(e)) => {
                log::debug!("virtio-net: transmit dropped: {e}");
                self.tx_bad_header += 1;
            }
            Err(tx::TxDrop::Backend(e)) => {
                log::debug!("virtio-net: transmit failed: {e}");
                self.tx_backend_errors += 1;
            }
        }
    }
}
