//! Dirty pages of guest RAM: one bit per 4 KiB page and region, gathered from the regions'
//! vm-memory bitmaps (what devices and the VMM wrote) and, with feature `kvm`, from KVM's
//! dirty log (what the guest wrote).

use std::ops::Range;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::PAGE_SIZE;
use crate::{Error, GuestRam, Result};

/// The dirty pages of one region.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RegionPages {
    /// Guest physical address of the region.
    start: u64,
    /// Offset of the region in the memory file (the sizes of the regions before it).
    file_offset: u64,
    /// Number of pages in the region.
    pages: u64,
    /// Bit `i % 64` of word `i / 64` marks page `i` (KVM's dirty log layout).
    bits: Vec<u64>,
}

impl RegionPages {
    fn is_set(&self, page: u64) -> bool {
        let word = usize::try_from(page / 64).unwrap_or(usize::MAX);
        self.bits
            .get(word)
            .is_some_and(|w| w & (1u64 << (page % 64)) != 0)
    }
}

/// Pages of guest RAM marked dirty since the last time they were taken.
///
/// Built empty for a guest's memory ([`DirtyPages::empty`]), filled from the vm-memory
/// bitmaps ([`take_bitmap_dirty`]), KVM's dirty log ([`crate::MemorySlots::take_dirty_log`])
/// or by hand ([`mark`](Self::mark)); [`file_ranges`](Self::file_ranges) says where they
/// are in a memory file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyPages {
    regions: Vec<RegionPages>,
}

impl DirtyPages {
    /// No page of `mem` dirty.
    pub fn empty<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> Self {
        let mut file_offset = 0u64;
        let regions = mem
            .iter()
            .map(|r| {
                let pages = r.len() / PAGE_SIZE;
                let words = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
                let region = RegionPages {
                    start: r.start_addr().0,
                    file_offset,
                    pages,
                    bits: vec![0; words],
                };
                // Regions are mapped, so their sizes add up within the address space.
                file_offset = file_offset.saturating_add(r.len());
                region
            })
            .collect();
        Self { regions }
    }

    /// Marks the pages of `len` bytes from `addr` dirty. An error when they are not all in
    /// one region.
    pub fn mark(&mut self, addr: GuestAddress, len: u64) -> Result<()> {
        let end = addr
            .0
            .checked_add(len)
            .ok_or(Error::OutsideRam { addr: addr.0, len })?;
        let region = self
            .regions
            .iter_mut()
            .find(|r| {
                addr.0 >= r.start
                    && r.pages
                        .checked_mul(PAGE_SIZE)
                        .and_then(|size| r.start.checked_add(size))
                        .is_some_and(|region_end| end <= region_end)
            })
            .ok_or(Error::OutsideRam { addr: addr.0, len })?;
        if len == 0 {
            return Ok(());
        }
        let first = (addr.0 - region.start) / PAGE_SIZE;
        let last = (end - 1 - region.start) / PAGE_SIZE;
        for page in first..=last {
            // `page < region.pages`, and `bits` holds a bit for each.
            if let Some(word) = region.bits.get_mut((page / 64) as usize) {
                *word |= 1u64 << (page % 64);
            }
        }
        Ok(())
    }

