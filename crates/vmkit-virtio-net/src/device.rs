//! The virtio-net device: queue pairs over backends, the control queue, the config space.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use vm_memory::{Bytes, GuestMemoryMmap};
use vmkit_virtio::{
    ActivateContext, ActivateError, Counter, DeviceMetrics, IoVecs, MappedMemory, RateLimiter,
    RateLimiterUpdate, VirtioDevice,
};

use crate::backend::NetBackend;
use crate::ctrl::{execute, CtrlEffect, RxFilter, MAX_CTRL_BYTES, VIRTIO_NET_ERR, VIRTIO_NET_OK};
use crate::features::*;
use crate::header::NET_HDR_LEN;
use crate::rx::RxBuffers;
use crate::tx::{send_chain, TxDrop, MAX_FRAME_LEN};
use crate::{Error, NetConfig, NetState, NetStats};

/// The virtio device ID of a network card.
pub const NET_DEVICE_TYPE: u32 = 1;
/// The size of the configuration space: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_SPACE_SIZE: usize = 12;
/// Ethernet header plus a VLAN tag: what a frame adds to the MTU.
const ETH_OVERHEAD: u64 = 18;
/// The token of the receive rate limiter's timerfd (the backends' are their pair index,
/// below 0x8000).
const RX_LIMITER: u16 = 0xFFF0;
/// The token of the transmit rate limiter's timerfd.
const TX_LIMITER: u16 = 0xFFF1;

/// One queue pair: its backend and the receive buffers it holds.
struct Pair {
    backend: Box<dyn NetBackend>,
    rx: RxBuffers,
}

/// The virtio-net device. Put it on a transport as `Arc<Mutex<Net>>`; it works on any
/// [`MappedMemory`] (`GuestMemoryMmap` by default).
pub struct Net<M: MappedMemory = GuestMemoryMmap> {
    mac: Option<[u8; 6]>,
    mtu: Option<u16>,
    poll: std::time::Duration,
    queue_sizes: Vec<u16>,
    offered: u64,
    acked: u64,
    pairs: Vec<Pair>,
    active_pairs: u16,
    filter: RxFilter,
    active: Option<ActivateContext<M>>,
    iov: IoVecs,
    ctrl: Vec<u8>,
    stats: NetStats,
    /// Chains the queues refused as malformed (and counted so): not counted again.
    queue_refused: u64,
    /// The VMM's counters ([`NetConfig::metrics`]).
    metrics: Arc<dyn DeviceMetrics>,
    /// [`NetConfig::rx_rate_limiter`]: frames are read while no bucket is in debt, and
    /// charged once their size is known.
    rx_limiter: RateLimiter,
    /// [`NetConfig::tx_rate_limiter`]: a frame without tokens stays in the ring.
    tx_limiter: RateLimiter,
    /// [`restore`](Self::restore)d: the queue pairs the next activation uses.
    restored_pairs: Option<u16>,
}

impl<M: MappedMemory> fmt::Debug for Net<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("mac", &self.mac)
            .field("pairs", &self.pairs.len())
            .field("active", &self.active.is_some())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A device as `config` says, on `GuestMemoryMmap`.
    ///
    /// # Errors
    ///
    /// As [`for_memory`](Self::for_memory).
    pub fn new(config: NetConfig) -> Result<Self, Error> {
        Self::for_memory(config)
    }
}

