//! A datagram-socket backend standing in for a TAP: the test holds the other end and sends
//! and receives frames with their 12-byte virtio-net header, as a TAP with `IFF_VNET_HDR`
//! would give and take them.

#![allow(dead_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use vmkit_virtio_net::{NetBackend, Offloads, NET_HDR_LEN};

/// The device's end of a socket pair.
#[derive(Debug)]
pub struct SocketBackend {
    sock: UnixDatagram,
    supported: Offloads,
    /// Every `set_offloads` call, in order.
    pub applied: Arc<Mutex<Vec<Offloads>>>,
    /// Every `set_enabled` call, in order.
    pub enabled: Arc<Mutex<Vec<bool>>>,
}

/// A backend and the host's end of it (blocking, with a timeout).
pub fn socket_backend(supported: Offloads) -> (SocketBackend, UnixDatagram) {
    let (dev, host) = UnixDatagram::pair().unwrap();
    dev.set_nonblocking(true).unwrap();
    host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    (
        SocketBackend {
            sock: dev,
            supported,
            applied: Arc::default(),
            enabled: Arc::default(),
        },
        host,
    )
}

fn result(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl NetBackend for SocketBackend {
    unsafe fn recv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the iovecs are writable for the call.
        result(unsafe { libc::readv(self.sock.as_raw_fd(), iov.as_ptr(), iov.len() as i32) })
    }

    unsafe fn send(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the iovecs are readable for the call.
        result(unsafe { libc::writev(self.sock.as_raw_fd(), iov.as_ptr(), iov.len() as i32) })
    }

    fn supported_offloads(&self) -> Offloads {
        self.supported
    }

    fn set_offloads(&mut self, offloads: Offloads) -> io::Result<()> {
        self.applied.lock().unwrap().push(offloads);
        Ok(())
    }

    fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
        self.enabled.lock().unwrap().push(enabled);
        Ok(())
    }

    fn readable_fd(&self) -> io::Result<Option<OwnedFd>> {
        Ok(Some(self.sock.try_clone()?.into()))
    }
}

/// A frame of `len` bytes (Ethernet header to `dest` included) with a pattern seeded by
/// `seed`.
pub fn frame(dest: [u8; 6], len: usize, seed: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| ((i * 7 + seed * 13) % 251) as u8)
        .collect();
    f[..6].copy_from_slice(&dest);
    f
}

/// `frame` behind a header of zeros, as the host side sends it.
pub fn with_header(frame: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; NET_HDR_LEN];
    v.extend_from_slice(frame);
    v
}
