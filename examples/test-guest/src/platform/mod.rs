//! The machine: boot, CPU and interrupt set-up, serial output, time, SMP,
//! memory, firmware tables (PVH start info, ACPI), PCI configuration access
//! and power. Nothing here knows about virtio devices or tests.

pub mod acpi;
pub mod apic;
pub mod arch;
pub mod boot;
pub mod heap;
pub mod idt;
pub mod mem;
pub mod pci;
pub mod phys;
pub mod power;
pub mod pvh;
pub mod ram;
pub mod serial;
pub mod smp;
pub mod time;