impl<M: MappedMemory> Net<M> {
    /// A device as `config` says, on guest memory of type `M`.
    ///
    /// # Errors
    ///
    /// [`Error::Queues`] without backends or with more than 0x8000, [`Error::QueueSize`],
    /// [`Error::Mtu`] below 68, [`Error::Poll`] above [`MAX_POLL_US`](crate::MAX_POLL_US).
    pub fn for_memory(config: NetConfig) -> Result<Self, Error> {
        let n = config.backends.len();
        let pairs = u16::try_from(n).ok().filter(|p| (1..=0x8000).contains(p));
        let pairs = pairs.ok_or(Error::Queues(u16::try_from(n).unwrap_or(u16::MAX)))?;
        if !config.queue_size.is_power_of_two() || config.queue_size > 0x8000 {
            return Err(Error::QueueSize(config.queue_size));
        }
        if config.mtu.is_some_and(|m| m < 68) {
            return Err(Error::Mtu(config.mtu.unwrap_or(0)));
        }
        if config.poll_us > crate::MAX_POLL_US {
            return Err(Error::Poll(config.poll_us));
        }
        let guest = config
            .backends
            .iter()
            .map(|b| b.supported_offloads().0)
            .fold(u32::MAX, |a, b| a & b);
        let offered = offered_features(pairs, &config) | crate::Offloads(guest).guest_features();
        // Receive and transmit queue of each pair, then the control queue.
        let queue_sizes = vec![config.queue_size; usize::from(pairs) * 2 + 1];
        let rx_limiter = RateLimiter::new(config.rx_rate_limiter).map_err(Error::RateLimiter)?;
        let tx_limiter = RateLimiter::new(config.tx_rate_limiter).map_err(Error::RateLimiter)?;
        let mut net = Self {
            mac: config.mac,
            mtu: config.mtu,
            poll: std::time::Duration::from_micros(u64::from(config.poll_us)),
            queue_sizes,
            offered,
            acked: 0,
            pairs: config
                .backends
                .into_iter()
                .map(|backend| Pair {
                    backend,
                    rx: RxBuffers::default(),
                })
                .collect(),
            active_pairs: 1,
            filter: RxFilter::default(),
            active: None,
            iov: IoVecs::new(),
            ctrl: Vec::with_capacity(MAX_CTRL_BYTES),
            stats: NetStats::default(),
            queue_refused: 0,
            metrics: config.metrics,
            rx_limiter,
            tx_limiter,
            restored_pairs: None,
        };
        // Until a driver asks for more pairs, only the first one's backend receives.
        net.enable_backends(1);
        Ok(net)
    }

    /// The counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Whether the driver has activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The queue pairs the driver uses now (1 until it sets more through the control queue).
    pub fn active_pairs(&self) -> u16 {
        self.active_pairs
    }

    /// The receive filter the driver set through the control queue.
    pub fn rx_filter(&self) -> &RxFilter {
        &self.filter
    }

    /// The device's state for a snapshot: MAC, MTU, queue pairs (all and in use), the
    /// receive filter. Take it after `quiesce`, which returns the receive buffers the device
    /// held to the driver (transmit and control chains are served synchronously: nothing
    /// else is ever in flight).
    pub fn state(&self) -> NetState {
        NetState {
            mac: self.mac,
            mtu: self.mtu,
            // At most 0x8000 pairs (checked in `for_memory`).
            pairs: self.pairs.len() as u16,
            active_pairs: self.restored_pairs.unwrap_or(self.active_pairs),
            promiscuous: self.filter.promiscuous,
            all_multicast: self.filter.all_multicast,
            unicast: self.filter.unicast.clone(),
            multicast: self.filter.multicast.clone(),
        }
    }

    /// Restores `state` into a device freshly built on its backends (the same TAPs, or the
    /// ones a network override names), before the transport re-activates it: the MAC, MTU
    /// and receive filter become the saved ones, and the activation that follows uses the
    /// saved number of queue pairs and serves every queue once (what the driver made
    /// available while the VM was paused lost its notification with the old VMM).
    ///
    /// # Errors
    ///
    /// [`Error::State`] for another number of queue pairs than this device's, a MAC or MTU
    /// where this device has none or the other way round (they decide the features the
    /// driver negotiated), pairs in use out of range, or filter tables over 256 entries;
    /// [`Error::Mtu`] for an MTU below 68.
    pub fn restore(&mut self, state: &NetState) -> Result<(), Error> {
        let filter = state.validate(
            self.pairs.len() as u16,
            self.mac.is_some(),
            self.mtu.is_some(),
        )?;
        self.mac = state.mac;
        self.mtu = state.mtu;
        self.filter = filter;
        self.restored_pairs = Some(state.active_pairs);
        Ok(())
    }

    fn has(&self, bit: u32) -> bool {
        self.acked & (1 << bit) != 0
    }

    /// The control queue's index: after every pair with `MQ`, else 2.
    fn ctrl_index(&self) -> u16 {
        if self.has(VIRTIO_NET_F_MQ) {
            // At most 0x8000 pairs: 2 * pairs fits.
            (self.pairs.len() * 2) as u16
        } else {
            2
        }
    }

