//! virtio-vsock (virtio 1.2 §5.10) for [vmkit-virtio] transports, with the host side
//! Firecracker calls "hybrid vsock": guest sockets meet host programs on Unix domain
//! sockets, so no vhost-vsock module and no host `AF_VSOCK` are needed, and every tool
//! written for Firecracker's convention works as is.
//!
//! - **Guest to host**: a guest connecting to CID 2 (the host), port *P*, is connected to
//!   the Unix socket `PATH_P` (the configured path, `_`, the port) if something listens
//!   there; else it gets a reset (`ECONNRESET`).
//! - **Host to guest**: a host program connects to `PATH`, writes `CONNECT <port>\n`, and,
//!   once the guest's listener on that port accepted, reads `OK <hostport>\n`; the socket is
//!   then a byte stream to the guest. If the guest refuses, or does not answer within
//!   [`VsockConfig::connect_timeout`], the socket is closed.
//! - **Packets** are parsed with the rust-vmm [`virtio-vsock`](virtio_vsock) crate (header
//!   read once from guest memory, payload accessed in place); descriptor chains are checked
//!   by vmkit-virtio's queue first. Payloads move between guest memory and the host sockets
//!   without an intermediate copy, except bytes the host socket could not take at once.
//! - **Credit** (§5.10.6.3): each connection advertises [`VsockConfig::buf_alloc`] bytes;
//!   the device sends the guest no more than the guest's advertised credit (it stops reading
//!   the host socket instead, so the host program's writes block), and a guest that sends
//!   past the credit it was given is reset. So per connection the device holds at most
//!   `buf_alloc` bytes, and it holds at most [`VsockConfig::max_connections`] connections:
//!   the host memory a guest can make the device use is bounded.
//! - **Shutdown** in each direction is passed on (`shutdown(2)` of the host socket's write
//!   side, end of file to the guest), a connection ends with a reset once both sides are
//!   done, and unknown ports, refused connections, malformed or out-of-credit packets get
//!   resets. [`Vsock::transport_reset`] sends the event queue's transport-reset event.
//! - **Snapshot/restore**: [`Vsock::state`] saves the guest CID ([`VsockState`]);
//!   [`Vsock::restore`] on a freshly built device makes its next activation forget every
//!   connection and send `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, as Firecracker does.
//!
//! The host sockets are watched by an epoll instance of the device's own, whose fd the
//! transport's event handler watches (through
//! [`VirtioDevice::readable_fds`](vmkit_virtio::VirtioDevice::readable_fds)): everything
//! runs on the VMM's event thread, nothing blocks it (connects to `PATH_P` are
//! non-blocking). Writes to a host socket whose peer has gone raise `SIGPIPE`: the process
//! must ignore it, as Rust programs do by default.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_virtio::{MmioTransport, VirtioDevice};
//! use vmkit_virtio_vsock::{Vsock, VsockConfig};
//! # use vm_memory::{GuestAddress, GuestMemoryMmap};
//! # let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! # let line = Arc::new(vmkit_irq::CountingLine::new());
//! let dir = std::env::temp_dir().join(format!("vmkit-vsock-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//!
//! // Guest CID 3; host programs connect to v.sock, guest connections to port P go to v.sock_P.
//! let vsock = Vsock::new(VsockConfig::new(3, dir.join("v.sock")))?;
//! let vsock = Arc::new(Mutex::new(vsock));
//! let transport = MmioTransport::new(vsock.clone(), memory, line)?;
//! assert_eq!(vsock.lock().unwrap().device_type(), 19);
//! // The queue event handler also watches the host sockets (readable_fds).
//! let _handler = transport.queue_event_handler()?;
//! // A CID the guest cannot have is refused.
//! assert!(Vsock::new(VsockConfig::new(2, dir.join("other.sock"))).is_err());
//! # drop(_handler); drop(transport); drop(vsock);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [vmkit-virtio]: https://crates.io/crates/vmkit-virtio
#![deny(missing_docs)]

mod conn;
mod device;
mod host;
mod proto;

use std::path::PathBuf;

pub use device::Vsock;
pub use proto::{
    CONFIG_SPACE_SIZE, EVENT_QUEUE, HOST_CID, MAX_PKT_LEN, RX_QUEUE, TX_QUEUE,
    VIRTIO_VSOCK_F_STREAM, VSOCK_DEVICE_TYPE,
};

