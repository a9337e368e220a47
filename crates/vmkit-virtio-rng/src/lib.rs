//! virtio-rng (virtio 1.2 §5.4) for [vmkit-virtio] transports: the device fills the
//! driver's device-writable buffers with bytes from the host kernel's `getrandom(2)`.
//!
//! - device ID 4, one request queue, no device-specific features, no config space;
//! - at most [`RngConfig::max_bytes_per_chain`] bytes per request (64 KiB by default), so
//!   a guest cannot make the VMM's event thread generate gigabytes at once;
//! - descriptor directions are checked: a driver-readable descriptor in a chain gets
//!   nothing written into it (and counts 0 in the used length); a malformed chain (loop,
//!   longer than the queue, bad indirect table) or a buffer outside guest memory is
//!   returned with a used length of 0 and nothing written.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_virtio::{MmioTransport, VirtioDevice, MMIO_SIZE};
//! use vmkit_virtio_rng::{Rng, RngConfig};
//! # use vm_memory::{GuestAddress, GuestMemoryMmap};
//! # let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! # let line = Arc::new(vmkit_irq::CountingLine::new());
//!
//! let rng = Arc::new(Mutex::new(Rng::new(RngConfig::default())?));
//! let transport = MmioTransport::new(rng.clone(), memory, line)?;
//! assert_eq!(rng.lock().unwrap().device_type(), 4);
//! // The VMM registers `Arc::new(Mutex::new(transport))` on its MMIO bus for MMIO_SIZE
//! // bytes, the QueueNotify ioeventfd, and the queue event handler on its event manager:
//! let _handler = transport.queue_event_handler()?;
//! # let _ = MMIO_SIZE;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [vmkit-virtio]: https://crates.io/crates/vmkit-virtio
#![deny(missing_docs)]

use std::io;
use std::sync::Arc;

use vm_memory::{Bytes, GuestMemoryMmap};
use vmkit_virtio::{
    ActivateContext, ActivateError, Counter, Descriptor, DeviceMetrics, NoMetrics, RateLimiter,
    RateLimiterConfig, RateLimiterUpdate, VirtioDevice, VirtioMemory,
};

/// The virtio device ID of an entropy device.
pub const RNG_DEVICE_TYPE: u32 = 4;
/// The size of the request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// The default bound of one request, in bytes.
pub const DEFAULT_MAX_BYTES_PER_CHAIN: u32 = 64 * 1024;

/// Errors of [`Rng::new`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The per-request bound is 0: the device could never serve a request.
    #[error("max_bytes_per_chain must be at least 1")]
    ZeroLimit,
    /// The rate limiter's timerfd could not be created.
    #[error("failed to set up the rate limiter: {0}")]
    RateLimiter(#[source] io::Error),
    /// A saved [`RngState`] of a version this crate does not read.
    #[error("rng state version {0} not supported (this vmkit reads {RNG_STATE_VERSION})")]
    StateVersion(u32),
}

/// The version of [`RngState`] this crate writes and reads.
pub const RNG_STATE_VERSION: u32 = 1;

/// The device-specific state of an [`Rng`] for a snapshot: the device has none beyond
/// what its transport saves (queues, features), so this holds only a version, checked on
/// [`Rng::restore`]. Statistics, metrics and rate-limiter buckets are not saved (the
/// limiter starts full again on restore).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    /// [`RNG_STATE_VERSION`] when written by this crate.
    pub version: u32,
}

/// The token of the rate limiter's timerfd in [`VirtioDevice::readable_fds`].
const LIMITER_EVENT: u16 = 0;

/// Configuration of an [`Rng`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RngConfig {
    /// At most this many bytes are written per descriptor chain (request).
    pub max_bytes_per_chain: u32,
}

impl Default for RngConfig {
    fn default() -> Self {
        Self {
            max_bytes_per_chain: DEFAULT_MAX_BYTES_PER_CHAIN,
        }
    }
}

/// Counters of an [`Rng`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RngStats {
    /// Requests (descriptor chains) served.
    pub requests: u64,
    /// Bytes written to the guest.
    pub bytes: u64,
    /// Chains refused (malformed, or a buffer outside guest memory).
    pub bad_chains: u64,
    /// Driver-readable descriptors met in chains (skipped).
    pub readable_descriptors: u64,
    /// `getrandom` failures (the request got what was filled before).
    pub entropy_errors: u64,
}

/// The virtio-rng device. Put it on a transport as `Arc<Mutex<Rng>>`; it works on any
/// [`VirtioMemory`] (`GuestMemoryMmap` by default).
#[derive(Debug)]
pub struct Rng<M: VirtioMemory = GuestMemoryMmap> {
    config: RngConfig,
    active: Option<ActivateContext<M>>,
    buffer: Vec<u8>,
    stats: RngStats,
    metrics: Arc<dyn DeviceMetrics>,
    limiter: RateLimiter,
    /// Restored and not activated since: the next activation serves the queue once (a
    /// request made available while the VM was paused lost its notification).
    restored: bool,
}

