//! What the integration tests share: temporary images, a device on one, and an event
//! thread that processes io_uring completions as a VMM's event loop would.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, SubscriberOps};
use vmkit_virtio::{QueueEventHandler, VirtioDevice};
use vmkit_virtio_blk::{Block, BlockConfig, EngineKind};

/// A file in the temporary directory, removed on drop.
pub struct TempImage(pub PathBuf);

impl TempImage {
    /// An image of `size` bytes of zeros (sparse).
    pub fn new(size: u64) -> Self {
        let img = Self::path();
        File::create(&img.0).unwrap().set_len(size).unwrap();
        img
    }

    /// A fresh path, nothing created.
    pub fn path() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        Self(std::env::temp_dir().join(format!(
            "vmkit-blk-test-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        )))
    }

    /// An image filled with `byte`.
    pub fn filled(size: u64, byte: u8) -> Self {
        let img = Self::path();
        let mut f = File::create(&img.0).unwrap();
        f.write_all(&vec![byte; size as usize]).unwrap();
        img
    }

    /// An image of `size` bytes holding test pattern `seed` ([`sectors`]).
    pub fn patterned(size: u64, seed: u8) -> Self {
        let img = Self::path();
        let mut f = File::create(&img.0).unwrap();
        f.write_all(&sectors(seed, 0, size as usize)).unwrap();
        img
    }

    pub fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = File::open(&self.0).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).unwrap();
        buf
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub const ENGINES: [EngineKind; 2] = [EngineKind::Sync, EngineKind::IoUring];

/// A device on `img`, configured by `f`.
pub fn block(
    img: &TempImage,
    engine: EngineKind,
    f: impl FnOnce(&mut BlockConfig),
) -> Arc<Mutex<Block>> {
    let mut config = BlockConfig::new(&img.0);
    config.engine = engine;
    f(&mut config);
    Arc::new(Mutex::new(Block::new(config).unwrap()))
}

/// The VMM's event thread, for completions: an event manager running a
/// `QueueEventHandler` that watches only the device's own eventfds
/// (`VirtioDevice::device_events`) — what the transport's handler also does in a VMM.
pub struct Pump {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Pump {
    pub fn start(dev: &Arc<Mutex<Block>>) -> Self {
        let events = dev.lock().unwrap().device_events().unwrap();
        let device: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
        let handler = QueueEventHandler::new(device, Vec::new()).with_device_events(events);
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut em = EventManager::<QueueEventHandler>::new().unwrap();
            em.add_subscriber(handler);
            while !s.load(Ordering::SeqCst) {
                em.run_with_timeout(10).unwrap();
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// The byte at `i` of sector `sector` in test pattern `seed`.
pub fn pattern(seed: u8, sector: u64, i: usize) -> u8 {
    (sector.wrapping_mul(31) as u8) ^ (i as u8).wrapping_mul(7) ^ seed ^ ((i >> 8) as u8)
}

pub fn sectors(seed: u8, first: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| pattern(seed, first + (i / 512) as u64, i % 512))
        .collect()
}

/// Waits (at most 10 s) until `dev` has nothing in flight, completing what the engine
/// finishes as the VMM's event loop would: the completion eventfd, then
/// `process_completions`.
pub fn settle<M: vmkit_virtio::MappedMemory>(dev: &mut Block<M>) {
    use std::os::unix::io::AsRawFd;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while dev.in_flight() > 0 {
        assert!(std::time::Instant::now() < deadline, "I/O never completed");
        let fd = dev
            .completion_fd()
            .expect("an engine with I/O in flight has one");
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, 1000) };
        let _ = fd.read();
        dev.process_completions();
    }
}

/// Reads of 4 KiB each (8 sectors apart) submitted through virtio-drivers' non-blocking API
/// and not waited for, with the buffers they complete into.
pub struct ReadsInFlight {
    reqs: Vec<virtio_drivers::device::blk::BlkReq>,
    resps: Vec<virtio_drivers::device::blk::BlkResp>,
    bufs: Vec<Vec<u8>>,
    tokens: Vec<u16>,
}

impl ReadsInFlight {
    /// Submits `n` reads on `drv`.
    pub fn submit<H: virtio_drivers::Hal, T: virtio_drivers::transport::Transport>(
        drv: &mut virtio_drivers::device::blk::VirtIOBlk<H, T>,
        n: usize,
    ) -> Self {
        use virtio_drivers::device::blk::{BlkReq, BlkResp};
        let mut this = Self {
            reqs: (0..n).map(|_| BlkReq::default()).collect(),
            resps: (0..n).map(|_| BlkResp::default()).collect(),
            bufs: (0..n).map(|_| vec![0u8; 4096]).collect(),
            tokens: Vec::new(),
        };
        for i in 0..n {
            let (req, buf, resp) = (&mut this.reqs[i], &mut this.bufs[i], &mut this.resps[i]);
            // SAFETY: the request, buffer and response are heap elements of vectors that are
            // never resized and live in `this` until `complete_all`; nothing touches them
            // before.
            let t = unsafe { drv.read_blocks_nb(i * 8, req, buf, resp) }.unwrap();
            this.tokens.push(t);
        }
        this
    }

    /// Takes every completion from the used ring (they must all be there) and checks each
    /// read succeeded with 4 KiB of `byte`.
    pub fn complete_all<H: virtio_drivers::Hal, T: virtio_drivers::transport::Transport>(
        mut self,
        drv: &mut virtio_drivers::device::blk::VirtIOBlk<H, T>,
        byte: u8,
    ) {
        use virtio_drivers::device::blk::RespStatus;
        for _ in 0..self.tokens.len() {
            let t = drv.peek_used().expect("every request completed");
            let i = self.tokens.iter().position(|x| *x == t).unwrap();
            let (req, buf, resp) = (&self.reqs[i], &mut self.bufs[i], &mut self.resps[i]);
            // SAFETY: the same buffers as given to read_blocks_nb.
            unsafe { drv.complete_read_blocks(t, req, buf, resp) }.unwrap();
            assert_eq!(self.resps[i].status(), RespStatus::OK);
            assert_eq!(self.bufs[i], vec![byte; 4096], "request {i}");
        }
    }
}

/// A device on `config` with `features`, activated on the mock queue `vq` as queue 0, its
/// used ring at `used` (a device driven by hand, without a transport).
pub fn activated_on_mock(
    mem: &vm_memory::GuestMemoryMmap,
    vq: &virtio_queue::mock::MockSplitQueue<vm_memory::GuestMemoryMmap>,
    used: u64,
    features: u64,
    config: BlockConfig,
) -> Block {
    use virtio_queue::Queue;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let mut queue: Queue = vq.create_queue().unwrap();
    queue
        .try_set_used_ring_address(vm_memory::GuestAddress(used))
        .unwrap();
    let ctx = vmkit_virtio::ActivateContext::new(
        mem.clone(),
        features,
        vec![(0, queue, EventFd::new(EFD_NONBLOCK).unwrap())],
        vmkit_virtio::test_utils::RecordingInterrupt::new(),
        vmkit_virtio::NeedsReset::new(),
    );
    let mut dev = Block::new(config).unwrap();
    dev.ack_features(features);
    dev.activate(ctx).unwrap();
    dev
}
