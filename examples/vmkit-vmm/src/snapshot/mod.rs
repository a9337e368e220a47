//! Snapshots: the running VM's state written to a state file and a memory file
//! ([`create`]), and a VM built from them ([`Loaded`], used by [`crate::vm::Vm::restore`]).
//!
//! The state file is vmkit-snapshot's container around a [`VmState`]: the VM's shape
//! ([`spec::VmSpec`], JSON, so that a restore builds the same machine and devices), the
//! vCPUs, the irqchip, the legacy devices, the virtio transports and devices, and where its
//! memory is. The memory file is guest RAM, regions one after the other, with holes where a
//! page is zero (full) or was not written since the last snapshot (diff). A diff's memory
//! is the layers below it plus its own pages: the state file lists them.

pub mod memory;
pub mod spec;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use vmkit_api::model::SnapshotCreate;
use vmkit_kvm::{Machine, MmioPlatform, PciPlatform, VcpuThreads};
use vmkit_legacy::{Ged, I8042};
use vmkit_snapshot::vm::{DeviceState, MemoryLayer, MemoryRecord, TransportStates, VmState};
use vmkit_snapshot::SnapshotKind;

use crate::config::Args;
use crate::devices::{GuestSerial, Handle, LegacyDevices, VirtioDevices};
use crate::snapshot::spec::VmSpec;

/// A snapshot read and checked, ready to build a VM from.
pub struct Loaded {
    /// The state.
    pub state: VmState,
    /// The VM's shape, decoded from the state.
    pub spec: VmSpec,
    /// The memory layers, base first.
    pub layers: Vec<MemoryLayer>,
}

/// What a snapshot's creation measured, for the log and the API's answer.
#[derive(Debug, Clone, Copy)]
pub struct Created {
    /// Bytes of guest memory written.
    pub memory_bytes: u64,
    /// Time taken, in µs.
    pub micros: u128,
}

/// `e`, prefixed with `path` unless it names it already.
fn with_path(path: &Path, e: &dyn std::fmt::Display) -> String {
    let (path, e) = (path.display().to_string(), e.to_string());
    match e.contains(&path) {
        true => e,
        false => format!("{path}: {e}"),
    }
}

