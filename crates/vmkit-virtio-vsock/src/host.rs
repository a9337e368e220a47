//! The host side (Firecracker's "hybrid vsock"): one listening Unix socket for host
//! clients, `PATH_<port>` sockets for guest connections, and the connections between them,
//! all watched by one epoll instance of the device's own (the VMM's event loop watches that
//! one fd).

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use crate::conn::{owe, Conn, State, MAX_CONNECT_LINE};
use crate::proto::*;
use crate::{Error, VsockConfig, VsockStats};

/// The listener's epoll token; connections count up from 1.
const LISTENER: u64 = 0;
/// The connect-timeout timer's epoll token.
const TIMER: u64 = u64::MAX;
/// Host-initiated connections get host ports from here up (as Firecracker's do).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Resets owed for packets of no connection, at most (more are dropped: a guest sending
/// garbage gets no answer to some of it).
const MAX_ORPHAN_RESETS: usize = 256;

/// Rounds of `epoll_wait` one [`Host::poll`] runs at most.
const MAX_POLL_ROUNDS: usize = 1024;

/// What [`Host::fill`] put in a receive packet.
pub(crate) type Filled = Option<u32>;

/// The host side of the device.
pub(crate) struct Host {
    path: PathBuf,
    /// The socket file's inode, to remove only our own file when done.
    inode: u64,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<u64, Conn>,
    by_ports: HashMap<(u32, u32), u64>,
    next_token: u64,
    next_local_port: u32,
    /// Connections with something to send the guest, oldest first.
    work: VecDeque<u64>,
    /// Resets owed for packets of no connection: (host port, guest port).
    orphans: VecDeque<(u32, u32)>,
    max_connections: usize,
    buf_alloc: u32,
    /// Fires when the earliest host-initiated request times out (never read: it is
    /// edge-triggered and re-armed).
    timer: TimerFd,
    timer_armed: bool,
    connect_timeout: Duration,
    pub stats: VsockStats,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("path", &self.path)
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Binds the socket path of `config`.
    pub fn bind(config: &VsockConfig) -> Result<Self, Error> {
        let path = config.uds_path.clone();
        let bind_err = |source| Error::Bind {
            path: path.clone(),
            source,
        };
        if path.symlink_metadata().is_ok() {
            return Err(Error::PathExists(path));
        }
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        let inode = path.metadata().map(|m| m.ino()).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        let ev = EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, LISTENER);
        epoll
            .ctl(ControlOperation::Add, listener.as_raw_fd(), ev)
            .map_err(Error::Epoll)?;
        let timer = TimerFd::new().map_err(|e| Error::Epoll(e.into()))?;
        let ev = EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TIMER);
        epoll
            .ctl(ControlOperation::Add, timer.as_raw_fd(), ev)
            .map_err(Error::Epoll)?;
        Ok(Self {
            path,
            inode,
            listener,
            epoll,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            next_token: 1,
            next_local_port: FIRST_LOCAL_PORT,
            work: VecDeque::new(),
            orphans: VecDeque::new(),
            max_connections: config.max_connections,
            buf_alloc: config.buf_alloc,
            timer,
            timer_armed: false,
            connect_timeout: config.connect_timeout,
            stats: VsockStats::default(),
        })
    }

    /// A duplicate of the epoll fd, readable when a host socket has news.
    pub fn epoll_fd(&self) -> io::Result<OwnedFd> {
        // SAFETY: `self.epoll` owns this fd and outlives the borrow, which only lasts for
        // the duplication.
        unsafe { BorrowedFd::borrow_raw(self.epoll.as_raw_fd()) }.try_clone_to_owned()
    }

    /// The number of open connections (handshakes included).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Closes every connection (the guest is not told: its driver was reset, or will get a
    /// transport reset event).
    pub fn close_all(&mut self) {
        self.conns.clear();
        self.by_ports.clear();
        self.work.clear();
        self.orphans.clear();
    }

    /// Whether there is something to send the guest.
    pub fn has_work(&self) -> bool {
        !self.orphans.is_empty() || !self.work.is_empty()
    }

    // --- host sockets ---------------------------------------------------------------------

    /// Handles what the host sockets report, until nothing is pending.
    pub fn poll(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        for _ in 0..MAX_POLL_ROUNDS {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("vsock: epoll_wait failed: {e}");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            // Handling may add sockets whose first events are then due too.
            for ev in &events[..n] {
                self.host_event(ev.data(), ev.event_set());
            }
        }
        // Each round handles what is new; this many mean sockets keep waking themselves
        // (a bug): leave the rest for the next event rather than hold the event thread.
        log::warn!("vsock: host sockets still busy after {MAX_POLL_ROUNDS} rounds");
    }

    fn host_event(&mut self, token: u64, set: EventSet) {
        if token == LISTENER {
            return self.accept_all();
        }
        if token == TIMER {
            return self.expire_requests();
        }
        let Some(conn) = self.conns.get(&token) else {
            return;
        };
        if matches!(conn.state, State::Handshake(_)) {
            self.read_connect_line(token);
            if !set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                return;
            }
        }
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            conn.host_hup = true;
            if conn.state == State::Requested {
                // The host client gave up before the guest answered.
                return self.kill(token);
            }
        }
        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            conn.readable = true;
        }
        if set.contains(EventSet::OUT) {
            self.flush(token);
        }
        self.schedule(token);
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= self.max_connections {
                        self.stats.refused += 1;
                        log::debug!("vsock: host connection refused: connection limit");
                        continue;
                    }
                    let _ = self.add(stream, State::Handshake(Vec::new()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("vsock: accept on {}: {e}", self.path.display());
                    return;
                }
            }
        }
    }

    /// Watches `stream` and keeps it as a connection in `state`.
    fn add(&mut self, stream: UnixStream, state: State) -> io::Result<u64> {
        stream.set_nonblocking(true)?;
        let token = self.next_token;
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(CONN_EVENTS, token),
        )?;
        self.next_token += 1;
        self.conns
            .insert(token, Conn::new(stream, state, self.buf_alloc));
        Ok(token)
    }

    /// Reads a host client's `CONNECT <port>\n` a byte at a time (what follows the line is
    /// the guest's data), then asks the guest to accept.
    fn read_connect_line(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let line = loop {
            let State::Handshake(line) = &mut conn.state else {
                return;
            };
            let mut byte = [0u8];
            match conn.stream.read(&mut byte) {
                Ok(0) => return self.forget(token),
                Ok(_) if byte[0] == b'\n' => break std::mem::take(line),
                Ok(_) if line.len() + 1 >= MAX_CONNECT_LINE => return self.forget(token),
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.forget(token),
            }
        };
        let Some(port) = parse_connect(&line) else {
            log::debug!("vsock: host client sent a bad CONNECT line");
            let _ = conn.stream.write_all(b"ERROR bad CONNECT line\n");
            return self.forget(token);
        };
        let local = self.free_local_port(port);
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.state = State::Requested;
        conn.local_port = local;
        conn.peer_port = port;
        conn.owe |= owe::REQUEST;
        conn.deadline = Some(Instant::now() + self.connect_timeout);
        self.by_ports.insert((local, port), token);
        if !self.timer_armed {
            self.arm_timer(self.connect_timeout);
        }
        self.schedule(token);
    }

    fn arm_timer(&mut self, after: Duration) {
        // A zero duration would disarm the timer.
        let after = after.max(Duration::from_micros(1));
        match self.timer.reset(after, None) {
            Ok(()) => self.timer_armed = true,
            Err(e) => log::warn!("vsock: connect timer: {e}"),
        }
    }

    /// Host clients whose request the guest left unanswered past their deadline: closed,
    /// and the guest is sent a reset. The timer is re-armed for the next deadline.
    fn expire_requests(&mut self) {
        self.timer_armed = false;
        let now = Instant::now();
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Requested && c.deadline.is_some_and(|d| d <= now))
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            self.stats.connect_timeouts += 1;
            self.kill(token);
        }
        let next = self
            .conns
            .values()
            .filter(|c| c.state == State::Requested)
            .filter_map(|c| c.deadline)
            .min();
        if let Some(next) = next {
            self.arm_timer(next.saturating_duration_since(now));
        }
    }

    fn free_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.by_ports.contains_key(&(port, peer)) {
                return port;
            }
        }
    }

    /// Writes what the guest sent that the host stream did not take yet.
    fn flush(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        match conn.flush() {
            Ok(true) => {
                watch_out(&self.epoll, token, conn, false);
                self.after_flush(token);
            }
            Ok(false) => {}
            Err(e) => {
                log::debug!("vsock: host stream of port {}: {e}", conn.local_port);
                self.kill(token);
            }
        }
    }

    /// Once nothing is buffered: passes the guest's shutdown on, or ends the connection.
    fn after_flush(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.finished() {
            return self.kill(token);
        }
        // Once: shutting the socket again wakes its own epoll entry, and each wake-up
        // would bring this here again.
        if conn.peer_shut & SHUTDOWN_SEND != 0 && !conn.write_shut {
            conn.write_shut = true;
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Puts `token` on the work list if it has something for the guest.
    fn schedule(&mut self, token: u64) {
        if let Some(conn) = self.conns.get_mut(&token) {
            if !conn.queued && conn.has_work() {
                conn.queued = true;
                self.work.push_back(token);
            }
        }
    }

    /// Forgets a connection without telling the guest (it never heard of it, or reset it).
    fn forget(&mut self, token: u64) {
        if let Some(conn) = self.conns.remove(&token) {
            self.unmap(token, &conn);
        }
    }

    fn unmap(&mut self, token: u64, conn: &Conn) {
        let key = (conn.local_port, conn.peer_port);
        if self.by_ports.get(&key) == Some(&token) {
            self.by_ports.remove(&key);
        }
    }

    /// Closes a connection and owes the guest a reset for it.
    fn kill(&mut self, token: u64) {
        let Some(conn) = self.conns.remove(&token) else {
            return;
        };
        if matches!(conn.state, State::Handshake(_)) {
            return;
        }
        self.unmap(token, &conn);
        self.owe_reset(conn.local_port, conn.peer_port);
    }

    fn owe_reset(&mut self, local: u32, peer: u32) {
        if self.orphans.len() < MAX_ORPHAN_RESETS {
            self.orphans.push_back((local, peer));
        } else {
            self.stats.resets_dropped += 1;
        }
    }

    // --- guest packets --------------------------------------------------------------------

    /// Handles a packet from the guest (header read once, payload in guest memory).
    pub fn guest_packet<B: BitmapSlice>(
        &mut self,
        guest_cid: u64,
        h: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) {
        if h.src_cid != guest_cid || h.dst_cid != HOST_CID {
            self.stats.dropped += 1;
            return;
        }
        if h.type_ != TYPE_STREAM {
            self.stats.dropped += 1;
            if h.op != OP_RST {
                self.owe_reset(h.dst_port, h.src_port);
            }
            return;
        }
        match self.by_ports.get(&(h.dst_port, h.src_port)).copied() {
            Some(token) => self.conn_packet(token, h, data),
            None if h.op == OP_REQUEST => self.guest_connect(h),
            None if h.op == OP_RST => {}
            None => {
                self.stats.dropped += 1;
                self.owe_reset(h.dst_port, h.src_port);
            }
        }
    }

    /// A guest connects to host port `h.dst_port`: to `PATH_<port>`, if anything listens.
    fn guest_connect(&mut self, h: &Header) {
        if self.conns.len() >= self.max_connections {
            self.stats.refused += 1;
            return self.owe_reset(h.dst_port, h.src_port);
        }
        let path = port_path(&self.path, h.dst_port);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("vsock: guest connection to {}: {e}", path.display());
                self.stats.refused += 1;
                return self.owe_reset(h.dst_port, h.src_port);
            }
        };
        let token = match self.add(stream, State::Established) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("vsock: cannot watch {}: {e}", path.display());
                return self.owe_reset(h.dst_port, h.src_port);
            }
        };
        self.by_ports.insert((h.dst_port, h.src_port), token);
        self.stats.connections += 1;
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.local_port = h.dst_port;
            conn.peer_port = h.src_port;
            conn.peer_credit(h);
            conn.owe |= owe::RESPONSE;
            conn.readable = true;
        }
        self.schedule(token);
    }

    fn conn_packet<B: BitmapSlice>(
        &mut self,
        token: u64,
        h: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.peer_credit(h);
        match h.op {
            OP_RW => return self.guest_data(token, h, data),
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => conn.owe |= owe::CREDIT_UPDATE,
            OP_SHUTDOWN => {
                conn.peer_shutdown(h.flags);
                self.flush(token);
            }
            OP_RST => return self.forget(token),
            OP_RESPONSE if conn.state == State::Requested => {
                conn.state = State::Established;
                // Data the client sent after its line has no edge of its own.
                conn.readable = true;
                self.stats.connections += 1;
                let ok = format!("OK {}\n", conn.local_port);
                if conn.stream.write_all(ok.as_bytes()).is_err() {
                    return self.kill(token);
                }
            }
            _ => {
                self.stats.dropped += 1;
                return self.kill(token);
            }
        }
        self.schedule(token);
    }

    /// Guest data for the host stream: written now as far as the stream takes it, the rest
    /// buffered within the credit the guest was given.
    fn guest_data<B: BitmapSlice>(
        &mut self,
        token: u64,
        h: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let data = data.filter(|_| h.len > 0);
        if conn.state != State::Established || conn.peer_shut & SHUTDOWN_SEND != 0 {
            self.stats.dropped += 1;
            return self.kill(token);
        }
        let Some(data) = data else {
            return;
        };
        if !conn.fits(h.len) {
            log::debug!("vsock: guest port {} sent past its credit", conn.peer_port);
            self.stats.credit_violations += 1;
            return self.kill(token);
        }
        let written = match write_now(conn, data) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("vsock: host stream of port {}: {e}", conn.local_port);
                return self.kill(token);
            }
        };
        self.stats.tx_bytes += data.len() as u64;
        let rest = data.len() - written;
        if rest > 0 {
            let buf = conn.buffer();
            let at = buf.len();
            // Exactly: what is held per connection is bounded by the credit it gave.
            buf.reserve_exact(rest);
            buf.resize(at + rest, 0);
            data.subslice(written, rest)
                .map(|s| s.copy_to(&mut buf[at..]))
                .unwrap_or_default();
            watch_out(&self.epoll, token, conn, true);
        }
        // `written` is at most the packet's length, a u32.
        conn.received(h.len, u32::try_from(written).unwrap_or(u32::MAX));
        self.schedule(token);
    }

    // --- packets to the guest -------------------------------------------------------------

    /// Fills a receive packet with the next thing owed to the guest; `None` if there was
    /// nothing after all (the chain should be given back).
    pub fn fill<B: BitmapSlice>(&mut self, guest_cid: u64, pkt: &mut VsockPacket<'_, B>) -> Filled {
        if let Some((local, peer)) = self.orphans.pop_front() {
            let h = reply(guest_cid, local, peer, OP_RST);
            self.stats.resets += 1;
            return write_header(pkt, h);
        }
        while let Some(token) = self.work.pop_front() {
            let Some(conn) = self.conns.get_mut(&token) else {
                continue;
            };
            conn.queued = false;
            let filled = self.fill_from(token, guest_cid, pkt);
            self.schedule(token);
            if filled.is_some() {
                return filled;
            }
        }
        None
    }

    fn fill_from<B: BitmapSlice>(
        &mut self,
        token: u64,
        guest_cid: u64,
        pkt: &mut VsockPacket<'_, B>,
    ) -> Filled {
        let conn = self.conns.get_mut(&token)?;
        let mut h = reply(guest_cid, conn.local_port, conn.peer_port, 0);
        if conn.owe & owe::REQUEST != 0 {
            conn.owe &= !owe::REQUEST;
            h.op = OP_REQUEST;
        } else if conn.owe & owe::RESPONSE != 0 {
            conn.owe &= !owe::RESPONSE;
            h.op = OP_RESPONSE;
        } else if let Some(buf) = pkt.data_slice().filter(|_| conn.wants_data()) {
            match read_data(conn, buf) {
                Ok(0) => {
                    conn.host_closed();
                    return self.fill_from(token, guest_cid, pkt);
                }
                Ok(n) => {
                    h.op = OP_RW;
                    h.len = n;
                    conn.sent(n);
                    self.stats.rx_bytes += u64::from(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.readable = false;
                    return self.fill_from(token, guest_cid, pkt);
                }
                Err(e) => {
                    log::debug!("vsock: host stream of port {}: {e}", conn.local_port);
                    self.kill(token);
                    return None;
                }
            }
        } else if conn.owe & owe::SHUTDOWN != 0 {
            conn.owe &= !owe::SHUTDOWN;
            h.op = OP_SHUTDOWN;
            h.flags = conn.shutdown_flags;
        } else if conn.owe & owe::CREDIT_UPDATE != 0 || conn.wants_data() {
            // (A buffer with no room for data after the header takes a credit update, so
            // the next buffer gets its turn.)
            h.op = OP_CREDIT_UPDATE;
        } else {
            return None;
        }
        (h.buf_alloc, h.fwd_cnt) = conn.credit_fields();
        let filled = write_header(pkt, h);
        if conn.finished() {
            self.kill(token);
        }
        filled
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Remove the socket file if it is still the one we bound.
        if self.path.metadata().is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a connection's host stream is watched for: readable, hung up, edge-triggered;
/// writable only while guest bytes wait for it ([`watch_out`]), so a host program that
/// reads does not wake the device for every buffer it drains.
const CONN_EVENTS: EventSet = EventSet::IN
    .union(EventSet::READ_HANG_UP)
    .union(EventSet::EDGE_TRIGGERED);

/// Starts or stops watching `conn`'s stream for writability.
fn watch_out(epoll: &Epoll, token: u64, conn: &mut Conn, on: bool) {
    if conn.watching_out == on {
        return;
    }
    let set = if on {
        CONN_EVENTS | EventSet::OUT
    } else {
        CONN_EVENTS
    };
    let ev = EpollEvent::new(set, token);
    match epoll.ctl(ControlOperation::Modify, conn.stream.as_raw_fd(), ev) {
        Ok(()) => conn.watching_out = on,
        Err(e) => log::warn!("vsock: epoll_ctl on port {}: {e}", conn.local_port),
    }
}

/// A packet from the host to the guest, credit fields left to fill.
fn reply(guest_cid: u64, local: u32, peer: u32, op: u16) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: local,
        dst_port: peer,
        type_: TYPE_STREAM,
        op,
        ..Header::default()
    }
}

