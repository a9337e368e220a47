//! The bodies of Firecracker's API and config file, as serde types.
//!
//! Field names, optional fields and enum spellings follow Firecracker's OpenAPI document
//! (`firecracker.yaml`). Every type refuses unknown fields, as Firecracker does, so a typo
//! is a 400 rather than a silently ignored setting. Fields for features a VMM may lack
//! (vhost-user sockets, SMT...) are parsed, so the VMM can refuse them by name with
//! [`Unsupported`](crate::ApiError).

use serde::{Deserialize, Serialize};

/// `PUT /machine-config` and the config file's `machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs (Firecracker: 1 to 32).
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (two threads per core).
    #[serde(default)]
    pub smt: bool,
    /// The CPU model: `"None"` (the host's, as KVM supports it), or a named template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Dirty-page tracking, for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Guest RAM page size: `"None"` (4 KiB, or transparent huge pages) or `"2M"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

/// Guest RAM backing pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Ordinary pages.
    None,
    /// 2 MiB pages from the host's hugetlb pool.
    #[serde(rename = "2M")]
    Huge2M,
}

impl Default for MachineConfig {
    /// Firecracker's defaults: 1 vCPU, 128 MiB.
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: None,
        }
    }
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel image on the host.
    pub kernel_image_path: String,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// An initial ramdisk on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// Firecracker's `rate_limiter` object: a bandwidth bucket (bytes) and an operations
/// bucket, each optional (`null` or absent: not limited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations (requests, frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// Firecracker's `TokenBucket`: `size` tokens, refilled from empty in `refill_time` ms, plus
/// `one_time_burst` tokens once. A `size` or `refill_time` of 0 means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// The bucket's capacity.
    pub size: u64,
    /// Extra tokens available once, at the start (not refilled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket from empty.
    pub refill_time: u64,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's name; must match the path's `{drive_id}`.
    pub drive_id: String,
    /// The image on the host (absent only for vhost-user drives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// The guest's root device: `root=/dev/vda` (or the partition's UUID) on its command line.
    pub is_root_device: bool,
    /// Read-only to the guest.
    #[serde(default)]
    pub is_read_only: bool,
    /// The root partition's UUID, when the root device is partitioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// `"Unsafe"` (no flush offered) or `"Writeback"` (flush offered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// A rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// `"Sync"` or `"Async"` (io_uring).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// A vhost-user-blk backend's socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// A drive's cache mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flush is not offered to the guest.
    Unsafe,
    /// Flush is offered, and makes writes durable.
    Writeback,
}

/// A drive's I/O engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking reads and writes on the device's thread.
    Sync,
    /// io_uring.
    Async,
}

/// `PATCH /drives/{drive_id}`: a new image or rate limiter for a drive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// The drive's name; must match the path's `{drive_id}`.
    pub drive_id: String,
    /// The new image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// A new rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The card's name; must match the path's `{iface_id}`.
    pub iface_id: String,
    /// The host's TAP interface.
    pub host_dev_name: String,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// A receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// A transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}`: new rate limiters for a running card (the
/// buckets given replace the card's own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    /// The card's name; must match the path's `{iface_id}`.
    pub iface_id: String,
    /// A new receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// A new transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context ID (3 and up).
    pub guest_cid: u32,
    /// The host side's Unix socket.
    pub uds_path: String,
    /// Deprecated by Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /entropy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    /// A rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// A log level, as Firecracker spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// Warnings and errors.
    Warning,
    /// Informational messages and above.
    Info,
    /// Debug messages and above.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The `log` crate's filter for this level.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// The file or FIFO the log goes to (absent: unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// The level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Whether each line names its level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Whether each line names its source file and line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only records of this module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// The file or FIFO metrics are written to, one JSON object a line.
    pub metrics_path: String,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    /// What to do.
    pub action_type: ActionType,
}

/// The actions of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl-Alt-Del on the guest's i8042 keyboard.
    SendCtrlAltDel,
    /// Write the metrics now.
    FlushMetrics,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateChange {
    /// The state asked for.
    pub state: VmStateRequest,
}

/// The states `PATCH /vm` can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStateRequest {
    /// Stop the vCPUs and the devices where they are.
    Paused,
    /// Run them again.
    Resumed,
}

/// The VM's state as `GET /` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Being configured.
    #[serde(rename = "Not started")]
    NotStarted,
    /// The vCPUs run.
    Running,
    /// Paused through `PATCH /vm`.
    Paused,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The VMM's name.
    pub app_name: String,
    /// The instance's ID (`--id`).
    pub id: String,
    /// Its state.
    pub state: InstanceState,
    /// The VMM's version.
    pub vmm_version: String,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The VMM's version (Firecracker's field name).
    pub firecracker_version: String,
}

