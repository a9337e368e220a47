//! The hardware-reduced ACPI sleep and reset registers.

use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::exit::{ExitNotifier, ExitReason};

/// Number of ports of [`AcpiSleep`]: sleep control, sleep status, reset.
pub const ACPI_SLEEP_PORT_COUNT: u16 = 3;

/// Offset of the sleep control register (FADT `SLEEP_CONTROL_REG`).
pub const SLEEP_CONTROL_OFFSET: u16 = 0;
/// Offset of the sleep status register (FADT `SLEEP_STATUS_REG`).
pub const SLEEP_STATUS_OFFSET: u16 = 1;
/// Offset of the reset register (FADT `RESET_REG`).
pub const RESET_OFFSET: u16 = 2;

/// Sleep control: SLP_EN, "enter the sleep state in SLP_TYP".
const SLP_EN: u8 = 1 << 5;
/// Sleep control: SLP_TYP, bits 2..=4.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;
/// Sleep status: WAK_STS, bit 7.
pub const WAK_STS: u8 = 1 << 7;

/// Configuration of [`AcpiSleep`]; both values must match the tables the guest reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiSleepConfig {
    /// The SLP_TYP value of S5, as the DSDT's `\_S5` package gives it (0..=7).
    pub s5_sleep_type: u8,
    /// The FADT's `RESET_VALUE`.
    pub reset_value: u8,
}

impl Default for AcpiSleepConfig {
    /// S5 sleep type 5, reset value 0x01.
    fn default() -> Self {
        Self {
            s5_sleep_type: 5,
            reset_value: 0x01,
        }
    }
}

/// The sleep control, sleep status and reset registers of a hardware-reduced ACPI
/// platform (no PM1 blocks), one byte each from the base port (0x600).
///
/// - offset 0, sleep control: a write with SLP_EN (bit 5) set and SLP_TYP (bits 2..=4)
///   equal to the S5 sleep type calls the notifier with [`ExitReason::PowerOff`]; other
///   sleep states are not supported and ignored. Reads 0.
/// - offset 1, sleep status: reads WAK_STS (bit 7) and nothing else; it is never set
///   since the guest never wakes from a sleep. Writing 1 clears a bit.
/// - offset 2, reset: writing the reset value calls the notifier with
///   [`ExitReason::Reset`]. Reads 0.
///
/// One-byte accesses only; others are ignored, and such reads return `0xFF`.
pub struct AcpiSleep {
    notifier: Arc<dyn ExitNotifier>,
    config: AcpiSleepConfig,
    status: u8,
}