/// Writes `h` into the packet; the used length is header plus payload.
fn write_header<B: BitmapSlice>(pkt: &mut VsockPacket<'_, B>, h: Header) -> Filled {
    // The header slice is exactly PKT_HEADER_SIZE bytes (virtio-vsock made it so).
    pkt.set_header_from_raw(&h.to_bytes()).ok()?;
    (PKT_HEADER_SIZE_U32).checked_add(h.len)
}

const PKT_HEADER_SIZE_U32: u32 = virtio_vsock::packet::PKT_HEADER_SIZE as u32;

/// Reads host data into the packet's buffer, no more than the guest's credit.
fn read_data<B: BitmapSlice>(conn: &mut Conn, buf: &VolatileSlice<'_, B>) -> io::Result<u32> {
    let room = buf
        .len()
        .min(conn.credit() as usize)
        .min(MAX_PKT_LEN as usize);
    let mut buf = buf.subslice(0, room).map_err(io::Error::other)?;
    loop {
        match conn.stream.read_volatile(&mut buf) {
            // At most MAX_PKT_LEN bytes.
            Ok(n) => return Ok(n as u32),
            Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(VolatileMemoryError::IOError(e)) => return Err(e),
            Err(e) => return Err(io::Error::other(e)),
        }
    }
}

/// Writes guest data straight from guest memory until the stream would block, if nothing
/// is buffered before it; returns how much went.
fn write_now<B: BitmapSlice>(conn: &mut Conn, data: &VolatileSlice<'_, B>) -> io::Result<usize> {
    if conn.pending_len() > 0 {
        return Ok(0);
    }
    let mut done = 0;
    while done < data.len() {
        let rest = data
            .subslice(done, data.len() - done)
            .map_err(io::Error::other)?;
        match conn.stream.write_volatile(&rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(VolatileMemoryError::IOError(e)) => return Err(e),
            Err(e) => return Err(io::Error::other(e)),
        }
    }
    Ok(done)
}

