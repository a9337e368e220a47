//! The whole VM's state, as vmkit's reference VMM writes it: every crate's state type in
//! one value, and the checks a state file read from disk passes before anything is built
//! from it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use vmkit_memory::snapshot::FileRange;

use crate::{Error, Result};

/// Most vCPUs a state may hold (KVM's and vmkit-kvm's limit).
pub const MAX_VCPUS: usize = 254;
/// Most memory layers (a full snapshot and the diffs on it).
pub const MAX_LAYERS: usize = 64;
/// Most virtio devices.
pub const MAX_DEVICES: usize = 64;
/// The page size of memory layers' page ranges.
pub const PAGE_SIZE: u64 = 4096;

/// A VM's state: what vmkit's reference VMM writes into a state file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// The VMM's description of the VM (its machine and devices, and their host
    /// resources), in the VMM's own format (JSON): what a restore builds before it puts
    /// the states below back.
    pub spec: String,
    /// Where guest memory is.
    pub memory: MemoryRecord,
    /// Each vCPU, in index order.
    pub vcpus: Vec<vmkit_vcpu::VcpuState>,
    /// The in-kernel PIC, IOAPIC, PIT and clock.
    pub irqchip: vmkit_irq::IrqchipState,
    /// COM1.
    pub serial: vmkit_legacy::SerialState,
    /// The i8042.
    pub i8042: vmkit_legacy::I8042State,
    /// The ACPI Generic Event Device.
    pub ged: vmkit_legacy::GedState,
    /// The virtio transports, in attach order.
    pub transports: TransportStates,
    /// The virtio devices' own states, in attach order.
    pub devices: Vec<DeviceState>,
}

/// Guest memory: the files it is read from, base first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRecord {
    /// RAM size in bytes (the memory files' length).
    pub size: u64,
    /// The layers: a full memory file, then the diffs taken after it.
    pub layers: Vec<MemoryLayer>,
}

/// One memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayer {
    /// The file (absolute).
    pub path: PathBuf,
    /// `None`: a full memory file; else the byte ranges the diff holds (page-aligned,
    /// ascending, disjoint).
    pub ranges: Option<Vec<FileRange>>,
}

/// The virtio transports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TransportStates {
    /// virtio-mmio.
    Mmio(Vec<vmkit_virtio::MmioTransportState>),
    /// virtio-pci.
    Pci(Vec<vmkit_virtio::PciTransportState>),
}

impl TransportStates {
    fn len(&self) -> usize {
        match self {
            Self::Mmio(v) => v.len(),
            Self::Pci(v) => v.len(),
        }
    }
}

/// A virtio device's own state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DeviceState {
    /// A disk.
    Block(vmkit_virtio_blk::BlockState),
    /// A network card.
    Net(vmkit_virtio_net::NetState),
    /// The vsock device.
    Vsock(vmkit_virtio_vsock::VsockState),
    /// The entropy device.
    Rng(vmkit_virtio_rng::RngState),
    /// The console.
    Console(vmkit_virtio_console::ConsoleState),
}

fn invalid(what: impl Into<String>) -> Error {
    Error::Invalid(what.into())
}

impl MemoryRecord {
    /// Sizes, layer counts and ranges in bounds: the first layer full, the others diffs
    /// whose ranges are page-aligned, ascending, disjoint and inside RAM.
    pub fn validate(&self) -> Result<()> {
        if self.size == 0 || !self.size.is_multiple_of(PAGE_SIZE) {
            return Err(invalid(format!(
                "memory size {} is not a whole number of pages",
                self.size
            )));
        }
        if self.layers.len() > MAX_LAYERS {
            return Err(invalid(format!(
                "{} memory layers (at most {MAX_LAYERS})",
                self.layers.len()
            )));
        }
        match self.layers.first() {
            None => return Err(invalid("no memory file")),
            Some(base) if base.ranges.is_some() => {
                return Err(invalid("the first memory layer is a diff"))
            }
            _ => {}
        }
        for (i, layer) in self.layers.iter().enumerate().skip(1) {
            let Some(ranges) = &layer.ranges else {
                return Err(invalid(format!(
                    "memory layer {i} is full but not the first"
                )));
            };
            self.check_ranges(i, ranges)?;
        }
        Ok(())
    }

    fn check_ranges(&self, layer: usize, ranges: &[FileRange]) -> Result<()> {
        let mut next = 0u64;
        for r in ranges {
            let end = r.offset.checked_add(r.len);
            let ok = r.len > 0
                && r.offset.is_multiple_of(PAGE_SIZE)
                && r.len.is_multiple_of(PAGE_SIZE)
                && r.offset >= next
                && end.is_some_and(|e| e <= self.size);
            if !ok {
                return Err(invalid(format!(
                    "memory layer {layer}: range {:#x}+{:#x} unaligned, out of order or outside {:#x} bytes",
                    r.offset, r.len, self.size
                )));
            }
            next = end.unwrap_or(u64::MAX);
        }
        Ok(())
    }
}

impl VmState {
    /// What can be checked without a host: counts and sizes in bounds, one device per
    /// transport, the memory record, each vCPU's own checks.
    pub fn validate(&self) -> Result<()> {
        if self.vcpus.is_empty() || self.vcpus.len() > MAX_VCPUS {
            return Err(invalid(format!(
                "{} vCPUs (1 to {MAX_VCPUS})",
                self.vcpus.len()
            )));
        }
        if self.devices.len() > MAX_DEVICES || self.transports.len() != self.devices.len() {
            return Err(invalid(format!(
                "{} virtio devices and {} transports",
                self.devices.len(),
                self.transports.len()
            )));
        }
        self.memory.validate()?;
        for (i, v) in self.vcpus.iter().enumerate() {
            v.validate()
                .map_err(|e| invalid(format!("vCPU {i}: {e}")))?;
        }
        Ok(())
    }

    /// Everything a restore relies on: [`validate`](Self::validate), and this host's CPU
    /// (`host`) able to run every saved vCPU ([`check_cpu`](Self::check_cpu)).
    pub fn check(&self, host: &vmkit_vcpu::CpuIdentity) -> Result<()> {
        self.validate()?;
        self.check_cpu(host)
    }

    /// This host's CPU (`host`) able to run every saved vCPU: the vendor, and no CPUID
    /// feature it lacks.
    pub fn check_cpu(&self, host: &vmkit_vcpu::CpuIdentity) -> Result<()> {
        for (i, v) in self.vcpus.iter().enumerate() {
            host.check_compatible(&v.cpuid)
                .map_err(|e| Error::Incompatible(format!("vCPU {i}: {e}")))?;
        }
        Ok(())
    }
}