    /// The most bytes a frame (header included) may take in the receive buffers.
    fn rx_need(&self) -> u64 {
        let frame = if crate::Offloads::for_guest(self.acked).large_frames() {
            MAX_FRAME_LEN as u64
        } else {
            u64::from(self.mtu.unwrap_or(1500)) + ETH_OVERHEAD
        };
        NET_HDR_LEN as u64 + frame
    }

    /// Reads the frames waiting on pair `pair`'s backend into the guest's receive buffers,
    /// until the backend has none or the buffers run out (then the driver's next buffers
    /// bring the device back). What the event loop runs when the backend's fd is readable.
    pub fn process_rx(&mut self, pair: u16) {
        if pair >= self.active_pairs {
            return;
        }
        let (before, refused_before) = (self.stats, self.queue_refused);
        self.receive(pair);
        let refused = self.queue_refused - refused_before;
        self.stats.publish(&before, refused, &*self.metrics);
    }

    /// [`process_rx`](Self::process_rx), counted in `stats` only.
    fn receive(&mut self, pair: u16) {
        let (need, mergeable) = (self.rx_need(), self.has(VIRTIO_NET_F_MRG_RXBUF));
        let own = self.mac;
        let (filter, stats, iov) = (&self.filter, &mut self.stats, &mut self.iov);
        let queue_refused = &mut self.queue_refused;
        let (limiter, metrics) = (&mut self.rx_limiter, &*self.metrics);
        let Some(p) = self.pairs.get_mut(usize::from(pair)) else {
            return;
        };
        let Some(q) = self.active.as_mut().and_then(|c| c.queue_mut(pair * 2)) else {
            return;
        };
        loop {
            if limiter.is_throttled() {
                break;
            }
            if !limiter.may_proceed() {
                // Frames stay in the backend until the timer fires.
                metrics.inc(Counter::Throttled);
                break;
            }
            let refused = &mut stats.rx_bad_chains;
            if !p.rx.fill(q, need, mergeable, refused, queue_refused) {
                stats.rx_waits += 1;
                break;
            }
            if p.rx.iovecs(q.memory(), mergeable, iov).is_err() {
                // Unreachable: the queue checked every buffer to lie in guest memory.
                stats.rx_bad_chains += u64::from(p.rx.return_all(q));
                break;
            }
            // SAFETY: the iovecs point into guest memory `q` keeps mapped, into buffers the
            // queue checked to be device-writable and inside guest memory.
            match unsafe { p.backend.recv(iov.as_slice()) } {
                Ok(n) => {
                    let bytes = n.saturating_sub(NET_HDR_LEN) as u64;
                    limiter.charge(bytes, 1);
                    deliver(p, q, n, mergeable, filter, own.as_ref(), stats);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("virtio-net: receive failed: {e}");
                    stats.rx_backend_errors += 1;
                    break;
                }
            }
        }
        iov.clear();
        let _ = q.signal_used();
    }

    /// Sends every chain on pair `pair`'s transmit queue.
    fn process_tx(&mut self, pair: u16) {
        let (before, refused_before) = (self.stats, self.queue_refused);
        self.transmit(pair);
        let refused = self.queue_refused - refused_before;
        self.stats.publish(&before, refused, &*self.metrics);
    }

    /// [`process_tx`](Self::process_tx), counted in `stats` only.
    fn transmit(&mut self, pair: u16) {
        let features = self.acked;
        let (stats, iov) = (&mut self.stats, &mut self.iov);
        let queue_refused = &mut self.queue_refused;
        let (limiter, metrics) = (&mut self.tx_limiter, &*self.metrics);
        let Some(p) = self.pairs.get_mut(usize::from(pair)) else {
            return;
        };
        let Some(q) = self.active.as_mut().and_then(|c| c.queue_mut(pair * 2 + 1)) else {
            return;
        };
        while !limiter.is_throttled() {
            let Ok(Some(chain)) = q.pop() else {
                break;
            };
            let bytes = chain.descriptors().map_or(0, frame_bytes);
            if !limiter.consume(bytes, 1) {
                // Back in the ring, for when the timer fires; no transmit queue is polled
                // (one limiter holds them all).
                q.undo_pop();
                metrics.inc(Counter::Throttled);
                break;
            }
            let result = match chain.descriptors() {
                Ok(descs) => send_chain(chain.memory(), descs, features, p.backend.as_mut(), iov),
                Err(_) => {
                    *queue_refused += 1;
                    Err(TxDrop::Malformed)
                }
            };
            stats.count_tx(result);
            let head = chain.head();
            let _ = q.complete(head, 0);
        }
        let _ = q.signal_used();
        if limiter.is_throttled() {
            self.hold_tx(true);
        }
    }

