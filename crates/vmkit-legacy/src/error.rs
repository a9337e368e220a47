//! The error type of this crate.

use std::io;

/// Errors of this crate's constructors and of the host's requests to a device.
///
/// Guest accesses never fail: the bus traits have no error path, so device models ignore
/// what they cannot handle (and count what the VMM may want to know, see
/// [`SerialStats`](crate::SerialStats)).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating an eventfd failed.
    #[error("failed to create an eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// The i8042's keyboard buffer has no room for the bytes (the guest has not read the
    /// ones sent before); nothing was queued.
    #[error("the keyboard buffer is full: {needed} bytes to send, room for {free}")]
    KbdBufferFull {
        /// Bytes to send.
        needed: usize,
        /// Free room in the buffer.
        free: usize,
    },
    /// Raising a device's interrupt failed (what was sent is queued all the same).
    #[error("failed to raise the interrupt: {0}")]
    Interrupt(#[source] io::Error),
    /// A saved device state (a snapshot's) that is out of range; nothing was restored.
    #[error("invalid device state: {0}")]
    State(String),
}

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
