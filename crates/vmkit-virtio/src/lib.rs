//! The virtio core of vmkit: a transport-independent device model, the queue plumbing on
//! [virtio-queue], the glue that runs a device from its queue notifications, the
//! virtio-mmio transport, and (feature `pci`) the virtio-pci transport.
//!
//! | piece | what it is |
//! |---|---|
//! | [`VirtioDevice`] | what a device implements: type, queue sizes, features, config space, activate, `process_queue`, reset |
//! | [`ActivateContext`] | what a device gets at `DRIVER_OK`: guest memory, the ready [`Queue`](virtio_queue::Queue)s with one notifier [`EventFd`](vmm_sys_util::eventfd::EventFd) each, a [`VirtioInterrupt`], the negotiated features |
//! | [`ActivateContext::process_queue`] | the notification-suppression loop (`EVENT_IDX` both ways, `VRING_AVAIL_F_NO_INTERRUPT`), used ring, interrupt, `DEVICE_NEEDS_RESET` on a corrupt ring |
//! | [`chain_descriptors`] | a descriptor chain (indirect tables followed) checked for loops, over-long chains and buffers outside RAM |
//! | [`QueueEventHandler`] | an event-manager subscriber calling `process_queue` when a queue's eventfd fires |
//! | [`MmioTransport`] | virtio-mmio version 2 as a vm-device [`MutDeviceMmio`](vm_device::MutDeviceMmio), with the status and feature negotiation state machine |
//! | [`MmioInterrupt`] | InterruptStatus/ACK and ConfigGeneration over one [`InterruptLine`](vmkit_irq::InterruptLine) |
//! | `pci::VirtioPciDevice` (feature `pci`) | virtio-pci modern as a `vmkit_pci::PciDevice`: common/notify/ISR/device capabilities in one 64-bit BAR, MSI-X vector per queue plus config, the same state machine as `MmioTransport` |
//! | `test_utils` (feature `test-utils`) | guest memory, a recording interrupt, mock-ring contexts, and a harness running virtio-drivers' drivers against a device in-process (on virtio-pci too, with `pci`) |
//!
//! Devices depend on this crate, virtio-queue, virtio-bindings and vm-memory only; they never
//! see KVM, the bus or the VMM.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//! use vmkit_bus::{mmio_range, IoBus};
//! use vmkit_irq::CountingLine;
//! use vmkit_virtio::{
//!     chain_descriptors, cmdline_entry, ActivateContext, ActivateError, MmioTransport,
//!     VirtioDevice, MMIO_MAGIC_VALUE, MMIO_SIZE, QUEUE_NOTIFY_OFFSET,
//! };
//!
//! /// A device that zero-fills whatever the driver offers on its one queue.
//! #[derive(Default)]
//! struct Zeroes(Option<ActivateContext>);
//!
//! impl VirtioDevice for Zeroes {
//!     fn device_type(&self) -> u32 { 4 }
//!     fn queue_max_sizes(&self) -> &[u16] { &[64] }
//!     fn device_features(&self) -> u64 { 0 }
//!     fn ack_features(&mut self, _features: u64) {}
//!     fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
//!     fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
//!     fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
//!         self.0 = Some(ctx);
//!         Ok(())
//!     }
//!     fn process_queue(&mut self, index: u16) {
//!         let Some(ctx) = self.0.as_mut() else { return };
//!         let _ = ctx.process_queue(index, |mem, chain| {
//!             let Ok(descs) = chain_descriptors(chain) else { return 0 };
//!             let mut used = 0;
//!             for d in descs.iter().filter(|d| d.is_write_only()) {
//!                 let zeros = vec![0u8; d.len() as usize];
//!                 if mem.write_slice(&zeros, d.addr()).is_ok() {
//!                     used += d.len();
//!                 }
//!             }
//!             used
//!         });
//!     }
//!     fn reset(&mut self) -> Option<ActivateContext> { self.0.take() }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! let irq = Arc::new(CountingLine::new()); // an irqfd-backed EventFdLine in a VMM
//! let transport = MmioTransport::new(Arc::new(Mutex::new(Zeroes::default())), memory, irq)?;
//!
//! // What the VMM wires: queue notifications as ioeventfds…
//! let base = 0xD000_0000;
//! for n in transport.queue_notifiers(base) {
//!     assert_eq!((n.addr, n.datamatch), (base + QUEUE_NOTIFY_OFFSET, u32::from(n.queue)));
//!     // vm.register_ioevent(n.eventfd, &IoEventAddress::Mmio(n.addr), n.datamatch)?;
//! }
//! // …the glue on its event manager…
//! let mut events = event_manager::EventManager::new()?;
//! event_manager::SubscriberOps::add_subscriber(&mut events, transport.queue_event_handler()?);
//! // …the registers on its MMIO bus, and the device on the kernel command line or in the DSDT.
//! let mut bus = IoBus::new();
//! bus.register_mmio(mmio_range(base, MMIO_SIZE)?, Arc::new(Mutex::new(transport)))?;
//! assert_eq!(cmdline_entry(base, 5), "virtio_mmio.device=4K@0xd0000000:5");
//!
//! // What a guest sees.
//! let mut magic = [0u8; 4];
//! assert!(bus.mmio_read(base, &mut magic).is_handled());
//! assert_eq!(u32::from_le_bytes(magic), MMIO_MAGIC_VALUE);
//! # let _ = events.run_with_timeout(0)?;
//! # Ok(())
//! # }
//! ```
//!
//! [virtio-queue]: https://crates.io/crates/virtio-queue
#![deny(missing_docs)]

mod common;
mod device;
mod error;
mod events;
mod interrupt;
mod mmio;
#[cfg(feature = "pci")]
pub mod pci;
mod queue;
#[cfg(feature = "test-utils")]
pub mod test_utils;

pub use device::{
    ActivateContext, ActiveQueue, NeedsReset, VirtioDevice, FEATURE_RING_EVENT_IDX,
    FEATURE_RING_INDIRECT_DESC, FEATURE_VERSION_1, RING_FEATURES,
};
pub use error::{ActivateError, Error, Result};
pub use events::QueueEventHandler;
pub use interrupt::{
    InterruptReason, MmioInterrupt, VirtioInterrupt, INTERRUPT_STATUS_CONFIG,
    INTERRUPT_STATUS_USED_RING,
};
pub use mmio::{
    cmdline_entry, regs, MmioTransport, QueueNotifier, CONFIG_SPACE_OFFSET, MMIO_MAGIC_VALUE,
    MMIO_SIZE, MMIO_VERSION, QUEUE_NOTIFY_OFFSET,
};
pub use queue::{chain_descriptors, needs_interrupt, ChainError, QueueRun};
pub use virtio_queue::desc::split::Descriptor;
