//! What can go wrong before the guest runs. Each variant is one line for the user.

/// An error of the reference VMM, from the command line to the guest's first instruction.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file named on the command line cannot be opened.
    #[error("cannot open {what} {path}: {source}")]
    Open {
        /// What it is for ("kernel", "serial output file"...).
        what: &'static str,
        /// Its path.
        path: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// The descriptors vmkit inherited could not be made close-on-exec.
    #[error("cannot make the inherited file descriptors close-on-exec: {0}")]
    Descriptors(#[source] std::io::Error),
    /// `--landlock` cannot be enforced (no Landlock in the kernel, a path that cannot be
    /// opened); the message names the flag.
    #[error("{0}")]
    Landlock(String),
    /// `--memory` asks for more than the host has.
    #[error("--memory {asked} bytes is more than this host's {host} bytes of RAM")]
    MemoryAboveHost {
        /// Bytes asked for.
        asked: u64,
        /// The host's RAM.
        host: u64,
    },
    /// The sandbox (seccomp filters, `--user`) could not be set up.
    #[error("sandbox: {0}")]
    Sandbox(String),
    /// The KVM platform (VM, memory, vCPUs, device attachment) failed.
    #[error("{0}")]
    Platform(#[from] vmkit_kvm::Error),
    /// A legacy device could not be put on the bus.
    #[error("{0}")]
    Bus(#[from] vmkit_bus::Error),
    /// Loading the kernel or writing the firmware tables failed.
    #[error("{0}")]
    Boot(#[from] vmkit_boot::Error),
    /// The kernel command line refused an entry.
    #[error("kernel command line: {0}")]
    Cmdline(#[from] vmkit_boot::linux_loader::cmdline::Error),
    /// A `--disk` cannot be used.
    #[error("--disk {path}: {source}")]
    Disk {
        /// The image, as given.
        path: String,
        /// What vmkit-virtio-blk said.
        source: vmkit_virtio_blk::Error,
    },
    /// A `--net` cannot be used.
    #[error("--net {what}: {source}")]
    Net {
        /// The backend, as given (`tap=NAME` or `fd=N`).
        what: String,
        /// What vmkit-virtio-net said.
        source: vmkit_virtio_net::Error,
    },
    /// A `--net fd=N` is not an open file descriptor of this process.
    #[error("--net fd={0}: not an open file descriptor")]
    NetFd(i32),
    /// Two `--net fd=` name the same descriptor.
    #[error("--net fd={0} is given twice")]
    NetFdTwice(i32),
    /// The `--vsock` device could not be built (its socket path, mostly).
    #[error("--vsock: {0}")]
    Vsock(#[from] vmkit_virtio_vsock::Error),
    /// The virtio-rng could not be built.
    #[error("virtio-rng: {0}")]
    Rng(#[from] vmkit_virtio_rng::Error),
    /// The virtio-console's host end could not be set up.
    #[error("virtio-console: {0}")]
    Console(#[source] std::io::Error),
    /// The virtio-console could not be built.
    #[error("virtio-console: {0}")]
    ConsoleConfig(#[from] vmkit_virtio_console::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// Neither `--kernel`, `--config-file` nor `--api-sock` says what to boot.
    #[error("nothing to boot: give --kernel, --config-file or --api-sock")]
    NoKernel,
    /// The API socket could not be served.
    #[error("{0}")]
    Api(#[from] vmkit_api::Error),
    /// `--config-file` cannot be used.
    #[error("--config-file {path}: {message}")]
    ConfigFile {
        /// The file.
        path: String,
        /// What is wrong, one line.
        message: String,
    },
    /// `--metrics-file` cannot be used.
    #[error("--metrics-file: {0}")]
    Metrics(String),
    /// `--log-file` cannot be opened.
    #[error("--log-file: {0}")]
    Log(#[source] std::io::Error),
    /// The shutdown signals cannot be caught.
    #[error("cannot set up the shutdown signals: {0}")]
    Signals(#[source] std::io::Error),
    /// A snapshot cannot be restored (unreadable, corrupt, from another CPU, its devices
    /// refused their state).
    #[error("cannot restore the snapshot: {0}")]
    Restore(String),
    /// The event loop could not be set up or run.
    #[error("event loop: {0}")]
    EventLoop(#[from] event_manager::Error),
}

/// A `Result` with this VMM's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
