//! The virtio core of vmkit: a transport-independent device model, the virtqueue protocol
//! written once on [virtio-queue], the glue that runs a device from its queue notifications
//! (polling included), the virtio-mmio transport, and (feature `pci`) the virtio-pci
//! transport. Everything is generic over the guest memory type, as virtio-queue is.
//!
//! | piece | what it is |
//! |---|---|
//! | [`VirtioDevice`] | what a device implements: type, queue sizes, features, config space, activate, `process_queue`, reset |
//! | [`ActivateContext`] | what a device gets at `DRIVER_OK`: guest memory, the ready queues, an interrupt, the negotiated features |
//! | [`ActiveQueue`] | the virtqueue protocol, once: [`pop`](ActiveQueue::pop) (checked chains, the notification-suppression loop), [`complete`](ActiveQueue::complete), [`signal_used`](ActiveQueue::signal_used) (`EVENT_IDX` / `NO_INTERRUPT`), [`set_poll`](ActiveQueue::set_poll); a corrupt ring sets `DEVICE_NEEDS_RESET` |
//! | [`Chain`] | a popped chain: head, checked descriptors (indirect tables followed; loops, over-long chains and buffers outside RAM refused) |
//! | [`QueueEventHandler`] | an event-manager subscriber calling `process_queue` when a queue's eventfd fires, and polling a queue without the device's lock when the device asked for it |
//! | [`DeviceMetrics`], [`Counter`], [`AtomicMetrics`] | per-device counters a VMM injects into a device's configuration and reads back; [`ActiveQueue::set_metrics`] counts interrupts and malformed chains in one place |
//! | [`RateLimiter`] (module [`rate_limiter`]) | Firecracker-style token buckets (bandwidth and operations, one-time burst) with a timerfd that ends a throttled period; [`ActiveQueue::set_throttled`] keeps a throttled queue from being polled |
//! | [`IoVecs`], [`mark_dirty`] | guest buffers as `iovec`s for `readv`/`writev`/io_uring, and marking what the kernel wrote there dirty |
//! | [`MmioTransport`] | virtio-mmio version 2 as a vm-device [`MutDeviceMmio`](vm_device::MutDeviceMmio), with the status and feature negotiation state machine |
//! | [`MmioInterrupt`] | InterruptStatus/ACK and ConfigGeneration over one [`InterruptLine`](vmkit_irq::InterruptLine) |
//! | [`MmioTransportState`], [`VirtioTransportState`], [`QueueSnapshot`] | snapshot state (serde) of a transport: [`MmioTransport::state`] while paused, [`MmioTransport::restore`] into a fresh transport (checked; a running device re-activated at its saved ring positions); `PciTransportState` likewise with feature `pci` |
//! | `pci::PciTransport` (feature `pci`) | virtio-pci modern as a `vmkit_pci::PciDevice`: common/notify/ISR/device capabilities in one 64-bit BAR, MSI-X vector per queue plus config, the same state machine as `MmioTransport`, DMA only while bus mastering is on |
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
//!     ActivateContext, ActivateError, MmioTransport, VirtioDevice, VirtioMemory,
//!     MMIO_MAGIC_VALUE, MMIO_SIZE, QUEUE_NOTIFY_OFFSET,
//! };
//!
//! /// A device that zero-fills whatever the driver offers on its one queue, on any memory.
//! struct Zeroes<M: VirtioMemory>(Option<ActivateContext<M>>);
//!
//! impl<M: VirtioMemory> VirtioDevice<M> for Zeroes<M> {
//!     fn device_type(&self) -> u32 { 4 }
//!     fn queue_max_sizes(&self) -> &[u16] { &[64] }
//!     fn device_features(&self) -> u64 { 0 }
//!     fn ack_features(&mut self, _features: u64) {}
//!     fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
//!     fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
//!     fn activate(&mut self, ctx: ActivateContext<M>) -> Result<(), ActivateError> {
//!         self.0 = Some(ctx);
//!         Ok(())
//!     }
//!     fn process_queue(&mut self, index: u16) {
//!         let Some(q) = self.0.as_mut().and_then(|c| c.queue_mut(index)) else { return };
//!         // Every chain, checked; a corrupt ring ends the loop with the device needing reset.
//!         while let Ok(Some(chain)) = q.pop() {
//!             let mut used = 0;
//!             for d in chain.descriptors().unwrap_or_default() {
//!                 let zeros = vec![0u8; d.len() as usize];
//!                 if d.is_write_only() && chain.memory().write_slice(&zeros, d.addr()).is_ok() {
//!                     used += d.len();
//!                 }
//!             }
//!             let head = chain.head();
//!             let _ = q.complete(head, used);
//!         }
//!         let _ = q.signal_used(); // if the driver's suppression rules allow
//!     }
//!     fn reset(&mut self) -> Option<ActivateContext<M>> { self.0.take() }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let memory: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! let irq = Arc::new(CountingLine::new()); // an irqfd-backed EventFdLine in a VMM
//! let transport = MmioTransport::new(Arc::new(Mutex::new(Zeroes(None))), memory, irq)?;
//!
//! // What the VMM wires (vmkit-kvm does all of it): queue notifications as ioeventfds…
//! let base = 0xD000_0000;
//! for n in transport.queue_notifiers(base) {
//!     assert_eq!((n.addr, n.datamatch), (base + QUEUE_NOTIFY_OFFSET, u32::from(n.queue)));
//!     // vm.register_ioevent(n.eventfd, &IoEventAddress::Mmio(n.addr), n.datamatch)?;
//! }
//! // …the glue on its event manager…
//! let mut events = event_manager::EventManager::new()?;
//! event_manager::SubscriberOps::add_subscriber(&mut events, transport.queue_event_handler()?);
//! // …the registers on its MMIO bus, and the device on the kernel command line or in the DSDT.
//! let bus = IoBus::new();
//! bus.register_mmio(mmio_range(base, MMIO_SIZE)?, Arc::new(Mutex::new(transport)))?;
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
mod iovec;
mod memory;
pub mod metrics;
mod mmio;
#[cfg(feature = "pci")]
pub mod pci;
mod queue;
pub mod rate_limiter;
mod state;
#[cfg(feature = "test-utils")]
pub mod test_utils;

