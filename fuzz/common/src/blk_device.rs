//! `vmkit_virtio_blk::Block` through its real data path: requests built in guest memory,
//! popped from the ring by the device loop, resolved to iovecs and run by the sync engine
//! (`preadv`/`pwritev`) or io_uring on a 64-sector memfd disk, completed through the used
//! ring.
//!
//! The request builder lays out header, data buffers and status (directly or through an
//! indirect table) for IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES and unknown types, with
//! sectors mostly inside the disk and sometimes at or past its end, data of whole sectors or
//! any length, discard/write-zeroes segments; hostile runs add damaged chains (flipped
//! directions, bad lengths and addresses, wild `next`, loops) and raw ring writes, resets
//! mid-I/O, read-only disks.
//!
//! Oracles, besides "never panics":
//! - guest memory changes only in the used ring and in device-writable buffers;
//! - every used element names a head of the queue with a length no larger than the bytes
//!   the driver made writable in that chain;
//! - a status byte the device wrote is OK, IOERR or UNSUPP;
//! - in behaving runs, each request gets the answer the virtio spec and the disk say: OK
//!   with the disk's bytes for an in-range read (used length = data + status), the data on
//!   the disk after an in-range write, IOERR past the end or writing a read-only disk,
//!   UNSUPP for an unknown type, the serial for GET_ID;
//! - after any sequence, a reset and a fresh ring, a legitimate read is still served
//!   correctly.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use virtio_queue::{Queue, QueueT};
use vmkit_virtio::{
    ActivateContext, NeedsReset, VirtioDevice, FEATURE_RING_EVENT_IDX, FEATURE_VERSION_1,
};
use vmkit_virtio_blk::request::{
    S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
use vmkit_virtio_blk::{Block, BlockConfig};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::{disk_contents, memfd_disk, Engine, Irq};
use crate::guest::{Guest, WriteOracle};
use crate::ring::{Alloc, Buf, Damage, Form, Len, RawRing, Ring};

const REGION: u64 = 0x2_0000;
const SECTORS: u64 = 64;
const DISK: usize = (SECTORS * 512) as usize;
const QSIZE: u16 = 16;
const SERIAL: &str = "vmkit-fuzz-disk-0001";
/// Ring areas: the hostile-phase ring at 0, the fresh ring of the final check at 0x1000.
const DATA: std::ops::Range<u64> = 0x2000..2 * REGION;

pub use crate::blk_request::Type as ReqType;

/// A sector: mostly inside the disk, sometimes at its end or anywhere.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Sector {
    /// `n % 64`.
    In(u8),
    /// `64 - n % 4` (at or just before the end).
    End(u8),
    /// Any.
    Any(u64),
}

impl Sector {
    fn get(self) -> u64 {
        match self {
            Sector::In(n) => u64::from(n) % SECTORS,
            Sector::End(n) => SECTORS - u64::from(n % 4),
            Sector::Any(n) => n,
        }
    }
}

/// A discard / write-zeroes segment.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Range {
    /// First sector.
    pub sector: Sector,
    /// Sectors (mostly few).
    pub sectors: u8,
    /// `UNMAP` and other flag bits.
    pub flags: u8,
}

/// A request the builder lays out.
#[derive(Arbitrary, Debug, Clone)]
pub struct Request {
    /// Its type.
    pub ty: ReqType,
    /// Its sector.
    pub sector: Sector,
    /// Data buffers: sectors each (1–8), or any length when `odd`.
    #[arbitrary(with = crate::seeds::up_to::<u8, 4>)]
    pub data: Vec<u8>,
    /// Data buffers of any length instead of whole sectors.
    pub odd: Option<Len>,
    /// Discard / write-zeroes segments.
    #[arbitrary(with = crate::seeds::up_to::<Range, 3>)]
    pub ranges: Vec<Range>,
    /// Direct or indirect.
    pub form: Form,
    /// A fault (hostile runs only).
    pub damage: Damage,
    /// Byte an OUT request writes.
    pub fill: u8,
}

/// An operation.
#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    /// The driver adds a request.
    Add(Request),
    /// The driver notifies; the device runs its queue.
    Notify,
    /// The engine's completions are reaped (io_uring: after waiting for them).
    Complete,
    /// Hostile ring contents (hostile runs only).
    Raw(RawRing),
    /// Device reset with whatever is in flight, then a fresh activation (hostile runs only).
    Reset,
}

