//! Before the VM exists: its description from the command line, a config file, or the
//! API's requests until `InstanceStart`.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use vmkit_api::model::{
    ActionType, InstanceState, MachineConfig, MemBackendType, SnapshotLoad, VmConfig,
};
use vmkit_api::{ApiRequest, ApiResponse};

use crate::config::{Args, RestoreArgs};
use crate::error::{Error, Result};
use crate::host::Host;
use crate::resources::Resources;
use crate::snapshot::spec::Overrides;
use crate::vm::Vm;

/// A VM built and the description it was built from.
pub struct Started {
    /// The VM, not running yet.
    pub vm: Vm,
    /// What `GET /machine-config` reports.
    pub machine: MachineConfig,
}

/// What `GET /machine-config` reports for a VM started from the command line.
fn machine_of(args: &Args) -> MachineConfig {
    MachineConfig {
        vcpu_count: u8::try_from(args.cpus).unwrap_or(u8::MAX),
        mem_size_mib: args.memory >> 20,
        cpu_template: Some(args.cpu_template.name().into()),
        huge_pages: args
            .hugepages
            .then_some(vmkit_api::model::HugePages::Huge2M),
        ..MachineConfig::default()
    }
}

/// The machine configuration as it runs: the resources', with the CPU template the command
/// line gave when they named none.
fn effective_machine(resources: &Resources, args: &Args) -> MachineConfig {
    let mut machine = resources.machine().clone();
    machine
        .cpu_template
        .get_or_insert_with(|| args.cpu_template.name().into());
    machine
}

/// Builds the VM `args` describe (with `--kernel`).
pub fn from_args(args: &Args) -> Result<Started> {
    Ok(Started {
        vm: Vm::build(args)?,
        machine: machine_of(args),
    })
}

