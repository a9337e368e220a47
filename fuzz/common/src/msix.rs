//! `vmkit_pci::MsixTable`: the MSI-X vector table, pending bit array and capability, driven
//! as a guest and a device drive them, against a model of the spec's rules.
//!
//! A table of 1 to 80 vectors delivers through a recording `MsiVectorSink`; its capability
//! sits in a `ConfigSpace` (after a vendor capability), and every configuration write is
//! followed by `set_control` with the control word, as virtio-pci does. The table and the
//! PBA sit in one BAR (table at 0, PBA at the next 4 KiB), dispatched as virtio-pci does.
//! The guest programs entries (address, data, vector control), masks and unmasks vectors,
//! makes raw table and PBA accesses of any width and offset (in and past the table, writes
//! to the PBA included), and writes the capability (enable, function mask, read-only
//! fields); the device triggers any vector index, drops pending messages (a device reset)
//! and resets the table.
//!
//! Oracles, besides "never panics":
//! - a trigger reaches the sink iff MSI-X is enabled, the function is not masked and the
//!   vector is not masked; a masked vector's trigger sets its pending bit instead;
//!   unmasking (vector or function) or enabling with a pending bit set delivers it and
//!   clears the bit; out-of-range vectors deliver nothing, set nothing and return false;
//! - every delivered vector's route in the sink holds the address and data the table holds
//!   and is unmasked; every route's message is the table's while enabled and removed while
//!   disabled, and its mask flag is the vector's while enabled;
//! - table reads return what the guest wrote (address low bits 1:0 and vector control
//!   bits 31:1 reading 0), past the table all ones; bad widths and alignments read all
//!   ones and change nothing;
//! - the PBA reads back exactly the pending set (zeros past the vectors); guest writes to
//!   it change nothing;
//! - only the enable and function-mask bits of the capability are writable.

use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use vmkit_irq::{MsiMessage, RecordingSink, SinkEvent};
use vmkit_pci::{
    ConfigSpace, MsixTable, PciIds, CAP_ID_VENDOR, MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK,
};

const MAX_OPS: usize = 256;
const PBA_OFFSET: u64 = 0x1000;

/// A vector index: mostly one of the table's.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Vector {
    /// Vector `n % vectors`.
    In(u8),
    /// The last vector.
    Last,
    /// `vectors + n`: out of range.
    Out(u16),
}

/// A field of a table entry.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Field {
    /// Message address, low dword.
    AddrLo,
    /// Message address, high dword.
    AddrHi,
    /// Message data.
    Data,
    /// Vector control.
    Control,
    /// Any byte offset in the entry (`n % 16`).
    Raw(u8),
}

/// A table or PBA access width: legal (4, 8) or not (0, 1, 2, 3, 16).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Width {
    /// 4 bytes.
    Four,
    /// 8 bytes.
    Eight,
    /// An illegal width.
    Odd(u8),
}

impl Width {
    fn len(self) -> usize {
        match self {
            Width::Four => 4,
            Width::Eight => 8,
            Width::Odd(n) => [0, 1, 2, 3, 16][usize::from(n % 5)],
        }
    }
}

/// One guest or device operation.
#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    /// The guest writes an entry's field.
    Write(Vector, Field, Width, u64),
    /// The guest reads an entry's field.
    Read(Vector, Field, Width),
    /// The guest programs an entry: address, data, unmasked or not.
    Program(Vector, u64, u32, bool),
    /// The guest masks (true) or unmasks a vector.
    Mask(Vector, bool),
    /// Any access to the BAR holding the table (0) and the PBA (0x1000): a read or a write.
    Bar(u16, Width, Option<u64>),
    /// The guest reads the PBA at `n % 24`.
    ReadPba(u8, Width),
    /// The guest writes the control word: enable, function mask.
    Control(bool, bool),
    /// The guest writes configuration space at the capability + `n % 16` (1, 2 or 4 bytes
    /// by `width % 3`), or anywhere when `n >= 0xF0`.
    Config(u8, u8, u32),
    /// The device triggers a vector.
    Trigger(Vector),
    /// The device drops pending messages (a device reset).
    ClearPending,
    /// The table is reset.
    Reset,
}

