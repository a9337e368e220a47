//! x86_64 vCPUs for KVM virtual machines: setup and a run loop that can be stopped.
//!
//! * [`CpuidTemplate`]: KVM's supported CPUID, specialised per vCPU with a coherent topology
//!   (APIC ID = vCPU index, one package of N cores, leaves 1, 4, 0xB/0x1F) and caller
//!   [`CpuidMask`]s to hide features; [`CpuTemplate`]s are named sets of them, with the CR4
//!   bits to keep clear ([`restrict_cr4`]) and a `clearcpuid=` fallback for hosts whose KVM
//!   does not honour a mask ([`CpuTemplate::linux_clearcpuid`]).
//! * [`setup_entry`] with the loader's [`EntryPoint`](vmkit_boot::EntryPoint), at the
//!   addresses of the one guest address map (`vmkit_memory::layout`): 64-bit long mode for Linux bzImage/ELF (GDT,
//!   identity page tables, `rsi` = zero page) or 32-bit protected mode for PVH (`ebx` =
//!   `hvm_start_info`); [`setup_msrs`], [`setup_fpu`], [`setup_lint`] (LINT0 ExtINT, LINT1 NMI).
//! * [`Vcpu::run`]: dispatches port and MMIO exits to a [`VcpuExitHandler`] (the VMM's buses;
//!   this crate knows no bus), returns a [`VcpuStop`] on reset, power-off or stop, and counts
//!   exits in [`VcpuStats`].
//! * Stopping without races: [`VcpuControl::stop`] then [`kick`]: the kick signal makes an
//!   ongoing `KVM_RUN` return, and sets `immediate_exit` so one about to start returns at once.
//! * Pausing: [`VcpuControl::request_pause`], [`kick`], then [`VcpuControl::wait_parked`]:
//!   each vCPU parks between two `KVM_RUN`s (on a condition variable) until
//!   [`VcpuControl::resume`] or [`VcpuControl::stop`]; the run loop checks one atomic before
//!   each entry.
//! * Snapshots: [`save_state`] reads a stopped vCPU's whole [`VcpuState`] (serde) after
//!   [`complete_pending_io`], [`restore_state`] writes it into a fresh vCPU;
//!   [`CpuIdentity`] tells whether a saved CPUID can run on this host.
//!
//! ```no_run
//! use std::sync::Arc;
//! use kvm_ioctls::Kvm;
//! use vm_memory::GuestAddress;
//! use vmkit_vcpu::{
//!     install_kick_handler, setup_entry, CpuIdentity, CpuidConfig, CpuidTemplate, Vcpu,
//!     VcpuControl, VcpuExitHandler,
//! };
//! use vmkit_boot::EntryPoint;
//!
//! struct NoDevices;
//! impl VcpuExitHandler for NoDevices {
//!     fn pio_read(&self, _: u16, data: &mut [u8]) { data.fill(0xff) }
//!     fn pio_write(&self, _: u16, _: &[u8]) {}
//!     fn mmio_read(&self, _: u64, data: &mut [u8]) { data.fill(0xff) }
//!     fn mmio_write(&self, _: u64, _: &[u8]) {}
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! let kvm = Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! // ... memory slots, irqchip, kernel ...
//! let template = CpuidTemplate::from_kvm(&kvm)?;
//! let cfg = CpuidConfig { num_cpus: 1, masks: vec![] };
//! let mut vcpu = Vcpu::new(vm.create_vcpu(0)?, 0);
//! vcpu.fd().set_cpuid2(&template.for_vcpu(0, &cfg)?)?;
//! setup_entry(vcpu.fd(), &mem, EntryPoint::Pvh {
//!     entry: GuestAddress(0x10_0000),
//!     start_info: GuestAddress(0x6000),
//! })?;
//! install_kick_handler()?;
//! let control = VcpuControl::new();
//! let stop = vcpu.run(&NoDevices, &control)?;
//! // Stopped (or parked, on its own thread): its state, for a snapshot.
//! let msrs = kvm.get_msr_index_list()?;
//! let state = vcpu.save_state(msrs.as_slice())?;
//! CpuIdentity::host(&kvm)?.check_compatible(&state.cpuid)?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod boot;
mod cpuid;
mod identity;
mod run;
mod state;
mod template;