/// Reads the state file at `path` and checks it (counts, sizes, memory layers, each vCPU's
/// state; the host's CPU comes later, [`check_cpu`]). `memory` replaces the top layer's
/// file (the load's `mem_file_path`).
pub fn load(path: &Path, memory: Option<&Path>) -> Result<Loaded, String> {
    let (_, state): (_, VmState) =
        vmkit_snapshot::read_state(path).map_err(|e| with_path(path, &e))?;
    let spec: VmSpec = serde_json::from_str(&state.spec)
        .map_err(|e| format!("{}: the VM description: {e}", path.display()))?;
    // The CPU is checked once the vCPUs exist (`check_cpu`).
    state
        .validate()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if state.memory.size != spec.memory {
        return Err(format!(
            "{}: the memory record's {} bytes are not the VM's {}",
            path.display(),
            state.memory.size,
            spec.memory
        ));
    }
    let mut layers = state.memory.layers.clone();
    if let (Some(top), Some(file)) = (layers.last_mut(), memory) {
        // Recorded as given, absolute: a diff taken later names its base by it.
        top.path = std::path::absolute(file).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    Ok(Loaded {
        state,
        spec,
        layers,
    })
}

/// Whether this host's CPU, as `vcpus` (built with the snapshot's CPU template) see it,
/// can run the snapshot's vCPUs.
pub fn check_cpu(vcpus: &vmkit_kvm::Vcpus, loaded: &Loaded) -> Result<(), String> {
    let host = vcpus
        .cpu_identity()
        .map_err(|e| format!("this host's CPU: {e}"))?;
    loaded.state.check_cpu(&host).map_err(|e| e.to_string())
}

/// What a snapshot of the VM needs beyond its parts.
pub struct Snapshots {
    /// The VM's shape.
    pub spec: VmSpec,
    /// Its memory as of the last snapshot taken or restored: what a diff builds on (empty:
    /// none yet).
    pub layers: Vec<MemoryLayer>,
    /// Dirty pages are tracked (diff snapshots possible).
    pub track_dirty: bool,
    /// The vCPUs start parked (a load with `resume_vm: false`).
    pub start_paused: bool,
    /// The directory relative paths of `PUT /snapshot/create` are taken from (read at
    /// start: the running VMM's seccomp filter has no `getcwd`).
    pub cwd: PathBuf,
}

impl Snapshots {
    /// A VM built from `args`; `layers` is its memory's snapshot files (none when booted).
    pub fn new(args: &Args, layers: Vec<MemoryLayer>) -> Self {
        Self {
            spec: VmSpec::of(args),
            layers,
            track_dirty: args.track_dirty_pages,
            start_paused: false,
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
        }
    }
}

fn lock<T: ?Sized>(m: &Arc<Mutex<T>>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The devices' own states, in attach order.
fn device_states(handles: &[Handle]) -> Vec<DeviceState> {
    handles
        .iter()
        .map(|h| match h {
            Handle::Block(d) => DeviceState::Block(lock(d).state()),
            Handle::Net(d) => DeviceState::Net(lock(d).state()),
            Handle::Vsock(d) => DeviceState::Vsock(lock(d).state()),
            Handle::Rng(d) => DeviceState::Rng(lock(d).state()),
            Handle::Console(d) => DeviceState::Console(lock(d).state()),
        })
        .collect()
}

/// Puts each device's saved state back (before its transport re-activates it).
fn restore_device(handle: &Handle, state: &DeviceState, index: usize) -> Result<(), String> {
    let r = match (handle, state) {
        (Handle::Block(d), DeviceState::Block(s)) => lock(d).restore(s).map_err(|e| e.to_string()),
        (Handle::Net(d), DeviceState::Net(s)) => lock(d).restore(s).map_err(|e| e.to_string()),
        (Handle::Vsock(d), DeviceState::Vsock(s)) => lock(d).restore(s).map_err(|e| e.to_string()),
        (Handle::Rng(d), DeviceState::Rng(s)) => lock(d).restore(s).map_err(|e| e.to_string()),
        (Handle::Console(d), DeviceState::Console(s)) => {
            lock(d).restore(s).map_err(|e| e.to_string())
        }
        _ => Err("the saved device is of another type".into()),
    };
    r.map_err(|e| format!("virtio device {index}: {e}"))
}

/// The i8042's, the GED's, the virtio devices' and their transports' saved states put back
/// in that order (a transport re-activates its device last).
pub fn restore_devices(
    legacy: &LegacyDevices,
    virtio: &VirtioDevices,
    state: &VmState,
) -> Result<(), String> {
    lock(&legacy.i8042)
        .restore(&state.i8042)
        .map_err(|e| format!("i8042: {e}"))?;
    lock(&legacy.ged)
        .restore(&state.ged)
        .map_err(|e| format!("ACPI GED: {e}"))?;
    if virtio.handles.len() != state.devices.len() {
        return Err(format!(
            "{} virtio devices saved, {} built",
            state.devices.len(),
            virtio.handles.len()
        ));
    }
    for (i, (h, s)) in virtio.handles.iter().zip(&state.devices).enumerate() {
        restore_device(h, s, i)?;
    }
    let restored = match (&state.transports, &virtio.mmio, &virtio.pci) {
        (TransportStates::Mmio(s), Some(mmio), _) => mmio.restore(s).map_err(|e| e.to_string()),
        (TransportStates::Pci(s), _, Some(pci)) => pci.restore(s).map_err(|e| e.to_string()),
        _ => Err("the saved transport is not the one built".into()),
    };
    restored.map_err(|e| format!("virtio transports: {e}"))
}

/// The transports of the virtio devices.
pub enum Transports {
    /// virtio-mmio.
    Mmio(MmioPlatform),
    /// virtio-pci.
    Pci(PciPlatform),
    /// No virtio device.
    None,
}

/// The parts of the VM a snapshot reads, kept by the running VM.
pub struct Sources {
    /// Memory, irqchip, dirty pages.
    pub machine: Machine,
    /// COM1.
    pub serial: Arc<Mutex<GuestSerial>>,
    /// The i8042.
    pub i8042: Arc<Mutex<I8042>>,
    /// The ACPI GED.
    pub ged: Arc<Mutex<Ged>>,
    /// The virtio devices by type.
    pub handles: Vec<Handle>,
    /// Their transports.
    pub transports: Transports,
    /// The VM's shape and memory layers.
    pub snapshots: Snapshots,
}

impl Sources {
    /// The machine and what a snapshot reads of the devices (the transports are taken out
    /// of `virtio`).
    pub fn new(
        machine: Machine,
        legacy: &LegacyDevices,
        virtio: &mut VirtioDevices,
        snapshots: Snapshots,
    ) -> Self {
        let transports = match (virtio.mmio.take(), virtio.pci.take()) {
            (Some(m), _) => Transports::Mmio(m),
            (None, Some(p)) => Transports::Pci(p),
            (None, None) => Transports::None,
        };
        Self {
            machine,
            serial: legacy.serial.clone(),
            i8042: legacy.i8042.clone(),
            ged: legacy.ged.clone(),
            handles: virtio.handles.clone(),
            transports,
            snapshots,
        }
    }
}

/// Everything but memory (its record is filled in once written).
fn vm_state(src: &Sources, vcpus: Vec<vmkit_vcpu::VcpuState>) -> Result<VmState, String> {
    let transports = match &src.transports {
        Transports::Mmio(mmio) => TransportStates::Mmio(mmio.states()),
        Transports::Pci(pci) => TransportStates::Pci(pci.states()),
        Transports::None => TransportStates::Mmio(Vec::new()),
    };
    Ok(VmState {
        spec: serde_json::to_string(&src.snapshots.spec).map_err(|e| e.to_string())?,
        memory: MemoryRecord {
            size: vmkit_memory::snapshot::file_size(src.machine.memory()),
            layers: Vec::new(),
        },
        vcpus,
        irqchip: src
            .machine
            .lock_irqchip()
            .save_state(src.machine.vm())
            .map_err(|e| format!("irqchip: {e}"))?,
        serial: lock(&src.serial).state(),
        i8042: lock(&src.i8042).state(),
        ged: lock(&src.ged).state(),
        transports,
        devices: device_states(&src.handles),
    })
}

/// `PUT /snapshot/create` on the paused VM: the state read, the memory file written under
/// a temporary name, the state file written, then the memory file renamed into place (a
/// failure anywhere leaves an earlier snapshot at those paths as it was).
pub fn create(
    src: &mut Sources,
    threads: &VcpuThreads,
    request: &SnapshotCreate,
) -> Result<Created, String> {
    let start = Instant::now();
    // The vCPUs first: reading them completes an instruction a VM exit left half done
    // (a string `ins` writes guest memory), before memory is written. The irqchip and the
    // devices right after, close to the LAPICs (the in-kernel PIT keeps counting).
    let vcpus = threads.save_states().map_err(|e| format!("vCPUs: {e}"))?;
    let mut state = vm_state(src, vcpus)?;
    let written = memory::write(src, request).inspect_err(|_| {
        // The dirty pages may have been taken: a later diff would miss them. The next
        // snapshot must be a full one.
        src.snapshots.layers.clear();
    })?;
    state.memory = written.record.clone();
    let kind = match state.memory.layers.len() {
        1 => SnapshotKind::Full,
        _ => SnapshotKind::Diff,
    };
    let path = Path::new(&request.snapshot_path);
    if let Err(e) = vmkit_snapshot::write_state(path, kind, &state) {
        written.discard();
        src.snapshots.layers.clear();
        return Err(format!("{}: {e}", path.display()));
    }
    let bytes = written.bytes;
    src.snapshots.layers = written
        .publish()
        .inspect_err(|_| src.snapshots.layers.clear())?
        .layers;
    Ok(Created {
        memory_bytes: bytes,
        micros: start.elapsed().as_micros(),
    })
}
