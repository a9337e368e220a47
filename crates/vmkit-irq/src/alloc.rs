//! GSIs for MSI routes.

use crate::IOAPIC_PINS;

/// Errors of [`MsiGsiAllocator`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Every GSI of the range is taken.
    #[error("no free GSI left for MSI routes (all of {first}..={last} are in use)")]
    Exhausted {
        /// First GSI of the range.
        first: u32,
        /// Last GSI of the range.
        last: u32,
    },
    /// A GSI given back was not handed out by this allocator.
    #[error("GSI {0} was not allocated here")]
    NotAllocated(u32),
}

/// Hands out GSIs for MSI routes, above the IOAPIC's pins, and takes them back.
///
/// IOAPIC pins themselves are board wiring that the VMM assigns with its device addresses
/// (see `vmkit-bus`); MSIs are numbered here.
#[derive(Debug, Clone)]
pub struct MsiGsiAllocator {
    first: u32,
    last: u32,
    used: Vec<bool>,
}

impl MsiGsiAllocator {
    /// GSIs from the first one after the IOAPIC pins up to `last` (inclusive). KVM's limit is
    /// its route count (4096), so `last` is typically 4095.
    pub fn new(last: u32) -> Self {
        let first = IOAPIC_PINS;
        let n = last.saturating_sub(first).saturating_add(1) as usize;
        Self {
            first,
            last,
            used: vec![false; if last < first { 0 } else { n }],
        }
    }

    /// The lowest free GSI.
    pub fn allocate(&mut self) -> Result<u32, AllocError> {
        let i = self
            .used
            .iter()
            .position(|u| !u)
            .ok_or(AllocError::Exhausted {
                first: self.first,
                last: self.last,
            })?;
        self.used[i] = true;
        Ok(self.first + i as u32)
    }

    /// Gives `gsi` back.
    pub fn free(&mut self, gsi: u32) -> Result<(), AllocError> {
        let slot = gsi
            .checked_sub(self.first)
            .and_then(|i| self.used.get_mut(i as usize))
            .filter(|u| **u)
            .ok_or(AllocError::NotAllocated(gsi))?;
        *slot = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_above_ioapic_and_reuses() {
        let mut a = MsiGsiAllocator::new(IOAPIC_PINS + 1);
        assert_eq!(a.allocate(), Ok(24));
        assert_eq!(a.allocate(), Ok(25));
        assert!(matches!(a.allocate(), Err(AllocError::Exhausted { .. })));
        a.free(24).unwrap();
        assert_eq!(a.free(24), Err(AllocError::NotAllocated(24)));
        assert_eq!(a.free(3), Err(AllocError::NotAllocated(3)));
        assert_eq!(a.free(1000), Err(AllocError::NotAllocated(1000)));
        assert_eq!(a.allocate(), Ok(24));
    }

    #[test]
    fn empty_range_is_exhausted_not_a_panic() {
        let mut a = MsiGsiAllocator::new(3);
        assert!(a.allocate().is_err());
    }
}