pub use boot::{restrict_cr4, setup_entry, setup_fpu, setup_lint, setup_msrs};
pub use cpuid::{CpuidConfig, CpuidMask, CpuidReg, CpuidTemplate};
pub use identity::{CpuIdentity, CpuidWord};
pub use run::{
    install_kick_handler, kick, kick_signal, ControlledLoop, ParkedTask, Vcpu, VcpuControl,
    VcpuCounters, VcpuExitHandler, VcpuStats, VcpuStop,
};
pub use state::{
    complete_pending_io, restore_state, save_state, FpuState, MsrEntry, VcpuState, MAX_MSRS,
    MAX_XSAVE_BYTES,
};
pub use template::{
    CpuTemplate, UnknownTemplate, CPU_TEMPLATES, CR4_FSGSBASE, CR4_OSXSAVE, CR4_PCIDE, CR4_PKE,
    CR4_SMAP,
};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("cannot read KVM's supported CPUID: {0}")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// `KVM_SET_CPUID2` or `KVM_GET_CPUID2` on a vCPU failed.
    #[error("cannot set or read the vCPU's CPUID: {0}")]
    VcpuCpuid(#[source] kvm_ioctls::Error),
    /// More CPUID entries than KVM takes.
    #[error("too many CPUID entries")]
    TooManyCpuidEntries,
    /// A vCPU index or count that makes no topology.
    #[error("no CPU topology for vCPU {index} of {num_cpus} (1 to 255 vCPUs)")]
    BadTopology {
        /// The vCPU index.
        index: u32,
        /// The vCPU count.
        num_cpus: u32,
    },
    /// Writing setup structures to guest memory failed (memory too small).
    #[error("cannot write the {0} to guest memory")]
    GuestMemory(&'static str),
    /// Getting or setting special registers failed.
    #[error("cannot set special registers: {0}")]
    Sregs(#[source] kvm_ioctls::Error),
    /// Setting general registers failed.
    #[error("cannot set registers: {0}")]
    Regs(#[source] kvm_ioctls::Error),
    /// Setting MSRs failed.
    #[error("cannot set boot MSRs{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Msrs(#[source] Option<kvm_ioctls::Error>),
    /// KVM refused one MSR.
    #[error("KVM refused to set MSR {0:#x}")]
    MsrRefused(u32),
    /// Setting the FPU state failed.
    #[error("cannot set the FPU state: {0}")]
    Fpu(#[source] kvm_ioctls::Error),
    /// Getting or setting the LAPIC state failed.
    #[error("cannot set up the local APIC: {0}")]
    Lapic(#[source] kvm_ioctls::Error),
    /// Installing or sending the kick signal failed.
    #[error("kick signal: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// `KVM_RUN` failed.
    #[error("KVM_RUN failed: {0}")]
    Run(#[source] kvm_ioctls::Error),
    /// KVM could not emulate what the guest did.
    #[error("vCPU {vcpu}: KVM internal error, suberror {suberror}, data {data:x?}")]
    InternalError {
        /// The vCPU.
        vcpu: u32,
        /// KVM's suberror code (1: emulation failure).
        suberror: u32,
        /// KVM's extra data.
        data: Vec<u64>,
    },
    /// The hardware refused to enter the guest.
    #[error("vCPU {vcpu}: VM entry failed, hardware reason {reason:#x} on host CPU {cpu}")]
    FailEntry {
        /// The vCPU.
        vcpu: u32,
        /// Hardware entry failure reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// Reading part of a vCPU's state failed.
    #[error("cannot read the vCPU's {0}: {1}")]
    GetState(&'static str, #[source] kvm_ioctls::Error),
    /// KVM refused part of a saved vCPU state.
    #[error("cannot restore the vCPU's {0}: {1}")]
    SetState(&'static str, #[source] kvm_ioctls::Error),
    /// A saved vCPU state that cannot be right (a count or size out of range).
    #[error("invalid vCPU state: {0}")]
    InvalidState(String),
    /// The XSAVE buffer could not be allocated.
    #[error("cannot allocate an XSAVE buffer")]
    XsaveAlloc,
    /// More MSRs in one request than KVM takes.
    #[error("too many MSRs for one request")]
    TooManyMsrs,
    /// The scratch VM that reads this host's effective CPUID could not be created.
    #[error("cannot create a scratch VM to read this host's CPUID: {0}")]
    ScratchVm(#[source] kvm_ioctls::Error),
    /// A saved CPU of another vendor.
    #[error("the snapshot's CPU vendor is {saved:?}, this host's is {host:?}")]
    CpuVendor {
        /// The saved vendor string.
        saved: String,
        /// This host's.
        host: String,
    },
    /// A saved CPUID feature this host's KVM does not support.
    #[error("the snapshot's CPU has CPUID leaf {leaf:#x}.{subleaf} {reg:?} bit {bit}, which this host's KVM does not support")]
    CpuFeature {
        /// The leaf.
        leaf: u32,
        /// The sub-leaf.
        subleaf: u32,
        /// The register.
        reg: CpuidReg,
        /// The lowest missing bit.
        bit: u32,
    },
    /// A saved XSAVE area larger than this host's.
    #[error("the snapshot's XSAVE area needs {saved} bytes (CPUID leaf 0xd.0 ECX), this host's KVM supports {host}")]
    XsaveSize {
        /// Saved size in bytes.
        saved: u32,
        /// This host's.
        host: u32,
    },
    /// An exit this run loop does not handle.
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
}

/// Result of this crate's functions.
pub type Result<T> = std::result::Result<T, Error>;
