//! A virtio driver for the transport targets: the initialisation sequence, any of its steps
//! alone or out of order, raw register accesses of any width and offset, chains on rings in
//! guest memory, and the final check that the device still serves a legitimate request.
//!
//! The transport is reached through [`Regs`]: virtio-mmio and virtio-pci each implement
//! it over their own register layout, and one [`Session`] drives either.

use arbitrary::Arbitrary;

use crate::devices::Dut;
use crate::guest::{Guest, WriteOracle};
use crate::ring::{Alloc, Buf, Damage, Form, Len, RawRing, Ring};

/// Status bit ACKNOWLEDGE (virtio 1.2 §2.1).
pub const ACKNOWLEDGE: u8 = 1;
/// Status bit DRIVER.
pub const DRIVER: u8 = 2;
/// Status bit DRIVER_OK.
pub const DRIVER_OK: u8 = 4;
/// Status bit FEATURES_OK.
pub const FEATURES_OK: u8 = 8;

/// Queues the driver sets up at most.
pub const MAX_QUEUES: usize = 4;
const QSIZE: u16 = 16;
/// Guest memory the rings use: slot `n` at `n * 0x1000`.
const SLOTS: u64 = 8;
/// Where the driver's buffers go.
pub const DATA: std::ops::Range<u64> = 0x8000..0x4_0000;

/// A transport as the driver sees it: raw accesses plus the steps of the initialisation.
pub trait Regs {
    /// A read of `data.len()` bytes at `offset` of the register window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write at `offset` of the register window.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// Offsets of the transport's registers (raw accesses draw from them).
    fn known_offsets(&self) -> &'static [u64];
    /// The register window's size.
    fn span(&self) -> u64;
    /// Whether a write at `offset` sets a queue address or size (the rings then move where
    /// the write oracle does not know them).
    fn moves_queues(&self, offset: u64, len: usize) -> bool;
    /// Runs the VMM's event loop once (queue notifications, device events).
    fn run_events(&mut self, timeout_ms: i32);
    /// What must hold before a driver initialises the device (virtio-pci: memory decoding
    /// and bus mastering on). Nothing by default.
    fn prepare(&mut self) {}
    /// Writes the device status.
    fn set_status(&mut self, status: u8);
    /// Reads the device status.
    fn status(&mut self) -> u8;
    /// Reads the 64 offered feature bits.
    fn device_features(&mut self) -> u64;
    /// Writes the 64 driver feature bits.
    fn set_driver_features(&mut self, features: u64);
    /// The driver features the transport holds (what FEATURES_OK would accept).
    fn accepted_features(&self) -> u64;
    /// The largest size of queue `q` (0: no such queue).
    fn queue_max(&mut self, q: u16) -> u16;
    /// Sets queue `q` up on `ring` (size and the three addresses), and its readiness.
    fn setup_queue(&mut self, q: u16, ring: &Ring, ready: bool);
    /// Notifies queue `q`.
    fn notify(&mut self, q: u16);
    /// The offset of config space in the window.
    fn config_offset(&self) -> u64;
}

/// A register offset: one of the transport's registers, or anywhere.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum RegOffset {
    /// The n-th known register (modulo their number), plus 0–3.
    Known(u8, u8),
    /// Any offset in the window.
    Any(u16),
}

/// A driver operation.
#[derive(Arbitrary, Debug, Clone)]
pub enum DriverOp {
    /// The whole initialisation, accepting `offered & mask` (VERSION_1 always).
    Init {
        /// Mask over the offered features.
        mask: u64,
    },
    /// Status written as given.
    Status(u8),
    /// Driver features written as given.
    Features(u64),
    /// A queue set up on ring slot `slot` (8 slots of 4 KiB) with `size` entries.
    Queue {
        /// Queue index.
        queue: u8,
        /// Ring slot.
        slot: u8,
        /// Size: 0 → 16, else as given.
        size: u16,
        /// QueueReady afterwards.
        ready: bool,
    },
    /// A chain on queue `queue`'s ring.
    Chain {
        /// Queue.
        queue: u8,
        /// Buffers: length and device-writable.
        #[arbitrary(with = crate::seeds::up_to::<(Len, bool), 4>)]
        bufs: Vec<(Len, bool)>,
        /// Direct or indirect.
        form: Form,
        /// A fault.
        damage: Damage,
    },
    /// Hostile ring contents on queue `.0`'s ring.
    Raw(u8, RawRing),
    /// The queue is notified and the event loop runs.
    Notify(u8),
    /// A register access.
    Reg {
        /// Where.
        offset: RegOffset,
        /// Width: mostly 4, else 1, 2, 8 or 0–15 bytes.
        width: u8,
        /// Written value, or a read.
        write: Option<u64>,
    },
    /// A config-space access.
    Config {
        /// Offset in config space.
        offset: u8,
        /// Width (as for `Reg`).
        width: u8,
        /// Written value, or a read.
        write: Option<u64>,
    },
    /// Device reset (Status 0).
    Reset,
}

