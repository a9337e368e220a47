//! One connection's state: the handshake, credit in both directions (virtio 1.2 §5.10.6.3),
//! shutdown, and the bytes the guest sent that the host socket has not taken yet.

use std::io::{self, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use crate::proto::{Header, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// A host client that has not finished its `CONNECT <port>\n` line may send at most this
/// many bytes of it.
pub(crate) const MAX_CONNECT_LINE: usize = 32;

/// Where a connection is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// A host client connected to the socket path; its `CONNECT <port>\n` line so far.
    Handshake(Vec<u8>),
    /// Host-initiated: the request is (to be) sent to the guest, no response yet.
    Requested,
    /// Data flows.
    Established,
}

/// What the device owes the guest for this connection, besides data.
pub(crate) mod owe {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const SHUTDOWN: u8 = 4;
    pub const CREDIT_UPDATE: u8 = 8;
}

/// One connection between a guest port and a host Unix socket.
#[derive(Debug)]
pub(crate) struct Conn {
    pub stream: UnixStream,
    pub state: State,
    /// The host side's port (the guest's destination port, or one the device chose for a
    /// host-initiated connection).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// Control packets owed ([`owe`] bits).
    pub owe: u8,
    /// The flags of the shutdown owed.
    pub shutdown_flags: u32,
    /// The guest's shutdown flags so far.
    pub peer_shut: u32,
    /// The host stream may have data (an edge was seen and no read has met `EAGAIN` since).
    pub readable: bool,
    /// The host stream reached end of file (the host will send no more).
    pub host_eof: bool,
    /// The host closed the stream altogether (`EPOLLHUP`).
    pub host_hup: bool,
    /// The guest asked to close (both shutdown flags): close once `pending` is written.
    pub closing: bool,
    /// The host stream's write side is shut (the guest will send no more).
    pub write_shut: bool,
    /// Writability of the host stream is watched (only while bytes wait for it).
    pub watching_out: bool,
    /// Host-initiated: when the guest must have answered by.
    pub deadline: Option<std::time::Instant>,
    /// In the device's work list.
    pub queued: bool,
    /// Our receive buffer, advertised to the guest: the most bytes we hold for it.
    buf_alloc: u32,
    /// Bytes of guest data written to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// Bytes of guest data received.
    rx_cnt: Wrapping<u32>,
    /// `fwd_cnt` as the guest was last told.
    fwd_cnt_sent: Wrapping<u32>,
    /// The guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes of host data sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// Guest data the host stream did not take yet (from `pending_at`).
    pending: Vec<u8>,
    pending_at: usize,
}

impl Conn {
    /// A connection in `state` on `stream`, advertising `buf_alloc` bytes of buffer.
    pub fn new(stream: UnixStream, state: State, buf_alloc: u32) -> Self {
        Self {
            stream,
            state,
            local_port: 0,
            peer_port: 0,
            owe: 0,
            shutdown_flags: 0,
            peer_shut: 0,
            readable: false,
            host_eof: false,
            host_hup: false,
            closing: false,
            write_shut: false,
            watching_out: false,
            deadline: None,
            queued: false,
            buf_alloc,
            fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            pending: Vec::new(),
            pending_at: 0,
        }
    }

    /// Takes the guest's credit information, which every packet carries.
    pub fn peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
    }

    /// How many more bytes the guest can take now.
    pub fn credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Counts `n` bytes sent to the guest.
    pub fn sent(&mut self, n: u32) {
        self.tx_cnt += Wrapping(n);
    }

    /// Whether the device has something to send the guest for this connection.
    pub fn has_work(&self) -> bool {
        self.owe != 0 || self.wants_data()
    }

    /// Whether host data may go to the guest now.
    pub fn wants_data(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && self.peer_shut & SHUTDOWN_RCV == 0
            && self.credit() > 0
    }

    /// The credit fields of a packet to the guest; the guest then knows our `fwd_cnt`.
    pub fn credit_fields(&mut self) -> (u32, u32) {
        self.fwd_cnt_sent = self.fwd_cnt;
        self.owe &= !owe::CREDIT_UPDATE;
        (self.buf_alloc, self.fwd_cnt.0)
    }

    /// Bytes buffered for the host stream.
    pub fn pending_len(&self) -> usize {
        self.pending.len() - self.pending_at
    }

    /// Whether `len` more bytes from the guest stay within the buffer it was told of. A
    /// guest that honours credit never fails this.
    pub fn fits(&self, len: u32) -> bool {
        let held = (self.rx_cnt - self.fwd_cnt).0;
        u64::from(held) + u64::from(len) <= u64::from(self.buf_alloc)
    }

    /// Counts `len` bytes received from the guest, `written` of them already written to the
    /// host stream; the rest must go to [`buffer`](Self::buffer).
    pub fn received(&mut self, len: u32, written: u32) {
        self.rx_cnt += Wrapping(len);
        self.forwarded(written);
    }

    /// Keeps bytes the host stream did not take.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.pending
    }

    fn forwarded(&mut self, n: u32) {
        self.fwd_cnt += Wrapping(n);
        // The guest sees free space `buf_alloc - (rx_cnt - fwd_cnt_sent)`: tell it more once
        // that is under half the buffer and we freed some, so a sender never stalls.
        let seen_free = self
            .buf_alloc
            .saturating_sub((self.rx_cnt - self.fwd_cnt_sent).0);
        if self.fwd_cnt != self.fwd_cnt_sent && seen_free < self.buf_alloc / 2 {
            self.owe |= owe::CREDIT_UPDATE;
        }
    }

    /// Writes buffered bytes to the host stream until it would block. `Ok(true)` when the
    /// buffer is empty.
    pub fn flush(&mut self) -> io::Result<bool> {
        while self.pending_len() > 0 {
            match self.stream.write(&self.pending[self.pending_at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending_at += n;
                    // At most `buf_alloc` bytes are held: `n` fits in a u32.
                    self.forwarded(u32::try_from(n).unwrap_or(u32::MAX));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Give back a large buffer once it drained.
        if self.pending.capacity() > 64 * 1024 {
            self.pending = Vec::new();
        } else {
            self.pending.clear();
        }
        self.pending_at = 0;
        Ok(true)
    }

    /// The guest's shutdown flags: owes a shutdown of the host stream's write side once the
    /// buffer drained. Returns whether the connection is over (both sides done sending, or
    /// the guest closed), once nothing is buffered.
    pub fn peer_shutdown(&mut self, flags: u32) {
        self.peer_shut |= flags & SHUTDOWN_BOTH;
        if self.peer_shut == SHUTDOWN_BOTH {
            self.closing = true;
        }
    }

    /// Whether the connection is over and may be closed with a reset: the guest closed, or
    /// neither side will send any more, and the guest's data reached the host stream.
    pub fn finished(&self) -> bool {
        self.pending_len() == 0
            && (self.closing || (self.host_eof && self.peer_shut & SHUTDOWN_SEND != 0))
    }

    /// Owes the guest a shutdown for end of file on the host stream.
    pub fn host_closed(&mut self) {
        self.host_eof = true;
        self.shutdown_flags = if self.host_hup {
            SHUTDOWN_BOTH
        } else {
            SHUTDOWN_SEND
        };
        self.owe |= owe::SHUTDOWN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::OP_RW;

    fn conn(buf_alloc: u32) -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Conn::new(a, State::Established, buf_alloc);
        c.peer_credit(&Header {
            op: OP_RW,
            buf_alloc: 1000,
            ..Header::default()
        });
        (c, b)
    }

    #[test]
    fn credit_toward_the_guest_follows_its_fwd_cnt() {
        let (mut c, _peer) = conn(4096);
        assert_eq!(c.credit(), 1000);
        c.sent(600);
        assert_eq!(c.credit(), 400);
        c.sent(400);
        assert_eq!(c.credit(), 0);
        c.readable = true;
        assert!(!c.wants_data(), "no credit, no data");
        c.peer_credit(&Header {
            buf_alloc: 1000,
            fwd_cnt: 700,
            ..Header::default()
        });
        assert_eq!(c.credit(), 700);
        assert!(c.wants_data());
        // A guest reporting more consumed than sent (or a tiny buffer) gets no negative credit.
        c.peer_credit(&Header {
            buf_alloc: 10,
            fwd_cnt: 0,
            ..Header::default()
        });
        assert_eq!(c.credit(), 0);
    }

    #[test]
    fn counters_wrap() {
        let (mut c, _peer) = conn(4096);
        c.tx_cnt = Wrapping(u32::MAX - 10);
        c.peer_credit(&Header {
            buf_alloc: 100,
            fwd_cnt: u32::MAX - 10,
            ..Header::default()
        });
        c.sent(50);
        assert_eq!(c.credit(), 50);
        c.rx_cnt = Wrapping(u32::MAX - 5);
        c.fwd_cnt = Wrapping(u32::MAX - 5);
        assert!(c.fits(4096));
        c.received(20, 20);
        assert!(c.fits(4096));
        assert!(!c.fits(4097));
    }

    #[test]
    fn the_guest_may_not_send_past_our_buffer() {
        let (mut c, _peer) = conn(100);
        assert!(c.fits(100));
        assert!(!c.fits(101));
        c.received(60, 0);
        c.buffer().extend_from_slice(&[1; 60]);
        assert!(c.fits(40));
        assert!(!c.fits(41));
        assert!(!c.fits(u32::MAX));
    }

    #[test]
    fn buffered_bytes_reach_the_stream_and_credit_is_updated() {
        let (mut c, mut peer) = conn(100);
        c.received(80, 0);
        c.buffer().extend_from_slice(&[7; 80]);
        assert_eq!(c.owe, 0);
        assert!(c.flush().unwrap());
        assert_eq!(c.pending_len(), 0);
        // The guest saw 20 bytes free: it is owed an update, with fwd_cnt 80.
        assert_eq!(c.owe & owe::CREDIT_UPDATE, owe::CREDIT_UPDATE);
        assert_eq!(c.credit_fields(), (100, 80));
        assert_eq!(c.owe, 0);
        let mut got = [0u8; 80];
        std::io::Read::read_exact(&mut peer, &mut got).unwrap();
        assert_eq!(got, [7; 80]);
        assert!(c.fits(100));
    }

    #[test]
    fn a_full_host_stream_keeps_the_bytes() {
        let (mut c, peer) = conn(1 << 30);
        let chunk = vec![3u8; 1 << 20];
        let mut total = 0;
        // Fill the socket until it would block.
        loop {
            c.received(chunk.len() as u32, 0);
            c.buffer().extend_from_slice(&chunk);
            total += chunk.len();
            if !c.flush().unwrap() {
                break;
            }
            assert!(total < 1 << 29, "the socket never filled");
        }
        assert!(c.pending_len() > 0);
        drop(peer);
        assert!(c.flush().is_err(), "a closed peer is an error, not a hang");
    }

    #[test]
    fn shutdown_rules() {
        let (mut c, _peer) = conn(100);
        c.peer_shutdown(SHUTDOWN_SEND);
        assert!(!c.finished());
        c.host_closed();
        assert_eq!(c.shutdown_flags, SHUTDOWN_SEND);
        assert!(c.finished(), "neither side sends any more");
        let (mut c, _peer) = conn(100);
        c.received(10, 0);
        c.buffer().extend_from_slice(&[0; 10]);
        c.peer_shutdown(SHUTDOWN_BOTH | 0xf0);
        assert_eq!(c.peer_shut, SHUTDOWN_BOTH);
        assert!(!c.finished(), "the guest's last bytes are still buffered");
        c.flush().unwrap();
        assert!(c.finished());
        let (mut c, _peer) = conn(100);
        c.host_hup = true;
        c.host_closed();
        assert_eq!(c.shutdown_flags, SHUTDOWN_BOTH);
        assert!(c.has_work());
    }
}
