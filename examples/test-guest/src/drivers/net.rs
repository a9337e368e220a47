//! virtio-net as a smoltcp `phy::Device`: `Nic` drives virtio-drivers'
//! `VirtIONetRaw` (queue 0 receive, queue 1 transmit) over a
//! `StrictTransport` (notifications held and filtered by `Doorbell`), polled, with its own buffers (2 KiB each, from the
//! caller's `Arena`): every receive descriptor holds one buffer, each
//! transmitted frame is one descriptor (header and frame in one buffer).
//!
//! Nothing here blocks: received frames are handed to smoltcp where they
//! lie and their buffer goes back to the device on the next `receive`;
//! transmit buffers come back when the device has used them. What the
//! device gets wrong (a frame longer than its buffer, a token that was not
//! handed out, a driver error) is recorded (`Nic::check`) and stops the
//! traffic instead of panicking or spinning.

use crate::drivers::doorbell::{Bell, Doorbell, Register};
use crate::drivers::hal::GuestHal;
use crate::drivers::transport::StrictTransport;
use crate::platform::ram::Arena;
use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;

/// Entries per queue; the device must offer at least this many.
pub const QUEUE_SIZE: usize = 256;
/// Size of every receive and transmit buffer (header and frame).
const BUF_LEN: usize = 2048;
/// Ethernet header (no FCS, no VLAN tag).
const ETH_HEADER: usize = 14;
/// The longest virtio-net header (VERSION_1: 12 bytes; legacy: 10).
const HDR_MAX: usize = 12;
/// IP MTU without a smaller one from the device.
pub const DEFAULT_MTU: u16 = 1500;

/// The queues `VirtIONetRaw` uses.
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;

type Raw = VirtIONetRaw<GuestHal, Doorbell<StrictTransport>, QUEUE_SIZE>;

/// Frames and failures, for the case's report.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames smoltcp produced while every transmit buffer was in flight.
    pub tx_dropped: u64,
    /// Notifications sent to the receive and the transmit queue.
    pub rx_notifies: u64,
    pub tx_notifies: u64,
}

/// The receive side: the buffers, which one each descriptor token holds,
/// and the one smoltcp last read (given back on the next `receive`).
struct RxRing<'a> {
    bufs: Vec<&'a mut [u8]>,
    slot: Vec<Option<usize>>,
    done: Option<usize>,
    error: Option<String>,
}

/// The transmit side: the buffers, the free ones, and per descriptor
/// token the buffer and length in flight.
struct TxPool<'a> {
    bufs: Vec<&'a mut [u8]>,
    free: Vec<usize>,
    inflight: Vec<Option<(usize, usize)>>,
    /// Where a frame goes when no buffer is free (dropped).
    scratch: Vec<u8>,
    error: Option<String>,
    counters: Counters,
}

/// A virtio-net device as a smoltcp `Device`.
pub struct Nic<'a> {
    /// First, so that it is dropped (queues unset, device reset) before
    /// the buffers it points at.
    net: Box<Raw>,
    rx: RxRing<'a>,
    tx: TxPool<'a>,
    /// IP MTU smoltcp is told.
    mtu: u16,
    /// The queue notifications the driver asked for, sent by `flush`.
    bell: Rc<Bell>,
}

