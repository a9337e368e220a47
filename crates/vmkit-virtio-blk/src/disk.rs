//! The image file: opening and validating it, `O_DIRECT` alignment, and the synchronous
//! operations both engines share (discard, write zeroes).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::request::SECTOR_SIZE;
use crate::{DiskSource, Error};

/// Buffer and offset alignment assumed for `O_DIRECT` when `statx` does not report it.
pub const DEFAULT_DIRECT_ALIGN: u32 = 4096;

/// How to open a [`Disk`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Use `O_DIRECT` for aligned transfers.
    pub direct: bool,
    /// The size must be a multiple of this (512, or the configured block size).
    pub block_size: u32,
    /// Take an advisory lock on the image (see [`Disk::open`]).
    pub lock: bool,
}

/// An opened, validated image, shared by the device and its engine.
#[derive(Debug)]
pub struct Disk {
    /// The file the data path uses (`O_DIRECT` when direct).
    file: File,
    /// With `O_DIRECT`: the same file without it, for requests whose buffers are not
    /// aligned (see the README: misaligned requests fall back to the page cache).
    buffered: Option<File>,
    /// `O_DIRECT` memory and offset alignment (1 when not direct).
    align: u32,
    size: u64,
    read_only: bool,
    /// A duplicate of the descriptor holding the advisory lock (the lock belongs to its open
    /// file description and lives as long as any descriptor of it), shared by a [`Disk`]
    /// reopened on the same file ([`Disk::reopen`]). `None` with `lock: false`.
    lock: Option<Arc<File>>,
    /// `(st_dev, st_ino)` of the image: tells a reopen of the same file.
    id: (u64, u64),
}

impl Disk {
    /// Opens and validates the image: it exists, is a regular file or a block device, is
    /// writable unless `read_only`, is a non-zero multiple of `block_size` bytes.
    ///
    /// With `options.lock`, takes a non-blocking advisory lock on the whole image, as QEMU
    /// and Cloud Hypervisor do: shared (`F_RDLCK`) when `read_only`, exclusive (`F_WRLCK`)
    /// otherwise, an open file description lock (`F_OFD_SETLK`) released when the [`Disk`]
    /// is dropped. An image another [`Disk`] (in this process or another) holds
    /// incompatibly is [`Error::Locked`].
    pub fn open(source: DiskSource, options: DiskOptions) -> Result<Self, Error> {
        Self::open_with(source, options, None)
    }

    /// As [`open`](Self::open), for an image that replaces `current`: when both are the same
    /// file, the new [`Disk`] shares `current`'s lock instead of conflicting with it (so a
    /// device can be handed the image it already serves, resized say). A different file is
    /// locked before `current` is let go of.
    pub fn reopen(source: DiskSource, options: DiskOptions, current: &Disk) -> Result<Self, Error> {
        Self::open_with(source, options, Some(current))
    }

