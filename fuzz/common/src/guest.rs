//! Guest memory for the harnesses, and the write oracle.
//!
//! Memory is two adjacent regions, so buffers and tables can straddle a region boundary as
//! they can in a real guest whose RAM is split around a hole. The oracle compares memory
//! before and after a sequence and names the first byte that changed outside the ranges the
//! driver made device-writable (used rings, buffers of descriptors marked `WRITE`).

use std::ops::Range;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory of two adjacent regions of `region` bytes each, filled with one byte.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The memory the devices see.
    pub mem: GuestMemoryMmap,
    size: u64,
    /// What memory should hold if only the harness (the driver) wrote it: every
    /// [`write`](Self::write) lands here too, so [`WriteOracle::check_guest`] sees the
    /// device's writes alone.
    shadow: std::cell::RefCell<Vec<u8>>,
}

impl Guest {
    /// Two adjacent regions of `region` bytes each (`region` a multiple of 4 KiB), every
    /// byte set to `fill`.
    pub fn new(region: u64, fill: u8) -> Self {
        let r = usize::try_from(region).expect("region size fits usize");
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), r), (GuestAddress(region), r)])
                .expect("guest memory");
        if fill != 0 {
            mem.write_slice(&vec![fill; 2 * r], GuestAddress(0))
                .expect("fill guest memory");
        }
        Self {
            mem,
            size: 2 * region,
            shadow: std::cell::RefCell::new(vec![fill; 2 * r]),
        }
    }

    /// Bytes of guest memory.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// A copy of all of guest memory.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        self.mem
            .read_slice(&mut v, GuestAddress(0))
            .expect("read guest memory");
        v
    }

    /// Writes `data` at `addr` if it fits (harness writes never fail the run).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        // All or nothing: vm-memory writes the part that fits before it fails, which the
        // shadow would then not know about.
        if addr
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return false;
        }
        if self.mem.write_slice(data, GuestAddress(addr)).is_err() {
            return false;
        }
        let start = addr as usize;
        self.shadow.borrow_mut()[start..start + data.len()].copy_from_slice(data);
        true
    }

    /// Takes memory as it is now as what the harness wrote (the device's writes so far are
    /// accepted; later checks judge only what follows).
    pub fn rebase(&self) {
        *self.shadow.borrow_mut() = self.snapshot();
    }

    /// What memory would hold had only [`write`](Self::write) changed it.
    pub fn expected(&self) -> std::cell::Ref<'_, Vec<u8>> {
        self.shadow.borrow()
    }

    /// Reads `buf.len()` bytes at `addr`; false if they are not all in memory.
    pub fn mem_read(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.mem.read_slice(buf, GuestAddress(addr)).is_ok()
    }

    /// Reads the byte at `addr` (0 when outside memory).
    pub fn read_u8(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap_or(0)
    }

    /// Reads a little-endian `u16` at `addr` (0 when outside memory).
    pub fn read_u16(&self, addr: u64) -> u16 {
        self.mem.read_obj(GuestAddress(addr)).unwrap_or(0)
    }

    /// Reads a little-endian `u32` at `addr` (0 when outside memory).
    pub fn read_u32(&self, addr: u64) -> u32 {
        self.mem.read_obj(GuestAddress(addr)).unwrap_or(0)
    }
}

/// The ranges the device may write: everything else must read back as it was.
#[derive(Debug, Clone, Default)]
pub struct WriteOracle {
    allowed: Vec<Range<u64>>,
    /// Descriptor tables, indirect tables and available rings: what the device reads its
    /// orders from. A writable buffer over one of them lets the device rewrite its own
    /// orders (a chain read later then has buffers this oracle never saw), so the check is
    /// skipped for such inputs rather than failing a legal run.
    control: Vec<Range<u64>>,
    /// The harness wrote over a table or ring already given to the device (a request's
    /// contents over a hostile indirect table, say): the oracle's view of which buffers
    /// are writable may be out of date, so the check is skipped.
    stale: bool,
}

