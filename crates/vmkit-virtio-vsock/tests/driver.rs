//! virtio-vsock against virtio-drivers' `VsockConnectionManager` (through vmkit-virtio's
//! harnesses), on virtio-mmio and virtio-pci, with real Unix sockets on the host side.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use virtio_drivers::device::socket::{
    DisconnectReason, SocketError, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEvent,
    VsockEventType,
};
use virtio_drivers::transport::Transport;
use virtio_drivers::Error as DriverError;
use vmkit_virtio::test_utils::{CamKind, GuestHal, Harness, PciHarness};
use vmkit_virtio::QueueEventHandler;
use vmkit_virtio_vsock::{Vsock, VsockConfig, HOST_CID, MAX_POLL_US};

const CID: u64 = 42;
/// The guest's receive buffers and per-connection buffer (what it advertises as credit).
const RX_BUF: usize = 4096;
const GUEST_BUF: u32 = 64 * 1024;

type Mgr<T> = VsockConnectionManager<GuestHal, T, RX_BUF>;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vmkit-vsock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("v.sock")
    }

    fn port(&self, port: u32) -> PathBuf {
        self.0.join(format!("v.sock_{port}"))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn device(dir: &Dir) -> Arc<Mutex<Vsock>> {
    Arc::new(Mutex::new(
        Vsock::new(VsockConfig::new(CID, dir.sock())).unwrap(),
    ))
}

fn pattern(seed: u32, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(seed) as u8 ^ (i >> 11) as u8)
        .collect()
}

fn host(port: u32) -> VsockAddr {
    VsockAddr {
        cid: HOST_CID,
        port,
    }
}

/// Runs the device's host side and the driver until `want` matches an event (bounded).
fn wait_event<T: Transport>(
    mgr: &mut Mgr<T>,
    handler: &mut QueueEventHandler,
    want: impl Fn(&VsockEvent) -> bool,
) -> VsockEvent {
    for _ in 0..200_000 {
        handler.poll();
        if let Some(ev) = mgr.poll().unwrap() {
            if want(&ev) {
                return ev;
            }
        }
    }
    panic!("event never came");
}

/// Sends all of `data`, waiting for credit when the host is behind.
fn send_all<T: Transport>(
    mgr: &mut Mgr<T>,
    handler: &mut QueueEventHandler,
    peer: VsockAddr,
    port: u32,
    data: &[u8],
) {
    for chunk in data.chunks(4000) {
        let mut tries = 0;
        loop {
            match mgr.send(peer, port, chunk) {
                Ok(()) => break,
                Err(DriverError::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)) => {
                    tries += 1;
                    assert!(tries < 1_000_000, "the device never gave credit back");
                    handler.poll();
                    let _ = mgr.poll().unwrap();
                }
                Err(e) => panic!("send: {e:?}"),
            }
        }
    }
}

/// The guest connects to host port 1234 and sends 1 MiB; the host listener gets exactly it,
/// then end of file when the guest shuts down, and the guest gets the reset that ends it.
fn guest_to_host<T: Transport>(mgr: &mut Mgr<T>, handler: &mut QueueEventHandler, dir: &Dir) {
    let data = pattern(1, 1 << 20);
    let listener = UnixListener::bind(dir.port(1234)).unwrap();
    let reader = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    mgr.connect(host(1234), 5000).unwrap();
    let ev = wait_event(mgr, handler, |e| {
        e.event_type != VsockEventType::CreditUpdate
    });
    assert_eq!(ev.event_type, VsockEventType::Connected);
    send_all(mgr, handler, host(1234), 5000, &data);
    mgr.shutdown(host(1234), 5000).unwrap();
    let ev = wait_event(mgr, handler, |e| {
        matches!(e.event_type, VsockEventType::Disconnected { .. })
    });
    assert_eq!(
        ev.event_type,
        VsockEventType::Disconnected {
            reason: DisconnectReason::Reset
        }
    );
    let got = reader.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the host got other bytes");
}

