//! Snapshot/restore of the device: requests in flight are completed by `quiesce`, the
//! state moves to a device freshly built on the same image, and the restored device goes on
//! serving the same ring (the activation context the transport's restore would rebuild is
//! handed over as it is: same ring positions) on both engines.

mod common;

use common::{sectors, TempImage, ENGINES};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::{VirtioDevice, FEATURE_VERSION_1};
use vmkit_virtio_blk::request::{S_OK, T_GET_ID, T_IN, T_OUT};
use vmkit_virtio_blk::{Block, BlockConfig, EngineKind};

const USED: u64 = 0x1000;
const HEADER: u64 = 0x2_0000;
const DATA: u64 = 0x4_0000;
const STATUS: u64 = 0x8_0000;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

struct Ring {
    mem: GuestMemoryMmap,
    vq: MockSplitQueue<'static, GuestMemoryMmap>,
    next: u16,
}

impl Ring {
    fn new() -> Self {
        // Leaked: the mock queue borrows the memory for the whole test.
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        ));
        Self {
            mem: mem.clone(),
            vq: MockSplitQueue::new(mem, 64),
            next: 0,
        }
    }

    /// Offers request `slot` of `kind` at `sector`, 4 KiB of data (written to the buffer
    /// first for a write); does not run it.
    fn offer(&mut self, kind: u32, sector: u64, slot: u64, data: Option<&[u8]>) {
        let (header, status, buf) = (HEADER + slot * 0x100, STATUS + slot, DATA + slot * 0x1000);
        self.mem.write_obj(kind, GuestAddress(header)).unwrap();
        self.mem
            .write_obj(sector, GuestAddress(header + 8))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let (next, first) = (VRING_DESC_F_NEXT as u16, self.next);
        let data_flags = match data {
            Some(d) => {
                self.mem.write_slice(d, GuestAddress(buf)).unwrap();
                next
            }
            None => next | VRING_DESC_F_WRITE as u16,
        };
        let len = if kind == T_GET_ID { 20 } else { 4096 };
        let chain = [
            desc(header, 16, next, first + 1),
            desc(buf, len, data_flags, first + 2),
            desc(status, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        self.vq.add_desc_chains(&chain, self.next).unwrap();
        self.next += 3;
    }

    fn status(&self, slot: u64) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS + slot)).unwrap()
    }

    fn data(&self, slot: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(DATA + slot * 0x1000))
            .unwrap();
        buf
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }
}

fn config(img: &TempImage, engine: EngineKind, serial: &str) -> BlockConfig {
    let mut config = BlockConfig::new(&img.0);
    config.engine = engine;
    config.serial = serial.into();
    // O_DIRECT on io_uring: reads go to the disk and stay in flight (inline completions
    // from the page cache would leave nothing for quiesce to wait for).
    config.direct = engine == EngineKind::IoUring;
    config
}

#[test]
fn quiesced_state_restores_into_a_fresh_device_that_continues_the_ring() {
    for engine in ENGINES {
        let img = TempImage::patterned(1 << 20, 3);
        let ring = &mut Ring::new();
        let mut dev = common::activated_on_mock(
            &ring.mem,
            &ring.vq,
            USED,
            FEATURE_VERSION_1,
            config(&img, engine, "snap-serial"),
        );
        // A write, then eight reads left in flight: quiesce must complete every one.
        ring.offer(T_OUT, 0, 0, Some(&sectors(9, 0, 4096)));
        dev.process_queue(0);
        common::settle(&mut dev);
        for slot in 1..9 {
            ring.offer(T_IN, (slot - 1) * 8, slot, None);
        }
        dev.process_queue(0);
        if engine == EngineKind::IoUring {
            assert!(dev.in_flight() > 0, "reads in flight before quiesce");
        }
        dev.quiesce();
        assert_eq!(dev.in_flight(), 0, "{engine:?}: quiesce left I/O in flight");
        assert_eq!(ring.used_idx(), 9, "{engine:?}: every request completed");
        assert_eq!(ring.data(1, 4096), sectors(9, 0, 4096));
        assert_eq!(ring.data(2, 4096), sectors(3, 8, 4096));

        // The driver makes a write available while the VM is paused: its notification
        // never reaches the device.
        ring.offer(T_OUT, 16, 9, Some(&sectors(7, 16, 4096)));

        let state = dev.state();
        let ctx = dev.reset().expect("was active");
        drop(dev);

        // The new device's configuration has no serial: the state brings it back.
        let mut fresh = Block::new(config(&img, engine, "")).unwrap();
        fresh.restore(&state).unwrap();
        fresh.ack_features(FEATURE_VERSION_1);
        fresh.activate(ctx).unwrap();
        // The activation served the request left in the ring.
        common::settle(&mut fresh);
        assert_eq!(
            ring.used_idx(),
            10,
            "{engine:?}: the waiting write was served"
        );
        assert_eq!(ring.status(9), S_OK);
        assert_eq!(img.read_at(16 * 512, 4096), sectors(7, 16, 4096));
        ring.offer(T_IN, 0, 10, None);
        ring.offer(T_GET_ID, 0, 11, None);
        fresh.process_queue(0);
        common::settle(&mut fresh);
        assert_eq!(ring.used_idx(), 12, "{engine:?}: the ring continued");
        assert_eq!(ring.status(10), S_OK);
        assert_eq!(ring.data(10, 4096), sectors(9, 0, 4096), "{engine:?}");
        assert_eq!(ring.status(11), S_OK);
        assert_eq!(&ring.data(11, 11), b"snap-serial");
    }
}

#[test]
fn an_image_of_another_capacity_is_refused() {
    let img = TempImage::new(1 << 20);
    let state = Block::new(config(&img, EngineKind::Sync, "x"))
        .unwrap()
        .state();
    let other = TempImage::new(2 << 20);
    let mut dev = Block::new(config(&other, EngineKind::Sync, "x")).unwrap();
    let err = dev.restore(&state).unwrap_err();
    assert_eq!(
        err.to_string(),
        "restored disk image has 4096 sectors; the snapshot's had 2048"
    );
}