    fn open_with(
        source: DiskSource,
        options: DiskOptions,
        current: Option<&Disk>,
    ) -> Result<Self, Error> {
        let DiskOptions {
            read_only,
            direct,
            block_size,
            lock,
        } = options;
        let (file, path) = match source {
            DiskSource::Path(path) => (open_path(&path, read_only, false)?, path),
            DiskSource::File(shared) => {
                let path = PathBuf::from(format!("/proc/self/fd/{}", shared.as_raw_fd()));
                // Ours if the configuration let go of it, else a duplicate descriptor.
                let file = std::sync::Arc::try_unwrap(shared)
                    .or_else(|shared| shared.try_clone())
                    .map_err(|source| Error::Open {
                        path: path.clone(),
                        source,
                    })?;
                (file, path)
            }
        };
        let meta = file.metadata().map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(Error::IsDirectory(path));
        }
        if !ft.is_file() && !ft.is_block_device() {
            return Err(Error::NotAFile(path));
        }
        // The access mode of a file handed in.
        // SAFETY: F_GETFL on a descriptor we own reads its flags; no memory is involved.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(Error::Open {
                path,
                source: io::Error::last_os_error(),
            });
        }
        if !read_only && flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(Error::NotWritable {
                path,
                source: io::Error::from_raw_os_error(libc::EBADF),
            });
        }
        let id = (meta.dev(), meta.ino());
        let lock = match current {
            Some(cur) if lock && cur.id == id && cur.read_only == read_only => cur.lock.clone(),
            _ if lock => Some(Arc::new(lock_image(&file, &path, read_only)?)),
            _ => None,
        };
        let size = file_size(&file).map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        if size == 0 {
            return Err(Error::Empty(path));
        }
        if !size.is_multiple_of(u64::from(block_size)) {
            return Err(Error::SizeNotMultiple {
                path,
                size,
                block_size,
            });
        }
        let (file, buffered, align) = if direct {
            // The data path gets O_DIRECT (a reopen, so a handed-in file keeps its flags);
            // the original stays as the buffered fallback.
            let direct_file = open_path(&path, read_only, true)?;
            let align = direct_alignment(&direct_file).max(SECTOR_SIZE as u32);
            (direct_file, Some(file), align)
        } else {
            (file, None, 1)
        };
        Ok(Self {
            file,
            buffered,
            align,
            size,
            read_only,
            lock,
            id,
        })
    }

    /// Whether this [`Disk`] holds an advisory lock on its image.
    pub fn locked(&self) -> bool {
        self.lock.is_some()
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the data path uses `O_DIRECT`.
    pub fn direct(&self) -> bool {
        self.buffered.is_some()
    }

    /// The `O_DIRECT` alignment (1 when not direct).
    pub fn direct_align(&self) -> u32 {
        self.align
    }

    /// The descriptor for a transfer at `offset` with these `(address, length)` buffers:
    /// the `O_DIRECT` one if everything is aligned, else the buffered one.
    pub(crate) fn fd_for(
        &self,
        offset: u64,
        buffers: impl Iterator<Item = (usize, usize)>,
    ) -> RawFd {
        match &self.buffered {
            None => self.file.as_raw_fd(),
            Some(buffered) => {
                let a = self.align as usize;
                let aligned = offset.is_multiple_of(u64::from(self.align))
                    && buffers
                        .into_iter()
                        .all(|(addr, len)| addr.is_multiple_of(a) && len.is_multiple_of(a));
                if aligned {
                    self.file.as_raw_fd()
                } else {
                    buffered.as_raw_fd()
                }
            }
        }
    }

    /// The descriptor for operations without buffers (flush, fallocate).
    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// `fdatasync(2)`, retried on `EINTR`.
    pub fn datasync(&self) -> io::Result<()> {
        loop {
            // SAFETY: fdatasync on a descriptor we own; no memory is involved.
            if unsafe { libc::fdatasync(self.fd()) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        loop {
            // SAFETY: fallocate on a descriptor we own; no memory is involved.
            if unsafe { libc::fallocate(self.fd(), mode, off, len) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// DISCARD of `len` bytes at `offset`: a hole punch (`PUNCH_HOLE | KEEP_SIZE`). Discard
    /// is advisory: a file system without hole punching answers OK with nothing done.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if is_unsupported(&e) => Ok(()),
            r => r,
        }
    }

    /// WRITE_ZEROES of `len` bytes at `offset`: a hole punch when `unmap` is allowed, else
    /// `ZERO_RANGE | KEEP_SIZE`; when the file system supports neither, zeros are written.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(first, offset, len) {
            Err(e) if is_unsupported(&e) => {}
            r => return r,
        }
        if unmap {
            match self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if is_unsupported(&e) => {}
                r => return r,
            }
        }
        self.write_zero_bytes(offset, len)
    }

    /// Writes zeros with `pwrite` (through the buffered descriptor under `O_DIRECT`).
    fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: usize = 64 * 1024;
        let zeros = vec![0u8; CHUNK];
        let fd = self.buffered.as_ref().map_or(self.fd(), |f| f.as_raw_fd());
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let off = libc::off_t::try_from(offset + done)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: `zeros` is a live buffer of at least `n` bytes, only read by pwrite.
            let r = unsafe { libc::pwrite(fd, zeros.as_ptr().cast(), n, off) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            done += r as u64;
        }
        Ok(())
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// Takes the advisory lock on `file` (see [`Disk::open`]); returns a duplicate of `file`'s
/// descriptor that keeps it.
fn lock_image(file: &File, path: &Path, read_only: bool) -> Result<File, Error> {
    let kind = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    };
    // The whole file (length 0: to the end, however it grows).
    let request = libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0, // must be 0 for OFD locks
    };
    // SAFETY: F_OFD_SETLK on a descriptor we own reads the `flock` struct, which lives for
    // the call; it does not block.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &request) };
    if r != 0 {
        let source = io::Error::last_os_error();
        let path = path.to_path_buf();
        return Err(match source.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Error::Locked(path),
            _ => Error::Lock { path, source },
        });
    }
    file.try_clone().map_err(|source| Error::Lock {
        path: path.to_path_buf(),
        source,
    })
}

fn open_path(path: &Path, read_only: bool, direct: bool) -> Result<File, Error> {
    let mut o = OpenOptions::new();
    o.read(true).write(!read_only);
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    o.custom_flags(flags);
    o.open(path).map_err(|source| {
        let path = path.to_path_buf();
        match source.raw_os_error() {
            Some(libc::ENOENT) => Error::NotFound(path),
            Some(libc::EISDIR) => Error::IsDirectory(path),
            Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM) if !read_only => {
                Error::NotWritable { path, source }
            }
            Some(libc::EINVAL) if direct => Error::DirectUnsupported { path, source },
            _ => Error::Open { path, source },
        }
    })
}

/// The size of a regular file or block device.
fn file_size(file: &File) -> io::Result<u64> {
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end as u64)
}

