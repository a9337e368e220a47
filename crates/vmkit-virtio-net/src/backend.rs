//! Where frames go and come from: the [`NetBackend`] trait, and [`Tap`], a Linux TAP
//! interface opened with a virtio-net header.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::features::Offloads;
use crate::header::NET_HDR_LEN;
use crate::Error;

/// A frame transport for [`Net`](crate::Net): each frame starts with the 12-byte
/// virtio-net header (`struct virtio_net_hdr_v1`), as a TAP with `IFF_VNET_HDR` and a
/// header size of 12 takes and gives them. Implement it to plug in something else (a
/// userspace switch, a test harness).
///
/// The device calls it from the thread that runs its queue events, with iovecs pointing
/// into guest memory: no copy of the payload on either path.
pub trait NetBackend: Send + fmt::Debug {
    /// Reads one frame into `iov`, returning its length (header included), or
    /// `ErrorKind::WouldBlock` when none is waiting. A frame longer than `iov` may be cut
    /// short; the device always offers room for the largest frame the negotiated features
    /// allow.
    ///
    /// # Safety
    ///
    /// Each iovec must point to memory valid for writes of its length for the call.
    unsafe fn recv(&mut self, iov: &[libc::iovec]) -> io::Result<usize>;

    /// Writes one frame gathered from `iov`, returning the bytes taken.
    ///
    /// # Safety
    ///
    /// Each iovec must point to memory valid for reads of its length for the call.
    unsafe fn send(&mut self, iov: &[libc::iovec]) -> io::Result<usize>;

    /// The offloads it can apply to the frames it gives (what the device may offer the
    /// driver as `GUEST_CSUM`, `GUEST_TSO4`...).
    fn supported_offloads(&self) -> Offloads;

    /// Applies the offloads the driver accepted (a subset of
    /// [`supported_offloads`](Self::supported_offloads)).
    fn set_offloads(&mut self, offloads: Offloads) -> io::Result<()>;

    /// Takes part in receiving (`true`) or not: the device disables the backends of queue
    /// pairs the driver does not use, so a multi-queue TAP steers no flow to a queue nobody
    /// reads. Default: nothing to do.
    fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
        let _ = enabled;
        Ok(())
    }

    /// A duplicate of the fd that becomes readable when a frame waits (watched
    /// edge-triggered by the event loop), or `None` if the VMM must poll
    /// [`Net::process_rx`](crate::Net::process_rx) itself.
    fn readable_fd(&self) -> io::Result<Option<OwnedFd>>;
}

/// The offloads probed on a new TAP, from the most to the least.
const OFFLOAD_PROBES: [u32; 3] = [
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO,
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6,
    libc::TUN_F_CSUM,
];

/// One queue of a Linux TAP interface, opened `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (and
/// `IFF_MULTI_QUEUE` for [`open_queues`](Self::open_queues)), non-blocking, with a 12-byte
/// virtio-net header.
///
/// The interface itself is the operator's: vmkit opens an existing TAP by name (it does not
/// create one, which would leave an unconfigured interface behind) or takes an fd it was
/// handed, so an unprivileged VMM can be given a TAP opened for it.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    offloads: Offloads,
    multi_queue: bool,
}

fn ifreq_for(name: &str) -> Result<libc::ifreq, Error> {
    let bad = || Error::TapName(name.to_string());
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(bad());
    }
    // SAFETY: `ifreq` is plain old data (a byte array and a union of integers, sockaddrs and
    // a pointer); all zeros is a valid value of it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `ioctl(fd, request, arg)` as an `io::Result`.
