//! The error type of this crate.

/// Everything that can go wrong while loading a kernel or writing ACPI tables.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The image is neither a bzImage (no "HdrS" setup header magic) nor an ELF file.
    #[error("not a kernel image: neither a bzImage (no \"HdrS\" setup header) nor an ELF file")]
    NotAKernel,
    /// The image is a kernel this crate cannot boot.
    #[error("unsupported kernel image: {0}")]
    UnsupportedKernel(String),
    /// The kernel (or, for a bzImage, its decompression buffer) does not fit in guest RAM.
    #[error(
        "kernel does not fit in guest memory: it needs [{start:#x}, {end:#x}), which is not \
         inside one RAM region (above {min:#x})"
    )]
    KernelDoesNotFit {
        /// First byte the kernel needs.
        start: u64,
        /// End (exclusive) of what the kernel needs.
        end: u64,
        /// Lowest address a kernel may use.
        min: u64,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error(
        "initrd of {size} bytes does not fit in guest memory: it must lie above the kernel end \
         {kernel_end:#x} and below {limit:#x}"
    )]
    InitrdDoesNotFit {
        /// Size of the initrd in bytes.
        size: u64,
        /// End of the kernel (the initrd must start at or above it).
        kernel_end: u64,
        /// Highest end address allowed for the initrd.
        limit: u64,
    },
    /// The initrd file is empty.
    #[error("initrd file is empty")]
    InitrdEmpty,
    /// The command line, with its NUL terminator, is longer than allowed.
    #[error("kernel command line is {len} bytes with its NUL terminator; at most {max} allowed")]
    CmdlineTooLong {
        /// Length in bytes including the NUL terminator.
        len: usize,
        /// Maximum length including the NUL terminator.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte at offset {0}")]
    CmdlineContainsNul(usize),
    /// The command line was rejected by `linux_loader::cmdline::Cmdline`.
    #[error("invalid kernel command line: {0}")]
    InvalidCmdline(#[source] linux_loader::cmdline::Error),
    /// An I/O error on the kernel or initrd file.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `linux_loader` failed to load the kernel.
    #[error("loading the kernel failed: {0}")]
    Loader(#[source] linux_loader::loader::Error),
    /// `linux_loader` failed to write the boot parameters.
    #[error("writing the boot parameters failed: {0}")]
    Configurator(#[source] linux_loader::configurator::Error),
    /// Access to guest memory failed.
    #[error("guest memory access failed: {context}: {source}")]
    GuestMemory {
        /// What was being written or read.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The guest memory has more RAM regions than the boot protocol's memory map can hold.
    #[error("memory map has {count} entries; the boot protocol allows at most {max}")]
    TooManyMemoryRegions {
        /// Number of memory map entries needed.
        count: usize,
        /// Maximum number of entries.
        max: usize,
    },
    /// The ACPI tables do not fit in their area.
    #[error(
        "ACPI tables need [{start:#x}, {end:#x}), which does not fit below {limit:#x} or is \
         not guest RAM"
    )]
    AcpiTablesDoNotFit {
        /// Start of the tables.
        start: u64,
        /// End (exclusive) of the tables.
        end: u64,
        /// End of the ACPI area.
        limit: u64,
    },
    /// The number of vCPUs cannot be described by xAPIC MADT entries.
    #[error("{0} vCPUs cannot be described in the MADT: 1 to 255 are supported")]
    InvalidCpuCount(u32),
    /// The MP table cannot be built or written.
    #[error("invalid MP table: {0}")]
    InvalidMpTable(String),
    /// A DSDT device description is invalid.
    #[error("invalid DSDT device: {0}")]
    InvalidAcpiDevice(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
