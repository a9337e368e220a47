//! Guest RAM for x86_64 KVM virtual machines.
//!
//! This crate does five things and nothing else:
//!
//! * [`layout`] is the guest physical address map: every fixed address a vmkit crate or VMM
//!   uses (boot data, the MMIO gap and the device windows in it, interrupt assignments),
//!   checked to be disjoint. Every other vmkit crate takes its addresses from here.
//! * [`MemoryLayout`] splits a guest's RAM around the 32-bit MMIO gap: RAM below
//!   [`MMIO_GAP_START`] (3 GiB), the rest above 4 GiB. Pure
//!   arithmetic, no KVM.
//! * [`create_guest_memory`] maps that layout as [`GuestRam`] (vm-memory's `GuestMemoryMmap`, with
//!   a dirty-page bitmap per region when [`MemoryConfig::track_dirty`] asks), anonymous and
//!   `MAP_NORESERVE` (host pages are only taken when the guest touches them), optionally backed
//!   by huge pages, and left out of core dumps (`MADV_DONTDUMP`) unless
//!   [`MemoryConfig::dumpable`] says otherwise.
//! * [`register_memory_slots`] (feature `kvm`, on by default) hands the regions to KVM as
//!   memory slots, with KVM's dirty log if asked ([`register_memory_slots_with`]).
//! * [`DirtyPages`] and [`snapshot`]: the pages written since a point (KVM's dirty log, the
//!   regions' bitmaps), and guest RAM to and from a sparse memory file; a memory file mapped
//!   `MAP_PRIVATE` as RAM ([`MemoryConfig::file`]).
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress};
//! use vmkit_memory::layout::MMIO_GAP_END;
//! use vmkit_memory::{create_guest_memory, MemoryConfig, MemoryLayout};
//!
//! // 4 GiB of RAM: 3 GiB below the MMIO gap, 1 GiB above 4 GiB.
//! let layout = MemoryLayout::new(4 << 30).unwrap();
//! assert_eq!(layout.regions().len(), 2);
//! assert_eq!(layout.regions()[1].0, GuestAddress(MMIO_GAP_END));
//!
//! let mem = create_guest_memory(&MemoryConfig::new(64 << 20)).unwrap();
//! mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
//! assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
//! ```
#![deny(missing_docs)]

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Guest RAM as every vmkit crate and VMM holds it: vm-memory's mmap backend with an optional
/// dirty-page bitmap per region.
///
/// `None` (the default, [`MemoryConfig::track_dirty`] `false`) costs nothing: the bitmap
/// calls on every write are a test of the `Option`. `Some` (tracking on) marks each 4 KiB
/// page that the VMM or a device writes through vm-memory; pages the guest writes are KVM's
/// business (its dirty log), not this bitmap's.
pub type GuestRam = GuestMemoryMmap<Option<AtomicBitmap>>;

#[cfg(feature = "kvm")]
mod kvm;
#[cfg(feature = "kvm")]
pub use kvm::{register_memory_slots, register_memory_slots_with, MemorySlots};

mod dirty;
pub use dirty::{take_bitmap_dirty, DirtyPages};
pub mod snapshot;