/// `CONNECT <port>` (the newline already taken off), as Firecracker reads it.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// `PATH_<port>`.
pub(crate) fn port_path(path: &Path, port: u32) -> PathBuf {
    let mut p = OsString::from(path.as_os_str());
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Connects to a Unix socket without blocking: a listener whose backlog is full refuses
/// (`EAGAIN`) instead of holding the device's thread.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&socket2::SockAddr::unix(path)?)?;
    Ok(UnixStream::from(OwnedFd::from(socket)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT +5",
            b"CONNECT 5 6",
            b"connect 5",
            b"CONNECT\t5",
            b"\xff\xfe",
            b"",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn port_paths() {
        assert_eq!(
            port_path(Path::new("/run/v.sock"), 1234),
            PathBuf::from("/run/v.sock_1234")
        );
    }

    #[test]
    fn nonblocking_connect_reports_absent_listeners() {
        let dir = std::env::temp_dir().join(format!("vmkit-vsock-cn-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let e = connect_nonblocking(&dir.join("nobody")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let l = UnixListener::bind(dir.join("l")).unwrap();
        let s = connect_nonblocking(&dir.join("l")).unwrap();
        let (mut a, _) = l.accept().unwrap();
        (&s).write_all(b"x").unwrap();
        let mut b = [0u8];
        a.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        drop(l);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
