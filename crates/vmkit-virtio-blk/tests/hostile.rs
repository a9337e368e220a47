//! Hostile rings (virtio-queue's mock): every malformed request is answered IOERR (or,
//! without a usable status byte, returned with nothing written), never a panic, and
//! nothing is written outside the chain's device-writable buffers — on both engines.

mod common;

use common::{TempImage, ENGINES};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::test_utils::{activate_context, guest_memory, mock_queue, RecordingInterrupt};
use vmkit_virtio::{
    InterruptReason, NeedsReset, VirtioDevice, FEATURE_RING_EVENT_IDX, FEATURE_VERSION_1,
};
use vmkit_virtio_blk::request::{
    FLAG_UNMAP, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
use vmkit_virtio_blk::{Block, BlockConfig, EngineKind};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const W: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
const MEM: usize = 0x80_0000;
const DATA: u64 = 0x1_0000; // below: the rings
const POISON: u8 = 0xA5;
const DISK: u64 = 1 << 20;
const CAPACITY: u64 = DISK / 512;
const ALL: u64 = FEATURE_VERSION_1
    | 1 << VIRTIO_BLK_F_FLUSH
    | 1 << VIRTIO_BLK_F_DISCARD
    | 1 << VIRTIO_BLK_F_WRITE_ZEROES;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// A chain from `(addr, len, flags)`, linked from descriptor index `first`.
fn chain(first: u16, parts: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
    let n = parts.len() as u16;
    parts
        .iter()
        .enumerate()
        .map(|(i, (a, l, f))| {
            let i = i as u16;
            if i + 1 < n {
                desc(*a, *l, f | NEXT, first + i + 1)
            } else {
                desc(*a, *l, *f, 0)
            }
        })
        .collect()
}

fn header(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

struct Rig {
    mem: GuestMemoryMmap,
    img: TempImage,
    dev: Block,
    irq: std::sync::Arc<RecordingInterrupt>,
    needs_reset: NeedsReset,
    used: GuestAddress,
    vq_avail: GuestAddress,
    snapshot: Vec<u8>,
}

impl Rig {
    fn new(engine: EngineKind, features: u64, f: impl FnOnce(&mut BlockConfig)) -> Self {
        let mem = guest_memory(MEM);
        mem.write_slice(&vec![POISON; MEM - DATA as usize], GuestAddress(DATA))
            .unwrap();
        let img = TempImage::filled(DISK, 0x3C);
        let mut config = BlockConfig::new(&img.0);
        config.engine = engine;
        config.queue_size = 16;
        f(&mut config);
        let mut dev = Block::new(config).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let queue = mock_queue(&vq);
        let used = GuestAddress(queue.used_ring());
        let vq_avail = vq.avail_addr();
        let irq = RecordingInterrupt::new();
        let (ctx, needs_reset) = activate_context(&mem, features, vec![(0, queue)], irq.clone());
        dev.ack_features(features);
        dev.activate(ctx).unwrap();
        Self {
            mem,
            img,
            dev,
            irq,
            needs_reset,
            used,
            vq_avail,
            snapshot: Vec::new(),
        }
    }

    /// Makes `descs` available (as the mock does: chains split where NEXT is clear),
    /// snapshots memory, runs the queue and waits for every completion.
    fn run(&mut self, descs: &[RawDescriptor]) {
        // The mock is rebuilt over the same rings: only its descriptor table and
        // available ring writes are used.
        let vq = MockSplitQueue::new(&self.mem, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        // add_desc_chains starts from the current available index, which it reads back.
        self.snapshot = vec![0u8; MEM];
        self.mem
            .read_slice(&mut self.snapshot, GuestAddress(0))
            .unwrap();
        self.dev.process_queue(0);
        self.settle();
    }

    fn settle(&mut self) {
        common::settle(&mut self.dev);
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
    }

    fn used_len(&self, i: u64) -> u32 {
        self.mem
            .read_obj(self.used.unchecked_add(4 + 8 * i + 4))
            .unwrap()
    }

    fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Memory from DATA up changed only inside `allowed` ranges.
    fn only_changed(&self, allowed: &[(u64, u64)]) {
        let mut now = vec![0u8; MEM];
        self.mem.read_slice(&mut now, GuestAddress(0)).unwrap();
        let changed = now
            .iter()
            .zip(&self.snapshot)
            .enumerate()
            .skip(DATA as usize);
        for (a, _) in changed.filter(|(_, (n, s))| n != s) {
            let a = a as u64;
            assert!(
                allowed.iter().any(|(s, l)| a >= *s && a < s + l),
                "guest memory written at {a:#x}, outside the chain's writable buffers"
            );
        }
    }
}

const HDR: u64 = 0x1_0000;
const BUF: u64 = 0x2_0000;
const ST: u64 = 0x3_0000;

/// A fresh rig with the header at HDR, running `parts` as one chain; checks the chain is
/// returned, the status byte (or, for `None`, used length 0 and nothing written), and
/// that nothing outside the chain's writable buffers (only the status byte, on error)
/// changed.
fn with_header(
    engine: EngineKind,
    t: u32,
    sector: u64,
    parts: &[(u64, u32, u16)],
    st: Option<u8>,
) -> Rig {
    let mut r = Rig::new(engine, ALL, |_| {});
    header(&r.mem, HDR, t, sector);
    r.run(&chain(0, parts));
    assert_eq!(r.used_idx(), 1, "{engine:?}: the request is returned");
    assert!(!r.needs_reset.is_set());
    match st {
        Some(s) => {
            let last = parts.last().unwrap();
            let at = last.0 + u64::from(last.1) - 1;
            assert_eq!(
                r.byte(at),
                s,
                "{engine:?}: status for type {t} sector {sector}"
            );
            if s == S_OK {
                let writable: Vec<(u64, u64)> = parts
                    .iter()
                    .filter(|p| p.2 & W != 0)
                    .map(|p| (p.0, u64::from(p.1)))
                    .collect();
                r.only_changed(&writable);
            } else {
                assert_eq!(r.used_len(0), 1);
                r.only_changed(&[(at, 1)]);
            }
        }
        None => {
            assert_eq!(
                r.used_len(0),
                0,
                "{engine:?}: nothing written, used length 0"
            );
            r.only_changed(&[]);
        }
    }
    r
}

#[test]
fn good_read_and_write() {
    for e in ENGINES {
        let r = with_header(
            e,
            T_IN,
            2,
            &[(HDR, 16, 0), (BUF, 1024, W), (ST, 1, W)],
            Some(S_OK),
        );
        assert_eq!(r.used_len(0), 1025);
        let mut got = vec![0u8; 1024];
        r.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(got, vec![0x3C; 1024]);
        assert_eq!(r.irq.reasons(), [InterruptReason::Queue(0)]);

        let mut r = Rig::new(e, ALL, |_| {});
        header(&r.mem, HDR, T_OUT, CAPACITY - 2);
        r.mem.write_slice(&[0x77; 1024], GuestAddress(BUF)).unwrap();
        r.run(&chain(0, &[(HDR, 16, 0), (BUF, 1024, 0), (ST, 1, W)]));
        assert_eq!(r.byte(ST), S_OK);
        assert_eq!(r.used_len(0), 1);
        assert_eq!(r.img.read_at(DISK - 1024, 1024), vec![0x77; 1024]);
        assert_eq!(r.dev.stats().writes, 1);
    }
}

#[test]
fn wrong_directions() {
    for e in ENGINES {
        // IN into driver-readable data, OUT from device-writable data, GET_ID likewise.
        with_header(
            e,
            T_IN,
            0,
            &[(HDR, 16, 0), (BUF, 512, 0), (ST, 1, W)],
            Some(S_IOERR),
        );
        let r = with_header(
            e,
            T_OUT,
            0,
            &[(HDR, 16, 0), (BUF, 512, W), (ST, 1, W)],
            Some(S_IOERR),
        );
        assert_eq!(
            r.img.read_at(0, 512),
            vec![0x3C; 512],
            "nothing written to the disk"
        );
        with_header(
            e,
            T_GET_ID,
            0,
            &[(HDR, 16, 0), (BUF, 20, 0), (ST, 1, W)],
            Some(S_IOERR),
        );
        // Header in a device-writable buffer.
        with_header(
            e,
            T_IN,
            0,
            &[(HDR, 16, W), (BUF, 512, W), (ST, 1, W)],
            Some(S_IOERR),
        );
        // Header too short.
        with_header(e, T_IN, 0, &[(HDR, 8, 0), (ST, 1, W)], Some(S_IOERR));
    }
}

#[test]
fn lengths_not_a_multiple_of_512() {
    for e in ENGINES {
        with_header(
            e,
            T_IN,
            0,
            &[(HDR, 16, 0), (BUF, 1000, W), (ST, 1, W)],
            Some(S_IOERR),
        );
        with_header(
            e,
            T_OUT,
            0,
            &[(HDR, 16, 0), (BUF, 513, 0), (ST, 1, W)],
            Some(S_IOERR),
        );
        // A missing status descriptor: the last data byte is the status, leaving 511.
        with_header(e, T_IN, 0, &[(HDR, 16, 0), (BUF, 512, W)], Some(S_IOERR));
    }
}

#[test]
fn sectors_past_the_capacity_and_overflow() {
    for e in ENGINES {
        for (sector, len) in [
            (CAPACITY, 512),
            (CAPACITY - 1, 1024),
            (u64::MAX, 512),
            (u64::MAX / 512 + 1, 512), // sector * 512 overflows
            (u64::MAX - 1, 0x10_0000),
        ] {
            with_header(
                e,
                T_IN,
                sector,
                &[(HDR, 16, 0), (BUF, len, W), (ST, 1, W)],
                Some(S_IOERR),
            );
            let r = with_header(
                e,
                T_OUT,
                sector,
                &[(HDR, 16, 0), (BUF, len, 0), (ST, 1, W)],
                Some(S_IOERR),
            );
            assert_eq!(r.dev.stats().bad_requests, 1);
        }
    }
}

#[test]
fn status_missing_or_read_only() {
    for e in ENGINES {
        // Read-only status: nothing written anywhere, used length 0.
        with_header(e, T_IN, 0, &[(HDR, 16, 0), (BUF, 512, W), (ST, 1, 0)], None);
        with_header(e, T_FLUSH, 0, &[(HDR, 16, 0), (ST, 1, 0)], None);
        // Only a header.
        with_header(e, T_IN, 0, &[(HDR, 16, 0)], None);
        // A zero-length status.
        with_header(e, T_IN, 0, &[(HDR, 16, 0), (BUF, 512, W), (ST, 0, W)], None);
    }
}

#[test]
fn chains_crossing_the_end_of_memory() {
    let end = MEM as u64;
    for e in ENGINES {
        with_header(
            e,
            T_IN,
            0,
            &[(HDR, 16, 0), (end - 256, 512, W), (ST, 1, W)],
            None,
        );
        with_header(
            e,
            T_IN,
            0,
            &[(HDR, 16, 0), (BUF, 512, W), (end, 1, W)],
            None,
        );
        with_header(
            e,
            T_IN,
            0,
            &[(HDR, 16, 0), (u64::MAX - 255, 512, W), (ST, 1, W)],
            None,
        );
        with_header(
            e,
            T_OUT,
            0,
            &[(HDR, 16, 0), (BUF, u32::MAX, 0), (ST, 1, W)],
            None,
        );
    }
}

#[test]
fn huge_segment_counts() {
    for e in ENGINES {
        // An indirect table: header, 15 data descriptors (seg_max is 14), status.
        let mut r = Rig::new(e, ALL, |_| {});
        header(&r.mem, HDR, T_IN, 0);
        let table = 0x40_0000u64;
        let mut entries = vec![(HDR, 16u32, 0u16)];
        entries.extend((0..15u64).map(|i| (BUF + i * 0x200, 512u32, W)));
        entries.push((ST, 1, W));
        for (i, d) in chain(0, &entries).into_iter().enumerate() {
            r.mem
                .write_obj(d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        r.run(&[desc(table, 16 * entries.len() as u32, INDIRECT, 0)]);
        assert_eq!(r.used_idx(), 1);
        assert_eq!(r.byte(ST), S_IOERR, "{e:?}");
        r.only_changed(&[(ST, 1)]);
        // 14 is fine.
        let mut r = Rig::new(e, ALL, |_| {});
        header(&r.mem, HDR, T_IN, 0);
        let mut entries = vec![(HDR, 16u32, 0u16)];
        entries.extend((0..14u64).map(|i| (BUF + i * 0x200, 512u32, W)));
        entries.push((ST, 1, W));
        for (i, d) in chain(0, &entries).into_iter().enumerate() {
            r.mem
                .write_obj(d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        r.run(&[desc(table, 16 * entries.len() as u32, INDIRECT, 0)]);
        assert_eq!(r.byte(ST), S_OK, "{e:?}");
        assert_eq!(r.used_len(0), 14 * 512 + 1);
    }
}

#[test]
fn unsupported_and_get_id() {
    for e in ENGINES {
        with_header(e, 0x99, 0, &[(HDR, 16, 0), (ST, 1, W)], Some(S_UNSUPP));
        // GET_ID: 20 bytes of serial (empty: zeros), short buffer IOERR.
        let r = with_header(
            e,
            T_GET_ID,
            0,
            &[(HDR, 16, 0), (BUF, 20, W), (ST, 1, W)],
            Some(S_OK),
        );
        assert_eq!(r.used_len(0), 21);
        with_header(
            e,
            T_GET_ID,
            0,
            &[(HDR, 16, 0), (BUF, 19, W), (ST, 1, W)],
            Some(S_IOERR),
        );
        // Discard with the unmap flag: UNSUPP.
        let mut r = Rig::new(e, ALL, |_| {});
        header(&r.mem, HDR, T_DISCARD, 0);
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        seg[12..16].copy_from_slice(&FLAG_UNMAP.to_le_bytes());
        r.mem.write_slice(&seg, GuestAddress(BUF)).unwrap();
        r.run(&chain(0, &[(HDR, 16, 0), (BUF, 16, 0), (ST, 1, W)]));
        assert_eq!(r.byte(ST), S_UNSUPP);
        // Not negotiated: UNSUPP.
        let mut r = Rig::new(e, FEATURE_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH, |_| {});
        header(&r.mem, HDR, T_WRITE_ZEROES, 0);
        seg[12..16].copy_from_slice(&0u32.to_le_bytes());
        r.mem.write_slice(&seg, GuestAddress(BUF)).unwrap();
        r.run(&chain(0, &[(HDR, 16, 0), (BUF, 16, 0), (ST, 1, W)]));
        assert_eq!(r.byte(ST), S_UNSUPP);
        assert_eq!(r.img.read_at(0, 4096), vec![0x3C; 4096]);
    }
}

#[test]
fn discard_and_write_zeroes_through_the_ring() {
    for e in ENGINES {
        let mut r = Rig::new(e, ALL, |_| {});
        header(&r.mem, HDR, T_WRITE_ZEROES, 0);
        let mut segs = [0u8; 32];
        segs[0..8].copy_from_slice(&8u64.to_le_bytes());
        segs[8..12].copy_from_slice(&8u32.to_le_bytes());
        segs[16..24].copy_from_slice(&100u64.to_le_bytes());
        segs[24..28].copy_from_slice(&4u32.to_le_bytes());
        segs[28..32].copy_from_slice(&FLAG_UNMAP.to_le_bytes());
        r.mem.write_slice(&segs, GuestAddress(BUF)).unwrap();
        r.run(&chain(0, &[(HDR, 16, 0), (BUF, 32, 0), (ST, 1, W)]));
        assert_eq!(r.byte(ST), S_OK);
        assert_eq!(r.img.read_at(4096, 4096), vec![0u8; 4096]);
        assert_eq!(r.img.read_at(100 * 512, 2048), vec![0u8; 2048]);
        assert_eq!(r.img.read_at(0, 4096), vec![0x3C; 4096]);
        assert_eq!(r.img.read_at(104 * 512, 512), vec![0x3C; 512]);
        assert_eq!(r.dev.stats().write_zeroes, 1);
    }
}

#[test]
fn read_only_disk_refuses_writes() {
    for e in ENGINES {
        let mut r = Rig::new(e, ALL, |c| c.read_only = true);
        header(&r.mem, HDR, T_OUT, 0);
        r.run(&chain(0, &[(HDR, 16, 0), (BUF, 512, 0), (ST, 1, W)]));
        assert_eq!(r.byte(ST), S_IOERR);
        assert_eq!(r.img.read_at(0, 512), vec![0x3C; 512]);
        assert_eq!(r.dev.stats().read_only_refusals, 1);
    }
}

#[test]
fn write_through_without_flush_negotiated() {
    for e in ENGINES {
        let mut r = Rig::new(e, FEATURE_VERSION_1 | FEATURE_RING_EVENT_IDX, |_| {});
        header(&r.mem, HDR, T_OUT, 0);
        r.mem.write_slice(&[0x11; 512], GuestAddress(BUF)).unwrap();
        r.run(&chain(0, &[(HDR, 16, 0), (BUF, 512, 0), (ST, 1, W)]));
        assert_eq!(r.byte(ST), S_OK);
        assert_eq!(r.img.read_at(0, 512), vec![0x11; 512]);
        let mut cfg = [0u8; 1];
        r.dev.read_config(32, &mut cfg);
        assert_eq!(cfg[0], 0, "writeback is 0 without FLUSH");
    }
}

#[test]
fn several_chains_one_interrupt_and_corrupt_ring() {
    for e in ENGINES {
        let mut r = Rig::new(e, ALL, |_| {});
        header(&r.mem, HDR, T_IN, 0);
        let mut descs = chain(0, &[(HDR, 16, 0), (BUF, 512, W), (ST, 1, W)]);
        descs.extend(chain(
            3,
            &[(HDR, 16, 0), (BUF + 0x1000, 512, W), (ST + 1, 1, W)],
        ));
        descs.extend(chain(
            6,
            &[(HDR, 16, 0), (BUF + 0x2000, 4096, W), (ST + 2, 1, W)],
        ));
        r.run(&descs);
        assert_eq!(r.used_idx(), 3);
        assert_eq!([r.byte(ST), r.byte(ST + 1), r.byte(ST + 2)], [S_OK; 3]);
        assert_eq!(
            r.irq.reasons(),
            [InterruptReason::Queue(0)],
            "{e:?}: one interrupt"
        );
        // An available index far ahead: DEVICE_NEEDS_RESET, no panic.
        r.mem
            .write_obj(1000u16, r.vq_avail.unchecked_add(2))
            .unwrap();
        r.dev.process_queue(0);
        assert!(r.needs_reset.is_set());
        r.dev.process_queue(9);
        assert!(r.dev.reset().is_some());
    }
}

#[test]
fn a_full_engine_stops_taking_requests_and_resumes() {
    for e in ENGINES {
        // queue_size 4: the io_uring engine keeps at most 8 in flight; 16 requests come.
        let mut r = Rig::new(e, ALL, |c| c.queue_size = 4);
        let mut heads = Vec::new();
        for i in 0..16u64 {
            let table = 0x40_0000 + i * 0x100;
            header(&r.mem, HDR + i * 0x10, T_IN, i);
            let parts = [
                (HDR + i * 0x10, 16u32, 0u16),
                (BUF + i * 0x200, 512, W),
                (ST + i, 1, W),
            ];
            for (j, d) in chain(0, &parts).into_iter().enumerate() {
                r.mem
                    .write_obj(d, GuestAddress(table + 16 * j as u64))
                    .unwrap();
            }
            heads.push(desc(table, 48, INDIRECT, 0));
        }
        r.run(&heads);
        assert_eq!(r.used_idx(), 16, "{e:?}: every request completed");
        for i in 0..16 {
            assert_eq!(r.byte(ST + i), S_OK, "{e:?}: request {i}");
        }
        let s = r.dev.stats();
        assert_eq!(s.reads, 16);
        assert!(s.max_in_flight <= 8, "{e:?}: {} in flight", s.max_in_flight);
        if e == EngineKind::IoUring {
            assert_eq!(
                s.max_in_flight, 8,
                "the engine filled up and the queue waited"
            );
        }
        let mut written = vec![(ST, 16)];
        written.push((BUF, 16 * 0x200));
        r.only_changed(&written);
    }
}

#[test]
fn multi_queue_requests_complete_on_their_own_queue() {
    for e in ENGINES {
        let mem = guest_memory(MEM);
        let img = TempImage::filled(DISK, 0x3C);
        let mut config = BlockConfig::new(&img.0);
        config.engine = e;
        config.queues = 2;
        config.queue_size = 16;
        let mut dev = Block::new(config).unwrap();
        let q0 = MockSplitQueue::new(&mem, 16);
        let q1 = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let used1 = GuestAddress(mock_queue(&q1).used_ring());
        let irq = RecordingInterrupt::new();
        let (ctx, _) = activate_context(
            &mem,
            ALL,
            vec![(0, mock_queue(&q0)), (1, mock_queue(&q1))],
            irq.clone(),
        );
        dev.ack_features(ALL);
        dev.activate(ctx).unwrap();
        header(&mem, HDR, T_OUT, 4);
        mem.write_slice(&[0x42; 512], GuestAddress(BUF)).unwrap();
        q1.add_desc_chains(&chain(0, &[(HDR, 16, 0), (BUF, 512, 0), (ST, 1, W)]), 0)
            .unwrap();
        dev.process_queue(1);
        while dev.in_flight() > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
            dev.process_completions();
        }
        assert_eq!(mem.read_obj::<u8>(GuestAddress(ST)).unwrap(), S_OK);
        assert_eq!(mem.read_obj::<u16>(used1.unchecked_add(2)).unwrap(), 1);
        assert_eq!(irq.reasons(), [InterruptReason::Queue(1)], "{e:?}");
        assert_eq!(img.read_at(4 * 512, 512), vec![0x42; 512]);
        // A notification for a queue the device does not have is ignored.
        dev.process_queue(5);
    }
}

/// Interrupts the recording interrupt saw for queues (config interrupts are not counted).
fn queue_interrupts(r: &Rig) -> u64 {
    let queue = |x: &InterruptReason| matches!(x, InterruptReason::Queue(_));
    r.irq.reasons().iter().filter(|x| queue(x)).count() as u64
}

#[test]
fn metrics_count_requests_bytes_flushes_errors_and_malformed_chains() {
    use std::sync::Arc;
    use vmkit_virtio::{AtomicMetrics, Counter, MetricsSnapshot};
    for e in ENGINES {
        let metrics = Arc::new(AtomicMetrics::new());
        let m = metrics.clone();
        let mut r = Rig::new(e, ALL, |c| c.metrics = m);
        header(&r.mem, HDR, T_IN, 0);
        header(&r.mem, HDR + 0x100, T_OUT, 4);
        header(&r.mem, HDR + 0x200, T_FLUSH, 0);
        let mut descs = chain(0, &[(HDR, 16, 0), (BUF, 1024, W), (ST, 1, W)]);
        descs.extend(chain(
            3,
            &[
                (HDR + 0x100, 16, 0),
                (BUF + 0x1000, 1536, 0),
                (ST + 1, 1, W),
            ],
        ));
        descs.extend(chain(6, &[(HDR + 0x200, 16, 0), (ST + 2, 1, W)]));
        // The device's parser refuses it: a header too short.
        descs.extend(chain(8, &[(HDR, 8, 0), (ST + 3, 1, W)]));
        // The queue refuses it: a buffer crossing the end of memory.
        descs.extend(chain(
            10,
            &[(HDR, 16, 0), (MEM as u64 - 256, 512, W), (ST + 4, 1, W)],
        ));
        r.run(&descs);
        assert_eq!(r.used_idx(), 5);
        assert_eq!(
            [r.byte(ST), r.byte(ST + 1), r.byte(ST + 2), r.byte(ST + 3)],
            [S_OK, S_OK, S_OK, S_IOERR]
        );
        let interrupts = queue_interrupts(&r);
        assert!(interrupts > 0);
        let expected = MetricsSnapshot {
            requests: 5,
            read_ops: 1,
            write_ops: 1,
            read_bytes: 1024,
            write_bytes: 1536,
            flushes: 1,
            malformed: 2,
            notifications: 1,
            interrupts,
            ..MetricsSnapshot::default()
        };
        assert_eq!(metrics.snapshot(), expected, "{e:?}");

        // The image shrinks under the device: a read past its new end is an I/O error.
        let metrics = Arc::new(AtomicMetrics::new());
        let m = metrics.clone();
        let mut r = Rig::new(e, ALL, |c| c.metrics = m);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&r.img.0)
            .unwrap()
            .set_len(DISK / 2)
            .unwrap();
        header(&r.mem, HDR, T_IN, CAPACITY - 2);
        r.run(&chain(0, &[(HDR, 16, 0), (BUF, 1024, W), (ST, 1, W)]));
        assert_eq!(r.byte(ST), S_IOERR);
        let expected = MetricsSnapshot {
            requests: 1,
            errors: 1,
            notifications: 1,
            interrupts: queue_interrupts(&r),
            ..MetricsSnapshot::default()
        };
        assert_eq!(metrics.snapshot(), expected, "{e:?}");
        assert_eq!(metrics.get(Counter::Errors), r.dev.stats().io_errors);
    }
}
