//! `vmkit_virtio_net::Net` through its real data path: descriptor tables and available rings
//! laid out in guest memory from fuzzer input, the device activated on them with arbitrary
//! features, then a sequence of queue notifications and backend events (frames from the
//! "host" of arbitrary sizes and contents) and resets.
//!
//! Guest memory is 128 KiB in two adjacent regions (buffers can straddle the boundary);
//! the receive, transmit and control queues (16 entries) sit in the first 12 KiB; buffers
//! are mostly inside the rest, sometimes near the end or anywhere. Indirect descriptors
//! are left out so the oracle knows every buffer.
//!
//! Oracles, besides "never panics" (overflow checks are on):
//! - guest memory changes only in the used rings and in buffers of descriptors marked
//!   device-writable;
//! - every frame the device hands the backend is a header plus at most `MAX_FRAME_LEN`
//!   bytes, and its header passes `NetHeader::check_tx` for the negotiated features with
//!   `num_buffers` zero.
#![no_main]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::{
    ActivateContext, InterruptReason, NeedsReset, VirtioDevice, VirtioInterrupt,
    FEATURE_RING_EVENT_IDX, FEATURE_VERSION_1,
};
use vmkit_virtio_net::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use virtio_queue::{Queue, QueueT};

const REGION: u64 = 0x1_0000;
const MEM: u64 = 2 * REGION;
const QSIZE: u16 = 16;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
/// Per queue: table at base, avail at base + 0x100, used at base + 0x200.
const QUEUE_BASES: [u64; 3] = [0x0, 0x1000, 0x2000];
const DATA: u64 = 0x3000;

#[derive(Arbitrary, Debug)]
enum Addr {
    Data(u16),
    NearEnd(u8),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
enum Len {
    Small(u8),
    Medium(u16),
    Any(u32),
}

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: Addr,
    len: Len,
    next: bool,
    writable: bool,
    next_index: u8,
}

#[derive(Arbitrary, Debug)]
struct QueueInput {
    descs: Vec<Desc>,
    heads: Vec<u8>,
    /// Added to the number of heads for the available index (a driver running ahead).
    extra_avail: Option<u16>,
}

/// A frame from the host: `size` bytes (mostly up to 2 KiB) of `fill`, with `dest` where the
/// Ethernet destination goes.
#[derive(Arbitrary, Debug)]
struct Frame {
    size: u16,
    large: bool,
    fill: u8,
    dest: [u8; 6],
}

#[derive(Arbitrary, Debug)]
enum Op {
    Notify(u8),
    FramesArrive,
    Reset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    features: u32,
    queues: [QueueInput; 3],
    frames: Vec<Frame>,
    ops: Vec<Op>,
    fill: u8,
}

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn trigger(&self, _: InterruptReason) -> std::io::Result<()> {
        Ok(())
    }
}

/// Frames waiting for the device, and what it sent, checked as it sends.
#[derive(Debug, Default)]
struct Host {
    waiting: VecDeque<Vec<u8>>,
    features: u64,
}

#[derive(Debug)]
struct FuzzBackend(Arc<Mutex<Host>>);

impl NetBackend for FuzzBackend {
    unsafe fn recv(&mut self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        let Some(frame) = self.0.lock().unwrap().waiting.pop_front() else {
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        let mut done = 0;
        for v in iov {
            let n = v.iov_len.min(frame.len() - done);
            // SAFETY: the caller guarantees each iovec is writable for its length.
            unsafe {
                std::ptr::copy_nonoverlapping(frame[done..].as_ptr(), v.iov_base.cast(), n)
            };
            done += n;
        }
        Ok(done)
    }

    unsafe fn send(&mut self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        let mut frame = Vec::new();
        for v in iov {
            // SAFETY: the caller guarantees each iovec is readable for its length.
            let s = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
            frame.extend_from_slice(s);
        }
        assert!(frame.len() >= NET_HDR_LEN && frame.len() <= NET_HDR_LEN + MAX_FRAME_LEN);
        let mut h = [0u8; NET_HDR_LEN];
        h.copy_from_slice(&frame[..NET_HDR_LEN]);
        let h = NetHeader::from_bytes(&h);
        let features = self.0.lock().unwrap().features;
        assert_eq!(h.check_tx(frame.len() - NET_HDR_LEN, features), Ok(()));
        assert_eq!(h.num_buffers, 0);
        Ok(frame.len())
    }

    fn supported_offloads(&self) -> Offloads {
        Offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO)
    }

    fn set_offloads(&mut self, _: Offloads) -> std::io::Result<()> {
        Ok(())
    }

    fn readable_fd(&self) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
        Ok(None)
    }
}

fn addr(a: &Addr) -> u64 {
    match a {
        Addr::Data(o) => DATA + u64::from(*o) % (MEM - DATA),
        Addr::NearEnd(b) => MEM - u64::from(*b),
        Addr::Any(x) => *x,
    }
}

