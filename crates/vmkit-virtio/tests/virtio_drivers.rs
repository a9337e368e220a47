//! Our transport and queue plumbing driven by virtio-drivers, a driver written elsewhere:
//! device initialisation, feature negotiation, queue setup, notifications, used ring,
//! interrupt status and acknowledgement, indirect descriptors, event index, reset and
//! reuse.

use std::sync::{Arc, Mutex};

mod common;
use common::PatternRng;

use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::{DeviceStatus, InterruptStatus, Transport};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmkit_virtio::test_utils::{GuestHal, Harness};
use vmkit_virtio::{
    regs, ActivateContext, ActivateError, VirtioDevice, FEATURE_RING_EVENT_IDX,
    FEATURE_RING_INDIRECT_DESC, FEATURE_VERSION_1,
};

fn rng_harness(dev: PatternRng) -> (Harness, Arc<Mutex<PatternRng>>) {
    let dev = Arc::new(Mutex::new(dev));
    (Harness::new(dev.clone()), dev)
}

#[test]
fn rng_init_negotiation_and_requests() {
    let (h, dev) = rng_harness(PatternRng::default());
    let mut rng = VirtIORng::<GuestHal, _>::new(h.transport()).unwrap();

    // virtio-drivers accepted what we offered and it supports: both ring features.
    let acked = dev.lock().unwrap().acked;
    assert_eq!(
        acked,
        FEATURE_VERSION_1 | FEATURE_RING_EVENT_IDX | FEATURE_RING_INDIRECT_DESC
    );
    {
        let mmio = h.mmio();
        assert!(mmio.is_activated());
        assert_eq!(mmio.status(), 0xF); // ACK | DRIVER | FEATURES_OK | DRIVER_OK
    }

    let mut expected = 0u8;
    for len in [1usize, 7, 64, 512, 4096, 3] {
        let mut buf = vec![0u8; len];
        let n = rng.request_entropy(&mut buf).unwrap();
        assert_eq!(n, len, "used length");
        for b in &buf {
            expected = expected.wrapping_add(1);
            assert_eq!(*b, expected);
        }
    }
    // Every request interrupted (virtio-drivers moves used_event along as it pops).
    assert_eq!(h.interrupts(), 6);
    assert!(
        rng.ack_interrupt() == InterruptStatus::QUEUE_INTERRUPT,
        "InterruptStatus bit 0"
    );
    assert!(
        rng.ack_interrupt() == InterruptStatus::empty(),
        "acknowledged"
    );
}

#[test]
fn rng_reset_and_reuse() {
    let (h, dev) = rng_harness(PatternRng::default());
    for round in 1..=3 {
        let mut rng = VirtIORng::<GuestHal, _>::new(h.transport()).unwrap();
        let mut buf = [0u8; 32];
        assert_eq!(rng.request_entropy(&mut buf).unwrap(), 32);
        assert_eq!(dev.lock().unwrap().activations, round);
        drop(rng); // queue_unset, then the transport's drop writes Status = 0
        assert!(!h.mmio().is_activated());
        assert_eq!(h.mmio().status(), 0);
        assert!(dev.lock().unwrap().active.is_none());
        assert_eq!(GuestHal::pages_in_use(), 0, "driver freed its rings");
    }
}

#[test]
fn rng_without_ring_features_honours_no_interrupt() {
    let (h, dev) = rng_harness(PatternRng {
        ring_features: Some(0),
        ..Default::default()
    });
    let mut rng = VirtIORng::<GuestHal, _>::new(h.transport()).unwrap();
    assert_eq!(dev.lock().unwrap().acked, FEATURE_VERSION_1);
    let mut buf = [0u8; 16];
    rng.request_entropy(&mut buf).unwrap();
    assert_eq!(h.interrupts(), 1);
    // VRING_AVAIL_F_NO_INTERRUPT: the device still serves, but does not interrupt.
    rng.disable_interrupts();
    for _ in 0..5 {
        assert_eq!(rng.request_entropy(&mut buf).unwrap(), 16);
    }
    assert_eq!(h.interrupts(), 1);
    rng.enable_interrupts();
    rng.request_entropy(&mut buf).unwrap();
    assert_eq!(h.interrupts(), 2);
}

#[test]
fn event_idx_fields_follow_the_rings() {
    // With EVENT_IDX the device publishes avail_event (after the used ring) as it consumes,
    // and interrupts only when virtio-drivers' used_event says so: it moves used_event along
    // as it pops, so each request interrupts once.
    let (h, dev) = rng_harness(PatternRng::default());
    let mut rng = VirtIORng::<GuestHal, _>::new(h.transport()).unwrap();
    let mut buf = [0u8; 8];
    for _ in 0..20 {
        rng.request_entropy(&mut buf).unwrap();
    }
    assert_eq!(h.interrupts(), 20);
    let (used_ring, size, event_idx) = {
        let d = dev.lock().unwrap();
        let q = d.active.as_ref().unwrap().queue(0).unwrap().state();
        (q.used_ring, q.size, q.event_idx_enabled)
    };
    assert!(event_idx);
    let avail_event: u16 = h
        .memory()
        .read_obj(vm_memory::GuestAddress(used_ring + 4 + 8 * u64::from(size)))
        .unwrap();
    assert_eq!(avail_event, 20);
    let used_idx: u16 = h
        .memory()
        .read_obj(vm_memory::GuestAddress(used_ring + 2))
        .unwrap();
    assert_eq!(used_idx, 20);
}

