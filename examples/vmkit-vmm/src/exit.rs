//! How the VM ends: the one place every exit path (devices, vCPUs, errors) reports to.

use std::sync::Mutex;

use vmkit_legacy::{ExitNotifier, ExitReason};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest powered off (ACPI S5, or a KVM power-off event).
    PowerOff,
    /// The guest reset the machine (i8042, ACPI reset register, triple fault).
    Reset,
    /// A vCPU failed; the message says how.
    Failed(String),
}

/// Collects the first reason the VM ends and wakes the event loop.
#[derive(Debug)]
pub struct VmExit {
    evt: EventFd,
    end: Mutex<Option<VmEnd>>,
}

impl VmExit {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            end: Mutex::new(None),
        })
    }

    /// Records `end` unless an earlier reason is already recorded, and wakes the event loop.
    pub fn end(&self, end: VmEnd) {
        let mut slot = self.end.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(end);
        }
        // A full eventfd counter still wakes the loop; nothing else can fail here.
        let _ = self.evt.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<VmEnd> {
        self.end.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl ExitNotifier for VmExit {
    fn notify_exit(&self, reason: ExitReason) {
        self.end(match reason {
            ExitReason::PowerOff => VmEnd::PowerOff,
            ExitReason::Reset => VmEnd::Reset,
        });
    }
}
