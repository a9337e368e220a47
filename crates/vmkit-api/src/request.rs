//! From an HTTP method, path and body to a typed [`ApiRequest`], and from a VMM's answer
//! to an [`ApiResponse`].

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::{
    ActionType, BootSource, Drive, DriveUpdate, Entropy, InstanceAction, Logger, MachineConfig,
    Metrics, NetworkInterface, NetworkInterfaceUpdate, SnapshotCreate, SnapshotLoad, VmStateChange,
    VmStateRequest, Vsock,
};

/// A request of the API, parsed and checked against Firecracker's schema.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    /// `GET /`: the instance's name, state and version.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{drive_id}`.
    PutDrive(Drive),
    /// `PATCH /drives/{drive_id}`.
    PatchDrive(DriveUpdate),
    /// `PUT /network-interfaces/{iface_id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{iface_id}`.
    PatchNetworkInterface(NetworkInterfaceUpdate),
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /entropy`.
    PutEntropy(Entropy),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(VmStateRequest),
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /snapshot/create` (paths checked non-empty).
    CreateSnapshot(SnapshotCreate),
    /// `PUT /snapshot/load` (checked with [`SnapshotLoad::validate`]: one memory source,
    /// no empty path, no override given twice).
    LoadSnapshot(SnapshotLoad),
}

/// A response: a status and, for `GET`s and errors, a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body.
    pub body: Option<String>,
}

impl ApiResponse {
    /// `204 No Content`: a `PUT` or `PATCH` done.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    /// `200 OK` with `value` as JSON.
    pub fn ok<T: Serialize>(value: &T) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Self {
                status: 200,
                body: Some(body),
            },
            Err(e) => Self::error(500, format!("cannot serialise the response: {e}")),
        }
    }

    /// An error with Firecracker's body, `{"fault_message": "..."}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let body = serde_json::json!({ "fault_message": message.into() });
        Self {
            status,
            body: Some(body.to_string()),
        }
    }
}

impl From<ApiError> for ApiResponse {
    fn from(e: ApiError) -> Self {
        ApiResponse::error(e.status(), e.to_string())
    }
}

/// Why a request was refused before it reached the VMM, or by the VMM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No such resource or method.
    #[error("Invalid request method and/or path: {method} {path}")]
    InvalidPath {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// A Firecracker resource this VMM does not implement.
    #[error("{0} is not supported by vmkit")]
    Unsupported(String),
    /// The body is not the JSON the resource takes.
    #[error("An error occurred when deserializing the json body of a request: {0}")]
    Body(String),
    /// The path's ID and the body's differ.
    #[error("the {field} in the body ({body}) is not the one in the path ({path})")]
    IdMismatch {
        /// The field (`drive_id`, `iface_id`).
        field: &'static str,
        /// The body's value.
        body: String,
        /// The path's value.
        path: String,
    },
}

impl ApiError {
    /// The HTTP status: 400 for every error, as Firecracker answers.
    pub fn status(&self) -> u16 {
        400
    }
}

/// Firecracker resources vmkit does not implement: refused by name rather than as unknown.
const UNSUPPORTED: &[&str] = &[
    "balloon",
    "mmds",
    "cpu-config",
    "hotplug",
    "serial",
    "pmem",
    "memory-hotplug",
];

fn body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::Body("the request has no body".into()));
    }
    crate::strict_json::parse(body).map_err(|e| ApiError::Body(e.to_string()))
}

fn check_id(field: &'static str, body: &str, path: &str) -> Result<(), ApiError> {
    if body == path {
        return Ok(());
    }
    Err(ApiError::IdMismatch {
        field,
        body: body.to_string(),
        path: path.to_string(),
    })
}

