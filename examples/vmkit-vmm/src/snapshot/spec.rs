//! What a snapshot records of the VM's shape (machine, devices, their host resources), so a
//! restore builds the same machine: the parts of [`Args`] that describe the guest's
//! hardware. How the host watches it (API socket, logs, seccomp, where the serial port and
//! the console write) comes from the restoring command line instead.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmkit_api::model;
use vmkit_virtio::RateLimiterConfig;
use vmkit_virtio_blk::{BlockConfig, DiskSource, EngineKind};

use crate::config::{Args, ConsoleOutput, DiskSpec, NetBackendSpec, NetSpec, Transport, VsockSpec};
use crate::limits;

/// The VM's shape, as a snapshot records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    /// vCPUs.
    pub cpus: u32,
    /// RAM in bytes.
    pub memory: u64,
    /// The CPU template's name.
    pub cpu_template: String,
    /// virtio-pci (else virtio-mmio).
    pub pci: bool,
    /// A virtio-console exists.
    pub console: bool,
    /// The entropy device.
    pub rng: Option<RngRecord>,
    /// The disks, in attach order.
    pub disks: Vec<DiskRecord>,
    /// The network cards, in attach order.
    pub nets: Vec<NetRecord>,
    /// The vsock device.
    pub vsock: Option<VsockRecord>,
    /// The kernel command line the guest booted with (for the operator's information).
    pub cmdline: String,
}

/// The entropy device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngRecord {
    /// Its rate limiter.
    pub rate_limiter: Option<model::RateLimiter>,
}

/// A path as the snapshot records it: absolute, so that a restore from another directory
/// opens the same file.
fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// One disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// The image (`None`: the VM got it as an open file; a restore must name one).
    pub path: Option<PathBuf>,
    /// The API's `drive_id`.
    pub id: Option<String>,
    /// Read-only.
    pub read_only: bool,
    /// `O_DIRECT`.
    pub direct: bool,
    /// The advisory lock.
    pub lock: bool,
    /// io_uring (else synchronous).
    pub io_uring: bool,
    /// `GET_ID`'s answer.
    pub serial: String,
    /// Request queues.
    pub queues: u16,
    /// Queue size.
    pub queue_size: u16,
    /// Logical block size.
    pub block_size: u32,
    /// Queue polling, µs.
    pub poll_us: u32,
    /// The rate limiter.
    pub rate_limiter: Option<model::RateLimiter>,
}

/// One network card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetRecord {
    /// The TAP's name (`None`: the VM got a TAP fd; a restore must name one).
    pub tap: Option<String>,
    /// The API's `iface_id`.
    pub id: Option<String>,
    /// The guest's MAC.
    pub mac: Option<[u8; 6]>,
    /// The MTU offered.
    pub mtu: Option<u16>,
    /// Queue pairs.
    pub queues: Option<u16>,
    /// Transmit polling, µs.
    pub poll_us: u32,
    /// Received frames' limiter.
    pub rx_rate_limiter: Option<model::RateLimiter>,
    /// Transmitted frames' limiter.
    pub tx_rate_limiter: Option<model::RateLimiter>,
}

/// The vsock device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VsockRecord {
    /// The guest's CID.
    pub cid: u64,
    /// The host side's Unix socket.
    pub socket: PathBuf,
    /// Transmit polling, µs.
    pub poll_us: u32,
}

impl DiskRecord {
    fn of(spec: &DiskSpec, cpus: u32) -> Self {
        let c = spec.block_config(cpus);
        Self {
            path: match &c.source {
                DiskSource::Path(p) => Some(absolute(p)),
                DiskSource::File(_) => None,
            },
            id: spec.id.clone(),
            read_only: c.read_only,
            direct: c.direct,
            lock: c.lock,
            io_uring: c.engine == EngineKind::IoUring,
            serial: c.serial.clone(),
            queues: c.queues,
            queue_size: c.queue_size,
            block_size: c.block_size,
            poll_us: c.poll_us,
            rate_limiter: limits::to_api(c.rate_limiter),
        }
    }

