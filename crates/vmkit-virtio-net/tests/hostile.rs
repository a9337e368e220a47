//! virtio-net against hand-built rings (virtio-queue's mock): hostile transmit and receive
//! chains are dropped and counted and the device keeps working; mergeable buffers, waiting
//! for buffers, the control queue and offloads, checked at the ring.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use common::{frame, socket_backend, with_header};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::test_utils::{
    activate_context, guest_memory, mock_queue, wait_readable, RecordingInterrupt,
};
use vmkit_virtio::{AtomicMetrics, Counter, NeedsReset, VirtioDevice, FEATURE_VERSION_1};
use vmkit_virtio_net::ctrl::{VIRTIO_NET_ERR, VIRTIO_NET_OK};
use vmkit_virtio_net::*;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const RINGS: [u64; 5] = [0x1000, 0x3000, 0x5000, 0x7000, 0x9000];
const ALL_OFFLOADS: Offloads =
    Offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO);

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

fn bit(b: u32) -> u64 {
    1 << b
}

struct Rig {
    mem: GuestMemoryMmap,
    dev: Net,
    hosts: Vec<UnixDatagram>,
    used: Vec<GuestAddress>,
    avail: Vec<GuestAddress>,
    applied: Vec<Arc<Mutex<Vec<Offloads>>>>,
    enabled: Vec<Arc<Mutex<Vec<bool>>>>,
    needs_reset: NeedsReset,
}

/// A device with `pairs` socket backends, `features` acked, activated on mock rings of 16
/// entries (queue i at `RINGS[i]`) holding `chains[i]`.
fn rig(pairs: usize, features: u64, chains: &[&[RawDescriptor]]) -> Rig {
    rig_with(pairs, features, chains, |_| {})
}

/// [`rig`], with `setup` writing guest memory first.
fn rig_with(
    pairs: usize,
    features: u64,
    chains: &[&[RawDescriptor]],
    setup: impl FnOnce(&GuestMemoryMmap),
) -> Rig {
    rig_full(pairs, features, chains, setup, |c| c)
}

/// [`rig_with`], with `tune` changing the configuration (metrics, rate limiters).
fn rig_full(
    pairs: usize,
    features: u64,
    chains: &[&[RawDescriptor]],
    setup: impl FnOnce(&GuestMemoryMmap),
    tune: impl FnOnce(NetConfig) -> NetConfig,
) -> Rig {
    let mem = guest_memory(16 << 20);
    setup(&mem);
    let (mut backends, mut hosts, mut applied) = (Vec::new(), Vec::new(), Vec::new());
    let mut enabled = Vec::new();
    for _ in 0..pairs {
        let (b, h) = socket_backend(ALL_OFFLOADS);
        applied.push(b.applied.clone());
        enabled.push(b.enabled.clone());
        backends.push(Box::new(b) as Box<dyn NetBackend>);
        hosts.push(h);
    }
    let mut config = NetConfig::new(backends);
    config.mac = Some(MAC);
    let mut dev = Net::new(tune(config)).unwrap();
    dev.ack_features(features | FEATURE_VERSION_1);
    let (mut queues, mut used, mut avail) = (Vec::new(), Vec::new(), Vec::new());
    for (i, c) in chains.iter().enumerate() {
        let vq = MockSplitQueue::create(&mem, GuestAddress(RINGS[i]), 16);
        if !c.is_empty() {
            vq.add_desc_chains(c, 0).unwrap();
        }
        let q = mock_queue(&vq);
        used.push(GuestAddress(q.used_ring()));
        avail.push(GuestAddress(q.avail_ring()));
        queues.push((i as u16, q));
    }
    let (ctx, needs_reset) = activate_context(
        &mem,
        features | FEATURE_VERSION_1,
        queues,
        RecordingInterrupt::new(),
    );
    dev.activate(ctx).unwrap();
    Rig {
        mem,
        dev,
        hosts,
        used,
        avail,
        applied,
        enabled,
        needs_reset,
    }
}

