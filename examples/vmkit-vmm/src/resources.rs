//! The VM as Firecracker's API and config file describe it before it starts, each part
//! checked when it is given, and how it maps onto vmkit's own command line ([`Args`]).

use std::fs::File;
use std::path::PathBuf;

use vmkit_api::model::{
    BootSource, Drive, DriveUpdate, Entropy, HugePages, IoEngine, MachineConfig, NetworkInterface,
    NetworkInterfaceUpdate, VmConfig, Vsock,
};
use vmkit_virtio_blk::{BlockConfig, DiskSource, EngineKind};

use crate::config::{
    parse_mac, Args, DiskSpec, NetBackendSpec, NetSpec, VsockSpec, DEFAULT_POLL_US,
};
use crate::limits;

/// The resources set so far.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    machine: MachineConfig,
    boot: Option<BootSource>,
    /// In the order given; a `PUT` of an existing ID replaces it in place.
    drives: Vec<Drive>,
    nets: Vec<NetworkInterface>,
    vsock: Option<Vsock>,
    entropy: Option<Entropy>,
}

/// Why a resource is refused: one line, the API's `fault_message`.
pub type Refusal = String;

/// Checks that `path` is a regular file this process can read (opened without blocking,
/// so a FIFO named by mistake is refused rather than waited on).
fn readable(what: &str, path: &str) -> Result<(), Refusal> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open {what} {path}: {e}"))?;
    match file.metadata() {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{what} {path} is not a regular file")),
        Err(e) => Err(format!("cannot read {what} {path}: {e}")),
    }
}

/// `cpu_template`: Firecracker's `"None"`, or a vmkit template name (`host`, `pvm`).
pub fn cpu_template(name: Option<&str>) -> Result<vmkit_vcpu::CpuTemplate, Refusal> {
    match name {
        None | Some("None") => Ok(vmkit_vcpu::CpuTemplate::Host),
        Some(n) => n.to_ascii_lowercase().parse().map_err(|_| {
            format!("cpu_template {n} is not supported by vmkit (use None, host or pvm)")
        }),
    }
}

impl Resources {
    /// The resources of a config file, each checked as if it came through the API.
    pub fn from_config(config: &VmConfig) -> Result<Self, Refusal> {
        let mut r = Self::default();
        if let Some(m) = &config.machine_config {
            r.set_machine(m.clone())?;
        }
        if let Some(b) = &config.boot_source {
            r.set_boot(b.clone())?;
        }
        for d in &config.drives {
            r.set_drive(d.clone())?;
        }
        for n in &config.network_interfaces {
            r.set_net(n.clone())?;
        }
        if let Some(v) = &config.vsock {
            r.set_vsock(v.clone())?;
        }
        if let Some(e) = &config.entropy {
            r.set_entropy(e.clone())?;
        }
        Ok(r)
    }

    /// The machine configuration (Firecracker's defaults until set).
    pub fn machine(&self) -> &MachineConfig {
        &self.machine
    }

    /// Whether nothing was configured yet (a snapshot may still be loaded).
    pub fn is_empty(&self) -> bool {
        self.boot.is_none()
            && self.drives.is_empty()
            && self.nets.is_empty()
            && self.vsock.is_none()
            && self.entropy.is_none()
            && self.machine == MachineConfig::default()
    }

    /// `PUT /machine-config`.
    pub fn set_machine(&mut self, m: MachineConfig) -> Result<(), Refusal> {
        let max = vmkit_kvm::MAX_VCPUS;
        if m.vcpu_count == 0 || u32::from(m.vcpu_count) > max {
            return Err(format!("vcpu_count {} is not in 1..={max}", m.vcpu_count));
        }
        if m.mem_size_mib == 0 || m.mem_size_mib.checked_mul(1 << 20).is_none() {
            return Err(format!(
                "mem_size_mib {} is not a memory size",
                m.mem_size_mib
            ));
        }
        if m.smt {
            return Err("smt (two threads per core) is not supported by vmkit".into());
        }
        cpu_template(m.cpu_template.as_deref())?;
        self.machine = m;
        Ok(())
    }

    /// `PUT /boot-source`: the kernel and initrd must be readable now.
    pub fn set_boot(&mut self, b: BootSource) -> Result<(), Refusal> {
        readable("kernel_image_path", &b.kernel_image_path)?;
        if let Some(initrd) = &b.initrd_path {
            readable("initrd_path", initrd)?;
        }
        self.boot = Some(b);
        Ok(())
    }