pub mod layout;
use layout::{MMIO_GAP_END, MMIO_GAP_START, PAGE_SIZE};
/// The smallest guest this crate lays out: 1 MiB (real mode memory and nothing else).
pub const MIN_MEMORY: u64 = 1 << 20;
/// The largest guest RAM: 1 TiB above 4 GiB keeps every address under 41 bits, within the
/// physical address width of any x86_64 host KVM runs on.
pub const MAX_MEMORY: u64 = 1 << 40;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested size is below [`MIN_MEMORY`].
    #[error(
        "guest memory of {0} bytes is too small: at least {MIN_MEMORY} bytes (1 MiB) are needed"
    )]
    TooSmall(u64),
    /// The requested size is above [`MAX_MEMORY`].
    #[error("guest memory of {0} bytes is too large: at most {MAX_MEMORY} bytes (1 TiB)")]
    TooLarge(u64),
    /// The requested size is not a multiple of [`PAGE_SIZE`].
    #[error("guest memory of {0} bytes is not a multiple of the 4 KiB page size")]
    Unaligned(u64),
    /// The size does not fit in the host's address space (`usize`).
    #[error("guest memory of {0} bytes does not fit in this host's address space")]
    HostAddressSpace(u64),
    /// Huge-page backing was asked for with a size that is not a multiple of the huge page.
    #[error(
        "guest memory region of {size} bytes is not a multiple of the {huge_page} byte huge page"
    )]
    HugePageUnaligned {
        /// The region's size.
        size: u64,
        /// The huge page size.
        huge_page: u64,
    },
    /// mmap of a region failed (for huge pages: usually too few reserved huge pages).
    #[error("cannot map {size} bytes of guest memory at {addr:#x}{}: {source}",
        if *.huge_pages { " from the hugetlb pool (is /proc/sys/vm/nr_hugepages large enough?)" } else { "" })]
    Mmap {
        /// Whether huge pages were asked for.
        huge_pages: bool,
        /// Guest physical address of the region.
        addr: u64,
        /// Size of the region.
        size: u64,
        /// What vm-memory reported.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// `madvise(MADV_DONTDUMP)` on a region failed: the guest's RAM would be in a core dump.
    #[error("cannot keep guest memory at {addr:#x} ({size} bytes) out of core dumps: {source}")]
    DontDump {
        /// Guest physical address of the region.
        addr: u64,
        /// Size of the region.
        size: u64,
        /// What madvise reported.
        source: std::io::Error,
    },
    /// Pages outside guest RAM (or straddling two regions) were to be marked dirty.
    #[error("{len} bytes at {addr:#x} are not inside one region of guest RAM")]
    OutsideRam {
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A dirty bitmap does not fit the region it was given for.
    #[error("a dirty bitmap of {words} words does not fit guest memory region {region}")]
    DirtyBitmap {
        /// The region's index.
        region: usize,
        /// The bitmap's length in 64-bit words.
        words: usize,
    },
    /// The dirty log was asked for, but the memory slots do not log dirty pages.
    #[cfg(feature = "kvm")]
    #[error(
        "dirty page tracking is off: the memory slots were registered without KVM's dirty log"
    )]
    DirtyLogOff,
    /// `KVM_GET_DIRTY_LOG` failed.
    #[cfg(feature = "kvm")]
    #[error("KVM cannot give the dirty log of memory slot {slot}: {source}")]
    GetDirtyLog {
        /// Slot number.
        slot: u32,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
    /// A memory file could not be written or read.
    #[error("memory file: {what} at offset {offset:#x} failed: {source}")]
    SnapshotIo {
        /// What was being done.
        what: &'static str,
        /// Where in the file.
        offset: u64,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A range of a memory file to read lies outside the RAM or the file.
    #[error("memory file range of {len} bytes at offset {offset:#x} lies outside the {ram} bytes of RAM or the {file} byte file")]
    BadRange {
        /// Offset of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// RAM size.
        ram: u64,
        /// File size.
        file: u64,
    },
    /// The memory file to restore from cannot be opened.
    #[error("cannot open memory file {path}: {source}")]
    MemoryFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The memory file to restore from is not the size of the RAM.
    #[error("memory file {path} holds {actual} bytes, but the guest has {expected} bytes of RAM")]
    MemoryFileSize {
        /// The file.
        path: PathBuf,
        /// The RAM size.
        expected: u64,
        /// The file's size.
        actual: u64,
    },
    /// Huge pages cannot back memory mapped from a file.
    #[error("guest memory from a memory file cannot be backed by huge pages")]
    HugePagesWithFile,
    /// vm-memory rejected the set of regions.
    #[error("cannot build guest memory: {0}")]
    Regions(#[from] vm_memory::GuestRegionCollectionError),
    /// KVM refused a memory slot.
    #[cfg(feature = "kvm")]
    #[error("KVM refused memory slot {slot} at {addr:#x} ({size} bytes): {source}")]
    SetMemoryRegion {
        /// Slot number.
        slot: u32,
        /// Guest physical address.
        addr: u64,
        /// Size in bytes.
        size: u64,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
}

/// Result of this crate's functions.
pub type Result<T> = std::result::Result<T, Error>;

/// Where a guest's RAM goes in guest physical address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    regions: Vec<(GuestAddress, u64)>,
}

impl MemoryLayout {
    /// Lays out `size` bytes of RAM: up to [`MMIO_GAP_START`] from address 0, the rest from
    /// [`MMIO_GAP_END`] (both in [`layout`]).
    pub fn new(size: u64) -> Result<Self> {
        if size < MIN_MEMORY {
            return Err(Error::TooSmall(size));
        }
        if size > MAX_MEMORY {
            return Err(Error::TooLarge(size));
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Unaligned(size));
        }
        if usize::try_from(size).is_err() {
            return Err(Error::HostAddressSpace(size));
        }
        let low = size.min(MMIO_GAP_START);
        let mut regions = vec![(GuestAddress(0), low)];
        let high = size - low;
        if high > 0 {
            regions.push((GuestAddress(MMIO_GAP_END), high));
        }
        Ok(Self { regions })
    }

    /// The RAM regions as (start, size), in ascending order.
    pub fn regions(&self) -> &[(GuestAddress, u64)] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.1).sum()
    }

    /// The end (exclusive) of RAM below the MMIO gap.
    pub fn low_ram_end(&self) -> GuestAddress {
        // `new` always creates the low region first.
        GuestAddress(self.regions[0].1)
    }

    /// The end (exclusive) of the highest RAM region.
    pub fn end(&self) -> GuestAddress {
        let (start, size) = self.regions[self.regions.len() - 1];
        GuestAddress(start.0 + size)
    }
}