/// A RAM disk serving virtio-blk requests: multi-descriptor chains, which virtio-drivers
/// sends through indirect tables once `VIRTIO_F_RING_INDIRECT_DESC` is negotiated.
struct RamDisk {
    disk: Vec<u8>,
    capacity: u64,
    acked: u64,
    requests: usize,
    active: Option<ActivateContext>,
}

impl RamDisk {
    fn new(sectors: usize) -> Self {
        Self {
            disk: vec![0; sectors * SECTOR_SIZE],
            capacity: sectors as u64,
            acked: 0,
            requests: 0,
            active: None,
        }
    }

    fn config(&self) -> [u8; 8] {
        self.capacity.to_le_bytes()
    }
}

fn serve_blk(disk: &mut [u8], mem: &GuestMemoryMmap, descs: &[vmkit_virtio::Descriptor]) -> u32 {
    let (header, rest) = descs.split_first().unwrap();
    let (status, data) = rest.split_last().unwrap();
    let mut h = [0u8; 16];
    mem.read_slice(&mut h, header.addr()).unwrap();
    let kind = u32::from_le_bytes(h[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(h[8..16].try_into().unwrap()) as usize;
    let mut at = sector * SECTOR_SIZE;
    let mut written = 0;
    for d in data {
        let len = d.len() as usize;
        match kind {
            0 => {
                mem.write_slice(&disk[at..at + len], d.addr()).unwrap();
                written += d.len();
            }
            1 => mem.read_slice(&mut disk[at..at + len], d.addr()).unwrap(),
            _ => {}
        }
        at += len;
    }
    mem.write_obj(0u8, status.addr()).unwrap();
    written + 1
}

impl VirtioDevice for RamDisk {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn device_features(&self) -> u64 {
        0
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            if let Some(v) = cfg.get(offset as usize + i) {
                *b = *v;
            }
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.active = Some(ctx);
        Ok(())
    }
    fn process_queue(&mut self, index: u16) {
        let disk = &mut self.disk;
        let requests = &mut self.requests;
        let Some(q) = self.active.as_mut().and_then(|c| c.queue_mut(index)) else {
            return;
        };
        while let Some(chain) = q.pop().unwrap() {
            *requests += 1;
            let len = match chain.descriptors() {
                Ok(descs) if descs.len() >= 2 => serve_blk(disk, chain.memory(), descs),
                _ => 0,
            };
            let head = chain.head();
            q.complete(head, len).unwrap();
        }
        q.signal_used().unwrap();
    }
    fn reset(&mut self) -> Option<ActivateContext> {
        self.active.take()
    }
}

#[test]
fn blk_config_space_and_indirect_chains() {
    let dev = Arc::new(Mutex::new(RamDisk::new(64)));
    let h = Harness::new(dev.clone());
    let mut blk = VirtIOBlk::<GuestHal, _>::new(h.transport()).unwrap();
    assert_eq!(blk.capacity(), 64, "capacity through config space");
    assert_ne!(dev.lock().unwrap().acked & FEATURE_RING_INDIRECT_DESC, 0);

    let data: Vec<u8> = (0..4 * SECTOR_SIZE).map(|i| (i * 7) as u8).collect();
    blk.write_blocks(3, &data).unwrap();
    assert_eq!(
        &dev.lock().unwrap().disk[3 * SECTOR_SIZE..7 * SECTOR_SIZE],
        &data[..]
    );
    let mut back = vec![0u8; 4 * SECTOR_SIZE];
    blk.read_blocks(3, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(dev.lock().unwrap().requests, 2);
    assert_eq!(h.interrupts(), 2);
}

#[test]
fn config_space_widths() {
    // A capacity above 32 bits (the disk itself stays small).
    let mut disk = RamDisk::new(1);
    disk.capacity = 0x1_0000_0002 / 512 + 1;
    let dev = Arc::new(Mutex::new(disk));
    let h = Harness::new(dev);
    let mut t = h.transport();
    // 8 bytes: one 64-bit access, served as two 32-bit halves.
    let cap: u64 = t.read_config_space(0).unwrap();
    let sectors = 0x1_0000_0002u64 / 512 + 1;
    assert_eq!(cap, sectors);
    let lo: u32 = t.read_config_space(0).unwrap();
    let b: u8 = t.read_config_space(1).unwrap();
    let w: u16 = t.read_config_space(2).unwrap();
    assert_eq!(u64::from(lo), sectors & 0xFFFF_FFFF);
    assert_eq!(b, (sectors >> 8) as u8);
    assert_eq!(w, (sectors >> 16) as u16);
    // A driver's status dance over the same handlers.
    t.set_status(DeviceStatus::ACKNOWLEDGE);
    assert_eq!(t.get_status(), DeviceStatus::ACKNOWLEDGE);
    assert_eq!(h.read32(regs::DEVICE_ID), 2);
}

/// A snapshot mid-use restored into a new transport and device over the same memory: the
/// driver carries on, the device gets its queue at the saved ring positions.
#[test]
fn rng_continues_after_restore_into_a_new_transport() {
    let (h, dev) = rng_harness(PatternRng::default());
    let mut rng = VirtIORng::<GuestHal, _>::new(h.transport()).unwrap();
    let mut buf = [0u8; 16];
    for _ in 0..5 {
        assert_eq!(rng.request_entropy(&mut buf).unwrap(), 16);
    }
    let state = h.mmio().state();
    assert!(state.common.activated);
    let q = &state.common.queues[0];
    assert!(q.active);
    assert_eq!((q.queue.next_avail, q.queue.next_used), (5, 5));
    let size = q.queue.size;
    assert!(size.is_power_of_two() && size <= 16, "{size}");
    // Through a serializer, as a VMM writes it to a file.
    let json = serde_json::to_string(&state).unwrap();
    let state: vmkit_virtio::MmioTransportState = serde_json::from_str(&json).unwrap();

    // The new device: its own state (the pattern) carried over by hand.
    let next = dev.lock().unwrap().next;
    let dev2 = Arc::new(Mutex::new(PatternRng {
        next,
        ..PatternRng::default()
    }));
    let before = h.interrupts();
    h.restore_transport(dev2.clone(), &state).unwrap();
    // One interrupt for the queue (none for the configuration, which did not change).
    assert_eq!(h.interrupts(), before + 1);
    {
        let d = dev2.lock().unwrap();
        assert_eq!(d.acked, state.common.driver_features);
        assert_eq!(d.activations, 1);
        let s = d.active.as_ref().unwrap().queue(0).unwrap().state();
        assert_eq!((s.next_avail, s.next_used, s.size), (5, 5, size));
    }
    assert_eq!(h.mmio().status(), 0xF);
    assert_eq!(h.mmio().state(), state_after_kick(&state));

    let mut expected = next;
    for _ in 0..20 {
        assert_eq!(rng.request_entropy(&mut buf).unwrap(), 16);
        for b in &buf {
            expected = expected.wrapping_add(1);
            assert_eq!(*b, expected);
        }
    }
    let s = h.mmio().state();
    assert_eq!(s.common.queues[0].queue.next_used, 25);
}

/// The state after the restore raised its queues' interrupts: the used-ring status bit,
/// the configuration generation unchanged (no configuration change is announced).
fn state_after_kick(state: &vmkit_virtio::MmioTransportState) -> vmkit_virtio::MmioTransportState {
    let mut s = state.clone();
    s.interrupt_status |= 1;
    s
}

#[test]
fn hostile_transport_states_are_refused() {
    let (h, _dev) = rng_harness(PatternRng::default());
    let mut rng = VirtIORng::<GuestHal, _>::new(h.transport()).unwrap();
    let mut buf = [0u8; 8];
    rng.request_entropy(&mut buf).unwrap();
    let good = h.mmio().state();
    type Edit = fn(&mut vmkit_virtio::MmioTransportState);
    let cases: [(&str, Edit); 14] = [
        ("device type", |s| s.common.device_type = 2),
        ("offered", |s| s.common.offered_features = 0),
        ("queues", |s| s.common.queues.clear()),
        ("status", |s| s.common.status |= 0x1000),
        ("maximum size", |s| s.common.queues[0].queue.max_size = 32),
        ("size 3", |s| s.common.queues[0].queue.size = 3),
        ("0x1001", |s| s.common.queues[0].queue.desc_table = 0x1001),
        ("outside guest memory", |s| {
            s.common.queues[0].queue.used_ring = 1 << 40;
            s.common.queues[0].addrs[2] = 1 << 40;
        }),
        ("area register", |s| s.common.queues[0].addrs[0] += 0x1000),
        ("EVENT_IDX", |s| {
            s.common.queues[0].queue.event_idx_enabled ^= true;
        }),
        ("ahead", |s| s.common.queues[0].queue.next_avail = 1000),
        ("DRIVER_OK", |s| s.common.status = 0x3),
        ("active", |s| s.common.activated = false),
        ("interrupt status", |s| s.interrupt_status = 0x80),
    ];
    for (expected, edit) in cases {
        let mut s = good.clone();
        edit(&mut s);
        let dev2 = Arc::new(Mutex::new(PatternRng::default()));
        let err = h.restore_transport(dev2.clone(), &s).unwrap_err();
        assert!(
            matches!(err, vmkit_virtio::Error::InvalidState(_)),
            "{expected}: {err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(expected), "{expected}: {msg}");
        assert!(dev2.lock().unwrap().active.is_none(), "{expected}");
    }
    // The good state still restores.
    let dev2 = Arc::new(Mutex::new(PatternRng::default()));
    h.restore_transport(dev2, &good).unwrap();
}
