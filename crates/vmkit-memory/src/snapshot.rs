//! Guest RAM to and from a memory file, for snapshots.
//!
//! The memory file is the guest's RAM regions concatenated: the file offset of a region is
//! the sum of the sizes of the regions before it, and the file's size is the RAM size. So a
//! guest of 4 GiB has its low 3 GiB at file offset 0 and the RAM above the MMIO gap (guest
//! address 4 GiB) at file offset 3 GiB.
//!
//! * [`write_full`] writes every page that is not all zero; the rest of the file is holes. A
//!   page of anonymous memory the guest never touched is skipped without being read (the
//!   kernel's `/proc/self/pagemap` says it is neither present nor swapped out).
//! * [`write_dirty`] writes only the pages of a [`DirtyPages`] (a diff: holes elsewhere) and
//!   returns the ranges it wrote, which [`overlay`] needs to read them back: a hole and a
//!   dirty page of zeros look the same in the file.
//! * Restore maps the file `MAP_PRIVATE` ([`crate::MemoryConfig::file`]): pages load on
//!   first touch, VMs restored from one file share the page cache, and guest writes stay in
//!   the process. [`overlay`] then reads a diff's ranges over it.
//!
//! Write a snapshot to a new file (or a temporary one renamed over the old): writing into
//! the file a running guest's memory is mapped from changes the pages the guest has not
//! written yet.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use crate::layout::PAGE_SIZE;
use crate::{DirtyPages, Error, Result};

/// Pages handled at a time: 1 MiB.
const CHUNK_PAGES: u64 = 256;

/// A byte range of a memory file (and so of guest RAM, regions concatenated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileRange {
    /// Offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What a write did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Pages written to the file.
    pub pages_written: u64,
    /// Pages read and found all zero (left as holes).
    pub pages_zero: u64,
    /// Pages never touched by anyone, skipped without reading them.
    pub pages_untouched: u64,
    /// The ranges written, in ascending order, adjacent pages joined.
    pub ranges: Vec<FileRange>,
}

impl WriteStats {
    fn written(&mut self, offset: u64, len: u64) {
        self.pages_written += len / PAGE_SIZE;
        match self.ranges.last_mut() {
            Some(last) if last.offset + last.len == offset => last.len += len,
            _ => self.ranges.push(FileRange { offset, len }),
        }
    }
}

/// The size of the memory file of `mem`: its RAM size.
pub fn file_size<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Writes every page of `mem` that is not all zero to `file` (emptied first, then sized to
/// the RAM size: holes elsewhere), and syncs it. Call it with the guest and its devices
/// paused.
pub fn write_full<B: Bitmap>(mem: &GuestMemoryMmap<B>, file: &File) -> Result<WriteStats> {
    prepare(mem, file)?;
    let mut writer = FullWriter {
        file,
        pagemap: Pagemap::open(),
        buf: vec![0u8; (CHUNK_PAGES * PAGE_SIZE) as usize],
        stats: WriteStats::default(),
    };
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let mut at = 0u64;
        while at < region.len() {
            let pages = CHUNK_PAGES.min((region.len() - at) / PAGE_SIZE);
            writer.chunk(region, at, pages, file_offset)?;
            at += pages * PAGE_SIZE;
        }
        file_offset += region.len();
    }
    sync(file)?;
    Ok(writer.stats)
}

/// The state of a [`write_full`].
struct FullWriter<'a> {
    file: &'a File,
    pagemap: Option<Pagemap>,
    buf: Vec<u8>,
    stats: WriteStats,
}