/// Host pages backing guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// Anonymous memory the kernel is asked to back with transparent huge pages
    /// (`MADV_HUGEPAGE`), as QEMU and Cloud Hypervisor do. Fewer TLB misses for the guest, and
    /// device I/O into guest buffers crosses far fewer host pages: a 128 KiB `O_DIRECT` read
    /// into 4 KiB pages is 32 segments for the host's block layer, into a huge page one.
    /// Host memory is still taken only as the guest touches it, 2 MiB at a time where the
    /// kernel finds huge pages. Without THP in the host kernel this is plain anonymous memory.
    #[default]
    TransparentHugePages,
    /// Ordinary anonymous memory in 4 KiB pages (transparent huge pages only if the host's
    /// THP setting is `always`): the smallest resident footprint.
    Anonymous,
    /// Anonymous memory from the host's hugetlb pool (`MAP_HUGETLB`, 2 MiB pages). The pool
    /// must hold enough pages (`/proc/sys/vm/nr_hugepages`).
    HugePages,
}

/// How to create guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// RAM size in bytes.
    pub size: u64,
    /// What backs it.
    pub backing: Backing,
    /// Whether a core dump of this process holds the guest's RAM. `false` (the default):
    /// every region is `MADV_DONTDUMP`, so a crashing VMM does not write the guest's memory
    /// (its secrets, and gigabytes) to disk. `true` for debugging a guest from a VMM core.
    pub dumpable: bool,
    /// Whether each region carries a dirty-page bitmap ([`GuestRam`]'s `Some`), marking
    /// every page written through vm-memory (device and VMM writes), for diff snapshots.
    /// `false` (the default): no bitmap, no cost.
    pub track_dirty: bool,
    /// A memory file to map the RAM from (a snapshot's, see [`snapshot`]): each region is
    /// mapped `MAP_PRIVATE` from its offset in the file, so pages load on first touch, VMs
    /// restored from one file share the host's page cache, and what the guest writes never
    /// reaches the file. The file must be the RAM's size; not with [`Backing::HugePages`].
    /// `None` (the default): anonymous memory.
    pub file: Option<PathBuf>,
}

impl MemoryConfig {
    /// `size` bytes of anonymous memory, with transparent huge pages, left out of core dumps.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            backing: Backing::default(),
            dumpable: false,
            track_dirty: false,
            file: None,
        }
    }
}

/// Size of the huge pages used by [`Backing::HugePages`].
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// The granule of the dirty bitmaps: a 4 KiB page, as KVM's dirty log.
const DIRTY_PAGE_SIZE: NonZeroUsize = match NonZeroUsize::new(PAGE_SIZE as usize) {
    Some(n) => n,
    None => panic!("the page size is not zero"),
};