fn width(w: u8) -> usize {
    match w % 8 {
        0 | 1 => 4,
        2 => 1,
        3 => 2,
        4 => 8,
        _ => usize::from(w % 16),
    }
}

/// The driver's state over one run.
pub struct Session<'a> {
    g: &'a Guest,
    dut: &'a Dut,
    oracle: WriteOracle,
    rings: Vec<Option<Ring>>,
    alloc: Alloc,
    served: usize,
    /// Queue addresses were written raw: the write oracle no longer knows the rings.
    unchecked: bool,
}

impl<'a> Session<'a> {
    /// A driver over `g` for `dut`.
    pub fn new(g: &'a Guest, dut: &'a Dut) -> Self {
        Self {
            g,
            dut,
            oracle: WriteOracle::new(),
            rings: vec![None; MAX_QUEUES],
            alloc: Alloc::new(DATA),
            served: 0,
            unchecked: false,
        }
    }

    /// Used elements with a length seen so far.
    pub fn served(&self) -> usize {
        self.served
    }

    /// Runs one operation of a driver that behaves: its initialisation, chains as built,
    /// notifications and config reads; any other operation is skipped.
    pub fn apply_behaving(&mut self, r: &mut dyn Regs, op: &DriverOp) {
        match op {
            DriverOp::Init { .. } => self.apply(r, op),
            // A behaving driver uses the queues it set up.
            DriverOp::Notify(q) => {
                if let Some(q) = self.set_up(*q) {
                    r.notify(q);
                    r.run_events(0);
                    self.collect();
                }
            }
            DriverOp::Chain {
                queue, bufs, form, ..
            } => {
                if let Some(q) = self.set_up(*queue) {
                    self.chain(q as u8, bufs, *form, Damage::None);
                }
                self.collect();
            }
            DriverOp::Config { write: None, .. } => self.apply(r, op),
            _ => {}
        }
    }

    /// Runs one operation.
    pub fn apply(&mut self, r: &mut dyn Regs, op: &DriverOp) {
        match op {
            DriverOp::Init { mask } => self.init(r, *mask),
            DriverOp::Status(s) => self.write_status(r, *s),
            DriverOp::Features(f) => r.set_driver_features(*f),
            DriverOp::Queue {
                queue,
                slot,
                size,
                ready,
            } => {
                let size = if *size == 0 { QSIZE } else { *size };
                let ring = Ring::at(u64::from(*slot) % SLOTS * 0x1000, size);
                self.queue(r, u16::from(*queue), ring, *ready);
            }
            DriverOp::Chain {
                queue,
                bufs,
                form,
                damage,
            } => self.chain(*queue % MAX_QUEUES as u8, bufs, *form, *damage),
            DriverOp::Raw(q, raw) => {
                if let Some(Some(ring)) = self.rings.get_mut(usize::from(*q) % MAX_QUEUES) {
                    ring.add_raw(self.g, &mut self.oracle, &DATA, raw);
                }
            }
            DriverOp::Notify(q) => {
                // Mostly queues that exist, sometimes one past them.
                r.notify(u16::from(*q % 8));
                r.run_events(0);
            }
            DriverOp::Reg {
                offset,
                width: w,
                write,
            } => {
                let off = match offset {
                    RegOffset::Known(i, d) => {
                        let known = r.known_offsets();
                        known[usize::from(*i) % known.len()] + u64::from(d % 4)
                    }
                    RegOffset::Any(o) => u64::from(*o) % r.span(),
                };
                self.access(r, off, width(*w), *write);
            }
            DriverOp::Config {
                offset,
                width: w,
                write,
            } => {
                let off = r.config_offset() + u64::from(*offset);
                self.access(r, off, width(*w), *write);
            }
            DriverOp::Reset => self.write_status(r, 0),
        }
        self.collect();
    }

    /// The `n`-th queue with a ring (modulo their number).
    fn set_up(&self, n: u8) -> Option<u16> {
        let set: Vec<usize> = (0..MAX_QUEUES)
            .filter(|i| self.rings[*i].is_some())
            .collect();
        let i = *set.get(usize::from(n) % set.len().max(1))?;
        u16::try_from(i).ok()
    }