impl FullWriter<'_> {
    /// Writes the non-zero pages of `pages` pages at `at` in `region`, which starts at
    /// `file_offset` in the file.
    fn chunk<B: Bitmap>(
        &mut self,
        region: &GuestRegionMmap<B>,
        at: u64,
        pages: u64,
        file_offset: u64,
    ) -> Result<()> {
        // Only anonymous memory is zero where it was never touched; a file mapping's
        // untouched pages hold the file.
        let touched = match (&self.pagemap, region.file_offset()) {
            (Some(p), None) => p.touched(region.as_ptr() as u64 + at, pages),
            _ => None,
        };
        if touched.as_ref().is_some_and(|t| t.iter().all(|&t| !t)) {
            // Not read: reading would map the zero page everywhere.
            self.stats.pages_untouched += pages;
            return Ok(());
        }
        let chunk = &mut self.buf[..(pages * PAGE_SIZE) as usize];
        read_region(region, at, chunk)?;
        let mut runs = Vec::new();
        for (page, bytes) in (0..pages).zip(chunk.chunks_exact(PAGE_SIZE as usize)) {
            if touched.as_ref().is_some_and(|t| !t[page as usize]) {
                self.stats.pages_untouched += 1;
            } else if bytes.iter().all(|&b| b == 0) {
                self.stats.pages_zero += 1;
            } else {
                push_run(&mut runs, page);
            }
        }
        for run in runs {
            let bytes = &chunk[(run.start * PAGE_SIZE) as usize..(run.end * PAGE_SIZE) as usize];
            let offset = file_offset + at + run.start * PAGE_SIZE;
            write_at(self.file, bytes, offset)?;
            self.stats.written(offset, bytes.len() as u64);
        }
        Ok(())
    }
}

fn sync(file: &File) -> Result<()> {
    file.sync_all().map_err(|source| Error::SnapshotIo {
        what: "sync",
        offset: 0,
        source,
    })
}

/// Writes the pages of `dirty` from `mem` to `file` (emptied first, then sized to the RAM
/// size: holes elsewhere), and syncs it; the ranges written are in the returned stats, for
/// [`overlay`]. Call it with the guest and its devices paused.
pub fn write_dirty<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    file: &File,
    dirty: &DirtyPages,
) -> Result<WriteStats> {
    prepare(mem, file)?;
    let mut stats = WriteStats::default();
    let mut buf = vec![0u8; (CHUNK_PAGES * PAGE_SIZE) as usize];
    for range in dirty.file_ranges() {
        let mut offset = range.start;
        while offset < range.end {
            let len = (range.end - offset).min(CHUNK_PAGES * PAGE_SIZE);
            let chunk = &mut buf[..len as usize];
            read_file_offset(mem, offset, chunk)?;
            write_at(file, chunk, offset)?;
            stats.written(offset, len);
            offset += len;
        }
    }
    sync(file)?;
    Ok(stats)
}

/// Reads `ranges` of `file` (a diff from [`write_dirty`]) into `mem` at the same offsets.
/// Every range must lie inside the RAM and the file, checked before anything is read: the
/// ranges come from a snapshot's state file, which is not trusted. The writes go through
/// vm-memory, so with [`crate::MemoryConfig::track_dirty`] they mark their pages dirty
/// (take the dirty pages once after a restore to start clean).
pub fn overlay<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    file: &File,
    ranges: &[FileRange],
) -> Result<()> {
    let size = file_size(mem);
    let file_len = file
        .metadata()
        .map_err(|source| Error::SnapshotIo {
            what: "stat",
            offset: 0,
            source,
        })?
        .len();
    check_ranges(ranges, size.min(file_len)).map_err(|r| Error::BadRange {
        offset: r.offset,
        len: r.len,
        ram: size,
        file: file_len,
    })?;
    let mut buf = vec![0u8; (CHUNK_PAGES * PAGE_SIZE) as usize];
    for r in ranges {
        let mut offset = r.offset;
        // Checked above.
        let end = r.offset + r.len;
        while offset < end {
            let len = (end - offset).min(CHUNK_PAGES * PAGE_SIZE);
            let chunk = &mut buf[..len as usize];
            file.read_exact_at(chunk, offset)
                .map_err(|source| Error::SnapshotIo {
                    what: "read",
                    offset,
                    source,
                })?;
            write_file_offset(mem, offset, chunk)?;
            offset += len;
        }
    }
    Ok(())
}

/// The first of `ranges` that does not end within `limit` bytes, if any (for a state
/// file's validation before a restore: `limit` is the RAM size).
pub fn check_ranges(ranges: &[FileRange], limit: u64) -> std::result::Result<(), FileRange> {
    match ranges
        .iter()
        .find(|r| r.offset.checked_add(r.len).is_none_or(|end| end > limit))
    {
        Some(r) => Err(*r),
        None => Ok(()),
    }
}

/// Empties `file` and sizes it to the RAM size (all holes).
fn prepare<B: Bitmap>(mem: &GuestMemoryMmap<B>, file: &File) -> Result<()> {
    let io = |source| Error::SnapshotIo {
        what: "truncate",
        offset: 0,
        source,
    };
    file.set_len(0).map_err(io)?;
    file.set_len(file_size(mem)).map_err(io)
}