    /// Holds (or lets go) every transmit queue: the transmit limiter is one for all pairs.
    fn hold_tx(&mut self, held: bool) {
        let Some(ctx) = self.active.as_mut() else {
            return;
        };
        for pair in 0..self.pairs.len() {
            // At most 0x8000 pairs: the index fits.
            if let Some(q) = ctx.queue_mut((pair * 2 + 1) as u16) {
                q.set_throttled(held);
            }
        }
    }

    /// Replaces the receive and transmit rate limiters' buckets that `rx` and `tx` name at
    /// run time (Firecracker's `PATCH /network-interfaces/{id}`; a
    /// [`RateLimiterConfig`](vmkit_virtio::RateLimiterConfig) replaces both of a
    /// direction's, [`RateLimiterUpdate::default`] keeps them). A kept
    /// bucket keeps its tokens, and a direction whose buckets are both kept is not touched;
    /// what an updated direction held is served again.
    pub fn update_rate_limiters(
        &mut self,
        rx: impl Into<RateLimiterUpdate>,
        tx: impl Into<RateLimiterUpdate>,
    ) {
        let (rx, tx) = (rx.into(), tx.into());
        if !rx.is_keep() {
            self.rx_limiter.update(rx);
            self.resume_rx();
        }
        if !tx.is_keep() {
            self.tx_limiter.update(tx);
            self.resume_tx();
        }
    }

    /// The receive rate limiter.
    pub fn rx_rate_limiter(&self) -> &RateLimiter {
        &self.rx_limiter
    }

    /// The transmit rate limiter.
    pub fn tx_rate_limiter(&self) -> &RateLimiter {
        &self.tx_limiter
    }

    /// Whether a rate limiter holds queue `index` (the event handler neither polls it nor
    /// has the device take its chains until the limiter's timer fires); `false` for a
    /// queue that is not active.
    pub fn is_queue_held(&self, index: u16) -> bool {
        self.active
            .as_ref()
            .and_then(|c| c.queue(index))
            .is_some_and(|q| q.is_throttled())
    }

    /// The receive limiter's timer fired: frames waiting on the backends are read.
    fn resume_rx(&mut self) {
        self.rx_limiter.timer_expired();
        for pair in 0..self.active_pairs {
            self.process_rx(pair);
        }
    }

    /// The transmit limiter's timer fired: the transmit queues are served again.
    fn resume_tx(&mut self) {
        self.tx_limiter.timer_expired();
        self.hold_tx(false);
        for pair in 0..self.active_pairs {
            self.process_tx(pair);
        }
    }

    /// Runs every command on the control queue.
    fn process_ctrl(&mut self) {
        let index = self.ctrl_index();
        let (features, max_pairs) = (self.acked, self.pairs.len() as u16);
        let mut new_pairs = None;
        let (filter, stats, buf) = (&mut self.filter, &mut self.stats, &mut self.ctrl);
        let Some(q) = self.active.as_mut().and_then(|c| c.queue_mut(index)) else {
            return;
        };
        while let Ok(Some(chain)) = q.pop() {
            self.metrics.inc(Counter::Requests);
            let head = chain.head();
            let written = match chain.descriptors() {
                Ok(descs) => {
                    let status = match read_command(chain.memory(), descs, buf) {
                        Some(()) => {
                            let (status, effect) = execute(buf, features, max_pairs, filter);
                            if let CtrlEffect::QueuePairs(n) = effect {
                                new_pairs = Some(n);
                            }
                            status
                        }
                        None => VIRTIO_NET_ERR,
                    };
                    stats.ctrl_commands += 1;
                    stats.ctrl_refused += u64::from(status != VIRTIO_NET_OK);
                    write_status(chain.memory(), descs, status)
                }
                Err(_) => {
                    stats.ctrl_refused += 1;
                    0
                }
            };
            let _ = q.complete(head, written);
        }
        let _ = q.signal_used();
        if let Some(n) = new_pairs {
            self.set_pairs(n);
        }
    }

