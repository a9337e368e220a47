//! The ACPI Generic Event Device (`ACPI0013`): how a hardware-reduced ACPI platform, which
//! has no fixed power button and no GPE blocks, tells the guest that the power button was
//! pressed.

use std::fmt;
use std::sync::Arc;

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vmkit_irq::InterruptLine;

use crate::error::{Error, Result};

/// Size in bytes of the GED's event register, the one register it decodes (at offset 0):
/// register the device on the MMIO bus for this many bytes.
pub const GED_REGISTER_SIZE: u64 = 1;

/// Event register bit: the power button was pressed. The DSDT's `_EVT` turns it into
/// `Notify (\_SB.PWRB, 0x80)`.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;

/// The Generic Event Device: one byte of pending event bits and an interrupt, on the MMIO
/// bus (vm-device's [`MutDeviceMmio`]).
///
/// - [`power_button`](Self::power_button) (the host) sets [`GED_EVENT_POWER_BUTTON`] and
///   raises the interrupt, an edge.
/// - A one-byte read at offset 0 (the guest's `_EVT` method, run by Linux's `evged` driver
///   on that interrupt) returns the pending bits and clears them, so each press is reported
///   once. Presses the guest has not read yet are merged into one.
/// - Writes are ignored. Accesses that are not one byte at offset 0 are ignored, and such
///   reads return `0xFF` without clearing anything. No guest access panics.
///
/// The DSDT describes it with vmkit-boot's `AcpiConfig::ged`, at the address and GSI the
/// VMM registers it with (vmkit-memory's `layout::GED_ADDR` and `layout::GED_GSI`).
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use vmkit_bus::{mmio_range, IoBus};
/// use vmkit_irq::CountingLine;
/// use vmkit_legacy::{Ged, GED_EVENT_POWER_BUTTON, GED_REGISTER_SIZE};
///
/// const GED_ADDR: u64 = 0xFEA0_0000; // vmkit_memory::layout::GED_ADDR
/// let irq = Arc::new(CountingLine::new()); // machine.line(GED_GSI) in a VMM
/// let ged = Arc::new(Mutex::new(Ged::new(irq.clone())));
/// let bus = IoBus::new();
/// bus.register_mmio(mmio_range(GED_ADDR, GED_REGISTER_SIZE)?, ged.clone())?;
///
/// // The VMM is asked to stop the VM gracefully (SIGTERM, an API call):
/// ged.lock().unwrap().power_button()?;
/// assert_eq!(irq.count(), 1);
///
/// // The guest's _EVT reads the register: the event once, then nothing.
/// let mut events = [0];
/// assert!(bus.mmio_read(GED_ADDR, &mut events).is_handled());
/// assert_eq!(events[0], GED_EVENT_POWER_BUTTON);
/// assert!(bus.mmio_read(GED_ADDR, &mut events).is_handled());
/// assert_eq!(events[0], 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Ged {
    interrupt: Arc<dyn InterruptLine>,
    /// Events raised and not yet read by the guest.
    pending: u8,
}

impl Ged {
    /// A GED with no pending event, raising `interrupt` (the line of the GSI its DSDT entry
    /// names).
    pub fn new(interrupt: Arc<dyn InterruptLine>) -> Self {
        Self {
            interrupt,
            pending: 0,
        }
    }

    /// Presses the power button: sets [`GED_EVENT_POWER_BUTTON`] and raises the interrupt.
    ///
    /// A Linux guest with the ACPI button driver (`CONFIG_ACPI_BUTTON`) turns it into a
    /// `KEY_POWER` input event, which systemd-logind (or acpid) answers by shutting down;
    /// the guest then powers off through the ACPI sleep registers ([`AcpiSleep`]). A guest
    /// with no such listener ignores it: a VMM should keep a deadline.
    ///
    /// [`AcpiSleep`]: crate::AcpiSleep
    ///
    /// # Errors
    ///
    /// [`Error::Interrupt`] if raising the interrupt failed: the event stays pending, and
    /// the guest sees it on the GED's next interrupt.
    pub fn power_button(&mut self) -> Result<()> {
        self.pending |= GED_EVENT_POWER_BUTTON;
        self.interrupt.trigger().map_err(Error::Interrupt)
    }

    /// The events raised and not yet read by the guest (a [`GED_EVENT_POWER_BUTTON`] bit).
    pub fn pending(&self) -> u8 {
        self.pending
    }
}

