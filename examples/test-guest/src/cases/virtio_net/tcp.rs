//! The TCP part of `test=virtio-net`: connect to the peer, send `bytes` of
//! the guest's stream while taking `bytes` of the host's (full duplex: the
//! host may start sending at any time), then close.
//!
//! Sending is timed from the connection's establishment until the peer has
//! acknowledged the last byte; receiving from the first byte read until the
//! last.

use super::data::{Fnv, Pattern, GUEST_SEED, HOST_SEED};
use super::{rate, Stack, CLOSE_US, SOCKET_BUF, STALL_US};
use crate::platform::arch::rdtsc;
use crate::platform::ram::Arena;
use crate::platform::time::{cycles_to_ns, us_to_cycles};
use crate::println;
use alloc::format;
use alloc::string::String;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::IpAddress;

/// One direction: bytes so far, where in the stream, their checksum, and
/// when it started and finished (TSC).
struct Half {
    bytes: u64,
    pattern: Pattern,
    fnv: Fnv,
    start: Option<u64>,
    end: Option<u64>,
}

impl Half {
    fn new(seed: u64) -> Half {
        Half {
            bytes: 0,
            pattern: Pattern::new(seed),
            fnv: Fnv::new(),
            start: None,
            end: None,
        }
    }

    /// `<n> bytes in <t> ms (<x> MiB/s) fnv1a64 0x<h>`.
    fn summary(&self) -> String {
        let ns = match (self.start, self.end) {
            (Some(s), Some(e)) => cycles_to_ns(e - s),
            _ => 0,
        };
        format!(
            "{} bytes in {} fnv1a64 0x{:016x}",
            self.bytes,
            rate(self.bytes, ns),
            self.fnv.0
        )
    }
}

/// Both directions of the connection.
struct Flow {
    /// Bytes each way.
    total: u64,
    /// `bytes` counts what was handed to the socket.
    out: Half,
    /// Of those, what the peer acknowledged.
    acked: u64,
    into: Half,
    /// Offset of the first received byte that is not the host's stream.
    mismatch: Option<u64>,
}

impl Flow {
    fn new(total: u64) -> Flow {
        let mut out = Half::new(GUEST_SEED);
        out.start = Some(rdtsc());
        Flow {
            total,
            out,
            acked: 0,
            into: Half::new(HOST_SEED),
            mismatch: None,
        }
    }

    fn done(&self) -> bool {
        self.acked == self.total && self.into.bytes == self.total
    }

    /// Grows whenever anything moved.
    fn progress(&self) -> u64 {
        self.out.bytes + self.acked + self.into.bytes
    }

    /// Fills the socket's send buffer with the next bytes of the stream.
    fn push(&mut self, socket: &mut tcp::Socket) -> Result<(), String> {
        let (total, out) = (self.total, &mut self.out);
        while out.bytes < total && socket.can_send() {
            let left = usize::try_from(total - out.bytes).unwrap_or(usize::MAX);
            let n = socket
                .send(|buf| {
                    let n = buf.len().min(left);
                    out.pattern.fill(&mut buf[..n]);
                    out.fnv.add(&buf[..n]);
                    (n, n)
                })
                .map_err(|e| format!("tcp send: {}", e))?;
            if n == 0 {
                break;
            }
            out.bytes += n as u64;
        }
        self.acked = out.bytes - socket.send_queue() as u64;
        if self.acked == total && out.end.is_none() {
            out.end = Some(rdtsc());
        }
        Ok(())
    }

    /// Takes what arrived: checked against the host's stream, summed.
    fn pull(&mut self, socket: &mut tcp::Socket) -> Result<(), String> {
        while socket.can_recv() {
            let (into, mismatch) = (&mut self.into, &mut self.mismatch);
            let n = socket
                .recv(|buf| {
                    if mismatch.is_none() {
                        if let Err(at) = into.pattern.check(buf) {
                            *mismatch = Some(into.bytes + at as u64);
                        }
                    }
                    into.fnv.add(buf);
                    (buf.len(), buf.len())
                })
                .map_err(|e| format!("tcp recv: {}", e))?;
            if n == 0 {
                break;
            }
            let t = rdtsc();
            into.start.get_or_insert(t);
            into.bytes += n as u64;
            if into.bytes > self.total {
                return Err(format!("the host sent more than {} bytes", self.total));
            }
            if into.bytes == self.total {
                into.end = Some(t);
            }
        }
        Ok(())
    }

