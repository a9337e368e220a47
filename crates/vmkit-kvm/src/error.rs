//! The error type of this crate.

/// What can go wrong while building a VM with this crate. Each variant is one line for a
/// user, naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` does not exist.
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd, or enable nested virtualization)")]
    NoKvm,
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm: {0} (the user needs read-write access, e.g. membership of group kvm)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_VM` failed.
    #[error("cannot create a VM: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// Guest memory could not be created or registered.
    #[error("guest memory: {0}")]
    Memory(#[from] vmkit_memory::Error),
    /// The interrupt controller or a route failed.
    #[error("{0}")]
    Irq(#[from] vmkit_irq::Error),
    /// No vCPU asked for.
    #[error("at least 1 vCPU is needed")]
    NoCpus,
    /// More vCPUs than KVM (or the MADT's one-byte APIC IDs) allows.
    #[error("{asked} vCPUs: this host's KVM allows at most {max}")]
    TooManyCpus {
        /// vCPUs asked for.
        asked: u32,
        /// The limit.
        max: u32,
    },
    /// `KVM_GET_MSR_INDEX_LIST` failed.
    #[error("cannot read the MSR list: {0}")]
    MsrList(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_VCPU` failed.
    #[error("cannot create vCPU {index}: {source}")]
    CreateVcpu {
        /// The vCPU.
        index: u32,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
    /// Setting a vCPU up (CPUID, MSRs, FPU, LAPIC, entry state) failed.
    #[error("cannot set up vCPU {index}: {source}")]
    SetupVcpu {
        /// The vCPU.
        index: u32,
        /// What vmkit-vcpu reported.
        source: vmkit_vcpu::Error,
    },
    /// Some vCPU did not park within the pause's timeout (the pause was withdrawn).
    #[error(
        "pausing the vCPUs timed out after {timeout:?}: {parked} of {live} running vCPUs parked"
    )]
    PauseTimeout {
        /// vCPUs parked when the time was up.
        parked: usize,
        /// vCPUs still running (not returned) then.
        live: usize,
        /// The timeout.
        timeout: std::time::Duration,
    },
    /// A vCPU state was asked for while the vCPUs run.
    #[error("the vCPUs must be paused to save their state")]
    NotPaused,
    /// A vCPU has returned (reset, power-off, error): it has no state to save.
    #[error("vCPU {index} has stopped (the guest reset, powered off or failed): no state to save")]
    VcpuGone {
        /// The vCPU.
        index: usize,
    },
    /// Reading a vCPU's state failed.
    #[error("cannot save the state of vCPU {index}: {source}")]
    SaveVcpu {
        /// The vCPU.
        index: usize,
        /// What vmkit-vcpu reported.
        source: vmkit_vcpu::Error,
    },
    /// The parked vCPUs did not read their state in time (the pause was withdrawn, or a
    /// vCPU thread is stuck).
    #[error("the vCPUs did not save their state within {0:?}")]
    SaveTimeout(std::time::Duration),
    /// A snapshot with another number of vCPUs than this VM's.
    #[error("the snapshot has {saved} vCPUs, this VM {here}")]
    VcpuCount {
        /// vCPUs in the snapshot.
        saved: usize,
        /// vCPUs created here.
        here: usize,
    },
    /// Writing a saved state into a vCPU failed.
    #[error("cannot restore vCPU {index}: {source}")]
    RestoreVcpu {
        /// The vCPU.
        index: u32,
        /// What vmkit-vcpu reported.
        source: vmkit_vcpu::Error,
    },
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A vCPU thread's prologue ([`Vcpus::start_with`](crate::Vcpus::start_with)) failed:
    /// no vCPU ran.
    #[error("vCPU {index}: {message}")]
    VcpuPrologue {
        /// The vCPU.
        index: u32,
        /// What failed.
        message: String,
    },
    /// The bus refused a range (an overlap), or the window/GSI allocators ran out.
    #[error("{0}")]
    Bus(#[from] vmkit_bus::Error),
    /// A virtio transport could not be built.
    #[error("{0}")]
    Virtio(#[from] vmkit_virtio::Error),
    /// The PCI bus refused a device (full, or a place it cannot use).
    #[error("PCI: {0}")]
    Pci(#[from] vmkit_pci::Error),
    /// A snapshot holds another number of virtio transports than the VMM attached.
    #[error("restore: the snapshot has {saved} {transport} devices but {attached} are attached")]
    TransportCount {
        /// "virtio-mmio" or "virtio-pci".
        transport: &'static str,
        /// How many states the snapshot holds.
        saved: usize,
        /// How many devices are attached.
        attached: usize,
    },
    /// A saved transport state does not fit the device attached in its place.
    #[error("restore: virtio device {index} (attach order): {source}")]
    TransportRestore {
        /// The device's position in attach order.
        index: usize,
        /// What the transport refused.
        #[source]
        source: vmkit_virtio::Error,
    },
    /// `KVM_IOEVENTFD` failed.
    #[error("cannot register an ioeventfd at {addr:#x}: {source}")]
    IoEvent {
        /// The guest address.
        addr: u64,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
    /// A legacy-device helper (the exit notifier) could not be set up.
    #[error("{0}")]
    Legacy(#[from] vmkit_legacy::Error),
    /// An eventfd could not be created or cloned.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The kernel command line refused an entry (too long, bad characters).
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
}

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