impl Rng {
    /// A device bounded as `config` says, on `GuestMemoryMmap`.
    pub fn new(config: RngConfig) -> Result<Self, Error> {
        Self::for_memory(config)
    }
}

impl<M: VirtioMemory> Rng<M> {
    /// A device bounded as `config` says, on guest memory of type `M`
    /// (`Rng::<GuestMemoryMmap<AtomicBitmap>>::for_memory(config)`, say).
    pub fn for_memory(config: RngConfig) -> Result<Self, Error> {
        if config.max_bytes_per_chain == 0 {
            return Err(Error::ZeroLimit);
        }
        Ok(Self {
            config,
            active: None,
            buffer: Vec::new(),
            stats: RngStats::default(),
            metrics: Arc::new(NoMetrics),
            limiter: RateLimiter::new(RateLimiterConfig::default()).map_err(Error::RateLimiter)?,
            restored: false,
        })
    }

    /// Limits the entropy the guest gets: Firecracker's `rate_limiter` of `PUT /entropy`
    /// (bytes: what a request can be given, at most `max_bytes_per_chain`; operations:
    /// requests). A request past the limit stays in the ring until the limiter's timer
    /// fires. Default: no limit.
    pub fn with_rate_limiter(mut self, config: RateLimiterConfig) -> Self {
        self.limiter.update(config);
        self
    }

    /// Replaces the rate limiter's buckets that `update` names at run time (a
    /// [`RateLimiterConfig`] replaces both; a kept bucket keeps its tokens); held requests
    /// are served again.
    pub fn update_rate_limiter(&mut self, update: impl Into<RateLimiterUpdate>) {
        let update = update.into();
        if update.is_keep() {
            return;
        }
        self.limiter.update(update);
        self.resume();
    }

    /// The rate limiter (its buckets, whether it holds the queue).
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// The limiter's timer fired: the queue is served again.
    fn resume(&mut self) {
        self.limiter.timer_expired();
        if let Some(q) = self.active.as_mut().and_then(|c| c.queue_mut(0)) {
            q.set_throttled(false);
        }
        self.serve_queue(0);
    }

    /// Counts into `metrics` (default [`NoMetrics`]): `requests` (every chain), `read_ops`
    /// and `read_bytes` (requests that got entropy, and its bytes), `errors` (`getrandom`
    /// failures), `notifications`, and, through the queue, `interrupts` and `malformed`.
    /// On the device rather than in [`RngConfig`], which stays `Copy` and comparable.
    pub fn with_metrics(mut self, metrics: Arc<dyn DeviceMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The counters.
    pub fn stats(&self) -> RngStats {
        self.stats
    }

    /// Whether the driver has activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The device's state for a snapshot, taken while the device is quiesced (the rng
    /// serves every request synchronously in `process_queue`: nothing is ever in flight).
    pub fn state(&self) -> RngState {
        RngState {
            version: RNG_STATE_VERSION,
        }
    }

    /// Restores `state` into a freshly built device, before its transport re-activates it;
    /// that activation serves the requests already in the ring (made available while the
    /// VM was paused, their notification lost with the old VMM). A state of another version
    /// is refused.
    pub fn restore(&mut self, state: &RngState) -> Result<(), Error> {
        if state.version != RNG_STATE_VERSION {
            return Err(Error::StateVersion(state.version));
        }
        self.restored = true;
        Ok(())
    }
}

/// Fills `buf` from `getrandom(2)`; returns how many bytes were filled.
fn fill_random(buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes, and getrandom
        // writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // `n` is non-negative and at most `rest.len()`.
        filled += n as usize;
    }
    Ok(filled)
}

/// Serves one request; returns the used length.
fn serve<M: VirtioMemory>(
    mem: &M,
    descs: &[Descriptor],
    limit: u32,
    buffer: &mut Vec<u8>,
    stats: &mut RngStats,
    metrics: &dyn DeviceMetrics,
) -> u32 {
    let mut written: u32 = 0;
    for d in descs {
        if !d.is_write_only() {
            // The driver's data: never written, counts nothing.
            stats.readable_descriptors += 1;
            continue;
        }
        let room = limit.saturating_sub(written);
        if room == 0 {
            break;
        }
        let n = d.len().min(room);
        if n == 0 {
            // An empty writable descriptor: the request goes on to the next one (ending it
            // here would leave a chain with room unserved, against virtio 1.2 §5.4.6.1).
            continue;
        }
        // `n` is at most 64 KiB by default and at most the u32 limit; usize holds it.
        buffer.resize(n as usize, 0);
        let got = match fill_random(buffer) {
            Ok(got) => got,
            Err(_) => {
                stats.entropy_errors += 1;
                metrics.inc(Counter::Errors);
                break;
            }
        };
        // The buffer was checked to lie inside guest memory when the chain was popped.
        if mem.write_slice(&buffer[..got], d.addr()).is_err() {
            break;
        }
        // `got <= n`, a u32.
        written += got as u32;
    }
    written
}

