//! The bounded host-input buffer shared between a [`Console`](crate::Console) and the
//! VMM's input source.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use vmkit_virtio::{Counter, DeviceMetrics};
use vmm_sys_util::eventfd::EventFd;

/// The buffer and the way to wake the device.
pub(crate) struct InputState {
    pub(crate) data: VecDeque<u8>,
    pub(crate) capacity: usize,
    /// Bytes refused because the buffer was full.
    pub(crate) refused: u64,
    /// A clone of the receiveq notifier while the device is active: writing it makes the
    /// transport's `QueueEventHandler` run the device's receiveq processing.
    pub(crate) kick: Option<EventFd>,
    /// The console's metrics: refused bytes count as `Dropped`.
    pub(crate) metrics: Arc<dyn DeviceMetrics>,
}

impl InputState {
    /// Appends what fits of `bytes`; returns how many were taken.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> usize {
        let room = self.capacity.saturating_sub(self.data.len());
        let n = room.min(bytes.len());
        self.data.extend(&bytes[..n]);
        // `bytes.len() - n` fits in u64 on every supported target.
        let refused = (bytes.len() - n) as u64;
        if refused > 0 {
            self.refused += refused;
            self.metrics.add(Counter::Dropped, refused);
        }
        n
    }
}

pub(crate) type SharedInput = Arc<Mutex<InputState>>;

pub(crate) fn lock(input: &Mutex<InputState>) -> MutexGuard<'_, InputState> {
    input.lock().unwrap_or_else(|e| e.into_inner())
}

/// A handle on a console's host-input buffer, usable from any thread.
///
/// Get one from [`Console::input`](crate::Console::input). [`push`](Self::push) appends
/// what fits in the bounded buffer and, when the device is active, signals the receiveq's
/// notifier eventfd, so the transport's `QueueEventHandler` (already on the VMM's event
/// loop) runs the device, which moves the bytes into the receive buffers the guest posted.
/// No extra file descriptor needs to be registered.
#[derive(Clone)]
pub struct ConsoleInput {
    shared: SharedInput,
}

impl fmt::Debug for ConsoleInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = lock(&self.shared);
        f.debug_struct("ConsoleInput")
            .field("pending", &s.data.len())
            .field("capacity", &s.capacity)
            .finish_non_exhaustive()
    }
}

impl ConsoleInput {
    pub(crate) fn new(shared: SharedInput) -> Self {
        Self { shared }
    }

    /// Appends as much of `bytes` as fits in the buffer; returns how many bytes were taken
    /// (the rest is refused: drop it, as a UART overrun does, or offer it again later).
    ///
    /// If anything was taken and the device is active, wakes the device through its
    /// receiveq notifier.
    pub fn push(&self, bytes: &[u8]) -> usize {
        let mut s = lock(&self.shared);
        let n = s.push(bytes);
        if n > 0 {
            if let Some(kick) = &s.kick {
                if let Err(e) = kick.write(1) {
                    log::warn!("virtio-console: cannot signal the receiveq notifier: {e}");
                }
            }
        }
        n
    }

    /// Bytes buffered and not yet delivered to the guest.
    pub fn pending(&self) -> usize {
        lock(&self.shared).data.len()
    }

    /// Room left in the buffer, in bytes.
    pub fn free(&self) -> usize {
        let s = lock(&self.shared);
        s.capacity.saturating_sub(s.data.len())
    }
}
