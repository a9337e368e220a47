//! MMIO address and GSI allocation on vm-allocator.

use std::collections::BTreeMap;
use std::ops::{Range, RangeInclusive};

use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vm_device::bus::{MmioAddress, MmioRange};

use crate::error::{BusKind, Error, Result};

/// Hands out MMIO ranges for devices from a window of guest physical addresses.
///
/// A thin layer over vm-allocator's [`AddressAllocator`] (an interval tree, first fit):
/// it returns vm-device [`MmioRange`]s ready for [`IoBus::register_mmio`](crate::IoBus::register_mmio)
/// and reports exhaustion as [`Error::MmioExhausted`].
///
/// It also keeps its own record of the ranges it handed out, because vm-allocator 0.1.4
/// does not check the state of the node an exact-address request falls in (an
/// `ExactMatch` inside an allocated range succeeds, a second allocation of the same
/// addresses) and accepts freeing a range twice. The record makes
/// [`allocate_at`](Self::allocate_at) refuse allocated addresses and [`free`](Self::free)
/// refuse what is not allocated.
#[derive(Clone, Debug)]
pub struct MmioAllocator {
    inner: AddressAllocator,
    // Handed-out ranges, base -> last.
    allocated: BTreeMap<u64, u64>,
}

impl MmioAllocator {
    /// An allocator over `window` (end exclusive), for example
    /// `0xD000_0000..0xFEC0_0000`, the part of the 32-bit MMIO gap below the IOAPIC.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRange`] if `window` is empty.
    pub fn new(window: Range<u64>) -> Result<Self> {
        let invalid = Error::InvalidRange {
            bus: BusKind::Mmio,
            base: window.start,
            len: window.end.saturating_sub(window.start),
        };
        if window.is_empty() {
            return Err(invalid);
        }
        let inner =
            AddressAllocator::new(window.start, window.end - window.start).map_err(|_| invalid)?;
        Ok(Self {
            inner,
            allocated: BTreeMap::new(),
        })
    }

    /// The window the allocator hands ranges out of (inclusive).
    pub fn window(&self) -> RangeInclusive<u64> {
        self.inner.base()..=self.inner.end()
    }

