//! `vmkit_virtio_console::Console`, activated directly on its two split rings in guest
//! memory (receiveq 0, transmitq 1) that a fuzzed driver fills, driven through the real
//! `process_queue`, `enqueue_input`, `ConsoleInput::push` and `emerg_wr`.
//!
//! The queues (2 to 64 entries each, `EVENT_IDX` or not) sit in 128 KiB of guest memory in
//! two adjacent regions; the per-chain transmit bound and the input buffer's capacity are
//! fuzzed. The driver posts receive and transmit chains (directly or through an indirect
//! table; damaged only in hostile runs; readable bytes hold a known pattern), writes raw
//! ring contents (hostile runs), notifies either queue, writes the config space, resets
//! the device and activates it again later (buffers posted and input typed before
//! `DRIVER_OK` included). The host pushes input, through `enqueue_input` or through a
//! `ConsoleInput` handle whose kick of the receiveq notifier is what runs the device.
//! Output goes to a shared `Vec`.
//!
//! Oracles, besides "never panics":
//! - guest memory changes only in the used rings and device-writable buffers;
//! - every used element names a head below the queue size; a receive chain's length is at
//!   most its device-writable bytes as the table holds it; a transmit chain's is 0 (the
//!   crate's docs: the device writes nothing into transmit buffers);
//! - a push takes `min(len, room left)` bytes; a `ConsoleInput` push that took bytes kicks
//!   the receiveq notifier exactly when the device is active;
//! - unless the device entered `DEVICE_NEEDS_RESET`, the receive used lengths add up to
//!   the input bytes that left the buffer and to the `rx_bytes` counter, and the output
//!   grows by the `tx_bytes` and `emergency_bytes` counters;
//! - in behaving runs (no hostile write, no damage, nothing reused in flight): the output
//!   is exactly the readable bytes of the transmit chains served, in order, each chain's
//!   cut at `max_tx_bytes_per_chain` (the rest dropped and counted), interleaved with the
//!   `emerg_wr` bytes; the input arrives in order, none lost or duplicated, receive chains
//!   taken in order while input waits, each getting `min(writable bytes, waiting)` bytes
//!   in its writable buffers in order (its used length) and nothing past them; every
//!   counter matches the model;
//! - after the whole sequence, a reset and re-activation on fresh rings, a transmit chain
//!   reaches the output and waiting input reaches a receive chain.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use arbitrary::{Arbitrary, Unstructured};
use vmkit_virtio::{NeedsReset, VirtioDevice};
use vmkit_virtio_console::{
    Console, ConsoleConfig, ConsoleStats, CONFIG_EMERG_WR_OFFSET, DEFAULT_INPUT_CAPACITY,
    DEFAULT_MAX_TX_BYTES_PER_CHAIN, RECEIVEQ, TRANSMITQ,
};
use vmm_sys_util::eventfd::EventFd;

use crate::ring::{Damage, Form, Len, RawRing, F_WRITE};
use crate::rng::{activate, check_used, check_writes, Irq, Mem, Posted, Side, DATA};
use crate::virtqueue::{BufInput, ChainInput};

const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x800;
const RX: usize = 0;
const TX: usize = 1;

/// What the driver, the host and the device do, in order.
#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    /// The driver posts a receive chain.
    Rx(ChainInput),
    /// The driver posts a transmit chain (its readable bytes hold the next pattern bytes).
    Tx(ChainInput),
    /// The host pushes `len % 600` bytes of input.
    Push {
        /// How many.
        len: u16,
        /// Through a `ConsoleInput` handle (then the kick runs the device), not
        /// `enqueue_input`.
        handle: bool,
    },
    /// The driver notifies the receiveq.
    NotifyRx,
    /// The driver notifies the transmitq.
    NotifyTx,
    /// The driver writes hostile ring contents (hostile runs only).
    Raw {
        /// On the transmitq (else the receiveq).
        tx: bool,
        /// What it writes.
        ring: RawRing,
    },
    /// The driver writes `byte` at config offset `offset % 16`.
    Config {
        /// The offset.
        offset: u8,
        /// The byte (then three zeros).
        byte: u8,
    },
    /// The driver resets the device and sets up fresh rings (activated by `Activate`).
    Reset,
    /// The driver sets `DRIVER_OK` again after a reset.
    Activate,
}