/// A path's `/resource/{id}`: the ID must be one non-empty segment.
fn id_of(rest: &str) -> Option<&str> {
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

impl ApiRequest {
    /// Parses `method path` with `body` (a trailing `/` is ignored; query strings are not
    /// part of the API).
    ///
    /// # Errors
    ///
    /// An unknown path or method, a resource vmkit lacks, a body that does not match the
    /// resource's schema, or a path ID the body contradicts.
    pub fn parse(method: &str, path: &str, body_bytes: &[u8]) -> Result<Self, ApiError> {
        let invalid = || ApiError::InvalidPath {
            method: method.to_string(),
            path: path.to_string(),
        };
        let trimmed = path.strip_prefix('/').ok_or_else(invalid)?;
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        let (resource, rest) = trimmed.split_once('/').unwrap_or((trimmed, ""));
        Ok(match (method, resource, rest) {
            ("GET", "", "") => ApiRequest::GetInstanceInfo,
            ("GET", "version", "") => ApiRequest::GetVersion,
            ("GET", "machine-config", "") => ApiRequest::GetMachineConfig,
            ("PUT", "machine-config", "") => ApiRequest::PutMachineConfig(body(body_bytes)?),
            ("PUT", "boot-source", "") => ApiRequest::PutBootSource(body(body_bytes)?),
            ("PUT", "drives", id) => {
                let id = id_of(id).ok_or_else(invalid)?;
                let drive: Drive = body(body_bytes)?;
                check_id("drive_id", &drive.drive_id, id)?;
                ApiRequest::PutDrive(drive)
            }
            ("PATCH", "drives", id) => {
                let id = id_of(id).ok_or_else(invalid)?;
                let update: DriveUpdate = body(body_bytes)?;
                check_id("drive_id", &update.drive_id, id)?;
                ApiRequest::PatchDrive(update)
            }
            ("PUT", "network-interfaces", id) => {
                let id = id_of(id).ok_or_else(invalid)?;
                let iface: NetworkInterface = body(body_bytes)?;
                check_id("iface_id", &iface.iface_id, id)?;
                ApiRequest::PutNetworkInterface(iface)
            }
            ("PATCH", "network-interfaces", id) => {
                let id = id_of(id).ok_or_else(invalid)?;
                let update: NetworkInterfaceUpdate = body(body_bytes)?;
                check_id("iface_id", &update.iface_id, id)?;
                ApiRequest::PatchNetworkInterface(update)
            }
            ("PUT", "vsock", "") => ApiRequest::PutVsock(body(body_bytes)?),
            ("PUT", "entropy", "") => ApiRequest::PutEntropy(body(body_bytes)?),
            ("PUT", "actions", "") => {
                ApiRequest::Action(body::<InstanceAction>(body_bytes)?.action_type)
            }
            ("PATCH", "vm", "") => ApiRequest::PatchVm(body::<VmStateChange>(body_bytes)?.state),
            ("PUT", "logger", "") => ApiRequest::PutLogger(body(body_bytes)?),
            ("PUT", "metrics", "") => ApiRequest::PutMetrics(body(body_bytes)?),
            ("PUT", "snapshot", "create") => {
                let create: SnapshotCreate = body(body_bytes)?;
                create.validate().map_err(ApiError::Body)?;
                ApiRequest::CreateSnapshot(create)
            }
            ("PUT", "snapshot", "load") => {
                let load: SnapshotLoad = body(body_bytes)?;
                load.validate().map_err(ApiError::Body)?;
                ApiRequest::LoadSnapshot(load)
            }
            (_, r, _) if UNSUPPORTED.contains(&r) => {
                return Err(ApiError::Unsupported(format!("/{r}")))
            }
            ("PATCH", "machine-config", _) => {
                return Err(ApiError::Unsupported(format!("PATCH /{resource}")))
            }
            _ => return Err(invalid()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MemBackendType, SnapshotType};

    fn parse(method: &str, path: &str, body: &str) -> Result<ApiRequest, ApiError> {
        ApiRequest::parse(method, path, body.as_bytes())
    }

    #[test]
    fn every_endpoint_parses() {
        assert_eq!(parse("GET", "/", ""), Ok(ApiRequest::GetInstanceInfo));
        assert_eq!(parse("GET", "/version", ""), Ok(ApiRequest::GetVersion));
        assert_eq!(
            parse("GET", "/machine-config/", ""),
            Ok(ApiRequest::GetMachineConfig)
        );
        let m = parse(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":64}"#,
        );
        assert!(matches!(m, Ok(ApiRequest::PutMachineConfig(c)) if c.vcpu_count == 2));
        let b = parse("PUT", "/boot-source", r#"{"kernel_image_path":"/k"}"#);
        assert!(matches!(b, Ok(ApiRequest::PutBootSource(_))));
        let d = parse(
            "PUT",
            "/drives/root",
            r#"{"drive_id":"root","path_on_host":"/d","is_root_device":true}"#,
        );
        assert!(matches!(d, Ok(ApiRequest::PutDrive(d)) if d.drive_id == "root"));
        let p = parse(
            "PATCH",
            "/drives/root",
            r#"{"drive_id":"root","path_on_host":"/e"}"#,
        );
        assert!(matches!(p, Ok(ApiRequest::PatchDrive(_))));
        let n = parse(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#,
        );
        assert!(matches!(n, Ok(ApiRequest::PutNetworkInterface(_))));
        let n = parse(
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","tx_rate_limiter":{"ops":{"size":10,"refill_time":100}}}"#,
        );
        assert!(
            matches!(n, Ok(ApiRequest::PatchNetworkInterface(u)) if u.tx_rate_limiter.is_some())
        );
        let other = parse(
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth1"}"#,
        );
        assert!(other.is_err());
        let v = parse("PUT", "/vsock", r#"{"guest_cid":3,"uds_path":"/v"}"#);
        assert!(matches!(v, Ok(ApiRequest::PutVsock(_))));
        assert_eq!(
            parse("PUT", "/entropy", "{}"),
            Ok(ApiRequest::PutEntropy(Entropy::default()))
        );
        assert_eq!(
            parse("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#),
            Ok(ApiRequest::Action(ActionType::InstanceStart))
        );
        assert_eq!(
            parse("PATCH", "/vm", r#"{"state":"Resumed"}"#),
            Ok(ApiRequest::PatchVm(VmStateRequest::Resumed))
        );
        let l = parse("PUT", "/logger", r#"{"log_path":"/l","level":"Debug"}"#);
        assert!(matches!(l, Ok(ApiRequest::PutLogger(_))));
        let m = parse("PUT", "/metrics", r#"{"metrics_path":"/m"}"#);
        assert!(matches!(m, Ok(ApiRequest::PutMetrics(_))));
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let err = |m: &str, p: &str, b: &str| parse(m, p, b).unwrap_err().to_string();
        assert!(err("DELETE", "/", "").starts_with("Invalid request method and/or path"));
        assert!(err("GET", "/nope", "").starts_with("Invalid request method and/or path"));
        assert!(err("PUT", "/drives/", "{}").starts_with("Invalid request method"));
        assert!(err("PUT", "/drives/a/b", "{}").starts_with("Invalid request method"));
        assert!(err("PUT", "nope", "").starts_with("Invalid request method"));
        assert_eq!(
            err("PUT", "/balloon", "{}"),
            "/balloon is not supported by vmkit"
        );
        assert!(err("PUT", "/snapshot/restore", "{}").starts_with("Invalid request method"));
        assert!(err("GET", "/snapshot/create", "").starts_with("Invalid request method"));
        assert!(err("PUT", "/actions", "").contains("no body"));
        assert!(err("PUT", "/actions", "{").contains("deserializing"));
        assert!(err("PUT", "/actions", r#"{"action_type":"Reboot"}"#).contains("unknown variant"));
        assert!(err("PUT", "/vm", r#"{"state":"Paused"}"#).starts_with("Invalid"));
        let mismatch = err(
            "PUT",
            "/drives/a",
            r#"{"drive_id":"b","path_on_host":"/d","is_root_device":false}"#,
        );
        assert!(mismatch.contains("drive_id"), "{mismatch}");
        // A key given twice, in a struct or in a free-form rate limiter, is refused.
        let twice = err(
            "PUT",
            "/drives/a",
            r#"{"drive_id":"a","path_on_host":"/d","is_root_device":false,
                "is_read_only":true,"is_read_only":false}"#,
        );
        assert!(twice.contains("duplicate field `is_read_only`"), "{twice}");
        let twice = err(
            "PATCH",
            "/drives/a",
            r#"{"drive_id":"a","rate_limiter":{"ops":{"size":1},"ops":{"size":2}}}"#,
        );
        assert!(twice.contains("duplicate field `ops`"), "{twice}");
        assert_eq!(
            ApiResponse::from(parse("GET", "/x", "").unwrap_err()).status,
            400
        );
    }

    #[test]
    fn snapshot_requests_parse_as_firecracker_spells_them() {
        let c = parse(
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path":"/s/vmstate","mem_file_path":"/s/memory","snapshot_type":"Diff"}"#,
        );
        let Ok(ApiRequest::CreateSnapshot(c)) = c else {
            panic!("{c:?}")
        };
        assert_eq!(
            (c.snapshot_path.as_str(), c.mem_file_path.as_str()),
            ("/s/vmstate", "/s/memory")
        );
        assert_eq!(c.snapshot_type, SnapshotType::Diff);
        let c = parse(
            "PUT",
            "/snapshot/create/",
            r#"{"snapshot_path":"a","mem_file_path":"b"}"#,
        );
        assert!(
            matches!(c, Ok(ApiRequest::CreateSnapshot(c)) if c.snapshot_type == SnapshotType::Full)
        );
        let l = parse(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path":"/s/vmstate",
                "mem_backend":{"backend_type":"File","backend_path":"/s/memory"},
                "enable_diff_snapshots":true,"resume_vm":true,
                "network_overrides":[{"iface_id":"eth0","host_dev_name":"tap1"}],
                "drive_overrides":[{"drive_id":"root","path_on_host":"/s/root.img"}],
                "vsock_override":{"uds_path":"/s/v.sock"}}"#,
        );
        let Ok(ApiRequest::LoadSnapshot(l)) = l else {
            panic!("{l:?}")
        };
        assert!(l.resume_vm && l.tracks_dirty_pages() && !l.track_dirty_pages);
        let memory = l.memory().unwrap();
        assert_eq!(
            (memory.backend_type, memory.backend_path.as_str()),
            (MemBackendType::File, "/s/memory")
        );
        assert_eq!(l.network_overrides[0].host_dev_name, "tap1");
        assert_eq!(l.drive_overrides[0].path_on_host, "/s/root.img");
        assert_eq!(l.vsock_override.unwrap().uds_path, "/s/v.sock");
        // The older `mem_file_path` is a File backend; nothing else is required.
        let l = parse(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path":"a","mem_file_path":"b"}"#,
        );
        let Ok(ApiRequest::LoadSnapshot(l)) = l else {
            panic!("{l:?}")
        };
        assert_eq!(l.memory().unwrap().backend_type, MemBackendType::File);
        assert!(!l.resume_vm && !l.tracks_dirty_pages());
        assert!(l.network_overrides.is_empty() && l.vsock_override.is_none());
        let uffd = parse(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path":"a","track_dirty_pages":true,
                "mem_backend":{"backend_type":"Uffd","backend_path":"/u.sock"}}"#,
        );
        assert!(matches!(uffd, Ok(ApiRequest::LoadSnapshot(l))
            if l.tracks_dirty_pages()
                && l.memory().unwrap().backend_type == MemBackendType::Uffd));
    }

    #[test]
    fn bad_snapshot_requests_are_refused_with_a_reason() {
        let err = |p: &str, b: &str| parse("PUT", p, b).unwrap_err().to_string();
        for (path, body, says) in [
            ("/snapshot/create", "", "no body"),
            (
                "/snapshot/create",
                r#"{"snapshot_path":"a"}"#,
                "missing field `mem_file_path`",
            ),
            (
                "/snapshot/create",
                r#"{"snapshot_path":"a","mem_file_path":"b","snapshot_type":"Full","version":"1"}"#,
                "unknown field `version`",
            ),
            (
                "/snapshot/create",
                r#"{"snapshot_path":"a","mem_file_path":"b","snapshot_type":"Partial"}"#,
                "unknown variant `Partial`",
            ),
            (
                "/snapshot/create",
                r#"{"snapshot_path":"","mem_file_path":"b"}"#,
                "snapshot_path is empty",
            ),
            (
                "/snapshot/create",
                r#"{"snapshot_path":"a","mem_file_path":"b","mem_file_path":"c"}"#,
                "duplicate field `mem_file_path`",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path":"a"}"#,
                "missing field: either",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path":"a","mem_file_path":"b",
                    "mem_backend":{"backend_type":"File","backend_path":"b"}}"#,
                "too many fields",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path":"a","mem_backend":{"backend_type":"Disk","backend_path":"b"}}"#,
                "unknown variant `Disk`",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path":"a","mem_backend":{"backend_type":"File","backend_path":""}}"#,
                "mem_backend.backend_path is empty",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path":"a","mem_file_path":"b","resume_vm":"yes"}"#,
                "invalid type",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path":"a","mem_file_path":"b","network_overrides":[
                    {"iface_id":"eth0","host_dev_name":"t1"},
                    {"iface_id":"eth0","host_dev_name":"t2"}]}"#,
                "the iface_id \"eth0\" is given twice",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path":"a","mem_file_path":"b","network_overrides":[
                    {"iface_id":"eth0","host_dev_name":""}]}"#,
                "host_dev_name is empty",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path":"a","mem_file_path":"b","drive_overrides":[
                    {"drive_id":"r","path_on_host":"x"},{"drive_id":"r","path_on_host":"y"}]}"#,
                "the drive_id \"r\" is given twice",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path":"a","mem_file_path":"b","drive_overrides":[
                    {"drive_id":"r","path":"x"}]}"#,
                "unknown field `path`",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path":"a","mem_file_path":"b","vsock_override":{"uds_path":""}}"#,
                "uds_path is empty",
            ),
            (
                "/snapshot/load",
                r#"{"snapshot_path":"a","mem_file_path":"b","vsock_override":{"uds_path":"x","cid":3}}"#,
                "unknown field `cid`",
            ),
        ] {
            let e = err(path, body);
            assert!(e.contains(says), "{body}: {e}");
        }
    }

    #[test]
    fn errors_have_firecrackers_body() {
        let r = ApiResponse::error(400, "no \"kernel\"");
        let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        assert_eq!(v["fault_message"], "no \"kernel\"");
    }
}