    /// Allocates the lowest free range of `size` bytes starting at a multiple of `align`.
    ///
    /// # Errors
    ///
    /// [`Error::MmioExhausted`] if no such range is free; [`Error::Allocator`] if `size` is
    /// zero or `align` is not a power of two.
    pub fn allocate(&mut self, size: u64, align: u64) -> Result<MmioRange> {
        match self.inner.allocate(size, align, AllocPolicy::FirstMatch) {
            Ok(r) => Ok(self.record(r)),
            Err(vm_allocator::Error::ResourceNotAvailable) => Err(Error::MmioExhausted {
                window: self.window(),
                size,
                align,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Allocates exactly `base..base + size`, for a device with a fixed address.
    ///
    /// # Errors
    ///
    /// [`Error::MmioUnavailable`] if part of that range is allocated or outside the window.
    pub fn allocate_at(&mut self, base: u64, size: u64) -> Result<MmioRange> {
        let wanted = base..=base.saturating_add(size.saturating_sub(1));
        let taken = size != 0
            && self
                .allocated
                .range(..=*wanted.end())
                .next_back()
                .is_some_and(|(_, &last)| last >= base);
        if taken {
            return Err(Error::MmioUnavailable(wanted));
        }
        match self.inner.allocate(size, 1, AllocPolicy::ExactMatch(base)) {
            Ok(r) => Ok(self.record(r)),
            Err(
                vm_allocator::Error::ResourceNotAvailable
                | vm_allocator::Error::InvalidStateTransition(..),
            ) => Err(Error::MmioUnavailable(wanted)),
            Err(e) => Err(e.into()),
        }
    }

    /// Returns `range`, as [`allocate`](Self::allocate) gave it, to the free pool.
    ///
    /// # Errors
    ///
    /// [`Error::MmioNotAllocated`] if `range` is not exactly a range this allocator handed
    /// out and has not taken back yet.
    pub fn free(&mut self, range: MmioRange) -> Result<()> {
        let (base, last) = (range.base().0, range.last().0);
        if self.allocated.get(&base) != Some(&last) {
            return Err(Error::MmioNotAllocated(base..=last));
        }
        let key = vm_allocator::RangeInclusive::new(base, last)?;
        self.inner.free(&key)?;
        self.allocated.remove(&base);
        Ok(())
    }

    fn record(&mut self, r: vm_allocator::RangeInclusive) -> MmioRange {
        self.allocated.insert(r.start(), r.end());
        to_mmio_range(r)
    }
}

fn to_mmio_range(r: vm_allocator::RangeInclusive) -> MmioRange {
    // `RangeInclusive::new` refuses `0..=u64::MAX`, so `len()` does not overflow and is not
    // zero; a non-empty range inside u64 is a valid bus range.
    MmioRange::new(MmioAddress(r.start()), r.len())
        .expect("an allocated range is a valid bus range")
}

/// Hands out GSIs (interrupt controller input pins) from a range.
///
/// A thin layer over vm-allocator's [`IdAllocator`]: the lowest free GSI first, freed ones
/// reused lowest first. The VMM passes `5..=23`, the IOAPIC pins after the legacy ones it
/// assigns itself (COM1 on 4, the i8042 on 1, the PIT on 0/2).
#[derive(Clone, Debug)]
pub struct GsiAllocator {
    inner: IdAllocator,
    range: RangeInclusive<u32>,
}

impl GsiAllocator {
    /// An allocator over `range`.
    ///
    /// # Errors
    ///
    /// [`Error::Allocator`] if `range` is empty.
    pub fn new(range: RangeInclusive<u32>) -> Result<Self> {
        let inner = IdAllocator::new(*range.start(), *range.end())?;
        Ok(Self { inner, range })
    }

    /// The range GSIs are handed out of.
    pub fn range(&self) -> RangeInclusive<u32> {
        self.range.clone()
    }

    /// Allocates the lowest free GSI.
    ///
    /// # Errors
    ///
    /// [`Error::GsiExhausted`] if all are in use.
    pub fn allocate(&mut self) -> Result<u32> {
        self.inner.allocate_id().map_err(|e| match e {
            // `Overflow` is how IdAllocator says "exhausted" when the range ends at u32::MAX.
            vm_allocator::Error::ResourceNotAvailable | vm_allocator::Error::Overflow => {
                Error::GsiExhausted(self.range.clone())
            }
            e => e.into(),
        })
    }

    /// Returns `gsi` to the free pool.
    ///
    /// # Errors
    ///
    /// [`Error::Allocator`] if `gsi` is outside the range, was never allocated or is free.
    pub fn free(&mut self, gsi: u32) -> Result<()> {
        self.inner.free_id(gsi)?;
        Ok(())
    }

    /// Whether `gsi` is currently allocated.
    pub fn is_allocated(&self, gsi: u32) -> bool {
        self.inner.is_allocated(gsi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Range<u64> = 0xD000_0000..0xFEC0_0000;

    fn span(r: &MmioRange) -> (u64, u64) {
        (r.base().0, r.size())
    }

    #[test]
    fn mmio_allocates_aligned_ranges_in_the_window() {
        let mut a = MmioAllocator::new(WINDOW).unwrap();
        assert_eq!(a.window(), 0xD000_0000..=0xFEBF_FFFF);
        let r1 = a.allocate(0x200, 0x1000).unwrap();
        let r2 = a.allocate(0x1000, 0x1000).unwrap();
        let r3 = a.allocate(0x10, 0x100_0000).unwrap();
        assert_eq!(span(&r1), (0xD000_0000, 0x200));
        assert_eq!(span(&r2), (0xD000_1000, 0x1000));
        assert_eq!(span(&r3), (0xD100_0000, 0x10));
    }

    #[test]
    fn mmio_exhausts_cleanly_and_free_allows_reuse() {
        let mut a = MmioAllocator::new(0x1000..0x4000).unwrap();
        let r: Vec<_> = (0..3)
            .map(|_| a.allocate(0x1000, 0x1000).unwrap())
            .collect();
        let err = a.allocate(0x1000, 0x1000).unwrap_err();
        assert_eq!(
            err,
            Error::MmioExhausted {
                window: 0x1000..=0x3FFF,
                size: 0x1000,
                align: 0x1000
            }
        );
        assert!(err.to_string().contains("exhausted"));
        // Too big for the window at all.
        assert!(matches!(
            a.allocate(0x10_0000, 1),
            Err(Error::MmioExhausted { .. })
        ));

        a.free(r[1]).unwrap();
        // Freeing twice, or something never handed out, is refused.
        assert_eq!(
            a.free(r[1]).unwrap_err(),
            Error::MmioNotAllocated(0x2000..=0x2FFF)
        );
        assert!(matches!(
            a.free(crate::mmio_range(0x1000, 0x800).unwrap()),
            Err(Error::MmioNotAllocated(_))
        ));
        let again = a.allocate(0x1000, 0x1000).unwrap();
        assert_eq!(span(&again), (0x2000, 0x1000));

        // Freeing everything merges the window back whole.
        for r in [r[0], again, r[2]] {
            a.free(r).unwrap();
        }
        assert_eq!(span(&a.allocate(0x3000, 0x1000).unwrap()), (0x1000, 0x3000));
    }

    #[test]
    fn mmio_exact_allocation() {
        let mut a = MmioAllocator::new(0x1000..0x4000).unwrap();
        let r = a.allocate_at(0x2000, 0x1000).unwrap();
        assert_eq!(span(&r), (0x2000, 0x1000));
        // Inside, across the start of, and exactly the allocated range: refused (vm-allocator
        // alone would hand out the first).
        assert_eq!(
            a.allocate_at(0x2800, 0x100).unwrap_err(),
            Error::MmioUnavailable(0x2800..=0x28FF)
        );
        assert!(matches!(
            a.allocate_at(0x1800, 0x1000),
            Err(Error::MmioUnavailable(_))
        ));
        assert!(matches!(
            a.allocate_at(0x2000, 0x1000),
            Err(Error::MmioUnavailable(_))
        ));
        // Outside the window.
        assert!(matches!(
            a.allocate_at(0x8000, 0x100),
            Err(Error::MmioUnavailable(_))
        ));
        // First fit goes around the fixed range.
        assert_eq!(span(&a.allocate(0x1000, 0x1000).unwrap()), (0x1000, 0x1000));
        assert_eq!(span(&a.allocate(0x1000, 0x1000).unwrap()), (0x3000, 0x1000));
    }

    #[test]
    fn mmio_bad_requests() {
        assert!(matches!(
            MmioAllocator::new(0x1000..0x1000),
            Err(Error::InvalidRange { .. })
        ));
        let mut a = MmioAllocator::new(WINDOW).unwrap();
        assert!(matches!(a.allocate(0, 0x1000), Err(Error::Allocator(_))));
        assert!(matches!(a.allocate(0x1000, 3), Err(Error::Allocator(_))));
    }

    #[test]
    fn gsi_exhausts_cleanly_and_free_allows_reuse() {
        let mut g = GsiAllocator::new(5..=23).unwrap();
        let got: Vec<u32> = (0..19).map(|_| g.allocate().unwrap()).collect();
        assert_eq!(got, (5..=23).collect::<Vec<_>>());
        assert_eq!(g.allocate().unwrap_err(), Error::GsiExhausted(5..=23));
        assert_eq!(g.allocate().unwrap_err(), Error::GsiExhausted(5..=23));

        g.free(9).unwrap();
        g.free(7).unwrap();
        assert!(!g.is_allocated(7) && g.is_allocated(8));
        assert!(matches!(g.free(7), Err(Error::Allocator(_))));
        assert!(matches!(g.free(4), Err(Error::Allocator(_))));
        // Lowest freed first.
        assert_eq!(g.allocate().unwrap(), 7);
        assert_eq!(g.allocate().unwrap(), 9);
        assert!(g.allocate().is_err());
    }

    #[test]
    fn gsi_never_allocated_and_range_end() {
        let mut g = GsiAllocator::new(5..=23).unwrap();
        assert!(matches!(g.free(5), Err(Error::Allocator(_))));
        assert_eq!(g.range(), 5..=23);

        let mut top = GsiAllocator::new(u32::MAX..=u32::MAX).unwrap();
        assert_eq!(top.allocate().unwrap(), u32::MAX);
        assert_eq!(
            top.allocate().unwrap_err(),
            Error::GsiExhausted(u32::MAX..=u32::MAX)
        );
        #[allow(clippy::reversed_empty_ranges)]
        let empty = GsiAllocator::new(6..=5);
        assert!(empty.is_err());
    }
}