    fn to_spec(&self, index: usize) -> Result<DiskSpec, String> {
        let path = self.path.clone().ok_or_else(|| {
            format!(
                "disk {} was an open file when the snapshot was taken: name its image with --restore-drive",
                self.name(index)
            )
        })?;
        let mut config = BlockConfig::new(DiskSource::Path(path));
        config.read_only = self.read_only;
        config.direct = self.direct;
        config.lock = self.lock;
        config.engine = if self.io_uring {
            EngineKind::IoUring
        } else {
            EngineKind::Sync
        };
        config.serial = self.serial.clone();
        config.queues = self.queues;
        config.queue_size = self.queue_size;
        config.block_size = self.block_size;
        config.poll_us = self.poll_us;
        config.rate_limiter = limits::from_api(self.rate_limiter.as_ref());
        Ok(DiskSpec {
            config,
            queues_per_vcpu: false,
            id: self.id.clone(),
        })
    }

    /// Its `drive_id`, or `block<N>` by its place (its metrics' name).
    pub fn name(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("block{index}"))
    }
}

impl NetRecord {
    fn of(spec: &NetSpec) -> Self {
        Self {
            tap: match &spec.backend {
                NetBackendSpec::Tap(name) => Some(name.clone()),
                NetBackendSpec::Fd(_) => None,
            },
            id: spec.id.clone(),
            mac: spec.mac,
            mtu: spec.mtu,
            queues: spec.queues,
            poll_us: spec.poll_us,
            rx_rate_limiter: limits::to_api(spec.rx_rate_limiter),
            tx_rate_limiter: limits::to_api(spec.tx_rate_limiter),
        }
    }

    fn to_spec(&self, index: usize) -> Result<NetSpec, String> {
        let tap = self.tap.clone().ok_or_else(|| {
            format!(
                "network card {} was a TAP fd when the snapshot was taken: name a TAP with --restore-net",
                self.name(index)
            )
        })?;
        Ok(NetSpec {
            backend: NetBackendSpec::Tap(tap),
            mac: self.mac,
            mtu: self.mtu,
            queues: self.queues,
            poll_us: self.poll_us,
            rx_rate_limiter: limits::from_api(self.rx_rate_limiter.as_ref()),
            tx_rate_limiter: limits::from_api(self.tx_rate_limiter.as_ref()),
            id: self.id.clone(),
        })
    }

    /// Its `iface_id`, or `net<N>` by its place (its metrics' name).
    pub fn name(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("net{index}"))
    }
}

impl VmSpec {
    /// The shape of the VM `args` built.
    pub fn of(args: &Args) -> Self {
        Self {
            cpus: args.cpus,
            memory: args.memory,
            cpu_template: args.cpu_template.name().to_string(),
            pci: args.transport == Transport::Pci,
            console: args.console != ConsoleOutput::Off,
            rng: (args.rng || args.rng_rate_limiter.is_some()).then(|| RngRecord {
                rate_limiter: args.rng_rate_limiter.and_then(limits::to_api),
            }),
            disks: args
                .disk
                .iter()
                .map(|d| DiskRecord::of(d, args.cpus))
                .collect(),
            nets: args.net.iter().map(NetRecord::of).collect(),
            vsock: args.vsock.as_ref().map(|v| VsockRecord {
                cid: v.cid,
                socket: absolute(&v.socket),
                poll_us: v.poll_us,
            }),
            cmdline: args.cmdline.clone(),
        }
    }

    /// The arguments that build this shape again: `base` (the restoring command line) for
    /// the host's side, this record for the machine and its devices. A console the snapshot
    /// has needs a destination on the restoring command line, and one it does not have is
    /// refused.
    pub fn to_args(&self, base: &Args) -> Result<Args, String> {
        let mut args = base.clone();
        args.cpus = self.cpus;
        args.memory = self.memory;
        args.hugepages = false;
        args.cpu_template = crate::resources::cpu_template(Some(&self.cpu_template))
            .map_err(|e| format!("the snapshot's CPU template: {e}"))?;
        args.transport = if self.pci {
            Transport::Pci
        } else {
            Transport::Mmio
        };
        match (self.console, &base.console) {
            (true, ConsoleOutput::Off) => {
                return Err(
                    "the snapshot has a virtio-console: give it a destination with --console"
                        .into(),
                )
            }
            (false, c) if *c != ConsoleOutput::Off => {
                return Err("the snapshot has no virtio-console: leave --console out".into())
            }
            _ => {}
        }
        args.rng = self.rng.is_some();
        args.rng_rate_limiter = self
            .rng
            .as_ref()
            .map(|r| limits::from_api(r.rate_limiter.as_ref()));
        args.disk = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| d.to_spec(i))
            .collect::<Result<_, _>>()?;
        args.net = self
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| n.to_spec(i))
            .collect::<Result<_, _>>()?;
        args.vsock = self.vsock.as_ref().map(|v| VsockSpec {
            cid: v.cid,
            socket: v.socket.clone(),
            poll_us: v.poll_us,
        });
        args.cmdline = self.cmdline.clone();
        args.kernel = None;
        args.initramfs = None;
        Ok(args)
    }
}