fn push_run(runs: &mut Vec<Range<u64>>, page: u64) {
    match runs.last_mut() {
        Some(last) if last.end == page => last.end += 1,
        _ => runs.push(page..page + 1),
    }
}

fn write_at(file: &File, bytes: &[u8], offset: u64) -> Result<()> {
    file.write_all_at(bytes, offset)
        .map_err(|source| Error::SnapshotIo {
            what: "write",
            offset,
            source,
        })
}

/// Copies `buf.len()` bytes of `region` from `at` into `buf`.
fn read_region<R: GuestMemoryRegion>(region: &R, at: u64, buf: &mut [u8]) -> Result<()> {
    region
        .get_slice(MemoryRegionAddress(at), buf.len())
        .map(|s| s.copy_to(buf))
        .map_err(|_| Error::OutsideRam {
            addr: region.start_addr().0 + at,
            len: buf.len() as u64,
        })?;
    Ok(())
}

/// The guest address of file offset `offset` and how many bytes of its region follow it.
fn locate<B: Bitmap>(mem: &GuestMemoryMmap<B>, offset: u64) -> Option<(GuestAddress, u64)> {
    let mut base = 0u64;
    for r in mem.iter() {
        if offset < base + r.len() {
            let within = offset - base;
            return Some((GuestAddress(r.start_addr().0 + within), r.len() - within));
        }
        base += r.len();
    }
    None
}

/// Calls `f` for each piece of the file range `offset..offset + len` that lies in one
/// region: its guest address and its place in the range.
fn for_each_piece(
    offset: u64,
    len: usize,
    mut locate_at: impl FnMut(u64) -> Option<(GuestAddress, u64)>,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<()>,
) -> Result<()> {
    let mut done = 0usize;
    while done < len {
        let at = offset + done as u64;
        let (addr, room) = locate_at(at).ok_or(Error::OutsideRam {
            addr: at,
            len: (len - done) as u64,
        })?;
        let n = room.min((len - done) as u64) as usize;
        f(addr, done..done + n)?;
        done += n;
    }
    Ok(())
}

/// Copies guest RAM at file offset `offset` into `buf` (across regions if need be).
fn read_file_offset<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    use vm_memory::Bytes;
    let len = buf.len();
    for_each_piece(
        offset,
        len,
        |at| locate(mem, at),
        |addr, piece| {
            let n = piece.len() as u64;
            mem.read_slice(&mut buf[piece], addr)
                .map_err(|_| Error::OutsideRam {
                    addr: addr.0,
                    len: n,
                })
        },
    )
}

/// Copies `buf` into guest RAM at file offset `offset` (across regions if need be).
fn write_file_offset<B: Bitmap>(mem: &GuestMemoryMmap<B>, offset: u64, buf: &[u8]) -> Result<()> {
    use vm_memory::Bytes;
    for_each_piece(
        offset,
        buf.len(),
        |at| locate(mem, at),
        |addr, piece| {
            let n = piece.len() as u64;
            mem.write_slice(&buf[piece], addr)
                .map_err(|_| Error::OutsideRam {
                    addr: addr.0,
                    len: n,
                })
        },
    )
}

/// `/proc/self/pagemap`: which pages of this process's anonymous memory were ever touched.
struct Pagemap(File);

impl Pagemap {
    /// `None` where the kernel does not offer it (the writes then read every page).
    fn open() -> Option<Self> {
        File::open("/proc/self/pagemap").ok().map(Self)
    }

