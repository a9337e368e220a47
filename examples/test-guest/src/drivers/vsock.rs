//! virtio-vsock through virtio-drivers' `VsockConnectionManager` (on its
//! `VirtIOSocket`): `Vsock` opens the device on a `StrictTransport`, keeps
//! per connection what the tests need to know (state, the peer's credit,
//! what was read since the last credit update) and bounds every wait.
//!
//! Queues: 0 receive, 1 transmit, 2 event (virtio 1.2 §5.10.2), 8 entries
//! each (the crate's fixed size). Receive buffers are `RX_BUF` bytes
//! (header included) from the heap, owned by the crate's queue; every
//! packet the guest sends is one blocking request (`add_notify_wait_pop`:
//! header and payload, one descriptor each or one indirect descriptor),
//! at most `MAX_PKT` payload bytes and never more than the peer's credit
//! (`buf_alloc - (tx_cnt - fwd_cnt)`, tracked here from every packet's
//! header as the crate does, so the crate never refuses a send for want of
//! credit unless the peer shrank its buffer).
//!
//! Notifications: the receive queue's go through the `Doorbell` (held
//! until the end of a `poll` round, sent when EVENT_IDX asks); the
//! transmit queue's at once (the crate spins on the used ring right after
//! it), written straight to the notify register (`StrictTransport::
//! notify_directly`), inside `Health::blocking` so that a request the
//! device never completes fails after 5 s instead of hanging.
//!
//! What virtio-drivers 0.13's manager does on its own: it accepts
//! connection requests on listened ports (and resets the others), answers
//! credit requests, and on a peer's shutdown or reset drops the connection
//! once its buffer is read (answering a shutdown with a reset). It never
//! sends a credit update by itself: `recv` here does, once a quarter of
//! the buffer was read since the last one.

use crate::drivers::doorbell::{self, Bell, Doorbell};
use crate::drivers::hal::GuestHal;
use crate::drivers::transport::{Health, StrictTransport};
use crate::drivers::virtio::{Device, Devices};
use crate::platform::arch::rdtsc;
use crate::platform::time::us_to_cycles;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};
use virtio_drivers::device::socket::{
    DisconnectReason, SocketError, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEventType,
    VMADDR_CID_HOST,
};
use virtio_drivers::Error;

/// The queues `VirtIOSocket` uses (the event queue, 2, gets no buffers).
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
/// Bytes per receive buffer, the 44-byte header included.
pub const RX_BUF: usize = 64 * 1024;
/// Largest payload the guest puts in one packet (Linux's and Firecracker's
/// 64 KiB).
pub const MAX_PKT: usize = 64 * 1024;
/// `VirtIOSocket::poll` calls per round: the queue's size, so a round
/// takes every packet that was there when it started.
const POLLS_PER_ROUND: usize = 8;
/// How long a connection without credit waits before it asks again.
const REASK_US: u64 = 50_000;
/// The guest's next local port for a connection it makes: from 49152 up,
/// never reused within a boot (also across device resets).
static NEXT_PORT: AtomicU32 = AtomicU32::new(49152);

type Manager = VsockConnectionManager<GuestHal, Doorbell<StrictTransport>, RX_BUF>;

/// Where a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Requested, no answer yet.
    Connecting,
    Connected,
    /// The peer reset it (RST) or shut it down (SHUTDOWN).
    Closed(DisconnectReason),
}

/// One connection, as the tests see it.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    pub peer: VsockAddr,
    /// The guest's port.
    pub port: u32,
    pub state: State,
    /// Made by the peer (accepted on a listened port).
    pub incoming: bool,
    /// The peer's `buf_alloc` and `fwd_cnt` from its last packet.
    peer_alloc: u32,
    peer_fwd: u32,
    /// Payload bytes sent (wrapping, as the header's counters).
    tx_cnt: u32,
    /// Bytes read since the last credit update.
    unreported: u32,
    /// When (TSC) the guest last asked the peer for credit, while it had
    /// none; cleared when credit comes.
    asked: Option<u64>,
}