    /// The driver uses the first `n` pairs: the others' backends stop receiving (a
    /// multi-queue TAP steers flows only to attached queues), and frames waiting on newly
    /// used ones are read.
    fn set_pairs(&mut self, n: u16) {
        let before = self.active_pairs;
        self.active_pairs = n;
        self.enable_backends(n);
        for pair in before..n {
            self.process_rx(pair);
        }
    }

    /// Enables the backends of the first `n` pairs and disables the others.
    fn enable_backends(&mut self, n: u16) {
        for (i, p) in self.pairs.iter_mut().enumerate() {
            if let Err(e) = p.backend.set_enabled(i < usize::from(n)) {
                log::warn!("virtio-net: queue pair {i}: enabling or disabling the backend: {e}");
            }
        }
    }
}

/// The device's own feature bits, before the guest offloads the backends allow.
fn offered_features(pairs: u16, config: &NetConfig) -> u64 {
    let mut bits = vec![
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_CTRL_RX,
    ];
    if pairs > 1 {
        bits.push(VIRTIO_NET_F_MQ);
    }
    if config.mac.is_some() {
        bits.push(VIRTIO_NET_F_MAC);
    }
    if config.mtu.is_some() {
        bits.push(VIRTIO_NET_F_MTU);
    }
    bits.into_iter().fold(0, |f, b| f | (1 << b))
}

/// The frame bytes (header not counted) of a transmit chain, for the rate limiter.
fn frame_bytes(descs: &[vmkit_virtio::Descriptor]) -> u64 {
    let total = descs.iter().map(|d| u64::from(d.len())).sum::<u64>();
    total.saturating_sub(NET_HDR_LEN as u64)
}

/// Places an `n`-byte frame just read into `p`'s held buffers: dropped (buffers kept for
/// the next) when it holds no header or the filter refuses it, else completed.
fn deliver<M: MappedMemory>(
    p: &mut Pair,
    q: &mut vmkit_virtio::ActiveQueue<M>,
    n: usize,
    mergeable: bool,
    filter: &RxFilter,
    own: Option<&[u8; 6]>,
    stats: &mut NetStats,
) {
    if n < NET_HDR_LEN {
        stats.rx_backend_errors += 1;
        return;
    }
    if !filter.promiscuous {
        let mut dest = [0u8; 6];
        if n < NET_HDR_LEN + 6
            || !p.rx.read_at(q.memory(), NET_HDR_LEN, &mut dest)
            || !filter.accepts(own, &dest)
        {
            stats.rx_filtered += 1;
            return;
        }
    }
    let placed = p.rx.complete(q, n, mergeable);
    stats.rx_frames += 1;
    stats.rx_bytes += (n - NET_HDR_LEN) as u64;
    stats.rx_buffers += u64::from(placed.chains);
}

/// Gathers a control command (the chain's device-readable bytes) into `buf`; `None` when
/// it is longer than [`MAX_CTRL_BYTES`] or unreadable.
fn read_command<M: MappedMemory>(
    memory: &M,
    descs: &[vmkit_virtio::Descriptor],
    buf: &mut Vec<u8>,
) -> Option<()> {
    buf.clear();
    for d in descs.iter().filter(|d| !d.is_write_only()) {
        let len = d.len() as usize;
        let at = buf.len();
        if at + len > MAX_CTRL_BYTES {
            return None;
        }
        buf.resize(at + len, 0);
        memory.read_slice(&mut buf[at..], d.addr()).ok()?;
    }
    Some(())
}

/// Writes the status byte into the chain's last device-writable buffer; returns the used
/// length (1, or 0 when there is no such buffer).
fn write_status<M: MappedMemory>(
    memory: &M,
    descs: &[vmkit_virtio::Descriptor],
    status: u8,
) -> u32 {
    let Some(d) = descs
        .iter()
        .rev()
        .find(|d| d.is_write_only() && d.len() > 0)
    else {
        return 0;
    };
    u32::from(memory.write_obj(status, d.addr()).is_ok())
}