    /// For each of `pages` pages from host address `host`: whether it is present or swapped
    /// out. `None` if the kernel does not answer (then every page is read).
    fn touched(&self, host: u64, pages: u64) -> Option<Vec<bool>> {
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        let mut raw = vec![0u8; (pages * 8) as usize];
        let offset = (host / PAGE_SIZE).checked_mul(8)?;
        self.0.read_exact_at(&mut raw, offset).ok()?;
        Some(
            raw.chunks_exact(8)
                .map(|e| {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(e);
                    u64::from_le_bytes(word) & (PRESENT | SWAPPED) != 0
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempfile::TempFile;

    use vm_memory::Bytes;

    use super::*;
    use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
    use crate::{create_guest_memory, Backing, MemoryConfig};

    /// A new file in the temporary directory (vmm-sys-util's `TempFile`, removed when
    /// dropped) and a handle on it.
    fn temp_file(name: &str) -> (TempFile, File) {
        let prefix = std::env::temp_dir().join(format!("vmkit-memory-test-{name}-"));
        let tmp = TempFile::new_with_prefix(prefix).unwrap();
        let file = tmp.as_file().try_clone().unwrap();
        (tmp, file)
    }

    /// Blocks the file really holds (holes hold none).
    fn allocated_bytes(file: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        file.metadata().unwrap().blocks() * 512
    }

    fn anonymous(size: u64) -> MemoryConfig {
        MemoryConfig {
            backing: Backing::Anonymous,
            ..MemoryConfig::new(size)
        }
    }

    fn from_file(size: u64, path: &std::path::Path) -> MemoryConfig {
        MemoryConfig {
            file: Some(path.to_path_buf()),
            ..anonymous(size)
        }
    }

    const HIGH: u64 = MMIO_GAP_START + (2 << 20);

    #[test]
    fn full_snapshot_restores_the_same_bytes_privately() {
        let mem = create_guest_memory(&anonymous(HIGH)).unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0xAB; 5000], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_obj(0x55u8, GuestAddress(MMIO_GAP_END + 0x1fff))
            .unwrap();
        // Touched but zero: read, and left a hole.
        mem.write_obj(0u8, GuestAddress(0x20_0000)).unwrap();
        let (tmp, file) = temp_file("full");
        let stats = write_full(&mem, &file).unwrap();
        assert_eq!(file.metadata().unwrap().len(), HIGH);
        assert_eq!(stats.pages_written, 4);
        assert_eq!(
            stats.ranges,
            vec![
                FileRange {
                    offset: 0x1000,
                    len: 0x1000
                },
                FileRange {
                    offset: 0x10_0000,
                    len: 0x2000
                },
                FileRange {
                    offset: MMIO_GAP_START + 0x1000,
                    len: 0x1000
                },
            ]
        );
        assert!(stats.pages_zero >= 1, "{stats:?}");
        // Most of the 3 GiB were never touched: skipped without reading them.
        assert!(
            stats.pages_untouched > (3 << 30) / PAGE_SIZE - 1024,
            "{stats:?}"
        );
        assert!(allocated_bytes(&file) < 1 << 20, "holes elsewhere");

        let restored = create_guest_memory(&from_file(HIGH, tmp.as_path())).unwrap();
        assert_eq!(restored.num_regions(), 2);
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0x1122_3344
        );
        let mut back = [0u8; 5000];
        restored
            .read_slice(&mut back, GuestAddress(0x10_0000))
            .unwrap();
        assert!(back.iter().all(|&b| b == 0xAB));
        assert_eq!(
            restored
                .read_obj::<u8>(GuestAddress(MMIO_GAP_END + 0x1fff))
                .unwrap(),
            0x55
        );
        assert_eq!(
            restored.read_obj::<u64>(GuestAddress(0x30_0000)).unwrap(),
            0
        );
        // The guest's writes stay in the process.
        restored
            .write_obj(0xFFFF_FFFFu32, GuestAddress(0x1000))
            .unwrap();
        let mut word = [0u8; 4];
        file.read_exact_at(&mut word, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0x1122_3344);
        // A second VM from the same file sees the file, not the first one's writes.
        let second = create_guest_memory(&from_file(HIGH, tmp.as_path())).unwrap();
        assert_eq!(
            second.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0x1122_3344
        );
    }

    #[test]
    fn a_full_snapshot_of_restored_memory_reads_every_page() {
        let mem = create_guest_memory(&anonymous(4 << 20)).unwrap();
        mem.write_obj(7u8, GuestAddress(0x3000)).unwrap();
        let (tmp, file) = temp_file("refull-a");
        write_full(&mem, &file).unwrap();
        let restored = create_guest_memory(&from_file(4 << 20, tmp.as_path())).unwrap();
        restored.write_obj(9u8, GuestAddress(0x5000)).unwrap();
        // Pages from the file are not in the page table until touched: they must still be
        // written (not taken for untouched anonymous zeros).
        let (_tmp2, file2) = temp_file("refull-b");
        let stats = write_full(&restored, &file2).unwrap();
        assert_eq!(stats.pages_untouched, 0);
        assert_eq!(
            stats.ranges,
            vec![
                FileRange {
                    offset: 0x3000,
                    len: 0x1000
                },
                FileRange {
                    offset: 0x5000,
                    len: 0x1000
                },
            ]
        );
    }

    #[test]
    fn diff_holds_exactly_the_dirty_pages_and_overlays_onto_the_base() {
        let mem = create_guest_memory(&anonymous(HIGH)).unwrap();
        mem.write_obj(1u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(2u64, GuestAddress(0x8000)).unwrap();
        let (base_path, base) = temp_file("base");
        write_full(&mem, &base).unwrap();
        // After the base: a change, a page zeroed, a page in the high region.
        mem.write_obj(3u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0u64, GuestAddress(0x8000)).unwrap();
        mem.write_obj(4u64, GuestAddress(MMIO_GAP_END)).unwrap();
        let mut dirty = DirtyPages::empty(&mem);
        dirty.mark(GuestAddress(0x1000), 8).unwrap();
        dirty.mark(GuestAddress(0x8000), 8).unwrap();
        dirty.mark(GuestAddress(MMIO_GAP_END), 8).unwrap();
        let (_diff_path, diff) = temp_file("diff");
        let stats = write_dirty(&mem, &diff, &dirty).unwrap();
        assert_eq!(stats.pages_written, 3);
        assert_eq!(
            stats.ranges,
            vec![
                FileRange {
                    offset: 0x1000,
                    len: 0x1000
                },
                FileRange {
                    offset: 0x8000,
                    len: 0x1000
                },
                FileRange {
                    offset: MMIO_GAP_START,
                    len: 0x1000
                },
            ]
        );
        assert_eq!(diff.metadata().unwrap().len(), HIGH);
        assert!(allocated_bytes(&diff) <= 64 << 10, "sparse");

        let restored = create_guest_memory(&from_file(HIGH, base_path.as_path())).unwrap();
        assert_eq!(restored.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 1);
        overlay(&restored, &diff, &stats.ranges).unwrap();
        assert_eq!(restored.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 3);
        assert_eq!(restored.read_obj::<u64>(GuestAddress(0x8000)).unwrap(), 0);
        assert_eq!(
            restored
                .read_obj::<u64>(GuestAddress(MMIO_GAP_END))
                .unwrap(),
            4
        );
    }

    #[test]
    fn hostile_ranges_and_files_are_errors() {
        let mem = create_guest_memory(&anonymous(4 << 20)).unwrap();
        let (tmp, file) = temp_file("hostile");
        write_full(&mem, &file).unwrap();
        for (offset, len) in [
            (4 << 20, 1),
            ((4 << 20) - 1, 2),
            (u64::MAX, 2),
            (1, u64::MAX),
        ] {
            let e = overlay(&mem, &file, &[FileRange { offset, len }]).unwrap_err();
            assert!(matches!(e, Error::BadRange { .. }), "{e}");
        }
        // Nothing is read when any range is bad, even after good ones.
        mem.write_obj(5u8, GuestAddress(0)).unwrap();
        let good_then_bad = [
            FileRange {
                offset: 0,
                len: 0x1000,
            },
            FileRange {
                offset: 4 << 20,
                len: 1,
            },
        ];
        assert!(overlay(&mem, &file, &good_then_bad).is_err());
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 5);
        assert_eq!(check_ranges(&good_then_bad, 4 << 20), Err(good_then_bad[1]));
        // A file shorter than its ranges.
        file.set_len(0x1000).unwrap();
        let e = overlay(
            &mem,
            &file,
            &[FileRange {
                offset: 0,
                len: 0x2000,
            }],
        )
        .unwrap_err();
        assert!(matches!(e, Error::BadRange { .. }), "{e}");
        // A memory file of another size than the RAM.
        let e = create_guest_memory(&from_file(4 << 20, tmp.as_path())).unwrap_err();
        assert!(
            matches!(e, Error::MemoryFileSize { actual: 0x1000, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("4194304 bytes of RAM"), "{e}");
        let missing = std::path::Path::new("/nonexistent/vmkit-memory");
        let e = create_guest_memory(&from_file(4 << 20, missing)).unwrap_err();
        assert!(matches!(e, Error::MemoryFile { .. }), "{e}");
        let huge = MemoryConfig {
            backing: Backing::HugePages,
            ..from_file(4 << 20, tmp.as_path())
        };
        assert!(matches!(
            create_guest_memory(&huge),
            Err(Error::HugePagesWithFile)
        ));
    }
}