impl Conn {
    /// What the peer can take now (0 when it has not said yet).
    fn peer_free(&self) -> usize {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd);
        self.peer_alloc.saturating_sub(in_flight) as usize
    }
}

/// Packets and notifications, for the report lines.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Events the manager passed on (packets other than credit requests
    /// and refused connection requests).
    pub rx_events: u64,
    /// Data packets sent, and their bytes.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Credit updates sent by `recv`.
    pub credit_updates: u64,
    pub rx_notifies: u64,
    pub tx_notifies: u64,
}

impl core::fmt::Display for Counters {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} packets received, {} sent ({} bytes), {} credit updates; \
             {} receive and {} transmit notifications",
            self.rx_events,
            self.tx_packets,
            self.tx_bytes,
            self.credit_updates,
            self.rx_notifies,
            self.tx_notifies
        )
    }
}

/// A vsock device with its connections.
pub struct Vsock {
    /// First, so that it is dropped (queues unset, device reset) first.
    mgr: Manager,
    health: Rc<Health>,
    bell: Rc<Bell>,
    conns: Vec<Conn>,
    /// Each connection's receive buffer (its `buf_alloc`).
    capacity: u32,
    counters: Counters,
}

/// The text of a driver error, or of the device failure behind it.
fn explain(health: &Health, what: &str, e: Error) -> String {
    health.explain(format!("{}: {}", what, e))
}

impl Vsock {
    /// Initialises `dev` through `VirtIOSocket` (features VERSION_1,
    /// EVENT_IDX, INDIRECT_DESC as offered; the receive queue filled) under
    /// a `VsockConnectionManager` whose connections each get `capacity`
    /// bytes of receive buffer.
    pub fn open(devices: &Devices, dev: &Device, capacity: u32) -> Result<Vsock, String> {
        // Read before the driver starts (it writes queue_select meanwhile).
        let [rx, tx] = doorbell::registers(devices, dev, [RX_QUEUE, TX_QUEUE])?;
        let mut transport = devices.open(dev)?;
        transport.notify_directly(TX_QUEUE, tx);
        let health = transport.health();
        let door = Doorbell::new(transport);
        let bell = door.bell();
        let socket = VirtIOSocket::<GuestHal, _, RX_BUF>::new(door)
            .map_err(|e| explain(&health, "init", e))?;
        health.check()?;
        bell.set_register(RX_QUEUE, rx);
        Ok(Vsock {
            mgr: VsockConnectionManager::new_with_capacity(socket, capacity),
            health,
            bell,
            conns: Vec::new(),
            capacity,
            counters: Counters::default(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.mgr.guest_cid()
    }

    pub fn counters(&self) -> Counters {
        Counters {
            rx_notifies: self.bell.sent(RX_QUEUE),
            tx_notifies: self.bell.sent(TX_QUEUE),
            ..self.counters
        }
    }

    pub fn conn(&self, i: usize) -> &Conn {
        &self.conns[i]
    }

    /// The connections so far (closed ones too), in the order they were
    /// made or accepted.
    pub fn conns(&self) -> &[Conn] {
        &self.conns
    }

    /// A driver call, its transmit requests bounded (`Health::blocking`):
    /// `Err` for a device failure, else the driver's result.
    fn call<R>(
        &mut self,
        f: impl FnOnce(&mut Manager) -> virtio_drivers::Result<R>,
    ) -> Result<virtio_drivers::Result<R>, String> {
        let mgr = &mut self.mgr;
        self.health.blocking(|| f(mgr))
    }

    /// `call`, any driver error an `Err` naming `what`.
    fn blocking<R>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Manager) -> virtio_drivers::Result<R>,
    ) -> Result<R, String> {
        match self.call(f) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(explain(&self.health, what, e)),
            Err(why) => Err(format!("{}: {}", what, why)),
        }
    }

