//! The virtio-vsock device: the three queues, the configuration space, and the pump between
//! the queues and the host side.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmkit_virtio::{
    ActivateContext, ActivateError, ActiveQueue, Counter, DeviceMetrics, NoMetrics, VirtioDevice,
    VirtioMemory,
};

use crate::host::Host;
use crate::proto::*;
use crate::{Error, VsockConfig, VsockState, VsockStats};

/// The token of the host side's epoll fd in [`VirtioDevice::readable_fds`].
const HOST_TOKEN: u16 = 0;

/// The virtio-vsock device. Put it on a transport as `Arc<Mutex<Vsock>>`; it works on any
/// [`VirtioMemory`] (`GuestMemoryMmap` by default).
pub struct Vsock<M: VirtioMemory = GuestMemoryMmap> {
    guest_cid: u64,
    queue_sizes: [u16; 3],
    acked: u64,
    host: Host,
    active: Option<ActivateContext<M>>,
    /// A transport-reset event waits for an event-queue buffer.
    event_owed: bool,
    /// Restored from a snapshot and not activated since: the next activation resets the
    /// transport (connections forgotten, `TRANSPORT_RESET` sent).
    restored: bool,
    poll: std::time::Duration,
    /// Chains the queues refused as malformed (and counted so): not counted again.
    queue_refused: u64,
    metrics: Arc<dyn DeviceMetrics>,
}

impl<M: VirtioMemory> fmt::Debug for Vsock<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("host", &self.host)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device as `config` says, on `GuestMemoryMmap`.
    ///
    /// # Errors
    ///
    /// As [`for_memory`](Self::for_memory).
    pub fn new(config: VsockConfig) -> Result<Self, Error> {
        Self::for_memory(config)
    }
}

impl<M: VirtioMemory> Vsock<M> {
    /// A device as `config` says, on guest memory of type `M`: binds the socket path.
    ///
    /// # Errors
    ///
    /// [`Error::Cid`] for a CID below 3 or of 2³² − 1 and up, [`Error::QueueSize`],
    /// [`Error::Limits`], [`Error::Poll`], [`Error::PathExists`], [`Error::Bind`], [`Error::Epoll`].
    pub fn for_memory(config: VsockConfig) -> Result<Self, Error> {
        check_cid(config.guest_cid)?;
        let size = config.queue_size;
        if !size.is_power_of_two() || size > 0x8000 {
            return Err(Error::QueueSize(size));
        }
        if config.max_connections == 0 || config.buf_alloc < 4096 {
            return Err(Error::Limits);
        }
        if config.poll_us > crate::MAX_POLL_US {
            return Err(Error::Poll(config.poll_us));
        }
        Ok(Self {
            guest_cid: config.guest_cid,
            queue_sizes: [size; 3],
            acked: 0,
            host: Host::bind(&config)?,
            active: None,
            event_owed: false,
            restored: false,
            poll: std::time::Duration::from_micros(u64::from(config.poll_us)),
            queue_refused: 0,
            metrics: Arc::new(NoMetrics),
        })
    }

    /// Counts into `metrics` (default [`NoMetrics`]; the crate's README says what each
    /// counter means here). On the device rather than in [`VsockConfig`], which stays
    /// comparable.
    pub fn with_metrics(mut self, metrics: Arc<dyn DeviceMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Runs `f`, then adds to the metrics what it changed in the counters.
    fn counted(&mut self, f: impl FnOnce(&mut Self)) {
        let (before, refused) = (self.host.stats, self.queue_refused);
        f(self);
        let refused = self.queue_refused - refused;
        self.host.stats.publish(&before, refused, &*self.metrics);
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The counters.
    pub fn stats(&self) -> VsockStats {
        self.host.stats
    }

    /// Open connections (host clients still sending their `CONNECT` line included).
    pub fn connections(&self) -> usize {
        self.host.connections()
    }

    /// Whether the driver activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Drops every connection and sends the driver `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, so
    /// it resets its sockets too (and re-reads the guest CID): what a VMM does when the host
    /// side's connections are gone while the driver still runs, e.g. after restoring a
    /// snapshot. The event goes out with the next event-queue buffer the driver offers.
    pub fn transport_reset(&mut self) {
        self.counted(|dev| {
            dev.host.close_all();
            if dev.active.is_some() {
                dev.event_owed = true;
                dev.send_event();
            }
        });
    }

    /// The device's state for a snapshot: the guest CID. Connections are not saved (their
    /// host sockets cannot be), and nothing is ever in flight: packets are moved between
    /// the rings and the host sockets synchronously, so `quiesce` has nothing to wait for.
    pub fn state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
        }
    }