impl WriteOracle {
    /// No range allowed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows `len` bytes from `addr` (saturating at the top of the address space).
    pub fn allow(&mut self, addr: u64, len: u64) {
        if len != 0 {
            self.allowed.push(addr..addr.saturating_add(len));
        }
    }

    /// Notes `len` bytes from `addr` as a table or ring the device reads.
    pub fn control(&mut self, addr: u64, len: u64) {
        if len != 0 {
            self.control.push(addr..addr.saturating_add(len));
        }
    }

    /// The harness is about to write `len` bytes of contents (not a table or ring entry) at
    /// `addr`: over a table the device reads, that makes the oracle's view stale.
    pub fn contents_written(&mut self, addr: u64, len: u64) {
        let end = addr.saturating_add(len);
        if self.control.iter().any(|c| addr < c.end && c.start < end) {
            self.stale = true;
        }
    }

    /// Whether a writable range overlaps a table or ring the device reads (the check is
    /// then skipped, see [`control`](Self::control)).
    pub fn self_modifying(&self) -> bool {
        self.allowed.iter().any(|a| {
            self.control
                .iter()
                .any(|c| a.start < c.end && c.start < a.end)
        })
    }

    /// Whether a range the device may write, other than `[addr, addr + len)` itself,
    /// overlaps it (a buffer over a used ring: what the ring then holds is not the
    /// device's used elements alone).
    pub fn written_over(&self, addr: u64, len: u64) -> bool {
        let r = addr..addr.saturating_add(len);
        self.allowed
            .iter()
            .any(|a| *a != r && a.start < r.end && r.start < a.end)
    }

    /// Whether `addr` lies in an allowed range.
    pub fn allows(&self, addr: u64) -> bool {
        self.allowed.iter().any(|r| r.contains(&addr))
    }

    /// The first address that differs between `before` and `after` outside the allowed
    /// ranges.
    pub fn first_violation(&self, before: &[u8], after: &[u8]) -> Option<u64> {
        if before == after || self.stale || self.self_modifying() {
            return None;
        }
        // Chunks compared whole first (a memcmp): only the few that differ are walked
        // byte by byte, which matters under AddressSanitizer.
        const CHUNK: usize = 256;
        for (c, (b, a)) in before.chunks(CHUNK).zip(after.chunks(CHUNK)).enumerate() {
            if b == a {
                continue;
            }
            for (j, (x, y)) in b.iter().zip(a).enumerate() {
                let at = (c * CHUNK + j) as u64;
                if x != y && !self.allows(at) {
                    return Some(at);
                }
            }
        }
        None
    }

    /// Panics, naming `what`, if the device wrote `g` outside the allowed ranges (anything
    /// that differs from what the harness wrote through [`Guest::write`]).
    pub fn check_guest(&self, g: &Guest, what: &str) {
        self.check(&g.expected(), &g.snapshot(), what);
    }

    /// Panics, naming `what`, if the device wrote outside the allowed ranges.
    pub fn check(&self, before: &[u8], after: &[u8], what: &str) {
        if let Some(at) = self.first_violation(before, after) {
            panic!(
                "{what}: guest memory at {at:#x} changed ({:#04x} -> {:#04x}) outside the used \
                 rings and the buffers the driver made device-writable",
                before[at as usize], after[at as usize]
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oracle_names_a_write_outside_the_allowed_ranges() {
        let g = Guest::new(0x1000, 0xAA);
        let before = g.snapshot();
        let mut o = WriteOracle::new();
        o.allow(0x100, 0x10);
        assert!(g.write(0x108, &[1, 2]));
        assert_eq!(o.first_violation(&before, &g.snapshot()), None);
        // Across the region boundary, outside the allowed range.
        assert!(g.write(0xFFF, &[1, 2]));
        assert_eq!(o.first_violation(&before, &g.snapshot()), Some(0xFFF));
    }
}