/// A table and what is done to it.
#[derive(Arbitrary, Debug, Clone)]
pub struct Input {
    /// Vectors: `1 + n % 80`.
    pub vectors: u8,
    /// The operations (at most 256, as many as the bytes hold).
    #[arbitrary(with = crate::seeds::many::<Op, MAX_OPS>)]
    pub ops: Vec<Op>,
}

/// What a run reached, for the tests that check the seeds reach the code.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Triggers delivered at once.
    pub delivered: usize,
    /// Triggers left pending.
    pub pended: usize,
    /// Pending vectors delivered on unmask or enable.
    pub flushed: usize,
}

/// Runs one input from the fuzzer's bytes.
pub fn fuzz(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    run(&input);
}

/// Runs one input, panicking when an oracle fails.
pub fn run(input: &Input) {
    run_with_stats(input);
}

/// Runs one input; returns what it reached.
pub fn run_with_stats(input: &Input) -> Stats {
    let mut h = Harness::new(1 + usize::from(input.vectors % 80));
    for op in &input.ops {
        h.op(op);
        h.check();
    }
    h.stats
}

/// The spec's view of the table.
#[derive(Debug, Clone)]
struct Model {
    entries: Vec<[u32; 4]>,
    pending: Vec<bool>,
    enabled: bool,
    function_mask: bool,
}

impl Model {
    fn masked(&self, v: usize) -> bool {
        self.function_mask || self.entries[v][3] & 1 != 0
    }

    fn message(&self, v: usize) -> MsiMessage {
        let e = self.entries[v];
        MsiMessage {
            address: u64::from(e[1]) << 32 | u64::from(e[0]),
            data: e[2],
        }
    }

    /// Delivers pending vectors no longer masked; returns them.
    fn flush(&mut self) -> Vec<u16> {
        if !self.enabled {
            return Vec::new();
        }
        let ready: Vec<usize> = (0..self.entries.len())
            .filter(|v| self.pending[*v] && !self.masked(*v))
            .collect();
        ready
            .iter()
            .map(|v| {
                self.pending[*v] = false;
                *v as u16
            })
            .collect()
    }

    fn table_word(&self, at: u64) -> u32 {
        let e = usize::try_from(at / 16)
            .ok()
            .and_then(|v| self.entries.get(v));
        e.map_or(u32::MAX, |e| e[(at % 16 / 4) as usize])
    }

    fn pba_word(&self, at: u64) -> u32 {
        let first = at.saturating_mul(8);
        (0..32)
            .filter(|b| {
                usize::try_from(first + b).is_ok_and(|v| self.pending.get(v) == Some(&true))
            })
            .fold(0, |w, b| w | 1 << b)
    }
}

struct Harness {
    table: MsixTable,
    sink: Arc<RecordingSink>,
    config: ConfigSpace,
    cap: u16,
    cap_bytes: [u32; 3],
    model: Model,
    /// The sink's route of each vector: (message, masked), as the updates said.
    routes: Vec<(Option<MsiMessage>, bool)>,
    /// Vectors the model says were delivered since the last check.
    expected: Vec<u16>,
    stats: Stats,
}

fn access_ok(offset: u64, len: usize) -> bool {
    matches!(len, 4 | 8) && offset.is_multiple_of(len as u64)
}

impl Harness {
    fn new(vectors: usize) -> Self {
        let sink = RecordingSink::new();
        let table = MsixTable::new(vectors, sink.clone()).expect("1 to 80 vectors");
        let mut config = ConfigSpace::new(PciIds::default());
        config
            .add_capability(CAP_ID_VENDOR, &[6, 0, 0, 0])
            .expect("vendor capability");
        let cap = table
            .add_capability(&mut config, 2, 0, 2, PBA_OFFSET as u32)
            .expect("MSI-X capability");
        let cap_bytes = [0, 4, 8].map(|o| config.read_u32(cap + o));
        let model = Model {
            entries: vec![[0, 0, 0, 1]; vectors],
            pending: vec![false; vectors],
            enabled: false,
            function_mask: false,
        };
        let routes = vec![(None, true); vectors];
        Self {
            table,
            sink,
            config,
            cap,
            cap_bytes,
            model,
            routes,
            expected: Vec::new(),
            stats: Stats::default(),
        }
    }