impl Rig {
    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(self.used[q].unchecked_add(2)).unwrap()
    }
    fn used_len(&self, q: usize, i: u64) -> u32 {
        self.mem
            .read_obj(self.used[q].unchecked_add(4 + 8 * i + 4))
            .unwrap()
    }
    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }
    /// Makes descriptor `index` (a new one-descriptor chain) available on queue `q` as
    /// available entry `slot`, and notifies the device.
    fn post(&mut self, q: usize, index: u16, d: RawDescriptor, slot: u16) {
        let table = GuestAddress(RINGS[q]);
        self.mem
            .write_obj(d, table.unchecked_add(16 * u64::from(index)))
            .unwrap();
        let avail = self.avail[q];
        self.mem
            .write_obj(index, avail.unchecked_add(4 + 2 * u64::from(slot)))
            .unwrap();
        self.mem
            .write_obj(slot + 1, avail.unchecked_add(2))
            .unwrap();
        self.dev.process_queue(q as u16);
    }
    fn recv_host(&self, pair: usize) -> Vec<u8> {
        let mut b = vec![0u8; 70000];
        let n = self.hosts[pair].recv(&mut b).unwrap();
        b.truncate(n);
        b
    }
}

#[test]
fn hostile_transmit_chains_are_dropped_counted_and_survived() {
    let payload = frame([0xff; 6], 60, 3);
    let setup = |mem: &GuestMemoryMmap| {
        // A good header of zeros at 0x10000 (split 5 + 7 at 0x10000 / 0x10005), payload at
        // 0x11000; a DATA_VALID header at 0x12000; a TSO header at 0x13000.
        mem.write_slice(&[0u8; 12], GuestAddress(0x1_0000)).unwrap();
        mem.write_slice(&payload, GuestAddress(0x1_1000)).unwrap();
        let mut bad = [0u8; 12];
        bad[0] = VIRTIO_NET_HDR_F_DATA_VALID;
        mem.write_slice(&bad, GuestAddress(0x1_2000)).unwrap();
        let tso = NetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        };
        mem.write_slice(&tso.to_bytes(), GuestAddress(0x1_3000))
            .unwrap();
    };
    let tx = [
        // 0: a zero-length descriptor.
        desc(0x1_0000, 0, 0, 0),
        // 1-3: header split across two descriptors, then the payload: sent.
        desc(0x1_0000, 5, NEXT, 2),
        desc(0x1_0005, 7, NEXT, 3),
        desc(0x1_1000, 60, 0, 0),
        // 4: a frame larger than 64 KiB + header.
        desc(0x2_0000, (NET_HDR_LEN + MAX_FRAME_LEN + 1) as u32, 0, 0),
        // 5-6: a device-writable descriptor in a transmit chain.
        desc(0x1_0000, 12, NEXT, 6),
        desc(0x1_1000, 60, WRITE, 0),
        // 7-8: a receive-only header flag.
        desc(0x1_2000, 12, NEXT, 8),
        desc(0x1_1000, 60, 0, 0),
        // 9-10: TSO without HOST_TSO4 negotiated.
        desc(0x1_3000, 12, NEXT, 10),
        desc(0x1_1000, 60, 0, 0),
        // 11: a header only, a 0-byte frame: sent (the TAP decides).
        desc(0x1_0000, 12, 0, 0),
    ];
    let mut r = rig_with(1, 0, &[&[], &tx], setup);
    r.dev.process_queue(1);

    let s = r.dev.stats();
    assert_eq!(s.tx_frames, 2, "the split-header frame and the empty one");
    assert_eq!(s.tx_bad_length, 2, "zero-length and oversized");
    assert_eq!(s.tx_malformed, 1, "device-writable buffer");
    assert_eq!(s.tx_bad_header, 2, "DATA_VALID and un-negotiated TSO");
    assert_eq!(r.used_idx(1), 7, "every chain returned");
    for i in 0..7 {
        assert_eq!(r.used_len(1, i), 0);
    }
    let got = r.recv_host(0);
    assert_eq!(&got[..12], &[0u8; 12]);
    assert!(got[12..] == payload[..], "split header frame");
    assert_eq!(r.recv_host(0), vec![0u8; 12]);
    assert!(!r.needs_reset.is_set());
}

#[test]
fn receive_buffers_too_small_or_readable_are_refused() {
    let rx = [
        desc(0x1_0000, 8, WRITE, 0),
        desc(0x1_1000, 2048, 0, 0),
        desc(0x1_2000, 2048, WRITE, 0),
    ];
    let mut r = rig(1, 0, &[&rx, &[]]);
    let f = frame(MAC, 200, 1);
    r.hosts[0].send(&with_header(&f)).unwrap();
    r.dev.process_device_event(0);
    let s = r.dev.stats();
    assert_eq!((s.rx_bad_chains, s.rx_frames, s.rx_buffers), (2, 1, 1));
    assert_eq!(r.used_idx(0), 3);
    assert_eq!((r.used_len(0, 0), r.used_len(0, 1)), (0, 0));
    assert_eq!(r.used_len(0, 2), 212);
    let got = r.read(0x1_2000, 212);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert!(got[12..] == f[..]);
    assert_eq!(
        r.read(0x1_1000, 4),
        [0; 4],
        "device-readable buffer not written"
    );
}

