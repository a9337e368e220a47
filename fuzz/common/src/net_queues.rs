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
//!   device-writable (unless such a buffer overlaps a descriptor table or available ring:
//!   the device may then rewrite its own orders, and [`WriteOracle`] skips the check);
//! - every frame the device hands the backend is a header plus at most `MAX_FRAME_LEN`
//!   bytes, and its header passes `NetHeader::check_tx` for the negotiated features with
//!   `num_buffers` zero.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use arbitrary::{Arbitrary, Unstructured};
use virtio_queue::{Queue, QueueT};
use vmkit_virtio::{
    ActivateContext, InterruptReason, NeedsReset, VirtioDevice, VirtioInterrupt,
    FEATURE_RING_EVENT_IDX, FEATURE_VERSION_1,
};
use vmkit_virtio_net::{
    Net, NetBackend, NetConfig, NetHeader, Offloads, MAX_FRAME_LEN, NET_HDR_LEN,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest::{Guest, WriteOracle};
use crate::ring::{self, Ring, F_NEXT, F_WRITE};

const REGION: u64 = 0x1_0000;
const MEM: u64 = 2 * REGION;
const QSIZE: u16 = 16;
/// Per queue: table at base, avail at base + 0x100, used at base + 0x200.
const QUEUE_BASES: [u64; 3] = [0x0, 0x1000, 0x2000];
const DATA: u64 = 0x3000;

/// A buffer's address.
#[derive(Arbitrary, Debug)]
pub enum Addr {
    /// In the data area (modulo its size).
    Data(u16),
    /// This many bytes before the end of memory.
    NearEnd(u8),
    /// Anywhere.
    Any(u64),
}

/// A buffer's length.
#[derive(Arbitrary, Debug)]
pub enum Len {
    /// 0–255 bytes.
    Small(u8),
    /// 0–65535 bytes.
    Medium(u16),
    /// Anything.
    Any(u32),
}

/// One descriptor of a table.
#[derive(Arbitrary, Debug)]
pub struct Desc {
    /// Its buffer.
    pub addr: Addr,
    /// Its length.
    pub len: Len,
    /// `NEXT` set.
    pub next: bool,
    /// `WRITE` set.
    pub writable: bool,
    /// Its `next` (modulo the queue size).
    pub next_index: u8,
}

/// One queue's contents at activation.
#[derive(Arbitrary, Debug)]
pub struct QueueInput {
    /// The table, from index 0 (at most 16).
    pub descs: Vec<Desc>,
    /// Heads made available (modulo the queue size; at most 16).
    pub heads: Vec<u8>,
    /// Added to the number of heads for the available index (a driver running ahead).
    pub extra_avail: Option<u16>,
}

/// A frame from the host: `size` bytes (mostly up to 2 KiB) of `fill`, with `dest` where the
/// Ethernet destination goes.
#[derive(Arbitrary, Debug)]
pub struct Frame {
    /// Its size (modulo 2 KiB, or the largest frame when `large`).
    pub size: u16,
    /// Up to a header plus `MAX_FRAME_LEN` bytes.
    pub large: bool,
    /// Every byte.
    pub fill: u8,
    /// The Ethernet destination.
    pub dest: [u8; 6],
}

/// One event.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// The driver notifies queue `q % 3`.
    Notify(u8),
    /// The backend is readable.
    FramesArrive,
    /// The device is reset (the run ends).
    Reset,
}

/// The fuzzer's input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// Features offered (masked with the device's; bit 31 is `EVENT_IDX`).
    pub features: u32,
    /// Receive, transmit and control queues.
    pub queues: [QueueInput; 3],
    /// Frames waiting on the host (at most 8).
    pub frames: Vec<Frame>,
    /// Events (at most 32).
    pub ops: Vec<Op>,
    /// Every byte of guest memory before the tables are written.
    pub fill: u8,
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
    sent: usize,
}

