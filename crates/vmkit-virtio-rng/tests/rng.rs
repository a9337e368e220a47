//! virtio-rng against virtio-drivers' `VirtIORng` (through vmkit-virtio's harness), and
//! against hostile rings built with virtio-queue's mock.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_drivers::device::rng::VirtIORng;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::test_utils::{
    activate_context, guest_memory, mock_queue, GuestHal, Harness, RecordingInterrupt,
};
use vmkit_virtio::{regs, InterruptReason, VirtioDevice, FEATURE_VERSION_1};
use vmkit_virtio_rng::{Rng, RngConfig};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

fn rng(limit: u32) -> Arc<Mutex<Rng>> {
    Arc::new(Mutex::new(
        Rng::new(RngConfig {
            max_bytes_per_chain: limit,
        })
        .unwrap(),
    ))
}

#[test]
fn one_mib_through_virtio_drivers() {
    let dev = rng(64 * 1024);
    let h = Harness::new(dev.clone());
    let mut driver = VirtIORng::<GuestHal, _>::new(h.transport()).unwrap();
    assert_eq!(h.read32(regs::STATUS), 0xF);

    let mut data = vec![0u8; 1 << 20];
    let mut requests = 0u64;
    let mut at = 0;
    // Chunks of several sizes, odd ones included.
    for size in [4096usize, 1, 333, 65536, 8191].iter().cycle() {
        if at == data.len() {
            break;
        }
        let end = (at + size).min(data.len());
        let n = driver.request_entropy(&mut data[at..end]).unwrap();
        assert_eq!(n, end - at, "used length of a {}-byte request", end - at);
        at = end;
        requests += 1;
    }

    // Not constant: every byte value shows up, and no two 4 KiB pages are equal.
    let mut seen = [0u32; 256];
    for b in &data {
        seen[usize::from(*b)] += 1;
    }
    assert!(seen.iter().all(|c| *c > 0));
    let mean = (1u32 << 20) / 256;
    assert!(
        seen.iter().all(|c| *c > mean / 2 && *c < mean * 2),
        "distribution"
    );
    let pages: std::collections::HashSet<&[u8]> = data.chunks(4096).collect();
    assert_eq!(pages.len(), 256);

    let stats = dev.lock().unwrap().stats();
    assert_eq!(stats.requests, requests);
    assert_eq!(stats.bytes, 1 << 20);
    assert_eq!(stats.bad_chains, 0);
    assert_eq!(h.interrupts(), requests);
}

#[test]
fn requests_are_bounded() {
    let h = Harness::new(rng(100));
    let mut driver = VirtIORng::<GuestHal, _>::new(h.transport()).unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(driver.request_entropy(&mut buf).unwrap(), 100);
    assert!(buf[100..].iter().all(|b| *b == 0));
}

#[test]
fn reset_and_use_again() {
    let dev = rng(64 * 1024);
    let h = Harness::new(dev.clone());
    for _ in 0..3 {
        let mut driver = VirtIORng::<GuestHal, _>::new(h.transport()).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(driver.request_entropy(&mut buf).unwrap(), 64);
        assert!(dev.lock().unwrap().is_active());
        drop(driver);
        assert!(!dev.lock().unwrap().is_active());
    }
}

// ---- hostile rings ----

const MEM: usize = 0x40_0000;
const POISON: u8 = 0x5A;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

struct Hostile {
    mem: GuestMemoryMmap,
    dev: Rng,
    irq: Arc<RecordingInterrupt>,
    needs_reset: vmkit_virtio::NeedsReset,
    used: GuestAddress,
}

/// A device activated on a mock ring holding `chains` (descriptor table from index 0),
/// with the data area (0x10000 up) poisoned.
fn hostile(limit: u32, chains: &[RawDescriptor]) -> Hostile {
    let mem = guest_memory(MEM);
    mem.write_slice(&vec![POISON; MEM - 0x1_0000], GuestAddress(0x1_0000))
        .unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(chains, 0).unwrap();
    let queue = mock_queue(&vq);
    let used = GuestAddress(queue.used_ring());
    let irq = RecordingInterrupt::new();
    let (ctx, needs_reset) =
        activate_context(&mem, FEATURE_VERSION_1, vec![(0, queue)], irq.clone());
    let mut dev = Rng::new(RngConfig {
        max_bytes_per_chain: limit,
    })
    .unwrap();
    dev.activate(ctx).unwrap();
    dev.process_queue(0);
    Hostile {
        mem,
        dev,
        irq,
        needs_reset,
        used,
    }
}