/// `PUT /snapshot/create`: write the paused VM's state and memory to files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// The file the VM's state (vCPUs, devices) is written to.
    pub snapshot_path: String,
    /// The file guest memory is written to.
    pub mem_file_path: String,
    /// `"Full"` (all of memory, the default) or `"Diff"` (the pages dirtied since the last
    /// snapshot; needs dirty-page tracking).
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

/// The kinds of `PUT /snapshot/create`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// Only the pages written since the previous snapshot (or the start).
    Diff,
}

/// `PUT /snapshot/load`: build the VM from a snapshot instead of a configuration.
///
/// Guest memory comes from `mem_file_path` or `mem_backend` (exactly one:
/// [`ApiRequest::parse`](crate::ApiRequest::parse) refuses neither and both, as
/// Firecracker does). `network_overrides`, `drive_overrides` and `vsock_override` give
/// host resources other than the ones the snapshot was taken with; `drive_overrides` and
/// `vsock_override` are vmkit's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    /// The VM's state file, as `PUT /snapshot/create` wrote it.
    pub snapshot_path: String,
    /// The memory file (Firecracker deprecates it for `mem_backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    /// Where guest memory comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// Firecracker's older name of `track_dirty_pages` (either one turns tracking on).
    #[serde(default, skip_serializing_if = "is_false")]
    pub enable_diff_snapshots: bool,
    /// Track dirty pages in the loaded VM, for a later `Diff` snapshot.
    #[serde(default, skip_serializing_if = "is_false")]
    pub track_dirty_pages: bool,
    /// Run the vCPUs once loaded (else the VM stays paused until `PATCH /vm`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub resume_vm: bool,
    /// Network cards to attach to other TAP interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// Drives to open from other images (vmkit's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drive_overrides: Vec<DriveOverride>,
    /// Another host socket for the vsock device (vmkit's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Firecracker's `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// What `backend_path` is.
    pub backend_type: MemBackendType,
    /// The memory file, or the userfaultfd handler's Unix socket.
    pub backend_path: String,
}

/// The kinds of memory backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// A memory file, mapped privately (pages load on first touch).
    File,
    /// A userfaultfd page-fault handler listening on a Unix socket.
    Uffd,
}

/// One of `network_overrides`: the card `iface_id` uses the TAP `host_dev_name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The card's name, as it was configured.
    pub iface_id: String,
    /// The host's TAP interface to use instead.
    pub host_dev_name: String,
}

/// One of `drive_overrides`: the drive `drive_id` opens `path_on_host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    /// The drive's name, as it was configured.
    pub drive_id: String,
    /// The image to open instead (of the same capacity).
    pub path_on_host: String,
}

/// `vsock_override`: the vsock device's host side on another Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The Unix socket host programs connect to.
    pub uds_path: String,
}

impl SnapshotCreate {
    /// Checks what serde cannot: no path is empty.
    ///
    /// # Errors
    ///
    /// A one-line reason naming the field.
    pub fn validate(&self) -> Result<(), String> {
        non_empty("snapshot_path", &self.snapshot_path)?;
        non_empty("mem_file_path", &self.mem_file_path)
    }
}

impl SnapshotLoad {
    /// Where guest memory comes from: `mem_backend`, or `mem_file_path` as a `File` backend.
    ///
    /// # Errors
    ///
    /// Neither or both given (Firecracker's messages).
    pub fn memory(&self) -> Result<MemBackend, String> {
        match (&self.mem_file_path, &self.mem_backend) {
            (Some(_), Some(_)) => Err("too many fields: either `mem_backend` or \
                 `mem_file_path` exclusively is required"
                .into()),
            (None, None) => {
                Err("missing field: either `mem_backend` or `mem_file_path` is required".into())
            }
            (Some(path), None) => Ok(MemBackend {
                backend_type: MemBackendType::File,
                backend_path: path.clone(),
            }),
            (None, Some(backend)) => Ok(backend.clone()),
        }
    }

    /// Whether the loaded VM tracks dirty pages (`track_dirty_pages` or its older name).
    pub fn tracks_dirty_pages(&self) -> bool {
        self.track_dirty_pages || self.enable_diff_snapshots
    }

    /// Checks what serde cannot: one memory source, no empty path or name, no card or
    /// drive overridden twice.
    ///
    /// # Errors
    ///
    /// A one-line reason naming the field.
    pub fn validate(&self) -> Result<(), String> {
        non_empty("snapshot_path", &self.snapshot_path)?;
        let memory = self.memory()?;
        let field = match self.mem_backend {
            Some(_) => "mem_backend.backend_path",
            None => "mem_file_path",
        };
        non_empty(field, &memory.backend_path)?;
        for (i, n) in self.network_overrides.iter().enumerate() {
            non_empty("network_overrides: iface_id", &n.iface_id)?;
            non_empty("network_overrides: host_dev_name", &n.host_dev_name)?;
            let earlier = self.network_overrides.iter().take(i);
            if earlier.into_iter().any(|e| e.iface_id == n.iface_id) {
                return Err(format!(
                    "network_overrides: the iface_id {:?} is given twice",
                    n.iface_id
                ));
            }
        }
        for (i, d) in self.drive_overrides.iter().enumerate() {
            non_empty("drive_overrides: drive_id", &d.drive_id)?;
            non_empty("drive_overrides: path_on_host", &d.path_on_host)?;
            let earlier = self.drive_overrides.iter().take(i);
            if earlier.into_iter().any(|e| e.drive_id == d.drive_id) {
                return Err(format!(
                    "drive_overrides: the drive_id {:?} is given twice",
                    d.drive_id
                ));
            }
        }
        match &self.vsock_override {
            Some(v) => non_empty("vsock_override: uds_path", &v.uds_path),
            None => Ok(()),
        }
    }
}