/// The default size of each queue.
pub const VSOCK_QUEUE_SIZE: u16 = 256;
/// The default buffer each connection advertises (and the most guest data it holds).
pub const DEFAULT_BUF_ALLOC: u32 = 256 * 1024;
/// The longest transmit polling window [`VsockConfig::poll_us`] takes (a millisecond).
pub const MAX_POLL_US: u32 = 1000;
/// The default [`VsockConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// The default bound on connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Errors of [`Vsock::new`] and [`Vsock::restore`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 0, 1 and 2 are the hypervisor's, the loopback's and the host's; 2³² − 1 is "any".
    #[error("guest CID {0} is reserved or too large: use 3 to 4294967294")]
    Cid(u64),
    /// A queue size that is not a power of two up to 32768.
    #[error("queue size {0} is not a power of two up to 32768")]
    QueueSize(u16),
    /// No connections allowed, or a buffer under 4 KiB.
    #[error("vsock limits: at least one connection and a 4 KiB buffer")]
    Limits,
    /// A polling window above [`MAX_POLL_US`].
    #[error("poll_us={0}: at most {MAX_POLL_US} microseconds")]
    Poll(u32),
    /// Something is at the socket path already (a socket left by an earlier VMM, say):
    /// vmkit does not remove what it did not create.
    #[error("{0} already exists (remove it, or choose another path)")]
    PathExists(PathBuf),
    /// The socket path cannot be bound (no such directory, no permission, too long).
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The device's epoll instance or timer cannot be made.
    #[error("epoll: {0}")]
    Epoll(#[source] std::io::Error),
}

/// The device-specific state of a [`Vsock`] for a snapshot ([`Vsock::state`],
/// [`Vsock::restore`]): the guest CID. Connections are not saved: the restored device's
/// first activation sends the driver `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    /// The guest's CID (3 to 2³² − 2).
    pub guest_cid: u64,
}

/// Configuration of a [`Vsock`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID: 3 to 2³² − 2.
    pub guest_cid: u64,
    /// The Unix socket host programs connect to; guest connections to port *P* go to
    /// `uds_path` + `_P`. It must not exist yet; it is removed when the device is dropped.
    pub uds_path: PathBuf,
    /// The most connections at once (host clients in their handshake included); more are
    /// refused.
    pub max_connections: usize,
    /// The receive buffer each connection advertises to the guest (at least 4 KiB): the most
    /// guest data the device holds for a host socket that does not read.
    pub buf_alloc: u32,
    /// The size of each queue.
    pub queue_size: u16,
    /// How long a host client's `CONNECT` waits for the guest to accept or refuse; then the
    /// client's socket is closed and the guest is sent a reset (2 s by default, as
    /// Firecracker's).
    pub connect_timeout: std::time::Duration,
    /// After a transmit notification, keep watching the transmit ring this long (µs, at
    /// most [`MAX_POLL_US`]) with the driver's notifications suppressed, so a guest sending
    /// again soon does so without a VM exit (vmkit-virtio's queue polling); 0: no polling.
    pub poll_us: u32,
}

impl VsockStats {
    /// Adds to `metrics` what changed since `before`; `queue_refused` of the malformed chains
    /// the queues counted already. Once per batch: nothing per packet.
    pub(crate) fn publish(
        &self,
        before: &VsockStats,
        queue_refused: u64,
        metrics: &dyn vmkit_virtio::DeviceMetrics,
    ) {
        use vmkit_virtio::Counter;
        let d = |now: u64, then: u64| now.wrapping_sub(then);
        let (tx, rx) = (
            d(self.tx_packets, before.tx_packets),
            d(self.rx_packets, before.rx_packets),
        );
        let malformed = d(self.malformed, before.malformed);
        let counts = [
            (Counter::Requests, tx + rx + malformed),
            (Counter::WriteOps, tx),
            (Counter::WriteBytes, d(self.tx_bytes, before.tx_bytes)),
            (Counter::ReadOps, rx),
            (Counter::ReadBytes, d(self.rx_bytes, before.rx_bytes)),
            (Counter::Malformed, malformed.saturating_sub(queue_refused)),
            (Counter::Dropped, d(self.dropped, before.dropped)),
            (Counter::Resets, d(self.resets, before.resets)),
        ];
        for (counter, n) in counts {
            if n > 0 {
                metrics.add(counter, n);
            }
        }
    }
}

impl VsockConfig {
    /// Guest CID `guest_cid`, host socket `uds_path`, default limits and queue size.
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Self {
        Self {
            guest_cid,
            uds_path: uds_path.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            buf_alloc: DEFAULT_BUF_ALLOC,
            queue_size: VSOCK_QUEUE_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            poll_us: 0,
        }
    }
}

/// Counters of a [`Vsock`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// Packets taken from the transmit queue.
    pub tx_packets: u64,
    /// Guest data bytes for host sockets.
    pub tx_bytes: u64,
    /// Packets put in the receive queue.
    pub rx_packets: u64,
    /// Host data bytes given to the guest.
    pub rx_bytes: u64,
    /// Chains unusable as packets (malformed, wrong direction, header not in the first
    /// descriptor, a length past the buffer or over [`MAX_PKT_LEN`]), and event buffers too
    /// small.
    pub malformed: u64,
    /// Well-formed packets dropped: wrong CIDs, not a stream, an unknown operation, data
    /// on a connection not ready for it.
    pub dropped: u64,
    /// Connections established (either way).
    pub connections: u64,
    /// Connections refused: nothing listening at `PATH_P`, or the connection limit.
    pub refused: u64,
    /// Connections reset because the guest sent past its credit.
    pub credit_violations: u64,
    /// Resets sent to the guest.
    pub resets: u64,
    /// Resets not sent because too many were owed.
    pub resets_dropped: u64,
    /// Host clients whose `CONNECT` the guest neither accepted nor refused in time.
    pub connect_timeouts: u64,
}
