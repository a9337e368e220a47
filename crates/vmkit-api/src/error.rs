//! Errors of the API crate.

/// What can fail when serving the API or reading a config file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API socket cannot be created.
    #[error("cannot create the API socket {path}: {source}")]
    Bind {
        /// The socket's path.
        path: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// A system call of the server failed (epoll, eventfd, thread).
    #[error("API server: {0}")]
    Io(#[source] std::io::Error),
    /// The server thread's prologue ([`ApiServer::spawn_with`](crate::ApiServer::spawn_with))
    /// failed: nothing is served.
    #[error("API server: {0}")]
    Prologue(String),
    /// A config file is not valid JSON of Firecracker's layout.
    #[error("config file: {0}")]
    Config(String),
}

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