fn non_empty(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} is empty"));
    }
    Ok(())
}

/// A whole VM in one file: Firecracker's `--config-file` layout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The kernel.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory.
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfig>,
    /// Disks.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Network cards.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// A vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// A virtio-rng.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<Entropy>,
    /// The logger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// The metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
}

impl VmConfig {
    /// Parses a config file's text. The error says where the JSON is wrong; a key given
    /// twice in any object is an error too.
    pub fn from_json(text: &str) -> Result<Self, crate::Error> {
        crate::strict_json::parse(text.as_bytes()).map_err(|e| crate::Error::Config(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_spellings_round_trip() {
        let m: MachineConfig = serde_json::from_str(
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "huge_pages": "2M"}"#,
        )
        .unwrap();
        assert_eq!((m.vcpu_count, m.mem_size_mib), (2, 256));
        assert_eq!(m.huge_pages, Some(HugePages::Huge2M));
        let info = InstanceInfo {
            app_name: "vmkit".into(),
            id: "a".into(),
            state: InstanceState::NotStarted,
            vmm_version: "0.1.0".into(),
        };
        let text = serde_json::to_string(&info).unwrap();
        assert!(text.contains(r#""state":"Not started""#), "{text}");
        let a: InstanceAction =
            serde_json::from_str(r#"{"action_type":"SendCtrlAltDel"}"#).unwrap();
        assert_eq!(a.action_type, ActionType::SendCtrlAltDel);
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused() {
        assert!(serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "mem_size": 1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count": "1", "mem_size_mib": 128}"#
        )
        .is_err());
        assert!(serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count": 300, "mem_size_mib": 128}"#
        )
        .is_err());
        assert!(serde_json::from_str::<VmStateChange>(r#"{"state": "Stopped"}"#).is_err());
    }

    #[test]
    fn rate_limiters_parse_as_firecracker_spells_them() {
        let d: Drive = serde_json::from_str(
            r#"{"drive_id": "a", "path_on_host": "/d", "is_root_device": false,
                "rate_limiter": {"bandwidth": {"size": 1048576, "one_time_burst": 4096,
                                               "refill_time": 100},
                                 "ops": {"size": 100, "refill_time": 1000}}}"#,
        )
        .unwrap();
        let r = d.rate_limiter.unwrap();
        let bw = r.bandwidth.unwrap();
        assert_eq!(
            (bw.size, bw.one_time_burst, bw.refill_time),
            (1 << 20, Some(4096), 100)
        );
        assert_eq!(r.ops.unwrap().one_time_burst, None);
        let n: NetworkInterface = serde_json::from_str(
            r#"{"iface_id": "e", "host_dev_name": "t", "rx_rate_limiter": null,
                "tx_rate_limiter": {"ops": null}}"#,
        )
        .unwrap();
        assert_eq!(n.rx_rate_limiter, None);
        assert_eq!(n.tx_rate_limiter, Some(RateLimiter::default()));
        // A typo or a negative size is a 400, never a silent "no limit".
        for bad in [
            r#"{"rate_limiter": {"bandwith": {"size": 1, "refill_time": 1}}}"#,
            r#"{"rate_limiter": {"ops": {"size": -1, "refill_time": 1}}}"#,
            r#"{"rate_limiter": {"ops": {"size": 1}}}"#,
        ] {
            assert!(serde_json::from_str::<Entropy>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_config_file_in_firecracker_layout_parses() {
        let c = VmConfig::from_json(
            r#"{
              "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
              "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
              "drives": [{"drive_id": "rootfs", "path_on_host": "/d", "is_root_device": true,
                          "is_read_only": false}],
              "network-interfaces": [],
              "entropy": {},
              "logger": {"log_path": "/l", "level": "Info"}
            }"#,
        )
        .unwrap();
        assert_eq!(c.boot_source.unwrap().kernel_image_path, "/k");
        assert_eq!(c.drives.len(), 1);
        assert!(c.entropy.is_some() && c.vsock.is_none());
        assert_eq!(c.logger.unwrap().level, Some(LogLevel::Info));
        let e = VmConfig::from_json(r#"{"boot_source": {}}"#).unwrap_err();
        assert!(e.to_string().contains("boot_source"), "{e}");
    }
}