/// Maps guest RAM as laid out by [`MemoryLayout::new`]: anonymous, or `MAP_PRIVATE` from
/// [`MemoryConfig::file`].
pub fn create_guest_memory(config: &MemoryConfig) -> Result<GuestRam> {
    let layout = MemoryLayout::new(config.size)?;
    let flags = map_flags(config, &layout)?;
    let file = open_memory_file(config, &layout)?;
    let mut regions = Vec::with_capacity(layout.regions().len());
    let mut file_offset = 0u64;
    for &(addr, size) in layout.regions() {
        let from_file = match &file {
            Some(f) => Some(FileOffset::new(
                f.try_clone()
                    .map_err(|source| memory_file_error(config, source))?,
                file_offset,
            )),
            None => None,
        };
        regions.push(map_region(config, flags, from_file, addr, size)?);
        file_offset += size;
    }
    Ok(GuestRam::from_regions(regions)?)
}

/// The mmap flags for `config`'s backing.
fn map_flags(config: &MemoryConfig, layout: &MemoryLayout) -> Result<i32> {
    let mut flags = libc::MAP_PRIVATE;
    if config.file.is_none() {
        flags |= libc::MAP_ANONYMOUS;
    }
    if config.backing == Backing::HugePages {
        if config.file.is_some() {
            return Err(Error::HugePagesWithFile);
        }
        // No MAP_NORESERVE here: with it, mmap succeeds on an empty hugetlb pool and the first
        // guest touch dies of SIGBUS. Without it, a short pool is an mmap error up front.
        flags |= libc::MAP_HUGETLB;
        for &(_, size) in layout.regions() {
            if size % HUGE_PAGE_SIZE != 0 {
                return Err(Error::HugePageUnaligned {
                    size,
                    huge_page: HUGE_PAGE_SIZE,
                });
            }
        }
    } else {
        flags |= libc::MAP_NORESERVE;
    }
    Ok(flags)
}

fn memory_file_error(config: &MemoryConfig, source: std::io::Error) -> Error {
    Error::MemoryFile {
        path: config.file.clone().unwrap_or_default(),
        source,
    }
}

/// `config.file` opened read-only (a private mapping never writes it back), checked to be
/// the RAM's size.
fn open_memory_file(config: &MemoryConfig, layout: &MemoryLayout) -> Result<Option<File>> {
    let Some(path) = &config.file else {
        return Ok(None);
    };
    // Non-blocking: a FIFO named as a memory file is not waited on (and then refused).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| memory_file_error(config, source))?;
    let meta = file
        .metadata()
        .map_err(|source| memory_file_error(config, source))?;
    if !meta.is_file() || meta.len() != layout.size() {
        return Err(Error::MemoryFileSize {
            path: path.clone(),
            expected: layout.size(),
            actual: meta.len(),
        });
    }
    Ok(Some(file))
}

/// One region of `size` bytes at `addr`, mapped with `flags` (from `file` if given), advised
/// as `config` says.
fn map_region(
    config: &MemoryConfig,
    flags: i32,
    file: Option<FileOffset>,
    addr: GuestAddress,
    size: u64,
) -> Result<GuestRegionMmap<Option<AtomicBitmap>>> {
    // `MemoryLayout::new` checked that the total fits in usize.
    let len = size as usize;
    let bitmap = config
        .track_dirty
        .then(|| AtomicBitmap::new(len, DIRTY_PAGE_SIZE));
    let mut builder = MmapRegionBuilder::new_with_bitmap(len, bitmap)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .with_hugetlbfs(config.backing == Backing::HugePages);
    if let Some(file) = file {
        builder = builder.with_file_offset(file);
    }
    let mapping = builder.build().map_err(|source| Error::Mmap {
        huge_pages: config.backing == Backing::HugePages,
        addr: addr.0,
        size,
        source,
    })?;
    if config.backing == Backing::TransparentHugePages {
        advise_huge_pages(mapping.as_ptr(), len);
    }
    if !config.dumpable {
        advise_dont_dump(mapping.as_ptr(), len).map_err(|source| Error::DontDump {
            addr: addr.0,
            size,
            source,
        })?;
    }
    // The layout's regions never wrap around the address space.
    GuestRegionMmap::new(mapping, addr).ok_or(Error::TooLarge(size))
}