/// The state of a [`Ged`] for a snapshot: the events the guest has not read.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GedState {
    /// Pending event bits ([`GED_EVENT_POWER_BUTTON`]).
    pub pending: u8,
}

impl Ged {
    /// The device's state for a snapshot.
    pub fn state(&self) -> GedState {
        GedState {
            pending: self.pending,
        }
    }

    /// Restores `state` into a freshly built device before the guest runs; raises the
    /// interrupt again if an event is pending (a spurious one only makes the guest read 0).
    ///
    /// # Errors
    ///
    /// [`Error::State`] (nothing restored) for event bits this device does not have;
    /// [`Error::Interrupt`] if the interrupt cannot be raised (the state is restored).
    pub fn restore(&mut self, state: &GedState) -> Result<()> {
        let unknown = state.pending & !GED_EVENT_POWER_BUTTON;
        if unknown != 0 {
            return Err(Error::State(format!(
                "ged: unknown event bits {unknown:#04x}"
            )));
        }
        self.pending = state.pending;
        if self.pending != 0 {
            self.interrupt.trigger().map_err(Error::Interrupt)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Ged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ged")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl MutDeviceMmio for Ged {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        match (data, offset) {
            ([b], 0) => *b = std::mem::take(&mut self.pending),
            (data, _) => data.fill(0xFF),
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, _offset: MmioAddressOffset, _data: &[u8]) {
        // The register is read-only: reading it is what acknowledges the events.
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use vmkit_bus::{mmio_range, IoBus};
    use vmkit_irq::CountingLine;

    use super::*;

    const BASE: MmioAddress = MmioAddress(0xFEA0_0000);

    fn fixture() -> (Ged, Arc<CountingLine>) {
        let irq = Arc::new(CountingLine::new());
        (Ged::new(irq.clone()), irq)
    }

    fn read(ged: &mut Ged) -> u8 {
        let mut b = [0xAA];
        ged.mmio_read(BASE, 0, &mut b);
        b[0]
    }

    #[test]
    fn press_raises_once_and_read_returns_then_clears() {
        let (mut ged, irq) = fixture();
        assert_eq!(read(&mut ged), 0, "nothing pending at first");
        assert_eq!(irq.count(), 0);
        ged.power_button().unwrap();
        assert_eq!(irq.count(), 1);
        assert_eq!(ged.pending(), GED_EVENT_POWER_BUTTON);
        assert_eq!(read(&mut ged), GED_EVENT_POWER_BUTTON);
        assert_eq!(read(&mut ged), 0, "a read acknowledges the event");
        assert_eq!(ged.pending(), 0);
        assert_eq!(irq.count(), 1, "reads raise nothing");
    }

    #[test]
    fn a_pending_press_survives_a_restore_and_raises_again() {
        let (mut ged, _) = fixture();
        ged.power_button().unwrap();
        let state = ged.state();
        let (mut fresh, irq) = fixture();
        fresh.restore(&state).unwrap();
        assert_eq!(irq.count(), 1);
        assert_eq!(read(&mut fresh), GED_EVENT_POWER_BUTTON);
        // Nothing pending: nothing raised.
        let (mut idle, irq) = fixture();
        idle.restore(&GedState { pending: 0 }).unwrap();
        assert_eq!(irq.count(), 0);
        let err = idle.restore(&GedState { pending: 0x82 }).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid device state: ged: unknown event bits 0x82"
        );
        assert_eq!(idle.pending(), 0);
    }

    #[test]
    fn unread_presses_merge_but_each_raises() {
        let (mut ged, irq) = fixture();
        ged.power_button().unwrap();
        ged.power_button().unwrap();
        assert_eq!(irq.count(), 2);
        assert_eq!(read(&mut ged), GED_EVENT_POWER_BUTTON);
        assert_eq!(read(&mut ged), 0);
        ged.power_button().unwrap();
        assert_eq!(irq.count(), 3);
        assert_eq!(read(&mut ged), GED_EVENT_POWER_BUTTON);
    }

    #[test]
    fn interrupt_failure_is_reported_and_the_event_stays_pending() {
        struct Broken;
        impl InterruptLine for Broken {
            fn trigger(&self) -> io::Result<()> {
                Err(io::Error::other("broken"))
            }
        }
        let mut ged = Ged::new(Arc::new(Broken));
        assert!(matches!(ged.power_button(), Err(Error::Interrupt(_))));
        assert_eq!(read(&mut ged), GED_EVENT_POWER_BUTTON);
    }

    #[test]
    fn odd_widths_and_offsets_are_ignored() {
        let (mut ged, irq) = fixture();
        ged.power_button().unwrap();
        for len in [0, 2, 3, 4, 8, 16] {
            let mut buf = vec![0u8; len];
            ged.mmio_read(BASE, 0, &mut buf);
            assert!(buf.iter().all(|&b| b == 0xFF), "{len}-byte read: {buf:?}");
        }
        for offset in [1, 2, 3, 4, 0xFFF, 0x1000, u64::MAX] {
            let mut b = [0];
            ged.mmio_read(BASE, offset, &mut b);
            assert_eq!(b, [0xFF], "offset {offset:#x}");
            let mut w = [0; 4];
            ged.mmio_read(BASE, offset, &mut w);
            assert_eq!(w, [0xFF; 4], "offset {offset:#x}");
        }
        for (offset, data) in [
            (0, &[0u8][..]),
            (0, &[0xFF][..]),
            (0, &[0, 0, 0, 0][..]),
            (0, &[][..]),
            (1, &[0][..]),
            (u64::MAX, &[0; 8][..]),
        ] {
            ged.mmio_write(BASE, offset, data);
        }
        assert_eq!(ged.pending(), GED_EVENT_POWER_BUTTON, "nothing cleared it");
        assert_eq!(irq.count(), 1);
        assert_eq!(read(&mut ged), GED_EVENT_POWER_BUTTON);
    }

    /// Hostile guests: random accesses of any size at any offset never panic, and only a
    /// one-byte read at offset 0 acknowledges an event.
    #[test]
    fn random_accesses_never_panic() {
        let (mut ged, irq) = fixture();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..100_000 {
            let r = next();
            let offset = match (r >> 4) % 4 {
                0 => 0,
                1 => (r >> 8) % 8,
                2 => (r >> 8) % 0x2000,
                _ => r >> 8,
            };
            let len = [0, 1, 1, 2, 4, 8, 1, 3][(r >> 32) as usize % 8];
            let mut buf = vec![(r >> 40) as u8; len];
            match r % 4 {
                0 => {
                    let before = ged.pending();
                    ged.mmio_read(BASE, offset, &mut buf);
                    if offset == 0 && len == 1 {
                        assert_eq!(buf[0], before);
                        assert_eq!(ged.pending(), 0);
                    } else {
                        assert!(buf.iter().all(|&b| b == 0xFF));
                        assert_eq!(ged.pending(), before);
                    }
                }
                1 => ged.power_button().unwrap(),
                _ => {
                    let before = ged.pending();
                    ged.mmio_write(BASE, offset, &buf);
                    assert_eq!(ged.pending(), before);
                }
            }
            assert_eq!(ged.pending() & !GED_EVENT_POWER_BUTTON, 0);
        }
        // Whatever the guest did, a press still gets through.
        let raised = irq.count();
        read(&mut ged);
        ged.power_button().unwrap();
        assert_eq!(irq.count(), raised + 1);
        assert_eq!(read(&mut ged), GED_EVENT_POWER_BUTTON);
    }

    #[test]
    fn on_the_mmio_bus() {
        let irq = Arc::new(CountingLine::new());
        let ged = Arc::new(std::sync::Mutex::new(Ged::new(irq.clone())));
        let bus = IoBus::new();
        bus.register_mmio(mmio_range(BASE.0, GED_REGISTER_SIZE).unwrap(), ged.clone())
            .unwrap();
        ged.lock().unwrap().power_button().unwrap();
        // A wider access than the register is not the device's: the bus reads all ones.
        let mut w = [0; 4];
        assert!(!bus.mmio_read(BASE.0, &mut w).is_handled());
        assert_eq!(w, [0xFF; 4]);
        assert!(!bus.mmio_read(BASE.0 + 1, &mut [0]).is_handled());
        let mut b = [0];
        assert!(bus.mmio_read(BASE.0, &mut b).is_handled());
        assert_eq!(b, [GED_EVENT_POWER_BUTTON]);
        assert!(bus.mmio_read(BASE.0, &mut b).is_handled());
        assert_eq!(b, [0]);
        assert_eq!(irq.count(), 1);
    }
}