    /// `PUT /drives/{id}`.
    pub fn set_drive(&mut self, d: Drive) -> Result<(), Refusal> {
        let id = &d.drive_id;
        if d.socket.is_some() {
            return Err(format!(
                "drive {id}: vhost-user drives (socket) are not supported by vmkit"
            ));
        }
        let path = d
            .path_on_host
            .as_deref()
            .ok_or_else(|| format!("drive {id}: path_on_host is required"))?;
        readable(&format!("drive {id}"), path)?;
        if d.is_root_device
            && self
                .drives
                .iter()
                .any(|o| o.is_root_device && o.drive_id != *id)
        {
            return Err(format!("drive {id}: there is already a root device"));
        }
        match self.drives.iter_mut().find(|o| o.drive_id == *id) {
            Some(old) => *old = d,
            None => self.drives.push(d),
        }
        Ok(())
    }

    /// `PATCH /drives/{id}` before the start: a new image, a new rate limiter (the buckets
    /// it gives replace the drive's).
    pub fn patch_drive(&mut self, u: DriveUpdate) -> Result<(), Refusal> {
        let Some(drive) = self.drives.iter().find(|d| d.drive_id == u.drive_id) else {
            return Err(format!("drive {}: no such drive", u.drive_id));
        };
        let mut drive = drive.clone();
        if let Some(p) = u.path_on_host {
            drive.path_on_host = Some(p);
        }
        if let Some(patch) = &u.rate_limiter {
            let current = limits::from_api(drive.rate_limiter.as_ref());
            drive.rate_limiter = limits::to_api(limits::patched(current, patch));
        }
        self.set_drive(drive)
    }

    /// `PUT /network-interfaces/{id}`.
    pub fn set_net(&mut self, n: NetworkInterface) -> Result<(), Refusal> {
        let id = &n.iface_id;
        if n.host_dev_name.is_empty() {
            return Err(format!("interface {id}: host_dev_name is empty"));
        }
        if let Some(mac) = &n.guest_mac {
            parse_mac(mac).map_err(|e| format!("interface {id}: guest_{e}"))?;
        }
        match self.nets.iter_mut().find(|o| o.iface_id == *id) {
            Some(old) => *old = n,
            None => self.nets.push(n),
        }
        Ok(())
    }

    /// `PATCH /network-interfaces/{id}` before the start: new rate limiters (the buckets
    /// given replace the card's).
    pub fn patch_net(&mut self, u: NetworkInterfaceUpdate) -> Result<(), Refusal> {
        let Some(n) = self.nets.iter_mut().find(|n| n.iface_id == u.iface_id) else {
            return Err(format!("interface {}: no such interface", u.iface_id));
        };
        for (current, patch) in [
            (&mut n.rx_rate_limiter, &u.rx_rate_limiter),
            (&mut n.tx_rate_limiter, &u.tx_rate_limiter),
        ] {
            if let Some(patch) = patch {
                let merged = limits::patched(limits::from_api(current.as_ref()), patch);
                *current = limits::to_api(merged);
            }
        }
        Ok(())
    }

    /// `PUT /vsock`.
    pub fn set_vsock(&mut self, v: Vsock) -> Result<(), Refusal> {
        if v.guest_cid < 3 || v.guest_cid == u32::MAX {
            return Err(format!("guest_cid {}: use 3 to 4294967294", v.guest_cid));
        }
        if v.uds_path.is_empty() {
            return Err("uds_path is empty".into());
        }
        self.vsock = Some(v);
        Ok(())
    }

    /// `PUT /entropy`.
    pub fn set_entropy(&mut self, e: Entropy) -> Result<(), Refusal> {
        self.entropy = Some(e);
        Ok(())
    }

    /// The command line these resources amount to, on top of `base` (the flags vmkit was
    /// started with: serial, transport and the like). The root drive is the first disk.
    pub fn to_args(&self, base: &Args) -> Result<Args, Refusal> {
        let boot = self
            .boot
            .as_ref()
            .ok_or("no boot source: PUT /boot-source first")?;
        let mut args = base.clone();
        args.kernel = Some(PathBuf::from(&boot.kernel_image_path));
        args.initramfs = boot.initrd_path.as_ref().map(PathBuf::from);
        let mut cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| base.cmdline.clone());
        let m = &self.machine;
        args.cpus = u32::from(m.vcpu_count);
        args.memory = m.mem_size_mib << 20;
        args.hugepages = m.huge_pages == Some(HugePages::Huge2M);
        args.track_dirty_pages |= m.track_dirty_pages;
        args.no_thp &= !args.hugepages;
        if m.cpu_template.is_some() {
            args.cpu_template = cpu_template(m.cpu_template.as_deref())?;
        }
        let mut drives: Vec<&Drive> = self.drives.iter().collect();
        drives.sort_by_key(|d| !d.is_root_device);
        let mut disks = Vec::new();
        for d in drives {
            if d.is_root_device {
                cmdline.push_str(&root_arg(d));
            }
            disks.push(disk_spec(d)?);
        }
        disks.append(&mut args.disk);
        args.disk = disks;
        let mut nets = self
            .nets
            .iter()
            .map(net_spec)
            .collect::<Result<Vec<_>, _>>()?;
        nets.append(&mut args.net);
        args.net = nets;
        if let Some(v) = &self.vsock {
            args.vsock = Some(VsockSpec {
                cid: u64::from(v.guest_cid),
                socket: PathBuf::from(&v.uds_path),
                poll_us: 0,
            });
        }
        if let Some(e) = &self.entropy {
            args.rng = true;
            args.rng_rate_limiter = Some(limits::from_api(e.rate_limiter.as_ref()));
        }
        args.cmdline = cmdline;
        Ok(args)
    }
}

