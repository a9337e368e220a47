//! The error type of this crate.

/// Errors of building a PCI bus and its devices. Guest accesses never fail: what a guest
/// cannot do is ignored (reads return all ones), and refused BAR moves are reported to the
/// [`BarObserver`](crate::BarObserver).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// All 31 device slots of bus 0 (slot 0 is the host bridge) are taken.
    #[error("no free device slot on PCI bus 0")]
    BusFull,
    /// The requested device slot is taken or outside 1..=31.
    #[error("PCI device slot {0} is taken or out of range (1..=31)")]
    SlotUnavailable(u8),
    /// A BAR index outside 0..=5 (or 0..=4 for a 64-bit BAR, which takes two registers).
    #[error("BAR {0} is out of range or already defined")]
    InvalidBarIndex(usize),
    /// A BAR size that is not a power of two, or below the minimum (16 bytes for memory, 4 for
    /// I/O), or above what the BAR type can address.
    #[error("BAR size {0:#x} is not a power of two of a valid size for its type")]
    InvalidBarSize(u64),
    /// A BAR address not aligned to the BAR's size, or beyond what its type can address.
    #[error("BAR address {0:#x} is not aligned to the BAR size or out of reach of its type")]
    InvalidBarAddress(u64),
    /// The capability list has no room left for a capability of this size.
    #[error("no room for a {0}-byte capability in configuration space")]
    NoCapabilitySpace(usize),
    /// An MSI-X table needs 1 to 2048 vectors.
    #[error("an MSI-X table has 1 to 2048 vectors, not {0}")]
    InvalidVectorCount(usize),
    /// The IoBus the PCI bus decodes on is gone.
    #[error("the VM's IoBus no longer exists")]
    NoIoBus,
    /// Registering on the IoBus failed (an overlap with another device, say).
    #[error("{0}")]
    Bus(#[from] vmkit_bus::Error),
    /// A saved configuration space or MSI-X state does not fit the function it is restored
    /// into, or holds a value out of range.
    #[error("PCI state restore: {0}")]
    InvalidState(String),
    /// The ECAM or BAR window is empty, misaligned or wraps around.
    #[error("invalid window {base:#x}+{size:#x}")]
    InvalidWindow {
        /// Where it starts.
        base: u64,
        /// Its size.
        size: u64,
    },
}

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