#[derive(Debug)]
struct FuzzBackend(Arc<Mutex<Host>>);

impl FuzzBackend {
    fn host(&self) -> std::sync::MutexGuard<'_, Host> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl NetBackend for FuzzBackend {
    unsafe fn recv(&mut self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        let Some(frame) = self.host().waiting.pop_front() else {
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        let mut done = 0;
        for v in iov {
            let n = v.iov_len.min(frame.len() - done);
            // SAFETY: the caller guarantees each iovec is writable for its length.
            unsafe { std::ptr::copy_nonoverlapping(frame[done..].as_ptr(), v.iov_base.cast(), n) };
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
        let mut host = self.host();
        assert_eq!(h.check_tx(frame.len() - NET_HDR_LEN, host.features), Ok(()));
        assert_eq!(h.num_buffers, 0);
        host.sent += 1;
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

/// The descriptor `d` as written in a table.
fn desc(d: &Desc) -> ring::Desc {
    ring::Desc {
        addr: match d.addr {
            Addr::Data(o) => DATA + u64::from(o) % (MEM - DATA),
            Addr::NearEnd(b) => MEM - u64::from(b),
            Addr::Any(x) => x,
        },
        len: match d.len {
            Len::Small(n) => u32::from(n),
            Len::Medium(n) => u32::from(n),
            Len::Any(n) => n,
        },
        flags: if d.next { F_NEXT } else { 0 } | if d.writable { F_WRITE } else { 0 },
        next: u16::from(d.next_index) % QSIZE,
    }
}

/// Writes queue `q`'s table and available ring at `base`, tells `oracle` what the device
/// may write, and returns the queue as the device gets it.
fn lay_out(
    g: &Guest,
    oracle: &mut WriteOracle,
    base: u64,
    q: &QueueInput,
    event_idx: bool,
) -> Queue {
    let mut r = Ring::new(QSIZE, base, base + 0x100, base + 0x200);
    r.register(oracle);
    for (i, d) in q.descs.iter().take(usize::from(QSIZE)).enumerate() {
        let d = desc(d);
        r.write_desc(g, i as u16, d);
        if d.flags & F_WRITE != 0 {
            oracle.allow(d.addr, u64::from(d.len));
        }
    }
    let heads = q.heads.len().min(usize::from(QSIZE));
    for h in q.heads.iter().take(heads) {
        r.publish(g, u16::from(*h) % QSIZE);
    }
    // A driver running ahead of what it wrote.
    r.advance_avail(g, q.extra_avail.unwrap_or(0));
    let mut queue = Queue::new(QSIZE).expect("a queue of 16");
    queue.set_desc_table_address(Some(r.desc as u32), Some(0));
    queue.set_avail_ring_address(Some(r.avail as u32), Some(0));
    queue.set_used_ring_address(Some(r.used as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    queue
}

/// Decodes an input from the fuzzer's bytes and runs it (nothing to run if they do not
/// decode).
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

/// Runs `input`, panicking when an oracle fails.
pub fn run(input: &Input) {
    let _ = run_counting(input);
}

/// Whether `data` decodes to an input that gets a frame through the device, either way
/// (for seed selection).
pub fn reaches_goal(data: &[u8]) -> bool {
    Input::arbitrary_take_rest(Unstructured::new(data)).is_ok_and(|input| {
        let r = run_counting(&input);
        r.activated && (r.sent > 0 || r.received > 0)
    })
}

/// What a run got to.
#[derive(Debug, Default, Clone, Copy)]
struct Reached {
    activated: bool,
    /// Frames the device sent to the backend.
    sent: usize,
    /// Frames the device took from the backend.
    received: usize,
}

fn run_counting(input: &Input) -> Reached {
    let g = Guest::new(REGION, input.fill);
    let host = Arc::new(Mutex::new(Host::default()));
    let config = NetConfig::new(vec![Box::new(FuzzBackend(host.clone()))]);
    let mut dev = Net::new(config).expect("Net::new");
    let features = (u64::from(input.features) & dev.device_features())
        | FEATURE_VERSION_1
        | (u64::from(input.features >> 31) * FEATURE_RING_EVENT_IDX);
    dev.ack_features(features);
    let backend = FuzzBackend(host);
    backend.host().features = features;
    let event_idx = features & FEATURE_RING_EVENT_IDX != 0;
    let mut oracle = WriteOracle::new();
    let mut queues = Vec::new();
    for (i, (q, base)) in input.queues.iter().zip(QUEUE_BASES).enumerate() {
        let queue = lay_out(&g, &mut oracle, base, q, event_idx);
        queues.push((
            i as u16,
            queue,
            EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        ));
    }
    let frames = queue_frames(&backend, &input.frames);
    let ctx = ActivateContext::new(
        g.mem.clone(),
        features,
        queues,
        Arc::new(NoIrq),
        NeedsReset::new(),
    );
    if dev.activate(ctx).is_err() {
        return Reached::default();
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
    oracle.check_guest(&g, "net");
    let host = backend.host();
    Reached {
        activated: true,
        sent: host.sent,
        received: frames - host.waiting.len(),
    }
}

/// Queues the host's frames (at most 8); returns how many.
fn queue_frames(backend: &FuzzBackend, frames: &[Frame]) -> usize {
    let mut host = backend.host();
    for f in frames.iter().take(8) {
        let size = match f.large {
            false => usize::from(f.size) % 2048,
            true => usize::from(f.size) % (NET_HDR_LEN + MAX_FRAME_LEN + 1),
        };
        let mut frame = vec![f.fill; size];
        if size >= NET_HDR_LEN + 6 {
            frame[NET_HDR_LEN..NET_HDR_LEN + 6].copy_from_slice(&f.dest);
        }
        host.waiting.push_back(frame);
    }
    host.waiting.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds;

    /// Random bytes decode and activate the device; whether they get a frame through is
    /// reported (a random table rarely holds a chain the device accepts).
    #[test]
    fn seeds_decode_and_activate_the_device() {
        let seeds = seeds::for_target("net_queues");
        let mut runs = Vec::new();
        for s in &seeds {
            if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(s)) {
                runs.push(run_counting(&input));
            }
        }
        let active = runs.iter().filter(|r| r.activated).count();
        let sent: usize = runs.iter().map(|r| r.sent).sum();
        let received: usize = runs.iter().map(|r| r.received).sum();
        eprintln!("net_queues seeds: {} decode, {active} activate, {sent} frames sent, {received} received", runs.len());
        assert!(active > 0);
    }

    /// One frame from the host into a receive chain of one writable buffer, and one frame
    /// from a transmit chain of a header and data, through the real queues.
    #[test]
    fn a_frame_each_way() {
        let buf = |addr: u16, len: u16, writable: bool| Desc {
            addr: Addr::Data(addr),
            len: Len::Medium(len),
            next: false,
            writable,
            next_index: 0,
        };
        let mut tx_hdr = buf(0x800, NET_HDR_LEN as u16, false);
        tx_hdr.next = true;
        tx_hdr.next_index = 1;
        let queue = |descs: Vec<Desc>| QueueInput {
            heads: vec![0],
            descs,
            extra_avail: None,
        };
        let input = Input {
            features: 0,
            queues: [
                queue(vec![buf(0, 2048, true)]),
                queue(vec![tx_hdr, buf(0x1000, 64, false)]),
                queue(Vec::new()),
            ],
            frames: vec![Frame {
                size: 100,
                large: false,
                fill: 0x5A,
                dest: [0xFF; 6],
            }],
            ops: vec![Op::FramesArrive, Op::Notify(1)],
            fill: 0,
        };
        let r = run_counting(&input);
        assert_eq!((r.activated, r.sent, r.received), (true, 1, 1), "{r:?}");
    }
}