/// A run.
#[derive(Arbitrary, Debug, Clone)]
pub struct Input {
    /// Receiveq size: 2 << (this % 6).
    pub rx_log: u8,
    /// Transmitq size: 2 << (this % 6).
    pub tx_log: u8,
    /// Negotiate `EVENT_IDX`.
    pub event_idx: bool,
    /// Let the driver misbehave: without it, raw writes and damage are skipped and a chain
    /// is only added when its descriptors and buffers are free, so everything is checked
    /// against the model.
    pub hostile: bool,
    /// Byte guest memory starts as.
    pub fill: u8,
    /// `max_tx_bytes_per_chain` (0: the default, 1 MiB).
    pub tx_limit: u16,
    /// `input_capacity` (0: the default, 64 KiB).
    pub capacity: u16,
    /// Up to 64 operations.
    #[arbitrary(with = crate::seeds::many::<Op, 64>)]
    pub ops: Vec<Op>,
}

/// What a run reached (before the recovery check).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Bytes of guest output on the sink (transmit chains and `emerg_wr`).
    pub output: usize,
    /// Input bytes delivered into receive chains.
    pub delivered: u64,
    /// Chains checked against the model.
    pub checked: usize,
}

/// Runs `data` as an [`Input`].
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

/// Whether `data` gets transmit bytes to the sink and input into a receive chain (the goal
/// the generated seeds are selected for).
pub fn reaches_goal(data: &[u8]) -> bool {
    Input::arbitrary_take_rest(Unstructured::new(data)).is_ok_and(|i| {
        let r = run(&i);
        r.output > 0 && r.delivered > 0
    })
}

/// The output sink: a `Vec` the harness reads.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn since(&self, from: usize) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())[from..].to_vec()
    }
}

/// Runs one input.
pub fn run(input: &Input) -> Report {
    let mut h = Harness::new(input);
    for op in input.ops.iter().take(64) {
        h.step(op);
    }
    if !h.active {
        h.activate();
    }
    h.check_counters();
    h.mem.check("console");
    let report = h.report;
    h.recover();
    h.mem.check("console, recovery");
    report
}

struct Harness<'a> {
    input: &'a Input,
    mem: Mem,
    sides: Vec<Side>,
    dev: Console,
    sink: Sink,
    active: bool,
    needs_reset: NeedsReset,
    kick: Option<EventFd>,
    irq: Arc<Irq>,
    tx_limit: u32,
    capacity: usize,
    /// Behaving runs: input the device holds, and the output so far.
    waiting: VecDeque<u8>,
    output: Vec<u8>,
    pattern: u64,
    report: Report,
}

/// Byte `i` of the pattern pushed as input and written into transmit buffers: a long
/// period, so a lost or repeated run of bytes shows.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