/// A host client connects through the socket path with `CONNECT 77`, gets `OK <port>`, and
/// sends 1 MiB then closes its side; the guest's listener gets exactly it, then a shutdown.
fn host_to_guest<T: Transport>(mgr: &mut Mgr<T>, handler: &mut QueueEventHandler, dir: &Dir) {
    let data = pattern(2, 1 << 20);
    let sent = data.clone();
    mgr.listen(77);
    let path = dir.sock();
    let client = thread::spawn(move || {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(b"CONNECT 77\n").unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        s.write_all(&sent).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        (line, rest)
    });
    let ev = wait_event(mgr, handler, |e| {
        e.event_type == VsockEventType::ConnectionRequest
    });
    let peer = ev.source;
    assert_eq!(peer.cid, HOST_CID);
    assert!(peer.port >= 1 << 30, "host-initiated ports start at 2^30");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut shut = false;
    for _ in 0..2_000_000 {
        handler.poll();
        match mgr.poll() {
            Ok(Some(VsockEvent {
                event_type: VsockEventType::Disconnected { reason },
                ..
            })) => {
                assert_eq!(reason, DisconnectReason::Shutdown);
                shut = true;
            }
            Ok(_) => {}
            Err(e) => panic!("poll: {e:?}"),
        }
        match mgr.recv(peer, 77, &mut buf) {
            Ok(n) if n > 0 => {
                got.extend_from_slice(&buf[..n]);
                let _ = mgr.update_credit(peer, 77);
            }
            _ if shut => break,
            _ => {}
        }
    }
    assert!(shut, "no shutdown after the host closed its side");
    let (line, rest) = client.join().unwrap();
    assert_eq!(line, format!("OK {}\n", peer.port));
    assert!(rest.is_empty());
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the guest got other bytes");
}

fn both_ways<T: Transport>(mgr: &mut Mgr<T>, handler: &mut QueueEventHandler, dir: &Dir) {
    assert_eq!(mgr.guest_cid(), CID);
    guest_to_host(mgr, handler, dir);
    host_to_guest(mgr, handler, dir);
}

fn manager<T: Transport>(t: T) -> Mgr<T> {
    VsockConnectionManager::new_with_capacity(VirtIOSocket::new(t).unwrap(), GUEST_BUF)
}

#[test]
fn streams_both_ways_over_mmio() {
    let dir = Dir::new("mmio");
    let dev = device(&dir);
    let h = Harness::new(dev.clone());
    let mut handler = h.mmio().queue_event_handler().unwrap();
    let mut mgr = manager(h.transport());
    both_ways(&mut mgr, &mut handler, &dir);
    let s = dev.lock().unwrap().stats();
    assert_eq!((s.tx_bytes, s.rx_bytes), (1 << 20, 1 << 20));
    assert_eq!(s.connections, 2);
    assert_eq!(s.malformed + s.dropped + s.credit_violations, 0);
}

#[test]
fn streams_both_ways_over_pci() {
    let dir = Dir::new("pci");
    let dev = device(&dir);
    let h = PciHarness::new(dev.clone());
    let mut handler = h.device().queue_event_handler().unwrap();
    let mut mgr = manager(h.transport(CamKind::Ecam));
    both_ways(&mut mgr, &mut handler, &dir);
    assert_eq!(dev.lock().unwrap().stats().rx_bytes, 1 << 20);
}

#[test]
fn streams_both_ways_with_transmit_polling() {
    let dir = Dir::new("poll");
    let mut config = VsockConfig::new(CID, dir.sock());
    config.poll_us = 200;
    let dev = Arc::new(Mutex::new(Vsock::new(config).unwrap()));
    let h = Harness::new(dev.clone());
    let mut handler = h.mmio().queue_event_handler().unwrap();
    let mut mgr = manager(h.transport());
    both_ways(&mut mgr, &mut handler, &dir);
    assert_eq!(dev.lock().unwrap().stats().tx_bytes, 1 << 20);
}

#[test]
fn nothing_listening_is_a_reset() {
    let dir = Dir::new("absent");
    let dev = device(&dir);
    let h = Harness::new(dev.clone());
    let mut handler = h.mmio().queue_event_handler().unwrap();
    let mut mgr = manager(h.transport());
    mgr.connect(host(999), 5000).unwrap();
    let ev = wait_event(&mut mgr, &mut handler, |_| true);
    assert_eq!(
        ev.event_type,
        VsockEventType::Disconnected {
            reason: DisconnectReason::Reset
        }
    );
    let s = dev.lock().unwrap().stats();
    assert_eq!((s.refused, s.resets, s.connections), (1, 1, 0));
    assert_eq!(dev.lock().unwrap().connections(), 0);
}

#[test]
fn thirty_two_connections_at_once() {
    let dir = Dir::new("many");
    let dev = device(&dir);
    let h = Harness::new(dev.clone());
    let mut handler = h.mmio().queue_event_handler().unwrap();
    let mut mgr = manager(h.transport());
    let listener = UnixListener::bind(dir.port(7)).unwrap();
    let echo = thread::spawn(move || {
        let mut streams = Vec::new();
        for _ in 0..32 {
            streams.push(listener.accept().unwrap().0);
        }
        // Every connection is open at once before any echo.
        for mut s in streams {
            let mut buf = [0u8; 1000];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        }
    });
    for i in 0..32 {
        mgr.connect(host(7), 6000 + i).unwrap();
        let ev = wait_event(&mut mgr, &mut handler, |_| true);
        assert_eq!(ev.event_type, VsockEventType::Connected, "connection {i}");
    }
    assert_eq!(dev.lock().unwrap().connections(), 32);
    for i in 0..32 {
        send_all(&mut mgr, &mut handler, host(7), 6000 + i, &pattern(i, 1000));
    }
    let mut got = vec![Vec::new(); 32];
    let mut buf = [0u8; 1000];
    for _ in 0..2_000_000 {
        if got.iter().all(|g| g.len() == 1000) {
            break;
        }
        handler.poll();
        let _ = mgr.poll().unwrap();
        for i in 0..32u32 {
            if let Ok(n) = mgr.recv(host(7), 6000 + i, &mut buf) {
                got[i as usize].extend_from_slice(&buf[..n]);
            }
        }
    }
    echo.join().unwrap();
    for i in 0..32u32 {
        assert!(
            got[i as usize] == pattern(i, 1000),
            "connection {i} echoed other bytes"
        );
    }
}