impl VmSpec {
    /// `PATCH /drives/{id}` gave the drive `id` another image and rate limiter: a later
    /// snapshot records them.
    pub fn patch_drive(&mut self, id: &str, path: Option<PathBuf>, limiter: RateLimiterConfig) {
        if let Some(d) = self.disks.iter_mut().find(|d| d.id.as_deref() == Some(id)) {
            if path.is_some() {
                d.path = path;
            }
            d.rate_limiter = limits::to_api(limiter);
        }
    }

    /// `PATCH /network-interfaces/{id}` gave the card `id` other rate limiters.
    pub fn patch_net(&mut self, id: &str, rx: RateLimiterConfig, tx: RateLimiterConfig) {
        if let Some(n) = self.nets.iter_mut().find(|n| n.id.as_deref() == Some(id)) {
            n.rx_rate_limiter = limits::to_api(rx);
            n.tx_rate_limiter = limits::to_api(tx);
        }
    }
}

/// What a restore changes in the saved shape: each clone needs its own disk images, TAPs
/// and vsock socket. Drives and cards are named by their API id, or by their place
/// (`block0`, `net1`, …: their metrics' names) when they have none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `(drive, image)`.
    pub drives: Vec<(String, PathBuf)>,
    /// `(card, TAP name)`.
    pub nets: Vec<(String, String)>,
    /// The vsock device's Unix socket.
    pub vsock: Option<PathBuf>,
}