impl<'a> Nic<'a> {
    /// Initialises the device through `VirtIONetRaw` (features MAC, STATUS,
    /// VERSION_1, EVENT_IDX, INDIRECT_DESC as offered) and fills the
    /// receive queue. `mtu` is the IP MTU (at most `DEFAULT_MTU`).
    pub fn new(transport: StrictTransport, arena: &'a Arena, mtu: u16) -> Result<Self, String> {
        let health = transport.health();
        let doorbell = Doorbell::new(transport);
        let bell = doorbell.bell();
        let net = Raw::new(doorbell).map_err(|e| health.explain(format!("init: {}", e)))?;
        health.check()?;
        let mut nic = Nic {
            net: Box::new(net),
            rx: RxRing {
                bufs: arena.take_many(QUEUE_SIZE, BUF_LEN)?,
                slot: vec![None; QUEUE_SIZE],
                done: None,
                error: None,
            },
            tx: TxPool {
                free: (0..QUEUE_SIZE).rev().collect(),
                bufs: arena.take_many(QUEUE_SIZE, BUF_LEN)?,
                inflight: vec![None; QUEUE_SIZE],
                scratch: Vec::new(),
                error: None,
                counters: Counters::default(),
            },
            mtu: mtu.min(DEFAULT_MTU),
            bell,
        };
        for idx in 0..QUEUE_SIZE {
            nic.rx.give(&mut nic.net, idx);
        }
        nic.check()?;
        Ok(nic)
    }

    /// From now on, queue notifications wait for `flush` and go straight
    /// to these registers (receive queue, transmit queue).
    pub fn use_registers(&self, [rx, tx]: [Register; 2]) {
        self.bell.set_register(RX_QUEUE, rx);
        self.bell.set_register(TX_QUEUE, tx);
    }

    /// Sends the queue notifications the device wants (call after each
    /// round of work).
    pub fn flush(&self) {
        self.bell.flush();
    }

    pub fn mac(&self) -> [u8; 6] {
        self.net.mac_address()
    }

    pub fn counters(&self) -> Counters {
        Counters {
            rx_notifies: self.bell.sent(RX_QUEUE),
            tx_notifies: self.bell.sent(TX_QUEUE),
            ..self.tx.counters
        }
    }

    /// The first thing the device got wrong, if anything.
    pub fn check(&self) -> Result<(), String> {
        match (&self.rx.error, &self.tx.error) {
            (Some(e), _) | (None, Some(e)) => Err(e.clone()),
            (None, None) => Ok(()),
        }
    }

    /// The next received frame, if any: (buffer index, header length,
    /// frame length), checked against the buffer.
    fn take_frame(&mut self) -> Option<(usize, usize, usize)> {
        let token = self.net.poll_receive()?;
        let Some(idx) = self
            .rx
            .slot
            .get_mut(usize::from(token))
            .and_then(Option::take)
        else {
            self.rx
                .fail(format!("rx: used token {} was not handed out", token));
            return None;
        };
        // SAFETY: `bufs[idx]` is the buffer given to the device with
        // `token` (`slot`), not touched since.
        let done = unsafe { self.net.receive_complete(token, &mut *self.rx.bufs[idx]) };
        match done {
            Ok((hdr, len)) if hdr + len <= BUF_LEN => Some((idx, hdr, len)),
            Ok((hdr, len)) => {
                self.rx.fail(format!(
                    "rx: {}-byte frame in a {}-byte buffer",
                    hdr + len,
                    BUF_LEN
                ));
                None
            }
            Err(e) => {
                self.rx.fail(format!("rx: {}", e));
                None
            }
        }
    }
}

impl RxRing<'_> {
    fn fail(&mut self, why: String) {
        self.error.get_or_insert(why);
    }

    /// Hands buffer `idx` to the device.
    fn give(&mut self, net: &mut Raw, idx: usize) {
        // SAFETY: `bufs[idx]` is owned by the ring and outlives the queue
        // (`Nic::net` is dropped first); it is not touched until the device
        // returns it through `take_frame`.
        match unsafe { net.receive_begin(&mut *self.bufs[idx]) } {
            Ok(token) => match self.slot.get_mut(usize::from(token)) {
                Some(slot) => *slot = Some(idx),
                None => self.fail(format!("rx: token {} out of range", token)),
            },
            Err(e) => self.fail(format!("rx: queueing a buffer: {}", e)),
        }
    }
}