    fn vector(&self, v: Vector) -> u16 {
        let n = self.model.entries.len();
        match v {
            Vector::In(i) => (usize::from(i) % n) as u16,
            Vector::Last => (n - 1) as u16,
            Vector::Out(i) => (n as u16).saturating_add(i),
        }
    }

    fn op(&mut self, op: &Op) {
        match *op {
            Op::Write(v, f, w, value) => {
                self.write_table(self.field(v, f), &value.to_le_bytes().repeat(2)[..w.len()])
            }
            Op::Read(v, f, w) => self.read_table(self.field(v, f), w.len()),
            Op::Program(v, address, data, masked) => {
                let at = u64::from(self.vector(v)) * 16;
                self.write_table(at, &address.to_le_bytes());
                self.write_table(at + 8, &data.to_le_bytes());
                self.write_table(at + 12, &u32::from(masked).to_le_bytes());
            }
            Op::Mask(v, masked) => self.write_table(
                u64::from(self.vector(v)) * 16 + 12,
                &u32::from(masked).to_le_bytes(),
            ),
            Op::Bar(offset, w, value) => self.bar(u64::from(offset), w.len(), value),
            Op::ReadPba(offset, w) => self.read_pba(u64::from(offset % 24), w.len()),
            Op::Control(enable, mask) => {
                let c = if enable { MSIX_CONTROL_ENABLE } else { 0 }
                    | if mask { MSIX_CONTROL_FUNCTION_MASK } else { 0 };
                self.config_write(self.cap + 2, &c.to_le_bytes());
            }
            Op::Config(n, width, value) => {
                let len = [1, 2, 4][usize::from(width % 3)];
                let at = if n >= 0xF0 {
                    u16::from(n) * 17
                } else {
                    self.cap + u16::from(n % 16)
                };
                self.config_write(at, &value.to_le_bytes()[..len]);
            }
            Op::Trigger(v) => self.trigger(self.vector(v)),
            Op::ClearPending => {
                self.table.clear_pending();
                self.model.pending.fill(false);
            }
            Op::Reset => {
                self.table.reset();
                let n = self.model.entries.len();
                self.model = Model {
                    entries: vec![[0, 0, 0, 1]; n],
                    pending: vec![false; n],
                    enabled: false,
                    function_mask: false,
                };
            }
        }
    }

    fn field(&self, v: Vector, f: Field) -> u64 {
        let o = match f {
            Field::AddrLo => 0,
            Field::AddrHi => 4,
            Field::Data => 8,
            Field::Control => 12,
            Field::Raw(b) => u64::from(b % 16),
        };
        u64::from(self.vector(v)) * 16 + o
    }

    fn trigger(&mut self, vector: u16) {
        let v = usize::from(vector);
        let delivered = self
            .table
            .trigger(vector)
            .expect("the recording sink does not fail");
        let in_range = self.model.enabled && v < self.model.entries.len();
        assert_eq!(
            delivered, in_range,
            "trigger({vector}) returned {delivered}"
        );
        if !in_range {
            return;
        }
        if self.model.masked(v) {
            self.model.pending[v] = true;
            self.stats.pended += 1;
        } else {
            self.expected.push(vector);
            self.stats.delivered += 1;
        }
    }