///
/// # Safety
///
/// `arg` must be what `request` expects: a pointer to a live value of the right type, or an
/// integer.
unsafe fn ioctl<T>(fd: RawFd, request: libc::Ioctl, arg: T) -> io::Result<libc::c_int> {
    // SAFETY: the caller passes the argument `request` expects.
    let r = unsafe { libc::ioctl(fd, request, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Tap {
    /// Opens the existing TAP interface `name` (one queue).
    ///
    /// # Errors
    ///
    /// [`Error::TapName`], [`Error::NoSuchTap`], [`Error::OpenTun`], [`Error::Tap`] (no
    /// permission: `EPERM`; not a TAP or in use: `EINVAL`/`EBUSY`).
    pub fn open(name: &str) -> Result<Self, Error> {
        Self::open_one(name, false)
    }

    /// Opens `queues` queues of the existing multi-queue TAP interface `name` (created
    /// with `ip tuntap add NAME mode tap multi_queue vnet_hdr`), one [`Tap`] each.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open); `queues` 0 is [`Error::Queues`].
    pub fn open_queues(name: &str, queues: u16) -> Result<Vec<Self>, Error> {
        if queues == 0 {
            return Err(Error::Queues(queues));
        }
        (0..queues).map(|_| Self::open_one(name, true)).collect()
    }

    fn open_one(name: &str, multi_queue: bool) -> Result<Self, Error> {
        let mut req = ifreq_for(name)?;
        let cname = CString::new(name).map_err(|_| Error::TapName(name.to_string()))?;
        // SAFETY: `cname` is a NUL-terminated string that lives across the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(Error::NoSuchTap(name.to_string()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(Error::OpenTun)?;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF takes a pointer to an `ifreq`, which lives across the call.
        unsafe { ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) }.map_err(|source| {
            Error::Tap {
                name: name.to_string(),
                what: "TUNSETIFF",
                source,
            }
        })?;
        Self::configure(file, name.to_string(), multi_queue)
    }

    /// Takes an fd of a TAP someone else opened (with `IFF_TAP | IFF_VNET_HDR`), sets it
    /// non-blocking and its header size to 12.
    ///
    /// # Errors
    ///
    /// [`Error::Tap`] if it is not a TAP queue, [`Error::NotVnetTap`] if it was opened
    /// without `IFF_VNET_HDR` or with packet information.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, Error> {
        let file = File::from(fd);
        // SAFETY: as for TUNSETIFF: TUNGETIFF fills the `ifreq` it is given.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF takes a pointer to an `ifreq`, which lives across the call.
        unsafe { ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut req) }.map_err(|source| {
            Error::Tap {
                name: format!("fd {}", file.as_raw_fd()),
                what: "TUNGETIFF",
                source,
            }
        })?;
        let name = ifreq_name(&req);
        // SAFETY: TUNGETIFF wrote the flags member.
        let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags });
        let want = libc::IFF_TAP | libc::IFF_VNET_HDR | libc::IFF_NO_PI;
        if flags & want != want {
            return Err(Error::NotVnetTap(name));
        }
        set_nonblocking(&file).map_err(|source| Error::Tap {
            name: name.clone(),
            what: "O_NONBLOCK",
            source,
        })?;
        Self::configure(file, name, flags & libc::IFF_MULTI_QUEUE != 0)
    }

    /// Sets the header size and finds the offloads the kernel takes.
    fn configure(file: File, name: String, multi_queue: bool) -> Result<Self, Error> {
        let size: libc::c_int = NET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ takes a pointer to an int, which lives across the call.
        unsafe { ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) }.map_err(|source| {
            Error::Tap {
                name: name.clone(),
                what: "TUNSETVNETHDRSZ",
                source,
            }
        })?;
        let mut tap = Self {
            file,
            name,
            offloads: Offloads::default(),
            multi_queue,
        };
        tap.offloads = OFFLOAD_PROBES
            .into_iter()
            .map(Offloads)
            .find(|o| tap.set_offloads(*o).is_ok())
            .unwrap_or_default();
        tap.set_offloads(Offloads::default())
            .map_err(|source| Error::Tap {
                name: tap.name.clone(),
                what: "TUNSETOFFLOAD",
                source,
            })?;
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface's MTU (`SIOCGIFMTU`).
    ///
    /// # Errors
    ///
    /// [`Error::Tap`] when the kernel does not say.
    pub fn mtu(&self) -> Result<u16, Error> {
        let err = |source| Error::Tap {
            name: self.name.clone(),
            what: "SIOCGIFMTU",
            source,
        };
        let mut req = ifreq_for(&self.name)?;
        // SAFETY: socket(2) with constant arguments; the fd is owned right away.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: `sock` is a new fd nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        // SAFETY: SIOCGIFMTU takes a pointer to an `ifreq`, which lives across the call.
        unsafe { ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU as libc::Ioctl, &mut req) }
            .map_err(err)?;
        // SAFETY: SIOCGIFMTU wrote the mtu member.
        let mtu = unsafe { req.ifr_ifru.ifru_mtu };
        Ok(u16::try_from(mtu).unwrap_or(u16::MAX))
    }
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own, with integer arguments.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `readv`/`writev` result as an `io::Result`.
fn io_result(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn iov_count(iov: &[libc::iovec]) -> libc::c_int {
    // The device never builds more than a few hundred iovecs per frame.
    libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX)
}

impl NetBackend for Tap {
    unsafe fn recv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the iovecs are writable for the call; `iov` is a
        // live array of `iov.len()` of them.
        io_result(unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), iov_count(iov)) })
    }

    unsafe fn send(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the iovecs are readable for the call; `iov` is a
        // live array of `iov.len()` of them.
        io_result(unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov_count(iov)) })
    }

    fn supported_offloads(&self) -> Offloads {
        self.offloads
    }

    fn set_offloads(&mut self, offloads: Offloads) -> io::Result<()> {
        let arg = libc::c_ulong::from(offloads.0);
        // SAFETY: TUNSETOFFLOAD takes its argument as an integer.
        unsafe { ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, arg) }.map(|_| ())
    }

    fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
        if !self.multi_queue {
            return Ok(());
        }
        let mut req = ifreq_for(&self.name).map_err(|_| io::ErrorKind::InvalidInput)?;
        let flag = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        req.ifr_ifru.ifru_flags = flag as libc::c_short;
        // SAFETY: TUNSETQUEUE takes a pointer to an `ifreq`, which lives across the call.
        match unsafe { ioctl(self.file.as_raw_fd(), libc::TUNSETQUEUE, &mut req) } {
            // Attaching an attached queue or detaching a detached one: already so.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    fn readable_fd(&self) -> io::Result<Option<OwnedFd>> {
        Ok(Some(self.file.try_clone()?.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for name in ["", "a/b", "has space", "0123456789abcdef"] {
            assert!(
                matches!(Tap::open(name), Err(Error::TapName(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_missing_interface_is_named() {
        match Tap::open("vmkit-nonexist") {
            Err(Error::NoSuchTap(n)) => assert_eq!(n, "vmkit-nonexist"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_non_tap_fd_is_refused() {
        let f = File::open("/dev/null").unwrap();
        assert!(matches!(
            Tap::from_fd(f.into()),
            Err(Error::Tap {
                what: "TUNGETIFF",
                ..
            })
        ));
    }

    #[test]
    fn zero_queues_are_refused() {
        assert!(matches!(Tap::open_queues("x", 0), Err(Error::Queues(0))));
    }
}