    fn chain(&mut self, queue: u8, bufs: &[(Len, bool)], form: Form, damage: Damage) {
        let bufs: Vec<Buf> = bufs
            .iter()
            .map(|(l, w)| Buf {
                addr: None,
                len: l.get() % 0x2000,
                writable: *w,
            })
            .collect();
        if let Some(Some(ring)) = self.rings.get_mut(usize::from(queue)) {
            ring.add_chain(
                self.g,
                &mut self.oracle,
                &mut self.alloc,
                &bufs,
                form,
                damage,
            );
        }
    }

    fn access(&mut self, r: &mut dyn Regs, offset: u64, len: usize, write: Option<u64>) {
        let mut b = vec![0u8; len];
        match write {
            Some(v) => {
                for (i, x) in b.iter_mut().enumerate() {
                    *x = v.to_le_bytes()[i % 8];
                }
                if r.moves_queues(offset, len) {
                    self.unchecked = true;
                }
                r.write(offset, &b);
            }
            None => r.read(offset, &mut b),
        }
    }

    /// Writes the status; checks FEATURES_OK is only kept for offered features.
    fn write_status(&mut self, r: &mut dyn Regs, s: u8) {
        r.set_status(s);
        if s & FEATURES_OK != 0 && r.status() & FEATURES_OK != 0 {
            let offered = r.device_features();
            let accepted = r.accepted_features();
            assert_eq!(
                accepted & !offered,
                0,
                "FEATURES_OK kept with features {accepted:#x} beyond the offered {offered:#x}"
            );
        }
    }

    fn queue(&mut self, r: &mut dyn Regs, q: u16, ring: Ring, ready: bool) {
        ring.register(&mut self.oracle);
        self.g.write(ring.avail, &[0; 4]);
        self.g.write(ring.used, &[0; 4]);
        r.setup_queue(q, &ring, ready);
        if let Some(slot) = self.rings.get_mut(usize::from(q)) {
            *slot = Some(ring);
        } else {
            // A queue the driver does not track: its ring may be written anywhere.
            self.unchecked = true;
        }
    }

    /// The initialisation of virtio 1.2 §3.1.1, accepting `offered & mask`.
    pub fn init(&mut self, r: &mut dyn Regs, mask: u64) {
        r.prepare();
        r.set_status(0);
        self.rings.fill(None);
        r.set_status(ACKNOWLEDGE);
        r.set_status(ACKNOWLEDGE | DRIVER);
        let offered = r.device_features();
        r.set_driver_features(offered & (mask | vmkit_virtio::FEATURE_VERSION_1));
        self.write_status(r, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if r.status() & FEATURES_OK == 0 {
            return;
        }
        for q in 0..MAX_QUEUES as u16 {
            let max = r.queue_max(q);
            if max == 0 {
                break;
            }
            let ring = Ring::at(u64::from(q) * 0x1000, QSIZE.min(max));
            self.queue(r, q, ring, true);
        }
        r.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    /// Counts used elements (with a length) on every ring.
    fn collect(&mut self) {
        for ring in self.rings.iter_mut().flatten() {
            let (_, used) = ring.take_used(self.g);
            self.served += used.iter().filter(|(_, len)| *len > 0).count();
        }
    }

    /// The end of a run: the write oracle, then a reset, a correct initialisation and a
    /// legitimate request, which the device must serve.
    pub fn finish(&mut self, r: &mut dyn Regs) {
        if !self.unchecked {
            self.oracle.check_guest(self.g, "transport");
        }
        // From here on only the final request's writes are allowed.
        self.g.rebase();
        self.oracle = WriteOracle::new();
        self.alloc = Alloc::new(DATA);
        self.init(r, u64::MAX);
        assert!(
            r.status() & DRIVER_OK != 0,
            "a correct initialisation after the sequence did not reach DRIVER_OK"
        );
        let legit = self.dut.legit(self.g, &mut self.alloc);
        let q = usize::from(legit.queue);
        let Some(Some(ring)) = self.rings.get_mut(q) else {
            panic!("queue {q} was not set up by a correct initialisation");
        };
        let (head, _) = ring.add_chain(
            self.g,
            &mut self.oracle,
            &mut self.alloc,
            &legit.bufs,
            Form::Direct,
            Damage::None,
        );
        r.notify(legit.queue);
        for _ in 0..300 {
            r.run_events(10);
            let Some(Some(ring)) = self.rings.get_mut(q) else {
                break;
            };
            let (_, used) = ring.take_used(self.g);
            if let Some((_, len)) = used.iter().find(|(id, _)| *id == u32::from(head)) {
                self.dut.check_legit(self.g, &legit, *len);
                self.oracle
                    .check_guest(self.g, "transport (legitimate request)");
                return;
            }
        }
        panic!("after the sequence, a reset and a correct initialisation, a legitimate request was never answered");
    }
}
