//! Legacy PC devices for KVM VMMs, as vm-device PIO devices that know nothing of KVM, and
//! the ACPI Generic Event Device (an MMIO device) for the power button.
//!
//! | device | ports | built on |
//! |---|---|---|
//! | [`Serial`]: 16550A UART | [`COM1_PORT`] + [`SERIAL_PORT_COUNT`] | vm-superio `Serial` |
//! | [`I8042`]: keyboard controller and PS/2 keyboard (Ctrl-Alt-Del, reset line) | [`I8042_PORT`] + [`I8042_PORT_COUNT`] | — |
//! | [`AcpiSleep`]: hardware-reduced ACPI sleep control/status and reset registers | [`ACPI_SLEEP_PORT`] + [`ACPI_SLEEP_PORT_COUNT`] | — |
//! | [`DebugPort`]: POST port, write counter and timestamps | [`DEBUG_PORT`] + [`DEBUG_PORT_COUNT`] | — |
//! | [`Ged`]: ACPI Generic Event Device, the power button (MMIO) | vmkit-memory's `layout::GED_ADDR` + [`GED_REGISTER_SIZE`] bytes | — |
//!
//! Each PIO device implements vm-device's [`MutDevicePio`](vm_device::MutDevicePio): register
//! it as `Arc<Mutex<Device>>` on the PIO bus. [`DebugPort`] also implements
//! [`DevicePio`](vm_device::DevicePio) with atomics; register it as `Arc<DebugPort>`.
//! [`Ged`] implements [`MutDeviceMmio`](vm_device::MutDeviceMmio): register it as
//! `Arc<Mutex<Ged>>` on the MMIO bus.
//! [`OutputSink`] is the bounded, non-blocking `Write` to give the [`Serial`] (or a
//! virtio-console): a stdout nobody reads never stalls the vCPU writing to it.
//! Interrupts go out through an [`InterruptLine`](vmkit_irq::InterruptLine), power-off and
//! reset requests through an [`ExitNotifier`]. Accesses that are not one byte, or fall
//! outside a device's ports, are ignored (reads return `0xFF`): nothing a guest does
//! panics.
//!
//! Snapshot/restore: [`Serial::state`] / [`Serial::from_state`] ([`SerialState`]: vm-superio's
//! registers and unread input), [`I8042::state`] / [`I8042::restore`] ([`I8042State`]),
//! [`Ged::state`] / [`Ged::restore`] ([`GedState`]). [`AcpiSleep`] has no state to save
//! (its status register never holds `WAK_STS`: there is no S3), nor has [`DebugPort`]
//! beyond its counters. A state out of range is [`Error::State`], never a panic.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_bus::{pio_range, IoBus};
//! use vmkit_irq::CountingLine;
//! use vmkit_legacy::*;
//!
//! let exit = Arc::new(EventFdExit::new()?);
//! let com1_irq = Arc::new(CountingLine::new()); // an irqfd-backed line in a VMM
//! let kbd_irq = Arc::new(CountingLine::new());
//! let serial = Arc::new(Mutex::new(Serial::new(com1_irq, Vec::new())));
//! let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone(), kbd_irq.clone())));
//! let debug = Arc::new(DebugPort::new());
//!
//! let mut bus = IoBus::new();
//! bus.register_pio(pio_range(COM1_PORT, SERIAL_PORT_COUNT)?, serial.clone())?;
//! bus.register_pio(pio_range(I8042_PORT, I8042_PORT_COUNT)?, i8042.clone())?;
//! bus.register_pio(
//!     pio_range(ACPI_SLEEP_PORT, ACPI_SLEEP_PORT_COUNT)?,
//!     Arc::new(Mutex::new(AcpiSleep::new(exit.clone(), AcpiSleepConfig::default()))),
//! )?;
//! bus.register_pio(pio_range(DEBUG_PORT, DEBUG_PORT_COUNT)?, debug.clone())?;
//!
//! // What a guest does:
//! for b in b"ok\n" {
//!     assert!(bus.pio_write(COM1_PORT, &[*b]).is_handled());
//! }
//! assert!(bus.pio_write(DEBUG_PORT, &[0x42]).is_handled());
//! assert!(bus.pio_write(ACPI_SLEEP_PORT, &[0x34]).is_handled()); // SLP_EN | SLP_TYP=5
//!
//! assert_eq!(serial.lock().unwrap().writer().as_slice(), b"ok\n");
//! assert_eq!(debug.stats().writes, 1);
//! assert_eq!(exit.eventfd().read()?, 1);
//! assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
//!
//! // Host input for the guest; keep what was not taken for later.
//! let taken = serial.lock().unwrap().enqueue_input(b"root\n");
//! assert_eq!(taken, 5);
//!
//! // Ctrl-Alt-Del for the guest's keyboard driver: IRQ 1, then 11 bytes at port 0x60.
//! i8042.lock().unwrap().send_ctrl_alt_del()?;
//! assert_eq!(kbd_irq.count(), 1);
//! let mut status = [0];
//! assert!(bus.pio_read(I8042_PORT + 4, &mut status).is_handled());
//! assert_eq!(status[0] & 1, 1); // output buffer full
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