#[test]
fn mergeable_frames_span_chains_with_num_buffers() {
    // Four chains of 512 bytes: the device holds 1530 (MTU 1500 + 18 + header) before it
    // reads; a 1000-byte frame takes two.
    let rx: Vec<_> = (0..4)
        .map(|i| desc(0x1_0000 + 0x1000 * i, 512, WRITE, 0))
        .collect();
    let mut r = rig(1, bit(VIRTIO_NET_F_MRG_RXBUF), &[&rx, &[]]);
    let f = frame(MAC, 1000, 2);
    r.hosts[0].send(&with_header(&f)).unwrap();
    r.dev.process_device_event(0);
    assert_eq!(r.used_idx(0), 2);
    assert_eq!((r.used_len(0, 0), r.used_len(0, 1)), (512, 500));
    let mut got = r.read(0x1_0000, 512);
    got.extend(r.read(0x1_1000, 500));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert!(got[12..] == f[..]);
    // The other two chains (1024 bytes) cannot take the largest frame: the device waits
    // for buffers without reading the next frames.
    r.hosts[0].send(&with_header(&frame(MAC, 400, 3))).unwrap();
    r.hosts[0].send(&with_header(&frame(MAC, 300, 4))).unwrap();
    let waits = r.dev.stats().rx_waits;
    r.dev.process_device_event(0);
    assert_eq!(r.used_idx(0), 2);
    assert_eq!(r.dev.stats().rx_frames, 1);
    assert_eq!(r.dev.stats().rx_waits, waits + 1);
    // One more buffer: both frames arrive, each in one of the held 512-byte chains.
    r.post(0, 4, desc(0x1_4000, 2048, WRITE, 0), 4);
    assert_eq!(r.dev.stats().rx_frames, 3);
    assert_eq!(r.used_idx(0), 4);
    assert_eq!((r.used_len(0, 2), r.used_len(0, 3)), (412, 312));
    let got = r.read(0x1_3000, 312);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert!(got[12..] == frame(MAC, 300, 4)[..]);
}

#[test]
fn without_buffers_the_device_does_not_read_or_drop() {
    let mut r = rig(1, 0, &[&[], &[]]);
    let f = frame(MAC, 100, 5);
    r.hosts[0].send(&with_header(&f)).unwrap();
    let waits = r.dev.stats().rx_waits;
    r.dev.process_device_event(0);
    assert_eq!(r.dev.stats().rx_frames, 0);
    assert_eq!(r.dev.stats().rx_waits, waits + 1);
    r.post(0, 0, desc(0x1_0000, 2048, WRITE, 0), 0);
    assert_eq!(r.dev.stats().rx_frames, 1);
    assert!(r.read(0x1_0000 + 12, 100) == f);
}