/// A guest that never reads gets no more than the credit it gave, and the device stops
/// reading the host socket: the host's writes block, nothing piles up in the VMM.
#[test]
fn a_guest_that_never_reads_holds_the_host_back() {
    let dir = Dir::new("noread");
    let dev = device(&dir);
    let h = Harness::new(dev.clone());
    let mut handler = h.mmio().queue_event_handler().unwrap();
    let mut mgr = manager(h.transport());
    let listener = UnixListener::bind(dir.port(8)).unwrap();
    mgr.connect(host(8), 5000).unwrap();
    let ev = wait_event(&mut mgr, &mut handler, |_| true);
    assert_eq!(ev.event_type, VsockEventType::Connected);
    let (s, _) = listener.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    let chunk = vec![9u8; 64 * 1024];
    let mut pushed = 0usize;
    for _ in 0..10_000 {
        match (&s).write(&chunk) {
            Ok(n) => pushed += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        handler.poll();
        // The driver takes packets into its connection buffer, but nobody calls recv.
        while let Ok(Some(_)) = mgr.poll() {}
        if pushed > 64 << 20 {
            break;
        }
    }
    let s_ = dev.lock().unwrap().stats();
    assert_eq!(
        s_.rx_bytes,
        u64::from(GUEST_BUF),
        "exactly the guest's credit went in"
    );
    assert!(
        pushed < 8 << 20,
        "the host could push {pushed} bytes: the device kept reading"
    );
}

#[test]
fn a_refused_host_connection_is_closed_and_bad_lines_too() {
    let dir = Dir::new("refused");
    let dev = device(&dir);
    let h = Harness::new(dev.clone());
    let mut handler = h.mmio().queue_event_handler().unwrap();
    let mut mgr = manager(h.transport());
    // The guest listens on nothing: its driver answers the request with a reset.
    let mut s = UnixStream::connect(dir.sock()).unwrap();
    s.write_all(b"CONNECT 5\n").unwrap();
    let mut bad = UnixStream::connect(dir.sock()).unwrap();
    bad.write_all(b"CONNECT five\n").unwrap();
    for _ in 0..1000 {
        handler.poll();
        let _ = mgr.poll();
    }
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "closed without OK");
    bad.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut line = String::new();
    bad.read_to_string(&mut line).unwrap();
    assert!(line.starts_with("ERROR"), "{line:?}");
    assert_eq!(dev.lock().unwrap().connections(), 0);
}

#[test]
fn the_config_space_holds_the_guest_cid() {
    let dir = Dir::new("config");
    let h = Harness::new(device(&dir));
    assert_eq!(h.read32(0x100), CID as u32);
    assert_eq!(h.read32(0x104), 0);
}

#[test]
fn the_socket_path_is_checked_and_removed() {
    let dir = Dir::new("path");
    let dev = Vsock::new(VsockConfig::new(3, dir.sock())).unwrap();
    let e = Vsock::new(VsockConfig::new(3, dir.sock())).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    drop(dev);
    assert!(
        !dir.sock().exists(),
        "the socket file is removed with the device"
    );
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let e = Vsock::new(VsockConfig::new(cid, dir.sock())).unwrap_err();
        assert!(e.to_string().contains("reserved"), "{cid}: {e}");
    }
    let mut c = VsockConfig::new(3, dir.sock());
    c.poll_us = MAX_POLL_US + 1;
    assert!(Vsock::new(c).unwrap_err().to_string().contains("poll_us"));
    let mut c = VsockConfig::new(3, dir.sock());
    c.buf_alloc = 100;
    assert!(Vsock::new(c).unwrap_err().to_string().contains("limits"));
    assert!(
        !dir.sock().exists(),
        "a refused configuration binds nothing"
    );
    let e = Vsock::new(VsockConfig::new(3, Path::new("/nonexistent/dir/v.sock"))).unwrap_err();
    assert!(e.to_string().contains("cannot listen"), "{e}");
}