impl<M: MappedMemory> VirtioDevice<M> for Net<M> {
    fn device_type(&self) -> u32 {
        NET_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.offered
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features
            & (self.offered | vmkit_virtio::FEATURE_VERSION_1 | vmkit_virtio::RING_FEATURES);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SPACE_SIZE];
        config[..6].copy_from_slice(&self.mac.unwrap_or_default());
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&(self.pairs.len() as u16).to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        vmkit_virtio::read_config_space(&config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only with VERSION_1 (the MAC is set through the control
        // queue, which this device does not offer).
    }

    fn activate(&mut self, context: ActivateContext<M>) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let mut needed = vec![0, 1];
        if self.has(VIRTIO_NET_F_CTRL_VQ) {
            needed.push(self.ctrl_index());
        }
        if let Some(q) = needed.into_iter().find(|q| context.queue(*q).is_none()) {
            return Err(ActivateError::MissingQueue(q));
        }
        let offloads = crate::Offloads::for_guest(self.acked);
        for p in &mut self.pairs {
            p.backend
                .set_offloads(offloads)
                .map_err(ActivateError::Io)?;
        }
        let mut context = context;
        for q in context.queues_mut() {
            q.set_metrics(self.metrics.clone());
        }
        for pair in 0..self.pairs.len() {
            // At most 0x8000 pairs: the index fits.
            if let Some(q) = context.queue_mut((pair * 2 + 1) as u16) {
                q.set_poll(self.poll);
                q.set_throttled(self.tx_limiter.is_throttled());
            }
        }
        self.active = Some(context);
        // One pair until the driver asks for more; frames that arrived before the driver
        // was ready are read.
        self.active_pairs = 0;
        match self.restored_pairs.take() {
            None => self.set_pairs(1),
            Some(pairs) => {
                self.set_pairs(pairs);
                // What the driver made available while the VM was paused lost its
                // notification with the old VMM: serve every queue once.
                for pair in 0..pairs {
                    self.process_tx(pair);
                }
                if self.has(VIRTIO_NET_F_CTRL_VQ) {
                    self.process_ctrl();
                }
            }
        }
        Ok(())
    }

    fn process_queue(&mut self, index: u16) {
        self.metrics.inc(Counter::Notifications);
        if self.has(VIRTIO_NET_F_CTRL_VQ) && index == self.ctrl_index() {
            self.process_ctrl();
        } else if index.is_multiple_of(2) {
            self.process_rx(index / 2);
        } else {
            self.process_tx(index / 2);
        }
    }

    fn readable_fds(&self) -> io::Result<Vec<(u16, OwnedFd)>> {
        let mut fds = Vec::new();
        for (i, p) in self.pairs.iter().enumerate() {
            if let Some(fd) = p.backend.readable_fd()? {
                // At most 0x8000 pairs.
                fds.push((i as u16, fd));
            }
        }
        fds.push((RX_LIMITER, self.rx_limiter.timer_fd()?));
        fds.push((TX_LIMITER, self.tx_limiter.timer_fd()?));
        Ok(fds)
    }

    fn process_device_event(&mut self, token: u16) {
        match token {
            RX_LIMITER => self.resume_rx(),
            TX_LIMITER => self.resume_tx(),
            pair => self.process_rx(pair),
        }
    }

    fn quiesce(&mut self) {
        // Receive chains held for the next frame are given back to the queue, unused: a
        // snapshot taken now must not hold buffers the driver gave (a restored device
        // starts from the saved ring position and would never use them). The next frame
        // takes them again; the driver sees nothing.
        let Some(ctx) = self.active.as_mut() else {
            return;
        };
        for (pair, p) in self.pairs.iter_mut().enumerate() {
            // At most 0x8000 pairs: the index fits.
            if let Some(q) = ctx.queue_mut((pair * 2) as u16) {
                if p.rx.give_back(q) > 0 {
                    let _ = q.signal_used();
                }
            }
        }
    }

    fn reset(&mut self) -> Option<ActivateContext<M>> {
        self.restored_pairs = None;
        for p in &mut self.pairs {
            p.rx.clear();
            if let Err(e) = p.backend.set_offloads(crate::Offloads::default()) {
                log::debug!("virtio-net: clearing offloads failed: {e}");
            }
        }
        self.acked = 0;
        self.active_pairs = 1;
        self.enable_backends(1);
        self.filter = RxFilter::default();
        self.active.take()
    }
}