#[test]
fn control_queue_filters_and_queue_pairs() {
    let features = bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_CTRL_RX) | bit(VIRTIO_NET_F_MQ);
    let rx: Vec<_> = (0..4)
        .map(|i| desc(0x1_0000 + 0x1000 * i, 2048, WRITE, 0))
        .collect();
    // Two pairs: rx0 tx0 rx1 tx1 ctrl(4).
    let mut r = rig(2, features, &[&rx, &[], &[], &[], &[]]);
    assert_eq!(r.dev.queue_max_sizes().len(), 5);
    // Promiscuous off: a frame for another MAC is dropped, one for ours arrives.
    let write_cmd = |r: &mut Rig, slot: u16, cmd: &[u8]| -> u8 {
        let at = 0x2_0000 + 0x100 * u64::from(slot);
        r.mem.write_slice(cmd, GuestAddress(at)).unwrap();
        let d = 2 * slot;
        let table = GuestAddress(RINGS[4]);
        r.mem
            .write_obj(
                desc(at, cmd.len() as u32, NEXT, d + 1),
                table.unchecked_add(16 * u64::from(d)),
            )
            .unwrap();
        r.mem
            .write_obj(
                desc(at + 0x80, 1, WRITE, 0),
                table.unchecked_add(16 * u64::from(d + 1)),
            )
            .unwrap();
        r.mem.write_obj(0xeeu8, GuestAddress(at + 0x80)).unwrap();
        let avail = r.avail[4];
        r.mem
            .write_obj(d, avail.unchecked_add(4 + 2 * u64::from(slot)))
            .unwrap();
        r.mem.write_obj(slot + 1, avail.unchecked_add(2)).unwrap();
        r.dev.process_queue(4);
        r.mem.read_obj(GuestAddress(at + 0x80)).unwrap()
    };
    assert_eq!(write_cmd(&mut r, 0, &[0, 0, 0]), VIRTIO_NET_OK);
    assert!(!r.dev.rx_filter().promiscuous);
    let other = [0x52, 0x54, 0, 0x12, 0x34, 0x99];
    r.hosts[0].send(&with_header(&frame(other, 80, 1))).unwrap();
    r.hosts[0].send(&with_header(&frame(MAC, 80, 2))).unwrap();
    r.dev.process_device_event(0);
    let s = r.dev.stats();
    assert_eq!((s.rx_filtered, s.rx_frames), (1, 1));
    assert_eq!(r.used_idx(0), 1, "the filtered frame took no buffer");
    // Queue pairs: 2 accepted, 3 (more than the device has) and 0 refused. The second
    // pair's backend receives only while the driver uses it.
    assert_eq!(r.dev.active_pairs(), 1);
    assert_eq!(r.enabled[1].lock().unwrap().last(), Some(&false));
    assert_eq!(write_cmd(&mut r, 1, &[4, 0, 2, 0]), VIRTIO_NET_OK);
    assert_eq!(r.dev.active_pairs(), 2);
    assert_eq!(r.enabled[1].lock().unwrap().last(), Some(&true));
    assert_eq!(r.enabled[0].lock().unwrap().last(), Some(&true));
    assert_eq!(write_cmd(&mut r, 2, &[4, 0, 3, 0]), VIRTIO_NET_ERR);
    assert_eq!(write_cmd(&mut r, 3, &[4, 0, 0, 0]), VIRTIO_NET_ERR);
    assert_eq!(r.dev.active_pairs(), 2);
    assert_eq!(r.dev.stats().ctrl_refused, 2);
    // A reset goes back to one pair.
    assert!(r.dev.reset().is_some());
    assert_eq!(r.enabled[1].lock().unwrap().last(), Some(&false));
}

#[test]
fn polling_windows_are_bounded() {
    let (b, _host) = socket_backend(Offloads::default());
    let mut config = NetConfig::new(vec![Box::new(b)]);
    config.poll_us = MAX_POLL_US + 1;
    assert!(matches!(Net::new(config), Err(Error::Poll(1001))));
}

#[test]
fn negotiated_guest_offloads_reach_the_backend_and_reset_clears_them() {
    let features = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);
    let mut r = rig(1, features, &[&[], &[]]);
    assert_eq!(
        *r.applied[0].lock().unwrap(),
        [Offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO4)]
    );
    assert!(r.dev.reset().is_some());
    assert_eq!(r.applied[0].lock().unwrap().last(), Some(&Offloads(0)));
    // Offered: what every backend supports.
    let offered = r.dev.device_features();
    for b in [
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MAC,
    ] {
        assert!(offered & bit(b) != 0, "bit {b}");
    }
    assert_eq!(offered & bit(VIRTIO_NET_F_MQ), 0, "one pair");
    assert_eq!(offered & bit(VIRTIO_NET_F_MTU), 0, "no MTU configured");
}