    fn write_table(&mut self, offset: u64, data: &[u8]) {
        self.table.write_table(offset, data);
        if !access_ok(offset, data.len()) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = offset.saturating_add(4 * i as u64);
            let Some(e) = usize::try_from(at / 16)
                .ok()
                .and_then(|v| self.model.entries.get_mut(v))
            else {
                continue;
            };
            let value = u32::from_le_bytes(chunk.try_into().expect("4-byte chunks"));
            let f = (at % 16 / 4) as usize;
            e[f] = value & [!3, u32::MAX, u32::MAX, 1][f];
        }
        self.flush();
    }

    fn flush(&mut self) {
        let flushed = self.model.flush();
        self.stats.flushed += flushed.len();
        self.expected.extend(flushed);
    }

    fn read_table(&mut self, offset: u64, len: usize) {
        let mut data = vec![0u8; len];
        self.table.read_table(offset, &mut data);
        let expected: Vec<u8> = if access_ok(offset, len) {
            (0..len / 4)
                .flat_map(|i| {
                    self.model
                        .table_word(offset.saturating_add(4 * i as u64))
                        .to_le_bytes()
                })
                .collect()
        } else {
            vec![0xFF; len]
        };
        assert_eq!(data, expected, "{len}-byte table read at {offset:#x}");
    }

    fn read_pba(&mut self, offset: u64, len: usize) {
        let mut data = vec![0u8; len];
        self.table.read_pba(offset, &mut data);
        let expected: Vec<u8> = if access_ok(offset, len) {
            (0..len / 4)
                .flat_map(|i| self.model.pba_word(offset + 4 * i as u64).to_le_bytes())
                .collect()
        } else {
            vec![0xFF; len]
        };
        assert_eq!(data, expected, "{len}-byte PBA read at {offset:#x}");
    }

    /// A BAR access, dispatched as virtio-pci does: the table, the PBA (read-only), else
    /// nothing (reads all ones).
    fn bar(&mut self, offset: u64, len: usize, value: Option<u64>) {
        let table_end = self.table.table_size();
        let in_pba = offset
            .checked_sub(PBA_OFFSET)
            .filter(|o| *o < self.table.pba_size());
        match (value, in_pba) {
            (Some(v), _) if offset < table_end => {
                self.write_table(offset, &v.to_le_bytes().repeat(2)[..len])
            }
            (Some(_), _) => {} // the PBA and holes are read-only: nothing is called
            (None, _) if offset < table_end => self.read_table(offset, len),
            (None, Some(o)) => self.read_pba(o, len),
            (None, None) => {}
        }
    }

    fn config_write(&mut self, at: u16, data: &[u8]) {
        self.config.write(at, data);
        let control = self.config.read_u16(self.cap + 2);
        self.table.set_control(control);
        let enabled = control & MSIX_CONTROL_ENABLE != 0;
        let mask = control & MSIX_CONTROL_FUNCTION_MASK != 0;
        if (enabled, mask) != (self.model.enabled, self.model.function_mask) {
            self.model.enabled = enabled;
            self.model.function_mask = mask;
            self.flush();
        }
        for (i, want) in self.cap_bytes.iter().enumerate() {
            let got = self.config.read_u32(self.cap + 4 * i as u16);
            let writable = if i == 0 { 0xC000_0000 } else { 0 };
            assert_eq!(
                got & !writable,
                want & !writable,
                "MSI-X capability dword {i} changed"
            );
        }
    }

    /// The sink heard what the model says, and the table's state is the model's.
    fn check(&mut self) {
        let mut delivered = Vec::new();
        for e in self.sink.take() {
            match e {
                SinkEvent::Update(v, message, masked) => {
                    self.routes[usize::from(v)] = (message, masked)
                }
                SinkEvent::Trigger(v) => {
                    let want = (Some(self.model.message(usize::from(v))), false);
                    assert_eq!(
                        self.routes[usize::from(v)],
                        want,
                        "vector {v} delivered through a stale or masked route"
                    );
                    delivered.push(v);
                }
            }
        }
        delivered.sort_unstable();
        self.expected.sort_unstable();
        assert_eq!(delivered, std::mem::take(&mut self.expected), "deliveries");
        let m = &self.model;
        assert_eq!(self.table.enabled(), m.enabled, "enable");
        for v in 0..m.entries.len() {
            let (message, masked) = self.routes[v];
            assert_eq!(
                message,
                m.enabled.then(|| m.message(v)),
                "vector {v}'s route"
            );
            assert!(
                !m.enabled || masked == m.masked(v),
                "vector {v}'s route mask"
            );
            assert_eq!(
                self.table.is_pending(v as u16),
                m.pending[v],
                "vector {v} pending"
            );
            assert_eq!(
                self.table.is_masked(v as u16),
                m.masked(v),
                "vector {v} masked"
            );
        }
        let n = m.entries.len() as u16;
        assert!(
            !self.table.is_pending(n) && self.table.is_masked(n),
            "past the table"
        );
        self.read_pba(0, 8);
    }
}

#[cfg(test)]
mod tests;
