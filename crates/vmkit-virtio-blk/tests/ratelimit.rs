//! The rate limiter on the request path: a request without tokens stays in the available
//! ring (not completed, not lost), the queues are held (unpolled) until the limiter's timer
//! fires, and then served; reads, writes and write-zeroes count bytes, every request (a
//! `FLUSH` too) an operation.

mod common;

use std::sync::Arc;

use common::TempImage;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::test_utils::{wait_readable, RecordingInterrupt};
use vmkit_virtio::{
    ActivateContext, AtomicMetrics, Counter, NeedsReset, RateLimiterConfig, TokenBucketConfig,
    VirtioDevice, FEATURE_VERSION_1,
};
use vmkit_virtio_blk::request::{S_OK, T_DISCARD, T_FLUSH, T_IN, T_WRITE_ZEROES};
use vmkit_virtio_blk::{Block, BlockConfig};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const USED: u64 = 0x1000;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// A 4 KiB read (or a flush) as chain `i`: header at 0x2_0000 + i * 0x100, data at
/// 0x4_0000 + i * 0x1000, status at 0x8_0000 + i.
fn request(mem: &GuestMemoryMmap, i: u16, kind: u32) -> [RawDescriptor; 3] {
    let (header, data, status) = (
        0x2_0000 + u64::from(i) * 0x100,
        0x4_0000 + u64::from(i) * 0x1000,
        0x8_0000 + u64::from(i),
    );
    mem.write_obj(kind, GuestAddress(header)).unwrap();
    mem.write_obj(0u64, GuestAddress(header + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let first = i * 3;
    [
        desc(header, 16, next, first + 1),
        desc(data, 4096, write | next, first + 2),
        desc(status, 1, write, 0),
    ]
}

fn status(mem: &GuestMemoryMmap, i: u16) -> u8 {
    mem.read_obj(GuestAddress(0x8_0000 + u64::from(i))).unwrap()
}

fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

fn activated(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    features: u64,
    config: BlockConfig,
) -> Block {
    common::activated_on_mock(mem, vq, USED, features, config)
}

#[test]
fn requests_past_the_limit_wait_in_the_ring_for_the_timer() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let img = TempImage::filled(1 << 20, 0x5A);
    let vq = MockSplitQueue::new(&mem, 16);
    let metrics = Arc::new(AtomicMetrics::new());
    let mut config = BlockConfig::new(&img.0).with_metrics(metrics.clone());
    // 8 KiB a second in bytes; 3 operations refilled in 30 ms.
    config.rate_limiter = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size: 8192,
            one_time_burst: 0,
            refill_time_ms: 1000,
        }),
        ops: Some(TokenBucketConfig {
            size: 3,
            one_time_burst: 0,
            refill_time_ms: 30,
        }),
    };
    let mut dev = activated(&mem, &vq, FEATURE_VERSION_1, config);
    let timer = dev.readable_fds().unwrap();
    assert_eq!(timer.len(), 1, "the limiter's timer is watched");

    // Three reads of 4 KiB and a flush.
    let mut chains = Vec::new();
    for (i, kind) in [T_IN, T_IN, T_FLUSH, T_IN].into_iter().enumerate() {
        chains.extend(request(&mem, i as u16, kind));
    }
    vq.add_desc_chains(&chains, 0).unwrap();
    dev.process_queue(0);
    // Two reads (8 KiB) and the flush (no bytes, one operation): the ops bucket is empty.
    assert_eq!(used_idx(&mem), 3);
    assert_eq!(
        [status(&mem, 0), status(&mem, 1), status(&mem, 2)],
        [S_OK; 3]
    );
    assert_eq!(status(&mem, 3), 0xff, "the fourth waits");
    assert!(dev.rate_limiter().is_throttled());
    assert_eq!(metrics.get(Counter::Throttled), 1);
    assert_eq!(
        metrics.get(Counter::Requests),
        3,
        "the held one is not counted"
    );
    // Notified again while held: nothing is taken, and nothing more is counted.
    dev.process_queue(0);
    assert_eq!(used_idx(&mem), 3);
    assert_eq!(metrics.get(Counter::Throttled), 1);

    // The ops bucket refills in 30 ms, but the bytes bucket needs 500 ms for 4 KiB: the
    // timer fires for the longer wait, and the fourth read is served then.
    let (token, fd) = &timer[0];
    assert!(
        wait_readable(fd, std::time::Duration::from_secs(10)),
        "the timer fired"
    );
    dev.process_device_event(*token);
    assert_eq!(used_idx(&mem), 4);
    assert_eq!(status(&mem, 3), S_OK);
    assert!(!dev.rate_limiter().is_throttled());
    assert_eq!(metrics.get(Counter::Requests), 4);
}

