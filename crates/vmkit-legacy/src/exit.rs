//! How devices tell the VMM the guest wants to power off or reset.

use std::sync::atomic::{AtomicU8, Ordering};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, Result};

/// Why the guest asked to leave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// ACPI S5 (soft off).
    PowerOff,
    /// A platform reset (i8042 pulse of the reset line, ACPI reset register).
    Reset,
}

/// Receives the guest's power-off and reset requests.
///
/// Called on the vCPU thread that made the request, while the device's lock is held: it
/// must be quick and must not touch the device or the bus, nor wait for vCPUs. Record
/// the reason and wake the VMM's event loop (what [`EventFdExit`] does), and let the loop
/// stop the vCPUs. The guest keeps running until then (Linux typically tries the next
/// reboot method), so a notifier may be called several times.
///
/// Implemented for closures `Fn(ExitReason) + Send + Sync`.
pub trait ExitNotifier: Send + Sync {
    /// The guest asked for `reason`.
    fn notify_exit(&self, reason: ExitReason);
}

impl<F: Fn(ExitReason) + Send + Sync> ExitNotifier for F {
    fn notify_exit(&self, reason: ExitReason) {
        self(reason)
    }
}

const NO_REASON: u8 = 0;

fn encode(reason: ExitReason) -> u8 {
    match reason {
        ExitReason::PowerOff => 1,
        ExitReason::Reset => 2,
    }
}

fn decode(v: u8) -> Option<ExitReason> {
    match v {
        1 => Some(ExitReason::PowerOff),
        2 => Some(ExitReason::Reset),
        _ => None,
    }
}

/// An [`ExitNotifier`] that records the first reason and signals an eventfd.
///
/// Poll [`eventfd`](Self::eventfd) in the VMM's event loop; when it fires, read
/// [`reason`](Self::reason) and stop the vCPUs.
#[derive(Debug)]
pub struct EventFdExit {
    fd: EventFd,
    reason: AtomicU8,
}

impl EventFdExit {
    /// A notifier with a fresh non-blocking eventfd and no reason recorded.
    ///
    /// # Errors
    ///
    /// [`Error::EventFd`] if the eventfd cannot be created.
    pub fn new() -> Result<Self> {
        Ok(Self {
            fd: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
            reason: AtomicU8::new(NO_REASON),
        })
    }

    /// The eventfd written on every notification.
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }

    /// The first reason notified since creation or the last [`take_reason`](Self::take_reason).
    pub fn reason(&self) -> Option<ExitReason> {
        decode(self.reason.load(Ordering::Acquire))
    }

    /// Returns the recorded reason and clears it (for a VMM that resets the VM and runs on).
    pub fn take_reason(&self) -> Option<ExitReason> {
        decode(self.reason.swap(NO_REASON, Ordering::AcqRel))
    }
}

impl ExitNotifier for EventFdExit {
    fn notify_exit(&self, reason: ExitReason) {
        // The first request wins: it is the one the VMM acts on.
        let _ = self.reason.compare_exchange(
            NO_REASON,
            encode(reason),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        // Fails only when the counter would overflow, i.e. the VMM already has a wakeup
        // pending: nothing is lost.
        let _ = self.fd.write(1);
    }
}

/// vm-superio's [`Trigger`] that notifies an [`ExitNotifier`] of a fixed reason: how the
/// i8042's reset line reaches the VMM.
pub struct ExitTrigger {
    notifier: std::sync::Arc<dyn ExitNotifier>,
    reason: ExitReason,
}

impl ExitTrigger {
    /// A trigger that calls `notifier` with `reason`.
    pub fn new(notifier: std::sync::Arc<dyn ExitNotifier>, reason: ExitReason) -> Self {
        Self { notifier, reason }
    }
}

impl std::fmt::Debug for ExitTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitTrigger")
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

impl Trigger for ExitTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> std::result::Result<(), Self::E> {
        self.notifier.notify_exit(self.reason);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn eventfd_exit_records_first_reason_and_wakes() {
        let exit = EventFdExit::new().unwrap();
        assert_eq!(exit.reason(), None);
        exit.notify_exit(ExitReason::Reset);
        exit.notify_exit(ExitReason::PowerOff);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
        assert_eq!(exit.eventfd().read().unwrap(), 2);
        assert_eq!(exit.take_reason(), Some(ExitReason::Reset));
        assert_eq!(exit.reason(), None);
        exit.notify_exit(ExitReason::PowerOff);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn closures_are_notifiers_and_trigger_adapts() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let notifier: Arc<dyn ExitNotifier> = Arc::new(move |r| s.lock().unwrap().push(r));
        let trigger = ExitTrigger::new(notifier, ExitReason::Reset);
        trigger.trigger().unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![ExitReason::Reset]);
    }
}
