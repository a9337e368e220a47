//! Interrupts for x86_64 KVM virtual machines.
//!
//! Two halves, so device crates never need KVM:
//!
//! * Always: [`InterruptLine`], the one-method trait through which a device raises its
//!   interrupt, with [`EventFdLine`] (an eventfd, which the VMM registers as a KVM irqfd) and
//!   [`CountingLine`] (for tests); [`MsiMessage`] and [`MsiVectorSink`], through which a
//!   PCI function's MSI-X vectors are delivered, with [`RecordingSink`] (for tests).
//! * Feature `kvm` (default): [`Irqchip`] creates the in-kernel PIC + IOAPIC and PIT and
//!   installs the PC's legacy GSI routing ([`GsiRouting`], MSI routes too);
//!   [`Irqchip::line`] hands out irqfd-backed lines; [`MsiGsiAllocator`] hands out GSIs above
//!   the IOAPIC pins for MSI routes; [`KvmMsiSink`] is the [`MsiVectorSink`] that turns a
//!   function's vectors into KVM MSI routes with an irqfd each; [`IrqchipState`] is the
//!   irqchip's, PIT's and KVM clock's state for snapshots ([`Irqchip::save_state`]).
//!
//! A device crate depends on `vmkit-irq = { version = "0.1", default-features = false }`:
//!
//! ```
//! use std::sync::Arc;
//! use vmkit_irq::{CountingLine, InterruptLine};
//!
//! struct Uart { irq: Arc<dyn InterruptLine> }
//! impl Uart {
//!     fn byte_arrived(&self) { let _ = self.irq.trigger(); }
//! }
//!
//! let line = Arc::new(CountingLine::new());
//! let uart = Uart { irq: line.clone() };
//! uart.byte_arrived();
//! assert_eq!(line.count(), 1);
//! ```
#![deny(missing_docs)]

mod alloc;
#[cfg(feature = "kvm")]
mod kvm;
#[cfg(feature = "kvm")]
mod kvm_msi;
mod line;
mod msi;

pub use alloc::{AllocError, MsiGsiAllocator};
#[cfg(feature = "kvm")]
pub use kvm::{
    Error, GsiRouting, Irqchip, IrqchipConfig, IrqchipState, Result, IRQCHIP_STATE_BYTES,
};
#[cfg(feature = "kvm")]
pub use kvm_msi::KvmMsiSink;
pub use line::{CountingLine, EventFdLine, InterruptLine};
pub use msi::{MsiMessage, MsiVectorSink, RecordingSink, SinkEvent};

/// Number of IOAPIC pins (GSIs `0..IOAPIC_PINS`) of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;
