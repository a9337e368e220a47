//! PIO and MMIO buses for KVM VMMs, on [vm-device], with MMIO address and GSI allocation on
//! [vm-allocator].
//!
//! - [`IoBus`]: vm-device's `IoManager` (a `BTreeMap` of ranges per bus, overlap-checked on
//!   registration) with errors that name the range a new one overlaps, and dispatch that
//!   reports an access no device handles as [`Access::Unmapped`] (reads float to `0xFF`)
//!   instead of an error. Share it as `Arc<IoBus>` between the vCPU threads and whatever
//!   moves devices at run time (PCI BARs): dispatch and registration are both `&self`;
//!   dispatch holds the bus's read lock only for the range lookup, never while a device
//!   runs, and allocates nothing.
//! - [`MmioAllocator`]: device MMIO ranges of a size and alignment from a window.
//! - [`GsiAllocator`]: interrupt lines (GSIs) from a range.
//!
//! Devices implement vm-device's [`DevicePio`] / [`DeviceMmio`] (shared state, `&self`) or
//! [`MutDevicePio`] / [`MutDeviceMmio`] (`&mut self`, registered as `Arc<Mutex<_>>`).
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_bus::vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
//! use vmkit_bus::{pio_range, Access, GsiAllocator, IoBus, MmioAllocator, MutDeviceMmio, MutDevicePio};
//!
//! /// A one-register device.
//! #[derive(Default)]
//! struct Scratch(u8);
//!
//! impl MutDevicePio for Scratch {
//!     fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
//!         data.fill(self.0);
//!     }
//!     fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
//!         self.0 = data[0];
//!     }
//! }
//!
//! impl MutDeviceMmio for Scratch {
//!     fn mmio_read(&mut self, _base: MmioAddress, _offset: MmioAddressOffset, data: &mut [u8]) {
//!         data.fill(self.0);
//!     }
//!     fn mmio_write(&mut self, _base: MmioAddress, _offset: MmioAddressOffset, data: &[u8]) {
//!         self.0 = data[0];
//!     }
//! }
//!
//! # fn main() -> Result<(), vmkit_bus::Error> {
//! let bus = IoBus::new();
//! let mut mmio = MmioAllocator::new(0xD000_0000..0xFEC0_0000)?;
//! let mut gsis = GsiAllocator::new(5..=23)?;
//!
//! bus.register_pio(pio_range(0x3F8, 8)?, Arc::new(Mutex::new(Scratch::default())))?;
//! // Overlaps are refused, naming the registered range.
//! let err = bus
//!     .register_pio(pio_range(0x3FC, 8)?, Arc::new(Mutex::new(Scratch::default())))
//!     .unwrap_err();
//! assert_eq!(err.to_string(), "PIO range 0x3fc..=0x403 overlaps the registered range 0x3f8..=0x3ff");
//!
//! let range = mmio.allocate(0x1000, 0x1000)?;
//! let gsi = gsis.allocate()?;
//! assert_eq!((range.base().0, gsi), (0xD000_0000, 5));
//! bus.register_mmio(range, Arc::new(Mutex::new(Scratch::default())))?;
//!
//! // Share with the vCPU threads; dispatch takes `&self`.
//! let bus = Arc::new(bus);
//! assert_eq!(bus.pio_write(0x3F9, &[0x42]), Access::Handled);
//! let mut data = [0u8; 1];
//! assert!(bus.pio_read(0x3F9, &mut data).is_handled());
//! assert_eq!(data, [0x42]);
//!
//! // Nothing at COM2: counted by the VMM, the guest reads 0xFF.
//! assert_eq!(bus.pio_read(0x2F8, &mut data), Access::Unmapped);
//! assert_eq!(data, [0xFF]);
//! # Ok(())
//! # }
//! ```
//!
//! [vm-device]: https://crates.io/crates/vm-device
//! [vm-allocator]: https://crates.io/crates/vm-allocator
#![deny(missing_docs)]

mod alloc;
mod bus;
mod error;

pub use alloc::{GsiAllocator, MmioAllocator};
pub use bus::{mmio_range, pio_range, Access, IoBus, MmioDevice, PioDevice};
pub use error::{BusKind, Error, Result};

pub use vm_device::bus::{MmioRange, PioRange};
pub use vm_device::{DeviceMmio, DevicePio, MutDeviceMmio, MutDevicePio};

/// The vm-allocator crate this one is built on.
pub use vm_allocator;
/// The vm-device crate this one is built on, for its address and range types.
pub use vm_device;

/// The README's example, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctest;
