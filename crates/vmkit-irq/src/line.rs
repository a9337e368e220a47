//! Interrupt lines as device crates see them: one trait, no KVM.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// An interrupt line a device can raise.
///
/// This is all a device model needs to know about interrupts. The VMM hands out
/// implementations backed by KVM irqfds ([`EventFdLine`] registered with
/// `Irqchip::register_irqfd` under the `kvm` feature); tests use [`CountingLine`].
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt (an edge; for a level-triggered line, an assertion the interrupt
    /// controller de-asserts on EOI when the line is a resampling irqfd).
    fn trigger(&self) -> io::Result<()>;
}

impl<T: InterruptLine + ?Sized> InterruptLine for Arc<T> {
    fn trigger(&self) -> io::Result<()> {
        (**self).trigger()
    }
}

impl<T: InterruptLine + ?Sized> InterruptLine for Box<T> {
    fn trigger(&self) -> io::Result<()> {
        (**self).trigger()
    }
}

/// An interrupt line that signals an eventfd.
///
/// Registered with KVM as an irqfd, a write to the eventfd injects the interrupt inside the
/// kernel, with no exit to the VMM. The line owns the eventfd; [`EventFdLine::eventfd`] lends
/// it out for registration.
#[derive(Debug)]
pub struct EventFdLine {
    fd: EventFd,
}

impl EventFdLine {
    /// Creates a line with a fresh non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            fd: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
        })
    }

    /// Wraps an existing eventfd.
    pub fn from_eventfd(fd: EventFd) -> Self {
        Self { fd }
    }

    /// The eventfd behind the line, to register as an irqfd or to poll in a test.
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }
}

impl InterruptLine for EventFdLine {
    fn trigger(&self) -> io::Result<()> {
        self.fd.write(1)
    }
}

/// A line that counts its triggers: for tests of device models.
#[derive(Debug, Default)]
pub struct CountingLine {
    count: AtomicU64,
}

impl CountingLine {
    /// A line that has not fired yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times the line was triggered.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

impl InterruptLine for CountingLine {
    fn trigger(&self) -> io::Result<()> {
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_line_counts_in_the_eventfd() {
        let line = EventFdLine::new().unwrap();
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(line.eventfd().read().unwrap(), 2);
        // Non-blocking: nothing pending now.
        assert!(line.eventfd().read().is_err());
    }

    #[test]
    fn counting_line_through_arc_and_box() {
        let line = Arc::new(CountingLine::new());
        let boxed: Box<dyn InterruptLine> = Box::new(line.clone());
        boxed.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(line.count(), 2);
    }
}