/// A `DISCARD` or `WRITE_ZEROES` of 64 KiB (128 sectors from sector 0) as chain `i`: header
/// at 0x2_0000 + i * 0x100, its one range at 0x4_0000 + i * 0x1000, status at 0x8_0000 + i.
fn range_request(mem: &GuestMemoryMmap, i: u16, kind: u32) -> [RawDescriptor; 3] {
    let [header, _, status] = request(mem, i, kind);
    let range = 0x4_0000 + u64::from(i) * 0x1000;
    mem.write_obj(0u64, GuestAddress(range)).unwrap();
    mem.write_obj(128u32, GuestAddress(range + 8)).unwrap();
    mem.write_obj(0u32, GuestAddress(range + 12)).unwrap();
    let next = i * 3 + 2;
    [
        header,
        desc(range, 16, VRING_DESC_F_NEXT as u16, next),
        status,
    ]
}

#[test]
fn write_zeroes_costs_its_bytes_and_discard_an_operation() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let img = TempImage::filled(1 << 20, 0x5A);
    let vq = MockSplitQueue::new(&mem, 16);
    let features = FEATURE_VERSION_1 | 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    let mut config = BlockConfig::new(&img.0);
    // 8 KiB a second.
    config.rate_limiter.bandwidth = Some(TokenBucketConfig {
        size: 8192,
        one_time_burst: 0,
        refill_time_ms: 1000,
    });
    let mut dev = activated(&mem, &vq, features, config);
    let mut chains = Vec::new();
    chains.extend(range_request(&mem, 0, T_DISCARD));
    chains.extend(request(&mem, 1, T_IN));
    chains.extend(range_request(&mem, 2, T_WRITE_ZEROES));
    chains.extend(request(&mem, 3, T_IN));
    vq.add_desc_chains(&chains, 0).unwrap();
    dev.process_queue(0);
    // The discard costs no bytes, the read 4 KiB; the 64 KiB of zeroes could never fit in
    // 8 KiB: they pass and leave 60 KiB of debt, which holds the last read for 7.5 s.
    assert_eq!(used_idx(&mem), 3);
    assert_eq!(
        [status(&mem, 0), status(&mem, 1), status(&mem, 2)],
        [S_OK; 3]
    );
    assert_eq!(status(&mem, 3), 0xff, "held by the zeroes' debt");
    assert!(dev.rate_limiter().is_throttled());
    // 4 KiB - 64 KiB, plus what refilled meanwhile (8 bytes a millisecond).
    let level = dev.rate_limiter().bandwidth().unwrap().level();
    assert!((4096 - 65536..-(56 << 10)).contains(&level), "{level}");
}

