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

/// A device a transport target puts under test.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DutKind {
    /// virtio-rng.
    Rng,
    /// virtio-console.
    Console,
    /// virtio-blk on a 64-sector memfd disk.
    Blk(Engine),
    /// virtio-net on a backend that records what the device sends (and has nothing to
    /// receive: `net_queues` covers the receive path).
    Net,
}

/// A virtio-net backend recording the length of every frame sent (header included).
#[derive(Debug, Clone, Default)]
pub struct RecordingNet(pub Arc<Mutex<Vec<usize>>>);

impl vmkit_virtio_net::NetBackend for RecordingNet {
    unsafe fn recv(&mut self, _iov: &[libc::iovec]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::WouldBlock.into())
    }

    unsafe fn send(&mut self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        let max = vmkit_virtio_net::NET_HDR_LEN + vmkit_virtio_net::MAX_FRAME_LEN;
        assert!(
            (vmkit_virtio_net::NET_HDR_LEN..=max).contains(&len),
            "net: a {len}-byte frame handed to the backend"
        );
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(len);
        Ok(len)
    }

    fn supported_offloads(&self) -> vmkit_virtio_net::Offloads {
        vmkit_virtio_net::Offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
    }

    fn set_offloads(&mut self, _: vmkit_virtio_net::Offloads) -> std::io::Result<()> {
        Ok(())
    }

    fn readable_fd(&self) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
        Ok(None)
    }
}

/// The sector count of a [`Dut`]'s blk disk.
pub const DUT_SECTORS: u64 = 64;

/// A device under test, as a VMM puts it on a transport.
pub struct Dut {
    /// Which device.
    pub kind: DutKind,
    /// The device.
    pub device: Arc<Mutex<dyn vmkit_virtio::VirtioDevice>>,
    /// The console's output.
    pub output: SharedOutput,
    /// The blk disk.
    pub disk: Option<File>,
    /// The net backend's record of frames sent.
    pub sent: RecordingNet,
}

/// A legitimate request: where it goes and how to judge the answer.
#[derive(Debug, Clone)]
pub struct Legit {
    /// The queue.
    pub queue: u16,
    /// Its buffers (contents written).
    pub bufs: Vec<crate::ring::Buf>,
}

const LEGIT_TEXT: &[u8] = b"vmkit-fuzz: still here\n";

impl Dut {
    /// Builds `kind`; `None` when the host cannot (io_uring unavailable).
    pub fn build(kind: DutKind) -> Option<Self> {
        let output = SharedOutput::default();
        let sent = RecordingNet::default();
        let mut disk = None;
        let device: Arc<Mutex<dyn vmkit_virtio::VirtioDevice>> = match kind {
            DutKind::Rng => Arc::new(Mutex::new(
                vmkit_virtio_rng::Rng::new(vmkit_virtio_rng::RngConfig::default()).ok()?,
            )),
            DutKind::Console => Arc::new(Mutex::new(
                vmkit_virtio_console::Console::new(vmkit_virtio_console::ConsoleConfig::new(
                    Box::new(output.clone()),
                ))
                .ok()?,
            )),
            DutKind::Blk(engine) => {
                let f = memfd_disk(DUT_SECTORS);
                let mut config = vmkit_virtio_blk::BlockConfig::new(f.try_clone().ok()?);
                config.engine = engine.into();
                config.queue_size = 16;
                disk = Some(f);
                Arc::new(Mutex::new(vmkit_virtio_blk::Block::new(config).ok()?))
            }
            DutKind::Net => {
                let mut config = vmkit_virtio_net::NetConfig::new(vec![Box::new(sent.clone())]);
                config.queue_size = 16;
                Arc::new(Mutex::new(vmkit_virtio_net::Net::new(config).ok()?))
            }
        };
        Some(Self {
            kind,
            device,
            output,
            disk,
            sent,
        })
    }

    /// The device type.
    pub fn device_type(&self) -> u32 {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device_type()
    }

    /// Lays out a legitimate request's buffers in `g` (from `alloc`).
    pub fn legit(&self, g: &crate::guest::Guest, alloc: &mut crate::ring::Alloc) -> Legit {
        use crate::ring::Buf;
        let mut placed = |content: &[u8], writable: bool| {
            let addr = alloc.take(content.len() as u32);
            g.write(addr, content);
            Buf {
                addr: Some(addr),
                len: content.len() as u32,
                writable,
            }
        };
        match self.kind {
            DutKind::Rng => Legit {
                queue: 0,
                bufs: vec![placed(&[0u8; 64], true)],
            },
            DutKind::Console => Legit {
                queue: 1,
                bufs: vec![placed(LEGIT_TEXT, false)],
            },
            DutKind::Net => {
                // A 12-byte virtio-net header (no offloads) and a 60-byte frame.
                let mut frame = vec![0u8; vmkit_virtio_net::NET_HDR_LEN + 60];
                frame[vmkit_virtio_net::NET_HDR_LEN..][..6].fill(0xFF);
                self.sent
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
                Legit {
                    queue: 1,
                    bufs: vec![placed(&frame, false)],
                }
            }
            DutKind::Blk(_) => {
                let mut header = [0u8; 16];
                header[8..].copy_from_slice(&1u64.to_le_bytes()); // IN, sector 1
                Legit {
                    queue: 0,
                    bufs: vec![
                        placed(&header, false),
                        placed(&[0u8; 512], true),
                        placed(&[0xEE], true),
                    ],
                }
            }
        }
    }

    /// Panics unless `len` and guest memory show `legit` served correctly.
    pub fn check_legit(&self, g: &crate::guest::Guest, legit: &Legit, len: u32) {
        match self.kind {
            DutKind::Rng => assert!(
                (1..=64).contains(&len),
                "rng: a 64-byte request after a reset got {len} bytes"
            ),
            DutKind::Console => {
                let out = self.output.0.lock().unwrap_or_else(|e| e.into_inner());
                assert!(
                    out.ends_with(LEGIT_TEXT),
                    "console: the line sent after a reset did not reach the output"
                );
            }
            DutKind::Net => {
                let sent = self.sent.0.lock().unwrap_or_else(|e| e.into_inner());
                assert_eq!(
                    *sent,
                    [vmkit_virtio_net::NET_HDR_LEN + 60],
                    "net: the frame sent after a reset did not reach the backend as sent"
                );
                assert_eq!(len, 0, "net: used length of a transmit chain");
            }
            DutKind::Blk(_) => {
                let mut data = vec![0u8; 512];
                g.mem_read(legit.bufs[1].addr.unwrap_or(0), &mut data);
                let status = g.read_u8(legit.bufs[2].addr.unwrap_or(0));
                assert_eq!(status, 0, "blk: a read after a reset got status {status}");
                assert!(
                    data.iter().all(|b| *b == 1 ^ 0x5A),
                    "blk: a read of sector 1 after a reset returned other data"
                );
                assert_eq!(len, 513, "blk: used length of a 512-byte read");
            }
        }
    }
}