/// Firecracker's root device arguments for the kernel command line.
fn root_arg(d: &Drive) -> String {
    let mode = if d.is_read_only { "ro" } else { "rw" };
    match &d.partuuid {
        Some(uuid) => format!(" root=PARTUUID={uuid} {mode}"),
        None => format!(" root=/dev/vda {mode}"),
    }
}

fn disk_spec(d: &Drive) -> Result<DiskSpec, Refusal> {
    let path = d.path_on_host.as_deref().unwrap_or_default();
    let mut config = BlockConfig::new(DiskSource::Path(PathBuf::from(path)));
    config.read_only = d.is_read_only;
    config.poll_us = DEFAULT_POLL_US;
    config.rate_limiter = limits::from_api(d.rate_limiter.as_ref());
    config.engine = match d.io_engine {
        Some(IoEngine::Async) => EngineKind::IoUring,
        Some(IoEngine::Sync) | None => EngineKind::Sync,
    };
    // Firecracker's drives answer GET_ID with their drive_id; so do ours when it fits.
    if d.drive_id.len() <= 20 && d.drive_id.bytes().all(|b| b.is_ascii_graphic()) {
        config.serial = d.drive_id.clone();
    }
    // Both cache types (`d.cache_type`) offer FLUSH: vmkit always makes a flushed write
    // durable, which is what "Writeback" promises and more than "Unsafe" does.
    config
        .check()
        .map_err(|e| format!("drive {}: {e}", d.drive_id))?;
    Ok(DiskSpec {
        config,
        queues_per_vcpu: true,
        id: Some(d.drive_id.clone()),
    })
}