    /// Why the connection cannot finish, if it cannot.
    fn broken(&self, socket: &tcp::Socket) -> Option<String> {
        let state = socket.state();
        let why = if !socket.is_active() {
            format!("connection {}", state)
        } else if !socket.may_recv() && self.into.bytes < self.total {
            String::from("the host closed its side")
        } else {
            return None;
        };
        Some(format!(
            "{} after {} bytes acknowledged, {} received",
            why, self.acked, self.into.bytes
        ))
    }

    /// The two result lines; `Err` if the host's bytes were not its stream.
    fn report(&self) -> Result<(), String> {
        println!("virtio-net: tcp sent {}", self.out.summary());
        println!("virtio-net: tcp received {}", self.into.summary());
        match self.mismatch {
            Some(at) => Err(format!(
                "received bytes differ from the host's stream from byte {}",
                at
            )),
            None => Ok(()),
        }
    }
}

impl<'a> Stack<'_, 'a> {
    /// Connects, streams both ways, prints the result lines, closes.
    pub(super) fn transfer(&mut self, arena: &'a Arena) -> Result<(), String> {
        let handle = self.connect(arena)?;
        let flow = self.stream(handle)?;
        let result = flow.report();
        self.close(handle);
        result
    }

    fn peer_text(&self) -> String {
        format!("{}:{}", self.params.peer, self.params.port)
    }

    /// A socket with `SOCKET_BUF` each way, connected (bounded wait).
    fn connect(&mut self, arena: &'a Arena) -> Result<SocketHandle, String> {
        let rx = tcp::SocketBuffer::new(arena.take(SOCKET_BUF)?);
        let tx = tcp::SocketBuffer::new(arena.take(SOCKET_BUF)?);
        let mut socket = tcp::Socket::new(rx, tx);
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(None);
        let local_port = 49152 + (rdtsc() % 16384) as u16;
        let remote = (IpAddress::Ipv4(self.params.peer), self.params.port);
        socket
            .connect(self.iface.context(), remote, local_port)
            .map_err(|e| format!("connect: {}", e))?;
        let handle = self.sockets.add(socket);
        let t0 = rdtsc();
        loop {
            self.poll()?;
            match self.sockets.get::<tcp::Socket>(handle).state() {
                State::Established => return Ok(handle),
                State::Closed => {
                    return Err(format!("{} refused the connection", self.peer_text()))
                }
                _ if rdtsc() - t0 > us_to_cycles(STALL_US) => {
                    return Err(format!("no connection to {} within 10 s", self.peer_text()))
                }
                _ => {}
            }
        }
    }

    /// Both directions until done; `Err` when the connection breaks or
    /// nothing moves for `STALL_US`.
    fn stream(&mut self, handle: SocketHandle) -> Result<Flow, String> {
        let mut flow = Flow::new(self.params.bytes);
        let (mut seen, mut since) = (flow.progress(), rdtsc());
        while !flow.done() {
            self.poll()?;
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            flow.push(socket)?;
            flow.pull(socket)?;
            if let Some(why) = flow.broken(socket) {
                return Err(why);
            }
            let now = rdtsc();
            if flow.progress() != seen {
                (seen, since) = (flow.progress(), now);
            } else if now - since > us_to_cycles(STALL_US) {
                return Err(format!(
                    "nothing moved for 10 s: {} of {} bytes acknowledged, {} received",
                    flow.acked, flow.total, flow.into.bytes
                ));
            }
        }
        Ok(flow)
    }

    /// Sends FIN and waits (at most `CLOSE_US`) for the peer's.
    fn close(&mut self, handle: SocketHandle) {
        self.sockets.get_mut::<tcp::Socket>(handle).close();
        let t0 = rdtsc();
        while rdtsc() - t0 < us_to_cycles(CLOSE_US) && self.poll().is_ok() {
            let state = self.sockets.get::<tcp::Socket>(handle).state();
            if matches!(state, State::Closed | State::TimeWait) {
                break;
            }
        }
    }
}
