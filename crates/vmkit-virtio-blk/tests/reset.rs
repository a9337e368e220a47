//! A reset with I/O in flight returns at once, and what was in flight never reaches the
//! rings: on an engine that holds each operation until the test lets it finish (so the
//! ordering is the test's, not the disk's), and on io_uring with `O_DIRECT` reads.

mod common;

use std::io;
use std::sync::{Arc, Mutex};

use common::{Pump, ReadsInFlight, TempImage};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::test_utils::{GuestHal, Harness, RecordingInterrupt};
use vmkit_virtio::{ActivateContext, NeedsReset, VirtioDevice, FEATURE_VERSION_1};
use vmkit_virtio_blk::request::{S_OK, T_IN};
use vmkit_virtio_blk::{Block, BlockConfig, BlockEngine, BlockOp, Completion, EngineKind};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What the held engine has been given, shared with the test.
#[derive(Debug, Default)]
struct Held {
    /// Operations in flight: `(token, orphaned by a detach, the op)`.
    ops: Vec<(u64, bool, BlockOp)>,
    /// Finished, waiting to be reaped: `(token, orphaned)`.
    done: Vec<(u64, bool)>,
    submitted: usize,
    memory: Option<GuestMemoryMmap>,
    /// The memory orphans were started on (kept, as a real engine must).
    retired: Option<GuestMemoryMmap>,
}

/// An engine whose operations finish only when the test calls [`release`]: a read then
/// fills its buffers with 0x5A, as the kernel would — orphans too (the kernel finishes what
/// it started, on the memory it was given).
#[derive(Debug)]
struct HeldEngine {
    state: Arc<Mutex<Held>>,
    eventfd: EventFd,
}

fn release(state: &Mutex<Held>, eventfd: &EventFd) {
    let mut s = state.lock().unwrap();
    for (token, orphan, op) in std::mem::take(&mut s.ops) {
        if let BlockOp::Read { data, .. } = op {
            let mem = if orphan { &s.retired } else { &s.memory };
            let mem = mem.as_ref().expect("memory kept while in flight");
            for seg in data {
                mem.write_slice(&vec![0x5A; seg.len as usize], seg.addr)
                    .unwrap();
            }
        }
        s.done.push((token, orphan));
    }
    eventfd.write(1).unwrap();
}

impl BlockEngine for HeldEngine {
    fn attach(&mut self, memory: GuestMemoryMmap) {
        self.state.lock().unwrap().memory = Some(memory);
    }

    fn detach(&mut self) {
        let mut s = self.state.lock().unwrap();
        for op in s.ops.iter_mut() {
            op.1 = true;
        }
        for d in s.done.iter_mut() {
            d.1 = true;
        }
        s.retired = s.memory.take();
    }

    fn cancelling(&self) -> usize {
        let s = self.state.lock().unwrap();
        s.ops.iter().filter(|o| o.1).count() + s.done.iter().filter(|d| d.1).count()
    }

    fn can_submit(&self) -> bool {
        true
    }

    fn submit(&mut self, op: BlockOp, token: u64) -> Option<io::Result<()>> {
        let mut s = self.state.lock().unwrap();
        s.submitted += 1;
        s.ops.push((token, false, op));
        None
    }

    fn commit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        for (token, orphan) in std::mem::take(&mut self.state.lock().unwrap().done) {
            if !orphan {
                out.push(Completion {
                    token,
                    result: Ok(()),
                });
            }
        }
    }

    fn in_flight(&self) -> usize {
        let s = self.state.lock().unwrap();
        s.ops.len() + s.done.len()
    }

    fn completion_fd(&self) -> Option<&EventFd> {
        Some(&self.eventfd)
    }

    fn replace_disk(&mut self, _disk: Arc<vmkit_virtio_blk::Disk>) -> io::Result<()> {
        Ok(())
    }
}