/// Asks the kernel to back `len` bytes at `ptr` with transparent huge pages. Only advice: a
/// kernel without THP refuses (`EINVAL`), and the memory works as before.
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    // SAFETY: `ptr..ptr + len` is a mapping this process just created and owns (vm-memory's
    // `MmapRegion`); MADV_HUGEPAGE changes how the kernel backs it, never its contents or
    // validity, so no Rust reference into it is affected.
    let r = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        log::debug!("guest memory: no transparent huge pages on this host ({e}); 4 KiB pages");
    }
}

/// Leaves `len` bytes at `ptr` out of core dumps (`MADV_DONTDUMP`: the `dd` VmFlag).
fn advise_dont_dump(ptr: *mut u8, len: usize) -> std::io::Result<()> {
    // SAFETY: `ptr..ptr + len` is a mapping this process just created and owns (vm-memory's
    // `MmapRegion`); MADV_DONTDUMP only sets VM_DONTDUMP on it, which changes what a core
    // dump writes, never the mapping's contents or validity.
    let r = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_DONTDUMP) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_guest_is_one_low_region() {
        let l = MemoryLayout::new(128 << 20).unwrap();
        assert_eq!(l.regions(), &[(GuestAddress(0), 128 << 20)]);
        assert_eq!(l.low_ram_end(), GuestAddress(128 << 20));
        assert_eq!(l.end(), GuestAddress(128 << 20));
        assert_eq!(l.size(), 128 << 20);
    }

    #[test]
    fn exactly_gap_start_has_no_high_region() {
        let l = MemoryLayout::new(MMIO_GAP_START).unwrap();
        assert_eq!(l.regions().len(), 1);
        assert_eq!(l.low_ram_end(), GuestAddress(MMIO_GAP_START));
    }

    #[test]
    fn large_guest_skips_the_gap() {
        let l = MemoryLayout::new(MMIO_GAP_START + PAGE_SIZE).unwrap();
        assert_eq!(
            l.regions(),
            &[
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(MMIO_GAP_END), PAGE_SIZE)
            ]
        );
        assert_eq!(l.end(), GuestAddress(MMIO_GAP_END + PAGE_SIZE));
        assert_eq!(l.size(), MMIO_GAP_START + PAGE_SIZE);
    }

    #[test]
    fn bad_sizes_are_errors() {
        assert!(matches!(MemoryLayout::new(0), Err(Error::TooSmall(0))));
        assert!(matches!(
            MemoryLayout::new(MIN_MEMORY - PAGE_SIZE),
            Err(Error::TooSmall(_))
        ));
        assert!(matches!(
            MemoryLayout::new((64 << 20) + 1),
            Err(Error::Unaligned(_))
        ));
        assert!(matches!(
            MemoryLayout::new(MAX_MEMORY + PAGE_SIZE),
            Err(Error::TooLarge(_))
        ));
        assert!(matches!(
            MemoryLayout::new(u64::MAX),
            Err(Error::TooLarge(_))
        ));
        // The error text names the problem.
        let e = MemoryLayout::new(100).unwrap_err().to_string();
        assert!(e.contains("too small"), "{e}");
    }

    #[test]
    fn memory_matches_layout_and_is_usable() {
        let mem = create_guest_memory(&MemoryConfig::new(16 << 20)).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let r = mem.iter().next().unwrap();
        assert_eq!(r.start_addr(), GuestAddress(0));
        assert_eq!(r.len(), 16 << 20);
        let last = GuestAddress((16 << 20) - 8);
        mem.write_obj(0x1122_3344_5566_7788u64, last).unwrap();
        assert_eq!(mem.read_obj::<u64>(last).unwrap(), 0x1122_3344_5566_7788);
        // One byte past the end is not guest memory.
        assert!(mem.write_obj(0u8, GuestAddress(16 << 20)).is_err());
    }

    #[test]
    fn dirty_bitmaps_only_when_tracking_and_mark_written_pages() {
        use vm_memory::bitmap::Bitmap;
        let plain = create_guest_memory(&MemoryConfig::new(4 << 20)).unwrap();
        assert!(plain.iter().all(|r| r.bitmap().is_none()));
        let tracked = create_guest_memory(&MemoryConfig {
            track_dirty: true,
            ..MemoryConfig::new(4 << 20)
        })
        .unwrap();
        let region = tracked.iter().next().unwrap();
        assert!(!region.bitmap().dirty_at(0x3000));
        tracked.write_obj(1u32, GuestAddress(0x3ffe)).unwrap();
        // A write across a page boundary marks both pages, and only them.
        assert!(region.bitmap().dirty_at(0x3000));
        assert!(region.bitmap().dirty_at(0x4000));
        assert!(!region.bitmap().dirty_at(0x2000));
        assert!(!region.bitmap().dirty_at(0x5000));
    }

    #[test]
    fn memory_above_the_gap_is_mapped_there() {
        // 3 GiB + 2 MiB: MAP_NORESERVE means this costs no host RAM until touched.
        let mem = create_guest_memory(&MemoryConfig::new(MMIO_GAP_START + (2 << 20))).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.write_obj(1u8, GuestAddress(MMIO_GAP_START)).is_err());
        mem.write_obj(7u8, GuestAddress(MMIO_GAP_END)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(MMIO_GAP_END)).unwrap(), 7);
    }

    /// The VmFlags line of the mapping that starts at `ptr`, from /proc/self/smaps.
    fn vm_flags(ptr: *mut u8) -> String {
        let start = format!("{:x}-", ptr as usize);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        lines
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .unwrap_or_default()
            .to_string()
    }

    fn has_flag(flags: &str, flag: &str) -> bool {
        flags.split_whitespace().any(|f| f == flag)
    }

    #[test]
    fn guest_memory_is_out_of_core_dumps_unless_asked() {
        // Both regions of a guest above the gap (MAP_NORESERVE: no host RAM is taken).
        let config = MemoryConfig {
            backing: Backing::Anonymous,
            ..MemoryConfig::new(MMIO_GAP_START + (2 << 20))
        };
        let mem = create_guest_memory(&config).unwrap();
        assert_eq!(mem.num_regions(), 2);
        for region in mem.iter() {
            let flags = vm_flags(region.as_ptr());
            assert!(has_flag(&flags, "dd"), "{flags}");
        }
        let mem = create_guest_memory(&MemoryConfig::new(16 << 20)).unwrap();
        let flags = vm_flags(mem.iter().next().unwrap().as_ptr());
        assert!(has_flag(&flags, "dd"), "THP backing: {flags}");
        let dumpable = MemoryConfig {
            dumpable: true,
            ..MemoryConfig::new(16 << 20)
        };
        let mem = create_guest_memory(&dumpable).unwrap();
        let flags = vm_flags(mem.iter().next().unwrap().as_ptr());
        assert!(!flags.is_empty() && !has_flag(&flags, "dd"), "{flags}");
    }

    #[test]
    fn transparent_huge_pages_are_asked_for_by_default_only() {
        let thp = create_guest_memory(&MemoryConfig::new(16 << 20)).unwrap();
        let flags = vm_flags(thp.iter().next().unwrap().as_ptr());
        assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
        let plain = create_guest_memory(&MemoryConfig {
            backing: Backing::Anonymous,
            ..MemoryConfig::new(16 << 20)
        })
        .unwrap();
        let flags = vm_flags(plain.iter().next().unwrap().as_ptr());
        assert!(
            !flags.is_empty() && !flags.split_whitespace().any(|f| f == "hg"),
            "{flags}"
        );
    }

    #[test]
    fn huge_pages_need_aligned_regions() {
        let cfg = MemoryConfig {
            backing: Backing::HugePages,
            ..MemoryConfig::new((2 << 20) + PAGE_SIZE)
        };
        assert!(matches!(
            create_guest_memory(&cfg),
            Err(Error::HugePageUnaligned { .. })
        ));
    }

    #[test]
    fn huge_pages_map_or_fail_cleanly() {
        // Whether the host has a hugetlb pool is the host's business; either outcome must be
        // a mapped region or a clear Mmap error, never a panic.
        let cfg = MemoryConfig {
            backing: Backing::HugePages,
            ..MemoryConfig::new(4 << 20)
        };
        match create_guest_memory(&cfg) {
            Ok(mem) => {
                mem.write_obj(5u8, GuestAddress(0)).unwrap();
                assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 5);
                // Out of core dumps, as every backing is by default.
                let flags = vm_flags(mem.iter().next().unwrap().as_ptr());
                assert!(has_flag(&flags, "dd"), "{flags}");
            }
            Err(Error::Mmap { size, .. }) => assert_eq!(size, 4 << 20),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}
