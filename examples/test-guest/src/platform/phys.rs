//! Access to guest-physical memory through the identity mapping (0-4 GiB).

/// End of the identity mapping built in boot.rs.
pub const MAPPED_END: u64 = 1 << 32;

/// Returns `len` bytes of physical memory at `addr` when the range is mapped.
///
/// Only used for firmware data (start info, ACPI tables) that nothing writes
/// while the guest runs.
pub fn bytes(addr: u64, len: usize) -> Option<&'static [u8]> {
    let end = addr.checked_add(len as u64)?;
    if addr == 0 || end > MAPPED_END {
        return None;
    }
    // SAFETY: [addr, end) is inside the identity mapping of boot.rs (present,
    // readable at CPL3), non-null, and holds firmware-provided data that no
    // one mutates while the guest reads it.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
}

/// Little-endian field readers over a byte slice; `None` past the end.
pub trait Le {
    fn u8_at(&self, off: usize) -> Option<u8>;
    fn u32_at(&self, off: usize) -> Option<u32>;
    fn u64_at(&self, off: usize) -> Option<u64>;
}

impl Le for [u8] {
    fn u8_at(&self, off: usize) -> Option<u8> {
        self.get(off).copied()
    }
    fn u32_at(&self, off: usize) -> Option<u32> {
        Some(u32::from_le_bytes(
            self.get(off..off.checked_add(4)?)?.try_into().ok()?,
        ))
    }
    fn u64_at(&self, off: usize) -> Option<u64> {
        Some(u64::from_le_bytes(
            self.get(off..off.checked_add(8)?)?.try_into().ok()?,
        ))
    }
}