impl Hostile {
    /// The used length of used-ring entry `i`.
    fn used_len(&self, i: u64) -> u32 {
        self.mem
            .read_obj(self.used.unchecked_add(4 + 8 * i + 4))
            .unwrap()
    }
    fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
    }
    fn untouched(&self, addr: u64, len: usize) -> bool {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf.iter().all(|b| *b == POISON)
    }
}

#[test]
fn read_only_descriptors_are_never_written() {
    let h = hostile(
        1 << 16,
        &[
            desc(0x1_0000, 64, NEXT, 1),
            desc(0x2_0000, 64, WRITE | NEXT, 2),
            desc(0x3_0000, 64, NEXT, 3),
            desc(0x4_0000, 32, WRITE, 0),
        ],
    );
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.used_len(0), 96);
    assert!(h.untouched(0x1_0000, 64));
    assert!(h.untouched(0x3_0000, 64));
    assert!(!h.untouched(0x2_0000, 64));
    assert!(
        h.untouched(0x4_0000 + 32, 64),
        "nothing past the descriptor"
    );
    assert_eq!(h.dev.stats().readable_descriptors, 2);
    assert_eq!(h.irq.reasons(), [InterruptReason::Queue(0)]);
}

#[test]
fn empty_writable_descriptors_do_not_end_the_request() {
    // Found by the `rng` fuzz target: a zero-length writable descriptor ended the request,
    // so the chain was returned with 0 bytes (and the readable descriptor after it was not
    // counted) although it had 40 writable bytes.
    let h = hostile(
        1 << 16,
        &[
            desc(0x1_0000, 0, WRITE | NEXT, 1),
            desc(0x2_0000, 8, NEXT, 2),
            desc(0x3_0000, 40, WRITE, 0),
        ],
    );
    assert_eq!(h.used_len(0), 40);
    assert!(!h.untouched(0x3_0000, 40));
    assert!(
        h.untouched(0x3_0000 + 40, 64),
        "nothing past the descriptor"
    );
    assert!(h.untouched(0x2_0000, 8));
    assert_eq!(h.dev.stats().readable_descriptors, 1);
    assert_eq!(h.dev.stats().bytes, 40);
}

#[test]
fn only_read_only_descriptors_get_zero_bytes() {
    let h = hostile(1 << 16, &[desc(0x1_0000, 4096, 0, 0)]);
    assert_eq!(h.used_len(0), 0);
    assert!(h.untouched(0x1_0000, 4096));
}

#[test]
fn huge_lengths_are_bounded_by_the_limit() {
    // 1 MiB and 4 GiB - 1 buffers: the first is inside memory and gets the limit, the
    // second crosses the end of memory and is refused.
    let h = hostile(0x1_0000, &[desc(0x10_0000, 0x10_0000, WRITE, 0)]);
    assert_eq!(h.used_len(0), 0x1_0000);
    assert!(h.untouched(0x11_0000, 0x1000), "stops at the limit");

    let h = hostile(0x1_0000, &[desc(0x10_0000, u32::MAX, WRITE, 0)]);
    assert_eq!(h.used_len(0), 0);
    assert!(h.untouched(0x10_0000, 0x1000));
    assert_eq!(h.dev.stats().bad_chains, 1);
    assert!(!h.needs_reset.is_set(), "a bad request, not a broken ring");
}

#[test]
fn limit_spans_descriptors() {
    let h = hostile(
        0x1_0000,
        &[
            desc(0x1_0000, 0xA000, WRITE | NEXT, 1),
            desc(0x2_0000, 0xA000, WRITE, 0),
        ],
    );
    assert_eq!(h.used_len(0), 0x1_0000);
    assert!(h.untouched(0x2_0000 + 0x6000, 0x4000));
}

#[test]
fn chains_crossing_the_end_of_memory_are_refused_whole() {
    let end = MEM as u64;
    for chain in [
        vec![
            desc(0x1_0000, 16, WRITE | NEXT, 1),
            desc(end - 8, 16, WRITE, 0),
        ],
        vec![desc(end - 8, 16, WRITE, 0)],
        vec![desc(end, 1, WRITE, 0)],
        vec![desc(u64::MAX - 7, 16, WRITE, 0)],
    ] {
        let h = hostile(1 << 16, &chain);
        assert_eq!(h.used_idx(), 1, "the request is returned");
        assert_eq!(h.used_len(0), 0);
        assert!(h.untouched(0x1_0000, 16));
        assert!(h.untouched(end - 8, 8));
    }
}

