//! What device crates' tests need (feature `test-utils`): guest memory, a recording
//! interrupt, an activation context over virtio-queue's mock rings, and [`Harness`], which
//! runs virtio-drivers' driver code against a device on our [`MmioTransport`].
//!
//! [`MmioTransport`]: crate::MmioTransport

mod hal;
mod harness;
#[cfg(feature = "pci")]
mod pci;

use std::io;
use std::sync::{Arc, Mutex};

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{ActivateContext, InterruptReason, NeedsReset, VirtioInterrupt};

pub use hal::GuestHal;
pub use harness::{Harness, HarnessTransport, HARNESS_DMA_BASE, HARNESS_MMIO_BASE};
#[cfg(feature = "pci")]
pub use pci::{
    CamKind, HarnessCam, PciHarness, PciHarnessTransport, HARNESS_ECAM_BASE, HARNESS_PCI_SLOT,
    HARNESS_PCI_WINDOW,
};

/// Guest memory of `size` bytes at guest address 0, one anonymous mapping.
///
/// # Panics
///
/// If the mapping fails (tests only).
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("failed to map guest memory")
}

/// Waits at most `timeout` for `fd` to become readable (a device's timerfd, an eventfd);
/// whether it did.
pub fn wait_readable(fd: &impl std::os::fd::AsRawFd, timeout: std::time::Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `p` is one valid pollfd that outlives the call; poll writes only its revents.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

/// An interrupt that records what it is asked to raise.
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    reasons: Mutex<Vec<InterruptReason>>,
}

impl RecordingInterrupt {
    /// An interrupt that has not fired.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Every reason it was triggered for, in order.
    pub fn reasons(&self) -> Vec<InterruptReason> {
        self.reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many times it was triggered.
    pub fn count(&self) -> usize {
        self.reasons.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, reason: InterruptReason) -> io::Result<()> {
        self.reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(reason);
        Ok(())
    }
}

/// A queue over virtio-queue's mock rings, with the used ring moved to where it belongs.
///
/// virtio-queue 0.18's `MockSplitQueue` places the used ring at the available ring's
/// start plus its element count (not its size in bytes), overlapping `used_event` and
/// the last available entries; this moves it just after the available ring (read it at
/// `queue.used_ring()`, not through the mock's `used()`).
///
/// # Panics
///
/// If the mock's parameters do not make a valid queue (tests only).
pub fn mock_queue(vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> Queue {
    let mut queue: Queue = vq.create_queue().expect("mock queue");
    let avail_end = vq.avail_addr().0 + 6 + 2 * u64::from(queue.size());
    queue
        .try_set_used_ring_address(GuestAddress((avail_end + 3) & !3))
        .expect("used ring alignment");
    queue
}

/// An activation context for a device unit test: `queues` as `(index, queue)` pairs (make
/// them with [`mock_queue`]), fresh notifiers, the
/// given features and interrupt. Returns the context and its `DEVICE_NEEDS_RESET` flag.
///
/// # Panics
///
/// If an eventfd cannot be created (tests only).
pub fn activate_context(
    memory: &GuestMemoryMmap,
    features: u64,
    queues: Vec<(u16, Queue)>,
    interrupt: Arc<dyn VirtioInterrupt>,
) -> (ActivateContext, NeedsReset) {
    let needs_reset = NeedsReset::new();
    let queues = queues
        .into_iter()
        .map(|(index, queue)| (index, queue, EventFd::new(EFD_NONBLOCK).expect("eventfd")))
        .collect();
    (
        ActivateContext::new(
            memory.clone(),
            features,
            queues,
            interrupt,
            needs_reset.clone(),
        ),
        needs_reset,
    )
}
