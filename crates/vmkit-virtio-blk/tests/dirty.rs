//! The device on guest memory that tracks dirty pages (vm-memory's `AtomicBitmap`, what
//! snapshots and live migration read): every page the device writes is marked, including
//! the data the engines read into guest memory through the kernel, which vm-memory cannot
//! see by itself.

mod common;

use common::{TempImage, ENGINES};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmkit_virtio::test_utils::RecordingInterrupt;
use vmkit_virtio::{ActivateContext, NeedsReset, VirtioDevice, FEATURE_VERSION_1};
use vmkit_virtio_blk::request::{S_OK, T_IN};
use vmkit_virtio_blk::{Block, BlockConfig};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Tracked = GuestMemoryMmap<AtomicBitmap>;

const PAGE: u64 = 0x1000;
const HEADER: u64 = 0x2_0000;
const DATA: u64 = 0x4_0000; // two pages
const STATUS: u64 = 0x6_0000;
const UNTOUCHED: u64 = 0x8_0000;
const USED: u64 = 0x1000;

fn dirty(mem: &Tracked, addr: u64) -> bool {
    let region = mem.find_region(GuestAddress(addr)).unwrap();
    let offset = addr - region.start_addr().0;
    GuestMemoryRegion::bitmap(region).dirty_at(offset as usize)
}

fn clean_all(mem: &Tracked) {
    for region in mem.iter() {
        // The region's own bitmap (through its mapping), not a slice of it.
        std::ops::Deref::deref(region).bitmap().reset();
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

#[test]
fn pages_the_device_writes_are_marked_dirty() {
    for engine in ENGINES {
        let mem = Tracked::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let img = TempImage::filled(1 << 20, 0x3C);
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().unwrap();
        // The mock's used ring overlaps its available ring; put it on a page of its own.
        queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        let ctx = ActivateContext::new(
            mem.clone(),
            FEATURE_VERSION_1,
            vec![(0, queue, EventFd::new(EFD_NONBLOCK).unwrap())],
            RecordingInterrupt::new(),
            NeedsReset::new(),
        );
        let mut config = BlockConfig::new(&img.0);
        config.engine = engine;
        let mut dev = Block::<Tracked>::for_memory(config).unwrap();
        dev.ack_features(FEATURE_VERSION_1);
        dev.activate(ctx).unwrap();

        // An 8 KiB read of sector 0: header, two data pages, status.
        mem.write_obj(T_IN, GuestAddress(HEADER)).unwrap();
        mem.write_obj(0u64, GuestAddress(HEADER + 8)).unwrap();
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        vq.add_desc_chains(
            &[
                desc(HEADER, 16, next, 1),
                desc(DATA, 2 * PAGE as u32, write | next, 2),
                desc(STATUS, 1, write, 0),
            ],
            0,
        )
        .unwrap();
        clean_all(&mem);

        dev.process_queue(0);
        common::settle(&mut dev);

        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        let mut data = vec![0u8; 2 * PAGE as usize];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(
            data.iter().all(|b| *b == 0x3C),
            "{engine:?}: the read landed"
        );
        // What the kernel wrote (preadv / io_uring into the iovecs), marked by the device:
        assert!(dirty(&mem, DATA), "{engine:?}: first data page");
        assert!(dirty(&mem, DATA + PAGE), "{engine:?}: second data page");
        // What the device wrote through vm-memory:
        assert!(dirty(&mem, STATUS), "{engine:?}: status byte");
        assert!(dirty(&mem, USED), "{engine:?}: used ring");
        // What it only read, or never touched, stays clean.
        assert!(!dirty(&mem, HEADER), "{engine:?}: header was only read");
        assert!(!dirty(&mem, UNTOUCHED), "{engine:?}");
        assert_eq!(dev.stats().reads, 1);
    }
}