    /// Restores `state` into a freshly built device (its own socket path), before the
    /// transport re-activates it: the guest CID becomes the saved one, and the activation
    /// that follows forgets every connection and puts one
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue, so the driver drops its
    /// sockets and re-reads the CID (as Firecracker does).
    ///
    /// # Errors
    ///
    /// [`Error::Cid`] for a saved CID below 3 or of 2³² − 1 and up.
    pub fn restore(&mut self, state: &VsockState) -> Result<(), Error> {
        check_cid(state.guest_cid)?;
        self.guest_cid = state.guest_cid;
        self.restored = true;
        Ok(())
    }

    fn send_event(&mut self) {
        let Some(q) = self.active.as_mut().and_then(|c| c.queue_mut(EVENT_QUEUE)) else {
            return;
        };
        while self.event_owed {
            let Ok(Some(chain)) = q.pop() else {
                break;
            };
            let head = chain.head();
            let written = match chain.descriptors() {
                Ok([d, ..]) if d.is_write_only() && d.len() >= 4 => chain
                    .memory()
                    .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                    .is_ok(),
                Ok(_) => false,
                Err(_) => {
                    self.queue_refused += 1;
                    false
                }
            };
            self.event_owed = !written;
            if written {
                self.metrics.inc(Counter::Requests);
            } else {
                self.host.stats.malformed += 1;
            }
            let _ = q.complete(head, if written { 4 } else { 0 });
        }
        let _ = q.signal_used();
    }

    /// Takes the driver's packets.
    fn process_tx(&mut self) {
        let Self {
            active,
            host,
            guest_cid,
            queue_refused,
            ..
        } = self;
        let Some(q) = active.as_mut().and_then(|c| c.queue_mut(TX_QUEUE)) else {
            return;
        };
        while let Ok(Some(chain)) = q.pop() {
            let head = chain.head();
            take_packet(host, *guest_cid, &chain, queue_refused);
            let _ = q.complete(head, 0);
        }
        let _ = q.signal_used();
    }

    /// Gives the driver what is owed to it, as long as it has receive buffers.
    fn process_rx(&mut self) {
        let Self {
            active,
            host,
            guest_cid,
            queue_refused,
            ..
        } = self;
        let Some(q) = active.as_mut().and_then(|c| c.queue_mut(RX_QUEUE)) else {
            return;
        };
        while host.has_work() {
            match fill_one(host, *guest_cid, q, queue_refused) {
                Some(true) => {}
                Some(false) => {
                    q.undo_pop();
                    break;
                }
                None => break,
            }
        }
        let _ = q.signal_used();
    }
}

/// A guest CID is 3 to 2³² − 2.
fn check_cid(cid: u64) -> Result<(), Error> {
    if cid < 3 || cid >= u64::from(u32::MAX) {
        return Err(Error::Cid(cid));
    }
    Ok(())
}

/// Hands one transmit chain's packet to the host side; a malformed one is counted and
/// dropped (in `queue_refused` too when the queue found it so).
fn take_packet<M: VirtioMemory>(
    host: &mut Host,
    guest_cid: u64,
    chain: &vmkit_virtio::Chain<'_, M>,
    queue_refused: &mut u64,
) {
    if chain.descriptors().is_err() {
        host.stats.malformed += 1;
        *queue_refused += 1;
        return;
    }
    let mut raw = chain.descriptor_chain();
    match VsockPacket::from_tx_virtq_chain(chain.memory(), &mut raw, MAX_PKT_LEN) {
        Ok(pkt) => {
            host.stats.tx_packets += 1;
            host.guest_packet(guest_cid, &Header::of(&pkt), pkt.data_slice());
        }
        Err(e) => {
            log::debug!("vsock: transmit packet dropped: {e}");
            host.stats.malformed += 1;
        }
    }
}