/// A run.
#[derive(Arbitrary, Debug, Clone)]
pub struct Input {
    /// The engine.
    pub engine: Engine,
    /// Open the disk read-only.
    pub read_only: bool,
    /// Negotiate `EVENT_IDX`.
    pub event_idx: bool,
    /// Negotiate discard / write-zeroes.
    pub discard: bool,
    /// Let the driver misbehave (damaged chains, raw ring writes, resets).
    pub hostile: bool,
    /// Byte guest memory starts as.
    pub fill: u8,
    /// Operations.
    #[arbitrary(with = crate::seeds::many::<Op, 48>)]
    pub ops: Vec<Op>,
}

/// What a run reached.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Requests answered OK.
    pub ok: usize,
    /// Requests checked against the disk model.
    pub checked: usize,
}

/// Runs `data` as an [`Input`].
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

/// Whether `data` gets a request checked against the disk before the final read (the
/// seeds' goal).
pub fn reaches_goal(data: &[u8]) -> bool {
    Input::arbitrary_take_rest(Unstructured::new(data)).is_ok_and(|i| run(&i).checked > 1)
}

/// What the driver expects of a request it sent.
#[derive(Debug, Clone)]
struct Expect {
    status_at: Option<u64>,
    writable: u64,
    want: Option<Want>,
    /// Write-type requests added before this one (data is compared only if none came since).
    writes: u64,
}

#[derive(Debug, Clone)]
enum Want {
    /// OK with these bytes at these buffers, used length data + 1.
    Read(Vec<(u64, u32)>, u64),
    /// OK, and the disk holds these bytes at this offset.
    Written(u64, Vec<u8>),
    /// OK, nothing else to check (flush, discard, write zeroes).
    Ok,
    /// This status.
    Status(u8),
    /// OK with the serial in this buffer.
    Id(u64, u32),
}

struct Harness {
    g: Guest,
    oracle: WriteOracle,
    ring: Ring,
    alloc: Alloc,
    dev: Block,
    disk: File,
    irq: Arc<Irq>,
    features: u64,
    read_only: bool,
    hostile: bool,
    expect: HashMap<u16, Expect>,
    /// Which head holds each table slot (behaving runs).
    slots: Vec<Option<u16>>,
    writes: u64,
    /// Raw ring contents were written since the last activation.
    raw_seen: bool,
    report: Report,
}

/// Runs one input.
pub fn run(input: &Input) -> Report {
    let disk = memfd_disk(SECTORS);
    let mut config = BlockConfig::new(disk.try_clone().expect("dup the memfd"));
    config.read_only = input.read_only;
    config.engine = input.engine.into();
    config.serial = SERIAL.into();
    config.queue_size = QSIZE;
    let Ok(mut dev) = Block::new(config) else {
        return Report::default(); // io_uring unavailable: nothing to fuzz
    };
    let mut features = FEATURE_VERSION_1 | (dev.device_features() & !(3 << 13));
    if input.event_idx {
        features |= FEATURE_RING_EVENT_IDX;
    }
    if input.discard {
        features |= dev.device_features() & (3 << 13);
    }
    dev.ack_features(features);
    let mut h = Harness {
        g: Guest::new(REGION, input.fill),
        oracle: WriteOracle::new(),
        ring: Ring::at(0, QSIZE),
        alloc: Alloc::new(DATA),
        dev,
        disk,
        irq: Arc::new(Irq::default()),
        features,
        read_only: input.read_only,
        hostile: input.hostile,
        expect: HashMap::new(),
        slots: vec![None; usize::from(QSIZE)],
        writes: 0,
        raw_seen: false,
        report: Report::default(),
    };
    h.activate(0);
    for op in &input.ops {
        h.apply(op);
    }
    // A last notification: every request a behaving driver added must be answered.
    h.dev.process_queue(0);
    h.drain();
    if !h.hostile {
        let lost: Vec<u16> = h.expect.keys().copied().collect();
        assert!(lost.is_empty(), "requests {lost:?} were never answered");
    }
    h.oracle.check_guest(&h.g, "blk_device");
    h.final_check();
    h.report
}