impl AcpiSleep {
    /// The registers, reporting to `notifier`.
    pub fn new(notifier: Arc<dyn ExitNotifier>, config: AcpiSleepConfig) -> Self {
        Self {
            notifier,
            config,
            status: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> AcpiSleepConfig {
        self.config
    }
}

impl std::fmt::Debug for AcpiSleep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiSleep")
            .field("config", &self.config)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl MutDevicePio for AcpiSleep {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (data, offset) {
            ([b], SLEEP_STATUS_OFFSET) => *b = self.status & WAK_STS,
            ([b], SLEEP_CONTROL_OFFSET | RESET_OFFSET) => *b = 0,
            (data, _) => data.fill(0xFF),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let &[value] = data else {
            return;
        };
        match offset {
            SLEEP_CONTROL_OFFSET => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if value & SLP_EN != 0 && sleep_type == self.config.s5_sleep_type {
                    self.notifier.notify_exit(ExitReason::PowerOff);
                }
            }
            SLEEP_STATUS_OFFSET => self.status &= !value,
            RESET_OFFSET if value == self.config.reset_value => {
                self.notifier.notify_exit(ExitReason::Reset);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Recorder;

    const BASE: PioAddress = PioAddress(0x600);

    fn slp(typ: u8) -> u8 {
        SLP_EN | (typ << SLP_TYP_SHIFT)
    }

    #[test]
    fn s5_powers_off_s3_does_not() {
        let rec = Recorder::new();
        let mut acpi = AcpiSleep::new(rec.clone(), AcpiSleepConfig::default());
        // S3 (sleep type 3 in the usual tables): ignored.
        acpi.pio_write(BASE, SLEEP_CONTROL_OFFSET, &[slp(3)]);
        // S5's type without SLP_EN: ignored.
        acpi.pio_write(BASE, SLEEP_CONTROL_OFFSET, &[5 << SLP_TYP_SHIFT]);
        assert!(rec.reasons().is_empty());
        assert_eq!(slp(5), 0x34);
        acpi.pio_write(BASE, SLEEP_CONTROL_OFFSET, &[0x34]);
        assert_eq!(rec.reasons(), vec![ExitReason::PowerOff]);
    }

    #[test]
    fn s5_value_is_configurable() {
        let rec = Recorder::new();
        let config = AcpiSleepConfig {
            s5_sleep_type: 7,
            ..Default::default()
        };
        let mut acpi = AcpiSleep::new(rec.clone(), config);
        acpi.pio_write(BASE, SLEEP_CONTROL_OFFSET, &[slp(5)]);
        assert!(rec.reasons().is_empty());
        acpi.pio_write(BASE, SLEEP_CONTROL_OFFSET, &[slp(7)]);
        assert_eq!(rec.reasons(), vec![ExitReason::PowerOff]);
    }

    #[test]
    fn reset_register() {
        let rec = Recorder::new();
        let mut acpi = AcpiSleep::new(rec.clone(), AcpiSleepConfig::default());
        acpi.pio_write(BASE, RESET_OFFSET, &[0x06]);
        assert!(rec.reasons().is_empty());
        acpi.pio_write(BASE, RESET_OFFSET, &[0x01]);
        assert_eq!(rec.reasons(), vec![ExitReason::Reset]);

        let rec = Recorder::new();
        let mut acpi = AcpiSleep::new(
            rec.clone(),
            AcpiSleepConfig {
                reset_value: 0x06,
                ..Default::default()
            },
        );
        acpi.pio_write(BASE, RESET_OFFSET, &[0x06]);
        assert_eq!(rec.reasons(), vec![ExitReason::Reset]);
    }

    #[test]
    fn status_reads_zero_and_is_write_one_to_clear() {
        let rec = Recorder::new();
        let mut acpi = AcpiSleep::new(rec.clone(), AcpiSleepConfig::default());
        let mut b = [0xAAu8];
        acpi.pio_read(BASE, SLEEP_STATUS_OFFSET, &mut b);
        assert_eq!(b, [0]);
        acpi.status = WAK_STS;
        acpi.pio_read(BASE, SLEEP_STATUS_OFFSET, &mut b);
        assert_eq!(b, [WAK_STS]);
        // Writing 0 leaves it; writing 1 clears it (what Linux does before sleeping).
        acpi.pio_write(BASE, SLEEP_STATUS_OFFSET, &[0]);
        acpi.pio_read(BASE, SLEEP_STATUS_OFFSET, &mut b);
        assert_eq!(b, [WAK_STS]);
        acpi.pio_write(BASE, SLEEP_STATUS_OFFSET, &[WAK_STS]);
        acpi.pio_read(BASE, SLEEP_STATUS_OFFSET, &mut b);
        assert_eq!(b, [0]);
        assert!(rec.reasons().is_empty());
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let rec = Recorder::new();
        let mut acpi = AcpiSleep::new(rec.clone(), AcpiSleepConfig::default());
        acpi.pio_write(BASE, SLEEP_CONTROL_OFFSET, &[slp(5), 0]);
        acpi.pio_write(BASE, RESET_OFFSET, &[1, 0]);
        acpi.pio_write(BASE, 3, &[1]);
        acpi.pio_write(BASE, SLEEP_CONTROL_OFFSET, &[]);
        assert!(rec.reasons().is_empty());
        let mut w = [0u8; 2];
        acpi.pio_read(BASE, SLEEP_STATUS_OFFSET, &mut w);
        assert_eq!(w, [0xFF; 2]);
        let mut b = [0u8];
        acpi.pio_read(BASE, 3, &mut b);
        assert_eq!(b, [0xFF]);
        acpi.pio_read(BASE, SLEEP_CONTROL_OFFSET, &mut b);
        assert_eq!(b, [0]);
    }
}