impl VmSpec {
    /// Applies `o`; a drive or card it names that the snapshot does not have is an error.
    pub fn apply(&mut self, o: &Overrides) -> Result<(), String> {
        for (name, path) in &o.drives {
            let disk = (0..self.disks.len())
                .find(|&i| self.disks[i].name(i) == *name)
                .ok_or_else(|| format!("the snapshot has no drive {name}"))?;
            self.disks[disk].path = Some(path.clone());
        }
        for (name, tap) in &o.nets {
            let net = (0..self.nets.len())
                .find(|&i| self.nets[i].name(i) == *name)
                .ok_or_else(|| format!("the snapshot has no network interface {name}"))?;
            self.nets[net].tap = Some(tap.clone());
        }
        if let Some(socket) = &o.vsock {
            let vsock = self
                .vsock
                .as_mut()
                .ok_or("the snapshot has no vsock device")?;
            vsock.socket = socket.clone();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn args(argv: &[&str]) -> Args {
        let mut all = vec!["vmkit"];
        all.extend_from_slice(argv);
        Args::try_parse_from(all).unwrap()
    }

    fn booted() -> Args {
        args(&[
            "--kernel",
            "k",
            "--cpus",
            "2",
            "--memory",
            "256M",
            "--transport",
            "pci",
            "--disk",
            "path=/d/root.img,readonly=on,engine=io_uring,bw=10M",
            "--disk",
            "path=/d/data.img,queues=2",
            "--net",
            "tap=tap0,mac=02:00:00:00:00:01,mtu=1400,rx_ops=1000",
            "--vsock",
            "cid=3,socket=/v.sock",
            "--rng-bw",
            "256K",
            "--console",
            "pty",
            "--cmdline",
            "quiet",
        ])
    }

    #[test]
    fn the_shape_builds_the_same_devices_again() {
        let a = booted();
        let spec = VmSpec::of(&a);
        let json = serde_json::to_string(&spec).unwrap();
        let back: VmSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
        let base = args(&["--restore", "/s", "--console", "file=/tmp/c"]);
        let r = back.to_args(&base).unwrap();
        assert_eq!(
            (r.cpus, r.memory, r.transport),
            (2, 256 << 20, Transport::Pci)
        );
        assert_eq!(r.disk.len(), 2);
        for (d, orig) in r.disk.iter().zip(&a.disk) {
            let (x, y) = (d.block_config(r.cpus), orig.block_config(a.cpus));
            assert_eq!(
                (x.read_only, x.engine, x.queues, x.rate_limiter),
                (y.read_only, y.engine, y.queues, y.rate_limiter)
            );
        }
        assert_eq!(r.net, a.net);
        assert_eq!(r.vsock, a.vsock);
        assert_eq!(r.rng_rate_limiter, a.rng_rate_limiter);
        assert!(r.rng);
        // Where output goes is the restoring command line's.
        assert_eq!(r.console, base.console);
        assert_eq!(r.cmdline, "quiet");
    }

    #[test]
    fn overrides_name_drives_and_cards_by_id_or_place() {
        let mut spec = VmSpec::of(&booted());
        let o = Overrides {
            drives: vec![("block1".into(), "/clone/data.img".into())],
            nets: vec![("net0".into(), "tap7".into())],
            vsock: Some("/clone/v.sock".into()),
        };
        spec.apply(&o).unwrap();
        assert_eq!(
            spec.disks[1].path.as_deref(),
            Some(std::path::Path::new("/clone/data.img"))
        );
        assert_eq!(
            spec.disks[0].path.as_deref(),
            Some(std::path::Path::new("/d/root.img"))
        );
        assert_eq!(spec.nets[0].tap.as_deref(), Some("tap7"));
        assert_eq!(spec.vsock.unwrap().socket, PathBuf::from("/clone/v.sock"));
        let mut spec = VmSpec::of(&booted());
        let unknown = Overrides {
            drives: vec![("rootfs".into(), "/x".into())],
            ..Overrides::default()
        };
        assert!(spec
            .apply(&unknown)
            .unwrap_err()
            .contains("no drive rootfs"));
        let no_vsock = VmSpec::of(&args(&["--kernel", "k"]));
        let o = Overrides {
            vsock: Some("/v".into()),
            ..Overrides::default()
        };
        assert!(no_vsock.clone().apply(&o).unwrap_err().contains("no vsock"));
    }

    #[test]
    fn patches_reach_the_recorded_shape() {
        let mut spec = VmSpec::of(&args(&["--kernel", "k", "--disk", "path=/d/a.img"]));
        spec.disks[0].id = Some("root".into());
        let limiter = crate::limits::parse_rng_bw("1M").unwrap();
        spec.patch_drive("root", Some("/d/b.img".into()), limiter);
        assert_eq!(
            spec.disks[0].path.as_deref(),
            Some(std::path::Path::new("/d/b.img"))
        );
        assert_eq!(
            limits::from_api(spec.disks[0].rate_limiter.as_ref()),
            limiter
        );
        // Only the limiter: the image stays.
        spec.patch_drive("root", None, RateLimiterConfig::default());
        assert_eq!(
            spec.disks[0].path.as_deref(),
            Some(std::path::Path::new("/d/b.img"))
        );
        assert_eq!(spec.disks[0].rate_limiter, None);
    }

    #[test]
    fn the_console_needs_a_destination_and_fds_need_an_override() {
        let spec = VmSpec::of(&booted());
        let e = spec.to_args(&args(&["--restore", "/s"])).unwrap_err();
        assert!(e.contains("--console"), "{e}");
        let plain = VmSpec::of(&args(&["--kernel", "k"]));
        let e = plain
            .to_args(&args(&["--restore", "/s", "--console", "pty"]))
            .unwrap_err();
        assert!(e.contains("no virtio-console"), "{e}");
        let mut fd = VmSpec::of(&args(&["--kernel", "k", "--disk", "path=/d"]));
        fd.disks[0].path = None;
        let e = fd.to_args(&args(&["--restore", "/s"])).unwrap_err();
        assert!(e.contains("--restore-drive") && e.contains("block0"), "{e}");
    }
}