#[test]
fn updating_the_limiter_lets_held_requests_go() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let img = TempImage::filled(1 << 20, 0x5A);
    let vq = MockSplitQueue::new(&mem, 16);
    let mut config = BlockConfig::new(&img.0);
    // One operation an hour.
    config.rate_limiter.ops = Some(TokenBucketConfig {
        size: 1,
        one_time_burst: 0,
        refill_time_ms: 3_600_000,
    });
    let mut dev = activated(&mem, &vq, FEATURE_VERSION_1, config);
    let mut chains = Vec::new();
    for i in 0..3 {
        chains.extend(request(&mem, i, T_IN));
    }
    vq.add_desc_chains(&chains, 0).unwrap();
    dev.process_queue(0);
    assert_eq!(used_idx(&mem), 1);
    // Firecracker's PATCH /drives with a rate limiter: no limit now.
    dev.update_rate_limiter(RateLimiterConfig::default());
    assert_eq!(used_idx(&mem), 3);
    assert_eq!(status(&mem, 2), S_OK);
}

#[test]
fn one_limiter_holds_every_queue() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let img = TempImage::filled(1 << 20, 0x5A);
    // Two queues: rings at 0xA0000 and 0xC0000, used rings a page further.
    let rings: Vec<_> = [0xA_0000u64, 0xC_0000]
        .iter()
        .map(|base| MockSplitQueue::create(&mem, GuestAddress(*base), 16))
        .collect();
    let queues = rings
        .iter()
        .enumerate()
        .map(|(i, vq)| {
            let mut q: Queue = vq.create_queue().unwrap();
            let used = 0xA_0000 + 0x2_0000 * i as u64 + 0x1_0000;
            q.try_set_used_ring_address(GuestAddress(used)).unwrap();
            (i as u16, q, EventFd::new(EFD_NONBLOCK).unwrap())
        })
        .collect();
    let ctx = ActivateContext::new(
        mem.clone(),
        FEATURE_VERSION_1,
        queues,
        RecordingInterrupt::new(),
        NeedsReset::new(),
    );
    let mut config = BlockConfig::new(&img.0);
    config.queues = 2;
    config.poll_us = 100;
    // Two requests, refilled in 20 ms.
    config.rate_limiter.ops = Some(TokenBucketConfig {
        size: 2,
        one_time_burst: 0,
        refill_time_ms: 20,
    });
    let mut dev = Block::new(config).unwrap();
    let timer = dev.readable_fds().unwrap();
    dev.ack_features(FEATURE_VERSION_1);
    dev.activate(ctx).unwrap();
    let used = |i: u64| -> u16 {
        mem.read_obj(GuestAddress(0xA_0000 + 0x2_0000 * i + 0x1_0002))
            .unwrap()
    };
    // Queue 0: three reads (chains 0-2); queue 1: one (chain 3).
    let mut chains = Vec::new();
    for i in 0..3 {
        chains.extend(request(&mem, i, T_IN));
    }
    rings[0].add_desc_chains(&chains, 0).unwrap();
    let mut one: Vec<_> = request(&mem, 3, T_IN).into();
    // Chain 3's descriptors sit at 9..12 of its own table: renumber to 0..3.
    one[0] = desc(0x2_0300, 16, VRING_DESC_F_NEXT as u16, 1);
    one[1] = desc(
        0x4_3000,
        4096,
        (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
        2,
    );
    rings[1].add_desc_chains(&one, 0).unwrap();
    dev.process_queue(0);
    assert_eq!(used(0), 2);
    assert!(dev.rate_limiter().is_throttled());
    // The other queue is held too.
    dev.process_queue(1);
    assert_eq!(used(1), 0);
    // One token comes back every 10 ms: the timer fires for each held request in turn, or
    // for both if this thread runs late (then the first expiry serves both and arms no
    // timer). Wait on the timer only while the limiter holds the queues.
    let (token, fd) = &timer[0];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (used(0), used(1)) != (3, 1) {
        assert!(
            dev.rate_limiter().is_throttled(),
            "requests left in the ring with no timer armed: {:?}",
            (used(0), used(1))
        );
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(wait_readable(fd, left), "the timer fired");
        dev.process_device_event(*token);
    }
    assert_eq!(status(&mem, 3), S_OK);
    assert!(!dev.rate_limiter().is_throttled());
}