    /// Asks the host (CID 2) for a connection to `port`; the new
    /// connection's index.
    pub fn connect(&mut self, port: u32) -> Result<usize, String> {
        let peer = VsockAddr {
            cid: VMADDR_CID_HOST,
            port,
        };
        let local = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        self.blocking("connect", |m| m.connect(peer, local))?;
        self.conns.push(Conn {
            peer,
            port: local,
            state: State::Connecting,
            incoming: false,
            peer_alloc: 0,
            peer_fwd: 0,
            tx_cnt: 0,
            unreported: 0,
            asked: None,
        });
        Ok(self.conns.len() - 1)
    }

    /// Accepts connections to `port` from now on.
    pub fn listen(&mut self, port: u32) {
        self.mgr.listen(port);
    }

    /// The latest connection between `peer` and the guest's `port` (a
    /// peer may reuse its port for a new connection).
    fn find(&self, peer: VsockAddr, port: u32) -> Option<usize> {
        self.conns
            .iter()
            .rposition(|c| c.peer == peer && c.port == port)
    }

    /// One round: every packet that had arrived (up to the queue's size),
    /// each event applied to its connection, then the held notifications.
    pub fn poll(&mut self) -> Result<(), String> {
        for _ in 0..POLLS_PER_ROUND {
            let event = match self.blocking("rx", |m| m.poll())? {
                Some(event) => event,
                None => continue,
            };
            self.counters.rx_events += 1;
            let peer = event.source;
            let port = event.destination.port;
            if event.event_type == VsockEventType::ConnectionRequest {
                // The manager accepted it (it drops refused ones).
                self.conns.push(Conn {
                    peer,
                    port,
                    state: State::Connected,
                    incoming: true,
                    peer_alloc: 0,
                    peer_fwd: 0,
                    tx_cnt: 0,
                    unreported: 0,
                    asked: None,
                });
            }
            let Some(i) = self.find(peer, port) else {
                continue;
            };
            let c = &mut self.conns[i];
            c.peer_alloc = event.buffer_status.buffer_allocation;
            c.peer_fwd = event.buffer_status.forward_count;
            if c.peer_free() > 0 {
                c.asked = None;
            }
            match event.event_type {
                VsockEventType::Connected if c.state == State::Connecting => {
                    c.state = State::Connected
                }
                VsockEventType::Disconnected { reason } => c.state = State::Closed(reason),
                _ => {}
            }
        }
        self.bell.flush();
        self.health.check()
    }

    /// Polls until `done` holds (true) or `timeout_us` passed (false).
    pub fn wait(
        &mut self,
        timeout_us: u64,
        mut done: impl FnMut(&Vsock) -> bool,
    ) -> Result<bool, String> {
        let start = rdtsc();
        let limit = us_to_cycles(timeout_us);
        loop {
            self.poll()?;
            if done(self) {
                return Ok(true);
            }
            if rdtsc() - start > limit {
                return Ok(false);
            }
        }
    }