impl Harness {
    fn activate(&mut self, base: u64) {
        self.ring = Ring::at(base, QSIZE);
        self.ring.register(&mut self.oracle);
        self.g.write(self.ring.avail, &[0; 4]);
        self.g.write(self.ring.used, &[0; 4]);
        let mut q = Queue::new(QSIZE).expect("queue size");
        q.set_desc_table_address(Some(self.ring.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.ring.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.ring.used as u32), Some(0));
        q.set_event_idx(self.features & FEATURE_RING_EVENT_IDX != 0);
        q.set_ready(true);
        let fd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let ctx = ActivateContext::new(
            self.g.mem.clone(),
            self.features,
            vec![(0, q, fd)],
            self.irq.clone(),
            NeedsReset::new(),
        );
        self.dev.activate(ctx).expect("activate");
        self.expect.clear();
        self.raw_seen = false;
        self.slots.fill(None);
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Add(r) => self.add(r),
            Op::Notify => {
                self.dev.process_queue(0);
                self.collect();
            }
            Op::Complete => self.drain(),
            Op::Raw(raw) if self.hostile => {
                self.ring.add_raw(&self.g, &mut self.oracle, &DATA, raw);
                self.expect.clear();
                self.raw_seen = true;
                self.hostile_seen();
            }
            Op::Reset if self.hostile => {
                let _ = self.dev.reset();
                self.ring.take_used(&self.g);
                self.activate(0);
            }
            Op::Raw(_) | Op::Reset => {}
        }
    }

    /// Once the ring holds hostile contents, the table slots are no longer tracked.
    fn hostile_seen(&mut self) {
        self.slots.fill(None);
    }

    fn add(&mut self, r: &Request) {
        if self.expect.is_empty() && !self.hostile {
            self.alloc.reset();
        }
        // A behaving driver does not reuse buffers still in flight: no room, no request.
        let room = 16 * 8 + 0x4000 * 4 + 64 * 16;
        if !self.expect.is_empty() && self.alloc.would_wrap(room) {
            if !self.hostile {
                return;
            }
            // A hostile driver reuses buffers in flight: what it expected of them is void.
            self.expect.clear();
        }
        let (bufs, want) = self.build(r);
        let slots = if r.form == Form::Direct {
            bufs.len()
        } else {
            1
        };
        let first = self.ring.next_desc_slot();
        let size = usize::from(QSIZE);
        let free = (0..slots).all(|i| self.slots[(first + i) % size].is_none());
        if !self.hostile && !free {
            return; // a driver waits for free descriptors
        }
        let damage = if self.hostile { r.damage } else { Damage::None };
        let (head, _) = self.ring.add_chain(
            &self.g,
            &mut self.oracle,
            &mut self.alloc,
            &bufs,
            r.form,
            damage,
        );
        for i in 0..slots {
            // Descriptors of a chain in flight rewritten: that chain is no longer the one
            // its expectation describes.
            if let Some(old) = self.slots[(first + i) % size].replace(head) {
                self.expect.remove(&old);
            }
        }
        // A damaged chain, or one over descriptors still in flight, has no expectation; nor
        // has any chain once raw ring contents were written (until a reset): a head the raw
        // ring made available may be in flight and complete under the same number.
        if damage != Damage::None || !free || self.raw_seen {
            self.expect.remove(&head);
        } else {
            let status_at = bufs.last().and_then(|b| b.addr);
            let writable = bufs
                .iter()
                .filter(|b| b.writable)
                .map(|b| u64::from(b.len))
                .sum();
            let want = if self.hostile { None } else { want };
            self.expect.insert(
                head,
                Expect {
                    status_at,
                    writable,
                    want,
                    writes: self.writes,
                },
            );
        }
        if matches!(r.ty, ReqType::Out | ReqType::Discard | ReqType::WriteZeroes) {
            self.writes += 1;
        }
    }

    /// The buffers of `r`, their contents written, and what a correct device answers.
    fn build(&mut self, r: &Request) -> (Vec<Buf>, Option<Want>) {
        let ty = match r.ty {
            ReqType::In => T_IN,
            ReqType::Out => T_OUT,
            ReqType::Flush => T_FLUSH,
            ReqType::GetId => T_GET_ID,
            ReqType::Discard => T_DISCARD,
            ReqType::WriteZeroes => T_WRITE_ZEROES,
            ReqType::Other(t) => t,
        };
        let sector = r.sector.get();
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&ty.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        let mut bufs = vec![self.placed(&header, false)];
        let writes_data = matches!(r.ty, ReqType::In | ReqType::GetId);
        let mut data = Vec::new();
        let mut bytes = Vec::new();
        if matches!(r.ty, ReqType::Discard | ReqType::WriteZeroes) {
            let mut seg = Vec::new();
            for x in &r.ranges {
                seg.extend_from_slice(&x.sector.get().to_le_bytes());
                seg.extend_from_slice(&u32::from(x.sectors % 16).to_le_bytes());
                seg.extend_from_slice(&u32::from(x.flags).to_le_bytes());
            }
            bufs.push(self.placed(&seg, false));
        } else {
            for (i, n) in r.data.iter().enumerate() {
                let len = match r.odd {
                    Some(l) => l.get() % 0x4000,
                    None => (u32::from(*n) % 8 + 1) * 512,
                };
                let content = vec![r.fill ^ i as u8; len as usize];
                let b = self.placed(&content, writes_data);
                data.push((b.addr.unwrap_or(0), len));
                bytes.extend_from_slice(&content);
                bufs.push(b);
            }
        }
        bufs.push(self.placed(&[0xEE], true));
        let want = self.want(r, sector, data, bytes);
        (bufs, want)
    }

    /// A buffer holding `content` at a fresh place in the data area.
    fn placed(&mut self, content: &[u8], writable: bool) -> Buf {
        let len = content.len() as u32;
        let addr = self.alloc.take(len);
        self.oracle.contents_written(addr, u64::from(len));
        self.g.write(addr, content);
        Buf {
            addr: Some(addr),
            len,
            writable,
        }
    }

    fn want(
        &self,
        r: &Request,
        sector: u64,
        data: Vec<(u64, u32)>,
        bytes: Vec<u8>,
    ) -> Option<Want> {
        let whole = r.odd.is_none() && !data.is_empty();
        let len: u64 = data.iter().map(|d| u64::from(d.1)).sum();
        let inside = sector
            .checked_mul(512)
            .and_then(|o| o.checked_add(len))
            .is_some_and(|e| e <= DISK as u64);
        let discard = self.features & (3 << 13) != 0;
        match r.ty {
            ReqType::In if whole && inside => Some(Want::Read(data, sector * 512)),
            ReqType::Out if whole && self.read_only => Some(Want::Status(S_IOERR)),
            ReqType::Out if whole && inside => Some(Want::Written(sector * 512, bytes)),
            ReqType::In | ReqType::Out if whole && sector > SECTORS => Some(Want::Status(S_IOERR)),
            ReqType::Flush if !self.read_only => Some(Want::Ok),
            ReqType::GetId if data.len() == 1 && data[0].1 >= 20 => {
                Some(Want::Id(data[0].0, data[0].1))
            }
            ReqType::Discard | ReqType::WriteZeroes if !discard => Some(Want::Status(S_UNSUPP)),
            ReqType::Other(t)
                if ![T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES].contains(&t) =>
            {
                Some(Want::Status(S_UNSUPP))
            }
            _ => None,
        }
    }

    /// Checks the used elements added since the last call.
    fn collect(&mut self) {
        let (_, used) = self.ring.take_used(&self.g);
        // A buffer the driver pointed over its own used ring makes its contents anything.
        let used_area = 6 + 8 * u64::from(QSIZE);
        if self.oracle.written_over(self.ring.used, used_area) {
            self.expect.clear();
            return;
        }
        for (id, len) in used {
            assert!(
                id < u32::from(QSIZE),
                "used element names head {id} of a {QSIZE}-entry queue"
            );
            let head = id as u16;
            for s in self.slots.iter_mut().filter(|s| **s == Some(head)) {
                *s = None;
            }
            let Some(e) = self.expect.remove(&head) else {
                continue;
            };
            assert!(
                u64::from(len) <= e.writable,
                "head {head}: used length {len} > {} writable bytes",
                e.writable
            );
            let Some(at) = e.status_at.filter(|_| len > 0) else {
                assert!(
                    e.want.is_none(),
                    "head {head}: a well-formed request answered with no status ({:?})",
                    e.want
                );
                continue;
            };
            // In hostile runs another chain's writable buffer (a damaged address, say) may
            // lie over this status byte and be written after it: only behaving runs,
            // whose buffers never overlap, are checked byte for byte.
            if self.hostile {
                continue;
            }
            let status = self.g.read_u8(at);
            assert!(
                matches!(status, S_OK | S_IOERR | S_UNSUPP),
                "head {head}: status byte {status:#x}, used length {len}"
            );
            if status == S_OK {
                self.report.ok += 1;
            }
            if let Some(want) = e.want {
                let stable = self.writes == e.writes;
                self.check(head, len, status, want, stable);
            }
        }
    }

    fn check(&mut self, head: u16, len: u32, status: u8, want: Want, stable: bool) {
        match want {
            Want::Status(s) => assert_eq!(status, s, "head {head}: status"),
            Want::Ok => assert_eq!(status, S_OK, "head {head}: status"),
            Want::Id(at, n) => {
                assert_eq!(status, S_OK, "head {head}: GET_ID status");
                let mut id = [0u8; 20];
                self.g.mem_read(at, &mut id);
                assert_eq!(
                    &id[..],
                    SERIAL.as_bytes(),
                    "head {head}: GET_ID ({n}-byte buffer)"
                );
            }
            Want::Read(bufs, offset) => {
                assert_eq!(status, S_OK, "head {head}: read status");
                let total: u32 = bufs.iter().map(|b| b.1).sum();
                assert_eq!(len, total + 1, "head {head}: read used length");
                if stable {
                    let disk = disk_contents(&self.disk, DISK);
                    let mut at = offset as usize;
                    for (addr, n) in bufs {
                        let mut got = vec![0u8; n as usize];
                        self.g.mem_read(addr, &mut got);
                        assert!(
                            got == disk[at..at + n as usize],
                            "head {head}: read data differs from the disk at {at:#x}"
                        );
                        at += n as usize;
                    }
                }
            }
            Want::Written(offset, bytes) => {
                assert_eq!(status, S_OK, "head {head}: write status");
                if stable || self.writes == 0 {
                    let disk = disk_contents(&self.disk, DISK);
                    let at = offset as usize;
                    assert!(
                        disk[at..at + bytes.len()] == bytes[..],
                        "head {head}: the disk does not hold what was written at {at:#x}"
                    );
                }
            }
        }
        self.report.checked += 1;
    }

    /// Reset, a fresh ring, one legitimate read: the device must still serve it.
    fn final_check(&mut self) {
        let _ = self.dev.reset();
        self.hostile = false;
        self.slots.fill(None);
        // The sequence's writes were judged: from here only the final read's count.
        self.g.rebase();
        self.oracle = WriteOracle::new();
        self.alloc.reset();
        self.activate(0x1000);
        let before = self.report.checked;
        let read = Request {
            ty: ReqType::In,
            sector: Sector::In(3),
            data: vec![1],
            odd: None,
            ranges: Vec::new(),
            form: Form::Direct,
            damage: Damage::None,
            fill: 0,
        };
        self.add(&read);
        self.dev.process_queue(0);
        self.drain();
        assert_eq!(
            self.report.checked,
            before + 1,
            "after the sequence and a reset, a read was not served"
        );
        self.oracle.check_guest(&self.g, "blk_device (final read)");
    }

    /// Waits for and reaps the engine's completions (io_uring), then checks the used ring.
    fn drain(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            // Read the completion eventfd first (as a VMM's loop does), so the poll below
            // waits for the next completion instead of returning at once.
            if let Some(fd) = self.dev.completion_fd() {
                let _ = fd.read();
            }
            self.dev.process_completions();
            self.collect();
            // Nothing in the engine: no completion will come to resume anything.
            if self.dev.in_flight() == 0 {
                break;
            }
            if let Some(fd) = self.dev.completion_fd() {
                let mut p = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(fd),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the call's duration; a timeout of 10 ms.
                unsafe { libc::poll(&mut p, 1, 10) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ty: ReqType, sector: u8, data: Vec<u8>, form: Form) -> Op {
        Op::Add(Request {
            ty,
            sector: Sector::In(sector),
            data,
            odd: None,
            ranges: vec![Range {
                sector: Sector::In(1),
                sectors: 2,
                flags: 0,
            }],
            form,
            damage: Damage::None,
            fill: 0x33,
        })
    }

    #[test]
    fn requests_of_every_type_get_the_right_answer_on_both_engines() {
        for engine in [Engine::Sync, Engine::IoUring] {
            let ops = vec![
                req(ReqType::Out, 5, vec![1, 0], Form::Direct),
                Op::Notify,
                Op::Complete,
                req(ReqType::In, 5, vec![2], Form::Indirect),
                req(ReqType::GetId, 0, vec![0], Form::Direct),
                req(ReqType::Flush, 0, vec![], Form::Direct),
                req(ReqType::Other(99), 0, vec![], Form::Direct),
                req(ReqType::WriteZeroes, 0, vec![], Form::Direct),
                Op::Notify,
                Op::Complete,
            ];
            let input = Input {
                engine,
                read_only: false,
                event_idx: true,
                discard: true,
                hostile: false,
                fill: 0,
                ops,
            };
            let r = run(&input);
            // OUT, IN, GET_ID, FLUSH, other, and the final read were checked.
            assert_eq!(r.checked, 6, "{engine:?}: {r:?}");
        }
    }

    #[test]
    fn the_generated_seeds_get_requests_checked() {
        let reached = crate::seeds::for_target("blk_device")
            .iter()
            .filter(|s| {
                Input::arbitrary_take_rest(Unstructured::new(s)).is_ok_and(|i| run(&i).checked > 1)
            })
            .count();
        assert!(
            reached >= 16,
            "only {reached} seeds get a request checked before the final read"
        );
    }
}