/// Reads `--config-file`, sets its logger and metrics on `host`, and builds its VM.
pub fn from_config_file(path: &Path, base: &Args, host: &mut Host) -> Result<Started> {
    let bad = |message: String| Error::ConfigFile {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let config = VmConfig::from_json(&text).map_err(|e| bad(e.to_string()))?;
    let resources = Resources::from_config(&config).map_err(bad)?;
    if let Some(logger) = &config.logger {
        host.logger
            .configure(logger)
            .map_err(|e| bad(format!("logger: {e}")))?;
    }
    if let Some(metrics) = &config.metrics {
        host.metrics
            .set_destination(metrics.metrics_path.as_ref())
            .map_err(bad)?;
    }
    let args = resources.to_args(base).map_err(bad)?;
    Ok(Started {
        vm: Vm::build(&args)?,
        machine: effective_machine(&resources, &args),
    })
}

/// What restoring a snapshot needs: its files, what changes, how it runs.
#[derive(Debug, Clone, Default)]
pub struct Restore {
    /// The state file.
    pub state: PathBuf,
    /// The memory file (`None`: the one the state file names).
    pub memory: Option<PathBuf>,
    /// Other disks, TAPs, vsock socket.
    pub overrides: Overrides,
    /// Track dirty pages, for a later diff snapshot.
    pub track_dirty_pages: bool,
    /// Run the vCPUs at once (else the VM waits, paused, for `PATCH /vm`).
    pub resume: bool,
}

impl Restore {
    /// `--restore DIR` and its companions.
    pub fn of_cli(r: &RestoreArgs) -> Self {
        Self {
            state: r.state_file(),
            memory: Some(r.memory_file()),
            overrides: Overrides {
                drives: r
                    .drives
                    .iter()
                    .map(|d| (d.id.clone(), d.path.clone()))
                    .collect(),
                nets: r
                    .nets
                    .iter()
                    .map(|n| (n.id.clone(), n.tap.clone()))
                    .collect(),
                vsock: r.vsock.clone(),
            },
            track_dirty_pages: r.track_dirty_pages,
            resume: !r.paused,
        }
    }

    /// `PUT /snapshot/load`'s request.
    fn of_api(load: &SnapshotLoad) -> std::result::Result<Self, String> {
        let memory = load.memory()?;
        if memory.backend_type == MemBackendType::Uffd {
            return Err("mem_backend Uffd is not supported by vmkit: use File".into());
        }
        Ok(Self {
            state: PathBuf::from(&load.snapshot_path),
            memory: Some(PathBuf::from(memory.backend_path)),
            overrides: Overrides {
                drives: load
                    .drive_overrides
                    .iter()
                    .map(|d| (d.drive_id.clone(), PathBuf::from(&d.path_on_host)))
                    .collect(),
                nets: load
                    .network_overrides
                    .iter()
                    .map(|n| (n.iface_id.clone(), n.host_dev_name.clone()))
                    .collect(),
                vsock: load
                    .vsock_override
                    .as_ref()
                    .map(|v| PathBuf::from(&v.uds_path)),
            },
            track_dirty_pages: load.tracks_dirty_pages(),
            resume: load.resume_vm,
        })
    }
}

/// Builds the VM a snapshot describes, `base` giving the host's side.
pub fn from_snapshot(base: &Args, restore: &Restore) -> Result<Started> {
    let refused = |e: String| Error::Restore(e);
    let mut loaded =
        crate::snapshot::load(&restore.state, restore.memory.as_deref()).map_err(refused)?;
    loaded.spec.apply(&restore.overrides).map_err(refused)?;
    let mut args = loaded.spec.to_args(base).map_err(refused)?;
    args.track_dirty_pages = restore.track_dirty_pages;
    let started = Instant::now();
    let vm = Vm::restore(&args, loaded, restore.resume)?;
    log::info!(
        "restored {} in {} µs",
        restore.state.display(),
        started.elapsed().as_micros()
    );
    Ok(Started {
        vm,
        machine: machine_of(&args),
    })
}

/// Waits until the API, or a signal, says something; `true` if a signal came.
fn wait(host: &Host) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: host.signals.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: host.api_fd().unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfds for the duration of the call (a
    // negative fd is ignored by poll).
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    fds[0].revents != 0
}

/// The answer to a request made before the start (`InstanceStart` aside).
fn configure(resources: &mut Resources, request: ApiRequest) -> ApiResponse {
    let done = |r: std::result::Result<(), String>| match r {
        Ok(()) => ApiResponse::no_content(),
        Err(e) => ApiResponse::error(400, e),
    };
    match request {
        ApiRequest::GetMachineConfig => ApiResponse::ok(resources.machine()),
        ApiRequest::PutMachineConfig(m) => done(resources.set_machine(m)),
        ApiRequest::PutBootSource(b) => done(resources.set_boot(b)),
        ApiRequest::PutDrive(d) => done(resources.set_drive(d)),
        ApiRequest::PatchDrive(u) => done(resources.patch_drive(u)),
        ApiRequest::PutNetworkInterface(n) => done(resources.set_net(n)),
        ApiRequest::PatchNetworkInterface(u) => done(resources.patch_net(u)),
        ApiRequest::PutVsock(v) => done(resources.set_vsock(v)),
        ApiRequest::PutEntropy(e) => done(resources.set_entropy(e)),
        ApiRequest::Action(ActionType::SendCtrlAltDel)
        | ApiRequest::PatchVm(_)
        | ApiRequest::CreateSnapshot(_) => {
            ApiResponse::error(400, "the microVM is not running yet")
        }
        ApiRequest::LoadSnapshot(_) => ApiResponse::error(
            400,
            "loading a snapshot is not allowed after configuring boot-specific resources",
        ),
        other => ApiResponse::error(400, format!("{other:?} cannot be served before the start")),
    }
}

/// Serves the API until `InstanceStart` builds the VM; `None` if a shutdown signal came
/// first.
pub fn through_api(base: &Args, host: &mut Host) -> Result<Option<Started>> {
    let mut resources = Resources::default();
    loop {
        if wait(host) {
            if let Some(sig) = host.signals.take() {
                log::info!("{} before the start: exiting", crate::signals::name(sig));
                return Ok(None);
            }
        }
        for call in host.pending_calls() {
            if let Some(answer) = host.answer_common(&call.request) {
                host.respond(call, answer);
                continue;
            }
            let started = match call.request {
                ApiRequest::GetInstanceInfo => {
                    let info = host.info(InstanceState::NotStarted);
                    host.respond(call, info);
                    continue;
                }
                ApiRequest::LoadSnapshot(ref load) if resources.is_empty() => Restore::of_api(load)
                    .and_then(|r| from_snapshot(base, &r).map_err(|e| e.to_string())),
                ApiRequest::Action(ActionType::InstanceStart) => start(base, &resources),
                ref request => {
                    let answer = configure(&mut resources, request.clone());
                    host.respond(call, answer);
                    continue;
                }
            };
            // InstanceStart or a snapshot load: the VM is built, or the request refused.
            match started {
                Ok(started) => {
                    host.respond(call, ApiResponse::no_content());
                    return Ok(Some(started));
                }
                Err(e) => host.respond(call, ApiResponse::error(400, e)),
            }
        }
    }
}

fn start(base: &Args, resources: &Resources) -> std::result::Result<Started, String> {
    let args = resources.to_args(base)?;
    let vm = Vm::build(&args).map_err(|e| format!("cannot start the microVM: {e}"))?;
    Ok(Started {
        vm,
        machine: effective_machine(resources, &args),
    })
}