    /// ORs `bits` (KVM's dirty-log layout: bit `i % 64` of word `i / 64` is page `i`) into
    /// region `index`'s pages. An error when the region does not exist or `bits` does not
    /// have the region's length.
    pub fn merge(&mut self, index: usize, bits: &[u64]) -> Result<()> {
        let region = self.regions.get_mut(index).ok_or(Error::DirtyBitmap {
            region: index,
            words: bits.len(),
        })?;
        if region.bits.len() != bits.len() {
            return Err(Error::DirtyBitmap {
                region: index,
                words: bits.len(),
            });
        }
        for (a, b) in region.bits.iter_mut().zip(bits) {
            *a |= b;
        }
        // Bits past the region's last page mean nothing: keep them clear.
        let tail = region.pages % 64;
        if tail != 0 {
            if let Some(last) = region.bits.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
        Ok(())
    }

    /// ORs every page of `other` into `self`; both must describe the same memory.
    pub fn union(&mut self, other: &DirtyPages) -> Result<()> {
        if self.regions.len() != other.regions.len() {
            return Err(Error::DirtyBitmap {
                region: other.regions.len(),
                words: 0,
            });
        }
        for (i, r) in other.regions.iter().enumerate() {
            self.merge(i, &r.bits)?;
        }
        Ok(())
    }

    /// Whether the page holding `addr` is dirty (`false` outside RAM).
    pub fn is_dirty(&self, addr: GuestAddress) -> bool {
        self.regions.iter().any(|r| {
            addr.0 >= r.start && {
                let page = (addr.0 - r.start) / PAGE_SIZE;
                page < r.pages && r.is_set(page)
            }
        })
    }

    /// The number of dirty pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| r.bits.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The dirty pages as byte ranges of the memory file (region after region, see
    /// `snapshot`), adjacent pages joined, in ascending order.
    pub fn file_ranges(&self) -> Vec<Range<u64>> {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for r in &self.regions {
            // Word by word: a clean stretch of 64 pages costs one test.
            for (w, &word) in (0u64..).zip(&r.bits) {
                let mut bits = word;
                while bits != 0 {
                    let page = w * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    if page >= r.pages {
                        break;
                    }
                    let start = r.file_offset + page * PAGE_SIZE;
                    match ranges.last_mut() {
                        Some(last) if last.end == start => last.end += PAGE_SIZE,
                        _ => ranges.push(start..start + PAGE_SIZE),
                    }
                }
            }
        }
        ranges
    }
}

/// The pages written through vm-memory (devices, the VMM) since the last call, from the
/// regions' dirty bitmaps, which are cleared. Empty when `mem` tracks nothing
/// ([`crate::MemoryConfig::track_dirty`] off).
pub fn take_bitmap_dirty(mem: &GuestRam) -> DirtyPages {
    let mut dirty = DirtyPages::empty(mem);
    for (i, region) in mem.iter().enumerate() {
        if let Some(bitmap) = region.get_mmap().bitmap() {
            // Both are sized for the same region at the same page size; `merge` only fails on
            // a length mismatch, which would be a vm-memory change of layout.
            if let Err(e) = dirty.merge(i, &bitmap.get_and_reset()) {
                log::warn!("guest memory: dirty bitmap of region {i} ignored: {e}");
            }
        }
    }
    dirty
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
    use crate::{create_guest_memory, MemoryConfig};
    use vm_memory::Bytes;

    #[test]
    fn marks_become_joined_file_ranges_across_regions() {
        let mem = create_guest_memory(&MemoryConfig::new(MMIO_GAP_START + (2 << 20))).unwrap();
        let mut d = DirtyPages::empty(&mem);
        assert_eq!(d.count(), 0);
        d.mark(GuestAddress(0x1000), 0x1001).unwrap(); // pages 1 and 2
        d.mark(GuestAddress(0x3000), 1).unwrap(); // page 3: joins
        d.mark(GuestAddress(MMIO_GAP_END + 0x2000), 8).unwrap();
        assert_eq!(d.count(), 4);
        assert!(d.is_dirty(GuestAddress(0x2fff)));
        assert!(!d.is_dirty(GuestAddress(0x4000)));
        assert_eq!(
            d.file_ranges(),
            vec![
                0x1000..0x4000,
                MMIO_GAP_START + 0x2000..MMIO_GAP_START + 0x3000
            ]
        );
    }

    #[test]
    fn marks_outside_ram_and_bad_bitmaps_are_errors() {
        let mem = create_guest_memory(&MemoryConfig::new(4 << 20)).unwrap();
        let mut d = DirtyPages::empty(&mem);
        assert!(d.mark(GuestAddress(4 << 20), 1).is_err());
        assert!(d.mark(GuestAddress((4 << 20) - 1), 2).is_err());
        assert!(d.mark(GuestAddress(u64::MAX), 2).is_err());
        assert!(d.merge(1, &[0; 16]).is_err());
        assert!(d.merge(0, &[0; 15]).is_err());
        // 1024 pages: 16 words, all of them meaningful.
        d.merge(0, &[u64::MAX; 16]).unwrap();
        assert_eq!(d.count(), 1024);
    }

    #[test]
    fn bitmap_pages_are_taken_once() {
        let mem = create_guest_memory(&MemoryConfig {
            track_dirty: true,
            ..MemoryConfig::new(4 << 20)
        })
        .unwrap();
        mem.write_obj(7u64, GuestAddress(0x5000)).unwrap();
        mem.write_slice(&[1; 0x2000], GuestAddress(0x10_0800))
            .unwrap();
        let d = take_bitmap_dirty(&mem);
        assert_eq!(d.file_ranges(), vec![0x5000..0x6000, 0x10_0000..0x10_3000]);
        assert_eq!(take_bitmap_dirty(&mem).count(), 0, "cleared");
        // Without tracking nothing is recorded.
        let plain = create_guest_memory(&MemoryConfig::new(4 << 20)).unwrap();
        plain.write_obj(7u64, GuestAddress(0x5000)).unwrap();
        assert_eq!(take_bitmap_dirty(&plain).count(), 0);
    }
}