#[test]
fn metrics_count_frames_bytes_drops_and_malformed_chains() {
    use vmkit_virtio::{AtomicMetrics, MetricsSnapshot};
    let payload = frame([0xff; 6], 60, 3);
    let setup = |mem: &GuestMemoryMmap| {
        mem.write_slice(&[0u8; 12], GuestAddress(0x1_0000)).unwrap();
        mem.write_slice(&payload, GuestAddress(0x1_1000)).unwrap();
        // Control command: promiscuous mode off.
        mem.write_slice(&[0, 0, 0], GuestAddress(0x3_0000)).unwrap();
    };
    let ctrl = [desc(0x3_0000, 3, NEXT, 1), desc(0x3_0080, 1, WRITE, 0)];
    let tx = [
        // 0-1: a header and a 60-byte frame: sent.
        desc(0x1_0000, 12, NEXT, 1),
        desc(0x1_1000, 60, 0, 0),
        // 2-3: a device-writable buffer: malformed, found by the device.
        desc(0x1_0000, 12, NEXT, 3),
        desc(0x1_1000, 60, WRITE, 0),
        // 4: header only, a 0-byte frame: sent.
        desc(0x1_0000, 12, 0, 0),
        // 5: a descriptor that loops: malformed, found by the queue.
        desc(0x1_0000, 12, NEXT, 5),
    ];
    let rx = [
        // Too short for a header (the device refuses it), a good one, a loop (the queue
        // refuses it).
        desc(0x2_0000, 8, WRITE, 0),
        desc(0x2_1000, 2048, WRITE, 0),
        desc(0x2_2000, 2048, WRITE | NEXT, 2),
    ];
    let metrics = Arc::new(AtomicMetrics::new());
    let features = bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_CTRL_RX);
    let mut r = rig_full(1, features, &[&rx, &tx, &ctrl], setup, |c| {
        c.with_metrics(metrics.clone())
    });
    // Activation already filled the receive buffers: the short chain was refused (and
    // returned, with an interrupt).
    let at_start = metrics.snapshot();
    let expected = MetricsSnapshot {
        requests: 1,
        malformed: 1,
        interrupts: 1,
        ..MetricsSnapshot::default()
    };
    assert_eq!(at_start, expected);
    r.dev.process_queue(1);
    assert_eq!(r.used_idx(1), 4);
    let expected = MetricsSnapshot {
        requests: 4,
        write_ops: 2,
        write_bytes: 60,
        malformed: 2,
        notifications: 1,
        interrupts: 1,
        ..MetricsSnapshot::default()
    };
    assert_eq!(metrics.snapshot().since(&at_start), expected);

    // A control command: one request.
    let before = metrics.snapshot();
    r.dev.process_queue(2);
    assert!(!r.dev.rx_filter().promiscuous);
    let expected = MetricsSnapshot {
        requests: 1,
        notifications: 1,
        interrupts: 1,
        ..MetricsSnapshot::default()
    };
    assert_eq!(metrics.snapshot().since(&before), expected);

    // Receive: a frame for another MAC (filtered: dropped), then one for ours (190 bytes).
    let before = metrics.snapshot();
    r.hosts[0]
        .send(&with_header(&frame([2, 0, 0, 0, 0, 1], 100, 1)))
        .unwrap();
    let f = frame(MAC, 190, 2);
    r.hosts[0].send(&with_header(&f)).unwrap();
    r.dev.process_device_event(0);
    assert_eq!(r.used_idx(0), 3);
    assert_eq!(r.used_len(0, 1), 202);
    // The good chain took the frame; the loop was refused when the device looked for more.
    let expected = MetricsSnapshot {
        requests: 2,
        read_ops: 1,
        read_bytes: 190,
        dropped: 1,
        malformed: 1,
        interrupts: 1,
        ..MetricsSnapshot::default()
    };
    let got = metrics.snapshot().since(&before);
    assert_eq!(got, expected, "{:?}", r.dev.stats());
    assert_eq!(metrics.snapshot().malformed, 4);
}

#[test]
fn transmit_past_the_rate_limit_waits_in_the_ring_for_the_timer() {
    use vmkit_virtio::{RateLimiterConfig, TokenBucketConfig};
    let payload = frame([0xff; 6], 60, 3);
    let setup = |mem: &GuestMemoryMmap| {
        mem.write_slice(&[0u8; 12], GuestAddress(0x1_0000)).unwrap();
        mem.write_slice(&payload, GuestAddress(0x1_1000)).unwrap();
    };
    // Three frames; two frames refilled in 20 ms.
    let tx: Vec<_> = (0..3u16)
        .flat_map(|i| {
            [
                desc(0x1_0000, 12, NEXT, 2 * i + 1),
                desc(0x1_1000, 60, 0, 0),
            ]
        })
        .collect();
    let metrics = Arc::new(AtomicMetrics::new());
    let mut r = rig_full(1, 0, &[&[], &tx], setup, |mut c| {
        c.tx_rate_limiter = RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 2,
                one_time_burst: 0,
                refill_time_ms: 20,
            }),
        };
        c.with_metrics(metrics.clone())
    });
    let fds = r.dev.readable_fds().unwrap();
    r.dev.process_queue(1);
    assert_eq!(r.dev.stats().tx_frames, 2);
    assert_eq!(r.used_idx(1), 2, "the third is still in the ring");
    assert!(r.dev.tx_rate_limiter().is_throttled());
    assert_eq!(metrics.get(Counter::Throttled), 1);
    // The transmit limiter's timer is the last fd.
    let (token, fd) = fds.last().unwrap();
    assert!(
        wait_readable(fd, std::time::Duration::from_secs(10)),
        "the timer fired"
    );
    r.dev.process_device_event(*token);
    assert_eq!(r.dev.stats().tx_frames, 3);
    assert_eq!(r.used_idx(1), 3);
    for _ in 0..3 {
        assert_eq!(r.recv_host(0).len(), 72);
    }
}