mod acpi;
mod debug_port;
mod error;
mod exit;
mod ged;
mod i8042;
mod output;
mod serial;

pub use acpi::{
    AcpiSleep, AcpiSleepConfig, ACPI_SLEEP_PORT_COUNT, RESET_OFFSET, SLEEP_CONTROL_OFFSET,
    SLEEP_STATUS_OFFSET, WAK_STS,
};
pub use debug_port::{DebugPort, DebugPortStats, DEBUG_PORT_COUNT};
pub use error::{Error, Result};
pub use exit::{EventFdExit, ExitNotifier, ExitReason, ExitTrigger};
pub use ged::{Ged, GedState, GED_EVENT_POWER_BUTTON, GED_REGISTER_SIZE};
pub use i8042::{
    I8042State, I8042Stats, CTRL_ALT_DEL_SCANCODES, I8042, I8042_KBD_BUFFER_SIZE, I8042_PORT_COUNT,
};
pub use output::{
    reopen_nonblocking, OutputSink, OutputSinkConfig, OutputStats, DEFAULT_OUTPUT_BUFFER,
};
pub use serial::{
    InterruptTrigger, Serial, SerialConfig, SerialState, SerialStats, SERIAL_FIFO_SIZE,
    SERIAL_PORT_COUNT,
};

/// Base port of COM1.
pub const COM1_PORT: u16 = 0x3F8;
/// GSI of COM1 (ISA IRQ 4).
pub const COM1_GSI: u32 = 4;
/// GSI of the i8042's keyboard interrupt (ISA IRQ 1).
pub const I8042_GSI: u32 = 1;
/// Base port of the i8042 (data port; the command/status port is `I8042_PORT + 4`).
pub const I8042_PORT: u16 = 0x60;
/// Base port of the ACPI sleep registers: sleep control at `+0`, sleep status at `+1`,
/// reset at `+2`. The FADT's `SLEEP_CONTROL_REG`, `SLEEP_STATUS_REG` and `RESET_REG` must
/// point there.
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// The debug (POST) port.
pub const DEBUG_PORT: u16 = 0x80;

#[cfg(test)]
mod test_util {
    use std::sync::{Arc, Mutex};

    use crate::{ExitNotifier, ExitReason};

    /// An exit notifier that records what it is told.
    #[derive(Default)]
    pub struct Recorder(Mutex<Vec<ExitReason>>);

    impl Recorder {
        pub fn new() -> Arc<Self> {
            Arc::new(Self::default())
        }

        pub fn reasons(&self) -> Vec<ExitReason> {
            self.0.lock().unwrap().clone()
        }
    }

    impl ExitNotifier for Recorder {
        fn notify_exit(&self, reason: ExitReason) {
            self.0.lock().unwrap().push(reason);
        }
    }
}