    /// Sends the start of `data` (at most `MAX_PKT` bytes and the peer's
    /// credit) as one packet; the bytes sent, 0 when the peer has no room.
    /// Without room the driver asks the peer for credit (CREDIT_REQUEST),
    /// once, and again only after `REASK_US` without credit: the peer
    /// sends updates as its buffer drains.
    pub fn send(&mut self, i: usize, data: &[u8]) -> Result<usize, String> {
        let c = self.conns[i];
        let free = c.peer_free();
        let n = match free {
            // Nothing known to be free: ask with the whole packet (the
            // driver's view decides, and requests credit), unless asked
            // recently.
            0 => match c.asked {
                Some(t) if rdtsc() - t < us_to_cycles(REASK_US) => return Ok(0),
                _ => {
                    self.conns[i].asked = Some(rdtsc());
                    data.len().min(MAX_PKT)
                }
            },
            free => data.len().min(MAX_PKT).min(free),
        };
        if n == 0 {
            return Ok(0);
        }
        match self.call(|m| m.send(c.peer, c.port, &data[..n])) {
            Ok(Ok(())) => {}
            Ok(Err(Error::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer))) => {
                return Ok(0)
            }
            Ok(Err(e)) => return Err(explain(&self.health, "send", e)),
            Err(why) => return Err(format!("send: {}", why)),
        }
        let c = &mut self.conns[i];
        c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
        self.counters.tx_packets += 1;
        self.counters.tx_bytes += n as u64;
        Ok(n)
    }

    /// Reads what has arrived on connection `i` into `buf`; the bytes
    /// read. Sends a credit update once a quarter of the connection's
    /// buffer was read since the last one. 0 also for a connection the
    /// manager has dropped (closed by the peer and read to the end).
    pub fn recv(&mut self, i: usize, buf: &mut [u8]) -> Result<usize, String> {
        let c = self.conns[i];
        let n = match self.mgr.recv(c.peer, c.port, buf) {
            Ok(n) => n,
            Err(Error::SocketDeviceError(SocketError::NotConnected)) => return Ok(0),
            Err(e) => return Err(explain(&self.health, "recv", e)),
        };
        let c = &mut self.conns[i];
        c.unreported = c.unreported.wrapping_add(n as u32);
        let open = c.state == State::Connected;
        if open && c.unreported >= self.capacity / 4 {
            c.unreported = 0;
            let (peer, port) = (c.peer, c.port);
            self.blocking("credit update", |m| m.update_credit(peer, port))?;
            self.counters.credit_updates += 1;
        }
        Ok(n)
    }

    /// Bytes waiting to be read on connection `i` (0 once it is gone).
    pub fn available(&mut self, i: usize) -> usize {
        let c = self.conns[i];
        self.mgr
            .recv_buffer_available_bytes(c.peer, c.port)
            .unwrap_or(0)
    }

    /// Asks the peer to close connection `i` (SHUTDOWN, both directions).
    pub fn shutdown(&mut self, i: usize) -> Result<(), String> {
        let c = self.conns[i];
        self.unless_gone("shutdown", |m| m.shutdown(c.peer, c.port))
    }

    /// Resets connection `i` (RST) and forgets it in the driver.
    pub fn force_close(&mut self, i: usize) -> Result<(), String> {
        let c = self.conns[i];
        self.conns[i].state = State::Closed(DisconnectReason::Reset);
        self.unless_gone("reset", |m| m.force_close(c.peer, c.port))
    }

    /// `blocking` for a call on a connection the manager may already have
    /// dropped (then there is nothing to do).
    fn unless_gone(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Manager) -> virtio_drivers::Result<()>,
    ) -> Result<(), String> {
        match self.call(f) {
            Ok(Ok(())) | Ok(Err(Error::SocketDeviceError(SocketError::NotConnected))) => Ok(()),
            Ok(Err(e)) => Err(explain(&self.health, what, e)),
            Err(why) => Err(format!("{}: {}", what, why)),
        }
    }

    /// SHUTDOWN, then up to `timeout_us` for the peer's RST (or SHUTDOWN);
    /// without one, RST. Whether the peer answered.
    pub fn close(&mut self, i: usize, timeout_us: u64) -> Result<bool, String> {
        if matches!(self.conns[i].state, State::Closed(_)) {
            return Ok(true);
        }
        self.shutdown(i)?;
        let answered = self.wait(timeout_us, |v| matches!(v.conns[i].state, State::Closed(_)))?;
        if !answered {
            self.force_close(i)?;
        }
        Ok(answered)
    }

    /// The first device failure on record, if any.
    pub fn check(&self) -> Result<(), String> {
        self.health.check()
    }
}

/// `reason` as a word for report lines.
pub fn reason_text(reason: DisconnectReason) -> &'static str {
    match reason {
        DisconnectReason::Reset => "reset",
        DisconnectReason::Shutdown => "shutdown",
    }
}