/// Fills one receive chain: `Some(true)` when done, `Some(false)` when there was nothing to
/// put in it after all (it should be given back), `None` without a chain. A chain the queue
/// found malformed is counted in `queue_refused` too.
fn fill_one<M: VirtioMemory>(
    host: &mut Host,
    guest_cid: u64,
    q: &mut ActiveQueue<M>,
    queue_refused: &mut u64,
) -> Option<bool> {
    let chain = q.pop().ok()??;
    let head = chain.head();
    let len = if chain.descriptors().is_err() {
        host.stats.malformed += 1;
        *queue_refused += 1;
        0
    } else {
        let mut raw = chain.descriptor_chain();
        match VsockPacket::from_rx_virtq_chain(chain.memory(), &mut raw, MAX_PKT_LEN) {
            Ok(mut pkt) => match host.fill(guest_cid, &mut pkt) {
                Some(len) => {
                    host.stats.rx_packets += 1;
                    len
                }
                None => return Some(false),
            },
            Err(e) => {
                log::debug!("vsock: receive buffer unusable: {e}");
                host.stats.malformed += 1;
                0
            }
        }
    };
    let _ = q.complete(head, len);
    Some(true)
}

impl<M: VirtioMemory> VirtioDevice<M> for Vsock<M> {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        1 << VIRTIO_VSOCK_F_STREAM
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config: [u8; CONFIG_SPACE_SIZE] = self.guest_cid.to_le_bytes();
        vmkit_virtio::read_config_space(&config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The guest CID is read-only.
    }

    fn activate(&mut self, context: ActivateContext<M>) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        for q in [RX_QUEUE, TX_QUEUE, EVENT_QUEUE] {
            if context.queue(q).is_none() {
                return Err(ActivateError::MissingQueue(q));
            }
        }
        let mut context = context;
        for q in context.queues_mut() {
            q.set_metrics(self.metrics.clone());
        }
        if let Some(q) = context.queue_mut(TX_QUEUE) {
            q.set_poll(self.poll);
        }
        self.active = Some(context);
        if std::mem::take(&mut self.restored) {
            // The driver's sockets were connected to host sockets of the VMM that took the
            // snapshot: the driver resets them. Packets it queued while the VM was paused
            // (their notification lost with the old VMM) are taken: each gets a reset.
            self.transport_reset();
            self.counted(|dev| dev.process_tx());
        }
        // Host clients may have connected before the driver was ready.
        self.counted(|dev| {
            dev.host.poll();
            dev.process_rx();
        });
        Ok(())
    }

    fn process_queue(&mut self, index: u16) {
        self.metrics.inc(Counter::Notifications);
        self.counted(|dev| match index {
            TX_QUEUE => {
                dev.process_tx();
                dev.process_rx();
            }
            RX_QUEUE => dev.process_rx(),
            EVENT_QUEUE => dev.send_event(),
            _ => {}
        });
    }

    fn readable_fds(&self) -> io::Result<Vec<(u16, OwnedFd)>> {
        Ok(vec![(HOST_TOKEN, self.host.epoll_fd()?)])
    }

    fn process_device_event(&mut self, token: u16) {
        if token == HOST_TOKEN {
            self.counted(|dev| {
                dev.host.poll();
                dev.process_rx();
            });
        }
    }

    fn reset(&mut self) -> Option<ActivateContext<M>> {
        self.counted(|dev| dev.host.close_all());
        self.acked = 0;
        self.event_owed = false;
        // A driver that resets the device sets it up afresh: no event is owed to it.
        self.restored = false;
        self.active.take()
    }
}
