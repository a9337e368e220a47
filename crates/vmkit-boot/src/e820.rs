//! The guest memory map handed to the kernel (E820 for the Linux boot protocol, the
//! `hvm_memmap_table_entry` list for PVH; both use the same types).

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{EBDA_START, HIGH_MEMORY_START};

/// The type of a memory map entry (E820 / PVH memmap type values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MemoryType {
    /// Usable RAM (type 1).
    Ram = 1,
    /// Reserved, not usable by the OS (type 2).
    Reserved = 2,
}

/// One entry of the guest memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: MemoryType,
}

impl MemoryMapEntry {
    fn new(addr: u64, end: u64, kind: MemoryType) -> Self {
        MemoryMapEntry {
            addr,
            size: end - addr,
            kind,
        }
    }
}

/// Builds the guest memory map from the regions of `mem`, sorted by address.
///
/// A region starting at 0 is split into RAM `[0, 0x9FC00)`, reserved `[0x9FC00, 0x100000)`
/// (EBDA, VGA hole, BIOS area and the ACPI tables) and RAM `[0x100000, end)`, as far as the
/// region reaches. Every other region is RAM.
pub fn memory_map<M: GuestMemoryBackend>(mem: &M) -> Vec<MemoryMapEntry> {
    let mut regions: Vec<(u64, u64)> = mem
        .iter()
        .filter(|r| r.len() > 0)
        .map(|r| {
            let start = r.start_addr().raw_value();
            (start, start.saturating_add(r.len()))
        })
        .collect();
    regions.sort_unstable();

    let mut map = Vec::with_capacity(regions.len() + 2);
    for (start, end) in regions {
        if start < EBDA_START {
            map.push(MemoryMapEntry::new(
                start,
                end.min(EBDA_START),
                MemoryType::Ram,
            ));
            if end > EBDA_START {
                map.push(MemoryMapEntry::new(
                    EBDA_START,
                    end.min(HIGH_MEMORY_START),
                    MemoryType::Reserved,
                ));
            }
            if end > HIGH_MEMORY_START {
                map.push(MemoryMapEntry::new(HIGH_MEMORY_START, end, MemoryType::Ram));
            }
        } else {
            map.push(MemoryMapEntry::new(start, end, MemoryType::Ram));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn splits_the_low_region_and_keeps_high_regions() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x800_0000),
            (GuestAddress(0x1_0000_0000), 0x10_0000),
        ])
        .unwrap();
        let map = memory_map(&mem);
        assert_eq!(
            map,
            vec![
                MemoryMapEntry {
                    addr: 0,
                    size: 0x9_FC00,
                    kind: MemoryType::Ram
                },
                MemoryMapEntry {
                    addr: 0x9_FC00,
                    size: 0x10_0000 - 0x9_FC00,
                    kind: MemoryType::Reserved
                },
                MemoryMapEntry {
                    addr: 0x10_0000,
                    size: 0x800_0000 - 0x10_0000,
                    kind: MemoryType::Ram
                },
                MemoryMapEntry {
                    addr: 0x1_0000_0000,
                    size: 0x10_0000,
                    kind: MemoryType::Ram
                },
            ]
        );
    }

    #[test]
    fn small_low_region() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert_eq!(
            memory_map(&mem),
            vec![MemoryMapEntry {
                addr: 0,
                size: 0x8_0000,
                kind: MemoryType::Ram
            }]
        );
    }
}