pub use device::{
    read_config_space, ActivateContext, NeedsReset, VirtioDevice, FEATURE_RING_EVENT_IDX,
    FEATURE_RING_INDIRECT_DESC, FEATURE_VERSION_1, RING_FEATURES,
};
pub use error::{ActivateError, Error, Result};
pub use events::{QueueEventHandler, MAX_POLL_ROUNDS};
pub use interrupt::{
    InterruptReason, MmioInterrupt, VirtioInterrupt, INTERRUPT_STATUS_CONFIG,
    INTERRUPT_STATUS_USED_RING,
};
pub use iovec::{mark_dirty, IoVecs};
pub use memory::{MappedMemory, VirtioMemory};
pub use metrics::{AtomicMetrics, Counter, DeviceMetrics, MetricsSnapshot, NoMetrics};
pub use mmio::{
    regs, MmioNotifier, MmioTransport, CONFIG_SPACE_OFFSET, MMIO_MAGIC_VALUE, MMIO_SIZE,
    MMIO_VERSION, QUEUE_NOTIFY_OFFSET,
};
pub use queue::{chain_descriptors, ActiveQueue, Chain, ChainError};
pub use rate_limiter::{
    BucketUpdate, RateLimiter, RateLimiterConfig, RateLimiterUpdate, TokenBucketConfig,
};
#[cfg(feature = "pci")]
pub use state::PciTransportState;
pub use state::{MmioTransportState, QueueSlotState, QueueSnapshot, VirtioTransportState};
pub use virtio_queue::desc::split::Descriptor;