#[test]
fn loops_and_overlong_chains_are_refused() {
    // 0 -> 1 -> 0.
    let h = hostile(
        1 << 16,
        &[
            desc(0x1_0000, 16, WRITE | NEXT, 1),
            desc(0x2_0000, 16, WRITE | NEXT, 0),
        ],
    );
    assert_eq!(h.used_len(0), 0);
    assert!(h.untouched(0x1_0000, 16) && h.untouched(0x2_0000, 16));
    // Every descriptor of the queue, the last pointing back to the first.
    let all: Vec<_> = (0..16u16)
        .map(|i| {
            desc(
                0x1_0000 + 0x100 * u64::from(i),
                16,
                WRITE | NEXT,
                (i + 1) % 16,
            )
        })
        .collect();
    let h = hostile(1 << 16, &all);
    assert_eq!(h.used_len(0), 0);
    assert!(h.untouched(0x1_0000, 0x1000));
}

#[test]
fn indirect_tables() {
    // A table full of poison (descriptors with NEXT set and bad next indices): refused.
    let h = hostile(1 << 16, &[desc(0x30_0000, 32, INDIRECT, 0)]);
    assert_eq!(h.used_len(0), 0);
    // A table outside memory, or of a length that is not a multiple of 16: refused.
    let h = hostile(1 << 16, &[desc(MEM as u64 - 16, 32, INDIRECT, 0)]);
    assert_eq!(h.used_len(0), 0);
    let h = hostile(1 << 16, &[desc(0x30_0000, 20, INDIRECT, 0)]);
    assert_eq!(h.used_len(0), 0);

    // Now with a real table: one read-only, one writable.
    let mem = guest_memory(MEM);
    mem.write_slice(&vec![POISON; MEM - 0x1_0000], GuestAddress(0x1_0000))
        .unwrap();
    mem.write_obj(desc(0x1_0000, 64, NEXT, 1), GuestAddress(0x30_0000))
        .unwrap();
    mem.write_obj(desc(0x2_0000, 64, WRITE, 0), GuestAddress(0x30_0010))
        .unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&[desc(0x30_0000, 32, INDIRECT, 0)], 0)
        .unwrap();
    let queue = mock_queue(&vq);
    let used = GuestAddress(queue.used_ring());
    let (ctx, _) = activate_context(
        &mem,
        FEATURE_VERSION_1,
        vec![(0, queue)],
        RecordingInterrupt::new(),
    );
    let mut dev = Rng::new(RngConfig::default()).unwrap();
    dev.activate(ctx).unwrap();
    dev.process_queue(0);
    let len: u32 = mem.read_obj(used.unchecked_add(8)).unwrap();
    assert_eq!(len, 64);
    let mut ro = [0u8; 64];
    mem.read_slice(&mut ro, GuestAddress(0x1_0000)).unwrap();
    assert_eq!(ro, [POISON; 64]);
}

#[test]
fn corrupt_ring_sets_needs_reset_without_panicking() {
    let mem = guest_memory(MEM);
    let vq = MockSplitQueue::new(&mem, 16);
    let queue = mock_queue(&vq);
    // A head index outside the queue, then an available index far ahead.
    mem.write_obj(99u16, vq.avail_addr().unchecked_add(4))
        .unwrap();
    mem.write_obj(1u16, vq.avail_addr().unchecked_add(2))
        .unwrap();
    let irq = RecordingInterrupt::new();
    let (ctx, needs_reset) =
        activate_context(&mem, FEATURE_VERSION_1, vec![(0, queue)], irq.clone());
    let mut dev = Rng::new(RngConfig::default()).unwrap();
    dev.activate(ctx).unwrap();
    dev.process_queue(0);
    assert!(needs_reset.is_set());
    assert_eq!(irq.reasons(), [InterruptReason::Config]);
    // Further notifications do nothing until reset; a notification for another queue too.
    mem.write_obj(500u16, vq.avail_addr().unchecked_add(2))
        .unwrap();
    dev.process_queue(0);
    dev.process_queue(7);
    assert!(dev.reset().is_some());
    assert!(!dev.is_active());
}

#[test]
fn activation_needs_the_queue() {
    let mem = guest_memory(MEM);
    let (ctx, _) = activate_context(&mem, FEATURE_VERSION_1, vec![], RecordingInterrupt::new());
    let mut dev = Rng::new(RngConfig::default()).unwrap();
    assert!(dev.activate(ctx).is_err());
    let vq = MockSplitQueue::new(&mem, 16);
    let q = mock_queue(&vq);
    assert_eq!(q.size(), 16);
}