/// `O_DIRECT` alignment from `statx(STATX_DIOALIGN)` (Linux 6.1+), else the default.
fn direct_alignment(file: &File) -> u32 {
    // SAFETY: an all-zero `statx` is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `stx` is a live, writable `statx` the kernel fills; the path is a valid
    // NUL-terminated empty string used with AT_EMPTY_PATH on a descriptor we own.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        let a = stx.stx_dio_mem_align.max(stx.stx_dio_offset_align);
        if a.is_power_of_two() {
            return a;
        }
    }
    DEFAULT_DIRECT_ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_requests_use_o_direct_only_when_aligned() {
        let path = std::env::temp_dir().join(format!("vmkit-blk-disk-{}.img", std::process::id()));
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let options = DiskOptions {
            read_only: false,
            direct: true,
            block_size: 512,
            lock: true,
        };
        let disk = match Disk::open(DiskSource::Path(path.clone()), options) {
            Ok(d) => d,
            Err(Error::DirectUnsupported { .. }) => {
                let _ = std::fs::remove_file(&path);
                return; // a file system without O_DIRECT
            }
            Err(e) => panic!("{e}"),
        };
        let a = disk.direct_align() as usize;
        let direct = disk.fd();
        // SAFETY: F_GETFL on a descriptor the disk owns.
        let flags = unsafe { libc::fcntl(direct, libc::F_GETFL) };
        assert_ne!(flags & libc::O_DIRECT, 0);
        assert_eq!(disk.fd_for(0, [(a, a), (4 * a, 2 * a)].into_iter()), direct);
        assert_ne!(disk.fd_for(0, [(a + 1, a)].into_iter()), direct);
        assert_ne!(disk.fd_for(0, [(a, a + a / 2)].into_iter()), direct);
        assert_ne!(disk.fd_for(a as u64 / 2, [(a, a)].into_iter()), direct);
        let _ = std::fs::remove_file(&path);
    }

    fn image(name: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("vmkit-blk-lock-{name}-{}.img", std::process::id()));
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        path
    }

    fn open(path: &Path, read_only: bool, lock: bool) -> Result<Disk, Error> {
        let options = DiskOptions {
            read_only,
            direct: false,
            block_size: 512,
            lock,
        };
        Disk::open(DiskSource::Path(path.to_path_buf()), options)
    }

    // Two opens in one process are two open file descriptions, so OFD locks conflict
    // between them exactly as between two processes (POSIX `F_SETLK` locks would not).
    #[test]
    fn a_writer_excludes_everyone_until_dropped() {
        let path = image("writer");
        let writer = open(&path, false, true).unwrap();
        assert!(writer.locked());
        for read_only in [false, true] {
            match open(&path, read_only, true) {
                Err(e @ Error::Locked(_)) => assert_eq!(
                    e.to_string(),
                    format!(
                        "disk image {} is in use by another process (locked)",
                        path.display()
                    )
                ),
                other => panic!("read_only={read_only}: {other:?}"),
            }
        }
        // lock=off skips it.
        let unlocked = open(&path, false, false).unwrap();
        assert!(!unlocked.locked());
        drop(writer);
        let again = open(&path, false, true).unwrap();
        drop(again);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn readers_share_and_exclude_a_writer() {
        let path = image("readers");
        let a = open(&path, true, true).unwrap();
        let b = open(&path, true, true).unwrap();
        assert!(matches!(open(&path, false, true), Err(Error::Locked(_))));
        drop(a);
        assert!(matches!(open(&path, false, true), Err(Error::Locked(_))));
        drop(b);
        open(&path, false, true).unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_handed_in_file_is_locked_too() {
        let path = image("fd");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let options = DiskOptions {
            read_only: false,
            direct: false,
            block_size: 512,
            lock: true,
        };
        let d = Disk::open(DiskSource::File(Arc::new(f)), options).unwrap();
        assert!(matches!(open(&path, true, true), Err(Error::Locked(_))));
        drop(d);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn reopen_shares_the_lock_of_the_same_file_only() {
        let (a, b) = (image("reopen-a"), image("reopen-b"));
        let options = DiskOptions {
            read_only: false,
            direct: false,
            block_size: 512,
            lock: true,
        };
        let first = open(&a, false, true).unwrap();
        // The same file: the lock is shared, and outlives the first disk.
        let same = Disk::reopen(DiskSource::Path(a.clone()), options, &first).unwrap();
        drop(first);
        assert!(matches!(open(&a, true, true), Err(Error::Locked(_))));
        // Another file someone else holds: refused, the current one kept.
        let other = open(&b, true, true).unwrap();
        let r = Disk::reopen(DiskSource::Path(b.clone()), options, &same);
        assert!(matches!(r, Err(Error::Locked(p)) if p == b));
        drop(other);
        let swapped = Disk::reopen(DiskSource::Path(b.clone()), options, &same).unwrap();
        drop(same);
        open(&a, false, true).unwrap(); // released with the last disk on it
        assert!(matches!(open(&b, true, true), Err(Error::Locked(_))));
        drop(swapped);
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
    }
}
