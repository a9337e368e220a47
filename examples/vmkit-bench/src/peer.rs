//! The host's ends of the virtio-net figures, and the host's own loopback ceilings run with
//! the same code: the TCP peer of the test guest's `test=virtio-net` (reads its bytes, then
//! sends the host's stream), a UDP receiver that counts datagrams, and a UDP sender that
//! floods 64-byte frames.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Reads and writes on TCP go in pieces of this size.
pub const TCP_CHUNK: usize = 256 << 10;
/// UDP payload of a 64-byte frame: 64 − 14 (Ethernet) − 20 (IPv4) − 8 (UDP).
pub const UDP_PAYLOAD: usize = 22;
/// How long a blocking read or write may take before the peer gives up.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a receiver looks at its stop flag.
const POLL: Duration = Duration::from_millis(50);

/// The host's stream of `test=virtio-net`: xorshift64 (13, 7, 17) from the guest's
/// `HOST_SEED`, the state after step k+1 little-endian as bytes 8k..8k+8.
pub fn host_stream(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    let mut x: u64 = 0xd1b5_4a32_d192_ed03;
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

fn text(e: std::io::Error) -> String {
    e.to_string()
}

/// The first connection to `listener`, or `Err` once `stop` is set.
pub fn accept(listener: &TcpListener, stop: &AtomicBool) -> Result<TcpStream, String> {
    vmkit_netns::accept_until(listener, Some(IO_TIMEOUT), || {
        stop.load(Ordering::Relaxed)
            .then(|| "nobody connected".to_string())
    })
}

/// Reads `n` bytes in [`TCP_CHUNK`] pieces; the time from the first byte to the last.
pub fn tcp_read(conn: &mut TcpStream, n: usize) -> Result<Duration, String> {
    let mut buf = vec![0u8; TCP_CHUNK];
    let (mut got, mut first) = (0, None);
    while got < n {
        let want = TCP_CHUNK.min(n - got);
        let r = conn.read(&mut buf[..want]).map_err(text)?;
        if r == 0 {
            return Err(format!("connection closed after {got} of {n} bytes"));
        }
        first.get_or_insert_with(Instant::now);
        got += r;
    }
    Ok(first.map_or(Duration::ZERO, |t| t.elapsed()))
}

/// Writes `data` in [`TCP_CHUNK`] pieces.
pub fn tcp_write(conn: &mut TcpStream, data: &[u8]) -> Result<(), String> {
    data.chunks(TCP_CHUNK)
        .try_for_each(|c| conn.write_all(c))
        .map_err(text)
}

/// A UDP socket bound at `addr` with a 16 MiB receive buffer (so that what is lost is lost
/// by the receiver being slow, not by a small buffer).
pub fn udp_bind(addr: SocketAddr) -> Result<UdpSocket, String> {
    let socket = UdpSocket::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    let size: libc::c_int = 16 << 20;
    // SAFETY: setsockopt reads an int of the size given from a local alive for the call, on
    // a socket we own. SO_RCVBUFFORCE (root) goes past net.core.rmem_max.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    socket.set_read_timeout(Some(POLL)).map_err(text)?;
    Ok(socket)
}

/// Datagrams received (from the first to the last) or sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Received {
    /// Datagrams.
    pub count: u64,
    /// The time they took, s.
    pub secs: f64,
}

impl Received {
    /// Datagrams per second.
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.secs
    }
}

/// Counts datagrams arriving on `socket` until `stop` is set.
pub fn udp_count(socket: &UdpSocket, stop: &AtomicBool) -> Received {
    let mut buf = [0u8; 2048];
    let (mut count, mut first, mut last) = (0u64, None, None);
    while !stop.load(Ordering::Relaxed) {
        if socket.recv(&mut buf).is_ok() {
            let now = Instant::now();
            first.get_or_insert(now);
            last = Some(now);
            count += 1;
        }
    }
    let secs = match (first, last) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    Received { count, secs }
}

/// A UDP socket bound at `from` and connected to `to`: a sender for [`udp_flood`].
pub fn udp_sender(from: SocketAddr, to: SocketAddr) -> Result<UdpSocket, String> {
    let socket = UdpSocket::bind(from).map_err(|e| format!("bind {from}: {e}"))?;
    socket
        .connect(to)
        .map_err(|e| format!("connect {to}: {e}"))?;
    Ok(socket)
}

/// Sends [`UDP_PAYLOAD`]-byte datagrams on `socket` as fast as it can for `secs`, or until
/// `stop` is set; returns how many the socket took, and how long it sent.
pub fn udp_flood(socket: &UdpSocket, secs: f64, stop: &AtomicBool) -> Received {
    let payload = [0x68u8; UDP_PAYLOAD];
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut count = 0;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        for _ in 0..256 {
            count += u64::from(socket.send(&payload).is_ok());
        }
    }
    Received {
        count,
        secs: start.elapsed().as_secs_f64(),
    }
}

/// The host's own TCP throughput over loopback, MiB/s: `bytes` of the host stream from a
/// sender thread to a receiver, both with the peer's code.
pub fn tcp_loopback(bytes: usize) -> Result<f64, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(text)?;
    let addr = listener.local_addr().map_err(text)?;
    let data = host_stream(bytes);
    let sender = std::thread::spawn(move || {
        let mut conn = TcpStream::connect(addr).map_err(text)?;
        tcp_write(&mut conn, &data)
    });
    let stop = AtomicBool::new(false);
    let mut conn = accept(&listener, &stop)?;
    let took = tcp_read(&mut conn, bytes)?;
    sender.join().map_err(|_| "sender panicked")??;
    Ok(bytes as f64 / (1 << 20) as f64 / took.as_secs_f64())
}

/// The host's own rate of 64-byte UDP frames over loopback, frames/s at the receiver: the
/// flood for `secs` into the counting receiver.
pub fn udp_loopback(secs: f64) -> Result<f64, String> {
    let lo = SocketAddr::from(([127, 0, 0, 1], 0));
    let socket = udp_bind(lo)?;
    let sender = udp_sender(lo, socket.local_addr().map_err(text)?)?;
    let stop = AtomicBool::new(false);
    let got = std::thread::scope(|s| {
        let receiver = s.spawn(|| udp_count(&socket, &stop));
        udp_flood(&sender, secs, &stop);
        std::thread::sleep(POLL);
        stop.store(true, Ordering::Relaxed);
        receiver.join()
    })
    .map_err(|_| "receiver panicked")?;
    Ok(got.rate())
}