#[test]
fn receive_past_the_rate_limit_waits_in_the_backend_for_the_timer() {
    use vmkit_virtio::{RateLimiterConfig, TokenBucketConfig};
    let rx: Vec<_> = (0..3u64)
        .map(|i| desc(0x1_0000 + i * 0x1000, 2048, WRITE, 0))
        .collect();
    // 100 bytes refilled in 20 ms: frames are read while the bucket is not in debt.
    let mut r = rig_full(
        1,
        0,
        &[&rx, &[]],
        |_| {},
        |mut c| {
            c.rx_rate_limiter = RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig {
                    size: 100,
                    one_time_burst: 0,
                    refill_time_ms: 20,
                }),
                ops: None,
            };
            c
        },
    );
    let fds = r.dev.readable_fds().unwrap();
    for seed in 0..3 {
        r.hosts[0]
            .send(&with_header(&frame(MAC, 100, seed)))
            .unwrap();
    }
    r.dev.process_device_event(0);
    // 100 bytes: the bucket is empty, not in debt; 200: in debt, the third waits.
    assert_eq!(r.dev.stats().rx_frames, 2);
    assert!(r.dev.rx_rate_limiter().is_throttled());
    // The backend becoming readable again does not bypass the limiter.
    r.dev.process_device_event(0);
    assert_eq!(r.dev.stats().rx_frames, 2);
    let (token, fd) = &fds[fds.len() - 2];
    assert!(
        wait_readable(fd, std::time::Duration::from_secs(10)),
        "the timer fired"
    );
    r.dev.process_device_event(*token);
    assert_eq!(r.dev.stats().rx_frames, 3);
    assert_eq!(r.used_idx(0), 3);
}

#[test]
fn updating_one_direction_leaves_the_other_alone() {
    use vmkit_virtio::{BucketUpdate, RateLimiterConfig, RateLimiterUpdate, TokenBucketConfig};
    let rx: Vec<_> = (0..3u64)
        .map(|i| desc(0x1_0000 + i * 0x1000, 2048, WRITE, 0))
        .collect();
    // Receive: 100 bytes refilled in an hour, and 10 frames; transmit: 5 frames.
    let bucket = |size, refill_time_ms| {
        Some(TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms,
        })
    };
    let metrics = Arc::new(AtomicMetrics::new());
    let mut r = rig_full(
        1,
        0,
        &[&rx, &[]],
        |_| {},
        |mut c| {
            c.rx_rate_limiter = RateLimiterConfig {
                bandwidth: bucket(100, 3_600_000),
                ops: bucket(10, 3_600_000),
            };
            c.tx_rate_limiter.ops = bucket(5, 3_600_000);
            c.with_metrics(metrics.clone())
        },
    );
    for seed in 0..3 {
        r.hosts[0]
            .send(&with_header(&frame(MAC, 100, seed)))
            .unwrap();
    }
    r.dev.process_device_event(0);
    assert_eq!(r.dev.stats().rx_frames, 2);
    assert!(r.dev.rx_rate_limiter().is_throttled());
    let rx_before = r.dev.rx_rate_limiter().bandwidth().unwrap().level();
    let throttled = metrics.get(Counter::Throttled);
    // A PATCH of the transmit limiter only: receive keeps its debt and stays held.
    let tx = RateLimiterConfig {
        bandwidth: None,
        ops: bucket(50, 1000),
    };
    r.dev.update_rate_limiters(RateLimiterUpdate::default(), tx);
    assert_eq!(r.dev.tx_rate_limiter().ops().unwrap().level(), 50);
    assert!(r.dev.rx_rate_limiter().is_throttled());
    assert_eq!(
        r.dev.rx_rate_limiter().bandwidth().unwrap().level(),
        rx_before
    );
    assert_eq!(
        metrics.get(Counter::Throttled),
        throttled,
        "receive was not let go and held again"
    );
    r.dev.process_device_event(0);
    assert_eq!(r.dev.stats().rx_frames, 2, "the third still waits");
    // A new receive ops bucket only: the bandwidth bucket keeps its debt, so the third
    // frame still waits (for the timer), and the ops bucket is the new one.
    let ops_only = RateLimiterUpdate {
        bandwidth: BucketUpdate::Keep,
        ops: BucketUpdate::Replace(bucket(20, 1000)),
    };
    r.dev
        .update_rate_limiters(ops_only, RateLimiterUpdate::default());
    assert_eq!(
        r.dev.rx_rate_limiter().bandwidth().unwrap().level(),
        rx_before
    );
    assert_eq!(r.dev.rx_rate_limiter().ops().unwrap().level(), 20);
    assert_eq!(r.dev.stats().rx_frames, 2);
    assert_eq!(r.dev.tx_rate_limiter().ops().unwrap().level(), 50);
}

