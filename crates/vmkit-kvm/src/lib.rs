//! The KVM platform of vmkit: the one crate that knows both KVM and the KVM-free vmkit
//! crates, and joins them the way every VMM built from them must.
//!
//! | piece | what it is |
//! |---|---|
//! | [`Machine`] | the VM, guest memory in KVM's slots, the in-kernel irqchip, the one [`IoBus`](vmkit_bus::IoBus) the vCPUs dispatch on, and the [`EventFdExit`](vmkit_legacy::EventFdExit) every way of ending the VM reports to |
//! | [`Vcpus`], [`VcpuThreads`] | vCPUs created and set up (CPUID template, MSRs, FPU, LINT, entry state), one thread each on the bus ([`BusExits`]), paused and resumed together ([`VcpuThreads::pause`]), each vCPU's stop mapped to an [`ExitReason`](vmkit_legacy::ExitReason) in one place ([`exit_reason`]) |
//! | [`MmioPlatform`] | virtio devices on virtio-mmio: window and pin from the address map, irqfd, one ioeventfd per queue, command-line entries (linux-loader's `Cmdline`) and DSDT devices |
//! | [`PciPlatform`] | virtio devices on PCI bus 0: config ports and ECAM, BARs on the bus, MSI-X as KVM MSI routes with irqfds (`vmkit_irq::KvmMsiSink`), notify ioeventfds that follow BAR moves, the DSDT host bridge |
//! | [`ExitWatcher`] | an event-manager subscriber that wakes the VMM's loop when the VM ends |
//!
//! Addresses and pins come from the one guest address map, `vmkit_memory::layout`.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! use vmkit_kvm::{ExitWatcher, Machine, MachineConfig, MmioPlatform, VcpuConfig, Vcpus};
//! use vmkit_virtio_rng::{Rng, RngConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let machine = Machine::new(&MachineConfig::new(256 << 20))?;
//! let vcpus = Vcpus::create(
//!     machine.kvm(),
//!     machine.vm(),
//!     &VcpuConfig { count: 2, template: vmkit_vcpu::CpuTemplate::Host },
//! )?;
//! // A virtio-rng on virtio-mmio: window, pin, irqfd, ioeventfd, bus registration.
//! let mut mmio = MmioPlatform::new(&machine)?;
//! let rng = Arc::new(Mutex::new(Rng::for_memory(RngConfig::default())?));
//! let handler = mmio.attach(machine.memory().clone(), rng)?;
//! let mut cmdline = linux_loader::cmdline::Cmdline::new(4096)?;
//! cmdline.insert_str("console=ttyS0")?;
//! mmio.add_to_cmdline(&mut cmdline)?;
//! // … legacy devices on machine.bus() and ACPI tables (vmkit-boot), then the kernel:
//! let cmdline = cmdline.as_cstring()?.into_string()?;
//! let boot = vmkit_boot::BootConfig { cmdline: &cmdline, ..Default::default() };
//! let mut kernel = std::fs::File::open("vmlinux")?;
//! let loaded = vmkit_boot::load(machine.memory(), &mut kernel, boot)?;
//! vcpus.set_entry(machine.memory(), loaded.entry)?;
//! let threads = vcpus.start(machine.bus().clone(), machine.exit().clone())?;
//! let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()?;
//! events.add_subscriber(Arc::new(Mutex::new(handler)));
//! events.add_subscriber(Arc::new(Mutex::new(ExitWatcher::new(machine.exit().clone()))));
//! while machine.exit().reason().is_none() {
//!     events.run()?;
//! }
//! let _stats = threads.stop();
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod error;
mod events;
mod machine;
mod mmio;
mod pci;
mod vcpus;

pub use error::{Error, Result};
pub use events::ExitWatcher;
pub use machine::{open_kvm, Machine, MachineConfig};
pub use mmio::{MmioPlatform, MmioSlot};
pub use pci::PciPlatform;
pub use vcpus::{
    exit_reason, BusExits, ParkedVcpus, VcpuConfig, VcpuPrologue, VcpuThreads, Vcpus, MAX_VCPUS,
};
pub use vmkit_memory::{DirtyPages, GuestRam};
