//! Durability, ordered: a FLUSH (and, when the driver did not negotiate FLUSH, every
//! write) reaches the used ring only after the engine's `fdatasync` returned, on both
//! engines. An [`IoObserver`] records each transfer and sync together with the used ring's
//! index at that moment, so a sync that is skipped (no record) or that comes after the
//! completion (the index already moved) fails the test.
//!
//! What this cannot see is whether the sync really reached the disk (that `fdatasync` was
//! called at all, not merely reported): the VMM's `flush_is_an_fdatasync_before_the_guest_sees_it`
//! test watches the system call from outside.

mod common;

use std::io;
use std::sync::{Arc, Mutex};

use common::{TempImage, ENGINES};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::{VirtioDevice, FEATURE_VERSION_1};
use vmkit_virtio_blk::request::{S_OK, T_FLUSH, T_OUT};
use vmkit_virtio_blk::{Block, BlockConfig, EngineKind, IoObserver};

const USED: u64 = 0x1000;
const HEADER: u64 = 0x2_0000;
const DATA: u64 = 0x4_0000;
const STATUS: u64 = 0x6_0000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The data moved: `(token, used index then)`.
    Transferred(u64, u16),
    /// The sync returned OK: `(token, used index then)`.
    Synced(u64, u16),
}

/// Records the engine's steps with the used ring's index at each.
#[derive(Debug)]
struct Recorder {
    memory: GuestMemoryMmap,
    steps: Mutex<Vec<Step>>,
}

impl Recorder {
    fn used_idx(&self) -> u16 {
        self.memory.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn take(&self) -> Vec<Step> {
        std::mem::take(&mut self.steps.lock().unwrap())
    }
}

impl IoObserver for Recorder {
    fn transferred(&self, token: u64) {
        let idx = self.used_idx();
        self.steps
            .lock()
            .unwrap()
            .push(Step::Transferred(token, idx));
    }

    fn synced(&self, token: u64, result: &io::Result<()>) {
        assert!(result.is_ok(), "fdatasync: {result:?}");
        let idx = self.used_idx();
        self.steps.lock().unwrap().push(Step::Synced(token, idx));
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// A device on `engine` with the driver's `features`, its queue, and the recorder.
struct Setup {
    mem: GuestMemoryMmap,
    vq: MockSplitQueue<'static, GuestMemoryMmap>,
    dev: Block,
    rec: Arc<Recorder>,
    /// The next free descriptor.
    next: u16,
    _img: TempImage,
}

impl Setup {
    fn new(engine: EngineKind, features: u64) -> Self {
        // Leaked: the mock queue borrows the memory for the whole test.
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        ));
        let img = TempImage::filled(1 << 20, 0);
        let vq = MockSplitQueue::new(mem, 16);
        let rec = Arc::new(Recorder {
            memory: mem.clone(),
            steps: Mutex::new(Vec::new()),
        });
        let mut config = BlockConfig::new(&img.0);
        config.engine = engine;
        config.observer = rec.clone();
        let dev = common::activated_on_mock(mem, &vq, USED, features, config);
        Setup {
            mem: mem.clone(),
            vq,
            dev,
            rec,
            next: 0,
            _img: img,
        }
    }

    /// Offers a request of `kind` with `data` (driver-readable) at sector 8, runs it to its
    /// completion, and returns its status.
    fn request(&mut self, kind: u32, data: Option<&[u8]>, slot: u64) -> u8 {
        let (header, status) = (HEADER + slot * 0x100, STATUS + slot * 0x100);
        self.mem.write_obj(kind, GuestAddress(header)).unwrap();
        self.mem.write_obj(8u64, GuestAddress(header + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let (next, first) = (VRING_DESC_F_NEXT as u16, self.next);
        let mut chain = vec![desc(header, 16, next, first + 1)];
        if let Some(d) = data {
            self.mem.write_slice(d, GuestAddress(DATA)).unwrap();
            chain.push(desc(DATA, d.len() as u32, next, first + 2));
        }
        chain.push(desc(status, 1, VRING_DESC_F_WRITE as u16, 0));
        self.vq.add_desc_chains(&chain, self.next).unwrap();
        self.next += chain.len() as u16;
        self.dev.process_queue(0);
        common::settle(&mut self.dev);
        self.mem.read_obj(GuestAddress(status)).unwrap()
    }
}

#[test]
fn flush_completes_only_after_its_sync_returned() {
    for engine in ENGINES {
        let mut s = Setup::new(engine, FEATURE_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH);
        // Write-back: the write completes with no sync of its own.
        assert_eq!(s.request(T_OUT, Some(&[0xab; 512]), 0), S_OK);
        let write = s.rec.take();
        assert!(
            matches!(write[..], [Step::Transferred(_, 0)]),
            "{engine:?}: {write:?}"
        );
        assert_eq!(s.rec.used_idx(), 1);
        // The FLUSH: its sync returned while the used ring still held only the write.
        assert_eq!(s.request(T_FLUSH, None, 1), S_OK);
        let flush = s.rec.take();
        assert!(
            matches!(flush[..], [Step::Synced(_, 1)]),
            "{engine:?}: the FLUSH completed before (or without) its sync: {flush:?}"
        );
        assert_eq!(s.rec.used_idx(), 2, "{engine:?}: the FLUSH completed");
        assert_eq!(s.dev.stats().flushes, 1);
    }
}

#[test]
fn without_flush_each_write_completes_only_after_its_sync_returned() {
    for engine in ENGINES {
        // The driver did not negotiate FLUSH: write-through.
        let mut s = Setup::new(engine, FEATURE_VERSION_1);
        assert_eq!(s.request(T_OUT, Some(&[0xcd; 4096]), 0), S_OK);
        let steps = s.rec.take();
        match steps[..] {
            [Step::Transferred(a, 0), Step::Synced(b, 0)] => assert_eq!(a, b, "{engine:?}"),
            _ => {
                panic!("{engine:?}: the write did not complete after transfer then sync: {steps:?}")
            }
        }
        assert_eq!(s.rec.used_idx(), 1, "{engine:?}: the write completed");
        assert_eq!(s.dev.stats().writes, 1);
    }
}