const HEADER: u64 = 0x2_0000;
const DATA: u64 = 0x4_0000;
const STATUS: u64 = 0x6_0000;
/// The rings of the first activation, and of the second (the driver sets them up anew).
const RINGS: [(u64, u64); 2] = [(0x0, 0x1000), (0x8_0000, 0x9_0000)];

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// Offers a 4 KiB read of sector 0 on `vq` (its chain at descriptor 0), status 0xff.
fn offer_read(mem: &GuestMemoryMmap, vq: &MockSplitQueue<'_, GuestMemoryMmap>) {
    mem.write_obj(T_IN, GuestAddress(HEADER)).unwrap();
    mem.write_obj(0u64, GuestAddress(HEADER + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    vq.add_desc_chains(
        &[
            desc(HEADER, 16, next, 1),
            desc(DATA, 4096, write | next, 2),
            desc(STATUS, 1, write, 0),
        ],
        0,
    )
    .unwrap();
}

fn context(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    used: u64,
) -> ActivateContext {
    let mut queue: Queue = vq.create_queue().unwrap();
    queue.try_set_used_ring_address(GuestAddress(used)).unwrap();
    ActivateContext::new(
        mem.clone(),
        FEATURE_VERSION_1,
        vec![(0, queue, EventFd::new(EFD_NONBLOCK).unwrap())],
        RecordingInterrupt::new(),
        NeedsReset::new(),
    )
}

fn used_idx(mem: &GuestMemoryMmap, used: u64) -> u16 {
    mem.read_obj(GuestAddress(used + 2)).unwrap()
}

#[test]
fn reset_returns_at_once_and_orphans_never_touch_the_rings() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let img = TempImage::filled(1 << 20, 0);
    let state = Arc::new(Mutex::new(Held::default()));
    let eventfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let (st, fd) = (state.clone(), eventfd.try_clone().unwrap());
    let mut dev = Block::with_engine(BlockConfig::new(&img.0), move |_| {
        Ok(Box::new(HeldEngine {
            state: st,
            eventfd: fd,
        }))
    })
    .unwrap();
    let [(ring1, used1), (ring2, used2)] = RINGS;
    let vq1 = MockSplitQueue::create(&mem, GuestAddress(ring1), 16);
    dev.ack_features(FEATURE_VERSION_1);
    dev.activate(context(&mem, &vq1, used1)).unwrap();
    offer_read(&mem, &vq1);
    dev.process_queue(0);
    assert_eq!(dev.in_flight(), 1);

    // The reset returns while the read is still held: it waited for nothing.
    assert!(dev.reset().is_some());
    assert!(!dev.is_active());
    assert_eq!(
        state.lock().unwrap().ops.len(),
        1,
        "the read is still in flight"
    );
    assert_eq!(dev.in_flight(), 1);

    // The driver re-activates with new rings and offers a read before the orphan is over:
    // it is accepted, and waits (queued), not submitted.
    let vq2 = MockSplitQueue::create(&mem, GuestAddress(ring2), 16);
    dev.ack_features(FEATURE_VERSION_1);
    dev.activate(context(&mem, &vq2, used2)).unwrap();
    offer_read(&mem, &vq2);
    dev.process_queue(0);
    assert_eq!(
        state.lock().unwrap().submitted,
        1,
        "submitted while cancelling"
    );

    // The orphan finishes (its data lands, as the kernel's would) and the device thread
    // reaps it: no status byte, no used ring, on either activation's rings.
    release(&state, &eventfd);
    dev.process_device_event(0);
    assert_eq!((used_idx(&mem, used1), used_idx(&mem, used2)), (0, 0));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);
    // ... and the queued read is submitted now, on the device thread.
    assert_eq!(state.lock().unwrap().submitted, 2);
    assert_eq!(dev.in_flight(), 1);

    // It completes normally into the new rings.
    release(&state, &eventfd);
    dev.process_device_event(0);
    assert_eq!(used_idx(&mem, used2), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    assert_eq!(dev.stats().reads, 1);
    assert_eq!(dev.in_flight(), 0);
}

/// io_uring with `O_DIRECT` reads that go to the disk: a reset with them in flight
/// returns with them still in flight (orphaned: `in_flight` counts them), the device
/// thread reaps them without touching the used ring, and a new driver then works.
#[test]
fn io_uring_reset_with_direct_reads_in_flight() {
    let img = TempImage::filled(4 << 20, 0x6B);
    let block = Block::new({
        let mut c = BlockConfig::new(&img.0);
        c.engine = EngineKind::IoUring;
        c.direct = true;
        c.poll_us = 0;
        c
    });
    let block = match block {
        Err(e @ vmkit_virtio_blk::Error::DirectUnsupported { .. }) => {
            // tmpfs before Linux 6.6 has no O_DIRECT: nothing to test here.
            eprintln!("skipped: the temporary directory's file system has no O_DIRECT: {e}");
            return;
        }
        b => b.unwrap(),
    };
    let dev = Arc::new(Mutex::new(block));
    let h = Harness::new(dev.clone());
    let mut drv = VirtIOBlk::<GuestHal, _>::new(h.transport()).unwrap();
    // The reads must still be at the disk when the device reaps after the last
    // notification; if all of them came back already (rare), they complete and we retry.
    let mut attempts = 0;
    let _reads = loop {
        let reads = ReadsInFlight::submit(&mut drv, 10);
        if dev.lock().unwrap().in_flight() > 0 {
            break reads;
        }
        reads.complete_all(&mut drv, 0x6B);
        attempts += 1;
        assert!(
            attempts < 10,
            "nothing in flight: the reads always completed inline"
        );
    };
    // Some may have completed at submission (the device reaps right after it commits);
    // nothing reaps between here and the reset (no pump yet).
    let completed = dev.lock().unwrap().stats().reads;
    let reset = dev.lock().unwrap().reset();
    assert!(reset.is_some());
    // Nothing completed into the rings by the reset itself; whatever is still in flight is
    // orphaned, and the device thread (the pump) drops it as it completes.
    let pump = Pump::start(&dev);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while dev.lock().unwrap().in_flight() > 0 {
        assert!(std::time::Instant::now() < deadline, "orphans never reaped");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(
        dev.lock().unwrap().stats().reads,
        completed,
        "an orphan was completed"
    );
    drop(pump);
    drop(reset);
    drop(drv); // resets the device again through its transport (nothing in flight now)
    let _pump = Pump::start(&dev);
    let mut drv = VirtIOBlk::<GuestHal, _>::new(h.transport()).unwrap();
    let mut buf = vec![0u8; 4096];
    drv.read_blocks(0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0x6B));
}
