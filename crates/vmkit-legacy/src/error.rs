//! The error type of this crate.

use std::io;

/// Errors of this crate's constructors.
///
/// Guest accesses never fail: the bus traits have no error path, so device models ignore
/// what they cannot handle (and count what the VMM may want to know, see
/// [`SerialStats`](crate::SerialStats)).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating an eventfd failed.
    #[error("failed to create an eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