impl<'a> Harness<'a> {
    fn new(input: &'a Input) -> Self {
        let sink = Sink::default();
        let mut config = ConsoleConfig::new(Box::new(sink.clone()));
        let tx_limit = match input.tx_limit {
            0 => DEFAULT_MAX_TX_BYTES_PER_CHAIN,
            n => u32::from(n),
        };
        let capacity = match input.capacity {
            0 => DEFAULT_INPUT_CAPACITY,
            n => usize::from(n),
        };
        config.max_tx_bytes_per_chain = tx_limit;
        config.input_capacity = capacity;
        let mut h = Self {
            input,
            mem: Mem::new(input.fill, !input.hostile),
            sides: Vec::new(),
            dev: Console::new(config).expect("nonzero bounds"),
            sink,
            active: false,
            needs_reset: NeedsReset::new(),
            kick: None,
            irq: Arc::new(Irq::default()),
            tx_limit,
            capacity,
            waiting: VecDeque::new(),
            output: Vec::new(),
            pattern: 0,
            report: Report::default(),
        };
        h.fresh_rings();
        h.activate();
        h
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Rx(c) => {
                self.mem.post(&mut self.sides, RX, c);
            }
            Op::Tx(c) => self.post_tx(c),
            Op::Push { len, handle } => self.push(usize::from(len % 600), *handle),
            Op::NotifyRx => self.run_rx(0, |h: &mut Self| h.dev.process_queue(RECEIVEQ)),
            Op::NotifyTx => self.notify_tx(),
            Op::Raw { tx, ring } if self.input.hostile => {
                let side = &mut self.sides[usize::from(*tx)];
                side.ring
                    .add_raw(&self.mem.g, &mut self.mem.oracle, &DATA, ring);
            }
            Op::Raw { .. } => {}
            Op::Config { offset, byte } => {
                let offset = u64::from(offset % 16);
                self.dev.write_config(offset, &[*byte, 0, 0, 0]);
                if offset == CONFIG_EMERG_WR_OFFSET {
                    self.output.push(*byte);
                }
            }
            Op::Reset => {
                let _ = self.dev.reset();
                self.active = false;
                self.fresh_rings();
            }
            Op::Activate if !self.active => self.activate(),
            Op::Activate => {}
        }
    }

    fn fresh_rings(&mut self) {
        let rx = Side::new(&mut self.mem, RX_RING, 2 << (self.input.rx_log % 6));
        let tx = Side::new(&mut self.mem, TX_RING, 2 << (self.input.tx_log % 6));
        self.sides = vec![rx, tx];
    }

    /// Sets `DRIVER_OK`: the device delivers input typed before to buffers posted before.
    fn activate(&mut self) {
        self.run_rx(0, |h: &mut Self| {
            let (needs_reset, mut fds) = activate(
                &mut h.dev,
                &h.mem,
                &h.sides,
                h.input.event_idx,
                h.irq.clone(),
            );
            h.needs_reset = needs_reset;
            h.kick = fds.drain(..).next();
            h.active = true;
        });
    }

    /// Posts a transmit chain and fills its readable buffers with pattern bytes.
    fn post_tx(&mut self, c: &ChainInput) {
        if let Some(p) = self.mem.post(&mut self.sides, TX, c) {
            self.post_tx_pattern(&p);
        }
    }

    fn next_pattern(&mut self) -> u8 {
        self.pattern += 1;
        pattern(self.pattern)
    }

    /// The host pushes `len` bytes.
    fn push(&mut self, len: usize, handle: bool) {
        let bytes: Vec<u8> = (0..len).map(|_| self.next_pattern()).collect();
        let room = self.capacity - self.dev.pending_input();
        let want = len.min(room);
        self.waiting.extend(&bytes[..want]);
        if !handle {
            let mut taken = 0;
            self.run_rx(want, |h: &mut Self| taken = h.dev.enqueue_input(&bytes));
            assert_eq!(
                taken, want,
                "enqueue_input took {taken} of {len}, room {room}"
            );
            return;
        }
        let taken = self.dev.input().push(&bytes);
        assert_eq!(taken, want, "push took {taken} of {len}, room {room}");
        let kicked = self.kick.as_ref().is_some_and(|k| k.read().is_ok());
        assert_eq!(kicked, self.active && taken > 0, "receiveq kick");
        if kicked {
            self.run_rx(0, |h: &mut Self| h.dev.process_queue(RECEIVEQ));
        }
    }

    /// Runs `f` (which may fill receive chains, having buffered `added` more input bytes)
    /// and judges the receiveq.
    fn run_rx(&mut self, added: usize, f: impl FnOnce(&mut Self)) {
        let before = self.dev.stats();
        let pending = self.dev.pending_input() + added;
        f(self);
        let after = self.dev.stats();
        let (_, used) = self.sides[RX].ring.take_used(&self.mem.g);
        for &(id, len) in &used {
            check_used(&self.mem, &self.sides[RX], id, len, "receiveq");
        }
        let total: u64 = used.iter().map(|&(_, l)| u64::from(l)).sum();
        self.report.delivered += total;
        if !self.needs_reset.is_set() {
            let left = (pending - self.dev.pending_input()) as u64;
            assert_eq!(
                total, left,
                "used lengths and the input that left the buffer"
            );
            assert_eq!(after.rx_bytes - before.rx_bytes, total, "rx_bytes");
            assert_eq!(after.rx_chains - before.rx_chains, used.len() as u64);
        }
        if self.input.hostile {
            self.sides[RX].posted.clear();
            self.waiting.clear();
        } else {
            self.check_rx(before, after, &used);
        }
    }

    /// A behaving driver's receive chains are taken in order while input waits, each
    /// filled with the next `min(writable, waiting)` input bytes.
    fn check_rx(&mut self, before: ConsoleStats, after: ConsoleStats, used: &[(u32, u32)]) {
        let mut readable = 0u64;
        for &(id, len) in used {
            let p = self.sides[RX].take_first(1).pop();
            let p = p.unwrap_or_else(|| panic!("receive chain {id} was never posted"));
            assert_eq!(id, u32::from(p.head), "receive chains out of order");
            let want = p.writable().min(self.waiting.len() as u64);
            assert_eq!(u64::from(len), want, "receive chain {id}: used length");
            let bytes: Vec<u8> = self.waiting.drain(..want as usize).collect();
            check_writes(&self.mem.g, &p.descs, len, Some(&bytes));
            readable += p.descs.iter().filter(|d| d.flags & F_WRITE == 0).count() as u64;
            self.report.checked += 1;
        }
        let left_posted = !self.sides[RX].posted.is_empty();
        assert!(
            !self.active || !left_posted || self.waiting.is_empty(),
            "input waits ({} bytes) while receive chains are posted",
            self.waiting.len()
        );
        assert_eq!(self.dev.pending_input(), self.waiting.len(), "input lost");
        let met = after.rx_readable_descriptors - before.rx_readable_descriptors;
        assert_eq!(met, readable, "rx_readable_descriptors");
        assert_eq!(after.bad_chains, before.bad_chains, "a good chain refused");
    }

    /// The driver notifies the transmitq: judges the output and the used ring.
    fn notify_tx(&mut self) {
        let before = self.dev.stats();
        let from = self.sink.len();
        let posted = if self.active && !self.input.hostile {
            self.sides[TX].take_posted()
        } else {
            Vec::new()
        };
        let mut expect = ExpectTx::default();
        for p in &posted {
            expect.chain(&self.mem.g, p, self.tx_limit);
        }
        self.dev.process_queue(TRANSMITQ);
        let after = self.dev.stats();
        let (_, used) = self.sides[TX].ring.take_used(&self.mem.g);
        for &(id, len) in &used {
            check_used(&self.mem, &self.sides[TX], id, len, "transmitq");
            assert_eq!(len, 0, "transmit chain {id} completed with {len} bytes");
        }
        let out = self.sink.since(from);
        if !self.needs_reset.is_set() {
            assert_eq!(
                after.tx_bytes - before.tx_bytes,
                out.len() as u64,
                "tx_bytes"
            );
            assert_eq!(after.tx_chains - before.tx_chains, used.len() as u64);
        }
        if self.input.hostile {
            self.sides[TX].posted.clear();
            return;
        }
        let heads: Vec<u32> = posted.iter().map(|p| u32::from(p.head)).collect();
        let ids: Vec<u32> = used.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, heads, "transmit chains served");
        assert!(
            out == expect.bytes,
            "output differs from the chains' readable bytes"
        );
        self.output.extend(&out);
        let dropped = after.tx_dropped - before.tx_dropped;
        let writable = after.tx_writable_descriptors - before.tx_writable_descriptors;
        assert_eq!((dropped, writable), (expect.dropped, expect.writable));
        assert_eq!(after.bad_chains, before.bad_chains, "a good chain refused");
        self.report.checked += posted.len();
    }

    /// The counters against the sink, and in behaving runs the whole output.
    fn check_counters(&mut self) {
        let s = self.dev.stats();
        let out = self.sink.since(0);
        self.report.output = out.len();
        if self.needs_reset.is_set() {
            return;
        }
        assert_eq!(
            out.len() as u64,
            s.tx_bytes + s.emergency_bytes,
            "output counted"
        );
        if !self.input.hostile {
            assert!(out == self.output, "output differs from the model");
        }
    }

    /// After everything: reset, fresh rings, a transmit chain reaches the output and waiting
    /// input a receive chain.
    fn recover(&mut self) {
        let _ = self.dev.reset();
        self.active = false;
        self.fresh_rings();
        self.activate();
        let tx = one_buffer(32, false);
        let p = self.mem.post(&mut self.sides, TX, &tx);
        let p = p.expect("a fresh ring takes a chain");
        self.post_tx_pattern(&p);
        let from = self.sink.len();
        let mut expect = ExpectTx::default();
        expect.chain(&self.mem.g, &p, self.tx_limit);
        self.dev.process_queue(TRANSMITQ);
        let (_, used) = self.sides[TX].ring.take_used(&self.mem.g);
        assert_eq!(used, vec![(u32::from(p.head), 0)], "transmit after reset");
        assert!(self.sink.since(from) == expect.bytes, "output after reset");
        let rx = one_buffer(64, true);
        let p = self.mem.post(&mut self.sides, RX, &rx);
        let p = p.expect("a fresh ring takes a chain");
        let pending = self.dev.pending_input();
        let taken = self.dev.enqueue_input(b"!");
        let (_, used) = self.sides[RX].ring.take_used(&self.mem.g);
        let want = (pending + taken).min(64) as u32;
        assert!(want > 0, "input buffer empty and full at once");
        assert_eq!(used, vec![(u32::from(p.head), want)], "receive after reset");
    }

    fn post_tx_pattern(&mut self, p: &Posted) {
        for d in p.descs.iter().filter(|d| d.flags & F_WRITE == 0) {
            // A damaged length may be anything: the pattern covers what a careful driver's
            // buffers can hold.
            let n = d.len.min(0x1000);
            let bytes: Vec<u8> = (0..n).map(|_| self.next_pattern()).collect();
            self.mem.oracle.contents_written(d.addr, bytes.len() as u64);
            self.mem.g.write(d.addr, &bytes);
        }
    }
}