#[test]
fn metrics_count_requests_bytes_and_malformed_chains() {
    use vmkit_virtio::{AtomicMetrics, MetricsSnapshot};
    let mem = guest_memory(MEM);
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(
        &[
            // 96 bytes over two buffers, 16 bytes, and a chain that loops.
            desc(0x2_0000, 64, WRITE | NEXT, 1),
            desc(0x3_0000, 32, WRITE, 0),
            desc(0x4_0000, 16, WRITE, 0),
            desc(0x5_0000, 16, WRITE | NEXT, 3),
        ],
        0,
    )
    .unwrap();
    let queue = mock_queue(&vq);
    let irq = RecordingInterrupt::new();
    let (ctx, _) = activate_context(&mem, FEATURE_VERSION_1, vec![(0, queue)], irq.clone());
    let metrics = Arc::new(AtomicMetrics::new());
    let mut dev = Rng::new(RngConfig::default())
        .unwrap()
        .with_metrics(metrics.clone());
    dev.activate(ctx).unwrap();
    dev.process_queue(0);
    assert_eq!(irq.reasons(), [InterruptReason::Queue(0)]);
    let expected = MetricsSnapshot {
        requests: 3,
        read_ops: 2,
        read_bytes: 112,
        malformed: 1,
        notifications: 1,
        interrupts: 1,
        ..MetricsSnapshot::default()
    };
    assert_eq!(metrics.snapshot(), expected);
    assert_eq!(dev.stats().bytes, 112);
}

#[test]
fn entropy_past_the_rate_limit_waits_for_the_timer() {
    use vmkit_virtio::{RateLimiterConfig, TokenBucketConfig};

    let mem = guest_memory(MEM);
    let vq = MockSplitQueue::new(&mem, 16);
    // Three requests of 1000 bytes.
    let chains: Vec<_> = (0..3u16)
        .map(|i| desc(0x1_0000 + u64::from(i) * 0x1000, 1000, WRITE, 0))
        .collect();
    vq.add_desc_chains(&chains, 0).unwrap();
    let queue = mock_queue(&vq);
    let used = GuestAddress(queue.used_ring());
    let irq = RecordingInterrupt::new();
    let (ctx, _) = activate_context(&mem, FEATURE_VERSION_1, vec![(0, queue)], irq);
    // 2000 bytes, refilled in 20 ms: two requests now, the third when the timer fires.
    let mut dev = Rng::new(RngConfig::default())
        .unwrap()
        .with_rate_limiter(RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 2000,
                one_time_burst: 0,
                refill_time_ms: 20,
            }),
            ops: None,
        });
    let timer = dev.readable_fds().unwrap();
    dev.activate(ctx).unwrap();
    dev.process_queue(0);
    let used_idx = |mem: &GuestMemoryMmap| mem.read_obj::<u16>(used.unchecked_add(2)).unwrap();
    assert_eq!(used_idx(&mem), 2);
    assert!(dev.rate_limiter().is_throttled());
    assert_eq!(dev.stats().bytes, 2000);
    let (token, fd) = &timer[0];
    assert!(
        vmkit_virtio::test_utils::wait_readable(fd, std::time::Duration::from_secs(10)),
        "the timer fired"
    );
    dev.process_device_event(*token);
    assert_eq!(used_idx(&mem), 3);
    assert_eq!(dev.stats().bytes, 3000);
}

#[test]
fn a_restored_device_serves_requests_left_in_the_ring_on_activation() {
    for restored in [false, true] {
        let mem = guest_memory(MEM);
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x1_0000, 64, VRING_DESC_F_WRITE as u16, 0)], 0)
            .unwrap();
        let queue = mock_queue(&vq);
        let used = GuestAddress(queue.used_ring());
        let (ctx, _) = activate_context(
            &mem,
            FEATURE_VERSION_1,
            vec![(0, queue)],
            RecordingInterrupt::new(),
        );
        let mut dev = Rng::new(RngConfig::default()).unwrap();
        if restored {
            let state = dev.state();
            dev.restore(&state).unwrap();
        }
        dev.activate(ctx).unwrap();
        // No notification: only a restored device looks at the ring by itself.
        let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
        assert_eq!(idx, u16::from(restored), "restored: {restored}");
        if restored {
            let len: u32 = mem.read_obj(used.unchecked_add(8)).unwrap();
            assert_eq!(len, 64);
        }
    }
}
