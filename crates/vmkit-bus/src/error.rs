//! The error type of this crate.

use std::fmt;
use std::ops::RangeInclusive;

/// Which of the two buses an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BusKind {
    /// The x86 port I/O bus (16-bit addresses).
    Pio,
    /// The memory-mapped I/O bus (64-bit guest physical addresses).
    Mmio,
}

impl fmt::Display for BusKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BusKind::Pio => "PIO",
            BusKind::Mmio => "MMIO",
        })
    }
}

/// Errors of bus registration and resource allocation.
///
/// Guest accesses never produce an error: an access no device handles is reported as
/// [`Access::Unmapped`](crate::Access::Unmapped).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The range to register overlaps a range already registered on the same bus.
    #[error("{bus} range {new:#x?} overlaps the registered range {existing:#x?}")]
    Overlap {
        /// The bus.
        bus: BusKind,
        /// The range that was to be registered (inclusive).
        new: RangeInclusive<u64>,
        /// The registered range it overlaps (inclusive).
        existing: RangeInclusive<u64>,
    },
    /// A range is empty or runs past the end of the address space.
    #[error("invalid {bus} range: base {base:#x}, length {len:#x}")]
    InvalidRange {
        /// The bus.
        bus: BusKind,
        /// First address.
        base: u64,
        /// Length in bytes (ports for PIO).
        len: u64,
    },
    /// No free MMIO range of the requested size and alignment is left in the window.
    #[error("MMIO window {window:#x?} exhausted: no free range of {size:#x} bytes aligned to {align:#x}")]
    MmioExhausted {
        /// The allocator's window (inclusive).
        window: RangeInclusive<u64>,
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
    },
    /// The requested MMIO range is not free (an exact-address allocation).
    #[error("MMIO range {0:#x?} is not free")]
    MmioUnavailable(RangeInclusive<u64>),
    /// The range to free is not one the allocator handed out (or it was freed already).
    #[error("MMIO range {0:#x?} is not allocated")]
    MmioNotAllocated(RangeInclusive<u64>),
    /// Every GSI of the allocator's range is in use.
    #[error("GSI range {0:?} exhausted")]
    GsiExhausted(RangeInclusive<u32>),
    /// Any other refusal of the underlying `vm-allocator` (bad alignment or size, freeing a
    /// range or GSI that is not allocated, a window that does not fit in 64 bits).
    #[error("allocator: {0}")]
    Allocator(#[from] vm_allocator::Error),
}

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