#[test]
fn the_transmit_limiter_holds_every_transmit_queue() {
    use vmkit_virtio::{RateLimiterConfig, TokenBucketConfig};
    let payload = frame([0xff; 6], 60, 3);
    let setup = |mem: &GuestMemoryMmap| {
        mem.write_slice(&[0u8; 12], GuestAddress(0x1_0000)).unwrap();
        mem.write_slice(&payload, GuestAddress(0x1_1000)).unwrap();
    };
    let one = [desc(0x1_0000, 12, NEXT, 1), desc(0x1_1000, 60, 0, 0)];
    let two: Vec<_> = (0..2u16)
        .flat_map(|i| {
            [
                desc(0x1_0000, 12, NEXT, 2 * i + 1),
                desc(0x1_1000, 60, 0, 0),
            ]
        })
        .collect();
    // Two pairs; one frame an hour, for both.
    let mut r = rig_full(
        2,
        bit(VIRTIO_NET_F_MQ),
        &[&[], &two, &[], &one],
        setup,
        |mut c| {
            c.tx_rate_limiter = RateLimiterConfig {
                bandwidth: None,
                ops: Some(TokenBucketConfig {
                    size: 1,
                    one_time_burst: 0,
                    refill_time_ms: 3_600_000,
                }),
            };
            c
        },
    );
    r.dev.process_queue(1);
    assert_eq!(r.used_idx(1), 1, "one frame, then held");
    assert!(r.dev.tx_rate_limiter().is_throttled());
    // Both transmit queues are held (unpolled), the receive queues are not.
    assert!(r.dev.is_queue_held(1));
    assert!(r.dev.is_queue_held(3), "the other pair's transmit queue");
    assert!(!r.dev.is_queue_held(0) && !r.dev.is_queue_held(2));
    // Lifted: both let go (pair 0 served; the driver never enabled pair 1 with
    // MQ_VQ_PAIRS_SET, so its queue is not served).
    r.dev.update_rate_limiters(
        vmkit_virtio::RateLimiterUpdate::default(),
        RateLimiterConfig::default(),
    );
    assert!(!r.dev.is_queue_held(1) && !r.dev.is_queue_held(3));
    assert_eq!(r.used_idx(1), 2);
}

