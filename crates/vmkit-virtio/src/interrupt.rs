//! How a device tells the driver about used buffers and configuration changes.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmkit_irq::InterruptLine;

/// Why a device interrupts the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InterruptReason {
    /// The device put buffers in the used ring of this queue.
    Queue(u16),
    /// The device configuration space changed (or the device needs a reset).
    Config,
}

/// The device's side of interrupts, independent of the transport.
///
/// virtio-mmio sets a bit of its InterruptStatus register and raises its one line
/// ([`MmioInterrupt`]); virtio-pci with MSI-X maps each reason to a vector.
pub trait VirtioInterrupt: Send + Sync {
    /// Interrupts the driver for `reason`.
    fn trigger(&self, reason: InterruptReason) -> io::Result<()>;
}

impl<T: VirtioInterrupt + ?Sized> VirtioInterrupt for Arc<T> {
    fn trigger(&self, reason: InterruptReason) -> io::Result<()> {
        (**self).trigger(reason)
    }
}

/// InterruptStatus bit 0: the device used a buffer.
pub const INTERRUPT_STATUS_USED_RING: u32 = 1;
/// InterruptStatus bit 1: the configuration changed.
pub const INTERRUPT_STATUS_CONFIG: u32 = 2;

/// The virtio-mmio interrupt: an InterruptStatus register and one line.
///
/// [`trigger`](VirtioInterrupt::trigger) sets bit 0 (used buffer) or bit 1 (configuration
/// change, which also bumps the configuration generation) and raises the line; the
/// driver reads InterruptStatus and writes the bits it handled to InterruptACK. The
/// [`MmioTransport`](crate::MmioTransport) owns one and hands it to the device at
/// activation.
pub struct MmioInterrupt {
    status: AtomicU32,
    generation: AtomicU32,
    line: Arc<dyn InterruptLine>,
}

impl MmioInterrupt {
    /// An interrupt raising `line` (an irqfd-backed line in a VMM).
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        Self {
            status: AtomicU32::new(0),
            generation: AtomicU32::new(0),
            line,
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the bits set in `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears InterruptStatus (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Sets InterruptStatus and ConfigGeneration (a restored snapshot), without interrupting.
    pub(crate) fn set_registers(&self, status: u32, generation: u32) {
        self.status.store(status, Ordering::SeqCst);
        self.generation.store(generation, Ordering::SeqCst);
    }

    /// Bumps ConfigGeneration without interrupting (the transport does it on reset).
    pub fn bump_config_generation(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl fmt::Debug for MmioInterrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioInterrupt")
            .field("status", &self.status())
            .field("generation", &self.config_generation())
            .finish_non_exhaustive()
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, reason: InterruptReason) -> io::Result<()> {
        let bit = match reason {
            InterruptReason::Queue(_) => INTERRUPT_STATUS_USED_RING,
            InterruptReason::Config => {
                self.bump_config_generation();
                INTERRUPT_STATUS_CONFIG
            }
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.line.trigger()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkit_irq::CountingLine;

    #[test]
    fn status_bits_ack_and_generation() {
        let line = Arc::new(CountingLine::new());
        let irq = MmioInterrupt::new(line.clone());
        irq.trigger(InterruptReason::Queue(3)).unwrap();
        assert_eq!(irq.status(), 1);
        assert_eq!(irq.config_generation(), 0);
        irq.trigger(InterruptReason::Config).unwrap();
        assert_eq!(irq.status(), 3);
        assert_eq!(irq.config_generation(), 1);
        assert_eq!(line.count(), 2);
        irq.ack(1);
        assert_eq!(irq.status(), 2);
        irq.ack(0xFFFF_FFFF);
        assert_eq!(irq.status(), 0);
        irq.trigger(InterruptReason::Queue(0)).unwrap();
        irq.clear();
        assert_eq!(irq.status(), 0);
    }
}