fn len(l: &Len) -> u32 {
    match l {
        Len::Small(n) => u32::from(*n),
        Len::Medium(n) => u32::from(*n),
        Len::Any(n) => *n,
    }
}

/// Writes queue `q`'s table and available ring; returns the queue and the writable ranges.
fn lay_out(mem: &GuestMemoryMmap, base: u64, q: &QueueInput, event_idx: bool) -> (Queue, Vec<(u64, u64)>) {
    let mut writable = Vec::new();
    for (i, d) in q.descs.iter().take(usize::from(QSIZE)).enumerate() {
        let (a, l) = (addr(&d.addr), len(&d.len));
        let flags = if d.next { NEXT } else { 0 } | if d.writable { WRITE } else { 0 };
        let at = GuestAddress(base + 16 * i as u64);
        mem.write_obj(a, at).unwrap();
        mem.write_obj(l, GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        mem.write_obj(u16::from(d.next_index) % QSIZE, GuestAddress(at.0 + 14)).unwrap();
        if d.writable {
            writable.push((a, u64::from(l)));
        }
    }
    let avail = base + 0x100;
    let heads = q.heads.len().min(usize::from(QSIZE));
    for (i, h) in q.heads.iter().take(heads).enumerate() {
        let head = u16::from(*h) % QSIZE;
        mem.write_obj(head, GuestAddress(avail + 4 + 2 * i as u64)).unwrap();
    }
    let idx = (heads as u16).wrapping_add(q.extra_avail.unwrap_or(0));
    mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    let mut queue = Queue::new(QSIZE).unwrap();
    queue.set_desc_table_address(Some(base as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    (queue, writable)
}

fn changed_outside(before: &[u8], after: &[u8], allowed: &[(u64, u64)]) -> Option<usize> {
    if before == after {
        return None;
    }
    (0..before.len()).find(|&i| {
        before[i] != after[i]
            && !allowed
                .iter()
                .any(|(a, l)| (i as u64) >= *a && (i as u64) < a.saturating_add(*l))
    })
}

fuzz_target!(|input: Input| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), REGION as usize),
        (GuestAddress(REGION), REGION as usize),
    ])
    .unwrap();
    mem.write_slice(&vec![input.fill; MEM as usize], GuestAddress(0)).unwrap();
    let host = Arc::new(Mutex::new(Host::default()));
    let config = NetConfig::new(vec![Box::new(FuzzBackend(host.clone()))]);
    let mut dev = Net::new(config).unwrap();
    let features = (u64::from(input.features) & dev.device_features())
        | FEATURE_VERSION_1
        | (u64::from(input.features >> 31) * FEATURE_RING_EVENT_IDX);
    dev.ack_features(features);
    host.lock().unwrap().features = features;
    let event_idx = features & FEATURE_RING_EVENT_IDX != 0;
    let mut allowed: Vec<(u64, u64)> = QUEUE_BASES.iter().map(|b| (b + 0x200, 0x100)).collect();
    let mut queues = Vec::new();
    for (i, (q, base)) in input.queues.iter().zip(QUEUE_BASES).enumerate() {
        let (queue, writable) = lay_out(&mem, base, q, event_idx);
        allowed.extend(writable);
        queues.push((i as u16, queue, EventFd::new(EFD_NONBLOCK).unwrap()));
    }
    for f in input.frames.iter().take(8) {
        let size = match f.large {
            false => usize::from(f.size) % 2048,
            true => usize::from(f.size) % (NET_HDR_LEN + MAX_FRAME_LEN + 1),
        };
        let mut frame = vec![f.fill; size];
        if size >= NET_HDR_LEN + 6 {
            frame[NET_HDR_LEN..NET_HDR_LEN + 6].copy_from_slice(&f.dest);
        }
        host.lock().unwrap().waiting.push_back(frame);
    }
    let mut before = vec![0u8; MEM as usize];
    mem.read_slice(&mut before, GuestAddress(0)).unwrap();
    let ctx = ActivateContext::new(mem.clone(), features, queues, Arc::new(NoIrq), NeedsReset::new());
    if dev.activate(ctx).is_err() {
        return;
    }
    for op in input.ops.iter().take(32) {
        match op {
            Op::Notify(q) => dev.process_queue(u16::from(*q % 3)),
            Op::FramesArrive => dev.process_device_event(0),
            Op::Reset => {
                let _ = dev.reset();
                break;
            }
        }
    }
    let mut after = vec![0u8; MEM as usize];
    mem.read_slice(&mut after, GuestAddress(0)).unwrap();
    if let Some(i) = changed_outside(&before, &after, &allowed) {
        panic!("the device wrote guest memory at {i:#x}, outside the used rings and writable buffers");
    }
});