impl<M: VirtioMemory> VirtioDevice<M> for Rng<M> {
    fn device_type(&self) -> u32 {
        RNG_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, _offset: u64, _data: &mut [u8]) {
        // No configuration space: reads are zeros.
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, context: ActivateContext<M>) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if context.queue(0).is_none() {
            return Err(ActivateError::MissingQueue(0));
        }
        let mut context = context;
        for q in context.queues_mut() {
            q.set_metrics(self.metrics.clone());
            q.set_throttled(self.limiter.is_throttled());
        }
        self.active = Some(context);
        if std::mem::take(&mut self.restored) {
            self.serve_queue(0);
        }
        Ok(())
    }

    fn process_queue(&mut self, index: u16) {
        self.metrics.inc(Counter::Notifications);
        self.serve_queue(index);
    }

    fn readable_fds(&self) -> io::Result<Vec<(u16, std::os::fd::OwnedFd)>> {
        Ok(vec![(LIMITER_EVENT, self.limiter.timer_fd()?)])
    }

    fn process_device_event(&mut self, token: u16) {
        if token == LIMITER_EVENT {
            self.resume();
        }
    }

    fn reset(&mut self) -> Option<ActivateContext<M>> {
        self.restored = false;
        self.active.take()
    }
}

impl<M: VirtioMemory> Rng<M> {
    /// Serves the requests of queue `index` while the rate limiter allows.
    fn serve_queue(&mut self, index: u16) {
        let limit = self.config.max_bytes_per_chain;
        let (buffer, stats, metrics) = (&mut self.buffer, &mut self.stats, &*self.metrics);
        let limiter = &mut self.limiter;
        let Some(q) = self.active.as_mut().and_then(|c| c.queue_mut(index)) else {
            return;
        };
        // A ring error ends the loop with the device in DEVICE_NEEDS_RESET: nothing more to do.
        while !limiter.is_throttled() {
            let Ok(Some(chain)) = q.pop() else {
                break;
            };
            let cost = chain.descriptors().map_or(0, |d| offered_bytes(d, limit));
            if !limiter.consume(u64::from(cost), 1) {
                // Back in the ring, for when the timer fires; the queue is not polled.
                q.undo_pop();
                q.set_throttled(true);
                metrics.inc(Counter::Throttled);
                break;
            }
            stats.requests += 1;
            metrics.inc(Counter::Requests);
            let n = match chain.descriptors() {
                Ok(descs) => serve(chain.memory(), descs, limit, buffer, stats, metrics),
                Err(_) => {
                    stats.bad_chains += 1;
                    0
                }
            };
            stats.bytes += u64::from(n);
            if n > 0 {
                metrics.inc(Counter::ReadOps);
                metrics.add(Counter::ReadBytes, u64::from(n));
            }
            let head = chain.head();
            let _ = q.complete(head, n);
        }
        let _ = q.signal_used();
    }
}

/// The bytes a request can be given: its device-writable room, at most `limit`.
fn offered_bytes(descs: &[Descriptor], limit: u32) -> u32 {
    let room = descs
        .iter()
        .filter(|d| d.is_write_only())
        .fold(0u32, |n, d| n.saturating_add(d.len()));
    room.min(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_limit_refused() {
        assert!(matches!(
            Rng::new(RngConfig {
                max_bytes_per_chain: 0
            }),
            Err(Error::ZeroLimit)
        ));
    }

    #[test]
    fn getrandom_fills_and_varies() {
        let mut a = [0u8; 4096];
        let mut b = [0u8; 4096];
        assert_eq!(fill_random(&mut a).unwrap(), 4096);
        assert_eq!(fill_random(&mut b).unwrap(), 4096);
        assert_ne!(a, b);
        assert_eq!(fill_random(&mut []).unwrap(), 0);
    }

    #[test]
    fn identity() {
        let mut rng = Rng::new(RngConfig::default()).unwrap();
        assert_eq!(rng.device_type(), 4);
        assert_eq!(rng.queue_max_sizes(), &[256]);
        assert_eq!(rng.device_features(), 0);
        let mut cfg = [0u8; 4];
        rng.read_config(0, &mut cfg);
        assert_eq!(cfg, [0; 4]);
        rng.write_config(0, &[1, 2, 3, 4]);
        assert!(!rng.is_active());
        assert!(rng.reset().is_none());
    }

    #[test]
    fn state_round_trip_and_bad_version() {
        let rng = Rng::new(RngConfig::default()).unwrap();
        let state = rng.state();
        assert_eq!(state.version, RNG_STATE_VERSION);
        let mut fresh = Rng::new(RngConfig::default()).unwrap();
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.state(), state);
        let err = fresh.restore(&RngState { version: 7 }).unwrap_err();
        assert!(matches!(err, Error::StateVersion(7)));
        assert_eq!(
            err.to_string(),
            "rng state version 7 not supported (this vmkit reads 1)"
        );
    }
}