#[test]
fn quiesce_gives_held_buffers_back_and_a_restored_device_keeps_pairs_and_filter() {
    let features = bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_CTRL_RX) | bit(VIRTIO_NET_F_MQ);
    let rx: Vec<_> = (0..4)
        .map(|i| desc(0x1_0000 + 0x1000 * i, 2048, WRITE, 0))
        .collect();
    let mut r = rig(2, features, &[&rx, &[], &[], &[], &[]]);
    let ctrl = |r: &mut Rig, slot: u16, cmd: &[u8]| {
        let at = 0x2_0000 + 0x100 * u64::from(slot);
        r.mem.write_slice(cmd, GuestAddress(at)).unwrap();
        let d = 2 * slot;
        let table = GuestAddress(RINGS[4]);
        let chain = [
            desc(at, cmd.len() as u32, NEXT, d + 1),
            desc(at + 0x80, 1, WRITE, 0),
        ];
        for (i, c) in chain.iter().enumerate() {
            let at = table.unchecked_add(16 * (u64::from(d) + i as u64));
            r.mem.write_obj(*c, at).unwrap();
        }
        let avail = r.avail[4];
        r.mem
            .write_obj(d, avail.unchecked_add(4 + 2 * u64::from(slot)))
            .unwrap();
        r.mem.write_obj(slot + 1, avail.unchecked_add(2)).unwrap();
        r.dev.process_queue(4);
        let status: u8 = r.mem.read_obj(GuestAddress(at + 0x80)).unwrap();
        assert_eq!(status, VIRTIO_NET_OK);
    };
    // Promiscuous off, two pairs in use.
    ctrl(&mut r, 0, &[0, 0, 0]);
    ctrl(&mut r, 1, &[4, 0, 2, 0]);
    r.hosts[0].send(&with_header(&frame(MAC, 80, 1))).unwrap();
    r.dev.process_device_event(0);
    assert_eq!(r.used_idx(0), 1);
    // The device took the next buffer for a frame that has not come: quiesce gives it
    // back to the ring, unused (nothing in the used ring)...
    r.dev.quiesce();
    assert_eq!(r.used_idx(0), 1, "nothing completed");
    // ...and the next frame lands in it, whole.
    let second = with_header(&frame(MAC, 90, 2));
    r.hosts[0].send(&second).unwrap();
    r.dev.process_device_event(0);
    assert_eq!(r.used_idx(0), 2);
    assert_eq!(r.used_len(0, 1) as usize, second.len());
    r.dev.quiesce();

    // The driver queues a frame on the second pair while the VM is paused: its
    // notification never reaches the device.
    let out = with_header(&frame([0xff; 6], 60, 4));
    r.mem.write_slice(&out, GuestAddress(0x3_0000)).unwrap();
    r.mem
        .write_obj(
            desc(0x3_0000, out.len() as u32, 0, 0),
            GuestAddress(RINGS[3]),
        )
        .unwrap();
    r.mem.write_obj(0u16, r.avail[3].unchecked_add(4)).unwrap();
    r.mem.write_obj(1u16, r.avail[3].unchecked_add(2)).unwrap();

    let state = r.dev.state();
    assert_eq!(state.active_pairs, 2);
    assert!(!state.promiscuous);
    assert_eq!(state.mac, Some(MAC));
    let ctx = r.dev.reset().expect("was active");

    // A device on new backends (a network override), restored, re-activated on the rings.
    let (mut backends, mut hosts, mut enabled) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..2 {
        let (b, h) = socket_backend(ALL_OFFLOADS);
        enabled.push(b.enabled.clone());
        backends.push(Box::new(b) as Box<dyn NetBackend>);
        hosts.push(h);
    }
    let mut config = NetConfig::new(backends);
    config.mac = Some([2, 0, 0, 0, 0, 9]);
    let mut fresh = Net::new(config).unwrap();
    fresh.restore(&state).unwrap();
    fresh.ack_features(features | FEATURE_VERSION_1);
    fresh.activate(ctx).unwrap();
    r.dev = fresh;
    r.hosts = hosts;
    // Sent during the activation already: a read that would block fails the test.
    r.hosts[1].set_nonblocking(true).unwrap();
    assert_eq!(r.recv_host(1), out, "the waiting frame went out");
    assert_eq!(r.used_idx(3), 1);
    assert_eq!(r.dev.active_pairs(), 2, "pairs in use restored");
    assert_eq!(enabled[1].lock().unwrap().last(), Some(&true));
    assert!(!r.dev.rx_filter().promiscuous, "filter restored");
    let mut mac = [0u8; 6];
    r.dev.read_config(0, &mut mac[..4]);
    r.dev.read_config(4, &mut mac[4..]);
    assert_eq!(mac, MAC, "the MAC comes from the state");
    // It works: a frame for another MAC is filtered, one for ours lands in the next buffer.
    let other = [0x52, 0x54, 0, 0x12, 0x34, 0x99];
    r.hosts[0].send(&with_header(&frame(other, 80, 2))).unwrap();
    r.hosts[0].send(&with_header(&frame(MAC, 80, 3))).unwrap();
    r.dev.process_device_event(0);
    assert_eq!(r.used_idx(0), 3);
    assert_eq!(r.dev.stats().rx_filtered, 1);
    assert_eq!(r.read(0x1_2000 + NET_HDR_LEN as u64, 80), frame(MAC, 80, 3));
}

#[test]
fn a_state_that_does_not_fit_the_device_is_refused() {
    let mut r = rig(1, 0, &[&[], &[]]);
    let good = r.dev.state();
    let mut two_pairs = good.clone();
    two_pairs.pairs = 2;
    two_pairs.active_pairs = 2;
    let mut no_mac = good.clone();
    no_mac.mac = None;
    for bad in [two_pairs, no_mac] {
        assert!(matches!(r.dev.restore(&bad), Err(Error::State(_))));
    }
    r.dev.restore(&good).unwrap();
}