impl TxPool<'_> {
    /// Takes back the buffers the device has used.
    fn reclaim(&mut self, net: &mut Raw) {
        while let Some(token) = net.poll_transmit() {
            let Some((idx, len)) = self
                .inflight
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                self.error
                    .get_or_insert(format!("tx: used token {} was not handed out", token));
                return;
            };
            // SAFETY: the same buffer and length `send` gave with `token`.
            match unsafe { net.transmit_complete(token, &self.bufs[idx][..len]) } {
                Ok(_) => self.free.push(idx),
                Err(e) => {
                    self.error.get_or_insert(format!("tx: {}", e));
                    return;
                }
            }
        }
    }

    /// Lets `f` build a frame that is not sent (counted).
    fn drop_frame<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        self.counters.tx_dropped += 1;
        if self.scratch.len() < len {
            self.scratch.resize(len, 0);
        }
        f(&mut self.scratch[..len])
    }

    /// Builds a frame of `len` bytes with `f` in a free buffer (after the
    /// virtio-net header) and queues it; without a free buffer, or for a
    /// frame too long for one, `f` writes to `scratch` and the frame is
    /// dropped (counted).
    fn send<R>(&mut self, net: &mut Raw, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        self.reclaim(net);
        let idx = match self.free.pop() {
            Some(idx) if len <= BUF_LEN - HDR_MAX => idx,
            other => {
                self.free.extend(other);
                return self.drop_frame(len, f);
            }
        };
        let buf = &mut *self.bufs[idx];
        let hdr = match net.fill_buffer_header(buf) {
            Ok(hdr) if hdr <= HDR_MAX => hdr,
            other => {
                self.error.get_or_insert(format!("tx: header: {:?}", other));
                self.free.push(idx);
                return self.drop_frame(len, f);
            }
        };
        let r = f(&mut buf[hdr..hdr + len]);
        // SAFETY: `bufs[idx]` is owned by the pool and outlives the queue;
        // it is not touched until `reclaim` gets it back from the device.
        match unsafe { net.transmit_begin(&buf[..hdr + len]) } {
            Ok(token) => match self.inflight.get_mut(usize::from(token)) {
                Some(slot) => {
                    *slot = Some((idx, hdr + len));
                    self.counters.tx_frames += 1;
                }
                None => {
                    self.error
                        .get_or_insert(format!("tx: token {} out of range", token));
                }
            },
            Err(e) => {
                self.free.push(idx);
                self.error.get_or_insert(format!("tx: {}", e));
            }
        }
        r
    }
}

/// A received frame, in its buffer.
pub struct RxTok<'b> {
    frame: &'b [u8],
}

/// The right to send one frame.
pub struct TxTok<'b, 'a> {
    net: &'b mut Raw,
    tx: &'b mut TxPool<'a>,
}

impl phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.frame)
    }
}

impl phy::TxToken for TxTok<'_, '_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.tx.send(self.net, len, f)
    }
}

impl<'a> phy::Device for Nic<'a> {
    type RxToken<'b>
        = RxTok<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxTok<'b, 'a>
    where
        Self: 'b;

    fn receive(&mut self, _: Instant) -> Option<(RxTok<'_>, TxTok<'_, 'a>)> {
        if let Some(idx) = self.rx.done.take() {
            self.rx.give(&mut self.net, idx);
        }
        if self.rx.error.is_some() || self.tx.error.is_some() {
            return None;
        }
        let (idx, hdr, len) = self.take_frame()?;
        self.rx.done = Some(idx);
        self.tx.counters.rx_frames += 1;
        let rx = RxTok {
            frame: &self.rx.bufs[idx][hdr..hdr + len],
        };
        let tx = TxTok {
            net: &mut self.net,
            tx: &mut self.tx,
        };
        Some((rx, tx))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxTok<'_, 'a>> {
        self.tx.reclaim(&mut self.net);
        let ready = !self.tx.free.is_empty() && self.net.can_send() && self.tx.error.is_none();
        ready.then_some(TxTok {
            net: &mut self.net,
            tx: &mut self.tx,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = usize::from(self.mtu) + ETH_HEADER;
        caps
    }
}
