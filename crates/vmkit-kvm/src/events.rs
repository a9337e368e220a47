//! The VMM's event loop and the VM's end.

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmkit_legacy::{EventFdExit, ExitNotifier, ExitReason};
use vmm_sys_util::epoll::EventSet;

/// An event-manager subscriber that wakes the VMM's loop when the VM ends (the
/// [`EventFdExit`]'s eventfd fires); the loop then reads the reason and stops the vCPUs.
#[derive(Debug)]
pub struct ExitWatcher {
    exit: Arc<EventFdExit>,
}

impl ExitWatcher {
    /// A watcher of `exit`.
    pub fn new(exit: Arc<EventFdExit>) -> Self {
        Self { exit }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.eventfd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.eventfd(), EventSet::IN)) {
            self.exit.notify_exit(ExitReason::Failed(format!(
                "cannot watch the exit event: {e}"
            )));
        }
    }
}
