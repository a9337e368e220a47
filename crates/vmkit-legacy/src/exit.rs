//! How a VM ends: the one reason type every exit path reports (devices, vCPUs, the VMM),
//! and the notifier that collects the first one.

use std::sync::Mutex;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::error::{Error, Result};

/// Why the VM ends.
///
/// Devices report the guest's own requests ([`PowerOff`](Self::PowerOff),
/// [`Reset`](Self::Reset)); a VMM maps what its vCPUs report (KVM system events, errors)
/// to the others, once, where it runs them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5, or a KVM power-off event).
    PowerOff,
    /// The guest reset the machine (i8042 pulse of the reset line, ACPI reset register).
    Reset,
    /// The guest crashed: a KVM crash event, a triple fault, or a state KVM cannot run
    /// (an internal error); the message says which.
    Crash(String),
    /// The host stopped the VM (an operator's signal after its grace period, a console
    /// escape); the message says how.
    Stopped(String),
    /// The VM cannot go on: a vCPU or the VMM failed; the message says how.
    Failed(String),
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff => f.write_str("power-off"),
            ExitReason::Reset => f.write_str("reset"),
            ExitReason::Crash(why) => write!(f, "the guest crashed: {why}"),
            ExitReason::Stopped(why) => write!(f, "stopped by the host: {why}"),
            ExitReason::Failed(why) => f.write_str(why),
        }
    }
}

impl ExitReason {
    /// Whether the guest asked for this end itself (power-off or reset), as opposed to a
    /// crash or a failure.
    pub fn is_guest_request(&self) -> bool {
        matches!(self, ExitReason::PowerOff | ExitReason::Reset)
    }
}

/// Receives the reasons a VM ends.
///
/// Devices call it on the vCPU thread that made the request, while the device's lock is
/// held: it must be quick and must not touch the device or the bus, nor wait for vCPUs.
/// Record the reason and wake the VMM's event loop (what [`EventFdExit`] does), and let the
/// loop stop the vCPUs. The guest keeps running until then (Linux typically tries the next
/// reboot method), so a notifier may be called several times.
///
/// Implemented for closures `Fn(ExitReason) + Send + Sync`.
pub trait ExitNotifier: Send + Sync {
    /// The VM should end for `reason`.
    fn notify_exit(&self, reason: ExitReason);
}

impl<F: Fn(ExitReason) + Send + Sync> ExitNotifier for F {
    fn notify_exit(&self, reason: ExitReason) {
        self(reason)
    }
}

/// An [`ExitNotifier`] that records the first reason and signals an eventfd.
///
/// Poll [`eventfd`](Self::eventfd) in the VMM's event loop; when it fires, read
/// [`reason`](Self::reason) and stop the vCPUs.
#[derive(Debug)]
pub struct EventFdExit {
    fd: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl EventFdExit {
    /// A notifier with a fresh non-blocking eventfd and no reason recorded.
    ///
    /// # Errors
    ///
    /// [`Error::EventFd`] if the eventfd cannot be created.
    pub fn new() -> Result<Self> {
        Ok(Self {
            fd: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::EventFd)?,
            reason: Mutex::new(None),
        })
    }

    /// The eventfd written on every notification.
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<ExitReason>> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first reason notified since creation or the last [`take_reason`](Self::take_reason).
    pub fn reason(&self) -> Option<ExitReason> {
        self.slot().clone()
    }

    /// Returns the recorded reason and clears it (for a VMM that resets the VM and runs on).
    pub fn take_reason(&self) -> Option<ExitReason> {
        self.slot().take()
    }
}

impl ExitNotifier for EventFdExit {
    fn notify_exit(&self, reason: ExitReason) {
        // The first reason wins: it is the one the VMM acts on.
        self.slot().get_or_insert(reason);
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
        self.notifier.notify_exit(self.reason.clone());
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
        exit.notify_exit(ExitReason::Failed("vCPU 1: KVM_RUN failed".into()));
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        assert_eq!(exit.take_reason(), Some(ExitReason::PowerOff));
        exit.notify_exit(ExitReason::Failed("vCPU 1: KVM_RUN failed".into()));
        assert_eq!(exit.reason().unwrap().to_string(), "vCPU 1: KVM_RUN failed");
        assert!(!exit.reason().unwrap().is_guest_request());
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
