//! The i8042 keyboard controller, reduced to its CPU reset line.

use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::I8042Device;

use crate::exit::{ExitNotifier, ExitReason, ExitTrigger};

/// Number of ports of the i8042 (`0x60..0x65`: data at offset 0, command/status at 4).
pub const I8042_PORT_COUNT: u16 = 5;

/// The i8042 on the PIO bus: vm-superio's [`I8042Device`] behind vm-device's
/// [`MutDevicePio`], its reset line wired to an [`ExitNotifier`].
///
/// Writing the "pulse reset line" command (`0xFE`) to the command port (0x64, offset 4)
/// calls the notifier with [`ExitReason::Reset`]. Nothing else is modelled: reads of the
/// data and status ports return 0 (no data, controller ready), there is no keyboard and
/// no interrupt. One-byte accesses only; others are ignored, and such reads return `0xFF`.
pub struct I8042 {
    inner: I8042Device<ExitTrigger>,
}

impl I8042 {
    /// An i8042 that reports the reset command to `notifier`.
    pub fn new(notifier: Arc<dyn ExitNotifier>) -> Self {
        Self {
            inner: I8042Device::new(ExitTrigger::new(notifier, ExitReason::Reset)),
        }
    }
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

fn register(offset: PioAddressOffset, len: usize) -> Option<u8> {
    // `offset < 5` fits in u8.
    (len == 1 && offset < I8042_PORT_COUNT).then_some(offset as u8)
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match register(offset, data.len()) {
            Some(reg) => data[0] = self.inner.read(reg),
            None => data.fill(0xFF),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Some(reg) = register(offset, data.len()) {
            // The trigger is infallible: it calls the notifier.
            let _ = self.inner.write(reg, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Recorder;

    const BASE: PioAddress = PioAddress(0x60);

    #[test]
    fn reset_command_notifies_reset() {
        let rec = Recorder::new();
        let mut kbd = I8042::new(rec.clone());
        // Other commands, and 0xFE on the data port, do nothing.
        kbd.pio_write(BASE, 4, &[0xAA]);
        kbd.pio_write(BASE, 0, &[0xFE]);
        assert!(rec.reasons().is_empty());
        kbd.pio_write(BASE, 4, &[0xFE]);
        assert_eq!(rec.reasons(), vec![ExitReason::Reset]);
    }

    #[test]
    fn reads_and_bad_accesses() {
        let rec = Recorder::new();
        let mut kbd = I8042::new(rec.clone());
        let mut b = [0xAAu8];
        kbd.pio_read(BASE, 4, &mut b);
        assert_eq!(b, [0]);
        kbd.pio_read(BASE, 5, &mut b);
        assert_eq!(b, [0xFF]);
        let mut w = [0u8; 2];
        kbd.pio_read(BASE, 4, &mut w);
        assert_eq!(w, [0xFF; 2]);
        kbd.pio_write(BASE, 4, &[0xFE, 0x00]);
        kbd.pio_write(BASE, 4, &[]);
        kbd.pio_write(BASE, 9, &[0xFE]);
        assert!(rec.reasons().is_empty());
    }
}
