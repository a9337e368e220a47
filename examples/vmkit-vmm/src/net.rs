//! `--net`: TAP queues (or an inherited TAP fd) under a vmkit-virtio-net card.

use std::os::fd::{FromRawFd, OwnedFd};

use vmkit_memory::GuestRam;
use vmkit_virtio_net::{Net, NetBackend, NetConfig, Tap};

use crate::config::{NetBackendSpec, NetSpec};
use crate::error::{Error, Result};

/// The card `spec` asks for, in a VM with `cpus` vCPUs.
pub fn open_net(
    spec: &NetSpec,
    cpus: u32,
    fds: &mut InheritedFds,
    metrics: std::sync::Arc<dyn vmkit_virtio::DeviceMetrics>,
) -> Result<Net<GuestRam>> {
    let what = match &spec.backend {
        NetBackendSpec::Tap(name) => format!("tap={name}"),
        NetBackendSpec::Fd(fd) => format!("fd={fd}"),
    };
    let err = |source| Error::Net {
        what: what.clone(),
        source,
    };
    let backends: Vec<Box<dyn NetBackend>> = match &spec.backend {
        NetBackendSpec::Tap(name) => open_tap(name, spec.queues, cpus)
            .map_err(err)?
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn NetBackend>)
            .collect(),
        NetBackendSpec::Fd(fd) => vec![Box::new(Tap::from_fd(fds.take(*fd)?).map_err(err)?)],
    };
    let mut config = NetConfig::new(backends);
    config.mac = spec.mac;
    config.mtu = spec.mtu;
    config.poll_us = spec.poll_us;
    config.metrics = metrics;
    config.rx_rate_limiter = spec.rx_rate_limiter;
    config.tx_rate_limiter = spec.tx_rate_limiter;
    Net::for_memory(config).map_err(err)
}

/// `queues` queues of TAP `name`; without `queues=`, one per vCPU if the TAP is
/// multi-queue, else one.
fn open_tap(
    name: &str,
    queues: Option<u16>,
    cpus: u32,
) -> std::result::Result<Vec<Tap>, vmkit_virtio_net::Error> {
    match queues {
        Some(1) => Ok(vec![Tap::open(name)?]),
        Some(n) => Tap::open_queues(name, n),
        None if cpus <= 1 => Ok(vec![Tap::open(name)?]),
        None => {
            let per_vcpu = u16::try_from(cpus).unwrap_or(u16::MAX);
            Tap::open_queues(name, per_vcpu).or_else(|e| {
                log::info!("{name}: {e}; using one queue pair (not a multi-queue TAP?)");
                Ok(vec![Tap::open(name)?])
            })
        }
    }
}

/// The TAP fds `--net fd=N` names, owned by this process from its first step (before it
/// opens anything, so a number cannot be one of its own fds).
#[derive(Debug, Default)]
pub struct InheritedFds(Vec<(i32, OwnedFd)>);

impl InheritedFds {
    /// Takes ownership of every `fd=N`, after checking each is open and named once.
    pub fn claim(nets: &[NetSpec]) -> Result<Self> {
        let mut fds = Self::default();
        for n in nets {
            let NetBackendSpec::Fd(fd) = n.backend else {
                continue;
            };
            if fds.0.iter().any(|(f, _)| *f == fd) {
                return Err(Error::NetFdTwice(fd));
            }
            // SAFETY: F_GETFD only reads the descriptor's flags; a closed fd gives EBADF.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(Error::NetFd(fd));
            }
            // SAFETY: the fd is open; it was inherited, as this runs before the process opens
            // anything; the command line refuses 0-2 and the loop one named twice, so
            // nothing else owns it.
            fds.0.push((fd, unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        Ok(fds)
    }

    fn take(&mut self, fd: i32) -> Result<OwnedFd> {
        let i = self.0.iter().position(|(f, _)| *f == fd);
        Ok(self.0.swap_remove(i.ok_or(Error::NetFd(fd))?).1)
    }
}
