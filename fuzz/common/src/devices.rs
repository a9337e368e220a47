//! The devices under test, built as a VMM builds them, and what the harnesses share
//! around them: a recording interrupt, a memfd disk, a shared output buffer.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use vmkit_virtio::{InterruptReason, VirtioInterrupt};

/// Counts the interrupts a device raises: queue interrupts and configuration changes
/// (`DEVICE_NEEDS_RESET` raises one).
#[derive(Debug, Default)]
pub struct Irq {
    /// Queue interrupts.
    pub queue: AtomicU64,
    /// Configuration interrupts.
    pub config: AtomicU64,
}

impl VirtioInterrupt for Irq {
    fn trigger(&self, reason: InterruptReason) -> std::io::Result<()> {
        match reason {
            InterruptReason::Queue(_) => self.queue.fetch_add(1, Ordering::Relaxed),
            _ => self.config.fetch_add(1, Ordering::Relaxed),
        };
        Ok(())
    }
}

/// A disk image in a memfd: `sectors` sectors of 512 bytes, sector `i` filled with byte
/// `i as u8 ^ 0x5A` (so a read of the wrong sector shows).
pub fn memfd_disk(sectors: u64) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new file
    // descriptor or -1, checked below before the fd is owned.
    let fd = unsafe { libc::memfd_create(c"vmkit-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a descriptor memfd_create just returned, owned by nothing else.
    let mut f = unsafe { File::from_raw_fd(fd) };
    let mut image = Vec::with_capacity((sectors * 512) as usize);
    for i in 0..sectors {
        image.extend_from_slice(&[i as u8 ^ 0x5A; 512]);
    }
    f.write_all(&image).expect("write the memfd disk");
    f.seek(SeekFrom::Start(0)).expect("seek the memfd disk");
    f
}

/// The disk's contents now.
pub fn disk_contents(f: &File, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, 0).expect("read the memfd disk");
    v
}

/// A `Write` the harness can read back.
#[derive(Debug, Clone, Default)]
pub struct SharedOutput(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The block engine a run uses.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `preadv`/`pwritev` on the calling thread.
    Sync,
    /// io_uring.
    IoUring,
}

impl From<Engine> for vmkit_virtio_blk::EngineKind {
    fn from(e: Engine) -> Self {
        match e {
            Engine::Sync => Self::Sync,
            Engine::IoUring => Self::IoUring,
        }
    }
}