fn net_spec(n: &NetworkInterface) -> Result<NetSpec, Refusal> {
    Ok(NetSpec {
        backend: NetBackendSpec::Tap(n.host_dev_name.clone()),
        mac: n.guest_mac.as_deref().map(parse_mac).transpose()?,
        mtu: None,
        queues: None,
        poll_us: 0,
        rx_rate_limiter: limits::from_api(n.rx_rate_limiter.as_ref()),
        tx_rate_limiter: limits::from_api(n.tx_rate_limiter.as_ref()),
        id: Some(n.iface_id.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn base() -> Args {
        Args::try_parse_from(["vmkit", "--serial", "off"]).unwrap()
    }

    fn drive(id: &str, path: &str, root: bool) -> Drive {
        serde_json::from_value(serde_json::json!({
            "drive_id": id, "path_on_host": path, "is_root_device": root
        }))
        .unwrap()
    }

    fn existing_file() -> String {
        std::env::current_exe().unwrap().display().to_string()
    }

    #[test]
    fn resources_become_the_command_line() {
        let mut r = Resources::default();
        assert!(r.to_args(&base()).unwrap_err().contains("boot source"));
        let exe = existing_file();
        r.set_boot(BootSource {
            kernel_image_path: exe.clone(),
            boot_args: Some("console=ttyS0".into()),
            initrd_path: None,
        })
        .unwrap();
        let m = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            cpu_template: Some("pvm".into()),
            ..MachineConfig::default()
        };
        r.set_machine(m).unwrap();
        r.set_drive(drive("data", &exe, false)).unwrap();
        r.set_drive(drive("rootfs", &exe, true)).unwrap();
        r.set_entropy(Entropy::default()).unwrap();
        let a = r.to_args(&base()).unwrap();
        assert_eq!(a.kernel, Some(PathBuf::from(&exe)));
        assert_eq!((a.cpus, a.memory), (2, 256 << 20));
        assert_eq!(a.cpu_template, vmkit_vcpu::CpuTemplate::Pvm);
        assert_eq!(a.cmdline, "console=ttyS0 root=/dev/vda rw");
        assert_eq!(a.disk.len(), 2);
        assert_eq!(a.disk[0].config.serial, "rootfs", "the root drive is vda");
        assert!(a.rng);
    }

    #[test]
    fn what_vmkit_lacks_or_cannot_use_is_refused_by_name() {
        let mut r = Resources::default();
        let err = |e: Result<(), Refusal>| e.unwrap_err();
        let mut m = MachineConfig {
            smt: true,
            ..MachineConfig::default()
        };
        assert!(err(r.set_machine(m.clone())).contains("smt"));
        m.smt = false;
        m.vcpu_count = 0;
        assert!(err(r.set_machine(m.clone())).contains("vcpu_count 0"));
        m.vcpu_count = 1;
        m.cpu_template = Some("T2".into());
        assert!(err(r.set_machine(m.clone())).contains("cpu_template T2"));
        m.cpu_template = None;
        m.mem_size_mib = u64::MAX;
        assert!(err(r.set_machine(m)).contains("mem_size_mib"));
        let missing = BootSource {
            kernel_image_path: "/nonexistent/vmlinux".into(),
            boot_args: None,
            initrd_path: None,
        };
        assert!(err(r.set_boot(missing)).contains("/nonexistent/vmlinux"));
        let fifo = std::env::temp_dir().join(format!("vmkit-res-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let fifo_boot = BootSource {
            kernel_image_path: fifo.display().to_string(),
            boot_args: None,
            initrd_path: None,
        };
        assert!(err(r.set_boot(fifo_boot)).contains("not a regular file"));
        let _ = std::fs::remove_file(&fifo);
        let exe = existing_file();
        r.set_drive(drive("root1", &exe, true)).unwrap();
        assert!(err(r.set_drive(drive("root2", &exe, true))).contains("already a root"));
        let update = DriveUpdate {
            drive_id: "nope".into(),
            path_on_host: Some(exe.clone()),
            rate_limiter: None,
        };
        assert!(err(r.patch_drive(update)).contains("no such drive"));
        let v = Vsock {
            guest_cid: 2,
            uds_path: "/v".into(),
            vsock_id: None,
        };
        assert!(err(r.set_vsock(v)).contains("guest_cid 2"));
        let n = NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("01:00:5e:00:00:01".into()),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        assert!(err(r.set_net(n)).contains("multicast"));
    }

    #[test]
    fn rate_limiters_reach_the_devices_and_patches_merge() {
        let mut r = Resources::default();
        let exe = existing_file();
        r.set_boot(BootSource {
            kernel_image_path: exe.clone(),
            boot_args: None,
            initrd_path: None,
        })
        .unwrap();
        let mut d = drive("data", &exe, false);
        d.rate_limiter =
            serde_json::from_str(r#"{"bandwidth": {"size": 1048576, "refill_time": 100}}"#)
                .unwrap();
        r.set_drive(d).unwrap();
        let n: NetworkInterface = serde_json::from_str(
            r#"{"iface_id": "eth0", "host_dev_name": "tap0",
                "tx_rate_limiter": {"ops": {"size": 100, "refill_time": 100}}}"#,
        )
        .unwrap();
        r.set_net(n).unwrap();
        r.set_entropy(
            serde_json::from_str(r#"{"rate_limiter": {"ops": {"size": 5, "refill_time": 1000}}}"#)
                .unwrap(),
        )
        .unwrap();
        // Before the start, patches merge: the drive keeps its bandwidth and gains ops.
        let patch: DriveUpdate = serde_json::from_str(
            r#"{"drive_id": "data", "rate_limiter": {"ops": {"size": 10, "refill_time": 10}}}"#,
        )
        .unwrap();
        r.patch_drive(patch).unwrap();
        let patch: NetworkInterfaceUpdate = serde_json::from_str(
            r#"{"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 10, "refill_time": 1}}}"#,
        )
        .unwrap();
        r.patch_net(patch).unwrap();
        let unknown: NetworkInterfaceUpdate =
            serde_json::from_str(r#"{"iface_id": "eth9"}"#).unwrap();
        assert!(r
            .patch_net(unknown)
            .unwrap_err()
            .contains("no such interface"));
        let args = r.to_args(&base()).unwrap();
        let disk = args.disk[0].config.rate_limiter;
        assert_eq!(disk.bandwidth.unwrap().rate_per_second(), 10 << 20);
        assert_eq!(disk.ops.unwrap().rate_per_second(), 1000);
        let net = &args.net[0];
        assert_eq!(net.id.as_deref(), Some("eth0"));
        assert_eq!(net.tx_rate_limiter.ops.unwrap().rate_per_second(), 1000);
        assert_eq!(
            net.rx_rate_limiter.bandwidth.unwrap().rate_per_second(),
            10_000
        );
        let rng = args.rng_rate_limiter.unwrap();
        assert!(args.rng && rng.ops.unwrap().rate_per_second() == 5);
    }
}