/// What a behaving driver's transmit chains must produce.
#[derive(Default)]
struct ExpectTx {
    bytes: Vec<u8>,
    dropped: u64,
    writable: u64,
}

impl ExpectTx {
    /// Adds chain `p`: its readable bytes as memory holds them, up to `limit`.
    fn chain(&mut self, g: &crate::guest::Guest, p: &Posted, limit: u32) {
        let mut left = u64::from(limit);
        for d in &p.descs {
            if d.flags & F_WRITE != 0 {
                self.writable += 1;
                continue;
            }
            let n = u64::from(d.len).min(left);
            let mut b = vec![0u8; n as usize];
            g.mem_read(d.addr, &mut b);
            self.bytes.extend(b);
            self.dropped += u64::from(d.len) - n;
            left -= n;
        }
    }
}

fn one_buffer(len: u8, writable: bool) -> ChainInput {
    ChainInput {
        bufs: vec![BufInput {
            len: Len::Small(len),
            writable,
        }],
        form: Form::Direct,
        damage: Damage::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(bufs: &[(u16, bool)], form: Form) -> ChainInput {
        ChainInput {
            bufs: bufs
                .iter()
                .map(|&(n, w)| BufInput {
                    len: Len::Medium(n),
                    writable: w,
                })
                .collect(),
            form,
            damage: Damage::None,
        }
    }

    fn input(tx_limit: u16, capacity: u16, hostile: bool, ops: Vec<Op>) -> Input {
        Input {
            rx_log: 2,
            tx_log: 2,
            event_idx: true,
            hostile,
            fill: 0x3C,
            tx_limit,
            capacity,
            ops,
        }
    }

    #[test]
    fn transmit_chains_reach_the_output_in_order_cut_at_the_bound() {
        let ops = vec![
            Op::Tx(chain(&[(10, false), (5, true), (20, false)], Form::Direct)),
            Op::Config {
                offset: 8,
                byte: b'!',
            },
            Op::Tx(chain(&[(7, false)], Form::Indirect)),
            Op::NotifyTx,
            Op::Config {
                offset: 9,
                byte: b'?',
            },
        ];
        let r = run(&input(0, 0, false, ops.clone()));
        assert_eq!((r.output, r.checked), (30 + 1 + 7, 2));
        // A bound of 12 keeps 12 of the first chain's 30 readable bytes.
        let r = run(&input(12, 0, false, ops));
        assert_eq!((r.output, r.checked), (12 + 1 + 7, 2));
    }

    #[test]
    fn input_arrives_in_order_across_receive_chains() {
        let ops = vec![
            Op::Push {
                len: 50,
                handle: false,
            },
            Op::Rx(chain(&[(8, false), (20, true), (10, true)], Form::Direct)),
            Op::Rx(chain(&[(100, true)], Form::Indirect)),
            Op::NotifyRx,
            Op::Push {
                len: 70,
                handle: true,
            },
            Op::Rx(chain(&[(5, true)], Form::Direct)),
            Op::Push {
                len: 3,
                handle: false,
            },
        ];
        let r = run(&input(0, 0, false, ops));
        // 30 + 20 of the first push; the second waits until the chain of 5 is posted and
        // the last push runs the device.
        assert_eq!((r.delivered, r.checked), (30 + 20 + 5, 3));
    }

    #[test]
    fn a_full_input_buffer_refuses_and_input_typed_before_activation_arrives() {
        let ops = vec![
            Op::Reset,
            Op::Push {
                len: 30,
                handle: true,
            },
            Op::Rx(chain(&[(16, true)], Form::Direct)),
            Op::Push {
                len: 30,
                handle: false,
            },
            Op::Activate,
            Op::Tx(chain(&[(4, false)], Form::Direct)),
            Op::NotifyTx,
        ];
        let r = run(&input(0, 40, false, ops));
        assert_eq!((r.delivered, r.output, r.checked), (16, 4, 2));
    }

    #[test]
    fn hostile_rings_are_survived_and_the_device_recovers() {
        let raw = RawRing {
            descs: vec![crate::ring::RawDesc {
                addr: crate::ring::Addr::NearEnd(8),
                len: Len::Small(64),
                flags: F_WRITE as u8,
                next: 0,
                wild_next: false,
            }],
            heads: vec![0, 1, 3],
            skew: crate::ring::Skew::Ahead(2),
            avail_flags: 0,
            used_event: 0,
        };
        let ops = vec![
            Op::Raw {
                tx: false,
                ring: raw.clone(),
            },
            Op::Raw {
                tx: true,
                ring: raw,
            },
            Op::Push {
                len: 10,
                handle: false,
            },
            Op::NotifyTx,
        ];
        run(&input(0, 0, true, ops));
    }

    #[test]
    fn the_generated_seeds_deliver_output_and_input() {
        let reached = crate::seeds::for_target("console")
            .iter()
            .filter(|s| reaches_goal(s))
            .count();
        assert!(reached >= 16, "only {reached} seeds reach the goal");
    }
}
